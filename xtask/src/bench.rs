//! `cargo xtask bench [--quick]`: overhead of tanzhen's probes next to the Debian reference
//! tools, measured side by side in one invocation (baseline, tanzhen, peer, baseline, tanzhen,
//! peer, ...), and the agent's footprint. Writes `target/bench/report.json` and `report.md`.
//!
//! Figures are medians of the rounds with min and max; comparisons are ratios within this run,
//! never against numbers from another day. Sections whose probe this build lacks are skipped
//! and say so.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{cargo, run, setup, step, target_dir};

mod throughput;

/// Debian packages the benchmarks run: perf and libbpf-tools.
const APT: &[(&str, &str)] = &[
    ("linux-perf", "/usr/bin/perf"),
    ("libbpf-tools", "/usr/sbin/syscount"),
];

/// What runs next to the workload in one configuration.
#[derive(Clone, Debug)]
enum Config {
    Baseline,
    Tanzhen(&'static str),
    Peer(&'static str, &'static [&'static str]),
}

impl Config {
    fn name(&self) -> String {
        match self {
            Self::Baseline => "baseline".into(),
            Self::Tanzhen(p) => format!("tanzhen --probes {p}"),
            Self::Peer(bin, args) => format!(
                "{} {}",
                bin.rsplit('/').next().unwrap_or(bin),
                args.join(" ")
            )
            .trim()
            .to_owned(),
        }
    }
}

/// A workload and how to read its figure.
#[derive(Clone, Copy, Debug)]
enum Workload {
    /// `perf bench syscall basic` (getppid): ns per call.
    SyscallBasic,
    /// `perf bench sched pipe`: µs per round trip.
    SchedPipe,
    /// A loopback connect/close loop: connects per second.
    TcpConnects,
}

impl Workload {
    fn unit(self) -> &'static str {
        match self {
            Self::SyscallBasic => "ns/op",
            Self::SchedPipe => "usecs/op",
            Self::TcpConnects => "connects/s",
        }
    }

    fn lower_is_better(self) -> bool {
        !matches!(self, Self::TcpConnects)
    }

    fn run(self, quick: bool) -> anyhow::Result<f64> {
        match self {
            Self::SyscallBasic => {
                let loops = if quick { "2000000" } else { "5000000" };
                Ok(perf_usecs_isolated(&["bench", "syscall", "basic", "-l", loops])? * 1000.0)
            }
            // Both ends on one CPU: left to the scheduler, the pair lands on one CPU in some
            // rounds and on two (with cross-CPU wake-ups and idle exits) in others, and the
            // baseline swung 23..57 µs/op between rounds of one run.
            Self::SchedPipe => perf_usecs_pinned(&[
                "bench",
                "sched",
                "pipe",
                "-l",
                if quick { "50000" } else { "200000" },
            ]),
            Self::TcpConnects => tcp_connect_rate(if quick { 5_000 } else { 20_000 }),
        }
    }
}

/// A part of the benchmark run, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Item 1: syscall overhead against syscount -L.
    Syscalls,
    /// Item 2: scheduler overhead against runqlat.
    Sched,
    /// Item 3: TCP connect rate against tcpstates.
    Tcp,
    /// Item 4: loss-free event throughput of both transports.
    Throughput,
    /// Item 5: the agent's footprint with all probes.
    Footprint,
}

struct Comparison {
    part: Part,
    name: &'static str,
    probe: &'static str,
    workload: Workload,
    peer: Config,
    /// Rounds of this comparison per round of the run: more for the workloads whose rate moves
    /// most between runs on a shared machine, so the median ratio settles.
    rounds_per_round: usize,
}

const COMPARISONS: &[Comparison] = &[
    Comparison {
        part: Part::Syscalls,
        name: "syscall overhead (perf bench syscall basic)",
        probe: "syscalls",
        workload: Workload::SyscallBasic,
        peer: Config::Peer("/usr/sbin/syscount", &["-L"]),
        rounds_per_round: 1,
    },
    Comparison {
        part: Part::Sched,
        name: "scheduler overhead (perf bench sched pipe)",
        probe: "sched",
        workload: Workload::SchedPipe,
        peer: Config::Peer("/usr/sbin/runqlat", &[]),
        rounds_per_round: 1,
    },
    Comparison {
        part: Part::Tcp,
        name: "TCP connect rate (loopback connect/close loop)",
        probe: "tcp",
        workload: Workload::TcpConnects,
        peer: Config::Peer("/usr/sbin/tcpstates", &[]),
        // A loopback connect loop swings by 10-20% between runs seconds apart on a busy host.
        rounds_per_round: 3,
    },
];

/// Runs the benchmarks and writes the report.
pub fn bench(root: &Path, quick: bool, only: &[Part]) -> anyhow::Result<()> {
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    if !setup::is_root() {
        bail!("the benchmarks load eBPF programs: run `cargo xtask bench` as root");
    }
    setup::apt(APT)?;
    let load_start = loadavg();
    let foreign = tracing_program_holders();
    if !foreign.is_empty() {
        eprintln!(
            "==> WARNING: other processes hold eBPF tracing programs ({}): every figure, the \
             baseline included, carries their cost; stop them for a clean run",
            foreign.join(", ")
        );
    }
    step("building the agent (release)");
    run(cargo(root).args(["build", "--release", "--package", "agent"]))?;
    let bin = target_dir(root).join("release/tanzhen");
    let rounds = if quick { 3 } else { 5 };
    let mut sections = Vec::new();
    for c in COMPARISONS.iter().filter(|c| wanted(c.part)) {
        if !probe_built(&bin, c.probe) {
            eprintln!(
                "==> skipping {}: probe `{}` is not built into this tanzhen",
                c.name, c.probe
            );
            sections
                .push(json!({ "name": c.name, "skipped": format!("probe {} not built", c.probe) }));
            continue;
        }
        let rounds = rounds * c.rounds_per_round;
        step(&format!(
            "{} — {rounds} rounds of baseline / tanzhen / peer",
            c.name
        ));
        let configs = [Config::Baseline, Config::Tanzhen(c.probe), c.peer.clone()];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
        let mut lost = 0.0;
        for round in 1..=rounds {
            for (i, cfg) in configs.iter().enumerate() {
                let bg = Background::start(cfg, &bin)?;
                let v = c
                    .workload
                    .run(quick)
                    .with_context(|| format!("{} under {}", c.name, cfg.name()))?;
                if let Some(addr) = bg.metrics_addr {
                    // The probes read the kernel's drop counters once a second: wait for the
                    // read that follows the workload.
                    std::thread::sleep(LOST_READ_INTERVAL + Duration::from_millis(200));
                    lost += scrape_sum(addr, "tanzhen_events_lost_total").unwrap_or(f64::NAN);
                }
                drop(bg);
                eprintln!(
                    "    round {round}: {:<28} {v:>12.3} {}",
                    cfg.name(),
                    c.workload.unit()
                );
                samples[i].push(v);
            }
        }
        sections.push(section_json(c, &configs, &samples, lost));
    }
    let throughput = if !wanted(Part::Throughput) {
        json!({ "skipped": "not selected (--only)" })
    } else if probe_built(&bin, "bench") {
        throughput::throughput(&bin, rounds, quick)?
    } else {
        eprintln!("==> skipping event throughput: probe `bench` is not built into this tanzhen");
        json!({ "skipped": "probe bench not built" })
    };
    let footprint = if wanted(Part::Footprint) {
        footprint(&bin, quick)?
    } else {
        json!({ "skipped": "not selected (--only)" })
    };
    let report = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": rounds,
        "quick": quick,
        "load_average_start": load_start,
        "other_tracing_programs_at_start": foreign,
        "load_average_end": loadavg(),
        "comparisons": sections,
        "throughput": throughput,
        "footprint": footprint,
    });
    let dir = target_dir(root).join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = markdown(&report);
    std::fs::write(dir.join("report.md"), &md)?;
    println!("\n{md}");
    eprintln!(
        "==> wrote {} and report.md",
        dir.join("report.json").display()
    );
    Ok(())
}

