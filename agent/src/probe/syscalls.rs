//! Syscalls probe, userspace side: attaches the `sys_enter`/`sys_exit` raw tracepoint
//! programs, and every `--interval` drains the kernel's aggregates into the
//! snapshot's long-lived counters and histograms.
//!
//! Draining is exact: the programs write one of two count-map generations; userspace flips the
//! generation in [`SYSCALL_CONFIG`], waits for programs already running to finish, then reads
//! and deletes every key of the idle generation. Deleted keys are how exited processes leave no
//! kernel state behind. Latency rows only grow in the kernel; userspace adds their deltas.
//!
//! Metrics: `tanzhen_syscalls_total{comm,syscall}`, `tanzhen_syscall_errors_total{comm,syscall}`,
//! `tanzhen_syscall_duration_seconds{syscall}` and `tanzhen_file_opens_total{comm,result}`;
//! drops feed `tanzhen_events_lost_total{probe="syscalls",reason}`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
    sync::Arc,
    time::Duration,
};

use agent_common::syscalls::{
    NO_SYSCALL, SYSCALL_CONFIG, SYSCALL_COUNTS_0, SYSCALL_COUNTS_1, SYSCALL_HIST,
    SYSCALL_HIST_ROWS, SYSCALL_HIST_SLOTS, SYSCALL_HIST_SUM, SYSCALL_LOST, SYSCALL_LOST_MAP_FULL,
    SYSCALL_LOST_REASONS, SYSCALL_NR_MAX, SYSCALL_RUNS_0, SYSCALL_RUNS_1, SyscallConfig,
    SyscallHistRow, SyscallKey, SyscallRun, SyscallStat,
};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::RawTracePoint,
};
use regex::Regex;
use tokio::sync::watch;

use super::syscall_names;
use crate::{
    kernel,
    metadata::{Metadata, WorkloadLabels},
    probe::{ProbeError, program, take, tcp::LossCounters},
    snapshot::{CounterVec, Desc, HistogramVec, LOG2_NS_BOUNDS, Snapshot},
};

const PROBE: &str = "syscalls";
const ENTER: &str = "syscalls_sys_enter";
const EXIT: &str = "syscalls_sys_exit";
const SWITCH: &str = "syscalls_sched_switch";
const PROCESS_EXIT: &str = "syscalls_process_exit";
/// The kernel programs of this probe (raw tracepoints).
pub const PROGRAMS: &[&str] = &[ENTER, EXIT, SWITCH, PROCESS_EXIT];

/// How long to wait after flipping the generation before reading the idle one: programs that
/// read the old generation number are then long finished (they run for well under a µs, with
/// preemption or migration disabled).
const FLIP_GRACE: Duration = Duration::from_millis(20);

/// Label values of the drop reasons, indexed like `SYSCALL_LOST_*`.
const LOST_REASONS: [&str; SYSCALL_LOST_REASONS as usize] = {
    let mut r = [""; SYSCALL_LOST_REASONS as usize];
    r[SYSCALL_LOST_MAP_FULL as usize] = "map_full";
    r
};

/// A syscall table: (number, name) sorted by number.
pub type Table = &'static [(u32, &'static str)];

/// The syscall table of the architecture this binary was built for (the kernel it runs on has
/// the same one). 32-bit (compat) processes use other numbers, which the tracepoint does not
/// tell apart: they are named by this table too.
#[must_use]
pub fn native_table() -> Table {
    if cfg!(target_arch = "aarch64") {
        syscall_names::AARCH64
    } else {
        syscall_names::X86_64
    }
}

fn lookup(table: Table, n: u32) -> Option<&'static str> {
    table
        .binary_search_by_key(&n, |&(k, _)| k)
        .ok()
        .map(|i| table[i].1)
}

/// The name of syscall `nr` in `table`, or `sys_<nr>` when the table does not know it.
#[must_use]
pub fn syscall_name(table: Table, nr: u32) -> Cow<'static, str> {
    lookup(table, nr).map_or_else(|| Cow::Owned(format!("sys_{nr}")), Cow::Borrowed)
}

