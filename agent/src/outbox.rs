//! The released-update cache: the last update the agent recorded in its ledger, kept in
//! the state directory so a crash between recording and sending ends in a resend of the
//! identical update, never in a second training run that spends the budget again.
//!
//! One file, written atomically ([`fsutil::atomic_write_with`], 0600 from its creation)
//! *before* the ledger append, so whenever the ledger holds a release its update is on
//! disk: a magic line, the 32-byte digest of the global model it was trained from, the
//! ledger record of the release (a u32 little-endian length and its JSON: what a crash may
//! leave cut short in the ledger is completed from it, see `daemon::open_ledger`), the
//! framed `Update` message exactly as it is sent (`shared::wire`), a blake3 digest of
//! everything before it, and then the raw little-endian f32 bytes of each tensor in the
//! header's order. The head's digest covers the header's fields (examples, privacy
//! parameters: resent as they are, so they must be what the ledger recorded) and, through
//! the header's tensor specs, each tensor's digest, which reading checks tensor by tensor:
//! a damaged byte anywhere refuses the file (a property test found that v1, which checked
//! only the tensors, took a flipped header byte). The file is streamed to disk, tensor by
//! tensor from the update itself, so writing it neither copies nor hashes the 91 MB of a
//! 22.7M-parameter update (v4 built the whole file in memory and hashed all of it; the
//! tensors were already hashed once, for the header's specs). The next round's update
//! replaces it.

use std::io::{self, Write};
use std::path::Path;

use fedward_shared::fsutil::{self, FsError};
use fedward_shared::ledger::ReleaseRecord;
use fedward_shared::tensor::{Digest, Tensor, TensorSet};
use fedward_shared::wire::{self, Message, UpdateHeader};

