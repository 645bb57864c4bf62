//! `fedward-demo`: a whole federation on one machine, run as a newcomer would run it.
//!
//! Everything goes through the real binaries as separate processes: the consortium's PKI
//! (`pki init`, `pki request`, `pki sign`), three hospitals' data (`data synth`), a
//! coordinator and three agents talking QUIC with mutual TLS on 127.0.0.1, the baselines
//! (`baseline all`: centralized and local-only in one process) and the export of the final model
//! (`export`, checked with `eval`), then the allocation simulator (`allocate simulate`) on one
//! hospital with the federated and with its local-only model. This driver only writes configs, watches the
//! coordinator's state directory and scores each round's global model on the pooled test
//! split and on the hand-written evaluation set (in-process, with the frozen prefix cached
//! across rounds), scores the exported model and the baselines on the hand-written set with
//! `eval`, then writes the report. The hand-written set only measures: nothing trains, tunes
//! or selects on it.
//! `deploy/demo.sh` builds the binaries and fetches the weights first.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

use fedward_models::io::load_dir;
use fedward_models::text::read_jsonl;
use fedward_models::train::EvalSet;
use fedward_shared::codec::UpdateEncoding;
use fedward_shared::config::DEFAULT_LABELS;
use fedward_shared::dp::accountant::{plan_epsilon, plan_min_sigma, Plan};
use fedward_shared::dp::dp_sgd_steps;
use fedward_shared::history::{checkpoint_name, SavedState, STATE_FILE};
use fedward_shared::html::escape as html_escape;
use fedward_shared::plan::{Optimizer, PrivacyMode, Trainable};
use fedward_shared::tensor::TensorSet;

/// Run a local federation demo: PKI, data for three hospitals, a coordinator and three
/// agents as processes on 127.0.0.1 with mutual TLS, a per-round table, the baselines and a
/// report (report.json, report.html) with the final model in OUT/model.
#[derive(Parser)]
#[command(name = "fedward-demo", version)]
struct Args {
    /// Output directory (replaced if it holds an earlier demo).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Federated rounds. Many short rounds beat few long ones on non-IID sites: each site
    /// drifts toward its own label mix less before the average pulls it back.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Also run the federation with record-level differential privacy (DP-SGD at each
    /// site, epsilon <= --epsilon at delta 1e-5 per site over the whole run) and report it
    /// beside the run without DP.
    #[arg(long)]
    dp: bool,
    /// The per-site privacy budget of the DP run.
    #[arg(long, default_value_t = 8.0)]
    epsilon: f64,
    /// The DP run's mechanism: `record-level` (DP-SGD at each site: a record's presence),
    /// `site-level` (each site clips its update to --dp-update-clip-norm and adds the whole
    /// Gaussian noise: a hospital's presence), or `distributed` (site-level adjacency under
    /// secure aggregation, threshold 2 of 3: each site adds a discrete Gaussian share so
    /// that any 2 honest sites' shares carry the whole noise; docs/PRIVACY.md). The two
    /// site-level mechanisms train --dp-trainable with the run without DP's optimiser.
    #[arg(long, default_value = "record-level")]
    dp_mode: PrivacyMode,
    /// Rounds of the DP run [default: --rounds]. At a fixed epsilon each extra round costs
    /// a little more noise per step but keeps paying when sites hold many records: with
    /// 10,000 notes per site, 40 rounds brought the DP model within 5 points of the run
    /// without DP, where 10 rounds left it 15 points short (docs/PRIVACY.md).
    #[arg(long)]
    dp_rounds: Option<u32>,
    /// What trains in the DP run. DP-SGD's noise grows with the square root of the number
    /// of trained parameters: low-rank adapters on the top layer (`lora:8`, 57 thousand)
    /// keep it small where `top:1` (1.9 million) drowns the signal (docs/PRIVACY.md).
    #[arg(long, default_value = "lora:8")]
    dp_trainable: Trainable,
    /// The DP run's local optimiser: `sgd:M` (SGD with momentum M) or `adamw`. AdamW
    /// turns DP noise into full-size steps in random directions (docs/PRIVACY.md).
    #[arg(long, default_value = "sgd:0.9")]
    dp_optimizer: Optimizer,
    /// Peak learning rate of the DP run.
    #[arg(long, default_value_t = 0.5)]
    dp_learning_rate: f64,
    /// Expected Poisson batch of the DP run: its sampling rate is this over the smallest
    /// site's training notes. A larger batch shrinks the noise on each step's mean
    /// gradient but leaves fewer steps for the same epochs (docs/PRIVACY.md).
    #[arg(long, default_value_t = 88)]
    dp_batch_size: u32,
    /// Expected passes over each site's data per round in the DP run.
    #[arg(long, default_value_t = 2)]
    dp_local_epochs: u32,
    /// Per-example gradient clipping norm C of the DP run (near the median per-example
    /// gradient norm, which the agents log at debug level).
    #[arg(long, default_value_t = 1.0)]
    dp_clip_norm: f64,
    /// Bound on the L2 norm of each DP update (post-processing: it costs no privacy). The
    /// agents log each round's update norm (`norm_before`): a bound the updates keep
    /// reaching slows learning. With 7,000 records a site and 40 steps a round the
    /// updates reach 10, so the hospital-scale run needs a looser one (docs/PRIVACY.md).
    #[arg(long, default_value_t = 10.0)]
    dp_update_clip_norm: f64,
    /// Directory holding the fedward-agent and fedward-coordinator binaries.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The pretrained base model directory.
    #[arg(long, default_value = "models-data/all-MiniLM-L6-v2")]
    base: PathBuf,
    /// Seed of the synthetic data, the head's initialisation and local shuffling.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Notes per hospital (70% train, 15% validation, 15% test).
    #[arg(long, default_value_t = 2500)]
    notes_per_site: usize,
    /// Which part of the model trains: head, top:K, body:K, bias:K, lora:R or all. The
    /// default, `body:1`, trains the top encoder layer and the pooler and keeps the seeded
    /// classifier fixed: with the hospitals' different label mixes that federates better
    /// than training the classifier too (`top:1`); see docs/DEVELOPMENT-NOTES.md.
    #[arg(long, default_value = "body:1")]
    trainable: Trainable,
    /// Passes over its training data each site makes in a round.
    #[arg(long, default_value_t = 1)]
    local_epochs: u32,
    /// Mini-batch size of local training (and of the baselines). 32 takes a third less time
    /// per epoch than 16 on this CPU (fewer, fuller steps) for the same accuracy.
    #[arg(long, default_value_t = 32)]
    batch_size: u32,
    /// Peak learning rate of each site's AdamW.
    #[arg(long, default_value_t = 1.5e-3)]
    learning_rate: f64,
    /// Tokens per note after truncation. The notes run to about 110 tokens and most put
    /// their ask last: cutting at 64 drops the ask of about one note in twelve.
    #[arg(long, default_value_t = 128)]
    max_seq_len: u32,
    /// How the sites send their updates: `f32`, `f16`, `int8` (a scale per tensor) or
    /// `int8-row` (a scale per row), quantized after the privacy step. f16 halves the
    /// bytes for the same accuracy on the default run; int8-row quarters them and cost 0.5
    /// points there (BENCHMARKS.md).
    #[arg(long, default_value = "f16")]
    update_encoding: UpdateEncoding,
    /// FedProx: the weight mu of the proximal term `mu/2 ||w - w_global||^2` every site
    /// adds to its local loss, in both runs (0: off).
    #[arg(long, default_value_t = 0.0)]
    prox_mu: f64,
    /// How the coordinator applies each round's combined update, in both runs: `fedavg`,
    /// `fedavgm` (server momentum 0.9), `fedadam` or `fedyogi` (docs/ADMIN.md).
    #[arg(long, default_value = "fedavg")]
    server_optimizer: String,
    /// The server optimiser's learning rate [default: 1 for fedavg and fedavgm; fedadam and
    /// fedyogi need one].
    #[arg(long)]
    server_learning_rate: Option<f64>,
    /// Both runs under secure aggregation (SecAgg+, `[aggregation] method = "secure"`): the
    /// coordinator receives only masked updates and learns their example-weighted sum; a
    /// round needs 2 of the 3 hospitals (threshold 2). Updates then travel as f32 values
    /// under fixed-point masks, whatever --update-encoding says (docs/ADMIN.md).
    #[arg(long)]
    secure: bool,
    /// Which model the run without DP ends with: `best` (federated model selection: each
    /// hospital scores every global model on its own validation split, one final round
    /// scores the last, and the best of the last 5 by the example-weighted figure is the
    /// result) or `last` (the last round's). Not under --secure (a score would leave in the
    /// clear), and never in the DP run, whose budget is planned for training alone.
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    select: String,
    /// Skip the baselines and the allocation simulator, which needs a local-only model
    /// (faster; the report then has no comparison).
    #[arg(long)]
    skip_baselines: bool,
}

