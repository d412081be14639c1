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

use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::tcp::{
    AF_INET6, TCP_EVENT_CONNECT_ESTABLISHED, TCP_EVENT_CONNECT_FAILED, TcpEvent,
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Uri,
    header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
        trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status},
};
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::{
    cli::VERSION,
    probe::tcp::{ConnectSink, comm_str, peer},
    snapshot::{CounterVec, Desc, Family, LabelValues, Snapshot},
};

/// OTLP transport protocols this build speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (collectors listen on 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (collectors listen on 4318; the spec's default).
    HttpProtobuf,
}

/// OTLP options of `tanzhen run`.
#[derive(Clone, Debug, clap::Args)]
pub struct OtlpArgs {
    /// OpenTelemetry collector base URL, e.g. http://127.0.0.1:4318; enables OTLP export of
    /// metrics and TCP connect spans. Unset: OTEL_EXPORTER_OTLP_ENDPOINT, else no OTLP.
    #[arg(long, env = "TANZHEN_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// OTLP protocol: http-protobuf (default, appends /v1/metrics and /v1/traces to the URL)
    /// or grpc. Unset: OTEL_EXPORTER_OTLP_PROTOCOL (grpc, http/protobuf), else http-protobuf.
    #[arg(long, env = "TANZHEN_OTLP_PROTOCOL", value_enum)]
    pub otlp_protocol: Option<OtlpProtocol>,

    /// How often metrics are pushed over OTLP (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "TANZHEN_OTLP_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub otlp_interval: Duration,

    /// Header sent with every OTLP export, as KEY=VALUE (repeatable; e.g. an API token). Added to
    /// OTEL_EXPORTER_OTLP_HEADERS, overriding equal keys. Values are never logged.
    #[arg(long = "otlp-header", env = "TANZHEN_OTLP_HEADERS", hide_env_values = true, value_delimiter = ',',
          value_name = "KEY=VALUE", value_parser = parse_header)]
    pub otlp_headers: Vec<(String, String)>,

    /// Fraction of TCP connect attempts exported as spans, 0.0 to 1.0 (by trace id, so a
    /// collector can re-sample consistently).
    #[arg(long, env = "TANZHEN_TRACE_SAMPLE_RATIO", default_value = "1.0", value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,

    /// Most spans exported per second; the excess is dropped and counted in
    /// tanzhen_otlp_dropped_total{signal="traces"}.
    #[arg(
        long,
        env = "TANZHEN_TRACE_MAX_SPANS_PER_SECOND",
        default_value = "1000"
    )]
    pub trace_max_spans_per_second: u32,
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration; use e.g. 10s, 500ms or 1m");
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !(0.01..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` is out of range; use 10ms to 24h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a ratio between 0.0 and 1.0")),
    }
}

/// Parses `KEY=VALUE`; the error names the key only (values are secrets).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err("an OTLP header must be KEY=VALUE".into());
    };
    let k = k.trim().to_ascii_lowercase();
    if HeaderName::from_bytes(k.as_bytes()).is_err() {
        return Err(format!("`{k}` is not a valid HTTP header name"));
    }
    let v = v.trim().to_owned();
    if HeaderValue::from_str(&v).is_err() {
        return Err(format!(
            "the value of header `{k}` has characters HTTP does not allow"
        ));
    }
    Ok((k, v))
}

/// Decodes `%XX` escapes (W3C baggage, used by `OTEL_EXPORTER_OTLP_HEADERS` and
/// `OTEL_RESOURCE_ATTRIBUTES`); malformed escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k1=v1,k2=v2` pairs, trimmed and percent-decoded; entries without `=` are skipped.
fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k.trim()), percent_decode(v.trim())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Everything OTLP export needs, resolved from flags and the standard environment.
#[derive(Clone)]
pub struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// The base URL as given.
    pub endpoint: Uri,
    pub interval: Duration,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    pub sample_ratio: f64,
    pub max_spans_per_second: u32,
    /// Resource attributes (service.name, host.name, ...).
    pub resource: Vec<(String, String)>,
}

