//! Distributed DP under secure aggregation: the accountant for the distributed discrete
//! Gaussian, the planner's search, and the record of one round's noise share.
//!
//! # The mechanism
//!
//! Each of `n` sites clips its update to L2 norm `C`, scales it by `scale` (fixed-point
//! units per model unit), rounds every coordinate to an integer, and adds its share of
//! the noise: `N_Z(0, sigma^2)` per coordinate ([`super::discrete`], `sigma` in integer
//! units). Secure aggregation reveals only the sum modulo `2^k`, which carries the sum of
//! the honest sites' shares. Wrapping modulo `2^k` is post-processing and costs nothing.
//!
//! # What is counted
//!
//! Only the noise of `min_honest` sites: the others may have added none, or told the
//! coordinator what they added, so their noise is treated as known and subtracted. The
//! privacy of one site's contribution then rests on `Z = X_1 + .. + X_H`, `H = min_honest`,
//! `X_i ~ N_Z(0, sigma^2)^d` independent, which is close to, but not exactly,
//! `N_Z(0, H sigma^2)`.
//!
//! # The bound (Kairouz, Liu, Steinke 2021, Proposition 14)
//!
//! For `sigma >= 1/2`, `tau = 10 sum_{k=1}^{H-1} exp(-2 pi^2 sigma^2 k / (k + 1))` and an
//! integer difference vector with `||D||_2 <= D2`, `||D||_1 <= D1`, at every order
//! `alpha >= 1`, with `a = D2 / (sqrt(H) sigma)` and `b = D1 / (sqrt(H) sigma)`:
//!
//! `RDP(alpha) <= min( alpha a^2 / 2 + tau d,  alpha (a^2 + 2 b tau + tau^2 d) / 2,  alpha (a + tau sqrt(d))^2 / 2 )`.
//!
//! `H = 1` gives `tau = 0`: the discrete Gaussian itself, exactly `D2^2 / (2 sigma^2)`-zCDP
//! (Canonne, Kamath, Steinke 2020). For `sigma >= 2`, `tau < 1e-16`, and the bound is the
//! continuous Gaussian's with noise std `sqrt(H) sigma`.
//!
//! # Sensitivity after scaling and rounding
//!
//! Adjacency is that of site-level DP in [`super::zcdp`]: a site's whole dataset replaced,
//! so two rounded updates `u`, `v` of norm at most `Delta2` differ by `D2 = 2 Delta2` in L2
//! and `D1 = 2 min(sqrt(d) Delta2, Delta2^2)` in L1 (an integer vector's L1 norm is at most
//! its squared L2 norm). `Delta2` (integer units) with `x = C scale`:
//!
//! * [`Rounding::Deterministic`] (the default): any rounding of each scaled coordinate to
//!   one of its two neighbouring integers moves the vector by less than `sqrt(d)`, so
//!   `Delta2 = x + sqrt(d)`. It holds whatever the quantizer does, as long as it rounds
//!   each coordinate down or up.
//! * [`Rounding::Conditional`]`{ beta }`: the conditional randomized rounding of KLS21
//!   ([`quantize`] does it):
//!   `Delta2^2 = min((x + sqrt(d))^2, x^2 + d / 4 + sqrt(2 ln(1 / beta)) (x + sqrt(d) / 2))`,
//!   which holds only because the quantizer **re-rounds until** the rounded norm is at most
//!   [`DistributedParams::l2_bound`] (it succeeds with probability at least `1 - beta` per
//!   try). A quantizer that does not check must be accounted as deterministic.
//!
//! [`quantize`] scales, rounds and checks the rounded norm against the bound in exact
//! integer arithmetic for either mode, so what a site sends has the sensitivity accounted.
//! Both are inflated by a relative `1e-9` for the floating point of the scaling and of
//! this computation; the per-order bound is rounded up by another relative `1e-10`.
//!
//! # Composition and conversion
//!
//! Rounds compose by adding the bound order by order on [`super::rdp::orders`], and
//! epsilon at delta comes from [`Rdp::epsilon`]: the same grid and conversion as the
//! record-level accountant. For large sigma and scale the result approaches the continuous
//! Gaussian's with noise std `sqrt(H) sigma / scale` in model units (tested).

use super::discrete::NoiseSource;
use super::rdp::{check_delta, orders, Rdp};
use super::zcdp::MAX_ROUNDS;
use super::DpError;

