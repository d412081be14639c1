//! Scheduler probe end to end. Ground truth is the kernel's own per-thread counters
//! (`voluntary_ctxt_switches` / `nonvoluntary_ctxt_switches` in /proc/self/task/<tid>/status):
//! workload threads take a distinctive comm only between their "before" and "after" reads, so
//! the agent's per-comm counts cover exactly the window the kernel's counters do.

use std::{
    io::{Read as _, Write as _},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    Agent, FakeContainer, Metrics, comm, wait_for,
    workload::{assert_close, bracketed, my_switches, pin, pipe_ping_pong, require_cpus, set_comm},
};

fn switches(m: &Metrics, comm: &str, kind: &str) -> f64 {
    m.sum(
        "tanzhen_sched_context_switches_total",
        &[("comm", comm), ("kind", kind)],
    )
}

/// Drops the agent's own code is responsible for (map, ring buffer or perf buffer full, perf
/// output failures, unreadable fields).
fn dropped(m: &Metrics) -> f64 {
    [
        "map_full",
        "ringbuf_full",
        "perf_lost",
        "perf_output_error",
        "read_error",
    ]
    .iter()
    .map(|r| {
        m.sum(
            "tanzhen_events_lost_total",
            &[("probe", "sched"), ("reason", r)],
        )
    })
    .sum()
}

/// Runs of our programs the kernel skipped (another BPF program was active on that CPU).
fn recursion(m: &Metrics) -> f64 {
    m.sum(
        "tanzhen_events_lost_total",
        &[("probe", "sched"), ("reason", "recursion")],
    )
}

fn runq_count(m: &Metrics, comm: &str) -> f64 {
    m.sum(
        "tanzhen_sched_runqueue_latency_seconds_count",
        &[("comm", comm)],
    )
}

/// Waits until the agent's counts reach the kernel's, then two more drain intervals so that
/// any extra count would show too.
fn settle(agent: &Agent, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    wait_for(agent, Duration::from_secs(20), cond);
    thread::sleep(Duration::from_millis(2_500));
    agent.scrape()
}

#[test]
fn pinned_ping_pong_matches_the_kernels_switch_counters() {
    require_cpus(2);
    ping_pong("tzpp", [Some(0), Some(1)]);
}

/// Unpinned, the woken thread often preempts the writer: many switches are involuntary.
#[test]
fn unpinned_ping_pong_matches_the_kernels_switch_counters() {
    ping_pong("tzpu", [None, None]);
}

/// Two threads named `prefix<pid>` ping-pong a byte 20,000 times through two pipes; the
/// agent's switch counts for that comm must match the kernel's counters of the two threads.
fn ping_pong(prefix: &str, cpus: [Option<usize>; 2]) {
    const ROUND_TRIPS: usize = 20_000;
    let agent = Agent::start(&["--probes", "sched", "--interval", "1s"]);
    let name = comm(prefix);
    let before = agent.scrape();

    let (vol, invol) = pipe_ping_pong(&name, cpus, ROUND_TRIPS);
    assert!(
        vol + invol > ROUND_TRIPS as u64,
        "a ping-pong switches at least once per round trip: {vol} + {invol}"
    );

    let delta = |m: &Metrics, kind| switches(m, &name, kind) - switches(&before, &name, kind);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let after = settle(&agent, |m| {
        delta(m, "voluntary") >= vol as f64 * 0.99 && delta(m, "involuntary") >= invol as f64 * 0.99
    });
    eprintln!(
        "{cpus:?}: kernel {vol} voluntary + {invol} involuntary; agent {} + {}; run-queue samples {}; runs skipped by the kernel {}",
        delta(&after, "voluntary"),
        delta(&after, "involuntary"),
        runq_count(&after, &name) - runq_count(&before, &name),
        recursion(&after) - recursion(&before)
    );
    assert_close(
        delta(&after, "voluntary"),
        vol,
        "voluntary switches",
        &after,
    );
    assert_close(
        delta(&after, "involuntary"),
        invol,
        "involuntary switches",
        &after,
    );

    // Every switch-out in the window is followed by a switch-in in the window, and each
    // switch-in is one sample: after a sleep (voluntary) the wakeup started the wait, after a
    // preemption (involuntary) the switch-out did. Fewer only when
    // - the kernel skipped one of our programs because another BPF program was running on that
    //   CPU (an IPI wakeup during someone's syscall program); it reports those skips, and so does
    //   the agent (reason="recursion");
    // - the kernel never ran the sched_switch tracepoint for a switch-in: on this machine's
    //   kernel up to 0.4% of one pinned thread's switch-ins (80 of 19,976) reached no tracepoint
    //   consumer at all. runqlat (tp_btf, another attach path) misses exactly the same ones, per
    //   thread, and so does ftrace; the thread's switch-outs all arrive. See the sched issue's
    //   report. Hence the 1% slack below, which the issue does not ask for.
    // More only by switches in the few instructions between the comm change and the counters'
    // reads: double counting would show.
    let samples = runq_count(&after, &name) - runq_count(&before, &name);
    let skipped = recursion(&after) - recursion(&before);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let switched = (vol + invol) as f64;
    assert!(
        samples + skipped >= switched * 0.99 - 2.0,
        "run-queue samples {samples} (+{skipped} skipped by the kernel) < {switched} switches\n{}",
        after.0
    );
    assert!(
        samples <= switched * 1.01 + 2.0,
        "run-queue samples {samples} > {switched} switches\n{}",
        after.0
    );
    let inf = after.sum(
        "tanzhen_sched_runqueue_latency_seconds_bucket",
        &[("comm", &name), ("le", "+Inf")],
    );
    assert_eq!(
        inf,
        runq_count(&after, &name),
        "+Inf bucket equals the count"
    );
    let sum = after.sum(
        "tanzhen_sched_runqueue_latency_seconds_sum",
        &[("comm", &name)],
    );
    assert!(sum > 0.0, "run-queue latency sum {sum}");
    assert_eq!(dropped(&after), 0.0, "{}", after.0);
    assert_eq!(after.sum("tanzhen_probe_up", &[("probe", "sched")]), 1.0);
}

