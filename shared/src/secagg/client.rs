//! A site's side of one secure aggregation round: a state machine that aborts for good on
//! the first error.

use std::collections::{BTreeMap, BTreeSet};

use curve25519_dalek::scalar::Scalar;
use rand_core::{CryptoRng, RngCore};
use rustls_pki_types::UnixTime;
use x25519_dalek::{PublicKey, StaticSecret};

use super::crypto::{self, SiteCredentials, Trust};
use super::{
    graph, shamir, EncryptedShare, EncryptedShares, MaskedInput, RelayedShares, RevealedShare, RoundSetup, SecAggError, SignedKeys, Step,
    UnmaskRequest, UnmaskingShares, MAX_SITES, SHARE_CIPHERTEXT_LEN,
};
use crate::ids::SiteId;

/// One site's secure aggregation state for one round.
///
/// Call in order: [`advertise_keys`](Self::advertise_keys),
/// [`receive_keys`](Self::receive_keys), [`receive_shares`](Self::receive_shares),
/// [`masked_input`](Self::masked_input), [`unmask`](Self::unmask) (at most once). Any
/// error aborts the round for this site: later calls return [`SecAggError::Aborted`].
pub struct SecAggClient {
    setup: RoundSetup,
    creds: SiteCredentials,
    trust: Trust,
    cipher_sk: StaticSecret,
    mask_secret: Scalar,
    mask_sk: StaticSecret,
    self_mask: Scalar,
    advertised: SignedKeys,
    state: State,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("SecAggClient").field("site", self.creds.site()).field("round", &self.setup.round).finish_non_exhaustive()
    }
}

impl Drop for SecAggClient {
    fn drop(&mut self) {
        // The X25519 secrets zeroize themselves; the scalars are wiped here.
        zeroize::Zeroize::zeroize(&mut self.mask_secret);
        zeroize::Zeroize::zeroize(&mut self.self_mask);
    }
}

enum State {
    Advertised,
    SharesSent(Group),
    /// Shares received from these neighbours (U2 as this site sees it).
    SharesReceived(Group, BTreeMap<SiteId, (Scalar, Scalar)>),
    InputSent(Group, BTreeMap<SiteId, (Scalar, Scalar)>),
    Done,
    Aborted,
}

/// What the relayed keys fixed: the round's sites and this site's neighbours.
struct Group {
    /// Share index (x-coordinate) of every site of U1: its position in the sorted list, from 1.
    index: BTreeMap<SiteId, u32>,
    /// Neighbours' signed keys.
    neighbours: BTreeMap<SiteId, SignedKeys>,
    /// This site's own shares of `b` and `s`.
    own: (Scalar, Scalar),
}

impl SecAggClient {
    /// Draws this round's key pairs and secrets.
    pub fn new<R: RngCore + CryptoRng>(setup: RoundSetup, creds: SiteCredentials, trust: Trust, rng: &mut R) -> Result<Self, SecAggError> {
        setup.validate()?;
        let mut c = [0u8; 32];
        rng.fill_bytes(&mut c);
        let cipher_sk = StaticSecret::from(c);
        zeroize::Zeroize::zeroize(&mut c);
        let mask_secret = shamir::random_scalar(rng);
        let mask_sk = StaticSecret::from(mask_secret.to_bytes());
        let self_mask = shamir::random_scalar(rng);
        let cipher_pk = PublicKey::from(&cipher_sk).to_bytes();
        let mask_pk = PublicKey::from(&mask_sk).to_bytes();
        let signature = creds.sign(&crypto::keys_statement(&setup, creds.site(), &cipher_pk, &mask_pk))?;
        let advertised = SignedKeys {
            round: setup.round,
            site: creds.site().clone(),
            cipher_pk,
            mask_pk,
            cert_chain: creds.chain().to_vec(),
            signature,
        };
        Ok(Self { setup, creds, trust, cipher_sk, mask_secret, mask_sk, self_mask, advertised, state: State::Advertised })
    }

    /// This site.
    pub fn site(&self) -> &SiteId {
        self.creds.site()
    }

    /// Step 1: the signed public keys to send to the coordinator.
    pub fn advertise_keys(&self) -> SignedKeys {
        self.advertised.clone()
    }

