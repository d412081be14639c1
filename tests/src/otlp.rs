//! OTLP export end to end: a real OTLP receiver (tonic gRPC or axum HTTP/protobuf) runs inside
//! the test and decodes what the real agent sends with opentelemetry-proto's generated types.
//! Spans of a distinctive-comm workload are counted exactly; the OTLP metric
//! `tanzhen.tcp.connects` must equal `/metrics`; a receiver that is down then up must see the
//! export resume while the agent keeps running and counts the failures.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{KeyValue, any_value::Value},
    metrics::v1::{metric::Data, number_data_point},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use prost::Message as _;

use crate::{Agent, FakeContainer, comm, free_port, http_get, tanzhen_bin};

/// What the receiver got.
#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// `authorization` header values seen by the HTTP receiver.
    auth: Vec<String>,
    /// Compression of each request: `Content-Encoding` (HTTP) or `grpc-encoding` (gRPC), or
    /// "identity".
    encodings: Vec<String>,
}

type Shared = Arc<Mutex<Received>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Grpc,
    Http,
}

impl Proto {
    fn flag(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http-protobuf",
        }
    }
}

/// An OTLP receiver serving on a loopback port until dropped (its runtime goes with it, which
/// closes the listening socket).
struct Receiver {
    addr: SocketAddr,
    got: Shared,
    _rt: tokio::runtime::Runtime,
}

struct Grpc(Shared);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        got.encodings.push(grpc_encoding(&req));
        got.traces.push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        got.encodings.push(grpc_encoding(&req));
        got.metrics.push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn grpc_encoding<T>(req: &tonic::Request<T>) -> String {
    req.metadata()
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_owned()
}

/// The body as sent, gunzipped when `Content-Encoding: gzip`; the encoding is recorded.
fn http_body(got: &Shared, headers: &axum::http::HeaderMap, body: bytes::Bytes) -> Vec<u8> {
    use std::io::Read as _;
    let enc = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_owned();
    let mut out = Vec::new();
    if enc == "gzip" {
        let _ = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out);
    } else {
        out = body.to_vec();
    }
    got.lock().unwrap().encodings.push(enc);
    out
}

