//! The wire protocol between agent and coordinator: the API boundary between processes.
//!
//! Every exchange is one QUIC bidirectional stream opened by the agent (hospitals only
//! dial out). A stream starts with one control [`Message`] in a length-prefixed bincode 2
//! frame (`u32` little-endian length, then the payload, at most [`MAX_FRAME_LEN`] bytes)
//! and gets one framed answer:
//!
//! | agent sends                          | coordinator answers                          |
//! |--------------------------------------|----------------------------------------------|
//! | `Hello`                              | `Welcome` or `Reject`                        |
//! | `Ready`                              | `RoundOffer` (when a round opens), `Finished` or `Reject` |
//! | `ModelRequest`                       | `Tensors` followed by raw tensor bytes, or `Reject` |
//! | `Update`, then after `Proceed` the raw tensor bytes | `Proceed`, then `Ack`; or `Reject` |
//! | `Decline`                            | `Ack`                                        |
//! | `SecAggKeys` (secure rounds, below)  | `SecAggRelayedKeys` when the key step closes, or `Reject` |
//! | `SecAggShares`                       | `SecAggRelayedShares` when the share step closes, or `Reject` |
//! | `SecAggMasked`, then after `Proceed` the raw masked values | `Proceed`, then `SecAggUnmask` when the input step closes, or `Reject` |
//! | `SecAggUnmasking`                    | `Ack` or `Reject`                            |
//!
//! A secure round (its offer's `secure` is set, see [`SecureRound`] and
//! [`crate::secagg`]) replaces `Update` by four exchanges, each a stream the agent opens
//! and whose answer the coordinator holds until the step closes (every site answered, or
//! the step's deadline): keys (right after the offer is accepted), shares, then, after
//! training, the masked input, and the unmasking shares. A masked input's values, like
//! tensors, never travel inside a frame: [`MaskedInputHeader`] declares how many, then
//! as many little-endian integers follow, each in the fewest whole bytes that hold the
//! round's modulus ([`masked_value_width`]: 8 bytes at `2^64`, 6 at `2^48`).
//!
//! Tensors never travel inside a frame: a frame declares them ([`TensorSpec`]: name,
//! shape, blake3 digest) and the raw little-endian f32 bytes follow, tensor after tensor
//! in the declared order, so either side can read straight into its final buffer.
//! This module is pure: it encodes and decodes bytes and never touches a socket.

use serde::{Deserialize, Serialize};

use crate::codec::UpdateEncoding;
use crate::dp::{site_sigma_for, DistributedRelease, Release, ScoreRelease};
use crate::plan::{PrivacyMode, PrivacyPlan, TrainingPlan};
use crate::secagg::{
    EncryptedShares, FixedPoint, RelayedShares, RoundSetup, SecAggError, SignedKeys, UnmaskRequest, UnmaskingShares, MAX_SITES,
    MAX_VECTOR_LEN,
};
use crate::tensor::{checked_element_count, element_count, Digest, Tensor, TensorError, TensorSpec};

pub use crate::ids::{RoundId, SiteId, SiteIdError, ALPN};
/// Version carried in `Hello`; the coordinator refuses any other. 2: `Proceed` before an
/// update's bytes; 3: `Welcome` lists the updates accepted from the site; 4: an update's
/// metrics may be withheld and a decline carries only its reason code; 5: certificate
/// renewal over the connection; 6: `Finished` carries the final model's manifest, `Hello` the
/// site's declared budget, offers and update headers the update's encoding; 7: the training
/// plan carries FedProx's `prox_mu`, and secure aggregation (`RoundOffer::secure` and the
/// `SecAgg*` messages); 8: distributed DP (`PrivacyMode::Distributed`, the noise share in
/// `PrivacyUsed`) and masked values in the fewest bytes their modulus needs.
pub const PROTOCOL_VERSION: u32 = 9;
/// The longest software name a `Hello` may carry.
pub const MAX_SOFTWARE_LEN: usize = 64;
/// Hard limit on one control frame's payload.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Hard limit on the values of one tensor a peer may declare (1 GiB of f32).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 28;
/// QUIC application error code the coordinator closes a refused connection with.
pub const CLOSE_REFUSED: u32 = 0x10;
/// QUIC application error code for a clean goodbye.
pub const CLOSE_NORMAL: u32 = 0;
/// QUIC application error code the coordinator closes a site's older connection with when
/// the site connects again: the newer connection wins. A live agent that receives it
/// shares its site's identity with another agent, which no retry resolves.
pub const CLOSE_REPLACED: u32 = 0x11;

/// Optional features a peer supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Capability {
    /// Keeps the last global model and fetches only the tensors that changed.
    ModelCache,
    /// Can run DP-SGD inside local training.
    RecordLevelDp,
    /// Can clip and noise its update.
    SiteLevelDp,
}

/// Every control message of the protocol.
// An offer (with its secure-aggregation setup) is the largest variant by a few hundred
// bytes; a message is decoded, handled and dropped one at a time per stream, never held
// in bulk, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Ready(Ready),
    RoundOffer(RoundOffer),
    Finished(Finished),
    ModelRequest(ModelRequest),
    Tensors(Vec<TensorSpec>),
    Update(UpdateHeader),
    Decline(Decline),
    Ack(Ack),
    Reject(Reject),
    /// The update's header is admitted and an upload slot is held for it: send the bytes.
    /// Until then an agent sends nothing after its header, so a coordinator with many sites
    /// waiting buffers none of their updates.
    Proceed(Ack),
    /// The agent renews its certificate: a signing request for a key it just made.
    Renew(RenewRequest),
    /// The coordinator's answer to [`Message::Renew`].
    Renewed(Renewed),
    /// Secure round, step 1: the site's signed public keys for the round.
    SecAggKeys(SignedKeys),
    /// The answer to `SecAggKeys` once the key step closes: every site's signed keys.
    SecAggRelayedKeys(RelayedKeys),
    /// Step 2: the site's shares, encrypted to each neighbour.
    SecAggShares(EncryptedShares),
    /// The answer to `SecAggShares` once the share step closes: the shares addressed to
    /// this site.
    SecAggRelayedShares(RelayedShares),
    /// Step 3: a masked input's header; after `Proceed` its values follow as raw bytes.
    SecAggMasked(MaskedInputHeader),
    /// The answer to `SecAggMasked` once the input step closes: who survived and who
    /// dropped.
    SecAggUnmask(UnmaskRequest),
    /// Step 4: the site's revealed shares; answered by `Ack`.
    SecAggUnmasking(UnmaskingShares),
}

