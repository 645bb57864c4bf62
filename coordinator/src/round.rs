//! The federation's round state machine: waiting for quorum, offer, collecting,
//! aggregating, checkpoint, next round.
//!
//! Sans-IO in the style of quinn-proto: inputs arrive through `handle_*` calls that carry
//! the current time, outputs leave through [`RoundMachine::poll_output`] as data, and the
//! next deadline through [`RoundMachine::poll_timeout`]. This module does no I/O and never
//! reads the clock. The shell must persist an [`Output::Checkpoint`] and report the result
//! ([`RoundMachine::handle_checkpointed`]) before the federation moves on, and record an
//! [`Output::Accepted`] in the ledger before it acknowledges that update to the site.
//!
//! The machine holds no model, only its manifest: the shell keeps the checkpoints and
//! writes each new one from the last and the round's combined update (so the coordinator
//! never holds a whole model beside the running sum and the updates being received).
//!
//! # Secure rounds
//!
//! Under `[aggregation] method = "secure"` ([`Settings::secure`]) a round's offer carries
//! a [`SecureRound`] and the round runs `shared::secagg`'s four steps instead of taking
//! updates, with a [`SecAggServer`] inside the round:
//!
//! 1. **keys**, from the offer until every offered site sent its signed keys (or
//!    declined, or left) or the step deadline: the keys are relayed to every sender
//!    ([`Output::SecAggReply`] answers each site's waiting stream);
//! 2. **shares**, likewise (step deadline), relayed to each site;
//! 3. **masked inputs**, due by the round's deadline (sites train between the shares and
//!    their input): [`RoundMachine::begin_masked`] checks the header (size, privacy
//!    policy, declared spend) before the bytes, [`RoundMachine::finish_masked`] takes the
//!    values and emits [`Output::Accepted`] (the ledger records the release); the
//!    unmasking request goes to every sender when the step closes;
//! 4. **unmasking** (step deadline): each survivor's shares are answered at once; at the
//!    close the sum is unmasked, decoded ([`FixedPoint::decode_mean`]) into the round's
//!    mean delta and checkpointed like a FedAvg round ([`Output::Checkpoint`], with
//!    [`Checkpoint::secure`] naming who was summed and who dropped).
//!
//! A site that leaves before its masked input is simply absent from the sum (its mask
//! key is reconstructed from its neighbours' shares); any step closing with too few sites,
//! or too few shares, fails the round with [`SecAggError`]'s reason and nothing else: no
//! partial sum leaves the machine.
//!
//! **What the coordinator's bound means here.** The coordinator never sees one update,
//! so it can neither clip nor refuse one. An honest site clips its update to the bound `C`
//! ([`RoundMachine::update_bound`], the offer's `clip`) and the fixed-point encoding
//! clamps each coordinate to `[-C, C]` (times its weight). A site that lies is not held
//! by either: an enrolled site, with its own certificate, can send any vector modulo
//! `2^bits` and any weight, and the coordinator cannot tell which site did. What is still
//! checked is the decoded result ([`check_secure_mean`]): the total weight must lie
//! between the number of survivors and that times `max_weight`, and the mean must be
//! what honest sites can produce (every coordinate within `C`, L2 norm within `C`, both
//! up to the encoding's error); otherwise the round fails. So one malicious site can
//! still (a) move the round's mean anywhere within that ball, whatever its share of the
//! weight (under FedAvg in the clear its pull is bounded by its weight's share), (b) make
//! any round fail (denial of service, which the retry limit turns into a stopped
//! federation), and (c) do so unseen: nothing names the culprit. Range proofs (each
//! masked input proven to encode a vector of norm at most `C`) would close (a); they are
//! not implemented.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedward_shared::config::{Aggregation, Weighting};
use fedward_shared::dp::{Accountant, Release};
use fedward_shared::history::ScoreRecord;
use fedward_shared::plan::{PrivacyMode, PrivacyPlan, TrainingPlan};
use fedward_shared::secagg::{
    EncryptedShares, FixedPoint, MaskedInput, RoundSetup, SecAggError, SecAggParams, SecAggServer, SignedKeys, Step, Trust, UnixTime,
    UnmaskingShares,
};
use fedward_shared::tensor::{element_count, manifest_digest, Digest, Tensor, TensorSet, TensorSpec};
use fedward_shared::wire::{
    AcceptedUpdate, Ack, Decline, DeclineReason, Finished, LocalMetrics, MaskedInputHeader, Message, PrivacyPolicy, PrivacyUsed, Reject,
    RejectCode, RelayedKeys, RoundId, RoundOffer, Scoring, SecureRound, SiteId, UpdateHeader, ValidationScore,
};

use crate::aggregate::{Aggregator, FoldJob, Folded, Layout};

/// Fixed parameters of a federation.
#[derive(Clone, Debug)]
pub struct Settings {
    pub total_rounds: u64,
    pub min_sites: usize,
    pub round_deadline: Duration,
    /// A round that fails this many times in a row ends the federation.
    pub max_attempts: u32,
    pub max_update_bytes: usize,
    /// The plan offered every round; `trainable_tensors` must be filled in.
    pub plan: TrainingPlan,
    pub policy: PrivacyPolicy,
    /// The coordinator's own bounds on each update and how updates are combined.
    pub aggregation: Aggregation,
    pub enrolled: BTreeSet<SiteId>,
    /// Secure aggregation: every round runs `shared::secagg` (see the module docs).
    pub secure: Option<SecureSettings>,
    /// Federated model selection (see [`SelectionSettings`]); `None`: the last round's
    /// model is the federation's result.
    pub selection: Option<SelectionSettings>,
}

impl Settings {
    /// Rounds the federation runs: the training rounds, and the final scoring round under
    /// model selection.
    pub fn planned_rounds(&self) -> u64 {
        self.total_rounds + u64::from(self.selection.is_some())
    }

    /// Whether `round` is the final scoring round (model selection): sites train nothing.
    pub fn is_scoring_round(&self, round: RoundId) -> bool {
        self.selection.is_some() && round.0 == self.total_rounds + 1
    }
}

/// Federated model selection: every offer asks each site to score the offered model on its
/// own validation split; after the `total_rounds` training rounds one more round only
/// scores the last model, and its "checkpoint" is the best of the last `candidates` models
/// by the example-weighted validation figure (the latest on a tie, the last model when none
/// was scored). That model is what `Finished` hands out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelectionSettings {
    /// A score's noise multiplier under a DP plan (what the offer asks for).
    pub noise_multiplier: f64,
    /// How many of the latest global models are candidates (the checkpoints the store keeps).
    pub candidates: u64,
}

/// A federation's secure aggregation settings.
#[derive(Clone, Debug)]
pub struct SecureSettings {
    pub params: SecAggParams,
    /// The keys, shares and unmasking steps each wait this long.
    pub step_deadline: Duration,
    /// The consortium CA the sites' signed keys must chain to.
    pub trust: Trust,
}

/// One site's accepted contribution to a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub site: SiteId,
    /// The examples the site claims it trained on.
    pub num_examples: u64,
    /// What its update weighed in FedAvg: the claim clamped to the consortium's
    /// `max_examples_per_site`, or 1 under equal weighting.
    pub weight: u64,
    /// The L2 norm of the update as it arrived.
    pub update_norm: f64,
    /// What the norm bound scaled the update by (1 when it was within the bound).
    pub scale: f64,
    /// The site's local figures, when it shared them (never under a DP plan unless the
    /// site opted in) and they were finite.
    pub metrics: Option<LocalMetrics>,
    /// Its score of the offered model (model selection), as sent.
    pub score: Option<ValidationScore>,
    pub privacy: PrivacyUsed,
    /// Digest of the update's tensor manifest (names, shapes, tensor digests).
    pub update_digest: Digest,
}

/// What happened in a completed round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSummary {
    pub round: RoundId,
    pub attempt: u32,
    pub contributions: Vec<Contribution>,
    pub declined: Vec<(SiteId, DeclineReason)>,
    pub rejected: Vec<(SiteId, Reject)>,
    /// Offered sites that neither answered nor were refused before the round closed.
    pub missed: Vec<SiteId>,
    /// Weighted mean of the training loss of the sites that shared it.
    pub mean_train_loss: Option<f64>,
    pub duration: Duration,
    /// Model selection: the sites' scores of the model this round was offered (that of
    /// the round before), when any site sent one.
    pub scored: Option<ScoreRecord>,
    /// The final scoring round: the round whose model was selected (and is checkpointed
    /// again as this round's).
    pub selected: Option<u64>,
}

/// A round's outcome to be made durable before anything else happens: the checkpoint
/// after `completed_rounds` is the previous one plus `update` (the combined update of
/// the trainable tensors).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub completed_rounds: u64,
    pub update: TensorSet,
    pub summary: RoundSummary,
    /// A secure round: who was summed and who dropped (the summary's contributions carry
    /// no per-site weight or norm: the coordinator never saw them).
    pub secure: Option<SecureOutcome>,
    /// The final scoring round: the checkpoint is a copy of this earlier round's model
    /// (`update` is empty).
    pub select: Option<u64>,
}

/// Who took part in a secure round's sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecureOutcome {
    /// Sites whose masked input is in the sum.
    pub summed: Vec<SiteId>,
    /// Sites that shared their keys and left before their masked input: absent from the
    /// sum, their masks removed with their neighbours' shares.
    pub dropped: Vec<SiteId>,
    /// Sites that advertised keys and sent no shares.
    pub dropped_before_shares: Vec<SiteId>,
    /// The sum of the summed sites' clamped weights (all the coordinator learns of them).
    pub total_weight: u64,
}

/// A round that could not be completed.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundFailure {
    pub round: RoundId,
    pub attempt: u32,
    pub reason: String,
    pub rejected: Vec<(SiteId, Reject)>,
    pub declined: Vec<(SiteId, DeclineReason)>,
    pub missed: Vec<SiteId>,
    /// No further attempt will be made: the federation has stopped.
    pub gave_up: bool,
}

/// What the shell must do, in order.
#[derive(Clone, Debug)]
pub enum Output {
    /// An update was folded into the round: record it durably (the coordinator's ledger),
    /// then send the site its `Ack`. Comes before the round's `Checkpoint`.
    Accepted {
        round: RoundId,
        contribution: Contribution,
    },
    /// A secure round's answer to the site's stream waiting on the step it sent
    /// (`SecAggRelayedKeys`, `SecAggRelayedShares`, `SecAggUnmask`), or a `Reject` when
    /// the step failed or the site was left out.
    SecAggReply {
        to: SiteId,
        round: RoundId,
        msg: Box<Message>,
    },
    /// Send this offer to the site's waiting `Ready` stream.
    Offer {
        to: SiteId,
        offer: RoundOffer,
    },
    /// Tell the site's waiting `Ready` stream that the federation is over.
    Finished {
        to: SiteId,
        finished: Finished,
    },
    /// Persist, then continue.
    Checkpoint(Box<Checkpoint>),
    RoundFailed(RoundFailure),
}

/// Where the federation stands, for dashboards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PhaseView {
    WaitingForQuorum {
        ready: usize,
        needed: usize,
    },
    Collecting {
        round: RoundId,
        offered: usize,
        accepted: usize,
        answered: usize,
    },
    /// The round closed; its checkpoint is being written.
    Checkpointing {
        round: RoundId,
    },
    Finished,
    Stopped {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum SiteStatus {
    Uploading,
    /// Its bytes arrived; the shell is checking and folding them ([`FoldJob`]).
    Folding,
    Accepted,
    Declined,
    Rejected,
    Gone,
}

#[derive(Debug)]
struct Collecting {
    round: RoundId,
    started: Instant,
    deadline: Instant,
    offered: BTreeSet<SiteId>,
    status: BTreeMap<SiteId, SiteStatus>,
    /// Shared with the fold jobs the shell runs off its event loop.
    agg: Arc<Mutex<Aggregator>>,
    layout: Layout,
    /// The deadline passed while folds were running: the round closes once they report.
    closing: bool,
    contributions: Vec<Contribution>,
    declined: Vec<(SiteId, DeclineReason)>,
    rejected: Vec<(SiteId, Reject)>,
    /// A secure round's state; `None` for rounds in the clear.
    secure: Option<Box<Secure>>,
}

/// A secure round's progress.
#[derive(Debug)]
struct Secure {
    /// `None` once the round finished or failed.
    server: Option<SecAggServer>,
    offer: SecureRound,
    fixed: FixedPoint,
    step: Step,
    step_deadline: Instant,
    /// Sites that may still send this step's message.
    expected: BTreeSet<SiteId>,
    /// Sites whose message of this step was taken; for the first three steps their
    /// streams wait for the step's close.
    sent: BTreeSet<SiteId>,
    /// Masked inputs whose bytes are arriving.
    uploading: BTreeSet<SiteId>,
    /// What each sender declared with its masked input.
    inputs: BTreeMap<SiteId, (PrivacyUsed, Digest)>,
}

/// A closed round whose checkpoint the shell is writing: what a failure would report.
#[derive(Debug)]
struct Committing {
    round: RoundId,
    attempt: u32,
    declined: Vec<(SiteId, DeclineReason)>,
    rejected: Vec<(SiteId, Reject)>,
    missed: Vec<SiteId>,
}

#[derive(Debug)]
enum Phase {
    Waiting,
    Collecting(Box<Collecting>),
    Checkpointing(Box<Committing>),
    Done { stopped: Option<String> },
}

/// What the coordinator has accepted from one site: the releases its ledger holds, so a
/// site cannot declare less spent than that (a lost or reset site ledger starts over at
/// zero; the coordinator's count does not).
#[derive(Clone, Debug, Default)]
struct SiteSpend {
    accountant: Accountant,
    /// Updates already counted: a redone round's resent update is not counted twice.
    counted: BTreeSet<(RoundId, Digest)>,
}

impl SiteSpend {
    fn count(&mut self, round: RoundId, digest: Digest, release: &Release) -> Result<(), fedward_shared::dp::DpError> {
        if self.counted.insert((round, digest)) {
            self.accountant.record(release)?;
        }
        Ok(())
    }
}

/// The coordinator's federation logic.
#[derive(Debug)]
pub struct RoundMachine {
    settings: Settings,
    /// The L2 bound on every update: configured, or derived from the privacy plan.
    update_bound: f64,
    completed: u64,
    manifest: Vec<TensorSpec>,
    digest: Digest,
    ready: BTreeSet<SiteId>,
    phase: Phase,
    failed_attempts: u32,
    outputs: VecDeque<Output>,
    spent: BTreeMap<SiteId, SiteSpend>,
    /// An admin paused the federation: no round starts by itself (the open one finishes).
    paused: bool,
    /// Model selection: the scores of each global model (by the round that made it).
    scores: BTreeMap<u64, ScoreRecord>,
}

/// Why an admin's "next round now" was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartRefused {
    #[error("the federation is over")]
    Over,
    #[error("round {0} is still open")]
    RoundOpen(RoundId),
    #[error("only {ready} sites are waiting and a round needs {needed}")]
    TooFewSites { ready: usize, needed: usize },
}

/// Settings that do not fit the global model.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("trainable tensor {0} is not in the global model")]
    UnknownTrainable(String),
    #[error("the plan trains no tensor")]
    NothingTrains,
    #[error("no bound on the update norm: privacy mode off needs aggregation.max_update_norm")]
    NoUpdateBound,
    #[error("the ledger's accepted updates cannot be accounted: {0}")]
    Ledger(String),
    #[error("secure aggregation: {0}")]
    Secure(SecAggError),
}

