//! Live views end to end: the JSON API (`/api/v1/events`, `/probes`, `/top`) read over real
//! HTTP from the real agent while a workload with a distinctive comm connects, and the
//! `tanzhen watch` / `tanzhen top` commands against it (JSON through a pipe, the table and the
//! full-screen view under a pseudo-terminal driven by tmux).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Agent, comm, free_port, http_get, tanzhen_bin};

/// `GET path` as JSON; panics unless the status is `want`.
fn get_json(agent: &Agent, path: &str, want: u16) -> Value {
    let (status, body) = http_get(agent.addr, path).expect(path);
    assert_eq!(status, want, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// A listener thread that accepts forever (until the process ends).
fn listener() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = l.local_addr().unwrap();
    thread::Builder::new()
        .name("tzlisten".into())
        .spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        })
        .unwrap();
    addr
}

/// In a thread named `name`: `ok` connects to `to`, then `refused` to a closed port.
fn connects(name: &str, to: SocketAddr, ok: usize, closed: SocketAddr, refused: usize) {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            for _ in 0..ok {
                let mut s = TcpStream::connect(to).expect("connect to listener");
                let _ = s.write_all(b"x");
            }
            for _ in 0..refused {
                TcpStream::connect(closed).expect_err("connect to a closed port must fail");
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

/// The ring's TCP events whose thread is `comm`.
fn tcp_events_of(agent: &Agent, comm: &str) -> Vec<Value> {
    let v = get_json(agent, "/api/v1/events?probe=tcp&limit=100000", 200);
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["process"]["comm"] == comm)
        .cloned()
        .collect()
}

/// Waits until `f` returns Some, or panics with `what` after `timeout`.
fn wait_some<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn events_api_returns_exactly_the_workload_connects() {
    let agent = Agent::start(&["--probes", "tcp", "--interval", "1s"]);
    let name = comm("tzapi");
    let to = listener();
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    connects(&name, to, 8, closed, 4);
    wait_some(Duration::from_secs(15), "12 events", || {
        (tcp_events_of(&agent, &name).len() >= 12).then_some(())
    });
    // Duplicates would arrive right behind: give them the time to, so "exactly" means it.
    thread::sleep(Duration::from_millis(500));
    let evs = tcp_events_of(&agent, &name);
    assert_eq!(evs.len(), 12, "{evs:#?}");
    let outcome = |o: &str| evs.iter().filter(|e| e["outcome"] == o).count();
    assert_eq!(
        (outcome("established"), outcome("failed")),
        (8, 4),
        "{evs:#?}"
    );
    let me = std::process::id();
    let exe = std::env::current_exe().unwrap();
    for e in &evs {
        assert_eq!(e["type"], "connect");
        assert_eq!(e["probe"], "tcp");
        assert_eq!(e["process"]["pid"], me, "{e}");
        assert_eq!(
            e["process"]["exe"].as_str(),
            Some(exe.to_str().unwrap()),
            "{e}"
        );
        assert!(
            e["process"]["tid"].as_u64().unwrap() != u64::from(me),
            "{e}"
        );
        let port = if e["outcome"] == "established" {
            to.port()
        } else {
            closed.port()
        };
        assert_eq!(e["dport"], port, "{e}");
        assert_eq!(e["dst"], format!("127.0.0.1:{port}"), "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
        assert!(e["process"].get("pod").is_some(), "pod is reserved: {e}");
    }
    // Oldest first, numbered without gaps in the ring as a whole.
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let all = get_json(&agent, "/api/v1/events?probe=tcp&limit=3", 200);
    assert_eq!(all["events"].as_array().unwrap().len(), 3);
    assert_eq!(all["buffer_size"], 1024);
    assert!(all["total"].as_u64().unwrap() >= 12);
}

#[test]
fn the_ring_keeps_the_last_event_buffer_size_events() {
    let agent = Agent::start(&["--probes", "tcp", "--event-buffer-size", "5"]);
    let name = comm("tzring");
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    connects(&name, listener(), 0, closed, 9);
    let v = wait_some(Duration::from_secs(15), "9 events pushed", || {
        let v = get_json(&agent, "/api/v1/events?probe=tcp&limit=100", 200);
        (v["total"].as_u64() >= Some(9)).then_some(v)
    });
    assert_eq!(v["buffer_size"], 5);
    let evs = v["events"].as_array().unwrap();
    assert_eq!(evs.len(), 5, "{v:#}");
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let last = v["total"].as_u64().unwrap();
    assert_eq!(seqs, (last - 4..=last).collect::<Vec<_>>());
}

/// Opens a `follow=true` stream: status and headers read, body lines next.
fn open_stream(addr: SocketAddr, path: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "GET {path}: {line}");
    let mut ndjson = false;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        ndjson |= line.eq_ignore_ascii_case("content-type: application/x-ndjson\r\n");
        if line.trim().is_empty() {
            break;
        }
    }
    assert!(ndjson, "follow streams are JSON lines");
    r
}

