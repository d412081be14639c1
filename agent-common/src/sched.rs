//! Scheduler probe: the tracepoint field offsets and settings handed to the kernel programs,
//! the keys and values of the in-kernel aggregation maps, the process lifecycle events and the
//! drop counters.
//!
//! Draining without losing increments: every aggregation key carries the `epoch` the program
//! read from [`SCHED_CONFIG`]. Userspace bumps the epoch, lets programs that read the old one
//! finish (they run with preemption disabled, for microseconds), then reads and deletes every
//! entry of older epochs; entries of the current epoch keep counting meanwhile.

use crate::{COMM_LEN, hist::HIST_SLOTS};

/// `Array<SchedConfig>` with one entry, written by userspace before attach and at every drain.
pub const SCHED_CONFIG: &str = "SCHED_CONFIG";
/// `HashMap<u32 pid, u64 ns>`: when each runnable task was enqueued (woken or preempted).
pub const SCHED_RUNQ_START: &str = "SCHED_RUNQ_START";
/// `HashMap<RunqKey, RunqHist>`: run-queue latency log2 histograms.
pub const SCHED_RUNQ_HIST: &str = "SCHED_RUNQ_HIST";
/// `Array<RunqHist>` with one all-zero entry: the initial value of new histogram entries
/// (a `RunqHist` does not fit the 512-byte BPF stack).
pub const SCHED_RUNQ_ZERO: &str = "SCHED_RUNQ_ZERO";
/// `PerCpuHashMap<SwitchKey, SwitchCounts>`: context switches by the comm switched out.
pub const SCHED_SWITCHES: &str = "SCHED_SWITCHES";
/// Ring buffer carrying [`ProcEvent`]s.
pub const SCHED_EVENTS: &str = "SCHED_EVENTS";
/// `PerCpuArray<u64>` indexed by `SCHED_LOST_*`.
pub const SCHED_LOST: &str = "SCHED_LOST";

/// Capacity of [`SCHED_RUNQ_START`]: live threads seen since attach (an exiting thread's entry
/// goes at its last switch-out).
pub const SCHED_RUNQ_START_MAX: u32 = 32_768;
/// Capacity of [`SCHED_RUNQ_HIST`]: distinct (cgroup, comm) pairs per drain interval (two epochs).
pub const SCHED_RUNQ_HIST_MAX: u32 = 4_096;
/// Capacity of [`SCHED_SWITCHES`]: distinct comms per drain interval (two epochs).
pub const SCHED_SWITCHES_MAX: u32 = 8_192;
/// Ring buffer size in bytes (a power of two multiple of the page size).
pub const SCHED_EVENTS_BYTES: u32 = 256 * 1024;

/// Drop reasons, the indices of [`SCHED_LOST`]: a ring buffer reserve failed.
pub const SCHED_LOST_RINGBUF_FULL: u32 = 0;
/// A map insert failed because the map was full.
pub const SCHED_LOST_MAP_FULL: u32 = 1;
/// A field could not be read from the tracepoint record.
pub const SCHED_LOST_READ_ERROR: u32 = 2;
/// Number of drop reasons.
pub const SCHED_LOST_REASONS: u32 = 3;

/// `TASK_REPORT_MAX - 1` (kernels >= 4.14): the bits of `sched_switch.prev_state` that name a
/// sleeping state (S, D, T, t, X, Z, P, I). None set means the task is still runnable: either
/// preempted (the tracepoint reports `TASK_REPORT_MAX`, 0x100, printed `R+`) or switched out
/// while `TASK_RUNNING` (printed `R`). The kernel counts both as involuntary (`nivcsw`).
pub const SLEEP_STATE_MASK: u32 = 0xff;

/// The bits of `sched_switch.prev_state` that name an exiting task (`X` = `EXIT_DEAD` 0x10,
/// `Z` = `EXIT_ZOMBIE` 0x20, kernels >= 4.14): its last switch-out (or a wait on its way out,
/// which a wakeup then records afresh), so its run-queue state is dropped rather than kept.
pub const DEAD_STATE_MASK: u32 = 0x30;

/// Byte offsets (and the one size that varies) of the sched tracepoint fields, parsed from
/// tracefs at start-up, plus the drain epoch. Rust eBPF cannot use CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedConfig {
    /// `sched_switch.prev_comm` (`char[16]`).
    pub switch_prev_comm: u32,
    /// `sched_switch.prev_pid`.
    pub switch_prev_pid: u32,
    /// `sched_switch.prev_state`.
    pub switch_prev_state: u32,
    /// Size of `prev_state` in bytes: 8 (`long` on 64-bit) or 4 (`unsigned int`/32-bit).
    pub switch_prev_state_size: u32,
    /// `sched_switch.next_comm` (`char[16]`).
    pub switch_next_comm: u32,
    /// `sched_switch.next_pid`.
    pub switch_next_pid: u32,
    /// `sched_wakeup.pid`.
    pub wakeup_pid: u32,
    /// `sched_wakeup_new.pid`.
    pub wakeup_new_pid: u32,
    /// `sched_process_exec.filename` (`__data_loc char[]`: `len << 16 | offset`).
    pub exec_filename: u32,
    /// [`SLEEP_STATE_MASK`], from userspace so the program carries no kernel constant.
    pub sleep_state_mask: u32,
    /// [`DEAD_STATE_MASK`], likewise.
    pub dead_state_mask: u32,
    /// Current drain epoch, copied into every aggregation key.
    pub epoch: u32,
    /// [`SCHED_READY`] or [`SCHED_READY_KNOWN`] once userspace has filled the entry; the
    /// programs ignore records until then.
    pub ready: u32,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SchedConfig {}

