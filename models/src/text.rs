//! Tokenization and labelled datasets.
//!
//! The tokenizer is a Hugging Face `tokenizer.json` (MiniLM's, or a small WordPiece built
//! in process for tests). Padding and truncation baked into a shipped tokenizer are
//! replaced by ours: no padding (batches are padded to their longest member) and
//! truncation to the plan's `max_seq_len`. Dataset errors name the line and the reason,
//! never the text.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::bert::{Batch, ModelError};

/// Why text could not be tokenized or a dataset read.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer {path}: {detail}; run scripts/fetch-models.sh to fetch the pretrained files")]
    TokenizerFile { path: String, detail: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path} line {line}: {reason}")]
    BadRow { path: String, line: usize, reason: String },
    #[error("{path}: no examples")]
    Empty { path: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A tokenizer with fedward's padding and truncation rules.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    json: String,
}

/// One tokenized text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl TextEncoder {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| TextError::TokenizerFile { path: path.display().to_string(), detail: e.to_string() })?;
        Self::from_json(json)
    }

    /// Parses a `tokenizer.json` document.
    pub fn from_json(json: String) -> Result<Self, TextError> {
        let mut tokenizer = Tokenizer::from_bytes(json.as_bytes()).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Ok(Self { tokenizer, json })
    }

    /// A lowercasing WordPiece tokenizer over `words` (plus single letters and digits as
    /// whole words and `##` pieces), built in process: for tests, no download needed.
    pub fn tiny(words: &[&str]) -> Self {
        let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|s| (*s).to_owned()).collect();
        let chars = "abcdefghijklmnopqrstuvwxyz0123456789".chars();
        vocab.extend(chars.clone().map(String::from));
        vocab.extend(chars.map(|c| format!("##{c}")));
        vocab.extend(".,:;!?/-()%+'".chars().map(String::from));
        for w in words {
            let w = w.to_lowercase();
            if !vocab.contains(&w) {
                vocab.push(w);
            }
        }
        let map: serde_json::Map<String, serde_json::Value> =
            vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
        let special = |id: usize, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]"), special(4, "[MASK]")],
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": map}
        });
        // The document above is well-formed by construction.
        Self::from_json(json.to_string()).unwrap_or_else(|e| unreachable!("tiny tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The `tokenizer.json` this encoder was built from (for export).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Tokenizes with `[CLS]`/`[SEP]`, truncated to `max_len` tokens (at least 2).
    ///
    /// The tokenizer runs without truncation and the last token (`[SEP]`) is moved up:
    /// the same ids as the tokenizer's own right-truncation of a single sequence, without
    /// cloning the tokenizer (its vocabulary) to set `max_len`, which cost more than
    /// encoding a note (about 9 of 13 ms with MiniLM's).
    pub fn encode(&self, texts: &[&str], max_len: usize) -> Result<Vec<Encoded>, TextError> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let max_len = max_len.max(2);
        Ok(encodings
            .into_iter()
            .map(|e| {
                let (mut ids, mut type_ids) = (e.get_ids().to_vec(), e.get_type_ids().to_vec());
                if ids.len() > max_len {
                    for v in [&mut ids, &mut type_ids] {
                        let last = v[v.len() - 1];
                        v.truncate(max_len - 1);
                        v.push(last);
                    }
                }
                Encoded { ids, type_ids }
            })
            .collect())
    }
}

