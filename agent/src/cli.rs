//! Command-line interface (clap derive; the doc comments are the help text).

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use regex::Regex;

use crate::probe;

/// Version string: crate version plus the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("TANZHEN_GIT_REV"),
    ")"
);

/// tanzhen (探针): eBPF observability agent for TCP connects, system calls and the scheduler,
/// exporting Prometheus metrics.
#[derive(Debug, Parser)]
#[command(name = "tanzhen", version = VERSION, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum Command {
    /// Load the probes and serve their metrics until SIGINT or SIGTERM (needs root).
    Run(Box<RunArgs>),
    /// List every probe: what it measures, its kernel hooks and minimum kernel.
    Probes,
    /// Report what this kernel supports (BTF, BPF features, tracefs, kprobes, lockdown,
    /// capabilities) and how each requested probe will attach, or why it cannot. Exits 1 when a
    /// requested probe cannot load here.
    Check(CheckArgs),
    /// Configuration file helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print live events (tcp connects, process execs) or per-interval syscall top lines from a
    /// running agent, or with --standalone from probes loaded for this session.
    Watch(crate::live::watch::WatchArgs),
    /// Full-screen view of the top processes by syscalls, connects or run-queue wait, refreshed
    /// every interval (one table when stdout is not a terminal).
    Top(crate::live::tui::TopArgs),
}

/// Options of `tanzhen check`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// Probes to check, comma-separated, or `all`.
    #[arg(long, env = "TANZHEN_PROBES", default_value = "all", value_parser = probe::parse_list)]
    pub probes: probe::ProbeList,

    /// Report format: `table` for people, `json` for scripts (schema in README.md).
    #[arg(
        long,
        env = "TANZHEN_CHECK_OUTPUT",
        default_value = "table",
        value_enum
    )]
    pub output: OutputFormat,

    #[command(flatten)]
    pub compat: crate::compat::CompatArgs,
}

/// `tanzhen check --output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned `key value` rows.
    Table,
    /// One JSON object.
    Json,
}

/// `tanzhen config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a commented configuration file holding every key at its default.
    Default,
}

/// Options of `tanzhen run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Probes to load, comma-separated, or `all` (see `tanzhen probes`).
    #[arg(long, env = "TANZHEN_PROBES", default_value = "all", value_parser = probe::parse_list)]
    pub probes: probe::ProbeList,

    /// Address for the HTTP endpoint serving /metrics and /healthz, as IP:PORT, or `none` for
    /// no endpoint (OTLP export only).
    #[arg(long, env = "TANZHEN_LISTEN", default_value = "0.0.0.0:9527", value_parser = parse_listen)]
    pub listen: Listen,

    #[command(flatten)]
    pub otlp: crate::export::otlp::OtlpArgs,

    /// How often in-kernel aggregates (run-queue histograms, context switch counts) are drained
    /// into the metrics: `5s`, `500ms`, `1m`, or plain seconds.
    #[arg(long, env = "TANZHEN_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub interval: Duration,

    /// Log verbosity.
    #[arg(long, env = "TANZHEN_LOG_LEVEL", default_value = "info", value_enum)]
    pub log_level: LogLevel,

    /// Most series one metric may hold; new label sets past it fold into one series labelled
    /// `other` (counted in tanzhen_series_folded_total).
    #[arg(long, env = "TANZHEN_MAX_SERIES_PER_METRIC", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_series_per_metric: u64,

    /// Series not updated for this long leave the export (e.g. 10m, 1h; 0 keeps them forever).
    #[arg(long, env = "TANZHEN_SERIES_TTL", default_value = "10m", value_parser = parse_duration)]
    pub series_ttl: Duration,

    /// Check the flags, print the resulting configuration and exit without loading anything.
    #[arg(long)]
    pub dry_run: bool,

    /// After the probes attach, drop the capabilities that load probes (CAP_BPF, CAP_PERFMON,
    /// CAP_SYS_ADMIN, CAP_SYS_RESOURCE) from every thread; SIGHUP can then detach probes but
    /// not attach new ones. Without it only capabilities the agent never needs are dropped.
    #[arg(long, env = "TANZHEN_DROP_CAPS", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub drop_caps: bool,

    /// Only observe this process (tgid), in every probe.
    #[arg(long, env = "TANZHEN_PID")]
    pub pid: Option<u32>,

    /// Syscalls probe: only report processes whose name (comm) matches this regular
    /// expression, e.g. `^(nginx|java)$`.
    #[arg(long, env = "TANZHEN_SYSCALLS_COMM_FILTER", value_parser = parse_regex)]
    pub syscalls_comm_filter: Option<Regex>,

    /// Testing only: capacity of each generation of the kernel's per-(process, syscall) count
    /// map (default 16384), to exercise the map-full path.
    #[arg(long, env = "TANZHEN_SYSCALLS_MAP_ENTRIES", hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub syscalls_map_entries: Option<u32>,

    /// Testing only: capacity of the kernel's per-thread run-queue state map (default 32768),
    /// to check that exited threads leave no state behind.
    #[arg(long, env = "TANZHEN_SCHED_START_ENTRIES", hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub sched_start_entries: Option<u32>,

    /// Capacity of each in-memory ring of recent events served by /api/v1/events (tcp, exec,
    /// exit): the oldest event goes when a new one arrives.
    #[arg(long, env = "TANZHEN_EVENT_BUFFER_SIZE", default_value_t = crate::live::DEFAULT_EVENT_BUFFER, value_parser = parse_buffer_size)]
    pub event_buffer_size: usize,

    #[command(flatten)]
    pub compat: crate::compat::CompatArgs,

    #[command(flatten)]
    pub file: crate::config::ConfigArgs,

    #[command(flatten)]
    pub http: crate::server::HttpArgs,

    #[command(flatten)]
    pub k8s: crate::metadata::k8s::K8sArgs,
}

