//! Privileged end-to-end tests: they start the real `tanzhen` binary, which loads real eBPF
//! programs into this kernel, drive a workload, and read `/metrics` over real HTTP.
//!
//! Run them as root with `cargo xtask test` (which sets `TANZHEN_BIN` and `--test-threads=1`).
//! This file holds the helpers: an agent guard, a minimal HTTP client and an exposition parser.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

#[cfg(test)]
mod bench;
#[cfg(test)]
mod caps;
#[cfg(test)]
mod check;
#[cfg(test)]
mod cli;
#[cfg(test)]
mod config;
#[cfg(test)]
mod dashboards;
#[cfg(test)]
mod k8s;
#[cfg(test)]
mod lifecycle;
#[cfg(test)]
mod live;
#[cfg(test)]
mod otlp;
#[cfg(test)]
mod sched;
#[cfg(test)]
mod server;
#[cfg(test)]
mod soak;
#[cfg(test)]
mod syscalls;
#[cfg(test)]
mod tcp;
pub mod workload;

/// Path of the binary under test: `$TANZHEN_BIN`, else `target/debug/tanzhen`.
#[must_use]
pub fn tanzhen_bin() -> PathBuf {
    std::env::var_os("TANZHEN_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tanzhen"),
        PathBuf::from,
    )
}

/// Panics unless we are root: these tests load eBPF programs and mean nothing otherwise.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end tests load eBPF programs and must run as root (cargo xtask test as root)"
    );
}

/// A task name (comm, at most 15 bytes) unique to this test process: `prefix` plus our pid.
#[must_use]
pub fn comm(prefix: &str) -> String {
    let mut s = format!("{prefix}{}", std::process::id());
    s.truncate(15);
    s
}

