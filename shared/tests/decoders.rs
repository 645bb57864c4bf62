//! Property tests of every decoder in `fedward-shared` that a peer or an operator can reach:
//! wire frames and messages, tensor manifests, safetensors checkpoints, configs, ledgers,
//! ledger keys, certificates and signing requests. Arbitrary bytes, and valid inputs with
//! bytes flipped, cut or spliced, give an error, never a panic, and never an allocation
//! beyond the limits the decoders declare: this test binary's allocator refuses to hold
//! more than [`MEMORY_CAP`] at once, and a refused allocation aborts the run.
//!
//! `FEDWARD_DECODER_CASES=100000 cargo test -p fedward-shared --test decoders --release`
//! is the long run; the default is a few hundred cases per decoder.

use std::alloc::System;
use std::path::Path;

use cap::Cap;
use proptest::prelude::*;
use proptest::test_runner::Config;

use fedward_shared::config::{AgentConfig, CoordinatorConfig};
use fedward_shared::ledger::{self, Body, Ledger, ReleaseRecord};
use fedward_shared::plan::{PrivacyPlan, Trainable, TrainingPlan};
use fedward_shared::secagg::{
    self, EncryptedShare, EncryptedShares, RelayedShares, RevealedShare, RoundSetup, SecAggParams, SignedKeys, UnmaskRequest,
    UnmaskingShares,
};
use fedward_shared::tensor::{Digest, Tensor, TensorSet, TensorSpec};
use fedward_shared::wire::{self, Hello, Message, PrivacyUsed, RoundId, RoundOffer, SiteId, UpdateHeader};
use fedward_shared::{audit, ledger_key, pki};

/// Far above what any decoder here needs for inputs of a few KiB (a frame is at most
/// 1 MiB), far below what trusting a declared length would take.
const MEMORY_CAP: usize = 256 << 20;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, MEMORY_CAP);

fn config() -> Config {
    let cases = std::env::var("FEDWARD_DECODER_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    // No regression files written into the source tree; a failure prints its input.
    Config { cases, failure_persistence: None, ..Config::default() }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// A valid input with some bytes overwritten, the tail cut, or a run of bytes spliced in.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len().max(1);
    (proptest::collection::vec((0..n, any::<u8>()), 1..8), 0..=n, bytes(16), 0..n).prop_map(move |(flips, cut, splice, at)| {
        let mut v = valid.clone();
        for (i, b) in flips {
            if let Some(x) = v.get_mut(i) {
                *x = b;
            }
        }
        v.truncate(cut.max(1));
        let at = at.min(v.len());
        v.splice(at..at, splice);
        v
    })
}

fn offer() -> Message {
    let mut model = TensorSet::new();
    model.insert("classifier.weight", Tensor::new(vec![4, 8], vec![0.5; 32]).unwrap());
    model.insert("classifier.bias", Tensor::new(vec![4], vec![0.0; 4]).unwrap());
    Message::RoundOffer(RoundOffer {
        scoring: None,
        round: RoundId(3),
        model_digest: model.digest(),
        manifest: model.specs(),
        plan: TrainingPlan {
            privacy: PrivacyPlan::RecordLevel { noise_multiplier: 1.1, clip_norm: 1.0, sampling_rate: 0.05, update_clip_norm: 5.0 },
            ..TrainingPlan::minimal(Trainable::Head, model.names().map(str::to_owned).collect())
        },
        policy: wire::PrivacyPolicy { mode: fedward_shared::plan::PrivacyMode::RecordLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 },
        deadline_secs: 600,
        total_rounds: 10,
        update_encoding: fedward_shared::codec::UpdateEncoding::Int8Row,
        secure: None,
    })
}

/// A secure offer and one frame of each secure aggregation step.
fn secure_frames() -> Vec<Message> {
    let Message::RoundOffer(mut offer) = offer() else { unreachable!() };
    let params = SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 48 };
    let context = wire::SecureRound::context(RoundId(3), 1, &offer.model_digest, 5.0, 1000, 3);
    offer.secure = Some(wire::SecureRound {
        setup: RoundSetup::new(RoundId(3), params, 37).unwrap().with_context(context),
        attempt: 1,
        clip: 5.0,
        max_weight: 1000,
        max_sites: 3,
        step_deadline_secs: 60,
    });
    let site = SiteId::new("st-marys").unwrap();
    let other = SiteId::new("st-johns").unwrap();
    let keys = SignedKeys {
        round: RoundId(3),
        site: site.clone(),
        cipher_pk: [1; 32],
        mask_pk: [2; 32],
        cert_chain: vec![vec![0x30; 300]],
        signature: vec![9; 71],
    };
    let share = EncryptedShare { from: site.clone(), to: other.clone(), ciphertext: vec![5; secagg::SHARE_CIPHERTEXT_LEN] };
    vec![
        Message::RoundOffer(offer),
        Message::SecAggKeys(keys.clone()),
        Message::SecAggRelayedKeys(wire::RelayedKeys { round: RoundId(3), keys: vec![keys] }),
        Message::SecAggShares(EncryptedShares { round: RoundId(3), from: site.clone(), shares: vec![share.clone()] }),
        Message::SecAggRelayedShares(RelayedShares { round: RoundId(3), to: other.clone(), shares: vec![share] }),
        Message::SecAggMasked(wire::MaskedInputHeader {
            round: RoundId(3),
            values: 37,
            digest: Digest([3; 32]),
            privacy: PrivacyUsed::off(),
        }),
        Message::SecAggUnmask(UnmaskRequest { round: RoundId(3), survivors: vec![site.clone()], dropped: vec![other] }),
        Message::SecAggUnmasking(UnmaskingShares {
            round: RoundId(3),
            from: site.clone(),
            self_mask: vec![RevealedShare { of: site, share: [7; 32] }],
            mask_key: vec![],
        }),
    ]
}