#[test]
fn busy_threads_sharing_a_cpu_are_preempted() {
    require_cpus(2);
    let agent = Agent::start(&["--probes", "sched", "--interval", "1s"]);
    let name = comm("tzbusy");
    let before = agent.scrape();

    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));
    let spin = |stop: Arc<AtomicBool>| {
        move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    };
    let t1 = bracketed(name.clone(), Some(1), start.clone(), spin(stop.clone()));
    let t2 = bracketed(name.clone(), Some(1), start.clone(), spin(stop.clone()));
    start.wait();
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(1_500));
    stop.store(true, Ordering::Relaxed);
    let (v1, i1) = t1.join().unwrap();
    let (v2, i2) = t2.join().unwrap();
    let (vol, invol) = (v1 + v2, i1 + i2);
    let spun = t0.elapsed();
    assert!(
        invol > 0,
        "two busy threads on one CPU were never preempted"
    );

    let delta = |m: &Metrics, kind| switches(m, &name, kind) - switches(&before, &name, kind);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let after = settle(&agent, |m| delta(m, "involuntary") >= invol as f64 * 0.99);
    eprintln!(
        "busy {spun:?}: kernel {vol} voluntary + {invol} involuntary; agent {} + {}",
        delta(&after, "voluntary"),
        delta(&after, "involuntary")
    );
    assert!(delta(&after, "involuntary") > 0.0, "{}", after.0);
    assert_close(
        delta(&after, "involuntary"),
        invol,
        "involuntary switches",
        &after,
    );
    assert_close(
        delta(&after, "voluntary"),
        vol,
        "voluntary switches",
        &after,
    );
}

