//! End-to-end tests over real QUIC with mutual TLS on 127.0.0.1: federation rounds,
//! refusals, a coordinator crash and restart, and a malformed update.

use std::time::Duration;

use fedward_agent::daemon::{DaemonError, DaemonOutcome};
use fedward_coordinator::server::RunOutcome;
use fedward_coordinator::store::Store;
use fedward_shared::ledger::Body;
use fedward_shared::pki::Validity;
use fedward_shared::wire::{self, Message, Ready, RejectCode};
use fedward_tests::*;

fn spec(dir: &std::path::Path, rounds: u64, min_sites: usize, sites: Vec<&'static str>) -> CoordinatorSpec {
    CoordinatorSpec {
        rounds,
        min_sites,
        deadline: Duration::from_secs(60),
        sites,
        state_dir: dir.join("coordinator"),
        addr: "127.0.0.1:0".parse().unwrap(),
    }
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

    // Recompute the global model from what the agents actually sent.
    let mut expected = tiny_global();
    for round in 1..=2 {
        let sent: Vec<Sent> = logs
            .iter()
            .map(|l| l.lock().unwrap().iter().find(|s| s.round.0 == round).cloned().expect("each agent sent each round"))
            .collect();
        // Every agent trained on the same global model, the one the coordinator built.
        assert!(sent.iter().all(|s| s.global_digest == expected.digest().to_hex()), "round {round}");
        let updates: Vec<(u64, &_)> = sent.iter().map(|s| (s.num_examples, &s.delta)).collect();
        apply_weighted_mean(&mut expected, &updates);
    }
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let (model, completed) = store.load_current().unwrap().unwrap();
    assert_eq!(completed, 2);
    for (name, t) in model.iter() {
        let e = expected.get(name).unwrap();
        for (a, b) in t.data().iter().zip(e.data()) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}: {a} vs {b}");
        }
    }
    // Frozen tensors never moved.
    assert_eq!(
        model.get("bert.encoder.layer.0.output.dense.weight"),
        tiny_global().get("bert.encoder.layer.0.output.dense.weight")
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_update_is_rejected_and_the_other_sites_round_completes() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 2, vec!["alpha", "beta", "broken"]));
    let (good_a, sent_a) = ScriptedTrainer::new(1.0, 100);
    let (good_b, sent_b) = ScriptedTrainer::new(3.0, 300);
    let (mut bad, _) = ScriptedTrainer::new(100.0, 1000);
    bad.poison = true;
    let handles = [
        spawn_agent(agent_options(coord.addr, pki.site_tls("alpha"), &dir.path().join("a"), 0), good_a),
        spawn_agent(agent_options(coord.addr, pki.site_tls("beta"), &dir.path().join("b"), 0), good_b),
        spawn_agent(agent_options(coord.addr, pki.site_tls("broken"), &dir.path().join("c"), 0), bad),
    ];
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
    let endpoint =
        fedward_agent::net::client_endpoint(coord.addr, (*pki.site_tls("alpha")).clone(), Duration::from_secs(3)).unwrap();
    let conn = endpoint.connect(coord.addr, SERVER_NAME).unwrap().await.unwrap();

    async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Message {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send.finish().unwrap();
        fedward_agent::net::read_message(&mut recv).await.unwrap()
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
    let Message::Reject(r) = exchange(&conn, &wire::encode(&Message::Ready(Ready { have_model: None })).unwrap()[..0]).await
    else {
        panic!("expected a reject")
    };
    assert_eq!(r.code, RejectCode::Malformed);
    let ack = wire::encode(&Message::Ack(wire::Ack { round: wire::RoundId(1) })).unwrap();
    let Message::Reject(r) = exchange(&conn, &ack).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::UnexpectedMessage);
    // The connection survived all of it.
    let hello = wire::Hello { protocol_version: wire::PROTOCOL_VERSION, software: "probe".into(), capabilities: vec![] };
    assert!(matches!(exchange(&conn, &wire::encode(&Message::Hello(hello)).unwrap()).await, Message::Welcome(_)));
    let old = wire::Hello { protocol_version: 99, software: "old".into(), capabilities: vec![] };
    let Message::Reject(r) = exchange(&conn, &wire::encode(&Message::Hello(old)).unwrap()).await else { panic!() };
    assert_eq!(r.code, RejectCode::UnsupportedVersion);
}