#[test]
fn follow_delivers_events_made_after_the_request() {
    let agent = Agent::start(&["--probes", "tcp"]);
    let name = comm("tzfol");
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    // An event from before the request must not come back.
    connects(&name, listener(), 0, closed, 1);
    wait_some(Duration::from_secs(15), "the earlier event", || {
        (tcp_events_of(&agent, &name).len() == 1).then_some(())
    });
    let mut stream = open_stream(agent.addr, "/api/v1/events?probe=tcp&follow=true");
    connects(&name, listener(), 0, closed, 2);
    let mut mine = Vec::new();
    while mine.len() < 2 {
        let mut line = String::new();
        let n = stream.read_line(&mut line).expect("a line within 20 s");
        assert!(n > 0, "stream ended");
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["process"]["comm"] == name.as_str() {
            mine.push(v);
        }
    }
    assert!(mine.iter().all(|e| e["outcome"] == "failed"), "{mine:#?}");
    // limit with follow sends that backlog first: the 3 events are the last three.
    let mut s = open_stream(agent.addr, "/api/v1/events?probe=tcp&follow=true&limit=3");
    let mut backlog = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        s.read_line(&mut line).unwrap();
        backlog.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    let seqs: Vec<u64> = backlog.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (seqs[0]..seqs[0] + 3).collect::<Vec<_>>(),
        "{backlog:#?}"
    );
    let recent = get_json(&agent, "/api/v1/events?probe=tcp&limit=1", 200);
    assert!(
        recent["events"][0]["seq"].as_u64() >= Some(seqs[2]),
        "{recent}"
    );
}

#[test]
fn bad_parameters_get_400_naming_them() {
    let agent = Agent::start(&["--probes", "tcp"]);
    for (path, param) in [
        ("/api/v1/events", "probe"),
        ("/api/v1/events?probe=udp", "probe"),
        ("/api/v1/events?probe=tcp&limit=0", "limit"),
        ("/api/v1/events?probe=tcp&limit=ten", "limit"),
        ("/api/v1/events?probe=tcp&limit=100001", "limit"),
        ("/api/v1/events?probe=tcp&follow=maybe", "follow"),
        ("/api/v1/events?probe=tcp&probe=exec", "probe"),
        ("/api/v1/events?probe=tcp&color=red", "color"),
        ("/api/v1/top?by=memory", "by"),
        ("/api/v1/top?by=syscalls&limit=-3", "limit"),
        ("/api/v1/top?follow=2", "follow"),
    ] {
        let v = get_json(&agent, path, 400);
        assert_eq!(v["parameter"], param, "{path}: {v}");
        let err = v["error"].as_str().unwrap();
        assert!(!err.is_empty() && !err.contains('\n'), "{path}: {v}");
    }
    let v = get_json(&agent, "/api/v1/events?probe=udp", 400);
    assert_eq!(
        v["error"], "unknown event stream `udp`; one of tcp, exec, exit",
        "{v}"
    );
}

