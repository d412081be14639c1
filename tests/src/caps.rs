//! The start-up capability check, exercised for real: the binary runs as root under
//! `setpriv` (util-linux) with capabilities removed from its bounding set, so its effective
//! set after exec lacks them.

use std::process::Command;

use crate::{Agent, require_root, tanzhen_bin};

const HOW: &str = " (loading the probes needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN); run as root, or grant CAP_BPF and CAP_PERFMON: AmbientCapabilities=CAP_BPF CAP_PERFMON in the systemd unit, securityContext.capabilities.add: [BPF, PERFMON] in Kubernetes\n";

fn run_without(caps: &str) -> (Option<i32>, String) {
    require_root();
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", &format!("--bounding-set={caps}")])
        .arg(tanzhen_bin())
        .args(["run", "--probes", "tcp", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run setpriv (util-linux)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refuses_to_start_without_bpf_capabilities() {
    let (code, err) = run_without("-sys_admin,-bpf,-perfmon");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        format!("tanzhen: error: missing capabilities: CAP_BPF, CAP_PERFMON{HOW}")
    );
    let (code, err) = run_without("-sys_admin,-perfmon");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        format!("tanzhen: error: missing capabilities: CAP_PERFMON{HOW}")
    );
}

#[test]
fn cap_bpf_and_cap_perfmon_are_enough() {
    let agent = Agent::start_wrapped(
        &["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin"],
        &["--probes", "tcp"],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap();
    assert_eq!(eff & (1 << 21), 0, "CAP_SYS_ADMIN still held: {eff:x}");
    assert_eq!(
        agent.scrape().sum("tanzhen_probe_up", &[("probe", "tcp")]),
        1.0
    );
}

/// CAP_DAC_READ_SEARCH | CAP_SYS_PTRACE: what the agent keeps for reading /proc.
const KEEP_RUNTIME: u64 = (1 << 2) | (1 << 19);
/// CAP_SYS_ADMIN | CAP_SYS_RESOURCE | CAP_PERFMON | CAP_BPF: what loading probes needs.
const KEEP_LOAD: u64 = (1 << 21) | (1 << 24) | (1 << 38) | (1 << 39);

/// CapEff, CapPrm and CapBnd of every task (thread) of `pid`.
fn task_caps(pid: u32) -> Vec<(String, [u64; 3])> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = e.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .unwrap()
        };
        out.push((tid, [field("CapEff:"), field("CapPrm:"), field("CapBnd:")]));
    }
    out
}

/// `tanzhen run` as root keeps only what loading probes and reading /proc need, in every
/// thread, and still counts.
#[test]
fn unused_capabilities_are_dropped_in_every_thread() {
    let agent = crate::Agent::start(&["--probes", "tcp"]);
    // What we hold of them (a container may lack some, e.g. CAP_SYS_RESOURCE).
    let keep = (KEEP_RUNTIME | KEEP_LOAD) & task_caps(std::process::id())[0].1[0];
    assert_ne!(keep & (1 << 21), 0, "the tests run with CAP_SYS_ADMIN");
    let tasks = task_caps(agent.pid());
    assert!(
        tasks.len() >= 4,
        "main thread, runtime workers, HTTP thread: {tasks:?}"
    );
    for (tid, [eff, prm, bnd]) in &tasks {
        assert_eq!(*eff, keep, "task {tid} CapEff");
        assert_eq!(*prm, keep, "task {tid} CapPrm");
        assert_eq!(*bnd, keep, "task {tid} CapBnd");
    }
    let log = agent.log_text();
    assert!(
        log.contains("capabilities kept: effective, permitted and bounding cap_dac_read_search,cap_sys_ptrace,cap_sys_admin,"),
        "{log}"
    );
    let comm = crate::comm("tzcap");
    let closed: std::net::SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
    std::thread::Builder::new()
        .name(comm.clone())
        .spawn(move || {
            for _ in 0..4 {
                assert!(std::net::TcpStream::connect(closed).is_err());
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let failed = |m: &crate::Metrics| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &comm), ("outcome", "failed")],
        )
    };
    let m = crate::wait_for(&agent, std::time::Duration::from_secs(20), |m| {
        failed(m) >= 4.0
    });
    assert_eq!(failed(&m), 4.0);
}

/// `--drop-caps`: after attaching, every thread keeps only CAP_DAC_READ_SEARCH and
/// CAP_SYS_PTRACE (this kernel reads maps without CAP_BPF); the probes keep counting, the
/// listening-port scan of other processes still works, and SIGHUP cannot attach a new probe.
#[test]
fn drop_caps_leaves_only_proc_reading_in_every_thread() {
    let config = std::env::temp_dir().join(format!("tanzhen-{}-caps.toml", std::process::id()));
    std::fs::write(
        &config,
        "probes = [\"tcp\", \"syscalls\"]\ndrop_caps = true\n",
    )
    .unwrap();
    let agent = crate::Agent::start(&["--config", config.to_str().unwrap()]);
    let tasks = task_caps(agent.pid());
    assert!(
        tasks.len() >= 4,
        "main thread, runtime workers, HTTP thread: {tasks:?}"
    );
    for (tid, [eff, prm, bnd]) in &tasks {
        assert_eq!(*eff, KEEP_RUNTIME, "task {tid} CapEff");
        assert_eq!(*prm, KEEP_RUNTIME, "task {tid} CapPrm");
        assert_eq!(*bnd, KEEP_RUNTIME, "task {tid} CapBnd");
    }
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "--drop-caps: capabilities of all {} threads now: effective, permitted and bounding cap_dac_read_search,cap_sys_ptrace; SIGHUP can no longer attach probes",
            tasks.len()
        )),
        "{log}"
    );

    // Maps are still read: connects and syscalls are counted after the drop.
    let comm = crate::comm("tzdrop");
    let closed: std::net::SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
    std::thread::Builder::new()
        .name(comm.clone())
        .spawn(move || {
            for _ in 0..5 {
                assert!(std::net::TcpStream::connect(closed).is_err());
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let failed = |m: &crate::Metrics| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &comm), ("outcome", "failed")],
        )
    };
    let m = crate::wait_for(&agent, std::time::Duration::from_secs(20), |m| {
        failed(m) >= 5.0 && m.sum("tanzhen_syscalls_total", &[]) > 0.0
    });
    assert_eq!(failed(&m), 5.0);
    assert!(m.sum("tanzhen_syscalls_total", &[]) > 0.0, "{}", m.0);

    // SIGHUP adding a probe is refused with the fix; the others keep running.
    std::fs::write(
        &config,
        "probes = [\"tcp\", \"syscalls\", \"sched\"]\ndrop_caps = true\n",
    )
    .unwrap();
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) }, 0);
    let m = crate::wait_for(&agent, std::time::Duration::from_secs(20), |_| {
        agent
            .log_text()
            .contains("SIGHUP: probe `sched` failed to attach")
    });
    let log = agent.log_text();
    assert!(
        log.contains("SIGHUP: probe `sched` failed to attach: probe `sched` cannot run on this kernel: --drop-caps dropped the capabilities that load probes after start-up; restart tanzhen to attach it"),
        "{log}"
    );
    assert_eq!(m.sum("tanzhen_probe_up", &[("probe", "tcp")]), 1.0);
    let _ = std::fs::remove_file(&config);
}
