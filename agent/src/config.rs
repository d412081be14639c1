//! The configuration file of `tanzhen run --config PATH` (TOML).
//!
//! Every `run` flag that takes a value has a key: its long name in snake_case (`--log-level` is
//! `log_level`, `--otlp-header` is `otlp_header`). The keys are derived from the clap command
//! itself, so a new flag gets its key (and its entry in `tanzhen config default`) without edits
//! here. Values go through the flag's own value parser, so the file accepts exactly what the
//! command line accepts. A file value becomes the flag's default: the command line and the
//! `TANZHEN_*` environment still win (precedence: flag > environment > file > built-in default).
//!
//! Errors are one line, `path:line:col: key: message`; unknown keys are rejected.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction};
use toml::{Spanned, Value};

/// `run` options only meaningful on the command line: they have no key in the file.
const COMMAND_LINE_ONLY: &[&str] = &["config", "dry_run", "help", "version"];

/// Environment variables outside `TANZHEN_*` that configure a flag (read by the code that
/// resolves it): when set, they win over the file, as `TANZHEN_*` variables do.
const OTHER_ENV: &[(&str, &str)] = &[
    ("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ("otlp_protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    (
        "otlp_metrics_endpoint",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ),
    ("otlp_traces_endpoint", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    ("otlp_timeout", "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ("otlp_compression", "OTEL_EXPORTER_OTLP_COMPRESSION"),
    ("otlp_certificate", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
    (
        "otlp_client_certificate",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ),
    ("otlp_client_key", "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
    ("node_name", "NODE_NAME"),
];

/// Options of `tanzhen run` about the configuration file.
#[derive(Clone, Debug, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file: one key per flag, in snake_case (`tanzhen config default`
    /// prints them all). Flags and TANZHEN_* variables override it; SIGHUP re-reads it.
    #[arg(long, env = "TANZHEN_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// A configuration file that cannot be used; the message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    /// The file is not valid TOML, or a key or value is wrong.
    #[error("{path}:{line}:{col}: {msg}")]
    At {
        path: String,
        line: usize,
        col: usize,
        msg: String,
    },
}

/// One file setting, ready to install as a flag default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The clap argument id.
    pub id: String,
    /// The values, as they would be written on the command line.
    pub values: Vec<String>,
}

/// The snake_case key of a flag.
fn key_of(arg: &Arg) -> Option<String> {
    let id = arg.get_id().as_str();
    if COMMAND_LINE_ONLY.contains(&id) || !arg.get_action().takes_values() {
        return None;
    }
    Some(arg.get_long().unwrap_or(id).replace('-', "_"))
}

/// Flags of `run` that have a key, by key.
fn keyed_args(run: &clap::Command) -> BTreeMap<String, &Arg> {
    run.get_arguments()
        .filter_map(|a| key_of(a).map(|k| (k, a)))
        .collect()
}

/// 1-based line and column of byte `offset` in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before, |nl| &before[nl + 1..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// Reads and validates `path` against the flags of the `run` command.
pub fn load(
    path: &Path,
    run: &clap::Command,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Setting>, ConfigError> {
    let shown = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
        path: shown.clone(),
        err,
    })?;
    parse(&shown, &src, run, env)
}

/// Parses and validates the text of a configuration file (`path` only names it in errors).
/// Keys whose flag is set in the environment are left out (the environment wins).
pub fn parse(
    path: &str,
    src: &str,
    run: &clap::Command,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Setting>, ConfigError> {
    let at = |offset: usize, msg: String| {
        let (line, col) = line_col(src, offset);
        ConfigError::At {
            path: path.to_owned(),
            line,
            col,
            msg: msg.replace('\n', " "),
        }
    };
    let table: BTreeMap<Spanned<String>, Spanned<Value>> = toml::from_str(src).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        at(offset, e.message().trim().to_owned())
    })?;
    let keyed = keyed_args(run);
    let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
    let mut out = Vec::new();
    for (key, value) in &table {
        let name = key.get_ref().as_str();
        let Some(arg) = keyed.get(name) else {
            let known: Vec<&str> = keyed.keys().map(String::as_str).collect();
            let msg = if COMMAND_LINE_ONLY.contains(&name) {
                format!("`{name}` is a command-line option only; remove it from the file")
            } else {
                format!("unknown key `{name}`; known keys: {}", known.join(", "))
            };
            return Err(at(key.span().start, msg));
        };
        let values = values_of(value.get_ref(), arg)
            .map_err(|m| at(value.span().start, format!("{name}: {m}")))?;
        for v in &values {
            validate(run, arg, v).map_err(|m| at(value.span().start, format!("{name}: {m}")))?;
        }
        let from_env = arg.get_env().and_then(OsStr::to_str).is_some_and(set)
            || OTHER_ENV.iter().any(|&(k, var)| k == name && set(var));
        if !from_env {
            out.push(Setting {
                id: arg.get_id().to_string(),
                values,
            });
        }
    }
    Ok(out)
}

/// The command-line spelling of a TOML value for `arg`.
fn values_of(v: &Value, arg: &Arg) -> Result<Vec<String>, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Datetime(d) => Ok(d.to_string()),
        Value::Array(_) | Value::Table(_) => {
            Err("expected a value, not a nested array or table".to_owned())
        }
    };
    let many = matches!(arg.get_action(), ArgAction::Append);
    match v {
        Value::Array(items) => {
            let items = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
            Ok(if many { items } else { vec![items.join(",")] })
        }
        Value::Table(t) if many => t
            .iter()
            .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
            .collect(),
        Value::Table(_) => Err("expected a value, not a table".to_owned()),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// Runs the flag's value parser on `v` (by parsing `run --flag=v`); the error is the parser's
/// own message.
fn validate(run: &clap::Command, arg: &Arg, v: &str) -> Result<(), String> {
    use std::error::Error as _;
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    let argv = [
        std::ffi::OsString::from("run"),
        format!("--{long}={v}").into(),
    ];
    match run.clone().try_get_matches_from(argv) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.source() {
            Some(src) => src.to_string(),
            None => {
                let possible: Vec<String> = arg
                    .get_possible_values()
                    .iter()
                    .map(|p| p.get_name().to_owned())
                    .collect();
                if possible.is_empty() {
                    crate::cli::one_line(&e)
                        .trim_start_matches("tanzhen: error: ")
                        .to_owned()
                } else {
                    format!("`{v}` is not one of {}", possible.join(", "))
                }
            }
        }),
    }
}

