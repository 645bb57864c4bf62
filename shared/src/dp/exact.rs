//! Exact comparison of a lazily drawn uniform with a Gaussian upper tail: the noise
//! sampler's slow path.
//!
//! [`uniform_below_tail`] decides `U < Q(a)` where `Q(a) = P(Z > a)` for a standard normal
//! `Z`, `a >= 0` is a double, and `U` is uniform on a dyadic cell `[n 2^-e, (n+1) 2^-e)`
//! whose further bits are drawn from the caller's RNG only when needed. It works in
//! fixed-point interval arithmetic on unsigned big integers, so every rounding is
//! accounted for and the answer is exact, not approximately right:
//!
//! `U < Q(a)`  iff  `e^(-a^2/2) S(a) / sqrt(2 pi) < 1/2 - U`  iff  `(e^(-a^2/2) S(a))^2 < 2 pi (1/2 - U)^2`,
//!
//! with `S(a) = sum_n a^(2n+1) / (2n+1)!!` (positive terms; `Phi(a) - 1/2 = phi(a) S(a)`),
//! `pi` from Machin's formula and `e^-x` from its Taylor series after halving `x` below
//! 1/2 and squaring back. Precision starts at 128 bits beyond the size of the numbers and
//! doubles while the two sides' intervals overlap; past 2^13 bits (probability about
//! 2^-8000 per call) it settles on the midpoints, which is the one inexact outcome.

use std::cmp::Ordering;

/// Source of the uniform's further bits.
pub(crate) trait Bits {
    fn next_u64(&mut self) -> u64;
}

/// Precision (bits beyond the operands' size) past which the comparison stops refining.
const MAX_PRECISION: u32 = 1 << 13;

/// A non-negative dyadic rational `num 2^-exp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Dyadic {
    pub(crate) num: Nat,
    pub(crate) exp: u32,
}

impl Dyadic {
    fn is_zero(&self) -> bool {
        self.num.0.is_empty()
    }

    /// An f64 within a factor `1 +- 2^-50` of the value (for sizing only).
    fn approx(&self) -> f64 {
        let bits = self.num.bit_len();
        let top = self.num.shr(bits.saturating_sub(64));
        let top = top.0.first().copied().unwrap_or(0) as f64;
        libm::scalbn(top, bits.saturating_sub(64) as i32 - self.exp as i32)
    }
}

/// Whether `U < Q(a)` for `U` uniform on `[n 2^-e, (n+1) 2^-e)`, drawing more bits of `U`
/// from `rng` as needed. Requires `0 < n 2^-e` and `(n+1) 2^-e <= 1/2`.
pub(crate) fn uniform_below_tail(a: &Dyadic, n: u64, e: u32, rng: &mut impl Bits) -> bool {
    if a.is_zero() {
        // Q(0) = 1/2 and U < 1/2 always.
        return true;
    }
    let approx = a.approx();
    // log2 of 1/e^(-a^2/2): how many bits the smallest factor needs before precision counts.
    let tail_bits = (approx * approx / 2.0 * std::f64::consts::LOG2_E).ceil() as u32 + 1;
    let mut u_num = Nat::from_u64(n);
    let mut u_exp = e;
    let mut precision = 128u32;
    loop {
        let l = tail_bits + precision + 64;
        let lhs = lhs_interval(a, l);
        loop {
            let rhs = rhs_interval(&u_num, u_exp, l);
            if lhs.hi < rhs.lo {
                return true;
            }
            if lhs.lo > rhs.hi {
                return false;
            }
            // Refine U while its cell is coarser than the working precision.
            if u_exp + 64 <= l {
                u_num = u_num.shl(64).add(&Nat::from_u64(rng.next_u64()));
                u_exp += 64;
            } else {
                break;
            }
        }
        if precision >= MAX_PRECISION {
            let rhs = rhs_interval(&u_num, u_exp, l);
            return lhs.lo.add(&lhs.hi) < rhs.lo.add(&rhs.hi);
        }
        precision *= 2;
    }
}

