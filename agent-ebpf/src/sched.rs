//! Scheduler probe: run-queue latency, context switches and process lifecycle, on the
//! `sched:` tracepoints (all present in 4.19, with stable field names; offsets come from tracefs
//! through [`SCHED_CONFIG`], and fields are plain loads at constant offsets when the kernel has
//! the known layout, as every Debian kernel from 4.19 to 6.18 does).
//!
//! Run-queue latency as libbpf-tools `runqlat` defines it: the time from enqueue to running.
//! - `sched_wakeup` / `sched_wakeup_new`: the woken task is enqueued now.
//! - `sched_switch`: a `prev` that is still runnable (preempted) is enqueued again now; for `next`,
//!   `now - enqueue` goes into a log2 histogram keyed by next's comm (from the record) and the
//!   cgroup next had when it was last switched out (recorded then, as `current` is prev at a
//!   switch: the switched-in task's own cgroup is not reachable without BTF).
//! - Context switches are counted by prev's comm: voluntary when prev was sleeping, involuntary
//!   when it was still runnable, which is how the kernel counts `nvcsw`/`nivcsw`.
//! - `sched_process_exec` / `sched_process_exit` (leader only) go to userspace through the ring
//!   buffer; every thread exit drops the thread's run-queue state, and so does its last
//!   switch-out (`prev_state` X or Z), which would otherwise record it again.
//!
//! Aggregation maps are keyed by the drain epoch (see agent-common's sched.rs); every failed
//! insert or reserve is counted in [`SCHED_LOST`].

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::{
    field::{self, read},
    transport::Events,
};
use agent_common::{
    COMM_LEN,
    hist::{HIST_SLOTS, slot},
    sched::{
        PROC_EVENT_EXEC, PROC_EVENT_EXIT, ProcEvent, RunqHist, RunqKey, RunqStart,
        SCHED_EVENTS_BYTES, SCHED_LOST_MAP_FULL, SCHED_LOST_READ_ERROR, SCHED_LOST_REASONS,
        SCHED_LOST_RINGBUF_FULL, SCHED_READY_KNOWN, SCHED_RUNQ_HIST_MAX, SCHED_RUNQ_START_MAX,
        SCHED_SWITCHES_MAX, SchedConfig, SwitchCounts, SwitchKey, known,
    },
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_probe_read_str},
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};

#[map]
static SCHED_CONFIG: Array<SchedConfig> = Array::with_max_entries(1, 0);

#[map]
static SCHED_RUNQ_START: HashMap<u32, RunqStart> =
    HashMap::with_max_entries(SCHED_RUNQ_START_MAX, 0);

// A shared (not per-CPU) hash: a 528-byte value per CPU per comm would cost MiBs on big hosts.
// Slots are bumped with atomic adds.
#[map]
static SCHED_RUNQ_HIST: HashMap<RunqKey, RunqHist> =
    HashMap::with_max_entries(SCHED_RUNQ_HIST_MAX, 0);

#[map]
static SCHED_RUNQ_ZERO: Array<RunqHist> = Array::with_max_entries(1, 0);

#[map]
static SCHED_SWITCHES: PerCpuHashMap<SwitchKey, SwitchCounts> =
    PerCpuHashMap::with_max_entries(SCHED_SWITCHES_MAX, 0);

#[map]
static SCHED_EVENTS: Events<ProcEvent, SCHED_EVENTS_BYTES> = Events::new();

#[map]
static SCHED_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(SCHED_LOST_REASONS, 0);

/// `sched:sched_wakeup` (kernel >= 2.6.28):
/// <https://elixir.bootlin.com/linux/v6.1/source/include/trace/events/sched.h>
#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config()
        && try_enqueue(&ctx, cfg, cfg.wakeup_pid, known::WAKEUP_PID).is_err()
    {
        count_lost(SCHED_LOST_READ_ERROR);
    }
    0
}

/// `sched:sched_wakeup_new` (kernel >= 2.6.28): a new task's first enqueue.
#[tracepoint]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config()
        && try_enqueue(&ctx, cfg, cfg.wakeup_new_pid, known::WAKEUP_NEW_PID).is_err()
    {
        count_lost(SCHED_LOST_READ_ERROR);
    }
    0
}

/// `sched:sched_switch` (kernel >= 2.6.28): counts the switch, re-enqueues a preempted prev and
/// records next's run-queue latency.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config()
        && try_switch(&ctx, cfg).is_err()
    {
        count_lost(SCHED_LOST_READ_ERROR);
    }
    0
}

