//! One accountant for agent, coordinator and auditor; site budgets; the planning calculator.
//!
//! An [`Accountant`] holds every release a site has made (one [`Release`] per round) and
//! answers the cumulative epsilon at any delta: record-level releases compose as Rényi DP
//! of the sampled Gaussian ([`super::rdp`]), site-level releases as zCDP through opendp
//! ([`super::zcdp`]). The two adjacency notions differ (one record versus a whole site),
//! so one accountant takes one mode; a release in mode `off` makes epsilon infinite for
//! good.
//!
//! [`Budget::check`] is the agent's gate before it trains: it computes the epsilon the
//! next round *would* reach and refuses when that is above the budget. Equal is allowed,
//! above is refused, and anything that is not a number is refused.

use crate::plan::{PrivacyMode, PrivacyPlan};

use super::distributed::DistributedRelease;
use super::rdp::{check_delta, check_noise_multiplier, check_sampling_rate, Rdp};
use super::sampling::dp_sgd_steps;
use super::{zcdp, DpError};

/// The privacy-relevant parameters of one round's release.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Release {
    pub mode: PrivacyMode,
    /// Noise std over L2 sensitivity bound (`sigma`).
    pub noise_multiplier: f64,
    /// Record-level: Poisson sampling rate `q`. Ignored otherwise.
    pub sampling_rate: f64,
    /// Record-level: noisy DP-SGD steps in the round. Ignored otherwise.
    pub steps: u64,
    /// Distributed: the round's full parameters (the noise share, the quantization, the
    /// honest sites counted); the epsilon is theirs, `noise_multiplier` only says what the
    /// plan asked for. `None` in every other mode.
    pub distributed: Option<DistributedRelease>,
    /// The site also released its score of the offered global model (federated model
    /// selection); `None` when it did not.
    pub score: Option<ScoreRelease>,
}

/// A site's score of a global model on its own validation split, released beside its
/// update (or alone, in the federation's final scoring round) for federated model
/// selection. Under a DP plan it is the Gaussian mechanism, accounted with the round:
///
/// * record-level (add/remove one record): the count of correct answers, sensitivity 1,
///   noise std `noise_multiplier`: RDP `alpha / (2 z^2)`;
/// * site-level (replace the site's data): the accuracy, sensitivity 1, noise std
///   `noise_multiplier`: `1 / (2 z^2)`-zCDP, which is one DP-FedAvg round at sigma `2 z`.
///
/// Under `off` nothing is noised or counted. Distributed rounds release no score (their
/// updates are only summed; the coordinator refuses the combination).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRelease {
    /// Noise std over the score's sensitivity (0 under `off`).
    pub noise_multiplier: f64,
    /// The round released the score alone: the site trained nothing and sent no update,
    /// so only the score is counted.
    pub alone: bool,
}

impl Release {
    /// A round of DP-SGD: `steps` steps at sampling rate `q` and noise multiplier `sigma`.
    pub fn record_level(noise_multiplier: f64, sampling_rate: f64, steps: u64) -> Self {
        Self { mode: PrivacyMode::RecordLevel, noise_multiplier, sampling_rate, steps, distributed: None, score: None }
    }

    /// A round of DP-FedAvg with noise multiplier `sigma`.
    pub fn site_level(noise_multiplier: f64) -> Self {
        Self { mode: PrivacyMode::SiteLevel, noise_multiplier, sampling_rate: 0.0, steps: 1, distributed: None, score: None }
    }

    /// A round without differential privacy.
    pub fn off() -> Self {
        Self { mode: PrivacyMode::Off, noise_multiplier: 0.0, sampling_rate: 0.0, steps: 0, distributed: None, score: None }
    }

    /// A round of distributed DP under secure aggregation: `noise_multiplier` is the
    /// plan's central one, `release` what the site adds and how it quantizes.
    pub fn distributed(noise_multiplier: f64, release: DistributedRelease) -> Self {
        Self { mode: PrivacyMode::Distributed, noise_multiplier, sampling_rate: 0.0, steps: 1, distributed: Some(release), score: None }
    }

