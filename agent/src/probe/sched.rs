//! Scheduler probe, userspace side: reads the sched tracepoint layouts from tracefs, attaches
//! the five programs, drains the in-kernel aggregation maps every `--interval` (and once more at
//! shutdown), and turns process exec/exit events (ring buffer or perf buffers) into counters and a
//! tgid -> (comm, exe) cache.
//!
//! Metrics: `tanzhen_sched_runqueue_latency_seconds{comm,namespace,pod,container,workload}` (log2
//! buckets, exact sum),
//! `tanzhen_sched_context_switches_total{comm,kind}`, `tanzhen_process_execs_total{comm}`,
//! `tanzhen_process_exits_total{comm}`; drops feed `tanzhen_events_lost_total{probe="sched",..}`.
//!
//! The run-queue histogram is keyed by the switched-in task's comm and cgroup id; the cgroup is
//! the one the task had at its last switch-out (at `sched_switch` the current task is still
//! `prev`, so the kernel cannot name `next`'s cgroup without BTF). Userspace turns cgroup ids
//! into workload labels ([`Metadata::cgroup_labels`]); on cgroup v1 hosts they stay empty.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use agent_common::sched::{
    DEAD_STATE_MASK, PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_SIZE, ProcEvent, RunqHist,
    RunqKey, SCHED_CONFIG, SCHED_EVENTS, SCHED_LOST, SCHED_LOST_MAP_FULL, SCHED_LOST_READ_ERROR,
    SCHED_LOST_REASONS, SCHED_LOST_RINGBUF_FULL, SCHED_READY, SCHED_READY_KNOWN, SCHED_RUNQ_HIST,
    SCHED_SWITCHES, SLEEP_STATE_MASK, SchedConfig, SwitchCounts, SwitchKey,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{ProgramFd, TracePoint},
};
use tokio::sync::watch;

use crate::{
    kernel::{self, Format},
    metadata::{Metadata, WorkloadLabels},
    probe::{
        ProbeError, program, take,
        tcp::{LossCounters, comm_str},
    },
    snapshot::{CounterVec, Desc, HistogramVec, LOG2_NS_BOUNDS, Snapshot},
    transport::{EventReader, Transport},
};

const PROBE: &str = "sched";

/// The tracepoints, in the order of [`SchedFormats`]; each program is named after its hook.
pub const HOOKS: [&str; 5] = [
    "sched_wakeup",
    "sched_wakeup_new",
    "sched_switch",
    "sched_process_exec",
    "sched_process_exit",
];

/// How long programs that read the previous epoch get to finish before its entries are read.
/// They run with preemption disabled and take well under a microsecond.
const EPOCH_GRACE: Duration = Duration::from_millis(20);

/// Capacity of the process cache; execs beyond it are counted but not cached.
const PROCESS_CACHE_MAX: usize = 65_536;

/// Label values of the drop reasons, indexed like `SCHED_LOST_*`.
fn lost_reasons(transport: Transport) -> [&'static str; SCHED_LOST_REASONS as usize] {
    let mut r = [""; SCHED_LOST_REASONS as usize];
    r[SCHED_LOST_RINGBUF_FULL as usize] = transport.kernel_drop_reason();
    r[SCHED_LOST_MAP_FULL as usize] = "map_full";
    r[SCHED_LOST_READ_ERROR as usize] = "read_error";
    r
}

/// Label value of the kernel's own count of skipped runs: a tracepoint fired while another BPF
/// program was running on that CPU (e.g. an IPI that wakes a task arriving during a syscall
/// program), so the kernel did not run ours (`recursion_misses`, kernels >= 5.12).
const LOST_RECURSION: &str = "recursion";

