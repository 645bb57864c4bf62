//! The privacy ledger: an append-only, hash-chained log of DP releases, as JSON lines.
//!
//! Each line is one [`Entry`]: `seq` (0, 1, 2, ...), `prev_hash` (the previous entry's
//! `hash`, all zeros for the first), a [`Body`], and `hash` = blake3 over a domain tag and
//! the canonical serialisation of `(seq, prev_hash, body)` (serde_json of the typed
//! values, so the hash covers content, not whitespace). Bodies are:
//!
//! * [`Body::Release`]: written by a site's agent *before* it sends an update: round,
//!   mode, sigma, clip norms, sampling rate, steps, examples, epsilon before and after,
//!   delta, the update's digest and the time.
//! * [`Body::Accepted`]: written by the coordinator per accepted update: the site, the
//!   digest and the privacy parameters the site declared.
//! * [`Body::Seal`]: the coordinator's round-end entry, an ed25519 signature over the
//!   chain head (the seal's own `seq` and `prev_hash` and the round) with the key's id.
//!
//! [`verify`] checks a ledger and names every problem and where it is: an edited entry
//! (hash mismatch), deleted entries (seq gap), an inserted entry (duplicate seq or a
//! broken link), reordered entries, a bad or foreign signature, a truncated final line.
//! A hash chain alone cannot stop someone who rewrites a file and recomputes every hash;
//! seals (for the coordinator's ledger) and [`reconcile`] against the coordinator's
//! ledger (for a site's) are what anchor it.
//!
//! [`audit_releases`] recomputes every release's epsilon from its parameters with
//! [`crate::dp::Accountant`] and flags under-counting; [`reconcile`] matches a site's
//! releases against the updates the coordinator accepted from it.
//!
//! This module is pure: it turns bytes into entries and entries into bytes. The file
//! shell that appends with fsync is [`crate::ledger_file`]. Ledger entries are a
//! persisted schema shared between processes, which is why they derive serde.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::dp::{Accountant, Release};
use crate::plan::PrivacyMode;
use crate::tensor::Digest;
use crate::wire::{PrivacyUsed, RoundId, SiteId, UpdateHeader};

/// Domain tag hashed in front of every entry.
const HASH_TAG: &[u8] = b"fedward-ledger-v1\n";
/// Domain tag signed in front of a seal's message.
const SEAL_TAG: &[u8] = b"fedward-ledger-seal-v1\n";
/// Relative slack before a stored epsilon counts as under-counted: values computed by
/// this crate are bit-identical (libm, same code), so this only absorbs other
/// implementations' last-digit differences.
pub const UNDERCOUNT_TOLERANCE: f64 = 1e-9;

/// A blake3 hash of an entry, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryHash(pub [u8; 32]);

impl EntryHash {
    /// The `prev_hash` of the first entry.
    pub const GENESIS: EntryHash = EntryHash([0; 32]);
}

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryHash({})", hex::encode(&self.0[..6]))
    }
}

impl fmt::Display for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl TryFrom<String> for EntryHash {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bytes = hex::decode(&s).map_err(|e| format!("hash {s:?}: {e}"))?;
        Ok(Self(bytes.try_into().map_err(|_| format!("hash {s:?}: expected 32 bytes"))?))
    }
}

impl From<EntryHash> for String {
    fn from(h: EntryHash) -> Self {
        h.to_string()
    }
}

/// One line of the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub prev_hash: EntryHash,
    pub body: Body,
    pub hash: EntryHash,
}

impl Entry {
    /// The hash this entry's content should have.
    pub fn compute_hash(&self) -> EntryHash {
        hash_of(self.seq, &self.prev_hash, &self.body)
    }

    /// The entry as one JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        let mut line = serde_json::to_vec(self).expect("ledger entries serialise");
        line.push(b'\n');
        line
    }
}

/// What an entry records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Body {
    Release(ReleaseRecord),
    Accepted(AcceptedRecord),
    /// A secure round's sum (coordinator): who was in it. Absent from ledgers written
    /// before it existed, whose secure rounds reconcile as before.
    SecureRound(SecureRoundRecord),
    Seal(SealRecord),
}

impl Body {
    fn validate(&self) -> Result<(), LedgerError> {
        let finite = |name: &'static str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(LedgerError::InvalidBody(format!("{name} is {v}")))
            }
        };
        let not_nan = |name: &'static str, v: f64| {
            if v.is_nan() {
                Err(LedgerError::InvalidBody(format!("{name} is NaN")))
            } else {
                Ok(())
            }
        };
        let time = |t: &str| {
            OffsetDateTime::parse(t, &Rfc3339).map(|_| ()).map_err(|e| LedgerError::InvalidBody(format!("time {t:?} is not RFC 3339: {e}")))
        };
        match self {
            Body::Release(r) => {
                finite("noise multiplier", r.privacy.noise_multiplier)?;
                finite("clip norm", r.privacy.clip_norm)?;
                finite("sampling rate", r.privacy.sampling_rate)?;
                finite("update clip norm", r.privacy.update_clip_norm)?;
                finite("delta", r.privacy.delta)?;
                not_nan("epsilon before", r.epsilon_before)?;
                not_nan("epsilon after", r.privacy.epsilon_after)?;
                time(&r.time)
            }
            Body::Accepted(a) => {
                finite("noise multiplier", a.privacy.noise_multiplier)?;
                finite("clip norm", a.privacy.clip_norm)?;
                finite("sampling rate", a.privacy.sampling_rate)?;
                finite("update clip norm", a.privacy.update_clip_norm)?;
                finite("delta", a.privacy.delta)?;
                not_nan("epsilon after", a.privacy.epsilon_after)?;
                time(&a.time)
            }
            Body::SecureRound(r) => {
                let mut seen = std::collections::BTreeSet::new();
                if let Some(site) = r.summed.iter().chain(&r.dropped).find(|s| !seen.insert(*s)) {
                    return Err(LedgerError::InvalidBody(format!("site {site} is listed twice in a secure round")));
                }
                time(&r.time)
            }
            Body::Seal(s) => time(&s.time),
        }
    }

    /// The body's kind as written in the `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Release(_) => "release",
            Body::Accepted(_) => "accepted",
            Body::SecureRound(_) => "secure-round",
            Body::Seal(_) => "seal",
        }
    }
}

/// The DP parameters of one update, as released by a site or declared to the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    pub mode: PrivacyMode,
    pub noise_multiplier: f64,
    /// Per-example clip (record-level) or update clip (site-level).
    pub clip_norm: f64,
    /// Record-level: Poisson sampling rate.
    pub sampling_rate: f64,
    /// Record-level: noisy steps in the round.
    pub steps: u64,
    /// Record-level: the bound the final update was clipped to.
    pub update_clip_norm: f64,
    /// Cumulative epsilon at `delta` after this release (`"inf"` when unbounded).
    #[serde(with = "finite_or_inf")]
    pub epsilon_after: f64,
    pub delta: f64,
    /// Distributed DP: the noise share the site added and its quantization (absent in
    /// other modes, and in ledgers written before distributed DP, which read as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<crate::dp::DistributedRelease>,
    /// The score of a global model released in the round (federated model selection),
    /// counted in `epsilon_after`. Absent when none was, and in older ledgers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<crate::dp::ScoreRelease>,
}

impl From<PrivacyUsed> for Privacy {
    fn from(p: PrivacyUsed) -> Self {
        Self {
            mode: p.mode,
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip_norm,
            sampling_rate: p.sampling_rate,
            steps: p.steps,
            update_clip_norm: p.update_clip_norm,
            epsilon_after: p.epsilon_after,
            delta: p.delta,
            distributed: p.distributed,
            score: p.score,
        }
    }
}

