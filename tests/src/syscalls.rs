//! Syscalls probe end to end: forked worker processes with distinctive names (`comm`) make an
//! exact number of syscalls, and the deltas read back from `/metrics` must match exactly.
//!
//! Workers are forked children (the comm label comes from `/proc/<tgid>/comm`, a per-process
//! name) that wait for a command on a pipe, so the agent can be started with `--pid <worker>`
//! first: that keeps the per-syscall histogram hermetic. After `fork` the child only makes raw
//! libc calls (no allocation, no locks).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    thread,
    time::Duration,
};

use crate::{
    Agent, Metrics, comm, wait_for,
    workload::{Worker, Workload},
};

fn calls(m: &Metrics, comm: &str, syscall: &str) -> f64 {
    m.sum(
        "tanzhen_syscalls_total",
        &[("comm", comm), ("syscall", syscall)],
    )
}

fn errors(m: &Metrics, comm: &str, syscall: &str) -> f64 {
    m.sum(
        "tanzhen_syscall_errors_total",
        &[("comm", comm), ("syscall", syscall)],
    )
}

fn opens(m: &Metrics, comm: &str, result: &str) -> f64 {
    m.sum(
        "tanzhen_file_opens_total",
        &[("comm", comm), ("result", result)],
    )
}

fn hist_count(m: &Metrics, syscall: &str) -> f64 {
    m.sum(
        "tanzhen_syscall_duration_seconds_count",
        &[("syscall", syscall)],
    )
}

fn lost(m: &Metrics) -> f64 {
    m.sum(
        "tanzhen_events_lost_total",
        &[("probe", "syscalls"), ("reason", "map_full")],
    )
}

/// Whether any series of a syscalls family carries `comm`.
fn has_comm(m: &Metrics, comm: &str) -> bool {
    [
        "tanzhen_syscalls_total",
        "tanzhen_syscall_errors_total",
        "tanzhen_file_opens_total",
    ]
    .iter()
    .any(|f| {
        m.samples(f)
            .any(|(l, _)| l.iter().any(|(k, v)| k == "comm" && v == comm))
    })
}

/// Waits until `cond` holds, then one more drain interval (so that "exactly" means exactly:
/// late duplicates would show), and returns that last scrape.
fn settle(agent: &Agent, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let m = wait_for(agent, Duration::from_secs(30), &cond);
    assert!(
        cond(&m),
        "the counts did not arrive within 30 s:\n{}\n--- agent log ---\n{}",
        m.0,
        agent.log_text()
    );
    thread::sleep(Duration::from_millis(1_500));
    agent.scrape()
}

