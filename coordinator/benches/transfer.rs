//! Bench (not a test): one 22.7M-parameter update from an agent to the coordinator over
//! QUIC with mutual TLS on loopback, and the global model back, beside copies of the same
//! bytes over QUIC, TLS 1.3 over TCP and raw TCP measured in the same run.
//!
//! Runs the real `fedward-coordinator serve` as a child process (so its peak RSS is its
//! own) and speaks the wire protocol with the agent's own stream code (`fedward-net`). Run
//! with `scripts/bench.sh transfer` (`cargo bench`: a release build); `--rounds N` (default
//! 3) repeats every measure N times and reports the median. Prints a table and writes JSON
//! to `--out`.
//!
//! What each line moves:
//! - QUIC upload / download: a whole round's update to the coordinator (timed to its
//!   `Ack`: the digest checks, FedAvg fold and ledger fsync included), and the global model
//!   back (the coordinator streams it from its checkpoint file; the bench reads it with
//!   `fedward_net::read_tensors`).
//! - QUIC copy: the same tensors between two `fedward-net` endpoints in this process
//!   (`write_tensors` -> `read_tensors`, digests checked): the transport alone.
//! - TLS 1.3 over TCP: tokio-rustls with the same certificates and rustls configs
//!   (`fedward_shared::tls`, mutual auth, ring), the same tensors read into place and their
//!   digests checked: the figure QUIC is held to.
//! - raw TCP: the bytes alone, one buffer, blocking sockets: the ceiling.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use fedward_shared::config::{Admission, Transport};
use fedward_shared::plan::PrivacyPlan;
use fedward_shared::tensor::{TensorSet, TensorSpec};
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::{self, Message, Ready, RoundOffer};
use support::{minilm_shaped_model, Consortium, CoordinatorProcess, HandSite, SERVER_NAME};

/// The coordinator's rustls server config, from the consortium's files.
fn server_tls(consortium: &Consortium) -> Result<rustls::ServerConfig> {
    let pki = consortium.dir.path().join("pki");
    let ca = std::fs::read(pki.join("ca.crt"))?;
    let cert = std::fs::read(pki.join("coordinator.crt"))?;
    let key = std::fs::read(pki.join("coordinator.key"))?;
    Ok(tls::server_config(&TlsMaterial { ca_pem: &ca, cert_pem: &cert, key_pem: &key }, None)?)
}

/// Reads the declared tensors into place and checks their digests, from any byte stream:
/// what `fedward_net::read_tensors` does on a QUIC stream.
async fn read_tensors_from(r: &mut (impl tokio::io::AsyncRead + Unpin), specs: &[TensorSpec]) -> Result<usize> {
    let mut got = 0;
    for spec in specs {
        let mut t = wire::alloc_tensor(spec);
        got += r.read_exact(wire::tensor_bytes_mut(&mut t)).await?;
        wire::finish_tensor(spec, &mut t)?;
    }
    Ok(got)
}

/// The tensors over TLS 1.3 on TCP loopback, mutual auth with the consortium's
/// certificates; MB/s from the first byte written to the receiver's one-byte answer (the
/// handshake excluded, as for QUIC).
async fn tls_copy(consortium: &Consortium, model: &TensorSet) -> Result<f64> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(consortium)?));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(consortium.site_tls("bench-site")?));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let specs = model.specs();
    let reader = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut s = acceptor.accept(tcp).await?;
        let got = read_tensors_from(&mut s, &specs).await?;
        s.write_all(&[1]).await?;
        s.flush().await?;
        s.shutdown().await?;
        anyhow::Ok(got)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)?;
    let mut s = connector.connect(name, tcp).await?;
    let started = Instant::now();
    for (_, t) in model.iter() {
        s.write_all(&t.le_bytes()).await?;
    }
    s.flush().await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    let secs = started.elapsed().as_secs_f64();
    let got = reader.await??;
    if got != model.byte_len() {
        bail!("tls copy lost bytes");
    }
    Ok(got as f64 / 1e6 / secs)
}

