//! Unauthenticated load against the real coordinator process (issue 17): a flood of
//! handshakes from outside the consortium and 100 enrolled but silent connections neither
//! stop a real round nor leave the coordinator holding memory afterwards.

mod support;

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::Semaphore;

use fedward_shared::wire::Message;
use support::{delta_for, minilm_embedding_model, Consortium, CoordinatorProcess, HandSite, SERVER_NAME};

/// Handshakes the flood attempts, and how many it keeps in flight at once.
const FLOOD: usize = 3000;
const FLOOD_IN_FLIGHT: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_and_silent_connections_neither_stop_a_round_nor_keep_memory() -> Result<()> {
    let idle: Vec<String> = (0..100).map(|i| format!("idle-{i}")).collect();
    let sites: Vec<String> = ["alpha".to_owned(), "beta".to_owned()].into_iter().chain(idle.iter().cloned()).collect();
    let extra = "[aggregation]\nmax_update_norm = 10.0\n[transport]\nhandshake_timeout = \"2s\"\nrequest_timeout = \"2s\"\n";
    // A production-sized model, so that "before" is what a coordinator holds in service;
    // the flood's own cost (quinn's and rustls's working memory, a few MiB) is measured
    // against that. Repeated floods of 3,000 handshakes plateau: it is not a leak.
    let consortium = Consortium::new(&minilm_embedding_model(), "head", &sites, 2, extra)?;
    let coordinator = CoordinatorProcess::start(&consortium)?;
    let addr = consortium.addr;
    // A coordinator in service has done some handshakes before a flood comes: one site in,
    // one outsider turned away, and then its memory is "before".
    let warm = HandSite::connect(addr, consortium.site_tls("alpha")?, 1).await?;
    warm.conn.close(0u32.into(), b"warm-up done");
    let outsider = fedward_net::client_endpoint(addr, consortium.outsider_tls()?, &Default::default())?;
    if let Ok(conn) = outsider.connect(addr, SERVER_NAME)?.await {
        conn.closed().await;
    }
    let before = coordinator.rss_kib("VmRSS:");

    // The flood: outsiders whose certificates another CA signed, as fast as they can.
    let outsider = consortium.outsider_tls()?;
    let flood = tokio::spawn(async move {
        let endpoint = fedward_net::client_endpoint(addr, outsider, &Default::default()).expect("endpoint");
        let in_flight = Arc::new(Semaphore::new(FLOOD_IN_FLIGHT));
        let mut tasks = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            let permit = in_flight.clone().acquire_owned().await.expect("semaphore");
            let connecting = endpoint.connect(addr, SERVER_NAME).expect("connect");
            tasks.push(tokio::spawn(async move {
                // Refused by the gate, failed by TLS, or admitted and then closed: all fine.
                if let Ok(conn) = connecting.await {
                    let _ = conn.closed().await;
                }
                drop(permit);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });

    // 100 enrolled sites connect and say nothing.
    let mut silent = Vec::new();
    for site in &idle {
        let tls = consortium.site_tls(site)?;
        let endpoint = fedward_net::client_endpoint(addr, tls, &Default::default())?;
        let mut conn = None;
        for _ in 0..1000 {
            if let Ok(c) = endpoint.connect(addr, SERVER_NAME)?.await {
                conn = Some(c);
                break;
            }
        }
        silent.push((endpoint, conn.expect("a silent site got in")));
    }

    // Meanwhile a real round: two sites take it and are acknowledged.
    let alpha = HandSite::connect(addr, consortium.site_tls("alpha")?, 1000).await?;
    let beta = HandSite::connect(addr, consortium.site_tls("beta")?, 1000).await?;
    let (a, b) = tokio::join!(alpha.offer(), beta.offer());
    let (a, b) = (a?, b?);
    let (delta_a, delta_b) = (delta_for(&a, 0.01), delta_for(&b, 0.03));
    let (answer_a, answer_b) = tokio::join!(alpha.send_update(&a, &delta_a, 100), beta.send_update(&b, &delta_b, 100));
    assert!(matches!(answer_a?, Message::Ack(_)));
    assert!(matches!(answer_b?, Message::Ack(_)));
    flood.await?;

    // The silent connections are closed by the coordinator, which opened no stream for them.
    for (_, conn) in &silent {
        conn.closed().await;
    }
    drop(silent);
    let state: fedward_shared::history::SavedState =
        serde_json::from_slice(&std::fs::read(consortium.state_dir().join(fedward_shared::history::STATE_FILE))?)?;
    assert_eq!(state.completed_rounds, 1, "the round completed during the flood");
    let after = coordinator.rss_kib("VmRSS:");
    let peak = coordinator.rss_kib("VmHWM:");
    println!("coordinator RSS: {before} KiB before, {after} KiB after, peak {peak} KiB");
    assert!(after * 5 <= before * 6, "memory after the flood {after} KiB is more than 20% above {before} KiB");
    Ok(())
}
