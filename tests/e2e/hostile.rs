//! Hostile peers over real QUIC: an enrolled site that lies in its update, sites that
//! stall their uploads, a site that asks for the model thousands of times over, and a
//! coordinator that lies about the tensors it sends. Each was found against an earlier
//! main (issue 17); each test fails there.

use std::time::Duration;

use fedward_agent::daemon::{DaemonError, DaemonOutcome};
use fedward_coordinator::server::RunOutcome;
use fedward_coordinator::store::Store;
use fedward_shared::config::{Aggregation, Pace};
use fedward_shared::plan::{Trainable, TrainingPlan};
use fedward_shared::tensor::{manifest_digest, TensorSet};
use fedward_shared::wire::{self, Message, ModelRequest, RejectCode, RoundOffer, UpdateHeader, Welcome};
use fedward_tests::*;

use crate::spec;

fn update(offer: &RoundOffer, delta: &TensorSet, num_examples: u64) -> Message {
    Message::Update(UpdateHeader {
        score: None,
        round: offer.round,
        num_examples,
        metrics: Default::default(),
        tensors: delta.specs(),
        privacy: wire::PrivacyUsed::off(),
        encoding: fedward_shared::codec::UpdateEncoding::F32,
    })
}

/// The takeover: an enrolled site claims 2^29 examples and sends values of 1e30. Its
/// weight is clamped and its update clipped to the coordinator's bound, so the new global
/// model lies within that bound of what the honest sites alone make it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_enrolled_site_cannot_take_over_the_global_model() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let bound = 0.5;
    let mut s = spec(dir.path(), 1, 3, vec!["alpha", "beta", "evil"]);
    s.aggregation = Aggregation { max_update_norm: Some(bound), max_examples_per_site: 100, ..Aggregation::default() };
    let coord = CoordinatorHandle::start(&pki, s);

    let evil = ManualSite::connect(&pki, "evil", coord.addr).await;
    let offer = evil.ready();
    let mut status = coord.status.clone();
    status.wait_for(|s| s.phase.starts_with("waiting for quorum (1/")).await.unwrap();
    let mut agents = Vec::new();
    let mut sent = Vec::new();
    for site in ["alpha", "beta"] {
        let (trainer, log) = ScriptedTrainer::new(0.01, 100);
        agents.push(spawn_agent(agent_options(coord.addr, pki.site_tls(site), &dir.path().join(site), 0), trainer));
        sent.push(log);
    }
    let Message::RoundOffer(offer) = offer.await.unwrap() else { panic!("expected an offer") };
    let huge = delta_for(&offer, 1e30);
    let answer = evil.exchange(&update(&offer, &huge, wire_max_examples()), Some(&huge)).await;
    assert!(matches!(answer, Message::Ack(_)), "clipped, not refused: {answer:?}");
    for a in agents {
        assert!(matches!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 1, .. }));
    }
    drop(evil);
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 1 });

    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let (model, _) = store.load_current().unwrap().unwrap();
    let mut honest = tiny_global();
    let deltas: Vec<_> = sent.iter().map(|l| l.lock().unwrap()[0].delta.clone()).collect();
    apply_weighted_mean(&mut honest, &[(100, &deltas[0]), (100, &deltas[1])]);
    let distance = model.delta_from(&honest).unwrap().l2_norm();
    assert!(distance <= bound, "the attacker moved the model {distance} from the honest sites' mean (bound {bound})");
    let record = &store.state().unwrap().history[0];
    let evil_record = record.sites.iter().find(|s| s.site == "evil").unwrap();
    assert_eq!((evil_record.num_examples, evil_record.weight), (wire_max_examples(), Some(100)));
    assert!(evil_record.scale.unwrap() < 1e-29, "recorded as clipped: {evil_record:?}");
}

