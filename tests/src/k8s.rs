//! Kubernetes metadata end to end: a Kubernetes API server played by this test (HTTPS with a
//! CA made here, bearer token, real-shaped PodList, ReplicaSet and Job JSON and a watch stream
//! with ADDED/MODIFIED/DELETED/BOOKMARK events), a process the test moves into a cgroup named
//! like a containerd container, and the real agent, reached through a kubeconfig file.
//!
//! Checked: the process's TCP connects carry its pod's namespace, pod, container and workload
//! (ReplicaSet -> Deployment, Job -> CronJob, looked up through the API); watch events change
//! them; with the API server gone, `tanzhen_k8s_metadata_up` is 0, one warning is logged, the
//! agent keeps serving and labels fall back to the short container id.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io::Write as _,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    thread,
    time::Duration,
};

use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use crate::{Agent, Metrics, wait_for};

const NODE: &str = "node-1";
const TOKEN: &str = "tanzhen-test-token";

/// A response body sent in chunks as they come (a watch stream) or all at once.
struct Chunks(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Chunks> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let _ = tx.send(Bytes::from(body.to_string()));
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Chunks(rx))
        .unwrap()
}

/// A `Status` object, as the API server returns with errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Chunks> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

/// The cluster state the fake API server serves.
#[derive(Default)]
struct Cluster {
    rv: u64,
    /// uid -> pod object.
    pods: BTreeMap<String, Value>,
    /// Watch events in order: (resourceVersion, event line).
    events: Vec<(u64, String)>,
    /// API path -> object (ReplicaSets, Jobs).
    objects: HashMap<String, Value>,
    /// Paths and queries of the requests received.
    requests: Vec<String>,
}

impl Cluster {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Adds, modifies or deletes a pod, logging the watch event.
    fn change(&mut self, kind: &str, mut pod: Value) {
        let rv = self.next_rv();
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        if kind == "DELETED" {
            self.pods.remove(&uid);
        } else {
            self.pods.insert(uid, pod.clone());
        }
        let line = json!({"type": kind, "object": pod}).to_string();
        self.events.push((rv, line));
    }

    /// A BOOKMARK event: only the resourceVersion moves.
    fn bookmark(&mut self) {
        let rv = self.next_rv();
        let line = json!({"type": "BOOKMARK", "object": {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": rv.to_string(),
                         "annotations": {"k8s.io/initial-events-end": "true"}},
        }})
        .to_string();
        self.events.push((rv, line));
    }
}

/// The fake API server: HTTPS on 127.0.0.1, its own runtime (stopping it drops every
/// connection), the CA and a kubeconfig in a temporary directory.
struct ApiServer {
    cluster: Arc<Mutex<Cluster>>,
    notify: tokio::sync::watch::Sender<u64>,
    rt: Option<tokio::runtime::Runtime>,
    dir: PathBuf,
}

