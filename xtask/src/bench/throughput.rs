//! Item 4 of `cargo xtask bench`: event throughput of each transport. A forked generator pinned
//! to one CPU calls `getppid` at a stepped target rate; tanzhen runs with the hidden
//! `--probes bench --pid <generator>` (one 16-byte event per call) on the other CPUs, with
//! `--transport ringbuf` and then `perf`. Each step runs for a few seconds; the first step with
//! any loss ends the run. The figure is the highest loss-free step: its achieved call rate,
//! the events per second the agent drained, and the agent's CPU seconds per million events
//! (utime + stime from /proc/<pid>/stat).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{cpu_seconds, scrape_sum, start_tanzhen_env, stats};
use crate::step;

/// Target rates (events per second); `u64::MAX` = as fast as the generator can call.
const STEPS: &[u64] = &[250_000, 500_000, 1_000_000, 2_000_000, 4_000_000, u64::MAX];

/// The bench probe's ring buffer (agent-common's `BENCH_EVENTS_BYTES`).
const BENCH_RING_BYTES: u64 = 4 * 1024 * 1024;

/// What is measured: (name, `--transport`, events per getppid call). One event per call is the
/// figure of record; one generator thread on this kind of machine cannot make more than about
/// 1.5 M calls/s, so four events per call (`TANZHEN_BENCH_EVENTS_PER_CALL`) show what the ring
/// buffer drains beyond that.
const MODES: &[(&str, &str, u32)] = &[
    ("ringbuf", "ringbuf", 1),
    ("perf", "perf", 1),
    ("ringbuf, 4 events per call", "ringbuf", 4),
];

/// One generator step's command and result on the pipes: (rate, duration ms) in, (calls,
/// elapsed ns) out.
type Pair = [u64; 2];

/// A forked child pinned to one CPU that calls `getppid` at a commanded rate.
struct Generator {
    pid: libc::pid_t,
    cmd: libc::c_int,
    res: libc::c_int,
}

