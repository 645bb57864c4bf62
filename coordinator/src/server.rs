//! The coordinator's network shell: accepts QUIC connections with mutual TLS, admits
//! enrolled sites, and feeds their messages to the [`RoundMachine`].
//!
//! One task owns the round machine and reads a closed [`Event`] enum from one `select!`
//! loop; each connection and each stream gets its own task that talks to it over
//! channels. The site's identity is read from its certificate, never from a message.
//! Checkpoints are made durable before any output that follows them is acted on.
//!
//! The coordinator's ledger ([`CoordinatorLedger`]): an accepted update is appended (and
//! fsynced) before its `Ack` is sent, and a completed round is sealed after its checkpoint
//! is durable and before the next round's offers go out. A ledger write that fails stops
//! the server with [`ServerError::Ledger`]: the site whose update it was gets no `Ack`
//! (it sees the coordinator shutting down) and the round is redone after a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, error, info, info_span, warn, Instrument};

use fedward_net::{paced, read_message, read_update_tensors, reply, within, write_message, StreamError};
use fedward_shared::config::{Admission, ServerOptimizer, Transport};
use fedward_shared::failpoint;
use fedward_shared::pki::site_of_cert;
use fedward_shared::secagg::{EncryptedShares, SignedKeys, UnixTime, UnmaskingShares};
use fedward_shared::tensor::{TensorSet, TensorSpec};
use fedward_shared::wire::{
    self, AcceptedUpdate, Ack, Decline, Finished, MaskedInputHeader, Message, Reject, RejectCode, RoundId, RoundOffer, SiteId,
    UpdateHeader, Welcome, PROTOCOL_VERSION,
};

use crate::aggregate::{FoldJob, Folded};
use crate::gate::{Gate, Verdict};
use crate::ledger::{CoordinatorLedger, CoordinatorLedgerError};
use crate::metrics::{metrics, CodeLabel, Phase as MetricPhase};
use crate::round::{Checkpoint, Output, PhaseView, RoundMachine, RoundSummary, SecureOutcome};
use crate::store::{Committed, ModelFile, Store, StoreError};

/// Fatal coordinator errors (a site's misbehaviour is never one).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not persist the round: {0}")]
    Persist(#[from] StoreError),
    #[error("persistence task failed: {0}")]
    Join(String),
    #[error("could not record in the ledger: {0}")]
    Ledger(#[from] CoordinatorLedgerError),
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every planned round completed.
    Completed { rounds: u64 },
    /// A round failed too often; the federation stopped.
    Stopped { reason: String },
    /// Shut down on request before the end.
    Interrupted { completed: u64 },
}

/// Knobs of the shell.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub max_concurrent_uploads: usize,
    /// Model downloads served at once: each holds up to a connection's send window.
    pub max_concurrent_downloads: usize,
    /// After the last round, how long to wait for agents to hear `Finished` and leave.
    pub finish_grace: Duration,
    /// Timeouts and the minimum transfer rate.
    pub transport: Transport,
    /// What unauthenticated peers may cost.
    pub admission: Admission,
    /// Sites pinned to one certificate (SHA-256 fingerprints); the others are identified
    /// by any certificate of the CA that names them.
    pub pins: BTreeMap<SiteId, [u8; 32]>,
    /// Serials refused beyond what the TLS configuration's CRL refuses (an admin's
    /// revocations on this coordinator).
    pub revoked: BTreeSet<Vec<u8>>,
    /// Start paused (an admin paused the federation before the restart).
    pub paused: bool,
    /// The issuing CA that renews site certificates, when the consortium runs one here.
    pub renewal: Option<Arc<crate::renewal::Issuer>>,
}

/// An admin's control of the running federation ([`crate::admin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Pause,
    Resume,
    /// Start the next round now with the sites waiting, even while paused.
    NextRound,
}

/// An [`Op`] and where to say what came of it (`Err`: why it was not done).
pub struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// What the dashboard shows; published after every event.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusView {
    pub phase: String,
    /// An admin paused the federation: no new round starts by itself.
    pub paused: bool,
    pub open_round: Option<u64>,
    pub completed_rounds: u64,
    pub total_rounds: u64,
    pub connected: Vec<String>,
    pub enrolled: Vec<String>,
    pub model_digest: String,
    pub offered: usize,
    pub accepted: usize,
    /// When the open round's deadline passes (RFC 3339), while updates are collected.
    pub deadline: Option<String>,
    /// Each enrolled site as this process has seen it, in site order.
    pub sites: Vec<SiteView>,
}

/// What the coordinator has seen of one site since it started (nothing per record: times,
/// the software it names, its certificate's expiry, the size of its last update).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SiteView {
    pub site: String,
    /// RFC 3339: its last connection, disconnection or request.
    pub last_seen: Option<String>,
    /// The `software` of its last `Hello`.
    pub software: Option<String>,
    /// RFC 3339: when the certificate of its last connection expires.
    pub cert_expires: Option<String>,
    /// Bytes on the wire of the last update whose bytes arrived, and when they did.
    pub last_update_bytes: Option<u64>,
    pub last_update_at: Option<String>,
    /// The budget its last `Hello` declared (kept and enforced by the site alone).
    pub budget: Option<wire::DeclaredBudget>,
}

enum ReadyReply {
    // Boxed: an offer is far larger than the other answer, and each is sent once.
    Offer(Box<RoundOffer>, Arc<ModelFile>),
    /// With the final model, which the agent may still fetch.
    Finished(Finished, Arc<ModelFile>),
}

enum Event {
    Connected {
        site: SiteId,
        conn_id: usize,
        conn: quinn::Connection,
    },
    Disconnected {
        site: SiteId,
        conn_id: usize,
    },
    Ready {
        site: SiteId,
        reply: oneshot::Sender<ReadyReply>,
    },
    /// What a site's `Welcome` lists as accepted from it.
    Accepted {
        site: SiteId,
        /// What its `Hello` named (for the dashboard).
        software: String,
        budget: Option<wire::DeclaredBudget>,
        reply: oneshot::Sender<Vec<AcceptedUpdate>>,
    },
    BeginUpdate {
        site: SiteId,
        header: UpdateHeader,
        reply: oneshot::Sender<Result<(), Reject>>,
    },
    AbortUpdate {
        site: SiteId,
    },
    RejectUpdate {
        site: SiteId,
        reject: Reject,
    },
    /// The update's bytes arrived: the round machine hands back the job that checks and
    /// folds them, which the stream's side runs on a blocking thread.
    FinishUpdate {
        site: SiteId,
        header: UpdateHeader,
        tensors: TensorSet,
        reply: oneshot::Sender<Result<FoldJob, Reject>>,
    },
    /// What came of a fold job; always sent, whatever became of the stream.
    Folded {
        site: SiteId,
        header: UpdateHeader,
        result: Result<Folded, Reject>,
        reply: oneshot::Sender<Result<Ack, Reject>>,
    },
    /// The round's checkpoint was written and sealed (or could not be), off the event loop.
    Checkpointed(Result<(Committed, RoundSummary), ServerError>),
    Decline {
        site: SiteId,
        decline: Decline,
        reply: oneshot::Sender<Result<Ack, Reject>>,
    },
    /// A secure round's keys, shares or unmasking shares. Keys and shares are answered
    /// when their step closes (`Output::SecAggReply`), unmasking shares at once.
    SecAgg {
        site: SiteId,
        msg: SecAggIn,
        reply: oneshot::Sender<Message>,
    },
    /// A masked input's header, checked before its bytes: how many bytes follow.
    BeginMasked {
        site: SiteId,
        header: MaskedInputHeader,
        reply: oneshot::Sender<Result<usize, Reject>>,
    },
    AbortMasked {
        site: SiteId,
    },
    /// A masked input's values arrived (digest checked); answered with the unmasking
    /// request when the input step closes.
    FinishMasked {
        site: SiteId,
        header: MaskedInputHeader,
        values: Vec<u64>,
        reply: oneshot::Sender<Message>,
    },
}

/// A secure round's step messages that arrive whole in one frame.
#[derive(Debug)]
enum SecAggIn {
    Keys(SignedKeys),
    Shares(EncryptedShares),
    Unmasking(UnmaskingShares),
}

