//! The coordinator's state directory: global model checkpoints and round history.
//!
//! Layout: `checkpoints/round-NNNNN.safetensors` (the global model after round N; round 0
//! is the initial model), beside it `checkpoints/round-NNNNN.optimizer.safetensors` (the
//! server optimiser's moments after round N, when it keeps any: `server_opt`), and
//! `state.json` (completed rounds, the current checkpoint and its digest, the history of
//! rounds). Each file is written atomically (temp file, fsync, rename, directory fsync),
//! the optimiser state and the checkpoint before the state that points to them, so a crash
//! at any moment leaves a consistent state to resume from, the optimiser's included.
//!
//! The global model is not kept in memory: a checkpoint is read tensor by tensor
//! ([`ModelFile`]), to serve downloads and to write the next round's checkpoint from the
//! previous one and the round's combined update ([`Store::commit_round`]). What the
//! coordinator holds of a model during a round is its manifest, the running sum of the
//! trainable tensors and the updates being received.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fedward_shared::checkpoint::{ensure_classification_head, normalise_bert_names};
use fedward_shared::config::ServerOptimizer;
use fedward_shared::failpoint;
use fedward_shared::fsutil::{self, FsError};
use fedward_shared::history::{checkpoint_name, RoundRecord, SavedState, SiteRecord, STATE_FILE};
use fedward_shared::tensor::{manifest_digest, Digest, Tensor, TensorError, TensorSet, TensorSpec};

use crate::round::{RoundFailure, RoundSummary};
use crate::server_opt::{self, ServerState};

/// The stateless-reset secret's file in the state directory.
pub const RESET_KEY_FILE: &str = "reset.key";

/// Checkpoints older than this many rounds are pruned (round 0 is always kept).
pub const KEEP_CHECKPOINTS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {error}")]
    Tensors { path: PathBuf, error: TensorError },
    #[error("{path}: corrupt state: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("initial model {path}: {detail}")]
    Init { path: PathBuf, detail: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
}

/// A checkpoint on disk, read tensor by tensor (f32 safetensors).
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    /// Name -> shape, absolute byte offset, byte length.
    entries: BTreeMap<String, (Vec<usize>, u64, usize)>,
    /// The header's string metadata (`__metadata__`).
    metadata: HashMap<String, String>,
}

/// The largest safetensors header accepted (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

impl ModelFile {
    /// Reads and checks the header only.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io_err = |error| StoreError::Io { path: path.to_owned(), error };
        let corrupt = |detail: String| StoreError::Corrupt { path: path.to_owned(), detail };
        let mut f = File::open(path).map_err(io_err)?;
        let file_len = f.metadata().map_err(io_err)?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io_err)?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(corrupt(format!("safetensors header of {header_len} bytes in a file of {file_len}")));
        }
        let mut header = vec![0u8; header_len as usize];
        f.read_exact(&mut header).map_err(io_err)?;
        // The crate's own header type: offsets contiguous and sized by shape and dtype.
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        if data_start + metadata.data_len() as u64 != file_len {
            return Err(corrupt(format!("{} bytes of tensors declared, {} present", metadata.data_len(), file_len - data_start)));
        }
        let mut entries = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            if info.dtype != safetensors::Dtype::F32 {
                return Err(corrupt(format!("tensor {name} is {:?}, not F32", info.dtype)));
            }
            let (start, end) = info.data_offsets;
            entries.insert(name, (info.shape.clone(), data_start + start as u64, end - start));
        }
        Ok(Self { path: path.to_owned(), entries, metadata: metadata.metadata().clone().unwrap_or_default() })
    }

    /// The header's string metadata (`round`, `format`, ...).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a tensor's little-endian f32 bytes lie: absolute offset and length.
    pub fn range(&self, name: &str) -> Option<(u64, usize)> {
        self.entries.get(name).map(|(_, offset, len)| (*offset, *len))
    }

    /// Reads one tensor.
    pub fn read(&self, name: &str) -> Result<Tensor, StoreError> {
        let (shape, offset, len) =
            self.entries.get(name).ok_or_else(|| StoreError::Corrupt { path: self.path.clone(), detail: format!("no tensor {name}") })?;
        let io_err = |error| StoreError::Io { path: self.path.clone(), error };
        let mut f = File::open(&self.path).map_err(io_err)?;
        f.seek(SeekFrom::Start(*offset)).map_err(io_err)?;
        let mut t = Tensor::zeros(shape.clone());
        f.read_exact(fedward_shared::wire::tensor_bytes_mut(&mut t)).map_err(io_err)?;
        // Little-endian on disk; a no-op on little-endian hosts.
        for v in t.data_mut() {
            *v = f32::from_bits(u32::from_le(v.to_bits()));
        }
        debug_assert_eq!(t.len() * 4, *len);
        Ok(t)
    }

    /// The manifest (name order), reading one tensor at a time.
    pub fn manifest(&self) -> Result<Vec<TensorSpec>, StoreError> {
        self.entries
            .iter()
            .map(|(name, (shape, _, _))| Ok(TensorSpec { name: name.clone(), shape: shape.clone(), digest: self.read(name)?.digest() }))
            .collect()
    }

    /// The whole model, for tools and tests (the coordinator itself never needs it).
    pub fn load(&self) -> Result<TensorSet, StoreError> {
        self.entries.keys().map(|name| Ok((name.clone(), self.read(name)?))).collect()
    }
}