const SITES: [&str; 3] = ["trauma-centre", "rural-hospital", "childrens-hospital"];
/// The hand-written evaluation set (`models/corpus/handwritten/`, checked by the corpus
/// crate's tests): notes the generator never wrote, to show how far the generated test split
/// flatters every model. Scored beside the pooled test split, never trained, tuned or
/// selected on.
const HANDWRITTEN_JSONL: &str = include_str!("../../../models/corpus/handwritten/notes.jsonl");
/// The consortium's target on the hand-written set (issue 24): at least this accuracy, and
/// within [`HANDWRITTEN_MAX_GAP`] of the same model's accuracy on the generated test split.
const HANDWRITTEN_TARGET: f64 = 0.92;
const HANDWRITTEN_MAX_GAP: f64 = 0.02;
const DELTA: f64 = 1e-5;
/// Marks a directory as the demo's own, so a re-run may replace it.
const MARKER: &str = ".fedward-demo";

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The binaries and where their logs go.
struct Tools {
    agent: PathBuf,
    coordinator: PathBuf,
    logs: PathBuf,
}

impl Tools {
    /// Runs a tool to completion, its output into `logs/<log>.log`; the error names the log.
    fn run(&self, program: &Path, args: &[&str], log: &str) -> Result<String> {
        let log_path = self.logs.join(format!("{log}.log"));
        let out =
            Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| format!("starting {}", program.display()))?;
        let mut f = fs::File::create(&log_path)?;
        f.write_all(&out.stdout)?;
        f.write_all(&out.stderr)?;
        if !out.status.success() {
            bail!(
                "{} {} failed ({}); see {}\n{}",
                program.display(),
                args.join(" "),
                out.status,
                log_path.display(),
                tail(&out.stderr, 12)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like [`Tools::run`] for a long job, saying every 30 s that it is still running.
    fn run_long(&self, program: &Path, args: &[&str], log: &str) -> Result<String> {
        let (out_path, log_path) = (self.logs.join(format!("{log}.out")), self.logs.join(format!("{log}.log")));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path)?)
            .stderr(fs::File::create(&log_path)?)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let started = Instant::now();
        let mut next_report = 30;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(Duration::from_millis(500));
            let secs = started.elapsed().as_secs();
            if secs >= next_report {
                println!("  ... {log} in progress ({secs} s so far)");
                next_report += 30;
            }
        };
        if !status.success() {
            bail!(
                "{} {} failed ({status}); see {}\n{}",
                program.display(),
                args.join(" "),
                log_path.display(),
                tail(&fs::read(&log_path)?, 12)
            );
        }
        Ok(fs::read_to_string(&out_path)?)
    }

    /// Starts a long-running tool. `threads` caps its compute threads: three agents share
    /// this machine's cores, and more threads than cores only makes them wait on each other.
    fn spawn(&self, program: &Path, args: &[&str], log: &str, threads: Option<usize>) -> Result<Child> {
        let log_path = self.logs.join(format!("{log}.log"));
        let file = fs::File::create(&log_path)?;
        let mut cmd = Command::new(program);
        if let (Some(n), Err(_)) = (threads, std::env::var("RAYON_NUM_THREADS")) {
            cmd.env("RAYON_NUM_THREADS", n.to_string());
        }
        cmd.args(args)
            .env("FEDWARD_LOG", std::env::var("FEDWARD_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))
    }
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.dp_rounds != Some(0), "--dp-rounds must be at least 1");
    let out = prepare_out_dir(&args.out)?;
    let tools =
        Tools { agent: args.bin_dir.join("fedward-agent"), coordinator: args.bin_dir.join("fedward-coordinator"), logs: out.join("logs") };
    fs::create_dir_all(&tools.logs)?;
    let base = fs::canonicalize(&args.base)
        .with_context(|| format!("the base model {} is missing: run scripts/fetch-models.sh", args.base.display()))?;

    step("PKI: consortium CA, coordinator certificate, three hospitals' keys and certificates");
    let pki = out.join("pki");
    let ca_dir = pki.join("consortium");
    tools.run(
        &tools.coordinator,
        &["pki", "init", "--dir", s(&ca_dir), "--server-name", "localhost", "--server-ip", "127.0.0.1"],
        "pki-init",
    )?;
    for site in SITES {
        let dir = pki.join(site);
        tools.run(&tools.agent, &["pki", "request", "--site", site, "--dir", s(&dir)], &format!("pki-request-{site}"))?;
        let (csr, crt) = (dir.join("site.csr"), dir.join("site.crt"));
        tools.run(
            &tools.coordinator,
            &["pki", "sign", "--ca-dir", s(&ca_dir), "--csr", s(&csr), "--site", site, "--out", s(&crt)],
            &format!("pki-sign-{site}"),
        )?;
        fs::copy(ca_dir.join("ca.crt"), dir.join("ca.crt"))?;
    }

    step("data: a synthetic triage corpus for three hospitals (non-IID)");
    let data = out.join("data");
    let mut synth = vec!["data", "synth", "--out", s(&data)];
    let (seed, notes) = (args.seed.to_string(), args.notes_per_site.to_string());
    synth.extend(["--seed", &seed, "--notes-per-site", &notes]);
    for site in SITES {
        synth.extend(["--site", site]);
    }
    print!("{}", indent(&tools.run(&tools.agent, &synth, "data-synth")?));
    let labels: Vec<String> = DEFAULT_LABELS.iter().map(|l| (*l).to_owned()).collect();
    let pooled_test = data.join("pooled-test.jsonl");
    let mut test_examples = Vec::new();
    let mut pooled = String::new();
    for site in SITES {
        let path = data.join(site).join("test.jsonl");
        pooled.push_str(&fs::read_to_string(&path)?);
        test_examples.extend(read_jsonl(&path, &labels)?);
    }
    fs::write(&pooled_test, pooled)?;
    let handwritten = out.join("handwritten.jsonl");
    fs::write(&handwritten, HANDWRITTEN_JSONL)?;
    let handwritten_examples = read_jsonl(&handwritten, &labels)?;
    let train_sizes: Vec<usize> =
        SITES.iter().map(|site| read_jsonl(&data.join(site).join("train.jsonl"), &labels).map(|v| v.len())).collect::<Result<_, _>>()?;

    let scorer = Scorer::new(&base, &labels, test_examples, handwritten_examples, args)?;
    let mut scorer = scorer;
    let mut runs = Vec::new();
    let plain = federate(args, &tools, &out, &base, &data, &mut scorer, None)?;
    runs.push(plain);
    if args.dp {
        let min_train = *train_sizes.iter().min().unwrap_or(&1);
        let dp = DpSettings::for_budget(args, min_train)?;
        runs.push(federate(args, &tools, &out, &base, &data, &mut scorer, Some(dp))?);
    }

    step("final model: export to a transformers directory and check it with `fedward-agent eval`");
    let model_dir = out.join("model");
    let plain = &runs[0];
    tools.run(
        &tools.agent,
        &["export", "--checkpoint", s(&plain.final_checkpoint), "--base", s(&base), "--out", s(&model_dir)],
        "export",
    )?;
    let eval: Value = serde_json::from_str(&tools.run(
        &tools.agent,
        &["eval", "--model", s(&model_dir), "--data", s(&pooled_test), "--json", "--max-seq-len", &args.max_seq_len.to_string()],
        "eval-model",
    )?)?;
    let exported_accuracy = eval["accuracy"].as_f64().unwrap_or(f64::NAN);
    println!("  {}: accuracy {exported_accuracy:.4} on the pooled test split", model_dir.display());
    let exported_handwritten = eval_handwritten(args, &tools, &model_dir, &handwritten, "eval-model-handwritten")?;
    println!(
        "  {}: accuracy {:.4} on the hand-written set ({} notes)",
        model_dir.display(),
        exported_handwritten["accuracy"].as_f64().unwrap_or(f64::NAN),
        exported_handwritten["support"]
    );
    if let Some(dp) = runs.get(1) {
        tools.run(
            &tools.agent,
            &["export", "--checkpoint", s(&dp.final_checkpoint), "--base", s(&base), "--out", s(&out.join("model-dp"))],
            "export-dp",
        )?;
    }

    let baselines = if args.skip_baselines { None } else { Some(run_baselines(args, &tools, &out, &base, &data, &handwritten)?) };
    let allocation = match &baselines {
        Some(_) => Some(simulate_allocation(args, &tools, &out, &data, &labels)?),
        None => None,
    };

    let exported = Exported { accuracy: exported_accuracy, handwritten: exported_handwritten };
    let report = Report::new(args, &runs, baselines.as_ref(), allocation.as_ref(), &exported, started.elapsed().as_secs_f64());
    fs::write(out.join("report.json"), serde_json::to_string_pretty(&report.json)? + "\n")?;
    fs::write(out.join("report.html"), report.html())?;
    println!("{}", report.summary);
    println!("report: {} and {}", out.join("report.json").display(), out.join("report.html").display());
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `fedward-agent eval` of an exported model directory on the hand-written set: its JSON
/// report (accuracy, macro-F1, per class, confusion matrix).
fn eval_handwritten(args: &Args, tools: &Tools, model_dir: &Path, handwritten: &Path, log: &str) -> Result<Value> {
    let max_seq_len = args.max_seq_len.to_string();
    let job = ["eval", "--model", s(model_dir), "--data", s(handwritten), "--json", "--max-seq-len", &max_seq_len, "--device", "cpu"];
    Ok(serde_json::from_str(&tools.run(&tools.agent, &job, log)?)?)
}

/// The exported final model's figures, from `eval`.
struct Exported {
    /// On the pooled test split.
    accuracy: f64,
    /// `eval`'s JSON report on the hand-written set.
    handwritten: Value,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| unreachable!("demo paths are UTF-8"))
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Creates the output directory, replacing an earlier demo's but never anything else.
fn prepare_out_dir(out: &Path) -> Result<PathBuf> {
    if out.exists() {
        let ours = out.join(MARKER).exists();
        let empty = fs::read_dir(out)?.next().is_none();
        ensure!(ours || empty, "{} exists and is not an earlier demo's output: choose another --out", out.display());
        if ours {
            fs::remove_dir_all(out).with_context(|| format!("removing the earlier demo in {}", out.display()))?;
        }
    }
    fs::create_dir_all(out)?;
    fs::write(out.join(MARKER), "written by fedward-demo; the whole directory is replaced on the next run\n")?;
    fs::canonicalize(out).map_err(Into::into)
}

/// Parameters of the record-level DP run.
#[derive(Clone, Copy, Debug, Serialize)]
struct DpSettings {
    #[serde(serialize_with = "as_string")]
    mode: PrivacyMode,
    noise_multiplier: f64,
    clip_norm: f64,
    sampling_rate: f64,
    update_clip_norm: f64,
    steps_per_round: u64,
    rounds: u32,
    planned_epsilon: f64,
    #[serde(serialize_with = "as_string")]
    trainable: Trainable,
    #[serde(serialize_with = "as_string")]
    optimizer: Optimizer,
    learning_rate: f64,
    local_epochs: u32,
}

fn as_string<S: serde::Serializer, T: std::fmt::Display>(value: &T, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

impl DpSettings {
    /// The smallest noise that keeps the smallest site within `--epsilon` over all rounds
    /// (a bigger site samples at the same rate, so it spends the same).
    fn for_budget(args: &Args, min_train: usize) -> Result<Self> {
        match args.dp_mode {
            PrivacyMode::RecordLevel => Self::record_level(args, min_train),
            PrivacyMode::SiteLevel | PrivacyMode::Distributed => Self::site_level(args),
            PrivacyMode::Off => bail!("--dp-mode off: leave out --dp for a run without DP"),
        }
    }

    /// Site-level adjacency, one Gaussian release per round. The distributed share's
    /// epsilon is the distributed accountant's, within 0.1% of this one at the demo's
    /// settings (its integer rounding): the central multiplier is raised 1% to cover it,
    /// and each agent's ledger records the exact figure.
    fn site_level(args: &Args) -> Result<Self> {
        let rounds = args.dp_rounds.unwrap_or(args.rounds);
        let mut plan = Plan {
            mode: PrivacyMode::SiteLevel,
            noise_multiplier: 1.0,
            clip_norm: args.dp_update_clip_norm,
            sampling_rate: 0.0,
            steps_per_round: 1,
            rounds: u64::from(rounds),
            delta: DELTA,
        };
        plan.noise_multiplier = plan_min_sigma(&plan, args.epsilon * 0.98)?.noise_multiplier;
        let planned_epsilon = plan_epsilon(&plan)?;
        if args.dp_mode == PrivacyMode::Distributed {
            plan.noise_multiplier *= 1.01;
        }
        Ok(Self {
            mode: args.dp_mode,
            noise_multiplier: plan.noise_multiplier,
            clip_norm: plan.clip_norm,
            sampling_rate: 0.0,
            update_clip_norm: plan.clip_norm,
            steps_per_round: 0,
            rounds,
            planned_epsilon,
            trainable: args.dp_trainable,
            optimizer: Optimizer::AdamW,
            learning_rate: args.learning_rate,
            local_epochs: args.local_epochs,
        })
    }

    fn record_level(args: &Args, min_train: usize) -> Result<Self> {
        let sampling_rate = (f64::from(args.dp_batch_size) / min_train as f64).min(1.0);
        // What each agent's DP-SGD will take: local epochs / q steps a round.
        let steps_per_round = dp_sgd_steps(args.dp_local_epochs, sampling_rate)?;
        let rounds = args.dp_rounds.unwrap_or(args.rounds);
        let mut plan = Plan {
            mode: PrivacyMode::RecordLevel,
            noise_multiplier: 1.0,
            clip_norm: args.dp_clip_norm,
            sampling_rate,
            steps_per_round,
            rounds: u64::from(rounds),
            delta: DELTA,
        };
        // Aim a little under the budget so the agents' own check never trips on rounding.
        plan.noise_multiplier = plan_min_sigma(&plan, args.epsilon * 0.98)?.noise_multiplier;
        let planned_epsilon = plan_epsilon(&plan)?;
        Ok(Self {
            mode: PrivacyMode::RecordLevel,
            noise_multiplier: plan.noise_multiplier,
            clip_norm: plan.clip_norm,
            sampling_rate,
            update_clip_norm: args.dp_update_clip_norm,
            steps_per_round,
            rounds,
            planned_epsilon,
            trainable: args.dp_trainable,
            optimizer: args.dp_optimizer,
            learning_rate: args.dp_learning_rate,
            local_epochs: args.dp_local_epochs,
        })
    }
}

/// Scores global models on the pooled test split and the hand-written set, caching the
/// frozen prefix of both across rounds.
struct Scorer {
    model: fedward_models::bert::BertClassifier,
    encoder: fedward_models::text::TextEncoder,
    test: EvalSet,
    handwritten: EvalSet,
    trainable: Vec<String>,
    max_len: usize,
}

/// A model's figures on the two evaluation sets.
#[derive(Clone, Copy, Debug, Serialize)]
struct Scores {
    /// On the pooled test split.
    accuracy: f64,
    macro_f1: f64,
    /// On the hand-written set.
    handwritten_accuracy: f64,
    handwritten_macro_f1: f64,
}

impl Scores {
    const NAN: Scores = Scores { accuracy: f64::NAN, macro_f1: f64::NAN, handwritten_accuracy: f64::NAN, handwritten_macro_f1: f64::NAN };
}

impl Scorer {
    fn new(
        base: &Path,
        labels: &[String],
        test: Vec<fedward_models::text::Example>,
        handwritten: Vec<fedward_models::text::Example>,
        args: &Args,
    ) -> Result<Self> {
        let (model, encoder) = load_dir(base, Some(labels), 0, &candle_core::Device::Cpu)?;
        let trainable = args.trainable.select(model.tensor_set()?.names());
        Ok(Self {
            model,
            encoder,
            test: EvalSet::new(test),
            handwritten: EvalSet::new(handwritten),
            trainable,
            max_len: args.max_seq_len as usize,
        })
    }

    fn score(&mut self, checkpoint: &Path) -> Result<Scores> {
        let set = TensorSet::from_safetensors(&fs::read(checkpoint)?, false)?;
        self.model.load(&set)?;
        let (_, test) = self.test.evaluate(&self.model, &self.encoder, &self.trainable, self.max_len)?;
        let (_, hw) = self.handwritten.evaluate(&self.model, &self.encoder, &self.trainable, self.max_len)?;
        Ok(Scores {
            accuracy: test.accuracy,
            macro_f1: test.macro_f1,
            handwritten_accuracy: hw.accuracy,
            handwritten_macro_f1: hw.macro_f1,
        })
    }
}

/// One round as the table shows it.
#[derive(Clone, Debug, Serialize)]
struct RoundRow {
    round: u64,
    sites: usize,
    mean_local_loss: Option<f64>,
    #[serde(flatten)]
    scores: Scores,
    /// The largest epsilon any site reports having spent after this round.
    epsilon: Option<f64>,
    seconds: f64,
}

struct RunResult {
    name: &'static str,
    dp: Option<DpSettings>,
    initial: Scores,
    rounds: Vec<RoundRow>,
    final_checkpoint: PathBuf,
    seconds: f64,
    /// Model selection: the round whose model the run ended with.
    selected: Option<u64>,
}

/// The rounds of a federation: the DP run may have its own (`--dp-rounds`).
fn rounds_of(args: &Args, dp: Option<&DpSettings>) -> u32 {
    dp.map_or(args.rounds, |d| d.rounds)
}

/// Whether the run selects its model by the sites' validation scores (`--select best`).
fn selects(args: &Args, dp: Option<&DpSettings>) -> bool {
    args.select == "best" && dp.is_none() && !args.secure
}

/// Runs one federation: coordinator and agents as processes, watched until they finish.
fn federate(
    args: &Args,
    tools: &Tools,
    out: &Path,
    base: &Path,
    data: &Path,
    scorer: &mut Scorer,
    dp: Option<DpSettings>,
) -> Result<RunResult> {
    let name = if dp.is_some() { "dp" } else { "plain" };
    // Model selection adds a last round in which the sites only score the last model.
    let planned_rounds = rounds_of(args, dp.as_ref()) + u32::from(selects(args, dp.as_ref()));
    let dir = out.join("runs").join(name);
    fs::create_dir_all(&dir)?;
    let secure = if args.secure { " under secure aggregation (the coordinator sees only the sum)" } else { "" };
    match &dp {
        None => step(&format!(
            "federation without DP{secure}: a coordinator and {} agents, {} rounds, training {}",
            SITES.len(),
            args.rounds,
            args.trainable
        )),
        Some(d) if d.mode != PrivacyMode::RecordLevel => step(&format!(
            "federation with {} DP{}, training {} with {}: clip {} on each site's update, central noise multiplier {:.3}{}, {} rounds; planned epsilon {:.2} at delta {DELTA} per site",
            d.mode,
            if d.mode == PrivacyMode::Distributed { " under secure aggregation" } else { secure },
            d.trainable,
            d.optimizer,
            d.clip_norm,
            d.noise_multiplier,
            if d.mode == PrivacyMode::Distributed { " (a share at each site; any 2 honest sites carry it)" } else { " (added in full by every site)" },
            d.rounds,
            d.planned_epsilon
        )),
        Some(d) => step(&format!(
            "federation with record-level DP{secure}, training {} with {}: sigma {:.3}, clip {}, sampling rate {:.4}, {} steps a round, {} rounds, learning rate {}; planned epsilon {:.2} at delta {DELTA} per site",
            d.trainable, d.optimizer, d.noise_multiplier, d.clip_norm, d.sampling_rate, d.steps_per_round, d.rounds, d.learning_rate, d.planned_epsilon
        )),
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let threads_per_agent = cores.div_ceil(SITES.len()).max(1);
    let quic_port = free_udp_port()?;
    let admin_port = free_tcp_port()?;
    let state_dir = dir.join("coordinator");
    let coordinator_toml = dir.join("coordinator.toml");
    fs::write(&coordinator_toml, coordinator_config(args, out, base, &state_dir, quic_port, admin_port, dp.as_ref()))?;
    let admin_token = write_admin_token(&dir)?;
    let mut children: Vec<(String, Child)> = Vec::new();
    let result = (|| {
        let log = format!("{name}-coordinator");
        children.push(("coordinator".into(), tools.spawn(&tools.coordinator, &["serve", "--config", s(&coordinator_toml)], &log, None)?));
        for site in SITES {
            let toml = dir.join(format!("{site}.toml"));
            fs::write(&toml, agent_config(out, base, data, &dir, site, quic_port, dp.is_some(), args.epsilon))?;
            children.push((
                site.to_owned(),
                tools.spawn(&tools.agent, &["run", "--config", s(&toml)], &format!("{name}-{site}"), Some(threads_per_agent))?,
            ));
        }
        println!(
            "  coordinator on 127.0.0.1:{quic_port} (QUIC), dashboard http://127.0.0.1:{admin_port}/ (any user name, the token in {} as the password); logs in {}",
            admin_token.display(),
            tools.logs.display()
        );
        watch(&state_dir, scorer, &mut children, planned_rounds)
    })();
    // Whatever happened, no process outlives the demo.
    for (_, child) in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (initial, rounds, seconds) = result?;
    let final_checkpoint = state_dir.join(checkpoint_name(u64::from(planned_rounds)));
    let selected = saved_state(&state_dir)?.and_then(|st| {
        let scored: Vec<String> = st
            .history
            .iter()
            .filter_map(|r| r.scored)
            .filter_map(|t| Some(format!("{} {:.4}", t.model_round, t.accuracy()?)))
            .collect();
        let selected = st.selected()?;
        println!(
            "  model selection: the hospitals' validation accuracy by round (example-weighted) {}; the federation's model is round {selected}'s",
            scored.join(", ")
        );
        Some(selected)
    });
    Ok(RunResult { name, dp, initial, rounds, final_checkpoint, seconds, selected })
}

/// Prints a row per completed round until the coordinator finishes, then waits for the agents.
fn watch(state_dir: &Path, scorer: &mut Scorer, children: &mut [(String, Child)], rounds: u32) -> Result<(Scores, Vec<RoundRow>, f64)> {
    let started = Instant::now();
    let total = u64::from(rounds);
    let mut rows: Vec<RoundRow> = Vec::new();
    let mut initial = None;
    let mut last_note = Instant::now();
    println!(
        "  {:>5} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "round", "sites", "local loss", "accuracy", "macro-F1", "hw acc", "hw F1", "epsilon", "seconds"
    );
    loop {
        // Exits are seen before the state is read: a coordinator writes its last state
        // before it exits, so the rounds scored below are all it completed, even when its
        // last rounds took less time than scoring one (short runs did, and were reported
        // as an early exit).
        let mut exited = Vec::new();
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                exited.push((name.clone(), status));
            }
        }
        // The coordinator writes the checkpoint, then state.json, each atomically: a round
        // listed in state.json has its checkpoint on disk.
        if let Some(state) = saved_state(state_dir)? {
            if initial.is_none() {
                let sc = scorer.score(&state_dir.join(checkpoint_name(0)))?;
                println!(
                    "  {:>5} {:>5} {:>10} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>8} {:>8}",
                    0, "-", "-", sc.accuracy, sc.macro_f1, sc.handwritten_accuracy, sc.handwritten_macro_f1, "-", "-"
                );
                initial = Some(sc);
            }
            let scored = rows.last().map_or(0, |r| r.round);
            for record in state.history.iter().filter(|r| r.model_digest.is_some() && r.round > scored) {
                let scores = scorer.score(&state_dir.join(checkpoint_name(record.round)))?;
                let epsilon = record.sites.iter().filter_map(|s| s.epsilon_after).reduce(f64::max);
                let row = RoundRow {
                    round: record.round,
                    sites: record.sites.len(),
                    mean_local_loss: record.mean_train_loss,
                    scores,
                    epsilon,
                    seconds: record.duration_secs,
                };
                println!(
                    "  {:>5} {:>5} {:>10} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>8} {:>8.1}",
                    row.round,
                    row.sites,
                    row.mean_local_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    row.scores.accuracy,
                    row.scores.macro_f1,
                    row.scores.handwritten_accuracy,
                    row.scores.handwritten_macro_f1,
                    row.epsilon.map_or("-".into(), |e| format!("{e:.3}")),
                    row.seconds
                );
                if let Some(selected) = record.selected {
                    println!("        (round {} trained nothing: the sites scored round {}'s model; this is round {selected}'s, the best they scored)", record.round, record.round - 1);
                }
                rows.push(row);
                last_note = Instant::now();
            }
        }
        for (name, status) in exited {
            check_exit(&name, status, rows.len() as u64 == total)?;
        }
        if rows.len() as u64 >= total {
            break;
        }
        if last_note.elapsed() > Duration::from_secs(30) {
            println!("  ... round {} in progress ({:.0} s so far)", rows.len() + 1, started.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
        ensure!(started.elapsed() < Duration::from_secs(3600), "the federation did not finish within an hour");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Agents exit once the coordinator says the federation is finished.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (name, child) in children.iter_mut() {
        loop {
            if let Some(status) = child.try_wait()? {
                check_exit(name, status, true)?;
                break;
            }
            ensure!(Instant::now() < deadline, "{name} did not exit after the federation finished");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok((initial.unwrap_or(Scores::NAN), rows, started.elapsed().as_secs_f64()))
}

/// The coordinator's `state.json`, once it has written one (it writes it atomically).
fn saved_state(state_dir: &Path) -> Result<Option<SavedState>> {
    let path = state_dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn check_exit(name: &str, status: ExitStatus, finished: bool) -> Result<()> {
    ensure!(status.success() && finished, "{name} exited early ({status}); see its log");
    Ok(())
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An admin token for the run's dashboard and control API: the coordinator's tokens file
/// (`admin-tokens`, its hash) and the token itself (`admin.token`), both 0600.
fn write_admin_token(run_dir: &Path) -> Result<PathBuf> {
    use std::io::Read as _;
    let mut secret = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
    let token = format!("{}{}", fedward_shared::access::TOKEN_PREFIX, secret.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut tokens = fedward_shared::access::Tokens::default();
    tokens.add("demo-admin", fedward_shared::access::Role::Admin, &token)?;
    fedward_shared::fsutil::atomic_write(&run_dir.join("admin-tokens"), tokens.render().as_bytes(), true)?;
    let token_file = run_dir.join("admin.token");
    fedward_shared::fsutil::atomic_write(&token_file, token.as_bytes(), true)?;
    Ok(token_file)
}

fn coordinator_config(
    args: &Args,
    out: &Path,
    base: &Path,
    state_dir: &Path,
    port: u16,
    admin_port: u16,
    dp: Option<&DpSettings>,
) -> String {
    let ca = out.join("pki/consortium");
    // Masked sums are of fixed-point f32 values: secure aggregation takes no other encoding.
    let distributed = dp.is_some_and(|d| d.mode == PrivacyMode::Distributed);
    let (method, encoding, secure) = if distributed {
        // Every site weighs 1: a share scaled by its example count has that much more
        // sensitivity (docs/PRIVACY.md).
        ("method = \"secure\"\nweighting = \"equal\"\n", UpdateEncoding::F32, "[secure_aggregation]\nthreshold = 2\nmin_sites = 2\n\n")
    } else if args.secure {
        ("method = \"secure\"\n", UpdateEncoding::F32, "[secure_aggregation]\nthreshold = 2\nmin_sites = 2\n\n")
    } else {
        ("", args.update_encoding, "")
    };
    let privacy = match dp {
        // Without DP the coordinator needs its own bound on an update's norm: the demo's
        // honest `body:1` updates measured 7.8 to 10.7, so 50 never touches them and still
        // caps what one site could do.
        None => format!("mode = \"off\"\n\n[aggregation]\n{method}max_update_norm = 50.0\nupdate_encoding = \"{encoding}\"\n"),
        Some(d) if d.mode != PrivacyMode::RecordLevel => format!(
            "mode = \"{}\"\nnoise_multiplier = {}\nclip_norm = {}\nmin_noise_multiplier = {}\nmax_clip_norm = {}\n{}\n[aggregation]\n{method}update_encoding = \"{encoding}\"\n",
            d.mode,
            d.noise_multiplier,
            d.clip_norm,
            d.noise_multiplier,
            d.clip_norm,
            if distributed { "min_honest = 2\n" } else { "" }
        ),
        Some(d) => format!(
            "mode = \"record-level\"\nnoise_multiplier = {}\nclip_norm = {}\nsampling_rate = {}\nupdate_clip_norm = {}\nmin_noise_multiplier = {}\nmax_clip_norm = {}\n\n[aggregation]\n{method}update_encoding = \"{encoding}\"\n",
            d.noise_multiplier, d.clip_norm, d.sampling_rate, d.update_clip_norm, d.noise_multiplier, d.clip_norm
        ),
    };
    let mut server_optimizer = format!("server_optimizer = \"{}\"\n", args.server_optimizer);
    if let Some(lr) = args.server_learning_rate {
        let _ = writeln!(server_optimizer, "server_learning_rate = {lr:?}");
    }
    let mut sites = String::new();
    if selects(args, dp) {
        sites.push_str("[selection]\nmodel = \"best\"\n\n");
    }
    for site in SITES {
        let _ = writeln!(sites, "[[sites]]\nid = \"{site}\"\n");
    }
    format!(
        r#"# written by fedward-demo
[server]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
admin_listen = "127.0.0.1:{admin_port}"

[admin]
tokens = "{tokens}"

[tls]
ca_cert = "{ca}/ca.crt"
cert = "{ca}/coordinator.crt"
key = "{ca}/coordinator.key"

[federation]
rounds = {rounds}
min_sites = {n_sites}
round_deadline = "30m"

[model]
init = "{base}"
labels = ["doctor", "bed", "device", "other"]
init_seed = {seed}

[training]
local_epochs = {local_epochs}
batch_size = {batch_size}
optimizer = "{optimizer}"
learning_rate = {lr}
warmup_ratio = 0.1
weight_decay = 0.01
max_grad_norm = 1.0
max_seq_len = {max_seq_len}
trainable = "{trainable}"
seed = {seed}
prox_mu = {prox_mu:?}

[privacy]
{privacy}{server_optimizer}
{secure}{sites}"#,
        state = state_dir.display(),
        tokens = state_dir.with_file_name("admin-tokens").display(),
        ca = ca.display(),
        rounds = rounds_of(args, dp),
        n_sites = SITES.len(),
        base = base.display(),
        lr = dp.map_or(args.learning_rate, |d| d.learning_rate),
        optimizer = dp.map_or(Optimizer::AdamW, |d| d.optimizer),
        local_epochs = dp.map_or(args.local_epochs, |d| d.local_epochs),
        batch_size = args.batch_size,
        max_seq_len = args.max_seq_len,
        trainable = dp.map_or(args.trainable, |d| d.trainable),
        seed = args.seed,
        prox_mu = args.prox_mu,
    )
}

/// Each agent's own budget is `--epsilon`, the one the DP run's noise is planned for (a
/// little under it): a site never spends more than it allows, whatever the plan says.
#[allow(clippy::too_many_arguments)]
fn agent_config(out: &Path, base: &Path, data: &Path, run_dir: &Path, site: &str, port: u16, dp: bool, max_epsilon: f64) -> String {
    let pki = out.join("pki").join(site);
    let site_data = data.join(site);
    format!(
        r#"# written by fedward-demo
[coordinator]
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
max_epsilon = {max_epsilon:?}
delta = 1e-5
require_dp = {dp}

[agent]
state_dir = "{state}"
device = "cpu"
max_backoff = "2s"
max_connect_attempts = 30
exit_when_finished = true
# several agents on one machine: `fedward-agent status` reads the files instead
status_listen = "off"
"#,
        pki = pki.display(),
        d = site_data.display(),
        base = base.display(),
        state = run_dir.join("agents").join(site).display(),
    )
}

/// The baselines' scores: on the pooled test split (`test`), from `baseline all`, and on the
/// hand-written set (`handwritten`), from `eval` of each saved model.
struct Baselines {
    centralized: Value,
    local_only: Vec<Value>,
}

fn run_baselines(args: &Args, tools: &Tools, out: &Path, base: &Path, data: &Path, handwritten: &Path) -> Result<Baselines> {
    step("baselines: centralized (all sites' data pooled) and local-only (each site alone), same recipe and epochs");
    let epochs = (args.rounds * args.local_epochs).to_string();
    let lr = args.learning_rate.to_string();
    let batch_size = args.batch_size.to_string();
    let trainable = args.trainable.to_string();
    let max_seq_len = args.max_seq_len.to_string();
    let seed = args.seed.to_string();
    let save = out.join("baseline-models");
    // One process for both: `baseline all` computes the frozen layers' output over the
    // pooled data once, on every core (its default `--threads`), then trains the
    // centralized model and the local-only ones side by side from it.
    let job = [
        "baseline",
        "all",
        "--data",
        s(data),
        "--base",
        s(base),
        "--trainable",
        &trainable,
        "--epochs",
        &epochs,
        "--batch-size",
        &batch_size,
        "--learning-rate",
        &lr,
        "--max-seq-len",
        &max_seq_len,
        "--seed",
        &seed,
        "--device",
        "cpu",
        "--json",
        "--save-models",
        s(&save),
    ];
    let output = tools.run_long(&tools.agent, &job, "baselines")?;
    let mut results: Vec<Value> = serde_json::from_str(&output)?;
    ensure!(results.len() == SITES.len() + 1, "expected the centralized and {} local-only results, got {}", SITES.len(), results.len());
    // Each saved model is scored on the hand-written set after it trained: the set plays
    // no part in training or in choosing anything.
    for r in &mut results {
        let name = r["name"].as_str().unwrap_or("?").to_owned();
        r["handwritten"] = eval_handwritten(args, tools, &save.join(&name), handwritten, &format!("eval-{name}-handwritten"))?;
    }
    let local_only = results.split_off(1);
    let centralized = results.remove(0);
    let score = |r: &Value, set: &str, key: &str| r[set][key].as_f64().unwrap_or(f64::NAN);
    let line = |r: &Value| {
        format!(
            "accuracy {:.4}, macro-F1 {:.4}; hand-written: accuracy {:.4}, macro-F1 {:.4}",
            score(r, "test", "accuracy"),
            score(r, "test", "macro_f1"),
            score(r, "handwritten", "accuracy"),
            score(r, "handwritten", "macro_f1")
        )
    };
    println!("  centralized: {}", line(&centralized));
    for r in &local_only {
        println!("  local-only {}: {}", r["name"].as_str().unwrap_or("?"), line(r));
    }
    Ok(Baselines { centralized, local_only })
}

/// Mean arrivals per hour of the simulated day (about 190 patients in 24 hours).
const DEMO_ARRIVALS_PER_HOUR: f64 = 8.0;
/// The share of each kind's units the hospital's expected demand keeps busy: the
/// simulated hospital is sized for its own case mix, tight but not overwhelmed (at the
/// day's peak, 1.5 times the mean rate, demand exceeds it).
const DEMO_LOAD: f64 = 0.9;

/// A pool's kind, group, features and share of its kind's units.
type Share = (&'static str, &'static str, &'static [&'static str], f64);

/// The capacity the demo's hospital runs the simulator against, sized for the hospital's
/// case mix (the label shares of its test notes) so that the mean demand keeps
/// [`DEMO_LOAD`] of each kind's units busy: units = arrivals per hour x share x mean
/// service hours / load, the means those of `fedward_agent::simulate::ServiceTimes`'s
/// defaults (log-normal: consultation median 20 min, sigma 0.5; bed stay median 3 days,
/// sigma 0.7; device use median 6 h, sigma 0.8). Each kind splits into fixed pools, and 10%
/// of each pool is free at the start.
fn demo_capacity(shares: [f64; 3]) -> Value {
    let mean_hours = |median_hours: f64, sigma: f64| median_hours * (sigma * sigma / 2.0f64).exp();
    let means = [mean_hours(20.0 / 60.0, 0.5), mean_hours(72.0, 0.7), mean_hours(6.0, 0.8)];
    let pools: [&[Share]; 3] = [
        &[("doctor", "emergency", &[], 0.5), ("doctor", "internal-medicine", &[], 0.3), ("doctor", "surgery", &[], 0.2)],
        &[("bed", "medical", &[], 0.8), ("bed", "medical", &["isolation"], 0.08), ("bed", "icu", &["monitored"], 0.12)],
        &[("device", "infusion-pump", &[], 0.5), ("device", "monitor", &[], 0.3), ("device", "ventilator", &[], 0.2)],
    ];
    let mut resources = Vec::new();
    for k in 0..3 {
        let units = (DEMO_ARRIVALS_PER_HOUR * shares[k] * means[k] / DEMO_LOAD).ceil().max(3.0);
        for (kind, group, features, part) in pools[k] {
            let total = (units * part).round().max(1.0) as u32;
            let free = (f64::from(total) * 0.1).round().max(1.0) as u32;
            resources.push(json!({"kind": kind, "group": group, "features": features, "total": total, "free": free}));
        }
    }
    json!({ "resources": resources })
}

/// The simulator's day at one hospital, with the federated model and with its local-only one.
struct Allocation {
    site: String,
    /// (model, the simulator's JSON summary): the federated model, then the local-only one.
    runs: Vec<(String, Value)>,
}

/// Runs `allocate simulate` for the hospital whose test notes most often need a unit (where
/// allocation matters most), with the exported federated model and with that hospital's
/// local-only baseline, on the same arrivals (same seed).
fn simulate_allocation(args: &Args, tools: &Tools, out: &Path, data: &Path, labels: &[String]) -> Result<Allocation> {
    let other = labels.iter().position(|l| l == "other");
    let mut best = (SITES[0], 0usize, Vec::new());
    for site in SITES {
        let notes = read_jsonl(&data.join(site).join("test.jsonl"), labels)?;
        let needing = notes.iter().filter(|e| Some(e.label) != other).count();
        if needing > best.1 || best.2.is_empty() {
            best = (site, needing, notes);
        }
    }
    let (site, _, notes) = best;
    let share = |label: &str| {
        let id = labels.iter().position(|l| l == label);
        notes.iter().filter(|e| Some(e.label) == id).count() as f64 / notes.len().max(1) as f64
    };
    step(&format!(
        "allocation: a simulated day at {site} (its test notes, {DEMO_ARRIVALS_PER_HOUR} arrivals an hour, FCFS, greedy and optimal), with the federated and the local-only model"
    ));
    let dir = out.join("allocation");
    fs::create_dir_all(&dir)?;
    let capacity = dir.join("capacity.json");
    fs::write(&capacity, serde_json::to_string_pretty(&demo_capacity([share("doctor"), share("bed"), share("device")]))? + "\n")?;
    let notes = data.join(site).join("test.jsonl");
    let (seed, max_seq_len, rate) = (args.seed.to_string(), args.max_seq_len.to_string(), DEMO_ARRIVALS_PER_HOUR.to_string());
    let mut runs = Vec::new();
    for (name, model) in [("federated", out.join("model")), ("local-only", out.join("baseline-models").join(site))] {
        let job_out = dir.join(name);
        let job = [
            "allocate",
            "simulate",
            "--model",
            s(&model),
            "--notes",
            s(&notes),
            "--capacity",
            s(&capacity),
            "--hours",
            "24",
            "--arrivals-per-hour",
            &rate,
            "--seed",
            &seed,
            "--max-seq-len",
            &max_seq_len,
            "--device",
            "cpu",
            "--json",
            "--out",
            s(&job_out),
        ];
        let summary: Value = serde_json::from_str(&tools.run(&tools.agent, &job, &format!("allocate-{name}"))?)?;
        runs.push((name.to_owned(), summary));
    }
    let a = Allocation { site: site.to_owned(), runs };
    print!("{}", a.table());
    Ok(a)
}

impl Allocation {
    /// (model, method, outcome) for every run and method.
    fn outcomes(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.runs.iter().flat_map(|(model, v)| {
            v["comparison"]["outcomes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |o| (model.as_str(), o["method"].as_str().unwrap_or("?"), o))
        })
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let first = self.runs.first().map(|r| &r.1["comparison"]);
        let _ = writeln!(
            t,
            "  {} arrivals in 24 h at {}; urgent = urgency 1-2, served within {} min",
            first.map_or(Value::Null, |c| c["arrivals"].clone()),
            self.site,
            first.map_or(Value::Null, |c| c["target_mins"].clone())
        );
        let _ = writeln!(
            t,
            "  {:<11} {:>9} {:<8} {:>9} {:>10} {:>14} {:>15} {:>8}",
            "model", "accuracy", "method", "urgent", "in target", "urgent wait", "misallocations", "reviews"
        );
        for (model, method, o) in self.outcomes() {
            let accuracy = self.runs.iter().find(|r| r.0 == model).and_then(|r| r.1["accuracy_on_notes"].as_f64()).unwrap_or(f64::NAN);
            let _ = writeln!(
                t,
                "  {:<11} {:>9.4} {:<8} {:>9} {:>9.1}% {:>10.1} min {:>15} {:>8}",
                model,
                accuracy,
                method,
                format!("{}/{}", o["urgent_within_target"], o["urgent"]),
                100.0 * o["urgent_within_target_share"].as_f64().unwrap_or(f64::NAN),
                o["urgent_mean_wait_mins"].as_f64().unwrap_or(f64::NAN),
                o["misallocations"].as_u64().unwrap_or(0),
                o["reviews"].as_u64().unwrap_or(0)
            );
        }
        t
    }

    fn summary(&self) -> String {
        format!("\n== allocation: what the federation buys in waiting times (one simulated day)\n{}", self.table())
    }

    fn json(&self) -> Value {
        let mut by_model = serde_json::Map::new();
        for (model, v) in &self.runs {
            let methods: serde_json::Map<String, Value> = v["comparison"]["outcomes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    let method = o["method"].as_str().unwrap_or("?").to_owned();
                    (
                        method,
                        json!({
                            "urgent": o["urgent"], "urgent_within_target": o["urgent_within_target"],
                            "urgent_within_target_share": o["urgent_within_target_share"], "urgent_mean_wait_mins": o["urgent_mean_wait_mins"],
                            "misallocations": o["misallocations"], "reviews": o["reviews"], "unserved": o["unserved"],
                        }),
                    )
                })
                .collect();
            by_model.insert(
                model.clone(),
                json!({"accuracy_on_notes": v["accuracy_on_notes"], "methods": methods, "report": format!("allocation/{model}/simulation.json")}),
            );
        }
        let first = self.runs.first().map(|r| r.1.clone()).unwrap_or(Value::Null);
        json!({
            "site": self.site,
            "hours": 24,
            "arrivals": first["comparison"]["arrivals"],
            "target_mins": first["comparison"]["target_mins"],
            "arrivals_per_hour": first["workload"]["arrivals_per_hour"],
            "seed": first["comparison"]["seed"],
            "capacity": "allocation/capacity.json",
            "models": by_model,
        })
    }

    /// The report's section: urgent requests within target by method for each model, and
    /// the table.
    fn html(&self) -> String {
        let methods: Vec<String> = self
            .runs
            .first()
            .and_then(|r| r.1["comparison"]["outcomes"].as_array())
            .map(|os| os.iter().map(|o| o["method"].as_str().unwrap_or("?").to_owned()).collect())
            .unwrap_or_default();
        let series: Vec<(String, Vec<f64>)> = self
            .runs
            .iter()
            .map(|(model, v)| {
                let shares = v["comparison"]["outcomes"].as_array().into_iter().flatten();
                (model.clone(), shares.map(|o| 100.0 * o["urgent_within_target_share"].as_f64().unwrap_or(f64::NAN)).collect())
            })
            .collect();
        let links: Vec<String> = self.runs.iter().map(|(m, _)| format!(r#"<a href="allocation/{m}/simulation.html">{m}</a>"#)).collect();
        format!(
            "<h2>Allocation: what the federation buys in waiting times</h2>\n<p>One simulated day at {} (its test notes; `fedward-agent allocate simulate`), the same arrivals with each model: the share of urgent requests (urgency 1-2) served within the target, by allocation method. Full reports: {}.</p>\n{}\n<pre>{}</pre>\n",
            html_escape(&self.site),
            links.join(", "),
            svg_bars(&methods, &series),
            html_escape(&self.table())
        )
    }
}

/// Grouped bars of percentages: one group per category, one bar per model.
fn svg_bars(categories: &[String], series: &[(String, Vec<f64>)]) -> String {
    fedward_shared::html::Bars { categories, series, axis: "", max: Some(100.0), percent: true, legend_suffix: " model" }.svg()
}

/// The report: JSON, the printed summary, and the HTML page.
struct Report {
    json: Value,
    summary: String,
    /// (run name, accuracy per round from 0).
    series: Vec<(String, Vec<f64>)>,
    references: Vec<(String, f64)>,
    /// The allocation simulator's section, when it ran.
    allocation_html: String,
}

impl Report {
    fn new(
        args: &Args,
        runs: &[RunResult],
        baselines: Option<&Baselines>,
        allocation: Option<&Allocation>,
        exported: &Exported,
        total_seconds: f64,
    ) -> Self {
        let run_json = |r: &RunResult| {
            let last = r.rounds.last().map_or(Scores::NAN, |l| l.scores);
            json!({
                "name": r.name,
                "dp": r.dp,
                "initial": r.initial,
                "rounds": r.rounds,
                "final": {
                    "accuracy": last.accuracy, "macro_f1": last.macro_f1,
                    "handwritten_accuracy": last.handwritten_accuracy, "handwritten_macro_f1": last.handwritten_macro_f1,
                    "epsilon": r.rounds.last().and_then(|l| l.epsilon),
                    "selected_round": r.selected,
                },
                "seconds": r.seconds,
            })
        };
        let plain = &runs[0];
        let last = plain.rounds.last().map_or(Scores::NAN, |r| r.scores);
        let (final_acc, final_f1) = (last.accuracy, last.macro_f1);
        let mut json = json!({
            "demo": {
                "rounds": args.rounds, "local_epochs": args.local_epochs, "sites": SITES, "trainable": args.trainable.to_string(), "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "max_seq_len": args.max_seq_len, "seed": args.seed, "notes_per_site": args.notes_per_site, "seconds": total_seconds,
                "aggregation": if args.secure { "secure" } else { "fedavg" },
            },
            "rounds": plain.rounds,
            "final": {
                "accuracy": final_acc, "macro_f1": final_f1, "exported_model_accuracy": exported.accuracy,
                "handwritten_accuracy": last.handwritten_accuracy, "handwritten_macro_f1": last.handwritten_macro_f1,
                "handwritten": exported.handwritten,
                "selected_round": plain.selected,
            },
            "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
        });
        let mut summary =
            String::from("\n== summary: pooled test split of all three hospitals (generated) | hand-written set (never trained on)\n");
        let header = ["model", "accuracy", "macro-F1", "hw acc", "hw F1", "gap"];
        let _ =
            writeln!(summary, "  {:<28} {:>9} {:>9} {:>9} {:>9} {:>7}", header[0], header[1], header[2], header[3], header[4], header[5]);
        let mut row = |name: &str, s: Scores| {
            let gap = 100.0 * (s.accuracy - s.handwritten_accuracy);
            let _ = writeln!(
                summary,
                "  {name:<28} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {gap:>7.2}",
                s.accuracy, s.macro_f1, s.handwritten_accuracy, s.handwritten_macro_f1
            );
        };
        row("federated (no DP)", last);
        let mut references = Vec::new();
        if let Some(dp) = runs.get(1) {
            let d = dp.rounds.last().map_or(Scores::NAN, |r| r.scores);
            let eps = dp.rounds.last().and_then(|r| r.epsilon).map_or("?".into(), |e| format!("{e:.2}"));
            row(&format!("federated (DP, eps {eps})"), d);
            let a = d.accuracy;
            json["dp"] = json!({
                "accuracy": a, "macro_f1": d.macro_f1, "handwritten_accuracy": d.handwritten_accuracy, "handwritten_macro_f1": d.handwritten_macro_f1,
                "epsilon": dp.rounds.last().and_then(|r| r.epsilon), "delta": DELTA, "accuracy_drop": final_acc - a, "within_5_points_of_no_dp": final_acc - a <= 0.05,
            });
        }
        if let Some(b) = baselines {
            let num = |v: &Value, set: &str, key: &str| v[set][key].as_f64().unwrap_or(f64::NAN);
            let scores = |v: &Value| Scores {
                accuracy: num(v, "test", "accuracy"),
                macro_f1: num(v, "test", "macro_f1"),
                handwritten_accuracy: num(v, "handwritten", "accuracy"),
                handwritten_macro_f1: num(v, "handwritten", "macro_f1"),
            };
            let acc = |v: &Value| num(v, "test", "accuracy");
            let entry = |v: &Value| {
                let s = scores(v);
                json!({
                    "accuracy": s.accuracy, "macro_f1": s.macro_f1, "train_examples": v["train_examples"],
                    "handwritten_accuracy": s.handwritten_accuracy, "handwritten_macro_f1": s.handwritten_macro_f1, "handwritten": v["handwritten"],
                })
            };
            row("centralized (pooled data)", scores(&b.centralized));
            references.push(("centralized".to_owned(), acc(&b.centralized)));
            let mut local = serde_json::Map::new();
            for r in &b.local_only {
                let name = r["name"].as_str().unwrap_or("?").to_owned();
                row(&format!("local-only {name}"), scores(r));
                references.push((format!("local-only {name}"), acc(r)));
                local.insert(name, entry(r));
            }
            json["centralized"] = entry(&b.centralized);
            let best_local = b.local_only.iter().map(acc).fold(f64::NEG_INFINITY, f64::max);
            let gap = acc(&b.centralized) - final_acc;
            // Accuracies are ratios of counts (810/900 - 828/900 is exactly 2 points but
            // 0.020000000000000018 in f64): compare with a tolerance far below one note.
            const TOLERANCE: f64 = 1e-9;
            let checks = json!({
                "federated_at_least_0_90": final_acc >= 0.90 - TOLERANCE,
                "within_2_points_of_centralized": gap <= 0.02 + TOLERANCE,
                "above_every_local_only": final_acc > best_local,
            });
            let _ = writeln!(
                summary,
                "  federated vs centralized: {:+.2} points; vs best local-only: {:+.2} points",
                -100.0 * gap,
                100.0 * (final_acc - best_local)
            );
            json["local_only"] = Value::Object(local);
            json["checks"] = checks;
        }
        // The hand-written set: how far the generated test split flatters the federated
        // model (the issue's target: at least 0.92 there, within 2 points of the test split).
        let hw_gap = last.accuracy - last.handwritten_accuracy;
        const HW_TOLERANCE: f64 = 1e-9;
        json["handwritten"] = json!({
            "path": "models/corpus/handwritten/notes.jsonl",
            "notes": exported.handwritten["support"],
            "federated_accuracy": last.handwritten_accuracy,
            "federated_macro_f1": last.handwritten_macro_f1,
            "federated_gap_to_test_split": hw_gap,
            "checks": {
                "federated_at_least_0_92": last.handwritten_accuracy >= HANDWRITTEN_TARGET - HW_TOLERANCE,
                "within_2_points_of_test_split": hw_gap <= HANDWRITTEN_MAX_GAP + HW_TOLERANCE,
            },
        });
        let _ = writeln!(
            summary,
            "  hand-written set ({} notes): federated {:.4}, {:+.2} points against its score on the generated test split (gap column: test minus hand-written, points)",
            exported.handwritten["support"],
            last.handwritten_accuracy,
            -100.0 * hw_gap
        );
        if let Some(a) = allocation {
            summary.push_str(&a.summary());
            json["allocation"] = a.json();
        }
        let mut series = Vec::new();
        for r in runs {
            series
                .push((r.name.to_owned(), std::iter::once(r.initial.accuracy).chain(r.rounds.iter().map(|x| x.scores.accuracy)).collect()));
            series.push((
                format!("{}, hand-written", r.name),
                std::iter::once(r.initial.handwritten_accuracy).chain(r.rounds.iter().map(|x| x.scores.handwritten_accuracy)).collect(),
            ));
        }
        let allocation_html = allocation.map(Allocation::html).unwrap_or_default();
        Self { json, summary, series, references, allocation_html }
    }

    /// A self-contained page: the accuracy-per-round chart (inline SVG) and the tables.
    fn html(&self) -> String {
        let mut rows = String::new();
        if let Some(runs) = self.json["runs"].as_array() {
            for run in runs {
                for r in run["rounds"].as_array().into_iter().flatten() {
                    let num = |k: &str, digits: usize| r[k].as_f64().map_or("-".to_owned(), |x| format!("{x:.digits$}"));
                    let _ = writeln!(
                        rows,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        run["name"].as_str().unwrap_or(""),
                        r["round"],
                        r["sites"],
                        num("mean_local_loss", 4),
                        num("accuracy", 4),
                        num("macro_f1", 4),
                        num("handwritten_accuracy", 4),
                        num("handwritten_macro_f1", 4),
                        num("epsilon", 3),
                        num("seconds", 1)
                    );
                }
            }
        }
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedward demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}}pre{{background:#f6f6f6;padding:1rem}}</style>
</head><body>
<h1>fedward demo: a federation of three hospitals</h1>
<p>Global model accuracy after each round on the pooled test split (generated notes) and on the hand-written set (models/corpus/handwritten/: notes the generator never wrote, never trained, tuned or selected on), against the baselines on the test split.</p>
{chart}
<h2>Rounds</h2>
<table><tr><th>run</th><th>round</th><th>sites</th><th>mean local loss</th><th>accuracy</th><th>macro-F1</th><th>hand-written accuracy</th><th>hand-written macro-F1</th><th>epsilon</th><th>seconds</th></tr>
{rows}</table>
{allocation}<h2>Summary</h2>
<pre>{summary}</pre>
</body></html>
"#,
            chart = svg_chart(&self.series, &self.references),
            allocation = self.allocation_html,
            summary = html_escape(&self.summary),
        )
    }
}

/// Accuracy per round as lines, with the baselines as dashed horizontal references.
fn svg_chart(series: &[(String, Vec<f64>)], references: &[(String, f64)]) -> String {
    const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"];
    let (w, h, left, right, top, bottom) = (720.0, 360.0, 50.0, 190.0, 20.0, 40.0);
    let rounds = series.iter().map(|(_, v)| v.len()).max().unwrap_or(1).max(2) - 1;
    let values = series.iter().flat_map(|(_, v)| v.iter().copied()).chain(references.iter().map(|r| r.1)).filter(|v| v.is_finite());
    let lo = (values.fold(1.0f64, f64::min) * 10.0).floor() / 10.0;
    let lo = lo.clamp(0.0, 0.9);
    let x = |i: usize| left + (w - left - right) * i as f64 / rounds as f64;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - (v - lo) / (1.0 - lo));
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">"#);
    let mut tick = lo;
    while tick <= 1.0 + 1e-9 {
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{tick:.1}</text>"##,
            w - right,
            left - 6.0,
            y(tick) + 4.0,
            y = y(tick)
        );
        tick += 0.1;
    }
    for i in 0..=rounds {
        let _ = write!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{i}</text>"#, x(i), h - bottom + 16.0);
    }
    let _ = write!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">round</text>"#, (left + w - right) / 2.0, h - 6.0);
    let mut legend_y = top + 10.0;
    for (k, (name, acc)) in references.iter().enumerate() {
        let c = COLOURS[(k + series.len()) % COLOURS.len()];
        let _ = write!(
            svg,
            r#"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{c}" stroke-dasharray="5,4"/>"#,
            w - right,
            y = y(*acc)
        );
        let _ = write!(svg, r#"<text x="{}" y="{legend_y:.1}" fill="{c}">- - {} {acc:.3}</text>"#, w - right + 8.0, html_escape(name));
        legend_y += 16.0;
    }
    for (k, (name, acc)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let points: Vec<String> =
            acc.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v))).collect();
        let _ = write!(svg, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, points.join(" "));
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(svg, r#"<circle cx="{px}" cy="{py}" r="3" fill="{c}"/>"#);
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{legend_y:.1}" fill="{c}">— federated ({}) {:.3}</text>"#,
            w - right + 8.0,
            html_escape(name),
            acc.last().copied().unwrap_or(f64::NAN)
        );
        legend_y += 16.0;
    }
    svg.push_str("</svg>");
    svg
}
