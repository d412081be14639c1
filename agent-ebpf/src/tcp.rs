//! TCP connect and accept tracking on `sock:inet_sock_set_state`.
//!
//! Why this tracepoint: it exists since 4.16, fires on every TCP state change with the socket
//! address, ports and addresses as plain fields, and costs far less than kprobes on
//! tcp_v4_connect/tcp_rcv_state_process (which also need struct offsets we cannot relocate).
//!
//! - CLOSE -> SYN_SENT runs in the connecting task: record who and when, keyed by socket
//!   ([`TCP_CONNECTS`]).
//! - SYN_SENT -> ESTABLISHED / CLOSE run in softirq: emit the outcome with the recorded task.
//! - CLOSE -> LISTEN runs in the listening task: remember it by port ([`TCP_LISTENERS`]), so
//!   that SYN_RECV -> ESTABLISHED (softirq) counts the accept in that entry, for the process
//!   that listens; LISTEN -> CLOSE (or a new listener on the port) sends the entry's final count.
//!
//! Two forms of the same tracepoint, one attached (`--tcp-attach`):
//! - raw (`tcp_raw_inet_sock_set_state`, where BTF gives `struct sock`'s offsets): the states
//!   are arguments, so uninteresting transitions cost a compare; the few fields needed are read
//!   from the socket at [`TCP_SOCK_OFFSETS`]. The kernel skips filling a trace record, which
//!   the classic form pays on every state change (about 1% of a loopback connect/close loop).
//! - classic (`tcp_inet_sock_set_state`, every kernel >= 4.16): field offsets come from tracefs
//!   through [`TCP_TP_OFFSETS`]; when they are the known layout of current kernels, fields are
//!   plain loads at constant offsets (no `bpf_probe_read` per field).
//!
//! Every drop is counted in [`TCP_LOST`].

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::{field, transport::Events};
use agent_common::{
    COMM_LEN,
    tcp::{
        AF_INET, AF_INET6, IPPROTO_TCP, TCP_CLOSE, TCP_CONNECT_SETS, TCP_CONNECT_WAYS,
        TCP_ESTABLISHED, TCP_EVENT_CONNECT_ESTABLISHED, TCP_EVENT_CONNECT_FAILED,
        TCP_EVENT_LISTENER_GONE, TCP_EVENTS_BYTES, TCP_LISTEN, TCP_LISTENERS_MAX,
        TCP_LOST_MAP_FULL, TCP_LOST_READ_ERROR, TCP_LOST_REASONS, TCP_LOST_RINGBUF_FULL,
        TCP_SOCK_READY_DEFAULT, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TP_READY_KNOWN, TcpConnectStart,
        TcpEvent, TcpListener, TcpSockOffsets, TcpTpOffsets,
    },
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read,
        generated::bpf_get_current_cgroup_id,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};

#[map]
static TCP_EVENTS: Events<TcpEvent, TCP_EVENTS_BYTES> = Events::new();

#[map]
static TCP_TP_OFFSETS: Array<TcpTpOffsets> = Array::with_max_entries(1, 0);

#[map]
static TCP_SOCK_OFFSETS: Array<TcpSockOffsets> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static TCP_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(TCP_LOST_REASONS, 0);

#[map]
static TCP_CONNECTS: Array<ConnectSet> = Array::with_max_entries(TCP_CONNECT_SETS, 0);

/// One slot of [`TCP_CONNECTS`].
#[repr(C)]
struct ConnectWay {
    /// How many programs hold the slot: 0 free, 1 owned (see [`connect_put`]).
    claim: u64,
    /// The socket whose start this is; 0 while the slot is being filled or emptied.
    skaddr: u64,
    start: TcpConnectStart,
}

/// A set of [`TCP_CONNECTS`]: where the starts of the sockets that hash to it go.
#[repr(C)]
struct ConnectSet {
    ways: [ConnectWay; TCP_CONNECT_WAYS as usize],
}

/// The set of socket `skaddr`: a multiplicative hash of the address (sockets are slab objects,
/// so the low bits carry little).
#[inline(always)]
fn connect_set(skaddr: u64) -> u32 {
    ((skaddr >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - TCP_CONNECT_SETS.trailing_zeros()))
        as u32
}

