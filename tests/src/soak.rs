//! Soak: all probes with a small series cap, a workload churning short-lived processes with
//! random names (from several threads) and connects to random local ports (from threads with
//! random names; a quarter reach listeners and are established, then reset, the others are
//! refused). The e2e suite runs it at the numbers: 50,000 processes and 100,000
//! connects (`TANZHEN_SOAK_PROCESSES` / `TANZHEN_SOAK_CONNECTS` change them; `cargo xtask soak`
//! runs only this test). Checks: RSS at the end within 20% of RSS after warm-up; no family ever
//! above its cap (plus its one `other` series) on any scrape, taken every 250 ms throughout,
//! and some family at exactly that; the exported drop counters of each probe equal to its
//! kernel drop map (read with bpftool).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{Agent, Metrics, http_get};

/// `--max-series-per-metric` of the soak: small, so that the workload's names exceed it.
const CAP: usize = 50;
/// Short-lived processes and connects of the whole soak (the numbers);
/// `TANZHEN_SOAK_PROCESSES` / `TANZHEN_SOAK_CONNECTS` change them.
const PROCESSES: usize = 50_000;
const CONNECTS: usize = 100_000;
/// Threads spawning processes; threads connecting (each with its own random name); listeners.
const SPAWNERS: usize = 4;
const CONNECTERS: usize = 20;
const LISTENERS: usize = 4;
/// `--syscalls-map-entries`: a quarter of the default, so that the process churn fills the
/// syscalls probe's map in every interval and the drop counters compared at the end are never
/// all zero (each `sh` makes ~25 distinct system calls: 170 processes a second fill it).
const SYSCALL_MAP_ENTRIES: u32 = 4096;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64: random enough names and ports, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn name(&mut self) -> String {
        format!("sk{:012x}", self.next() & 0xffff_ffff_ffff)
    }
}

/// `n` short-lived processes from [`SPAWNERS`] threads, each process renaming itself (its
/// comm) to a random name before exiting. Returns the wall time it took.
fn churn_processes(rng: &mut Rng, n: usize) -> Duration {
    /// Children each spawner keeps alive at once.
    const BATCH: usize = 25;
    let started = Instant::now();
    let threads: Vec<_> = (0..SPAWNERS)
        .map(|i| {
            let mut rng = Rng(rng.next() | 1);
            let share = n / SPAWNERS + usize::from(i < n % SPAWNERS);
            std::thread::spawn(move || {
                let mut left = share;
                while left > 0 {
                    let children: Vec<_> = (0..left.min(BATCH))
                        .map(|_| {
                            let name = rng.name();
                            Command::new("/bin/sh")
                                .args(["-c", &format!("printf %s {name} > /proc/self/comm")])
                                .spawn()
                                .expect("spawn sh")
                        })
                        .collect();
                    left -= children.len();
                    for mut c in children {
                        assert!(c.wait().unwrap().success());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a spawner panicked");
    }
    started.elapsed()
}

/// Loopback listeners on random ports, each accepting (and at once dropping) connections on its
/// own thread until dropped: the connects that reach them are established, the others refused.
struct Listeners {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Listeners {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
            ports.push(l.local_addr().unwrap().port());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                for s in l.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    drop(s);
                }
            }));
        }
        Self {
            ports,
            stop,
            threads,
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for &port in &self.ports {
            // Wakes the accept loop up so it sees `stop`.
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// SO_LINGER {on, 0}: close(2) sends a reset, so neither side keeps the port in TIME_WAIT
/// (100,000 established connects would otherwise exhaust the ephemeral ports).
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live linger of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// `n` connects to random loopback ports from [`CONNECTERS`] threads with random names: one in
/// four goes to one of `listeners` (established, then reset), the others to random ports
/// (nearly all closed: refused at once). Returns the wall time and how many were established.
fn churn_connects(rng: &mut Rng, n: usize, listeners: &Listeners) -> (Duration, usize) {
    let started = Instant::now();
    let threads: Vec<_> = (0..CONNECTERS)
        .map(|i| {
            let (name, mut rng) = (rng.name(), Rng(rng.next() | 1));
            let share = n / CONNECTERS + usize::from(i < n % CONNECTERS);
            let open = listeners.ports.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let mut established = 0;
                    for _ in 0..share {
                        let r = rng.next();
                        let port = if r % 4 == 0 {
                            open[(r >> 8) as usize % open.len()]
                        } else {
                            20_000 + ((r >> 8) % 40_000) as u16
                        };
                        if let Ok(s) = TcpStream::connect_timeout(
                            &(Ipv4Addr::LOCALHOST, port).into(),
                            Duration::from_secs(5),
                        ) {
                            reset_on_close(&s);
                            established += 1;
                        }
                    }
                    established
                })
                .unwrap()
        })
        .collect();
    let established = threads
        .into_iter()
        .map(|t| t.join().expect("a connecting thread panicked"))
        .sum();
    (started.elapsed(), established)
}

/// Distinct label sets per family (histogram lines folded into their series).
fn series_per_family(m: &Metrics) -> BTreeMap<String, usize> {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in m.0.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, _)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let family = ["_bucket", "_sum", "_count", "_created", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        let labels: Vec<&str> = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|l| !l.starts_with("le="))
            .collect();
        sets.entry(family.to_owned())
            .or_default()
            .insert(labels.join(","));
    }
    sets.into_iter().map(|(k, v)| (k, v.len())).collect()
}

