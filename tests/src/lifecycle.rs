//! Shutdown and restart: SIGTERM detaches every program and exits promptly, nothing the agent
//! loaded stays in the kernel, and a new agent starts at once on the same port.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::Agent;

/// The BPF program and link ids the process `pid` holds open (from /proc/PID/fdinfo).
fn bpf_ids(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut progs, mut links) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(e.unwrap().path()) else {
            continue;
        };
        let id = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        // A link's fdinfo names its program too: count it as a link only.
        if let Some(link) = id("link_id:") {
            links.push(link);
        } else if let Some(prog) = id("prog_id:") {
            progs.push(prog);
        }
    }
    progs.sort_unstable();
    progs.dedup();
    (progs, links)
}

/// Whether `bpftool <kind> show id <id>` still finds the object.
fn exists(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .expect("run bpftool")
        .status
        .success()
}

#[test]
fn sigterm_detaches_everything_and_a_restart_on_the_same_port_works() {
    let mut agent = Agent::start(&["--probes", "all"]);
    let (progs, links) = bpf_ids(agent.pid());
    // tcp 1 + syscalls 2 + sched 5 tracepoint programs, each attached by one link.
    assert!(progs.len() >= 8, "programs held: {progs:?}");
    assert!(links.len() >= 8, "links held: {links:?}");
    for &id in &progs {
        assert!(exists("prog", id), "prog {id} not visible to bpftool");
    }
    let addr = agent.addr;

    let started = Instant::now();
    let code = agent.stop();
    let took = started.elapsed();
    eprintln!("SIGTERM to exit: {took:?}");
    assert_eq!(code, Some(0), "{}", agent.log_text());
    // A functional bound from the issue (not a performance measurement).
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let log = agent.log_text();
    assert!(log.contains("SIGTERM: detaching probes"), "{log}");
    assert!(log.contains("stopped"), "{log}");

    // The kernel frees programs and links when their last reference goes (after an RCU grace
    // period): wait for that, then none may remain.
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = || -> Vec<String> {
        progs
            .iter()
            .filter(|&&id| exists("prog", id))
            .map(|id| format!("prog {id}"))
            .chain(
                links
                    .iter()
                    .filter(|&&id| exists("link", id))
                    .map(|id| format!("link {id}")),
            )
            .collect()
    };
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        left(),
        Vec::<String>::new(),
        "left in the kernel after exit"
    );
    // No pinning: nothing of ours under the BPF filesystem.
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        let pinned: Vec<_> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("tanzhen"))
            .collect();
        assert!(pinned.is_empty(), "pinned: {pinned:?}");
    }

    // At once, on the same port.
    let again = Agent::start_on(addr, &["--probes", "all"]);
    let m = again.scrape();
    for probe in ["tcp", "syscalls", "sched"] {
        assert_eq!(
            m.sum("tanzhen_probe_up", &[("probe", probe)]),
            1.0,
            "{probe}\n{}",
            again.log_text()
        );
    }
}
