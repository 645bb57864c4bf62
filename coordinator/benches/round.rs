//! Bench (not a test): whole rounds with no training. The real `fedward-coordinator serve`
//! runs as a process and each site is a real agent process (`bench_agent`, the agent
//! crate's example: the production daemon with a trainer that returns a constant delta),
//! over QUIC with mutual TLS on loopback. The model has all-MiniLM-L6-v2's tensor layout
//! (every tensor trainable), at its own size (22.7M parameters) or scaled down to
//! `--params` (the same tensor names, smaller dimensions).
//!
//! Each round is timed from the coordinator's first offer to its "round completed,
//! checkpointed and sealed" (the timestamps of its JSON log); at each seal the bench reads
//! every process's CPU time (`/proc/PID/stat`) and peak RSS (`VmHWM`, then reset through
//! `clear_refs`, so each round's peak is its own). From the agents' logs it splits an
//! agent's round into download and verification, the work before the trainer (model
//! cache), the trainer, the work after it (privacy step, update cache, ledger fsync) and the
//! upload to the `Ack`. `scripts/bench.sh round` runs it (and Flower beside it); prints a
//! table, writes JSON to `--out` and the tensor layout to `--layout` (for the baseline).
//!
//! `--params body:K` (or any trainable spec but `all`) takes instead MiniLM's tensors that
//! the spec trains, at their own shapes, offered with that spec (plus the classifier and a
//! one-word embedding, frozen, which the coordinator needs): a demo round's update and,
//! after round 1 (a site's cache then holds the frozen tensors), its download.
//!
//! `--aggregation secure` runs secure aggregation (`[aggregation] method = "secure"`):
//! `--threshold`, `--neighbours` and `--secure-min-sites` default to what a deployment of
//! that many sites would choose (`SecureSettings::for_sites`). Each agent logs its
//! connection's UDP bytes after each round; a round's bytes are the difference from the
//! round before (round 1 holds the handshakes and the first download), and the
//! coordinator's are the sum over the sites (it talks to no one else).
//!
//! ```text
//! round --agent-bin PATH [--params 22.7M|body:1] [--sites 8] [--rounds 5] [--out F] [--layout F]
//!       [--aggregation plain|secure] [--threshold T] [--neighbours K] [--secure-min-sites M] [--modulus-bits B]
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use fedward_shared::pki::{self, Validity};
use fedward_shared::plan::Trainable;
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::wire::SiteId;
use support::{minilm_shaped_model, Consortium, SERVER_NAME};

/// all-MiniLM-L6-v2's dimensions, which `--params` scales.
const VOCAB: usize = 30522;
const HIDDEN: usize = 384;
const INTER: usize = 1536;
const LAYERS: usize = 6;
const POSITIONS: usize = 512;
const LABELS: usize = 4;

/// The model: MiniLM's own shapes at 22.7M parameters, otherwise the same names with a
/// smaller hidden size (the largest of a few that leaves at least 40% to the vocabulary)
/// and the vocabulary that brings the count to `params`.
fn model(params: usize, rng: &mut impl Rng) -> TensorSet {
    let minilm = minilm_shaped_model(rng);
    if params.abs_diff(minilm.element_count()) < 100_000 {
        return minilm;
    }
    let beside_vocab = |h: usize| LAYERS * (12 * h * h + 13 * h) + (h * h + h) + POSITIONS * h + 4 * h + LABELS * h + LABELS;
    let hidden = [256, 192, 128, 96, 64, 32, 16].into_iter().find(|&h| beside_vocab(h) * 10 <= params * 6).unwrap_or(16);
    let vocab = (params.saturating_sub(beside_vocab(hidden)) / hidden).max(1);
    let scale = |d: usize| match d {
        VOCAB => vocab,
        HIDDEN => hidden,
        INTER => 4 * hidden,
        other => other,
    };
    minilm
        .iter()
        .map(|(name, t)| {
            let shape: Vec<usize> = t.shape().iter().map(|&d| scale(d)).collect();
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            (name.to_owned(), Tensor::new(shape, data).expect("shape"))
        })
        .collect()
}

