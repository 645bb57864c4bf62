//! Support for running the real `fedward-coordinator` binary as a process: a throwaway
//! consortium on disk (PKI, ledger keys, initial model, config), the process with its
//! memory readings, and a site that speaks the protocol by hand. Shared by the
//! coordinator's process-level tests and its transfer bench (which includes this file).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use fedward_net::{client_endpoint, read_message, write_message, write_tensors};
use fedward_shared::config::Transport;
use fedward_shared::pki::{self, CertifiedKey, Validity};
use fedward_shared::tensor::{Tensor, TensorSet};
use fedward_shared::tls::{self, TlsMaterial};
use fedward_shared::wire::{self, Hello, Message, PrivacyUsed, Ready, RoundOffer, SiteId, UpdateHeader};

pub const SERVER_NAME: &str = "coordinator.test";

/// A consortium written to a directory: its CA, the coordinator's certificate and ledger
/// keys, an initial model and a config enrolling `sites`.
pub struct Consortium {
    pub dir: tempfile::TempDir,
    pub ca: CertifiedKey,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl Consortium {
    /// `extra` is appended to the config (TOML tables of its own: `[aggregation]`, ...).
    /// Every site connects from 127.0.0.1, so the per-address handshake limit is raised to
    /// the number of sites when that is above the default.
    pub fn new(model: &TensorSet, trainable: &str, sites: &[String], min_sites: usize, rounds: u64, extra: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let validity = Validity::days_from(time::OffsetDateTime::now_utc(), 1);
        let ca = pki::create_ca("test", validity, [1; 16])?;
        let server = pki::issue_server(&ca, &[SERVER_NAME.to_owned()], &["127.0.0.1".parse()?], validity, [2; 16])?;
        let p = dir.path();
        std::fs::create_dir_all(p.join("pki"))?;
        std::fs::write(p.join("pki/ca.crt"), &ca.cert_pem)?;
        std::fs::write(p.join("pki/coordinator.crt"), &server.cert_pem)?;
        fedward_shared::fsutil::write_private_new(&p.join("pki/coordinator.key"), server.key_pem.as_bytes())?;
        // The ledger key, where the config's default looks for it (beside coordinator.key).
        fedward_shared::ledger_key::write_keypair(&p.join("pki"), [42; 32])?;
        std::fs::write(p.join("init.safetensors"), model.to_safetensors(None)?)?;
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let enrolled: String = sites.iter().map(|s| format!("[[sites]]\nid = \"{s}\"\n")).collect();
        let defaults = fedward_shared::config::Admission::default();
        let per_ip = defaults.max_handshakes_per_ip.max(sites.len());
        let max_handshakes = defaults.max_handshakes.max(per_ip);
        let config = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
state_dir = "state"
max_handshakes = {max_handshakes}
max_handshakes_per_ip = {per_ip}
[tls]
ca_cert = "pki/ca.crt"
cert = "pki/coordinator.crt"
key = "pki/coordinator.key"
[federation]
rounds = {rounds}
min_sites = {min_sites}
round_deadline = "10m"
max_concurrent_uploads = 1
[model]
init = "init.safetensors"
[training]
trainable = "{trainable}"
[privacy]
mode = "off"
{extra}
{enrolled}"#,
        );
        let path = p.join("coordinator.toml");
        std::fs::write(&path, config)?;
        Ok(Self { addr: format!("127.0.0.1:{port}").parse()?, config: path, ca, dir })
    }

    /// A site's TLS: a key made "at the site", a certificate signed by the CA.
    pub fn site_tls(&self, site: &str) -> Result<rustls::ClientConfig> {
        self.site_tls_with_serial(site, [3; 16])
    }

    /// A site's client config, its certificate carrying `serial`.
    pub fn site_tls_with_serial(&self, site: &str, serial: [u8; 16]) -> Result<rustls::ClientConfig> {
        Ok(self.site_tls_and_cert(site, serial)?.0)
    }

    /// A site's client config and its certificate (PEM).
    pub fn site_tls_and_cert(&self, site: &str, serial: [u8; 16]) -> Result<(rustls::ClientConfig, String)> {
        self.site_tls_valid(site, serial, Validity::days_from(time::OffsetDateTime::now_utc(), 1))
    }

    /// A site's client config and certificate, valid for `validity`.
    pub fn site_tls_valid(&self, site: &str, serial: [u8; 16], validity: Validity) -> Result<(rustls::ClientConfig, String)> {
        let id = SiteId::new(site).context("site id")?;
        let request = pki::site_request(&id)?;
        let cert = pki::sign_site_request(&self.ca, &request.csr_pem, &id, validity, serial)?;
        let tls = tls::client_config(&TlsMaterial {
            ca_pem: self.ca.cert_pem.as_bytes(),
            cert_pem: cert.as_bytes(),
            key_pem: request.key_pem.as_bytes(),
        })?;
        Ok((tls, cert))
    }

