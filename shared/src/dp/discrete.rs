//! Exact discrete Gaussian noise `N_Z(0, sigma^2)` in fixed-point integer units: each
//! site's share of the noise under distributed DP with secure aggregation ([`super::distributed`]).
//!
//! # The algorithm
//!
//! Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for Differential Privacy"),
//! Algorithms 1 to 3, with rational arithmetic throughout and no floating point in any
//! decision:
//!
//! * `Bernoulli(a / b)`: a uniform integer in `[0, b)` by rejection from fresh bits, compared
//!   with `a`.
//! * `Bernoulli(exp(-gamma))`, `gamma = a / b >= 0` (Algorithm 1): for `gamma <= 1`, draw
//!   `Bernoulli(gamma / k)` for `k = 1, 2, ..` until one fails and answer whether the
//!   failing `k` is odd; above 1, `floor(gamma)` draws of `Bernoulli(exp(-1))` and one of
//!   `Bernoulli(exp(-(gamma - floor(gamma))))`.
//! * Discrete Laplace of scale `t` (Algorithm 2, integer `t`): `U` uniform in `[0, t)`
//!   accepted with `Bernoulli(exp(-U / t))`, plus `t` times a geometric count of
//!   `Bernoulli(exp(-1))` successes, a fair sign, and `-0` rejected.
//! * Discrete Gaussian (Algorithm 3): `t = floor(sigma) + 1`, `Y` discrete Laplace of scale
//!   `t`, accepted with `Bernoulli(exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)))`. With
//!   `sigma^2 = p / q` the exponent is the rational `(|Y| q t - p)^2 / (2 p q t^2)`,
//!   computed in big integers (`dashu-int`).
//!
//! Every output is an integer whose distribution is exactly `N_Z(0, sigma^2)`, except in
//! one event: a draw whose magnitude would not fit an `i64` (probability below
//! `exp(-2^22)` for any allowed sigma) is rejected and redrawn, a total-variation distance
//! far below anything delta could notice.
//!
//! # Sigma, exactly
//!
//! `sigma` is a finite `f64` in `[2^-20, 2^40]`; a double is a dyadic rational
//! `m 2^-e`, so `sigma^2 = m^2 / 2^(2e)` is taken exactly, with no rounding anywhere: the
//! noise has exactly the sigma the ledger records, and the accountant uses that same
//! number. (`floor(sigma)` is exact in f64 as well.)
//!
//! # Why not opendp's sampler
//!
//! opendp 0.16 has an exact discrete Gaussian sampler (`sample_discrete_gaussian`), but it
//! draws its bits from its own source, not from a generator the caller passes: without its
//! `use-openssl` feature (which we leave off, `DEPENDENCY-NOTES.md`) that source is not a
//! CSPRNG, and either way it cannot be seeded for tests or take our [`NoiseRng`]. So the
//! algorithm is written here against [`NoiseSource`], which [`NoiseRng`] and any
//! `RngCore + CryptoRng` implement.
//!
//! # Timing
//!
//! The time a draw takes depends on the noise value (more rejections and longer geometric
//! runs in the tails), never on the update the noise is added to; an observer of a site
//! sees only the total time over the whole update.
//!
//! # Throughput
//!
//! About 0.4 to 1.4 million draws per second on one thread of the shared (and busy) 2-core
//! development box, in the dev profile (dependencies at opt-level 3, this crate at 1): a
//! 1M-coordinate update takes about a second. Short sigmas (integers, or multiples of
//! `2^-8` as [`super::distributed::site_sigma_for`] gives) are at the fast end, a sigma
//! with a full 53-bit mantissa at the slow end. Rerun with `FEDWARD_BENCH=1 cargo test -p
//! fedward-shared --lib discrete_throughput -- --nocapture`.

use dashu_int::ops::BitTest;
use dashu_int::{UBig, Word};
use rand_core::{CryptoRng, RngCore};

