//! OTLP metrics: every [`Snapshot`] family translated (cumulative sums, gauges, explicit-bucket
//! histograms with the snapshot's own bounds), OTel names and units, and the push loop.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::KeyValue,
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
};
use tokio::sync::watch;

use super::{Backoff, FINAL_FLUSH, OtlpCounters, Transport, kv_str, scope, to_i64, unix_nanos};
use crate::snapshot::{Desc, Family, FloatKind, LabelValues, Snapshot};

/// OTel names of the families whose name is not the default mapping, with UCUM units.
/// (Prometheus name without `_total`, OTel name, unit.)
const NAMES: &[(&str, &str, &str)] = &[
    (
        "tanzhen_tcp_connects",
        "tanzhen.tcp.connects",
        "{connection}",
    ),
    (
        "tanzhen_tcp_connect_duration_seconds",
        "tanzhen.tcp.connect.duration",
        "s",
    ),
    ("tanzhen_tcp_accepts", "tanzhen.tcp.accepts", "{connection}"),
    ("tanzhen_events_lost", "tanzhen.events.lost", "{event}"),
    ("tanzhen_decode_errors", "tanzhen.decode.errors", "{record}"),
    ("tanzhen_otlp_dropped", "tanzhen.otlp.dropped", "{item}"),
    (
        "tanzhen_otlp_export_failures",
        "tanzhen.otlp.export.failures",
        "{request}",
    ),
    ("tanzhen_otlp_exports", "tanzhen.otlp.exports", "{request}"),
    ("tanzhen_build_info", "tanzhen.build.info", "1"),
    ("tanzhen_series_folded", "tanzhen.series.folded", "{series}"),
    ("tanzhen_syscalls", "tanzhen.syscalls", "{call}"),
    ("tanzhen_syscall_errors", "tanzhen.syscall.errors", "{call}"),
    (
        "tanzhen_syscall_duration_seconds",
        "tanzhen.syscall.duration",
        "s",
    ),
    ("tanzhen_file_opens", "tanzhen.file.opens", "{open}"),
    // Semantic conventions: process.context_switches with process.context_switch.type.
    (
        "tanzhen_sched_context_switches",
        "process.context_switches",
        "{context_switch}",
    ),
    (
        "tanzhen_sched_runqueue_latency_seconds",
        "tanzhen.sched.runqueue.latency",
        "s",
    ),
    (
        "tanzhen_process_execs",
        "tanzhen.process.execs",
        "{process}",
    ),
    (
        "tanzhen_process_exits",
        "tanzhen.process.exits",
        "{process}",
    ),
    ("tanzhen_probe_up", "tanzhen.probe.up", "1"),
    // The agent's own process metrics, by OTel's process semantic conventions where they
    // have a name for it.
    ("process_cpu_seconds", "process.cpu.time", "s"),
    (
        "process_resident_memory_bytes",
        "process.memory.usage",
        "By",
    ),
    (
        "process_virtual_memory_bytes",
        "process.memory.virtual",
        "By",
    ),
    (
        "process_open_fds",
        "process.open_file_descriptor.count",
        "{file_descriptor}",
    ),
    (
        "process_max_fds",
        "tanzhen.process.max_file_descriptors",
        "{file_descriptor}",
    ),
    (
        "process_start_time_seconds",
        "tanzhen.process.start_time",
        "s",
    ),
];

/// The OTel name and unit of a family: from [`NAMES`], else `tanzhen_x_y` -> `tanzhen.x.y`,
/// with a `_seconds` suffix becoming unit `s` and `_bytes` unit `By`.
#[must_use]
pub fn otel_name(prom: &str) -> (String, &'static str) {
    if let Some((_, n, u)) = NAMES.iter().find(|(p, _, _)| *p == prom) {
        return ((*n).to_owned(), u);
    }
    let base = prom.strip_suffix("_total").unwrap_or(prom);
    let (base, unit) = if let Some(b) = base.strip_suffix("_seconds") {
        (b, "s")
    } else if let Some(b) = base.strip_suffix("_bytes") {
        (b, "By")
    } else {
        (base, "")
    };
    (base.replace('_', "."), unit)
}

/// OTel attribute key of a label of `family`: semantic-convention names where one exists.
#[must_use]
pub fn otel_attr<'a>(family: &str, label: &'a str) -> &'a str {
    match (family, label) {
        ("tanzhen_sched_context_switches", "kind") => "process.context_switch.type",
        (_, label) => otel_attr_any(label),
    }
}

