//! Process metadata for labels: which container (and Kubernetes pod) a process runs in.
//!
//! Resolution path of a tgid: `/proc/<tgid>/cgroup` -> container id and pod UID ([`cgroup`],
//! read once per process and cached until the process exits) -> the pod's namespace, name,
//! container name and owning workload ([`k8s`], from the API server's watch of this node's
//! pods). Outside Kubernetes, or while the API server is unreachable, a containerised process
//! is labelled with its short container id (`container="3f2a9c0d1e4b"`) and the other labels
//! stay empty; a process outside any container gets four empty labels.
//!
//! Short-lived processes can be gone before their event is read. Events that carry the kernel's
//! cgroup (v2) id resolve those too: ids seen with a live process are remembered, and an unknown
//! id is looked up once by walking the cgroup2 mounts for the directory whose inode is that id.
//! On cgroup v1 hosts (4.19-era) every process sits in the v2 root, so only `/proc` helps there.
//!
//! Cardinality: the labels name workloads, not processes; every family they go on keeps its
//! series cap (snapshot.rs).

pub mod cgroup;
pub mod k8s;

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex, PoisonError},
    time::Duration,
};

use self::{cgroup::CgroupInfo, k8s::PodIndex};

/// Names of the workload labels, in the order of [`WorkloadLabels::values`]. Per-process
/// families put them right after `comm`.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "families spell them out; the test holds them to this list"
    )
)]
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

/// Most directories one cgroup-id walk visits.
const WALK_MAX: usize = 100_000;

/// What the cache keeps of one process.
#[derive(Debug, Default)]
struct Proc {
    /// The cgroup v2 id it was seen with (0: unknown); another id means another process.
    cgroup_id: u64,
    /// What its cgroup says.
    cgroup: CgroupInfo,
    /// Its labels when its pod is unknown (outside Kubernetes, or the API server is away).
    fallback: Arc<WorkloadLabels>,
}

impl Proc {
    fn new(cgroup_id: u64, cgroup: CgroupInfo) -> Self {
        let fallback = match &cgroup.container {
            Some((_, id)) => Arc::new(WorkloadLabels {
                container: short_id(id).to_owned(),
                ..WorkloadLabels::default()
            }),
            None => NONE.clone(),
        };
        Self {
            cgroup_id,
            cgroup,
            fallback,
        }
    }
}

/// What cgroup v2 ids say.
#[derive(Debug, Default)]
struct CgroupIds {
    /// id -> what that cgroup's path says.
    known: HashMap<u64, Arc<Proc>>,
    /// Ids a walk of the cgroup2 mounts did not find.
    missing: HashSet<u64>,
}

/// Maps tgids to their [`WorkloadLabels`]; shared by every probe.
#[derive(Debug)]
pub struct Metadata {
    /// tgid -> what its cgroup says, read once.
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    /// cgroup v2 ids seen or looked up.
    cgroups: Mutex<CgroupIds>,
    /// Mount points of cgroup2 filesystems, walked for unknown ids.
    cgroup2: Vec<PathBuf>,
    /// This node's pods, when Kubernetes metadata is on.
    pods: Option<Arc<PodIndex>>,
    /// `/proc`, or another procfs mount.
    proc_root: PathBuf,
}

