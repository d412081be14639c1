//! TCP probe, userspace side: hands the tracepoint offsets to the kernel program, attaches it,
//! drains its events (ring buffer or perf buffers, see `transport.rs`) and turns them into
//! connect/accept metrics.
//!
//! Metrics: `tanzhen_tcp_connects_total{comm,outcome}`, `tanzhen_tcp_connect_duration_seconds{comm}`
//! (established connects only), `tanzhen_tcp_accepts_total{comm}`; drops feed
//! `tanzhen_events_lost_total{probe="tcp",reason}` and `tanzhen_decode_errors_total{probe="tcp"}`.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::{
    COMM_LEN,
    tcp::{
        AF_INET6, FIELD_ABSENT, TCP_ACCEPTS_UNKNOWN, TCP_EVENT_ACCEPT,
        TCP_EVENT_CONNECT_ESTABLISHED, TCP_EVENT_CONNECT_FAILED, TCP_EVENT_LISTENER_GONE,
        TCP_EVENT_SIZE, TCP_EVENTS, TCP_LISTENERS, TCP_LOST, TCP_LOST_MAP_FULL,
        TCP_LOST_READ_ERROR, TCP_LOST_REASONS, TCP_LOST_RINGBUF_FULL, TCP_SOCK_OFFSETS,
        TCP_SOCK_READY, TCP_SOCK_READY_DEFAULT, TCP_TP_OFFSETS, TCP_TP_READY, TCP_TP_READY_KNOWN,
        TcpEvent, TcpListener, TcpSockOffsets, TcpTpOffsets,
    },
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{KProbe, RawTracePoint, TracePoint},
};
use tokio::sync::watch;

use crate::{
    compat::TcpAttach,
    kernel::{self, Format},
    metadata::{Metadata, WorkloadLabels},
    probe::{ProbeError, listeners, program, take},
    snapshot::{CounterVec, Desc, HistogramVec, Snapshot},
    transport::{EventReader, Transport},
};

/// Name of the classic tracepoint program (`agent-ebpf/src/tcp.rs`).
const PROGRAM: &str = "tcp_inet_sock_set_state";
/// Name of the raw tracepoint program (`agent-ebpf/src/tcp.rs`).
const RAW_PROGRAM: &str = "tcp_raw_inet_sock_set_state";
/// The kprobe programs (`agent-ebpf/src/tcp_kprobe.rs`): (program, kernel function, required).
pub const KPROBES: &[(&str, &str, bool)] = &[
    ("tcp_kprobe_set_state", "tcp_set_state", true),
    ("tcp_kprobe_accept", "inet_csk_accept", true),
];
/// The kernel programs of this probe, every attach method (unloaded when it is detached at
/// runtime).
pub const PROGRAMS: &[&str] = &[
    RAW_PROGRAM,
    PROGRAM,
    "tcp_kprobe_set_state",
    "tcp_kprobe_accept",
];

/// The programs of one attach method.
#[must_use]
pub fn programs(attach: TcpAttach) -> &'static [&'static str] {
    match attach {
        TcpAttach::RawTracepoint => &PROGRAMS[..1],
        TcpAttach::Tracepoint => &PROGRAMS[1..2],
        TcpAttach::Kprobe => &PROGRAMS[2..],
    }
}

/// How `check` and the logs name an attach method.
#[must_use]
pub fn describe(attach: TcpAttach) -> &'static str {
    match attach {
        TcpAttach::RawTracepoint => {
            "raw tracepoint inet_sock_set_state (struct sock offsets from BTF)"
        }
        TcpAttach::Tracepoint => "tracepoint sock:inet_sock_set_state",
        TcpAttach::Kprobe => "kprobe tcp_set_state, kretprobe inet_csk_accept",
    }
}

/// `struct sock` offsets from BTF: those of `sock_common`, and `sk_protocol` when BTF has a
/// layout of it the programs can read (else [`FIELD_ABSENT`]).
fn btf_sock_offsets(data: &[u8]) -> Result<TcpSockOffsets, String> {
    let t = crate::btf::Types::parse(data)?;
    let m = |name: &str| t.member_offset("sock_common", name);
    let (protocol, protocol_mask) = t
        .member_bits("sock", "sk_protocol")
        .map_or((FIELD_ABSENT, 0), protocol_field);
    let off = TcpSockOffsets {
        daddr: m("skc_daddr")?,
        rcv_saddr: m("skc_rcv_saddr")?,
        dport: m("skc_dport")?,
        num: m("skc_num")?,
        family: m("skc_family")?,
        state: m("skc_state")?,
        v6_daddr: m("skc_v6_daddr")?,
        v6_rcv_saddr: m("skc_v6_rcv_saddr")?,
        protocol,
        protocol_mask,
        ready: TCP_SOCK_READY,
    };
    let d = TcpSockOffsets::DEFAULT;
    let head_as_default = (off.daddr, off.rcv_saddr, off.dport, off.num, off.family)
        == (d.daddr, d.rcv_saddr, d.dport, d.num, d.family);
    Ok(TcpSockOffsets {
        ready: if head_as_default {
            TCP_SOCK_READY_DEFAULT
        } else {
            TCP_SOCK_READY
        },
        ..off
    })
}