/// The tensors between two `fedward-net` endpoints (the coordinator's and an agent's
/// settings) in this process; timed like [`tls_copy`].
async fn quic_copy(consortium: &Consortium, model: &TensorSet) -> Result<(f64, u16)> {
    let local: SocketAddr = "127.0.0.1:0".parse()?;
    let transport = Transport::default();
    let server = fedward_net::server_endpoint(local, server_tls(consortium)?, &transport, &Admission::default(), &[7; 32])?;
    let addr = server.local_addr()?;
    let specs = model.specs();
    let reader = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let got = fedward_net::read_tensors(&mut recv, &specs).await?.byte_len();
        send.write_all(&[1]).await?;
        send.finish()?;
        let _ = conn.closed().await;
        anyhow::Ok(got)
    });
    let client = fedward_net::client_endpoint(addr, consortium.site_tls("bench-site")?, &transport)?;
    let conn = client.connect(addr, SERVER_NAME)?.await?;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    fedward_net::write_tensors(&mut send, model, &model.specs()).await?;
    send.finish()?;
    let mut answer = [0u8; 1];
    recv.read_exact(&mut answer).await?;
    let secs = started.elapsed().as_secs_f64();
    let stats = conn.stats();
    let mtu = stats.path.current_mtu;
    if std::env::var_os("FEDWARD_BENCH_STATS").is_some() {
        eprintln!("quic copy: {:.0} MB/s, {stats:?}", got_mb(model) / secs);
    }
    conn.close(0u32.into(), b"done");
    let got = reader.await??;
    client.wait_idle().await;
    if got != model.byte_len() {
        bail!("quic copy lost bytes");
    }
    Ok((got as f64 / 1e6 / secs, mtu))
}

/// `HandSite::download`, saying what came instead of the tensors. A request the
/// coordinator calls stale right after its offer is asked again: the coordinator can
/// publish a new round's status a moment after its offer goes out (seen on a loaded
/// machine), and that race is not what this bench measures.
async fn download(site: &HandSite, offer: &RoundOffer) -> Result<(TensorSet, f64)> {
    let mut attempts = 0;
    loop {
        let started = Instant::now();
        let (mut send, mut recv) = site.conn.open_bi().await?;
        let names = offer.manifest.iter().map(|s| s.name.clone()).collect();
        fedward_net::write_message(&mut send, &Message::ModelRequest(wire::ModelRequest { round: offer.round, names })).await?;
        send.finish()?;
        match fedward_net::read_message(&mut recv).await? {
            Message::Tensors(specs) => {
                let set = fedward_net::read_tensors(&mut recv, &specs).await?;
                return Ok((set, started.elapsed().as_secs_f64()));
            }
            Message::Reject(r) if r.code == wire::RejectCode::StaleRound && attempts < 5 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => bail!("expected tensors, got {other:?}"),
        }
    }
}

fn got_mb(model: &TensorSet) -> f64 {
    model.byte_len() as f64 / 1e6
}

/// The bytes alone over TCP loopback, blocking sockets, one buffer.
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

/// CPU-seconds (user + system, all threads) a process has used so far, from
/// `/proc/<pid>/stat` (clock ticks, assumed 100 per second as on Linux); 0 elsewhere.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are the 14th and 15th fields; `fields` starts at the 3rd.
    (tick(11) + tick(12)) / 100.0
}

/// CPU-seconds used by this process and the coordinator together.
fn cpu_both(coordinator: &str) -> f64 {
    cpu_secs("self") + cpu_secs(coordinator)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Default)]
