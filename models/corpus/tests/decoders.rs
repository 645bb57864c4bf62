//! Property tests of a site's data files as `data import` reads them (CSV and JSONL):
//! arbitrary bytes, and valid files with bytes flipped, cut or spliced, give a report or
//! an error, never a panic, never record text in an error, and never an allocation beyond
//! [`MEMORY_CAP`] (this test binary's allocator refuses more and the run aborts).
//!
//! `FEDWARD_DECODER_CASES=100000 cargo test -p fedward-corpus --test decoders --release`
//! is the long run.

use std::alloc::System;

use cap::Cap;
use proptest::prelude::*;
use proptest::test_runner::Config;

use fedward_corpus::import::{import_bytes, Format, ImportConfig};

const MEMORY_CAP: usize = 256 << 20;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, MEMORY_CAP);

fn config() -> Config {
    let cases = std::env::var("FEDWARD_DECODER_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    Config { cases, failure_persistence: None, ..Config::default() }
}

const CSV: &str =
    "text,label\n\"pt needs icu bed, sats 88%\",bed\nrenal r/v re ?HD,doctor\n\"vent, not bed\",device\npharmacy query,other\n";
const JSONL: &str = "{\"text\":\"pt needs icu bed\",\"label\":\"bed\"}\n{\"text\":\"renal r/v\",\"label\":\"doctor\"}\n{\"text\":\"hoist\",\"label\":\"device\"}\n";

/// A valid file with some bytes overwritten, the tail cut, or bytes spliced in.
fn mutated(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    (proptest::collection::vec((0..n, any::<u8>()), 1..8), 1..=n, proptest::collection::vec(any::<u8>(), 0..16), 0..n).prop_map(
        move |(flips, cut, splice, at)| {
            let mut v = valid.as_bytes().to_vec();
            for (i, b) in flips {
                v[i] = b;
            }
            v.truncate(cut);
            let at = at.min(v.len());
            v.splice(at..at, splice);
            v
        },
    )
}

/// What a report or an error says must not repeat a record: the valid files' notes are
/// all longer than this, and no message may contain one.
fn leaks_a_note(text: &str) -> bool {
    ["pt needs icu bed", "renal r/v", "pharmacy query", "vent, not bed"].iter().any(|note| text.contains(note))
}

fn import(bytes: &[u8], format: Format) {
    let mut cfg = ImportConfig::new(format);
    cfg.dedupe = true;
    match import_bytes(bytes, &cfg) {
        Ok(imported) => {
            let report = format!("{:?}", imported.report);
            assert!(!leaks_a_note(&report), "the report repeats a note: {report}");
        }
        Err(e) => assert!(!leaks_a_note(&e.to_string()), "the error repeats a note: {e}"),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn csv_and_jsonl_from_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..4096)) {
        import(&b, Format::Csv);
        import(&b, Format::Jsonl);
    }

    #[test]
    fn csv_from_damaged_files(b in mutated(CSV)) {
        import(&b, Format::Csv);
    }

    #[test]
    fn jsonl_from_damaged_files(b in mutated(JSONL)) {
        import(&b, Format::Jsonl);
    }
}

#[test]
fn the_valid_starting_points_import() {
    assert_eq!(import_bytes(CSV.as_bytes(), &ImportConfig::new(Format::Csv)).unwrap().rows.len(), 4);
    assert_eq!(import_bytes(JSONL.as_bytes(), &ImportConfig::new(Format::Jsonl)).unwrap().rows.len(), 3);
}
