//! The consortium admin's HTTP endpoints: dashboard, read-only audit routes, federation
//! control. Who may use them is [`fedward_shared::access`]: bearer tokens with a role
//! (`auditor` reads, `admin` also controls), HTTPS with the coordinator's certificate
//! whenever the address is not loopback; config validation makes an unauthenticated
//! endpoint impossible anywhere but loopback.
//!
//! Routes (`A`: auditor or admin; `C`: admin only; `-`: anyone):
//! - `-` `GET /healthz` — `ok` while the coordinator runs (probes).
//! - `A` `GET /` — the dashboard ([`crate::dashboard`]); `GET /api/status`, `GET /api/history`
//!   and `GET /api/privacy` (each site's epsilon spent, from the ledger) as JSON.
//! - `A` `GET /api/ledger` — the coordinator's signed ledger (JSON lines), and
//!   `GET /api/ledger/public-key` — the key that verifies it (`audit verify`).
//! - `A` `GET /api/admin-log` — the admin audit log (JSON lines, hash-chained).
//! - `C` `POST /api/control/pause`, `/api/control/resume`, `/api/control/next-round`.
//! - `C` `POST /api/sites/{site}/enrol` (body `{"fingerprint": "..."}` or `{}`),
//!   `POST /api/sites/{site}/suspend`, `POST /api/revocations` (`{"serial", "reason"}`).
//!
//! Every `C` request, done or refused, is in the admin audit log ([`AdminLog`]) before it
//! is answered. A `POST` must be `Content-Type: application/json`: a web page cannot send
//! that across origins without a preflight this server never grants, so a browser that
//! holds an admin's credentials cannot be made to pause the federation (CSRF).
//!
//! Whoever reaches the port must not be able to hurt the coordinator: at most
//! [`AdminLimits::max_connections`] connections at once (more are closed at once, so
//! the process's file descriptors stay for its checkpoints and ledger), a request's headers
//! must arrive within [`AdminLimits::header_timeout`], and no connection lives longer than
//! [`AdminLimits::connection_lifetime`]. On loopback, a request whose `Host` is not a
//! loopback name is refused (421), so a web page cannot reach the dashboard through DNS
//! rebinding.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch, Mutex, Semaphore};

use fedward_shared::access::{token_from_authorization, Role, Tokens};
use fedward_shared::history::{RoundRecord, SavedState, STATE_FILE};
use fedward_shared::wire::SiteId;

use crate::control::{AdminLog, ControlState, LocalRevocation};
use crate::server::{Command, Op, StatusView};

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

/// Asks the process to rebuild the access rules (config, CRL, [`ControlState`]) and hand
/// them to the server, as SIGHUP does; answers whether that worked.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// How the admin server is set up.
pub struct AdminOptions {
    pub addr: SocketAddr,
    /// The tokens file, read at every request (so `admin token add/remove` applies at
    /// once); `None`: unauthenticated, loopback only (config validation).
    pub tokens: Option<PathBuf>,
    /// HTTPS with this configuration (the coordinator's certificate).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub state_dir: PathBuf,
    pub ledger_file: PathBuf,
    /// `ledger.pub`'s text, for auditors.
    pub ledger_public_key: String,
    pub limits: AdminLimits,
}

/// The channels to the running federation.
pub struct AdminLinks {
    pub status: watch::Receiver<StatusView>,
    pub commands: mpsc::Sender<Command>,
    pub reload: mpsc::Sender<ReloadRequest>,
}

struct Controller {
    log: AdminLog,
}

#[derive(Clone)]
struct AdminState {
    status: watch::Receiver<StatusView>,
    commands: mpsc::Sender<Command>,
    reload: mpsc::Sender<ReloadRequest>,
    state_dir: PathBuf,
    ledger_file: PathBuf,
    ledger_public_key: Arc<str>,
    tokens: Option<PathBuf>,
    /// One control request at a time: the state file and the log change together.
    controller: Arc<Mutex<Controller>>,
}

/// Who is asking, once authenticated.
#[derive(Clone, Debug)]
struct Caller {
    name: String,
    role: Role,
}

