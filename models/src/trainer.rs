//! The `Trainer` trait: how the agent asks a model to train one round on local data.
//!
//! The agent knows nothing about BERT: it hands the global model (named f32 tensors) and
//! the consortium's plan to a `Trainer` and gets back the delta of the trainable tensors.

use fedward_shared::dp::NoiseRng;
use fedward_shared::plan::TrainingPlan;
use fedward_shared::tensor::TensorSet;
use fedward_shared::wire::{LocalMetrics, RoundId};

/// What one round of local training produced.
#[derive(Clone, Debug)]
pub struct LocalUpdate {
    /// `trained - global` for exactly the plan's trainable tensors.
    pub delta: TensorSet,
    /// Training examples behind the update (the FedAvg weight).
    pub num_examples: u64,
    /// Aggregate figures only; never anything per record.
    pub metrics: LocalMetrics,
    /// Record-level DP: the noisy optimiser steps taken (0 otherwise). The agent records
    /// this in its ledger and refuses to send an update whose count differs from the plan's.
    pub dp_steps: u64,
}

/// Why local training failed. Messages never contain record text.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("global model does not fit the local model: {0}")]
    ModelMismatch(String),
    #[error("no training data")]
    NoData,
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("backend: {0}")]
    Backend(String),
}

/// Everything a round's training may use besides the model and the plan.
pub struct TrainContext<'a> {
    pub round: RoundId,
    /// Source of DP noise and Poisson sampling for record-level DP: a CSPRNG seeded from
    /// the OS in production (seeded only in tests). Dropout uses `plan.seed`: it needs no
    /// secrecy, because clipping bounds every example's gradient whatever the mask.
    pub noise_rng: &'a mut NoiseRng,
}

/// Trains the model on the site's own data.
pub trait Trainer: Send {
    /// Trains from `global` following `plan` and returns the delta of the trainable tensors.
    fn train(&mut self, ctx: TrainContext<'_>, global: &TensorSet, plan: &TrainingPlan) -> Result<LocalUpdate, TrainError>;

    /// Number of local training examples (for planning the privacy spend).
    fn num_examples(&self) -> u64;

    /// Whether [`score`](Self::score) can score a model (the site has a validation split).
    fn can_score(&self) -> bool {
        false
    }

    /// Federated model selection: scores `global` on the site's validation split, as
    /// `(correct, examples)`; `None` without a validation split. What leaves the site is
    /// decided by the agent's privacy step, never here.
    fn score(&mut self, global: &TensorSet, plan: &TrainingPlan) -> Result<Option<(u64, u64)>, TrainError> {
        let _ = (global, plan);
        Ok(None)
    }
}
