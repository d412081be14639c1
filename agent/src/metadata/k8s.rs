//! Kubernetes metadata: container id -> namespace, pod, container name and owning workload, for
//! the pods of this node, from the API server.
//!
//! kube-rs's watcher lists the pods whose `spec.nodeName` is this node (the DaemonSet passes it
//! through the downward API as `NODE_NAME`), then watches them; its backoff retries forever when
//! the API server is away. The workload is the pod's controller, followed one step up for
//! ReplicaSets (-> Deployment) and Jobs (-> CronJob) with a cached GET of the ReplicaSet or Job
//! (when that fails, a ReplicaSet named `<deployment>-<pod-template-hash>` is read as its
//! Deployment). Other controllers (StatefulSet, DaemonSet, ...) are the workload themselves.
//!
//! Credentials: `KUBECONFIG` (or `~/.kube/config`) when present, else the in-cluster service
//! account (`KUBERNETES_SERVICE_HOST`/`_PORT`, token and CA under
//! /var/run/secrets/kubernetes.io/serviceaccount). An unreachable API server never stops the
//! agent: `tanzhen_k8s_metadata_up` drops to 0, one warning is logged per outage, and labels
//! fall back to the container id until the watch is back.

//!
//! Built without the `k8s` cargo feature (`--no-default-features`), `--k8s on`
//! is refused and `auto` stays off.

#[cfg(feature = "k8s")]
use std::collections::BTreeMap;
use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

#[cfg(feature = "k8s")]
use futures_util::StreamExt as _;
#[cfg(feature = "k8s")]
use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
#[cfg(feature = "k8s")]
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::watch as stop_watch, task::JoinHandle};

use super::WorkloadLabels;
use crate::snapshot::Snapshot;
#[cfg(feature = "k8s")]
use crate::snapshot::{Desc, GaugeVec};

/// Whether Kubernetes metadata is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum K8sMode {
    /// On when KUBERNETES_SERVICE_HOST is set (the agent runs in a pod).
    Auto,
    /// Always (outside a cluster: through KUBECONFIG or ~/.kube/config).
    On,
    /// Never: the namespace, pod and workload labels stay empty.
    Off,
}

/// Options of `tanzhen run` about Kubernetes metadata.
#[derive(Clone, Debug, clap::Args)]
pub struct K8sArgs {
    /// Kubernetes labels (namespace, pod, container, workload) from the API server: `auto` (on
    /// when KUBERNETES_SERVICE_HOST is set, i.e. in a pod), `on` (also outside a cluster,
    /// through KUBECONFIG) or `off`.
    #[arg(long, env = "TANZHEN_K8S", default_value = "auto", value_enum)]
    pub k8s: K8sMode,

    /// Node whose pods are watched. Default: $NODE_NAME (the DaemonSet sets it from
    /// spec.nodeName), else this host's name.
    #[arg(long, env = "TANZHEN_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
}

#[cfg(feature = "k8s")]
/// Why Kubernetes metadata cannot start; one line each.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// Neither a kubeconfig nor the in-cluster service account was found.
    #[error(
        "no Kubernetes credentials ({0}); set KUBECONFIG, run in a pod with a service account, or use --k8s off"
    )]
    Config(String),
    /// The client could not be built from the configuration (bad CA, bad URL).
    #[error("Kubernetes client: {0}")]
    Client(String),
}

impl K8sArgs {
    /// Whether metadata is on, given the environment (`env` reads a variable).
    #[must_use]
    pub fn enabled(&self, env: &dyn Fn(&str) -> Option<String>) -> bool {
        match self.k8s {
            K8sMode::On => true,
            K8sMode::Off => false,
            K8sMode::Auto => env("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty()),
        }
    }

    /// The node name: the flag, else `NODE_NAME`, else the host name.
    #[must_use]
    #[cfg_attr(
        not(any(feature = "k8s", test)),
        expect(dead_code, reason = "only the API watch needs it")
    )]
    pub fn node(&self, env: &dyn Fn(&str) -> Option<String>) -> String {
        self.node_name
            .clone()
            .or_else(|| env("NODE_NAME"))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_default()
            })
    }
}