async fn http_traces(
    axum::extract::State(got): axum::extract::State<Shared>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> (axum::http::StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(&http_body(&got, &headers, body)[..]) {
        Ok(r) => {
            got.lock().unwrap().traces.push(r);
            (
                axum::http::StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
    }
}

async fn http_metrics(
    axum::extract::State(got): axum::extract::State<Shared>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> (axum::http::StatusCode, Vec<u8>) {
    match ExportMetricsServiceRequest::decode(&http_body(&got, &headers, body)[..]) {
        Ok(r) => {
            let mut got = got.lock().unwrap();
            got.metrics.push(r);
            if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
                got.auth.push(v.to_owned());
            }
            (
                axum::http::StatusCode::OK,
                ExportMetricsServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
    }
}

/// PEM files of a test PKI made with `openssl`: a CA, a server certificate for 127.0.0.1 and a
/// client certificate, all signed by the CA. Removed when dropped.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn create() -> Self {
        let dir = std::env::temp_dir().join(format!("tanzhen-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(&dir)
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-days", "1", "-subj", "/CN=tanzhen test CA"],
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        );
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!("basicConstraints=CA:FALSE\n{ext}\n"),
            )
            .unwrap();
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-subj", &format!("/CN=tanzhen {name}")],
                    &[
                        "-keyout",
                        &format!("{name}.key"),
                        "-out",
                        &format!("{name}.csr"),
                    ],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A rustls server configuration from the test PKI that requires a client certificate.
fn mtls_server_config(pki: &Pki, alpn: &[u8]) -> tokio_rustls::rustls::ServerConfig {
    use tokio_rustls::rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::WebPkiClientVerifier,
    };
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.read("ca.pem")) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let chain = CertificateDer::pem_slice_iter(&pki.read("server.pem"))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&pki.read("server.key")).unwrap();
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_client_cert_verifier(verifier)
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

impl Receiver {
    /// Starts a receiver on `port` (0: any free port).
    fn start(proto: Proto, port: u16) -> Self {
        Self::start_tls(proto, port, None)
    }

    /// [`Receiver::start`], over TLS requiring a client certificate when `pki` is given. The
    /// gRPC receiver accepts gzip; the HTTP one also serves the `/custom/*` paths.
    fn start_tls(proto: Proto, port: u16, pki: Option<&Pki>) -> Self {
        let tls = pki.map(|p| {
            Arc::new(mtls_server_config(
                p,
                if proto == Proto::Grpc {
                    b"h2"
                } else {
                    b"http/1.1"
                },
            ))
        });
        let std_listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind the OTLP receiver");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let got = Shared::default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let g = got.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let gz = tonic::codec::CompressionEncoding::Gzip;
            let traces = TraceServiceServer::new(Grpc(g.clone())).accept_compressed(gz);
            let metrics = MetricsServiceServer::new(Grpc(g.clone())).accept_compressed(gz);
            let app = axum::Router::new()
                .route("/v1/traces", axum::routing::post(http_traces))
                .route("/v1/metrics", axum::routing::post(http_metrics))
                .route("/custom/traces", axum::routing::post(http_traces))
                .route("/custom/metrics", axum::routing::post(http_metrics))
                .with_state(g);
            match (proto, tls) {
                (Proto::Grpc, None) => {
                    tonic::transport::Server::builder()
                        .add_service(traces)
                        .add_service(metrics)
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await
                        .unwrap();
                }
                (Proto::Grpc, Some(tls)) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    let incoming = async_stream_of_tls(listener, acceptor);
                    tonic::transport::Server::builder()
                        .add_service(traces)
                        .add_service(metrics)
                        .serve_with_incoming(incoming)
                        .await
                        .unwrap();
                }
                (Proto::Http, None) => axum::serve(listener, app).await.unwrap(),
                (Proto::Http, Some(tls)) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, app) = (acceptor.clone(), app.clone());
                        tokio::spawn(async move {
                            // A client that fails the handshake (untrusted CA) just goes away.
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let svc = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
        });
        Self { addr, got, _rt: rt }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Span> {
        let got = self.got.lock().unwrap();
        got.traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    /// The newest metrics request.
    fn last_metrics(&self) -> Option<ExportMetricsServiceRequest> {
        self.got.lock().unwrap().metrics.last().cloned()
    }
}

/// Accepted TLS connections as a stream for tonic (handshake failures are skipped).
fn async_stream_of_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> tokio_stream::wrappers::UnboundedReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(s));
                }
            });
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(Value::IntValue(v)) => Some(*v),
        _ => None,
    }
}

/// In a thread named `name`: `ok` connects to a listener (accepted by another thread), then
/// `refused` connects to a closed port. Returns (listener port, closed port).
fn workload(name: &str, ok: usize, refused: usize) -> (u16, u16) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let to = l.local_addr().unwrap();
    let acceptor = thread::spawn(move || {
        for _ in 0..ok {
            drop(l.accept().expect("accept"));
        }
    });
    let closed = free_port();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            for _ in 0..ok {
                drop(std::net::TcpStream::connect(to).expect("connect"));
            }
            for _ in 0..refused {
                let e = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, closed))
                    .expect_err("a closed port refuses");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
            }
        })
        .unwrap()
        .join()
        .unwrap();
    acceptor.join().unwrap();
    (to.port(), closed)
}

/// Two IPv6 loopback connects from a thread named `name`; the listener's port, or `None`
/// without IPv6 loopback (the tcp tests already fail loudly then).
fn workload_v6(name: &str) -> Option<u16> {
    let l = TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).ok()?;
    let to = l.local_addr().unwrap();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            for _ in 0..2 {
                drop(std::net::TcpStream::connect(to).expect("connect over IPv6"));
            }
        })
        .unwrap()
        .join()
        .unwrap();
    Some(to.port())
}

fn spans_of(r: &Receiver, comm: &str) -> Vec<Span> {
    r.spans()
        .into_iter()
        .filter(|s| str_attr(&s.attributes, "process.executable.name").as_deref() == Some(comm))
        .collect()
}

