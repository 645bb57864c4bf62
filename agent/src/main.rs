//! `fedward-agent`: the hospital's daemon and the site's tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::{error, info};

use fedward_agent::daemon::{self, DaemonOptions, DaemonOutcome};
use fedward_shared::cli::ConfigFile;
use fedward_shared::config::AgentConfig;
use fedward_shared::fsutil;
use fedward_shared::pki;
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::SiteId;

/// The version `--version` prints; it says when crash points are built in (the chaos
/// suite checks, a release build never has them).
const VERSION: &str = if fedward_shared::failpoint::ENABLED {
    concat!(env!("CARGO_PKG_VERSION"), " (with crash points for the chaos suite)")
} else {
    env!("CARGO_PKG_VERSION")
};

/// The fedward agent: trains the consortium's shared model on this hospital's notes.
///
/// No note ever leaves the hospital: the agent dials out to the coordinator (it opens no
/// inbound port), trains locally and sends only a clipped, noised weight update after
/// recording its privacy spend. Logs go to stderr; set FEDWARD_LOG (e.g. `info`, `debug`)
/// and FEDWARD_LOG_FORMAT=json for machine-readable logs.
#[derive(Parser)]
#[command(name = "fedward-agent", version = VERSION, propagate_version = true)]
enum Command {
    /// Run the daemon: connect to the coordinator and take part in rounds.
    Run(ConfigFile),
    /// Run the hospital's triage service: classify notes with the latest global model,
    /// allocate doctors, beds and devices against live capacity, take clinicians'
    /// corrections into the site's training data. HTTP on `[service] listen` (loopback by
    /// default); see docs/ALLOCATION.md.
    Serve {
        #[command(flatten)]
        config: ConfigFile,
        /// Serve this exported model directory instead of the daemon's latest global model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Tokens per note after truncation.
        #[arg(long, default_value_t = 128)]
        max_seq_len: usize,
    },
    /// Say how this site's agent is doing, in plain words: running or not and why, the
    /// round, the last update sent, the privacy budget spent and left, the certificate's
    /// expiry, the data set's size. Exit 0 when all is well, 1 when something needs a person.
    Status {
        #[command(flatten)]
        config: ConfigFile,
        /// Print the report as JSON (what the daemon's loopback /status endpoint answers).
        #[arg(long)]
        json: bool,
    },
    /// Check a config file (and that its files are readable) without connecting.
    CheckConfig(ConfigFile),
    /// Manage this site's key and certificate.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Classify notes with a model directory; one JSON line per input, in order, with the
    /// label and the class probabilities.
    Predict {
        /// Model directory (an exported global model, or the pretrained base).
        #[arg(long)]
        model: PathBuf,
        /// One note to classify.
        #[arg(long, conflicts_with = "input", required_unless_present = "input")]
        text: Option<String>,
        /// A JSONL file of {"text": ...} lines.
        #[arg(long)]
        input: Option<PathBuf>,
        #[command(flatten)]
        inference: Inference,
    },
    /// Turn a global-model checkpoint (safetensors from the coordinator) into a model
    /// directory that transformers and `predict`/`eval` load.
    Export {
        /// The checkpoint, e.g. the coordinator's checkpoints/round-00005.safetensors.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The base model directory the federation started from (config.json, tokenizer.json).
        #[arg(long)]
        base: PathBuf,
        /// Labels in id order (default: doctor, bed, device, other).
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate a model directory on labelled notes ({"text", "label"} JSONL): accuracy,
    /// macro-F1, per-class precision/recall/F1 and the confusion matrix.
    Eval {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Labelled JSONL file.
        #[arg(long)]
        data: PathBuf,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        inference: Inference,
    },
    /// Make or bring in the site's labelled notes.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train the baselines a federation is judged against, from the same base model and
    /// recipe, and score them on the pooled test split of every site in a data directory.
    /// The recipe's defaults are the demo's plan (10 rounds of 1 epoch); match them to the
    /// federation's plan otherwise.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Check privacy ledgers (chain, seals, recomputed epsilons) and write audit reports.
    #[command(subcommand)]
    Audit(fedward_shared::cli::AuditCommand),
    /// Manage the tokens file `[service] tokens` names (who may use the triage service).
    #[command(subcommand)]
    Token(fedward_shared::cli::TokenCommand),
    /// Plan differential privacy: the epsilon a plan spends, or the noise a target needs.
    #[command(subcommand)]
    Privacy(fedward_shared::cli::PrivacyCommand),
    /// Allocation of doctors, beds and devices: replay a day through the engine's methods.
    #[command(subcommand)]
    Allocate(AllocateCommand),
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(ConfigFile { config }) => tokio::runtime::Runtime::new()?.block_on(run_daemon(load_config(&config)?)),
        Command::Serve { config: ConfigFile { config }, model, max_seq_len } => {
            let options = fedward_agent::service::ServeOptions { config: load_config(&config)?, model_dir: model, max_seq_len };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async { fedward_agent::service::serve(options, fedward_net::shutdown_signal()).await })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(ConfigFile { config }) => check_config(&config),
        Command::Status { config: ConfigFile { config }, json } => {
            let report = fedward_agent::status::compose(&load_config(&config)?, time::OffsetDateTime::now_utc());
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", fedward_agent::status::render(&report));
            }
            Ok(if report.attention.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Token(cmd) => {
            fedward_shared::cli::run_token(&cmd, &mut std::io::stdout(), &mut std::io::stderr())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict { model, text, input, inference: Inference { device, max_seq_len } } => {
            let dev = fedward_models::train::device(&device)?;
            let (model, encoder) = fedward_models::io::load_trained_dir(&model, &dev)?;
            let texts = match (text, input) {
                (Some(t), _) => vec![t],
                (None, Some(path)) => fedward_models::text::read_texts_jsonl(&path)?,
                (None, None) => anyhow::bail!("give --text or --input"),
            };
            // In chunks, written as they come: a progress bar on a terminal (none when
            // stderr is piped), and memory bounded by the chunk, not the file.
            let bar = progress(texts.len(), "classifying");
            let mut out = std::io::stdout().lock();
            for chunk in texts.chunks(PROGRESS_CHUNK) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                for p in fedward_models::train::predict(&model, &encoder, &refs, max_seq_len)? {
                    let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                    let probabilities: serde_json::Map<String, serde_json::Value> =
                        model.labels.iter().zip(&p).map(|(l, v)| (l.clone(), serde_json::Value::from(*v))).collect();
                    let line = serde_json::json!({"label": model.labels[best], "probabilities": probabilities});
                    use std::io::Write;
                    writeln!(out, "{line}")?;
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { checkpoint, base, labels, out } => {
            let labels = labels.unwrap_or_else(|| fedward_shared::config::DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect());
            let (mut model, encoder) = fedward_models::io::load_dir(&base, Some(&labels), 0, &candle_core::Device::Cpu)?;
            let set = fedward_shared::tensor::TensorSet::from_safetensors(&fsutil::read(&checkpoint)?, false)
                .with_context(|| format!("reading {}", checkpoint.display()))?;
            model.load(&set).context("the checkpoint does not fit the base model")?;
            let bar = spinner("exporting");
            fedward_models::io::export_dir(&model, &encoder, &out)?;
            bar.finish_and_clear();
            println!("exported {} to {} (model {})", checkpoint.display(), out.display(), set.digest().short());
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { model, data, json, inference: Inference { device, max_seq_len } } => {
            let dev = fedward_models::train::device(&device)?;
            let (model, encoder) = fedward_models::io::load_trained_dir(&model, &dev)?;
            let examples = fedward_models::text::read_jsonl(&data, &model.labels)?;
            let bar = progress(examples.len(), "evaluating");
            let (mut truth, mut predicted) = (Vec::with_capacity(examples.len()), Vec::with_capacity(examples.len()));
            for chunk in examples.chunks(PROGRESS_CHUNK) {
                let refs: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
                for (e, p) in chunk.iter().zip(fedward_models::train::predict(&model, &encoder, &refs, max_seq_len)?) {
                    truth.push(e.label);
                    predicted.push(p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i));
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            let report = fedward_models::eval::classification_report(&truth, &predicted, &model.labels);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(cmd) => data_command(cmd),
        Command::Baseline(cmd) => baseline_command(cmd),
        Command::Pki(PkiCommand::Request { site, dir }) => {
            let req = pki::site_request(&site)?;
            fsutil::write_private_new(&dir.join("site.key"), req.key_pem.as_bytes())?;
            fsutil::write_public_new(&dir.join("site.csr"), req.csr_pem.as_bytes())?;
            println!("wrote {} (private, never send it) and {}", dir.join("site.key").display(), dir.join("site.csr").display());
            println!("send site.csr to the consortium admin; put the signed site.crt and ca.crt beside site.key");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(cmd) => {
            let now = fedward_shared::cli::OffsetDateTime::now_utc();
            let passed = fedward_shared::cli::run_audit(&cmd, now, &mut std::io::stdout().lock())?;
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Privacy(cmd) => {
            fedward_shared::cli::run_privacy(&cmd, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Allocate(AllocateCommand::Simulate(args)) => allocate_simulate(args),
    }
}

#[derive(Subcommand)]
enum AllocateCommand {
    /// Replay a day of arrivals through FCFS, greedy and optimal allocation, on the same
    /// arrivals and the same predictions, and report waits by urgency, the share of urgent
    /// requests (urgency 1-2) served within the target, utilisation by kind,
    /// misallocations caused by wrong predictions and decisions per second.
    ///
    /// Arrivals are Poisson with a daily profile (busiest at 14:00, quietest at 02:00);
    /// each draws a labelled note (its true label is what the patient needs, the model's
    /// prediction is what the engine acts on), an urgency, and the pool it needs from the
    /// capacity file. Service times are log-normal: consultations (median 20 min), bed stays
    /// (median 3 days), device use (median 6 h). A wrong assignment holds the wrong unit until
    /// found (--detect-mins), then the request re-enters with its true label; a review takes
    /// --review-mins. Every distribution is in docs/ALLOCATION.md ("The simulator").
    /// Writes simulation.json and simulation.html (charts, no script) to --out, prints a table.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Model directory (an exported global model, or a local-only one) that classifies the notes.
    #[arg(long)]
    model: PathBuf,
    /// Labelled notes ({"text", "label"} JSONL, e.g. the site's test split) the arrivals draw from.
    #[arg(long)]
    notes: PathBuf,
    /// The hospital's capacity as JSON: {"resources": [{"kind": "bed", "group": "medical",
    /// "features": ["isolation"], "total": 10, "free": 2}, ...]}, the format of `PUT /v1/capacity`.
    /// Units not free at the start free after a partial service time.
    #[arg(long)]
    capacity: PathBuf,
    /// Hours of arrivals (the run goes on until everyone who arrived is served, at most 7 days more).
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// Seed of the arrivals, notes, urgencies, needs and service times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mean arrivals per hour over the day.
    #[arg(long, default_value_t = 6.0)]
    arrivals_per_hour: f64,
    /// An urgent request (urgency 1-2) served within this many minutes is within target.
    #[arg(long, default_value_t = 30)]
    target_mins: u64,
    /// Minutes until the staff find a wrong assignment and release the unit.
    #[arg(long, default_value_t = 45)]
    detect_mins: u64,
    /// Minutes a person takes to resolve a review item.
    #[arg(long, default_value_t = 15)]
    review_mins: u64,
    /// Decide only every N minutes instead of after every arrival and release.
    #[arg(long)]
    epoch_mins: Option<u64>,
    /// Predictions less sure than this go to human review.
    #[arg(long, default_value_t = 0.6)]
    review_below: f64,
    /// Value a request gains per hour waited in the optimal method's objective, in units of
    /// an urgency-5 request (an urgency-1 request is worth 16).
    #[arg(long, default_value_t = 0.5)]
    wait_weight: f64,
    /// Where to write simulation.json and simulation.html.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    inference: Inference,
}

/// Where a model runs and how much of each note it reads (`predict`, `eval`, `allocate
/// simulate`).
#[derive(clap::Args, Debug)]
struct Inference {
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Tokens per note after truncation.
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
}

/// `allocate simulate`: classifies the notes once, then hands the predictions to the pure
/// simulator (`fedward_agent::simulate`).
fn allocate_simulate(args: SimulateArgs) -> Result<ExitCode> {
    use fedward_agent::allocation::{Capacity, Kind, Policy};
    use fedward_agent::simulate::{self, Note, Settings, Workload};
    let setting = |field: &'static str, message: String| fedward_shared::config::ConfigError::Invalid { field, message };
    if !(args.hours.is_finite() && args.hours > 0.0 && args.hours <= 24.0 * 366.0) {
        return Err(setting("hours", "must be more than 0 and at most a year".into()).into());
    }
    if !(0.0..=1.0).contains(&args.review_below) {
        return Err(setting("review-below", "must be between 0 and 1".into()).into());
    }
    if !(args.wait_weight.is_finite() && args.wait_weight >= 0.0) {
        return Err(setting("wait-weight", "must be 0 or more".into()).into());
    }
    let capacity: Capacity = serde_json::from_slice(&fsutil::read(&args.capacity)?)
        .with_context(|| format!("reading the capacity {}", args.capacity.display()))?;
    capacity.validate().with_context(|| format!("invalid capacity {}", args.capacity.display()))?;

    let dev = fedward_models::train::device(&args.inference.device)?;
    let (model, encoder) = fedward_models::io::load_trained_dir(&args.model, &dev)?;
    // Each of the model's labels as a kind; a label the engine does not know counts as `other`.
    let kinds: Vec<Kind> = model.labels.iter().map(|l| Kind::of_label(l)).collect();
    let examples = fedward_models::text::read_jsonl(&args.notes, &model.labels)?;
    let workload =
        Workload { horizon_secs: (args.hours * 3600.0).round() as u64, arrivals_per_hour: args.arrivals_per_hour, ..Workload::default() };
    // The draws depend on the true labels only: draw first, then classify only the notes
    // the day draws (fewer than the file holds, often), and bring their predictions in.
    let unknown = |e: &fedward_models::text::Example| Note { truth: kinds[e.label], probabilities: [0.25; 4] };
    let mut notes: Vec<Note> = examples.iter().map(unknown).collect();
    let mut scenario =
        simulate::generate(&workload, &capacity, &notes, args.seed).map_err(|e| setting("allocate simulate", e.to_string()))?;
    let drawn: std::collections::BTreeSet<usize> = scenario.arrivals.iter().map(|a| a.note).collect();
    let texts: Vec<&str> = drawn.iter().map(|&i| examples[i].text.as_str()).collect();
    let started = std::time::Instant::now();
    let probabilities = fedward_models::train::predict(&model, &encoder, &texts, args.inference.max_seq_len)?;
    info!(notes = texts.len(), secs = format_args!("{:.1}", started.elapsed().as_secs_f64()), "notes classified");
    let order = [Kind::Doctor, Kind::Bed, Kind::Device, Kind::Other];
    for (&i, p) in drawn.iter().zip(&probabilities) {
        let mut by_kind = [0.0; 4];
        for (kind, v) in kinds.iter().zip(p) {
            by_kind[order.iter().position(|k| k == kind).unwrap_or(3)] += f64::from(*v);
        }
        notes[i].probabilities = by_kind;
    }
    scenario.set_predictions(&notes);
    let right = drawn.iter().filter(|&&i| notes[i].prediction().0 == notes[i].truth).count();
    let accuracy = right as f64 / drawn.len().max(1) as f64;

    let settings = Settings {
        policy: Policy { review_below: args.review_below, wait_weight_per_hour: args.wait_weight, ..Policy::default() },
        target_secs: args.target_mins * 60,
        detect_secs: args.detect_mins * 60,
        review_secs: args.review_mins * 60,
        epoch_every_secs: args.epoch_mins.map(|m| m * 60),
        ..Settings::default()
    };
    // The engine's time only: the clock is read around each decision.
    let clock_start = std::time::Instant::now();
    let comparison = simulate::compare(&scenario, &capacity, &settings, args.seed, &mut || clock_start.elapsed().as_secs_f64());
    let summary = serde_json::json!({
        "model": args.model,
        "notes": args.notes,
        "notes_read": notes.len(),
        "notes_drawn": drawn.len(),
        "accuracy_on_notes": accuracy,
        "capacity": capacity,
        "workload": workload,
        "settings": {
            "review_below": args.review_below,
            "wait_weight_per_hour": args.wait_weight,
            "target_mins": args.target_mins,
            "detect_mins": args.detect_mins,
            "review_mins": args.review_mins,
            "epoch_mins": args.epoch_mins,
        },
        "comparison": comparison,
    });
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        fsutil::atomic_write(&out.join("simulation.json"), (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(), false)?;
        let title = format!("Allocation simulator: {}", args.model.file_name().map_or("model".into(), |n| n.to_string_lossy()));
        fsutil::atomic_write(&out.join("simulation.html"), simulate::html(&comparison, &title).as_bytes(), false)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("model {}: accuracy {accuracy:.4} on the {} notes drawn of {}", args.model.display(), drawn.len(), notes.len());
        print!("{}", simulate::table(&comparison));
        if let Some(out) = &args.out {
            println!("wrote {} and {}", out.join("simulation.json").display(), out.join("simulation.html").display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate a synthetic multi-site corpus of triage notes (deterministic by seed):
    /// DIR/<site>/{train,validation,test}.jsonl and DIR/summary.json.
    Synth {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Seed: the same seed gives byte-identical files.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Sites as NAME=STYLE or STYLE (repeatable). Styles: trauma-centre, rural-hospital,
        /// childrens-hospital, teaching-hospital, cancer-centre. Default: the first three.
        #[arg(long = "site")]
        sites: Vec<String>,
        /// Notes per site, before the train/validation/test split.
        #[arg(long, default_value_t = 1000)]
        notes_per_site: usize,
        /// Dirichlet concentration of each site's label mix: 0.5 skews strongly, 100 is near-IID.
        #[arg(long, default_value_t = 1.0)]
        alpha: f64,
        /// Share of notes built as hard cases (a negation, a distracting mention of another
        /// resource, a secondary need for later, review-to-decide), from 0 to 1.
        /// Default: each site style's own (about a quarter).
        #[arg(long)]
        hard_share: Option<f64>,
    },
    /// Validate the site's own notes (CSV with a header row, or JSONL) and write the valid
    /// rows as {"text", "label"} JSONL for training. Each rejected row is named by line and
    /// reason; no note text is ever printed.
    Import {
        /// The site's file.
        #[arg(long)]
        input: PathBuf,
        /// Where to write the validated JSONL.
        #[arg(long)]
        out: PathBuf,
        /// Input format (default: from the file extension).
        #[arg(long, value_enum)]
        format: Option<InputFormat>,
        /// CSV header or JSON key of the note text.
        #[arg(long, default_value = "text")]
        text_column: String,
        /// CSV header or JSON key of the label.
        #[arg(long, default_value = "label")]
        label_column: String,
        /// Accepted labels (default: doctor, bed, device, other).
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// Map a site label onto an accepted one, e.g. `Physician=doctor` (repeatable).
        #[arg(long = "map", value_parser = parse_label_mapping)]
        label_map: Vec<(String, String)>,
        /// Longest accepted note, in characters.
        #[arg(long, default_value_t = 2000)]
        max_chars: usize,
        /// Drop exact repeats of an earlier (text, label) row.
        #[arg(long)]
        dedupe: bool,
        /// Fail, writing nothing, when more than this fraction of rows is rejected.
        #[arg(long)]
        max_bad_fraction: Option<f64>,
        /// CSV field separator.
        #[arg(long, default_value_t = ',')]
        delimiter: char,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InputFormat {
    Csv,
    Jsonl,
}

#[derive(Subcommand)]
enum BaselineCommand {
    /// Train one model on the pooled training data of every site: what federation must
    /// approach (and what privacy rules forbid in practice).
    Centralized {
        #[command(flatten)]
        args: BaselineArgs,
    },
    /// Both: the centralized model, then one per site, with one pass of the frozen layers
    /// over the pooled data serving all of them (faster than the two commands one by one).
    All {
        #[command(flatten)]
        args: BaselineArgs,
    },
    /// Train one model per site on that site's data alone.
    LocalOnly {
        #[command(flatten)]
        args: BaselineArgs,
        /// Only these sites (repeatable; default: every site in the data directory).
        #[arg(long = "site")]
        sites: Vec<String>,
    },
}

#[derive(clap::Args)]
struct BaselineArgs {
    /// Data directory laid out as `data synth` writes it: DIR/<site>/{train,test}.jsonl.
    #[arg(long)]
    data: PathBuf,
    /// Base model directory (the federation's starting point).
    #[arg(long)]
    base: PathBuf,
    /// Which part trains: head, top:K, body:K (top K layers and the pooler; the classifier stays fixed), bias:K (BitFit: biases and norms of the top K layers), lora:R (rank-R adapters on the top layer, merged into it) or all.
    #[arg(long, default_value = "body:1")]
    trainable: fedward_shared::plan::Trainable,
    /// Passes over the training data (match the federation's rounds x local epochs).
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: u32,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 1.5e-3)]
    learning_rate: f64,
    /// Tokens per note after truncation.
    #[arg(long, default_value_t = 128)]
    max_seq_len: u32,
    /// Seed for the head's initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute device: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads (default: every core). With 2 or more, `all` trains the centralized
    /// model on one thread while the local-only ones train on another, and the frozen
    /// layers run on this many threads; candle then computes on one thread per training
    /// thread unless RAYON_NUM_THREADS says otherwise.
    #[arg(long)]
    threads: Option<usize>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Also export each trained model to DIR/<name> (`centralized`, or the site's name), a
    /// model directory for `predict`, `eval` and `allocate simulate`.
    #[arg(long, value_name = "DIR")]
    save_models: Option<PathBuf>,
}

fn parse_label_mapping(s: &str) -> Result<(String, String), String> {
    let (from, to) = s.split_once('=').ok_or_else(|| format!("expected SITE_LABEL=LABEL, got {s:?}"))?;
    Ok((from.trim().to_owned(), to.trim().to_owned()))
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Generate this site's private key (kept here, mode 0600) and a certificate signing
    /// request to send to the consortium admin.
    Request {
        /// This site's id, as the consortium enrolled it (lowercase letters, digits, '-').
        #[arg(long)]
        site: SiteId,
        /// Directory to write site.key and site.csr into.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Checks the config and every file it names, as the daemon would use them: the TLS
/// material (parses, the key is the certificate's, the certificate chains to the CA as a
/// site's and is valid now), the training and validation data (parse, known labels), the
/// base model (loads) and the state directory. What fails is a configuration error (64).
fn check_config(path: &Path) -> Result<ExitCode> {
    let cfg = load_config(path)?;
    let bad = |field: &'static str| move |e: anyhow::Error| anyhow::Error::from(fedward_shared::cli::setting_error(field, e.as_ref()));
    let files = fedward_shared::cli::TlsFiles::read(&cfg.tls)?;
    let m = files.material();
    client_tls(&cfg).map_err(bad("tls"))?;
    tls::check_certificate(&m, tls::Role::Site, rustls::pki_types::UnixTime::now()).map_err(|e| bad("tls.cert")(e.into()))?;
    let train = fedward_models::text::read_jsonl(&cfg.train_data, &cfg.labels).map_err(|e| bad("data.train")(e.into()))?;
    let validation = match &cfg.validation_data {
        Some(p) => Some(fedward_models::text::read_jsonl(p, &cfg.labels).map_err(|e| bad("data.validation")(e.into()))?.len()),
        None => None,
    };
    fedward_models::io::load_dir(&cfg.model_base, Some(&cfg.labels), 0, &candle_core::Device::Cpu)
        .map_err(|e| bad("model.base")(e.into()))?;
    let corrections = match cfg.feedback_data.exists() {
        true => fedward_models::text::read_jsonl(&cfg.feedback_data, &cfg.labels).map_err(|e| bad("data.feedback")(e.into()))?.len(),
        false => 0,
    };
    if let Some(tokens) = &cfg.service.tokens {
        fedward_shared::access::Tokens::load(tokens).map_err(|e| bad("service.tokens")(anyhow::anyhow!(e)))?;
    }
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| bad("agent.state_dir")(anyhow::anyhow!("{}: {e}", cfg.state_dir.display())))?;
    println!("config ok: {}", path.display());
    println!("  coordinator {} ({})", cfg.coordinator_addr, cfg.server_name);
    println!("  certificate chains to {} and is valid now; the key is its own", cfg.tls.ca_cert.display());
    println!(
        "  training data {} ({} notes){}",
        cfg.train_data.display(),
        train.len(),
        validation.map(|n| format!(", validation {n} notes")).unwrap_or_default()
    );
    println!("  corrections {} ({corrections} notes)", cfg.feedback_data.display());
    println!("  base model {} loads", cfg.model_base.display());
    println!(
        "  budget: epsilon <= {} at delta {}{}",
        cfg.budget.max_epsilon,
        cfg.budget.delta,
        cfg.budget.max_rounds.map(|r| format!(", at most {r} rounds")).unwrap_or_default()
    );
    println!(
        "  triage service (fedward-agent serve) on {}, {} allocation, {}",
        cfg.service.listen,
        cfg.service.method,
        if cfg.service.tokens.is_some() { "tokens required" } else { "loopback, no tokens" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Notes per step of a long command's progress.
const PROGRESS_CHUNK: usize = 256;

/// A progress bar on stderr when it is a terminal; hidden (and free) when piped.
fn progress(len: usize, what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} notes, {elapsed} ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

/// A spinner with the elapsed time, for steps of unknown length; hidden when piped.
fn spinner(what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(what);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn load_config(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    AgentConfig::parse(&text, base).with_context(|| format!("invalid config {}", path.display()))
}

fn client_tls(cfg: &AgentConfig) -> Result<rustls::ClientConfig> {
    tls::client_config(&TlsMaterial {
        ca_pem: &fsutil::read(&cfg.tls.ca_cert)?,
        cert_pem: &fsutil::read(&cfg.tls.cert)?,
        key_pem: &fsutil::read_private_key(&cfg.tls.key)?,
    })
    .context("building the TLS configuration")
}

/// The site's identity for secure rounds, from its TLS files (already read once for the
/// client config): `None`, with a warning, when the key is not the ECDSA P-256 key secure
/// aggregation signs with; secure offers are then declined.
fn secagg_identity(tls: &fedward_shared::config::TlsPaths) -> Option<fedward_agent::daemon::SecAggIdentity> {
    let read = || -> Result<fedward_agent::daemon::SecAggIdentity> {
        let creds = fedward_shared::secagg::SiteCredentials::from_pem(&fsutil::read(&tls.cert)?, &fsutil::read_private_key(&tls.key)?)?;
        let trust = fedward_shared::secagg::Trust::from_ca_pem(&fsutil::read(&tls.ca_cert)?)?;
        Ok(fedward_agent::daemon::SecAggIdentity { creds, trust })
    };
    match read() {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(cause = %format!("{e:#}"), "secure aggregation unavailable: secure rounds will be declined");
            None
        }
    }
}

async fn run_daemon(cfg: AgentConfig) -> Result<ExitCode> {
    let shutdown = fedward_net::shutdown_signal();
    if fedward_agent::renew::finish_interrupted_install(&cfg.tls.cert, &cfg.tls.key)? {
        tracing::warn!("completed the install of a renewed certificate that a stop interrupted");
    }
    let tls = client_tls(&cfg)?;
    let trainer = fedward_agent::trainer::build(&cfg).context("preparing local training")?;
    let opts = DaemonOptions {
        coordinator_addr: cfg.coordinator_addr.clone(),
        server_name: cfg.server_name.clone(),
        tls: Arc::new(tls),
        state_dir: cfg.state_dir.clone(),
        budget: cfg.budget,
        max_backoff: cfg.max_backoff,
        max_connect_attempts: cfg.max_connect_attempts,
        exit_when_finished: cfg.exit_when_finished,
        transport: cfg.transport,
        max_model_bytes: cfg.max_model_bytes,
        seed: None,
        renewal: if cfg.auto_renew {
            Some(fedward_agent::renew::RenewalFiles {
                cert: cfg.tls.cert.clone(),
                key: cfg.tls.key.clone(),
                ca_pem: fsutil::read(&cfg.tls.ca_cert)?,
            })
        } else {
            None
        },
        fail_after_ledger_write: false,
        secagg: secagg_identity(&cfg.tls),
    };
    if let Some(addr) = cfg.status_listen {
        tokio::spawn(fedward_agent::endpoint::serve_status(addr, Arc::new(cfg.clone())));
    }
    info!(coordinator = %cfg.coordinator_addr, "agent starting");
    let outcome = match daemon::run(opts, trainer, shutdown).await {
        // What no retry can fix is a configuration error: exit 64, which the shipped unit
        // does not restart.
        Err(daemon::DaemonError::Misconfigured(reason)) => {
            return Err(fedward_shared::config::ConfigError::Invalid { field: "coordinator", message: reason }.into())
        }
        // Refused by the consortium (not enrolled, certificate revoked, expired or from
        // another CA): only the admin or a new certificate can change that, so it is a
        // configuration error too, and restarting would only be refused again.
        Err(daemon::DaemonError::Refused(reason)) => {
            return Err(fedward_shared::config::ConfigError::Invalid {
                field: "tls.cert",
                message: format!("the coordinator refused this site: {reason}"),
            }
            .into())
        }
        // Its ledger must be restored first: as with the coordinator's inconsistent state,
        // exit 65, which the shipped unit does not restart.
        Err(e @ daemon::DaemonError::LedgerBehind(_)) => {
            error!(cause = %e, "not training on a budget that cannot be counted");
            eprintln!("error: {e}");
            return Ok(ExitCode::from(fedward_shared::cli::EXIT_STATE_INCONSISTENT));
        }
        other => other?,
    };
    match outcome {
        DaemonOutcome::Finished { completed_rounds, rounds_trained } => {
            info!(completed_rounds, rounds_trained, "done");
        }
        DaemonOutcome::Shutdown => info!("stopped"),
    }
    Ok(ExitCode::SUCCESS)
}

fn default_labels() -> Vec<String> {
    fedward_shared::config::DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect()
}

fn data_command(cmd: DataCommand) -> Result<ExitCode> {
    use fedward_corpus::{import, synth};
    match cmd {
        DataCommand::Synth { out, seed, sites, notes_per_site, alpha, hard_share } => {
            let sites = if sites.is_empty() {
                synth::SynthConfig::default_sites()
            } else {
                sites.iter().map(|s| parse_site_spec(s)).collect::<Result<_>>()?
            };
            let mut cfg = synth::SynthConfig::new(seed, sites);
            cfg.notes_per_site = notes_per_site;
            cfg.alpha = alpha;
            cfg.hard_share = hard_share;
            let corpus = synth::generate(&cfg)?;
            synth::write_corpus(&corpus, &out).with_context(|| format!("writing {}", out.display()))?;
            let summary = corpus.summary();
            println!(
                "wrote {} notes for {} sites to {} (seed {seed}, alpha {alpha}): {} phrase building blocks, exact-duplicate rate {:.4}",
                summary["notes"],
                corpus.sites.len(),
                out.display(),
                summary["building_blocks"],
                corpus.duplicate_rate()
            );
            for site in &corpus.sites {
                let [d, b, v, o] = site.label_counts();
                println!(
                    "  {:<20} {:>5} notes (train {}, validation {}, test {}); doctor {d}, bed {b}, device {v}, other {o}",
                    site.name,
                    site.len(),
                    site.train.len(),
                    site.validation.len(),
                    site.test.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Import {
            input,
            out,
            format,
            text_column,
            label_column,
            labels,
            label_map,
            max_chars,
            dedupe,
            max_bad_fraction,
            delimiter,
            json,
        } => {
            let format = match format {
                Some(InputFormat::Csv) => import::Format::Csv,
                Some(InputFormat::Jsonl) => import::Format::Jsonl,
                None => match input.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
                    Some("csv" | "tsv") => import::Format::Csv,
                    Some("jsonl" | "ndjson" | "json") => import::Format::Jsonl,
                    _ => anyhow::bail!("cannot tell the format of {} from its extension: give --format csv or jsonl", input.display()),
                },
            };
            if !delimiter.is_ascii() {
                anyhow::bail!("--delimiter must be an ASCII character");
            }
            let mut cfg = import::ImportConfig::new(format);
            cfg.text_column = text_column;
            cfg.label_column = label_column;
            cfg.labels = labels.unwrap_or_else(default_labels);
            cfg.label_map = label_map.into_iter().collect();
            cfg.max_chars = max_chars;
            cfg.dedupe = dedupe;
            cfg.max_bad_fraction = max_bad_fraction;
            cfg.delimiter = delimiter as u8;
            let bar = spinner("importing");
            let imported = import::import_file(&input, &cfg)?;
            bar.finish_and_clear();
            // Patient notes: readable by the agent's user only.
            let mut bytes = Vec::new();
            import::write_jsonl(&mut bytes, &imported.rows)?;
            fsutil::atomic_write(&out, &bytes, true)?;
            let report = &imported.report;
            if json {
                println!("{}", serde_json::to_string_pretty(&import_report_json(report))?);
            } else {
                print!("{report}");
                println!("wrote {} rows to {}", report.accepted, out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `NAME=STYLE` or `STYLE` (the site is then named after its style).
fn parse_site_spec(s: &str) -> Result<fedward_corpus::synth::SiteSpec> {
    let (name, style) = s.split_once('=').unwrap_or((s, s));
    let style = style.parse().map_err(|_| anyhow::anyhow!("unknown site style in {s:?}"))?;
    Ok(fedward_corpus::synth::SiteSpec::new(name, style))
}

fn import_report_json(r: &fedward_corpus::import::ImportReport) -> serde_json::Value {
    serde_json::json!({
        "rows_read": r.rows_read,
        "accepted": r.accepted,
        "rejected": r.rejected,
        "duplicates_dropped": r.duplicates.len(),
        "conflicting_labels": r.conflicting_labels,
        "per_label": r.per_label,
        "rejected_by_reason": r.reasons.iter().map(|(k, n)| (k.as_str(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
        "rejects": r.rejects.iter().map(|x| serde_json::json!({"line": x.line, "reason": x.reason.to_string()})).collect::<Vec<_>>(),
    })
}

fn baseline_command(cmd: BaselineCommand) -> Result<ExitCode> {
    use fedward_agent::baseline::{discover_sites, Baselines, Recipe};
    enum Which {
        Centralized,
        All,
        LocalOnly(Vec<String>),
    }
    let (args, which) = match cmd {
        BaselineCommand::Centralized { args } => (args, Which::Centralized),
        BaselineCommand::All { args } => (args, Which::All),
        BaselineCommand::LocalOnly { args, sites } => (args, Which::LocalOnly(sites)),
    };
    let sites = discover_sites(&args.data)?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get)).max(1);
    if threads > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle reads this at every matrix product. A product over one batch of a small
        // layer splits poorly across cores; whole batches per thread use them better. Set
        // here, before this command starts any thread.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let recipe = Recipe {
        base: args.base,
        labels: default_labels(),
        trainable: args.trainable,
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        max_seq_len: args.max_seq_len,
        seed: args.seed,
        device: args.device,
        threads,
    };
    let mut baselines = Baselines::new(recipe, &sites)?;
    if let Some(dir) = &args.save_models {
        baselines.save_models_to(dir);
    }
    let bar = spinner("training the baselines");
    let results = match which {
        Which::Centralized => vec![baselines.centralized(&sites)?],
        Which::All => baselines.all(&sites)?,
        Which::LocalOnly(only) => {
            if let Some(unknown) = only.iter().find(|n| !sites.iter().any(|s| &s.name == *n)) {
                anyhow::bail!("no site {unknown:?} in {}", args.data.display());
            }
            let chosen = sites.iter().filter(|s| only.is_empty() || only.contains(&s.name));
            chosen.map(|s| baselines.local_only(s)).collect::<Result<Vec<_>>>()?
        }
    };
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("pooled test split: {} notes", baselines.test_len());
        println!("{:<20} {:>8} {:>9} {:>9} {:>8}", "model", "train", "accuracy", "macro-F1", "seconds");
        for r in &results {
            println!("{:<20} {:>8} {:>9.4} {:>9.4} {:>8.1}", r.name, r.train_examples, r.test.accuracy, r.test.macro_f1, r.seconds);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    fedward_shared::cli::main(run)
}
