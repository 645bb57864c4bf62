//! The coordinator's state directory: global model checkpoints and round history.
//!
//! Layout: `checkpoints/round-NNNNN.safetensors` (the global model after round N; round 0
//! is the initial model) and `state.json` (completed rounds, the current checkpoint and its
//! digest, the history of rounds). Each file is written atomically (temp file, fsync,
//! rename, directory fsync) and the checkpoint before the state that points to it, so a
//! crash at any moment leaves a consistent state to resume from.

use std::path::{Path, PathBuf};

use fedward_shared::checkpoint::{ensure_classification_head, normalise_bert_names};
use fedward_shared::fsutil::{self, FsError};
use fedward_shared::history::{checkpoint_name, RoundRecord, SavedState, SiteRecord, STATE_FILE};
use fedward_shared::tensor::{TensorError, TensorSet};

use crate::round::{Checkpoint, RoundFailure, RoundSummary};

/// Checkpoints older than this many rounds are pruned (round 0 is always kept).
pub const KEEP_CHECKPOINTS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {error}")]
    Tensors { path: PathBuf, error: TensorError },
    #[error("{path}: corrupt state: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("initial model {path}: {detail}")]
    Init { path: PathBuf, detail: String },
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: Option<SavedState>,
}

impl Store {
    /// Opens the directory (creating it) and reads `state.json` when present.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir.join("checkpoints")).map_err(|error| FsError::Io { path: dir.to_owned(), error })?;
        let path = dir.join(STATE_FILE);
        let state = if path.exists() {
            let bytes = fsutil::read(&path)?;
            Some(serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { path, detail: e.to_string() })?)
        } else {
            None
        };
        Ok(Self { dir: dir.to_owned(), state })
    }

    pub fn state(&self) -> Option<&SavedState> {
        self.state.as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current global model and completed rounds; the checkpoint's digest is checked
    /// against the one recorded in the state.
    pub fn load_current(&self) -> Result<Option<(TensorSet, u64)>, StoreError> {
        let Some(state) = &self.state else { return Ok(None) };
        let path = self.dir.join(&state.checkpoint);
        let bytes = fsutil::read(&path)?;
        let model = TensorSet::from_safetensors(&bytes, false).map_err(|error| StoreError::Tensors { path: path.clone(), error })?;
        let digest = model.digest().to_hex();
        if digest != state.model_digest {
            return Err(StoreError::Corrupt {
                path,
                detail: format!("checkpoint digest {digest} does not match state.json ({})", state.model_digest),
            });
        }
        Ok(Some((model, state.completed_rounds)))
    }

    /// Writes the initial model as round 0.
    pub fn save_initial(&mut self, model: &TensorSet) -> Result<(), StoreError> {
        self.write_checkpoint(0, model)?;
        self.write_state(SavedState {
            format: 1,
            completed_rounds: 0,
            checkpoint: checkpoint_name(0),
            model_digest: model.digest().to_hex(),
            history: Vec::new(),
        })
    }

    /// Makes a completed round durable: checkpoint first, then the state pointing to it.
    pub fn save_round(&mut self, cp: &Checkpoint, now_rfc3339: &str) -> Result<(), StoreError> {
        self.write_checkpoint(cp.completed_rounds, &cp.model)?;
        let mut state = self.state.clone().unwrap_or_else(|| SavedState {
            format: 1,
            completed_rounds: 0,
            checkpoint: String::new(),
            model_digest: String::new(),
            history: Vec::new(),
        });
        state.completed_rounds = cp.completed_rounds;
        state.checkpoint = checkpoint_name(cp.completed_rounds);
        state.model_digest = cp.summary.model_digest.to_hex();
        state.history.push(record_of_summary(&cp.summary, now_rfc3339));
        self.write_state(state)?;
        self.prune(cp.completed_rounds);
        Ok(())
    }

    /// Records a failed round in the history.
    pub fn save_failure(&mut self, f: &RoundFailure, now_rfc3339: &str) -> Result<(), StoreError> {
        let Some(mut state) = self.state.clone() else { return Ok(()) };
        state.history.push(RoundRecord {
            round: f.round.0,
            attempt: f.attempt,
            outcome: if f.gave_up { format!("failed, federation stopped: {}", f.reason) } else { format!("failed: {}", f.reason) },
            finished_at: now_rfc3339.to_owned(),
            duration_secs: 0.0,
            sites: Vec::new(),
            declined: f.declined.iter().map(|(s, r, m)| (s.to_string(), format!("{r:?}: {m}"))).collect(),
            rejected: f.rejected.iter().map(|(s, r)| (s.to_string(), r.to_string())).collect(),
            missed: f.missed.iter().map(ToString::to_string).collect(),
            mean_train_loss: None,
            model_digest: None,
        });
        self.write_state(state)
    }

    /// Path of the checkpoint after `round`.
    pub fn checkpoint_path(&self, round: u64) -> PathBuf {
        self.dir.join(checkpoint_name(round))
    }

    fn write_checkpoint(&self, round: u64, model: &TensorSet) -> Result<(), StoreError> {
        let path = self.checkpoint_path(round);
        let meta = [("round".to_owned(), round.to_string()), ("format".to_owned(), "fedward-global".to_owned())];
        fsutil::atomic_write_with(&path, |tmp| model.write_safetensors(tmp, Some(meta.into_iter().collect())))?;
        Ok(())
    }

    fn write_state(&mut self, state: SavedState) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| StoreError::Corrupt { path: path.clone(), detail: e.to_string() })?;
        fsutil::atomic_write(&path, &bytes, false)?;
        self.state = Some(state);
        Ok(())
    }

    fn prune(&self, latest: u64) {
        for round in 1..latest.saturating_sub(KEEP_CHECKPOINTS - 1) {
            let path = self.checkpoint_path(round);
            if path.exists() {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), cause = %e, "could not prune an old checkpoint");
                }
            }
        }
    }
}