/// The signed keys of every site of a secure round's first step, relayed to each of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayedKeys {
    pub round: RoundId,
    /// At most [`MAX_SITES`] entries (the frame limit bounds them further: about 300 sites
    /// with 2 KiB certificate chains).
    pub keys: Vec<SignedKeys>,
}

/// A masked input's header: `values` little-endian integers follow (after `Proceed`), each
/// below `2^modulus_bits` and [`masked_value_width`] bytes long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskedInputHeader {
    pub round: RoundId,
    /// How many values follow: the round's `vector_len`, checked before any allocation.
    pub values: u64,
    /// blake3 of the values' bytes as sent, checked on receipt (the update digest the
    /// ledgers record for this release).
    pub digest: Digest,
    /// The DP parameters the site used for the update inside the mask: public
    /// parameters, accounted like an update header's.
    pub privacy: PrivacyUsed,
}

/// Why a masked input's declared size was refused.
#[derive(Debug, thiserror::Error)]
pub enum MaskedInputError {
    #[error("masked input declares {got} values; this round sums {expected}")]
    Length { expected: usize, got: u64 },
    #[error("masked input of {values} values exceeds the {max}-byte limit")]
    TooLarge { values: u64, max: usize },
    #[error("masked input digest mismatch (declared {declared}, received {actual})")]
    DigestMismatch { declared: String, actual: String },
    #[error("{0} masked input bytes are not whole values")]
    Ragged(usize),
}

impl MaskedInputHeader {
    /// The bytes that follow, `width` bytes a value ([`masked_value_width`] of the round's
    /// modulus), checked against the round's vector length and `max_bytes` before anything
    /// is allocated for them.
    pub fn payload_bytes(&self, expected_len: usize, width: usize, max_bytes: usize) -> Result<usize, MaskedInputError> {
        if self.values != expected_len as u64 {
            return Err(MaskedInputError::Length { expected: expected_len, got: self.values });
        }
        let bytes = usize::try_from(self.values)
            .ok()
            .filter(|&n| n <= MAX_VECTOR_LEN)
            .and_then(|n| n.checked_mul(width.clamp(1, 8)))
            .filter(|&b| b <= max_bytes)
            .ok_or(MaskedInputError::TooLarge { values: self.values, max: max_bytes })?;
        Ok(bytes)
    }
}

/// Bytes one masked value takes on the wire modulo `2^modulus_bits`: the fewest whole
/// bytes that hold `2^modulus_bits - 1` (1 to 8). A value's bits above the modulus cannot
/// travel, so the width costs nothing; the receiver still checks each value is below it.
pub fn masked_value_width(modulus_bits: u32) -> usize {
    modulus_bits.div_ceil(8).clamp(1, 8) as usize
}

/// The wire bytes of masked values: each little-endian in its first `width` bytes
/// ([`masked_value_width`]; the values must be below `2^(8 width)`).
pub fn masked_values_bytes(values: &[u64], width: usize) -> Vec<u8> {
    let width = width.clamp(1, 8);
    let mut out = Vec::with_capacity(values.len() * width);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    out
}

/// The digest a [`MaskedInputHeader`] declares for these bytes.
pub fn masked_values_digest(bytes: &[u8]) -> Digest {
    Digest(*blake3::hash(bytes).as_bytes())
}

/// Masked values from their wire bytes, `width` bytes each (sized by
/// [`MaskedInputHeader::payload_bytes`]), after checking the declared digest.
pub fn masked_values_from_bytes(header: &MaskedInputHeader, width: usize, bytes: &[u8]) -> Result<Vec<u64>, MaskedInputError> {
    let width = width.clamp(1, 8);
    if !bytes.len().is_multiple_of(width) {
        return Err(MaskedInputError::Ragged(bytes.len()));
    }
    let actual = masked_values_digest(bytes);
    if actual != header.digest {
        return Err(MaskedInputError::DigestMismatch { declared: header.digest.short(), actual: actual.short() });
    }
    Ok(bytes
        .chunks_exact(width)
        .map(|c| {
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(c);
            u64::from_le_bytes(v)
        })
        .collect())
}

/// How a secure round runs, as its offer states it: every participant builds the same
/// [`RoundSetup`] and [`FixedPoint`] from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecureRound {
    /// Round, parameters, vector length (the trainable values plus the weight) and the
    /// context ([`SecureRound::context`]).
    pub setup: RoundSetup,
    /// Which try at this round (from 1): a retried round gets another context, so keys
    /// signed for one try never verify in another.
    pub attempt: u32,
    /// The L2 bound every site clips its update to; each coordinate is also clamped to it
    /// by the fixed-point encoding.
    pub clip: f32,
    /// The most one site's example count weighs (1 under equal weighting).
    pub max_weight: u64,
    /// The most sites that can be summed (the enrolled sites): the encoding's scale makes
    /// a sum of that many unable to wrap.
    pub max_sites: u32,
    /// Seconds each short step (keys, shares, unmasking) waits for the sites.
    pub step_deadline_secs: u64,
}