/// Polls `cond` until it holds or `timeout` passes (events and exports are asynchronous).
fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// `tanzhen.tcp.connects` for `comm` and `outcome` in an OTLP metrics request.
fn otlp_connects(req: &ExportMetricsServiceRequest, comm: &str, outcome: &str) -> Option<i64> {
    req.resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .filter(|m| m.name == "tanzhen.tcp.connects")
        .find_map(|m| match &m.data {
            Some(Data::Sum(s)) => s.data_points.iter().find_map(|p| {
                let ours = str_attr(&p.attributes, "process.executable.name").as_deref()
                    == Some(comm)
                    && str_attr(&p.attributes, "outcome").as_deref() == Some(outcome);
                match (ours, &p.value) {
                    (true, Some(number_data_point::Value::AsInt(v))) => Some(*v),
                    _ => None,
                }
            }),
            _ => None,
        })
}

fn spans_and_metrics(proto: Proto) {
    let rx = Receiver::start(proto, 0);
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--otlp-endpoint",
        &rx.url(),
        "--otlp-protocol",
        proto.flag(),
        "--otlp-interval",
        "500ms",
    ]);
    let name = comm(if proto == Proto::Grpc { "tzog" } else { "tzoh" });
    let unix_ns = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let before = unix_ns();
    let (ok_port, closed_port) = workload(&name, 20, 10);
    let after = unix_ns();
    let v6_name = comm(if proto == Proto::Grpc { "tz6g" } else { "tz6h" });
    let v6 = workload_v6(&v6_name);

    wait_until(Duration::from_secs(20), || spans_of(&rx, &name).len() >= 30);
    // Let duplicates (if any) arrive too, so "exactly" means exactly.
    thread::sleep(Duration::from_millis(1500));
    let spans = spans_of(&rx, &name);
    assert_eq!(
        spans.len(),
        30,
        "spans for comm {name}\n{}",
        agent.log_text()
    );

    // The kernel's monotonic timestamps, converted to wall-clock time, fall inside the
    // workload's own wall-clock window (with 1 s of slack for clock adjustments).
    let (lo, hi) = (before - 1_000_000_000, after + 1_000_000_000);
    let mut failed = 0;
    for s in &spans {
        assert_eq!(s.kind, SpanKind::Client as i32, "{s:?}");
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.span_id.len(), 8);
        assert!(s.start_time_unix_nano <= s.end_time_unix_nano, "{s:?}");
        assert!(
            lo <= s.start_time_unix_nano && s.end_time_unix_nano <= hi,
            "span [{}, {}] outside the workload [{before}, {after}]",
            s.start_time_unix_nano,
            s.end_time_unix_nano
        );
        let a = &s.attributes;
        assert_eq!(str_attr(a, "network.transport").as_deref(), Some("tcp"));
        assert_eq!(str_attr(a, "network.type").as_deref(), Some("ipv4"));
        assert_eq!(
            str_attr(a, "network.peer.address").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(str_attr(a, "server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            int_attr(a, "process.pid"),
            Some(i64::from(std::process::id()))
        );
        let port = int_attr(a, "network.peer.port").expect("network.peer.port");
        let status = s.status.clone().unwrap_or_default().code;
        if status == StatusCode::Error as i32 {
            failed += 1;
            assert_eq!(port, i64::from(closed_port), "{s:?}");
        } else {
            assert_eq!(status, StatusCode::Unset as i32, "{s:?}");
            assert_eq!(port, i64::from(ok_port), "{s:?}");
        }
    }
    assert_eq!(failed, 10, "failed connects carry status ERROR");

    if let Some(v6_port) = v6 {
        assert!(wait_until(Duration::from_secs(20), || spans_of(
            &rx, &v6_name
        )
        .len()
            >= 2));
        for s in spans_of(&rx, &v6_name) {
            let a = &s.attributes;
            assert_eq!(
                str_attr(a, "network.type").as_deref(),
                Some("ipv6"),
                "{s:?}"
            );
            assert_eq!(str_attr(a, "network.peer.address").as_deref(), Some("::1"));
            assert_eq!(int_attr(a, "network.peer.port"), Some(i64::from(v6_port)));
        }
        assert_eq!(spans_of(&rx, &v6_name).len(), 2);
    }

    // The resource names the agent.
    let resource = rx.got.lock().unwrap().traces[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    assert_eq!(
        str_attr(&resource.attributes, "service.name").as_deref(),
        Some("tanzhen")
    );
    assert!(str_attr(&resource.attributes, "host.name").is_some());
    assert!(str_attr(&resource.attributes, "host.arch").is_some());

    // Metrics: the OTLP counter equals /metrics.
    let ok = wait_until(Duration::from_secs(20), || {
        rx.last_metrics().is_some_and(|m| {
            otlp_connects(&m, &name, "established") == Some(20)
                && otlp_connects(&m, &name, "failed") == Some(10)
        })
    });
    let scrape = agent.scrape();
    let prom = |outcome| {
        scrape.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &name), ("outcome", outcome)],
        )
    };
    assert_eq!((prom("established"), prom("failed")), (20.0, 10.0));
    let m = rx.last_metrics().expect("a metrics export");
    assert!(
        ok,
        "OTLP tanzhen.tcp.connects: established {:?} failed {:?}",
        otlp_connects(&m, &name, "established"),
        otlp_connects(&m, &name, "failed")
    );
    let duration = m
        .resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .find(|m| m.name == "tanzhen.tcp.connect.duration")
        .expect("tanzhen.tcp.connect.duration");
    assert_eq!(duration.unit, "s");
    let Some(Data::Histogram(h)) = &duration.data else {
        panic!("{duration:?}")
    };
    let p = h
        .data_points
        .iter()
        .find(|p| str_attr(&p.attributes, "process.executable.name").as_deref() == Some(&name))
        .expect("histogram point for our comm");
    assert_eq!(p.count, 20);
    assert_eq!(p.explicit_bounds.len(), 17, "the Prometheus buckets");
    assert_eq!(p.bucket_counts.len(), 18);
    assert_eq!(p.bucket_counts.iter().sum::<u64>(), 20);
    assert_eq!(
        scrape.sum(
            "tanzhen_otlp_export_failures_total",
            &[("signal", "traces")]
        ),
        0.0,
        "{}",
        agent.log_text()
    );
    assert_eq!(scrape.sum("tanzhen_otlp_dropped_total", &[]), 0.0);
}