/// Streams waiting for the close of the secure step they sent, by site.
type SecAggWaiting = HashMap<SiteId, oneshot::Sender<Message>>;

/// Who may connect, as the coordinator's config and CA say at a (re)load: `serve` builds
/// one at start and one on each SIGHUP.
pub struct Access {
    /// The QUIC server side (the TLS config with the CRL): new handshakes use it.
    pub quic: quinn::ServerConfig,
    pub enrolled: BTreeSet<SiteId>,
    /// Serials of revoked client certificates: a live connection presenting one is closed.
    pub revoked: BTreeSet<Vec<u8>>,
    /// Pinned certificates, as [`ServerOptions::pins`].
    pub pins: BTreeMap<SiteId, [u8; 32]>,
}

/// What every connection task shares.
struct Shared {
    events: mpsc::Sender<Event>,
    enrolled: std::sync::RwLock<BTreeSet<SiteId>>,
    pins: std::sync::RwLock<BTreeMap<SiteId, [u8; 32]>>,
    /// Serials revoked by the last reload: a handshake that began under the previous TLS
    /// configuration is checked against them too (at start the TLS check covers all).
    revoked: std::sync::RwLock<BTreeSet<Vec<u8>>>,
    uploads: Semaphore,
    downloads: Semaphore,
    status: watch::Receiver<StatusView>,
    transport: Transport,
    renewal: Option<Arc<crate::renewal::Issuer>>,
}

/// Acks held back until the update's ledger entry is durable.
type PendingAcks = HashMap<SiteId, (oneshot::Sender<Result<Ack, Reject>>, Ack)>;

/// How the process talks to a running server: the status it publishes, the signal to
/// stop, and access rules to reload.
pub struct Controls<S> {
    pub status: watch::Sender<StatusView>,
    pub shutdown: S,
    /// Each [`Access`] received replaces the rules in force (SIGHUP in `serve`).
    pub reload: mpsc::Receiver<Access>,
    /// An admin's pause, resume and next round.
    pub commands: mpsc::Receiver<Command>,
}

/// Runs the federation until it completes, stops, or `controls.shutdown` resolves.
///
/// `ledger` must be opened (and so verified) from the same state as `store`; a round the
/// store completed without a seal (a crash in between) is sealed first.
pub async fn run(
    endpoint: quinn::Endpoint,
    mut machine: RoundMachine,
    store: Store,
    ledger: CoordinatorLedger,
    options: ServerOptions,
    controls: Controls<impl Future<Output = ()>>,
) -> Result<RunOutcome, ServerError> {
    let Controls { status: status_tx, shutdown, mut reload, mut commands } = controls;
    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    let mut enrolled = machine.settings().enrolled.clone();
    let shared = Arc::new(Shared {
        events: events_tx,
        enrolled: std::sync::RwLock::new(enrolled.clone()),
        pins: std::sync::RwLock::new(options.pins.clone()),
        revoked: std::sync::RwLock::new(options.revoked.clone()),
        uploads: Semaphore::new(options.max_concurrent_uploads.max(1)),
        downloads: Semaphore::new(options.max_concurrent_downloads.max(1)),
        status: status_tx.subscribe(),
        transport: options.transport,
        renewal: options.renewal.clone(),
    });
    let gate = Gate::new(options.admission);
    let store = Arc::new(Mutex::new(store));
    let ledger = Arc::new(Mutex::new(ledger));
    let completed = machine.completed_rounds();
    if let Err(e) = with_ledger(&ledger, move |l| l.seal_missed(completed, now_utc()).map(|_| ())).await {
        error!(cause = %e, "stopping: the ledger could not be brought up to date");
        endpoint.close(wire::CLOSE_NORMAL.into(), b"coordinator failed to write its ledger");
        return Err(e);
    }
    let mut pending_acks = PendingAcks::new();
    let mut secagg_waiting = SecAggWaiting::new();
    // The current checkpoint, opened for downloads once per model; connections hold it
    // weakly, so replacing it ends the downloads of a closed round.
    let mut model_file: Option<Arc<ModelFile>> = None;
    let mut connections: HashMap<SiteId, (usize, quinn::Connection)> = HashMap::new();
    // What the dashboard shows of each site; only the loop writes it.
    let mut seen: BTreeMap<SiteId, SiteView> = BTreeMap::new();
    let mut waiting: HashMap<SiteId, oneshot::Sender<ReadyReply>> = HashMap::new();
    let mut next_conn_id = 0usize;
    let mut done_since: Option<Instant> = None;
    // The checkpoint being written, if any: a shutdown lets it finish.
    let mut checkpointing: Option<tokio::task::JoinHandle<()>> = None;
    machine.set_paused(Instant::now(), options.paused);
    if options.paused {
        warn!("the federation is paused (an admin's `admin pause`); `admin resume` starts rounds again");
    }
    tokio::pin!(shutdown);
    publish(&status_tx, &machine, &connections, &enrolled, &seen);
    info!(
        completed = machine.completed_rounds(),
        total = machine.planned_rounds(),
        model = %machine.model_digest().short(),
        "federation ready"
    );

    let outcome = loop {
        let timeout = machine.poll_timeout().map(tokio::time::Instant::from_std);
        let grace_end = done_since.map(|t| tokio::time::Instant::from_std(t + options.finish_grace));
        tokio::select! {
            () = &mut shutdown => {
                info!("shutdown requested");
                break RunOutcome::Interrupted { completed: machine.completed_rounds() };
            }
            Some(ev) = events.recv() => match ev {
                Event::Checkpointed(done) => {
                    checkpointing = None;
                    match done {
                        Ok((committed, summary)) => checkpointed(&mut machine, &mut model_file, committed, &summary),
                        Err(e) => {
                            error!(cause = %e, "stopping: the round could not be made durable");
                            endpoint.close(wire::CLOSE_NORMAL.into(), b"coordinator failed to persist state");
                            return Err(e);
                        }
                    }
                }
                ev => {
                    note_site(&mut seen, &ev);
                    handle_event(&mut machine, ev, &mut connections, &mut waiting, &mut pending_acks, &mut secagg_waiting)
                }
            },
            Some(Command { op, reply }) = commands.recv() => {
                let now = Instant::now();
                let result = match op {
                    Op::Pause => {
                        machine.set_paused(now, true);
                        Ok(match machine.open_round() {
                            Some(r) => format!("paused: round {r} goes on to its end; no round starts after it"),
                            None => "paused: no round starts until resumed".to_owned(),
                        })
                    }
                    Op::Resume => {
                        machine.set_paused(now, false);
                        Ok("resumed".to_owned())
                    }
                    Op::NextRound => machine.start_now(now).map(|r| format!("round {r} started")).map_err(|e| e.to_string()),
                };
                info!(?op, result = ?result, "admin control");
                let _ = reply.send(result);
            }
            Some(access) = reload.recv() => {
                endpoint.set_server_config(Some(access.quic));
                for gone in enrolled.difference(&access.enrolled) {
                    info!(site = %gone, "site removed from the enrolment");
                }
                for new in access.enrolled.difference(&enrolled) {
                    info!(site = %new, "site enrolled");
                }
                enrolled = access.enrolled;
                *shared.enrolled.write().unwrap_or_else(|p| p.into_inner()) = enrolled.clone();
                *shared.pins.write().unwrap_or_else(|p| p.into_inner()) = access.pins.clone();
                *shared.revoked.write().unwrap_or_else(|p| p.into_inner()) = access.revoked.clone();
                // Live connections answer to the new rules at once; the round goes on for
                // the others, and a closed site's update in flight is dropped with it.
                for (site, (_, conn)) in &connections {
                    let reason = if !enrolled.contains(site) {
                        Some(format!("site {site} is no longer enrolled in this consortium"))
                    } else if peer_serial(conn).is_some_and(|s| access.revoked.contains(&s)) {
                        Some(format!("the certificate of site {site} was revoked by the consortium"))
                    } else {
                        pin_mismatch(conn, site, &access.pins)
                    };
                    if let Some(reason) = reason {
                        warn!(site = %site, %reason, "closing the connection");
                        conn.close(wire::CLOSE_REFUSED.into(), reason.as_bytes());
                    }
                }
                info!(enrolled = enrolled.len(), revoked = access.revoked.len(), "access rules reloaded");
            }
            () = sleep_until_opt(timeout), if timeout.is_some() => {
                machine.handle_timeout(Instant::now());
            }
            () = sleep_until_opt(grace_end), if grace_end.is_some() => {
                info!("finish grace period over");
                break final_outcome(&machine);
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break final_outcome(&machine) };
                let remote = incoming.remote_address();
                match gate.admit(remote.ip(), incoming.remote_address_validated()) {
                    Verdict::Accept(ticket) => {
                        let conn_id = next_conn_id;
                        next_conn_id += 1;
                        tokio::spawn(handle_connection(incoming, ticket, conn_id, shared.clone()));
                    }
                    Verdict::Retry => {
                        if let Err(e) = incoming.retry() {
                            debug!(%remote, cause = %e, "could not ask for address validation");
                        }
                    }
                    Verdict::Refuse { reason } => {
                        debug!(%remote, reason, "handshake refused");
                        incoming.refuse();
                    }
                }
            }
        }
        // Published before the outputs are drained as well: a site offered a round asks for
        // its model at once, and its download must not find the status still showing the
        // round as not open (it would be refused as closed).
        publish(&status_tx, &machine, &connections, &enrolled, &seen);
        let drained = drain_outputs(
            &mut machine,
            &store,
            &ledger,
            &mut model_file,
            &mut waiting,
            &mut pending_acks,
            &mut secagg_waiting,
            &connections,
            &shared.events,
            &mut checkpointing,
        )
        .await;
        if let Err(e) = drained {
            error!(cause = %e, "stopping: the round could not be made durable");
            endpoint.close(wire::CLOSE_NORMAL.into(), b"coordinator failed to persist state");
            return Err(e);
        }
        publish(&status_tx, &machine, &connections, &enrolled, &seen);
        if machine.is_done() {
            done_since.get_or_insert_with(Instant::now);
            if connections.is_empty() {
                break final_outcome(&machine);
            }
        }
    };
    if let Some(task) = checkpointing.take() {
        // Its seal is what a restart would otherwise redo (`seal_missed`); let it land.
        // Its report has nobody to read it: closed, the channel refuses it at once rather
        // than leaving the task waiting for room.
        events.close();
        let _ = task.await;
    }
    endpoint.close(wire::CLOSE_NORMAL.into(), b"coordinator shutting down");
    // Bounded: agents that do not answer the close are given up on.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    Ok(outcome)
}