/// Records `start` for `skaddr`; `false` when every slot of its set is taken.
///
/// A slot is claimed by an atomic add on `claim` (`BPF_XADD`, kernel 4.19: there is no
/// compare-and-swap before 5.12) followed by a read: whoever reads 1 owns it, and any program
/// that reads more takes its add back and tries the next slot. Two programs racing for one slot
/// may thus both move on, never both own it. The owner fills the start, then `skaddr`.
#[inline(always)]
fn connect_put(skaddr: u64, start: &TcpConnectStart) -> bool {
    let Some(set) = TCP_CONNECTS.get_ptr_mut(connect_set(skaddr)) else {
        return false;
    };
    // Unrolled by hand: 4.19's verifier refuses loops.
    claim_way(unsafe { &raw mut (*set).ways[0] }, skaddr, start)
        || claim_way(unsafe { &raw mut (*set).ways[1] }, skaddr, start)
        || claim_way(unsafe { &raw mut (*set).ways[2] }, skaddr, start)
        || claim_way(unsafe { &raw mut (*set).ways[3] }, skaddr, start)
}

#[inline(always)]
fn claim_way(way: *mut ConnectWay, skaddr: u64, start: &TcpConnectStart) -> bool {
    unsafe {
        let claim = &raw mut (*way).claim;
        if claim.read_volatile() != 0 {
            return false;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(claim, 1);
        if claim.read_volatile() != 1 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(claim, u64::MAX);
            return false;
        }
        (&raw mut (*way).start).write(*start);
        (&raw mut (*way).skaddr).write_volatile(skaddr);
    }
    true
}

/// Takes the start recorded for `skaddr` out of [`TCP_CONNECTS`], freeing its slot.
#[inline(always)]
pub(crate) fn connect_take(skaddr: u64) -> Option<TcpConnectStart> {
    let set = TCP_CONNECTS.get_ptr_mut(connect_set(skaddr))?;
    unsafe {
        take_way(&raw mut (*set).ways[0], skaddr)
            .or_else(|| take_way(&raw mut (*set).ways[1], skaddr))
            .or_else(|| take_way(&raw mut (*set).ways[2], skaddr))
            .or_else(|| take_way(&raw mut (*set).ways[3], skaddr))
    }
}

#[inline(always)]
unsafe fn take_way(way: *mut ConnectWay, skaddr: u64) -> Option<TcpConnectStart> {
    unsafe {
        let tag = &raw mut (*way).skaddr;
        if tag.read_volatile() != skaddr {
            return None;
        }
        let start = (&raw const (*way).start).read();
        tag.write_volatile(0);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*way).claim, u64::MAX);
        Some(start)
    }
}

#[map]
static TCP_LISTENERS: HashMap<u32, TcpListener> = HashMap::with_max_entries(TCP_LISTENERS_MAX, 0);

#[map]
static TCP_ACCEPTS_UNKNOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `sock:inet_sock_set_state` (kernel >= 4.16), the classic form: the fields come from the
/// tracepoint's record.
/// <https://elixir.bootlin.com/linux/v6.1/source/include/trace/events/sock.h>
#[tracepoint]
pub fn tcp_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        count_lost(TCP_LOST_READ_ERROR);
    }
    0
}

#[inline(always)]
fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(off) = TCP_TP_OFFSETS.get(0) else {
        return Ok(());
    };
    if off.ready == 0 {
        return Ok(());
    }
    let protocol: u16 = field(ctx, off, off.protocol, K.protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let oldstate: i32 = field(ctx, off, off.oldstate, K.oldstate)?;
    let newstate: i32 = field(ctx, off, off.newstate, K.newstate)?;
    let Some(t) = Transition::of(oldstate, newstate) else {
        return Ok(());
    };
    let skaddr: u64 = field(ctx, off, off.skaddr, K.skaddr)?;
    on_transition(ctx, &Record { ctx, off }, t, skaddr)
}

/// `inet_sock_set_state(sk, oldstate, newstate)` as a raw tracepoint (kernel >= 4.17; used when
/// BTF gives `struct sock`'s offsets): the states are arguments, so the transitions nobody
/// asked about (half of them on a connect/close loop) return before any read, and the kernel
/// fills no trace record. The socket's fields are read with `bpf_probe_read` at the offsets in
/// [`TCP_SOCK_OFFSETS`], and only for the transitions that need them.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcp_raw_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    if try_raw_inet_sock_set_state(&ctx).is_err() {
        count_lost(TCP_LOST_READ_ERROR);
    }
    0
}

