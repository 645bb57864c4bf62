//! Configuration of the coordinator and the agent: TOML in, validated typed values out.
//!
//! Two stages: `Raw*` structs mirror the TOML (serde, unknown fields refused), then a pure
//! `from_raw` checks every value and resolves relative paths against the config file's
//! directory. Reading the file is the binaries' job; `parse_*` take the text.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::UpdateEncoding;
use crate::plan::{Optimizer, PrivacyMode, PrivacyPlan, Trainable, TrainingPlan};
use crate::secagg::SecAggParams;
use crate::wire::{PrivacyPolicy, SiteId};

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// The default labels, in id order.
pub const DEFAULT_LABELS: [&str; 4] = ["doctor", "bed", "device", "other"];

// ---------------------------------------------------------------------------
// Raw TOML shapes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The coordinator only: the CA's revocation list (`pki revoke` writes it).
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// The agent only: before its certificate expires, make a new key and have the
    /// coordinator's issuing CA sign it over the authenticated connection (default on).
    #[serde(default)]
    pub auto_renew: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoordinatorConfig {
    pub server: RawServer,
    pub tls: RawTls,
    pub federation: RawFederation,
    pub model: RawCoordinatorModel,
    #[serde(default)]
    pub training: RawTraining,
    #[serde(default)]
    pub privacy: RawPrivacy,
    #[serde(default)]
    pub sites: Vec<RawSite>,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub aggregation: RawAggregation,
    #[serde(default)]
    pub transport: RawTransport,
    #[serde(default)]
    pub admin: RawAdmin,
    pub renewal: Option<RawRenewal>,
    /// Required by, and only allowed with, `[aggregation] method = "secure"`.
    pub secure_aggregation: Option<RawSecureAggregation>,
    #[serde(default)]
    pub selection: RawSelection,
}

/// Federated model selection: which global model is the federation's result.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSelection {
    /// `"last"` (the default: the last round's model) or `"best"`: each site scores every
    /// global model on its own validation split as it is offered, one final round only
    /// scores the last, and the best of the kept models by the example-weighted figure is
    /// the result.
    #[serde(default = "default_selection_model")]
    pub model: String,
    /// Under a DP plan, the noise std of each score over its sensitivity (required then;
    /// each score is counted in the site's budget).
    pub noise_multiplier: Option<f64>,
}

fn default_selection_model() -> String {
    "last".into()
}

impl Default for RawSelection {
    /// No `[selection]` section: the last round's model.
    fn default() -> Self {
        Self { model: default_selection_model(), noise_multiplier: None }
    }
}

/// `[selection] model = "best"`: how sites' scores are released.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Selection {
    /// The score's noise multiplier under a DP plan; 0 without DP.
    pub noise_multiplier: f64,
}

impl Selection {
    fn from_raw(raw: &RawSelection, mode: PrivacyMode, secure: bool) -> Result<Option<Self>, ConfigError> {
        match raw.model.as_str() {
            "last" => {
                if raw.noise_multiplier.is_some() {
                    return Err(invalid("selection.noise_multiplier", "applies only with model = \"best\""));
                }
                return Ok(None);
            }
            "best" => {}
            other => return Err(invalid("selection.model", format!("{other:?}: expected \"last\" or \"best\""))),
        }
        if secure {
            return Err(invalid(
                "selection.model",
                "\"best\" needs each site's score in the clear, which secure aggregation does not send; use \"last\"",
            ));
        }
        let noise_multiplier = match (mode, raw.noise_multiplier) {
            (PrivacyMode::Off, None) => 0.0,
            (PrivacyMode::Off, Some(_)) => {
                return Err(invalid("selection.noise_multiplier", "applies only under a DP plan: without one, scores are exact"))
            }
            (_, None) => {
                return Err(invalid(
                    "selection.noise_multiplier",
                    "required under a DP plan: each site's score is noised with it and counted in its budget",
                ))
            }
            (_, Some(z)) if !(z.is_finite() && z > 0.0) => {
                return Err(invalid("selection.noise_multiplier", format!("{z} is not a positive number")))
            }
            (_, Some(z)) => z,
        };
        Ok(Some(Self { noise_multiplier }))
    }
}

/// The online issuing CA that renews site certificates (`pki init` makes it; the root key
/// stays offline).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRenewal {
    pub issuing_cert: PathBuf,
    /// 0600.
    pub issuing_key: PathBuf,
    /// Validity of a renewed site certificate.
    #[serde(default = "default_renewal_days")]
    pub days: u32,
    /// Queue each request for an admin (`pki pending`, `pki approve`) instead of signing.
    #[serde(default)]
    pub approval: bool,
}

fn default_renewal_days() -> u32 {
    30
}

/// Where renewed site certificates come from.
#[derive(Clone, Debug)]
pub struct Renewal {
    pub issuing_cert: PathBuf,
    pub issuing_key: PathBuf,
    pub days: u32,
    pub approval: bool,
}

/// Who may use the admin endpoints (`server.admin_listen`); see [`crate::access`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// The tokens file (`name role sha256`, 0600), written by `fedward-coordinator admin
    /// token add`.
    pub tokens: Option<PathBuf>,
    /// Serve the admin endpoints over HTTPS with the coordinator's certificate. Always on
    /// when `admin_listen` is not a loopback address.
    #[serde(default)]
    pub https: bool,
    /// Answer anyone who reaches the port, without a token: only for a loopback address on
    /// a machine whose every local user may see and control the federation (a demo).
    #[serde(default)]
    pub unauthenticated_loopback: bool,
}

/// Timeouts and rates of the QUIC transport, the same keys at the coordinator and the agent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTransport {
    /// A connection with no traffic (keep-alives included) for this long is dropped.
    pub idle_timeout: String,
    /// How often an idle connection sends a keep-alive (below `idle_timeout`). An agent
    /// learns of a restarted coordinator on its next packet (a stateless reset), so this
    /// bounds how long that takes.
    pub keep_alive: String,
    /// The longest a QUIC and TLS handshake may take.
    pub handshake_timeout: String,
    /// The longest a peer may take to send a request or answer one (not counting the
    /// tensor bytes that follow, which `min_transfer_rate_kib` paces).
    pub request_timeout: String,
    /// Tensor bytes must move at least this fast (KiB/s), after `transfer_allowance`.
    pub min_transfer_rate_kib: u64,
    /// Time a tensor transfer gets on top of its bytes at the minimum rate.
    pub transfer_allowance: String,
}

impl Default for RawTransport {
    fn default() -> Self {
        Self {
            idle_timeout: "60s".into(),
            keep_alive: "5s".into(),
            handshake_timeout: "10s".into(),
            request_timeout: "30s".into(),
            min_transfer_rate_kib: 128,
            transfer_allowance: "30s".into(),
        }
    }
}

/// How long a peer may take to move tensor bytes: a fixed allowance plus the bytes at a
/// minimum rate. A transfer past that is too slow, whatever its cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    pub allowance: Duration,
    pub min_bytes_per_sec: u64,
}

impl Pace {
    /// The time `bytes` may take.
    pub fn time_for(&self, bytes: u64) -> Duration {
        self.allowance + Duration::from_secs_f64(bytes as f64 / self.min_bytes_per_sec.max(1) as f64)
    }
}

/// The transport's validated settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    pub pace: Pace,
}

impl Default for Transport {
    fn default() -> Self {
        // The defaults of `RawTransport`, which parse.
        Self::from_raw(&RawTransport::default()).unwrap_or_else(|_| unreachable!("the default transport settings are valid"))
    }
}

impl Transport {
    pub fn from_raw(raw: &RawTransport) -> Result<Self, ConfigError> {
        let idle_timeout = parse_duration("transport.idle_timeout", &raw.idle_timeout)?;
        let keep_alive = parse_duration("transport.keep_alive", &raw.keep_alive)?;
        if keep_alive >= idle_timeout {
            return Err(invalid("transport.keep_alive", "must be shorter than transport.idle_timeout"));
        }
        if raw.min_transfer_rate_kib == 0 {
            return Err(invalid("transport.min_transfer_rate_kib", "must be at least 1"));
        }
        Ok(Self {
            idle_timeout,
            keep_alive,
            handshake_timeout: parse_duration("transport.handshake_timeout", &raw.handshake_timeout)?,
            request_timeout: parse_duration("transport.request_timeout", &raw.request_timeout)?,
            pace: Pace {
                allowance: parse_duration("transport.transfer_allowance", &raw.transfer_allowance)?,
                min_bytes_per_sec: raw.min_transfer_rate_kib.saturating_mul(1024),
            },
        })
    }
}

/// What the coordinator admits before a peer has authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// Handshakes in progress at once, from anyone; beyond it new ones are refused.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one IP address.
    pub max_handshakes_per_ip: usize,
    /// Concurrent request streams one connection may open (the agent needs two).
    pub max_streams_per_connection: u32,
}

impl Default for Admission {
    fn default() -> Self {
        Self { max_handshakes: DEFAULT_MAX_HANDSHAKES, max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP, max_streams_per_connection: 4 }
    }
}

const DEFAULT_MAX_HANDSHAKES: usize = 64;
const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 8;
fn default_max_handshakes() -> usize {
    DEFAULT_MAX_HANDSHAKES
}
fn default_max_handshakes_per_ip() -> usize {
    DEFAULT_MAX_HANDSHAKES_PER_IP
}

