//! OTLP configuration: the `run` flags, the standard `OTEL_*` environment (the command line
//! wins), endpoint validation and the resource attributes.

use std::{fmt, path::PathBuf, time::Duration};

use hyper::{
    Uri,
    header::{HeaderName, HeaderValue},
};

use crate::{cli::VERSION, probe::tcp::comm_str};

/// OTLP transport protocols this build speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (collectors listen on 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (collectors listen on 4318; the spec's default).
    HttpProtobuf,
}

/// Compression of OTLP requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// gzip (`Content-Encoding: gzip` over HTTP, `grpc-encoding: gzip` over gRPC).
    Gzip,
    /// Uncompressed.
    None,
}

/// The two OTLP signals tanzhen exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Metrics,
    Traces,
}

impl Signal {
    /// The signal's name in `OTEL_EXPORTER_OTLP_<NAME>_*` variables.
    fn env_name(self) -> &'static str {
        match self {
            Self::Metrics => "METRICS",
            Self::Traces => "TRACES",
        }
    }

    /// The path the HTTP exporter appends to a base URL.
    fn http_path(self) -> &'static str {
        match self {
            Self::Metrics => "/v1/metrics",
            Self::Traces => "/v1/traces",
        }
    }
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

    /// Full URL for metrics only (used as is: nothing is appended), overriding --otlp-endpoint
    /// for this signal. Unset: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT.
    #[arg(long, env = "TANZHEN_OTLP_METRICS_ENDPOINT", value_name = "URL")]
    pub otlp_metrics_endpoint: Option<String>,

    /// Full URL for spans only (used as is), overriding --otlp-endpoint for this signal.
    /// Unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
    #[arg(long, env = "TANZHEN_OTLP_TRACES_ENDPOINT", value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,

    /// How long one export request may take (e.g. 10s). Unset: OTEL_EXPORTER_OTLP_TIMEOUT
    /// (and its per-signal variants, in milliseconds), else 10s.
    #[arg(long, env = "TANZHEN_OTLP_TIMEOUT", value_parser = parse_duration)]
    pub otlp_timeout: Option<Duration>,

    /// Compress export requests: gzip or none. Unset: OTEL_EXPORTER_OTLP_COMPRESSION (and its
    /// per-signal variants), else none.
    #[arg(long, env = "TANZHEN_OTLP_COMPRESSION", value_enum)]
    pub otlp_compression: Option<Compression>,

    /// PEM file of the CA that signed the collector's certificate (https:// endpoints); default:
    /// the system's CA store. Unset: OTEL_EXPORTER_OTLP_CERTIFICATE.
    #[arg(long, env = "TANZHEN_OTLP_CERTIFICATE", value_name = "PATH")]
    pub otlp_certificate: Option<PathBuf>,

    /// PEM client certificate for mutual TLS with the collector (needs --otlp-client-key).
    /// Unset: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE.
    #[arg(long, env = "TANZHEN_OTLP_CLIENT_CERTIFICATE", value_name = "PATH")]
    pub otlp_client_certificate: Option<PathBuf>,

    /// PEM private key of --otlp-client-certificate. Unset: OTEL_EXPORTER_OTLP_CLIENT_KEY.
    #[arg(long, env = "TANZHEN_OTLP_CLIENT_KEY", value_name = "PATH")]
    pub otlp_client_key: Option<PathBuf>,

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

