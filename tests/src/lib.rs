//! Harness for fedward's end-to-end tests: a throwaway PKI, a coordinator on its own
//! runtime (so a test can kill it like a process), and agents with a deterministic trainer.
//!
//! Everything runs on 127.0.0.1 with real QUIC and mutual TLS; nothing sleeps to
//! synchronise: tests wait on the coordinator's status channel or on task results.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use fedward_agent::daemon::{self, DaemonError, DaemonOptions, DaemonOutcome};
use fedward_coordinator::ledger::CoordinatorLedger;
use fedward_coordinator::round::{RoundMachine, Settings};
use fedward_coordinator::server::{self, RunOutcome, ServerOptions, StatusView};
use fedward_coordinator::store::Store;
use fedward_models::{LocalUpdate, TrainContext, TrainError, Trainer};
use fedward_shared::config::{Admission, Aggregation, Pace, SiteBudget, Transport};
use fedward_shared::ledger_key::{self, PUBLIC_KEY_FILE, SIGNING_KEY_FILE};
use fedward_shared::pki::{self, CertifiedKey, Validity};
use fedward_shared::plan::{PrivacyMode, PrivacyPlan, Trainable, TrainingPlan};
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::{Hello, LocalMetrics, Message, PrivacyPolicy, Ready, RoundId, RoundOffer, SiteId, PROTOCOL_VERSION};

/// The DNS name in the test coordinator's certificate.
pub const SERVER_NAME: &str = "coordinator.test";

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn serial(n: u8) -> [u8; 16] {
    [n; 16]
}

/// A consortium CA with a coordinator certificate, issuing site certificates on demand.
pub struct TestPki {
    pub ca: CertifiedKey,
    pub server: CertifiedKey,
}

impl TestPki {
    pub fn new(name: &str) -> Self {
        let ca = pki::create_ca(name, Validity::days_from(now(), 2), serial(1)).expect("create CA");
        let server = pki::issue_server(
            &ca,
            &[SERVER_NAME.to_owned()],
            &["127.0.0.1".parse().expect("ip")],
            Validity::days_from(now(), 2),
            serial(2),
        )
        .expect("server cert");
        Self { ca, server }
    }

    pub fn server_tls(&self) -> rustls::ServerConfig {
        tls::server_config(
            &TlsMaterial {
                ca_pem: self.ca.cert_pem.as_bytes(),
                cert_pem: self.server.cert_pem.as_bytes(),
                key_pem: self.server.key_pem.as_bytes(),
            },
            None,
        )
        .expect("server tls")
    }

    /// A client config for `site`, with a key generated "at the site" and a certificate
    /// signed by this CA, valid for `validity`.
    pub fn site_tls_with(&self, site: &str, validity: Validity, trust: &TestPki) -> Arc<rustls::ClientConfig> {
        let id = SiteId::new(site).expect("site id");
        let req = pki::site_request(&id).expect("csr");
        let cert = pki::sign_site_request(&self.ca, &req.csr_pem, &id, validity, serial(3)).expect("sign");
        Arc::new(
            tls::client_config(&TlsMaterial {
                ca_pem: trust.ca.cert_pem.as_bytes(),
                cert_pem: cert.as_bytes(),
                key_pem: req.key_pem.as_bytes(),
            })
            .expect("client tls"),
        )
    }

    pub fn site_tls(&self, site: &str) -> Arc<rustls::ClientConfig> {
        self.site_tls_with(site, Validity::days_from(now(), 2), self)
    }

    /// A site's TLS config and its secure aggregation identity, from one certificate.
    pub fn site_secure(&self, site: &str) -> (Arc<rustls::ClientConfig>, fedward_agent::daemon::SecAggIdentity) {
        let id = SiteId::new(site).expect("site id");
        let req = pki::site_request(&id).expect("csr");
        let cert = pki::sign_site_request(&self.ca, &req.csr_pem, &id, Validity::days_from(now(), 2), serial(3)).expect("sign");
        let material = TlsMaterial { ca_pem: self.ca.cert_pem.as_bytes(), cert_pem: cert.as_bytes(), key_pem: req.key_pem.as_bytes() };
        let tls = Arc::new(tls::client_config(&material).expect("client tls"));
        let creds = fedward_shared::secagg::SiteCredentials::from_pem(cert.as_bytes(), req.key_pem.as_bytes()).expect("credentials");
        let trust = self.secagg_trust();
        (tls, fedward_agent::daemon::SecAggIdentity { creds, trust })
    }