impl Privacy {
    /// The accountant's view of this release.
    pub fn release(&self) -> Release {
        Release {
            mode: self.mode,
            noise_multiplier: self.noise_multiplier,
            sampling_rate: self.sampling_rate,
            steps: self.steps,
            distributed: self.distributed,
            score: self.score,
        }
    }
}

/// A site's record of one update it released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRecord {
    pub site: SiteId,
    pub round: RoundId,
    pub privacy: Privacy,
    /// Examples behind the update.
    pub examples: u64,
    /// Cumulative epsilon at `privacy.delta` before this release.
    #[serde(with = "finite_or_inf")]
    pub epsilon_before: f64,
    #[serde(with = "digest_hex")]
    pub update_digest: Digest,
    /// RFC 3339, given by the caller.
    pub time: String,
}

impl ReleaseRecord {
    /// The record an agent writes for `update` (its digest is [`TensorSet::digest`], the
    /// same value the coordinator computes from the update header's tensor specs).
    ///
    /// [`TensorSet::digest`]: crate::tensor::TensorSet::digest
    pub fn new(
        site: SiteId,
        round: RoundId,
        used: &PrivacyUsed,
        examples: u64,
        epsilon_before: f64,
        update_digest: Digest,
        now: OffsetDateTime,
    ) -> Result<Self, LedgerError> {
        Ok(Self { site, round, privacy: (*used).into(), examples, epsilon_before, update_digest, time: format_time(now)? })
    }
}

/// The coordinator's record of an update it accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedRecord {
    pub site: SiteId,
    pub round: RoundId,
    /// What the site declared in its update header.
    pub privacy: Privacy,
    pub examples: u64,
    #[serde(with = "digest_hex")]
    pub update_digest: Digest,
    pub time: String,
}

impl AcceptedRecord {
    /// The record for an accepted update: digest over the header's tensor specs
    /// ([`manifest_digest`]), examples and declared privacy from the header.
    ///
    /// [`manifest_digest`]: crate::tensor::manifest_digest
    pub fn from_update(site: SiteId, header: &UpdateHeader, now: OffsetDateTime) -> Result<Self, LedgerError> {
        Ok(Self {
            site,
            round: header.round,
            privacy: header.privacy.into(),
            examples: header.num_examples,
            update_digest: crate::tensor::manifest_digest(&header.tensors),
            time: format_time(now)?,
        })
    }
}

/// The coordinator's record of a completed secure round, appended after its checkpoint
/// and before its seal: whose masked inputs were summed and whose were not. Each
/// summed site also has its `accepted` entry (the masked input's digest and declared
/// privacy, `examples` 0: the coordinator never learns a site's count).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureRoundRecord {
    pub round: RoundId,
    /// The attempt of the round that completed.
    pub attempt: u32,
    /// Sites whose masked inputs are in the sum, in id order.
    pub summed: Vec<SiteId>,
    /// Sites that shared keys (and shares) and whose masked inputs are not in the sum:
    /// they dropped, and their masks were removed.
    pub dropped: Vec<SiteId>,
    /// The summed (clamped) example weights: all the coordinator learns of the counts
    /// (under `weighting = "equal"`, and so under distributed DP, the number of sites).
    pub total_weight: u64,
    pub time: String,
}

/// The coordinator's signature over the chain head at the end of a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealRecord {
    pub round: RoundId,
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// ed25519 over `SEAL_TAG || seq || prev_hash || round` (integers little-endian).
    pub signature: String,
    pub time: String,
}

/// Short public identifier of a verifying key: the first 8 bytes of its blake3, as hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8])
}

/// Formats a time for a ledger body.
pub fn format_time(t: OffsetDateTime) -> Result<String, LedgerError> {
    t.format(&Rfc3339).map_err(|e| LedgerError::InvalidBody(format!("time: {e}")))
}

/// Why an entry could not be added.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("invalid ledger entry: {0}")]
    InvalidBody(String),
    #[error("entry does not extend the ledger: expected seq {expected_seq} after {expected_prev}, got seq {seq} after {prev}")]
    DoesNotExtend { expected_seq: u64, expected_prev: EntryHash, seq: u64, prev: EntryHash },
    #[error("entry {seq} hash does not match its content")]
    BadHash { seq: u64 },
}

/// An in-memory ledger that only grows by entries that extend its head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    entries: Vec<Entry>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a ledger from entries that [`verify`] found clean.
    pub fn from_verified(report: &VerifyReport) -> Option<Self> {
        report.is_clean().then(|| Self { entries: report.entries.clone() })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// `seq` for the next entry.
    pub fn next_seq(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The head hash the next entry links to.
    pub fn head(&self) -> EntryHash {
        self.entries.last().map_or(EntryHash::GENESIS, |e| e.hash)
    }

    /// The entry that would extend the ledger with `body`; nothing changes until [`push`](Self::push).
    ///
    /// The file shell writes and fsyncs this entry, then pushes it.
    pub fn prepare(&self, body: Body) -> Result<Entry, LedgerError> {
        body.validate()?;
        let seq = self.next_seq();
        let prev_hash = self.head();
        let hash = hash_of(seq, &prev_hash, &body);
        Ok(Entry { seq, prev_hash, body, hash })
    }

    /// A seal of the current head for `round`, signed with `key`, ready to push.
    pub fn prepare_seal(&self, round: RoundId, key: &SigningKey, now: OffsetDateTime) -> Result<Entry, LedgerError> {
        let seq = self.next_seq();
        let prev = self.head();
        let signature = key.sign(&seal_message(seq, &prev, round));
        self.prepare(Body::Seal(SealRecord {
            round,
            key_id: key_id(&key.verifying_key()),
            signature: hex::encode(signature.to_bytes()),
            time: format_time(now)?,
        }))
    }

    /// Adds an entry that extends the head.
    pub fn push(&mut self, entry: Entry) -> Result<(), LedgerError> {
        self.check_next(&entry)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Whether `entry` would be accepted by [`push`](Self::push), without adding it.
    pub fn check_next(&self, entry: &Entry) -> Result<(), LedgerError> {
        if entry.seq != self.next_seq() || entry.prev_hash != self.head() {
            return Err(LedgerError::DoesNotExtend {
                expected_seq: self.next_seq(),
                expected_prev: self.head(),
                seq: entry.seq,
                prev: entry.prev_hash,
            });
        }
        if entry.compute_hash() != entry.hash {
            return Err(LedgerError::BadHash { seq: entry.seq });
        }
        entry.body.validate()
    }

    /// [`prepare`](Self::prepare) then [`push`](Self::push).
    pub fn append(&mut self, body: Body) -> Result<&Entry, LedgerError> {
        let entry = self.prepare(body)?;
        self.push(entry)?;
        Ok(&self.entries[self.entries.len() - 1])
    }

    /// The whole ledger as JSON lines.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(Entry::to_line).collect()
    }

    /// The accountant state of this (site) ledger's releases, for the agent's next budget
    /// check. Stops at the first release the accountant rejects.
    pub fn accountant(&self) -> Result<Accountant, crate::dp::DpError> {
        let mut acc = Accountant::new();
        for e in &self.entries {
            if let Body::Release(r) = &e.body {
                acc.record(&r.privacy.release())?;
            }
        }
        Ok(acc)
    }
}

/// One problem [`verify`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// 1-based line in the file (entry index + 1 when verifying entries).
    pub line: usize,
    pub seq: Option<u64>,
    pub kind: ProblemKind,
}