/// `f = m 2^-s` exactly for a finite non-negative double (`m < 2^53`).
pub(crate) fn decompose(f: f64) -> (u64, u32) {
    let bits = f.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as u32;
    let frac = bits & ((1u64 << 52) - 1);
    if exp == 0 {
        (frac, 1074)
    } else if exp <= 1075 {
        (frac | (1u64 << 52), 1075 - exp)
    } else {
        // f >= 2^53 is an integer; callers only pass values below 2.
        ((frac | (1u64 << 52)) << (exp - 1075).min(11), 0)
    }
}

/// `(e^(-a^2/2) S(a))^2` in fixed point with `l` fractional bits.
fn lhs_interval(a_exact: &Dyadic, l: u32) -> Iv {
    let one = Nat::one().shl(l);
    // a and a^2 as intervals.
    let a = Iv::from_scaled(&a_exact.num, i64::from(a_exact.exp), l);
    let a2 = Iv::from_scaled(&a_exact.num.mul(&a_exact.num), 2 * i64::from(a_exact.exp), l);
    // e^(-x), x = a^2 / 2: halve x r times to at most 1/2, Taylor series, square r times.
    let x = a2.div_small(2);
    let mut r = 0u32;
    let mut y = x.clone();
    let half = one.shr(1);
    while y.hi > half {
        y = y.div_small(2);
        r += 1;
    }
    let mut pos = Iv::exact(one.clone());
    let mut neg = Iv::exact(Nat::zero());
    let mut term = Iv::exact(one.clone());
    let mut k = 1u64;
    loop {
        term = term.mul(&y, l).div_small(k);
        if k % 2 == 1 {
            neg = neg.add(&term);
        } else {
            pos = pos.add(&term);
        }
        if term.hi <= Nat::one() {
            break;
        }
        k += 1;
    }
    // Alternating series with decreasing terms: the tail is below the last term (<= 1 ulp).
    let mut ex = pos.sub(&neg).widen(1);
    for _ in 0..r {
        ex = ex.mul(&ex, l);
    }
    // S(a) = sum a^(2n+1) / (2n+1)!!, positive terms.
    let mut s = a.clone();
    let mut term = a;
    let mut k = 3u64;
    loop {
        term = term.mul(&a2, l).div_small(k);
        s = s.add(&term);
        // Once a^2 / (k + 2) <= 1/2 the remaining terms sum to at most the last one.
        let ratio_small = a2.hi.mul_small(2) <= one.mul_small(k + 2);
        if ratio_small && term.hi <= Nat::one() {
            break;
        }
        k += 2;
    }
    let s = s.widen_up(1);
    let prod = ex.mul(&s, l);
    prod.mul(&prod, l)
}

/// `2 pi (1/2 - U)^2` in fixed point with `l` fractional bits, `U in [num 2^-e, (num+1) 2^-e)`.
fn rhs_interval(num: &Nat, e: u32, l: u32) -> Iv {
    let one = Nat::one().shl(l);
    let half = one.shr(1);
    let u_lo = scale_floor(num, e, l);
    let u_hi = scale_ceil(&num.add(&Nat::one()), e, l);
    let d = Iv { lo: half.saturating_sub(&u_hi), hi: half.saturating_sub(&u_lo) };
    let two_pi = pi(l).mul_small(2);
    two_pi.mul(&d.mul(&d, l), l)
}

/// pi = 16 atan(1/5) - 4 atan(1/239) with `l` fractional bits.
fn pi(l: u32) -> Iv {
    let a5 = atan_inv(5, l).mul_small(16);
    let a239 = atan_inv(239, l).mul_small(4);
    a5.sub(&a239)
}

/// atan(1/k) with `l` fractional bits.
fn atan_inv(k: u64, l: u32) -> Iv {
    let one = Nat::one().shl(l);
    let mut power = Iv::exact(one).div_small(k);
    let mut pos = Iv::exact(Nat::zero());
    let mut neg = Iv::exact(Nat::zero());
    let mut n = 0u64;
    loop {
        let term = power.div_small(2 * n + 1);
        if n.is_multiple_of(2) {
            pos = pos.add(&term);
        } else {
            neg = neg.add(&term);
        }
        if term.hi <= Nat::one() {
            break;
        }
        power = power.div_small(k * k);
        n += 1;
    }
    pos.sub(&neg).widen(1)
}