/// Where the programs read `sk_protocol` (byte offset, mask for a u16 read there): an 8-bit
/// bitfield on a byte boundary (before 5.6) or a u16 (since); `FIELD_ABSENT` for any other
/// layout.
fn protocol_field(p: crate::btf::MemberBits) -> (u32, u32) {
    match (p.bit_offset % 8, p.bits) {
        (0, 8) => (p.bit_offset / 8, 0xff),
        (0, 16) => (p.bit_offset / 8, 0xffff),
        _ => (FIELD_ABSENT, 0),
    }
}

/// The `struct sock` offsets the raw tracepoint and kprobe paths read, worked out from the BTF
/// once at start-up (the raw BTF, several MiB, is not kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockLayout {
    /// For the kprobe path: from BTF when it names every field, else
    /// [`TcpSockOffsets::DEFAULT`].
    pub offsets: TcpSockOffsets,
    /// Where [`Self::offsets`] came from.
    pub origin: String,
    /// For the raw tracepoint, which needs `sk_protocol` (only BTF has it); `Err` says why
    /// there are none.
    pub raw: Result<TcpSockOffsets, String>,
}

impl SockLayout {
    #[must_use]
    pub fn from_btf(btf: Option<&[u8]>) -> Self {
        let parsed = btf.map(btf_sock_offsets);
        let (offsets, origin) = match &parsed {
            Some(Ok(o)) => (*o, "BTF".to_owned()),
            Some(Err(e)) => (
                TcpSockOffsets::DEFAULT,
                format!("the built-in table (BTF unusable: {e})"),
            ),
            None => (
                TcpSockOffsets::DEFAULT,
                "the built-in table (no BTF)".to_owned(),
            ),
        };
        let raw = match parsed {
            None => Err("the kernel has no BTF (give one with --btf-path)".to_owned()),
            Some(Err(e)) => Err(format!("BTF unusable: {e}")),
            Some(Ok(o)) if o.protocol == FIELD_ABSENT => {
                Err("BTF has no struct sock.sk_protocol of a known layout".to_owned())
            }
            Some(Ok(o)) => Ok(o),
        };
        Self {
            offsets,
            origin,
            raw,
        }
    }
}

const PROBE: &str = "tcp";

/// Connect duration buckets: 50 µs to 10 s in 1-2.5-5 steps.
pub const CONNECT_DURATION_BOUNDS: &[f64] = &[
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
];

/// Label values of the drop reasons, indexed like `TCP_LOST_*`.
fn lost_reasons(transport: Transport) -> [&'static str; TCP_LOST_REASONS as usize] {
    let mut r = [""; TCP_LOST_REASONS as usize];
    r[TCP_LOST_RINGBUF_FULL as usize] = transport.kernel_drop_reason();
    r[TCP_LOST_MAP_FULL as usize] = "map_full";
    r[TCP_LOST_READ_ERROR as usize] = "read_error";
    r
}

/// Builds the offsets map entry from the tracepoint's `format`. Every field but `family`
/// (added after 4.19) is required, at the size the program reads.
pub fn offsets(f: &Format) -> Result<TcpTpOffsets, ProbeError> {
    let need = |name: &str, size: u32| {
        f.offset(name, size).ok_or_else(|| ProbeError::Unsupported {
            probe: PROBE,
            reason: format!(
                "sock:inet_sock_set_state has no {size}-byte field `{name}` on this kernel"
            ),
        })
    };
    let parsed = TcpTpOffsets {
        skaddr: need("skaddr", 8)?,
        oldstate: need("oldstate", 4)?,
        newstate: need("newstate", 4)?,
        sport: need("sport", 2)?,
        dport: need("dport", 2)?,
        family: f.offset("family", 2).unwrap_or(FIELD_ABSENT),
        protocol: need("protocol", 2)?,
        saddr: need("saddr", 4)?,
        daddr: need("daddr", 4)?,
        saddr_v6: need("saddr_v6", 16)?,
        daddr_v6: need("daddr_v6", 16)?,
        ready: TCP_TP_READY,
    };
    let known = TcpTpOffsets {
        ready: TCP_TP_READY_KNOWN,
        ..parsed
    } == TcpTpOffsets::KNOWN;
    Ok(if known { TcpTpOffsets::KNOWN } else { parsed })
}