/// The L2 bound every update is held to: `configured`, else what the privacy plan implies
/// for an honest update of `trainable_values` values. Record-level: the update clip norm
/// (DP-SGD's noise is inside the steps, and the finished update is clipped). Site-level:
/// the clip norm `C` plus what the noise `N(0, (sigma C)^2 I_d)` can add,
/// `sigma C (sqrt(d) + 10)`, which a Gaussian vector's norm exceeds with probability below
/// `exp(-50)`. Distributed: the same (one site's share has std `sigma C / sqrt(min_honest)` at most
/// `sigma C`, so a noised update stays within it, and so does the mean of several), which
/// also sizes the secure sum so that noised updates cannot wrap.
pub fn update_bound(configured: Option<f64>, privacy: &PrivacyPlan, trainable_values: usize) -> Option<f64> {
    configured.or(match *privacy {
        PrivacyPlan::Off => None,
        PrivacyPlan::RecordLevel { update_clip_norm, .. } => Some(update_clip_norm),
        PrivacyPlan::SiteLevel { noise_multiplier, clip_norm } | PrivacyPlan::Distributed { noise_multiplier, clip_norm, .. } => {
            Some(clip_norm * (1.0 + noise_multiplier * ((trainable_values as f64).sqrt() + 10.0)))
        }
    })
}

impl RoundMachine {
    /// Starts (or resumes, after `completed` rounds) with the model of `manifest` as the
    /// current one.
    pub fn new(settings: Settings, manifest: Vec<TensorSpec>, completed: u64) -> Result<Self, SettingsError> {
        if settings.plan.trainable_tensors.is_empty() {
            return Err(SettingsError::NothingTrains);
        }
        if let Some(t) = settings.plan.trainable_tensors.iter().find(|t| !manifest.iter().any(|s| &s.name == *t)) {
            return Err(SettingsError::UnknownTrainable(t.clone()));
        }
        let trainable_values = manifest
            .iter()
            .filter(|s| settings.plan.trainable_tensors.contains(&s.name))
            .map(|s| fedward_shared::tensor::element_count(&s.shape))
            .sum();
        let update_bound = update_bound(settings.aggregation.max_update_norm, &settings.plan.privacy, trainable_values)
            .ok_or(SettingsError::NoUpdateBound)?;
        if let Some(secure) = &settings.secure {
            // Everything a round's setup needs, checked once here.
            let vector_len = FixedPoint::encoded_len(trainable_values);
            RoundSetup::new(RoundId(1), secure.params, vector_len).map_err(SettingsError::Secure)?;
            fixed_point(&settings, update_bound).map_err(SettingsError::Secure)?;
            if vector_len.saturating_mul(8) > settings.max_update_bytes.saturating_mul(2) {
                return Err(SettingsError::Secure(SecAggError::Params(format!(
                    "a masked input of {vector_len} values exceeds twice the update size limit"
                ))));
            }
        }
        let digest = manifest_digest(&manifest);
        let phase = if completed >= settings.planned_rounds() { Phase::Done { stopped: None } } else { Phase::Waiting };
        Ok(Self {
            settings,
            update_bound,
            completed,
            manifest,
            digest,
            ready: BTreeSet::new(),
            phase,
            failed_attempts: 0,
            outputs: VecDeque::new(),
            spent: BTreeMap::new(),
            paused: false,
            scores: BTreeMap::new(),
        })
    }

    /// Rounds the federation runs (see [`Settings::planned_rounds`]).
    pub fn planned_rounds(&self) -> u64 {
        self.settings.planned_rounds()
    }

    fn is_scoring_round(&self, round: RoundId) -> bool {
        self.settings.is_scoring_round(round)
    }

    /// The scores recorded before a restart (from the saved history).
    pub fn with_scores(mut self, scores: impl IntoIterator<Item = ScoreRecord>) -> Self {
        self.scores.extend(scores.into_iter().map(|r| (r.model_round, r)));
        self
    }

