//! The auditor's and the planner's commands, shared by both binaries:
//! `audit verify|reconcile|report` and `privacy epsilon|sigma` (record-level, site-level,
//! and distributed DP under secure aggregation).
//!
//! The argument structs derive clap's `Subcommand`/`Args` only with the `cli` feature
//! (both binaries enable it), so the commands are written once and `shared` builds without
//! clap; tests construct the structs directly. The same feature gives the binaries their
//! common start and end: [`main`]. Each `run_*` function reads its files
//! (through [`crate::fsutil`] and [`crate::ledger_key`]), calls the pure functions of
//! [`crate::audit`] and [`crate::dp`], writes what it found to `out`, and returns whether
//! everything passed: the binaries exit 0 when it did, 1 when it did not, 64 on
//! [`CliError::is_usage`] errors and 1 on other errors. The caller passes the clock.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;
/// Re-exported so a binary can pass the wall clock without naming the `time` crate.
pub use time::OffsetDateTime;

use crate::audit::{self, LedgerAudit};
use crate::dp::distributed::{self, DistributedRelease};
use crate::dp::{plan_epsilon, plan_min_sigma, zcdp, DpError, Plan};
use crate::fsutil::{self, FsError};
use crate::ledger::format_time;
use crate::ledger_key::{self, KeyFileError};
use crate::plan::PrivacyMode;
use crate::wire::SiteId;

/// The config file a daemon command reads (`run`, `serve`, `check-config`).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ConfigFile {
    /// The config file (TOML); relative paths inside it are taken from its directory.
    #[cfg_attr(feature = "cli", arg(long, short))]
    pub config: PathBuf,
}

/// Check privacy ledgers: integrity, signatures, epsilons, agreement between site and coordinator.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Subcommand))]
pub enum AuditCommand {
    /// Verify one ledger: hash chain, seal signatures (coordinator ledgers) and every epsilon
    /// recomputed from the recorded parameters. Exits 1 when anything is wrong.
    Verify(VerifyArgs),
    /// Compare a site's releases with the updates the coordinator accepted from it.
    /// Exits 1 on any mismatch.
    Reconcile(ReconcileArgs),
    /// Write an HTML report (inline chart, no external assets), report.json and report.csv.
    /// Exits 1 when the report's verdict is FAIL.
    Report(ReportArgs),
}

/// Arguments of `audit verify`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct VerifyArgs {
    /// The ledger file: a site's `ledger.jsonl` or the coordinator's.
    #[cfg_attr(feature = "cli", arg(long))]
    pub ledger: PathBuf,
    /// The coordinator's public key (`ledger.pub`) to check seals with.
    #[cfg_attr(feature = "cli", arg(long))]
    pub public_key: Option<PathBuf>,
    /// Report recomputed epsilons at this delta (default: each entry's own).
    #[cfg_attr(feature = "cli", arg(long))]
    pub delta: Option<f64>,
    /// Print the verdict as JSON.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
}

/// Arguments of `audit reconcile`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ReconcileArgs {
    /// The site's ledger file.
    #[cfg_attr(feature = "cli", arg(long))]
    pub site_ledger: PathBuf,
    /// The coordinator's ledger file.
    #[cfg_attr(feature = "cli", arg(long))]
    pub coordinator_ledger: PathBuf,
    /// The site id to reconcile (as in its certificate).
    #[cfg_attr(feature = "cli", arg(long))]
    pub site: SiteId,
    /// The coordinator's public key (`ledger.pub`) to check its seals with.
    #[cfg_attr(feature = "cli", arg(long))]
    pub public_key: Option<PathBuf>,
    /// Print the result as JSON.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
}

/// Arguments of `audit report`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ReportArgs {
    /// Site ledger files (repeatable, or several after one --ledger).
    #[cfg_attr(feature = "cli", arg(long, num_args = 1.., required = true))]
    pub ledger: Vec<PathBuf>,
    /// The coordinator's ledger, to verify and reconcile every site against.
    #[cfg_attr(feature = "cli", arg(long))]
    pub coordinator_ledger: Option<PathBuf>,
    /// The coordinator's public key (`ledger.pub`) to check seals with.
    #[cfg_attr(feature = "cli", arg(long))]
    pub public_key: Option<PathBuf>,
    /// Show recomputed epsilons at this delta (default: each entry's own).
    #[cfg_attr(feature = "cli", arg(long))]
    pub delta: Option<f64>,
    /// Directory to write report.html, report.json and report.csv into (created if missing).
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: PathBuf,
}

/// Plan differential privacy: the epsilon a plan spends, or the noise a target needs.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Subcommand))]
pub enum PrivacyCommand {
    /// The epsilon per site that a plan spends over all its rounds.
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier whose epsilon over all rounds meets a target.
    Sigma(SigmaArgs),
}

/// The mechanism a plan uses: a [`PrivacyMode`], or `distributed` (site-level DP whose
/// noise is split among the sites under secure aggregation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanMode {
    Off,
    RecordLevel,
    SiteLevel,
    Distributed,
}

impl PlanMode {
    /// The name `--mode` takes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::RecordLevel => "record-level",
            Self::SiteLevel => "site-level",
            Self::Distributed => "distributed",
        }
    }
}

impl From<PrivacyMode> for PlanMode {
    fn from(m: PrivacyMode) -> Self {
        match m {
            PrivacyMode::Off => Self::Off,
            PrivacyMode::RecordLevel => Self::RecordLevel,
            PrivacyMode::SiteLevel => Self::SiteLevel,
            PrivacyMode::Distributed => Self::Distributed,
        }
    }
}

impl std::fmt::Display for PlanMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PlanMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "distributed" => Ok(Self::Distributed),
            other => other
                .parse::<PrivacyMode>()
                .map(Self::from)
                .map_err(|_| format!("unknown privacy mode {s:?}: expected off, record-level, site-level or distributed")),
        }
    }
}

/// The plan both `privacy` commands take.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PlanArgs {
    /// record-level (DP-SGD: one patient's record is protected), site-level (DP-FedAvg: a
    /// whole site's data is protected, each site adds the full noise), or distributed
    /// (site-level under secure aggregation: each site adds only a share of discrete
    /// Gaussian noise and the coordinator sees only the sum; needs --sites, --min-honest,
    /// --scale and --dim).
    #[cfg_attr(feature = "cli", arg(long))]
    pub mode: PlanMode,
    /// Clipping norm C: sets the noise std (sigma * C), not epsilon.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub clip: f64,
    /// Record-level: Poisson sampling rate q of records per step, in (0, 1].
    #[cfg_attr(feature = "cli", arg(long))]
    pub sampling_rate: Option<f64>,
    /// Record-level: DP-SGD steps per round.
    #[cfg_attr(feature = "cli", arg(long))]
    pub steps_per_round: Option<u64>,
    /// Rounds the site takes part in.
    #[cfg_attr(feature = "cli", arg(long))]
    pub rounds: u64,
    /// The delta epsilon is stated at, in (0, 1); well below 1/(records at a site).
    #[cfg_attr(feature = "cli", arg(long))]
    pub delta: f64,
    /// Site-level: also show the global model's guarantee when this many sites add noise.
    /// Distributed: the sites whose inputs secure aggregation sums (each adds a share).
    #[cfg_attr(feature = "cli", arg(long))]
    pub sites: Option<u64>,
    /// Distributed: how many of --sites are assumed to add their share honestly; only their
    /// noise is counted (the others may add none or reveal theirs to the coordinator).
    #[cfg_attr(feature = "cli", arg(long))]
    pub min_honest: Option<u64>,
    /// Distributed: fixed-point units per model unit (the quantizer's scale): a clipped
    /// update of norm C becomes an integer vector of norm about C * scale.
    #[cfg_attr(feature = "cli", arg(long))]
    pub scale: Option<f64>,
    /// Distributed: coordinates in an update (the rounding error and the
    /// sum-of-discrete-Gaussians term both grow with it).
    #[cfg_attr(feature = "cli", arg(long))]
    pub dim: Option<u64>,
    /// Distributed: secure aggregation sums modulo 2^bits (recorded, checked for headroom;
    /// wrapping is post-processing and does not change epsilon).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub modulus_bits: u32,
    /// Distributed: account for conditional randomized rounding with failure probability
    /// beta per try (the quantizer must re-round until the norm is within the bound);
    /// without it, the deterministic bound C * scale + sqrt(dim), valid for any rounding.
    #[cfg_attr(feature = "cli", arg(long))]
    pub rounding_beta: Option<f64>,
    /// Print JSON (`{"epsilon": .., "delta": ..}` or `{"sigma": ..}` plus details).
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
}

