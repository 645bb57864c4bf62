//! Combining a round's updates: norm-bounded FedAvg (a streaming weighted mean) and the
//! robust coordinate-wise median and trimmed mean.
//!
//! FedAvg keeps one f32 running sum per trainable value, whatever the number of sites:
//! each update adds `weight * scale * value` computed in f64 and rounded once to f32, so
//! the sum's memory is the trainable tensors' own (an f64 sum doubled it, and the
//! coordinator's peak with it).
//! The median and the trimmed mean hold every update of the round (f32, already scaled to
//! the norm bound) until it closes: memory O(sites x trainable values); they give every
//! site one vote, so a site's claimed number of examples buys it nothing.
//!
//! Each update is checked in full (names, shapes, finiteness, weight, scale) before any of
//! it is taken, so a bad update never leaves a trace. FedAvg depends on arrival order
//! through f32 rounding of the running sum: about 1e-7 of a value per update, below what
//! any training step or DP noise could tell apart (the agents' own updates are f32). The
//! robust methods sort each coordinate's values, so they do not depend on it at all.
//! Pure: no I/O, no clock.

use std::collections::BTreeMap;

use fedward_shared::config::AggregationMethod;
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::wire::{Reject, RejectCode};

/// Largest number of examples one site may claim for one update (the wire's limit; the
/// weight FedAvg gives it is clamped further by the consortium's config).
pub const MAX_EXAMPLES: u64 = 1 << 29;

/// A round's aggregation in progress, over a fixed set of tensors.
#[derive(Debug)]
pub struct Aggregator {
    method: AggregationMethod,
    shapes: BTreeMap<String, Vec<usize>>,
    /// FedAvg: the weighted running sums, by tensor.
    sums: BTreeMap<String, Vec<f32>>,
    total_weight: f64,
    /// Median and trimmed mean: every update taken, scaled.
    held: Vec<TensorSet>,
    n_updates: usize,
}

impl Aggregator {
    /// Starts an empty aggregation for tensors of these names and shapes.
    pub fn new<'a>(method: AggregationMethod, shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Self {
        let shapes: BTreeMap<String, Vec<usize>> = shapes.into_iter().map(|(n, s)| (n.to_owned(), s.to_vec())).collect();
        let sums = if method.holds_updates() {
            BTreeMap::new()
        } else {
            shapes.iter().map(|(n, s)| (n.clone(), vec![0.0; s.iter().product()])).collect()
        };
        Self { method, shapes, sums, total_weight: 0.0, held: Vec::new(), n_updates: 0 }
    }

    /// Checks that `update` has exactly the expected tensors with the right shapes and
    /// only finite values, that `weight` is a usable example count and `scale` in (0, 1].
    pub fn check(&self, weight: u64, scale: f64, update: &TensorSet) -> Result<(), Reject> {
        if weight == 0 || weight > MAX_EXAMPLES {
            return Err(Reject::new(RejectCode::InvalidWeight, format!("number of examples must be in 1..={MAX_EXAMPLES}, got {weight}")));
        }
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(Reject::new(RejectCode::NonFinite, format!("update scale {scale} is outside (0, 1]")));
        }
        for (name, t) in update.iter() {
            let Some(shape) = self.shapes.get(name) else {
                return Err(Reject::new(RejectCode::UnknownTensor, format!("unknown tensor {name}")));
            };
            if t.shape() != shape.as_slice() {
                return Err(Reject::new(
                    RejectCode::ShapeMismatch,
                    format!("update shape mismatch for {name}: expected {shape:?}, got {:?}", t.shape()),
                ));
            }
            if let Some((first, count)) = t.non_finite() {
                return Err(Reject::new(
                    RejectCode::NonFinite,
                    format!("tensor {name} holds {count} non-finite values (first at index {first})"),
                ));
            }
        }
        if let Some(missing) = self.shapes.keys().find(|n| !update.contains(n)) {
            return Err(Reject::new(RejectCode::MissingTensor, format!("update lacks tensor {missing}")));
        }
        Ok(())
    }

    /// Takes `scale * update` with `weight` after [`check`](Self::check)ing it; on error
    /// nothing is taken. `scale` is how the norm bound shrank the update (1 when it did not).
    pub fn add(&mut self, weight: u64, scale: f64, update: TensorSet) -> Result<(), Reject> {
        self.check(weight, scale, &update)?;
        if self.method.holds_updates() {
            let mut update = update;
            if scale < 1.0 {
                for (_, t) in update.iter_mut() {
                    for x in t.data_mut() {
                        *x = (f64::from(*x) * scale) as f32;
                    }
                }
            }
            self.held.push(update);
        } else {
            let w = weight as f64 * scale;
            for (name, t) in update.iter() {
                // `check` guarantees the name exists.
                if let Some(sum) = self.sums.get_mut(name) {
                    for (s, &x) in sum.iter_mut().zip(t.data()) {
                        *s = (f64::from(*s) + w * f64::from(x)) as f32;
                    }
                }
            }
            self.total_weight += weight as f64;
        }
        self.n_updates += 1;
        Ok(())
    }

    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    /// The combined update, or `None` when nothing was taken.
    pub fn finish(self) -> Option<TensorSet> {
        if self.n_updates == 0 {
            return None;
        }
        let tensor = |shape: Vec<usize>, data: Vec<f32>| {
            // Every buffer here was sized by its shape.
            Tensor::new(shape, data).unwrap_or_else(|_| unreachable!("buffer sized by its shape"))
        };
        match self.method {
            AggregationMethod::FedAvg => {
                let total = self.total_weight;
                let mut out = TensorSet::new();
                for (name, mut sum) in self.sums {
                    // In place: the mean takes no memory beyond the sum's.
                    for s in &mut sum {
                        *s = (f64::from(*s) / total) as f32;
                    }
                    out.insert(name.clone(), tensor(self.shapes[&name].clone(), sum));
                }
                Some(out)
            }
            AggregationMethod::Median => Some(coordinate_wise(&self.shapes, &self.held, tensor, median)),
            AggregationMethod::TrimmedMean { trim_fraction } => {
                Some(coordinate_wise(&self.shapes, &self.held, tensor, |v| trimmed_mean(v, trim_fraction)))
            }
        }
    }
}