/// What is wrong, and what that means.
#[derive(Clone, Debug, PartialEq)]
pub enum ProblemKind {
    /// The line is not a ledger entry.
    Malformed(String),
    /// The file ends in an incomplete line (a write cut short).
    TruncatedFinalLine,
    /// The content does not match the stored hash: the entry was edited.
    Edited { stored: EntryHash, computed: EntryHash },
    /// Entries with these seqs (inclusive) are missing: deleted.
    Deleted { from_seq: u64, to_seq: u64 },
    /// A second entry with the same seq that does not fit the chain: inserted.
    Inserted,
    /// This entry comes after one with a higher seq: entries were reordered.
    Reordered { after_seq: u64 },
    /// `prev_hash` is not the hash of entry `seq - 1`: an entry before it was replaced,
    /// or this one was inserted.
    ChainBroken { expected: EntryHash, found: EntryHash },
    /// A seal whose signature does not verify under the trusted key.
    BadSignature,
    /// A seal by a key other than the trusted one.
    UnknownKey { key_id: String },
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed entry: {e}"),
            Self::TruncatedFinalLine => f.write_str("truncated final line"),
            Self::Edited { stored, computed } => {
                write!(f, "edited: stored hash {stored} but content hashes to {computed}")
            }
            Self::Deleted { from_seq, to_seq } if from_seq == to_seq => write!(f, "entry {from_seq} deleted"),
            Self::Deleted { from_seq, to_seq } => write!(f, "entries {from_seq}..={to_seq} deleted"),
            Self::Inserted => f.write_str("inserted: duplicate seq that does not fit the chain"),
            Self::Reordered { after_seq } => write!(f, "reordered: appears after entry {after_seq}"),
            Self::ChainBroken { expected, found } => {
                write!(f, "chain broken: prev_hash {found} but entry seq-1 hashes to {expected}")
            }
            Self::BadSignature => f.write_str("seal signature does not verify"),
            Self::UnknownKey { key_id } => write!(f, "seal signed by unknown key {key_id}"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "line {} (seq {seq}): {}", self.line, self.kind),
            None => write!(f, "line {}: {}", self.line, self.kind),
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    /// Every entry that parsed, in file order.
    pub entries: Vec<Entry>,
    pub problems: Vec<Problem>,
    /// Seals whose signature verified under the trusted key.
    pub seals_verified: usize,
    /// Seals not checked because no trusted key was given.
    pub seals_unchecked: usize,
    /// Entries after the last seal (all of them when there is none).
    pub unsealed_tail: usize,
}

impl VerifyReport {
    /// No problem at all.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Parses and checks a ledger file's bytes. `trusted` is the key seals must verify under;
/// without it seals are counted as unchecked.
pub fn verify(bytes: &[u8], trusted: Option<&VerifyingKey>) -> VerifyReport {
    let mut entries = Vec::new();
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    let mut rest = bytes;
    let mut line_no = 0;
    while !rest.is_empty() {
        line_no += 1;
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let l = &rest[..i];
                rest = &rest[i + 1..];
                (l, true)
            }
            None => {
                let l = rest;
                rest = &[];
                (l, false)
            }
        };
        if !complete {
            problems.push(Problem { line: line_no, seq: None, kind: ProblemKind::TruncatedFinalLine });
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            problems.push(Problem { line: line_no, seq: None, kind: ProblemKind::Malformed("empty line".into()) });
            continue;
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(e) => {
                entries.push(e);
                lines.push(line_no);
            }
            Err(err) => problems.push(Problem { line: line_no, seq: None, kind: ProblemKind::Malformed(err.to_string()) }),
        }
    }
    let mut report = check(entries, &lines, trusted);
    problems.append(&mut report.problems);
    problems.sort_by_key(|p| p.line);
    report.problems = problems;
    report
}

/// Checks entries already in memory (line numbers are positions + 1).
pub fn verify_entries(entries: &[Entry], trusted: Option<&VerifyingKey>) -> VerifyReport {
    let lines: Vec<usize> = (1..=entries.len()).collect();
    check(entries.to_vec(), &lines, trusted)
}

fn check(entries: Vec<Entry>, lines: &[usize], trusted: Option<&VerifyingKey>) -> VerifyReport {
    let mut problems = Vec::new();
    let problem = |i: usize, kind: ProblemKind| Problem { line: lines[i], seq: Some(entries[i].seq), kind };

    // 1. Content: each entry's hash, and its body's own validity.
    for (i, e) in entries.iter().enumerate() {
        let computed = e.compute_hash();
        if computed != e.hash {
            problems.push(problem(i, ProblemKind::Edited { stored: e.hash, computed }));
        } else if let Err(err) = e.body.validate() {
            problems.push(problem(i, ProblemKind::Malformed(err.to_string())));
        }
    }

    // 2. Seqs: duplicates (inserted), gaps (deleted), descents in file order (reordered).
    let mut by_seq: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_seq.entry(e.seq).or_default().push(i);
    }
    let fits_chain = |i: usize| {
        let e = &entries[i];
        let after_ok = match by_seq.get(&(e.seq + 1)) {
            Some(next) => next.iter().any(|&j| entries[j].prev_hash == e.hash),
            None => true,
        };
        let before_ok = if e.seq == 0 {
            e.prev_hash == EntryHash::GENESIS
        } else {
            by_seq.get(&(e.seq - 1)).is_none_or(|prev| prev.iter().any(|&j| entries[j].hash == e.prev_hash))
        };
        after_ok && before_ok && e.compute_hash() == e.hash
    };
    for idxs in by_seq.values().filter(|v| v.len() > 1) {
        let fitting: Vec<usize> = idxs.iter().copied().filter(|&i| fits_chain(i)).collect();
        for &i in idxs {
            // Name the ones that do not fit; if none or all fit, every copy is suspect.
            if fitting.len() != 1 || fitting[0] != i {
                problems.push(problem(i, ProblemKind::Inserted));
            }
        }
    }
    let mut expected = 0u64;
    for (&seq, idxs) in &by_seq {
        if seq > expected {
            let i = idxs[0];
            problems.push(problem(i, ProblemKind::Deleted { from_seq: expected, to_seq: seq - 1 }));
        }
        expected = seq + 1;
    }
    let mut max_seen: Option<u64> = None;
    for (i, e) in entries.iter().enumerate() {
        if let Some(m) = max_seen {
            if e.seq < m && by_seq[&e.seq].len() == 1 {
                problems.push(problem(i, ProblemKind::Reordered { after_seq: m }));
            }
        }
        max_seen = Some(max_seen.map_or(e.seq, |m| m.max(e.seq)));
    }

    // 3. Links by seq, where both ends are unique.
    for (&seq, idxs) in &by_seq {
        if idxs.len() != 1 {
            continue;
        }
        let i = idxs[0];
        let expected = if seq == 0 {
            Some(EntryHash::GENESIS)
        } else {
            match by_seq.get(&(seq - 1)) {
                Some(prev) if prev.len() == 1 => Some(entries[prev[0]].hash),
                _ => None,
            }
        };
        if let Some(expected) = expected {
            if entries[i].prev_hash != expected {
                problems.push(problem(i, ProblemKind::ChainBroken { expected, found: entries[i].prev_hash }));
            }
        }
    }

    // 4. Seals.
    let (mut seals_verified, mut seals_unchecked) = (0, 0);
    let mut last_seal: Option<usize> = None;
    for (i, e) in entries.iter().enumerate() {
        let Body::Seal(s) = &e.body else { continue };
        last_seal = Some(i);
        let Some(key) = trusted else {
            seals_unchecked += 1;
            continue;
        };
        if s.key_id != key_id(key) {
            problems.push(problem(i, ProblemKind::UnknownKey { key_id: s.key_id.clone() }));
            continue;
        }
        let sig = hex::decode(&s.signature).ok().and_then(|b| Signature::from_slice(&b).ok());
        let ok = sig.is_some_and(|sig| key.verify(&seal_message(e.seq, &e.prev_hash, s.round), &sig).is_ok());
        if ok {
            seals_verified += 1;
        } else {
            problems.push(problem(i, ProblemKind::BadSignature));
        }
    }
    let unsealed_tail = entries.len() - last_seal.map_or(0, |i| i + 1);

    problems.sort_by_key(|p| p.line);
    VerifyReport { entries, problems, seals_verified, seals_unchecked, unsealed_tail }
}