    /// What the consortium's sites and coordinator check secure aggregation keys against.
    pub fn secagg_trust(&self) -> fedward_shared::secagg::Trust {
        fedward_shared::secagg::Trust::from_ca_pem(self.ca.cert_pem.as_bytes()).expect("trust")
    }
}

/// A small model with BERT-style names: only `classifier.*` trains under `Trainable::Head`.
pub fn tiny_global() -> TensorSet {
    let mut m = TensorSet::new();
    let t = |shape: Vec<usize>, f: &dyn Fn(usize) -> f32| {
        let n = shape.iter().product();
        Tensor::new(shape, (0..n).map(f).collect()).expect("shape")
    };
    m.insert("bert.embeddings.word_embeddings.weight", t(vec![16, 8], &|i| (i as f32 * 0.01).sin()));
    m.insert("bert.encoder.layer.0.output.dense.weight", t(vec![8, 8], &|i| (i as f32 * 0.02).cos()));
    m.insert("classifier.weight", t(vec![4, 8], &|i| i as f32 * 0.001));
    m.insert("classifier.bias", t(vec![4], &|_| 0.0));
    m
}

/// A plan that trains the head, without DP.
pub fn head_plan(model: &TensorSet) -> TrainingPlan {
    TrainingPlan::minimal(Trainable::Head, Trainable::Head.select(model.names()))
}

/// The seed of every test coordinator's ledger signing key.
pub const LEDGER_SEED: [u8; 32] = [42; 32];

/// A test coordinator's ledger file and the public key that verifies its seals.
pub fn ledger_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (state_dir.join("ledger.jsonl"), state_dir.join("keys").join(PUBLIC_KEY_FILE))
}

/// Options of a test coordinator.
pub struct CoordinatorSpec {
    pub rounds: u64,
    pub min_sites: usize,
    pub deadline: Duration,
    pub sites: Vec<&'static str>,
    pub state_dir: PathBuf,
    pub addr: SocketAddr,
    /// The privacy plan offered every round, and the policy updates are checked against.
    pub privacy: PrivacyPlan,
    pub policy: PrivacyPolicy,
    /// The coordinator's bounds on updates and how it combines them.
    pub aggregation: Aggregation,
    pub transport: Transport,
    pub admission: Admission,
    pub max_concurrent_uploads: usize,
    /// The issuing CA that renews site certificates, if any.
    pub renewal: Option<Arc<fedward_coordinator::renewal::Issuer>>,
    /// Secure aggregation, if the rounds run it.
    pub secure: Option<fedward_coordinator::round::SecureSettings>,
    /// Federated model selection, if the federation selects its model.
    pub selection: Option<fedward_coordinator::round::SelectionSettings>,
}

/// Short timeouts, so a test sees a dead peer quickly, with room for a loaded machine.
pub fn test_transport() -> Transport {
    Transport {
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_millis(750),
        handshake_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        pace: Pace { allowance: Duration::from_secs(5), min_bytes_per_sec: 1 << 20 },
    }
}

/// FedAvg with a bound far above what the scripted trainer sends (the tiny model's
/// trainable values are few, and its deltas small).
pub fn test_aggregation() -> Aggregation {
    Aggregation { max_update_norm: Some(1e3), ..Aggregation::default() }
}

/// No differential privacy, and a policy that accepts that.
pub fn no_privacy() -> (PrivacyPlan, PrivacyPolicy) {
    (PrivacyPlan::Off, PrivacyPolicy { mode: PrivacyMode::Off, min_noise_multiplier: 0.0, max_clip_norm: f64::INFINITY })
}

