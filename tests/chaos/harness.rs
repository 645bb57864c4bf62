//! The chaos suite's machinery: a consortium on disk (made with the binaries' own `pki`
//! and `data` commands), its processes under supervision, the faults, and the checks at
//! the end. The supervisor waits on exits and timers; it never sleeps to synchronise.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fedward_agent::outbox::ReleasedUpdate;
use fedward_shared::failpoint;
use fedward_shared::history::{checkpoint_name, RoundRecord, SavedState, STATE_FILE};
use fedward_shared::ledger::{self, Body, Ledger};
use fedward_shared::tensor::TensorSet;
use fedward_shared::wire::SiteId;

/// Sites and the synthetic hospital style each one's notes follow.
const SITES: &[(&str, &str)] = &[
    ("north", "trauma-centre"),
    ("south", "rural-hospital"),
    ("east", "childrens-hospital"),
    ("west", "teaching-hospital"),
    ("central", "cancer-centre"),
];
/// Every site's budget; the plan spends far less over the runs here.
const MAX_EPSILON: f64 = 50.0;
const DELTA: f64 = 1e-5;
/// A federation that completes no round for this long is wedged.
const WEDGE: Duration = Duration::from_secs(180);
/// How long agents get to leave once the coordinator has finished. Those connected at the
/// end are told at once; one whose connection broke just before cannot learn it (the
/// coordinator is gone and it retries for ever, as a daemon should), so it gets SIGTERM,
/// which it must obey cleanly.
const AGENTS_LEAVE: Duration = Duration::from_secs(10);
const COORDINATOR_POINTS: &[&str] = &[
    failpoint::COORDINATOR_DOWNLOAD,
    failpoint::COORDINATOR_UPLOAD,
    failpoint::COORDINATOR_AFTER_ACCEPTED,
    failpoint::COORDINATOR_CHECKPOINT_WRITE,
    failpoint::COORDINATOR_AFTER_CHECKPOINT,
    failpoint::COORDINATOR_BEFORE_SEAL,
    failpoint::LEDGER_APPEND_TORN,
];
const AGENT_POINTS: &[&str] = &[
    failpoint::AGENT_DOWNLOAD,
    failpoint::AGENT_AFTER_LEDGER_APPEND,
    failpoint::AGENT_UPLOAD,
    failpoint::AGENT_AFTER_ACK,
    failpoint::LEDGER_APPEND_TORN,
];

/// What a run does.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    pub sites: usize,
    pub rounds: u64,
    /// SIGKILLs to deliver (crash points and timed kills; file faults come on top).
    pub kills: usize,
    /// Lose and cut files as well.
    pub file_faults: bool,
    /// Keep the run in this directory (else a temporary one, kept only on failure).
    pub keep: Option<PathBuf>,
    /// Write the figures here as JSON.
    pub report: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { seed: 1, sites: 3, rounds: 6, kills: 6, file_faults: true, keep: None, report: None }
    }
}

impl Settings {
    /// `base`, with what the `FEDWARD_CHAOS_*` variables say.
    pub fn from_env(base: Settings) -> Settings {
        let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let num = |name: &str| set(name).map(|v| v.to_string_lossy().parse::<u64>().unwrap_or_else(|e| panic!("{name}={v:?}: {e}")));
        let path = |name: &str| set(name).map(PathBuf::from);
        Settings {
            seed: num("FEDWARD_CHAOS_SEED").unwrap_or(base.seed),
            sites: num("FEDWARD_CHAOS_SITES").map_or(base.sites, |n| n as usize),
            rounds: num("FEDWARD_CHAOS_ROUNDS").unwrap_or(base.rounds),
            kills: num("FEDWARD_CHAOS_KILLS").map_or(base.kills, |n| n as usize),
            file_faults: num("FEDWARD_CHAOS_FILE_FAULTS").map_or(base.file_faults, |n| n != 0),
            keep: path("FEDWARD_CHAOS_DIR").or(base.keep),
            report: path("FEDWARD_CHAOS_REPORT").or(base.report),
        }
    }
}

/// Runs the federation through the faults and checks what must hold.
pub fn run(settings: &Settings) -> Result<Report> {
    ensure!((2..=SITES.len()).contains(&settings.sites), "sites must be 2..={}", SITES.len());
    ensure!(settings.rounds >= 2, "at least two rounds (the last is never faulted)");
    let bins = Bins::find()?;
    let (temp, dir) = match &settings.keep {
        Some(d) => {
            ensure!(!d.exists() || fs::read_dir(d)?.next().is_none(), "{} must be empty", d.display());
            fs::create_dir_all(d)?;
            (None, fs::canonicalize(d)?)
        }
        None => {
            let t = tempfile::tempdir()?;
            let d = t.path().to_owned();
            (Some(t), d)
        }
    };
    let consortium = Consortium::create(&dir, &bins, settings)?;
    let mut chaos = Chaos::new(settings, bins, consortium);
    let started = Instant::now();
    let driven = chaos.drive();
    chaos.stop_all();
    let mut report = chaos.report(started.elapsed());
    match driven {
        Ok(()) => report.check(&chaos.consortium),
        Err(e) => report.broken.push(format!("the run did not finish: {e:#}")),
    }
    if !report.broken.is_empty() {
        report.log_tails = chaos.log_tails();
        if let Some(t) = temp {
            report.dir = t.keep();
        }
    }
    Ok(report)
}

/// The binaries under test: beside this test's own executable, built with crash points.
struct Bins {
    agent: PathBuf,
    coordinator: PathBuf,
}