/// Most sites a round may count (the `tau` sum is linear in it).
pub const MAX_SITES: u64 = 1_000_000;
/// Largest update dimension the accountant takes.
pub const MAX_DIM: u64 = 1 << 40;
/// Smallest per-site sigma (integer units) the bound of KLS21 Proposition 14 covers.
pub const MIN_SITE_SIGMA: f64 = 0.5;
/// Largest per-site sigma (integer units): the sampler's limit.
pub const MAX_SITE_SIGMA: f64 = (1u64 << 40) as f64;
/// Largest `C scale`, the clipped norm in integer units.
pub const MAX_SCALED_CLIP: f64 = (1u64 << 40) as f64;
/// Relative precision of [`distributed_min_sigma`].
pub const SITE_SIGMA_TOLERANCE: f64 = 1e-4;
/// Relative inflation of the norm bound for floating-point error.
const NORM_SLACK: f64 = 1e-9;
/// Relative inflation of each order's bound for floating-point error.
const RDP_SLACK: f64 = 1e-10;

/// How a site rounds its scaled update to integers; it sets the norm bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rounding {
    /// Each coordinate down or up, nothing checked: `Delta2 = C scale + sqrt(d)`.
    Deterministic,
    /// Conditional randomized rounding: re-round until the norm is within the bound, which
    /// one try meets with probability at least `1 - beta`.
    Conditional { beta: f64 },
}

/// The parameters of one round of the distributed discrete Gaussian.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedParams {
    /// Sites that add a share and whose inputs are summed.
    pub sites: u64,
    /// Sites assumed honest: only their noise is counted. At most `sites`.
    pub min_honest: u64,
    /// Each site's discrete Gaussian sigma, in integer (fixed-point) units.
    pub site_sigma: f64,
    /// Fixed-point units per model unit (`1 / gamma` in KLS21).
    pub scale: f64,
    /// L2 clipping norm `C` of an update, in model units.
    pub clip_norm: f64,
    /// Coordinates in an update.
    pub dim: u64,
    /// How the scaled update is rounded: sets the norm bound `Delta2`.
    pub rounding: Rounding,
}

impl DistributedParams {
    /// Checks every parameter; a typed error names the first bad one.
    pub fn validate(&self) -> Result<(), DpError> {
        if self.sites == 0 || self.sites > MAX_SITES {
            return Err(DpError::invalid("number of sites", self.sites as f64, "1 to 1000000"));
        }
        if self.min_honest == 0 {
            return Err(DpError::invalid("min honest sites", 0.0, "at least 1"));
        }
        if self.min_honest > self.sites {
            return Err(DpError::invalid("min honest sites", self.min_honest as f64, "at most the number of sites"));
        }
        if !(self.site_sigma.is_finite() && (MIN_SITE_SIGMA..=MAX_SITE_SIGMA).contains(&self.site_sigma)) {
            return Err(DpError::invalid("site sigma", self.site_sigma, "a number in [0.5, 2^40] (integer units)"));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(DpError::invalid("scale", self.scale, "a finite number > 0"));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(DpError::invalid("clip norm", self.clip_norm, "a finite number > 0"));
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(DpError::invalid("dimension", self.dim as f64, "1 to 2^40"));
        }
        if let Rounding::Conditional { beta } = self.rounding {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(DpError::invalid("rounding beta", beta, "a number in (0, 1)"));
            }
        }
        // Both are finite and positive by now. Keeps every rounded coordinate and squared
        // norm far inside i64 and u128.
        if self.clip_norm * self.scale > MAX_SCALED_CLIP {
            return Err(DpError::invalid("clip norm x scale", self.clip_norm * self.scale, "at most 2^40 integer units"));
        }
        Ok(())
    }

    /// `Delta2`: the largest L2 norm of one site's rounded update, in integer units. Under
    /// [`Rounding::Conditional`] the quantizer must enforce it.
    pub fn l2_bound(&self) -> f64 {
        let x = self.clip_norm * self.scale;
        let d = self.dim as f64;
        let deterministic = x + d.sqrt();
        let bound = match self.rounding {
            Rounding::Deterministic => deterministic,
            Rounding::Conditional { beta } => {
                let sq = x * x + d / 4.0 + (2.0 * (1.0 / beta).ln()).sqrt() * (x + d.sqrt() / 2.0);
                deterministic.min(sq.sqrt())
            }
        };
        bound * (1.0 + NORM_SLACK)
    }

    /// `(D1, D2)`: L1 and L2 bounds on the difference of two sites' rounded updates
    /// (replace-one-site adjacency), in integer units.
    pub fn sensitivity(&self) -> (f64, f64) {
        let l2 = self.l2_bound();
        let l1 = ((self.dim as f64).sqrt() * l2).min(l2 * l2);
        (2.0 * l1, 2.0 * l2)
    }

    /// KLS21's `tau = 10 sum_{k=1}^{H-1} exp(-2 pi^2 sigma^2 k / (k + 1))`.
    pub fn tau(&self) -> f64 {
        let s2 = self.site_sigma * self.site_sigma;
        let c = 2.0 * std::f64::consts::PI * std::f64::consts::PI * s2;
        let sum: f64 = (1..self.min_honest).map(|k| libm::exp(-c * k as f64 / (k + 1) as f64)).sum();
        10.0 * sum
    }

    /// The std of the honest sites' summed noise, in model units: `sqrt(H) sigma / scale`.
    pub fn central_std(&self) -> f64 {
        (self.min_honest as f64).sqrt() * self.site_sigma / self.scale
    }

    /// The central noise multiplier: [`Self::central_std`] over `C`.
    pub fn noise_multiplier(&self) -> f64 {
        self.central_std() / self.clip_norm
    }

    /// The RDP bound of one round on [`orders`] (KLS21 Proposition 14), rounded up.
    pub fn rdp_per_round(&self) -> Result<Rdp, DpError> {
        self.validate()?;
        let (d1, d2) = self.sensitivity();
        let root = (self.min_honest as f64).sqrt() * self.site_sigma;
        let (a, b) = (d2 / root, d1 / root);
        let tau = self.tau();
        let d = self.dim as f64;
        let values = orders()
            .iter()
            .map(|&alpha| {
                let t1 = alpha * a * a / 2.0 + tau * d;
                let t2 = alpha * (a * a + 2.0 * b * tau + tau * tau * d) / 2.0;
                let t3 = alpha * (a + tau * d.sqrt()).powi(2) / 2.0;
                t1.min(t2).min(t3) * (1.0 + RDP_SLACK)
            })
            .collect();
        Rdp::from_values(values).ok_or(DpError::invalid("rdp orders", 0.0, "one value per order"))
    }
}

