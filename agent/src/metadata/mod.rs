//! Process metadata for labels: which container (and Kubernetes pod) a process runs in.
//!
//! Resolution path of a tgid: `/proc/<tgid>/cgroup` -> container id and pod UID ([`cgroup`],
//! read once per process and cached until the process exits) -> the pod's namespace, name,
//! container name and owning workload ([`k8s`], from the API server's watch of this node's
//! pods). Outside Kubernetes, or while the API server is unreachable, a containerised process
//! is labelled with its short container id (`container="3f2a9c0d1e4b"`) and the other labels
//! stay empty; a process outside any container gets four empty labels.
//!
//! Cardinality: the labels name workloads, not processes; every family they go on keeps its
//! series cap (snapshot.rs).

pub mod cgroup;
pub mod k8s;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use self::{cgroup::CgroupInfo, k8s::PodIndex};

/// Names of the workload labels, in the order of [`WorkloadLabels::values`]. Per-process
/// families put them right after `comm`.
pub const LABELS: [&str; 4] = ["namespace", "pod", "container", "workload"];

/// Most processes whose cgroup is cached; past it the cache is swept (then emptied).
const CACHE_MAX: usize = 65_536;

/// How often cache entries of processes that exited unseen are dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Characters of a container id shown when its pod is unknown (as `docker ps` and `crictl`
/// show them).
const SHORT_ID: usize = 12;

/// The workload labels of a process; empty strings where unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// Kubernetes namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name in the pod, or the short container id when the pod is unknown.
    pub container: String,
    /// Owning workload as `kind/name` (`deployment/web`, `cronjob/report`, `daemonset/agent`);
    /// empty for a pod without a controller.
    pub workload: String,
}

impl WorkloadLabels {
    /// The values in the order of [`LABELS`].
    #[must_use]
    pub fn values(&self) -> [&str; 4] {
        [&self.namespace, &self.pod, &self.container, &self.workload]
    }
}

/// Labels of processes outside any container.
static NONE: LazyLock<Arc<WorkloadLabels>> = LazyLock::new(Arc::default);

/// What the cache keeps of one process.
#[derive(Debug, Default)]
struct Proc {
    /// What its cgroup says.
    cgroup: CgroupInfo,
    /// Its labels when its pod is unknown (outside Kubernetes, or the API server is away).
    fallback: Arc<WorkloadLabels>,
}

impl Proc {
    fn new(cgroup: CgroupInfo) -> Self {
        let fallback = match &cgroup.container {
            Some((_, id)) => Arc::new(WorkloadLabels {
                container: short_id(id).to_owned(),
                ..WorkloadLabels::default()
            }),
            None => NONE.clone(),
        };
        Self { cgroup, fallback }
    }
}

/// Maps tgids to their [`WorkloadLabels`]; shared by every probe.
#[derive(Debug)]
pub struct Metadata {
    /// tgid -> what its cgroup says, read once.
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    /// This node's pods, when Kubernetes metadata is on.
    pods: Option<Arc<PodIndex>>,
    /// `/proc`, or another procfs mount.
    proc_root: PathBuf,
}