    /// The release one round under `plan` makes, for the accountant: what a site checks
    /// against its budget before it trains. Record-level rounds take
    /// [`dp_sgd_steps`]`(local_epochs, q)` noisy steps. A distributed plan's release depends
    /// on the secure round too (its scale, the update's dimension): see
    /// [`Release::distributed`]; here it is an error.
    pub fn planned(plan: &PrivacyPlan, local_epochs: u32) -> Result<Self, DpError> {
        let release = match *plan {
            PrivacyPlan::Off => Self::off(),
            PrivacyPlan::RecordLevel { noise_multiplier, sampling_rate, .. } => {
                Self::record_level(noise_multiplier, sampling_rate, dp_sgd_steps(local_epochs, sampling_rate)?)
            }
            PrivacyPlan::SiteLevel { noise_multiplier, .. } => Self::site_level(noise_multiplier),
            PrivacyPlan::Distributed { noise_multiplier, .. } => {
                return Err(DpError::invalid("distributed plan", noise_multiplier, "a secure round's parameters (Release::distributed)"))
            }
        };
        release.validate()?;
        Ok(release)
    }

    /// This release with `score` released beside (or, `alone`, instead of) the update.
    pub fn with_score(self, score: Option<ScoreRelease>) -> Self {
        Self { score, ..self }
    }

    /// Whether the round released an update (a score released alone is not one).
    pub fn has_update(&self) -> bool {
        !self.score.is_some_and(|s| s.alone)
    }

    /// Checks the parameters the mode uses.
    pub fn validate(&self) -> Result<(), DpError> {
        if let Some(score) = self.score {
            match self.mode {
                PrivacyMode::Off => {}
                PrivacyMode::RecordLevel | PrivacyMode::SiteLevel => check_noise_multiplier(score.noise_multiplier)?,
                PrivacyMode::Distributed => {
                    return Err(DpError::invalid("score noise multiplier", score.noise_multiplier, "no score under distributed DP"))
                }
            }
        }
        match self.mode {
            PrivacyMode::Off => Ok(()),
            PrivacyMode::SiteLevel => check_noise_multiplier(self.noise_multiplier),
            PrivacyMode::RecordLevel => {
                check_noise_multiplier(self.noise_multiplier)?;
                check_sampling_rate(self.sampling_rate)
            }
            PrivacyMode::Distributed => match &self.distributed {
                Some(d) => d.validate(),
                None => Err(DpError::invalid("distributed release", 0.0, "its noise share and quantization parameters")),
            },
        }
    }
}

/// The cumulative privacy loss of one site's releases.
#[derive(Clone, Debug, Default)]
pub struct Accountant {
    mode: Option<PrivacyMode>,
    unbounded: bool,
    rdp: Rdp,
    /// Site-level rounds grouped as `(sigma, count)`, in order of first use.
    site_rounds: Vec<(f64, u64)>,
    releases: u64,
    /// One-step sampled-Gaussian curves by `(q, sigma)` bits: auditors replay many rounds
    /// with the same parameters.
    curves: Vec<((u64, u64), Rdp)>,
    /// Distributed rounds' curves by their parameters, for the same reason.
    distributed_curves: Vec<(DistributedRelease, Rdp)>,
}

impl Accountant {
    pub fn new() -> Self {
        Self::default()
    }

    /// Releases recorded so far (rounds taken part in).
    pub fn releases(&self) -> u64 {
        self.releases
    }

    /// The DP mode of the releases so far (`None` before the first DP release).
    pub fn mode(&self) -> Option<PrivacyMode> {
        self.mode
    }

