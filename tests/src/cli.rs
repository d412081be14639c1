//! The binary's command line: exit codes and one-line errors for bad input, the probe
//! catalogue, the kernel report and `--version`.

use std::{net::TcpListener, process::Command};

use crate::tanzhen_bin;

fn tanzhen(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(tanzhen_bin())
        .args(args)
        .output()
        .expect("run tanzhen");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let (code, _, err) = tanzhen(args);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?} must print one line: {err}"
    );
    assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    assert_usage_error(
        &["run", "--probes", "tcp,bogus"],
        "unknown probe `bogus`; available probes: tcp, syscalls, sched",
    );
    assert_usage_error(&["run", "--interval", "soon"], "is not an interval");
    assert_usage_error(
        &["run", "--listen", "nonsense"],
        "is not an IP:PORT address",
    );
    assert_usage_error(&["run", "--interval", "5h"], "is not an interval");
    assert_usage_error(
        &["run", "--syscalls-comm-filter", "(x"],
        "is not a valid regular expression",
    );
}

#[test]
fn missing_pid_exits_2_with_one_line() {
    crate::require_root();
    let addr = format!("127.0.0.1:{}", crate::free_port());
    assert_usage_error(
        &["run", "--pid", "999999999", "--listen", &addr],
        "--pid 999999999: no such process",
    );
}

#[test]
fn busy_port_exits_2_with_one_line() {
    crate::require_root();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    assert_usage_error(
        &["run", "--probes", "tcp", "--listen", &addr],
        "already in use",
    );
}

#[test]
fn version_names_the_git_revision() {
    let (code, out, _) = tanzhen(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("tanzhen ") && out.contains("(git "),
        "{out}"
    );
}

#[test]
fn probes_lists_hooks_and_kernels() {
    let (code, out, _) = tanzhen(&["probes"]);
    assert_eq!(code, Some(0));
    for needle in [
        "tcp",
        "tracepoint sock:inet_sock_set_state",
        "min kernel:  4.16",
        "syscalls",
        "sched",
        "tracepoint sched:sched_switch",
        "tracepoint sched:sched_process_exec",
        "tanzhen_sched_context_switches_total{comm,kind}",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
}

#[test]
fn check_reports_this_kernel() {
    crate::require_root();
    let (code, out, err) = tanzhen(&["check"]);
    // This machine (6.x with BTF and ring buffer) runs every built probe.
    assert_eq!(code, Some(0), "{out}{err}");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(out.contains(release.trim()), "{out}");
    assert!(out.contains("BPF ring buffer            yes"), "{out}");
    assert!(out.contains("probe tcp                  ok"), "{out}");
    assert!(out.contains("probe sched                ok"), "{out}");
}
