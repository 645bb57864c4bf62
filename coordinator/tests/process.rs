//! The coordinator as an operator runs it (issue 18): one process per state directory,
//! leftovers of interrupted writes cleared at start, SIGTERM as a clean stop, and nothing
//! served before a valid hello, a revoked certificate refused, and enrolment and
//! revocation reloaded on SIGHUP while the federation runs, and a site pinned to one
//! certificate; a connection closed when its certificate expires; the coordinator's own
//! certificate rotated on SIGHUP.

mod support;

use anyhow::{Context, Result};

use support::{minilm_embedding_model, Consortium, CoordinatorProcess};

fn consortium() -> Result<Consortium> {
    let sites = vec!["alpha".to_owned()];
    Consortium::new(&minilm_embedding_model(), "head", &sites, 1, 1, "[aggregation]\nmax_update_norm = 10.0\n")
}

#[test]
fn a_second_coordinator_on_the_same_state_directory_fails_at_once() -> Result<()> {
    let c = consortium()?;
    let _first = CoordinatorProcess::start(&c)?;
    let second = CoordinatorProcess::start(&c).err().expect("the second coordinator must not start");
    let said = format!("{second:#}");
    assert!(said.contains("state directory") && said.contains("in use by another fedward process (pid"), "{said}");
    Ok(())
}

#[test]
fn sigterm_stops_the_coordinator_cleanly_and_leftovers_are_cleared_at_start() -> Result<()> {
    let c = consortium()?;
    // What a crash in the middle of a checkpoint write leaves behind.
    let checkpoints = c.state_dir().join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;
    let leftover = checkpoints.join(".round-00003.safetensors.tmp-4242");
    std::fs::write(&leftover, vec![0u8; 1 << 20])?;
    let coordinator = CoordinatorProcess::start(&c)?;
    assert!(!leftover.exists(), "the leftover temp file is removed at start");
    let status = coordinator.terminate()?;
    assert!(status.success(), "SIGTERM is a clean stop, exit 0: {status}");
    // And the state directory is free again.
    drop(CoordinatorProcess::start(&c)?);
    Ok(())
}

/// The consortium's CA directory, with the CA key the `pki` commands need written into it.
fn ca_dir(c: &Consortium) -> Result<String> {
    let dir = c.dir.path().join("pki");
    fedward_shared::fsutil::write_private_new(&dir.join("ca.key"), c.ca.key_pem.as_bytes())?;
    Ok(dir.to_str().context("utf-8 path")?.to_owned())
}

/// `fedward-coordinator ARGS`, which must succeed: its standard output.
fn cli(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedward-coordinator")).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn check_config(c: &Consortium) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fedward-coordinator"))
        .args(["check-config", "--config"])
        .arg(&c.config)
        .output()
        .unwrap()
}

/// check-config said "config ok" with the initial model or the certificate missing.
#[test]
fn check_config_checks_every_file_it_names() -> Result<()> {
    let c = consortium()?;
    let out = check_config(&c);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("initial model"));
    let refused = |out: std::process::Output, field: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(&format!("error: {field}:")), "{field}: {stderr}");
    };
    let init = c.dir.path().join("init.safetensors");
    let model = std::fs::read(&init)?;
    std::fs::remove_file(&init)?;
    refused(check_config(&c), "model.init");
    std::fs::write(&init, model)?;
    // A CA file that did not issue the coordinator's certificate.
    let validity = fedward_shared::pki::Validity::days_from(time::OffsetDateTime::now_utc(), 1);
    let other = fedward_shared::pki::create_ca("elsewhere", validity, [7; 16])?;
    std::fs::write(c.dir.path().join("pki/ca.crt"), other.cert_pem)?;
    refused(check_config(&c), "tls.cert");
    std::fs::remove_file(c.dir.path().join("pki/ca.crt"))?;
    refused(check_config(&c), "tls.ca_cert");
    Ok(())
}