fn final_outcome(machine: &RoundMachine) -> RunOutcome {
    match machine.phase() {
        PhaseView::Stopped { reason } => RunOutcome::Stopped { reason },
        PhaseView::Finished => RunOutcome::Completed { rounds: machine.completed_rounds() },
        _ => RunOutcome::Interrupted { completed: machine.completed_rounds() },
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn handle_event(
    machine: &mut RoundMachine,
    ev: Event,
    connections: &mut HashMap<SiteId, (usize, quinn::Connection)>,
    waiting: &mut HashMap<SiteId, oneshot::Sender<ReadyReply>>,
    pending_acks: &mut PendingAcks,
    secagg_waiting: &mut SecAggWaiting,
) {
    let now = Instant::now();
    match ev {
        Event::Connected { site, conn_id, conn } => {
            if let Some((_, old)) = connections.insert(site.clone(), (conn_id, conn)) {
                info!(site = %site, "site reconnected; closing its previous connection");
                old.close(wire::CLOSE_REPLACED.into(), b"replaced by a newer connection from the same site");
            }
        }
        Event::Disconnected { site, conn_id } => {
            if connections.get(&site).is_some_and(|(id, _)| *id == conn_id) {
                connections.remove(&site);
                waiting.remove(&site);
                secagg_waiting.remove(&site);
                machine.handle_disconnected(now, &site);
                info!(site = %site, "site disconnected");
            }
        }
        Event::Ready { site, reply } => {
            waiting.insert(site.clone(), reply);
            machine.handle_ready(now, site);
        }
        Event::Accepted { site, reply, .. } => {
            let _ = reply.send(machine.accepted_from(&site));
        }
        Event::BeginUpdate { site, header, reply } => {
            let _ = reply.send(machine.begin_update(&site, &header));
        }
        Event::AbortUpdate { site } => machine.abort_update(&site),
        Event::RejectUpdate { site, reject } => machine.reject_update(now, &site, reject),
        Event::FinishUpdate { site, header, tensors, reply } => {
            let _ = reply.send(machine.start_fold(&site, &header, tensors));
        }
        Event::Folded { site, header, result, reply } => match machine.handle_folded(now, &site, &header, result) {
            // Acknowledged once the ledger holds it (`Output::Accepted`).
            Ok(ack) => {
                pending_acks.insert(site, (reply, ack));
            }
            Err(reject) => {
                let _ = reply.send(Err(reject));
            }
        },
        Event::Decline { site, decline, reply } => {
            let _ = reply.send(machine.handle_decline(now, &site, &decline));
        }
        Event::SecAgg { site, msg, reply } => {
            // The wall clock only for the certificates' validity; the machine keeps its
            // deadlines on `now`.
            let held = match msg {
                SecAggIn::Keys(keys) => machine.handle_secagg_keys(now, UnixTime::now(), &site, keys),
                SecAggIn::Shares(shares) => machine.handle_secagg_shares(now, &site, shares),
                SecAggIn::Unmasking(shares) => {
                    let _ = reply.send(answer_message(machine.handle_secagg_unmasking(now, &site, shares)));
                    return;
                }
            };
            match held {
                // Answered by the step's `Output::SecAggReply`, drained after this event.
                Ok(()) => {
                    secagg_waiting.insert(site, reply);
                }
                Err(reject) => {
                    warn!(site = %site, code = %reject.code, reason = %reject.message, "secure aggregation message refused");
                    let _ = reply.send(Message::Reject(reject));
                }
            }
        }
        Event::BeginMasked { site, header, reply } => {
            let _ = reply.send(machine.begin_masked(&site, &header));
        }
        Event::AbortMasked { site } => machine.abort_masked(now, &site),
        Event::FinishMasked { site, header, values, reply } => match machine.finish_masked(now, &site, &header, values) {
            Ok(()) => {
                secagg_waiting.insert(site, reply);
            }
            Err(reject) => {
                warn!(site = %site, code = %reject.code, reason = %reject.message, "masked input refused");
                let _ = reply.send(Message::Reject(reject));
            }
        },
        // Handled by the loop itself (it ends the run on a failure).
        Event::Checkpointed(_) => {}
    }
}

/// Runs `f` on the ledger on a blocking thread (appends fsync).
async fn with_ledger<T: Send + 'static>(
    ledger: &Arc<Mutex<CoordinatorLedger>>,
    f: impl FnOnce(&mut CoordinatorLedger) -> Result<T, CoordinatorLedgerError> + Send + 'static,
) -> Result<T, ServerError> {
    let ledger = ledger.clone();
    tokio::task::spawn_blocking(move || f(&mut ledger.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .map_err(|e| ServerError::Join(e.to_string()))?
        .map_err(ServerError::Ledger)
}

fn now_utc() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

// The loop's own state, lent for the outputs; a struct would only rename it.
#[allow(clippy::too_many_arguments)]
async fn drain_outputs(
    machine: &mut RoundMachine,
    store: &Arc<Mutex<Store>>,
    ledger: &Arc<Mutex<CoordinatorLedger>>,
    model_file: &mut Option<Arc<ModelFile>>,
    waiting: &mut HashMap<SiteId, oneshot::Sender<ReadyReply>>,
    pending_acks: &mut PendingAcks,
    secagg_waiting: &mut SecAggWaiting,
    connections: &HashMap<SiteId, (usize, quinn::Connection)>,
    events: &mpsc::Sender<Event>,
    checkpointing: &mut Option<tokio::task::JoinHandle<()>>,
) -> Result<(), ServerError> {
    while let Some(out) = machine.poll_output() {
        match out {
            Output::Accepted { round, contribution } => {
                let site = contribution.site.clone();
                with_ledger(ledger, move |l| l.record_accepted(round, &contribution, now_utc()).map(|_| ())).await?;
                failpoint::crash_point(failpoint::COORDINATOR_AFTER_ACCEPTED);
                if let Some((reply, ack)) = pending_acks.remove(&site) {
                    let _ = reply.send(Ok(ack));
                }
            }
            Output::Checkpoint(cp) => {
                // Written and sealed by a task of its own, so message handling goes on
                // meanwhile; the machine makes no further output (no offer) until the loop
                // reports the outcome (`Event::Checkpointed`).
                let Checkpoint { completed_rounds, update, summary, secure, select } = *cp;
                // Who was summed and who dropped is logged, and recorded in the ledger
                // before the round's seal (`commit_and_seal`).
                if let Some(o) = &secure {
                    info!(
                        round = %summary.round,
                        summed = o.summed.len(),
                        dropped = o.dropped.len(),
                        dropped_before_shares = o.dropped_before_shares.len(),
                        "secure round unmasked"
                    );
                }
                let span = info_span!("checkpoint", round = %summary.round);
                let (store, ledger, events) = (store.clone(), ledger.clone(), events.clone());
                let (previous, now) = (machine.manifest().to_vec(), now_rfc3339());
                let optimizer = machine.settings().aggregation.server_optimizer;
                *checkpointing = Some(tokio::spawn(
                    async move {
                        let started = Instant::now();
                        let done =
                            commit_and_seal(store, ledger, previous, update, optimizer, summary, secure, select, completed_rounds, now)
                                .await;
                        metrics().observe(MetricPhase::checkpoint, started.elapsed().as_secs_f64());
                        let _ = events.send(Event::Checkpointed(done)).await;
                    }
                    .instrument(span),
                ));
            }
            Output::RoundFailed(f) => {
                let store = store.clone();
                let f2 = f.clone();
                let now = now_rfc3339();
                tokio::task::spawn_blocking(move || store.lock().unwrap_or_else(|p| p.into_inner()).save_failure(&f2, &now))
                    .await
                    .map_err(|e| ServerError::Join(e.to_string()))??;
                if f.gave_up {
                    error!(round = %f.round, attempt = f.attempt, reason = %f.reason, "round failed; federation stopped");
                } else {
                    warn!(round = %f.round, attempt = f.attempt, reason = %f.reason, "round failed; waiting for quorum to retry");
                }
            }
            Output::Offer { to, offer } => {
                let model = open_model_file(store, machine.completed_rounds(), model_file).await?;
                let delivered = waiting.remove(&to).is_some_and(|tx| tx.send(ReadyReply::Offer(Box::new(offer), model)).is_ok());
                if !delivered && !connections.contains_key(&to) {
                    machine.handle_disconnected(Instant::now(), &to);
                }
            }
            Output::SecAggReply { to, round, msg } => {
                // A site that left meanwhile has no stream waiting: nothing to answer.
                if let Some(tx) = secagg_waiting.remove(&to) {
                    debug!(site = %to, round = %round, reply = msg.kind(), "secure step answered");
                    let _ = tx.send(*msg);
                }
            }
            Output::Finished { to, finished } => {
                if let Some(tx) = waiting.remove(&to) {
                    let model = open_model_file(store, machine.completed_rounds(), model_file).await?;
                    let _ = tx.send(ReadyReply::Finished(finished, model));
                }
            }
        }
    }
    Ok(())
}

/// The current checkpoint opened for downloads, once per model.
async fn open_model_file(
    store: &Arc<Mutex<Store>>,
    completed_rounds: u64,
    model_file: &mut Option<Arc<ModelFile>>,
) -> Result<Arc<ModelFile>, ServerError> {
    if let Some(m) = model_file {
        return Ok(m.clone());
    }
    let store = store.clone();
    let opened = tokio::task::spawn_blocking(move || store.lock().unwrap_or_else(|p| p.into_inner()).model_file(completed_rounds))
        .await
        .map_err(|e| ServerError::Join(e.to_string()))??;
    Ok(model_file.insert(Arc::new(opened)).clone())
}

/// Writes a round's checkpoint (and the server optimiser's state) on a blocking thread,
/// then (a secure round: records who was summed) seals the round in the ledger.
#[allow(clippy::too_many_arguments)]
async fn commit_and_seal(
    store: Arc<Mutex<Store>>,
    ledger: Arc<Mutex<CoordinatorLedger>>,
    previous: Vec<TensorSpec>,
    update: TensorSet,
    optimizer: ServerOptimizer,
    summary: RoundSummary,
    secure: Option<SecureOutcome>,
    select: Option<u64>,
    completed_rounds: u64,
    now: String,
) -> Result<(Committed, RoundSummary), ServerError> {
    let (committed, summary) = tokio::task::spawn_blocking(move || {
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        let committed = match select {
            Some(round) => store.commit_selection(round, &summary, completed_rounds, &now),
            None => store.commit_round(&previous, update, &optimizer, &summary, completed_rounds, &now),
        };
        (committed, summary)
    })
    .await
    .map_err(|e| ServerError::Join(e.to_string()))?;
    let committed = committed?;
    if let Committed::Saved { .. } = &committed {
        failpoint::crash_point(failpoint::COORDINATOR_BEFORE_SEAL);
        let (round, attempt) = (summary.round, summary.attempt);
        with_ledger(&ledger, move |l| {
            if let Some(outcome) = &secure {
                l.record_secure_round(round, attempt, outcome, now_utc())?;
            }
            l.seal(round, now_utc()).map(|_| ())
        })
        .await?;
    }
    Ok((committed, summary))
}

/// The loop's side of a written checkpoint: the machine moves on (the next offers follow).
fn checkpointed(machine: &mut RoundMachine, model_file: &mut Option<Arc<ModelFile>>, committed: Committed, s: &RoundSummary) {
    let _g = info_span!("checkpoint", round = %s.round).entered();
    match committed {
        Committed::Saved { manifest, digest } => {
            info!(
                sites = s.contributions.len(),
                examples = s.contributions.iter().map(|c| c.num_examples).sum::<u64>(),
                mean_train_loss = s.mean_train_loss.map_or("withheld".into(), |l| format!("{l:.4}")),
                rejected = s.rejected.len(),
                declined = s.declined.len(),
                missed = s.missed.len(),
                secs = format_args!("{:.1}", s.duration.as_secs_f64()),
                model = %digest.short(),
                "round completed, checkpointed and sealed"
            );
            if let Some(t) = &s.scored {
                let model_round = t.model_round;
                info!(
                    model_round,
                    sites = t.sites,
                    accuracy = t.accuracy().map_or("none".into(), |a| format!("{a:.4}")),
                    "sites scored the model of round {model_round}"
                );
            }
            if let Some(selected) = s.selected {
                info!(selected, "model selection: the federation's model is that of round {selected}");
            }
            metrics().observe(MetricPhase::round, s.duration.as_secs_f64());
            *model_file = None;
            machine.handle_checkpointed(Instant::now(), Ok(manifest));
        }
        Committed::NonFinite { tensor, count } => {
            let reason = format!("the new global model would hold {count} non-finite values in {tensor}; the round is discarded");
            machine.handle_checkpointed(Instant::now(), Err(reason));
        }
    }
}

/// Notes in `seen` what `ev` tells of its site (the dashboard's sites table).
fn note_site(seen: &mut BTreeMap<SiteId, SiteView>, ev: &Event) {
    let site = match ev {
        Event::Connected { site, .. }
        | Event::Disconnected { site, .. }
        | Event::Ready { site, .. }
        | Event::Accepted { site, .. }
        | Event::BeginUpdate { site, .. }
        | Event::AbortUpdate { site }
        | Event::RejectUpdate { site, .. }
        | Event::FinishUpdate { site, .. }
        | Event::Folded { site, .. }
        | Event::Decline { site, .. }
        | Event::SecAgg { site, .. }
        | Event::BeginMasked { site, .. }
        | Event::AbortMasked { site }
        | Event::FinishMasked { site, .. } => site,
        Event::Checkpointed(_) => return,
    };
    let now = now_rfc3339();
    let view = seen.entry(site.clone()).or_insert_with(|| SiteView { site: site.to_string(), ..SiteView::default() });
    match ev {
        Event::Connected { conn, .. } => {
            view.cert_expires = peer_leaf(conn)
                .and_then(|c| fedward_shared::pki::cert_info(c.as_ref()).ok())
                .and_then(|i| i.not_after.format(&time::format_description::well_known::Rfc3339).ok());
        }
        Event::Accepted { software, budget, .. } => {
            view.software = Some(software.clone());
            view.budget = *budget;
        }
        Event::FinishUpdate { header, .. } => {
            // As it travelled (a quantized update is smaller than its values).
            view.last_update_bytes = Some(wire::encoded_payload_bytes(&header.tensors, header.encoding) as u64);
            view.last_update_at = Some(now.clone());
        }
        _ => {}
    }
    view.last_seen = Some(now);
}

fn publish(
    tx: &watch::Sender<StatusView>,
    machine: &RoundMachine,
    connections: &HashMap<SiteId, (usize, quinn::Connection)>,
    enrolled: &BTreeSet<SiteId>,
    seen: &BTreeMap<SiteId, SiteView>,
) {
    let (phase, open_round, offered, accepted) = match machine.phase() {
        PhaseView::WaitingForQuorum { ready, needed } if machine.is_paused() => {
            (format!("paused by an admin ({ready}/{needed} sites ready)"), None, 0, 0)
        }
        PhaseView::WaitingForQuorum { ready, needed } => (format!("waiting for quorum ({ready}/{needed} sites ready)"), None, 0, 0),
        PhaseView::Collecting { round, offered, accepted, .. } => ("collecting updates".to_owned(), Some(round.0), offered, accepted),
        PhaseView::Checkpointing { round } => (format!("writing the checkpoint of round {round}"), None, 0, 0),
        PhaseView::Finished => ("finished".to_owned(), None, 0, 0),
        PhaseView::Stopped { reason } => (format!("stopped: {reason}"), None, 0, 0),
    };
    let mut connected: Vec<String> = connections.keys().map(ToString::to_string).collect();
    connected.sort();
    tx.send_replace(StatusView {
        phase,
        paused: machine.is_paused(),
        open_round,
        completed_rounds: machine.completed_rounds(),
        total_rounds: machine.planned_rounds(),
        connected,
        enrolled: enrolled.iter().map(ToString::to_string).collect(),
        model_digest: machine.model_digest().to_hex(),
        offered,
        accepted,
        deadline: open_round.and(machine.poll_timeout()).and_then(|at| {
            let left = at.saturating_duration_since(Instant::now());
            (time::OffsetDateTime::now_utc() + left).format(&time::format_description::well_known::Rfc3339).ok()
        }),
        sites: enrolled
            .iter()
            .map(|s| seen.get(s).cloned().unwrap_or_else(|| SiteView { site: s.to_string(), ..SiteView::default() }))
            .collect(),
    });
}

/// Wall-clock time for records.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "unknown".into())
}

async fn handle_connection(incoming: quinn::Incoming, ticket: crate::gate::Ticket, conn_id: usize, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let handshake = match incoming.accept() {
        Ok(connecting) => tokio::time::timeout(shared.transport.handshake_timeout, connecting).await,
        Err(e) => {
            debug!(%remote, cause = %e, "handshake not started");
            return;
        }
    };
    // The handshake is over, one way or another: its place at the gate is free.
    drop(ticket);
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Failed handshakes include clients with certificates from another CA or
            // expired ones: rustls names the reason.
            let hint = fedward_shared::tls::explain_handshake_error(&e.to_string()).unwrap_or("");
            warn!(%remote, cause = %e, hint, "TLS handshake failed; connection refused");
            return;
        }
        Err(_) => {
            // Dropping the handshake in progress closes it.
            debug!(%remote, "handshake took too long; dropped");
            return;
        }
    };
    let site = match peer_site(&conn) {
        Ok(site) => site,
        Err(reason) => {
            warn!(%remote, %reason, "refusing connection");
            refuse(&conn, RejectCode::NotEnrolled, &reason).await;
            return;
        }
    };
    let enrolled = shared.enrolled.read().unwrap_or_else(|p| p.into_inner()).contains(&site);
    if !enrolled {
        let reason = format!("site {site} is not enrolled in this consortium");
        warn!(%remote, site = %site, "refusing connection from an unenrolled site");
        refuse(&conn, RejectCode::NotEnrolled, &reason).await;
        return;
    }
    let revoked = peer_serial(&conn).is_some_and(|s| shared.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(&s));
    if revoked {
        warn!(%remote, site = %site, "refusing a revoked certificate");
        refuse(&conn, RejectCode::NotEnrolled, &format!("the certificate of site {site} was revoked by the consortium")).await;
        return;
    }
    let mismatch = pin_mismatch(&conn, &site, &shared.pins.read().unwrap_or_else(|p| p.into_inner()));
    if let Some(reason) = mismatch {
        warn!(%remote, site = %site, "refusing a certificate other than the site's pinned one");
        refuse(&conn, RejectCode::NotEnrolled, &reason).await;
        return;
    }
    let span = info_span!("site", site = %site);
    async move {
        info!(%remote, "site connected");
        if shared.events.send(Event::Connected { site: site.clone(), conn_id, conn: conn.clone() }).await.is_err() {
            return;
        }
        // A connection does not outlive the certificate it was admitted with.
        if let Some(left) = certificate_time_left(&conn) {
            let watched = conn.clone();
            tokio::spawn(
                async move {
                    tokio::select! {
                        () = tokio::time::sleep(left) => {
                            warn!("the site's certificate expired; closing its connection");
                            watched.close(wire::CLOSE_REFUSED.into(), b"the site's certificate expired: renew it (pki request, pki sign)");
                        }
                        _ = watched.closed() => {}
                    }
                }
                .in_current_span(),
            );
        }
        let current: CurrentModel = Arc::default();
        let greeted = Arc::new(AtomicBool::new(false));
        // An admitted site that opens no stream in time is holding a connection for nothing.
        let mut first = true;
        loop {
            let next = if first {
                match tokio::time::timeout(shared.transport.request_timeout, conn.accept_bi()).await {
                    Ok(next) => next,
                    Err(_) => {
                        info!("no request within the request timeout; closing the connection");
                        conn.close(wire::CLOSE_NORMAL.into(), b"no request in time");
                        break;
                    }
                }
            } else {
                conn.accept_bi().await
            };
            first = false;
            match next {
                Ok((send, recv)) => {
                    let ctx = StreamCtx { site: site.clone(), shared: shared.clone(), current: current.clone(), greeted: greeted.clone() };
                    tokio::spawn(handle_stream(ctx, send, recv).in_current_span());
                }
                Err(e) => {
                    debug!(cause = %e, "connection ended");
                    break;
                }
            }
        }
        let _ = shared.events.send(Event::Disconnected { site, conn_id }).await;
    }
    .instrument(span)
    .await;
}