use super::noise::NoiseRng;

/// Smallest and largest sigma (integer units) the sampler takes.
pub const DISCRETE_SIGMA_RANGE: (f64, f64) = (1.0 / (1u64 << 20) as f64, (1u64 << 40) as f64);

/// Where the sampler's bits come from: [`NoiseRng`] in production, or any CSPRNG.
pub trait NoiseSource {
    /// 64 uniformly random bits.
    fn next_u64(&mut self) -> u64;
}

impl NoiseSource for NoiseRng {
    fn next_u64(&mut self) -> u64 {
        NoiseRng::next_u64(self)
    }
}

impl<R: RngCore + CryptoRng> NoiseSource for R {
    fn next_u64(&mut self) -> u64 {
        RngCore::next_u64(self)
    }
}

/// Why discrete noise could not be drawn or added.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DiscreteNoiseError {
    #[error("invalid discrete gaussian sigma {0}: expected a finite number in [2^-20, 2^40]")]
    InvalidSigma(f64),
    #[error("invalid modulus: 2^{0} (expected 1 to 64 bits)")]
    InvalidModulus(u32),
    #[error("value {value} at index {index} overflows i64 after adding noise")]
    Overflow { index: usize, value: i64 },
}

/// The discrete Gaussian `N_Z(0, sigma^2)`: `P(x) ∝ exp(-x^2 / (2 sigma^2))` on the integers.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscreteGaussian {
    sigma: f64,
    /// `sigma^2 = p / q` exactly.
    p: UBig,
    q: UBig,
    /// The discrete Laplace scale `floor(sigma) + 1`.
    t: u64,
    /// `q t`, and the acceptance exponent's denominator `2 p q t^2`.
    qt: UBig,
    den: UBig,
}

impl DiscreteGaussian {
    /// The discrete Gaussian with parameter `sigma` (integer units), taken exactly.
    pub fn new(sigma: f64) -> Result<Self, DiscreteNoiseError> {
        let (lo, hi) = DISCRETE_SIGMA_RANGE;
        if !(sigma.is_finite() && (lo..=hi).contains(&sigma)) {
            return Err(DiscreteNoiseError::InvalidSigma(sigma));
        }
        let (m, e) = dyadic(sigma);
        let p = UBig::from(m) * UBig::from(m);
        let q = UBig::ONE << (2 * e as usize);
        // sigma <= 2^40, so floor(sigma) is exact and t fits easily.
        let t = sigma.floor() as u64 + 1;
        let qt = &q * UBig::from(t);
        let den = UBig::from(2u8) * &p * &qt * UBig::from(t);
        Ok(Self { sigma, p, q, t, qt, den })
    }

    /// The parameter sigma (integer units). The variance is `sigma^2` up to a relative
    /// `exp(-2 pi^2 sigma^2)`-sized term (below 1e-8 for sigma >= 1).
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// One draw.
    pub fn sample(&self, rng: &mut impl NoiseSource) -> i64 {
        loop {
            let Some(y) = discrete_laplace(rng, self.t) else { continue };
            // gamma = (|y| q t - p)^2 / (2 p q t^2).
            let a = UBig::from(y.unsigned_abs()) * &self.qt;
            let diff = if a >= self.p { a - &self.p } else { &self.p - a };
            let num = diff.sqr();
            if bernoulli_exp_neg_big(rng, &num, &self.den) {
                return y;
            }
        }
    }

    /// `len` independent draws: the noise share for a whole update of `len` coordinates.
    pub fn sample_vec(&self, rng: &mut impl NoiseSource, len: usize) -> Vec<i64> {
        (0..len).map(|_| self.sample(rng)).collect()
    }

