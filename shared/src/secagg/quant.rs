//! Fixed-point encoding of weighted updates for a sum modulo `2^bits`, and the weighted
//! mean read back from the sum (FedAvg weights under secure aggregation).
//!
//! # Encoding
//!
//! A site's clipped update `x` (L2 norm at most `C`, so every coordinate has `|x_i| <= C`)
//! is multiplied by its example weight `w` (clamped to `1..=max_weight`) and by the scale
//! `s`, then rounded to an integer `q_i` and reduced modulo `2^bits` (two's complement).
//! The weight `w` itself is appended as one more coordinate, so the coordinator learns
//! only the total weight `W = sum w_u`, never a site's count.
//!
//! Rounding is **stochastic** (`floor(v) + 1` with probability `frac(v)`): unbiased, and
//! `|q_i - w x_i s| < 1`. Coordinates are clamped to `[-C, C]` first (a no-op for a
//! clipped update), so the bound below holds whatever the input.
//!
//! # No wrap-around
//!
//! `|q_i| <= max_weight * C * s + 1`, so the sum over at most `max_sites` sites satisfies
//! `|sum q_i| <= max_sites * (max_weight * C * s + 1) < 2^(bits - 1)`, and the total
//! weight `W <= max_sites * max_weight < 2^(bits - 1)`. [`FixedPoint::new`] picks `s` as
//! the largest power of two meeting both (with a `2^-20` relative margin for the float
//! arithmetic of the check), so the sum read as a signed integer modulo `2^bits` is the
//! exact integer sum.
//!
//! # Error of the mean
//!
//! The mean read back is `sum_u q_u / (s W)`; each site's rounding error is below one unit
//! per coordinate, so `|mean - sum_u w_u x_u / W| < n / (s W)` per coordinate for `n`
//! summed sites ([`FixedPoint::mean_error_bound`]), plus the f32 rounding of the result
//! (relative `2^-24`) and of `w x_i s` in f64 (relative `2^-52`).

use rand_core::{CryptoRng, RngCore};

use super::SecAggError;

/// The fixed-point encoding of one training plan's updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedPoint {
    modulus_bits: u32,
    clip: f32,
    max_weight: u64,
    max_sites: usize,
    scale: f64,
}

/// The weighted mean read back from a secure sum.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedMean {
    pub values: Vec<f32>,
    /// The summed (clamped) example weights.
    pub total_weight: u64,
}

impl FixedPoint {
    /// The encoding for updates of L2 norm at most `clip`, example weights clamped to
    /// `max_weight`, at most `max_sites` summed, modulo `2^modulus_bits`.
    pub fn new(modulus_bits: u32, clip: f32, max_weight: u64, max_sites: usize) -> Result<Self, SecAggError> {
        let bad = |m: String| Err(SecAggError::Params(m));
        if !(16..=64).contains(&modulus_bits) {
            return bad(format!("modulus_bits must be 16 to 64, got {modulus_bits}"));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return bad(format!("the clipping norm must be positive and finite, got {clip}"));
        }
        if max_weight == 0 || max_sites == 0 {
            return bad("max_weight and max_sites must be positive".into());
        }
        let half = 2f64.powi(modulus_bits as i32 - 1) * (1.0 - 2f64.powi(-20));
        let n = max_sites as f64;
        if n * max_weight as f64 >= half {
            return bad(format!("{max_sites} sites of weight up to {max_weight} overflow 2^{}", modulus_bits - 1));
        }
        let per_site = max_weight as f64 * f64::from(clip);
        for e in (-60..=60).rev() {
            let scale = 2f64.powi(e);
            if n * (per_site * scale + 1.0) < half {
                return Ok(Self { modulus_bits, clip, max_weight, max_sites, scale });
            }
        }
        bad(format!("no fixed-point scale fits {max_sites} sites of weight {max_weight} and norm {clip} in {modulus_bits} bits"))
    }

    /// The scale `s` (a power of two).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The encoded length of an update of `len` values (one more: the weight).
    pub fn encoded_len(len: usize) -> usize {
        len + 1
    }