    /// Adds one round's release.
    pub fn record(&mut self, release: &Release) -> Result<(), DpError> {
        release.validate()?;
        self.check_mode(release.mode)?;
        let update = release.has_update();
        match release.mode {
            PrivacyMode::Off => self.unbounded = true,
            PrivacyMode::RecordLevel => {
                if update {
                    let curve = self.curve(release.sampling_rate, release.noise_multiplier)?;
                    self.rdp.compose(&curve, release.steps);
                }
                if let Some(score) = release.score {
                    // The plain Gaussian mechanism on a count of sensitivity 1.
                    let curve = self.curve(1.0, score.noise_multiplier)?;
                    self.rdp.compose(&curve, 1);
                }
                self.mode = Some(PrivacyMode::RecordLevel);
            }
            PrivacyMode::SiteLevel => {
                if update {
                    self.add_site_round(release.noise_multiplier);
                }
                if let Some(score) = release.score {
                    // Accuracy (sensitivity 1) with noise std z is 1/(2 z^2)-zCDP, which is
                    // a DP-FedAvg round (2/sigma^2) at sigma = 2 z.
                    self.add_site_round(2.0 * score.noise_multiplier);
                }
                self.mode = Some(PrivacyMode::SiteLevel);
            }
            PrivacyMode::Distributed => {
                // `validate` made sure it is there.
                let Some(d) = release.distributed else { unreachable!("validated") };
                let curve = match self.distributed_curves.iter().find(|(k, _)| *k == d) {
                    Some((_, c)) => c.clone(),
                    None => {
                        let c = d.rdp()?;
                        self.distributed_curves.push((d, c.clone()));
                        c
                    }
                };
                self.rdp.compose(&curve, 1);
                self.mode = Some(PrivacyMode::Distributed);
            }
        }
        self.releases += 1;
        Ok(())
    }

    /// Cumulative epsilon at `delta` (0 before any release, infinite after an `off` one).
    pub fn epsilon(&self, delta: f64) -> Result<f64, DpError> {
        check_delta(delta)?;
        if self.unbounded {
            return Ok(f64::INFINITY);
        }
        match self.mode {
            None => Ok(0.0),
            // Both compose as RDP on the same grid (one mode per accountant).
            Some(PrivacyMode::RecordLevel | PrivacyMode::Distributed) => Ok(self.rdp.epsilon(delta)?.0),
            Some(PrivacyMode::SiteLevel) => zcdp::epsilon_for_rounds(&self.site_rounds, delta),
            Some(PrivacyMode::Off) => Ok(f64::INFINITY),
        }
    }

    /// The epsilon at `delta` this accountant would reach after also recording `next`.
    pub fn epsilon_after(&self, next: &Release, delta: f64) -> Result<f64, DpError> {
        let mut after = self.clone();
        after.record(next)?;
        after.epsilon(delta)
    }

    fn add_site_round(&mut self, sigma: f64) {
        match self.site_rounds.iter_mut().find(|(s, _)| s.to_bits() == sigma.to_bits()) {
            Some((_, n)) => *n += 1,
            None => self.site_rounds.push((sigma, 1)),
        }
    }

    fn check_mode(&self, mode: PrivacyMode) -> Result<(), DpError> {
        match (self.mode, mode) {
            (_, PrivacyMode::Off) | (None, _) => Ok(()),
            (Some(expected), found) if expected == found => Ok(()),
            (Some(expected), found) => Err(DpError::ModeMismatch { expected, found }),
        }
    }

    fn curve(&mut self, q: f64, sigma: f64) -> Result<Rdp, DpError> {
        let key = (q.to_bits(), sigma.to_bits());
        if let Some((_, c)) = self.curves.iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let c = Rdp::sampled_gaussian(q, sigma)?;
        self.curves.push((key, c.clone()));
        Ok(c)
    }
}

/// The epsilon at `delta` a site would reach after the round described by `next`.
pub fn epsilon_after_round(accountant: &Accountant, next: &Release, delta: f64) -> Result<f64, DpError> {
    accountant.epsilon_after(next, delta)
}

