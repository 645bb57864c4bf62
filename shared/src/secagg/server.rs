//! The coordinator's side of one secure aggregation round: collects each step's messages,
//! tracks who dropped at which step, and unmasks the sum.
//!
//! `handle_*` validates one site's message (the sender is the site its TLS certificate
//! names, passed in by the shell); an error rejects that message only, and the site counts
//! as not having sent it. `close_*` ends a step (the shell decides when: everyone answered
//! or a deadline passed) and gives the messages to send next, or the reason the round fails.

use std::collections::{BTreeMap, BTreeSet};

use curve25519_dalek::scalar::Scalar;
use rustls_pki_types::UnixTime;
use x25519_dalek::{PublicKey, StaticSecret};

use super::client::scalar;
use super::crypto::Trust;
use super::shamir::{self, ShamirError};
use super::{
    crypto, graph, EncryptedShare, EncryptedShares, MaskedInput, RelayedShares, RevealedShare, RoundSetup, SecAggError, ShareKind,
    SignedKeys, Step, UnmaskRequest, UnmaskingShares, MAX_CERT_LEN, MAX_CHAIN_LEN, MAX_SIGNATURE_LEN, MAX_SITES, SHARE_CIPHERTEXT_LEN,
};
use crate::ids::SiteId;

/// The result of a round: the sum of the survivors' inputs and who took part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecAggOutput {
    /// The sum modulo `2^modulus_bits` of the survivors' inputs.
    pub sum: Vec<u64>,
    /// Sites whose masked input is in the sum (U3).
    pub survivors: Vec<SiteId>,
    /// Sites that dropped after sharing their keys, before their masked input (U2 - U3).
    pub dropped: Vec<SiteId>,
    /// Sites that advertised keys but sent no shares (U1 - U2).
    pub dropped_before_shares: Vec<SiteId>,
}

/// The coordinator's state for one round.
#[derive(Debug)]
pub struct SecAggServer {
    setup: RoundSetup,
    trust: Trust,
    step: Step,
    keys: BTreeMap<SiteId, SignedKeys>,
    /// Fixed when the key step closes.
    index: BTreeMap<SiteId, u32>,
    graph: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shares: BTreeMap<SiteId, EncryptedShares>,
    /// Sites whose masked input is in `sum` (U3 once the step closes).
    masked: BTreeSet<SiteId>,
    /// The masked inputs received so far, summed modulo `2^64` as they arrive: one vector
    /// held, however many sites (empty until the first).
    sum: Vec<u64>,
    request: Option<UnmaskRequest>,
    unmasking: BTreeMap<SiteId, UnmaskingShares>,
}

impl SecAggServer {
    /// The server of the round `setup`, checking sites' keys against `trust` (the
    /// consortium CA).
    pub fn new(setup: RoundSetup, trust: Trust) -> Result<Self, SecAggError> {
        setup.validate()?;
        Ok(Self {
            setup,
            trust,
            step: Step::Keys,
            keys: BTreeMap::new(),
            index: BTreeMap::new(),
            graph: BTreeMap::new(),
            shares: BTreeMap::new(),
            masked: BTreeSet::new(),
            sum: Vec::new(),
            request: None,
            unmasking: BTreeMap::new(),
        })
    }

    /// The step whose messages the server is collecting.
    pub fn step(&self) -> Step {
        self.step
    }

    fn expect_step(&self, step: Step, what: &'static str) -> Result<(), SecAggError> {
        if self.step == step {
            Ok(())
        } else {
            Err(SecAggError::OutOfOrder(what))
        }
    }

    fn check_round(&self, round: crate::ids::RoundId) -> Result<(), SecAggError> {
        if round == self.setup.round {
            Ok(())
        } else {
            Err(SecAggError::WrongRound { expected: self.setup.round, got: round })
        }
    }

