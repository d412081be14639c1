//! The embedded kernel object and its loading.

use aya::{Ebpf, EbpfLoader};

/// The object agent/build.rs built from agent-ebpf (ring buffer transport).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tanzhen-ebpf"));

/// Errors loading the object.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this tanzhen binary was built without its eBPF object (AYA_BUILD_SKIP was set); \
         rebuild it after `cargo xtask setup`"
    )]
    EmptyObject,
    #[error(
        "loading the eBPF object failed: {0} (run `tanzhen check` to see what this kernel lacks)"
    )]
    Ebpf(#[from] aya::EbpfError),
}

/// Parses the object and creates its maps (programs are loaded by each probe).
pub fn load() -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::EmptyObject);
    }
    crate::kernel::raise_memlock_rlimit();
    Ok(EbpfLoader::new().load(OBJECT)?)
}