/// What `--params` asks for: a size, or the tensors a trainable spec selects.
enum ModelSpec {
    Params(usize),
    Trained(Trainable),
}

/// MiniLM's tensors that `spec` trains, at their own shapes, beside the few frozen ones
/// the coordinator needs to start (the classifier, and the word embeddings with one word:
/// they give it the hidden size). Offered with `spec` as the plan's trainable set.
fn trained_part(spec: &Trainable, rng: &mut impl Rng) -> TensorSet {
    let minilm = minilm_shaped_model(rng);
    let names: Vec<&str> = minilm.iter().map(|(n, _)| n).collect();
    let keep = spec.select(names.iter().copied());
    let mut set: TensorSet = minilm
        .iter()
        .filter(|(n, _)| n.starts_with("classifier.") || keep.iter().any(|k| k == n))
        .map(|(n, t)| (n.to_owned(), t.clone()))
        .collect();
    let word = minilm.get("bert.embeddings.word_embeddings.weight").expect("MiniLM's layout has word embeddings");
    set.insert("bert.embeddings.word_embeddings.weight", Tensor::new(vec![1, HIDDEN], word.data()[..HIDDEN].to_vec()).expect("shape"));
    set
}

fn parse_model(s: &str) -> Result<ModelSpec> {
    match s.parse::<Trainable>() {
        Ok(Trainable::All) | Err(_) => parse_params(s).map(ModelSpec::Params),
        Ok(t) => Ok(ModelSpec::Trained(t)),
    }
}

/// "22.7M", "1M", "500k", "1000000".
fn parse_params(s: &str) -> Result<usize> {
    let (num, mult) = match s.chars().last() {
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        _ => (s, 1.0),
    };
    Ok((num.parse::<f64>().with_context(|| format!("--params {s}"))? * mult).round() as usize)
}

/// One line of a process's log, as it arrived.
struct Line {
    /// `None`: the coordinator; `Some(i)`: agent `i`.
    from: Option<usize>,
    text: String,
    /// The process closed its log (it exited); `text` is empty.
    eof: bool,
}

fn forward_lines(child: &mut Child, from: Option<usize>, tx: mpsc::Sender<Line>) -> Result<()> {
    let stderr = child.stderr.take().context("stderr")?;
    std::thread::spawn(move || {
        for text in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(Line { from, text, eof: false }).is_err() {
                return;
            }
        }
        let _ = tx.send(Line { from, text: String::new(), eof: true });
    });
    Ok(())
}

/// A JSON log line: its time, message and fields.
struct Event {
    at: OffsetDateTime,
    message: String,
    fields: Value,
    /// The `round` of the innermost span that has one.
    span_round: Option<u64>,
}

fn parse_event(text: &str) -> Option<Event> {
    let v: Value = serde_json::from_str(text).ok()?;
    let at = OffsetDateTime::parse(v.get("timestamp")?.as_str()?, &Rfc3339).ok()?;
    let fields = v.get("fields")?.clone();
    let message = fields.get("message")?.as_str()?.to_owned();
    // The round's own span (the agent's `round`, the coordinator's `checkpoint`), not the
    // agent's fetch of the final model after the last round.
    let span_round = v
        .get("span")
        .filter(|s| matches!(s.get("name").and_then(Value::as_str), Some("round" | "checkpoint")))
        .and_then(|s| s.get("round"))
        .and_then(|r| r.as_str()?.parse().ok());
    Some(Event { at, message, fields, span_round })
}

fn secs_between(a: OffsetDateTime, b: OffsetDateTime) -> f64 {
    (b - a).as_seconds_f64()
}

/// CPU seconds (user + system) of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak RSS since the last reset, in MiB, then resets it (`clear_refs` 5).
fn take_peak_mib(pid: u32) -> f64 {
    let peak = support::rss_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    peak
}