    /// The model selection would pick now, among the candidates up to model `last`: the
    /// best example-weighted accuracy among the last `candidates` models that were scored
    /// (the latest on a tie), else `last`.
    pub fn best_model(&self, last: u64) -> u64 {
        let Some(sel) = self.settings.selection else { return last };
        let first = last.saturating_sub(sel.candidates.saturating_sub(1));
        let mut best: Option<(u64, f64)> = None;
        for (&round, tally) in self.scores.range(first..=last) {
            if let Some(acc) = tally.accuracy() {
                if best.is_none_or(|(_, b)| acc >= b) {
                    best = Some((round, acc));
                }
            }
        }
        best.map_or(last, |(r, _)| r)
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses or resumes the federation. Paused, no round starts by itself; the round
    /// open now goes on to its end, and sites keep waiting connected. Resuming starts a
    /// round at once when enough sites wait.
    pub fn set_paused(&mut self, now: Instant, paused: bool) {
        self.paused = paused;
        if !paused {
            self.maybe_start(now);
        }
    }

    /// Starts the next round now with the sites waiting, paused or not (a paused
    /// federation stays paused after it: one step). A round still needs `min_sites`: this
    /// is about when, never about how few.
    pub fn start_now(&mut self, now: Instant) -> Result<RoundId, StartRefused> {
        match &self.phase {
            Phase::Done { .. } => return Err(StartRefused::Over),
            Phase::Collecting(c) => return Err(StartRefused::RoundOpen(c.round)),
            Phase::Checkpointing(c) => return Err(StartRefused::RoundOpen(c.round)),
            Phase::Waiting => {}
        }
        if self.ready.len() < self.settings.min_sites {
            return Err(StartRefused::TooFewSites { ready: self.ready.len(), needed: self.settings.min_sites });
        }
        self.start(now);
        Ok(RoundId(self.completed + 1))
    }

    pub fn completed_rounds(&self) -> u64 {
        self.completed
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The L2 bound every update is held to.
    pub fn update_bound(&self) -> f64 {
        self.update_bound
    }

    /// What the coordinator's ledger says it accepted before (site, round, update digest,
    /// the release it declared): each site's declared spend is held to at least that.
    pub fn with_accepted(mut self, accepted: impl IntoIterator<Item = (SiteId, RoundId, Digest, Release)>) -> Result<Self, SettingsError> {
        for (site, round, digest, release) in accepted {
            self.spent.entry(site).or_default().count(round, digest, &release).map_err(|e| SettingsError::Ledger(e.to_string()))?;
        }
        Ok(self)
    }

    /// The updates accepted from `site` (this run's and those its ledger held at start).
    pub fn accepted_from(&self, site: &SiteId) -> Vec<AcceptedUpdate> {
        self.spent
            .get(site)
            .map_or_else(Vec::new, |s| s.counted.iter().map(|&(round, update_digest)| AcceptedUpdate { round, update_digest }).collect())
    }

    /// The current global model's manifest.
    pub fn manifest(&self) -> &[TensorSpec] {
        &self.manifest
    }

    pub fn model_digest(&self) -> Digest {
        self.digest
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    /// The round currently collecting updates, if any.
    pub fn open_round(&self) -> Option<RoundId> {
        match &self.phase {
            Phase::Collecting(c) => Some(c.round),
            _ => None,
        }
    }

    pub fn phase(&self) -> PhaseView {
        match &self.phase {
            Phase::Waiting => PhaseView::WaitingForQuorum { ready: self.ready.len(), needed: self.settings.min_sites },
            Phase::Collecting(c) => PhaseView::Collecting {
                round: c.round,
                offered: c.offered.len(),
                accepted: c.contributions.len(),
                answered: c.status.values().filter(|s| !matches!(s, SiteStatus::Uploading | SiteStatus::Folding)).count(),
            },
            Phase::Checkpointing(c) => PhaseView::Checkpointing { round: c.round },
            Phase::Done { stopped: None } => PhaseView::Finished,
            Phase::Done { stopped: Some(reason) } => PhaseView::Stopped { reason: reason.clone() },
        }
    }

    /// The next output for the shell, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Collecting(c) if !c.closing => Some(c.secure.as_ref().map_or(c.deadline, |s| s.step_deadline)),
            _ => None,
        }
    }

    /// A site is connected and waiting for its next offer.
    pub fn handle_ready(&mut self, now: Instant, site: SiteId) {
        match &mut self.phase {
            Phase::Done { .. } => {
                let finished = self.finished();
                self.outputs.push_back(Output::Finished { to: site, finished });
                return;
            }
            Phase::Collecting(c)
                if now < c.deadline
                    && matches!(c.status.get(&site), None | Some(SiteStatus::Gone))
                    // A secure round takes new sites only while it collects keys.
                    && c.secure.as_ref().is_none_or(|s| {
                        s.step == Step::Keys && !s.sent.contains(&site)
                    }) =>
            {
                // A late joiner, or a site whose connection dropped before it answered, still
                // has time for this round: a reconnected site resends the update it already
                // released instead of training and spending again next round.
                c.status.remove(&site);
                c.offered.insert(site.clone());
                if let Some(s) = &mut c.secure {
                    s.expected.insert(site.clone());
                }
                let secure = c.secure.as_ref().map(|s| s.offer.clone());
                let offer = offer(&self.settings, c.round, &self.manifest, self.digest, c.deadline - now, secure);
                self.outputs.push_back(Output::Offer { to: site, offer });
                return;
            }
            _ => {}
        }
        self.ready.insert(site);
        self.maybe_start(now);
    }

    /// A site's connection is gone.
    pub fn handle_disconnected(&mut self, now: Instant, site: &SiteId) {
        self.ready.remove(site);
        if let Phase::Collecting(c) = &mut self.phase {
            if let Some(s) = &mut c.secure {
                if c.offered.contains(site) && !matches!(c.status.get(site), Some(SiteStatus::Declined | SiteStatus::Rejected)) {
                    c.status.insert(site.clone(), SiteStatus::Gone);
                    s.expected.remove(site);
                    s.uploading.remove(site);
                    self.maybe_advance(now);
                }
                return;
            }
            let open = c.offered.contains(site) && matches!(c.status.get(site), None | Some(SiteStatus::Uploading));
            if open {
                c.status.insert(site.clone(), SiteStatus::Gone);
                self.maybe_close(now);
            }
        }
    }

    /// Checks an update's header before its bytes are received; on success the site's
    /// slot is reserved until [`finish_update`](Self::finish_update) or
    /// [`abort_update`](Self::abort_update).
    pub fn begin_update(&mut self, site: &SiteId, header: &UpdateHeader) -> Result<(), Reject> {
        let c = self.collecting_for(site, header.round)?;
        if c.secure.is_some() {
            return Err(Reject::new(
                RejectCode::PolicyViolation,
                format!("round {} is summed under secure aggregation: no update is taken in the clear", header.round),
            ));
        }
        match c.status.get(site) {
            None => {}
            Some(SiteStatus::Uploading) => {
                return Err(Reject::new(RejectCode::DuplicateUpdate, "an update from this site is already arriving"))
            }
            Some(_) => return Err(Reject::new(RejectCode::DuplicateUpdate, format!("this site already answered round {}", header.round))),
        }
        check_header(&self.settings, &self.manifest, header, self.is_scoring_round(header.round))?;
        check_declared_spend(self.spent.get(site), header.round, manifest_digest(&header.tensors), &header.privacy)?;
        if let Phase::Collecting(c) = &mut self.phase {
            c.status.insert(site.clone(), SiteStatus::Uploading);
        }
        Ok(())
    }

    /// The transfer broke off before the update was complete: the site may try again.
    pub fn abort_update(&mut self, site: &SiteId) {
        if let Phase::Collecting(c) = &mut self.phase {
            if c.status.get(site) == Some(&SiteStatus::Uploading) {
                c.status.remove(site);
            }
        }
    }

    /// The update's bytes arrived but were refused (e.g. a digest mismatch).
    pub fn reject_update(&mut self, now: Instant, site: &SiteId, reject: Reject) {
        if let Phase::Collecting(c) = &mut self.phase {
            if c.status.get(site) == Some(&SiteStatus::Uploading) {
                c.status.insert(site.clone(), SiteStatus::Rejected);
                c.rejected.push((site.clone(), reject));
                self.maybe_close(now);
            }
        }
    }

    /// The update's bytes arrived with matching digests: bound it, check it and take it,
    /// here and now ([`start_fold`](Self::start_fold), the job run, then
    /// [`handle_folded`](Self::handle_folded)).
    pub fn finish_update(&mut self, now: Instant, site: &SiteId, header: &UpdateHeader, tensors: TensorSet) -> Result<Ack, Reject> {
        let job = self.start_fold(site, header, tensors)?;
        let result = job.run();
        self.handle_folded(now, site, header, result)
    }

    /// The update's bytes arrived with matching digests: the job that checks it (names,
    /// shapes, finiteness, norm), bounds it and folds it, for the shell to run off its
    /// event loop and report with [`handle_folded`](Self::handle_folded). The round does
    /// not close while a job is out, not even at its deadline.
    ///
    /// The bound is the coordinator's own ([`update_bound`](Self::update_bound)), never
    /// one the site declares; the weight is the site's claim clamped to the consortium's
    /// `max_examples_per_site` (or 1 under equal weighting).
    pub fn start_fold(&mut self, site: &SiteId, header: &UpdateHeader, tensors: TensorSet) -> Result<FoldJob, Reject> {
        let weight = self.weight_of(header);
        let scoring_only = self.is_scoring_round(header.round);
        let c = match &mut self.phase {
            Phase::Collecting(c) if c.round == header.round && !c.closing && c.status.get(site) == Some(&SiteStatus::Uploading) => c,
            _ => return Err(Reject::new(RejectCode::StaleRound, format!("round {} closed while the update was arriving", header.round))),
        };
        c.status.insert(site.clone(), SiteStatus::Folding);
        if scoring_only {
            return Ok(FoldJob::score_only(c.agg.clone(), c.layout.clone()));
        }
        Ok(FoldJob::new(c.agg.clone(), c.layout.clone(), weight, self.update_bound, self.settings.aggregation.over_norm, tensors))
    }

    /// What came of a [`FoldJob`]: the update taken (the site's `Ack`, once the shell has
    /// recorded [`Output::Accepted`]) or refused (nothing of it was taken).
    pub fn handle_folded(
        &mut self,
        now: Instant,
        site: &SiteId,
        header: &UpdateHeader,
        result: Result<Folded, Reject>,
    ) -> Result<Ack, Reject> {
        let weight = self.weight_of(header);
        let c = match &mut self.phase {
            Phase::Collecting(c) if c.round == header.round && c.status.get(site) == Some(&SiteStatus::Folding) => c,
            _ => return Err(Reject::new(RejectCode::StaleRound, format!("round {} closed while the update was arriving", header.round))),
        };
        match result {
            Ok(Folded { update_norm, scale }) => {
                c.status.insert(site.clone(), SiteStatus::Accepted);
                let contribution = Contribution {
                    site: site.clone(),
                    num_examples: header.num_examples,
                    weight,
                    update_norm,
                    scale,
                    metrics: header.metrics.clone().filter(all_finite),
                    score: header.score,
                    privacy: header.privacy,
                    update_digest: manifest_digest(&header.tensors),
                };
                c.contributions.push(contribution.clone());
                if contribution.privacy.mode != PrivacyMode::Off {
                    // Checked against this same accountant at admission, so it records.
                    let _ = self.spent.entry(site.clone()).or_default().count(
                        header.round,
                        contribution.update_digest,
                        &header.privacy.release(),
                    );
                }
                self.outputs.push_back(Output::Accepted { round: header.round, contribution });
                let ack = Ack { round: header.round };
                self.maybe_close(now);
                Ok(ack)
            }
            Err(reject) => {
                c.status.insert(site.clone(), SiteStatus::Rejected);
                c.rejected.push((site.clone(), reject.clone()));
                self.maybe_close(now);
                Err(reject)
            }
        }
    }

    fn weight_of(&self, header: &UpdateHeader) -> u64 {
        let aggregation = &self.settings.aggregation;
        match aggregation.weighting {
            Weighting::Examples => header.num_examples.min(aggregation.max_examples_per_site),
            Weighting::Equal => 1,
        }
    }

    /// A site declines the round.
    pub fn handle_decline(&mut self, now: Instant, site: &SiteId, decline: &Decline) -> Result<Ack, Reject> {
        let c = self.collecting_for(site, decline.round)?;
        if c.status.contains_key(site) {
            return Err(Reject::new(RejectCode::DuplicateUpdate, "this site already answered the round"));
        }
        if let Phase::Collecting(c) = &mut self.phase {
            c.status.insert(site.clone(), SiteStatus::Declined);
            c.declined.push((site.clone(), decline.reason));
            if let Some(s) = &mut c.secure {
                // Whatever step it reached: a site that shared keys is now a dropout.
                s.expected.remove(site);
                s.uploading.remove(site);
            }
        }
        self.maybe_close(now);
        Ok(Ack { round: decline.round })
    }

    /// Time has passed; closes the round at its deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Collecting(c) = &mut self.phase {
            if let Some(s) = &c.secure {
                if now >= s.step_deadline {
                    self.close_step(now);
                }
                return;
            }
            if now >= c.deadline {
                if c.status.values().any(|s| *s == SiteStatus::Folding) {
                    // Folds are quick and bounded by the upload slots: wait for them.
                    c.closing = true;
                } else {
                    self.close(now);
                }
            }
        }
    }

    fn collecting_for(&self, site: &SiteId, round: RoundId) -> Result<&Collecting, Reject> {
        match &self.phase {
            Phase::Collecting(c) if c.round == round && c.closing => {
                Err(Reject::new(RejectCode::StaleRound, format!("round {round} is closing: its deadline passed")))
            }
            Phase::Collecting(c) if c.round == round => {
                if c.offered.contains(site) {
                    Ok(c)
                } else {
                    Err(Reject::new(RejectCode::NotOffered, format!("round {round} was not offered to this site")))
                }
            }
            Phase::Collecting(c) => {
                Err(Reject::new(RejectCode::StaleRound, format!("update for round {round}, but round {} is open", c.round)))
            }
            _ => Err(Reject::new(RejectCode::StaleRound, format!("round {round} is not open"))),
        }
    }

    fn maybe_start(&mut self, now: Instant) {
        if !self.paused && matches!(self.phase, Phase::Waiting) && self.ready.len() >= self.settings.min_sites {
            self.start(now);
        }
    }

    fn start(&mut self, now: Instant) {
        let round = RoundId(self.completed + 1);
        let trainable = &self.settings.plan.trainable_tensors;
        let layout =
            Layout::new(self.manifest.iter().filter(|s| trainable.contains(&s.name)).map(|s| (s.name.as_str(), s.shape.as_slice())));
        let agg = Arc::new(Mutex::new(Aggregator::with_layout(self.settings.aggregation.method, layout.clone())));
        let offered = std::mem::take(&mut self.ready);
        let secure = match self.secure_round(now, round, &offered) {
            Ok(s) => s,
            Err(e) => {
                // Checked in `new`; should it happen, the round fails like any other.
                self.fail_round(now, round, format!("secure aggregation: {e}"), Vec::new(), Vec::new(), offered.into_iter().collect());
                return;
            }
        };
        for site in &offered {
            let offer = offer(
                &self.settings,
                round,
                &self.manifest,
                self.digest,
                self.settings.round_deadline,
                secure.as_ref().map(|s| s.offer.clone()),
            );
            self.outputs.push_back(Output::Offer { to: site.clone(), offer });
        }
        self.phase = Phase::Collecting(Box::new(Collecting {
            round,
            started: now,
            deadline: now + self.settings.round_deadline,
            offered,
            status: BTreeMap::new(),
            agg,
            layout,
            closing: false,
            contributions: Vec::new(),
            declined: Vec::new(),
            rejected: Vec::new(),
            secure,
        }));
    }

    fn maybe_close(&mut self, now: Instant) {
        if matches!(&self.phase, Phase::Collecting(c) if c.secure.is_some()) {
            self.maybe_advance(now);
            return;
        }
        let all_answered = match &self.phase {
            Phase::Collecting(c) if c.closing => !c.status.values().any(|s| *s == SiteStatus::Folding),
            Phase::Collecting(c) => {
                c.offered.iter().all(|s| matches!(c.status.get(s), Some(st) if !matches!(st, SiteStatus::Uploading | SiteStatus::Folding)))
            }
            _ => false,
        };
        if all_answered {
            self.close(now);
        }
    }

    fn close(&mut self, now: Instant) {
        let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Waiting) else { return };
        let c = *c;
        let missed: Vec<SiteId> = c
            .offered
            .iter()
            .filter(|s| matches!(c.status.get(*s), None | Some(SiteStatus::Uploading | SiteStatus::Gone)))
            .cloned()
            .collect();
        let attempt = self.failed_attempts + 1;
        let n_accepted = c.contributions.len();
        if n_accepted < self.settings.min_sites {
            self.failed_attempts += 1;
            let gave_up = self.failed_attempts >= self.settings.max_attempts;
            let reason = format!(
                "only {n_accepted} of the {} sites needed sent a valid update ({} declined, {} rejected, {} missed the deadline or left)",
                self.settings.min_sites,
                c.declined.len(),
                c.rejected.len(),
                missed.len()
            );
            if gave_up {
                self.phase = Phase::Done { stopped: Some(format!("round {} failed {} times: {reason}", c.round, self.failed_attempts)) };
            }
            self.outputs.push_back(Output::RoundFailed(RoundFailure {
                round: c.round,
                attempt,
                reason,
                rejected: c.rejected,
                declined: c.declined,
                missed,
                gave_up,
            }));
            self.after_round(now);
            return;
        }
        let shared: Vec<(f64, f64)> =
            c.contributions.iter().filter_map(|k| k.metrics.as_ref().map(|m| (m.train_loss, k.weight as f64))).collect();
        let shared_weight: f64 = shared.iter().map(|(_, w)| w).sum();
        let mean_train_loss = (shared_weight > 0.0).then(|| shared.iter().map(|(l, w)| l * w).sum::<f64>() / shared_weight);
        let scored = self.tally_scores(c.round, &c.contributions);
        // At least `min_sites` >= 1 updates were added, so the combined update exists
        // (unless this is the scoring round, which combines none). No fold is out (the
        // round waits for them), so the sums are whole; a late job finds the aggregation
        // closed.
        let agg = c.agg.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (update, selected) = if self.is_scoring_round(c.round) {
            (TensorSet::default(), Some(self.best_model(self.completed)))
        } else {
            let Some(update) = agg.finish() else { unreachable!("accepted updates were added") };
            (update, None)
        };
        let mut contributions = c.contributions;
        contributions.sort_by(|a, b| a.site.cmp(&b.site));
        let summary = RoundSummary {
            round: c.round,
            attempt,
            contributions,
            declined: c.declined,
            rejected: c.rejected,
            missed,
            mean_train_loss,
            duration: now.saturating_duration_since(c.started),
            scored,
            selected,
        };
        self.begin_checkpoint(update, summary, None);
    }

    /// Records the scores a completed round's sites sent of the model it offered (that of
    /// the round before); a retried round's scores replace an earlier attempt's. Each
    /// site's count is clamped to `[0, examples]` (noise can push it out; a lying site
    /// cannot claim more than all right), and its examples to `max_examples_per_site`.
    fn tally_scores(&mut self, round: RoundId, contributions: &[Contribution]) -> Option<ScoreRecord> {
        let cap = self.settings.aggregation.max_examples_per_site;
        let mut tally = ScoreRecord { model_round: round.0 - 1, correct: 0.0, examples: 0, sites: 0 };
        for score in contributions.iter().filter_map(|c| c.score) {
            let examples = score.examples.min(cap);
            tally.correct += score.correct.clamp(0.0, examples as f64);
            tally.examples += examples;
            tally.sites += 1;
        }
        if tally.sites == 0 {
            return None;
        }
        self.scores.insert(tally.model_round, tally);
        Some(tally)
    }

    /// Closes a round that produced `update`: the machine waits for the shell to write
    /// the checkpoint (`handle_checkpointed`), which it asks for with `Output::Checkpoint`.
    /// FedAvg and secure rounds end here alike.
    fn begin_checkpoint(&mut self, update: TensorSet, summary: RoundSummary, secure: Option<SecureOutcome>) {
        self.phase = Phase::Checkpointing(Box::new(Committing {
            round: summary.round,
            attempt: summary.attempt,
            declined: summary.declined.clone(),
            rejected: summary.rejected.clone(),
            missed: summary.missed.clone(),
        }));
        let select = summary.selected;
        self.outputs.push_back(Output::Checkpoint(Box::new(Checkpoint {
            completed_rounds: self.completed + 1,
            update,
            secure,
            summary,
            select,
        })));
    }

    /// The shell wrote the round's checkpoint (`Ok`, with the new model's manifest) or
    /// could not use it (`Err`: the new model holds non-finite values, say). Either way the
    /// federation moves on: to the next round, or to a retry of this one.
    pub fn handle_checkpointed(&mut self, now: Instant, result: Result<Vec<TensorSpec>, String>) {
        let Phase::Checkpointing(c) = std::mem::replace(&mut self.phase, Phase::Waiting) else { return };
        match result {
            Ok(manifest) => {
                self.digest = manifest_digest(&manifest);
                self.manifest = manifest;
                self.completed += 1;
                self.failed_attempts = 0;
                if self.completed >= self.planned_rounds() {
                    self.phase = Phase::Done { stopped: None };
                }
            }
            Err(reason) => {
                self.failed_attempts += 1;
                let gave_up = self.failed_attempts >= self.settings.max_attempts;
                if gave_up {
                    self.phase =
                        Phase::Done { stopped: Some(format!("round {} failed {} times: {reason}", c.round, self.failed_attempts)) };
                }
                self.outputs.push_back(Output::RoundFailed(RoundFailure {
                    round: c.round,
                    attempt: c.attempt,
                    reason,
                    rejected: c.rejected,
                    declined: c.declined,
                    missed: c.missed,
                    gave_up,
                }));
            }
        }
        self.after_round(now);
    }

    // ------------------------------------------------------------------------------
    // Secure rounds (see the module docs).

    /// The secure state of a round about to start, `None` for a round in the clear.
    fn secure_round(&self, now: Instant, round: RoundId, offered: &BTreeSet<SiteId>) -> Result<Option<Box<Secure>>, SecAggError> {
        let Some(cfg) = &self.settings.secure else { return Ok(None) };
        let fixed = fixed_point(&self.settings, self.update_bound)?;
        let attempt = self.failed_attempts + 1;
        let clip = self.update_bound as f32;
        let max_weight = max_weight(&self.settings.aggregation);
        let max_sites = max_sites(&self.settings);
        let vector_len = FixedPoint::encoded_len(self.trainable_values());
        let context = SecureRound::context(round, attempt, &self.digest, clip, max_weight, max_sites);
        let setup = RoundSetup::new(round, cfg.params, vector_len)?.with_context(context);
        let server = SecAggServer::new(setup, cfg.trust.clone())?;
        let offer = SecureRound { setup, attempt, clip, max_weight, max_sites, step_deadline_secs: cfg.step_deadline.as_secs().max(1) };
        Ok(Some(Box::new(Secure {
            server: Some(server),
            offer,
            fixed,
            step: Step::Keys,
            step_deadline: now + cfg.step_deadline,
            expected: offered.clone(),
            sent: BTreeSet::new(),
            uploading: BTreeSet::new(),
            inputs: BTreeMap::new(),
        })))
    }

    fn trainable_values(&self) -> usize {
        let trainable = &self.settings.plan.trainable_tensors;
        self.manifest.iter().filter(|s| trainable.contains(&s.name)).map(|s| element_count(&s.shape)).sum()
    }

    /// The open secure round, if `site` may send `step`'s message for `round` now.
    fn secure_for(&mut self, site: &SiteId, round: RoundId, step: Step) -> Result<&mut Collecting, Reject> {
        self.collecting_for(site, round)?;
        let Phase::Collecting(c) = &mut self.phase else {
            return Err(Reject::new(RejectCode::StaleRound, format!("round {round} is not open")));
        };
        let Some(s) = &c.secure else {
            return Err(Reject::new(RejectCode::PolicyViolation, format!("round {round} is not summed under secure aggregation")));
        };
        if s.step != step {
            return Err(Reject::new(RejectCode::SecureAggregation, format!("the {step} step is not open: round {round} is at {}", s.step)));
        }
        if s.sent.contains(site) || s.uploading.contains(site) {
            return Err(Reject::new(RejectCode::DuplicateUpdate, format!("this site already sent its {step} message")));
        }
        if !s.expected.contains(site) {
            return Err(Reject::new(RejectCode::SecureAggregation, format!("this site takes no part in the {step} step of round {round}")));
        }
        Ok(c)
    }

    /// Secure round, step 1: `site`'s signed keys, checked at the wall-clock time `wall`
    /// as every site will check them. A site whose keys are refused is left out of the
    /// round; the round goes on without it. The site's stream waits for the step's
    /// [`Output::SecAggReply`].
    pub fn handle_secagg_keys(&mut self, now: Instant, wall: UnixTime, site: &SiteId, keys: SignedKeys) -> Result<(), Reject> {
        let c = self.secure_for(site, keys.round, Step::Keys)?;
        let result = match c.secure.as_mut().and_then(|s| s.server.as_mut()) {
            Some(server) => server.handle_keys(site, keys, wall),
            None => Err(SecAggError::Aborted),
        };
        self.secure_taken(now, site, result)
    }

    /// Secure round, step 2: `site`'s encrypted shares (one per neighbour).
    pub fn handle_secagg_shares(&mut self, now: Instant, site: &SiteId, shares: EncryptedShares) -> Result<(), Reject> {
        let c = self.secure_for(site, shares.round, Step::Shares)?;
        let result = match c.secure.as_mut().and_then(|s| s.server.as_mut()) {
            Some(server) => server.handle_shares(site, shares),
            None => Err(SecAggError::Aborted),
        };
        self.secure_taken(now, site, result)
    }

    /// What came of a site's message: taken (its stream waits for the step's close) or
    /// refused (the site is left out of the round).
    fn secure_taken(&mut self, now: Instant, site: &SiteId, result: Result<(), SecAggError>) -> Result<(), Reject> {
        let Phase::Collecting(c) = &mut self.phase else { return Err(Reject::new(RejectCode::StaleRound, "the round closed")) };
        match result {
            Ok(()) => {
                if let Some(s) = &mut c.secure {
                    s.sent.insert(site.clone());
                }
                self.maybe_advance(now);
                Ok(())
            }
            Err(e) => {
                let reject = Reject::new(RejectCode::SecureAggregation, e.to_string());
                leave_out(c, site, reject.clone());
                self.maybe_advance(now);
                Err(reject)
            }
        }
    }

    /// Secure round, step 3: checks a masked input's header before its bytes arrive (the
    /// step, the declared size against the round's vector, the privacy policy, the
    /// declared spend) and returns how many bytes follow. The site's slot is held until
    /// [`finish_masked`](Self::finish_masked) or [`abort_masked`](Self::abort_masked).
    pub fn begin_masked(&mut self, site: &SiteId, header: &MaskedInputHeader) -> Result<usize, Reject> {
        check_policy(&self.settings.policy, &header.privacy)?;
        check_declared_spend(self.spent.get(site), header.round, header.digest, &header.privacy)?;
        let max_bytes = self.settings.max_update_bytes.saturating_mul(2);
        let plan = self.settings.plan.privacy;
        let c = self.secure_for(site, header.round, Step::MaskedInput)?;
        let Some(s) = &mut c.secure else { return Err(Reject::new(RejectCode::StaleRound, "the round closed")) };
        // Distributed DP: the share a site declares is the one the offer implies, or the
        // epsilon it and the ledgers record is not the round's.
        let expected = s.offer.distributed_release(&plan).map_err(|e| Reject::new(RejectCode::PolicyViolation, e.to_string()))?;
        if header.privacy.distributed != expected {
            return Err(Reject::new(
                RejectCode::PolicyViolation,
                "the declared distributed noise share is not the one this round's offer implies",
            ));
        }
        let width = fedward_shared::wire::masked_value_width(s.offer.setup.params.modulus_bits);
        let bytes = header
            .payload_bytes(s.offer.setup.vector_len, width, max_bytes)
            .map_err(|e| Reject::new(RejectCode::TooLarge, e.to_string()))?;
        s.uploading.insert(site.clone());
        Ok(bytes)
    }

    /// The masked input's transfer broke off: the site may send it again before the step
    /// closes.
    pub fn abort_masked(&mut self, now: Instant, site: &SiteId) {
        if let Phase::Collecting(c) = &mut self.phase {
            if let Some(s) = &mut c.secure {
                s.uploading.remove(site);
            }
        }
        self.maybe_advance(now);
    }

    /// The masked input's values arrived (their digest checked by the shell): into the
    /// round's [`SecAggServer`]. Emits [`Output::Accepted`], for the ledger, before the
    /// step's replies. The site's stream then waits for the unmasking request.
    pub fn finish_masked(&mut self, now: Instant, site: &SiteId, header: &MaskedInputHeader, values: Vec<u64>) -> Result<(), Reject> {
        let stale = || {
            Reject::new(
                RejectCode::StaleRound,
                format!("the masked input step of round {} closed while the input was arriving", header.round),
            )
        };
        let c = match &mut self.phase {
            Phase::Collecting(c) if c.round == header.round => c,
            _ => return Err(stale()),
        };
        let Some(s) = c.secure.as_mut().filter(|s| s.step == Step::MaskedInput && s.uploading.contains(site)) else { return Err(stale()) };
        s.uploading.remove(site);
        let input = MaskedInput { round: header.round, from: site.clone(), values };
        let result = match s.server.as_mut() {
            Some(server) => server.handle_masked_input(site, input),
            None => Err(SecAggError::Aborted),
        };
        if let Err(e) = result {
            let reject = Reject::new(RejectCode::SecureAggregation, e.to_string());
            leave_out(c, site, reject.clone());
            self.maybe_advance(now);
            return Err(reject);
        }
        s.sent.insert(site.clone());
        s.inputs.insert(site.clone(), (header.privacy, header.digest));
        let contribution = secure_contribution(site, &header.privacy, header.digest);
        if header.privacy.mode != PrivacyMode::Off {
            // Checked against this same accountant in `begin_masked`, so it records.
            let _ = self.spent.entry(site.clone()).or_default().count(header.round, header.digest, &header.privacy.release());
        }
        self.outputs.push_back(Output::Accepted { round: header.round, contribution });
        self.maybe_advance(now);
        Ok(())
    }

    /// Secure round, step 4: `site`'s revealed shares, answered at once.
    pub fn handle_secagg_unmasking(&mut self, now: Instant, site: &SiteId, msg: UnmaskingShares) -> Result<Ack, Reject> {
        let round = msg.round;
        let c = self.secure_for(site, round, Step::Unmasking)?;
        let result = match c.secure.as_mut().and_then(|s| s.server.as_mut()) {
            Some(server) => server.handle_unmasking(site, msg),
            None => Err(SecAggError::Aborted),
        };
        self.secure_taken(now, site, result).map(|()| Ack { round })
    }

    /// Closes the secure step once every site that may still send has sent.
    fn maybe_advance(&mut self, now: Instant) {
        let done = matches!(&self.phase, Phase::Collecting(c) if c.secure.as_ref().is_some_and(|s| {
            s.uploading.is_empty() && s.expected.iter().all(|x| s.sent.contains(x))
        }));
        if done {
            self.close_step(now);
        }
    }

    /// Ends the secure step (all sent, or its deadline): the replies every sender waits
    /// for and the next step, or the round's failure.
    fn close_step(&mut self, now: Instant) {
        let step_deadline = self.settings.secure.as_ref().map_or(Duration::ZERO, |x| x.step_deadline);
        let min_honest = match self.settings.plan.privacy {
            PrivacyPlan::Distributed { min_honest, .. } => min_honest,
            _ => 0,
        };
        let Phase::Collecting(c) = &mut self.phase else { return };
        let round = c.round;
        let Some(s) = c.secure.as_mut() else { return };
        if s.step == Step::Unmasking {
            self.finish_secure(now);
            return;
        }
        // Distributed DP counts the noise of `min_honest` summed sites: fewer masked inputs
        // are not unmasked at all (the configuration keeps the threshold above it, so only
        // a bug gets here; `finish_secure` checks the survivors again).
        if s.step == Step::MaskedInput && (s.sent.len() as u64) < min_honest {
            let reason = format!("distributed DP: {} masked inputs, fewer than min_honest {min_honest}", s.sent.len());
            let reject = Message::Reject(Reject::new(RejectCode::SecureAggregation, format!("round {round} failed: {reason}")));
            for to in &s.sent {
                self.outputs.push_back(Output::SecAggReply { to: to.clone(), round, msg: Box::new(reject.clone()) });
            }
            return self.fail_open_round(now, reason);
        }
        let Some(server) = s.server.as_mut() else { return };
        let replies: Result<Vec<(SiteId, Message)>, SecAggError> = match s.step {
            Step::Keys => server.close_keys().map(|keys| {
                let msg = Message::SecAggRelayedKeys(RelayedKeys { round, keys });
                s.sent.iter().map(|to| (to.clone(), msg.clone())).collect()
            }),
            Step::Shares => server.close_shares().map(|m| m.into_iter().map(|(to, r)| (to, Message::SecAggRelayedShares(r))).collect()),
            Step::MaskedInput | Step::Unmasking => {
                server.close_masked_inputs().map(|req| s.sent.iter().map(|to| (to.clone(), Message::SecAggUnmask(req.clone()))).collect())
            }
        };
        match replies {
            Ok(replies) => {
                // The next step's participants: this step's senders still in the round.
                let status = &c.status;
                s.expected = s.sent.iter().filter(|x| status.get(*x).is_none()).cloned().collect();
                s.sent.clear();
                s.uploading.clear();
                s.step = match s.step {
                    Step::Keys => Step::Shares,
                    Step::Shares => Step::MaskedInput,
                    Step::MaskedInput | Step::Unmasking => Step::Unmasking,
                };
                // Sites train between the shares and their masked input: that step runs
                // to the round's deadline.
                s.step_deadline = if s.step == Step::MaskedInput { c.deadline.max(now + step_deadline) } else { now + step_deadline };
                for (to, msg) in replies {
                    self.outputs.push_back(Output::SecAggReply { to, round, msg: Box::new(msg) });
                }
                // Every site may have left meanwhile: the next step closes at once.
                self.maybe_advance(now);
            }
            Err(e) => {
                let reject = Message::Reject(Reject::new(RejectCode::SecureAggregation, format!("round {round} failed: {e}")));
                for to in &s.sent {
                    self.outputs.push_back(Output::SecAggReply { to: to.clone(), round, msg: Box::new(reject.clone()) });
                }
                self.fail_open_round(now, format!("secure aggregation: {e}"));
            }
        }
    }

    /// The unmasking step closed: the sum unmasked, decoded and checked, and checkpointed
    /// like a FedAvg round; or the round fails with nothing of the sum revealed.
    fn finish_secure(&mut self, now: Instant) {
        let Phase::Collecting(c) = &mut self.phase else { return };
        let Some(s) = c.secure.as_mut() else { return };
        let Some(server) = s.server.take() else { return };
        let (fixed, clip, max_weight) = (s.fixed, s.offer.clip, s.offer.max_weight);
        let result = server.finish().and_then(|out| fixed.decode_mean(&out.sum).map(|mean| (out, mean)));
        let (out, mean) = match result {
            Ok(x) => x,
            Err(e) => return self.fail_open_round(now, format!("secure aggregation: {e}")),
        };
        if let Err(reason) = check_secure_mean(&mean, &fixed, clip, out.survivors.len(), max_weight) {
            return self.fail_open_round(now, format!("secure aggregation: {reason}"));
        }
        // Distributed DP counts the noise of `min_honest` summed sites; a smaller sum (the
        // configuration keeps the threshold above it, so only a bug gets here) is not
        // released.
        if let PrivacyPlan::Distributed { min_honest, .. } = self.settings.plan.privacy {
            if (out.survivors.len() as u64) < min_honest {
                let n = out.survivors.len();
                return self.fail_open_round(now, format!("distributed DP: {n} sites summed, fewer than min_honest {min_honest}"));
            }
        }
        let mut update = TensorSet::new();
        let mut misfit = None;
        let mut values = mean.values.into_iter();
        let trainable = &self.settings.plan.trainable_tensors;
        for spec in self.manifest.iter().filter(|s| trainable.contains(&s.name)) {
            let data: Vec<f32> = values.by_ref().take(element_count(&spec.shape)).collect();
            match Tensor::new(spec.shape.clone(), data) {
                Ok(t) => {
                    update.insert(spec.name.clone(), t);
                }
                // The vector's length is the trainable values': the server checked each input.
                Err(e) => {
                    misfit = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(e) = misfit {
            return self.fail_open_round(now, format!("secure aggregation: the sum does not fit the model: {e}"));
        }
        let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Waiting) else { return };
        let c = *c;
        let inputs = c.secure.map(|s| s.inputs).unwrap_or_default();
        let contributions: Vec<Contribution> = out
            .survivors
            .iter()
            .filter_map(|site| inputs.get(site).map(|(privacy, digest)| secure_contribution(site, privacy, *digest)))
            .collect();
        let summed: BTreeSet<&SiteId> = out.survivors.iter().collect();
        let missed: Vec<SiteId> = c
            .offered
            .iter()
            .filter(|x| !summed.contains(x) && !matches!(c.status.get(*x), Some(SiteStatus::Declined | SiteStatus::Rejected)))
            .cloned()
            .collect();
        let summary = RoundSummary {
            scored: None,
            selected: None,
            round: c.round,
            attempt: self.failed_attempts + 1,
            contributions,
            declined: c.declined,
            rejected: c.rejected,
            missed,
            mean_train_loss: None,
            duration: now.saturating_duration_since(c.started),
        };
        let outcome = SecureOutcome {
            summed: out.survivors,
            dropped: out.dropped,
            dropped_before_shares: out.dropped_before_shares,
            total_weight: mean.total_weight,
        };
        self.begin_checkpoint(update, summary, Some(outcome));
    }

    /// Fails the open round with `reason` (a retry follows, or the federation stops).
    fn fail_open_round(&mut self, now: Instant, reason: String) {
        let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Waiting) else { return };
        let c = *c;
        let missed: Vec<SiteId> =
            c.offered.iter().filter(|x| !matches!(c.status.get(*x), Some(SiteStatus::Declined | SiteStatus::Rejected))).cloned().collect();
        self.fail_round(now, c.round, reason, c.rejected, c.declined, missed);
    }

    fn fail_round(
        &mut self,
        now: Instant,
        round: RoundId,
        reason: String,
        rejected: Vec<(SiteId, Reject)>,
        declined: Vec<(SiteId, DeclineReason)>,
        missed: Vec<SiteId>,
    ) {
        let attempt = self.failed_attempts + 1;
        self.failed_attempts += 1;
        let gave_up = self.failed_attempts >= self.settings.max_attempts;
        if gave_up {
            self.phase = Phase::Done { stopped: Some(format!("round {round} failed {} times: {reason}", self.failed_attempts)) };
        } else {
            self.phase = Phase::Waiting;
        }
        self.outputs.push_back(Output::RoundFailed(RoundFailure { round, attempt, reason, rejected, declined, missed, gave_up }));
        self.after_round(now);
    }

    fn finished(&self) -> Finished {
        Finished { completed_rounds: self.completed, model_digest: self.digest, manifest: self.manifest.clone() }
    }

    fn after_round(&mut self, now: Instant) {
        if self.is_done() {
            let finished = self.finished();
            for site in std::mem::take(&mut self.ready) {
                self.outputs.push_back(Output::Finished { to: site, finished: finished.clone() });
            }
        } else {
            self.maybe_start(now);
        }
    }
}

