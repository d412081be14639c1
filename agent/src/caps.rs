//! Capabilities: the start-up check (loading and attaching the probes needs CAP_SYS_ADMIN, or
//! CAP_BPF and CAP_PERFMON on Linux 5.8+; read from `CapEff` in /proc/self/status), and
//! dropping what is no longer needed once the probes are attached.
//!
//! Capabilities are per thread in Linux: capset(2) and PR_CAPBSET_DROP change the calling
//! thread only, and a new thread copies its creator's sets. The agent therefore drops in two
//! steps:
//! 1. [`drop_unused`], before the tokio runtime starts its threads: everything the agent never
//!    needs ([`KEEP_RUNTIME`] and [`KEEP_LOAD`] stay). The main thread is the only thread then,
//!    so every thread created later inherits the reduced sets. No signal is needed.
//! 2. [`drop_all_threads`] (`--drop-caps`), after every probe is attached: the load
//!    capabilities ([`KEEP_LOAD`]) too. Threads exist by then (runtime workers, maybe blocking
//!    threads), and no system call changes another thread's capabilities, so every thread is
//!    asked to drop its own: the same broadcast glibc's setuid(2) uses (SIGSETXID) and libcap's
//!    libpsx provides. A real-time signal goes to each task of /proc/self/task with tgkill(2);
//!    its handler calls PR_CAPBSET_DROP and capset(2) (plain system calls, async-signal-safe).
//!    The result is verified by reading /proc/self/task/*/status, and the signal is sent again
//!    to any task that does not show the reduced sets (e.g. one created meanwhile).
//!
//! Without `--drop-caps` the load capabilities stay so that SIGHUP can attach probes later.

use std::sync::atomic::{AtomicU64, Ordering};

/// CAP_DAC_READ_SEARCH's bit number.
pub const CAP_DAC_READ_SEARCH: u32 = 2;
/// CAP_SETPCAP's bit number.
pub const CAP_SETPCAP: u32 = 8;
/// CAP_SYS_PTRACE's bit number.
pub const CAP_SYS_PTRACE: u32 = 19;
/// CAP_SYS_RESOURCE's bit number.
pub const CAP_SYS_RESOURCE: u32 = 24;
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

/// Capability names by bit number (capability.h), for the log.
const NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

const fn bit(cap: u32) -> u64 {
    1 << cap
}

/// Kept until exit: reading /proc of other processes (their fds for the listening-port scan,
/// comm, cgroup) needs ptrace access (CAP_SYS_PTRACE) and search permission on their
/// directories (CAP_DAC_READ_SEARCH).
pub const KEEP_RUNTIME: u64 = bit(CAP_SYS_PTRACE) | bit(CAP_DAC_READ_SEARCH);

/// Kept while probes may still be loaded (SIGHUP can attach one): BPF, PERFMON and SYS_ADMIN
/// load programs, create maps and open tracepoint perf events (SYS_ADMIN also mounts
/// tracefs; kernels before 5.8 know only it); SYS_RESOURCE raises RLIMIT_MEMLOCK, which
/// kernels before 5.11 charge maps to.
pub const KEEP_LOAD: u64 =
    bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_SYS_ADMIN) | bit(CAP_SYS_RESOURCE);

/// `cap_a,cap_b` for the bits of `mask` (`none` when empty; unknown bits as `cap_N`).
#[must_use]
pub fn names(mask: u64) -> String {
    let v: Vec<String> = (0..64u32)
        .filter(|&b| mask & bit(b) != 0)
        .map(|b| {
            NAMES
                .get(b as usize)
                .map_or_else(|| format!("cap_{b}"), |n| format!("cap_{n}"))
        })
        .collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(",")
    }
}

/// The masks of one task's /proc status: effective, permitted, bounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskCaps {
    pub eff: u64,
    pub prm: u64,
    pub bnd: u64,
}

