//! What the coordinator checks before it serves from a state directory: that `state.json`,
//! the checkpoints and the ledger tell one story. A lost `state.json` beside checkpoints
//! and a ledger would restart the federation at round 0 (sites retraining and releasing
//! rounds they already released); a ledger that lost its tail would go on without the
//! record auditors rely on. Either stops the coordinator with what is missing, unless the
//! operator asks for recovery (`serve --recover`), which rebuilds `state.json` from the
//! newest checkpoint the ledger sealed and goes on past a ledger gap, saying so loudly.
//!
//! [`plan`] is pure; [`open`] is the shell that gathers the facts and carries it out.

use fedward_shared::history::ScoreRecord;
use fedward_shared::tensor::{TensorSet, TensorSpec};
use fedward_shared::wire::RoundId;

use crate::ledger::CoordinatorLedger;
use crate::store::{Store, StoreError};

/// What the state directory and the ledger hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// `state.json`'s completed rounds, when it exists.
    pub state_completed: Option<u64>,
    /// Rounds with a checkpoint on disk (round 0 is the initial model).
    pub checkpoints: Vec<u64>,
    /// Rounds the ledger seals, in order.
    pub sealed: Vec<u64>,
    /// Rounds with accepted entries after the ledger's last seal.
    pub unsealed_accepted: Vec<u64>,
    /// Whether the ledger holds any entry.
    pub ledger_entries: usize,
}

/// What the shell does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing here yet: initialise round 0.
    Fresh,
    /// Resume after `completed` rounds; seal round `completed` first when a crash came
    /// between its checkpoint and its seal.
    Resume { completed: u64, seal_first: bool },
    /// `--recover`: rebuild `state.json` at round `at` (a checkpoint the ledger sealed, or
    /// 0), then resume.
    RebuildState { at: u64 },
    /// `--recover`: resume after `completed` rounds although the ledger lacks rounds
    /// `missing`; say so in the log and the state's history.
    ResumeOverGap { completed: u64, missing: Vec<u64> },
}

/// Why the coordinator will not start as things are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistent {
    #[error(
        "state.json is missing, but the state directory holds checkpoints up to round {checkpoint} and the ledger {entries} entries \
         (sealed up to round {sealed}): starting would restart the federation at round 0. Start once with `serve --recover` to \
         rebuild state.json from the newest checkpoint the ledger sealed"
    )]
    LostState { checkpoint: u64, sealed: u64, entries: usize },
    #[error(
        "state.json says {completed} rounds completed, but the ledger lacks round(s) {missing:?} (its tail was lost or cut): \
         restore the ledger from a backup, or start with `serve --recover` to go on past the gap, which auditors will see"
    )]
    LedgerBehind { completed: u64, missing: Vec<u64> },
    #[error(
        "the ledger seals round {sealed}, but state.json says only {completed} rounds completed (state.json or a checkpoint was \
         rolled back): restore the state directory from a backup taken with the ledger"
    )]
    LedgerAhead { completed: u64, sealed: u64 },
}

/// Decides how to start from `facts`; `recover` is the operator's explicit consent.
pub fn plan(facts: &Facts, recover: bool) -> Result<Plan, Inconsistent> {
    let last_sealed = facts.sealed.last().copied().unwrap_or(0);
    let Some(completed) = facts.state_completed else {
        let newest_checkpoint = facts.checkpoints.iter().copied().max().unwrap_or(0);
        if newest_checkpoint == 0 && facts.ledger_entries == 0 {
            return Ok(Plan::Fresh);
        }
        if !recover {
            return Err(Inconsistent::LostState { checkpoint: newest_checkpoint, sealed: last_sealed, entries: facts.ledger_entries });
        }
        // The newest round whose checkpoint survived and which the ledger sealed: what
        // was made durable in full.
        let at = facts.checkpoints.iter().copied().filter(|r| *r == 0 || facts.sealed.contains(r)).max().unwrap_or(0);
        return Ok(Plan::RebuildState { at });
    };
    if last_sealed > completed {
        return Err(Inconsistent::LedgerAhead { completed, sealed: last_sealed });
    }
    if last_sealed == completed {
        return Ok(Plan::Resume { completed, seal_first: false });
    }
    // A crash between the last round's checkpoint and its seal leaves its accepted entries
    // unsealed: seal them now. Anything more missing is a lost tail.
    if last_sealed + 1 == completed && facts.unsealed_accepted.contains(&completed) {
        return Ok(Plan::Resume { completed, seal_first: true });
    }
    let missing: Vec<u64> = (last_sealed + 1..=completed).collect();
    if recover {
        Ok(Plan::ResumeOverGap { completed, missing })
    } else {
        Err(Inconsistent::LedgerBehind { completed, missing })
    }
}

