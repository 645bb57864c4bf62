//! The agent daemon: dials the coordinator (hospitals open no inbound port), takes rounds,
//! trains through a [`Trainer`], and sends updates.
//!
//! Connection failures are retried forever by default with exponential backoff and full
//! jitter; a refusal (certificate, enrolment, protocol version) is final and reported with
//! the coordinator's reason, since retrying cannot fix it. Training runs on a blocking
//! thread, never on the reactor.
//!
//! A round, in order: if the ledger's last release is this round from this model, resend
//! the cached update and stop ([`prior_release`]); otherwise rebuild the accountant from the
//! ledger and review the offer against the site's budget ([`review_offer`]); fetch the
//! model; train and make the update private ([`privatize`]) on a blocking thread, with noise
//! from a fresh OS-seeded [`NoiseRng`]; cache the update ([`ReleasedUpdate`], atomic write),
//! append the release to the ledger (fsync); only then send. A crash anywhere before the
//! append leaves nothing spent; after it, the restarted agent resends the same bytes.
//!
//! A secure round ([`review_secure`]) exchanges keys and shares before the model is
//! fetched ([`secure_setup`]); after training and the privacy step the update is clipped
//! to the offer's bound, encoded in fixed point and masked, the release appended to the
//! ledger, and only then the masked input sent ([`secure_release`]). A secure round is
//! never resent: one already in the ledger is declined.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tracing::{debug, error, info, info_span, warn, Instrument};

use fedward_models::{LocalUpdate, TrainContext, Trainer};
use fedward_net::{
    client_endpoint, paced, read_message, read_tensors, within, write_message, write_update_tensors, ConnectionEnd, StreamError,
};
use fedward_shared::config::{Pace, SiteBudget, Transport};
use fedward_shared::dp::NoiseRng;
use fedward_shared::failpoint;
use fedward_shared::fsutil;
use fedward_shared::ledger::{Body, Ledger, ReleaseRecord};
use fedward_shared::ledger_file::{self, Fragment, LedgerFile, TailRepair};
use fedward_shared::plan::PrivacyPlan;
use fedward_shared::secagg::{SecAggClient, SecAggError, SiteCredentials, Trust, UnixTime};
use fedward_shared::tensor::{manifest_digest, Digest, TensorSet, TensorSpec};
use fedward_shared::wire::{
    self, Capability, DeclaredBudget, Decline, DeclineReason, Hello, MaskedInputHeader, Message, ModelRequest, Ready, RejectCode, RoundId,
    RoundOffer, SiteId, UpdateHeader, PROTOCOL_VERSION,
};

use crate::metrics::{metrics, Phase as MetricPhase, PhaseLabel, ReasonLabel};
use crate::outbox::ReleasedUpdate;
use crate::privacy::{disclosed, distributed_input, privacy_used, privatize, quantize_update, release_score, Applied};
use crate::session::{
    assemble, certificate_warning, check_tensors_reply, check_welcome_site, fits_deadline, prior_release, review_offer, review_secure,
    secure_input, tensors_to_fetch, unrecorded_acceptances, Approved, CachedModel, CachedRelease, Decision, Prior, SecureTerms,
};
use crate::status::{Phase, StatusWriter};

/// The most threads that sample a distributed DP noise share at once (the exact sampler
/// is single-threaded; see [`distributed_input`]).
const MAX_NOISE_THREADS: usize = 8;

/// How the daemon connects and behaves.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// `host:port` of the coordinator.
    pub coordinator_addr: String,
    /// The DNS name in the coordinator's certificate.
    pub server_name: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub state_dir: PathBuf,
    pub budget: SiteBudget,
    pub max_backoff: Duration,
    /// Give up after this many failed attempts in a row (0: never).
    pub max_connect_attempts: u32,
    pub exit_when_finished: bool,
    /// Timeouts, keep-alives and the minimum transfer rate.
    pub transport: Transport,
    /// The largest global model the agent downloads, in bytes: what a coordinator
    /// declares is checked against it before anything is allocated.
    pub max_model_bytes: usize,
    /// Seed of the backoff jitter and, in tests only, of DP noise; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Renew the certificate over the connection before it expires (`None`: never; the
    /// site renews by hand).
    pub renewal: Option<crate::renew::RenewalFiles>,
    /// Fault injection for tests: stop as if the process died right after the ledger
    /// recorded an update and before it is sent. Always `false` in production.
    #[doc(hidden)]
    pub fail_after_ledger_write: bool,
    /// What secure rounds need: the site's certificate and key (to sign its round keys)
    /// and the CA (to check the other sites'). `None`: secure offers are declined.
    pub secagg: Option<SecAggIdentity>,
}