/// The number of syscall `name` in `table`.
#[must_use]
pub fn syscall_nr(table: Table, name: &str) -> Option<u32> {
    table.iter().find(|&&(_, n)| n == name).map(|&(k, _)| k)
}

/// `tanzhen_file_opens_total`'s `result`: `ok`, or the errno name (`ENOENT`), or `E<n>`.
#[must_use]
pub fn open_result(errno: u32) -> Cow<'static, str> {
    if errno == 0 {
        return Cow::Borrowed("ok");
    }
    lookup(syscall_names::ERRNO, errno)
        .map_or_else(|| Cow::Owned(format!("E{errno}")), Cow::Borrowed)
}

/// `open`, `openat`, `openat2` numbers of `table` for [`SyscallConfig::open_nrs`].
#[must_use]
pub fn open_nrs(table: Table) -> [u32; 3] {
    ["open", "openat", "openat2"].map(|n| syscall_nr(table, n).unwrap_or(NO_SYSCALL))
}

/// User options of the probe.
#[derive(Clone, Debug)]
pub struct SyscallsOptions {
    /// Drain period.
    pub interval: Duration,
    /// Only processes whose comm matches are reported (per-process counters only: the latency
    /// histogram is per syscall).
    pub comm_filter: Option<Regex>,
}

/// The probe's metric families.
#[derive(Debug)]
pub struct SyscallsMetrics {
    pub calls: Arc<CounterVec>,
    pub errors: Arc<CounterVec>,
    pub duration: Arc<HistogramVec>,
    pub opens: Arc<CounterVec>,
}

impl SyscallsMetrics {
    /// Registers the families in `snapshot`.
    pub fn register(snapshot: &Snapshot) -> Self {
        Self {
            calls: snapshot.counter(Desc {
                name: "tanzhen_syscalls",
                help: "System calls entered, by process name and syscall.",
                labels: &["comm", "namespace", "pod", "container", "workload", "syscall"],
            }),
            errors: snapshot.counter(Desc {
                name: "tanzhen_syscall_errors",
                help: "System calls that returned an error (-4095..-1), by process name and syscall.",
                labels: &["comm", "namespace", "pod", "container", "workload", "syscall"],
            }),
            duration: snapshot.histogram(
                Desc {
                    name: "tanzhen_syscall_duration_seconds",
                    help: "Time from syscall entry to exit (log2 buckets from the kernel), by syscall.",
                    labels: &["syscall"],
                },
                &LOG2_NS_BOUNDS,
            ),
            opens: snapshot.counter(Desc {
                name: "tanzhen_file_opens",
                help: "open/openat/openat2 calls by process name and result (ok or the errno name).",
                labels: &["comm", "namespace", "pod", "container", "workload", "result"],
            }),
        }
    }
}

/// Sums of one drained key over every CPU, and the thread name the kernel recorded with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: u64,
    pub errors: u64,
    pub comm: [u8; agent_common::COMM_LEN],
}

impl Totals {
    /// Adds one CPU's counts; a recorded name (NUL-padded, empty when none) replaces the one
    /// held so far.
    fn add(&mut self, calls: u64, errors: u64, comm: &[u8; agent_common::COMM_LEN]) {
        self.calls += calls;
        self.errors += errors;
        if comm[0] != 0 {
            self.comm = *comm;
        }
    }
}

/// Folds drained (tgid, nr, errno) totals into the metrics. `comm_of` names a process from its
/// tgid and the kernel-recorded thread name and gives its workload labels (`None` when the
/// comm filter drops it). Returns the syscall numbers seen.
pub fn record_counts(
    metrics: &SyscallsMetrics,
    table: Table,
    open: [u32; 3],
    drained: &BTreeMap<SyscallKey, Totals>,
    mut comm_of: impl FnMut(u32, &[u8]) -> Option<(String, Arc<WorkloadLabels>)>,
) -> BTreeSet<u32> {
    let mut nrs = BTreeSet::new();
    let mut comms: HashMap<u32, Option<(String, Arc<WorkloadLabels>)>> = HashMap::new();
    for (key, t) in drained {
        nrs.insert(key.nr);
        let who = comms
            .entry(key.tgid)
            .or_insert_with(|| comm_of(key.tgid, &t.comm));
        let Some((comm, w)) = who.as_ref() else {
            continue;
        };
        let [ns, pod, container, workload] = w.values();
        let name = syscall_name(table, key.nr);
        let labels = [comm.as_str(), ns, pod, container, workload, &name];
        if t.calls > 0 {
            metrics.calls.inc_by(&labels, t.calls);
        }
        if t.errors > 0 {
            metrics.errors.inc_by(&labels, t.errors);
        }
        if open.contains(&key.nr) && t.calls > 0 {
            let result = open_result(key.errno);
            metrics.opens.inc_by(
                &[comm.as_str(), ns, pod, container, workload, &result],
                t.calls,
            );
        }
    }
    nrs
}

