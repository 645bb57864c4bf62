//! The released-update cache: the last update the agent recorded in its ledger, kept in
//! the state directory so a crash between recording and sending ends in a resend of the
//! identical update, never in a second training run that spends the budget again.
//!
//! One file, written atomically ([`fsutil::atomic_write`], 0600) *before* the ledger
//! append, so whenever the ledger holds a release its update is on disk: a magic line,
//! the 32-byte digest of the global model it was trained from, the ledger record of the
//! release (a u32 little-endian length and its JSON: what a crash may leave cut short in
//! the ledger is completed from it, see `daemon::open_ledger`), the framed `Update`
//! message exactly as it is sent (`shared::wire`), the raw little-endian f32 bytes of
//! each tensor in the header's order, and a blake3 digest of everything before it. Reading
//! checks that digest first: the header's fields (examples, privacy parameters) are resent
//! as they are and must be what the ledger recorded, so a damaged byte anywhere refuses
//! the file (a property test found that v1, which checked only the tensors, took a flipped
//! header byte). The next round's update replaces it.

use std::io;
use std::path::Path;

use fedward_shared::fsutil::{self, FsError};
use fedward_shared::ledger::ReleaseRecord;
use fedward_shared::tensor::{Digest, TensorSet};
use fedward_shared::wire::{self, Message, UpdateHeader};

/// The cache's file name in the agent's state directory.
pub const RELEASED_UPDATE: &str = "released-update.bin";
const MAGIC: &[u8] = b"fedward-released-update-v4\n";
/// The trailing blake3 digest over the rest of the file.
const CHECKSUM_LEN: usize = 32;
/// An update this large is not one the agent wrote (the wire limit is per tensor; this is
/// only a guard against reading a wrong file whole).
const MAX_TOTAL_BYTES: usize = 1 << 34;

/// A released update as cached.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleasedUpdate {
    /// The global model the update was trained from.
    pub model_digest: Digest,
    /// The header exactly as sent (round, examples, metrics, tensor specs, privacy).
    pub header: UpdateHeader,
    pub delta: TensorSet,
    /// Its record, as appended to the site's ledger.
    pub record: ReleaseRecord,
}

/// Why the cache could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {error}")]
    Read { path: String, error: io::Error },
    #[error("released-update cache is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode the update header: {0}")]
    Encode(#[from] wire::EncodeError),
}

impl ReleasedUpdate {
    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, OutboxError> {
        let frame = wire::encode(&Message::Update(self.header.clone()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + 32 + frame.len() + self.delta.byte_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.model_digest.0);
        let record = serde_json::to_vec(&self.record).map_err(|e| OutboxError::Corrupt(format!("ledger record: {e}")))?;
        out.extend_from_slice(
            &u32::try_from(record.len()).map_err(|_| OutboxError::Corrupt("ledger record too long".into()))?.to_le_bytes(),
        );
        out.extend_from_slice(&record);
        out.extend_from_slice(&frame);
        for spec in &self.header.tensors {
            let t =
                self.delta.get(&spec.name).ok_or_else(|| OutboxError::Corrupt(format!("tensor {} is declared but absent", spec.name)))?;
            out.extend_from_slice(&t.le_bytes());
        }
        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        Ok(out)
    }

    /// Parses and verifies the file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, OutboxError> {
        let corrupt = |m: &str| OutboxError::Corrupt(m.to_owned());
        let (body, checksum) = bytes.split_at_checked(bytes.len().saturating_sub(CHECKSUM_LEN)).ok_or_else(|| corrupt("truncated"))?;
        if checksum.len() != CHECKSUM_LEN || blake3::hash(body).as_bytes() != checksum {
            return Err(corrupt("checksum mismatch: the file is damaged or not a released-update file"));
        }
        let rest = body.strip_prefix(MAGIC).ok_or_else(|| corrupt("not a released-update file"))?;
        let (digest, rest) = rest.split_at_checked(32).ok_or_else(|| corrupt("truncated model digest"))?;
        let model_digest = Digest(digest.try_into().map_err(|_| corrupt("model digest"))?);
        let (len, rest) = rest.split_at_checked(4).ok_or_else(|| corrupt("truncated ledger record"))?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt("ledger record length"))?) as usize;
        let (record, rest) = rest.split_at_checked(len).ok_or_else(|| corrupt("truncated ledger record"))?;
        let record: ReleaseRecord = serde_json::from_slice(record).map_err(|e| OutboxError::Corrupt(format!("ledger record: {e}")))?;
        let (msg, used) =
            wire::decode(rest).map_err(|e| OutboxError::Corrupt(e.to_string()))?.ok_or_else(|| corrupt("truncated update header"))?;
        let Message::Update(header) = msg else { return Err(corrupt("the header is not an update")) };
        let mut data = &rest[used..];
        let total = wire::declared_payload_bytes(&header.tensors, MAX_TOTAL_BYTES).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
        if data.len() != total {
            return Err(OutboxError::Corrupt(format!("{} tensor bytes, the header declares {total}", data.len())));
        }
        let mut delta = TensorSet::new();
        for spec in &header.tensors {
            let mut t = wire::alloc_tensor(spec);
            let buf = wire::tensor_bytes_mut(&mut t);
            let (head, tail) = data.split_at(buf.len());
            buf.copy_from_slice(head);
            data = tail;
            wire::finish_tensor(spec, &mut t).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
            delta.insert(spec.name.clone(), t);
        }
        if record.round != header.round || record.update_digest != delta.digest() {
            return Err(corrupt("the ledger record is not this update's"));
        }
        Ok(Self { model_digest, header, delta, record })
    }

    /// Writes the cache atomically (temp file, fsync, rename, directory fsync), owner-only.
    pub fn save(&self, state_dir: &Path) -> Result<(), OutboxError> {
        let bytes = self.encode()?;
        fsutil::atomic_write(&state_dir.join(RELEASED_UPDATE), &bytes, true)?;
        if fedward_shared::failpoint::ENABLED {
            let digest = fedward_shared::tensor::manifest_digest(&self.header.tensors);
            fedward_shared::failpoint::keep_copy(&format!("{}.bin", digest.to_hex()), &bytes);
        }
        Ok(())
    }

    /// The cached update, `None` when there is none.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, OutboxError> {
        let path = state_dir.join(RELEASED_UPDATE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::decode(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(OutboxError::Read { path: path.display().to_string(), error }),
        }
    }
}