    /// Step 1: `sender`'s signed keys, verified at `now` as every site will verify them
    /// (sites do not trust the server to): a site with a bad certificate or signature is
    /// left out here rather than making every site abort the round.
    pub fn handle_keys(&mut self, sender: &SiteId, msg: SignedKeys, now: UnixTime) -> Result<(), SecAggError> {
        self.expect_step(Step::Keys, "keys after the key step closed")?;
        self.check_round(msg.round)?;
        if msg.site != *sender {
            return Err(SecAggError::WrongSender { sender: sender.clone(), claimed: msg.site });
        }
        if self.keys.contains_key(sender) {
            return Err(SecAggError::Duplicate(sender.clone()));
        }
        if self.keys.len() >= MAX_SITES {
            return Err(SecAggError::Params(format!("more than {MAX_SITES} sites")));
        }
        let malformed = |problem: &str| SecAggError::Malformed { site: sender.clone(), problem: problem.into() };
        if msg.cert_chain.is_empty() || msg.cert_chain.len() > MAX_CHAIN_LEN || msg.cert_chain.iter().any(|c| c.len() > MAX_CERT_LEN) {
            return Err(malformed("certificate chain of the wrong size"));
        }
        if msg.signature.is_empty() || msg.signature.len() > MAX_SIGNATURE_LEN {
            return Err(malformed("signature of the wrong size"));
        }
        self.trust.verify(&msg, &self.setup, now)?;
        self.keys.insert(sender.clone(), msg);
        Ok(())
    }

    /// Ends step 1: the signed keys to relay to every site of U1.
    pub fn close_keys(&mut self) -> Result<Vec<SignedKeys>, SecAggError> {
        self.expect_step(Step::Keys, "close_keys")?;
        if self.keys.len() < self.setup.params.min_sites {
            return Err(SecAggError::TooFewSites { step: Step::Keys, have: self.keys.len(), need: self.setup.params.min_sites });
        }
        let sites: Vec<SiteId> = self.keys.keys().cloned().collect();
        self.index = sites.iter().enumerate().map(|(i, s)| (s.clone(), i as u32 + 1)).collect();
        self.graph = graph::neighbours(&self.setup, &sites);
        self.step = Step::Shares;
        Ok(self.keys.values().cloned().collect())
    }