impl Generator {
    fn spawn(cpu: usize) -> anyhow::Result<Self> {
        let (mut cmd, mut res) = ([0; 2], [0; 2]);
        // SAFETY: pipes and fork; after fork the child only makes raw syscalls on its own
        // stack (no allocation, no locks), then `_exit`s.
        unsafe {
            if libc::pipe2(cmd.as_mut_ptr(), libc::O_CLOEXEC) != 0
                || libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC) != 0
            {
                bail!("pipe2: {}", std::io::Error::last_os_error());
            }
            let pid = libc::fork();
            if pid < 0 {
                bail!("fork: {}", std::io::Error::last_os_error());
            }
            if pid == 0 {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
                libc::prctl(libc::PR_SET_NAME, c"tz-bench-gen".as_ptr());
                generator_loop(cmd[0], res[1]);
                libc::_exit(0);
            }
            libc::close(cmd[0]);
            libc::close(res[1]);
            Ok(Self {
                pid,
                cmd: cmd[1],
                res: res[0],
            })
        }
    }

    /// Runs one step: `rate` calls/s (`u64::MAX`: unlimited) for `dur`; returns (calls, elapsed).
    fn run(&self, rate: u64, dur: Duration) -> anyhow::Result<(u64, Duration)> {
        let c: Pair = [rate, u64::try_from(dur.as_millis()).unwrap_or(u64::MAX)];
        let mut r: Pair = [0; 2];
        // SAFETY: our own pipe fds and plain buffers of 16 bytes.
        let (w, n) = unsafe {
            (
                libc::write(self.cmd, c.as_ptr().cast(), 16),
                libc::read(self.res, r.as_mut_ptr().cast(), 16),
            )
        };
        if w != 16 || n != 16 {
            bail!("the load generator died");
        }
        Ok((r[0], Duration::from_nanos(r[1])))
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // SAFETY: our own fds and child; a zero rate ends the generator.
        unsafe {
            let quit: Pair = [0; 2];
            libc::write(self.cmd, quit.as_ptr().cast(), 16);
            libc::close(self.cmd);
            libc::close(self.res);
            let mut status = 0;
            libc::waitpid(self.pid, &raw mut status, 0);
        }
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The generator child's loop: commands until a zero rate or EOF. Calls come in batches of
/// about 0.5 ms worth; after each batch the child sleeps until the schedule catches up.
fn generator_loop(cmd: libc::c_int, res: libc::c_int) {
    loop {
        let mut c: Pair = [0; 2];
        // SAFETY: 16-byte buffers and our own pipe fds.
        if unsafe { libc::read(cmd, c.as_mut_ptr().cast(), 16) } != 16 || c[0] == 0 {
            return;
        }
        let (rate, dur_ns) = (c[0], c[1].saturating_mul(1_000_000));
        let batch = if rate == u64::MAX {
            4_096
        } else {
            (rate / 2_000).max(16)
        };
        let start = now_ns();
        let mut calls = 0u64;
        let mut elapsed = 0;
        while elapsed < dur_ns {
            for _ in 0..batch {
                // SAFETY: getppid has no arguments and cannot fail.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            calls += batch;
            elapsed = now_ns() - start;
            if rate != u64::MAX {
                let due = u64::try_from(u128::from(calls) * 1_000_000_000 / u128::from(rate))
                    .unwrap_or(u64::MAX);
                if due > elapsed + 20_000 {
                    let ns = (due - elapsed).min(dur_ns);
                    let ts = libc::timespec {
                        tv_sec: libc::time_t::try_from(ns / 1_000_000_000).unwrap_or(0),
                        tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
                    };
                    // SAFETY: a valid timespec; an early wake-up only shortens the sleep.
                    unsafe { libc::nanosleep(&raw const ts, std::ptr::null_mut()) };
                    elapsed = now_ns() - start;
                }
            }
        }
        let r: Pair = [calls, elapsed];
        // SAFETY: 16-byte buffer, our own pipe fd.
        if unsafe { libc::write(res, r.as_ptr().cast(), 16) } != 16 {
            return;
        }
    }
}

/// Pins `pid` (the agent) to every CPU but `gen_cpu` (nothing to do on one CPU).
fn pin_away(pid: u32, gen_cpu: usize, cpus: usize) {
    if cpus < 2 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is empty; sched_setaffinity on a child we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in (0..cpus).filter(|&c| c != gen_cpu) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(
            libc::pid_t::try_from(pid).unwrap_or(0),
            size_of::<libc::cpu_set_t>(),
            &raw const set,
        );
    }
}

fn rate_name(r: u64) -> String {
    if r == u64::MAX {
        "unlimited".into()
    } else {
        format!("{}k/s", r / 1_000)
    }
}

/// The figures of one step.
struct Step {
    /// Target events per second.
    target: u64,
    per_call: u32,
    /// Generator calls per second actually made.
    achieved: f64,
    calls: u64,
    events: u64,
    lost: u64,
    /// Events per second the agent read, from the step's start to the last event read.
    drained: f64,
    cpu_s: f64,
}

impl Step {
    fn loss_free(&self) -> bool {
        self.lost == 0 && self.events == self.calls * u64::from(self.per_call)
    }

    /// Events per second offered (calls made x events per call).
    fn offered(&self) -> f64 {
        self.achieved * f64::from(self.per_call)
    }

    fn cpu_per_million(&self) -> f64 {
        #[expect(
            clippy::cast_precision_loss,
            reason = "event counts are far below 2^52"
        )]
        let m = self.events as f64 / 1e6;
        self.cpu_s / m
    }

    fn json(&self) -> Value {
        json!({
            "target_events_per_s": if self.target == u64::MAX { Value::from("unlimited") } else { Value::from(self.target) },
            "events_per_call": self.per_call,
            "achieved_calls_per_s": self.achieved,
            "offered_events_per_s": self.offered(),
            "calls": self.calls,
            "events": self.events,
            "lost": self.lost,
            "drained_events_per_s": self.drained,
            "agent_cpu_s": self.cpu_s,
            "agent_cpu_s_per_million_events": self.cpu_per_million(),
        })
    }
}