#[test]
fn grpc_spans_and_metrics() {
    spans_and_metrics(Proto::Grpc);
}

#[test]
fn http_spans_and_metrics() {
    spans_and_metrics(Proto::Http);
}

#[test]
fn collector_down_then_up() {
    let port = free_port();
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{port}"),
        "--otlp-protocol",
        "grpc",
        "--otlp-interval",
        "300ms",
    ]);
    let failures = |signal| {
        agent
            .scrape()
            .sum("tanzhen_otlp_export_failures_total", &[("signal", signal)])
    };
    // Nobody listens: exports fail, the agent keeps serving.
    let name = comm("tzod");
    workload(&name, 3, 2);
    assert!(
        wait_until(Duration::from_secs(20), || failures("metrics") >= 2.0
            && failures("traces") >= 1.0),
        "export failures were not counted\n{}",
        agent.log_text()
    );
    assert_eq!(http_get(agent.addr, "/healthz").unwrap().0, 200);

    // The collector comes up on that port: the queued spans and fresh metrics arrive.
    let rx = Receiver::start(Proto::Grpc, port);
    let resumed = wait_until(Duration::from_secs(30), || {
        spans_of(&rx, &name).len() >= 5
            && rx
                .last_metrics()
                .is_some_and(|m| otlp_connects(&m, &name, "established") == Some(3))
    });
    assert!(
        resumed,
        "export did not resume: {} spans\n{}",
        spans_of(&rx, &name).len(),
        agent.log_text()
    );
    assert_eq!(spans_of(&rx, &name).len(), 5, "queued spans, each once");
    // The receiver can hold the request before the agent has counted the export's answer.
    let m = crate::wait_for(&agent, Duration::from_secs(10), |m| {
        m.sum("tanzhen_otlp_exports_total", &[("signal", "metrics")]) >= 1.0
    });
    assert!(m.sum("tanzhen_otlp_export_failures_total", &[]) >= 3.0);
    assert_eq!(m.sum("tanzhen_otlp_dropped_total", &[]), 0.0);
}