/// Arguments of `privacy epsilon`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EpsilonArgs {
    /// Noise multiplier sigma (noise std over clipping norm). Distributed: the central
    /// multiplier, the std of the honest sites' summed noise over C; each site adds
    /// sigma * C / sqrt(min-honest).
    #[cfg_attr(feature = "cli", arg(long, visible_alias = "noise-multiplier"))]
    pub sigma: f64,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub plan: PlanArgs,
}

/// Arguments of `privacy sigma`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct SigmaArgs {
    /// The epsilon per site the plan must not exceed over all its rounds.
    #[cfg_attr(feature = "cli", arg(long))]
    pub target_epsilon: f64,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub plan: PlanArgs,
}

/// Manage a tokens file: the coordinator's `[admin] tokens`, the agent's `[service] tokens`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Subcommand))]
pub enum TokenCommand {
    /// Create a token for a person or tool: prints it once; the file keeps only its hash.
    Add {
        /// The tokens file (created 0600 when missing).
        #[cfg_attr(feature = "cli", arg(long))]
        tokens: PathBuf,
        /// Who holds it (shown in the audit log).
        #[cfg_attr(feature = "cli", arg(long))]
        name: String,
        /// admin (reads and controls) or auditor (reads); the agent's triage service lets
        /// any holder of its tokens file in.
        #[cfg_attr(feature = "cli", arg(long))]
        role: crate::access::Role,
    },
    /// Withdraw a holder's token (effective at the next request).
    Remove {
        /// The tokens file.
        #[cfg_attr(feature = "cli", arg(long))]
        tokens: PathBuf,
        /// The holder whose token to withdraw.
        #[cfg_attr(feature = "cli", arg(long))]
        name: String,
    },
    /// List the holders and their roles.
    List {
        /// The tokens file.
        #[cfg_attr(feature = "cli", arg(long))]
        tokens: PathBuf,
    },
}

/// Runs a `token` command: a new token goes to `out` (once), what was done to `note`.
pub fn run_token(cmd: &TokenCommand, out: &mut dyn Write, note: &mut dyn Write) -> Result<(), CliError> {
    use crate::access::{Tokens, TOKEN_PREFIX};
    let read = |path: &Path| Tokens::load(path).map_err(|message| invalid("tokens", message));
    match cmd {
        TokenCommand::Add { tokens, name, role } => {
            let mut file = if tokens.exists() { read(tokens)? } else { Tokens::default() };
            let token = {
                use rand::RngCore;
                let mut secret = [0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                format!("{TOKEN_PREFIX}{}", hex::encode(secret))
            };
            file.add(name, *role, &token).map_err(|e| invalid("name", e.to_string()))?;
            fsutil::atomic_write(tokens, file.render().as_bytes(), true)?;
            writeln!(out, "{token}")?;
            writeln!(
                note,
                "added {name} ({role}) to {}; the token above is shown once: give it to {name} in a 0600 file",
                tokens.display()
            )?;
        }
        TokenCommand::Remove { tokens, name } => {
            let mut file = read(tokens)?;
            if !file.remove(name) {
                return Err(invalid("name", format!("{} lists no {name}", tokens.display())));
            }
            fsutil::atomic_write(tokens, file.render().as_bytes(), true)?;
            writeln!(out, "removed {name}; their token stops working at their next request")?;
        }
        TokenCommand::List { tokens } => {
            for h in read(tokens)?.holders() {
                writeln!(out, "{:<24} {}", h.name, h.role)?;
            }
        }
    }
    Ok(())
}

/// Why a command could not run (its findings are not errors: see the `run_*` results).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid {name}: {message}")]
    Invalid { name: &'static str, message: String },
    #[error(transparent)]
    Dp(#[from] DpError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

impl CliError {
    /// A bad parameter (exit 64) rather than a failure to run.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Invalid { .. } | Self::Dp(DpError::InvalidParameter { .. }))
    }
}

fn invalid(name: &'static str, message: impl Into<String>) -> CliError {
    CliError::Invalid { name, message: message.into() }
}

/// Runs an `audit` command; `Ok(true)` when everything passed.
pub fn run_audit(cmd: &AuditCommand, now: OffsetDateTime, out: &mut dyn Write) -> Result<bool, CliError> {
    match cmd {
        AuditCommand::Verify(a) => verify(a, out),
        AuditCommand::Reconcile(a) => reconcile(a, out),
        AuditCommand::Report(a) => report(a, now, out),
    }
}

/// `audit verify`.
pub fn verify(args: &VerifyArgs, out: &mut dyn Write) -> Result<bool, CliError> {
    let delta = check_optional_delta(args.delta)?;
    let key = public_key(args.public_key.as_deref())?;
    let bytes = fsutil::read(&args.ledger)?;
    let audit = audit::audit_ledger(&bytes, key.as_ref(), delta);
    if args.json {
        #[derive(Serialize)]
        struct Json<'a> {
            ledger: String,
            passed: bool,
            #[serde(flatten)]
            audit: &'a LedgerAudit,
        }
        let j = Json { ledger: args.ledger.display().to_string(), passed: audit.passed(), audit: &audit };
        writeln!(out, "{}", serde_json::to_string_pretty(&j).map_err(io::Error::other)?)?;
    } else {
        out.write_all(audit::render_verify_text(&args.ledger.display().to_string(), &audit).as_bytes())?;
    }
    Ok(audit.passed())
}

/// `audit reconcile`.
pub fn reconcile(args: &ReconcileArgs, out: &mut dyn Write) -> Result<bool, CliError> {
    let key = public_key(args.public_key.as_deref())?;
    let site_bytes = fsutil::read(&args.site_ledger)?;
    let coord_bytes = fsutil::read(&args.coordinator_ledger)?;
    let r = audit::reconcile_ledgers(&args.site, &site_bytes, &coord_bytes, key.as_ref());
    if args.json {
        #[derive(Serialize)]
        struct Json<'a> {
            passed: bool,
            site: &'a str,
            matched: usize,
            mismatches: &'a [audit::Finding],
            site_ledger_findings: &'a [audit::Finding],
            coordinator_ledger_findings: &'a [audit::Finding],
        }
        let j = Json {
            passed: r.passed(),
            site: &r.site,
            matched: r.matched,
            mismatches: &r.mismatches,
            site_ledger_findings: &r.site_ledger.findings,
            coordinator_ledger_findings: &r.coordinator_ledger.findings,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&j).map_err(io::Error::other)?)?;
    } else {
        let text =
            audit::render_reconcile_text(&args.site_ledger.display().to_string(), &args.coordinator_ledger.display().to_string(), &r);
        out.write_all(text.as_bytes())?;
    }
    Ok(r.passed())
}

/// `audit report`: writes `report.html`, `report.json` and `report.csv` into `args.out`.
pub fn report(args: &ReportArgs, now: OffsetDateTime, out: &mut dyn Write) -> Result<bool, CliError> {
    let delta = check_optional_delta(args.delta)?;
    if args.ledger.is_empty() {
        return Err(invalid("ledger", "give at least one site ledger"));
    }
    let key = public_key(args.public_key.as_deref())?;
    // Reading and auditing each ledger, then writing the report: a bar on a terminal's
    // stderr (long ledgers take a while), nothing when piped.
    let steps = 2 * (args.ledger.len() + usize::from(args.coordinator_ledger.is_some())) + 1;
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} steps, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut read = |path: &std::path::Path| -> Result<(String, Vec<u8>), CliError> {
        bar.set_message(format!("reading {}", path.display()));
        let bytes = fsutil::read(path)?;
        bar.inc(1);
        Ok((path.display().to_string(), bytes))
    };
    let sites = args.ledger.iter().map(|p| read(p)).collect::<Result<Vec<_>, _>>()?;
    let coordinator = args.coordinator_ledger.as_deref().map(&mut read).transpose()?;
    let generated_at = format_time(now).unwrap_or_else(|_| "unknown".into());
    let mut audited = 0;
    let report = audit::build_report(&sites, coordinator, key.as_ref(), delta, generated_at, &mut |name| {
        // Each audit's start is the previous one's end.
        bar.inc(u64::from(audited > 0));
        audited += 1;
        bar.set_message(format!("auditing {name}"));
    });
    bar.inc(1);
    bar.set_message("writing the report");
    let html = args.out.join("report.html");
    fsutil::atomic_write(&html, audit::render_html(&report).as_bytes(), false)?;
    fsutil::atomic_write(&args.out.join("report.json"), audit::render_json(&report).as_bytes(), false)?;
    fsutil::atomic_write(&args.out.join("report.csv"), audit::render_csv(&report).as_bytes(), false)?;
    bar.inc(1);
    bar.finish_and_clear();
    for n in report.ledgers.iter().chain(&report.coordinator) {
        writeln!(out, "{}: {} ledger, {} entries, {} problems", n.name, n.audit.kind, n.audit.entries, n.audit.failures())?;
    }
    for r in &report.reconciliations {
        let fails = r.mismatches.iter().filter(|f| f.severity == audit::Severity::Fail).count();
        writeln!(
            out,
            "site {}: {} rounds match the coordinator, {fails} mismatches, {} warnings",
            r.site,
            r.matched,
            r.mismatches.len() - fails
        )?;
    }
    writeln!(out, "verdict: {}", if report.passed { "PASS" } else { "FAIL" })?;
    writeln!(out, "wrote {} (and report.json, report.csv)", html.display())?;
    Ok(report.passed)
}