/// What one agent's log says of one round (timestamps).
#[derive(Default, Clone)]
struct AgentRound {
    offered: Option<OffsetDateTime>,
    /// A secure round's keys and shares exchanged (before the download).
    keys_exchanged: Option<OffsetDateTime>,
    model_verified: Option<OffsetDateTime>,
    trainer_done: Option<OffsetDateTime>,
    trainer_secs: Option<f64>,
    recorded: Option<OffsetDateTime>,
    acked: Option<OffsetDateTime>,
    /// The connection's UDP payload bytes after the round: sent, received.
    totals: Option<(u64, u64)>,
}

/// An agent's round split in phases (seconds).
#[derive(Clone, Copy, Default)]
struct Phases {
    /// A secure round's key and share exchange (zero in a plain round).
    secure_setup: f64,
    download_verify: f64,
    before_trainer: f64,
    trainer: f64,
    after_trainer: f64,
    upload: f64,
}

impl Phases {
    fn of(a: &AgentRound) -> Option<Self> {
        let (offered, verified, done, trainer, recorded, acked) =
            (a.offered?, a.model_verified?, a.trainer_done?, a.trainer_secs?, a.recorded?, a.acked?);
        let set_up = a.keys_exchanged.unwrap_or(offered);
        Some(Self {
            secure_setup: secs_between(offered, set_up),
            download_verify: secs_between(set_up, verified),
            before_trainer: secs_between(verified, done) - trainer,
            trainer,
            after_trainer: secs_between(done, recorded),
            upload: secs_between(recorded, acked),
        })
    }

    /// The agent's own work in the round: neither the trainer nor a transfer.
    fn non_training(&self) -> f64 {
        self.before_trainer + self.after_trainer
    }

    fn mean(all: &[Self]) -> Self {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Self) -> f64| all.iter().map(f).sum::<f64>() / n;
        Self {
            secure_setup: sum(|p| p.secure_setup),
            download_verify: sum(|p| p.download_verify),
            before_trainer: sum(|p| p.before_trainer),
            trainer: sum(|p| p.trainer),
            after_trainer: sum(|p| p.after_trainer),
            upload: sum(|p| p.upload),
        }
    }
}

struct RoundFigures {
    round: u64,
    secs: f64,
    coordinator_cpu: f64,
    coordinator_peak_mib: f64,
    agents_cpu: f64,
    agent_cpu_max: f64,
    agent_peak_mib: f64,
    phases: Phases,
    max_non_training: f64,
    /// Bytes into and out of the coordinator (the sum over the sites).
    bytes_in: u64,
    bytes_out: u64,
    /// The most one site sent and received.
    site_sent_max: u64,
    site_received_max: u64,
    /// Sites whose bytes were read this round.
    bytes_sites: usize,
}

/// A secure round's parameters (`[secure_aggregation]`).
#[derive(Clone, Copy, Debug)]
struct SecureSettings {
    threshold: usize,
    /// `None`: the complete graph (the config's default).
    neighbours: Option<usize>,
    min_sites: usize,
    modulus_bits: u32,
}

impl SecureSettings {
    /// What a deployment of `n` sites would choose: every site a neighbour up to 17 sites,
    /// beyond that SecAgg+'s sparse graph with 16 neighbours (a group of 17, about
    /// `3 log2 n` at 50 sites); the threshold two thirds of a group (rounded up, so more
    /// than half as the config requires); a round starts with two thirds of the sites.
    /// The modulus `2^48`: with the default weight clamp (100,000 examples) and the bound
    /// of 50, the fixed-point error of the mean stays below `1.9e-9` per coordinate at 50
    /// sites of 1,000 examples (`FixedPoint::mean_error_bound`), about `3e-7` of a demo
    /// update's typical coordinate, and a masked value crosses in 6 bytes, not 8.
    fn for_sites(n: usize) -> Self {
        let neighbours = (n > 17).then_some(16);
        let group = neighbours.map_or(n, |k| k + 1);
        let threshold = (2 * group).div_ceil(3).max(2);
        Self { threshold, neighbours, min_sites: threshold.max((2 * n).div_ceil(3)), modulus_bits: 48 }
    }