/// What [`Store::commit_round`] made of a round.
#[derive(Debug, PartialEq)]
pub enum Committed {
    /// The new checkpoint and the state pointing to it are durable.
    Saved { manifest: Vec<TensorSpec>, digest: Digest },
    /// The new model would hold non-finite values: nothing was written.
    NonFinite { tensor: String, count: usize },
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: Option<SavedState>,
    /// Held by the coordinator that serves from this directory ([`Store::open_exclusive`]).
    _lock: Option<fsutil::DirLock>,
}

impl Store {
    /// Opens the directory (creating it) and reads `state.json` when present.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir.join("checkpoints")).map_err(|error| FsError::Io { path: dir.to_owned(), error })?;
        let path = dir.join(STATE_FILE);
        let state = if path.exists() {
            let bytes = fsutil::read(&path)?;
            Some(serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { path, detail: e.to_string() })?)
        } else {
            None
        };
        Ok(Self { dir: dir.to_owned(), state, _lock: None })
    }

    /// Opens the directory for a coordinator to serve from: no other process may hold it
    /// (`state directory in use` at once otherwise), and what interrupted writes left behind
    /// (a checkpoint's temp file can be as large as the model) is removed first.
    pub fn open_exclusive(dir: &Path) -> Result<Self, StoreError> {
        let lock = fsutil::lock_dir(dir)?;
        for sub in [dir.to_owned(), dir.join("checkpoints")] {
            for removed in fsutil::remove_temp_files(&sub)? {
                tracing::warn!(path = %removed.display(), "removed the leftover of an interrupted write");
            }
        }
        Ok(Self { _lock: Some(lock), ..Self::open(dir)? })
    }

    pub fn state(&self) -> Option<&SavedState> {
        self.state.as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current checkpoint's manifest and the completed rounds, read tensor by tensor;
    /// the checkpoint's digest is checked against the one recorded in the state.
    pub fn current(&self) -> Result<Option<(Vec<TensorSpec>, u64)>, StoreError> {
        let Some(state) = &self.state else { return Ok(None) };
        let path = self.dir.join(&state.checkpoint);
        let manifest = ModelFile::open(&path)?.manifest()?;
        let digest = manifest_digest(&manifest).to_hex();
        if digest != state.model_digest {
            return Err(StoreError::Corrupt {
                path,
                detail: format!("checkpoint digest {digest} does not match state.json ({})", state.model_digest),
            });
        }
        Ok(Some((manifest, state.completed_rounds)))
    }

    /// The current global model, whole, and the completed rounds (for tools and tests).
    pub fn load_current(&self) -> Result<Option<(TensorSet, u64)>, StoreError> {
        let Some((_, completed)) = self.current()? else { return Ok(None) };
        Ok(Some((self.model_file(completed)?.load()?, completed)))
    }

    /// The checkpoint after `round`, ready to be read tensor by tensor.
    pub fn model_file(&self, round: u64) -> Result<ModelFile, StoreError> {
        ModelFile::open(&self.checkpoint_path(round))
    }

    /// Writes the initial model as round 0; returns its manifest.
    pub fn save_initial(&mut self, model: &TensorSet) -> Result<Vec<TensorSpec>, StoreError> {
        self.write_checkpoint(0, model)?;
        self.write_state(SavedState {
            format: 1,
            completed_rounds: 0,
            checkpoint: checkpoint_name(0),
            model_digest: model.digest().to_hex(),
            history: Vec::new(),
        })?;
        Ok(model.specs())
    }

    /// Makes a completed round durable: the checkpoint after round `completed` (the
    /// previous one, `previous`, plus the step `optimizer` makes of the round's combined
    /// `update` of its trainable tensors), then the state pointing to it. A server
    /// optimiser with moments reads them from beside the previous checkpoint and writes
    /// the new ones beside this one, before the checkpoint. Memory: the update, which
    /// becomes the new values in place, the optimiser's moments (0, 1 or 2 times the
    /// update), and one tensor at a time of the rest. A new model (or optimiser state)
    /// with non-finite values is not written.
    pub fn commit_round(
        &mut self,
        previous: &[TensorSpec],
        mut update: TensorSet,
        optimizer: &ServerOptimizer,
        summary: &RoundSummary,
        completed: u64,
        now_rfc3339: &str,
    ) -> Result<Committed, StoreError> {
        let before = self.model_file(completed - 1)?;
        let server_state = self.step_server_optimizer(optimizer, &mut update, completed)?;
        if let Some(state) = &server_state {
            for (kind, set) in [("m", &state.m), ("v", &state.v)] {
                for (name, t) in set.iter() {
                    if let Some((_, count)) = t.non_finite() {
                        return Ok(Committed::NonFinite { tensor: format!("the server optimizer's {kind} of {name}"), count });
                    }
                }
            }
        }
        for (name, t) in update.iter_mut() {
            let old = before.read(name)?;
            if old.shape() != t.shape() {
                return Err(StoreError::Corrupt {
                    path: before.path.clone(),
                    detail: format!("tensor {name} is {:?} on disk, {:?} in the update", old.shape(), t.shape()),
                });
            }
            for (x, o) in t.data_mut().iter_mut().zip(old.data()) {
                *x += o;
            }
            if let Some((_, count)) = t.non_finite() {
                return Ok(Committed::NonFinite { tensor: name.to_owned(), count });
            }
        }
        let manifest: Vec<TensorSpec> = previous
            .iter()
            .map(|s| match update.get(&s.name) {
                Some(t) => TensorSpec { name: s.name.clone(), shape: s.shape.clone(), digest: t.digest() },
                None => s.clone(),
            })
            .collect();
        let digest = manifest_digest(&manifest);
        if let Some(state) = server_state {
            self.write_optimizer_state(completed, optimizer, state)?;
        }
        self.write_checkpoint_from(completed, &before, &update)?;
        self.record_round(summary, completed, digest, now_rfc3339)?;
        Ok(Committed::Saved { manifest, digest })
    }

    /// Model selection's final round: the checkpoint after `completed` is a copy of the
    /// model after round `selected` (kept: the candidates are the checkpoints not yet
    /// pruned), so every tool that reads the latest checkpoint reads the selected model.
    pub fn commit_selection(
        &mut self,
        selected: u64,
        summary: &RoundSummary,
        completed: u64,
        now_rfc3339: &str,
    ) -> Result<Committed, StoreError> {
        let source = self.model_file(selected)?;
        let manifest = source.manifest()?;
        let digest = manifest_digest(&manifest);
        self.write_checkpoint_from(completed, &source, &TensorSet::default())?;
        self.record_round(summary, completed, digest, now_rfc3339)?;
        Ok(Committed::Saved { manifest, digest })
    }

    /// The round's checkpoint is written: `state.json` now names it, with the round's
    /// record, and the oldest checkpoints go.
    fn record_round(&mut self, summary: &RoundSummary, completed: u64, digest: Digest, now_rfc3339: &str) -> Result<(), StoreError> {
        failpoint::crash_point(failpoint::COORDINATOR_AFTER_CHECKPOINT);
        let mut state = self.state.clone().unwrap_or_else(|| SavedState {
            format: 1,
            completed_rounds: 0,
            checkpoint: String::new(),
            model_digest: String::new(),
            history: Vec::new(),
        });
        state.completed_rounds = completed;
        state.checkpoint = checkpoint_name(completed);
        state.model_digest = digest.to_hex();
        state.history.push(record_of_summary(summary, digest, now_rfc3339));
        self.write_state(state)?;
        self.prune(completed);
        Ok(())
    }

    /// The server optimiser's state after `round`, if a file holds one (for tools and tests).
    pub fn optimizer_state(&self, round: u64) -> Result<Option<ServerState>, StoreError> {
        let path = self.optimizer_state_path(round);
        if !path.exists() {
            return Ok(None);
        }
        let set = ModelFile::open(&path)?.load()?;
        ServerState::from_file_set(set).map(Some).map_err(|e| StoreError::Corrupt { path, detail: e.to_string() })
    }

    /// Turns `update` into the step of round `completed` and returns the optimiser's new
    /// state (`None` when it keeps none). The previous state is the one written beside the
    /// previous checkpoint; none there (round 0, or an optimiser just switched on or
    /// changed) means the initial state, said in the log after round 0.
    fn step_server_optimizer(
        &self,
        optimizer: &ServerOptimizer,
        update: &mut TensorSet,
        completed: u64,
    ) -> Result<Option<ServerState>, StoreError> {
        if optimizer.moments() == 0 {
            server_opt::step(optimizer, &mut ServerState::default(), update)
                .map_err(|e| StoreError::Corrupt { path: self.dir.clone(), detail: e.to_string() })?;
            return Ok(None);
        }
        let last = completed - 1;
        let path = self.optimizer_state_path(last);
        let kept = if path.exists() {
            let file = ModelFile::open(&path)?;
            match file.metadata().get("optimizer").map(String::as_str) {
                Some(name) if name == optimizer.name() => Some(
                    ServerState::from_file_set(file.load()?)
                        .map_err(|e| StoreError::Corrupt { path: path.clone(), detail: e.to_string() })?,
                ),
                other => {
                    tracing::warn!(round = last, kept = ?other, configured = optimizer.name(), "the server optimizer changed: its state starts afresh");
                    None
                }
            }
        } else {
            if last > 0 {
                tracing::warn!(
                    round = last,
                    optimizer = optimizer.name(),
                    "no server optimizer state beside the checkpoint: it starts afresh"
                );
            }
            None
        };
        let mut state = match kept {
            Some(mut state) => {
                let (added, dropped) = state.fill_missing(optimizer, update);
                if !added.is_empty() || !dropped.is_empty() {
                    tracing::warn!(?added, ?dropped, "the trainable tensors changed: the server optimizer's state follows them");
                }
                state
            }
            None => ServerState::initial(optimizer, update),
        };
        server_opt::step(optimizer, &mut state, update).map_err(|e| StoreError::Corrupt { path, detail: e.to_string() })?;
        Ok(Some(state))
    }

    /// The secret that keys QUIC's stateless resets (`reset.key`, 0600): made once from
    /// the operating system's randomness and kept, so a restarted coordinator can reset
    /// its predecessor's connections at once.
    pub fn reset_secret(&self) -> Result<[u8; 32], StoreError> {
        let path = self.dir.join(RESET_KEY_FILE);
        if path.exists() {
            let bytes = fsutil::read_private_key(&path)?;
            return bytes.try_into().map_err(|b: Vec<u8>| StoreError::Corrupt { path, detail: format!("{} bytes, expected 32", b.len()) });
        }
        let secret: [u8; 32] = rand::random();
        fsutil::write_private_new(&path, &secret)?;
        fsutil::sync_dir(&self.dir)?;
        Ok(secret)
    }

    /// The rounds with a checkpoint on disk.
    pub fn checkpoint_rounds(&self) -> Result<Vec<u64>, StoreError> {
        let dir = self.dir.join("checkpoints");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(StoreError::Io { path: dir, error }),
        };
        let mut rounds: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("round-")?.strip_suffix(".safetensors")?.parse().ok()
            })
            .collect();
        rounds.sort_unstable();
        Ok(rounds)
    }

    /// Recovery: writes `state.json` anew at round `at` from that round's checkpoint (its
    /// digest computed), with a history that says so.
    pub fn rebuild_state(&mut self, at: u64, now_rfc3339: &str) -> Result<(), StoreError> {
        let manifest = self.model_file(at)?.manifest()?;
        let state = SavedState {
            format: 1,
            completed_rounds: at,
            checkpoint: checkpoint_name(at),
            model_digest: manifest_digest(&manifest).to_hex(),
            history: vec![note_record(at, &format!("recovered: state.json rebuilt from the checkpoint of round {at}"), now_rfc3339)],
        };
        self.write_state(state)
    }

    /// Adds an operator-facing note to the history (a recovery, say).
    pub fn note(&mut self, text: &str, now_rfc3339: &str) -> Result<(), StoreError> {
        let Some(mut state) = self.state.clone() else { return Ok(()) };
        state.history.push(note_record(state.completed_rounds, text, now_rfc3339));
        self.write_state(state)
    }

    /// Records a failed round in the history.
    pub fn save_failure(&mut self, f: &RoundFailure, now_rfc3339: &str) -> Result<(), StoreError> {
        let Some(mut state) = self.state.clone() else { return Ok(()) };
        state.history.push(RoundRecord {
            round: f.round.0,
            attempt: f.attempt,
            outcome: if f.gave_up { format!("failed, federation stopped: {}", f.reason) } else { format!("failed: {}", f.reason) },
            finished_at: now_rfc3339.to_owned(),
            duration_secs: 0.0,
            sites: Vec::new(),
            declined: f.declined.iter().map(|(s, r)| (s.to_string(), format!("{r:?}: {r}"))).collect(),
            rejected: f.rejected.iter().map(|(s, r)| (s.to_string(), r.to_string())).collect(),
            missed: f.missed.iter().map(ToString::to_string).collect(),
            mean_train_loss: None,
            model_digest: None,
            scored: None,
            selected: None,
        });
        self.write_state(state)
    }

    /// Path of the checkpoint after `round`.
    pub fn checkpoint_path(&self, round: u64) -> PathBuf {
        self.dir.join(checkpoint_name(round))
    }

    /// Path of the server optimiser's state after `round`, beside its checkpoint.
    pub fn optimizer_state_path(&self, round: u64) -> PathBuf {
        self.dir.join(format!("checkpoints/round-{round:05}.optimizer.safetensors"))
    }

    /// Writes the optimiser's state after `round`, 0600 like the checkpoints.
    fn write_optimizer_state(&self, round: u64, optimizer: &ServerOptimizer, state: ServerState) -> Result<(), StoreError> {
        let path = self.optimizer_state_path(round);
        let mut metadata = checkpoint_metadata(round);
        metadata.insert("format".to_owned(), "fedward-server-optimizer".to_owned());
        metadata.insert("optimizer".to_owned(), optimizer.name().to_owned());
        let set = state.into_file_set();
        fsutil::atomic_write_with(&path, true, |tmp| set.write_safetensors(tmp, Some(metadata)))?;
        Ok(())
    }

    fn write_checkpoint(&self, round: u64, model: &TensorSet) -> Result<(), StoreError> {
        let path = self.checkpoint_path(round);
        fsutil::atomic_write_with(&path, true, |tmp| model.write_safetensors(tmp, Some(checkpoint_metadata(round))))?;
        Ok(())
    }

    /// Writes the checkpoint after `round` from the one before it: the tensors in
    /// `updated` from memory, every other one copied from `before`'s file. The layout is
    /// the safetensors crate's (its header type, name order, an 8-byte aligned header).
    fn write_checkpoint_from(&self, round: u64, before: &ModelFile, updated: &TensorSet) -> Result<(), StoreError> {
        let path = self.checkpoint_path(round);
        let mut offset = 0;
        let mut infos = Vec::with_capacity(before.entries.len());
        for (name, (shape, _, len)) in &before.entries {
            let info = safetensors::tensor::TensorInfo {
                dtype: safetensors::Dtype::F32,
                shape: shape.clone(),
                data_offsets: (offset, offset + len),
            };
            infos.push((name.clone(), info));
            offset += len;
        }
        let corrupt = |detail: String| StoreError::Corrupt { path: path.clone(), detail };
        let metadata = safetensors::tensor::Metadata::new(Some(checkpoint_metadata(round)), infos).map_err(|e| corrupt(e.to_string()))?;
        let mut header = serde_json::to_vec(&metadata).map_err(|e| corrupt(e.to_string()))?;
        header.resize(header.len().next_multiple_of(8), b' ');
        fsutil::atomic_write_with(&path, true, |tmp| -> io::Result<()> {
            let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            if failpoint::ENABLED {
                // What a crash leaves: a temporary file with part of the checkpoint in it.
                out.flush()?;
                failpoint::crash_point(failpoint::COORDINATOR_CHECKPOINT_WRITE);
            }
            let mut source = File::open(&before.path)?;
            for (name, (_, at, len)) in &before.entries {
                match updated.get(name) {
                    Some(t) => out.write_all(&t.le_bytes())?,
                    None => {
                        source.seek(SeekFrom::Start(*at))?;
                        let copied = io::copy(&mut (&mut source).take(*len as u64), &mut out)?;
                        if copied != *len as u64 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("tensor {name} is cut short")));
                        }
                    }
                }
            }
            out.flush()
        })?;
        Ok(())
    }

    fn write_state(&mut self, state: SavedState) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| StoreError::Corrupt { path: path.clone(), detail: e.to_string() })?;
        fsutil::atomic_write(&path, &bytes, false)?;
        self.state = Some(state);
        Ok(())
    }

    fn prune(&self, latest: u64) {
        for round in 1..latest.saturating_sub(KEEP_CHECKPOINTS - 1) {
            for path in [self.checkpoint_path(round), self.optimizer_state_path(round)] {
                if !path.exists() {
                    continue;
                }
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), cause = %e, "could not prune an old checkpoint");
                }
            }
        }
    }
}