/// A site's identity for secure aggregation, read from its TLS files at start and again
/// when its certificate is renewed.
#[derive(Clone, Debug)]
pub struct SecAggIdentity {
    pub creds: SiteCredentials,
    pub trust: Trust,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonOutcome {
    Finished { completed_rounds: u64, rounds_trained: u64 },
    Shutdown,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the coordinator refused this site: {0}")]
    Refused(String),
    /// A setting of this site can never work (it trusts another CA, expects another server
    /// name, names an address that does not resolve): retrying cannot help.
    #[error("this site's configuration cannot work: {0}")]
    Misconfigured(String),
    #[error("gave up after {attempts} failed connection attempts; last error: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("cannot resolve coordinator address {addr}: {detail}")]
    Address { addr: String, detail: String },
    #[error("local state: {0}")]
    State(String),
    /// The coordinator accepted updates from this site that its ledger does not record:
    /// the ledger was lost, replaced or restored from an older copy.
    #[error("this site's ledger is behind the coordinator's: {0}")]
    LedgerBehind(String),
    /// The [`DaemonOptions::fail_after_ledger_write`] test hook fired.
    #[doc(hidden)]
    #[error("fault injected after the ledger write of round {0}")]
    InjectedFault(u64),
}

/// What ended one connection.
enum SessionEnd {
    Finished {
        completed_rounds: u64,
    },
    /// Transient: reconnect after a backoff.
    Lost(String),
    Refused(String),
    /// A setting here can never work.
    Misconfigured(String),
    /// The agent cannot go on safely (its ledger cannot be written): stop.
    Fatal(String),
    /// The coordinator accepted updates this site's ledger lacks: stop before spending.
    LedgerBehind(String),
    /// The test hook stopped the agent after recording round `0`.
    Fault(u64),
    /// A renewed certificate is installed: reconnect with it at once.
    Renewed,
}

pub use crate::state_dir::{LEDGER, MODEL_CACHE};

/// Runs until the federation is finished (when so configured), a refusal, or `shutdown`.
pub async fn run(opts: DaemonOptions, trainer: Box<dyn Trainer>, shutdown: impl Future<Output = ()>) -> Result<DaemonOutcome, DaemonError> {
    tokio::pin!(shutdown);
    let mut rng = match opts.seed {
        Some(s) => rand_chacha::ChaCha20Rng::seed_from_u64(s),
        None => rand_chacha::ChaCha20Rng::from_os_rng(),
    };
    std::fs::create_dir_all(&opts.state_dir).map_err(|e| DaemonError::State(format!("{}: {e}", opts.state_dir.display())))?;
    // One daemon per state directory: two would both pass the budget check against one
    // ledger. Held until this function returns.
    let _lock = fsutil::lock_dir(&opts.state_dir).map_err(|e| DaemonError::State(e.to_string()))?;
    for removed in fsutil::remove_temp_files(&opts.state_dir).map_err(|e| DaemonError::State(e.to_string()))? {
        warn!(path = %removed.display(), "removed the leftover of an interrupted write");
    }
    // The site this agent is: the name in the certificate it presents, never the name a
    // coordinator says back (its ledger records releases under this one).
    let site = own_site(&opts.tls).map_err(DaemonError::Misconfigured)?;
    warn_of_expiry(&opts.tls);
    // Replaced when the certificate is renewed.
    let mut tls = opts.tls.clone();
    let mut renewal = RenewalState::default();
    let ledger = open_ledger(&opts)?;
    let released = load_released(&opts);
    let mut state = AgentState {
        trainer: Some(trainer),
        cache: load_cache(&opts),
        cache_write: None,
        rounds_trained: 0,
        ledger: Some(ledger),
        released,
        last_train_secs: None,
        status: StatusWriter::new(&opts.state_dir, &opts.coordinator_addr),
        secagg: opts.secagg.clone(),
    };
    info!(status = %opts.state_dir.join(crate::state_dir::STATUS_FILE).display(), "agent state ready");
    let mut failures = 0u32;
    let outcome = run_sessions(&opts, site, &mut tls, &mut renewal, &mut state, &mut rng, &mut failures, &mut shutdown).await;
    let (phase, detail) = match &outcome {
        Ok(DaemonOutcome::Finished { completed_rounds, rounds_trained }) => {
            (Phase::Finished, Some(format!("after {completed_rounds} rounds, {rounds_trained} trained here")))
        }
        Ok(DaemonOutcome::Shutdown) => (Phase::Stopped, Some("stopped by a signal".to_owned())),
        Err(DaemonError::Refused(reason)) => (Phase::Refused, Some(reason.clone())),
        Err(e) => (Phase::Stopped, Some(e.to_string())),
    };
    state.status.set(phase, detail);
    outcome
}

/// Sessions one after the other, until one ends the daemon.
#[allow(clippy::too_many_arguments)]
async fn run_sessions(
    opts: &DaemonOptions,
    site: SiteId,
    tls: &mut Arc<rustls::ClientConfig>,
    renewal: &mut RenewalState,
    state: &mut AgentState,
    rng: &mut rand_chacha::ChaCha20Rng,
    failures: &mut u32,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<DaemonOutcome, DaemonError> {
    loop {
        // "Finished" stays until a new federation admits the agent: what the person on
        // call needs to know, rather than the reconnection attempts in between.
        if state.status.phase() != Phase::Finished {
            state.status.round(None);
            state.status.set(Phase::Connecting, None);
        }
        let attempt = tokio::select! {
            () = &mut *shutdown => return Ok(DaemonOutcome::Shutdown),
            end = connect_and_serve(opts, tls, &site, state, renewal, rng, failures) => end,
        };
        // However the session ended, the next connection presents the renewed certificate.
        if renewal.installed {
            let files = opts.renewal.as_ref().expect("installed only with renewal files");
            let rebuilt = reload_tls(files).and_then(|t| match own_site(&t) {
                Ok(s) if s == site => Ok(t),
                Ok(s) => Err(format!("the renewed certificate names {s}, not {site}")),
                Err(e) => Err(e),
            });
            let rebuilt = rebuilt.and_then(|t| match &state.secagg {
                Some(_) => reload_secagg(files).map(|id| (t, Some(id))),
                None => Ok((t, None)),
            });
            match rebuilt {
                Ok((t, secagg)) => {
                    *tls = Arc::new(t);
                    state.secagg = secagg;
                    *renewal = RenewalState::default();
                    info!("the next connection presents the renewed certificate");
                }
                // The files were checked before they were installed; if they cannot be read
                // back the site's set-up is broken.
                Err(e) => return Err(DaemonError::Misconfigured(format!("the renewed certificate: {e}"))),
            }
        }
        match attempt {
            Ok(SessionEnd::Finished { completed_rounds }) => {
                info!(completed_rounds, rounds_trained = state.rounds_trained, "federation finished");
                state.status.round(None);
                state.status.set(Phase::Finished, Some(format!("after {completed_rounds} rounds, {} trained here", state.rounds_trained)));
                if opts.exit_when_finished {
                    return Ok(DaemonOutcome::Finished { completed_rounds, rounds_trained: state.rounds_trained });
                }
                *failures = 0;
            }
            Ok(SessionEnd::Refused(reason)) => {
                error!(%reason, "refused by the coordinator; fix the cause and restart the agent");
                return Err(DaemonError::Refused(reason));
            }
            Ok(SessionEnd::Misconfigured(reason)) => {
                error!(%reason, "this site's configuration cannot work; fix it and restart the agent");
                return Err(DaemonError::Misconfigured(reason));
            }
            Ok(SessionEnd::Fatal(reason)) => {
                error!(%reason, "stopping: local state is unusable");
                return Err(DaemonError::State(reason));
            }
            Ok(SessionEnd::LedgerBehind(reason)) => {
                error!(%reason, "stopping: this site's ledger does not hold what the coordinator accepted from it");
                return Err(DaemonError::LedgerBehind(reason));
            }
            Ok(SessionEnd::Fault(round)) => return Err(DaemonError::InjectedFault(round)),
            // Reconnects at once, with the certificate installed below.
            Ok(SessionEnd::Renewed) => {}
            Ok(SessionEnd::Lost(cause)) | Err(cause) => {
                *failures += 1;
                if opts.max_connect_attempts > 0 && *failures >= opts.max_connect_attempts {
                    return Err(DaemonError::GaveUp { attempts: *failures, last: cause });
                }
                let delay = backoff(*failures, opts.max_backoff, rng);
                warn!(%cause, attempt = *failures, retry_in = ?delay, "connection lost; will retry");
                state.status.failures(*failures);
                metrics().connection_failures.inc();
                if state.status.phase() != Phase::Finished {
                    state.status.set(Phase::Retrying, Some(format!("{cause} (next attempt in {:.0} s)", delay.as_secs_f64())));
                }
                tokio::select! {
                    () = &mut *shutdown => return Ok(DaemonOutcome::Shutdown),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Exponential backoff from 500 ms, capped, with full jitter over the upper half.
pub fn backoff(failures: u32, max: Duration, rng: &mut impl Rng) -> Duration {
    let exp = Duration::from_millis(500).saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let cap = exp.min(max);
    let lo = cap / 2;
    lo + cap.saturating_sub(lo).mul_f64(rng.random::<f64>())
}

struct AgentState {
    /// Taken out while training runs on a blocking thread.
    trainer: Option<Box<dyn Trainer>>,
    cache: Option<CachedModel>,
    /// The cache file being written in the background, if any.
    cache_write: Option<tokio::task::JoinHandle<()>>,
    rounds_trained: u64,
    /// Taken out while an append runs on a blocking thread.
    ledger: Option<LedgerFile>,
    /// What the released-update cache holds (the update itself stays on disk).
    released: Option<CachedRelease>,
    /// How long the last round's training took, to judge whether the next fits its deadline.
    last_train_secs: Option<f64>,
    /// What `fedward-agent status` reads.
    status: StatusWriter,
    /// Signs this site's secure-round keys: `opts.secagg` until the certificate is renewed,
    /// then the renewed one (signed with the old one, the keys would fail every other
    /// site's check once it expired).
    secagg: Option<SecAggIdentity>,
}

impl AgentState {
    /// Waits for the background write of the model cache, if one is running.
    async fn cache_written(&mut self) {
        if let Some(write) = self.cache_write.take() {
            if let Err(e) = write.await {
                warn!(cause = %e, "the model cache's write failed");
            }
        }
    }
}

/// Opens (and verifies) the site's ledger. A last line cut short by a crash is settled so
/// that nothing is under-counted: a whole entry that lost its newline, or the beginning of
/// the release the released-update cache holds (the cache is written before the ledger
/// append), is completed and counts as spent; anything else stops the agent, which
/// cannot know its spend without a whole ledger.
fn open_ledger(opts: &DaemonOptions) -> Result<LedgerFile, DaemonError> {
    let path = opts.state_dir.join(LEDGER);
    if path.exists() {
        // A cache that cannot be read cannot complete a cut line; `repair_cut_tail` then
        // refuses what it cannot recognise, and the agent stops with the reason.
        let writing = ReleasedUpdate::load(&opts.state_dir).ok().flatten().map(|r| Body::Release(r.record));
        let repair =
            ledger_file::repair_cut_tail(&path, None, writing.as_ref(), Fragment::Keep).map_err(|e| DaemonError::State(e.to_string()))?;
        if let TailRepair::Completed { seq } = repair {
            warn!(
                path = %path.display(),
                seq,
                "the ledger's last release was cut short by a crash; completed it, and it counts as spent (it may have been sent)"
            );
        }
    }
    let ledger = LedgerFile::open(&path, None).map_err(|e| DaemonError::State(e.to_string()))?;
    let spent = ledger.ledger().accountant().map_err(|e| DaemonError::State(format!("ledger {}: {e}", path.display())))?;
    info!(path = %path.display(), releases = spent.releases(), "privacy ledger opened");
    Ok(ledger)
}

fn load_released(opts: &DaemonOptions) -> Option<CachedRelease> {
    match ReleasedUpdate::load(&opts.state_dir) {
        Ok(r) => r.map(|r| CachedRelease { round: r.header.round, model_digest: r.model_digest, update_digest: r.delta.digest() }),
        Err(e) => {
            // Without it a recorded round cannot be resent; the round is declined, never
            // trained twice (see `session::prior_release`).
            warn!(cause = %e, "ignoring an unreadable released-update cache");
            None
        }
    }
}

/// The ledger's last release, if any.
fn last_release(ledger: &Ledger) -> Option<&ReleaseRecord> {
    ledger.entries().iter().rev().find_map(|e| match &e.body {
        Body::Release(r) => Some(r),
        _ => None,
    })
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn load_cache(opts: &DaemonOptions) -> Option<CachedModel> {
    let path = opts.state_dir.join(MODEL_CACHE);
    let bytes = std::fs::read(&path).ok()?;
    match TensorSet::from_safetensors(&bytes, false) {
        Ok(set) => Some(CachedModel::new(set)),
        Err(e) => {
            warn!(path = %path.display(), cause = %e, "ignoring an unreadable model cache");
            None
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, DaemonError> {
    let mut addrs =
        tokio::net::lookup_host(addr).await.map_err(|e| DaemonError::Address { addr: addr.to_owned(), detail: e.to_string() })?;
    addrs.next().ok_or_else(|| DaemonError::Address { addr: addr.to_owned(), detail: "no address".into() })
}

async fn connect_and_serve(
    opts: &DaemonOptions,
    tls: &Arc<rustls::ClientConfig>,
    site: &SiteId,
    state: &mut AgentState,
    renewal: &mut RenewalState,
    rng: &mut rand_chacha::ChaCha20Rng,
    failures: &mut u32,
) -> Result<SessionEnd, String> {
    let remote = match resolve(&opts.coordinator_addr).await {
        Ok(r) => r,
        // A name that does not resolve may come back (DNS is down); one without a port
        // or otherwise malformed never will.
        Err(DaemonError::Address { addr, detail }) if detail.contains("invalid socket address") => {
            return Ok(SessionEnd::Misconfigured(format!("coordinator address {addr:?} is not host:port ({detail})")))
        }
        Err(e) => return Err(e.to_string()),
    };
    let endpoint = client_endpoint(remote, (**tls).clone(), &opts.transport).map_err(|e| format!("endpoint: {e}"))?;
    let connecting = endpoint.connect(remote, &opts.server_name).map_err(|e| format!("connect: {e}"))?;
    let conn = match connecting.await {
        Ok(c) => c,
        Err(e) => return Ok(classify_connection_error(&e).unwrap_or(SessionEnd::Lost(format!("handshake: {e}")))),
    };
    // With TLS 1.3 a refused client certificate only shows on the first stream, so the
    // agent believes it is admitted only once the coordinator says Welcome.
    let welcome = match request(&conn, &Message::Hello(hello(&opts.budget)), Some(opts.transport.request_timeout)).await {
        Ok(Message::Welcome(w)) => w,
        Ok(Message::Reject(r)) => return Ok(SessionEnd::Refused(r.to_string())),
        Ok(other) => return Ok(SessionEnd::Lost(format!("unexpected answer to hello: {}", other.kind()))),
        Err(e) => return Ok(stream_failure(&conn, e)),
    };
    *failures = 0;
    state.status.failures(0);
    metrics().connected.set(1);
    if let Err(reason) = check_welcome_site(site, &welcome.site) {
        conn.close(wire::CLOSE_NORMAL.into(), b"agent stopping: the coordinator names another site");
        return Ok(SessionEnd::Misconfigured(reason));
    }
    let ledger = state.ledger.as_ref().ok_or_else(|| "ledger unavailable".to_owned())?;
    let unrecorded = unrecorded_acceptances(ledger.ledger(), &welcome.accepted);
    if !unrecorded.is_empty() {
        conn.close(wire::CLOSE_NORMAL.into(), b"agent stopping: its ledger is behind");
        let listed: Vec<String> = unrecorded.iter().map(|a| format!("round {} update {}", a.round, a.update_digest.short())).collect();
        return Ok(SessionEnd::LedgerBehind(format!(
            "the coordinator accepted {} update(s) from this site that the ledger {} does not record ({}); the ledger was lost, \
             replaced or restored from an older copy, so this site's spend cannot be counted. Restore the ledger; the agent will \
             not train on a budget it cannot count",
            unrecorded.len(),
            ledger.path().display(),
            listed.join(", ")
        )));
    }
    let span = info_span!("agent", site = %site);
    let end = async {
        info!(completed = welcome.completed_rounds, total = welcome.total_rounds, "admitted by the coordinator");
        warn_of_expiry(tls);
        serve(&conn, opts, tls, state, renewal, rng, site).await
    }
    .instrument(span)
    .await;
    metrics().connected.set(0);
    conn.close(wire::CLOSE_NORMAL.into(), b"agent done");
    endpoint.wait_idle().await;
    Ok(end)
}

fn hello(budget: &SiteBudget) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        software: format!("fedward-agent {}", env!("CARGO_PKG_VERSION")),
        capabilities: vec![Capability::ModelCache, Capability::RecordLevelDp, Capability::SiteLevelDp],
        // Declared for the dashboard; the site alone enforces it.
        budget: Some(DeclaredBudget { epsilon: budget.max_epsilon, delta: budget.delta }),
    }
}

async fn serve(
    conn: &quinn::Connection,
    opts: &DaemonOptions,
    tls: &rustls::ClientConfig,
    state: &mut AgentState,
    renewal: &mut RenewalState,
    rng: &mut rand_chacha::ChaCha20Rng,
    site: &SiteId,
) -> SessionEnd {
    loop {
        // A certificate renewed while this connection waited is taken into use here,
        // between rounds: the offer that may have crossed the renewal is answered first.
        if renewal.installed {
            return SessionEnd::Renewed;
        }
        let have_model = state.cache.as_ref().map(|c| c.digest);
        state.status.round(None);
        state.status.set(Phase::Waiting, None);
        // While waiting for the next offer, the certificate is renewed when due; the wait
        // goes on either way.
        let ready_msg = Message::Ready(Ready { have_model });
        let ready = request(conn, &ready_msg, None);
        tokio::pin!(ready);
        let answer = loop {
            let due = opts.renewal.as_ref().and_then(|_| renewal.next_attempt(tls));
            tokio::select! {
                answer = &mut ready => break answer,
                () = sleep_until_opt(due), if due.is_some() => {
                    let files = opts.renewal.as_ref().expect("due only with renewal files");
                    match renew(conn, opts, files, site, renewal).await {
                        Ok(true) => renewal.installed = true,
                        Ok(false) => {}
                        Err(end) => return end,
                    }
                }
            }
        };
        let offer = match answer {
            Ok(Message::RoundOffer(o)) => o,
            Ok(Message::Finished(f)) => {
                // The hospital's service serves the cached model: it must be the one the
                // federation ended with. A failed fetch ends the session as lost, and the
                // reconnected agent hears `Finished` again and retries.
                if state.cache.as_ref().map(|c| c.digest) != Some(f.model_digest) {
                    state.status.set(Phase::Waiting, Some("fetching the final global model".into()));
                    let span = info_span!("final", round = f.completed_rounds);
                    if let Err(end) =
                        fetch_model(conn, opts, state, RoundId(f.completed_rounds), f.model_digest, &f.manifest).instrument(span).await
                    {
                        return end;
                    }
                }
                state.cache_written().await;
                return SessionEnd::Finished { completed_rounds: f.completed_rounds };
            }
            Ok(Message::Reject(r)) => return SessionEnd::Lost(format!("ready refused: {r}")),
            Ok(other) => return SessionEnd::Lost(format!("unexpected answer to ready: {}", other.kind())),
            Err(e) => return stream_failure(conn, e),
        };
        state.status.round(Some(offer.round.0));
        state.status.set(Phase::Training, None);
        let round = offer.round;
        let span = info_span!("round", round = %offer.round);
        let result = take_round(conn, opts, state, rng, site, offer).instrument(span).await;
        if let Err(end) = result {
            return end;
        }
        // The connection's UDP payload bytes so far, both ways (QUIC headers, ACKs and
        // retransmissions included): what the round cost on the wire, by difference.
        let stats = conn.stats();
        info!(round = round.0, sent_bytes = stats.udp_tx.bytes, received_bytes = stats.udp_rx.bytes, "round done: connection totals");
    }
}

async fn take_round(
    conn: &quinn::Connection,
    opts: &DaemonOptions,
    state: &mut AgentState,
    rng: &mut rand_chacha::ChaCha20Rng,
    site: &SiteId,
    offer: RoundOffer,
) -> Result<(), SessionEnd> {
    info!(
        total = offer.total_rounds,
        trainable = %offer.plan.trainable,
        privacy = offer.plan.privacy.mode_name(),
        deadline_secs = offer.deadline_secs,
        "round offered"
    );
    let deadline = Instant::now() + Duration::from_secs(offer.deadline_secs);
    let ledger = state.ledger.as_ref().ok_or_else(|| SessionEnd::Fatal("ledger unavailable".into()))?.ledger();
    match prior_release(&offer, last_release(ledger), state.released.as_ref()) {
        Prior::Fresh => {}
        // A masked input cannot be sent again: another setup, other masks. The release
        // stays counted; the round goes on without this site.
        Prior::Resend | Prior::Unrecoverable if offer.secure.is_some() => {
            let message = "this secure round's release is already in the ledger; a masked input is never sent twice";
            return send_decline(conn, &opts.transport, &offer, DeclineReason::TrainingFailed, message.into()).await;
        }
        Prior::Resend => return resend(conn, opts, &offer).await,
        Prior::Unrecoverable => {
            let message =
                "this round's update is in the ledger but its cached copy is missing; declining rather than releasing the round twice";
            return send_decline(conn, &opts.transport, &offer, DeclineReason::TrainingFailed, message.into()).await;
        }
    }
    let spent = match ledger.accountant() {
        Ok(a) => a,
        Err(e) => {
            let message = format!("the site's ledger cannot be accounted: {e}");
            return send_decline(conn, &opts.transport, &offer, DeclineReason::BudgetExhausted, message).await;
        }
    };
    let can_score = state.trainer.as_ref().is_some_and(|t| t.can_score());
    let approved = match review_offer(&offer, &opts.budget, &spent, can_score) {
        Decision::Train(a) => a,
        Decision::Decline { reason, message } => return send_decline(conn, &opts.transport, &offer, reason, message).await,
    };
    info!(
        epsilon_before = approved.epsilon_before,
        epsilon_after = approved.epsilon_after,
        delta = opts.budget.delta,
        steps = approved.release.steps,
        "round within the site's budget"
    );
    let terms = match review_secure(&offer, state.secagg.is_some()) {
        Ok(t) => t,
        Err(message) => return send_decline(conn, &opts.transport, &offer, DeclineReason::PlanUnacceptable, message).await,
    };
    // A secure round's keys and shares are exchanged now, before training; one client per
    // round, dropped (secrets wiped) when the round ends for this site.
    let mut secagg = None;
    if let (Some(terms), Some(id)) = (&terms, &state.secagg) {
        match secure_setup(conn, opts, id, terms, rng).await {
            Ok(x) => secagg = Some(x),
            Err(SecureEnd::Abort(reason)) => {
                warn!(%reason, "secure round aborted before training; nothing released");
                return Ok(());
            }
            Err(SecureEnd::Session(end)) => return Err(end),
        }
    }
    let model = fetch_model(conn, opts, state, offer.round, offer.model_digest, &offer.manifest).await?;
    if let Err(message) = fits_deadline(state.last_train_secs, deadline.saturating_duration_since(Instant::now()).as_secs_f64()) {
        return send_decline(conn, &opts.transport, &offer, DeclineReason::DeadlineTooShort, message).await;
    }

    let Some(mut trainer) = state.trainer.take() else {
        return Err(SessionEnd::Lost("trainer unavailable".into()));
    };
    let plan = offer.plan.clone();
    let round = offer.round;
    let encoding = offer.update_encoding;
    // A fresh generator per round. Only tests seed it; production draws from the OS and
    // the seed is never stored or logged.
    let mut noise_rng = match opts.seed {
        Some(_) => NoiseRng::from_seed_insecure(rng.random()),
        None => NoiseRng::from_os().map_err(|e| SessionEnd::Lost(e.to_string()))?,
    };
    let started = Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        let result = (|| {
            // Model selection: the offered model is scored before training changes it.
            let score = match approved.release.score {
                Some(release) => match trainer.score(&model, &plan).map_err(|e| e.to_string())? {
                    Some((correct, examples)) => {
                        Some(release_score(&plan.privacy, release, correct, examples, &mut noise_rng).map_err(|e| e.to_string())?)
                    }
                    None => return Err("the site has no validation split to score the model with".to_string()),
                },
                None => None,
            };
            if !approved.release.has_update() {
                // The final scoring round: nothing trains, nothing but the score leaves.
                let update = LocalUpdate {
                    delta: TensorSet::default(),
                    num_examples: trainer.num_examples(),
                    metrics: wire::LocalMetrics::default(),
                    dp_steps: 0,
                };
                let applied = Applied { norm_before: 0.0, norm_clipped: 0.0, noise_std: 0.0 };
                return Ok((update, applied, Vec::new(), score));
            }
            let ctx = TrainContext { round, noise_rng: &mut noise_rng };
            let mut update = trainer.train(ctx, &model, &plan).map_err(|e| e.to_string())?;
            let applied =
                privatize(&plan.privacy, &approved, update.dp_steps, &mut update.delta, &mut noise_rng).map_err(|e| e.to_string())?;
            // Quantized after the privacy step (post-processing: no privacy cost), in
            // place: what is recorded, cached and sent is what the coordinator decodes.
            quantize_update(&plan.privacy, encoding, &mut update.delta).map_err(|e| e.to_string())?;
            // The update's tensors are hashed once, here, off the event loop; its digest
            // is the manifest's.
            let specs = update.delta.specs();
            Ok((update, applied, specs, score))
        })();
        (trainer, result)
    })
    .await;
    let (trainer, result) = match joined {
        Ok(x) => x,
        Err(e) => return Err(SessionEnd::Fatal(format!("training thread panicked: {e}"))),
    };
    state.trainer = Some(trainer);
    let (mut update, applied, specs, score) = match result {
        Ok(x) => x,
        Err(e) => {
            // Errors of the trainer and of `privatize` name no record and no value.
            error!(cause = %e, "local training failed");
            return send_decline(conn, &opts.transport, &offer, DeclineReason::TrainingFailed, e).await;
        }
    };
    update.metrics.train_secs = started.elapsed().as_secs_f64();
    if !approved.release.has_update() {
        info!(secs = format_args!("{:.1}", update.metrics.train_secs), "scoring round: the last model scored, nothing trained");
    } else {
        metrics().phase_seconds.get_or_create(&PhaseLabel { phase: MetricPhase::train }).observe(update.metrics.train_secs);
        state.last_train_secs = Some(update.metrics.train_secs);
        log_training(&update, &applied);
    }
    // Privacy is spent when the release is recorded, so nothing is recorded for an update
    // that can never be sent: the connection ended for good while it trained (replaced by
    // another agent, refused), or the round's deadline has passed (the offer's whole
    // seconds were rounded down, hence the grace). A connection merely lost is recorded
    // anyway: the reconnected site resends the same update to the still-open round instead
    // of training again.
    if let Some(end) = conn.close_reason().as_ref().and_then(classify_connection_error) {
        warn!("the connection ended for good during training; the update is discarded unrecorded (no privacy spent)");
        return Err(end);
    }
    if Instant::now() > deadline + Duration::from_secs(1) {
        warn!("the round's deadline passed during training; the update is discarded unrecorded (no privacy spent)");
        return Ok(());
    }
    if let (Some(terms), Some((client, srng))) = (terms, secagg) {
        return secure_release(
            conn,
            opts,
            state,
            site,
            &offer,
            &approved,
            terms,
            client,
            srng,
            update.delta,
            update.num_examples,
            &update.metrics,
        )
        .await;
    }
    let used = privacy_used(&offer.plan.privacy, &approved, opts.budget.delta);
    let (num_examples, metrics) = disclosed(&offer.plan.privacy, opts.budget.share_metrics, update.num_examples, &update.metrics);
    let metrics = metrics.filter(|_| approved.release.has_update());
    let header =
        UpdateHeader { round: offer.round, num_examples, metrics, tensors: specs, privacy: used, encoding: offer.update_encoding, score };
    let update_digest = manifest_digest(&header.tensors);
    // The ledger records what was released: the count as sent.
    let record = ReleaseRecord::new(site.clone(), offer.round, &used, num_examples, approved.epsilon_before, update_digest, now())
        .map_err(|e| SessionEnd::Fatal(format!("ledger record: {e}")))?;
    let released = ReleasedUpdate { model_digest: offer.model_digest, header, delta: update.delta, record };
    let released = record_release(opts, state, released).await?;
    failpoint::crash_point(failpoint::AGENT_AFTER_LEDGER_APPEND);
    if opts.fail_after_ledger_write {
        warn!("test fault: stopping after the ledger write, before sending");
        return Err(SessionEnd::Fault(offer.round.0));
    }
    state.status.set(Phase::Uploading, None);
    send_update(conn, &opts.transport, &released.header, &released.delta).await?;
    state.status.sent(offer.round.0, wire::encoded_payload_bytes(&released.header.tensors, released.header.encoding));
    state.rounds_trained += 1;
    Ok(())
}

/// The round's training, in the site's log (norms and aggregate figures only).
fn log_training(update: &LocalUpdate, applied: &Applied) {
    info!(
        examples = update.num_examples,
        train_loss = format_args!("{:.4}", update.metrics.train_loss),
        val_accuracy = ?update.metrics.val_accuracy,
        secs = format_args!("{:.1}", update.metrics.train_secs),
        dp_steps = update.dp_steps,
        norm_before = format_args!("{:.4}", applied.norm_before),
        norm_clipped = format_args!("{:.4}", applied.norm_clipped),
        noise_std = applied.noise_std,
        "local training done"
    );
}

/// How a secure round ended early for this site.
enum SecureEnd {
    /// The round is aborted for this site (a `SecAggError`, or the coordinator refused a
    /// step): logged, and the agent waits for the next offer.
    Abort(String),
    /// The connection ended.
    Session(SessionEnd),
}

/// A secure step's request; the coordinator answers when the step closes, so the wait is
/// the step's deadline plus the request timeout.
async fn secure_request(conn: &quinn::Connection, msg: &Message, wait: Duration) -> Result<Message, SecureEnd> {
    match request(conn, msg, Some(wait)).await {
        Ok(Message::Reject(r)) => Err(SecureEnd::Abort(format!("the coordinator refused the {}: {r}", msg.kind()))),
        Ok(m) => Ok(m),
        Err(e) => Err(SecureEnd::Session(stream_failure(conn, e))),
    }
}

/// Secure round, steps 1 and 2: this round's keys advertised, every relayed key checked,
/// shares sent and the neighbours' shares received. Returns the client and the generator
/// it draws from (OS-seeded; seeded only in tests).
async fn secure_setup(
    conn: &quinn::Connection,
    opts: &DaemonOptions,
    id: &SecAggIdentity,
    terms: &SecureTerms,
    rng: &mut rand_chacha::ChaCha20Rng,
) -> Result<(SecAggClient, rand_chacha::ChaCha20Rng), SecureEnd> {
    let abort = |e: fedward_shared::secagg::SecAggError| SecureEnd::Abort(e.to_string());
    let mut srng = match opts.seed {
        Some(_) => rand_chacha::ChaCha20Rng::seed_from_u64(rng.random()),
        None => rand_chacha::ChaCha20Rng::try_from_os_rng().map_err(|e| SecureEnd::Session(SessionEnd::Lost(e.to_string())))?,
    };
    let mut client = SecAggClient::new(terms.setup, id.creds.clone(), id.trust.clone(), &mut srng).map_err(abort)?;
    let wait = terms.step_deadline + opts.transport.request_timeout;
    let keys = match secure_request(conn, &Message::SecAggKeys(client.advertise_keys()), wait).await? {
        Message::SecAggRelayedKeys(k) => k,
        other => return Err(SecureEnd::Session(SessionEnd::Lost(format!("unexpected answer to secure keys: {}", other.kind())))),
    };
    let shares = client.receive_keys(&keys.keys, UnixTime::now(), &mut srng).map_err(abort)?;
    let relayed = match secure_request(conn, &Message::SecAggShares(shares), wait).await? {
        Message::SecAggRelayedShares(r) => r,
        other => return Err(SecureEnd::Session(SessionEnd::Lost(format!("unexpected answer to secure shares: {}", other.kind())))),
    };
    client.receive_shares(&relayed).map_err(abort)?;
    info!(sites = keys.keys.len(), "secure round keys and shares exchanged");
    Ok((client, srng))
}

/// Secure round, steps 3 and 4, after training and the privacy step: the update clipped
/// to the offer's bound, encoded in fixed point and masked (on a blocking thread); the
/// release recorded in the ledger (fsync) before the masked input, which is what leaves
/// the site, is sent; then the unmasking shares. Any `SecAggError` aborts the round for
/// this site with its reason logged (it names sites and steps, never a value).
#[allow(clippy::too_many_arguments)]
async fn secure_release(
    conn: &quinn::Connection,
    opts: &DaemonOptions,
    state: &mut AgentState,
    site: &SiteId,
    offer: &RoundOffer,
    approved: &Approved,
    terms: SecureTerms,
    mut client: SecAggClient,
    mut srng: rand_chacha::ChaCha20Rng,
    delta: TensorSet,
    examples: u64,
    local: &wire::LocalMetrics,
) -> Result<(), SessionEnd> {
    let used = privacy_used(&offer.plan.privacy, approved, opts.budget.delta);
    // The weight travels inside the sum: the count as it would be disclosed.
    let (weight, _) = disclosed(&offer.plan.privacy, opts.budget.share_metrics, examples, local);
    // Under distributed DP the update is clipped to the plan's norm (the offer's bound
    // leaves room for the noise) and noised as integers below.
    let share = approved.release.distributed;
    let clip = match offer.plan.privacy {
        PrivacyPlan::Distributed { clip_norm, .. } => terms.clip.min(clip_norm as f32),
        _ => terms.clip,
    };
    let input = match secure_input(offer, &delta, clip) {
        Ok(x) => x,
        Err(e) => {
            error!(cause = %e, "secure round aborted: the update does not fit the offer");
            return Ok(());
        }
    };
    drop(delta);
    // One noise generator per sampling thread, each seeded from the OS on its own (seeded
    // from the round's generator only in tests); the seeds are never stored or logged.
    let noise_rngs = match share {
        None => Vec::new(),
        Some(_) => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_NOISE_THREADS);
            let mut rngs = Vec::with_capacity(threads);
            for _ in 0..threads {
                rngs.push(match opts.seed {
                    Some(_) => rand_chacha::ChaCha20Rng::seed_from_u64(srng.random()),
                    None => rand_chacha::ChaCha20Rng::try_from_os_rng().map_err(|e| SessionEnd::Lost(e.to_string()))?,
                });
            }
            rngs
        }
    };
    let masked = tokio::task::spawn_blocking(move || {
        let encoded = match &share {
            Some(share) => {
                distributed_input(&terms.fixed, share, &input, &mut srng, noise_rngs).map_err(|e| SecAggError::Input(e.to_string()))
            }
            None => terms.fixed.encode(&input, weight.max(1), &mut srng),
        };
        let result = encoded.and_then(|encoded| client.masked_input(&encoded));
        (client, srng, result)
    })
    .await;
    let (mut client, _srng, masked) = masked.map_err(|e| SessionEnd::Fatal(format!("masking thread panicked: {e}")))?;
    let masked = match masked {
        Ok(m) => m,
        Err(e) => {
            error!(cause = %e, "secure round aborted while masking; nothing released");
            return Ok(());
        }
    };
    let bytes = wire::masked_values_bytes(&masked.values, wire::masked_value_width(terms.setup.params.modulus_bits));
    let digest = wire::masked_values_digest(&bytes);
    let header = MaskedInputHeader { round: offer.round, values: masked.values.len() as u64, digest, privacy: used };
    drop(masked);
    // The release is durable before the masked input leaves. No cached copy: a secure
    // round is never resent.
    let record = ReleaseRecord::new(site.clone(), offer.round, &used, weight, approved.epsilon_before, digest, now())
        .map_err(|e| SessionEnd::Fatal(format!("ledger record: {e}")))?;
    record_ledger_only(state, record).await?;
    failpoint::crash_point(failpoint::AGENT_AFTER_LEDGER_APPEND);
    if opts.fail_after_ledger_write {
        warn!("test fault: stopping after the ledger write, before sending");
        return Err(SessionEnd::Fault(offer.round.0));
    }
    state.status.set(Phase::Uploading, None);
    // The answer (the unmasking request) comes when the input step closes, by the round's
    // deadline at the latest.
    let wait = Duration::from_secs(offer.deadline_secs) + terms.step_deadline + opts.transport.request_timeout;
    let answer = match send_masked(conn, &opts.transport, wait, &header, &bytes).await {
        Ok(m) => m,
        Err(e) => return Err(stream_failure(conn, e)),
    };
    let request = match answer {
        Message::SecAggUnmask(req) => req,
        Message::Reject(r) => {
            error!(code = %r.code, reason = %r.message, "masked input refused by the coordinator");
            return Ok(());
        }
        other => return Err(SessionEnd::Lost(format!("unexpected answer to a masked input: {}", other.kind()))),
    };
    state.status.sent(offer.round.0, bytes.len());
    state.rounds_trained += 1;
    let shares = match client.unmask(&request) {
        Ok(s) => s,
        Err(e) => {
            error!(cause = %e, "secure round aborted at unmasking");
            return Ok(());
        }
    };
    let wait = terms.step_deadline + opts.transport.request_timeout;
    match self::request(conn, &Message::SecAggUnmasking(shares), Some(wait)).await {
        Ok(Message::Ack(_)) => {
            info!(survivors = request.survivors.len(), dropped = request.dropped.len(), "secure round: unmasking shares sent");
            Ok(())
        }
        // The coordinator unmasks as soon as enough sites' shares are in: later ones find
        // the round closed. Nothing went wrong, so nothing for the person on call.
        Ok(Message::Reject(r)) if r.code == RejectCode::StaleRound => {
            info!("secure round: the sum was unmasked with other sites' shares before these arrived");
            Ok(())
        }
        Ok(Message::Reject(r)) => {
            warn!(reason = %r, "secure round: unmasking shares refused");
            Ok(())
        }
        Ok(other) => Err(SessionEnd::Lost(format!("unexpected answer to unmasking shares: {}", other.kind()))),
        Err(e) => Err(stream_failure(conn, e)),
    }
}

/// A masked input: header, `Proceed`, the raw values at the minimum rate, then the answer
/// the coordinator holds until the input step closes.
async fn send_masked(
    conn: &quinn::Connection,
    transport: &Transport,
    wait: Duration,
    header: &MaskedInputHeader,
    bytes: &[u8],
) -> Result<Message, StreamError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let pace = Pace { allowance: transport.pace.allowance + transport.request_timeout, ..transport.pace };
    let exchange = async {
        write_message(&mut send, &Message::SecAggMasked(header.clone())).await?;
        match read_message(&mut recv).await? {
            Message::Proceed(_) => {}
            other => return Ok(other),
        }
        paced(pace, bytes.len(), "masked input upload", async {
            send.write_all(bytes).await?;
            send.finish()?;
            Ok(())
        })
        .await?;
        read_message(&mut recv).await
    };
    within(wait, "masked input", exchange).await
}

/// Appends a secure round's release to the ledger (fsync) on a blocking thread; a failure
/// stops the agent, as for any release.
async fn record_ledger_only(state: &mut AgentState, record: ReleaseRecord) -> Result<(), SessionEnd> {
    let mut ledger = state.ledger.take().ok_or_else(|| SessionEnd::Fatal("ledger unavailable".into()))?;
    let joined = tokio::task::spawn_blocking(move || {
        let result = ledger.append(Body::Release(record)).map(|_| ()).map_err(|e| format!("recording the release: {e}"));
        (ledger, result)
    })
    .await;
    let (ledger, result) = joined.map_err(|e| SessionEnd::Fatal(format!("ledger thread panicked: {e}")))?;
    state.ledger = Some(ledger);
    result.map_err(SessionEnd::Fatal)?;
    info!("secure release recorded in the ledger");
    Ok(())
}

/// Makes the release durable before anything is sent: the update goes to the cache (atomic
/// write), then its record to the ledger (fsync). Both on a blocking thread. A failure of
/// either stops the agent: an update the ledger does not hold must never leave.
async fn record_release(opts: &DaemonOptions, state: &mut AgentState, released: ReleasedUpdate) -> Result<ReleasedUpdate, SessionEnd> {
    let mut ledger = state.ledger.take().ok_or_else(|| SessionEnd::Fatal("ledger unavailable".into()))?;
    let state_dir = opts.state_dir.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let result = released.save(&state_dir).map_err(|e| format!("caching the update: {e}")).and_then(|()| {
            ledger.append(Body::Release(released.record.clone())).map(|_| ()).map_err(|e| format!("recording the release: {e}"))
        });
        (ledger, released, result)
    })
    .await;
    let (ledger, released, result) = joined.map_err(|e| SessionEnd::Fatal(format!("ledger thread panicked: {e}")))?;
    state.ledger = Some(ledger);
    result.map_err(SessionEnd::Fatal)?;
    let update_digest = manifest_digest(&released.header.tensors);
    state.released = Some(CachedRelease { round: released.header.round, model_digest: released.model_digest, update_digest });
    info!(
        epsilon_after = released.header.privacy.epsilon_after,
        update = %update_digest.short(),
        "release recorded in the ledger"
    );
    Ok(released)
}

/// Sends the cached update of a round the ledger already records: no training, no spend.
async fn resend(conn: &quinn::Connection, opts: &DaemonOptions, offer: &RoundOffer) -> Result<(), SessionEnd> {
    let state_dir = opts.state_dir.clone();
    let loaded = tokio::task::spawn_blocking(move || ReleasedUpdate::load(&state_dir))
        .await
        .map_err(|e| SessionEnd::Fatal(format!("cache thread panicked: {e}")))?;
    match loaded {
        Ok(Some(r)) if r.header.round == offer.round && r.model_digest == offer.model_digest => {
            info!(update = %r.delta.digest().short(), "this round is already recorded: resending the same update");
            send_update(conn, &opts.transport, &r.header, &r.delta).await
        }
        other => {
            if let Err(e) = other {
                warn!(cause = %e, "released-update cache unreadable");
            }
            let message =
                "this round's update is in the ledger but its cached copy is unusable; declining rather than releasing the round twice";
            send_decline(conn, &opts.transport, offer, DeclineReason::TrainingFailed, message.into()).await
        }
    }
}

/// Brings the cached global model to the one offered (`digest`, described by `manifest`):
/// only the tensors whose digests differ are fetched, and the whole is verified.
async fn fetch_model(
    conn: &quinn::Connection,
    opts: &DaemonOptions,
    state: &mut AgentState,
    round: RoundId,
    digest: Digest,
    manifest: &[TensorSpec],
) -> Result<Arc<TensorSet>, SessionEnd> {
    // What the offer declares is bounded before anything is requested or allocated.
    let model_bytes = wire::declared_payload_bytes(manifest, opts.max_model_bytes)
        .map_err(|e| SessionEnd::Lost(format!("the offered model is beyond this site's limit: {e}")))?;
    let names = tensors_to_fetch(manifest, state.cache.as_ref());
    let started = Instant::now();
    let fetched = if names.is_empty() {
        TensorSet::new()
    } else {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| SessionEnd::Lost(format!("open stream: {e}")))?;
        let req = Message::ModelRequest(ModelRequest { round, names: names.clone() });
        let exchange = paced(opts.transport.pace, model_bytes, "model download", async {
            write_message(&mut send, &req).await?;
            send.finish()?;
            match read_message(&mut recv).await? {
                Message::Tensors(specs) => {
                    // Exactly what was asked, as offered: checked before any allocation.
                    if let Err(e) = check_tensors_reply(manifest, &names, &specs) {
                        return Ok(Err(e));
                    }
                    failpoint::crash_point(failpoint::AGENT_DOWNLOAD);
                    Ok(Ok(read_tensors(&mut recv, &specs).await?))
                }
                Message::Reject(r) => Ok(Err(format!("model request refused: {r}"))),
                other => Ok(Err(format!("unexpected answer to a model request: {}", other.kind()))),
            }
        });
        match exchange.await {
            Ok(Ok(set)) => set,
            Ok(Err(msg)) => return Err(SessionEnd::Lost(msg)),
            Err(e) => return Err(stream_failure(conn, e)),
        }
    };
    let bytes = fetched.byte_len();
    metrics().received_bytes.inc_by(bytes as u64);
    metrics().phase_seconds.get_or_create(&PhaseLabel { phase: MetricPhase::download }).observe(started.elapsed().as_secs_f64());
    let model = assemble(manifest, digest, state.cache.take(), fetched).map_err(|e| {
        error!(cause = %e, "global model failed verification");
        SessionEnd::Lost(e.to_string())
    })?;
    info!(
        fetched_tensors = names.len(),
        mib = format_args!("{:.1}", bytes as f64 / (1 << 20) as f64),
        secs = format_args!("{:.2}", started.elapsed().as_secs_f64()),
        digest = %digest.short(),
        "global model received and verified"
    );
    if !names.is_empty() {
        // Written beside training, off the round's path (the triage service picks the file
        // up when it lands); the next write, and the session's end, wait for this one.
        state.cache_written().await;
        let (set, path) = (model.set.clone(), opts.state_dir.join(MODEL_CACHE));
        state.cache_write = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = fsutil::atomic_write_with(&path, false, |tmp| set.write_safetensors(tmp, None)) {
                warn!(cause = %e, "could not cache the global model");
            }
        }));
    }
    let set = model.set.clone();
    state.cache = Some(model);
    Ok(set)
}

