//! The agent's half of differential privacy, without I/O: site-level clipping and noise,
//! the checks on a record-level update, and the `PrivacyUsed` an update declares.
//!
//! Site-level DP lives here rather than in the trainer: it is a property of what leaves
//! the site, not of how the model was trained, so it applies the same to any
//! [`Trainer`](fedward_models::Trainer) and sits next to the budget and the ledger that
//! account for it. Record-level DP (DP-SGD) has to happen inside training; here the agent
//! only checks the trainer did what the accountant will record (the step count) and
//! clips the update to its declared bound again, which changes nothing when the trainer
//! already did (clipping is idempotent) and keeps the coordinator's norm check from
//! rejecting it if a trainer forgot.

use fedward_shared::codec::{CodecError, UpdateEncoding};
use fedward_shared::dp::distributed::{quantize, QuantizeError};
use fedward_shared::dp::{
    clip_tensors, coarse_count, DiscreteGaussian, DiscreteNoiseError, DistributedRelease, DpError, GaussianNoise, NoiseError, NoiseRng,
    NoiseSource, ScoreRelease,
};
use fedward_shared::plan::PrivacyMode;
use fedward_shared::plan::PrivacyPlan;
use fedward_shared::secagg::FixedPoint;
use fedward_shared::tensor::TensorSet;
use fedward_shared::wire::{LocalMetrics, PrivacyUsed, ValidationScore};
use rand_chacha::ChaCha20Rng;

use crate::session::Approved;