fn public_key(path: Option<&Path>) -> Result<Option<VerifyingKey>, CliError> {
    Ok(path.map(ledger_key::read_public_key).transpose()?)
}

fn check_optional_delta(delta: Option<f64>) -> Result<Option<f64>, CliError> {
    match delta {
        Some(d) if !(d > 0.0 && d < 1.0) => Err(invalid("delta", format!("{d} is outside (0, 1)"))),
        d => Ok(d),
    }
}

/// The global model's guarantee when every site adds its noise (site-level only).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GlobalModel {
    pub sites: u64,
    pub epsilon: f64,
    pub delta: f64,
}

/// What `privacy epsilon` computes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpsilonAnswer {
    /// Epsilon per site over all rounds, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    pub mode: String,
    pub sigma: f64,
    pub clip: f64,
    /// Noise std `sigma * clip`.
    pub noise_std: f64,
    pub rounds: u64,
    pub sampling_rate: Option<f64>,
    pub steps_per_round: Option<u64>,
    pub total_steps: Option<u64>,
    /// Site-level: total zCDP rho over all rounds.
    pub rho: Option<f64>,
    pub global_model: Option<GlobalModel>,
    /// Distributed: the noise share and what the bound rests on.
    pub distributed: Option<DistributedAnswer>,
}

/// The distributed-DP detail of a `privacy` answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DistributedAnswer {
    pub sites: u64,
    pub min_honest: u64,
    /// Each site's discrete Gaussian sigma, in integer units.
    pub site_sigma: f64,
    /// The same in model units (`site_sigma / scale`).
    pub site_std: f64,
    pub scale: f64,
    pub dim: u64,
    pub modulus_bits: u32,
    /// Conditional randomized rounding's beta; `None`: the deterministic norm bound.
    pub rounding_beta: Option<f64>,
    /// Largest L2 norm of one site's rounded update, integer units.
    pub l2_bound: f64,
    /// KLS21's tau (the sum of discrete Gaussians' distance from one).
    pub tau: f64,
    /// Std of the honest sites' summed noise, model units (`sqrt(min_honest) site_std`).
    pub central_std: f64,
    /// A bound on a coordinate of the sum, integer units (every site's whole norm in one
    /// coordinate plus 10 std of the summed noise).
    pub sum_bound: f64,
    /// Whether `sum_bound` is below `2^(modulus_bits - 1)` (no wrap-around in a signed reading).
    pub fits_modulus: bool,
    /// For comparison: the per-site epsilon of site-level DP where every site adds noise of
    /// the same multiplier in full (no secure aggregation).
    pub site_level_epsilon: f64,
}

/// What `privacy sigma` computes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SigmaAnswer {
    /// The smallest noise multiplier (within `tolerance`, relative) meeting the target.
    pub sigma: f64,
    /// Its epsilon per site, at most `target_epsilon`.
    pub epsilon: f64,
    pub target_epsilon: f64,
    pub delta: f64,
    pub tolerance: f64,
    pub noise_std: f64,
    pub mode: String,
    pub rounds: u64,
    pub global_model: Option<GlobalModel>,
    /// Distributed: the per-site share found and what the bound rests on.
    pub distributed: Option<DistributedAnswer>,
}

/// Checks a plan's parameters and builds the accountant's [`Plan`] for noise `sigma`.
pub fn plan_of(args: &PlanArgs, sigma: f64) -> Result<Plan, CliError> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(invalid("sigma", format!("{sigma} must be a finite number > 0")));
    }
    if !(args.clip.is_finite() && args.clip > 0.0) {
        return Err(invalid("clip", format!("{} must be a finite number > 0", args.clip)));
    }
    if !(args.delta > 0.0 && args.delta < 1.0) {
        return Err(invalid("delta", format!("{} is outside (0, 1)", args.delta)));
    }
    if args.rounds == 0 {
        return Err(invalid("rounds", "must be at least 1"));
    }
    let distributed_only = [
        ("min-honest", args.min_honest.is_some()),
        ("scale", args.scale.is_some()),
        ("dim", args.dim.is_some()),
        ("rounding-beta", args.rounding_beta.is_some()),
    ];
    if args.mode != PlanMode::Distributed {
        if let Some((name, _)) = distributed_only.iter().find(|(_, given)| *given) {
            return Err(invalid(name, format!("--{name} applies to distributed plans only")));
        }
    }
    let (mode, sampling_rate, steps_per_round) = match args.mode {
        PlanMode::Off => return Err(invalid("mode", "off spends an unbounded epsilon; choose record-level, site-level or distributed")),
        PlanMode::RecordLevel => {
            let q = args.sampling_rate.ok_or_else(|| invalid("sampling-rate", "record-level needs --sampling-rate"))?;
            if !(q > 0.0 && q <= 1.0) {
                return Err(invalid("sampling-rate", format!("{q} is outside (0, 1]")));
            }
            let k = args.steps_per_round.ok_or_else(|| invalid("steps-per-round", "record-level needs --steps-per-round"))?;
            if k == 0 {
                return Err(invalid("steps-per-round", "must be at least 1"));
            }
            if args.sites.is_some() {
                return Err(invalid("sites", "the global-model figure is for site-level plans"));
            }
            (PrivacyMode::RecordLevel, q, k)
        }
        PlanMode::SiteLevel | PlanMode::Distributed => {
            if args.sampling_rate.is_some() || args.steps_per_round.is_some() {
                return Err(invalid("sampling-rate", "--sampling-rate and --steps-per-round apply to record-level plans only"));
            }
            if args.sites == Some(0) {
                return Err(invalid("sites", "must be at least 1"));
            }
            (PrivacyMode::SiteLevel, 0.0, 1)
        }
    };
    Ok(Plan { mode, noise_multiplier: sigma, clip_norm: args.clip, sampling_rate, steps_per_round, rounds: args.rounds, delta: args.delta })
}

/// `privacy epsilon`, computed.
pub fn epsilon_answer(args: &EpsilonArgs) -> Result<EpsilonAnswer, CliError> {
    let plan = plan_of(&args.plan, args.sigma)?;
    if args.plan.mode == PlanMode::Distributed {
        let release = distributed_release(&args.plan, args.sigma)?;
        let d = distributed_answer(&args.plan, &release, args.sigma)?;
        return Ok(EpsilonAnswer {
            epsilon: distributed::distributed_epsilon(&release.params(), plan.rounds, plan.delta)?,
            delta: plan.delta,
            mode: PlanMode::Distributed.to_string(),
            sigma: args.sigma,
            clip: plan.clip_norm,
            noise_std: d.central_std,
            rounds: plan.rounds,
            sampling_rate: None,
            steps_per_round: None,
            total_steps: None,
            rho: None,
            global_model: None,
            distributed: Some(d),
        });
    }
    let epsilon = plan_epsilon(&plan)?;
    let record = plan.mode == PrivacyMode::RecordLevel;
    Ok(EpsilonAnswer {
        epsilon,
        delta: plan.delta,
        mode: plan.mode.to_string(),
        sigma: plan.noise_multiplier,
        clip: plan.clip_norm,
        noise_std: plan.noise_multiplier * plan.clip_norm,
        rounds: plan.rounds,
        sampling_rate: record.then_some(plan.sampling_rate),
        steps_per_round: record.then_some(plan.steps_per_round),
        total_steps: record.then(|| plan.steps_per_round.saturating_mul(plan.rounds)),
        rho: if record { None } else { Some(zcdp::rho_for_rounds(&[(plan.noise_multiplier, plan.rounds)])?) },
        global_model: global_model(&args.plan, plan.noise_multiplier)?,
        distributed: None,
    })
}