/// [`SchedConfig::ready`]: filled; the programs read each field with `bpf_probe_read` at its
/// tracefs offset.
pub const SCHED_READY: u32 = 1;
/// [`SchedConfig::ready`]: filled, and every offset the programs read is the one in [`known`]
/// (so is every Debian kernel from 4.19 to 6.18): plain loads at constant offsets, no helper
/// call per field (the verifier accepts constant-offset reads of a tracepoint record).
pub const SCHED_READY_KNOWN: u32 = 2;

/// The record offsets of the fields the programs read, as 64-bit kernels from 4.19 to 6.18 lay
/// them out (`prev_state` is a `long`).
pub mod known {
    pub const SWITCH_PREV_COMM: u32 = 8;
    pub const SWITCH_PREV_PID: u32 = 24;
    pub const SWITCH_PREV_STATE: u32 = 32;
    pub const SWITCH_PREV_STATE_SIZE: u32 = 8;
    pub const SWITCH_NEXT_COMM: u32 = 40;
    pub const SWITCH_NEXT_PID: u32 = 56;
    pub const WAKEUP_PID: u32 = 24;
    pub const WAKEUP_NEW_PID: u32 = 24;
}

impl SchedConfig {
    /// Whether the offsets are those of [`known`].
    #[must_use]
    pub const fn has_known_layout(&self) -> bool {
        self.switch_prev_comm == known::SWITCH_PREV_COMM
            && self.switch_prev_pid == known::SWITCH_PREV_PID
            && self.switch_prev_state == known::SWITCH_PREV_STATE
            && self.switch_prev_state_size == known::SWITCH_PREV_STATE_SIZE
            && self.switch_next_comm == known::SWITCH_NEXT_COMM
            && self.switch_next_pid == known::SWITCH_NEXT_PID
            && self.wakeup_pid == known::WAKEUP_PID
            && self.wakeup_new_pid == known::WAKEUP_NEW_PID
    }
}
const _: () = assert!(core::mem::size_of::<SchedConfig>() == 52);

/// Key of [`SCHED_SWITCHES`]: epoch and the comm of the task switched out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SwitchKey {
    pub epoch: u32,
    pub comm: [u8; COMM_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SwitchKey {}
const _: () = assert!(core::mem::size_of::<SwitchKey>() == 20);

/// Value of [`SCHED_SWITCHES`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchCounts {
    /// The task switched out was sleeping (blocked on I/O, a lock, a pipe...).
    pub voluntary: u64,
    /// The task switched out was still runnable (preempted, or yielded).
    pub involuntary: u64,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SwitchCounts {}

/// Key of [`SCHED_RUNQ_HIST`]: epoch, the cgroup (v2 id) and the comm of the task switched in.
/// The cgroup is the one the task had when it was last switched out (the switch-in tracepoint
/// runs as the previous task, and without BTF `next`'s cgroup cannot be read); 0 when it has
/// not been switched out since attach. On cgroup v1 hosts every task has the root's id, and the
/// comm alone tells tasks apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RunqKey {
    pub epoch: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for RunqKey {}
const _: () = assert!(core::mem::size_of::<RunqKey>() == 32);

/// Value of [`SCHED_RUNQ_START`]: when the thread entered a run queue (0: not queued, or
/// already accounted) and its cgroup id as of its last switch-out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunqStart {
    pub ts: u64,
    pub cgroup_id: u64,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for RunqStart {}

/// Value of [`SCHED_RUNQ_HIST`]: log2 nanosecond slots ([`crate::hist`]) and the exact sum.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunqHist {
    pub slots: [u64; HIST_SLOTS],
    pub sum_ns: u64,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for RunqHist {}
const _: () = assert!(core::mem::size_of::<RunqHist>() == 528);

/// What a [`ProcEvent`] reports: a successful `execve`.
pub const PROC_EVENT_EXEC: u32 = 1;
/// The thread-group leader exited (once per process).
pub const PROC_EVENT_EXIT: u32 = 2;

/// Bytes of the exec'd path carried by a [`ProcEvent`] (longer paths are truncated).
pub const PROC_FILENAME_LEN: usize = 256;

/// One process lifecycle event, sent through [`SCHED_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    /// `bpf_ktime_get_ns` at the event.
    pub ts_ns: u64,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
    /// `PROC_EVENT_*`.
    pub kind: u32,
    pub tgid: u32,
    pub pid: u32,
    pub _pad: u32,
    /// The task name after exec (the basename of the path), or at exit.
    pub comm: [u8; COMM_LEN],
    /// Exec only: the path given to `execve`, NUL-terminated (unspecified after the NUL).
    pub filename: [u8; PROC_FILENAME_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProcEvent {}
/// Size of a [`ProcEvent`] on the wire.
pub const PROC_EVENT_SIZE: usize = core::mem::size_of::<ProcEvent>();
const _: () = assert!(PROC_EVENT_SIZE == 304);
