//! End-to-end tests over real QUIC with mutual TLS on 127.0.0.1: federation rounds,
//! refusals, a coordinator crash and restart, a malformed update, an agent crash between
//! its ledger write and the send, and an update outside the privacy policy; `hostile`
//! holds the peers that misbehave on purpose.

use std::time::Duration;

use fedward_agent::daemon::{DaemonError, DaemonOutcome};
use fedward_coordinator::server::RunOutcome;
use fedward_coordinator::store::Store;
use fedward_shared::codec::UpdateEncoding;
use fedward_shared::config::ServerOptimizer;
use fedward_shared::ledger::Body;
use fedward_shared::pki::Validity;
use fedward_shared::plan::{PrivacyMode, PrivacyPlan};
use fedward_shared::tensor::TensorSet;
use fedward_shared::wire::{self, Message, PrivacyPolicy, Ready, RejectCode};
use fedward_tests::*;

mod hostile;

fn spec(dir: &std::path::Path, rounds: u64, min_sites: usize, sites: Vec<&'static str>) -> CoordinatorSpec {
    CoordinatorSpec {
        rounds,
        min_sites,
        deadline: Duration::from_secs(60),
        sites,
        state_dir: dir.join("coordinator"),
        addr: "127.0.0.1:0".parse().unwrap(),
        privacy: no_privacy().0,
        policy: no_privacy().1,
        aggregation: test_aggregation(),
        transport: test_transport(),
        admission: Default::default(),
        max_concurrent_uploads: 2,
        renewal: None,
        secure: None,
        selection: None,
    }
}

/// A hundred agents in one process against one coordinator: every round completes with
/// all of them, and the model is their weighted mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_agents_complete_their_rounds() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let sites: Vec<&'static str> = (0..100).map(|i| &*Box::leak(format!("site-{i:03}").into_boxed_str())).collect();
    let mut s = spec(dir.path(), 2, sites.len(), sites.clone());
    // One loopback address for a hundred sites: the per-address handshake limit is for
    // sites that each have their own.
    s.admission.max_handshakes_per_ip = s.admission.max_handshakes;
    // A hundred TLS handshakes of a debug build on two worker threads, beside the other
    // test binaries, can starve the first connections' keep-alives past the 3 s idle
    // timeout the liveness tests use; this test is about scale, so it waits longer.
    s.transport.idle_timeout = Duration::from_secs(30);
    let s_idle = s.transport.idle_timeout;
    let coord = CoordinatorHandle::start(&pki, s);
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let (trainer, sent) = ScriptedTrainer::new(0.001 * i as f32, 100 + i as u64);
        let mut opts = agent_options(coord.addr, pki.site_tls(site), &dir.path().join(site), 0);
        opts.transport.idle_timeout = s_idle;
        agents.push(spawn_agent(opts, trainer));
        logs.push(sent);
    }
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 2 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    assert_model_is_the_weighted_mean(&dir.path().join("coordinator"), 2, &logs);
}

/// Recomputes the global model from what the agents actually sent, round by round, and
/// compares it with the coordinator's last checkpoint (to f32 rounding: the coordinator
/// sums in f32, in arrival order).
fn assert_model_is_the_weighted_mean(state_dir: &std::path::Path, rounds: u64, logs: &[std::sync::Arc<std::sync::Mutex<Vec<Sent>>>]) {
    assert_model_is_the_weighted_mean_of(state_dir, rounds, logs, UpdateEncoding::F32);
}

/// As [`assert_model_is_the_weighted_mean`], of the updates as `encoding` quantized them.
fn assert_model_is_the_weighted_mean_of(
    state_dir: &std::path::Path,
    rounds: u64,
    logs: &[std::sync::Arc<std::sync::Mutex<Vec<Sent>>>],
    encoding: UpdateEncoding,
) {
    let history = Store::open(state_dir).unwrap().state().unwrap().history.clone();
    let mut expected = tiny_global();
    for round in 1..=rounds {
        let sent: Vec<Sent> = logs
            .iter()
            // The last update for the round: a round that failed (a site lost) and was
            // redone has an earlier one that the coordinator discarded.
            .map(|l| l.lock().unwrap().iter().rfind(|s| s.round.0 == round).cloned().expect("each agent sent each round"))
            .collect();
        // Every agent trained on the same global model, the one the coordinator built.
        let built = if round == 1 {
            tiny_global().digest().to_hex()
        } else {
            let sealed = history.iter().find(|r| r.round == round - 1 && r.model_digest.is_some()).expect("the previous round was sealed");
            sealed.model_digest.clone().unwrap()
        };
        assert!(sent.iter().all(|s| s.global_digest == built), "round {round}");
        let quantized: Vec<(u64, TensorSet)> = sent
            .iter()
            .map(|s| {
                let mut d = s.delta.clone();
                for (name, t) in d.iter_mut() {
                    encoding.quantize(name, t).unwrap();
                }
                (s.num_examples, d)
            })
            .collect();
        let updates: Vec<(u64, &_)> = quantized.iter().map(|(n, d)| (*n, d)).collect();
        apply_weighted_mean(&mut expected, &updates);
    }
    let store = Store::open(state_dir).unwrap();
    let (model, completed) = store.load_current().unwrap().unwrap();
    assert_eq!(completed, rounds);
    for (name, t) in model.iter() {
        let e = expected.get(name).unwrap();
        for (a, b) in t.data().iter().zip(e.data()) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}: {a} vs {b}");
        }
    }
}

