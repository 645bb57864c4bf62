//! `fedward-coordinator`: the consortium's server and the admin's tools.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info, warn};

use fedward_coordinator::control::ControlState;
use fedward_coordinator::ledger::CoordinatorLedger;
use fedward_coordinator::round::{RoundMachine, SecureSettings, SelectionSettings, Settings};
use fedward_coordinator::server::{self, RunOutcome, ServerOptions, StatusView};
use fedward_coordinator::startup;
use fedward_coordinator::store::{load_initial_model, Store};
use fedward_shared::cli::{AuditCommand, ConfigFile, PrivacyCommand};
use fedward_shared::config::CoordinatorConfig;
use fedward_shared::fsutil;
use fedward_shared::ledger_key;
use fedward_shared::pki::{self, CertifiedKey, Validity};
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::SiteId;

/// The version `--version` prints; it says when crash points are built in (the chaos
/// suite checks, a release build never has them).
const VERSION: &str = if fedward_shared::failpoint::ENABLED {
    concat!(env!("CARGO_PKG_VERSION"), " (with crash points for the chaos suite)")
} else {
    env!("CARGO_PKG_VERSION")
};

/// The fedward coordinator: runs federated rounds for a hospital consortium.
///
/// Hospitals' agents dial in over QUIC with mutual TLS; the coordinator averages their
/// updates (FedAvg weighted by examples), checkpoints each round and redistributes the
/// global model. Logs go to stderr; set FEDWARD_LOG (e.g. `info`, `debug`) and
/// FEDWARD_LOG_FORMAT=json for machine-readable logs.
#[derive(Parser)]
#[command(name = "fedward-coordinator", version = VERSION, propagate_version = true)]
enum Command {
    /// Run the federation described by a config file.
    Serve {
        #[command(flatten)]
        file: ConfigFile,
        /// When state.json is lost beside checkpoints and a ledger, rebuild it from the
        /// newest checkpoint the ledger sealed; when the ledger lacks rounds state.json
        /// completed, go on past the gap (logged, and in the history). Without it the
        /// coordinator refuses to start on either, naming what is missing.
        #[arg(long)]
        recover: bool,
    },
    /// Check a config file and print what it would run, without binding anything.
    CheckConfig(ConfigFile),
    /// Show the rounds recorded in a state directory.
    Status {
        /// The coordinator's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage the consortium's certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Manage the key that signs the coordinator's ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Check privacy ledgers (chain, seals, recomputed epsilons) and write audit reports.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Plan differential privacy: the epsilon a plan spends, or the noise a target needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// Control a running coordinator through its admin endpoints (pause, resume, next
    /// round, enrol, suspend, revoke; status, ledger and audit log), and manage the tokens
    /// that grant that.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// How to reach the admin endpoints.
#[derive(clap::Args)]
struct AdminTarget {
    /// The admin endpoint: http://127.0.0.1:7080 on the coordinator's machine, or
    /// https://NAME:PORT elsewhere.
    #[arg(long, env = "FEDWARD_ADMIN_URL", default_value = "http://127.0.0.1:7080")]
    url: String,
    /// A file holding the caller's token (0600); or set FEDWARD_ADMIN_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The consortium CA, to check the coordinator's certificate on https:// URLs.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// The federation's phase, rounds and sites.
    Status(AdminTarget),
    /// Start no new round until `resume` (the open round goes on to its end; survives restarts).
    Pause(AdminTarget),
    /// Let rounds start again.
    Resume(AdminTarget),
    /// Start the next round now with the sites waiting (even while paused; the quorum still holds).
    NextRound(AdminTarget),
    /// Enrol a site (or lift its suspension) while the coordinator runs.
    Enrol {
        #[command(flatten)]
        target: AdminTarget,
        site: SiteId,
        /// Pin the site to this certificate (SHA-256, as `pki show` prints it).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Suspend a site: its connection is closed and it is refused until enrolled again.
    Suspend {
        #[command(flatten)]
        target: AdminTarget,
        site: SiteId,
    },
    /// Refuse one certificate (by serial) on this coordinator at once; also run `pki
    /// revoke` where the CA key is, for the signed CRL.
    Revoke {
        #[command(flatten)]
        target: AdminTarget,
        /// The certificate's serial, in hex (as `pki show` prints it).
        #[arg(long)]
        serial: String,
        /// Why, for the audit log: unspecified, key-compromise, superseded or cessation-of-operation.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print the coordinator's signed ledger (auditor role).
    Ledger(AdminTarget),
    /// Print the admin audit log: who did what, when (auditor role).
    Log(AdminTarget),
    /// Manage the tokens file the coordinator's `[admin] tokens` names.
    #[command(subcommand)]
    Token(fedward_shared::cli::TokenCommand),
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Generate the ledger's ed25519 signing key (ledger.key, 0600) and the public key
    /// auditors verify seals with (ledger.pub).
    Keygen {
        /// Directory to write ledger.key and ledger.pub into (the config's default looks
        /// for ledger.key beside the TLS key).
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the consortium CA and the coordinator's server certificate.
    Init {
        /// Directory to write ca.crt, ca.key, coordinator.crt, coordinator.key and the ledger
        /// keys (ledger.key, ledger.pub) into.
        #[arg(long)]
        dir: PathBuf,
        /// Consortium name, written into the CA certificate.
        #[arg(long, default_value = "fedward consortium")]
        consortium: String,
        /// DNS names the coordinator is reached at (repeatable).
        #[arg(long = "server-name", required = true)]
        server_names: Vec<String>,
        /// IP addresses the coordinator is reached at (repeatable).
        #[arg(long = "server-ip")]
        server_ips: Vec<IpAddr>,
        /// Validity of the CA in days.
        #[arg(long, default_value_t = 3650)]
        ca_days: u32,
        /// Validity of the server certificate in days.
        #[arg(long, default_value_t = 397)]
        days: u32,
    },
    /// Sign a site's certificate signing request (made with `fedward-agent pki request`).
    Sign {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The site's request file.
        #[arg(long)]
        csr: PathBuf,
        /// The site id the request must name (as enrolled in the config).
        #[arg(long)]
        site: SiteId,
        /// Where to write the signed certificate.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days: short, because agents renew over their connection before
        /// expiry (`[renewal]` at the coordinator).
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Issue a new server certificate for the coordinator (rotation before the old one
    /// expires, or a new name): writes coordinator.crt and coordinator.key into --out-dir,
    /// which must not hold them yet. Put them where `[tls] cert` and `key` point and send
    /// the coordinator SIGHUP: new connections get the new certificate, live ones go on.
    Server {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write coordinator.crt and coordinator.key.
        #[arg(long)]
        out_dir: PathBuf,
        /// DNS names the coordinator is reached at (repeatable).
        #[arg(long = "server-name", required = true)]
        server_names: Vec<String>,
        /// IP addresses the coordinator is reached at (repeatable).
        #[arg(long = "server-ip")]
        server_ips: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 397)]
        days: u32,
    },
    /// Revoke a site's certificates (`--site`: every one `pki sign` issued to it) or one
    /// certificate (`--serial`), and write the CA's revocation list, crl.pem, beside
    /// ca.crt. Name it in the coordinator's `[tls] crl`; it is read at start (and on
    /// SIGHUP). The CA key signs the list, so run it where ca.key is.
    Revoke {
        /// Directory holding ca.crt and ca.key (and issued.jsonl, revoked.json).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Revoke every certificate issued to this site.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        site: Option<SiteId>,
        /// Revoke the certificate with this serial (as `pki show` prints it).
        #[arg(long)]
        serial: Option<String>,
        /// Why: unspecified, key-compromise, superseded or cessation-of-operation.
        #[arg(long, default_value = "unspecified", value_parser = clap::builder::PossibleValuesParser::new(pki::REVOCATION_REASONS))]
        reason: String,
    },
    /// Issue a new online issuing CA (rotation before the old one expires, or after its
    /// key was exposed): writes issuing.crt and issuing.key into --out-dir. Run where the
    /// root key is; install them where `[renewal]` points and restart the coordinator.
    /// Certificates the old one issued stay valid until they expire (both chain to the root).
    Issuing {
        /// Directory holding ca.crt and ca.key (the root).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write issuing.crt and issuing.key (the key 0600; it must not exist yet).
        #[arg(long)]
        out_dir: PathBuf,
        /// The consortium's name, in the issuing CA's subject.
        #[arg(long, default_value = "fedward consortium")]
        consortium: String,
        /// Validity in days.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// List the certificate renewals waiting for approval (`[renewal] approval = true`).
    Pending(ConfigFile),
    /// Approve a site's waiting renewal: the issuing CA signs it, and the agent collects the
    /// certificate the next time it asks (within minutes).
    Approve {
        #[command(flatten)]
        file: ConfigFile,
        /// The site whose waiting renewal to sign (as `pki pending` lists it).
        #[arg(long)]
        site: SiteId,
    },
    /// Print a certificate's subject, names, issuer and validity.
    Show {
        /// A PEM certificate.
        cert: PathBuf,
    },
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Serve { file, recover } => {
            tokio::runtime::Runtime::new()?.block_on(serve(load_config(&file.config)?, file.config.clone(), recover))
        }
        Command::CheckConfig(ConfigFile { config }) => check_config(&config),
        Command::Status { state_dir, json } => {
            let store = Store::open(&state_dir)?;
            let Some(state) = store.state() else { bail!("{} holds no coordinator state", state_dir.display()) };
            if json {
                println!("{}", serde_json::to_string_pretty(state)?);
            } else {
                println!("completed rounds: {}  model: {}", state.completed_rounds, state.model_digest);
                println!("{:>5}  {:<28} {:>5} {:>9} {:>10} {:>8}", "round", "outcome", "sites", "examples", "mean loss", "seconds");
                for r in &state.history {
                    println!(
                        "{:>5}  {:<28} {:>5} {:>9} {:>10} {:>8.1}",
                        r.round,
                        r.outcome.chars().take(28).collect::<String>(),
                        r.sites.len(),
                        r.sites.iter().map(|s| s.num_examples).sum::<u64>(),
                        r.mean_train_loss.map_or("-".into(), |l| format!("{l:.4}")),
                        r.duration_secs
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(cmd) => pki_command(cmd).map(|()| ExitCode::SUCCESS),
        Command::Ledger(LedgerCommand::Keygen { dir }) => {
            ledger_keygen(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(cmd) => {
            let passed = fedward_shared::cli::run_audit(&cmd, now(), &mut std::io::stdout().lock())?;
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Privacy(cmd) => {
            fedward_shared::cli::run_privacy(&cmd, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::Token(cmd)) => {
            fedward_shared::cli::run_token(&cmd, &mut std::io::stdout(), &mut std::io::stderr())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(cmd) => tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(admin_command(cmd)),
    }
}

fn read_tokens(path: &Path) -> Result<fedward_shared::access::Tokens> {
    fedward_shared::access::Tokens::load(path).map_err(anyhow::Error::msg)
}

/// The root CA (certificate and its offline key) in `ca_dir`.
fn read_ca(ca_dir: &Path) -> Result<CertifiedKey> {
    Ok(CertifiedKey {
        cert_pem: String::from_utf8(fsutil::read(&ca_dir.join("ca.crt"))?)?,
        key_pem: String::from_utf8(fsutil::read_private_key(&ca_dir.join("ca.key"))?)?,
    })
}

async fn admin_command(cmd: AdminCommand) -> Result<ExitCode> {
    let (target, path, body) = match cmd {
        AdminCommand::Status(t) => (t, "/api/status".to_owned(), None),
        AdminCommand::Pause(t) => (t, "/api/control/pause".to_owned(), Some(serde_json::json!({}))),
        AdminCommand::Resume(t) => (t, "/api/control/resume".to_owned(), Some(serde_json::json!({}))),
        AdminCommand::NextRound(t) => (t, "/api/control/next-round".to_owned(), Some(serde_json::json!({}))),
        AdminCommand::Enrol { target, site, fingerprint } => {
            (target, format!("/api/sites/{site}/enrol"), Some(serde_json::json!({ "fingerprint": fingerprint })))
        }
        AdminCommand::Suspend { target, site } => (target, format!("/api/sites/{site}/suspend"), Some(serde_json::json!({}))),
        AdminCommand::Revoke { target, serial, reason } => {
            (target, "/api/revocations".to_owned(), Some(serde_json::json!({ "serial": serial, "reason": reason })))
        }
        AdminCommand::Ledger(t) => (t, "/api/ledger".to_owned(), None),
        AdminCommand::Log(t) => (t, "/api/admin-log".to_owned(), None),
        AdminCommand::Token(_) => unreachable!("handled without a runtime"),
    };
    let token = match (&target.token_file, std::env::var("FEDWARD_ADMIN_TOKEN")) {
        (Some(f), _) => Some(String::from_utf8(fsutil::read_private_key(f)?)?.trim().to_owned()),
        (None, Ok(t)) => Some(t),
        (None, Err(_)) => None,
    };
    let ca = target.ca_cert.as_ref().map(|p| fsutil::read(p)).transpose()?;
    let client = fedward_coordinator::admin_client::AdminClient::new(&target.url, token, ca.as_deref())?;
    let answer = client.call(&path, body).await?;
    print!("{}", answer.body);
    if (200..300).contains(&answer.status) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: the coordinator answered {}", answer.status);
        Ok(ExitCode::FAILURE)
    }
}

/// Writes a fresh ledger key pair (seeded from the OS) into `dir`.
/// Checks the config and every file it names, as `serve` would use them: the TLS
/// material (parses, the key is the certificate's, the certificate chains to the CA as a
/// server's and is valid now), the ledger key, and the model (the state directory's current
/// checkpoint, verified, or else the initial model, loaded). What fails is a
/// configuration error (64).
fn check_config(path: &Path) -> Result<ExitCode> {
    let cfg = load_config(path)?;
    let bad = |field: &'static str| move |e: anyhow::Error| anyhow::Error::from(fedward_shared::cli::setting_error(field, e.as_ref()));
    let read = |p: &Path, field| fsutil::read(p).map_err(|e| bad(field)(e.into()));
    let files = fedward_shared::cli::TlsFiles::read(&cfg.tls)?;
    let m = files.material();
    let crl = cfg.tls.crl.as_ref().map(|p| read(p, "tls.crl")).transpose()?;
    tls::server_config(&m, crl.as_deref()).map_err(|e| bad(if crl.is_some() { "tls.crl" } else { "tls" })(e.into()))?;
    let cert_pem = String::from_utf8_lossy(&files.cert_pem);
    let name = pki::pem_to_der(&cert_pem).and_then(|der| pki::cert_info(&der)).map_err(|e| bad("tls.cert")(e.into()))?.dns_names;
    let name = name.first().ok_or_else(|| bad("tls.cert")(anyhow::anyhow!("the certificate names no server")))?;
    tls::check_certificate(&m, tls::Role::Coordinator { server_name: name }, rustls::pki_types::UnixTime::now())
        .map_err(|e| bad("tls.cert")(e.into()))?;
    ledger_key::read_signing_key(&cfg.ledger_key).context(LEDGER_KEY_HINT).map_err(bad("ledger.signing_key"))?;
    let admin = match &cfg.admin_tokens {
        Some(path) => {
            let tokens = read_tokens(path).map_err(bad("admin.tokens"))?;
            format!("{} token holders in {}", tokens.holders().len(), path.display())
        }
        None => "no authentication (loopback only)".to_owned(),
    };
    let store = Store::open(&cfg.state_dir).map_err(|e| bad("server.state_dir")(e.into()))?;
    let model = match store.current().map_err(|e| bad("server.state_dir")(e.into()))? {
        Some((manifest, completed)) => format!("state after round {completed} verified ({} tensors)", manifest.len()),
        None => {
            let m = load_initial_model(&cfg.model_init, cfg.labels.len(), cfg.init_seed).map_err(|e| bad("model.init")(e.into()))?;
            format!("initial model {} loads ({} parameters)", cfg.model_init.display(), m.element_count())
        }
    };
    println!("config ok: {}", path.display());
    println!("  certificate for {name} chains to {} and is valid now; the key is its own", cfg.tls.ca_cert.display());
    println!("  {model}");
    println!(
        "  listen {} (admin {:?}, {}, {admin}), state in {}",
        cfg.listen,
        cfg.admin_listen,
        if cfg.admin_https { "https" } else { "http" },
        cfg.state_dir.display()
    );
    println!("  {} rounds, quorum {} of {} sites, deadline {:?}", cfg.rounds, cfg.min_sites, cfg.sites.len(), cfg.round_deadline);
    println!(
        "  trains {} with {} (learning rate {}), privacy {}",
        cfg.plan.trainable,
        cfg.plan.optimizer,
        cfg.plan.learning_rate,
        cfg.plan.privacy.mode_name()
    );
    println!("  ledger {} signed with {}", cfg.ledger_file.display(), cfg.ledger_key.display());
    let a = &cfg.aggregation;
    println!(
        "  aggregation {}, weights {:?} (at most {} examples a site), update norm bound {} ({:?} above it)",
        a.method,
        a.weighting,
        a.max_examples_per_site,
        a.max_update_norm.map_or("from the privacy plan".to_owned(), |b| b.to_string()),
        a.over_norm
    );
    println!(
        "  server optimizer {} (state: {}x the trainable tensors, beside each checkpoint); FedProx mu {}",
        a.server_optimizer,
        a.server_optimizer.moments(),
        cfg.plan.prox_mu
    );
    Ok(ExitCode::SUCCESS)
}

fn ledger_keygen(dir: &Path) -> Result<()> {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let (private, public) = ledger_key::write_keypair(dir, seed)?;
    println!("  {:<15} signs the coordinator's ledger (0600; keep it with coordinator.key)", private.display());
    println!("  {:<15} give to auditors: `audit verify --public-key {}`", public.display(), public.display());
    Ok(())
}

fn load_config(path: &Path) -> Result<CoordinatorConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    CoordinatorConfig::parse(&text, base).with_context(|| format!("invalid config {}", path.display()))
}

/// The TLS configuration (with the revocation list) and the revoked serials, as the
/// config's files say now.
fn load_tls(cfg: &CoordinatorConfig) -> Result<(rustls::ServerConfig, std::collections::BTreeSet<Vec<u8>>)> {
    let crl = cfg.tls.crl.as_ref().map(|p| fsutil::read(p)).transpose()?;
    let tls_cfg = tls::server_config(
        &TlsMaterial {
            ca_pem: &fsutil::read(&cfg.tls.ca_cert)?,
            cert_pem: &fsutil::read(&cfg.tls.cert)?,
            key_pem: &fsutil::read_private_key(&cfg.tls.key)?,
        },
        crl.as_deref(),
    )
    .context("building the TLS configuration")?;
    let revoked = match &crl {
        Some(pem) => pki::crl_serials(pem).context("reading the revocation list")?.into_iter().collect(),
        None => Default::default(),
    };
    Ok((tls_cfg, revoked))
}

/// The sites the config pins to one certificate.
fn pins(cfg: &CoordinatorConfig) -> std::collections::BTreeMap<SiteId, [u8; 32]> {
    cfg.sites.iter().filter_map(|s| Some((s.id.clone(), s.fingerprint?))).collect()
}

/// The access rules the config file, its TLS files and the admin's changes
/// (`control.json`) say now.
fn build_access(cfg: &CoordinatorConfig) -> Result<server::Access> {
    let control = ControlState::load(&cfg.state_dir)?;
    let (tls_cfg, mut revoked) = load_tls(cfg)?;
    revoked.extend(control.revoked_serials().map_err(anyhow::Error::msg)?);
    let quic = fedward_net::server_config(tls_cfg, &cfg.transport, &cfg.admission)?;
    Ok(server::Access { quic, enrolled: control.enrolled(cfg.sites.iter().map(|s| s.id.clone())), revoked, pins: control.pins(pins(cfg)) })
}

/// On SIGHUP, and when an admin changed the enrolment through the admin endpoints: the
/// config file read again, its TLS files (the coordinator's certificate and key, the CA,
/// the revocation list), its enrolment and the admin's changes handed to the running
/// server; nothing else in it changes while the coordinator runs. A config that does not
/// load is logged (and answered to the admin) and the rules in force stay.
fn spawn_reloader(
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    mut requests: tokio::sync::mpsc::Receiver<fedward_coordinator::admin::ReloadRequest>,
    tx: tokio::sync::mpsc::Sender<server::Access>,
) {
    tokio::spawn(async move {
        loop {
            let reply = tokio::select! {
                Some(()) = hup.recv() => {
                    info!(config = %path.display(), "SIGHUP: reloading the enrolled sites and the revocation list");
                    None
                }
                Some(reply) = requests.recv() => Some(reply),
                else => break,
            };
            let access = load_config(&path).and_then(|cfg| build_access(&cfg));
            let result = match access {
                Ok(a) => {
                    if tx.send(a).await.is_err() {
                        break;
                    }
                    Ok(())
                }
                Err(e) => {
                    error!(cause = %format!("{e:#}"), "reload failed; the access rules in force stay");
                    Err(format!("the coordinator could not reload its access rules: {e:#}"))
                }
            };
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
    });
}

async fn serve(cfg: CoordinatorConfig, config_path: PathBuf, recover: bool) -> Result<ExitCode> {
    let shutdown = fedward_net::shutdown_signal();
    // Installed before anything slow: SIGHUP's default action would end the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (tls_cfg, crl_serials) = load_tls(&cfg)?;

    let ledger_key = ledger_key::read_signing_key(&cfg.ledger_key).context(LEDGER_KEY_HINT)?;
    // For auditors on the admin endpoints; the key itself goes to the ledger.
    let ledger_public_key = ledger_key::format_public_key(&ledger_key.verifying_key());
    let mut store = Store::open_exclusive(&cfg.state_dir)?;
    // Verified (chain and every seal) before anything is appended.
    let ledger = CoordinatorLedger::open(&cfg.ledger_file, ledger_key)
        .with_context(|| format!("opening the ledger {}", cfg.ledger_file.display()))?;
    // state.json, the checkpoints and the ledger must agree; only the manifest stays in
    // memory (checkpoints are read tensor by tensor).
    let opened = startup::open(&mut store, &ledger, recover, &server::now_rfc3339(), || {
        load_initial_model(&cfg.model_init, cfg.labels.len(), cfg.init_seed)
    });
    let (manifest, completed) = match opened {
        Err(startup::StartupError::Inconsistent(e)) => {
            error!(cause = %e, "the state directory and the ledger disagree; not serving");
            eprintln!("error: {e}");
            return Ok(ExitCode::from(fedward_shared::cli::EXIT_STATE_INCONSISTENT));
        }
        other => other?,
    };
    info!(completed, state_dir = %cfg.state_dir.display(), "state checked against the ledger");
    let mut plan = cfg.plan.clone();
    plan.trainable_tensors = plan.trainable.select(manifest.iter().map(|s| s.name.as_str()));
    let trainable_params: usize =
        manifest.iter().filter(|s| plan.trainable_tensors.contains(&s.name)).map(|s| fedward_shared::tensor::element_count(&s.shape)).sum();
    info!(
        trainable = %plan.trainable,
        tensors = plan.trainable_tensors.len(),
        parameters = trainable_params,
        update_mib = format_args!("{:.1}", trainable_params as f64 * 4.0 / (1 << 20) as f64),
        prox_mu = plan.prox_mu,
        "training plan"
    );
    // The optimiser's moments are in memory only while a checkpoint is written, beside the
    // round's combined update: (1 + moments) x the trainable tensors then.
    let optimizer = cfg.aggregation.server_optimizer;
    info!(
        server_optimizer = %optimizer,
        state_mib = format_args!("{:.1}", (optimizer.moments() * trainable_params) as f64 * 4.0 / (1 << 20) as f64),
        "server optimizer"
    );
    if optimizer.moments() > 0 && completed > 0 && !store.optimizer_state_path(completed).exists() {
        warn!(round = completed, "no server optimizer state beside the current checkpoint: it starts afresh at the next round");
    }
    let control = ControlState::load(&cfg.state_dir)?;
    // Secure aggregation: sites' signed keys must chain to the consortium CA.
    let secure = match &cfg.secure {
        Some(sa) => {
            let ca_pem = std::fs::read(&cfg.tls.ca_cert).with_context(|| format!("reading {}", cfg.tls.ca_cert.display()))?;
            let trust = fedward_shared::secagg::Trust::from_ca_pem(&ca_pem).context("the CA certificate for secure aggregation")?;
            info!(
                threshold = sa.params.threshold,
                min_sites = sa.params.min_sites,
                neighbours = sa.params.neighbours,
                modulus_bits = sa.params.modulus_bits,
                "secure aggregation: the coordinator learns only each round's sum"
            );
            Some(SecureSettings { params: sa.params, step_deadline: sa.step_deadline, trust })
        }
        None => None,
    };
    let settings = Settings {
        total_rounds: cfg.rounds,
        min_sites: cfg.min_sites,
        round_deadline: cfg.round_deadline,
        max_attempts: 3,
        max_update_bytes: cfg.max_update_bytes,
        plan,
        policy: cfg.policy,
        aggregation: cfg.aggregation,
        enrolled: control.enrolled(cfg.sites.iter().map(|s| s.id.clone())),
        secure,
        selection: cfg
            .selection
            .map(|s| SelectionSettings { noise_multiplier: s.noise_multiplier, candidates: fedward_coordinator::store::KEEP_CHECKPOINTS }),
    };
    // Each site's declared spend is held to what this ledger accepted from it; the scores
    // of models made before a restart are in the saved history.
    let machine =
        RoundMachine::new(settings, manifest, completed)?.with_accepted(ledger.accepted())?.with_scores(startup::saved_scores(&store));
    info!(
        method = %cfg.aggregation.method,
        update_bound = machine.update_bound(),
        over_norm = ?cfg.aggregation.over_norm,
        weighting = ?cfg.aggregation.weighting,
        max_examples_per_site = cfg.aggregation.max_examples_per_site,
        "every update is held to the coordinator's own bounds"
    );
    let reset_secret = store.reset_secret()?;
    let endpoint = fedward_net::server_endpoint(cfg.listen, tls_cfg, &cfg.transport, &cfg.admission, &reset_secret)
        .with_context(|| format!("binding {}", cfg.listen))?;
    // What the admin endpoints show until the server publishes its own view.
    let starting = StatusView {
        phase: "starting".to_owned(),
        paused: control.paused,
        completed_rounds: machine.completed_rounds(),
        total_rounds: cfg.rounds,
        enrolled: machine.settings().enrolled.iter().map(ToString::to_string).collect(),
        model_digest: machine.model_digest().to_hex(),
        ..StatusView::default()
    };
    let (status_tx, status_rx) = watch::channel(starting);
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(8);
    let (reload_requests_tx, reload_requests_rx) = tokio::sync::mpsc::channel(8);
    if let Some(addr) = cfg.admin_listen {
        let tls = if cfg.admin_https {
            let files = fedward_shared::cli::TlsFiles::read(&cfg.tls)?;
            Some(std::sync::Arc::new(tls::admin_server_config(&files.cert_pem, &files.key_pem)?))
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        if let Some(tokens) = &cfg.admin_tokens {
            let holders = read_tokens(tokens).context("the admin tokens file ([admin] tokens)")?;
            info!(holders = holders.holders().len(), tokens = %tokens.display(), "admin endpoints need a token");
        } else {
            tracing::warn!(%addr, "the admin endpoints are unauthenticated (loopback only): anyone on this machine may control the federation");
        }
        let options = fedward_coordinator::admin::AdminOptions {
            addr,
            tokens: cfg.admin_tokens.clone(),
            tls,
            state_dir: cfg.state_dir.clone(),
            ledger_file: cfg.ledger_file.clone(),
            ledger_public_key,
            limits: Default::default(),
        };
        let links = fedward_coordinator::admin::AdminLinks { status: status_rx, commands: commands_tx, reload: reload_requests_tx };
        let bound =
            fedward_coordinator::admin::serve(options, links).await.with_context(|| format!("binding the admin endpoint {addr}"))?;
        info!(addr = %bound, "admin dashboard at {scheme}://{bound}/");
    }
    // Last: tests and scripts take this line as "ready", admin endpoint included.
    info!(addr = %endpoint.local_addr()?, sites = cfg.sites.len(), "listening for agents (QUIC, mutual TLS)");
    let options = ServerOptions {
        max_concurrent_uploads: cfg.max_concurrent_uploads,
        max_concurrent_downloads: cfg.max_concurrent_downloads,
        finish_grace: Duration::from_secs(30),
        transport: cfg.transport,
        admission: cfg.admission,
        pins: control.pins(pins(&cfg)),
        // The CRL's too: a certificate the issuing CA renewed is not the root CRL's to check.
        revoked: crl_serials.into_iter().chain(control.revoked_serials().map_err(anyhow::Error::msg)?).collect(),
        paused: control.paused,
        renewal: match &cfg.renewal {
            Some(r) => Some(std::sync::Arc::new(
                fedward_coordinator::renewal::Issuer::load(r, &cfg.state_dir).context("the issuing CA ([renewal])")?,
            )),
            None => None,
        },
    };
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    spawn_reloader(hup, config_path, reload_requests_rx, reload_tx);
    let controls = server::Controls { status: status_tx, shutdown, reload: reload_rx, commands: commands_rx };
    match server::run(endpoint, machine, store, ledger, options, controls).await? {
        RunOutcome::Completed { rounds } => {
            info!(rounds, "federation completed");
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::Interrupted { completed } => {
            info!(completed, "stopped; restart with the same state directory to resume");
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::Stopped { reason } => {
            // Restarting cannot help (the shipped units do not restart on this status); the
            // reason is also in state.json's history.
            error!(%reason, "federation stopped");
            eprintln!("error: federation stopped: {reason}");
            Ok(ExitCode::from(fedward_shared::cli::EXIT_FEDERATION_STOPPED))
        }
    }
}

const LEDGER_KEY_HINT: &str =
    "reading the ledger signing key (create it with `fedward-coordinator ledger keygen --dir DIR`, or set [ledger] signing_key)";

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// In the CA directory: what `pki sign` issued, what `pki revoke` revoked, and the CRL.
const ISSUED_FILE: &str = "issued.jsonl";
const REVOKED_FILE: &str = "revoked.json";
const CRL_FILE: &str = "crl.pem";
/// The next-update date a CRL announces (for other verifiers; the coordinator keeps using
/// an overdue list).
const CRL_NEXT_UPDATE_DAYS: u32 = 30;

fn pki_command(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init { dir, consortium, server_names, server_ips, ca_days, days } => {
            let ca = pki::create_ca(&consortium, Validity::days_from(now(), ca_days), pki::random_serial())?;
            let issuing = pki::create_issuing_ca(&ca, &consortium, Validity::days_from(now(), ca_days.min(730)), pki::random_serial())?;
            let server = pki::issue_server(&ca, &server_names, &server_ips, Validity::days_from(now(), days), pki::random_serial())?;
            fsutil::write_private_new(&dir.join("ca.key"), ca.key_pem.as_bytes())?;
            fsutil::write_public_new(&dir.join("ca.crt"), ca.cert_pem.as_bytes())?;
            fsutil::write_private_new(&dir.join("issuing.key"), issuing.key_pem.as_bytes())?;
            fsutil::write_public_new(&dir.join("issuing.crt"), issuing.cert_pem.as_bytes())?;
            fsutil::write_private_new(&dir.join("coordinator.key"), server.key_pem.as_bytes())?;
            fsutil::write_public_new(&dir.join("coordinator.crt"), server.cert_pem.as_bytes())?;
            println!("created the consortium CA and the coordinator certificate in {}", dir.display());
            println!("  ca.crt          give to every site (public)");
            println!("  ca.key          the root: keep offline; signs first site certificates and issuing CAs (0600)");
            println!("  issuing.*       the online issuing CA: put on the coordinator for [renewal] (sites renew by themselves)");
            println!("  coordinator.*   the coordinator's TLS identity for {}", server_names.join(", "));
            ledger_keygen(&dir)
        }
        PkiCommand::Issuing { ca_dir, out_dir, consortium, days } => {
            let ca = read_ca(&ca_dir)?;
            let issuing = pki::create_issuing_ca(&ca, &consortium, Validity::days_from(now(), days), pki::random_serial())?;
            fsutil::write_private_new(&out_dir.join("issuing.key"), issuing.key_pem.as_bytes())?;
            fsutil::write_public_new(&out_dir.join("issuing.crt"), issuing.cert_pem.as_bytes())?;
            println!(
                "issued a new issuing CA in {} (valid {days} days); install it where [renewal] points and restart the coordinator",
                out_dir.display()
            );
            Ok(())
        }
        PkiCommand::Pending(ConfigFile { config }) => {
            let cfg = load_config(&config)?;
            let renewal = cfg.renewal.as_ref().context("the config has no [renewal] section: this coordinator renews nothing")?;
            let issuer = fedward_coordinator::renewal::Issuer::load(renewal, &cfg.state_dir)?;
            let pending = issuer.pending()?;
            if pending.is_empty() {
                println!("no renewal is waiting");
            }
            for (site, csr) in pending {
                let names = pki::request_site_names(&csr).unwrap_or_default();
                let key = pki::request_public_key(&csr).map(|k| pki::format_fingerprint(&pki::fingerprint(&k))).unwrap_or_default();
                println!("{site}: names {}; public key sha256 {key}", names.join(", "));
            }
            Ok(())
        }
        PkiCommand::Approve { file, site } => {
            let cfg = load_config(&file.config)?;
            let renewal = cfg.renewal.as_ref().context("the config has no [renewal] section: this coordinator renews nothing")?;
            let issuer = fedward_coordinator::renewal::Issuer::load(renewal, &cfg.state_dir)?;
            let chain = issuer.approve(&site, now())?;
            let info = pki::cert_info(&pki::pem_to_der(&chain)?)?;
            println!("approved: site {site} gets certificate {} (valid to {}) at its next request", info.serial_hex, info.not_after);
            Ok(())
        }
        PkiCommand::Sign { ca_dir, csr, site, out, days } => {
            let ca = read_ca(&ca_dir)?;
            let csr_pem = String::from_utf8(fsutil::read(&csr)?)?;
            let cert = pki::sign_site_request(&ca, &csr_pem, &site, Validity::days_from(now(), days), pki::random_serial())
                .with_context(|| format!("signing {}", csr.display()))?;
            fsutil::write_public_new(&out, cert.as_bytes())?;
            // The CA's own register of what it signed, for `pki revoke --site`.
            let info = pki::cert_info(&pki::pem_to_der(&cert)?)?;
            let issued = pki::IssuedCert { site: site.to_string(), serial: info.serial_hex, not_after: info.not_after.to_string() };
            fsutil::append_line(&ca_dir.join(ISSUED_FILE), &serde_json::to_string(&issued)?)?;
            println!("signed a certificate for site {site}: {} (valid {days} days)", out.display());
            println!("enrol the site in the coordinator config with:\n\n[[sites]]\nid = \"{site}\"\n");
            Ok(())
        }
        PkiCommand::Server { ca_dir, out_dir, server_names, server_ips, days } => {
            let ca = read_ca(&ca_dir)?;
            let server = pki::issue_server(&ca, &server_names, &server_ips, Validity::days_from(now(), days), pki::random_serial())?;
            fsutil::write_private_new(&out_dir.join("coordinator.key"), server.key_pem.as_bytes())?;
            fsutil::write_public_new(&out_dir.join("coordinator.crt"), server.cert_pem.as_bytes())?;
            println!(
                "issued a coordinator certificate for {} in {} (valid {days} days); install it and send the coordinator SIGHUP",
                server_names.join(", "),
                out_dir.display()
            );
            Ok(())
        }
        PkiCommand::Revoke { ca_dir, site, serial, reason } => {
            let ca = read_ca(&ca_dir)?;
            let revoked_path = ca_dir.join(REVOKED_FILE);
            let mut revoked: Vec<pki::RevokedCert> = match fsutil::read(&revoked_path) {
                Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", revoked_path.display()))?,
                Err(_) if !revoked_path.exists() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let serials: Vec<(String, Option<String>)> = match (&site, serial) {
                (Some(site), _) => {
                    let issued_path = ca_dir.join(ISSUED_FILE);
                    let text = String::from_utf8(fsutil::read(&issued_path).with_context(|| {
                        format!("{} lists what `pki sign` issued; without it revoke by --serial", issued_path.display())
                    })?)?;
                    let mine: Vec<(String, Option<String>)> = text
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(serde_json::from_str::<pki::IssuedCert>)
                        .collect::<Result<Vec<_>, _>>()
                        .with_context(|| format!("reading {}", issued_path.display()))?
                        .into_iter()
                        .filter(|c| c.site == site.as_str())
                        .map(|c| (c.serial, Some(c.site)))
                        .collect();
                    anyhow::ensure!(!mine.is_empty(), "{} lists no certificate for site {site}", issued_path.display());
                    mine
                }
                (None, Some(serial)) => {
                    pki::serial_bytes(&serial)?;
                    vec![(serial, None)]
                }
                (None, None) => unreachable!("clap requires --site or --serial"),
            };
            let at = fedward_coordinator::server::now_rfc3339();
            let mut added = 0;
            for (serial, site) in serials {
                if revoked.iter().any(|r| pki::serial_bytes(&r.serial).ok() == pki::serial_bytes(&serial).ok()) {
                    println!("already revoked: {serial}");
                    continue;
                }
                println!("revoked {serial}{}", site.as_deref().map(|s| format!(" (site {s})")).unwrap_or_default());
                revoked.push(pki::RevokedCert { serial, site, revoked_at: at.clone(), reason: reason.clone() });
                added += 1;
            }
            // The list only grows, so its length numbers it.
            let crl = pki::build_crl(&ca, &revoked, revoked.len() as u64, now(), CRL_NEXT_UPDATE_DAYS)?;
            fsutil::atomic_write(&revoked_path, &serde_json::to_vec_pretty(&revoked)?, false)?;
            fsutil::atomic_write(&ca_dir.join(CRL_FILE), crl.as_bytes(), false)?;
            println!(
                "{added} newly revoked, {} in all; wrote {}: copy it to the coordinator's `[tls] crl` path",
                revoked.len(),
                ca_dir.join(CRL_FILE).display()
            );
            Ok(())
        }
        PkiCommand::Show { cert } => {
            let pem = String::from_utf8(fsutil::read(&cert)?)?;
            let info = pki::cert_info(&pki::pem_to_der(&pem)?)?;
            println!("subject:    {}", info.subject);
            println!("issuer:     {}", info.issuer);
            println!("names:      {}", info.dns_names.join(", "));
            println!("valid from: {}", info.not_before);
            println!("valid to:   {}", info.not_after);
            println!("serial:     {}", info.serial_hex);
            println!("sha256:     {}", pki::format_fingerprint(&pki::fingerprint(&pki::pem_to_der(&pem)?)));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    fedward_shared::cli::main(run)
}