/// The coordinator's last word on an upload stream (past its `Proceed`, if any).
async fn final_answer(recv: &mut quinn::RecvStream) -> Message {
    loop {
        match fedward_net::read_message(recv).await.unwrap() {
            Message::Proceed(_) => continue,
            answer => return answer,
        }
    }
}

fn wire_max_examples() -> u64 {
    fedward_coordinator::aggregate::MAX_EXAMPLES
}

/// Two sites send an update header and then stall. With one upload slot they held it
/// for good, every honest upload waited, and the round failed. Now a slot is taken only
/// after admission, a transfer below the minimum rate is refused, and the honest sites'
/// round completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_do_not_hold_up_the_honest_sites() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 1, 2, vec!["alpha", "beta", "stall-1", "stall-2"]);
    s.max_concurrent_uploads = 1;
    s.deadline = Duration::from_secs(120);
    s.transport.pace = Pace { allowance: Duration::from_millis(500), min_bytes_per_sec: 1 << 20 };
    let coord = CoordinatorHandle::start(&pki, s);

    // The stallers are ready first, so they open the round and start uploading before the
    // honest sites even connect.
    let mut stallers = Vec::new();
    for site in ["stall-1", "stall-2"] {
        let m = ManualSite::connect(&pki, site, coord.addr).await;
        let offer = m.ready();
        stallers.push((m, offer));
    }
    let mut stalled_streams = Vec::new();
    for (m, offer) in &mut stallers {
        let Message::RoundOffer(offer) = offer.await.unwrap() else { panic!("expected an offer") };
        let delta = delta_for(&offer, 0.0);
        let (mut send, recv) = m.conn.open_bi().await.unwrap();
        fedward_net::write_message(&mut send, &update(&offer, &delta, 10)).await.unwrap();
        // A few bytes without waiting to be told, and nothing more: the stream stays open.
        send.write_all(&[0u8; 8]).await.unwrap();
        stalled_streams.push((send, recv));
    }
    let mut agents = Vec::new();
    for site in ["alpha", "beta"] {
        let (trainer, _) = ScriptedTrainer::new(0.01, 100);
        agents.push(spawn_agent(agent_options(coord.addr, pki.site_tls(site), &dir.path().join(site), 0), trainer));
    }
    for a in agents {
        assert!(matches!(a.await.unwrap().unwrap(), DaemonOutcome::Finished { completed_rounds: 1, .. }));
    }
    for (_, recv) in &mut stalled_streams {
        let Message::Reject(r) = final_answer(recv).await else { panic!("expected a reject") };
        assert_eq!(r.code, RejectCode::TooSlow, "{}", r.message);
    }
    drop(stalled_streams);
    drop(stallers);
    assert_eq!(coord.outcome().await, RunOutcome::Completed { rounds: 1 });
    let store = Store::open(&dir.path().join("coordinator")).unwrap();
    let record = &store.state().unwrap().history[0];
    assert_eq!(record.sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
    assert_eq!(record.rejected.iter().filter(|(_, r)| r.starts_with("too-slow")).count(), 2, "{:?}", record.rejected);
}

/// An upload still arriving when the round closes is stopped and told so at once, not
/// left to run out its transfer time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_round_stops_the_uploads_still_arriving() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let mut s = spec(dir.path(), 2, 1, vec!["alpha", "slow"]);
    s.deadline = Duration::from_secs(5);
    // Far longer than the test: only the round's close can end this transfer.
    s.transport.pace = Pace { allowance: Duration::from_secs(3600), min_bytes_per_sec: 1 };
    let coord = CoordinatorHandle::start(&pki, s);
    let slow = ManualSite::connect(&pki, "slow", coord.addr).await;
    let Message::RoundOffer(offer) = slow.ready().await.unwrap() else { panic!("expected an offer") };
    let delta = delta_for(&offer, 0.0);
    let (mut send, mut recv) = slow.conn.open_bi().await.unwrap();
    fedward_net::write_message(&mut send, &update(&offer, &delta, 10)).await.unwrap();
    send.write_all(&[0u8; 8]).await.unwrap();
    // The round closes at its deadline without the slow site (quorum 1 is not met, so it
    // fails): the stalled upload is answered then.
    let Message::Reject(r) = final_answer(&mut recv).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::StaleRound, "{}", r.message);
    assert!(r.message.contains("closed while the update was arriving"), "{}", r.message);
    drop((send, recv, slow));
    let mut status = coord.status.clone();
    status.wait_for(|s| s.open_round.is_none()).await.unwrap();
}

