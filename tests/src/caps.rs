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