/// Applies `combine` to the values of each coordinate across the held updates.
fn coordinate_wise(
    shapes: &BTreeMap<String, Vec<usize>>,
    held: &[TensorSet],
    tensor: impl Fn(Vec<usize>, Vec<f32>) -> Tensor,
    combine: impl Fn(&mut [f32]) -> f32,
) -> TensorSet {
    let mut out = TensorSet::new();
    let mut column = vec![0.0f32; held.len()];
    for (name, shape) in shapes {
        let sources: Vec<&[f32]> = held.iter().filter_map(|u| u.get(name).map(Tensor::data)).collect();
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|i| {
                for (slot, src) in column.iter_mut().zip(&sources) {
                    *slot = src[i];
                }
                combine(&mut column)
            })
            .collect();
        out.insert(name.clone(), tensor(shape.clone(), data));
    }
    out
}

/// The median (the mean of the two middle values for an even count). Values are finite.
fn median(values: &mut [f32]) -> f32 {
    let n = values.len();
    let mid = n / 2;
    let (below, m, _) = values.select_nth_unstable_by(mid, f32::total_cmp);
    let upper = *m;
    if n % 2 == 1 {
        upper
    } else {
        let lower = below.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ((f64::from(lower) + f64::from(upper)) / 2.0) as f32
    }
}

