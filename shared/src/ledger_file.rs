//! The ledger on disk: open with verification, append with fsync, read back.
//!
//! The thin I/O shell around [`crate::ledger`]. An append writes one JSON line and
//! `fsync`s the file (and, when the file was just created, its directory) before
//! returning, so the caller can send the update only once the record of it is durable.
//! A crash mid-write leaves an incomplete last line, which [`LedgerFile::open`] refuses
//! and [`repair_cut_tail`] settles before opening. It never under-counts: a cut-short line
//! that holds a whole entry, or the beginning of the entry the caller knows it was
//! writing, is completed and stands; only a caller for whom an unacknowledged append
//! cannot have been acted on (the coordinator acknowledges after the append) may drop
//! another fragment.

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
    #[error("ledger {path}: an earlier append failed part-way; reopen it (after repair_cut_tail) before appending")]
    NeedsRecovery { path: PathBuf },
    #[error(
        "ledger {path} ends in {bytes} bytes of a cut-short line that is neither a whole entry nor the start of the \
         release this site recorded last, so what it counted cannot be known; it was left as it is (restore the ledger \
         from a backup)"
    )]
    UnknownCutLine { path: PathBuf, bytes: usize },
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
        let mut options = OpenOptions::new();
        options.create(true).append(true).read(true);
        // Like the rest of a state directory, readable by its owner only, whatever the
        // umask (the shipped units set 0077; containers and hand-run binaries may not).
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(io_err)?;
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
        let line = entry.to_line();
        let written = if crate::failpoint::ENABLED {
            // The chaos suite's torn write: half the line on disk, then the crash.
            let (head, tail) = line.split_at(line.len() / 2);
            self.file
                .write_all(head)
                .map(|()| crate::failpoint::crash_point(crate::failpoint::LEDGER_APPEND_TORN))
                .and_then(|()| self.file.write_all(tail))
        } else {
            self.file.write_all(&line)
        };
        let written = written.and_then(|()| self.file.sync_data());
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

/// What [`repair_cut_tail`] found at the end of a ledger and did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TailRepair {
    /// The file ends in a complete line.
    Intact,
    /// The last line was cut short but is an entry the ledger can hold (whole but for its
    /// newline, or the beginning of the entry the caller was writing): it was completed,
    /// so the entry stands and counts.
    Completed { seq: u64 },
    /// The last line was a fragment of an entry nobody acted on: removed.
    Dropped { bytes: usize },
}

/// Whether a fragment that is no known entry may be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// The caller acts on an entry only once its append returned (the coordinator
    /// acknowledges an update after recording it): an unknown fragment was never acted on.
    Drop,
    /// Refuse to guess ([`LedgerFileError::UnknownCutLine`]), leaving the file untouched.
    Keep,
}

