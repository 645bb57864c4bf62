//! Gaussian noise that is safe against floating-point attacks, from a CSPRNG.
//!
//! # Why not `x + sigma * randn()`
//!
//! Textbook floating-point Gaussian samplers (Box-Muller, polar, ziggurat) do not produce
//! a Gaussian: they produce a finite, irregular set of doubles whose fine structure
//! depends on the input. Mironov (2012) recovered inputs of the Laplace mechanism from
//! the low bits of its outputs, and Jin et al. (2022, "Are We There Yet? Timing and
//! Floating-Point Attacks on Differential Privacy Systems") did the same against the
//! Gaussian samplers of Opacus and others. The fix is to make the output a function of a
//! quantity whose distribution is *exactly* that of the ideal mechanism.
//!
//! # What this module does: snapping to a grid, decided exactly
//!
//! Let `std = sigma * C` and the grid `Lambda = std / 8`. For an input value `x`, write
//! `t = x / Lambda` and output `Lambda * k` with
//!
//! `k = round(t + 8 Z)`, `Z ~ N(0, 1)` exact.
//!
//! `k` is a deterministic function (rounding) of `t + 8Z`, i.e. of the Gaussian mechanism
//! applied to `x` with std `sigma C`, so the output is post-processing of the ideal
//! mechanism and costs no privacy beyond it; the output's float representation is a
//! function of the integer `k` alone, so its low bits carry nothing. Rounding adds
//! variance `Lambda^2 / 12 = std^2 / 768` (std up by 0.065%), a utility cost only.
//!
//! `k` is computed so that it equals the ideal `k` exactly, not approximately:
//!
//! 1. **Uniform.** A sign bit and a uniform `U` in `(0, 1/2)` with full relative precision
//!    (the exponent from the count of leading zero bits, then 51 mantissa bits), i.e. `U`
//!    is known to lie in a dyadic cell of relative width `2^-51`; more bits of `U` can be
//!    drawn later. `|Z| = -Phi^-1(U)`. After 940 leading zero bits the draw stops at one
//!    floor cell, so `U >= 2^-955` and `|Z| <= 36.3`.
//! 2. **Fast path.** `z = Phi^-1(u_mid)` by Wichura's AS241 (accurate to about 1e-16
//!    relative; the tests measure it against 100-digit mpmath values over the whole range)
//!    and `v = frac(t) + 8 z` in f64. If `v` is farther than `2^-24` from a rounding
//!    boundary `j + 1/2`, `round(v)` is the ideal answer for every `U` in the cell: the
//!    worst-case f64 error of `v` (AS241, the cell width, two roundings) is below `2^-41`,
//!    a safety factor of `2^17`.
//! 3. **Slow path** (probability about `2^-23` per value). Within `2^-24` of a boundary
//!    the question "is `t + 8Z` above `j + 1/2`" is a comparison of `U` with a Gaussian
//!    tail `Q(w)` at a dyadic `w`, which `exact.rs` settles in big-integer interval
//!    arithmetic, drawing further bits of `U` when the cell straddles `Q(w)`.
//!
//! **Privacy cost of the construction:** none beyond the Gaussian mechanism with std
//! `sigma C`, except (a) the floor cell (all of `U < 2^-940` treated alike: a
//! total-variation term of `2^-940` per value) and (b) the slow path's precision cap (about `2^-8000` per call): both are
//! below `2^-900`, so even `2^40` noised values add less than `2^-800` to delta.
//! (c) `t = x / Lambda` is computed in f64 as `x * (8 / std)`, which moves `t` by at most
//! `2^-52 |t|`; that is a deterministic preprocessing of the input and enlarges the L2
//! sensitivity by at most `2^-51 ||x||`, i.e. relatively `2^-51 (B + 1)` for a DP-SGD sum of
//! `B` clipped gradients: below `2^-30` for any batch under a million.
//!
//! **Timing.** The fast path's branches (central or tail rational approximation) depend
//! on the noise, never on `x`; only the rare slow path's duration depends on `x`, and it
//! runs a handful of times per million values inside a computation whose total time is
//! all an observer of an update sees.
//!
//! # Randomness
//!
//! [`NoiseRng`] wraps ChaCha20 seeded from the operating system ([`NoiseRng::from_os`]).
//! Its seed is never exposed: the type has no accessor and its `Debug` prints nothing.
//! [`NoiseRng::from_seed_insecure`] exists for tests and simulations only.
//!
//! # Throughput
//!
//! One 64-bit draw, one rational approximation and a few float operations per value.
//! Measured on the shared 2-core development box, optimised build, one thread: about 21M
//! values per second (a 3.6M-value update in 0.17 s), with ChaCha20 alone at 185M draws per
//! second. Rerun with `FEDWARD_BENCH=1 cargo test -p fedward-shared --release noise_throughput
//! -- --nocapture`.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::tensor::TensorSet;

