//! Types shared between tanzhen's kernel programs (`agent-ebpf`) and its userspace daemon
//! (`agent`): event layouts, map value structs, map names and histogram slot math.
//!
//! Everything here is `#[repr(C)]` with explicit padding and fixed-width integers (no `bool`, no
//! Rust enums on the wire), so both sides agree on the bytes whatever compiler built them.
#![no_std]

pub mod hist;
pub mod sched;
pub mod tcp;

/// Size of the kernel's `TASK_COMM_LEN`: a task name plus its NUL.
pub const COMM_LEN: usize = 16;