/// Tries of conditional randomized rounding before [`quantize`] gives up (each succeeds
/// with probability at least `1 - beta`).
pub const MAX_ROUNDING_TRIES: u32 = 1000;

/// Why an update could not be quantized within the norm bound the accountant assumed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("value {value} at index {index} is not finite")]
    NonFinite { index: usize, value: f32 },
    #[error("update has {got} coordinates, the plan {expected}")]
    Dimension { expected: u64, got: usize },
    #[error("rounded update norm {norm} is above the bound {bound} (integer units): was the update clipped to C?")]
    AboveBound { norm: f64, bound: f64 },
    #[error("no rounding within the norm bound after {0} tries: was the update clipped to C?")]
    TooManyTries(u32),
    #[error(transparent)]
    Dp(#[from] DpError),
}

/// Scales a clipped update by `params.scale` and rounds each coordinate to an integer
/// randomly (down or up with the probabilities that make it unbiased), then checks the
/// rounded norm against [`DistributedParams::l2_bound`] exactly (sum of squares in
/// integers): under [`Rounding::Conditional`] it re-rounds until the norm is within the
/// bound, under [`Rounding::Deterministic`] the bound holds for any clipped update, so a
/// failure means the update was not clipped and is an error. Either way the vector it
/// returns has the norm the accountant assumed. The rounding's randomness need not be
/// secret (the privacy rests on the noise), but it comes from the caller's source.
pub fn quantize(rng: &mut impl NoiseSource, update: &[f32], params: &DistributedParams) -> Result<Vec<i64>, QuantizeError> {
    params.validate()?;
    if update.len() as u64 != params.dim {
        return Err(QuantizeError::Dimension { expected: params.dim, got: update.len() });
    }
    if let Some((index, &value)) = update.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantizeError::NonFinite { index, value });
    }
    let bound = params.l2_bound();
    // The largest squared norm within the bound, as an integer (bound^2 is below 2^83 for
    // any valid parameters; the f64 floor is conservative by at most an ulp of slack).
    let max_sq = (bound * bound).floor() as u128;
    let scaled: Vec<f64> = update.iter().map(|&v| f64::from(v) * params.scale).collect();
    let tries = match params.rounding {
        Rounding::Deterministic => 1,
        Rounding::Conditional { .. } => MAX_ROUNDING_TRIES,
    };
    let mut last_sq = 0u128;
    for _ in 0..tries {
        let rounded: Vec<i64> = scaled
            .iter()
            .map(|&x| {
                let lo = x.floor();
                // P(up) = x - floor(x) up to 2^-53: unbiased rounding (utility, not privacy).
                let up = ((rng.next_u64() >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < x - lo;
                lo as i64 + i64::from(up)
            })
            .collect();
        let sq = rounded.iter().map(|&v| u128::from(v.unsigned_abs()).pow(2)).fold(0u128, u128::saturating_add);
        if sq <= max_sq {
            return Ok(rounded);
        }
        last_sq = sq;
    }
    match params.rounding {
        Rounding::Deterministic => Err(QuantizeError::AboveBound { norm: (last_sq as f64).sqrt(), bound }),
        Rounding::Conditional { .. } => Err(QuantizeError::TooManyTries(tries)),
    }
}

/// Per-site sigmas are rounded up to a multiple of this (integer units): see [`site_sigma_for`].
pub const SITE_SIGMA_GRID: f64 = 1.0 / 256.0;

/// The per-site sigma (integer units) that gives at least central noise multiplier
/// `noise_multiplier` when `min_honest` sites add it: `z C scale / sqrt(H)`, rounded up to
/// a multiple of [`SITE_SIGMA_GRID`]. The rounding adds a hair of noise (never removes
/// any; the accountant uses the rounded value) and keeps `sigma^2` a rational with a
/// denominator of at most `2^16`, so the exact sampler's big integers stay short.
pub fn site_sigma_for(noise_multiplier: f64, clip_norm: f64, scale: f64, min_honest: u64) -> f64 {
    let raw = noise_multiplier * clip_norm * scale / (min_honest as f64).sqrt();
    // Multiplying and dividing by a power of two is exact; ceil only raises.
    (raw / SITE_SIGMA_GRID).ceil() * SITE_SIGMA_GRID
}

/// Epsilon at `delta` after `rounds` rounds of `params`.
pub fn distributed_epsilon(params: &DistributedParams, rounds: u64, delta: f64) -> Result<f64, DpError> {
    check_delta(delta)?;
    let one = params.rdp_per_round()?;
    if rounds > MAX_ROUNDS {
        return Err(DpError::TooManyRounds(rounds));
    }
    let mut total = Rdp::zero();
    total.compose(&one, rounds);
    Ok(total.epsilon(delta)?.0)
}

/// The result of [`distributed_min_sigma`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedSigma {
    /// The per-site sigma (integer units); its epsilon is at most the target.
    pub site_sigma: f64,
    /// Its epsilon.
    pub epsilon: f64,
    /// The smallest sufficient sigma is above `site_sigma / (1 + tolerance)`.
    pub tolerance: f64,
    /// The honest sites' summed noise std in model units, `sqrt(H) sigma / scale`.
    pub central_std: f64,
    /// `central_std / C`.
    pub noise_multiplier: f64,
}

