//! `fedward-agent check-config` as hospital IT runs it (issue 18): every file the config
//! names is checked as the daemon would use it, and what is wrong is a configuration error
//! (exit 64) naming the field, never "config ok".

use std::path::Path;
use std::process::{Command, Output};

use fedward_models::bert::{BertClassifier, BertConfig};
use fedward_models::text::TextEncoder;
use fedward_shared::pki::{self, Validity};
use fedward_shared::wire::SiteId;

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
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        r#"[coordinator]
address = "127.0.0.1:7443"
server_name = "coordinator.test"
[tls]
ca_cert = "ca.crt"
cert = "site.crt"
key = "site.key"
[data]
train = "train.jsonl"
[model]
base = "base"
[budget]
max_epsilon = 8.0
delta = 1e-5
[agent]
state_dir = "state"
"#,
    )
    .unwrap();
    config
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