/// Why an update cannot be released under its plan. Never contains update values.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("the trainer took {taken} DP-SGD steps, the plan accounts for {planned}")]
    StepMismatch { planned: u64, taken: u64 },
    #[error("clipping the update: {0}")]
    Clip(#[from] DpError),
    #[error("adding noise: {0}")]
    Noise(#[from] NoiseError),
    #[error("encoding the update: {0}")]
    Codec(#[from] CodecError),
    #[error("the update cannot be quantized within its norm bound {bound}")]
    QuantizedOverBound { bound: f64 },
    #[error("quantizing the update for distributed DP: {0}")]
    Quantize(#[from] QuantizeError),
    #[error("sampling the noise share: {0}")]
    Discrete(#[from] DiscreteNoiseError),
    #[error("encoding the update for the secure sum: {0}")]
    Encode(String),
    #[error("a noise sampling thread panicked")]
    NoiseThread,
}

/// Quantizes a private `delta` in place for `encoding`: post-processing of the release, so
/// no privacy cost. Rounding to the nearest step can lengthen an update by a hair; where
/// the plan bounds the update's norm exactly (record-level's `update_clip_norm`, which is
/// also the coordinator's default bound), the update is shrunk before quantizing until the
/// quantized update is within the bound, so a coordinator that refuses updates over it
/// (`over_norm = "refuse"`) never refuses this one.
pub fn quantize_update(plan: &PrivacyPlan, encoding: UpdateEncoding, delta: &mut TensorSet) -> Result<(), PrivacyError> {
    if encoding == UpdateEncoding::F32 {
        return Ok(());
    }
    let bound = match *plan {
        PrivacyPlan::RecordLevel { update_clip_norm, .. } => Some(update_clip_norm),
        PrivacyPlan::Off | PrivacyPlan::SiteLevel { .. } | PrivacyPlan::Distributed { .. } => None,
    };
    let original = bound.map(|_| delta.clone());
    let quantize = |d: &mut TensorSet| d.iter_mut().try_for_each(|(name, t)| encoding.quantize(name, t));
    quantize(delta)?;
    let (Some(bound), Some(original)) = (bound, original) else { return Ok(()) };
    let mut shrink = 1.0f64;
    for _ in 0..8 {
        let norm = delta.l2_norm();
        if norm <= bound {
            return Ok(());
        }
        shrink *= bound / norm * (1.0 - 1e-6);
        *delta = original.clone();
        for (_, t) in delta.iter_mut() {
            t.data_mut().iter_mut().for_each(|v| *v = (f64::from(*v) * shrink) as f32);
        }
        quantize(delta)?;
    }
    Err(PrivacyError::QuantizedOverBound { bound })
}

/// What the agent did to an update, for its logs (norms only).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    /// L2 norm of the update as the trainer returned it.
    pub norm_before: f64,
    /// L2 norm after clipping and before noise: at most the plan's bound.
    pub norm_clipped: f64,
    /// Noise std per coordinate (0 when no noise was added here).
    pub noise_std: f64,
}

/// Makes `delta` releasable under `plan`: site-level clips it to `C` across all tensors
/// and adds snapped Gaussian noise of std `sigma * C` per coordinate; record-level checks
/// `dp_steps` against the approved release and clips to `update_clip_norm`; off leaves it.
pub fn privatize(
    plan: &PrivacyPlan,
    approved: &Approved,
    dp_steps: u64,
    delta: &mut TensorSet,
    rng: &mut NoiseRng,
) -> Result<Applied, PrivacyError> {
    let norm_before = logged_norm(delta);
    match *plan {
        PrivacyPlan::Off => Ok(Applied { norm_before, norm_clipped: norm_before, noise_std: 0.0 }),
        PrivacyPlan::SiteLevel { noise_multiplier, clip_norm } => {
            let noise = GaussianNoise::for_mechanism(noise_multiplier, clip_norm)?;
            clip_tensors(delta, clip_norm)?;
            let norm_clipped = delta.l2_norm();
            noise.add_to_tensors(rng, delta)?;
            Ok(Applied { norm_before, norm_clipped, noise_std: noise.std() })
        }
        // The noise is integer and added after quantizing, at encoding ([`distributed_input`]);
        // here only the clip. What is logged is the std of the share in model units.
        PrivacyPlan::Distributed { clip_norm, .. } => {
            clip_tensors(delta, clip_norm)?;
            let noise_std = approved.release.distributed.map_or(0.0, |d| d.site_sigma / d.scale);
            Ok(Applied { norm_before, norm_clipped: delta.l2_norm(), noise_std })
        }
        PrivacyPlan::RecordLevel { update_clip_norm, .. } => {
            if dp_steps != approved.release.steps {
                return Err(PrivacyError::StepMismatch { planned: approved.release.steps, taken: dp_steps });
            }
            clip_tensors(delta, update_clip_norm)?;
            Ok(Applied { norm_before, norm_clipped: delta.l2_norm(), noise_std: 0.0 })
        }
    }
}

/// The update's L2 norm before the privacy step, for the log only (clipping uses
/// `TensorSet::l2_norm`): eight independent f64 sums, which the compiler vectorises, where
/// one running sum is bound by the latency of each add (a 22.7M-parameter update: about 4x
/// faster). It may differ from `l2_norm` in the last bits.
fn logged_norm(delta: &TensorSet) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut tail = 0.0f64;
    for (_, t) in delta.iter() {
        let chunks = t.data().chunks_exact(8);
        tail += chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        for c in chunks {
            for (acc, &v) in lanes.iter_mut().zip(c) {
                *acc += f64::from(v) * f64::from(v);
            }
        }
    }
    (lanes.iter().sum::<f64>() + tail).sqrt()
}

/// What the update header (and the ledger) declare: the parameters actually used, and the
/// site's cumulative epsilon after this release at its budget's `delta`.
/// What an update's header says beside the update itself: under a DP plan, a coarsened
/// example count and no metrics, unless the site opted in (`share_metrics`); without DP
/// nothing is protected anyway, so the exact figures.
pub fn disclosed(plan: &PrivacyPlan, share_metrics: bool, num_examples: u64, metrics: &LocalMetrics) -> (u64, Option<LocalMetrics>) {
    if share_metrics || matches!(plan, PrivacyPlan::Off) {
        (num_examples, Some(metrics.clone()))
    } else {
        (coarse_count(num_examples), None)
    }
}

/// Model selection: the site's score of the offered model (`correct` of `examples` on its
/// validation split) as it may leave under `plan` (see [`ScoreRelease`] for the
/// sensitivities). Without DP the exact figures. Record-level: the count plus Gaussian noise
/// of std `z` and the coarsened example count. Site-level: the accuracy plus noise of std
/// `z`, sent as a count out of the coarsened examples (post-processing). The noise comes
/// from the round's CSPRNG, like the update's.
pub fn release_score(
    plan: &PrivacyPlan,
    release: ScoreRelease,
    correct: u64,
    examples: u64,
    rng: &mut NoiseRng,
) -> Result<ValidationScore, PrivacyError> {
    let noised = |value: f64, rng: &mut NoiseRng| -> Result<f64, PrivacyError> {
        let mut v = [value as f32];
        GaussianNoise::new(release.noise_multiplier)?.add_to(rng, &mut v)?;
        Ok(f64::from(v[0]))
    };
    Ok(match plan {
        PrivacyPlan::Off => ValidationScore { correct: correct as f64, examples },
        PrivacyPlan::RecordLevel { .. } => ValidationScore { correct: noised(correct as f64, rng)?, examples: coarse_count(examples) },
        PrivacyPlan::SiteLevel { .. } | PrivacyPlan::Distributed { .. } => {
            let accuracy = if examples == 0 { 0.0 } else { correct as f64 / examples as f64 };
            let shown = coarse_count(examples);
            ValidationScore { correct: noised(accuracy, rng)? * shown as f64, examples: shown }
        }
    })
}

pub fn privacy_used(plan: &PrivacyPlan, approved: &Approved, delta: f64) -> PrivacyUsed {
    let r = &approved.release;
    let used = privacy_used_by_update(plan, approved, delta);
    PrivacyUsed { score: r.score, ..used }
}

fn privacy_used_by_update(plan: &PrivacyPlan, approved: &Approved, delta: f64) -> PrivacyUsed {
    let r = &approved.release;
    match *plan {
        PrivacyPlan::Off => PrivacyUsed::off(),
        // Site-level adjacency, whole or split into shares (the release then carries the
        // site's share; a site-level release carries none).
        PrivacyPlan::SiteLevel { noise_multiplier, clip_norm } | PrivacyPlan::Distributed { noise_multiplier, clip_norm, .. } => {
            PrivacyUsed {
                mode: plan.mode(),
                noise_multiplier,
                clip_norm,
                sampling_rate: 0.0,
                steps: r.steps,
                update_clip_norm: 0.0,
                epsilon_after: approved.epsilon_after,
                delta,
                distributed: r.distributed,
                score: None,
            }
        }
        PrivacyPlan::RecordLevel { noise_multiplier, clip_norm, sampling_rate, update_clip_norm } => PrivacyUsed {
            mode: PrivacyMode::RecordLevel,
            noise_multiplier,
            clip_norm,
            sampling_rate,
            steps: r.steps,
            update_clip_norm,
            epsilon_after: approved.epsilon_after,
            delta,
            distributed: None,
            score: None,
        },
    }
}

/// Distributed DP at the site, after [`privatize`] clipped the update: the flattened
/// update `input` (L2 norm at most the share's clip norm) quantized to integers in the
/// share's units with the norm check the accountant assumes
/// ([`fedward_shared::dp::distributed::quantize`], its rounding drawn from `rounding`),
/// plus the site's noise share, exact discrete Gaussian `N_Z(0, site_sigma^2)` per
/// coordinate (never from floats), then encoded for the secure sum
/// ([`FixedPoint::encode_units`]). `noise` holds one CSPRNG per thread: the exact sampler
/// is single-threaded, so the coordinates are split in `noise.len()` contiguous chunks
/// sampled in parallel, each from its own generator. In production each is seeded from the
/// OS on its own (independent streams; the seeds are never stored or logged); tests seed
/// them.
pub fn distributed_input(
    fixed: &FixedPoint,
    share: &DistributedRelease,
    input: &[f32],
    rounding: &mut impl NoiseSource,
    noise: Vec<ChaCha20Rng>,
) -> Result<Vec<u64>, PrivacyError> {
    let mut values = quantize(rounding, input, &share.params())?;
    add_noise_share(&mut values, share.site_sigma, noise)?;
    fixed.encode_units(&values, share.scale).map_err(|e| PrivacyError::Encode(e.to_string()))
}

/// Adds `N_Z(0, sigma^2)` to every value, in `rngs.len()` chunks on as many threads, each
/// chunk from its own generator.
pub fn add_noise_share(values: &mut [i64], sigma: f64, rngs: Vec<ChaCha20Rng>) -> Result<(), PrivacyError> {
    let sampler = DiscreteGaussian::new(sigma)?;
    // Every chunk needs its generator: no generator would mean no noise.
    if rngs.is_empty() {
        return Err(PrivacyError::NoiseThread);
    }
    let n = rngs.len();
    let chunk = values.len().div_ceil(n).max(1);
    std::thread::scope(|scope| {
        let jobs: Vec<_> = values
            .chunks_mut(chunk)
            .zip(rngs)
            .map(|(part, mut rng)| {
                let sampler = &sampler;
                scope.spawn(move || sampler.add_to(&mut rng, part))
            })
            .collect();
        jobs.into_iter().try_for_each(|j| match j.join() {
            Ok(added) => added.map_err(PrivacyError::from),
            Err(_) => Err(PrivacyError::NoiseThread),
        })
    })
}

#[cfg(test)]
mod tests {
    use fedward_shared::dp::Release;
    use fedward_shared::tensor::Tensor;

    use super::*;

    fn approved(release: Release) -> Approved {
        Approved { release, epsilon_before: 0.0, epsilon_after: 1.0 }
    }

    /// A large update whose values are mostly far above the clip.
    fn update(n: usize, scale: f32) -> TensorSet {
        let mut set = TensorSet::new();
        let half = n / 2;
        set.insert("a.weight", Tensor::new(vec![half], (0..half).map(|i| scale * ((i % 7) as f32 - 3.0)).collect()).unwrap());
        set.insert("b.bias", Tensor::new(vec![n - half], (0..n - half).map(|i| scale * (i % 3) as f32).collect()).unwrap());
        set
    }

    /// A score leaves exact without DP; under record-level DP as a noised count (std z)
    /// of the coarsened examples; under site-level DP as a noised accuracy (std z) times
    /// the coarsened examples. Over many draws the noise has the std the accountant
    /// assumes and no bias.
    #[test]
    fn a_score_is_noised_with_the_std_its_release_declares() {
        let release = ScoreRelease { noise_multiplier: 2.0, alone: false };
        let mut rng = NoiseRng::from_seed_insecure([7; 32]);
        let exact = release_score(&PrivacyPlan::Off, release, 83, 97, &mut rng).unwrap();
        assert_eq!(exact, ValidationScore { correct: 83.0, examples: 97 });
        let record = PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.1, update_clip_norm: 1.0 };
        let site = PrivacyPlan::SiteLevel { noise_multiplier: 1.0, clip_norm: 1.0 };
        let n = 4000;
        for (plan, centre, std) in [(record, 83.0, 2.0), (site, 83.0 / 97.0, 2.0)] {
            let draws: Vec<f64> = (0..n)
                .map(|_| {
                    let s = release_score(&plan, release, 83, 97, &mut rng).unwrap();
                    assert_eq!(s.examples, 100, "coarsened");
                    if matches!(plan, PrivacyPlan::SiteLevel { .. }) {
                        s.correct / 100.0
                    } else {
                        s.correct
                    }
                })
                .collect();
            let mean = draws.iter().sum::<f64>() / n as f64;
            let sd = (draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
            // Five standard errors.
            assert!((mean - centre).abs() < 5.0 * std / (n as f64).sqrt(), "{plan:?}: mean {mean}");
            assert!((sd / std - 1.0).abs() < 0.06, "{plan:?}: sd {sd}");
        }
    }

    /// The logged norm is the clipping norm up to rounding, whatever the tensors' lengths
    /// (remainders of the eight lanes included).
    #[test]
    fn the_logged_norm_is_the_l2_norm() {
        for n in [0, 1, 7, 8, 9, 31, 1001] {
            let set = update(n, 0.5);
            let (fast, exact) = (logged_norm(&set), set.l2_norm());
            assert!((fast - exact).abs() <= 1e-12 * exact.max(1.0), "{n}: {fast} vs {exact}");
        }
    }

    /// Site-level: the update is clipped to C across all tensors before any noise, and the
    /// noise has std sigma*C per coordinate (measured over 400k seeded draws).
    #[test]
    fn site_level_clips_to_c_then_adds_noise_of_std_sigma_c() {
        let (sigma, c) = (1.5, 0.25);
        let plan = PrivacyPlan::SiteLevel { noise_multiplier: sigma, clip_norm: c };
        let n = 400_000;
        let original = update(n, 10.0);
        let mut delta = original.clone();
        let mut rng = NoiseRng::from_seed_insecure([1; 32]);
        let applied = privatize(&plan, &approved(Release::site_level(sigma)), 0, &mut delta, &mut rng).unwrap();
        assert!(applied.norm_before > 1000.0 * c);
        assert!(applied.norm_clipped <= c, "{applied:?}");
        assert!(applied.norm_clipped > c * (1.0 - 1e-6), "{applied:?}");
        assert_eq!(applied.noise_std, sigma * c);
        // The noise itself: the output minus the clipped update.
        let mut clipped = original.clone();
        clip_tensors(&mut clipped, c).unwrap();
        let residual: Vec<f64> = delta
            .iter()
            .zip(clipped.iter())
            .flat_map(|((_, d), (_, k))| d.data().iter().zip(k.data()).map(|(&x, &y)| f64::from(x) - f64::from(y)).collect::<Vec<_>>())
            .collect();
        assert_eq!(residual.len(), n);
        let mean = residual.iter().sum::<f64>() / n as f64;
        let std = (residual.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        // Standard error of the std is std / sqrt(2n) = 0.11%; snapping adds 0.065%.
        assert!((std / (sigma * c) - 1.0).abs() < 0.006, "std {std}, expected {}", sigma * c);
        assert!(mean.abs() < 5.0 * sigma * c / (n as f64).sqrt(), "mean {mean}");
        // The same seed gives the same release (tests only: production seeds from the OS).
        let mut again = original.clone();
        privatize(&plan, &approved(Release::site_level(sigma)), 0, &mut again, &mut NoiseRng::from_seed_insecure([1; 32])).unwrap();
        assert_eq!(again, delta);
    }

    fn std_of(values: &[i64]) -> f64 {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    }

    fn rngs(seed: u8, n: usize) -> Vec<ChaCha20Rng> {
        use rand::SeedableRng;
        (0..n).map(|i| ChaCha20Rng::from_seed([seed.wrapping_add(i as u8); 32])).collect()
    }

    /// Each site's share has std `site_sigma`, every thread's chunk included, and the
    /// shares of `min_honest` sites sum to the full sigma: `sqrt(H) site_sigma`.
    #[test]
    fn noise_shares_of_min_honest_sites_sum_to_the_full_sigma() {
        let (site_sigma, n, h) = (3.5, 120_000, 3);
        let mut sum = vec![0i64; n];
        for site in 0..h {
            let mut share = vec![0i64; n];
            add_noise_share(&mut share, site_sigma, rngs(10 * site as u8, 4)).unwrap();
            // Standard error of the std: 0.2%; every chunk is noised.
            assert!((std_of(&share) / site_sigma - 1.0).abs() < 0.015, "{}", std_of(&share));
            assert!(share.chunks(n / 4).all(|c| (std_of(c) / site_sigma - 1.0).abs() < 0.03));
            sum.iter_mut().zip(&share).for_each(|(s, z)| *s += z);
        }
        let full = site_sigma * (h as f64).sqrt();
        assert!((std_of(&sum) / full - 1.0).abs() < 0.015, "{} vs {full}", std_of(&sum));
        // No generator, no noise: refused rather than sent bare.
        assert!(matches!(add_noise_share(&mut sum, site_sigma, Vec::new()), Err(PrivacyError::NoiseThread)));
        // The same generators give the same share (tests only: production seeds each from the OS).
        let (mut a, mut b) = (vec![0i64; 1000], vec![0i64; 1000]);
        add_noise_share(&mut a, site_sigma, rngs(1, 3)).unwrap();
        add_noise_share(&mut b, site_sigma, rngs(1, 3)).unwrap();
        assert_eq!(a, b);
    }

    /// The site's input under distributed DP: quantized in the share's units, noised, and
    /// encoded so that the secure sum decodes to the update plus the share's noise in model
    /// units (`site_sigma / scale`), with weight 1.
    #[test]
    fn a_distributed_input_decodes_to_the_update_plus_its_noise_share() {
        let (dim, clip) = (50_000usize, 1.0f64);
        let fixed = FixedPoint::new(64, 2000.0, 1, 3).unwrap();
        let scale = fixed.noise_units(clip, dim as u64);
        assert!(clip * scale >= 1024.0 * (dim as f64).sqrt() && scale <= fixed.scale());
        let share = DistributedRelease {
            site_sigma: fedward_shared::dp::site_sigma_for(1.0, clip, scale, 2),
            scale,
            modulus_bits: 64,
            sites: 3,
            min_honest: 2,
            clip_norm: clip,
            dim: dim as u64,
            rounding_beta: None,
        };
        let input: Vec<f32> = (0..dim).map(|i| if i % 2 == 0 { 0.004 } else { -0.002 }).collect();
        let mut rounding = rngs(7, 1).remove(0);
        let encoded = distributed_input(&fixed, &share, &input, &mut rounding, rngs(3, 2)).unwrap();
        assert_eq!(encoded.len(), dim + 1);
        let mean = fixed.decode_mean(&encoded).unwrap();
        assert_eq!(mean.total_weight, 1);
        let noise: Vec<f64> = mean.values.iter().zip(&input).map(|(&m, &x)| f64::from(m) - f64::from(x)).collect();
        let std = (noise.iter().map(|v| v * v).sum::<f64>() / dim as f64).sqrt();
        let expected = share.site_sigma / scale;
        assert!((std / expected - 1.0).abs() < 0.02, "{std} vs {expected}");
        // Two shares carry the plan's sigma C (min_honest = 2), and a little more (the grid).
        assert!(expected * 2f64.sqrt() >= clip && expected * 2f64.sqrt() < clip * 1.001);
        // An update above the clip is refused by the norm check, not sent.
        let big = vec![1.0f32; dim];
        assert!(matches!(distributed_input(&fixed, &share, &big, &mut rounding, rngs(3, 2)), Err(PrivacyError::Quantize(_))));
    }

    /// The sampler's cost at the demo's settings (`body:1`: 1,922,304 coordinates, units
    /// 2^21, epsilon 8 over 10 rounds with 2 of 3 sites honest: site sigma 5,984,575), on a
    /// sample of coordinates with 1 and 2 threads. Printed, not asserted:
    /// `FEDWARD_BENCH=1 cargo test --workspace --lib noise_share_cost -- --nocapture`.
    #[test]
    fn noise_share_cost_per_coordinate() {
        if std::env::var_os("FEDWARD_BENCH").is_none() {
            return;
        }
        let n = 400_000;
        for threads in [1, 2] {
            let mut values = vec![0i64; n];
            // The clock is read here only, to print a figure (no decision depends on it).
            let started = std::time::Instant::now();
            add_noise_share(&mut values, 5_984_575.074_2, rngs(5, threads)).unwrap();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{threads} thread(s): {:.3} us per coordinate, {:.1} s for 1,922,304 coordinates (std {:.0})",
                secs / n as f64 * 1e6,
                secs / n as f64 * 1_922_304.0,
                std_of(&values)
            );
        }
    }

    #[test]
    fn record_level_checks_the_step_count_and_bounds_the_update() {
        let plan = PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.1, update_clip_norm: 2.0 };
        let ok = approved(Release::record_level(1.0, 0.1, 10));
        let mut rng = NoiseRng::from_seed_insecure([2; 32]);
        let mut delta = update(100, 1.0);
        let err = privatize(&plan, &ok, 9, &mut delta, &mut rng).unwrap_err();
        assert!(matches!(err, PrivacyError::StepMismatch { planned: 10, taken: 9 }), "{err}");
        let applied = privatize(&plan, &ok, 10, &mut delta, &mut rng).unwrap();
        assert!(applied.norm_clipped <= 2.0 && delta.l2_norm() <= 2.0);
        // Within the bound already: untouched, no noise added here.
        let small = update(100, 1e-3);
        let mut same = small.clone();
        privatize(&plan, &ok, 10, &mut same, &mut rng).unwrap();
        assert_eq!(same, small);
    }

    #[test]
    fn under_dp_the_header_withholds_metrics_and_coarsens_the_count_unless_shared() {
        let metrics = LocalMetrics { train_loss: 0.42, val_accuracy: Some(0.91), ..Default::default() };
        let dp = PrivacyPlan::SiteLevel { noise_multiplier: 1.0, clip_norm: 1.0 };
        assert_eq!(disclosed(&dp, false, 1234, &metrics), (1200, None));
        assert_eq!(disclosed(&dp, true, 1234, &metrics), (1234, Some(metrics.clone())));
        assert_eq!(disclosed(&PrivacyPlan::Off, false, 1234, &metrics), (1234, Some(metrics)));
    }

    #[test]
    fn privacy_used_declares_the_parameters_and_the_spend() {
        let plan = PrivacyPlan::RecordLevel { noise_multiplier: 1.1, clip_norm: 0.5, sampling_rate: 0.02, update_clip_norm: 3.0 };
        let a = Approved { release: Release::record_level(1.1, 0.02, 50), epsilon_before: 1.0, epsilon_after: 1.5 };
        let used = privacy_used(&plan, &a, 1e-5);
        assert_eq!(
            used,
            PrivacyUsed {
                score: None,
                mode: PrivacyMode::RecordLevel,
                noise_multiplier: 1.1,
                clip_norm: 0.5,
                sampling_rate: 0.02,
                steps: 50,
                update_clip_norm: 3.0,
                epsilon_after: 1.5,
                delta: 1e-5,
                distributed: None,
            }
        );
        assert_eq!(used.release(), a.release);
        let site = PrivacyPlan::SiteLevel { noise_multiplier: 4.0, clip_norm: 1.0 };
        let used = privacy_used(&site, &Approved { release: Release::site_level(4.0), ..a }, 1e-6);
        assert_eq!(used.release(), Release::site_level(4.0));
        assert_eq!(privacy_used(&PrivacyPlan::Off, &a, 1e-5), PrivacyUsed::off());
    }

    #[test]
    fn a_quantized_record_level_update_stays_within_its_clip_norm() {
        // 0.3 rounds up under int8 (to 0.30078125): an update clipped to exactly its bound
        // would come out longer.
        let mut delta = TensorSet::new();
        delta.insert("w", Tensor::new(vec![4, 8], vec![0.3; 32]).unwrap());
        let bound = delta.l2_norm();
        let plan = PrivacyPlan::RecordLevel { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.01, update_clip_norm: bound };
        let mut plain = delta.clone();
        quantize_update(&PrivacyPlan::Off, UpdateEncoding::Int8Row, &mut plain).unwrap();
        assert!(plain.l2_norm() > bound, "the case this guards against");
        for encoding in [UpdateEncoding::F16, UpdateEncoding::Int8Tensor, UpdateEncoding::Int8Row] {
            let mut d = delta.clone();
            quantize_update(&plan, encoding, &mut d).unwrap();
            assert!(d.l2_norm() <= bound, "{encoding}: {} > {bound}", d.l2_norm());
            // On the encoding's grid: quantizing again changes nothing.
            let mut again = d.clone();
            quantize_update(&PrivacyPlan::Off, encoding, &mut again).unwrap();
            assert_eq!(again, d, "{encoding}");
            assert!((d.l2_norm() - bound).abs() < 0.02 * bound, "{encoding}: shrunk no more than needed");
        }
    }
}