#[inline(always)]
fn try_raw_inet_sock_set_state(ctx: &RawTracePointContext) -> Result<(), i64> {
    // `int` arguments: the low 32 bits of their u64 slots.
    let oldstate = ctx.arg::<u64>(1) as i32;
    let newstate = ctx.arg::<u64>(2) as i32;
    let Some(t) = Transition::of(oldstate, newstate) else {
        return Ok(());
    };
    let Some(off) = sock_offsets() else {
        return Ok(());
    };
    let sk: u64 = ctx.arg(0);
    if let Transition::ConnectDone(kind) = t {
        // Only TCP sockets have a start recorded: no protocol to check.
        return on_connect_done(ctx, &Sock { sk, off }, sk, kind);
    }
    let protocol = read::<u16>(sk, off.protocol)? & (off.protocol_mask as u16);
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    on_transition(ctx, &Sock { sk, off }, t, sk)
}

/// The state changes the probe acts on.
#[derive(Clone, Copy)]
enum Transition {
    ConnectStart,
    ConnectDone(u32),
    Listen,
    Unlisten,
    Accept,
}

impl Transition {
    #[inline(always)]
    fn of(oldstate: i32, newstate: i32) -> Option<Self> {
        match (oldstate, newstate) {
            (TCP_CLOSE, TCP_SYN_SENT) => Some(Self::ConnectStart),
            (TCP_SYN_SENT, TCP_ESTABLISHED) => {
                Some(Self::ConnectDone(TCP_EVENT_CONNECT_ESTABLISHED))
            }
            (TCP_SYN_SENT, TCP_CLOSE) => Some(Self::ConnectDone(TCP_EVENT_CONNECT_FAILED)),
            (TCP_CLOSE, TCP_LISTEN) => Some(Self::Listen),
            (TCP_LISTEN, TCP_CLOSE) => Some(Self::Unlisten),
            (TCP_SYN_RECV, TCP_ESTABLISHED) => Some(Self::Accept),
            _ => None,
        }
    }
}

#[inline(always)]
fn on_transition<C: EbpfContext, F: SockFields>(
    ctx: &C,
    f: &F,
    t: Transition,
    skaddr: u64,
) -> Result<(), i64> {
    match t {
        Transition::ConnectStart => on_connect_start(skaddr),
        Transition::ConnectDone(kind) => on_connect_done(ctx, f, skaddr, kind),
        Transition::Listen => on_listen(ctx, f, skaddr),
        Transition::Unlisten => on_unlisten(ctx, f, skaddr),
        Transition::Accept => on_accept(f),
    }
}

/// Where a transition's connection fields come from.
pub(crate) trait SockFields {
    /// The local port (host order).
    fn sport(&self) -> Result<u16, i64>;
    /// Family, ports and addresses; `None` for a family other than IPv4 and IPv6.
    fn addrs(&self) -> Result<Option<Addrs>, i64>;
}

/// The classic tracepoint's record.
struct Record<'a> {
    ctx: &'a TracePointContext,
    off: &'a TcpTpOffsets,
}

impl SockFields for Record<'_> {
    #[inline(always)]
    fn sport(&self) -> Result<u16, i64> {
        field(self.ctx, self.off, self.off.sport, K.sport)
    }

    #[inline(always)]
    fn addrs(&self) -> Result<Option<Addrs>, i64> {
        let (ctx, off) = (self.ctx, self.off);
        let family: u16 = field(ctx, off, off.family, K.family)?;
        let (saddr, daddr) = if family == AF_INET6 {
            (
                field::<[u8; 16]>(ctx, off, off.saddr_v6, K.saddr_v6)?,
                field::<[u8; 16]>(ctx, off, off.daddr_v6, K.daddr_v6)?,
            )
        } else if family == AF_INET {
            (
                v4(field(ctx, off, off.saddr, K.saddr)?),
                v4(field(ctx, off, off.daddr, K.daddr)?),
            )
        } else {
            return Ok(None);
        };
        Ok(Some(Addrs {
            family,
            sport: self.sport()?,
            dport: field(ctx, off, off.dport, K.dport)?,
            saddr,
            daddr,
        }))
    }
}