/// Losing state.json restarted the federation at round 0, and a ledger that lost its last
/// round went unnoticed. Now both stop the coordinator, naming what is missing, and
/// `--recover` rebuilds state.json from the newest checkpoint the ledger sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_file_or_ledger_tail_stops_the_coordinator_until_recovery() -> Result<()> {
    let sites = vec!["alpha".to_owned()];
    let c = Consortium::new(&minilm_embedding_model(), "head", &sites, 1, 3, "[aggregation]\nmax_update_norm = 10.0\n")?;
    let coordinator = CoordinatorProcess::start(&c)?;
    let alpha = support::HandSite::connect(c.addr, c.site_tls("alpha")?, 1000).await?;
    for value in [0.01, 0.02] {
        let offer = alpha.offer().await?;
        let answer = alpha.send_update(&offer, &support::delta_for(&offer, value), 100).await?;
        assert!(matches!(answer, fedward_shared::wire::Message::Ack(_)), "{answer:?}");
    }
    // Round 3's offer comes once round 2 is checkpointed and sealed.
    alpha.offer().await?;
    drop(alpha);
    assert!(coordinator.terminate()?.success());

    let state_file = c.state_dir().join(fedward_shared::history::STATE_FILE);
    std::fs::remove_file(&state_file)?;
    let said = format!("{:#}", CoordinatorProcess::start(&c).err().expect("no start without state.json"));
    assert!(said.contains("state.json is missing") && said.contains("--recover"), "{said}");
    let recovered = CoordinatorProcess::start_with(&c, &["--recover"])?;
    assert!(recovered.terminate()?.success());
    let state: fedward_shared::history::SavedState = serde_json::from_slice(&std::fs::read(&state_file)?)?;
    assert_eq!(state.completed_rounds, 2);
    assert!(state.history[0].outcome.starts_with("recovered"), "{:?}", state.history);

    // The ledger loses its last round (its accepted entry and its seal).
    let ledger = c.state_dir().join("ledger.jsonl");
    let text = std::fs::read_to_string(&ledger)?;
    let first_seal = text.lines().position(|l| l.contains("\"seal\"")).expect("round 1 sealed");
    let kept: String = text.lines().take(first_seal + 1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&ledger, kept)?;
    let said = format!("{:#}", CoordinatorProcess::start(&c).err().expect("no start with the ledger's tail lost"));
    assert!(said.contains("the ledger lacks round(s) [2]"), "{said}");
    Ok(())
}

/// A restarted coordinator answers its predecessor's connections with a stateless reset
/// (the reset key persists in the state directory): a site learns of the restart on its
/// next packet, not after its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resets_old_connections_at_once() -> Result<()> {
    let c = consortium()?;
    let first = CoordinatorProcess::start(&c)?;
    let site = support::HandSite::connect(c.addr, c.site_tls("alpha")?, 1).await?;
    // SIGKILL: no goodbye reaches the site.
    drop(first);
    let _second = CoordinatorProcess::start(&c)?;
    let ready = fedward_shared::wire::Message::Ready(fedward_shared::wire::Ready { have_model: None });
    assert!(site.request(&ready).await.is_err());
    assert!(matches!(site.conn.close_reason(), Some(quinn::ConnectionError::Reset)), "{:?}", site.conn.close_reason());
    Ok(())
}