impl SecureRound {
    /// What binds a round's keys to its offer: SHA-256 of the round, the try, the model it
    /// starts from and the encoding. Every site computes it from the offer itself.
    pub fn context(round: RoundId, attempt: u32, model_digest: &Digest, clip: f32, max_weight: u64, max_sites: u32) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"fedward-secagg-offer-v1");
        h.update(round.0.to_be_bytes());
        h.update(attempt.to_be_bytes());
        h.update(model_digest.0);
        h.update(clip.to_bits().to_be_bytes());
        h.update(max_weight.to_be_bytes());
        h.update(max_sites.to_be_bytes());
        h.finalize().into()
    }

    /// Under a distributed plan, the noise share every site adds and how it quantizes,
    /// the same at each site and computed from the offer alone: units
    /// [`FixedPoint::noise_units`], the per-site sigma [`site_sigma_for`] (the variance split
    /// so that `min_honest` shares carry the plan's noise multiplier), the deterministic
    /// rounding bound, `max_sites` as the sites. `None` under any other plan.
    pub fn distributed_release(&self, plan: &PrivacyPlan) -> Result<Option<DistributedRelease>, SecAggError> {
        let PrivacyPlan::Distributed { noise_multiplier, clip_norm, min_honest } = *plan else { return Ok(None) };
        let fixed = self.fixed_point()?;
        let dim = self.setup.vector_len.saturating_sub(1) as u64;
        let units = fixed.noise_units(clip_norm, dim);
        let release = DistributedRelease {
            site_sigma: site_sigma_for(noise_multiplier, clip_norm, units, min_honest),
            scale: units,
            modulus_bits: self.setup.params.modulus_bits,
            sites: u64::from(self.max_sites),
            min_honest,
            clip_norm,
            dim,
            rounding_beta: None,
        };
        release.validate().map_err(|e| SecAggError::Params(format!("the distributed noise share: {e}")))?;
        Ok(Some(release))
    }

    /// The fixed-point encoding the offer states.
    pub fn fixed_point(&self) -> Result<FixedPoint, SecAggError> {
        FixedPoint::new(self.setup.params.modulus_bits, self.clip, self.max_weight, self.max_sites as usize)
    }

    /// What a site checks of a secure offer before it takes part: the setup valid and for
    /// this round, the vector as long as the trainable tensors plus the weight, the context
    /// its own computation from the offer, and an encoding that exists. Returns the
    /// encoding.
    pub fn check(&self, offer: &RoundOffer) -> Result<FixedPoint, SecAggError> {
        let bad = |m: String| Err(SecAggError::Params(m));
        self.setup.validate()?;
        if self.setup.round != offer.round {
            return bad(format!("secure setup for round {}, offered round {}", self.setup.round, offer.round));
        }
        if self.max_sites == 0 || self.max_sites as usize > MAX_SITES {
            return bad(format!("max_sites must be 1 to {MAX_SITES}, got {}", self.max_sites));
        }
        let len = offer.trainable_specs().try_fold(0usize, |acc, s| acc.checked_add(element_count(&s.shape)));
        if len.map(FixedPoint::encoded_len) != Some(self.setup.vector_len) {
            return bad(format!("secure setup sums {} values; the offered plan trains {len:?} (plus the weight)", self.setup.vector_len));
        }
        let context = Self::context(offer.round, self.attempt, &offer.model_digest, self.clip, self.max_weight, self.max_sites);
        if context != self.setup.context {
            return bad("the secure setup's context is not this offer's".into());
        }
        self.fixed_point()
    }
}

/// A site's request for a new certificate, sent over its authenticated connection before
/// the one it presents expires. The request must name the site the connection is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// PEM, at most [`MAX_CSR_LEN`] bytes.
    pub csr_pem: String,
}

/// The largest signing request a coordinator reads.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// A renewed certificate, or word that an admin must approve it first (`pki approve`;
/// the agent asks again with the same request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Renewed {
    /// The new certificate and the issuing CA's (PEM); `None` while pending approval.
    pub chain_pem: Option<String>,
}

impl Message {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Welcome(_) => "welcome",
            Self::Ready(_) => "ready",
            Self::RoundOffer(_) => "round-offer",
            Self::Finished(_) => "finished",
            Self::ModelRequest(_) => "model-request",
            Self::Tensors(_) => "tensors",
            Self::Update(_) => "update",
            Self::Decline(_) => "decline",
            Self::Ack(_) => "ack",
            Self::Reject(_) => "reject",
            Self::Proceed(_) => "proceed",
            Self::Renew(_) => "renew",
            Self::Renewed(_) => "renewed",
            Self::SecAggKeys(_) => "secagg-keys",
            Self::SecAggRelayedKeys(_) => "secagg-relayed-keys",
            Self::SecAggShares(_) => "secagg-shares",
            Self::SecAggRelayedShares(_) => "secagg-relayed-shares",
            Self::SecAggMasked(_) => "secagg-masked",
            Self::SecAggUnmask(_) => "secagg-unmask",
            Self::SecAggUnmasking(_) => "secagg-unmasking",
        }
    }
}

/// The agent's first message on a new connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Free text such as `fedward-agent 0.1.0`: at most [`MAX_SOFTWARE_LEN`] bytes of
    /// printable characters (it is logged).
    pub software: String,
    pub capabilities: Vec<Capability>,
    /// The budget the site keeps (its `[budget]`), for the consortium's dashboard. Only the
    /// site enforces it: the coordinator shows it and never relies on it.
    pub budget: Option<DeclaredBudget>,
}

/// A site's privacy budget as it declares it: at most `epsilon` at `delta`, over the
/// federation's whole life.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeclaredBudget {
    pub epsilon: f64,
    pub delta: f64,
}

impl Hello {
    /// What a coordinator checks of a hello before it logs or answers anything else.
    pub fn check(&self) -> Result<(), String> {
        if self.software.len() > MAX_SOFTWARE_LEN {
            return Err(format!("the software name is {} bytes; at most {MAX_SOFTWARE_LEN}", self.software.len()));
        }
        if self.software.chars().any(char::is_control) {
            return Err("the software name holds control characters".into());
        }
        if let Some(b) = self.budget {
            if !(b.epsilon.is_finite() && b.epsilon > 0.0 && b.delta.is_finite() && b.delta > 0.0 && b.delta < 1.0) {
                return Err(format!("the declared budget (epsilon {}, delta {}) is not a budget", b.epsilon, b.delta));
            }
        }
        Ok(())
    }
}

/// The coordinator's admission of a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The identity the coordinator read from the agent's certificate.
    pub site: SiteId,
    pub protocol_version: u32,
    /// Rounds completed so far and rounds planned.
    pub completed_rounds: u64,
    pub total_rounds: u64,
    /// Every update the coordinator's ledger holds as accepted from this site. Each was
    /// recorded in the site's ledger before it was sent, so one the site's ledger lacks
    /// means that ledger was lost, replaced or restored from an older copy: the agent stops
    /// before it spends again on a budget it can no longer count.
    pub accepted: Vec<AcceptedUpdate>,
}

/// An update the coordinator accepted, as [`Welcome`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AcceptedUpdate {
    pub round: RoundId,
    pub update_digest: Digest,
}

