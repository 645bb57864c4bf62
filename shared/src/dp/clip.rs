//! L2 clipping of a whole update (or a per-example gradient) to a norm bound.
//!
//! The norm is global across every tensor, accumulated in f64, and the scale factor
//! `C / norm` is applied in f64 before rounding each value back to f32, so the direction
//! is kept and the clipped norm is `C` up to f32 rounding. Because rounding each value to
//! f32 can push the norm a hair above `C`, the factor is shrunk by a few f32 ulps and the
//! result re-checked: the norm after clipping never exceeds `C`, which is what the
//! sensitivity argument needs. Updates already within the bound are left untouched.

use crate::tensor::TensorSet;

use super::DpError;

/// What clipping did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clipped {
    /// L2 norm before clipping.
    pub norm: f64,
    /// The factor every value was multiplied by (1 when nothing changed).
    pub factor: f64,
}

impl Clipped {
    /// Whether the update was scaled down.
    pub fn was_clipped(&self) -> bool {
        self.factor < 1.0
    }
}

/// Clips every tensor of `set` together to global L2 norm at most `clip_norm`.
pub fn clip_tensors(set: &mut TensorSet, clip_norm: f64) -> Result<Clipped, DpError> {
    let mut slices: Vec<&mut [f32]> = set.iter_mut().map(|(_, t)| t.data_mut()).collect();
    clip_slices(&mut slices, clip_norm)
}

/// Clips the concatenation of `slices` to L2 norm at most `clip_norm`.
///
/// Fails (changing nothing) on a non-finite value or a `clip_norm` that is not a finite
/// positive number.
pub fn clip_slices(slices: &mut [&mut [f32]], clip_norm: f64) -> Result<Clipped, DpError> {
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(DpError::invalid("clip norm", clip_norm, "a finite number > 0"));
    }
    let norm = norm_of(slices.iter().map(|s| &**s));
    if !norm.is_finite() {
        return Err(DpError::invalid("update norm", norm, "finite values only"));
    }
    if norm <= clip_norm {
        return Ok(Clipped { norm, factor: 1.0 });
    }
    let mut factor = clip_norm / norm;
    scale(slices, factor);
    // Rounding each scaled value to f32 can land the norm up to ~2^-24 relatively above the
    // bound; back off by a few ulps at a time until it holds. One pass almost always does.
    let backoff = 1.0 - f64::from(f32::EPSILON);
    for _ in 0..64 {
        if norm_of(slices.iter().map(|s| &**s)) <= clip_norm {
            return Ok(Clipped { norm, factor });
        }
        scale(slices, backoff);
        factor *= backoff;
    }
    // Unreachable in practice (each pass shrinks the norm by about 1e-7 relative); zero is the
    // one answer that certainly respects the bound.
    scale(slices, 0.0);
    Ok(Clipped { norm, factor: 0.0 })
}

fn scale(slices: &mut [&mut [f32]], factor: f64) {
    for s in slices.iter_mut() {
        for v in s.iter_mut() {
            *v = (f64::from(*v) * factor) as f32;
        }
    }
}

fn norm_of<'a>(slices: impl Iterator<Item = &'a [f32]>) -> f64 {
    slices.flat_map(|s| s.iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::tensor::Tensor;

    fn random_set(rng: &mut ChaCha8Rng, scale: f32) -> TensorSet {
        let mut set = TensorSet::new();
        for (name, n) in [("a.weight", 300usize), ("b.bias", 7), ("c.weight", 1000)] {
            let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
            set.insert(name, Tensor::new(vec![n], data).unwrap());
        }
        set
    }

    #[test]
    fn clipping_bounds_the_norm_and_keeps_direction() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for scale in [0.01f32, 1.0, 1e3, 1e6] {
            let original = random_set(&mut rng, scale);
            let mut set = original.clone();
            let before = original.l2_norm();
            let c = 1.0;
            let out = clip_tensors(&mut set, c).unwrap();
            assert!((out.norm - before).abs() <= 1e-12 * before);
            let after = set.l2_norm();
            assert!(after <= c, "norm {after} above {c}");
            if before > c {
                assert!(out.was_clipped());
                assert!(after > c * (1.0 - 1e-6), "clipped too far: {after}");
                // Same direction: cosine similarity 1 up to f32 rounding.
                let mut dot = 0.0;
                for ((_, a), (_, b)) in original.iter().zip(set.iter()) {
                    dot += a.data().iter().zip(b.data()).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>();
                }
                let cos = dot / (before * after);
                assert!((cos - 1.0).abs() < 1e-6, "cosine {cos}");
            } else {
                assert_eq!(set, original, "small updates are untouched");
                assert_eq!(out.factor, 1.0);
            }
        }
    }

    #[test]
    fn rejects_bad_input_without_changing_it() {
        let mut a = [1.0f32, f32::NAN];
        assert!(clip_slices(&mut [&mut a[..]], 1.0).is_err());
        let mut b = [3.0f32, 4.0];
        assert!(clip_slices(&mut [&mut b[..]], 0.0).is_err());
        assert!(clip_slices(&mut [&mut b[..]], f64::INFINITY).is_err());
        assert_eq!(b, [3.0, 4.0]);
        let out = clip_slices(&mut [&mut b[..]], 1.0).unwrap();
        assert_eq!(out.norm, 5.0);
        assert!((f64::from(b[0]) - 0.6).abs() < 1e-6 && (f64::from(b[1]) - 0.8).abs() < 1e-6, "{b:?}");
        assert!(f64::from(b[0]).hypot(f64::from(b[1])) <= 1.0);
    }

    #[test]
    fn empty_update_is_fine() {
        let out = clip_slices(&mut [], 1.0).unwrap();
        assert_eq!(out, Clipped { norm: 0.0, factor: 1.0 });
    }
}