fn read_counts(addr: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let events = scrape_sum(addr, "tanzhen_bench_events_total")?;
    let lost = scrape_sum(addr, "tanzhen_events_lost_total{probe=\"bench\"")?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "counters are non-negative integers"
    )]
    Ok((events as u64, lost as u64))
}

/// One step: run the generator, then wait (up to 5 s) for the agent to read every event.
fn step_once(
    g: &Generator,
    addr: SocketAddr,
    agent_pid: u32,
    (rate, per_call): (u64, u32),
    dur: Duration,
) -> anyhow::Result<Step> {
    let (e0, l0) = read_counts(addr)?;
    let cpu0 = cpu_seconds(agent_pid);
    let t0 = Instant::now();
    let call_rate = if rate == u64::MAX {
        rate
    } else {
        rate / u64::from(per_call)
    };
    let (calls, elapsed) = g.run(call_rate, dur)?;
    let expected = calls * u64::from(per_call);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut e, mut l) = read_counts(addr)?;
    let mut last_read = t0.elapsed();
    while e - e0 + (l - l0) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let (e1, l1) = read_counts(addr)?;
        if e1 != e {
            last_read = t0.elapsed();
        }
        (e, l) = (e1, l1);
    }
    // Per-CPU drop counters are exported every 0.5 s: one more look after they settle.
    std::thread::sleep(Duration::from_millis(600));
    let (e1, l1) = read_counts(addr)?;
    if e1 != e {
        last_read = t0.elapsed();
    }
    (e, l) = (e1, l1);
    let cpu_s = cpu_seconds(agent_pid) - cpu0;
    #[expect(
        clippy::cast_precision_loss,
        reason = "event counts are far below 2^52"
    )]
    let per_s = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(Step {
        target: rate,
        per_call,
        achieved: per_s(calls, elapsed),
        calls,
        events: e - e0,
        lost: l - l0,
        drained: per_s(e - e0, last_read.max(elapsed)),
        cpu_s,
    })
}

/// One run over the steps for a mode of [`MODES`]; stops at the first step with loss.
fn run_once(
    bin: &Path,
    (name, transport, per_call): (&str, &str, u32),
    dur: Duration,
    (gen_cpu, cpus): (usize, usize),
) -> anyhow::Result<Vec<Step>> {
    let g = Generator::spawn(gen_cpu)?;
    let pid = g.pid.to_string();
    let (child, addr, _) = start_tanzhen_env(
        bin,
        &["--probes", "bench", "--pid", &pid, "--transport", transport],
        &[("TANZHEN_BENCH_EVENTS_PER_CALL", &per_call.to_string())],
    )?;
    let agent_pid = child.id();
    let bg = super::Background {
        child: Some(child),
        metrics_addr: Some(addr),
    };
    pin_away(agent_pid, gen_cpu, cpus);
    let mut steps = Vec::new();
    for &rate in STEPS {
        let s = step_once(&g, addr, agent_pid, (rate, per_call), dur)
            .with_context(|| format!("{name} at {}", rate_name(rate)))?;
        eprintln!(
            "      {name:<7} {:>10}: {:>11.0} events/s offered, {:>9} events, {:>7} lost, {:>11.0} drained/s, {:.3} agent CPU s per M events",
            rate_name(rate),
            s.offered(),
            s.events,
            s.lost,
            s.drained,
            s.cpu_per_million()
        );
        let stop = !s.loss_free();
        steps.push(s);
        if stop {
            break;
        }
    }
    drop(bg);
    drop(g);
    Ok(steps)
}