/// The site named by the peer's certificate (already verified against the CA by rustls).
fn peer_site(conn: &quinn::Connection) -> Result<SiteId, String> {
    let leaf = peer_leaf(conn).ok_or("no client certificate")?;
    site_of_cert(&leaf).map_err(|e| format!("client certificate names no valid site: {e}"))
}

/// The peer's own certificate (the first of its chain, as rustls verified it).
fn peer_leaf(conn: &quinn::Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

/// Why the peer's certificate is not the one `site` is pinned to, if it is pinned.
fn pin_mismatch(conn: &quinn::Connection, site: &SiteId, pins: &BTreeMap<SiteId, [u8; 32]>) -> Option<String> {
    let pinned = pins.get(site)?;
    let presented = peer_leaf(conn).map(|c| fedward_shared::pki::fingerprint(c.as_ref()));
    (presented.as_ref() != Some(pinned)).then(|| {
        format!(
            "site {site} is pinned to the certificate {}; this one is {}",
            fedward_shared::pki::format_fingerprint(pinned),
            presented.map_or("unreadable".into(), |f| fedward_shared::pki::format_fingerprint(&f))
        )
    })
}

/// How long the peer's certificate stays valid.
fn certificate_time_left(conn: &quinn::Connection) -> Option<Duration> {
    let info = fedward_shared::pki::cert_info(peer_leaf(conn)?.as_ref()).ok()?;
    let left = info.not_after - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// The serial of the peer's certificate.
fn peer_serial(conn: &quinn::Connection) -> Option<Vec<u8>> {
    fedward_shared::pki::serial_of_cert(peer_leaf(conn)?.as_ref()).ok()
}

/// Answers the client's first stream with a reject and closes the connection, so the
/// agent sees the reason rather than a bare close.
async fn refuse(conn: &quinn::Connection, code: RejectCode, reason: &str) {
    let msg = Message::Reject(Reject::new(code, reason));
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let _ = read_message(&mut recv).await;
            let _ = reply(&mut send, &msg).await;
            // Wait until the reply is delivered (or the peer goes away).
            let _ = send.stopped().await;
        }
    })
    .await;
    if answered.is_err() {
        debug!("refused client sent no stream in time");
    }
    let mut text = reason.as_bytes().to_vec();
    text.truncate(512);
    conn.close(wire::CLOSE_REFUSED.into(), &text);
}