/// Settles a last line cut short by a crash, fsyncing what it changes. It completes the
/// line when it holds a whole entry (only the newline missing) or is a prefix of the line
/// `writing` makes as the next entry (the entry the caller was appending, which may have
/// been acted on); any other fragment is dropped or refused as `fragment` says. Complete
/// lines are never touched.
pub fn repair_cut_tail(
    path: impl AsRef<Path>,
    trusted: Option<&VerifyingKey>,
    writing: Option<&Body>,
    fragment: Fragment,
) -> Result<TailRepair, LedgerFileError> {
    let path = path.as_ref();
    let io_err = |error| LedgerFileError::Io { path: path.to_path_buf(), error };
    let bytes = fs::read(path).map_err(io_err)?;
    let report = ledger::verify(&bytes, trusted);
    if !report.problems.iter().any(|p| p.kind == ProblemKind::TruncatedFinalLine) {
        return Ok(TailRepair::Intact);
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let cut = &bytes[keep..];
    let mut whole = bytes.clone();
    whole.push(b'\n');
    let completed = ledger::verify(&whole, trusted);
    let rest: Option<Vec<u8>> = if completed.problems.is_empty() {
        Some(b"\n".to_vec())
    } else {
        // The entry the caller was writing, as it would have been written after the
        // complete lines: the same bytes, since an entry is a pure function of its
        // predecessors and its body.
        let before = ledger::verify(&bytes[..keep], trusted);
        Ledger::from_verified(&before)
            .zip(writing)
            .and_then(|(ledger, body)| ledger.prepare(body.clone()).ok())
            .map(|entry| entry.to_line())
            .filter(|line| line.starts_with(cut))
            .map(|line| line[cut.len()..].to_vec())
    };
    match (rest, fragment) {
        (Some(rest), _) => {
            let mut file = OpenOptions::new().append(true).open(path).map_err(io_err)?;
            file.write_all(&rest).and_then(|()| file.sync_all()).map_err(io_err)?;
            let seq = ledger::verify(&fs::read(path).map_err(io_err)?, trusted).entries.last().map_or(0, |e| e.seq);
            Ok(TailRepair::Completed { seq })
        }
        (None, Fragment::Drop) => {
            let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
            file.set_len(keep as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            Ok(TailRepair::Dropped { bytes: cut.len() })
        }
        (None, Fragment::Keep) => Err(LedgerFileError::UnknownCutLine { path: path.to_path_buf(), bytes: cut.len() }),
    }
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
                score: None,
                mode: PrivacyMode::SiteLevel,
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                sampling_rate: 0.0,
                steps: 1,
                update_clip_norm: 1.0,
                epsilon_after: round as f64,
                delta: 1e-5,
                distributed: None,
            },
            examples: 10,
            epsilon_before: round as f64 - 1.0,
            update_digest: Digest([round as u8; 32]),
            time: format_time(datetime!(2025-03-01 12:00:00 UTC)).unwrap(),
        })
    }

    /// Found by the guides' check: under umask 022 the ledger was made 0644.
    #[cfg(unix)]
    #[test]
    fn a_new_ledger_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        LedgerFile::open(&path, None).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
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
        assert_eq!(repair_cut_tail(&path, None, None, Fragment::Drop).unwrap(), TailRepair::Dropped { bytes: line.len() / 2 });
        assert_eq!(repair_cut_tail(&path, None, None, Fragment::Drop).unwrap(), TailRepair::Intact);
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

    /// A ledger of two releases whose third was cut after `keep` bytes of its line.
    fn cut_after(dir: &Path, keep: impl Fn(usize) -> usize) -> (PathBuf, Vec<u8>) {
        let path = dir.join("ledger.jsonl");
        let mut f = LedgerFile::open(&path, None).unwrap();
        f.append(body(1)).unwrap();
        f.append(body(2)).unwrap();
        let line = f.ledger().prepare(body(3)).unwrap().to_line();
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&line[..keep(line.len())]).unwrap();
        (path, line)
    }

    /// The issue-18 case: a release whose line lost only its newline was sent; dropping it
    /// under-counted the spend. It is completed and counts.
    #[test]
    fn a_whole_entry_without_its_newline_is_completed_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = cut_after(dir.path(), |len| len - 1);
        assert_eq!(repair_cut_tail(&path, None, None, Fragment::Drop).unwrap(), TailRepair::Completed { seq: 2 });
        let f = LedgerFile::open(&path, None).unwrap();
        assert_eq!(f.ledger().accountant().unwrap().releases(), 3);
    }

    /// A fragment of the release the caller was writing is completed to that release.
    #[test]
    fn a_fragment_of_the_entry_being_written_is_completed_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, line) = cut_after(dir.path(), |len| len / 3);
        assert_eq!(repair_cut_tail(&path, None, Some(&body(3)), Fragment::Keep).unwrap(), TailRepair::Completed { seq: 2 });
        assert!(read_all(&path).unwrap().ends_with(&line));
        assert_eq!(LedgerFile::open(&path, None).unwrap().ledger().entries().len(), 3);
    }

    /// A fragment that is not the entry being written: kept as it is and refused when the
    /// caller may have acted on it, dropped when it cannot have.
    #[test]
    fn an_unknown_fragment_is_refused_or_dropped_as_the_caller_says() {
        let dir = tempfile::tempdir().unwrap();
        let (path, line) = cut_after(dir.path(), |len| len / 3);
        let before = read_all(&path).unwrap();
        for writing in [None, Some(&body(4))] {
            let err = repair_cut_tail(&path, None, writing, Fragment::Keep).unwrap_err();
            assert!(matches!(err, LedgerFileError::UnknownCutLine { bytes, .. } if bytes == line.len() / 3), "{err}");
            assert_eq!(read_all(&path).unwrap(), before, "nothing changed");
        }
        assert_eq!(repair_cut_tail(&path, None, Some(&body(4)), Fragment::Drop).unwrap(), TailRepair::Dropped { bytes: line.len() / 3 });
        assert_eq!(LedgerFile::open(&path, None).unwrap().ledger().entries().len(), 2);
    }
}
