//! Whole-round tests of secure aggregation: sites and coordinator driven in memory, with
//! dropouts at every step, a curious coordinator, substituted keys and malformed messages.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

use super::*;
use crate::ids::RoundId;
use crate::pki::{self, CertifiedKey, Validity};

const T0: i64 = 1_780_000_000;

fn now() -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(T0 as u64 + 3600))
}

struct Consortium {
    ca: CertifiedKey,
    trust: Trust,
    sites: Vec<SiteCredentials>,
}

fn issue(ca: &CertifiedKey, name: &str, serial: u8) -> SiteCredentials {
    let site = SiteId::new(name).unwrap();
    let req = pki::site_request(&site).unwrap();
    let start = OffsetDateTime::from_unix_timestamp(T0).unwrap();
    let cert = pki::sign_site_request(ca, &req.csr_pem, &site, Validity::days_from(start, 30), [serial; 16]).unwrap();
    SiteCredentials::from_pem(cert.as_bytes(), req.key_pem.as_bytes()).unwrap()
}

/// Twenty sites with certificates from one CA, made once per test binary.
fn consortium() -> &'static Consortium {
    static C: OnceLock<Consortium> = OnceLock::new();
    C.get_or_init(|| {
        let start = OffsetDateTime::from_unix_timestamp(T0).unwrap();
        let ca = pki::create_ca("test", Validity::days_from(start, 30), [1; 16]).unwrap();
        let trust = Trust::from_ca_pem(ca.cert_pem.as_bytes()).unwrap();
        // Sorted names: site i is the i-th smallest.
        let sites = (0..20).map(|i| issue(&ca, &format!("site-{i:02}"), i as u8 + 2)).collect();
        Consortium { ca, trust, sites }
    })
}

fn params(threshold: usize, neighbours: usize, min_sites: usize) -> SecAggParams {
    SecAggParams { threshold, min_sites, neighbours, modulus_bits: 32 }
}

/// When a site drops out: before sending the message of that step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drop {
    Never,
    BeforeShares,
    BeforeInput,
    BeforeUnmask,
}

/// Everything the coordinator received.
#[derive(Default)]
struct Transcript {
    keys: Vec<SignedKeys>,
    shares: Vec<EncryptedShares>,
    masked: Vec<MaskedInput>,
    unmasking: Vec<UnmaskingShares>,
}

impl Transcript {
    /// No site had both its self-mask and its mask-key shares revealed to the coordinator.
    fn assert_no_site_has_both_share_kinds(&self) {
        let b: BTreeSet<&SiteId> = self.unmasking.iter().flat_map(|m| m.self_mask.iter().map(|r| &r.of)).collect();
        let s: BTreeSet<&SiteId> = self.unmasking.iter().flat_map(|m| m.mask_key.iter().map(|r| &r.of)).collect();
        assert!(b.is_disjoint(&s), "both kinds revealed for {:?}", b.intersection(&s).collect::<Vec<_>>());
    }
}

struct Outcome {
    result: Result<SecAggOutput, SecAggError>,
    transcript: Transcript,
}

/// One round over the first `inputs.len()` sites, each dropping as `drops` says.
fn run_round(setup: RoundSetup, inputs: &[Vec<u64>], drops: &[Drop], seed: u64) -> Outcome {
    let mut transcript = Transcript::default();
    let result = drive(setup, inputs, drops, seed, &mut transcript);
    Outcome { result, transcript }
}

fn drive(setup: RoundSetup, inputs: &[Vec<u64>], drops: &[Drop], seed: u64, tr: &mut Transcript) -> Result<SecAggOutput, SecAggError> {
    let c = consortium();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server = SecAggServer::new(setup, c.trust.clone())?;
    let mut clients: Vec<SecAggClient> = c.sites[..inputs.len()]
        .iter()
        .map(|cr| SecAggClient::new(setup, cr.clone(), c.trust.clone(), &mut rng))
        .collect::<Result<_, _>>()?;
    for cl in &clients {
        let k = cl.advertise_keys();
        tr.keys.push(k.clone());
        server.handle_keys(cl.site(), k, now())?;
    }
    let keys = server.close_keys()?;
    for (cl, d) in clients.iter_mut().zip(drops) {
        if *d != Drop::BeforeShares {
            let s = cl.receive_keys(&keys, now(), &mut rng)?;
            tr.shares.push(s.clone());
            server.handle_shares(&s.from.clone(), s)?;
        }
    }
    let relayed = server.close_shares()?;
    for (i, cl) in clients.iter_mut().enumerate() {
        if !matches!(drops[i], Drop::BeforeShares | Drop::BeforeInput) {
            cl.receive_shares(&relayed[cl.site()])?;
            let m = cl.masked_input(&inputs[i])?;
            tr.masked.push(m.clone());
            server.handle_masked_input(&m.from.clone(), m)?;
        }
    }
    let req = server.close_masked_inputs()?;
    for (i, cl) in clients.iter_mut().enumerate() {
        if drops[i] == Drop::Never {
            let u = cl.unmask(&req)?;
            tr.unmasking.push(u.clone());
            server.handle_unmasking(&u.from.clone(), u)?;
        }
    }
    server.finish()
}

fn random_inputs(n: usize, len: usize, bits: u32, rng: &mut ChaCha20Rng) -> Vec<Vec<u64>> {
    let mask = if bits == 64 { u64::MAX } else { (1 << bits) - 1 };
    (0..n).map(|_| (0..len).map(|_| rng.next_u64() & mask).collect()).collect()
}

fn plain_sum(inputs: &[Vec<u64>], who: impl Fn(usize) -> bool, bits: u32) -> Vec<u64> {
    let mask = if bits == 64 { u64::MAX } else { (1 << bits) - 1 };
    let mut sum = vec![0u64; inputs[0].len()];
    for (_, x) in inputs.iter().enumerate().filter(|(i, _)| who(*i)) {
        for (s, v) in sum.iter_mut().zip(x) {
            *s = s.wrapping_add(*v) & mask;
        }
    }
    sum
}