/// The cache's file name in the agent's state directory.
pub const RELEASED_UPDATE: &str = "released-update.bin";
const MAGIC: &[u8] = b"fedward-released-update-v5\n";
/// The blake3 digest of the head (everything before the tensor bytes).
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
    /// The file's bytes (tests and the fault-injection archive; [`Self::save`] streams).
    pub fn encode(&self) -> Result<Vec<u8>, OutboxError> {
        let (head, tensors) = self.parts()?;
        let mut out = Vec::with_capacity(head.len() + self.delta.byte_len());
        write_parts(&mut out, &head, &tensors).map_err(|e| OutboxError::Corrupt(format!("encoding: {e}")))?;
        Ok(out)
    }

    /// The head (everything before the tensor bytes, its digest last) and the tensors in
    /// the header's order, every declared one present.
    fn parts(&self) -> Result<(Vec<u8>, Vec<&Tensor>), OutboxError> {
        let tensors = self
            .header
            .tensors
            .iter()
            .map(|spec| {
                self.delta.get(&spec.name).ok_or_else(|| OutboxError::Corrupt(format!("tensor {} is declared but absent", spec.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let frame = wire::encode(&Message::Update(self.header.clone()))?;
        let record = serde_json::to_vec(&self.record).map_err(|e| OutboxError::Corrupt(format!("ledger record: {e}")))?;
        let len = u32::try_from(record.len()).map_err(|_| OutboxError::Corrupt("ledger record too long".into()))?;
        let mut head = Vec::with_capacity(MAGIC.len() + 32 + 4 + record.len() + frame.len() + CHECKSUM_LEN);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&self.model_digest.0);
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&record);
        head.extend_from_slice(&frame);
        let checksum = blake3::hash(&head);
        head.extend_from_slice(checksum.as_bytes());
        Ok((head, tensors))
    }

    /// Parses and verifies the file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, OutboxError> {
        let corrupt = |m: &str| OutboxError::Corrupt(m.to_owned());
        let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| corrupt("not a released-update file"))?;
        let (digest, rest) = rest.split_at_checked(32).ok_or_else(|| corrupt("truncated model digest"))?;
        let model_digest = Digest(digest.try_into().map_err(|_| corrupt("model digest"))?);
        let (len, rest) = rest.split_at_checked(4).ok_or_else(|| corrupt("truncated ledger record"))?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt("ledger record length"))?) as usize;
        let (record, rest) = rest.split_at_checked(len).ok_or_else(|| corrupt("truncated ledger record"))?;
        // Parsed (bounded, as any peer input) before the digest is checked, to find where
        // the head ends; nothing parsed is used unless the digest matches.
        let (msg, used) = wire::decode(rest)
            .map_err(|e| OutboxError::Corrupt(format!("the head is damaged: {e}")))?
            .ok_or_else(|| corrupt("truncated update header"))?;
        let head_len = bytes.len() - rest.len() + used;
        let (head, rest) = bytes.split_at(head_len);
        let (checksum, mut data) = rest.split_at_checked(CHECKSUM_LEN).ok_or_else(|| corrupt("truncated head checksum"))?;
        if blake3::hash(head).as_bytes() != checksum {
            return Err(corrupt("checksum mismatch: the file is damaged or not a released-update file"));
        }
        let record: ReleaseRecord = serde_json::from_slice(record).map_err(|e| OutboxError::Corrupt(format!("ledger record: {e}")))?;
        let Message::Update(header) = msg else { return Err(corrupt("the header is not an update")) };
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
            // Checks the tensor against its digest in the (checked) header.
            wire::finish_tensor(spec, &mut t).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
            delta.insert(spec.name.clone(), t);
        }
        // Every tensor matched its spec, so the update's digest is the specs' manifest.
        if record.round != header.round || record.update_digest != fedward_shared::tensor::manifest_digest(&header.tensors) {
            return Err(corrupt("the ledger record is not this update's"));
        }
        Ok(Self { model_digest, header, delta, record })
    }

    /// Writes the cache atomically (temp file created owner-only, streamed, fsync, rename,
    /// directory fsync).
    pub fn save(&self, state_dir: &Path) -> Result<(), OutboxError> {
        let (head, tensors) = self.parts()?;
        fsutil::atomic_write_with(&state_dir.join(RELEASED_UPDATE), true, |tmp| write_parts(&mut create_private(tmp)?, &head, &tensors))?;
        if fedward_shared::failpoint::ENABLED {
            let digest = fedward_shared::tensor::manifest_digest(&self.header.tensors);
            fedward_shared::failpoint::keep_copy(&format!("{}.bin", digest.to_hex()), &self.encode()?);
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

/// The head, then each tensor's bytes straight from the update (no copy on little-endian
/// hosts).
fn write_parts(out: &mut impl Write, head: &[u8], tensors: &[&Tensor]) -> io::Result<()> {
    out.write_all(head)?;
    tensors.iter().try_for_each(|t| out.write_all(&t.le_bytes()))
}

/// A new file that no one else may read from its first byte (the update is what the site
/// releases, and the bytes are written before `atomic_write_with` sets the mode).
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use fedward_shared::wire::{LocalMetrics, PrivacyUsed, RoundId};

    use super::*;

    fn released() -> ReleasedUpdate {
        let mut delta = TensorSet::new();
        delta.insert("classifier.weight", Tensor::new(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0]).unwrap());
        delta.insert("classifier.bias", Tensor::new(vec![2], vec![0.25, -0.5]).unwrap());
        let header = UpdateHeader {
            score: None,
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
        // What is streamed to disk is what `encode` gives.
        assert_eq!(std::fs::read(dir.path().join(RELEASED_UPDATE)).unwrap(), r.encode().unwrap());
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
    fn an_update_missing_a_declared_tensor_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = released();
        r.delta = r.delta.subset(["classifier.bias"]).unwrap();
        assert!(matches!(r.save(dir.path()), Err(OutboxError::Corrupt(m)) if m.contains("declared but absent")));
        assert_eq!(ReleasedUpdate::load(dir.path()).unwrap(), None);
    }

    #[test]
    fn corruption_is_detected_not_resent() {
        let bytes = released().encode().unwrap();
        // A tensor byte (the last one) is caught by that tensor's digest in the header.
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(ReleasedUpdate::decode(&flipped), Err(OutboxError::Corrupt(m)) if m.contains("digest")));
        // A byte of the head's own checksum.
        let tensor_bytes = released().delta.byte_len();
        let mut checksum = bytes.clone();
        checksum[bytes.len() - tensor_bytes - 1] ^= 1;
        assert!(matches!(ReleasedUpdate::decode(&checksum), Err(OutboxError::Corrupt(m)) if m.contains("checksum")));
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
