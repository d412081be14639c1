//! The Grafana dashboards (dashboards/*.json) against real data: their structure, and every
//! panel query run through a real Prometheus (Debian's 2.42) scraping a real `tanzhen run
//! --probes all` every second under a workload of TCP connects (established and refused),
//! failing opens, context switches and execs. A query that names a metric or label the agent
//! does not export returns nothing, and fails the test with the panel's title.
//!
//! Also the agent's own `process_*` metrics, which the overview's health panels read.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Agent, free_port, http_get, wait_for};

/// Substitution for `$__rate_interval`: five 1 s scrapes of an agent draining its kernel maps
/// every second (`--interval 1s`), so every window holds fresh increments.
const RATE_INTERVAL: &str = "5s";

fn dashboards_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Every dashboard: file name and parsed JSON.
fn dashboards() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("dashboards/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected overview, tcp, syscalls, sched: {files:?}"
    );
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
            (name, v)
        })
        .collect()
}

fn panels(d: &Value) -> &Vec<Value> {
    d["panels"].as_array().expect("panels")
}

fn title(p: &Value) -> &str {
    p["title"].as_str().unwrap_or("<untitled>")
}

fn is_ds_var(ds: &Value) -> bool {
    ds["type"] == "prometheus" && ds["uid"] == "${datasource}"
}

#[test]
fn dashboards_are_well_formed() {
    for (name, d) in dashboards() {
        assert!(
            d["schemaVersion"].as_u64().unwrap() >= 39,
            "{name}: schemaVersion"
        );
        assert!(
            d["uid"].as_str().is_some_and(|u| u.starts_with("tanzhen-")),
            "{name}: uid"
        );
        assert!(
            d["id"].is_null(),
            "{name}: provisioned dashboards carry no id"
        );
        let vars = d["templating"]["list"].as_array().expect("templating");
        let var = |n: &str| vars.iter().find(|v| v["name"] == n);
        let ds = var("datasource").unwrap_or_else(|| panic!("{name}: no datasource variable"));
        assert_eq!(ds["type"], "datasource", "{name}");
        assert_eq!(ds["query"], "prometheus", "{name}");
        assert!(var("instance").is_some(), "{name}: no instance variable");
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert!(
                is_ds_var(&v["datasource"]),
                "{name}: variable {} datasource",
                v["name"]
            );
        }
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let t = title(p);
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}/{t}: no id"));
            assert!(ids.insert(id), "{name}: panel id {id} ({t}) is not unique");
            assert!(
                is_ds_var(&p["datasource"]),
                "{name}/{t}: datasource is not ${{datasource}}"
            );
            let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
            assert!(!unit.is_empty(), "{name}/{t}: no unit");
            if p["type"] == "heatmap" {
                assert_eq!(
                    p["options"]["calculate"], false,
                    "{name}/{t}: heatmap recalculates"
                );
                assert!(
                    p["options"]["yAxis"]["unit"].is_string(),
                    "{name}/{t}: y unit"
                );
            }
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}/{t}: targets"));
            assert!(!targets.is_empty(), "{name}/{t}: no query");
            for q in targets {
                assert!(is_ds_var(&q["datasource"]), "{name}/{t}: target datasource");
                let expr = q["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}/{t}: no expr"));
                assert!(
                    expr.contains("$instance"),
                    "{name}/{t}: ignores the instance variable"
                );
                if p["type"] == "heatmap" {
                    assert_eq!(q["format"], "heatmap", "{name}/{t}");
                    assert!(
                        expr.contains("_bucket") && expr.contains("by (le)"),
                        "{name}/{t}"
                    );
                }
            }
            let gp = &p["gridPos"];
            assert!(
                gp["x"].as_u64().unwrap() + gp["w"].as_u64().unwrap() <= 24,
                "{name}/{t}: gridPos"
            );
        }
    }
}

