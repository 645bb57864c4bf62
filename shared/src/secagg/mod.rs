//! Secure aggregation: the coordinator learns the sum of the sites' updates and nothing
//! else, with dropouts tolerated (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).
//!
//! Sans-IO, like the rest of `shared`: [`SecAggClient`] (one per site per round) and
//! [`SecAggServer`] (one per round at the coordinator) take messages in and give messages
//! out; randomness and the current time are passed in; nothing here reads a clock, a file
//! or a socket.
//!
//! # One round
//!
//! Sets of sites shrink as sites drop: U1 advertised keys, U2 sent shares, U3 sent a masked
//! input, U4 answered the unmasking request.
//!
//! 0. **Setup.** Every participant knows the same [`RoundSetup`]: round id, the validated
//!    [`SecAggParams`] (threshold `t`, minimum sites, neighbours `k`, modulus `2^bits`),
//!    the vector length (the quantized update plus one weight coordinate, see [`quant`])
//!    and a context hash binding it to the federation's round offer. A site must never
//!    run two rounds with the same setup (its ledger knows which rounds it joined): keys
//!    it advertised in a round where it dropped had their mask secret reconstructed.
//! 1. **Advertise keys** ([`SecAggClient::advertise_keys`]). Each site draws two X25519
//!    key pairs for this round only: `c` (to encrypt shares to its neighbours) and `s` (to
//!    agree pairwise mask seeds). It signs (setup digest, site id, both public keys) with
//!    its TLS certificate's ECDSA P-256 key and sends [`SignedKeys`] with its chain.
//! 2. **Share keys** ([`SecAggClient::receive_keys`]). The coordinator verifies each
//!    site's keys as the sites will (so one site's bad keys leave that site out instead of
//!    making every site abort) and relays all of U1's [`SignedKeys`]. Every site verifies
//!    every entry again, trusting nothing the coordinator checked: the chain leads to the consortium
//!    CA with the clientAuth purpose (the check the coordinator's TLS handshake makes), its
//!    single DNS SAN is the site claimed ([`crate::pki::site_of_cert`]), the signature
//!    verifies under the certificate's key, and its own entry is exactly what it sent. Any
//!    failure aborts the site's round: a coordinator cannot substitute its own public key
//!    for a site's (it holds no site certificate's key), nor replay keys from another round
//!    or setup (the signature covers the setup digest). The site then Shamir-shares its
//!    self-mask seed `b_u` and its mask secret `s_u` (threshold `t`) among itself and its
//!    neighbours and encrypts each neighbour's pair of shares with ChaCha20-Poly1305 under a
//!    key from X25519(c_u, c_v), so the relaying coordinator cannot read them.
//! 3. **Masked input** ([`SecAggClient::masked_input`]). With U2 known (whose shares it
//!    received), site `u` sends
//!    `y_u = x_u + PRG(b_u) + sum_{v in N(u) cap U2, v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^bits`,
//!    `s_uv` from X25519(s_u, s_v) through HKDF-SHA256 bound to the round setup and the pair,
//!    the PRG ChaCha20 (`rand_chacha`), one 64-bit word per coordinate truncated to `bits`
//!    (exactly uniform modulo `2^bits` because the modulus is a power of two).
//! 4. **Unmasking** ([`SecAggClient::unmask`]). The coordinator names the survivors (U3)
//!    and the dropped (U2 minus U3). Each site answers once, with its share of `b_v` for
//!    every survivor `v` in its group and its share of `s_v` for every dropped neighbour.
//!    The coordinator reconstructs `b_u` for survivors and `s_v` for the dropped (checking
//!    that `s_v` matches `v`'s signed public key), removes the self-masks and the pairwise
//!    masks the dropped sites left in their neighbours' inputs, and gets the sum of the
//!    survivors' inputs modulo `2^bits` ([`SecAggServer::finish`]).
//!
//! # What a coordinator can learn
//!
//! A site answers the unmasking request once and refuses a request that names a site both
//! as survivor and dropped, so it never reveals both the self-mask share and the mask-key
//! share of the same peer. [`SecAggParams::validate`] requires `2t > k + 1` (more than
//! half of each group): two disjoint sets of `t` honest sites cannot exist within a group,
//! so even a coordinator that tells different sites different stories cannot collect `t`
//! shares of both kinds for one site without colluding sites. With fewer than `t` answers
//! the round fails ([`SecAggError::NotEnoughShares`]) and `t - 1` shares are, by Shamir's
//! construction, independent of the secret. A single masked input is uniform modulo
//! `2^bits` while `b_u` stays secret. What is not protected: the sum itself (that is what
//! distributed DP is for), which sites took part and dropped, and the coordinator's choice
//! of round id (which seeds the neighbour graph; a coordinator could grind it, but it
//! still cannot place a site among colluders it does not already control, since every
//! participant needs a CA-issued certificate). A malicious site can make the sum wrong
//! (any input is accepted); it cannot make the coordinator accept a forged mask key (the
//! reconstruction is checked against the signed public key) and inconsistent self-mask
//! shares are detected whenever more than `t` shares arrive.
//!
//! # Neighbour graph (SecAgg+)
//!
//! With `k >= n - 1` every site is every site's neighbour (SecAgg). Otherwise the graph is
//! a Harary graph `H(k, n)` (a circulant: each site joined to the `k/2` sites either side)
//! over a permutation of the sorted site list seeded by SHA-256 of the round setup and the
//! list, so every participant derives the same graph and a site's cost grows with `k`, not
//! `n`. Shares of a site's secrets go to its group (itself and its neighbours); `t` is a
//! threshold within the group.
//!
//! # Primitives
//!
//! `x25519-dalek` (key agreement), `hkdf` + `sha2` (key derivation), `rand_chacha`
//! (ChaCha20 mask expansion), `chacha20poly1305` (share encryption), rustls' ring signer
//! and `rustls-webpki` (ECDSA P-256 signatures by the certificate's key), and
//! `curve25519-dalek`'s `Scalar` for the Shamir arithmetic: see [`shamir`] for why.