/// The OTLP inputs the parser proptest and fuzz target vary: a base endpoint and
/// `--otlp-header`s, and the variables below.
#[cfg(any(test, fuzzing))]
pub struct ParserInputs {
    pub endpoint: String,
    pub flag_headers: Vec<(String, String)>,
    /// `OTEL_EXPORTER_OTLP_HEADERS`.
    pub env_headers: String,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: grpc, else http/protobuf.
    pub grpc: bool,
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    pub attrs: String,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
    pub traces_endpoint: String,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`.
    pub timeout: String,
    /// `OTEL_EXPORTER_OTLP_COMPRESSION`.
    pub compression: String,
}

#[cfg(any(test, fuzzing))]
impl ParserInputs {
    /// Resolves the settings (which must not panic) and checks that an error is one line and
    /// that what may be logged (Debug and Display output) holds no header value: it must not
    /// change when every header value is replaced.
    pub fn check(&self) -> Result<(), String> {
        let args = OtlpArgs::for_parsers(self.endpoint.clone(), self.flag_headers.clone());
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_HEADERS" => Some(self.env_headers.clone()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => {
                Some(if self.grpc { "grpc" } else { "http/protobuf" }.to_owned())
            }
            "OTEL_RESOURCE_ATTRIBUTES" => Some(self.attrs.clone()),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some(self.traces_endpoint.clone()),
            "OTEL_EXPORTER_OTLP_TIMEOUT" => Some(self.timeout.clone()),
            "OTEL_EXPORTER_OTLP_COMPRESSION" => Some(self.compression.clone()),
            _ => None,
        };
        match OtlpConfig::resolve(&args, &env) {
            Ok(Some(cfg)) => {
                let mut blank = cfg.clone();
                for s in blank.metrics.iter_mut().chain(blank.traces.iter_mut()) {
                    for (_, v) in &mut s.headers {
                        v.clear();
                    }
                }
                let shown = |c: &OtlpConfig| -> Vec<String> {
                    c.metrics
                        .iter()
                        .chain(c.traces.iter())
                        .map(|s| format!("{c:?} {s}"))
                        .collect()
                };
                if shown(&cfg) != shown(&blank) {
                    return Err(format!("header values shown: {:?}", shown(&cfg)));
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) if e.contains('\n') => Err(format!("multi-line error: {e}")),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(any(test, fuzzing))]
impl OtlpArgs {
    /// The flags the parser tests and fuzz targets vary (a base endpoint and `--otlp-header`s),
    /// everything else at its default.
    pub fn for_parsers(endpoint: String, headers: Vec<(String, String)>) -> Self {
        Self {
            otlp_endpoint: Some(endpoint),
            otlp_protocol: None,
            otlp_interval: Duration::from_secs(10),
            otlp_headers: headers,
            otlp_metrics_endpoint: None,
            otlp_traces_endpoint: None,
            otlp_timeout: None,
            otlp_compression: None,
            otlp_certificate: None,
            otlp_client_certificate: None,
            otlp_client_key: None,
            trace_sample_ratio: 1.0,
            trace_max_spans_per_second: 10,
        }
    }
}

/// Parses `--otlp-interval`: `10s`, `500ms`, `2m` or a plain number of seconds, 10ms to 24h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::cli::duration_within(
        s,
        (Duration::from_millis(10), Duration::from_secs(86_400)),
        "a duration",
        "10s, 500ms or 1m",
    )
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

/// Where and how one signal is exported.
#[derive(Clone, PartialEq)]
pub struct SignalConfig {
    pub protocol: OtlpProtocol,
    /// The full URL requests go to (HTTP: with `/v1/<signal>`; gRPC: the server address).
    pub url: Uri,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
    pub compression: Compression,
    /// TLS files for https:// URLs (ignored for http://).
    pub tls: TlsFiles,
}

/// TLS files of a client; each with the option or variable it came from, for error messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA to trust instead of the system's store.
    pub ca: Option<(String, PathBuf)>,
    /// Client certificate and key for mutual TLS.
    pub cert: Option<(String, PathBuf)>,
    pub key: Option<(String, PathBuf)>,
}

impl fmt::Debug for SignalConfig {
    // Hand-written so header values (credentials) never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("SignalConfig")
            .field("protocol", &self.protocol)
            .field("url", &self.url)
            .field("header_names", &names)
            .field("timeout", &self.timeout)
            .field("compression", &self.compression)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Display for SignalConfig {
    /// `http://c:4318/v1/metrics (HTTP/protobuf, gzip, headers: api-key)` — no header values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            OtlpProtocol::Grpc => "gRPC",
            OtlpProtocol::HttpProtobuf => "HTTP/protobuf",
        };
        write!(f, "{} ({proto}", self.url)?;
        if self.compression == Compression::Gzip {
            f.write_str(", gzip")?;
        }
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
            write!(f, ", headers: {}", names.join(","))?;
        }
        f.write_str(")")
    }
}

