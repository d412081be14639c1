//! `tanzhen check`: the JSON report against facts read here independently (uname, /proc,
//! /sys), and its exit codes (0 when every requested probe can load, 1 otherwise, 2 for bad
//! flags), including the kprobe TCP path, which this machine cannot run.

use std::{path::Path, process::Command};

use serde_json::Value;

use crate::{Agent, require_root, tanzhen_bin};

/// Runs `tanzhen <args>` (optionally under a wrapper); returns exit code, stdout, stderr.
fn run(wrapper: &[&str], args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = match wrapper {
        [] => Command::new(tanzhen_bin()),
        [prog, rest @ ..] => {
            let mut c = Command::new(prog);
            c.args(rest).arg(tanzhen_bin());
            c
        }
    };
    let out = cmd.args(args).output().expect("run tanzhen");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_json(wrapper: &[&str], args: &[&str]) -> (Option<i32>, Value) {
    let mut argv = vec!["check", "--output", "json"];
    argv.extend_from_slice(args);
    let (code, out, err) = run(wrapper, &argv);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}\n{err}"));
    (code, v)
}

/// Whether this kernel can attach kprobes, read here the way an operator would.
fn kprobes_here() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists()
}

fn cap_eff_here() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_owned()
}

fn probe<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no probe {name} in {v:#}"))
}