    /// Encodes `update` weighted by `weight` (clamped to `1..=max_weight`; 0 is refused).
    pub fn encode<R: RngCore + CryptoRng>(&self, update: &[f32], weight: u64, rng: &mut R) -> Result<Vec<u64>, SecAggError> {
        if weight == 0 {
            return Err(SecAggError::Input("a site with no examples has nothing to sum".into()));
        }
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(SecAggError::Input(format!("update value {i} is not finite")));
        }
        let w = weight.min(self.max_weight);
        let mask = self.mask();
        let factor = w as f64 * self.scale;
        let mut out = Vec::with_capacity(update.len() + 1);
        for &x in update {
            let v = f64::from(x.clamp(-self.clip, self.clip)) * factor;
            let floor = v.floor();
            // 53 random bits: a uniform in [0, 1) with exact dyadic steps.
            let u = (rng.next_u64() >> 11) as f64 * 2f64.powi(-53);
            // |v| < 2^62 by the scale's choice, so the cast is exact.
            let q = floor as i64 + i64::from(u < v - floor);
            out.push((q as u64) & mask);
        }
        out.push(w);
        Ok(out)
    }

    /// Distributed DP's units (`dp::distributed`): the integer units per model unit a site
    /// quantizes and noises its update in, for updates of `dim` values clipped to
    /// `clip_norm`. The smallest power of two `u` with `clip_norm * u >= 2^10 sqrt(dim)`,
    /// so that rounding adds at most `2^-10` to the accounted norm bound `clip_norm * u +
    /// sqrt(dim)`, and at most [`Self::scale`], so that an integer in these units is one in
    /// the sum's units times the power of two `scale / u` ([`Self::encode_units`]). Both
    /// sides compute it from the offer.
    pub fn noise_units(&self, clip_norm: f64, dim: u64) -> f64 {
        let target = 1024.0 * (dim.max(1) as f64).sqrt() / clip_norm;
        let mut u = 1.0f64;
        while u < target && u < self.scale {
            u *= 2.0;
        }
        while u > target * 2.0 && u > 2f64.powi(-60) {
            u /= 2.0;
        }
        u.min(self.scale)
    }

    /// Encodes an update already quantized (and noised) in `units` integer units per model
    /// unit ([`Self::noise_units`]) at weight 1: each value times `scale / units`, modulo
    /// `2^bits` (wrapping is the sum's own arithmetic). Distributed DP weighs every site
    /// equally, so the sum's weight is the number of sites summed.
    pub fn encode_units(&self, values: &[i64], units: f64) -> Result<Vec<u64>, SecAggError> {
        let ratio = self.scale / units;
        if !(ratio >= 1.0 && ratio <= 2f64.powi(62) && ratio.fract() == 0.0 && (ratio as u64).is_power_of_two()) {
            return Err(SecAggError::Params(format!("units {units} do not divide the scale {} by a power of two", self.scale)));
        }
        // Clamped to the encoding's bound like `encode` (post-processing of the noised
        // value), so a sum of `max_sites` inputs cannot wrap whatever the noise drew.
        let limit = (f64::from(self.clip) * self.scale).floor() as i128;
        let (factor, mask) = (i128::from(ratio as u64), self.mask());
        let mut out: Vec<u64> = values.iter().map(|&v| ((i128::from(v) * factor).clamp(-limit, limit) as i64 as u64) & mask).collect();
        out.push(1);
        Ok(out)
    }

    /// The weighted mean from a secure sum of `encoded_len(len)` values.
    pub fn decode_mean(&self, sum: &[u64]) -> Result<WeightedMean, SecAggError> {
        let (&w, values) = sum.split_last().ok_or_else(|| SecAggError::Input("empty sum".into()))?;
        let total = self.signed(w);
        if total <= 0 {
            return Err(SecAggError::Input(format!("total weight {total} is not positive")));
        }
        let denom = self.scale * total as f64;
        let values = values.iter().map(|&v| (self.signed(v) as f64 / denom) as f32).collect();
        Ok(WeightedMean { values, total_weight: total as u64 })
    }

    /// The bound on `|mean - exact weighted mean|` per coordinate for `n_sites` summed
    /// with total weight `total_weight`, before the f32 rounding of the result.
    pub fn mean_error_bound(&self, n_sites: usize, total_weight: u64) -> f64 {
        n_sites as f64 / (self.scale * total_weight as f64)
    }

    fn mask(&self) -> u64 {
        if self.modulus_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.modulus_bits) - 1
        }
    }

    /// `v` modulo `2^bits` as a signed integer in `[-2^(bits-1), 2^(bits-1))`.
    fn signed(&self, v: u64) -> i128 {
        let v = i128::from(v & self.mask());
        let m = 1i128 << self.modulus_bits;
        if v >= m / 2 {
            v - m
        } else {
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    /// Distributed DP's integers go into the sum exactly (times the power of two between
    /// the units and the scale), negative values and the clamp included, at weight 1.
    #[test]
    fn integers_in_noise_units_sum_exactly() {
        let fp = FixedPoint::new(32, 1.0, 1, 3).unwrap();
        let units = fp.noise_units(1.0, 4);
        assert!(units >= 2048.0 && units <= fp.scale(), "{units} {}", fp.scale());
        let ratio = fp.scale() / units;
        let a = fp.encode_units(&[3, -5, 0, 7], units).unwrap();
        let b = fp.encode_units(&[-1, -1, 2, 0], units).unwrap();
        let sum: Vec<u64> = a.iter().zip(&b).map(|(x, y)| x.wrapping_add(*y) & 0xffff_ffff).collect();
        let mean = fp.decode_mean(&sum).unwrap();
        assert_eq!(mean.total_weight, 2);
        let expected = [2.0, -6.0, 2.0, 7.0].map(|v: f64| (v * ratio / (fp.scale() * 2.0)) as f32);
        assert_eq!(mean.values, expected);
        // A value beyond the encoding's bound is clamped to it: no wrap, whatever was drawn.
        let huge = fp.encode_units(&[i64::MAX / 4], units).unwrap();
        assert_eq!(fp.signed(huge[0]), (fp.scale()).floor() as i128);
        assert!(fp.encode_units(&[1], units * 3.0).is_err(), "not a power of two apart");
        assert!(fp.encode_units(&[1], fp.scale() * 2.0).is_err(), "finer than the sum");
    }

    #[test]
    fn the_worst_case_sum_does_not_wrap() {
        for bits in [24, 32, 48, 64] {
            let fp = FixedPoint::new(bits, 1.5, 1000, 50).unwrap();
            let mut rng = ChaCha20Rng::seed_from_u64(bits as u64);
            // Every site at the extreme: all coordinates at +C (or -C), maximum weight.
            for sign in [1.0f32, -1.0] {
                let one = fp.encode(&[sign * 1.5; 4], 5000, &mut rng).unwrap();
                let mut sum = vec![0u64; one.len()];
                for _ in 0..50 {
                    let e = fp.encode(&[sign * 1.5; 4], 5000, &mut rng).unwrap();
                    for (s, v) in sum.iter_mut().zip(e) {
                        *s = s.wrapping_add(v) & fp.mask();
                    }
                }
                let mean = fp.decode_mean(&sum).unwrap();
                assert_eq!(mean.total_weight, 50_000);
                for v in mean.values {
                    assert!((v - sign * 1.5).abs() as f64 <= fp.mean_error_bound(50, 50_000) + 1e-6, "bits {bits}: {v}");
                }
            }
            // The scale is the largest power of two that fits: twice it would not.
            let half = 2f64.powi(bits as i32 - 1);
            assert!(50.0 * (1000.0 * 1.5 * fp.scale() * 2.0 + 1.0) >= half * (1.0 - 2f64.powi(-20)), "bits {bits}");
        }
    }

    #[test]
    fn bad_parameters_and_inputs_are_refused() {
        assert!(FixedPoint::new(8, 1.0, 10, 10).is_err());
        assert!(FixedPoint::new(32, f32::NAN, 10, 10).is_err());
        assert!(FixedPoint::new(32, 1.0, 0, 10).is_err());
        assert!(FixedPoint::new(16, 1.0, 1 << 10, 1 << 10).is_err());
        let fp = FixedPoint::new(32, 1.0, 10, 10).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        assert!(fp.encode(&[f32::INFINITY], 1, &mut rng).is_err());
        assert!(fp.encode(&[0.5], 0, &mut rng).is_err());
        assert!(fp.decode_mean(&[]).is_err());
        assert!(fp.decode_mean(&[1, 0]).is_err());
    }
}