/// Last known name of each process seen in the previous drain: `/proc/<tgid>/comm` is read at
/// every drain (names change at exec); the cache answers for processes that exited since.
#[derive(Debug, Default)]
pub struct CommCache {
    known: HashMap<u32, String>,
}

impl CommCache {
    /// The name of `tgid`: `/proc`, else the cached one, else the thread name the kernel
    /// recorded (`kernel_comm`, NUL-padded), else `[exited]`.
    pub fn resolve(&mut self, tgid: u32, kernel_comm: &[u8]) -> String {
        match std::fs::read_to_string(format!("/proc/{tgid}/comm")) {
            Ok(s) => {
                let s = s.trim_end_matches('\n').to_owned();
                self.known.insert(tgid, s.clone());
                s
            }
            Err(_) => self.known.get(&tgid).cloned().unwrap_or_else(|| {
                let c = super::tcp::comm_str(kernel_comm);
                if c == "[unknown]" {
                    "[exited]".into()
                } else {
                    c
                }
            }),
        }
    }

    /// Forgets processes not in `seen` (they made no syscall for a whole interval).
    pub fn retain(&mut self, seen: &BTreeSet<u32>) {
        self.known.retain(|t, _| seen.contains(t));
    }
}

/// The attached syscalls probe, ready to drain.
pub struct SyscallsProbe {
    config: Array<MapData, SyscallConfig>,
    counts: [PerCpuHashMap<MapData, SyscallKey, SyscallStat>; 2],
    runs: [PerCpuArray<MapData, SyscallRun>; 2],
    hist: PerCpuArray<MapData, SyscallHistRow>,
    lost: PerCpuArray<MapData, u64>,
    cfg: SyscallConfig,
    metrics: SyscallsMetrics,
    loss: LossCounters,
    opts: SyscallsOptions,
    table: Table,
    comms: CommCache,
    /// Cumulative per-row sums read last time (slots then ns sum), for deltas.
    hist_seen: HashMap<u32, SyscallHistRow>,
    /// Syscall numbers of the previous drain (their rows are read again once).
    last_nrs: BTreeSet<u32>,
    meta: Arc<Metadata>,
}

impl SyscallsProbe {
    /// Writes the config, loads and attaches both programs.
    pub fn attach(
        ebpf: &mut Ebpf,
        tracefs: &Path,
        snapshot: &Snapshot,
        loss: LossCounters,
        opts: SyscallsOptions,
        meta: Arc<Metadata>,
    ) -> Result<Self, ProbeError> {
        // The raw tracepoints exist where the classic ones do: this names a missing one clearly.
        kernel::tracepoint_format(tracefs, "raw_syscalls", "sys_enter")?;
        kernel::tracepoint_format(tracefs, "raw_syscalls", "sys_exit")?;
        let table = native_table();
        let cfg = SyscallConfig {
            generation: 0,
            open_nrs: open_nrs(table),
        };
        let mut config: Array<MapData, SyscallConfig> = take(ebpf, SYSCALL_CONFIG)?;
        config.set(0, cfg, 0)?;
        let counts = [take(ebpf, SYSCALL_COUNTS_0)?, take(ebpf, SYSCALL_COUNTS_1)?];
        let runs = [take(ebpf, SYSCALL_RUNS_0)?, take(ebpf, SYSCALL_RUNS_1)?];
        let hist = take(ebpf, SYSCALL_HIST)?;
        let lost = take(ebpf, SYSCALL_LOST)?;
        // Exit first: an exit without its entry is ignored, while entries without exits
        // would leave start slots set; the switch before the entry, so a start never stays in
        // a CPU's slot while its thread runs elsewhere.
        for (prog, name) in [
            (EXIT, "sys_exit"),
            (SWITCH, "sched_switch"),
            (PROCESS_EXIT, "sched_process_exit"),
            (ENTER, "sys_enter"),
        ] {
            let p: &mut RawTracePoint = program(ebpf, prog)?;
            p.load()?;
            p.attach(name)?;
        }
        Ok(Self {
            config,
            counts,
            runs,
            hist,
            lost,
            cfg,
            metrics: SyscallsMetrics::register(snapshot),
            loss,
            opts,
            table,
            comms: CommCache::default(),
            hist_seen: HashMap::new(),
            last_nrs: BTreeSet::new(),
            meta,
        })
    }