/// `privacy sigma`, computed.
pub fn sigma_answer(args: &SigmaArgs) -> Result<SigmaAnswer, CliError> {
    let t = args.target_epsilon;
    if !(t.is_finite() && t > 0.0) {
        return Err(invalid("target-epsilon", format!("{t} must be a finite number > 0")));
    }
    // The plan's own sigma is ignored by the search; 1 only passes validation.
    let plan = plan_of(&args.plan, 1.0)?;
    if args.plan.mode == PlanMode::Distributed {
        let release = distributed_release(&args.plan, 1.0)?;
        let found = distributed::distributed_min_sigma(&release.params(), plan.rounds, plan.delta, t)?;
        // What a site adds: the share for the found multiplier on the sampler's grid (a hair
        // more noise, so its epsilon is still within the target), which `privacy epsilon`
        // at the same multiplier reproduces.
        let site_sigma = distributed::site_sigma_for(found.noise_multiplier, plan.clip_norm, release.scale, release.min_honest);
        let release = DistributedRelease { site_sigma, ..release };
        return Ok(SigmaAnswer {
            sigma: found.noise_multiplier,
            epsilon: distributed::distributed_epsilon(&release.params(), plan.rounds, plan.delta)?,
            target_epsilon: t,
            delta: plan.delta,
            tolerance: found.tolerance,
            noise_std: found.central_std,
            mode: PlanMode::Distributed.to_string(),
            rounds: plan.rounds,
            global_model: None,
            distributed: Some(distributed_answer(&args.plan, &release, found.noise_multiplier)?),
        });
    }
    let found = plan_min_sigma(&plan, t)?;
    Ok(SigmaAnswer {
        sigma: found.noise_multiplier,
        epsilon: found.epsilon,
        target_epsilon: t,
        delta: plan.delta,
        tolerance: found.tolerance,
        noise_std: found.noise_std,
        mode: plan.mode.to_string(),
        rounds: plan.rounds,
        global_model: global_model(&args.plan, found.noise_multiplier)?,
        distributed: None,
    })
}

/// The release one round of a distributed plan makes at central noise multiplier `sigma`:
/// each of the honest sites adds `sigma C scale / sqrt(min_honest)` integer units.
pub fn distributed_release(args: &PlanArgs, sigma: f64) -> Result<DistributedRelease, CliError> {
    let sites = args.sites.ok_or_else(|| invalid("sites", "distributed needs --sites (the sites summed)"))?;
    let min_honest = args.min_honest.ok_or_else(|| invalid("min-honest", "distributed needs --min-honest (the sites assumed honest)"))?;
    if min_honest == 0 || min_honest > sites {
        return Err(invalid("min-honest", format!("{min_honest} must be between 1 and --sites ({sites})")));
    }
    let scale = args.scale.ok_or_else(|| invalid("scale", "distributed needs --scale (fixed-point units per model unit)"))?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(invalid("scale", format!("{scale} must be a finite number > 0")));
    }
    let dim = args.dim.ok_or_else(|| invalid("dim", "distributed needs --dim (coordinates in an update)"))?;
    if dim == 0 {
        return Err(invalid("dim", "must be at least 1"));
    }
    if !(1..=64).contains(&args.modulus_bits) {
        return Err(invalid("modulus-bits", format!("{} is outside 1 to 64", args.modulus_bits)));
    }
    if let Some(beta) = args.rounding_beta {
        if !(beta > 0.0 && beta < 1.0) {
            return Err(invalid("rounding-beta", format!("{beta} is outside (0, 1)")));
        }
    }
    let site_sigma = distributed::site_sigma_for(sigma, args.clip, scale, min_honest);
    if !(distributed::MIN_SITE_SIGMA..=distributed::MAX_SITE_SIGMA).contains(&site_sigma) {
        return Err(invalid(
            "sigma",
            format!("gives a per-site sigma of {site_sigma} integer units, outside [0.5, 2^40]: change --sigma or --scale"),
        ));
    }
    let release = DistributedRelease {
        site_sigma,
        scale,
        modulus_bits: args.modulus_bits,
        sites,
        min_honest,
        clip_norm: args.clip,
        dim,
        rounding_beta: args.rounding_beta,
    };
    release.validate()?;
    Ok(release)
}

fn distributed_answer(args: &PlanArgs, r: &DistributedRelease, sigma: f64) -> Result<DistributedAnswer, CliError> {
    let p = r.params();
    let l2_bound = p.l2_bound();
    // A coordinate of the sum is at most every site's whole norm plus 10 std of the summed
    // noise (exceeded with probability below 1e-23 per coordinate).
    let sum_bound = r.sites as f64 * l2_bound + 10.0 * (r.sites as f64).sqrt() * r.site_sigma;
    Ok(DistributedAnswer {
        sites: r.sites,
        min_honest: r.min_honest,
        site_sigma: r.site_sigma,
        site_std: r.site_sigma / r.scale,
        scale: r.scale,
        dim: r.dim,
        modulus_bits: r.modulus_bits,
        rounding_beta: r.rounding_beta,
        l2_bound,
        tau: p.tau(),
        central_std: p.central_std(),
        sum_bound,
        fits_modulus: sum_bound < 2f64.powi(r.modulus_bits as i32 - 1),
        site_level_epsilon: zcdp::epsilon_for_rounds(&[(sigma, args.rounds)], args.delta)?,
    })
}

fn global_model(args: &PlanArgs, sigma: f64) -> Result<Option<GlobalModel>, CliError> {
    match (args.mode, args.sites) {
        (PlanMode::SiteLevel, Some(n)) => {
            Ok(Some(GlobalModel { sites: n, epsilon: zcdp::global_model_epsilon(sigma, n, args.rounds, args.delta)?, delta: args.delta }))
        }
        _ => Ok(None),
    }
}

/// Runs a `privacy` command, printing text or JSON.
pub fn run_privacy(cmd: &PrivacyCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        PrivacyCommand::Epsilon(args) => {
            let a = epsilon_answer(args)?;
            if args.plan.json {
                writeln!(out, "{}", serde_json::to_string(&a).map_err(io::Error::other)?)?;
            } else {
                write_plan(out, &a.mode, a.sigma, a.clip, &args.plan)?;
                if let Some(d) = &a.distributed {
                    write_distributed(out, d)?;
                    writeln!(
                        out,
                        "epsilon: {} at delta {} (the sum's guarantee for each site, counting only the {} honest sites' noise)",
                        fmt_f(a.epsilon),
                        a.delta,
                        d.min_honest
                    )?;
                    writeln!(
                        out,
                        "site-level at the same multiplier (every site adds sigma {} in full, no secure aggregation): epsilon per site {}",
                        fmt_f(a.sigma),
                        fmt_f(d.site_level_epsilon)
                    )?;
                    return Ok(());
                }
                writeln!(out, "epsilon per site: {} at delta {}", fmt_f(a.epsilon), a.delta)?;
                if let Some(rho) = a.rho {
                    writeln!(out, "  (zCDP rho {} over {} rounds, converted with opendp)", fmt_f(rho), a.rounds)?;
                }
                write_global(out, a.global_model.as_ref())?;
            }
        }
        PrivacyCommand::Sigma(args) => {
            let a = sigma_answer(args)?;
            if args.plan.json {
                writeln!(out, "{}", serde_json::to_string(&a).map_err(io::Error::other)?)?;
            } else {
                writeln!(
                    out,
                    "smallest noise multiplier: sigma {} (noise std {} at clip {}), reaching epsilon {} <= {} at delta {}",
                    fmt_f(a.sigma),
                    fmt_f(a.noise_std),
                    args.plan.clip,
                    fmt_f(a.epsilon),
                    a.target_epsilon,
                    a.delta
                )?;
                write_plan(out, &a.mode, a.sigma, args.plan.clip, &args.plan)?;
                if let Some(d) = &a.distributed {
                    write_distributed(out, d)?;
                }
                write_global(out, a.global_model.as_ref())?;
            }
        }
    }
    Ok(())
}