fn note_record(round: u64, text: &str, now_rfc3339: &str) -> RoundRecord {
    RoundRecord {
        round,
        attempt: 0,
        outcome: text.to_owned(),
        finished_at: now_rfc3339.to_owned(),
        duration_secs: 0.0,
        sites: Vec::new(),
        declined: Vec::new(),
        rejected: Vec::new(),
        missed: Vec::new(),
        mean_train_loss: None,
        model_digest: None,
        scored: None,
        selected: None,
    }
}

fn checkpoint_metadata(round: u64) -> HashMap<String, String> {
    [("round".to_owned(), round.to_string()), ("format".to_owned(), "fedward-global".to_owned())].into_iter().collect()
}

fn record_of_summary(s: &RoundSummary, model_digest: Digest, now_rfc3339: &str) -> RoundRecord {
    RoundRecord {
        round: s.round.0,
        attempt: s.attempt,
        outcome: "completed".into(),
        finished_at: now_rfc3339.to_owned(),
        duration_secs: s.duration.as_secs_f64(),
        sites: s
            .contributions
            .iter()
            .map(|c| SiteRecord {
                site: c.site.to_string(),
                num_examples: c.num_examples,
                weight: Some(c.weight),
                update_norm: Some(c.update_norm),
                scale: Some(c.scale),
                train_loss: c.metrics.as_ref().map(|m| m.train_loss),
                val_accuracy: c.metrics.as_ref().and_then(|m| m.val_accuracy),
                val_macro_f1: c.metrics.as_ref().and_then(|m| m.val_macro_f1),
                privacy_mode: c.privacy.mode.to_string(),
                noise_multiplier: c.privacy.noise_multiplier,
                clip_norm: c.privacy.clip_norm,
                epsilon_after: c.privacy.epsilon_after.is_finite().then_some(c.privacy.epsilon_after),
                update_digest: c.update_digest.to_hex(),
            })
            .collect(),
        declined: s.declined.iter().map(|(site, r)| (site.to_string(), format!("{r:?}: {r}"))).collect(),
        rejected: s.rejected.iter().map(|(site, r)| (site.to_string(), r.to_string())).collect(),
        missed: s.missed.iter().map(ToString::to_string).collect(),
        mean_train_loss: s.mean_train_loss,
        model_digest: Some(model_digest.to_hex()),
        scored: s.scored,
        selected: s.selected,
    }
}