    /// Adds a draw to every value (fixed-point integers). On overflow nothing changed.
    pub fn add_to(&self, rng: &mut impl NoiseSource, values: &mut [i64]) -> Result<(), DiscreteNoiseError> {
        let noise = self.sample_vec(rng, values.len());
        for (index, (&v, &z)) in values.iter().zip(&noise).enumerate() {
            if v.checked_add(z).is_none() {
                return Err(DiscreteNoiseError::Overflow { index, value: v });
            }
        }
        for (v, z) in values.iter_mut().zip(noise) {
            *v += z;
        }
        Ok(())
    }

    /// Adds a draw to every residue modulo `2^modulus_bits` (the secure-aggregation
    /// representation); values are reduced into `[0, 2^modulus_bits)`.
    pub fn add_mod(&self, rng: &mut impl NoiseSource, values: &mut [u64], modulus_bits: u32) -> Result<(), DiscreteNoiseError> {
        if !(1..=64).contains(&modulus_bits) {
            return Err(DiscreteNoiseError::InvalidModulus(modulus_bits));
        }
        let mask = if modulus_bits == 64 { u64::MAX } else { (1u64 << modulus_bits) - 1 };
        for v in values.iter_mut() {
            // Two's-complement wrapping is addition modulo 2^64, hence modulo 2^modulus_bits.
            *v = v.wrapping_add(self.sample(rng) as u64) & mask;
        }
        Ok(())
    }
}

/// `sigma = m 2^-e` exactly, `m` odd unless `e = 0` (finite positive `sigma` below 2^53).
fn dyadic(sigma: f64) -> (u64, u32) {
    let bits = sigma.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut m, mut e) = if biased == 0 { (frac, 1074i32) } else { (frac | (1u64 << 52), 1075 - biased) };
    while e > 0 && m % 2 == 0 {
        m /= 2;
        e -= 1;
    }
    if e < 0 {
        // sigma >= 2^53 is an integer; the range check keeps it below 2^41.
        m <<= -e;
        e = 0;
    }
    (m, e as u32)
}

/// A uniform integer in `[0, n)`, `n > 0`, by rejection (exact).
#[inline]
fn uniform_below(rng: &mut impl NoiseSource, n: u64) -> u64 {
    if n.is_power_of_two() {
        return rng.next_u64() & (n - 1);
    }
    // The largest multiple of n that fits in 2^64: draws at or above it are rejected.
    let zone = u64::MAX - (u64::MAX % n + 1) % n;
    loop {
        let x = rng.next_u64();
        if x <= zone {
            return x % n;
        }
    }
}

/// `Bernoulli(a / b)` for `0 <= a <= b`, `b > 0`.
#[inline]
fn bernoulli(rng: &mut impl NoiseSource, a: u64, b: u64) -> bool {
    uniform_below(rng, b) < a
}

/// A uniform integer in `[0, n)`, `n > 0`, by rejection from `bit_len(n)` fresh bits.
fn uniform_below_big(rng: &mut impl NoiseSource, n: &UBig) -> UBig {
    let bits = n.bit_len();
    let word_bits = Word::BITS as usize;
    let words = bits.div_ceil(word_bits);
    let top_bits = bits - (words - 1) * word_bits;
    let mut buf: Vec<Word> = vec![0; words];
    loop {
        for w in buf.iter_mut() {
            // On a 32-bit target the cast keeps 32 uniform bits, which is all a word holds.
            *w = rng.next_u64() as Word;
        }
        if let Some(top) = buf.last_mut() {
            if top_bits < word_bits {
                *top &= ((1 as Word) << top_bits) - 1;
            }
        }
        let x = UBig::from_words(&buf);
        if x < *n {
            return x;
        }
    }
}

/// `Bernoulli(a / b)` for big `0 <= a <= b`, `b > 0`.
fn bernoulli_big(rng: &mut impl NoiseSource, a: &UBig, b: &UBig) -> bool {
    uniform_below_big(rng, b) < *a
}