impl Bins {
    fn find() -> Result<Self> {
        let exe = std::env::current_exe()?;
        // target/<profile>/deps/chaos-<hash>
        let dir = exe.parent().and_then(Path::parent).context("no target directory")?;
        let bins = Self { agent: dir.join("fedward-agent"), coordinator: dir.join("fedward-coordinator") };
        for bin in [&bins.agent, &bins.coordinator] {
            let out = Command::new(bin).arg("--version").output().with_context(|| {
                format!("{} is missing: the workspace test build makes it (scripts/test.sh, scripts/chaos.sh)", bin.display())
            })?;
            let version = String::from_utf8_lossy(&out.stdout);
            ensure!(
                version.contains("crash points"),
                "{} was built without crash points ({}): build it as the workspace tests do (scripts/test.sh, scripts/chaos.sh)",
                bin.display(),
                version.trim()
            );
        }
        Ok(bins)
    }
}

/// The consortium on disk.
pub struct Consortium {
    dir: PathBuf,
    sites: Vec<String>,
    rounds: u64,
    coordinator_toml: PathBuf,
    coordinator_state: PathBuf,
    agent_toml: Vec<PathBuf>,
    agent_state: Vec<PathBuf>,
    ledger_pub: PathBuf,
    archive: PathBuf,
    logs: PathBuf,
    admin_port: u16,
}

impl Consortium {
    fn create(dir: &Path, bins: &Bins, settings: &Settings) -> Result<Self> {
        let logs = dir.join("logs");
        fs::create_dir_all(&logs)?;
        let setup = |program: &Path, args: &[&str]| -> Result<()> {
            let out = Command::new(program).args(args).stdin(Stdio::null()).output()?;
            ensure!(out.status.success(), "{} {}: {}", program.display(), args.join(" "), String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let p = |path: &Path| path.to_str().expect("utf-8 path").to_owned();
        let ca = dir.join("pki").join("consortium");
        setup(&bins.coordinator, &["pki", "init", "--dir", &p(&ca), "--server-name", "localhost", "--server-ip", "127.0.0.1"])?;
        let sites: Vec<String> = SITES[..settings.sites].iter().map(|(s, _)| (*s).to_owned()).collect();
        for site in &sites {
            let site_dir = dir.join("pki").join(site);
            setup(&bins.agent, &["pki", "request", "--site", site, "--dir", &p(&site_dir)])?;
            let (csr, crt) = (site_dir.join("site.csr"), site_dir.join("site.crt"));
            setup(&bins.coordinator, &["pki", "sign", "--ca-dir", &p(&ca), "--csr", &p(&csr), "--site", site, "--out", &p(&crt)])?;
            fs::copy(ca.join("ca.crt"), site_dir.join("ca.crt"))?;
        }
        let data = dir.join("data");
        let mut synth = vec!["data".to_owned(), "synth".into(), "--out".into(), p(&data), "--seed".into(), settings.seed.to_string()];
        synth.extend(["--notes-per-site".into(), "300".into()]);
        for (site, style) in &SITES[..settings.sites] {
            synth.extend(["--site".into(), format!("{site}={style}")]);
        }
        setup(&bins.agent, &synth.iter().map(String::as_str).collect::<Vec<_>>())?;

        // A tiny BERT (random weights, a tokenizer of a few words and characters): the
        // binaries train it as they would MiniLM, in a fraction of the time.
        let base = dir.join("base");
        let words = ["patient", "needs", "bed", "doctor", "device", "ventilator", "admit", "ward", "scan", "pump", "review", "urgent"];
        let encoder = fedward_models::text::TextEncoder::tiny(&words);
        let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|l| (*l).to_owned()).collect();
        let config = fedward_models::bert::BertConfig::tiny(encoder.vocab_size());
        let model = fedward_models::bert::BertClassifier::random(config, labels, settings.seed, &candle_core::Device::Cpu)?;
        fedward_models::io::export_dir(&model, &encoder, &base)?;

        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let admin_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let coordinator_state = dir.join("coordinator");
        let coordinator_toml = dir.join("coordinator.toml");
        let mut enrolled = String::new();
        for site in &sites {
            let _ = writeln!(enrolled, "[[sites]]\nid = \"{site}\"\n");
        }
        fs::write(
            &coordinator_toml,
            format!(
                r#"[server]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
admin_listen = "127.0.0.1:{admin_port}"

[admin]
unauthenticated_loopback = true

[tls]
ca_cert = "{ca}/ca.crt"
cert = "{ca}/coordinator.crt"
key = "{ca}/coordinator.key"

[federation]
rounds = {rounds}
min_sites = {min_sites}
round_deadline = "60s"

[model]
init = "{base}"
labels = ["doctor", "bed", "device", "other"]
init_seed = {seed}

[training]
local_epochs = 1
batch_size = 8
optimizer = "sgd:0.5"
learning_rate = 0.1
max_seq_len = 32
trainable = "all"
seed = {seed}

[privacy]
mode = "record-level"
noise_multiplier = 1.5
clip_norm = 1.0
sampling_rate = 0.25
update_clip_norm = 2.0
min_noise_multiplier = 1.0
max_clip_norm = 1.0

{enrolled}"#,
                state = p(&coordinator_state),
                ca = p(&ca),
                rounds = settings.rounds,
                min_sites = settings.sites - 1,
                base = p(&base),
                seed = settings.seed,
            ),
        )?;
        let mut agent_toml = Vec::new();
        let mut agent_state = Vec::new();
        for site in &sites {
            let (pki, site_data, state) = (dir.join("pki").join(site), data.join(site), dir.join("agents").join(site));
            let toml = dir.join(format!("{site}.toml"));
            fs::write(
                &toml,
                format!(
                    r#"[coordinator]
address = "127.0.0.1:{port}"
server_name = "localhost"

[tls]
ca_cert = "{pki}/ca.crt"
cert = "{pki}/site.crt"
key = "{pki}/site.key"

[data]
train = "{d}/train.jsonl"
validation = "{d}/validation.jsonl"

[model]
base = "{base}"
labels = ["doctor", "bed", "device", "other"]

[budget]
max_epsilon = {MAX_EPSILON}
delta = {DELTA}
require_dp = true

[agent]
state_dir = "{state}"
device = "cpu"
max_backoff = "1s"
max_connect_attempts = 0
exit_when_finished = true
# several agents on one machine: `fedward-agent status` reads the files instead
status_listen = "off"
"#,
                    pki = p(&pki),
                    d = p(&site_data),
                    base = p(&base),
                    state = p(&state),
                ),
            )?;
            agent_toml.push(toml);
            agent_state.push(state);
        }
        Ok(Self {
            dir: dir.to_owned(),
            sites,
            rounds: settings.rounds,
            coordinator_toml,
            coordinator_state,
            agent_toml,
            agent_state,
            ledger_pub: ca.join("ledger.pub"),
            archive: dir.join("archive"),
            logs,
            admin_port,
        })
    }

    fn coordinator_ledger(&self) -> PathBuf {
        self.coordinator_state.join("ledger.jsonl")
    }

    fn site_ledger(&self, i: usize) -> PathBuf {
        self.agent_state[i].join(fedward_agent::daemon::LEDGER)
    }

    fn completed_rounds(&self) -> Option<u64> {
        let bytes = fs::read(self.coordinator_state.join(STATE_FILE)).ok()?;
        serde_json::from_slice::<SavedState>(&bytes).ok().map(|s| s.completed_rounds)
    }

    /// The sites the coordinator's dashboard lists as connected.
    fn connected(&self) -> Option<BTreeSet<String>> {
        let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], self.admin_port).into(), Duration::from_millis(200)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let request = format!("GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", self.admin_port);
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let body = response.split_once("\r\n\r\n")?.1;
        let status: serde_json::Value = serde_json::from_str(body).ok()?;
        Some(status["connected"].as_array()?.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Coordinator,
    Agent(usize),
}

/// A lost or cut file, done while its owner is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileFault {
    /// `state.json` deleted: the coordinator refuses (65) until started with `--recover`.
    StateLost,
    /// The coordinator ledger's last sealed round (entries and seal) removed: refused (65)
    /// until the ledger is restored.
    LedgerTailLost,
    /// Only the last seal removed: the coordinator seals the round again on start.
    SealLost,
    /// The coordinator ledger's last line without its newline: completed on start.
    CoordinatorLineCut,
    /// A site's whole ledger deleted: the agent stops (65) before spending, until restored.
    SiteLedgerLost,
    /// A site ledger's last line without its newline: completed on start.
    SiteLineCut,
}