    /// Step 2: verifies every relayed key (certificate chain to the CA at `now`, site name,
    /// signature, this site's own entry unchanged) and returns this site's encrypted shares
    /// for its neighbours. Aborts on any failure.
    pub fn receive_keys<R: RngCore + CryptoRng>(
        &mut self,
        keys: &[SignedKeys],
        now: UnixTime,
        rng: &mut R,
    ) -> Result<EncryptedShares, SecAggError> {
        self.check_live()?;
        let State::Advertised = self.state else { return self.fail(SecAggError::OutOfOrder("receive_keys")) };
        match self.share_keys(keys, now, rng) {
            Ok((group, out)) => {
                self.state = State::SharesSent(group);
                Ok(out)
            }
            Err(e) => self.fail(e),
        }
    }

    fn share_keys<R: RngCore + CryptoRng>(
        &self,
        keys: &[SignedKeys],
        now: UnixTime,
        rng: &mut R,
    ) -> Result<(Group, EncryptedShares), SecAggError> {
        let p = &self.setup.params;
        if keys.len() > MAX_SITES {
            return Err(SecAggError::Params(format!("{} sites exceed the maximum of {MAX_SITES}", keys.len())));
        }
        let mut by_site: BTreeMap<SiteId, &SignedKeys> = BTreeMap::new();
        for k in keys {
            if by_site.insert(k.site.clone(), k).is_some() {
                return Err(SecAggError::Duplicate(k.site.clone()));
            }
        }
        match by_site.get(self.site()) {
            Some(mine) if **mine == self.advertised => {}
            _ => return Err(SecAggError::OwnKeysAltered),
        }
        if by_site.len() < p.min_sites {
            return Err(SecAggError::TooFewSites { step: Step::Keys, have: by_site.len(), need: p.min_sites });
        }
        // Every entry, not only neighbours': the list decides the graph.
        let mut seen_keys = BTreeSet::new();
        for k in by_site.values() {
            self.trust.verify(k, &self.setup, now)?;
            // The same public key under two sites would be a replay across sites.
            if !seen_keys.insert(k.cipher_pk) || !seen_keys.insert(k.mask_pk) {
                return Err(SecAggError::BadKeys { site: k.site.clone(), reason: "public key reused".into() });
            }
        }
        let sites: Vec<SiteId> = by_site.keys().cloned().collect();
        let index: BTreeMap<SiteId, u32> = sites.iter().enumerate().map(|(i, s)| (s.clone(), i as u32 + 1)).collect();
        let graph = graph::neighbours(&self.setup, &sites);
        let mine = graph.get(self.site()).cloned().unwrap_or_default();
        let group_size = mine.len() + 1;
        if group_size < p.threshold {
            return Err(SecAggError::TooFewSites { step: Step::Keys, have: group_size, need: p.threshold });
        }
        // Shares at x = index: the group in index order, this site included.
        let mut members: Vec<&SiteId> = mine.iter().chain(std::iter::once(self.site())).collect();
        members.sort();
        let xs: Vec<u32> = members.iter().map(|s| index[*s]).collect();
        let b_shares = shamir::split(&self.self_mask, p.threshold, &xs, rng);
        let s_shares = shamir::split(&self.mask_secret, p.threshold, &xs, rng);
        let mut own = (Scalar::ZERO, Scalar::ZERO);
        let mut shares = Vec::with_capacity(mine.len());
        let mut neighbours = BTreeMap::new();
        for ((site, b), s) in members.iter().zip(&b_shares).zip(&s_shares) {
            if *site == self.site() {
                own = (*b, *s);
                continue;
            }
            let keys = by_site[*site];
            let dh = self.cipher_sk.diffie_hellman(&PublicKey::from(keys.cipher_pk));
            if !dh.was_contributory() {
                return Err(SecAggError::BadKeys { site: (*site).clone(), reason: "low-order public key".into() });
            }
            let key = crypto::share_key(dh.as_bytes(), &self.setup, self.site(), site);
            let mut pt = [0u8; 64];
            pt[..32].copy_from_slice(&b.to_bytes());
            pt[32..].copy_from_slice(&s.to_bytes());
            let ciphertext = crypto::seal(&key, &self.setup, self.site(), site, &pt);
            zeroize::Zeroize::zeroize(&mut pt);
            shares.push(EncryptedShare { from: self.site().clone(), to: (*site).clone(), ciphertext });
            neighbours.insert((*site).clone(), keys.clone());
        }
        let out = EncryptedShares { round: self.setup.round, from: self.site().clone(), shares };
        Ok((Group { index, neighbours, own }, out))
    }

