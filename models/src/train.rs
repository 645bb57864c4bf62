//! Local training and evaluation of the classifier, and the `BertTrainer` the agent uses.
//!
//! AdamW with linear warm-up then linear decay, global-norm gradient clipping, seeded
//! shuffling into batches grouped by length (each padded to its longest member). Only the
//! plan's trainable tensors get gradients. The frozen prefix (embeddings and the encoder
//! layers below the first trainable one) is computed once per dataset and cached, keyed by
//! a digest of the frozen weights: they never change between rounds, so the cache survives
//! across rounds. For head-only training only the `[CLS]` row is cached.
//!
//! Under a record-level privacy plan, [`BertTrainer`]'s `train` runs DP-SGD instead
//! ([`dp_sgd_loop`]): each step Poisson-samples records with the round's [`NoiseRng`],
//! computes every sampled example's gradient on its own (one forward and backward pass per
//! example, through the cached prefix), clips it to `C` in f64 with
//! [`fedward_shared::dp::clip_slices`], sums, adds snapped Gaussian noise of std `sigma C`
//! per coordinate and divides by the *expected* batch size `q n`, then takes an AdamW step.
//! No global-norm clipping there: per-example clipping is what bounds the sensitivity. The
//! finished update is clipped to `update_clip_norm`.
//!
//! FedProx ([`TrainingPlan::prox_mu`] > 0): the proximal term `mu/2 ||w - w_global||^2`
//! over the trainable parameters ([`Proximal`]) joins the loss of every step; under
//! `lora:R` it is over the merged change `scale B A` of each adapted matrix (what the
//! update holds) plus the classifier. It depends on no record, so under DP-SGD its
//! gradient `mu (w - w_global)` is added to the noisy mean gradient after per-example
//! clipping and noise, which it changes in nothing.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tracing::{debug, info};

use fedward_shared::dp::{clip_slices, clip_tensors, dp_sgd_steps, poisson_sample, GaussianNoise, NoiseRng};
use fedward_shared::plan::{PrivacyPlan, Trainable, TrainingPlan};
use fedward_shared::tensor::{Digest, TensorSet};
use fedward_shared::wire::LocalMetrics;

use crate::bert::{BertClassifier, Mode, ModelError};
use crate::eval::{classification_report, ClassificationReport};
use crate::optim::LocalOptimizer;
use crate::text::{make_batch, Encoded, Example, TextEncoder, TextError};
use crate::trainer::{LocalUpdate, TrainContext, TrainError, Trainer};

impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Missing(_) | ModelError::Shape { .. } => TrainError::ModelMismatch(e.to_string()),
            other => TrainError::Backend(other.to_string()),
        }
    }
}

impl From<TextError> for TrainError {
    fn from(e: TextError) -> Self {
        TrainError::Backend(e.to_string())
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Backend(e.to_string())
    }
}

/// Examples per forward pass when nothing trains (prefix caching, evaluation).
const EVAL_BATCH: usize = 32;

/// The output of the frozen prefix for each example of one dataset.
#[derive(Clone)]
struct PrefixCache {
    key: Digest,
    /// The first trainable layer (== number of layers for head-only training).
    first: usize,
    /// Per example: (len, hidden), or (1, hidden) holding only `[CLS]` for head-only.
    rows: Vec<Tensor>,
}

/// A dataset, tokenized, with its prefix cache (cloning shares the cached tensors).
#[derive(Clone)]
struct Prepared {
    examples: Vec<Example>,
    max_len: usize,
    encoded: Vec<Encoded>,
    cache: Option<PrefixCache>,
    /// Threads computing the frozen prefix (1: the calling thread alone).
    prefix_threads: usize,
}

impl Prepared {
    fn new(examples: Vec<Example>) -> Self {
        Self { examples, max_len: 0, encoded: Vec::new(), cache: None, prefix_threads: 1 }
    }

    /// The examples at `indices`, with their tokens and cached prefix rows (shared, not copied).
    fn subset(&self, indices: &[usize]) -> Option<Self> {
        let examples = indices.iter().map(|&i| self.examples.get(i).cloned()).collect::<Option<Vec<_>>>()?;
        let tokenized = self.encoded.len() == self.examples.len();
        let encoded = if tokenized { indices.iter().map(|&i| self.encoded[i].clone()).collect() } else { Vec::new() };
        let cache = self.cache.as_ref().filter(|_| tokenized).map(|c| PrefixCache {
            key: c.key,
            first: c.first,
            rows: indices.iter().map(|&i| c.rows[i].clone()).collect(),
        });
        Some(Self { examples, max_len: self.max_len, encoded, cache, prefix_threads: self.prefix_threads })
    }

    fn tokenize(&mut self, encoder: &TextEncoder, max_len: usize) -> Result<(), TextError> {
        if self.max_len != max_len || self.encoded.len() != self.examples.len() {
            let texts: Vec<&str> = self.examples.iter().map(|e| e.text.as_str()).collect();
            self.encoded = encoder.encode(&texts, max_len)?;
            self.max_len = max_len;
            self.cache = None;
        }
        Ok(())
    }
}

/// Trains the BERT classifier on one site's data.
pub struct BertTrainer {
    model: BertClassifier,
    encoder: TextEncoder,
    train: Prepared,
    validation: Option<Prepared>,
}

impl BertTrainer {
    pub fn new(
        model: BertClassifier,
        encoder: TextEncoder,
        train: Vec<Example>,
        validation: Option<Vec<Example>>,
    ) -> Result<Self, TrainError> {
        if train.is_empty() {
            return Err(TrainError::NoData);
        }
        Ok(Self { model, encoder, train: Prepared::new(train), validation: validation.filter(|v| !v.is_empty()).map(Prepared::new) })
    }

    /// A trainer for some of this one's training examples (by index) with `model` in place of
    /// this one's. It shares their tokens and frozen-prefix cache, which it reuses as long as
    /// `model`'s frozen weights are the ones it was computed with (the cache is keyed by their
    /// digest): one pooled pass of the frozen layers serves every subset, as in the baselines.
    pub fn subset(&self, model: BertClassifier, indices: &[usize]) -> Result<Self, TrainError> {
        let train = self.train.subset(indices).ok_or_else(|| TrainError::InvalidPlan("subset index out of range".into()))?;
        if train.examples.is_empty() {
            return Err(TrainError::NoData);
        }
        Ok(Self { model, encoder: self.encoder.clone(), train, validation: None })
    }

    pub fn model(&self) -> &BertClassifier {
        &self.model
    }

    /// Trains on `train` from the next round on (a site's data grew or was corrected). The
    /// privacy accounting does not depend on the number of examples (Poisson sampling at
    /// the plan's rate), so this changes no spend.
    pub fn replace_train(&mut self, train: Vec<Example>) -> Result<(), TrainError> {
        if train.is_empty() {
            return Err(TrainError::NoData);
        }
        let threads = self.train.prefix_threads;
        self.train = Prepared { prefix_threads: threads, ..Prepared::new(train) };
        Ok(())
    }

    pub fn model_mut(&mut self) -> &mut BertClassifier {
        &mut self.model
    }

    pub fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }

    /// Computes the frozen prefix's output on `threads` threads (default 1). Each thread runs
    /// its own batches, so this pays off when candle's own compute threads are few (say
    /// `RAYON_NUM_THREADS=1`): small matrix products parallelise poorly inside one call.
    pub fn set_prefix_threads(&mut self, threads: usize) {
        self.train.prefix_threads = threads.max(1);
        if let Some(v) = self.validation.as_mut() {
            v.prefix_threads = threads.max(1);
        }
    }

    /// Tokenizes the training examples and computes the frozen prefix's output for `plan`,
    /// as the first `fit` would: for computing it once before making subsets.
    pub fn prepare(&mut self, plan: &TrainingPlan) -> Result<(), TrainError> {
        let trainable: HashSet<String> = plan.trainable_tensors.iter().cloned().collect();
        prepare_training(&self.model, &self.encoder, &mut self.train, &trainable, plan).map(drop)
    }

    /// Trains the model in place from its current weights (no delta): for baselines.
    pub fn fit(&mut self, plan: &TrainingPlan, round: u64) -> Result<f64, TrainError> {
        let trainable = begin_training(&mut self.model, plan, round)?;
        let loss = train_loop(&mut self.model, &self.encoder, &mut self.train, &trainable, plan, round)?;
        self.model.merge_adapters()?;
        Ok(loss)
    }

    /// Evaluates on the validation set, if any.
    pub fn evaluate_validation(&mut self, plan: &TrainingPlan) -> Result<Option<(f64, ClassificationReport)>, TrainError> {
        let Some(val) = self.validation.as_mut() else { return Ok(None) };
        let trainable: HashSet<String> = plan.trainable_tensors.iter().cloned().collect();
        Ok(Some(evaluate_prepared(&self.model, &self.encoder, val, &trainable, plan.max_seq_len as usize)?))
    }
}