fn write_distributed(out: &mut dyn Write, d: &DistributedAnswer) -> io::Result<()> {
    writeln!(
        out,
        "each site adds discrete Gaussian noise of sigma {} integer units (std {} model units at scale {}); the {} honest sites' sum has std {}",
        fmt_f(d.site_sigma),
        fmt_f(d.site_std),
        d.scale,
        d.min_honest,
        fmt_f(d.central_std)
    )?;
    let rounding = match d.rounding_beta {
        Some(beta) => format!("conditional randomized rounding (beta {beta}; the quantizer must re-round above the bound)"),
        None => "deterministic rounding bound".to_owned(),
    };
    writeln!(out, "dimension {}, {rounding}: one site's rounded norm <= {} units; tau {:.3e}", d.dim, fmt_f(d.l2_bound), d.tau)?;
    if d.fits_modulus {
        writeln!(out, "modulus 2^{}: a coordinate of the sum stays within {} units", d.modulus_bits, fmt_f(d.sum_bound))
    } else {
        writeln!(
            out,
            "warning: modulus 2^{} may wrap: a coordinate of the sum can reach {} units (no privacy cost, but the sum is wrong): raise --modulus-bits or lower --scale",
            d.modulus_bits,
            fmt_f(d.sum_bound)
        )
    }
}

fn write_plan(out: &mut dyn Write, mode: &str, sigma: f64, clip: f64, p: &PlanArgs) -> io::Result<()> {
    match p.mode {
        PlanMode::Distributed => writeln!(
            out,
            "distributed plan (secure aggregation; protects a whole site, replace-one-site adjacency, sensitivity 2C; distributed discrete Gaussian, Kairouz-Liu-Steinke 2021, RDP): central noise multiplier {}, clip {clip}, {} sites of which {} assumed honest, {} rounds",
            fmt_f(sigma),
            p.sites.unwrap_or_default(),
            p.min_honest.unwrap_or_default(),
            p.rounds
        ),
        PlanMode::RecordLevel => writeln!(
            out,
            "record-level plan (DP-SGD; protects one record, add/remove adjacency; RDP of the sampled Gaussian): sigma {}, clip {clip}, sampling rate {}, {} steps per round x {} rounds",
            fmt_f(sigma),
            p.sampling_rate.unwrap_or_default(),
            p.steps_per_round.unwrap_or_default(),
            p.rounds
        ),
        _ => writeln!(
            out,
            "{mode} plan (DP-FedAvg; protects a whole site, replace-one-site adjacency, sensitivity 2C; zCDP): sigma {}, clip {clip}, {} rounds",
            fmt_f(sigma),
            p.rounds
        ),
    }
}

fn write_global(out: &mut dyn Write, g: Option<&GlobalModel>) -> io::Result<()> {
    if let Some(g) = g {
        writeln!(
            out,
            "global model (a separate figure; holds only if all {} sites add their noise): epsilon {} at delta {}",
            g.sites,
            fmt_f(g.epsilon),
            g.delta
        )?;
    }
    Ok(())
}

fn fmt_f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        v.to_string()
    }
}

/// Sets up logging as both binaries do: to stderr, filtered by `FEDWARD_LOG` (default
/// `info`), JSON lines with `FEDWARD_LOG_FORMAT=json`, colours only on a terminal (log
/// files and journald get plain text).
#[cfg(feature = "cli")]
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FEDWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if std::env::var("FEDWARD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A binary's `main`: logging set up ([`init_tracing`]), the arguments parsed, `run`
/// called, and a fatal error reported ([`exit_code`]).
#[cfg(feature = "cli")]
pub fn main<C: clap::Parser, E>(run: impl FnOnce(C) -> Result<std::process::ExitCode, E>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    init_tracing();
    crate::failpoint::setup();
    match run(C::parse()) {
        Ok(code) => code,
        Err(e) => exit_code(e.as_ref()),
    }
}

/// The coordinator's exit status when the federation stopped after a round failed too
/// many times: not a crash, and restarting does not help (the shipped units do not).
pub const EXIT_FEDERATION_STOPPED: u8 = 3;

/// The exit status when a daemon's state disagrees with its ledger or with the other side
/// (the coordinator: a lost `state.json`, a ledger that lost its tail; an agent: a ledger
/// lacking updates the coordinator accepted from the site): an operator must restore a
/// file (or start the coordinator with `--recover`), so restarting as it is cannot help
/// (sysexits' EX_DATAERR; the shipped units do not restart on it).
pub const EXIT_STATE_INCONSISTENT: u8 = 65;

/// How a binary ends on a fatal error: prints `error: ` and [`error_line`] to stderr, and
/// gives exit code 64 when a usage or configuration error is among the causes, else 1.
pub fn exit_code(error: &(dyn std::error::Error + 'static)) -> std::process::ExitCode {
    eprintln!("error: {}", error_line(error));
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<CliError>().is_some_and(CliError::is_usage)
            || e.downcast_ref::<crate::config::ConfigError>().is_some()
            || e.downcast_ref::<crate::fsutil::FsError>().is_some_and(crate::fsutil::FsError::is_misconfiguration)
        {
            return std::process::ExitCode::from(64);
        }
        cause = e.source();
    }
    std::process::ExitCode::FAILURE
}

/// A file or setting a config names that `check-config` found unusable: a configuration
/// error (exit 64) naming the field and every cause once.
pub fn setting_error(field: &'static str, cause: &(dyn std::error::Error + 'static)) -> crate::config::ConfigError {
    crate::config::ConfigError::Invalid { field, message: error_line(cause) }
}

/// The TLS files a config names, as `check-config` reads them: one that cannot be read is
/// a configuration error naming its field.
pub struct TlsFiles {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsFiles {
    pub fn read(paths: &crate::config::TlsPaths) -> Result<Self, crate::config::ConfigError> {
        let read = |p: &Path, field| crate::fsutil::read(p).map_err(|e| setting_error(field, &e));
        Ok(Self {
            ca_pem: read(&paths.ca_cert, "tls.ca_cert")?,
            cert_pem: read(&paths.cert, "tls.cert")?,
            key_pem: crate::fsutil::read_private_key(&paths.key).map_err(|e| setting_error("tls.key", &e))?,
        })
    }

    pub fn material(&self) -> crate::tls::TlsMaterial<'_> {
        crate::tls::TlsMaterial { ca_pem: &self.ca_pem, cert_pem: &self.cert_pem, key_pem: &self.key_pem }
    }
}

