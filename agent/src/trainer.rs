//! Builds the site's trainer from its config: the BERT classifier from the base model
//! directory, the site's training data (with clinicians' corrections from the triage
//! service) and validation data, the compute device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use tracing::{info, warn};

use fedward_models::io::load_dir;
use fedward_models::text::{read_jsonl, Example};
use fedward_models::train::{device, BertTrainer};
use fedward_models::{LocalUpdate, TrainContext, TrainError, Trainer};
use fedward_shared::config::AgentConfig;
use fedward_shared::plan::TrainingPlan;
use fedward_shared::tensor::TensorSet;

/// The trainer the daemon runs each round.
pub fn build(cfg: &AgentConfig) -> Result<Box<dyn Trainer>> {
    let device = device(&cfg.device)?;
    let (model, encoder) = load_dir(&cfg.model_base, Some(&cfg.labels), 0, &device)
        .with_context(|| format!("loading the base model from {}", cfg.model_base.display()))?;
    let data = SiteData { train: cfg.train_data.clone(), feedback: cfg.feedback_data.clone(), labels: cfg.labels.clone() };
    let (train, seen) = data.load()?;
    let validation = cfg.validation_data.as_deref().map(|p| read_jsonl(p, &cfg.labels)).transpose()?;
    info!(
        train = train.len(),
        validation = validation.as_ref().map_or(0, Vec::len),
        device = ?device,
        layers = model.config.num_hidden_layers,
        "site data and model loaded"
    );
    Ok(Box::new(SiteTrainer { inner: BertTrainer::new(model, encoder, train, validation)?, data, seen }))
}

/// Where the site's training examples come from.
struct SiteData {
    train: PathBuf,
    feedback: PathBuf,
    labels: Vec<String>,
}

/// What the feedback file looked like when it was read: a change means new corrections.
type Seen = Option<(u64, SystemTime)>;

fn seen(path: &Path) -> Seen {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

impl SiteData {
    fn load(&self) -> Result<(Vec<Example>, Seen)> {
        let seen = seen(&self.feedback);
        let train = read_jsonl(&self.train, &self.labels)?;
        let feedback = if seen.is_some() { read_jsonl(&self.feedback, &self.labels)? } else { Vec::new() };
        Ok((with_corrections(train, feedback), seen))
    }
}

/// The training examples with the clinicians' corrections applied: a corrected note's
/// label replaces the imported one, the latest correction of a note wins, and a note
/// corrected but not imported is added.
pub fn with_corrections(train: Vec<Example>, feedback: Vec<Example>) -> Vec<Example> {
    let mut latest: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    for e in feedback {
        if latest.insert(e.text.clone(), e.label).is_none() {
            order.push(e.text);
        }
    }
    let mut out: Vec<Example> = train
        .into_iter()
        .map(|mut e| {
            if let Some(&label) = latest.get(&e.text) {
                e.label = label;
            }
            e
        })
        .collect();
    let imported: std::collections::HashSet<&str> = out.iter().map(|e| e.text.as_str()).collect();
    let added: Vec<Example> =
        order.into_iter().filter(|t| !imported.contains(t.as_str())).map(|text| Example { label: latest[&text], text }).collect();
    out.extend(added);
    out
}

/// The BERT trainer, re-reading the site's data at a round's start when the triage
/// service has recorded corrections since the last read.
struct SiteTrainer {
    inner: BertTrainer,
    data: SiteData,
    seen: Seen,
}

impl SiteTrainer {
    /// Re-reads the site's data when the feedback file changed since the last read; whether
    /// it did. A file that cannot be read leaves the data already loaded (the next round
    /// retries).
    fn refresh(&mut self) -> Result<bool, TrainError> {
        if seen(&self.data.feedback) == self.seen {
            return Ok(false);
        }
        match self.data.load() {
            Ok((train, seen)) => {
                info!(train = train.len(), "site data re-read with clinicians' corrections");
                self.inner.replace_train(train)?;
                self.seen = seen;
                Ok(true)
            }
            Err(e) => {
                warn!(cause = %e, "could not re-read the site's data; training on what was loaded");
                Ok(false)
            }
        }
    }
}

impl Trainer for SiteTrainer {
    fn train(&mut self, ctx: TrainContext<'_>, global: &TensorSet, plan: &TrainingPlan) -> Result<LocalUpdate, TrainError> {
        self.refresh()?;
        self.inner.train(ctx, global, plan)
    }

    fn num_examples(&self) -> u64 {
        self.inner.num_examples()
    }

    fn can_score(&self) -> bool {
        self.inner.can_score()
    }

    fn score(&mut self, global: &TensorSet, plan: &TrainingPlan) -> Result<Option<(u64, u64)>, TrainError> {
        self.inner.score(global, plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, label: usize) -> Example {
        Example { text: text.into(), label }
    }

    /// The triage service appends a correction; the next round trains on it.
    #[test]
    fn a_new_correction_is_trained_on_from_the_next_round() {
        use fedward_models::bert::{BertClassifier, BertConfig};
        use fedward_models::text::TextEncoder;
        let dir = tempfile::tempdir().unwrap();
        let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect();
        let encoder = TextEncoder::tiny(&["needs", "a", "bed", "scan"]);
        let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels.clone(), 1, &candle_core::Device::Cpu).unwrap();
        let (train, feedback) = (dir.path().join("train.jsonl"), dir.path().join("feedback.jsonl"));
        std::fs::write(&train, "{\"text\":\"needs a bed\",\"label\":\"bed\"}\n").unwrap();
        let data = SiteData { train: train.clone(), feedback: feedback.clone(), labels };
        let (examples, seen) = data.load().unwrap();
        let mut trainer = SiteTrainer { inner: BertTrainer::new(model, encoder, examples, None).unwrap(), data, seen };
        assert!(!trainer.refresh().unwrap(), "nothing changed");
        fedward_shared::fsutil::append_line(&feedback, "{\"text\":\"needs a scan\",\"label\":\"device\"}").unwrap();
        assert!(trainer.refresh().unwrap());
        assert_eq!(trainer.num_examples(), 2);
        // A correction of an imported note replaces its label rather than adding a row.
        fedward_shared::fsutil::append_line(&feedback, "{\"text\":\"needs a bed\",\"label\":\"doctor\"}").unwrap();
        assert!(trainer.refresh().unwrap());
        assert_eq!(trainer.num_examples(), 2);
        assert!(!trainer.refresh().unwrap());
    }

    #[test]
    fn corrections_replace_imported_labels_and_the_latest_wins() {
        let train = vec![ex("a", 0), ex("b", 1)];
        let feedback = vec![ex("b", 2), ex("c", 3), ex("b", 0), ex("c", 3)];
        assert_eq!(with_corrections(train, feedback), [ex("a", 0), ex("b", 0), ex("c", 3)]);
    }
}