fn check_sum(setup: RoundSetup, inputs: &[Vec<u64>], drops: &[Drop], seed: u64) -> Transcript {
    let out = run_round(setup, inputs, drops, seed);
    let got = out.result.unwrap_or_else(|e| panic!("drops {drops:?}: {e}"));
    let expected = plain_sum(inputs, |i| matches!(drops[i], Drop::Never | Drop::BeforeUnmask), setup.params.modulus_bits);
    assert_eq!(got.sum, expected, "drops {drops:?}");
    let survivors: Vec<&SiteId> = consortium().sites[..inputs.len()]
        .iter()
        .zip(drops)
        .filter(|(_, d)| matches!(d, Drop::Never | Drop::BeforeUnmask))
        .map(|(c, _)| c.site())
        .collect();
    assert_eq!(got.survivors.iter().collect::<Vec<_>>(), survivors);
    out.transcript.assert_no_site_has_both_share_kinds();
    out.transcript
}

#[test]
fn the_unmasked_sum_is_the_exact_sum_and_the_mean_is_weighted_fedavg() {
    // Ten sites, clipped updates weighted by clamped example counts, k = 32.
    let n = 10;
    let (clip, max_weight) = (1.0f32, 500u64);
    let fp = FixedPoint::new(32, clip, max_weight, n).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let len = 24;
    let updates: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..len).map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / norm.max(clip) * 0.999).collect()
        })
        .collect();
    let weights: Vec<u64> = (0..n as u64).map(|i| 40 + 97 * i).collect(); // the last ones clamp to 500
    let encoded: Vec<Vec<u64>> = updates.iter().zip(&weights).map(|(u, &w)| fp.encode(u, w, &mut rng).unwrap()).collect();
    let setup = RoundSetup::new(RoundId(7), params(7, 10, 7), FixedPoint::encoded_len(len)).unwrap();
    for (drops, seed) in [(vec![Drop::Never; n], 1), ([vec![Drop::Never; 8], vec![Drop::BeforeInput, Drop::BeforeUnmask]].concat(), 2)] {
        let out = run_round(setup, &encoded, &drops, seed).result.unwrap();
        // Exactly the plaintext sum of the quantized inputs of the sites in the sum.
        let in_sum = |i: usize| drops[i] != Drop::BeforeInput;
        assert_eq!(out.sum, plain_sum(&encoded, in_sum, 32));
        // And plain example-weighted FedAvg within the documented bound.
        let mean = fp.decode_mean(&out.sum).unwrap();
        let w: Vec<u64> = weights.iter().map(|&w| w.min(max_weight)).collect();
        let total: u64 = (0..n).filter(|&i| in_sum(i)).map(|i| w[i]).sum();
        assert_eq!(mean.total_weight, total);
        let bound = fp.mean_error_bound(out.survivors.len(), total);
        for (j, &got) in mean.values.iter().enumerate() {
            let exact: f64 = (0..n).filter(|&i| in_sum(i)).map(|i| updates[i][j] as f64 * w[i] as f64).sum::<f64>() / total as f64;
            let err = (got as f64 - exact).abs();
            assert!(err <= bound + exact.abs() * 2f64.powi(-23), "coordinate {j}: error {err} above {bound}");
        }
    }
}

#[test]
fn ten_sites_threshold_seven_survive_any_three_dropouts() {
    let n = 10;
    let setup = RoundSetup::new(RoundId(1), params(7, 10, 7), 8).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let inputs = random_inputs(n, 8, 32, &mut rng);
    // Exhaustively, every 3 of the 10 dropping after sharing keys and before their masked
    // input (the case that needs the dropped sites' mask keys reconstructed).
    let mut seed = 100;
    for a in 0..n {
        for b in a + 1..n {
            for c in b + 1..n {
                let mut drops = vec![Drop::Never; n];
                for i in [a, b, c] {
                    drops[i] = Drop::BeforeInput;
                }
                seed += 1;
                check_sum(setup, &inputs, &drops, seed);
            }
        }
    }
    // A seeded sample of 3 dropping at mixed steps (and some with fewer).
    let steps = [Drop::BeforeShares, Drop::BeforeInput, Drop::BeforeUnmask];
    for _ in 0..40 {
        let mut drops = vec![Drop::Never; n];
        let mut placed = 0;
        while placed < 3 {
            let i = (rng.next_u32() % n as u32) as usize;
            if drops[i] == Drop::Never {
                drops[i] = steps[(rng.next_u32() % 3) as usize];
                placed += 1;
            }
        }
        seed += 1;
        check_sum(setup, &inputs, &drops, seed);
    }
}

#[test]
fn ten_sites_threshold_seven_fail_with_four_dropouts_and_reveal_nothing() {
    let n = 10;
    let setup = RoundSetup::new(RoundId(2), params(7, 10, 7), 8).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let inputs = random_inputs(n, 8, 32, &mut rng);
    let steps = [Drop::BeforeShares, Drop::BeforeInput, Drop::BeforeUnmask];
    let mut cases: Vec<Vec<Drop>> = steps.iter().map(|&d| [vec![d; 4], vec![Drop::Never; 6]].concat()).collect();
    for _ in 0..12 {
        let mut drops = vec![Drop::Never; n];
        let mut placed = 0;
        while placed < 4 {
            let i = (rng.next_u32() % n as u32) as usize;
            if drops[i] == Drop::Never {
                drops[i] = steps[(rng.next_u32() % 3) as usize];
                placed += 1;
            }
        }
        cases.push(drops);
    }
    for (k, drops) in cases.iter().enumerate() {
        let out = run_round(setup, &inputs, drops, 900 + k as u64);
        let err = match out.result {
            Ok(_) => panic!("drops {drops:?}: a round with 6 of 10 sites at threshold 7 completed"),
            Err(e) => e,
        };
        // A clear reason: too few sites at a step, or too few shares of a named secret.
        match &err {
            SecAggError::TooFewSites { have, need: 7, .. } => assert!(*have < 7, "{err}"),
            SecAggError::NotEnoughShares { have, need: 7, .. } => assert_eq!(*have, 6, "{err}"),
            other => panic!("drops {drops:?}: unexpected error {other}"),
        }
        out.transcript.assert_no_site_has_both_share_kinds();
        // Nothing more was revealed: no secret has t shares in the coordinator's hands.
        let mut count: BTreeMap<(&SiteId, bool), usize> = BTreeMap::new();
        for m in &out.transcript.unmasking {
            for r in &m.self_mask {
                *count.entry((&r.of, true)).or_default() += 1;
            }
            for r in &m.mask_key {
                *count.entry((&r.of, false)).or_default() += 1;
            }
        }
        assert!(count.values().all(|&c| c < 7), "drops {drops:?}: {count:?}");
    }
}