async fn send_update(conn: &quinn::Connection, transport: &Transport, header: &UpdateHeader, delta: &TensorSet) -> Result<(), SessionEnd> {
    let specs = &header.tensors;
    // What travels: the update in its encoding.
    let bytes = wire::encoded_payload_bytes(specs, header.encoding);
    let mib = bytes as f64 / (1 << 20) as f64;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| SessionEnd::Lost(format!("open stream: {e}")))?;
    let pace = Pace { allowance: transport.pace.allowance + transport.request_timeout, ..transport.pace };
    let exchange = async {
        write_message(&mut send, &Message::Update(header.clone())).await?;
        // The coordinator says when to send the bytes: once it has admitted the header and
        // holds an upload slot (other sites' uploads may come first; the round's end bounds
        // the wait).
        match read_message(&mut recv).await? {
            Message::Proceed(_) => {}
            other => return Ok(other),
        }
        failpoint::crash_point(failpoint::AGENT_UPLOAD);
        // Then the bytes, and the answer once the update is folded in and recorded in the
        // coordinator's ledger.
        paced(pace, bytes, "update upload", async {
            write_update_tensors(&mut send, delta, specs, header.encoding).await?;
            send.finish()?;
            read_message(&mut recv).await
        })
        .await
    };
    match exchange.await {
        Ok(Message::Ack(_)) => {
            failpoint::crash_point(failpoint::AGENT_AFTER_ACK);
            let secs = started.elapsed().as_secs_f64();
            metrics().updates_sent.inc();
            metrics().sent_bytes.inc_by(bytes as u64);
            metrics().phase_seconds.get_or_create(&PhaseLabel { phase: MetricPhase::upload }).observe(secs);
            info!(
                tensors = specs.len(),
                mib = format_args!("{mib:.2}"),
                mib_per_s = format_args!("{:.0}", mib / secs.max(1e-9)),
                "update accepted"
            );
            Ok(())
        }
        Ok(Message::Reject(r)) => {
            // The round goes on without this site; the next offer is a fresh start.
            error!(code = %r.code, reason = %r.message, "update rejected by the coordinator");
            metrics().updates_rejected.inc();
            Ok(())
        }
        Ok(other) => Err(SessionEnd::Lost(format!("unexpected answer to an update: {}", other.kind()))),
        Err(e) => Err(stream_failure(conn, e)),
    }
}