#[tokio::test]
async fn nothing_is_served_before_a_valid_hello() -> Result<()> {
    use fedward_shared::wire::{self, Hello, Message, Ready, RejectCode};
    let c = consortium()?;
    let _coordinator = CoordinatorProcess::start(&c)?;
    let site = support::HandSite::connect_without_hello(c.addr, c.site_tls("alpha")?).await?;
    let refused = |m: Message, code: RejectCode, says: &str| match m {
        Message::Reject(r) => assert!(r.code == code && r.message.contains(says), "{r}"),
        other => panic!("expected a reject, got {other:?}"),
    };
    refused(site.request(&Message::Ready(Ready { have_model: None })).await?, RejectCode::Malformed, "Hello first");
    let hello =
        |software: String| Message::Hello(Hello { protocol_version: wire::PROTOCOL_VERSION, software, capabilities: vec![], budget: None });
    refused(site.request(&hello("x".repeat(10_000))).await?, RejectCode::Malformed, "at most 64");
    refused(site.request(&hello("agent\nforged log line".into())).await?, RejectCode::Malformed, "control characters");
    refused(site.request(&Message::Ready(Ready { have_model: None })).await?, RejectCode::Malformed, "Hello first");
    assert!(matches!(site.request(&hello("fedward-agent 0.1.0".into())).await?, Message::Welcome(_)));
    assert!(matches!(site.request(&Message::Ready(Ready { have_model: None })).await?, Message::RoundOffer(_)));
    Ok(())
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_at_the_handshake() -> Result<()> {
    let sites = vec!["alpha".to_owned(), "beta".to_owned()];
    let c = Consortium::new(&minilm_embedding_model(), "head", &sites, 1, 1, "[aggregation]\nmax_update_norm = 10.0\n")?;
    // Alpha's certificate carries serial 0x0505..., beta's 0x0606...: revoke alpha's.
    cli(&["pki", "revoke", "--ca-dir", &ca_dir(&c)?, "--serial", &"05".repeat(16), "--reason", "key-compromise"])?;
    let config = std::fs::read_to_string(&c.config)?;
    std::fs::write(&c.config, config.replace("key = \"pki/coordinator.key\"", "key = \"pki/coordinator.key\"\ncrl = \"pki/crl.pem\""))?;
    let _coordinator = CoordinatorProcess::start(&c)?;
    let refused = support::HandSite::connect(c.addr, c.site_tls_with_serial("alpha", [5; 16])?, 1).await.err().expect("alpha is revoked");
    assert!(format!("{refused:#}").to_lowercase().contains("revoked"), "{refused:#}");
    support::HandSite::connect(c.addr, c.site_tls_with_serial("beta", [6; 16])?, 1).await?;
    Ok(())
}

#[test]
fn revoking_a_site_revokes_every_certificate_signed_for_it() -> Result<()> {
    use fedward_shared::pki;
    let c = consortium()?;
    let dir = &ca_dir(&c)?;
    let pki_dir = std::path::Path::new(dir);
    let mut serials = Vec::new();
    for (site, n) in [("gamma", 1), ("gamma", 2), ("delta", 1)] {
        let request = pki::site_request(&fedward_shared::wire::SiteId::new(site)?)?;
        let csr = pki_dir.join(format!("{site}-{n}.csr"));
        let crt = pki_dir.join(format!("{site}-{n}.crt"));
        std::fs::write(&csr, &request.csr_pem)?;
        cli(&[
            "pki",
            "sign",
            "--ca-dir",
            dir,
            "--csr",
            csr.to_str().expect("utf-8"),
            "--site",
            site,
            "--out",
            crt.to_str().expect("utf-8"),
        ])?;
        serials.push((site, pki::cert_info(&pki::pem_to_der(&std::fs::read_to_string(&crt)?)?)?.serial_hex));
    }
    let said = cli(&["pki", "revoke", "--ca-dir", dir, "--site", "gamma"])?;
    assert!(said.contains("2 newly revoked, 2 in all"), "{said}");
    let revoked: Vec<pki::RevokedCert> = serde_json::from_slice(&std::fs::read(pki_dir.join("revoked.json"))?)?;
    let listed: Vec<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
    let gamma: Vec<&str> = serials.iter().filter(|(s, _)| *s == "gamma").map(|(_, x)| x.as_str()).collect();
    assert_eq!(listed, gamma);
    assert!(std::fs::read_to_string(pki_dir.join("crl.pem"))?.contains("BEGIN X509 CRL"));
    // Again: nothing new, and the list stays as it was.
    assert!(cli(&["pki", "revoke", "--ca-dir", dir, "--site", "gamma"])?.contains("0 newly revoked, 2 in all"));
    Ok(())
}

/// What a live connection was closed with, waiting at most a minute (a bound on a hang,
/// not a synchronisation: the close is what is awaited).
async fn closed_with(site: &support::HandSite) -> String {
    let closed = tokio::time::timeout(std::time::Duration::from_secs(60), site.conn.closed()).await.expect("the connection is closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
        other => panic!("closed otherwise: {other}"),
    }
}

#[tokio::test]
async fn sighup_reloads_enrolment_and_revocation_without_disturbing_the_others() -> Result<()> {
    use fedward_shared::wire::{Message, Ready};
    let sites = vec!["alpha".to_owned(), "beta".to_owned(), "gamma".to_owned()];
    // Three sites must be ready for a round: none starts, the connections stay up.
    let c = Consortium::new(&minilm_embedding_model(), "head", &sites, 3, 1, "[aggregation]\nmax_update_norm = 10.0\n")?;
    let dir = ca_dir(&c)?;
    let config = std::fs::read_to_string(&c.config)?;
    // Delta is not enrolled yet.
    let coordinator = CoordinatorProcess::start(&c)?;
    let alpha = support::HandSite::connect(c.addr, c.site_tls_with_serial("alpha", [5; 16])?, 1).await?;
    let beta = support::HandSite::connect(c.addr, c.site_tls_with_serial("beta", [6; 16])?, 1).await?;
    let gamma = support::HandSite::connect(c.addr, c.site_tls_with_serial("gamma", [7; 16])?, 1).await?;
    let delta_tls = c.site_tls_with_serial("delta", [8; 16])?;
    assert!(support::HandSite::connect(c.addr, delta_tls.clone(), 1).await.is_err(), "delta is not enrolled yet");
    let hup = || -> Result<()> {
        anyhow::ensure!(std::process::Command::new("kill").args(["-HUP", &coordinator.pid.to_string()]).status()?.success());
        Ok(())
    };

    // Alpha's certificate is revoked, beta leaves the consortium, delta joins: one reload.
    cli(&["pki", "revoke", "--ca-dir", &dir, "--serial", &"05".repeat(16)])?;
    let reloaded = config
        .replace("key = \"pki/coordinator.key\"", "key = \"pki/coordinator.key\"\ncrl = \"pki/crl.pem\"")
        .replace("[[sites]]\nid = \"beta\"\n", "")
        + "\n[[sites]]\nid = \"delta\"\n";
    std::fs::write(&c.config, reloaded)?;
    hup()?;
    let (alpha_said, beta_said) = tokio::join!(closed_with(&alpha), closed_with(&beta));
    assert!(alpha_said.contains("revoked"), "{alpha_said}");
    assert!(beta_said.contains("no longer enrolled"), "{beta_said}");
    // Gamma is undisturbed, delta gets in, and both are served.
    let delta = support::HandSite::connect(c.addr, delta_tls, 1).await?;
    for site in [&gamma, &delta] {
        let reply =
            tokio::time::timeout(std::time::Duration::from_millis(200), site.request(&Message::Ready(Ready { have_model: None }))).await;
        // Not enough sites for a round: the ready stays pending, which is a served request
        // on a live connection (a closed one fails at once).
        assert!(reply.is_err(), "expected a pending ready, got {reply:?}");
        assert!(site.conn.close_reason().is_none());
    }
    // Alpha cannot come back with the revoked certificate.
    let again = support::HandSite::connect(c.addr, c.site_tls_with_serial("alpha", [5; 16])?, 1).await.err().expect("revoked");
    assert!(format!("{again:#}").to_lowercase().contains("revoked"), "{again:#}");
    Ok(())
}

#[tokio::test]
async fn a_pinned_site_is_only_its_pinned_certificate() -> Result<()> {
    use fedward_shared::pki;
    let c = consortium()?;
    let (pinned_tls, pinned_cert) = c.site_tls_and_cert("alpha", [5; 16])?;
    let fingerprint = pki::format_fingerprint(&pki::fingerprint(&pki::pem_to_der(&pinned_cert)?));
    let config = std::fs::read_to_string(&c.config)?;
    let pinned = config.replace("[[sites]]\nid = \"alpha\"\n", &format!("[[sites]]\nid = \"alpha\"\nfingerprint = \"{fingerprint}\"\n"));
    assert_ne!(pinned, config);
    std::fs::write(&c.config, pinned)?;
    let _coordinator = CoordinatorProcess::start(&c)?;
    // Another certificate the CA signed for alpha (a second key, say a stolen CSR signed).
    let other = support::HandSite::connect(c.addr, c.site_tls_with_serial("alpha", [6; 16])?, 1).await.err().expect("not the pinned one");
    assert!(format!("{other:#}").contains("pinned to the certificate"), "{other:#}");
    support::HandSite::connect(c.addr, pinned_tls, 1).await?;
    Ok(())
}

#[tokio::test]
async fn a_connection_is_closed_when_its_certificate_expires() -> Result<()> {
    let c = consortium()?;
    let _coordinator = CoordinatorProcess::start(&c)?;
    let now = time::OffsetDateTime::now_utc();
    let brief = fedward_shared::pki::Validity { not_before: now - time::Duration::hours(1), not_after: now + time::Duration::seconds(5) };
    let site = support::HandSite::connect(c.addr, c.site_tls_valid("alpha", [5; 16], brief)?.0, 1).await?;
    let said = closed_with(&site).await;
    assert!(said.contains("certificate expired"), "{said}");
    Ok(())
}

/// The serial of the certificate the coordinator presented on `site`'s connection.
fn served_serial(site: &support::HandSite) -> Result<String> {
    let certs = site
        .conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .context("no server certificate")?;
    Ok(fedward_shared::pki::cert_info(certs.first().context("empty chain")?.as_ref())?.serial_hex)
}

#[tokio::test]
async fn the_coordinators_certificate_is_rotated_on_sighup_without_a_restart() -> Result<()> {
    use fedward_shared::pki;
    let sites = vec!["alpha".to_owned(), "beta".to_owned()];
    let c = Consortium::new(&minilm_embedding_model(), "head", &sites, 2, 1, "[aggregation]\nmax_update_norm = 10.0\n")?;
    let dir = ca_dir(&c)?;
    let pki_dir = std::path::Path::new(&dir);
    let coordinator = CoordinatorProcess::start(&c)?;
    let alpha = support::HandSite::connect(c.addr, c.site_tls("alpha")?, 1).await?;
    let old = served_serial(&alpha)?;
    let next_dir = format!("{dir}/next");
    cli(&["pki", "server", "--ca-dir", &dir, "--out-dir", &next_dir, "--server-name", support::SERVER_NAME, "--server-ip", "127.0.0.1"])?;
    let next = pki::cert_info(&pki::pem_to_der(&std::fs::read_to_string(pki_dir.join("next/coordinator.crt"))?)?)?.serial_hex;
    std::fs::rename(pki_dir.join("next/coordinator.crt"), pki_dir.join("coordinator.crt"))?;
    std::fs::rename(pki_dir.join("next/coordinator.key"), pki_dir.join("coordinator.key"))?;
    assert!(std::process::Command::new("kill").args(["-HUP", &coordinator.pid.to_string()]).status()?.success());
    // The reload is asynchronous: new connections until one is served the new certificate.
    let mut served = old.clone();
    for _ in 0..200 {
        let beta = support::HandSite::connect(c.addr, c.site_tls("beta")?, 1).await?;
        served = served_serial(&beta)?;
        beta.conn.close(0u32.into(), b"probe done");
        if served == next {
            break;
        }
    }
    assert_eq!(served, next, "the new certificate is served (the old one was {old})");
    assert!(alpha.conn.close_reason().is_none(), "the live connection goes on");
    Ok(())
}

/// `fedward-coordinator admin ARGS` against `url`: whether it succeeded, and what it
/// printed (standard output, then standard error).
fn admin(url: &str, ca: &str, token_file: Option<&std::path::Path>, args: &[&str]) -> Result<(bool, String)> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fedward-coordinator"));
    cmd.arg("admin").args(args).args(["--url", url, "--ca-cert", ca]).env_remove("FEDWARD_ADMIN_TOKEN");
    if let Some(f) = token_file {
        cmd.arg("--token-file").arg(f);
    }
    let out = cmd.output()?;
    Ok((out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))))
}