/// Starts the watch of this node's pods when `args` turn Kubernetes metadata on (`Ok(None)`:
/// off). The error is a usage error, one line: `--k8s on` without credentials.
#[cfg(feature = "k8s")]
pub async fn start(
    args: &K8sArgs,
    snapshot: &Snapshot,
    stop: &stop_watch::Receiver<bool>,
) -> Result<Option<(Arc<PodIndex>, JoinHandle<()>)>, String> {
    let env = |k: &str| std::env::var(k).ok();
    if !args.enabled(&env) {
        return Ok(None);
    }
    match client().await {
        Ok(client) => {
            let node = args.node(&env);
            log::info!("k8s: metadata of the pods of node {node} from the API server");
            let w = PodWatch::new(client, node, snapshot);
            let index = w.index();
            Ok(Some((index, tokio::spawn(w.run(stop.clone())))))
        }
        Err(e) if args.k8s == K8sMode::On => Err(format!("--k8s on: {e}")),
        Err(e) => {
            log::warn!("k8s: metadata off: {e}");
            Ok(None)
        }
    }
}

/// Without the `k8s` feature: `--k8s on` is refused, `auto` logs why it stays off.
#[cfg(not(feature = "k8s"))]
pub async fn start(
    args: &K8sArgs,
    _snapshot: &Snapshot,
    _stop: &stop_watch::Receiver<bool>,
) -> Result<Option<(Arc<PodIndex>, JoinHandle<()>)>, String> {
    let env = |k: &str| std::env::var(k).ok();
    match args.k8s {
        K8sMode::On => Err(
            "--k8s on: this tanzhen was built without Kubernetes support (cargo feature `k8s`); use the container image or --k8s off"
                .into(),
        ),
        K8sMode::Auto if args.enabled(&env) => {
            log::warn!(
                "k8s: this build has no Kubernetes support; the namespace, pod and workload labels stay empty"
            );
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Builds a client from KUBECONFIG / ~/.kube/config, else the in-cluster service account.
/// Nothing is sent yet: an unreachable server shows later, in the watch.
#[cfg(feature = "k8s")]
pub async fn client() -> Result<Client, K8sError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| K8sError::Config(e.to_string()))?;
    Client::try_from(config).map_err(|e| K8sError::Client(e.to_string()))
}

#[cfg(any(feature = "k8s", test))]
/// A controller of an object: its kind and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

#[cfg(any(feature = "k8s", test))]
impl Owner {
    /// The controller among `refs` (the one with `controller: true`, else the first).
    #[cfg(feature = "k8s")]
    #[must_use]
    pub fn of(refs: Option<&Vec<OwnerReference>>) -> Option<Self> {
        let refs = refs?;
        refs.iter()
            .find(|r| r.controller == Some(true))
            .or_else(|| refs.first())
            .map(|r| Self {
                kind: r.kind.clone(),
                name: r.name.clone(),
            })
    }

    /// Whether the workload is this owner's own controller (looked up through the API).
    #[must_use]
    pub fn has_parent(&self) -> bool {
        matches!(self.kind.as_str(), "ReplicaSet" | "Job")
    }

    /// `kind/name`, as kubectl names objects (`deployment/web`).
    #[must_use]
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind.to_ascii_lowercase(), self.name)
    }
}

#[cfg(any(feature = "k8s", test))]
/// The workload label of a pod controlled by `owner`. `parent` is what the API said about the
/// owner's own controller when [`Owner::has_parent`]: `Some(Some(_))` its controller,
/// `Some(None)` it has none, `None` the lookup failed. `template_hash` is the pod's
/// `pod-template-hash` label, used when a ReplicaSet could not be looked up.
#[must_use]
pub fn workload(
    owner: Option<&Owner>,
    parent: Option<Option<&Owner>>,
    template_hash: Option<&str>,
) -> String {
    let Some(owner) = owner else {
        return String::new();
    };
    if !owner.has_parent() {
        return owner.label();
    }
    match parent {
        Some(Some(p)) => p.label(),
        Some(None) => owner.label(),
        None if owner.kind == "ReplicaSet" => {
            // Deployments name their ReplicaSets `<deployment>-<pod-template-hash>`.
            match template_hash.and_then(|h| owner.name.strip_suffix(h)?.strip_suffix('-')) {
                Some(deploy) if !deploy.is_empty() => format!("deployment/{deploy}"),
                _ => owner.label(),
            }
        }
        None => owner.label(),
    }
}

#[cfg(any(feature = "k8s", test))]
/// Strips the runtime prefix of a CRI container id (`containerd://<id>` -> `<id>`).
#[must_use]
pub fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, id)| id)
}

/// What the index keeps of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodEntry {
    /// The pod's labels with an empty `container`.
    base: Arc<WorkloadLabels>,
    /// Container id -> the labels of that container.
    containers: Vec<(String, Arc<WorkloadLabels>)>,
}

