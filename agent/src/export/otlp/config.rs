//! OTLP configuration: the `run` flags, the standard `OTEL_*` environment (the command line
//! wins), endpoint validation and the resource attributes.

use std::{fmt, time::Duration};

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
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2C%zz%"), "a=b,%zz%");
    }
}