#[test]
fn bad_otlp_url_exits_2_with_one_line() {
    for (url, needle) in [
        ("nonsense url", "not a URL"),
        ("ftp://collector:4318", "https://"),
        (
            "https://collector:4318",
            "--otlp-certificate /nonexistent/ca.pem",
        ),
    ] {
        let out = Command::new(tanzhen_bin())
            .args(["run", "--probes", "tcp", "--otlp-endpoint", url])
            .args(["--otlp-certificate", "/nonexistent/ca.pem"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{url}: {err}");
        assert!(err.contains(needle), "{url}: {err}");
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// With the collector down, a connect storm fills the span queue to its bound (8192) and the
/// rest is counted as dropped; memory stays bounded; once the collector is up, the queued spans
/// arrive, each once. (The agent watches the whole host, so other processes' connects share
/// the queue: the checks on our comm are bounds, not equalities.)
#[test]
fn span_queue_is_bounded_while_collector_is_down() {
    const N: usize = 16_000;
    const QUEUE: f64 = 8192.0;
    let port = free_port();
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{port}"),
        "--otlp-protocol",
        "grpc",
        "--otlp-interval",
        "300ms",
        "--trace-max-spans-per-second",
        "1000000",
    ]);
    let rss_before = rss_kib(agent.pid());
    let name = comm("tzos");
    let failed = |m: &crate::Metrics| {
        m.sum(
            "tanzhen_tcp_connects_total",
            &[("comm", &name), ("outcome", "failed")],
        )
    };
    // Chunks, each waited for, so the kernel ring buffer never overflows.
    for chunk in 1..=N / 1000 {
        workload(&name, 0, 1000);
        let m = crate::wait_for(&agent, Duration::from_secs(20), |m| {
            failed(m) >= (chunk * 1000) as f64
        });
        assert_eq!(failed(&m), (chunk * 1000) as f64, "{}", agent.log_text());
    }
    let dropped = |m: &crate::Metrics| m.sum("tanzhen_otlp_dropped_total", &[("signal", "traces")]);
    let m = crate::wait_for(&agent, Duration::from_secs(20), |m| {
        dropped(m) >= N as f64 - QUEUE
    });
    assert!(
        dropped(&m) >= N as f64 - QUEUE,
        "queue bound\n{}",
        agent.log_text()
    );
    assert_eq!(m.sum("tanzhen_events_lost_total", &[]), 0.0);
    let rss_after = rss_kib(agent.pid());
    eprintln!(
        "agent RSS {rss_before} KiB -> {rss_after} KiB with the span queue full, {} spans dropped",
        dropped(&m)
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    let rx = Receiver::start(Proto::Grpc, port);
    // Every one of our connects was either delivered or counted as dropped.
    assert!(
        wait_until(Duration::from_secs(60), || {
            spans_of(&rx, &name).len() as f64 + dropped(&agent.scrape()) >= N as f64
        }),
        "{} spans arrived, {} dropped\n{}",
        spans_of(&rx, &name).len(),
        dropped(&agent.scrape()),
        agent.log_text()
    );
    thread::sleep(Duration::from_millis(1000));
    let spans = spans_of(&rx, &name);
    assert!(spans.len() as f64 <= QUEUE, "{} > queue bound", spans.len());
    let mut ids: Vec<&[u8]> = spans.iter().map(|s| s.span_id.as_slice()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), spans.len(), "a span arrived twice");
}

/// The standard OTEL_* variables configure the exporter: base URL, protocol, headers (sent,
/// never logged), service name and resource attributes; NODE_NAME becomes k8s.node.name.
#[test]
fn otel_environment_is_honoured() {
    let rx = Receiver::start(Proto::Http, 0);
    let url = rx.url();
    let agent = Agent::start_with_env(
        &["--probes", "tcp", "--otlp-interval", "300ms"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &url),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20s3cr3t-token",
            ),
            ("OTEL_SERVICE_NAME", "tz-e2e"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=e2e,team=sre",
            ),
            ("NODE_NAME", "node-e2e"),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || rx.last_metrics().is_some()),
        "{}",
        agent.log_text()
    );
    let m = rx.last_metrics().unwrap();
    let res = m.resource_metrics[0].resource.clone().unwrap().attributes;
    assert_eq!(str_attr(&res, "service.name").as_deref(), Some("tz-e2e"));
    assert_eq!(
        str_attr(&res, "deployment.environment").as_deref(),
        Some("e2e")
    );
    assert_eq!(str_attr(&res, "team").as_deref(), Some("sre"));
    assert_eq!(str_attr(&res, "k8s.node.name").as_deref(), Some("node-e2e"));
    assert_eq!(str_attr(&res, "os.type").as_deref(), Some("linux"));
    assert_eq!(
        rx.got.lock().unwrap().auth.first().map(String::as_str),
        Some("Bearer s3cr3t-token")
    );
    assert!(
        !agent.log_text().contains("s3cr3t"),
        "a header value reached the log"
    );
}

