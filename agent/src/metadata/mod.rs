//! Process metadata for labels: which container (and Kubernetes pod) a process runs in.

pub mod cgroup;
pub mod cgroup_ids;