#[test]
fn secagg_plus_sparse_graph_sums_with_dropouts() {
    let n = 20;
    // k = 6: groups of 7, threshold 4.
    let setup = RoundSetup::new(RoundId(9), params(4, 6, 10), 16).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let inputs = random_inputs(n, 16, 32, &mut rng);
    let tr = check_sum(setup, &inputs, &[Drop::Never; 20], 1);
    // Each site sent shares to its 6 neighbours only.
    assert!(tr.shares.iter().all(|s| s.shares.len() == 6));
    let mut drops = vec![Drop::Never; n];
    drops[3] = Drop::BeforeInput;
    drops[11] = Drop::BeforeUnmask;
    drops[17] = Drop::BeforeShares;
    check_sum(setup, &inputs, &drops, 2);
}

#[test]
fn full_modulus_and_three_hospitals() {
    let setup = RoundSetup::new(RoundId(4), SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 64 }, 5).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let inputs = random_inputs(3, 5, 64, &mut rng);
    check_sum(setup, &inputs, &[Drop::Never; 3], 1);
    check_sum(setup, &inputs, &[Drop::Never, Drop::BeforeInput, Drop::Never], 2);
    check_sum(setup, &inputs, &[Drop::BeforeUnmask, Drop::Never, Drop::Never], 3);
}

/// Pearson's chi-square statistic of `counts` against a uniform expectation.
fn chi_square(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let e = total as f64 / counts.len() as f64;
    counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
}

#[test]
fn a_curious_coordinator_sees_uniform_vectors_and_cannot_reconstruct_below_threshold() {
    // The inputs are as far from uniform as can be: all zero for one site, all 2^31 - 1
    // (the top of the positive range) for the others.
    let len = 4096;
    let setup = RoundSetup::new(RoundId(5), SecAggParams { threshold: 3, min_sites: 3, neighbours: 4, modulus_bits: 32 }, len).unwrap();
    let inputs = vec![vec![0u64; len], vec![(1 << 31) - 1; len], vec![(1 << 31) - 1; len], vec![(1 << 31) - 1; len]];
    let out = run_round(setup, &inputs, &[Drop::Never; 4], 77);
    let sum = out.result.unwrap().sum;
    assert_eq!(sum, plain_sum(&inputs, |_| true, 32));
    let tr = out.transcript;
    // Chi-square with 16 buckets (15 degrees of freedom) on the low 4 bits and on the top
    // 4 bits of each site's masked vector: below 37.70, the 0.1% critical value. The seed
    // is fixed, so the test is deterministic; with a uniform vector it would fail one seed
    // in a thousand, and a zero or constant input unmasked fails it by orders of magnitude.
    const CRITICAL: f64 = 37.70;
    for m in &tr.masked {
        let mut low = [0u64; 16];
        let mut high = [0u64; 16];
        for &v in &m.values {
            low[(v & 15) as usize] += 1;
            high[(v >> 28) as usize] += 1;
        }
        assert!(chi_square(&low) < CRITICAL, "{}: low bits chi-square {}", m.from, chi_square(&low));
        assert!(chi_square(&high) < CRITICAL, "{}: high bits chi-square {}", m.from, chi_square(&high));
    }
    // The statistic does detect structure: the unmasked inputs fail it.
    let mut zeros = [0u64; 16];
    zeros[0] = len as u64;
    assert!(chi_square(&zeros) > 1000.0 * CRITICAL);
    // Below the threshold the revealed shares do not reconstruct a self-mask seed: the t
    // revealed shares of site 0's seed give one value, any t - 1 of them another.
    let site0 = consortium().sites[0].site();
    let mut points = Vec::new();
    for m in &tr.unmasking {
        let x = consortium().sites.iter().position(|c| c.site() == &m.from).unwrap() as u32 + 1;
        for r in m.self_mask.iter().filter(|r| &r.of == site0) {
            points.push((x, client::scalar(&r.share).unwrap()));
        }
    }
    assert_eq!(points.len(), 4);
    let secret = shamir::reconstruct(&points[..3], 3).unwrap();
    assert_eq!(shamir::reconstruct(&points, 3).unwrap(), secret);
    for skip in 0..3 {
        let two: Vec<_> = points[..3].iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, p)| *p).collect();
        assert!(matches!(shamir::reconstruct(&two, 3), Err(shamir::ShamirError::TooFew { have: 2, need: 3 })));
        assert_ne!(shamir::reconstruct(&two, 2).unwrap(), secret);
    }
}

/// Sites' clients for `n` sites after advertising, with the relayed keys.
fn advertised(setup: RoundSetup, n: usize, seed: u64) -> (Vec<SecAggClient>, Vec<SignedKeys>, ChaCha20Rng) {
    let c = consortium();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let clients: Vec<SecAggClient> =
        c.sites[..n].iter().map(|cr| SecAggClient::new(setup, cr.clone(), c.trust.clone(), &mut rng).unwrap()).collect();
    let keys = clients.iter().map(SecAggClient::advertise_keys).collect();
    (clients, keys, rng)
}

fn assert_all_abort(clients: &mut [SecAggClient], keys: &[SignedKeys], rng: &mut ChaCha20Rng, victim: &SiteId, what: &str) {
    for cl in clients.iter_mut() {
        let err = cl.receive_keys(keys, now(), rng).expect_err(what);
        let expected = if cl.site() == victim {
            matches!(err, SecAggError::OwnKeysAltered)
        } else {
            matches!(&err, SecAggError::BadKeys { site, .. } if site == victim) || matches!(err, SecAggError::WrongRound { .. })
        };
        assert!(expected, "{what}: {} got {err}", cl.site());
        // And the site's round is over.
        assert!(matches!(cl.receive_keys(keys, now(), rng), Err(SecAggError::Aborted)));
    }
}