fn parse_buffer_size(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| format!("`{s}` is not an event count between 1 and 1000000; use e.g. 1024"))
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| {
        let why = e.to_string();
        let last = why
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        format!("`{s}` is not a valid regular expression ({})", last.trim())
    })
}

/// Log verbosity levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// Filter for aya's own logs: its loader logs every relocation at debug, so it stays at
    /// info unless `trace` is asked for.
    #[must_use]
    pub fn aya_filter(self) -> log::LevelFilter {
        match self {
            Self::Trace => log::LevelFilter::Trace,
            l => log::LevelFilter::from(l).min(log::LevelFilter::Info),
        }
    }
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => Self::Error,
            LogLevel::Warn => Self::Warn,
            LogLevel::Info => Self::Info,
            LogLevel::Debug => Self::Debug,
            LogLevel::Trace => Self::Trace,
        }
    }
}

/// Parses `500ms`, `5s`, `10m`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration; use e.g. 500ms, 5s, 10m or 1h");
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Where the HTTP endpoint listens; `None` (`--listen none`) serves nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "none" {
        return Ok(Listen(None));
    }
    s.parse::<SocketAddr>().map(|a| Listen(Some(a))).map_err(|_| {
        format!(
            "`{s}` is not an IP:PORT address; use e.g. 0.0.0.0:9527, 127.0.0.1:9527, [::]:9527 or none"
        )
    })
}

/// Parses a duration (see [`parse_duration`]) that must lie within `min..=max`; any failure
/// reads "`s` is not `what`; use e.g. `examples` (between `min` and `max`)".
pub fn duration_within(
    s: &str,
    (min, max): (Duration, Duration),
    what: &str,
    examples: &str,
) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not {what}; use e.g. {examples} (between {min:?} and {max:?})");
    parse_duration(s)
        .ok()
        .filter(|d| (min..=max).contains(d))
        .ok_or_else(bad)
}

/// Parses `--interval`: between 100ms and 1h.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    duration_within(
        s,
        (Duration::from_millis(100), Duration::from_secs(3600)),
        "an interval",
        "5s, 500ms or 1m",
    )
}

