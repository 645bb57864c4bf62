//! Combining a round's updates: norm-bounded FedAvg (a streaming weighted mean) and the
//! robust coordinate-wise median and trimmed mean.
//!
//! FedAvg keeps one f32 running sum per trainable value, whatever the number of sites:
//! each update adds `weight * scale * value` computed in f64 and rounded once to f32, so
//! the sum's memory is the trainable tensors' own. The median and the trimmed mean hold
//! every update of the round (f32, already scaled to the norm bound) until it closes:
//! memory O(sites x trainable values); they give every site one vote, so a site's claimed
//! number of examples buys it nothing.
//!
//! An update is checked in full before any of it is taken, so a bad update never leaves a
//! trace: [`Layout::check`] makes one read-only pass per tensor that yields the squared L2
//! norm the norm bound needs and, through it, finiteness (a NaN or an infinity makes the
//! f64 sum of squares non-finite, and no finite f32 can overflow it), then the fold makes
//! one pass that adds the scaled values. The norm bound's scale is known only once the
//! whole update has been read, which is why an update is received whole before it is
//! folded (its buffer is bounded by the coordinator's upload slots, not by the number of
//! sites): folding as the bytes arrive would fold a lying site's first half before its
//! NaN, or an over-bound update before its norm is known, and f32 sums cannot be backed
//! out exactly.
//!
//! Accuracy: each fold rounds every sum once, to half an f32 ulp of the partial sum, so
//! after `n` updates a value of the sum is off by at most `n / 2` ulps of the largest
//! partial sum it passed through (tested against an f64 reference on adversarial inputs
//! below). At the 2-100 sites of a consortium that is at or below the rounding of the new
//! f32 global model itself (`global + mean`), so a compensated sum would change nothing a
//! model could show; its compensation term would cost another copy of the trainable
//! tensors (what an f64 sum cost), which the memory bound (3x the model) has no room for
//! beside the update being received. FedAvg depends on arrival order only through this
//! rounding; the robust methods sort each coordinate's values and do not depend on it.
//!
//! [`FoldJob`] carries one update's check and fold to wherever the shell runs it (a
//! blocking thread, off the event loop); the sums sit behind a mutex the round machine
//! shares with the job, so folds of different sites serialise on it. Pure: no I/O, no
//! clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedward_shared::config::{AggregationMethod, OverNorm};
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::wire::{Reject, RejectCode};

/// Largest number of examples one site may claim for one update (the wire's limit; the
/// weight FedAvg gives it is clamped further by the consortium's config).
pub const MAX_EXAMPLES: u64 = 1 << 29;

/// The tensors a round aggregates: names and shapes, shared by the aggregator and the
/// fold jobs that check updates against it off the event loop.
#[derive(Clone, Debug)]
pub struct Layout(Arc<BTreeMap<String, Vec<usize>>>);

/// An update that passed [`Layout::check`]: the expected tensors, finite, with its norm.
#[derive(Debug)]
pub struct Checked {
    layout: Layout,
    update: TensorSet,
    weight: u64,
    norm: f64,
}

impl Checked {
    /// The update's L2 norm as it arrived (before any scaling).
    pub fn norm(&self) -> f64 {
        self.norm
    }
}