/// Why an event record could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {TCP_EVENT_SIZE}")]
    Size(usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// Decodes one event record (ring buffer or perf sample, which may carry trailing padding)
/// without trusting its length or contents.
pub fn decode(bytes: &[u8]) -> Result<TcpEvent, DecodeError> {
    if bytes.len() < TCP_EVENT_SIZE {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: TcpEvent is repr(C) plain data for which every bit pattern is valid, and the
    // slice holds at least size_of::<TcpEvent>() bytes; read_unaligned needs no alignment.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TcpEvent>()) };
    match ev.kind {
        TCP_EVENT_CONNECT_ESTABLISHED
        | TCP_EVENT_CONNECT_FAILED
        | TCP_EVENT_ACCEPT
        | TCP_EVENT_LISTENER_GONE => Ok(ev),
        k => Err(DecodeError::Kind(k)),
    }
}

/// A task name from the kernel's NUL-padded `comm`; `[unknown]` when empty.
#[must_use]
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    if end == 0 {
        return "[unknown]".into();
    }
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Remote address of an event as text (for logs and, later, traces).
#[must_use]
pub fn peer(ev: &TcpEvent) -> std::net::SocketAddr {
    let ip = if ev.family == AF_INET6 {
        std::net::IpAddr::from(ev.daddr)
    } else {
        std::net::IpAddr::from([ev.daddr[0], ev.daddr[1], ev.daddr[2], ev.daddr[3]])
    };
    std::net::SocketAddr::new(ip, ev.dport)
}

/// Receives every decoded connect outcome, e.g. the OTLP span exporter, so the probe does not
/// depend on it. Called inline in the drain loop: implementations must not block (queue with
/// `try_send` and count what does not fit).
pub trait ConnectSink: Send + Sync {
    /// One connect attempt finished (established or failed).
    fn connect(&self, ev: &TcpEvent);
}

/// The TCP probe's metric families.
#[derive(Debug)]
pub struct TcpMetrics {
    pub connects: Arc<CounterVec>,
    pub duration: Arc<HistogramVec>,
    pub accepts: Arc<CounterVec>,
}

impl TcpMetrics {
    /// Registers the families in `snapshot`.
    pub fn register(snapshot: &Snapshot) -> Self {
        Self {
            connects: snapshot.counter(Desc {
                name: "tanzhen_tcp_connects",
                help: "TCP connect attempts by outcome (established or failed).",
                labels: &[
                    "comm",
                    "namespace",
                    "pod",
                    "container",
                    "workload",
                    "outcome",
                ],
            }),
            duration: snapshot.histogram(
                Desc {
                    name: "tanzhen_tcp_connect_duration_seconds",
                    help: "Time from SYN_SENT to ESTABLISHED of successful TCP connects.",
                    labels: &["comm", "namespace", "pod", "container", "workload"],
                },
                CONNECT_DURATION_BOUNDS,
            ),
            accepts: snapshot.counter(Desc {
                name: "tanzhen_tcp_accepts",
                help: "TCP connections accepted (SYN_RECV to ESTABLISHED), by listening process.",
                labels: &["comm", "namespace", "pod", "container", "workload"],
            }),
        }
    }

    /// Counts one decoded event of a process whose workload labels are `w`.
    pub fn record(&self, ev: &TcpEvent, w: &WorkloadLabels) {
        let comm = comm_str(&ev.comm);
        let [ns, pod, container, workload] = w.values();
        let labels = [comm.as_str(), ns, pod, container, workload];
        let with = |outcome| [comm.as_str(), ns, pod, container, workload, outcome];
        match ev.kind {
            TCP_EVENT_CONNECT_ESTABLISHED => {
                self.connects.inc_by(&with("established"), 1);
                #[expect(clippy::cast_precision_loss, reason = "ns fit f64 well below 2^53")]
                self.duration.observe(&labels, ev.latency_ns as f64 / 1e9);
            }
            TCP_EVENT_CONNECT_FAILED => self.connects.inc_by(&with("failed"), 1),
            TCP_EVENT_ACCEPT => self.accepts.inc_by(&labels, 1),
            _ => {}
        }
    }

    /// Counts `n` accepts of a listener.
    fn add_accepts(&self, comm: &[u8], w: &WorkloadLabels, n: u64) {
        let comm = comm_str(comm);
        let [ns, pod, container, workload] = w.values();
        self.accepts
            .inc_by(&[comm.as_str(), ns, pod, container, workload], n);
    }
}

/// The accepts the tracepoint programs count in the kernel ([`TcpListener::accepts`] per
/// listener, [`TCP_ACCEPTS_UNKNOWN`] for ports with no entry), turned into
/// `tanzhen_tcp_accepts_total`: every second the counts are read and what grew since the last
/// read is added; a listener entry the program removes or replaces sends its final count in a
/// [`TCP_EVENT_LISTENER_GONE`] event, which adds what was not read yet.
#[derive(Debug, Default)]
struct AcceptCounts {
    /// (port, skaddr) -> accepts already added, and reads since the entry was last in the map.
    read: std::collections::HashMap<(u16, u64), (u64, u8)>,
    unknown_read: u64,
}

impl AcceptCounts {
    /// Reads after which an entry gone from the map without its event (the event was lost with
    /// a full ring, counted there) is forgotten: the event drains within 100 ms of removal.
    const FORGET_AFTER: u8 = 3;

    fn read_maps(
        &mut self,
        listeners: &HashMap<MapData, u32, TcpListener>,
        unknown: &PerCpuArray<MapData, u64>,
        metrics: &TcpMetrics,
        meta: &Metadata,
    ) {
        for v in self.read.values_mut() {
            v.1 = v.1.saturating_add(1);
        }
        for item in listeners.iter() {
            let Ok((port, l)) = item else {
                // The entry went away between listing its key and reading it.
                continue;
            };
            let port = u16::try_from(port).unwrap_or(u16::MAX);
            let entry = self.read.entry((port, l.skaddr)).or_insert((0, 0));
            entry.1 = 0;
            if l.accepts > entry.0 {
                metrics.add_accepts(
                    &l.comm,
                    &meta.labels(l.tgid, l.cgroup_id),
                    l.accepts - entry.0,
                );
                entry.0 = l.accepts;
            }
        }
        self.read.retain(|_, v| v.1 < Self::FORGET_AFTER);
        if let Ok(per_cpu) = unknown.get(&0, 0) {
            let total: u64 = per_cpu.iter().copied().sum();
            if total > self.unknown_read {
                metrics.add_accepts(&[], &meta.labels(0, 0), total - self.unknown_read);
                self.unknown_read = total;
            }
        }
    }

    /// A [`TCP_EVENT_LISTENER_GONE`] event: adds the final count's unread part.
    fn gone(&mut self, ev: &TcpEvent, metrics: &TcpMetrics, meta: &Metadata) {
        let read = self
            .read
            .remove(&(ev.sport, ev.ts_ns))
            .map_or(0, |(n, _)| n);
        if ev.latency_ns > read {
            metrics.add_accepts(
                &ev.comm,
                &meta.labels(ev.tgid, ev.cgroup_id),
                ev.latency_ns - read,
            );
        }
    }
}

/// Shared counters of drops, owned by the agent.
#[derive(Clone, Debug)]
pub struct LossCounters {
    pub events_lost: Arc<CounterVec>,
    pub decode_errors: Arc<CounterVec>,
    /// Per (probe, reason): what earlier instances of the probe counted, added to the kernel's
    /// totals once the probe was detached and attached again (its new maps start at 0).
    base: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), u64>>>,
}

impl LossCounters {
    /// Registers `tanzhen_events_lost_total` and `tanzhen_decode_errors_total` in `snapshot`;
    /// they stay exported (at 0) for as long as the agent runs: no TTL.
    pub fn register(snapshot: &Snapshot) -> Self {
        let loss = Self {
            events_lost: snapshot.counter(Desc {
                name: "tanzhen_events_lost",
                help: "Events dropped in the kernel, by probe and reason (ringbuf_full, perf_lost, perf_output_error, map_full, read_error; recursion: runs the kernel skipped because another BPF program was active on the CPU).",
                labels: &["probe", "reason"],
            }),
            decode_errors: snapshot.counter(Desc {
                name: "tanzhen_decode_errors",
                help: "Kernel records userspace could not decode (short or unknown), by probe.",
                labels: &["probe"],
            }),
            base: Arc::default(),
        };
        loss.events_lost.persistent();
        loss.decode_errors.persistent();
        loss
    }

    /// Called before `probe` attaches again in the same run: its kernel totals restart at 0, so
    /// the totals exported so far become the base they add to.
    pub fn rebase(&self, probe: &str) {
        let Ok(mut base) = self.base.lock() else {
            return;
        };
        for (labels, v) in self.events_lost.snapshot() {
            if let [p, reason] = labels.as_slice()
                && p == probe
            {
                base.insert((p.clone(), reason.clone()), v);
            }
        }
    }

    /// Sets `tanzhen_events_lost_total{probe,reason}` from a kernel total (plus the base of
    /// earlier instances of the probe).
    pub fn set_kernel_total(&self, probe: &str, reason: &str, total: u64) {
        let base = self.base.lock().map_or(0, |b| {
            b.get(&(probe.to_owned(), reason.to_owned()))
                .copied()
                .unwrap_or(0)
        });
        self.events_lost
            .set_total(&[probe, reason], base.saturating_add(total));
    }

    /// The perf buffers' own drop count (PERF_RECORD_LOST samples) as
    /// `tanzhen_events_lost_total{probe,reason="perf_lost"}`.
    pub fn read_perf(&self, probe: &str, transport: Transport, lost: &AtomicU64) {
        if transport == Transport::Perf {
            self.set_kernel_total(probe, "perf_lost", lost.load(Ordering::Relaxed));
        }
    }

    /// Copies a probe's per-CPU kernel drop counters (slot `i` = `reasons[i]`) into
    /// `tanzhen_events_lost_total{probe,reason}`.
    pub fn read_kernel(&self, probe: &str, lost: &PerCpuArray<MapData, u64>, reasons: &[&str]) {
        for (i, reason) in reasons.iter().enumerate() {
            let Ok(index) = u32::try_from(i) else { break };
            match lost.get(&index, 0) {
                Ok(per_cpu) => self.set_kernel_total(probe, reason, per_cpu.iter().sum()),
                Err(e) => log::debug!("{probe}: reading lost counter {i}: {e}"),
            }
        }
    }
}

/// The attached TCP probe: its event reader and drop counters, ready to drain.
pub struct TcpProbe {
    events: EventReader,
    transport: Transport,
    lost: PerCpuArray<MapData, u64>,
    listeners: HashMap<MapData, u32, TcpListener>,
    accepts_unknown: PerCpuArray<MapData, u64>,
    metrics: TcpMetrics,
    loss: LossCounters,
    sink: Option<Arc<dyn ConnectSink>>,
    meta: Arc<Metadata>,
}

impl TcpProbe {
    /// Writes the offsets, loads and attaches the programs of `attach` (`sock`: the struct
    /// offsets of the raw tracepoint and kprobe paths), and takes the maps it drains.
    #[expect(clippy::too_many_arguments, reason = "one call site, all distinct")]
    pub fn attach(
        ebpf: &mut Ebpf,
        tracefs: &Path,
        attach: TcpAttach,
        sock: &SockLayout,
        transport: Transport,
        snapshot: &Snapshot,
        loss: LossCounters,
        sink: Option<Arc<dyn ConnectSink>>,
        meta: Arc<Metadata>,
    ) -> Result<Self, ProbeError> {
        // Readers first: a perf event array has no buffer for a CPU until it is opened, and
        // events sent before would fail (counted as perf_output_error).
        let events = EventReader::open(ebpf, TCP_EVENTS, transport)?;
        match attach {
            TcpAttach::RawTracepoint => attach_raw_tracepoint(ebpf, sock)?,
            TcpAttach::Tracepoint => attach_tracepoint(ebpf, tracefs)?,
            TcpAttach::Kprobe => attach_kprobes(ebpf, tracefs, sock)?,
        }
        let lost = take(ebpf, TCP_LOST)?;
        let listeners = take(ebpf, TCP_LISTENERS)?;
        let accepts_unknown = take(ebpf, TCP_ACCEPTS_UNKNOWN)?;
        Ok(Self {
            events,
            transport,
            lost,
            listeners,
            accepts_unknown,
            metrics: TcpMetrics::register(snapshot),
            loss,
            sink,
            meta,
        })
    }

    /// Drains the events until `stop` turns true, then drains what is left and returns.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), ProbeError> {
        let Self {
            mut events,
            transport,
            lost,
            listeners,
            accepts_unknown,
            metrics,
            loss,
            sink,
            meta,
        } = self;
        let sink = sink.as_deref();
        let perf_lost = events.lost();
        let reasons = lost_reasons(transport);
        let read_lost = || {
            loss.read_kernel(PROBE, &lost, &reasons);
            loss.read_perf(PROBE, transport, &perf_lost);
        };
        read_lost();
        let accepts = std::sync::Mutex::new(AcceptCounts::default());
        let accepts = &accepts;
        let read_accepts = || {
            accepts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .read_maps(&listeners, &accepts_unknown, &metrics, &meta);
        };
        let mut on_record = |bytes: &[u8]| {
            handle(bytes, &metrics, &loss, sink, &meta, &mut |ev| {
                accepts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .gone(ev, &metrics, &meta);
            });
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                res = events.read(&mut on_record) => res?,
                _ = tick.tick() => {
                    read_lost();
                    read_accepts();
                }
                _ = stop.changed() => break,
            }
        }
        // Flush: events submitted before detach are still in the buffers.
        events.drain(&mut on_record);
        read_lost();
        read_accepts();
        Ok(())
    }
}