/// The smallest per-site sigma (within [`SITE_SIGMA_TOLERANCE`], relative) whose epsilon
/// after `rounds` rounds at `delta` is at most `target_epsilon`; `params.site_sigma` is
/// ignored. Bisection on a log scale; it returns a sigma that was evaluated and meets the
/// target. Every term of the bound falls as sigma grows, which makes bisection valid.
pub fn distributed_min_sigma(
    params: &DistributedParams,
    rounds: u64,
    delta: f64,
    target_epsilon: f64,
) -> Result<DistributedSigma, DpError> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(DpError::invalid("target epsilon", target_epsilon, "a finite number > 0"));
    }
    let eps = |sigma: f64| distributed_epsilon(&DistributedParams { site_sigma: sigma, ..*params }, rounds, delta);
    let found = |sigma: f64, epsilon: f64| {
        let p = DistributedParams { site_sigma: sigma, ..*params };
        DistributedSigma {
            site_sigma: sigma,
            epsilon,
            tolerance: SITE_SIGMA_TOLERANCE,
            central_std: p.central_std(),
            noise_multiplier: p.noise_multiplier(),
        }
    };
    let (sigma, epsilon) =
        super::accountant::smallest_sufficient(eps, target_epsilon, (MIN_SITE_SIGMA, MAX_SITE_SIGMA), SITE_SIGMA_TOLERANCE)?;
    Ok(found(sigma, epsilon))
}

/// What one site records for one round under distributed DP: everything an auditor needs
/// to recompute the round's privacy bound. Rounds compose with [`epsilon_for_releases`].
/// Declared on the wire (`PrivacyUsed::distributed`) and recorded in both ledgers as is.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedRelease {
    /// The site's own noise share: discrete Gaussian sigma in integer units.
    pub site_sigma: f64,
    /// Fixed-point units per model unit.
    pub scale: f64,
    /// Secure aggregation works modulo `2^modulus_bits` (post-processing: not in epsilon).
    pub modulus_bits: u32,
    /// Sites whose inputs were summed.
    pub sites: u64,
    /// Sites assumed honest (their noise alone is counted).
    pub min_honest: u64,
    /// L2 clipping norm, model units.
    pub clip_norm: f64,
    /// Coordinates in the update.
    pub dim: u64,
    /// `Some(beta)` under conditional randomized rounding, `None` for the deterministic bound.
    pub rounding_beta: Option<f64>,
}

impl DistributedRelease {
    /// The accountant's parameters.
    pub fn params(&self) -> DistributedParams {
        DistributedParams {
            sites: self.sites,
            min_honest: self.min_honest,
            site_sigma: self.site_sigma,
            scale: self.scale,
            clip_norm: self.clip_norm,
            dim: self.dim,
            rounding: match self.rounding_beta {
                Some(beta) => Rounding::Conditional { beta },
                None => Rounding::Deterministic,
            },
        }
    }

    /// Checks every parameter, the modulus included.
    pub fn validate(&self) -> Result<(), DpError> {
        if !(1..=64).contains(&self.modulus_bits) {
            return Err(DpError::invalid("modulus bits", f64::from(self.modulus_bits), "1 to 64"));
        }
        self.params().validate()
    }

