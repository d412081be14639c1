//! cgroup v2 ids (what `bpf_get_current_cgroup_id()` returns) back to cgroup paths, and from
//! there to container ids, for metrics the kernel aggregates per cgroup.
//!
//! A cgroup v2 id is the inode number of the cgroup's directory in the unified hierarchy (on
//! 4.19-5.4 kernels the id also carries a generation in its upper 32 bits, so the lower 32 bits
//! are compared too). Unknown ids trigger a rescan of the hierarchy, at most once per
//! [`RESCAN_EVERY`]; ids of removed cgroups are forgotten at each rescan.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::cgroup::parse_path;

/// Least time between two scans of the hierarchy.
pub const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Bound on the cgroups remembered (a node has hundreds to a few thousand).
const MAX_CGROUPS: usize = 65_536;

/// cgroup id -> container id ("" for cgroups outside containers).
#[derive(Debug)]
pub struct CgroupIds {
    root: Option<PathBuf>,
    ids: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupIds {
    /// A resolver over the unified hierarchy mounted at /sys/fs/cgroup (cgroup v2) or
    /// /sys/fs/cgroup/unified (hybrid); with neither, every id resolves to "".
    #[must_use]
    pub fn new() -> Self {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists());
        Self::with_root(root)
    }

    /// A resolver over the hierarchy at `root`.
    #[must_use]
    pub fn with_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            ids: HashMap::new(),
            last_scan: None,
        }
    }

    /// The container id of cgroup `id`, or "" (not in a container, or unknown).
    pub fn container_id(&mut self, id: u64) -> &str {
        if id != 0
            && !self.ids.contains_key(&id)
            && self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY)
        {
            self.rescan();
        }
        let found = self
            .ids
            .get(&id)
            .or_else(|| self.ids.get(&(id & 0xffff_ffff)));
        found.map_or("", String::as_str)
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        self.ids.clear();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if self.ids.len() >= MAX_CGROUPS {
                log::warn!("cgroup ids: more than {MAX_CGROUPS} cgroups; the rest stay unnamed");
                break;
            }
            let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
            let container = parse_path(&format!("/{}", rel.display()))
                .container
                .map(|(_, id)| id)
                .unwrap_or_default();
            self.ids.insert(meta.ino(), container);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

impl Default for CgroupIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_to_containers_of_the_tree() {
        let root = std::env::temp_dir().join(format!("tanzhen-cgids-{}", std::process::id()));
        let id = "ab".repeat(32);
        let scope = root.join(format!("system.slice/docker-{id}.scope"));
        std::fs::create_dir_all(&scope).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let mut ids = CgroupIds::with_root(Some(root.clone()));
        assert_eq!(ids.container_id(ino(&scope)), id);
        assert_eq!(ids.container_id(ino(&root.join("system.slice"))), "");
        // An id the tree does not have: "", and no rescan before RESCAN_EVERY.
        assert_eq!(ids.container_id(u64::MAX), "");
        let late = root.join(format!("docker-{}.scope", "cd".repeat(32)));
        std::fs::create_dir_all(&late).unwrap();
        assert_eq!(ids.container_id(ino(&late)), "", "rescans are rate-limited");
        ids.last_scan = None;
        assert_eq!(ids.container_id(ino(&late)), "cd".repeat(32));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(CgroupIds::with_root(None).container_id(7), "");
    }
}