#[test]
fn json_report_matches_this_machine() {
    require_root();
    let (code, v) = check_json(&[], &[]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["ok"], true);

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(v["kernel"]["release"], release.trim());
    let machine = Command::new("uname").arg("-m").output().unwrap();
    assert_eq!(
        v["kernel"]["arch"],
        String::from_utf8_lossy(&machine.stdout).trim()
    );
    let btf_here = Path::new("/sys/kernel/btf/vmlinux").exists();
    assert_eq!(v["btf"]["kernel"], btf_here);
    assert_eq!(v["btf"]["source"], if btf_here { "kernel" } else { "none" });

    // This machine: kernel 6.18 with every BPF feature tanzhen probes for.
    for f in [
        "ringbuf",
        "perf_event_array",
        "global_data",
        "bounded_loops",
        "probe_read_kernel",
        "get_current_cgroup_id",
        "tracepoint_programs",
        "raw_tracepoint_programs",
    ] {
        assert_eq!(v["features"][f], true, "{f}: {v:#}");
    }
    assert_eq!(v["feature_errors"], serde_json::json!({}));
    assert_eq!(v["kprobes"]["supported"], kprobes_here(), "{v:#}");
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").ok();
    assert_eq!(v["lockdown"].is_null(), lockdown.is_none(), "{v:#}");
    assert_eq!(v["capabilities"]["cap_eff"], cap_eff_here());
    assert_eq!(v["capabilities"]["enough"], true);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let tracefs = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("tracefs"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("tracefs mounted");
    assert_eq!(v["tracefs"]["path"], tracefs);
    assert_eq!(v["transport"]["requested"], "auto");
    assert_eq!(v["transport"]["selected"], "ringbuf");

    let tcp = probe(&v, "tcp");
    assert_eq!(tcp["ok"], true);
    // This kernel has BTF: the raw form of the tracepoint.
    assert_eq!(tcp["attach_method"], "raw_tracepoint");
    assert_eq!(
        tcp["attach"],
        "raw tracepoint inet_sock_set_state (struct sock offsets from BTF)"
    );
    assert_eq!(tcp["transport"], "ringbuf");
    let sys = probe(&v, "syscalls");
    assert_eq!(
        (&sys["ok"], &sys["attach_method"], &sys["transport"]),
        (
            &Value::Bool(true),
            &Value::from("raw_tracepoint"),
            &Value::Null
        )
    );
    let sched = probe(&v, "sched");
    assert_eq!(
        (&sched["ok"], &sched["transport"]),
        (&Value::Bool(true), &Value::from("ringbuf"))
    );

    // The table says the same.
    let (code, table, _) = run(&[], &["check"]);
    assert_eq!(code, Some(0));
    assert!(table.contains(release.trim()), "{table}");
    assert!(table.contains("BPF ring buffer            yes"), "{table}");
    assert!(
        table.contains(
            "probe tcp                  ok: raw tracepoint inet_sock_set_state (struct sock offsets from BTF) via ringbuf"
        ),
        "{table}"
    );
}

#[test]
fn old_kernel_choices_are_reported() {
    require_root();
    let (code, v) = check_json(&[], &["--transport", "perf", "--btf", "none"]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["transport"]["selected"], "perf");
    assert_eq!(v["btf"]["source"], "none");
    assert!(v["btf"]["path"].is_null());
    assert_eq!(probe(&v, "tcp")["transport"], "perf");
    assert_eq!(probe(&v, "sched")["transport"], "perf");

    // A BTF file instead of the kernel's.
    let (code, v) = check_json(&[], &["--btf-path", "/sys/kernel/btf/vmlinux"]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["btf"]["source"], "file");
    assert_eq!(v["btf"]["path"], "/sys/kernel/btf/vmlinux");

    // Only the probes asked for.
    let (code, v) = check_json(&[], &["--probes", "sched"]);
    assert_eq!(code, Some(0));
    assert_eq!(v["probes"].as_array().unwrap().len(), 1);
}

#[test]
fn kprobe_tcp_path_is_reported_and_refused_where_kprobes_are_missing() {
    require_root();
    let (code, v) = check_json(&[], &["--probes", "tcp", "--tcp-attach", "kprobe"]);
    let tcp = probe(&v, "tcp");
    assert_eq!(tcp["attach_method"], "kprobe");
    assert_eq!(
        tcp["attach"],
        "kprobe tcp_set_state, kretprobe inet_csk_accept"
    );
    if kprobes_here() {
        assert_eq!(code, Some(0), "{v:#}");
        return;
    }
    // No kprobes on this kernel: the programs load (the verifier accepts them, so no problem
    // is reported for them), but they cannot attach.
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["ok"], false);
    let problems: Vec<&str> = tcp["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        problems,
        [
            "kprobes are not available: no /sys/bus/event_source/devices/kprobe/type and no kprobe_events in tracefs: the kernel lacks CONFIG_KPROBE_EVENTS"
        ],
    );
    // The perf object's kprobe programs load too.
    let (code, v) = check_json(
        &[],
        &[
            "--probes",
            "tcp",
            "--tcp-attach",
            "kprobe",
            "--transport",
            "perf",
        ],
    );
    assert_eq!(code, Some(1));
    assert_eq!(probe(&v, "tcp")["problems"].as_array().unwrap().len(), 1);

    // `run --tcp-attach kprobe`: one line, exit 1, nothing attached.
    let (code, _, err) = run(
        &[],
        &["run", "--tcp-attach", "kprobe", "--listen", "127.0.0.1:0"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tanzhen: error: --tcp-attach kprobe: this kernel cannot attach kprobes"),
        "{err}"
    );
    // `auto` keeps the tracepoint here: raw with BTF (unless the compatibility pass took it
    // away), classic without.
    let no_btf = crate::extra_args().iter().any(|a| a == "none");
    if !no_btf {
        let agent = Agent::start(&["--probes", "tcp", "--tcp-attach", "auto"]);
        assert!(
            agent
                .log_text()
                .contains("tcp attach: raw tracepoint inet_sock_set_state"),
            "{}",
            agent.log_text()
        );
    }
    let btf_none: &[&str] = if no_btf { &[] } else { &["--btf", "none"] };
    let agent = Agent::start(&[&["--probes", "tcp", "--tcp-attach", "auto"], btf_none].concat());
    assert!(
        agent
            .log_text()
            .contains("tcp attach: tracepoint sock:inet_sock_set_state"),
        "{}",
        agent.log_text()
    );
    drop(agent);

    // The raw form needs BTF: `check` says why, `run` exits 1 with one line.
    let (code, v) = check_json(
        &[],
        &[
            "--probes",
            "tcp",
            "--tcp-attach",
            "raw-tracepoint",
            "--btf",
            "none",
        ],
    );
    assert_eq!(code, Some(1), "{v:#}");
    let problems = probe(&v, "tcp")["problems"].clone();
    assert!(
        problems.to_string().contains("the kernel has no BTF"),
        "{problems}"
    );
    let (code, _, err) = run(
        &[],
        &[
            "run",
            "--tcp-attach",
            "raw-tracepoint",
            "--btf",
            "none",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tanzhen: error: --tcp-attach raw-tracepoint: no struct sock offsets"),
        "{err}"
    );
}

#[test]
fn missing_capabilities_fail_every_probe() {
    require_root();
    let (code, v) = check_json(
        &[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-sys_admin,-bpf,-perfmon",
        ],
        &["--probes", "tcp,syscalls"],
    );
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["capabilities"]["enough"], false);
    assert_eq!(v["capabilities"]["CAP_BPF"], false);
    for name in ["tcp", "syscalls"] {
        let p = probe(&v, name);
        assert_eq!(p["ok"], false);
        let why = p["problems"][0].as_str().unwrap();
        assert!(
            why.starts_with(
                "cannot load the eBPF object: missing capabilities: CAP_BPF, CAP_PERFMON"
            ),
            "{why}"
        );
    }
}

#[test]
fn bad_check_flags_exit_2_with_one_line() {
    for (args, needle) in [
        (&["check", "--output", "xml"][..], "xml"),
        (
            &["check", "--btf", "none", "--btf-path", "/x"][..],
            "contradict",
        ),
        (
            &["check", "--btf-path", "/nonexistent.btf"][..],
            "cannot read BTF from /nonexistent.btf",
        ),
        (&["check", "--probes", "nope"][..], "unknown probe `nope`"),
    ] {
        let (code, _, err) = run(&[], args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