#[test]
fn probes_show_attached_probes_with_events() {
    let agent = Agent::start(&["--probes", "tcp,sched"]);
    let name = comm("tzprb");
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    connects(&name, listener(), 3, closed, 0);
    // An exec and an exit for the sched probe's rings.
    assert!(Command::new("/bin/true").status().unwrap().success());
    let v = wait_some(Duration::from_secs(15), "probe events", || {
        let v = get_json(&agent, "/api/v1/probes", 200);
        let p = |n: &str| {
            v["probes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == n)
                .cloned()
                .unwrap()
        };
        let (tcp, sched) = (p("tcp"), p("sched"));
        (tcp["events_seen"].as_u64() >= Some(3)
            && sched["streams"][0]["events"].as_u64() > Some(0)
            && sched["streams"][1]["events"].as_u64() > Some(0))
        .then_some(v)
    });
    let probes = v["probes"].as_array().unwrap();
    let by_name = |n: &str| probes.iter().find(|p| p["name"] == n).unwrap();
    let tcp = by_name("tcp");
    assert_eq!(tcp["attached"], true, "{tcp}");
    assert_eq!(tcp["attach_method"], "tracepoint");
    assert_eq!(tcp["transport"], "ringbuf");
    assert_eq!(tcp["events_lost"], 0, "{tcp}");
    assert!(tcp["last_error"].is_null(), "{tcp}");
    assert_eq!(tcp["streams"][0]["name"], "tcp");
    assert!(tcp["streams"][0]["events"].as_u64() >= Some(3), "{tcp}");
    let sched = by_name("sched");
    assert_eq!(sched["attached"], true, "{sched}");
    assert!(sched["events_seen"].as_u64() > Some(0), "{sched}");
    let syscalls = by_name("syscalls");
    assert_eq!(syscalls["attached"], false, "not asked for: {syscalls}");
    assert_eq!(v["event_buffer_size"], 1024);
    // The exec ring names /bin/true (or what it resolves to) for our child.
    let execs = get_json(&agent, "/api/v1/events?probe=exec&limit=100000", 200);
    assert!(
        execs["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["filename"] == "/bin/true" && e["process"]["comm"] == "true"),
        "{execs:#}"
    );
}

/// Connects to a closed port from a thread named `name` until `stop` is set.
fn background_connects(name: &str, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = TcpStream::connect(closed);
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
            n
        })
        .unwrap()
}

#[test]
fn top_ranks_the_workload_by_connects() {
    let agent = Agent::start(&["--probes", "tcp", "--interval", "1s"]);
    let name = comm("tztop");
    let stop = Arc::new(AtomicBool::new(false));
    let worker = background_connects(&name, stop.clone());
    let v = wait_some(
        Duration::from_secs(20),
        "the workload in /api/v1/top",
        || {
            let v = get_json(&agent, "/api/v1/top?by=connects&limit=50", 200);
            v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["comm"] == name.as_str() && r["rate"].as_f64() > Some(10.0))
                .then_some(v)
        },
    );
    // The same through `tanzhen top` without a terminal: one table, then exit 0.
    let out = Command::new(tanzhen_bin())
        .args(["top", "--by", "connects", "--agent"])
        .arg(format!("http://{}", agent.addr))
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let made = worker.join().unwrap();
    eprintln!("{made} connects; top: {v:#}");
    assert_eq!(v["by"], "connects");
    assert!(v["window_seconds"].as_f64().unwrap() > 0.5, "{v}");
    let rows = v["rows"].as_array().unwrap();
    let rates: Vec<f64> = rows.iter().map(|r| r["rate"].as_f64().unwrap()).collect();
    assert!(rates.windows(2).all(|w| w[0] >= w[1]), "sorted: {rates:?}");
    let mine = rows.iter().find(|r| r["comm"] == name.as_str()).unwrap();
    // Every attempt of ours fails (closed port): the split says so.
    assert_eq!(mine["established_per_second"], 0.0, "{mine}");
    assert_eq!(mine["failed_per_second"], mine["rate"], "{mine}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("top connects/s over "), "{text}");
    assert!(
        text.lines().nth(1).is_some_and(|h| h.starts_with("COMM")
            && h.contains("CONNECTS/s")
            && h.contains("FAILED/s")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with(&name)), "{text}");
}

/// Runs `tanzhen watch tcp --output json` against `agent`; lines arrive on the channel.
fn spawn_watch_json(agent: &Agent) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(tanzhen_bin())
        .args(["watch", "tcp", "--output", "json", "--agent"])
        .arg(format!("http://{}", agent.addr))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Makes connects from `sync` until `seen` says one arrived (the follower is connected).
fn synchronise(sync: &str, mut seen: impl FnMut() -> bool) {
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        connects(sync, listener(), 0, closed, 1);
        thread::sleep(Duration::from_millis(200));
        if seen() {
            return;
        }
        assert!(Instant::now() < deadline, "the watcher never showed {sync}");
    }
}