/// Serves the admin routes for as long as the runtime runs; returns the bound address.
pub async fn serve(options: AdminOptions, links: AdminLinks) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(options.addr).await?;
    let local = listener.local_addr()?;
    let log = AdminLog::open(&options.state_dir)?;
    let state = AdminState {
        status: links.status,
        commands: links.commands,
        reload: links.reload,
        state_dir: options.state_dir,
        ledger_file: options.ledger_file,
        ledger_public_key: options.ledger_public_key.into(),
        tokens: options.tokens,
        controller: Arc::new(Mutex::new(Controller { log })),
    };
    let read = Router::new()
        .route("/", get(dashboard))
        .route("/api/status", get(status_json))
        .route("/api/history", get(history_json))
        .route("/api/privacy", get(privacy_json))
        .route("/metrics", get(metrics_text))
        .route("/api/ledger", get(ledger_file))
        .route("/api/ledger/public-key", get(|State(s): State<AdminState>| async move { s.ledger_public_key.to_string() }))
        .route("/api/admin-log", get(admin_log))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Auditor), authenticate));
    let control = Router::new()
        .route("/api/control/{op}", post(control))
        .route("/api/sites/{site}/{action}", post(site_action))
        .route("/api/revocations", post(revoke))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Admin), authenticate));
    let mut app = Router::new().route("/healthz", get(|| async { "ok" })).merge(read).merge(control).with_state(state);
    if options.addr.ip().is_loopback() {
        app = app.layer(middleware::from_fn(loopback_host_only));
    }
    let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
    let limits = options.limits;
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
            let tls = tls.clone();
            tokio::spawn(async move {
                let served = async {
                    let builder = {
                        let mut b = hyper::server::conn::http1::Builder::new();
                        b.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
                        b
                    };
                    match tls {
                        Some(acceptor) => {
                            let stream = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream))
                                .await
                                .map_err(|_| "TLS handshake timed out".to_owned())?
                                .map_err(|e| format!("TLS handshake failed: {e}"))?;
                            builder.serve_connection(TokioIo::new(stream), service).await.map_err(|e| e.to_string())
                        }
                        None => builder.serve_connection(TokioIo::new(stream), service).await.map_err(|e| e.to_string()),
                    }
                };
                if let Ok(Err(e)) = tokio::time::timeout(limits.connection_lifetime, served).await {
                    tracing::debug!(%peer, cause = %e, "admin connection ended");
                }
                drop(slot);
            });
        }
    });
    Ok(local)
}

/// Lets through a request whose token's role allows `needed`, with its [`Caller`].
async fn authenticate(State((s, needed)): State<(AdminState, Role)>, mut request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        let json =
            request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "control requests must be Content-Type: application/json\n").into_response();
        }
    }
    let caller = match &s.tokens {
        None => Caller { name: "local-unauthenticated".into(), role: Role::Admin },
        Some(path) => {
            let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(token_from_authorization);
            let Some(token) = presented else { return unauthorized("a token is needed (Authorization: Bearer TOKEN)") };
            // Read at each request: a removed token stops working at once. A tokens file
            // that cannot be read, or is open to others, lets nobody in.
            let tokens = match Tokens::load(path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(tokens = %path.display(), cause = %e, "the admin tokens file is unusable; refusing every request");
                    return (StatusCode::SERVICE_UNAVAILABLE, "the coordinator's tokens file is unusable; see its log\n").into_response();
                }
            };
            match tokens.authenticate(&token) {
                Some(h) => Caller { name: h.name.clone(), role: h.role },
                None => {
                    tracing::warn!(path = %request.uri().path(), "admin request with an unknown token refused");
                    return unauthorized("unknown token");
                }
            }
        }
    };
    if !caller.role.allows(needed) {
        let what = request.uri().path().to_owned();
        tracing::warn!(who = %caller.name, role = %caller.role, path = %what, "admin request beyond the caller's role refused");
        let mut c = s.controller.lock().await;
        if let Err(e) =
            c.log.record(crate::server::now_rfc3339(), &caller.name, Some(caller.role), &what, None, "refused: needs the admin role")
        {
            tracing::error!(cause = %e, "could not record in the admin audit log");
        }
        return (StatusCode::FORBIDDEN, format!("{} holds the {} role; this needs {needed}\n", caller.name, caller.role)).into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn unauthorized(why: &str) -> Response {
    // Basic lets a browser prompt for the token (as the password); Bearer is for tools.
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"fedward coordinator\", charset=\"UTF-8\"")], format!("{why}\n"))
        .into_response()
}

/// Refuses a request whose `Host` names anything but this machine's loopback. A request
/// without one (HTTP/1.0 probes) is served: browsers, the vehicle of DNS rebinding, always
/// send it.
async fn loopback_host_only(request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        None => None,
        Some(h) => Some(h.to_str().unwrap_or("")),
    };
    if host.is_none_or(fedward_shared::access::is_loopback_host) {
        next.run(request).await
    } else {
        (StatusCode::MISDIRECTED_REQUEST, "the admin endpoints answer only to localhost\n").into_response()
    }
}

async fn ledger_file(State(s): State<AdminState>) -> Response {
    text_file(&s.ledger_file).await
}