fn record_of_summary(s: &RoundSummary, now_rfc3339: &str) -> RoundRecord {
    RoundRecord {
        round: s.round.0,
        attempt: s.attempt,
        outcome: "completed".into(),
        finished_at: now_rfc3339.to_owned(),
        duration_secs: s.duration.as_secs_f64(),
        sites: s
            .contributions
            .iter()
            .map(|c| SiteRecord {
                site: c.site.to_string(),
                num_examples: c.num_examples,
                weight: Some(c.weight),
                update_norm: Some(c.update_norm),
                scale: Some(c.scale),
                train_loss: c.metrics.train_loss,
                val_accuracy: c.metrics.val_accuracy,
                val_macro_f1: c.metrics.val_macro_f1,
                privacy_mode: c.privacy.mode.to_string(),
                noise_multiplier: c.privacy.noise_multiplier,
                clip_norm: c.privacy.clip_norm,
                epsilon_after: c.privacy.epsilon_after.is_finite().then_some(c.privacy.epsilon_after),
                update_digest: c.update_digest.to_hex(),
            })
            .collect(),
        declined: s.declined.iter().map(|(site, r, m)| (site.to_string(), format!("{r:?}: {m}"))).collect(),
        rejected: s.rejected.iter().map(|(site, r)| (site.to_string(), r.to_string())).collect(),
        missed: s.missed.iter().map(ToString::to_string).collect(),
        mean_train_loss: Some(s.mean_train_loss),
        model_digest: Some(s.model_digest.to_hex()),
    }
}

/// Loads the initial global model: a model directory (`model.safetensors`) or a
/// `.safetensors` file, brought to transformers' classification naming with a seeded head
/// for `num_labels` when the base has none.
pub fn load_initial_model(path: &Path, num_labels: usize, seed: u64) -> Result<TensorSet, StoreError> {
    let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_owned() };
    if !file.exists() {
        return Err(StoreError::Init {
            path: file,
            detail: "not found; for the pretrained MiniLM base run `scripts/fetch-models.sh` first".into(),
        });
    }
    let bytes = fsutil::read(&file)?;
    let raw = TensorSet::from_safetensors(&bytes, true).map_err(|error| StoreError::Tensors { path: file.clone(), error })?;
    let mut model = normalise_bert_names(raw);
    ensure_classification_head(&mut model, num_labels, seed).map_err(|e| StoreError::Init { path: file.clone(), detail: e.to_string() })?;
    model.check_finite().map_err(|error| StoreError::Tensors { path: file, error })?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use fedward_shared::tensor::Tensor;
    use fedward_shared::wire::RoundId;

    use super::*;

    fn model(v: f32) -> TensorSet {
        let mut m = TensorSet::new();
        m.insert("classifier.weight", Tensor::new(vec![2], vec![v, v]).unwrap());
        m
    }

    fn checkpoint(round: u64, v: f32) -> Checkpoint {
        let m = model(v);
        Checkpoint {
            completed_rounds: round,
            summary: RoundSummary {
                round: RoundId(round),
                attempt: 1,
                contributions: Vec::new(),
                declined: Vec::new(),
                rejected: Vec::new(),
                missed: Vec::new(),
                mean_train_loss: 0.5,
                duration: Duration::from_secs(3),
                model_digest: m.digest(),
            },
            model: Arc::new(m),
        }
    }

    #[test]
    fn resumes_from_the_last_saved_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert!(store.load_current().unwrap().is_none());
        store.save_initial(&model(0.0)).unwrap();
        for r in 1..=7 {
            store.save_round(&checkpoint(r, r as f32), "t").unwrap();
        }
        let reopened = Store::open(dir.path()).unwrap();
        let (m, completed) = reopened.load_current().unwrap().unwrap();
        assert_eq!((m, completed), (model(7.0), 7));
        assert_eq!(reopened.state().unwrap().history.len(), 7);
        assert!(reopened.checkpoint_path(0).exists());
        assert!(!reopened.checkpoint_path(1).exists(), "old checkpoints are pruned");
        assert!(reopened.checkpoint_path(3).exists());
    }

    #[test]
    fn a_checkpoint_that_does_not_match_the_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.save_initial(&model(0.0)).unwrap();
        let bytes = model(9.0).to_safetensors(None).unwrap();
        std::fs::write(store.checkpoint_path(0), bytes).unwrap();
        let err = Store::open(dir.path()).unwrap().load_current().unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn missing_initial_model_names_the_fetch_command() {
        let err = load_initial_model(Path::new("/nonexistent/model"), 4, 0).unwrap_err();
        assert!(err.to_string().contains("scripts/fetch-models.sh"), "{err}");
    }
}