#[cfg(feature = "k8s")]
impl PodEntry {
    /// The entry of `pod` whose workload is `workload`.
    fn new(pod: &Pod, workload: String) -> Self {
        let base = Arc::new(WorkloadLabels {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            container: String::new(),
            workload,
        });
        let containers = pod
            .status
            .iter()
            .flat_map(|s| {
                [
                    &s.container_statuses,
                    &s.init_container_statuses,
                    &s.ephemeral_container_statuses,
                ]
            })
            .flatten()
            .flatten()
            .filter_map(|c| {
                let id = bare_container_id(c.container_id.as_deref()?);
                (!id.is_empty()).then(|| {
                    let labels = WorkloadLabels {
                        container: c.name.clone(),
                        ..(*base).clone()
                    };
                    (id.to_owned(), Arc::new(labels))
                })
            })
            .collect();
        Self { base, containers }
    }
}

/// The pods of this node: by UID, and their containers by id.
#[derive(Debug, Default)]
struct Index {
    pods: HashMap<String, PodEntry>,
    containers: HashMap<String, Arc<WorkloadLabels>>,
}

#[cfg(feature = "k8s")]
impl Index {
    fn insert(&mut self, uid: String, entry: PodEntry) {
        self.remove(&uid);
        for (id, labels) in &entry.containers {
            self.containers.insert(id.clone(), labels.clone());
        }
        self.pods.insert(uid, entry);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for (id, _) in &old.containers {
                self.containers.remove(id);
            }
        }
    }
}

/// This node's pods, kept current by [`PodWatch::run`]; read by [`super::Metadata`].
#[derive(Debug, Default)]
pub struct PodIndex(RwLock<Index>);

impl PodIndex {
    /// The labels of container `id` (64 hex, without the runtime prefix).
    #[must_use]
    pub fn by_container(&self, id: &str) -> Option<Arc<WorkloadLabels>> {
        self.read().containers.get(id).cloned()
    }

    /// The labels (container empty) of the pod with UID `uid`.
    #[must_use]
    pub fn by_pod_uid(&self, uid: &str) -> Option<Arc<WorkloadLabels>> {
        self.read().pods.get(uid).map(|p| p.base.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(feature = "k8s")]
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Most ReplicaSet/Job lookups remembered; the cache is emptied past it.
#[cfg(feature = "k8s")]
const OWNER_CACHE_MAX: usize = 4096;

/// How long one ReplicaSet/Job lookup may take: the watch waits for it.
#[cfg(feature = "k8s")]
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Cached lookups of a ReplicaSet's or Job's own controller.
#[cfg(feature = "k8s")]
struct Owners {
    client: Client,
    /// (kind, namespace, name) -> controller (`None`: it has none).
    cache: HashMap<(String, String, String), Option<Owner>>,
}

#[cfg(feature = "k8s")]
impl Owners {
    /// The controller of `owner` in namespace `ns`; `None` when the lookup failed (not cached:
    /// it is tried again for the next pod).
    async fn parent(&mut self, ns: &str, owner: &Owner) -> Option<Option<Owner>> {
        let key = (owner.kind.clone(), ns.to_owned(), owner.name.clone());
        if let Some(p) = self.cache.get(&key) {
            return Some(p.clone());
        }
        let lookup = async {
            match owner.kind.as_str() {
                "ReplicaSet" => Api::<ReplicaSet>::namespaced(self.client.clone(), ns)
                    .get_opt(&owner.name)
                    .await
                    .map(|o| o.map(|o| o.metadata.owner_references)),
                "Job" => Api::<Job>::namespaced(self.client.clone(), ns)
                    .get_opt(&owner.name)
                    .await
                    .map(|o| o.map(|o| o.metadata.owner_references)),
                _ => Ok(Some(None)),
            }
        };
        let Ok(refs) = tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await else {
            log::debug!(
                "k8s: looking up {} {ns}/{}: timed out",
                owner.kind,
                owner.name
            );
            return None;
        };
        match refs {
            Ok(Some(refs)) => {
                let parent = Owner::of(refs.as_ref());
                if self.cache.len() >= OWNER_CACHE_MAX {
                    self.cache.clear();
                }
                self.cache.insert(key, parent.clone());
                Some(parent)
            }
            Ok(None) => {
                log::debug!("k8s: {} {ns}/{} not found", owner.kind, owner.name);
                None
            }
            Err(e) => {
                log::debug!("k8s: looking up {} {ns}/{}: {e}", owner.kind, owner.name);
                None
            }
        }
    }

    /// The index entry of `pod`, its workload resolved.
    async fn entry(&mut self, pod: &Pod) -> PodEntry {
        let owner = Owner::of(pod.metadata.owner_references.as_ref());
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let parent = match &owner {
            Some(o) if o.has_parent() => self.parent(ns, o).await,
            _ => None,
        };
        let hash = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l: &BTreeMap<String, String>| l.get("pod-template-hash"))
            .map(String::as_str);
        PodEntry::new(
            pod,
            workload(owner.as_ref(), parent.as_ref().map(Option::as_ref), hash),
        )
    }
}

/// The watch of this node's pods.
#[cfg(feature = "k8s")]
pub struct PodWatch {
    client: Client,
    node: String,
    index: Arc<PodIndex>,
    up: Arc<GaugeVec>,
}

#[cfg(feature = "k8s")]
impl PodWatch {
    /// Registers `tanzhen_k8s_metadata_up` (0 until the first list arrives).
    pub fn new(client: Client, node: String, snapshot: &Snapshot) -> Self {
        let up = snapshot.gauge(Desc {
            name: "tanzhen_k8s_metadata_up",
            help: "1 while this node's pods are listed and watched from the Kubernetes API server, 0 while it is unreachable (labels then fall back to the container id).",
            labels: &[],
        });
        up.set(&[], 0);
        Self {
            client,
            node,
            index: Arc::default(),
            up,
        }
    }

