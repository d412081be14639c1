//! System call counts, errors and latency on `raw_syscalls:sys_enter` / `sys_exit`, aggregated
//! in the kernel.
//!
//! Why these hooks: they fire for every syscall of every process with the number and the return
//! value as plain fields, exist on 4.19 and need no per-syscall attach. Every syscall pays for
//! them, so the programs do as little as possible (DESIGN.md "Performance levers"):
//!
//! - `id` and `ret` are loaded straight from the record at fixed offsets that userspace checks
//!   against tracefs before attaching (no `bpf_probe_read` call);
//! - calls are counted at entry in a per-CPU hash keyed by (tgid, nr) (so `clone` counts once
//!   and `exit_group` counts at all); errors at exit, where the hash is touched only when the
//!   call failed; the open family is counted at exit per errno (`tanzhen_file_opens_total`);
//! - the start time per thread lives in an LRU hash whose slot is overwritten in place at entry
//!   and zeroed at exit, never inserted and deleted per call;
//! - latency goes into a per-CPU array row per syscall number (log2 slots plus a ns sum).
//!
//! Counts are written to one of two map generations chosen by [`SYSCALL_CONFIG`]; userspace
//! flips the generation and drains the idle one, so no increment is lost to a read/delete race.
//! A full generation is counted in [`SYSCALL_LOST`], never silent.

use agent_common::{
    COMM_LEN,
    syscalls::{
        SYS_EXIT_RET_OFFSET, SYS_ID_OFFSET, SYSCALL_COUNTS_MAX, SYSCALL_HIST_ROWS,
        SYSCALL_HIST_SLOTS, SYSCALL_HIST_SUM, SYSCALL_LOST_MAP_FULL, SYSCALL_LOST_REASONS,
        SYSCALL_START_MAX, SyscallConfig, SyscallHistRow, SyscallKey, SyscallStat, hist_row,
        hist_slot, is_error,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};

use crate::config::tgid_allowed;

// Not preallocated: a preallocated per-CPU hash reserves max_entries x CPUs values up front,
// and before 5.10 a reused preallocated element kept other CPUs' stale values.
#[map]
static SYSCALL_COUNTS_0: PerCpuHashMap<SyscallKey, SyscallStat> =
    PerCpuHashMap::with_max_entries(SYSCALL_COUNTS_MAX, BPF_F_NO_PREALLOC);

#[map]
static SYSCALL_COUNTS_1: PerCpuHashMap<SyscallKey, SyscallStat> =
    PerCpuHashMap::with_max_entries(SYSCALL_COUNTS_MAX, BPF_F_NO_PREALLOC);

#[map]
static SYSCALL_HIST: PerCpuArray<SyscallHistRow> =
    PerCpuArray::with_max_entries(SYSCALL_HIST_ROWS, 0);

#[map]
static SYSCALL_START: LruHashMap<u32, u64> = LruHashMap::with_max_entries(SYSCALL_START_MAX, 0);

#[map]
static SYSCALL_CONFIG: Array<SyscallConfig> = Array::with_max_entries(1, 0);

#[map]
static SYSCALL_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(SYSCALL_LOST_REASONS, 0);

/// `raw_syscalls:sys_enter` (kernel >= 2.6.33):
/// <https://elixir.bootlin.com/linux/v6.1/source/include/trace/events/syscalls.h>
#[tracepoint]
pub fn syscalls_sys_enter(ctx: TracePointContext) -> u32 {
    on_enter(&ctx);
    0
}

/// `raw_syscalls:sys_exit` (kernel >= 2.6.33), see [`syscalls_sys_enter`].
#[tracepoint]
pub fn syscalls_sys_exit(ctx: TracePointContext) -> u32 {
    on_exit(&ctx);
    0
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !tgid_allowed(tgid) {
        return;
    }
    let Some(cfg) = SYSCALL_CONFIG.get(0) else {
        return;
    };
    // SAFETY: the record is at least SYS_ID_OFFSET + 8 bytes (checked against tracefs).
    let nr = unsafe { *(ctx.as_ptr().cast::<u8>().add(SYS_ID_OFFSET as usize) as *const i64) };
    if nr >= 0 && !is_open(cfg, nr as u32) {
        let key = SyscallKey {
            tgid,
            nr: nr as u32,
            errno: 0,
        };
        count(cfg.generation, &key, 1, 0);
    }
    // Last, so the measured latency leaves out our own bookkeeping.
    let tid = pid_tgid as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    match SYSCALL_START.get_ptr_mut(&tid) {
        Some(p) => unsafe { *p = now },
        // LRU: a full map evicts the least recently used thread instead of failing.
        None => {
            let _ = SYSCALL_START.insert(&tid, &now, 0);
        }
    }
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    // First, so the measured latency leaves out our own bookkeeping.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !tgid_allowed(tgid) {
        return;
    }
    let Some(cfg) = SYSCALL_CONFIG.get(0) else {
        return;
    };
    // SAFETY: the sys_exit record is at least SYS_EXIT_RET_OFFSET + 8 bytes (checked).
    let (nr, ret) = unsafe {
        let base = ctx.as_ptr().cast::<u8>();
        (
            *(base.add(SYS_ID_OFFSET as usize) as *const i64),
            *(base.add(SYS_EXIT_RET_OFFSET as usize) as *const i64),
        )
    };
    if nr < 0 {
        return;
    }
    let tid = pid_tgid as u32;
    // A thread with no start slot (or a zeroed one) entered before we attached, or is a new
    // thread returning from clone: no latency for it.
    if let Some(p) = SYSCALL_START.get_ptr_mut(&tid) {
        let start = unsafe { *p };
        if start != 0 && now >= start {
            unsafe { *p = 0 };
            record_latency(nr as u64, now - start);
        }
    }
    let failed = is_error(ret);
    if is_open(cfg, nr as u32) {
        let key = SyscallKey {
            tgid,
            nr: nr as u32,
            errno: if failed { (-ret) as u32 } else { 0 },
        };
        count(cfg.generation, &key, 1, u64::from(failed));
    } else if failed {
        let key = SyscallKey {
            tgid,
            nr: nr as u32,
            errno: 0,
        };
        count(cfg.generation, &key, 0, 1);
    }
}

