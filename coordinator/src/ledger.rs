//! The coordinator's signed ledger: one `accepted` entry per update folded into a round,
//! and an ed25519 `seal` over the chain head when the round completes.
//!
//! A thin shell over [`fedward_shared::ledger_file`] (append = write + fsync) and
//! [`fedward_shared::ledger`] (entries, seals). The server records an accepted update
//! before it acknowledges it to the site, and seals a round after its checkpoint is
//! durable, so an `Ack` always has a durable ledger entry behind it. A failed append is
//! fatal for the server (see [`crate::server::ServerError::Ledger`]): an unrecorded
//! acceptance would leave auditors a ledger that under-reports what the model absorbed.
//!
//! On open, an incomplete last line (a crash mid-append, so never acknowledged) is cut off,
//! then the whole file is verified with the coordinator's own public key: chain and every
//! seal. A ledger that fails verification stops the coordinator before it serves.

use std::path::Path;

use ed25519_dalek::SigningKey;
use time::OffsetDateTime;
use tracing::{info, warn};

use fedward_shared::dp::Release;
use fedward_shared::ledger::{key_id, AcceptedRecord, Body, Entry, Ledger, LedgerError, SecureRoundRecord};
use fedward_shared::ledger_file::{repair_cut_tail, Fragment, LedgerFile, LedgerFileError, TailRepair};
use fedward_shared::tensor::Digest;
use fedward_shared::wire::{RoundId, SiteId};

use crate::round::{Contribution, SecureOutcome};