struct Series {
    upload: Vec<f64>,
    download: Vec<f64>,
    quic_copy: Vec<f64>,
    tls: Vec<f64>,
    tcp: Vec<f64>,
    /// MB per CPU-second, both ends together: what a loaded machine cannot skew.
    upload_cpu: Vec<f64>,
    download_cpu: Vec<f64>,
    quic_copy_cpu: Vec<f64>,
    tls_cpu: Vec<f64>,
    /// The path MTU the QUIC copy ended with (MTU discovery's result).
    mtu: u16,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().skip_while(|a| *a != name).nth(1).cloned();
    let out: Option<PathBuf> = arg("--out").map(PathBuf::from);
    let rounds: u64 = arg("--rounds").map(|r| r.parse()).transpose()?.unwrap_or(3).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let model = minilm_shaped_model(&mut rng);
    let params = model.element_count();
    let mb = model.byte_len() as f64 / 1e6;
    println!("update: {params} parameters, {mb:.1} MB, {rounds} rounds");

    let consortium = Consortium::new(&model, "all", &["bench-site".to_owned()], 1, rounds, "[aggregation]\nmax_update_norm = 1e9\n")?;
    let coordinator = CoordinatorProcess::start(&consortium)?;
    let site = HandSite::connect(consortium.addr, consortium.site_tls("bench-site")?, 1).await?;
    let rss_before_kib = coordinator.rss_kib("VmRSS:");
    let pid = coordinator.pid.to_string();
    let bytes: Vec<u8> = model.iter().flat_map(|(_, t)| t.le_bytes().into_owned()).collect();
    let mut s = Series::default();
    for round in 1..=rounds {
        let offer = site.offer().await?;
        assert_eq!(offer.plan.privacy, PrivacyPlan::Off);

        // Download: the coordinator streams the global model.
        let cpu = cpu_both(&pid);
        let (global, secs) = download(&site, &offer).await.with_context(|| format!("download in round {round}"))?;
        s.download.push(global.byte_len() as f64 / 1e6 / secs);
        s.download_cpu.push(mb / (cpu_both(&pid) - cpu).max(0.01));

        // Upload: one update of every tensor (the initial model as the delta).
        let cpu = cpu_both(&pid);
        let started = Instant::now();
        let answer = site.send_update(&offer, &model, 1000).await?;
        let upload_secs = started.elapsed().as_secs_f64();
        let Message::Ack(_) = answer else { bail!("update not accepted in round {round}: {answer:?}") };
        s.upload.push(mb / upload_secs);
        s.upload_cpu.push(mb / (cpu_both(&pid) - cpu).max(0.01));

        // The same bytes over the other transports, interleaved with the rounds.
        let cpu = cpu_secs("self");
        let (copy, mtu) = quic_copy(&consortium, &model).await?;
        s.quic_copy_cpu.push(mb / (cpu_secs("self") - cpu).max(0.01));
        s.quic_copy.push(copy);
        s.mtu = mtu;
        let cpu = cpu_secs("self");
        s.tls.push(tls_copy(&consortium, &model).await?);
        s.tls_cpu.push(mb / (cpu_secs("self") - cpu).max(0.01));
        s.tcp.push(tcp_copy(&bytes)?);
    }
    let site_mtu = site.conn.stats().path.current_mtu;
    let peak_kib = coordinator.rss_kib("VmHWM:");
    let _ = site.request(&Message::Ready(Ready { have_model: None })).await;
    site.conn.close(0u32.into(), b"bench done");