#[test]
fn getppid_and_openat_are_counted_exactly() {
    let name = comm("tzsys");
    let other = comm("tzoth");
    let w = Worker::spawn(
        &name,
        Workload {
            getppid: 10_000,
            open_missing: 1_000,
            open_existing: 500,
            ..Workload::default()
        },
    );
    // Same workload in a process --pid leaves out.
    let o = Worker::spawn(
        &other,
        Workload {
            getppid: 3_000,
            open_missing: 10,
            ..Workload::default()
        },
    );
    let mut agent = Agent::start(&[
        "--probes",
        "syscalls",
        "--pid",
        &w.pid(),
        "--interval",
        "1s",
    ]);
    let before = agent.scrape();
    w.go();
    o.go();

    let after = settle(&agent, |m| {
        calls(m, &name, "getppid") - calls(&before, &name, "getppid") >= 10_000.0
            && calls(m, &name, "openat") - calls(&before, &name, "openat") >= 1_500.0
            && hist_count(m, "getppid") - hist_count(&before, "getppid") >= 10_000.0
    });
    let d = |f: &dyn Fn(&Metrics) -> f64| f(&after) - f(&before);
    let ctx = || format!("\n--- scrape ---\n{}", after.0);
    assert_eq!(
        d(&|m| calls(m, &name, "getppid")),
        10_000.0,
        "getppid{}",
        ctx()
    );
    assert_eq!(
        d(&|m| errors(m, &name, "getppid")),
        0.0,
        "getppid errors{}",
        ctx()
    );
    assert_eq!(
        d(&|m| calls(m, &name, "openat")),
        1_500.0,
        "openat{}",
        ctx()
    );
    assert_eq!(
        d(&|m| errors(m, &name, "openat")),
        1_000.0,
        "openat errors{}",
        ctx()
    );
    assert_eq!(d(&|m| opens(m, &name, "ok")), 500.0, "opens ok{}", ctx());
    assert_eq!(
        d(&|m| opens(m, &name, "ENOENT")),
        1_000.0,
        "opens ENOENT{}",
        ctx()
    );
    assert_eq!(d(&|m| calls(m, &name, "close")), 500.0, "close{}", ctx());
    assert_eq!(
        d(&|m| hist_count(m, "getppid")),
        10_000.0,
        "getppid latency histogram count{}",
        ctx()
    );
    let inf = after.sum(
        "tanzhen_syscall_duration_seconds_bucket",
        &[("syscall", "getppid"), ("le", "+Inf")],
    );
    assert_eq!(inf, hist_count(&after, "getppid"), "+Inf bucket = count");
    let sum = after.sum(
        "tanzhen_syscall_duration_seconds_sum",
        &[("syscall", "getppid")],
    );
    assert!(
        sum > 0.0 && sum < 10_000.0 * 1e-3,
        "10,000 getppid calls took {sum} s in total"
    );
    assert!(
        !has_comm(&after, &other),
        "--pid let {other} through{}",
        ctx()
    );
    assert_eq!(lost(&after), 0.0, "nothing lost{}", ctx());
    assert_eq!(after.sum("tanzhen_probe_up", &[("probe", "syscalls")]), 1.0);
    crate::tcp::promtool_accepts(&after);
    assert_eq!(
        agent.stop(),
        Some(0),
        "SIGTERM exits 0\n{}",
        agent.log_text()
    );
}

/// Latency of syscalls the thread leaves its CPU in: the start moves from the CPU's slot to the
/// per-thread map at the switch, and the exit finds it on whichever CPU the thread returns.
#[test]
fn blocking_and_migrating_syscalls_keep_their_latency() {
    crate::workload::require_cpus(2);
    let name = comm("tzblk");
    let w = Worker::spawn(
        &name,
        Workload {
            sleeps: 300,
            migrations: 300,
            ..Workload::default()
        },
    );
    let mut agent = Agent::start(&[
        "--probes",
        "syscalls",
        "--pid",
        &w.pid(),
        "--interval",
        "1s",
    ]);
    let before = agent.scrape();
    w.go();
    let after = settle(&agent, |m| {
        hist_count(m, "nanosleep") - hist_count(&before, "nanosleep") >= 300.0
            && hist_count(m, "sched_setaffinity") - hist_count(&before, "sched_setaffinity")
                >= 300.0
    });
    let d = |f: &dyn Fn(&Metrics) -> f64| f(&after) - f(&before);
    let ctx = || format!("\n--- scrape ---\n{}", after.0);
    for syscall in ["nanosleep", "sched_setaffinity"] {
        assert_eq!(
            d(&|m| calls(m, &name, syscall)),
            300.0,
            "{syscall}{}",
            ctx()
        );
        assert_eq!(
            d(&|m| hist_count(m, syscall)),
            300.0,
            "{syscall} latency histogram count{}",
            ctx()
        );
    }
    // Every sleep lasts at least 100 µs: none may land in a bucket below 2^16 ns (65.5 µs),
    // which a start taken from anything but its own entry could produce.
    let short = d(&|m| {
        m.sum(
            "tanzhen_syscall_duration_seconds_bucket",
            &[("syscall", "nanosleep"), ("le", "0.000065536")],
        )
    });
    assert_eq!(short, 0.0, "nanosleep samples under 65.5 µs{}", ctx());
    assert_eq!(lost(&after), 0.0, "nothing lost{}", ctx());
    assert_eq!(
        agent.stop(),
        Some(0),
        "SIGTERM exits 0\n{}",
        agent.log_text()
    );
}

