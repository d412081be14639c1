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

/// Parses the object and creates its maps (programs are loaded by each probe), with the
/// capacities of `max_entries` (map name, entries) instead of the compiled-in ones.
pub fn load(max_entries: &[(&'static str, u32)]) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::EmptyObject);
    }
    crate::kernel::raise_memlock_rlimit();
    let mut loader = EbpfLoader::new();
    for &(name, n) in max_entries {
        loader.map_max_entries(name, n);
    }
    Ok(loader.load(OBJECT)?)
}

/// Writes the settings every probe's programs share (before any of them attaches).
pub fn configure(
    ebpf: &mut Ebpf,
    cfg: agent_common::AgentConfig,
) -> Result<(), aya::maps::MapError> {
    let name = agent_common::AGENT_CONFIG;
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })?;
    aya::maps::Array::try_from(map)?.set(0, cfg, 0)
}
