//! The configuration file: `tanzhen config default`, `run --config` with its precedence
//! (flag > environment > file > default), one-line errors naming file:line:col, a real agent
//! configured by a file, and SIGHUP reloads.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{Agent, tanzhen_bin};

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("tanzhen-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("rewrite config");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tanzhen(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(tanzhen_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run tanzhen");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn default_config_is_accepted_as_is() {
    let (code, text, err) = tanzhen(&["config", "default"], &[]);
    assert_eq!(code, Some(0), "{err}");
    for key in [
        "probes = \"all\"",
        "listen = \"0.0.0.0:9527\"",
        "log_level = \"info\"",
        "# otlp_endpoint = ",
    ] {
        assert!(text.contains(key), "`{key}` missing from:\n{text}");
    }
    let file = TempFile::new("default.toml", &text);
    let (code, out, err) = tanzhen(&["run", "--config", file.path(), "--dry-run"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.trim(),
        "configuration ok: probes tcp,syscalls,sched; listen 0.0.0.0:9527; otlp off"
    );
}

#[test]
fn flag_beats_environment_beats_file() {
    let file = TempFile::new(
        "precedence.toml",
        "probes = [\"tcp\"]\nlisten = \"127.0.0.1:9601\"\n",
    );
    let dry = |args: &[&str], env: &[(&str, &str)]| {
        let mut v = vec!["run", "--config", file.path(), "--dry-run"];
        v.extend_from_slice(args);
        let (code, out, err) = tanzhen(&v, env);
        assert_eq!(code, Some(0), "{err}");
        out
    };
    assert_eq!(
        dry(&[], &[]).trim(),
        "configuration ok: probes tcp; listen 127.0.0.1:9601; otlp off"
    );
    let env = [("TANZHEN_LISTEN", "127.0.0.1:9602")];
    assert!(dry(&[], &env).contains("listen 127.0.0.1:9602;"));
    assert!(dry(&["--listen", "127.0.0.1:9603"], &env).contains("listen 127.0.0.1:9603;"));
    // The file path itself can come from the environment.
    let (code, out, err) = tanzhen(&["run", "--dry-run"], &[("TANZHEN_CONFIG", file.path())]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("probes tcp; listen 127.0.0.1:9601;"), "{out}");
}

fn assert_file_error(text: &str, expected: impl Fn(&str) -> String) {
    let file = TempFile::new("bad.toml", text);
    let (code, _, err) = tanzhen(&["run", "--config", file.path(), "--dry-run"], &[]);
    assert_eq!(code, Some(2), "{text}: {err}");
    assert_eq!(
        err,
        format!("tanzhen: error: {}\n", expected(file.path())),
        "{text}"
    );
}

#[test]
fn bad_files_exit_2_naming_file_line_and_key() {
    assert_file_error("probes = [\"tcp\"]\ninterval = \"soon\"\n", |p| {
        format!(
            "{p}:2:12: interval: `soon` is not an interval; use e.g. 5s, 500ms or 1m (between 100ms and 3600s)"
        )
    });
    assert_file_error("\nlisten = \"nonsense\"", |p| {
        format!(
            "{p}:2:10: listen: `nonsense` is not an IP:PORT address; use e.g. 0.0.0.0:9527, 127.0.0.1:9527, [::]:9527 or none"
        )
    });
    assert_file_error("log_level = \"loud\"", |p| {
        format!("{p}:1:13: log_level: `loud` is not one of error, warn, info, debug, trace")
    });
    let file = TempFile::new("unknown.toml", "probes = \"tcp\"\nport = 9527\n");
    let (code, _, err) = tanzhen(&["run", "--config", file.path()], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "tanzhen: error: {}:2:1: unknown key `port`; known keys: ",
            file.path()
        )),
        "{err}"
    );
    let file = TempFile::new("syntax.toml", "probes = [\"tcp\"\n");
    let (code, _, err) = tanzhen(&["run", "--config", file.path()], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("tanzhen: error: {}:", file.path())),
        "{err}"
    );
    let (code, _, err) = tanzhen(&["run", "--config", "/nonexistent/tanzhen.toml"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "tanzhen: error: cannot read the configuration file /nonexistent/tanzhen.toml: No such file or directory (os error 2)\n"
    );
}