#[test]
fn a_substituted_public_key_is_detected_and_the_sites_abort() {
    let setup = RoundSetup::new(RoundId(6), params(2, 2, 3), 4).unwrap();
    let c = consortium();
    let victim = c.sites[1].site().clone();
    let mut own = [0u8; 32];
    ChaCha20Rng::seed_from_u64(99).fill_bytes(&mut own);
    let coordinator_pk = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(own)).to_bytes();

    // The coordinator swaps in its own mask key, keeping the victim's signature.
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 1);
    keys[1].mask_pk = coordinator_pk;
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "swapped mask key");

    // ... or its own cipher key.
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 2);
    keys[1].cipher_pk = coordinator_pk;
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "swapped cipher key");

    // ... with a valid signature by another site's certificate (a colluding site 2 signs
    // the coordinator's keys under the victim's name).
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 3);
    let colluder = &c.sites[2];
    let stmt = crypto::keys_statement(&setup, &victim, &keys[1].cipher_pk, &coordinator_pk);
    keys[1] = SignedKeys {
        mask_pk: coordinator_pk,
        cert_chain: colluder.chain().to_vec(),
        signature: colluder.sign(&stmt).unwrap(),
        ..keys[1].clone()
    };
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "signed by another site");

    // ... with a certificate for the victim's name from a CA that is not the consortium's.
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 4);
    let start = OffsetDateTime::from_unix_timestamp(T0).unwrap();
    let rogue_ca = pki::create_ca("rogue", Validity::days_from(start, 30), [9; 16]).unwrap();
    let rogue = issue(&rogue_ca, victim.as_str(), 50);
    let stmt = crypto::keys_statement(&setup, &victim, &keys[1].cipher_pk, &coordinator_pk);
    keys[1] = SignedKeys {
        mask_pk: coordinator_pk,
        cert_chain: rogue.chain().to_vec(),
        signature: rogue.sign(&stmt).unwrap(),
        ..keys[1].clone()
    };
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "rogue CA");

    // ... or replays the victim's keys from another round.
    let other = RoundSetup::new(RoundId(5), params(2, 2, 3), 4).unwrap();
    let (_, old_keys, _) = advertised(other, 3, 5);
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 6);
    keys[1] = old_keys[1].clone();
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "replayed round");
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 7);
    keys[1] = SignedKeys { round: setup.round, ..old_keys[1].clone() };
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "replayed round relabelled");

    // ... or replays them from the same round of another federation (another context).
    let (_, foreign, _) = advertised(setup.with_context([7; 32]), 3, 10);
    let (mut clients, mut keys, mut rng) = advertised(setup, 3, 11);
    keys[1] = foreign[1].clone();
    assert_all_abort(&mut clients, &keys, &mut rng, &victim, "another federation's round");

    // An untouched list goes through.
    let (mut clients, keys, mut rng) = advertised(setup, 3, 8);
    for cl in &mut clients {
        cl.receive_keys(&keys, now(), &mut rng).unwrap();
    }
    // An expired certificate does not (checked at the `now` passed in).
    let (mut clients, keys, mut rng) = advertised(setup, 3, 9);
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(T0 as u64 + 40 * 86_400));
    assert!(matches!(clients[0].receive_keys(&keys, later, &mut rng), Err(SecAggError::BadKeys { .. })));
    let _ = &c.ca;
}

/// A bad message and the error it must get.
type Case<M> = (M, fn(&SecAggError) -> bool);