#[test]
fn execs_and_exits_are_counted_exactly() {
    const N: usize = 25;
    let agent = Agent::start(&["--probes", "sched", "--interval", "1s"]);
    let name = comm("tzx");
    let dir = std::env::temp_dir().join(format!("tanzhen-e2e-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(&name);
    std::fs::copy("/bin/true", &exe).expect("copy /bin/true");

    for _ in 0..N {
        let st = std::process::Command::new(&exe).status().unwrap();
        assert!(st.success());
    }
    let execs = |m: &Metrics| m.sum("tanzhen_process_execs_total", &[("comm", &name)]);
    let exits = |m: &Metrics| m.sum("tanzhen_process_exits_total", &[("comm", &name)]);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let n = N as f64;
    let m = settle(&agent, |m| execs(m) >= n && exits(m) >= n);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(execs(&m), n, "execs of {name}\n{}", m.0);
    assert_eq!(exits(&m), n, "exits of {name}\n{}", m.0);
    agent.assert_compat_mode();
    assert_eq!(
        m.sum("tanzhen_decode_errors_total", &[("probe", "sched")]),
        0.0
    );
    assert_eq!(dropped(&m), 0.0, "{}", m.0);
}

/// Run-queue latency is also keyed by cgroup: a shell that joins a cgroup named like a docker
/// container and then sleeps and wakes 40 times (bash's `read -t`, no forks) has its samples
/// under that container (outside Kubernetes the `container` label is the short container id).
#[test]
fn runqueue_latency_names_the_container() {
    let agent = Agent::start(&["--probes", "sched", "--interval", "1s"]);
    let c = FakeContainer::create_v2();
    let name = comm("tzcg");
    // exec -a sets argv[0]; the comm comes from the file name, so run bash through a symlink
    // with the distinctive name.
    let link = std::env::temp_dir().join(&name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/bin/bash", &link).unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && {{ for i in {{1..40}}; do read -r -t 0.01 _; done; true; }}",
        c.dir.display()
    );
    let mut child = std::process::Command::new(&link)
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    // Kept open (no data, no EOF) so that every `read -t` sleeps until its timeout.
    let stdin = child.stdin.take();
    let st = child.wait().expect("wait for bash");
    drop(stdin);
    let _ = std::fs::remove_file(&link);
    assert!(st.success(), "the workload failed: {st}");
    let count = |m: &Metrics, container: &str| {
        m.sum(
            "tanzhen_sched_runqueue_latency_seconds_count",
            &[("comm", &name), ("container", container)],
        )
    };
    let short = &c.id[..12];
    // 40 sleeps, 40 wake-ups; a few percent slack for a switch-in the kernel does not trace
    // (seen once: 39 of 40; see `ping_pong`) — the point here is the label.
    let m = wait_for(&agent, Duration::from_secs(20), |m| count(m, short) >= 40.0);
    assert!(count(&m, short) >= 37.0, "{}", m.0);
    // Samples from before the shell joined (its start: fork, exec, page-cache waits) carry the
    // root cgroup; a handful at most.
    assert!(count(&m, "") <= 5.0, "{}", m.0);
}

/// An exiting thread's last switch-out must leave no run-queue state behind (it used to record
/// the thread's cgroup again after `sched_process_exit` had dropped its entry, so the map filled
/// with the dead). With room for 4,096 threads, 6,000 threads start and exit; then new threads
/// still get their samples and nothing is dropped.
#[test]
fn exited_threads_leave_no_run_queue_state() {
    const THREADS: usize = 6_000;
    let agent = Agent::start(&[
        "--probes",
        "sched",
        "--interval",
        "1s",
        "--sched-start-entries",
        "4096",
    ]);
    let before = agent.scrape();
    for _ in 0..THREADS {
        thread::spawn(|| ()).join().unwrap();
    }
    let name = comm("tzexit");
    let (vol, invol) = pipe_ping_pong(&name, [None, None], 1_000);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let switches = (vol + invol) as f64;
    let samples = |m: &Metrics| runq_count(m, &name) - runq_count(&before, &name);
    let after = settle(&agent, |m| samples(m) >= switches * 0.99);
    assert_eq!(
        dropped(&after) - dropped(&before),
        0.0,
        "{THREADS} threads exited with room for 4096: their state must be gone\n{}",
        after.0
    );
    assert!(
        samples(&after) >= switches * 0.99,
        "run-queue samples {} for {switches} switches\n{}",
        samples(&after),
        after.0
    );
}

/// libbpf-tools `runqlat` (Debian package libbpf-tools, which `cargo xtask setup` installs).
const RUNQLAT: &str = "/usr/sbin/runqlat";

/// Cross-check against libbpf-tools `runqlat -L` over one window of at least 10 s: `runqlat`
/// traces from the moment it prints "Tracing" until SIGINT makes it print; the agent (draining
/// every 100 ms) is read from the drain that exports a marker sample made at the first moment
/// to the one that exports a marker made at the second. Inside the window two threads pinned
/// to CPUs 0 and 1 ping-pong 20,000 times; they exist and sleep before the window opens and
/// sleep again before it closes, so both tools see exactly the same switch-ins of theirs:
/// - their sample count (runqlat's histograms of their thread ids, ours by their comm) agrees
///   to 0.2% (we may lose only what the kernel reports as skipped runs of our programs); the
///   count over every task agrees within 10% with ours over a span that lies inside the window
///   or one that covers it;
/// - the median buckets overlap. The grids differ: runqlat's buckets are 2^k µs (1000·2^k ns),
///   ours 2^k ns, so a median near 2 µs legitimately lands one bucket apart on each grid;
/// - at each runqlat bound x = 1000·2^k ns, runqlat's fraction of samples below x lies between
///   ours below 512·2^k ns and below 1024·2^k ns, our neighbouring bounds (within the count
///   difference and one percentage point).
///
/// Not asserted: that runqlat's fraction below x is within 10 points of ours below 1.024 x.
/// The same switch-in is timed a little longer by runqlat, whose programs run after ours on
/// each tracepoint (attached later): its timestamps include the rest of our program, longer at
/// `sched_switch` than at `sched_wakeup`. Where the ping-pong's latencies crowd (4-8 µs), that
/// moved up to 15% of the samples across 8 µs (runqlat 0.655 below 8000 ns, we 0.809 below
/// 8192 ns), while the counts were identical.
#[test]
fn runqueue_latency_agrees_with_runqlat() {
    const ROUND_TRIPS: usize = 20_000;
    const WINDOW: Duration = Duration::from_secs(10);
    require_cpus(2);
    assert!(
        std::path::Path::new(RUNQLAT).exists(),
        "{RUNQLAT} is missing: run `cargo xtask setup` (it installs the Debian package libbpf-tools)"
    );
    let agent = Agent::start(&["--probes", "sched", "--interval", "100ms"]);
    let name = comm("tzrq");
    let mut pp = GatedPingPong::start(&name, ROUND_TRIPS);
    // The agent's side of the window: from the drain that exports a marker sample made just
    // after runqlat attached (so the threads' start is counted before) to the drain that
    // exports one made just after runqlat's last read. A scrape holds what the last drain
    // took, which can be a while ago on a loaded machine; so the total over all tasks is also
    // bracketed by scrapes whose content certainly lies inside runqlat's window (`before` to
    // `inside`) and certainly covers it (`outside` to `after`).
    let marker = comm("tzmark");
    let outside = agent.scrape();
    let mut rq = Runqlat::start();
    let opened = Instant::now();
    let before = mark(&agent, &marker);
    let lag_before = opened.elapsed();
    let kernel = pp.run();
    thread::sleep(WINDOW.saturating_sub(opened.elapsed()));
    let inside = agent.scrape();
    let out = rq.finish();
    let window = opened.elapsed();
    let after = mark(&agent, &marker);
    let lag_after = opened.elapsed() - window;
    drop(pp);

    let hists = parse_runqlat(&out).unwrap_or_else(|e| panic!("{e}\n--- runqlat ---\n{out}"));
    let mine: Vec<&RunqlatHist> = hists
        .iter()
        .filter(|h| h.tid.is_some_and(|t| kernel.iter().any(|k| k.0 == t)))
        .collect();
    assert_eq!(
        mine.len(),
        2,
        "runqlat -L printed no histogram for a workload thread {kernel:?}\n{out}"
    );
    for h in &mine {
        assert_eq!(h.comm, name, "runqlat's comm of thread {:?}", h.tid);
    }
    let theirs = Cdf::of_runqlat(mine.iter().copied());
    let theirs_all = Cdf::of_runqlat(hists.iter());
    let ours = Cdf::of_agent(&before, &after, &[("comm", &name)]);
    let ours_all = Cdf::of_agent(&before, &after, &[]);
    let skipped = recursion(&after) - recursion(&before);

    let mut report = format!(
        "window {window:.2?} (markers shown after {lag_before:.2?} and {lag_after:.2?}); \
         kernel (tid, voluntary, involuntary) {kernel:?}; \
         runqlat per thread {:?}; our runs skipped by the kernel {skipped}, our drops {}\n\
         largest differences by comm (tanzhen, runqlat): {}\n",
        mine.iter()
            .map(|h| (h.tid, h.buckets.iter().map(|b| b.2).sum::<u64>()))
            .collect::<Vec<_>>(),
        dropped(&after) - dropped(&before),
        comm_differences(&before, &after, &hists)
    );
    let mut failures = Vec::new();
    for (what, ours, theirs) in [
        ("ping-pong threads", &ours, &theirs),
        ("all tasks", &ours_all, &theirs_all),
    ] {
        let (o, t) = (ours.total(), theirs.total());
        report += &format!(
            "{what}: samples tanzhen {o} runqlat {t} ({:+.3}%); median bucket (ns) tanzhen {:?} runqlat {:?}\n",
            100.0 * (o - t) / t,
            ours.median_bucket(),
            theirs.median_bucket()
        );
        report += &ours.compare_with(theirs, &mut failures, what);
    }

    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let round_trips = ROUND_TRIPS as f64;
    let (o, t) = (ours.total(), theirs.total());
    if t < round_trips {
        failures.push(format!(
            "runqlat saw {t} samples of the ping-pong threads, fewer than its {round_trips} round trips"
        ));
    }
    if o < t - skipped - 2.0 || o > t * 1.002 + 2.0 {
        failures.push(format!(
            "ping-pong threads: tanzhen {o} samples, runqlat {t} (allowed: {skipped} skipped runs below, 0.2% above)"
        ));
    }
    let t = theirs_all.total();
    let total = |from: &Metrics, to: &Metrics| {
        to.sum("tanzhen_sched_runqueue_latency_seconds_count", &[])
            - from.sum("tanzhen_sched_runqueue_latency_seconds_count", &[])
    };
    let (inner, outer) = (total(&before, &inside), total(&outside, &after));
    report += &format!("all tasks: tanzhen between {inner} and {outer}, runqlat {t}\n");
    if t < inner * 0.9 || t > outer * 1.1 {
        failures.push(format!(
            "all tasks: runqlat {t} samples, tanzhen between {inner} and {outer}: more than 10% apart"
        ));
    }
    eprintln!("{report}");
    assert!(
        failures.is_empty(),
        "{}\n{report}--- runqlat ---\n{out}",
        failures.join("\n")
    );
}

/// Makes run-queue samples with comm `name` (a thread that sleeps 1 ms three times, in case the
/// kernel does not trace one switch-in) and returns the first scrape that counts one: that
/// drain exported every sample older than the marker.
fn mark(agent: &Agent, name: &str) -> Metrics {
    let seen = runq_count(&agent.scrape(), name);
    let comm = name.to_owned();
    thread::spawn(move || {
        set_comm(&comm);
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(1));
        }
    })
    .join()
    .unwrap();
    let m = wait_for(agent, Duration::from_secs(30), |m| {
        runq_count(m, name) > seen
    });
    assert!(
        runq_count(&m, name) > seen,
        "the marker sample of {name} never showed:\n{}",
        m.0
    );
    m
}

