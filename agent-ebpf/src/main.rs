//! tanzhen's kernel object with the ring buffer transport (kernel >= 5.8). One module per probe
//! domain; aya-build compiles this bin for `bpfel-unknown-none` and `agent` embeds the result.
//! `main_perf.rs` builds the same modules over a perf event array: aya creates every map of an
//! object at load time, and a kernel without ring buffers cannot create a `RINGBUF` map.
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
#[path = "transport_ringbuf.rs"]
mod transport;

include!("programs.rs");