    fn toml(&self) -> String {
        let neighbours = self.neighbours.map(|k| format!("neighbours = {k}\n")).unwrap_or_default();
        format!(
            "[secure_aggregation]\nthreshold = {}\nmin_sites = {}\nmodulus_bits = {}\n{neighbours}",
            self.threshold, self.min_sites, self.modulus_bits
        )
    }
}

/// Writes a site's key and CA-signed certificate to `dir`.
fn site_pki(consortium: &Consortium, site: &str, serial: u8, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let id = SiteId::new(site).context("site id")?;
    let request = pki::site_request(&id)?;
    let validity = Validity::days_from(OffsetDateTime::now_utc(), 1);
    let cert = pki::sign_site_request(&consortium.ca, &request.csr_pem, &id, validity, [serial; 16])?;
    std::fs::write(dir.join("ca.crt"), &consortium.ca.cert_pem)?;
    std::fs::write(dir.join("site.crt"), cert)?;
    fedward_shared::fsutil::write_private_new(&dir.join("site.key"), request.key_pem.as_bytes())?;
    Ok(())
}

/// What the bench read at a round's seal.
struct Sealed {
    round: u64,
    at: OffsetDateTime,
    coordinator_cpu: f64,
    coordinator_peak: f64,
    agents_cpu: f64,
    agent_cpu_max: f64,
    agent_peak: f64,
}

/// Kills the children left on drop (a failed run leaves no process behind).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Run {
    params: usize,
    tensors: usize,
    sites: usize,
    secure: Option<SecureSettings>,
    rounds: Vec<RoundFigures>,
}

