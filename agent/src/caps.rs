//! Start-up capability check: loading and attaching the probes needs CAP_SYS_ADMIN, or
//! CAP_BPF and CAP_PERFMON (Linux 5.8+). Read from `CapEff` in /proc/self/status.

/// CAP_SYS_ADMIN's bit number.
pub const CAP_SYS_ADMIN: u32 = 21;
/// CAP_PERFMON's bit number (Linux 5.8+).
pub const CAP_PERFMON: u32 = 38;
/// CAP_BPF's bit number (Linux 5.8+).
pub const CAP_BPF: u32 = 39;

/// The effective capability mask in the text of /proc/PID/status (`CapEff:\t000001ffffffffff`);
/// `None` when the line is missing or malformed.
#[must_use]
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// `None` when `eff` is enough to load the probes, else the one-line error naming what is
/// missing and how to grant it.
#[must_use]
pub fn missing(eff: u64) -> Option<String> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let lacking: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .iter()
        .filter(|&&(bit, _)| !has(bit))
        .map(|&(_, name)| name)
        .collect();
    Some(format!(
        "missing capabilities: {} (loading the probes needs CAP_BPF and CAP_PERFMON, or \
         CAP_SYS_ADMIN); run as root, or grant CAP_BPF and CAP_PERFMON: \
         AmbientCapabilities=CAP_BPF CAP_PERFMON in the systemd unit, \
         securityContext.capabilities.add: [BPF, PERFMON] in Kubernetes",
        lacking.join(", ")
    ))
}

/// Checks this process's effective capabilities; `Err` is the line to print. An unreadable
/// /proc/self/status passes (the kernel will then say EPERM at load time).
pub fn check() -> Result<(), String> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    match parse_cap_eff(&status).and_then(missing) {
        Some(line) => Err(line),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\ttanzhen\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapPrm:\t1\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\t\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\t11111111111111111\n"), None);
    }

    #[test]
    fn needs_sys_admin_or_bpf_and_perfmon() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(missing(bit(CAP_SYS_ADMIN)), None);
        assert_eq!(missing(bit(CAP_BPF) | bit(CAP_PERFMON)), None);
        assert_eq!(missing(u64::MAX), None);
        let none = missing(0).unwrap();
        assert!(
            none.starts_with("missing capabilities: CAP_BPF, CAP_PERFMON (loading the probes needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN); run as root"),
            "{none}"
        );
        let only_bpf = missing(bit(CAP_BPF)).unwrap();
        assert!(
            only_bpf.starts_with("missing capabilities: CAP_PERFMON ("),
            "{only_bpf}"
        );
        assert!(!only_bpf.contains('\n'));
    }
}
