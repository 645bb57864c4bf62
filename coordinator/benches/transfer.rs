//! Bench (not a test): one 22.7M-parameter update from an agent to the coordinator over
//! QUIC with mutual TLS on loopback, beside a raw TCP loopback copy of the same bytes.
//!
//! Runs the real `fedward-coordinator serve` as a child process (so its peak RSS is its
//! own) and speaks the wire protocol with the agent's own stream code (`fedward-net`). Run
//! with `scripts/bench.sh transfer` (`cargo bench`: a release build); prints a table and
//! writes JSON to `--out`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use rand::SeedableRng;

use fedward_shared::plan::PrivacyPlan;
use fedward_shared::wire::{Message, Ready};
use support::{minilm_shaped_model, Consortium, CoordinatorProcess, HandSite};

fn tcp_copy(bytes: &[u8]) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let n = bytes.len();
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf)?;
        Ok(buf.len())
    });
    let started = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.write_all(bytes)?;
    s.flush()?;
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    if got != n {
        bail!("tcp copy lost bytes");
    }
    Ok(n as f64 / 1e6 / secs)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let out: Option<PathBuf> = std::env::args().skip_while(|a| a != "--out").nth(1).map(PathBuf::from);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let model = minilm_shaped_model(&mut rng);
    let params = model.element_count();
    let mb = model.byte_len() as f64 / 1e6;
    println!("update: {params} parameters, {mb:.1} MB");

    let consortium = Consortium::new(&model, "all", &["bench-site".to_owned()], 1, 1, "[aggregation]\nmax_update_norm = 1e9\n")?;
    let coordinator = CoordinatorProcess::start(&consortium)?;
    let site = HandSite::connect(consortium.addr, consortium.site_tls("bench-site")?, 1).await?;
    let offer = site.offer().await?;
    assert_eq!(offer.plan.privacy, PrivacyPlan::Off);
    let conn = &site.conn;
    let rss_before_kib = coordinator.rss_kib("VmRSS:");

    // Download: the coordinator streams the global model.
    let started = Instant::now();
    let global = site.download(&offer).await?;
    let download_mbps = global.byte_len() as f64 / 1e6 / started.elapsed().as_secs_f64();

    // Upload: one update of every tensor.
    let delta = model;
    let started = Instant::now();
    let answer = site.send_update(&offer, &delta, 1000).await?;
    let upload_secs = started.elapsed().as_secs_f64();
    let Message::Ack(_) = answer else { bail!("update not accepted: {answer:?}") };
    let upload_mbps = mb / upload_secs;
    let peak_kib = coordinator.rss_kib("VmHWM:");
    let _ = site.request(&Message::Ready(Ready { have_model: None })).await;
    conn.close(0u32.into(), b"bench done");

    // The same bytes over raw TCP on loopback, in the same run.
    let bytes: Vec<u8> = delta.iter().flat_map(|(_, t)| t.le_bytes().into_owned()).collect();
    let tcp_mbps = tcp_copy(&bytes)?;

    let model_mib = delta.byte_len() as f64 / (1 << 20) as f64;
    println!("{:<44} {:>10}", "measure", "value");
    println!("{:<44} {:>10.0}", "QUIC+mTLS upload, agent -> coordinator (MB/s)", upload_mbps);
    println!("{:<44} {:>10.0}", "QUIC+mTLS download, coordinator -> agent (MB/s)", download_mbps);
    println!("{:<44} {:>10.0}", "raw TCP loopback copy, same bytes (MB/s)", tcp_mbps);
    println!("{:<44} {:>10.2}", "upload / raw TCP", upload_mbps / tcp_mbps);
    println!("{:<44} {:>10.0}", "coordinator RSS before transfer (MiB)", rss_before_kib as f64 / 1024.0);
    println!("{:<44} {:>10.0}", "coordinator peak RSS (MiB)", peak_kib as f64 / 1024.0);
    println!("{:<44} {:>10.2}", "peak RSS / model size", peak_kib as f64 / 1024.0 / model_mib);
    if let Some(out) = out {
        let json = serde_json::json!({
            "parameters": params, "megabytes": mb,
            "quic_upload_mb_s": upload_mbps, "quic_download_mb_s": download_mbps, "tcp_mb_s": tcp_mbps,
            "coordinator_rss_before_mib": rss_before_kib as f64 / 1024.0,
            "coordinator_peak_rss_mib": peak_kib as f64 / 1024.0,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