/// Everything OTLP export needs, resolved from flags and the standard environment.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// Metrics export; `None` when only a traces endpoint was given or OTEL_METRICS_EXPORTER=none.
    pub metrics: Option<SignalConfig>,
    /// Span export; `None` when only a metrics endpoint was given or OTEL_TRACES_EXPORTER=none.
    pub traces: Option<SignalConfig>,
    pub interval: Duration,
    pub sample_ratio: f64,
    pub max_spans_per_second: u32,
    /// Resource attributes (service.name, host.name, ...).
    pub resource: Vec<(String, String)>,
}

/// Default per-request timeout (the specification's 10 s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl OtlpConfig {
    /// Resolves the flags against the environment (`env` looks a variable up).
    ///
    /// Per signal, the first that is set wins: the signal's flag, the general flag, the
    /// signal's `OTEL_EXPORTER_OTLP_<SIGNAL>_*` variable, the general `OTEL_EXPORTER_OTLP_*`
    /// variable, the default. Signal-specific endpoints are used as they are; a general
    /// endpoint is a base URL to which HTTP appends `/v1/metrics` or `/v1/traces`. Headers
    /// accumulate in that order (a later equal key wins, the flags last).
    /// `Ok(None)`: no endpoint anywhere, OTLP stays off. `Err`: one line for a usage error.
    pub fn resolve(
        args: &OtlpArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let metrics = signal_config(args, &env, Signal::Metrics)?;
        let traces = signal_config(args, &env, Signal::Traces)?;
        if metrics.is_none() && traces.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            metrics,
            traces,
            interval: args.otlp_interval,
            sample_ratio: args.trace_sample_ratio,
            max_spans_per_second: args.trace_max_spans_per_second,
            resource: resource_attributes(&env),
        }))
    }
}

