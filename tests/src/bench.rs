//! Bench probe end to end (the hidden `--probes bench` that `cargo xtask bench` drives): a
//! forked worker makes exactly N `getppid` calls, and `tanzhen_bench_events_total` must read
//! exactly N with no loss, over the ring buffer and (in `cargo xtask test`'s second pass,
//! `TANZHEN_E2E_EXTRA_ARGS`) the perf buffers. A second worker outside `--pid` makes the same
//! calls, which must not count.

use std::{thread, time::Duration};

use crate::{
    Agent, Metrics, comm, wait_for,
    workload::{Worker, Workload},
};

fn events(m: &Metrics) -> f64 {
    m.sum("tanzhen_bench_events_total", &[])
}

fn lost(m: &Metrics) -> f64 {
    m.sum("tanzhen_events_lost_total", &[("probe", "bench")])
}

/// Fewer events than one 64 KiB perf buffer holds (2048 records of 32 bytes), so a worker that
/// outruns the agent cannot make the perf pass lose any.
const CALLS: u32 = 1_500;

#[test]
fn bench_probe_counts_every_getppid_of_the_pid() {
    exact_events(CALLS, 1);
}

/// `TANZHEN_BENCH_EVENTS_PER_CALL=4`: four events per call (500 x 4 = 2,000: still under one
/// perf buffer).
#[test]
fn bench_probe_sends_several_events_per_call_when_asked() {
    exact_events(500, 4);
}

/// A worker makes `calls` getppid calls; exactly `calls x per_call` events arrive, none from
/// another process, none lost.
fn exact_events(calls: u32, per_call: u32) {
    let w = Worker::spawn(
        &comm("tzbench"),
        Workload {
            getppid: calls,
            ..Workload::default()
        },
    );
    let o = Worker::spawn(
        &comm("tzbnoth"),
        Workload {
            getppid: 700,
            ..Workload::default()
        },
    );
    let mut agent = Agent::start_with_env(
        &["--probes", "bench", "--pid", &w.pid(), "--interval", "1s"],
        &[("TANZHEN_BENCH_EVENTS_PER_CALL", &per_call.to_string())],
    );
    let before = agent.scrape();
    assert_eq!(
        events(&before),
        0.0,
        "the counter is exported at 0 before any call:\n{}",
        before.0
    );
    o.go();
    w.go();
    let want = f64::from(calls * per_call);
    let m = wait_for(&agent, Duration::from_secs(30), |m| events(m) >= want);
    // Late duplicates or the other worker's calls would show after one more moment.
    thread::sleep(Duration::from_millis(1_500));
    let after = agent.scrape();
    assert_eq!(
        events(&after),
        want,
        "events after {calls} getppid calls x {per_call} (first wait ended at {}):\n{}\n--- agent log ---\n{}",
        events(&m),
        after.0,
        agent.log_text()
    );
    assert_eq!(lost(&after), 0.0, "no loss:\n{}", after.0);
    assert_eq!(agent.stop(), Some(0), "clean exit:\n{}", agent.log_text());
}

#[test]
fn bench_probe_is_hidden_from_all_and_the_catalogue() {
    let out = std::process::Command::new(crate::tanzhen_bin())
        .arg("probes")
        .output()
        .expect("tanzhen probes runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("syscalls"), "{text}");
    assert!(
        !text.contains("bench"),
        "`tanzhen probes` lists the bench probe:\n{text}"
    );
    let mut agent = Agent::start(&["--probes", "all"]);
    let m = agent.scrape();
    assert!(
        !m.0.contains("tanzhen_bench_events"),
        "`--probes all` attached the bench probe:\n{}",
        m.0
    );
    agent.stop();
}