const FILE_FAULTS: &[FileFault] = &[
    FileFault::StateLost,
    FileFault::SiteLedgerLost,
    FileFault::LedgerTailLost,
    FileFault::SiteLineCut,
    FileFault::SealLost,
    FileFault::CoordinatorLineCut,
];

/// What the next exit of a process must be after a file fault, and what to do then.
struct Expect {
    fault: FileFault,
    says: &'static str,
    then: Then,
}

enum Then {
    /// Start the coordinator once with `--recover`.
    Recover,
    /// Put the file back as it was.
    Restore { path: PathBuf, bytes: Vec<u8> },
}

struct Life {
    pid: u32,
    /// The crash point it was started with.
    armed: Option<String>,
    /// The supervisor killed it (a timed kill or a file fault).
    killed_by_us: Option<String>,
}

struct Chaos<'a> {
    settings: &'a Settings,
    bins: Bins,
    consortium: Consortium,
    rng: ChaCha8Rng,
    exits: (mpsc::Sender<Exit>, mpsc::Receiver<Exit>),
    alive: BTreeMap<Who, Life>,
    finished: BTreeSet<Who>,
    expect: BTreeMap<Who, Expect>,
    /// Crash points still to arm, by kind (shuffled, taken in turn).
    points: (Vec<&'static str>, Vec<&'static str>),
    file_turn: usize,
    kills: Vec<(String, String)>,
    file_faults: Vec<String>,
    starts: usize,
    next_fault: Instant,
    completed: u64,
    last_progress: Instant,
    /// A coordinator (re)start whose agents have not all reconnected yet.
    recovering: Option<Recovery>,
    /// Seconds from a coordinator's restart to the next completed round.
    recoveries: Vec<f64>,
    /// Seconds from a coordinator's restart until an agent that ran through it is connected
    /// again (one figure per agent and restart).
    reconnects: Vec<f64>,
    stopped_by_signal: Vec<String>,
    /// The round history in the `state.json` files the faults deleted: `--recover` cannot
    /// bring it back (the checkpoints and the ledger do not hold each site's weight), so the
    /// final check reads it from here.
    lost_history: Vec<RoundRecord>,
    began: Instant,
}

impl<'a> Chaos<'a> {
    fn new(settings: &'a Settings, bins: Bins, consortium: Consortium) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let next_fault = Instant::now() + Duration::from_millis(rng.random_range(500..2000));
        Self {
            settings,
            bins,
            consortium,
            rng,
            exits: mpsc::channel(),
            alive: BTreeMap::new(),
            finished: BTreeSet::new(),
            expect: BTreeMap::new(),
            points: (Vec::new(), Vec::new()),
            file_turn: 0,
            kills: Vec::new(),
            file_faults: Vec::new(),
            starts: 0,
            next_fault,
            completed: 0,
            last_progress: Instant::now(),
            recovering: None,
            recoveries: Vec::new(),
            reconnects: Vec::new(),
            stopped_by_signal: Vec::new(),
            lost_history: Vec::new(),
            began: Instant::now(),
        }
    }

    fn name(&self, who: Who) -> String {
        match who {
            Who::Coordinator => "coordinator".into(),
            Who::Agent(i) => self.consortium.sites[i].clone(),
        }
    }

