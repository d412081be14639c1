//! BPF features of the running kernel, found by trying them (creating a map, loading a tiny
//! program), never guessed from the version number: backports make version numbers lie on
//! enterprise kernels (openEuler, Kylin).

use std::{io, path::Path};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// One probed feature: `Some(supported)`, or `None` when the probe itself failed (e.g. no
/// permission), with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probed {
    pub supported: Option<bool>,
    pub error: Option<String>,
}

impl Probed {
    fn from<E: std::fmt::Display>(r: Result<bool, E>) -> Self {
        match r {
            Ok(b) => Self {
                supported: Some(b),
                error: None,
            },
            Err(e) => Self {
                supported: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// The BPF features tanzhen's probes, transports and fallbacks depend on.
#[derive(Clone, Debug)]
pub struct Features {
    /// `BPF_MAP_TYPE_RINGBUF` (5.8): the ring buffer transport.
    pub ringbuf: Probed,
    /// `BPF_MAP_TYPE_PERF_EVENT_ARRAY` (4.3): the perf transport.
    pub perf_event_array: Probed,
    /// Global data (`.rodata`/`.data`/`.bss` maps, 5.2): tanzhen does not need it.
    pub global_data: Probed,
    /// Bounded loops (5.3): tanzhen does not need them (its programs are loop-free).
    pub bounded_loops: Probed,
    /// `bpf_probe_read_kernel` (5.5): tanzhen uses `bpf_probe_read` instead.
    pub probe_read_kernel: Probed,
    /// `bpf_get_current_cgroup_id` from tracepoint programs (4.18).
    pub cgroup_id_helper: Probed,
    /// Tracepoint programs (4.7).
    pub tracepoint_programs: Probed,
    /// Raw tracepoint programs (4.17): the syscalls probe.
    pub raw_tracepoint_programs: Probed,
    /// kprobe programs (4.1).
    pub kprobe_programs: Probed,
}

impl Features {
    /// Probes every feature (a few map creations and program loads; some milliseconds).
    #[must_use]
    pub fn probe() -> Self {
        crate::kernel::raise_memlock_rlimit();
        let f = aya::features();
        Self {
            ringbuf: Probed::from(is_map_supported(MapType::RingBuf)),
            perf_event_array: Probed::from(is_map_supported(MapType::PerfEventArray)),
            global_data: Probed::from(Ok::<_, String>(f.bpf_global_data())),
            bounded_loops: Probed::from(bounded_loops()),
            probe_read_kernel: Probed::from(Ok::<_, String>(f.bpf_probe_read_kernel())),
            cgroup_id_helper: Probed::from(is_helper_supported(
                ProgramType::TracePoint,
                BpfHelper::BPF_FUNC_get_current_cgroup_id,
            )),
            tracepoint_programs: Probed::from(is_program_supported(ProgramType::TracePoint)),
            raw_tracepoint_programs: Probed::from(is_program_supported(ProgramType::RawTracePoint)),
            kprobe_programs: Probed::from(is_program_supported(ProgramType::KProbe)),
        }
    }
}

/// Whether the verifier accepts a loop it can prove bounded (5.3+): loads a four-instruction
/// socket filter with a back-edge (`r0 = 0; r0 += 1; if r0 < 4 goto -2; exit`).
pub fn bounded_loops() -> Result<bool, String> {
    const SOCKET_FILTER: u32 = 1;
    // code, dst|src<<4, off, imm
    let insns: [(u8, u8, i16, i32); 4] = [
        (0xb7, 0, 0, 0),  // mov64 r0, 0
        (0x07, 0, 0, 1),  // add64 r0, 1
        (0xa5, 0, -2, 4), // jlt r0, 4, -2 (eBPF CPU v2, 4.14)
        (0x95, 0, 0, 0),  // exit
    ];
    let mut code = [0u8; 32];
    for (i, &(op, regs, off, imm)) in insns.iter().enumerate() {
        let c = &mut code[i * 8..i * 8 + 8];
        c[0] = op;
        c[1] = regs;
        c[2..4].copy_from_slice(&off.to_le_bytes());
        c[4..8].copy_from_slice(&imm.to_le_bytes());
    }
    match prog_load(SOCKET_FILTER, &code) {
        Ok(()) => Ok(true),
        // The verifier's "back-edge from insn 2 to 1" (or "infinite loop" on later kernels).
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(format!("loading a test program: {e}")),
    }
}

/// `BPF_PROG_LOAD` of `insns` (8-byte instructions) as `prog_type`; the fd is closed at once.
fn prog_load(prog_type: u32, insns: &[u8]) -> io::Result<()> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD: prog_type u32, insn_cnt u32, insns u64, license u64, ...
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    let cnt =
        u32::try_from(insns.len() / 8).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    attr[4..8].copy_from_slice(&cnt.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr holds valid pointers to insns and license, which outlive the call; the
    // kernel reads at most sizeof(attr) bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Whether this kernel can attach kprobes: the `kprobe` perf PMU (4.17+), or the legacy
/// `kprobe_events` file in tracefs. `Err` names what is missing.
pub fn kprobes(tracefs: Option<&Path>) -> Result<String, String> {
    let pmu = Path::new("/sys/bus/event_source/devices/kprobe/type");
    if pmu.exists() {
        return Ok(format!("kprobe PMU ({})", pmu.display()));
    }
    if let Some(t) = tracefs {
        let legacy = t.join("kprobe_events");
        if legacy.exists() {
            return Ok(format!("legacy {}", legacy.display()));
        }
    }
    Err(format!(
        "no {} and no kprobe_events in tracefs: the kernel lacks CONFIG_KPROBE_EVENTS",
        pmu.display()
    ))
}

/// The kernel lockdown mode from /sys/kernel/security/lockdown (`[none] integrity
/// confidentiality`): `None` when the kernel has no lockdown LSM. Under `confidentiality`,
/// `bpf_probe_read` of kernel memory is refused.
#[must_use]
pub fn lockdown() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    parse_lockdown(&text)
}

/// The bracketed word of a lockdown file's text.
#[must_use]
pub fn parse_lockdown(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockdown_modes() {
        assert_eq!(
            parse_lockdown("[none] integrity confidentiality\n").as_deref(),
            Some("none")
        );
        assert_eq!(
            parse_lockdown("none integrity [confidentiality]\n").as_deref(),
            Some("confidentiality")
        );
        assert_eq!(parse_lockdown("garbage"), None);
    }
}