    /// A client whose certificate another CA signed: anyone on the net, to this
    /// consortium. It trusts the coordinator, so it gets as far as a handshake can.
    pub fn outsider_tls(&self) -> Result<rustls::ClientConfig> {
        let validity = Validity::days_from(time::OffsetDateTime::now_utc(), 1);
        let rogue = pki::create_ca("rogue", validity, [9; 16])?;
        let id = SiteId::new("outsider").context("site id")?;
        let request = pki::site_request(&id)?;
        let cert = pki::sign_site_request(&rogue, &request.csr_pem, &id, validity, [8; 16])?;
        Ok(tls::client_config(&TlsMaterial {
            ca_pem: self.ca.cert_pem.as_bytes(),
            cert_pem: cert.as_bytes(),
            key_pem: request.key_pem.as_bytes(),
        })?)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// The coordinator binary running `serve` on a consortium's config; killed on drop.
pub struct CoordinatorProcess {
    child: Child,
    pub pid: u32,
}

impl CoordinatorProcess {
    /// Starts it and waits until it says it listens.
    pub fn start(consortium: &Consortium) -> Result<Self> {
        Self::start_with(consortium, &[])
    }

    /// Starts `serve` with `args` added.
    pub fn start_with(consortium: &Consortium, args: &[&str]) -> Result<Self> {
        // Cargo builds the package's binary for its tests and benches and names it here.
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedward-coordinator"))
            .args(["serve", "--config"])
            .arg(&consortium.config)
            .args(args)
            .env("FEDWARD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let stderr = child.stderr.take().context("stderr")?;
        let me = Self { child, pid };
        // Wait for the coordinator to say it listens (or to stop, with what it said), then
        // keep draining its log.
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut said = Vec::new();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening for agents") {
                    let _ = up_tx.send(Ok(()));
                } else if said.len() < 20 {
                    said.push(line);
                }
            }
            let _ = up_tx.send(Err(said.join("\n")));
        });
        match up_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(())) => Ok(me),
            Ok(Err(said)) => bail!("the coordinator stopped before listening:\n{said}"),
            Err(_) => bail!("the coordinator did not start in time"),
        }
    }

    /// Resident memory now (`VmRSS`), or its peak (`VmHWM`), in KiB.
    pub fn rss_kib(&self, field: &str) -> u64 {
        rss_kib(self.pid, field).unwrap_or(0)
    }

    /// Waits for the process to exit on its own.
    pub fn wait(mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait()?)
    }

    /// Sends SIGTERM (what systemd and Kubernetes send) and waits for the exit.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let sent = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status()?;
        anyhow::ensure!(sent.success(), "kill -TERM failed");
        Ok(self.child.wait()?)
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// A model with all-MiniLM-L6-v2's word embeddings (30522 x 384, 47 MB: what a
/// coordinator holds in production), a pooler and the head that trains.
pub fn minilm_embedding_model() -> TensorSet {
    let mut m = TensorSet::new();
    let t = |shape: Vec<usize>| Tensor::new(shape.clone(), vec![0.01; shape.iter().product()]).expect("shape");
    m.insert("bert.embeddings.word_embeddings.weight", t(vec![30522, 384]));
    m.insert("bert.pooler.dense.weight", t(vec![384, 384]));
    m.insert("bert.pooler.dense.bias", t(vec![384]));
    m.insert("classifier.weight", t(vec![4, 384]));
    m.insert("classifier.bias", t(vec![4]));
    m
}

/// all-MiniLM-L6-v2's shapes: 22.7M parameters with a 4-label head.
pub fn minilm_shaped_model(rng: &mut impl rand::Rng) -> TensorSet {
    let (vocab, hidden, inter, layers) = (30522, 384, 1536, 6);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("bert.embeddings.word_embeddings.weight".into(), vec![vocab, hidden]),
        ("bert.embeddings.position_embeddings.weight".into(), vec![512, hidden]),
        ("bert.embeddings.token_type_embeddings.weight".into(), vec![2, hidden]),
        ("bert.embeddings.LayerNorm.weight".into(), vec![hidden]),
        ("bert.embeddings.LayerNorm.bias".into(), vec![hidden]),
        ("bert.pooler.dense.weight".into(), vec![hidden, hidden]),
        ("bert.pooler.dense.bias".into(), vec![hidden]),
        ("classifier.weight".into(), vec![4, hidden]),
        ("classifier.bias".into(), vec![4]),
    ];
    for l in 0..layers {
        let p = format!("bert.encoder.layer.{l}");
        for (n, s) in [
            ("attention.self.query.weight", vec![hidden, hidden]),
            ("attention.self.query.bias", vec![hidden]),
            ("attention.self.key.weight", vec![hidden, hidden]),
            ("attention.self.key.bias", vec![hidden]),
            ("attention.self.value.weight", vec![hidden, hidden]),
            ("attention.self.value.bias", vec![hidden]),
            ("attention.output.dense.weight", vec![hidden, hidden]),
            ("attention.output.dense.bias", vec![hidden]),
            ("attention.output.LayerNorm.weight", vec![hidden]),
            ("attention.output.LayerNorm.bias", vec![hidden]),
            ("intermediate.dense.weight", vec![inter, hidden]),
            ("intermediate.dense.bias", vec![inter]),
            ("output.dense.weight", vec![hidden, inter]),
            ("output.dense.bias", vec![hidden]),
            ("output.LayerNorm.weight", vec![hidden]),
            ("output.LayerNorm.bias", vec![hidden]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            (name, Tensor::new(shape, data).expect("shape"))
        })
        .collect()
}

