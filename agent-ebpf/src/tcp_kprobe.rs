//! TCP connect and accept tracking with kprobes, for kernels without the
//! `sock:inet_sock_set_state` tracepoint (`--tcp-attach kprobe`, or `auto` when it is missing).
//! Same events, maps and drop counters as the tracepoint path (`tcp.rs`).
//!
//! - `tcp_v4_connect` / `tcp_v6_connect` entry (the connecting task): record who and when,
//!   keyed by the `struct sock *` (first argument).
//! - `tcp_set_state(sk, state)` entry: the old state is `sk->sk_state`, still unchanged.
//!   SYN_SENT -> ESTABLISHED / CLOSE emits the outcome; any -> CLOSE drops a leftover record.
//! - `inet_csk_accept` return (the accepting task): the new `struct sock *`, emitted as an accept
//!   (at accept() time, where the tracepoint path counts the completed handshake).
//!
//! `struct sock_common` offsets come from userspace ([`TCP_SOCK_OFFSETS`]: from BTF when there
//! is some, else a table), and fields are read with `bpf_probe_read` (4.19-safe). Register
//! access for the arguments is per architecture: aya-ebpf's `ProbeContext::arg` reads `pt_regs`
//! as the target architecture lays it out (the object is built per architecture).

use agent_common::{
    COMM_LEN,
    tcp::{
        AF_INET, AF_INET6, TCP_CLOSE, TCP_ESTABLISHED, TCP_EVENT_ACCEPT,
        TCP_EVENT_CONNECT_ESTABLISHED, TCP_EVENT_CONNECT_FAILED, TCP_LOST_MAP_FULL,
        TCP_LOST_READ_ERROR, TCP_SYN_SENT, TcpConnectStart, TcpSockOffsets,
    },
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read,
        generated::bpf_get_current_cgroup_id,
    },
    macros::{kprobe, kretprobe, map},
    maps::Array,
    programs::{ProbeContext, RetProbeContext},
};

use crate::tcp::{Addrs, TCP_CONNECTS, count_lost, send};

#[map]
static TCP_SOCK_OFFSETS: Array<TcpSockOffsets> = Array::with_max_entries(1, 0);

/// kprobe on `tcp_v4_connect(struct sock *sk, ...)`.
#[kprobe]
pub fn tcp_kprobe_v4_connect(ctx: ProbeContext) -> u32 {
    on_connect(&ctx);
    0
}

/// kprobe on `tcp_v6_connect(struct sock *sk, ...)`.
#[kprobe]
pub fn tcp_kprobe_v6_connect(ctx: ProbeContext) -> u32 {
    on_connect(&ctx);
    0
}

/// kprobe on `tcp_set_state(struct sock *sk, int state)`.
#[kprobe]
pub fn tcp_kprobe_set_state(ctx: ProbeContext) -> u32 {
    if try_set_state(&ctx).is_err() {
        count_lost(TCP_LOST_READ_ERROR);
    }
    0
}

/// kretprobe on `inet_csk_accept` (returns the accepted `struct sock *`, or NULL).
#[kretprobe]
pub fn tcp_kprobe_accept(ctx: RetProbeContext) -> u32 {
    if try_accept(&ctx).is_err() {
        count_lost(TCP_LOST_READ_ERROR);
    }
    0
}

#[inline(always)]
fn offsets() -> Option<&'static TcpSockOffsets> {
    TCP_SOCK_OFFSETS.get(0).filter(|o| o.ready != 0)
}

/// Reads a `T` at byte `off` of the kernel object at `base`.
#[inline(always)]
fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    unsafe { bpf_probe_read((base + u64::from(off)) as *const T) }.map_err(i64::from)
}

#[inline(always)]
fn on_connect(ctx: &ProbeContext) {
    if offsets().is_none() {
        return;
    }
    let Some(sk) = ctx.arg::<u64>(0) else {
        count_lost(TCP_LOST_READ_ERROR);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::config::tgid_allowed((pid_tgid >> 32) as u32) {
        return;
    }
    let start = TcpConnectStart {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if TCP_CONNECTS.insert(&sk, &start, 0).is_err() {
        count_lost(TCP_LOST_MAP_FULL);
    }
}

#[inline(always)]
fn try_set_state(ctx: &ProbeContext) -> Result<(), i64> {
    let Some(off) = offsets() else {
        return Ok(());
    };
    let sk: u64 = ctx.arg(0).ok_or(-1i64)?;
    let newstate: i32 = ctx.arg(1).ok_or(-1i64)?;
    if newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE {
        return Ok(());
    }
    let oldstate = i32::from(read::<u8>(sk, off.state)?);
    let kind = match (oldstate, newstate) {
        (TCP_SYN_SENT, TCP_ESTABLISHED) => TCP_EVENT_CONNECT_ESTABLISHED,
        (TCP_SYN_SENT, TCP_CLOSE) => TCP_EVENT_CONNECT_FAILED,
        (_, TCP_CLOSE) => {
            // A connect that failed before SYN_SENT leaves its record: drop it with the socket.
            let _ = TCP_CONNECTS.remove(&sk);
            return Ok(());
        }
        _ => return Ok(()),
    };
    // A socket that started connecting before we attached has no record: skip it.
    let Some(start) = (unsafe { TCP_CONNECTS.get(&sk) }) else {
        return Ok(());
    };
    let start = *start;
    let _ = TCP_CONNECTS.remove(&sk);
    let now = unsafe { bpf_ktime_get_ns() };
    let a = addrs(sk, off)?;
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
fn try_accept(ctx: &RetProbeContext) -> Result<(), i64> {
    let Some(off) = offsets() else {
        return Ok(());
    };
    let sk: u64 = ctx.ret();
    if sk == 0 {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !crate::config::tgid_allowed(tgid) {
        return Ok(());
    }
    let a = addrs(sk, off)?;
    let now = unsafe { bpf_ktime_get_ns() };
    send(
        ctx,
        TCP_EVENT_ACCEPT,
        now,
        0,
        unsafe { bpf_get_current_cgroup_id() },
        tgid,
        tgid,
        &bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        &a,
    )
}

/// Family, ports (host order) and addresses of a socket: local = `skc_rcv_saddr`/`skc_num`,
/// remote = `skc_daddr`/`skc_dport` (network order in the kernel).
#[inline(always)]
fn addrs(sk: u64, off: &TcpSockOffsets) -> Result<Addrs, i64> {
    let family: u16 = read(sk, off.family)?;
    let (saddr, daddr) = if family == AF_INET6 {
        (
            read::<[u8; 16]>(sk, off.v6_rcv_saddr)?,
            read::<[u8; 16]>(sk, off.v6_daddr)?,
        )
    } else if family == AF_INET {
        let s: [u8; 4] = read(sk, off.rcv_saddr)?;
        let d: [u8; 4] = read(sk, off.daddr)?;
        (
            [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
    } else {
        return Err(-1);
    };
    Ok(Addrs {
        family,
        sport: read::<u16>(sk, off.num)?,
        dport: u16::from_be(read::<u16>(sk, off.dport)?),
        saddr,
        daddr,
    })
}