async fn admin_log(State(s): State<AdminState>) -> Response {
    let path = s.controller.lock().await.log.path().to_owned();
    text_file(&path).await
}

async fn text_file(path: &std::path::Path) -> Response {
    match tokio::fs::read(path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/x-ndjson")], bytes).into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ([(header::CONTENT_TYPE, "application/x-ndjson")], Vec::new()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("could not read {}: {e}\n", path.display())).into_response(),
    }
}

/// Records `action` before it is done (no record, no action), does it, and records what
/// came of it; answers 200 with the outcome, or 409 with why it was not done.
async fn audited<F>(s: &AdminState, caller: &Caller, action: &str, target: Option<&str>, act: F) -> Response
where
    F: std::future::Future<Output = Result<String, String>>,
{
    let mut c = s.controller.lock().await;
    if let Err(e) = c.log.record(crate::server::now_rfc3339(), &caller.name, Some(caller.role), action, target, "requested") {
        tracing::error!(cause = %e, "could not record in the admin audit log; refusing the request");
        return (StatusCode::SERVICE_UNAVAILABLE, "the admin audit log cannot be written; nothing was done\n").into_response();
    }
    let result = act.await;
    let outcome = match &result {
        Ok(done) => format!("done: {done}"),
        Err(why) => format!("refused: {why}"),
    };
    tracing::info!(who = %caller.name, action, target, %outcome, "admin control");
    if let Err(e) = c.log.record(crate::server::now_rfc3339(), &caller.name, Some(caller.role), action, target, &outcome) {
        tracing::error!(cause = %e, "could not record the outcome in the admin audit log");
    }
    match result {
        Ok(done) => (StatusCode::OK, format!("{done}\n")).into_response(),
        Err(why) => (StatusCode::CONFLICT, format!("{why}\n")).into_response(),
    }
}

