//! Bench (not a test): `POST /v1/requests` of the triage service on CPU, one request at a
//! time, beside `predict` on the same notes in the same process (issue 20: p50 <= 30 ms,
//! p99 <= 120 ms with MiniLM on notes up to 128 tokens).
//!
//! Needs `scripts/fetch-models.sh`. Run with `scripts/bench.sh triage`. The model is the
//! pretrained MiniLM with a seeded head (a trained head costs the same); the notes are the
//! demo generator's (seed 7), capped at 128 tokens as the service caps them. The service
//! runs in this process on its own runtime, on a loopback port, with a capacity of 500
//! units, so each request also runs an allocation epoch over a queue that grows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use fedward_agent::service::{serve, ServeOptions};
use fedward_shared::config::AgentConfig;

const NOTES: usize = 200;
const MAX_SEQ_LEN: usize = 128;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    let (p50, p99, mean) = (percentile(&ms, 0.5), percentile(&ms, 0.99), ms.iter().sum::<f64>() / ms.len() as f64);
    println!("{name:<28} n {:>4}  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  mean {mean:>7.2} ms", ms.len());
    serde_json::json!({ "n": ms.len(), "p50_ms": p50, "p99_ms": p99, "mean_ms": mean })
}

fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}

fn main() -> anyhow::Result<()> {
    let out = std::env::args().skip_while(|a| a != "--out").nth(1);
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models-data/all-MiniLM-L6-v2");
    anyhow::ensure!(base.join("model.safetensors").exists(), "run scripts/fetch-models.sh first ({} is missing)", base.display());
    let labels: Vec<String> = fedward_shared::config::DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect();
    let dir = tempfile::tempdir()?;
    let (model, encoder) = fedward_models::io::load_dir(&base, Some(&labels), 0, &candle_core::Device::Cpu)?;
    fedward_models::io::export_dir(&model, &encoder, &dir.path().join("model"))?;
    std::fs::write(dir.path().join("train.jsonl"), "{\"text\":\"needs a bed\",\"label\":\"bed\"}\n")?;

    let corpus =
        fedward_corpus::synth::generate(&fedward_corpus::synth::SynthConfig::new(7, fedward_corpus::synth::SynthConfig::default_sites()))?;
    let notes: Vec<String> = corpus.sites.iter().flat_map(|s| s.test.iter().map(|e| e.text.clone())).take(NOTES).collect();

    // predict, one note at a time: the floor the service adds HTTP, JSON and allocation to.
    let mut predict_ms = Vec::new();
    for note in &notes {
        let started = Instant::now();
        fedward_models::train::predict(&model, &encoder, &[note.as_str()], MAX_SEQ_LEN)?;
        predict_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = format!(
        r#"[coordinator]
address = "127.0.0.1:7443"
server_name = "coordinator.bench"
[tls]
ca_cert = "ca.crt"
cert = "site.crt"
key = "site.key"
[data]
train = "train.jsonl"
[model]
base = "model"
[budget]
max_epsilon = 8.0
delta = 1e-5
[agent]
state_dir = "state"
device = "cpu"
[service]
listen = "{addr}"
"#
    );
    let config = AgentConfig::parse(&config, dir.path())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions { config, model_dir: Some(dir.path().join("model")), max_seq_len: MAX_SEQ_LEN };
    let server = std::thread::spawn(move || {
        tokio::runtime::Runtime::new().expect("runtime").block_on(serve(options, async {
            let _ = stopped.await;
        }))
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while TcpStream::connect(addr).is_err() || call(addr, "GET", "/healthz", "").0 != 200 {
        anyhow::ensure!(Instant::now() < deadline, "the service did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let capacity = serde_json::json!({"resources": [
        {"kind": "bed", "group": "medical", "total": 150, "free": 150},
        {"kind": "bed", "group": "surgical", "features": ["isolation"], "total": 50, "free": 50},
        {"kind": "doctor", "group": "emergency", "total": 100, "free": 100},
        {"kind": "doctor", "group": "cardiology", "total": 50, "free": 50},
        {"kind": "device", "group": "ventilator", "total": 50, "free": 50},
        {"kind": "device", "group": "infusion-pump", "total": 100, "free": 100}
    ]});
    assert_eq!(call(addr, "PUT", "/v1/capacity", &capacity.to_string()).0, 200);
    let mut service_ms = Vec::new();
    for (i, note) in notes.iter().enumerate() {
        let body = serde_json::json!({"note": note, "urgency": 1 + i % 5, "ward": if i % 2 == 0 { "medical" } else { "surgical" }});
        let started = Instant::now();
        let (status, response) = call(addr, "POST", "/v1/requests", &body.to_string());
        service_ms.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status == 201, "request {i} answered {status}: {response}");
    }
    let _ = stop.send(());
    server.join().map_err(|_| anyhow::anyhow!("the service thread panicked"))??;

    println!("triage service on CPU, MiniLM, notes capped at {MAX_SEQ_LEN} tokens, one request at a time:");
    let report = serde_json::json!({
        "notes": notes.len(),
        "max_seq_len": MAX_SEQ_LEN,
        "predict": summary("predict (in process)", predict_ms),
        "post_requests": summary("POST /v1/requests (HTTP)", service_ms),
    });
    if let Some(out) = out {
        std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
        println!("written to {out}");
    }
    Ok(())
}