/// A server optimiser between the sites' weighted mean and the model, through the real
/// server: with FedAvgM each checkpoint is the previous one plus `lr m`, `m = mu m + mean`,
/// recomputed here from what the agents sent; its state lies beside the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_momentum_moves_the_model_as_recomputed_from_the_updates() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let (lr, mu) = (0.5f64, 0.5f64);
    let mut s = spec(dir.path(), 3, 2, vec!["alpha", "beta"]);
    s.aggregation.server_optimizer = ServerOptimizer::FedAvgM { learning_rate: lr, momentum: mu };
    let coord = CoordinatorHandle::start(&pki, s);
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    for (i, (site, value, examples)) in [("alpha", 1.0, 100), ("beta", -2.0, 300)].into_iter().enumerate() {
        let (trainer, sent) = ScriptedTrainer::new(value, examples);
        let opts = agent_options(coord.addr, pki.site_tls(site), &dir.path().join(format!("agent-{i}")), 0);
        agents.push(spawn_agent(opts, trainer));
        logs.push(sent);
    }
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 3, rounds_trained: 3 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 3 });
    let mut expected = tiny_global();
    let mut momentum: Option<TensorSet> = None;
    for round in 1..=3 {
        let sent: Vec<Sent> = logs.iter().map(|l| l.lock().unwrap().iter().rfind(|s| s.round.0 == round).cloned().unwrap()).collect();
        let mut mean = sent[0].delta.clone();
        mean.iter_mut().for_each(|(_, t)| t.data_mut().fill(0.0));
        apply_weighted_mean(&mut mean, &sent.iter().map(|s| (s.num_examples, &s.delta)).collect::<Vec<_>>());
        let m = momentum.get_or_insert_with(|| {
            let mut zero = mean.clone();
            zero.iter_mut().for_each(|(_, t)| t.data_mut().fill(0.0));
            zero
        });
        for (name, t) in m.iter_mut() {
            let g = expected.get_mut(name).unwrap();
            for ((m, d), w) in t.data_mut().iter_mut().zip(mean.get(name).unwrap().data()).zip(g.data_mut()) {
                *m = (mu * f64::from(*m) + f64::from(*d)) as f32;
                *w += (lr * f64::from(*m)) as f32;
            }
        }
    }
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let (model, completed) = store.load_current().unwrap().unwrap();
    assert_eq!(completed, 3);
    for (name, t) in model.iter() {
        for (a, b) in t.data().iter().zip(expected.get(name).unwrap().data()) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name}: {a} vs {b}");
        }
    }
    let state = store.optimizer_state(3).unwrap().expect("the momentum is checkpointed");
    assert_eq!(state.m.names().collect::<Vec<_>>(), momentum.unwrap().names().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_two_rounds_global_model_is_the_weighted_mean() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 2, 3, vec!["alpha", "beta", "gamma"]));
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    for (i, (site, value, examples)) in [("alpha", 1.0, 100), ("beta", -2.0, 300), ("gamma", 0.5, 600)].into_iter().enumerate() {
        let (trainer, sent) = ScriptedTrainer::new(value, examples);
        let opts = agent_options(coord.addr, pki.site_tls(site), &dir.path().join(format!("agent-{i}")), 0);
        agents.push(spawn_agent(opts, trainer));
        logs.push(sent);
    }
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 2 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    // What `fedward-agent status` reads: finished, and the last update sent.
    let status: fedward_agent::status::DaemonStatus =
        serde_json::from_slice(&std::fs::read(dir.path().join("agent-0/status.json")).unwrap()).unwrap();
    assert_eq!(status.phase, fedward_agent::status::Phase::Finished);
    assert_eq!(status.last_update.as_ref().map(|u| u.round), Some(2));
    assert!(status.last_update.unwrap().mib > 0.0);

    assert_model_is_the_weighted_mean(&dir.path().join("coordinator"), 2, &logs);
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let (model, _) = store.load_current().unwrap().unwrap();
    // Every hospital holds the model the federation ended with (what its triage service
    // serves), not the one its last round started from.
    for i in 0..3 {
        let cache = std::fs::read(dir.path().join(format!("agent-{i}")).join(fedward_agent::state_dir::MODEL_CACHE)).unwrap();
        let cached = fedward_shared::tensor::TensorSet::from_safetensors(&cache, false).unwrap();
        assert_eq!(cached.digest(), model.digest(), "agent-{i} keeps a model older than the final one");
    }
    // Frozen tensors never moved.
    assert_eq!(model.get("bert.encoder.layer.0.output.dense.weight"), tiny_global().get("bert.encoder.layer.0.output.dense.weight"));
    let history = &store.state().unwrap().history;
    assert_eq!(history.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2]);
    assert!(history.iter().all(|r| r.sites.len() == 3));

    // The coordinator's ledger verifies with its public key: one accepted entry per site
    // per round, then one seal per round, every digest the one the site's update had.
    let (ledger_file, public) = ledger_paths(&dir.path().join("coordinator"));
    let key = fedward_shared::ledger_key::read_public_key(&public).unwrap();
    let bytes = std::fs::read(&ledger_file).unwrap();
    let audit = fedward_shared::audit::audit_ledger(&bytes, Some(&key), None);
    // These agents train without DP: the audit says so, and finds nothing wrong.
    assert!(audit.passed(), "{:?}", audit.findings);
    assert!(audit.findings.iter().all(|f| f.code == "no-privacy"), "{:?}", audit.findings);
    assert_eq!((audit.accepted, audit.seals, audit.seals_verified, audit.unsealed_tail), (6, 2, 2, 0));
    let mut kinds = Vec::new();
    for e in &audit.parsed {
        match &e.body {
            Body::Accepted(a) => {
                let record = history.iter().find(|r| r.round == a.round.0).unwrap();
                let site = record.sites.iter().find(|s| s.site == a.site.as_str()).unwrap();
                assert_eq!(site.update_digest, a.update_digest.to_hex(), "round {} site {}", a.round, a.site);
                assert_eq!(site.num_examples, a.examples);
                kinds.push(format!("accepted {} {}", a.round, a.site));
            }
            Body::Seal(s) => kinds.push(format!("seal {}", s.round)),
            Body::Release(_) => panic!("a release in the coordinator's ledger"),
            Body::SecureRound(_) => panic!("a secure-round entry for a round in the clear"),
        }
    }
    let (round1, round2) = kinds.split_at(4);
    for (part, round) in [(round1, 1), (round2, 2)] {
        let mut accepted: Vec<&String> = part[..3].iter().collect();
        accepted.sort();
        assert_eq!(accepted, [&format!("accepted {round} alpha"), &format!("accepted {round} beta"), &format!("accepted {round} gamma")]);
        assert_eq!(part[3], format!("seal {round}"));
    }
    // The auditor's command agrees.
    let args = fedward_shared::cli::VerifyArgs { ledger: ledger_file, public_key: Some(public), delta: None, json: false };
    let mut out = Vec::new();
    assert!(fedward_shared::cli::verify(&args, &mut out).unwrap(), "{}", String::from_utf8_lossy(&out));
}

/// Secure aggregation over real QUIC: three sites, threshold 2. Round 1 sums all three;
/// in round 2 gamma's agent is killed once it has trained (after its keys and shares, before
/// its masked input), and the round completes with alpha and beta, gamma's masks removed
/// with their shares. The model is the weighted mean of what was summed, to the
/// fixed-point encoding's precision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_rounds_sum_the_sites_and_survive_an_agent_killed_mid_round() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    // Every round starts with all three (quorum 3); threshold 2 lets one drop.
    let mut s = spec(dir.path(), 2, 3, vec!["alpha", "beta", "gamma"]);
    s.secure = Some(fedward_coordinator::round::SecureSettings {
        params: fedward_shared::secagg::SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 48 },
        step_deadline: Duration::from_secs(10),
        trust: pki.secagg_trust(),
    });
    let coord = CoordinatorHandle::start(&pki, s);
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    let mut gamma_gate = None;
    for (i, (site, value, examples)) in [("alpha", 0.1, 100), ("beta", -0.2, 300), ("gamma", 0.05, 600)].into_iter().enumerate() {
        let (trainer, sent) = ScriptedTrainer::new(value, examples);
        let (tls, identity) = pki.site_secure(site);
        let mut opts = agent_options(coord.addr, tls, &dir.path().join(format!("agent-{i}")), 0);
        opts.secagg = Some(identity);
        // Each site its own seeded stream (keys, masks, shares).
        opts.seed = Some(100 + i as u64);
        if site == "gamma" {
            let (gated, gate) = GatedTrainer::wrapping(trainer);
            gamma_gate = Some(gate);
            agents.push(spawn_agent(opts, gated));
        } else {
            agents.push(spawn_agent(opts, trainer));
        }
        logs.push(sent);
    }
    // gamma's agent dies while it trains round 2: its keys and shares went out before
    // training, its masked input never does.
    let gamma = agents.pop().unwrap();
    let mut gate = gamma_gate.take().unwrap();
    let watcher = tokio::spawn(async move {
        loop {
            let (round, waiting) = gate.started().await;
            if round.0 == 2 {
                gamma.abort();
                // The training thread, blocked on the gate, finishes into the void.
                waiting.open();
                return true;
            }
            waiting.open();
            gate = waiting;
        }
    });
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 2 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    assert!(watcher.await.unwrap(), "gamma was killed in round 2");
    // The reference: each round's weighted mean of the sites whose masked input was summed.
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let history = store.state().unwrap().history.clone();
    let mut expected = tiny_global();
    for round in 1..=2u64 {
        let record = history.iter().find(|r| r.round == round && r.model_digest.is_some()).expect("the round completed");
        let summed: Vec<&str> = record.sites.iter().map(|s| s.site.as_str()).collect();
        // Round 1 sums all three; round 2 the two survivors only.
        let expect: &[&str] = if round == 1 { &["alpha", "beta", "gamma"] } else { &["alpha", "beta"] };
        assert_eq!(summed, expect, "round {round}");
        let sent: Vec<Sent> = ["alpha", "beta", "gamma"]
            .iter()
            .zip(&logs)
            .filter(|(site, _)| summed.contains(site))
            .map(|(_, l)| l.lock().unwrap().iter().rfind(|s| s.round.0 == round).cloned().expect("sent"))
            .collect();
        let updates: Vec<(u64, &TensorSet)> = sent.iter().map(|s| (s.num_examples, &s.delta)).collect();
        apply_weighted_mean(&mut expected, &updates);
    }
    let (model, completed) = store.load_current().unwrap().unwrap();
    assert_eq!(completed, 2);
    for (name, t) in model.iter() {
        let e = expected.get(name).unwrap();
        for (a, b) in t.data().iter().zip(e.data()) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{name}: {a} vs {b}");
        }
    }
    // The coordinator's ledger records each secure round's sum, and every site's ledger
    // reconciles with it: alpha and beta were summed in both rounds, gamma in round 1
    // (killed while training round 2, it released nothing more).
    let (ledger_file, public) = ledger_paths(&dir.path().join("coordinator"));
    let key = fedward_shared::ledger_key::read_public_key(&public).unwrap();
    let coord_bytes = std::fs::read(&ledger_file).unwrap();
    let sums: Vec<(u64, Vec<String>, Vec<String>, u64)> = fedward_shared::ledger::verify(&coord_bytes, Some(&key))
        .entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::SecureRound(r) => Some((
                r.round.0,
                r.summed.iter().map(|s| s.to_string()).collect(),
                r.dropped.iter().map(|s| s.to_string()).collect(),
                r.total_weight,
            )),
            _ => None,
        })
        .collect();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(sums, vec![(1, names(&["alpha", "beta", "gamma"]), vec![], 1000), (2, names(&["alpha", "beta"]), names(&["gamma"]), 400)]);
    for (i, (site, rounds)) in [("alpha", 2), ("beta", 2), ("gamma", 1)].into_iter().enumerate() {
        let site_bytes = std::fs::read(dir.path().join(format!("agent-{i}")).join(fedward_agent::daemon::LEDGER)).unwrap();
        let id = wire::SiteId::new(site).unwrap();
        let r = fedward_shared::audit::reconcile_ledgers(&id, &site_bytes, &coord_bytes, Some(&key));
        assert_eq!(r.matched, rounds, "{site}: {:?}", r.mismatches);
        assert!(r.mismatches.is_empty() && r.passed(), "{site}: {:?}", r.mismatches);
    }
}

