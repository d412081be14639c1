//! TCP connect and accept tracking with kprobes, for kernels without the
//! `sock:inet_sock_set_state` tracepoint (`--tcp-attach kprobe`, or `auto` when it is missing).
//! Same events, maps and drop counters as the tracepoint path (`tcp.rs`).
//!
//! - `tcp_set_state(sk, state)` entry: the old state is `sk->sk_state`, still unchanged.
//!   -> SYN_SENT (called by tcp_v4_connect / tcp_v6_connect, in the connecting task) records who
//!   and when, keyed by the `struct sock *` (first argument); SYN_SENT -> ESTABLISHED / CLOSE
//!   emits the outcome. Every socket that enters SYN_SENT leaves it through tcp_set_state, so
//!   no record outlives its connect (a start taken at tcp_v4_connect's entry did when the
//!   route lookup failed before SYN_SENT).
//! - `inet_csk_accept` return (the accepting task): the new `struct sock *`, emitted as an accept
//!   (at accept() time, where the tracepoint path counts the completed handshake).
//!
//! `struct sock_common` offsets come from userspace (`TCP_SOCK_OFFSETS` in `tcp.rs`: from BTF
//! when there is some, else a table), and fields are read with `bpf_probe_read` (4.19-safe),
//! as the raw tracepoint reads them (`tcp::Sock`). Register
//! access for the arguments is per architecture: aya-ebpf's `ProbeContext::arg` reads `pt_regs`
//! as the target architecture lays it out (the object is built per architecture).

use agent_common::{
    COMM_LEN,
    tcp::{
        TCP_CLOSE, TCP_ESTABLISHED, TCP_EVENT_ACCEPT, TCP_EVENT_CONNECT_ESTABLISHED,
        TCP_EVENT_CONNECT_FAILED, TCP_LOST_READ_ERROR, TCP_SYN_SENT,
    },
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_get_current_cgroup_id,
    },
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::tcp::{
    Sock, SockFields as _, count_lost, on_connect_done, on_connect_start, read, send, sock_offsets,
};

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
fn try_set_state(ctx: &ProbeContext) -> Result<(), i64> {
    let Some(off) = sock_offsets() else {
        return Ok(());
    };
    let sk: u64 = ctx.arg(0).ok_or(-1i64)?;
    let newstate: i32 = ctx.arg(1).ok_or(-1i64)?;
    if newstate == TCP_SYN_SENT {
        // Called by tcp_v4_connect / tcp_v6_connect, in the connecting task.
        return on_connect_start(sk);
    }
    if newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE {
        return Ok(());
    }
    let oldstate = i32::from(read::<u8>(sk, off.state)?);
    let kind = match (oldstate, newstate) {
        (TCP_SYN_SENT, TCP_ESTABLISHED) => TCP_EVENT_CONNECT_ESTABLISHED,
        (TCP_SYN_SENT, TCP_CLOSE) => TCP_EVENT_CONNECT_FAILED,
        _ => return Ok(()),
    };
    on_connect_done(ctx, &Sock { sk, off }, sk, kind)
}

#[inline(always)]
fn try_accept(ctx: &RetProbeContext) -> Result<(), i64> {
    let Some(off) = sock_offsets() else {
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
    let Some(a) = (Sock { sk, off }).addrs()? else {
        return Err(-1);
    };
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