/// How the coordinator combines a round's updates, and the bounds it puts on each.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAggregation {
    /// `fedavg` (norm-bounded, weighted), `median` or `trimmed-mean` (coordinate-wise).
    pub method: String,
    /// `trimmed-mean`: the share of values dropped at each end of every coordinate.
    pub trim_fraction: f64,
    /// `examples` (FedAvg weights each site by its examples, clamped) or `equal`.
    pub weighting: String,
    /// The most examples one site's update may weigh, whatever it claims.
    pub max_examples_per_site: u64,
    /// The L2 bound on every update. Default: the privacy plan's (record-level: the update
    /// clip norm; site-level: the clip norm plus what the noise can add); required without DP.
    pub max_update_norm: Option<f64>,
    /// What happens to an update above the bound: `clip` (scaled down to it) or `refuse`.
    pub over_norm: String,
    /// How sites send their updates: `f32`, `f16`, `int8` (a scale per tensor) or
    /// `int8-row` (a scale per row); quantized after the privacy step (`codec`).
    pub update_encoding: String,
    /// How the round's combined update (the pseudo-gradient) moves the global model:
    /// `fedavg`, `fedavgm` (server momentum), `fedadam` or `fedyogi` (Reddi et al. 2021).
    pub server_optimizer: String,
    /// The server's step size. Default 1 for `fedavg` and `fedavgm`; required for `fedadam`
    /// and `fedyogi`, whose steps are about this large in every coordinate.
    pub server_learning_rate: Option<f64>,
    /// `fedavgm`: the momentum `mu` (default 0.9).
    pub server_momentum: Option<f64>,
    /// `fedadam`, `fedyogi`: decay of the first moment (default 0.9).
    pub beta1: Option<f64>,
    /// `fedadam`, `fedyogi`: decay of the second moment (default 0.99).
    pub beta2: Option<f64>,
    /// `fedadam`, `fedyogi`: the adaptivity (epsilon) `tau` (default 1e-3).
    pub tau: Option<f64>,
}

impl Default for RawAggregation {
    fn default() -> Self {
        Self {
            method: "fedavg".into(),
            trim_fraction: 0.1,
            weighting: "examples".into(),
            max_examples_per_site: DEFAULT_MAX_EXAMPLES_PER_SITE,
            max_update_norm: None,
            over_norm: "clip".into(),
            update_encoding: "f32".into(),
            server_optimizer: "fedavg".into(),
            server_learning_rate: None,
            server_momentum: None,
            beta1: None,
            beta2: None,
            tau: None,
        }
    }
}

/// `[secure_aggregation]`: the parameters of a secure round (`shared::secagg`). Its own
/// section, so `[aggregation]` keeps only the method's name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecureAggregation {
    /// Shares needed to unmask (`t`), within each site's group of `neighbours + 1`: more
    /// than half of the group.
    pub threshold: usize,
    /// Fewest sites that must advertise keys for a secure round to go on.
    pub min_sites: usize,
    /// Neighbours per site (even); default: every site is every site's neighbour.
    pub neighbours: Option<usize>,
    /// The sum is computed modulo `2^modulus_bits` (16 to 64).
    #[serde(default = "default_modulus_bits")]
    pub modulus_bits: u32,
    /// How long each short step (keys, shares, unmasking) waits for the sites.
    #[serde(default = "default_step_deadline")]
    pub step_deadline: String,
}

fn default_modulus_bits() -> u32 {
    64
}

fn default_step_deadline() -> String {
    "60s".into()
}

/// The default clamp on one site's FedAvg weight: a large hospital's labelled notes.
pub const DEFAULT_MAX_EXAMPLES_PER_SITE: u64 = 100_000;

/// The coordinator's signed ledger of accepted updates.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    /// ed25519 signing key (`fedward-coordinator ledger keygen`); default `ledger.key`
    /// beside the TLS key.
    pub signing_key: Option<PathBuf>,
    /// The ledger file; default `ledger.jsonl` in the state directory.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    pub state_dir: PathBuf,
    /// Dashboard, control and health endpoints (HTTP on loopback, HTTPS elsewhere; see
    /// `[admin]`).
    pub admin_listen: Option<String>,
    /// Handshakes in progress at once, from anyone.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one IP address.
    #[serde(default = "default_max_handshakes_per_ip")]
    pub max_handshakes_per_ip: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    pub rounds: u64,
    pub min_sites: usize,
    #[serde(default = "default_deadline")]
    pub round_deadline: String,
    /// Largest update accepted, in MiB.
    #[serde(default = "default_max_update_mib")]
    pub max_update_mib: usize,
    /// How many updates may be received at once (bounds the coordinator's memory).
    #[serde(default = "default_concurrent_uploads")]
    pub max_concurrent_uploads: usize,
    /// How many model downloads are served at once (each may buffer a connection's send
    /// window, so this bounds what many sites starting a round together cost).
    #[serde(default = "default_concurrent_downloads")]
    pub max_concurrent_downloads: usize,
}

fn default_deadline() -> String {
    "10m".into()
}
fn default_max_update_mib() -> usize {
    512
}
fn default_concurrent_downloads() -> usize {
    4
}

/// One update received at a time: each upload in flight holds a whole update, and one
/// endpoint's uploads share one UDP socket's throughput anyway.
fn default_concurrent_uploads() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoordinatorModel {
    /// A model directory (`model.safetensors` + `config.json`) or a `.safetensors` file.
    pub init: PathBuf,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Seed for initialising a classifier head the base model lacks.
    #[serde(default)]
    pub init_seed: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTraining {
    pub local_epochs: u32,
    pub batch_size: u32,
    /// `adamw` or `sgd:M` (SGD with momentum M; what record-level DP-SGD wants).
    pub optimizer: String,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_seq_len: u32,
    pub trainable: String,
    pub seed: u64,
    /// FedProx (Li et al. 2020): the weight `mu` of the proximal term `mu/2 ||w -
    /// w_global||^2` each site adds to its local objective (0: off).
    pub prox_mu: f64,
}

impl Default for RawTraining {
    fn default() -> Self {
        Self {
            local_epochs: 1,
            batch_size: 16,
            optimizer: "adamw".into(),
            learning_rate: 5e-5,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            max_seq_len: 128,
            trainable: "top:2".into(),
            seed: 0,
            prox_mu: 0.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPrivacy {
    pub mode: String,
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    pub sampling_rate: f64,
    pub update_clip_norm: f64,
    /// Policy: the smallest noise multiplier accepted in an update.
    pub min_noise_multiplier: Option<f64>,
    /// Policy: the largest clipping norm accepted in an update.
    pub max_clip_norm: Option<f64>,
    /// `mode = "distributed"` only: how many of a round's summed sites are assumed honest;
    /// their noise shares together carry the full `noise_multiplier`.
    pub min_honest: Option<u64>,
}

impl Default for RawPrivacy {
    fn default() -> Self {
        Self {
            mode: "record-level".into(),
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampling_rate: 0.05,
            update_clip_norm: 10.0,
            min_noise_multiplier: None,
            max_clip_norm: None,
            min_honest: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Pin the site to one certificate: its SHA-256 fingerprint as `pki show` prints it.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

// ---------------------------------------------------------------------------
// Typed coordinator config.

/// How a round's updates are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AggregationMethod {
    /// The weighted mean of the (norm-bounded) updates: memory O(model), whatever the
    /// number of sites.
    FedAvg,
    /// The coordinate-wise median, one site one vote: holds every update of the round.
    Median,
    /// The coordinate-wise mean after dropping `trim_fraction` of the values at each end,
    /// one site one vote: holds every update of the round.
    TrimmedMean { trim_fraction: f64 },
}

impl AggregationMethod {
    /// Whether the method keeps every update of the round until it closes (memory
    /// O(sites x model)) rather than a running sum (O(model)).
    pub fn holds_updates(&self) -> bool {
        !matches!(self, Self::FedAvg)
    }
}

impl std::fmt::Display for AggregationMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FedAvg => f.write_str("fedavg"),
            Self::Median => f.write_str("median"),
            Self::TrimmedMean { trim_fraction } => write!(f, "trimmed-mean ({trim_fraction} trimmed at each end)"),
        }
    }
}

/// How much each site's update weighs in FedAvg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weighting {
    /// By the examples the site trained on, clamped to `max_examples_per_site`.
    Examples,
    /// Every site the same.
    Equal,
}

/// What happens to an update whose L2 norm is above the bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverNorm {
    /// Scaled down to the bound (norm-bounded FedAvg).
    Clip,
    /// Refused, with the reason sent to the site and recorded.
    Refuse,
}

/// How the coordinator turns a round's combined update `d` (the weighted mean delta, or
/// the median or trimmed mean: the pseudo-gradient of Reddi et al. 2021, "Adaptive
/// Federated Optimization") into the step `x += s` of the global model. Per coordinate:
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServerOptimizer {
    /// `s = lr d`: plain FedAvg at `lr = 1` (the default).
    FedAvg { learning_rate: f64 },
    /// Server momentum: `m = momentum m + d`, `s = lr m`.
    FedAvgM { learning_rate: f64, momentum: f64 },
    /// `m = b1 m + (1 - b1) d`, `v = b2 v + (1 - b2) d^2`, `s = lr m / (sqrt(v) + tau)`;
    /// `m` starts at 0, `v` at `tau^2` (the paper's `v_{-1} >= tau^2`), no bias correction.
    FedAdam { learning_rate: f64, beta1: f64, beta2: f64, tau: f64 },
    /// As FedAdam with Yogi's second moment: `v = v - (1 - b2) d^2 sign(v - d^2)`.
    FedYogi { learning_rate: f64, beta1: f64, beta2: f64, tau: f64 },
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self::FedAvg { learning_rate: 1.0 }
    }
}

