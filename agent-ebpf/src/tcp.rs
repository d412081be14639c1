//! TCP connect and accept tracking on `sock:inet_sock_set_state`.
//!
//! Why this tracepoint: it exists since 4.16, fires on every TCP state change with the socket
//! address, ports and addresses as plain fields, and costs far less than kprobes on
//! tcp_v4_connect/tcp_rcv_state_process (which also need struct offsets we cannot relocate).
//!
//! - CLOSE -> SYN_SENT runs in the connecting task: record who and when, keyed by socket.
//! - SYN_SENT -> ESTABLISHED / CLOSE run in softirq: emit the outcome with the recorded task.
//! - CLOSE -> LISTEN runs in the listening task: remember it by port, so that
//!   SYN_RECV -> ESTABLISHED (softirq) can name the process that accepts.
//!
//! Field offsets come from tracefs through [`TCP_TP_OFFSETS`]; when they are the known layout
//! of current kernels, fields are plain loads at constant offsets (no `bpf_probe_read` per
//! field: this program runs on every TCP state change). Every drop is counted in [`TCP_LOST`].

use crate::{field, transport::Events};
use agent_common::{
    COMM_LEN,
    tcp::{
        AF_INET, AF_INET6, IPPROTO_TCP, TCP_CLOSE, TCP_CONNECTS_MAX, TCP_ESTABLISHED,
        TCP_EVENT_ACCEPT, TCP_EVENT_CONNECT_ESTABLISHED, TCP_EVENT_CONNECT_FAILED,
        TCP_EVENTS_BYTES, TCP_LISTEN, TCP_LISTENERS_MAX, TCP_LOST_MAP_FULL, TCP_LOST_READ_ERROR,
        TCP_LOST_REASONS, TCP_LOST_RINGBUF_FULL, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TP_READY_KNOWN,
        TcpConnectStart, TcpEvent, TcpListener, TcpTpOffsets,
    },
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_get_current_cgroup_id,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::TracePointContext,
};

#[map]
static TCP_EVENTS: Events<TcpEvent> = Events::new(TCP_EVENTS_BYTES);

#[map]
static TCP_TP_OFFSETS: Array<TcpTpOffsets> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static TCP_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(TCP_LOST_REASONS, 0);

#[map]
pub(crate) static TCP_CONNECTS: HashMap<u64, TcpConnectStart> =
    HashMap::with_max_entries(TCP_CONNECTS_MAX, 0);

#[map]
static TCP_LISTENERS: HashMap<u32, TcpListener> = HashMap::with_max_entries(TCP_LISTENERS_MAX, 0);

/// `sock:inet_sock_set_state` (kernel >= 4.16):
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
    let skaddr: u64 = field(ctx, off, off.skaddr, K.skaddr)?;

    match (oldstate, newstate) {
        (TCP_CLOSE, TCP_SYN_SENT) => on_connect_start(skaddr),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            on_connect_done(ctx, off, skaddr, TCP_EVENT_CONNECT_ESTABLISHED)
        }
        (TCP_SYN_SENT, TCP_CLOSE) => on_connect_done(ctx, off, skaddr, TCP_EVENT_CONNECT_FAILED),
        (TCP_CLOSE, TCP_LISTEN) => on_listen(ctx, off, skaddr),
        (TCP_LISTEN, TCP_CLOSE) => on_unlisten(ctx, off, skaddr),
        (TCP_SYN_RECV, TCP_ESTABLISHED) => on_accept(ctx, off),
        _ => Ok(()),
    }
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
fn on_connect_start(skaddr: u64) -> Result<(), i64> {
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
    if TCP_CONNECTS.insert(&skaddr, &start, 0).is_err() {
        count_lost(TCP_LOST_MAP_FULL);
    }
    Ok(())
}