/// Processes (`comm[pid]`) holding eBPF programs of a tracing type (kprobe, tracepoint, perf
/// event, raw tracepoint, tracing), from /proc/*/fdinfo: a forgotten agent or peer tool would
/// add its cost to every configuration.
fn tracing_program_holders() -> Vec<String> {
    // BPF_PROG_TYPE_KPROBE, _TRACEPOINT, _PERF_EVENT, _RAW_TRACEPOINT, _TRACING.
    const TRACING: &[u32] = &[2, 5, 7, 17, 26];
    let mut out = std::collections::BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines().any(|l| {
                    l.strip_prefix("prog_type:")
                        .and_then(|v| v.trim().parse::<u32>().ok())
                        .is_some_and(|t| TRACING.contains(&t))
                })
            })
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.insert(format!("{}[{pid}]", comm.trim()));
        }
    }
    out.into_iter().collect()
}

/// The 1, 5 and 15 minute load averages (/proc/loadavg): the machine may be shared.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn probe_built(bin: &Path, probe: &str) -> bool {
    Command::new(bin)
        .args(["run", "--probes", probe, "--dry-run"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({ "median": median(v), "min": s.first(), "max": s.last(), "samples": v })
}

/// The median of `v` (NaN when empty).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        f64::midpoint(s[s.len() / 2 - 1], s[s.len() / 2])
    }
}