impl ServerOptimizer {
    /// The name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FedAvg { .. } => "fedavg",
            Self::FedAvgM { .. } => "fedavgm",
            Self::FedAdam { .. } => "fedadam",
            Self::FedYogi { .. } => "fedyogi",
        }
    }

    /// The server's step size.
    pub fn learning_rate(&self) -> f64 {
        match *self {
            Self::FedAvg { learning_rate }
            | Self::FedAvgM { learning_rate, .. }
            | Self::FedAdam { learning_rate, .. }
            | Self::FedYogi { learning_rate, .. } => learning_rate,
        }
    }

    /// How many values of state it keeps per trainable value (checkpointed beside the
    /// model): 0 (FedAvg), 1 (`m`) or 2 (`m` and `v`).
    pub fn moments(&self) -> usize {
        match self {
            Self::FedAvg { .. } => 0,
            Self::FedAvgM { .. } => 1,
            Self::FedAdam { .. } | Self::FedYogi { .. } => 2,
        }
    }

    /// Whether the step is the combined update itself (plain FedAvg at learning rate 1).
    pub fn is_identity(&self) -> bool {
        matches!(self, Self::FedAvg { learning_rate } if *learning_rate == 1.0)
    }

    /// Validates the `[aggregation]` keys of the server optimiser; a key the chosen
    /// optimiser does not use is refused rather than silently ignored.
    pub fn from_raw(raw: &RawAggregation) -> Result<Self, ConfigError> {
        let unused = |field: &'static str, present: bool, name: &str| {
            if present {
                Err(invalid(field, format!("is not used by server_optimizer = {name:?}")))
            } else {
                Ok(())
            }
        };
        let in_unit = |field: &'static str, v: Option<f64>, default: f64| match v.unwrap_or(default) {
            x if (0.0..1.0).contains(&x) => Ok(x),
            _ => Err(invalid(field, "must be in [0, 1)")),
        };
        let positive = |field: &'static str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(invalid(field, "must be a positive number"))
            }
        };
        let name = raw.server_optimizer.as_str();
        let adaptive = matches!(name, "fedadam" | "fedyogi");
        let learning_rate = match (raw.server_learning_rate, adaptive) {
            (Some(lr), _) => positive("aggregation.server_learning_rate", lr)?,
            (None, false) => 1.0,
            (None, true) => {
                return Err(invalid(
                    "aggregation.server_learning_rate",
                    format!(
                        "is required with server_optimizer = {name:?}: its step is about this large in every coordinate, whatever \
                         the update's size (try 1e-3 to 1e-2 for fine-tuning)"
                    ),
                ))
            }
        };
        if !adaptive {
            unused("aggregation.beta1", raw.beta1.is_some(), name)?;
            unused("aggregation.beta2", raw.beta2.is_some(), name)?;
            unused("aggregation.tau", raw.tau.is_some(), name)?;
        }
        if name != "fedavgm" {
            unused("aggregation.server_momentum", raw.server_momentum.is_some(), name)?;
        }
        let adam = || -> Result<(f64, f64, f64), ConfigError> {
            Ok((
                in_unit("aggregation.beta1", raw.beta1, 0.9)?,
                in_unit("aggregation.beta2", raw.beta2, 0.99)?,
                positive("aggregation.tau", raw.tau.unwrap_or(1e-3))?,
            ))
        };
        Ok(match name {
            "fedavg" => Self::FedAvg { learning_rate },
            "fedavgm" => Self::FedAvgM { learning_rate, momentum: in_unit("aggregation.server_momentum", raw.server_momentum, 0.9)? },
            "fedadam" => {
                let (beta1, beta2, tau) = adam()?;
                Self::FedAdam { learning_rate, beta1, beta2, tau }
            }
            "fedyogi" => {
                let (beta1, beta2, tau) = adam()?;
                Self::FedYogi { learning_rate, beta1, beta2, tau }
            }
            other => {
                return Err(invalid(
                    "aggregation.server_optimizer",
                    format!("unknown server optimizer {other:?}: expected fedavg, fedavgm, fedadam or fedyogi"),
                ))
            }
        })
    }
}

impl std::fmt::Display for ServerOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FedAvg { learning_rate } => write!(f, "fedavg (server learning rate {learning_rate})"),
            Self::FedAvgM { learning_rate, momentum } => {
                write!(f, "fedavgm (server learning rate {learning_rate}, momentum {momentum})")
            }
            Self::FedAdam { learning_rate, beta1, beta2, tau } | Self::FedYogi { learning_rate, beta1, beta2, tau } => {
                write!(f, "{} (server learning rate {learning_rate}, beta1 {beta1}, beta2 {beta2}, tau {tau})", self.name())
            }
        }
    }
}

/// The coordinator's own bounds on what one site's update can do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aggregation {
    pub method: AggregationMethod,
    pub weighting: Weighting,
    pub max_examples_per_site: u64,
    /// `None`: derived from the privacy plan once the model's size is known.
    pub max_update_norm: Option<f64>,
    pub over_norm: OverNorm,
    /// What the offer asks sites to send their updates in.
    pub update_encoding: UpdateEncoding,
    /// How the combined update moves the global model.
    pub server_optimizer: ServerOptimizer,
}

impl Default for Aggregation {
    fn default() -> Self {
        Self {
            method: AggregationMethod::FedAvg,
            weighting: Weighting::Examples,
            max_examples_per_site: DEFAULT_MAX_EXAMPLES_PER_SITE,
            max_update_norm: None,
            over_norm: OverNorm::Clip,
            update_encoding: UpdateEncoding::F32,
            server_optimizer: ServerOptimizer::default(),
        }
    }
}

impl Aggregation {
    /// Validates `[aggregation]` against the privacy mode it bounds.
    pub fn from_raw(raw: &RawAggregation, mode: PrivacyMode) -> Result<Self, ConfigError> {
        let method = match raw.method.as_str() {
            // A secure round's result is the weighted mean of a secure sum, FedAvg's mean;
            // its parameters are `[secure_aggregation]` (`CoordinatorConfig::secure`).
            "fedavg" | "secure" => AggregationMethod::FedAvg,
            "median" => AggregationMethod::Median,
            "trimmed-mean" => {
                if !(raw.trim_fraction > 0.0 && raw.trim_fraction < 0.5) {
                    return Err(invalid("aggregation.trim_fraction", "must be in (0, 0.5)"));
                }
                AggregationMethod::TrimmedMean { trim_fraction: raw.trim_fraction }
            }
            other => {
                return Err(invalid(
                    "aggregation.method",
                    format!("unknown method {other:?}: expected fedavg, median, trimmed-mean or secure"),
                ))
            }
        };
        let weighting = match raw.weighting.as_str() {
            "examples" => Weighting::Examples,
            "equal" => Weighting::Equal,
            other => return Err(invalid("aggregation.weighting", format!("unknown weighting {other:?}: expected examples or equal"))),
        };
        let over_norm = match raw.over_norm.as_str() {
            "clip" => OverNorm::Clip,
            "refuse" => OverNorm::Refuse,
            other => return Err(invalid("aggregation.over_norm", format!("unknown action {other:?}: expected clip or refuse"))),
        };
        if raw.max_examples_per_site == 0 {
            return Err(invalid("aggregation.max_examples_per_site", "must be at least 1"));
        }
        match raw.max_update_norm {
            Some(b) if !(b > 0.0 && b.is_finite()) => return Err(invalid("aggregation.max_update_norm", "must be a positive number")),
            None if mode == PrivacyMode::Off => {
                return Err(invalid(
                    "aggregation.max_update_norm",
                    "is required when privacy.mode = \"off\": without DP nothing else bounds how far one site's update can move the \
                     global model (state.json records each update's norm, to choose it from)",
                ))
            }
            _ => {}
        }
        let update_encoding = raw.update_encoding.parse().map_err(|e| invalid("aggregation.update_encoding", e))?;
        let server_optimizer = ServerOptimizer::from_raw(raw)?;
        Ok(Self {
            method,
            weighting,
            max_examples_per_site: raw.max_examples_per_site,
            max_update_norm: raw.max_update_norm,
            over_norm,
            update_encoding,
            server_optimizer,
        })
    }
}

/// Secure aggregation (`[aggregation] method = "secure"`): the coordinator learns only the
/// sum of the round's updates (`shared::secagg`).
#[derive(Clone, Debug, PartialEq)]
pub struct SecureAggregation {
    /// Validated by [`SecAggParams::validate`]; `neighbours` resolved against the enrolled
    /// sites.
    pub params: SecAggParams,
    /// Each short step's deadline (keys, shares, unmasking); the masked inputs are due by
    /// the round's deadline, since sites train between the shares and their input.
    pub step_deadline: Duration,
}

