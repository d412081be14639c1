//! Facts about the running kernel: release and arch, tracefs (found or mounted), tracepoint
//! `format` files (parsed for field offsets), BTF and BPF feature probes.

use std::{
    collections::HashMap,
    ffi::CStr,
    io,
    path::{Path, PathBuf},
};

/// Errors reading kernel facts.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0} \
         (mount it with `mount -t tracefs nodev /sys/kernel/tracing`, or run as root)"
    )]
    NoTracefs(io::Error),
    #[error("tracepoint {category}:{name} is missing from this kernel ({path}: {source})")]
    NoTracepoint {
        category: String,
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot parse {path}: {reason}")]
    BadFormat { path: PathBuf, reason: String },
}

/// `uname(2)`: kernel release and machine.
#[derive(Clone, Debug)]
pub struct Uname {
    pub release: String,
    pub machine: String,
}

/// Reads `uname(2)`.
#[must_use]
pub fn uname() -> Uname {
    // SAFETY: utsname is plain old data; uname fills it with NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&raw mut u) } != 0 {
        return Uname {
            release: "unknown".into(),
            machine: std::env::consts::ARCH.into(),
        };
    }
    let s = |f: &[libc::c_char]| {
        // SAFETY: the kernel NUL-terminates every field.
        unsafe { CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    Uname {
        release: s(&u.release),
        machine: s(&u.machine),
    }
}

/// Parses `major.minor` from a release string such as `6.1.0-56-amd64` or `4.19.90-52.22.v2207.ky10`.
#[must_use]
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Where tracefs is, and whether tanzhen mounted it.
#[derive(Clone, Debug)]
pub struct Tracefs {
    pub path: PathBuf,
    pub mounted_now: bool,
}

/// Finds tracefs from /proc/mounts (tracefs, or debugfs's `tracing` directory on old
/// kernels), mounting it at /sys/kernel/tracing when it is nowhere.
pub fn tracefs() -> Result<Tracefs, KernelError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if let Some(p) = find_tracefs(&mounts) {
        return Ok(Tracefs {
            path: p,
            mounted_now: false,
        });
    }
    let target = Path::new("/sys/kernel/tracing");
    mount("nodev", target, "tracefs").map_err(KernelError::NoTracefs)?;
    Ok(Tracefs {
        path: target.to_owned(),
        mounted_now: true,
    })
}

/// The tracefs directory named by a /proc/mounts text, if any.
#[must_use]
pub fn find_tracefs(mounts: &str) -> Option<PathBuf> {
    let mut debugfs = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(dir), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let dir = unescape_mount_path(dir);
        match fstype {
            "tracefs" => return Some(PathBuf::from(dir)),
            "debugfs" if debugfs.is_none() => debugfs = Some(PathBuf::from(dir).join("tracing")),
            _ => {}
        }
    }
    debugfs.filter(|p| p.join("events").is_dir())
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount(src: &str, target: &Path, fstype: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &[u8]| {
        std::ffi::CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (src, target, fstype) = (
        c(src.as_bytes())?,
        c(target.as_os_str().as_bytes())?,
        c(fstype.as_bytes())?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// Fields of a tracepoint `format` file, by name.
#[derive(Clone, Debug, Default)]
pub struct Format {
    pub fields: HashMap<String, Field>,
}

impl Format {
    /// Offset of `name` if it exists with `size` bytes (sizes guard against a changed type).
    #[must_use]
    pub fn offset(&self, name: &str, size: u32) -> Option<u32> {
        self.fields
            .get(name)
            .filter(|f| f.size == size)
            .map(|f| f.offset)
    }
}

/// Reads and parses `events/<category>/<name>/format` under tracefs.
pub fn tracepoint_format(
    tracefs: &Path,
    category: &str,
    name: &str,
) -> Result<Format, KernelError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| KernelError::NoTracepoint {
        category: category.into(),
        name: name.into(),
        path: path.clone(),
        source,
    })?;
    parse_format(&text).map_err(|reason| KernelError::BadFormat { path, reason })
}

/// Parses the text of a tracepoint `format` file. Lines that are not field descriptions are
/// skipped; a field line with missing or malformed parts is an error.
pub fn parse_format(text: &str) -> Result<Format, String> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let (mut offset, mut size, mut signed) = (None, None, None);
        for (i, part) in rest
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("signed:") {
                signed = Some(v == "1");
            }
        }
        let decl = decl.ok_or_else(|| format!("field line without a declaration: `{line}`"))?;
        let name = field_name(decl).ok_or_else(|| format!("no field name in `{decl}`"))?;
        let (Some(offset), Some(size)) = (offset, size) else {
            return Err(format!(
                "field `{name}` lacks a numeric offset or size: `{line}`"
            ));
        };
        fields.insert(
            name.to_owned(),
            Field {
                offset,
                size,
                signed: signed.unwrap_or(false),
            },
        );
    }
    if fields.is_empty() {
        return Err("no fields found".into());
    }
    Ok(Format { fields })
}