/// floor(v 2^(l - e)).
fn scale_floor(v: &Nat, e: u32, l: u32) -> Nat {
    if l >= e {
        v.shl(l - e)
    } else {
        v.shr(e - l)
    }
}

/// ceil(v 2^(l - e)).
fn scale_ceil(v: &Nat, e: u32, l: u32) -> Nat {
    if l >= e {
        v.shl(l - e)
    } else {
        let f = v.shr(e - l);
        if f.shl(e - l) == *v {
            f
        } else {
            f.add(&Nat::one())
        }
    }
}

/// A closed interval `[lo, hi]` of fixed-point numbers.
#[derive(Clone, Debug)]
struct Iv {
    lo: Nat,
    hi: Nat,
}

impl Iv {
    fn exact(v: Nat) -> Self {
        Self { lo: v.clone(), hi: v }
    }

    /// `v 2^-g` as a fixed-point interval with `l` fractional bits.
    fn from_scaled(v: &Nat, g: i64, l: u32) -> Self {
        let shift = i64::from(l) - g;
        if shift >= 0 {
            Self::exact(v.shl(shift as u32))
        } else {
            let s = (-shift) as u32;
            let lo = v.shr(s);
            let hi = if lo.shl(s) == *v { lo.clone() } else { lo.add(&Nat::one()) };
            Self { lo, hi }
        }
    }

    fn add(&self, o: &Iv) -> Iv {
        Iv { lo: self.lo.add(&o.lo), hi: self.hi.add(&o.hi) }
    }

    fn sub(&self, o: &Iv) -> Iv {
        Iv { lo: self.lo.saturating_sub(&o.hi), hi: self.hi.saturating_sub(&o.lo) }
    }

    fn mul(&self, o: &Iv, l: u32) -> Iv {
        let lo = self.lo.mul(&o.lo).shr(l);
        let hi_full = self.hi.mul(&o.hi);
        let hi = hi_full.shr(l);
        let hi = if hi.shl(l) == hi_full { hi } else { hi.add(&Nat::one()) };
        Iv { lo, hi }
    }

    fn mul_small(&self, k: u64) -> Iv {
        Iv { lo: self.lo.mul_small(k), hi: self.hi.mul_small(k) }
    }

    fn div_small(&self, k: u64) -> Iv {
        let (lo, _) = self.lo.div_small(k);
        let (hi, rem) = self.hi.div_small(k);
        let hi = if rem == 0 { hi } else { hi.add(&Nat::one()) };
        Iv { lo, hi }
    }

    fn widen(&self, ulps: u64) -> Iv {
        Iv { lo: self.lo.saturating_sub(&Nat::from_u64(ulps)), hi: self.hi.add(&Nat::from_u64(ulps)) }
    }

    fn widen_up(&self, ulps: u64) -> Iv {
        Iv { lo: self.lo.clone(), hi: self.hi.add(&Nat::from_u64(ulps)) }
    }
}

/// An unsigned big integer, little-endian 64-bit limbs, no trailing zero limbs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Nat(Vec<u64>);

impl Nat {
    fn zero() -> Self {
        Nat(Vec::new())
    }

    fn one() -> Self {
        Nat(vec![1])
    }

    pub(crate) fn from_u64(v: u64) -> Self {
        Nat(vec![v]).trim()
    }

    #[cfg(test)]
    fn from_u128(v: u128) -> Self {
        Nat(vec![v as u64, (v >> 64) as u64]).trim()
    }

    fn bit_len(&self) -> u32 {
        self.0.last().map_or(0, |&top| 64 * (self.0.len() as u32 - 1) + (64 - top.leading_zeros()))
    }

    fn trim(mut self) -> Self {
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
        self
    }

    pub(crate) fn add(&self, o: &Nat) -> Nat {
        let n = self.0.len().max(o.0.len());
        let mut out = Vec::with_capacity(n + 1);
        let mut carry = 0u64;
        for i in 0..n {
            let a = self.0.get(i).copied().unwrap_or(0);
            let b = o.0.get(i).copied().unwrap_or(0);
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(carry);
            out.push(s2);
            carry = u64::from(c1) + u64::from(c2);
        }
        out.push(carry);
        Nat(out).trim()
    }

