//! Bench probe (hidden, `--probes bench`, for `cargo xtask bench`'s event throughput item): one
//! small event per call of one syscall (`getppid`) by the `--pid` process, through the same
//! event transport as the real probes, so the transport's drain rate can be measured alone.
//!
//! Never attached unless asked for by name; `all` and `tanzhen probes` leave it out.

/// The event channel (ring buffer or perf event array) of [`BenchEvent`]s.
pub const BENCH_EVENTS: &str = "BENCH_EVENTS";
/// `Array<BenchConfig>` with one entry, written by userspace before attach.
pub const BENCH_CONFIG: &str = "BENCH_CONFIG";
/// `PerCpuArray<u64>` indexed by `BENCH_LOST_*`.
pub const BENCH_LOST: &str = "BENCH_LOST";

/// Compiled-in size of the bench ring buffer (ring buffer object). The loader shrinks it to one
/// page unless the bench probe was asked for, so it costs nothing in normal runs; the real
/// probes' rings are 256 KiB.
pub const BENCH_EVENTS_BYTES: u32 = 4 * 1024 * 1024;

/// Drop reasons, the indices of [`BENCH_LOST`]: the ring buffer was full (ring buffer object)
/// or `bpf_perf_event_output` failed for another reason than a full buffer (perf object).
pub const BENCH_LOST_RINGBUF_FULL: u32 = 0;
/// Number of drop reasons.
pub const BENCH_LOST_REASONS: u32 = 1;

/// The bench probe's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchConfig {
    /// The syscall number that emits an event (`SYS_getppid` of this architecture).
    pub nr: u32,
    /// Events per call, 1..=[`BENCH_MAX_EVENTS_PER_CALL`]: more than one lets a single
    /// generator thread offer the transport more events per second than it can make calls.
    pub events_per_call: u32,
}

/// Upper bound of [`BenchConfig::events_per_call`] (the kernel loop is unrolled to it).
pub const BENCH_MAX_EVENTS_PER_CALL: u32 = 8;
#[cfg(feature = "user")]
unsafe impl aya::Pod for BenchConfig {}

/// One event: who made the call, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchEvent {
    /// `bpf_get_current_pid_tgid`: tgid in the high half, thread id in the low half.
    pub pid_tgid: u64,
    /// `bpf_ktime_get_ns` at the call.
    pub ts_ns: u64,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for BenchEvent {}
/// Size of a [`BenchEvent`] record.
pub const BENCH_EVENT_SIZE: usize = 16;
const _: () = assert!(core::mem::size_of::<BenchEvent>() == BENCH_EVENT_SIZE);
