//! System call counts, errors and latency on the `sys_enter` / `sys_exit` raw tracepoints,
//! aggregated in the kernel.
//!
//! Why these hooks: they fire for every syscall of every process, exist on 4.19 (raw
//! tracepoints since 4.17) and need no per-syscall attach. Every syscall pays for them, so the
//! programs do as little as possible (DESIGN.md "Performance levers"):
//!
//! - raw tracepoints rather than the classic `raw_syscalls:*` ones: the kernel builds no trace
//!   record; `id` (enter) and `ret` (exit) are tracepoint arguments read straight from the
//!   context, and the exit takes the syscall number from the thread's start slot (no `pt_regs`
//!   read, nothing arch-specific);
//! - calls are counted at entry (so `clone` counts once and `exit_group` counts at all) in a
//!   per-CPU array row per syscall number holding the current run of one process
//!   ([`SyscallRun`]): a call by the same process adds one, no hash lookup (a per-CPU hash lookup
//!   took ~55 of this program's ~180 ns per call, measured with `kernel.bpf_stats_enabled`). A
//!   call by another process moves the finished run into the per-CPU hash keyed by (tgid, nr)
//!   and starts its own: only a context switch lets another process in, so that is rare next to
//!   the calls. Errors are counted at exit, where the hash is touched only when the call failed;
//!   the open family is counted at exit per errno (`tanzhen_file_opens_total`);
//! - the start time and number live in a per-CPU slot tagged with the thread's saved-registers
//!   address (the tracepoints' `regs` argument, so the exit's fast path needs no helper call
//!   for the thread id) and its id, written at entry and read at exit: no hash lookup on the
//!   way in or out. The slot also caches the running thread's tgid from its first syscall
//!   after it was switched in, so later entries make no helper call for it. A thread that is
//!   switched out inside a syscall (it blocked, or was preempted) has its slot moved into an LRU
//!   hash keyed by thread id by a program on the `sched_switch` raw tracepoint (which also
//!   clears the cached tgid), and its exit, on whichever CPU, finds it there. Context switches
//!   inside syscalls are far rarer than syscalls;
//! - latency goes into a per-CPU array row per syscall number (log2 slots plus a ns sum).
//!
//! Counts (runs and hash) are written to one of two map generations chosen by
//! [`SYSCALL_CONFIG`]; userspace flips the generation and drains the idle one, so no increment
//! is lost to a read/delete race.
//! A full generation is counted in [`SYSCALL_LOST`], never silent.

use agent_common::{
    COMM_LEN,
    syscalls::{
        SYSCALL_COUNTS_MAX, SYSCALL_HIST_ROWS, SYSCALL_HIST_SLOTS, SYSCALL_HIST_SUM,
        SYSCALL_LOST_MAP_FULL, SYSCALL_LOST_REASONS, SYSCALL_NR_MAX, SYSCALL_START_MAX,
        SyscallConfig, SyscallHistRow, SyscallKey, SyscallRun, SyscallStart, SyscallStat, hist_row,
        hist_slot, is_error,
    },
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated},
    macros::{map, raw_tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::RawTracePointContext,
};

use crate::{config::tgid_allowed, field};

// Not preallocated: a preallocated per-CPU hash reserves max_entries x CPUs values up front,
// and before 5.10 a reused preallocated element kept other CPUs' stale values.
#[map]
static SYSCALL_COUNTS_0: PerCpuHashMap<SyscallKey, SyscallStat> =
    PerCpuHashMap::with_max_entries(SYSCALL_COUNTS_MAX, BPF_F_NO_PREALLOC);

#[map]
static SYSCALL_COUNTS_1: PerCpuHashMap<SyscallKey, SyscallStat> =
    PerCpuHashMap::with_max_entries(SYSCALL_COUNTS_MAX, BPF_F_NO_PREALLOC);

#[map]
static SYSCALL_RUNS_0: PerCpuArray<SyscallRun> = PerCpuArray::with_max_entries(SYSCALL_NR_MAX, 0);

#[map]
static SYSCALL_RUNS_1: PerCpuArray<SyscallRun> = PerCpuArray::with_max_entries(SYSCALL_NR_MAX, 0);

#[map]
static SYSCALL_HIST: PerCpuArray<SyscallHistRow> =
    PerCpuArray::with_max_entries(SYSCALL_HIST_ROWS, 0);

#[map]
static SYSCALL_CUR: PerCpuArray<SyscallStart> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SYSCALL_START: LruHashMap<u32, SyscallStart> =
    LruHashMap::with_max_entries(SYSCALL_START_MAX, 0);

#[map]
static SYSCALL_CONFIG: Array<SyscallConfig> = Array::with_max_entries(1, 0);

#[map]
static SYSCALL_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(SYSCALL_LOST_REASONS, 0);