    /// Drains every `--interval` until `stop` turns true, then once more (after the programs
    /// were detached) and returns.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ProbeError> {
        let mut tick = tokio::time::interval(self.opts.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.drain(false).await?,
                _ = stop.changed() => break,
            }
        }
        self.drain(true).await
    }

    /// Flips the generation and drains the idle one; `last` (after detach) drains both and
    /// reads every histogram row.
    async fn drain(&mut self, last: bool) -> Result<(), ProbeError> {
        let idle = self.cfg.generation as usize;
        self.cfg.generation ^= 1;
        self.config.set(0, self.cfg, 0)?;
        tokio::time::sleep(FLIP_GRACE).await;

        let mut drained = BTreeMap::new();
        take_all(&mut self.counts[idle], &mut drained)?;
        take_runs(&mut self.runs[idle], &mut drained);
        if last {
            take_all(&mut self.counts[idle ^ 1], &mut drained)?;
            take_runs(&mut self.runs[idle ^ 1], &mut drained);
        }
        let tgids: BTreeSet<u32> = drained.keys().map(|k| k.tgid).collect();
        let (comms, filter, meta) = (&mut self.comms, self.opts.comm_filter.as_ref(), &self.meta);
        let nrs = record_counts(
            &self.metrics,
            self.table,
            self.cfg.open_nrs,
            &drained,
            |tgid, kernel_comm| {
                let c = comms.resolve(tgid, kernel_comm);
                filter
                    .is_none_or(|re| re.is_match(&c))
                    .then(|| (c, meta.labels(tgid, 0)))
            },
        );
        self.comms.retain(&tgids);

        let rows: Vec<u32> = if last {
            (0..SYSCALL_HIST_ROWS).collect()
        } else {
            nrs.union(&self.last_nrs)
                .map(|&nr| agent_common::syscalls::hist_row(u64::from(nr)))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        for row in rows {
            self.read_hist_row(row);
        }
        self.last_nrs = nrs;
        self.read_lost();
        log::debug!(
            "syscalls: drained {} keys of generation {idle}",
            drained.len()
        );
        Ok(())
    }

    fn read_hist_row(&mut self, row: u32) {
        let per_cpu = match self.hist.get(&row, 0) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("syscalls: reading {SYSCALL_HIST}[{row}]: {e}");
                return;
            }
        };
        let mut total: SyscallHistRow = [0; SYSCALL_HIST_SLOTS + 1];
        for cpu in per_cpu.iter() {
            for (t, v) in total.iter_mut().zip(cpu.iter()) {
                *t = t.wrapping_add(*v);
            }
        }
        let prev = self
            .hist_seen
            .entry(row)
            .or_insert([0; SYSCALL_HIST_SLOTS + 1]);
        let delta: Vec<u64> = total
            .iter()
            .zip(prev.iter())
            .map(|(t, p)| t.saturating_sub(*p))
            .collect();
        *prev = total;
        let counts = log2_counts(&delta[..SYSCALL_HIST_SLOTS]);
        if counts.iter().all(|&c| c == 0) {
            return;
        }
        let name = if row == SYSCALL_NR_MAX {
            Cow::Borrowed("other")
        } else {
            syscall_name(self.table, row)
        };
        #[expect(clippy::cast_precision_loss, reason = "ns sums fit f64 for years")]
        let sum = delta[SYSCALL_HIST_SUM] as f64 / 1e9;
        self.metrics.duration.add_counts(&[&name], &counts, sum);
    }

    fn read_lost(&self) {
        self.loss.read_kernel(PROBE, &self.lost, &LOST_REASONS);
    }
}