impl ApiServer {
    fn start(cluster: Cluster) -> Self {
        let dir = std::env::temp_dir().join(format!("tanzhen-k8s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A CA made here, and a server certificate for 127.0.0.1 signed by it.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tanzhen test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();

        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let cluster = Arc::new(Mutex::new(cluster));
        let (notify, _) = tokio::sync::watch::channel(0u64);
        let (c, n) = (cluster.clone(), notify.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, c, n) = (acceptor.clone(), c.clone(), n.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let (c, n) = (c.clone(), n.clone());
                        async move { Ok::<_, Infallible>(handle(&req, &c, &n)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let server = Self {
            cluster,
            notify,
            rt: Some(rt),
            dir,
        };
        server.write_kubeconfig(addr);
        server
    }

    /// Writes `kubeconfig` for a server at `addr`, with our CA file and token.
    fn write_kubeconfig(&self, addr: SocketAddr) -> PathBuf {
        let path = self.dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://{addr}
    certificate-authority: {ca}
users:
- name: tanzhen
  user:
    token: {TOKEN}
contexts:
- name: test
  context:
    cluster: test
    user: tanzhen
current-context: test
",
            ca = self.dir.join("ca.crt").display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn kubeconfig(&self) -> String {
        self.dir.join("kubeconfig").display().to_string()
    }

    /// Applies `f` to the cluster and wakes the watches.
    fn update(&self, f: impl FnOnce(&mut Cluster)) {
        let rv = {
            let mut c = self.cluster.lock().unwrap();
            f(&mut c);
            c.rv
        };
        let _ = self.notify.send(rv);
    }

    fn requests(&self) -> Vec<String> {
        self.cluster.lock().unwrap().requests.clone()
    }

    /// Stops serving: the listener and every open connection (watch streams) close.
    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves one request the way the API server would.
fn handle(
    req: &Request<hyper::body::Incoming>,
    cluster: &Arc<Mutex<Cluster>>,
    notify: &tokio::sync::watch::Sender<u64>,
) -> Response<Chunks> {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    cluster.lock().unwrap().requests.push(req.uri().to_string());
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if path != "/api/v1/pods" {
        let c = cluster.lock().unwrap();
        return match c.objects.get(&path) {
            Some(o) => respond(StatusCode::OK, o),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{path} not found"),
            ),
        };
    }
    // Only pods whose spec.nodeName matches the field selector, as the API server filters.
    let node = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_owned);
    let on_node = move |pod: &Value| {
        node.as_deref()
            .is_none_or(|n| pod["spec"]["nodeName"].as_str() == Some(n))
    };
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (c, mut woken) = (cluster.clone(), notify.subscribe());
        tokio::spawn(async move {
            let mut sent = from;
            loop {
                let lines: Vec<(u64, String)> = c
                    .lock()
                    .unwrap()
                    .events
                    .iter()
                    .filter(|(rv, _)| *rv > sent)
                    .cloned()
                    .collect();
                for (rv, line) in lines {
                    sent = rv;
                    let v: Value = serde_json::from_str(&line).unwrap();
                    if v["type"] != "BOOKMARK" && !on_node(&v["object"]) {
                        continue;
                    }
                    if tx.send(Bytes::from(format!("{line}\n"))).is_err() {
                        return;
                    }
                }
                if woken.changed().await.is_err() {
                    return;
                }
            }
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Chunks(rx))
            .unwrap();
    }
    let c = cluster.lock().unwrap();
    let items: Vec<&Value> = c.pods.values().filter(|p| on_node(p)).collect();
    let list = json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": c.rv.to_string()},
        "items": items,
    });
    respond(StatusCode::OK, &list)
}

/// A pod on `node` as the API server returns it (list items carry no kind/apiVersion; the
/// watch adds them). `container_id` `None`: its container has not started yet.
fn pod(
    uid: &str,
    ns: &str,
    name: &str,
    node: &str,
    owner: (&str, &str),
    container: (&str, Option<&str>),
) -> Value {
    let (kind, owner_name) = owner;
    let api = if kind == "Job" { "batch/v1" } else { "apps/v1" };
    let mut status = json!({"name": container.0, "ready": container.1.is_some(),
        "restartCount": 0, "image": "docker.io/library/busybox:1.36",
        "imageID": "", "started": container.1.is_some(),
        "state": {"waiting": {"reason": "ContainerCreating"}}});
    if let Some(id) = container.1 {
        status["containerID"] = json!(format!("containerd://{id}"));
        status["imageID"] = json!("docker.io/library/busybox@sha256:0123");
        status["state"] = json!({"running": {"startedAt": "2026-11-23T08:00:00Z"}});
    }
    let hash = owner_name.rsplit('-').next().unwrap_or("");
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": ns, "uid": uid, "resourceVersion": "1",
            "creationTimestamp": "2026-11-23T08:00:00Z",
            "labels": {"app": "test", "pod-template-hash": hash},
            "ownerReferences": [{"apiVersion": api, "kind": kind, "name": owner_name,
                "uid": format!("{uid}-owner"), "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"nodeName": node, "containers": [{"name": container.0, "image": "busybox:1.36"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.7", "containerStatuses": [status]},
    })
}

/// A ReplicaSet or Job controlled by `owner`, at its API path.
fn controlled(kind: &str, ns: &str, name: &str, owner: (&str, &str)) -> (String, Value) {
    let (group, plural) = if kind == "Job" {
        ("batch/v1", "jobs")
    } else {
        ("apps/v1", "replicasets")
    };
    let (owner_api, owner_kind) = (
        if owner.0 == "CronJob" {
            "batch/v1"
        } else {
            "apps/v1"
        },
        owner.0,
    );
    let obj = json!({
        "kind": kind, "apiVersion": group,
        "metadata": {"name": name, "namespace": ns, "uid": format!("{name}-uid"),
            "resourceVersion": "7", "generation": 1,
            "ownerReferences": [{"apiVersion": owner_api, "kind": owner_kind, "name": owner.1,
                "uid": format!("{}-uid", owner.1), "controller": true, "blockOwnerDeletion": true}]},
        "spec": {},
        "status": {},
    });
    (
        format!("/apis/{group}/namespaces/{ns}/{plural}/{name}"),
        obj,
    )
}

/// A cgroup v2 directory named like a containerd container's scope, removed on drop.
struct ContainerCgroup {
    dir: PathBuf,
    id: String,
}

impl ContainerCgroup {
    fn create() -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let root = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .expect("a cgroup v2 hierarchy is mounted");
        // Our pid first, so the 12-character short id is ours too.
        let mut id = format!("{:08x}", std::process::id()) + &"0123456789abcdef".repeat(4);
        id.truncate(64);
        let dir = root
            .join("tanzhen-test.slice")
            .join(format!("cri-containerd-{id}.scope"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { dir, id }
    }

    /// Starts `bash -c script` (after `read`ing a line) in this cgroup.
    fn spawn(&self, script: &str) -> Workload {
        let mut child = Command::new("bash")
            .args(["-c", &format!("read -r _; {script}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(self.dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(text.contains(&self.id), "moved into the cgroup: {text}");
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        Workload(child)
    }

    fn short(&self) -> &str {
        &self.id[..12]
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        // Processes leave a cgroup asynchronously after exiting.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Accepts (and drops) connections forever; returns the port.
fn sink_listener() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    port
}

/// `bash` connecting `n` times to 127.0.0.1:`port`, or forever every 100 ms when `n` is None.
fn connects(port: u16, n: Option<u32>) -> String {
    let once = format!("exec 3<>/dev/tcp/127.0.0.1/{port}; exec 3<&-");
    match n {
        Some(n) => format!("for i in $(seq {n}); do {once}; done"),
        None => format!("while :; do {once}; sleep 0.1; done"),
    }
}

fn established(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    let mut l = labels.to_vec();
    l.push(("outcome", "established"));
    m.sum("tanzhen_tcp_connects_total", &l)
}

/// Connect attempts whatever their outcome: what the label checks of the looping workload
/// count (its connects to the sink listener are sometimes refused on this shared machine).
fn attempts(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    m.sum("tanzhen_tcp_connects_total", labels)
}

fn up(m: &Metrics) -> f64 {
    m.sum("tanzhen_k8s_metadata_up", &[])
}

fn has_up(m: &Metrics) -> bool {
    m.0.lines()
        .any(|l| l.starts_with("tanzhen_k8s_metadata_up "))
}

/// [`wait_for`] that fails the test, naming `what`, when `cond` never holds.
fn wait_until(agent: &Agent, secs: u64, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let m = wait_for(agent, Duration::from_secs(secs), &cond);
    assert!(
        cond(&m),
        "{what}: not within {secs} s\n{}\nlog:\n{}",
        m.0.lines()
            .filter(|l| l.starts_with("tanzhen_tcp_connects_total") || l.starts_with("tanzhen_k8s"))
            .collect::<Vec<_>>()
            .join("\n"),
        agent.log_text()
    );
    m
}

/// A process of the test workload, killed when dropped (also when an assertion fails).
struct Workload(Child);

impl Workload {
    fn wait_success(&mut self) -> bool {
        self.0.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pod_labels_follow_the_api_server_and_survive_its_outage() {
    let cg = ContainerCgroup::create();
    let web = pod(
        "6f1d0c2b-8e3a-4b7c-9d5e-0a1b2c3d4e5f",
        "shop",
        "web-5d4f8c7b9-x2x7q",
        NODE,
        ("ReplicaSet", "web-5d4f8c7b9"),
        ("app", Some(&cg.id)),
    );
    let elsewhere = pod(
        "11111111-2222-4333-8444-555555555555",
        "shop",
        "web-5d4f8c7b9-other",
        "node-2",
        ("ReplicaSet", "web-5d4f8c7b9"),
        ("app", Some(&cg.id)),
    );
    let mut cluster = Cluster::default();
    cluster.change("ADDED", web.clone());
    cluster.change("ADDED", elsewhere);
    for (path, obj) in [
        controlled("ReplicaSet", "shop", "web-5d4f8c7b9", ("Deployment", "web")),
        controlled("Job", "batch", "report-29390160", ("CronJob", "report")),
    ] {
        cluster.objects.insert(path, obj);
    }
    let mut api = ApiServer::start(cluster);
    let kubeconfig = api.kubeconfig();
    // `--k8s auto` in a "pod": KUBERNETES_SERVICE_HOST set; KUBECONFIG wins for the credentials.
    let agent = Agent::start_with_env(
        &["--probes", "tcp"],
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "1"),
            ("KUBECONFIG", &kubeconfig),
            ("NODE_NAME", NODE),
        ],
    );
    wait_until(&agent, 30, "metadata up", |m| up(m) == 1.0);
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("/api/v1/pods?") && r.contains("spec.nodeName%3Dnode-1")),
        "pods listed with the node's field selector: {reqs:?}"
    );

    // 1. The listed pod: exact counts under its labels, the Deployment found via its ReplicaSet.
    let port = sink_listener();
    let web_labels = [
        ("namespace", "shop"),
        ("pod", "web-5d4f8c7b9-x2x7q"),
        ("container", "app"),
        ("workload", "deployment/web"),
    ];
    let before = agent.scrape();
    let mut child = cg.spawn(&connects(port, Some(3)));
    assert!(child.wait_success());
    wait_until(&agent, 15, "connects under the web pod's labels", |m| {
        established(m, &web_labels) - established(&before, &web_labels) >= 3.0
    });
    thread::sleep(Duration::from_millis(500));
    let after = agent.scrape();
    assert_eq!(
        established(&after, &web_labels) - established(&before, &web_labels),
        3.0,
        "exactly the child's connects:\n{}",
        after.0
    );
    assert!(
        reqs.iter()
            .chain(&api.requests())
            .any(|r| r.starts_with("/apis/apps/v1/namespaces/shop/replicasets/web-5d4f8c7b9")),
        "the ReplicaSet was looked up"
    );

    // 2. Watch: DELETED -> the container id alone; ADDED then MODIFIED (container started) ->
    //    the new pod, whose Job belongs to a CronJob. BOOKMARKs in between.
    let looping = cg.spawn(&connects(port, None));
    api.update(|c| {
        c.bookmark();
        c.change("DELETED", web);
    });
    let fallback = [
        ("namespace", ""),
        ("pod", ""),
        ("container", cg.short()),
        ("workload", ""),
    ];
    wait_until(&agent, 15, "after DELETED: the container id alone", |m| {
        attempts(m, &fallback) > 0.0
    });
    let report = |id| {
        pod(
            "a0b1c2d3-e4f5-4a6b-8c7d-8e9f0a1b2c3d",
            "batch",
            "report-29390160-q7k2m",
            NODE,
            ("Job", "report-29390160"),
            ("worker", id),
        )
    };
    api.update(|c| {
        c.change("ADDED", report(None));
        c.bookmark();
        c.change("MODIFIED", report(Some(&cg.id)));
    });
    let report_labels = [
        ("namespace", "batch"),
        ("pod", "report-29390160-q7k2m"),
        ("container", "worker"),
        ("workload", "cronjob/report"),
    ];
    wait_until(&agent, 15, "after ADDED+MODIFIED: the CronJob's pod", |m| {
        attempts(m, &report_labels) > 0.0
    });

    // 3. The API server goes away: up drops to 0, one warning, the agent keeps serving and
    //    counting (with the last pods it knew).
    api.stop();
    wait_until(&agent, 30, "metadata down", |m| up(m) == 0.0);
    let seen = attempts(&agent.scrape(), &report_labels);
    wait_until(&agent, 15, "still counting with the API server down", |m| {
        attempts(m, &report_labels) > seen
    });
    thread::sleep(Duration::from_secs(3));
    let log = agent.log_text();
    assert_eq!(
        log.matches("cannot watch the pods of node node-1").count(),
        1,
        "one warning per outage, however many retries:\n{log}"
    );
    drop(looping);
}

#[test]
fn unreachable_api_server_leaves_container_ids_and_the_agent_serving() {
    let cg = ContainerCgroup::create();
    let mut api = ApiServer::start(Cluster::default());
    // Nothing listens on the kubeconfig's port.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    api.stop();
    api.write_kubeconfig(dead);
    let agent = Agent::start_with_env(
        &["--probes", "tcp", "--k8s", "on", "--node-name", NODE],
        &[("KUBECONFIG", &api.kubeconfig())],
    );
    let m = wait_until(&agent, 15, "the metadata gauge", has_up);
    assert_eq!(up(&m), 0.0);
    let port = sink_listener();
    let before = agent.scrape();
    let fallback = [
        ("namespace", ""),
        ("pod", ""),
        ("container", cg.short()),
        ("workload", ""),
    ];
    let mut child = cg.spawn(&connects(port, Some(2)));
    assert!(child.wait_success());
    wait_until(&agent, 15, "connects under the container id", |m| {
        established(m, &fallback) - established(&before, &fallback) >= 2.0
    });
    let log = agent.log_text();
    assert_eq!(
        log.matches("cannot watch the pods of node node-1").count(),
        1,
        "{log}"
    );
    assert_eq!(up(&agent.scrape()), 0.0);
}

#[test]
fn k8s_on_without_credentials_is_a_usage_error() {
    let out = Command::new(crate::tanzhen_bin())
        .args(["run", "--k8s", "on", "--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--k8s on: no Kubernetes credentials"), "{err}");
}