impl Metadata {
    /// Metadata from `/proc`, with pod names from `pods` when Kubernetes metadata is on.
    #[must_use]
    pub fn new(pods: Option<Arc<PodIndex>>) -> Self {
        Self {
            procs: Mutex::default(),
            pods,
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The labels of process `tgid`. Reads `/proc/<tgid>/cgroup` the first time it is seen.
    #[must_use]
    pub fn labels(&self, tgid: u32) -> Arc<WorkloadLabels> {
        let p = self.proc(tgid);
        self.labels_of(&p)
    }

    /// The labels of process `p`: its pod's when known, else its fallback.
    fn labels_of(&self, p: &Proc) -> Arc<WorkloadLabels> {
        let Some(pods) = &self.pods else {
            return p.fallback.clone();
        };
        let id = p.cgroup.container.as_ref().map(|(_, id)| id.as_str());
        if let Some(l) = id.and_then(|id| pods.by_container(id)) {
            return l;
        }
        if let Some(l) = p.cgroup.pod_uid.as_deref().and_then(|u| pods.by_pod_uid(u)) {
            // The pod is known but not (yet) this container: its status lags its start.
            return Arc::new(WorkloadLabels {
                container: p.fallback.container.clone(),
                ..(*l).clone()
            });
        }
        p.fallback.clone()
    }

    /// The cached process `tgid`, its cgroup read from `/proc` on a miss. A process that is
    /// gone reads as outside any container and is not cached.
    fn proc(&self, tgid: u32) -> Arc<Proc> {
        if let Some(p) = lock(&self.procs).get(&tgid) {
            return p.clone();
        }
        let path = self.proc_root.join(format!("{tgid}/cgroup"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Arc::default();
        };
        let info = Arc::new(Proc::new(cgroup::parse_proc_cgroup(&text)));
        let mut procs = lock(&self.procs);
        if procs.len() >= CACHE_MAX {
            self.sweep_locked(&mut procs);
            if procs.len() >= CACHE_MAX {
                procs.clear();
            }
        }
        procs.insert(tgid, info.clone());
        info
    }

    /// Forgets `tgid` (it exited; its pid may be reused by another process).
    pub fn forget(&self, tgid: u32) {
        lock(&self.procs).remove(&tgid);
    }

    /// Forgets the processes that exited without an exit event (the sched probe is off, or
    /// its ring buffer was full).
    pub fn sweep(&self) {
        self.sweep_locked(&mut lock(&self.procs));
    }

    fn sweep_locked(&self, procs: &mut HashMap<u32, Arc<Proc>>) {
        procs.retain(|tgid, _| self.proc_root.join(tgid.to_string()).exists());
    }

    /// Processes cached.
    #[cfg(test)]
    fn cached(&self) -> usize {
        lock(&self.procs).len()
    }
}

fn short_id(id: &str) -> &str {
    id.get(..SHORT_ID).unwrap_or(id)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::cgroup::Runtime;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn outside_kubernetes_a_container_is_named_by_its_short_id() {
        let m = Metadata::new(None);
        let p = Proc::new(CgroupInfo {
            container: Some((Runtime::Docker, ID.to_owned())),
            pod_uid: None,
        });
        assert_eq!(
            m.labels_of(&p).values(),
            ["", "", "0123456789ab", ""],
            "short id only"
        );
        assert_eq!(
            m.labels_of(&Proc::new(CgroupInfo::default())).values(),
            ["", "", "", ""]
        );
    }

    /// Every per-process family (one with `comm`) carries the workload labels right after
    /// `comm`, except the scheduler's run-queue and context-switch families: the kernel keys
    /// those by comm alone (sched.rs), with no tgid to resolve.
    #[test]
    fn per_process_families_carry_the_workload_labels() {
        use crate::{
            probe::{sched::SchedMetrics, syscalls::SyscallsMetrics, tcp::TcpMetrics},
            snapshot::{Family, Snapshot},
        };
        const BY_COMM_ONLY: [&str; 2] = [
            "tanzhen_sched_runqueue_latency_seconds",
            "tanzhen_sched_context_switches",
        ];
        let s = Snapshot::default();
        let _ = (
            TcpMetrics::register(&s),
            SyscallsMetrics::register(&s),
            SchedMetrics::register(&s),
        );
        let mut checked = 0;
        for f in s.families() {
            let desc = match &f {
                Family::Counter(c) => c.desc,
                Family::Gauge(g) => g.desc,
                Family::Histogram(h) => h.desc,
                Family::Float(f) => f.desc,
            };
            if desc.labels.first() != Some(&"comm") || BY_COMM_ONLY.contains(&desc.name) {
                continue;
            }
            assert_eq!(desc.labels[1..5], LABELS, "{}", desc.name);
            checked += 1;
        }
        assert_eq!(checked, 8, "tcp 3, syscalls 3, process execs/exits 2");
    }

    #[test]
    fn own_process_is_cached_until_forgotten_and_gone_pids_are_swept() {
        let m = Metadata::new(None);
        let me = std::process::id();
        let _ = m.labels(me);
        assert_eq!(m.cached(), 1);
        m.forget(me);
        assert_eq!(m.cached(), 0);
        let _ = m.labels(me);
        // A pid above the kernel's maximum (2^22) never exists: not cached at all.
        let _ = m.labels(u32::MAX - 1);
        assert_eq!(m.cached(), 1);
        lock(&m.procs).insert(u32::MAX - 1, Arc::default());
        m.sweep();
        assert_eq!(m.cached(), 1, "the exited one is swept, we stay");
    }
}