/// The agent is ready for the next round; `have_model` is the digest of the global model
/// it holds, if any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub have_model: Option<Digest>,
}

/// The consortium's limits on the privacy of updates it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPolicy {
    /// The DP mode every update must use (`off` only when the consortium disabled DP).
    pub mode: PrivacyMode,
    /// Smallest noise multiplier accepted.
    pub min_noise_multiplier: f64,
    /// Largest clipping norm accepted (per example for record-level, per update for
    /// site-level).
    pub max_clip_norm: f64,
}

/// An invitation to train one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundOffer {
    pub round: RoundId,
    /// Digest of the whole global model (see [`crate::tensor::manifest_digest`]).
    pub model_digest: Digest,
    /// Every tensor of the global model, so the agent can fetch only what changed.
    pub manifest: Vec<TensorSpec>,
    pub plan: TrainingPlan,
    pub policy: PrivacyPolicy,
    /// Seconds left before the coordinator stops waiting for updates of this round.
    pub deadline_secs: u64,
    pub total_rounds: u64,
    /// How the update's tensors are to be sent (quantized after the privacy step).
    pub update_encoding: UpdateEncoding,
    /// Set when the round is summed under secure aggregation: the site sends no `Update`
    /// but the four `SecAgg*` steps, and refuses the round if it cannot honour this.
    pub secure: Option<SecureRound>,
    /// Federated model selection (protocol 9): the site scores the offered model on its own
    /// validation split and sends the score in its update header ([`UpdateHeader::score`]).
    pub scoring: Option<Scoring>,
}

/// What an offer asks of a site's score of the offered model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scoring {
    /// Under a DP plan: the score's noise std over its sensitivity (see
    /// [`crate::dp::ScoreRelease`]); ignored under `off`.
    pub noise_multiplier: f64,
    /// The federation's final scoring round: the site trains nothing and sends a header
    /// with no tensors, only its score of the last global model.
    pub only: bool,
}

/// A site's score of the offered global model on its validation split: the number it got
/// right (noised under a DP plan, so possibly fractional or out of range) out of
/// `examples` (coarsened under a DP plan, like [`UpdateHeader::num_examples`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationScore {
    pub correct: f64,
    pub examples: u64,
}

impl RoundOffer {
    /// The manifest's entries for the tensors the plan trains: what an update carries.
    pub fn trainable_specs(&self) -> impl Iterator<Item = &TensorSpec> {
        self.manifest.iter().filter(|s| self.plan.trainable_tensors.contains(&s.name))
    }
}

/// The federation has run all its rounds. The final global model's manifest comes with
/// it, so an agent whose cached copy is older asks for what changed (`ModelRequest` with
/// `round` = `completed_rounds`) before it leaves: the hospital's service must serve the
/// model the federation ended with, not the one of the round before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub completed_rounds: u64,
    pub model_digest: Digest,
    pub manifest: Vec<TensorSpec>,
}

/// Asks for the named tensors of the round's global model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    pub round: RoundId,
    pub names: Vec<String>,
}

/// Aggregate figures of local training; never anything per record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    /// Mean training loss over the round's local steps.
    pub train_loss: f64,
    /// Local validation split figures, when the site has one.
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub val_macro_f1: Option<f64>,
    /// Wall-clock seconds spent training.
    pub train_secs: f64,
}

/// The DP parameters a site actually used for an update, and what it spent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyUsed {
    pub mode: PrivacyMode,
    pub noise_multiplier: f64,
    /// Per-example clip (record-level) or update clip (site-level).
    pub clip_norm: f64,
    /// Record-level only: Poisson sampling rate and number of noisy steps.
    pub sampling_rate: f64,
    pub steps: u64,
    /// Record-level only: the bound the final update was clipped to.
    pub update_clip_norm: f64,
    /// The site's cumulative epsilon at `delta` after this release.
    pub epsilon_after: f64,
    pub delta: f64,
    /// Distributed DP only: the noise share the site added and how it quantized (what
    /// the epsilon is computed from). `None` in every other mode.
    pub distributed: Option<DistributedRelease>,
    /// The score of the offered model released with the update (counted in
    /// `epsilon_after`), if any.
    pub score: Option<ScoreRelease>,
}

impl PrivacyUsed {
    /// The release this update declares, for an accountant.
    pub fn release(&self) -> Release {
        Release {
            mode: self.mode,
            noise_multiplier: self.noise_multiplier,
            sampling_rate: self.sampling_rate,
            steps: self.steps,
            distributed: self.distributed,
            score: self.score,
        }
    }

    /// What an update without differential privacy declares.
    pub fn off() -> Self {
        Self {
            mode: PrivacyMode::Off,
            noise_multiplier: 0.0,
            clip_norm: 0.0,
            sampling_rate: 0.0,
            steps: 0,
            update_clip_norm: 0.0,
            epsilon_after: f64::INFINITY,
            delta: 0.0,
            distributed: None,
            score: None,
        }
    }
}

/// A site's update for a round; the raw bytes of `tensors` follow on the same stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    pub round: RoundId,
    /// Examples behind the update: the FedAvg weight. Under a DP plan, coarsened
    /// ([`crate::dp::coarse_count`]) unless the site shares its metrics.
    pub num_examples: u64,
    /// Local training figures; `None` (withheld) under a DP plan unless the site opts in
    /// (`share_metrics`): exact losses and accuracies are outside the DP guarantee.
    pub metrics: Option<LocalMetrics>,
    /// The delta of every trainable tensor, in this order. Digests are of the values as
    /// decoded, whatever `encoding` carries them.
    pub tensors: Vec<TensorSpec>,
    pub privacy: PrivacyUsed,
    /// How the tensors' bytes follow (the offer's `update_encoding`).
    pub encoding: UpdateEncoding,
    /// The site's score of the offered model, when the offer asked for one and the site
    /// has a validation split.
    pub score: Option<ValidationScore>,
}