/// Loads and attaches the tracepoint program, with the record layout from tracefs.
fn attach_tracepoint(ebpf: &mut Ebpf, tracefs: &Path) -> Result<(), ProbeError> {
    let format = kernel::tracepoint_format(tracefs, "sock", "inet_sock_set_state")?;
    let mut off = offsets(&format)?;
    // Testing only: take the path of kernels with another record layout (the e2e suite's
    // old-kernel pass sets it).
    if super::read_by_offset_forced() {
        off.ready = TCP_TP_READY;
    }
    log::debug!(
        "sock:inet_sock_set_state fields read {}",
        if off.ready == TCP_TP_READY_KNOWN {
            "as plain loads (known layout)"
        } else {
            "through bpf_probe_read at the tracefs offsets"
        }
    );
    if off.family == FIELD_ABSENT {
        log::warn!(
            "sock:inet_sock_set_state has no `family` field: IPv6 connects are not told apart yet"
        );
    }
    let mut offsets_map: Array<_, TcpTpOffsets> = Array::try_from(
        ebpf.map_mut(TCP_TP_OFFSETS)
            .ok_or(ProbeError::MissingMap(TCP_TP_OFFSETS))?,
    )?;
    offsets_map.set(0, off, 0)?;
    attach_seeded(ebpf, |ebpf| {
        let prog: &mut TracePoint = program(ebpf, PROGRAM)?;
        prog.load()?;
        prog.attach("sock", "inet_sock_set_state")?;
        Ok(())
    })
}

