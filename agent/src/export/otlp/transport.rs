//! The connection to the collector: tonic for gRPC, hyper for HTTP/protobuf, one per agent
//! and shared by both signals; per-request timeout and the specification's retry classes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Uri,
    header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
    trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
};
use prost::Message as _;

use tonic::codec::CompressionEncoding;

use super::{Compression, OtlpProtocol, SignalConfig};

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

/// The HTTP connector: TLS-capable when the build has TLS.
#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// A TCP connector that also speaks TLS to https:// URLs (when built with TLS), with `alpn`
/// offered (`h2` for gRPC, `http/1.1` for HTTP/protobuf).
fn connector(cfg: &SignalConfig, alpn: &[u8]) -> Result<Connector, ExportError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(cfg.timeout));
    http.set_nodelay(true);
    #[cfg(feature = "tls")]
    {
        http.enforce_http(false);
        let tls = if cfg.url.scheme_str() == Some("https") {
            crate::tls::client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        } else {
            // Never used for http:// URLs; an empty store keeps start-up free of file reads.
            crate::tls::client_config_without_roots()
        }
        .map_err(ExportError::Endpoint)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        Ok(if alpn == b"h2" {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        })
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = alpn;
        Ok(http)
    }
}

/// gRPC over TLS: tonic is handed the URL as `http://` (so that tonic's own TLS, should a
/// build enable one of its TLS features, never refuses an https:// URL it has no config for)
/// and this connector puts the `https` scheme back, so that rustls does the handshake.
#[cfg(feature = "tls")]
#[derive(Clone)]
struct GrpcTls(Connector);

#[cfg(feature = "tls")]
impl tower_service::Service<Uri> for GrpcTls {
    type Response = <Connector as tower_service::Service<Uri>>::Response;
    type Error = <Connector as tower_service::Service<Uri>>::Error;
    type Future = <Connector as tower_service::Service<Uri>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut parts = uri.into_parts();
        parts.scheme = Some(hyper::http::uri::Scheme::HTTPS);
        // Only the scheme changed on a URI that parsed, so this cannot fail.
        let uri = Uri::from_parts(parts).unwrap_or_default();
        self.0.call(uri)
    }
}

/// The gRPC channel to `cfg.url`.
fn grpc_channel(cfg: &SignalConfig) -> Result<tonic::transport::Channel, ExportError> {
    let endpoint = |url: &str| {
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| ExportError::Endpoint(e.to_string()))
            .map(|e| e.timeout(cfg.timeout).connect_timeout(cfg.timeout))
    };
    let url = cfg.url.to_string();
    #[cfg(feature = "tls")]
    if let Some(rest) = url.strip_prefix("https://") {
        return Ok(endpoint(&format!("http://{rest}"))?
            .connect_with_connector_lazy(GrpcTls(connector(cfg, b"h2")?)));
    }
    Ok(endpoint(&url)?.connect_with_connector_lazy(connector(cfg, b"h2")?))
}

/// One signal's connection to the collector.
#[derive(Clone)]
pub struct Transport {
    link: Link,
    /// Per-request timeout.
    timeout: Duration,
    gzip: bool,
}

/// The protocol-specific half of a [`Transport`].
#[derive(Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value per signal, built once at start-up"
)]
enum Link {
    Grpc {
        channel: tonic::transport::Channel,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: Client<Connector, Full<Bytes>>,
        url: Uri,
        headers: HeaderMap,
    },
}