/// Distributed DP over real QUIC: each site clips, quantizes and adds its discrete
/// Gaussian share before masking, records the share and the distributed epsilon in its
/// ledger before the masked input leaves, and every ledger audits and reconciles; the
/// coordinator learns the number of sites summed (equal weights), no count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_dp_rounds_record_each_sites_noise_share_and_reconcile() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 2, 3, vec!["alpha", "beta", "gamma"]);
    s.privacy = PrivacyPlan::Distributed { noise_multiplier: 1.0, clip_norm: 0.5, min_honest: 2 };
    s.policy = PrivacyPolicy { mode: PrivacyMode::Distributed, min_noise_multiplier: 1.0, max_clip_norm: 0.5 };
    s.aggregation.weighting = fedward_shared::config::Weighting::Equal;
    s.secure = Some(fedward_coordinator::round::SecureSettings {
        params: fedward_shared::secagg::SecAggParams { threshold: 2, min_sites: 2, neighbours: 2, modulus_bits: 64 },
        step_deadline: Duration::from_secs(10),
        trust: pki.secagg_trust(),
    });
    let coord = CoordinatorHandle::start(&pki, s);
    let mut agents = Vec::new();
    for (i, site) in ["alpha", "beta", "gamma"].into_iter().enumerate() {
        let (trainer, _sent) = ScriptedTrainer::new(0.1 * (i as f32 + 1.0), 100 * (i as u64 + 1));
        let (tls, identity) = pki.site_secure(site);
        let mut opts = agent_options(coord.addr, tls, &dir.path().join(site), 0);
        opts.secagg = Some(identity);
        opts.seed = Some(200 + i as u64);
        opts.budget.max_epsilon = 1e3;
        opts.budget.require_dp = true;
        agents.push(spawn_agent(opts, trainer));
    }
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 2 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    let (ledger_file, public) = ledger_paths(&dir.path().join("coordinator"));
    let key = fedward_shared::ledger_key::read_public_key(&public).unwrap();
    let coord_bytes = std::fs::read(&ledger_file).unwrap();
    let weights: Vec<u64> = fedward_shared::ledger::verify(&coord_bytes, Some(&key))
        .entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::SecureRound(r) => Some(r.total_weight),
            _ => None,
        })
        .collect();
    assert_eq!(weights, vec![3, 3], "equal weights: the sites summed, no count");
    for site in ["alpha", "beta", "gamma"] {
        let releases = site_releases(&dir.path().join(site));
        assert_eq!(releases.len(), 2);
        for r in &releases {
            assert_eq!(r.privacy.mode, PrivacyMode::Distributed);
            let share = r.privacy.distributed.expect("the noise share is recorded");
            assert_eq!((share.min_honest, share.clip_norm, share.modulus_bits), (2, 0.5, 64));
            // Two honest shares carry the plan's sigma C (in the share's units).
            assert!(share.site_sigma * 2f64.sqrt() >= 0.5 * share.scale);
        }
        let site_bytes = std::fs::read(dir.path().join(site).join(fedward_agent::daemon::LEDGER)).unwrap();
        let audit = fedward_shared::audit::audit_ledger(&site_bytes, None, None);
        assert!(audit.passed(), "{site}: {:?}", audit.findings);
        let r = fedward_shared::audit::reconcile_ledgers(&wire::SiteId::new(site).unwrap(), &site_bytes, &coord_bytes, Some(&key));
        assert_eq!(r.matched, 2, "{site}: {:?}", r.mismatches);
        assert!(r.mismatches.is_empty() && r.passed(), "{site}: {:?}", r.mismatches);
    }
}

/// Federated model selection over QUIC: each site scores every offered model, a last
/// round only scores, and the federation ends with the model the sites scored best
/// (example-weighted): round 1's here, which both the coordinator's last checkpoint and
/// the model every agent leaves with are. Under site-level DP each score is noised and
/// counted in the release the site records before it sends, and both ledgers reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_ends_with_the_model_its_sites_scored_best() {
    init_logging();
    for dp in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new("e2e");
        let mut s = spec(dir.path(), 3, 2, vec!["alpha", "beta"]);
        let noise_multiplier = if dp { 4.0 } else { 0.0 };
        if dp {
            s.privacy = PrivacyPlan::SiteLevel { noise_multiplier: 1.0, clip_norm: 5.0 };
            s.policy = PrivacyPolicy { mode: PrivacyMode::SiteLevel, min_noise_multiplier: 1.0, max_clip_norm: 5.0 };
        }
        s.selection = Some(fedward_coordinator::round::SelectionSettings { noise_multiplier, candidates: 5 });
        let coord = CoordinatorHandle::start(&pki, s);
        // Validation scores of models 0..=3: model 1 is best for the large site, whose
        // examples outweigh the small one's (which prefers model 3).
        let scores = [[(500, 1000), (900, 1000), (800, 1000), (800, 1000)], [(10, 100), (20, 100), (30, 100), (90, 100)]];
        let mut agents = Vec::new();
        for (i, site) in ["alpha", "beta"].into_iter().enumerate() {
            let (mut trainer, _sent) = ScriptedTrainer::new(0.1 * (i as f32 + 1.0), 100);
            trainer.scores = scores[i].into_iter().collect();
            let mut opts = agent_options(coord.addr, pki.site_tls(site), &dir.path().join(site), 0);
            opts.seed = Some(300 + i as u64);
            opts.budget.max_epsilon = 1e4;
            opts.budget.require_dp = dp;
            agents.push(spawn_agent(opts, trainer));
        }
        for a in agents {
            assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 4, rounds_trained: 4 }, "dp {dp}");
        }
        assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 4 });
        let store = Store::open(&dir.path().join("coordinator")).unwrap();
        let state = store.state().unwrap().clone();
        let scored: Vec<(u64, u32)> = state.history.iter().filter_map(|r| r.scored).map(|t| (t.model_round, t.sites)).collect();
        assert_eq!(scored, [(0, 2), (1, 2), (2, 2), (3, 2)], "dp {dp}");
        let final_model = store.model_file(4).unwrap().manifest().unwrap();
        if !dp {
            assert_eq!(state.selected(), Some(1));
            let accuracy = state.history[1].scored.unwrap().accuracy().unwrap();
            assert!((accuracy - 920.0 / 1100.0).abs() < 1e-12, "{accuracy}");
            assert_eq!(final_model, store.model_file(1).unwrap().manifest().unwrap(), "round 4's checkpoint is round 1's model");
        }
        let selected = state.selected().expect("a model is selected");
        assert_eq!(fedward_shared::tensor::manifest_digest(&final_model).to_hex(), state.model_digest);
        assert_eq!(final_model, store.model_file(selected).unwrap().manifest().unwrap());
        let (ledger_file, public) = ledger_paths(&dir.path().join("coordinator"));
        let key = fedward_shared::ledger_key::read_public_key(&public).unwrap();
        let coord_bytes = std::fs::read(&ledger_file).unwrap();
        for site in ["alpha", "beta"] {
            let releases = site_releases(&dir.path().join(site));
            let alone: Vec<bool> = releases.iter().map(|r| r.privacy.score.expect("every release scores").alone).collect();
            assert_eq!(alone, [false, false, false, true], "{site}");
            if dp {
                assert!(releases.iter().all(|r| r.privacy.score.unwrap().noise_multiplier == 4.0));
                // Three rounds of DP-FedAvg at sigma 1 and four scores, as one accountant
                // recomputes it from the parameters.
                let mut acc = fedward_shared::dp::Accountant::new();
                for r in &releases {
                    acc.record(&r.privacy.release()).unwrap();
                }
                let expected = acc.epsilon(r_delta(&releases)).unwrap();
                assert_eq!(releases[3].privacy.epsilon_after, expected, "{site}");
            }
            let site_bytes = std::fs::read(dir.path().join(site).join(fedward_agent::daemon::LEDGER)).unwrap();
            let audit = fedward_shared::audit::audit_ledger(&site_bytes, None, None);
            assert!(audit.passed(), "{site}: {:?}", audit.findings);
            let r = fedward_shared::audit::reconcile_ledgers(&wire::SiteId::new(site).unwrap(), &site_bytes, &coord_bytes, Some(&key));
            assert_eq!(r.matched, 4, "{site}: {:?}", r.mismatches);
            assert!(r.mismatches.is_empty() && r.passed(), "{site}: {:?}", r.mismatches);
        }
    }
}