impl Trainer for BertTrainer {
    fn train(&mut self, ctx: TrainContext<'_>, global: &TensorSet, plan: &TrainingPlan) -> Result<LocalUpdate, TrainError> {
        self.model.load(global)?;
        for name in &plan.trainable_tensors {
            if !global.contains(name) {
                return Err(TrainError::ModelMismatch(format!("trainable tensor {name} is not in the model")));
            }
        }
        let trainable = begin_training(&mut self.model, plan, ctx.round.0)?;
        let params: usize = self.model.vars_of(&trainable)?.iter().map(|v| v.elem_count()).sum();
        let update: usize = plan.trainable_tensors.iter().filter_map(|n| global.get(n)).map(|t| t.len()).sum();
        info!(
            tensors = trainable.len(),
            parameters = params,
            update_mib = format_args!("{:.2}", update as f64 * 4.0 / (1 << 20) as f64),
            examples = self.train.examples.len(),
            "local training"
        );
        let (train_loss, dp_steps, update_clip) = match plan.privacy {
            PrivacyPlan::RecordLevel { noise_multiplier, clip_norm, sampling_rate, update_clip_norm } => {
                let dp = DpSgd { noise_multiplier, clip_norm, sampling_rate };
                let run = dp_sgd_loop(&mut self.model, &self.encoder, &mut self.train, &trainable, plan, dp, ctx.round.0, ctx.noise_rng)?;
                info!(steps = run.steps, sampled = run.sampled, empty_batches = run.empty_batches, "dp-sgd steps taken");
                (run.mean_loss, run.steps, Some(update_clip_norm))
            }
            PrivacyPlan::Off | PrivacyPlan::SiteLevel { .. } | PrivacyPlan::Distributed { .. } => {
                // Site-level and distributed DP clip and noise the finished update, outside
                // the trainer.
                (train_loop(&mut self.model, &self.encoder, &mut self.train, &trainable, plan, ctx.round.0)?, 0, None)
            }
        };
        // Adapters fold into the weights: the update is in the plan's tensors.
        self.model.merge_adapters()?;
        if !train_loss.is_finite() {
            return Err(TrainError::Diverged(format!("mean loss {train_loss}")));
        }
        let trained = self
            .model
            .tensor_set()?
            .subset(plan.trainable_tensors.iter().map(String::as_str))
            .map_err(|e| TrainError::Backend(e.to_string()))?;
        let mut delta = trained.delta_from(global).map_err(|e| TrainError::Backend(e.to_string()))?;
        if let Some(bound) = update_clip {
            // Post-processing of the DP-SGD result: costs no privacy, bounds what one site
            // can move the global model by.
            let clipped = clip_tensors(&mut delta, bound).map_err(|e| TrainError::Diverged(e.to_string()))?;
            debug!(norm = format_args!("{:.4}", clipped.norm), clipped = clipped.was_clipped(), "update clipped");
        }
        let mut metrics = LocalMetrics { train_loss, ..Default::default() };
        if let Some((loss, report)) = self.evaluate_validation(plan)? {
            metrics.val_loss = Some(loss);
            metrics.val_accuracy = Some(report.accuracy);
            metrics.val_macro_f1 = Some(report.macro_f1);
        }
        Ok(LocalUpdate { delta, num_examples: self.train.examples.len() as u64, metrics, dp_steps })
    }

    fn num_examples(&self) -> u64 {
        self.train.examples.len() as u64
    }

    fn can_score(&self) -> bool {
        self.validation.is_some()
    }

    fn score(&mut self, global: &TensorSet, plan: &TrainingPlan) -> Result<Option<(u64, u64)>, TrainError> {
        if self.validation.is_none() {
            return Ok(None);
        }
        self.model.load(global)?;
        let Some((_, report)) = self.evaluate_validation(plan)? else { return Ok(None) };
        let correct: usize = report.confusion_matrix.iter().enumerate().map(|(i, row)| row.get(i).copied().unwrap_or(0)).sum();
        Ok(Some((correct as u64, report.support as u64)))
    }
}

/// The tensors that train this round: the plan's, or for `lora:R` fresh adapters on the
/// top layer (added to `model` here; the caller merges them after training) plus the
/// classifier. The adapters' random `A` comes from the plan's seed and the round, never
/// from the data, so every site starts a round from the same adapters.
fn begin_training(model: &mut BertClassifier, plan: &TrainingPlan, round: u64) -> Result<HashSet<String>, TrainError> {
    // Adapters left by a training that failed midway must not shape this one.
    model.drop_adapters();
    match plan.trainable {
        Trainable::TopLora(rank) => {
            let seed = plan.seed ^ round.wrapping_add(1).wrapping_mul(0xA24B_AED4_963E_E407);
            let mut trainable: HashSet<String> = model.add_adapters(rank as usize, seed)?.into_iter().collect();
            trainable.extend(plan.trainable_tensors.iter().filter(|n| n.starts_with("classifier.")).cloned());
            Ok(trainable)
        }
        _ => Ok(plan.trainable_tensors.iter().cloned().collect()),
    }
}

/// Digest of the frozen weights below `first`, the layer split and the token length.
fn prefix_key(model: &BertClassifier, trainable: &HashSet<String>, first: usize, max_len: usize) -> Result<Digest, TrainError> {
    let set = model.tensor_set()?;
    let frozen: Vec<&str> = set
        .names()
        .filter(|n| !trainable.contains(*n))
        .filter(|n| n.starts_with("bert.embeddings.") || fedward_shared::plan::encoder_layer_index(n).is_some_and(|i| i < first))
        .collect();
    let mut specs = set.subset(frozen).map_err(|e| TrainError::Backend(e.to_string()))?.specs();
    specs.push(fedward_shared::tensor::TensorSpec { name: format!("split:{first}:{max_len}"), shape: vec![], digest: Digest([0; 32]) });
    Ok(fedward_shared::tensor::manifest_digest(&specs))
}

/// Makes sure `data.cache` holds the frozen prefix's output for the current weights.
fn ensure_cache(model: &BertClassifier, data: &mut Prepared, trainable: &HashSet<String>, first: usize) -> Result<(), TrainError> {
    let key = prefix_key(model, trainable, first, data.max_len)?;
    if data.cache.as_ref().is_some_and(|c| c.key == key) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let none = HashSet::new();
    let pad = model.config.pad_token_id;
    let head_only = first >= model.config.num_hidden_layers;
    // Sort by length so each forward pass pads little.
    let mut order: Vec<usize> = (0..data.encoded.len()).collect();
    order.sort_by_key(|&i| data.encoded[i].ids.len());
    let chunks: Vec<&[usize]> = order.chunks(EVAL_BATCH).collect();
    let encoded = &data.encoded;
    // Worker `w` takes batches w, w + threads, ...: similar lengths, so similar work.
    let work = |w: usize, threads: usize| -> Result<Vec<(usize, Tensor)>, TrainError> {
        let mut out = Vec::new();
        for chunk in chunks.iter().skip(w).step_by(threads) {
            let refs: Vec<&Encoded> = chunk.iter().map(|&i| &encoded[i]).collect();
            let batch = make_batch(&refs, pad, model.device())?;
            let hidden = model.forward_prefix(&batch, first, &mut Mode { trainable: &none, dropout_rng: None, per_example: None })?;
            for (j, &i) in chunk.iter().enumerate() {
                let len = if head_only { 1 } else { encoded[i].ids.len() };
                out.push((i, hidden.get(j)?.narrow(0, 0, len)?.contiguous()?));
            }
        }
        Ok(out)
    };
    let threads = data.prefix_threads.clamp(1, chunks.len().max(1));
    let parts: Vec<Result<Vec<(usize, Tensor)>, TrainError>> = if threads == 1 {
        vec![work(0, 1)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|w| scope.spawn(move || work(w, threads))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(TrainError::Backend("a frozen-prefix thread panicked".into()))))
                .collect()
        })
    };
    let mut rows: Vec<Option<Tensor>> = vec![None; encoded.len()];
    for part in parts {
        for (i, row) in part? {
            rows[i] = Some(row);
        }
    }
    debug!(examples = rows.len(), first, secs = format_args!("{:.1}", started.elapsed().as_secs_f64()), "frozen prefix cached");
    data.cache =
        Some(PrefixCache { key, first, rows: rows.into_iter().map(|r| r.unwrap_or_else(|| unreachable!("every row computed"))).collect() });
    Ok(())
}

