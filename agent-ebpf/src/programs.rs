// The modules and items both kernel objects share, included by `main.rs` (ring buffer) and
// `main_perf.rs` (perf event array) after each declares its own `transport` module, so the two
// objects always carry the same programs.

#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod config;
#[cfg(target_arch = "bpf")]
mod field;
#[cfg(target_arch = "bpf")]
mod sched;
#[cfg(target_arch = "bpf")]
mod syscalls;
#[cfg(target_arch = "bpf")]
mod tcp;
#[cfg(target_arch = "bpf")]
mod tcp_kprobe;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that reaches here; it exists only to satisfy rustc.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Host builds (clippy, `cargo test --workspace`) compile this stub instead of the programs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