impl Metadata {
    /// Metadata from `/proc`, with pod names from `pods` when Kubernetes metadata is on.
    #[must_use]
    pub fn new(pods: Option<Arc<PodIndex>>) -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        Self {
            procs: Mutex::default(),
            cgroups: Mutex::default(),
            cgroup2: cgroup2_mounts(&mounts),
            pods,
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The labels of process `tgid`, whose event carried cgroup v2 id `cgroup_id` (0 when the
    /// event has none). Reads `/proc/<tgid>/cgroup` the first time the process is seen.
    #[must_use]
    pub fn labels(&self, tgid: u32, cgroup_id: u64) -> Arc<WorkloadLabels> {
        let p = self.proc(tgid, cgroup_id);
        self.labels_of(&p)
    }

    /// The labels of the processes in cgroup v2 id `cgroup_id`, for what the kernel aggregates
    /// per cgroup rather than per process (run-queue latency); empty outside containers and on
    /// cgroup v1 hosts (every task has the v2 root's id there).
    #[must_use]
    pub fn cgroup_labels(&self, cgroup_id: u64) -> Arc<WorkloadLabels> {
        self.labels_of(&self.by_cgroup_id(cgroup_id))
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
    /// gone is resolved from `cgroup_id` (or reads as outside any container) and not cached.
    fn proc(&self, tgid: u32, cgroup_id: u64) -> Arc<Proc> {
        if let Some(p) = lock(&self.procs).get(&tgid)
            && (cgroup_id == 0 || p.cgroup_id == 0 || p.cgroup_id == cgroup_id)
        {
            return p.clone();
        }
        let path = self.proc_root.join(format!("{tgid}/cgroup"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            return self.by_cgroup_id(cgroup_id);
        };
        let info = Arc::new(Proc::new(cgroup_id, cgroup::parse_proc_cgroup(&text)));
        // Remember the id when the v2 path alone says what the process's cgroups say.
        if cgroup_id != 0
            && let Some(v2) = v2_path(&text)
            && v2 != "/"
            && cgroup::parse_path(v2) == info.cgroup
        {
            let mut c = lock(&self.cgroups);
            if c.known.len() >= CACHE_MAX {
                c.known.clear();
            }
            c.known.insert(cgroup_id, info.clone());
        }
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

    /// What cgroup `id` says, for a process already gone: remembered, else found by walking
    /// the cgroup2 mounts (once per id).
    fn by_cgroup_id(&self, id: u64) -> Arc<Proc> {
        if id == 0 {
            return Arc::default();
        }
        {
            let c = lock(&self.cgroups);
            if let Some(p) = c.known.get(&id) {
                return p.clone();
            }
            if c.missing.contains(&id) {
                return Arc::default();
            }
        }
        let found = self
            .cgroup2
            .iter()
            .find_map(|root| find_cgroup(root, id).map(|p| (root, p)));
        let mut c = lock(&self.cgroups);
        let Some((root, dir)) = found else {
            if c.missing.len() >= CACHE_MAX {
                c.missing.clear();
            }
            c.missing.insert(id);
            return Arc::default();
        };
        let rel = dir.strip_prefix(root).unwrap_or(&dir);
        let info = Arc::new(Proc::new(
            id,
            cgroup::parse_path(&format!("/{}", rel.display())),
        ));
        if c.known.len() >= CACHE_MAX {
            c.known.clear();
        }
        c.known.insert(id, info.clone());
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
        // Ids not found may name cgroups made since.
        lock(&self.cgroups).missing.clear();
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

/// The cgroup v2 (`0::`) path of a `/proc/<pid>/cgroup` text.
fn v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Mount points of the cgroup2 filesystems in a `/proc/self/mounts` text.
fn cgroup2_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// The directory under `root` whose inode is cgroup id `id` (cgroup ids are kernfs inode
/// numbers; before 5.5 the id's high 32 bits hold a generation, so the low 32 bits count).
fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let ino = e.ino();
            if ino == id || (id >> 32 != 0 && ino == id & 0xffff_ffff) {
                return Some(e.path());
            }
            seen += 1;
            if seen >= WALK_MAX {
                return None;
            }
            stack.push(e.path());
        }
    }
    None
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
        let p = Proc::new(
            0,
            CgroupInfo {
                container: Some((Runtime::Docker, ID.to_owned())),
                pod_uid: None,
            },
        );
        assert_eq!(
            m.labels_of(&p).values(),
            ["", "", "0123456789ab", ""],
            "short id only"
        );
        assert_eq!(
            m.labels_of(&Proc::new(0, CgroupInfo::default())).values(),
            ["", "", "", ""]
        );
    }

    #[test]
    fn cgroup_ids_are_found_by_inode_with_or_without_a_generation() {
        use std::os::unix::fs::MetadataExt as _;
        let root = std::env::temp_dir().join(format!("tanzhen-cg-{}", std::process::id()));
        let leaf = root.join("kubepods.slice/cri-containerd-x.scope");
        std::fs::create_dir_all(&leaf).unwrap();
        let ino = std::fs::metadata(&leaf).unwrap().ino();
        assert_eq!(find_cgroup(&root, ino).as_deref(), Some(leaf.as_path()));
        // 4.19: generation in the high 32 bits, the inode in the low ones.
        let gen_id = (7u64 << 32) | (ino & 0xffff_ffff);
        assert_eq!(find_cgroup(&root, gen_id).as_deref(), Some(leaf.as_path()));
        assert_eq!(find_cgroup(&root, u64::MAX), None);
        std::fs::remove_dir_all(&root).unwrap();
        let mounts = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(
            cgroup2_mounts(mounts),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(v2_path("1:cpu:/a\n0::/b/c\n"), Some("/b/c"));
    }

    /// Every per-process family (one with `comm`) carries the workload labels right after
    /// `comm`, except the scheduler's context-switch family: the kernel keys it by comm alone
    /// (sched.rs), with no tgid or cgroup to resolve.
    #[test]
    fn per_process_families_carry_the_workload_labels() {
        use crate::{
            probe::{sched::SchedMetrics, syscalls::SyscallsMetrics, tcp::TcpMetrics},
            snapshot::{Family, Snapshot},
        };
        const BY_COMM_ONLY: [&str; 1] = ["tanzhen_sched_context_switches"];
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
        assert_eq!(
            checked, 9,
            "tcp 3, syscalls 3, process execs/exits 2, run-queue latency"
        );
    }

    #[test]
    fn own_process_is_cached_until_forgotten_and_gone_pids_are_swept() {
        let m = Metadata::new(None);
        let me = std::process::id();
        let _ = m.labels(me, 0);
        assert_eq!(m.cached(), 1);
        m.forget(me);
        assert_eq!(m.cached(), 0);
        let _ = m.labels(me, 0);
        // A pid above the kernel's maximum (2^22) never exists: not cached at all.
        let _ = m.labels(u32::MAX - 1, 0);
        assert_eq!(m.cached(), 1);
        lock(&m.procs).insert(u32::MAX - 1, Arc::default());
        m.sweep();
        assert_eq!(m.cached(), 1, "the exited one is swept, we stay");
    }
}