async fn send_decline(
    conn: &quinn::Connection,
    transport: &Transport,
    offer: &RoundOffer,
    reason: DeclineReason,
    message: String,
) -> Result<(), SessionEnd> {
    // The detail stays in this log; the coordinator gets the reason code.
    warn!(?reason, %message, "declining the round");
    metrics().rounds_declined.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    let msg = Message::Decline(Decline { round: offer.round, reason });
    match request(conn, &msg, Some(transport.request_timeout)).await {
        Ok(Message::Ack(_)) => Ok(()),
        Ok(Message::Reject(r)) => {
            debug!(reason = %r, "decline not recorded");
            Ok(())
        }
        Ok(other) => Err(SessionEnd::Lost(format!("unexpected answer to a decline: {}", other.kind()))),
        Err(e) => Err(stream_failure(conn, e)),
    }
}

/// When the next renewal attempt is due: set from the certificate, pushed back after an
/// attempt that could not finish (waiting for approval, or no issuing CA).
#[derive(Debug, Default)]
struct RenewalState {
    not_before: Option<tokio::time::Instant>,
    /// A renewed certificate is on disk; the connection still uses the old one.
    installed: bool,
}

/// Asking again for a request that waits for an admin's approval.
const RENEWAL_POLL: Duration = Duration::from_secs(60);
/// Asking again after a coordinator could not renew.
const RENEWAL_RETRY: Duration = Duration::from_secs(3600);