/// The amplification: a site names the same tensor ten thousand times in one model
/// request. Refused before any hashing or sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_request_naming_a_tensor_many_times_is_refused() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let coord = CoordinatorHandle::start(&pki, spec(dir.path(), 1, 1, vec!["greedy"]));
    let greedy = ManualSite::connect(&pki, "greedy", coord.addr).await;
    let Message::RoundOffer(offer) = greedy.ready().await.unwrap() else { panic!("expected an offer") };
    let name = offer.manifest[0].name.clone();
    let request = Message::ModelRequest(ModelRequest { round: offer.round, names: vec![name.clone(); 10_000] });
    let Message::Reject(r) = greedy.exchange(&request, None).await else { panic!("expected a reject") };
    assert_eq!(r.code, RejectCode::Malformed);
    // One copy of each is served.
    let request = Message::ModelRequest(ModelRequest { round: offer.round, names: vec![name] });
    assert!(matches!(greedy.exchange(&request, None).await, Message::Tensors(specs) if specs.len() == 1));
}

/// A coordinator (or whoever holds its key) answers the agent's model request with a
/// tensor shaped far larger than the one it offered. The agent refuses before allocating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_tensors_shaped_other_than_offered() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("e2e");
    let endpoint =
        fedward_net::server_endpoint("127.0.0.1:0".parse().unwrap(), pki.server_tls(), &test_transport(), &Default::default(), &[7; 32])
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let model = tiny_global();
    let fake = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        loop {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            let answer = match fedward_net::read_message(&mut recv).await.unwrap() {
                Message::Hello(_) => Message::Welcome(Welcome {
                    site: wire::SiteId::new("alpha").unwrap(),
                    protocol_version: wire::PROTOCOL_VERSION,
                    completed_rounds: 0,
                    total_rounds: 1,
                    accepted: Vec::new(),
                }),
                Message::Ready(_) => {
                    let manifest = model.specs();
                    Message::RoundOffer(RoundOffer {
                        scoring: None,
                        round: wire::RoundId(1),
                        model_digest: manifest_digest(&manifest),
                        manifest,
                        plan: TrainingPlan::minimal(Trainable::Head, Trainable::Head.select(model.names())),
                        policy: no_privacy().1,
                        deadline_secs: 60,
                        total_rounds: 1,
                        update_encoding: fedward_shared::codec::UpdateEncoding::F32,
                        secure: None,
                    })
                }
                Message::ModelRequest(req) => {
                    let mut specs: Vec<_> = model.specs().into_iter().filter(|s| req.names.contains(&s.name)).collect();
                    // A gibibyte where the offer said 16 x 8.
                    specs[0].shape = vec![1 << 28];
                    Message::Tensors(specs)
                }
                other => panic!("unexpected {other:?}"),
            };
            fedward_net::reply(&mut send, &answer).await.unwrap();
        }
    });
    let (trainer, sent) = ScriptedTrainer::new(0.01, 100);
    let outcome = spawn_agent(agent_options(addr, pki.site_tls("alpha"), &dir.path().join("alpha"), 1), trainer).await.unwrap();
    let Err(DaemonError::GaveUp { last, .. }) = outcome else { panic!("expected the agent to give up: {outcome:?}") };
    assert!(last.contains("as [268435456]") && last.contains("offered it as [16, 8]"), "{last}");
    assert!(sent.lock().unwrap().is_empty(), "nothing was trained");
    fake.abort();
}