fn r_delta(releases: &[fedward_shared::ledger::ReleaseRecord]) -> f64 {
    releases[0].privacy.delta
}

/// Under `update_encoding = "int8-row"` the sites send quantized deltas (a quarter of the
/// bytes) and the global model is the weighted mean of exactly the quantized values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_updates_are_decoded_and_averaged_exactly() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 2, 2, vec!["alpha", "beta"]);
    s.aggregation.update_encoding = UpdateEncoding::Int8Row;
    let coord = CoordinatorHandle::start(&pki, s);
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    for (i, (site, value, examples)) in [("alpha", 0.3, 100), ("beta", -0.7, 300)].into_iter().enumerate() {
        let (trainer, sent) = ScriptedTrainer::new(value, examples);
        agents.push(spawn_agent(agent_options(coord.addr, pki.site_tls(site), &dir.path().join(format!("agent-{i}")), 0), trainer));
        logs.push(sent);
    }
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 2 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    assert_model_is_the_weighted_mean_of(&dir.path().join("coordinator"), 2, &logs, UpdateEncoding::Int8Row);
    // Quantizing changed the values (so the check above is of the quantized ones) ...
    let first = logs[0].lock().unwrap()[0].delta.clone();
    let mut quantized = first.clone();
    for (name, t) in quantized.iter_mut() {
        UpdateEncoding::Int8Row.quantize(name, t).unwrap();
    }
    assert_ne!(quantized, first);
    // ... and a byte per value plus a scale per row went over the wire.
    let status: fedward_agent::status::DaemonStatus =
        serde_json::from_slice(&std::fs::read(dir.path().join("agent-0/status.json")).unwrap()).unwrap();
    let sent = status.last_update.unwrap().mib * (1 << 20) as f64;
    let expected: usize =
        first.iter().map(|(_, t)| t.len() + 4 * t.shape().first().copied().filter(|_| t.shape().len() > 1).unwrap_or(1)).sum();
    assert_eq!(sent.round() as usize, expected, "of {} bytes in f32", first.byte_len());
    assert!(expected < first.byte_len() / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_a_certificate_from_another_ca_is_refused() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("consortium");
    let rogue = TestPki::new("rogue");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 1, vec!["alpha"]));
    // Signed by the rogue CA, though it trusts the consortium's server certificate.
    let tls = rogue.site_tls_with("alpha", Validity::days_from(time::OffsetDateTime::now_utc(), 1), &pki);
    let (trainer, sent) = ScriptedTrainer::new(1.0, 10);
    let err = spawn_agent(agent_options(coord.addr, tls, dir.path(), 3), trainer).await.unwrap().unwrap_err();
    let DaemonError::Refused(reason) = &err else { panic!("expected a refusal, got {err}") };
    assert!(reason.contains("not issued by the consortium CA"), "{reason}");
    assert!(sent.lock().unwrap().is_empty());
    assert!(coord.status.borrow().connected.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_an_expired_certificate_is_refused() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("consortium");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 1, vec!["alpha"]));
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity { not_before: now - time::Duration::days(10), not_after: now - time::Duration::days(1) };
    let tls = pki.site_tls_with("alpha", expired, &pki);
    let (trainer, _) = ScriptedTrainer::new(1.0, 10);
    let err = spawn_agent(agent_options(coord.addr, tls, dir.path(), 3), trainer).await.unwrap().unwrap_err();
    let DaemonError::Refused(reason) = &err else { panic!("expected a refusal, got {err}") };
    assert!(reason.contains("expired"), "{reason}");
}

/// A round that fails after a site's update was accepted is redone, and the site rightly
/// resends what it released. Before, the coordinator recorded it twice: the audit then
/// recomputed the site's epsilon from two releases (epsilon-under-counted) and reconcile
/// reported a duplicate round. Now one release is one entry, and both pass, under DP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redone_round_records_a_resent_update_once_and_the_audit_passes() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 1, 2, vec!["alpha", "beta", "idle"]);
    s.privacy = PrivacyPlan::RecordLevel { noise_multiplier: 1.2, clip_norm: 1.0, sampling_rate: 0.25, update_clip_norm: 0.05 };
    s.policy = PrivacyPolicy { mode: PrivacyMode::RecordLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
    s.deadline = Duration::from_secs(3);
    let coord = CoordinatorHandle::start(&pki, s);
    // Attempt 1: alpha and a site that never answers; alpha's update is accepted, and the
    // round fails at its deadline without quorum.
    let idle = ManualSite::connect(&pki, "idle", coord.addr).await;
    let _idle_offer = idle.ready();
    let mut status = coord.status.clone();
    status.wait_for(|s| s.phase.starts_with("waiting for quorum (1/")).await.unwrap();
    let (alpha_trainer, _) = ScriptedTrainer::new(0.01, 100);
    let mut alpha_opts = agent_options(coord.addr, pki.site_tls("alpha"), &dir.path().join("alpha"), 0);
    alpha_opts.budget.require_dp = true;
    let alpha = spawn_agent(alpha_opts, alpha_trainer);
    status.wait_for(|s| s.accepted == 1).await.unwrap();
    status.wait_for(|s| s.phase.starts_with("waiting for quorum")).await.unwrap();
    // Attempt 2: beta comes; alpha resends its recorded update.
    let (beta_trainer, _) = ScriptedTrainer::new(0.02, 100);
    let mut beta_opts = agent_options(coord.addr, pki.site_tls("beta"), &dir.path().join("beta"), 0);
    beta_opts.budget.require_dp = true;
    let beta = spawn_agent(beta_opts, beta_trainer);
    for a in [alpha, beta] {
        assert!(matches!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 1, .. }));
    }
    drop(idle);
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 1 });

    assert_eq!(site_releases(&dir.path().join("alpha")).len(), 1, "alpha released once");
    let (ledger_file, public) = ledger_paths(&dir.path().join("coordinator"));
    let key = fedward_shared::ledger_key::read_public_key(&public).unwrap();
    let bytes = std::fs::read(&ledger_file).unwrap();
    let audit = fedward_shared::audit::audit_ledger(&bytes, Some(&key), None);
    let alpha_entries = audit.parsed.iter().filter(|e| matches!(&e.body, Body::Accepted(a) if a.site.as_str() == "alpha")).count();
    assert_eq!(alpha_entries, 1, "one release, one entry");
    assert!(audit.passed(), "{:?}", audit.findings);
    let site_bytes = std::fs::read(dir.path().join("alpha").join(fedward_agent::daemon::LEDGER)).unwrap();
    let reconciled = fedward_shared::audit::reconcile_ledgers(&wire::SiteId::new("alpha").unwrap(), &site_bytes, &bytes, Some(&key));
    assert!(reconciled.passed(), "{:?}", reconciled.mismatches);
}

