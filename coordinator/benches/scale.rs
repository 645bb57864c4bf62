//! Bench (not a test): one round of many sites against the real `fedward-coordinator`
//! process with a 22.7M-parameter model (all-MiniLM-L6-v2's shapes, every tensor
//! trainable): every site downloads the model and uploads a full update, and the
//! coordinator's peak memory is set against the model's size. Sites run as hand-driven
//! protocol clients in this process. `scripts/bench.sh scale` runs it at 2, 8, 32 and 100
//! sites (`--sites 8,100` to choose); prints a table and writes JSON to `--out`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use rand::SeedableRng;
use tokio::sync::Semaphore;

use fedward_shared::wire::{Message, Ready};
use support::{minilm_shaped_model, Consortium, CoordinatorProcess, HandSite};

/// How many sites download at once: the bench's own memory holds one model per download.
const DOWNLOADS_AT_ONCE: usize = 4;

struct Run {
    sites: usize,
    model_mib: f64,
    rss_before_mib: f64,
    /// With every site connected and admitted, before the round: per-connection state.
    rss_connected_mib: f64,
    peak_mib: f64,
    round_secs: f64,
}

async fn run(sites: usize) -> Result<Run> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let model = minilm_shaped_model(&mut rng);
    let model_mib = model.byte_len() as f64 / (1 << 20) as f64;
    let names: Vec<String> = (0..sites).map(|i| format!("site-{i:03}")).collect();
    let consortium = Consortium::new(&model, "all", &names, sites, 1, "[aggregation]\nmax_update_norm = 1e9\n")?;
    let coordinator = CoordinatorProcess::start(&consortium)?;
    let rss_before = coordinator.rss_kib("VmRSS:");

    let mut connected = Vec::with_capacity(sites);
    for name in &names {
        connected.push(Arc::new(HandSite::connect(consortium.addr, consortium.site_tls(name)?, 1000).await?));
    }
    let rss_connected = coordinator.rss_kib("VmRSS:");
    let started = Instant::now();
    let offers = futures_join_all(connected.iter().map(|s| {
        let s = s.clone();
        async move { s.offer().await }
    }))
    .await;
    let delta = Arc::new(model);
    let downloads = Arc::new(Semaphore::new(DOWNLOADS_AT_ONCE));
    let answers = futures_join_all(connected.iter().zip(offers).map(|(s, offer)| {
        let (s, delta, downloads) = (s.clone(), delta.clone(), downloads.clone());
        async move {
            let offer = offer?;
            {
                let _slot = downloads.acquire().await?;
                drop(s.download(&offer).await?);
            }
            s.send_update(&offer, &delta, 1000).await
        }
    }))
    .await;
    for a in answers {
        if !matches!(a?, Message::Ack(_)) {
            bail!("an update was not acknowledged");
        }
    }
    // The next Ready is answered once the round's checkpoint is written.
    match connected[0].request(&Message::Ready(Ready { have_model: None })).await? {
        Message::Finished(_) => {}
        other => bail!("expected the federation to finish, got {other:?}"),
    }
    let round_secs = started.elapsed().as_secs_f64();
    let peak = coordinator.rss_kib("VmHWM:");
    Ok(Run {
        sites,
        model_mib,
        rss_before_mib: rss_before as f64 / 1024.0,
        rss_connected_mib: rss_connected as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
        round_secs,
    })
}

/// Runs the futures concurrently and collects their results in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.into_iter().enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<(usize, F::Output)> = Vec::with_capacity(set.len());
    while let Some(done) = set.join_next().await {
        out.push(done.expect("a site's task panicked"));
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let out: Option<PathBuf> = arg("--out").map(PathBuf::from);
    let sites: Vec<usize> =
        arg("--sites").unwrap_or_else(|| "2,8,32,100".into()).split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut runs = Vec::new();
    for n in sites {
        let r = runtime.block_on(run(n))?;
        println!(
            "{:>4} sites: model {:.1} MiB, coordinator RSS before {:.0} MiB, sites connected {:.0} MiB, peak {:.0} MiB = {:.2}x the model, round {:.1} s",
            r.sites,
            r.model_mib,
            r.rss_before_mib,
            r.rss_connected_mib,
            r.peak_mib,
            r.peak_mib / r.model_mib,
            r.round_secs
        );
        runs.push(r);
    }
    if let Some(out) = out {
        let json: Vec<_> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "sites": r.sites, "model_mib": r.model_mib, "coordinator_rss_before_mib": r.rss_before_mib, "coordinator_rss_connected_mib": r.rss_connected_mib,
                    "coordinator_peak_rss_mib": r.peak_mib, "peak_over_model": r.peak_mib / r.model_mib, "round_secs": r.round_secs,
                })
            })
            .collect();
        std::fs::write(&out, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}