impl Transport {
    /// Builds the client (lazily connecting: a collector that is down is not an error here;
    /// unreadable TLS files are). Must run inside the tokio runtime.
    pub fn new(cfg: &SignalConfig) -> Result<Self, ExportError> {
        let link = match cfg.protocol {
            OtlpProtocol::Grpc => {
                let channel = grpc_channel(cfg)?;
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|_| ExportError::Endpoint(format!("bad metadata key `{k}`")))?;
                    let val = v
                        .parse()
                        .map_err(|_| ExportError::Endpoint(format!("bad value for `{k}`")))?;
                    metadata.insert(key, val);
                }
                Link::Grpc { channel, metadata }
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
                Link::Http {
                    client: Client::builder(TokioExecutor::new())
                        .build(connector(cfg, b"http/1.1")?),
                    url: cfg.url.clone(),
                    headers,
                }
            }
        };
        Ok(Self {
            link,
            timeout: cfg.timeout,
            gzip: cfg.compression == Compression::Gzip,
        })
    }

    fn grpc_request<T>(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        msg: T,
    ) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        *req.metadata_mut() = metadata.clone();
        req.set_timeout(self.timeout);
        req
    }

    /// Posts one protobuf body over HTTP (gzipped when asked), bounded by the timeout.
    async fn post(
        &self,
        client: &Client<Connector, Full<Bytes>>,
        (uri, headers): (&Uri, &HeaderMap),
        body: Vec<u8>,
    ) -> Result<(), ExportError> {
        let mut req =
            hyper::Request::post(uri.clone()).header(CONTENT_TYPE, "application/x-protobuf");
        let body = if self.gzip {
            req = req.header(CONTENT_ENCODING, "gzip");
            gzip_bytes(&body)
        } else {
            body
        };
        let mut req = req.body(Full::new(Bytes::from(body)))?;
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
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ExportError::Timeout(self.timeout))?
    }

    /// Sends one metrics request.
    pub async fn send_metrics(&self, req: ExportMetricsServiceRequest) -> Result<(), ExportError> {
        let (channel, metadata) = match &self.link {
            Link::Grpc { channel, metadata } => (channel, metadata),
            Link::Http {
                client,
                url,
                headers,
            } => return self.post(client, (url, headers), req.encode_to_vec()).await,
        };
        let mut client = MetricsServiceClient::new(channel.clone());
        if self.gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let resp = client.export(self.grpc_request(metadata, req)).await?;
        if let Some(p) = resp.into_inner().partial_success {
            warn_rejected(p.rejected_data_points, "data points", &p.error_message);
        }
        Ok(())
    }

    /// Sends one trace request.
    pub async fn send_traces(&self, req: ExportTraceServiceRequest) -> Result<(), ExportError> {
        let (channel, metadata) = match &self.link {
            Link::Grpc { channel, metadata } => (channel, metadata),
            Link::Http {
                client,
                url,
                headers,
            } => return self.post(client, (url, headers), req.encode_to_vec()).await,
        };
        let mut client = TraceServiceClient::new(channel.clone());
        if self.gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let resp = client.export(self.grpc_request(metadata, req)).await?;
        if let Some(p) = resp.into_inner().partial_success {
            warn_rejected(p.rejected_spans, "spans", &p.error_message);
        }
        Ok(())
    }
}

/// Logs a gRPC partial success (the collector kept the rest of the request).
fn warn_rejected(rejected: i64, what: &str, message: &str) {
    if rejected > 0 {
        log::warn!("OTLP: collector rejected {rejected} {what}: {message}");
    }
}

/// gzip of `data` (default level; writing to a Vec cannot fail).
fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        flate2::Compression::default(),
    );
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classification() {
        assert!(ExportError::Grpc(tonic::Status::unavailable("x")).retryable());
        assert!(!ExportError::Grpc(tonic::Status::unauthenticated("x")).retryable());
        assert!(ExportError::Status(hyper::StatusCode::SERVICE_UNAVAILABLE).retryable());
        assert!(ExportError::Status(hyper::StatusCode::TOO_MANY_REQUESTS).retryable());
        assert!(!ExportError::Status(hyper::StatusCode::BAD_REQUEST).retryable());
        assert!(ExportError::Timeout(Duration::from_secs(1)).retryable());
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let data = b"tanzhen ".repeat(100);
        let z = gzip_bytes(&data);
        assert!(z.len() < data.len() / 4, "{} bytes", z.len());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&z[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
    }
}