use super::exact::{self, Bits, Dyadic, Nat};

/// Noise std in grid units: the grid is `std / GRID_DIVISOR`.
const GRID_DIVISOR: f64 = 8.0;
/// Distance from a rounding boundary (in grid units) under which the slow path decides.
const MARGIN: f64 = 1.0 / (1u64 << 24) as f64;
/// Leading zero bits of `U` after which the draw stops at one floor cell (`U >= 2^-955`).
const MAX_LEADING_ZEROS: u32 = 940;
/// Largest grid-unit magnitude of an input: integer arithmetic on `t` stays exact in f64.
const MAX_GRID_UNITS: f64 = (1u64 << 52) as f64;

/// Why noise could not be added.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("invalid noise std {0}: expected a finite number in [2^-60, 2^60]")]
    InvalidStd(f64),
    #[error("value {value} at index {index} is not finite")]
    NonFinite { index: usize, value: f32 },
    #[error("value {value} at index {index} is too large for noise of std {std}")]
    TooLarge { index: usize, value: f32, std: f64 },
    #[error("operating-system entropy unavailable: {0}")]
    Entropy(String),
}

/// The CSPRNG all DP noise comes from: ChaCha20, seeded from the operating system.
pub struct NoiseRng {
    inner: ChaCha20Rng,
}

impl std::fmt::Debug for NoiseRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the state: it would reveal the noise.
        f.write_str("NoiseRng { .. }")
    }
}

impl NoiseRng {
    /// A generator seeded from the operating system's entropy: the production constructor.
    pub fn from_os() -> Result<Self, NoiseError> {
        ChaCha20Rng::try_from_os_rng().map(|inner| Self { inner }).map_err(|e| NoiseError::Entropy(e.to_string()))
    }

    /// A reproducible generator for tests and simulations. Never use it for a real release:
    /// anyone with the seed can subtract the noise.
    pub fn from_seed_insecure(seed: [u8; 32]) -> Self {
        Self { inner: ChaCha20Rng::from_seed(seed) }
    }

    /// 64 fresh bits; `pub(crate)` so only the DP mechanisms (noise, Poisson sampling) draw.
    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
}

impl Bits for NoiseRng {
    fn next_u64(&mut self) -> u64 {
        NoiseRng::next_u64(self)
    }
}

/// Gaussian noise of a fixed std, snapped to a grid of `std / 8` (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaussianNoise {
    std: f64,
    grid: f64,
    inv_grid: f64,
}

impl GaussianNoise {
    /// Noise of standard deviation `std` (`sigma * C`).
    pub fn new(std: f64) -> Result<Self, NoiseError> {
        let lo = 2f64.powi(-60);
        let hi = 2f64.powi(60);
        if !(std.is_finite() && (lo..=hi).contains(&std)) {
            return Err(NoiseError::InvalidStd(std));
        }
        Ok(Self { std, grid: std / GRID_DIVISOR, inv_grid: GRID_DIVISOR / std })
    }

    /// Noise for a noise multiplier and clipping norm: std `noise_multiplier * clip_norm`.
    pub fn for_mechanism(noise_multiplier: f64, clip_norm: f64) -> Result<Self, NoiseError> {
        Self::new(noise_multiplier * clip_norm)
    }

    /// The noise standard deviation.
    pub fn std(&self) -> f64 {
        self.std
    }

    /// The output grid: every noised value is an integer multiple of it (before f32 rounding).
    pub fn grid(&self) -> f64 {
        self.grid
    }

