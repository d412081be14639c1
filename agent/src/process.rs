//! The agent's own process metrics, named as Prometheus client libraries name them
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, ...), so
//! dashboards and alerts written for any exporter work on tanzhen too.
//!
//! They are read from `/proc/self` when someone reads the snapshot (a scrape or an OTLP
//! export), not on a timer: an idle agent does no work for them, and a scrape sees values of
//! that instant. One refresh reads `/proc/self/stat` and `/proc/self/limits` and lists
//! `/proc/self/fd` (a few tens of microseconds); `/proc/stat`'s boot time is read once.

use std::{fs, io, path::Path, sync::Arc};

use crate::snapshot::{Desc, FloatKind, FloatVec, Snapshot};

/// Why `/proc` could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Parse {
        path: &'static str,
        what: &'static str,
    },
}

/// The fields of `/proc/<pid>/stat` the process metrics use (proc(5)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// User-mode CPU time, in clock ticks (field 14).
    pub utime: u64,
    /// Kernel-mode CPU time, in clock ticks (field 15).
    pub stime: u64,
    /// Start time after boot, in clock ticks (field 22).
    pub starttime: u64,
    /// Virtual memory size in bytes (field 23).
    pub vsize: u64,
    /// Resident set size in pages (field 24).
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from after its last `)`.
pub fn parse_stat(text: &str) -> Result<Stat, ProcError> {
    const PATH: &str = "/proc/self/stat";
    let err = |what| ProcError::Parse { path: PATH, what };
    let (_, rest) = text
        .rsplit_once(')')
        .ok_or(err("no `)` after the command"))?;
    // `rest` starts at field 3 (state): field n is at index n - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize, what| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(err(what))
    };
    Ok(Stat {
        utime: num(14, "utime (field 14) missing or not a number")?,
        stime: num(15, "stime (field 15) missing or not a number")?,
        starttime: num(22, "starttime (field 22) missing or not a number")?,
        vsize: num(23, "vsize (field 23) missing or not a number")?,
        rss_pages: num(24, "rss (field 24) missing or not a number")?,
    })
}

/// The soft limit on open files from `/proc/<pid>/limits` (`None` when unlimited).
pub fn parse_max_fds(text: &str) -> Result<Option<u64>, ProcError> {
    let err = |what| ProcError::Parse {
        path: "/proc/self/limits",
        what,
    };
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or(err("no `Max open files` line"))?;
    match line.split_whitespace().next() {
        Some("unlimited") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| err("soft limit not a number")),
        None => Err(err("`Max open files` has no values")),
    }
}

/// Boot time in seconds since the epoch: the `btime` line of `/proc/stat`.
pub fn parse_btime(text: &str) -> Result<u64, ProcError> {
    let err = |what| ProcError::Parse {
        path: "/proc/stat",
        what,
    };
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .ok_or(err("no `btime` line"))?
        .trim()
        .parse()
        .map_err(|_| err("btime not a number"))
}

fn read(path: &'static str) -> Result<String, ProcError> {
    fs::read_to_string(path).map_err(|source| ProcError::Read { path, source })
}

/// Open file descriptors: the entries of `dir` (`/proc/self/fd`).
fn count_fds(dir: &Path) -> Result<u64, ProcError> {
    let entries = fs::read_dir(dir).map_err(|source| ProcError::Read {
        path: "/proc/self/fd",
        source,
    })?;
    Ok(entries.count() as u64)
}

/// The families and the constants one refresh needs.
struct ProcessMetrics {
    cpu: Arc<FloatVec>,
    rss: Arc<FloatVec>,
    vsize: Arc<FloatVec>,
    open_fds: Arc<FloatVec>,
    max_fds: Arc<FloatVec>,
    start_time: Arc<FloatVec>,
    ticks_per_sec: f64,
    page_size: f64,
    btime: Option<u64>,
}