impl fmt::Debug for OtlpConfig {
    // Hand-written so header values (credentials) never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("OtlpConfig")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("interval", &self.interval)
            .field("header_names", &names)
            .field("sample_ratio", &self.sample_ratio)
            .field("max_spans_per_second", &self.max_spans_per_second)
            .finish_non_exhaustive()
    }
}

impl OtlpConfig {
    /// Resolves the flags against the environment (`env` looks a variable up; the CLI wins).
    /// `Ok(None)`: no endpoint anywhere, OTLP stays off. `Err`: one line for a usage error.
    pub fn resolve(
        args: &OtlpArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let (endpoint, source) = match (&args.otlp_endpoint, env("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(e), _) => (e.clone(), "--otlp-endpoint"),
            (None, Some(e)) => (e, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (None, None) => return Ok(None),
        };
        let protocol = match (args.otlp_protocol, env("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            (Some(p), _) => p,
            (None, Some(p)) => match p.trim() {
                "grpc" => OtlpProtocol::Grpc,
                "http/protobuf" => OtlpProtocol::HttpProtobuf,
                other => {
                    return Err(format!(
                        "OTEL_EXPORTER_OTLP_PROTOCOL=`{other}` is not supported; use grpc or http/protobuf"
                    ));
                }
            },
            (None, None) => OtlpProtocol::HttpProtobuf,
        };
        let endpoint =
            parse_endpoint(&endpoint).map_err(|why| format!("{source} `{endpoint}`: {why}"))?;
        let mut headers: Vec<(String, String)> = Vec::new();
        let from_env = env("OTEL_EXPORTER_OTLP_HEADERS")
            .map(|h| parse_pairs(&h))
            .unwrap_or_default();
        for (k, v) in from_env
            .into_iter()
            .chain(args.otlp_headers.iter().cloned())
        {
            let (k, v) =
                parse_header(&format!("{k}={v}")).map_err(|e| format!("OTLP header: {e}"))?;
            headers.retain(|(hk, _)| *hk != k);
            headers.push((k, v));
        }
        if protocol == OtlpProtocol::Grpc {
            for (k, _) in &headers {
                if tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes())
                    .is_err()
                {
                    return Err(format!(
                        "OTLP header `{k}` is not a valid gRPC metadata key"
                    ));
                }
            }
        }
        Ok(Some(Self {
            protocol,
            endpoint,
            interval: args.otlp_interval,
            headers,
            sample_ratio: args.trace_sample_ratio,
            max_spans_per_second: args.trace_max_spans_per_second,
            resource: resource_attributes(&env),
        }))
    }

    /// Where metrics go: for HTTP the base URL plus `/v1/metrics`.
    #[must_use]
    pub fn metrics_url(&self) -> Uri {
        self.signal_url("/v1/metrics")
    }

    /// Where spans go: for HTTP the base URL plus `/v1/traces`.
    #[must_use]
    pub fn traces_url(&self) -> Uri {
        self.signal_url("/v1/traces")
    }

    fn signal_url(&self, path: &str) -> Uri {
        match self.protocol {
            OtlpProtocol::Grpc => self.endpoint.clone(),
            OtlpProtocol::HttpProtobuf => {
                let base = self.endpoint.to_string();
                let url = format!("{}{path}", base.trim_end_matches('/'));
                // The base parsed and the suffix is plain ASCII, so this parses too.
                url.parse().unwrap_or_else(|_| self.endpoint.clone())
            }
        }
    }
}

fn parse_endpoint(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .trim()
        .parse()
        .map_err(|_| "not a URL; use e.g. http://otel-collector:4318".to_owned())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported by this build (no TLS); use http:// to a node-local collector"
                    .into(),
            );
        }
        _ => {
            return Err("the URL needs the http:// scheme, e.g. http://otel-collector:4318".into());
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if uri.query().is_some() {
        return Err("a base URL takes no query string".into());
    }
    Ok(uri)
}

/// OTel's `host.arch` value for a Rust target arch.
fn host_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "x86",
        "arm" => "arm32",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        other => other,
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    comm_str(&buf)
}