/// A Prometheus server on a loopback port with a temporary storage directory; killed and
/// cleaned up when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("tanzhen-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tanzhen\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("/usr/bin/prometheus missing: install Debian's prometheus (cargo xtask setup)");
        Self { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query; returns the result array, or the error Prometheus gave.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let (status, body) = http_get(self.addr, &path).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A workload child process: a listener and its acceptor thread, connects that succeed and
/// connects refused by a bound but not listening port, opens of a missing file, short sleeps
/// (context switches, wakeups) and an exec of /bin/true every tenth round. Killed on drop.
struct Workload(Child);

const WORKLOAD: &str = r#"
import socket, subprocess, threading, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(128)
def accept():
    while True:
        c, _ = srv.accept()
        c.close()
threading.Thread(target=accept, daemon=True).start()
closed = socket.socket()
closed.bind(("127.0.0.1", 0))
i = 0
while True:
    socket.create_connection(srv.getsockname()).close()
    try:
        socket.create_connection(closed.getsockname()).close()
    except OSError:
        pass
    try:
        open("/nonexistent/tanzhen-dashboards-test")
    except OSError:
        pass
    if i % 10 == 0:
        subprocess.run(["/bin/true"])
    i += 1
    time.sleep(0.005)
"#;

impl Workload {
    fn start() -> Self {
        let child = Command::new("python3")
            .args(["-c", WORKLOAD])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        Self(child)
    }

    /// The workload's comm once it runs Python (`python3` may be a wrapper script, e.g. a
    /// pyenv shim, that execs the interpreter a moment later).
    fn comm(&self) -> String {
        let read = || {
            std::fs::read_to_string(format!("/proc/{}/comm", self.0.id()))
                .expect("workload comm")
                .trim()
                .to_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut comm = read();
        while !comm.starts_with("python") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            comm = read();
        }
        assert!(
            comm.starts_with("python"),
            "the workload runs as `{comm}`, not python"
        );
        comm
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Grafana's variables as the test sets them: the instance and the workload's comm; the
/// Kubernetes drill-down variables (namespace, workload, pod) at "All" (`.*`: outside
/// Kubernetes those labels are empty).
fn substitute(expr: &str, instance: &str, comm: &str) -> String {
    let mut e = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${instance}", instance)
        .replace("$instance", instance)
        .replace("${comm}", comm)
        .replace("$comm", comm);
    for v in ["namespace", "workload", "pod"] {
        e = e
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    e
}

/// `label_values(SELECTOR, LABEL)` as a query returning one series per value.
fn label_values_query(def: &str) -> Option<String> {
    let inner = def
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some(format!("count by ({}) ({})", label.trim(), sel.trim()))
}

fn non_nan(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .is_some_and(|v| v != "NaN" && v.parse::<f64>().is_ok())
    })
}

#[test]
fn every_panel_query_returns_data_from_a_real_prometheus() {
    let workload = Workload::start();
    let closed = free_port();
    let agent = Agent::start(&[
        "--probes",
        "all",
        "--interval",
        "1s",
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{closed}"),
        "--otlp-interval",
        "1s",
        "--trace-max-spans-per-second",
        "1",
    ]);
    let comm = workload.comm();
    // The workload is visible to the agent before Prometheus starts counting.
    let m = wait_for(&agent, Duration::from_secs(30), |m| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &comm), ("outcome", "failed")],
        ) > 0.0
            && m.sum(
                "tanzhen_tcp_connects_total",
                &[("comm", &comm), ("outcome", "established")],
            ) > 0.0
    });
    assert!(
        m.sum("tanzhen_tcp_connects_total", &[("comm", &comm)]) > 0.0,
        "the agent saw no connects from the workload ({comm}):\n{}",
        m.0
    );
    let prom = Prometheus::start(agent.addr);
    let instance = agent.addr.to_string();

    // Wait for a few scrapes: at least eight samples of `up` at 1 in the last minute.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = prom.query(r#"sum_over_time(up{job="tanzhen"}[1m]) >= 8"#);
        if r.as_ref().is_ok_and(|r| !r.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the agent 8 times in 90 s ({r:?}):\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, d) in dashboards() {
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] != "query" {
                continue;
            }
            let def = v["definition"].as_str().unwrap_or("");
            let q = label_values_query(def).unwrap_or_else(|| {
                panic!(
                    "{name}: variable {} is not label_values(..): {def}",
                    v["name"]
                )
            });
            let q = substitute(&q, &instance, &comm);
            match prom.query(&q) {
                Ok(r) if !r.is_empty() => checked += 1,
                other => failures.push(format!("{name}: variable {}: {q} -> {other:?}", v["name"])),
            }
        }
        for p in panels(&d) {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                let q = substitute(expr, &instance, &comm);
                assert!(
                    !q.contains('$'),
                    "{name}/{}: unsubstituted variable in {q}",
                    title(p)
                );
                match prom.query(&q) {
                    Ok(r) if non_nan(&r) => checked += 1,
                    other => failures.push(format!(
                        "{name}: panel \"{}\" ({}): {q} -> {other:?}",
                        title(p),
                        t["refId"]
                    )),
                }
            }
        }
    }
    eprintln!(
        "{checked} panel and variable queries returned data (comm {comm}, instance {instance})"
    );
    assert!(
        failures.is_empty(),
        "{} panel queries returned no data:\n{}\n--- scrape ---\n{}",
        failures.len(),
        failures.join("\n"),
        agent.scrape().0
    );
    drop(workload);
}

