//! `fedward-agent serve`: the hospital's triage service, an HTTP shell (axum) around the
//! pure [`desk::Desk`] and the allocation engine.
//!
//! A note comes in, the current global model classifies it (on a blocking thread), the
//! desk decides against the live capacity, and the answer goes back. The model is the
//! daemon's latest global model (`<state_dir>/global-model.safetensors` applied to the
//! base model), re-read when the daemon replaces it; requests in flight finish on the
//! model they started with. Corrections go to the site's feedback file
//! ([`feedback::FeedbackStore`]), which the daemon trains on at the next round.
//!
//! Nothing here writes or logs a note's text, except the corrections file.

pub mod desk;
pub mod feedback;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, Method as HttpMethod, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use fedward_models::bert::BertClassifier;
use fedward_models::text::TextEncoder;
use fedward_shared::config::AgentConfig;
use fedward_shared::fsutil;
use fedward_shared::tensor::TensorSet;

use crate::allocation::{Capacity, Kind, Method, Policy};
use desk::{Desk, DeskError, NewRequest, Release};
use feedback::{FeedbackError, FeedbackStore};

/// Largest request body: a note of the longest allowed length, escaped, with room to spare.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Where the live capacity is kept between restarts (it holds no note).
const CAPACITY_FILE: &str = "capacity.json";

/// What `serve` needs beyond the agent's config.
pub struct ServeOptions {
    pub config: AgentConfig,
    /// Serve this exported model directory instead of the daemon's latest global model.
    pub model_dir: Option<PathBuf>,
    pub max_seq_len: usize,
}

/// A model ready to classify, and where it came from.
struct Loaded {
    model: BertClassifier,
    encoder: TextEncoder,
    /// The global model's digest (short), or the directory served.
    version: String,
}

#[derive(Clone)]
struct AppState {
    desk: Arc<Mutex<Desk>>,
    model: Arc<RwLock<Option<Arc<Loaded>>>>,
    /// The model file's time at the last load attempt.
    attempted: Arc<Mutex<Option<SystemTime>>>,
    feedback: Arc<Mutex<FeedbackStore>>,
    /// Inference runs on blocking threads, this many at once.
    inference: Arc<Semaphore>,
    labels: Arc<[String]>,
    max_note_chars: usize,
    max_seq_len: usize,
    capacity_file: PathBuf,
    tokens: Option<PathBuf>,
}

/// Runs the service until `shutdown` resolves.
pub async fn serve(opts: ServeOptions, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let cfg = &opts.config;
    let s = &cfg.service;
    let method = match s.method.as_str() {
        "greedy" => Method::Greedy,
        "fcfs" => Method::Fcfs,
        _ => Method::Exact,
    };
    let policy = Policy { review_below: s.review_below, wait_weight_per_hour: s.wait_weight_per_hour, ..Policy::default() };
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let capacity_file = cfg.state_dir.join(CAPACITY_FILE);
    let capacity = read_capacity(&capacity_file)?;
    let desk = Desk::new(capacity, policy, method, s.keep_recent).context("the saved capacity is invalid")?;
    let feedback = FeedbackStore::open(&cfg.feedback_data, &cfg.train_data, &cfg.labels, s.max_note_chars)?;
    let state = AppState {
        desk: Arc::new(Mutex::new(desk)),
        model: Arc::new(RwLock::new(None)),
        attempted: Arc::new(Mutex::new(None)),
        feedback: Arc::new(Mutex::new(feedback)),
        inference: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))),
        labels: cfg.labels.clone().into(),
        max_note_chars: s.max_note_chars,
        max_seq_len: opts.max_seq_len,
        capacity_file,
        tokens: s.tokens.clone(),
    };
    let source = match &opts.model_dir {
        Some(dir) => ModelSource::Dir(dir.clone()),
        None => ModelSource::DaemonCache {
            cache: cfg.state_dir.join(crate::state_dir::MODEL_CACHE),
            base: cfg.model_base.clone(),
            labels: cfg.labels.clone(),
        },
    };
    let device = fedward_models::train::device(&cfg.device)?;
    // The first load before listening, so that a healthy service can classify.
    reload_if_newer(&state, &source, &device).await;
    tokio::spawn(watch_model(state.clone(), source, device, s.reload_every));

    let listener = tokio::net::TcpListener::bind(s.listen).await.with_context(|| format!("binding {}", s.listen))?;
    let local = listener.local_addr()?;
    let app = router(state, local);
    info!(listen = %local, method = s.method, "triage service listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    info!("triage service stopped");
    Ok(())
}