/// `recursion_misses` of a loaded program (`BPF_OBJ_GET_INFO_BY_FD`); None when the kernel does
/// not report it. aya 0.14's `ProgramInfo` does not expose the field.
#[must_use]
pub fn recursion_misses(prog: BorrowedFd<'_>) -> Option<u64> {
    /// Offset of `recursion_misses` in `struct bpf_prog_info` (include/uapi/linux/bpf.h).
    const OFFSET: usize = 208;
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info([0; 256]);
    let mut attr = [0u8; 128];
    let req = GetInfo {
        bpf_fd: u32::try_from(prog.as_raw_fd()).ok()?,
        info_len: 256,
        info: (&raw mut info) as u64,
    };
    // SAFETY: GetInfo is 16 bytes of plain data and attr is larger.
    unsafe { std::ptr::copy_nonoverlapping((&raw const req).cast::<u8>(), attr.as_mut_ptr(), 16) };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD (15) writes at most info_len bytes into `info` and the
    // granted length back into attr; both buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            15,
            attr.as_mut_ptr(),
            u32::try_from(attr.len()).ok()?,
        )
    };
    let granted = u32::from_ne_bytes(attr[4..8].try_into().ok()?) as usize;
    if rc != 0 || granted < OFFSET + 8 {
        return None;
    }
    Some(u64::from_ne_bytes(
        info.0[OFFSET..OFFSET + 8].try_into().ok()?,
    ))
}

/// The parsed `format` files of the five tracepoints.
#[derive(Clone, Debug)]
pub struct SchedFormats {
    pub wakeup: Format,
    pub wakeup_new: Format,
    pub switch: Format,
    pub exec: Format,
    pub exit: Format,
}

impl SchedFormats {
    /// Reads and parses every `events/sched/<hook>/format` under `tracefs`.
    pub fn read(tracefs: &Path) -> Result<Self, kernel::KernelError> {
        let f = |name| kernel::tracepoint_format(tracefs, "sched", name);
        Ok(Self {
            wakeup: f("sched_wakeup")?,
            wakeup_new: f("sched_wakeup_new")?,
            switch: f("sched_switch")?,
            exec: f("sched_process_exec")?,
            exit: f("sched_process_exit")?,
        })
    }
}

/// Builds the configuration entry: every field the programs read, at the size they read it.
/// `sched_switch.prev_state` is accepted as 8 bytes (`long` on 64-bit) or 4 (`unsigned int`,
/// and `long` on 32-bit), and its size goes to the program.
pub fn config(f: &SchedFormats) -> Result<SchedConfig, ProbeError> {
    fn need(f: &Format, tp: &str, name: &str, size: u32) -> Result<u32, ProbeError> {
        f.offset(name, size).ok_or_else(|| {
            let reason = match f.fields.get(name) {
                Some(field) => format!(
                    "sched:{tp} field `{name}` is {} bytes here, tanzhen reads {size}",
                    field.size
                ),
                None => format!("sched:{tp} has no field `{name}` on this kernel"),
            };
            ProbeError::Unsupported {
                probe: PROBE,
                reason,
            }
        })
    }
    let state = f
        .switch
        .fields
        .get("prev_state")
        .ok_or_else(|| ProbeError::Unsupported {
            probe: PROBE,
            reason: "sched:sched_switch has no field `prev_state` on this kernel".into(),
        })?;
    if state.size != 4 && state.size != 8 {
        return Err(ProbeError::Unsupported {
            probe: PROBE,
            reason: format!(
                "sched:sched_switch field `prev_state` is {} bytes here, tanzhen reads 4 or 8",
                state.size
            ),
        });
    }
    // Validated though unused: the exit program only needs the current task.
    need(&f.exit, "sched_process_exit", "pid", 4)?;
    let mut cfg = SchedConfig {
        switch_prev_comm: need(&f.switch, "sched_switch", "prev_comm", 16)?,
        switch_prev_pid: need(&f.switch, "sched_switch", "prev_pid", 4)?,
        switch_prev_state: state.offset,
        switch_prev_state_size: state.size,
        switch_next_comm: need(&f.switch, "sched_switch", "next_comm", 16)?,
        switch_next_pid: need(&f.switch, "sched_switch", "next_pid", 4)?,
        wakeup_pid: need(&f.wakeup, "sched_wakeup", "pid", 4)?,
        wakeup_new_pid: need(&f.wakeup_new, "sched_wakeup_new", "pid", 4)?,
        exec_filename: need(&f.exec, "sched_process_exec", "filename", 4)?,
        sleep_state_mask: SLEEP_STATE_MASK,
        dead_state_mask: DEAD_STATE_MASK,
        epoch: 1,
        ready: SCHED_READY,
    };
    if cfg.has_known_layout() {
        cfg.ready = SCHED_READY_KNOWN;
    }
    Ok(cfg)
}

