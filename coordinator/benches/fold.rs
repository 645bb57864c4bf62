//! Bench (not a test): how fast the coordinator checks and folds one 22.7M-parameter
//! update (all-MiniLM-L6-v2's shapes, 101 tensors) into the FedAvg sum, against a memcpy
//! of the same bytes into a preallocated buffer in the same run. `scripts/bench.sh fold`
//! runs it; prints a table and writes JSON to `--out`.
//!
//! Measured, interleaved, `--reps` times each (the best and the median are printed):
//! - `memcpy`: the update's values copied into a buffer of the same size;
//! - `check+fold`: what a fold job does ([`FoldJob::run_returning`]): names, shapes,
//!   finiteness and norm in one read-only pass, then the fold in one pass;
//! - `job`: the same job with the release of the update's buffers (about 5 ms of munmap
//!   for 91 MB) inside the clock, as the coordinator runs it;
//! - `check` and `fold`: the two passes of `check+fold` alone (the check's
//!   [`sum_of_squares`], which finiteness rides on, and [`fold_into`]);
//! - `before`: the path before this bench existed, rebuilt from the same kernels' old
//!   shape: the norm (`TensorSet::l2_norm`), a separate finiteness scan
//!   (`Tensor::non_finite`), then the same fold.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use rand::SeedableRng;

use fedward_coordinator::aggregate::{fold_into, sum_of_squares, Aggregator, FoldJob, Layout};
use fedward_shared::config::{AggregationMethod, OverNorm};
use fedward_shared::tensor::TensorSet;

fn secs(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let out: Option<PathBuf> = arg("--out").map(PathBuf::from);
    let reps: usize = arg("--reps").map_or(Ok(7), |r| r.parse())?;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    // Deltas of a realistic size: the model's values, scaled down.
    let mut update = support::minilm_shaped_model(&mut rng);
    for (_, t) in update.iter_mut() {
        for v in t.data_mut() {
            *v *= 1e-3;
        }
    }
    let bytes = update.byte_len();
    let shapes: Vec<(String, Vec<usize>)> = update.iter().map(|(n, t)| (n.to_owned(), t.shape().to_vec())).collect();
    let layout = Layout::new(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())));
    let agg = Arc::new(Mutex::new(Aggregator::with_layout(AggregationMethod::FedAvg, layout.clone())));
    let mut before_sums: TensorSet = update.clone();
    let mut copy: TensorSet = update.clone();

    let (mut memcpy, mut fused, mut before) = (Vec::new(), Vec::new(), Vec::new());
    let (mut check, mut fold, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let mut fold_sums: TensorSet = update.clone();
    for _ in 0..reps {
        memcpy.push(secs(|| {
            for ((_, dst), (_, src)) in copy.iter_mut().zip(update.iter()) {
                dst.data_mut().copy_from_slice(src.data());
            }
        }));

        // The job consumes its update: the copy is made before the clock starts.
        let job = FoldJob::new(agg.clone(), layout.clone(), 1000, 1e12, OverNorm::Clip, update.clone());
        // The update's buffers are released after the clock stops (as memcpy's are
        // never released); `job` times the whole job, release included.
        let mut spent = None;
        fused.push(secs(|| {
            let (folded, buffers) = job.run_returning();
            folded.expect("a finite update within the bound");
            spent = buffers;
        }));
        drop(spent);
        let job = FoldJob::new(agg.clone(), layout.clone(), 1000, 1e12, OverNorm::Clip, update.clone());
        whole.push(secs(|| {
            job.run().expect("a finite update within the bound");
        }));

        check.push(secs(|| {
            let sq: f64 = update.iter().map(|(_, t)| sum_of_squares(t.data())).sum();
            assert!(sq.is_finite());
        }));
        fold.push(secs(|| {
            for ((_, sum), (_, t)) in fold_sums.iter_mut().zip(update.iter()) {
                fold_into(sum.data_mut(), t.data(), 1000.0);
            }
        }));

        before.push(secs(|| {
            let norm = update.l2_norm();
            assert!(norm.is_finite());
            for (_, t) in update.iter() {
                assert!(t.non_finite().is_none());
            }
            for ((_, sum), (_, t)) in before_sums.iter_mut().zip(update.iter()) {
                fold_into(sum.data_mut(), t.data(), 1000.0);
            }
        }));
    }
    std::hint::black_box((&copy, &before_sums, &fold_sums));

    let gbps = |s: f64| bytes as f64 / s / 1e9;
    let (memcpy_best, memcpy_median) = stats(memcpy);
    let (fused_best, fused_median) = stats(fused);
    let (before_best, before_median) = stats(before);
    let (check_best, check_median) = stats(check);
    let (fold_best, fold_median) = stats(fold);
    let (whole_best, whole_median) = stats(whole);
    println!("update: {} values, {:.1} MB; {reps} runs each, interleaved", bytes / 4, bytes as f64 / 1e6);
    println!("{:<12} {:>12} {:>12} {:>14}", "", "best GB/s", "median GB/s", "median/memcpy");
    for (name, best, median) in [
        ("memcpy", memcpy_best, memcpy_median),
        ("check+fold", fused_best, fused_median),
        ("  check", check_best, check_median),
        ("  fold", fold_best, fold_median),
        ("job", whole_best, whole_median),
        ("before", before_best, before_median),
    ] {
        println!("{name:<12} {:>12.2} {:>12.2} {:>14.2}", gbps(best), gbps(median), memcpy_median / median);
    }
    if let Some(out) = out {
        let json = serde_json::json!({
            "update_bytes": bytes, "reps": reps,
            "memcpy_gbps": { "best": gbps(memcpy_best), "median": gbps(memcpy_median) },
            "check_fold_gbps": { "best": gbps(fused_best), "median": gbps(fused_median) },
            "check_gbps": { "best": gbps(check_best), "median": gbps(check_median) },
            "fold_gbps": { "best": gbps(fold_best), "median": gbps(fold_median) },
            "job_gbps": { "best": gbps(whole_best), "median": gbps(whole_median) },
            "before_gbps": { "best": gbps(before_best), "median": gbps(before_median) },
            "check_fold_over_memcpy": memcpy_median / fused_median,
            "before_over_memcpy": memcpy_median / before_median,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