/// The field name of a C declaration such as `const void * skaddr` or `__u8 saddr[4]`.
fn field_name(decl: &str) -> Option<&str> {
    let last = decl
        .rsplit(|c: char| c.is_whitespace() || c == '*')
        .find(|s| !s.is_empty())?;
    let name = last.split('[').next()?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some(name)
}

/// Whether the kernel exposes its BTF (`/sys/kernel/btf/vmlinux`).
#[must_use]
pub fn has_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// Whether the kernel can create a BPF ring buffer map (tried, not guessed from the version).
pub fn has_ringbuf() -> Result<bool, String> {
    aya::sys::is_map_supported(aya::maps::MapType::RingBuf).map_err(|e| e.to_string())
}

/// The memory page size in bytes (the smallest BPF ring buffer); 4096 if sysconf fails.
#[must_use]
pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(v).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Lifts RLIMIT_MEMLOCK (to infinity, or at least to the hard limit): kernels before 5.11
/// charge BPF maps against it.
pub fn raise_memlock_rlimit() {
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const inf) == 0 {
            return;
        }
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut cur) == 0 && cur.rlim_cur < cur.rlim_max {
            cur.rlim_cur = cur.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const cur);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_SOCK_SET_STATE_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s\", REC->family, REC->protocol
";

    #[test]
    fn parses_inet_sock_set_state() {
        let f = parse_format(INET_SOCK_SET_STATE_6_18).unwrap();
        assert_eq!(f.offset("skaddr", 8), Some(8));
        assert_eq!(f.offset("oldstate", 4), Some(16));
        assert_eq!(f.offset("saddr", 4), Some(32));
        assert_eq!(f.offset("daddr_v6", 16), Some(56));
        assert!(f.fields["oldstate"].signed);
        assert_eq!(
            f.offset("skaddr", 4),
            None,
            "a size mismatch is treated as absent"
        );
        assert_eq!(f.offset("nope", 4), None);
    }

    #[test]
    fn rejects_broken_formats() {
        assert!(parse_format("").is_err());
        assert!(
            parse_format("field:int x;\tsize:4;")
                .unwrap_err()
                .contains("offset")
        );
        assert!(parse_format("field:;offset:1;size:2;").is_err());
        assert!(parse_format("field:int x;\toffset:abc;\tsize:4;").is_err());
    }

    #[test]
    fn field_names() {
        assert_eq!(field_name("const void * skaddr"), Some("skaddr"));
        assert_eq!(field_name("const void *skaddr"), Some("skaddr"));
        assert_eq!(field_name("__u8 saddr_v6[16]"), Some("saddr_v6"));
        assert_eq!(field_name("char comm[TASK_COMM_LEN]"), Some("comm"));
        assert_eq!(field_name("int"), Some("int"));
        assert_eq!(field_name("*"), None);
    }

    #[test]
    fn finds_tracefs_or_debugfs() {
        let m = "sysfs /sys sysfs rw 0 0\ntracefs /sys/kernel/tracing tracefs rw 0 0\n";
        assert_eq!(find_tracefs(m), Some(PathBuf::from("/sys/kernel/tracing")));
        assert_eq!(find_tracefs("sysfs /sys sysfs rw 0 0\n"), None);
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/a\\"), "/a\\");
    }

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(
            parse_release("4.19.90-52.22.v2207.ky10.aarch64"),
            Some((4, 19))
        );
        assert_eq!(parse_release("garbage"), None);
    }
}
