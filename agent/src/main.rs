//! `fedward-agent`: the hospital's daemon and the site's tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::info;

use fedward_agent::daemon::{self, DaemonOptions, DaemonOutcome};
use fedward_shared::config::AgentConfig;
use fedward_shared::fsutil;
use fedward_shared::pki;
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::SiteId;

/// The fedward agent: trains the consortium's shared model on this hospital's notes.
///
/// No note ever leaves the hospital: the agent dials out to the coordinator (it opens no
/// inbound port), trains locally and sends only a clipped, noised weight update after
/// recording its privacy spend. Logs go to stderr; set FEDWARD_LOG (e.g. `info`, `debug`)
/// and FEDWARD_LOG_FORMAT=json for machine-readable logs.
#[derive(Parser)]
#[command(name = "fedward-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: connect to the coordinator and take part in rounds.
    Run {
        /// Agent config (TOML); relative paths inside are taken from its directory.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file (and that its files are readable) without connecting.
    CheckConfig {
        /// Agent config (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
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
        /// Compute device: auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Tokens per note after truncation.
        #[arg(long, default_value_t = 128)]
        max_seq_len: usize,
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
        /// Compute device: auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Tokens per note after truncation.
        #[arg(long, default_value_t = 128)]
        max_seq_len: usize,
    },
    /// Check privacy ledgers (chain, seals, recomputed epsilons) and write audit reports.
    #[command(subcommand)]
    Audit(fedward_shared::cli::AuditCommand),
    /// Plan differential privacy: the epsilon a plan spends, or the noise a target needs.
    #[command(subcommand)]
    Privacy(fedward_shared::cli::PrivacyCommand),
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

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e.downcast_ref::<fedward_shared::cli::CliError>().is_some_and(|c| c.is_usage());
            if usage || e.downcast_ref::<fedward_shared::config::ConfigError>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEDWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if std::env::var("FEDWARD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let cfg = load_config(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(run_daemon(cfg))
        }
        Command::CheckConfig { config } => {
            let cfg = load_config(&config)?;
            client_tls(&cfg)?;
            println!("config ok: {}", config.display());
            println!("  coordinator {} ({})", cfg.coordinator_addr, cfg.server_name);
            println!("  training data {}", cfg.train_data.display());
            println!(
                "  budget: epsilon <= {} at delta {}{}",
                cfg.budget.max_epsilon,
                cfg.budget.delta,
                cfg.budget.max_rounds.map(|r| format!(", at most {r} rounds")).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict { model, text, input, device, max_seq_len } => {
            let dev = fedward_models::train::device(&device)?;
            let (model, encoder) = fedward_models::io::load_dir(&model, None, 0, &dev)?;
            let texts = match (text, input) {
                (Some(t), _) => vec![t],
                (None, Some(path)) => fedward_models::text::read_texts_jsonl(&path)?,
                (None, None) => anyhow::bail!("give --text or --input"),
            };
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let probs = fedward_models::train::predict(&model, &encoder, &refs, max_seq_len)?;
            let mut out = std::io::stdout().lock();
            for p in probs {
                let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                let probabilities: serde_json::Map<String, serde_json::Value> =
                    model.labels.iter().zip(&p).map(|(l, v)| (l.clone(), serde_json::Value::from(*v))).collect();
                let line = serde_json::json!({"label": model.labels[best], "probabilities": probabilities});
                use std::io::Write;
                writeln!(out, "{line}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { checkpoint, base, labels, out } => {
            let labels = labels.unwrap_or_else(|| fedward_shared::config::DEFAULT_LABELS.iter().map(|s| (*s).to_owned()).collect());
            let (mut model, encoder) = fedward_models::io::load_dir(&base, Some(&labels), 0, &candle_core::Device::Cpu)?;
            let set = fedward_shared::tensor::TensorSet::from_safetensors(&fsutil::read(&checkpoint)?, false)
                .with_context(|| format!("reading {}", checkpoint.display()))?;
            model.load(&set).context("the checkpoint does not fit the base model")?;
            fedward_models::io::export_dir(&model, &encoder, &out)?;
            println!("exported {} to {} (model {})", checkpoint.display(), out.display(), set.digest().short());
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { model, data, json, device, max_seq_len } => {
            let dev = fedward_models::train::device(&device)?;
            let (model, encoder) = fedward_models::io::load_dir(&model, None, 0, &dev)?;
            let examples = fedward_models::text::read_jsonl(&data, &model.labels)?;
            let report = fedward_models::train::evaluate(&model, &encoder, &examples, max_seq_len)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
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
    }
}

fn load_config(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(AgentConfig::parse(&text, base).with_context(|| format!("invalid config {}", path.display()))?)
}

fn client_tls(cfg: &AgentConfig) -> Result<rustls::ClientConfig> {
    Ok(tls::client_config(&TlsMaterial {
        ca_pem: &fsutil::read(&cfg.tls.ca_cert)?,
        cert_pem: &fsutil::read(&cfg.tls.cert)?,
        key_pem: &fsutil::read_private_key(&cfg.tls.key)?,
    })
    .context("building the TLS configuration")?)
}

async fn run_daemon(cfg: AgentConfig) -> Result<ExitCode> {
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
        idle_timeout: Duration::from_secs(60),
        seed: None,
    };
    info!(coordinator = %cfg.coordinator_addr, "agent starting");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match daemon::run(opts, trainer, shutdown).await? {
        DaemonOutcome::Finished { completed_rounds, rounds_trained } => {
            info!(completed_rounds, rounds_trained, "done");
        }
        DaemonOutcome::Shutdown => info!("stopped"),
    }
    Ok(ExitCode::SUCCESS)
}