fn router(state: AppState, local: SocketAddr) -> Router {
    let api = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/v1/requests", post(submit))
        .route("/v1/requests/{id}", get(request_view))
        .route("/v1/capacity", get(capacity).put(set_capacity))
        .route("/v1/releases", post(release))
        .route("/v1/feedback", post(correct))
        .route("/v1/queue", get(queue))
        .route("/v1/events", get(events))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    let mut app = Router::new().route("/healthz", get(health)).merge(api).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)).with_state(state);
    if local.ip().is_loopback() {
        app = app.layer(middleware::from_fn(loopback_host_only));
    }
    app
}

/// Where the served model comes from.
enum ModelSource {
    Dir(PathBuf),
    DaemonCache { cache: PathBuf, base: PathBuf, labels: Vec<String> },
}

impl ModelSource {
    fn modified(&self) -> Option<SystemTime> {
        match self {
            // A directory is read once.
            ModelSource::Dir(_) => Some(UNIX_EPOCH),
            ModelSource::DaemonCache { cache, .. } => std::fs::metadata(cache).and_then(|m| m.modified()).ok(),
        }
    }

    fn load(&self, device: &candle_core::Device) -> Result<Loaded> {
        match self {
            ModelSource::Dir(dir) => {
                let (model, encoder) = fedward_models::io::load_trained_dir(dir, device)?;
                Ok(Loaded { model, encoder, version: dir.display().to_string() })
            }
            ModelSource::DaemonCache { cache, base, labels } => {
                let set =
                    TensorSet::from_safetensors(&fsutil::read(cache)?, false).with_context(|| format!("reading {}", cache.display()))?;
                let (mut model, encoder) = fedward_models::io::load_dir(base, Some(labels), 0, device)?;
                model.load(&set).context("the global model does not fit the base model")?;
                Ok(Loaded { model, encoder, version: set.digest().short() })
            }
        }
    }
}

async fn watch_model(state: AppState, source: ModelSource, device: candle_core::Device, every: Duration) {
    let source = Arc::new(source);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        reload_if_newer(&state, &source, &device).await;
    }
}

/// Loads the model when its file changed since the last attempt; a model that fails to
/// load leaves the served one in place and is not retried until its file changes again.
async fn reload_if_newer(state: &AppState, source: &ModelSource, device: &candle_core::Device) {
    let Some(modified) = source.modified() else { return };
    if lock(&state.attempted).replace(modified) == Some(modified) {
        return;
    }
    match tokio::task::block_in_place(|| source.load(device)) {
        Ok(loaded) => {
            // Installed before it is announced: whoever reads the line (an operator, the
            // reload test) can rely on the new model answering.
            let version = loaded.version.clone();
            *state.model.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(loaded));
            info!(model = %version, "serving a new model");
        }
        Err(e) => error!(cause = format!("{e:#}"), "could not load the model; still serving the previous one"),
    }
}

