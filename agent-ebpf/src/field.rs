//! Helpers every tracepoint probe shares: reading a record field at a tracefs-provided offset,
//! and bumping a per-CPU counter (drops, and the TCP probe's accepts of unknown listeners).

use agent_common::tcp::FIELD_ABSENT;
use aya_ebpf::{
    EbpfContext as _, helpers::bpf_probe_read, maps::PerCpuArray, programs::TracePointContext,
};

/// Reads a field at a tracefs-provided offset ([`FIELD_ABSENT`] is an error). `bpf_probe_read`
/// (helper 4) rather than `TracePointContext::read_at` (`bpf_probe_read_kernel`, 5.5+) keeps
/// the object 4.19-loadable.
#[inline(always)]
pub fn read<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    if offset == FIELD_ABSENT {
        return Err(-1);
    }
    unsafe { bpf_probe_read(ctx.as_ptr().cast::<u8>().add(offset as usize).cast::<T>()) }
        .map_err(i64::from)
}

/// A record field: a plain load at `known` (a constant the program is compiled with) when the
/// kernel has the probe's known record layout, else [`read`] at the tracefs offset `offset`.
/// The verifier accepts constant-offset reads of a tracepoint record on every kernel; they
/// save a helper call per field.
#[inline(always)]
pub fn read_known<T: Copy>(
    ctx: &TracePointContext,
    known_layout: bool,
    offset: u32,
    known: u32,
) -> Result<T, i64> {
    if known_layout {
        // SAFETY: a constant offset inside the record (the verifier checks it), naturally
        // aligned for T in the known layout.
        Ok(unsafe {
            ctx.as_ptr()
                .cast::<u8>()
                .add(known as usize)
                .cast::<T>()
                .read()
        })
    } else {
        read(ctx, offset)
    }
}

/// Adds `n` to slot `slot` of a per-CPU counter array.
#[inline(always)]
pub fn per_cpu_add(map: &PerCpuArray<u64>, slot: u32, n: u64) {
    if let Some(p) = map.get_ptr_mut(slot) {
        unsafe { *p += n };
    }
}