/// The releases in an agent's ledger (`state_dir/ledger.jsonl`), in order.
pub fn site_releases(agent_state_dir: &Path) -> Vec<fedward_shared::ledger::ReleaseRecord> {
    let file = fedward_shared::ledger_file::LedgerFile::open(agent_state_dir.join(daemon::LEDGER), None).expect("site ledger");
    file.ledger()
        .entries()
        .iter()
        .filter_map(|e| match &e.body {
            fedward_shared::ledger::Body::Release(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// A coordinator running on its own runtime and thread.
pub struct CoordinatorHandle {
    pub addr: SocketAddr,
    pub status: watch::Receiver<StatusView>,
    shutdown: Option<oneshot::Sender<()>>,
    result: Option<oneshot::Receiver<RunOutcome>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CoordinatorHandle {
    /// Starts a coordinator; resumes from `state_dir` when it holds a saved state.
    pub fn start(pki: &TestPki, spec: CoordinatorSpec) -> Self {
        let mut store = Store::open_exclusive(&spec.state_dir).expect("store");
        let mut plan = head_plan(&tiny_global());
        plan.privacy = spec.privacy;
        let settings = Settings {
            selection: spec.selection,
            total_rounds: spec.rounds,
            min_sites: spec.min_sites,
            round_deadline: spec.deadline,
            max_attempts: 3,
            max_update_bytes: 64 << 20,
            plan,
            policy: spec.policy,
            aggregation: spec.aggregation,
            enrolled: spec.sites.iter().map(|s| SiteId::new(*s).expect("site")).collect::<BTreeSet<_>>(),
            secure: spec.secure.clone(),
        };
        let keys = spec.state_dir.join("keys");
        if !keys.join(SIGNING_KEY_FILE).exists() {
            ledger_key::write_keypair(&keys, LEDGER_SEED).expect("ledger keys");
        }
        let key = ledger_key::read_signing_key(&keys.join(SIGNING_KEY_FILE)).expect("ledger key");
        let ledger = CoordinatorLedger::open(&ledger_paths(&spec.state_dir).0, key).expect("ledger");
        let (manifest, completed) = fedward_coordinator::startup::open(&mut store, &ledger, false, "now", || Ok(tiny_global()))
            .expect("state agrees with the ledger");
        let machine = RoundMachine::new(settings, manifest, completed)
            .expect("machine")
            .with_accepted(ledger.accepted())
            .expect("spend")
            .with_scores(fedward_coordinator::startup::saved_scores(&store));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let reset_secret = store.reset_secret().expect("reset secret");
        let tls = pki.server_tls();
        let endpoint = {
            let _in_runtime = runtime.enter();
            fedward_net::server_endpoint(spec.addr, tls, &spec.transport, &spec.admission, &reset_secret).expect("bind")
        };
        let addr = endpoint.local_addr().expect("addr");
        let (status_tx, status) = watch::channel(StatusView::default());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (result_tx, result_rx) = oneshot::channel();
        let options = ServerOptions {
            max_concurrent_uploads: spec.max_concurrent_uploads,
            max_concurrent_downloads: 4,
            finish_grace: Duration::from_secs(5),
            transport: spec.transport,
            admission: spec.admission,
            pins: Default::default(),
            revoked: Default::default(),
            paused: false,
            renewal: spec.renewal.clone(),
        };
        runtime.spawn(async move {
            let shutdown = async {
                let _ = shutdown_rx.await;
            };
            // No reloads or admin commands here: the senders are dropped, so those
            // branches never fire.
            let (_, reload) = tokio::sync::mpsc::channel(1);
            let (_, commands) = tokio::sync::mpsc::channel(1);
            let controls = server::Controls { status: status_tx, shutdown, reload, commands };
            let outcome = server::run(endpoint, machine, store, ledger, options, controls).await.expect("server run");
            let _ = result_tx.send(outcome);
        });
        Self { addr, status, shutdown: Some(shutdown_tx), result: Some(result_rx), runtime: Some(runtime) }
    }

    /// Waits until the coordinator has published its first status and returns it.
    pub async fn started(&mut self) -> StatusView {
        self.status.wait_for(|s| s.total_rounds > 0).await.expect("coordinator alive").clone()
    }

    /// Waits until the coordinator reports at least `n` completed rounds.
    pub async fn wait_completed(&mut self, n: u64) {
        self.status.wait_for(|s| s.completed_rounds >= n).await.expect("coordinator alive");
    }

    /// Kills the coordinator like a crashed process: its tasks and sockets vanish
    /// without a goodbye. Returns once they are gone.
    pub async fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(10))).await.expect("shutdown");
        }
    }

    /// Waits for the run to end by itself.
    pub async fn outcome(mut self) -> RunOutcome {
        let rx = self.result.take().expect("outcome once");
        let outcome = rx.await.expect("coordinator finished");
        self.shutdown.take();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        outcome
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// One update as the trainer produced it.
#[derive(Clone, Debug)]
pub struct Sent {
    pub round: RoundId,
    pub delta: TensorSet,
    pub num_examples: u64,
    pub global_digest: String,
}

/// A deterministic trainer: the delta of every trainable value is
/// `value * round + 0.001 * global_value` (so it depends on the model it received).
pub struct ScriptedTrainer {
    pub value: f32,
    pub examples: u64,
    /// Put a NaN into every update (a broken site).
    pub poison: bool,
    pub sent: Arc<Mutex<Vec<Sent>>>,
    /// Model selection: `(correct, examples)` of its validation split for each model it is
    /// asked to score, in order (none: the site has no validation split).
    pub scores: std::collections::VecDeque<(u64, u64)>,
}

impl ScriptedTrainer {
    pub fn new(value: f32, examples: u64) -> (Self, Arc<Mutex<Vec<Sent>>>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        (Self { value, examples, poison: false, sent: sent.clone(), scores: Default::default() }, sent)
    }
}

impl Trainer for ScriptedTrainer {
    fn train(&mut self, ctx: TrainContext<'_>, global: &TensorSet, plan: &TrainingPlan) -> Result<LocalUpdate, TrainError> {
        let mut delta = TensorSet::new();
        for name in &plan.trainable_tensors {
            let g = global.get(name).ok_or_else(|| TrainError::ModelMismatch(name.clone()))?;
            let data: Vec<f32> = g.data().iter().map(|&x| self.value * ctx.round.0 as f32 + 0.001 * x).collect();
            delta.insert(name.clone(), Tensor::new(g.shape().to_vec(), data).expect("shape"));
        }
        if self.poison {
            if let Some((_, t)) = delta.iter_mut().next() {
                t.data_mut()[0] = f32::NAN;
            }
        }
        self.sent.lock().expect("lock").push(Sent {
            round: ctx.round,
            delta: delta.clone(),
            num_examples: self.examples,
            global_digest: global.digest().to_hex(),
        });
        Ok(LocalUpdate {
            delta,
            num_examples: self.examples,
            metrics: LocalMetrics { train_loss: f64::from(self.value), ..Default::default() },
            // A scripted stand-in for DP-SGD: it claims the steps the plan accounts for, so
            // the agent's record-level plumbing (step check, update clip, ledger) runs.
            dp_steps: match plan.privacy {
                PrivacyPlan::RecordLevel { .. } => {
                    fedward_shared::dp::Release::planned(&plan.privacy, plan.local_epochs).map_or(0, |r| r.steps)
                }
                _ => 0,
            },
        })
    }

    fn num_examples(&self) -> u64 {
        self.examples
    }

    fn can_score(&self) -> bool {
        !self.scores.is_empty()
    }

    fn score(&mut self, _global: &TensorSet, _plan: &TrainingPlan) -> Result<Option<(u64, u64)>, TrainError> {
        Ok(self.scores.pop_front())
    }
}

/// A [`ScriptedTrainer`] that says when training starts and then waits for the test to
/// let it finish: a test can act while an agent is mid-round, without sleeps.
pub struct GatedTrainer {
    pub inner: ScriptedTrainer,
    started: std::sync::mpsc::Sender<RoundId>,
    gate: std::sync::mpsc::Receiver<()>,
}

/// The test's side of a [`GatedTrainer`].
pub struct Gate {
    started: std::sync::mpsc::Receiver<RoundId>,
    open: std::sync::mpsc::Sender<()>,
}

impl GatedTrainer {
    pub fn new(value: f32, examples: u64) -> (Self, Gate) {
        Self::wrapping(ScriptedTrainer::new(value, examples).0)
    }

    /// Gates `inner` (whose log of what it sent the caller may keep).
    pub fn wrapping(inner: ScriptedTrainer) -> (Self, Gate) {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        (Self { inner, started: started_tx, gate: open_rx }, Gate { started: started_rx, open: open_tx })
    }
}

impl Gate {
    /// Waits until the trainer has started a round, and returns it.
    pub async fn started(self) -> (RoundId, Self) {
        tokio::task::spawn_blocking(move || (self.started.recv().expect("trainer gone"), self)).await.expect("join")
    }

    /// Lets the waiting round finish.
    pub fn open(&self) {
        let _ = self.open.send(());
    }
}

impl Trainer for GatedTrainer {
    fn train(&mut self, ctx: TrainContext<'_>, global: &TensorSet, plan: &TrainingPlan) -> Result<LocalUpdate, TrainError> {
        let _ = self.started.send(ctx.round);
        let _ = self.gate.recv();
        self.inner.train(ctx, global, plan)
    }

    fn num_examples(&self) -> u64 {
        self.inner.num_examples()
    }
}

/// Daemon options for a test agent.
pub fn agent_options(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, state_dir: &Path, max_attempts: u32) -> DaemonOptions {
    DaemonOptions {
        coordinator_addr: addr.to_string(),
        server_name: SERVER_NAME.to_owned(),
        tls,
        state_dir: state_dir.to_owned(),
        budget: SiteBudget { max_epsilon: 10.0, delta: 1e-5, max_rounds: None, require_dp: false, share_metrics: false },
        max_backoff: Duration::from_millis(400),
        max_connect_attempts: max_attempts,
        exit_when_finished: true,
        transport: test_transport(),
        max_model_bytes: 64 << 20,
        seed: Some(7),
        renewal: None,
        fail_after_ledger_write: false,
        secagg: None,
    }
}

/// Spawns an agent daemon on the current runtime.
pub fn spawn_agent(opts: DaemonOptions, trainer: impl Trainer + 'static) -> tokio::task::JoinHandle<Result<DaemonOutcome, DaemonError>> {
    tokio::spawn(daemon::run(opts, Box::new(trainer), std::future::pending()))
}

/// `model + sum_i w_i d_i / sum_i w_i` for the given updates.
pub fn apply_weighted_mean(model: &mut TensorSet, updates: &[(u64, &TensorSet)]) {
    let total: f64 = updates.iter().map(|(w, _)| *w as f64).sum();
    for (name, t) in model.iter_mut() {
        if !updates.iter().all(|(_, d)| d.contains(name)) {
            continue;
        }
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            let mean: f64 =
                updates.iter().map(|(w, d)| *w as f64 * f64::from(d.get(name).expect("present").data()[i])).sum::<f64>() / total;
            *v += mean as f32;
        }
    }
}

/// Installs a test log subscriber once (shown on failure), honouring `FEDWARD_LOG`.
pub fn init_logging() {
    let filter = std::env::var("FEDWARD_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A site driven by hand over real QUIC, for tests that misbehave on purpose: it speaks
/// the protocol message by message and can lie in any field.
pub struct ManualSite {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl ManualSite {
    /// Connects as `site` and says hello; the coordinator must welcome it.
    pub async fn connect(pki: &TestPki, site: &str, addr: SocketAddr) -> Self {
        let endpoint = fedward_net::client_endpoint(addr, (*pki.site_tls(site)).clone(), &test_transport()).expect("endpoint");
        let conn = endpoint.connect(addr, SERVER_NAME).expect("connect").await.expect("handshake");
        let me = Self { endpoint, conn };
        let hello = Hello { protocol_version: PROTOCOL_VERSION, software: "manual".into(), capabilities: vec![], budget: None };
        assert!(matches!(me.exchange(&Message::Hello(hello), None).await, Message::Welcome(_)), "welcomed");
        me
    }

    /// Sends `msg` on a fresh stream and reads the answer; with `tensors`, an update: their
    /// bytes follow once the coordinator says `Proceed`, and the answer after them is
    /// returned (a refusal of the header alone is returned as it comes).
    pub async fn exchange(&self, msg: &Message, tensors: Option<&TensorSet>) -> Message {
        let (mut send, mut recv) = self.conn.open_bi().await.expect("stream");
        fedward_net::write_message(&mut send, msg).await.expect("write");
        if let Some(t) = tensors {
            match fedward_net::read_message(&mut recv).await.expect("answer to the header") {
                Message::Proceed(_) => fedward_net::write_tensors(&mut send, t, &t.specs()).await.expect("bytes"),
                refused => return refused,
            }
        }
        let _ = send.finish();
        fedward_net::read_message(&mut recv).await.expect("answer")
    }

    /// Says ready on a task of its own (the answer comes when a round opens).
    pub fn ready(&self) -> tokio::task::JoinHandle<Message> {
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            fedward_net::write_message(&mut send, &Message::Ready(Ready { have_model: None })).await.expect("write");
            let _ = send.finish();
            fedward_net::read_message(&mut recv).await.expect("offer")
        })
    }
}

/// A delta of `value` for every tensor an update of `offer` carries.
pub fn delta_for(offer: &RoundOffer, value: f32) -> TensorSet {
    offer
        .trainable_specs()
        .map(|s| (s.name.clone(), Tensor::new(s.shape.clone(), vec![value; s.shape.iter().product()]).expect("shape")))
        .collect()
}
