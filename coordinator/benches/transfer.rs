//! Bench (not a test): one 22.7M-parameter update from an agent to the coordinator over
//! QUIC with mutual TLS on loopback, beside a raw TCP loopback copy of the same bytes.
//!
//! Runs the real `fedward-coordinator serve` as a child process (so its peak RSS is its
//! own) and speaks the wire protocol with the agent's own stream code (`fedward-net`). Run
//! with `scripts/bench.sh transfer` (`cargo bench`: a release build); prints a table and
//! writes JSON to `--out`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

use fedward_net::{client_endpoint, read_message, read_tensors, write_message, write_tensors};
use fedward_shared::pki::{self, CertifiedKey, Validity};
use fedward_shared::plan::PrivacyPlan;
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::{self, Hello, LocalMetrics, Message, ModelRequest, PrivacyUsed, Ready, SiteId, UpdateHeader};

const SERVER_NAME: &str = "coordinator.bench";
const SITE: &str = "bench-site";

/// A throwaway consortium: its CA, the coordinator's certificate, and the one site's TLS.
struct BenchPki {
    ca: CertifiedKey,
    server: CertifiedKey,
    site_tls: rustls::ClientConfig,
}

impl BenchPki {
    fn new() -> Result<Self> {
        let validity = Validity::days_from(time::OffsetDateTime::now_utc(), 1);
        let ca = pki::create_ca("bench", validity, [1; 16])?;
        let server = pki::issue_server(&ca, &[SERVER_NAME.to_owned()], &["127.0.0.1".parse()?], validity, [2; 16])?;
        let site = SiteId::new(SITE).context("site id")?;
        let request = pki::site_request(&site)?;
        let cert = pki::sign_site_request(&ca, &request.csr_pem, &site, validity, [3; 16])?;
        let site_tls = tls::client_config(&TlsMaterial {
            ca_pem: ca.cert_pem.as_bytes(),
            cert_pem: cert.as_bytes(),
            key_pem: request.key_pem.as_bytes(),
        })?;
        Ok(Self { ca, server, site_tls })
    }
}

/// all-MiniLM-L6-v2's shapes: 22.7M parameters with a 4-label head.
fn minilm_shaped_model(rng: &mut impl Rng) -> TensorSet {
    let (vocab, hidden, inter, layers) = (30522, 384, 1536, 6);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("bert.embeddings.word_embeddings.weight".into(), vec![vocab, hidden]),
        ("bert.embeddings.position_embeddings.weight".into(), vec![512, hidden]),
        ("bert.embeddings.token_type_embeddings.weight".into(), vec![2, hidden]),
        ("bert.embeddings.LayerNorm.weight".into(), vec![hidden]),
        ("bert.embeddings.LayerNorm.bias".into(), vec![hidden]),
        ("bert.pooler.dense.weight".into(), vec![hidden, hidden]),
        ("bert.pooler.dense.bias".into(), vec![hidden]),
        ("classifier.weight".into(), vec![4, hidden]),
        ("classifier.bias".into(), vec![4]),
    ];
    for l in 0..layers {
        let p = format!("bert.encoder.layer.{l}");
        for (n, s) in [
            ("attention.self.query.weight", vec![hidden, hidden]),
            ("attention.self.query.bias", vec![hidden]),
            ("attention.self.key.weight", vec![hidden, hidden]),
            ("attention.self.key.bias", vec![hidden]),
            ("attention.self.value.weight", vec![hidden, hidden]),
            ("attention.self.value.bias", vec![hidden]),
            ("attention.output.dense.weight", vec![hidden, hidden]),
            ("attention.output.dense.bias", vec![hidden]),
            ("attention.output.LayerNorm.weight", vec![hidden]),
            ("attention.output.LayerNorm.bias", vec![hidden]),
            ("intermediate.dense.weight", vec![inter, hidden]),
            ("intermediate.dense.bias", vec![inter]),
            ("output.dense.weight", vec![hidden, inter]),
            ("output.dense.bias", vec![hidden]),
            ("output.LayerNorm.weight", vec![hidden]),
            ("output.LayerNorm.bias", vec![hidden]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            (name, Tensor::new(shape, data).expect("shape"))
        })
        .collect()
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

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

struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_setup(dir: &Path, pki: &BenchPki, model: &TensorSet, port: u16) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("pki"))?;
    std::fs::write(dir.join("pki/ca.crt"), &pki.ca.cert_pem)?;
    std::fs::write(dir.join("pki/coordinator.crt"), &pki.server.cert_pem)?;
    fedward_shared::fsutil::write_private_new(&dir.join("pki/coordinator.key"), pki.server.key_pem.as_bytes())?;
    // The ledger key, where the config's default looks for it (beside coordinator.key).
    fedward_shared::ledger_key::write_keypair(&dir.join("pki"), [42; 32])?;
    std::fs::write(dir.join("init.safetensors"), model.to_safetensors(None)?)?;
    let config = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