    /// Adds noise to every value. Checks every value first, so on error nothing changed.
    pub fn add_to(&self, rng: &mut NoiseRng, values: &mut [f32]) -> Result<(), NoiseError> {
        self.check(values)?;
        for v in values.iter_mut() {
            *v = self.noisy(rng, *v);
        }
        Ok(())
    }

    /// Adds noise to every value of every tensor, in name order. On error nothing changed.
    pub fn add_to_tensors(&self, rng: &mut NoiseRng, set: &mut TensorSet) -> Result<(), NoiseError> {
        for (_, t) in set.iter() {
            self.check(t.data())?;
        }
        for (_, t) in set.iter_mut() {
            for v in t.data_mut().iter_mut() {
                *v = self.noisy(rng, *v);
            }
        }
        Ok(())
    }

    fn check(&self, values: &[f32]) -> Result<(), NoiseError> {
        for (index, &value) in values.iter().enumerate() {
            if !value.is_finite() {
                return Err(NoiseError::NonFinite { index, value });
            }
            if (f64::from(value) * self.inv_grid).abs() > MAX_GRID_UNITS / 2.0 {
                return Err(NoiseError::TooLarge { index, value, std: self.std });
            }
        }
        Ok(())
    }

    #[inline]
    fn noisy(&self, rng: &mut NoiseRng, x: f32) -> f32 {
        let t = f64::from(x) * self.inv_grid;
        let m = t.floor();
        // Exact except for t in (-1, 0), where it rounds by at most 2^-53: part of the
        // deterministic preprocessing (c) of the module doc.
        let f = t - m;
        let k = m + offset(rng, f);
        // A function of the integer k alone.
        (k * self.grid) as f32
    }
}

/// `round(f + 8 Z)` for `f` in `[0, 1)` and `Z` standard normal, exactly.
#[inline]
fn offset(rng: &mut NoiseRng, f: f64) -> f64 {
    offset_with_margin(rng, f, MARGIN)
}

#[inline]
fn offset_with_margin(rng: &mut NoiseRng, f: f64, margin: f64) -> f64 {
    let (negative, cell) = draw_uniform(rng);
    let z_abs = -ppnd_lower(cell.mid());
    let z = if negative { -z_abs } else { z_abs };
    let v = f + GRID_DIVISOR * z;
    let j = v.round();
    let d = v - j;
    if 0.5 - d.abs() > margin {
        return j;
    }
    // Near the boundary b = j + 1/2 (d > 0) or j - 1/2 (d < 0): the answer is the integer
    // above b when f + 8Z > b, i.e. when Z > w = (b - f) / 8, taken exactly as a dyadic.
    // |j| <= 8 * 37 + 2, so the casts are exact.
    let b2 = if d > 0.0 { 2 * (j as i64) + 1 } else { 2 * (j as i64) - 1 };
    let (w_negative, w_abs) = boundary(b2, f);
    let b = b2 as f64 / 2.0;
    if z_exceeds(rng, negative, cell, w_negative, &w_abs) {
        b + 0.5
    } else {
        b - 0.5
    }
}

/// `w = (b2 / 2 - f) / 8` exactly, as a sign (true when negative) and a magnitude.
fn boundary(b2: i64, f: f64) -> (bool, Dyadic) {
    let (fm, fs) = exact::decompose(f);
    let fm = Nat::from_u64(fm);
    // b2 / 2 - f = (b2 2^(fs-1) - fm) 2^-fs, and fs >= 52 because f < 2.
    let scaled_b = Nat::from_u64(b2.unsigned_abs()).shl(fs - 1);
    let exp = fs + 3;
    if b2 < 0 {
        (true, Dyadic { num: scaled_b.add(&fm), exp })
    } else if scaled_b >= fm {
        (false, Dyadic { num: scaled_b.saturating_sub(&fm), exp })
    } else {
        (true, Dyadic { num: fm.saturating_sub(&scaled_b), exp })
    }
}