    /// `self - o`, or zero when `o > self`.
    pub(crate) fn saturating_sub(&self, o: &Nat) -> Nat {
        if *self <= *o {
            return Nat::zero();
        }
        let mut out = Vec::with_capacity(self.0.len());
        let mut borrow = 0u64;
        for i in 0..self.0.len() {
            let a = self.0[i];
            let b = o.0.get(i).copied().unwrap_or(0);
            let (d1, b1) = a.overflowing_sub(b);
            let (d2, b2) = d1.overflowing_sub(borrow);
            out.push(d2);
            borrow = u64::from(b1) + u64::from(b2);
        }
        Nat(out).trim()
    }

    fn mul(&self, o: &Nat) -> Nat {
        if self.0.is_empty() || o.0.is_empty() {
            return Nat::zero();
        }
        let mut out = vec![0u64; self.0.len() + o.0.len()];
        for (i, &a) in self.0.iter().enumerate() {
            let mut carry = 0u128;
            for (j, &b) in o.0.iter().enumerate() {
                let t = u128::from(a) * u128::from(b) + u128::from(out[i + j]) + carry;
                out[i + j] = t as u64;
                carry = t >> 64;
            }
            out[i + o.0.len()] = carry as u64;
        }
        Nat(out).trim()
    }

    fn mul_small(&self, k: u64) -> Nat {
        self.mul(&Nat::from_u64(k))
    }

    /// Floor quotient and remainder by a non-zero `k`.
    fn div_small(&self, k: u64) -> (Nat, u64) {
        let mut out = vec![0u64; self.0.len()];
        let mut rem = 0u128;
        for i in (0..self.0.len()).rev() {
            let cur = (rem << 64) | u128::from(self.0[i]);
            out[i] = (cur / u128::from(k)) as u64;
            rem = cur % u128::from(k);
        }
        (Nat(out).trim(), rem as u64)
    }

    pub(crate) fn shl(&self, bits: u32) -> Nat {
        if self.0.is_empty() {
            return Nat::zero();
        }
        let limbs = (bits / 64) as usize;
        let b = bits % 64;
        let mut out = vec![0u64; limbs];
        if b == 0 {
            out.extend_from_slice(&self.0);
        } else {
            let mut carry = 0u64;
            for &v in &self.0 {
                out.push((v << b) | carry);
                carry = v >> (64 - b);
            }
            out.push(carry);
        }
        Nat(out).trim()
    }

    fn shr(&self, bits: u32) -> Nat {
        let limbs = (bits / 64) as usize;
        if limbs >= self.0.len() {
            return Nat::zero();
        }
        let b = bits % 64;
        let src = &self.0[limbs..];
        let mut out = Vec::with_capacity(src.len());
        for i in 0..src.len() {
            let lo = src[i] >> b;
            let hi = if b == 0 { 0 } else { src.get(i + 1).map_or(0, |&v| v << (64 - b)) };
            out.push(lo | hi);
        }
        Nat(out).trim()
    }
}

impl PartialOrd for Nat {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Nat {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.len().cmp(&o.0.len()).then_with(|| self.0.iter().rev().cmp(o.0.iter().rev()))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    struct Counter(u64);