/// Maps a kernel row's slots to the 65 pre-bucketed counts of [`LOG2_NS_BOUNDS`]: slot `s`
/// (below the last) is the bucket `le = 2^s ns`; the last slot (everything from `2^34` ns) goes
/// to `+Inf`.
#[must_use]
pub fn log2_counts(slots: &[u64]) -> Vec<u64> {
    let mut out = vec![0; LOG2_NS_BOUNDS.len() + 1];
    if let Some((overflow, exact)) = slots.split_last() {
        out[..exact.len()].copy_from_slice(exact);
        out[LOG2_NS_BOUNDS.len()] = *overflow;
    }
    out
}

/// Reads every key of `map` (summing its per-CPU values) into `into`, then deletes them.
fn take_all(
    map: &mut PerCpuHashMap<MapData, SyscallKey, SyscallStat>,
    into: &mut BTreeMap<SyscallKey, Totals>,
) -> Result<(), ProbeError> {
    let keys: Vec<SyscallKey> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        match map.get(&key, 0) {
            Ok(per_cpu) => {
                let t = into.entry(key).or_default();
                for v in per_cpu.iter() {
                    t.add(v.calls, v.errors, &v.comm);
                }
            }
            Err(e) => log::debug!("syscalls: reading {key:?}: {e}"),
        }
        if let Err(e) = map.remove(&key) {
            log::debug!("syscalls: deleting {key:?}: {e}");
        }
    }
    Ok(())
}

