//! `tanzhen watch tcp|exec|syscalls`: live lines from a running agent's follow streams
//! (`/api/v1/events?follow=true`, `/api/v1/top?follow=true`), or with `--standalone` from the
//! probe loaded into this process (the same probe code and JSON as the agent, no HTTP).
//!
//! Output: an aligned table with human units for people (colour only on a terminal and when
//! `NO_COLOR` is unset), or one JSON object per line for pipes; the default follows whether
//! stdout is a terminal. A lost agent connection prints one line and is retried with backoff;
//! Ctrl-C exits 0.

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;

use super::{
    Live, Stream,
    client::{AgentUrl, ClientError},
    top::By,
};

/// What `tanzhen watch` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// TCP connect outcomes, one line each (tcp probe).
    Tcp,
    /// Process execs, one line each (sched probe).
    Exec,
    /// The processes making the most system calls, one block per interval (syscalls probe).
    Syscalls,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns with human units.
    Table,
    /// One JSON object per line (the API's objects).
    Json,
}

/// Options of `tanzhen watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// What to watch.
    #[arg(value_enum)]
    pub what: What,

    /// URL of the running agent's HTTP endpoint.
    #[arg(long, env = "TANZHEN_AGENT", default_value = "http://127.0.0.1:9527")]
    pub agent: String,

    /// Output format; default: table when stdout is a terminal, json otherwise.
    #[arg(long, env = "TANZHEN_OUTPUT", value_enum)]
    pub output: Option<Output>,

    /// File holding the agent's bearer token (its --auth-token-file).
    #[arg(long, env = "TANZHEN_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,

    /// Load the probe into this process for this session instead of reading an agent (needs
    /// root, like the agent).
    #[arg(long)]
    pub standalone: bool,

    /// syscalls: rows per interval.
    #[arg(long, env = "TANZHEN_WATCH_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// --standalone: how often aggregated counts are drained and printed (syscalls).
    #[arg(long, env = "TANZHEN_WATCH_INTERVAL", default_value = "1s", value_parser = crate::cli::parse_interval)]
    pub interval: Duration,
}

/// Runs `tanzhen watch`.
pub fn main(args: &WatchArgs) -> ExitCode {
    let output = args.output.unwrap_or(if std::io::stdout().is_terminal() {
        Output::Table
    } else {
        Output::Json
    });
    let color = output == Output::Table
        && std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let printer = Printer {
        what: args.what,
        output,
        color,
        header: false,
    };
    let res = if args.standalone {
        standalone(args, printer)
    } else {
        let url = match AgentUrl::new(&args.agent, args.auth_token_file.as_deref()) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("tanzhen watch: {e}");
                return ExitCode::from(2);
            }
        };
        from_agent(&url, args, printer)
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tanzhen watch: {e}");
            ExitCode::FAILURE
        }
    }
}

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; every line was flushed when printed.
    unsafe { libc::_exit(0) }
}