fn run(
    agent_bin: &Path,
    spec: &ModelSpec,
    sites: usize,
    rounds: u64,
    layout: Option<&Path>,
    secure: Option<SecureSettings>,
) -> Result<Run> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let (model, trainable) = match spec {
        ModelSpec::Params(p) => (model(*p, &mut rng), "all".to_owned()),
        ModelSpec::Trained(t) => (trained_part(t, &mut rng), t.to_string()),
    };
    let (params, tensors) = (model.element_count(), model.len());
    if let Some(path) = layout {
        let shapes: Vec<_> = model.iter().map(|(n, t)| serde_json::json!({ "name": n, "shape": t.shape() })).collect();
        std::fs::write(path, serde_json::to_vec_pretty(&shapes)?)?;
    }
    let names: Vec<String> = (0..sites).map(|i| format!("site-{i:03}")).collect();
    // The same bound under both methods (the demo's: no honest update reaches it). Under
    // secure aggregation it is also the fixed-point encoding's clip.
    let extra = match &secure {
        None => "[aggregation]\nmax_update_norm = 50\n".to_owned(),
        Some(s) => format!("[aggregation]\nmethod = \"secure\"\nmax_update_norm = 50\n{}", s.toml()),
    };
    let consortium = Consortium::new(&model, &trainable, &names, sites, rounds, &extra)?;
    drop(model);
    let (tx, rx) = mpsc::channel();
    let mut children = Children(Vec::new());
    let mut coordinator = Command::new(env!("CARGO_BIN_EXE_fedward-coordinator"))
        .args(["serve", "--config"])
        .arg(&consortium.config)
        .env("FEDWARD_LOG", "info")
        .env("FEDWARD_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    forward_lines(&mut coordinator, None, tx.clone())?;
    let coordinator_pid = coordinator.id();
    children.0.push(coordinator);
    let listening = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx.recv_timeout(listening.saturating_duration_since(Instant::now())).context("the coordinator did not start")?;
        if line.text.contains("listening for agents") {
            break;
        }
        if line.eof {
            bail!("the coordinator exited before it listened");
        }
        if line.text.contains("\"level\":\"WARN\"") || line.text.contains("\"level\":\"ERROR\"") || !line.text.starts_with('{') {
            eprintln!("coordinator: {}", line.text);
        }
    }
    let mut agent_pids = Vec::new();
    for (i, site) in names.iter().enumerate() {
        let dir = consortium.dir.path().join("agents").join(site);
        site_pki(&consortium, site, 3 + (i % 200) as u8, &dir)?;
        let mut agent = Command::new(agent_bin)
            .arg("--coordinator")
            .arg(consortium.addr.to_string())
            .args(["--server-name", SERVER_NAME, "--ca"])
            .arg(dir.join("ca.crt"))
            .arg("--cert")
            .arg(dir.join("site.crt"))
            .arg("--key")
            .arg(dir.join("site.key"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("FEDWARD_LOG", "info")
            .env("FEDWARD_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", agent_bin.display()))?;
        forward_lines(&mut agent, Some(i), tx.clone())?;
        agent_pids.push(agent.id());
        children.0.push(agent);
    }
    drop(tx);

    let mut offered: BTreeMap<u64, OffsetDateTime> = BTreeMap::new();
    let mut sealed: Vec<Sealed> = Vec::new();
    let mut agent_rounds: BTreeMap<(usize, u64), AgentRound> = BTreeMap::new();
    let (mut last_coordinator_cpu, mut last_agents_cpu) = (0.0, vec![0.0; sites]);
    let (mut agents_done, mut finished) = (0, vec![false; sites]);
    // Every log line to stderr (`FEDWARD_BENCH_ECHO=1`); warnings and errors always.
    let echo = std::env::var_os("FEDWARD_BENCH_ECHO").is_some();
    let deadline = Instant::now() + Duration::from_secs(60 * 60);
    while agents_done < sites {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("the run did not finish within an hour"),
        };
        if line.eof {
            match line.from {
                Some(i) if !finished[i] => bail!("agent {i} exited before the federation finished"),
                // It exits once the federation is over, possibly before the agents say so.
                None if (sealed.len() as u64) < rounds => bail!("the coordinator exited after {} of {rounds} rounds", sealed.len()),
                _ => continue,
            }
        }
        if echo || line.text.contains("\"level\":\"WARN\"") || line.text.contains("\"level\":\"ERROR\"") || !line.text.starts_with('{') {
            let who = line.from.map_or("coordinator".to_owned(), |i| format!("agent {i}"));
            eprintln!("{who}: {}", line.text);
        }
        let Some(ev) = parse_event(&line.text) else { continue };
        if let (Some(i), "federation finished") = (line.from, ev.message.as_str()) {
            finished[i] = true;
            agents_done += 1;
            continue;
        }
        let field_round = || ev.fields.get("round").and_then(|r| r.as_u64().or_else(|| r.as_str()?.parse().ok()));
        match line.from {
            None => match ev.message.as_str() {
                "round offered" => {
                    if let Some(r) = field_round() {
                        offered.entry(r).or_insert(ev.at);
                    }
                }
                "round completed, checkpointed and sealed" => {
                    let r = ev.span_round.context("a seal without its round")?;
                    let c = cpu_secs(coordinator_pid);
                    let agents: Vec<f64> = agent_pids.iter().map(|&p| cpu_secs(p)).collect();
                    let per_agent: Vec<f64> = agents.iter().zip(&last_agents_cpu).map(|(a, b)| a - b).collect();
                    let coordinator_peak = take_peak_mib(coordinator_pid);
                    let agent_peak = agent_pids.iter().map(|&p| take_peak_mib(p)).fold(0.0, f64::max);
                    sealed.push(Sealed {
                        round: r,
                        at: ev.at,
                        coordinator_cpu: c - last_coordinator_cpu,
                        coordinator_peak,
                        agents_cpu: per_agent.iter().sum(),
                        agent_cpu_max: per_agent.iter().copied().fold(0.0, f64::max),
                        agent_peak,
                    });
                    (last_coordinator_cpu, last_agents_cpu) = (c, agents);
                }
                m if m.starts_with("round failed") => bail!("a round failed: {}", line.text),
                _ => {}
            },
            Some(i) => {
                let Some(r) = ev.span_round.or_else(field_round) else { continue };
                let a = agent_rounds.entry((i, r)).or_default();
                match ev.message.as_str() {
                    "round offered" => a.offered = Some(ev.at),
                    "secure round keys and shares exchanged" => a.keys_exchanged = Some(ev.at),
                    "global model received and verified" => a.model_verified = Some(ev.at),
                    "bench trainer done" => {
                        a.trainer_done = Some(ev.at);
                        a.trainer_secs = ev.fields.get("trainer_secs").and_then(Value::as_f64);
                    }
                    "release recorded in the ledger" | "secure release recorded in the ledger" => a.recorded = Some(ev.at),
                    // A secure round's last exchange: the unmasking shares' `Ack`.
                    "update accepted" | "secure round: unmasking shares sent" => a.acked = Some(ev.at),
                    "round done: connection totals" => {
                        let field = |k: &str| ev.fields.get(k).and_then(Value::as_u64);
                        if let (Some(sent), Some(received)) = (field("sent_bytes"), field("received_bytes")) {
                            a.totals = Some((sent, received));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if sealed.len() as u64 != rounds {
        bail!("{} of {rounds} rounds were sealed", sealed.len());
    }
    let mut figures = Vec::new();
    for s in sealed {
        let round = s.round;
        let start = *offered.get(&round).context("a sealed round that was never offered")?;
        let phases: Vec<Phases> = (0..sites).filter_map(|i| agent_rounds.get(&(i, round)).and_then(Phases::of)).collect();
        let max_non_training = phases.iter().map(Phases::non_training).fold(0.0, f64::max);
        // Each site's bytes this round: its totals less the previous round's (a connection
        // that was replaced starts from zero again).
        let traffic: Vec<(u64, u64)> = (0..sites)
            .filter_map(|i| {
                let now = agent_rounds.get(&(i, round))?.totals?;
                let before = agent_rounds.get(&(i, round.wrapping_sub(1))).and_then(|a| a.totals).unwrap_or((0, 0));
                Some(if now.0 >= before.0 && now.1 >= before.1 { (now.0 - before.0, now.1 - before.1) } else { now })
            })
            .collect();
        figures.push(RoundFigures {
            round,
            secs: secs_between(start, s.at),
            coordinator_cpu: s.coordinator_cpu,
            coordinator_peak_mib: s.coordinator_peak,
            agents_cpu: s.agents_cpu,
            agent_cpu_max: s.agent_cpu_max,
            agent_peak_mib: s.agent_peak,
            phases: Phases::mean(&phases),
            max_non_training,
            bytes_in: traffic.iter().map(|t| t.0).sum(),
            bytes_out: traffic.iter().map(|t| t.1).sum(),
            site_sent_max: traffic.iter().map(|t| t.0).max().unwrap_or(0),
            site_received_max: traffic.iter().map(|t| t.1).max().unwrap_or(0),
            bytes_sites: traffic.len(),
        });
    }
    Ok(Run { params, tensors, sites, secure, rounds: figures })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let agent_bin: PathBuf = arg("--agent-bin").context("--agent-bin PATH (the agent crate's bench_agent example) is required")?.into();
    let spec = parse_model(&arg("--params").unwrap_or_else(|| "22.7M".into()))?;
    let sites: usize = arg("--sites").unwrap_or_else(|| "8".into()).parse()?;
    let rounds: u64 = arg("--rounds").unwrap_or_else(|| "5".into()).parse()?;
    let layout = arg("--layout").map(PathBuf::from);
    let secure = match arg("--aggregation").as_deref() {
        None | Some("plain") => None,
        Some("secure") => {
            let mut s = SecureSettings::for_sites(sites);
            if let Some(t) = arg("--threshold") {
                s.threshold = t.parse().context("--threshold")?;
            }
            if let Some(k) = arg("--neighbours") {
                s.neighbours = Some(k.parse().context("--neighbours")?);
            }
            if let Some(m) = arg("--secure-min-sites") {
                s.min_sites = m.parse().context("--secure-min-sites")?;
            }
            if let Some(b) = arg("--modulus-bits") {
                s.modulus_bits = b.parse().context("--modulus-bits")?;
            }
            Some(s)
        }
        Some(other) => bail!("--aggregation {other}: expected plain or secure"),
    };
    let r = run(&agent_bin, &spec, sites, rounds, layout.as_deref(), secure)?;
    let aggregation = match &r.secure {
        None => "plain".to_owned(),
        Some(s) => format!(
            "secure (threshold {}, neighbours {}, min_sites {}, modulus 2^{})",
            s.threshold,
            s.neighbours.map_or("all".to_owned(), |k| k.to_string()),
            s.min_sites,
            s.modulus_bits
        ),
    };
    println!(
        "fedward: {} parameters in {} tensors ({:.1} MiB), {} sites, {} rounds, {aggregation}",
        r.params,
        r.tensors,
        r.params as f64 * 4.0 / (1 << 20) as f64,
        r.sites,
        r.rounds.len()
    );
    println!(
        "round  secs   coord-cpu-s coord-peak-MiB agents-cpu-s (max) agent-peak-MiB  coord-in-MB coord-out-MB | agent mean: \
         secure-setup download+verify before-trainer trainer after-trainer upload non-training(max)"
    );
    let mb = |b: u64| b as f64 / 1e6;
    for f in &r.rounds {
        let p = f.phases;
        println!(
            "{:>5} {:>6.3} {:>12.2} {:>14.0} {:>12.2} ({:.2}) {:>14.0} {:>12.2} {:>12.2} | {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} ({:.3})",
            f.round,
            f.secs,
            f.coordinator_cpu,
            f.coordinator_peak_mib,
            f.agents_cpu,
            f.agent_cpu_max,
            f.agent_peak_mib,
            mb(f.bytes_in),
            mb(f.bytes_out),
            p.secure_setup,
            p.download_verify,
            p.before_trainer,
            p.trainer,
            p.after_trainer,
            p.upload,
            p.non_training(),
            f.max_non_training
        );
    }
    if let Some(out) = arg("--out") {
        let rounds: Vec<_> = r
            .rounds
            .iter()
            .map(|f| {
                let p = f.phases;
                serde_json::json!({
                    "round": f.round, "secs": f.secs,
                    "coordinator_cpu_secs": f.coordinator_cpu, "coordinator_peak_rss_mib": f.coordinator_peak_mib,
                    "agents_cpu_secs": f.agents_cpu, "agent_cpu_secs_max": f.agent_cpu_max, "agent_peak_rss_mib": f.agent_peak_mib,
                    "coordinator_bytes_in": f.bytes_in, "coordinator_bytes_out": f.bytes_out,
                    "site_bytes_sent_max": f.site_sent_max, "site_bytes_received_max": f.site_received_max,
                    "bytes_sites": f.bytes_sites,
                    "agent_mean": {
                        "secure_setup_secs": p.secure_setup,
                        "download_verify_secs": p.download_verify, "before_trainer_secs": p.before_trainer,
                        "trainer_secs": p.trainer, "after_trainer_secs": p.after_trainer, "upload_secs": p.upload,
                        "non_training_secs": p.non_training(),
                    },
                    "agent_max_non_training_secs": f.max_non_training,
                })
            })
            .collect();
        let secure = r.secure.map(|s| {
            serde_json::json!({
                "threshold": s.threshold, "neighbours": s.neighbours, "min_sites": s.min_sites, "modulus_bits": s.modulus_bits,
            })
        });
        let json = serde_json::json!({
            "system": "fedward", "aggregation": if secure.is_some() { "secure" } else { "plain" }, "secure": secure,
            "params": r.params, "tensors": r.tensors, "sites": r.sites, "rounds": rounds,
        });
        std::fs::write(out, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