/// Resource attributes: our defaults, then `OTEL_RESOURCE_ATTRIBUTES`, then `OTEL_SERVICE_NAME`.
fn resource_attributes(env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut attrs: Vec<(String, String)> = vec![
        ("service.name".into(), "tanzhen".into()),
        ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
        ("host.name".into(), hostname()),
        ("host.arch".into(), host_arch(std::env::consts::ARCH).into()),
        ("os.type".into(), "linux".into()),
        ("telemetry.sdk.name".into(), "tanzhen".into()),
        ("telemetry.sdk.language".into(), "rust".into()),
        ("telemetry.sdk.version".into(), VERSION.into()),
    ];
    if let Some(node) = env("NODE_NAME") {
        attrs.push(("k8s.node.name".into(), node));
    }
    let mut set = |k: String, v: String| {
        attrs.retain(|(ak, _)| *ak != k);
        attrs.push((k, v));
    };
    for (k, v) in env("OTEL_RESOURCE_ATTRIBUTES")
        .map(|s| parse_pairs(&s))
        .unwrap_or_default()
    {
        set(k, v);
    }
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        set("service.name".into(), name);
    }
    attrs
}

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
    ("tanzhen_probe_up", "tanzhen.probe.up", "1"),
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

/// OTel attribute key of a label: semantic-convention names where one exists.
#[must_use]
pub fn otel_attr(label: &str) -> &str {
    match label {
        "comm" => "process.executable.name",
        "pid" | "tgid" => "process.pid",
        "cgroup_id" => "tanzhen.cgroup.id",
        other => other,
    }
}