impl RenewalState {
    fn next_attempt(&self, tls: &rustls::ClientConfig) -> Option<tokio::time::Instant> {
        if self.installed {
            return None;
        }
        let info = own_certificate(tls).ok().and_then(|der| fedward_shared::pki::cert_info(&der).ok())?;
        let due = crate::session::renewal_due(info.not_before, info.not_after);
        let wait = Duration::try_from(due - now()).unwrap_or(Duration::ZERO);
        let at = tokio::time::Instant::now() + wait;
        Some(self.not_before.map_or(at, |nb| nb.max(at)))
    }

    fn retry_in(&mut self, wait: Duration) {
        self.not_before = Some(tokio::time::Instant::now() + wait);
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One renewal attempt over the connection: `Ok(true)` when a new certificate is installed.
async fn renew(
    conn: &quinn::Connection,
    opts: &DaemonOptions,
    files: &crate::renew::RenewalFiles,
    site: &SiteId,
    renewal: &mut RenewalState,
) -> Result<bool, SessionEnd> {
    let (state_dir, who) = (opts.state_dir.clone(), site.clone());
    let made = tokio::task::spawn_blocking(move || crate::renew::pending_request(&state_dir, &who)).await;
    let (key_pem, csr_pem) = match made {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            error!(cause = %e, "could not make a key for the certificate renewal");
            renewal.retry_in(RENEWAL_RETRY);
            return Ok(false);
        }
        Err(e) => return Err(SessionEnd::Fatal(format!("renewal task: {e}"))),
    };
    info!("renewing this site's certificate: a new key made here, its signing request sent to the coordinator");
    match request(conn, &Message::Renew(wire::RenewRequest { csr_pem }), Some(opts.transport.request_timeout)).await {
        Ok(Message::Renewed(wire::Renewed { chain_pem: Some(chain) })) => {
            match crate::renew::install(files, &opts.state_dir, site, &key_pem, &chain) {
                Ok((serial, not_after)) => {
                    info!(%serial, %not_after, "installed the renewed certificate");
                    Ok(true)
                }
                Err(e) => {
                    error!(cause = %e, "the coordinator's renewed certificate was not installed");
                    renewal.retry_in(RENEWAL_RETRY);
                    Ok(false)
                }
            }
        }
        Ok(Message::Renewed(wire::Renewed { chain_pem: None })) => {
            warn!("the certificate renewal waits for the consortium admin's approval (pki approve); asking again in a minute");
            renewal.retry_in(RENEWAL_POLL);
            Ok(false)
        }
        Ok(Message::Reject(r)) => {
            error!(reason = %r, "the coordinator did not renew this site's certificate; renew it by hand before it expires");
            renewal.retry_in(RENEWAL_RETRY);
            Ok(false)
        }
        Ok(other) => Err(SessionEnd::Lost(format!("unexpected answer to a renewal: {}", other.kind()))),
        Err(e) => Err(stream_failure(conn, e)),
    }
}

/// The TLS configuration from the (renewed) files.
fn reload_tls(files: &crate::renew::RenewalFiles) -> Result<rustls::ClientConfig, String> {
    let cert = fsutil::read(&files.cert).map_err(|e| e.to_string())?;
    let key = fsutil::read_private_key(&files.key).map_err(|e| e.to_string())?;
    fedward_shared::tls::client_config(&fedward_shared::tls::TlsMaterial { ca_pem: &files.ca_pem, cert_pem: &cert, key_pem: &key })
        .map_err(|e| e.to_string())
}

/// The secure-aggregation identity from the (renewed) files.
fn reload_secagg(files: &crate::renew::RenewalFiles) -> Result<SecAggIdentity, String> {
    let cert = fsutil::read(&files.cert).map_err(|e| e.to_string())?;
    let key = fsutil::read_private_key(&files.key).map_err(|e| e.to_string())?;
    let creds = SiteCredentials::from_pem(&cert, &key).map_err(|e| format!("secure aggregation's signing key: {e}"))?;
    let trust = Trust::from_ca_pem(&files.ca_pem).map_err(|e| format!("secure aggregation's trust anchor: {e}"))?;
    Ok(SecAggIdentity { creds, trust })
}

/// The certificate this agent presents (the one its TLS configuration would send), DER.
fn own_certificate(tls: &rustls::ClientConfig) -> Result<Vec<u8>, String> {
    let key = tls
        .client_auth_cert_resolver
        .resolve(&[], &[rustls::SignatureScheme::ECDSA_NISTP256_SHA256, rustls::SignatureScheme::ED25519])
        .ok_or("the TLS configuration presents no client certificate")?;
    Ok(key.end_entity_cert().map_err(|e| format!("the client certificate: {e}"))?.to_vec())
}

/// The site named by the certificate this agent presents: what the coordinator identifies
/// it by, and what its ledger records.
fn own_site(tls: &rustls::ClientConfig) -> Result<SiteId, String> {
    fedward_shared::pki::site_of_cert(&own_certificate(tls)?).map_err(|e| format!("the client certificate names no valid site: {e}"))
}

/// Logs, at error level, a certificate that has expired or soon will.
fn warn_of_expiry(tls: &rustls::ClientConfig) {
    let info = own_certificate(tls).ok().and_then(|der| fedward_shared::pki::cert_info(&der).ok());
    if let Some(warning) = info.and_then(|c| certificate_warning(now(), c.not_before, c.not_after)) {
        error!("{warning}");
    }
}

/// One request/answer exchange on a fresh stream, within `limit` when the answer is not
/// one that may take long to come (an offer waits for the round to start).
async fn request(conn: &quinn::Connection, msg: &Message, limit: Option<Duration>) -> Result<Message, StreamError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, msg).await?;
        send.finish()?;
        read_message(&mut recv).await
    };
    match limit {
        Some(limit) => within(limit, "request", exchange).await,
        None => exchange.await,
    }
}