fn read_capacity(path: &Path) -> Result<Capacity> {
    if !path.exists() {
        return Ok(Capacity::default());
    }
    let bytes = fsutil::read(path)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a capacity file", path.display()))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An error answer: `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<DeskError> for ApiError {
    fn from(e: DeskError) -> Self {
        let status = match e {
            DeskError::Duplicate(_) => StatusCode::CONFLICT,
            DeskError::Unknown(_) => StatusCode::NOT_FOUND,
            DeskError::NotHeld(_) => StatusCode::CONFLICT,
            DeskError::Invalid(_) | DeskError::Capacity(_) => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.to_string())
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// Parses a JSON body. serde's messages can quote the value that failed, which may be a
/// note's text: only the safe ones (a missing or unknown field, the position) are passed on.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        let what = if message.starts_with("missing field") || message.starts_with("unknown field") {
            message.split(" at line").next().unwrap_or("").chars().take(200).collect()
        } else {
            match e.classify() {
                serde_json::error::Category::Data => "a field has the wrong type or value".to_owned(),
                serde_json::error::Category::Eof => "the body ends too soon".to_owned(),
                _ => "the body is not JSON".to_owned(),
            }
        };
        bad(format!("malformed body: {what} (line {}, column {})", e.line(), e.column()))
    })
}

/// `POST /v1/requests`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    id: Option<String>,
    note: String,
    urgency: u8,
    ward: Option<String>,
    specialty: Option<String>,
    device_type: Option<String>,
    #[serde(default)]
    needs: BTreeSet<String>,
}

async fn submit(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body: RequestBody = parse(&body)?;
    let chars = body.note.trim().chars().count();
    if chars == 0 {
        return Err(bad("note is empty"));
    }
    if chars > s.max_note_chars {
        return Err(bad(format!("note is too long ({chars} characters, max {})", s.max_note_chars)));
    }
    let Some(model) = s.model.read().unwrap_or_else(|e| e.into_inner()).clone() else {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "no model yet: the agent has not received a global model".into()));
    };
    let probs = {
        let _slot = s.inference.acquire().await.map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()))?;
        let note = body.note.clone();
        let (model, max_len) = (model.clone(), s.max_seq_len);
        tokio::task::spawn_blocking(move || fedward_models::train::predict(&model.model, &model.encoder, &[note.as_str()], max_len))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("classifier thread failed: {e}")))?
            // Errors of the encoder and the model name no text.
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("classification failed: {e}")))?
            .pop()
            .unwrap_or_default()
    };
    let labels = &model.model.labels;
    let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let label = labels.get(best).cloned().unwrap_or_default();
    let confidence = f64::from(probs.get(best).copied().unwrap_or(0.0));
    let probabilities: serde_json::Map<String, serde_json::Value> =
        labels.iter().zip(&probs).map(|(l, p)| (l.clone(), serde_json::Value::from(*p))).collect();
    let new = NewRequest {
        id: body.id,
        urgency: body.urgency,
        ward: body.ward,
        specialty: body.specialty,
        device_type: body.device_type,
        needs: body.needs,
    };
    let view = {
        let mut desk = lock(&s.desk);
        desk.submit(new, body.note, Kind::of_label(&label), confidence, now())?
    };
    save_capacity(&s);
    info!(
        request = %view.id,
        predicted = %label,
        confidence = format_args!("{confidence:.3}"),
        urgency = view.urgency,
        status = view.status,
        resource = view.resource.as_deref().unwrap_or("-"),
        model = %model.version,
        "request decided"
    );
    let answer = serde_json::json!({
        "request": view,
        "prediction": { "label": label, "confidence": confidence, "probabilities": probabilities },
        "model": model.version,
    });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the capacity across restarts; a failure is logged (the service goes on).
fn save_capacity(s: &AppState) {
    let json = serde_json::to_vec_pretty(lock(&s.desk).capacity()).unwrap_or_default();
    if let Err(e) = fsutil::atomic_write(&s.capacity_file, &json, false) {
        warn!(cause = %e, "could not save the capacity");
    }
}

async fn request_view(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    Ok(Json(lock(&s.desk).view(&id, now())?).into_response())
}

async fn capacity(State(s): State<AppState>) -> Response {
    Json(lock(&s.desk).capacity().clone()).into_response()
}

async fn set_capacity(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let capacity: Capacity = parse(&body)?;
    lock(&s.desk).set_capacity(capacity, now())?;
    save_capacity(&s);
    info!("capacity updated");
    Ok(Json(lock(&s.desk).capacity().clone()).into_response())
}

