//! TCP probe: the tracepoint field offsets handed to the kernel program, the events it emits and
//! its drop counters.

use crate::COMM_LEN;

/// Ring buffer carrying [`TcpEvent`]s.
pub const TCP_EVENTS: &str = "TCP_EVENTS";
/// `Array<TcpTpOffsets>` with one entry, written by userspace before attach.
pub const TCP_TP_OFFSETS: &str = "TCP_TP_OFFSETS";
/// `PerCpuArray<u64>` indexed by `TCP_LOST_*`.
pub const TCP_LOST: &str = "TCP_LOST";
/// Connects in flight, keyed by socket address: an `Array` of [`TCP_CONNECT_SETS`] sets of
/// [`TCP_CONNECT_WAYS`] slots (a set-associative table the programs claim slots of with atomic
/// adds: no hash map update and delete per connect).
pub const TCP_CONNECTS: &str = "TCP_CONNECTS";
/// `HashMap<u32, TcpListener>`: listening sockets, keyed by local port.
pub const TCP_LISTENERS: &str = "TCP_LISTENERS";

/// Capacity of [`TCP_CONNECTS`]: connects in SYN_SENT at one time (at most
/// [`TCP_CONNECT_WAYS`] of them in one set).
pub const TCP_CONNECTS_MAX: u32 = 16_384;
/// Slots per set of [`TCP_CONNECTS`].
pub const TCP_CONNECT_WAYS: u32 = 4;
/// Sets of [`TCP_CONNECTS`] (a power of two).
pub const TCP_CONNECT_SETS: u32 = TCP_CONNECTS_MAX / TCP_CONNECT_WAYS;
const _: () = assert!(TCP_CONNECT_SETS.is_power_of_two());
/// Capacity of [`TCP_LISTENERS`].
pub const TCP_LISTENERS_MAX: u32 = 4_096;
/// Ring buffer size in bytes (a power of two multiple of the page size).
pub const TCP_EVENTS_BYTES: u32 = 256 * 1024;

/// Drop reasons, the indices of [`TCP_LOST`].
pub const TCP_LOST_RINGBUF_FULL: u32 = 0;
/// A connect could not be tracked because its set of [`TCP_CONNECTS`] was full (or a listener
/// because [`TCP_LISTENERS`] was).
pub const TCP_LOST_MAP_FULL: u32 = 1;
/// A field could not be read from the tracepoint record.
pub const TCP_LOST_READ_ERROR: u32 = 2;
/// Number of drop reasons.
pub const TCP_LOST_REASONS: u32 = 3;

/// Offset value meaning "this kernel's tracepoint has no such field".
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Byte offsets of the `sock:inet_sock_set_state` fields, parsed from tracefs at start-up: the
/// layout has changed across kernels and Rust eBPF cannot use CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTpOffsets {
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    /// [`TCP_TP_READY`] or [`TCP_TP_READY_KNOWN`] once userspace has filled the entry; the
    /// program ignores records until then.
    pub ready: u32,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpTpOffsets {}

/// [`TcpTpOffsets::ready`]: filled; the program reads each field with `bpf_probe_read` at its
/// offset.
pub const TCP_TP_READY: u32 = 1;
/// [`TcpTpOffsets::ready`]: filled, and every offset is that of [`TcpTpOffsets::KNOWN`]: the
/// program reads the fields with plain loads at those constant offsets (the verifier accepts
/// constant-offset reads of a tracepoint record on every kernel), no helper call per field.
pub const TCP_TP_READY_KNOWN: u32 = 2;

impl TcpTpOffsets {
    /// The record layout of `sock:inet_sock_set_state` since `family` and a 16-bit `protocol`
    /// were added (Debian's 5.10, 6.1 and 6.18 kernels all have it).
    pub const KNOWN: Self = Self {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        saddr: 32,
        daddr: 36,
        saddr_v6: 40,
        daddr_v6: 56,
        ready: TCP_TP_READY_KNOWN,
    };
}

/// `Array<TcpSockOffsets>` with one entry: `struct sock_common` offsets for the kprobe path.
pub const TCP_SOCK_OFFSETS: &str = "TCP_SOCK_OFFSETS";

/// Byte offsets of the `struct sock` fields the raw tracepoint and kprobe paths read, from the
/// kernel's BTF when it has some, else [`TcpSockOffsets::DEFAULT`] (kprobe path only: the raw
/// tracepoint needs `protocol`, which only BTF gives).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSockOffsets {
    /// `skc_daddr` (remote IPv4 address, network order).
    pub daddr: u32,
    /// `skc_rcv_saddr` (local IPv4 address).
    pub rcv_saddr: u32,
    /// `skc_dport` (remote port, network order).
    pub dport: u32,
    /// `skc_num` (local port, host order).
    pub num: u32,
    /// `skc_family`.
    pub family: u32,
    /// `skc_state` (one byte).
    pub state: u32,
    /// `skc_v6_daddr`.
    pub v6_daddr: u32,
    /// `skc_v6_rcv_saddr`.
    pub v6_rcv_saddr: u32,
    /// `sk_protocol`: the byte where it starts, read as a u16 and masked with
    /// [`Self::protocol_mask`] (an 8-bit bitfield before Linux 5.6, a u16 since);
    /// [`FIELD_ABSENT`] when unknown.
    pub protocol: u32,
    /// `0xff` or `0xffff`, see [`Self::protocol`].
    pub protocol_mask: u32,
    /// [`TCP_SOCK_READY`] or [`TCP_SOCK_READY_DEFAULT`] once userspace has filled the entry;
    /// the programs ignore calls until then.
    pub ready: u32,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpSockOffsets {}