/// Why an event record could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {PROC_EVENT_SIZE}")]
    Size(usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// Decodes one process event without trusting its length or contents.
pub fn decode(bytes: &[u8]) -> Result<ProcEvent, DecodeError> {
    if bytes.len() < PROC_EVENT_SIZE {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: ProcEvent is repr(C) plain data for which every bit pattern is valid, and the
    // slice holds at least size_of::<ProcEvent>() bytes; read_unaligned needs no alignment.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcEvent>()) };
    match ev.kind {
        PROC_EVENT_EXEC | PROC_EVENT_EXIT => Ok(ev),
        k => Err(DecodeError::Kind(k)),
    }
}

/// What the cache knows about a running process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub comm: String,
    /// The path given to `execve` (as the caller spelled it).
    pub exe: String,
    pub cgroup_id: u64,
}

/// tgid -> process metadata, filled by exec events and emptied by exit events, so labels can be
/// resolved without racing /proc for short-lived processes. Bounded by `PROCESS_CACHE_MAX`.
#[derive(Debug, Default)]
pub struct ProcessCache(Mutex<StdHashMap<u32, ProcessInfo>>);

impl ProcessCache {
    /// Applies one event; returns what an exit removed.
    pub fn apply(&self, ev: &ProcEvent) -> Option<ProcessInfo> {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match ev.kind {
            PROC_EVENT_EXEC => {
                if m.len() < PROCESS_CACHE_MAX || m.contains_key(&ev.tgid) {
                    m.insert(
                        ev.tgid,
                        ProcessInfo {
                            comm: comm_str(&ev.comm),
                            exe: cstr(&ev.filename),
                            cgroup_id: ev.cgroup_id,
                        },
                    );
                }
                None
            }
            PROC_EVENT_EXIT => m.remove(&ev.tgid),
            _ => None,
        }
    }

    /// The cached metadata of `tgid`.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "for label lookups by the other probes")
    )]
    #[must_use]
    pub fn get(&self, tgid: u32) -> Option<ProcessInfo> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&tgid)
            .cloned()
    }
}

/// A NUL-terminated byte string as text.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Receives every decoded process event (exec and exit), e.g. the live event rings, so the
/// probe does not depend on them. Called inline in the drain loop: must not block.
pub trait ProcSink: Send + Sync {
    /// One process exec'd or exited.
    fn process(&self, ev: &ProcEvent);
}

/// The scheduler probe's metric families.
#[derive(Debug)]
pub struct SchedMetrics {
    pub runq: Arc<HistogramVec>,
    pub switches: Arc<CounterVec>,
    pub execs: Arc<CounterVec>,
    pub exits: Arc<CounterVec>,
}

impl SchedMetrics {
    /// Registers the families in `snapshot`.
    pub fn register(snapshot: &Snapshot) -> Self {
        Self {
            runq: snapshot.histogram(
                Desc {
                    name: "tanzhen_sched_runqueue_latency_seconds",
                    help: "Time runnable tasks waited in a run queue (wakeup or preemption to running), by the comm and container of the task.",
                    labels: &["comm", "namespace", "pod", "container", "workload"],
                },
                &LOG2_NS_BOUNDS,
            ),
            switches: snapshot.counter(Desc {
                name: "tanzhen_sched_context_switches",
                help: "Context switches by the comm of the task switched out; kind=voluntary when it was sleeping, involuntary when still runnable (preempted).",
                labels: &["comm", "kind"],
            }),
            execs: snapshot.counter(Desc {
                name: "tanzhen_process_execs",
                help: "Successful execve calls, by the new comm.",
                labels: &["comm", "namespace", "pod", "container", "workload"],
            }),
            exits: snapshot.counter(Desc {
                name: "tanzhen_process_exits",
                help: "Process exits (thread-group leader), by comm.",
                labels: &["comm", "namespace", "pod", "container", "workload"],
            }),
        }
    }

    /// Adds one drained context switch entry.
    pub fn add_switches(&self, key: &SwitchKey, c: SwitchCounts) {
        let comm = comm_str(&key.comm);
        if c.voluntary > 0 {
            self.switches.inc_by(&[&comm, "voluntary"], c.voluntary);
        }
        if c.involuntary > 0 {
            self.switches.inc_by(&[&comm, "involuntary"], c.involuntary);
        }
    }