#[inline(always)]
fn is_open(cfg: &SyscallConfig, nr: u32) -> bool {
    nr == cfg.open_nrs[0] || nr == cfg.open_nrs[1] || nr == cfg.open_nrs[2]
}

#[inline(always)]
fn record_latency(nr: u64, ns: u64) {
    let Some(row) = SYSCALL_HIST.get_ptr_mut(hist_row(nr)) else {
        return;
    };
    // The verifier must see the slot bounded (AYA-NOTES.md §6): `min` keeps it in the row.
    let slot = hist_slot(ns).min(SYSCALL_HIST_SLOTS - 1);
    unsafe {
        let base = row.cast::<u64>();
        *base.add(slot) += 1;
        *base.add(SYSCALL_HIST_SUM) += ns;
    }
}

#[inline(always)]
fn count(generation: u32, key: &SyscallKey, calls: u64, errors: u64) {
    if generation == 0 {
        bump(&SYSCALL_COUNTS_0, key, calls, errors);
    } else {
        bump(&SYSCALL_COUNTS_1, key, calls, errors);
    }
}

#[inline(always)]
fn bump(map: &PerCpuHashMap<SyscallKey, SyscallStat>, key: &SyscallKey, calls: u64, errors: u64) {
    if let Some(s) = map.get_ptr_mut(key) {
        // Per-CPU value: no other CPU writes it, and programs do not nest on a CPU here.
        unsafe {
            (*s).calls += calls;
            (*s).errors += errors;
        }
        return;
    }
    let v = SyscallStat {
        calls,
        errors,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if map.insert(key, &v, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    // Another CPU may have inserted the key in between (EEXIST): add to our slot of it.
    if let Some(s) = map.get_ptr_mut(key) {
        unsafe {
            (*s).calls += calls;
            (*s).errors += errors;
        }
    } else if let Some(p) = SYSCALL_LOST.get_ptr_mut(SYSCALL_LOST_MAP_FULL) {
        unsafe { *p += calls.max(errors) };
    }
}
