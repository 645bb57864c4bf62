//! The daemon's loopback endpoint: `GET /status` (the report of `fedward-agent status`, as
//! JSON) and `GET /metrics` (Prometheus). A thin axum shell over [`crate::status`] and
//! [`crate::metrics`].

use time::OffsetDateTime;
use tracing::warn;

use fedward_shared::config::AgentConfig;

use crate::status::compose;

/// Serves `GET /status` (the report as JSON) and `GET /metrics` (Prometheus) on a
/// loopback address until the runtime stops. A port already in use is logged and skipped: the daemon runs without it.
pub async fn serve_status(addr: std::net::SocketAddr, cfg: std::sync::Arc<AgentConfig>) {
    use axum::response::IntoResponse;
    use axum::routing::get;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, cause = %e, "could not open the status endpoint; `fedward-agent status` still works");
            return;
        }
    };
    let report = move |cfg: std::sync::Arc<AgentConfig>| async move {
        tokio::task::spawn_blocking(move || compose(&cfg, OffsetDateTime::now_utc())).await.ok()
    };
    let (for_status, for_metrics) = (cfg.clone(), cfg);
    let app = axum::Router::new()
        .route(
            "/status",
            get(move || async move {
                match report(for_status.clone()).await {
                    Some(r) => axum::Json(r).into_response(),
                    None => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                match report(for_metrics.clone()).await {
                    Some(r) => (
                        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        crate::metrics::metrics().render(&r),
                    )
                        .into_response(),
                    None => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }),
        );
    tracing::info!(%addr, "status endpoint listening");
    if let Err(e) = axum::serve(listener, app).await {
        warn!(cause = %e, "the status endpoint stopped");
    }
}