fn section_json(c: &Comparison, configs: &[Config], samples: &[Vec<f64>], lost: f64) -> Value {
    let (base, ours, peer) = (
        median(&samples[0]),
        median(&samples[1]),
        median(&samples[2]),
    );
    // The same ratio taken within each round (its runs are seconds apart, so a machine that
    // slows down or speeds up between rounds moves both sides), then the median of those.
    let paired = |f: &dyn Fn(f64, f64, f64) -> f64| {
        let per_round: Vec<f64> = (0..samples[0].len())
            .filter_map(|r| {
                Some(f(
                    *samples[0].get(r)?,
                    *samples[1].get(r)?,
                    *samples[2].get(r)?,
                ))
            })
            .collect();
        median(&per_round)
    };
    let derived = if c.workload.lower_is_better() {
        json!({
            "added_by_tanzhen": ours - base,
            "added_by_peer": peer - base,
            "ratio_added_tanzhen_to_peer": (ours - base) / (peer - base),
            "ratio_added_tanzhen_to_peer_paired": paired(&|b, o, p| (o - b) / (p - b)),
        })
    } else {
        json!({
            "tanzhen_vs_baseline": ours / base,
            "peer_vs_baseline": peer / base,
            "tanzhen_vs_baseline_paired": paired(&|b, o, _| o / b),
        })
    };
    json!({
        "name": c.name,
        "rounds": samples[0].len(),
        "unit": c.workload.unit(),
        "configs": configs.iter().enumerate().map(|(i, cfg)| json!({"config": cfg.name(), "stats": stats(&samples[i])})).collect::<Vec<_>>(),
        "derived": derived,
        "tanzhen_events_lost": lost,
    })
}

fn markdown(r: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### tanzhen benchmarks (kernel {}, {} CPUs, {} rounds{}; load average {} at the start, {} at the end)\n",
        r["kernel"].as_str().unwrap_or("?"),
        r["cpus"],
        r["rounds"],
        if r["quick"].as_bool() == Some(true) {
            ", --quick"
        } else {
            ""
        },
        r["load_average_start"].as_str().unwrap_or("?"),
        r["load_average_end"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        md,
        "| benchmark | configuration | median | min | max |\n|---|---|---|---|---|"
    );
    for s in r["comparisons"].as_array().into_iter().flatten() {
        if let Some(why) = s["skipped"].as_str() {
            let _ = writeln!(
                md,
                "| {} | skipped: {why} | | | |",
                s["name"].as_str().unwrap_or("?")
            );
            continue;
        }
        let unit = s["unit"].as_str().unwrap_or("");
        for c in s["configs"].as_array().into_iter().flatten() {
            let st = &c["stats"];
            let f = |k: &str| st[k].as_f64().map_or("?".into(), |v| format!("{v:.3}"));
            let _ = writeln!(
                md,
                "| {} | {} | {} {unit} | {} | {} |",
                s["name"].as_str().unwrap_or("?"),
                c["config"].as_str().unwrap_or("?"),
                f("median"),
                f("min"),
                f("max")
            );
        }
        let d = &s["derived"];
        let derived: Vec<String> = d
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                format!(
                    "{k} = {}",
                    v.as_f64().map_or("?".into(), |x| format!("{x:.3}"))
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "| | {}; events lost {} | | | |",
            derived.join(", "),
            s["tanzhen_events_lost"]
        );
    }
    throughput::markdown(&mut md, &r["throughput"]);
    let f = &r["footprint"];
    let _ = writeln!(
        md,
        "\n| footprint (tanzhen, all probes, under the workloads) | value |\n|---|---|"
    );
    for (k, v) in f.as_object().into_iter().flatten() {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md
}

/// Whatever runs beside the workload; stopped on drop.
struct Background {
    child: Option<Child>,
    metrics_addr: Option<SocketAddr>,
}

impl Background {
    fn start(cfg: &Config, bin: &Path) -> anyhow::Result<Self> {
        match cfg {
            Config::Baseline => Ok(Self {
                child: None,
                metrics_addr: None,
            }),
            Config::Tanzhen(probes) => {
                let (child, addr, _) = start_tanzhen(bin, probes)?;
                keep_off_last_cpu(child.id());
                Ok(Self {
                    child: Some(child),
                    metrics_addr: Some(addr),
                })
            }
            Config::Peer(tool, args) => {
                let child = Command::new(tool)
                    .args(*args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {tool}"))?;
                wait_attached(child.id(), tool)?;
                keep_off_last_cpu(child.id());
                Ok(Self {
                    child: Some(child),
                    metrics_addr: None,
                })
            }
        }
    }
}

/// A CPU mask of `cpus`.
fn cpu_set(cpus: impl IntoIterator<Item = usize>) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data, valid zeroed; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    }
}

