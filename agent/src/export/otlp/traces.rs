//! OTLP traces: one CLIENT span per TCP connect attempt, sampled by trace id, rate-limited,
//! queued (bounded) and exported in batches with backoff while the collector fails.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use agent_common::tcp::{
    AF_INET6, TCP_EVENT_CONNECT_ESTABLISHED, TCP_EVENT_CONNECT_FAILED, TcpEvent,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status},
};
use tokio::sync::{mpsc, watch};

use super::{
    Backoff, ExportError, FINAL_FLUSH, OtlpCounters, Transport, kv, kv_str, scope, unix_nanos,
};
use crate::{
    probe::tcp::{ConnectSink, comm_str, peer},
    snapshot::CounterVec,
};

/// Most spans per export request.
const SPAN_BATCH: usize = 512;

/// Spans kept while the collector is unreachable; beyond that they are dropped and counted.
const SPAN_QUEUE: usize = 8192;

/// Capacity of the channel from the probe's drain loop to the trace exporter.
const SPAN_CHANNEL: usize = 4096;

/// Spans are flushed at least this often.
const SPAN_FLUSH: Duration = Duration::from_secs(1);

/// Spans from TCP connect events: samples, rate-limits and hands them to the trace exporter
/// without ever blocking the probe.
#[derive(Debug)]
pub struct SpanSink {
    tx: mpsc::Sender<Span>,
    /// A span is kept when the low 64 bits of its trace id are below this.
    threshold: u64,
    sample_all: bool,
    bucket: Mutex<TokenBucket>,
    dropped: Arc<CounterVec>,
    containers: ContainerIds,
    /// The agent's own connects (to the collector) make no spans: they would feed back.
    own_tgid: u32,
}

/// Allows `rate` items per second with bursts of `rate`.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    if usize::try_from(n).ok() != Some(N) {
        // Never seen on Linux >= 3.17 for <= 256 bytes; fall back to time-based bits.
        let t = unix_nanos(SystemTime::now()).to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % 8] ^ u8::try_from(i).unwrap_or(0);
        }
    }
    b
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns: added to a `bpf_ktime_get_ns` timestamp it
/// gives Unix time.
fn monotonic_to_unix_offset() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills ts.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let mono = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
    let real = i128::from(unix_nanos(SystemTime::now()));
    real - mono
}

/// Builds the span of one connect outcome; `None` for other events.
#[must_use]
pub fn connect_span(
    ev: &TcpEvent,
    clock_offset: i128,
    trace_id: [u8; 16],
    span_id: [u8; 8],
) -> Option<Span> {
    let failed = match ev.kind {
        TCP_EVENT_CONNECT_ESTABLISHED => false,
        TCP_EVENT_CONNECT_FAILED => true,
        _ => return None,
    };
    let end = i128::from(ev.ts_ns) + clock_offset;
    let start = end - i128::from(ev.latency_ns);
    let ns = |t: i128| u64::try_from(t.max(0)).unwrap_or(0);
    let peer = peer(ev);
    let mut attributes = vec![
        kv_str("network.transport", "tcp"),
        kv_str(
            "network.type",
            if ev.family == AF_INET6 {
                "ipv6"
            } else {
                "ipv4"
            },
        ),
        kv_str("network.peer.address", peer.ip().to_string()),
        kv(
            "network.peer.port",
            any_value::Value::IntValue(i64::from(peer.port())),
        ),
        kv_str("server.address", peer.ip().to_string()),
        kv(
            "server.port",
            any_value::Value::IntValue(i64::from(peer.port())),
        ),
        kv(
            "process.pid",
            any_value::Value::IntValue(i64::from(ev.tgid)),
        ),
        kv_str("process.executable.name", comm_str(&ev.comm)),
    ];
    if failed {
        attributes.push(kv_str("error.type", "connect_failed"));
    }
    Some(Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        name: "tcp connect".into(),
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: ns(start),
        end_time_unix_nano: ns(end),
        attributes,
        status: Some(if failed {
            Status {
                code: status::StatusCode::Error as i32,
                message: "TCP connect failed (refused, reset or timed out)".into(),
            }
        } else {
            Status::default()
        }),
        ..Default::default()
    })
}

impl SpanSink {
    pub(super) fn new(
        ratio: f64,
        max_per_second: u32,
        dropped: Arc<CounterVec>,
    ) -> (Self, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(SPAN_CHANNEL);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "ratio is in [0, 1]; the threshold saturates at u64::MAX"
        )]
        let threshold = (ratio * u64::MAX as f64) as u64;
        let sink = Self {
            tx,
            threshold,
            sample_all: ratio >= 1.0,
            bucket: Mutex::new(TokenBucket::new(max_per_second)),
            dropped,
            containers: ContainerIds::default(),
            own_tgid: std::process::id(),
        };
        (sink, rx)
    }
}

