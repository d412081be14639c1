//! Bench probe, userspace side (hidden: `--probes bench` only, never in `all` or `tanzhen
//! probes`): attaches the raw `sys_enter` program that sends one 16-byte event per `getppid`
//! call of the `--pid` process, and counts the events it drains in
//! `tanzhen_bench_events_total`. `cargo xtask bench` drives it to find the highest event rate
//! each transport drains with zero loss. `TANZHEN_BENCH_EVENTS_PER_CALL=N` (1..=8, default 1)
//! makes each call send N events, so one generator thread can offer more events per second
//! than it can make calls.
//!
//! Drops feed `tanzhen_events_lost_total{probe="bench",reason}` (`ringbuf_full`, or `perf_lost`
//! and `perf_output_error` on the perf transport); decoding stays minimal (a size check) so the
//! figure measures the transport, not the metrics.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use agent_common::bench::{
    BENCH_CONFIG, BENCH_EVENT_SIZE, BENCH_EVENTS, BENCH_LOST, BENCH_LOST_REASONS,
    BENCH_LOST_RINGBUF_FULL, BENCH_MAX_EVENTS_PER_CALL, BenchConfig,
};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray},
    programs::RawTracePoint,
};
use tokio::sync::watch;

use crate::{
    probe::{ProbeError, program, take, tcp::LossCounters},
    snapshot::{CounterVec, Desc, Snapshot},
    transport::{EventReader, Transport},
};

const PROBE: &str = "bench";

/// The program (attached to the `sys_enter` raw tracepoint).
pub const PROGRAM: &str = "bench_sys_enter";
/// [`PROGRAM`], as the list the agent unloads on detach.
pub const PROGRAMS: &[&str] = &[PROGRAM];

/// Label values of the drop reasons, indexed like `BENCH_LOST_*`.
fn lost_reasons(transport: Transport) -> [&'static str; BENCH_LOST_REASONS as usize] {
    let mut r = [""; BENCH_LOST_REASONS as usize];
    r[BENCH_LOST_RINGBUF_FULL as usize] = transport.kernel_drop_reason();
    r
}

/// Registers `tanzhen_bench_events_total` (no labels).
fn register(snapshot: &Snapshot) -> Arc<CounterVec> {
    let c = snapshot.counter(Desc {
        name: "tanzhen_bench_events",
        help: "Events of the bench probe (one per getppid call of the --pid process) read from the event transport.",
        labels: &[],
    });
    c.persistent();
    c.inc_by(&[], 0);
    c
}

/// `TANZHEN_BENCH_EVENTS_PER_CALL`, 1 when unset.
fn events_per_call() -> Result<u32, ProbeError> {
    const VAR: &str = "TANZHEN_BENCH_EVENTS_PER_CALL";
    let Ok(v) = std::env::var(VAR) else {
        return Ok(1);
    };
    v.parse()
        .ok()
        .filter(|n| (1..=BENCH_MAX_EVENTS_PER_CALL).contains(n))
        .ok_or_else(|| ProbeError::Unsupported {
            probe: PROBE,
            reason: format!(
                "{VAR}={v:?} is not a number of events per call from 1 to {BENCH_MAX_EVENTS_PER_CALL}"
            ),
        })
}

/// The attached bench probe, ready to drain.
pub struct BenchProbe {
    events: EventReader,
    transport: Transport,
    lost: PerCpuArray<MapData, u64>,
    counter: Arc<CounterVec>,
    loss: LossCounters,
}

impl BenchProbe {
    /// Writes the syscall number, opens the reader, loads and attaches the program.
    pub fn attach(
        ebpf: &mut Ebpf,
        transport: Transport,
        snapshot: &Snapshot,
        loss: LossCounters,
    ) -> Result<Self, ProbeError> {
        let mut cfg: Array<MapData, BenchConfig> = take(ebpf, BENCH_CONFIG)?;
        let nr = u32::try_from(libc::SYS_getppid).unwrap_or(u32::MAX);
        let events_per_call = events_per_call()?;
        cfg.set(
            0,
            BenchConfig {
                nr,
                events_per_call,
            },
            0,
        )?;
        // Readers first: a perf event array has no buffer for a CPU until it is opened.
        let events = EventReader::open(ebpf, BENCH_EVENTS, transport)?;
        let prog: &mut RawTracePoint = program(ebpf, PROGRAM)?;
        prog.load()?;
        prog.attach("sys_enter")?;
        Ok(Self {
            events,
            transport,
            lost: take(ebpf, BENCH_LOST)?,
            counter: register(snapshot),
            loss,
        })
    }

    /// Counts events as they arrive until `stop` turns true, then counts what is left (the
    /// program is detached by then). The counter is updated once per batch, not per event.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ProbeError> {
        let Self {
            mut events,
            transport,
            lost,
            counter,
            loss,
        } = self;
        let perf_lost = events.lost();
        let reasons = lost_reasons(transport);
        let export_lost = || {
            loss.read_kernel(PROBE, &lost, &reasons);
            loss.read_perf(PROBE, transport, &perf_lost);
        };
        export_lost();
        // Only this task touches them: plain load/store, no locked read-modify-write per event.
        let (good, bad) = (AtomicU64::new(0), AtomicU64::new(0));
        let bump = |c: &AtomicU64| c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let mut on_record = |bytes: &[u8]| {
            bump(if bytes.len() >= BENCH_EVENT_SIZE {
                &good
            } else {
                &bad
            });
        };
        let flush = || {
            counter.inc_by(&[], good.swap(0, Ordering::Relaxed));
            let b = bad.swap(0, Ordering::Relaxed);
            if b > 0 {
                loss.decode_errors.inc_by(&[PROBE], b);
            }
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                res = events.read(&mut on_record) => res?,
                _ = tick.tick() => export_lost(),
                _ = stop.changed() => break,
            }
            flush();
        }
        events.drain(&mut on_record);
        flush();
        export_lost();
        Ok(())
    }
}