    /// This round's RDP bound.
    pub fn rdp(&self) -> Result<Rdp, DpError> {
        self.validate()?;
        self.params().rdp_per_round()
    }

    /// Epsilon at `delta` of this round alone.
    pub fn epsilon(&self, delta: f64) -> Result<f64, DpError> {
        epsilon_for_releases(std::slice::from_ref(self), delta)
    }
}

/// Epsilon at `delta` of several rounds' releases composed (RDP adds order by order).
pub fn epsilon_for_releases(releases: &[DistributedRelease], delta: f64) -> Result<f64, DpError> {
    check_delta(delta)?;
    if releases.len() as u64 > MAX_ROUNDS {
        return Err(DpError::TooManyRounds(releases.len() as u64));
    }
    let mut total = Rdp::zero();
    let mut curves: Vec<(DistributedRelease, Rdp)> = Vec::new();
    for r in releases {
        let curve = match curves.iter().find(|(k, _)| k == r) {
            Some((_, c)) => c.clone(),
            None => {
                let c = r.rdp()?;
                curves.push((*r, c.clone()));
                c
            }
        };
        total.compose(&curve, 1);
    }
    Ok(total.epsilon(delta)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::zcdp;

    fn params() -> DistributedParams {
        DistributedParams {
            sites: 10,
            min_honest: 7,
            site_sigma: 200.0,
            scale: 256.0,
            clip_norm: 1.0,
            dim: 10_000,
            rounding: Rounding::Deterministic,
        }
    }

    fn continuous(sigma_total: f64, clip: f64, rounds: u64, delta: f64) -> f64 {
        // Sensitivity 2C against std sigma_total: noise multiplier sigma_total / (2C) per unit sensitivity.
        let mut r = Rdp::zero();
        r.compose(&Rdp::gaussian(sigma_total / (2.0 * clip)).unwrap(), rounds);
        r.epsilon(delta).unwrap().0
    }

    /// For large per-site sigma and scale (tau negligible, rounding a tiny fraction of the
    /// norm) the epsilon approaches, from above, that of the continuous Gaussian with std
    /// `sqrt(H) sigma / scale` and sensitivity `2C`; opendp's conversion of that Gaussian
    /// (optimising over every order, not a grid) is below both and close.
    #[test]
    fn approaches_the_continuous_gaussian() {
        for (h, z) in [(1u64, 1.0), (3, 2.0), (8, 4.0), (10, 0.8)] {
            let scale = 1e7;
            let p =
                DistributedParams { sites: 10, min_honest: h, site_sigma: site_sigma_for(z, 1.0, scale, h), scale, dim: 1000, ..params() };
            assert!(p.noise_multiplier() >= z && p.noise_multiplier() - z < 1e-8 * z);
            let ours = distributed_epsilon(&p, 10, 1e-5).unwrap();
            let limit = continuous(p.central_std(), 1.0, 10, 1e-5);
            assert!(ours >= limit, "h {h}: {ours} below the continuous {limit}");
            assert!(ours <= limit * (1.0 + 1e-4), "h {h}: {ours} vs continuous {limit}");
            let opendp = zcdp::epsilon_for_rounds(&[(z, 10)], 1e-5).unwrap();
            assert!(opendp <= ours && ours <= opendp * 1.03, "h {h}: {ours} vs opendp {opendp}");
        }
    }

    /// One honest site: tau = 0, the discrete Gaussian alone, `alpha D2^2 / (2 sigma^2)`.
    #[test]
    fn one_honest_site_is_the_discrete_gaussian() {
        let p = DistributedParams { min_honest: 1, ..params() };
        assert_eq!(p.tau(), 0.0);
        let (_, d2) = p.sensitivity();
        let rdp = p.rdp_per_round().unwrap();
        for (&alpha, &v) in orders().iter().zip(rdp.values()) {
            let exact = alpha * d2 * d2 / (2.0 * 200.0 * 200.0);
            assert!(v >= exact && v <= exact * (1.0 + 1e-9), "{alpha}: {v} vs {exact}");
        }
        // The norm bound: C scale + sqrt(d), a hair above.
        assert!((p.l2_bound() - 356.0).abs() < 1e-6, "{}", p.l2_bound());
    }

    /// At small sigma tau is not negligible and the bound is above the continuous one.
    #[test]
    fn tau_counts_at_small_sigma() {
        let p = DistributedParams { site_sigma: 0.6, scale: 1.0, dim: 100, ..params() };
        let tau = p.tau();
        let expected: f64 =
            10.0 * (1..7).map(|k| (-2.0 * std::f64::consts::PI.powi(2) * 0.36 * k as f64 / (k + 1) as f64).exp()).sum::<f64>();
        assert!((tau - expected).abs() < 1e-15 && tau > 0.1, "{tau}");
        let ours = distributed_epsilon(&p, 1, 1e-5).unwrap();
        let (_, d2) = p.sensitivity();
        // The same L2 sensitivity against a continuous Gaussian of std sqrt(7) 0.6.
        let mut r = Rdp::zero();
        r.compose(&Rdp::gaussian(7f64.sqrt() * 0.6 / d2).unwrap(), 1);
        assert!(ours > r.epsilon(1e-5).unwrap().0);
        assert!(DistributedParams { min_honest: 1, ..p }.tau() == 0.0);
        assert!(DistributedParams { site_sigma: 3.0, ..p }.tau() < 1e-30);
    }

    #[test]
    fn monotone_in_sigma_rounds_and_honest_sites() {
        let base = params();
        let eps = |p: &DistributedParams, r: u64| distributed_epsilon(p, r, 1e-5).unwrap();
        let mut last = f64::INFINITY;
        for sigma in [50.0, 100.0, 150.0, 200.0, 400.0, 1000.0] {
            let e = eps(&DistributedParams { site_sigma: sigma, ..base }, 10);
            assert!(e < last, "sigma {sigma}: {e} >= {last}");
            last = e;
        }
        let mut last = 0.0;
        for rounds in [1u64, 2, 5, 10, 50, 100] {
            let e = eps(&base, rounds);
            assert!(e > last, "rounds {rounds}: {e} <= {last}");
            last = e;
        }
        assert_eq!(eps(&base, 0), 0.0);
        let mut last = f64::INFINITY;
        for h in 1..=10 {
            let e = eps(&DistributedParams { min_honest: h, ..base }, 10);
            assert!(e < last, "min_honest {h}: {e} >= {last}");
            last = e;
        }
        // Conditional rounding never costs more than deterministic.
        let cond = DistributedParams { rounding: Rounding::Conditional { beta: (-0.5f64).exp() }, ..base };
        assert!(cond.l2_bound() < base.l2_bound());
        assert!(eps(&cond, 10) <= eps(&base, 10));
    }

    #[test]
    fn min_sigma_is_the_inverse_of_epsilon() {
        for target in [1.0, 4.0, 8.0] {
            for rounds in [1u64, 10, 100] {
                let found = distributed_min_sigma(&params(), rounds, 1e-5, target).unwrap();
                assert!(found.epsilon <= target);
                let p = DistributedParams { site_sigma: found.site_sigma, ..params() };
                assert_eq!(found.epsilon, distributed_epsilon(&p, rounds, 1e-5).unwrap());
                let smaller = DistributedParams { site_sigma: found.site_sigma / (1.0 + 2.0 * SITE_SIGMA_TOLERANCE), ..params() };
                assert!(distributed_epsilon(&smaller, rounds, 1e-5).unwrap() > target, "not minimal: {found:?}");
                assert_eq!(found.noise_multiplier, p.noise_multiplier());
            }
        }
        assert!(matches!(distributed_min_sigma(&params(), 10, 1e-5, 0.0), Err(DpError::InvalidParameter { .. })));
        let easy = distributed_min_sigma(&params(), 1, 1e-5, 1e9).unwrap();
        assert_eq!(easy.site_sigma, MIN_SITE_SIGMA);
        // Tiny targets are reachable: at sigma up to 2^40 the bound falls to nothing.
        let tiny = distributed_min_sigma(&params(), 10, 1e-5, 1e-3).unwrap();
        assert!(tiny.epsilon <= 1e-3 && tiny.site_sigma > 1e5, "{tiny:?}");
    }

    #[test]
    fn refuses_bad_parameters() {
        let bad = |p: DistributedParams, name: &str| {
            let err = distributed_epsilon(&p, 10, 1e-5).unwrap_err();
            assert!(matches!(&err, DpError::InvalidParameter { name: n, .. } if *n == name), "{name}: {err}");
        };
        bad(DistributedParams { min_honest: 11, ..params() }, "min honest sites");
        bad(DistributedParams { min_honest: 0, ..params() }, "min honest sites");
        bad(DistributedParams { sites: 0, min_honest: 0, ..params() }, "number of sites");
        bad(DistributedParams { site_sigma: 0.0, ..params() }, "site sigma");
        bad(DistributedParams { site_sigma: 0.49, ..params() }, "site sigma");
        bad(DistributedParams { site_sigma: f64::NAN, ..params() }, "site sigma");
        bad(DistributedParams { site_sigma: f64::INFINITY, ..params() }, "site sigma");
        bad(DistributedParams { scale: 0.0, ..params() }, "scale");
        bad(DistributedParams { scale: f64::NAN, ..params() }, "scale");
        bad(DistributedParams { clip_norm: -1.0, ..params() }, "clip norm");
        bad(DistributedParams { dim: 0, ..params() }, "dimension");
        bad(DistributedParams { rounding: Rounding::Conditional { beta: 1.0 }, ..params() }, "rounding beta");
        bad(DistributedParams { scale: 1e300, clip_norm: 1e10, ..params() }, "clip norm x scale");
        assert!(matches!(distributed_epsilon(&params(), 10, 0.0), Err(DpError::InvalidParameter { name: "delta", .. })));
        assert!(matches!(distributed_epsilon(&params(), MAX_ROUNDS + 1, 1e-5), Err(DpError::TooManyRounds(_))));
    }

    #[test]
    fn releases_recompute_and_compose() {
        let r = DistributedRelease {
            site_sigma: 200.0,
            scale: 256.0,
            modulus_bits: 32,
            sites: 10,
            min_honest: 7,
            clip_norm: 1.0,
            dim: 10_000,
            rounding_beta: None,
        };
        assert_eq!(r.params(), params());
        assert_eq!(r.epsilon(1e-5).unwrap(), distributed_epsilon(&params(), 1, 1e-5).unwrap());
        let ten = epsilon_for_releases(&[r; 10], 1e-5).unwrap();
        assert_eq!(ten, distributed_epsilon(&params(), 10, 1e-5).unwrap());
        // Mixed rounds: more noise in the second half costs less than ten noisy-less rounds.
        let quieter = DistributedRelease { site_sigma: 400.0, ..r };
        let mixed = epsilon_for_releases(&[r, r, r, r, r, quieter, quieter, quieter, quieter, quieter], 1e-5).unwrap();
        assert!(mixed < ten);
        assert_eq!(epsilon_for_releases(&[], 1e-5).unwrap(), 0.0);
        let bad = DistributedRelease { modulus_bits: 0, ..r };
        assert!(matches!(bad.epsilon(1e-5), Err(DpError::InvalidParameter { name: "modulus bits", .. })));
        let bad = DistributedRelease { min_honest: 11, ..r };
        assert!(bad.epsilon(1e-5).is_err());
    }

    /// The worked example of `docs/PRIVACY.md`: `FEDWARD_TABLE=1 cargo test -p fedward-shared
    /// --lib distributed_table -- --nocapture`.
    #[test]
    fn distributed_table() {
        if std::env::var_os("FEDWARD_TABLE").is_none() {
            return;
        }
        let (rounds, delta, target, dim, scale) = (10u64, 1e-5, 8.0, 56_836u64, 4096.0);
        let site_level = crate::dp::plan_min_sigma(
            &crate::dp::Plan {
                mode: crate::plan::PrivacyMode::SiteLevel,
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                sampling_rate: 0.0,
                steps_per_round: 1,
                rounds,
                delta,
            },
            target,
        )
        .unwrap();
        eprintln!("site-level sigma for epsilon {target}: {}", site_level.noise_multiplier);
        eprintln!("| n | min_honest | rounding | per-site sigma (units) | per-site std | central std | sum std (all n) | epsilon | site-level sum std | site-level eps at same z |");
        for (n, h) in [(3u64, 2u64), (3, 3), (8, 5), (10, 7), (10, 10)] {
            for rounding in [Rounding::Deterministic, Rounding::Conditional { beta: (-0.5f64).exp() }] {
                let p = DistributedParams { sites: n, min_honest: h, site_sigma: 1.0, scale, clip_norm: 1.0, dim, rounding };
                let f = distributed_min_sigma(&p, rounds, delta, target).unwrap();
                let site_std = f.site_sigma / scale;
                let same_z = zcdp::epsilon_for_rounds(&[(f.noise_multiplier, rounds)], delta).unwrap();
                eprintln!(
                    "| {n} | {h} | {rounding:?} | {:.1} | {site_std:.3} | {:.3} (z) | {:.3} | {:.3} | {:.2} | {:.2} |",
                    f.site_sigma,
                    f.central_std,
                    (n as f64).sqrt() * site_std,
                    f.epsilon,
                    (n as f64).sqrt() * site_level.noise_multiplier,
                    same_z
                );
            }
        }
    }

    fn unit_update(dim: usize, norm: f64) -> Vec<f32> {
        // A spread-out vector of L2 norm just under `norm`.
        let raw: Vec<f64> = (0..dim).map(|i| ((i as f64) * 0.37).sin() + 0.1).collect();
        let n = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
        raw.iter().map(|v| (v / n * norm * (1.0 - 1e-6)) as f32).collect()
    }

    /// Quantized updates are within the bound the accountant assumed, unbiased, and an
    /// unclipped update is refused rather than rounded into a larger sensitivity.
    #[test]
    fn quantize_keeps_the_assumed_norm() {
        let mut g = crate::dp::NoiseRng::from_seed_insecure([4; 32]);
        let dim = 2000usize;
        let update = unit_update(dim, 1.0);
        for rounding in [Rounding::Deterministic, Rounding::Conditional { beta: (-0.5f64).exp() }] {
            let p = DistributedParams { dim: dim as u64, scale: 64.0, rounding, ..params() };
            let bound = p.l2_bound();
            let mut mean = vec![0f64; dim];
            for _ in 0..200 {
                let q = quantize(&mut g, &update, &p).unwrap();
                let norm = q.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                assert!(norm <= bound, "{rounding:?}: {norm} > {bound}");
                for (m, &v) in mean.iter_mut().zip(&q) {
                    *m += v as f64 / 200.0;
                }
            }
            // Unbiased: the mean rounding error per coordinate is small (sd 0.5 / sqrt(200)).
            let err = mean.iter().zip(&update).map(|(m, &u)| (m - f64::from(u) * 64.0).powi(2)).sum::<f64>() / dim as f64;
            assert!(err < 0.01, "{rounding:?}: mean squared bias {err}");
        }
        // At this coarse scale conditional rounding's bound is far below the deterministic one.
        let p = DistributedParams { dim: dim as u64, scale: 64.0, rounding: Rounding::Conditional { beta: 0.5 }, ..params() };
        assert!(p.l2_bound() < DistributedParams { rounding: Rounding::Deterministic, ..p }.l2_bound() * 0.8);
        // Not clipped: refused in both modes.
        let big = unit_update(dim, 3.0);
        let det = DistributedParams { dim: dim as u64, scale: 64.0, ..params() };
        assert!(matches!(quantize(&mut g, &big, &det), Err(QuantizeError::AboveBound { .. })));
        assert!(matches!(quantize(&mut g, &big, &p), Err(QuantizeError::TooManyTries(MAX_ROUNDING_TRIES))));
        assert!(matches!(quantize(&mut g, &update[..10], &det), Err(QuantizeError::Dimension { .. })));
        let mut nan = update.clone();
        nan[3] = f32::NAN;
        assert!(matches!(quantize(&mut g, &nan, &det), Err(QuantizeError::NonFinite { index: 3, .. })));
    }

    /// The honest sites' shares sum to noise of variance `H sigma^2`: the central std.
    #[test]
    fn shares_sum_to_the_central_noise() {
        let p = DistributedParams { min_honest: 5, site_sigma: site_sigma_for(1.0, 1.0, 64.0, 5), scale: 64.0, ..params() };
        let dg = crate::dp::DiscreteGaussian::new(p.site_sigma).unwrap();
        let mut g = crate::dp::NoiseRng::from_seed_insecure([5; 32]);
        let n = 20_000usize;
        let mut sum = vec![0i64; n];
        for _ in 0..p.min_honest {
            dg.add_to(&mut g, &mut sum).unwrap();
        }
        let var = sum.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        let want = 5.0 * p.site_sigma * p.site_sigma;
        // Variance estimate sd: want * sqrt(2 / n) = 1%: 4 of them.
        assert!((var / want - 1.0).abs() < 0.04, "{var} vs {want}");
        assert!(((var.sqrt() / p.scale) - p.central_std()).abs() < 0.02 * p.central_std());
    }

    #[derive(serde::Deserialize)]
    struct RefCase {
        sites: u64,
        min_honest: u64,
        site_sigma: f64,
        scale: f64,
        clip: f64,
        dim: u64,
        beta: Option<f64>,
        rounds: u64,
        delta: f64,
        tau: f64,
        l2_bound: f64,
        epsilon: f64,
    }

    #[derive(serde::Deserialize)]
    struct Reference {
        cases: Vec<RefCase>,
    }

    /// Every case of `reference/distributed_reference.json` (50-digit mpmath, independent
    /// code, no slack): tau and the norm bound agree, and our epsilon is at or above the
    /// reference (never under-counted) by no more than the documented slack.
    #[test]
    fn agrees_with_the_mpmath_reference() {
        let r: Reference = serde_json::from_str(include_str!("reference/distributed_reference.json")).unwrap();
        assert!(r.cases.len() >= 8);
        for c in &r.cases {
            let p = DistributedParams {
                sites: c.sites,
                min_honest: c.min_honest,
                site_sigma: c.site_sigma,
                scale: c.scale,
                clip_norm: c.clip,
                dim: c.dim,
                rounding: c.beta.map_or(Rounding::Deterministic, |beta| Rounding::Conditional { beta }),
            };
            assert!((p.tau() - c.tau).abs() <= 1e-13 * c.tau.max(1e-300), "tau {} vs {}", p.tau(), c.tau);
            assert!(p.l2_bound() >= c.l2_bound && p.l2_bound() <= c.l2_bound * (1.0 + 2e-9), "{} vs {}", p.l2_bound(), c.l2_bound);
            let eps = distributed_epsilon(&p, c.rounds, c.delta).unwrap();
            assert!(eps >= c.epsilon && eps <= c.epsilon * (1.0 + 1e-8), "{p:?}: {eps} vs reference {}", c.epsilon);
        }
    }
}