impl TaskCaps {
    /// Parses `CapEff`, `CapPrm` and `CapBnd` of a /proc/PID/status text.
    #[must_use]
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            let hex = status.lines().find_map(|l| l.strip_prefix(name))?.trim();
            if hex.is_empty() || hex.len() > 16 {
                return None;
            }
            u64::from_str_radix(hex, 16).ok()
        };
        Some(Self {
            eff: field("CapEff:")?,
            prm: field("CapPrm:")?,
            bnd: field("CapBnd:")?,
        })
    }

    /// Whether neither the effective nor the permitted set holds a capability outside `keep`
    /// (the bounding set shrinks too when the agent holds CAP_SETPCAP).
    #[must_use]
    pub fn within(self, keep: u64) -> bool {
        (self.eff | self.prm) & !keep == 0
    }
}

impl std::fmt::Display for TaskCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.eff == self.prm && self.prm == self.bnd {
            write!(f, "effective, permitted and bounding {}", names(self.eff))
        } else {
            write!(
                f,
                "effective {}; permitted {}; bounding {}",
                names(self.eff),
                names(self.prm),
                names(self.bnd)
            )
        }
    }
}

/// Why dropping capabilities failed.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("{call}: {err}")]
    Sys {
        call: &'static str,
        err: std::io::Error,
    },
    #[error("tasks {0:?} still hold capabilities outside the kept set after 20 attempts")]
    Stragglers(Vec<u32>),
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The mask the signal handler keeps (read in the handler: an atomic, no lock).
static KEEP: AtomicU64 = AtomicU64::new(u64::MAX);
/// Highest capability number of this kernel (/proc/sys/kernel/cap_last_cap).
static LAST_CAP: AtomicU64 = AtomicU64::new(40);

/// Drops every capability outside `keep` from the calling thread's bounding, effective,
/// permitted and inheritable sets (and so its ambient set). Only system calls: safe in a
/// signal handler. Returns the failing call's name.
fn drop_self(keep: u64) -> Result<(), &'static str> {
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData for version 3; both pointers are valid.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) } != 0 {
        return Err("capget");
    }
    // Dropping from the bounding set needs CAP_SETPCAP (root has it; an agent given only
    // CAP_BPF and CAP_PERFMON as ambient capabilities does not, and keeps its bounding set).
    if data[0].effective & (1 << CAP_SETPCAP) != 0 {
        let last = LAST_CAP.load(Ordering::Relaxed).min(63);
        for cap in 0..=last {
            if keep & (1 << cap) != 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
            // SAFETY: as above.
            if held == 1 && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                return Err("prctl(PR_CAPBSET_DROP)");
            }
        }
    }
    for (i, d) in data.iter_mut().enumerate() {
        // Truncation intended: half `i` of the 64-bit mask.
        #[expect(clippy::cast_possible_truncation, reason = "32-bit halves")]
        let k = (keep >> (32 * i)) as u32;
        d.effective &= k;
        d.permitted &= k;
        d.inheritable &= k;
    }
    // SAFETY: capset reads the header and two CapData; both pointers are valid.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut hdr, data.as_ptr()) } != 0 {
        return Err("capset");
    }
    Ok(())
}

/// Drops, from the calling thread, every capability outside [`KEEP_RUNTIME`] and
/// [`KEEP_LOAD`] (and CAP_SETPCAP when `later` says the bounding set shrinks again after
/// loading); call it before any other thread exists, so that all threads inherit the result.
/// Returns the sets left.
pub fn drop_unused(later: bool) -> Result<TaskCaps, DropError> {
    let setpcap = if later { bit(CAP_SETPCAP) } else { 0 };
    if let Ok(last) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        && let Ok(n) = last.trim().parse::<u64>()
    {
        LAST_CAP.store(n, Ordering::Relaxed);
    }
    drop_self(KEEP_RUNTIME | KEEP_LOAD | setpcap).map_err(|call| DropError::Sys {
        call,
        err: std::io::Error::last_os_error(),
    })?;
    Ok(own_caps())
}