impl SecureAggregation {
    /// Validates `[secure_aggregation]` for `enrolled` sites and a round quorum of
    /// `min_sites`, beside the `[aggregation]` it goes with.
    pub fn from_raw(
        raw: &RawSecureAggregation,
        aggregation: &RawAggregation,
        enrolled: usize,
        min_sites: usize,
    ) -> Result<Self, ConfigError> {
        // The fields are checked one by one first, so each error names its own field.
        if raw.threshold < 2 {
            return Err(invalid("secure_aggregation.threshold", format!("must be at least 2, got {}", raw.threshold)));
        }
        if raw.threshold > enrolled {
            return Err(invalid("secure_aggregation.threshold", format!("{} exceeds the {enrolled} enrolled sites", raw.threshold)));
        }
        if raw.min_sites < raw.threshold || raw.min_sites > enrolled {
            return Err(invalid(
                "secure_aggregation.min_sites",
                format!("must be from the threshold {} to the {enrolled} enrolled sites, got {}", raw.threshold, raw.min_sites),
            ));
        }
        if min_sites < raw.min_sites {
            return Err(invalid(
                "federation.min_sites",
                format!(
                    "{min_sites} is below secure_aggregation.min_sites {}: a round offered to fewer sites could never complete",
                    raw.min_sites
                ),
            ));
        }
        if !(16..=64).contains(&raw.modulus_bits) {
            return Err(invalid("secure_aggregation.modulus_bits", format!("must be 16 to 64, got {}", raw.modulus_bits)));
        }
        // The complete graph: every other site a neighbour (an even count, at least 2).
        let complete = (enrolled.saturating_sub(1).div_ceil(2) * 2).max(2);
        let neighbours = raw.neighbours.unwrap_or(complete);
        let params = SecAggParams { threshold: raw.threshold, min_sites: raw.min_sites, neighbours, modulus_bits: raw.modulus_bits };
        if let Err(e) = params.validate() {
            let field = if raw.neighbours.is_some() && (neighbours < 2 || neighbours % 2 == 1 || neighbours >= crate::secagg::MAX_SITES) {
                "secure_aggregation.neighbours"
            } else {
                "secure_aggregation.threshold"
            };
            return Err(invalid(field, e.to_string()));
        }
        let step_deadline = parse_duration("secure_aggregation.step_deadline", &raw.step_deadline)?;
        if step_deadline.is_zero() {
            return Err(invalid("secure_aggregation.step_deadline", "must be positive"));
        }
        // The coordinator sees no single update: it can neither refuse nor clip one, and a
        // masked input is a vector of integers, not an encoded update.
        if aggregation.over_norm != "clip" {
            return Err(invalid(
                "aggregation.over_norm",
                "must be \"clip\" under secure aggregation: sites clip their own updates to the bound, the coordinator never sees one",
            ));
        }
        if aggregation.update_encoding != "f32" {
            return Err(invalid("aggregation.update_encoding", "does not apply under secure aggregation: sites send masked integers"));
        }
        Ok(Self { params, step_deadline })
    }
}

/// PEM file locations.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The revocation list client certificates are checked against (coordinator only).
    pub crl: Option<PathBuf>,
}

/// An enrolled site.
#[derive(Clone, Debug)]
pub struct Site {
    pub id: SiteId,
    pub name: String,
    /// When set, only the certificate with this SHA-256 fingerprint is this site.
    pub fingerprint: Option<[u8; 32]>,
}

/// The coordinator's validated configuration.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// The admin tokens file; `None` only for an unauthenticated loopback endpoint.
    pub admin_tokens: Option<PathBuf>,
    /// HTTPS on the admin endpoint (with the coordinator's certificate).
    pub admin_https: bool,
    pub state_dir: PathBuf,
    pub tls: TlsPaths,
    pub rounds: u64,
    pub min_sites: usize,
    pub round_deadline: Duration,
    pub max_update_bytes: usize,
    pub max_concurrent_uploads: usize,
    pub max_concurrent_downloads: usize,
    pub model_init: PathBuf,
    pub labels: Vec<String>,
    pub init_seed: u64,
    /// The plan offered every round (its `trainable_tensors` are filled in once the
    /// model is loaded).
    pub plan: TrainingPlan,
    pub policy: PrivacyPolicy,
    /// How updates are bounded and combined.
    pub aggregation: Aggregation,
    /// `Some` under `[aggregation] method = "secure"` (then `aggregation.method` is FedAvg:
    /// the weighted mean of the secure sum).
    pub secure: Option<SecureAggregation>,
    pub transport: Transport,
    pub admission: Admission,
    pub sites: Vec<Site>,
    /// The ledger's ed25519 signing key (0600).
    pub ledger_key: PathBuf,
    /// The coordinator's ledger of accepted updates and round seals.
    pub ledger_file: PathBuf,
    /// Site certificate renewal, when the consortium runs an issuing CA here.
    pub renewal: Option<Renewal>,
    /// `Some` under `[selection] model = "best"`.
    pub selection: Option<Selection>,
}

impl CoordinatorConfig {
    /// Parses and validates TOML; relative paths are taken from `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_raw(toml::from_str(text)?, base_dir)
    }

    pub fn from_raw(raw: RawCoordinatorConfig, base_dir: &Path) -> Result<Self, ConfigError> {
        let listen = parse_addr("server.listen", &raw.server.listen)?;
        let admin_listen = raw.server.admin_listen.as_deref().map(|a| parse_addr("server.admin_listen", a)).transpose()?;
        if raw.federation.rounds == 0 {
            return Err(invalid("federation.rounds", "must be at least 1"));
        }
        if raw.federation.min_sites == 0 {
            return Err(invalid("federation.min_sites", "must be at least 1"));
        }
        let round_deadline = parse_duration("federation.round_deadline", &raw.federation.round_deadline)?;
        if raw.federation.max_concurrent_uploads == 0 || raw.federation.max_concurrent_downloads == 0 {
            return Err(invalid(
                "federation.max_concurrent_uploads",
                "max_concurrent_uploads and max_concurrent_downloads must be at least 1",
            ));
        }
        let mut sites = Vec::new();
        for s in raw.sites {
            let id = SiteId::new(s.id).map_err(|e| invalid("sites.id", e.to_string()))?;
            if sites.iter().any(|x: &Site| x.id == id) {
                return Err(invalid("sites.id", format!("site {id} is enrolled twice")));
            }
            let fingerprint = s
                .fingerprint
                .map(|f| crate::pki::parse_fingerprint(&f).map_err(|e| invalid("sites.fingerprint", format!("site {id}: {e}"))))
                .transpose()?;
            sites.push(Site { name: s.name.unwrap_or_else(|| id.to_string()), id, fingerprint });
        }
        if sites.is_empty() {
            return Err(invalid("sites", "no site is enrolled; add [[sites]] entries with an id"));
        }
        if raw.federation.min_sites > sites.len() {
            return Err(invalid(
                "federation.min_sites",
                format!("{} exceeds the {} enrolled sites", raw.federation.min_sites, sites.len()),
            ));
        }
        let labels = validate_labels(raw.model.labels)?;
        let (plan, policy) = training_plan(&raw.training, &raw.privacy)?;
        let aggregation = Aggregation::from_raw(&raw.aggregation, policy.mode)?;
        let secure = match (&raw.secure_aggregation, raw.aggregation.method == "secure") {
            (Some(s), true) => Some(SecureAggregation::from_raw(s, &raw.aggregation, sites.len(), raw.federation.min_sites)?),
            (None, true) => {
                return Err(invalid(
                    "secure_aggregation",
                    "method = \"secure\" needs a [secure_aggregation] section (threshold, min_sites)",
                ))
            }
            (Some(_), false) => {
                return Err(invalid("secure_aggregation", "applies only with [aggregation] method = \"secure\""));
            }
            (None, false) => None,
        };
        check_distributed(&plan.privacy, secure.as_ref(), aggregation.weighting)?;
        let selection = Selection::from_raw(&raw.selection, policy.mode, secure.is_some())?;
        let transport = Transport::from_raw(&raw.transport)?;
        if raw.server.max_handshakes == 0 || raw.server.max_handshakes_per_ip == 0 {
            return Err(invalid("server.max_handshakes", "max_handshakes and max_handshakes_per_ip must be at least 1"));
        }
        let renewal = match raw.renewal {
            Some(r) if r.days == 0 || r.days > 397 => return Err(invalid("renewal.days", "must be 1 to 397")),
            Some(r) => Some(Renewal {
                issuing_cert: resolve(base_dir, r.issuing_cert),
                issuing_key: resolve(base_dir, r.issuing_key),
                days: r.days,
                approval: r.approval,
            }),
            None => None,
        };
        if raw.tls.auto_renew.is_some() {
            return Err(invalid("tls.auto_renew", "an agent setting; the coordinator's is [renewal]"));
        }
        let admin_tokens = raw.admin.tokens.map(|p| resolve(base_dir, p));
        let mut admin_https = raw.admin.https;
        if let Some(admin) = admin_listen {
            if raw.admin.unauthenticated_loopback && admin_tokens.is_some() {
                return Err(invalid("admin.unauthenticated_loopback", "set either admin.tokens or unauthenticated_loopback, not both"));
            }
            if !admin.ip().is_loopback() {
                if admin_tokens.is_none() {
                    return Err(invalid(
                        "admin.tokens",
                        format!(
                            "{admin} is not a loopback address: the admin endpoints need tokens there (create them with \
                             `fedward-coordinator admin token add --tokens FILE --name NAME --role admin`)"
                        ),
                    ));
                }
                // Tokens never cross a network in the clear.
                admin_https = true;
            } else if admin_tokens.is_none() && !raw.admin.unauthenticated_loopback {
                return Err(invalid(
                    "admin.tokens",
                    "the admin endpoints need [admin] tokens = FILE (see `fedward-coordinator admin token add`), or, on a \
                     loopback address whose local users may all control the federation, unauthenticated_loopback = true",
                ));
            }
        }
        let admission = Admission {
            max_handshakes: raw.server.max_handshakes,
            max_handshakes_per_ip: raw.server.max_handshakes_per_ip,
            ..Admission::default()
        };
        let state_dir = resolve(base_dir, raw.server.state_dir);
        let tls = tls_paths(base_dir, raw.tls);
        let ledger_key = match raw.ledger.signing_key {
            Some(p) => resolve(base_dir, p),
            None => tls.key.parent().unwrap_or(base_dir).join(crate::ledger_key::SIGNING_KEY_FILE),
        };
        let ledger_file = match raw.ledger.file {
            Some(p) => resolve(base_dir, p),
            None => state_dir.join("ledger.jsonl"),
        };
        Ok(Self {
            listen,
            admin_listen,
            admin_tokens,
            admin_https,
            state_dir,
            tls,
            rounds: raw.federation.rounds,
            min_sites: raw.federation.min_sites,
            round_deadline,
            max_update_bytes: raw.federation.max_update_mib.saturating_mul(1 << 20),
            max_concurrent_uploads: raw.federation.max_concurrent_uploads,
            max_concurrent_downloads: raw.federation.max_concurrent_downloads,
            model_init: resolve(base_dir, raw.model.init),
            labels,
            init_seed: raw.model.init_seed,
            plan,
            policy,
            aggregation,
            secure,
            transport,
            admission,
            sites,
            ledger_key,
            ledger_file,
            renewal,
            selection,
        })
    }
}