/// Raw tracepoint `sys_enter(struct pt_regs *regs, long id)` (raw tracepoints: kernel >= 4.17):
/// <https://elixir.bootlin.com/linux/v6.1/source/include/trace/events/syscalls.h>
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn syscalls_sys_enter(ctx: RawTracePointContext) -> i32 {
    on_enter(&ctx);
    0
}

/// Raw tracepoint `sys_exit(struct pt_regs *regs, long ret)`, see [`syscalls_sys_enter`].
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn syscalls_sys_exit(ctx: RawTracePointContext) -> i32 {
    on_exit(&ctx);
    0
}

/// Raw tracepoint `sched_switch`: `current` is still the thread being switched out. The CPU's
/// cached tgid is forgotten (another thread comes in). If the thread is inside a syscall (its
/// start sits in this CPU's slot), the start moves to [`SYSCALL_START`], so the exit finds it
/// even on another CPU and the next thread here can use the slot. Takes no argument, so the
/// tracepoint's prototype (which changed across kernels) does not matter.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn syscalls_sched_switch(_ctx: RawTracePointContext) -> i32 {
    let Some(cur) = SYSCALL_CUR.get_ptr_mut(0) else {
        return 0;
    };
    let (ts_ns, nr, tid, regs) = unsafe { ((*cur).ts_ns, (*cur).nr, (*cur).tid, (*cur).regs) };
    unsafe { (*cur).tgid = 0 };
    if ts_ns == 0 {
        return 0;
    }
    unsafe { (*cur).ts_ns = 0 };
    if tid != bpf_get_current_pid_tgid() as u32 {
        // Left by a thread whose exit never came (exit_group, or entered before we attached).
        return 0;
    }
    match SYSCALL_START.get_ptr_mut(&tid) {
        Some(p) => unsafe {
            (*p).ts_ns = ts_ns;
            (*p).nr = nr;
        },
        // LRU: a full map evicts the least recently used thread instead of failing.
        None => {
            let v = SyscallStart {
                ts_ns,
                regs,
                nr,
                tid,
                tgid: 0,
                _pad: 0,
            };
            let _ = SYSCALL_START.insert(&tid, &v, 0);
        }
    }
    0
}

/// Raw tracepoint `sched_process_exit`, in the exiting thread: `exit`/`exit_group` never return,
/// so the thread's start (in this CPU's slot, or moved to [`SYSCALL_START`] by an earlier
/// switch) is dropped here; left behind, a later thread reusing the id would have its return
/// from `clone` read it as the end of that old syscall.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn syscalls_process_exit(_ctx: RawTracePointContext) -> i32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(cur) = SYSCALL_CUR.get_ptr_mut(0) {
        unsafe {
            if (*cur).tid == tid {
                (*cur).ts_ns = 0;
            }
        }
    }
    let _ = SYSCALL_START.remove(&tid);
    0
}

#[inline(always)]
fn on_enter(ctx: &RawTracePointContext) {
    let Some(cur) = SYSCALL_CUR.get_ptr_mut(0) else {
        return;
    };
    // The running thread's process: cached in the slot since its first syscall after it was
    // switched in (a helper call saved on every later one).
    let mut tgid = unsafe { (*cur).tgid };
    if tgid == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        tgid = (pid_tgid >> 32) as u32;
        unsafe {
            (*cur).tgid = tgid;
            (*cur).tid = pid_tgid as u32;
        }
    }
    if !tgid_allowed(tgid) {
        return;
    }
    let Some(cfg) = SYSCALL_CONFIG.get(0) else {
        return;
    };
    let nr: i64 = ctx.arg(1);
    if nr < 0 {
        return;
    }
    let nr = nr as u32;
    if !is_open(cfg, nr) {
        count_call(cfg.generation, tgid, nr);
    }
    // Last, so the measured latency leaves out our own bookkeeping.
    let regs: u64 = ctx.arg(0);
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        (*cur).ts_ns = now;
        (*cur).regs = regs;
        (*cur).nr = nr;
    }
}

#[inline(always)]
fn on_exit(ctx: &RawTracePointContext) {
    // First, so the measured latency leaves out our own bookkeeping.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(cfg) = SYSCALL_CONFIG.get(0) else {
        return;
    };
    let regs: u64 = ctx.arg(0);
    let Some((start, nr)) = take_start(regs) else {
        return;
    };
    if now >= start {
        record_latency(u64::from(nr), now - start);
    }
    let ret: i64 = ctx.arg(1);
    let failed = is_error(ret);
    let open = is_open(cfg, nr);
    if !failed && !open {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if open {
        let key = SyscallKey {
            tgid,
            nr,
            errno: if failed { (-ret) as u32 } else { 0 },
        };
        count(cfg.generation, &key, 1, u64::from(failed));
    } else {
        let key = SyscallKey { tgid, nr, errno: 0 };
        count(cfg.generation, &key, 0, 1);
    }
}