/// The mean after dropping `floor(trim * n)` values at each end (at least one value stays).
fn trimmed_mean(values: &mut [f32], trim: f64) -> f32 {
    values.sort_unstable_by(f32::total_cmp);
    let n = values.len();
    let k = ((trim * n as f64).floor() as usize).min((n - 1) / 2);
    let kept = &values[k..n - k];
    (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(a: [f32; 2], b: f32) -> TensorSet {
        let mut s = TensorSet::new();
        s.insert("w", Tensor::new(vec![2], a.to_vec()).unwrap());
        s.insert("b", Tensor::new(vec![], vec![b]).unwrap());
        s
    }

    fn aggregator(method: AggregationMethod) -> Aggregator {
        Aggregator::new(method, [("w", &[2usize][..]), ("b", &[][..])])
    }

    fn fedavg() -> Aggregator {
        aggregator(AggregationMethod::FedAvg)
    }

    #[test]
    fn matches_a_hand_computed_weighted_mean() {
        let mut agg = fedavg();
        agg.add(100, 1.0, update([1.0, 2.0], 0.5)).unwrap();
        agg.add(300, 1.0, update([3.0, -2.0], 1.5)).unwrap();
        agg.add(600, 1.0, update([0.0, 1.0], -1.0)).unwrap();
        let mean = agg.finish().unwrap();
        // w[0] = (100*1 + 300*3 + 600*0) / 1000 = 1.0
        // w[1] = (100*2 - 300*2 + 600*1) / 1000 = 0.2
        // b    = (50 + 450 - 600) / 1000 = -0.1
        assert_eq!(mean.get("w").unwrap().data(), &[1.0, 0.2]);
        assert_eq!(mean.get("b").unwrap().data(), &[-0.1]);
    }

    #[test]
    fn a_scaled_update_counts_scaled_with_its_full_weight() {
        let mut agg = fedavg();
        agg.add(1, 1.0, update([0.0, 0.0], 0.0)).unwrap();
        // Clipped to a quarter of its size: the mean of 0 and 0.25 * 8 is 1.
        agg.add(1, 0.25, update([8.0, -8.0], 4.0)).unwrap();
        assert_eq!(agg.finish().unwrap(), update([1.0, -1.0], 0.5));
    }

    #[test]
    fn identical_updates_average_to_themselves_in_any_order() {
        let u = update([0.123, -4.5], 7.25);
        for method in [AggregationMethod::FedAvg, AggregationMethod::Median, AggregationMethod::TrimmedMean { trim_fraction: 0.2 }] {
            let mut agg = aggregator(method);
            for w in [3, 17, 1000] {
                agg.add(w, 1.0, u.clone()).unwrap();
            }
            assert_eq!(agg.finish().unwrap(), u, "{method}");
        }

        let (x, y) = (update([0.1, 0.2], 0.3), update([-0.7, 1e-3], 9.0));
        let mut ab = fedavg();
        ab.add(5, 1.0, x.clone()).unwrap();
        ab.add(11, 1.0, y.clone()).unwrap();
        let mut ba = fedavg();
        ba.add(11, 1.0, y).unwrap();
        ba.add(5, 1.0, x).unwrap();
        assert_eq!(ab.finish(), ba.finish());
    }

    #[test]
    fn the_median_ignores_one_outlier_and_claimed_weights() {
        let mut agg = aggregator(AggregationMethod::Median);
        agg.add(1, 1.0, update([1.0, -1.0], 0.0)).unwrap();
        agg.add(1, 1.0, update([2.0, -2.0], 1.0)).unwrap();
        agg.add(MAX_EXAMPLES, 1.0, update([1e9, 1e9], -1e9)).unwrap();
        assert_eq!(agg.finish().unwrap(), update([2.0, -1.0], 0.0));

        let mut even = aggregator(AggregationMethod::Median);
        for v in [4.0, 1.0, 3.0, 2.0] {
            even.add(1, 1.0, update([v, -v], v)).unwrap();
        }
        assert_eq!(even.finish().unwrap(), update([2.5, -2.5], 2.5));
    }

    #[test]
    fn the_trimmed_mean_drops_the_extremes_at_each_end() {
        // Five sites, a fifth trimmed at each end: the lowest and highest go.
        let mut agg = aggregator(AggregationMethod::TrimmedMean { trim_fraction: 0.2 });
        for v in [-1e9, 1.0, 2.0, 6.0, 1e9] {
            agg.add(1, 1.0, update([v, v], v)).unwrap();
        }
        assert_eq!(agg.finish().unwrap(), update([3.0, 3.0], 3.0));
        // Too few sites to trim: the plain mean.
        let mut two = aggregator(AggregationMethod::TrimmedMean { trim_fraction: 0.4 });
        two.add(1, 1.0, update([1.0, 1.0], 1.0)).unwrap();
        two.add(1, 1.0, update([3.0, 3.0], 3.0)).unwrap();
        assert_eq!(two.finish().unwrap(), update([2.0, 2.0], 2.0));
    }

    #[test]
    fn bad_updates_are_refused_and_leave_no_trace() {
        for method in [AggregationMethod::FedAvg, AggregationMethod::Median] {
            let mut agg = aggregator(method);
            agg.add(10, 1.0, update([1.0, 1.0], 1.0)).unwrap();

            let mut nan = update([1.0, f32::NAN], 1.0);
            assert_eq!(agg.add(10, 1.0, nan.clone()).unwrap_err().code, RejectCode::NonFinite);
            nan.insert("w", Tensor::new(vec![2], vec![1.0, f32::INFINITY]).unwrap());
            assert_eq!(agg.add(10, 1.0, nan).unwrap_err().code, RejectCode::NonFinite);

            let mut wrong_shape = update([1.0, 1.0], 1.0);
            wrong_shape.insert("w", Tensor::new(vec![1, 2], vec![5.0, 5.0]).unwrap());
            assert_eq!(agg.add(10, 1.0, wrong_shape).unwrap_err().code, RejectCode::ShapeMismatch);

            let mut unknown = update([1.0, 1.0], 1.0);
            unknown.insert("extra", Tensor::new(vec![1], vec![5.0]).unwrap());
            assert_eq!(agg.add(10, 1.0, unknown).unwrap_err().code, RejectCode::UnknownTensor);

            let mut missing = update([1.0, 1.0], 1.0);
            missing.remove("b");
            assert_eq!(agg.add(10, 1.0, missing).unwrap_err().code, RejectCode::MissingTensor);

            assert_eq!(agg.add(0, 1.0, update([9.0, 9.0], 9.0)).unwrap_err().code, RejectCode::InvalidWeight);
            assert!(agg.add(10, f64::NAN, update([9.0, 9.0], 9.0)).is_err());
            assert!(agg.add(10, 2.0, update([9.0, 9.0], 9.0)).is_err());

            assert_eq!(agg.n_updates(), 1);
            assert_eq!(agg.finish().unwrap(), update([1.0, 1.0], 1.0), "{method}");
        }
    }

    #[test]
    fn empty_aggregation_has_no_result() {
        assert!(fedavg().finish().is_none());
        assert!(aggregator(AggregationMethod::Median).finish().is_none());
    }
}