    /// Step 2: `sender`'s encrypted shares, exactly one for each of its neighbours.
    pub fn handle_shares(&mut self, sender: &SiteId, msg: EncryptedShares) -> Result<(), SecAggError> {
        self.expect_step(Step::Shares, "shares outside the share step")?;
        self.check_round(msg.round)?;
        let Some(neighbours) = self.graph.get(sender) else { return Err(SecAggError::UnknownSite(sender.clone())) };
        if msg.from != *sender {
            return Err(SecAggError::WrongSender { sender: sender.clone(), claimed: msg.from });
        }
        if self.shares.contains_key(sender) {
            return Err(SecAggError::Duplicate(sender.clone()));
        }
        let mut to = BTreeSet::new();
        for s in &msg.shares {
            if s.from != *sender {
                return Err(SecAggError::WrongSender { sender: sender.clone(), claimed: s.from.clone() });
            }
            if s.to == *sender {
                return Err(SecAggError::ShareForSelf(sender.clone()));
            }
            if !neighbours.contains(&s.to) {
                return Err(SecAggError::UnknownSite(s.to.clone()));
            }
            if !to.insert(&s.to) {
                return Err(SecAggError::Duplicate(s.to.clone()));
            }
            if s.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggError::Malformed {
                    site: sender.clone(),
                    problem: format!("ciphertext of {} bytes", s.ciphertext.len()),
                });
            }
        }
        if to.len() != neighbours.len() {
            return Err(SecAggError::Malformed {
                site: sender.clone(),
                problem: format!("shares for {} of its {} neighbours", to.len(), neighbours.len()),
            });
        }
        self.shares.insert(sender.clone(), msg);
        Ok(())
    }

    /// Ends step 2 (U2 = the senders): each site's incoming shares from U2.
    pub fn close_shares(&mut self) -> Result<BTreeMap<SiteId, RelayedShares>, SecAggError> {
        self.expect_step(Step::Shares, "close_shares")?;
        let t = self.setup.params.threshold;
        let u2: BTreeSet<&SiteId> = self.shares.keys().collect();
        if u2.len() < t {
            return Err(SecAggError::TooFewSites { step: Step::Shares, have: u2.len(), need: t });
        }
        // Each site's secrets must stay recoverable: t of its group in U2.
        for u in &u2 {
            let have = self.graph[*u].iter().filter(|v| u2.contains(v)).count() + 1;
            if have < t {
                return Err(SecAggError::TooFewSites { step: Step::Shares, have, need: t });
            }
        }
        let mut out: BTreeMap<SiteId, RelayedShares> =
            u2.iter().map(|u| ((*u).clone(), RelayedShares { round: self.setup.round, to: (*u).clone(), shares: Vec::new() })).collect();
        for msg in self.shares.values() {
            for s in &msg.shares {
                if let Some(r) = out.get_mut(&s.to) {
                    r.shares.push(EncryptedShare { from: s.from.clone(), to: s.to.clone(), ciphertext: s.ciphertext.clone() });
                }
            }
        }
        self.step = Step::MaskedInput;
        Ok(out)
    }

    /// Step 3: `sender`'s masked input.
    pub fn handle_masked_input(&mut self, sender: &SiteId, msg: MaskedInput) -> Result<(), SecAggError> {
        self.expect_step(Step::MaskedInput, "masked input outside its step")?;
        self.check_round(msg.round)?;
        if !self.shares.contains_key(sender) {
            return Err(SecAggError::UnknownSite(sender.clone()));
        }
        if msg.from != *sender {
            return Err(SecAggError::WrongSender { sender: sender.clone(), claimed: msg.from });
        }
        if self.masked.contains(sender) {
            return Err(SecAggError::Duplicate(sender.clone()));
        }
        if msg.values.len() != self.setup.vector_len {
            return Err(SecAggError::Malformed {
                site: sender.clone(),
                problem: format!("{} values, expected {}", msg.values.len(), self.setup.vector_len),
            });
        }
        let mask = self.setup.params.modulus_mask();
        if msg.values.iter().any(|&v| v & !mask != 0) {
            return Err(SecAggError::Malformed {
                site: sender.clone(),
                problem: format!("a value is not below 2^{}", self.setup.params.modulus_bits),
            });
        }
        if self.sum.is_empty() {
            self.sum = msg.values;
        } else {
            for (s, v) in self.sum.iter_mut().zip(&msg.values) {
                *s = s.wrapping_add(*v);
            }
        }
        self.masked.insert(sender.clone());
        Ok(())
    }

    /// Ends step 3 (U3 = the senders): the unmasking request for every site of U3. Fails,
    /// revealing nothing, unless every survivor's self-mask and every dropped site's mask
    /// key can still be recovered from `t` of its group among the survivors.
    pub fn close_masked_inputs(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.expect_step(Step::MaskedInput, "close_masked_inputs")?;
        let t = self.setup.params.threshold;
        if self.masked.len() < t {
            return Err(SecAggError::TooFewSites { step: Step::MaskedInput, have: self.masked.len(), need: t });
        }
        for u in self.shares.keys() {
            let have = self.graph[u].iter().filter(|v| self.masked.contains(*v)).count() + usize::from(self.masked.contains(u));
            if have < t {
                return Err(SecAggError::TooFewSites { step: Step::MaskedInput, have, need: t });
            }
        }
        let req = UnmaskRequest {
            round: self.setup.round,
            survivors: self.masked.iter().cloned().collect(),
            dropped: self.shares.keys().filter(|u| !self.masked.contains(*u)).cloned().collect(),
        };
        self.request = Some(req.clone());
        self.step = Step::Unmasking;
        Ok(req)
    }

    /// Step 4: `sender`'s revealed shares, exactly those the request asks of it.
    pub fn handle_unmasking(&mut self, sender: &SiteId, msg: UnmaskingShares) -> Result<(), SecAggError> {
        self.expect_step(Step::Unmasking, "unmasking shares outside their step")?;
        self.check_round(msg.round)?;
        if !self.masked.contains(sender) {
            return Err(SecAggError::UnknownSite(sender.clone()));
        }
        if msg.from != *sender {
            return Err(SecAggError::WrongSender { sender: sender.clone(), claimed: msg.from });
        }
        if self.unmasking.contains_key(sender) {
            return Err(SecAggError::Duplicate(sender.clone()));
        }
        // What the sender holds: shares from its neighbours in U2, and its own.
        let held: BTreeSet<&SiteId> =
            self.graph[sender].iter().filter(|v| self.shares.contains_key(*v)).chain(std::iter::once(sender)).collect();
        let want_b: BTreeSet<&SiteId> = held.iter().copied().filter(|v| self.masked.contains(*v)).collect();
        let want_s: BTreeSet<&SiteId> = held.iter().copied().filter(|v| !self.masked.contains(*v)).collect();
        check_revealed(sender, &msg.self_mask, &want_b)?;
        check_revealed(sender, &msg.mask_key, &want_s)?;
        self.unmasking.insert(sender.clone(), msg);
        Ok(())
    }

    /// Ends the round: reconstructs the survivors' self-masks and the dropped sites' mask
    /// keys from the revealed shares and returns the unmasked sum.
    pub fn finish(self) -> Result<SecAggOutput, SecAggError> {
        self.expect_step(Step::Unmasking, "finish")?;
        let t = self.setup.params.threshold;
        let mask = self.setup.params.modulus_mask();
        // At least `t >= 2` inputs arrived (`close_masked_inputs`), so `sum` is whole.
        let mut sum = self.sum;
        // Shares by whose secret they are, in responder order.
        let mut b_points: BTreeMap<&SiteId, Vec<(u32, Scalar)>> = BTreeMap::new();
        let mut s_points: BTreeMap<&SiteId, Vec<(u32, Scalar)>> = BTreeMap::new();
        for (from, msg) in &self.unmasking {
            let x = self.index[from];
            for (list, points) in [(&msg.self_mask, &mut b_points), (&msg.mask_key, &mut s_points)] {
                for r in list {
                    // Canonical scalars were checked on receipt.
                    if let Some(v) = scalar(&r.share) {
                        points.entry(&r.of).or_default().push((x, v));
                    }
                }
            }
        }
        // Every mask to remove, expanded together at the end (`add_masks`).
        let mut masks = Vec::new();
        for u in &self.masked {
            let points = b_points.get(u).map(Vec::as_slice).unwrap_or(&[]);
            let b = recover(u, ShareKind::SelfMask, points, t)?;
            masks.push((crypto::self_mask_seed(&b.to_bytes(), &self.setup, u), true));
        }
        let dropped: Vec<SiteId> = self.shares.keys().filter(|u| !self.masked.contains(*u)).cloned().collect();
        for v in &dropped {
            let points = s_points.get(v).map(Vec::as_slice).unwrap_or(&[]);
            let s = recover(v, ShareKind::MaskKey, points, t)?;
            let sk = StaticSecret::from(s.to_bytes());
            if PublicKey::from(&sk).to_bytes() != self.keys[v].mask_pk {
                return Err(SecAggError::InconsistentShares { site: v.clone(), kind: ShareKind::MaskKey });
            }
            // Remove the masks v's surviving neighbours added for it: w added +PRG for a
            // larger v and -PRG for a smaller one.
            for w in self.graph[v].iter().filter(|w| self.masked.contains(*w)) {
                let dh = sk.diffie_hellman(&PublicKey::from(self.keys[w].mask_pk));
                let seed = crypto::pairwise_seed(dh.as_bytes(), &self.setup, v, w);
                masks.push((seed, v > w));
            }
        }
        crypto::add_masks(&mut sum, &masks);
        for s in sum.iter_mut() {
            *s &= mask;
        }
        Ok(SecAggOutput {
            sum,
            survivors: self.masked.iter().cloned().collect(),
            dropped,
            dropped_before_shares: self.keys.keys().filter(|u| !self.shares.contains_key(*u)).cloned().collect(),
        })
    }
}