/// Logits for the examples `idx` of `data`, from the cache when there is one.
fn logits_for(model: &BertClassifier, data: &Prepared, idx: &[usize], mode: &mut Mode<'_>) -> Result<Tensor, TrainError> {
    match &data.cache {
        Some(cache) => {
            let len = idx.iter().map(|&i| cache.rows[i].dim(0)).collect::<Result<Vec<_>, _>>()?.into_iter().max().unwrap_or(1);
            let padded = idx
                .iter()
                .map(|&i| {
                    let r = &cache.rows[i];
                    let n = r.dim(0)?;
                    r.pad_with_zeros(0, 0, len - n)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let hidden = Tensor::stack(&padded, 0)?;
            if cache.first >= model.config.num_hidden_layers {
                Ok(model.head(&hidden, mode)?)
            } else {
                let mask: Vec<u32> = idx
                    .iter()
                    .flat_map(|&i| {
                        let n = data.encoded[i].ids.len();
                        std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, len - n))
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (idx.len(), len), model.device())?;
                Ok(model.forward_suffix(hidden, &mask, cache.first, mode)?)
            }
        }
        None => {
            let refs: Vec<&Encoded> = idx.iter().map(|&i| &data.encoded[i]).collect();
            let batch = make_batch(&refs, model.config.pad_token_id, model.device())?;
            Ok(model.forward(&batch, mode)?)
        }
    }
}

fn train_loop(
    model: &mut BertClassifier,
    encoder: &TextEncoder,
    data: &mut Prepared,
    trainable: &HashSet<String>,
    plan: &TrainingPlan,
    round: u64,
) -> Result<f64, TrainError> {
    if matches!(plan.privacy, PrivacyPlan::RecordLevel { .. }) {
        // Shuffled batches with global-norm clipping are not DP-SGD: refuse rather than
        // train without the promised protection (DP-SGD needs the round's NoiseRng).
        return Err(TrainError::InvalidPlan("a record-level plan trains only through dp_sgd_loop".into()));
    }
    let vars = prepare_training(model, encoder, data, trainable, plan)?;
    let mut opt = optimizer(&vars, plan)?;
    let prox = Proximal::new(model, trainable, plan.prox_mu)?;
    let n = data.examples.len();
    let batch_size = (plan.batch_size as usize).max(1);
    let steps_per_epoch = n.div_ceil(batch_size);
    let total_steps = (steps_per_epoch * plan.local_epochs as usize).max(1);
    let warmup = ((total_steps as f64) * plan.warmup_ratio).round() as usize;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(plan.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut dropout_rng = rand_chacha::ChaCha8Rng::seed_from_u64(plan.seed.wrapping_add(round).wrapping_add(1));
    let lengths: Vec<usize> = data.encoded.iter().map(|e| e.ids.len()).collect();
    let (mut loss_sum, mut loss_count, mut step) = (0.0f64, 0usize, 0usize);
    for _epoch in 0..plan.local_epochs {
        for idx in &length_grouped_batches(&lengths, batch_size, &mut rng) {
            let lr = schedule(plan.learning_rate, step, warmup, total_steps);
            opt.set_learning_rate(lr);
            let labels: Vec<u32> = idx.iter().map(|&i| data.examples[i].label as u32).collect();
            let labels = Tensor::from_vec(labels, idx.len(), model.device())?;
            let logits = logits_for(model, data, idx, &mut Mode { trainable, dropout_rng: Some(&mut dropout_rng), per_example: None })?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let mut grads = match &prox {
                Some(prox) => (&loss + prox.term(model)?)?.backward()?,
                None => loss.backward()?,
            };
            if plan.max_grad_norm > 0.0 {
                clip_grad_norm(&vars, &mut grads, plan.max_grad_norm)?;
            }
            opt.step(&grads)?;
            let l = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            loss_sum += l * idx.len() as f64;
            loss_count += idx.len();
            step += 1;
        }
    }
    Ok(loss_sum / loss_count.max(1) as f64)
}

/// Batches per shuffled pool of this many batches, sorted by length within the pool.
const LENGTH_GROUP_BATCHES: usize = 8;

/// One epoch's mini-batches, as index lists: the examples are shuffled, cut into pools of
/// [`LENGTH_GROUP_BATCHES`] batches, each pool is sorted by token length and cut into
/// batches, and the batches are shuffled. Batches are padded to their longest member, so
/// grouping similar lengths cuts the padding the model computes on (most notes are 30-60
/// tokens, a few over 100), while every batch is still a random draw from a random pool.
/// This is what Hugging Face's `group_by_length` does.
fn length_grouped_batches(lengths: &[usize], batch_size: usize, rng: &mut impl rand::Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for pool in order.chunks_mut(batch_size * LENGTH_GROUP_BATCHES) {
        pool.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// The plan's optimiser over `vars`.
fn optimizer(vars: &[candle_core::Var], plan: &TrainingPlan) -> Result<LocalOptimizer, TrainError> {
    Ok(LocalOptimizer::new(vars.to_vec(), plan.optimizer, plan.learning_rate, plan.weight_decay)?)
}

/// Tokenizes, fills the frozen-prefix cache and returns the trainable `Var`s (sorted by name).
fn prepare_training(
    model: &BertClassifier,
    encoder: &TextEncoder,
    data: &mut Prepared,
    trainable: &HashSet<String>,
    plan: &TrainingPlan,
) -> Result<Vec<candle_core::Var>, TrainError> {
    if trainable.is_empty() {
        return Err(TrainError::InvalidPlan("nothing trains".into()));
    }
    data.tokenize(encoder, plan.max_seq_len as usize)?;
    match model.frozen_prefix_layers(trainable) {
        Some(first) => ensure_cache(model, data, trainable, first)?,
        None => data.cache = None,
    }
    Ok(model.vars_of(trainable)?)
}

/// The DP-SGD parameters of a record-level plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSgd {
    pub noise_multiplier: f64,
    /// Per-example gradient clip `C`.
    pub clip_norm: f64,
    /// Poisson sampling rate `q`.
    pub sampling_rate: f64,
}

/// What a DP-SGD run did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSgdRun {
    /// Mean loss over the sampled examples (for local logs and metrics).
    pub mean_loss: f64,
    /// Noisy optimiser steps taken, counted as they are taken: `dp_sgd_steps(local_epochs,
    /// q)` when all went well, empty batches included.
    pub steps: u64,
    /// Examples drawn over all steps (with repetition).
    pub sampled: u64,
    /// Steps whose Poisson batch was empty (pure noise).
    pub empty_batches: u64,
}

/// DP-SGD (Abadi et al. 2016) with Poisson sampling, which is what the record-level
/// accountant assumes. See the module doc for the step; an empty batch still takes a step
/// of pure noise, because the accountant counts every step.
#[allow(clippy::too_many_arguments)]
fn dp_sgd_loop(
    model: &mut BertClassifier,
    encoder: &TextEncoder,
    data: &mut Prepared,
    trainable: &HashSet<String>,
    plan: &TrainingPlan,
    dp: DpSgd,
    round: u64,
    noise_rng: &mut NoiseRng,
) -> Result<DpSgdRun, TrainError> {
    let invalid = |e: &dyn std::fmt::Display| TrainError::InvalidPlan(e.to_string());
    let steps = dp_sgd_steps(plan.local_epochs, dp.sampling_rate).map_err(|e| invalid(&e))?;
    if !(dp.clip_norm.is_finite() && dp.clip_norm > 0.0) {
        return Err(TrainError::InvalidPlan(format!("clip norm {} is not a finite number > 0", dp.clip_norm)));
    }
    let noise = GaussianNoise::for_mechanism(dp.noise_multiplier, dp.clip_norm).map_err(|e| invalid(&e))?;
    let vars = prepare_training(model, encoder, data, trainable, plan)?;
    let mut opt = optimizer(&vars, plan)?;
    let prox = Proximal::new(model, trainable, plan.prox_mu)?;
    // `vars_of` sorts by name: the names in the same order.
    let mut var_names: Vec<String> = trainable.iter().cloned().collect();
    var_names.sort();
    // Per-example copies give every example's gradient from one batched pass; otherwise one
    // pass per example.
    let batched = model.supports_per_example(trainable) && data.cache.is_some();
    let n = data.examples.len();
    // Dividing by the expected batch size (not the drawn one) keeps the batch size, which
    // depends on the data, out of the released value.
    let expected_batch = dp.sampling_rate * n as f64;
    let total = usize::try_from(steps).map_err(|_| TrainError::InvalidPlan(format!("{steps} steps")))?;
    let warmup = ((total as f64) * plan.warmup_ratio).round() as usize;
    let mut dropout_rng = rand_chacha::ChaCha8Rng::seed_from_u64(plan.seed.wrapping_add(round).wrapping_add(1));
    let mut sum: Vec<Vec<f64>> = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
    let (mut loss_sum, mut sampled, mut clipped_count) = (0.0f64, 0u64, 0u64);
    let (mut taken, mut empty_batches) = (0u64, 0u64);
    let started = std::time::Instant::now();
    let mut norms: Vec<f64> = Vec::new();
    for step in 0..total {
        opt.set_learning_rate(schedule(plan.learning_rate, step, warmup, total));
        let batch = poisson_sample(noise_rng, n, dp.sampling_rate).map_err(|e| invalid(&e))?;
        sum.iter_mut().for_each(|s| s.fill(0.0));
        if batched {
            for chunk in batch.chunks(PER_EXAMPLE_CHUNK) {
                let (loss, chunk_norms) = add_clipped_gradients_batched(
                    model,
                    data,
                    &vars,
                    &var_names,
                    trainable,
                    chunk,
                    dp.clip_norm,
                    Some(&mut dropout_rng),
                    &mut sum,
                )?;
                loss_sum += loss;
                sampled += chunk.len() as u64;
                clipped_count += chunk_norms.iter().filter(|&&n| n > dp.clip_norm).count() as u64;
                norms.extend(chunk_norms);
            }
        } else {
            for &i in &batch {
                let mut mode = Mode { trainable, dropout_rng: Some(&mut dropout_rng), per_example: None };
                let (loss, norm) = add_clipped_gradient(model, data, &vars, i, dp.clip_norm, &mut mode, &mut sum)?;
                loss_sum += loss;
                sampled += 1;
                clipped_count += u64::from(norm > dp.clip_norm);
                norms.push(norm);
            }
        }
        empty_batches += u64::from(batch.is_empty());
        let mut grads = noisy_mean_gradient(&vars, &sum, &noise, noise_rng, expected_batch)?;
        if let Some(prox) = &prox {
            // Data-independent: added after clipping and noise, it changes neither.
            prox.add_gradient(model, &vars, &mut grads)?;
        }
        opt.step(&grads)?;
        taken += 1;
    }
    // The spread of per-example gradient norms is what C should be chosen from (clip near
    // the median); norms are aggregate figures of the local run and never leave the site.
    norms.sort_by(f64::total_cmp);
    let quantile = |f: f64| norms.get(((norms.len().saturating_sub(1)) as f64 * f) as usize).copied().unwrap_or(0.0);
    debug!(
        steps = taken,
        sampled,
        empty_batches,
        clipped = clipped_count,
        norm_p10 = format_args!("{:.3}", quantile(0.1)),
        norm_p50 = format_args!("{:.3}", quantile(0.5)),
        norm_p90 = format_args!("{:.3}", quantile(0.9)),
        secs = format_args!("{:.1}", started.elapsed().as_secs_f64()),
        "dp-sgd done"
    );
    Ok(DpSgdRun { mean_loss: loss_sum / sampled.max(1) as f64, steps: taken, sampled, empty_batches })
}

/// Examples per batched pass of [`add_clipped_gradients_batched`]: bounds the memory of
/// the per-example copies and gradients (chunk x trainable parameters).
const PER_EXAMPLE_CHUNK: usize = 64;

/// Like [`add_clipped_gradient`] for every example of `idx` in one forward and backward
/// pass: each trainable tensor is copied once per example ([`Mode::per_example`]), so the
/// gradient of copy `i` is example `i`'s own gradient, which is then clipped on the host
/// exactly as one example alone would be. Returns the summed loss and each example's
/// gradient norm before clipping.
#[allow(clippy::too_many_arguments)]
fn add_clipped_gradients_batched(
    model: &BertClassifier,
    data: &Prepared,
    vars: &[candle_core::Var],
    names: &[String],
    trainable: &HashSet<String>,
    idx: &[usize],
    clip_norm: f64,
    dropout_rng: Option<&mut rand_chacha::ChaCha8Rng>,
    sum: &mut [Vec<f64>],
) -> Result<(f64, Vec<f64>), TrainError> {
    let n = idx.len();
    let mut copies = Vec::with_capacity(vars.len());
    for v in vars {
        let mut shape = vec![n];
        shape.extend(v.dims());
        copies.push(candle_core::Var::from_tensor(&v.as_tensor().unsqueeze(0)?.broadcast_as(shape)?.contiguous()?)?);
    }
    let per_example: std::collections::HashMap<String, Tensor> =
        names.iter().cloned().zip(copies.iter().map(|c| c.as_tensor().clone())).collect();
    let labels: Vec<u32> = idx.iter().map(|&i| data.examples[i].label as u32).collect();
    let labels = Tensor::from_vec(labels, n, model.device())?;
    let mut mode = Mode { trainable, dropout_rng, per_example: Some(&per_example) };
    let logits = logits_for(model, data, idx, &mut mode)?;
    // The sum of the examples' losses: each copy's gradient is its example's, unscaled.
    let loss = (candle_nn::loss::cross_entropy(&logits, &labels)? * n as f64)?;
    let grads = loss.backward()?;
    let mut flat: Vec<Vec<f32>> = Vec::with_capacity(vars.len());
    for (c, v) in copies.iter().zip(vars) {
        flat.push(match grads.get(c.as_tensor()) {
            Some(g) => g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; n * v.elem_count()],
        });
    }
    let mut norms = Vec::with_capacity(n);
    for i in 0..n {
        let mut slices: Vec<&mut [f32]> =
            flat.iter_mut().zip(vars).map(|(g, v)| &mut g[i * v.elem_count()..(i + 1) * v.elem_count()]).collect();
        norms.push(clip_and_add(&mut slices, clip_norm, sum)?);
    }
    Ok((f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?), norms))
}