/// Entries of the agent's kernel maps called `name` (0 when it holds none).
fn kernel_map_entries(agent_pid: u32, name: &str) -> usize {
    crate::agent_maps(agent_pid)
        .iter()
        .filter(|(_, n)| n == name)
        .map(|(id, _)| crate::map_dump(id).len())
        .sum()
}

/// `exit_group` never returns: its start must not stay in the per-thread map after the thread
/// is gone (else the map fills with the dead, and a thread reusing the id reads a stale start
/// when it returns from `clone`). Without the `sched_process_exit` program, 500 processes left
/// about 500 entries.
#[test]
fn exiting_processes_leave_no_syscall_state() {
    let mut agent = Agent::start(&["--probes", "syscalls", "--interval", "1s"]);
    let pid = agent.pid();
    let before = kernel_map_entries(pid, "SYSCALL_START");
    for _ in 0..500 {
        let status = std::process::Command::new("/bin/true").status().unwrap();
        assert!(status.success());
    }
    let after = kernel_map_entries(pid, "SYSCALL_START");
    assert!(
        after < before + 100,
        "SYSCALL_START grew from {before} to {after} entries over 500 exited processes"
    );
    assert_eq!(
        agent.stop(),
        Some(0),
        "SIGTERM exits 0\n{}",
        agent.log_text()
    );
}

#[test]
fn pid_filter_applies_to_tcp_too() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (inside, outside) = (comm("tzpin"), comm("tzpout"));
    let job = Workload {
        getppid: 100,
        connect_port: Some(port),
        ..Workload::default()
    };
    let a = Worker::spawn(&inside, job);
    let b = Worker::spawn(&outside, job);
    let agent = Agent::start(&[
        "--probes",
        "tcp,syscalls",
        "--pid",
        &a.pid(),
        "--interval",
        "1s",
    ]);
    a.go();
    b.go();
    // And one connect from this (test) process itself.
    let me: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    drop(std::net::TcpStream::connect(me).unwrap());

    let est = |m: &Metrics, c: &str| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", c), ("outcome", "established")],
        )
    };
    let after = settle(&agent, |m| {
        est(m, &inside) >= 1.0 && calls(m, &inside, "getppid") >= 100.0
    });
    assert_eq!(est(&after, &inside), 1.0, "{}", after.0);
    assert_eq!(calls(&after, &inside, "getppid"), 100.0, "{}", after.0);
    assert_eq!(calls(&after, &inside, "connect"), 1.0, "{}", after.0);
    let tcp_total = after.sum("tanzhen_tcp_connects_total", &[]);
    assert_eq!(
        tcp_total, 1.0,
        "only the --pid process's connect\n{}",
        after.0
    );
    assert!(!has_comm(&after, &outside), "{}", after.0);
    let comms: Vec<String> = after
        .samples("tanzhen_syscalls_total")
        .filter_map(|(l, _)| l.into_iter().find(|(k, _)| k == "comm").map(|(_, v)| v))
        .collect();
    assert!(comms.iter().all(|c| *c == inside), "{comms:?}");
}