    /// Adds one drained histogram entry of a task with workload labels `w`.
    pub fn add_runq(&self, key: &RunqKey, w: &WorkloadLabels, h: &RunqHist) {
        #[expect(clippy::cast_precision_loss, reason = "ns sums fit f64 closely enough")]
        let sum = h.sum_ns as f64 / 1e9;
        let comm = comm_str(&key.comm);
        let [ns, pod, container, workload] = w.values();
        self.runq
            .add_counts(&[&comm, ns, pod, container, workload], &h.slots, sum);
    }

    /// Counts one process event of a process whose workload labels are `w`.
    pub fn record(&self, ev: &ProcEvent, w: &WorkloadLabels) {
        let comm = comm_str(&ev.comm);
        let [ns, pod, container, workload] = w.values();
        let labels = [comm.as_str(), ns, pod, container, workload];
        match ev.kind {
            PROC_EVENT_EXEC => self.execs.inc_by(&labels, 1),
            PROC_EVENT_EXIT => self.exits.inc_by(&labels, 1),
            _ => {}
        }
    }
}

/// The attached scheduler probe, ready to drain.
pub struct SchedProbe {
    cfg: SchedConfig,
    cfg_map: Array<MapData, SchedConfig>,
    switches: PerCpuHashMap<MapData, SwitchKey, SwitchCounts>,
    hist: HashMap<MapData, RunqKey, RunqHist>,
    events: EventReader,
    transport: Transport,
    lost: PerCpuArray<MapData, u64>,
    /// The programs, for their `recursion_misses` (kept open after Ebpf detaches them).
    progs: Vec<ProgramFd>,
    metrics: SchedMetrics,
    cache: Arc<ProcessCache>,
    loss: LossCounters,
    interval: Duration,
    sink: Option<Arc<dyn ProcSink>>,
    meta: Arc<Metadata>,
}

impl SchedProbe {
    /// Writes the configuration, loads and attaches the five programs, and takes the maps.
    #[expect(clippy::too_many_arguments, reason = "two call sites, all distinct")]
    pub fn attach(
        ebpf: &mut Ebpf,
        tracefs: &Path,
        transport: Transport,
        snapshot: &Snapshot,
        loss: LossCounters,
        interval: Duration,
        sink: Option<Arc<dyn ProcSink>>,
        meta: Arc<Metadata>,
    ) -> Result<Self, ProbeError> {
        let mut cfg = config(&SchedFormats::read(tracefs)?)?;
        // Testing only: take the path of kernels with another record layout.
        if crate::probe::read_by_offset_forced() {
            cfg.ready = SCHED_READY;
        }
        log::debug!("sched tracepoint layout: {cfg:?}");
        let mut cfg_map: Array<MapData, SchedConfig> = take(ebpf, SCHED_CONFIG)?;
        cfg_map.set(0, cfg, 0)?;
        // Readers first: a perf event array has no buffer for a CPU until it is opened.
        let events = EventReader::open(ebpf, SCHED_EVENTS, transport)?;
        let mut progs = Vec::with_capacity(HOOKS.len());
        for name in HOOKS {
            let prog: &mut TracePoint = program(ebpf, name)?;
            prog.load()?;
            prog.attach("sched", name)?;
            progs.push(prog.fd()?.try_clone()?);
        }
        Ok(Self {
            cfg,
            cfg_map,
            switches: take(ebpf, SCHED_SWITCHES)?,
            hist: take(ebpf, SCHED_RUNQ_HIST)?,
            events,
            transport,
            lost: take(ebpf, SCHED_LOST)?,
            progs,
            metrics: SchedMetrics::register(snapshot),
            cache: Arc::default(),
            loss,
            interval,
            sink,
            meta,
        })
    }