#[test]
fn agent_runs_the_probes_its_file_names() {
    let file = TempFile::new("tcp-only.toml", "probes = [\"tcp\"]\nseries_ttl = \"1h\"\n");
    let agent = Agent::start(&["--config", file.path()]);
    let m = agent.scrape();
    assert_eq!(m.sum("tanzhen_probe_up", &[("probe", "tcp")]), 1.0);
    assert!(
        m.samples("tanzhen_probe_up")
            .all(|(l, _)| l.iter().all(|(_, v)| v != "sched")),
        "only tcp was configured:\n{}",
        m.0
    );
}

/// Waits until the agent's log contains `needle` (SIGHUP is handled asynchronously).
fn wait_log(agent: &Agent, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = agent.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "`{needle}` not logged within 20 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sighup(agent: &Agent) {
    // SAFETY: plain kill(2) on our own child.
    let rc = unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

#[test]
fn sighup_applies_the_log_level_and_keeps_running_on_a_bad_file() {
    let file = TempFile::new("reload.toml", "probes = [\"tcp\"]\nlog_level = \"info\"\n");
    let agent = Agent::start_with_own_log_level(&["--config", file.path()]);
    assert!(!agent.log_text().contains("DEBUG"), "{}", agent.log_text());

    file.write("probes = [\"tcp\"]\nlog_level = \"debug\"\n");
    sighup(&agent);
    let log = wait_log(&agent, "SIGHUP: log level now Debug");
    assert!(
        log.contains(&format!(
            "SIGHUP: reloaded {}: log_level info -> debug (applied)",
            file.path()
        )),
        "{log}"
    );

    // A bad file changes nothing and the agent keeps serving.
    file.write("probes = [\"tcp\"]\nlog_level = \"debug\"\ninterval = \"soon\"\n");
    sighup(&agent);
    wait_log(
        &agent,
        &format!(
            "SIGHUP: {}:3:12: interval: `soon` is not an interval; use e.g. 5s, 500ms or 1m (between 100ms and 3600s); keeping the running configuration",
            file.path()
        ),
    );
    assert_eq!(
        agent.scrape().sum("tanzhen_probe_up", &[("probe", "tcp")]),
        1.0
    );

    // Changes that need a restart are named as such; back to info stops debug lines.
    file.write("probes = [\"tcp\"]\nlog_level = \"info\"\nseries_ttl = \"1h\"\n");
    sighup(&agent);
    let log = wait_log(&agent, "log_level debug -> info (applied)");
    assert!(
        log.contains("series_ttl 600s -> 3600s (takes effect at the next start)"),
        "{log}"
    );
    let debug_lines = log.matches("DEBUG").count();
    file.write("probes = [\"tcp\"]\nlog_level = \"info\"\n");
    sighup(&agent);
    // Compared with what runs, the TTL change was not applied: this file changes nothing.
    let log = wait_log(&agent, "no changes");
    assert_eq!(log.matches("DEBUG").count(), debug_lines, "{log}");
    assert!(Path::new(file.path()).exists());
}

/// `n` refused connects to a closed loopback port from a thread named `comm`.
fn refused_connects(comm: &str, n: usize) {
    let closed: std::net::SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
    std::thread::Builder::new()
        .name(comm.to_owned())
        .spawn(move || {
            for _ in 0..n {
                assert!(std::net::TcpStream::connect(closed).is_err());
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Open attachments of `pid`: one BPF link per attached tracepoint (a perf event fd on kernels
/// without perf links).
fn perf_events(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| {
            let l = l.to_string_lossy();
            l == "anon_inode:bpf_link" || l == "anon_inode:[perf_event]"
        })
        .count()
}

/// Perf buffers (one `[perf_event]` fd per online CPU) of `probes` event-sending probes when
/// the tests run with `--transport perf`; none with the ring buffer.
fn perf_buffers(probes: usize) -> usize {
    if !crate::extra_args().join(" ").contains("--transport perf") {
        return 0;
    }
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let cpus: usize = online
        .trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum();
    probes * cpus
}

#[test]
fn sighup_attaches_and_detaches_probes_keeping_counters() {
    let file = TempFile::new("probes.toml", "probes = [\"tcp\"]\n");
    let agent = Agent::start(&["--config", file.path()]);
    let mut comm = format!("tzhup{}", std::process::id());
    comm.truncate(15);
    let failed = |m: &crate::Metrics| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &comm), ("outcome", "failed")],
        )
    };
    let switches = |m: &crate::Metrics| m.sum("tanzhen_sched_context_switches_total", &[]);
    refused_connects(&comm, 7);
    let m = crate::wait_for(&agent, Duration::from_secs(20), |m| failed(m) >= 7.0);
    assert_eq!(failed(&m), 7.0);
    assert_eq!(m.samples("tanzhen_probe_up").count(), 1, "{}", m.0);

    // Add sched at runtime: it attaches and counts; tcp keeps its counts and keeps counting.
    file.write("probes = [\"tcp\", \"sched\"]\n");
    sighup(&agent);
    wait_log(&agent, "SIGHUP: probe `sched` attached");
    let m = crate::wait_for(&agent, Duration::from_secs(30), |m| switches(m) > 0.0);
    assert_eq!(m.sum("tanzhen_probe_up", &[("probe", "sched")]), 1.0);
    assert!(switches(&m) > 0.0, "sched counts nothing:\n{}", m.0);
    refused_connects(&comm, 3);
    let m = crate::wait_for(&agent, Duration::from_secs(20), |m| failed(m) >= 10.0);
    assert_eq!(failed(&m), 10.0);

    assert_eq!(
        perf_events(agent.pid()),
        6 + perf_buffers(2),
        "tcp's 1 tracepoint + sched's 5 (+ their perf buffers)"
    );

    // Drop tcp: its programs are unloaded, its counts stay exported and stop moving; sched
    // goes on.
    file.write("probes = [\"sched\"]\n");
    sighup(&agent);
    wait_log(&agent, "probe `tcp` detached and drained");
    refused_connects(&comm, 5);
    let before = switches(&agent.scrape());
    let m = crate::wait_for(&agent, Duration::from_secs(30), |m| switches(m) > before);
    assert!(switches(&m) > before, "sched stopped counting");
    assert_eq!(failed(&m), 10.0, "a detached probe counted");
    assert_eq!(m.sum("tanzhen_probe_up", &[("probe", "tcp")]), 0.0);
    // The tracepoint's link (and perf buffers) are closed: sched's five remain.
    assert_eq!(perf_events(agent.pid()), 5 + perf_buffers(1));

    // Attaching it again in the same run loads a fresh copy of its programs: no error, and
    // its counters go on from where they stopped.
    file.write("probes = [\"sched\", \"tcp\"]\n");
    sighup(&agent);
    let log = wait_log(&agent, "SIGHUP: probe `tcp` attached");
    assert!(!log.contains("failed to attach"), "{log}");
    refused_connects(&comm, 3);
    let m = crate::wait_for(&agent, Duration::from_secs(20), |m| failed(m) >= 13.0);
    assert_eq!(
        failed(&m),
        13.0,
        "10 before the detach + 3 after the re-attach"
    );
    assert_eq!(m.sum("tanzhen_probe_up", &[("probe", "tcp")]), 1.0);
    assert_eq!(m.sum("tanzhen_probe_up", &[("probe", "sched")]), 1.0);
    assert_eq!(perf_events(agent.pid()), 6 + perf_buffers(2));

    // And once more: detach and re-attach the copy.
    file.write("probes = [\"sched\"]\n");
    sighup(&agent);
    crate::wait_for(&agent, Duration::from_secs(20), |m| {
        m.sum("tanzhen_probe_up", &[("probe", "tcp")]) == 0.0
    });
    assert_eq!(perf_events(agent.pid()), 5 + perf_buffers(1));
    file.write("probes = [\"tcp\", \"sched\"]\n");
    sighup(&agent);
    crate::wait_for(&agent, Duration::from_secs(20), |m| {
        m.sum("tanzhen_probe_up", &[("probe", "tcp")]) == 1.0
    });
    refused_connects(&comm, 2);
    let m = crate::wait_for(&agent, Duration::from_secs(20), |m| failed(m) >= 15.0);
    assert_eq!(failed(&m), 15.0);
    assert_eq!(perf_events(agent.pid()), 6 + perf_buffers(2));
}
