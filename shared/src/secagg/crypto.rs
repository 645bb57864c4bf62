//! The primitives of secure aggregation, each from a well-kept crate: HKDF-SHA256 key
//! derivation, ChaCha20 mask expansion, ChaCha20-Poly1305 share encryption, and ECDSA
//! P-256 signatures by a site certificate's key with their verification against the
//! consortium CA.

use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use rand_chacha::rand_core::{RngCore as _, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::Sha256;

use super::{RoundSetup, SecAggError, SignedKeys, MAX_CERT_LEN, MAX_CHAIN_LEN, MAX_SIGNATURE_LEN};
use crate::ids::SiteId;

/// HKDF salt: separates these keys from any other use of the same secrets.
const KDF_SALT: &[u8] = b"fedward-secagg-v1";

/// A 32-byte key from `ikm`, bound to `label` and the length-prefixed `parts`.
pub fn kdf(ikm: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(KDF_SALT), ikm);
    let mut info = Vec::with_capacity(label.len() + parts.iter().map(|p| p.len() + 4).sum::<usize>());
    info.extend_from_slice(label);
    for p in parts {
        info.extend_from_slice(&(p.len() as u32).to_be_bytes());
        info.extend_from_slice(p);
    }
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: expand cannot fail.
    hk.expand(&info, &mut out).expect("32-byte HKDF output");
    out
}

/// The seed of the pairwise mask of `a` and `b` (order-free) from their X25519 secret.
pub fn pairwise_seed(dh: &[u8; 32], setup: &RoundSetup, a: &SiteId, b: &SiteId) -> [u8; 32] {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    kdf(dh, b"pairwise-mask", &[&setup.digest(), lo.as_str().as_bytes(), hi.as_str().as_bytes()])
}

/// The seed of `site`'s self-mask from its secret `b` (scalar bytes).
pub fn self_mask_seed(b: &[u8; 32], setup: &RoundSetup, site: &SiteId) -> [u8; 32] {
    kdf(b, b"self-mask", &[&setup.digest(), site.as_str().as_bytes()])
}

/// The key `from` encrypts its shares for `to` with: one key per direction per round, so
/// each key encrypts exactly one message and a fixed nonce is safe.
pub fn share_key(dh: &[u8; 32], setup: &RoundSetup, from: &SiteId, to: &SiteId) -> [u8; 32] {
    kdf(dh, b"share-key", &[&setup.digest(), from.as_str().as_bytes(), to.as_str().as_bytes()])
}

/// Adds `sign * PRG(seed)` to `acc` modulo `2^64` (the caller reduces to `2^bits`): one
/// ChaCha20 word per coordinate, uniform modulo any power of two.
pub fn add_mask(acc: &mut [u64], seed: [u8; 32], negate: bool) {
    let mut prg = ChaCha20Rng::from_seed(seed);
    apply(acc, &mut prg, negate);
}

/// Adds every `(seed, negate)` mask to `acc`, each exactly as [`add_mask`] would: a block
/// of coordinates at a time for all the masks (so the block stays in cache instead of
/// `acc` streaming through memory once per mask), the blocks spread over the machine's
/// cores (each thread seeks every generator to its first coordinate).
pub fn add_masks(acc: &mut [u64], masks: &[([u8; 32], bool)]) {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    add_masks_on(acc, masks, cores);
}

/// Coordinates masked together: 128 KiB of `acc`, which stays in a core's cache.
const MASK_BLOCK: usize = 1 << 14;

/// [`add_masks`] on at most `threads` threads.
fn add_masks_on(acc: &mut [u64], masks: &[([u8; 32], bool)], threads: usize) {
    let threads = threads.clamp(1, acc.len().div_ceil(MASK_BLOCK).max(1));
    if threads == 1 {
        mask_range(acc, 0, masks);
        return;
    }
    let per_thread = acc.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (i, part) in acc.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || mask_range(part, i * per_thread, masks));
        }
    });
}

/// The masks' words for coordinates `start..start + part.len()`, added to `part`.
fn mask_range(part: &mut [u64], start: usize, masks: &[([u8; 32], bool)]) {
    let mut prgs: Vec<(ChaCha20Rng, bool)> = masks
        .iter()
        .map(|(seed, negate)| {
            let mut prg = ChaCha20Rng::from_seed(*seed);
            // Two 32-bit words per coordinate.
            prg.set_word_pos(2 * start as u128);
            (prg, *negate)
        })
        .collect();
    for block in part.chunks_mut(MASK_BLOCK) {
        for (prg, negate) in &mut prgs {
            apply(block, prg, *negate);
        }
    }
}

fn apply(acc: &mut [u64], prg: &mut ChaCha20Rng, negate: bool) {
    for a in acc.iter_mut() {
        let m = prg.next_u64();
        *a = if negate { a.wrapping_sub(m) } else { a.wrapping_add(m) };
    }
}

#[cfg(test)]
pub(super) fn add_masks_with_threads(acc: &mut [u64], masks: &[([u8; 32], bool)], threads: usize) {
    add_masks_on(acc, masks, threads);
}

fn aad(setup: &RoundSetup, from: &SiteId, to: &SiteId) -> Vec<u8> {
    let mut v = setup.digest().to_vec();
    for s in [from, to] {
        v.push(s.as_str().len() as u8);
        v.extend_from_slice(s.as_str().as_bytes());
    }
    v
}