/// Why the ledger could not be opened or appended to.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorLedgerError {
    #[error(transparent)]
    File(#[from] LedgerFileError),
    #[error(transparent)]
    Entry(#[from] LedgerError),
}

/// The open ledger and the key that seals it.
#[derive(Debug)]
pub struct CoordinatorLedger {
    file: LedgerFile,
    key: SigningKey,
}

impl CoordinatorLedger {
    /// Opens (creating if missing), repairs a cut-short last line, and verifies the ledger
    /// at `path` against `key`'s public half.
    pub fn open(path: &Path, key: SigningKey) -> Result<Self, CoordinatorLedgerError> {
        if path.exists() {
            // An update is acknowledged only after its entry is appended, so a fragment of
            // some other entry was never acted on and may go.
            match repair_cut_tail(path, Some(&key.verifying_key()), None, Fragment::Drop)? {
                TailRepair::Intact => {}
                TailRepair::Completed { seq } => {
                    warn!(path = %path.display(), seq, "the ledger's last line lacked its newline; completed it (the entry stands)")
                }
                TailRepair::Dropped { bytes } => {
                    warn!(path = %path.display(), bytes, "removed an incomplete last ledger line (an append cut short; it was never acknowledged)")
                }
            }
        }
        let file = LedgerFile::open(path, Some(&key.verifying_key()))?;
        info!(
            path = %path.display(),
            entries = file.ledger().entries().len(),
            key_id = %key_id(&key.verifying_key()),
            "ledger verified"
        );
        Ok(Self { file, key })
    }

    pub fn ledger(&self) -> &Ledger {
        self.file.ledger()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The rounds the ledger seals, in order, and the rounds with accepted entries after
    /// its last seal.
    pub fn rounds(&self) -> (Vec<u64>, Vec<u64>) {
        let mut sealed = Vec::new();
        let mut unsealed = Vec::new();
        for e in self.ledger().entries() {
            match &e.body {
                Body::Seal(s) => {
                    sealed.push(s.round.0);
                    unsealed.clear();
                }
                Body::Accepted(a) if !unsealed.contains(&a.round.0) => unsealed.push(a.round.0),
                _ => {}
            }
        }
        (sealed, unsealed)
    }

    /// Every update the ledger records as accepted, with the release its site declared:
    /// what each site's later declarations are held to.
    pub fn accepted(&self) -> Vec<(SiteId, RoundId, Digest, Release)> {
        self.ledger()
            .entries()
            .iter()
            .filter_map(|e| match &e.body {
                Body::Accepted(a) => Some((a.site.clone(), a.round, a.update_digest, a.privacy.release())),
                _ => None,
            })
            .collect()
    }

    /// Records an accepted update, durably; `None` when the ledger already holds this very
    /// update (same site, round and digest). That is a round redone after a failure or a
    /// restart, to which the site rightly resent what it had released: one release, one
    /// entry, or an auditor would count its privacy spend twice.
    pub fn record_accepted(
        &mut self,
        round: RoundId,
        c: &Contribution,
        now: OffsetDateTime,
    ) -> Result<Option<Entry>, CoordinatorLedgerError> {
        let already =
            self.ledger().entries().iter().any(
                |e| matches!(&e.body, Body::Accepted(a) if a.site == c.site && a.round == round && a.update_digest == c.update_digest),
            );
        if already {
            info!(site = %c.site, round = %round, "update already in the ledger (a redone round); not recorded twice");
            return Ok(None);
        }
        let record = AcceptedRecord {
            site: c.site.clone(),
            round,
            privacy: c.privacy.into(),
            examples: c.num_examples,
            update_digest: c.update_digest,
            time: fedward_shared::ledger::format_time(now)?,
        };
        Ok(Some(self.file.append(Body::Accepted(record))?))
    }

    /// Records who a completed secure round summed and who dropped, durably: after the
    /// round's checkpoint, before its seal (which then covers it).
    pub fn record_secure_round(
        &mut self,
        round: RoundId,
        attempt: u32,
        outcome: &SecureOutcome,
        now: OffsetDateTime,
    ) -> Result<Entry, CoordinatorLedgerError> {
        let mut summed = outcome.summed.clone();
        summed.sort();
        // A site that left before its shares took no part in the sum either.
        let mut dropped: Vec<SiteId> = outcome.dropped.iter().chain(&outcome.dropped_before_shares).cloned().collect();
        dropped.sort();
        dropped.dedup();
        let record = SecureRoundRecord {
            round,
            attempt,
            summed,
            dropped,
            total_weight: outcome.total_weight,
            time: fedward_shared::ledger::format_time(now)?,
        };
        Ok(self.file.append(Body::SecureRound(record))?)
    }

    /// Seals the chain head for a completed round, durably.
    pub fn seal(&mut self, round: RoundId, now: OffsetDateTime) -> Result<Entry, CoordinatorLedgerError> {
        let entry = self.file.ledger().prepare_seal(round, &self.key, now)?;
        Ok(self.file.append_entry(entry)?)
    }

    /// After a restart: seals round `completed` when the store says it completed but the
    /// ledger holds its accepted entries without a seal (a crash between the checkpoint
    /// and the seal). Returns the round it sealed.
    pub fn seal_missed(&mut self, completed: u64, now: OffsetDateTime) -> Result<Option<RoundId>, CoordinatorLedgerError> {
        if completed == 0 {
            return Ok(None);
        }
        let round = RoundId(completed);
        let mut tail_has_round = false;
        for e in self.ledger().entries().iter().rev() {
            match &e.body {
                Body::Seal(s) if s.round >= round => return Ok(None),
                Body::Seal(_) => break,
                Body::Accepted(a) if a.round == round => tail_has_round = true,
                Body::SecureRound(r) if r.round == round => tail_has_round = true,
                _ => {}
            }
        }
        if !tail_has_round {
            return Ok(None);
        }
        self.seal(round, now)?;
        warn!(round = %round, "sealed a completed round whose seal was missing (the coordinator stopped after its checkpoint)");
        Ok(Some(round))
    }
}

#[cfg(test)]
mod tests {
    use fedward_shared::ledger::verify;
    use fedward_shared::tensor::Digest;
    use fedward_shared::wire::{PrivacyUsed, SiteId};
    use time::macros::datetime;

    use super::*;

    const T: OffsetDateTime = datetime!(2025-03-01 12:00 UTC);

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn contribution(site: &str) -> Contribution {
        Contribution {
            score: None,
            site: SiteId::new(site).unwrap(),
            num_examples: 10,
            weight: 10,
            update_norm: 1.0,
            scale: 1.0,
            metrics: None,
            privacy: PrivacyUsed::off(),
            update_digest: Digest([1; 32]),
        }
    }

    #[test]
    fn a_redone_round_does_not_record_the_same_update_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        assert!(l.record_accepted(RoundId(1), &contribution("a"), T).unwrap().is_some());
        // The round failed or the coordinator restarted; the site resends what it released.
        drop(l);
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        assert!(l.record_accepted(RoundId(1), &contribution("a"), T).unwrap().is_none());
        // Another update for the round (the site trained again on a different model) is a
        // second release and is recorded.
        let mut other = contribution("a");
        other.update_digest = Digest([2; 32]);
        assert!(l.record_accepted(RoundId(1), &other, T).unwrap().is_some());
        assert_eq!(l.ledger().entries().len(), 2);
    }

    #[test]
    fn records_seals_reopens_and_catches_up_a_missed_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        l.record_accepted(RoundId(1), &contribution("a"), T).unwrap();
        l.record_accepted(RoundId(1), &contribution("b"), T).unwrap();
        l.seal(RoundId(1), T).unwrap();
        l.record_accepted(RoundId(2), &contribution("a"), T).unwrap();
        drop(l);
        // Round 2 completed (per the store) but its seal was never written.
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        assert_eq!(l.seal_missed(1, T).unwrap(), None, "round 1 is sealed");
        assert_eq!(l.seal_missed(2, T).unwrap(), Some(RoundId(2)));
        assert_eq!(l.seal_missed(2, T).unwrap(), None);
        let report = verify(&std::fs::read(&path).unwrap(), Some(&key().verifying_key()));
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!((report.seals_verified, report.unsealed_tail), (2, 0));
    }

    /// A secure round's record lists the summed and the dropped sites (those gone before
    /// their shares too) in id order, survives a reopen, and the seal covers it.
    #[test]
    fn a_secure_round_records_who_was_summed_and_who_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        let s = |x: &str| SiteId::new(x).unwrap();
        let outcome =
            SecureOutcome { summed: vec![s("c"), s("a")], dropped: vec![s("d")], dropped_before_shares: vec![s("b")], total_weight: 2 };
        l.record_accepted(RoundId(1), &contribution("a"), T).unwrap();
        l.record_secure_round(RoundId(1), 2, &outcome, T).unwrap();
        l.seal(RoundId(1), T).unwrap();
        drop(l);
        let l = CoordinatorLedger::open(&path, key()).unwrap();
        let Body::SecureRound(r) = &l.ledger().entries()[1].body else { panic!("{:?}", l.ledger().entries()[1]) };
        assert_eq!((r.round, r.attempt, r.total_weight), (RoundId(1), 2, 2));
        assert_eq!(r.summed, vec![s("a"), s("c")]);
        assert_eq!(r.dropped, vec![s("b"), s("d")]);
        let report = verify(&std::fs::read(&path).unwrap(), Some(&key().verifying_key()));
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!((report.seals_verified, report.unsealed_tail), (1, 0));
    }

    #[test]
    fn refuses_a_ledger_sealed_by_another_key_and_repairs_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        l.record_accepted(RoundId(1), &contribution("a"), T).unwrap();
        l.seal(RoundId(1), T).unwrap();
        drop(l);
        let err = CoordinatorLedger::open(&path, SigningKey::from_bytes(&[4; 32])).unwrap_err();
        assert!(err.to_string().contains("unknown key"), "{err}");
        // A crash mid-append leaves half a line: cut off on open, then appends continue.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":2,\"prev");
        std::fs::write(&path, bytes).unwrap();
        let mut l = CoordinatorLedger::open(&path, key()).unwrap();
        l.record_accepted(RoundId(2), &contribution("a"), T).unwrap();
        assert_eq!(l.ledger().entries().len(), 3);
    }
}
