//! Command-line interface (clap derive; the doc comments are the help text).

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

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
pub enum Command {
    /// Load the probes and serve their metrics until SIGINT or SIGTERM (needs root).
    Run(RunArgs),
    /// List every probe: what it measures, its kernel hooks and minimum kernel.
    Probes,
    /// Report what this kernel supports (BTF, ring buffer, tracefs, each probe's hooks).
    /// Exits 1 when a probe this build ships cannot load here.
    Check,
}

/// Options of `tanzhen run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Probes to load, comma-separated, or `all` (see `tanzhen probes`).
    #[arg(long, env = "TANZHEN_PROBES", default_value = "all", value_parser = probe::parse_list)]
    pub probes: probe::ProbeList,

    /// Address for the HTTP endpoint serving /metrics and /healthz, as IP:PORT.
    #[arg(long, env = "TANZHEN_LISTEN", default_value = "0.0.0.0:9527", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// How often in-kernel aggregates (run-queue histograms, context switch counts) are drained
    /// into the metrics: `5s`, `500ms`, `1m`, or plain seconds.
    #[arg(long, env = "TANZHEN_INTERVAL", default_value = "5s", value_parser = parse_interval)]
    pub interval: Duration,

    /// Log verbosity.
    #[arg(long, env = "TANZHEN_LOG_LEVEL", default_value = "info", value_enum)]
    pub log_level: LogLevel,
}

/// Log verbosity levels.
#[derive(Clone, Copy, Debug, ValueEnum)]
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

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!(
            "`{s}` is not an IP:PORT address; use e.g. 0.0.0.0:9527, 127.0.0.1:9527 or [::]:9527"
        )
    })
}

/// Parses `--interval`: a number with an optional unit (`ms`, `s`, `m`), between 100ms and 1h.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{s}` is not an interval; use e.g. 5s, 500ms or 1m (between 100ms and 1h)");
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        _ => return Err(bad()),
    };
    if !(0.1..=3600.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Cli {
    /// Parses the process arguments. Errors about a value print as one line and exit with
    /// code 2; help and version print as usual.
    #[must_use]
    pub fn parse_or_exit() -> Self {
        match Self::try_parse() {
            Ok(cli) => cli,
            Err(e) => exit_with(&e),
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
            Command::Run(r) => r,
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn defaults() {
        let r = run_args(&[]).unwrap();
        assert_eq!(*r.probes, [ProbeKind::Tcp, ProbeKind::Sched]);
        assert_eq!(r.interval, Duration::from_secs(5));
        assert_eq!(r.listen, "0.0.0.0:9527".parse().unwrap());
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
    fn unbuilt_probe_is_rejected() {
        let e = run_args(&["--probes", "syscalls"]).unwrap_err();
        assert!(one_line(&e).contains("not built"), "{}", one_line(&e));
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
            "[::1]:9".parse().unwrap()
        );
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