impl ConnectSink for SpanSink {
    fn connect(&self, ev: &TcpEvent) {
        if ev.tgid == self.own_tgid {
            return;
        }
        let ids: [u8; 24] = random_bytes();
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        trace_id.copy_from_slice(&ids[..16]);
        span_id.copy_from_slice(&ids[16..]);
        // TraceIdRatioBased: the low 8 bytes of the trace id against ratio * 2^64.
        let low = u64::from_be_bytes(trace_id_low(&trace_id));
        if !self.sample_all && low >= self.threshold {
            return;
        }
        let Some(mut span) = connect_span(ev, monotonic_to_unix_offset(), trace_id, span_id) else {
            return;
        };
        let allowed = self
            .bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(Instant::now());
        if !allowed {
            self.dropped.inc_by(&["traces"], 1);
            return;
        }
        // Only for spans that will be sent (at most --trace-max-spans-per-second /proc reads).
        if let Some(id) = self.containers.lookup(ev.cgroup_id, ev.tgid) {
            span.attributes.push(kv_str("container.id", id));
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc_by(&["traces"], 1);
        }
    }
}

/// Container ids by (cgroup id, tgid), read from `/proc/<tgid>/cgroup` on a miss. The tgid is
/// part of the key because with cgroup v1 (4.19-era distributions) every process sits in the
/// root v2 cgroup, so the cgroup id alone tells nothing. Bounded: cleared when full. (A
/// stop-gap until the metadata module owns process and container metadata.)
#[derive(Debug, Default)]
struct ContainerIds(Mutex<std::collections::HashMap<(u64, u32), Option<String>>>);

/// Entries kept in [`ContainerIds`].
const CONTAINER_CACHE: usize = 4096;

impl ContainerIds {
    fn lookup(&self, cgroup_id: u64, tgid: u32) -> Option<String> {
        if tgid == 0 {
            return None;
        }
        if let Some(hit) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(cgroup_id, tgid))
        {
            return hit.clone();
        }
        // The process may be gone already (short-lived clients): then nothing is cached.
        let text = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
        let id = container_id(&text);
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CONTAINER_CACHE {
            cache.clear();
        }
        cache.insert((cgroup_id, tgid), id.clone());
        id
    }
}

/// The container id in a `/proc/<pid>/cgroup` text (cgroup v1 or v2; docker, containerd,
/// cri-o, podman: see [`crate::metadata::cgroup`]).
#[must_use]
pub fn container_id(cgroup: &str) -> Option<String> {
    crate::metadata::cgroup::parse_proc_cgroup(cgroup)
        .container
        .map(|(_, id)| id)
}

fn trace_id_low(trace_id: &[u8; 16]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&trace_id[8..]);
    b
}

