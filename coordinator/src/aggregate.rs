//! Streaming FedAvg: the example-weighted mean of site updates, one update at a time.
//!
//! Memory is one f64 running sum per trainable value, whatever the number of sites.
//! Each update is checked in full (names, shapes, finiteness, weight) before any of it is
//! added, so a bad update never leaves a trace in the sum. Products of an f32 value and a
//! weight below 2^29 are exact in f64, so the result depends on arrival order only through
//! f64 rounding, far below what survives the final cast to f32. Pure: no I/O, no clock.

use std::collections::BTreeMap;

use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::wire::{Reject, RejectCode};

/// Largest number of examples one site may claim for one update.
pub const MAX_EXAMPLES: u64 = 1 << 29;

/// A running example-weighted sum over updates with a fixed set of tensors.
#[derive(Debug)]
pub struct FedAvg {
    sums: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    total_weight: u64,
    n_updates: usize,
}

impl FedAvg {
    /// Starts an empty sum for tensors of these names and shapes.
    pub fn new<'a>(shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Self {
        let sums = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                (name.to_owned(), (shape.to_vec(), vec![0.0; n]))
            })
            .collect();
        Self { sums, total_weight: 0, n_updates: 0 }
    }

    /// Checks that `update` has exactly the expected tensors with the right shapes and
    /// only finite values, and that `weight` is a usable example count.
    pub fn check(&self, weight: u64, update: &TensorSet) -> Result<(), Reject> {
        if weight == 0 || weight > MAX_EXAMPLES {
            return Err(Reject::new(RejectCode::InvalidWeight, format!("number of examples must be in 1..={MAX_EXAMPLES}, got {weight}")));
        }
        for (name, t) in update.iter() {
            let Some((shape, _)) = self.sums.get(name) else {
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
        if let Some(missing) = self.sums.keys().find(|n| !update.contains(n)) {
            return Err(Reject::new(RejectCode::MissingTensor, format!("update lacks tensor {missing}")));
        }
        Ok(())
    }

    /// Adds `weight * update` after [`check`](Self::check)ing it; on error nothing is added.
    pub fn add(&mut self, weight: u64, update: &TensorSet) -> Result<(), Reject> {
        self.check(weight, update)?;
        let w = weight as f64;
        for (name, t) in update.iter() {
            // `check` guarantees the name exists.
            if let Some((_, sum)) = self.sums.get_mut(name) {
                for (s, &x) in sum.iter_mut().zip(t.data()) {
                    *s += w * f64::from(x);
                }
            }
        }
        self.total_weight += weight;
        self.n_updates += 1;
        Ok(())
    }

    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// The weighted mean, or `None` when nothing was added.
    pub fn finish(self) -> Option<TensorSet> {
        if self.total_weight == 0 {
            return None;
        }
        let total = self.total_weight as f64;
        Some(
            self.sums
                .into_iter()
                .map(|(name, (shape, sum))| {
                    let data = sum.into_iter().map(|s| (s / total) as f32).collect();
                    // The sum was built for this shape, so the sizes agree.
                    let t = Tensor::new(shape, data).unwrap_or_else(|_| unreachable!("sum sized by its shape"));
                    (name, t)
                })
                .collect(),
        )
    }
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

    fn fedavg() -> FedAvg {
        FedAvg::new([("w", &[2usize][..]), ("b", &[][..])])
    }

    #[test]
    fn matches_a_hand_computed_weighted_mean() {
        let mut agg = fedavg();
        agg.add(100, &update([1.0, 2.0], 0.5)).unwrap();
        agg.add(300, &update([3.0, -2.0], 1.5)).unwrap();
        agg.add(600, &update([0.0, 1.0], -1.0)).unwrap();
        let mean = agg.finish().unwrap();
        // w[0] = (100*1 + 300*3 + 600*0) / 1000 = 1.0
        // w[1] = (100*2 - 300*2 + 600*1) / 1000 = 0.2
        // b    = (50 + 450 - 600) / 1000 = -0.1
        assert_eq!(mean.get("w").unwrap().data(), &[1.0, 0.2]);
        assert_eq!(mean.get("b").unwrap().data(), &[-0.1]);
    }

    #[test]
    fn identical_updates_average_to_themselves_in_any_order() {
        let u = update([0.123, -4.5], 7.25);
        let mut agg = fedavg();
        for w in [3, 17, 1000] {
            agg.add(w, &u).unwrap();
        }
        assert_eq!(agg.finish().unwrap(), u);

        let (x, y) = (update([0.1, 0.2], 0.3), update([-0.7, 1e-3], 9.0));
        let mut ab = fedavg();
        ab.add(5, &x).unwrap();
        ab.add(11, &y).unwrap();
        let mut ba = fedavg();
        ba.add(11, &y).unwrap();
        ba.add(5, &x).unwrap();
        assert_eq!(ab.finish(), ba.finish());
    }

    #[test]
    fn bad_updates_are_refused_and_leave_no_trace() {
        let mut agg = fedavg();
        agg.add(10, &update([1.0, 1.0], 1.0)).unwrap();

        let mut nan = update([1.0, f32::NAN], 1.0);
        assert_eq!(agg.add(10, &nan).unwrap_err().code, RejectCode::NonFinite);
        nan.insert("w", Tensor::new(vec![2], vec![1.0, f32::INFINITY]).unwrap());
        assert_eq!(agg.add(10, &nan).unwrap_err().code, RejectCode::NonFinite);

        let mut wrong_shape = update([1.0, 1.0], 1.0);
        wrong_shape.insert("w", Tensor::new(vec![1, 2], vec![5.0, 5.0]).unwrap());
        assert_eq!(agg.add(10, &wrong_shape).unwrap_err().code, RejectCode::ShapeMismatch);

        let mut unknown = update([1.0, 1.0], 1.0);
        unknown.insert("extra", Tensor::new(vec![1], vec![5.0]).unwrap());
        assert_eq!(agg.add(10, &unknown).unwrap_err().code, RejectCode::UnknownTensor);

        let mut missing = update([1.0, 1.0], 1.0);
        missing.remove("b");
        assert_eq!(agg.add(10, &missing).unwrap_err().code, RejectCode::MissingTensor);

        assert_eq!(agg.add(0, &update([9.0, 9.0], 9.0)).unwrap_err().code, RejectCode::InvalidWeight);

        assert_eq!(agg.n_updates(), 1);
        assert_eq!(agg.finish().unwrap(), update([1.0, 1.0], 1.0));
    }

    #[test]
    fn empty_sum_has_no_mean() {
        assert!(fedavg().finish().is_none());
    }
}