/// The start of the current thread's syscall, consumed: from this CPU's slot when the thread
/// (whose saved registers are at `regs`) was not switched out since its entry, else from
/// [`SYSCALL_START`]. A start exists only for a call whose entry passed the `--pid` filter. None
/// when the thread entered before we attached, or is a new thread returning from clone (which
/// its parent already counted): without the start we know no syscall number.
#[inline(always)]
fn take_start(regs: u64) -> Option<(u64, u32)> {
    let cur = SYSCALL_CUR.get_ptr_mut(0)?;
    unsafe {
        if (*cur).regs == regs && (*cur).ts_ns != 0 {
            let start = ((*cur).ts_ns, (*cur).nr);
            (*cur).ts_ns = 0;
            return Some(start);
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // Processes the filter drops have no start to look for.
    if !tgid_allowed((pid_tgid >> 32) as u32) {
        return None;
    }
    let p = SYSCALL_START.get_ptr_mut(&(pid_tgid as u32))?;
    unsafe {
        let start = ((*p).ts_ns, (*p).nr);
        if start.0 == 0 {
            return None;
        }
        (*p).ts_ns = 0;
        Some(start)
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

/// One call of `nr` by `tgid`: added to this CPU's run of that number when `tgid` owns it, else
/// the run is moved into the counts hash and `tgid` starts a new one.
///
/// One call site per generation: the verifier inlines an array lookup only where the map is
/// the same on every path, so picking the map first and looking up once would cost a helper
/// call.
#[inline(always)]
fn count_call(generation: u32, tgid: u32, nr: u32) {
    if generation == 0 {
        count_call_in(&SYSCALL_RUNS_0, &SYSCALL_COUNTS_0, tgid, nr);
    } else {
        count_call_in(&SYSCALL_RUNS_1, &SYSCALL_COUNTS_1, tgid, nr);
    }
}

#[inline(always)]
fn count_call_in(
    runs: &PerCpuArray<SyscallRun>,
    counts: &PerCpuHashMap<SyscallKey, SyscallStat>,
    tgid: u32,
    nr: u32,
) {
    let run = if nr < SYSCALL_NR_MAX {
        runs.get_ptr_mut(nr)
    } else {
        None
    };
    let Some(run) = run else {
        let key = SyscallKey { tgid, nr, errno: 0 };
        bump(counts, &key, 1, 0, None);
        return;
    };
    // Per-CPU value, and the syscall tracepoints run their programs with preemption off: no
    // other program touches this run while we do.
    unsafe {
        if (*run).tgid == tgid && (*run).calls != 0 {
            (*run).calls += 1;
            return;
        }
        if (*run).calls != 0 {
            let key = SyscallKey {
                tgid: (*run).tgid,
                nr,
                errno: 0,
            };
            bump(counts, &key, (*run).calls, 0, Some(&(*run).comm));
        }
        (*run).tgid = tgid;
        (*run).calls = 1;
        let comm = &raw mut (*run).comm;
        if generated::bpf_get_current_comm(comm.cast(), COMM_LEN as u32) != 0 {
            (*run).comm = [0; COMM_LEN];
        }
    }
}

#[inline(always)]
fn count(generation: u32, key: &SyscallKey, calls: u64, errors: u64) {
    if generation == 0 {
        bump(&SYSCALL_COUNTS_0, key, calls, errors, None);
    } else {
        bump(&SYSCALL_COUNTS_1, key, calls, errors, None);
    }
}

/// Adds to this CPU's value of `key`; false when the key is absent.
#[inline(always)]
fn add(
    map: &PerCpuHashMap<SyscallKey, SyscallStat>,
    key: &SyscallKey,
    calls: u64,
    errors: u64,
) -> bool {
    let Some(s) = map.get_ptr_mut(key) else {
        return false;
    };
    // Per-CPU value: no other CPU writes it, and programs do not nest on a CPU here.
    unsafe {
        (*s).calls += calls;
        (*s).errors += errors;
    }
    true
}

/// Adds to `key`, inserting it when absent with `comm` (the current thread's name when `None`).
#[inline(always)]
fn bump(
    map: &PerCpuHashMap<SyscallKey, SyscallStat>,
    key: &SyscallKey,
    calls: u64,
    errors: u64,
    comm: Option<&[u8; COMM_LEN]>,
) {
    if add(map, key, calls, errors) {
        return;
    }
    let v = SyscallStat {
        calls,
        errors,
        comm: match comm {
            Some(c) => *c,
            None => bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        },
    };
    if map.insert(key, &v, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    // Another CPU may have inserted the key in between (EEXIST): add to our slot of it.
    if !add(map, key, calls, errors) {
        field::per_cpu_add(&SYSCALL_LOST, SYSCALL_LOST_MAP_FULL, calls.max(errors));
    }
}