/// The largest family of a scrape (series, family), after checking that none is above [`CAP`]
/// plus its `other` series.
fn assert_caps(m: &Metrics, when: &str) -> (usize, String) {
    let mut largest = (0, String::new());
    for (family, n) in series_per_family(m) {
        if family == "tanzhen_series_folded" {
            continue;
        }
        assert!(
            n <= CAP + 1,
            "{when}: {family} has {n} series (cap {CAP} + other)"
        );
        largest = largest.max((n, family));
    }
    largest
}

/// Scrapes `/metrics` every 250 ms on its own thread for the whole soak and checks the caps on
/// each scrape, so "never above the cap" holds between the main thread's own scrapes too.
struct CapWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, (usize, String))>,
}

impl CapWatch {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut scrapes, mut largest) = (0, (0, String::new()));
            while !flag.load(Ordering::Relaxed) {
                let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
                assert_eq!(status, 200, "GET /metrics: {body}");
                scrapes += 1;
                largest = largest.max(assert_caps(&Metrics(body), &format!("scrape {scrapes}")));
                std::thread::sleep(Duration::from_millis(250));
            }
            (scrapes, largest)
        });
        Self { stop, thread }
    }

    /// Stops the watcher: how many scrapes it checked and the largest family it saw.
    fn finish(self) -> (usize, (usize, String)) {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// The kernel's drop maps and the `probe` label their counts are exported under.
const LOST_MAPS: &[(&str, &str)] = &[
    ("TCP_LOST", "tcp"),
    ("SYSCALL_LOST", "syscalls"),
    ("SCHED_LOST", "sched"),
];

/// Sum of every per-CPU value of the agent's `*_LOST` maps by probe, read by bpftool through
/// their ids in /proc/PID/fdinfo. Every probe loads its own copy of the object, so each name
/// appears once per probe (the other probes' copies stay at zero).
fn kernel_lost(pid: u32) -> BTreeMap<&'static str, u64> {
    let mut total = BTreeMap::new();
    for (id, name) in crate::agent_maps(pid) {
        let Some(&(_, probe)) = LOST_MAPS.iter().find(|(map, _)| *map == name) else {
            continue;
        };
        let sum = total.entry(probe).or_default();
        for entry in crate::map_dump(&id) {
            // With BTF bpftool adds a `formatted` copy holding plain numbers; the raw values
            // are little-endian byte arrays ("0x2a", "0x00", ...).
            let values = entry.get("formatted").unwrap_or(&entry)["values"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for cpu in values {
                *sum += match &cpu["value"] {
                    serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
                    serde_json::Value::Array(bytes) => bytes
                        .iter()
                        .rev()
                        .filter_map(|b| {
                            u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()
                        })
                        .fold(0, |acc, b| acc << 8 | b),
                    _ => 0,
                };
            }
        }
    }
    total
}

/// `tanzhen_events_lost_total` by probe, of the reasons kept in kernel maps (not the perf
/// buffers' own count nor BPF recursion misses, which come from elsewhere).
fn exported_lost(m: &Metrics) -> BTreeMap<String, f64> {
    let mut by_probe = BTreeMap::new();
    for (labels, v) in m.samples("tanzhen_events_lost_total") {
        let label = |k: &str| {
            labels
                .iter()
                .find(|(lk, _)| lk == k)
                .map(|(_, lv)| lv.clone())
                .unwrap_or_default()
        };
        if !matches!(label("reason").as_str(), "perf_lost" | "recursion") {
            *by_probe.entry(label("probe")).or_default() += v;
        }
    }
    by_probe
}

/// Whether every probe's exported drops are at least (`at_least`) or at most (!`at_least`)
/// the kernel's.
fn lost_vs_kernel(m: &Metrics, kernel: &BTreeMap<&str, u64>, at_least: bool) -> bool {
    let exported = exported_lost(m);
    kernel.iter().all(|(probe, &k)| {
        let e = exported.get(*probe).copied().unwrap_or(0.0);
        if at_least {
            e >= k as f64
        } else {
            e <= k as f64
        }
    })
}

#[test]
fn soak_all_probes_with_process_and_connect_churn() {
    let procs = env_or("TANZHEN_SOAK_PROCESSES", PROCESSES);
    let connects = env_or("TANZHEN_SOAK_CONNECTS", CONNECTS);
    let agent = Agent::start(&[
        "--probes",
        "all",
        "--max-series-per-metric",
        &CAP.to_string(),
        "--interval",
        "1s",
        "--syscalls-map-entries",
        &SYSCALL_MAP_ENTRIES.to_string(),
    ]);
    let watch = CapWatch::start(agent.addr);
    let listeners = Listeners::start(LISTENERS);
    let mut rng = Rng(u64::from(std::process::id()) << 20 | 0x9e37);
    let (mut proc_time, mut connect_time, mut established) = (Duration::ZERO, Duration::ZERO, 0);
    let mut round = |rng: &mut Rng| {
        proc_time += churn_processes(rng, procs / 5);
        let (t, e) = churn_connects(rng, connects / 5, &listeners);
        connect_time += t;
        established += e;
    };
    // Warm-up: a fifth of the workload, then the caps are reached and RSS is taken.
    round(&mut rng);
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.scrape();
    assert_caps(&m, "warm-up");
    assert!(
        m.sum("tanzhen_series_folded_total", &[]) > 0.0,
        "the workload should reach the cap:\n{}",
        m.0
    );
    let warm = rss_kib(agent.pid());
    let mut peak = warm;
    for _ in 1..5 {
        round(&mut rng);
        peak = peak.max(rss_kib(agent.pid()));
    }
    drop(listeners);
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.scrape();
    let (scrapes, largest) = watch.finish();
    let largest = largest.max(assert_caps(&m, "end"));
    let end = rss_kib(agent.pid());
    let rate = |n: usize, t: Duration| n as f64 / t.as_secs_f64().max(1e-3);
    eprintln!(
        "soak: {procs} processes in {:.1} s ({:.0}/s), {connects} connects ({established} \
         established) in {:.1} s ({:.0}/s); RSS warm-up {warm} KiB, peak {peak} KiB, end {end} \
         KiB; {scrapes} scrapes checked, largest family {} with {} series; folded {}",
        proc_time.as_secs_f64(),
        rate(procs, proc_time),
        connect_time.as_secs_f64(),
        rate(connects, connect_time),
        largest.1,
        largest.0,
        m.sum("tanzhen_series_folded_total", &[])
    );
    assert!(
        end * 100 <= warm * 120,
        "RSS grew from {warm} KiB after warm-up to {end} KiB"
    );
    // The watcher really checked: many scrapes, and some family sat at the cap plus `other`.
    assert!(scrapes >= 10, "only {scrapes} scrapes during the soak");
    assert_eq!(
        largest.0,
        CAP + 1,
        "no family reached the cap ({CAP} + other); largest: {}",
        largest.1
    );
    assert!(
        established >= connects / 8,
        "only {established} of {connects} connects established"
    );
    // Every exit is counted or accounted for: under this load the sched probe's ring buffer
    // can fill (ringbuf_full, exec and exit events alike) and the kernel can skip its programs
    // (recursion); other processes of the machine exit too.
    let exits = m.sum("tanzhen_process_exits_total", &[]);
    let sched_lost = m.sum("tanzhen_events_lost_total", &[("probe", "sched")]);
    assert!(
        exits + sched_lost >= procs as f64,
        "{exits} exits counted and {sched_lost} sched events lost for {procs} processes"
    );
    // The agent copies the kernel's drop maps every interval: what it exported is at most
    // what the maps hold now, and it catches up with that within a few intervals (new drops
    // in between only make the kernel's side larger).
    let kernel = kernel_lost(agent.pid());
    let probes: Vec<&str> = kernel.keys().copied().collect();
    assert_eq!(
        probes,
        ["sched", "syscalls", "tcp"],
        "drop maps found by bpftool"
    );
    assert!(
        kernel["syscalls"] > 0,
        "the process churn should fill the syscalls map ({SYSCALL_MAP_ENTRIES} entries)"
    );
    assert!(
        lost_vs_kernel(&m, &kernel, false),
        "exported drops {:?} > the kernel's {kernel:?}",
        exported_lost(&m)
    );
    let m = crate::wait_for(&agent, Duration::from_secs(10), |m| {
        lost_vs_kernel(m, &kernel, true)
    });
    assert!(
        lost_vs_kernel(&m, &kernel, true),
        "exported drops {:?} never reached the kernel's {kernel:?}",
        exported_lost(&m)
    );
    let drops: Vec<String> = m
        .samples("tanzhen_events_lost_total")
        .filter(|(_, v)| *v > 0.0)
        .map(|(l, v)| format!("{}/{} {v}", l[0].1, l[1].1))
        .collect();
    eprintln!(
        "soak: drop maps in the kernel {kernel:?}, exported {:?} ({})",
        exported_lost(&m),
        drops.join(", ")
    );
}