/// Pads the selected examples to the longest of them and builds the batch tensors.
pub fn make_batch(examples: &[&Encoded], pad_id: u32, device: &Device) -> Result<Batch, ModelError> {
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let n = examples.len();
    let (mut ids, mut types, mut mask) = (Vec::with_capacity(n * len), Vec::with_capacity(n * len), Vec::with_capacity(n * len));
    for e in examples {
        let pad = len - e.ids.len();
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        types.extend(e.type_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        mask.extend(std::iter::repeat_n(1u32, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (n, len), device)?,
        token_type_ids: Tensor::from_vec(types, (n, len), device)?,
        attention_mask: Tensor::from_vec(mask, (n, len), device)?,
    })
}

/// A labelled example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

#[derive(Deserialize)]
struct Row {
    text: Option<String>,
    label: Option<String>,
}

/// Reads `{"text": ..., "label": ...}` lines; labels must be among `labels`.
pub fn read_jsonl(path: &Path, labels: &[String]) -> Result<Vec<Example>, TextError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| TextError::Io { path: p.clone(), error })?;
    let index: HashMap<&str, usize> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let bad = |reason: &str| TextError::BadRow { path: p.clone(), line: line_no, reason: reason.to_owned() };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = std::str::from_utf8(line).map_err(|_| bad("invalid UTF-8"))?;
        let row: Row = serde_json::from_str(line).map_err(|_| bad("not a JSON object with text and label"))?;
        let text = row.text.filter(|t| !t.trim().is_empty()).ok_or_else(|| bad("missing text"))?;
        let label = row.label.ok_or_else(|| bad("missing label"))?;
        let label = *index.get(label.as_str()).ok_or_else(|| bad(&format!("unknown label (expected one of {})", labels.join(", "))))?;
        out.push(Example { text, label });
    }
    if out.is_empty() {
        return Err(TextError::Empty { path: p });
    }
    Ok(out)
}

/// Reads `{"text": ...}` lines (labels, if present, are ignored).
pub fn read_texts_jsonl(path: &Path) -> Result<Vec<String>, TextError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| TextError::Io { path: p.clone(), error })?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |reason: &str| TextError::BadRow { path: p.clone(), line: i + 1, reason: reason.to_owned() };
        let line = std::str::from_utf8(line).map_err(|_| bad("invalid UTF-8"))?;
        let row: Row = serde_json::from_str(line).map_err(|_| bad("not a JSON object with text"))?;
        out.push(row.text.ok_or_else(|| bad("missing text"))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::TruncationParams;

    #[test]
    fn tiny_tokenizer_adds_specials_and_truncates() {
        let enc = TextEncoder::tiny(&["needs", "a", "bed"]);
        let out = enc.encode(&["Needs a BED", "needs"], 4).unwrap();
        assert_eq!(out[0].ids.len(), 4);
        assert_eq!(out[0].ids[0], 2, "[CLS] first");
        assert_eq!(*out[0].ids.last().unwrap(), 3, "[SEP] last");
        assert_eq!(out[1].ids.len(), 3);
    }

    /// The truncation is the tokenizer's own, for every length around the note's.
    #[test]
    fn truncation_matches_the_tokenizers() {
        let enc = TextEncoder::tiny(&["needs", "a", "bed", "now", "please"]);
        let text = "needs a bed now please needs a bed x9 please now";
        for max_len in 2..16 {
            let mut tok = enc.tokenizer.clone();
            tok.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() })).unwrap();
            let theirs = tok.encode(text, true).unwrap();
            let ours = &enc.encode(&[text], max_len).unwrap()[0];
            assert_eq!(ours.ids, theirs.get_ids(), "max_len {max_len}");
            assert_eq!(ours.type_ids, theirs.get_type_ids(), "max_len {max_len}");
        }
    }

    #[test]
    fn batches_are_padded_with_masks() {
        let a = Encoded { ids: vec![2, 7, 3], type_ids: vec![0; 3] };
        let b = Encoded { ids: vec![2, 3], type_ids: vec![0; 2] };
        let batch = make_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.to_vec2::<u32>().unwrap(), [[2, 7, 3], [2, 3, 0]]);
        assert_eq!(batch.attention_mask.to_vec2::<u32>().unwrap(), [[1, 1, 1], [1, 1, 0]]);
    }

    #[test]
    fn bad_rows_name_the_line_and_never_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let labels: Vec<String> = ["doctor", "bed"].iter().map(|s| (*s).to_owned()).collect();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\":\"ok\",\"label\":\"bed\"}\n{\"text\":\"SECRET-NOTE\",\"label\":\"chef\"}\n").unwrap();
        let err = read_jsonl(&p, &labels).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("unknown label"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        std::fs::write(&p, b"{\"text\":\"a\xff\",\"label\":\"bed\"}\n").unwrap();
        assert!(read_jsonl(&p, &labels).unwrap_err().to_string().contains("invalid UTF-8"));
        std::fs::write(&p, "{\"text\":\"  \",\"label\":\"bed\"}\n").unwrap();
        assert!(read_jsonl(&p, &labels).unwrap_err().to_string().contains("missing text"));
    }
}