/// Loads the initial global model: a model directory (`model.safetensors`) or a
/// `.safetensors` file, brought to transformers' classification naming with a seeded head
/// for `num_labels` when the base has none.
pub fn load_initial_model(path: &Path, num_labels: usize, seed: u64) -> Result<TensorSet, StoreError> {
    let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_owned() };
    if !file.exists() {
        return Err(StoreError::Init {
            path: file,
            detail: "not found; for the pretrained MiniLM base run `scripts/fetch-models.sh` first".into(),
        });
    }
    let bytes = fsutil::read(&file)?;
    let raw = TensorSet::from_safetensors(&bytes, true).map_err(|error| StoreError::Tensors { path: file.clone(), error })?;
    let mut model = normalise_bert_names(raw);
    ensure_classification_head(&mut model, num_labels, seed).map_err(|e| StoreError::Init { path: file.clone(), detail: e.to_string() })?;
    model.check_finite().map_err(|error| StoreError::Tensors { path: file, error })?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fedward_shared::tensor::Tensor;
    use fedward_shared::wire::RoundId;

    use super::*;

    const FEDAVG: ServerOptimizer = ServerOptimizer::FedAvg { learning_rate: 1.0 };

    fn model(v: f32) -> TensorSet {
        let mut m = TensorSet::new();
        m.insert("classifier.weight", Tensor::new(vec![2], vec![v, v]).unwrap());
        m
    }

    fn summary(round: u64) -> RoundSummary {
        RoundSummary {
            scored: None,
            selected: None,
            round: RoundId(round),
            attempt: 1,
            contributions: Vec::new(),
            declined: Vec::new(),
            rejected: Vec::new(),
            missed: Vec::new(),
            mean_train_loss: Some(0.5),
            duration: Duration::from_secs(3),
        }
    }

    /// A model with a frozen tensor beside the trainable one, as the coordinator sees it.
    fn full_model(v: f32) -> TensorSet {
        let mut m = model(v);
        m.insert("bert.embeddings.word_embeddings.weight", Tensor::new(vec![3, 2], (0..6).map(|i| i as f32 * 0.5).collect()).unwrap());
        m
    }

    #[test]
    fn resumes_from_the_last_saved_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert!(store.load_current().unwrap().is_none());
        let mut manifest = store.save_initial(&full_model(0.0)).unwrap();
        for r in 1..=7 {
            // Each round adds 1 to the trainable tensor.
            let Committed::Saved { manifest: next, digest } =
                store.commit_round(&manifest, model(1.0), &FEDAVG, &summary(r), r, "t").unwrap()
            else {
                panic!("finite")
            };
            assert_eq!(digest, full_model(r as f32).digest());
            manifest = next;
        }
        let reopened = Store::open(dir.path()).unwrap();
        let (m, completed) = reopened.load_current().unwrap().unwrap();
        assert_eq!((m, completed), (full_model(7.0), 7));
        assert_eq!(reopened.current().unwrap().unwrap(), (full_model(7.0).specs(), 7));
        assert_eq!(reopened.state().unwrap().history.len(), 7);
        assert!(reopened.checkpoint_path(0).exists());
        assert!(!reopened.checkpoint_path(1).exists(), "old checkpoints are pruned");
        assert!(reopened.checkpoint_path(3).exists());
        // A checkpoint written tensor by tensor is a valid safetensors file.
        let bytes = std::fs::read(reopened.checkpoint_path(7)).unwrap();
        assert_eq!(TensorSet::from_safetensors(&bytes, false).unwrap(), full_model(7.0));
    }

    /// Round `r`'s combined update in the resume tests: varies by round and coordinate.
    fn update_of_round(r: u64) -> TensorSet {
        let mut m = TensorSet::new();
        let x = r as f32;
        m.insert("classifier.weight", Tensor::new(vec![2], vec![0.1 * x - 0.25, 1.0 / (x + 1.0)]).unwrap());
        m
    }

    /// Commits rounds `from..=to` with `optimizer`, starting from what the store holds.
    fn run_rounds(dir: &Path, optimizer: &ServerOptimizer, from: u64, to: u64) {
        let mut store = Store::open(dir).unwrap();
        let (mut manifest, completed) = match store.current().unwrap() {
            Some(current) => current,
            None => (store.save_initial(&full_model(0.5)).unwrap(), 0),
        };
        assert_eq!(completed + 1, from);
        for r in from..=to {
            let Committed::Saved { manifest: next, .. } =
                store.commit_round(&manifest, update_of_round(r), optimizer, &summary(r), r, "t").unwrap()
            else {
                panic!("finite")
            };
            manifest = next;
        }
    }

    /// A coordinator stopped after round 3 and started again from its state directory
    /// goes on exactly as one that never stopped: same optimiser state, same model, to
    /// the bit.
    #[test]
    fn a_restart_resumes_the_server_optimizer_exactly() {
        for optimizer in [
            ServerOptimizer::FedAvgM { learning_rate: 0.7, momentum: 0.9 },
            ServerOptimizer::FedAdam { learning_rate: 0.05, beta1: 0.9, beta2: 0.99, tau: 1e-3 },
            ServerOptimizer::FedYogi { learning_rate: 0.05, beta1: 0.9, beta2: 0.99, tau: 1e-3 },
        ] {
            let whole = tempfile::tempdir().unwrap();
            run_rounds(whole.path(), &optimizer, 1, 7);
            let restarted = tempfile::tempdir().unwrap();
            run_rounds(restarted.path(), &optimizer, 1, 3);
            run_rounds(restarted.path(), &optimizer, 4, 7);
            let (a, b) = (Store::open(whole.path()).unwrap(), Store::open(restarted.path()).unwrap());
            // Every value to the bit (the files' JSON headers may list their metadata in
            // another order).
            let bits = |path: PathBuf| -> Vec<(String, Vec<u8>)> {
                ModelFile::open(&path).unwrap().load().unwrap().iter().map(|(n, t)| (n.to_owned(), t.le_bytes().into_owned())).collect()
            };
            assert_eq!(bits(a.checkpoint_path(7)), bits(b.checkpoint_path(7)), "{optimizer}: same model");
            assert_eq!(bits(a.optimizer_state_path(7)), bits(b.optimizer_state_path(7)), "{optimizer}: same state");
            assert_eq!(a.state().unwrap().model_digest, b.state().unwrap().model_digest);
            // The optimiser did something: the model is not checkpoint 0 plus the updates.
            let plain = (1..=7).map(|r| update_of_round(r).get("classifier.weight").unwrap().data()[0]).sum::<f32>() + 0.5;
            let got = a.load_current().unwrap().unwrap().0;
            assert_ne!(got.get("classifier.weight").unwrap().data()[0], plain, "{optimizer}");
            // Its state: the moments of the trainable tensor only, owner-only like the checkpoints.
            let state = a.optimizer_state(7).unwrap().unwrap();
            assert_eq!(state.m.names().collect::<Vec<_>>(), ["classifier.weight"]);
            assert_eq!(state.v.len(), optimizer.moments() - 1);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(a.optimizer_state_path(7)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{optimizer}");
            }
            // Pruned with the checkpoints.
            assert!(!a.optimizer_state_path(1).exists() && a.optimizer_state_path(3).exists());
            assert_eq!(a.checkpoint_rounds().unwrap(), [0, 3, 4, 5, 6, 7]);
        }
    }

    /// FedAvgM over the store, by hand: the model after each round is the previous one
    /// plus lr m, with m = mu m + d.
    #[test]
    fn fedavgm_moves_the_checkpointed_model_by_its_momentum() {
        let dir = tempfile::tempdir().unwrap();
        let optimizer = ServerOptimizer::FedAvgM { learning_rate: 0.5, momentum: 0.5 };
        let mut store = Store::open(dir.path()).unwrap();
        let mut manifest = store.save_initial(&full_model(0.0)).unwrap();
        // d = 1 each round: m = 1, 1.5, 1.75; the model moves by 0.5, 0.75, 0.875.
        for (r, want) in [(1, 0.5), (2, 1.25), (3, 2.125)] {
            let Committed::Saved { manifest: next, digest } =
                store.commit_round(&manifest, model(1.0), &optimizer, &summary(r), r, "t").unwrap()
            else {
                panic!("finite")
            };
            assert_eq!(digest, full_model(want).digest(), "round {r}");
            manifest = next;
        }
        // Plain FedAvg writes no optimiser state.
        let plain = tempfile::tempdir().unwrap();
        run_rounds(plain.path(), &FEDAVG, 1, 2);
        assert!(!Store::open(plain.path()).unwrap().optimizer_state_path(2).exists());
    }

    /// The coordinator never checkpoints or offers a model that overflowed.
    #[test]
    fn a_round_that_would_overflow_the_model_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let manifest = store.save_initial(&full_model(f32::MAX)).unwrap();
        let committed = store.commit_round(&manifest, model(f32::MAX), &FEDAVG, &summary(1), 1, "t").unwrap();
        assert_eq!(committed, Committed::NonFinite { tensor: "classifier.weight".into(), count: 2 });
        assert!(!store.checkpoint_path(1).exists());
        assert_eq!(Store::open(dir.path()).unwrap().current().unwrap().unwrap().1, 0);
    }

    #[test]
    fn a_damaged_checkpoint_is_refused_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.save_initial(&full_model(0.0)).unwrap();
        let path = store.checkpoint_path(0);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(ModelFile::open(&path).unwrap_err().to_string().contains("present"));
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(ModelFile::open(&path).is_err());
    }

    #[test]
    fn a_checkpoint_that_does_not_match_the_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.save_initial(&model(0.0)).unwrap();
        let bytes = model(9.0).to_safetensors(None).unwrap();
        std::fs::write(store.checkpoint_path(0), bytes).unwrap();
        let err = Store::open(dir.path()).unwrap().current().unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn missing_initial_model_names_the_fetch_command() {
        let err = load_initial_model(Path::new("/nonexistent/model"), 4, 0).unwrap_err();
        assert!(err.to_string().contains("scripts/fetch-models.sh"), "{err}");
    }
}