/// A site's privacy budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Largest cumulative epsilon the site accepts (inclusive).
    pub max_epsilon: f64,
    /// The delta every epsilon is measured at.
    pub delta: f64,
    /// Largest number of rounds the site takes part in, if limited.
    pub max_rounds: Option<u64>,
}

/// What a round allowed by the budget will cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spend {
    pub epsilon_before: f64,
    pub epsilon_after: f64,
    /// Rounds taken part in, counting this one.
    pub rounds_after: u64,
}

/// Why a site must decline a round.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("the round would reach epsilon {would_reach} at delta {delta}, above the budget of {max_epsilon}")]
    Exceeded { would_reach: f64, max_epsilon: f64, delta: f64 },
    #[error("the budget allows {max_rounds} rounds and all are spent")]
    RoundsExhausted { max_rounds: u64 },
    #[error("invalid budget: {0}")]
    Invalid(String),
    #[error(transparent)]
    Dp(#[from] DpError),
}

impl Budget {
    /// A validated budget.
    pub fn new(max_epsilon: f64, delta: f64, max_rounds: Option<u64>) -> Result<Self, BudgetError> {
        let b = Self { max_epsilon, delta, max_rounds };
        b.validate()?;
        Ok(b)
    }

    fn validate(&self) -> Result<(), BudgetError> {
        if !(self.max_epsilon.is_finite() && self.max_epsilon >= 0.0) {
            return Err(BudgetError::Invalid(format!("max epsilon {} is not a finite number >= 0", self.max_epsilon)));
        }
        check_delta(self.delta).map_err(|e| BudgetError::Invalid(e.to_string()))
    }

    /// Whether the site may take part in the round `next`, given what `spent` holds.
    ///
    /// Allowed exactly when the epsilon after the round is at most `max_epsilon` and the
    /// round count stays within `max_rounds`.
    pub fn check(&self, spent: &Accountant, next: &Release) -> Result<Spend, BudgetError> {
        self.validate()?;
        let rounds_after = spent.releases() + 1;
        if let Some(max_rounds) = self.max_rounds {
            if rounds_after > max_rounds {
                return Err(BudgetError::RoundsExhausted { max_rounds });
            }
        }
        let epsilon_before = spent.epsilon(self.delta)?;
        let epsilon_after = spent.epsilon_after(next, self.delta)?;
        // `<=` is false for NaN, so anything that is not a number is refused.
        if epsilon_after <= self.max_epsilon {
            Ok(Spend { epsilon_before, epsilon_after, rounds_after })
        } else {
            Err(BudgetError::Exceeded { would_reach: epsilon_after, max_epsilon: self.max_epsilon, delta: self.delta })
        }
    }
}

/// A training plan's privacy parameters, for the planning calculator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub mode: PrivacyMode,
    pub noise_multiplier: f64,
    /// Clipping norm `C`: sets the noise std `sigma * C` but not epsilon.
    pub clip_norm: f64,
    /// Record-level: Poisson sampling rate.
    pub sampling_rate: f64,
    /// Record-level: DP-SGD steps per round.
    pub steps_per_round: u64,
    pub rounds: u64,
    pub delta: f64,
}

impl Plan {
    fn release(&self, noise_multiplier: f64) -> Release {
        match self.mode {
            PrivacyMode::RecordLevel => Release::record_level(noise_multiplier, self.sampling_rate, self.steps_per_round),
            PrivacyMode::SiteLevel => Release::site_level(noise_multiplier),
            PrivacyMode::Off => Release::off(),
            // Refused by `validate`: the calculator's distributed mode is `dp::distributed`'s.
            PrivacyMode::Distributed => Release { mode: PrivacyMode::Distributed, ..Release::site_level(noise_multiplier) },
        }
    }
}

/// Epsilon at `plan.delta` after `plan.rounds` rounds of `plan`.
pub fn plan_epsilon(plan: &Plan) -> Result<f64, DpError> {
    epsilon_with_sigma(plan, plan.noise_multiplier)
}