/// Adds example `i`'s gradient, clipped to L2 norm `clip_norm` over all of `vars`, into
/// `sum` (one f64 buffer per var, in `vars` order). Returns the example's loss and its
/// gradient norm before clipping.
///
/// One backward pass per example: candle has no per-sample gradients, and a batched pass
/// would mix the examples in the weight gradients. The clipping runs on the host in f64
/// ([`clip_slices`]), which guarantees the norm bound even after rounding to f32.
fn add_clipped_gradient(
    model: &BertClassifier,
    data: &Prepared,
    vars: &[candle_core::Var],
    i: usize,
    clip_norm: f64,
    mode: &mut Mode<'_>,
    sum: &mut [Vec<f64>],
) -> Result<(f64, f64), TrainError> {
    let label = Tensor::from_vec(vec![data.examples[i].label as u32], 1, model.device())?;
    let logits = logits_for(model, data, &[i], mode)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &label)?;
    let grads = loss.backward()?;
    let mut flat: Vec<Vec<f32>> = Vec::with_capacity(vars.len());
    for v in vars {
        flat.push(match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            // A parameter this example does not reach has a zero gradient.
            None => vec![0.0; v.elem_count()],
        });
    }
    let mut slices: Vec<&mut [f32]> = flat.iter_mut().map(Vec::as_mut_slice).collect();
    let norm = clip_and_add(&mut slices, clip_norm, sum)?;
    Ok((f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?), norm))
}

/// Clips one example's gradient (one slice per var) to `clip_norm` and adds it into `sum`;
/// returns its norm before clipping. A non-finite gradient cannot be bounded: the error
/// names no record.
fn clip_and_add(gradient: &mut [&mut [f32]], clip_norm: f64, sum: &mut [Vec<f64>]) -> Result<f64, TrainError> {
    let clipped = clip_slices(gradient, clip_norm).map_err(|e| TrainError::Diverged(format!("per-example gradient: {e}")))?;
    for (acc, g) in sum.iter_mut().zip(gradient.iter()) {
        for (a, &x) in acc.iter_mut().zip(g.iter()) {
            *a += f64::from(x);
        }
    }
    Ok(clipped.norm)
}

/// `(sum + N(0, (sigma C)^2)) / expected_batch` per coordinate, as candle gradients of `vars`.
fn noisy_mean_gradient(
    vars: &[candle_core::Var],
    sum: &[Vec<f64>],
    noise: &GaussianNoise,
    rng: &mut NoiseRng,
    expected_batch: f64,
) -> Result<candle_core::backprop::GradStore, TrainError> {
    // GradStore has no public constructor: the backward pass of a constant gives an empty
    // store (holding only the constant's own unit gradient, which no optimiser reads).
    let device = vars.first().map_or(Device::Cpu, |v| v.device().clone());
    let mut grads = Tensor::zeros((), DType::F32, &device)?.backward()?;
    for (v, s) in vars.iter().zip(sum) {
        let mut values: Vec<f32> = s.iter().map(|&x| x as f32).collect();
        noise.add_to(rng, &mut values).map_err(|e| TrainError::Diverged(format!("noise: {e}")))?;
        let mean: Vec<f32> = values.iter().map(|&x| (f64::from(x) / expected_batch) as f32).collect();
        grads.insert(v.as_tensor(), Tensor::from_vec(mean, v.shape(), &device)?.to_dtype(v.dtype())?);
    }
    Ok(grads)
}

/// FedProx's proximal term (Li et al. 2020) over one round's trainable parameters:
/// `mu/2 (sum ||w - w_global||^2 + sum ||scale B A||^2)`, the first sum over the trained
/// weights, each against its value when training began (the global model's), the second
/// over the adapters (`lora:R`), whose merged change `scale B A` is the whole difference
/// from the global weight (the adapted matrix itself does not train, and each round's
/// adapters start with `B = 0`). Its gradient is `mu (w - w_global)` for a weight, and
/// `mu scale^2 (B A) A^T` and `mu scale^2 B^T (B A)` for `B` and `A`.
///
/// A gradient term like any other: with SGD it is a stable pull towards the global model
/// while `learning_rate * mu < 2` (at `learning_rate * mu = 1` each step starts again from
/// the global model); AdamW normalises it with the rest of the gradient.
struct Proximal {
    mu: f64,
    /// Each trained weight with a copy of its value when training began.
    anchored: Vec<(candle_core::Var, Tensor)>,
}

