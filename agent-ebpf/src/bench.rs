//! Bench probe (hidden, `--probes bench`): one [`BenchEvent`] (or `events_per_call` of them) per
//! call of the configured syscall (`getppid`) by the `--pid` process, sent through the event
//! transport, so `cargo xtask bench` can measure how many events per second the transport
//! drains with zero loss.
//!
//! A raw `sys_enter` tracepoint (kernel >= 4.17): no trace record is built, the syscall number is
//! the second tracepoint argument. Every full buffer or failed output is counted in
//! [`BENCH_LOST`].

use agent_common::bench::{
    BENCH_EVENTS_BYTES, BENCH_LOST_REASONS, BENCH_LOST_RINGBUF_FULL, BENCH_MAX_EVENTS_PER_CALL,
    BenchConfig, BenchEvent,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::{Array, PerCpuArray},
    programs::RawTracePointContext,
};

use crate::{config::tgid_allowed, field, transport::Events};

#[map]
static BENCH_EVENTS: Events<BenchEvent, BENCH_EVENTS_BYTES> = Events::new();

#[map]
static BENCH_CONFIG: Array<BenchConfig> = Array::with_max_entries(1, 0);

#[map]
static BENCH_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(BENCH_LOST_REASONS, 0);

/// Raw tracepoint `sys_enter(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn bench_sys_enter(ctx: RawTracePointContext) -> i32 {
    on_enter(&ctx);
    0
}

#[inline(always)]
fn on_enter(ctx: &RawTracePointContext) {
    let Some(cfg) = BENCH_CONFIG.get(0) else {
        return;
    };
    let nr: i64 = ctx.arg(1);
    if nr != i64::from(cfg.nr) {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !tgid_allowed((pid_tgid >> 32) as u32) {
        return;
    }
    // Unrolled by hand (LLVM kept the loop in the perf object): no back-edge for 4.19's
    // verifier. One event always, then one more per `n > i`, up to BENCH_MAX_EVENTS_PER_CALL.
    let n = cfg.events_per_call;
    emit(ctx, pid_tgid);
    macro_rules! more {
        ($($i:literal)*) => { $( if n > $i { emit(ctx, pid_tgid); } )* };
    }
    more!(1 2 3 4 5 6 7);
    const _: () = assert!(BENCH_MAX_EVENTS_PER_CALL == 8);
}

#[inline(always)]
fn emit(ctx: &RawTracePointContext, pid_tgid: u64) {
    let Some(mut entry) = BENCH_EVENTS.reserve() else {
        field::per_cpu_add(&BENCH_LOST, BENCH_LOST_RINGBUF_FULL, 1);
        return;
    };
    entry.write(BenchEvent {
        pid_tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    });
    if entry.submit(ctx).is_err() {
        field::per_cpu_add(&BENCH_LOST, BENCH_LOST_RINGBUF_FULL, 1);
    }
}