/// Whether `Z > w`, with `Z = -|Z|` if `negative` else `|Z|`, `|Z| = -Phi^-1(U)`, `U` in `cell`.
fn z_exceeds(rng: &mut NoiseRng, negative: bool, cell: Cell, w_negative: bool, w_abs: &Dyadic) -> bool {
    if !negative {
        // |Z| > w: always when w < 0; otherwise iff U < Q(w) (true for w = 0).
        w_negative || exact::uniform_below_tail(w_abs, cell.n, cell.exp, rng)
    } else {
        // -|Z| > w iff |Z| < -w: never when w >= 0; otherwise iff U > Q(-w).
        w_negative && !exact::uniform_below_tail(w_abs, cell.n, cell.exp, rng)
    }
}

/// `U` lies in `[n 2^-exp, (n + 1) 2^-exp)`, `2^51 <= n < 2^52`.
#[derive(Clone, Copy, Debug)]
struct Cell {
    n: u64,
    exp: u32,
}

impl Cell {
    #[inline]
    fn mid(self) -> f64 {
        // 2n + 1 < 2^53 and the power of two are exact, so is their product.
        let k = self.exp + 1;
        if k < 1023 {
            (2 * self.n + 1) as f64 * f64::from_bits(u64::from(1023 - k) << 52)
        } else {
            libm::scalbn((2 * self.n + 1) as f64, -(k as i32))
        }
    }
}

/// A sign and a uniform in `(0, 1/2)` with full relative precision.
#[inline]
fn draw_uniform(rng: &mut NoiseRng) -> (bool, Cell) {
    let w = rng.next_u64();
    let negative = w >> 63 != 0;
    let mut bits = w & (u64::MAX >> 1);
    let mut avail = 63u32;
    let mut skipped = 0u32;
    loop {
        let lz = bits.leading_zeros() - (64 - avail);
        if lz + 52 <= avail {
            // Leading one at bit p; the 51 bits after it are the mantissa.
            let p = avail - 1 - lz;
            let mantissa = (bits >> (p - 51)) & ((1u64 << 51) - 1);
            // U' = 2^-(skipped + lz + 1) (1 + mantissa 2^-51 + ...), U = U' / 2.
            let exp = 51 + skipped + lz + 2;
            return (negative, Cell { n: (1u64 << 51) | mantissa, exp });
        }
        // The top avail - 51 bits were zero: U' < 2^-(avail-51), uniform below it, so
        // continue with fresh bits and a smaller scale.
        skipped += avail - 51;
        if skipped >= MAX_LEADING_ZEROS {
            // Probability 2^-940: stop at the floor cell.
            return (negative, Cell { n: 1u64 << 51, exp: 51 + skipped + 2 });
        }
        bits = rng.next_u64();
        avail = 64;
    }
}