/// This thread's sets as /proc reports them (all zero when unreadable).
fn own_caps() -> TaskCaps {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| TaskCaps::parse(&s))
        .unwrap_or(TaskCaps {
            eff: 0,
            prm: 0,
            bnd: 0,
        })
}

extern "C" fn on_drop_signal(_: libc::c_int) {
    // Errors cannot be reported from here; the caller verifies every task through /proc.
    let _ = drop_self(KEEP.load(Ordering::Relaxed));
}

/// The signal of the broadcast: a real-time one the C library leaves to applications.
fn drop_signal() -> libc::c_int {
    libc::SIGRTMAX() - 2
}

/// The tasks (threads) of this process and their capability sets.
#[must_use]
pub fn tasks() -> Vec<(u32, Option<TaskCaps>)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut v: Vec<(u32, Option<TaskCaps>)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .map(|tid: u32| {
            let caps = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                .ok()
                .and_then(|s| TaskCaps::parse(&s));
            (tid, caps)
        })
        .collect();
    v.sort_unstable_by_key(|t| t.0);
    v
}

/// Drops every capability outside `keep` in every thread of the process (see the module
/// docs), and returns the sets left (the same in every task).
pub fn drop_all_threads(keep: u64) -> Result<TaskCaps, DropError> {
    let sys = |call| DropError::Sys {
        call,
        err: std::io::Error::last_os_error(),
    };
    KEEP.store(keep, Ordering::Relaxed);
    let sig = drop_signal();
    // SAFETY: installs a handler that only makes system calls; sa_mask empty, SA_RESTART so
    // interrupted system calls of the other threads restart.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_drop_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut sa.sa_mask);
        if libc::sigaction(sig, &raw const sa, std::ptr::null_mut()) != 0 {
            return Err(sys("sigaction"));
        }
    }
    drop_self(keep).map_err(sys)?;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut left = Vec::new();
    for _ in 0..20 {
        left = tasks()
            .into_iter()
            .filter(|(_, caps)| caps.is_some_and(|c| !c.within(keep)))
            .map(|(tid, _)| tid)
            .collect();
        if left.is_empty() {
            return Ok(own_caps());
        }
        for &tid in &left {
            // SAFETY: tgkill with our own pid; a task that exited meanwhile gives ESRCH.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(DropError::Stragglers(left))
}

/// Whether reading the probes' maps after dropping CAP_BPF/CAP_SYS_ADMIN still works on
/// kernel `release` with `kernel.unprivileged_bpf_disabled` = `disabled`: before 6.5 the
/// bpf(2) system call refused every command (map lookups too) without them when unprivileged
/// BPF is disabled.
#[must_use]
pub fn maps_readable_without_bpf_caps(release: (u32, u32), disabled: u32) -> bool {
    disabled == 0 || release >= (6, 5)
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
    fn names_and_sets() {
        assert_eq!(names(0), "none");
        assert_eq!(names(KEEP_RUNTIME), "cap_dac_read_search,cap_sys_ptrace");
        assert_eq!(
            names(KEEP_LOAD | bit(63)),
            "cap_sys_admin,cap_sys_resource,cap_perfmon,cap_bpf,cap_63"
        );
        let t = TaskCaps::parse("CapInh:\t0\nCapPrm:\t0000000000080004\nCapEff:\t0000000000080004\nCapBnd:\t0000000000080004\n").unwrap();
        assert!(t.within(KEEP_RUNTIME));
        assert!(!t.within(bit(CAP_SYS_PTRACE)));
        assert!(
            TaskCaps { bnd: u64::MAX, ..t }.within(KEEP_RUNTIME),
            "the bounding set may stay"
        );
        assert_eq!(
            t.to_string(),
            "effective, permitted and bounding cap_dac_read_search,cap_sys_ptrace"
        );
        assert_eq!(TaskCaps::parse("CapEff:\t0\nCapPrm:\t0\n"), None);
        assert!(maps_readable_without_bpf_caps((4, 19), 0));
        assert!(!maps_readable_without_bpf_caps((5, 15), 2));
        assert!(maps_readable_without_bpf_caps((6, 18), 2));
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
