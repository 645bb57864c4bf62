//! Poisson sampling of records for DP-SGD, and the number of steps a round takes.
//!
//! The record-level accountant ([`super::rdp`]) is the sampled Gaussian mechanism: every
//! step includes each record independently with probability `q`, so a batch has a random
//! size (possibly zero). Shuffled fixed-size batches are a different mechanism with a
//! weaker guarantee, which is why the trainer must sample here and not shuffle.
//!
//! The draws come from the same [`NoiseRng`] as the noise: the amplification by sampling
//! holds only if nobody can predict which records a step used, so a seed known to the
//! coordinator (like the plan's shuffling seed) would void it.

use super::noise::NoiseRng;
use super::DpError;

/// Noisy DP-SGD steps in one round: `round(local_epochs / q)`, i.e. `local_epochs`
/// expected passes over the data. Agent (to account before training) and trainer (to
/// train) both call this, so they cannot disagree.
pub fn dp_sgd_steps(local_epochs: u32, sampling_rate: f64) -> Result<u64, DpError> {
    if !(sampling_rate > 0.0 && sampling_rate <= 1.0) {
        return Err(DpError::invalid("sampling rate", sampling_rate, "a number in (0, 1]"));
    }
    let steps = (f64::from(local_epochs) / sampling_rate).round();
    // 2^53 keeps the conversion exact; no round is anywhere near that long.
    if steps > (1u64 << 53) as f64 {
        return Err(DpError::invalid("steps per round", steps, "at most 2^53"));
    }
    Ok(steps as u64)
}

/// The indices in `0..n` of one Poisson-sampled batch: each is kept independently with
/// probability `q` (up to `2^-53`, the resolution of the uniform draw), in increasing order.
pub fn poisson_sample(rng: &mut NoiseRng, n: usize, sampling_rate: f64) -> Result<Vec<usize>, DpError> {
    if !(0.0..=1.0).contains(&sampling_rate) {
        return Err(DpError::invalid("sampling rate", sampling_rate, "a number in [0, 1]"));
    }
    // u is uniform on {0, 2^-53, ..., 1 - 2^-53}; P(u < q) = ceil(q 2^53) / 2^53.
    let scale = 1.0 / (1u64 << 53) as f64;
    Ok((0..n).filter(|_| ((rng.next_u64() >> 11) as f64) * scale < sampling_rate).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_expected_passes_over_the_data() {
        assert_eq!(dp_sgd_steps(1, 0.01).unwrap(), 100);
        assert_eq!(dp_sgd_steps(2, 0.3).unwrap(), 7);
        assert_eq!(dp_sgd_steps(1, 1.0).unwrap(), 1);
        assert_eq!(dp_sgd_steps(0, 0.5).unwrap(), 0);
        assert!(dp_sgd_steps(1, 0.0).is_err());
        assert!(dp_sgd_steps(1, f64::NAN).is_err());
        assert!(dp_sgd_steps(1, 1.5).is_err());
    }

    /// Batch sizes are Binomial(n, q): mean nq, variance nq(1-q); every record is as likely
    /// to be picked; the extremes behave.
    #[test]
    fn poisson_batches_have_binomial_sizes_and_uniform_membership() {
        let mut rng = NoiseRng::from_seed_insecure([3; 32]);
        let (n, q, trials) = (200usize, 0.05, 4000usize);
        let mut hits = vec![0u32; n];
        let mut sizes = Vec::with_capacity(trials);
        for _ in 0..trials {
            let batch = poisson_sample(&mut rng, n, q).unwrap();
            assert!(batch.windows(2).all(|w| w[0] < w[1]));
            for &i in &batch {
                hits[i] += 1;
            }
            sizes.push(batch.len() as f64);
        }
        let mean = sizes.iter().sum::<f64>() / trials as f64;
        let var = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (trials - 1) as f64;
        let (want_mean, want_var) = (n as f64 * q, n as f64 * q * (1.0 - q));
        // Standard error of the mean is sqrt(9.5 / 4000) = 0.05: 5 of them.
        assert!((mean - want_mean).abs() < 0.25, "mean batch {mean}, expected {want_mean}");
        assert!((var / want_var - 1.0).abs() < 0.1, "variance {var}, expected {want_var}");
        // Each record: Binomial(4000, 0.05), mean 200, sd 13.8; none is far off.
        assert!(hits.iter().all(|&h| (130..=270).contains(&h)), "{hits:?}");
        assert!(poisson_sample(&mut rng, 50, 0.0).unwrap().is_empty());
        assert_eq!(poisson_sample(&mut rng, 50, 1.0).unwrap().len(), 50);
        assert!(poisson_sample(&mut rng, 5, -0.1).is_err());
    }
}
