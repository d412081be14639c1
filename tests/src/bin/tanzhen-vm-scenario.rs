//! `tanzhen-vm-scenario`: the end-to-end scenario `cargo xtask vm-test` runs inside each VM (a
//! static binary next to the static `tanzhen` in the initramfs; run as root).
//!
//! For every pass (a set of extra `tanzhen run` arguments) it starts one agent with the TCP,
//! syscalls and scheduler probes, drives a known workload with the end-to-end tests' own helpers
//! (`tests::workload`): TCP connects to a local listener plus refused ones, a forked worker
//! making distinctive syscalls, a pipe ping-pong between two threads, and asserts the counts
//! read back from `/metrics` over plain HTTP, exactly as the host tests do. The workloads carry
//! distinctive names (comm), which keeps them apart from anything else in the guest.
//!
//! Prints one `SCENARIO <pass>/<check>: ok|FAIL ...` line per check and exits 0 when all pass.
//! `tanzhen-vm-scenario [NAME -- ARGS...]` runs one pass with the given agent arguments instead
//! of the built-in list. The agent binary is `$TANZHEN_BIN`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    panic::{AssertUnwindSafe, catch_unwind},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use tests::{
    Agent, Metrics, comm, free_port, wait_for,
    workload::{Worker, Workload, assert_close, pipe_ping_pong, spawn_connector, spawn_listener},
};

/// The passes: a name and the extra `tanzhen run` arguments.
const PASSES: &[(&str, &[&str])] = &[
    ("default", &[]),
    // The TCP probe's kprobe fallback (what kernels without `sock:inet_sock_set_state` run).
    ("kprobe", &["--tcp-attach", "kprobe"]),
    // The perf event array transport without BTF (what 4.19 kernels without BTF run).
    ("perf-nobtf", &["--transport", "perf", "--btf", "none"]),
];

/// Probes every pass loads.
const PROBES: &str = "tcp,syscalls,sched";

/// TCP workload: established connects (and accepts), refused connects.
const CONNECTS: usize = 20;
const REFUSED: usize = 5;
/// Syscalls workload of the forked worker.
const WORK: Workload = Workload {
    getppid: 2_000,
    open_missing: 200,
    open_existing: 100,
    connect_port: None,
    sleeps: 0,
    // Each returns on the other CPU: the syscall start must follow the thread.
    migrations: 100,
    pin_cpu: None,
    yield_every: 0,
};
/// Pipe ping-pong round trips.
const ROUND_TRIPS: usize = 2_000;