pub mod client;
pub mod crypto;
pub mod graph;
pub mod quant;
pub mod server;
pub mod shamir;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{RoundId, SiteId};

pub use client::SecAggClient;
pub use crypto::{SiteCredentials, Trust};
pub use quant::{FixedPoint, WeightedMean};
/// The wall-clock time certificates are checked at (the caller reads the clock).
pub use rustls_pki_types::UnixTime;
pub use server::{SecAggOutput, SecAggServer};

/// Most sites one round may hold: bounds every list a peer sends.
pub const MAX_SITES: usize = 1000;
/// Longest vector one round may sum (coordinates, the weight coordinate included).
pub const MAX_VECTOR_LEN: usize = 1 << 30;
/// Most certificates in a site's chain.
pub const MAX_CHAIN_LEN: usize = 4;
/// Longest certificate (DER bytes) a site may send.
pub const MAX_CERT_LEN: usize = 16 * 1024;
/// Longest signature (an ASN.1 ECDSA P-256 signature is at most 72 bytes).
pub const MAX_SIGNATURE_LEN: usize = 128;
/// Bytes of one encrypted pair of shares: two 32-byte scalars and a 16-byte tag.
pub const SHARE_CIPHERTEXT_LEN: usize = 64 + 16;

/// The secure aggregation parameters of a round, from the coordinator's config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggParams {
    /// Shares needed to reconstruct a site's secret (`t`), within its group.
    pub threshold: usize,
    /// Fewest sites that may start a round (advertise keys).
    pub min_sites: usize,
    /// Neighbours per site (`k`, even); `k >= n - 1` gives the complete graph.
    pub neighbours: usize,
    /// The sum is computed modulo `2^modulus_bits`.
    pub modulus_bits: u32,
}

