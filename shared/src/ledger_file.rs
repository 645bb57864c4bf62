//! The ledger on disk: open with verification, append with fsync, read back.
//!
//! The thin I/O shell around [`crate::ledger`]. An append writes one JSON line and
//! `fsync`s the file (and, when the file was just created, its directory) before
//! returning, so the caller can send the update only once the record of it is durable.
//! A crash mid-write leaves an incomplete last line, which [`LedgerFile::open`] refuses
//! and [`recover_truncated_tail`] removes: nothing was sent for it, because sending
//! happens only after a successful append.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::ledger::{self, Body, Entry, Ledger, LedgerError, Problem, ProblemKind};

/// Why the ledger file could not be opened or appended to.
#[derive(Debug, thiserror::Error)]
pub enum LedgerFileError {
    #[error("ledger {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("ledger {path} failed verification: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("ledger {path}: an earlier append failed part-way; reopen it (after recover_truncated_tail) before appending")]
    NeedsRecovery { path: PathBuf },
}

/// An open ledger file and its verified contents.
#[derive(Debug)]
pub struct LedgerFile {
    path: PathBuf,
    file: File,
    ledger: Ledger,
    /// Set when a write or fsync failed: the file may end in a partial line.
    poisoned: bool,
}

impl LedgerFile {
    /// Opens (creating if missing) and verifies the ledger at `path`. Any problem,
    /// including a truncated last line, is an error: an append after it would corrupt it.
    pub fn open(path: impl AsRef<Path>, trusted: Option<&VerifyingKey>) -> Result<Self, LedgerFileError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |error| LedgerFileError::Io { path: path.clone(), error };
        let existed = path.exists();
        let file = OpenOptions::new().create(true).append(true).read(true).open(&path).map_err(io_err)?;
        if !existed {
            file.sync_all().map_err(io_err)?;
            sync_parent(&path).map_err(io_err)?;
        }
        let bytes = fs::read(&path).map_err(io_err)?;
        let report = ledger::verify(&bytes, trusted);
        let Some(ledger) = Ledger::from_verified(&report) else {
            return Err(LedgerFileError::Invalid { path, problems: report.problems });
        };
        Ok(Self { path, file, ledger, poisoned: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Appends `body` durably: write, fsync, then extend the in-memory ledger.
    pub fn append(&mut self, body: Body) -> Result<Entry, LedgerFileError> {
        let entry = self.ledger.prepare(body)?;
        self.append_entry(entry)
    }

    /// Appends an entry prepared from [`ledger`](Self::ledger) (a seal, for instance).
    pub fn append_entry(&mut self, entry: Entry) -> Result<Entry, LedgerFileError> {
        if self.poisoned {
            return Err(LedgerFileError::NeedsRecovery { path: self.path.clone() });
        }
        // Check it extends the head before touching the file.
        self.ledger.check_next(&entry)?;
        let written = self.file.write_all(&entry.to_line()).and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            self.poisoned = true;
            return Err(LedgerFileError::Io { path: self.path.clone(), error });
        }
        self.ledger.push(entry.clone())?;
        Ok(entry)
    }
}

/// The raw bytes of a ledger file, for auditors who verify themselves.
pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<u8>, LedgerFileError> {
    let path = path.as_ref();
    fs::read(path).map_err(|error| LedgerFileError::Io { path: path.to_path_buf(), error })
}

/// Removes an incomplete final line (a write cut short by a crash), fsyncs, and returns
/// how many bytes were dropped. Complete lines are never touched.
pub fn recover_truncated_tail(path: impl AsRef<Path>) -> Result<usize, LedgerFileError> {
    let path = path.as_ref();
    let io_err = |error| LedgerFileError::Io { path: path.to_path_buf(), error };
    let bytes = fs::read(path).map_err(io_err)?;
    let report = ledger::verify(&bytes, None);
    if !report.problems.iter().any(|p| p.kind == ProblemKind::TruncatedFinalLine) {
        return Ok(0);
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
    file.set_len(keep as u64).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(bytes.len() - keep)
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Directories can be opened and fsynced on Unix; elsewhere this is best effort.
    match File::open(parent) {
        Ok(dir) => dir.sync_all().or_else(|e| if cfg!(unix) { Err(e) } else { Ok(()) }),
        Err(e) if !cfg!(unix) => {
            let _ = e;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::ledger::{format_time, Privacy, ReleaseRecord};
    use crate::plan::PrivacyMode;
    use crate::tensor::Digest;
    use crate::wire::{RoundId, SiteId};

    fn body(round: u64) -> Body {
        Body::Release(ReleaseRecord {
            site: SiteId::new("st-olav").unwrap(),
            round: RoundId(round),
            privacy: Privacy {
                mode: PrivacyMode::SiteLevel,
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                sampling_rate: 0.0,
                steps: 1,
                update_clip_norm: 1.0,
                epsilon_after: round as f64,
                delta: 1e-5,
            },
            examples: 10,
            epsilon_before: round as f64 - 1.0,
            update_digest: Digest([round as u8; 32]),
            time: format_time(datetime!(2025-03-01 12:00:00 UTC)).unwrap(),
        })
    }

    #[test]
    fn append_reopen_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut f = LedgerFile::open(&path, None).unwrap();
        assert!(f.ledger().entries().is_empty());
        for round in 1..=3 {
            f.append(body(round)).unwrap();
        }
        drop(f);
        let f = LedgerFile::open(&path, None).unwrap();
        assert_eq!(f.ledger().entries().len(), 3);
        assert_eq!(ledger::verify(&read_all(&path).unwrap(), None).entries.len(), 3);

        // A crash mid-append: open refuses, recovery drops exactly the partial line.
        let line = f.ledger().prepare(body(4)).unwrap().to_line();
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&line[..line.len() / 2]).unwrap();
        drop(raw);
        drop(f);
        let err = LedgerFile::open(&path, None).unwrap_err();
        assert!(err.to_string().contains("truncated final line"), "{err}");
        assert_eq!(recover_truncated_tail(&path).unwrap(), line.len() / 2);
        assert_eq!(recover_truncated_tail(&path).unwrap(), 0);
        let mut f = LedgerFile::open(&path, None).unwrap();
        f.append(body(4)).unwrap();
        assert_eq!(LedgerFile::open(&path, None).unwrap().ledger().entries().len(), 4);
    }

    #[test]
    fn refuses_a_tampered_file_and_foreign_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut f = LedgerFile::open(&path, None).unwrap();
        f.append(body(1)).unwrap();
        let stale = f.ledger().entries()[0].clone();
        assert!(matches!(f.append_entry(stale), Err(LedgerFileError::Ledger(_))));
        drop(f);
        let text = fs::read_to_string(&path).unwrap().replace("\"examples\":10", "\"examples\":11");
        fs::write(&path, text).unwrap();
        let err = LedgerFile::open(&path, None).unwrap_err();
        assert!(err.to_string().contains("edited"), "{err}");
    }
}