/// Adds every CPU's run of every syscall number in `runs` to `into`, then zeroes the rows
/// that held one.
fn take_runs(runs: &mut PerCpuArray<MapData, SyscallRun>, into: &mut BTreeMap<SyscallKey, Totals>) {
    let mut zeros = None;
    for nr in 0..SYSCALL_NR_MAX {
        let per_cpu = match runs.get(&nr, 0) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("syscalls: reading {SYSCALL_RUNS_0}/1[{nr}]: {e}");
                continue;
            }
        };
        let mut any = false;
        for run in per_cpu.iter().filter(|r| r.calls != 0) {
            any = true;
            let key = SyscallKey {
                tgid: run.tgid,
                nr,
                errno: 0,
            };
            into.entry(key).or_default().add(run.calls, 0, &run.comm);
        }
        if !any {
            continue;
        }
        let zeros = zeros.get_or_insert_with(|| vec![SyscallRun::default(); per_cpu.len()]);
        match PerCpuValues::try_from(zeros.clone()) {
            Ok(v) => {
                if let Err(e) = runs.set(nr, v, 0) {
                    log::debug!("syscalls: zeroing run row {nr}: {e}");
                }
            }
            Err(e) => log::debug!("syscalls: zeroing run row {nr}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_on_both_architectures() {
        use syscall_names::{AARCH64, X86_64};
        assert_eq!(syscall_name(X86_64, 0), "read");
        assert_eq!(syscall_name(X86_64, 2), "open");
        assert_eq!(syscall_name(X86_64, 39), "getpid");
        assert_eq!(syscall_name(X86_64, 59), "execve");
        assert_eq!(syscall_name(X86_64, 110), "getppid");
        assert_eq!(syscall_name(X86_64, 231), "exit_group");
        assert_eq!(syscall_name(X86_64, 257), "openat");
        assert_eq!(syscall_name(X86_64, 435), "clone3");
        assert_eq!(syscall_name(X86_64, 437), "openat2");
        assert_eq!(syscall_name(AARCH64, 56), "openat");
        assert_eq!(syscall_name(AARCH64, 63), "read");
        assert_eq!(syscall_name(AARCH64, 79), "newfstatat");
        assert_eq!(syscall_name(AARCH64, 25), "fcntl");
        assert_eq!(syscall_name(AARCH64, 172), "getpid");
        assert_eq!(syscall_name(AARCH64, 173), "getppid");
        assert_eq!(syscall_name(AARCH64, 221), "execve");
        assert_eq!(syscall_name(AARCH64, 222), "mmap");
        assert_eq!(syscall_name(AARCH64, 437), "openat2");
        assert_eq!(syscall_nr(AARCH64, "open"), None, "arm64 has no open");
        assert_eq!(syscall_nr(AARCH64, "stat"), None, "arm64 has no stat");
        assert_eq!(syscall_name(AARCH64, 244), "sys_244", "reserved range");
        assert_eq!(syscall_name(X86_64, 100_000), "sys_100000");
        assert!(X86_64.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        assert!(AARCH64.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        assert_eq!(open_nrs(X86_64), [2, 257, 437]);
        assert_eq!(open_nrs(AARCH64), [NO_SYSCALL, 56, 437]);
    }

    #[test]
    fn errno_names() {
        assert_eq!(open_result(0), "ok");
        assert_eq!(open_result(2), "ENOENT");
        assert_eq!(open_result(13), "EACCES");
        assert_eq!(open_result(24), "EMFILE");
        assert_eq!(open_result(11), "EAGAIN", "EWOULDBLOCK is an alias");
        assert_eq!(open_result(40), "ELOOP");
        assert_eq!(open_result(4000), "E4000");
    }

    #[test]
    fn log2_rows_become_prometheus_buckets() {
        let mut slots = [0u64; SYSCALL_HIST_SLOTS];
        slots[8] = 5; // 128..255 ns -> le 256 ns
        slots[SYSCALL_HIST_SLOTS - 1] = 2;
        let c = log2_counts(&slots);
        assert_eq!(c.len(), 65);
        assert_eq!(c[8], 5);
        assert_eq!(c[64], 2, "the overflow slot is +Inf");
        assert_eq!(c.iter().sum::<u64>(), 7);
    }

    #[test]
    fn counts_fold_by_comm_with_open_results_and_filter() {
        let s = Snapshot::default();
        let m = SyscallsMetrics::register(&s);
        let t = syscall_names::X86_64;
        let mut d = BTreeMap::new();
        let k = |tgid, nr, errno| SyscallKey { tgid, nr, errno };
        let tot = |calls, errors| Totals {
            calls,
            errors,
            comm: [0; 16],
        };
        d.insert(k(1, 110, 0), tot(10, 0));
        d.insert(k(2, 110, 0), tot(4, 0));
        d.insert(k(1, 257, 0), tot(5, 0));
        d.insert(k(1, 257, 2), tot(7, 7));
        d.insert(k(1, 999, 0), tot(0, 3));
        d.insert(k(3, 110, 0), tot(100, 0));
        let w = Arc::new(WorkloadLabels {
            namespace: "ns".into(),
            ..WorkloadLabels::default()
        });
        let nrs = record_counts(&m, t, open_nrs(t), &d, |tgid, _| match tgid {
            1 | 2 => Some(("app".into(), w.clone())),
            _ => None,
        });
        let l = |v: &'static str| ["app", "ns", "", "", "", v];
        assert_eq!(nrs, BTreeSet::from([110, 257, 999]));
        assert_eq!(m.calls.get(&l("getppid")), 14, "two processes, one comm");
        assert_eq!(m.calls.get(&l("openat")), 12);
        assert_eq!(m.errors.get(&l("openat")), 7);
        assert_eq!(m.errors.get(&l("sys_999")), 3);
        assert_eq!(m.opens.get(&l("ok")), 5);
        assert_eq!(m.opens.get(&l("ENOENT")), 7);
        assert_eq!(m.calls.snapshot().len(), 2, "tgid 3 filtered out");
    }

    #[test]
    fn comm_cache_reads_proc_and_remembers() {
        let mut c = CommCache::default();
        let me = std::process::id();
        let name = c.resolve(me, b"other\0");
        assert!(!name.is_empty() && !name.ends_with('\n'));
        c.retain(&BTreeSet::from([me]));
        assert_eq!(c.known.len(), 1);
        c.retain(&BTreeSet::new());
        assert!(c.known.is_empty());
        assert_eq!(c.resolve(u32::MAX, &[0; 16]), "[exited]");
        assert_eq!(c.resolve(u32::MAX, b"short\0\0"), "short");
    }
}
