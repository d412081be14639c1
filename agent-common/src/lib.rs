//! Types shared between tanzhen's kernel programs (`agent-ebpf`) and its userspace daemon
//! (`agent`): event layouts, map value structs, map names and histogram slot math.
//!
//! Everything here is `#[repr(C)]` with explicit padding and fixed-width integers (no `bool`, no
//! Rust enums on the wire), so both sides agree on the bytes whatever compiler built them.
#![no_std]

pub mod bench;
pub mod hist;
pub mod sched;
pub mod syscalls;
pub mod tcp;

/// Size of the kernel's `TASK_COMM_LEN`: a task name plus its NUL.
pub const COMM_LEN: usize = 16;

/// `Array<AgentConfig>` with one entry: settings every probe's programs read.
pub const AGENT_CONFIG: &str = "AGENT_CONFIG";

/// Settings shared by every probe, written by userspace before any program attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Only events of this process (tgid) are recorded; 0 records every process (`--pid`).
    pub filter_tgid: u32,
    pub _pad: u32,
}
#[cfg(feature = "user")]
unsafe impl aya::Pod for AgentConfig {}