/// Why the coordinator could not get ready to serve.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Inconsistent(#[from] Inconsistent),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Brings the state directory to the point the federation resumes from, after checking it
/// against the ledger: initialises round 0 with `init` when nothing is there, rebuilds a
/// lost `state.json` or goes on past a ledger gap only with `recover`. Returns the current
/// model's manifest and the completed rounds.
pub fn open(
    store: &mut Store,
    ledger: &CoordinatorLedger,
    recover: bool,
    now_rfc3339: &str,
    init: impl FnOnce() -> Result<TensorSet, StoreError>,
) -> Result<(Vec<TensorSpec>, u64), StartupError> {
    let (sealed, unsealed_accepted) = ledger.rounds();
    let facts = Facts {
        state_completed: store.state().map(|s| s.completed_rounds),
        checkpoints: store.checkpoint_rounds()?,
        sealed,
        unsealed_accepted,
        ledger_entries: ledger.ledger().entries().len(),
    };
    match plan(&facts, recover)? {
        Plan::Fresh => {
            let model = init()?;
            tracing::info!(tensors = model.len(), parameters = model.element_count(), "initialised round 0 from the base model");
            return Ok((store.save_initial(&model)?, 0));
        }
        Plan::Resume { .. } => {}
        Plan::RebuildState { at } => {
            tracing::warn!(round = at, "recovery: rebuilding state.json from the checkpoint of round {at}, the newest the ledger sealed");
            store.rebuild_state(at, now_rfc3339)?;
        }
        Plan::ResumeOverGap { completed, missing } => {
            let missing: Vec<RoundId> = missing.into_iter().map(RoundId).collect();
            tracing::error!(completed, ?missing, "recovery: resuming although the ledger lacks these rounds; auditors will see the gap");
            store.note(&format!("resumed with --recover: the ledger lacks round(s) {missing:?}"), now_rfc3339)?;
        }
    }
    let current =
        store.current()?.ok_or_else(|| StoreError::Corrupt { path: store.dir().to_owned(), detail: "state.json vanished".into() })?;
    Ok(current)
}

/// Model selection: the sites' scores of the models made before a restart, from the saved
/// history (model round and tally), so a restarted coordinator selects among them too.
pub fn saved_scores(store: &Store) -> Vec<ScoreRecord> {
    store.state().map_or_else(Vec::new, |st| st.history.iter().filter_map(|r| r.scored).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: Option<u64>, checkpoints: &[u64], sealed: &[u64], unsealed: &[u64]) -> Facts {
        Facts {
            state_completed: state,
            checkpoints: checkpoints.to_vec(),
            sealed: sealed.to_vec(),
            unsealed_accepted: unsealed.to_vec(),
            ledger_entries: sealed.len() * 3 + unsealed.len(),
        }
    }

    #[test]
    fn a_fresh_directory_starts_and_a_consistent_one_resumes() {
        assert_eq!(plan(&Facts::default(), false), Ok(Plan::Fresh));
        assert_eq!(plan(&facts(Some(0), &[0], &[], &[]), false), Ok(Plan::Resume { completed: 0, seal_first: false }));
        assert_eq!(plan(&facts(Some(3), &[0, 1, 2, 3], &[1, 2, 3], &[]), false), Ok(Plan::Resume { completed: 3, seal_first: false }));
        // A crash between round 3's checkpoint and its seal.
        assert_eq!(plan(&facts(Some(3), &[0, 1, 2, 3], &[1, 2], &[3]), false), Ok(Plan::Resume { completed: 3, seal_first: true }));
    }

    /// Losing state.json restarted the federation at round 0.
    #[test]
    fn a_lost_state_file_stops_the_coordinator_unless_recovery_is_asked_for() {
        let lost = facts(None, &[0, 2, 3, 4], &[1, 2, 3], &[4]);
        let err = plan(&lost, false).unwrap_err();
        assert!(matches!(err, Inconsistent::LostState { checkpoint: 4, sealed: 3, .. }), "{err}");
        assert!(err.to_string().contains("--recover"));
        // Round 4's checkpoint was written but never sealed: recovery goes back to round 3.
        assert_eq!(plan(&lost, true), Ok(Plan::RebuildState { at: 3 }));
        // Only the initial checkpoint and an empty ledger: nothing was lost.
        assert_eq!(plan(&facts(None, &[0], &[], &[]), false), Ok(Plan::Fresh));
    }

    /// Removing the last round's entries and seal, or the whole ledger, went unnoticed.
    #[test]
    fn a_ledger_that_lost_its_tail_stops_the_coordinator() {
        let err = plan(&facts(Some(3), &[0, 1, 2, 3], &[1, 2], &[]), false).unwrap_err();
        assert_eq!(err, Inconsistent::LedgerBehind { completed: 3, missing: vec![3] });
        let deleted = Facts { state_completed: Some(2), checkpoints: vec![0, 1, 2], ..Facts::default() };
        assert_eq!(plan(&deleted, false).unwrap_err(), Inconsistent::LedgerBehind { completed: 2, missing: vec![1, 2] });
        assert_eq!(plan(&deleted, true), Ok(Plan::ResumeOverGap { completed: 2, missing: vec![1, 2] }));
        // A ledger ahead of the state: state.json was rolled back.
        assert_eq!(
            plan(&facts(Some(1), &[0, 1, 2], &[1, 2], &[]), true).unwrap_err(),
            Inconsistent::LedgerAhead { completed: 1, sealed: 2 }
        );
    }
}