    /// The index the watch keeps current.
    #[must_use]
    pub fn index(&self) -> Arc<PodIndex> {
        self.index.clone()
    }

    /// Lists and watches this node's pods until `stop` turns true, retrying with backoff.
    pub async fn run(self, mut stop: stop_watch::Receiver<bool>) {
        let Self {
            client,
            node,
            index,
            up,
        } = self;
        let api: Api<Pod> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let mut events = watcher(api, cfg).default_backoff().boxed();
        let mut owners = Owners {
            client,
            cache: HashMap::new(),
        };
        // Entries of a (re)list in progress; swapped in whole at InitDone.
        let mut listing: Vec<(String, PodEntry)> = Vec::new();
        let mut connected = false;
        let mut warned = false;
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                _ = stop.changed() => break,
            };
            let Some(ev) = ev else { break };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    up.set(&[], 0);
                    connected = false;
                    if warned {
                        log::debug!("k8s: pod watch: {e}");
                    } else {
                        log::warn!(
                            "k8s: cannot watch the pods of node {node} ({e}); labels fall back to container ids, retrying with backoff"
                        );
                        warned = true;
                    }
                    continue;
                }
            };
            // The pods are known once a list completes or a watch event arrives.
            let live = matches!(
                ev,
                watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)
            );
            match ev {
                watcher::Event::Init => listing.clear(),
                watcher::Event::InitApply(pod) => {
                    if let Some(uid) = pod.metadata.uid.clone() {
                        listing.push((uid, owners.entry(&pod).await));
                    }
                }
                watcher::Event::InitDone => {
                    let mut idx = index.write();
                    *idx = Index::default();
                    for (uid, entry) in listing.drain(..) {
                        idx.insert(uid, entry);
                    }
                    log::debug!("k8s: {} pods on node {node}", idx.pods.len());
                }
                watcher::Event::Apply(pod) => {
                    log::debug!("k8s: pod {} applied", name_of(&pod));
                    if let Some(uid) = pod.metadata.uid.clone() {
                        let entry = owners.entry(&pod).await;
                        index.write().insert(uid, entry);
                    }
                }
                watcher::Event::Delete(pod) => {
                    log::debug!("k8s: pod {} deleted", name_of(&pod));
                    if let Some(uid) = &pod.metadata.uid {
                        index.write().remove(uid);
                    }
                }
            }
            if live && !connected {
                connected = true;
                warned = false;
                up.set(&[], 1);
                log::info!("k8s: watching the pods of node {node}");
            }
        }
    }
}