/// One line for an error and its causes, `error: cause: cause ..` as anyhow's `{:#}` prints
/// it, except that a cause whose text the line already ends with is not repeated: many of
/// our errors carry their cause's text in their own message (so that a plain `{e}` in a log
/// line says why) and also expose it as their source.
pub fn error_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use std::fs;

    use ed25519_dalek::SigningKey;
    use time::macros::datetime;

    use super::*;
    use crate::ledger::{Body, Entry, EntryHash, Ledger};
    use crate::wire::RoundId;

    const NOW: OffsetDateTime = datetime!(2025-03-03 09:00 UTC);

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("tls: {0}")]
        Repeats(#[from] Inner),
        #[error("could not start")]
        Wraps(#[source] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("bad certificate")]
    struct Inner(#[source] std::io::Error);

    /// A key others can read is a setting to fix (exit 64: systemd does not restart it),
    /// wherever it sits among the causes; an I/O failure is not.
    #[test]
    fn a_misconfiguration_among_the_causes_exits_64() {
        #[derive(Debug, thiserror::Error)]
        #[error("building the TLS configuration")]
        struct Context(#[source] FsError);
        let open_key = FsError::KeyTooOpen { path: "site.key".into(), mode: 0o644 };
        assert_eq!(exit_code(&Context(open_key)), std::process::ExitCode::from(64));
        let missing = FsError::Io { path: "site.key".into(), error: std::io::Error::from(std::io::ErrorKind::NotFound) };
        assert_eq!(exit_code(&Context(missing)), std::process::ExitCode::FAILURE);
    }

    #[test]
    fn error_line_names_each_cause_once() {
        let io = || std::io::Error::other("no such file");
        assert_eq!(error_line(&Outer::Repeats(Inner(io()))), "tls: bad certificate: no such file");
        assert_eq!(error_line(&Outer::Wraps(Inner(io()))), "could not start: bad certificate: no such file");
        assert_eq!(error_line(&io()), "no such file");
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[11u8; 32])
    }

    fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        site: PathBuf,
        coordinator: PathBuf,
        public: PathBuf,
    }

    /// Two site ledgers (alpha, beta), the coordinator's sealed ledger, and its public key.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let a = crate::audit::tests::site_ledger("alpha", 3);
        let b = crate::audit::tests::site_ledger("beta", 3);
        let c = crate::audit::tests::coordinator_ledger(&[&a, &b], &key());
        let (site, coordinator) = (dir.path().join("alpha.jsonl"), dir.path().join("coordinator.jsonl"));
        fs::write(&site, a.to_bytes()).unwrap();
        fs::write(dir.path().join("beta.jsonl"), b.to_bytes()).unwrap();
        fs::write(&coordinator, c.to_bytes()).unwrap();
        let (_, public) = ledger_key::write_keypair(&dir.path().join("keys"), [11u8; 32]).unwrap();
        Fixture { dir, site, coordinator, public }
    }

    fn verify_file(path: &Path, key: Option<&Path>) -> (bool, String) {
        let args = VerifyArgs { ledger: path.to_owned(), public_key: key.map(Path::to_owned), delta: None, json: false };
        let mut out = Vec::new();
        let ok = verify(&args, &mut out).unwrap();
        (ok, String::from_utf8(out).unwrap())
    }

    /// Writes `bytes` next to the fixture and verifies them.
    fn verify_bytes(f: &Fixture, bytes: &[u8], key: bool) -> (bool, String) {
        let path = f.dir.path().join("tampered.jsonl");
        fs::write(&path, bytes).unwrap();
        verify_file(&path, key.then_some(f.public.as_path()))
    }

    fn rechain(entries: &mut [Entry]) -> Vec<u8> {
        let mut prev = EntryHash::GENESIS;
        for e in entries.iter_mut() {
            e.prev_hash = prev;
            e.hash = e.compute_hash();
            prev = e.hash;
        }
        entries.iter().flat_map(Entry::to_line).collect()
    }

    #[test]
    fn verify_passes_clean_ledgers() {
        let f = fixture();
        let (ok, text) = verify_file(&f.site, None);
        assert!(ok, "{text}");
        assert!(text.contains("site ledger, 3 entries") && text.contains("verdict: PASS"), "{text}");
        let (ok, text) = verify_file(&f.coordinator, Some(&f.public));
        assert!(ok, "{text}");
        assert!(text.contains("3 verified with key"), "{text}");
        // JSON carries the verdict and the rows.
        let args = VerifyArgs { ledger: f.coordinator.clone(), public_key: Some(f.public.clone()), delta: Some(1e-6), json: true };
        let mut out = Vec::new();
        assert!(verify(&args, &mut out).unwrap());
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(j["passed"], true);
        assert_eq!(j["rows"].as_array().unwrap().len(), 6);
        assert_eq!(j["rows"][0]["delta"], 1e-6);
    }

    #[test]
    fn verify_names_every_kind_of_tampering() {
        let f = fixture();
        let site = fs::read(&f.site).unwrap();
        let coord = fs::read(&f.coordinator).unwrap();

        // Edited: a field changed without fixing the hash.
        let text = String::from_utf8(site.clone()).unwrap().replacen("\"examples\":200", "\"examples\":20", 1);
        let (ok, out) = verify_bytes(&f, text.as_bytes(), false);
        assert!(!ok && out.contains("FAIL seq 1 (line 2) [edited]"), "{out}");

        // Deleted.
        let mut l = lines(&site);
        l.remove(1);
        let (ok, out) = verify_bytes(&f, &l.concat(), false);
        assert!(!ok && out.contains("[deleted]: entry 1 deleted"), "{out}");

        // Inserted: a forged copy of entry 1 with a valid own hash.
        let mut forged: Entry = serde_json::from_slice(&lines(&site)[1]).unwrap();
        if let Body::Release(r) = &mut forged.body {
            r.examples = 1;
        }
        forged.hash = forged.compute_hash();
        let mut l = lines(&site);
        l.insert(1, forged.to_line());
        let (ok, out) = verify_bytes(&f, &l.concat(), false);
        assert!(!ok && out.contains("FAIL seq 1 (line 2) [inserted]"), "{out}");

        // Reordered.
        let mut l = lines(&site);
        l.swap(0, 2);
        let (ok, out) = verify_bytes(&f, &l.concat(), false);
        assert!(!ok && out.contains("[reordered]"), "{out}");

        // Forged signature: the coordinator's ledger rewritten and re-chained, seals intact.
        let mut entries: Vec<Entry> = lines(&coord).iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
        if let Body::Accepted(a) = &mut entries[0].body {
            a.examples += 1;
        }
        let (ok, out) = verify_bytes(&f, &rechain(&mut entries), true);
        assert!(!ok && out.contains("FAIL seq 2 (line 3) [bad-signature]"), "{out}");
        // A seal made with another key.
        let mut entries: Vec<Entry> = lines(&coord).iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
        let mut partial = Ledger::new();
        for e in entries.drain(..2) {
            partial.push(e).unwrap();
        }
        let rogue = partial.prepare_seal(RoundId(1), &SigningKey::from_bytes(&[99; 32]), NOW).unwrap();
        let mut bytes = partial.to_bytes();
        bytes.extend(rogue.to_line());
        let (ok, out) = verify_bytes(&f, &bytes, true);
        assert!(!ok && out.contains("[unknown-key]"), "{out}");

        // Epsilon mismatch: a lowered epsilon, re-chained so only the recompute sees it.
        let mut entries: Vec<Entry> = lines(&site).iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
        if let Body::Release(r) = &mut entries[2].body {
            r.privacy.epsilon_after *= 0.5;
        }
        let (ok, out) = verify_bytes(&f, &rechain(&mut entries), false);
        assert!(!ok && out.contains("FAIL seq 2 [epsilon-under-counted]: epsilon mismatch"), "{out}");
    }

    #[test]
    fn verify_refuses_bad_parameters_and_keys() {
        let f = fixture();
        let args = VerifyArgs { ledger: f.site.clone(), public_key: None, delta: Some(1.0), json: false };
        let err = verify(&args, &mut Vec::new()).unwrap_err();
        assert!(err.is_usage() && err.to_string().contains("delta"), "{err}");
        let bad_key = f.dir.path().join("bad.pub");
        fs::write(&bad_key, "nonsense\n").unwrap();
        let args = VerifyArgs { ledger: f.site.clone(), public_key: Some(bad_key), delta: None, json: false };
        assert!(matches!(verify(&args, &mut Vec::new()), Err(CliError::Key(_))));
    }

    #[test]
    fn reconcile_detects_missing_extra_and_different_updates() {
        let f = fixture();
        let run = |site_bytes: &[u8], coord: &Path| {
            let path = f.dir.path().join("site-variant.jsonl");
            fs::write(&path, site_bytes).unwrap();
            let args = ReconcileArgs {
                site_ledger: path,
                coordinator_ledger: coord.to_owned(),
                site: SiteId::new("alpha").unwrap(),
                public_key: Some(f.public.clone()),
                json: false,
            };
            let mut out = Vec::new();
            let ok = reconcile(&args, &mut out).unwrap();
            (ok, String::from_utf8(out).unwrap())
        };
        let site = fs::read(&f.site).unwrap();
        let (ok, out) = run(&site, &f.coordinator);
        assert!(ok && out.contains("3 rounds match, 0 mismatches"), "{out}");

        // Missing at the coordinator: the site released round 4 too. It over-counts (the
        // safe direction), so the verdict passes with a warning.
        let more = crate::audit::tests::site_ledger("alpha", 4).to_bytes();
        let (ok, out) = run(&more, &f.coordinator);
        assert!(ok && out.contains("[not-accepted]: round 4") && out.contains("0 mismatches, 1 warnings"), "{out}");

        // Extra at the coordinator: the site's ledger lacks round 3.
        let fewer = crate::audit::tests::site_ledger("alpha", 2).to_bytes();
        let (ok, out) = run(&fewer, &f.coordinator);
        assert!(!ok && out.contains("[no-release-at-site]: round 3"), "{out}");

        // Different: the site's round-2 update has another digest (re-chained site ledger).
        let mut entries: Vec<Entry> = lines(&site).iter().map(|l| serde_json::from_slice(l).unwrap()).collect();
        if let Body::Release(r) = &mut entries[1].body {
            r.update_digest = crate::tensor::Digest([7; 32]);
        }
        let (ok, out) = run(&rechain(&mut entries), &f.coordinator);
        assert!(!ok && out.contains("[digest-mismatch]: round 2"), "{out}");
    }

    #[test]
    fn report_writes_html_json_and_csv() {
        let f = fixture();
        let out_dir = f.dir.path().join("report");
        let args = ReportArgs {
            ledger: vec![f.site.clone(), f.dir.path().join("beta.jsonl")],
            coordinator_ledger: Some(f.coordinator.clone()),
            public_key: Some(f.public.clone()),
            delta: None,
            out: out_dir.clone(),
        };
        let mut out = Vec::new();
        assert!(report(&args, NOW, &mut out).unwrap(), "{}", String::from_utf8_lossy(&out));
        let html = fs::read_to_string(out_dir.join("report.html")).unwrap();
        assert!(html.contains("<svg") && html.contains("Verdict: PASS") && html.contains("2025-03-03T09:00:00Z"));
        let csv = fs::read_to_string(out_dir.join("report.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows[0], crate::audit::CSV_HEADER);
        assert_eq!(rows.len(), 1 + 3 + 3 + 6);
        assert_eq!(rows.iter().filter(|r| r.contains(",site,alpha,")).count(), 3);
        assert_eq!(rows.iter().filter(|r| r.contains(",coordinator,beta,")).count(), 3);
        let json: serde_json::Value = serde_json::from_str(&fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(json["reconciliations"].as_array().unwrap().len(), 2);
        assert_eq!(json["reconciliations"][0]["matched"], 3);

        // A tampered site ledger turns the verdict.
        let text = fs::read_to_string(&f.site).unwrap().replacen("\"examples\":100", "\"examples\":1", 1);
        fs::write(&f.site, text).unwrap();
        let mut out = Vec::new();
        assert!(!report(&args, NOW, &mut out).unwrap());
        assert!(fs::read_to_string(out_dir.join("report.html")).unwrap().contains("Verdict: FAIL"));
    }

    fn record_plan() -> PlanArgs {
        PlanArgs {
            mode: PlanMode::RecordLevel,
            clip: 1.0,
            sampling_rate: Some(0.01),
            steps_per_round: Some(100),
            rounds: 100,
            delta: 1e-5,
            sites: None,
            min_honest: None,
            scale: None,
            dim: None,
            modulus_bits: 32,
            rounding_beta: None,
            json: true,
        }
    }

    fn distributed_plan() -> PlanArgs {
        PlanArgs {
            mode: PlanMode::Distributed,
            sites: Some(10),
            min_honest: Some(7),
            scale: Some(256.0),
            dim: Some(10_000),
            rounds: 10,
            ..site_plan()
        }
    }

    fn site_plan() -> PlanArgs {
        PlanArgs { mode: PlanMode::SiteLevel, sampling_rate: None, steps_per_round: None, rounds: 50, sites: Some(10), ..record_plan() }
    }

    /// Against dp-accounting 0.6 with its defaults (`dp/reference/rdp_reference.json`):
    /// q = 0.01 over 10 000 steps at delta 1e-5 gives 6.712756664482653 for sigma 1.0 and
    /// 3.459385046899576 for sigma 1.5; the plan splits the steps into 100 rounds of 100.
    #[test]
    fn epsilon_matches_dp_accounting() {
        for (sigma, reference) in [(1.0, 6.712756664482653), (1.5, 3.459385046899576)] {
            let a = epsilon_answer(&EpsilonArgs { sigma, plan: record_plan() }).unwrap();
            assert!((a.epsilon - reference).abs() <= 1e-6 * reference, "sigma {sigma}: {} vs {reference}", a.epsilon);
            assert_eq!(a.total_steps, Some(10_000));
        }
        let mut out = Vec::new();
        run_privacy(&PrivacyCommand::Epsilon(EpsilonArgs { sigma: 1.0, plan: record_plan() }), &mut out).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!((j["epsilon"].as_f64().unwrap() - 6.712756664482653).abs() < 1e-5);
        assert_eq!(j["delta"], 1e-5);
    }

    /// The DP-SGD MNIST setting of Abadi et al. 2016 (TF Privacy tutorial): q = 256/60000,
    /// 60 epochs of 234 steps, delta 1e-5. The tutorial publishes 2.92 for sigma 1.12 with
    /// the older, looser RDP-to-DP conversion; the tight conversion gives less (about 2.5).
    #[test]
    fn epsilon_is_below_the_mnist_tutorial_figure() {
        let plan = PlanArgs { sampling_rate: Some(256.0 / 60000.0), steps_per_round: Some(234), rounds: 60, ..record_plan() };
        let a = epsilon_answer(&EpsilonArgs { sigma: 1.12, plan }).unwrap();
        assert!((2.3..2.92).contains(&a.epsilon), "{}", a.epsilon);
    }

    #[test]
    fn site_level_epsilon_and_the_global_model_figure() {
        let a = epsilon_answer(&EpsilonArgs { sigma: 4.0, plan: site_plan() }).unwrap();
        assert_eq!(a.epsilon, zcdp::epsilon_for_rounds(&[(4.0, 50)], 1e-5).unwrap());
        assert!((a.rho.unwrap() - 50.0 * 2.0 / 16.0).abs() < 1e-9, "{:?}", a.rho);
        let g = a.global_model.clone().unwrap();
        assert_eq!(g.epsilon, zcdp::global_model_epsilon(4.0, 10, 50, 1e-5).unwrap());
        assert!(g.epsilon < a.epsilon);
        let mut out = Vec::new();
        let plan = PlanArgs { json: false, ..site_plan() };
        run_privacy(&PrivacyCommand::Epsilon(EpsilonArgs { sigma: 4.0, plan }), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("epsilon per site:") && text.contains("global model (a separate figure"), "{text}");
    }

    #[test]
    fn sigma_meets_the_target() {
        for plan in [record_plan(), site_plan()] {
            let a = sigma_answer(&SigmaArgs { target_epsilon: 3.0, plan: plan.clone() }).unwrap();
            assert!(a.epsilon <= 3.0);
            let back = epsilon_answer(&EpsilonArgs { sigma: a.sigma, plan: plan.clone() }).unwrap();
            assert_eq!(back.epsilon, a.epsilon);
            let mut out = Vec::new();
            run_privacy(&PrivacyCommand::Sigma(SigmaArgs { target_epsilon: 3.0, plan }), &mut out).unwrap();
            let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(j["sigma"], a.sigma);
        }
    }

    #[test]
    fn invalid_plans_are_explained() {
        let eps = |sigma: f64, plan: PlanArgs| epsilon_answer(&EpsilonArgs { sigma, plan }).unwrap_err();
        let cases = [
            (eps(1.0, PlanArgs { sampling_rate: Some(0.0), ..record_plan() }), "sampling-rate"),
            (eps(1.0, PlanArgs { sampling_rate: Some(1.5), ..record_plan() }), "sampling-rate"),
            (eps(1.0, PlanArgs { sampling_rate: None, ..record_plan() }), "sampling-rate"),
            (eps(1.0, PlanArgs { steps_per_round: None, ..record_plan() }), "steps-per-round"),
            (eps(0.0, record_plan()), "sigma"),
            (eps(-1.0, site_plan()), "sigma"),
            (eps(f64::NAN, site_plan()), "sigma"),
            (eps(1.0, PlanArgs { delta: 0.0, ..record_plan() }), "delta"),
            (eps(1.0, PlanArgs { delta: 1.0, ..site_plan() }), "delta"),
            (eps(1.0, PlanArgs { clip: 0.0, ..site_plan() }), "clip"),
            (eps(1.0, PlanArgs { rounds: 0, ..site_plan() }), "rounds"),
            (eps(1.0, PlanArgs { sites: Some(0), ..site_plan() }), "sites"),
            (eps(1.0, PlanArgs { sites: Some(3), ..record_plan() }), "sites"),
            (eps(1.0, PlanArgs { sampling_rate: Some(0.1), ..site_plan() }), "sampling-rate"),
            (eps(1.0, PlanArgs { mode: PlanMode::Off, ..site_plan() }), "mode"),
        ];
        for (err, name) in cases {
            assert!(err.is_usage(), "{err}");
            assert!(err.to_string().starts_with(&format!("invalid {name}")), "{name}: {err}");
        }
        let err = sigma_answer(&SigmaArgs { target_epsilon: -1.0, plan: site_plan() }).unwrap_err();
        assert!(err.to_string().contains("target-epsilon"), "{err}");
        let err = sigma_answer(&SigmaArgs { target_epsilon: 1e-9, plan: site_plan() }).unwrap_err();
        assert!(matches!(err, CliError::Dp(DpError::Unreachable { .. })) && !err.is_usage(), "{err}");
    }

    /// `privacy epsilon --mode distributed`: the figure is the accountant's, each site's
    /// share is sigma C scale / sqrt(min_honest), and the text names the assumption.
    #[test]
    fn distributed_epsilon_and_its_rendering() {
        let a = epsilon_answer(&EpsilonArgs { sigma: 1.0, plan: distributed_plan() }).unwrap();
        let d = a.distributed.clone().unwrap();
        // 256 / sqrt(7) = 96.7589, rounded up to a multiple of 1/256.
        assert_eq!(d.site_sigma, 24_771.0 / 256.0);
        let release = distributed_release(&distributed_plan(), 1.0).unwrap();
        assert_eq!(a.epsilon, distributed::distributed_epsilon(&release.params(), 10, 1e-5).unwrap());
        assert!(a.noise_std >= 1.0 && a.noise_std - 1.0 < 1e-4 && d.fits_modulus && a.global_model.is_none());
        assert_eq!(d.site_level_epsilon, zcdp::epsilon_for_rounds(&[(1.0, 10)], 1e-5).unwrap());
        // Rounding to a coarse grid (scale 256 against sqrt(dim) = 100) inflates the norm
        // bound by 39% and costs against site-level at the same multiplier; a fine grid
        // (scale 2^16) costs little.
        assert!(a.epsilon > 1.3 * d.site_level_epsilon, "{} vs {}", a.epsilon, d.site_level_epsilon);
        let fine = epsilon_answer(&EpsilonArgs { sigma: 1.0, plan: PlanArgs { scale: Some(65536.0), ..distributed_plan() } }).unwrap();
        assert!(fine.epsilon > d.site_level_epsilon && fine.epsilon < 1.01 * d.site_level_epsilon, "{}", fine.epsilon);
        let mut out = Vec::new();
        run_privacy(&PrivacyCommand::Epsilon(EpsilonArgs { sigma: 1.0, plan: PlanArgs { json: false, ..distributed_plan() } }), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "distributed plan (secure aggregation",
            "10 sites of which 7 assumed honest",
            "each site adds discrete Gaussian noise of sigma 96.7617 integer units",
            "counting only the 7 honest sites' noise",
            "site-level at the same multiplier",
            "modulus 2^32",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let mut out = Vec::new();
        run_privacy(&PrivacyCommand::Epsilon(EpsilonArgs { sigma: 1.0, plan: distributed_plan() }), &mut out).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(j["mode"], "distributed");
        assert_eq!(j["epsilon"], a.epsilon);
        assert_eq!(j["distributed"]["min_honest"], 7);
        // A small modulus is flagged, not refused.
        let tight = PlanArgs { modulus_bits: 12, json: false, ..distributed_plan() };
        let mut out = Vec::new();
        run_privacy(&PrivacyCommand::Epsilon(EpsilonArgs { sigma: 1.0, plan: tight }), &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("warning: modulus 2^12 may wrap"));
    }

    #[test]
    fn distributed_sigma_is_the_per_site_share() {
        let a = sigma_answer(&SigmaArgs { target_epsilon: 4.0, plan: distributed_plan() }).unwrap();
        let d = a.distributed.clone().unwrap();
        assert!(a.epsilon <= 4.0);
        assert_eq!(d.site_sigma, distributed::site_sigma_for(a.sigma, 1.0, 256.0, 7));
        let back = epsilon_answer(&EpsilonArgs { sigma: a.sigma, plan: distributed_plan() }).unwrap();
        assert_eq!(back.epsilon, a.epsilon);
        let mut out = Vec::new();
        run_privacy(
            &PrivacyCommand::Sigma(SigmaArgs { target_epsilon: 4.0, plan: PlanArgs { json: false, ..distributed_plan() } }),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("smallest noise multiplier") && text.contains("each site adds discrete Gaussian noise"), "{text}");
    }

    #[test]
    fn invalid_distributed_plans_are_explained() {
        let eps = |plan: PlanArgs| epsilon_answer(&EpsilonArgs { sigma: 1.0, plan }).unwrap_err();
        let cases = [
            (eps(PlanArgs { min_honest: Some(11), ..distributed_plan() }), "min-honest"),
            (eps(PlanArgs { min_honest: Some(0), ..distributed_plan() }), "min-honest"),
            (eps(PlanArgs { min_honest: None, ..distributed_plan() }), "min-honest"),
            (eps(PlanArgs { sites: None, ..distributed_plan() }), "sites"),
            (eps(PlanArgs { sites: Some(0), ..distributed_plan() }), "sites"),
            (eps(PlanArgs { scale: None, ..distributed_plan() }), "scale"),
            (eps(PlanArgs { scale: Some(f64::NAN), ..distributed_plan() }), "scale"),
            (eps(PlanArgs { dim: Some(0), ..distributed_plan() }), "dim"),
            (eps(PlanArgs { modulus_bits: 65, ..distributed_plan() }), "modulus-bits"),
            (eps(PlanArgs { rounding_beta: Some(0.0), ..distributed_plan() }), "rounding-beta"),
            (eps(PlanArgs { scale: Some(1e-3), ..distributed_plan() }), "sigma"),
            (eps(PlanArgs { min_honest: Some(3), ..site_plan() }), "min-honest"),
            (eps(PlanArgs { dim: Some(3), ..record_plan() }), "dim"),
        ];
        for (err, name) in cases {
            assert!(err.is_usage(), "{err}");
            assert!(err.to_string().starts_with(&format!("invalid {name}")), "{name}: {err}");
        }
        assert_eq!("distributed".parse::<PlanMode>(), Ok(PlanMode::Distributed));
        assert_eq!("site-level".parse::<PlanMode>(), Ok(PlanMode::SiteLevel));
        assert!("central".parse::<PlanMode>().unwrap_err().contains("distributed"));
    }

    /// The arguments as a binary parses them (`--noise-multiplier` is `--sigma`), and the
    /// help names what the distributed mode needs.
    #[cfg(feature = "cli")]
    #[test]
    fn distributed_arguments_parse_and_are_documented() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            privacy: PrivacyCommand,
        }
        let argv = "privacy epsilon --mode distributed --sites 10 --min-honest 7 --noise-multiplier 1.5 --scale 4096 --dim 56836 --rounding-beta 0.6 --rounds 10 --delta 1e-5";
        let cli = Cli::try_parse_from(argv.split(' ')).unwrap();
        let PrivacyCommand::Epsilon(a) = cli.privacy else { panic!("not epsilon") };
        assert_eq!((a.sigma, a.plan.mode, a.plan.sites, a.plan.min_honest), (1.5, PlanMode::Distributed, Some(10), Some(7)));
        assert_eq!((a.plan.scale, a.plan.dim, a.plan.modulus_bits, a.plan.rounding_beta), (Some(4096.0), Some(56_836), 32, Some(0.6)));
        assert!(epsilon_answer(&a).is_ok());
        let sigma =
            "privacy sigma --mode distributed --sites 3 --min-honest 2 --scale 4096 --dim 1000 --target-epsilon 8 --rounds 10 --delta 1e-5";
        assert!(matches!(Cli::try_parse_from(sigma.split(' ')).unwrap().privacy, PrivacyCommand::Sigma(_)));
        assert!(Cli::try_parse_from("privacy epsilon --mode central --sigma 1 --rounds 1 --delta 1e-5".split(' ')).is_err());
        let mut cmd = Cli::command();
        let help = cmd.find_subcommand_mut("epsilon").unwrap().render_long_help().to_string();
        for needle in ["--min-honest", "--noise-multiplier", "--scale", "--dim", "--modulus-bits", "--rounding-beta", "distributed"] {
            assert!(help.contains(needle), "{needle} missing from the help:\n{help}");
        }
    }
}
