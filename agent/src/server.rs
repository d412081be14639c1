//! The HTTP endpoint: `/metrics` (Prometheus/OpenMetrics), `/healthz` and the JSON API under
//! `/api/v1` (see `live::api` and `docs/openapi.yaml`), over plain HTTP or TLS (rustls), with
//! optional bearer-token auth on everything but `/healthz`.

#[cfg(feature = "tls")]
use std::time::Duration;
use std::{path::PathBuf, sync::Arc};

use axum::{
    Router,
    extract::{FromRef, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{MethodRouter, get},
};
use tokio::sync::watch;
#[cfg(feature = "tls")]
use tokio_rustls::rustls;

/// A server TLS configuration.
#[cfg(feature = "tls")]
pub type TlsConfig = Arc<rustls::ServerConfig>;

/// Builds without the `tls` feature cannot hold a TLS configuration.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub enum TlsConfig {}

use crate::{
    export::prometheus::{self, Format},
    live::{Live, api},
    snapshot::Snapshot,
};

/// Security options of the HTTP endpoint (`tanzhen run`).
#[derive(Clone, Debug, clap::Args)]
pub struct HttpArgs {
    /// PEM certificate (chain) to serve the endpoint over HTTPS; needs --tls-key.
    #[arg(long, env = "TANZHEN_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TANZHEN_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// File holding a bearer token: requests to /metrics and /api/v1 (everything but /healthz)
    /// must send `Authorization: Bearer TOKEN` or get 401. The token is never logged.
    #[arg(long, env = "TANZHEN_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
}

/// The endpoint's resolved security: TLS configuration and the expected token.
#[derive(Clone, Default)]
pub struct Security {
    pub tls: Option<TlsConfig>,
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for Security {
    // Hand-written: the token must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Security {
    /// Reads the token file and the TLS key pair; `Err` is one line naming the file and fix.
    pub fn load(args: &HttpArgs) -> Result<Self, String> {
        let token = match &args.auth_token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| format!("--auth-token-file {}: {e}", p.display()))?;
                let t = t.trim();
                if t.is_empty() {
                    return Err(format!(
                        "--auth-token-file {} is empty; write the token into it",
                        p.display()
                    ));
                }
                if t.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(format!(
                        "--auth-token-file {}: the token must be one line without spaces",
                        p.display()
                    ));
                }
                Some(Arc::from(t))
            }
        };
        let tls = match (&args.tls_cert, &args.tls_key) {
            (None, None) => None,
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
            (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
        };
        Ok(Self { tls, token })
    }

    /// Whether requests need a bearer token.
    #[must_use]
    pub fn auth(&self) -> bool {
        self.token.is_some()
    }
}

#[cfg(not(feature = "tls"))]
fn tls_config(_: &std::path::Path, _: &std::path::Path) -> Result<TlsConfig, String> {
    Err(
        "--tls-cert: this build has no TLS (agent built without its `tls` feature); \
         terminate TLS in front of it or use a build with TLS"
            .into(),
    )
}

#[cfg(feature = "tls")]
fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsConfig, String> {
    crate::tls::server_config(("--tls-cert", cert), ("--tls-key", key))
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub snapshot: Arc<Snapshot>,
    pub api: api::ApiState,
}

impl FromRef<AppState> for Arc<Snapshot> {
    fn from_ref(s: &AppState) -> Self {
        s.snapshot.clone()
    }
}

impl FromRef<AppState> for api::ApiState {
    fn from_ref(s: &AppState) -> Self {
        s.api.clone()
    }
}

/// Every route the endpoint serves (all GET): path, handler, and whether the bearer token (when
/// set) is required. `docs/openapi.yaml` documents exactly these paths (a unit test checks).
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>, bool)> {
    vec![
        ("/", get(index), true),
        ("/metrics", get(metrics), true),
        ("/api/v1/probes", get(api::probes), true),
        ("/api/v1/events", get(api::events), true),
        ("/api/v1/top", get(api::top), true),
        ("/healthz", get(|| async { "ok\n" }), false),
    ]
}

