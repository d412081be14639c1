//! Link settings for the kernel object. Only link args reach the nested eBPF build (aya-build
//! overrides RUSTFLAGS), so this is where bpf-linker options go.

fn main() {
    // Rebuild the object when a new bpf-linker is installed.
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // Host builds of the stub bin link with cc, which does not know these flags.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        // Expand memset/memcpy inline instead of calling the looping helpers in .text:
        // a loop needs kernel >= 5.3 (bounded loops) and we target 4.19.
        println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    }
}