/// Two agents on one state directory would both pass the budget check against one ledger:
/// the second stops at once, naming the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_stops_at_once() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 2, vec!["alpha", "beta"]));
    let state = dir.path().join("alpha");
    let (first_trainer, _) = ScriptedTrainer::new(0.01, 10);
    let first = spawn_agent(agent_options(coord.addr, pki.site_tls("alpha"), &state, 0), first_trainer);
    // The first holds the directory once its ledger exists (it opens it after the lock).
    let ledger = state.join(fedward_agent::daemon::LEDGER);
    let mut status = coord.status.clone();
    status.wait_for(|s| s.connected.iter().any(|c| c == "alpha")).await.unwrap();
    assert!(ledger.exists());
    let (second_trainer, _) = ScriptedTrainer::new(0.01, 10);
    let second = spawn_agent(agent_options(coord.addr, pki.site_tls("alpha"), &state, 0), second_trainer).await.unwrap();
    let Err(DaemonError::State(reason)) = second else { panic!("expected a refusal: {second:?}") };
    assert!(reason.contains("in use by another fedward process"), "{reason}");
    first.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_site_is_refused_with_the_reason() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("consortium");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 1, vec!["alpha"]));
    let (trainer, sent) = ScriptedTrainer::new(1.0, 10);
    let opts = agent_options(coord.addr, pki.site_tls("mallory"), dir.path(), 3);
    let err = spawn_agent(opts, trainer).await.unwrap().unwrap_err();
    let DaemonError::Refused(reason) = &err else { panic!("expected a refusal, got {err}") };
    assert!(reason.contains("site mallory is not enrolled"), "{reason}");
    assert!(sent.lock().unwrap().is_empty());
    // The person on call reads why.
    let status: fedward_agent::status::DaemonStatus =
        serde_json::from_slice(&std::fs::read(dir.path().join("status.json")).unwrap()).unwrap();
    assert_eq!(status.phase, fedward_agent::status::Phase::Refused);
    assert!(status.detail.unwrap().contains("site mallory is not enrolled"));
}

/// An agent trusting the wrong CA, or expecting another server name, can never connect:
/// it stops at once with the reason (exit 64 in the binary), not after endless retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_trust_the_coordinator_stops_with_the_reason() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("consortium");
    let other = TestPki::new("elsewhere");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 1, vec!["alpha"]));
    // Retrying forever (0) as the shipped config does: the test ends only if the agent stops.
    let (trainer, _) = ScriptedTrainer::new(1.0, 10);
    let wrong_ca = agent_options(
        coord.addr,
        pki.site_tls_with("alpha", Validity::days_from(time::OffsetDateTime::now_utc(), 1), &other),
        &dir.path().join("a"),
        0,
    );
    let err = spawn_agent(wrong_ca, trainer).await.unwrap().unwrap_err();
    let DaemonError::Misconfigured(reason) = &err else { panic!("expected a misconfiguration, got {err}") };
    assert!(reason.contains("not issued by the consortium CA"), "{reason}");
    let (trainer, _) = ScriptedTrainer::new(1.0, 10);
    let mut wrong_name = agent_options(coord.addr, pki.site_tls("alpha"), &dir.path().join("b"), 0);
    wrong_name.server_name = "somebody-else.test".into();
    let err = spawn_agent(wrong_name, trainer).await.unwrap().unwrap_err();
    let DaemonError::Misconfigured(reason) = &err else { panic!("expected a misconfiguration, got {err}") };
    assert!(reason.contains("does not match the configured server name"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_coordinator_restarts_resumes_at_the_right_round_and_finishes() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let sites = vec!["alpha", "beta"];
    let mut coord = CoordinatorHandle::start(&pki, spec(dir.path(), 3, 2, sites.clone()));
    let addr = coord.addr;
    let mut agents = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let (trainer, _) = ScriptedTrainer::new(1.0 + i as f32, 50);
        agents.push(spawn_agent(agent_options(addr, pki.site_tls(site), &dir.path().join(format!("a{i}")), 0), trainer));
    }
    coord.wait_completed(1).await;
    coord.kill().await;
    let resumed_from = Store::open(&dir.path().join("coordinator")).unwrap().state().unwrap().completed_rounds;
    assert!((1..3).contains(&resumed_from), "killed after a checkpoint and before the end: {resumed_from}");

    // Same address, same state directory: the agents reconnect on their own.
    let mut respec = spec(dir.path(), 3, 2, sites);
    respec.addr = addr;
    let mut coord = CoordinatorHandle::start(&pki, respec);
    assert_eq!(coord.started().await.completed_rounds, resumed_from, "resumed after the last completed round");
    for a in agents {
        assert!(matches!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 3, .. }));
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 3 });
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let rounds: Vec<u64> = store.state().unwrap().history.iter().filter(|r| r.outcome == "completed").map(|r| r.round).collect();
    assert_eq!(rounds, [1, 2, 3], "each round completed exactly once");
    // The ledger was verified on restart and kept growing: every round sealed once, in order
    // (a round killed between its checkpoint and its seal is sealed on restart).
    let (ledger_file, public) = ledger_paths(&dir.path().join("coordinator"));
    let key = fedward_shared::ledger_key::read_public_key(&public).unwrap();
    let audit = fedward_shared::audit::audit_ledger(&std::fs::read(ledger_file).unwrap(), Some(&key), None);
    assert!(audit.passed() && audit.unsealed_tail == 0, "{:?}", audit.findings);
    let seals: Vec<u64> = audit
        .parsed
        .iter()
        .filter_map(|e| match &e.body {
            Body::Seal(s) => Some(s.round.0),
            _ => None,
        })
        .collect();
    assert_eq!(seals, [1, 2, 3]);
}