fn offer(
    settings: &Settings,
    round: RoundId,
    manifest: &[TensorSpec],
    digest: Digest,
    left: Duration,
    secure: Option<SecureRound>,
) -> RoundOffer {
    RoundOffer {
        round,
        model_digest: digest,
        manifest: manifest.to_vec(),
        plan: settings.plan.clone(),
        policy: settings.policy,
        deadline_secs: left.as_secs().max(1),
        total_rounds: settings.planned_rounds(),
        update_encoding: settings.aggregation.update_encoding,
        secure,
        scoring: settings.selection.map(|s| Scoring { noise_multiplier: s.noise_multiplier, only: settings.is_scoring_round(round) }),
    }
}

/// A site refused at a secure step takes no further part in the round.
fn leave_out(c: &mut Collecting, site: &SiteId, reject: Reject) {
    c.status.insert(site.clone(), SiteStatus::Rejected);
    c.rejected.push((site.clone(), reject));
    if let Some(s) = &mut c.secure {
        s.expected.remove(site);
        s.uploading.remove(site);
    }
}

/// A secure round's contribution: the coordinator knows no site's weight, norm or
/// metrics, only the release it declared and the digest of its masked input.
fn secure_contribution(site: &SiteId, privacy: &PrivacyUsed, digest: Digest) -> Contribution {
    Contribution {
        site: site.clone(),
        num_examples: 0,
        weight: 0,
        update_norm: 0.0,
        scale: 1.0,
        metrics: None,
        score: None,
        privacy: *privacy,
        update_digest: digest,
    }
}

/// The most one site's weight counts in a secure sum.
fn max_weight(aggregation: &Aggregation) -> u64 {
    match aggregation.weighting {
        Weighting::Examples => aggregation.max_examples_per_site,
        Weighting::Equal => 1,
    }
}

/// The most sites a secure sum can hold: the enrolled ones.
fn max_sites(settings: &Settings) -> u32 {
    settings.enrolled.len().clamp(1, fedward_shared::secagg::MAX_SITES) as u32
}

/// The fixed-point encoding of a secure round: updates clipped to `bound`.
fn fixed_point(settings: &Settings, bound: f64) -> Result<FixedPoint, SecAggError> {
    let params = settings.secure.as_ref().map(|s| s.params).ok_or_else(|| SecAggError::Params("not a secure federation".into()))?;
    FixedPoint::new(params.modulus_bits, bound as f32, max_weight(&settings.aggregation), max_sites(settings) as usize)
}

/// The decoded mean of a secure round against what honest sites can produce: each sent
/// an update of L2 norm at most `clip` weighted by 1 to `max_weight`, so the total weight
/// lies between `n_summed` and `n_summed * max_weight`, and the weighted mean has every
/// coordinate and its L2 norm within `clip`, up to the encoding's error. A sum outside
/// these was made by a site that did not follow the protocol; the coordinator cannot say
/// which, and fails the round.
pub fn check_secure_mean(
    mean: &fedward_shared::secagg::WeightedMean,
    fixed: &FixedPoint,
    clip: f32,
    n_summed: usize,
    max_weight: u64,
) -> Result<(), String> {
    let n = n_summed as u64;
    if mean.total_weight < n || mean.total_weight > n.saturating_mul(max_weight) {
        return Err(format!(
            "the summed weight {} is impossible for {n} sites weighing 1 to {max_weight} each: a site sent a malformed input",
            mean.total_weight
        ));
    }
    let err = fixed.mean_error_bound(n_summed, mean.total_weight);
    // The f32 rounding of each value (relative 2^-24) on top of the encoding's error.
    let coord_limit = f64::from(clip) * (1.0 + 1e-6) + err;
    let mut sum_sq = 0.0f64;
    for &v in &mean.values {
        let v = f64::from(v);
        // NaN fails too.
        if v.is_nan() || v.abs() > coord_limit {
            return Err(format!("a coordinate of the mean is {v}, beyond the bound {clip}: a site sent a malformed input"));
        }
        sum_sq += v * v;
    }
    let norm_limit = f64::from(clip) * (1.0 + 1e-6) + err * (mean.values.len() as f64).sqrt();
    if sum_sq.sqrt() > norm_limit {
        return Err(format!("the mean's L2 norm is {:.6}, beyond the bound {clip}: a site sent a malformed input", sum_sq.sqrt()));
    }
    Ok(())
}