    impl Bits for Counter {
        fn next_u64(&mut self) -> u64 {
            // SplitMix64: any bit source will do for these tests.
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[derive(Deserialize)]
    struct Tail {
        w: String,
        q: String,
    }

    #[derive(Deserialize)]
    struct Reference {
        tails: Vec<Tail>,
    }

    fn parse_hex_float(s: &str) -> f64 {
        // Python's float.hex(): [-]0x1.<13 hex digits>p<exp>, or 0x0.0p+0.
        let (mant, exp) = s.trim_start_matches("0x").split_once('p').unwrap();
        let (int, frac) = mant.split_once('.').unwrap();
        let frac_bits = u64::from_str_radix(&format!("{frac:0<13}"), 16).unwrap();
        let v = (int.parse::<u64>().unwrap() as f64) + frac_bits as f64 / (1u64 << 52) as f64;
        v * 2f64.powi(exp.parse::<i32>().unwrap())
    }

    /// Writes `q` (a decimal with up to 40 digits) as a cell `[n 2^-e, (n+1) 2^-e)` just
    /// below and just above it, using a 62-bit mantissa.
    fn cells_around(q: &str) -> ((u64, u32), (u64, u32)) {
        let qf: f64 = q.parse().unwrap();
        let e = (62.0 - qf.log2()).floor() as u32; // n = q 2^e has 62 bits
        let approx = libm::scalbn(qf, e as i32);
        let n = approx as u64;
        // The f64 parse is accurate to 2^-53 relative, so n is within 2^10 of q 2^e: a margin
        // of 2^12 puts the cells safely on each side.
        ((n - (1 << 12), e), (n + (1 << 12), e))
    }

    fn one() -> Dyadic {
        Dyadic { num: Nat::one(), exp: 0 }
    }

    #[test]
    fn pi_is_pi() {
        let l = 200;
        let p = pi(l);
        // 3.14159265358979323846264338327950288 as a fraction of 2^200, via f64 sanity bound.
        let approx = |v: &Nat| v.0.iter().rev().fold(0f64, |acc, &x| acc * 2f64.powi(64) + x as f64) / 2f64.powi(200);
        assert!((approx(&p.lo) - std::f64::consts::PI).abs() < 1e-15);
        assert!(p.hi.saturating_sub(&p.lo) <= Nat::from_u64(1000));
    }

    #[test]
    fn decides_against_reference_tails() {
        let r: Reference = serde_json::from_str(include_str!("reference/normal_reference.json")).unwrap();
        let mut rng = Counter(1);
        for t in &r.tails {
            let w = parse_hex_float(&t.w);
            let (m, s) = decompose(w);
            let a = Dyadic { num: Nat::from_u64(m), exp: s };
            if w == 0.0 {
                assert!(uniform_below_tail(&a, 1, 2, &mut rng));
                continue;
            }
            assert!((a.approx() - w).abs() <= 1e-15 * w);
            let (below, above) = cells_around(&t.q);
            assert!(uniform_below_tail(&a, below.0, below.1, &mut rng), "w={w}: U just below Q");
            assert!(!uniform_below_tail(&a, above.0, above.1, &mut rng), "w={w}: U just above Q");
        }
    }

    /// A cell straddling Q(a) forces bits to be drawn; the answer must still be a
    /// yes-or-no that depends on those bits, and cells far away must not draw any.
    #[test]
    fn straddling_cells_draw_bits() {
        // Q(1) 2^50 = 178629935621520.3493... (mpmath), so the cell with n = 178629935621520
        // and e = 50 holds Q(1) at about a third of its width.
        let (n, e) = (178_629_935_621_520u64, 50u32);
        let mut yes = 0;
        for seed in 0..64 {
            let mut rng = Counter(seed);
            if uniform_below_tail(&one(), n, e, &mut rng) {
                yes += 1;
            }
        }
        assert!(yes > 0 && yes < 64, "{yes}");
        let mut rng = Counter(5);
        let before = rng.0;
        assert!(uniform_below_tail(&one(), 1, 4, &mut rng));
        assert_eq!(rng.0, before, "a far cell needs no extra bits");
    }

    #[test]
    fn nat_arithmetic() {
        let a = Nat::from_u128(u128::MAX);
        let b = a.add(&Nat::one());
        assert_eq!(b, Nat(vec![0, 0, 1]));
        assert_eq!(b.saturating_sub(&Nat::one()), a);
        assert_eq!(b.shr(128), Nat::one());
        assert_eq!(Nat::one().shl(130), Nat(vec![0, 0, 4]));
        let (q, r) = Nat::from_u64(1001).div_small(10);
        assert_eq!((q, r), (Nat::from_u64(100), 1));
        let sq = Nat::from_u64(u64::MAX).mul(&Nat::from_u64(u64::MAX));
        assert_eq!(sq, Nat::from_u128(u128::from(u64::MAX) * u128::from(u64::MAX)));
        assert!(Nat::zero() < Nat::one());
        assert_eq!(Nat::one().saturating_sub(&Nat::from_u64(2)), Nat::zero());
    }
}
