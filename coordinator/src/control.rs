//! What the consortium's admins changed while the coordinator runs, and the record of it.
//!
//! [`ControlState`] (`control.json` in the state directory) holds the admin's changes on
//! top of the config file: the federation paused, sites enrolled or suspended, and
//! certificate serials revoked on this coordinator. It survives restarts; the effective
//! enrolment is `([[sites]] ∪ enrolled) − suspended`. A revocation here takes effect at
//! once on this coordinator; the CA's signed CRL (`pki revoke`, with the offline key) is
//! what other verifiers read, and it should follow.
//!
//! [`AdminLog`] (`admin-audit.jsonl`) is the append-only, hash-chained record of every
//! control request: who, what, when, and what came of it, written and fsynced before the
//! request is answered (an audit device in Vault's sense: no record, no action).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use fedward_shared::access::{chain_hash, verify_chain, AccessError, AuditEntry, Role, CHAIN_START};
use fedward_shared::fsutil::{self, FsError};
use fedward_shared::pki;
use fedward_shared::wire::SiteId;

pub const CONTROL_FILE: &str = "control.json";
pub const ADMIN_LOG_FILE: &str = "admin-audit.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// A certificate serial an admin revoked on this coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRevocation {
    /// Hex, as `pki show` prints it.
    pub serial: String,
    pub reason: Option<String>,
    pub at: String,
    pub by: String,
}

/// The admin's changes on top of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlState {
    pub paused: bool,
    /// Sites enrolled by an admin, with the SHA-256 fingerprint they are pinned to, if any.
    #[serde(default)]
    pub enrolled: BTreeMap<SiteId, Option<String>>,
    #[serde(default)]
    pub suspended: BTreeSet<SiteId>,
    #[serde(default)]
    pub revoked: Vec<LocalRevocation>,
}

impl ControlState {
    /// The state in `state_dir`, or the empty one when there is none yet.
    pub fn load(state_dir: &Path) -> Result<Self, ControlError> {
        let path = state_dir.join(CONTROL_FILE);
        if !path.exists() {
            return Ok(Self::default());
        }
        let bytes = fsutil::read(&path)?;
        let state: Self =
            serde_json::from_slice(&bytes).map_err(|e| ControlError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        state.revoked_serials().map_err(|reason| ControlError::Corrupt { path, reason })?;
        Ok(state)
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), ControlError> {
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
        fsutil::atomic_write(&state_dir.join(CONTROL_FILE), &bytes, false)?;
        Ok(())
    }

    /// `(configured ∪ enrolled) − suspended`.
    pub fn enrolled(&self, configured: impl IntoIterator<Item = SiteId>) -> BTreeSet<SiteId> {
        let mut all: BTreeSet<SiteId> = configured.into_iter().collect();
        all.extend(self.enrolled.keys().cloned());
        all.retain(|s| !self.suspended.contains(s));
        all
    }

    /// The configured pins, with the admin-enrolled sites' pins over them.
    pub fn pins(&self, mut configured: BTreeMap<SiteId, [u8; 32]>) -> BTreeMap<SiteId, [u8; 32]> {
        for (site, fingerprint) in &self.enrolled {
            if let Some(f) = fingerprint.as_deref().and_then(|f| pki::parse_fingerprint(f).ok()) {
                configured.insert(site.clone(), f);
            }
        }
        configured
    }

    pub fn revoked_serials(&self) -> Result<BTreeSet<Vec<u8>>, String> {
        self.revoked.iter().map(|r| pki::serial_bytes(&r.serial).map_err(|e| format!("serial {}: {e}", r.serial))).collect()
    }
}

/// The append-only admin audit log.
#[derive(Debug)]
pub struct AdminLog {
    path: PathBuf,
    next_seq: u64,
    prev: String,
}

impl AdminLog {
    /// Opens (or starts) the log, verifying its chain: a coordinator does not append to a
    /// record that was tampered with.
    pub fn open(state_dir: &Path) -> Result<Self, ControlError> {
        let path = state_dir.join(ADMIN_LOG_FILE);
        if !path.exists() {
            return Ok(Self { path, next_seq: 0, prev: CHAIN_START.to_owned() });
        }
        let text =
            String::from_utf8(fsutil::read(&path)?).map_err(|e| ControlError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        let (next_seq, prev) =
            verify_chain(&text).map_err(|e: AccessError| ControlError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        Ok(Self { path, next_seq, prev })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and fsyncs it.
    pub fn record(
        &mut self,
        at: String,
        who: &str,
        role: Option<Role>,
        action: &str,
        target: Option<&str>,
        outcome: &str,
    ) -> Result<(), ControlError> {
        let entry = AuditEntry {
            seq: self.next_seq,
            at,
            who: who.to_owned(),
            role,
            action: action.to_owned(),
            target: target.map(str::to_owned),
            outcome: outcome.to_owned(),
            prev: self.prev.clone(),
        };
        let line = serde_json::to_string(&entry).expect("serialisable");
        fsutil::append_line(&self.path, &line)?;
        self.prev = chain_hash(&line);
        self.next_seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s.to_owned()).unwrap()
    }

    #[test]
    fn the_admins_changes_apply_over_the_config() {
        let mut c = ControlState::default();
        c.enrolled.insert(site("delta"), Some("ab".repeat(32)));
        c.suspended.insert(site("beta"));
        let all = c.enrolled(["alpha", "beta", "gamma"].map(site));
        assert_eq!(all, ["alpha", "delta", "gamma"].map(site).into_iter().collect());
        assert_eq!(c.pins(BTreeMap::new()).get(&site("delta")), Some(&[0xab; 32]));
    }

    #[test]
    fn state_survives_a_restart_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ControlState::load(dir.path()).unwrap(), ControlState::default());
        let mut c = ControlState { paused: true, ..Default::default() };
        c.revoked.push(LocalRevocation { serial: "0a1b".into(), reason: Some("key lost".into()), at: "now".into(), by: "alice".into() });
        c.save(dir.path()).unwrap();
        assert_eq!(ControlState::load(dir.path()).unwrap(), c);
        assert_eq!(c.revoked_serials().unwrap(), [vec![0x0a, 0x1b]].into_iter().collect());
        std::fs::write(dir.path().join(CONTROL_FILE), b"{\"paused\": 3}").unwrap();
        assert!(matches!(ControlState::load(dir.path()), Err(ControlError::Corrupt { .. })));
    }

    #[test]
    fn the_log_chains_across_reopen_and_refuses_a_tampered_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AdminLog::open(dir.path()).unwrap();
        log.record("t0".into(), "alice", Some(Role::Admin), "pause", None, "done").unwrap();
        drop(log);
        let mut log = AdminLog::open(dir.path()).unwrap();
        log.record("t1".into(), "-", None, "resume", None, "refused: no token").unwrap();
        let text = std::fs::read_to_string(dir.path().join(ADMIN_LOG_FILE)).unwrap();
        assert_eq!(verify_chain(&text).unwrap().0, 2);
        std::fs::write(dir.path().join(ADMIN_LOG_FILE), text.replace("alice", "mallory")).unwrap();
        assert!(matches!(AdminLog::open(dir.path()), Err(ControlError::Corrupt { .. })));
    }
}
