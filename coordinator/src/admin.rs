//! The consortium admin's HTTP endpoints, on loopback (config validation refuses any other
//! address until admin access is authenticated).
//!
//! Routes:
//! - `GET /` — the dashboard: phase, connected and enrolled sites, round history.
//! - `GET /healthz` — `ok` while the coordinator runs (for systemd/Kubernetes probes).
//! - `GET /api/status` — the live [`StatusView`] as JSON.
//! - `GET /api/history` — the saved round history (`state.json`'s `history`) as JSON.
//!
//! Whoever reaches the port must not be able to hurt the coordinator: at most
//! [`AdminLimits::max_connections`] connections at once (more are closed at once, so
//! the process's file descriptors stay for its checkpoints and ledger), a request's headers
//! must arrive within [`AdminLimits::header_timeout`], and no connection lives longer than
//! [`AdminLimits::connection_lifetime`]. A request whose `Host` is not a loopback name is
//! refused (421), so a web page cannot reach the dashboard through DNS rebinding.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};

use fedward_shared::history::{RoundRecord, SavedState, STATE_FILE};

use crate::server::StatusView;

/// What the admin server allows one peer.
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub connection_lifetime: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        // A dashboard and a few probes need a handful of short connections.
        Self { max_connections: 32, header_timeout: Duration::from_secs(5), connection_lifetime: Duration::from_secs(60) }
    }
}

#[derive(Clone)]
struct AdminState {
    status: watch::Receiver<StatusView>,
    state_dir: PathBuf,
}

/// Serves the admin routes on `addr` for as long as the runtime runs; returns the bound
/// address.
pub async fn serve(
    addr: SocketAddr,
    status: watch::Receiver<StatusView>,
    state_dir: PathBuf,
    limits: AdminLimits,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/status", get(status_json))
        .route("/api/history", get(history_json))
        .layer(middleware::from_fn(loopback_host_only))
        .with_state(AdminState { status, state_dir });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(cause = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many admin connections; closed");
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                if let Ok(Err(e)) = tokio::time::timeout(limits.connection_lifetime, connection).await {
                    tracing::debug!(%peer, cause = %e, "admin connection ended");
                }
                drop(slot);
            });
        }
    });
    Ok(local)
}

/// Refuses a request whose `Host` names anything but this machine's loopback. A request
/// without one (HTTP/1.0 probes) is served: browsers, the vehicle of DNS rebinding, always
/// send it.
async fn loopback_host_only(request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        None => None,
        Some(h) => Some(h.to_str().unwrap_or("")),
    };
    if host.is_none_or(is_loopback_host) {
        next.run(request).await
    } else {
        (StatusCode::MISDIRECTED_REQUEST, "the admin endpoints answer only to localhost\n").into_response()
    }
}

fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn status_json(State(s): State<AdminState>) -> Json<StatusView> {
    Json(s.status.borrow().clone())
}

fn history(dir: &std::path::Path) -> Vec<RoundRecord> {
    std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<SavedState>(&b).ok())
        .map(|s| s.history)
        .unwrap_or_default()
}

async fn history_json(State(s): State<AdminState>) -> Json<Vec<RoundRecord>> {
    Json(history(&s.state_dir))
}

async fn dashboard(State(s): State<AdminState>) -> impl IntoResponse {
    let status = s.status.borrow().clone();
    let rows: String = history(&s.state_dir)
        .iter()
        .rev()
        .map(|r| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td></tr>",
                r.round,
                esc(&r.outcome),
                r.sites.iter().map(|x| esc(&x.site)).collect::<Vec<_>>().join(", "),
                r.sites.iter().map(|x| x.num_examples).sum::<u64>(),
                r.mean_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
                r.duration_secs,
                esc(&r.finished_at),
            )
        })
        .collect();
    let sites: String = status
        .enrolled
        .iter()
        .map(|s| {
            let on = status.connected.contains(s);
            format!("<li class='{}'>{} — {}</li>", if on { "on" } else { "off" }, esc(s), if on { "connected" } else { "offline" })
        })
        .collect();
    Html(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>fedward coordinator</title><style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}} .on{{color:#070}} .off{{color:#999}}
code{{background:#f4f4f4;padding:0 .3rem}}</style></head><body>
<h1>fedward coordinator</h1>
<p><b>Phase:</b> {phase} &nbsp; <b>Rounds:</b> {done}/{total} &nbsp; <b>Open round:</b> {open} ({acc}/{off} updates)</p>
<p><b>Global model:</b> <code>{digest}</code></p>
<h2>Sites</h2><ul>{sites}</ul>
<h2>Rounds</h2><table><tr><th>round</th><th>outcome</th><th>sites</th><th>examples</th><th>mean train loss</th><th>seconds</th><th>finished</th></tr>{rows}</table>
</body></html>"#,
        phase = esc(&status.phase),
        done = status.completed_rounds,
        total = status.total_rounds,
        open = status.open_round.map_or("-".into(), |r| r.to_string()),
        acc = status.accepted,
        off = status.offered,
        digest = esc(&status.model_digest),
    ))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: AdminLimits) -> (SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = watch::channel(StatusView::default());
        let addr = serve("127.0.0.1:0".parse().unwrap(), rx, dir.path().to_owned(), limits).await.unwrap();
        (addr, dir)
    }

    async fn get(addr: SocketAddr, path: &str, host: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Resolves when the server closes the connection (a read returns end of stream);
    /// fails instead of hanging when it never does.
    async fn closed_by_server(s: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let closed = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
        tokio::time::timeout(Duration::from_secs(30), closed).await.expect("the server never closed the connection");
    }

    #[test]
    fn only_loopback_names_are_hosts() {
        for ok in ["localhost", "localhost:7080", "127.0.0.1", "127.0.0.1:7080", "[::1]:7080", "[::1]", "LOCALHOST"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in ["", "evil.example", "evil.example:7080", "10.0.0.1:7080", "localhost.evil.example", "[2001:db8::1]:80"] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_foreign_host_is_refused_and_localhost_served() {
        let (addr, _dir) = start(AdminLimits::default()).await;
        assert!(get(addr, "/healthz", &addr.to_string()).await.ends_with("ok"));
        let refused = get(addr, "/api/status", "evil.example").await;
        assert!(refused.starts_with("HTTP/1.1 421"), "{refused}");
        // An HTTP/1.0 probe without a Host header, as the shipped health checks send.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
        let mut probe = String::new();
        s.read_to_string(&mut probe).await.unwrap();
        assert!(probe.ends_with("ok"), "{probe}");
    }

    /// The admin-port exhaustion of issue 17: idle connections beyond the limit are closed
    /// at once, those within it once their headers are late, and the port serves again.
    #[tokio::test]
    async fn idle_connections_are_bounded_and_timed_out() {
        let limits =
            AdminLimits { max_connections: 4, header_timeout: Duration::from_millis(300), connection_lifetime: Duration::from_secs(30) };
        let (addr, _dir) = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Every one of them is closed by the server: six at once, four after the timeout.
        for s in &mut idle {
            closed_by_server(s).await;
        }
        // Half a request, then nothing: also closed.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc").await.unwrap();
        closed_by_server(&mut partial).await;
        assert!(get(addr, "/healthz", "localhost").await.ends_with("ok"));
    }
}