/// One signal's settings; `Ok(None)` when it has no endpoint or is switched off.
fn signal_config(
    args: &OtlpArgs,
    env: &dyn Fn(&str) -> Option<String>,
    signal: Signal,
) -> Result<Option<SignalConfig>, String> {
    let sig = signal.env_name();
    let var = |suffix: &str| {
        let specific = format!("OTEL_EXPORTER_OTLP_{sig}_{suffix}");
        env(&specific).map(|v| (specific, v)).or_else(|| {
            env(&format!("OTEL_EXPORTER_OTLP_{suffix}"))
                .map(|v| (format!("OTEL_EXPORTER_OTLP_{suffix}"), v))
        })
    };
    let exporter = format!("OTEL_{sig}_EXPORTER");
    if env(&exporter).is_some_and(|v| v.trim() == "none") {
        return Ok(None);
    }
    let (specific_flag, specific_arg) = match signal {
        Signal::Metrics => ("--otlp-metrics-endpoint", &args.otlp_metrics_endpoint),
        Signal::Traces => ("--otlp-traces-endpoint", &args.otlp_traces_endpoint),
    };
    let specific_var = format!("OTEL_EXPORTER_OTLP_{sig}_ENDPOINT");
    // (URL text, where it came from, whether it is a base URL)
    let (endpoint, source, base) = if let Some(e) = specific_arg {
        (e.clone(), specific_flag.to_owned(), false)
    } else if let Some(e) = &args.otlp_endpoint {
        (e.clone(), "--otlp-endpoint".to_owned(), true)
    } else if let Some(e) = env(&specific_var) {
        (e, specific_var, false)
    } else if let Some(e) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
        (e, "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), true)
    } else {
        return Ok(None);
    };

    let protocol = match (args.otlp_protocol, var("PROTOCOL")) {
        (Some(p), _) => p,
        (None, Some((name, p))) => match p.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                return Err(format!(
                    "{name}=`{other}` is not supported; use grpc or http/protobuf"
                ));
            }
        },
        (None, None) => OtlpProtocol::HttpProtobuf,
    };
    let parsed =
        parse_endpoint(&endpoint).map_err(|why| format!("{source} `{endpoint}`: {why}"))?;
    let url = if base && protocol == OtlpProtocol::HttpProtobuf {
        let url = format!(
            "{}{}",
            parsed.to_string().trim_end_matches('/'),
            signal.http_path()
        );
        // The base parsed and the suffix is plain ASCII, so this parses too.
        url.parse().unwrap_or(parsed)
    } else {
        parsed
    };

    let mut headers: Vec<(String, String)> = Vec::new();
    let env_headers = |name: &str| env(name).map(|h| parse_pairs(&h)).unwrap_or_default();
    for (k, v) in env_headers("OTEL_EXPORTER_OTLP_HEADERS")
        .into_iter()
        .chain(env_headers(&format!("OTEL_EXPORTER_OTLP_{sig}_HEADERS")))
        .chain(args.otlp_headers.iter().cloned())
    {
        let (k, v) = parse_header(&format!("{k}={v}")).map_err(|e| format!("OTLP header: {e}"))?;
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

    let timeout = match (args.otlp_timeout, var("TIMEOUT")) {
        (Some(t), _) => t,
        (None, Some((name, ms))) => match ms.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                return Err(format!(
                    "{name}=`{ms}` is not a timeout in milliseconds (e.g. 10000)"
                ));
            }
        },
        (None, None) => DEFAULT_TIMEOUT,
    };
    let compression = match (args.otlp_compression, var("COMPRESSION")) {
        (Some(c), _) => c,
        (None, Some((name, c))) => match c.trim() {
            "gzip" => Compression::Gzip,
            "none" => Compression::None,
            other => {
                return Err(format!(
                    "{name}=`{other}` is not supported; use gzip or none"
                ));
            }
        },
        (None, None) => Compression::None,
    };
    let file = |flag: &str, arg: &Option<PathBuf>, suffix: &str| {
        arg.as_ref()
            .map(|p| (flag.to_owned(), p.clone()))
            .or_else(|| var(suffix).map(|(name, v)| (name, PathBuf::from(v.trim()))))
    };
    let tls = TlsFiles {
        ca: file("--otlp-certificate", &args.otlp_certificate, "CERTIFICATE"),
        cert: file(
            "--otlp-client-certificate",
            &args.otlp_client_certificate,
            "CLIENT_CERTIFICATE",
        ),
        key: file("--otlp-client-key", &args.otlp_client_key, "CLIENT_KEY"),
    };
    if url.scheme_str() == Some("https") && !cfg!(feature = "tls") {
        return Err(format!(
            "{source} `{endpoint}`: this build has no TLS (agent built without its `tls` \
             feature); use http:// to a node-local collector or a build with TLS"
        ));
    }
    Ok(Some(SignalConfig {
        protocol,
        url,
        headers,
        timeout,
        compression,
        tls,
    }))
}