/// The ten comms whose sample counts differ most between the agent (between two scrapes) and
/// runqlat's per-thread histograms, for a failure's report. Rough: runqlat names a thread by
/// its comm at its first sample (before an exec, say), we by its comm at each sample.
fn comm_differences(before: &Metrics, after: &Metrics, hists: &[RunqlatHist]) -> String {
    let mut by_comm = std::collections::HashMap::<String, (f64, f64)>::new();
    for (m, sign) in [(after, 1.0), (before, -1.0)] {
        for (l, v) in m.samples("tanzhen_sched_runqueue_latency_seconds_count") {
            let comm = l.iter().find(|(k, _)| k == "comm").map(|(_, c)| c.clone());
            by_comm.entry(comm.unwrap_or_default()).or_default().0 += sign * v;
        }
    }
    for h in hists {
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let n = h.buckets.iter().map(|b| b.2).sum::<u64>() as f64;
        by_comm.entry(h.comm.clone()).or_default().1 += n;
    }
    let mut v: Vec<_> = by_comm.into_iter().collect();
    v.sort_by(|a, b| (b.1.0 - b.1.1).abs().total_cmp(&(a.1.0 - a.1.1).abs()));
    v.truncate(10);
    format!("{v:?}")
}

/// Two threads named `name`, pinned to CPUs 0 and 1, that sleep until [`GatedPingPong::run`],
/// ping-pong then, and sleep again until dropped.
struct GatedPingPong {
    go: Option<std::io::PipeWriter>,
    fin: Option<std::io::PipeWriter>,
    tids: [u32; 2],
    done: mpsc::Receiver<(u32, u64, u64)>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl GatedPingPong {
    /// Starts the threads and returns once both are asleep.
    fn start(name: &str, round_trips: usize) -> Self {
        let (mut go_rx, go) = std::io::pipe().unwrap();
        let (fin_rx, fin) = std::io::pipe().unwrap();
        let (mut a_rx, mut b_tx) = std::io::pipe().unwrap();
        let (mut b_rx, mut a_tx) = std::io::pipe().unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let spawn = |cpu: usize, work: Box<dyn FnOnce() -> Option<()> + Send>| {
            let (name, tid_tx, done_tx) = (name.to_owned(), tid_tx.clone(), done_tx.clone());
            let mut fin_rx = fin_rx.try_clone().unwrap();
            thread::spawn(move || {
                pin(cpu);
                set_comm(&name);
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() }.cast_unsigned();
                tid_tx.send(tid).unwrap();
                let (v0, i0) = my_switches();
                if work().is_some() {
                    let (v1, i1) = my_switches();
                    let _ = done_tx.send((tid, v1 - v0, i1 - i0));
                }
                // Asleep until the gate closes (EOF).
                let _ = fin_rx.read(&mut [0u8; 1]);
            })
        };
        let a = spawn(
            0,
            Box::new(move || {
                let mut buf = [0u8; 1];
                go_rx.read_exact(&mut buf).ok()?;
                for _ in 0..round_trips {
                    a_tx.write_all(b"p").ok()?;
                    a_rx.read_exact(&mut buf).ok()?;
                }
                Some(())
            }),
        );
        let b = spawn(
            1,
            Box::new(move || {
                let mut buf = [0u8; 1];
                for _ in 0..round_trips {
                    b_rx.read_exact(&mut buf).ok()?;
                    b_tx.write_all(b"q").ok()?;
                }
                Some(())
            }),
        );
        let tids = [tid_rx.recv().unwrap(), tid_rx.recv().unwrap()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tids.iter().all(|&t| sleeping(t)) {
            assert!(
                Instant::now() < deadline,
                "ping-pong threads {tids:?} never went to sleep"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Self {
            go: Some(go),
            fin: Some(fin),
            tids,
            done,
            threads: vec![a, b],
        }
    }

    /// Runs the ping-pong; returns once both threads are asleep again, with each thread's
    /// (tid, voluntary, involuntary) switches from its first sleep to its last.
    fn run(&mut self) -> [(u32, u64, u64); 2] {
        self.go.take().unwrap().write_all(b"g").unwrap();
        let k = [self.done.recv().unwrap(), self.done.recv().unwrap()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.tids.iter().all(|&t| sleeping(t)) {
            assert!(Instant::now() < deadline, "ping-pong threads kept running");
            thread::sleep(Duration::from_millis(10));
        }
        k
    }
}

impl Drop for GatedPingPong {
    fn drop(&mut self) {
        self.go.take();
        self.fin.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether thread `tid` of this process is asleep (state S in /proc/self/task/<tid>/stat).
fn sleeping(tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
    })
}

/// A running `runqlat -L` (per-thread histograms), stopped with SIGINT by
/// [`Runqlat::finish`] and killed if the test fails first.
struct Runqlat {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    out: String,
}

impl Runqlat {
    /// Starts it and returns once it traces (it prints "Tracing" after attaching).
    fn start() -> Self {
        // Line-buffered: runqlat's stdio would otherwise hold "Tracing ..." until it exits.
        let mut child = std::process::Command::new("stdbuf")
            .args(["-oL", RUNQLAT, "-L"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start stdbuf -oL runqlat");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut rq = Self {
            child,
            lines,
            out: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rq
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let tracing = line.starts_with("Tracing");
                    rq.out += &line;
                    rq.out.push('\n');
                    if tracing {
                        return rq;
                    }
                }
                Err(e) => {
                    let stderr = rq.stderr();
                    panic!("runqlat did not start tracing ({e}):\n{}{stderr}", rq.out)
                }
            }
        }
    }

    /// SIGINT: runqlat prints its histograms and exits. Returns everything it printed.
    fn finish(&mut self) -> String {
        // SAFETY: kill(2) on our own child (stdbuf exec'd runqlat in place).
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGINT) };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) {
            self.out += &line;
            self.out.push('\n');
        }
        let status = self.child.wait().expect("wait for runqlat");
        if !status.success() {
            let stderr = self.stderr();
            panic!("runqlat exited with {status}:\n{}{stderr}", self.out);
        }
        std::mem::take(&mut self.out)
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = self.child.kill();
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Runqlat {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One histogram `runqlat` printed: the thread it belongs to (with `-L`) and its buckets.
#[derive(Debug, PartialEq, Eq)]
struct RunqlatHist {
    tid: Option<u32>,
    comm: String,
    /// `(low, high, count)`: `count` samples of `low <= µs <= high`, bounds as printed.
    buckets: Vec<(u64, u64, u64)>,
}

/// Parses `runqlat [-L]` output (µs histograms). Anything unexpected is an error naming the
/// line, so that a format change fails loudly instead of miscounting.
fn parse_runqlat(out: &str) -> Result<Vec<RunqlatHist>, String> {
    let mut hists: Vec<RunqlatHist> = Vec::new();
    let mut pending: Option<(u32, String)> = None;
    for (n, line) in out.lines().enumerate() {
        let bad = |why: &str| format!("runqlat output line {}: {why}: `{line}`", n + 1);
        let t = line.trim();
        if t.is_empty() || t.starts_with("Tracing run queue latency") {
            continue;
        }
        if let Some(rest) = t.strip_prefix("tid = ") {
            let (tid, comm) = rest.split_once(' ').unwrap_or((rest, ""));
            let tid = tid.parse().map_err(|_| bad("thread id"))?;
            pending = Some((tid, comm.to_owned()));
        } else if t.starts_with("usecs") {
            let (tid, comm) = pending
                .take()
                .map_or((None, String::new()), |(t, c)| (Some(t), c));
            hists.push(RunqlatHist {
                tid,
                comm,
                buckets: Vec::new(),
            });
        } else if t.starts_with("msecs") {
            return Err(bad(
                "millisecond histograms are not parsed (do not pass -m)",
            ));
        } else if let Some((range, rest)) = t.split_once(':') {
            let (lo, hi) = range.split_once("->").ok_or_else(|| bad("bucket range"))?;
            let lo: u64 = lo.trim().parse().map_err(|_| bad("bucket low bound"))?;
            let hi: u64 = hi.trim().parse().map_err(|_| bad("bucket high bound"))?;
            let count: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad("bucket count"))?;
            // log2 buckets: 0 -> 1, then 2^k -> 2^(k+1) - 1.
            if !((lo == 0 && hi == 1) || (lo.is_power_of_two() && lo > 1 && hi == 2 * lo - 1)) {
                return Err(bad("not a log2 bucket"));
            }
            let h = hists
                .last_mut()
                .ok_or_else(|| bad("bucket before a `usecs` header"))?;
            if h.buckets.last().is_some_and(|b| b.1 + 1 != lo) {
                return Err(bad("bucket does not follow the previous one"));
            }
            h.buckets.push((lo, hi, count));
        } else {
            return Err(bad("unexpected line"));
        }
    }
    Ok(hists)
}

/// Run-queue latency samples as cumulative counts: `(x, n)` = `n` samples took less than `x`
/// ns, ascending in `x`; the last point is `(u64::MAX, total)`.
#[derive(Debug)]
struct Cdf(Vec<(u64, f64)>);

impl Cdf {
    /// Merges runqlat histograms: bucket `lo -> hi` µs holds samples of `lo·1000 <= ns <
    /// (hi + 1)·1000` (it divides nanoseconds by 1000, rounding down).
    fn of_runqlat<'a>(hists: impl Iterator<Item = &'a RunqlatHist>) -> Self {
        let mut counts = std::collections::BTreeMap::new();
        for h in hists {
            for &(_, hi, c) in &h.buckets {
                *counts.entry((hi + 1) * 1000).or_insert(0u64) += c;
            }
        }
        let mut acc = 0.0;
        let mut points: Vec<(u64, f64)> = counts
            .into_iter()
            .map(|(x, c)| {
                #[expect(clippy::cast_precision_loss, reason = "small counts")]
                {
                    acc += c as f64;
                }
                (x, acc)
            })
            .collect();
        points.push((u64::MAX, acc));
        Self(points)
    }

    /// The agent's samples between two scrapes, summed over the series carrying `labels`:
    /// `le` = 2^k ns counts samples below 2^k ns.
    fn of_agent(before: &Metrics, after: &Metrics, labels: &[(&str, &str)]) -> Self {
        let by_bound = |m: &Metrics| {
            let mut b = std::collections::BTreeMap::<u64, f64>::new();
            for (l, v) in m.samples("tanzhen_sched_runqueue_latency_seconds_bucket") {
                if !labels
                    .iter()
                    .all(|(k, want)| l.iter().any(|(lk, lv)| lk == k && lv == want))
                {
                    continue;
                }
                let le = l.iter().find(|(k, _)| k == "le").map(|(_, v)| v.as_str());
                let x = match le {
                    Some("+Inf") => u64::MAX,
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "powers of two of nanoseconds"
                    )]
                    Some(s) => (s.parse::<f64>().expect("numeric le") * 1e9).round() as u64,
                    None => continue,
                };
                *b.entry(x).or_default() += v;
            }
            b
        };
        let (b, a) = (by_bound(before), by_bound(after));
        Self(
            a.iter()
                .map(|(&x, &n)| (x, n - b.get(&x).copied().unwrap_or(0.0)))
                .collect(),
        )
    }

    fn total(&self) -> f64 {
        self.0.last().map_or(0.0, |p| p.1)
    }

    /// Fraction of the samples below `x` ns, when `x` is one of this grid's bounds.
    fn below(&self, x: u64) -> Option<f64> {
        self.0
            .iter()
            .find(|p| p.0 == x)
            .map(|p| p.1 / self.total().max(1.0))
    }

    /// The bucket `[low, high)` ns that holds the median sample.
    fn median_bucket(&self) -> (u64, u64) {
        let half = self.total() / 2.0;
        let mut low = 0;
        for &(x, n) in &self.0 {
            if n >= half {
                return (low, x);
            }
            low = x;
        }
        (low, u64::MAX)
    }

    /// Checks `theirs` (runqlat's grid, 1000·2^k ns) against this (our grid, 2^k ns): the
    /// median buckets overlap, and at every bound x of theirs, their fraction below x lies
    /// between ours below the neighbouring bounds (within the count difference and one
    /// percentage point). Pushes what fails; returns the table it compared.
    fn compare_with(&self, theirs: &Self, failures: &mut Vec<String>, what: &str) -> String {
        let (o, t) = (self.median_bucket(), theirs.median_bucket());
        if !(o.0 < t.1 && t.0 < o.1) {
            failures.push(format!(
                "{what}: median buckets do not overlap: tanzhen {o:?} ns, runqlat {t:?} ns"
            ));
        }
        let slack = (self.total() - theirs.total()).abs() / theirs.total().max(1.0) + 0.01;
        let mut table =
            String::from("  fraction below x ns: runqlat at x | tanzhen at [x·0.512, x·1.024]\n");
        for &(x, _) in &theirs.0 {
            // x = 1000·2^k; our neighbouring bounds are 2^(k+9) < x < 2^(k+10).
            if x == u64::MAX || x % 1000 != 0 || !(x / 1000).is_power_of_two() {
                continue;
            }
            let k = (x / 1000).trailing_zeros();
            let (Some(f), Some(lo), Some(hi)) = (
                theirs.below(x),
                self.below(1 << (k + 9)),
                self.below(1 << (k + 10)),
            ) else {
                failures.push(format!("{what}: tanzhen has no bounds around {x} ns"));
                continue;
            };
            table += &format!("  {x:>9}: {f:.4} | [{lo:.4}, {hi:.4}]\n");
            if f < lo - slack || f > hi + slack {
                failures.push(format!(
                    "{what}: below {x} ns runqlat has {f:.4}, outside tanzhen's [{lo:.4}, {hi:.4}] (slack {slack:.4})"
                ));
            }
        }
        table
    }
}