/// Runs `rounds` rounds (each: ringbuf then perf) and returns the report section.
pub fn throughput(bin: &Path, rounds: usize, quick: bool) -> anyhow::Result<Value> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let gen_cpu = cpus - 1;
    let dur = Duration::from_millis(if quick { 1_000 } else { 3_000 });
    let rounds = if quick { rounds.min(2) } else { rounds };
    step(&format!(
        "event throughput — {rounds} rounds of {}, steps {} of {} s (generator on CPU {gen_cpu})",
        MODES.iter().map(|m| m.0).collect::<Vec<_>>().join(" / "),
        STEPS
            .iter()
            .map(|&r| rate_name(r))
            .collect::<Vec<_>>()
            .join(", "),
        dur.as_secs_f64()
    ));
    let mut out = Vec::new();
    let mut per: Vec<Vec<Vec<Step>>> = MODES.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, &mode) in MODES.iter().enumerate() {
            eprintln!("    round {round}: {}", mode.0);
            per[i].push(run_once(bin, mode, dur, (gen_cpu, cpus))?);
        }
    }
    for (i, &(t, _, per_call)) in MODES.iter().enumerate() {
        // Per round: the last loss-free step (None when even the first step lost events).
        let best: Vec<Option<&Step>> = per[i]
            .iter()
            .map(|steps| steps.iter().take_while(|s| s.loss_free()).last())
            .collect();
        let col = |f: &dyn Fn(&Step) -> f64| -> Vec<f64> {
            best.iter().map(|b| b.map_or(0.0, f)).collect()
        };
        let first_loss: Vec<Value> = per[i]
            .iter()
            .map(|steps| {
                steps
                    .iter()
                    .find(|s| !s.loss_free())
                    .map_or(Value::Null, |s| Value::from(rate_name(s.target)))
            })
            .collect();
        // No step lost anything: the generator, not the transport, set the ceiling.
        let generator_limited: Vec<bool> = per[i]
            .iter()
            .map(|steps| steps.iter().all(Step::loss_free))
            .collect();
        out.push(json!({
            "transport": t,
            "events_per_call": per_call,
            "generator_limited": generator_limited,
            "max_loss_free_step": best.iter().map(|b| b.map_or(Value::Null, |s| Value::from(rate_name(s.target)))).collect::<Vec<_>>(),
            "first_step_with_loss": first_loss,
            "max_loss_free_events_per_s": stats(&col(&Step::offered)),
            "drained_events_per_s": stats(&col(&|s| s.drained)),
            "agent_cpu_s_per_million_events": stats(&col(&Step::cpu_per_million)),
            "rounds": per[i].iter().map(|steps| steps.iter().map(Step::json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        }));
    }
    Ok(json!({
        "name": "event throughput (bench probe: 16-byte events, one or four per getppid)",
        "step_seconds": dur.as_secs_f64(),
        "generator_cpu": gen_cpu,
        "ring_buffer_bytes": BENCH_RING_BYTES,
        "perf_buffer_bytes_per_cpu": 16 * 4096,
        "transports": out,
    }))
}

/// Markdown rows of the section.
pub fn markdown(md: &mut String, t: &Value) {
    use std::fmt::Write as _;
    if t.is_null() {
        return;
    }
    if let Some(why) = t["skipped"].as_str() {
        let _ = writeln!(md, "\nevent throughput: skipped ({why})");
        return;
    }
    let _ = writeln!(
        md,
        "\n| event throughput ({} s steps, stop at first loss) | median | min | max |\n|---|---|---|---|",
        t["step_seconds"]
    );
    for tr in t["transports"].as_array().into_iter().flatten() {
        let name = tr["transport"].as_str().unwrap_or("?");
        for (key, label) in [
            (
                "max_loss_free_events_per_s",
                "highest loss-free rate, events/s",
            ),
            ("drained_events_per_s", "drained at that step, events/s"),
            (
                "agent_cpu_s_per_million_events",
                "agent CPU s per million events",
            ),
        ] {
            let st = &tr[key];
            let f = |k: &str| {
                st[k].as_f64().map_or("?".into(), |v| {
                    if v >= 1000.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.3}")
                    }
                })
            };
            let _ = writeln!(
                md,
                "| {name}: {label} | {} | {} | {} |",
                f("median"),
                f("min"),
                f("max")
            );
        }
        let _ = writeln!(
            md,
            "| {name}: last loss-free step per round / first with loss / no loss even at the generator's maximum (then a lower bound) | {} / {} / {} | | |",
            tr["max_loss_free_step"], tr["first_step_with_loss"], tr["generator_limited"]
        );
    }
}