/// `namespace/name` of a pod, for logs.
#[cfg(feature = "k8s")]
fn name_of(pod: &Pod) -> String {
    let m = &pod.metadata;
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(kind: &str, name: &str) -> Owner {
        Owner {
            kind: kind.into(),
            name: name.into(),
        }
    }

    #[test]
    fn replicaset_resolves_to_its_deployment() {
        let rs = o("ReplicaSet", "web-5d4f8c7b9");
        let dep = o("Deployment", "web");
        assert_eq!(
            workload(Some(&rs), Some(Some(&dep)), None),
            "deployment/web"
        );
        // A ReplicaSet nobody controls is the workload itself.
        assert_eq!(
            workload(Some(&rs), Some(None), None),
            "replicaset/web-5d4f8c7b9"
        );
    }

    #[test]
    fn failed_replicaset_lookup_falls_back_to_the_template_hash() {
        let rs = o("ReplicaSet", "api-server-7f9c6d5b48");
        assert_eq!(
            workload(Some(&rs), None, Some("7f9c6d5b48")),
            "deployment/api-server"
        );
        assert_eq!(
            workload(Some(&rs), None, Some("0000000000")),
            "replicaset/api-server-7f9c6d5b48",
            "the hash is not the name's suffix"
        );
        assert_eq!(
            workload(Some(&rs), None, None),
            "replicaset/api-server-7f9c6d5b48"
        );
        let odd = o("ReplicaSet", "-h");
        assert_eq!(workload(Some(&odd), None, Some("h")), "replicaset/-h");
    }

    #[test]
    fn job_resolves_to_its_cronjob() {
        let job = o("Job", "report-28391234");
        let cron = o("CronJob", "report");
        assert_eq!(
            workload(Some(&job), Some(Some(&cron)), None),
            "cronjob/report"
        );
        assert_eq!(
            workload(Some(&job), Some(None), None),
            "job/report-28391234",
            "a Job of its own"
        );
        assert_eq!(workload(Some(&job), None, None), "job/report-28391234");
    }

    #[test]
    fn other_controllers_are_the_workload() {
        for (kind, want) in [
            ("StatefulSet", "statefulset/db"),
            ("DaemonSet", "daemonset/db"),
            ("Node", "node/db"),
        ] {
            assert_eq!(workload(Some(&o(kind, "db")), None, None), want);
        }
        assert_eq!(workload(None, None, None), "", "a bare pod");
    }

    #[cfg(feature = "k8s")]
    #[test]
    fn controller_reference_wins() {
        let refs: Vec<OwnerReference> = serde_json::from_str(
            r#"[{"apiVersion":"v1","kind":"Foo","name":"a","uid":"1"},
                {"apiVersion":"apps/v1","kind":"ReplicaSet","name":"b","uid":"2","controller":true,"blockOwnerDeletion":true}]"#,
        )
        .unwrap();
        assert_eq!(Owner::of(Some(&refs)), Some(o("ReplicaSet", "b")));
        assert_eq!(Owner::of(Some(&refs[..1].to_vec())), Some(o("Foo", "a")));
        assert_eq!(Owner::of(None), None);
    }

    #[cfg(feature = "k8s")]
    #[test]
    fn pod_entry_maps_every_container_id() {
        let pod: Pod = serde_json::from_str(include_str!("testdata/pod.json")).unwrap();
        let e = PodEntry::new(&pod, "deployment/web".into());
        let ids: Vec<(&str, &str)> = e
            .containers
            .iter()
            .map(|(id, l)| (&id[..6], l.container.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("aaaaaa", "app"),
                ("bbbbbb", "sidecar"),
                ("cccccc", "init-db")
            ]
        );
        assert_eq!(
            e.base.values(),
            ["shop", "web-5d4f8c7b9-x2x7q", "", "deployment/web"]
        );
        let mut idx = Index::default();
        idx.insert("u1".into(), e.clone());
        assert_eq!(idx.containers.len(), 3);
        idx.insert("u1".into(), e);
        assert_eq!(idx.containers.len(), 3, "re-inserting replaces");
        idx.remove("u1");
        assert!(idx.containers.is_empty() && idx.pods.is_empty());
    }

    #[test]
    fn mode_and_node_name() {
        let args = |k8s, node: Option<&str>| K8sArgs {
            k8s,
            node_name: node.map(Into::into),
        };
        let in_pod =
            |k: &str| (k == "KUBERNETES_SERVICE_HOST" || k == "NODE_NAME").then(|| "n1".to_owned());
        let outside = |_: &str| None;
        assert!(args(K8sMode::Auto, None).enabled(&in_pod));
        assert!(!args(K8sMode::Auto, None).enabled(&outside));
        assert!(args(K8sMode::On, None).enabled(&outside));
        assert!(!args(K8sMode::Off, None).enabled(&in_pod));
        assert_eq!(args(K8sMode::Auto, None).node(&in_pod), "n1");
        assert_eq!(args(K8sMode::Auto, Some("n2")).node(&in_pod), "n2");
        assert!(
            !args(K8sMode::Auto, None).node(&outside).is_empty(),
            "host name"
        );
        assert_eq!(bare_container_id("containerd://abc"), "abc");
        assert_eq!(bare_container_id("abc"), "abc");
    }
}