#[inline(always)]
fn on_connect_done(
    ctx: &TracePointContext,
    off: &TcpTpOffsets,
    skaddr: u64,
    kind: u32,
) -> Result<(), i64> {
    // A socket that entered SYN_SENT before we attached has no start record: skip it rather
    // than report a made-up latency.
    let Some(start) = (unsafe { TCP_CONNECTS.get(&skaddr) }) else {
        return Ok(());
    };
    let start = *start;
    let _ = TCP_CONNECTS.remove(&skaddr);
    let now = unsafe { bpf_ktime_get_ns() };
    emit(
        ctx,
        off,
        kind,
        now,
        now.saturating_sub(start.ts_ns),
        start.cgroup_id,
        start.tgid,
        start.pid,
        &start.comm,
    )
}

#[inline(always)]
fn on_listen(ctx: &TracePointContext, off: &TcpTpOffsets, skaddr: u64) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !crate::config::tgid_allowed(tgid) {
        return Ok(());
    }
    let sport: u16 = field(ctx, off, off.sport, K.sport)?;
    let listener = TcpListener {
        skaddr,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if TCP_LISTENERS
        .insert(&u32::from(sport), &listener, 0)
        .is_err()
    {
        count_lost(TCP_LOST_MAP_FULL);
    }
    Ok(())
}

#[inline(always)]
fn on_unlisten(ctx: &TracePointContext, off: &TcpTpOffsets, skaddr: u64) -> Result<(), i64> {
    let sport = u32::from(field::<u16>(ctx, off, off.sport, K.sport)?);
    // Only the socket that registered the port may remove it (SO_REUSEPORT siblings stay);
    // entries seeded from /proc at start-up (skaddr 0) go with any socket on their port.
    if let Some(l) = unsafe { TCP_LISTENERS.get(&sport) }
        && (l.skaddr == skaddr || l.skaddr == 0)
    {
        let _ = TCP_LISTENERS.remove(&sport);
    }
    Ok(())
}

#[inline(always)]
fn on_accept(ctx: &TracePointContext, off: &TcpTpOffsets) -> Result<(), i64> {
    let sport = u32::from(field::<u16>(ctx, off, off.sport, K.sport)?);
    let now = unsafe { bpf_ktime_get_ns() };
    match unsafe { TCP_LISTENERS.get(&sport) } {
        // Listeners seeded from /proc at start-up are every process's: honour --pid here.
        Some(l) if !crate::config::tgid_allowed(l.tgid) => Ok(()),
        Some(l) => {
            let l = *l;
            emit(
                ctx,
                off,
                TCP_EVENT_ACCEPT,
                now,
                0,
                l.cgroup_id,
                l.tgid,
                l.tgid,
                &l.comm,
            )
        }
        // Listening since before we attached: report it without a process (unless --pid
        // asks for one process: then it is not ours).
        None if !crate::config::tgid_allowed(0) => Ok(()),
        None => emit(ctx, off, TCP_EVENT_ACCEPT, now, 0, 0, 0, 0, &[0; COMM_LEN]),
    }
}

/// Family, ports (host order) and addresses of a connection, as events carry them.
pub(crate) struct Addrs {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's job simple"
)]
fn emit(
    ctx: &TracePointContext,
    off: &TcpTpOffsets,
    kind: u32,
    ts_ns: u64,
    latency_ns: u64,
    cgroup_id: u64,
    tgid: u32,
    pid: u32,
    comm: &[u8; COMM_LEN],
) -> Result<(), i64> {
    let family: u16 = field(ctx, off, off.family, K.family)?;
    let (saddr, daddr) = if family == AF_INET6 {
        (
            field::<[u8; 16]>(ctx, off, off.saddr_v6, K.saddr_v6)?,
            field::<[u8; 16]>(ctx, off, off.daddr_v6, K.daddr_v6)?,
        )
    } else if family == AF_INET {
        let s: [u8; 4] = field(ctx, off, off.saddr, K.saddr)?;
        let d: [u8; 4] = field(ctx, off, off.daddr, K.daddr)?;
        (
            [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
    } else {
        return Ok(());
    };
    let a = Addrs {
        family,
        sport: field(ctx, off, off.sport, K.sport)?,
        dport: field(ctx, off, off.dport, K.dport)?,
        saddr,
        daddr,
    };
    send(ctx, kind, ts_ns, latency_ns, cgroup_id, tgid, pid, comm, &a)
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
    field::count_lost(&TCP_LOST, reason, 1);
}