fn attrs(names: &[&'static str], values: &LabelValues) -> Vec<KeyValue> {
    names
        .iter()
        .zip(values)
        .map(|(k, v)| kv_str(otel_attr(k), v.clone()))
        .collect()
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
                        attributes: attrs(c.desc.labels, &labels),
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
                        attributes: attrs(g.desc.labels, &labels),
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
            Family::Histogram(h) => {
                let points: Vec<HistogramDataPoint> = h
                    .snapshot()
                    .into_iter()
                    .map(|(labels, d)| HistogramDataPoint {
                        attributes: attrs(h.desc.labels, &labels),
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

/// Why one export request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("gRPC: {}", chain(.0))]
    Grpc(#[from] tonic::Status),
    #[error("HTTP: {}", chain(.0))]
    Http(#[from] hyper_util::client::legacy::Error),
    #[error("HTTP status {0}")]
    Status(hyper::StatusCode),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("invalid endpoint: {0}")]
    Endpoint(String),
}

impl ExportError {
    /// Whether sending the same data again can succeed (OTLP specification: gRPC codes
    /// UNAVAILABLE, RESOURCE_EXHAUSTED, ...; HTTP 408, 429, 502, 503, 504; transport errors).
    /// Other rejections (bad request, unauthenticated) drop the batch.
    #[must_use]
    pub fn retryable(&self) -> bool {
        use tonic::Code;
        match self {
            Self::Grpc(s) => matches!(
                s.code(),
                Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::OutOfRange
                    | Code::Unavailable
                    | Code::DataLoss
                    | Code::Unknown
            ),
            Self::Status(c) => matches!(c.as_u16(), 408 | 429 | 502..=504),
            Self::Http(_) | Self::Timeout(_) => true,
            Self::Request(_) | Self::Endpoint(_) => false,
        }
    }
}

/// An error and its causes on one line ("client error (Connect): Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Per-request timeout (the specification's default is 10 s).
const TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to the collector, shared by both signals.
#[derive(Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value per agent, cloned twice at start-up"
)]
pub enum Transport {
    Grpc {
        channel: tonic::transport::Channel,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: Client<HttpConnector, Full<Bytes>>,
        metrics: Uri,
        traces: Uri,
        headers: HeaderMap,
    },
}

impl Transport {
    /// Builds the client (lazily connecting: a collector that is down is not an error here).
    /// Must run inside the tokio runtime.
    pub fn new(cfg: &OtlpConfig) -> Result<Self, ExportError> {
        match cfg.protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(cfg.endpoint.to_string())
                    .map_err(|e| ExportError::Endpoint(e.to_string()))?
                    .timeout(TIMEOUT)
                    .connect_timeout(TIMEOUT)
                    .connect_lazy();
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|_| ExportError::Endpoint(format!("bad metadata key `{k}`")))?;
                    let val = v
                        .parse()
                        .map_err(|_| ExportError::Endpoint(format!("bad value for `{k}`")))?;
                    metadata.insert(key, val);
                }
                Ok(Self::Grpc { channel, metadata })
            }
            OtlpProtocol::HttpProtobuf => {
                let mut headers = HeaderMap::new();
                for (k, v) in &cfg.headers {
                    let name = HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| ExportError::Endpoint(format!("bad header `{k}`")))?;
                    let mut val = HeaderValue::from_str(v)
                        .map_err(|_| ExportError::Endpoint(format!("bad value for `{k}`")))?;
                    val.set_sensitive(true);
                    headers.insert(name, val);
                }
                let mut conn = HttpConnector::new();
                conn.set_connect_timeout(Some(TIMEOUT));
                conn.set_nodelay(true);
                Ok(Self::Http {
                    client: Client::builder(TokioExecutor::new()).build(conn),
                    metrics: cfg.metrics_url(),
                    traces: cfg.traces_url(),
                    headers,
                })
            }
        }
    }

    fn grpc_request<T>(metadata: &tonic::metadata::MetadataMap, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        *req.metadata_mut() = metadata.clone();
        req.set_timeout(TIMEOUT);
        req
    }

    async fn post(
        client: &Client<HttpConnector, Full<Bytes>>,
        uri: &Uri,
        headers: &HeaderMap,
        body: Vec<u8>,
    ) -> Result<(), ExportError> {
        let mut req = hyper::Request::post(uri.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))?;
        req.headers_mut().extend(headers.clone());
        let send = async {
            let resp = client.request(req).await?;
            let status = resp.status();
            // Read the body so the connection can be reused.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(ExportError::Status(status))
            }
        };
        tokio::time::timeout(TIMEOUT, send)
            .await
            .map_err(|_| ExportError::Timeout(TIMEOUT))?
    }

    /// Sends one metrics request.
    pub async fn send_metrics(&self, req: ExportMetricsServiceRequest) -> Result<(), ExportError> {
        match self {
            Self::Grpc { channel, metadata } => {
                let resp = MetricsServiceClient::new(channel.clone())
                    .export(Self::grpc_request(metadata, req))
                    .await?;
                if let Some(p) = resp.into_inner().partial_success
                    && p.rejected_data_points > 0
                {
                    log::warn!(
                        "OTLP: collector rejected {} data points: {}",
                        p.rejected_data_points,
                        p.error_message
                    );
                }
                Ok(())
            }
            Self::Http {
                client,
                metrics,
                headers,
                ..
            } => Self::post(client, metrics, headers, req.encode_to_vec()).await,
        }
    }

    /// Sends one trace request.
    pub async fn send_traces(&self, req: ExportTraceServiceRequest) -> Result<(), ExportError> {
        match self {
            Self::Grpc { channel, metadata } => {
                let resp = TraceServiceClient::new(channel.clone())
                    .export(Self::grpc_request(metadata, req))
                    .await?;
                if let Some(p) = resp.into_inner().partial_success
                    && p.rejected_spans > 0
                {
                    log::warn!(
                        "OTLP: collector rejected {} spans: {}",
                        p.rejected_spans,
                        p.error_message
                    );
                }
                Ok(())
            }
            Self::Http {
                client,
                traces,
                headers,
                ..
            } => Self::post(client, traces, headers, req.encode_to_vec()).await,
        }
    }
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
    fn new(
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

/// The container id in a `/proc/<pid>/cgroup` text (cgroup v1 or v2): the last 64-hex-digit
/// path segment, bare (`/docker/<id>`, `/kubepods/.../<id>`) or in a systemd scope
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`).
#[must_use]
pub fn container_id(cgroup: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    cgroup
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .filter_map(|seg| {
            let seg = seg.strip_suffix(".scope").unwrap_or(seg);
            let tail = seg.rsplit(['-', ':']).next().unwrap_or(seg);
            is_id(tail).then(|| tail.to_ascii_lowercase())
        })
        .next_back()
}

fn trace_id_low(trace_id: &[u8; 16]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&trace_id[8..]);
    b
}

/// Running OTLP export: the span sink for the TCP probe and the exporter tasks.
pub struct Otlp {
    /// Hand this to the TCP probe.
    pub sink: Arc<SpanSink>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Otlp {
    /// Registers the counters, builds the transport and spawns the metric and trace exporters.
    pub fn start(cfg: &OtlpConfig, snapshot: &Arc<Snapshot>) -> Result<Self, ExportError> {
        let transport = Transport::new(cfg)?;
        let counters = OtlpCounters::register(snapshot);
        let (sink, rx) = SpanSink::new(
            cfg.sample_ratio,
            cfg.max_spans_per_second,
            counters.dropped.clone(),
        );
        let resource = proto_resource(&cfg.resource);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(run_metrics(
            transport.clone(),
            snapshot.clone(),
            resource.clone(),
            cfg.interval,
            counters.clone(),
            stop_rx.clone(),
        ));
        tasks.spawn(run_traces(
            transport,
            rx,
            resource,
            cfg.interval,
            counters,
            stop_rx,
        ));
        log::info!(
            "OTLP export to {} over {} (metrics every {:?}; headers: {}; spans: ratio {}, at most {}/s)",
            match cfg.protocol {
                OtlpProtocol::Grpc => cfg.endpoint.to_string(),
                OtlpProtocol::HttpProtobuf =>
                    format!("{} and {}", cfg.metrics_url(), cfg.traces_url()),
            },
            match cfg.protocol {
                OtlpProtocol::Grpc => "gRPC",
                OtlpProtocol::HttpProtobuf => "HTTP/protobuf",
            },
            cfg.interval,
            if cfg.headers.is_empty() {
                "none".to_owned()
            } else {
                cfg.headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            },
            cfg.sample_ratio,
            cfg.max_spans_per_second
        );
        Ok(Self {
            sink: Arc::new(sink),
            stop,
            tasks,
        })
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

async fn run_metrics(
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
async fn run_traces(
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

    fn args(v: &[&str]) -> OtlpArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            o: OtlpArgs,
        }
        let mut a = vec!["x"];
        a.extend_from_slice(v);
        P::try_parse_from(a).unwrap().o
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn off_without_endpoint() {
        assert!(OtlpConfig::resolve(&args(&[]), &no_env).unwrap().is_none());
    }

    #[test]
    fn http_appends_signal_paths_and_grpc_does_not() {
        let c = OtlpConfig::resolve(&args(&["--otlp-endpoint", "http://c:4318"]), &no_env)
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf, "spec default");
        assert_eq!(c.metrics_url().to_string(), "http://c:4318/v1/metrics");
        assert_eq!(c.traces_url().to_string(), "http://c:4318/v1/traces");
        let c = OtlpConfig::resolve(&args(&["--otlp-endpoint", "http://c:4318/otlp/"]), &no_env)
            .unwrap()
            .unwrap();
        assert_eq!(c.traces_url().to_string(), "http://c:4318/otlp/v1/traces");
        let c = OtlpConfig::resolve(
            &args(&[
                "--otlp-endpoint",
                "http://c:4317",
                "--otlp-protocol",
                "grpc",
            ]),
            &no_env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.metrics_url().to_string(), "http://c:4317/");
    }

    #[test]
    fn env_fallbacks_and_cli_wins() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://envhost:4317".to_owned()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("grpc".to_owned()),
            "OTEL_EXPORTER_OTLP_HEADERS" => Some("api-key=s%3Dcret, x-a=1".to_owned()),
            "OTEL_RESOURCE_ATTRIBUTES" => {
                Some("deployment.environment=prod,service.name=fromattrs".to_owned())
            }
            "OTEL_SERVICE_NAME" => Some("svc".to_owned()),
            "NODE_NAME" => Some("node-7".to_owned()),
            _ => None,
        };
        let c = OtlpConfig::resolve(&args(&["--otlp-header", "x-a=2"]), &env)
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint.host(), Some("envhost"));
        assert_eq!(c.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            c.headers,
            [
                ("api-key".into(), "s=cret".into()),
                ("x-a".into(), "2".into())
            ]
        );
        let get = |k: &str| {
            c.resource
                .iter()
                .find(|(rk, _)| rk == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("service.name"), Some("svc"));
        assert_eq!(get("deployment.environment"), Some("prod"));
        assert_eq!(get("k8s.node.name"), Some("node-7"));
        assert_eq!(get("os.type"), Some("linux"));
        assert!(
            !format!("{c:?}").contains("cret"),
            "no header value in Debug"
        );

        let c = OtlpConfig::resolve(
            &args(&[
                "--otlp-endpoint",
                "http://cli:1",
                "--otlp-protocol",
                "http-protobuf",
            ]),
            &env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint.host(), Some("cli"));
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn bad_endpoints_are_one_line_errors() {
        for (bad, why) in [
            ("not a url", "not a URL"),
            ("ftp://x:1", "http://"),
            ("localhost:4318", "http://"),
            ("https://x:4318", "no TLS"),
            ("http://x:4318/?a=b", "query"),
        ] {
            let e = OtlpConfig::resolve(&args(&["--otlp-endpoint", bad]), &no_env).unwrap_err();
            assert!(e.contains(why) && !e.contains('\n'), "{bad}: {e}");
        }
        let json = |k: &str| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "http/json".to_owned());
        let e = OtlpConfig::resolve(&args(&["--otlp-endpoint", "http://x:1"]), &json).unwrap_err();
        assert!(e.contains("http/json"), "{e}");
    }

    #[test]
    fn header_errors_never_show_values() {
        let e = parse_header("bad key=topsecret").unwrap_err();
        assert!(!e.contains("topsecret"), "{e}");
        let e = parse_header("k=top\nsecret").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(
            parse_header("Api-Key=v=1").unwrap(),
            ("api-key".into(), "v=1".into())
        );
    }

    #[test]
    fn help_never_shows_header_values() {
        use clap::CommandFactory;
        let mut cmd = crate::cli::Cli::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let arg = run
            .get_arguments()
            .find(|a| a.get_id() == "otlp_headers")
            .unwrap();
        assert!(arg.is_hide_env_values_set());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("0s").is_err());
    }

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
        assert_eq!(otel_attr("comm"), "process.executable.name");
        assert_eq!(otel_attr("outcome"), "outcome");
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
        let m = &req.resource_metrics[0].scope_metrics[0].metrics;
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

    fn event(kind: u32) -> TcpEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        TcpEvent {
            ts_ns: 5_000_000_000,
            latency_ns: 1_000_000,
            cgroup_id: 0,
            kind,
            tgid: 42,
            pid: 43,
            family: agent_common::tcp::AF_INET,
            sport: 40000,
            dport: 80,
            _pad: [0; 6],
            saddr: [0; 16],
            daddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm,
        }
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
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::for_interval(Duration::from_millis(500), Duration::from_millis(500));
        let seq: Vec<u128> = (0..6).map(|_| b.fail().as_millis()).collect();
        assert_eq!(seq, [500, 1000, 2000, 4000, 4000, 4000]);
        b.succeed();
        assert_eq!(b.fail().as_millis(), 500);
    }

    #[test]
    fn retry_classification() {
        assert!(ExportError::Grpc(tonic::Status::unavailable("x")).retryable());
        assert!(!ExportError::Grpc(tonic::Status::unauthenticated("x")).retryable());
        assert!(ExportError::Status(hyper::StatusCode::SERVICE_UNAVAILABLE).retryable());
        assert!(ExportError::Status(hyper::StatusCode::TOO_MANY_REQUESTS).retryable());
        assert!(!ExportError::Status(hyper::StatusCode::BAD_REQUEST).retryable());
        assert!(ExportError::Timeout(TIMEOUT).retryable());
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

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2C%zz%"), "a=b,%zz%");
    }
}