/// The round, global model and manifest last offered on a connection, which its model
/// requests and update streams are checked against.
type CurrentModel = Arc<Mutex<Option<Offered>>>;

#[derive(Clone)]
struct Offered {
    round: RoundId,
    /// Weak: once the round has closed and the coordinator moved on, a connection's
    /// request for its model is stale.
    model: std::sync::Weak<ModelFile>,
    /// The offer's manifest by name: digests computed once, when the model was made.
    manifest: Arc<HashMap<String, TensorSpec>>,
    /// The federation's final model: no round closes under its download.
    last: bool,
}

struct StreamCtx {
    site: SiteId,
    shared: Arc<Shared>,
    current: CurrentModel,
    /// The connection's `Hello` was answered with `Welcome`: until then nothing else is
    /// served (a peer of another protocol version must not get further).
    greeted: Arc<AtomicBool>,
}

impl StreamCtx {
    /// Puts `model` on offer to this connection: its model requests are checked against it.
    fn offered(&self, round: RoundId, model: &Arc<ModelFile>, manifest: &[TensorSpec], last: bool) {
        let manifest = Arc::new(manifest.iter().map(|s| (s.name.clone(), s.clone())).collect());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Offered { round, model: Arc::downgrade(model), manifest, last });
    }
}

async fn handle_stream(ctx: StreamCtx, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let msg = match within(ctx.shared.transport.request_timeout, "request", read_message(&mut recv)).await {
        Ok(m) => m,
        Err(e) => {
            warn!(cause = %e, "malformed request");
            let _ = reply(&mut send, &Message::Reject(Reject::new(RejectCode::Malformed, e.to_string()))).await;
            return;
        }
    };
    let kind = msg.kind();
    if let Err(e) = dispatch(&ctx, msg, &mut send, &mut recv).await {
        debug!(request = kind, cause = %e, "stream ended with an error");
    }
}