#[cfg(test)]
mod tests {
    use fedward_shared::tensor::Tensor;
    use fedward_shared::wire::{LocalMetrics, PrivacyUsed, RoundId};

    use super::*;

    fn released() -> ReleasedUpdate {
        let mut delta = TensorSet::new();
        delta.insert("classifier.weight", Tensor::new(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0]).unwrap());
        delta.insert("classifier.bias", Tensor::new(vec![2], vec![0.25, -0.5]).unwrap());
        let header = UpdateHeader {
            round: RoundId(4),
            num_examples: 120,
            metrics: Some(LocalMetrics { train_loss: 0.5, ..Default::default() }),
            tensors: delta.specs(),
            privacy: PrivacyUsed::off(),
            encoding: fedward_shared::codec::UpdateEncoding::F32,
        };
        let record = ReleaseRecord::new(
            fedward_shared::wire::SiteId::new("alpha").unwrap(),
            header.round,
            &header.privacy,
            header.num_examples,
            0.0,
            delta.digest(),
            time::OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        ReleasedUpdate { model_digest: Digest([9; 32]), header, delta, record }
    }

    #[test]
    fn round_trips_through_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ReleasedUpdate::load(dir.path()).unwrap(), None);
        let r = released();
        r.save(dir.path()).unwrap();
        let back = ReleasedUpdate::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(back.delta.digest(), r.delta.digest());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(RELEASED_UPDATE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "owner-only: {mode:o}");
        }
    }

    #[test]
    fn corruption_is_detected_not_resent() {
        let bytes = released().encode().unwrap();
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(ReleasedUpdate::decode(&flipped), Err(OutboxError::Corrupt(m)) if m.contains("checksum")));
        // A byte of the header (here the number of examples' encoding) is caught too.
        let header_at = MAGIC.len() + 32 + 4 + serde_json::to_vec(&released().record).unwrap().len() + 6;
        let mut header = bytes.clone();
        header[header_at] ^= 1;
        assert!(matches!(ReleasedUpdate::decode(&header), Err(OutboxError::Corrupt(m)) if m.contains("checksum")));
        assert!(ReleasedUpdate::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(ReleasedUpdate::decode(&bytes[1..]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(ReleasedUpdate::decode(&longer).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { failure_persistence: None, ..Default::default() })]

        /// The cache is read back after a crash, whatever the crash left: arbitrary or
        /// damaged bytes give an error, never a panic.
        #[test]
        fn a_damaged_cache_is_refused_not_trusted(
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..6),
            cut in 0usize..4096,
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let mut bytes = released().encode().unwrap();
            let intact = flips.is_empty() && cut >= bytes.len();
            for (i, b) in flips {
                let n = bytes.len();
                bytes[i % n] = b;
            }
            bytes.truncate(cut);
            if let Ok(back) = ReleasedUpdate::decode(&bytes) {
                // Only an undamaged file (or a flip that changed nothing) decodes, to itself.
                proptest::prop_assert!(intact || back == released());
            }
            let _ = ReleasedUpdate::decode(&noise);
        }
    }
}