/// A loopback port nobody listens on right now.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Flags added to every `tanzhen run` the tests start, from `TANZHEN_E2E_EXTRA_ARGS`
/// (whitespace-separated): `cargo xtask test` runs the probe tests a second time with
/// `--transport perf --btf none`.
#[must_use]
pub fn extra_args() -> Vec<String> {
    std::env::var("TANZHEN_E2E_EXTRA_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A running `tanzhen run`, stopped with SIGTERM when dropped.
pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Agent {
    /// Starts `tanzhen run <args> --listen 127.0.0.1:<free>` and waits until `/healthz` answers
    /// (the server starts only after every probe has attached).
    #[must_use]
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    #[must_use]
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(args, env, &["--log-level", "debug"])
    }

    /// [`Agent::start`] without `--log-level debug` (the log level comes from `args`, a
    /// configuration file or the default).
    #[must_use]
    pub fn start_with_own_log_level(args: &[&str]) -> Self {
        Self::spawn(args, &[], &[])
    }

    /// [`Agent::start`] under a wrapper command, e.g. `["setpriv", "--bounding-set=-bpf"]`.
    #[must_use]
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        Self::spawn_in(wrapper, args, &[], &["--log-level", "debug"])
    }

    /// [`Agent::start`] listening on `addr` (e.g. the address of an agent just stopped).
    #[must_use]
    pub fn start_on(addr: SocketAddr, args: &[&str]) -> Self {
        Self::spawn_at(&[], args, &[], &["--log-level", "debug"], Some(addr))
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], log_args: &[&str]) -> Self {
        Self::spawn_in(&[], args, env, log_args)
    }

    fn spawn_in(wrapper: &[&str], args: &[&str], env: &[(&str, &str)], log_args: &[&str]) -> Self {
        Self::spawn_at(wrapper, args, env, log_args, None)
    }

    fn spawn_at(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        log_args: &[&str],
        addr: Option<SocketAddr>,
    ) -> Self {
        require_root();
        let bin = tanzhen_bin();
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p agent`",
            bin.display()
        );
        let addr: SocketAddr =
            addr.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let log = std::env::temp_dir().join(format!(
            "tanzhen-e2e-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let log_file = std::fs::File::create(&log).expect("create agent log");
        let mut cmd = match wrapper {
            [] => Command::new(&bin),
            [prog, rest @ ..] => {
                let mut c = Command::new(prog);
                c.args(rest).arg(&bin);
                c
            }
        };
        let child = cmd
            .arg("run")
            .args(args)
            .args(extra_args())
            .args(["--listen", &addr.to_string()])
            .args(log_args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut agent = Self {
            child: Some(child),
            addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(addr, "/healthz") {
                return agent;
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tanzhen exited with {status} before serving:\n{}",
                    agent.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tanzhen did not serve /healthz within 60 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts the agent logged the transport and BTF source this pass asks for: `perf` and
    /// `none` under `--transport perf --btf none` (see [`extra_args`]), else what this machine
    /// offers (a ring buffer and the kernel's BTF).
    pub fn assert_compat_mode(&self) {
        let extra = extra_args().join(" ");
        let transport = if extra.contains("--transport perf") {
            "perf"
        } else {
            "ringbuf"
        };
        let btf = if extra.contains("--btf none") {
            "none"
        } else {
            "kernel (/sys/kernel/btf/vmlinux)"
        };
        let want = format!("event transport: {transport}; BTF: {btf}");
        let log = self.log_text();
        assert!(log.contains(&want), "expected `{want}` in the log:\n{log}");
    }

    /// Process id of the running agent.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The agent's stderr so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Scrapes `/metrics` in the classic text format.
    #[must_use]
    pub fn scrape(&self) -> Metrics {
        let t = Instant::now();
        let (status, body) = match http_get(self.addr, "/metrics") {
            Ok(r) => r,
            Err(e) => panic!(
                "GET /metrics: {e} after {:.1?}\n{}",
                t.elapsed(),
                self.diagnose()
            ),
        };
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics(body)
    }

    /// What the agent is doing, for a request that failed: whether `/healthz` answers now, and
    /// where each of its threads is (state, kernel wait channel, system call).
    #[must_use]
    pub fn diagnose(&self) -> String {
        let t = Instant::now();
        let health = http_get(self.addr, "/healthz");
        let mut out = format!(
            "--- right after: GET /healthz -> {:?} in {:.1?}\n--- agent threads (tid comm state wchan syscall)\n",
            health.map(|(s, _)| s),
            t.elapsed()
        );
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return out;
        };
        let read = |tid: &str, f: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in dir.flatten() {
                let tid = e.file_name().to_string_lossy().into_owned();
                let stat = read(&tid, "stat");
                let state = stat
                    .rsplit_once(") ")
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .unwrap_or("?")
                    .to_owned();
                out += &format!(
                    "{tid} {} {state} {} [{}]\n",
                    read(&tid, "comm"),
                    read(&tid, "wchan"),
                    read(&tid, "syscall")
                );
            }
        }
        out
    }

    /// Sends SIGTERM and waits for the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tanzhen ignored SIGTERM for 30 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `GET path` over HTTP/1.0; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A scrape in the Prometheus text format.
#[derive(Clone, Debug)]
pub struct Metrics(pub String);

impl Metrics {
    /// Sum of the samples named `name` whose labels include every pair of `labels`.
    #[must_use]
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every sample named exactly `name`: its labels and value.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(move |line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (n, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)),
                    None => (series, Vec::new()),
                };
                (n == name).then(|| (labels, value.parse().unwrap_or(f64::NAN)))
            })
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((k.trim_start_matches(',').to_owned(), val));
        rest = &after[end..];
    }
    out
}

/// The eBPF maps process `pid` holds, as (id, name), each once: ids from /proc/PID/fdinfo,
/// names from `bpftool map show`.
#[cfg(test)]
pub fn agent_maps(pid: u32) -> Vec<(String, String)> {
    let mut ids = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let info = std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) {
            ids.insert(id.trim().to_owned());
        }
    }
    ids.into_iter()
        .map(|id| {
            let show = std::process::Command::new("bpftool")
                .args(["map", "show", "id", &id])
                .output()
                .expect("run bpftool");
            let show = String::from_utf8_lossy(&show.stdout);
            let name = show
                .split_whitespace()
                .skip_while(|w| *w != "name")
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            (id, name)
        })
        .collect()
}

/// The entries of map `id` (`bpftool -j map dump id ID`).
#[cfg(test)]
pub fn map_dump(id: &str) -> Vec<serde_json::Value> {
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "id", id])
        .output()
        .expect("run bpftool");
    let v: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("bpftool json");
    v.as_array().cloned().unwrap_or_default()
}

/// Polls `cond` on fresh scrapes until it holds or `timeout` passes; returns the last scrape.
/// (Events reach userspace asynchronously; this waits for them, it asserts no timing.)
pub fn wait_for(agent: &Agent, timeout: Duration, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + timeout;
    loop {
        let m = agent.scrape();
        if cond(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cgroup whose path names a container (`docker/<id>` in the v1 pids hierarchy, or a
/// `docker-<id>.scope` under the v2 root), removed when dropped.
pub struct FakeContainer {
    pub dir: std::path::PathBuf,
    pub id: String,
}

impl FakeContainer {
    /// Creates the cgroup.
    #[must_use]
    pub fn create() -> Self {
        let id = format!("{:016x}", u64::from(std::process::id()) * 0x9e37_79b9).repeat(4);
        let v1 = std::path::Path::new("/sys/fs/cgroup/pids");
        let dir = if v1.is_dir() {
            v1.join("docker").join(&id)
        } else {
            std::path::Path::new("/sys/fs/cgroup").join(format!("docker-{id}.scope"))
        };
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self { dir, id }
    }

    /// A `docker-<id>.scope` in the cgroup v2 hierarchy (at /sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on hybrid hosts), where `bpf_get_current_cgroup_id` looks.
    #[must_use]
    pub fn create_v2() -> Self {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|p| p.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let id = format!("{:016x}", u64::from(std::process::id()) * 0x7f4a_7c15).repeat(4);
        let dir = root.join(format!("docker-{id}.scope"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self { dir, id }
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        if self.dir.parent().is_some_and(|p| p.ends_with("docker")) {
            let _ = std::fs::remove_dir(self.dir.parent().unwrap());
        }
    }
}

#[cfg(test)]
mod parser_tests {
    use super::*;

    #[test]
    fn parses_samples_and_escaped_labels() {
        let m = Metrics(
            "# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"z\"} 3\nx_total{a=\"2\"} 4\ny 7\n".into(),
        );
        assert_eq!(m.sum("x_total", &[]), 7.0);
        assert_eq!(m.sum("x_total", &[("b", "q\"z")]), 3.0);
        assert_eq!(m.sum("y", &[]), 7.0);
        assert_eq!(m.sum("x_total", &[("a", "3")]), 0.0);
    }
}