/// Model selection across a coordinator restart: the scores of the models made before it
/// (kept in `state.json`) still count, so the model the sites scored best before the kill
/// (round 1's) is the one the federation ends with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_selects_among_the_models_scored_before_it_stopped() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let sites = vec!["alpha", "beta"];
    let selection = Some(fedward_coordinator::round::SelectionSettings { noise_multiplier: 0.0, candidates: 5 });
    let mut s = spec(dir.path(), 3, 2, sites.clone());
    s.selection = selection;
    let mut coord = CoordinatorHandle::start(&pki, s);
    let addr = coord.addr;
    let mut agents = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let (mut trainer, _) = ScriptedTrainer::new(1.0 + i as f32, 50);
        // Model 0, model 1 (the best), then every later model alike, however many times a
        // redone round asks.
        trainer.scores = [(10, 100), (90, 100)].into_iter().chain(std::iter::repeat_n((20, 100), 10)).collect();
        agents.push(spawn_agent(agent_options(addr, pki.site_tls(site), &dir.path().join(format!("a{i}")), 0), trainer));
    }
    coord.wait_completed(2).await;
    coord.kill().await;
    let resumed_from = Store::open(&dir.path().join("coordinator")).unwrap().state().unwrap().completed_rounds;
    assert!((2..4).contains(&resumed_from), "killed after model 1 was scored and before the selection: {resumed_from}");
    let mut respec = spec(dir.path(), 3, 2, sites);
    respec.addr = addr;
    respec.selection = selection;
    let coord = CoordinatorHandle::start(&pki, respec);
    for a in agents {
        assert!(matches!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 4, .. }));
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 4 });
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let state = store.state().unwrap();
    assert_eq!(state.selected(), Some(1));
    assert_eq!(store.model_file(4).unwrap().manifest().unwrap(), store.model_file(1).unwrap().manifest().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_update_is_rejected_and_the_other_sites_round_completes() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 2, vec!["alpha", "beta", "broken"]));
    let (good_a, sent_a) = ScriptedTrainer::new(1.0, 100);
    let (good_b, sent_b) = ScriptedTrainer::new(3.0, 300);
    // The good sites hold their training until the broken one has been offered the round
    // too (a quorum of two may open it first; a late joiner is offered the open round), so
    // its update is part of the round whichever site connects last.
    let ((good_a, gate_a), (good_b, gate_b)) = (GatedTrainer::wrapping(good_a), GatedTrainer::wrapping(good_b));
    let (mut bad, _) = ScriptedTrainer::new(100.0, 1000);
    bad.poison = true;
    let handles = [
        spawn_agent(agent_options(coord.addr, pki.site_tls("alpha"), &dir.path().join("a"), 0), good_a),
        spawn_agent(agent_options(coord.addr, pki.site_tls("beta"), &dir.path().join("b"), 0), good_b),
        spawn_agent(agent_options(coord.addr, pki.site_tls("broken"), &dir.path().join("c"), 0), bad),
    ];
    coord.status.wait_for(|s| s.offered == 3).await.expect("coordinator alive");
    gate_a.open();
    gate_b.open();
    for h in handles {
        assert!(matches!(h.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 1, .. }));
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 1 });
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let record = &store.state().unwrap().history[0];
    assert_eq!(record.sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
    assert_eq!(record.rejected.len(), 1);
    assert_eq!(record.rejected[0].0, "broken");
    assert!(record.rejected[0].1.starts_with("non-finite"), "{}", record.rejected[0].1);
    // The global model is the mean of the two good updates only.
    let (model, _) = store.load_current().unwrap().unwrap();
    let mut expected = tiny_global();
    let a = sent_a.lock().unwrap()[0].clone();
    let b = sent_b.lock().unwrap()[0].clone();
    apply_weighted_mean(&mut expected, &[(a.num_examples, &a.delta), (b.num_examples, &b.delta)]);
    let (got, want) = (model.get("classifier.weight").unwrap(), expected.get("classifier.weight").unwrap());
    for (x, y) in got.data().iter().zip(want.data()) {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_get_a_clear_reject() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 1, vec!["alpha"]));
    let endpoint = fedward_net::client_endpoint(coord.addr, (*pki.site_tls("alpha")).clone(), &test_transport()).unwrap();
    let conn = endpoint.connect(coord.addr, SERVER_NAME).unwrap().await.unwrap();

    async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Message {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send.finish().unwrap();
        fedward_net::read_message(&mut recv).await.unwrap()
    }
    // Garbage inside a well-sized frame.
    let mut garbage = 5u32.to_le_bytes().to_vec();
    garbage.extend([0xde, 0xad, 0xbe, 0xef, 0x00]);
    let Message::Reject(r) = exchange(&conn, &garbage).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::Malformed);
    // A frame header over the limit: refused before anything is read or allocated.
    let huge = ((wire::MAX_FRAME_LEN + 1) as u32).to_le_bytes();
    let Message::Reject(r) = exchange(&conn, &huge).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::Malformed);
    assert!(r.message.contains("exceeds"), "{}", r.message);
    // A message that cannot start a stream.
    let Message::Reject(r) = exchange(&conn, &wire::encode(&Message::Ready(Ready { have_model: None })).unwrap()[..0]).await else {
        panic!("expected a reject")
    };
    assert_eq!(r.code, RejectCode::Malformed);
    // Anything but a hello before the hello.
    let ack = wire::encode(&Message::Ack(wire::Ack { round: wire::RoundId(1) })).unwrap();
    let Message::Reject(r) = exchange(&conn, &ack).await else { panic!("expected a reject") };
    assert!(r.code == RejectCode::Malformed && r.message.contains("Hello first"), "{r}");
    // The connection survived all of it.
    let hello = wire::Hello { protocol_version: wire::PROTOCOL_VERSION, software: "probe".into(), capabilities: vec![], budget: None };
    assert!(matches!(exchange(&conn, &wire::encode(&Message::Hello(hello)).unwrap()).await, Message::Welcome(_)));
    // A message a site never sends.
    let Message::Reject(r) = exchange(&conn, &ack).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::UnexpectedMessage);
    let old = wire::Hello { protocol_version: 99, software: "old".into(), capabilities: vec![], budget: None };
    let Message::Reject(r) = exchange(&conn, &wire::encode(&Message::Hello(old)).unwrap()).await else { panic!() };
    assert_eq!(r.code, RejectCode::UnsupportedVersion);
}

/// The agent dies after its ledger records round 1's update and before sending it. The
/// restarted agent resends exactly that update: it does not train round 1 again, its
/// ledger holds one release per round, and the coordinator aggregates the recorded digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_ledger_write_and_send_resends_the_recorded_update_without_spending_again() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 2, 1, vec!["alpha"]);
    s.privacy = PrivacyPlan::SiteLevel { noise_multiplier: 2.0, clip_norm: 0.5 };
    s.policy = PrivacyPolicy { mode: PrivacyMode::SiteLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
    let coord = CoordinatorHandle::start(&pki, s);
    let agent_dir = dir.path().join("alpha");

    let (trainer, first_run) = ScriptedTrainer::new(1.0, 40);
    let mut opts = agent_options(coord.addr, pki.site_tls("alpha"), &agent_dir, 0);
    opts.budget.require_dp = true;
    opts.fail_after_ledger_write = true;
    let err = spawn_agent(opts.clone(), trainer).await.unwrap().unwrap_err();
    assert!(matches!(err, DaemonError::InjectedFault(1)), "{err}");
    assert_eq!(first_run.lock().unwrap().len(), 1);
    let recorded = site_releases(&agent_dir);
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].round.0, 1);
    assert_eq!(recorded[0].privacy.mode, PrivacyMode::SiteLevel);

    // Restart, with another noise seed: a retrained round 1 would have another digest.
    let (trainer, second_run) = ScriptedTrainer::new(1.0, 40);
    opts.fail_after_ledger_write = false;
    opts.seed = Some(99);
    let outcome = spawn_agent(opts, trainer).await.unwrap().unwrap();
    assert_eq!(outcome, DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 1 });
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    let trained: Vec<u64> = second_run.lock().unwrap().iter().map(|s| s.round.0).collect();
    assert_eq!(trained, [2], "round 1 was resent, not trained again");

    let releases = site_releases(&agent_dir);
    assert_eq!(releases.iter().map(|r| r.round.0).collect::<Vec<_>>(), [1, 2], "one release per round");
    assert_eq!(releases[0], recorded[0], "the first release is untouched");
    // No double spend: round 2 starts from round 1's epsilon.
    assert_eq!(releases[1].epsilon_before, releases[0].privacy.epsilon_after);
    assert!(releases[1].privacy.epsilon_after > releases[0].privacy.epsilon_after);
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let history = &store.state().unwrap().history;
    let completed: Vec<_> = history.iter().filter(|r| r.outcome == "completed").collect();
    assert_eq!(completed.len(), 2);
    for (record, release) in completed.iter().zip(&releases) {
        assert_eq!(record.round, release.round.0);
        assert_eq!(record.sites.len(), 1);
        assert_eq!(record.sites[0].update_digest, release.update_digest.to_hex(), "round {}", record.round);
        assert_eq!(record.sites[0].epsilon_after, Some(release.privacy.epsilon_after));
    }
}