/// Issue 19, item 4: the admin endpoints over HTTPS with tokens; an auditor reads the ledger
/// and the status and cannot control; an admin pauses, starts a round by hand and suspends
/// a site while the federation runs; every control request is in the chained audit log.
#[tokio::test]
async fn admin_tokens_and_roles_control_a_running_federation() -> Result<()> {
    use fedward_shared::wire::{Message, Ready};
    let sites = vec!["alpha".to_owned(), "beta".to_owned()];
    let c = Consortium::new(&minilm_embedding_model(), "head", &sites, 1, 3, "[aggregation]\nmax_update_norm = 10.0\n")?;
    let p = c.dir.path();
    let tokens = p.join("admin-tokens");
    let tokens_arg = tokens.to_str().context("utf-8")?;
    let mut token_files = Vec::new();
    for (name, role) in [("alice", "admin"), ("audit-office", "auditor")] {
        let token = cli(&["admin", "token", "add", "--tokens", tokens_arg, "--name", name, "--role", role])?;
        let file = p.join(format!("{name}.token"));
        fedward_shared::fsutil::write_private_new(&file, token.trim().as_bytes())?;
        token_files.push(file);
    }
    assert!(!std::fs::read_to_string(&tokens)?.contains(std::fs::read_to_string(&token_files[0])?.trim()), "only hashes are kept");
    let wrong = p.join("wrong.token");
    fedward_shared::fsutil::write_private_new(&wrong, b"fwt_00000000")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = std::fs::read_to_string(&c.config)?.replace("[server]\n", &format!("[server]\nadmin_listen = \"127.0.0.1:{port}\"\n"))
        + &format!("\n[admin]\ntokens = \"{tokens_arg}\"\nhttps = true\n");
    std::fs::write(&c.config, config)?;
    let coordinator = CoordinatorProcess::start(&c)?;
    let url = format!("https://127.0.0.1:{port}");
    let ca = p.join("pki/ca.crt");
    let ca = ca.to_str().context("utf-8")?;
    let (alice, auditor) = (Some(token_files[0].as_path()), Some(token_files[1].as_path()));

    // No token, a wrong one, or the clear-text port: refused.
    let (ok, said) = admin(&url, ca, None, &["status"])?;
    assert!(!ok && said.contains("401"), "{said}");
    let (ok, said) = admin(&url, ca, Some(&wrong), &["status"])?;
    assert!(!ok && said.contains("unknown token"), "{said}");
    assert!(!admin(&format!("http://127.0.0.1:{port}"), ca, alice, &["status"])?.0, "no clear text on an HTTPS port");
    // The auditor reads, and cannot pause.
    let (ok, said) = admin(&url, ca, auditor, &["status"])?;
    assert!(ok && said.contains("\"enrolled\""), "{said}");
    assert!(admin(&url, ca, auditor, &["ledger"])?.0);
    let (ok, said) = admin(&url, ca, auditor, &["pause"])?;
    assert!(!ok && said.contains("403") && said.contains("auditor"), "{said}");

    // The admin pauses: a ready site waits although the quorum (1) is there.
    let (ok, said) = admin(&url, ca, alice, &["pause"])?;
    assert!(ok && said.contains("paused"), "{said}");
    let alpha = support::HandSite::connect(c.addr, c.site_tls("alpha")?, 1).await?;
    let beta = support::HandSite::connect(c.addr, c.site_tls("beta")?, 1).await?;
    let ready = async { alpha.request(&Message::Ready(Ready { have_model: None })).await };
    tokio::pin!(ready);
    assert!(tokio::time::timeout(std::time::Duration::from_millis(300), &mut ready).await.is_err(), "paused: no offer");
    // One round by hand: the pending ready gets its offer.
    let (ok, said) = admin(&url, ca, alice, &["next-round"])?;
    assert!(ok && said.contains("round 1 started"), "{said}");
    assert!(matches!(ready.await?, Message::RoundOffer(o) if o.round.0 == 1));
    // Beta is suspended while the round runs: its connection is closed, alpha's goes on.
    let (ok, said) = admin(&url, ca, alice, &["suspend", "beta"])?;
    assert!(ok && said.contains("suspended"), "{said}");
    assert!(closed_with(&beta).await.contains("no longer enrolled"));
    assert!(alpha.conn.close_reason().is_none());
    let status = admin(&url, ca, auditor, &["status"])?.1;
    assert!(status.contains("\"paused\":true") && !status.contains("\"beta\""), "{status}");

    // The log: the auditor's refused pause and the admin's three actions, chained.
    let (ok, log) = admin(&url, ca, auditor, &["log"])?;
    assert!(ok);
    assert_eq!(fedward_shared::access::verify_chain(&log)?.0, 7, "{log}");
    assert!(log.contains("\"who\":\"audit-office\"") && log.contains("refused: needs the admin role"), "{log}");
    for action in ["\"pause\"", "\"nextround\"", "\"suspend\""] {
        assert!(log.contains(action), "{action}: {log}");
    }
    // The pause outlives a restart.
    alpha.conn.close(0u32.into(), b"test done");
    assert!(coordinator.terminate()?.success());
    let _again = CoordinatorProcess::start(&c)?;
    let status = admin(&url, ca, auditor, &["status"])?.1;
    assert!(status.contains("\"paused\":true"), "{status}");
    Ok(())
}