    /// Drains the events as they arrive and the aggregation maps every interval, until
    /// `stop` turns true; then drains everything left (the programs are detached by then).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ProbeError> {
        let Self {
            mut cfg,
            mut cfg_map,
            mut switches,
            mut hist,
            mut events,
            transport,
            lost,
            progs,
            metrics,
            cache,
            loss,
            interval,
            sink,
            meta,
        } = self;
        let sink = sink.as_deref();
        let perf_lost = events.lost();
        let reasons = lost_reasons(transport);
        let export_lost = || {
            read_lost(&lost, &progs, &loss, &reasons);
            loss.read_perf(PROBE, transport, &perf_lost);
        };
        export_lost();
        let mut on_record = |bytes: &[u8]| handle(bytes, &metrics, &cache, &loss, sink, &meta);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                res = events.read(&mut on_record) => res?,
                _ = tick.tick() => {
                    // Move the programs to a new epoch, let stragglers finish, then take
                    // everything older.
                    cfg.epoch = cfg.epoch.wrapping_add(1).max(1);
                    if let Err(e) = cfg_map.set(0, cfg, 0) {
                        log::error!("sched: writing {SCHED_CONFIG}: {e}");
                    }
                    tokio::time::sleep(EPOCH_GRACE).await;
                    drain_maps(&mut switches, &mut hist, (&metrics, &meta), Some(cfg.epoch));
                    export_lost();
                }
                _ = stop.changed() => break,
            }
        }
        events.drain(&mut on_record);
        drain_maps(&mut switches, &mut hist, (&metrics, &meta), None);
        export_lost();
        Ok(())
    }
}

/// Decodes and records one process event record.
fn handle(
    bytes: &[u8],
    metrics: &SchedMetrics,
    cache: &ProcessCache,
    loss: &LossCounters,
    sink: Option<&dyn ProcSink>,
    meta: &Metadata,
) {
    {
        match decode(bytes) {
            Ok(ev) => {
                // At exit /proc/<tgid> may be gone already: the cache (filled at exec or at
                // the process's first event) answers, then forgets it (the pid can be reused).
                metrics.record(&ev, &meta.labels(ev.tgid, ev.cgroup_id));
                if ev.kind == PROC_EVENT_EXIT {
                    meta.forget(ev.tgid);
                }
                if let Some(sink) = sink {
                    sink.process(&ev);
                }
                let gone = cache.apply(&ev);
                log::trace!(
                    "sched: {} tgid={} comm={} exe={}",
                    if ev.kind == PROC_EVENT_EXEC {
                        "exec"
                    } else {
                        "exit"
                    },
                    ev.tgid,
                    comm_str(&ev.comm),
                    gone.map_or_else(|| cstr(&ev.filename), |p| p.exe)
                );
            }
            Err(e) => {
                log::debug!("sched: undecodable record: {e}");
                loss.decode_errors.inc_by(&[PROBE], 1);
            }
        }
    }
}

/// Reads and deletes every aggregation entry whose epoch is not `keep` (all of them when
/// `keep` is None, at shutdown).
fn drain_maps(
    switches: &mut PerCpuHashMap<MapData, SwitchKey, SwitchCounts>,
    hist: &mut HashMap<MapData, RunqKey, RunqHist>,
    (metrics, meta): (&SchedMetrics, &Metadata),
    keep: Option<u32>,
) {
    let old = |epoch: u32| keep != Some(epoch);
    let keys: Vec<SwitchKey> = switches
        .keys()
        .filter_map(Result::ok)
        .filter(|k| old(k.epoch))
        .collect();
    let nr_cpus = aya::util::nr_cpus().unwrap_or(1);
    for k in keys {
        match switches.get(&k, 0) {
            Ok(per_cpu) => {
                let total = per_cpu
                    .iter()
                    .fold(SwitchCounts::default(), |a, c| SwitchCounts {
                        voluntary: a.voluntary + c.voluntary,
                        involuntary: a.involuntary + c.involuntary,
                    });
                metrics.add_switches(&k, total);
            }
            Err(e) => log::debug!("sched: reading {SCHED_SWITCHES}: {e}"),
        }
        // Zero every CPU's slot before deleting: kernels before 5.10 hand a reused per-CPU
        // element to the next insert with the other CPUs' old values still in it.
        if let Ok(zeros) = PerCpuValues::try_from(vec![SwitchCounts::default(); nr_cpus]) {
            let _ = switches.insert(k, zeros, 0);
        }
        if let Err(e) = switches.remove(&k) {
            log::debug!("sched: deleting from {SCHED_SWITCHES}: {e}");
        }
    }
    let keys: Vec<RunqKey> = hist
        .keys()
        .filter_map(Result::ok)
        .filter(|k| old(k.epoch))
        .collect();
    for k in keys {
        match hist.get(&k, 0) {
            Ok(h) => metrics.add_runq(&k, &meta.cgroup_labels(k.cgroup_id), &h),
            Err(e) => log::debug!("sched: reading {SCHED_RUNQ_HIST}: {e}"),
        }
        if let Err(e) = hist.remove(&k) {
            log::debug!("sched: deleting from {SCHED_RUNQ_HIST}: {e}");
        }
    }
}