#[test]
fn malformed_messages_get_typed_errors() {
    let setup = RoundSetup::new(RoundId(8), params(2, 2, 3), 4).unwrap();
    let c = consortium();
    let (s0, s1, s2) = (c.sites[0].site().clone(), c.sites[1].site().clone(), c.sites[2].site().clone());
    let stranger = c.sites[5].site().clone();
    let (mut clients, keys, mut rng) = advertised(setup, 3, 1);
    let mut server = SecAggServer::new(setup, consortium().trust.clone()).unwrap();

    // Keys: wrong sender, wrong round, oversized fields, duplicates.
    assert!(matches!(server.handle_keys(&s1, keys[0].clone(), now()), Err(SecAggError::WrongSender { .. })));
    assert!(matches!(
        server.handle_keys(&s0, SignedKeys { round: RoundId(9), ..keys[0].clone() }, now()),
        Err(SecAggError::WrongRound { .. })
    ));
    assert!(matches!(
        server.handle_keys(&s0, SignedKeys { signature: vec![0; 500], ..keys[0].clone() }, now()),
        Err(SecAggError::Malformed { .. })
    ));
    assert!(matches!(
        server.handle_keys(&s0, SignedKeys { cert_chain: vec![vec![0; 10]; 9], ..keys[0].clone() }, now()),
        Err(SecAggError::Malformed { .. })
    ));
    assert!(matches!(
        server.handle_keys(&s0, SignedKeys { cert_chain: vec![], ..keys[0].clone() }, now()),
        Err(SecAggError::Malformed { .. })
    ));
    // The server verifies as the sites will: a forged key or signature is refused.
    assert!(matches!(server.handle_keys(&s0, SignedKeys { mask_pk: [9; 32], ..keys[0].clone() }, now()), Err(SecAggError::BadKeys { .. })));
    assert!(matches!(
        server.handle_keys(&s0, SignedKeys { signature: vec![1; 70], ..keys[0].clone() }, now()),
        Err(SecAggError::BadKeys { .. })
    ));
    for k in &keys {
        server.handle_keys(&k.site, k.clone(), now()).unwrap();
    }
    assert!(matches!(server.handle_keys(&s0, keys[0].clone(), now()), Err(SecAggError::Duplicate(_))));
    assert!(matches!(server.close_shares(), Err(SecAggError::OutOfOrder(_))));
    // Sites refuse duplicated or truncated key lists.
    let mut dup = keys.clone();
    dup.push(keys[2].clone());
    assert!(matches!(clients[0].receive_keys(&dup, now(), &mut rng), Err(SecAggError::Duplicate(_))));
    let (mut clients2, keys2, mut rng2) = advertised(setup, 3, 2);
    assert!(matches!(clients2[0].receive_keys(&keys2[..2], now(), &mut rng2), Err(SecAggError::TooFewSites { step: Step::Keys, .. })));
    assert!(matches!(clients2[1].receive_keys(&keys2[1..], now(), &mut rng2), Err(SecAggError::TooFewSites { .. })));
    let (mut clients, keys, mut rng) = advertised(setup, 3, 3);
    let mut server = SecAggServer::new(setup, consortium().trust.clone()).unwrap();
    for k in &keys {
        server.handle_keys(&k.site, k.clone(), now()).unwrap();
    }
    let relayed_keys = server.close_keys().unwrap();
    let shares: Vec<EncryptedShares> = clients.iter_mut().map(|cl| cl.receive_keys(&relayed_keys, now(), &mut rng).unwrap()).collect();

    // Shares: for self, unknown recipient, duplicate recipient, wrong length, missing one.
    let with = |f: &dyn Fn(&mut EncryptedShares)| {
        let mut s = shares[0].clone();
        f(&mut s);
        s
    };
    let cases: Vec<Case<EncryptedShares>> = vec![
        (with(&|s| s.shares[0].to = s0.clone()), |e| matches!(e, SecAggError::ShareForSelf(_))),
        (with(&|s| s.shares[0].to = stranger.clone()), |e| matches!(e, SecAggError::UnknownSite(_))),
        (with(&|s| s.shares[1] = s.shares[0].clone()), |e| matches!(e, SecAggError::Duplicate(_))),
        (
            with(&|s| {
                s.shares[0].ciphertext.pop();
            }),
            |e| matches!(e, SecAggError::Malformed { .. }),
        ),
        (with(&|s| drop(s.shares.pop())), |e| matches!(e, SecAggError::Malformed { .. })),
        (with(&|s| s.shares[0].from = s1.clone()), |e| matches!(e, SecAggError::WrongSender { .. })),
        (with(&|s| s.round = RoundId(1)), |e| matches!(e, SecAggError::WrongRound { .. })),
    ];
    for (msg, ok) in cases {
        let err = server.handle_shares(&s0, msg.clone()).unwrap_err();
        assert!(ok(&err), "{msg:?}: {err}");
    }
    assert!(matches!(server.handle_shares(&stranger, shares[0].clone()), Err(SecAggError::UnknownSite(_))));
    for s in &shares {
        server.handle_shares(&s.from, s.clone()).unwrap();
    }
    assert!(matches!(server.handle_shares(&s0, shares[0].clone()), Err(SecAggError::Duplicate(_))));
    let relayed = server.close_shares().unwrap();

    // Sites refuse bad relayed shares: each case on a fresh copy of the round's clients.
    let bad_relays: Vec<Case<RelayedShares>> = {
        let r = relayed[&s0].clone();
        let mut dup = r.clone();
        dup.shares.push(r.shares[0].clone());
        let mut selfish = r.clone();
        selfish.shares[0].from = s0.clone();
        let mut unknown = r.clone();
        unknown.shares[0].from = stranger.clone();
        let mut tampered = r.clone();
        tampered.shares[0].ciphertext[3] ^= 1;
        let mut misaddressed = r.clone();
        misaddressed.to = s1.clone();
        let mut short = r.clone();
        short.shares[0].ciphertext.truncate(10);
        vec![
            (dup, |e| matches!(e, SecAggError::Duplicate(_))),
            (selfish, |e| matches!(e, SecAggError::ShareForSelf(_))),
            (unknown, |e| matches!(e, SecAggError::UnknownSite(_))),
            (tampered, |e| matches!(e, SecAggError::Decrypt(_))),
            (misaddressed, |e| matches!(e, SecAggError::WrongSender { .. })),
            (short, |e| matches!(e, SecAggError::Malformed { .. })),
        ]
    };
    for (k, (msg, ok)) in bad_relays.into_iter().enumerate() {
        let (mut cls, ks, mut r) = advertised(setup, 3, 3);
        let _ = cls[0].receive_keys(&ks, now(), &mut r).unwrap();
        let err = cls[0].receive_shares(&msg).unwrap_err();
        assert!(ok(&err), "case {k}: {err}");
        assert!(matches!(cls[0].masked_input(&[0; 4]), Err(SecAggError::Aborted)));
    }

    // Masked inputs: wrong length, out of range, from outside U2, duplicate; and the
    // client refuses the same.
    for cl in clients.iter_mut() {
        cl.receive_shares(&relayed[cl.site()]).unwrap();
    }
    let masked: Vec<MaskedInput> = clients.iter_mut().map(|cl| cl.masked_input(&[1, 2, 3, 4]).unwrap()).collect();
    let m = masked[0].clone();
    assert!(matches!(server.handle_masked_input(&s0, MaskedInput { values: vec![0; 3], ..m.clone() }), Err(SecAggError::Malformed { .. })));
    assert!(matches!(
        server.handle_masked_input(&s0, MaskedInput { values: vec![1 << 40; 4], ..m.clone() }),
        Err(SecAggError::Malformed { .. })
    ));
    assert!(matches!(server.handle_masked_input(&stranger, m.clone()), Err(SecAggError::UnknownSite(_))));
    assert!(matches!(server.handle_masked_input(&s1, m.clone()), Err(SecAggError::WrongSender { .. })));
    for m in &masked {
        server.handle_masked_input(&m.from, m.clone()).unwrap();
    }
    assert!(matches!(server.handle_masked_input(&s0, m), Err(SecAggError::Duplicate(_))));
    let req = server.close_masked_inputs().unwrap();

    // Unmasking requests a site refuses: a site named both survivor and dropped, unknown
    // or duplicate sites, a neighbour left out; each aborts that site for good.
    let refusals: Vec<Case<UnmaskRequest>> = vec![
        (UnmaskRequest { dropped: vec![s1.clone()], ..req.clone() }, |e| matches!(e, SecAggError::BothShareKinds(_))),
        (UnmaskRequest { survivors: vec![s0.clone(), s1.clone(), stranger.clone()], ..req.clone() }, |e| {
            matches!(e, SecAggError::UnknownSite(_))
        }),
        (UnmaskRequest { survivors: vec![s0.clone(), s0.clone(), s1.clone(), s2.clone()], ..req.clone() }, |e| {
            matches!(e, SecAggError::Duplicate(_))
        }),
        (UnmaskRequest { survivors: vec![s0.clone(), s1.clone()], ..req.clone() }, |e| matches!(e, SecAggError::Malformed { .. })),
        (UnmaskRequest { survivors: vec![s1.clone(), s2.clone()], dropped: vec![s0.clone()], ..req.clone() }, |e| {
            matches!(e, SecAggError::Malformed { .. })
        }),
    ];
    for (k, (r, ok)) in refusals.into_iter().enumerate() {
        let (mut cls, ks, mut rr) = advertised(setup, 3, 40 + k as u64);
        let mut srv = SecAggServer::new(setup, consortium().trust.clone()).unwrap();
        for kk in &ks {
            srv.handle_keys(&kk.site, kk.clone(), now()).unwrap();
        }
        let rk = srv.close_keys().unwrap();
        for cl in cls.iter_mut() {
            let s = cl.receive_keys(&rk, now(), &mut rr).unwrap();
            srv.handle_shares(&s.from.clone(), s).unwrap();
        }
        let rel = srv.close_shares().unwrap();
        for cl in cls.iter_mut() {
            cl.receive_shares(&rel[cl.site()]).unwrap();
            cl.masked_input(&[0; 4]).unwrap();
        }
        let err = cls[0].unmask(&r).unwrap_err();
        assert!(ok(&err), "case {k}: {err}");
        // Refused for good: a corrected request gets nothing either.
        let good = UnmaskRequest { round: setup.round, survivors: vec![s0.clone(), s1.clone(), s2.clone()], dropped: vec![] };
        assert!(matches!(cls[0].unmask(&good), Err(SecAggError::Aborted)));
    }

    // A site answers once: a second request (even a different one) is refused.
    let answers: Vec<UnmaskingShares> = clients.iter_mut().map(|cl| cl.unmask(&req).unwrap()).collect();
    assert!(matches!(
        clients[0].unmask(&UnmaskRequest { survivors: vec![s0.clone(), s2.clone()], dropped: vec![s1.clone()], ..req.clone() }),
        Err(SecAggError::OutOfOrder(_))
    ));
    // Unmasking shares: not asked for, duplicate, non-canonical, missing.
    let a = answers[0].clone();
    let mut extra = a.clone();
    extra.mask_key.push(RevealedShare { of: s1.clone(), share: [0; 32] });
    let mut dup = a.clone();
    dup.self_mask.push(a.self_mask[0].clone());
    let mut noncanonical = a.clone();
    noncanonical.self_mask[0].share = [0xff; 32];
    let mut missing = a.clone();
    missing.self_mask.pop();
    assert!(matches!(server.handle_unmasking(&s0, extra), Err(SecAggError::Malformed { .. })));
    assert!(matches!(server.handle_unmasking(&s0, dup), Err(SecAggError::Duplicate(_))));
    assert!(matches!(server.handle_unmasking(&s0, noncanonical), Err(SecAggError::Malformed { .. })));
    assert!(matches!(server.handle_unmasking(&s0, missing), Err(SecAggError::Malformed { .. })));
    assert!(matches!(server.handle_unmasking(&stranger, a.clone()), Err(SecAggError::UnknownSite(_))));
    // A forged share (canonical but wrong) is caught when more than t shares arrive.
    let mut forged = answers[2].clone();
    forged.self_mask[0].share = (client::scalar(&forged.self_mask[0].share).unwrap() + curve25519_dalek::scalar::Scalar::ONE).to_bytes();
    server.handle_unmasking(&s0, answers[0].clone()).unwrap();
    server.handle_unmasking(&s1, answers[1].clone()).unwrap();
    server.handle_unmasking(&s2, forged).unwrap();
    assert!(matches!(server.finish(), Err(SecAggError::InconsistentShares { kind: ShareKind::SelfMask, .. })));
}