#[test]
fn comm_filter_keeps_only_matching_processes() {
    let (keep, drop_) = (comm("tzcfk"), comm("tzcfd"));
    let job = Workload {
        getppid: 1_000,
        open_missing: 7,
        ..Workload::default()
    };
    let a = Worker::spawn(&keep, job);
    let b = Worker::spawn(&drop_, job);
    let re = format!("^{keep}$");
    let agent = Agent::start(&[
        "--probes",
        "syscalls",
        "--syscalls-comm-filter",
        &re,
        "--interval",
        "1s",
    ]);
    a.go();
    b.go();
    let after = settle(&agent, |m| calls(m, &keep, "getppid") >= 1_000.0);
    assert_eq!(calls(&after, &keep, "getppid"), 1_000.0, "{}", after.0);
    assert_eq!(opens(&after, &keep, "ENOENT"), 7.0, "{}", after.0);
    assert!(!has_comm(&after, &drop_), "{}", after.0);
    let others: Vec<String> = after
        .samples("tanzhen_syscalls_total")
        .filter_map(|(l, _)| l.into_iter().find(|(k, _)| k == "comm").map(|(_, v)| v))
        .filter(|c| *c != keep)
        .collect();
    assert!(others.is_empty(), "only {keep} may appear: {others:?}");
}

/// Two processes on one CPU making the same syscall take turns (a `sched_yield` every 50
/// calls). The kernel counts a process's consecutive calls of a syscall in a per-CPU run, and
/// each turn of the other process ends that run and moves it into the counts hash under the
/// process it belonged to: both processes' counts must stay exact through hundreds of turns.
#[test]
fn processes_taking_turns_on_one_cpu_keep_exact_counts() {
    const CALLS: u32 = 20_000;
    const EVERY: u32 = 50;
    let names = [comm("tzturnA"), comm("tzturnB")];
    let job = Workload {
        getppid: CALLS,
        pin_cpu: Some(0),
        yield_every: EVERY,
        ..Workload::default()
    };
    let workers = names.clone().map(|n| Worker::spawn(&n, job));
    let agent = Agent::start(&["--probes", "syscalls", "--interval", "1s"]);
    let before = agent.scrape();
    for w in &workers {
        w.start();
    }
    for w in &workers {
        w.wait();
    }
    let (n, yields) = (f64::from(CALLS), f64::from(CALLS / EVERY));
    let d = |m: &Metrics, c: &str, s: &str| calls(m, c, s) - calls(&before, c, s);
    let after = settle(&agent, |m| {
        names
            .iter()
            .all(|c| d(m, c, "getppid") >= n && d(m, c, "sched_yield") >= yields)
    });
    for c in &names {
        assert_eq!(d(&after, c, "getppid"), n, "getppid of {c}\n{}", after.0);
        assert_eq!(
            d(&after, c, "sched_yield"),
            yields,
            "sched_yield of {c}\n{}",
            after.0
        );
    }
    assert_eq!(
        lost(&after) - lost(&before),
        0.0,
        "nothing lost\n{}",
        after.0
    );
}

#[test]
fn full_count_map_is_counted_as_lost() {
    let name = comm("tzfull");
    let w = Worker::spawn(
        &name,
        Workload {
            getppid: 1_000,
            open_missing: 1_000,
            open_existing: 500,
            ..Workload::default()
        },
    );
    // One key per generation: the worker's opens need two (openat ok, openat ENOENT; its other
    // calls count in the per-CPU runs, which have no size limit to hit), so inserts must fail
    // and be counted.
    let agent = Agent::start(&[
        "--probes",
        "syscalls",
        "--pid",
        &w.pid(),
        "--interval",
        "1s",
        "--syscalls-map-entries",
        "1",
    ]);
    let before = agent.scrape();
    w.go();
    let counted = |m: &Metrics| {
        m.samples("tanzhen_syscalls_total")
            .filter(|(l, _)| l.iter().any(|(k, v)| k == "comm" && *v == name))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let accounted = |m: &Metrics| counted(m) + lost(m) - counted(&before) - lost(&before);
    // 1,000 getppid + 1,500 openat + 500 close, plus a few pipe reads/writes.
    let after = settle(&agent, |m| accounted(m) >= 3_000.0);
    assert!(
        lost(&after) - lost(&before) > 0.0,
        "a 1-entry map must overflow\n{}",
        after.0
    );
    let a = accounted(&after);
    assert!(
        (3_000.0..=3_010.0).contains(&a),
        "counted + lost = {a}: every call is either counted or lost\n{}",
        after.0
    );
}
