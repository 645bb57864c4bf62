//! Differential privacy for fedward: clipping, noise, accountants, budgets and planning.
//!
//! Two mechanisms, one per [`PrivacyMode`]:
//!
//! * **record-level** (the default for hospitals): DP-SGD inside local training. Records
//!   are Poisson-sampled at rate `q`, per-example gradients clipped to `C`, and each summed
//!   step gets Gaussian noise of std `sigma * C` ([`noise`]); the finished update is then
//!   clipped to an update-norm bound ([`clip`]), which is post-processing. Accounted with
//!   Rényi DP of the sampled Gaussian mechanism ([`rdp`]) over every local step of every
//!   round, under add/remove-one-record adjacency.
//! * **site-level** (DP-FedAvg): the whole update is clipped to `C` and gets Gaussian noise
//!   of std `sigma * C` per coordinate. Adjacency replaces a site's entire dataset, so the
//!   sensitivity is `2C` and one round is `2 / sigma^2`-zCDP. Accounted with opendp
//!   ([`zcdp`]).
//! * **distributed** (under secure aggregation): the site-level mechanism with the noise
//!   split: each site adds exact discrete Gaussian noise in fixed-point units
//!   ([`discrete`]) and only the sum over at least `min_honest` honest sites is counted;
//!   accounted with the distributed discrete Gaussian bound of Kairouz, Liu, Steinke 2021
//!   ([`distributed`]). Not yet a [`PrivacyMode`]: the ledger records it later.
//!
//! [`accountant`] puts both behind one entry point for the agent, the coordinator and the
//! auditor: cumulative epsilon, the epsilon the next round *would* reach, a site
//! [`Budget`], and the planning calculator ([`plan_epsilon`], [`plan_min_sigma`]).
//!
//! A round at an agent, in order: rebuild the accountant from the ledger
//! ([`crate::ledger::Ledger::accountant`]); `budget.check(&accountant, &release)` (decline on
//! error); train, clipping and noising with [`clip`] and [`noise`]; append the release
//! (with the [`Spend`]'s epsilons and the update's digest) to the ledger file, fsynced;
//! only then send the update.
//!
//! Nothing here does I/O, reads a clock or draws entropy on its own: randomness comes in
//! as a [`noise::NoiseRng`] built by the caller.

pub mod accountant;
pub mod clip;
pub mod discrete;
pub mod distributed;
pub mod noise;
pub mod rdp;
pub mod sampling;
pub mod zcdp;

mod exact;
mod special;

pub use accountant::{
    epsilon_after_round, plan_epsilon, plan_min_sigma, Accountant, Budget, BudgetError, Plan, Release, ScoreRelease, SigmaSearch, Spend,
};
pub use clip::{clip_slices, clip_tensors, Clipped};
pub use discrete::{DiscreteGaussian, DiscreteNoiseError, NoiseSource};
pub use distributed::{
    distributed_epsilon, distributed_min_sigma, epsilon_for_releases, quantize, site_sigma_for, DistributedParams, DistributedRelease,
    DistributedSigma, QuantizeError, Rounding,
};
pub use noise::{GaussianNoise, NoiseError, NoiseRng};
pub use rdp::Rdp;
pub use sampling::{dp_sgd_steps, poisson_sample};

use crate::plan::PrivacyMode;

/// The example count a site sends under a DP plan (its FedAvg weight): `n` rounded to two
/// significant figures and to a multiple of 10, never below 10. Adding or removing one
/// record moves it only at a bucket's edge, and a small site's exact size does not leave
/// it. This is coarsening, not a DP guarantee: a count that crosses an edge still shows.
/// The weight it gives is within 5% of the exact one for sites of 100 records or more.
pub fn coarse_count(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let digits = n.ilog10() + 1;
    let unit = 10u64.pow(digits.saturating_sub(2)).max(10);
    ((n + unit / 2) / unit * unit).max(10)
}

/// Invalid DP parameters or an accounting that cannot be done.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DpError {
    #[error("invalid {name}: {value} (expected {expected})")]
    InvalidParameter { name: &'static str, value: f64, expected: &'static str },
    #[error("a {found} release cannot be composed with {expected} releases")]
    ModeMismatch { expected: PrivacyMode, found: PrivacyMode },
    #[error("privacy mode off gives no finite epsilon")]
    NoPrivacy,
    #[error("no noise multiplier up to {max} reaches epsilon {target}")]
    Unreachable { target: f64, max: f64 },
    #[error("too many rounds to compose: {0}")]
    TooManyRounds(u64),
    #[error("opendp: {0}")]
    OpenDp(String),
}

impl DpError {
    pub(crate) fn invalid(name: &'static str, value: f64, expected: &'static str) -> Self {
        Self::InvalidParameter { name, value, expected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_coarsened_to_two_figures_and_tens() {
        let sent: Vec<u64> = [0, 1, 5, 14, 15, 87, 210, 1234, 1750, 99_999].iter().map(|&n| coarse_count(n)).collect();
        assert_eq!(sent, [0, 10, 10, 10, 20, 90, 210, 1200, 1800, 100_000]);
        for n in 100..20_000u64 {
            let c = coarse_count(n) as f64;
            assert!((c - n as f64).abs() <= 0.05 * n as f64, "{n} -> {c}");
        }
    }
}