/// Wichura's AS241 (PPND16) for `p` in `(0, 1/2]`: the standard normal quantile, `<= 0`.
///
/// The coefficients are Wichura's published 20-digit values, kept verbatim so they can be
/// checked against the paper; the compiler rounds them to the nearest double.
#[inline]
#[allow(clippy::excessive_precision)]
fn ppnd_lower(p: f64) -> f64 {
    const A: [f64; 8] = [
        3.387_132_872_796_366_608,
        1.331_416_678_917_843_774_5e2,
        1.971_590_950_306_551_442_7e3,
        1.373_169_376_550_946_112_5e4,
        4.592_195_393_154_987_145_7e4,
        6.726_577_092_700_870_085_3e4,
        3.343_057_558_358_812_810_5e4,
        2.509_080_928_730_122_672_7e3,
    ];
    const B: [f64; 8] = [
        1.0,
        4.231_333_070_160_091_125_2e1,
        6.871_870_074_920_579_083e2,
        5.394_196_021_424_751_107_7e3,
        2.121_379_430_158_659_586_7e4,
        3.930_789_580_009_271_061e4,
        2.872_908_573_572_194_267_4e4,
        5.226_495_278_852_854_561e3,
    ];
    const C: [f64; 8] = [
        1.423_437_110_749_683_577_34,
        4.630_337_846_156_545_295_9,
        5.769_497_221_460_691_405_5,
        3.647_848_324_763_204_605_04,
        1.270_458_252_452_368_382_58,
        2.417_807_251_774_506_117_7e-1,
        2.272_384_498_926_918_458_33e-2,
        7.745_450_142_783_414_076_4e-4,
    ];
    const D: [f64; 8] = [
        1.0,
        2.053_191_626_637_758_821_87,
        1.676_384_830_183_803_849_4,
        6.897_673_349_851_000_045_5e-1,
        1.481_039_764_274_800_745_9e-1,
        1.519_866_656_361_645_719_66e-2,
        5.475_938_084_995_344_946e-4,
        1.050_750_071_644_416_843_24e-9,
    ];
    const E: [f64; 8] = [
        6.657_904_643_501_103_777_2,
        5.463_784_911_164_114_369_9,
        1.784_826_539_917_291_335_8,
        2.965_605_718_285_048_912_3e-1,
        2.653_218_952_657_612_309_3e-2,
        1.242_660_947_388_078_438_6e-3,
        2.711_555_568_743_487_578_15e-5,
        2.010_334_399_292_288_132_65e-7,
    ];
    const F: [f64; 8] = [
        1.0,
        5.998_322_065_558_879_376_9e-1,
        1.369_298_809_227_358_053_1e-1,
        1.487_536_129_085_061_485_25e-2,
        7.868_691_311_456_132_591e-4,
        1.846_318_317_510_054_681_8e-5,
        1.421_511_758_316_445_888_7e-7,
        2.044_263_103_389_939_785_64e-15,
    ];
    #[inline]
    fn poly(c: &[f64; 8], x: f64) -> f64 {
        let mut acc = c[7];
        for &k in c[..7].iter().rev() {
            acc = acc * x + k;
        }
        acc
    }
    let q = p - 0.5;
    if q >= -0.425 {
        let r = 0.180625 - q * q;
        q * poly(&A, r) / poly(&B, r)
    } else {
        let r = libm::sqrt(-libm::log(p));
        if r <= 5.0 {
            let r = r - 1.6;
            -(poly(&C, r) / poly(&D, r))
        } else {
            let r = r - 5.0;
            -(poly(&E, r) / poly(&F, r))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::tensor::Tensor;

    fn rng(seed: u8) -> NoiseRng {
        NoiseRng::from_seed_insecure([seed; 32])
    }

    #[derive(Deserialize)]
    struct Quantile {
        u: String,
        z: String,
    }

    #[derive(Deserialize)]
    struct Reference {
        quantiles: Vec<Quantile>,
    }

    fn parse_hex_float(s: &str) -> f64 {
        let (mant, exp) = s.trim_start_matches("0x").split_once('p').unwrap();
        let (int, frac) = mant.split_once('.').unwrap();
        let frac_bits = u64::from_str_radix(&format!("{frac:0<13}"), 16).unwrap();
        let m = (int.parse::<u64>().unwrap() << 52) | frac_bits;
        libm::scalbn(m as f64, exp.parse::<i32>().unwrap() - 52)
    }

    /// AS241 against 100-digit mpmath quantiles from 1/2 down to 2^-995: the fast path's
    /// correctness needs an absolute error below 2^-27 (margin 2^-24 over grid factor 8);
    /// we require 2^-40 and print what we see.
    #[test]
    fn quantile_accuracy_against_mpmath() {
        let r: Reference = serde_json::from_str(include_str!("reference/normal_reference.json")).unwrap();
        let (mut max_abs, mut max_rel) = (0f64, 0f64);
        for q in &r.quantiles {
            let u = parse_hex_float(&q.u);
            let exact: f64 = q.z.parse().unwrap();
            let z = ppnd_lower(u);
            let abs = (z - exact).abs();
            max_abs = max_abs.max(abs);
            if exact != 0.0 {
                max_rel = max_rel.max(abs / exact.abs());
            }
            assert!(abs < 2f64.powi(-40), "u={u:e}: {z} vs {exact}");
        }
        eprintln!("AS241 max abs error {max_abs:e} (2^{:.1}), max rel error {max_rel:e}", max_abs.log2());
    }

    #[test]
    fn uniform_cells_are_in_range_and_fine() {
        let mut g = rng(3);
        let mut negatives = 0;
        for _ in 0..100_000 {
            let (neg, cell) = draw_uniform(&mut g);
            negatives += u32::from(neg);
            assert!(cell.n >> 51 == 1);
            let mid = cell.mid();
            assert!(mid > 0.0 && mid < 0.5, "{mid}");
        }
        assert!((49_000..51_000).contains(&negatives), "{negatives}");
    }

    /// Mean and std of a million noised zeros, within 3 standard errors of the snapped
    /// Gaussian (variance std^2 + grid^2 / 12).
    #[test]
    fn mean_and_std_of_a_million_samples() {
        let std = 0.37;
        let noise = GaussianNoise::new(std).unwrap();
        let mut g = rng(11);
        let n = 1_000_000usize;
        // Offsets spread over a grid cell so the rounding error is uniform.
        let mut values: Vec<f32> = (0..n).map(|i| ((i % 97) as f64 / 97.0 * noise.grid()) as f32).collect();
        let base = values.clone();
        noise.add_to(&mut g, &mut values).unwrap();
        let diffs: Vec<f64> = values.iter().zip(&base).map(|(&a, &b)| f64::from(a) - f64::from(b)).collect();
        let mean = diffs.iter().sum::<f64>() / n as f64;
        let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let expected_var = std * std + noise.grid() * noise.grid() / 12.0;
        let se_mean = expected_var.sqrt() / (n as f64).sqrt();
        assert!(mean.abs() < 3.0 * se_mean, "mean {mean} vs se {se_mean}");
        let se_std = expected_var.sqrt() / (2.0 * n as f64).sqrt();
        assert!((var.sqrt() - expected_var.sqrt()).abs() < 3.0 * se_std, "std {} vs {}", var.sqrt(), expected_var.sqrt());
        // Tails: P(|Z| > 3) = 0.0027 within 3 binomial standard errors.
        let beyond = diffs.iter().filter(|d| d.abs() > 3.0 * std).count() as f64 / n as f64;
        let p = 0.002_699_796;
        assert!((beyond - p).abs() < 3.0 * (p * (1.0 - p) / n as f64).sqrt(), "{beyond}");
    }

    /// Outputs are integer multiples of the grid: the float representation carries no
    /// information beyond k.
    #[test]
    fn outputs_lie_on_the_grid() {
        let noise = GaussianNoise::new(1.0).unwrap();
        let mut g = rng(5);
        let mut values: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.001_234_5).sin()).collect();
        noise.add_to(&mut g, &mut values).unwrap();
        for v in values {
            let k = f64::from(v) / noise.grid();
            assert_eq!(k, k.round(), "{v} is not on the grid");
        }
    }

    /// The slow path agrees with the fast path wherever the fast path is far from a
    /// boundary, and decides cells near one.
    #[test]
    fn slow_path_agrees_with_fast_path() {
        let mut g = rng(9);
        let mut checked = 0;
        for i in 0..20_000 {
            let f = (i as f64 * 0.618_033_988_749_895) % 1.0;
            let (negative, cell) = draw_uniform(&mut g);
            let z_abs = -ppnd_lower(cell.mid());
            let z = if negative { -z_abs } else { z_abs };
            let v = f + 8.0 * z;
            let j = v.round();
            let d = v - j;
            if 0.5 - d.abs() < 1e-6 {
                continue;
            }
            // Ask the exact comparison about both neighbouring boundaries.
            for b2 in [2 * (j as i64) - 1, 2 * (j as i64) + 1] {
                let (w_negative, w_abs) = boundary(b2, f);
                let above = z_exceeds(&mut g, negative, cell, w_negative, &w_abs);
                let b = b2 as f64 / 2.0;
                assert_eq!(above, v > b, "f={f} z={z} b={b}");
                checked += 1;
            }
        }
        assert!(checked > 39_000);
    }

    /// With the margin at 1/2 every value takes the slow path; it draws further bits only
    /// when a cell straddles the boundary (probability ~2^-45), so on the same stream it
    /// must give exactly the fast path's answers.
    #[test]
    fn forced_slow_path_matches_the_fast_path() {
        let (mut fast, mut slow) = (rng(21), rng(21));
        for i in 0..3000 {
            let f = (i as f64 * 0.754_877_666_246_692_7) % 1.0;
            let a = offset_with_margin(&mut fast, f, MARGIN);
            let b = offset_with_margin(&mut slow, f, 0.5);
            assert_eq!(a, b, "sample {i}, f = {f}");
        }
    }

    #[test]
    fn boundaries_are_exact_dyadics() {
        // b = 1/2, f = 1/4: w = 1/32.
        let (neg, w) = boundary(1, 0.25);
        assert!(!neg);
        assert_eq!(w.num, Nat::from_u64(1).shl(w.exp - 5));
        // b = -3/2, f = 0.1: w = -(1.5 + 0.1) / 8, and 0.1's every bit survives.
        let (neg, w) = boundary(-3, 0.1);
        assert!(neg);
        let (fm, fs) = exact::decompose(0.1);
        let expected = Nat::from_u64(3).shl(fs - 1).add(&Nat::from_u64(fm));
        assert_eq!((w.num, w.exp), (expected, fs + 3));
        // b = 1/2, f = 0.75: w = -1/32.
        let (neg, _) = boundary(1, 0.75);
        assert!(neg);
        // The cell midpoint is exact in both branches.
        let c = Cell { n: (1 << 51) | 12345, exp: 60 };
        assert_eq!(c.mid(), ((2 * c.n + 1) as f64) / 2f64.powi(61));
        let deep = Cell { n: 1 << 51, exp: 1030 };
        assert_eq!(deep.mid(), libm::scalbn((2 * deep.n + 1) as f64, -1031));
    }

    #[test]
    fn rejects_bad_inputs_and_leaves_them_alone() {
        assert!(GaussianNoise::new(0.0).is_err());
        assert!(GaussianNoise::new(f64::NAN).is_err());
        assert!(GaussianNoise::new(1e30).is_err());
        let noise = GaussianNoise::new(1.0).unwrap();
        let mut g = rng(1);
        let mut v = [1.0f32, f32::INFINITY];
        assert!(matches!(noise.add_to(&mut g, &mut v), Err(NoiseError::NonFinite { index: 1, .. })));
        assert_eq!(v[0], 1.0);
        let mut big = [1e18f32];
        assert!(matches!(noise.add_to(&mut g, &mut big), Err(NoiseError::TooLarge { .. })));
        let mut set = TensorSet::new();
        set.insert("a", Tensor::new(vec![2], vec![0.0, 0.0]).unwrap());
        set.insert("b", Tensor::new(vec![1], vec![f32::NAN]).unwrap());
        assert!(noise.add_to_tensors(&mut g, &mut set).is_err());
        assert_eq!(set.get("a").unwrap().data(), &[0.0, 0.0]);
    }

    #[test]
    fn seeded_noise_is_reproducible_and_debug_hides_state() {
        let noise = GaussianNoise::new(0.5).unwrap();
        let mut a = vec![0.25f32; 1000];
        let mut b = a.clone();
        noise.add_to(&mut rng(42), &mut a).unwrap();
        noise.add_to(&mut rng(42), &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(format!("{:?}", rng(42)), "NoiseRng { .. }");
        assert!(NoiseRng::from_os().is_ok());
    }

    /// `FEDWARD_BENCH=1 cargo test -p fedward-shared --release noise_throughput -- --nocapture`
    #[test]
    fn noise_throughput() {
        if std::env::var_os("FEDWARD_BENCH").is_none() {
            return;
        }
        let noise = GaussianNoise::new(1.1).unwrap();
        let mut g = NoiseRng::from_os().unwrap();
        let mut values = vec![0.01f32; 3_600_000];
        let start = std::time::Instant::now();
        let reps = 10;
        for _ in 0..reps {
            noise.add_to(&mut g, &mut values).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let per_sec = (reps * values.len()) as f64 / secs;
        eprintln!("noise: {:.1} M values/s ({reps} x 3.6M in {secs:.2} s)", per_sec / 1e6);
        let start = std::time::Instant::now();
        let mut sink = 0u64;
        for _ in 0..reps * values.len() {
            sink ^= g.next_u64();
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!("chacha20 next_u64 alone: {:.1} M/s ({sink})", (reps * values.len()) as f64 / secs / 1e6);
    }
}
