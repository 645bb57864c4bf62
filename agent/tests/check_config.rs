//! `fedward-agent check-config` and `status` as hospital IT runs them. check-config (issue
//! 18): every file the config
//! names is checked as the daemon would use it, and what is wrong is a configuration error
//! (exit 64) naming the field, never "config ok".

use std::path::Path;
use std::process::{Command, Output};

use fedward_models::bert::{BertClassifier, BertConfig};
use fedward_models::text::TextEncoder;
use fedward_shared::pki::{self, Validity};
use fedward_shared::wire::SiteId;

mod common;

/// A site's directory: PKI from `ca` (or another CA for the certificate when `rogue`),
/// a tiny base model, training data and a config naming them.
fn site(dir: &Path, rogue: bool) -> std::path::PathBuf {
    let validity = Validity::days_from(time::OffsetDateTime::now_utc(), 1);
    let ca = pki::create_ca("consortium", validity, [1; 16]).unwrap();
    let issuer = if rogue { pki::create_ca("elsewhere", validity, [2; 16]).unwrap() } else { ca.clone() };
    let id = SiteId::new("alpha").unwrap();
    let request = pki::site_request(&id).unwrap();
    let cert = pki::sign_site_request(&issuer, &request.csr_pem, &id, validity, [3; 16]).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("site.crt"), cert).unwrap();
    fedward_shared::fsutil::write_private_new(&dir.join("site.key"), request.key_pem.as_bytes()).unwrap();
    let encoder = TextEncoder::tiny(&["needs", "a", "bed", "scan"]);
    let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect();
    let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels, 1, &candle_core::Device::Cpu).unwrap();
    fedward_models::io::export_dir(&model, &encoder, &dir.join("base")).unwrap();
    std::fs::write(dir.join("train.jsonl"), "{\"text\":\"needs a bed\",\"label\":\"bed\"}\n").unwrap();
    common::write_config(dir, "")
}

fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedward-agent")).args(["check-config", "--config"]).arg(config).output().unwrap()
}

fn refused(out: &Output, field: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains(&format!("error: {field}:")), "{field}: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("config ok"));
}

#[test]
fn a_complete_site_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&site(dir.path(), false));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("config ok") && stdout.contains("(1 notes)"), "{stdout}");
}

#[test]
fn missing_data_or_model_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path(), false);
    std::fs::remove_file(dir.path().join("train.jsonl")).unwrap();
    refused(&check(&config), "data.train");
    std::fs::write(dir.path().join("train.jsonl"), "{\"text\":\"x\",\"label\":\"chair\"}\n").unwrap();
    refused(&check(&config), "data.train");
    std::fs::write(dir.path().join("train.jsonl"), "{\"text\":\"x\",\"label\":\"bed\"}\n").unwrap();
    // The triage service's corrections are training data too.
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/feedback.jsonl"), "{\"text\":\"x\",\"label\":\"chair\"}\n").unwrap();
    refused(&check(&config), "data.feedback");
    std::fs::remove_file(dir.path().join("state/feedback.jsonl")).unwrap();
    std::fs::remove_file(dir.path().join("base/tokenizer.json")).unwrap();
    refused(&check(&config), "model.base");
}

#[test]
fn a_certificate_from_another_ca_or_an_open_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    refused(&check(&site(dir.path(), true)), "tls.cert");
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path(), false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("site.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        refused(&check(&config), "tls.key");
    }
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
}

/// `fedward-agent status` and the daemon's loopback `/status` and `/metrics` (issue 22):
/// while it runs (here: unable to reach any coordinator) and after SIGTERM, which it
/// answers by stopping cleanly (exit 0).
#[test]
fn status_says_what_the_daemon_does_and_why_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path(), false);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text = std::fs::read_to_string(&config).unwrap();
    // Nothing listens on port 9 (discard) of loopback: the agent keeps trying.
    let text = text
        .replace("127.0.0.1:7443", "127.0.0.1:9")
        .replace("state_dir = \"state\"", &format!("state_dir = \"state\"\nstatus_listen = \"127.0.0.1:{port}\""));
    std::fs::write(&config, text).unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_fedward-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The endpoint listens, and the daemon has written its status file: both say so.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(daemon.stderr.take().unwrap()));
    let (mut listening, mut ready) = (false, false);
    while !(listening && ready) {
        let line = lines.next().expect("the agent exited early").unwrap();
        listening |= line.contains("status endpoint listening");
        ready |= line.contains("agent state ready");
    }
    std::thread::spawn(move || lines.for_each(drop));
    let (code, status) = http_get(port, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["running"], true, "{status}");
    assert!(["starting", "connecting", "retrying"].contains(&status["daemon"]["phase"].as_str().unwrap()), "{status}");
    assert_eq!(status["training_notes"]["Ok"], 1, "{status}");
    let (code, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    for line in
        ["fedward_agent_build_info{version=", "fedward_agent_running 1", "fedward_agent_training_notes 1", "fedward_agent_epsilon_budget 8"]
    {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }

    let report = Command::new(env!("CARGO_BIN_EXE_fedward-agent")).args(["status", "--config"]).arg(&config).output().unwrap();
    let out = String::from_utf8_lossy(&report.stdout);
    assert!(out.contains(&format!("running (pid {})", daemon.id())), "{out}");
    assert!(out.contains("1 training notes") && out.contains("epsilon 0.000 spent of 8.000"), "{out}");
    // A one-day certificate needs a person.
    assert!(out.contains("ATTENTION: the certificate expires in"), "{out}");
    assert_eq!(report.status.code(), Some(1));

    let killed = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert_eq!(daemon.wait().unwrap().code(), Some(0), "SIGTERM stops the agent cleanly");
    let report = Command::new(env!("CARGO_BIN_EXE_fedward-agent")).args(["status", "--config"]).arg(&config).output().unwrap();
    let out = String::from_utf8_lossy(&report.stdout);
    assert!(out.contains("NOT RUNNING") && out.contains("stopped by a signal"), "{out}");
    assert_eq!(report.status.code(), Some(1));
}