/// Turns a failed stream into a session end, reading the connection's close reason: a
/// refusal by the coordinator (or by TLS) is final, anything else is transient.
fn stream_failure(conn: &quinn::Connection, e: StreamError) -> SessionEnd {
    match conn.close_reason() {
        Some(reason) => classify_connection_error(&reason).unwrap_or_else(|| SessionEnd::Lost(reason.to_string())),
        None => SessionEnd::Lost(e.to_string()),
    }
}

/// A refusal or a misconfiguration is final; a connection merely lost is retried.
fn classify_connection_error(e: &quinn::ConnectionError) -> Option<SessionEnd> {
    match ConnectionEnd::of(e) {
        ConnectionEnd::Refused(reason) => Some(SessionEnd::Refused(reason)),
        ConnectionEnd::Misconfigured(reason) => Some(SessionEnd::Misconfigured(reason)),
        ConnectionEnd::Lost(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let max = Duration::from_secs(30);
        let d1 = backoff(1, max, &mut rng);
        assert!(d1 >= Duration::from_millis(250) && d1 <= Duration::from_millis(500), "{d1:?}");
        let d4 = backoff(4, max, &mut rng);
        assert!(d4 >= Duration::from_secs(2) && d4 <= Duration::from_secs(4), "{d4:?}");
        for n in 10..40 {
            let d = backoff(n, max, &mut rng);
            assert!(d >= max / 2 && d <= max, "{n}: {d:?}");
        }
        let samples: std::collections::BTreeSet<_> = (0..20).map(|_| backoff(8, max, &mut rng)).collect();
        assert!(samples.len() > 10, "jitter spreads retries");
    }
}