impl SecAggParams {
    /// Checks the parameters on their own (the round's size is checked per round).
    pub fn validate(&self) -> Result<(), SecAggError> {
        let bad = |m: String| Err(SecAggError::Params(m));
        if !(16..=64).contains(&self.modulus_bits) {
            return bad(format!("modulus_bits must be 16 to 64, got {}", self.modulus_bits));
        }
        if self.neighbours < 2 || !self.neighbours.is_multiple_of(2) || self.neighbours >= MAX_SITES {
            return bad(format!("neighbours must be even, at least 2 and below {MAX_SITES}, got {}", self.neighbours));
        }
        if self.threshold < 2 {
            return bad(format!("threshold must be at least 2, got {}", self.threshold));
        }
        if self.threshold > self.neighbours + 1 {
            return bad(format!("threshold {} exceeds a group of {} (neighbours + 1)", self.threshold, self.neighbours + 1));
        }
        // More than half of each group: no two disjoint sets of `t` honest sites exist in
        // a group, so no site ever has both kinds of share revealed by honest sites.
        if 2 * self.threshold <= self.neighbours + 1 {
            return bad(format!(
                "threshold {} must be more than half of a group of {} (neighbours + 1)",
                self.threshold,
                self.neighbours + 1
            ));
        }
        if self.min_sites < self.threshold || self.min_sites > MAX_SITES {
            return bad(format!(
                "min_sites must be at least the threshold {} and at most {MAX_SITES}, got {}",
                self.threshold, self.min_sites
            ));
        }
        Ok(())
    }

    /// `2^modulus_bits - 1`, the mask that reduces a `u64` modulo `2^modulus_bits`.
    pub fn modulus_mask(&self) -> u64 {
        if self.modulus_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.modulus_bits) - 1
        }
    }
}

/// What every participant of a round agrees on before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundSetup {
    pub round: RoundId,
    pub params: SecAggParams,
    /// Coordinates summed, the weight coordinate included.
    pub vector_len: usize,
    /// Binds the round to its federation and offer (the shell passes a hash of the round
    /// offer: federation, plan, base model), so keys signed for round `r` of one federation
    /// do not verify in round `r` of another or of a restarted one. Zero until set.
    pub context: [u8; 32],
}

impl RoundSetup {
    /// Validates the parameters and the vector length.
    pub fn new(round: RoundId, params: SecAggParams, vector_len: usize) -> Result<Self, SecAggError> {
        let setup = Self { round, params, vector_len, context: [0; 32] };
        setup.validate()?;
        Ok(setup)
    }

    /// Checks the parameters and the vector length (a setup that arrived by serde has not
    /// been through [`RoundSetup::new`]; the client and server constructors call this).
    pub fn validate(&self) -> Result<(), SecAggError> {
        self.params.validate()?;
        if self.vector_len == 0 || self.vector_len > MAX_VECTOR_LEN {
            return Err(SecAggError::Params(format!("vector length must be 1 to {MAX_VECTOR_LEN}, got {}", self.vector_len)));
        }
        Ok(())
    }

    /// The same setup bound to `context` (see [`RoundSetup::context`]).
    pub fn with_context(self, context: [u8; 32]) -> Self {
        Self { context, ..self }
    }

    /// SHA-256 of everything in the setup: signed with each site's keys, so keys from
    /// another round or another setup do not verify.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"fedward-secagg-setup-v1");
        h.update(self.round.0.to_be_bytes());
        for v in [self.params.threshold, self.params.min_sites, self.params.neighbours, self.vector_len] {
            h.update((v as u64).to_be_bytes());
        }
        h.update(self.params.modulus_bits.to_be_bytes());
        h.update(self.context);
        h.finalize().into()
    }
}

/// Step 1, site to coordinator and relayed to all: a site's public keys for the round,
/// signed with its certificate's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeys {
    pub round: RoundId,
    pub site: SiteId,
    /// X25519 public key for share encryption (`c_u`).
    pub cipher_pk: [u8; 32],
    /// X25519 public key for pairwise masks (`s_u`).
    pub mask_pk: [u8; 32],
    /// The site's certificate chain, DER, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// ASN.1 ECDSA P-256 SHA-256 signature over [`crypto::keys_statement`].
    pub signature: Vec<u8>,
}

/// One site's shares for one neighbour, encrypted to that neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    pub from: SiteId,
    pub to: SiteId,
    /// ChaCha20-Poly1305 of the two 32-byte shares ([`SHARE_CIPHERTEXT_LEN`] bytes).
    pub ciphertext: Vec<u8>,
}