/// Why a site does not take part in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// The round would take the site past its own privacy budget.
    BudgetExhausted,
    /// The offered plan is outside what the site accepts.
    PlanUnacceptable,
    /// Local training failed.
    TrainingFailed,
    /// The global model does not fit the site's model.
    ModelMismatch,
    /// The site could not finish training before the round's deadline.
    DeadlineTooShort,
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BudgetExhausted => "the round would exceed the site's privacy budget",
            Self::PlanUnacceptable => "the offered plan is outside what the site accepts",
            Self::TrainingFailed => "local training failed",
            Self::ModelMismatch => "the global model does not fit the site's model",
            Self::DeadlineTooShort => "the site cannot finish training before the deadline",
        })
    }
}

/// A site's "not this round": the reason code only. The detail stays in the site's own
/// log, since text built from local errors could carry anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decline {
    pub round: RoundId,
    pub reason: DeclineReason,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub round: RoundId,
}

/// Why the coordinator refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    UnsupportedVersion,
    NotEnrolled,
    AlreadyConnected,
    Malformed,
    UnexpectedMessage,
    StaleRound,
    NotOffered,
    DuplicateUpdate,
    UnknownTensor,
    MissingTensor,
    ShapeMismatch,
    NonFinite,
    DigestMismatch,
    PolicyViolation,
    InvalidWeight,
    TooLarge,
    ShuttingDown,
    /// The update's L2 norm is above the consortium's bound (under `over_norm = "refuse"`).
    NormTooLarge,
    /// A transfer ran below the minimum rate or past its time.
    TooSlow,
    /// This coordinator issues no certificates (no `[renewal]` issuing CA), or the request
    /// could not be signed.
    RenewalUnavailable,
    /// A secure aggregation message was refused, or the secure round failed.
    SecureAggregation,
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::UnsupportedVersion => "unsupported-version",
            Self::NotEnrolled => "not-enrolled",
            Self::AlreadyConnected => "already-connected",
            Self::Malformed => "malformed",
            Self::UnexpectedMessage => "unexpected-message",
            Self::StaleRound => "stale-round",
            Self::NotOffered => "not-offered",
            Self::DuplicateUpdate => "duplicate-update",
            Self::UnknownTensor => "unknown-tensor",
            Self::MissingTensor => "missing-tensor",
            Self::ShapeMismatch => "shape-mismatch",
            Self::NonFinite => "non-finite",
            Self::DigestMismatch => "digest-mismatch",
            Self::PolicyViolation => "policy-violation",
            Self::InvalidWeight => "invalid-weight",
            Self::TooLarge => "too-large",
            Self::ShuttingDown => "shutting-down",
            Self::NormTooLarge => "norm-too-large",
            Self::TooSlow => "too-slow",
            Self::RenewalUnavailable => "renewal-unavailable",
            Self::SecureAggregation => "secure-aggregation",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
}

impl Reject {
    /// A refusal; the message is cut to [`MAX_REJECT_MESSAGE`] bytes, because it may quote
    /// what a peer sent (a tensor name, a shape) and ends up in logs and the round history.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self { code, message: clip_text(message.into(), MAX_REJECT_MESSAGE) }
    }
}

/// The longest message a [`Reject`] made here carries, in bytes.
pub const MAX_REJECT_MESSAGE: usize = 512;

/// `text` cut to at most `max` bytes at a character boundary, with "…" when cut.
pub fn clip_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame has {0} trailing bytes after the message")]
    Trailing(usize),
}

/// Encoding failed (only possible for messages over the frame limit).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge { len: usize, max: usize },
    #[error("encode: {0}")]
    Bincode(String),
}

fn bincode_config() -> impl bincode::config::Config {
    // Varint integers and a decode-side byte limit, so a hostile length inside a frame
    // cannot allocate beyond the frame.
    bincode::config::standard().with_little_endian().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes a message as one frame: `u32` LE length, then the bincode payload.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let payload = bincode::serde::encode_to_vec(msg, bincode_config()).map_err(|e| EncodeError::Bincode(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads a frame header; fails before any allocation when the length is over the limit.
pub fn frame_len(header: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    Ok(len)
}

/// Decodes one frame's payload (without the length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<Message, DecodeError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let (msg, used): (Message, usize) =
        bincode::serde::decode_from_slice(payload, bincode_config()).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::Trailing(payload.len() - used));
    }
    Ok(msg)
}

/// Decodes the first frame in `buf`: `Ok(None)` when more bytes are needed, else the
/// message and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(header) = buf.get(..4) else { return Ok(None) };
    let len = frame_len([header[0], header[1], header[2], header[3]])?;
    let Some(payload) = buf.get(4..4 + len) else { return Ok(None) };
    Ok(Some((decode_payload(payload)?, 4 + len)))
}

/// Checks a peer's declared tensor list against the limits and returns the total number
/// of payload bytes that follow. Call before allocating anything for the tensors.
pub fn declared_payload_bytes(specs: &[TensorSpec], max_total_bytes: usize) -> Result<usize, TensorStreamError> {
    let mut total = 0usize;
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            return Err(TensorStreamError::DuplicateName(s.name.clone()));
        }
        let n = checked_element_count(&s.shape)
            .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| TensorStreamError::TooLarge { name: s.name.clone(), shape: s.shape.clone() })?;
        total = total.checked_add(n * 4).ok_or(TensorStreamError::TotalTooLarge { max: max_total_bytes })?;
    }
    if total > max_total_bytes {
        return Err(TensorStreamError::TotalTooLarge { max: max_total_bytes });
    }
    Ok(total)
}

/// Why received tensor bytes were refused.
#[derive(Debug, thiserror::Error)]
pub enum TensorStreamError {
    #[error("tensor {name} declares shape {shape:?}, over the per-tensor limit")]
    TooLarge { name: String, shape: Vec<usize> },
    #[error("declared tensors exceed the {max}-byte limit")]
    TotalTooLarge { max: usize },
    #[error("tensor {0} is declared twice")]
    DuplicateName(String),
    #[error("tensor {name}: digest mismatch (declared {declared}, received {actual})")]
    DigestMismatch { name: String, declared: String, actual: String },
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
}

/// Bytes `specs` take on the wire in `encoding` (bound them with
/// [`declared_payload_bytes`] first).
pub fn encoded_payload_bytes(specs: &[TensorSpec], encoding: UpdateEncoding) -> usize {
    specs.iter().map(|s| encoding.encoded_len(&s.shape)).sum()
}