/// `POST /v1/releases`: `{"request": ID}` or `{"resource": POOL}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    request: Option<String>,
    resource: Option<String>,
}

async fn release(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body: ReleaseBody = parse(&body)?;
    let release = match (body.request, body.resource) {
        (Some(r), None) => Release::Request(r),
        (None, Some(p)) => Release::Resource(p),
        _ => return Err(bad("give exactly one of request or resource")),
    };
    let queue = {
        let mut desk = lock(&s.desk);
        desk.release(release, now())?;
        desk.queue(now())
    };
    save_capacity(&s);
    info!(queued = queue.queued.len(), "resource released");
    Ok(Json(queue).into_response())
}

/// `POST /v1/feedback`: a clinician's correction.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    request: String,
    label: String,
}

async fn correct(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body: FeedbackBody = parse(&body)?;
    let Some(label) = s.labels.iter().find(|l| l.eq_ignore_ascii_case(body.label.trim())).cloned() else {
        return Err(bad(format!("label must be one of {}", s.labels.join(", "))));
    };
    // Stored first: a correction the site cannot keep changes nothing.
    let note = lock(&s.desk).note(&body.request)?;
    let stored = {
        let mut store = lock(&s.feedback);
        store.record(&note, &label)
    };
    let stored = match stored {
        Ok(stored) => stored,
        Err(e @ FeedbackError::Invalid(_)) => return Err(bad(e.to_string())),
        Err(e) => {
            error!(cause = %e, "could not store a correction");
            return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "the correction could not be stored; see the service's log".into()));
        }
    };
    let corrected = lock(&s.desk).correct(&body.request, Kind::of_label(&label), now())?;
    save_capacity(&s);
    info!(request = %body.request, label = %label, stored = ?stored, "correction recorded");
    Ok(Json(serde_json::json!({ "request": corrected.request, "stored": stored })).into_response())
}

async fn queue(State(s): State<AppState>) -> Response {
    Json(lock(&s.desk).queue(now())).into_response()
}

async fn events(State(s): State<AppState>) -> Response {
    let events: Vec<desk::Event> = lock(&s.desk).events().take(200).cloned().collect();
    Json(events).into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    let model = s.model.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|m| m.version.clone());
    let (queued, review) = {
        let q = lock(&s.desk).queue(now());
        (q.queued.len(), q.review.len())
    };
    let status = if model.is_some() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if model.is_some() { "ok" } else { "no model yet" },
        "model": model,
        "queued": queued,
        "review": review,
    });
    (status, Json(body)).into_response()
}

/// Tokens (when configured) on every route but `/healthz`, and JSON on every write: a web
/// page elsewhere cannot send a JSON body without the browser asking first (CORS).
async fn guard(State(s): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), HttpMethod::POST | HttpMethod::PUT) {
        let json =
            request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return ApiError(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json".into()).into_response();
        }
    }
    if let Some(path) = &s.tokens {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(fedward_shared::access::token_from_authorization);
        // Read at each request: a removed token stops working at once.
        let allowed = match fedward_shared::access::Tokens::load(path) {
            Ok(tokens) => presented.is_some_and(|t| tokens.authenticate(&t).is_some()),
            Err(e) => {
                error!(cause = %e, "the service's tokens file is unusable; refusing every request");
                false
            }
        };
        if !allowed {
            let mut response =
                ApiError(StatusCode::UNAUTHORIZED, "a valid token is needed (Authorization: Bearer TOKEN)".into()).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"fedward triage\""));
            return response;
        }
    }
    next.run(request).await
}

async fn loopback_host_only(request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).map(|h| h.to_str().unwrap_or(""));
    if host.is_none_or(fedward_shared::access::is_loopback_host) {
        next.run(request).await
    } else {
        ApiError(StatusCode::MISDIRECTED_REQUEST, "this service answers only to localhost".into()).into_response()
    }
}

/// The bed manager's page: capacity, the queue and recent decisions, refreshed every few
/// seconds; built in (no CDN, no framework).
const PAGE: &str = include_str!("page.html");
