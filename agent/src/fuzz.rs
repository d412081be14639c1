//! Entry points of the libFuzzer targets (fuzz/fuzz_targets/*.rs): each feeds arbitrary bytes
//! to one parser of outside input and panics only when the parser panics or breaks one of its
//! promises (one-line errors, no header values in what may be logged). Compiled only with
//! `cfg(fuzzing)` (set by `cargo xtask fuzz` and cargo-fuzz), by the fuzz crate, which builds
//! these sources as a library.
//! The property tests in hostile.rs cover the same parsers in `cargo test`.

use crate::{
    export::otlp::ParserInputs,
    kernel,
    metadata::cgroup,
    probe::{listeners, sched, tcp},
    snapshot::Snapshot,
};

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// A tracefs `format` file, then the TCP probe's offset lookup on what it yields.
pub fn tracefs_format(data: &[u8]) {
    let text = text(data);
    if let Ok(f) = kernel::parse_format(&text) {
        let name = text.lines().next().unwrap_or_default();
        let _ = f.offset(name, u32::try_from(data.len()).unwrap_or(u32::MAX));
        let _ = f.offset("skaddr", 8);
        let _ = tcp::offsets(&f);
    }
    let _ = kernel::find_tracefs(&text);
    let _ = kernel::parse_release(&text);
}

/// /proc/net/tcp(6) text and `socket:[inode]` links.
pub fn proc_net_tcp(data: &[u8]) {
    let text = text(data);
    let _ = listeners::parse_proc_net_tcp(&text);
    let _ = listeners::socket_inode(&text);
    let _ = listeners::socket_inode(&format!("socket:[{text}]"));
}

/// Cgroup paths and /proc/PID/cgroup text.
pub fn cgroup(data: &[u8]) {
    let text = text(data);
    let _ = cgroup::parse_path(&text);
    let _ = cgroup::parse_proc_cgroup(&text);
    let _ = cgroup::parse_proc_cgroup(&format!("0::{text}\n"));
}

/// The configuration file: either an error of one line naming the file, or settings clap
/// accepts as defaults.
pub fn config_toml(data: &[u8]) {
    use clap::CommandFactory as _;
    let text = text(data);
    let cmd = crate::cli::Cli::command();
    let Some(run) = cmd.find_subcommand("run") else {
        return;
    };
    match crate::config::parse("f.toml", &text, run, &|_| None) {
        Ok(settings) => {
            let cmd = crate::cli::Cli::command()
                .mut_subcommand("run", |r| crate::config::install(r, &settings));
            assert!(
                cmd.try_get_matches_from(["tanzhen", "run"]).is_ok(),
                "accepted but refused by clap: {text}"
            );
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with("f.toml:") && !e.contains('\n'), "{e}");
        }
    }
}

/// OTLP settings from flags and `OTEL_*` variables (lines of the input: headers, endpoint,
/// resource attributes, traces endpoint, timeout, compression, then `key=value` flag headers).
/// Errors are one line; nothing that may be logged shows a header value.
pub fn otlp_headers(data: &[u8]) {
    let text = text(data);
    let mut lines = text.split('\n').map(str::to_owned);
    let mut next = || lines.next().unwrap_or_default();
    let (env_headers, endpoint, attrs, traces, timeout, compression) =
        (next(), next(), next(), next(), next(), next());
    let grpc = data.first().is_some_and(|b| b & 1 == 1);
    let flag_headers: Vec<(String, String)> = text
        .split('\n')
        .skip(6)
        .take(4)
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let inputs = ParserInputs {
        endpoint,
        flag_headers,
        env_headers,
        grpc,
        attrs,
        traces_endpoint: traces,
        timeout,
        compression,
    };
    if let Err(e) = inputs.check() {
        panic!("{e}");
    }
}

/// A TCP event record from the ring buffer, decoded and counted.
pub fn tcp_event(data: &[u8]) {
    let snapshot = Snapshot::new(100, None);
    let metrics = tcp::TcpMetrics::register(&snapshot);
    if let Ok(ev) = tcp::decode(data) {
        let _ = tcp::peer(&ev);
        let _ = tcp::comm_str(&ev.comm);
        metrics.record(&ev, &crate::metadata::WorkloadLabels::default());
    }
}

/// A process (exec/exit) event record from the ring buffer.
pub fn proc_event(data: &[u8]) {
    if let Ok(ev) = sched::decode(data) {
        let cache = sched::ProcessCache::default();
        let _ = cache.apply(&ev);
    }
}
