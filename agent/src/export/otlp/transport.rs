//! The connection to the collector: tonic for gRPC, hyper for HTTP/protobuf, one per agent
//! and shared by both signals; per-request timeout and the specification's retry classes.

use std::time::Duration;

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
use opentelemetry_proto::tonic::collector::{
    metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
    trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
};
use prost::Message as _;

use super::{OtlpConfig, OtlpProtocol};

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
        assert!(ExportError::Timeout(TIMEOUT).retryable());
    }
}