/// A `struct sock` read at [`TCP_SOCK_OFFSETS`] (raw tracepoint and kprobes): local =
/// `skc_rcv_saddr`/`skc_num`, remote = `skc_daddr`/`skc_dport` (network order in the kernel).
pub(crate) struct Sock<'a> {
    pub sk: u64,
    pub off: &'a TcpSockOffsets,
}

impl SockFields for Sock<'_> {
    #[inline(always)]
    fn sport(&self) -> Result<u16, i64> {
        read(self.sk, self.off.num)
    }

    #[inline(always)]
    fn addrs(&self) -> Result<Option<Addrs>, i64> {
        let (sk, off) = (self.sk, self.off);
        let (family, sport, dport, s4, d4) = if off.ready == TCP_SOCK_READY_DEFAULT {
            // One read for the five fields at the start of the struct.
            let h: SockHead = read(sk, 0)?;
            (h.family, h.num, h.dport, h.rcv_saddr, h.daddr)
        } else {
            (
                read(sk, off.family)?,
                read(sk, off.num)?,
                read(sk, off.dport)?,
                read(sk, off.rcv_saddr)?,
                read(sk, off.daddr)?,
            )
        };
        let (saddr, daddr) = if family == AF_INET6 {
            (
                read::<[u8; 16]>(sk, off.v6_rcv_saddr)?,
                read::<[u8; 16]>(sk, off.v6_daddr)?,
            )
        } else if family == AF_INET {
            (v4(s4), v4(d4))
        } else {
            return Ok(None);
        };
        Ok(Some(Addrs {
            family,
            sport,
            dport: u16::from_be(dport),
            saddr,
            daddr,
        }))
    }
}

/// The start of `struct sock_common` in the [`TcpSockOffsets::DEFAULT`] layout.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockHead {
    daddr: [u8; 4],
    rcv_saddr: [u8; 4],
    _hash: u32,
    dport: u16,
    num: u16,
    family: u16,
}

/// The filled [`TCP_SOCK_OFFSETS`] entry; `None` until userspace has written it.
#[inline(always)]
pub(crate) fn sock_offsets() -> Option<&'static TcpSockOffsets> {
    TCP_SOCK_OFFSETS.get(0).filter(|o| o.ready != 0)
}

/// Reads a `T` at byte `off` of the kernel object at `base` (`bpf_probe_read`: 4.19-safe).
#[inline(always)]
pub(crate) fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    unsafe { bpf_probe_read((base + u64::from(off)) as *const T) }.map_err(i64::from)
}

