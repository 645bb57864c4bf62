//! Clinicians' corrections as labelled examples: each is validated as `data import`
//! validates a row, deduplicated against what the site already trains on, and appended
//! (fsynced) to the site's feedback file, which the daemon's trainer reads with the
//! imported notes at the next round ([`crate::trainer::with_corrections`]).
//!
//! The file is the only place the service writes a note's text; errors name no text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fedward_corpus::import::{import_bytes, Format, ImportConfig, ImportError};
use fedward_models::text::read_jsonl;

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// The row a correction would add is not a valid labelled example.
    #[error("the correction is not a valid labelled example: {0}")]
    Invalid(String),
    #[error("could not read the site's labelled data: {0}")]
    Read(String),
    #[error(transparent)]
    Write(#[from] fedward_shared::fsutil::FsError),
}

/// What became of a correction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stored {
    /// Appended: the next round trains on it.
    Added,
    /// The site already trains on this note with this label.
    Duplicate,
}

pub struct FeedbackStore {
    path: PathBuf,
    import: ImportConfig,
    /// The label each known note trains with, by the note's digest (not its text).
    known: HashMap<[u8; 32], String>,
}

impl FeedbackStore {
    /// Reads what the site trains on now: its imported notes with the corrections so far.
    pub fn open(path: &Path, train: &Path, labels: &[String], max_chars: usize) -> Result<Self, FeedbackError> {
        let mut known = HashMap::new();
        for file in [train, path] {
            if file == path && !path.exists() {
                continue;
            }
            for e in read_jsonl(file, labels).map_err(|e| FeedbackError::Read(e.to_string()))? {
                known.insert(digest(&e.text), labels[e.label].clone());
            }
        }
        let import = ImportConfig { labels: labels.to_vec(), max_chars, ..ImportConfig::new(Format::Jsonl) };
        Ok(Self { path: path.to_owned(), import, known })
    }

    /// Validates, deduplicates and durably stores one correction.
    pub fn record(&mut self, text: &str, label: &str) -> Result<Stored, FeedbackError> {
        let line = serde_json::json!({ "text": text, "label": label }).to_string();
        let row = match import_bytes(line.as_bytes(), &self.import) {
            Ok(imported) => imported.rows.into_iter().next().ok_or_else(|| FeedbackError::Invalid("no row".into()))?,
            Err(ImportError::NoRows { report }) => {
                let reason = report.rejects.first().map_or_else(|| "rejected".to_owned(), |r| r.reason.to_string());
                return Err(FeedbackError::Invalid(reason));
            }
            Err(e) => return Err(FeedbackError::Invalid(e.to_string())),
        };
        let key = digest(&row.text);
        if self.known.get(&key) == Some(&row.label) {
            return Ok(Stored::Duplicate);
        }
        let mut out = Vec::new();
        fedward_corpus::import::write_jsonl(&mut out, std::slice::from_ref(&row)).map_err(|e| FeedbackError::Invalid(e.to_string()))?;
        let line = String::from_utf8_lossy(&out);
        fedward_shared::fsutil::append_line(&self.path, line.trim_end())?;
        self.known.insert(key, row.label);
        Ok(Stored::Added)
    }
}

fn digest(text: &str) -> [u8; 32] {
    *blake3::hash(text.as_bytes()).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn corrections_are_validated_deduplicated_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let (train, feedback) = (dir.path().join("train.jsonl"), dir.path().join("feedback.jsonl"));
        std::fs::write(&train, "{\"text\":\"needs a bed\",\"label\":\"bed\"}\n").unwrap();
        let mut store = FeedbackStore::open(&feedback, &train, &labels(), 50).unwrap();
        assert_eq!(store.record("needs a bed", "bed").unwrap(), Stored::Duplicate);
        assert!(!feedback.exists());
        assert_eq!(store.record("needs a bed", "Device").unwrap(), Stored::Added);
        assert_eq!(store.record("needs a bed", "device").unwrap(), Stored::Duplicate);
        assert_eq!(store.record("  call cardiology  ", "doctor").unwrap(), Stored::Added);
        for (text, label) in [("", "bed"), ("zebra-secret", "nurse"), (&"zebra".repeat(11) as &str, "bed")] {
            let e = store.record(text, label).unwrap_err();
            assert!(matches!(e, FeedbackError::Invalid(_)), "{e}");
            assert!(text.is_empty() || !e.to_string().contains(text));
        }
        let written = std::fs::read_to_string(&feedback).unwrap();
        assert_eq!(written, "{\"text\":\"needs a bed\",\"label\":\"device\"}\n{\"text\":\"call cardiology\",\"label\":\"doctor\"}\n");
        // A restarted service knows what was stored.
        let mut again = FeedbackStore::open(&feedback, &train, &labels(), 50).unwrap();
        assert_eq!(again.record("call cardiology", "doctor").unwrap(), Stored::Duplicate);
    }
}