/// Encrypts a pair of shares from `from` to `to`.
pub fn seal(key: &[u8; 32], setup: &RoundSetup, from: &SiteId, to: &SiteId, plaintext: &[u8; 64]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(key.into());
    // The key is used once (see `share_key`), so the zero nonce never repeats under it.
    // Encryption of 64 bytes cannot fail (the limit is 2^38 bytes).
    cipher.encrypt(&[0u8; 12].into(), Payload { msg: plaintext, aad: &aad(setup, from, to) }).expect("64-byte AEAD encryption")
}

/// Decrypts a pair of shares; `None` if the ciphertext or its binding is wrong.
pub fn open(key: &[u8; 32], setup: &RoundSetup, from: &SiteId, to: &SiteId, ciphertext: &[u8]) -> Option<[u8; 64]> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let pt = cipher.decrypt(&[0u8; 12].into(), Payload { msg: ciphertext, aad: &aad(setup, from, to) }).ok()?;
    pt.try_into().ok()
}

/// What a site signs: the round setup, its id and both public keys.
pub fn keys_statement(setup: &RoundSetup, site: &SiteId, cipher_pk: &[u8; 32], mask_pk: &[u8; 32]) -> Vec<u8> {
    let mut v = b"fedward-secagg-keys-v1\0".to_vec();
    v.extend_from_slice(&setup.digest());
    v.push(site.as_str().len() as u8);
    v.extend_from_slice(site.as_str().as_bytes());
    v.extend_from_slice(cipher_pk);
    v.extend_from_slice(mask_pk);
    v
}

/// A site's certificate chain and the key that signs its per-round public keys (the TLS
/// key: ECDSA P-256, as `pki` issues them).
#[derive(Clone)]
pub struct SiteCredentials {
    site: SiteId,
    chain: Vec<Vec<u8>>,
    key: Arc<dyn SigningKey>,
}

impl std::fmt::Debug for SiteCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key.
        f.debug_struct("SiteCredentials").field("site", &self.site).finish_non_exhaustive()
    }
}

impl SiteCredentials {
    /// From the site's PEM chain (leaf first) and PEM private key; the site id is the
    /// leaf's DNS SAN.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, SecAggError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SecAggError::Credentials(format!("certificate PEM: {e:?}")))?;
        let leaf = chain.first().ok_or_else(|| SecAggError::Credentials("no certificate".into()))?;
        let site = crate::pki::site_of_cert(leaf).map_err(|e| SecAggError::Credentials(e.to_string()))?;
        // The parse error is not printed: it could quote key material.
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| SecAggError::Credentials("not a PEM private key".into()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| SecAggError::Credentials(e.to_string()))?;
        if key.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).is_none() {
            return Err(SecAggError::Credentials("the site key is not ECDSA P-256".into()));
        }
        Ok(Self { site, chain, key })
    }

    /// The site the certificate names.
    pub fn site(&self) -> &SiteId {
        &self.site
    }

    pub(crate) fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SecAggError> {
        let signer = self
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .ok_or_else(|| SecAggError::Credentials("the site key is not ECDSA P-256".into()))?;
        signer.sign(msg).map_err(|e| SecAggError::Credentials(e.to_string()))
    }
}

/// What a site trusts: certificates from the consortium CA with the clientAuth purpose,
/// checked as the coordinator's TLS handshake checks them.
#[derive(Clone)]
pub struct Trust {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

impl Trust {
    /// From the consortium CA certificate(s), PEM.
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<Self, SecAggError> {
        let verifier = crate::tls::site_cert_verifier(ca_pem).map_err(|e| SecAggError::Credentials(e.to_string()))?;
        Ok(Self { verifier })
    }

    /// Verifies `keys` for `setup` at `now`: bounded sizes, the chain leads to the CA, the
    /// leaf names `keys.site` and nothing else, and the signature verifies under its key.
    pub fn verify(&self, keys: &SignedKeys, setup: &RoundSetup, now: UnixTime) -> Result<(), SecAggError> {
        let bad = |reason: String| SecAggError::BadKeys { site: keys.site.clone(), reason };
        if keys.round != setup.round {
            return Err(SecAggError::WrongRound { expected: setup.round, got: keys.round });
        }
        if keys.cert_chain.is_empty() || keys.cert_chain.len() > MAX_CHAIN_LEN {
            return Err(bad(format!("certificate chain of {} certificates (1 to {MAX_CHAIN_LEN})", keys.cert_chain.len())));
        }
        if keys.cert_chain.iter().any(|c| c.len() > MAX_CERT_LEN) || keys.signature.len() > MAX_SIGNATURE_LEN {
            return Err(bad("certificate or signature too long".into()));
        }
        let chain: Vec<CertificateDer<'_>> = keys.cert_chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        self.verifier.verify_client_cert(&chain[0], &chain[1..], now).map_err(|e| bad(format!("certificate: {e}")))?;
        let named = crate::pki::site_of_cert(&chain[0]).map_err(|e| bad(format!("certificate: {e}")))?;
        if named != keys.site {
            return Err(bad(format!("certificate is {named}'s")));
        }
        let cert = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| bad(format!("certificate: {e}")))?;
        let msg = keys_statement(setup, &keys.site, &keys.cipher_pk, &keys.mask_pk);
        cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, &msg, &keys.signature).map_err(|e| bad(format!("signature: {e}")))?;
        Ok(())
    }
}