fn recover(site: &SiteId, kind: ShareKind, points: &[(u32, Scalar)], t: usize) -> Result<Scalar, SecAggError> {
    shamir::reconstruct(points, t).map_err(|e| match e {
        ShamirError::TooFew { have, need } => SecAggError::NotEnoughShares { site: site.clone(), kind, have, need },
        ShamirError::BadPoints | ShamirError::Inconsistent => SecAggError::InconsistentShares { site: site.clone(), kind },
    })
}

/// `list` holds exactly one canonical share of each site in `want`.
fn check_revealed(sender: &SiteId, list: &[RevealedShare], want: &BTreeSet<&SiteId>) -> Result<(), SecAggError> {
    let mut got = BTreeSet::new();
    for r in list {
        if !want.contains(&r.of) {
            return Err(SecAggError::Malformed { site: sender.clone(), problem: format!("a share of {} that was not asked for", r.of) });
        }
        if !got.insert(&r.of) {
            return Err(SecAggError::Duplicate(r.of.clone()));
        }
        if scalar(&r.share).is_none() {
            return Err(SecAggError::Malformed { site: sender.clone(), problem: "share is not a canonical scalar".into() });
        }
    }
    if got.len() != want.len() {
        return Err(SecAggError::Malformed {
            site: sender.clone(),
            problem: format!("{} of the {} shares asked for", got.len(), want.len()),
        });
    }
    Ok(())
}
