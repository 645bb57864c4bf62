//! `fedward-agent serve` over real HTTP on loopback (issue 20): a request is classified
//! and allocated, capacity changes and releases move the queue, a correction reaches the
//! site's data file, malformed bodies are answered 400 with a reason and change nothing,
//! the model is reloaded when the daemon replaces it, and no note's text is ever logged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Duration;

use fedward_models::bert::{BertClassifier, BertConfig};
use fedward_models::text::TextEncoder;
use serde_json::{json, Value};

mod common;

const WORDS: [&str; 8] = ["needs", "a", "bed", "scan", "doctor", "pump", "zebra", "note"];

fn labels() -> Vec<String> {
    ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect()
}

fn tiny(seed: u64) -> (BertClassifier, TextEncoder) {
    let encoder = TextEncoder::tiny(&WORDS);
    let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels(), seed, &candle_core::Device::Cpu).unwrap();
    (model, encoder)
}

/// Writes the daemon's global-model cache, as the daemon does (atomically).
fn write_global_model(state: &Path, seed: u64) {
    let bytes = tiny(seed).0.tensor_set().unwrap().to_safetensors(None).unwrap();
    fedward_shared::fsutil::atomic_write(&state.join("global-model.safetensors"), &bytes, false).unwrap();
}

fn site(dir: &Path) -> std::path::PathBuf {
    site_with(dir, "")
}

fn site_with(dir: &Path, service_extra: &str) -> std::path::PathBuf {
    let (model, encoder) = tiny(1);
    fedward_models::io::export_dir(&model, &encoder, &dir.join("base")).unwrap();
    std::fs::write(dir.join("train.jsonl"), "{\"text\":\"needs a bed\",\"label\":\"bed\"}\n").unwrap();
    common::write_config(
        dir,
        &format!("device = \"cpu\"\n[service]\nlisten = \"127.0.0.1:0\"\nreview_below = 0.0\nreload_every = \"50ms\"\n{service_extra}"),
    )
}

struct Service {
    child: Child,
    addr: String,
    stderr: BufReader<ChildStderr>,
    log: String,
}

impl Service {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedward-agent"))
            .args(["serve", "--config"])
            .arg(config)
            .env("FEDWARD_LOG", "debug")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        // The service logs its bound address once it listens.
        let addr = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "the service exited before listening:\n{log}");
            log.push_str(&line);
            if line.contains("triage service listening") {
                let at = line.find("listen=").expect("the listening line names its address") + "listen=".len();
                break line[at..].split_whitespace().next().unwrap().to_owned();
            }
        };
        Service { child, addr, stderr, log }
    }

    /// One HTTP/1.1 exchange: the status and the JSON body.
    fn call(&self, method: &str, path: &str, body: Option<&str>, content_type: &str) -> (u16, Value) {
        self.call_with(method, path, body, content_type, "")
    }

    fn call_with(&self, method: &str, path: &str, body: Option<&str>, content_type: &str, extra: &str) -> (u16, Value) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status: u16 = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let (head, payload) = response.split_once("\r\n\r\n").unwrap();
        // axum answers JSON bodies with a Content-Length (no chunking) here.
        assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
        (status, serde_json::from_str(payload).unwrap_or(Value::String(payload.to_owned())))
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(method, path, Some(&body.to_string()), "application/json")
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None, "application/json")
    }

    /// Reads the service's log until a line holds `needle` (a reload says "serving a new
    /// model" once the new one answers).
    fn wait_log(&mut self, needle: &str) {
        loop {
            let mut line = String::new();
            assert!(self.stderr.read_line(&mut line).unwrap() > 0, "the service exited before logging {needle:?}:\n{}", self.log);
            self.log.push_str(&line);
            if line.contains(needle) {
                return;
            }
        }
    }

    /// Stops the service and returns everything it logged.
    fn stop(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.stderr.read_to_string(&mut self.log).unwrap();
        self.log
    }
}