type Check = fn(&Agent) -> String;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let custom: Vec<(String, Vec<String>)> = match args.as_slice() {
        [] => Vec::new(),
        [name, sep, rest @ ..] if sep == "--" => vec![(name.clone(), rest.to_vec())],
        _ => {
            eprintln!("usage: tanzhen-vm-scenario [NAME -- TANZHEN-RUN-ARGS...]");
            return ExitCode::from(2);
        }
    };
    let passes: Vec<(String, Vec<String>)> = if custom.is_empty() {
        PASSES
            .iter()
            .map(|(n, a)| ((*n).to_owned(), a.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    } else {
        custom
    };
    let checks: [(&str, Check); 3] = [("tcp", tcp), ("syscalls", syscalls), ("sched", sched)];
    let (mut ok, mut failed) = (0, 0);
    for (pass, extra) in &passes {
        let mut agent_args = vec!["--probes", PROBES, "--interval", "1s"];
        agent_args.extend(extra.iter().map(String::as_str));
        let t0 = Instant::now();
        let agent = match catch_unwind(|| Agent::start(&agent_args)) {
            Ok(a) => a,
            Err(e) => {
                println!(
                    "SCENARIO {pass}/start: FAIL tanzhen run {}: {}",
                    agent_args.join(" "),
                    panic_text(&*e)
                );
                failed += 1;
                continue;
            }
        };
        println!(
            "SCENARIO {pass}/start: ok tanzhen run {} serving after {:.1?}",
            agent_args.join(" "),
            t0.elapsed()
        );
        let mut pass_failed = false;
        for (name, check) in checks {
            let t = Instant::now();
            match catch_unwind(AssertUnwindSafe(|| check(&agent))) {
                Ok(detail) => {
                    ok += 1;
                    println!("SCENARIO {pass}/{name}: ok {detail} ({:.1?})", t.elapsed());
                }
                Err(e) => {
                    failed += 1;
                    pass_failed = true;
                    println!("SCENARIO {pass}/{name}: FAIL {}", panic_text(&*e));
                }
            }
        }
        if pass_failed {
            let log = agent.log_text();
            let lines: Vec<&str> = log.lines().collect();
            println!("--- agent log (last 40 lines) ---");
            for l in &lines[lines.len().saturating_sub(40)..] {
                println!("{l}");
            }
        }
    }
    println!("SCENARIO: {ok} ok, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    let s = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into());
    // One line for the summary; the full message went to stderr through the panic hook.
    s.lines().next().unwrap_or_default().to_owned()
}

/// Waits (up to 60 s: TCG is slow) until `cond` holds, then one more drain interval so that
/// late extra counts would show, and returns that last scrape.
fn settle(agent: &Agent, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let m = wait_for(agent, Duration::from_secs(60), &cond);
    assert!(cond(&m), "the counts did not arrive within 60 s:\n{}", m.0);
    thread::sleep(Duration::from_millis(1_500));
    agent.scrape()
}

fn lost(m: &Metrics, probe: &str) -> f64 {
    m.sum("tanzhen_events_lost_total", &[("probe", probe)])
}

#[expect(clippy::cast_precision_loss, reason = "small counts")]
fn tcp(agent: &Agent) -> String {
    let (client, server) = (comm("vmc"), comm("vml"));
    let before = agent.scrape();
    let (addr, listener) = spawn_listener(&server, (Ipv4Addr::LOCALHOST, 0).into(), CONNECTS);
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    assert_eq!(
        spawn_connector(&client, addr, CONNECTS, Some(closed), REFUSED),
        (CONNECTS, REFUSED),
        "the workload itself"
    );
    assert_eq!(listener.join().unwrap(), CONNECTS);
    let outcome = |m: &Metrics, o: &str| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &client), ("outcome", o)],
        )
    };
    let dur = |m: &Metrics| {
        m.sum(
            "tanzhen_tcp_connect_duration_seconds_count",
            &[("comm", &client)],
        )
    };
    let acc = |m: &Metrics| m.sum("tanzhen_tcp_accepts_total", &[("comm", &server)]);
    let (n, r) = (CONNECTS as f64, REFUSED as f64);
    let after = settle(agent, |m| {
        outcome(m, "established") - outcome(&before, "established") >= n
            && outcome(m, "failed") - outcome(&before, "failed") >= r
            && acc(m) - acc(&before) >= n
    });
    let d = |f: &dyn Fn(&Metrics) -> f64| f(&after) - f(&before);
    let est = d(&|m| outcome(m, "established"));
    let failed = d(&|m| outcome(m, "failed"));
    let accepts = d(&acc);
    assert_eq!(est, n, "established connects of {client}\n{}", after.0);
    assert_eq!(failed, r, "failed connects of {client}\n{}", after.0);
    assert_eq!(
        d(&dur),
        n,
        "connect duration count of {client}\n{}",
        after.0
    );
    assert_eq!(accepts, n, "accepts of {server}\n{}", after.0);
    assert_eq!(lost(&after, "tcp"), 0.0, "events lost\n{}", after.0);
    assert_eq!(after.sum("tanzhen_probe_up", &[("probe", "tcp")]), 1.0);
    // Which attach method the pass ran on (the agent logs it at start-up).
    let log = agent.log_text();
    let attach = log
        .lines()
        .find_map(|l| l.split("tcp attach: ").nth(1))
        .unwrap_or("?");
    format!("established={est} failed={failed} accepts={accepts} via {attach}")
}

fn syscalls(agent: &Agent) -> String {
    let name = comm("vms");
    let w = Worker::spawn(&name, WORK);
    let before = agent.scrape();
    w.go();
    let calls = |m: &Metrics, sc: &str| {
        m.sum(
            "tanzhen_syscalls_total",
            &[("comm", &name), ("syscall", sc)],
        )
    };
    let errors = |m: &Metrics, sc: &str| {
        m.sum(
            "tanzhen_syscall_errors_total",
            &[("comm", &name), ("syscall", sc)],
        )
    };
    let opens = |m: &Metrics, r: &str| {
        m.sum(
            "tanzhen_file_opens_total",
            &[("comm", &name), ("result", r)],
        )
    };
    let hist_of = |m: &Metrics, syscall: &str| {
        m.sum(
            "tanzhen_syscall_duration_seconds_count",
            &[("syscall", syscall)],
        )
    };
    let hist = |m: &Metrics| hist_of(m, "getppid");
    let migrate = |m: &Metrics| hist_of(m, "sched_setaffinity");
    let migrations = f64::from(WORK.migrations);
    let getppid = f64::from(WORK.getppid);
    let openat = f64::from(WORK.open_missing + WORK.open_existing);
    let after = settle(agent, |m| {
        calls(m, "getppid") - calls(&before, "getppid") >= getppid
            && calls(m, "openat") - calls(&before, "openat") >= openat
            && hist(m) - hist(&before) >= getppid
            && migrate(m) - migrate(&before) >= migrations
    });
    drop(w);
    let d = |f: &dyn Fn(&Metrics) -> f64| f(&after) - f(&before);
    let ctx = || format!("\n--- scrape ---\n{}", after.0);
    assert_eq!(d(&|m| calls(m, "getppid")), getppid, "getppid{}", ctx());
    assert_eq!(d(&|m| errors(m, "getppid")), 0.0, "getppid errors{}", ctx());
    assert_eq!(d(&|m| calls(m, "openat")), openat, "openat{}", ctx());
    let missing = f64::from(WORK.open_missing);
    let existing = f64::from(WORK.open_existing);
    assert_eq!(
        d(&|m| errors(m, "openat")),
        missing,
        "openat errors{}",
        ctx()
    );
    assert_eq!(d(&|m| opens(m, "ok")), existing, "opens ok{}", ctx());
    assert_eq!(d(&|m| opens(m, "ENOENT")), missing, "opens ENOENT{}", ctx());
    assert_eq!(d(&|m| calls(m, "close")), existing, "close{}", ctx());
    // Nothing else in the guest calls getppid: the per-syscall histogram is exact too.
    assert_eq!(
        d(&hist),
        getppid,
        "getppid latency histogram count{}",
        ctx()
    );
    // Nor sched_setaffinity, whose calls all return on another CPU than they entered.
    assert_eq!(
        d(&|m| calls(m, "sched_setaffinity")),
        migrations,
        "sched_setaffinity{}",
        ctx()
    );
    assert_eq!(
        d(&migrate),
        migrations,
        "sched_setaffinity latency histogram count{}",
        ctx()
    );
    assert_eq!(lost(&after, "syscalls"), 0.0, "events lost{}", ctx());
    assert_eq!(after.sum("tanzhen_probe_up", &[("probe", "syscalls")]), 1.0);
    format!(
        "getppid={} openat={} ENOENT={}",
        d(&|m| calls(m, "getppid")),
        d(&|m| calls(m, "openat")),
        d(&|m| opens(m, "ENOENT"))
    )
}