fn frames() -> Vec<u8> {
    let hello =
        Message::Hello(Hello { protocol_version: wire::PROTOCOL_VERSION, software: "fedward".into(), capabilities: vec![], budget: None });
    let update = Message::Update(UpdateHeader {
        score: None,
        round: RoundId(3),
        num_examples: 1750,
        metrics: Default::default(),
        tensors: vec![TensorSpec { name: "classifier.weight".into(), shape: vec![4, 8], digest: Digest([7; 32]) }],
        privacy: PrivacyUsed::off(),
        encoding: fedward_shared::codec::UpdateEncoding::Int8Row,
    });
    [hello, offer(), update].into_iter().chain(secure_frames()).flat_map(|m| wire::encode(&m).unwrap()).collect()
}

/// Decodes every frame in `buf` the way a stream reader would.
fn decode_all(mut buf: &[u8]) {
    while let Ok(Some((_, used))) = wire::decode(buf) {
        buf = &buf[used..];
    }
}

fn ledger_bytes() -> Vec<u8> {
    let mut l = Ledger::new();
    let now = time::macros::datetime!(2026-12-01 10:00 UTC);
    let site = SiteId::new("st-marys").unwrap();
    let used = PrivacyUsed {
        score: None,
        mode: fedward_shared::plan::PrivacyMode::RecordLevel,
        noise_multiplier: 1.1,
        clip_norm: 1.0,
        sampling_rate: 0.05,
        steps: 40,
        update_clip_norm: 5.0,
        epsilon_after: 1.2,
        delta: 1e-5,
        distributed: None,
    };
    for round in 1..=3 {
        let r = ReleaseRecord::new(site.clone(), RoundId(round), &used, 1750, 0.5, Digest([round as u8; 32]), now).unwrap();
        l.append(Body::Release(r)).unwrap();
    }
    l.to_bytes()
}

fn safetensors_bytes() -> Vec<u8> {
    let mut m = TensorSet::new();
    m.insert("w", Tensor::new(vec![2, 3], vec![1.0; 6]).unwrap());
    m.insert("b", Tensor::new(vec![3], vec![0.5; 3]).unwrap());
    m.to_safetensors(None).unwrap()
}