/// An IPv4 address in the first 4 bytes of an event's 16-byte address field.
#[inline(always)]
fn v4(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The known layout's offsets (constants the program is compiled with).
const K: TcpTpOffsets = TcpTpOffsets::KNOWN;

/// A record field, see [`field::read_known`].
#[inline(always)]
fn field<T: Copy>(
    ctx: &TracePointContext,
    off: &TcpTpOffsets,
    offset: u32,
    known: u32,
) -> Result<T, i64> {
    field::read_known(ctx, off.ready == TCP_TP_READY_KNOWN, offset, known)
}

#[inline(always)]
pub(crate) fn on_connect_start(skaddr: u64) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::config::tgid_allowed((pid_tgid >> 32) as u32) {
        return Ok(());
    }
    let start = TcpConnectStart {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if !connect_put(skaddr, &start) {
        count_lost(TCP_LOST_MAP_FULL);
    }
    Ok(())
}

/// SYN_SENT -> ESTABLISHED or CLOSE: emits the outcome with the recorded start (kprobe path
/// too).
#[inline(always)]
pub(crate) fn on_connect_done<C: EbpfContext, F: SockFields>(
    ctx: &C,
    f: &F,
    skaddr: u64,
    kind: u32,
) -> Result<(), i64> {
    // A socket that entered SYN_SENT before we attached has no start record: skip it rather
    // than report a made-up latency.
    let Some(start) = connect_take(skaddr) else {
        return Ok(());
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(a) = f.addrs()? else {
        return Ok(());
    };
    send(
        ctx,
        kind,
        now,
        now.saturating_sub(start.ts_ns),
        start.cgroup_id,
        start.tgid,
        start.pid,
        &start.comm,
        &a,
    )
}

#[inline(always)]
fn on_listen<C: EbpfContext, F: SockFields>(ctx: &C, f: &F, skaddr: u64) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !crate::config::tgid_allowed(tgid) {
        return Ok(());
    }
    let sport = u32::from(f.sport()?);
    // A listener this one replaces on the port (SO_REUSEPORT, or one seeded from /proc):
    // hand over what it counted.
    if let Some(old) = unsafe { TCP_LISTENERS.get(&sport) } {
        listener_gone(ctx, sport, old)?;
    }
    let listener = TcpListener {
        skaddr,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        accepts: 0,
    };
    if TCP_LISTENERS.insert(&sport, &listener, 0).is_err() {
        count_lost(TCP_LOST_MAP_FULL);
    }
    Ok(())
}

#[inline(always)]
fn on_unlisten<C: EbpfContext, F: SockFields>(ctx: &C, f: &F, skaddr: u64) -> Result<(), i64> {
    let sport = u32::from(f.sport()?);
    // Only the socket that registered the port may remove it (SO_REUSEPORT siblings stay);
    // entries seeded from /proc at start-up (skaddr 0) go with any socket on their port.
    if let Some(l) = unsafe { TCP_LISTENERS.get(&sport) }
        && (l.skaddr == skaddr || l.skaddr == 0)
    {
        listener_gone(ctx, sport, l)?;
        let _ = TCP_LISTENERS.remove(&sport);
    }
    Ok(())
}

/// Sends the final count of a listener entry about to be removed or replaced (userspace adds
/// what it has not read yet); nothing when it accepted nothing.
#[inline(always)]
fn listener_gone<C: EbpfContext>(ctx: &C, sport: u32, l: &TcpListener) -> Result<(), i64> {
    let accepts = unsafe { (&raw const l.accepts).read_volatile() };
    if accepts == 0 {
        return Ok(());
    }
    let a = Addrs {
        family: 0,
        sport: sport as u16,
        dport: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    send(
        ctx,
        TCP_EVENT_LISTENER_GONE,
        l.skaddr,
        accepts,
        l.cgroup_id,
        l.tgid,
        l.tgid,
        &l.comm,
        &a,
    )
}

/// SYN_RECV -> ESTABLISHED: one more accept for the listener on the port, counted in place
/// (an atomic add: accepts on one listener complete on every CPU at once).
#[inline(always)]
fn on_accept<F: SockFields>(f: &F) -> Result<(), i64> {
    let sport = u32::from(f.sport()?);
    match TCP_LISTENERS.get_ptr_mut(&sport) {
        // Listeners seeded from /proc at start-up are every process's: honour --pid here.
        Some(l) if !crate::config::tgid_allowed(unsafe { (*l).tgid }) => {}
        Some(l) => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*l).accepts, 1);
        },
        // Listening since before we attached: counted without a process (unless --pid asks
        // for one process: then it is not ours).
        None if !crate::config::tgid_allowed(0) => {}
        None => field::per_cpu_add(&TCP_ACCEPTS_UNKNOWN, 0, 1),
    }
    Ok(())
}

/// Family, ports (host order) and addresses of a connection, as events carry them.
pub(crate) struct Addrs {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Sends one event (both attach methods); a full transport is counted.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's job simple"
)]
pub(crate) fn send<C: EbpfContext>(
    ctx: &C,
    kind: u32,
    ts_ns: u64,
    latency_ns: u64,
    cgroup_id: u64,
    tgid: u32,
    pid: u32,
    comm: &[u8; COMM_LEN],
    a: &Addrs,
) -> Result<(), i64> {
    let Some(mut entry) = TCP_EVENTS.reserve() else {
        count_lost(TCP_LOST_RINGBUF_FULL);
        return Ok(());
    };
    entry.write(TcpEvent {
        ts_ns,
        latency_ns,
        cgroup_id,
        kind,
        tgid,
        pid,
        family: a.family,
        sport: a.sport,
        dport: a.dport,
        _pad: [0; 6],
        saddr: a.saddr,
        daddr: a.daddr,
        comm: *comm,
    });
    if entry.submit(ctx).is_err() {
        count_lost(TCP_LOST_RINGBUF_FULL);
    }
    Ok(())
}

#[inline(always)]
pub(crate) fn count_lost(reason: u32) {
    field::per_cpu_add(&TCP_LOST, reason, 1);
}