async fn dispatch(ctx: &StreamCtx, msg: Message, send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) -> Result<(), StreamError> {
    let events = &ctx.shared.events;
    let gone = || Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down");
    if !matches!(msg, Message::Hello(_)) && !ctx.greeted.load(Ordering::Acquire) {
        warn!(request = msg.kind(), "request before hello");
        return reply(send, &Message::Reject(Reject::new(RejectCode::Malformed, "say Hello first"))).await;
    }
    match msg {
        Message::Hello(hello) => {
            if let Err(e) = hello.check() {
                warn!(cause = %e, "malformed hello");
                return reply(send, &Message::Reject(Reject::new(RejectCode::Malformed, e))).await;
            }
            if hello.protocol_version != PROTOCOL_VERSION {
                let r = Reject::new(
                    RejectCode::UnsupportedVersion,
                    format!("protocol version {} is not supported; this coordinator speaks {PROTOCOL_VERSION}", hello.protocol_version),
                );
                return reply(send, &Message::Reject(r)).await;
            }
            let status = ctx.shared.status.borrow().clone();
            info!(software = %hello.software, "hello");
            let (tx, rx) = oneshot::channel();
            if events
                .send(Event::Accepted { site: ctx.site.clone(), software: hello.software.clone(), budget: hello.budget, reply: tx })
                .await
                .is_err()
            {
                return reply(send, &Message::Reject(gone())).await;
            }
            let Ok(accepted) = rx.await else { return reply(send, &Message::Reject(gone())).await };
            ctx.greeted.store(true, Ordering::Release);
            reply(
                send,
                &Message::Welcome(Welcome {
                    site: ctx.site.clone(),
                    protocol_version: PROTOCOL_VERSION,
                    completed_rounds: status.completed_rounds,
                    total_rounds: status.total_rounds,
                    accepted,
                }),
            )
            .await
        }
        Message::Renew(request) => {
            let Some(issuer) = ctx.shared.renewal.clone() else {
                let r = Reject::new(
                    RejectCode::RenewalUnavailable,
                    "this coordinator issues no certificates; renew with `fedward-agent pki request` and the consortium's `pki sign`",
                );
                return reply(send, &Message::Reject(r)).await;
            };
            let site = ctx.site.clone();
            let signed =
                tokio::task::spawn_blocking(move || issuer.request(&site, &request.csr_pem, time::OffsetDateTime::now_utc())).await;
            let answer = match signed {
                Ok(Ok(chain_pem)) => {
                    match &chain_pem {
                        Some(_) => info!("issued a renewed certificate"),
                        None => info!("a certificate renewal waits for an admin's `pki approve`"),
                    }
                    Message::Renewed(wire::Renewed { chain_pem })
                }
                Ok(Err(e)) => {
                    warn!(cause = %e, "certificate renewal refused");
                    Message::Reject(Reject::new(RejectCode::RenewalUnavailable, e.to_string()))
                }
                Err(e) => Message::Reject(Reject::new(RejectCode::RenewalUnavailable, format!("renewal failed: {e}"))),
            };
            reply(send, &answer).await
        }
        Message::Ready(_) => {
            let (tx, rx) = oneshot::channel();
            if events.send(Event::Ready { site: ctx.site.clone(), reply: tx }).await.is_err() {
                return reply(send, &Message::Reject(gone())).await;
            }
            match rx.await {
                Ok(ReadyReply::Offer(offer, model)) => {
                    info!(round = %offer.round, "round offered");
                    ctx.offered(offer.round, &model, &offer.manifest, false);
                    reply(send, &Message::RoundOffer(*offer)).await
                }
                Ok(ReadyReply::Finished(f, model)) => {
                    // The final model stays on offer to this connection: an agent with an
                    // older copy fetches it before it leaves.
                    ctx.offered(RoundId(f.completed_rounds), &model, &f.manifest, true);
                    reply(send, &Message::Finished(f)).await
                }
                Err(_) => reply(send, &Message::Reject(gone())).await,
            }
        }
        Message::ModelRequest(req) => {
            let current = ctx.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let offered = match current {
                Some(o) if o.round == req.round => o,
                _ => {
                    let r = Reject::new(RejectCode::StaleRound, format!("round {} was not offered on this connection", req.round));
                    return reply(send, &Message::Reject(r)).await;
                }
            };
            let Some(model) = offered.model.upgrade() else {
                let r = Reject::new(RejectCode::StaleRound, format!("round {} has closed", req.round));
                return reply(send, &Message::Reject(r)).await;
            };
            let specs = match requested_specs(&offered.manifest, &req.names) {
                Ok(specs) => specs,
                Err(r) => {
                    warn!(code = %r.code, reason = %r.message, "model request refused");
                    return reply(send, &Message::Reject(r)).await;
                }
            };
            let bytes: usize = specs.iter().map(|s| s.shape.iter().product::<usize>() * 4).sum();
            let span = info_span!("model", round = %req.round, tensors = specs.len(), mib = bytes >> 20);
            // A download slot first (what many sites downloading at once may buffer is
            // bounded by the slots); the round closing ends the wait.
            let round_over = async {
                if offered.last {
                    std::future::pending::<()>().await;
                }
                round_closed(ctx.shared.status.clone(), req.round).await;
            };
            let slot = tokio::select! {
                slot = ctx.shared.downloads.acquire() => slot,
                () = round_over => {
                    let r = Reject::new(RejectCode::StaleRound, format!("round {} has closed", req.round));
                    return reply(send, &Message::Reject(r)).await;
                }
            };
            let Ok(_slot) = slot else {
                return reply(send, &Message::Reject(Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down"))).await;
            };
            paced(ctx.shared.transport.pace, bytes, "model download", async {
                write_message(send, &Message::Tensors(specs.clone())).await?;
                failpoint::crash_point(failpoint::COORDINATOR_DOWNLOAD);
                send_from_file(send, &model, &specs).await?;
                send.finish()?;
                debug!("model sent");
                Ok(())
            })
            .instrument(span)
            .await
        }
        Message::Update(header) => {
            let span = info_span!("update", round = %header.round);
            receive_update(ctx, header, send, recv).instrument(span).await
        }
        Message::SecAggKeys(keys) => {
            let round = keys.round;
            secagg_step(ctx, round, SecAggIn::Keys(keys), send).instrument(info_span!("secagg-keys", round = %round)).await
        }
        Message::SecAggShares(shares) => {
            let round = shares.round;
            secagg_step(ctx, round, SecAggIn::Shares(shares), send).instrument(info_span!("secagg-shares", round = %round)).await
        }
        Message::SecAggUnmasking(shares) => {
            let round = shares.round;
            secagg_step(ctx, round, SecAggIn::Unmasking(shares), send).instrument(info_span!("secagg-unmasking", round = %round)).await
        }
        Message::SecAggMasked(header) => {
            let span = info_span!("secagg-masked", round = %header.round);
            receive_masked(ctx, header, send, recv).instrument(span).await
        }
        Message::Decline(decline) => {
            info!(round = %decline.round, reason = ?decline.reason, "site declined the round: {}", decline.reason);
            let answer = ask(events, |reply| Event::Decline { site: ctx.site.clone(), decline, reply }).await;
            reply(send, &answer_message(answer)).await
        }
        other => {
            let r = Reject::new(RejectCode::UnexpectedMessage, format!("a {} cannot start a stream", other.kind()));
            reply(send, &Message::Reject(r)).await
        }
    }
}

/// Hands a request to the event loop (`event` wraps the reply channel) and waits for its
/// answer; a loop that has stopped answers that the coordinator is shutting down.
async fn ask<T>(events: &mpsc::Sender<Event>, event: impl FnOnce(oneshot::Sender<Result<T, Reject>>) -> Event) -> Result<T, Reject> {
    let gone = || Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down");
    let (tx, rx) = oneshot::channel();
    if events.send(event(tx)).await.is_err() {
        return Err(gone());
    }
    rx.await.unwrap_or_else(|_| Err(gone()))
}

async fn receive_update(
    ctx: &StreamCtx,
    header: UpdateHeader,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), StreamError> {
    let events = &ctx.shared.events;
    let site = &ctx.site;
    let gone = || Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down");
    let closed = || Reject::new(RejectCode::StaleRound, format!("round {} closed while the update was arriving", header.round));
    // Admission first (one upload per site, checked from the header alone), so a site
    // that is refused never holds an upload slot.
    let admitted = ask(events, |reply| Event::BeginUpdate { site: site.clone(), header: header.clone(), reply }).await;
    if let Err(reject) = admitted {
        warn!(code = %reject.code, reason = %reject.message, "update refused");
        let _ = recv.stop(0u32.into());
        return reply(send, &Message::Reject(reject)).await;
    }
    let round_over = round_closed(ctx.shared.status.clone(), header.round);
    tokio::pin!(round_over);
    let Some(_permit) = upload_slot(ctx, header.round, round_over.as_mut(), &closed, send, recv).await? else { return Ok(()) };
    failpoint::crash_point(failpoint::COORDINATOR_UPLOAD);
    let started = Instant::now();
    // What travels: the header's tensors in its encoding (checked against the offer's).
    let bytes = wire::encoded_payload_bytes(&header.tensors, header.encoding);
    let transfer = paced(ctx.shared.transport.pace, bytes, "update upload", read_update_tensors(recv, &header.tensors, header.encoding));
    let received = tokio::select! {
        received = transfer => received,
        () = &mut round_over => {
            info!("round closed while the update was arriving; transfer stopped");
            let _ = recv.stop(0u32.into());
            return reply(send, &Message::Reject(closed())).await;
        }
    };
    let tensors = match received {
        Ok(t) => t,
        Err(e @ (StreamError::Tensors(_) | StreamError::TooSlow { .. })) => {
            // A digest that does not match, or a site too slow to finish: its answer for
            // the round, recorded, so the round need not wait for it.
            let code = if matches!(e, StreamError::TooSlow { .. }) { RejectCode::TooSlow } else { RejectCode::DigestMismatch };
            let reject = Reject::new(code, e.to_string());
            warn!(code = %reject.code, reason = %reject.message, "update refused");
            metrics().updates_rejected.get_or_create(&CodeLabel { code: reject.code.to_string() }).inc();
            let _ = recv.stop(0u32.into());
            let _ = events.send(Event::RejectUpdate { site: site.clone(), reject: reject.clone() }).await;
            return reply(send, &Message::Reject(reject)).await;
        }
        Err(e) => {
            warn!(cause = %e, "update transfer broke off");
            let _ = events.send(Event::AbortUpdate { site: site.clone() }).await;
            return Err(e);
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let mib = bytes as f64 / (1 << 20) as f64;
    let job = ask(events, |reply| Event::FinishUpdate { site: site.clone(), header: header.clone(), tensors, reply }).await;
    let answer = match job {
        Ok(job) => {
            // The check and fold run on a blocking thread, so the event loop goes on
            // serving the other sites; a task of its own reports the outcome even if this
            // stream is dropped meanwhile (the round waits for it).
            let (tx, rx) = oneshot::channel();
            let (events, site, header) = (events.clone(), site.clone(), header.clone());
            tokio::spawn(async move {
                let result = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let result = job.run();
                    metrics().observe(MetricPhase::aggregate, started.elapsed().as_secs_f64());
                    result
                })
                .await
                .unwrap_or_else(|e| Err(Reject::new(RejectCode::Malformed, format!("the update could not be folded: {e}"))));
                let _ = events.send(Event::Folded { site, header, result, reply: tx }).await;
            });
            rx.await.unwrap_or_else(|_| Err(gone()))
        }
        Err(reject) => Err(reject),
    };
    match &answer {
        Ok(_) => {
            metrics().updates_accepted.inc();
            metrics().received_bytes.inc_by(bytes as u64);
            metrics().observe(MetricPhase::upload, secs);
            if let Some(train) = header.metrics.as_ref().map(|m| m.train_secs).filter(|t| t.is_finite() && *t >= 0.0) {
                metrics().observe(MetricPhase::train, train);
            }
        }
        Err(r) => {
            metrics().updates_rejected.get_or_create(&CodeLabel { code: r.code.to_string() }).inc();
        }
    }
    match &answer {
        Ok(_) => info!(
            examples = header.num_examples,
            mib = format_args!("{mib:.1}"),
            mib_per_s = format_args!("{:.0}", mib / secs.max(1e-9)),
            "update accepted"
        ),
        Err(r) => warn!(code = %r.code, reason = %r.message, "update refused"),
    }
    reply(send, &answer_message(answer)).await
}

/// A secure step's message to the round machine; the answer comes when the step closes
/// (bounded by the step's deadline in the machine) or, for unmasking shares, at once. The
/// round closing ends the wait.
async fn secagg_step(ctx: &StreamCtx, round: RoundId, msg: SecAggIn, send: &mut quinn::SendStream) -> Result<(), StreamError> {
    let gone = || Message::Reject(Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down"));
    let (tx, rx) = oneshot::channel();
    if ctx.shared.events.send(Event::SecAgg { site: ctx.site.clone(), msg, reply: tx }).await.is_err() {
        return reply(send, &gone()).await;
    }
    let answer = tokio::select! {
        answer = rx => answer.unwrap_or_else(|_| gone()),
        () = round_closed(ctx.shared.status.clone(), round) => {
            Message::Reject(Reject::new(RejectCode::StaleRound, format!("round {round} closed")))
        }
    };
    reply(send, &answer).await
}

/// A masked input: the header admitted first (one per site, its size checked against the
/// round's vector), then an upload slot, `Proceed`, the raw little-endian values at the
/// minimum rate (digest checked), and the answer held until the input step closes.
async fn receive_masked(
    ctx: &StreamCtx,
    header: MaskedInputHeader,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), StreamError> {
    let events = &ctx.shared.events;
    let site = &ctx.site;
    let gone = || Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down");
    let closed = || Reject::new(RejectCode::StaleRound, format!("round {} closed while the masked input was arriving", header.round));
    let admitted = ask(events, |reply| Event::BeginMasked { site: site.clone(), header: header.clone(), reply }).await;
    let bytes = match admitted {
        Ok(bytes) => bytes,
        Err(reject) => {
            warn!(code = %reject.code, reason = %reject.message, "masked input refused");
            let _ = recv.stop(0u32.into());
            return reply(send, &Message::Reject(reject)).await;
        }
    };
    let round_over = round_closed(ctx.shared.status.clone(), header.round);
    tokio::pin!(round_over);
    let Some(permit) = upload_slot(ctx, header.round, round_over.as_mut(), &closed, send, recv).await? else { return Ok(()) };
    // Admitted: `bytes` is the round's vector (at most twice the update limit).
    let mut buf = vec![0u8; bytes];
    let transfer = paced(ctx.shared.transport.pace, bytes, "masked input upload", async {
        recv.read_exact(&mut buf).await?;
        Ok(())
    });
    let received = tokio::select! {
        received = transfer => received,
        () = &mut round_over => {
            let _ = recv.stop(0u32.into());
            return reply(send, &Message::Reject(closed())).await;
        }
    };
    drop(permit);
    if let Err(e) = received {
        warn!(cause = %e, "masked input transfer broke off");
        let _ = events.send(Event::AbortMasked { site: site.clone() }).await;
        return Err(e);
    }
    // `begin_masked` sized the payload at the round's width: `values` (at least one) of
    // equal size.
    let width = bytes / usize::try_from(header.values).unwrap_or(usize::MAX).max(1);
    let values = match wire::masked_values_from_bytes(&header, width, &buf) {
        Ok(v) => v,
        Err(e) => {
            let _ = events.send(Event::AbortMasked { site: site.clone() }).await;
            let reject = Reject::new(RejectCode::DigestMismatch, e.to_string());
            warn!(code = %reject.code, reason = %reject.message, "masked input refused");
            return reply(send, &Message::Reject(reject)).await;
        }
    };
    drop(buf);
    metrics().received_bytes.inc_by(bytes as u64);
    info!(values = values.len(), "masked input received");
    let (tx, rx) = oneshot::channel();
    let ev = Event::FinishMasked { site: site.clone(), header: header.clone(), values, reply: tx };
    if events.send(ev).await.is_err() {
        return reply(send, &Message::Reject(gone())).await;
    }
    let answer = tokio::select! {
        answer = rx => answer.unwrap_or_else(|_| Message::Reject(gone())),
        () = &mut round_over => Message::Reject(closed()),
    };
    reply(send, &answer).await
}

/// Streams the named tensors' bytes from the checkpoint file, a chunk at a time.
async fn send_from_file(send: &mut quinn::SendStream, model: &ModelFile, specs: &[TensorSpec]) -> Result<(), StreamError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let started = Instant::now();
    let io = |e: std::io::Error| StreamError::File(e.to_string());
    let mut file = tokio::fs::File::open(model.path()).await.map_err(io)?;
    let mut chunk = vec![0u8; 1 << 20];
    for spec in specs {
        let (offset, len) = model.range(&spec.name).ok_or_else(|| StreamError::File(format!("no tensor {}", spec.name)))?;
        file.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            file.read_exact(&mut chunk[..n]).await.map_err(io)?;
            send.write_all(&chunk[..n]).await?;
            metrics().sent_bytes.inc_by(n as u64);
            left -= n;
        }
    }
    metrics().observe(MetricPhase::download, started.elapsed().as_secs_f64());
    Ok(())
}

/// Resolves once `round` is no longer the open round (or the server is gone).
/// An upload slot for an admitted update or masked input, then `Proceed`: only now may
/// the site send its bytes, so a site waiting for a slot has nothing buffered here. The
/// slots bound memory: at most this many uploads are received at once, whatever the sites
/// do. `None` when the site was answered instead (the round closed while it waited, or the
/// coordinator is shutting down); closing the round (`round_over`) also gives up the
/// transfer that follows, in the caller.
async fn upload_slot<'a>(
    ctx: &'a StreamCtx,
    round: RoundId,
    round_over: std::pin::Pin<&mut impl Future<Output = ()>>,
    closed: &impl Fn() -> Reject,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<Option<tokio::sync::SemaphorePermit<'a>>, StreamError> {
    let permit = tokio::select! {
        permit = ctx.shared.uploads.acquire() => permit,
        () = round_over => {
            let _ = recv.stop(0u32.into());
            reply(send, &Message::Reject(closed())).await?;
            return Ok(None);
        }
    };
    let Ok(permit) = permit else {
        reply(send, &Message::Reject(Reject::new(RejectCode::ShuttingDown, "coordinator is shutting down"))).await?;
        return Ok(None);
    };
    write_message(send, &Message::Proceed(Ack { round })).await?;
    Ok(Some(permit))
}