#[expect(clippy::cast_precision_loss, reason = "small counts")]
fn sched(agent: &Agent) -> String {
    let name = comm("vmpp");
    let switches = |m: &Metrics, kind: &str| {
        m.sum(
            "tanzhen_sched_context_switches_total",
            &[("comm", &name), ("kind", kind)],
        )
    };
    let before = agent.scrape();
    let (vol, invol) = pipe_ping_pong(&name, [None, None], ROUND_TRIPS);
    assert!(
        vol + invol > ROUND_TRIPS as u64,
        "a ping-pong switches at least once per round trip: {vol} + {invol}"
    );
    let delta = |m: &Metrics, kind| switches(m, kind) - switches(&before, kind);
    // On kernels whose sched_switch misreports some voluntary switches as preemptions (see
    // below), only the total is waited for.
    let reread = rereads_prev_state();
    let after = settle(agent, |m| {
        let (v, i) = (delta(m, "voluntary"), delta(m, "involuntary"));
        if reread {
            v + i >= (vol + invol) as f64 * 0.99
        } else {
            v >= vol as f64 * 0.99 && i >= invol as f64 * 0.99
        }
    });
    let (v, i) = (delta(&after, "voluntary"), delta(&after, "involuntary"));
    let mut detail = format!("switches kernel {vol}+{invol} agent {v}+{i}");
    if reread {
        // 5.8 <= kernel < 5.18: sched_switch re-reads prev's state after a concurrent wake-up
        // may have set it to TASK_WAKING, so some voluntary switches show as preemptions
        // (fixed upstream by "sched/tracing: Don't re-read p->state when emitting sched_switch
        // event", 5.18). Nothing is lost: the total must still match, and only voluntary ->
        // involuntary moves are allowed. How many move depends on timing: 0.03-0.4% in most
        // runs under TCG, 7.2% (269 of 3,758) in one x86_64 run on a loaded host; the bound
        // (25%) only catches a probe that mixes the kinds up wholesale.
        assert_close(v + i, vol + invol, "all switches", &after);
        let moved = vol as f64 - v;
        assert!(
            moved >= -(vol as f64 * 0.01).max(2.0) && moved <= vol as f64 * 0.25,
            "voluntary switches: agent {v}, kernel {vol}: more than 25% reported as preemptions\n{}",
            after.0
        );
        detail.push_str(&format!(
            " ({moved} voluntary shown as preemptions by this kernel's sched_switch)"
        ));
    } else {
        assert_close(v, vol, "voluntary switches", &after);
        assert_close(i, invol, "involuntary switches", &after);
    }
    let dropped: f64 = ["map_full", "ringbuf_full", "read_error"]
        .iter()
        .map(|r| {
            after.sum(
                "tanzhen_events_lost_total",
                &[("probe", "sched"), ("reason", r)],
            )
        })
        .sum();
    assert_eq!(dropped, 0.0, "{}", after.0);
    assert_eq!(after.sum("tanzhen_probe_up", &[("probe", "sched")]), 1.0);
    detail
}

/// Whether this kernel's sched_switch tracepoint reads `prev`'s state anew after `__schedule`
/// decided (5.8 <= version < 5.18; see `sched`).
fn rereads_prev_state() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|f| f.parse::<u32>().unwrap_or(0));
    let version = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    ((5, 8)..(5, 18)).contains(&version)
}