impl Proximal {
    /// The term for the plan's `mu`, or `None` when it is 0 (off).
    fn new(model: &BertClassifier, trainable: &HashSet<String>, mu: f64) -> Result<Option<Self>, TrainError> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(TrainError::InvalidPlan(format!("prox_mu {mu} is not a finite number >= 0")));
        }
        if mu == 0.0 {
            return Ok(None);
        }
        let weights: HashSet<String> = trainable.iter().filter(|n| !n.ends_with(".lora_a") && !n.ends_with(".lora_b")).cloned().collect();
        // A copy, not a view: the optimiser overwrites the weights' storage in place.
        let mut anchored = Vec::new();
        for var in model.vars_of(&weights)? {
            let anchor = var.as_tensor().copy()?.detach();
            anchored.push((var, anchor));
        }
        Ok(Some(Self { mu, anchored }))
    }

    /// The term's value, a scalar whose gradients reach the trained weights and adapters.
    fn term(&self, model: &BertClassifier) -> Result<Tensor, TrainError> {
        let mut total = Tensor::zeros((), DType::F32, model.device())?;
        for (var, anchor) in &self.anchored {
            total = (total + var.as_tensor().sub(anchor)?.sqr()?.sum_all()?.to_dtype(DType::F32)?)?;
        }
        for delta in model.adapter_deltas()? {
            total = (total + delta.sqr()?.sum_all()?.to_dtype(DType::F32)?)?;
        }
        Ok((total * (self.mu / 2.0))?)
    }

    /// Adds the term's gradient to `grads` (for each of `vars`).
    fn add_gradient(
        &self,
        model: &BertClassifier,
        vars: &[candle_core::Var],
        grads: &mut candle_core::backprop::GradStore,
    ) -> Result<(), TrainError> {
        let prox = self.term(model)?.backward()?;
        for v in vars {
            let Some(g) = prox.get(v.as_tensor()) else { continue };
            let sum = match grads.remove(v.as_tensor()) {
                Some(existing) => (existing + g)?,
                None => g.clone(),
            };
            grads.insert(v.as_tensor(), sum);
        }
        Ok(())
    }
}

