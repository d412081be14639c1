//! The HTTP endpoint: `/metrics` (Prometheus/OpenMetrics) and `/healthz`.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::watch;

use crate::{
    export::prometheus::{self, Format},
    snapshot::Snapshot,
};

/// Serves until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    snapshot: Arc<Snapshot>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/", get(index))
        .with_state(snapshot);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
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
    "tanzhen: see /metrics (Prometheus) and /healthz\n"
}