/// A connection that has said hello, as `site` would.
pub struct HandSite {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// The privacy budget every hand-driven site declares in its hello.
pub const HAND_BUDGET: wire::DeclaredBudget = wire::DeclaredBudget { epsilon: 20.0, delta: 1e-5 };

impl HandSite {
    /// Connects with `tls` and says hello, retrying a refused handshake (a busy gate) until
    /// it gets in or `attempts` run out.
    pub async fn connect(addr: SocketAddr, tls: rustls::ClientConfig, attempts: u32) -> Result<Self> {
        let endpoint = client_endpoint(addr, tls, &Transport::default())?;
        let mut last = String::new();
        for _ in 0..attempts {
            match endpoint.connect(addr, SERVER_NAME)?.await {
                Ok(conn) => {
                    let me = Self { endpoint, conn };
                    let hello = Hello {
                        protocol_version: wire::PROTOCOL_VERSION,
                        software: "hand".into(),
                        capabilities: vec![],
                        budget: Some(HAND_BUDGET),
                    };
                    match me.request(&Message::Hello(hello)).await? {
                        Message::Welcome(_) => return Ok(me),
                        other => bail!("not welcomed: {other:?}"),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::task::yield_now().await;
        }
        bail!("could not connect in {attempts} attempts: {last}")
    }

    /// Connects with `tls` and says nothing yet: a peer that skips the hello.
    pub async fn connect_without_hello(addr: SocketAddr, tls: rustls::ClientConfig) -> Result<Self> {
        let endpoint = client_endpoint(addr, tls, &Transport::default())?;
        let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
        Ok(Self { endpoint, conn })
    }

    pub async fn request(&self, msg: &Message) -> Result<Message> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_message(&mut send, msg).await?;
        send.finish()?;
        Ok(read_message(&mut recv).await?)
    }

    /// Says ready and waits for the offer.
    pub async fn offer(&self) -> Result<RoundOffer> {
        match self.request(&Message::Ready(Ready { have_model: None })).await? {
            Message::RoundOffer(o) => Ok(o),
            other => bail!("expected an offer, got {other:?}"),
        }
    }

    /// Downloads the offer's whole model; returns it.
    pub async fn download(&self, offer: &RoundOffer) -> Result<TensorSet> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let names = offer.manifest.iter().map(|s| s.name.clone()).collect();
        write_message(&mut send, &Message::ModelRequest(wire::ModelRequest { round: offer.round, names })).await?;
        send.finish()?;
        let Message::Tensors(specs) = read_message(&mut recv).await? else { bail!("no tensors") };
        Ok(fedward_net::read_tensors(&mut recv, &specs).await?)
    }

    /// Sends `delta` as the round's update; returns the coordinator's answer.
    pub async fn send_update(&self, offer: &RoundOffer, delta: &TensorSet, num_examples: u64) -> Result<Message> {
        let specs = delta.specs();
        let header = UpdateHeader {
            score: None,
            round: offer.round,
            num_examples,
            metrics: None,
            tensors: specs.clone(),
            privacy: PrivacyUsed::off(),
            encoding: fedward_shared::codec::UpdateEncoding::F32,
        };
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_message(&mut send, &Message::Update(header)).await?;
        match read_message(&mut recv).await? {
            Message::Proceed(_) => {}
            refused => return Ok(refused),
        }
        write_tensors(&mut send, delta, &specs).await?;
        send.finish()?;
        Ok(read_message(&mut recv).await?)
    }
}

/// A delta of `value` for every tensor an update of `offer` carries.
pub fn delta_for(offer: &RoundOffer, value: f32) -> TensorSet {
    offer
        .trainable_specs()
        .map(|s| (s.name.clone(), Tensor::new(s.shape.clone(), vec![value; s.shape.iter().product()]).expect("shape")))
        .collect()
}