/// A crash that cuts the ledger's last release short (here after the update was recorded
/// and before it was sent; a lost disk tail looks the same after a send) must not
/// under-count: the agent completes the line from its released-update cache, counts it,
/// and resends the same update. Before, it dropped the line as "nothing was sent" and
/// trained and released round 1 again. A fragment it cannot recognise stops it, untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_cut_short_in_the_ledger_still_counts_and_is_resent() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 2, 1, vec!["alpha"]);
    s.privacy = PrivacyPlan::SiteLevel { noise_multiplier: 2.0, clip_norm: 0.5 };
    s.policy = PrivacyPolicy { mode: PrivacyMode::SiteLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
    let coord = CoordinatorHandle::start(&pki, s);
    let agent_dir = dir.path().join("alpha");
    let ledger = agent_dir.join(fedward_agent::daemon::LEDGER);

    let (trainer, _) = ScriptedTrainer::new(1.0, 40);
    let mut opts = agent_options(coord.addr, pki.site_tls("alpha"), &agent_dir, 0);
    opts.budget.require_dp = true;
    opts.fail_after_ledger_write = true;
    assert!(matches!(spawn_agent(opts.clone(), trainer).await.unwrap(), Err(DaemonError::InjectedFault(1))));
    let recorded = site_releases(&agent_dir);
    let whole = std::fs::read(&ledger).unwrap();
    let cut = &whole[..whole.len() * 2 / 3];
    assert!(!cut.ends_with(b"\n"));

    // A fragment that is not the cached release: the agent stops and changes nothing.
    let mut foreign = cut.to_vec();
    foreign.extend_from_slice(b"tampered");
    std::fs::write(&ledger, &foreign).unwrap();
    opts.fail_after_ledger_write = false;
    let (trainer, _) = ScriptedTrainer::new(1.0, 40);
    let err = spawn_agent(opts.clone(), trainer).await.unwrap().unwrap_err();
    assert!(matches!(&err, DaemonError::State(m) if m.contains("cut-short line")), "{err}");
    assert_eq!(std::fs::read(&ledger).unwrap(), foreign);

    // The release cut short: completed, counted, resent.
    std::fs::write(&ledger, cut).unwrap();
    let (trainer, run) = ScriptedTrainer::new(1.0, 40);
    opts.seed = Some(99);
    let outcome = spawn_agent(opts, trainer).await.unwrap().unwrap();
    assert_eq!(outcome, DaemonOutcome::Finished { completed_rounds: 2, rounds_trained: 1 });
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 2 });
    let trained: Vec<u64> = run.lock().unwrap().iter().map(|s| s.round.0).collect();
    assert_eq!(trained, [2], "round 1 was resent, not trained again");
    let releases = site_releases(&agent_dir);
    assert_eq!(releases.len(), 2);
    assert_eq!(releases[0], recorded[0], "the cut release, completed as it was");
    assert!(std::fs::read(&ledger).unwrap().starts_with(&whole));
}

/// Two agents with one site's certificate (on different state directories): the newer
/// connection wins, the older agent stops with the reason (exit 64, not a reconnect that
/// knocks the newer off), and records no release for the update it can no longer send.
/// Before, the two took turns knocking each other off, and the older recorded a release
/// that was never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_agents_with_one_certificate_the_newer_wins_and_the_older_spends_nothing() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 1, 1, vec!["alpha"]);
    s.privacy = PrivacyPlan::SiteLevel { noise_multiplier: 2.0, clip_norm: 0.5 };
    s.policy = PrivacyPolicy { mode: PrivacyMode::SiteLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
    let coord = CoordinatorHandle::start(&pki, s);

    let (older_trainer, gate) = GatedTrainer::new(1.0, 40);
    let mut older_opts = agent_options(coord.addr, pki.site_tls("alpha"), &dir.path().join("older"), 2);
    older_opts.budget.require_dp = true;
    let older = spawn_agent(older_opts, older_trainer);
    let (round, gate) = gate.started().await;
    assert_eq!(round.0, 1);

    let (newer_trainer, newer_run) = ScriptedTrainer::new(2.0, 40);
    let mut newer_opts = agent_options(coord.addr, pki.site_tls("alpha"), &dir.path().join("newer"), 0);
    newer_opts.budget.require_dp = true;
    let newer = spawn_agent(newer_opts, newer_trainer);
    assert_eq!(newer.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 1, rounds_trained: 1 });
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 1 });
    assert_eq!(newer_run.lock().unwrap().len(), 1);

    gate.open();
    let err = older.await.unwrap().unwrap_err();
    assert!(matches!(&err, DaemonError::Misconfigured(m) if m.contains("another agent connected with this site's certificate")), "{err}");
    assert!(site_releases(&dir.path().join("older")).is_empty(), "nothing recorded for an update that could not be sent");
    assert_eq!(site_releases(&dir.path().join("newer")).len(), 1);
}

/// A site whose ledger was deleted (or restored from an older copy) would start over at
/// epsilon 0. The coordinator lists what it accepted from the site in its welcome; the
/// agent finds its ledger lacks round 1's release and stops before it trains or spends.
/// Before, it trained and released again, counting from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_ledger_was_lost_stops_before_spending_again() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 2, 1, vec!["alpha"]);
    s.privacy = PrivacyPlan::SiteLevel { noise_multiplier: 2.0, clip_norm: 0.5 };
    s.policy = PrivacyPolicy { mode: PrivacyMode::SiteLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
    let coord = CoordinatorHandle::start(&pki, s);
    let agent_dir = dir.path().join("alpha");
    let mut opts = agent_options(coord.addr, pki.site_tls("alpha"), &agent_dir, 0);
    opts.budget.require_dp = true;

    // Round 1 is accepted (round 2 is offered only after it completes); the agent stops
    // while it trains round 2.
    let (trainer, gate) = GatedTrainer::new(1.0, 40);
    let agent = spawn_agent(opts.clone(), trainer);
    let (round, gate) = gate.started().await;
    assert_eq!(round.0, 1);
    gate.open();
    let (round, gate) = gate.started().await;
    assert_eq!(round.0, 2);
    agent.abort();
    let _ = agent.await;
    gate.open();
    assert_eq!(site_releases(&agent_dir).len(), 1);

    std::fs::remove_file(agent_dir.join(fedward_agent::daemon::LEDGER)).unwrap();
    let (trainer, run) = ScriptedTrainer::new(1.0, 40);
    let err = spawn_agent(opts, trainer).await.unwrap().unwrap_err();
    assert!(matches!(&err, DaemonError::LedgerBehind(m) if m.contains("round 1 update")), "{err}");
    assert!(run.lock().unwrap().is_empty(), "nothing trained");
    assert!(site_releases(&agent_dir).is_empty(), "nothing spent");
}