#[test]
fn messages_round_trip_through_bincode() {
    let setup = RoundSetup::new(RoundId(3), params(2, 2, 3), 4).unwrap();
    let inputs = vec![vec![1, 2, 3, 4]; 3];
    let out = run_round(setup, &inputs, &[Drop::Never; 3], 1);
    out.result.unwrap();
    fn rt<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(v, cfg).unwrap();
        let (back, used): (T, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(&back, v);
        assert_eq!(used, bytes.len());
    }
    let tr = out.transcript;
    rt(&tr.keys[0]);
    rt(&tr.shares[0]);
    rt(&tr.masked[0]);
    rt(&tr.unmasking[0]);
    rt(&UnmaskRequest { round: RoundId(3), survivors: vec![consortium().sites[0].site().clone()], dropped: vec![] });
    rt(&setup);
}

#[test]
fn parameters_are_validated() {
    let ok = params(7, 10, 7);
    ok.validate().unwrap();
    for bad in [
        SecAggParams { modulus_bits: 8, ..ok },
        SecAggParams { modulus_bits: 65, ..ok },
        SecAggParams { neighbours: 9, ..ok },
        SecAggParams { neighbours: 0, ..ok },
        SecAggParams { threshold: 1, ..ok },
        SecAggParams { threshold: 12, ..ok },
        // Half a group or less: two disjoint sets of t could reveal both kinds.
        SecAggParams { threshold: 5, ..ok },
        SecAggParams { min_sites: 6, ..ok },
    ] {
        assert!(matches!(bad.validate(), Err(SecAggError::Params(_))), "{bad:?}");
    }
    assert!(RoundSetup::new(RoundId(1), ok, 0).is_err());
    let setup = RoundSetup::new(RoundId(1), ok, 3).unwrap();
    assert_ne!(setup.digest(), setup.with_context([1; 32]).digest());
    assert_ne!(RoundSetup::new(RoundId(1), ok, 3).unwrap().digest(), RoundSetup::new(RoundId(1), ok, 4).unwrap().digest());
}