/// [`TcpSockOffsets::ready`]: filled; each field is read at its offset.
pub const TCP_SOCK_READY: u32 = 1;
/// [`TcpSockOffsets::ready`]: filled, and the IPv4 addresses, ports and family sit where
/// [`TcpSockOffsets::DEFAULT`] has them (the first 18 bytes): the programs read them at once.
pub const TCP_SOCK_READY_DEFAULT: u32 = 2;

impl TcpSockOffsets {
    /// `struct sock_common` on 64-bit kernels (x86_64 and arm64 alike) from 4.x to 6.x with
    /// CONFIG_NET_NS and CONFIG_IPV6 (every distribution kernel): `skc_addrpair` at 0,
    /// `skc_hash` 8, `skc_portpair` 12, `skc_family` 16, `skc_state` 18, `skc_bound_dev_if` 20,
    /// the bind node union 24, `skc_prot` 40, `skc_net` 48, then the IPv6 addresses at 56 and
    /// 72. Used when there is no BTF to read them from.
    pub const DEFAULT: Self = Self {
        daddr: 0,
        rcv_saddr: 4,
        dport: 12,
        num: 14,
        family: 16,
        state: 18,
        v6_daddr: 56,
        v6_rcv_saddr: 72,
        protocol: FIELD_ABSENT,
        protocol_mask: 0,
        ready: TCP_SOCK_READY_DEFAULT,
    };
}

/// What a [`TcpEvent`] reports.
pub const TCP_EVENT_CONNECT_ESTABLISHED: u32 = 1;
/// An active open that went SYN_SENT -> CLOSE (refused, timed out, reset).
pub const TCP_EVENT_CONNECT_FAILED: u32 = 2;
/// A passive open that went SYN_RECV -> ESTABLISHED (sent by the kprobe path only: the
/// tracepoint paths count accepts in [`TcpListener::accepts`]).
pub const TCP_EVENT_ACCEPT: u32 = 3;
/// A [`TCP_LISTENERS`] entry was removed or replaced: its identity, `sport` (the port, the
/// entry's key), `latency_ns` = its final [`TcpListener::accepts`], `ts_ns` = its `skaddr`.
pub const TCP_EVENT_LISTENER_GONE: u32 = 4;

/// `AF_INET` and `AF_INET6` as the tracepoint reports them.
pub const AF_INET: u16 = 2;
/// See [`AF_INET`].
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`: the tracepoint also fires for SCTP and MPTCP sockets.
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as `include/net/tcp_states.h` numbers them (stable kernel ABI).
pub const TCP_ESTABLISHED: i32 = 1;
/// See [`TCP_ESTABLISHED`].
pub const TCP_SYN_SENT: i32 = 2;
/// See [`TCP_ESTABLISHED`].
pub const TCP_SYN_RECV: i32 = 3;
/// See [`TCP_ESTABLISHED`].
pub const TCP_CLOSE: i32 = 7;
/// See [`TCP_ESTABLISHED`].
pub const TCP_LISTEN: i32 = 10;

/// Who started a connect: recorded at SYN_SENT, in the connecting task's context (the later
/// transitions run in softirq, where `current` is whoever the CPU happened to be running).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpConnectStart {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub pid: u32,
    pub comm: [u8; COMM_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpConnectStart {}
const _: () = assert!(core::mem::size_of::<TcpConnectStart>() == 40);

/// The process that put a socket into LISTEN, so accepted connections (completed in softirq)
/// can be attributed to it, and how many it accepted: the tracepoint programs count accepts
/// here (an atomic add; userspace reads the counts every second) instead of sending an event
/// per accepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpListener {
    pub skaddr: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
    /// Connections accepted (SYN_RECV -> ESTABLISHED) since the entry was created.
    pub accepts: u64,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpListener {}
const _: () = assert!(core::mem::size_of::<TcpListener>() == 48);

/// `PerCpuArray<u64>` with one entry: accepts on ports without a [`TCP_LISTENERS`] entry
/// (listening since before the agent started, unseen by the start-up scan).
pub const TCP_ACCEPTS_UNKNOWN: &str = "TCP_ACCEPTS_UNKNOWN";

/// One connect outcome or accepted connection, sent through [`TCP_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpEvent {
    /// `bpf_ktime_get_ns` at the completing transition.
    pub ts_ns: u64,
    /// SYN_SENT -> outcome; 0 for accepts.
    pub latency_ns: u64,
    pub cgroup_id: u64,
    /// `TCP_EVENT_*`.
    pub kind: u32,
    /// Process that connected (or listened); 0 when unknown.
    pub tgid: u32,
    pub pid: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: [u8; 6],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpEvent {}
/// Size of a [`TcpEvent`] on the wire.
pub const TCP_EVENT_SIZE: usize = core::mem::size_of::<TcpEvent>();
const _: () = assert!(TCP_EVENT_SIZE == 96);