async fn control(State(s): State<AdminState>, Extension(caller): Extension<Caller>, UrlPath(op): UrlPath<String>) -> Response {
    let op = match op.as_str() {
        "pause" => Op::Pause,
        "resume" => Op::Resume,
        "next-round" => Op::NextRound,
        _ => return (StatusCode::NOT_FOUND, "control operations: pause, resume, next-round\n").into_response(),
    };
    let action = format!("{op:?}").to_lowercase();
    let state = s.clone();
    audited(&s, &caller, &action, None, async move {
        // Pausing outlives a restart.
        if matches!(op, Op::Pause | Op::Resume) {
            let mut control = ControlState::load(&state.state_dir).map_err(|e| e.to_string())?;
            control.paused = op == Op::Pause;
            control.save(&state.state_dir).map_err(|e| e.to_string())?;
        }
        let (reply, answer) = oneshot::channel();
        state.commands.send(Command { op, reply }).await.map_err(|_| "the federation is shutting down".to_owned())?;
        answer.await.map_err(|_| "the federation is shutting down".to_owned())?
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolBody {
    fingerprint: Option<String>,
}

async fn site_action(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    UrlPath((site, action)): UrlPath<(String, String)>,
    body: Option<Json<EnrolBody>>,
) -> Response {
    let site = match SiteId::new(site) {
        Ok(site) => site,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    if !matches!(action.as_str(), "enrol" | "suspend") {
        return (StatusCode::NOT_FOUND, "site actions: enrol, suspend\n").into_response();
    }
    let fingerprint = body.and_then(|Json(b)| b.fingerprint);
    if let Some(f) = &fingerprint {
        if let Err(e) = fedward_shared::pki::parse_fingerprint(f) {
            return (StatusCode::BAD_REQUEST, format!("fingerprint: {e}\n")).into_response();
        }
    }
    let state = s.clone();
    let target = site.to_string();
    let enrol = action == "enrol";
    audited(&s, &caller, &action, Some(&target), async move {
        let mut control = ControlState::load(&state.state_dir).map_err(|e| e.to_string())?;
        let done = if enrol {
            control.suspended.remove(&site);
            control.enrolled.insert(site.clone(), fingerprint);
            format!("site {site} enrolled")
        } else {
            control.suspended.insert(site.clone());
            format!("site {site} suspended; its connection is closed")
        };
        control.save(&state.state_dir).map_err(|e| e.to_string())?;
        reload(&state).await?;
        Ok(done)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    serial: String,
    reason: Option<String>,
}

async fn revoke(State(s): State<AdminState>, Extension(caller): Extension<Caller>, Json(body): Json<RevokeBody>) -> Response {
    if let Err(e) = fedward_shared::pki::serial_bytes(&body.serial) {
        return (StatusCode::BAD_REQUEST, format!("serial: {e}\n")).into_response();
    }
    let reason = body.reason.map(|r| fedward_shared::wire::clip_text(r, 256));
    let state = s.clone();
    let who = caller.name.clone();
    audited(&s, &caller, "revoke", Some(&body.serial.clone()), async move {
        let mut control = ControlState::load(&state.state_dir).map_err(|e| e.to_string())?;
        let serial = body.serial;
        if !control.revoked.iter().any(|r| r.serial.eq_ignore_ascii_case(&serial)) {
            control.revoked.push(LocalRevocation { serial: serial.clone(), reason, at: crate::server::now_rfc3339(), by: who });
            control.save(&state.state_dir).map_err(|e| e.to_string())?;
        }
        reload(&state).await?;
        Ok(format!("certificate {serial} revoked on this coordinator (run `pki revoke --serial {serial}` for the CA's signed CRL)"))
    })
    .await
}

async fn reload(s: &AdminState) -> Result<(), String> {
    let (reply, answer) = oneshot::channel();
    s.reload.send(reply).await.map_err(|_| "the coordinator is shutting down".to_owned())?;
    answer.await.map_err(|_| "the coordinator is shutting down".to_owned())?
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

/// Each site's spend as the ledger records it; read off the reactor (the ledger grows with
/// every round).
async fn spend(s: &AdminState) -> std::collections::BTreeMap<String, crate::dashboard::SiteSpend> {
    let path = s.ledger_file.clone();
    tokio::task::spawn_blocking(move || crate::dashboard::ledger_spend(&std::fs::read_to_string(path).unwrap_or_default()))
        .await
        .unwrap_or_default()
}

async fn privacy_json(State(s): State<AdminState>) -> Json<Vec<crate::dashboard::SiteSpend>> {
    Json(spend(&s).await.into_values().collect())
}

/// Prometheus exposition: the live counters, and what the status, the history and the
/// ledger say now.
async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    let status = s.status.borrow().clone();
    let spend = spend(&s).await;
    let dir = s.state_dir.clone();
    let history = tokio::task::spawn_blocking(move || history(&dir)).await.unwrap_or_default();
    let count = |prefix: &str| history.iter().filter(|r| r.outcome.starts_with(prefix)).count() as u64;
    let scrape = crate::metrics::Scrape {
        rounds_completed_in_history: count("completed"),
        rounds_failed_in_history: count("failed"),
        completed_rounds: status.completed_rounds,
        total_rounds: status.total_rounds,
        sites_connected: status.connected.len(),
        sites_enrolled: status.enrolled.len(),
        paused: status.paused,
        spend: spend.values().map(|p| (p.site.clone(), p.epsilon, p.updates, p.last_round)).collect(),
        certificate_expiry: status
            .sites
            .iter()
            .filter_map(|v| {
                let t = time::OffsetDateTime::parse(v.cert_expires.as_deref()?, &time::format_description::well_known::Rfc3339).ok()?;
                Some((v.site.clone(), t.unix_timestamp()))
            })
            .collect(),
        declared_budget: status.sites.iter().filter_map(|v| Some((v.site.clone(), v.budget?.epsilon))).collect(),
    };
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], crate::metrics::metrics().render(&scrape))
}

async fn dashboard(State(s): State<AdminState>) -> impl IntoResponse {
    let status = s.status.borrow().clone();
    let spend = spend(&s).await;
    let dir = s.state_dir.clone();
    let history = tokio::task::spawn_blocking(move || history(&dir)).await.unwrap_or_default();
    Html(crate::dashboard::render(&status, &history, &spend, time::OffsetDateTime::now_utc()))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// An admin server with a stand-in federation that answers every command `Ok`, and
    /// a reload that always works.
    async fn start_with(limits: AdminLimits, tokens: Option<&Tokens>) -> (SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let tokens_path = tokens.map(|t| {
            let p = dir.path().join("tokens");
            fedward_shared::fsutil::write_private_new(&p, t.render().as_bytes()).unwrap();
            p
        });
        let (_tx, status) = watch::channel(StatusView::default());
        let (commands, mut command_rx) = mpsc::channel::<Command>(4);
        let (reload, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(c) = command_rx.recv() => { let _ = c.reply.send(Ok(format!("{:?} done", c.op))); }
                    Some(r) = reload_rx.recv() => { let _ = r.send(Ok(())); }
                    else => break,
                }
            }
        });
        std::fs::write(dir.path().join("ledger.jsonl"), "{\"seq\":0}\n").unwrap();
        let options = AdminOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            tokens: tokens_path,
            tls: None,
            state_dir: dir.path().to_owned(),
            ledger_file: dir.path().join("ledger.jsonl"),
            ledger_public_key: "ed25519 test-key\n".into(),
            limits,
        };
        let addr = serve(options, AdminLinks { status, commands, reload }).await.unwrap();
        (addr, dir)
    }

    async fn start(limits: AdminLimits) -> (SocketAddr, tempfile::TempDir) {
        start_with(limits, None).await
    }

    async fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let body = if method == "POST" { "{}" } else { "" };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn status_of(response: &str) -> u16 {
        response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn tokens_and_roles_decide_who_may_read_and_who_may_control() {
        let mut tokens = Tokens::default();
        tokens.add("alice", Role::Admin, "fwt_admin").unwrap();
        tokens.add("audit-office", Role::Auditor, "fwt_auditor").unwrap();
        let (addr, dir) = start_with(AdminLimits::default(), Some(&tokens)).await;
        let json = "Content-Type: application/json\r\n";
        let admin = format!("Authorization: Bearer fwt_admin\r\n{json}");
        let auditor = format!("Authorization: Bearer fwt_auditor\r\n{json}");
        // Probes need nothing; everything else needs a known token.
        assert_eq!(status_of(&request(addr, "GET", "/healthz", "").await), 200);
        let none = request(addr, "GET", "/api/status", "").await;
        assert_eq!(status_of(&none), 401);
        assert!(none.contains("WWW-Authenticate: Basic") || none.to_lowercase().contains("www-authenticate: basic"), "{none}");
        assert_eq!(status_of(&request(addr, "GET", "/api/status", "Authorization: Bearer fwt_nope\r\n").await), 401);
        assert_eq!(status_of(&request(addr, "POST", "/api/control/pause", json).await), 401);
        // The auditor reads the ledger, its key and the status, and cannot control.
        let ledger = request(addr, "GET", "/api/ledger", &auditor).await;
        assert!(status_of(&ledger) == 200 && ledger.ends_with("{\"seq\":0}\n"), "{ledger}");
        assert!(request(addr, "GET", "/api/ledger/public-key", &auditor).await.ends_with("ed25519 test-key\n"));
        // A browser's login prompt: Basic with the token as the password (base64 of "x:fwt_auditor").
        assert_eq!(status_of(&request(addr, "GET", "/", "Authorization: Basic eDpmd3RfYXVkaXRvcg==\r\n").await), 200);
        assert_eq!(status_of(&request(addr, "POST", "/api/control/pause", &auditor).await), 403);
        assert_eq!(status_of(&request(addr, "POST", "/api/sites/zeta/enrol", &auditor).await), 403);
        // The admin controls; a POST that is not JSON is refused before anything (CSRF).
        assert_eq!(status_of(&request(addr, "POST", "/api/control/pause", "Authorization: Bearer fwt_admin\r\n").await), 415);
        let paused = request(addr, "POST", "/api/control/pause", &admin).await;
        assert!(status_of(&paused) == 200 && paused.ends_with("Pause done\n"), "{paused}");
        assert!(ControlState::load(dir.path()).unwrap().paused, "a pause outlives a restart");
        assert_eq!(status_of(&request(addr, "POST", "/api/sites/zeta/enrol", &admin).await), 200);
        assert_eq!(status_of(&request(addr, "POST", "/api/sites/Not_A_Site/enrol", &admin).await), 400);
        assert!(ControlState::load(dir.path()).unwrap().enrolled.contains_key(&SiteId::new("zeta").unwrap()));
        // Everything the admin did, and the auditor's refused attempts, in the chained log.
        let log = request(addr, "GET", "/api/admin-log", &auditor).await;
        let body = log.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(fedward_shared::access::verify_chain(body).unwrap().0, 6, "{body}");
        assert!(body.contains("\"who\":\"audit-office\"") && body.contains("refused: needs the admin role"), "{body}");
        assert!(body.contains("\"who\":\"alice\"") && body.contains("done: Pause done"), "{body}");
        // A removed token stops working at once.
        let mut fewer = tokens.clone();
        fewer.remove("alice");
        fedward_shared::fsutil::atomic_write(&dir.path().join("tokens"), fewer.render().as_bytes(), true).unwrap();
        assert_eq!(status_of(&request(addr, "GET", "/api/status", &admin).await), 401);
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
            assert!(fedward_shared::access::is_loopback_host(ok), "{ok}");
        }
        for bad in ["", "evil.example", "evil.example:7080", "10.0.0.1:7080", "localhost.evil.example", "[2001:db8::1]:80"] {
            assert!(!fedward_shared::access::is_loopback_host(bad), "{bad}");
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