/// `Bernoulli(exp(-a / b))` for `0 <= a / b <= 1` (small integers), CKS20 Algorithm 1.
fn bernoulli_exp_neg_unit(rng: &mut impl NoiseSource, a: u64, b: u64) -> bool {
    let mut k = 1u64;
    // Bernoulli(gamma / k) with gamma / k = a / (b k); b k stays far from overflow since
    // the loop ends after a few steps (P(k > K) = gamma^K / K!).
    while let Some(bk) = b.checked_mul(k) {
        if !bernoulli(rng, a, bk) {
            return k % 2 == 1;
        }
        k += 1;
    }
    // Unreachable in practice (k near 2^64 / b >= 2^22 for every b this module passes):
    // the probability is below 1 / (2^22)!.
    k % 2 == 1
}

/// `Bernoulli(exp(-1))`.
#[inline]
fn bernoulli_exp_neg_one(rng: &mut impl NoiseSource) -> bool {
    bernoulli_exp_neg_unit(rng, 1, 1)
}

/// `Bernoulli(exp(-a / b))` for small integers `a >= 0`, `b > 0`: Algorithm 1 in full on
/// machine words, the reference the big-integer version is tested beside.
#[cfg(test)]
fn bernoulli_exp_neg(rng: &mut impl NoiseSource, a: u64, b: u64) -> bool {
    let whole = a / b;
    for _ in 0..whole {
        if !bernoulli_exp_neg_one(rng) {
            return false;
        }
    }
    bernoulli_exp_neg_unit(rng, a % b, b)
}