/// Runs `attach` between two seedings of the listeners that predate us: once before, so no
/// accept completes against an unknown listener once the program runs, and once after, for
/// sockets that started listening in between (NOEXIST keeps what the program recorded itself).
fn attach_seeded(
    ebpf: &mut Ebpf,
    attach: impl FnOnce(&mut Ebpf) -> Result<(), ProbeError>,
) -> Result<(), ProbeError> {
    seed_listeners(ebpf)?;
    attach(ebpf)?;
    seed_listeners(ebpf)
}

/// Loads and attaches the raw tracepoint program, with `struct sock` offsets from BTF.
fn attach_raw_tracepoint(ebpf: &mut Ebpf, sock: &SockLayout) -> Result<(), ProbeError> {
    let off = sock.raw.clone().map_err(|why| ProbeError::Unsupported {
        probe: PROBE,
        reason: format!(
            "the raw tracepoint needs struct sock offsets: {why}; use --tcp-attach tracepoint"
        ),
    })?;
    log::debug!("tcp: raw tracepoint, struct sock offsets from BTF: {off:?}");
    write_sock_offsets(ebpf, off)?;
    attach_seeded(ebpf, |ebpf| {
        let prog: &mut RawTracePoint = program(ebpf, RAW_PROGRAM)?;
        prog.load()?;
        prog.attach("inet_sock_set_state")?;
        Ok(())
    })
}

