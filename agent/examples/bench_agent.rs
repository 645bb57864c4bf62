//! Bench (not a test, not shipped): a real agent process, the production daemon
//! (`fedward_agent::daemon::run`), with a trainer that does no training: it returns a
//! constant delta for every trainable tensor, so a round's time is the federation's own
//! (transfers, checks, cache, ledger, aggregation, checkpoint). `scripts/bench.sh round`
//! builds it in release and starts one per site against the real `fedward-coordinator`
//! (coordinator/benches/round.rs). The `fedward-agent` binary has no such mode.
//!
//! It logs like the real agent (`FEDWARD_LOG`, `FEDWARD_LOG_FORMAT=json`), and once per
//! round a `bench trainer done` event with the trainer's own seconds, so the bench can
//! tell the agent's non-training time from the trainer's. Like the real agent it takes
//! part in secure rounds (its certificate's key signs its round keys) when the
//! coordinator's offer says so.
//!
//! ```text
//! bench_agent --coordinator 127.0.0.1:PORT --server-name NAME --ca ca.crt --cert site.crt \
//!     --key site.key --state-dir DIR [--examples N]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use fedward_agent::daemon::{self, DaemonOptions, DaemonOutcome, SecAggIdentity};
use fedward_models::{LocalUpdate, TrainContext, TrainError, Trainer};
use fedward_shared::config::{SiteBudget, Transport};
use fedward_shared::plan::TrainingPlan;
use fedward_shared::secagg::{SiteCredentials, Trust};
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::LocalMetrics;

/// The delta of every trainable value: small, so the averaged model stays finite and the
/// coordinator's norm bound is never what decides.
const DELTA: f32 = 1e-4;

/// Returns `DELTA` for every value of every trainable tensor, filled at once, after
/// `train_secs` of waiting (`FEDWARD_BENCH_TRAIN_SECS`, default 0): a stand-in for a site's
/// local training on its own machine, so that a round's protocol overhead can be set
/// against a round that trains. A wait, not work: on the bench's one machine, sites
/// computing at once would share its cores, where hospitals each have their own.
struct NoTraining {
    examples: u64,
    train_secs: f64,
}

impl Trainer for NoTraining {
    fn train(&mut self, ctx: TrainContext<'_>, global: &TensorSet, plan: &TrainingPlan) -> Result<LocalUpdate, TrainError> {
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(self.train_secs));
        let mut delta = TensorSet::new();
        for name in &plan.trainable_tensors {
            let g = global.get(name).ok_or_else(|| TrainError::ModelMismatch(name.clone()))?;
            let shape = g.shape().to_vec();
            let len = shape.iter().product();
            // The shape comes from the global model itself, so it always matches the data.
            delta.insert(name.clone(), Tensor::new(shape, vec![DELTA; len]).map_err(|_| TrainError::ModelMismatch(name.clone()))?);
        }
        tracing::info!(round = ctx.round.0, trainer_secs = started.elapsed().as_secs_f64(), "bench trainer done");
        Ok(LocalUpdate { delta, num_examples: self.examples, metrics: LocalMetrics::default(), dp_steps: 0 })
    }

    fn num_examples(&self) -> u64 {
        self.examples
    }
}

struct Args {
    coordinator: String,
    server_name: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    state_dir: PathBuf,
    examples: u64,
}

fn parse_args() -> Result<Args> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let need = |flag: &str| arg(flag).with_context(|| format!("{flag} is required"));
    Ok(Args {
        coordinator: need("--coordinator")?,
        server_name: need("--server-name")?,
        ca: need("--ca")?.into(),
        cert: need("--cert")?.into(),
        key: need("--key")?.into(),
        state_dir: need("--state-dir")?.into(),
        examples: arg("--examples").map(|s| s.parse()).transpose()?.unwrap_or(1000),
    })
}

fn main() -> Result<()> {
    fedward_shared::cli::init_tracing();
    let args = parse_args()?;
    let (ca_pem, cert_pem, key_pem) = (std::fs::read(&args.ca)?, std::fs::read(&args.cert)?, std::fs::read(&args.key)?);
    let tls = tls::client_config(&TlsMaterial { ca_pem: &ca_pem, cert_pem: &cert_pem, key_pem: &key_pem })?;
    let secagg = SecAggIdentity { creds: SiteCredentials::from_pem(&cert_pem, &key_pem)?, trust: Trust::from_ca_pem(&ca_pem)? };
    // The production agent's settings, except the trainer and a budget that asks for no DP
    // (the bench's coordinator runs without it).
    let opts = DaemonOptions {
        coordinator_addr: args.coordinator,
        server_name: args.server_name,
        tls: Arc::new(tls),
        state_dir: args.state_dir,
        budget: SiteBudget { max_epsilon: 10.0, delta: 1e-5, max_rounds: None, require_dp: false, share_metrics: false },
        max_backoff: Duration::from_millis(500),
        max_connect_attempts: 20,
        exit_when_finished: true,
        transport: Transport::default(),
        max_model_bytes: 1 << 30,
        seed: None,
        renewal: None,
        fail_after_ledger_write: false,
        secagg: Some(secagg),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let train_secs = match std::env::var("FEDWARD_BENCH_TRAIN_SECS") {
        Ok(v) => v.parse().context("FEDWARD_BENCH_TRAIN_SECS")?,
        Err(_) => 0.0,
    };
    let trainer = Box::new(NoTraining { examples: args.examples, train_secs });
    match runtime.block_on(async { daemon::run(opts, trainer, fedward_net::shutdown_signal()).await })? {
        DaemonOutcome::Finished { .. } => Ok(()),
        DaemonOutcome::Shutdown => bail!("stopped before the federation finished"),
    }
}
