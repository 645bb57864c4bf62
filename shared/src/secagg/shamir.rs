//! Shamir secret sharing over the prime field of `curve25519-dalek`'s `Scalar`.
//!
//! Why this field and crate: `curve25519-dalek` is already in the dependency tree (through
//! `ed25519-dalek` and `x25519-dalek`), is widely deployed and audited (Quarkslab, 2019),
//! and its `Scalar` is arithmetic modulo the prime `l = 2^252 + 27742...` with
//! constant-time multiplication and inversion. The sharing itself is the textbook
//! construction on top (a random polynomial of degree `t - 1` with the secret as constant
//! term, evaluated at the participants' indices; Lagrange interpolation at zero), about
//! thirty lines that are easy to review; the byte-wise GF(256) crates (`sharks`/`blahaj`)
//! would also do, but would add a dependency for less. Secrets are scalars: the self-mask
//! seed is a random scalar (about 252 bits of entropy) and the pairwise-mask X25519 secret
//! is a random scalar's bytes (X25519 clamps it; about 249 bits of entropy remain).

use curve25519_dalek::scalar::Scalar;
use rand_core::{CryptoRng, RngCore};

/// A uniformly random scalar (64 random bytes reduced modulo `l`: bias below `2^-250`).
pub fn random_scalar<R: RngCore + CryptoRng>(rng: &mut R) -> Scalar {
    let mut wide = [0u8; 64];
    rng.fill_bytes(&mut wide);
    let s = Scalar::from_bytes_mod_order_wide(&wide);
    zeroize::Zeroize::zeroize(&mut wide);
    s
}

/// The shares of `secret` at the nonzero, distinct points `xs`, any `threshold` of which
/// reconstruct it.
pub fn split<R: RngCore + CryptoRng>(secret: &Scalar, threshold: usize, xs: &[u32], rng: &mut R) -> Vec<Scalar> {
    let mut coeffs: Vec<Scalar> = std::iter::once(*secret).chain((1..threshold).map(|_| random_scalar(rng))).collect();
    let shares = xs
        .iter()
        .map(|&x| {
            let x = Scalar::from(u64::from(x));
            // Horner, highest coefficient first.
            coeffs.iter().rev().fold(Scalar::ZERO, |acc, c| acc * x + c)
        })
        .collect();
    zeroize::Zeroize::zeroize(&mut coeffs);
    shares
}

/// Why shares did not reconstruct.
#[derive(Debug, PartialEq, Eq)]
pub enum ShamirError {
    /// Fewer shares than the threshold.
    TooFew { have: usize, need: usize },
    /// A point index is zero or repeated.
    BadPoints,
    /// More than `threshold` shares that do not lie on one polynomial of degree `t - 1`.
    Inconsistent,
}

/// Reconstructs the secret from at least `threshold` shares `(x, share)`: interpolates the
/// first `threshold` at zero and checks that any further shares lie on the same polynomial.
pub fn reconstruct(points: &[(u32, Scalar)], threshold: usize) -> Result<Scalar, ShamirError> {
    if threshold == 0 || points.len() < threshold {
        return Err(ShamirError::TooFew { have: points.len(), need: threshold });
    }
    let mut seen = std::collections::BTreeSet::new();
    if points.iter().any(|&(x, _)| x == 0 || !seen.insert(x)) {
        return Err(ShamirError::BadPoints);
    }
    let (basis, extra) = points.split_at(threshold);
    for &(x, y) in extra {
        if interpolate(basis, Scalar::from(u64::from(x))) != y {
            return Err(ShamirError::Inconsistent);
        }
    }
    Ok(interpolate(basis, Scalar::ZERO))
}

/// The value at `at` of the polynomial of degree `points.len() - 1` through `points`
/// (distinct nonzero x checked by the caller).
fn interpolate(points: &[(u32, Scalar)], at: Scalar) -> Scalar {
    let xs: Vec<Scalar> = points.iter().map(|&(x, _)| Scalar::from(u64::from(x))).collect();
    let mut acc = Scalar::ZERO;
    for (j, &(_, y)) in points.iter().enumerate() {
        let mut num = Scalar::ONE;
        let mut den = Scalar::ONE;
        for (m, &xm) in xs.iter().enumerate() {
            if m != j {
                num *= at - xm;
                den *= xs[j] - xm;
            }
        }
        // `den` is a product of differences of distinct small integers, nonzero mod l.
        acc += y * num * den.invert();
    }
    acc
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn any_t_shares_reconstruct_and_t_minus_1_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret = random_scalar(&mut rng);
        let xs: Vec<u32> = (1..=10).collect();
        let shares = split(&secret, 7, &xs, &mut rng);
        let points: Vec<(u32, Scalar)> = xs.iter().copied().zip(shares).collect();
        // Several subsets of exactly t, and all ten (which also checks consistency).
        for start in 0..4 {
            assert_eq!(reconstruct(&points[start..start + 7], 7).unwrap(), secret);
        }
        assert_eq!(reconstruct(&points, 7).unwrap(), secret);
        // t - 1 shares: refused at threshold t; interpolated as if the threshold were
        // t - 1 they give a different value (any value is equally likely).
        assert_eq!(reconstruct(&points[..6], 7), Err(ShamirError::TooFew { have: 6, need: 7 }));
        for start in 0..5 {
            assert_ne!(reconstruct(&points[start..start + 6], 6).unwrap(), secret);
        }
    }

    #[test]
    fn bad_points_and_inconsistent_shares_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = random_scalar(&mut rng);
        let shares = split(&secret, 2, &[1, 2, 3], &mut rng);
        assert_eq!(reconstruct(&[(1, shares[0]), (1, shares[1])], 2), Err(ShamirError::BadPoints));
        assert_eq!(reconstruct(&[(0, shares[0]), (2, shares[1])], 2), Err(ShamirError::BadPoints));
        let forged = shares[2] + Scalar::ONE;
        assert_eq!(reconstruct(&[(1, shares[0]), (2, shares[1]), (3, forged)], 2), Err(ShamirError::Inconsistent));
    }
}