/// Everything that can be checked before the bytes arrive.
/// Figures a site may lie about are only for display; a non-finite one is dropped (as if
/// withheld) so it can neither poison a mean nor the state file.
fn all_finite(m: &LocalMetrics) -> bool {
    [Some(m.train_loss), m.val_loss, m.val_accuracy, m.val_macro_f1, Some(m.train_secs)].iter().flatten().all(|x| x.is_finite())
}

fn check_header(settings: &Settings, manifest: &[TensorSpec], h: &UpdateHeader, scoring_only: bool) -> Result<(), Reject> {
    check_score(settings, h, scoring_only)?;
    if scoring_only {
        if !h.tensors.is_empty() {
            return Err(Reject::new(RejectCode::PolicyViolation, format!("round {} only scores the last model: send no tensors", h.round)));
        }
        if h.num_examples > crate::aggregate::MAX_EXAMPLES {
            return Err(Reject::new(RejectCode::InvalidWeight, format!("invalid number of examples {}", h.num_examples)));
        }
        return check_policy(&settings.policy, &h.privacy);
    }
    let offered = settings.aggregation.update_encoding;
    if h.encoding != offered {
        return Err(Reject::new(
            RejectCode::PolicyViolation,
            format!("the update is encoded as {}; this round's offer asks for {offered}", h.encoding),
        ));
    }
    let trainable = &settings.plan.trainable_tensors;
    for spec in &h.tensors {
        if !trainable.contains(&spec.name) {
            return Err(Reject::new(RejectCode::UnknownTensor, format!("tensor {} is not trainable in this round", spec.name)));
        }
        let expected = manifest.iter().find(|s| s.name == spec.name).map(|s| s.shape.clone()).unwrap_or_default();
        if spec.shape != expected {
            return Err(Reject::new(
                RejectCode::ShapeMismatch,
                format!("update shape mismatch for {}: expected {expected:?}, got {:?}", spec.name, spec.shape),
            ));
        }
    }
    if let Some(missing) = trainable.iter().find(|n| !h.tensors.iter().any(|s| &s.name == *n)) {
        return Err(Reject::new(RejectCode::MissingTensor, format!("update lacks tensor {missing}")));
    }
    fedward_shared::wire::declared_payload_bytes(&h.tensors, settings.max_update_bytes)
        .map_err(|e| Reject::new(RejectCode::TooLarge, e.to_string()))?;
    if h.num_examples == 0 || h.num_examples > crate::aggregate::MAX_EXAMPLES {
        return Err(Reject::new(RejectCode::InvalidWeight, format!("invalid number of examples {}", h.num_examples)));
    }
    check_policy(&settings.policy, &h.privacy)
}

/// A site's score against what the offer asked: none unless selection is on; under it a
/// score with a finite count and a plausible number of examples, declared as released
/// (alone in the scoring round, where it is all a site sends) with at least the offered
/// noise under a DP plan.
fn check_score(settings: &Settings, h: &UpdateHeader, scoring_only: bool) -> Result<(), Reject> {
    let violation = |m: String| Err(Reject::new(RejectCode::PolicyViolation, m));
    let Some(selection) = settings.selection else {
        if h.score.is_some() || h.privacy.score.is_some() {
            return violation("this federation asks for no score of the global model".into());
        }
        return Ok(());
    };
    let Some(score) = h.score else {
        if scoring_only {
            return violation(format!("round {} only scores the last model and the update carries no score", h.round));
        }
        if h.privacy.score.is_some() {
            return violation("the update declares a score release but carries no score".into());
        }
        return Ok(());
    };
    if !score.correct.is_finite() {
        return Err(Reject::new(RejectCode::NonFinite, format!("the score's count is {}", score.correct)));
    }
    if score.examples == 0 || score.examples > crate::aggregate::MAX_EXAMPLES {
        return Err(Reject::new(RejectCode::InvalidWeight, format!("invalid number of scored examples {}", score.examples)));
    }
    let Some(released) = h.privacy.score else {
        return violation("the update carries a score but declares no score release".into());
    };
    if released.alone != scoring_only {
        return violation(format!(
            "the score release is declared {}, but this round {}",
            if released.alone { "alone" } else { "beside an update" },
            if scoring_only { "only scores" } else { "trains" }
        ));
    }
    if settings.policy.mode != PrivacyMode::Off
        && (released.noise_multiplier.is_nan() || released.noise_multiplier < selection.noise_multiplier)
    {
        return violation(format!(
            "the score's noise multiplier {} is below the offered {}",
            released.noise_multiplier, selection.noise_multiplier
        ));
    }
    Ok(())
}

/// A site's declared cumulative epsilon against what the coordinator itself accepted from
/// it (plus this update, unless it was counted already). A site that declares less has
/// lost or reset its ledger, or lies: its spend cannot start over, so the update is refused
/// with both figures.
fn check_declared_spend(spent: Option<&SiteSpend>, round: RoundId, digest: Digest, used: &PrivacyUsed) -> Result<(), Reject> {
    if used.mode == PrivacyMode::Off {
        return Ok(());
    }
    let violation = |m: String| Err(Reject::new(RejectCode::PolicyViolation, m));
    let empty = SiteSpend::default();
    let spent = spent.unwrap_or(&empty);
    let counted = if spent.counted.contains(&(round, digest)) {
        spent.accountant.epsilon(used.delta)
    } else {
        spent.accountant.epsilon_after(&used.release(), used.delta)
    };
    let counted = match counted {
        Ok(e) => e,
        Err(e) => return violation(format!("the declared privacy cannot be accounted with this site's accepted updates: {e}")),
    };
    // Both sides compute with the same accountant; allow float noise only. NaN is short.
    let declared_enough = used.epsilon_after.partial_cmp(&(counted * (1.0 - 1e-9) - 1e-12)).is_some_and(|o| o.is_ge());
    if !declared_enough {
        return violation(format!(
            "declared cumulative epsilon {} after this update, but the updates the coordinator accepted from this site come to {counted:.6} \
             at delta {}: a site ledger lost or reset cannot start its spend over",
            used.epsilon_after, used.delta
        ));
    }
    Ok(())
}