fn epsilon_with_sigma(plan: &Plan, sigma: f64) -> Result<f64, DpError> {
    check_delta(plan.delta)?;
    if !(plan.clip_norm.is_finite() && plan.clip_norm > 0.0) {
        return Err(DpError::invalid("clip norm", plan.clip_norm, "a finite number > 0"));
    }
    let release = plan.release(sigma);
    release.validate()?;
    if plan.rounds == 0 {
        return Ok(0.0);
    }
    match plan.mode {
        PrivacyMode::Off => Ok(f64::INFINITY),
        PrivacyMode::SiteLevel => zcdp::epsilon_for_rounds(&[(sigma, plan.rounds)], plan.delta),
        PrivacyMode::Distributed => unreachable!("release.validate refuses a distributed plan without its parameters"),
        PrivacyMode::RecordLevel => {
            let one = Rdp::sampled_gaussian(plan.sampling_rate, sigma)?;
            let mut total = Rdp::zero();
            let steps = plan.steps_per_round.checked_mul(plan.rounds).ok_or(DpError::TooManyRounds(plan.rounds))?;
            total.compose(&one, steps);
            Ok(total.epsilon(plan.delta)?.0)
        }
    }
}

/// The result of [`plan_min_sigma`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SigmaSearch {
    /// The returned noise multiplier; its epsilon is at most the target.
    pub noise_multiplier: f64,
    /// Its epsilon.
    pub epsilon: f64,
    /// The smallest sufficient sigma is above `noise_multiplier / (1 + tolerance)`.
    pub tolerance: f64,
    /// The resulting noise std `sigma * C`.
    pub noise_std: f64,
}

/// Relative precision of [`plan_min_sigma`].
pub const SIGMA_TOLERANCE: f64 = 1e-4;
/// Smallest and largest noise multipliers [`plan_min_sigma`] considers.
pub const SIGMA_RANGE: (f64, f64) = (0.05, 1000.0);

/// The smallest noise multiplier (within [`SIGMA_TOLERANCE`], relative) whose epsilon after
/// `plan.rounds` rounds is at most `target_epsilon`; `plan.noise_multiplier` is ignored.
///
/// Bisection on a log scale; it always returns the upper end of the final bracket, a sigma
/// that was evaluated and meets the target, so it errs on the safe side. Epsilon decreases
/// as sigma grows (every order's RDP and rho decrease), which is what makes bisection valid.
pub fn plan_min_sigma(plan: &Plan, target_epsilon: f64) -> Result<SigmaSearch, DpError> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(DpError::invalid("target epsilon", target_epsilon, "a finite number > 0"));
    }
    if plan.mode == PrivacyMode::Off {
        return Err(DpError::NoPrivacy);
    }
    let eps = |sigma: f64| epsilon_with_sigma(plan, sigma);
    let (min, max) = SIGMA_RANGE;
    let found = |sigma: f64, epsilon: f64| SigmaSearch {
        noise_multiplier: sigma,
        epsilon,
        tolerance: SIGMA_TOLERANCE,
        noise_std: sigma * plan.clip_norm,
    };
    let (sigma, epsilon) = smallest_sufficient(eps, target_epsilon, (min, max), SIGMA_TOLERANCE)?;
    Ok(found(sigma, epsilon))
}

