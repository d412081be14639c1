//! OTLP export: the [`Snapshot`]'s metrics and one span per TCP connect attempt, pushed to an
//! OpenTelemetry collector over gRPC (tonic) or HTTP/protobuf (hyper).
//!
//! Why not opentelemetry-otlp's exporters: in 0.33 they only accept `ResourceMetrics` built by
//! the SDK's own aggregation (its fields are crate-private and there is no producer hook), and
//! the OTel API has no observable histogram, so the kernel's pre-bucketed histograms could not
//! pass through with their bucket counts and sums intact. This module builds the same generated
//! protobuf messages opentelemetry-otlp sends (opentelemetry-proto) and ships them itself, which
//! also gives one bounded queue, one backoff and one failure counter for both signals.
//!
//! Configuration follows the OTLP exporter specification: `--otlp-endpoint` (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) is a base URL; for HTTP `/v1/metrics` and `/v1/traces` are
//! appended, for gRPC the URL is the server address. The protocol defaults to `http/protobuf`,
//! the specification's default. Metrics are cumulative. Header values are never logged.

//!
//! Files: `config` (flags, environment, resource), `metrics` (snapshot -> OTLP metrics and the
//! push loop), `traces` (TCP connect spans: sampling, rate limit, queue, export loop),
//! `transport` (tonic and hyper clients).

mod config;
mod metrics;
mod traces;
mod transport;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
};
use tokio::sync::watch;

#[cfg(any(test, fuzzing))]
pub use self::config::ParserInputs;
pub use self::{
    config::{Compression, OtlpArgs, OtlpConfig, OtlpProtocol, SignalConfig},
    traces::SpanSink,
    transport::{ExportError, Transport},
};
use self::{metrics::run_metrics, traces::run_traces};
use crate::snapshot::{CounterVec, Desc, Snapshot};

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.to_owned(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn kv_str(k: &str, v: impl Into<String>) -> KeyValue {
    kv(k, any_value::Value::StringValue(v.into()))
}

fn proto_resource(attrs: &[(String, String)]) -> Resource {
    Resource {
        attributes: attrs.iter().map(|(k, v)| kv_str(k, v.clone())).collect(),
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "tanzhen".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The agent's own OTLP counters (also on `/metrics`).
#[derive(Clone, Debug)]
pub struct OtlpCounters {
    /// Items dropped before export (`signal`="traces": rate limit, full queue).
    pub dropped: Arc<CounterVec>,
    /// Export requests that failed.
    pub failures: Arc<CounterVec>,
    /// Export requests the collector accepted.
    pub exports: Arc<CounterVec>,
}

impl OtlpCounters {
    /// Registers the families in `snapshot`.
    pub fn register(snapshot: &Snapshot) -> Self {
        let c = |name, help| {
            snapshot.counter(Desc {
                name,
                help,
                labels: &["signal"],
            })
        };
        Self {
            dropped: c(
                "tanzhen_otlp_dropped",
                "Spans or data points dropped before OTLP export (rate limit or full queue), by signal.",
            ),
            failures: c(
                "tanzhen_otlp_export_failures",
                "OTLP export requests that failed (collector down, slow or refusing), by signal.",
            ),
            exports: c(
                "tanzhen_otlp_exports",
                "OTLP export requests the collector accepted, by signal.",
            ),
        }
    }
}

/// Exponential backoff between failed exports: starts at `base`, doubles, capped at `max`.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    /// Backoff for exports every `interval`: capped at 8 intervals, and at 30 s (unless the
    /// interval itself is longer).
    #[must_use]
    pub fn for_interval(base: Duration, interval: Duration) -> Self {
        let max = (interval * 8)
            .min(Duration::from_secs(30))
            .max(interval)
            .max(base);
        Self {
            base,
            max,
            current: None,
        }
    }

    /// The delay after one more failure.
    pub fn fail(&mut self) -> Duration {
        let next = self.current.map_or(self.base, |c| (c * 2).min(self.max));
        self.current = Some(next);
        next
    }

    /// Whether the last attempt failed.
    #[must_use]
    pub fn failing(&self) -> bool {
        self.current.is_some()
    }

    /// Resets after a success.
    pub fn succeed(&mut self) {
        self.current = None;
    }
}

/// Running OTLP export: the span sink for the TCP probe and the exporter tasks.
pub struct Otlp {
    /// Hand this to the TCP probe (`None` when spans are not exported).
    pub sink: Option<Arc<SpanSink>>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Otlp {
    /// Registers the counters, builds each signal's transport and spawns its exporter.
    pub fn start(cfg: &OtlpConfig, snapshot: &Arc<Snapshot>) -> Result<Self, ExportError> {
        let counters = OtlpCounters::register(snapshot);
        let resource = proto_resource(&cfg.resource);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(m) = &cfg.metrics {
            tasks.spawn(run_metrics(
                Transport::new(m)?,
                snapshot.clone(),
                resource.clone(),
                cfg.interval,
                counters.clone(),
                stop_rx.clone(),
            ));
            log::info!("OTLP metrics to {m} every {:?}", cfg.interval);
        }
        let sink = match &cfg.traces {
            Some(t) => {
                let (sink, rx) = SpanSink::new(
                    cfg.sample_ratio,
                    cfg.max_spans_per_second,
                    counters.dropped.clone(),
                );
                tasks.spawn(run_traces(
                    Transport::new(t)?,
                    rx,
                    resource,
                    cfg.interval,
                    counters,
                    stop_rx,
                ));
                log::info!(
                    "OTLP spans to {t} (ratio {}, at most {}/s)",
                    cfg.sample_ratio,
                    cfg.max_spans_per_second
                );
                Some(Arc::new(sink))
            }
            None => None,
        };
        Ok(Self { sink, stop, tasks })
    }

    /// Flushes what is pending (bounded in time) and stops the exporters. Call after the
    /// probes have drained, so their last spans are included.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        drop(self.sink);
        while let Some(res) = self.tasks.join_next().await {
            if let Err(e) = res {
                log::error!("OTLP exporter task: {e}");
            }
        }
    }
}

/// Bound on the final flush at shutdown, so a dead collector cannot hold up SIGTERM.
const FINAL_FLUSH: Duration = Duration::from_secs(3);
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::for_interval(Duration::from_millis(500), Duration::from_millis(500));
        let seq: Vec<u128> = (0..6).map(|_| b.fail().as_millis()).collect();
        assert_eq!(seq, [500, 1000, 2000, 4000, 4000, 4000]);
        b.succeed();
        assert_eq!(b.fail().as_millis(), 500);
    }
}