#[test]
fn a_coordinator_telling_two_stories_cannot_collect_both_share_kinds() {
    // n = 10, t = 7. Every site sends its masked input, but the coordinator tells sites 0-4
    // that site 9 dropped (asking for its mask-key shares) and sites 5-9 that it survived
    // (asking for its self-mask shares), hoping to learn both and unmask site 9's input.
    let n = 10;
    let setup = RoundSetup::new(RoundId(12), params(7, 10, 7), 4).unwrap();
    let c = consortium();
    let (mut clients, keys, mut rng) = advertised(setup, n, 12);
    let mut server = SecAggServer::new(setup, consortium().trust.clone()).unwrap();
    for k in &keys {
        server.handle_keys(&k.site, k.clone(), now()).unwrap();
    }
    let relayed_keys = server.close_keys().unwrap();
    for cl in clients.iter_mut() {
        let s = cl.receive_keys(&relayed_keys, now(), &mut rng).unwrap();
        server.handle_shares(&s.from.clone(), s).unwrap();
    }
    let relayed = server.close_shares().unwrap();
    for cl in clients.iter_mut() {
        cl.receive_shares(&relayed[cl.site()]).unwrap();
        cl.masked_input(&[5; 4]).unwrap();
    }
    let target = c.sites[9].site().clone();
    let everyone: Vec<SiteId> = c.sites[..n].iter().map(|s| s.site().clone()).collect();
    let story_dropped = UnmaskRequest {
        round: setup.round,
        survivors: everyone.iter().filter(|s| **s != target).cloned().collect(),
        dropped: vec![target.clone()],
    };
    let story_survived = UnmaskRequest { round: setup.round, survivors: everyone.clone(), dropped: vec![] };
    let mut b_shares = 0;
    let mut s_shares = 0;
    for (i, cl) in clients.iter_mut().enumerate() {
        let story = if i < 5 { &story_dropped } else { &story_survived };
        // Every site answers its story (the target was told it survived).
        match cl.unmask(story) {
            Ok(u) => {
                b_shares += u.self_mask.iter().filter(|r| r.of == target).count();
                s_shares += u.mask_key.iter().filter(|r| r.of == target).count();
            }
            Err(e) => panic!("{}: {e}", cl.site()),
        }
        // And no second story is answered.
        assert!(cl.unmask(&story_survived).is_err());
    }
    // Each site revealed one kind for the target, so the two counts add up to at most the
    // group (10), and with 2t > 10 at most one of them can reach t.
    assert_eq!((b_shares, s_shares), (5, 5));
    assert!(b_shares < 7 && s_shares < 7);
}

#[test]
fn a_site_with_bad_keys_is_left_out_and_the_round_goes_on() {
    let setup = RoundSetup::new(RoundId(13), params(3, 4, 3), 3).unwrap();
    let c = consortium();
    let (mut clients, mut keys, mut rng) = advertised(setup, 4, 13);
    keys[3].signature[10] ^= 1;
    let mut server = SecAggServer::new(setup, c.trust.clone()).unwrap();
    for k in &keys {
        let r = server.handle_keys(&k.site, k.clone(), now());
        assert_eq!(r.is_err(), k.site == keys[3].site, "{}", k.site);
    }
    let relayed_keys = server.close_keys().unwrap();
    assert_eq!(relayed_keys.len(), 3);
    clients.truncate(3);
    for cl in clients.iter_mut() {
        let s = cl.receive_keys(&relayed_keys, now(), &mut rng).unwrap();
        server.handle_shares(&s.from.clone(), s).unwrap();
    }
    let relayed = server.close_shares().unwrap();
    for (i, cl) in clients.iter_mut().enumerate() {
        cl.receive_shares(&relayed[cl.site()]).unwrap();
        let m = cl.masked_input(&[i as u64, 10, 1 << 31]).unwrap();
        server.handle_masked_input(&m.from.clone(), m).unwrap();
    }
    let req = server.close_masked_inputs().unwrap();
    for cl in clients.iter_mut() {
        let u = cl.unmask(&req).unwrap();
        server.handle_unmasking(&u.from.clone(), u).unwrap();
    }
    let out = server.finish().unwrap();
    assert_eq!(out.sum, vec![3, 30, (3u64 << 31) & 0xffff_ffff]);
    assert_eq!(out.survivors.len(), 3);
}

/// `msg` with `flips` random bytes of its bincode encoding changed, if it still decodes.
fn mutate<T: serde::Serialize + serde::de::DeserializeOwned>(msg: &T, flips: usize, rng: &mut ChaCha20Rng) -> Option<T> {
    let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
    let mut bytes = bincode::serde::encode_to_vec(msg, cfg).unwrap();
    for _ in 0..flips {
        let i = (rng.next_u32() as usize) % bytes.len();
        bytes[i] = rng.next_u32() as u8;
    }
    bincode::serde::decode_from_slice(&bytes, cfg).ok().map(|(m, _)| m)
}