/// One finding of [`audit_releases`].
#[derive(Clone, Debug, PartialEq)]
pub struct AuditFinding {
    pub seq: u64,
    pub round: RoundId,
    pub kind: AuditKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AuditKind {
    /// The stored cumulative epsilon is below what the parameters imply.
    UnderCounted { stored: f64, recomputed: f64 },
    /// `epsilon_before` differs from the previous release's `epsilon_after`.
    BeforeMismatch { stored_before: f64, previous_after: f64 },
    /// The parameters cannot be accounted (invalid values, a mode change).
    Unaccountable(String),
}

impl fmt::Display for AuditFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {} (round {}): ", self.seq, self.round)?;
        match &self.kind {
            AuditKind::UnderCounted { stored, recomputed } => {
                write!(f, "epsilon under-counted: stored {stored}, recomputed {recomputed}")
            }
            AuditKind::BeforeMismatch { stored_before, previous_after } => {
                write!(f, "epsilon before {stored_before} does not match the previous epsilon after {previous_after}")
            }
            AuditKind::Unaccountable(e) => write!(f, "cannot account: {e}"),
        }
    }
}

/// The result of [`audit_releases`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditReport {
    pub findings: Vec<AuditFinding>,
    /// Releases replayed.
    pub releases: usize,
    /// The recomputed cumulative epsilon after the last release, at its delta.
    pub final_epsilon: Option<(f64, f64)>,
}

/// Replays a site ledger's releases (in seq order) through a fresh [`Accountant`],
/// recomputing each cumulative epsilon at the release's delta, and flags stored values
/// below the recomputed ones and `epsilon_before` values that break the sequence.
pub fn audit_releases(entries: &[Entry]) -> AuditReport {
    let mut releases: Vec<(&Entry, &ReleaseRecord)> = entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::Release(r) => Some((e, r)),
            _ => None,
        })
        .collect();
    releases.sort_by_key(|(e, _)| e.seq);
    let mut report = AuditReport { releases: releases.len(), ..Default::default() };
    let mut acc = Accountant::new();
    let mut previous_after = 0.0;
    for (e, r) in releases {
        let finding = |kind| AuditFinding { seq: e.seq, round: r.round, kind };
        if r.epsilon_before != previous_after {
            report.findings.push(finding(AuditKind::BeforeMismatch { stored_before: r.epsilon_before, previous_after }));
        }
        previous_after = r.privacy.epsilon_after;
        let recomputed = recompute(&mut acc, &r.privacy);
        match recomputed {
            Ok(eps) => {
                if is_under(r.privacy.epsilon_after, eps) {
                    report.findings.push(finding(AuditKind::UnderCounted { stored: r.privacy.epsilon_after, recomputed: eps }));
                }
                report.final_epsilon = Some((eps, r.privacy.delta));
            }
            Err(err) => report.findings.push(finding(AuditKind::Unaccountable(err.to_string()))),
        }
    }
    report
}

/// The same recompute for the updates a coordinator accepted from `site`: the declared
/// cumulative epsilon must not be below what the declared parameters imply.
pub fn audit_accepted(entries: &[Entry], site: &SiteId) -> AuditReport {
    let mut accepted: Vec<(&Entry, &AcceptedRecord)> = entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::Accepted(a) if &a.site == site => Some((e, a)),
            _ => None,
        })
        .collect();
    accepted.sort_by_key(|(e, _)| e.seq);
    let mut report = AuditReport { releases: accepted.len(), ..Default::default() };
    let mut acc = Accountant::new();
    for (e, a) in accepted {
        let finding = |kind| AuditFinding { seq: e.seq, round: a.round, kind };
        match recompute(&mut acc, &a.privacy) {
            Ok(eps) => {
                if is_under(a.privacy.epsilon_after, eps) {
                    report.findings.push(finding(AuditKind::UnderCounted { stored: a.privacy.epsilon_after, recomputed: eps }));
                }
                report.final_epsilon = Some((eps, a.privacy.delta));
            }
            Err(err) => report.findings.push(finding(AuditKind::Unaccountable(err.to_string()))),
        }
    }
    report
}

/// Records `p` and returns the cumulative epsilon at its delta. A release without DP
/// (mode `off`, which declares no delta) makes it unbounded at any delta.
fn recompute(acc: &mut Accountant, p: &Privacy) -> Result<f64, crate::dp::DpError> {
    acc.record(&p.release())?;
    if p.mode == PrivacyMode::Off {
        return Ok(f64::INFINITY);
    }
    acc.epsilon(p.delta)
}

fn is_under(stored: f64, recomputed: f64) -> bool {
    // NaN stored is under-counting too: it claims nothing.
    let floor = recomputed * (1.0 - UNDERCOUNT_TOLERANCE);
    matches!(stored.partial_cmp(&floor), Some(std::cmp::Ordering::Less) | None)
}

/// One disagreement between a site's ledger and the coordinator's.
#[derive(Clone, Debug, PartialEq)]
pub enum Mismatch {
    /// The coordinator accepted an update the site has no release for.
    NoReleaseAtSite { round: RoundId, digest: Digest },
    /// The site released an update the coordinator did not record as accepted (it may have
    /// been rejected or late; it still counts against the site's budget).
    NotAccepted { round: RoundId, digest: Digest },
    /// Both sides have the round, with different update digests.
    DigestMismatch { round: RoundId, site: Digest, coordinator: Digest },
    /// Same round and digest, different parameters.
    ParameterMismatch { round: RoundId, field: &'static str, site: String, coordinator: String },
    /// One side has several entries for the round.
    DuplicateRound { round: RoundId, side: &'static str },
    /// Secure round: the site released a masked input that the coordinator's record of
    /// the round does not list as summed (it dropped, or it was left out; it still counts
    /// against the site's budget).
    NotSummed { round: RoundId, digest: Digest },
    /// Secure round: the coordinator lists the site as summed without an accepted masked
    /// input from it.
    SummedWithoutInput { round: RoundId },
    /// Distributed DP: fewer sites were summed than the honest sites the site's noise
    /// share assumed, so the recorded epsilon does not hold.
    TooFewSummed { round: RoundId, summed: u64, min_honest: u64 },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoReleaseAtSite { round, digest } => {
                write!(f, "round {round}: coordinator accepted update {} the site never released", digest.short())
            }
            Self::NotAccepted { round, digest } => {
                write!(f, "round {round}: site released update {} the coordinator did not accept", digest.short())
            }
            Self::DigestMismatch { round, site, coordinator } => {
                write!(f, "round {round}: site released {} but coordinator accepted {}", site.short(), coordinator.short())
            }
            Self::ParameterMismatch { round, field, site, coordinator } => {
                write!(f, "round {round}: {field} is {site} at the site but {coordinator} at the coordinator")
            }
            Self::DuplicateRound { round, side } => write!(f, "round {round}: several {side} entries"),
            Self::NotSummed { round, digest } => {
                write!(f, "round {round}: site released masked input {} the coordinator did not sum", digest.short())
            }
            Self::SummedWithoutInput { round } => {
                write!(f, "round {round}: the coordinator records the site as summed without accepting its masked input")
            }
            Self::TooFewSummed { round, summed, min_honest } => {
                write!(f, "round {round}: {summed} sites summed, below the {min_honest} honest sites the noise share assumed")
            }
        }
    }
}