    /// Step 2, second half: the shares the coordinator relayed from this site's neighbours.
    pub fn receive_shares(&mut self, relayed: &RelayedShares) -> Result<(), SecAggError> {
        self.check_live()?;
        let state = std::mem::replace(&mut self.state, State::Aborted);
        let State::SharesSent(group) = state else {
            self.state = state;
            return self.fail(SecAggError::OutOfOrder("receive_shares"));
        };
        match self.open_shares(&group, relayed) {
            Ok(received) => {
                self.state = State::SharesReceived(group, received);
                Ok(())
            }
            Err(e) => self.fail(e),
        }
    }

    fn open_shares(&self, group: &Group, relayed: &RelayedShares) -> Result<BTreeMap<SiteId, (Scalar, Scalar)>, SecAggError> {
        if relayed.round != self.setup.round {
            return Err(SecAggError::WrongRound { expected: self.setup.round, got: relayed.round });
        }
        if relayed.to != *self.site() {
            return Err(SecAggError::WrongSender { sender: self.site().clone(), claimed: relayed.to.clone() });
        }
        let mut received = BTreeMap::new();
        for share in &relayed.shares {
            if share.to != *self.site() {
                return Err(SecAggError::Malformed { site: share.from.clone(), problem: format!("share addressed to {}", share.to) });
            }
            if share.from == *self.site() {
                return Err(SecAggError::ShareForSelf(share.from.clone()));
            }
            let Some(keys) = group.neighbours.get(&share.from) else { return Err(SecAggError::UnknownSite(share.from.clone())) };
            if received.contains_key(&share.from) {
                return Err(SecAggError::Duplicate(share.from.clone()));
            }
            if share.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggError::Malformed {
                    site: share.from.clone(),
                    problem: format!("ciphertext of {} bytes", share.ciphertext.len()),
                });
            }
            let dh = self.cipher_sk.diffie_hellman(&PublicKey::from(keys.cipher_pk));
            let key = crypto::share_key(dh.as_bytes(), &self.setup, &share.from, self.site());
            let mut pt = crypto::open(&key, &self.setup, &share.from, self.site(), &share.ciphertext)
                .ok_or_else(|| SecAggError::Decrypt(share.from.clone()))?;
            let b = scalar(&pt[..32]);
            let s = scalar(&pt[32..]);
            zeroize::Zeroize::zeroize(&mut pt);
            let (Some(b), Some(s)) = (b, s) else {
                return Err(SecAggError::Malformed { site: share.from.clone(), problem: "share is not a canonical scalar".into() });
            };
            received.insert(share.from.clone(), (b, s));
        }
        let have = received.len() + 1;
        if have < self.setup.params.threshold {
            return Err(SecAggError::TooFewSites { step: Step::Shares, have, need: self.setup.params.threshold });
        }
        Ok(received)
    }

    /// Step 3: masks `input` (`vector_len` values, each below `2^modulus_bits`).
    pub fn masked_input(&mut self, input: &[u64]) -> Result<MaskedInput, SecAggError> {
        self.check_live()?;
        let state = std::mem::replace(&mut self.state, State::Aborted);
        let State::SharesReceived(group, received) = state else {
            self.state = state;
            return self.fail(SecAggError::OutOfOrder("masked_input"));
        };
        let mask = self.setup.params.modulus_mask();
        if input.len() != self.setup.vector_len {
            return self.fail(SecAggError::Input(format!("{} values, expected {}", input.len(), self.setup.vector_len)));
        }
        if input.iter().any(|&v| v & !mask != 0) {
            return self.fail(SecAggError::Input(format!("a value is not below 2^{}", self.setup.params.modulus_bits)));
        }
        let mut masks = vec![(crypto::self_mask_seed(&self.self_mask.to_bytes(), &self.setup, self.site()), false)];
        for v in received.keys() {
            let keys = &group.neighbours[v];
            let dh = self.mask_sk.diffie_hellman(&PublicKey::from(keys.mask_pk));
            if !dh.was_contributory() {
                return self.fail(SecAggError::BadKeys { site: v.clone(), reason: "low-order public key".into() });
            }
            let seed = crypto::pairwise_seed(dh.as_bytes(), &self.setup, self.site(), v);
            // + for a larger neighbour, - for a smaller one: each pair cancels in the sum.
            masks.push((seed, v < self.site()));
        }
        let mut values = input.to_vec();
        crypto::add_masks(&mut values, &masks);
        for (seed, _) in &mut masks {
            zeroize::Zeroize::zeroize(seed);
        }
        for v in values.iter_mut() {
            *v &= mask;
        }
        self.state = State::InputSent(group, received);
        Ok(MaskedInput { round: self.setup.round, from: self.site().clone(), values })
    }

    /// Step 4, at most once: reveals shares of the survivors' self-mask seeds and of the
    /// dropped neighbours' mask secrets. Refuses a request that names a site as both, that
    /// leaves out a neighbour it holds shares of, names a neighbour it holds none of, or
    /// names fewer than `t` survivors in its group.
    pub fn unmask(&mut self, req: &UnmaskRequest) -> Result<UnmaskingShares, SecAggError> {
        self.check_live()?;
        let state = std::mem::replace(&mut self.state, State::Aborted);
        let State::InputSent(group, received) = state else {
            self.state = state;
            return self.fail(SecAggError::OutOfOrder("unmask"));
        };
        // Whatever happens next, this site never answers a second request.
        self.state = State::Done;
        let out = self.reveal(&group, &received, req);
        if out.is_err() {
            self.state = State::Aborted;
        }
        out
    }

    fn reveal(
        &self,
        group: &Group,
        received: &BTreeMap<SiteId, (Scalar, Scalar)>,
        req: &UnmaskRequest,
    ) -> Result<UnmaskingShares, SecAggError> {
        if req.round != self.setup.round {
            return Err(SecAggError::WrongRound { expected: self.setup.round, got: req.round });
        }
        let survivors = site_set(&req.survivors, &group.index)?;
        let dropped = site_set(&req.dropped, &group.index)?;
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(SecAggError::BothShareKinds((*both).clone()));
        }
        if !survivors.contains(self.site()) {
            return Err(SecAggError::Malformed { site: self.site().clone(), problem: "this site is not named a survivor".into() });
        }
        for v in group.neighbours.keys() {
            let (s, d) = (survivors.contains(v), dropped.contains(v));
            if received.contains_key(v) && !s && !d {
                return Err(SecAggError::Malformed { site: v.clone(), problem: "neighbour neither survived nor dropped".into() });
            }
            if !received.contains_key(v) && (s || d) {
                return Err(SecAggError::Malformed { site: v.clone(), problem: "named, but sent this site no shares".into() });
            }
        }
        let alive = received.keys().filter(|v| survivors.contains(v)).count() + 1;
        if alive < self.setup.params.threshold {
            return Err(SecAggError::TooFewSites { step: Step::Unmasking, have: alive, need: self.setup.params.threshold });
        }
        let mut self_mask = vec![RevealedShare { of: self.site().clone(), share: group.own.0.to_bytes() }];
        let mut mask_key = Vec::new();
        for (v, (b, s)) in received {
            if survivors.contains(v) {
                self_mask.push(RevealedShare { of: v.clone(), share: b.to_bytes() });
            } else {
                mask_key.push(RevealedShare { of: v.clone(), share: s.to_bytes() });
            }
        }
        self_mask.sort_by(|a, b| a.of.cmp(&b.of));
        Ok(UnmaskingShares { round: self.setup.round, from: self.site().clone(), self_mask, mask_key })
    }

    /// Aborts the round for this site. (Every public step first checks for an earlier
    /// abort, so `e` is always this call's own error.)
    fn fail<T>(&mut self, e: SecAggError) -> Result<T, SecAggError> {
        self.state = State::Aborted;
        Err(e)
    }

    fn check_live(&self) -> Result<(), SecAggError> {
        match self.state {
            State::Aborted => Err(SecAggError::Aborted),
            _ => Ok(()),
        }
    }
}

/// A list a peer sent as a set: known sites, no duplicates.
fn site_set<'a>(list: &'a [SiteId], known: &BTreeMap<SiteId, u32>) -> Result<BTreeSet<&'a SiteId>, SecAggError> {
    if list.len() > MAX_SITES {
        return Err(SecAggError::Params(format!("a list of {} sites exceeds {MAX_SITES}", list.len())));
    }
    let mut set = BTreeSet::new();
    for s in list {
        if !known.contains_key(s) {
            return Err(SecAggError::UnknownSite(s.clone()));
        }
        if !set.insert(s) {
            return Err(SecAggError::Duplicate(s.clone()));
        }
    }
    Ok(set)
}

/// A canonical scalar from 32 bytes.
pub(crate) fn scalar(bytes: &[u8]) -> Option<Scalar> {
    let arr: [u8; 32] = bytes.try_into().ok()?;
    Option::from(Scalar::from_canonical_bytes(arr))
}