/// Hands `struct sock` offsets to the raw tracepoint and kprobe programs (under
/// [`super::read_by_offset_forced`], as if the layout were another one: field by field).
fn write_sock_offsets(ebpf: &mut Ebpf, mut off: TcpSockOffsets) -> Result<(), ProbeError> {
    if super::read_by_offset_forced() {
        off.ready = TCP_SOCK_READY;
    }
    let mut map: Array<_, TcpSockOffsets> = Array::try_from(
        ebpf.map_mut(TCP_SOCK_OFFSETS)
            .ok_or(ProbeError::MissingMap(TCP_SOCK_OFFSETS))?,
    )?;
    map.set(0, off, 0)?;
    Ok(())
}

/// Loads and attaches the kprobe programs, with `struct sock_common` offsets from BTF or the
/// built-in table. Fails with the reason when this kernel cannot attach kprobes.
fn attach_kprobes(ebpf: &mut Ebpf, tracefs: &Path, sock: &SockLayout) -> Result<(), ProbeError> {
    crate::features::kprobes(Some(tracefs)).map_err(|why| ProbeError::Unsupported {
        probe: PROBE,
        reason: format!("kprobes are not available ({why}); use --tcp-attach tracepoint"),
    })?;
    log::info!(
        "tcp: kprobe path, struct sock_common offsets from {}: {:?}",
        sock.origin,
        sock.offsets
    );
    write_sock_offsets(ebpf, sock.offsets)?;
    for &(name, function, required) in KPROBES {
        let prog: &mut KProbe = program(ebpf, name)?;
        prog.load()?;
        match prog.attach(function, 0) {
            Ok(_) => {}
            Err(e) if !required => {
                log::warn!("tcp: kprobe on {function} failed ({e}): those connects are not seen");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Records the processes already listening (see [`listeners`]) in `TCP_LISTENERS`.
fn seed_listeners(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    const BPF_NOEXIST: u64 = 1;
    let mut map: HashMap<_, u32, TcpListener> = HashMap::try_from(
        ebpf.map_mut(TCP_LISTENERS)
            .ok_or(ProbeError::MissingMap(TCP_LISTENERS))?,
    )?;
    let found = listeners::scan();
    let (mut seeded, mut known) = (0usize, 0usize);
    for l in &found {
        let mut comm = [0u8; COMM_LEN];
        let n = l.comm.len().min(COMM_LEN - 1);
        comm[..n].copy_from_slice(&l.comm.as_bytes()[..n]);
        // skaddr 0: the program's LISTEN -> CLOSE drops such an entry for any socket on the port.
        let v = TcpListener {
            skaddr: 0,
            cgroup_id: 0,
            tgid: l.tgid,
            _pad: 0,
            comm,
            accepts: 0,
        };
        match map.insert(u32::from(l.port), v, BPF_NOEXIST) {
            Ok(()) => seeded += 1,
            // Already recorded (by the program, or by the scan before attach).
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                known += 1;
            }
            Err(e) => log::debug!("tcp: seeding listener on port {}: {e}", l.port),
        }
    }
    log::debug!(
        "tcp: {} listening sockets in /proc: {seeded} seeded, {known} already known",
        found.len()
    );
    Ok(())
}

/// Decodes and records one event record; `gone` takes [`TCP_EVENT_LISTENER_GONE`] events.
fn handle(
    bytes: &[u8],
    metrics: &TcpMetrics,
    loss: &LossCounters,
    sink: Option<&dyn ConnectSink>,
    meta: &Metadata,
    gone: &mut dyn FnMut(&TcpEvent),
) {
    match decode(bytes) {
        Ok(ev) if ev.kind == TCP_EVENT_LISTENER_GONE => gone(&ev),
        Ok(ev) => {
            log::trace!(
                "tcp event kind={} comm={} peer={}",
                ev.kind,
                comm_str(&ev.comm),
                peer(&ev)
            );
            metrics.record(&ev, &meta.labels(ev.tgid, ev.cgroup_id));
            if let Some(sink) = sink
                && ev.kind != TCP_EVENT_ACCEPT
            {
                sink.connect(&ev);
            }
        }
        Err(e) => {
            log::debug!("tcp: undecodable record: {e}");
            loss.decode_errors.inc_by(&[PROBE], 1);
        }
    }
}

/// A well-formed IPv4 event from 127.0.0.1:40000 to `daddr`:80, tgid 42, for unit tests here
/// and in the exporters.
#[cfg(test)]
pub(crate) fn test_event(
    kind: u32,
    comm: &[u8],
    ts_ns: u64,
    latency_ns: u64,
    daddr: [u8; 4],
) -> TcpEvent {
    let mut c = [0u8; 16];
    c[..comm.len()].copy_from_slice(comm);
    let mut d = [0u8; 16];
    d[..4].copy_from_slice(&daddr);
    TcpEvent {
        ts_ns,
        latency_ns,
        cgroup_id: 0,
        kind,
        tgid: 42,
        pid: 43,
        family: agent_common::tcp::AF_INET,
        sport: 40000,
        dport: 80,
        _pad: [0; 6],
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: d,
        comm: c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32) -> TcpEvent {
        test_event(kind, b"tzconn", 1, 120_000, [10, 1, 2, 3])
    }

    fn bytes(ev: &TcpEvent) -> Vec<u8> {
        // SAFETY: TcpEvent is repr(C) plain data without implicit padding.
        unsafe { std::slice::from_raw_parts((ev as *const TcpEvent).cast::<u8>(), TCP_EVENT_SIZE) }
            .to_vec()
    }

    #[test]
    fn decodes_a_full_record() {
        let ev = decode(&bytes(&event(TCP_EVENT_CONNECT_ESTABLISHED))).unwrap();
        assert_eq!(ev.tgid, 42);
        assert_eq!(comm_str(&ev.comm), "tzconn");
        assert_eq!(peer(&ev), "10.1.2.3:80".parse().unwrap());
    }

    #[test]
    fn rejects_truncated_and_garbage_records() {
        let b = bytes(&event(TCP_EVENT_CONNECT_FAILED));
        for len in [0, 1, 8, TCP_EVENT_SIZE - 1] {
            assert_eq!(decode(&b[..len]).unwrap_err(), DecodeError::Size(len));
        }
        assert_eq!(
            decode(&bytes(&event(99))).unwrap_err(),
            DecodeError::Kind(99)
        );
        assert!(matches!(
            decode(&[0xff; TCP_EVENT_SIZE]),
            Err(DecodeError::Kind(_))
        ));
        // Records longer than the struct (a newer kernel side) still decode.
        let mut long = b.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(decode(&long).is_ok());
    }

    #[test]
    fn comm_handles_padding_and_invalid_utf8() {
        assert_eq!(comm_str(&[0; 16]), "[unknown]");
        assert_eq!(comm_str(b"abc\0\0\0"), "abc");
        assert_eq!(comm_str(&[b'a'; 16]), "a".repeat(16));
        assert_eq!(comm_str(&[0xff, b'x', 0]), "\u{fffd}x");
    }

    #[test]
    fn records_outcomes_and_latency() {
        let s = Snapshot::default();
        let m = TcpMetrics::register(&s);
        let w = WorkloadLabels {
            namespace: "shop".into(),
            pod: "web-1".into(),
            container: "app".into(),
            workload: "deployment/web".into(),
        };
        m.record(&event(TCP_EVENT_CONNECT_ESTABLISHED), &w);
        m.record(&event(TCP_EVENT_CONNECT_FAILED), &w);
        m.record(&event(TCP_EVENT_ACCEPT), &WorkloadLabels::default());
        let l = ["tzconn", "shop", "web-1", "app", "deployment/web"];
        assert_eq!(m.connects.get(&[&l[..], &["established"]].concat()), 1);
        assert_eq!(m.connects.get(&[&l[..], &["failed"]].concat()), 1);
        assert_eq!(m.accepts.get(&["tzconn", "", "", "", ""]), 1);
        let (_, h) = m.duration.snapshot().pop().unwrap();
        assert_eq!(h.count, 1);
        // 120 µs falls in the (100 µs, 250 µs] bucket.
        assert_eq!(h.counts[2], 1);
    }

    #[test]
    fn sock_offsets_from_btf_match_the_built_in_table() {
        let none = SockLayout::from_btf(None);
        assert_eq!(
            (none.offsets, none.origin.as_str()),
            (TcpSockOffsets::DEFAULT, "the built-in table (no BTF)")
        );
        assert!(none.raw.unwrap_err().contains("no BTF"));
        let garbage = SockLayout::from_btf(Some(b"garbage"));
        assert_eq!(garbage.offsets, TcpSockOffsets::DEFAULT);
        assert!(
            garbage.origin.contains("BTF unusable"),
            "{}",
            garbage.origin
        );
        assert!(garbage.raw.unwrap_err().contains("BTF unusable"));
        // This machine's kernel (6.18) lays struct sock_common out as the table says, and BTF
        // adds the u16 sk_protocol the raw tracepoint needs.
        if let Ok(data) = std::fs::read(crate::compat::KERNEL_BTF) {
            let l = SockLayout::from_btf(Some(&data));
            assert_eq!(l.origin, "BTF");
            assert_eq!(
                TcpSockOffsets {
                    protocol: FIELD_ABSENT,
                    protocol_mask: 0,
                    ..l.offsets
                },
                TcpSockOffsets::DEFAULT
            );
            assert_eq!(l.offsets.protocol_mask, 0xffff);
            assert_eq!(l.raw, Ok(l.offsets));
        }
    }

    #[test]
    fn sk_protocol_layouts() {
        use crate::btf::MemberBits;
        let f = |bit_offset, bits| protocol_field(MemberBits { bit_offset, bits });
        // 5.6+: u16 sk_protocol.
        assert_eq!(f(4160, 16), (520, 0xffff));
        // 5.2-5.5: an 8-bit bitfield after 8 bits of flags.
        assert_eq!(f(4104, 8), (513, 0xff));
        // Anything else is not read.
        assert_eq!(f(4105, 8), (FIELD_ABSENT, 0));
        assert_eq!(f(4104, 32), (FIELD_ABSENT, 0));
    }

    #[test]
    fn offsets_need_every_field_but_family() {
        let text = "field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
field:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
field:int newstate;\toffset:20;\tsize:4;\tsigned:1;
field:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
field:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
field:__u16 protocol;\toffset:28;\tsize:2;\tsigned:0;
field:__u8 saddr[4];\toffset:30;\tsize:4;\tsigned:0;
field:__u8 daddr[4];\toffset:34;\tsize:4;\tsigned:0;
field:__u8 saddr_v6[16];\toffset:38;\tsize:16;\tsigned:0;
field:__u8 daddr_v6[16];\toffset:54;\tsize:16;\tsigned:0;";
        let off = offsets(&kernel::parse_format(text).unwrap()).unwrap();
        assert_eq!(off.family, FIELD_ABSENT);
        assert_eq!(off.daddr_v6, 54);
        assert_eq!(
            off.ready, TCP_TP_READY,
            "an older layout: read through offsets"
        );
        let without_sport = text.replace("sport", "xport");
        let e = offsets(&kernel::parse_format(&without_sport).unwrap()).unwrap_err();
        assert!(e.to_string().contains("`sport`"), "{e}");
    }

    /// Debian's 5.10 kernel (committed sample) and this machine's kernel have the known layout,
    /// which the program reads with plain loads.
    #[test]
    fn known_layout_is_recognised() {
        let sample = include_str!("testdata/5.10/events/sock/inet_sock_set_state/format");
        let off = offsets(&kernel::parse_format(sample).unwrap()).unwrap();
        assert_eq!(off, TcpTpOffsets::KNOWN);
        let here =
            std::fs::read_to_string("/sys/kernel/tracing/events/sock/inet_sock_set_state/format")
                .or_else(|_| {
                    std::fs::read_to_string(
                        "/sys/kernel/debug/tracing/events/sock/inet_sock_set_state/format",
                    )
                });
        if let Ok(text) = here {
            let off = offsets(&kernel::parse_format(&text).unwrap()).unwrap();
            assert_eq!(
                off.ready, TCP_TP_READY_KNOWN,
                "this kernel's layout:\n{text}"
            );
        }
        // One field elsewhere: back to offsets.
        let moved = sample.replace("offset:24;", "offset:25;");
        let off = offsets(&kernel::parse_format(&moved).unwrap()).unwrap();
        assert_eq!(off.ready, TCP_TP_READY);
    }
}