    let (up, down, copy, tls, tcp) = (median(&s.upload), median(&s.download), median(&s.quic_copy), median(&s.tls), median(&s.tcp));
    let all = |xs: &[f64]| xs.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    let model_mib = model.byte_len() as f64 / (1 << 20) as f64;
    println!("{:<50} {:>8}  each run", "measure (median of runs)", "value");
    println!("{:<50} {:>8.0}  {}", "QUIC+mTLS upload, agent -> coordinator (MB/s)", up, all(&s.upload));
    println!("{:<50} {:>8.0}  {}", "QUIC+mTLS download, coordinator -> agent (MB/s)", down, all(&s.download));
    println!("{:<50} {:>8.0}  {}", "QUIC+mTLS copy, fedward-net endpoints (MB/s)", copy, all(&s.quic_copy));
    println!("{:<50} {:>8.0}  {}", "TLS 1.3 over TCP copy, same certs (MB/s)", tls, all(&s.tls));
    println!("{:<50} {:>8.0}  {}", "raw TCP loopback copy, same bytes (MB/s)", tcp, all(&s.tcp));
    let best = |xs: &[f64]| xs.iter().copied().fold(f64::NAN, f64::max);
    println!("{:<50} {:>8.2}", "upload / TLS-over-TCP", up / tls);
    println!("{:<50} {:>8.2}", "upload / TLS-over-TCP, best of runs", best(&s.upload) / best(&s.tls));
    println!("{:<50} {:>8.2}", "download / TLS-over-TCP, best of runs", best(&s.download) / best(&s.tls));
    println!("{:<50} {:>8.2}", "download / TLS-over-TCP", down / tls);
    println!("{:<50} {:>8.2}", "QUIC copy / TLS-over-TCP", copy / tls);
    println!("{:<50} {:>8.2}", "TLS-over-TCP / raw TCP", tls / tcp);
    let (up_cpu, down_cpu, copy_cpu, tls_cpu) =
        (median(&s.upload_cpu), median(&s.download_cpu), median(&s.quic_copy_cpu), median(&s.tls_cpu));
    println!("{:<50} {:>8.0}  {}", "QUIC upload, MB per CPU-second (both ends)", up_cpu, all(&s.upload_cpu));
    println!("{:<50} {:>8.0}  {}", "QUIC download, MB per CPU-second", down_cpu, all(&s.download_cpu));
    println!("{:<50} {:>8.0}  {}", "QUIC copy, MB per CPU-second", copy_cpu, all(&s.quic_copy_cpu));
    println!("{:<50} {:>8.0}  {}", "TLS-over-TCP copy, MB per CPU-second", tls_cpu, all(&s.tls_cpu));
    println!("{:<50} {:>8.2}", "per CPU-second: upload / TLS-over-TCP", up_cpu / tls_cpu);
    println!("{:<50} {:>8.2}", "per CPU-second: download / TLS-over-TCP", down_cpu / tls_cpu);
    println!("{:<50} {:>8.2}", "per CPU-second: QUIC copy / TLS-over-TCP", copy_cpu / tls_cpu);
    println!("{:<50} {:>8}", "path MTU, agent connection / QUIC copy (bytes)", format!("{site_mtu}/{}", s.mtu));
    println!("{:<50} {:>8.0}", "coordinator RSS before transfer (MiB)", rss_before_kib as f64 / 1024.0);
    println!("{:<50} {:>8.0}", "coordinator peak RSS (MiB)", peak_kib as f64 / 1024.0);
    println!("{:<50} {:>8.2}", "peak RSS / model size", peak_kib as f64 / 1024.0 / model_mib);
    if let Some(out) = out {
        let json = serde_json::json!({
            "parameters": params, "megabytes": mb, "rounds": rounds,
            "quic_upload_mb_s": up, "quic_download_mb_s": down, "quic_copy_mb_s": copy,
            "tls_tcp_mb_s": tls, "tcp_mb_s": tcp, "path_mtu": site_mtu,
            "mb_per_cpu_s": { "quic_upload": up_cpu, "quic_download": down_cpu, "quic_copy": copy_cpu, "tls_tcp": tls_cpu },
            "upload_over_tls": up / tls, "download_over_tls": down / tls, "quic_copy_over_tls": copy / tls,
            "runs": {
                "quic_upload_mb_s": s.upload, "quic_download_mb_s": s.download, "quic_copy_mb_s": s.quic_copy,
                "tls_tcp_mb_s": s.tls, "tcp_mb_s": s.tcp,
            },
            "coordinator_rss_before_mib": rss_before_kib as f64 / 1024.0,
            "coordinator_peak_rss_mib": peak_kib as f64 / 1024.0,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
