//! Soak: all probes with a small series cap, a workload churning short-lived processes with
//! random names and connects to random local ports (from threads with random names). Checks:
//! RSS at the end within 20% of RSS after warm-up, no family ever above its cap (plus its one
//! `other` series), and the exported drop counters equal to the kernel's drop maps (read with
//! bpftool). The e2e suite runs a short variant; `cargo xtask soak` the long one (50,000
//! processes, 100,000 connects) through `TANZHEN_SOAK_PROCESSES` / `TANZHEN_SOAK_CONNECTS`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, TcpStream},
    process::Command,
    time::Duration,
};

use crate::{Agent, Metrics};

const CAP: usize = 50;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64: random enough names and ports, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn name(&mut self) -> String {
        format!("sk{:012x}", self.next() & 0xffff_ffff_ffff)
    }
}

/// `n` short-lived processes, each renaming itself (its comm) to a random name before exiting.
fn churn_processes(rng: &mut Rng, n: usize) {
    const BATCH: usize = 50;
    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let children: Vec<_> = chunk
            .iter()
            .map(|_| {
                let name = rng.name();
                Command::new("/bin/sh")
                    .args(["-c", &format!("printf %s {name} > /proc/self/comm")])
                    .spawn()
                    .expect("spawn sh")
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
    }
}

/// `n` connects to random loopback ports (nearly all closed: refused at once), from 20
/// threads with random names.
fn churn_connects(rng: &mut Rng, n: usize) {
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (name, mut seed) = (rng.name(), Rng(rng.next() | 1));
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    for _ in 0..n / 20 {
                        let port = 20_000 + (seed.next() % 40_000) as u16;
                        let _ = TcpStream::connect_timeout(
                            &(Ipv4Addr::LOCALHOST, port).into(),
                            Duration::from_millis(200),
                        );
                    }
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Distinct label sets per family (histogram lines folded into their series).
fn series_per_family(m: &Metrics) -> BTreeMap<String, usize> {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in m.0.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, _)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let family = ["_bucket", "_sum", "_count", "_created", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        let labels: Vec<&str> = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|l| !l.starts_with("le="))
            .collect();
        sets.entry(family.to_owned())
            .or_default()
            .insert(labels.join(","));
    }
    sets.into_iter().map(|(k, v)| (k, v.len())).collect()
}

fn assert_caps(m: &Metrics, when: &str) {
    for (family, n) in series_per_family(m) {
        if family == "tanzhen_series_folded" {
            continue;
        }
        assert!(
            n <= CAP + 1,
            "{when}: {family} has {n} series (cap {CAP} + other)"
        );
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Sum of every per-CPU value of the agent's `*_LOST` maps, read by bpftool through their ids
/// in /proc/PID/fdinfo.
fn kernel_lost(pid: u32) -> u64 {
    let mut total = 0;
    let mut seen = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(e.unwrap().path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .map(|v| v.trim().to_owned())
        else {
            continue;
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        let show = Command::new("bpftool")
            .args(["map", "show", "id", &id])
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&show.stdout).contains("_LOST") {
            continue;
        }
        let dump = Command::new("bpftool")
            .args(["-j", "map", "dump", "id", &id])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("bpftool json");
        for entry in v.as_array().unwrap() {
            // With BTF bpftool adds a `formatted` copy holding plain numbers; the raw values
            // are little-endian byte arrays ("0x2a", "0x00", ...).
            let values = entry.get("formatted").unwrap_or(entry)["values"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for cpu in values {
                total += match &cpu["value"] {
                    serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
                    serde_json::Value::Array(bytes) => bytes
                        .iter()
                        .rev()
                        .filter_map(|b| {
                            u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()
                        })
                        .fold(0, |acc, b| acc << 8 | b),
                    _ => 0,
                };
            }
        }
    }
    total
}

/// `tanzhen_events_lost_total` of the reasons kept in kernel maps (not the perf buffers' own
/// count nor BPF recursion misses, which come from elsewhere).
fn exported_lost(m: &Metrics) -> f64 {
    m.samples("tanzhen_events_lost_total")
        .filter(|(l, _)| {
            l.iter()
                .all(|(k, v)| k != "reason" || (v != "perf_lost" && v != "recursion"))
        })
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn soak_all_probes_with_process_and_connect_churn() {
    let procs = env_or("TANZHEN_SOAK_PROCESSES", 2_500);
    let connects = env_or("TANZHEN_SOAK_CONNECTS", 10_000);
    let agent = Agent::start(&[
        "--probes",
        "all",
        "--max-series-per-metric",
        &CAP.to_string(),
        "--interval",
        "1s",
    ]);
    let mut rng = Rng(u64::from(std::process::id()) << 20 | 0x9e37);
    // Warm-up: a fifth of the workload, then the caps are reached and RSS is taken.
    churn_processes(&mut rng, procs / 5);
    churn_connects(&mut rng, connects / 5);
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.scrape();
    assert_caps(&m, "warm-up");
    assert!(
        m.sum("tanzhen_series_folded_total", &[]) > 0.0,
        "the workload should reach the cap:\n{}",
        m.0
    );
    let warm = rss_kib(agent.pid());
    let mut peak = warm;
    for round in 1..5 {
        churn_processes(&mut rng, procs / 5);
        churn_connects(&mut rng, connects / 5);
        assert_caps(&agent.scrape(), &format!("round {round}"));
        peak = peak.max(rss_kib(agent.pid()));
    }
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.scrape();
    assert_caps(&m, "end");
    let end = rss_kib(agent.pid());
    eprintln!(
        "soak: {procs} processes, {connects} connects; RSS warm-up {warm} KiB, peak {peak} KiB, end {end} KiB; folded {}",
        m.sum("tanzhen_series_folded_total", &[])
    );
    assert!(
        end * 100 <= warm * 120,
        "RSS grew from {warm} KiB after warm-up to {end} KiB"
    );
    let execs = m.sum("tanzhen_process_exits_total", &[]);
    assert!(
        execs >= procs as f64,
        "{execs} exits counted for {procs} processes"
    );
    // The agent copies the kernel's drop maps every interval: what it exported is at most
    // what the maps hold now, and it catches up with that within a few intervals (new drops
    // in between only make the kernel's side larger).
    let kernel = kernel_lost(agent.pid());
    let exported = exported_lost(&m);
    assert!(
        exported <= kernel as f64,
        "exported drops {exported} > the kernel's {kernel}"
    );
    let m = crate::wait_for(&agent, Duration::from_secs(10), |m| {
        exported_lost(m) >= kernel as f64
    });
    assert!(
        exported_lost(&m) >= kernel as f64,
        "exported drops {} never reached the kernel's {kernel}",
        exported_lost(&m)
    );
    eprintln!("soak: kernel drop maps {kernel}, exported {exported}");
}