#[test]
fn the_triage_service_allocates_takes_corrections_reloads_and_never_logs_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut service = Service::start(&config);

    // No global model yet: nothing to classify with, and it says so.
    let (status, health) = service.get("/healthz");
    assert_eq!((status, &health["status"]), (503, &json!("no model yet")));
    let (status, _) = service.json("POST", "/v1/requests", &json!({"note": "zebra needs a bed", "urgency": 2}));
    assert_eq!(status, 503);

    write_global_model(&state, 2);
    service.wait_log("serving a new model");
    let (status, health) = service.get("/healthz");
    assert_eq!(status, 200, "{health}");
    let first_model = health["model"].as_str().unwrap().to_owned();

    // One bed, one ventilator.
    let capacity = json!({"resources": [
        {"kind": "bed", "group": "medical", "features": ["isolation"], "total": 2, "free": 1},
        {"kind": "device", "group": "ventilator", "total": 1, "free": 1}
    ]});
    let (status, body) = service.json("PUT", "/v1/capacity", &capacity);
    assert_eq!(status, 200, "{body}");

    // A request is classified (the tiny model guesses) and decided at once.
    let (status, first) =
        service.json("POST", "/v1/requests", &json!({"id": "ed-1", "note": "zebra note one needs a bed", "urgency": 2, "ward": "medical"}));
    assert_eq!(status, 201, "{first}");
    let probabilities = first["prediction"]["probabilities"].as_object().unwrap();
    assert_eq!(probabilities.len(), 4);
    let total: f64 = probabilities.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    assert_eq!(first["model"], first_model.as_str());

    // A clinician says it needs a bed: stored, and the bed is assigned.
    let (status, corrected) = service.json("POST", "/v1/feedback", &json!({"request": "ed-1", "label": "bed"}));
    assert_eq!(status, 200, "{corrected}");
    assert_eq!(corrected["stored"], "added");
    assert_eq!(corrected["request"]["status"], "assigned");
    assert_eq!(corrected["request"]["resource"], "bed:medical:isolation");

    // A second patient for the same ward waits: the only free bed is taken.
    let (status, second) =
        service.json("POST", "/v1/requests", &json!({"id": "ed-2", "note": "zebra note two bed", "urgency": 1, "ward": "medical"}));
    assert_eq!(status, 201, "{second}");
    let (_, second) = service.json("POST", "/v1/feedback", &json!({"request": "ed-2", "label": "bed"}));
    assert_eq!(second["request"]["status"], "queued", "{second}");
    assert_eq!(second["request"]["position"], 1);
    let (_, queue) = service.get("/v1/queue");
    assert_eq!(queue["queued"][0]["id"], "ed-2");

    // The first patient is discharged: the queue moves.
    let (status, queue) = service.json("POST", "/v1/releases", &json!({"request": "ed-1"}));
    assert_eq!(status, 200, "{queue}");
    assert!(queue["queued"].as_array().unwrap().is_empty(), "{queue}");
    assert_eq!(queue["assigned"][0]["id"], "ed-2");
    let (_, capacity_now) = service.get("/v1/capacity");
    assert_eq!(capacity_now["resources"][0]["free"], 0);

    // Both corrections are in the site's feedback file, the daemon's next round trains on them.
    let feedback = std::fs::read_to_string(state.join("feedback.jsonl")).unwrap();
    assert_eq!(
        feedback,
        "{\"text\":\"zebra note one needs a bed\",\"label\":\"bed\"}\n{\"text\":\"zebra note two bed\",\"label\":\"bed\"}\n"
    );
    // The same correction twice is stored once.
    let (_, again) = service.json("POST", "/v1/feedback", &json!({"request": "ed-2", "label": "bed"}));
    assert_eq!(again["stored"], "duplicate");

    // Malformed bodies: 400 with a reason, nothing stored, and the note never echoed.
    let (_, queue_before) = service.get("/v1/queue");
    for (body, reason) in [
        (r#"{"note": "zebra secret", "urgency": "high"}"#, "wrong type"),
        (r#"{"note": "zebra secret"}"#, "missing field `urgency`"),
        (r#"{"note": "zebra secret", "urgency": 9}"#, "urgency must be"),
        (r#"{"note": "zebra secret", "urgency": 3, "colour": "red"}"#, "unknown field `colour`"),
        (r#"{"note": "   ", "urgency": 3}"#, "note is empty"),
        (r#"{"note": "zebra secret", "urgency": 3, "ward": "a:b"}"#, "ward must be"),
        ("{\"note\": \"zebra secret", "the body ends too soon"),
    ] {
        let (status, answer) = service.call("POST", "/v1/requests", Some(body), "application/json");
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(reason), "{body}: {error}");
        assert!(!error.contains("zebra"), "{error}");
    }
    let (status, _) = service.call("POST", "/v1/requests", Some(r#"{"note": "zebra", "urgency": 3}"#), "text/plain");
    assert_eq!(status, 415);
    let (status, answer) =
        service.json("PUT", "/v1/capacity", &json!({"resources": [{"kind": "bed", "group": "medical", "total": 1, "free": 2}]}));
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = service.json("POST", "/v1/feedback", &json!({"request": "ed-2", "label": "nurse"}));
    assert_eq!(status, 400, "{answer}");
    let (status, _) = service.json("POST", "/v1/feedback", &json!({"request": "ed-404", "label": "bed"}));
    assert_eq!(status, 404);
    let (status, _) = service.json("POST", "/v1/releases", &json!({"request": "ed-1", "resource": "bed:medical"}));
    assert_eq!(status, 400);
    assert_eq!(service.get("/v1/queue").1, queue_before);
    assert_eq!(service.get("/v1/capacity").1, capacity_now);
    assert_eq!(std::fs::read_to_string(state.join("feedback.jsonl")).unwrap(), feedback);

    // A page for the bed manager, and the daemon's next model is picked up.
    let (status, page) = service.call("GET", "/", None, "text/html");
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("fedward triage"));
    write_global_model(&state, 3);
    service.wait_log("serving a new model");
    let (_, reloaded) = service.get("/healthz");
    assert_ne!(reloaded["model"], first_model.as_str());
    let (status, third) = service.json("POST", "/v1/requests", &json!({"note": "zebra note three", "urgency": 4}));
    assert_eq!(status, 201);
    assert_eq!(third["model"], reloaded["model"]);

    // Every note above carried "zebra"; the log (at debug) never does.
    let log = service.stop();
    assert!(log.contains("request decided") && log.contains("correction recorded"), "{log}");
    assert!(!log.to_lowercase().contains("zebra"), "a note reached the log:\n{log}");
}

/// With `[service] tokens`, every route but `/healthz` needs a listed token, read at each
/// request; and a page on another name cannot reach the loopback service.
#[test]
fn tokens_guard_the_service_and_only_localhost_names_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = site_with(dir.path(), "tokens = \"service-tokens\"\n");
    let agent = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_fedward-agent")).args(args).current_dir(dir.path()).output().unwrap();
    let added = agent(&["token", "add", "--tokens", "service-tokens", "--name", "bed-manager", "--role", "auditor"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let token = String::from_utf8(added.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("fwt_"), "{token}");

    let service = Service::start(&config);
    assert_eq!(service.get("/healthz").0, 503, "healthz needs no token (and there is no model yet)");
    assert_eq!(service.get("/v1/queue").0, 401);
    let bearer = format!("Authorization: Bearer {token}\r\n");
    assert_eq!(service.call_with("GET", "/v1/queue", None, "application/json", &bearer).0, 200);
    assert_eq!(service.call_with("GET", "/v1/queue", None, "application/json", "Authorization: Bearer fwt_wrong\r\n").0, 401);

    // DNS rebinding: a name that is not this machine's is refused.
    let mut stream = TcpStream::connect(&service.addr).unwrap();
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 421"), "{response}");

    let removed = agent(&["token", "remove", "--tokens", "service-tokens", "--name", "bed-manager"]);
    assert!(removed.status.success());
    assert_eq!(service.call_with("GET", "/v1/queue", None, "application/json", &bearer).0, 401, "a removed token stops at once");
    service.stop();
}