impl Layout {
    pub fn new<'a>(shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Self {
        Self(Arc::new(shapes.into_iter().map(|(n, s)| (n.to_owned(), s.to_vec())).collect()))
    }

    /// Checks that `update` has exactly the expected tensors with the right shapes and
    /// only finite values, and that `weight` is a usable example count; measures its norm
    /// in the same pass.
    pub fn check(&self, weight: u64, update: TensorSet) -> Result<Checked, Reject> {
        if weight == 0 || weight > MAX_EXAMPLES {
            return Err(Reject::new(RejectCode::InvalidWeight, format!("number of examples must be in 1..={MAX_EXAMPLES}, got {weight}")));
        }
        let mut norm_sq = 0.0f64;
        for (name, t) in update.iter() {
            let Some(shape) = self.0.get(name) else {
                return Err(Reject::new(RejectCode::UnknownTensor, format!("unknown tensor {name}")));
            };
            if t.shape() != shape.as_slice() {
                return Err(Reject::new(
                    RejectCode::ShapeMismatch,
                    format!("update shape mismatch for {name}: expected {shape:?}, got {:?}", t.shape()),
                ));
            }
            let sq = sum_of_squares(t.data());
            if !sq.is_finite() {
                // The slow path, for the message only: bad input is rare.
                let (first, count) = t.non_finite().unwrap_or((0, 0));
                return Err(Reject::new(
                    RejectCode::NonFinite,
                    format!("tensor {name} holds {count} non-finite values (first at index {first})"),
                ));
            }
            norm_sq += sq;
        }
        if let Some(missing) = self.0.keys().find(|n| !update.contains(n)) {
            return Err(Reject::new(RejectCode::MissingTensor, format!("update lacks tensor {missing}")));
        }
        Ok(Checked { layout: self.clone(), update, weight, norm: norm_sq.sqrt() })
    }

    fn same(&self, other: &Layout) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The sum of squares of `values` in f64: non-finite exactly when a value is (the square
/// of the largest f32 is about 1.2e77, so no finite input overflows it). Eight
/// independent accumulators, so the compiler vectorises the loop.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = f64::from(v);
            *a += v * v;
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Adds `factor * x` to `sum`, computed in f64 and rounded once to f32: one pass, written
/// so the compiler vectorises it.
pub fn fold_into(sum: &mut [f32], x: &[f32], factor: f64) {
    debug_assert_eq!(sum.len(), x.len());
    for (s, &v) in sum.iter_mut().zip(x) {
        *s = (f64::from(*s) + factor * f64::from(v)) as f32;
    }
}

/// How an update of L2 norm `norm` is taken under the bound: the factor it is scaled by
/// (1 within the bound), or a refusal. f32 rounding of an update clipped exactly to the
/// bound is allowed for.
pub fn bound_scale(norm: f64, bound: f64, over: OverNorm) -> Result<f64, Reject> {
    if !norm.is_finite() {
        return Err(Reject::new(RejectCode::NonFinite, "the update's norm is not finite"));
    }
    if norm <= bound * (1.0 + 1e-4) {
        return Ok(1.0);
    }
    match over {
        OverNorm::Clip => Ok(bound / norm),
        OverNorm::Refuse => {
            Err(Reject::new(RejectCode::NormTooLarge, format!("update norm {norm:.4} exceeds the consortium's bound {bound}")))
        }
    }
}

/// What a fold took: the update's norm as it arrived and the factor the bound scaled it by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Folded {
    pub update_norm: f64,
    pub scale: f64,
}

/// One update's check, bound and fold, to run wherever the shell likes (a blocking
/// thread); the round machine learns the outcome through `RoundMachine::handle_folded`.
#[derive(Debug)]
pub struct FoldJob {
    agg: Arc<Mutex<Aggregator>>,
    layout: Layout,
    weight: u64,
    bound: f64,
    over: OverNorm,
    update: TensorSet,
    /// The final scoring round of model selection: the header (its score) is all there
    /// is, nothing is folded.
    score_only: bool,
}

impl FoldJob {
    /// A job for `agg`, whose layout is `layout` (passed in so that making a job never
    /// waits for the lock a running fold holds).
    pub fn new(agg: Arc<Mutex<Aggregator>>, layout: Layout, weight: u64, bound: f64, over: OverNorm, update: TensorSet) -> Self {
        Self { agg, layout, weight, bound, over, update, score_only: false }
    }

    /// The job of an update that carries only a score (model selection's final round):
    /// it takes nothing.
    pub fn score_only(agg: Arc<Mutex<Aggregator>>, layout: Layout) -> Self {
        Self { agg, layout, weight: 0, bound: 0.0, over: OverNorm::Refuse, update: TensorSet::default(), score_only: true }
    }

    /// Checks the update (outside the lock: other sites' folds go on), bounds it and
    /// folds it; on error nothing was taken.
    pub fn run(self) -> Result<Folded, Reject> {
        self.run_returning().0
    }

    /// [`run`](Self::run), handing back the update's buffers when a running sum took it
    /// (to be released or reused by the caller, outside the fold).
    pub fn run_returning(self) -> (Result<Folded, Reject>, Option<TensorSet>) {
        if self.score_only {
            return (Ok(Folded { update_norm: 0.0, scale: 1.0 }), None);
        }
        let checked = match self.layout.check(self.weight, self.update) {
            Ok(c) => c,
            Err(r) => return (Err(r), None),
        };
        let update_norm = checked.norm();
        let scale = match bound_scale(update_norm, self.bound, self.over) {
            Ok(s) => s,
            Err(r) => return (Err(r), Some(checked.update)),
        };
        match lock(&self.agg).add(checked, scale) {
            Ok(spent) => (Ok(Folded { update_norm, scale }), spent),
            Err(r) => (Err(r), None),
        }
    }
}

