//! The hospital's view of its agent: what `fedward-agent status` prints and the daemon's
//! loopback `/status` endpoint answers, for the person on call.
//!
//! The daemon writes what only it knows (connected or not and why, the round, the last
//! update sent) to `<state_dir>/status.json` as it changes ([`StatusWriter`], atomic,
//! best effort). [`compose`] adds what the site's files say: the privacy spend from the
//! ledger, the certificate's expiry, the data set's size, the global model's age. Nothing
//! here holds a record or a value of the data.

use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::warn;

use fedward_shared::config::AgentConfig;
use fedward_shared::fsutil;

pub use crate::state_dir::STATUS_FILE;

/// What the daemon is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Starting,
    Connecting,
    /// Admitted, waiting for the coordinator to start a round.
    Waiting,
    Training,
    Uploading,
    /// The connection was lost or could not be made; retrying after a backoff.
    Retrying,
    /// The coordinator refused this site; only a person can fix it.
    Refused,
    /// The federation is finished.
    Finished,
    /// Stopped (SIGTERM, or an error it cannot retry).
    Stopped,
}

/// The last update this site sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SentUpdate {
    pub round: u64,
    pub at: String,
    pub mib: f64,
}

/// What the daemon writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub phase: Phase,
    pub since: String,
    /// Why, in words: the refusal, the lost connection's cause, the decline.
    pub detail: Option<String>,
    pub coordinator: String,
    pub round: Option<u64>,
    pub last_update: Option<SentUpdate>,
    /// Failed connection attempts in a row.
    pub failures: u32,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Keeps the status file up to date.
pub struct StatusWriter {
    path: std::path::PathBuf,
    status: DaemonStatus,
}

impl StatusWriter {
    pub fn new(state_dir: &Path, coordinator: &str) -> Self {
        let now = rfc3339(OffsetDateTime::now_utc());
        let status = DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            phase: Phase::Starting,
            since: now,
            detail: None,
            coordinator: coordinator.to_owned(),
            round: None,
            last_update: None,
            failures: 0,
        };
        let w = Self { path: state_dir.join(STATUS_FILE), status };
        w.write();
        w
    }

    /// Enters `phase` (its time is kept when the phase does not change).
    pub fn set(&mut self, phase: Phase, detail: Option<String>) {
        if phase != self.status.phase {
            self.status.since = rfc3339(OffsetDateTime::now_utc());
        }
        self.status.phase = phase;
        self.status.detail = detail;
        self.write();
    }

    pub fn phase(&self) -> Phase {
        self.status.phase
    }

    pub fn round(&mut self, round: Option<u64>) {
        self.status.round = round;
    }

    pub fn failures(&mut self, failures: u32) {
        self.status.failures = failures;
    }

    pub fn sent(&mut self, round: u64, bytes: usize) {
        self.status.last_update =
            Some(SentUpdate { round, at: rfc3339(OffsetDateTime::now_utc()), mib: bytes as f64 / f64::from(1u32 << 20) });
        self.write();
    }

    fn write(&self) {
        let json = serde_json::to_vec_pretty(&self.status).unwrap_or_default();
        if let Err(e) = fsutil::atomic_write(&self.path, &json, false) {
            warn!(cause = %e, "could not write the status file");
        }
    }
}

/// The privacy spend, from the site's ledger.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Privacy {
    pub epsilon_spent: f64,
    pub epsilon_budget: f64,
    pub epsilon_left: f64,
    pub delta: f64,
    pub releases: u64,
    pub max_rounds: Option<u64>,
}

/// The site certificate's validity.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Certificate {
    pub not_after: String,
    pub not_after_unix: i64,
    pub days_left: f64,
}