/// `sched:sched_process_exec` (kernel >= 3.4): runs in the task after a successful exec.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if let Some(cfg) = config()
        && try_exec(&ctx, cfg).is_err()
    {
        count_lost(SCHED_LOST_READ_ERROR);
    }
    0
}

/// `sched:sched_process_exit` (kernel >= 2.6.28): runs in every exiting thread.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    if config().is_some() {
        on_exit(&ctx);
    }
    0
}

/// The configuration entry, once userspace has filled it.
#[inline(always)]
fn config() -> Option<&'static SchedConfig> {
    SCHED_CONFIG.get(0).filter(|c| c.ready != 0)
}

/// A record field, see [`field::read_known`].
#[inline(always)]
fn field<T: Copy>(
    ctx: &TracePointContext,
    cfg: &SchedConfig,
    offset: u32,
    known: u32,
) -> Result<T, i64> {
    field::read_known(ctx, cfg.ready == SCHED_READY_KNOWN, offset, known)
}

#[inline(always)]
fn try_enqueue(
    ctx: &TracePointContext,
    cfg: &SchedConfig,
    pid_off: u32,
    known_pid: u32,
) -> Result<(), i64> {
    let pid: u32 = field(ctx, cfg, pid_off, known_pid)?;
    enqueue(pid, Some(unsafe { bpf_ktime_get_ns() }), None);
    Ok(())
}

/// Records that `pid` entered a run queue at `ts` and/or its cgroup, whichever is given; in
/// place when it has an entry already.
#[inline(always)]
fn enqueue(pid: u32, ts: Option<u64>, cgroup_id: Option<u64>) {
    if pid == 0 {
        // The idle task is never queued.
        return;
    }
    if let Some(p) = SCHED_RUNQ_START.get_ptr_mut(&pid) {
        unsafe {
            if let Some(ts) = ts {
                (*p).ts = ts;
            }
            if let Some(cg) = cgroup_id {
                (*p).cgroup_id = cg;
            }
        }
    } else {
        let v = RunqStart {
            ts: ts.unwrap_or(0),
            cgroup_id: cgroup_id.unwrap_or(0),
        };
        if SCHED_RUNQ_START.insert(&pid, &v, 0).is_err() {
            count_lost(SCHED_LOST_MAP_FULL);
        }
    }
}

#[inline(always)]
fn try_switch(ctx: &TracePointContext, cfg: &SchedConfig) -> Result<(), i64> {
    let now = unsafe { bpf_ktime_get_ns() };
    let prev_pid: u32 = field(ctx, cfg, cfg.switch_prev_pid, known::SWITCH_PREV_PID)?;
    // The known layout's prev_state is 8 bytes.
    let prev_state: u64 = if cfg.switch_prev_state_size == 8 {
        field::<u64>(ctx, cfg, cfg.switch_prev_state, known::SWITCH_PREV_STATE)?
    } else {
        u64::from(read::<u32>(ctx, cfg.switch_prev_state)?)
    };
    let runnable = prev_state & u64::from(cfg.sleep_state_mask) == 0;

    // Context switch of prev, by its comm.
    let key = SwitchKey {
        epoch: cfg.epoch,
        comm: field::<[u8; COMM_LEN]>(ctx, cfg, cfg.switch_prev_comm, known::SWITCH_PREV_COMM)?,
    };
    count_switch(&key, runnable);

    if prev_state & u64::from(cfg.dead_state_mask) != 0 {
        // An exiting thread's last switch-out (sched_process_exit removed its entry already):
        // recording its cgroup here would recreate the entry, and the map would fill with the
        // dead. Should it still wait for something on its way out, the wakeup records it anew.
        let _ = SCHED_RUNQ_START.remove(&prev_pid);
    } else {
        // A preempted prev goes straight back to the run queue; a sleeping one waits for its
        // wakeup. Either way its cgroup (current is still prev) is kept for its next switch-in.
        let prev_cgroup = unsafe { bpf_get_current_cgroup_id() };
        enqueue(prev_pid, runnable.then_some(now), Some(prev_cgroup));
    }

    // Run-queue latency of next.
    let next_pid: u32 = field(ctx, cfg, cfg.switch_next_pid, known::SWITCH_NEXT_PID)?;
    if next_pid == 0 {
        return Ok(());
    }
    let Some(start) = SCHED_RUNQ_START.get_ptr_mut(&next_pid) else {
        return Ok(());
    };
    let (ts, cgroup_id) = unsafe { ((*start).ts, (*start).cgroup_id) };
    if ts == 0 {
        // Running since before we attached, or already accounted.
        return Ok(());
    }
    unsafe { (*start).ts = 0 };
    let delta = now.saturating_sub(ts);
    let key = RunqKey {
        epoch: cfg.epoch,
        _pad: 0,
        cgroup_id,
        comm: field::<[u8; COMM_LEN]>(ctx, cfg, cfg.switch_next_comm, known::SWITCH_NEXT_COMM)?,
    };
    record_latency(&key, delta);
    Ok(())
}