fn otel_attr_any(label: &str) -> &str {
    match label {
        "comm" => "process.executable.name",
        "pid" | "tgid" => "process.pid",
        "cgroup_id" => "tanzhen.cgroup.id",
        "namespace" => "k8s.namespace.name",
        "pod" => "k8s.pod.name",
        "container" => "k8s.container.name",
        "workload" => "tanzhen.k8s.workload",
        other => other,
    }
}

fn attrs(desc: &Desc, values: &LabelValues) -> Vec<KeyValue> {
    desc.labels
        .iter()
        .zip(values)
        .map(|(k, v)| kv_str(otel_attr(desc.name, k), v.clone()))
        .collect()
}

/// Translates every family of `snapshot` (cumulative since `start_ns`, observed at `now_ns`).
#[must_use]
pub fn metrics_request(
    snapshot: &Snapshot,
    resource: &Resource,
    start_ns: u64,
    now_ns: u64,
) -> ExportMetricsServiceRequest {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let mut metrics = Vec::new();
    for family in snapshot.families() {
        let (desc, data) = match &family {
            Family::Counter(c) => {
                let points: Vec<NumberDataPoint> = c
                    .snapshot()
                    .into_iter()
                    .map(|(labels, v)| NumberDataPoint {
                        attributes: attrs(&c.desc, &labels),
                        start_time_unix_nano: start_ns,
                        time_unix_nano: now_ns,
                        value: Some(number_data_point::Value::AsInt(to_i64(v))),
                        ..Default::default()
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                (
                    c.desc,
                    metric::Data::Sum(Sum {
                        data_points: points,
                        aggregation_temporality: cumulative,
                        is_monotonic: true,
                    }),
                )
            }
            Family::Gauge(g) => {
                let points: Vec<NumberDataPoint> = g
                    .snapshot()
                    .into_iter()
                    .map(|(labels, v)| NumberDataPoint {
                        attributes: attrs(&g.desc, &labels),
                        time_unix_nano: now_ns,
                        value: Some(number_data_point::Value::AsInt(v)),
                        ..Default::default()
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                (
                    g.desc,
                    metric::Data::Gauge(Gauge {
                        data_points: points,
                    }),
                )
            }
            Family::Float(f) => {
                let points: Vec<NumberDataPoint> = f
                    .snapshot()
                    .into_iter()
                    .map(|(labels, v)| NumberDataPoint {
                        attributes: attrs(&f.desc, &labels),
                        start_time_unix_nano: if f.kind == FloatKind::Counter {
                            start_ns
                        } else {
                            0
                        },
                        time_unix_nano: now_ns,
                        value: Some(number_data_point::Value::AsDouble(v)),
                        ..Default::default()
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let data = match f.kind {
                    FloatKind::Counter => metric::Data::Sum(Sum {
                        data_points: points,
                        aggregation_temporality: cumulative,
                        is_monotonic: true,
                    }),
                    FloatKind::Gauge => metric::Data::Gauge(Gauge {
                        data_points: points,
                    }),
                };
                (f.desc, data)
            }
            Family::Histogram(h) => {
                let points: Vec<HistogramDataPoint> = h
                    .snapshot()
                    .into_iter()
                    .map(|(labels, d)| HistogramDataPoint {
                        attributes: attrs(&h.desc, &labels),
                        start_time_unix_nano: start_ns,
                        time_unix_nano: now_ns,
                        count: d.count,
                        sum: Some(d.sum),
                        // Both are per-bucket (non-cumulative) with the overflow bucket last.
                        bucket_counts: d.counts.clone(),
                        explicit_bounds: h.bounds.to_vec(),
                        ..Default::default()
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                (
                    h.desc,
                    metric::Data::Histogram(Histogram {
                        data_points: points,
                        aggregation_temporality: cumulative,
                    }),
                )
            }
        };
        let (name, unit) = otel_name(desc.name);
        metrics.push(Metric {
            name,
            description: desc.help.to_owned(),
            unit: unit.to_owned(),
            data: Some(data),
            ..Default::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

pub(super) async fn run_metrics(
    transport: Transport,
    snapshot: Arc<Snapshot>,
    resource: Resource,
    interval: Duration,
    counters: OtlpCounters,
    mut stop: watch::Receiver<bool>,
) {
    let start_ns = unix_nanos(SystemTime::now());
    let mut backoff = Backoff::for_interval(interval, interval);
    let mut delay = interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => break,
        }
        let req = metrics_request(
            &snapshot,
            &resource,
            start_ns,
            unix_nanos(SystemTime::now()),
        );
        // A stop during a slow export abandons it for the (bounded) final flush.
        let res = tokio::select! {
            res = transport.send_metrics(req) => res,
            _ = stop.changed() => break,
        };
        match res {
            Ok(()) => {
                counters.exports.inc_by(&["metrics"], 1);
                if backoff.failing() {
                    log::info!("OTLP metrics export resumed");
                }
                backoff.succeed();
                delay = interval;
            }
            Err(e) => {
                counters.failures.inc_by(&["metrics"], 1);
                let first = !backoff.failing();
                delay = backoff.fail();
                let msg = format!("OTLP metrics export failed: {e}; retrying in {delay:?}");
                if first {
                    log::warn!("{msg} (further failures are logged at debug level)");
                } else {
                    log::debug!("{msg}");
                }
            }
        }
    }
    let req = metrics_request(
        &snapshot,
        &resource,
        start_ns,
        unix_nanos(SystemTime::now()),
    );
    match tokio::time::timeout(FINAL_FLUSH, transport.send_metrics(req)).await {
        Ok(Ok(())) => counters.exports.inc_by(&["metrics"], 1),
        Ok(Err(e)) => log::warn!("OTLP final metrics export failed: {e}"),
        Err(_) => log::warn!("OTLP final metrics export timed out"),
    }
}
#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn names_follow_the_table_then_the_default_rule() {
        assert_eq!(
            otel_name("tanzhen_tcp_connects"),
            ("tanzhen.tcp.connects".into(), "{connection}")
        );
        assert_eq!(
            otel_name("tanzhen_tcp_connect_duration_seconds"),
            ("tanzhen.tcp.connect.duration".into(), "s")
        );
        assert_eq!(
            otel_name("tanzhen_syscall_latency_seconds"),
            ("tanzhen.syscall.latency".into(), "s")
        );
        assert_eq!(otel_name("tanzhen_x_y_total"), ("tanzhen.x.y".into(), ""));
        assert_eq!(
            otel_attr("tanzhen_tcp_connects", "comm"),
            "process.executable.name"
        );
        assert_eq!(otel_attr("tanzhen_tcp_connects", "outcome"), "outcome");
        assert_eq!(
            otel_attr("tanzhen_sched_context_switches", "kind"),
            "process.context_switch.type"
        );
        assert_eq!(
            otel_name("tanzhen_sched_context_switches"),
            ("process.context_switches".to_owned(), "{context_switch}")
        );
    }

    #[test]
    fn snapshot_translates_with_buckets_intact() {
        let s = Snapshot::default();
        let c = s.counter(Desc {
            name: "tanzhen_tcp_connects",
            help: "h",
            labels: &["comm", "outcome"],
        });
        c.inc_by(&["curl", "failed"], 3);
        s.counter(Desc {
            name: "tanzhen_empty",
            help: "h",
            labels: &["a"],
        });
        let h = s.histogram(
            Desc {
                name: "tanzhen_tcp_connect_duration_seconds",
                help: "h",
                labels: &[],
            },
            &[0.1, 1.0],
        );
        h.observe(&[], 0.05);
        h.observe(&[], 5.0);
        let req = metrics_request(&s, &Resource::default(), 1, 2);
        let all = &req.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(
            all[0].name, "tanzhen.series.folded",
            "the snapshot's own family comes first"
        );
        let m = &all[1..];
        assert_eq!(m.len(), 2, "empty families are left out");
        assert_eq!(m[0].name, "tanzhen.tcp.connects");
        let Some(metric::Data::Sum(sum)) = &m[0].data else {
            panic!("{:?}", m[0])
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsInt(3))
        );
        assert_eq!(
            sum.data_points[0].attributes[0].key,
            "process.executable.name"
        );
        let Some(metric::Data::Histogram(hist)) = &m[1].data else {
            panic!("{:?}", m[1])
        };
        assert_eq!(m[1].unit, "s");
        let p = &hist.data_points[0];
        assert_eq!(p.explicit_bounds, [0.1, 1.0]);
        assert_eq!(p.bucket_counts, [1, 0, 1]);
        assert_eq!(p.count, 2);
        // It round-trips through protobuf.
        let bytes = req.encode_to_vec();
        assert_eq!(
            ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap(),
            req
        );
    }
}