/// Issue 19, item 3: with `[renewal] approval = true` a site's request waits until an admin
/// approves it (`pki pending`, `pki approve`), then the same request collects the
/// certificate; a coordinator without an issuing CA says so.
#[tokio::test]
async fn a_renewal_waits_for_the_admins_approval() -> Result<()> {
    use fedward_shared::pki;
    use fedward_shared::wire::{Message, RejectCode, RenewRequest, Renewed, SiteId};
    let c = consortium()?;
    let p = c.dir.path();
    let alpha = SiteId::new("alpha")?;
    let request = pki::site_request(&alpha)?;
    let renew = Message::Renew(RenewRequest { csr_pem: request.csr_pem.clone() });
    {
        let _plain = CoordinatorProcess::start(&c)?;
        let site = support::HandSite::connect(c.addr, c.site_tls("alpha")?, 1).await?;
        let answer = site.request(&renew).await?;
        assert!(matches!(&answer, Message::Reject(r) if r.code == RejectCode::RenewalUnavailable), "{answer:?}");
    }
    let now = time::OffsetDateTime::now_utc();
    let issuing = pki::create_issuing_ca(&c.ca, "test", pki::Validity::days_from(now, 2), [9; 16])?;
    std::fs::write(p.join("pki/issuing.crt"), &issuing.cert_pem)?;
    fedward_shared::fsutil::write_private_new(&p.join("pki/issuing.key"), issuing.key_pem.as_bytes())?;
    let config = std::fs::read_to_string(&c.config)?
        + "\n[renewal]\nissuing_cert = \"pki/issuing.crt\"\nissuing_key = \"pki/issuing.key\"\napproval = true\n";
    std::fs::write(&c.config, config)?;
    let config_arg = c.config.to_str().context("utf-8")?;
    let _coordinator = CoordinatorProcess::start(&c)?;
    let site = support::HandSite::connect(c.addr, c.site_tls("alpha")?, 1).await?;
    assert_eq!(site.request(&renew).await?, Message::Renewed(Renewed { chain_pem: None }));
    let pending = cli(&["pki", "pending", "--config", config_arg])?;
    assert!(pending.starts_with("alpha: names alpha"), "{pending}");
    let approved = cli(&["pki", "approve", "--config", config_arg, "--site", "alpha"])?;
    assert!(approved.contains("approved"), "{approved}");
    let Message::Renewed(Renewed { chain_pem: Some(chain) }) = site.request(&renew).await? else { panic!("no certificate") };
    let leaf = pki::pem_to_der(&chain)?;
    assert_eq!(pki::cert_public_key(&leaf)?, pki::request_public_key(&request.csr_pem)?);
    assert!(cli(&["pki", "pending", "--config", config_arg])?.contains("no renewal is waiting"));
    Ok(())
}