/// Completes a tensor received in a quantized `encoding`: decodes its wire `bytes` into
/// `t` (from [`alloc_tensor`]) and checks the declared digest, which is of the decoded
/// values. Non-finite values (a lying scale) are left for the receiver's own policy.
pub fn decode_tensor(spec: &TensorSpec, encoding: UpdateEncoding, bytes: &[u8], t: &mut Tensor) -> Result<(), TensorStreamError> {
    encoding.decode(&spec.shape, bytes, t.data_mut())?;
    let actual = t.digest();
    if actual != spec.digest {
        return Err(TensorStreamError::DigestMismatch { name: spec.name.clone(), declared: spec.digest.short(), actual: actual.short() });
    }
    Ok(())
}

/// A zeroed buffer for a declared tensor; the raw bytes are read straight into it via
/// [`tensor_bytes_mut`]. Call [`declared_payload_bytes`] first.
pub fn alloc_tensor(spec: &TensorSpec) -> Tensor {
    Tensor::zeros(spec.shape.clone())
}

/// The tensor's storage as bytes to read little-endian f32 into (native order is fixed
/// up by [`finish_tensor`] on big-endian hosts).
pub fn tensor_bytes_mut(t: &mut Tensor) -> &mut [u8] {
    bytemuck::cast_slice_mut(t.data_mut())
}