/// What [`reconcile`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReconcileReport {
    /// Rounds where both sides agree on digest and parameters.
    pub matched: usize,
    pub mismatches: Vec<Mismatch>,
}

/// Matches `site`'s releases against the updates the coordinator accepted from it, by
/// round and digest, then compares the declared parameters field by field.
///
/// A round the coordinator records as secure ([`SecureRoundRecord`]) is matched against
/// that record too: the site's masked input must be listed as summed (else
/// [`Mismatch::NotSummed`]), the coordinator cannot hold the site's example count (it is
/// inside the sum, so `examples` is not compared), and under distributed DP at least the
/// `min_honest` sites the site's noise share assumed must have been summed. The last
/// record of a round counts (a round is completed once).
pub fn reconcile(site: &SiteId, site_entries: &[Entry], coordinator_entries: &[Entry]) -> ReconcileReport {
    let mut secure: BTreeMap<RoundId, &SecureRoundRecord> = BTreeMap::new();
    for e in coordinator_entries {
        if let Body::SecureRound(r) = &e.body {
            secure.insert(r.round, r);
        }
    }
    let mut releases: BTreeMap<RoundId, Vec<&ReleaseRecord>> = BTreeMap::new();
    for e in site_entries {
        if let Body::Release(r) = &e.body {
            if &r.site == site {
                releases.entry(r.round).or_default().push(r);
            }
        }
    }
    let mut accepted: BTreeMap<RoundId, Vec<&AcceptedRecord>> = BTreeMap::new();
    for e in coordinator_entries {
        if let Body::Accepted(a) = &e.body {
            if &a.site == site {
                accepted.entry(a.round).or_default().push(a);
            }
        }
    }
    let mut report = ReconcileReport::default();
    let rounds: std::collections::BTreeSet<RoundId> = releases.keys().chain(accepted.keys()).copied().collect();
    for round in rounds {
        let r = releases.get(&round).map(Vec::as_slice).unwrap_or_default();
        let a = accepted.get(&round).map(Vec::as_slice).unwrap_or_default();
        if r.len() > 1 {
            report.mismatches.push(Mismatch::DuplicateRound { round, side: "site release" });
        }
        if a.len() > 1 {
            report.mismatches.push(Mismatch::DuplicateRound { round, side: "coordinator accepted" });
        }
        let unique = r.len() == 1 && a.len() == 1;
        let sum = secure.get(&round).copied();
        let summed = sum.is_some_and(|s| s.summed.contains(site));
        if summed && a.is_empty() {
            report.mismatches.push(Mismatch::SummedWithoutInput { round });
        }
        match (r.first(), a.first()) {
            (Some(r), Some(a)) if r.update_digest == a.update_digest => {
                let before = report.mismatches.len();
                compare_params(round, r, a, sum.is_none(), &mut report.mismatches);
                if let Some(sum) = sum {
                    if !summed {
                        report.mismatches.push(Mismatch::NotSummed { round, digest: r.update_digest });
                    }
                    if let Some(d) = r.privacy.distributed {
                        let n = sum.summed.len() as u64;
                        if n < d.min_honest {
                            report.mismatches.push(Mismatch::TooFewSummed { round, summed: n, min_honest: d.min_honest });
                        }
                    }
                }
                if report.mismatches.len() == before && unique {
                    report.matched += 1;
                }
            }
            (Some(r), Some(a)) => {
                report.mismatches.push(Mismatch::DigestMismatch { round, site: r.update_digest, coordinator: a.update_digest })
            }
            (Some(r), None) => report.mismatches.push(Mismatch::NotAccepted { round, digest: r.update_digest }),
            (None, Some(a)) => report.mismatches.push(Mismatch::NoReleaseAtSite { round, digest: a.update_digest }),
            (None, None) => {}
        }
    }
    report
}

/// Compares what both sides recorded; `examples` only where the coordinator saw the count
/// (not in a secure round, where it is inside the sum).
fn compare_params(round: RoundId, r: &ReleaseRecord, a: &AcceptedRecord, examples: bool, out: &mut Vec<Mismatch>) {
    let mut field = |name: &'static str, site: String, coordinator: String| {
        if site != coordinator {
            out.push(Mismatch::ParameterMismatch { round, field: name, site, coordinator });
        }
    };
    let (s, c) = (&r.privacy, &a.privacy);
    field("mode", s.mode.to_string(), c.mode.to_string());
    field("noise multiplier", s.noise_multiplier.to_string(), c.noise_multiplier.to_string());
    field("clip norm", s.clip_norm.to_string(), c.clip_norm.to_string());
    field("sampling rate", s.sampling_rate.to_string(), c.sampling_rate.to_string());
    field("steps", s.steps.to_string(), c.steps.to_string());
    field("update clip norm", s.update_clip_norm.to_string(), c.update_clip_norm.to_string());
    field("epsilon after", s.epsilon_after.to_string(), c.epsilon_after.to_string());
    field("delta", s.delta.to_string(), c.delta.to_string());
    field("distributed noise share", format!("{:?}", s.distributed), format!("{:?}", c.distributed));
    field("score release", format!("{:?}", s.score), format!("{:?}", c.score));
    if examples {
        field("examples", r.examples.to_string(), a.examples.to_string());
    }
}

fn hash_of(seq: u64, prev_hash: &EntryHash, body: &Body) -> EntryHash {
    #[derive(Serialize)]
    struct Canonical<'a> {
        seq: u64,
        prev_hash: &'a EntryHash,
        body: &'a Body,
    }
    let mut h = blake3::Hasher::new();
    h.update(HASH_TAG);
    // Serialising plain data with string keys cannot fail.
    let bytes = serde_json::to_vec(&Canonical { seq, prev_hash, body }).expect("ledger entries serialise");
    h.update(&bytes);
    EntryHash(*h.finalize().as_bytes())
}

fn seal_message(seq: u64, prev: &EntryHash, round: RoundId) -> Vec<u8> {
    let mut m = Vec::with_capacity(SEAL_TAG.len() + 48);
    m.extend_from_slice(SEAL_TAG);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(&prev.0);
    m.extend_from_slice(&round.0.to_le_bytes());
    m
}

/// Epsilons as JSON numbers, infinity as the string `"inf"` (JSON has no infinity).
mod finite_or_inf {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if *v == f64::INFINITY {
            "inf".serialize(s)
        } else {
            v.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(f64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(v) => Ok(v),
            Repr::Str(s) if s == "inf" => Ok(f64::INFINITY),
            Repr::Str(s) => Err(serde::de::Error::custom(format!("expected a number or \"inf\", got {s:?}"))),
        }
    }
}