fn parse_endpoint(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .trim()
        .parse()
        .map_err(|_| "not a URL; use e.g. http://otel-collector:4318".to_owned())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(
            "the URL needs the http:// or https:// scheme, e.g. http://otel-collector:4318".into(),
        );
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if uri.query().is_some() {
        return Err("an OTLP URL takes no query string".into());
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

    impl OtlpConfig {
        fn m(&self) -> &SignalConfig {
            self.metrics.as_ref().unwrap()
        }
        fn t(&self) -> &SignalConfig {
            self.traces.as_ref().unwrap()
        }
    }

    #[test]
    fn per_signal_settings() {
        let env = |k: &str| {
            Some(
                match k {
                    "OTEL_EXPORTER_OTLP_ENDPOINT" => "http://base:4318",
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => "https://traces:4317/custom",
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" => "grpc",
                    "OTEL_EXPORTER_OTLP_TIMEOUT" => "2500",
                    "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT" => "700",
                    "OTEL_EXPORTER_OTLP_COMPRESSION" => "gzip",
                    "OTEL_EXPORTER_OTLP_HEADERS" => "a=1,b=1",
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS" => "b=2",
                    "OTEL_EXPORTER_OTLP_CERTIFICATE" => "/ca.pem",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        let c = OtlpConfig::resolve(&args(&[]), &env).unwrap().unwrap();
        // The general endpoint is a base URL; the signal's own is used as it is.
        assert_eq!(c.m().url.to_string(), "http://base:4318/v1/metrics");
        assert_eq!(c.m().protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(c.t().url.to_string(), "https://traces:4317/custom");
        assert_eq!(c.t().protocol, OtlpProtocol::Grpc);
        assert_eq!(c.m().timeout, Duration::from_millis(700));
        assert_eq!(c.t().timeout, Duration::from_millis(2500));
        assert_eq!(c.t().compression, Compression::Gzip);
        assert_eq!(
            c.m().headers,
            [("a".into(), "1".into()), ("b".into(), "1".into())]
        );
        assert_eq!(
            c.t().headers,
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(
            c.t().tls.ca,
            Some(("OTEL_EXPORTER_OTLP_CERTIFICATE".into(), "/ca.pem".into()))
        );

        // Flags win over every variable; the general flag over a signal's variable.
        let c = OtlpConfig::resolve(
            &args(&[
                "--otlp-endpoint",
                "http://flag:4318",
                "--otlp-metrics-endpoint",
                "http://m:9/x",
                "--otlp-timeout",
                "3s",
                "--otlp-compression",
                "none",
                "--otlp-certificate",
                "/flag-ca.pem",
            ]),
            &env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.m().url.to_string(), "http://m:9/x");
        assert_eq!(
            c.t().url.to_string(),
            "http://flag:4318/",
            "grpc: no path added"
        );
        assert_eq!(c.t().timeout, Duration::from_secs(3));
        assert_eq!(c.t().compression, Compression::None);
        assert_eq!(c.m().tls.ca.as_ref().unwrap().0, "--otlp-certificate");

        // One signal alone, or one switched off.
        let c = OtlpConfig::resolve(
            &args(&["--otlp-traces-endpoint", "http://t:1/v1/traces"]),
            &no_env,
        )
        .unwrap()
        .unwrap();
        assert!(c.metrics.is_none());
        let off = |k: &str| match k {
            "OTEL_METRICS_EXPORTER" => Some("none".to_owned()),
            _ => env(k),
        };
        let c = OtlpConfig::resolve(&args(&[]), &off).unwrap().unwrap();
        assert!(c.metrics.is_none() && c.traces.is_some());

        let bad = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" => Some("soon".to_owned()),
            _ => env(k),
        };
        let e = OtlpConfig::resolve(&args(&[]), &bad).unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT=`soon`"),
            "{e}"
        );
        let bad = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_COMPRESSION" => Some("zstd".to_owned()),
            _ => env(k),
        };
        let e = OtlpConfig::resolve(&args(&[]), &bad).unwrap_err();
        assert!(e.contains("zstd") && e.contains("gzip or none"), "{e}");
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
        assert_eq!(c.m().protocol, OtlpProtocol::HttpProtobuf, "spec default");
        assert_eq!(c.m().url.to_string(), "http://c:4318/v1/metrics");
        assert_eq!(c.t().url.to_string(), "http://c:4318/v1/traces");
        assert_eq!(c.m().timeout, Duration::from_secs(10));
        assert_eq!(c.m().compression, Compression::None);
        let c = OtlpConfig::resolve(&args(&["--otlp-endpoint", "http://c:4318/otlp/"]), &no_env)
            .unwrap()
            .unwrap();
        assert_eq!(c.t().url.to_string(), "http://c:4318/otlp/v1/traces");
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
        assert_eq!(c.m().url.to_string(), "http://c:4317/");
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
        assert_eq!(c.m().url.host(), Some("envhost"));
        assert_eq!(c.m().protocol, OtlpProtocol::Grpc);
        assert_eq!(
            c.t().headers,
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
        assert_eq!(c.t().url.host(), Some("cli"));
        assert_eq!(c.t().protocol, OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn bad_endpoints_are_one_line_errors() {
        for (bad, why) in [
            ("not a url", "not a URL"),
            ("ftp://x:1", "http://"),
            ("localhost:4318", "http://"),
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
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2C%zz%"), "a=b,%zz%");
    }
}
