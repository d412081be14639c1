//! Syscalls probe: the maps the `raw_syscalls:sys_enter`/`sys_exit` programs aggregate into, their
//! key and value layouts, the probe's configuration entry and its drop counters.
//!
//! Counts live in two generations of per-CPU hashes so userspace can drain one exactly while the
//! kernel writes the other; the latency histogram is a per-CPU array indexed by syscall number
//! whose rows only grow (userspace takes deltas).

/// `PerCpuHashMap<SyscallKey, SyscallStat>`, generation 0.
pub const SYSCALL_COUNTS_0: &str = "SYSCALL_COUNTS_0";
/// `PerCpuHashMap<SyscallKey, SyscallStat>`, generation 1.
pub const SYSCALL_COUNTS_1: &str = "SYSCALL_COUNTS_1";
/// `PerCpuArray<SyscallRun>` indexed by syscall number below [`SYSCALL_NR_MAX`], generation 0:
/// the run of calls of that number by one process on this CPU, counted without a hash lookup.
pub const SYSCALL_RUNS_0: &str = "SYSCALL_RUNS_0";
/// `PerCpuArray<SyscallRun>`, generation 1 (see [`SYSCALL_RUNS_0`]).
pub const SYSCALL_RUNS_1: &str = "SYSCALL_RUNS_1";
/// `PerCpuArray<SyscallHistRow>` indexed by syscall number (row [`SYSCALL_NR_MAX`] = "other").
pub const SYSCALL_HIST: &str = "SYSCALL_HIST";
/// `PerCpuArray<SyscallStart>` with one entry: the syscall the thread running on this CPU
/// entered, while it has not been switched out since.
pub const SYSCALL_CUR: &str = "SYSCALL_CUR";
/// `LruHashMap<u32 tid, SyscallStart>`: syscalls of threads that were switched out inside them
/// (moved there from [`SYSCALL_CUR`] at `sched_switch`).
pub const SYSCALL_START: &str = "SYSCALL_START";
/// `Array<SyscallConfig>` with one entry, written by userspace.
pub const SYSCALL_CONFIG: &str = "SYSCALL_CONFIG";
/// `PerCpuArray<u64>` indexed by `SYSCALL_LOST_*`.
pub const SYSCALL_LOST: &str = "SYSCALL_LOST";

/// Default capacity of each [`SYSCALL_COUNTS_0`]/[`SYSCALL_COUNTS_1`] generation: distinct
/// (process, syscall, errno) keys per drain interval. Overridable at load time.
pub const SYSCALL_COUNTS_MAX: u32 = 16_384;
/// Capacity of [`SYSCALL_START`]: threads switched out inside a syscall at one time (LRU
/// beyond).
pub const SYSCALL_START_MAX: u32 = 65_536;
/// Syscall numbers with their own histogram row; larger ones share the last row.
pub const SYSCALL_NR_MAX: u32 = 512;
/// Rows of [`SYSCALL_HIST`]: one per number below [`SYSCALL_NR_MAX`] and one "other".
pub const SYSCALL_HIST_ROWS: u32 = SYSCALL_NR_MAX + 1;
/// Log2 latency slots per row: slot `s < 35` counts `2^(s-1) <= ns < 2^s` (see
/// [`crate::hist`]); slot 35 counts everything from `2^34` ns (~17 s) up.
pub const SYSCALL_HIST_SLOTS: usize = 36;
/// Index of the nanosecond sum in a [`SyscallHistRow`] (after the slots).
pub const SYSCALL_HIST_SUM: usize = SYSCALL_HIST_SLOTS;

/// One histogram row: [`SYSCALL_HIST_SLOTS`] counts, then the sum of latencies in ns.
pub type SyscallHistRow = [u64; SYSCALL_HIST_SLOTS + 1];

/// The syscall a thread is in, recorded at entry and read at exit (raw `sys_exit` passes only
/// the return value, not the number). Overwritten in place, never deleted per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallStart {
    /// `bpf_ktime_get_ns` at entry; 0 once the exit has consumed it.
    pub ts_ns: u64,
    /// The entering thread's saved user registers (the tracepoints' `regs` argument): one
    /// address per live thread, so the exit recognises its own start in [`SYSCALL_CUR`] without
    /// a helper call for its thread id.
    pub regs: u64,
    pub nr: u32,
    /// The thread (kernel pid) that entered: the key in [`SYSCALL_START`].
    pub tid: u32,
    /// In [`SYSCALL_CUR`] only: the process (tgid) of the thread running on this CPU, cached by
    /// its first syscall entry after it was switched in (0: not yet), so later entries need no
    /// helper call for it. Cleared at every context switch.
    pub tgid: u32,
    pub _pad: u32,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SyscallStart {}