/// Linear warm-up to `peak`, then linear decay to 0 at `total`.
pub fn schedule(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        peak * (total.saturating_sub(step)) as f64 / (total - warmup).max(1) as f64
    }
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`.
fn clip_grad_norm(vars: &[candle_core::Var], grads: &mut candle_core::backprop::GradStore, max_norm: f64) -> Result<f64, TrainError> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Tokenizes `data` and, when a prefix is frozen, fills its cache.
fn prepare_evaluation(
    model: &BertClassifier,
    encoder: &TextEncoder,
    data: &mut Prepared,
    trainable: &HashSet<String>,
    max_len: usize,
) -> Result<(), TrainError> {
    data.tokenize(encoder, max_len)?;
    if let Some(first) = model.frozen_prefix_layers(trainable) {
        ensure_cache(model, data, trainable, first)?;
    }
    Ok(())
}

fn evaluate_prepared(
    model: &BertClassifier,
    encoder: &TextEncoder,
    data: &mut Prepared,
    trainable: &HashSet<String>,
    max_len: usize,
) -> Result<(f64, ClassificationReport), TrainError> {
    prepare_evaluation(model, encoder, data, trainable, max_len)?;
    let none = HashSet::new();
    let (mut preds, mut loss_sum) = (vec![0usize; data.examples.len()], 0.0f64);
    // In length order, so each batch pads little; predictions go back to their example.
    let mut idx: Vec<usize> = (0..data.examples.len()).collect();
    idx.sort_by_key(|&i| data.encoded[i].ids.len());
    for chunk in idx.chunks(EVAL_BATCH) {
        let logits = logits_for(model, data, chunk, &mut Mode { trainable: &none, dropout_rng: None, per_example: None })?;
        let labels =
            Tensor::from_vec(chunk.iter().map(|&i| data.examples[i].label as u32).collect::<Vec<_>>(), chunk.len(), model.device())?;
        loss_sum += f64::from(candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()?) * chunk.len() as f64;
        for (&i, p) in chunk.iter().zip(logits.argmax(D::Minus1)?.to_vec1::<u32>()?) {
            preds[i] = p as usize;
        }
    }
    let truth: Vec<usize> = data.examples.iter().map(|e| e.label).collect();
    Ok((loss_sum / truth.len().max(1) as f64, classification_report(&truth, &preds, &model.labels)))
}

/// A labelled evaluation set that keeps its tokenization and frozen-prefix cache between
/// calls: evaluating successive global models that differ only in their trainable part
/// (every round of a federation) costs one pass through the trainable suffix each. A clone
/// shares the cache.
#[derive(Clone)]
pub struct EvalSet {
    data: Prepared,
}

impl EvalSet {
    pub fn new(examples: Vec<Example>) -> Self {
        Self { data: Prepared::new(examples) }
    }

    pub fn len(&self) -> usize {
        self.data.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.examples.is_empty()
    }

    /// Threads computing the frozen prefix; see [`BertTrainer::set_prefix_threads`].
    pub fn set_prefix_threads(&mut self, threads: usize) {
        self.data.prefix_threads = threads.max(1);
    }

    /// Tokenizes the set and computes its frozen prefix now, as the first `evaluate` would:
    /// once, before clones of the set go to several threads.
    pub fn prepare(
        &mut self,
        model: &BertClassifier,
        encoder: &TextEncoder,
        trainable: &[String],
        max_len: usize,
    ) -> Result<(), TrainError> {
        let trainable: HashSet<String> = trainable.iter().cloned().collect();
        prepare_evaluation(model, encoder, &mut self.data, &trainable, max_len)
    }

    /// Mean cross-entropy and the classification report of `model` on this set. `trainable`
    /// names the tensors that may differ between calls; everything below them is cached.
    pub fn evaluate(
        &mut self,
        model: &BertClassifier,
        encoder: &TextEncoder,
        trainable: &[String],
        max_len: usize,
    ) -> Result<(f64, ClassificationReport), TrainError> {
        let trainable: HashSet<String> = trainable.iter().cloned().collect();
        evaluate_prepared(model, encoder, &mut self.data, &trainable, max_len)
    }
}

/// Evaluates a model on labelled examples (no caching; for the CLI and baselines).
pub fn evaluate(
    model: &BertClassifier,
    encoder: &TextEncoder,
    examples: &[Example],
    max_len: usize,
) -> Result<ClassificationReport, TrainError> {
    let mut data = Prepared::new(examples.to_vec());
    let none = HashSet::new();
    Ok(evaluate_prepared(model, encoder, &mut data, &none, max_len)?.1)
}

/// Class probabilities for each text, in order.
pub fn predict(model: &BertClassifier, encoder: &TextEncoder, texts: &[&str], max_len: usize) -> Result<Vec<Vec<f32>>, TrainError> {
    let encoded = encoder.encode(texts, max_len)?;
    let none = HashSet::new();
    let mut out = Vec::with_capacity(texts.len());
    for chunk in encoded.chunks(EVAL_BATCH) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = make_batch(&refs, model.config.pad_token_id, model.device())?;
        let logits = model.forward(&batch, &mut Mode { trainable: &none, dropout_rng: None, per_example: None })?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        out.extend(probs.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// The compute device from `auto`, `cpu` or `cuda:N`.
pub fn device(spec: &str) -> Result<Device, TrainError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s => {
            let n: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| TrainError::InvalidPlan(format!("device {s:?}: expected auto, cpu or cuda:N")))?;
            // A build without the feature has no CUDA backend at all; one with it needs the
            // NVIDIA driver's libcuda and a GPU (scripts/gpu-check.sh checks both).
            let hint = if cfg!(feature = "cuda") {
                "built with --features cuda: is the NVIDIA driver installed and a GPU present?"
            } else {
                "this build has no CUDA backend: build with --features cuda"
            };
            Device::new_cuda(n).map_err(|e| TrainError::Backend(format!("cuda:{n} unavailable: {e} ({hint})")))
        }
    }
}

#[cfg(test)]
mod tests {
    use fedward_shared::plan::{PrivacyPlan, Trainable};
    use fedward_shared::wire::RoundId;

    use super::*;
    use crate::bert::BertConfig;

    const WORDS: [&str; 16] = [
        "admit",
        "ward",
        "bed",
        "icu",
        "review",
        "consult",
        "doctor",
        "surgeon",
        "ventilator",
        "scan",
        "pump",
        "dialysis",
        "pharmacy",
        "transport",
        "interpreter",
        "please",
    ];

    pub(crate) fn labels() -> Vec<String> {
        ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect()
    }

    /// Four classes, each told apart by its own words.
    pub(crate) fn separable() -> Vec<Example> {
        let by_label = [
            ["review", "consult", "doctor", "surgeon"],
            ["admit", "ward", "bed", "icu"],
            ["ventilator", "scan", "pump", "dialysis"],
            ["pharmacy", "transport", "interpreter", "please"],
        ];
        let mut out = Vec::new();
        for (label, words) in by_label.iter().enumerate() {
            for i in 0..6 {
                let text = format!("please {} {}", words[i % 4], words[(i + 1) % 4]);
                out.push(Example { text, label });
            }
        }
        out
    }

    fn plan(trainable: Trainable, model: &BertClassifier, epochs: u32) -> TrainingPlan {
        let names = model.tensor_set().unwrap();
        TrainingPlan {
            local_epochs: epochs,
            batch_size: 8,
            optimizer: Default::default(),
            learning_rate: 5e-3,
            warmup_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_seq_len: 16,
            trainable,
            trainable_tensors: trainable.select(names.names()),
            seed: 3,
            privacy: PrivacyPlan::Off,
            prox_mu: 0.0,
        }
    }

    pub(crate) fn tiny() -> (BertClassifier, TextEncoder) {
        let encoder = TextEncoder::tiny(&WORDS);
        let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels(), 11, &Device::Cpu).unwrap();
        (model, encoder)
    }

    fn train_once(trainable: Trainable, epochs: u32) -> (TensorSet, LocalUpdate, TrainingPlan) {
        let (model, encoder) = tiny();
        let global = model.tensor_set().unwrap();
        let plan = plan(trainable, &model, epochs);
        let mut trainer = BertTrainer::new(model, encoder, separable(), Some(separable())).unwrap();
        let mut rng = NoiseRng::from_seed_insecure([0; 32]);
        let update = trainer.train(TrainContext { round: RoundId(1), noise_rng: &mut rng }, &global, &plan).unwrap();
        (global, update, plan)
    }

    #[test]
    fn separable_set_trains_to_full_accuracy_with_falling_loss() {
        let (model, encoder) = tiny();
        let mut trainer = BertTrainer::new(model, encoder, separable(), Some(separable())).unwrap();
        let plan = plan(Trainable::All, trainer.model(), 1);
        let first = trainer.fit(&plan, 1).unwrap();
        let mut last = first;
        // 40 short rounds: with 25 the tiny model reached full accuracy on some seeds only.
        for round in 2..=40 {
            last = trainer.fit(&plan, round).unwrap();
        }
        assert!(last < first * 0.3, "loss fell from {first} to {last}");
        let (_, report) = trainer.evaluate_validation(&plan).unwrap().unwrap();
        assert_eq!(report.accuracy, 1.0, "{report}");
    }

    #[test]
    fn update_holds_exactly_the_trainable_tensors() {
        for trainable in [Trainable::Head, Trainable::TopLayers(1), Trainable::TopBody(1), Trainable::TopLora(2), Trainable::All] {
            let (_, update, plan) = train_once(trainable, 1);
            let mut names: Vec<&str> = update.delta.names().collect();
            names.sort_unstable();
            let mut want: Vec<&str> = plan.trainable_tensors.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(names, want, "{trainable}");
            assert_eq!(update.num_examples, 24);
            assert!(update.metrics.val_accuracy.is_some());
        }
    }

    #[test]
    fn trainable_tensors_move_and_frozen_ones_stay_bit_identical() {
        for trainable in [Trainable::Head, Trainable::TopLayers(1), Trainable::TopBody(1), Trainable::TopLora(2), Trainable::All] {
            let (model, encoder) = tiny();
            let global = model.tensor_set().unwrap();
            let plan = plan(trainable, &model, 1);
            let mut trainer = BertTrainer::new(model, encoder, separable(), None).unwrap();
            trainer.fit(&plan, 1).unwrap();
            let after = trainer.model().tensor_set().unwrap();
            for (name, before) in global.iter() {
                let now = after.get(name).unwrap();
                // The last layer's key bias cannot move: only the [CLS] row of that layer
                // reaches the head, and a bias shared by every key shifts all of that row's
                // attention scores alike, which softmax cancels (its gradient is exactly 0).
                let inert = name == "bert.encoder.layer.1.attention.self.key.bias";
                if plan.trainable_tensors.iter().any(|t| t == name) && !inert {
                    // The gradient reaches every trainable tensor, LayerNorms included.
                    assert_ne!(now, before, "{trainable}: trainable {name} did not change");
                } else {
                    assert_eq!(now, before, "{trainable}: frozen {name} changed");
                }
            }
        }
    }

    #[test]
    fn cached_prefix_gives_the_same_logits_as_a_full_forward() {
        let (model, encoder) = tiny();
        let trainable: HashSet<String> = Trainable::TopLayers(1).select(model.tensor_set().unwrap().names()).into_iter().collect();
        let mut data = Prepared::new(separable());
        data.tokenize(&encoder, 16).unwrap();
        let none = HashSet::new();
        let idx: Vec<usize> = (0..6).collect();
        let full = logits_for(&model, &data, &idx, &mut Mode { trainable: &none, dropout_rng: None, per_example: None }).unwrap();
        ensure_cache(&model, &mut data, &trainable, 1).unwrap();
        let cached = logits_for(&model, &data, &idx, &mut Mode { trainable: &none, dropout_rng: None, per_example: None }).unwrap();
        let diff = (full - cached).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "max difference {diff}");
    }

    /// Computing the frozen prefix on several threads gives every example the same rows.
    #[test]
    fn prefix_on_several_threads_matches_one_thread() {
        let (model, encoder) = tiny();
        let trainable: HashSet<String> = Trainable::TopLayers(1).select(model.tensor_set().unwrap().names()).into_iter().collect();
        // More examples than one batch, so that every thread gets batches.
        let examples: Vec<Example> = (0..4).flat_map(|_| separable()).collect();
        let rows = |threads: usize| -> Vec<Vec<f32>> {
            let mut data = Prepared::new(examples.clone());
            data.prefix_threads = threads;
            data.tokenize(&encoder, 16).unwrap();
            ensure_cache(&model, &mut data, &trainable, 1).unwrap();
            data.cache.unwrap().rows.iter().map(|r| r.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
        };
        let one = rows(1);
        assert_eq!(one.len(), examples.len());
        assert_eq!(rows(3), one);
    }

    /// A subset trainer reuses the pooled trainer's cached prefix and trains exactly as a
    /// trainer built from scratch on the same examples.
    #[test]
    fn subset_shares_the_prefix_cache_and_trains_like_a_fresh_trainer() {
        let (model, encoder) = tiny();
        let plan = plan(Trainable::TopLayers(1), &model, 2);
        let mut pooled = BertTrainer::new(model, encoder, separable(), None).unwrap();
        pooled.fit(&plan, 1).unwrap();
        let key = pooled.train.cache.as_ref().map(|c| c.key);
        assert!(key.is_some());
        let indices: Vec<usize> = (0..24).step_by(3).collect();
        let (fresh_model, fresh_encoder) = tiny();
        let mut sub = pooled.subset(fresh_model, &indices).unwrap();
        assert_eq!(sub.train.cache.as_ref().map(|c| c.key), key);
        let subset_loss = sub.fit(&plan, 1).unwrap();
        let (model, _) = tiny();
        let examples: Vec<Example> = indices.iter().map(|&i| separable()[i].clone()).collect();
        let mut fresh = BertTrainer::new(model, fresh_encoder, examples, None).unwrap();
        assert_eq!(fresh.fit(&plan, 1).unwrap(), subset_loss);
        let (a, b) = (sub.model().tensor_set().unwrap(), fresh.model().tensor_set().unwrap());
        assert!(a.names().all(|n| a.get(n).unwrap() == b.get(n).unwrap()), "same weights after training");
        let (other, _) = tiny();
        assert!(pooled.subset(other, &[99]).is_err());
    }

    fn record_level(
        mut plan: TrainingPlan,
        noise_multiplier: f64,
        clip_norm: f64,
        sampling_rate: f64,
        update_clip_norm: f64,
    ) -> TrainingPlan {
        plan.privacy = PrivacyPlan::RecordLevel { noise_multiplier, clip_norm, sampling_rate, update_clip_norm };
        plan.max_grad_norm = 0.0;
        plan
    }

    fn norm(sum: &[Vec<f64>]) -> f64 {
        sum.iter().flatten().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// However large an example's gradient, it moves the summed gradient by at most `C`;
    /// below `C` it is added unchanged.
    #[test]
    fn per_example_clipping_bounds_each_examples_contribution() {
        for trainable in [Trainable::Head, Trainable::TopLayers(1), Trainable::All] {
            let (model, encoder) = tiny();
            let names: HashSet<String> = trainable.select(model.tensor_set().unwrap().names()).into_iter().collect();
            let plan = plan(trainable, &model, 1);
            let mut data = Prepared::new(separable());
            let vars = prepare_training(&model, &encoder, &mut data, &names, &plan).unwrap();
            let zero = || vars.iter().map(|v| vec![0.0; v.elem_count()]).collect::<Vec<_>>();
            let c = 1e-4;
            let mut batch_sum = zero();
            for i in 0..data.examples.len() {
                // Unclipped (C far above any gradient): the raw gradient and its norm.
                let mut raw = zero();
                let mode = &mut Mode { trainable: &names, dropout_rng: None, per_example: None };
                let (_, raw_norm) = add_clipped_gradient(&model, &data, &vars, i, 1e9, mode, &mut raw).unwrap();
                assert!((norm(&raw) - raw_norm).abs() <= 1e-6 * raw_norm, "{trainable}: unclipped gradients pass unchanged");
                assert!(raw_norm > 100.0 * c, "{trainable}: example {i} must be clipped for this test ({raw_norm})");
                let mut one = zero();
                let mode = &mut Mode { trainable: &names, dropout_rng: None, per_example: None };
                add_clipped_gradient(&model, &data, &vars, i, c, mode, &mut one).unwrap();
                assert!(norm(&one) <= c, "{trainable}: example {i} contributes {} > C", norm(&one));
                assert!(norm(&one) > c * (1.0 - 1e-6), "{trainable}: clipped to C, not below");
                let cos = raw.iter().flatten().zip(one.iter().flatten()).map(|(a, b)| a * b).sum::<f64>() / (raw_norm * norm(&one));
                assert!((cos - 1.0).abs() < 1e-5, "{trainable}: direction kept ({cos})");
                let mode = &mut Mode { trainable: &names, dropout_rng: None, per_example: None };
                add_clipped_gradient(&model, &data, &vars, i, c, mode, &mut batch_sum).unwrap();
            }
            // A batch of everyone: at most n C by the triangle inequality.
            assert!(norm(&batch_sum) <= data.examples.len() as f64 * c);
        }
    }

    /// The batched per-example path (adapters, biases and classifier copied per example) clips
    /// and sums exactly what one pass per example does.
    #[test]
    fn batched_per_example_clipping_matches_one_pass_per_example() {
        for trainable in [Trainable::TopLora(2), Trainable::TopBiases(1), Trainable::TopBiases(2)] {
            assert_batched_clipping_matches_one_pass_per_example(trainable);
        }
    }

    fn assert_batched_clipping_matches_one_pass_per_example(trainable: Trainable) {
        let (mut model, encoder) = tiny();
        let plan = plan(trainable, &model, 1);
        let names = begin_training(&mut model, &plan, 1).unwrap();
        assert!(model.supports_per_example(&names), "{trainable}");
        // Train a few steps first so B is non-zero and every adapter has a gradient.
        let mut data = Prepared::new(separable());
        let mut warm = plan.clone();
        warm.learning_rate = 5e-2;
        train_loop(&mut model, &encoder, &mut data, &names, &warm, 1).unwrap();
        let vars = prepare_training(&model, &encoder, &mut data, &names, &plan).unwrap();
        assert!(data.cache.is_some(), "{trainable}: the layers below the trained ones are a cached prefix");
        let mut sorted: Vec<String> = names.iter().cloned().collect();
        sorted.sort();
        let zero = || vars.iter().map(|v| vec![0.0; v.elem_count()]).collect::<Vec<_>>();
        let idx: Vec<usize> = (0..data.examples.len()).collect();
        for c in [1e-3, 1e9] {
            let mut one_by_one = zero();
            let mut norms = Vec::new();
            for &i in &idx {
                let mode = &mut Mode { trainable: &names, dropout_rng: None, per_example: None };
                norms.push(add_clipped_gradient(&model, &data, &vars, i, c, mode, &mut one_by_one).unwrap().1);
            }
            let mut batched = zero();
            // In two chunks, without dropout as in the one-by-one passes.
            let mut batched_norms = Vec::new();
            for chunk in idx.chunks(10) {
                let (_, n) = add_clipped_gradients_batched(&model, &data, &vars, &sorted, &names, chunk, c, None, &mut batched).unwrap();
                batched_norms.extend(n);
            }
            assert_eq!(batched_norms.len(), norms.len());
            for (a, b) in norms.iter().zip(&batched_norms) {
                assert!((a - b).abs() <= 1e-4 * a.max(1e-3), "norms {a} vs {b}");
            }
            let scale = norm(&one_by_one).max(1e-9);
            let diff: f64 = one_by_one.iter().flatten().zip(batched.iter().flatten()).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
            assert!(diff / scale < 1e-4, "{trainable}, C {c}: sums differ by {diff} (norm {scale})");
        }
    }

    /// An empty batch still takes a (pure-noise) step: the step count is the plan's, always.
    #[test]
    fn dp_sgd_takes_exactly_the_planned_steps_including_empty_batches() {
        let (model, encoder) = tiny();
        let global = model.tensor_set().unwrap();
        // n = 24, q = 0.02: about 62% of the 50 batches are empty.
        let plan = record_level(plan(Trainable::Head, &model, 1), 1.0, 1.0, 0.02, 10.0);
        let mut trainer = BertTrainer::new(model, encoder, separable(), None).unwrap();
        let mut rng = NoiseRng::from_seed_insecure([5; 32]);
        let update = trainer.train(TrainContext { round: RoundId(1), noise_rng: &mut rng }, &global, &plan).unwrap();
        let planned = fedward_shared::dp::Release::planned(&plan.privacy, plan.local_epochs).unwrap().steps;
        assert_eq!(planned, 50);
        assert_eq!(update.dp_steps, planned);
        assert!(update.delta.l2_norm() > 0.0 && update.delta.l2_norm() <= 10.0);

        // The same run, observed from inside: the empty batches were steps too.
        let (model, encoder) = tiny();
        let names: HashSet<String> = plan.trainable_tensors.iter().cloned().collect();
        let mut data = Prepared::new(separable());
        let mut m = model;
        let dp = DpSgd { noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0.02 };
        let mut rng = NoiseRng::from_seed_insecure([5; 32]);
        let run = dp_sgd_loop(&mut m, &encoder, &mut data, &names, &plan, dp, 1, &mut rng).unwrap();
        assert_eq!(run.steps, 50);
        assert!(run.empty_batches >= 15 && run.empty_batches < 50, "{run:?}");
        assert!(run.sampled > 0, "{run:?}");
    }

    /// With little noise, DP-SGD still learns the separable set; the update respects its
    /// bound and the loss falls. The noise is small because AdamW normalises every
    /// coordinate: where noise dominates the gradient (most of a tiny model's coordinates
    /// at batch ~19), each step moves it by about the learning rate in a random direction
    /// (see docs/DEVELOPMENT-NOTES.md); this test checks the mechanics, not the utility.
    #[test]
    fn dp_sgd_with_small_noise_learns_a_separable_set() {
        let (model, encoder) = tiny();
        let mut global = model.tensor_set().unwrap();
        // 192 examples, q = 0.1: expected batch 19.2, 20 steps per round.
        let mut plan = record_level(plan(Trainable::TopLayers(1), &model, 2), 0.003, 0.05, 0.1, 5.0);
        plan.learning_rate = 1e-2;
        plan.warmup_ratio = 0.0;
        let many: Vec<Example> = (0..8).flat_map(|_| separable()).collect();
        let mut trainer = BertTrainer::new(model, encoder, many, Some(separable())).unwrap();
        let mut rng = NoiseRng::from_seed_insecure([9; 32]);
        let mut losses = Vec::new();
        for round in 1..=6 {
            let update = trainer.train(TrainContext { round: RoundId(round), noise_rng: &mut rng }, &global, &plan).unwrap();
            assert_eq!(update.dp_steps, 20);
            assert!(update.delta.l2_norm() <= 5.0);
            losses.push(update.metrics.train_loss);
            for (name, d) in update.delta.iter() {
                let g = global.get_mut(name).unwrap();
                g.data_mut().iter_mut().zip(d.data()).for_each(|(w, x)| *w += x);
            }
        }
        trainer.model_mut().load(&global).unwrap();
        let (_, report) = trainer.evaluate_validation(&plan).unwrap().unwrap();
        assert!(report.accuracy >= 0.9, "accuracy {} after DP-SGD; losses {losses:?}", report.accuracy);
        assert!(losses[5] < 0.5 * losses[0], "{losses:?}");
    }

    #[test]
    fn record_level_plans_never_train_without_dp_sgd() {
        let (model, encoder) = tiny();
        let plan = record_level(plan(Trainable::Head, &model, 1), 1.0, 1.0, 0.5, 1.0);
        let mut trainer = BertTrainer::new(model, encoder, separable(), None).unwrap();
        assert!(matches!(trainer.fit(&plan, 1), Err(TrainError::InvalidPlan(_))));
    }

    fn scalar(t: &Tensor) -> f64 {
        f64::from(t.to_scalar::<f32>().unwrap())
    }

    /// The proximal term and its gradient: by hand for weights (`mu/2 ||d||^2` and `mu d`),
    /// against central finite differences for adapters, and equal to the term over the
    /// merged change `scale B A` once the adapters are folded into the weights.
    #[test]
    fn proximal_term_and_gradient_match_hand_computation_and_finite_differences() {
        let mu = 0.5;
        let (model, _) = tiny();
        let trainable: HashSet<String> = Trainable::TopBiases(1).select(model.tensor_set().unwrap().names()).into_iter().collect();
        let prox = Proximal::new(&model, &trainable, mu).unwrap().unwrap();
        assert_eq!(scalar(&prox.term(&model).unwrap()), 0.0, "no distance at the start");
        let vars = model.vars_of(&trainable).unwrap();
        let mut moved = Vec::new();
        for (k, v) in vars.iter().enumerate() {
            let d: Vec<f32> = (0..v.elem_count()).map(|i| 0.01 * ((i + k) % 7) as f32 - 0.03).collect();
            v.set(&(v.as_tensor() + Tensor::from_vec(d.clone(), v.shape(), &Device::Cpu).unwrap()).unwrap()).unwrap();
            moved.push(d);
        }
        let want = mu / 2.0 * moved.iter().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        let got = scalar(&prox.term(&model).unwrap());
        assert!((got - want).abs() <= 1e-5 * want, "term {got}, by hand {want}");
        let grads = prox.term(&model).unwrap().backward().unwrap();
        for (v, d) in vars.iter().zip(&moved) {
            let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (g, d) in g.iter().zip(d) {
                // The distance is the moved weight minus its anchor, itself rounded to f32.
                assert!((f64::from(*g) - mu * f64::from(*d)).abs() <= 1e-6, "gradient {g}, by hand {}", mu * f64::from(*d));
            }
        }

        // Adapters: B made non-zero, as after some training.
        let (mut model, _) = tiny();
        let global = model.tensor_set().unwrap();
        let plan = plan(Trainable::TopLora(2), &model, 1);
        let names = begin_training(&mut model, &plan, 1).unwrap();
        let prox = Proximal::new(&model, &names, mu).unwrap().unwrap();
        let b_names: HashSet<String> = names.iter().filter(|n| n.ends_with(".lora_b")).cloned().collect();
        for (k, b) in model.vars_of(&b_names).unwrap().iter().enumerate() {
            let values: Vec<f32> = (0..b.elem_count()).map(|i| 0.05 * (((i * 3 + k) % 11) as f32 - 5.0)).collect();
            b.set(&Tensor::from_vec(values, b.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let term = |model: &BertClassifier| scalar(&prox.term(model).unwrap());
        let grads = prox.term(&model).unwrap().backward().unwrap();
        let h = 1e-2f32;
        let probe: HashSet<String> =
            ["bert.encoder.layer.1.attention.self.query.weight.lora_a", "bert.encoder.layer.1.output.dense.weight.lora_b"]
                .map(str::to_owned)
                .into();
        for var in model.vars_of(&probe).unwrap() {
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in [0, 1, base.len() / 2, base.len() - 1] {
                let at = |x: f32| {
                    let mut values = base.clone();
                    values[i] = x;
                    var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    term(&model)
                };
                let numeric = (at(base[i] + h) - at(base[i] - h)) / (2.0 * f64::from(h));
                at(base[i]);
                let a = f64::from(analytic[i]);
                assert!((numeric - a).abs() <= 1e-3 * a.abs().max(1e-2), "coordinate {i}: analytic {a}, finite differences {numeric}");
            }
        }
        // Over the merged change: the term equals mu/2 ||W - W_global||^2 after merging.
        let before_merge = term(&model);
        assert!(before_merge > 0.0);
        model.merge_adapters().unwrap();
        let merged = model.tensor_set().unwrap();
        let change: f64 = merged
            .iter()
            .map(|(n, t)| t.data().iter().zip(global.get(n).unwrap().data()).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>())
            .sum();
        assert!(
            (before_merge - mu / 2.0 * change).abs() <= 1e-3 * before_merge,
            "term {before_merge}, merged change {}",
            mu / 2.0 * change
        );
    }

    /// The update's norm after one round from the tiny model, with `prox_mu` set.
    fn update_norm(mut plan: TrainingPlan, prox_mu: f64) -> f64 {
        let (model, encoder) = tiny();
        let global = model.tensor_set().unwrap();
        plan.prox_mu = prox_mu;
        let mut trainer = BertTrainer::new(model, encoder, separable(), None).unwrap();
        let mut rng = NoiseRng::from_seed_insecure([3; 32]);
        let update = trainer.train(TrainContext { round: RoundId(1), noise_rng: &mut rng }, &global, &plan).unwrap();
        update.delta.l2_norm()
    }

    /// Same seed, same data: the proximal term keeps the trained weights nearer the global
    /// ones, for every kind of plan, under DP-SGD too (same noise and samples, from the same
    /// NoiseRng seed, and the same steps).
    #[test]
    fn fedprox_keeps_the_update_closer_to_the_global_model() {
        for trainable in [Trainable::Head, Trainable::TopLayers(1), Trainable::TopBiases(1), Trainable::TopLora(2)] {
            let (model, _) = tiny();
            let plan = plan(trainable, &model, 3);
            let (free, held) = (update_norm(plan.clone(), 0.0), update_norm(plan, 5.0));
            assert!(held < 0.9 * free, "{trainable}: with mu the update's norm is {held}, without {free}");
            let dp = record_level(self::plan(trainable, &model, 2), 0.5, 1.0, 0.25, 100.0);
            let (free, held) = (update_norm(dp.clone(), 0.0), update_norm(dp, 5.0));
            assert!(held < 0.9 * free, "{trainable}, DP-SGD: with mu the update's norm is {held}, without {free}");
        }
    }

    /// With a huge mu nothing moves: SGD at `learning_rate * mu = 1` starts every step
    /// again from the global model, so the update is one step's worth; AdamW's steps are
    /// each about the learning rate, pulled back every time.
    #[test]
    fn a_huge_prox_mu_leaves_the_update_near_zero() {
        let (model, _) = tiny();
        let mut sgd = plan(Trainable::TopLayers(1), &model, 10);
        sgd.optimizer = fedward_shared::plan::Optimizer::Sgd { momentum: 0.0 };
        sgd.learning_rate = 0.1;
        sgd.warmup_ratio = 0.0;
        sgd.max_grad_norm = 0.0;
        let (free, held) = (update_norm(sgd.clone(), 0.0), update_norm(sgd, 10.0));
        assert!(held < 0.1 * free, "SGD: with a huge mu the update's norm is {held}, without {free}");
        let adamw = plan(Trainable::TopLayers(1), &model, 10);
        let (free, held) = (update_norm(adamw.clone(), 0.0), update_norm(adamw, 1e4));
        assert!(held < 0.1 * free, "AdamW: with a huge mu the update's norm is {held}, without {free}");
    }

    #[test]
    fn a_negative_or_infinite_prox_mu_is_refused() {
        for mu in [-1.0, f64::INFINITY, f64::NAN] {
            let (model, encoder) = tiny();
            let mut plan = plan(Trainable::Head, &model, 1);
            plan.prox_mu = mu;
            let mut trainer = BertTrainer::new(model, encoder, separable(), None).unwrap();
            assert!(matches!(trainer.fit(&plan, 1), Err(TrainError::InvalidPlan(_))), "{mu}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(schedule(1.0, 0, 2, 10), 0.5);
        assert_eq!(schedule(1.0, 1, 2, 10), 1.0);
        assert_eq!(schedule(1.0, 2, 2, 10), 1.0);
        assert!((schedule(1.0, 9, 2, 10) - 0.125).abs() < 1e-12);
        assert_eq!(schedule(1.0, 0, 0, 4), 1.0);
    }

    #[test]
    fn length_grouped_batches_cover_every_example_once_with_little_padding() {
        // Lengths 10..=109 in a scrambled order, 100 examples, batches of 4, pools of 32.
        let lengths: Vec<usize> = (0..100).map(|i| 10 + (i * 37) % 100).collect();
        let draw = |seed| length_grouped_batches(&lengths, 4, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let batches = draw(3);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 4));
        // Padded tokens: a batch costs len(batch) x its longest member.
        let padded = |bs: &[Vec<usize>]| -> usize { bs.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap()).sum() };
        let plain: Vec<Vec<usize>> = (0..100).collect::<Vec<_>>().chunks(4).map(<[usize]>::to_vec).collect();
        let real: usize = lengths.iter().sum();
        assert!(padded(&batches) - real < (padded(&plain) - real) / 3, "grouping should cut padding by far more than a third");
        // Seeded: the same seed draws the same batches, another seed others.
        assert_eq!(batches, draw(3));
        assert_ne!(batches, draw(4));
    }
}
