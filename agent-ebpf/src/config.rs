//! Settings every probe's programs share ([`AGENT_CONFIG`]), written by userspace before
//! attach. A map rather than global data, so the object loads on 4.19 without BTF.

use agent_common::AgentConfig;
use aya_ebpf::{macros::map, maps::Array};

#[map]
static AGENT_CONFIG: Array<AgentConfig> = Array::with_max_entries(1, 0);

/// Whether events of process `tgid` are recorded (`--pid`; everything when unset).
#[inline(always)]
pub fn tgid_allowed(tgid: u32) -> bool {
    match AGENT_CONFIG.get(0) {
        Some(c) => c.filter_tgid == 0 || c.filter_tgid == tgid,
        None => true,
    }
}