/// A process in a container's cgroup gets `container.id` on its spans.
#[test]
fn spans_carry_the_container_id() {
    let rx = Receiver::start(Proto::Http, 0);
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--otlp-endpoint",
        &rx.url(),
        "--otlp-interval",
        "300ms",
    ]);
    let c = FakeContainer::create();
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    // The shell joins the cgroup, connects (bash's /dev/tcp), then waits for stdin to close so
    // it is still alive when the agent reads /proc/<pid>/cgroup.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec 3<>/dev/tcp/127.0.0.1/{port} && read -r _",
        c.dir.display()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    let pid = i64::from(child.id());
    let of_child = || {
        rx.spans()
            .into_iter()
            .filter(|s| int_attr(&s.attributes, "process.pid") == Some(pid))
            .collect::<Vec<_>>()
    };
    let arrived = wait_until(Duration::from_secs(20), || !of_child().is_empty());
    drop(child.stdin.take());
    let _ = child.wait();
    drop(l);
    assert!(arrived, "no span from the shell\n{}", agent.log_text());
    let spans = of_child();
    assert_eq!(spans.len(), 1);
    assert_eq!(
        str_attr(&spans[0].attributes, "container.id").as_deref(),
        Some(c.id.as_str())
    );
}

/// A collector that accepts connections and never answers: `/metrics` keeps being served and
/// SIGTERM still stops the agent cleanly (the pending exports are abandoned for a bounded
/// final flush).
#[test]
fn hung_collector_does_not_block_serving_or_shutdown() {
    let hole = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    thread::spawn(move || {
        for s in hole.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    for proto in [Proto::Http, Proto::Grpc] {
        let mut agent = Agent::start(&[
            "--probes",
            "tcp",
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{port}"),
            "--otlp-protocol",
            proto.flag(),
            "--otlp-interval",
            "200ms",
        ]);
        workload(&comm("tzoy"), 2, 1);
        // Exports are now stuck waiting for an answer; the endpoint still serves.
        assert!(wait_until(Duration::from_secs(20), || !held
            .lock()
            .unwrap()
            .is_empty()));
        thread::sleep(Duration::from_millis(500));
        assert_eq!(http_get(agent.addr, "/healthz").unwrap().0, 200);
        assert!(
            agent
                .scrape()
                .0
                .contains("tanzhen_otlp_export_failures_total")
        );
        assert_eq!(agent.stop(), Some(0), "{proto:?}\n{}", agent.log_text());
    }
}

/// OTLP alone: `--listen none` serves no HTTP endpoint and still exports everything; without an
/// OTLP endpoint it is a usage error.
#[test]
fn otlp_without_prometheus_endpoint() {
    crate::require_root();
    let rx = Receiver::start(Proto::Grpc, 0);
    let log =
        std::env::temp_dir().join(format!("tanzhen-e2e-otlp-only-{}.log", std::process::id()));
    let mut child = Command::new(tanzhen_bin())
        .args([
            "run",
            "--probes",
            "tcp",
            "--listen",
            "none",
            "--log-level",
            "debug",
            "--otlp-protocol",
            "grpc",
            "--otlp-interval",
            "300ms",
            "--otlp-endpoint",
            &rx.url(),
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // Attached once the probe reports up over OTLP.
    let up = wait_until(Duration::from_secs(60), || {
        rx.last_metrics().is_some_and(|m| {
            m.resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
                .any(|m| m.name == "tanzhen.probe.up")
        })
    });
    assert!(up, "no metrics export\n{}", log_text());
    let name = comm("tzon");
    workload(&name, 3, 1);
    let ok = wait_until(Duration::from_secs(20), || {
        spans_of(&rx, &name).len() >= 4
            && rx.last_metrics().is_some_and(|m| {
                otlp_connects(&m, &name, "established") == Some(3)
                    && otlp_connects(&m, &name, "failed") == Some(1)
            })
    });
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = log_text();
    let _ = std::fs::remove_file(&log);
    assert!(ok, "{} spans\n{text}", spans_of(&rx, &name).len());
    assert_eq!(spans_of(&rx, &name).len(), 4);
    assert!(text.contains("no HTTP endpoint"), "{text}");
    assert_eq!(status.code(), Some(0), "{text}");

    let out = Command::new(tanzhen_bin())
        .args(["run", "--probes", "tcp", "--listen", "none"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing to export"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// https:// collectors with mutual TLS, gzip and per-signal endpoints: spans go over gRPC to
/// one receiver (OTEL_EXPORTER_OTLP_TRACES_* variables), metrics over HTTP/protobuf to another
/// at a custom path (--otlp-metrics-endpoint); both demand a client certificate and see gzip.
/// Without the CA file the same agent cannot verify the collector: failures are counted and
/// the agent keeps serving.
#[test]
fn tls_gzip_and_per_signal_endpoints() {
    let pki = Pki::create();
    let grpc = Receiver::start_tls(Proto::Grpc, 0, Some(&pki));
    let http = Receiver::start_tls(Proto::Http, 0, Some(&pki));
    let traces_url = grpc.https_url("");
    let metrics_url = http.https_url("/custom/metrics");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let agent = Agent::start_with_env(
        &[
            "--probes",
            "tcp",
            "--otlp-interval",
            "300ms",
            "--otlp-metrics-endpoint",
            &metrics_url,
            "--otlp-certificate",
            &ca,
            "--otlp-client-certificate",
            &cert,
            "--otlp-client-key",
            &key,
            "--otlp-timeout",
            "5s",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces_url),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ],
    );
    let name = comm("tzs");
    workload(&name, 3, 1);
    assert!(
        wait_until(Duration::from_secs(30), || spans_of(&grpc, &name).len()
            == 4),
        "expected 4 spans over gRPC+TLS, got {}:\n{}",
        spans_of(&grpc, &name).len(),
        agent.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(30), || http
            .last_metrics()
            .and_then(|m| otlp_connects(&m, &name, "established"))
            == Some(3)),
        "metrics over HTTPS at /custom/metrics (last: {:?}):\n{}",
        http.last_metrics()
            .map(|m| otlp_connects(&m, &name, "established")),
        agent.log_text()
    );
    assert!(
        http.got.lock().unwrap().traces.is_empty(),
        "spans went to the metrics receiver"
    );
    assert!(
        grpc.got.lock().unwrap().metrics.is_empty(),
        "metrics went to the span receiver"
    );
    for rx in [&grpc, &http] {
        let enc = rx.got.lock().unwrap().encodings.clone();
        assert!(
            !enc.is_empty() && enc.iter().all(|e| e == "gzip"),
            "{enc:?}"
        );
    }
    let m = agent.scrape();
    assert_eq!(
        m.sum("tanzhen_otlp_export_failures_total", &[]),
        0.0,
        "{}",
        m.0
    );
    drop(agent);

    // No CA file: the system store does not know the test CA, so every export fails.
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--otlp-interval",
        "300ms",
        "--otlp-endpoint",
        &http.https_url(""),
        "--otlp-compression",
        "none",
    ]);
    assert!(
        wait_until(Duration::from_secs(30), || agent.scrape().sum(
            "tanzhen_otlp_export_failures_total",
            &[("signal", "metrics")]
        ) >= 2.0),
        "untrusted collector certificate must count as failures:\n{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(
        log.contains("certificate") || log.contains("UnknownIssuer"),
        "{log}"
    );
    assert_eq!(http_get(agent.addr, "/healthz").unwrap().0, 200);
}

/// Exporters under stress: `/metrics` is scraped without pause while SIGHUP changes the probe
/// set six times and the OTLP collector is killed and started again on the same port. The
/// agent never exits, every scrape succeeds, and none takes more than 1 s (a functional bound
/// from the issue: a blocked endpoint, not a performance target).
#[test]
fn scrapes_during_reloads_and_a_collector_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let port = free_port();
    let config = std::env::temp_dir().join(format!("tanzhen-{}-stress.toml", std::process::id()));
    let write = |probes: &str| {
        std::fs::write(&config, format!("probes = [{probes}]\n")).unwrap();
    };
    write("\"tcp\"");
    let mut rx = Some(Receiver::start(Proto::Grpc, port));
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{port}"),
        "--otlp-protocol",
        "grpc",
        "--otlp-interval",
        "300ms",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, addr) = (stop.clone(), agent.addr);
        thread::spawn(move || {
            let (mut n, mut max, mut errors) = (0u32, Duration::ZERO, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match http_get(addr, "/metrics") {
                    Ok((200, body)) if body.contains("tanzhen_probe_up") => {}
                    other => errors.push(format!("{other:?}")),
                }
                max = max.max(t.elapsed());
                n += 1;
            }
            (n, max, errors)
        })
    };
    let name = comm("tzst");
    let sets = [
        (
            "\"tcp\", \"sched\"",
            &["tcp", "sched"][..],
            &["syscalls"][..],
        ),
        ("\"sched\", \"syscalls\"", &["sched", "syscalls"], &["tcp"]),
        ("\"syscalls\"", &["syscalls"], &["tcp", "sched"]),
        (
            "\"tcp\", \"syscalls\", \"sched\"",
            &["tcp", "syscalls", "sched"],
            &[],
        ),
        ("\"tcp\"", &["tcp"], &["syscalls", "sched"]),
        ("\"sched\", \"tcp\"", &["sched", "tcp"], &["syscalls"]),
    ];
    for (i, (text, up, down)) in sets.iter().enumerate() {
        if i == 1 {
            // Kill the collector: its runtime (and listening socket) goes.
            rx = None;
        }
        if i == 4 {
            rx = Some(Receiver::start(Proto::Grpc, port));
        }
        write(text);
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) }, 0);
        let m = crate::wait_for(&agent, Duration::from_secs(30), |m| {
            up.iter()
                .all(|p| m.sum("tanzhen_probe_up", &[("probe", p)]) == 1.0)
                && down
                    .iter()
                    .all(|p| m.sum("tanzhen_probe_up", &[("probe", p)]) == 0.0)
        });
        for p in *up {
            assert_eq!(
                m.sum("tanzhen_probe_up", &[("probe", p)]),
                1.0,
                "step {i}: {p}\n{}",
                agent.log_text()
            );
        }
        workload(&name, 2, 2);
    }
    // The restarted collector gets metrics again.
    let rx = rx.expect("collector restarted");
    assert!(
        wait_until(Duration::from_secs(30), || rx.last_metrics().is_some()),
        "no export after the collector restart\n{}",
        agent.log_text()
    );
    stop.store(true, Ordering::Relaxed);
    let (n, max, errors) = scraper.join().unwrap();
    eprintln!("{n} scrapes during the reloads; slowest {max:?}");
    assert!(errors.is_empty(), "failed scrapes: {errors:?}");
    assert!(n >= 20, "only {n} scrapes");
    assert!(max < Duration::from_secs(1), "a scrape took {max:?}");
    let log = agent.log_text();
    assert!(!log.contains("stopped unexpectedly"), "{log}");
    assert!(
        agent
            .scrape()
            .sum("tanzhen_otlp_export_failures_total", &[])
            >= 1.0
    );
    assert_eq!(http_get(agent.addr, "/healthz").unwrap().0, 200);
    let _ = std::fs::remove_file(&config);
}