const _: () = assert!(core::mem::size_of::<SyscallStart>() == 32);

/// Largest errno the kernel returns (`MAX_ERRNO`): `-4095..=-1` is an error.
pub const MAX_ERRNO: i64 = 4095;

/// Drop reasons, the indices of [`SYSCALL_LOST`]: a (process, syscall) key could not be
/// inserted because the counts generation was full.
pub const SYSCALL_LOST_MAP_FULL: u32 = 0;
/// Number of drop reasons.
pub const SYSCALL_LOST_REASONS: u32 = 1;

/// "Not a syscall number" in [`SyscallConfig::open_nrs`].
pub const NO_SYSCALL: u32 = u32::MAX;

/// Per-probe configuration, written by userspace before attach and at every drain.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallConfig {
    /// Counts generation the programs write (0 or 1); userspace flips it, then drains the other.
    pub generation: u32,
    /// Numbers of `open`, `openat` and `openat2` on this architecture ([`NO_SYSCALL`] where the
    /// architecture lacks one): they are counted per errno at exit, for the file-open metric.
    pub open_nrs: [u32; 3],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SyscallConfig {}

/// Key of the counts maps. Calls of most syscalls are counted at entry with `errno == 0` (so
/// `clone` counts once and `exit_group` counts at all), their errors at exit; the open family is
/// counted at exit, one key per result (`errno` 0 = success).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyscallKey {
    pub tgid: u32,
    pub nr: u32,
    pub errno: u32,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SyscallKey {}
const _: () = assert!(core::mem::size_of::<SyscallKey>() == 12);

/// Value of the counts maps (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallStat {
    pub calls: u64,
    pub errors: u64,
    /// Name of the thread that created the key (only in the inserting CPU's value): names
    /// processes that exit before userspace can read `/proc/<tgid>/comm`.
    pub comm: [u8; crate::COMM_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SyscallStat {}
const _: () = assert!(core::mem::size_of::<SyscallStat>() == 32);

/// Value of [`SYSCALL_RUNS_0`]/[`SYSCALL_RUNS_1`] (per CPU, per syscall number): `calls` calls
/// by process `tgid` since the entry was taken. A call by another process moves the run into
/// the counts hash (under `comm`, the name the run started with) and starts a new one. Only
/// another process on this CPU can end a run, so a process's calls between context switches
/// all land here. Userspace reads and zeroes the idle generation at every drain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallRun {
    pub tgid: u32,
    pub _pad: u32,
    /// 0: the entry is free.
    pub calls: u64,
    pub comm: [u8; crate::COMM_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SyscallRun {}
const _: () = assert!(core::mem::size_of::<SyscallRun>() == 32);

/// Histogram slot of a latency of `ns` nanoseconds: [`crate::hist::slot`] capped at the last
/// slot of a row.
#[inline(always)]
#[must_use]
pub const fn hist_slot(ns: u64) -> usize {
    let s = crate::hist::slot(ns);
    if s < SYSCALL_HIST_SLOTS - 1 {
        s
    } else {
        SYSCALL_HIST_SLOTS - 1
    }
}

/// Histogram row of syscall number `nr`.
#[inline(always)]
#[must_use]
pub const fn hist_row(nr: u64) -> u32 {
    if nr < SYSCALL_NR_MAX as u64 {
        nr as u32
    } else {
        SYSCALL_NR_MAX
    }
}

/// Whether a syscall return value is an error (`-MAX_ERRNO..=-1`, as `IS_ERR_VALUE`).
#[inline(always)]
#[must_use]
pub const fn is_error(ret: i64) -> bool {
    ret < 0 && ret >= -MAX_ERRNO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_at_the_row_end() {
        assert_eq!(hist_slot(0), 0);
        assert_eq!(hist_slot(1_000), 10);
        assert_eq!(hist_slot((1 << 34) - 1), 34);
        assert_eq!(hist_slot(1 << 34), 35);
        assert_eq!(hist_slot(u64::MAX), 35);
    }

    #[test]
    fn rows_and_errors() {
        assert_eq!(hist_row(0), 0);
        assert_eq!(hist_row(511), 511);
        assert_eq!(hist_row(512), SYSCALL_NR_MAX);
        assert_eq!(hist_row(u64::MAX), SYSCALL_NR_MAX);
        assert!(is_error(-1) && is_error(-4095));
        assert!(!is_error(0) && !is_error(3) && !is_error(-4096));
    }
}