/// Ctrl-C and SIGTERM end the process with status 0 (output is flushed line by line).
pub fn exit_cleanly_on_signals() {
    let handler = exit_now as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn from_agent(url: &AgentUrl, args: &WatchArgs, mut printer: Printer) -> Result<(), String> {
    exit_cleanly_on_signals();
    let path = match args.what {
        What::Tcp => "/api/v1/events?probe=tcp&follow=true".to_owned(),
        What::Exec => "/api/v1/events?probe=exec&follow=true".to_owned(),
        What::Syscalls => format!("/api/v1/top?by=syscalls&limit={}&follow=true", args.limit),
    };
    let mut backoff = Duration::from_secs(1);
    let mut lost = false;
    loop {
        match url.stream(&path) {
            Ok(mut s) => {
                if lost {
                    eprintln!("tanzhen watch: reconnected to {}", url.shown);
                }
                backoff = Duration::from_secs(1);
                // Keep-alives come every 10 s; top windows every interval.
                s.set_timeout(Duration::from_secs(30));
                loop {
                    match s.next_value() {
                        Ok(v) => {
                            if let Some(w) = v["window_seconds"].as_f64() {
                                s.set_timeout(Duration::from_secs_f64((w * 3.0).max(30.0)));
                            }
                            printer.print(&v);
                        }
                        Err(e) => {
                            eprintln!("tanzhen watch: {e}; retrying");
                            lost = true;
                            break;
                        }
                    }
                }
            }
            Err(ClientError::Status(msg)) => return Err(msg),
            Err(ClientError::Connection(msg)) => {
                if !lost {
                    eprintln!("tanzhen watch: {msg}; retrying");
                    lost = true;
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Loads the one probe `args.what` needs and prints from its rings (or top windows).
fn standalone(args: &WatchArgs, printer: Printer) -> Result<(), String> {
    crate::caps::check()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(standalone_async(args, printer))
}

async fn standalone_async(args: &WatchArgs, mut printer: Printer) -> Result<(), String> {
    use crate::{
        kernel, loader,
        probe::{
            sched::SchedProbe,
            syscalls::{SyscallsOptions, SyscallsProbe},
            tcp::{LossCounters, TcpProbe},
        },
        snapshot::Snapshot,
    };
    let fail = |e: &dyn std::fmt::Display| e.to_string();
    let tracefs = kernel::tracefs().map_err(|e| fail(&e))?;
    // As `run` does by default: the ring buffer where the kernel has one, the kernel's BTF
    // when present, the TCP tracepoint unless it is missing.
    let transport = crate::transport::TransportChoice::Auto.resolve(&kernel::has_ringbuf())?;
    let btf_source = if kernel::has_btf() {
        crate::compat::BtfSource::Kernel
    } else {
        crate::compat::BtfSource::None
    };
    let (btf, sock_layout) = btf_source.load_inspecting(crate::probe::tcp::SockLayout::from_btf)?;
    let tcp_attach =
        crate::compat::TcpAttachChoice::Auto.resolve(Some(&tracefs.path), sock_layout.raw.is_ok());
    let mut ebpf = loader::load(transport, btf.as_ref(), &[]).map_err(|e| fail(&e))?;
    loader::configure(
        &mut ebpf,
        agent_common::AgentConfig {
            filter_tgid: 0,
            _pad: 0,
        },
    )
    .map_err(|e| fail(&e))?;
    let snapshot = Arc::new(Snapshot::default());
    let loss = LossCounters::register(&snapshot);
    let live = Arc::new(Live::new(
        super::DEFAULT_EVENT_BUFFER * 4,
        snapshot.clone(),
        Some(loss.clone()),
        args.interval,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Container labels from /proc (no Kubernetes API in a one-off session).
    let meta = Arc::new(crate::metadata::Metadata::new(None));
    let tp = &tracefs.path;
    let task = match args.what {
        What::Tcp => {
            let p = TcpProbe::attach(
                &mut ebpf,
                tp,
                tcp_attach,
                &sock_layout,
                transport,
                &snapshot,
                loss,
                Some(live.clone()),
                meta.clone(),
            )
            .map_err(|e| fail(&e))?;
            tokio::spawn(p.run(stop_rx.clone()))
        }
        What::Exec => {
            let p = SchedProbe::attach(
                &mut ebpf,
                tp,
                transport,
                &snapshot,
                loss,
                args.interval,
                Some(live.clone()),
                meta.clone(),
            )
            .map_err(|e| fail(&e))?;
            tokio::spawn(p.run(stop_rx.clone()))
        }
        What::Syscalls => {
            let opts = SyscallsOptions {
                interval: args.interval,
                comm_filter: None,
            };
            let p = SyscallsProbe::attach(&mut ebpf, tp, &snapshot, loss, opts, meta.clone())
                .map_err(|e| fail(&e))?;
            let (top, snap, stop) = (live.clone(), snapshot.clone(), stop_rx.clone());
            tokio::spawn(async move { top.top.run(snap, stop).await });
            tokio::spawn(p.run(stop_rx.clone()))
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| fail(&e))?;
    let stream = match args.what {
        What::Tcp => Some(Stream::Tcp),
        What::Exec => Some(Stream::Exec),
        What::Syscalls => None,
    };
    let mut windows = live.top.subscribe();
    let limit = args.limit as usize;
    let mut seq = stream.map_or(1, |s| live.next_seq(s));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            (evs, next) = async {
                match stream {
                    Some(s) => live.follow(s, seq, Duration::from_secs(10)).await,
                    None => {
                        let _ = windows.changed().await;
                        let w = windows.borrow_and_update().clone();
                        (vec![w.json(By::Syscalls, limit)], 0)
                    }
                }
            } => {
                if stream.is_some() {
                    seq = next;
                }
                for v in &evs {
                    printer.print(v);
                }
            }
        }
    }
    drop(ebpf);
    let _ = stop_tx.send(true);
    let _ = task.await;
    Ok(())
}

/// Prints objects as table rows or JSON lines.
struct Printer {
    what: What,
    output: Output,
    color: bool,
    header: bool,
}

const BOLD: &str = "\x1b[1m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const RESET: &str = "\x1b[0m";

impl Printer {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }

    fn print(&mut self, v: &Value) {
        let text = match self.output {
            Output::Json => format!("{v}\n"),
            Output::Table => self.table(v),
        };
        if text.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (e.g. `| head`): nothing left to do.
            std::process::exit(0);
        }
    }

    fn table(&mut self, v: &Value) -> String {
        let mut s = String::new();
        match self.what {
            What::Tcp | What::Exec => {
                if !self.header {
                    self.header = true;
                    let h = table_header(self.what);
                    s.push_str(&self.paint(BOLD, &h));
                    s.push('\n');
                }
                let row = table_row(self.what, v);
                let row = match v["outcome"].as_str() {
                    Some("failed") => {
                        row.replace(" failed ", &format!(" {} ", self.paint(RED, "failed")))
                    }
                    Some("established") => row.replace(
                        " established ",
                        &format!(" {} ", self.paint(GREEN, "established")),
                    ),
                    _ => row,
                };
                s.push_str(&row);
                s.push('\n');
            }
            What::Syscalls => {
                // Before the first full interval there are no rates yet.
                if v["window_seconds"].as_f64().unwrap_or(0.0) <= 0.0
                    || v["rows"].as_array().is_none_or(Vec::is_empty)
                {
                    return s;
                }
                let title = format!(
                    "{}  top {} over {:.1}s",
                    clock(v["window_end"].as_str().unwrap_or("")),
                    v["unit"].as_str().unwrap_or("syscalls/s"),
                    v["window_seconds"].as_f64().unwrap_or(0.0)
                );
                s.push_str(&self.paint(BOLD, &title));
                s.push('\n');
                s.push_str(&self.paint(BOLD, &syscalls_header()));
                s.push('\n');
                for r in v["rows"].as_array().into_iter().flatten() {
                    s.push_str(&syscalls_row(r));
                    s.push('\n');
                }
                s.push('\n');
            }
        }
        s
    }
}

/// `HH:MM:SS.mmm` of an RFC 3339 time (UTC).
fn clock(t: &str) -> String {
    t.get(11..23).unwrap_or(t).to_owned()
}

/// The table header of `what` (tcp, exec).
#[must_use]
pub fn table_header(what: What) -> String {
    match what {
        What::Tcp => format!(
            "{:<12} {:>7} {:<16} {:<11} {:>8} {:<22} {}",
            "TIME(UTC)", "PID", "COMM", "OUTCOME", "LATENCY", "SOURCE", "DESTINATION"
        ),
        What::Exec => format!(
            "{:<12} {:>7} {:<16} {:<12} {}",
            "TIME(UTC)", "PID", "COMM", "CONTAINER", "FILENAME"
        ),
        What::Syscalls => syscalls_header(),
    }
}

/// One table row of an event.
#[must_use]
pub fn table_row(what: What, v: &Value) -> String {
    let p = &v["process"];
    let text = |x: &Value| x.as_str().unwrap_or("-").to_owned();
    let time = clock(v["time"].as_str().unwrap_or(""));
    let pid = p["pid"].as_u64().unwrap_or(0);
    let comm = text(&p["comm"]);
    match what {
        What::Tcp => format!(
            "{time:<12} {pid:>7} {comm:<16} {:<11} {:>8} {:<22} {}",
            text(&v["outcome"]),
            v["latency_ns"]
                .as_u64()
                .map_or_else(|| "-".into(), human_ns),
            text(&v["src"]),
            text(&v["dst"]),
        ),
        What::Exec => {
            let mut c = text(&p["container_id"]);
            c.truncate(12);
            format!(
                "{time:<12} {pid:>7} {comm:<16} {c:<12} {}",
                text(&v["filename"])
            )
        }
        What::Syscalls => syscalls_row(v),
    }
}

fn syscalls_header() -> String {
    format!(
        "{:<16} {:>10} {:>10}  {}",
        "COMM", "CALLS/s", "ERRORS/s", "TOP SYSCALL"
    )
}

fn syscalls_row(r: &Value) -> String {
    format!(
        "{:<16} {:>10} {:>10}  {}",
        r["comm"].as_str().unwrap_or("-"),
        human_rate(r["rate"].as_f64().unwrap_or(0.0)),
        human_rate(r["errors_per_second"].as_f64().unwrap_or(0.0)),
        r["top_syscall"].as_str().unwrap_or("-"),
    )
}

/// Nanoseconds in a short human unit: `850ns`, `12.3µs`, `1.2ms`, `1.50s`.
#[must_use]
pub fn human_ns(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let f = ns as f64;
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}µs", f / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", f / 1e6),
        _ => format!("{:.2}s", f / 1e9),
    }
}

/// A rate in a short human unit: `0`, `3.5`, `12.3k`, `1.2M`.
#[must_use]
pub fn human_rate(r: f64) -> String {
    if r == 0.0 {
        "0".into()
    } else if r < 1e3 {
        format!("{r:.1}")
    } else if r < 1e6 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{:.1}M", r / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_ns(850), "850ns");
        assert_eq!(human_ns(12_340), "12.3µs");
        assert_eq!(human_ns(1_200_000), "1.2ms");
        assert_eq!(human_ns(1_500_000_000), "1.50s");
        assert_eq!(human_rate(0.0), "0");
        assert_eq!(human_rate(3.54), "3.5");
        assert_eq!(human_rate(12_345.0), "12.3k");
        assert_eq!(human_rate(1_234_567.0), "1.2M");
    }

    #[test]
    fn rows_align_with_the_header() {
        let ev = json!({"time": "2026-11-23T23:59:01.123456Z", "outcome": "failed",
            "latency_ns": 1_200_000, "src": "127.0.0.1:40000", "dst": "127.0.0.1:80",
            "process": {"pid": 42, "comm": "tzapi"}});
        let row = table_row(What::Tcp, &ev);
        let head = table_header(What::Tcp);
        assert_eq!(
            row,
            "23:59:01.123      42 tzapi            failed         1.2ms 127.0.0.1:40000        127.0.0.1:80"
        );
        assert_eq!(row.find("tzapi"), head.find("COMM"));
        assert_eq!(row.find("127.0.0.1:80").map(|_| ()), Some(()));
        let mut p = Printer {
            what: What::Tcp,
            output: Output::Table,
            color: false,
            header: false,
        };
        let t = p.table(&ev);
        assert!(t.starts_with("TIME(UTC)") && !t.contains('\x1b'), "{t}");
        p.color = true;
        assert!(p.table(&ev).contains("\x1b[31mfailed\x1b[0m"));
    }
}