/// Digests as 64 hex digits.
mod digest_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::tensor::Digest;

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid digest {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2025-03-01 12:00:00 UTC);

    fn site() -> SiteId {
        SiteId::new("st-olav").unwrap()
    }

    fn digest(round: u64) -> Digest {
        Digest(*blake3::hash(&round.to_le_bytes()).as_bytes())
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    /// A site ledger of `n` honest record-level releases.
    fn site_ledger(n: u64) -> Ledger {
        let mut ledger = Ledger::new();
        let mut acc = Accountant::new();
        let delta = 1e-5;
        for round in 1..=n {
            let release = Release::record_level(1.1, 0.01, 200);
            let before = acc.epsilon(delta).unwrap();
            acc.record(&release).unwrap();
            let after = acc.epsilon(delta).unwrap();
            ledger
                .append(Body::Release(ReleaseRecord {
                    site: site(),
                    round: RoundId(round),
                    privacy: Privacy {
                        score: None,
                        mode: PrivacyMode::RecordLevel,
                        noise_multiplier: 1.1,
                        clip_norm: 1.0,
                        sampling_rate: 0.01,
                        steps: 200,
                        update_clip_norm: 5.0,
                        epsilon_after: after,
                        delta,
                        distributed: None,
                    },
                    examples: 12_000,
                    epsilon_before: before,
                    update_digest: digest(round),
                    time: format_time(T0 + time::Duration::hours(round as i64)).unwrap(),
                }))
                .unwrap();
        }
        ledger
    }

    /// The coordinator's view of the same site, sealed after every round.
    fn coordinator_ledger(site_ledger: &Ledger) -> Ledger {
        let mut ledger = Ledger::new();
        for e in site_ledger.entries() {
            let Body::Release(r) = &e.body else { continue };
            ledger
                .append(Body::Accepted(AcceptedRecord {
                    site: r.site.clone(),
                    round: r.round,
                    privacy: r.privacy,
                    examples: r.examples,
                    update_digest: r.update_digest,
                    time: r.time.clone(),
                }))
                .unwrap();
            let seal = ledger.prepare_seal(r.round, &key(), T0).unwrap();
            ledger.push(seal).unwrap();
        }
        ledger
    }

    fn kinds(report: &VerifyReport) -> Vec<(Option<u64>, ProblemKind)> {
        report.problems.iter().map(|p| (p.seq, p.kind.clone())).collect()
    }

    /// Rewrites line `i` with `f` applied to the parsed entry, recomputing nothing.
    fn edit_line(bytes: &[u8], i: usize, f: impl FnOnce(&mut Entry)) -> Vec<u8> {
        let mut lines: Vec<Vec<u8>> = bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        let mut e: Entry = serde_json::from_slice(&lines[i]).unwrap();
        f(&mut e);
        lines[i] = e.to_line();
        lines.concat()
    }

    fn lines_of(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn clean_ledgers_verify_and_round_trip() {
        let site_l = site_ledger(4);
        let report = verify(&site_l.to_bytes(), None);
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(Ledger::from_verified(&report).unwrap(), site_l);
        let coord = coordinator_ledger(&site_l);
        let vk = key().verifying_key();
        let report = verify(&coord.to_bytes(), Some(&vk));
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(report.seals_verified, 4);
        assert_eq!(report.unsealed_tail, 0);
        let unchecked = verify(&coord.to_bytes(), None);
        assert_eq!(unchecked.seals_unchecked, 4);
        // The hash covers content, not formatting.
        let pretty: Vec<u8> = site_l
            .entries()
            .iter()
            .flat_map(|e| {
                let mut l = serde_json::to_vec(&serde_json::to_value(e).unwrap()).unwrap();
                l.push(b'\n');
                l
            })
            .collect();
        assert!(verify(&pretty, None).is_clean());
    }

    #[test]
    fn detects_an_edited_field() {
        let bytes = site_ledger(4).to_bytes();
        let edited = edit_line(&bytes, 2, |e| {
            if let Body::Release(r) = &mut e.body {
                r.privacy.noise_multiplier = 2.0;
            }
        });
        let report = verify(&edited, None);
        assert!(matches!(kinds(&report)[..], [(Some(2), ProblemKind::Edited { .. })]), "{:?}", report.problems);
        assert_eq!(report.problems[0].line, 3);
        // Editing and recomputing that hash moves the break to the next link.
        let rehashed = edit_line(&bytes, 2, |e| {
            if let Body::Release(r) = &mut e.body {
                r.privacy.noise_multiplier = 2.0;
            }
            e.hash = e.compute_hash();
        });
        let report = verify(&rehashed, None);
        assert!(matches!(kinds(&report)[..], [(Some(3), ProblemKind::ChainBroken { .. })]), "{:?}", report.problems);
    }

    #[test]
    fn detects_a_deleted_entry() {
        let mut lines = lines_of(&site_ledger(5).to_bytes());
        lines.remove(2);
        let report = verify(&lines.concat(), None);
        let k = kinds(&report);
        assert!(k.contains(&(Some(3), ProblemKind::Deleted { from_seq: 2, to_seq: 2 })), "{k:?}");
        assert!(k.iter().all(|(_, p)| matches!(p, ProblemKind::Deleted { .. })), "{k:?}");
    }

    #[test]
    fn detects_an_inserted_entry() {
        let ledger = site_ledger(4);
        // A forged entry that links to entry 1 and carries seq 2, with a valid own hash.
        let mut forged = ledger.entries()[2].clone();
        if let Body::Release(r) = &mut forged.body {
            r.privacy.epsilon_after *= 0.5;
        }
        forged.hash = forged.compute_hash();
        let mut lines = lines_of(&ledger.to_bytes());
        lines.insert(2, forged.to_line());
        let report = verify(&lines.concat(), None);
        let k = kinds(&report);
        assert_eq!(k, vec![(Some(2), ProblemKind::Inserted)], "{:?}", report.problems);
        assert_eq!(report.problems[0].line, 3, "the forged line is named");
    }

    #[test]
    fn detects_swapped_entries() {
        let mut lines = lines_of(&site_ledger(5).to_bytes());
        lines.swap(1, 3);
        let report = verify(&lines.concat(), None);
        let k = kinds(&report);
        assert!(k.iter().any(|(seq, p)| matches!(p, ProblemKind::Reordered { .. }) && seq.is_some()), "{k:?}");
        assert!(k.iter().all(|(_, p)| matches!(p, ProblemKind::Reordered { .. })), "content intact: {k:?}");
    }

    #[test]
    fn detects_a_truncated_final_line() {
        let bytes = site_ledger(3).to_bytes();
        let cut = &bytes[..bytes.len() - 17];
        let report = verify(cut, None);
        assert_eq!(kinds(&report), vec![(None, ProblemKind::TruncatedFinalLine)]);
        assert_eq!(report.problems[0].line, 3);
        assert_eq!(report.entries.len(), 2);
        // Even a complete JSON object without its newline is a cut-short write.
        let report = verify(&bytes[..bytes.len() - 1], None);
        assert_eq!(kinds(&report), vec![(None, ProblemKind::TruncatedFinalLine)]);
    }

    #[test]
    fn detects_forged_and_foreign_signatures() {
        let coord = coordinator_ledger(&site_ledger(2));
        let vk = key().verifying_key();
        // Rewrite an accepted entry and recompute every hash after it: the chain is
        // self-consistent, but the seal no longer verifies.
        let mut entries = coord.entries().to_vec();
        if let Body::Accepted(a) = &mut entries[0].body {
            a.privacy.noise_multiplier = 9.0;
        }
        let mut prev = EntryHash::GENESIS;
        for e in &mut entries {
            e.prev_hash = prev;
            e.hash = e.compute_hash();
            prev = e.hash;
        }
        let report = verify_entries(&entries, Some(&vk));
        assert_eq!(kinds(&report), vec![(Some(1), ProblemKind::BadSignature), (Some(3), ProblemKind::BadSignature)]);
        // A seal signed by another key.
        let mut other = Ledger::new();
        let seal = other.prepare_seal(RoundId(1), &SigningKey::from_bytes(&[9u8; 32]), T0).unwrap();
        other.push(seal).unwrap();
        let report = verify(&other.to_bytes(), Some(&vk));
        assert!(matches!(kinds(&report)[..], [(Some(0), ProblemKind::UnknownKey { .. })]));
        // A garbled signature with a fixed-up hash.
        let mut entries = coord.entries().to_vec();
        if let Body::Seal(s) = &mut entries[1].body {
            s.signature = "00".repeat(64);
        }
        entries[1].hash = entries[1].compute_hash();
        entries[2].prev_hash = entries[1].hash;
        entries[2].hash = entries[2].compute_hash();
        entries[3].prev_hash = entries[2].hash;
        entries[3].hash = entries[3].compute_hash();
        let report = verify_entries(&entries, Some(&vk));
        assert_eq!(kinds(&report), vec![(Some(1), ProblemKind::BadSignature), (Some(3), ProblemKind::BadSignature)]);
    }

    #[test]
    fn rejects_malformed_lines_and_unknown_fields() {
        let mut bytes = site_ledger(1).to_bytes();
        bytes.extend_from_slice(b"{\"seq\": 1}\n");
        let line = String::from_utf8(lines_of(&site_ledger(1).to_bytes())[0].clone()).unwrap();
        let extra = line.replacen("\"seq\":0", "\"seq\":0,\"note\":\"hi\"", 1);
        bytes.extend_from_slice(extra.as_bytes());
        let in_body = line.replacen("\"examples\":", "\"note\":1,\"examples\":", 1);
        assert_ne!(in_body, line);
        bytes.extend_from_slice(in_body.as_bytes());
        let report = verify(&bytes, None);
        let malformed: Vec<usize> =
            report.problems.iter().filter(|p| matches!(p.kind, ProblemKind::Malformed(_))).map(|p| p.line).collect();
        assert_eq!(malformed, vec![2, 3, 4], "{:?}", report.problems);
    }

    #[test]
    fn ledger_refuses_entries_that_do_not_extend_it() {
        let mut ledger = site_ledger(2);
        let stale = ledger.entries()[1].clone();
        assert!(matches!(ledger.push(stale), Err(LedgerError::DoesNotExtend { .. })));
        let mut bad = ledger.prepare(ledger.entries()[0].body.clone()).unwrap();
        bad.hash = EntryHash([1; 32]);
        assert!(matches!(ledger.push(bad), Err(LedgerError::BadHash { .. })));
        let mut nan = ledger.entries()[0].body.clone();
        if let Body::Release(r) = &mut nan {
            r.privacy.noise_multiplier = f64::NAN;
        }
        assert!(ledger.prepare(nan).is_err());
        let mut bad_time = ledger.entries()[0].body.clone();
        if let Body::Release(r) = &mut bad_time {
            r.time = "yesterday".into();
        }
        assert!(ledger.prepare(bad_time).is_err());
    }

    /// The agent's digest of its update and the coordinator's digest of the header agree,
    /// so reconcile matches them.
    #[test]
    fn constructors_agree_on_the_digest() {
        use crate::tensor::{Tensor, TensorSet};

        let mut update = TensorSet::new();
        update.insert("classifier.weight", Tensor::new(vec![2, 2], vec![0.1, 0.2, 0.3, 0.4]).unwrap());
        update.insert("classifier.bias", Tensor::new(vec![2], vec![0.0, -0.5]).unwrap());
        let used = PrivacyUsed {
            score: None,
            mode: PrivacyMode::SiteLevel,
            noise_multiplier: 1.5,
            clip_norm: 1.0,
            sampling_rate: 0.0,
            steps: 1,
            update_clip_norm: 1.0,
            epsilon_after: 0.9,
            delta: 1e-5,
            distributed: None,
        };
        let header = UpdateHeader {
            score: None,
            round: RoundId(3),
            num_examples: 500,
            metrics: None,
            tensors: update.specs(),
            privacy: used,
            encoding: crate::codec::UpdateEncoding::F32,
        };
        let mut site_l = Ledger::new();
        let release = ReleaseRecord::new(site(), RoundId(3), &used, 500, 0.0, update.digest(), T0).unwrap();
        site_l.append(Body::Release(release)).unwrap();
        let mut coord = Ledger::new();
        coord.append(Body::Accepted(AcceptedRecord::from_update(site(), &header, T0).unwrap())).unwrap();
        let report = reconcile(&site(), site_l.entries(), coord.entries());
        assert_eq!(report, ReconcileReport { matched: 1, mismatches: vec![] });
    }

    #[test]
    fn infinite_epsilon_round_trips() {
        let mut ledger = Ledger::new();
        let mut body = site_ledger(1).entries()[0].body.clone();
        if let Body::Release(r) = &mut body {
            r.privacy = Privacy::from(PrivacyUsed::off());
        }
        ledger.append(body).unwrap();
        let bytes = ledger.to_bytes();
        assert!(String::from_utf8_lossy(&bytes).contains("\"epsilon_after\":\"inf\""));
        let report = verify(&bytes, None);
        assert!(report.is_clean(), "{:?}", report.problems);
        assert_eq!(Ledger::from_verified(&report).unwrap(), ledger);
    }

    #[test]
    fn audit_finds_under_counting_and_broken_sequences() {
        let honest = site_ledger(4);
        let report = audit_releases(honest.entries());
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!(report.releases, 4);
        let acc = honest.accountant().unwrap();
        assert_eq!(report.final_epsilon, Some((acc.epsilon(1e-5).unwrap(), 1e-5)));

        // A site that claims a lower epsilon for round 3 and carries the low value on.
        let mut ledger = Ledger::new();
        for (i, e) in honest.entries().iter().enumerate() {
            let mut body = e.body.clone();
            if let Body::Release(r) = &mut body {
                if i == 2 {
                    r.privacy.epsilon_after *= 0.9;
                }
            }
            ledger.append(body).unwrap();
        }
        assert!(verify(&ledger.to_bytes(), None).is_clean(), "re-chained, so only the audit can tell");
        let findings = audit_releases(ledger.entries()).findings;
        assert!(matches!(findings[0], AuditFinding { seq: 2, kind: AuditKind::UnderCounted { .. }, .. }), "{findings:?}");
        assert!(matches!(findings[1], AuditFinding { seq: 3, kind: AuditKind::BeforeMismatch { .. }, .. }), "{findings:?}");
        assert_eq!(findings.len(), 2, "{findings:?}");
        assert!(findings[0].to_string().contains("under-counted"));

        // The coordinator's declared values get the same recompute.
        let coord = coordinator_ledger(&ledger);
        let findings = audit_accepted(coord.entries(), &site()).findings;
        assert!(findings.iter().any(|f| f.seq == 4 && matches!(f.kind, AuditKind::UnderCounted { .. })), "{findings:?}");
    }

    /// Updates sent without DP declare no delta: the recompute gives an unbounded epsilon
    /// (matching the stored "inf") rather than an error.
    #[test]
    fn audit_accounts_updates_without_dp_as_unbounded() {
        let mut ledger = Ledger::new();
        let mut body = site_ledger(1).entries()[0].body.clone();
        if let Body::Release(r) = &mut body {
            r.privacy = Privacy::from(PrivacyUsed::off());
        }
        ledger.append(body).unwrap();
        let report = audit_releases(ledger.entries());
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!(report.final_epsilon, Some((f64::INFINITY, 0.0)));
        let mut claims = ledger.entries()[0].body.clone();
        if let Body::Release(r) = &mut claims {
            r.privacy.epsilon_after = 1.0;
        }
        let mut lying = Ledger::new();
        lying.append(claims).unwrap();
        let findings = audit_releases(lying.entries()).findings;
        assert!(matches!(findings[..], [AuditFinding { kind: AuditKind::UnderCounted { .. }, .. }]), "{findings:?}");
    }

    fn share() -> crate::dp::DistributedRelease {
        crate::dp::DistributedRelease {
            site_sigma: 2000.0,
            scale: 1024.0,
            modulus_bits: 64,
            sites: 3,
            min_honest: 2,
            clip_norm: 1.0,
            dim: 1000,
            rounding_beta: None,
        }
    }

    /// A site's ledger of `n` distributed DP rounds (epsilons from the accountant), and the
    /// coordinator's of the same secure rounds as it writes them: the masked input
    /// accepted (its count unknown: 0), the round's sum (this site and `other`), a seal.
    fn secure_ledgers(n: u64) -> (Ledger, Ledger) {
        let (mut site_l, mut coord) = (Ledger::new(), Ledger::new());
        let mut acc = Accountant::new();
        let delta = 1e-5;
        let other = SiteId::new("haukeland").unwrap();
        for round in 1..=n {
            let release = Release::distributed(1.0, share());
            let before = acc.epsilon(delta).unwrap();
            acc.record(&release).unwrap();
            let privacy = Privacy {
                score: None,
                mode: PrivacyMode::Distributed,
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                sampling_rate: 0.0,
                steps: 1,
                update_clip_norm: 0.0,
                epsilon_after: acc.epsilon(delta).unwrap(),
                delta,
                distributed: Some(share()),
            };
            let time = format_time(T0).unwrap();
            let (round, update_digest) = (RoundId(round), digest(round));
            site_l
                .append(Body::Release(ReleaseRecord {
                    site: site(),
                    round,
                    privacy,
                    examples: 1200,
                    epsilon_before: before,
                    update_digest,
                    time: time.clone(),
                }))
                .unwrap();
            coord
                .append(Body::Accepted(AcceptedRecord { site: site(), round, privacy, examples: 0, update_digest, time: time.clone() }))
                .unwrap();
            coord
                .append(Body::SecureRound(SecureRoundRecord {
                    round,
                    attempt: 1,
                    summed: vec![other.clone(), site()],
                    dropped: vec![],
                    total_weight: 2,
                    time,
                }))
                .unwrap();
            let seal = coord.prepare_seal(round, &key(), T0).unwrap();
            coord.push(seal).unwrap();
        }
        (site_l, coord)
    }

    /// A secure round reconciles per site: the site's masked input is the one the
    /// coordinator accepted and summed; its count, which the coordinator never sees, is
    /// not compared (it used to be, against the coordinator's 0: every secure round failed).
    #[test]
    fn a_secure_round_reconciles_per_site() {
        let (site_l, coord) = secure_ledgers(3);
        let report = reconcile(&site(), site_l.entries(), coord.entries());
        assert_eq!(report, ReconcileReport { matched: 3, mismatches: vec![] });
        // The audit recomputes the distributed epsilon from the recorded share.
        let audit = audit_releases(site_l.entries());
        assert!(audit.findings.is_empty(), "{:?}", audit.findings);
        let expected = crate::dp::distributed::epsilon_for_releases(&[share(); 3], 1e-5).unwrap();
        assert!((audit.final_epsilon.unwrap().0 - expected).abs() <= 1e-12 * expected, "{:?} vs {expected}", audit.final_epsilon);
        assert!(audit_accepted(coord.entries(), &site()).findings.is_empty());
        // The JSON line reads back the same, and a ledger without the new fields still reads.
        let line = site_l.entries()[0].to_line();
        assert_eq!(serde_json::from_slice::<Entry>(&line).unwrap(), site_l.entries()[0]);
        let old = site_ledger(1);
        assert!(!String::from_utf8(old.to_bytes()).unwrap().contains("distributed"));
    }

    /// Tampered secure rounds: the site left out of the sum it sent to, a sum below the
    /// honest sites its share assumed, a declared share that is not the site's, a sum
    /// that names the site without its input, and an under-stated distributed epsilon.
    #[test]
    fn a_tampered_secure_round_does_not_reconcile() {
        let (site_l, coord) = secure_ledgers(4);
        let mut c = Ledger::new();
        for e in coord.entries() {
            let mut body = e.body.clone();
            match &mut body {
                Body::SecureRound(r) if r.round == RoundId(1) => r.summed.retain(|s| s != &site()),
                Body::SecureRound(r) if r.round == RoundId(2) => r.summed.retain(|s| s == &site()),
                Body::Accepted(a) if a.round == RoundId(3) => {
                    a.privacy.distributed = Some(crate::dp::DistributedRelease { site_sigma: 1000.0, ..share() })
                }
                Body::Accepted(a) if a.round == RoundId(4) => continue,
                Body::Seal(_) => continue,
                _ => {}
            }
            c.append(body).unwrap();
        }
        let report = reconcile(&site(), site_l.entries(), c.entries());
        assert_eq!(report.matched, 0, "{report:?}");
        let m = &report.mismatches;
        assert!(m.contains(&Mismatch::NotSummed { round: RoundId(1), digest: digest(1) }), "{m:?}");
        assert!(m.contains(&Mismatch::TooFewSummed { round: RoundId(2), summed: 1, min_honest: 2 }), "{m:?}");
        assert!(
            m.iter().any(|x| matches!(x, Mismatch::ParameterMismatch { round: RoundId(3), field: "distributed noise share", .. })),
            "{m:?}"
        );
        assert!(m.contains(&Mismatch::SummedWithoutInput { round: RoundId(4) }), "{m:?}");
        assert!(m.contains(&Mismatch::NotAccepted { round: RoundId(4), digest: digest(4) }), "{m:?}");
        // A site ledger that under-states the distributed epsilon.
        let mut lying = Ledger::new();
        for e in site_l.entries() {
            let mut body = e.body.clone();
            if let Body::Release(r) = &mut body {
                r.privacy.epsilon_after *= 0.5;
                r.epsilon_before *= 0.5;
            }
            lying.append(body).unwrap();
        }
        let findings = audit_releases(lying.entries()).findings;
        assert!(findings.iter().any(|f| matches!(f.kind, AuditKind::UnderCounted { .. })), "{findings:?}");
    }

    #[test]
    fn reconcile_lists_mismatches_both_ways() {
        let site_l = site_ledger(4);
        let coord = coordinator_ledger(&site_l);
        let report = reconcile(&site(), site_l.entries(), coord.entries());
        assert_eq!(report, ReconcileReport { matched: 4, mismatches: vec![] });

        // Coordinator: drop round 2, change round 3's digest, change round 4's sigma, add round 5.
        let mut c = Ledger::new();
        for e in coord.entries() {
            let Body::Accepted(a) = &e.body else { continue };
            let mut a = a.clone();
            match a.round.0 {
                2 => continue,
                3 => a.update_digest = digest(99),
                4 => a.privacy.noise_multiplier = 0.5,
                _ => {}
            }
            c.append(Body::Accepted(a)).unwrap();
        }
        let mut extra = match &coord.entries()[0].body {
            Body::Accepted(a) => a.clone(),
            _ => unreachable!(),
        };
        extra.round = RoundId(5);
        extra.update_digest = digest(5);
        c.append(Body::Accepted(extra)).unwrap();
        let other_site = SiteId::new("haukeland").unwrap();
        let mut foreign = match &coord.entries()[0].body {
            Body::Accepted(a) => a.clone(),
            _ => unreachable!(),
        };
        foreign.site = other_site;
        c.append(Body::Accepted(foreign)).unwrap();

        let report = reconcile(&site(), site_l.entries(), c.entries());
        assert_eq!(report.matched, 1);
        assert_eq!(
            report.mismatches,
            vec![
                Mismatch::NotAccepted { round: RoundId(2), digest: digest(2) },
                Mismatch::DigestMismatch { round: RoundId(3), site: digest(3), coordinator: digest(99) },
                Mismatch::ParameterMismatch { round: RoundId(4), field: "noise multiplier", site: "1.1".into(), coordinator: "0.5".into() },
                Mismatch::NoReleaseAtSite { round: RoundId(5), digest: digest(5) },
            ]
        );
    }
}