/// A query on a metric the agent does not export fails, naming the panel: the check above
/// cannot pass vacuously.
#[test]
fn a_query_on_a_missing_metric_or_label_returns_nothing() {
    let agent = Agent::start(&["--probes", "tcp"]);
    let prom = Prometheus::start(agent.addr);
    let instance = agent.addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while prom
        .query(&format!("tanzhen_build_info{{instance=\"{instance}\"}}"))
        .map_or(true, |r| r.is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "no scrape in 60 s:\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for q in [
        "sum(rate(tanzhen_tcp_connect_total{instance=~\"$instance\"}[$__rate_interval]))",
        "sum by (pod) (tanzhen_probe_up{instance=~\"$instance\", pod=~\".+\"})",
    ] {
        let r = prom.query(&substitute(q, &instance, "x")).unwrap();
        assert!(r.is_empty(), "{q} -> {r:?}");
    }
}

/// The agent's own process metrics describe the agent process (as /proc shows it).
#[test]
fn process_metrics_describe_the_agent() {
    let agent = Agent::start(&["--probes", "tcp"]);
    let pid = agent.pid();
    let m = agent.scrape();
    let one = |n: &str| {
        let v: Vec<f64> = m.samples(n).map(|(_, v)| v).collect();
        assert_eq!(v.len(), 1, "{n}: {:?}\n{}", v, m.0);
        v[0]
    };
    let rss = one("process_resident_memory_bytes");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let ratio = rss / (vm_rss_kb * 1024.0);
    assert!(
        (0.5..2.0).contains(&ratio),
        "RSS {rss} vs VmRSS {vm_rss_kb} kB"
    );
    assert!(rss > 1e6, "RSS {rss}");
    let fds = one("process_open_fds");
    let real_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!(
        fds >= 5.0 && (fds - real_fds).abs() <= 5.0,
        "open fds {fds} vs {real_fds}"
    );
    assert!(one("process_max_fds") >= fds);
    assert!(one("process_virtual_memory_bytes") >= rss);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = one("process_start_time_seconds");
    assert!(
        start <= now + 2.0 && start > now - 120.0,
        "start {start}, now {now}"
    );
    let cpu = one("process_cpu_seconds_total");
    assert!(cpu > 0.0 && cpu < 120.0, "cpu {cpu}");
    assert!(
        m.0.contains("# TYPE process_cpu_seconds_total counter"),
        "{}",
        m.0
    );
    // Refreshed on every scrape: CPU seconds never go back.
    let later = agent.scrape();
    let cpu2: f64 = later.sum("process_cpu_seconds_total", &[]);
    assert!(cpu2 >= cpu, "{cpu2} < {cpu}");
}