fn traces_request(resource: &Resource, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Queues spans (bounded), batches them and exports with backoff while the collector fails.
pub(super) async fn run_traces(
    transport: Transport,
    mut rx: mpsc::Receiver<Span>,
    resource: Resource,
    interval: Duration,
    counters: OtlpCounters,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: VecDeque<Span> = VecDeque::new();
    let mut backoff = Backoff::for_interval(SPAN_FLUSH.min(interval), interval);
    let mut next_try = Instant::now();
    let mut tick = tokio::time::interval(SPAN_FLUSH.min(interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let enqueue = |pending: &mut VecDeque<Span>, span: Span| {
        if pending.len() >= SPAN_QUEUE {
            counters.dropped.inc_by(&["traces"], 1);
        } else {
            pending.push_back(span);
        }
    };
    'run: loop {
        let full = tokio::select! {
            _ = stop.changed() => break,
            Some(span) = rx.recv() => {
                enqueue(&mut pending, span);
                pending.len() >= SPAN_BATCH
            }
            _ = tick.tick() => true,
        };
        if !full || pending.is_empty() || Instant::now() < next_try {
            continue;
        }
        while !pending.is_empty() {
            let n = pending.len().min(SPAN_BATCH);
            let batch: Vec<Span> = pending.iter().take(n).cloned().collect();
            let res = tokio::select! {
                res = transport.send_traces(traces_request(&resource, batch)) => res,
                _ = stop.changed() => break 'run,
            };
            match res {
                Ok(()) => {
                    pending.drain(..n);
                    counters.exports.inc_by(&["traces"], 1);
                    if backoff.failing() {
                        log::info!("OTLP trace export resumed");
                    }
                    backoff.succeed();
                }
                Err(e) if !e.retryable() => {
                    counters.failures.inc_by(&["traces"], 1);
                    counters.dropped.inc_by(&["traces"], n as u64);
                    pending.drain(..n);
                    log::warn!("OTLP trace export rejected, {n} spans dropped: {e}");
                }
                Err(e) => {
                    counters.failures.inc_by(&["traces"], 1);
                    let first = !backoff.failing();
                    let delay = backoff.fail();
                    next_try = Instant::now() + delay;
                    let msg = format!(
                        "OTLP trace export failed: {e}; {} spans queued, retrying in {delay:?}",
                        pending.len()
                    );
                    if first {
                        log::warn!("{msg} (further failures are logged at debug level)");
                    } else {
                        log::debug!("{msg}");
                    }
                    break;
                }
            }
        }
    }
    // Shutdown: take what the probes flushed, then one bounded attempt.
    while let Ok(span) = rx.try_recv() {
        enqueue(&mut pending, span);
    }
    let flush = async {
        while !pending.is_empty() {
            let n = pending.len().min(SPAN_BATCH);
            let batch: Vec<Span> = pending.drain(..n).collect();
            transport
                .send_traces(traces_request(&resource, batch))
                .await?;
            counters.exports.inc_by(&["traces"], 1);
        }
        Ok::<(), ExportError>(())
    };
    match tokio::time::timeout(FINAL_FLUSH, flush).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("OTLP final trace export failed: {e}"),
        Err(_) => log::warn!("OTLP final trace export timed out"),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    fn event(kind: u32) -> TcpEvent {
        crate::probe::tcp::test_event(kind, b"curl", 5_000_000_000, 1_000_000, [10, 0, 0, 1])
    }

    #[test]
    fn spans_carry_times_attributes_and_status() {
        let s = connect_span(&event(TCP_EVENT_CONNECT_FAILED), 1_000, [1; 16], [2; 8]).unwrap();
        assert_eq!(s.end_time_unix_nano, 5_000_001_000);
        assert_eq!(s.start_time_unix_nano, 4_999_001_000);
        assert_eq!(s.kind, span::SpanKind::Client as i32);
        assert_eq!(s.status.unwrap().code, status::StatusCode::Error as i32);
        let get = |k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key == k)
                .cloned()
                .unwrap()
                .value
                .unwrap()
                .value
                .unwrap()
        };
        assert_eq!(
            get("network.peer.address"),
            any_value::Value::StringValue("10.0.0.1".into())
        );
        assert_eq!(get("network.peer.port"), any_value::Value::IntValue(80));
        assert_eq!(
            get("network.type"),
            any_value::Value::StringValue("ipv4".into())
        );
        assert_eq!(get("process.pid"), any_value::Value::IntValue(42));
        let ok = connect_span(&event(TCP_EVENT_CONNECT_ESTABLISHED), 0, [1; 16], [2; 8]).unwrap();
        assert_eq!(ok.status.unwrap().code, status::StatusCode::Unset as i32);
        assert!(
            connect_span(
                &event(agent_common::tcp::TCP_EVENT_ACCEPT),
                0,
                [1; 16],
                [2; 8]
            )
            .is_none()
        );
    }

    #[test]
    fn sampling_and_rate_limit_count_drops() {
        let s = Snapshot::default();
        let counters = OtlpCounters::register(&s);
        let (sink, mut rx) = SpanSink::new(1.0, 5, counters.dropped.clone());
        for _ in 0..8 {
            sink.connect(&event(TCP_EVENT_CONNECT_ESTABLISHED));
        }
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert!((5..=6).contains(&got), "burst of 5 (+ refill) got {got}");
        assert_eq!(counters.dropped.get(&["traces"]), 8 - got);

        let (none, mut rx) = SpanSink::new(0.0, 1000, counters.dropped.clone());
        for _ in 0..50 {
            none.connect(&event(TCP_EVENT_CONNECT_FAILED));
        }
        assert!(rx.try_recv().is_err(), "ratio 0 keeps nothing");
    }

    #[test]
    fn sample_ratio_keeps_about_that_fraction() {
        let s = Snapshot::default();
        let counters = OtlpCounters::register(&s);
        let (half, mut rx) = SpanSink::new(0.5, 1_000_000, counters.dropped.clone());
        for _ in 0..2000 {
            half.connect(&event(TCP_EVENT_CONNECT_ESTABLISHED));
        }
        let mut kept = 0;
        while rx.try_recv().is_ok() {
            kept += 1;
        }
        // Binomial(2000, 0.5): sd ~22, so +-200 is ~9 sd.
        assert!((800..=1200).contains(&kept), "kept {kept} of 2000");
        assert_eq!(
            counters.dropped.get(&["traces"]),
            0,
            "sampling is not dropping"
        );
    }

    #[test]
    fn container_ids_from_cgroup_files() {
        let id = "3f1c0e9d2b7a4c5e8f6a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6";
        for text in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n1:name=systemd:/docker/{id}\n"),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/cri-containerd-{id}.scope"
            ),
            format!("0::/kubepods/burstable/pod7c1d-22/{id}"),
            format!("0::/machine.slice/libpod-{id}.scope/container"),
            format!("0::/system.slice/crio-{id}.scope"),
        ] {
            assert_eq!(container_id(&text).as_deref(), Some(id), "{text}");
        }
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(container_id(""), None);
    }
}