/// Everything `status` reports; each part is an error in words when it cannot be read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub running: bool,
    pub daemon: Option<DaemonStatus>,
    pub privacy: Result<Privacy, String>,
    pub certificate: Result<Certificate, String>,
    pub training_notes: Result<usize, String>,
    pub corrections: usize,
    pub validation_notes: Option<Result<usize, String>>,
    /// When the agent last received a global model.
    pub global_model_received: Option<String>,
    /// What needs a person, in words; empty when all is well.
    pub attention: Vec<String>,
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Reads the site's state and files into a report.
pub fn compose(cfg: &AgentConfig, now: OffsetDateTime) -> Report {
    let daemon: Option<DaemonStatus> = std::fs::read(cfg.state_dir.join(STATUS_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let running = daemon
        .as_ref()
        .is_some_and(|d| !matches!(d.phase, Phase::Stopped | Phase::Refused) && (d.pid == std::process::id() || process_alive(d.pid)));
    let privacy = privacy(cfg);
    let certificate = certificate(&cfg.tls.cert, now);
    let count = |p: &Path| fedward_models::text::read_jsonl(p, &cfg.labels).map(|v| v.len()).map_err(|e| e.to_string());
    let training_notes = count(&cfg.train_data);
    let corrections = if cfg.feedback_data.exists() { count(&cfg.feedback_data).unwrap_or(0) } else { 0 };
    let validation_notes = cfg.validation_data.as_deref().map(count);
    let global_model_received = std::fs::metadata(cfg.state_dir.join(crate::state_dir::MODEL_CACHE))
        .and_then(|m| m.modified())
        .ok()
        .map(|t| rfc3339(OffsetDateTime::from(t)));
    let mut report = Report {
        running,
        daemon,
        privacy,
        certificate,
        training_notes,
        corrections,
        validation_notes,
        global_model_received,
        attention: Vec::new(),
    };
    report.attention = attention(&report);
    report
}

fn privacy(cfg: &AgentConfig) -> Result<Privacy, String> {
    let path = cfg.state_dir.join(crate::state_dir::LEDGER);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let report = fedward_shared::ledger::verify(&bytes, None);
    let ledger = fedward_shared::ledger::Ledger::from_verified(&report)
        .ok_or_else(|| format!("the ledger {} does not verify: {}", path.display(), report.problems.len()))?;
    let accountant = ledger.accountant().map_err(|e| e.to_string())?;
    let spent = accountant.epsilon(cfg.budget.delta).map_err(|e| e.to_string())?;
    Ok(Privacy {
        epsilon_spent: spent,
        epsilon_budget: cfg.budget.max_epsilon,
        epsilon_left: (cfg.budget.max_epsilon - spent).max(0.0),
        delta: cfg.budget.delta,
        releases: accountant.releases(),
        max_rounds: cfg.budget.max_rounds,
    })
}

fn certificate(path: &Path, now: OffsetDateTime) -> Result<Certificate, String> {
    let pem = fsutil::read(path).map_err(|e| e.to_string())?;
    let der = rustls_pemfile_first_cert(&pem).ok_or_else(|| format!("{} holds no certificate", path.display()))?;
    let info = fedward_shared::pki::cert_info(&der).map_err(|e| e.to_string())?;
    Ok(Certificate {
        not_after: rfc3339(info.not_after),
        not_after_unix: info.not_after.unix_timestamp(),
        days_left: (info.not_after - now).as_seconds_f64() / 86_400.0,
    })
}

fn rustls_pemfile_first_cert(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).next()?.ok().map(|c| c.to_vec())
}

/// What the person on call must look at.
fn attention(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    match &r.daemon {
        None => out.push("the daemon has never run with this state directory (no status file)".to_owned()),
        // An agent that exits when its federation finishes did its job.
        Some(d) if !r.running && d.phase == Phase::Finished => {}
        Some(d) if !r.running => {
            let why = d.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            let phase = serde_json::to_value(d.phase).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            out.push(format!("the daemon is not running (last state: {phase}{why})"));
        }
        Some(d) if d.phase == Phase::Retrying && d.failures >= 3 => {
            out.push(format!("{} connection attempts in a row failed: {}", d.failures, d.detail.as_deref().unwrap_or("no detail")));
        }
        Some(_) => {}
    }
    if let Ok(p) = &r.privacy {
        if p.epsilon_left <= 0.1 * p.epsilon_budget {
            out.push(format!("the privacy budget is nearly spent ({:.2} of {:.2} left)", p.epsilon_left, p.epsilon_budget));
        }
    }
    match &r.certificate {
        Ok(c) if c.days_left <= 0.0 => out.push(format!("the certificate expired on {}", c.not_after)),
        Ok(c) if c.days_left <= 7.0 => out.push(format!("the certificate expires in {:.1} days ({})", c.days_left, c.not_after)),
        Err(e) => out.push(format!("the certificate cannot be read: {e}")),
        Ok(_) => {}
    }
    if let Err(e) = &r.privacy {
        out.push(format!("the privacy ledger cannot be read: {e}"));
    }
    if let Err(e) = &r.training_notes {
        out.push(format!("the training data cannot be read: {e}"));
    }
    out
}

/// The report in plain words.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let line = |s: &mut String, label: &str, text: String| s.push_str(&format!("{label:<14}{text}\n"));
    let daemon = match &r.daemon {
        None => "never started with this state directory".to_owned(),
        Some(d) => {
            let what = match d.phase {
                Phase::Starting => "starting".to_owned(),
                Phase::Connecting => format!("connecting to {}", d.coordinator),
                Phase::Waiting => format!("connected to {}, waiting for the next round", d.coordinator),
                Phase::Training => format!("training round {}", d.round.unwrap_or_default()),
                Phase::Uploading => format!("sending its update for round {}", d.round.unwrap_or_default()),
                Phase::Retrying => format!("not connected, retrying ({} failed attempts in a row)", d.failures),
                Phase::Refused => "refused by the coordinator".to_owned(),
                Phase::Finished if r.running => "the federation is finished; waiting for the next one".to_owned(),
                Phase::Finished => "the federation is finished".to_owned(),
                Phase::Stopped => "stopped".to_owned(),
            };
            let running = if r.running { format!("running (pid {})", d.pid) } else { "NOT RUNNING".to_owned() };
            let why = d.detail.as_deref().map(|d| format!("\n{:<14}why: {d}", "")).unwrap_or_default();
            format!("{running}; {what} since {}{why}", d.since)
        }
    };
    line(&mut s, "agent", daemon);
    let sent = r
        .daemon
        .as_ref()
        .and_then(|d| d.last_update.as_ref())
        .map_or_else(|| "none yet".to_owned(), |u| format!("round {} at {} ({:.1} MiB)", u.round, u.at, u.mib));
    line(&mut s, "last update", sent);
    let privacy = match &r.privacy {
        Ok(p) => format!(
            "epsilon {:.3} spent of {:.3} ({:.3} left) at delta {:e}; {} round(s) released{}",
            p.epsilon_spent,
            p.epsilon_budget,
            p.epsilon_left,
            p.delta,
            p.releases,
            p.max_rounds.map(|m| format!(" of at most {m}")).unwrap_or_default()
        ),
        Err(e) => format!("unreadable: {e}"),
    };
    line(&mut s, "privacy", privacy);
    let cert = match &r.certificate {
        Ok(c) if c.days_left <= 0.0 => format!("EXPIRED on {}", c.not_after),
        Ok(c) => format!("valid until {} ({:.1} days left)", c.not_after, c.days_left),
        Err(e) => format!("unreadable: {e}"),
    };
    line(&mut s, "certificate", cert);
    let data = match &r.training_notes {
        Ok(n) => format!(
            "{n} training notes, {} clinicians' corrections{}",
            r.corrections,
            match &r.validation_notes {
                Some(Ok(v)) => format!(", {v} validation notes"),
                Some(Err(e)) => format!(", validation unreadable: {e}"),
                None => String::new(),
            }
        ),
        Err(e) => format!("unreadable: {e}"),
    };
    line(&mut s, "data", data);
    line(
        &mut s,
        "global model",
        r.global_model_received.as_ref().map_or_else(|| "none received yet".to_owned(), |t| format!("received {t}")),
    );
    if r.attention.is_empty() {
        s.push_str("all is well\n");
    } else {
        for a in &r.attention {
            s.push_str(&format!("ATTENTION: {a}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedward_shared::pki::{self, Validity};
    use fedward_shared::wire::SiteId;

    /// A site whose certificate has `days` left, with two training notes.
    fn site(dir: &Path, days: u32) -> AgentConfig {
        let now = OffsetDateTime::now_utc();
        let ca = pki::create_ca("consortium", Validity::days_from(now, 30), [1; 16]).unwrap();
        let id = SiteId::new("alpha").unwrap();
        let request = pki::site_request(&id).unwrap();
        let cert = pki::sign_site_request(&ca, &request.csr_pem, &id, Validity::days_from(now, days), [3; 16]).unwrap();
        std::fs::write(dir.join("site.crt"), cert).unwrap();
        std::fs::write(dir.join("train.jsonl"), "{\"text\":\"a\",\"label\":\"bed\"}\n{\"text\":\"b\",\"label\":\"doctor\"}\n").unwrap();
        let text = r#"[coordinator]
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
"#;
        AgentConfig::parse(text, dir).unwrap()
    }

    #[test]
    fn a_site_that_never_ran_says_so_and_all_is_well_when_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = site(dir.path(), 30);
        let r = compose(&cfg, OffsetDateTime::now_utc());
        assert!(!r.running);
        assert_eq!(r.training_notes, Ok(2));
        assert_eq!(r.privacy.as_ref().map(|p| (p.epsilon_spent, p.releases)), Ok((0.0, 0)));
        assert_eq!(r.attention, ["the daemon has never run with this state directory (no status file)"]);

        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let mut w = StatusWriter::new(&cfg.state_dir, "127.0.0.1:7443");
        w.set(Phase::Waiting, None);
        w.sent(4, 3 << 20);
        let r = compose(&cfg, OffsetDateTime::now_utc());
        assert!(r.running, "this process wrote it and is alive");
        assert!(r.attention.is_empty(), "{:?}", r.attention);
        let text = render(&r);
        assert!(text.contains("connected to 127.0.0.1:7443, waiting for the next round"), "{text}");
        assert!(text.contains("round 4 at") && text.contains("(3.0 MiB)"), "{text}");
        assert!(text.contains("epsilon 0.000 spent of 8.000") && text.contains("all is well"), "{text}");
    }

    #[test]
    fn a_dead_daemon_and_a_certificate_about_to_expire_need_a_person() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = site(dir.path(), 3);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let mut w = StatusWriter::new(&cfg.state_dir, "127.0.0.1:7443");
        w.set(Phase::Retrying, Some("handshake: timed out".into()));
        // As if a daemon killed mid-round had written it: a pid no process has.
        let path = cfg.state_dir.join(STATUS_FILE);
        let mut status: DaemonStatus = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        status.pid = u32::MAX - 1;
        std::fs::write(&path, serde_json::to_vec(&status).unwrap()).unwrap();
        let r = compose(&cfg, OffsetDateTime::now_utc());
        assert!(!r.running);
        assert_eq!(r.attention.len(), 2, "{:?}", r.attention);
        assert_eq!(r.attention[0], "the daemon is not running (last state: retrying: handshake: timed out)");
        assert!(r.attention[1].starts_with("the certificate expires in 3.0 days"), "{}", r.attention[1]);
        assert!(render(&r).contains("NOT RUNNING"));
    }

    #[test]
    fn a_finished_federation_is_said_so_whether_the_agent_waits_or_exited() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = site(dir.path(), 30);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let mut w = StatusWriter::new(&cfg.state_dir, "127.0.0.1:7443");
        w.set(Phase::Finished, Some("after 5 rounds, 5 trained here".into()));
        let r = compose(&cfg, OffsetDateTime::now_utc());
        assert!(r.running && r.attention.is_empty(), "{:?}", r.attention);
        assert!(render(&r).contains("the federation is finished; waiting for the next one"));
        // An agent with exit_when_finished has gone: nothing to attend to.
        let path = cfg.state_dir.join(STATUS_FILE);
        let mut status: DaemonStatus = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        status.pid = u32::MAX - 1;
        std::fs::write(&path, serde_json::to_vec(&status).unwrap()).unwrap();
        let r = compose(&cfg, OffsetDateTime::now_utc());
        assert!(!r.running && r.attention.is_empty(), "{:?}", r.attention);
        let text = render(&r);
        assert!(text.contains("the federation is finished since") && text.contains("after 5 rounds"), "{text}");
    }
}