#[test]
fn watch_json_prints_one_object_per_event() {
    let agent = Agent::start(&["--probes", "tcp"]);
    let (mut child, rx) = spawn_watch_json(&agent);
    let (sync, name) = (comm("tzsync"), comm("tzwj"));
    let mut lines = Vec::new();
    synchronise(&sync, || {
        lines.extend(rx.try_iter());
        lines.iter().any(|l| l.contains(&sync))
    });
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    let to = listener();
    connects(&name, to, 7, closed, 5);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mine = |lines: &[String]| lines.iter().filter(|l| l.contains(&name)).count();
    while mine(&lines) < 12 && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    thread::sleep(Duration::from_millis(500));
    lines.extend(rx.try_iter());
    // SIGINT (Ctrl-C) ends it with status 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C exits 0: {err}");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {e}: {l}"))
        })
        .collect();
    let mine: Vec<&Value> = parsed
        .iter()
        .filter(|v| v["process"]["comm"] == name.as_str())
        .collect();
    assert_eq!(mine.len(), 12, "{lines:#?}");
    let failed = mine.iter().filter(|v| v["outcome"] == "failed").count();
    assert_eq!(failed, 5);
    assert!(
        mine.iter()
            .filter(|v| v["outcome"] == "established")
            .all(|v| v["dport"] == to.port())
    );
}