/// Step 2, site to coordinator: one encrypted share per neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShares {
    pub round: RoundId,
    pub from: SiteId,
    pub shares: Vec<EncryptedShare>,
}

/// Step 2, coordinator to site: the shares addressed to that site by the sites of U2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedShares {
    pub round: RoundId,
    pub to: SiteId,
    pub shares: Vec<EncryptedShare>,
}

/// Step 3, site to coordinator: the masked input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    pub round: RoundId,
    pub from: SiteId,
    /// `y_u`, every value below `2^modulus_bits`.
    pub values: Vec<u64>,
}

/// Step 4, coordinator to the survivors: who sent a masked input and who dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    pub round: RoundId,
    /// U3, sorted.
    pub survivors: Vec<SiteId>,
    /// U2 minus U3, sorted.
    pub dropped: Vec<SiteId>,
}

/// One revealed Shamir share of a site's secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret this is a share of.
    pub of: SiteId,
    /// The share, a canonical little-endian scalar.
    pub share: [u8; 32],
}

/// Step 4, site to coordinator: shares of the survivors' self-mask seeds and of the
/// dropped sites' mask secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskingShares {
    pub round: RoundId,
    pub from: SiteId,
    /// Shares of `b_v` for survivors `v` (the sender's own included).
    pub self_mask: Vec<RevealedShare>,
    /// Shares of `s_v` for dropped neighbours `v`.
    pub mask_key: Vec<RevealedShare>,
}

/// A step of the protocol, to say where a round failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Keys,
    Shares,
    MaskedInput,
    Unmasking,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Keys => "key advertisement",
            Step::Shares => "share exchange",
            Step::MaskedInput => "masked input",
            Step::Unmasking => "unmasking",
        })
    }
}

/// Which secret a share is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareKind {
    /// The self-mask seed `b_u` (revealed for survivors).
    SelfMask,
    /// The pairwise-mask secret `s_u` (revealed for dropped sites).
    MaskKey,
}

impl std::fmt::Display for ShareKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShareKind::SelfMask => "self-mask",
            ShareKind::MaskKey => "mask-key",
        })
    }
}

/// Why a secure aggregation step failed. A site's client aborts its round on any error;
/// the server rejects the one message on a `handle_*` error and fails the round on a
/// `close_*`/`finish` error.
#[derive(Debug, thiserror::Error)]
pub enum SecAggError {
    #[error("invalid secure aggregation parameters: {0}")]
    Params(String),
    #[error("message for round {got}, expected round {expected}")]
    WrongRound { expected: RoundId, got: RoundId },
    #[error("message from {sender} claims to be from {claimed}")]
    WrongSender { sender: SiteId, claimed: SiteId },
    #[error("{0} is not a participant of this step")]
    UnknownSite(SiteId),
    #[error("duplicate message or entry from {0}")]
    Duplicate(SiteId),
    #[error("{0} addressed a share to itself")]
    ShareForSelf(SiteId),
    #[error("malformed message from {site}: {problem}")]
    Malformed { site: SiteId, problem: String },
    #[error("keys of {site} rejected: {reason}")]
    BadKeys { site: SiteId, reason: String },
    #[error("own keys altered in the relayed list")]
    OwnKeysAltered,
    #[error("the share from {0} does not decrypt")]
    Decrypt(SiteId),
    #[error("too few sites at {step}: {have}, need {need}")]
    TooFewSites { step: Step, have: usize, need: usize },
    #[error("not enough {kind} shares of {site}: {have}, need {need}")]
    NotEnoughShares { site: SiteId, kind: ShareKind, have: usize, need: usize },
    #[error("the {kind} shares of {site} are inconsistent")]
    InconsistentShares { site: SiteId, kind: ShareKind },
    #[error("refused: {0} named both survivor and dropped (both kinds of share would be revealed)")]
    BothShareKinds(SiteId),
    #[error("{0} out of order")]
    OutOfOrder(&'static str),
    #[error("this site's round was aborted by an earlier error")]
    Aborted,
    #[error("input: {0}")]
    Input(String),
    #[error("credentials: {0}")]
    Credentials(String),
}