#[test]
fn mutated_messages_never_panic_and_accepted_shares_keep_the_sum() {
    // One honest round of three sites, recorded; then each recorded message, with random
    // bytes changed, is fed to a server (or site) replayed to that step. Every handler must
    // return (an error or, if the change was harmless, success) without panicking, and a
    // round finished with an accepted mutated message still sums right or fails typed.
    let setup = RoundSetup::new(RoundId(14), params(2, 2, 3), 3).unwrap();
    let c = consortium();
    let inputs = vec![vec![1, 2, 3], vec![10, 20, 30], vec![100, 200, 300]];
    let expected = plain_sum(&inputs, |_| true, 32);
    let honest = run_round(setup, &inputs, &[Drop::Never; 3], 1);
    assert_eq!(honest.result.unwrap().sum, expected);
    let tr = honest.transcript;
    let mut rng = ChaCha20Rng::seed_from_u64(14);

    // The server, replayed to a step with the recorded messages, `skip` left out.
    let server_at = |step: Step, skip: Option<usize>| {
        let mut s = SecAggServer::new(setup, c.trust.clone()).unwrap();
        for k in &tr.keys {
            s.handle_keys(&k.site, k.clone(), now()).unwrap();
        }
        s.close_keys().unwrap();
        if step == Step::Shares {
            return s;
        }
        for m in &tr.shares {
            s.handle_shares(&m.from, m.clone()).unwrap();
        }
        s.close_shares().unwrap();
        if step == Step::MaskedInput {
            return s;
        }
        for m in &tr.masked {
            s.handle_masked_input(&m.from, m.clone()).unwrap();
        }
        s.close_masked_inputs().unwrap();
        for (i, m) in tr.unmasking.iter().enumerate() {
            if Some(i) != skip {
                s.handle_unmasking(&m.from, m.clone()).unwrap();
            }
        }
        s
    };
    let mut decoded = 0;
    for round in 0..60 {
        let flips = 1 + round % 3;
        let k = round % 3;
        if let Some(m) = mutate(&tr.keys[k], flips, &mut rng) {
            decoded += 1;
            let mut s = SecAggServer::new(setup, c.trust.clone()).unwrap();
            let _ = s.handle_keys(&tr.keys[k].site, m, now());
        }
        if let Some(m) = mutate(&tr.shares[k], flips, &mut rng) {
            decoded += 1;
            let mut s = server_at(Step::Shares, None);
            let _ = s.handle_shares(&tr.shares[k].from, m);
        }
        if let Some(m) = mutate(&tr.masked[k], flips, &mut rng) {
            decoded += 1;
            let mut s = server_at(Step::MaskedInput, None);
            let _ = s.handle_masked_input(&tr.masked[k].from, m);
        }
        if let Some(m) = mutate(&tr.unmasking[k], flips, &mut rng) {
            decoded += 1;
            let mut s = server_at(Step::Unmasking, Some(k));
            if s.handle_unmasking(&tr.unmasking[k].from, m).is_ok() {
                // Accepted shares were canonical and complete: the sum is right or the
                // forgery is caught by the consistency check.
                match s.finish() {
                    Ok(out) => assert_eq!(out.sum, expected),
                    Err(e) => assert!(matches!(e, SecAggError::InconsistentShares { .. }), "{e}"),
                }
            } else {
                // One response short: finishing fails or succeeds, without a panic.
                let _ = s.finish();
            }
        }
        // Sites: mutated relayed shares and unmasking requests.
        let (mut clients, keys, mut crng) = advertised(setup, 3, 1);
        let relayed: Vec<RelayedShares> = {
            let mut srv = SecAggServer::new(setup, c.trust.clone()).unwrap();
            for kk in &keys {
                srv.handle_keys(&kk.site, kk.clone(), now()).unwrap();
            }
            let rk = srv.close_keys().unwrap();
            for cl in clients.iter_mut() {
                let s = cl.receive_keys(&rk, now(), &mut crng).unwrap();
                srv.handle_shares(&s.from.clone(), s).unwrap();
            }
            srv.close_shares().unwrap().into_values().collect()
        };
        if let Some(m) = mutate(&relayed[k], flips, &mut rng) {
            decoded += 1;
            let _ = clients[k].receive_shares(&m);
        }
        let req = UnmaskRequest { round: setup.round, survivors: keys.iter().map(|k| k.site.clone()).collect(), dropped: vec![] };
        if let Some(m) = mutate(&req, flips, &mut rng) {
            decoded += 1;
            let cl = &mut clients[(k + 1) % 3];
            if cl.receive_shares(&relayed[(k + 1) % 3]).is_ok() && cl.masked_input(&[0; 3]).is_ok() {
                let _ = cl.unmask(&m);
            }
        }
    }
    // Most mutations still decode (they change values, not structure): the handlers did run.
    assert!(decoded > 150, "only {decoded} mutated messages decoded");
}

/// A rough cost figure, not a test: `FEDWARD_BENCH=1 cargo test -p fedward-shared --lib
/// secagg_throughput -- --nocapture` (ten sites, threshold 7, a 1M-value vector, one site
/// dropped before its masked input).
#[test]
fn secagg_throughput() {
    if std::env::var_os("FEDWARD_BENCH").is_none() {
        return;
    }
    let (n, len) = (10, 1 << 20);
    let setup = RoundSetup::new(RoundId(15), params(7, 10, 7), len).unwrap();
    let c = consortium();
    let (mut clients, keys, mut rng) = advertised(setup, n, 15);
    let mut server = SecAggServer::new(setup, c.trust.clone()).unwrap();
    let t = std::time::Instant::now();
    for k in &keys {
        server.handle_keys(&k.site, k.clone(), now()).unwrap();
    }
    let rk = server.close_keys().unwrap();
    for cl in clients.iter_mut() {
        let s = cl.receive_keys(&rk, now(), &mut rng).unwrap();
        server.handle_shares(&s.from.clone(), s).unwrap();
    }
    let relayed = server.close_shares().unwrap();
    let setup_secs = t.elapsed().as_secs_f64();
    let input = vec![7u64; len];
    let t = std::time::Instant::now();
    for cl in clients.iter_mut().take(n - 1) {
        cl.receive_shares(&relayed[cl.site()]).unwrap();
        let m = cl.masked_input(&input).unwrap();
        server.handle_masked_input(&m.from.clone(), m).unwrap();
    }
    let mask_secs = t.elapsed().as_secs_f64() / (n - 1) as f64;
    let req = server.close_masked_inputs().unwrap();
    for cl in clients.iter_mut().take(n - 1) {
        let u = cl.unmask(&req).unwrap();
        server.handle_unmasking(&u.from.clone(), u).unwrap();
    }
    let t = std::time::Instant::now();
    let out = server.finish().unwrap();
    let finish_secs = t.elapsed().as_secs_f64();
    assert!(out.sum.iter().all(|&v| v == 63));
    println!(
        "secagg n={n} len={len}: keys and shares (all sites) {setup_secs:.3} s, masking per site {mask_secs:.3} s, unmasking at the server {finish_secs:.3} s"
    );
}

#[test]
fn masks_applied_together_on_threads_are_the_masks_applied_one_by_one() {
    // `add_masks` seeks each generator to its thread's first coordinate and interleaves
    // the masks block by block; the sum must be exactly one `add_mask` per seed.
    let masks: Vec<([u8; 32], bool)> = (0..4u8).map(|i| ([i + 1; 32], i % 2 == 1)).collect();
    for len in [0, 1, 16_383, 16_385, 50_001] {
        let start: Vec<u64> = (0..len as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let mut want = start.clone();
        for (seed, negate) in &masks {
            crypto::add_mask(&mut want, *seed, *negate);
        }
        for threads in [1, 2, 3] {
            let mut got = start.clone();
            crypto::add_masks_with_threads(&mut got, &masks, threads);
            assert_eq!(got, want, "length {len}, {threads} threads");
        }
        let mut got = start.clone();
        crypto::add_masks(&mut got, &masks);
        assert_eq!(got, want, "length {len}, the machine's cores");
    }
    // And one mask is one ChaCha20 word per coordinate.
    let mut one = vec![5u64; 3];
    crypto::add_mask(&mut one, [9; 32], false);
    let mut prg = ChaCha20Rng::from_seed([9; 32]);
    assert_eq!(one, (0..3).map(|_| 5u64.wrapping_add(prg.next_u64())).collect::<Vec<_>>());
}