/// `Bernoulli(exp(-a / b))` for big integers `a >= 0`, `b > 0`.
fn bernoulli_exp_neg_big(rng: &mut impl NoiseSource, a: &UBig, b: &UBig) -> bool {
    let whole = a / b;
    let rem = a % b;
    let mut i = UBig::ZERO;
    while i < whole {
        if !bernoulli_exp_neg_one(rng) {
            return false;
        }
        i += UBig::ONE;
    }
    // gamma in [0, 1): Algorithm 1's loop with Bernoulli(rem / (b k)).
    let mut k = 1u64;
    loop {
        if !bernoulli_big(rng, &rem, &(b * UBig::from(k))) {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// One attempt at a discrete Laplace draw of scale `t` (CKS20 Algorithm 2 with integer
/// scale): `None` when the attempt is rejected (or, with probability below `exp(-2^22)`,
/// would overflow), so the caller redraws.
fn discrete_laplace(rng: &mut impl NoiseSource, t: u64) -> Option<i64> {
    let u = uniform_below(rng, t);
    if !bernoulli_exp_neg_unit(rng, u, t) {
        return None;
    }
    let mut v = 0u64;
    while bernoulli_exp_neg_one(rng) {
        v += 1;
    }
    let x = t.checked_mul(v)?.checked_add(u)?;
    let x = i64::try_from(x).ok()?;
    let negative = rng.next_u64() & 1 == 1;
    if negative && x == 0 {
        return None;
    }
    Some(if negative { -x } else { x })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u8) -> NoiseRng {
        NoiseRng::from_seed_insecure([seed; 32])
    }

    /// The exact pmf of `N_Z(0, sigma^2)` on `[-k, k]` (the rest below 1e-30), in f64.
    fn pmf(sigma: f64) -> (i64, Vec<f64>) {
        let k = (sigma * 14.0).ceil() as i64 + 2;
        let w: Vec<f64> = (-k..=k).map(|x| (-(x as f64).powi(2) / (2.0 * sigma * sigma)).exp()).collect();
        let z: f64 = w.iter().sum();
        (k, w.into_iter().map(|v| v / z).collect())
    }

    #[test]
    fn sigma_is_taken_exactly() {
        assert_eq!(dyadic(3.0), (3, 0));
        assert_eq!(dyadic(0.75), (3, 2));
        assert_eq!(dyadic(1024.0), (1024, 0));
        let (m, e) = dyadic(0.1);
        assert_eq!(m as f64 / 2f64.powi(e as i32), 0.1);
        let g = DiscreteGaussian::new(2.5).unwrap();
        // sigma^2 = 25 / 4; t = 3.
        assert_eq!((g.p.clone(), g.q.clone(), g.t), (UBig::from(25u8), UBig::from(4u8), 3));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e13, 1e-9] {
            assert!(matches!(DiscreteGaussian::new(bad), Err(DiscreteNoiseError::InvalidSigma(_))), "{bad}");
        }
    }

    #[test]
    fn uniform_draws_are_in_range_and_flat() {
        let mut g = rng(1);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[uniform_below(&mut g, 7) as usize] += 1;
        }
        // Each cell: Binomial(70000, 1/7), sd 92.6; 5 sd.
        assert!(counts.iter().all(|&c| (9_537..=10_463).contains(&c)), "{counts:?}");
        let n = (UBig::ONE << 130) + UBig::from(12345u32);
        for _ in 0..1000 {
            assert!(uniform_below_big(&mut g, &n) < n);
        }
        assert_eq!(uniform_below(&mut g, 1), 0);
        assert!(bernoulli(&mut g, 1, 1) && !bernoulli(&mut g, 0, 5));
    }

    /// The sampler's Bernoulli(exp(-gamma)) has frequency exp(-gamma) within 4.5 binomial
    /// standard errors, in both the small-integer and the big-integer version.
    #[test]
    fn bernoulli_exp_neg_matches_its_probability() {
        let mut g = rng(2);
        let trials = 40_000u32;
        for (a, b) in [(0u64, 1u64), (1, 3), (1, 1), (7, 4), (5, 2), (31, 10)] {
            let p = (-(a as f64) / b as f64).exp();
            let se = (p * (1.0 - p) / f64::from(trials)).sqrt().max(1e-12);
            let small = (0..trials).filter(|_| bernoulli_exp_neg(&mut g, a, b)).count() as f64 / f64::from(trials);
            let (ba, bb) = (UBig::from(a) << 100, UBig::from(b) << 100);
            let big = (0..trials).filter(|_| bernoulli_exp_neg_big(&mut g, &ba, &bb)).count() as f64 / f64::from(trials);
            for freq in [small, big] {
                assert!((freq - p).abs() <= 4.5 * se + 1e-12, "exp(-{a}/{b}) = {p}: {freq}");
            }
        }
    }

    /// Moments and tails of 200k draws against the exact pmf, for sigmas below and above 1
    /// and a non-dyadic one: mean within 4 standard errors of 0, variance within 4 of the
    /// exact variance, and `P(|X| > 2 sigma)` within 4 binomial standard errors.
    #[test]
    fn moments_and_tails_match_the_discrete_gaussian() {
        for (seed, sigma) in [(3u8, 0.8), (4, 3.0), (5, 17.3)] {
            let dg = DiscreteGaussian::new(sigma).unwrap();
            let n = 200_000usize;
            let xs = dg.sample_vec(&mut rng(seed), n);
            let (k, p) = pmf(sigma);
            let var: f64 = (-k..=k).zip(&p).map(|(x, w)| (x as f64).powi(2) * w).sum();
            let m4: f64 = (-k..=k).zip(&p).map(|(x, w)| (x as f64).powi(4) * w).sum();
            let tail: f64 = (-k..=k).zip(&p).filter(|(x, _)| (*x as f64).abs() > 2.0 * sigma).map(|(_, w)| w).sum();
            let nf = n as f64;
            let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / nf;
            let svar = xs.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / nf;
            let stail = xs.iter().filter(|&&x| (x as f64).abs() > 2.0 * sigma).count() as f64 / nf;
            assert!(mean.abs() < 4.0 * (var / nf).sqrt(), "sigma {sigma}: mean {mean}");
            assert!((svar - var).abs() < 4.0 * ((m4 - var * var) / nf).sqrt(), "sigma {sigma}: variance {svar} vs {var}");
            assert!((stail - tail).abs() < 4.0 * (tail * (1.0 - tail) / nf).sqrt(), "sigma {sigma}: tail {stail} vs {tail}");
            // For sigma >= 1 the variance is sigma^2 to within 1e-8 (relative).
            if sigma >= 1.0 {
                assert!((var - sigma * sigma).abs() < 1e-8 * sigma * sigma, "{var}");
            }
            // Symmetric and integer-valued by construction; the extremes stay plausible.
            let max = xs.iter().map(|x| x.unsigned_abs()).max().unwrap() as f64;
            assert!(max < 7.0 * sigma + 2.0, "sigma {sigma}: max {max}");
        }
    }

    /// The frequency of each value near the centre matches the pmf (a small chi-square).
    #[test]
    fn pmf_of_small_sigma() {
        let sigma = 1.5;
        let n = 100_000usize;
        let xs = DiscreteGaussian::new(sigma).unwrap().sample_vec(&mut rng(6), n);
        let (k, p) = pmf(sigma);
        let mut chi2 = 0.0;
        for v in -4i64..=4 {
            let expected = p[(v + k) as usize] * n as f64;
            let seen = xs.iter().filter(|&&x| x == v).count() as f64;
            chi2 += (seen - expected).powi(2) / expected;
        }
        // 9 cells (8 degrees of freedom at most): the 0.999 quantile is 26.1.
        assert!(chi2 < 26.1, "chi-square {chi2}");
    }

    #[test]
    fn seeded_draws_are_reproducible_and_adding_is_exact() {
        let dg = DiscreteGaussian::new(40.0).unwrap();
        let a = dg.sample_vec(&mut rng(7), 1000);
        assert_eq!(a, dg.sample_vec(&mut rng(7), 1000));
        let mut v = vec![5i64; 1000];
        dg.add_to(&mut rng(7), &mut v).unwrap();
        assert_eq!(v, a.iter().map(|z| z + 5).collect::<Vec<_>>());
        // Modular: the same noise, reduced modulo 2^16.
        let mut r = vec![5u64; 1000];
        dg.add_mod(&mut rng(7), &mut r, 16).unwrap();
        assert_eq!(r, a.iter().map(|z| (z + 5).rem_euclid(1 << 16) as u64).collect::<Vec<_>>());
        assert_eq!(dg.add_mod(&mut rng(7), &mut r, 0), Err(DiscreteNoiseError::InvalidModulus(0)));
        // Noise of either sign overflows one of the extremes.
        let mut big = [1i64, i64::MAX, i64::MIN];
        let err = DiscreteGaussian::new(1e6).unwrap().add_to(&mut rng(8), &mut big).unwrap_err();
        assert!(matches!(err, DiscreteNoiseError::Overflow { index: 1 | 2, .. }), "{err}");
        assert_eq!(big[0], 1);
        // Any CSPRNG works as the source.
        let mut chacha = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([9; 32]);
        assert_eq!(dg.sample_vec(&mut chacha, 10).len(), 10);
    }

    /// `FEDWARD_BENCH=1 cargo test -p fedward-shared --release discrete_throughput -- --nocapture`
    #[test]
    fn discrete_throughput() {
        if std::env::var_os("FEDWARD_BENCH").is_none() {
            return;
        }
        let mut g = NoiseRng::from_os().unwrap();
        for sigma in [2.0, 100.0, 1234.567, 1234.56640625, 65_536.0] {
            let dg = DiscreteGaussian::new(sigma).unwrap();
            let n = 1_000_000;
            let start = std::time::Instant::now();
            let v = dg.sample_vec(&mut g, n);
            let secs = start.elapsed().as_secs_f64();
            eprintln!("discrete gaussian sigma {sigma}: {:.2} M draws/s ({})", n as f64 / secs / 1e6, v[0]);
        }
    }
}