impl ProcessMetrics {
    #[expect(
        clippy::cast_precision_loss,
        reason = "ticks, pages and fds stay far below 2^53"
    )]
    fn refresh(&self) -> Result<(), ProcError> {
        let stat = parse_stat(&read("/proc/self/stat")?)?;
        self.cpu
            .set(&[], (stat.utime + stat.stime) as f64 / self.ticks_per_sec);
        self.rss.set(&[], stat.rss_pages as f64 * self.page_size);
        self.vsize.set(&[], stat.vsize as f64);
        if let Some(btime) = self.btime {
            self.start_time.set(
                &[],
                btime as f64 + stat.starttime as f64 / self.ticks_per_sec,
            );
        }
        self.open_fds
            .set(&[], count_fds(Path::new("/proc/self/fd"))? as f64);
        let max = parse_max_fds(&read("/proc/self/limits")?)?;
        self.max_fds
            .set(&[], max.map_or(f64::INFINITY, |m| m as f64));
        Ok(())
    }
}

fn sysconf(name: libc::c_int, fallback: f64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(name) };
    #[expect(
        clippy::cast_precision_loss,
        reason = "tick rates and page sizes are small"
    )]
    if v > 0 { v as f64 } else { fallback }
}

/// Registers the `process_*` families on `snapshot` and refreshes them on every read. A
/// failed refresh (no `/proc`) keeps the last values and logs at debug level.
pub fn register(snapshot: &Snapshot) {
    let desc = |name, help| Desc {
        name,
        help,
        labels: &[],
    };
    let gauge = |name, help| snapshot.float(desc(name, help), FloatKind::Gauge);
    let metrics = ProcessMetrics {
        cpu: snapshot.float(
            desc(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
            ),
            FloatKind::Counter,
        ),
        rss: gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        ),
        vsize: gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        ),
        open_fds: gauge("process_open_fds", "Number of open file descriptors."),
        max_fds: gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
        ),
        start_time: gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        ),
        ticks_per_sec: sysconf(libc::_SC_CLK_TCK, 100.0),
        page_size: sysconf(libc::_SC_PAGESIZE, 4096.0),
        btime: read("/proc/stat")
            .and_then(|t| parse_btime(&t))
            .inspect_err(|e| log::warn!("process_start_time_seconds unavailable: {e}"))
            .ok(),
    };
    snapshot.on_read(Box::new(move || {
        if let Err(e) = metrics.refresh() {
            log::debug!("process metrics: {e}");
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        // A command with spaces and a `)` in it, as a hostile process could name itself.
        let text = "4242 (tan zhen) x) S 1 4242 4242 0 -1 4194560 1530 0 0 0 \
                    250 75 0 0 20 0 3 0 98765 123456789 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17922 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(text).unwrap(),
            Stat {
                utime: 250,
                stime: 75,
                starttime: 98765,
                vsize: 123_456_789,
                rss_pages: 2048,
            }
        );
        assert!(parse_stat("4242 (x) S 1 2").is_err(), "short line");
        assert!(parse_stat("no parenthesis").is_err());
    }

    #[test]
    fn limits_and_btime() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits).unwrap(), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_fds(unlimited).unwrap(), None);
        assert!(parse_max_fds("Max processes 1 1 processes\n").is_err());
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1763900000\nprocesses 7\n").unwrap(),
            1_763_900_000
        );
        assert!(parse_btime("cpu 1\n").is_err());
    }

    #[test]
    fn this_process_reads_plausibly() {
        let s = Snapshot::default();
        register(&s);
        let values: Vec<(&str, f64)> = s
            .families()
            .into_iter()
            .filter_map(|f| match f {
                crate::snapshot::Family::Float(f) => Some((f.desc.name, f.snapshot()[0].1)),
                _ => None,
            })
            .collect();
        let get = |n| values.iter().find(|(k, _)| *k == n).unwrap().1;
        assert!(get("process_resident_memory_bytes") > 1e5, "{values:?}");
        assert!(get("process_open_fds") >= 3.0, "{values:?}");
        assert!(
            get("process_max_fds") >= get("process_open_fds"),
            "{values:?}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = get("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        assert!(get("process_cpu_seconds") >= 0.0);
    }
}