/// A safetensors header declaring `shape` over only 4 bytes of data.
fn lying_safetensors(shape: &[u64]) -> Vec<u8> {
    let header = format!(r#"{{"w":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,4]}}}}"#);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend([0u8; 4]);
    out
}

const COORDINATOR_TOML: &str = include_str!("../../deploy/config/coordinator.toml");
const AGENT_TOML: &str = include_str!("../../deploy/config/agent.toml");

proptest! {
    #![proptest_config(config())]

    #[test]
    fn wire_frames_from_arbitrary_bytes(b in bytes(4096)) {
        decode_all(&b);
        let _ = wire::decode_payload(&b);
        if b.len() >= 4 {
            let _ = wire::frame_len([b[0], b[1], b[2], b[3]]);
        }
    }

    #[test]
    fn wire_frames_from_damaged_valid_ones(b in mutated(frames())) {
        decode_all(&b);
        if b.len() > 4 {
            let _ = wire::decode_payload(&b[4..]);
        }
    }

    #[test]
    fn a_frame_declaring_any_length_is_checked_before_allocation(len in any::<u32>(), tail in bytes(64)) {
        let mut b = len.to_le_bytes().to_vec();
        b.extend(tail);
        decode_all(&b);
        prop_assert_eq!(wire::frame_len(len.to_le_bytes()).is_ok(), len as usize <= wire::MAX_FRAME_LEN);
    }

    #[test]
    fn tensor_manifests_are_bounded_before_allocation(
        specs in proptest::collection::vec(("[a-c]{1,2}", proptest::collection::vec(any::<usize>(), 0..5)), 0..6),
        small in proptest::collection::vec(0usize..64, 0..4),
    ) {
        let mut specs: Vec<TensorSpec> = specs.into_iter().map(|(name, shape)| TensorSpec { name, shape, digest: Digest([0; 32]) }).collect();
        specs.push(TensorSpec { name: "small".into(), shape: small, digest: Digest([0; 32]) });
        let limit = 16 << 20;
        if let Ok(total) = wire::declared_payload_bytes(&specs, limit) {
            prop_assert!(total <= limit);
            // What a reader allocates once the manifest passed.
            for s in &specs {
                let mut t = wire::alloc_tensor(s);
                prop_assert!(wire::finish_tensor(s, &mut t).is_err() || t.is_empty() || s.digest == t.digest());
            }
        }
    }

    #[test]
    fn masked_inputs_are_bounded_before_allocation(
        values in any::<u64>(),
        expected in 0usize..1 << 20,
        bits in 16u32..=64,
        tail in bytes(256),
    ) {
        let header = wire::MaskedInputHeader { round: RoundId(1), values, digest: Digest([0; 32]), privacy: PrivacyUsed::off() };
        let limit = 1 << 20;
        let width = wire::masked_value_width(bits);
        if let Ok(n) = header.payload_bytes(expected, width, limit) {
            prop_assert!(n <= limit && n == expected * width);
        }
        // Whatever bytes arrive, decoding refuses or gives whole values.
        if let Ok(v) = wire::masked_values_from_bytes(&header, width, &tail) {
            prop_assert_eq!(v.len() * width, tail.len());
        }
    }

    #[test]
    fn checkpoints_from_arbitrary_and_damaged_bytes(b in prop_oneof![bytes(2048), mutated(safetensors_bytes())]) {
        let _ = TensorSet::from_safetensors(&b, false);
        let _ = TensorSet::from_safetensors(&b, true);
    }

    #[test]
    fn a_checkpoint_header_cannot_make_the_reader_allocate_what_it_declares(shape in proptest::collection::vec(any::<u32>(), 0..4)) {
        let shape: Vec<u64> = shape.into_iter().map(u64::from).collect();
        let b = lying_safetensors(&shape);
        let decoded = TensorSet::from_safetensors(&b, false);
        prop_assert!(decoded.is_err() || shape.iter().product::<u64>() == 1);
    }

    #[test]
    fn configs_from_arbitrary_text(text in any::<String>()) {
        let _ = CoordinatorConfig::parse(&text, Path::new("/"));
        let _ = AgentConfig::parse(&text, Path::new("/"));
    }

    #[test]
    fn configs_from_damaged_examples(c in mutated(COORDINATOR_TOML.as_bytes().to_vec()), a in mutated(AGENT_TOML.as_bytes().to_vec())) {
        let _ = CoordinatorConfig::parse(&String::from_utf8_lossy(&c), Path::new("/"));
        let _ = AgentConfig::parse(&String::from_utf8_lossy(&a), Path::new("/"));
    }

    #[test]
    fn ledgers_from_arbitrary_and_damaged_bytes(b in prop_oneof![bytes(2048), mutated(ledger_bytes())]) {
        let key = ledger_key::parse_public_key("ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").ok();
        let _ = ledger::verify(&b, key.as_ref());
        let _ = audit::audit_ledger(&b, None, Some(1e-5));
    }

    #[test]
    fn keys_certificates_and_requests_from_arbitrary_text(text in any::<String>(), der in bytes(1024)) {
        let _ = ledger_key::parse_public_key(&text);
        let _ = ledger_key::parse_signing_key(&text);
        let _ = pki::pem_to_der(&text);
        let _ = pki::request_site_names(&text);
        let _ = pki::cert_info(&der);
        let _ = pki::site_of_cert(&der);
    }
}

/// The damaged inputs above start from inputs the decoders accept.
#[test]
fn the_valid_starting_points_decode() {
    let f = frames();
    let mut buf = &f[..];
    let mut n = 0;
    while let Some((_, used)) = wire::decode(buf).unwrap() {
        buf = &buf[used..];
        n += 1;
    }
    assert_eq!(n, 3 + secure_frames().len());
    assert_eq!(TensorSet::from_safetensors(&safetensors_bytes(), false).unwrap().len(), 2);
    assert!(ledger::verify(&ledger_bytes(), None).is_clean());
    CoordinatorConfig::parse(COORDINATOR_TOML, Path::new("/")).unwrap();
    AgentConfig::parse(AGENT_TOML, Path::new("/")).unwrap();
    assert!(TensorSet::from_safetensors(&lying_safetensors(&[1]), false).is_ok());
}