/// Distributed DP needs a secure sum (the coordinator must never see one site's share), at
/// least `min_honest` sites in every sum (`min_honest <= secure_aggregation.threshold`, the
/// fewest survivors that can be unmasked, itself at most `min_sites`), and equal weights (an
/// update scaled by its example count would have that much more sensitivity).
fn check_distributed(plan: &PrivacyPlan, secure: Option<&SecureAggregation>, weighting: Weighting) -> Result<(), ConfigError> {
    let PrivacyPlan::Distributed { min_honest, .. } = *plan else { return Ok(()) };
    let Some(secure) = secure else {
        return Err(invalid(
            "privacy.mode",
            "\"distributed\" needs [aggregation] method = \"secure\": without it the coordinator sees each site's share",
        ));
    };
    let threshold = secure.params.threshold as u64;
    if min_honest > threshold {
        return Err(invalid(
            "privacy.min_honest",
            format!(
                "{min_honest} exceeds secure_aggregation.threshold {threshold}: a round may be summed over {threshold} sites (min_sites {})",
                secure.params.min_sites
            ),
        ));
    }
    if weighting != Weighting::Equal {
        return Err(invalid(
            "aggregation.weighting",
            "must be \"equal\" with privacy.mode = \"distributed\": a share weighted by its example count has that much more sensitivity",
        ));
    }
    Ok(())
}

/// Builds the offered plan and the acceptance policy from the `[training]` and
/// `[privacy]` tables.
pub fn training_plan(t: &RawTraining, p: &RawPrivacy) -> Result<(TrainingPlan, PrivacyPolicy), ConfigError> {
    let trainable: Trainable =
        t.trainable.parse().map_err(|e: crate::plan::TrainableParseError| invalid("training.trainable", e.to_string()))?;
    let optimizer: Optimizer =
        t.optimizer.parse().map_err(|e: crate::plan::OptimizerParseError| invalid("training.optimizer", e.to_string()))?;
    if t.local_epochs == 0 {
        return Err(invalid("training.local_epochs", "must be at least 1"));
    }
    if t.batch_size == 0 {
        return Err(invalid("training.batch_size", "must be at least 1"));
    }
    if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
        return Err(invalid("training.learning_rate", "must be a positive number"));
    }
    if !(0.0..1.0).contains(&t.warmup_ratio) {
        return Err(invalid("training.warmup_ratio", "must be in [0, 1)"));
    }
    if !(t.weight_decay >= 0.0 && t.max_grad_norm >= 0.0) {
        return Err(invalid("training", "weight_decay and max_grad_norm must not be negative"));
    }
    if !(8..=512).contains(&t.max_seq_len) {
        return Err(invalid("training.max_seq_len", "must be between 8 and 512"));
    }
    if !(t.prox_mu >= 0.0 && t.prox_mu.is_finite()) {
        return Err(invalid("training.prox_mu", "must be a finite number >= 0 (0: no proximal term)"));
    }
    let mode: PrivacyMode = p.mode.parse().map_err(|e: String| invalid("privacy.mode", e))?;
    let positive = |field: &'static str, v: f64| {
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(invalid(field, "must be a positive number"))
        }
    };
    let privacy = match mode {
        PrivacyMode::Off => PrivacyPlan::Off,
        PrivacyMode::RecordLevel => {
            let q = p.sampling_rate;
            if !(q > 0.0 && q <= 1.0) {
                return Err(invalid("privacy.sampling_rate", "must be in (0, 1]"));
            }
            PrivacyPlan::RecordLevel {
                noise_multiplier: positive("privacy.noise_multiplier", p.noise_multiplier)?,
                clip_norm: positive("privacy.clip_norm", p.clip_norm)?,
                sampling_rate: q,
                update_clip_norm: positive("privacy.update_clip_norm", p.update_clip_norm)?,
            }
        }
        PrivacyMode::SiteLevel => PrivacyPlan::SiteLevel {
            noise_multiplier: positive("privacy.noise_multiplier", p.noise_multiplier)?,
            clip_norm: positive("privacy.clip_norm", p.clip_norm)?,
        },
        // Checked against `[secure_aggregation]` by `check_distributed`.
        PrivacyMode::Distributed => PrivacyPlan::Distributed {
            noise_multiplier: positive("privacy.noise_multiplier", p.noise_multiplier)?,
            clip_norm: positive("privacy.clip_norm", p.clip_norm)?,
            min_honest: match p.min_honest {
                Some(h) if h >= 1 => h,
                Some(_) => return Err(invalid("privacy.min_honest", "must be at least 1")),
                None => return Err(invalid("privacy.min_honest", "is required with mode = \"distributed\": the sites assumed honest")),
            },
        },
    };
    if p.min_honest.is_some() && mode != PrivacyMode::Distributed {
        return Err(invalid("privacy.min_honest", "applies only to mode = \"distributed\""));
    }
    let (sigma, clip) = match privacy {
        PrivacyPlan::Off => (0.0, f64::INFINITY),
        PrivacyPlan::RecordLevel { noise_multiplier, clip_norm, .. }
        | PrivacyPlan::SiteLevel { noise_multiplier, clip_norm }
        | PrivacyPlan::Distributed { noise_multiplier, clip_norm, .. } => (noise_multiplier, clip_norm),
    };
    let policy = PrivacyPolicy {
        mode,
        min_noise_multiplier: p.min_noise_multiplier.unwrap_or(sigma),
        max_clip_norm: p.max_clip_norm.unwrap_or(clip),
    };
    if mode != PrivacyMode::Off && (sigma < policy.min_noise_multiplier || clip > policy.max_clip_norm) {
        return Err(invalid(
            "privacy",
            "the offered noise_multiplier/clip_norm break the consortium's own min_noise_multiplier/max_clip_norm",
        ));
    }
    let plan = TrainingPlan {
        local_epochs: t.local_epochs,
        batch_size: t.batch_size,
        optimizer,
        learning_rate: t.learning_rate,
        warmup_ratio: t.warmup_ratio,
        weight_decay: t.weight_decay,
        max_grad_norm: t.max_grad_norm,
        max_seq_len: t.max_seq_len,
        trainable,
        trainable_tensors: Vec::new(),
        seed: t.seed,
        privacy,
        prox_mu: t.prox_mu,
    };
    Ok((plan, policy))
}

// ---------------------------------------------------------------------------
// Agent config.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    pub coordinator: RawCoordinatorEndpoint,
    pub tls: RawTls,
    pub data: RawData,
    pub model: RawAgentModel,
    pub budget: RawBudget,
    pub agent: RawAgent,
    #[serde(default)]
    pub transport: RawTransport,
    #[serde(default)]
    pub service: RawService,
}

/// The hospital's triage service (`fedward-agent serve`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Address of the HTTP API (default `127.0.0.1:8480`: loopback).
    pub listen: Option<String>,
    /// Predictions less confident than this go to a person (default 0.6).
    pub review_below: Option<f64>,
    /// `optimal` (default), `greedy` or `fcfs`.
    pub method: Option<String>,
    /// Value of an hour's wait, in urgency-5 requests (default 0.5).
    pub wait_weight_per_hour: Option<f64>,
    /// Longest exact solve before falling back to greedy (default `200ms`).
    pub time_limit: Option<String>,
    /// How often to look for a newer global model (default `10s`).
    pub reload_every: Option<String>,
    /// Recent decisions (and their notes, in memory only, for corrections) kept (default 1000).
    pub keep_recent: Option<usize>,
    /// Longest note accepted, in characters (default 2000).
    pub max_note_chars: Option<usize>,
    /// Bearer tokens (the `[admin] tokens` format) every route but `/healthz` then needs;
    /// required when `listen` is not loopback.
    pub tokens: Option<PathBuf>,
}

/// The triage service's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub listen: SocketAddr,
    pub review_below: f64,
    pub method: String,
    pub wait_weight_per_hour: f64,
    pub time_limit: Duration,
    pub reload_every: Duration,
    pub keep_recent: usize,
    pub max_note_chars: usize,
    pub tokens: Option<PathBuf>,
}