#[test]
fn runqlat_output_is_parsed() {
    let out = "Tracing run queue latency... Hit Ctrl-C to end.\n\n\n\
        tid = 28859 lto cgu.08\n\
        \x20    usecs               : count    distribution\n\
        \x20        0 -> 1          : 0        |                                        |\n\
        \x20        2 -> 3          : 1        |****                                    |\n\
        \x20        4 -> 7          : 9        |****************************************|\n\
        \n\
        tid = 22924 cargo\n\
        \x20    usecs               : count    distribution\n\
        \x20        0 -> 1          : 3        |****************************************|\n";
    let h = parse_runqlat(out).unwrap();
    assert_eq!(
        h,
        [
            RunqlatHist {
                tid: Some(28859),
                comm: "lto cgu.08".into(),
                buckets: vec![(0, 1, 0), (2, 3, 1), (4, 7, 9)],
            },
            RunqlatHist {
                tid: Some(22924),
                comm: "cargo".into(),
                buckets: vec![(0, 1, 3)],
            },
        ]
    );
    let c = Cdf::of_runqlat(h.iter());
    assert_eq!(
        c.0,
        [(2000, 3.0), (4000, 4.0), (8000, 13.0), (u64::MAX, 13.0)]
    );
    assert_eq!(c.median_bucket(), (4000, 8000));
    // Without -L: one histogram without a thread.
    let h = parse_runqlat("     usecs : count distribution\n 0 -> 1 : 5 |*|\n").unwrap();
    assert_eq!(h[0].tid, None);
    for bad in [
        "     usecs : count\n 0 -> 1 : x |*|\n",
        "     usecs : count\n 4 -> 6 : 1 |*|\n",
        "     usecs : count\n 0 -> 1 : 1 |*|\n 4 -> 7 : 1 |*|\n",
        " 0 -> 1 : 1 |*|\n",
        "     msecs : count\n",
        "something else\n",
    ] {
        let e = parse_runqlat(bad).unwrap_err();
        assert!(e.starts_with("runqlat output line "), "{e}");
    }
}