async fn round_closed(mut status: watch::Receiver<StatusView>, round: RoundId) {
    let _ = status.wait_for(|s| s.open_round != Some(round.0)).await;
}

/// The specs of the requested tensors, from the offer's manifest (digests already
/// computed). Refused before any work: more names than the model has, a name twice, or a
/// name the model lacks.
fn requested_specs(manifest: &HashMap<String, TensorSpec>, names: &[String]) -> Result<Vec<TensorSpec>, Reject> {
    if names.len() > manifest.len() {
        return Err(Reject::new(
            RejectCode::Malformed,
            format!("{} tensors requested, the global model has {}", names.len(), manifest.len()),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    names
        .iter()
        .map(|name| {
            if !seen.insert(name.as_str()) {
                return Err(Reject::new(RejectCode::Malformed, format!("tensor {name} requested twice")));
            }
            manifest
                .get(name)
                .cloned()
                .ok_or_else(|| Reject::new(RejectCode::UnknownTensor, format!("the global model has no tensor {name}")))
        })
        .collect()
}

fn answer_message(answer: Result<Ack, Reject>) -> Message {
    match answer {
        Ok(ack) => Message::Ack(ack),
        Err(r) => Message::Reject(r),
    }
}

#[cfg(test)]
mod tests {
    use fedward_shared::tensor::Digest;

    use super::*;

    #[test]
    fn a_model_request_is_checked_against_the_manifest_before_any_work() {
        let spec = |name: &str| TensorSpec { name: name.into(), shape: vec![2, 3], digest: Digest([1; 32]) };
        let manifest: HashMap<String, TensorSpec> = ["a", "b"].iter().map(|n| (n.to_string(), spec(n))).collect();
        let names = |ns: &[&str]| ns.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(requested_specs(&manifest, &names(&["b", "a"])).unwrap(), vec![spec("b"), spec("a")]);
        // The amplification of issue 17: one large tensor named thousands of times.
        let amplified = vec!["a".to_owned(); 10_000];
        assert_eq!(requested_specs(&manifest, &amplified).unwrap_err().code, RejectCode::Malformed);
        assert_eq!(requested_specs(&manifest, &names(&["a", "a"])).unwrap_err().code, RejectCode::Malformed);
        assert_eq!(requested_specs(&manifest, &names(&["c"])).unwrap_err().code, RejectCode::UnknownTensor);
    }
}
