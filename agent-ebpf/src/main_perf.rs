//! tanzhen's kernel object with the perf event array transport (kernels without a BPF ring
//! buffer, e.g. 4.19): the same modules as `main.rs`, with `transport_perf.rs` instead of
//! `transport_ringbuf.rs` (the shared part is `programs.rs`).
//!
//! Rules for every program here (so the object loads on 4.19 without BTF, see DESIGN.md):
//! no global data (configuration comes through array maps), no loops, helpers from 4.19
//! (`bpf_probe_read`, not `bpf_probe_read_kernel`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic_xadd`: the bpf target has no atomic CAS, so core::sync::atomic has no fetch_add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "atomic_xadd, see sched.rs")
)]

#[cfg(target_arch = "bpf")]
#[path = "transport_perf.rs"]
mod transport;

include!("programs.rs");