/// Moves every thread of process `pid` off the CPU the workloads are pinned to (when there is
/// another), so that tanzhen and the peer tool are compared on what they add inside the
/// workload's syscalls and softirqs, not on where the scheduler happens to put their own
/// threads (a reader woken onto the workload's CPU waits there behind its real-time thread
/// until it is migrated). Threads they start later inherit the mask. Best effort.
fn keep_off_last_cpu(pid: u32) {
    let last = last_cpu();
    if last == 0 {
        return;
    }
    let set = cpu_set(0..last);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            // SAFETY: sched_setaffinity with a valid, initialised cpu_set_t of the given size.
            unsafe {
                libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &raw const set);
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `tanzhen run` on a free loopback port; returns it once /healthz answers, with the
/// time that took.
fn start_tanzhen(bin: &Path, probes: &str) -> anyhow::Result<(Child, SocketAddr, Duration)> {
    start_tanzhen_with(bin, &["--probes", probes])
}

/// [`start_tanzhen`] with `args` (which name the probes) after `run`.
fn start_tanzhen_with(bin: &Path, args: &[&str]) -> anyhow::Result<(Child, SocketAddr, Duration)> {
    start_tanzhen_env(bin, args, &[])
}

/// `tanzhen run ARGS` with extra environment variables; returns once it serves /healthz.
fn start_tanzhen_env(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(Child, SocketAddr, Duration)> {
    let probes = args.join(" ");
    let addr: SocketAddr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .args(["--listen", &addr.to_string(), "--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()?;
    loop {
        if http_get(addr, "/healthz").is_ok_and(|b| b.contains("ok")) {
            return Ok((child, addr, t0.elapsed()));
        }
        if let Some(s) = child.try_wait()? {
            bail!("tanzhen --probes {probes} exited with {s}");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("tanzhen --probes {probes} did not serve within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until a libbpf tool holds a BPF link or perf event (its programs are attached).
fn wait_attached(pid: u32, tool: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let attached = std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
            d.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| {
                    let l = l.to_string_lossy();
                    l.contains("bpf_link") || l.contains("perf_event")
                })
            })
        });
        if attached {
            // Give the rest of its programs a moment to attach.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{tool} attached nothing within 60 s")
}

/// The CPU the single-threaded workloads are pinned to: the last one.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1
}

/// The `usecs/op` of a single-threaded perf benchmark, pinned to the last CPU at real-time
/// priority (`chrt -f 50 taskset -c N`): the probes run inside the benchmark's own syscalls,
/// so this changes no cost being measured, while other work on a shared machine (builds) can
/// no longer preempt it and inflate one configuration's figure at random.
fn perf_usecs_isolated(args: &[&str]) -> anyhow::Result<f64> {
    perf_on_last_cpu(&["chrt", "-f", "50"], args)
}

/// The `usecs/op` of a perf benchmark with every thread of the benchmark on the last CPU
/// (`taskset -c N`), at normal priority.
fn perf_usecs_pinned(args: &[&str]) -> anyhow::Result<f64> {
    perf_on_last_cpu(&[], args)
}

/// `<wrapper...> taskset -c <last CPU> perf <args>`, its `usecs/op`.
fn perf_on_last_cpu(wrapper: &[&str], args: &[&str]) -> anyhow::Result<f64> {
    let last = last_cpu().to_string();
    let mut cmd = wrapper.to_vec();
    cmd.extend_from_slice(&["taskset", "-c", &last, "perf"]);
    cmd.extend_from_slice(args);
    perf_output(cmd[0], &cmd[1..])
}

fn perf_output(program: &str, args: &[&str]) -> anyhow::Result<f64> {
    let out = Command::new(program)
        .args(args)
        .output()
        .context("running perf (apt-get install linux-perf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_suffix("usecs/op")
                .and_then(|v| v.trim().parse().ok())
        })
        .with_context(|| format!("no `usecs/op` in perf's output:\n{text}"))
}

/// How often the probes read the kernel's drop counters into `tanzhen_events_lost_total`.
const LOST_READ_INTERVAL: Duration = Duration::from_secs(1);

/// Connects per second of a loopback connect/accept/close loop. One thread does both ends:
/// on loopback `connect` returns with the handshake done, so `accept` finds the connection
/// queued and nothing waits on another thread's scheduling (a separate accept thread starved
/// on a busy machine let the backlog overflow, and every dropped SYN cost a 1 s retransmit).
/// The client closes with RST (SO_LINGER 0), so no TIME_WAIT exhausts the ports across rounds.
///
/// The loop runs in a thread pinned to the last CPU at real-time priority, like the syscall
/// benchmark (see [`perf_usecs_isolated`]): the probe runs inside its syscalls and softirqs.
fn tcp_connect_rate(n: usize) -> anyhow::Result<f64> {
    std::thread::spawn(move || {
        isolate_this_thread();
        tcp_connect_loop(n)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connect loop panicked"))?
}

/// Pins the calling thread to the last CPU and gives it SCHED_FIFO priority 50 (best effort:
/// a failure only makes the figures noisier, so it is reported, not fatal).
fn isolate_this_thread() {
    let set = cpu_set(last_cpu()..=last_cpu());
    // SAFETY: plain syscalls on the calling thread with correctly sized, initialised arguments.
    unsafe {
        let param = libc::sched_param { sched_priority: 50 };
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0
            || libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) != 0
        {
            eprintln!(
                "    (could not pin the workload at real-time priority: {})",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn tcp_connect_loop(n: usize) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let t0 = Instant::now();
    for _ in 0..n {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        // SAFETY: setsockopt with a valid fd and a correctly sized option value.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                u32::try_from(size_of::<libc::linger>()).unwrap_or(8),
            )
        };
        if rc != 0 {
            bail!("setsockopt(SO_LINGER): {}", std::io::Error::last_os_error());
        }
        drop(client);
        drop(server);
    }
    let secs = t0.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "n is small")]
    Ok(n as f64 / secs)
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn scrape_sum(addr: SocketAddr, metric: &str) -> anyhow::Result<f64> {
    let body = http_get(addr, "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// RSS, CPU, BPF map memory and start-up of tanzhen with every built probe under the workloads.
fn footprint(bin: &Path, quick: bool) -> anyhow::Result<Value> {
    let probes: Vec<&str> = ["tcp", "syscalls", "sched"]
        .into_iter()
        .filter(|p| probe_built(bin, p))
        .collect();
    let probes = probes.join(",");
    step(&format!(
        "footprint: tanzhen --probes {probes} under the workloads"
    ));
    let (child, addr, startup) = start_tanzhen(bin, &probes)?;
    let pid = child.id();
    let bg = Background {
        child: Some(child),
        metrics_addr: Some(addr),
    };
    let warm = status_kib(pid, "VmRSS:");
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    for w in [
        Workload::SyscallBasic,
        Workload::SchedPipe,
        Workload::TcpConnects,
    ] {
        w.run(quick)?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let map_kib = bpf_map_memlock_kib(pid);
    let report = json!({
        "probes": probes,
        "startup_to_serving_s": startup.as_secs_f64(),
        "rss_after_start_kib": warm,
        "rss_steady_kib": status_kib(pid, "VmRSS:"),
        "rss_peak_kib": status_kib(pid, "VmHWM:"),
        "rss_anon_kib": status_kib(pid, "RssAnon:"),
        "rss_file_kib": status_kib(pid, "RssFile:"),
        "rss_shmem_kib": status_kib(pid, "RssShmem:"),
        "cpu_seconds_per_minute": cpu / elapsed * 60.0,
        "workload_seconds": elapsed,
        "bpf_map_memlock_kib": map_kib,
        "events_lost": scrape_sum(addr, "tanzhen_events_lost_total").unwrap_or(f64::NAN),
    });
    drop(bg);
    Ok(report)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm: utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    #[expect(
        clippy::cast_precision_loss,
        reason = "clock ticks per second are small"
    )]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Sum of the `memlock:` the kernel charges for each BPF map fd the process holds.
fn bpf_map_memlock_kib(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let mut total = 0;
    for e in dir.flatten() {
        if !std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf-map")) {
            continue;
        }
        let info: PathBuf =
            format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()).into();
        if let Ok(text) = std::fs::read_to_string(info) {
            total += text
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total / 1024
}