/// Why the command line (with its configuration file) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A flag or its value is wrong (or help/version was asked for).
    #[error("{}", one_line(.0))]
    Clap(#[from] clap::Error),
    /// The configuration file is unreadable or wrong.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

impl Cli {
    /// Parses the process arguments. Errors about a value print as one line and exit with
    /// code 2; help and version print as usual.
    #[must_use]
    pub fn parse_or_exit() -> Self {
        match Self::parse_with_file(std::env::args_os(), &|k| std::env::var(k).ok()) {
            Ok(cli) => cli,
            Err(ParseError::Clap(e)) => exit_with(&e),
            Err(ParseError::Config(e)) => {
                eprintln!("tanzhen: error: {e}");
                std::process::exit(2)
            }
        }
    }

    /// Parses `argv`; for `run --config PATH` the file's values become the flags' defaults
    /// (the command line and the environment win). `env` looks variables up.
    pub fn parse_with_file(
        argv: impl IntoIterator<Item = std::ffi::OsString>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ParseError> {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let argv: Vec<std::ffi::OsString> = argv.into_iter().collect();
        let cli = Self::try_parse_from(&argv)?;
        let Command::Run(run) = &cli.command else {
            return Ok(cli);
        };
        let Some(path) = &run.file.config else {
            return Ok(cli);
        };
        let cmd = Self::command();
        let settings = match cmd.find_subcommand("run") {
            Some(run) => crate::config::load(path, run, env)?,
            None => return Ok(cli),
        };
        let cmd = cmd.mut_subcommand("run", |r| crate::config::install(r, &settings));
        let matches = cmd.try_get_matches_from(&argv)?;
        Ok(Self::from_arg_matches(&matches)?)
    }

    /// Re-reads the configuration file of this process's `run` command line (SIGHUP).
    pub fn reload_run_args() -> Result<RunArgs, ParseError> {
        match Self::parse_with_file(std::env::args_os(), &|k| std::env::var(k).ok())?.command {
            Command::Run(r) => Ok(*r),
            _ => Err(ParseError::Clap(clap::Error::raw(
                clap::error::ErrorKind::InvalidSubcommand,
                "not a `run` command line",
            ))),
        }
    }
}

/// The one-line form of a clap error (what `parse_or_exit` prints).
#[must_use]
pub fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ");
    format!("tanzhen: error: {first}")
}

fn exit_with(e: &clap::Error) -> ! {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            eprintln!("{}", one_line(e));
            std::process::exit(2)
        }
        _ => e.exit(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeKind;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["tanzhen", "run"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.command {
            Command::Run(r) => *r,
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn defaults() {
        let r = run_args(&[]).unwrap();
        assert_eq!(
            *r.probes,
            [ProbeKind::Tcp, ProbeKind::Syscalls, ProbeKind::Sched]
        );
        assert_eq!(r.listen, Listen(Some("0.0.0.0:9527".parse().unwrap())));
        assert_eq!(r.interval, Duration::from_secs(5));
        assert!(r.pid.is_none() && r.syscalls_comm_filter.is_none());
        assert!(r.syscalls_map_entries.is_none());
        assert!(r.sched_start_entries.is_none());
    }

    #[test]
    fn unknown_probe_is_one_line_naming_the_available_ones() {
        let e = run_args(&["--probes", "tcp,nope"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        let line = one_line(&e);
        assert!(line.contains("unknown probe `nope`"), "{line}");
        assert!(line.contains("available probes: tcp"), "{line}");
        assert!(!line.contains('\n'));
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn bad_listen_address() {
        for bad in ["9527", "localhost:9527", "1.2.3.4:99999", "0.0.0.0"] {
            let e = run_args(&["--listen", bad]).unwrap_err();
            assert!(
                one_line(&e).contains("is not an IP:PORT address"),
                "{bad}: {}",
                one_line(&e)
            );
        }
        assert_eq!(
            run_args(&["--listen", "[::1]:9"]).unwrap().listen,
            Listen(Some("[::1]:9".parse().unwrap()))
        );
        assert_eq!(
            run_args(&["--listen", "none"]).unwrap().listen,
            Listen(None)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "5x", "-1s", "1e400", "ten"] {
            assert!(
                parse_duration(bad)
                    .unwrap_err()
                    .contains("is not a duration"),
                "{bad}"
            );
        }
        let r = run_args(&["--series-ttl", "0", "--max-series-per-metric", "5"]).unwrap();
        assert_eq!((r.series_ttl, r.max_series_per_metric), (Duration::ZERO, 5));
        assert!(run_args(&["--max-series-per-metric", "0"]).is_err());
    }

    #[test]
    fn intervals() {
        for (s, d) in [
            ("5s", Duration::from_secs(5)),
            ("5", Duration::from_secs(5)),
            ("500ms", Duration::from_millis(500)),
            ("1m", Duration::from_secs(60)),
            ("1.5s", Duration::from_millis(1500)),
        ] {
            assert_eq!(run_args(&["--interval", s]).unwrap().interval, d, "{s}");
        }
        for bad in ["", "s", "5x", "0s", "10ms", "2h", "1..5s"] {
            let e = run_args(&["--interval", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(
                one_line(&e).contains("is not an interval"),
                "{bad}: {}",
                one_line(&e)
            );
        }
    }

    #[test]
    fn intervals_and_filters() {
        let r = run_args(&["--interval", "250ms", "--pid", "42"]).unwrap();
        assert_eq!(r.interval, Duration::from_millis(250));
        assert_eq!(r.pid, Some(42));
        assert_eq!(
            run_args(&["--interval", "2m"]).unwrap().interval,
            Duration::from_secs(120)
        );
        assert_eq!(
            run_args(&["--interval", "3"]).unwrap().interval,
            Duration::from_secs(3)
        );
        for bad in ["0s", "5h", "fast", "50ms", ""] {
            let e = run_args(&["--interval", bad]).unwrap_err();
            assert!(
                one_line(&e).contains("is not an interval"),
                "{bad}: {}",
                one_line(&e)
            );
        }
        let r = run_args(&["--syscalls-comm-filter", "^ng(inx)?$"]).unwrap();
        assert!(r.syscalls_comm_filter.unwrap().is_match("nginx"));
        let e = run_args(&["--syscalls-comm-filter", "(unclosed"]).unwrap_err();
        let line = one_line(&e);
        assert!(line.contains("is not a valid regular expression"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        assert!(run_args(&["--syscalls-map-entries", "0"]).is_err());
    }

    #[test]
    fn compat_flags() {
        use crate::{compat::BtfChoice, transport::TransportChoice};
        let r = run_args(&[]).unwrap();
        assert_eq!(r.compat.transport, TransportChoice::Auto);
        assert_eq!(r.compat.btf, BtfChoice::Auto);
        let r = run_args(&["--transport", "perf", "--btf", "none"]).unwrap();
        assert_eq!(r.compat.transport, TransportChoice::Perf);
        assert_eq!(r.compat.btf, BtfChoice::None);
        let e = run_args(&["--transport", "netlink"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(one_line(&e).contains("netlink"), "{}", one_line(&e));
    }

    #[test]
    fn bad_log_level() {
        let e = run_args(&["--log-level", "loud"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(one_line(&e).contains("loud"));
    }

    #[test]
    fn help_covers_every_flag() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
            for arg in sub.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{} has no help",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