/// Completes a received tensor: fixes byte order and checks the declared digest.
/// Non-finite values are left for the receiver's own policy.
pub fn finish_tensor(spec: &TensorSpec, t: &mut Tensor) -> Result<(), TensorStreamError> {
    if cfg!(target_endian = "big") {
        for v in t.data_mut() {
            *v = f32::from_bits(u32::from_le(v.to_bits()));
        }
    }
    let actual = t.digest();
    if actual != spec.digest {
        return Err(TensorStreamError::DigestMismatch { name: spec.name.clone(), declared: spec.digest.short(), actual: actual.short() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PrivacyPlan, Trainable};
    use crate::secagg::{EncryptedShare, RevealedShare, SecAggParams};
    use crate::tensor::TensorSet;

    #[test]
    fn peer_text_is_bounded_before_it_is_logged_or_stored() {
        let hello =
            |software: &str| Hello { protocol_version: PROTOCOL_VERSION, software: software.into(), capabilities: vec![], budget: None };
        assert!(hello("fedward-agent 0.1.0").check().is_ok());
        assert!(hello(&"x".repeat(MAX_SOFTWARE_LEN + 1)).check().unwrap_err().contains("at most 64"));
        assert!(hello("agent\nERROR forged log line").check().is_err());
        let declared = |epsilon, delta| Hello { budget: Some(DeclaredBudget { epsilon, delta }), ..hello("a") }.check();
        assert!(declared(8.0, 1e-5).is_ok());
        for (epsilon, delta) in
            [(f64::NAN, 1e-5), (f64::INFINITY, 1e-5), (0.0, 1e-5), (-1.0, 1e-5), (8.0, 0.0), (8.0, 1.0), (8.0, f64::NAN)]
        {
            assert!(declared(epsilon, delta).unwrap_err().contains("not a budget"), "{epsilon} {delta}");
        }
        let long = Reject::new(RejectCode::UnknownTensor, format!("tensor {} is not trainable", "é".repeat(10_000)));
        assert!(long.message.len() <= MAX_REJECT_MESSAGE && long.message.ends_with('…'), "{}", long.message.len());
        assert_eq!(Reject::new(RejectCode::Malformed, "short").message, "short");
    }

    fn spec() -> TensorSpec {
        let t = Tensor::new(vec![2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap();
        TensorSpec { name: "classifier.weight".into(), shape: vec![2, 2], digest: t.digest() }
    }

    fn plan() -> TrainingPlan {
        TrainingPlan {
            local_epochs: 1,
            batch_size: 16,
            optimizer: Default::default(),
            learning_rate: 5e-5,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            max_seq_len: 64,
            trainable: Trainable::TopLayers(2),
            trainable_tensors: vec!["classifier.weight".into()],
            seed: 7,
            privacy: PrivacyPlan::RecordLevel { noise_multiplier: 1.1, clip_norm: 1.0, sampling_rate: 0.05, update_clip_norm: 5.0 },
            prox_mu: 0.25,
        }
    }

    fn all_messages() -> Vec<Message> {
        let site = SiteId::new("st-marys").unwrap();
        let digest = spec().digest;
        vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                software: "fedward-agent 0.1.0".into(),
                capabilities: vec![Capability::ModelCache, Capability::RecordLevelDp],
                budget: Some(DeclaredBudget { epsilon: 8.0, delta: 1e-5 }),
            }),
            Message::Welcome(Welcome {
                site: site.clone(),
                protocol_version: 1,
                completed_rounds: 2,
                total_rounds: 5,
                accepted: vec![AcceptedUpdate { round: RoundId(1), update_digest: digest }],
            }),
            Message::Ready(Ready { have_model: Some(digest) }),
            Message::RoundOffer(offer()),
            Message::RoundOffer(secure_offer()),
            Message::Finished(Finished { completed_rounds: 5, model_digest: digest, manifest: vec![] }),
            Message::ModelRequest(ModelRequest { round: RoundId(3), names: vec!["a".into(), "b".into()] }),
            Message::Tensors(vec![spec()]),
            Message::Proceed(Ack { round: RoundId(3) }),
            Message::Update(UpdateHeader {
                score: None,
                round: RoundId(3),
                num_examples: 412,
                metrics: Some(LocalMetrics { train_loss: 0.4, val_accuracy: Some(0.9), ..Default::default() }),
                tensors: vec![spec()],
                privacy: PrivacyUsed::off(),
                encoding: UpdateEncoding::F32,
            }),
            Message::Decline(Decline { round: RoundId(3), reason: DeclineReason::BudgetExhausted }),
            Message::Ack(Ack { round: RoundId(3) }),
            Message::Reject(Reject::new(RejectCode::StaleRound, "update for round 2, round 3 is open")),
            Message::SecAggKeys(keys()),
            Message::SecAggRelayedKeys(RelayedKeys { round: RoundId(3), keys: vec![keys(), keys()] }),
            Message::SecAggShares(EncryptedShares { round: RoundId(3), from: site.clone(), shares: vec![share()] }),
            Message::SecAggRelayedShares(RelayedShares { round: RoundId(3), to: site.clone(), shares: vec![share()] }),
            Message::SecAggMasked(MaskedInputHeader {
                round: RoundId(3),
                values: 5,
                digest: masked_values_digest(&masked_values_bytes(&[1, 2, 3, 4, 5], 8)),
                privacy: PrivacyUsed::off(),
            }),
            Message::SecAggUnmask(UnmaskRequest { round: RoundId(3), survivors: vec![site.clone()], dropped: vec![] }),
            Message::SecAggUnmasking(UnmaskingShares {
                round: RoundId(3),
                from: site.clone(),
                self_mask: vec![RevealedShare { of: site, share: [7; 32] }],
                mask_key: vec![],
            }),
        ]
    }

    fn keys() -> SignedKeys {
        SignedKeys {
            round: RoundId(3),
            site: SiteId::new("st-marys").unwrap(),
            cipher_pk: [1; 32],
            mask_pk: [2; 32],
            cert_chain: vec![vec![0x30; 600], vec![0x30; 500]],
            signature: vec![9; 71],
        }
    }

    fn share() -> EncryptedShare {
        EncryptedShare {
            from: SiteId::new("st-marys").unwrap(),
            to: SiteId::new("st-johns").unwrap(),
            ciphertext: vec![5; crate::secagg::SHARE_CIPHERTEXT_LEN],
        }
    }

    /// A secure offer as the coordinator makes it: 4 trainable values plus the weight.
    /// Round 3 of 5 offering `spec()` under `plan()`.
    fn offer() -> RoundOffer {
        RoundOffer {
            scoring: None,
            round: RoundId(3),
            model_digest: spec().digest,
            manifest: vec![spec()],
            plan: plan(),
            policy: PrivacyPolicy { mode: PrivacyMode::RecordLevel, min_noise_multiplier: 0.8, max_clip_norm: 2.0 },
            deadline_secs: 600,
            total_rounds: 5,
            update_encoding: UpdateEncoding::F32,
            secure: None,
        }
    }

    /// [`offer`] under secure aggregation.
    fn secure_offer() -> RoundOffer {
        let digest = spec().digest;
        let params = SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 48 };
        let context = SecureRound::context(RoundId(3), 1, &digest, 5.0, 1000, 3);
        RoundOffer {
            secure: Some(SecureRound {
                setup: RoundSetup::new(RoundId(3), params, 5).unwrap().with_context(context),
                attempt: 1,
                clip: 5.0,
                max_weight: 1000,
                max_sites: 3,
                step_deadline_secs: 60,
            }),
            ..offer()
        }
    }

    /// The noise share a distributed plan implies splits the variance among the honest
    /// sites: `min_honest` shares carry at least the plan's sigma C (in the share's units)
    /// and no more than the grid's rounding adds; the units divide the sum's scale by a
    /// power of two and keep rounding small against the clip.
    #[test]
    fn a_distributed_plan_splits_the_noise_variance_among_the_honest_sites() {
        let secure = secure_offer().secure.unwrap();
        assert_eq!(secure.distributed_release(&plan().privacy).unwrap(), None);
        for (z, c, h) in [(1.0, 0.5, 1), (0.7, 1.0, 2), (2.5, 3.0, 3)] {
            let plan = PrivacyPlan::Distributed { noise_multiplier: z, clip_norm: c, min_honest: h };
            let r = secure.distributed_release(&plan).unwrap().unwrap();
            let full = z * c * r.scale;
            let summed = r.site_sigma * (h as f64).sqrt();
            assert!(summed >= full && summed <= full + (h as f64).sqrt() * crate::dp::distributed::SITE_SIGMA_GRID, "{r:?}");
            assert!(r.params().noise_multiplier() >= z);
            let ratio = secure.fixed_point().unwrap().scale() / r.scale;
            assert!(ratio >= 1.0 && (ratio as u64).is_power_of_two(), "{ratio}");
            assert_eq!((r.dim, r.sites, r.min_honest, r.modulus_bits, r.rounding_beta), (4, 3, h, 48, None));
            assert!(c * r.scale >= 1024.0 * 2.0 && c * r.scale < 4096.0, "sqrt(4) = 2: {r:?}");
        }
        // More honest sites than the round may sum is not a valid share.
        let plan = PrivacyPlan::Distributed { noise_multiplier: 1.0, clip_norm: 1.0, min_honest: 4 };
        assert!(secure.distributed_release(&plan).is_err());
    }

    #[test]
    fn a_site_checks_a_secure_offer_against_the_offer_itself() {
        let offer = secure_offer();
        let secure = offer.secure.clone().unwrap();
        assert!(secure.check(&offer).is_ok());
        let refused = |f: &dyn Fn(&mut SecureRound)| {
            let mut s = secure.clone();
            f(&mut s);
            s.check(&offer).unwrap_err().to_string()
        };
        // Another try, another model or another encoding: another context.
        assert!(refused(&|s| s.attempt = 2).contains("context"));
        assert!(refused(&|s| s.clip = 6.0).contains("context"));
        assert!(refused(&|s| s.setup.vector_len = 4).contains("sums 4 values"));
        assert!(refused(&|s| s.setup.round = RoundId(2)).contains("round"));
        assert!(refused(&|s| s.setup.params.threshold = 1).contains("threshold"));
        assert!(refused(&|s| s.max_sites = 0).contains("max_sites"));
        let mut other = offer.clone();
        other.model_digest = Digest([0; 32]);
        assert!(secure.check(&other).unwrap_err().to_string().contains("context"));
    }

    #[test]
    fn masked_input_sizes_are_checked_before_allocation() {
        let values = [1u64, 2, 3, u64::MAX];
        let bytes = masked_values_bytes(&values, 8);
        let header = MaskedInputHeader { round: RoundId(1), values: 4, digest: masked_values_digest(&bytes), privacy: PrivacyUsed::off() };
        assert_eq!(header.payload_bytes(4, 8, 32).unwrap(), 32);
        assert_eq!(header.payload_bytes(4, 6, 24).unwrap(), 24);
        assert!(matches!(header.payload_bytes(5, 8, 1 << 20), Err(MaskedInputError::Length { expected: 5, got: 4 })));
        assert!(matches!(header.payload_bytes(4, 8, 31), Err(MaskedInputError::TooLarge { .. })));
        let huge = MaskedInputHeader { values: u64::MAX, ..header.clone() };
        assert!(huge.payload_bytes(usize::MAX, 8, usize::MAX).is_err());
        assert_eq!(masked_values_from_bytes(&header, 8, &bytes).unwrap(), values);
        let mut bad = bytes.clone();
        bad[3] ^= 1;
        assert!(matches!(masked_values_from_bytes(&header, 8, &bad), Err(MaskedInputError::DigestMismatch { .. })));
        assert!(matches!(masked_values_from_bytes(&header, 8, &bytes[..31]), Err(MaskedInputError::Ragged(31))));
    }

    #[test]
    fn masked_values_take_the_fewest_bytes_their_modulus_needs() {
        assert_eq!([16, 17, 40, 44, 48, 63, 64].map(masked_value_width), [2, 3, 5, 6, 6, 8, 8]);
        // Every value below 2^44, the largest included, crosses in 6 bytes and comes back.
        let values = [0u64, 1, 0x0ABC_DEF0_1234, (1 << 44) - 1, 1 << 43];
        let width = masked_value_width(44);
        let bytes = masked_values_bytes(&values, width);
        assert_eq!(bytes.len(), values.len() * 6);
        assert_eq!(&bytes[..6], &[0; 6]);
        assert_eq!(&bytes[12..18], &0x0ABC_DEF0_1234u64.to_le_bytes()[..6]);
        let header = MaskedInputHeader { round: RoundId(1), values: 5, digest: masked_values_digest(&bytes), privacy: PrivacyUsed::off() };
        assert_eq!(header.payload_bytes(5, width, 1 << 20).unwrap(), 30);
        assert_eq!(masked_values_from_bytes(&header, width, &bytes).unwrap(), values);
        assert!(matches!(masked_values_from_bytes(&header, width, &bytes[..29]), Err(MaskedInputError::Ragged(29))));
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all_messages() {
            let bytes = encode(&msg).unwrap();
            let (back, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len(), "{}", msg.kind());
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let bytes = encode(&all_messages()[0]).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let msgs = all_messages();
        let mut buf = encode(&msgs[0]).unwrap();
        buf.extend(encode(&msgs[1]).unwrap());
        let (a, used) = decode(&buf).unwrap().unwrap();
        let (b, _) = decode(&buf[used..]).unwrap().unwrap();
        assert_eq!((a, b), (msgs[0].clone(), msgs[1].clone()));
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_it() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(frame_len(header), Err(DecodeError::TooLarge { .. })));
        assert!(matches!(decode(&header), Err(DecodeError::TooLarge { .. })));
        assert!(frame_len((MAX_FRAME_LEN as u32).to_le_bytes()).is_ok());
    }

    #[test]
    fn oversized_message_is_refused_when_encoding() {
        let names = (0..40_000).map(|i| format!("tensor-with-a-long-name-{i:08}")).collect();
        let msg = Message::ModelRequest(ModelRequest { round: RoundId(1), names });
        assert!(matches!(encode(&msg), Err(EncodeError::TooLarge { .. })));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        let mut frame = 3u32.to_le_bytes().to_vec();
        frame.extend([0xff, 0xff, 0xff]);
        assert!(matches!(decode(&frame), Err(DecodeError::Malformed(_))));
        let mut ok = encode(&Message::Ack(Ack { round: RoundId(1) })).unwrap();
        ok.push(0);
        let len = (ok.len() - 4) as u32;
        ok[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(decode(&ok), Err(DecodeError::Trailing(1))));
    }

    #[test]
    fn hostile_inner_length_does_not_allocate() {
        // A Tensors message claiming 2^60 specs inside a tiny frame.
        let mut payload = vec![6u8]; // variant index of Message::Tensors
        payload.push(0xfd);
        payload.extend((1u64 << 60).to_le_bytes());
        assert!(decode_payload(&payload).is_err());
    }

    #[test]
    fn site_ids_are_dns_labels() {
        assert!(SiteId::new("st-marys-2").is_ok());
        for bad in ["", "-x", "Upper", "a.b", "a b", &"x".repeat(64)] {
            assert!(SiteId::new(bad).is_err(), "{bad:?}");
        }
        let bytes = encode(&Message::Welcome(Welcome {
            site: SiteId("BAD ID".into()),
            protocol_version: 1,
            completed_rounds: 0,
            total_rounds: 1,
            accepted: Vec::new(),
        }))
        .unwrap();
        assert!(decode(&bytes).is_err(), "a peer cannot smuggle an invalid site id");
    }

    #[test]
    fn declared_sizes_are_checked_before_allocation() {
        let mut big = spec();
        big.shape = vec![usize::MAX / 2, 4];
        assert!(matches!(declared_payload_bytes(&[big], usize::MAX), Err(TensorStreamError::TooLarge { .. })));
        assert_eq!(declared_payload_bytes(&[spec()], 16).unwrap(), 16);
        assert!(matches!(declared_payload_bytes(&[spec()], 15), Err(TensorStreamError::TotalTooLarge { .. })));
        assert!(matches!(declared_payload_bytes(&[spec(), spec()], 1 << 20), Err(TensorStreamError::DuplicateName(_))));
    }

    #[test]
    fn received_bytes_are_checked_against_the_digest() {
        let mut set = TensorSet::new();
        set.insert("classifier.weight", Tensor::new(vec![2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap());
        let wire_bytes = set.get("classifier.weight").unwrap().le_bytes().into_owned();
        let s = spec();
        let mut t = alloc_tensor(&s);
        tensor_bytes_mut(&mut t).copy_from_slice(&wire_bytes);
        finish_tensor(&s, &mut t).unwrap();
        assert_eq!(&t, set.get("classifier.weight").unwrap());

        let mut corrupted = alloc_tensor(&s);
        let mut bad = wire_bytes.clone();
        bad[5] ^= 1;
        tensor_bytes_mut(&mut corrupted).copy_from_slice(&bad);
        assert!(matches!(finish_tensor(&s, &mut corrupted), Err(TensorStreamError::DigestMismatch { .. })));
    }
}