state_dir = "state"
[tls]
ca_cert = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[federation]
rounds = 1
min_sites = 1
round_deadline = "10m"
max_concurrent_uploads = 1
[model]
init = "init.safetensors"
[training]
trainable = "all"
[privacy]
mode = "off"
[[sites]]
id = "{SITE}"
"#
    );
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let out: Option<PathBuf> = std::env::args().skip_while(|a| a != "--out").nth(1).map(PathBuf::from);
    let dir = tempfile::tempdir()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let model = minilm_shaped_model(&mut rng);
    let params = model.element_count();
    let mb = model.byte_len() as f64 / 1e6;
    println!("update: {params} parameters, {mb:.1} MB");

    let pki = BenchPki::new()?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = write_setup(dir.path(), &pki, &model, port)?;
    // Cargo builds the package's binary for its benches and names it here.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedward-coordinator"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("FEDWARD_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let stderr = child.stderr.take().context("stderr")?;
    let _coordinator = Coordinator(child);
    // Wait for the coordinator to say it listens, then keep draining its log.
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening for agents") {
                let _ = up_tx.send(());
            }
        }
    });
    up_rx.recv_timeout(Duration::from_secs(120)).context("coordinator did not start")?;

    let addr = format!("127.0.0.1:{port}").parse()?;
    let endpoint = client_endpoint(addr, pki.site_tls.clone(), &Default::default())?;
    let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
    async fn request(conn: &quinn::Connection, msg: &Message) -> Result<Message> {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, msg).await?;
        send.finish()?;
        Ok(read_message(&mut recv).await?)
    }
    let hello = Hello { protocol_version: wire::PROTOCOL_VERSION, software: "bench".into(), capabilities: vec![] };
    let Message::Welcome(_) = request(&conn, &Message::Hello(hello)).await? else { bail!("not welcomed") };
    let Message::RoundOffer(offer) = request(&conn, &Message::Ready(Ready { have_model: None })).await? else { bail!("no offer") };
    assert_eq!(offer.plan.privacy, PrivacyPlan::Off);
    let rss_before_kib = rss_kib(pid, "VmRSS:").unwrap_or(0);

    // Download: the coordinator streams the global model.
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let names: Vec<String> = offer.manifest.iter().map(|s| s.name.clone()).collect();
    write_message(&mut send, &Message::ModelRequest(ModelRequest { round: offer.round, names })).await?;
    send.finish()?;
    let Message::Tensors(specs) = read_message(&mut recv).await? else { bail!("no tensors") };
    let global = read_tensors(&mut recv, &specs).await?;
    let download_mbps = global.byte_len() as f64 / 1e6 / started.elapsed().as_secs_f64();

    // Upload: one update of every tensor.
    let delta = model;
    let specs = delta.specs();
    let header = UpdateHeader {
        round: offer.round,
        num_examples: 1000,
        metrics: LocalMetrics::default(),
        tensors: specs.clone(),
        privacy: PrivacyUsed::off(),
    };
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(&mut send, &Message::Update(header)).await?;
    write_tensors(&mut send, &delta, &specs).await?;
    send.finish()?;
    let answer = read_message(&mut recv).await?;
    let upload_secs = started.elapsed().as_secs_f64();
    let Message::Ack(_) = answer else { bail!("update not accepted: {answer:?}") };
    let upload_mbps = mb / upload_secs;
    let peak_kib = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let _ = request(&conn, &Message::Ready(Ready { have_model: None })).await;
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
