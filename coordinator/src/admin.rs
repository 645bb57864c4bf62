//! The consortium admin's HTTP endpoints (bind them to loopback or an admin network).
//!
//! Routes:
//! - `GET /` — the dashboard: phase, connected and enrolled sites, round history.
//! - `GET /healthz` — `ok` while the coordinator runs (for systemd/Kubernetes probes).
//! - `GET /api/status` — the live [`StatusView`] as JSON.
//! - `GET /api/history` — the saved round history (`state.json`'s `history`) as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use fedward_shared::history::{RoundRecord, SavedState, STATE_FILE};

use crate::server::StatusView;

#[derive(Clone)]
struct AdminState {
    status: watch::Receiver<StatusView>,
    state_dir: PathBuf,
}

/// Serves the admin routes until the returned task is dropped or aborted.
pub async fn serve(addr: SocketAddr, status: watch::Receiver<StatusView>, state_dir: PathBuf) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/status", get(status_json))
        .route("/api/history", get(history_json))
        .with_state(AdminState { status, state_dir });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(cause = %e, "admin server stopped");
        }
    });
    Ok(local)
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