/// The smallest sigma in `range` (within `tolerance`, relative) whose `eps(sigma)` is at
/// most `target_epsilon`, with that epsilon: bisection on a log scale, for any `eps` that
/// falls as sigma grows. It returns the upper end of the final bracket, a sigma that was
/// evaluated and meets the target, so it errs on the safe side.
pub(crate) fn smallest_sufficient(
    eps: impl Fn(f64) -> Result<f64, DpError>,
    target_epsilon: f64,
    (min, max): (f64, f64),
    tolerance: f64,
) -> Result<(f64, f64), DpError> {
    let e_min = eps(min)?;
    if e_min <= target_epsilon {
        return Ok((min, e_min));
    }
    // Bracket: eps(lo) > target >= eps(hi).
    let mut lo = min;
    let mut hi = 1.0f64.max(min);
    let mut e_hi = eps(hi)?;
    // NaN compares as not within the target, so it keeps doubling until refused.
    while e_hi.partial_cmp(&target_epsilon).is_none_or(|o| o == std::cmp::Ordering::Greater) {
        lo = hi;
        hi *= 2.0;
        if hi > max {
            return Err(DpError::Unreachable { target: target_epsilon, max });
        }
        e_hi = eps(hi)?;
    }
    while hi / lo > 1.0 + tolerance {
        let mid = (lo * hi).sqrt();
        let e_mid = eps(mid)?;
        if e_mid <= target_epsilon {
            hi = mid;
            e_hi = e_mid;
        } else {
            lo = mid;
        }
    }
    Ok((hi, e_hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(site_sigma: f64) -> DistributedRelease {
        DistributedRelease {
            site_sigma,
            scale: 4096.0,
            modulus_bits: 64,
            sites: 3,
            min_honest: 2,
            clip_norm: 1.0,
            dim: 10_000,
            rounding_beta: None,
        }
    }

    /// Distributed releases compose as the distributed accountant's RDP, the budget check
    /// uses that epsilon (refusing the round that would pass it), a release without its
    /// parameters is refused, and a site-level ledger does not silently mix with them.
    /// A score of the global model is the Gaussian mechanism, counted with the round:
    /// record-level on a count (sensitivity 1), site-level on the accuracy (one DP-FedAvg
    /// round at sigma 2z). Released alone, only the score counts.
    #[test]
    fn a_released_score_is_counted_beside_or_instead_of_the_update() {
        let delta = 1e-5;
        let score = |alone| Some(ScoreRelease { noise_multiplier: 20.0, alone });
        let eps = |releases: &[Release]| {
            let mut acc = Accountant::new();
            releases.iter().for_each(|r| acc.record(r).unwrap());
            acc.epsilon(delta).unwrap()
        };
        let dp_sgd = Release::record_level(1.1, 0.01, 100);
        let mut expected = Rdp::sampled_gaussian(0.01, 1.1).unwrap();
        expected.compose(&Rdp::sampled_gaussian(0.01, 1.1).unwrap(), 99);
        expected.compose(&Rdp::gaussian(20.0).unwrap(), 1);
        assert_eq!(eps(&[dp_sgd.with_score(score(false))]), expected.epsilon(delta).unwrap().0);
        assert!(eps(&[dp_sgd.with_score(score(false))]) > eps(&[dp_sgd]));
        let alone = Release { steps: 0, ..dp_sgd }.with_score(score(true));
        assert_eq!(eps(&[alone]), Rdp::gaussian(20.0).unwrap().epsilon(delta).unwrap().0);
        // Site-level: the score is a round at sigma 2z.
        let fedavg = Release::site_level(1.0);
        assert_eq!(eps(&[fedavg.with_score(score(false))]), eps(&[fedavg, Release::site_level(40.0)]));
        assert_eq!(eps(&[fedavg.with_score(score(true))]), eps(&[Release::site_level(40.0)]));
        // No score under distributed DP, and never a score without noise under a DP plan.
        assert!(Release::site_level(1.0).with_score(Some(ScoreRelease { noise_multiplier: 0.0, alone: false })).validate().is_err());
        assert!(Release::off().with_score(Some(ScoreRelease { noise_multiplier: 0.0, alone: true })).validate().is_ok());
    }

    #[test]
    fn distributed_releases_spend_the_distributed_accountants_epsilon() {
        let (delta, r) = (1e-5, Release::distributed(1.0, share(3000.0)));
        let mut acc = Accountant::new();
        for _ in 0..3 {
            acc.record(&r).unwrap();
        }
        let expected = super::super::distributed::epsilon_for_releases(&[share(3000.0); 3], delta).unwrap();
        assert!((acc.epsilon(delta).unwrap() - expected).abs() <= 1e-12 * expected);
        let fourth = acc.epsilon_after(&r, delta).unwrap();
        assert!(fourth > expected);
        let budget = Budget::new(fourth, delta, None).unwrap();
        assert_eq!(budget.check(&acc, &r).unwrap().epsilon_after, fourth);
        let tight = Budget::new(fourth * (1.0 - 1e-9), delta, None).unwrap();
        assert!(matches!(tight.check(&acc, &r), Err(BudgetError::Exceeded { .. })));
        let bare = Release { distributed: None, ..r };
        assert!(acc.clone().record(&bare).is_err());
        assert!(matches!(acc.clone().record(&Release::site_level(1.0)), Err(DpError::ModeMismatch { .. })));
        assert!(Release::planned(&PrivacyPlan::Distributed { noise_multiplier: 1.0, clip_norm: 1.0, min_honest: 2 }, 1).is_err());
    }

    #[test]
    fn a_plan_names_the_release_it_makes() {
        let record = PrivacyPlan::RecordLevel { noise_multiplier: 1.1, clip_norm: 1.0, sampling_rate: 0.25, update_clip_norm: 5.0 };
        assert_eq!(Release::planned(&record, 2).unwrap(), Release::record_level(1.1, 0.25, 8));
        let site = PrivacyPlan::SiteLevel { noise_multiplier: 3.0, clip_norm: 0.5 };
        assert_eq!(Release::planned(&site, 4).unwrap(), Release::site_level(3.0));
        assert_eq!(Release::planned(&PrivacyPlan::Off, 1).unwrap(), Release::off());
        let bad = PrivacyPlan::RecordLevel { noise_multiplier: 0.0, clip_norm: 1.0, sampling_rate: 0.25, update_clip_norm: 5.0 };
        assert!(Release::planned(&bad, 1).is_err());
    }

    fn record_plan() -> Plan {
        Plan {
            mode: PrivacyMode::RecordLevel,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            sampling_rate: 0.01,
            steps_per_round: 100,
            rounds: 10,
            delta: 1e-5,
        }
    }

    #[test]
    fn budget_refuses_exactly_above_the_boundary() {
        let release = Release::record_level(1.0, 0.01, 100);
        let mut acc = Accountant::new();
        acc.record(&release).unwrap();
        acc.record(&release).unwrap();
        let after_three = acc.epsilon_after(&release, 1e-5).unwrap();
        // Budget exactly at the third round's epsilon: allowed.
        let at = Budget::new(after_three, 1e-5, None).unwrap();
        let spend = at.check(&acc, &release).unwrap();
        assert_eq!(spend.epsilon_after, after_three);
        assert_eq!(spend.rounds_after, 3);
        assert_eq!(spend.epsilon_before, acc.epsilon(1e-5).unwrap());
        // One ulp below: refused.
        let below = Budget::new(f64::from_bits(after_three.to_bits() - 1), 1e-5, None).unwrap();
        assert!(matches!(below.check(&acc, &release), Err(BudgetError::Exceeded { .. })));
        // Round limit.
        let rounds = Budget::new(100.0, 1e-5, Some(2)).unwrap();
        assert!(matches!(rounds.check(&acc, &release), Err(BudgetError::RoundsExhausted { max_rounds: 2 })));
        // Off is never within a budget.
        let wide = Budget::new(1e9, 1e-5, None).unwrap();
        assert!(matches!(wide.check(&acc, &Release::off()), Err(BudgetError::Exceeded { .. })));
        assert!(Budget::new(f64::NAN, 1e-5, None).is_err());
        assert!(Budget::new(1.0, 0.0, None).is_err());
    }

    /// Spend is monotone: each recorded round raises epsilon, for both modes.
    #[test]
    fn spend_is_monotone() {
        for release in [Release::record_level(0.9, 0.02, 50), Release::site_level(4.0)] {
            let mut acc = Accountant::new();
            let mut last = acc.epsilon(1e-6).unwrap();
            assert_eq!(last, 0.0);
            for _ in 0..6 {
                let predicted = acc.epsilon_after(&release, 1e-6).unwrap();
                acc.record(&release).unwrap();
                let now = acc.epsilon(1e-6).unwrap();
                assert_eq!(predicted, now);
                assert!(now > last, "{now} <= {last}");
                last = now;
            }
        }
    }

    #[test]
    fn modes_do_not_mix_and_off_is_unbounded() {
        let mut acc = Accountant::new();
        acc.record(&Release::site_level(2.0)).unwrap();
        let err = acc.record(&Release::record_level(1.0, 0.1, 1)).unwrap_err();
        assert!(matches!(err, DpError::ModeMismatch { .. }));
        assert_eq!(acc.releases(), 1);
        acc.record(&Release::off()).unwrap();
        assert_eq!(acc.epsilon(1e-5).unwrap(), f64::INFINITY);
        assert!(acc.record(&Release::record_level(0.0, 0.1, 1)).is_err());
    }

    #[test]
    fn accountant_matches_the_planner_and_zcdp() {
        let plan = record_plan();
        let mut acc = Accountant::new();
        for _ in 0..plan.rounds {
            acc.record(&plan.release(plan.noise_multiplier)).unwrap();
        }
        let a = acc.epsilon(plan.delta).unwrap();
        let p = plan_epsilon(&plan).unwrap();
        assert!((a - p).abs() <= 1e-9 * p, "{a} vs {p}");

        let site = Plan { mode: PrivacyMode::SiteLevel, noise_multiplier: 3.0, ..plan };
        let mut acc = Accountant::new();
        for _ in 0..site.rounds {
            acc.record(&Release::site_level(3.0)).unwrap();
        }
        assert_eq!(acc.epsilon(1e-5).unwrap(), plan_epsilon(&site).unwrap());
        assert_eq!(acc.epsilon(1e-5).unwrap(), zcdp::epsilon_for_rounds(&[(3.0, 10)], 1e-5).unwrap());
    }

    #[test]
    fn min_sigma_meets_the_target_tightly() {
        for plan in [record_plan(), Plan { mode: PrivacyMode::SiteLevel, ..record_plan() }] {
            for target in [1.0, 8.0] {
                let found = plan_min_sigma(&plan, target).unwrap();
                assert!(found.epsilon <= target);
                assert_eq!(found.epsilon, epsilon_with_sigma(&plan, found.noise_multiplier).unwrap());
                let smaller = found.noise_multiplier / (1.0 + 2.0 * SIGMA_TOLERANCE);
                assert!(epsilon_with_sigma(&plan, smaller).unwrap() > target, "not minimal: {found:?}");
                assert_eq!(found.noise_std, found.noise_multiplier * plan.clip_norm);
            }
        }
        assert!(matches!(plan_min_sigma(&record_plan(), 1e-9), Err(DpError::Unreachable { .. })));
        assert!(plan_min_sigma(&record_plan(), -1.0).is_err());
        let easy = plan_min_sigma(&record_plan(), 1e6).unwrap();
        assert_eq!(easy.noise_multiplier, SIGMA_RANGE.0);
    }

    #[test]
    fn plan_validation() {
        assert_eq!(plan_epsilon(&Plan { rounds: 0, ..record_plan() }).unwrap(), 0.0);
        assert!(plan_epsilon(&Plan { clip_norm: 0.0, ..record_plan() }).is_err());
        assert!(plan_epsilon(&Plan { sampling_rate: 2.0, ..record_plan() }).is_err());
        assert!(plan_epsilon(&Plan { delta: 1.0, ..record_plan() }).is_err());
        assert_eq!(plan_epsilon(&Plan { mode: PrivacyMode::Off, ..record_plan() }).unwrap(), f64::INFINITY);
    }
}
