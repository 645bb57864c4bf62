//! The hand-written evaluation set (`models/corpus/handwritten/`): notes written by hand in the
//! styles hospitals produce, never by [`crate::synth`], to measure how a model trained on generated
//! notes does on notes the generator never wrote. It is for measuring only: nothing trains, tunes or
//! selects a model on it.

use crate::import::{import_bytes, Format, ImportConfig, ImportError, Imported};

/// The set, one `{"text": ..., "label": ...}` object a line, built into the crate.
pub const NOTES_JSONL: &str = include_str!("../handwritten/notes.jsonl");

/// Where the set lives in the repository, for reports.
pub const PATH: &str = "models/corpus/handwritten/notes.jsonl";

/// The set read through the validation a site's own file goes through (`data import`, JSONL,
/// `text` and `label`, the four default labels).
pub fn import() -> Result<Imported, ImportError> {
    import_bytes(NOTES_JSONL.as_bytes(), &ImportConfig::new(Format::Jsonl))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::import::DEFAULT_LABELS;
    use crate::synth::{generate, SynthConfig};

    const README: &str = include_str!("../handwritten/README.md");

    /// What the demo generates by default (`fedward-demo`: seed 7, its three sites, 2,500 notes
    /// each, alpha 1, the sites' own hard-case shares).
    const DEMO_SEED: u64 = 7;
    const DEMO_NOTES_PER_SITE: usize = 2500;

    #[test]
    fn every_row_passes_import_validation() {
        let imported = import().unwrap();
        let r = &imported.report;
        assert_eq!(r.rejected, 0, "rejected rows: {r}");
        assert_eq!(r.accepted, r.rows_read);
        assert_eq!(r.conflicting_labels, 0);
        assert_eq!(imported.rows.len(), NOTES_JSONL.lines().filter(|l| !l.trim().is_empty()).count());
    }

    #[test]
    fn at_least_400_notes_and_100_per_label() {
        let imported = import().unwrap();
        assert!(imported.rows.len() >= 400, "{} notes", imported.rows.len());
        let per_label = &imported.report.per_label;
        for label in DEFAULT_LABELS {
            let n = per_label.get(label).copied().unwrap_or(0);
            assert!(n >= 100, "{label}: {n} notes");
        }
    }

    #[test]
    fn no_note_repeats_even_ignoring_case_and_spacing() {
        let imported = import().unwrap();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for row in &imported.rows {
            let key = row.text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
            if let Some(first) = seen.insert(key, row.line) {
                panic!("line {} repeats line {first}", row.line);
            }
        }
    }

    #[test]
    fn no_note_is_in_the_demos_generated_corpus() {
        let mut cfg = SynthConfig::new(DEMO_SEED, SynthConfig::default_sites());
        cfg.notes_per_site = DEMO_NOTES_PER_SITE;
        let corpus = generate(&cfg).unwrap();
        let generated: HashSet<&str> = corpus.examples().map(|e| e.text.as_str()).collect();
        let imported = import().unwrap();
        let shared: Vec<usize> = imported.rows.iter().filter(|r| generated.contains(r.text.as_str())).map(|r| r.line).collect();
        assert!(shared.is_empty(), "lines also in the generated corpus: {shared:?}");
    }

    #[test]
    fn checksum_matches_the_readme() {
        let digest = hex::encode(Sha256::digest(NOTES_JSONL.as_bytes()));
        let stated = README
            .lines()
            .find_map(|l| l.trim().strip_prefix("sha256:").map(|h| h.trim().trim_matches('`').to_owned()))
            .expect("the README states the file's sha256 on a line starting `sha256:`");
        assert_eq!(stated, digest, "notes.jsonl changed: update its sha256 in handwritten/README.md (and say why there)");
    }

    #[test]
    fn readme_counts_match_the_file() {
        let imported = import().unwrap();
        for (label, n) in &imported.report.per_label {
            let row = format!("| `{label}` | {n} |");
            assert!(README.contains(&row), "the README's count table lacks {row:?}");
        }
        let total = format!("| total | {} |", imported.rows.len());
        assert!(README.contains(&total), "the README's count table lacks {total:?}");
    }
}