fn lock(agg: &Mutex<Aggregator>) -> std::sync::MutexGuard<'_, Aggregator> {
    // A fold cannot panic halfway (its checks come first), so a poisoned lock's sums are whole.
    agg.lock().unwrap_or_else(|p| p.into_inner())
}

/// A round's aggregation in progress, over a fixed set of tensors.
#[derive(Debug)]
pub struct Aggregator {
    method: AggregationMethod,
    layout: Layout,
    /// FedAvg: the weighted running sums, by tensor.
    sums: BTreeMap<String, Vec<f32>>,
    total_weight: f64,
    /// Median and trimmed mean: every update taken, scaled.
    held: Vec<TensorSet>,
    n_updates: usize,
    /// Cleared when the result is taken: a late fold is refused, not lost in a spent sum.
    open: bool,
}

impl Aggregator {
    /// Starts an empty aggregation for tensors of these names and shapes.
    pub fn new<'a>(method: AggregationMethod, shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> Self {
        Self::with_layout(method, Layout::new(shapes))
    }

    pub fn with_layout(method: AggregationMethod, layout: Layout) -> Self {
        let sums = if method.holds_updates() {
            BTreeMap::new()
        } else {
            layout.0.iter().map(|(n, s)| (n.clone(), vec![0.0; s.iter().product()])).collect()
        };
        Self { method, layout, sums, total_weight: 0.0, held: Vec::new(), n_updates: 0, open: true }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Takes `scale * update` with its weight; `scale` is how the norm bound shrank the
    /// update (1 when it did not). On error nothing is taken. A running sum hands the
    /// update's buffers back once folded; a method that holds updates keeps them.
    pub fn add(&mut self, checked: Checked, scale: f64) -> Result<Option<TensorSet>, Reject> {
        if !self.open {
            return Err(Reject::new(RejectCode::StaleRound, "the round closed before the update was folded"));
        }
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(Reject::new(RejectCode::NonFinite, format!("update scale {scale} is outside (0, 1]")));
        }
        // Checked against another round's layout: check again against this one.
        let checked = if checked.layout.same(&self.layout) { checked } else { self.layout.check(checked.weight, checked.update)? };
        let Checked { update, weight, .. } = checked;
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
            self.n_updates += 1;
            Ok(None)
        } else {
            let factor = weight as f64 * scale;
            for (name, t) in update.iter() {
                // `check` guarantees the name exists.
                if let Some(sum) = self.sums.get_mut(name) {
                    fold_into(sum, t.data(), factor);
                }
            }
            self.total_weight += weight as f64;
            self.n_updates += 1;
            Ok(Some(update))
        }
    }

    /// Checks and takes an update in one call (what [`FoldJob::run`] does without a bound).
    pub fn check_and_add(&mut self, weight: u64, scale: f64, update: TensorSet) -> Result<(), Reject> {
        let checked = self.layout.check(weight, update)?;
        self.add(checked, scale).map(drop)
    }

    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    /// Moves the aggregation out, leaving a closed, empty one that refuses later folds
    /// (and allocates nothing).
    pub fn take(&mut self) -> Aggregator {
        let closed = Aggregator {
            method: self.method,
            layout: self.layout.clone(),
            sums: BTreeMap::new(),
            total_weight: 0.0,
            held: Vec::new(),
            n_updates: 0,
            open: false,
        };
        std::mem::replace(self, closed)
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
                    out.insert(name.clone(), tensor(self.layout.0[&name].clone(), sum));
                }
                Some(out)
            }
            AggregationMethod::Median => Some(coordinate_wise(&self.layout.0, &self.held, tensor, median)),
            AggregationMethod::TrimmedMean { trim_fraction } => {
                Some(coordinate_wise(&self.layout.0, &self.held, tensor, |v| trimmed_mean(v, trim_fraction)))
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
        agg.check_and_add(100, 1.0, update([1.0, 2.0], 0.5)).unwrap();
        agg.check_and_add(300, 1.0, update([3.0, -2.0], 1.5)).unwrap();
        agg.check_and_add(600, 1.0, update([0.0, 1.0], -1.0)).unwrap();
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
        agg.check_and_add(1, 1.0, update([0.0, 0.0], 0.0)).unwrap();
        // Clipped to a quarter of its size: the mean of 0 and 0.25 * 8 is 1.
        agg.check_and_add(1, 0.25, update([8.0, -8.0], 4.0)).unwrap();
        assert_eq!(agg.finish().unwrap(), update([1.0, -1.0], 0.5));
    }

    #[test]
    fn identical_updates_average_to_themselves_in_any_order() {
        let u = update([0.123, -4.5], 7.25);
        for method in [AggregationMethod::FedAvg, AggregationMethod::Median, AggregationMethod::TrimmedMean { trim_fraction: 0.2 }] {
            let mut agg = aggregator(method);
            for w in [3, 17, 1000] {
                agg.check_and_add(w, 1.0, u.clone()).unwrap();
            }
            assert_eq!(agg.finish().unwrap(), u, "{method}");
        }

        let (x, y) = (update([0.1, 0.2], 0.3), update([-0.7, 1e-3], 9.0));
        let mut ab = fedavg();
        ab.check_and_add(5, 1.0, x.clone()).unwrap();
        ab.check_and_add(11, 1.0, y.clone()).unwrap();
        let mut ba = fedavg();
        ba.check_and_add(11, 1.0, y).unwrap();
        ba.check_and_add(5, 1.0, x).unwrap();
        assert_eq!(ab.finish(), ba.finish());
    }

    #[test]
    fn the_median_ignores_one_outlier_and_claimed_weights() {
        let mut agg = aggregator(AggregationMethod::Median);
        agg.check_and_add(1, 1.0, update([1.0, -1.0], 0.0)).unwrap();
        agg.check_and_add(1, 1.0, update([2.0, -2.0], 1.0)).unwrap();
        agg.check_and_add(MAX_EXAMPLES, 1.0, update([1e9, 1e9], -1e9)).unwrap();
        assert_eq!(agg.finish().unwrap(), update([2.0, -1.0], 0.0));

        let mut even = aggregator(AggregationMethod::Median);
        for v in [4.0, 1.0, 3.0, 2.0] {
            even.check_and_add(1, 1.0, update([v, -v], v)).unwrap();
        }
        assert_eq!(even.finish().unwrap(), update([2.5, -2.5], 2.5));
    }

    #[test]
    fn the_trimmed_mean_drops_the_extremes_at_each_end() {
        // Five sites, a fifth trimmed at each end: the lowest and highest go.
        let mut agg = aggregator(AggregationMethod::TrimmedMean { trim_fraction: 0.2 });
        for v in [-1e9, 1.0, 2.0, 6.0, 1e9] {
            agg.check_and_add(1, 1.0, update([v, v], v)).unwrap();
        }
        assert_eq!(agg.finish().unwrap(), update([3.0, 3.0], 3.0));
        // Too few sites to trim: the plain mean.
        let mut two = aggregator(AggregationMethod::TrimmedMean { trim_fraction: 0.4 });
        two.check_and_add(1, 1.0, update([1.0, 1.0], 1.0)).unwrap();
        two.check_and_add(1, 1.0, update([3.0, 3.0], 3.0)).unwrap();
        assert_eq!(two.finish().unwrap(), update([2.0, 2.0], 2.0));
    }

    #[test]
    fn bad_updates_are_refused_and_leave_no_trace() {
        for method in [AggregationMethod::FedAvg, AggregationMethod::Median] {
            let mut agg = aggregator(method);
            agg.check_and_add(10, 1.0, update([1.0, 1.0], 1.0)).unwrap();

            let mut nan = update([1.0, f32::NAN], 1.0);
            assert_eq!(agg.check_and_add(10, 1.0, nan.clone()).unwrap_err().code, RejectCode::NonFinite);
            nan.insert("w", Tensor::new(vec![2], vec![1.0, f32::INFINITY]).unwrap());
            assert_eq!(agg.check_and_add(10, 1.0, nan).unwrap_err().code, RejectCode::NonFinite);

            let mut wrong_shape = update([1.0, 1.0], 1.0);
            wrong_shape.insert("w", Tensor::new(vec![1, 2], vec![5.0, 5.0]).unwrap());
            assert_eq!(agg.check_and_add(10, 1.0, wrong_shape).unwrap_err().code, RejectCode::ShapeMismatch);

            let mut unknown = update([1.0, 1.0], 1.0);
            unknown.insert("extra", Tensor::new(vec![1], vec![5.0]).unwrap());
            assert_eq!(agg.check_and_add(10, 1.0, unknown).unwrap_err().code, RejectCode::UnknownTensor);

            let mut missing = update([1.0, 1.0], 1.0);
            missing.remove("b");
            assert_eq!(agg.check_and_add(10, 1.0, missing).unwrap_err().code, RejectCode::MissingTensor);

            assert_eq!(agg.check_and_add(0, 1.0, update([9.0, 9.0], 9.0)).unwrap_err().code, RejectCode::InvalidWeight);
            assert!(agg.check_and_add(10, f64::NAN, update([9.0, 9.0], 9.0)).is_err());
            assert!(agg.check_and_add(10, 2.0, update([9.0, 9.0], 9.0)).is_err());

            assert_eq!(agg.n_updates(), 1);
            assert_eq!(agg.finish().unwrap(), update([1.0, 1.0], 1.0), "{method}");
        }
    }

    #[test]
    fn empty_aggregation_has_no_result() {
        assert!(fedavg().finish().is_none());
        assert!(aggregator(AggregationMethod::Median).finish().is_none());
    }

    fn job_for(agg: &Arc<Mutex<Aggregator>>, weight: u64, bound: f64, over: OverNorm, update: TensorSet) -> FoldJob {
        let layout = lock(agg).layout().clone();
        FoldJob::new(agg.clone(), layout, weight, bound, over, update)
    }

    /// The sum in f64, the reference the f32 sum is held to.
    fn reference_mean(updates: &[(u64, f64, Vec<f32>)]) -> Vec<f64> {
        let n = updates[0].2.len();
        let total: f64 = updates.iter().map(|(w, _, _)| *w as f64).sum();
        (0..n).map(|i| updates.iter().map(|(w, s, x)| *w as f64 * s * f64::from(x[i])).sum::<f64>() / total).collect()
    }

    #[test]
    fn the_f32_sum_stays_within_its_bound_of_an_f64_reference_on_adversarial_inputs() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let len = 257; // not a multiple of the kernels' lanes
                       // 100 sites: a few huge values that cancel, many tiny ones, mixed signs and
                       // weights, some clipped; the worst case for a running sum's rounding.
        let mut updates: Vec<(u64, f64, Vec<f32>)> = Vec::new();
        for site in 0..100u64 {
            let big = site.is_multiple_of(10);
            let x: Vec<f32> = (0..len)
                .map(|i| {
                    let sign = if (i + site as usize).is_multiple_of(2) { 1.0 } else { -1.0 };
                    if big {
                        sign * rng.random_range(1e3f32..1e4)
                    } else {
                        sign * rng.random_range(1e-6f32..1e-2)
                    }
                })
                .collect();
            let weight = rng.random_range(1..=1000u64);
            let scale = if site.is_multiple_of(7) { 0.5 } else { 1.0 };
            updates.push((weight, scale, x));
        }
        let layout = [("w", &[len][..])];
        let mut agg = Aggregator::new(AggregationMethod::FedAvg, layout);
        // The largest partial sum any coordinate passes through (in f64), for the bound.
        let mut running = vec![0.0f64; len];
        let mut largest = vec![0.0f64; len];
        for (w, s, x) in &updates {
            let mut t = TensorSet::new();
            t.insert("w", Tensor::new(vec![len], x.clone()).unwrap());
            agg.check_and_add(*w, *s, t).unwrap();
            for i in 0..len {
                running[i] += *w as f64 * s * f64::from(x[i]);
                largest[i] = largest[i].max(running[i].abs());
            }
        }
        let total: f64 = updates.iter().map(|(w, _, _)| *w as f64).sum();
        let got = agg.finish().unwrap();
        let want = reference_mean(&updates);
        let n = updates.len() as f64;
        for (i, (&g, &r)) in got.get("w").unwrap().data().iter().zip(&want).enumerate() {
            // n roundings of at most half an ulp of the largest partial sum, then the
            // division's own rounding (half an ulp of the result).
            let ulp = |v: f64| f64::from(f32::EPSILON) * v.abs().max(f64::from(f32::MIN_POSITIVE));
            let bound = n * 0.5 * ulp(largest[i]) / total + 0.5 * ulp(r) + 1e-30;
            assert!((f64::from(g) - r).abs() <= bound, "coordinate {i}: {g} vs {r}, bound {bound}");
        }
    }

    #[test]
    fn the_kernels_agree_with_plain_loops() {
        let x: Vec<f32> = (0..1003).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let plain: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((sum_of_squares(&x) - plain).abs() <= 1e-12 * plain);
        let mut bad = x.clone();
        bad[1001] = f32::NAN;
        assert!(!sum_of_squares(&bad).is_finite());
        bad[1001] = f32::INFINITY;
        assert!(!sum_of_squares(&bad).is_finite());
        assert!(sum_of_squares(&[f32::MAX; 9]).is_finite());

        let mut sum: Vec<f32> = (0..1003).map(|i| i as f32 * 0.5).collect();
        let want: Vec<f32> = sum.iter().zip(&x).map(|(&s, &v)| (f64::from(s) + 3.0 * f64::from(v)) as f32).collect();
        fold_into(&mut sum, &x, 3.0);
        assert_eq!(sum, want);
    }

    #[test]
    fn a_refused_update_leaves_the_sum_bit_for_bit_untouched() {
        let len = 1000;
        let layout = [("w", &[len][..]), ("b", &[][..])];
        let good = |v: f32| {
            let mut t = TensorSet::new();
            t.insert("w", Tensor::new(vec![len], (0..len).map(|i| v + i as f32 * 1e-3).collect()).unwrap());
            t.insert("b", Tensor::new(vec![], vec![v]).unwrap());
            t
        };
        let agg = Arc::new(Mutex::new(Aggregator::new(AggregationMethod::FedAvg, layout)));
        job_for(&agg, 3, 1e9, OverNorm::Refuse, good(0.25)).run().unwrap();
        let before = lock(&agg).sums.clone();

        // A NaN in the last value of the last tensor, after everything else was fine.
        let mut late_nan = good(1.0);
        late_nan.get_mut("w").unwrap().data_mut()[len - 1] = f32::NAN;
        // Over the bound under `refuse`.
        let huge = good(1e6);
        // Half an update: the second tensor missing.
        let mut half = good(1.0);
        half.remove("w");
        for bad in [late_nan, huge, half] {
            let job = job_for(&agg, 3, 1e5, OverNorm::Refuse, bad);
            assert!(job.run().is_err());
            let now = lock(&agg);
            for (name, sum) in &now.sums {
                let (a, b): (Vec<u32>, Vec<u32>) =
                    (sum.iter().map(|v| v.to_bits()).collect(), before[name].iter().map(|v| v.to_bits()).collect());
                assert_eq!(a, b, "{name}");
            }
            assert_eq!((now.n_updates, now.total_weight), (1, 3.0));
        }

        // One bad site does not spoil the round: the next good one is folded.
        let folded = job_for(&agg, 1, 1e9, OverNorm::Refuse, good(0.5)).run().unwrap();
        assert_eq!(folded.scale, 1.0);
        let mean = lock(&agg).take().finish().unwrap();
        assert_eq!(mean.get("b").unwrap().data(), &[(3.0 * 0.25 + 0.5) / 4.0]);
    }

    #[test]
    fn a_fold_after_the_result_was_taken_is_refused() {
        let agg = Arc::new(Mutex::new(fedavg()));
        let job = job_for(&agg, 1, 1e9, OverNorm::Clip, update([1.0, 1.0], 1.0));
        assert!(lock(&agg).take().finish().is_none());
        assert_eq!(job.run().unwrap_err().code, RejectCode::StaleRound);
    }

    #[test]
    fn a_clipped_fold_reports_its_norm_and_scale() {
        let agg = Arc::new(Mutex::new(fedavg()));
        // Norm 5 (3, 4, 0) under a bound of 2.5: halved.
        let folded = job_for(&agg, 1, 2.5, OverNorm::Clip, update([3.0, 4.0], 0.0)).run().unwrap();
        assert_eq!(folded, Folded { update_norm: 5.0, scale: 0.5 });
        assert_eq!(lock(&agg).take().finish().unwrap(), update([1.5, 2.0], 0.0));
    }
}