#[inline(always)]
fn count_switch(key: &SwitchKey, runnable: bool) {
    if SCHED_SWITCHES.get_ptr_mut(key).is_none() {
        let zero = SwitchCounts {
            voluntary: 0,
            involuntary: 0,
        };
        // A failure with the key present (inserted meanwhile) is fine: the lookup finds it.
        let _ = SCHED_SWITCHES.insert(key, &zero, u64::from(BPF_NOEXIST));
    }
    let Some(p) = SCHED_SWITCHES.get_ptr_mut(key) else {
        count_lost(SCHED_LOST_MAP_FULL);
        return;
    };
    // Per-CPU value: plain increments are race-free.
    unsafe {
        if runnable {
            (*p).involuntary += 1;
        } else {
            (*p).voluntary += 1;
        }
    }
}

#[inline(always)]
fn record_latency(key: &RunqKey, delta: u64) {
    let h = match SCHED_RUNQ_HIST.get_ptr_mut(key) {
        Some(h) => h,
        None => {
            let Some(zero) = SCHED_RUNQ_ZERO.get(0) else {
                return;
            };
            // Another CPU may insert the same key first: NOEXIST then fails, and the lookup
            // below finds its entry.
            let _ = SCHED_RUNQ_HIST.insert(key, zero, u64::from(BPF_NOEXIST));
            match SCHED_RUNQ_HIST.get_ptr_mut(key) {
                Some(h) => h,
                None => {
                    count_lost(SCHED_LOST_MAP_FULL);
                    return;
                }
            }
        }
    };
    // The verifier needs a visible bound on the slot (AYA-NOTES.md §6). `min(HIST_SLOTS - 1)`
    // would not do: LLVM proves slot() <= 64 and drops it, leaving the popcount's -191..64
    // range. 63 is kept, and folds only durations of 2^62 ns (146 years) and more.
    let s = slot(delta).min(HIST_SLOTS - 2);
    // Shared value: atomic adds. The bpf target has no CAS, so `AtomicU64::fetch_add` does not
    // exist; the intrinsic with its result unused compiles to BPF_XADD (4.19-safe).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>((*h).slots.as_mut_ptr().add(s), 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*h).sum_ns, delta);
    }
}

#[inline(always)]
fn try_exec(ctx: &TracePointContext, cfg: &SchedConfig) -> Result<(), i64> {
    let loc: u32 = read(ctx, cfg.exec_filename)?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(mut entry) = SCHED_EVENTS.reserve() else {
        count_lost(SCHED_LOST_RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).kind = PROC_EVENT_EXEC;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).pid = pid_tgid as u32;
        (*ev)._pad = 0;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        // __data_loc: the low 16 bits are the string's offset in the record.
        let src = ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize);
        let dst = (*ev).filename.as_mut_ptr();
        if bpf_probe_read_str(dst.cast(), (*ev).filename.len() as u32, src.cast()) < 0 {
            *dst = 0;
        }
    }
    if entry.submit(ctx).is_err() {
        count_lost(SCHED_LOST_RINGBUF_FULL);
    }
    Ok(())
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // Every thread: its run-queue state goes (an absent entry is fine).
    let _ = SCHED_RUNQ_START.remove(&pid);
    if pid != tgid {
        return;
    }
    let Some(mut entry) = SCHED_EVENTS.reserve() else {
        count_lost(SCHED_LOST_RINGBUF_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).kind = PROC_EVENT_EXIT;
        (*ev).tgid = tgid;
        (*ev).pid = pid;
        (*ev)._pad = 0;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        (*ev).filename[0] = 0;
    }
    if entry.submit(ctx).is_err() {
        count_lost(SCHED_LOST_RINGBUF_FULL);
    }
}

#[inline(always)]
fn count_lost(reason: u32) {
    field::per_cpu_add(&SCHED_LOST, reason, 1);
}