/// `run` with the file's settings installed as flag defaults.
#[must_use]
pub fn install(mut run: clap::Command, settings: &[Setting]) -> clap::Command {
    for s in settings {
        let values = s.values.clone();
        run = run.mut_arg(s.id.as_str(), move |a| {
            if values.is_empty() {
                // `key = []`: an empty list of a repeatable flag.
                a.default_values(Vec::<String>::new())
            } else {
                a.default_values(values)
            }
        });
    }
    run
}

/// A TOML literal for a default value: numbers and booleans bare, everything else quoted.
fn literal(s: &str) -> String {
    if s.parse::<i64>().is_ok()
        || (s.contains('.') && s.parse::<f64>().is_ok())
        || s == "true"
        || s == "false"
    {
        s.to_owned()
    } else {
        Value::String(s.to_owned()).to_string()
    }
}

/// Text of `tanzhen config default`: every key with its help text and built-in default, as a
/// file that parses back to the defaults.
#[must_use]
pub fn default_text(run: &clap::Command) -> String {
    let mut out = String::from(
        "# tanzhen configuration (tanzhen run --config PATH).\n\
         # One key per `tanzhen run` flag, in snake_case. Precedence: command-line flag >\n\
         # environment variable > this file > built-in default. SIGHUP re-reads the file.\n",
    );
    for arg in run.get_arguments() {
        let Some(key) = key_of(arg) else { continue };
        out.push('\n');
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let help = if help.ends_with('.') {
            help
        } else {
            format!("{help}.")
        };
        for line in wrap(&help, 94) {
            let _ = writeln!(out, "# {line}");
        }
        if let Some(env) = arg.get_env().and_then(OsStr::to_str) {
            let _ = writeln!(out, "# Environment: {env}");
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let many = matches!(arg.get_action(), ArgAction::Append);
        let name = arg
            .get_value_names()
            .and_then(|n| n.first())
            .map_or_else(|| "VALUE".to_owned(), ToString::to_string);
        match (defaults.as_slice(), many) {
            ([], true) => {
                let _ = writeln!(out, "# {key} = [{}]", literal(&name));
            }
            ([], false) => {
                let example = arg
                    .get_possible_values()
                    .first()
                    .map_or(name, |p| p.get_name().to_owned());
                let _ = writeln!(out, "# {key} = {}", literal(&example));
            }
            (d, true) => {
                let items: Vec<String> = d.iter().map(|v| literal(v)).collect();
                let _ = writeln!(out, "{key} = [{}]", items.join(", "));
            }
            ([d, ..], false) => {
                let _ = writeln!(out, "{key} = {}", literal(d));
            }
        }
    }
    out
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::{
        cli::{Cli, Command, LogLevel, RunArgs},
        probe::ProbeKind,
    };

    fn run_cmd() -> clap::Command {
        Cli::command()
            .find_subcommand("run")
            .cloned()
            .expect("run subcommand")
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Parses `tanzhen run <argv>` with `src` as the file and `env` as the TANZHEN_* variables
    /// clap sees (set for real in the process: clap reads `std::env`).
    fn resolve(src: &str, argv: &[&str], env: &dyn Fn(&str) -> Option<String>) -> RunArgs {
        let settings = parse("t.toml", src, &run_cmd(), env).unwrap();
        let cmd = Cli::command().mut_subcommand("run", |r| install(r, &settings));
        let mut v = vec!["tanzhen", "run"];
        v.extend_from_slice(argv);
        let m = cmd.try_get_matches_from(v).unwrap();
        match Cli::from_arg_matches(&m).unwrap().command {
            Command::Run(r) => *r,
            other => panic!("{other:?}"),
        }
    }

    fn err(src: &str) -> String {
        parse("/etc/tanzhen/tanzhen.toml", src, &run_cmd(), &no_env)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn file_values_apply() {
        let r = resolve(
            "probes = [\"tcp\"]\nlisten = \"127.0.0.1:9600\"\ninterval = \"2s\"\n\
             log_level = \"debug\"\nmax_series_per_metric = 50\nseries_ttl = 0\n\
             otlp_endpoint = \"http://127.0.0.1:4318\"\notlp_header = [\"a=1\", \"b=2\"]\n\
             trace_sample_ratio = 0.5\n",
            &[],
            &no_env,
        );
        assert_eq!(*r.probes, [ProbeKind::Tcp]);
        assert_eq!(r.listen.0, Some("127.0.0.1:9600".parse().unwrap()));
        assert_eq!(r.interval, Duration::from_secs(2));
        assert!(matches!(r.log_level, LogLevel::Debug));
        assert_eq!(r.max_series_per_metric, 50);
        assert_eq!(r.series_ttl, Duration::ZERO);
        assert_eq!(
            r.otlp.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318")
        );
        assert_eq!(
            r.otlp.otlp_headers,
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert!((r.otlp.trace_sample_ratio - 0.5).abs() < f64::EPSILON);
        // A table works for the repeatable header flag too.
        let r = resolve(
            "otlp_header = { authorization = \"Bearer x\" }",
            &[],
            &no_env,
        );
        assert_eq!(
            r.otlp.otlp_headers,
            [("authorization".into(), "Bearer x".into())]
        );
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let src = "interval = \"2s\"\nlog_level = \"warn\"\n";
        let r = resolve(src, &["--interval", "7s"], &no_env);
        assert_eq!(r.interval, Duration::from_secs(7), "flag wins");
        assert!(matches!(r.log_level, LogLevel::Warn), "file beats default");
        let r = resolve("", &[], &no_env);
        assert_eq!(r.interval, Duration::from_secs(5), "default");
    }

    #[test]
    fn environment_beats_file() {
        // The file's key is dropped when its flag's variable is set; the flag then takes the
        // variable's value from clap.
        let env = |k: &str| (k == "TANZHEN_INTERVAL").then(|| "3s".to_owned());
        let s = parse(
            "t",
            "interval = \"2s\"\nseries_ttl = \"1m\"",
            &run_cmd(),
            &env,
        )
        .unwrap();
        assert_eq!(
            s,
            [Setting {
                id: "series_ttl".into(),
                values: vec!["1m".into()]
            }]
        );
        let env =
            |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4318".to_owned());
        let s = parse("t", "otlp_endpoint = \"http://f:4318\"", &run_cmd(), &env).unwrap();
        assert!(s.is_empty(), "{s:?}");
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let e = err("probes = [\"tcp\"]\ninterval = \n");
        assert!(e.starts_with("/etc/tanzhen/tanzhen.toml:2:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_the_known_keys() {
        let e = err("probes = \"tcp\"\n\n  intervall = \"5s\"\n");
        assert!(
            e.starts_with("/etc/tanzhen/tanzhen.toml:3:3: unknown key `intervall`; known keys: "),
            "{e}"
        );
        assert!(e.contains("interval, k8s, listen, log_level"), "{e}");
        let e = err("dry_run = true");
        assert_eq!(
            e,
            "/etc/tanzhen/tanzhen.toml:1:1: `dry_run` is a command-line option only; remove it from the file"
        );
    }

    #[test]
    fn bad_values_use_the_flags_messages() {
        assert_eq!(
            err("\ninterval = \"soon\""),
            "/etc/tanzhen/tanzhen.toml:2:12: interval: `soon` is not an interval; use e.g. 5s, 500ms or 1m (between 100ms and 3600s)"
        );
        let e = err("probes = [\"tcp\", \"bogus\"]");
        assert!(
            e.starts_with("/etc/tanzhen/tanzhen.toml:1:10: probes: unknown probe `bogus`"),
            "{e}"
        );
        assert_eq!(
            err("log_level = \"loud\""),
            "/etc/tanzhen/tanzhen.toml:1:13: log_level: `loud` is not one of error, warn, info, debug, trace"
        );
        assert!(
            err("max_series_per_metric = 0").contains("max_series_per_metric: 0 is not in 1.."),
            "{}",
            err("max_series_per_metric = 0")
        );
        assert_eq!(
            err("listen = { a = 1 }"),
            "/etc/tanzhen/tanzhen.toml:1:10: listen: expected a value, not a table"
        );
        let e = err("otlp_header = [\"novalue\"]");
        assert!(
            e.ends_with("otlp_header: an OTLP header must be KEY=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_file() {
        let e = load(Path::new("/nonexistent/tanzhen.toml"), &run_cmd(), &no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read the configuration file /nonexistent/tanzhen.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn default_config_parses_back_to_the_defaults() {
        let text = default_text(&run_cmd());
        let settings = parse("default", &text, &run_cmd(), &no_env).unwrap();
        let cmd = run_cmd();
        let keyed = keyed_args(&cmd);
        // Every flag with a built-in default appears uncommented; the others commented out.
        for (key, arg) in &keyed {
            let set = text.lines().any(|l| l.starts_with(&format!("{key} = ")));
            let commented = text.lines().any(|l| l.starts_with(&format!("# {key} = ")));
            assert!(
                set != commented && set != arg.get_default_values().is_empty(),
                "{key}:\n{text}"
            );
        }
        assert_eq!(
            settings.len(),
            keyed
                .values()
                .filter(|a| !a.get_default_values().is_empty())
                .count()
        );
        let from_file = format!("{:?}", resolve(&text, &[], &no_env));
        let plain = format!("{:?}", resolve("", &[], &no_env));
        assert_eq!(from_file, plain);
        // The commented-out examples are valid too once uncommented.
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = ")))
            .filter(|l| !l.starts_with("otlp_header"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            uncommented.contains("otlp_protocol = \"grpc\""),
            "{uncommented}"
        );
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 1), (1, 1));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