/// Serves until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshot: Arc<Snapshot>,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
    security: Security,
) -> std::io::Result<()> {
    let (authed, open): (Vec<_>, Vec<_>) = routes().into_iter().partition(|r| r.2);
    let app = authed
        .into_iter()
        .fold(Router::new(), |r, (path, h, _)| r.route(path, h))
        .route_layer(middleware::from_fn_with_state(
            security.token.clone(),
            require_token,
        ));
    let app = open
        .into_iter()
        .fold(app, |r, (path, h, _)| r.route(path, h))
        .with_state(AppState {
            snapshot,
            api: api::ApiState {
                live,
                stop: stop.clone(),
            },
        });
    let Some(tls) = security.tls else {
        return axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
    };
    serve_tls(listener, app, stop, tls).await
}

#[cfg(not(feature = "tls"))]
async fn serve_tls(
    _: tokio::net::TcpListener,
    _: Router,
    _: watch::Receiver<bool>,
    tls: TlsConfig,
) -> std::io::Result<()> {
    match tls {}
}

/// The HTTPS accept loop: a TLS handshake then HTTP/1.1 per connection.
#[cfg(feature = "tls")]
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
    tls: TlsConfig,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.is_ok() } => return Ok(()),
            res = listener.accept() => match res {
                Ok(c) => c,
                Err(e) => {
                    log::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, app, mut stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        log::debug!("TLS handshake with {peer}: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        log::debug!("HTTPS connection from {peer}: {e}");
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Answers 401 unless the request carries `Authorization: Bearer <token>` (when a token is set).
async fn require_token(
    State(token): State<Option<Arc<str>>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"tanzhen\"")],
                "401 unauthorized: send Authorization: Bearer <token>\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(snapshot): State<Arc<Snapshot>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match prometheus::render(&snapshot, format) {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(e) => {
            log::error!("encoding /metrics: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn index() -> &'static str {
    "tanzhen: see /metrics (Prometheus), /api/v1/probes, /api/v1/events, /api/v1/top and /healthz\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths under `paths:` in docs/openapi.yaml (two-space indented keys starting with `/`).
    fn openapi_paths() -> Vec<String> {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
                .expect("docs/openapi.yaml");
        let mut in_paths = false;
        let mut out = Vec::new();
        for line in text.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line.trim_end() == "paths:";
                continue;
            }
            if in_paths
                && let Some(key) = line.strip_prefix("  ")
                && key.starts_with('/')
                && let Some(path) = key.trim_end().strip_suffix(':')
            {
                out.push(path.trim_matches(['"', '\'']).to_owned());
            }
        }
        out
    }

    #[test]
    fn openapi_documents_every_route_and_only_those() {
        let mut served: Vec<String> = routes().iter().map(|r| r.0.to_owned()).collect();
        let mut documented = openapi_paths();
        served.sort();
        documented.sort();
        assert_eq!(
            served, documented,
            "routes() and docs/openapi.yaml `paths` differ"
        );
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(same(b"", b""));
    }

    fn args(cert: Option<&str>, key: Option<&str>, token: Option<&str>) -> HttpArgs {
        HttpArgs {
            tls_cert: cert.map(PathBuf::from),
            tls_key: key.map(PathBuf::from),
            auth_token_file: token.map(PathBuf::from),
        }
    }

    #[test]
    fn bad_security_files_are_one_line() {
        let dir = std::env::temp_dir().join(format!("tanzhen-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_owned()
        };
        let empty = f("empty", " \n");
        let spaced = f("spaced", "a b\n");
        let junk = f("junk.pem", "not pem\n");
        let err = |a: HttpArgs| Security::load(&a).unwrap_err();
        assert_eq!(
            err(args(None, None, Some(&empty))),
            format!("--auth-token-file {empty} is empty; write the token into it")
        );
        assert!(err(args(None, None, Some(&spaced))).ends_with("one line without spaces"));
        assert_eq!(
            err(args(Some(&junk), None, None)),
            "--tls-cert needs --tls-key"
        );
        assert_eq!(
            err(args(None, Some(&junk), None)),
            "--tls-key needs --tls-cert"
        );
        #[cfg(feature = "tls")]
        assert_eq!(
            err(args(Some(&junk), Some(&junk), None)),
            format!("--tls-cert {junk} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        );
        #[cfg(not(feature = "tls"))]
        assert!(err(args(Some(&junk), Some(&junk), None)).contains("this build has no TLS"));
        assert!(
            err(args(None, None, Some("/nonexistent/token")))
                .starts_with("--auth-token-file /nonexistent/token: ")
        );
        let token = f("token", "s3cret\n");
        let sec = Security::load(&args(None, None, Some(&token))).unwrap();
        assert!(sec.auth());
        assert!(!format!("{sec:?}").contains("s3cret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