    /// Faults go on while kills remain and before the last round: a federation's end is
    /// not a point a crash can be recovered from by a restart alone (a site that comes back
    /// after the coordinator finished waits for the next federation).
    fn faulting(&self) -> bool {
        self.kills.len() < self.settings.kills && self.completed + 1 < self.consortium.rounds
    }

    fn start(&mut self, who: Who, recover: bool) -> Result<()> {
        let armed = if self.faulting() && self.rng.random_bool(0.6) { Some(self.next_point(who)) } else { None };
        let (program, mut args) = match who {
            Who::Coordinator => {
                (&self.bins.coordinator, vec!["serve".to_owned(), "--config".into(), path_str(&self.consortium.coordinator_toml)])
            }
            Who::Agent(i) => (&self.bins.agent, vec!["run".to_owned(), "--config".into(), path_str(&self.consortium.agent_toml[i])]),
        };
        if recover {
            args.push("--recover".into());
        }
        let name = self.name(who);
        let mut log = fs::OpenOptions::new().create(true).append(true).open(self.consortium.logs.join(format!("{name}.log")))?;
        self.starts += 1;
        self.note(&format!(
            "start {} of {name}{}{}",
            self.starts,
            if recover { " --recover" } else { "" },
            armed.as_ref().map_or(String::new(), |a| format!(", armed {a}"))
        ));
        writeln!(
            log,
            "=== chaos: start {} of {name}{}{}",
            self.starts,
            if recover { " --recover" } else { "" },
            match &armed {
                Some(a) => format!(", armed {a}"),
                None => String::new(),
            }
        )?;
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .env("FEDWARD_LOG", std::env::var("FEDWARD_CHAOS_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .env("RAYON_NUM_THREADS", "1")
            .env(failpoint::ARCHIVE_ENV, &self.consortium.archive)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match &armed {
            Some(spec) => cmd.env("FAILPOINTS", spec),
            None => cmd.env_remove("FAILPOINTS"),
        };
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        let tx = self.exits.0.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send((who, pid, status));
            }
        });
        self.alive.insert(who, Life { pid, armed, killed_by_us: None });
        if who == Who::Coordinator && self.starts > 1 + self.consortium.sites.len() {
            let waiting = self.alive.iter().filter_map(|(w, l)| matches!(w, Who::Agent(_)).then_some((*w, l.pid))).collect();
            self.recovering = Some(Recovery { since: Instant::now(), completed: self.completed, round_done: false, waiting });
        }
        Ok(())
    }

    /// The next crash point for `who`, and when it fires: `k*off->return` passes it `k`
    /// times first.
    fn next_point(&mut self, who: Who) -> String {
        let (list, all) = match who {
            Who::Coordinator => (&mut self.points.0, COORDINATOR_POINTS),
            Who::Agent(_) => (&mut self.points.1, AGENT_POINTS),
        };
        if list.is_empty() {
            list.extend_from_slice(all);
            list.shuffle(&mut self.rng);
        }
        let point = list.pop().expect("refilled");
        let skips = self.rng.random_range(0..3);
        format!("{point}={skips}*off->return")
    }

    /// One line of the run's own story in `logs/chaos.log`, for whoever reads a failure.
    fn note(&self, what: &str) {
        let line = format!("{:9.3} {what}\n", self.began.elapsed().as_secs_f64());
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.consortium.logs.join("chaos.log"))
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }

    fn kill(&mut self, who: Who, why: &str) {
        if self.alive.contains_key(&who) {
            self.note(&format!("SIGKILL {} ({why})", self.name(who)));
        }
        if let Some(life) = self.alive.get_mut(&who) {
            life.killed_by_us = Some(why.to_owned());
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(life.pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Kills `who` and waits for its exit, without restarting it (other processes' exits
    /// are handled as usual). False when it had finished on its own first: the federation
    /// is over and the fault comes too late.
    fn kill_and_wait(&mut self, who: Who, why: &str) -> Result<bool> {
        if !self.alive.contains_key(&who) {
            return Ok(false);
        }
        self.kill(who, why);
        loop {
            let (w, pid, status) = self.exits.1.recv_timeout(Duration::from_secs(30)).context("a killed process did not exit")?;
            if w != who || self.alive.get(&who).is_none_or(|l| l.pid != pid) {
                self.on_exit(w, pid, status)?;
                continue;
            }
            let life = self.alive.remove(&who).expect("alive");
            self.note(&format!("{} exited: {status}", self.name(who)));
            if who == Who::Coordinator {
                self.recovering = None;
            }
            if status.success() {
                self.finished.insert(who);
                return Ok(false);
            }
            ensure!(status.signal() == Some(9), "{} exited with {status} when killed", self.name(who));
            let name = self.name(who);
            self.count_kill(&name, &life);
            return Ok(true);
        }
    }

    fn drive(&mut self) -> Result<()> {
        self.start(Who::Coordinator, false)?;
        for i in 0..self.consortium.sites.len() {
            self.start(Who::Agent(i), false)?;
        }
        loop {
            let now = Instant::now();
            if let Some(done) = self.consortium.completed_rounds() {
                if done > self.completed {
                    self.completed = done;
                    self.last_progress = now;
                }
            }
            ensure!(
                now.duration_since(self.last_progress) < WEDGE,
                "wedged: no round completed in {} s (after round {}; running: {:?})",
                WEDGE.as_secs(),
                self.completed,
                self.alive.keys().map(|w| self.name(*w)).collect::<Vec<_>>()
            );
            if let Some(r) = &mut self.recovering {
                // An agent restarted meanwhile connects afresh: not a recovery to time.
                r.waiting.retain(|(w, pid)| self.alive.get(w).is_some_and(|l| l.pid == *pid));
                if !r.waiting.is_empty() {
                    if let Some(connected) = self.consortium.connected() {
                        let sites = &self.consortium.sites;
                        let back: Vec<(Who, u32)> = r
                            .waiting
                            .iter()
                            .filter(|(w, _)| matches!(w, Who::Agent(i) if connected.contains(&sites[*i])))
                            .copied()
                            .collect();
                        for agent in back {
                            self.reconnects.push(r.since.elapsed().as_secs_f64());
                            r.waiting.remove(&agent);
                        }
                    }
                }
                if !r.round_done && self.completed > r.completed {
                    self.recoveries.push(r.since.elapsed().as_secs_f64());
                    r.round_done = true;
                }
                if r.round_done && r.waiting.is_empty() {
                    self.recovering = None;
                }
            }
            if self.finished.contains(&Who::Coordinator) {
                return self.let_agents_leave();
            }
            if self.faulting() && now >= self.next_fault {
                self.fault()?;
                self.next_fault = Instant::now() + Duration::from_millis(self.rng.random_range(500..2500));
            }
            let tick = if self.recovering.is_some() { Duration::from_millis(50) } else { Duration::from_millis(250) };
            match self.exits.1.recv_timeout(tick) {
                Ok((who, pid, status)) => self.on_exit(who, pid, status)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("supervisor channel closed"),
            }
        }
    }

    /// A timed fault: a SIGKILL of the coordinator, an agent or both at once, or (when file
    /// faults are on, every third time) a lost or cut file.
    fn fault(&mut self) -> Result<()> {
        let agent = Who::Agent(self.rng.random_range(0..self.consortium.sites.len()));
        let roll = self.rng.random_range(0..9);
        if self.settings.file_faults && roll < 3 && self.expect.is_empty() {
            let fault = FILE_FAULTS[self.file_turn % FILE_FAULTS.len()];
            self.file_turn += 1;
            return self.file_fault(fault, agent);
        }
        match roll {
            3..=4 => self.kill(Who::Coordinator, "sigkill"),
            5..=7 => self.kill(agent, "sigkill"),
            _ => {
                self.kill(Who::Coordinator, "sigkill (with an agent)");
                self.kill(agent, "sigkill (with the coordinator)");
            }
        }
        Ok(())
    }

    fn file_fault(&mut self, fault: FileFault, agent: Who) -> Result<()> {
        let Who::Agent(i) = agent else { unreachable!("an agent") };
        let c = &self.consortium;
        let (who, expect) = match fault {
            FileFault::StateLost | FileFault::LedgerTailLost | FileFault::SealLost | FileFault::CoordinatorLineCut => {
                if !self.kill_and_wait(Who::Coordinator, &format!("{fault:?}"))? {
                    self.file_faults.push(format!("{fault:?} (too late: the coordinator had finished)"));
                    return Ok(());
                }
                let c = &self.consortium;
                let ledger = c.coordinator_ledger();
                let bytes = fs::read(&ledger).unwrap_or_default();
                let lines: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
                let seals: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| is_seal(l)).map(|(n, _)| n).collect();
                let expect = match fault {
                    FileFault::StateLost => {
                        let path = c.coordinator_state.join(STATE_FILE);
                        let lost: SavedState = serde_json::from_slice(&fs::read(&path)?)?;
                        // Before the first round left a trace, a lost state.json is a fresh
                        // start, rightly.
                        let traces = lost.completed_rounds > 0 || !bytes.is_empty();
                        self.lost_history.extend(lost.history);
                        fs::remove_file(path)?;
                        traces.then_some(Expect { fault, says: "state.json is missing", then: Then::Recover })
                    }
                    FileFault::LedgerTailLost if !seals.is_empty() => {
                        let keep = if seals.len() >= 2 { seals[seals.len() - 2] + 1 } else { 0 };
                        fs::write(&ledger, lines[..keep].concat())?;
                        Some(Expect { fault, says: "the ledger lacks round(s)", then: Then::Restore { path: ledger, bytes } })
                    }
                    FileFault::SealLost if lines.last().is_some_and(|l| is_seal(l)) => {
                        fs::write(&ledger, lines[..lines.len() - 1].concat())?;
                        None
                    }
                    FileFault::CoordinatorLineCut if bytes.ends_with(b"\n") => {
                        fs::write(&ledger, &bytes[..bytes.len() - 1])?;
                        None
                    }
                    _ => {
                        self.file_faults.push(format!("{fault:?} (nothing to do yet)"));
                        return self.start(Who::Coordinator, false);
                    }
                };
                (Who::Coordinator, expect)
            }
            FileFault::SiteLedgerLost | FileFault::SiteLineCut => {
                let site = c.sites[i].clone();
                let accepted = accepted_from(&fs::read(c.coordinator_ledger()).unwrap_or_default(), &site);
                if !self.kill_and_wait(agent, &format!("{fault:?}"))? {
                    self.file_faults.push(format!("{fault:?} (too late: the agent had stopped)"));
                    return Ok(());
                }
                let path = self.consortium.site_ledger(i);
                let bytes = fs::read(&path).unwrap_or_default();
                let expect = match fault {
                    // Only once the coordinator accepted something from the site: until
                    // then nothing tells a lost ledger from a new site.
                    FileFault::SiteLedgerLost if accepted > 0 => {
                        fs::remove_file(&path)?;
                        Some(Expect { fault, says: "ledger is behind", then: Then::Restore { path, bytes } })
                    }
                    FileFault::SiteLineCut if bytes.ends_with(b"\n") => {
                        fs::write(&path, &bytes[..bytes.len() - 1])?;
                        None
                    }
                    _ => {
                        self.file_faults.push(format!("{fault:?} (nothing to do yet)"));
                        return self.start(agent, false);
                    }
                };
                (agent, expect)
            }
        };
        self.file_faults.push(format!("{fault:?}"));
        self.note(&format!("file fault {fault:?} done, expecting {:?}", expect.as_ref().map(|e| e.says)));
        if let Some(e) = expect {
            self.expect.insert(who, e);
        }
        self.start(who, false)
    }

    fn on_exit(&mut self, who: Who, pid: u32, status: ExitStatus) -> Result<()> {
        if self.alive.get(&who).is_none_or(|l| l.pid != pid) {
            return Ok(());
        }
        let life = self.alive.remove(&who).expect("alive");
        let name = self.name(who);
        self.note(&format!("{name} exited: {status}"));
        if who == Who::Coordinator {
            self.recovering = None;
        }
        if let Some(expect) = self.expect.remove(&who) {
            if status.signal() == Some(9) {
                // Killed before it could refuse: the fault still stands, and so does what
                // must come of it.
                self.count_kill(&name, &life);
                self.expect.insert(who, expect);
                return self.start(who, false);
            }
            let said = log_tail(&self.consortium.logs.join(format!("{name}.log")), 30);
            ensure!(
                status.code() == Some(i32::from(fedward_shared::cli::EXIT_STATE_INCONSISTENT)) && said.contains(expect.says),
                "{name} after {:?}: expected exit 65 saying {:?}, got {status}:\n{said}",
                expect.fault,
                expect.says
            );
            return match expect.then {
                Then::Recover => self.start(who, true),
                Then::Restore { path, bytes } => {
                    fs::write(&path, bytes)?;
                    self.start(who, false)
                }
            };
        }
        if status.signal() == Some(9) {
            self.count_kill(&name, &life);
            return self.start(who, false);
        }
        if status.success() {
            self.finished.insert(who);
            return Ok(());
        }
        bail!("{name} exited with {status}:\n{}", log_tail(&self.consortium.logs.join(format!("{name}.log")), 30))
    }

    fn count_kill(&mut self, name: &str, life: &Life) {
        let how = match (&life.killed_by_us, &life.armed) {
            (Some(why), _) => why.clone(),
            (None, Some(armed)) => armed.split('=').next().unwrap_or(armed).to_owned(),
            (None, None) => "unexplained SIGKILL".into(),
        };
        self.kills.push((name.to_owned(), how));
    }

    /// Once the coordinator finished: agents leave on their own; one that does not within
    /// [`AGENTS_LEAVE`] gets SIGTERM and must stop cleanly.
    fn let_agents_leave(&mut self) -> Result<()> {
        let deadline = Instant::now() + AGENTS_LEAVE;
        while self.alive.keys().any(|w| matches!(w, Who::Agent(_))) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Ok((who, pid, status)) = self.exits.1.recv_timeout(left) {
                self.on_exit(who, pid, status)?;
            }
        }
        let stragglers: Vec<Who> = self.alive.keys().copied().collect();
        for who in stragglers {
            self.stopped_by_signal.push(self.name(who));
            if let Some(life) = self.alive.get(&who) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(life.pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            let (w, pid, status) = self.exits.1.recv_timeout(Duration::from_secs(15)).context("an agent did not stop on SIGTERM")?;
            ensure!(status.success(), "{} did not stop cleanly on SIGTERM: {status}", self.name(w));
            self.on_exit(w, pid, status)?;
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        let running: Vec<Who> = self.alive.keys().copied().collect();
        for who in running {
            self.kill(who, "the run ended");
        }
        while !self.alive.is_empty() {
            match self.exits.1.recv_timeout(Duration::from_secs(10)) {
                Ok((who, pid, _)) => {
                    if self.alive.get(&who).is_some_and(|l| l.pid == pid) {
                        self.alive.remove(&who);
                    }
                }
                Err(_) => break,
            }
        }
    }

    fn log_tails(&self) -> String {
        let mut out = String::new();
        for who in std::iter::once(Who::Coordinator).chain((0..self.consortium.sites.len()).map(Who::Agent)) {
            let name = self.name(who);
            let _ = writeln!(out, "--- {name}.log (last lines)\n{}", log_tail(&self.consortium.logs.join(format!("{name}.log")), 25));
        }
        out
    }

    fn report(&self, wall: Duration) -> Report {
        let mut kills_by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for (_, how) in &self.kills {
            *kills_by_kind.entry(how.clone()).or_default() += 1;
        }
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v
        };
        Report {
            dir: self.consortium.dir.clone(),
            seed: self.settings.seed,
            sites: self.consortium.sites.len(),
            rounds_planned: self.consortium.rounds,
            kills: self.kills.len(),
            kills_by_kind,
            file_faults: self.file_faults.clone(),
            processes_started: self.starts,
            recoveries: sorted(&self.recoveries),
            reconnects: sorted(&self.reconnects),
            stopped_by_signal: self.stopped_by_signal.clone(),
            wall_secs: wall.as_secs_f64(),
            lost_history: self.lost_history.clone(),
            ..Report::default()
        }
    }
}

/// What a run did and what it found.
#[derive(Default)]
pub struct Report {
    pub dir: PathBuf,
    seed: u64,
    sites: usize,
    rounds_planned: u64,
    rounds_completed: u64,
    failed_attempts: usize,
    kills: usize,
    kills_by_kind: BTreeMap<String, usize>,
    file_faults: Vec<String>,
    processes_started: usize,
    recoveries: Vec<f64>,
    reconnects: Vec<f64>,
    stopped_by_signal: Vec<String>,
    double_counted: usize,
    max_epsilon_spent: f64,
    audits_passed: usize,
    audits: usize,
    model_max_error: f64,
    wall_secs: f64,
    broken: Vec<String>,
    log_tails: String,
    lost_history: Vec<RoundRecord>,
}

impl Report {
    /// What did not hold, with the logs' last lines; empty when all held.
    pub fn broken(&self) -> Vec<String> {
        let mut out = self.broken.clone();
        if !out.is_empty() {
            out.push(self.log_tails.clone());
        }
        out
    }

    /// The checks at the end, on the files the run left.
    fn check(&mut self, c: &Consortium) {
        if let Err(e) = self.check_all(c) {
            self.broken.push(format!("checking the run: {e:#}"));
        }
    }

    fn check_all(&mut self, c: &Consortium) -> Result<()> {
        // Every planned round completed exactly once: in the round history (with what
        // deleted state.json files held) and in the ledger's seals.
        let state: SavedState = serde_json::from_slice(&fs::read(c.coordinator_state.join(STATE_FILE))?)?;
        self.rounds_completed = state.completed_rounds;
        // `--recover` restarts from the newest round the ledger sealed: a round completed
        // after it (checkpointed, not sealed, then state.json lost) is redone, and its
        // earlier record superseded.
        let mut history: Vec<RoundRecord> = Vec::new();
        for record in self.lost_history.iter().chain(&state.history) {
            if record.outcome.starts_with("recovered") {
                history.retain(|r| r.round <= record.round);
            }
            history.push(record.clone());
        }
        let completed: Vec<&RoundRecord> = history.iter().filter(|r| r.outcome == "completed").collect();
        self.failed_attempts = history.iter().filter(|r| r.outcome != "completed" && !r.outcome.starts_with("recovered")).count();
        let coordinator_bytes = fs::read(c.coordinator_ledger())?;
        let seals: Vec<u64> = verified(&coordinator_bytes)?
            .entries()
            .iter()
            .filter_map(|e| match &e.body {
                Body::Seal(s) => Some(s.round.0),
                _ => None,
            })
            .collect();
        for round in 1..=c.rounds {
            let n = completed.iter().filter(|r| r.round == round).count();
            if n != 1 {
                self.broken.push(format!("round {round} completed {n} times"));
            }
            let sealed = seals.iter().filter(|r| **r == round).count();
            if sealed != 1 {
                self.broken.push(format!("round {round} sealed {sealed} times in the coordinator's ledger"));
            }
        }
        if state.completed_rounds != c.rounds {
            self.broken.push(format!("{} of {} rounds completed", state.completed_rounds, c.rounds));
        }

        // Ledgers: the coordinator's and every site's verify and reconcile.
        let key = fedward_shared::ledger_key::read_public_key(&c.ledger_pub)?;
        let audit = fedward_shared::audit::audit_ledger(&coordinator_bytes, Some(&key), Some(DELTA));
        self.audits += 1;
        if audit.passed() {
            self.audits_passed += 1;
        } else {
            self.broken.push(format!("the coordinator ledger's audit failed: {:?}", audit.findings));
        }
        let coordinator_ledger = verified(&coordinator_bytes)?;
        let mut accepted: BTreeMap<(String, u64, String), usize> = BTreeMap::new();
        for e in coordinator_ledger.entries() {
            if let Body::Accepted(a) = &e.body {
                *accepted.entry((a.site.to_string(), a.round.0, a.update_digest.to_hex())).or_default() += 1;
            }
        }
        let twice = accepted.values().filter(|n| **n > 1).count();
        if twice > 0 {
            self.broken.push(format!("{twice} update(s) recorded as accepted more than once"));
        }
        self.double_counted += twice;
        let mut releases: BTreeMap<(String, u64, String), usize> = BTreeMap::new();
        for (i, site) in c.sites.iter().enumerate() {
            let bytes = fs::read(c.site_ledger(i))?;
            let audit = fedward_shared::audit::audit_ledger(&bytes, None, Some(DELTA));
            let reconciled = fedward_shared::audit::reconcile_ledgers(&SiteId::new(site)?, &bytes, &coordinator_bytes, Some(&key));
            self.audits += 2;
            self.audits_passed += usize::from(audit.passed()) + usize::from(reconciled.passed());
            if !audit.passed() {
                self.broken.push(format!("{site}'s ledger audit failed: {:?}", audit.findings));
            }
            if !reconciled.passed() {
                self.broken.push(format!("{site}'s ledger does not reconcile: {:?}", reconciled.mismatches));
            }
            let ledger = verified(&bytes)?;
            let epsilon = ledger.accountant()?.epsilon(DELTA)?;
            self.max_epsilon_spent = self.max_epsilon_spent.max(epsilon);
            if epsilon > MAX_EPSILON {
                self.broken.push(format!("{site} spent epsilon {epsilon} over its budget {MAX_EPSILON}"));
            }
            let mut digests: BTreeMap<String, usize> = BTreeMap::new();
            for e in ledger.entries() {
                if let Body::Release(r) = &e.body {
                    *digests.entry(r.update_digest.to_hex()).or_default() += 1;
                    *releases.entry((site.clone(), r.round.0, r.update_digest.to_hex())).or_default() += 1;
                }
            }
            let twice = digests.values().filter(|n| **n > 1).count();
            if twice > 0 {
                self.broken.push(format!("{site} recorded {twice} release(s) twice"));
            }
            self.double_counted += twice;
        }

        // The final model is the initial one plus each round's weighted mean of the updates
        // the history names, each of them released by its site and accepted.
        let read_model = |round: u64| -> Result<TensorSet> {
            let path = c.coordinator_state.join(checkpoint_name(round));
            Ok(TensorSet::from_safetensors(&fs::read(&path).with_context(|| path.display().to_string())?, false)?)
        };
        let initial = read_model(0)?;
        let last = read_model(c.rounds)?;
        let mut expected: BTreeMap<String, Vec<f64>> =
            initial.iter().map(|(n, t)| (n.to_owned(), t.data().iter().map(|&x| f64::from(x)).collect())).collect();
        let mut rounds = completed;
        rounds.sort_by_key(|r| r.round);
        for record in rounds {
            let total: f64 = record.sites.iter().map(|s| s.weight.unwrap_or(s.num_examples) as f64).sum();
            let mut mean: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in &record.sites {
                let key = (s.site.clone(), record.round, s.update_digest.clone());
                if !releases.contains_key(&key) {
                    self.broken
                        .push(format!("round {}: {}'s update {} is in no release of its ledger", record.round, s.site, s.update_digest));
                }
                if !accepted.contains_key(&key) {
                    self.broken.push(format!(
                        "round {}: {}'s update {} is not in the coordinator's ledger",
                        record.round, s.site, s.update_digest
                    ));
                }
                let path = c.archive.join(format!("{}.bin", s.update_digest));
                let released = ReleasedUpdate::decode(&fs::read(&path).with_context(|| format!("{}", path.display()))?)?;
                let w = s.weight.unwrap_or(s.num_examples) as f64 * s.scale.unwrap_or(1.0) / total;
                for (name, t) in released.delta.iter() {
                    let m = mean.entry(name.to_owned()).or_insert_with(|| vec![0.0; t.data().len()]);
                    for (acc, &u) in m.iter_mut().zip(t.data()) {
                        *acc += w * f64::from(u);
                    }
                }
            }
            for (name, m) in mean {
                let e = expected.get_mut(&name).with_context(|| format!("round {}: an update of unknown tensor {name}", record.round))?;
                for (x, d) in e.iter_mut().zip(m) {
                    *x += d;
                }
            }
        }
        for (name, t) in last.iter() {
            let e = expected.get(name).with_context(|| format!("the final model has an unknown tensor {name}"))?;
            for (&got, &want) in t.data().iter().zip(e) {
                let error = (f64::from(got) - want).abs();
                self.model_max_error = self.model_max_error.max(error);
                if error > 1e-5 + 1e-5 * want.abs() {
                    self.broken.push(format!("the final model's {name} is {got}, the accepted updates imply {want}"));
                    break;
                }
            }
        }

        // No temporary file left behind.
        let mut leftovers = Vec::new();
        for dir in std::iter::once(&c.coordinator_state).chain(&c.agent_state) {
            find_temp_files(dir, &mut leftovers)?;
        }
        if !leftovers.is_empty() {
            self.broken.push(format!("temporary files left: {leftovers:?}"));
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        format!(
            "chaos (seed {}): {} sites, {}/{} rounds completed, {} failed attempts, {} kills {:?}, file faults {:?}, {} process \
             starts, after a coordinator restart: next round completed in {}, an agent reconnected in {}, {} double-counted, \
             audits {}/{} passed, max epsilon {:.3}, model error {:.2e}, {:.0} s{}",
            self.seed,
            self.sites,
            self.rounds_completed,
            self.rounds_planned,
            self.failed_attempts,
            self.kills,
            self.kills_by_kind,
            self.file_faults,
            self.processes_started,
            spread(&self.recoveries),
            spread(&self.reconnects),
            self.double_counted,
            self.audits_passed,
            self.audits,
            self.max_epsilon_spent,
            self.model_max_error,
            self.wall_secs,
            if self.stopped_by_signal.is_empty() { String::new() } else { format!(", SIGTERM to {:?}", self.stopped_by_signal) }
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let figures = |v: &[f64]| serde_json::json!({ "measured": v.len(), "median": v.get(v.len() / 2), "max": v.last() });
        serde_json::json!({
            "seed": self.seed,
            "sites": self.sites,
            "rounds_planned": self.rounds_planned,
            "rounds_completed": self.rounds_completed,
            "rounds_lost": self.rounds_planned.saturating_sub(self.rounds_completed),
            "failed_attempts": self.failed_attempts,
            "kills": self.kills,
            "kills_by_kind": self.kills_by_kind,
            "file_faults": self.file_faults,
            "processes_started": self.processes_started,
            "double_counted_releases": self.double_counted,
            "audits": self.audits,
            "audits_passed": self.audits_passed,
            "max_epsilon_spent": self.max_epsilon_spent,
            "model_max_abs_error": self.model_max_error,
            "restart_to_next_round_secs": figures(&self.recoveries),
            "restart_to_agent_reconnected_secs": figures(&self.reconnects),
            "stopped_by_sigterm": self.stopped_by_signal,
            "wall_secs": self.wall_secs,
            "broken": self.broken,
        })
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_owned()
}

/// A process's exit as its waiter thread reports it: who, which pid, how.
type Exit = (Who, u32, ExitStatus);

/// A coordinator restart being timed.
struct Recovery {
    since: Instant,
    /// Rounds completed when it started.
    completed: u64,
    round_done: bool,
    /// The agents that ran through the restart (with their pids), not yet connected again.
    waiting: BTreeSet<(Who, u32)>,
}

/// "median m s, max x s (n measured)" of sorted seconds.
fn spread(sorted: &[f64]) -> String {
    match (sorted.get(sorted.len() / 2), sorted.last()) {
        (Some(m), Some(x)) => format!("median {m:.2} s, max {x:.2} s ({} measured)", sorted.len()),
        _ => "- (none measured)".into(),
    }
}

fn is_seal(line: &[u8]) -> bool {
    serde_json::from_slice::<ledger::Entry>(line).is_ok_and(|e| matches!(e.body, Body::Seal(_)))
}

/// How many updates the coordinator's ledger holds as accepted from `site`.
fn accepted_from(ledger_bytes: &[u8], site: &str) -> usize {
    ledger::verify(ledger_bytes, None).entries.iter().filter(|e| matches!(&e.body, Body::Accepted(a) if a.site.as_str() == site)).count()
}

fn verified(bytes: &[u8]) -> Result<Ledger> {
    let report = ledger::verify(bytes, None);
    Ledger::from_verified(&report).with_context(|| format!("ledger does not verify: {:?}", report.problems))
}

fn find_temp_files(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            find_temp_files(&entry.path(), found)?;
        } else if entry.file_name().to_string_lossy().contains(".tmp-") {
            found.push(entry.path());
        }
    }
    Ok(())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