impl ServiceConfig {
    fn from_raw(raw: RawService, base_dir: &Path) -> Result<Self, ConfigError> {
        let listen = parse_addr("service.listen", raw.listen.as_deref().unwrap_or("127.0.0.1:8480"))?;
        if !listen.ip().is_loopback() && raw.tokens.is_none() {
            // Notes are patient data: off this machine, only token holders may send them.
            return Err(invalid("service.listen", "a non-loopback address needs service.tokens"));
        }
        let review_below = raw.review_below.unwrap_or(0.6);
        if !(0.0..=1.0).contains(&review_below) {
            return Err(invalid("service.review_below", "must be within 0..=1"));
        }
        let method = raw.method.unwrap_or_else(|| "optimal".into());
        if !matches!(method.as_str(), "optimal" | "greedy" | "fcfs") {
            return Err(invalid("service.method", "must be optimal, greedy or fcfs"));
        }
        let wait_weight_per_hour = raw.wait_weight_per_hour.unwrap_or(0.5);
        if !wait_weight_per_hour.is_finite() || wait_weight_per_hour < 0.0 {
            return Err(invalid("service.wait_weight_per_hour", "must be a finite number >= 0"));
        }
        let keep_recent = raw.keep_recent.unwrap_or(1000);
        if !(1..=1_000_000).contains(&keep_recent) {
            return Err(invalid("service.keep_recent", "must be within 1..=1000000"));
        }
        let max_note_chars = raw.max_note_chars.unwrap_or(2000);
        if !(1..=100_000).contains(&max_note_chars) {
            return Err(invalid("service.max_note_chars", "must be within 1..=100000"));
        }
        Ok(Self {
            listen,
            review_below,
            method,
            wait_weight_per_hour,
            time_limit: parse_duration("service.time_limit", raw.time_limit.as_deref().unwrap_or("200ms"))?,
            reload_every: parse_duration("service.reload_every", raw.reload_every.as_deref().unwrap_or("10s"))?,
            keep_recent,
            max_note_chars,
            tokens: raw.tokens.map(|p| resolve(base_dir, p)),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoordinatorEndpoint {
    /// `host:port` of the coordinator.
    pub address: String,
    /// The name in the coordinator's certificate.
    pub server_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// Clinicians' corrections from the triage service (default `<state_dir>/feedback.jsonl`).
    pub feedback: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentModel {
    /// Directory with `config.json` and `tokenizer.json` (and pretrained weights).
    pub base: PathBuf,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// The largest global model the agent downloads, in MiB.
    #[serde(default = "default_max_model_mib")]
    pub max_model_mib: usize,
}

fn default_max_model_mib() -> usize {
    4096
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub max_epsilon: f64,
    pub delta: f64,
    pub max_rounds: Option<u64>,
    /// Refuse plans without differential privacy (the default).
    #[serde(default = "default_true")]
    pub require_dp: bool,
    /// Under a DP plan, send the exact example count and the local training figures
    /// (loss, validation accuracy and macro-F1, seconds) with each update. Off by default:
    /// they are outside the DP guarantee (see docs/PRIVACY.md).
    #[serde(default)]
    pub share_metrics: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub state_dir: PathBuf,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: String,
    /// Give up after this many failed connection attempts in a row (0: never).
    #[serde(default)]
    pub max_connect_attempts: u32,
    /// Exit once the coordinator says the federation is finished.
    #[serde(default = "default_true")]
    pub exit_when_finished: bool,
    /// Loopback address of the daemon's `/status` endpoint (default `127.0.0.1:8479`;
    /// `"off"` for none).
    pub status_listen: Option<String>,
}

fn default_device() -> String {
    "auto".into()
}
fn default_max_backoff() -> String {
    "60s".into()
}

/// The site's own privacy budget: nothing the coordinator sends can raise it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiteBudget {
    pub max_epsilon: f64,
    pub delta: f64,
    pub max_rounds: Option<u64>,
    pub require_dp: bool,
    /// Send exact counts and metrics under a DP plan (opt-in).
    pub share_metrics: bool,
}

/// The agent's validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub coordinator_addr: String,
    pub server_name: String,
    pub tls: TlsPaths,
    pub train_data: PathBuf,
    pub validation_data: Option<PathBuf>,
    /// Clinicians' corrections (JSONL, appended by the triage service, trained on with
    /// `train_data`).
    pub feedback_data: PathBuf,
    pub model_base: PathBuf,
    /// The largest global model the agent downloads, in bytes.
    pub max_model_bytes: usize,
    pub labels: Vec<String>,
    pub budget: SiteBudget,
    pub state_dir: PathBuf,
    pub device: String,
    pub max_backoff: Duration,
    pub max_connect_attempts: u32,
    pub exit_when_finished: bool,
    pub transport: Transport,
    /// Renew the certificate over the connection before it expires.
    pub auto_renew: bool,
    pub service: ServiceConfig,
    /// The daemon's loopback status endpoint, if any.
    pub status_listen: Option<SocketAddr>,
}

impl AgentConfig {
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_raw(toml::from_str(text)?, base_dir)
    }

    pub fn from_raw(raw: RawAgentConfig, base_dir: &Path) -> Result<Self, ConfigError> {
        let has_port =
            raw.coordinator.address.rsplit_once(':').is_some_and(|(host, port)| !host.trim().is_empty() && port.parse::<u16>().is_ok());
        if !has_port {
            // An agent would otherwise retry a name it can never resolve, forever.
            return Err(invalid("coordinator.address", format!("{:?} must be host:port", raw.coordinator.address)));
        }
        if raw.coordinator.server_name.trim().is_empty() {
            return Err(invalid("coordinator.server_name", "must name the coordinator's certificate"));
        }
        let b = raw.budget;
        // A budget has to bound something: NaN and infinity are refused with the rest.
        if !b.max_epsilon.is_finite() || b.max_epsilon <= 0.0 {
            return Err(invalid("budget.max_epsilon", "must be a positive, finite number"));
        }
        if !(b.delta > 0.0 && b.delta < 1.0) {
            return Err(invalid("budget.delta", "must be in (0, 1)"));
        }
        let device = raw.agent.device;
        if !(device == "auto" || device == "cpu" || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok())) {
            return Err(invalid("agent.device", "must be auto, cpu or cuda:N"));
        }
        if raw.tls.crl.is_some() {
            return Err(invalid("tls.crl", "only the coordinator checks revocation; an agent has no revocation list"));
        }
        let auto_renew = raw.tls.auto_renew.unwrap_or(true);
        let state_dir = resolve(base_dir, raw.agent.state_dir);
        let status_listen = match raw.agent.status_listen.as_deref().unwrap_or("127.0.0.1:8479") {
            "off" => None,
            a => {
                let addr = parse_addr("agent.status_listen", a)?;
                if !addr.ip().is_loopback() {
                    return Err(invalid("agent.status_listen", "must be a loopback address (or \"off\")"));
                }
                Some(addr)
            }
        };
        Ok(Self {
            status_listen,
            auto_renew,
            service: ServiceConfig::from_raw(raw.service, base_dir)?,
            feedback_data: raw.data.feedback.map_or_else(|| state_dir.join("feedback.jsonl"), |p| resolve(base_dir, p)),
            coordinator_addr: raw.coordinator.address,
            server_name: raw.coordinator.server_name,
            tls: tls_paths(base_dir, raw.tls),
            train_data: resolve(base_dir, raw.data.train),
            validation_data: raw.data.validation.map(|p| resolve(base_dir, p)),
            model_base: resolve(base_dir, raw.model.base),
            max_model_bytes: raw.model.max_model_mib.saturating_mul(1 << 20),
            labels: validate_labels(raw.model.labels)?,
            budget: SiteBudget {
                max_epsilon: b.max_epsilon,
                delta: b.delta,
                max_rounds: b.max_rounds,
                require_dp: b.require_dp,
                share_metrics: b.share_metrics,
            },
            state_dir,
            device,
            max_backoff: parse_duration("agent.max_backoff", &raw.agent.max_backoff)?,
            max_connect_attempts: raw.agent.max_connect_attempts,
            exit_when_finished: raw.agent.exit_when_finished,
            transport: Transport::from_raw(&raw.transport)?,
        })
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn validate_labels(labels: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let labels = labels.unwrap_or_else(|| DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect());
    if labels.len() < 2 {
        return Err(invalid("model.labels", "need at least two labels"));
    }
    let mut seen = std::collections::HashSet::new();
    for l in &labels {
        if l.trim().is_empty() || !seen.insert(l.as_str()) {
            return Err(invalid("model.labels", format!("labels must be non-empty and distinct ({l:?})")));
        }
    }
    Ok(labels)
}

fn tls_paths(base: &Path, raw: RawTls) -> TlsPaths {
    TlsPaths {
        ca_cert: resolve(base, raw.ca_cert),
        cert: resolve(base, raw.cert),
        key: resolve(base, raw.key),
        crl: raw.crl.map(|c| resolve(base, c)),
    }
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| invalid(field, format!("{s:?} is not an ip:port address")))
}

/// Parses a human duration such as `90s`, `10m` or `1h 30m`.
pub fn parse_duration(field: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s).map_err(|e| invalid(field, format!("{s:?}: {e}")))?;
    if d.is_zero() {
        return Err(invalid(field, "must be longer than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COORD: &str = r#"
[server]
listen = "127.0.0.1:7443"
state_dir = "state"
[tls]
ca_cert = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "/etc/fedward/coordinator.key"
[federation]
rounds = 3
min_sites = 2
round_deadline = "90s"
[model]
init = "models/base"
[training]
trainable = "head"
[privacy]
mode = "site-level"
noise_multiplier = 1.2
clip_norm = 0.5
min_noise_multiplier = 1.0
max_clip_norm = 1.0
[[sites]]
id = "a"
[[sites]]
id = "b"
name = "Hospital B"
"#;

    #[test]
    fn coordinator_config_parses_and_resolves_paths() {
        let c = CoordinatorConfig::parse(COORD, Path::new("/srv/fedward")).unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/fedward/state"));
        assert_eq!(c.tls.key, Path::new("/etc/fedward/coordinator.key"));
        assert_eq!(c.round_deadline, Duration::from_secs(90));
        assert_eq!(c.plan.trainable, Trainable::Head);
        assert_eq!(c.plan.optimizer, Optimizer::AdamW);
        assert_eq!(c.policy.mode, PrivacyMode::SiteLevel);
        assert_eq!(c.policy.min_noise_multiplier, 1.0);
        assert_eq!(c.sites[1].name, "Hospital B");
        assert_eq!(c.labels, DEFAULT_LABELS);
        // The ledger defaults: the key beside the TLS key, the file in the state directory.
        assert_eq!(c.ledger_key, Path::new("/etc/fedward/ledger.key"));
        assert_eq!(c.ledger_file, Path::new("/srv/fedward/state/ledger.jsonl"));
        // Aggregation defaults: norm-bounded FedAvg, clamped example weights, the bound
        // from the privacy plan.
        assert_eq!(c.aggregation, Aggregation::default());
        let text = format!(
            "{}\n[aggregation]\nmethod = \"trimmed-mean\"\ntrim_fraction = 0.2\nweighting = \"equal\"\nmax_update_norm = 3.5\nover_norm = \"refuse\"\n",
            COORD.replace("mode = \"site-level\"", "mode = \"off\"")
        );
        let c = CoordinatorConfig::parse(&text, Path::new("/")).unwrap();
        assert_eq!(
            c.aggregation,
            Aggregation {
                method: AggregationMethod::TrimmedMean { trim_fraction: 0.2 },
                weighting: Weighting::Equal,
                max_examples_per_site: DEFAULT_MAX_EXAMPLES_PER_SITE,
                max_update_norm: Some(3.5),
                over_norm: OverNorm::Refuse,
                update_encoding: UpdateEncoding::F32,
                server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
            }
        );
        let with = |encoding: &str| {
            CoordinatorConfig::parse(&format!("{COORD}\n[aggregation]\nupdate_encoding = \"{encoding}\"\n"), Path::new("/"))
        };
        assert_eq!(with("int8-row").unwrap().aggregation.update_encoding, UpdateEncoding::Int8Row);
        let err = with("int4").unwrap_err().to_string();
        assert!(err.starts_with("aggregation.update_encoding") && err.contains("f32, f16, int8, int8-row"), "{err}");
        let text = format!("{COORD}\n[ledger]\nsigning_key = \"keys/ledger.key\"\nfile = \"/var/log/fedward/ledger.jsonl\"\n");
        let c = CoordinatorConfig::parse(&text, Path::new("/srv/fedward")).unwrap();
        assert_eq!(c.ledger_key, Path::new("/srv/fedward/keys/ledger.key"));
        assert_eq!(c.ledger_file, Path::new("/var/log/fedward/ledger.jsonl"));
        let bad = format!("{COORD}\n[ledger]\nkey = \"x\"\n");
        assert!(matches!(CoordinatorConfig::parse(&bad, Path::new("/")), Err(ConfigError::Toml(_))));
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (COORD.replace("rounds = 3", "rounds = 0"), "federation.rounds"),
            (COORD.replace("min_sites = 2", "min_sites = 3"), "federation.min_sites"),
            (COORD.replace("\"90s\"", "\"soon\""), "federation.round_deadline"),
            (COORD.replace("\"head\"", "\"top:x\""), "training.trainable"),
            (COORD.replace("trainable = \"head\"", "trainable = \"head\"\noptimizer = \"adam\""), "training.optimizer"),
            (COORD.replace("id = \"b\"", "id = \"a\""), "sites.id"),
            (COORD.replace("id = \"b\"", "id = \"Bad Site\""), "sites.id"),
            (COORD.replace("\"127.0.0.1:7443\"", "\"nowhere\""), "server.listen"),
            (COORD.replace("noise_multiplier = 1.2", "noise_multiplier = 0.5"), "privacy"),
            (format!("{COORD}\n[aggregation]\nmethod = \"mean\"\n"), "aggregation.method"),
            (format!("{COORD}\n[aggregation]\nmethod = \"trimmed-mean\"\ntrim_fraction = 0.5\n"), "aggregation.trim_fraction"),
            (format!("{COORD}\n[aggregation]\nweighting = \"votes\"\n"), "aggregation.weighting"),
            (format!("{COORD}\n[aggregation]\nover_norm = \"drop\"\n"), "aggregation.over_norm"),
            (format!("{COORD}\n[aggregation]\nmax_examples_per_site = 0\n"), "aggregation.max_examples_per_site"),
            (format!("{COORD}\n[aggregation]\nmax_update_norm = nan\n"), "aggregation.max_update_norm"),
            (format!("{COORD}\n[aggregation]\nmax_update_norm = inf\n"), "aggregation.max_update_norm"),
            (format!("{COORD}\n[aggregation]\nmax_update_norm = -1.0\n"), "aggregation.max_update_norm"),
            // Without DP the consortium must say how far one update may move the model.
            (COORD.replace("mode = \"site-level\"", "mode = \"off\""), "aggregation.max_update_norm"),
            (format!("{COORD}\n[aggregation]\nserver_optimizer = \"adam\"\n"), "aggregation.server_optimizer"),
            (format!("{COORD}\n[aggregation]\nserver_learning_rate = 0.0\n"), "aggregation.server_learning_rate"),
            (format!("{COORD}\n[aggregation]\nserver_learning_rate = nan\n"), "aggregation.server_learning_rate"),
            // The adaptive optimisers' step is about the learning rate whatever the update: no default.
            (format!("{COORD}\n[aggregation]\nserver_optimizer = \"fedadam\"\n"), "aggregation.server_learning_rate"),
            (format!("{COORD}\n[aggregation]\nserver_optimizer = \"fedavgm\"\nserver_momentum = 1.0\n"), "aggregation.server_momentum"),
            (format!("{COORD}\n[aggregation]\nserver_momentum = 0.9\n"), "aggregation.server_momentum"),
            (format!("{COORD}\n[aggregation]\nserver_optimizer = \"fedavgm\"\ntau = 0.1\n"), "aggregation.tau"),
            (
                format!("{COORD}\n[aggregation]\nserver_optimizer = \"fedyogi\"\nserver_learning_rate = 0.01\nbeta2 = -0.1\n"),
                "aggregation.beta2",
            ),
            (
                format!("{COORD}\n[aggregation]\nserver_optimizer = \"fedadam\"\nserver_learning_rate = 0.01\ntau = 0.0\n"),
                "aggregation.tau",
            ),
            (
                format!("{COORD}\n[aggregation]\nserver_optimizer = \"fedadam\"\nserver_learning_rate = 0.01\nserver_momentum = 0.5\n"),
                "aggregation.server_momentum",
            ),
            (COORD.replace("trainable = \"head\"", "trainable = \"head\"\nprox_mu = -1.0"), "training.prox_mu"),
            (COORD.replace("trainable = \"head\"", "trainable = \"head\"\nprox_mu = inf"), "training.prox_mu"),
        ];
        for (text, field) in cases {
            let err = CoordinatorConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn server_optimizers_parse_with_their_defaults() {
        let parse = |keys: &str| CoordinatorConfig::parse(&format!("{COORD}\n[aggregation]\n{keys}\n"), Path::new("/")).unwrap();
        // The default changes nothing: FedAvg at server learning rate 1.
        assert!(CoordinatorConfig::parse(COORD, Path::new("/")).unwrap().aggregation.server_optimizer.is_identity());
        assert_eq!(parse("server_learning_rate = 0.5").aggregation.server_optimizer, ServerOptimizer::FedAvg { learning_rate: 0.5 });
        assert_eq!(
            parse("server_optimizer = \"fedavgm\"").aggregation.server_optimizer,
            ServerOptimizer::FedAvgM { learning_rate: 1.0, momentum: 0.9 }
        );
        assert_eq!(
            parse("server_optimizer = \"fedavgm\"\nserver_momentum = 0.5\nserver_learning_rate = 0.7").aggregation.server_optimizer,
            ServerOptimizer::FedAvgM { learning_rate: 0.7, momentum: 0.5 }
        );
        assert_eq!(
            parse("server_optimizer = \"fedadam\"\nserver_learning_rate = 0.01").aggregation.server_optimizer,
            ServerOptimizer::FedAdam { learning_rate: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 }
        );
        let yogi = parse("server_optimizer = \"fedyogi\"\nserver_learning_rate = 0.01\nbeta1 = 0\nbeta2 = 0.5\ntau = 1e-6");
        assert_eq!(yogi.aggregation.server_optimizer, ServerOptimizer::FedYogi { learning_rate: 0.01, beta1: 0.0, beta2: 0.5, tau: 1e-6 });
        assert_eq!(yogi.aggregation.server_optimizer.moments(), 2);
        // With a robust method: the optimiser takes whatever combined update it produced.
        let robust = parse("method = \"median\"\nserver_optimizer = \"fedavgm\"");
        assert_eq!((robust.aggregation.method, robust.aggregation.server_optimizer.moments()), (AggregationMethod::Median, 1));
        // FedProx: off unless set.
        assert_eq!(CoordinatorConfig::parse(COORD, Path::new("/")).unwrap().plan.prox_mu, 0.0);
        let c = CoordinatorConfig::parse(&COORD.replace("trainable = \"head\"", "trainable = \"head\"\nprox_mu = 0.01"), Path::new("/"));
        assert_eq!(c.unwrap().plan.prox_mu, 0.01);
    }

    #[test]
    fn secure_aggregation_has_its_own_section_and_named_errors() {
        let secure = |section: &str| format!("{COORD}\n[aggregation]\nmethod = \"secure\"\n[secure_aggregation]\n{section}\n");
        let c = CoordinatorConfig::parse(&secure("threshold = 2\nmin_sites = 2"), Path::new("/")).unwrap();
        assert_eq!(c.aggregation.method, AggregationMethod::FedAvg, "the mean of the secure sum");
        let s = c.secure.expect("secure");
        assert_eq!(s.params, SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 64 });
        assert_eq!(s.step_deadline, Duration::from_secs(60));
        let c =
            CoordinatorConfig::parse(&secure("threshold = 2\nmin_sites = 2\nmodulus_bits = 40\nstep_deadline = \"2m\""), Path::new("/"))
                .unwrap();
        assert_eq!(c.secure.as_ref().map(|s| (s.params.modulus_bits, s.step_deadline)), Some((40, Duration::from_secs(120))));
        assert!(CoordinatorConfig::parse(COORD, Path::new("/")).unwrap().secure.is_none());
        let cases = [
            (format!("{COORD}\n[aggregation]\nmethod = \"secure\"\n"), "secure_aggregation"),
            (format!("{COORD}\n[secure_aggregation]\nthreshold = 2\nmin_sites = 2\n"), "secure_aggregation"),
            (secure("threshold = 1\nmin_sites = 2"), "secure_aggregation.threshold"),
            (secure("threshold = 3\nmin_sites = 3"), "secure_aggregation.threshold"),
            (secure("threshold = 2\nmin_sites = 1"), "secure_aggregation.min_sites"),
            (secure("threshold = 2\nmin_sites = 2\nneighbours = 3"), "secure_aggregation.neighbours"),
            (secure("threshold = 2\nmin_sites = 2\nneighbours = 4"), "secure_aggregation.threshold"),
            (secure("threshold = 2\nmin_sites = 2\nmodulus_bits = 8"), "secure_aggregation.modulus_bits"),
            (secure("threshold = 2\nmin_sites = 2\nstep_deadline = \"soon\""), "secure_aggregation.step_deadline"),
            (
                COORD.replace("min_sites = 2", "min_sites = 1")
                    + "\n[aggregation]\nmethod = \"secure\"\n[secure_aggregation]\nthreshold = 2\nmin_sites = 2\n",
                "federation.min_sites",
            ),
            (
                secure("threshold = 2\nmin_sites = 2").replace("method = \"secure\"", "method = \"secure\"\nover_norm = \"refuse\""),
                "aggregation.over_norm",
            ),
            (
                secure("threshold = 2\nmin_sites = 2").replace("method = \"secure\"", "method = \"secure\"\nupdate_encoding = \"int8\""),
                "aggregation.update_encoding",
            ),
        ];
        for (text, field) in cases {
            let err = CoordinatorConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
        // Unknown fields are refused.
        assert!(matches!(
            CoordinatorConfig::parse(&secure("threshold = 2\nmin_sites = 2\nk = 2"), Path::new("/")),
            Err(ConfigError::Toml(_))
        ));
    }

    #[test]
    fn distributed_dp_needs_a_secure_sum_equal_weights_and_enough_honest_sites() {
        // Three sites, a secure sum of at least 2 (threshold 2), equal weights.
        let three = format!("{COORD}\n[[sites]]\nid = \"c\"\n");
        let cfg = |privacy: &str, aggregation: &str, secure: Option<&str>| {
            let text = three.replace("mode = \"site-level\"", privacy);
            let section = secure.map_or(String::new(), |s| format!("[secure_aggregation]\n{s}\n"));
            format!("{text}\n[aggregation]\n{aggregation}\n{section}")
        };
        let dist = "mode = \"distributed\"\nmin_honest = 2";
        let (secure_equal, sa) = ("method = \"secure\"\nweighting = \"equal\"", Some("threshold = 2\nmin_sites = 2"));
        let c = CoordinatorConfig::parse(&cfg(dist, secure_equal, sa), Path::new("/")).unwrap();
        assert_eq!(c.plan.privacy, PrivacyPlan::Distributed { noise_multiplier: 1.2, clip_norm: 0.5, min_honest: 2 });
        assert_eq!(c.policy.mode, PrivacyMode::Distributed);
        let cases = [
            (cfg("mode = \"distributed\"", secure_equal, sa), "privacy.min_honest"),
            (cfg("mode = \"distributed\"\nmin_honest = 0", secure_equal, sa), "privacy.min_honest"),
            (cfg("mode = \"site-level\"\nmin_honest = 2", secure_equal, sa), "privacy.min_honest"),
            (cfg(dist, "weighting = \"equal\"", None), "privacy.mode"),
            // A sum may be unmasked with `threshold` sites: fewer than min_honest = 3.
            (cfg("mode = \"distributed\"\nmin_honest = 3", secure_equal, sa), "privacy.min_honest"),
            (cfg(dist, "method = \"secure\"", sa), "aggregation.weighting"),
        ];
        for (text, field) in cases {
            let err = CoordinatorConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn model_selection_needs_score_noise_under_dp_and_no_secure_sum() {
        // COORD runs site-level DP.
        let with = |section: &str| format!("{COORD}\n[selection]\n{section}\n");
        let c = CoordinatorConfig::parse(&with("model = \"best\"\nnoise_multiplier = 8.0"), Path::new("/")).unwrap();
        assert_eq!(c.selection, Some(Selection { noise_multiplier: 8.0 }));
        assert_eq!(CoordinatorConfig::parse(COORD, Path::new("/")).unwrap().selection, None);
        let off = COORD.replace("mode = \"site-level\"", "mode = \"off\"");
        let c = CoordinatorConfig::parse(
            &format!("{off}\n[aggregation]\nmax_update_norm = 5.0\n[selection]\nmodel = \"best\"\n"),
            Path::new("/"),
        );
        assert_eq!(c.unwrap().selection, Some(Selection { noise_multiplier: 0.0 }));
        let cases = [
            (with("model = \"best\""), "selection.noise_multiplier"),
            (with("model = \"best\"\nnoise_multiplier = 0.0"), "selection.noise_multiplier"),
            (with("model = \"last\"\nnoise_multiplier = 8.0"), "selection.noise_multiplier"),
            (with("model = \"newest\""), "selection.model"),
            (
                format!("{COORD}\n[aggregation]\nmethod = \"secure\"\n[secure_aggregation]\nthreshold = 2\nmin_sites = 2\n[selection]\nmodel = \"best\"\nnoise_multiplier = 8.0\n"),
                "selection.model",
            ),
        ];
        for (text, field) in cases {
            let err = CoordinatorConfig::parse(&text, Path::new("/")).unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_deploy_example_configs_are_valid() {
        // What an admin or hospital IT copies first must parse and pass validation.
        let coordinator = CoordinatorConfig::parse(include_str!("../../deploy/config/coordinator.toml"), Path::new("/")).unwrap();
        assert_eq!(coordinator.plan.trainable.to_string(), "lora:8");
        AgentConfig::parse(include_str!("../../deploy/config/agent.toml"), Path::new("/")).unwrap();
    }

    #[test]
    fn admin_endpoints_are_never_open_beyond_loopback() {
        let with = |server: &str, admin: &str| format!("{}\n[admin]\n{admin}\n", COORD.replace("[server]", &format!("[server]\n{server}")));
        let parse = |text: &str| CoordinatorConfig::parse(text, Path::new("/etc/fedward"));
        // Loopback: tokens, or the explicit unauthenticated mode; neither is refused.
        let c = parse(&with("admin_listen = \"127.0.0.1:7080\"", "tokens = \"admin-tokens\"")).unwrap();
        assert_eq!(c.admin_tokens.as_deref(), Some(Path::new("/etc/fedward/admin-tokens")));
        assert!(!c.admin_https);
        let c = parse(&with("admin_listen = \"[::1]:7080\"", "unauthenticated_loopback = true")).unwrap();
        assert!(c.admin_tokens.is_none());
        let err = parse(&with("admin_listen = \"127.0.0.1:7080\"", "")).unwrap_err();
        assert!(err.to_string().contains("admin.tokens"), "{err}");
        // Elsewhere: tokens required, unauthenticated impossible, and always HTTPS.
        let err = parse(&with("admin_listen = \"0.0.0.0:7080\"", "unauthenticated_loopback = true")).unwrap_err();
        assert!(err.to_string().contains("not a loopback address"), "{err}");
        let c = parse(&with("admin_listen = \"10.1.2.3:7080\"", "tokens = \"t\"")).unwrap();
        assert!(c.admin_https);
        let err = parse(&with("admin_listen = \"127.0.0.1:7080\"", "tokens = \"t\"\nunauthenticated_loopback = true")).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = COORD.replace("[training]", "[training]\nepochs = 3");
        assert!(matches!(CoordinatorConfig::parse(&text, Path::new("/")), Err(ConfigError::Toml(_))));
    }

    #[test]
    fn agent_config_parses() {
        let text = r#"
[coordinator]
address = "127.0.0.1:7443"
server_name = "coordinator"
[tls]
ca_cert = "ca.crt"
cert = "site.crt"
key = "site.key"
[data]
train = "data/train.jsonl"
[model]
base = "models/base"
[budget]
max_epsilon = 8.0
delta = 1e-5
[agent]
state_dir = "state"
"#;
        let c = AgentConfig::parse(text, Path::new("/site")).unwrap();
        assert_eq!(c.train_data, Path::new("/site/data/train.jsonl"));
        assert_eq!(c.budget.max_epsilon, 8.0);
        assert!(c.budget.require_dp);
        assert_eq!(c.max_backoff, Duration::from_secs(60));
        let bad = text.replace("delta = 1e-5", "delta = 2.0");
        assert!(AgentConfig::parse(&bad, Path::new("/")).unwrap_err().to_string().starts_with("budget.delta"));
        for epsilon in ["0.0", "-1.0", "nan", "inf"] {
            let bad = text.replace("max_epsilon = 8.0", &format!("max_epsilon = {epsilon}"));
            let err = AgentConfig::parse(&bad, Path::new("/")).unwrap_err().to_string();
            assert!(err.starts_with("budget.max_epsilon"), "{epsilon}: {err}");
        }
        let bad = text.replace("state_dir = \"state\"", "state_dir = \"state\"\ndevice = \"gpu\"");
        assert!(AgentConfig::parse(&bad, Path::new("/")).unwrap_err().to_string().starts_with("agent.device"));
        // An address without a port would be retried forever: refused here instead.
        for address in ["coordinator.example", "coordinator.example:", ":7443", "host:port", "host:70000"] {
            let bad = text.replace("127.0.0.1:7443", address);
            let err = AgentConfig::parse(&bad, Path::new("/")).unwrap_err().to_string();
            assert!(err.starts_with("coordinator.address"), "{address}: {err}");
        }
        for address in ["fedward.example.org:7443", "[::1]:7443"] {
            AgentConfig::parse(&text.replace("127.0.0.1:7443", address), Path::new("/")).unwrap();
        }
    }
}