#[test]
fn watch_standalone_loads_the_probe_itself() {
    let mut child = Command::new(tanzhen_bin())
        .args(["watch", "tcp", "--standalone", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (sync, name) = (comm("tzsync"), comm("tzsa"));
    let mut lines = Vec::new();
    synchronise(&sync, || {
        lines.extend(rx.try_iter());
        lines.iter().any(|l| l.contains(&sync))
    });
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    connects(&name, listener(), 2, closed, 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mine = |lines: &[String]| lines.iter().filter(|l| l.contains(&name)).count();
    while mine(&lines) < 3 && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    thread::sleep(Duration::from_millis(500));
    lines.extend(rx.try_iter());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C exits 0: {err}");
    let mine: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["process"]["comm"] == name.as_str())
        .collect();
    assert_eq!(mine.len(), 3, "{lines:#?}");
    assert_eq!(
        mine.iter()
            .filter(|v| v["outcome"] == "established")
            .count(),
        2
    );
}

#[test]
fn watch_reports_a_lost_agent_and_retries() {
    let mut agent = Agent::start(&["--probes", "tcp"]);
    let addr = agent.addr;
    let mut child = Command::new(tanzhen_bin())
        .args(["watch", "tcp", "--output", "json", "--agent"])
        .arg(format!("http://{addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.stop(), Some(0));
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("one line about the lost agent");
    assert!(line.contains("retrying"), "{line}");
    // Backoff: no flood of lines while the agent stays away.
    thread::sleep(Duration::from_secs(4));
    let more: Vec<String> = rx.try_iter().collect();
    assert!(more.is_empty(), "one line per loss, got more: {more:?}");
    assert!(child.try_wait().unwrap().is_none(), "still retrying");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A tmux server of our own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Self {
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux is missing: run `cargo xtask setup`"
        );
        Self {
            socket: format!("tanzhen-test-{tag}-{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cmd` (a shell command) in a detached 200x50 session.
    fn start(&self, cmd: &str) {
        let out = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "new-session",
                "-d",
                "-x",
                "200",
                "-y",
                "50",
                "-s",
                "t",
            ])
            .arg(cmd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The pane with its scrollback.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-S", "-5000", "-t", "t"])
    }

    /// The visible pane only.
    fn visible(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    fn wait_screen(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "screen never showed {what}:\n{s}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[test]
fn watch_table_under_a_terminal() {
    let agent = Agent::start(&["--probes", "tcp"]);
    let tmux = Tmux::new("watch");
    let bin = tanzhen_bin();
    // `; sleep` keeps the pane (and what it printed) after an unexpected exit.
    tmux.start(&format!(
        "{} watch tcp --agent http://{}; echo WATCH-EXIT=$?; sleep 60",
        bin.display(),
        agent.addr
    ));
    let sync = comm("tzsync");
    synchronise(&sync, || tmux.screen().contains(&sync));
    let name = comm("tzwt");
    let closed: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
    connects(&name, listener(), 1, closed, 1);
    let screen = tmux.wait_screen("the workload's rows", |s| {
        s.lines().filter(|l| l.contains(&name)).count() == 2
    });
    let header = screen.lines().find(|l| !l.trim().is_empty()).unwrap();
    for col in [
        "TIME(UTC)",
        "PID",
        "COMM",
        "OUTCOME",
        "LATENCY",
        "SOURCE",
        "DESTINATION",
    ] {
        assert!(header.contains(col), "header lacks {col}:\n{screen}");
    }
    let rows: Vec<&str> = screen.lines().filter(|l| l.contains(&name)).collect();
    let me = std::process::id().to_string();
    for row in &rows {
        // Aligned: the comm starts under COMM, the pid ends under PID.
        assert_eq!(row.find(&name), header.find("COMM"), "{screen}");
        assert_eq!(
            row.find(&me).map(|i| i + me.len()),
            header.find("PID").map(|i| i + 3),
            "{screen}"
        );
        // Human units: 12.3µs, 1.2ms and the like.
        let latency = row.split_whitespace().nth(4).unwrap();
        assert!(
            ["ns", "µs", "ms", "s"].iter().any(|u| latency.ends_with(u)),
            "{latency}: {screen}"
        );
    }
    assert!(rows.iter().any(|r| r.contains(" established ")), "{screen}");
    assert!(rows.iter().any(|r| r.contains(" failed ")), "{screen}");
    // Ctrl-C: exits 0.
    tmux.run(&["send-keys", "-t", "t", "C-c"]);
    tmux.wait_screen("WATCH-EXIT=0", |s| s.contains("WATCH-EXIT=0"));
}

#[test]
fn top_full_screen_under_a_terminal_quits_on_q() {
    let agent = Agent::start(&["--probes", "tcp,syscalls", "--interval", "1s"]);
    let tmux = Tmux::new("top");
    tmux.start(&format!(
        "{} top --agent http://{}; echo TOP-EXIT=$?; sleep 60",
        tanzhen_bin().display(),
        agent.addr
    ));
    // A row: the line under the column titles is not empty (the agent itself makes syscalls).
    let has_row = |s: &str, col: &str| {
        s.lines()
            .skip_while(|l| !l.contains(col))
            .nth(1)
            .is_some_and(|l| !l.trim().is_empty())
    };
    tmux.wait_screen("the header, columns and a row", |s| {
        s.contains("tanzhen top") && has_row(s, "CALLS/s")
    });
    let screen = tmux.visible();
    let first = screen.lines().next().unwrap();
    assert!(first.contains("by syscalls"), "{screen}");
    let footer = screen.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    assert!(
        footer.contains("q quit") && footer.contains("s syscalls") && footer.contains("c connects"),
        "{screen}"
    );
    // `c` switches the ranking.
    tmux.run(&["send-keys", "-t", "t", "c"]);
    tmux.wait_screen("the connects ranking", |s| {
        s.contains("by connects") && s.contains("CONNECTS/s")
    });
    tmux.run(&["send-keys", "-t", "t", "q"]);
    tmux.wait_screen("TOP-EXIT=0", |s| s.contains("TOP-EXIT=0"));
}

#[test]
fn the_api_and_the_clients_honour_the_bearer_token() {
    let dir = std::env::temp_dir().join(format!("tanzhen-live-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-live\n").unwrap();
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--interval",
        "1s",
        "--auth-token-file",
        token.to_str().unwrap(),
    ]);
    let (status, _) = http_get(agent.addr, "/api/v1/probes").unwrap();
    assert_eq!(status, 401, "the API needs the token");
    let top = |with_token: bool| {
        let mut c = Command::new(tanzhen_bin());
        c.args(["top", "--by", "connects", "--agent"])
            .arg(format!("http://{}", agent.addr));
        if with_token {
            c.arg("--auth-token-file").arg(&token);
        }
        c.output().unwrap()
    };
    let denied = top(false);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("401") && err.contains("--auth-token-file"),
        "{err}"
    );
    let ok = top(true);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.starts_with("top connects/s over "), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