/// A site whose update declares less noise than the consortium's minimum is rejected with
/// the reason; the round completes with the other sites' record-level updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_with_too_little_noise_is_rejected_and_the_round_completes_without_it() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 1, 2, vec!["alpha", "beta", "cheat"]);
    let privacy = PrivacyPlan::RecordLevel { noise_multiplier: 1.2, clip_norm: 1.0, sampling_rate: 0.25, update_clip_norm: 0.05 };
    s.privacy = privacy;
    s.policy = PrivacyPolicy { mode: PrivacyMode::RecordLevel, min_noise_multiplier: 1.0, max_clip_norm: 1.0 };
    let mut coord = CoordinatorHandle::start(&pki, s);

    // The cheating site speaks the protocol by hand and declares sigma 0.5. It is ready
    // before the honest sites connect, so it is certainly offered the round.
    let endpoint = fedward_net::client_endpoint(coord.addr, (*pki.site_tls("cheat")).clone(), &test_transport()).unwrap();
    let conn = endpoint.connect(coord.addr, SERVER_NAME).unwrap().await.unwrap();
    async fn exchange(conn: &quinn::Connection, msg: &Message, tensors: Option<&fedward_shared::tensor::TensorSet>) -> Message {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        fedward_net::write_message(&mut send, msg).await.unwrap();
        if let Some(t) = tensors {
            // The coordinator may refuse on the header alone and stop reading.
            let _ = fedward_net::write_tensors(&mut send, t, &t.specs()).await;
        }
        let _ = send.finish();
        fedward_net::read_message(&mut recv).await.unwrap()
    }
    let hello = wire::Hello { protocol_version: wire::PROTOCOL_VERSION, software: "cheat".into(), capabilities: vec![], budget: None };
    assert!(matches!(exchange(&conn, &Message::Hello(hello), None).await, Message::Welcome(_)));
    let ready = {
        let conn = conn.clone();
        tokio::spawn(async move { exchange(&conn, &Message::Ready(Ready { have_model: None }), None).await })
    };
    coord.status.wait_for(|s| s.phase.starts_with("waiting for quorum (1/")).await.unwrap();
    let mut agents = Vec::new();
    for site in ["alpha", "beta"] {
        let (trainer, _) = ScriptedTrainer::new(1.0, 100);
        let mut opts = agent_options(coord.addr, pki.site_tls(site), &dir.path().join(site), 0);
        opts.budget.require_dp = true;
        agents.push(spawn_agent(opts, trainer));
    }
    let Message::RoundOffer(offer) = ready.await.unwrap() else { panic!("expected an offer") };
    let mut delta = fedward_shared::tensor::TensorSet::new();
    for spec in offer.manifest.iter().filter(|s| offer.plan.trainable_tensors.contains(&s.name)) {
        delta.insert(spec.name.clone(), fedward_shared::tensor::Tensor::zeros(spec.shape.clone()));
    }
    let used = wire::PrivacyUsed {
        score: None,
        mode: PrivacyMode::RecordLevel,
        noise_multiplier: 0.5,
        clip_norm: 1.0,
        sampling_rate: 0.25,
        steps: 4,
        update_clip_norm: 0.05,
        epsilon_after: 1.0,
        delta: 1e-5,
        distributed: None,
    };
    let header = wire::UpdateHeader {
        score: None,
        round: offer.round,
        num_examples: 1000,
        metrics: Default::default(),
        tensors: delta.specs(),
        privacy: used,
        encoding: fedward_shared::codec::UpdateEncoding::F32,
    };
    let Message::Reject(r) = exchange(&conn, &Message::Update(header), Some(&delta)).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::PolicyViolation);
    assert!(r.message.contains("noise multiplier 0.5 is below the consortium minimum 1"), "{}", r.message);
    // A header refused before its bytes is not the site's answer (it could retry within the
    // deadline); this one gives up and leaves, which closes its part of the round.
    conn.close(wire::CLOSE_NORMAL.into(), b"giving up");
    endpoint.wait_idle().await;
    for a in agents {
        assert!(matches!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 1, .. }));
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 1 });
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let record = &store.state().unwrap().history[0];
    assert_eq!(record.sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
    assert!(record.sites.iter().all(|s| s.privacy_mode == "record-level" && s.noise_multiplier == 1.2));
    assert_eq!(record.missed, ["cheat"]);
    // The honest sites recorded what they sent: record-level, the plan's steps, within the
    // update bound (the scripted deltas are far larger, so the agent clipped them).
    for site in ["alpha", "beta"] {
        let releases = site_releases(&dir.path().join(site));
        assert_eq!(releases.len(), 1);
        let p = &releases[0].privacy;
        assert_eq!((p.mode, p.steps, p.sampling_rate, p.update_clip_norm), (PrivacyMode::RecordLevel, 4, 0.25, 0.05));
        let sent = record.sites.iter().find(|s| s.site == site).unwrap();
        assert_eq!(sent.update_digest, releases[0].update_digest.to_hex());
    }
    let (model, _) = store.load_current().unwrap().unwrap();
    let moved = model.delta_from(&tiny_global()).unwrap();
    assert!(moved.l2_norm() <= 0.05 * (1.0 + 1e-6), "the mean of two updates within 0.05: {}", moved.l2_norm());
}

/// Issue 19, item 3: a site whose certificate has a minute left renews it over its
/// connection (a key made at the site, the coordinator's online issuing CA signing it)
/// and every round of the federation completes with both sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_minute_certificate_is_renewed_without_interrupting_the_federation() {
    use fedward_shared::pki;
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let pki_ = TestPki::new("e2e");
    let now = time::OffsetDateTime::now_utc();
    let issuing = pki::create_issuing_ca(&pki_.ca, "e2e", Validity::days_from(now, 2), [9; 16]).unwrap();
    std::fs::write(p.join("issuing.crt"), &issuing.cert_pem).unwrap();
    fedward_shared::fsutil::write_private_new(&p.join("issuing.key"), issuing.key_pem.as_bytes()).unwrap();
    let state_dir = p.join("coordinator");
    std::fs::create_dir_all(&state_dir).unwrap();
    let renewal = fedward_shared::config::Renewal {
        issuing_cert: p.join("issuing.crt"),
        issuing_key: p.join("issuing.key"),
        days: 30,
        approval: false,
    };
    let mut s = spec(p, 3, 2, vec!["alpha", "beta"]);
    s.renewal = Some(std::sync::Arc::new(fedward_coordinator::renewal::Issuer::load(&renewal, &state_dir).unwrap()));
    let coord = CoordinatorHandle::start(&pki_, s);

    // Alpha's certificate: one minute long, two thirds of it gone.
    let alpha = fedward_shared::wire::SiteId::new("alpha").unwrap();
    let request = pki::site_request(&alpha).unwrap();
    let minute = Validity { not_before: now - time::Duration::seconds(40), not_after: now + time::Duration::seconds(20) };
    let first = pki::sign_site_request(&pki_.ca, &request.csr_pem, &alpha, minute, [8; 16]).unwrap();
    let files = fedward_agent::renew::RenewalFiles {
        cert: p.join("alpha.crt"),
        key: p.join("alpha.key"),
        ca_pem: pki_.ca.cert_pem.clone().into_bytes(),
    };
    std::fs::write(&files.cert, &first).unwrap();
    fedward_shared::fsutil::write_private_new(&files.key, request.key_pem.as_bytes()).unwrap();
    let tls = fedward_shared::tls::client_config(&fedward_shared::tls::TlsMaterial {
        ca_pem: pki_.ca.cert_pem.as_bytes(),
        cert_pem: first.as_bytes(),
        key_pem: request.key_pem.as_bytes(),
    })
    .unwrap();
    let mut alpha_opts = agent_options(coord.addr, std::sync::Arc::new(tls), &p.join("agent-alpha"), 0);
    alpha_opts.renewal = Some(files.clone());
    let (alpha_trainer, _) = ScriptedTrainer::new(1.0, 100);
    let (beta_trainer, _) = ScriptedTrainer::new(2.0, 100);
    let agents = [
        spawn_agent(alpha_opts, alpha_trainer),
        spawn_agent(agent_options(coord.addr, pki_.site_tls("beta"), &p.join("agent-beta"), 0), beta_trainer),
    ];
    for a in agents {
        assert_eq!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 3, rounds_trained: 3 });
    }
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 3 });

    // The installed certificate: the issuing CA's, for alpha, for 30 days, with a key made
    // at the site (not the first one).
    let chain = std::fs::read_to_string(&files.cert).unwrap();
    let info = pki::cert_info(&pki::pem_to_der(&chain).unwrap()).unwrap();
    assert!(info.issuer.contains("issuing CA"), "{}", info.issuer);
    assert!(info.not_after - now > time::Duration::days(29), "{}", info.not_after);
    assert_ne!(std::fs::read_to_string(&files.key).unwrap(), request.key_pem);
    let issued = std::fs::read_to_string(state_dir.join("renewals/issued.jsonl")).unwrap();
    assert!(issued.contains("\"alpha\"") && issued.contains(&info.serial_hex), "{issued}");
    // Never interrupted: three rounds, each with both sites, none failed.
    let history = Store::open(&state_dir).unwrap().state().unwrap().history.clone();
    assert_eq!(history.len(), 3, "{history:?}");
    assert!(history.iter().all(|r| r.sites.len() == 2), "{history:?}");
}
