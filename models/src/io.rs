//! Loading and saving models as directories the wider ecosystem reads.
//!
//! A model directory holds `config.json` (transformers' `BertConfig`, with
//! `id2label`/`label2id` once exported), `model.safetensors` and `tokenizer.json`.
//! [`load_dir`] reads a pretrained base (all-MiniLM-L6-v2: bare encoder keys, no head) or
//! an exported classifier; [`export_dir`] writes what transformers loads as
//! `BertForSequenceClassification`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::{json, Value};

use fedward_shared::checkpoint::{ensure_classification_head, normalise_bert_names};
use fedward_shared::tensor::TensorSet;

use crate::bert::{BertClassifier, BertConfig, ModelError};
use crate::text::{TextEncoder, TextError};

/// Why a model directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{path} not found; run scripts/fetch-models.sh to fetch the pretrained model")]
    Missing { path: PathBuf },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Text(#[from] TextError),
}

fn read(path: &Path) -> Result<Vec<u8>, ModelDirError> {
    if !path.exists() {
        return Err(ModelDirError::Missing { path: path.to_owned() });
    }
    std::fs::read(path).map_err(|error| ModelDirError::Io { path: path.to_owned(), error })
}

/// The labels a `config.json` declares in `id2label`, if any.
fn labels_of(config: &Value) -> Option<Vec<String>> {
    let map = config.get("id2label")?.as_object()?;
    let mut pairs: Vec<(usize, String)> = map.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_owned()))).collect();
    pairs.sort();
    // transformers writes LABEL_0.. when no labels were given: not ours.
    if pairs.is_empty() || pairs.iter().enumerate().any(|(i, (k, _))| *k != i) || pairs.iter().all(|(_, l)| l.starts_with("LABEL_")) {
        return None;
    }
    Some(pairs.into_iter().map(|(_, l)| l).collect())
}

/// Loads a model directory. `labels` is used when the directory declares none (a
/// pretrained base); a directory with its own labels must agree with `labels` if given.
/// A base without a classification head gets one seeded by `head_seed` (to train).
pub fn load_dir(
    dir: &Path,
    labels: Option<&[String]>,
    head_seed: u64,
    device: &Device,
) -> Result<(BertClassifier, TextEncoder), ModelDirError> {
    load(dir, labels, Some(head_seed), device)
}

/// Loads a model directory to classify with: it must hold a trained classification head.
/// A pretrained base has none, and a seeded one would give random labels.
pub fn load_trained_dir(dir: &Path, device: &Device) -> Result<(BertClassifier, TextEncoder), ModelDirError> {
    load(dir, None, None, device)
}

fn load(
    dir: &Path,
    labels: Option<&[String]>,
    head_seed: Option<u64>,
    device: &Device,
) -> Result<(BertClassifier, TextEncoder), ModelDirError> {
    let config_path = dir.join("config.json");
    let raw: Value = serde_json::from_slice(&read(&config_path)?)
        .map_err(|e| ModelDirError::Invalid { path: config_path.clone(), detail: e.to_string() })?;
    let config: BertConfig =
        serde_json::from_value(raw.clone()).map_err(|e| ModelDirError::Invalid { path: config_path.clone(), detail: e.to_string() })?;
    let labels = match (labels_of(&raw), labels) {
        (Some(own), Some(want)) if own != want => {
            return Err(ModelDirError::Invalid {
                path: config_path,
                detail: format!("model labels {own:?} differ from the configured labels {want:?}"),
            })
        }
        (Some(own), _) => own,
        (None, Some(want)) => want.to_vec(),
        (None, None) => fedward_shared::config::DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect(),
    };
    let weights_path = dir.join("model.safetensors");
    let set = TensorSet::from_safetensors(&read(&weights_path)?, true)
        .map_err(|e| ModelDirError::Invalid { path: weights_path.clone(), detail: e.to_string() })?;
    let mut set = normalise_bert_names(set);
    match head_seed {
        Some(seed) => ensure_classification_head(&mut set, labels.len(), seed)
            .map_err(|e| ModelDirError::Invalid { path: weights_path, detail: e.to_string() })?,
        None if !set.contains("classifier.weight") || !set.contains("classifier.bias") => {
            return Err(ModelDirError::Invalid {
                path: weights_path,
                detail: "no trained classification head (classifier.weight, classifier.bias): this is a base model, which would \
                         give random labels; classify with a global model (`fedward-agent export`)"
                    .into(),
            })
        }
        None => {}
    }
    let model = BertClassifier::from_tensors(config, labels, &set, device)?;
    let encoder = TextEncoder::from_file(&dir.join("tokenizer.json"))?;
    Ok((model, encoder))
}

