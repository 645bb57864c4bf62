//! The admin dashboard in a real browser (issue 22): the coordinator binary runs two rounds
//! with three hand-driven sites (site-level DP declared, validation accuracy shared, one
//! site declining round 2 for its budget), then headless Chromium, driven over WebDriver
//! (raw HTTP to `chromedriver`), opens the dashboard with an auditor's token; the test reads
//! the rendered DOM (the sites table, the rounds chart, the privacy chart, the round
//! history, the countdown) and saves a screenshot under `target/tmp/`. Before the browser,
//! `GET /metrics` (Prometheus) must show the same federation.
//!
//! Without `chromium` and `chromedriver` on the PATH the test says so and skips (`.ci/run`
//! installs both); with `FEDWARD_REQUIRE_BROWSER=1` it fails instead.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use fedward_net::{read_message, write_message, write_tensors};
use fedward_shared::access::{Role, Tokens};
use fedward_shared::dp::{Accountant, Release};
use fedward_shared::plan::PrivacyMode;
use fedward_shared::wire::{Decline, DeclineReason, LocalMetrics, Message, PrivacyUsed, RoundOffer, UpdateHeader};

use support::{delta_for, minilm_embedding_model, Consortium, CoordinatorProcess, HandSite, HAND_BUDGET};

const TOKEN: &str = "fwt_dashboard_viewer_token";
const DELTA: f64 = 1e-5;
const SIGMA: f64 = 1.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_federation_in_a_real_browser() -> Result<()> {
    // Three sites, two needed; three rounds so that the coordinator is still serving (round
    // 3 open) when the browser looks.
    let names: Vec<String> = ["alpha", "beta", "gamma"].map(String::from).to_vec();
    let c = Consortium::new(
        &minilm_embedding_model(),
        "head",
        &names,
        2,
        3,
        "[aggregation]\nmax_update_norm = 10.0\n[admin]\ntokens = \"admin-tokens\"\n",
    )?;
    let mut tokens = Tokens::default();
    tokens.add("dashboard-viewer", Role::Auditor, TOKEN)?;
    fedward_shared::fsutil::write_private_new(&c.dir.path().join("admin-tokens"), tokens.render().as_bytes())?;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = std::fs::read_to_string(&c.config)?;
    std::fs::write(&c.config, config.replacen("[server]\n", &format!("[server]\nadmin_listen = \"127.0.0.1:{admin_port}\"\n"), 1))?;
    let _coordinator = CoordinatorProcess::start(&c)?;

    let mut sites = Vec::new();
    for name in &names {
        sites.push((HandSite::connect(c.addr, c.site_tls(name)?, 1000).await?, Accountant::new()));
    }
    // Round 1: everyone; round 2: gamma declines for its budget.
    for round in 1..=2u64 {
        let offers = futures_all(sites.iter().map(|(s, _)| s.offer())).await?;
        assert!(offers.iter().all(|o| o.round.0 == round), "{offers:?}");
        let mut answers = Vec::new();
        for (i, ((site, accountant), offer)) in sites.iter_mut().zip(&offers).enumerate() {
            let answer = if round == 2 && i == 2 {
                site.request(&Message::Decline(Decline { round: offer.round, reason: DeclineReason::BudgetExhausted })).await?
            } else {
                send_update(site, accountant, offer, 0.01 * (i + 1) as f32, 0.6 + 0.1 * round as f64).await?
            };
            answers.push(answer);
        }
        for a in &answers {
            assert!(matches!(a, Message::Ack(_)), "round {round}: {a:?}");
        }
    }
    // Round 3 opens for alpha and beta (its deadline is what the countdown shows).
    let offers = futures_all(sites[..2].iter().map(|(s, _)| s.offer())).await?;
    assert_eq!(offers[0].round.0, 3);
    let spent: Vec<f64> = sites.iter().map(|(_, a)| a.epsilon(DELTA)).collect::<Result<_, _>>()?;

    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;

    // Prometheus's view of the same federation (no browser needed).
    let metrics = tokio::task::spawn_blocking(move || scrape(admin)).await??;
    for line in [
        "fedward_coordinator_rounds{outcome=\"completed\"} 2",
        "fedward_coordinator_completed_rounds 2",
        "fedward_coordinator_total_rounds 3",
        "fedward_coordinator_sites_connected 3",
        "fedward_coordinator_updates_accepted_total 5",
        "fedward_coordinator_ledger_updates{site=\"gamma\"} 1",
        "fedward_coordinator_phase_seconds_count{phase=\"checkpoint\"} 2",
        "fedward_coordinator_phase_seconds_count{phase=\"upload\"} 5",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    let alpha: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fedward_coordinator_epsilon_spent{site=\"alpha\"} "))
        .context("alpha's epsilon")?
        .parse()?;
    assert!((alpha - spent[0]).abs() < 1e-9, "{alpha} vs {}", spent[0]);

    let Some(browser) = Browser::find()? else { return Ok(()) };
    let page = tokio::task::spawn_blocking(move || browser.look(admin)).await??;

    // The header: phase, completed rounds, the countdown (the page's script ran).
    assert_eq!(page["title"], "fedward coordinator", "{page:#}");
    assert_eq!(page["phase"], "collecting updates", "{page:#}");
    assert_eq!(page["completed"], "2", "{page:#}");
    let left = page["timeLeft"].as_str().context("time left")?;
    assert!(left.ends_with('s') && left.contains('m'), "{left}");

    // The sites table: every site, connected, what the ledger accepted, gamma's budget.
    let rows = page["sites"].as_array().context("sites")?;
    let listed: Vec<&str> = rows.iter().filter_map(|r| r["site"].as_str()).collect();
    assert_eq!(listed, ["alpha", "beta", "gamma"], "{page:#}");
    for (row, updates) in rows.iter().zip(["2", "2", "1"]) {
        assert_eq!(row["connection"], "connected", "{row:#}");
        assert_eq!(row["updates"], updates, "{row:#}");
        assert!(row["text"].as_str().unwrap_or("").contains("hand"), "the software its hello named: {row:#}");
    }
    assert!(rows[2]["text"].as_str().unwrap_or("").contains("exhausted (declined round 2)"), "{:#}", rows[2]);
    for (row, e) in rows.iter().zip(&spent) {
        assert!(row["epsilon"].as_str().unwrap_or("").starts_with(&format!("{e:.3}")), "{row:#} vs {e}");
    }
    // ... against the budget each site declared in its hello (gamma's shows as exhausted).
    for (row, e) in rows[..2].iter().zip(&spent) {
        let share = format!("ε {} at δ {:e}: {:.0}% spent", HAND_BUDGET.epsilon, HAND_BUDGET.delta, 100.0 * e / HAND_BUDGET.epsilon);
        assert!(row["text"].as_str().unwrap_or("").contains(&share), "{row:#} vs {share}");
    }

    // The rounds chart: two completed rounds of three and two sites, drawn to scale.
    let bars = page["bars"].as_array().context("bars")?;
    assert_eq!(bars.len(), 2, "{page:#}");
    for (bar, (round, n)) in bars.iter().zip([(1, 3), (2, 2)]) {
        assert_eq!((bar["round"].as_u64(), bar["participants"].as_u64()), (Some(round), Some(n)), "{bar:#}");
        assert_eq!(bar["outcome"], "completed");
    }
    let height = |i: usize| bars[i]["height"].as_f64().unwrap_or(0.0);
    assert!(height(1) > 0.0 && (height(0) / height(1) - 1.5).abs() < 0.05, "bars 3:2 in height: {bars:?}");
    assert_eq!(page["accuracyDots"], 2, "the accuracy the sites shared, per round");

    // The privacy chart: bars in proportion to each site's epsilon, against its budget.
    let privacy = page["privacy"].as_array().context("privacy")?;
    assert_eq!(privacy.len(), 3, "{page:#}");
    assert!(privacy.iter().all(|p| p["budget"].as_str() == Some(&HAND_BUDGET.epsilon.to_string())), "{privacy:?}");
    let width = |i: usize| privacy[i]["width"].as_f64().unwrap_or(0.0);
    assert!(width(2) > 0.0 && (width(0) / width(2) - spent[0] / spent[2]).abs() < 0.05, "{privacy:?} vs {spent:?}");

    // The round history, newest first, with who took part and gamma's decline.
    let history = page["rounds"].as_array().context("rounds")?;
    assert_eq!(history.iter().map(|r| r["round"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(history[0]["participants"], "2: alpha, beta");
    assert_eq!(history[1]["participants"], "3: alpha, beta, gamma");
    assert!(history[0]["text"].as_str().unwrap_or("").contains("gamma declined"), "{:#}", history[0]);
    Ok(())
}

/// `GET /metrics` with the auditor's token.
fn scrape(admin: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(admin)?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    ensure!(response.starts_with("HTTP/1.1 200"), "{response}");
    Ok(response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Sends `value` everywhere as `offer`'s update under site-level DP, with the cumulative
/// epsilon `accountant` gives (what an agent declares), and a shared validation accuracy.
async fn send_update(site: &HandSite, accountant: &mut Accountant, offer: &RoundOffer, value: f32, accuracy: f64) -> Result<Message> {
    let release = Release::site_level(SIGMA);
    let privacy = PrivacyUsed {
        score: None,
        mode: PrivacyMode::SiteLevel,
        noise_multiplier: SIGMA,
        clip_norm: 1.0,
        sampling_rate: release.sampling_rate,
        steps: release.steps,
        update_clip_norm: 1.0,
        epsilon_after: accountant.epsilon_after(&release, DELTA)?,
        delta: DELTA,
        distributed: None,
    };
    accountant.record(&release)?;
    let delta = delta_for(offer, value);
    let specs = delta.specs();
    let metrics = LocalMetrics { train_loss: 0.5, val_loss: None, val_accuracy: Some(accuracy), val_macro_f1: None, train_secs: 1.0 };
    let header = UpdateHeader {
        score: None,
        round: offer.round,
        num_examples: 100,
        metrics: Some(metrics),
        tensors: specs.clone(),
        privacy,
        encoding: fedward_shared::codec::UpdateEncoding::F32,
    };
    let (mut send, mut recv) = site.conn.open_bi().await?;
    write_message(&mut send, &Message::Update(header)).await?;
    match read_message(&mut recv).await? {
        Message::Proceed(_) => {}
        refused => return Ok(refused),
    }
    write_tensors(&mut send, &delta, &specs).await?;
    send.finish()?;
    Ok(read_message(&mut recv).await?)
}

/// Runs the futures at once (every site says ready before any is answered).
async fn futures_all<F, T>(futures: impl Iterator<Item = F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T>>,
{
    let mut out = Vec::new();
    let handles: Vec<_> = futures.collect();
    let results = join_all(handles).await;
    for r in results {
        out.push(r?);
    }
    Ok(out)
}

async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, r) in pinned.iter_mut().zip(results.iter_mut()) {
            if r.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *r = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("every future finished")).collect()
}

/// Headless Chromium and its WebDriver server, found on the PATH.
struct Browser {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

impl Browser {
    /// `None` (with the reason on stderr) when either is missing, unless the environment
    /// requires the browser test (`FEDWARD_REQUIRE_BROWSER=1`).
    fn find() -> Result<Option<Self>> {
        let chromium = ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|n| on_path(n));
        let chromedriver = on_path("chromedriver");
        match (chromium, chromedriver) {
            (Some(chromium), Some(chromedriver)) => Ok(Some(Self { chromium, chromedriver })),
            (chromium, chromedriver) => {
                let missing: Vec<&str> = [(chromium.is_none(), "chromium"), (chromedriver.is_none(), "chromedriver")]
                    .iter()
                    .filter(|m| m.0)
                    .map(|m| m.1)
                    .collect();
                let why = format!("{} not on the PATH (apt-get install chromium chromium-driver; .ci/run does)", missing.join(" and "));
                ensure!(std::env::var("FEDWARD_REQUIRE_BROWSER").as_deref() != Ok("1"), "FEDWARD_REQUIRE_BROWSER=1 but {why}");
                eprintln!("SKIPPED the_dashboard_shows_the_federation_in_a_real_browser: {why}");
                Ok(None)
            }
        }
    }

    /// Opens the dashboard at `admin` with the auditor's token, waits for it to render, and
    /// returns what the page shows; saves a screenshot.
    fn look(&self, admin: SocketAddr) -> Result<Value> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Driver::start(&self.chromedriver, port)?;
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": self.chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"],
        }}}});
        let session = driver.call("POST", "/session", Some(&caps))?;
        let id = session["sessionId"].as_str().context("no session id")?.to_owned();
        let result = self.look_in(&driver, &id, admin);
        let _ = driver.call("DELETE", &format!("/session/{id}"), None);
        result
    }

    fn look_in(&self, driver: &Driver, id: &str, admin: SocketAddr) -> Result<Value> {
        // Without a token the browser is asked for one (and shown nothing else).
        driver.call("POST", &format!("/session/{id}/url"), Some(&json!({"url": format!("http://{admin}/")})))?;
        let refused = driver.call(
            "POST",
            &format!("/session/{id}/execute/sync"),
            Some(&json!({"script": "return document.body.innerText", "args": []})),
        )?;
        ensure!(!refused.as_str().unwrap_or("").contains("Round history"), "the dashboard was shown without a token");
        // HTTP Basic with the token as the password, as a person's browser sends it.
        driver.call("POST", &format!("/session/{id}/url"), Some(&json!({"url": format!("http://viewer:{TOKEN}@{admin}/")})))?;
        let script = r#"
            const q = s => Array.from(document.querySelectorAll(s));
            const text = id => { const e = document.getElementById(id); return e ? e.textContent : null; };
            return {
              title: document.title, phase: text('phase'), completed: text('rounds-completed'), timeLeft: text('time-left'),
              sites: q('#sites tr[data-site]').map(r => ({site: r.dataset.site, connection: r.querySelector('.connected').textContent,
                updates: r.querySelector('.updates').textContent, epsilon: r.querySelector('.epsilon').textContent, text: r.innerText})),
              bars: q('#rounds-chart g.round').map(g => ({round: +g.dataset.round, participants: +g.dataset.participants,
                outcome: g.dataset.outcome, height: g.querySelector('rect').getBoundingClientRect().height})),
              accuracyDots: q('#rounds-chart circle.accuracy').length,
              privacy: q('#privacy-chart g.site').map(g => ({site: g.dataset.site, epsilon: g.dataset.epsilon, budget: g.dataset.budget,
                width: g.querySelectorAll('rect')[1].getBoundingClientRect().width})),
              rounds: q('#rounds tr[data-round]').map(r => ({round: +r.dataset.round,
                participants: r.querySelector('.participants').textContent, text: r.innerText})),
            };"#;
        let page = driver.call("POST", &format!("/session/{id}/execute/sync"), Some(&json!({"script": script, "args": []})))?;
        let shot = driver.call("GET", &format!("/session/{id}/screenshot"), None)?;
        let png = base64_decode(shot.as_str().context("screenshot")?)?;
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
        std::fs::write(&path, png)?;
        eprintln!("dashboard screenshot: {}", path.display());
        Ok(page)
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `chromedriver` on a loopback port; killed on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Driver {
    fn start(path: &PathBuf, port: u16) -> Result<Self> {
        let mut child = Command::new(path).arg(format!("--port={port}")).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        // chromedriver says on stdout when it listens.
        let stdout = child.stdout.take().context("chromedriver has no stdout")?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("started successfully") => break,
                Some(Ok(_)) => {}
                _ => bail!("chromedriver exited before it listened"),
            }
        }
        // Keep reading what it prints, so that a full pipe never blocks it.
        std::thread::spawn(move || lines.for_each(drop));
        let me = Self { child, addr: format!("127.0.0.1:{port}").parse()? };
        let status = me.request("GET", "/status", None, Duration::from_secs(30))?;
        ensure!(status["ready"] == true, "chromedriver is not ready: {status}");
        Ok(me)
    }

    /// One WebDriver command: its `value`, or the WebDriver error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.request(method, path, body, Duration::from_secs(120))
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>, timeout: Duration) -> Result<Value> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut s = TcpStream::connect(self.addr)?;
        s.set_read_timeout(Some(timeout))?;
        // chromedriver speaks HTTP/1.1 only; it answers with a Content-Length and closes.
        // One write: chromedriver's server stalls on a request that arrives in pieces.
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(request.as_bytes())?;
        // It says `Connection: close` but may keep the socket open: read by Content-Length.
        let mut answer = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        let (head, body_start, length) = loop {
            let n = s.read(&mut buf)?;
            ensure!(n > 0, "{method} {path}: the connection closed before the answer's header");
            answer.extend_from_slice(&buf[..n]);
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length")))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .with_context(|| format!("{method} {path}: no Content-Length: {head}"))?;
                break (head, end + 4, length);
            }
        };
        while answer.len() < body_start + length {
            let n = s.read(&mut buf)?;
            ensure!(n > 0, "{method} {path}: the answer was cut short");
            answer.extend_from_slice(&buf[..n]);
        }
        let body = &answer[body_start..body_start + length];
        let parsed: Value = serde_json::from_slice(body).with_context(|| format!("{method} {path}: {head}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{method} {path}: {}", parsed["value"]);
        }
        Ok(parsed["value"].clone())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot), without a dependency for one call.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {c}"),
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}
