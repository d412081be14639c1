//! Container and pod identity from `/proc/<pid>/cgroup`, for cgroup v1 and v2 and the runtimes
//! people run: docker, containerd (CRI `cri-containerd-<id>.scope` and plain paths), cri-o
//! (`crio-<id>.scope`), podman (`libpod-<id>.scope`), with kubelet's systemd driver
//! (`kubepods-burstable-pod<uid>.slice`) or cgroupfs driver (`/kubepods/burstable/pod<uid>/<id>`).
//!
//! The text comes from other processes' /proc files: the parser treats it as hostile input and
//! never panics.

/// Container runtimes recognised from cgroup paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
}

impl Runtime {
    /// The runtime's usual name (as in a CRI container id URI: `containerd://<id>`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Podman => "podman",
        }
    }
}

/// What a cgroup path says about a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Runtime and 64-hex container id, when the process runs in a container.
    pub container: Option<(Runtime, String)>,
    /// Kubernetes pod UID (with dashes), when the process runs in a pod's cgroup.
    pub pod_uid: Option<String>,
}

/// Parses the text of `/proc/<pid>/cgroup`. The cgroup v2 line (`0::`) wins when it names a
/// container; otherwise the first v1 line that does.
#[must_use]
pub fn parse_proc_cgroup(text: &str) -> CgroupInfo {
    let mut best = CgroupInfo::default();
    for line in text.lines() {
        // hierarchy-id:controllers:path; the path itself may contain ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(_ctl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let info = parse_path(path);
        if info.container.is_some() {
            return info;
        }
        if best.pod_uid.is_none() {
            best = info;
        }
    }
    best
}

/// Parses one cgroup path.
#[must_use]
pub fn parse_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    let mut parent = "";
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if let Some(uid) = pod_uid(seg) {
            info.pod_uid = Some(uid);
        } else if let Some((runtime, id)) = container(seg) {
            let runtime = if parent == "docker" {
                Runtime::Docker
            } else {
                runtime
            };
            info.container = Some((runtime, id));
        }
        parent = seg;
    }
    info
}

/// `kubepods-burstable-pod<uid_with_underscores>.slice` or `pod<uid>`.
fn pod_uid(seg: &str) -> Option<String> {
    let raw = if let Some(slice) = seg.strip_suffix(".slice") {
        &slice[slice.rfind("-pod")? + 4..]
    } else {
        seg.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

fn container(seg: &str) -> Option<(Runtime, String)> {
    let scoped = |prefix: &str| {
        seg.strip_prefix(prefix)?
            .strip_suffix(".scope")
            .filter(|id| is_id(id))
    };
    if let Some(id) = scoped("docker-") {
        return Some((Runtime::Docker, id.to_owned()));
    }
    if let Some(id) = scoped("cri-containerd-") {
        return Some((Runtime::Containerd, id.to_owned()));
    }
    if let Some(id) = scoped("crio-") {
        return Some((Runtime::CriO, id.to_owned()));
    }
    if let Some(id) = scoped("libpod-") {
        return Some((Runtime::Podman, id.to_owned()));
    }
    // Bare ids: kubelet's cgroupfs driver `/kubepods/<qos>/pod<uid>/<id>` (containerd or docker:
    // the path does not say; containerd is what clusters run now) and containerd namespaces
    // `/<ns>/<id>`. `/docker/<id>` is recognised by the caller from the parent segment.
    is_id(seg).then(|| (Runtime::Containerd, seg.to_owned()))
}

/// A 64-character lowercase hex container id.
fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `8-4-4-4-12` hex with dashes.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of testdata/cgroups.txt parses to what its header says.
    #[test]
    fn committed_samples() {
        let text = include_str!("testdata/cgroups.txt");
        let mut cases = 0;
        for block in text.split("\n## ").skip(1) {
            let (header, body) = block.split_once('\n').unwrap();
            let f: Vec<&str> = header.split(" | ").map(str::trim).collect();
            let (name, runtime, id, pod) = (f[0], f[1], f[2], f[3]);
            let got = parse_proc_cgroup(body);
            let want_container = (id != "-").then(|| (runtime.to_owned(), id.to_owned()));
            assert_eq!(
                got.container
                    .as_ref()
                    .map(|(r, id)| (r.name().to_owned(), id.clone())),
                want_container,
                "{name}"
            );
            assert_eq!(
                got.pod_uid.as_deref(),
                (pod != "-").then_some(pod),
                "{name}"
            );
            cases += 1;
        }
        assert!(cases >= 12, "{cases} cases");
    }

    #[test]
    fn hostile_input_never_panics() {
        for s in [
            "",
            ":",
            "::",
            "0::",
            "0::/",
            "x:y:z:w",
            "0::/kubepods.slice/-pod.slice",
            "0::/pod/",
            "0::/kubepods-pod\u{00e9}\u{00e9}.slice",
            "\u{0}:\u{0}:\u{0}",
            "0::/docker-.scope",
            "0::////",
            "0::/a.slice/-pod-pod-pod.slice",
        ] {
            let _ = parse_proc_cgroup(s);
        }
        assert_eq!(parse_proc_cgroup("garbage"), CgroupInfo::default());
    }

    #[test]
    fn own_process_parses() {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let _ = parse_proc_cgroup(&text);
    }
}
