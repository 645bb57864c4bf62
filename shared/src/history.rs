//! The coordinator's saved state as a file format: `state.json` (completed rounds, the
//! current checkpoint and the history of every round) and the checkpoint file names of its
//! state directory.
//!
//! The coordinator writes it (`fedward_coordinator::store`); the admin dashboard, the demo
//! and an operator's own tools read it. Pure: serde types and names, no file access.

use serde::{Deserialize, Serialize};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// The checkpoint of the global model after `round` (round 0 is the initial model),
/// relative to the state directory.
pub fn checkpoint_name(round: u64) -> String {
    format!("checkpoints/round-{round:05}.safetensors")
}

/// One site's part in a round, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub site: String,
    /// The examples the site claimed.
    pub num_examples: u64,
    /// What its update weighed (the claim clamped, or 1 under equal weighting). Absent in
    /// records written before the coordinator bounded updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    /// The update's L2 norm as it arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_norm: Option<f64>,
    /// What the norm bound scaled it by (1: within the bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Absent when the site withheld its metrics (the default under a DP plan).
    #[serde(default)]
    pub train_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub val_macro_f1: Option<f64>,
    pub privacy_mode: String,
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    pub epsilon_after: Option<f64>,
    pub update_digest: String,
}

/// A completed or failed round, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub attempt: u32,
    pub outcome: String,
    pub finished_at: String,
    pub duration_secs: f64,
    pub sites: Vec<SiteRecord>,
    pub declined: Vec<(String, String)>,
    pub rejected: Vec<(String, String)>,
    pub missed: Vec<String>,
    pub mean_train_loss: Option<f64>,
    pub model_digest: Option<String>,
    /// Model selection: the sites' scores of the model this round was offered (the
    /// previous round's). Absent when none was sent, and in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scored: Option<ScoreRecord>,
    /// Model selection's final scoring round: the round whose model was selected (this
    /// round's checkpoint is a copy of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<u64>,
}

/// The sites' scores of one global model on their validation splits, summed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreRecord {
    /// The round whose global model was scored (0: the initial model).
    pub model_round: u64,
    /// Correct answers as the sites sent them (noised under a DP plan), each clamped to
    /// its examples.
    pub correct: f64,
    pub examples: u64,
    pub sites: u32,
}

impl ScoreRecord {
    /// The example-weighted validation accuracy.
    pub fn accuracy(&self) -> Option<f64> {
        (self.examples > 0).then(|| self.correct / self.examples as f64)
    }
}

impl SavedState {
    /// The round whose model the federation selected, when model selection ran to its end.
    pub fn selected(&self) -> Option<u64> {
        self.history.iter().rev().find_map(|r| r.selected)
    }
}

/// `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub format: u32,
    pub completed_rounds: u64,
    pub checkpoint: String,
    pub model_digest: String,
    pub history: Vec<RoundRecord>,
}