/// The consortium's privacy policy against what the site declares it used.
pub fn check_policy(policy: &PrivacyPolicy, used: &PrivacyUsed) -> Result<(), Reject> {
    let violation = |m: String| Err(Reject::new(RejectCode::PolicyViolation, m));
    if policy.mode == PrivacyMode::Off {
        return Ok(());
    }
    if used.mode != policy.mode {
        return violation(format!("privacy mode {} used, the consortium requires {}", used.mode, policy.mode));
    }
    // NaN compares false both ways, so it is named here rather than slipping through.
    if used.noise_multiplier.is_nan() || used.noise_multiplier < policy.min_noise_multiplier {
        return violation(format!(
            "noise multiplier {} is below the consortium minimum {}",
            used.noise_multiplier, policy.min_noise_multiplier
        ));
    }
    if !(used.clip_norm > 0.0 && used.clip_norm <= policy.max_clip_norm) {
        return violation(format!("clip norm {} is outside (0, {}]", used.clip_norm, policy.max_clip_norm));
    }
    if used.mode == PrivacyMode::RecordLevel && !(used.sampling_rate > 0.0 && used.sampling_rate <= 1.0) {
        return violation(format!("sampling rate {} is outside (0, 1]", used.sampling_rate));
    }
    if (used.mode == PrivacyMode::Distributed) != used.distributed.is_some() {
        return violation(format!(
            "a {} release {} a distributed noise share",
            used.mode,
            if used.distributed.is_some() { "declares" } else { "lacks" }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use fedward_shared::codec::UpdateEncoding;
    use fedward_shared::config::OverNorm;
    use fedward_shared::dp::ScoreRelease;
    use fedward_shared::plan::Trainable;
    use fedward_shared::tensor::Tensor;

    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    fn global() -> TensorSet {
        let mut g = TensorSet::new();
        g.insert("classifier.weight", Tensor::new(vec![2, 2], vec![1.0, 1.0, 1.0, 1.0]).unwrap());
        g.insert("bert.embeddings.word_embeddings.weight", Tensor::new(vec![3], vec![0.5; 3]).unwrap());
        g
    }

    fn manifest() -> Vec<TensorSpec> {
        global().specs()
    }

    /// What the shell does with a round's checkpoint: `base` plus the update, reported
    /// back to the machine. Returns the new model.
    fn commit(m: &mut RoundMachine, outs: &[Output], base: &TensorSet) -> TensorSet {
        let cp = checkpoint(outs).expect("a checkpoint");
        let mut model = base.clone();
        model.add_assign(&cp.update).unwrap();
        m.handle_checkpointed(Instant::now(), Ok(model.specs()));
        model
    }

    fn settings(min_sites: usize, rounds: u64) -> Settings {
        Settings {
            selection: None,
            total_rounds: rounds,
            min_sites,
            round_deadline: Duration::from_secs(60),
            max_attempts: 2,
            max_update_bytes: 1 << 20,
            plan: TrainingPlan { batch_size: 8, ..TrainingPlan::minimal(Trainable::Head, vec!["classifier.weight".into()]) },
            policy: PrivacyPolicy { mode: PrivacyMode::Off, min_noise_multiplier: 0.0, max_clip_norm: f64::INFINITY },
            aggregation: Aggregation { max_update_norm: Some(100.0), ..Aggregation::default() },
            enrolled: ["a", "b", "c"].into_iter().map(site).collect(),
            secure: None,
        }
    }

    fn delta(v: f32) -> TensorSet {
        let mut d = TensorSet::new();
        d.insert("classifier.weight", Tensor::new(vec![2, 2], vec![v; 4]).unwrap());
        d
    }

    fn header(round: u64, n: u64, d: &TensorSet) -> UpdateHeader {
        UpdateHeader {
            score: None,
            round: RoundId(round),
            num_examples: n,
            metrics: Some(LocalMetrics { train_loss: 1.0, ..Default::default() }),
            tensors: d.specs(),
            privacy: PrivacyUsed::off(),
            encoding: UpdateEncoding::F32,
        }
    }

    fn drain(m: &mut RoundMachine) -> Vec<Output> {
        std::iter::from_fn(|| m.poll_output()).collect()
    }

    fn checkpoint(outs: &[Output]) -> Option<&Checkpoint> {
        outs.iter().find_map(|o| match o {
            Output::Checkpoint(cp) => Some(&**cp),
            _ => None,
        })
    }

    fn offers(outs: &[Output]) -> Vec<(SiteId, RoundId)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Offer { to, offer } => Some((to.clone(), offer.round)),
                _ => None,
            })
            .collect()
    }

    fn send(m: &mut RoundMachine, now: Instant, s: &str, round: u64, n: u64, v: f32) -> Result<Ack, Reject> {
        let d = delta(v);
        let h = header(round, n, &d);
        m.begin_update(&site(s), &h)?;
        m.finish_update(now, &site(s), &h, d)
    }

    /// A machine that selects its model, exact scores, 5 candidates.
    fn selecting(min_sites: usize, rounds: u64) -> RoundMachine {
        let mut s = settings(min_sites, rounds);
        s.selection = Some(SelectionSettings { noise_multiplier: 0.0, candidates: 5 });
        RoundMachine::new(s, manifest(), 0).unwrap()
    }

    /// A scored update: `correct` of `examples` right on the site's validation split.
    fn scored(round: u64, n: u64, d: &TensorSet, correct: f64, examples: u64, alone: bool) -> UpdateHeader {
        let mut h = header(round, n, d);
        h.score = Some(ValidationScore { correct, examples });
        h.privacy.score = Some(ScoreRelease { noise_multiplier: 0.0, alone });
        h
    }

    /// Model selection, three rounds and the scoring round: each round's offer asks for a
    /// score of the model it offers, the fourth trains nothing, and its checkpoint is the
    /// model the sites scored best (here round 2's, example-weighted: a large site's
    /// poor score outweighs a small site's good one).
    #[test]
    fn selection_scores_each_offered_model_and_the_last_round_picks_the_best() {
        let t0 = Instant::now();
        let mut m = selecting(2, 3);
        assert_eq!(m.planned_rounds(), 4);
        // (a's correct of 100, b's correct of 10) for models 0, 1, 2, 3.
        let figures = [(50.0, 5.0), (70.0, 9.0), (90.0, 1.0), (80.0, 10.0)];
        let mut model = global();
        for (round, (a, b)) in (1..=4u64).zip(figures) {
            m.handle_ready(t0, site("a"));
            m.handle_ready(t0, site("b"));
            let outs = drain(&mut m);
            let only = round == 4;
            for o in &outs {
                let Output::Offer { offer, .. } = o else { continue };
                assert_eq!(offer.scoring, Some(Scoring { noise_multiplier: 0.0, only }), "round {round}");
                assert_eq!(offer.total_rounds, 4);
            }
            let d = if only { TensorSet::new() } else { delta(1.0) };
            for (name, correct, examples) in [("a", a, 100), ("b", b, 10)] {
                let h = scored(round, 10, &d, correct, examples, only);
                m.begin_update(&site(name), &h).unwrap();
                m.finish_update(t0, &site(name), &h, d.clone()).unwrap();
            }
            let outs = drain(&mut m);
            let cp = checkpoint(&outs).expect("a checkpoint");
            let tally = cp.summary.scored.expect("scores");
            assert_eq!((tally.model_round, tally.examples, tally.sites), (round - 1, 110, 2));
            assert!((tally.correct - (a + b)).abs() < 1e-9);
            if only {
                assert_eq!((cp.select, cp.summary.selected), (Some(2), Some(2)));
                assert!(cp.update.is_empty(), "the scoring round combines no update");
            } else {
                assert_eq!(cp.select, None);
            }
            model = commit(&mut m, &outs, &model);
        }
        assert!(m.is_done());
        assert_eq!(m.best_model(3), 2);
    }

    /// What a lying or careless site sends under selection is refused before its bytes:
    /// tensors in the scoring round, no score there, a non-finite count, a score release
    /// declared beside the update in the scoring round; and without selection, any score.
    #[test]
    fn selection_refuses_scores_that_do_not_fit_the_offer() {
        let t0 = Instant::now();
        let mut m = selecting(1, 1);
        m.handle_ready(t0, site("a"));
        drain(&mut m);
        let code = |m: &mut RoundMachine, h: &UpdateHeader| m.begin_update(&site("a"), h).unwrap_err().code;
        let d = delta(1.0);
        assert_eq!(code(&mut m, &scored(1, 10, &d, f64::NAN, 10, false)), RejectCode::NonFinite);
        assert_eq!(code(&mut m, &scored(1, 10, &d, 5.0, 0, false)), RejectCode::InvalidWeight);
        assert_eq!(code(&mut m, &scored(1, 10, &d, 5.0, 10, true)), RejectCode::PolicyViolation);
        let mut undeclared = scored(1, 10, &d, 5.0, 10, false);
        undeclared.privacy.score = None;
        assert_eq!(code(&mut m, &undeclared), RejectCode::PolicyViolation);
        // A score that claims more right than it scored counts as all right, no more.
        let h = scored(1, 10, &d, 1e9, 10, false);
        m.begin_update(&site("a"), &h).unwrap();
        m.finish_update(t0, &site("a"), &h, d.clone()).unwrap();
        let outs = drain(&mut m);
        assert_eq!(checkpoint(&outs).unwrap().summary.scored.unwrap().correct, 10.0);
        commit(&mut m, &outs, &global());
        m.handle_ready(t0, site("a"));
        drain(&mut m);
        assert_eq!(code(&mut m, &scored(2, 10, &d, 5.0, 10, true)), RejectCode::PolicyViolation, "tensors in the scoring round");
        assert_eq!(code(&mut m, &header(2, 10, &TensorSet::new())), RejectCode::PolicyViolation, "no score in the scoring round");
        // Without selection a score is refused.
        let mut plain = RoundMachine::new(settings(1, 1), manifest(), 0).unwrap();
        plain.handle_ready(t0, site("a"));
        drain(&mut plain);
        assert_eq!(code(&mut plain, &scored(1, 10, &d, 5.0, 10, false)), RejectCode::PolicyViolation);
    }

    #[test]
    fn waits_for_quorum_then_offers_to_all_ready_sites() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 1), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.phase(), PhaseView::WaitingForQuorum { ready: 1, needed: 2 });
        m.handle_ready(t0, site("b"));
        assert_eq!(offers(&drain(&mut m)), [(site("a"), RoundId(1)), (site("b"), RoundId(1))]);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn the_offer_names_the_encoding_and_an_update_in_another_is_refused() {
        let t0 = Instant::now();
        let mut s = settings(1, 1);
        s.aggregation.update_encoding = UpdateEncoding::Int8Row;
        let mut m = RoundMachine::new(s, manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        let out = drain(&mut m);
        assert!(matches!(&out[..], [Output::Offer { offer, .. }] if offer.update_encoding == UpdateEncoding::Int8Row));
        let d = delta(0.5);
        let plain = header(1, 10, &d);
        let refused = m.begin_update(&site("a"), &plain).unwrap_err();
        assert_eq!(refused.code, RejectCode::PolicyViolation);
        assert!(refused.message.contains("encoded as f32") && refused.message.contains("asks for int8-row"), "{}", refused.message);
        let h = UpdateHeader { encoding: UpdateEncoding::Int8Row, ..plain };
        m.begin_update(&site("a"), &h).unwrap();
        m.finish_update(t0, &site("a"), &h, d).unwrap();
    }

    #[test]
    fn paused_no_round_starts_until_resumed_or_started_by_hand() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 3), manifest(), 0).unwrap();
        m.set_paused(t0, true);
        m.handle_ready(t0, site("a"));
        assert_eq!(m.start_now(t0), Err(StartRefused::TooFewSites { ready: 1, needed: 2 }));
        m.handle_ready(t0, site("b"));
        assert!(drain(&mut m).is_empty(), "paused: quorum alone starts nothing");
        // One step by hand; the federation stays paused.
        assert_eq!(m.start_now(t0), Ok(RoundId(1)));
        assert_eq!(offers(&drain(&mut m)).len(), 2);
        assert_eq!(m.start_now(t0), Err(StartRefused::RoundOpen(RoundId(1))));
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        send(&mut m, t0, "b", 1, 10, 1.0).unwrap();
        let outs = drain(&mut m);
        commit(&mut m, &outs, &global());
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        assert!(offers(&drain(&mut m)).is_empty() && m.is_paused());
        // Resuming starts the waiting round at once.
        m.set_paused(t0, false);
        assert_eq!(offers(&drain(&mut m)), [(site("a"), RoundId(2)), (site("b"), RoundId(2))]);
    }

    #[test]
    fn a_full_round_averages_checkpoints_and_moves_on() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 2), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        drain(&mut m);
        send(&mut m, t0, "a", 1, 100, 1.0).unwrap();
        m.handle_ready(t0, site("a"));
        send(&mut m, t0, "b", 1, 300, 3.0).unwrap();
        let outs = drain(&mut m);
        let Some(cp) = checkpoint(&outs) else { panic!("expected a checkpoint first: {outs:?}") };
        // (100*1 + 300*3)/400 = 2.5, and only the trainable tensor is in the update.
        assert_eq!(cp.update.get("classifier.weight").unwrap().data(), &[2.5; 4]);
        assert_eq!(cp.update.len(), 1);
        assert_eq!(cp.completed_rounds, 1);
        assert_eq!(cp.summary.contributions.len(), 2);
        // Nothing moves on until the shell reports the checkpoint written.
        assert!(offers(&outs).is_empty());
        assert_eq!(m.phase(), PhaseView::Checkpointing { round: RoundId(1) });
        let model = commit(&mut m, &outs, &global());
        assert_eq!(model.get("classifier.weight").unwrap().data(), &[3.5; 4]);
        assert_eq!(m.completed_rounds(), 1);
        assert_eq!(m.model_digest(), model.digest());
        // Only "a" was ready again, quorum is 2: round 2 waits.
        assert!(offers(&drain(&mut m)).is_empty());
        m.handle_ready(t0, site("b"));
        assert_eq!(offers(&drain(&mut m)).len(), 2);
        assert_eq!(m.open_round(), Some(RoundId(2)));
    }

    /// Every accepted update is announced (for the ledger) before the round's checkpoint,
    /// in the order the updates were accepted; rejected ones are not.
    #[test]
    fn accepted_updates_are_announced_before_the_checkpoint() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 1), manifest(), 0).unwrap();
        for s in ["a", "b", "c"] {
            m.handle_ready(t0, site(s));
        }
        drain(&mut m);
        send(&mut m, t0, "b", 1, 30, 1.0).unwrap();
        let outs = drain(&mut m);
        let [Output::Accepted { round, contribution }] = &outs[..] else { panic!("{outs:?}") };
        assert_eq!((*round, &contribution.site, contribution.num_examples), (RoundId(1), &site("b"), 30));
        assert_eq!(contribution.update_digest, manifest_digest(&delta(1.0).specs()));
        let mut bad = delta(1.0);
        bad.get_mut("classifier.weight").unwrap().data_mut()[0] = f32::INFINITY;
        let h = header(1, 5, &bad);
        m.begin_update(&site("c"), &h).unwrap();
        m.finish_update(t0, &site("c"), &h, bad).unwrap_err();
        assert!(drain(&mut m).is_empty());
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        let outs = drain(&mut m);
        assert!(matches!(&outs[0], Output::Accepted { contribution, .. } if contribution.site == site("a")), "{outs:?}");
        assert!(matches!(&outs[1], Output::Checkpoint(cp) if cp.summary.round == RoundId(1)), "{outs:?}");
    }

    #[test]
    fn stale_duplicate_and_unoffered_updates_are_rejected_without_harm() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 3), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        drain(&mut m);
        assert_eq!(send(&mut m, t0, "a", 2, 10, 1.0).unwrap_err().code, RejectCode::StaleRound);
        assert_eq!(send(&mut m, t0, "c", 1, 10, 1.0).unwrap_err().code, RejectCode::NotOffered);
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        assert_eq!(send(&mut m, t0, "a", 1, 10, 9.0).unwrap_err().code, RejectCode::DuplicateUpdate);
        send(&mut m, t0, "b", 1, 10, 1.0).unwrap();
        let outs = drain(&mut m);
        let Some(cp) = checkpoint(&outs) else { panic!("{outs:?}") };
        assert_eq!(cp.update.get("classifier.weight").unwrap().data(), &[1.0; 4]);
    }

    #[test]
    fn malformed_update_is_rejected_and_the_round_completes_with_the_others() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 1), manifest(), 0).unwrap();
        for s in ["a", "b", "c"] {
            m.handle_ready(t0, site(s));
        }
        drain(&mut m);
        let mut bad = delta(1.0);
        bad.get_mut("classifier.weight").unwrap().data_mut()[2] = f32::NAN;
        let h = header(1, 50, &bad);
        m.begin_update(&site("c"), &h).unwrap();
        assert_eq!(m.finish_update(t0, &site("c"), &h, bad).unwrap_err().code, RejectCode::NonFinite);
        // Wrong shapes are caught from the header alone.
        let mut wrong = TensorSet::new();
        wrong.insert("classifier.weight", Tensor::new(vec![4], vec![0.0; 4]).unwrap());
        assert_eq!(m.begin_update(&site("b"), &header(1, 5, &wrong)).unwrap_err().code, RejectCode::ShapeMismatch);
        let mut extra = delta(0.0);
        extra.insert("bert.embeddings.word_embeddings.weight", Tensor::new(vec![3], vec![0.0; 3]).unwrap());
        assert_eq!(m.begin_update(&site("b"), &header(1, 5, &extra)).unwrap_err().code, RejectCode::UnknownTensor);
        send(&mut m, t0, "a", 1, 10, 2.0).unwrap();
        send(&mut m, t0, "b", 1, 30, 6.0).unwrap();
        let outs = drain(&mut m);
        let Some(cp) = checkpoint(&outs) else { panic!("{outs:?}") };
        assert_eq!(cp.update.get("classifier.weight").unwrap().data(), &[5.0; 4]);
        assert_eq!(cp.summary.rejected.len(), 1);
        assert_eq!(cp.summary.rejected[0].0, site("c"));
        commit(&mut m, &outs, &global());
        assert!(m.is_done());
    }

    #[test]
    fn the_deadline_waits_for_a_fold_in_flight_and_refuses_new_uploads() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(1, 1), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        drain(&mut m);
        let d = delta(1.0);
        let h = header(1, 5, &d);
        m.begin_update(&site("a"), &h).unwrap();
        let job = m.start_fold(&site("a"), &h, d).unwrap();
        let deadline = m.poll_timeout().unwrap();
        m.handle_timeout(deadline);
        // Still collecting, with no timeout to spin on, until the fold reports.
        assert!(matches!(m.phase(), PhaseView::Collecting { .. }));
        assert_eq!(m.poll_timeout(), None);
        let late = delta(2.0);
        assert_eq!(m.begin_update(&site("b"), &header(1, 5, &late)).unwrap_err().code, RejectCode::StaleRound);
        m.handle_folded(deadline, &site("a"), &h, job.run()).unwrap();
        let outs = drain(&mut m);
        let cp = checkpoint(&outs).expect("the round closed with its one update");
        assert_eq!(cp.summary.contributions.len(), 1);
        assert_eq!(cp.summary.missed, vec![site("b")]);
    }

    #[test]
    fn deadline_leaves_out_the_late_site_when_quorum_holds() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 1), manifest(), 0).unwrap();
        for s in ["a", "b", "c"] {
            m.handle_ready(t0, site(s));
        }
        drain(&mut m);
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        send(&mut m, t0, "b", 1, 10, 1.0).unwrap();
        let outs = drain(&mut m);
        assert!(outs.iter().all(|o| matches!(o, Output::Accepted { .. })), "c may still answer: {outs:?}");
        m.handle_timeout(t0 + Duration::from_secs(59));
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(t0 + Duration::from_secs(60));
        let outs = drain(&mut m);
        let Some(cp) = checkpoint(&outs) else { panic!("{outs:?}") };
        assert_eq!(cp.summary.missed, [site("c")]);
        // The late update is now stale.
        assert_eq!(send(&mut m, t0, "c", 1, 10, 1.0).unwrap_err().code, RejectCode::StaleRound);
    }

    #[test]
    fn round_fails_clearly_without_quorum_and_gives_up_after_max_attempts() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 1), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        drain(&mut m);
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        m.handle_timeout(t0 + Duration::from_secs(60));
        let outs = drain(&mut m);
        let Some(Output::RoundFailed(f)) = outs.iter().find(|o| !matches!(o, Output::Accepted { .. })) else { panic!("{outs:?}") };
        assert!(f.reason.contains("only 1 of the 2 sites"), "{}", f.reason);
        assert!(!f.gave_up);
        assert_eq!(m.completed_rounds(), 0);
        assert_eq!(m.manifest(), manifest(), "global model untouched");
        // Second attempt of round 1, also failing: the federation stops.
        let t1 = t0 + Duration::from_secs(61);
        m.handle_ready(t1, site("a"));
        m.handle_ready(t1, site("b"));
        assert_eq!(offers(&drain(&mut m)), [(site("a"), RoundId(1)), (site("b"), RoundId(1))]);
        let decline = Decline { round: RoundId(1), reason: DeclineReason::BudgetExhausted };
        m.handle_decline(t1, &site("a"), &decline).unwrap();
        m.handle_disconnected(t1, &site("b"));
        let outs = drain(&mut m);
        let Some(Output::RoundFailed(f)) = outs.iter().find(|o| !matches!(o, Output::Accepted { .. })) else { panic!("{outs:?}") };
        assert!(f.gave_up);
        assert!(matches!(m.phase(), PhaseView::Stopped { .. }));
    }

    #[test]
    fn late_joiner_is_offered_the_open_round_and_resumed_machine_continues() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(1, 5), manifest(), 3).unwrap();
        m.handle_ready(t0, site("a"));
        assert_eq!(offers(&drain(&mut m)), [(site("a"), RoundId(4))]);
        m.handle_ready(t0 + Duration::from_secs(10), site("b"));
        let outs = drain(&mut m);
        let Output::Offer { offer, .. } = &outs[0] else { panic!("{outs:?}") };
        assert_eq!((offer.round, offer.deadline_secs), (RoundId(4), 50));
    }

    /// A site whose connection dropped was marked gone and never offered the open round
    /// again, so its recorded release was never sent and it trained (and spent) again the
    /// next round. Now it is offered the round again while the deadline allows.
    #[test]
    fn a_site_that_reconnects_before_the_deadline_is_offered_the_open_round_again() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(2, 1), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        drain(&mut m);
        m.handle_disconnected(t0 + Duration::from_secs(5), &site("a"));
        assert!(drain(&mut m).is_empty(), "b may still answer: the round stays open");
        m.handle_ready(t0 + Duration::from_secs(10), site("a"));
        let outs = drain(&mut m);
        let Some(Output::Offer { to, offer }) = outs.first() else { panic!("{outs:?}") };
        assert_eq!((to, offer.round, offer.deadline_secs), (&site("a"), RoundId(1), 50));
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        send(&mut m, t0, "b", 1, 10, 1.0).unwrap();
        let outs = drain(&mut m);
        assert_eq!(checkpoint(&outs).expect("both made the round").summary.contributions.len(), 2);
    }

    #[test]
    fn policy_violations_are_rejected() {
        let policy = PrivacyPolicy { mode: PrivacyMode::SiteLevel, min_noise_multiplier: 1.0, max_clip_norm: 2.0 };
        let mut used = PrivacyUsed {
            score: None,
            mode: PrivacyMode::SiteLevel,
            noise_multiplier: 1.0,
            clip_norm: 2.0,
            sampling_rate: 0.0,
            steps: 0,
            update_clip_norm: 0.0,
            epsilon_after: 1.0,
            delta: 1e-5,
            distributed: None,
        };
        assert!(check_policy(&policy, &used).is_ok());
        used.noise_multiplier = 0.99;
        assert_eq!(check_policy(&policy, &used).unwrap_err().code, RejectCode::PolicyViolation);
        used.noise_multiplier = 1.0;
        used.clip_norm = 2.5;
        assert!(check_policy(&policy, &used).is_err());
        used.clip_norm = 1.0;
        used.mode = PrivacyMode::Off;
        assert!(check_policy(&policy, &used).is_err());
        used.mode = PrivacyMode::SiteLevel;
        used.noise_multiplier = f64::NAN;
        assert!(check_policy(&policy, &used).is_err(), "NaN never passes");
    }

    /// Runs one round of sites a, b, c sending `v * ones` with `n` examples each; returns
    /// the checkpoint's classifier weights, or the failure.
    fn one_round(settings: Settings, global: TensorSet, sends: &[(&str, u64, f32)]) -> Result<Vec<f32>, RoundFailure> {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings, global.specs(), 0).unwrap();
        for (s, _, _) in sends {
            m.handle_ready(t0, site(s));
        }
        drain(&mut m);
        for &(s, n, v) in sends {
            let _ = send(&mut m, t0, s, 1, n, v);
        }
        let outs = drain(&mut m);
        if checkpoint(&outs).is_some() {
            return Ok(commit(&mut m, &outs, &global).get("classifier.weight").unwrap().data().to_vec());
        }
        match outs.into_iter().find_map(|o| if let Output::RoundFailed(f) = o { Some(f) } else { None }) {
            Some(f) => Err(f),
            None => panic!("the round neither completed nor failed"),
        }
    }

    /// The takeover of issue 17: one site claims 2^29 examples and sends a huge update.
    /// Its weight is clamped and its update clipped to the coordinator's own bound, so the
    /// new model stays within the bound of what the honest sites' mean makes it.
    #[test]
    fn one_site_cannot_set_the_global_model() {
        let bound = 2.0;
        let mut s = settings(3, 1);
        s.aggregation = Aggregation { max_update_norm: Some(bound), max_examples_per_site: 1000, ..Aggregation::default() };
        let attacked = one_round(s, global(), &[("a", 1000, 0.5), ("b", 1000, 0.25), ("c", crate::aggregate::MAX_EXAMPLES, 1e30)]).unwrap();
        // The honest mean moves each of the 4 weights by 0.375 from 1.0.
        let honest_mean = [1.375f32; 4];
        let dist = attacked.iter().zip(honest_mean).map(|(x, h)| f64::from(x - h).powi(2)).sum::<f64>().sqrt();
        assert!(dist <= bound, "the attacker moved the model {dist} from the honest mean");
        // Clipped to norm 2 over 4 values: 1.0 each; equal clamped weights: (0.5 + 0.25 + 1) / 3.
        assert_eq!(attacked, [1.0 + 1.75 / 3.0; 4]);

        // Under "refuse" the attacker's update is refused and named, and the honest sites
        // still make the round (quorum 2 here).
        let mut refuse = settings(2, 1);
        refuse.aggregation = Aggregation { max_update_norm: Some(bound), over_norm: OverNorm::Refuse, ..Aggregation::default() };
        let t0 = Instant::now();
        let mut m = RoundMachine::new(refuse, manifest(), 0).unwrap();
        for x in ["a", "b", "c"] {
            m.handle_ready(t0, site(x));
        }
        drain(&mut m);
        assert_eq!(send(&mut m, t0, "c", 1, 10, 1e30).unwrap_err().code, RejectCode::NormTooLarge);
        send(&mut m, t0, "a", 1, 10, 0.5).unwrap();
        send(&mut m, t0, "b", 1, 30, 0.25).unwrap();
        let outs = drain(&mut m);
        let cp = checkpoint(&outs).expect("the honest sites complete the round");
        assert_eq!(cp.summary.rejected[0].1.code, RejectCode::NormTooLarge);
        assert_eq!(cp.update.get("classifier.weight").unwrap().data(), &[0.3125; 4]);
    }

    #[test]
    fn weights_are_clamped_or_equal_and_recorded() {
        let mut s = settings(2, 1);
        s.aggregation.max_examples_per_site = 100;
        let t0 = Instant::now();
        let mut m = RoundMachine::new(s.clone(), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        m.handle_ready(t0, site("b"));
        drain(&mut m);
        send(&mut m, t0, "a", 1, 1_000_000, 2.0).unwrap();
        send(&mut m, t0, "b", 1, 100, 0.0).unwrap();
        let outs = drain(&mut m);
        let cp = checkpoint(&outs).unwrap();
        assert_eq!(cp.update.get("classifier.weight").unwrap().data(), &[1.0; 4], "(100*2 + 100*0)/200");
        let a = &cp.summary.contributions[0];
        assert_eq!((a.num_examples, a.weight, a.update_norm, a.scale), (1_000_000, 100, 4.0, 1.0));

        s.aggregation.weighting = Weighting::Equal;
        assert_eq!(one_round(s, global(), &[("a", 900, 3.0), ("b", 100, 1.0)]).unwrap(), [3.0; 4]);
    }

    #[test]
    fn the_median_resists_one_wild_site() {
        let mut s = settings(3, 1);
        s.aggregation =
            Aggregation { method: fedward_shared::config::AggregationMethod::Median, max_update_norm: Some(1e6), ..Aggregation::default() };
        assert_eq!(one_round(s, global(), &[("a", 10, 0.5), ("b", 10, 0.25), ("c", 10, 400.0)]).unwrap(), [1.5; 4]);
    }

    /// A checkpoint the shell could not use (the store found the new model non-finite)
    /// fails the round with the shell's reason; the model stays and the round is retried.
    #[test]
    fn a_checkpoint_the_shell_refuses_fails_the_round() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(1, 2), manifest(), 0).unwrap();
        m.handle_ready(t0, site("a"));
        drain(&mut m);
        send(&mut m, t0, "a", 1, 10, 1.0).unwrap();
        assert!(checkpoint(&drain(&mut m)).is_some());
        m.handle_ready(t0, site("a"));
        m.handle_checkpointed(t0, Err("the new global model would hold 4 non-finite values".into()));
        let outs = drain(&mut m);
        let Some(Output::RoundFailed(f)) = outs.first() else { panic!("{outs:?}") };
        assert!(f.reason.contains("non-finite") && !f.gave_up, "{f:?}");
        assert_eq!((m.completed_rounds(), m.manifest()), (0, &manifest()[..]));
        assert_eq!(offers(&outs), [(site("a"), RoundId(1))], "round 1 again");
    }

    #[test]
    fn the_bound_comes_from_the_plan_never_from_the_site() {
        let record = PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.1, update_clip_norm: 7.0 };
        assert_eq!(update_bound(None, &record, 100), Some(7.0));
        assert_eq!(update_bound(Some(3.0), &record, 100), Some(3.0));
        let site_level = PrivacyPlan::SiteLevel { noise_multiplier: 2.0, clip_norm: 0.5 };
        // 0.5 * (1 + 2 * (sqrt(10000) + 10)) = 110.5
        assert_eq!(update_bound(None, &site_level, 10_000), Some(110.5));
        assert_eq!(update_bound(None, &PrivacyPlan::Off, 100), None);
        let mut s = settings(1, 1);
        s.aggregation.max_update_norm = None;
        assert!(matches!(RoundMachine::new(s, manifest(), 0), Err(SettingsError::NoUpdateBound)));

        // A record-level site that declares a looser bound than the plan's is still held
        // to the plan's (clipped here).
        let mut s = settings(1, 1);
        s.plan.privacy = record;
        s.aggregation.max_update_norm = None;
        assert_eq!(one_round(s, global(), &[("a", 10, 100.0)]).unwrap(), [1.0 + 3.5; 4]);
        assert_eq!(RoundMachine::new(settings(1, 1), manifest(), 0).unwrap().update_bound(), 100.0);
    }

    /// A site whose ledger was lost or reset declares its spend from zero again; the
    /// coordinator counts what it accepted and refuses the update, with both figures. A
    /// redone round's resent update is not counted twice.
    #[test]
    fn a_site_cannot_declare_less_spent_than_the_coordinator_accepted() {
        let release = Release::record_level(1.0, 0.1, 10);
        let mut s = settings(1, 4);
        s.plan.privacy = PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.1, update_clip_norm: 100.0 };
        s.policy = PrivacyPolicy { mode: PrivacyMode::RecordLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
        let ledger = [(site("a"), RoundId(1), Digest([1; 32]), release), (site("a"), RoundId(2), Digest([2; 32]), release)];
        let mut m = RoundMachine::new(s, manifest(), 2).unwrap().with_accepted(ledger).unwrap();
        let t0 = Instant::now();
        m.handle_ready(t0, site("a"));
        drain(&mut m);
        let epsilon = |n: usize| {
            let mut acc = Accountant::new();
            for _ in 0..n {
                acc.record(&release).unwrap();
            }
            acc.epsilon(1e-5).unwrap()
        };
        let d = delta(0.1);
        let mut h = header(3, 10, &d);
        h.privacy = PrivacyUsed {
            score: None,
            mode: PrivacyMode::RecordLevel,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampling_rate: 0.1,
            steps: 10,
            update_clip_norm: 100.0,
            epsilon_after: epsilon(1),
            delta: 1e-5,
            distributed: None,
        };
        let refused = m.begin_update(&site("a"), &h).unwrap_err();
        assert_eq!(refused.code, RejectCode::PolicyViolation);
        assert!(refused.message.contains("lost or reset"), "{}", refused.message);
        // What it really spent after three releases passes.
        h.privacy.epsilon_after = epsilon(3);
        m.begin_update(&site("a"), &h).unwrap();
        m.finish_update(t0, &site("a"), &h, d.clone()).unwrap();
        drain(&mut m);
        // Round 3's update is now counted; resending it (a redone round) declares the
        // same spend and is not counted again.
        let spent = &m.spent[&site("a")];
        assert_eq!((spent.accountant.releases(), spent.counted.len()), (3, 3));
        assert!(check_declared_spend(Some(spent), h.round, manifest_digest(&h.tensors), &h.privacy).is_ok());
    }

    #[test]
    fn finished_federation_answers_ready_with_finished() {
        let t0 = Instant::now();
        let mut m = RoundMachine::new(settings(1, 1), manifest(), 1).unwrap();
        m.handle_ready(t0, site("a"));
        assert!(matches!(&drain(&mut m)[..], [Output::Finished { finished, .. }] if finished.completed_rounds == 1));
    }

    /// Secure rounds: three sites with real certificates, the machine driven with the
    /// sites' own `SecAggClient`s, seeded.
    mod secure {
        use std::sync::OnceLock;

        use fedward_shared::pki::{self, Validity};
        use fedward_shared::secagg::{RelayedShares, SecAggClient, SiteCredentials, UnmaskRequest};
        // The rounds here are modulo 2^48 (`setup` below): 6 bytes a masked value.
        use fedward_shared::wire::{masked_value_width, masked_values_bytes, masked_values_digest};
        use rand_chacha::rand_core::SeedableRng;
        use rand_chacha::ChaCha20Rng;
        use time::OffsetDateTime;

        use super::*;

        const T0: i64 = 1_780_000_000;

        fn wall() -> UnixTime {
            UnixTime::since_unix_epoch(Duration::from_secs(T0 as u64 + 3600))
        }

        /// A CA and sites a, b, c, made once per test binary.
        fn consortium() -> &'static (Trust, Vec<SiteCredentials>) {
            static C: OnceLock<(Trust, Vec<SiteCredentials>)> = OnceLock::new();
            C.get_or_init(|| {
                let start = OffsetDateTime::from_unix_timestamp(T0).unwrap();
                let ca = pki::create_ca("test", Validity::days_from(start, 30), [1; 16]).unwrap();
                let trust = Trust::from_ca_pem(ca.cert_pem.as_bytes()).unwrap();
                let sites = ["a", "b", "c"]
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let id = site(name);
                        let req = pki::site_request(&id).unwrap();
                        let cert =
                            pki::sign_site_request(&ca, &req.csr_pem, &id, Validity::days_from(start, 30), [i as u8 + 2; 16]).unwrap();
                        SiteCredentials::from_pem(cert.as_bytes(), req.key_pem.as_bytes()).unwrap()
                    })
                    .collect();
                (trust, sites)
            })
        }

        fn secure_settings() -> Settings {
            let (trust, _) = consortium();
            Settings {
                secure: Some(SecureSettings {
                    params: SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 48 },
                    step_deadline: Duration::from_secs(30),
                    trust: trust.clone(),
                }),
                ..settings(3, 2)
            }
        }

        /// One site's side: its client and what it trains.
        struct Site {
            id: SiteId,
            client: SecAggClient,
            update: Vec<f32>,
            weight: u64,
            /// The round as its offer states it.
            secure: SecureRound,
        }

        fn secure_offer(outs: &[Output], to: &str) -> RoundOffer {
            outs.iter()
                .find_map(|o| match o {
                    Output::Offer { to: t, offer } if t.as_str() == to => Some(offer.clone()),
                    _ => None,
                })
                .expect("an offer")
        }

        fn replies(outs: &[Output]) -> BTreeMap<SiteId, Message> {
            outs.iter()
                .filter_map(|o| match o {
                    Output::SecAggReply { to, msg, .. } => Some((to.clone(), (**msg).clone())),
                    _ => None,
                })
                .collect()
        }

        /// Starts a secure round with a, b, c and runs keys and shares; returns the sites
        /// (with their shares received) and the encoding.
        fn through_shares(m: &mut RoundMachine, t0: Instant, rng: &mut ChaCha20Rng) -> (Vec<Site>, FixedPoint) {
            for s in ["a", "b", "c"] {
                m.handle_ready(t0, site(s));
            }
            let outs = drain(m);
            let (_, creds) = consortium();
            let mut sites = Vec::new();
            let mut fixed = None;
            for (i, cred) in creds.iter().enumerate() {
                let offer = secure_offer(&outs, cred.site().as_str());
                let secure = offer.secure.clone().expect("a secure offer");
                // The site checks the offer against itself before it takes part.
                fixed = Some(secure.check(&offer).unwrap());
                let client = SecAggClient::new(secure.setup, cred.clone(), consortium().0.clone(), rng).unwrap();
                let update = vec![0.1 * (i as f32 + 1.0), -0.2, 0.05 * i as f32, 0.3];
                sites.push(Site { id: cred.site().clone(), client, update, weight: 10 * (i as u64 + 1), secure });
            }
            for s in &sites {
                m.handle_secagg_keys(t0, wall(), &s.id, s.client.advertise_keys()).unwrap();
            }
            let relayed = replies(&drain(m));
            assert_eq!(relayed.len(), 3, "every sender gets the relayed keys");
            for s in &mut sites {
                let Message::SecAggRelayedKeys(keys) = &relayed[&s.id] else { panic!("{:?}", relayed[&s.id].kind()) };
                let shares = s.client.receive_keys(&keys.keys, wall(), rng).unwrap();
                m.handle_secagg_shares(t0, &s.id, shares).unwrap();
            }
            let relayed = replies(&drain(m));
            for s in &mut sites {
                let Message::SecAggRelayedShares(r) = &relayed[&s.id] else { panic!("{:?}", relayed[&s.id].kind()) };
                let r: &RelayedShares = r;
                s.client.receive_shares(r).unwrap();
            }
            (sites, fixed.unwrap())
        }

        fn send_masked(m: &mut RoundMachine, t: Instant, s: &mut Site, fixed: &FixedPoint, rng: &mut ChaCha20Rng) -> MaskedInputHeader {
            let input = fixed.encode(&s.update, s.weight, rng).unwrap();
            let masked = s.client.masked_input(&input).unwrap();
            let bytes = masked_values_bytes(&masked.values, masked_value_width(48));
            let header = MaskedInputHeader {
                round: masked.round,
                values: masked.values.len() as u64,
                digest: masked_values_digest(&bytes),
                privacy: PrivacyUsed::off(),
            };
            assert_eq!(m.begin_masked(&s.id, &header).unwrap(), bytes.len());
            m.finish_masked(t, &s.id, &header, masked.values).unwrap();
            header
        }

        fn unmask_request(outs: &[Output], to: &SiteId) -> UnmaskRequest {
            match replies(outs).remove(to) {
                Some(Message::SecAggUnmask(req)) => req,
                other => panic!("no unmask request for {to}: {other:?}"),
            }
        }

        fn weighted_mean(sites: &[&Site]) -> Vec<f32> {
            let total: u64 = sites.iter().map(|s| s.weight).sum();
            (0..4).map(|i| (sites.iter().map(|s| f64::from(s.update[i]) * s.weight as f64).sum::<f64>() / total as f64) as f32).collect()
        }

        fn assert_close(got: &TensorSet, want: &[f32], bound: f64) {
            let got = got.get("classifier.weight").expect("the trainable tensor").data();
            for (g, w) in got.iter().zip(want) {
                assert!(f64::from((g - w).abs()) <= bound + 1e-6, "got {got:?}, want {want:?}");
            }
        }

        #[test]
        fn a_site_leaving_after_its_masked_input_is_still_summed() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(7);
            let mut m = RoundMachine::new(secure_settings(), manifest(), 0).unwrap();
            let (mut sites, fixed) = through_shares(&mut m, t0, &mut rng);
            assert!(matches!(m.begin_update(&site("a"), &header(1, 5, &delta(0.1))), Err(r) if r.code == RejectCode::PolicyViolation));
            for s in &mut sites {
                send_masked(&mut m, t0, s, &fixed, &mut rng);
            }
            let outs = drain(&mut m);
            // Each input was recorded for the ledger, with no weight or norm: none is known.
            let accepted: Vec<_> = outs.iter().filter_map(|o| matches!(o, Output::Accepted { .. }).then_some(())).collect();
            assert_eq!(accepted.len(), 3);
            let req = unmask_request(&outs, &site("a"));
            assert_eq!(req.survivors.len(), 3);
            // c leaves now: its input is in the sum, its self-mask comes from a and b.
            m.handle_disconnected(t0, &site("c"));
            for s in sites.iter_mut().take(2) {
                let shares = s.client.unmask(&req).unwrap();
                m.handle_secagg_unmasking(t0, &s.id, shares).unwrap();
            }
            let outs = drain(&mut m);
            let cp = checkpoint(&outs).expect("the round completes");
            let secure = cp.secure.as_ref().expect("a secure outcome");
            assert_eq!(secure.summed, ["a", "b", "c"].map(site));
            assert!(secure.dropped.is_empty());
            assert_eq!(secure.total_weight, 60);
            let all: Vec<&Site> = sites.iter().collect();
            assert_close(&cp.update, &weighted_mean(&all), fixed.mean_error_bound(3, 60));
            assert_eq!(cp.summary.contributions.len(), 3);
            assert!(cp.summary.contributions.iter().all(|k| k.weight == 0 && k.metrics.is_none()));
            // Checkpointed like any round: the next one is offered after the report.
            m.handle_checkpointed(t0, Ok(manifest()));
            assert_eq!(m.completed_rounds(), 1);
        }

        /// A machine for a distributed round of a, b, c (`min_honest` given) through the
        /// shares, and the share the offer implies.
        fn distributed_round(
            min_honest: u64,
            t0: Instant,
            rng: &mut ChaCha20Rng,
        ) -> (RoundMachine, Vec<Site>, FixedPoint, fedward_shared::dp::DistributedRelease) {
            let plan = PrivacyPlan::Distributed { noise_multiplier: 1.0, clip_norm: 0.5, min_honest };
            let mut s = secure_settings();
            s.plan.privacy = plan;
            s.policy = PrivacyPolicy { mode: PrivacyMode::Distributed, min_noise_multiplier: 1.0, max_clip_norm: 0.5 };
            s.aggregation.weighting = Weighting::Equal;
            s.aggregation.max_update_norm = None;
            let mut m = RoundMachine::new(s, manifest(), 0).unwrap();
            let (sites, fixed) = through_shares(&mut m, t0, rng);
            let share = sites[0].secure.distributed_release(&plan).unwrap().expect("a share");
            (m, sites, fixed, share)
        }

        /// What a site declares with a distributed input carrying `share`.
        fn distributed_used(
            share: Option<fedward_shared::dp::DistributedRelease>,
            counted: &fedward_shared::dp::DistributedRelease,
        ) -> PrivacyUsed {
            let release = Release::distributed(1.0, *counted);
            PrivacyUsed {
                score: None,
                mode: PrivacyMode::Distributed,
                noise_multiplier: 1.0,
                clip_norm: 0.5,
                sampling_rate: 0.0,
                steps: 1,
                update_clip_norm: 0.0,
                epsilon_after: fedward_shared::dp::Accountant::new().epsilon_after(&release, 1e-5).unwrap(),
                delta: 1e-5,
                distributed: share,
            }
        }

        /// A site's update quantized, noised with its share and masked, as the agent does
        /// it; the header declares `privacy`.
        fn noised_input(
            s: &mut Site,
            fixed: &FixedPoint,
            share: &fedward_shared::dp::DistributedRelease,
            rng: &mut ChaCha20Rng,
        ) -> (Vec<u64>, Digest) {
            let mut q = fedward_shared::dp::distributed::quantize(rng, &s.update, &share.params()).unwrap();
            fedward_shared::dp::DiscreteGaussian::new(share.site_sigma).unwrap().add_to(rng, &mut q).unwrap();
            let masked = s.client.masked_input(&fixed.encode_units(&q, share.scale).unwrap()).unwrap();
            let digest = masked_values_digest(&masked_values_bytes(&masked.values, masked_value_width(48)));
            (masked.values, digest)
        }

        fn send_noised(
            m: &mut RoundMachine,
            t: Instant,
            s: &mut Site,
            fixed: &FixedPoint,
            share: &fedward_shared::dp::DistributedRelease,
            rng: &mut ChaCha20Rng,
        ) {
            let (values, digest) = noised_input(s, fixed, share, rng);
            let header = MaskedInputHeader {
                round: RoundId(1),
                values: values.len() as u64,
                digest,
                privacy: distributed_used(Some(*share), share),
            };
            m.begin_masked(&s.id, &header).unwrap();
            m.finish_masked(t, &s.id, &header, values).unwrap();
        }

        /// Distributed DP: a masked input must declare the noise share the offer implies
        /// (none, or a smaller one, is refused), and the sum of noised inputs, well beyond
        /// the clip norm in each coordinate's noise, is released: the mean of the sites'
        /// updates (equal weights) plus the honest shares' noise over the sites.
        #[test]
        fn a_distributed_round_takes_only_the_offers_noise_share_and_releases_the_noised_sum() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(9);
            let (mut m, mut sites, fixed, share) = distributed_round(2, t0, &mut rng);
            let (values, digest) = noised_input(&mut sites[0], &fixed, &share, &mut rng);
            let smaller = fedward_shared::dp::DistributedRelease { site_sigma: share.site_sigma / 2.0, ..share };
            for bad in [distributed_used(None, &share), distributed_used(Some(smaller), &share)] {
                let header = MaskedInputHeader { round: RoundId(1), values: values.len() as u64, digest, privacy: bad };
                let err = m.begin_masked(&sites[0].id, &header).unwrap_err();
                assert_eq!(err.code, RejectCode::PolicyViolation, "{err:?}");
            }
            let header = MaskedInputHeader {
                round: RoundId(1),
                values: values.len() as u64,
                digest,
                privacy: distributed_used(Some(share), &share),
            };
            m.begin_masked(&sites[0].id, &header).unwrap();
            m.finish_masked(t0, &sites[0].id, &header, values).unwrap();
            for s in sites.iter_mut().skip(1) {
                send_noised(&mut m, t0, s, &fixed, &share, &mut rng);
            }
            let req = unmask_request(&drain(&mut m), &site("a"));
            for s in &mut sites {
                let shares = s.client.unmask(&req).unwrap();
                m.handle_secagg_unmasking(t0, &s.id, shares).unwrap();
            }
            let outs = drain(&mut m);
            let cp = checkpoint(&outs).unwrap_or_else(|| panic!("the noised sum is released: {outs:?}"));
            assert_eq!(cp.secure.as_ref().unwrap().total_weight, 3, "equal weights: the sites summed");
            // Each coordinate's noise over the mean: sqrt(3) shares of std sigma C / sqrt(2), over 3.
            let std = 0.5 * (3.0f64 / 2.0).sqrt() / 3.0;
            let all: Vec<&Site> = sites.iter().collect();
            let mean: Vec<f32> = (0..4).map(|i| all.iter().map(|s| s.update[i]).sum::<f32>() / 3.0).collect();
            assert_close(&cp.update, &mean, 6.0 * std);
        }

        /// A sum of fewer sites than the honest ones the shares assume is not released,
        /// whatever the threshold allowed (the configuration refuses such a plan; this is
        /// the machine's own check).
        #[test]
        fn a_distributed_sum_of_fewer_than_min_honest_sites_is_not_released() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(10);
            let (mut m, mut sites, fixed, share) = distributed_round(3, t0, &mut rng);
            m.handle_disconnected(t0, &site("c"));
            for s in sites.iter_mut().take(2) {
                send_noised(&mut m, t0, s, &fixed, &share, &mut rng);
            }
            // Both inputs in, c gone: the step closes without asking anyone to unmask.
            let outs = drain(&mut m);
            assert!(checkpoint(&outs).is_none(), "{outs:?}");
            assert!(!outs.iter().any(|o| matches!(o, Output::SecAggReply { msg, .. } if matches!(**msg, Message::SecAggUnmask(_)))));
            // The waiting sites hear why.
            assert!(matches!(replies(&outs).remove(&site("a")), Some(Message::Reject(r)) if r.code == RejectCode::SecureAggregation));
            let reason = outs.iter().find_map(|o| match o {
                Output::RoundFailed(f) => Some(f.reason.clone()),
                _ => None,
            });
            assert!(reason.as_deref().is_some_and(|r| r.contains("fewer than min_honest 3")), "{reason:?}");
        }

        #[test]
        fn a_site_leaving_before_its_masked_input_is_absent_from_the_sum() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(8);
            let mut m = RoundMachine::new(secure_settings(), manifest(), 0).unwrap();
            let (mut sites, fixed) = through_shares(&mut m, t0, &mut rng);
            m.handle_disconnected(t0, &site("c"));
            for s in sites.iter_mut().take(2) {
                send_masked(&mut m, t0, s, &fixed, &mut rng);
            }
            let outs = drain(&mut m);
            let req = unmask_request(&outs, &site("b"));
            assert_eq!((req.survivors.len(), req.dropped.clone()), (2, vec![site("c")]));
            for s in sites.iter_mut().take(2) {
                let shares = s.client.unmask(&req).unwrap();
                assert_eq!(m.handle_secagg_unmasking(t0, &s.id, shares).unwrap(), Ack { round: RoundId(1) });
            }
            let outs = drain(&mut m);
            let cp = checkpoint(&outs).expect("the round completes");
            let secure = cp.secure.as_ref().unwrap();
            assert_eq!((secure.summed.clone(), secure.dropped.clone()), (vec![site("a"), site("b")], vec![site("c")]));
            assert_eq!(cp.summary.missed, vec![site("c")]);
            let two: Vec<&Site> = sites.iter().take(2).collect();
            assert_close(&cp.update, &weighted_mean(&two), fixed.mean_error_bound(2, 30));
        }

        #[test]
        fn too_few_masked_inputs_fail_the_round_with_the_reason_and_no_sum() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(9);
            let mut m = RoundMachine::new(secure_settings(), manifest(), 0).unwrap();
            let (mut sites, fixed) = through_shares(&mut m, t0, &mut rng);
            send_masked(&mut m, t0, &mut sites[0], &fixed, &mut rng);
            drain(&mut m);
            // b and c never send theirs: at the round's deadline the step closes.
            assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(60)));
            m.handle_timeout(t0 + Duration::from_secs(60));
            let outs = drain(&mut m);
            assert!(checkpoint(&outs).is_none());
            let failure = outs
                .iter()
                .find_map(|o| match o {
                    Output::RoundFailed(f) => Some(f.clone()),
                    _ => None,
                })
                .expect("the round fails");
            assert!(failure.reason.contains("too few sites at masked input: 1, need 2"), "{}", failure.reason);
            // The one waiting site hears why; nothing else leaves the machine.
            match replies(&outs).remove(&site("a")) {
                Some(Message::Reject(r)) => assert_eq!(r.code, RejectCode::SecureAggregation),
                other => panic!("{other:?}"),
            }
            assert!(outs.iter().all(|o| matches!(o, Output::RoundFailed(_) | Output::SecAggReply { .. })));
        }

        #[test]
        fn the_key_step_closes_at_its_deadline_without_the_silent_site() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(10);
            let mut m = RoundMachine::new(secure_settings(), manifest(), 0).unwrap();
            for s in ["a", "b", "c"] {
                m.handle_ready(t0, site(s));
            }
            let outs = drain(&mut m);
            let (trust, creds) = consortium();
            for cred in &creds[..2] {
                let secure = secure_offer(&outs, cred.site().as_str()).secure.unwrap();
                let client = SecAggClient::new(secure.setup, cred.clone(), trust.clone(), &mut rng).unwrap();
                m.handle_secagg_keys(t0, wall(), cred.site(), client.advertise_keys()).unwrap();
            }
            assert!(drain(&mut m).is_empty(), "c may still send");
            assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(30)));
            m.handle_timeout(t0 + Duration::from_secs(30));
            let relayed = replies(&drain(&mut m));
            assert_eq!(relayed.keys().cloned().collect::<Vec<_>>(), vec![site("a"), site("b")]);
            assert!(matches!(&relayed[&site("a")], Message::SecAggRelayedKeys(k) if k.keys.len() == 2));
            // Too late for c now.
            let late =
                SecAggClient::new(secure_offer(&outs, "c").secure.unwrap().setup, creds[2].clone(), trust.clone(), &mut rng).unwrap();
            let refused = m.handle_secagg_keys(t0, wall(), &site("c"), late.advertise_keys()).unwrap_err();
            assert_eq!(refused.code, RejectCode::SecureAggregation);
        }

        #[test]
        fn a_sum_no_honest_sites_can_make_fails_the_round() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(11);
            let mut m = RoundMachine::new(secure_settings(), manifest(), 0).unwrap();
            let (mut sites, fixed) = through_shares(&mut m, t0, &mut rng);
            send_masked(&mut m, t0, &mut sites[0], &fixed, &mut rng);
            send_masked(&mut m, t0, &mut sites[1], &fixed, &mut rng);
            // c lies: a huge first coordinate, far beyond the clip, with weight 1.
            let c = &mut sites[2];
            let mut input = vec![0u64; 5];
            input[0] = 1 << 46;
            input[4] = 1;
            let masked = c.client.masked_input(&input).unwrap();
            let bytes = masked_values_bytes(&masked.values, masked_value_width(48));
            let header =
                MaskedInputHeader { round: RoundId(1), values: 5, digest: masked_values_digest(&bytes), privacy: PrivacyUsed::off() };
            m.begin_masked(&c.id, &header).unwrap();
            m.finish_masked(t0, &c.id, &header, masked.values).unwrap();
            let req = unmask_request(&drain(&mut m), &site("a"));
            for s in &mut sites {
                let shares = s.client.unmask(&req).unwrap();
                m.handle_secagg_unmasking(t0, &s.id, shares).unwrap();
            }
            let outs = drain(&mut m);
            assert!(checkpoint(&outs).is_none());
            let reason = outs.iter().find_map(|o| match o {
                Output::RoundFailed(f) => Some(f.reason.clone()),
                _ => None,
            });
            assert!(reason.as_deref().is_some_and(|r| r.contains("malformed input")), "{reason:?}");
        }

        #[test]
        fn a_masked_input_of_the_wrong_size_is_refused_before_its_bytes() {
            let t0 = Instant::now();
            let mut rng = ChaCha20Rng::seed_from_u64(12);
            let mut m = RoundMachine::new(secure_settings(), manifest(), 0).unwrap();
            through_shares(&mut m, t0, &mut rng);
            let header = MaskedInputHeader { round: RoundId(1), values: 1 << 40, digest: Digest([0; 32]), privacy: PrivacyUsed::off() };
            assert_eq!(m.begin_masked(&site("a"), &header).unwrap_err().code, RejectCode::TooLarge);
            let header = MaskedInputHeader { values: 5, round: RoundId(2), ..header };
            assert_eq!(m.begin_masked(&site("a"), &header).unwrap_err().code, RejectCode::StaleRound);
        }
    }
}