fn read_lost(
    lost: &PerCpuArray<MapData, u64>,
    progs: &[ProgramFd],
    loss: &LossCounters,
    reasons: &[&str],
) {
    let misses: Option<u64> = progs.iter().map(|p| recursion_misses(p.as_fd())).sum();
    if let Some(m) = misses {
        loss.set_kernel_total(PROBE, LOST_RECURSION, m);
    }
    loss.read_kernel(PROBE, lost, reasons);
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn testdata(dir: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/probe/testdata")
            .join(dir)
    }

    fn config_of(dir: &str) -> SchedConfig {
        config(&SchedFormats::read(&testdata(dir)).unwrap()).unwrap()
    }

    #[test]
    fn offsets_of_4_19() {
        let c = config_of("4.19");
        assert_eq!(
            (c.switch_prev_comm, c.switch_prev_pid, c.switch_prev_state),
            (8, 24, 32)
        );
        assert_eq!(c.switch_prev_state_size, 8);
        assert_eq!((c.switch_next_comm, c.switch_next_pid), (40, 56));
        assert_eq!((c.wakeup_pid, c.wakeup_new_pid), (24, 24));
        assert_eq!(c.exec_filename, 8);
        assert_eq!(
            (c.sleep_state_mask, c.dead_state_mask, c.ready),
            (0xff, 0x30, SCHED_READY_KNOWN)
        );
        // Any field elsewhere (or a 4-byte prev_state): read through offsets.
        let mut f = SchedFormats::read(&testdata("4.19")).unwrap();
        f.switch.fields.get_mut("next_pid").unwrap().offset = 60;
        assert_eq!(config(&f).unwrap().ready, SCHED_READY);
        let mut f = SchedFormats::read(&testdata("4.19")).unwrap();
        f.switch.fields.get_mut("prev_state").unwrap().size = 4;
        assert_eq!(config(&f).unwrap().ready, SCHED_READY);
    }

    #[test]
    fn offsets_of_5_10_and_6_18_agree_where_the_layout_does() {
        let (a, b) = (config_of("5.10"), config_of("6.18"));
        assert_eq!(a, config_of("4.19"));
        assert_eq!(
            a, b,
            "fields the probe reads did not move between 5.10 and 6.18"
        );
        // ...but the records did change: `success` went away after 5.10.
        let f = SchedFormats::read(&testdata("5.10")).unwrap();
        assert_eq!(f.wakeup.fields["target_cpu"].offset, 36);
        let f = SchedFormats::read(&testdata("6.18")).unwrap();
        assert_eq!(f.wakeup.fields["target_cpu"].offset, 32);
        assert!(!f.wakeup.fields.contains_key("success"));
        assert!(f.exit.fields.contains_key("group_dead"));
    }

    #[test]
    fn prev_state_size_is_carried() {
        let f = SchedFormats::read(&testdata("6.18")).unwrap();
        let mut g = f.clone();
        g.switch.fields.get_mut("prev_state").unwrap().size = 4;
        assert_eq!(config(&g).unwrap().switch_prev_state_size, 4);
        g.switch.fields.get_mut("prev_state").unwrap().size = 2;
        let e = config(&g).unwrap_err().to_string();
        assert!(
            e.contains("`prev_state` is 2 bytes here, tanzhen reads 4 or 8"),
            "{e}"
        );
        let mut g = f.clone();
        g.switch.fields.remove("next_pid");
        let e = config(&g).unwrap_err().to_string();
        assert!(
            e.contains("sched:sched_switch has no field `next_pid`"),
            "{e}"
        );
        let mut g = f;
        g.wakeup.fields.get_mut("pid").unwrap().size = 8;
        let e = config(&g).unwrap_err().to_string();
        assert!(
            e.contains("sched:sched_wakeup field `pid` is 8 bytes here, tanzhen reads 4"),
            "{e}"
        );
    }

    #[test]
    fn malformed_format_is_one_clear_error() {
        let e = kernel::tracepoint_format(&testdata("malformed"), "sched", "sched_switch")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot parse "), "{e}");
        assert!(e.contains("sched_switch/format"), "{e}");
        assert!(
            e.contains("field `prev_state` lacks a numeric offset or size"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // And a missing tracepoint names itself.
        let e = SchedFormats::read(&testdata("malformed"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sched:sched_wakeup is missing"), "{e}");
    }

    fn event(kind: u32, tgid: u32, comm: &[u8], file: &[u8]) -> ProcEvent {
        let mut ev = ProcEvent {
            ts_ns: 1,
            cgroup_id: 9,
            kind,
            tgid,
            pid: tgid,
            _pad: 0,
            comm: [0; 16],
            filename: [0xaa; agent_common::sched::PROC_FILENAME_LEN],
        };
        ev.comm[..comm.len()].copy_from_slice(comm);
        ev.filename[..file.len()].copy_from_slice(file);
        ev.filename[file.len()] = 0;
        ev
    }

    fn bytes(ev: &ProcEvent) -> Vec<u8> {
        // SAFETY: ProcEvent is repr(C) plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts((ev as *const ProcEvent).cast::<u8>(), PROC_EVENT_SIZE)
        }
        .to_vec()
    }

    #[test]
    fn decodes_and_rejects_records() {
        let ev = event(PROC_EVENT_EXEC, 7, b"true", b"/bin/true");
        let d = decode(&bytes(&ev)).unwrap();
        assert_eq!((d.tgid, cstr(&d.filename)), (7, "/bin/true".into()));
        let b = bytes(&ev);
        for len in [0, 8, PROC_EVENT_SIZE - 1] {
            assert_eq!(decode(&b[..len]).unwrap_err(), DecodeError::Size(len));
        }
        assert_eq!(
            decode(&bytes(&event(5, 1, b"x", b""))).unwrap_err(),
            DecodeError::Kind(5)
        );
    }

    #[test]
    fn cache_follows_exec_and_exit() {
        let c = ProcessCache::default();
        c.apply(&event(PROC_EVENT_EXEC, 7, b"tzx", b"/tmp/tzx"));
        assert_eq!(
            c.get(7),
            Some(ProcessInfo {
                comm: "tzx".into(),
                exe: "/tmp/tzx".into(),
                cgroup_id: 9
            })
        );
        let gone = c.apply(&event(PROC_EVENT_EXIT, 7, b"tzx", b""));
        assert_eq!(gone.map(|p| p.exe), Some("/tmp/tzx".into()));
        assert_eq!(c.get(7), None);
    }

    #[test]
    fn metrics_from_drained_entries() {
        let s = Snapshot::default();
        let m = SchedMetrics::register(&s);
        let mut comm = [0u8; 16];
        comm[..3].copy_from_slice(b"tzp");
        m.add_switches(
            &SwitchKey { epoch: 1, comm },
            SwitchCounts {
                voluntary: 3,
                involuntary: 2,
            },
        );
        m.add_switches(
            &SwitchKey { epoch: 2, comm },
            SwitchCounts {
                voluntary: 1,
                involuntary: 0,
            },
        );
        assert_eq!(m.switches.get(&["tzp", "voluntary"]), 4);
        assert_eq!(m.switches.get(&["tzp", "involuntary"]), 2);
        let mut h = RunqHist {
            slots: [0; agent_common::hist::HIST_SLOTS],
            sum_ns: 3_000,
        };
        h.slots[agent_common::hist::slot(1_500)] = 2;
        let key = RunqKey {
            epoch: 1,
            cgroup_id: 42,
            comm,
            ..RunqKey::default()
        };
        let w = WorkloadLabels {
            container: "c0ffee".into(),
            ..WorkloadLabels::default()
        };
        m.add_runq(&key, &w, &h);
        let (labels, d) = m.runq.snapshot().pop().unwrap();
        assert_eq!(labels, ["tzp", "", "", "c0ffee", ""]);
        assert_eq!((d.count, d.counts[11]), (2, 2));
        assert!((d.sum - 3e-6).abs() < 1e-12);
        let w = WorkloadLabels::default();
        m.record(&event(PROC_EVENT_EXEC, 1, b"tzp", b"/x"), &w);
        m.record(&event(PROC_EVENT_EXIT, 1, b"tzp", b""), &w);
        let l = ["tzp", "", "", "", ""];
        assert_eq!((m.execs.get(&l), m.exits.get(&l)), (1, 1));
    }
}