/// Writes a directory transformers loads as `BertForSequenceClassification`.
pub fn export_dir(model: &BertClassifier, encoder: &TextEncoder, dir: &Path) -> Result<(), ModelDirError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| ModelDirError::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let c = &model.config;
    let id2label: BTreeMap<String, String> = model.labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone())).collect();
    let label2id: BTreeMap<String, usize> = model.labels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect();
    let config = json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": c.hidden_dropout_prob,
        "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": null,
        "problem_type": "single_label_classification",
        "id2label": id2label,
        "label2id": label2id,
        "torch_dtype": "float32",
    });
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| ModelDirError::Invalid { path: path.clone(), detail: e.to_string() })?;
    std::fs::write(&path, text).map_err(io(&path))?;
    let path = dir.join("model.safetensors");
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    model
        .tensor_set()?
        .write_safetensors(&path, Some(meta))
        .map_err(|e| ModelDirError::Invalid { path: path.clone(), detail: e.to_string() })?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, encoder.json()).map_err(io(&path))?;
    let path = dir.join("tokenizer_config.json");
    let tc = json!({"tokenizer_class": "BertTokenizerFast", "do_lower_case": true, "model_max_length": c.max_position_embeddings,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"});
    std::fs::write(&path, tc.to_string()).map_err(io(&path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::bert::Mode;
    use crate::text::make_batch;

    fn logits(model: &BertClassifier, encoder: &TextEncoder) -> Vec<Vec<f32>> {
        let enc = encoder.encode(&["please admit to ward", "scan now"], 16).unwrap();
        let refs: Vec<_> = enc.iter().collect();
        let batch = make_batch(&refs, 0, &Device::Cpu).unwrap();
        let none = HashSet::new();
        model.forward(&batch, &mut Mode { trainable: &none, dropout_rng: None, per_example: None }).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn a_base_model_loads_to_train_and_never_to_classify() {
        let encoder = TextEncoder::tiny(&["please", "admit"]);
        let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect();
        let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels, 5, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        export_dir(&model, &encoder, dir.path()).unwrap();
        // A base without the head loads to train (a seeded head), never to classify.
        let weights = dir.path().join("model.safetensors");
        let mut base = TensorSet::from_safetensors(&std::fs::read(&weights).unwrap(), false).unwrap();
        base.remove("classifier.weight");
        base.remove("classifier.bias");
        std::fs::write(&weights, base.to_safetensors(None).unwrap()).unwrap();
        load_dir(dir.path(), None, 0, &Device::Cpu).unwrap();
        let Err(err) = load_trained_dir(dir.path(), &Device::Cpu) else { panic!("a base model loaded to classify") };
        let err = err.to_string();
        assert!(err.contains("no trained classification head"), "{err}");
    }

    #[test]
    fn export_then_import_gives_identical_logits_and_transformers_names() {
        let encoder = TextEncoder::tiny(&["please", "admit", "ward", "scan", "now"]);
        let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect();
        let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels.clone(), 5, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        export_dir(&model, &encoder, dir.path()).unwrap();
        let (back, back_enc) = load_dir(dir.path(), None, 0, &Device::Cpu).unwrap();
        assert_eq!(back.labels, labels);
        assert_eq!(logits(&model, &encoder), logits(&back, &back_enc));
        let (trained, _) = load_trained_dir(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(logits(&model, &encoder), logits(&trained, &back_enc));

        // The key names transformers' BertForSequenceClassification uses, for 2 layers.
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let mut names: Vec<String> = TensorSet::from_safetensors(&bytes, false).unwrap().names().map(str::to_owned).collect();
        names.sort();
        let mut expected = vec![
            "bert.embeddings.LayerNorm.bias",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.word_embeddings.weight",
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        for l in 0..2 {
            for s in [
                "attention.output.LayerNorm.bias",
                "attention.output.LayerNorm.weight",
                "attention.output.dense.bias",
                "attention.output.dense.weight",
                "attention.self.key.bias",
                "attention.self.key.weight",
                "attention.self.query.bias",
                "attention.self.query.weight",
                "attention.self.value.bias",
                "attention.self.value.weight",
                "intermediate.dense.bias",
                "intermediate.dense.weight",
                "output.LayerNorm.bias",
                "output.LayerNorm.weight",
                "output.dense.bias",
                "output.dense.weight",
            ] {
                expected.push(format!("bert.encoder.layer.{l}.{s}"));
            }
        }
        expected.sort();
        assert_eq!(names, expected);
        let config: Value = serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "BertForSequenceClassification");
        assert_eq!(config["id2label"]["2"], "device");
        assert_eq!(config["label2id"]["other"], 3);
    }

    #[test]
    fn missing_directory_names_the_fetch_command() {
        let err = load_dir(Path::new("/nonexistent"), None, 0, &Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("scripts/fetch-models.sh"), "{err}");
    }

    /// Runs only where `scripts/fetch-models.sh` has fetched MiniLM (never in CI).
    #[test]
    fn pretrained_minilm_loads_when_present() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models-data/all-MiniLM-L6-v2");
        if !dir.join("model.safetensors").exists() {
            eprintln!("skipped: MiniLM not fetched (scripts/fetch-models.sh)");
            return;
        }
        let (model, encoder) = load_dir(&dir, None, 0, &Device::Cpu).unwrap();
        assert_eq!(model.config.num_hidden_layers, 6);
        let out = logits(&model, &encoder);
        assert!(out.iter().flatten().all(|v| v.is_finite()));
    }
}

/// The forward pass against logits computed independently: `models/tests/golden/` holds a
/// tiny model (exported once from `BertClassifier::random(BertConfig::tiny(..), .., 11)`),
/// fixed token ids, and the logits `reference.py` computed from those files with NumPy
/// alone (its own BERT forward, erf GELU, masked softmax, pooler, classifier).
/// Regenerate the fixture with `FEDWARD_WRITE_GOLDEN=1 cargo test -p fedward-models golden`
/// then `python3 models/tests/golden/reference.py`.
#[cfg(test)]
mod golden {
    use std::collections::HashSet;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::bert::{Batch, Mode};

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
    }

    #[derive(serde::Deserialize)]
    struct Input {
        input_ids: Vec<Vec<u32>>,
        attention_mask: Vec<Vec<u32>>,
    }

    #[test]
    fn golden_logits_match_an_independent_numpy_forward() {
        if std::env::var_os("FEDWARD_WRITE_GOLDEN").is_some() {
            let encoder = TextEncoder::tiny(&["please", "admit", "ward", "scan", "doctor", "review"]);
            let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect();
            let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels.clone(), 11, &Device::Cpu).unwrap();
            // Weights of std 0.5 rather than 0.02, so the logits are large enough for the
            // comparison to mean something.
            let mut set = model.tensor_set().unwrap();
            for (name, t) in set.iter_mut() {
                if !name.contains("LayerNorm") {
                    t.data_mut().iter_mut().for_each(|v| *v *= 25.0);
                }
            }
            let model = BertClassifier::from_tensors(model.config.clone(), labels, &set, &Device::Cpu).unwrap();
            export_dir(&model, &encoder, &dir().join("tiny")).unwrap();
            let input = serde_json::json!({
                "input_ids": [[2, 90, 91, 92, 40, 3], [2, 93, 3, 0, 0, 0]],
                "attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]],
            });
            std::fs::write(dir().join("input.json"), input.to_string()).unwrap();
            return;
        }
        let (model, _) = load_dir(&dir().join("tiny"), None, 0, &Device::Cpu).unwrap();
        let input: Input = serde_json::from_slice(&std::fs::read(dir().join("input.json")).unwrap()).unwrap();
        let expected: Vec<Vec<f32>> = serde_json::from_slice(&std::fs::read(dir().join("logits.json")).unwrap()).unwrap();
        let (b, l) = (input.input_ids.len(), input.input_ids[0].len());
        let flat = |v: &Vec<Vec<u32>>| Tensor::from_vec(v.concat(), (b, l), &Device::Cpu).unwrap();
        let batch = Batch {
            input_ids: flat(&input.input_ids),
            token_type_ids: Tensor::zeros((b, l), candle_core::DType::U32, &Device::Cpu).unwrap(),
            attention_mask: flat(&input.attention_mask),
        };
        let none = HashSet::new();
        let logits: Vec<Vec<f32>> =
            model.forward(&batch, &mut Mode { trainable: &none, dropout_rng: None, per_example: None }).unwrap().to_vec2().unwrap();
        // The differentiable path (layer norm in tensor ops) must agree too.
        let all: HashSet<String> = model.tensor_set().unwrap().names().map(str::to_owned).collect();
        let train_path: Vec<Vec<f32>> =
            model.forward(&batch, &mut Mode { trainable: &all, dropout_rng: None, per_example: None }).unwrap().to_vec2().unwrap();
        assert!(expected.iter().flatten().any(|v| v.abs() > 0.5), "fixture logits too small to test anything");
        for (got, want) in [(&logits, &expected), (&train_path, &expected)] {
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{got:?} vs {want:?}");
            }
        }
    }
}
