//! Builds the site's trainer from its config: the BERT classifier from the base model
//! directory, the site's training (and validation) data, the compute device.

use anyhow::{Context, Result};
use tracing::info;

use fedward_models::io::load_dir;
use fedward_models::text::read_jsonl;
use fedward_models::train::{device, BertTrainer};
use fedward_models::Trainer;
use fedward_shared::config::AgentConfig;

/// The trainer the daemon runs each round.
pub fn build(cfg: &AgentConfig) -> Result<Box<dyn Trainer>> {
    let device = device(&cfg.device)?;
    let (model, encoder) = load_dir(&cfg.model_base, Some(&cfg.labels), 0, &device)
        .with_context(|| format!("loading the base model from {}", cfg.model_base.display()))?;
    let train = read_jsonl(&cfg.train_data, &cfg.labels)?;
    let validation = cfg.validation_data.as_deref().map(|p| read_jsonl(p, &cfg.labels)).transpose()?;
    info!(
        train = train.len(),
        validation = validation.as_ref().map_or(0, Vec::len),
        device = ?device,
        layers = model.config.num_hidden_layers,
        "site data and model loaded"
    );
    Ok(Box::new(BertTrainer::new(model, encoder, train, validation)?))
}
