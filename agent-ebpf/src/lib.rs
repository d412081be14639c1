//! Host-side stub so `agent` can build-depend on this crate (see Cargo.toml). The kernel
//! programs live in the `tanzhen-ebpf` bin.
#![no_std]
