//! GPU check (not a test): the classifier on `cuda:0` against the CPU from the same
//! weights, data and seed, then an epoch of the demo's site on both, timed.
//!
//! Run with `scripts/gpu-check.sh` (builds with `--features cuda`; needs a CUDA device).
//! What it does, in order:
//! 1. Opens the device first, and exits 2 with the reason when there is none (a build
//!    without the `cuda` feature has none either).
//! 2. Builds the model once on the CPU (MiniLM from `scripts/fetch-models.sh` with a head
//!    seeded by `--seed`, or the tiny test configuration when the weights are absent) and
//!    copies the same tensors to the device. The data is the demo's first site
//!    (`trauma-centre`, `data synth` with the demo's seed 7 and 2,500 notes: 1,750 to train).
//! 3. Logits of a fixed batch before training on both: max abs difference.
//! 4. `--steps` steps of AdamW on the same batches with the same dropout masks (drawn on the
//!    host from one seed) on both: the loss of each step and its relative difference.
//! 5. Logits of the fixed batch after training: max abs difference.
//! 6. One epoch of the demo's plan (`body:1`, batch 32, AdamW 1.5e-3, warm-up 0.1, seq
//!    128, gradient clipping at 1) through `BertTrainer::fit`, as an agent trains a round:
//!    the first epoch (it computes and caches the frozen prefix) and a steady one, on both,
//!    samples/s and the device/CPU ratio.
//!
//! Exit 0 when every difference is within its tolerance, 1 when one is not, 2 without a
//! device. Tolerances (options): loss relative 1e-3, logits absolute 1e-3 before training
//! and 1e-2 after (GPU kernels sum in another order; AdamW divides by the gradient's
//! running RMS, so a gradient near zero can take a step of a different sign: the weights
//! drift apart by up to the learning rate per step on such coordinates). The comparison
//! runs in full f32 (cuBLAS's reduced-precision TF32 off); `--tf32` turns it on for the
//! timing only.
//!
//! `--device cpu` runs the same program with the CPU on both sides (the differences must
//! then be zero): a check of the program itself on a machine without a GPU.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use fedward_corpus::synth::{self, Label, SynthConfig};
use fedward_models::bert::{BertClassifier, BertConfig, Mode};
use fedward_models::optim::LocalOptimizer;
use fedward_models::text::{make_batch, Encoded, Example, TextEncoder};
use fedward_models::train::{self, BertTrainer};
use fedward_shared::plan::{Optimizer, PrivacyPlan, Trainable, TrainingPlan};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What the check runs with: `--name value` options, defaults as documented above.
struct Options {
    device: String,
    model: PathBuf,
    steps: usize,
    batch: usize,
    seq: usize,
    /// What trains in the step comparison (default `all`: every backward kernel runs).
    trainable: Trainable,
    learning_rate: f64,
    seed: u64,
    notes_per_site: usize,
    loss_rtol: f64,
    logits_atol_init: f64,
    logits_atol_trained: f64,
    /// Skip the epoch timing (the comparison only).
    no_epoch: bool,
    tf32: bool,
    out: Option<PathBuf>,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Options {
            device: "cuda:0".into(),
            // Relative to the working directory (the repository's root, where the script runs
            // it): the binary may run on another machine than the one that built it.
            model: PathBuf::from("models-data/all-MiniLM-L6-v2"),
            steps: 5,
            batch: 16,
            seq: 128,
            trainable: Trainable::All,
            learning_rate: 5e-5,
            seed: 7,
            notes_per_site: 2500,
            loss_rtol: 1e-3,
            logits_atol_init: 1e-3,
            logits_atol_trained: 1e-2,
            no_epoch: false,
            tf32: false,
            out: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--no-epoch" => o.no_epoch = true,
                "--tf32" => o.tf32 = true,
                "--help" | "-h" => {
                    println!(
                        "gpu_check [--device cuda:0|cpu] [--model DIR] [--steps N] [--batch N] [--seq N] [--trainable all|body:1|..] \
                         [--learning-rate X] [--seed N] [--notes-per-site N] [--loss-rtol X] [--logits-atol-init X] \
                         [--logits-atol-trained X] [--no-epoch] [--tf32] [--out FILE.json]"
                    );
                    std::process::exit(0);
                }
                _ => {
                    let value = args.next().with_context(|| format!("{flag} needs a value"))?;
                    let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{flag} {value}: {e}");
                    match flag.as_str() {
                        "--device" => o.device = value,
                        "--model" => o.model = PathBuf::from(value),
                        "--steps" => o.steps = value.parse().map_err(|e| bad(&e))?,
                        "--batch" => o.batch = value.parse().map_err(|e| bad(&e))?,
                        "--seq" => o.seq = value.parse().map_err(|e| bad(&e))?,
                        "--trainable" => o.trainable = value.parse().map_err(|e| bad(&e))?,
                        "--learning-rate" => o.learning_rate = value.parse().map_err(|e| bad(&e))?,
                        "--seed" => o.seed = value.parse().map_err(|e| bad(&e))?,
                        "--notes-per-site" => o.notes_per_site = value.parse().map_err(|e| bad(&e))?,
                        "--loss-rtol" => o.loss_rtol = value.parse().map_err(|e| bad(&e))?,
                        "--logits-atol-init" => o.logits_atol_init = value.parse().map_err(|e| bad(&e))?,
                        "--logits-atol-trained" => o.logits_atol_trained = value.parse().map_err(|e| bad(&e))?,
                        "--out" => o.out = Some(PathBuf::from(value)),
                        _ => bail!("unknown option {flag} (see --help)"),
                    }
                }
            }
        }
        if o.batch == 0 || o.steps == 0 {
            bail!("--batch and --steps must be at least 1");
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
    let opts = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("gpu-check: {e:#}");
            return ExitCode::from(64);
        }
    };
    // The device first: without one there is nothing to check, and the reason is the answer.
    let device = match train::device(&opts.device) {
        Ok(d) if opts.device != "auto" || d.is_cuda() => d,
        Ok(_) => {
            eprintln!("gpu-check: FAILED: no CUDA device (--device auto found none)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // The error says whether this build has the cuda feature (`train::device`).
            eprintln!("gpu-check: FAILED: no CUDA device: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts, &device) {
        Ok(true) => {
            println!("gpu-check: PASSED");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("gpu-check: FAILED: a difference is over its tolerance (see above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("gpu-check: FAILED: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(opts: &Options, device: &Device) -> anyhow::Result<bool> {
    // Full f32 for the comparison (candle's default; set here so the figures say what they are).
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("device: {} ({:?}); CPU: {threads} threads; cuda feature: {}", opts.device, device.location(), cfg!(feature = "cuda"));

    let labels: Vec<String> = Label::ALL.iter().map(|l| l.as_str().to_owned()).collect();
    let site = demo_site(opts.seed, opts.notes_per_site)?;
    let (cpu_model, encoder, which) = base_model(opts, &labels, &site)?;
    let seq = if which == "tiny" { opts.seq.min(cpu_model.config.max_position_embeddings) } else { opts.seq };
    println!("model: {which}; data: the demo's site trauma-centre, {} training notes; seq {seq}", site.len());
    let weights = cpu_model.tensor_set()?;
    let dev_model = BertClassifier::from_tensors(cpu_model.config.clone(), labels.clone(), &weights, device)?;

    let texts: Vec<&str> = site.iter().map(|e| e.text.as_str()).collect();
    let encoded = encoder.encode(&texts, seq)?;
    let fixed: Vec<usize> = (0..opts.batch.min(encoded.len())).collect();

    let mut ok = true;
    let init = logits_diff(&cpu_model, &dev_model, &encoded, &fixed)?;
    ok &= report("logits before training, max abs diff", init, opts.logits_atol_init);

    // The step comparison: the same batches, the same dropout masks, the same optimiser.
    let names = weights.names().map(str::to_owned).collect::<Vec<_>>();
    let trainable: HashSet<String> = opts.trainable.select(names.iter().map(String::as_str)).into_iter().collect();
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed));
    let batches: Vec<Vec<usize>> = order.chunks(opts.batch).take(opts.steps).map(<[usize]>::to_vec).collect();
    println!(
        "training {} steps of batch {} on both ({}: {} tensors, AdamW lr {}, dropout on, no gradient clipping):",
        batches.len(),
        opts.batch,
        opts.trainable,
        trainable.len(),
        opts.learning_rate
    );
    let cpu_losses = train_steps(&cpu_model, &encoded, &site, &batches, &trainable, opts)?;
    let dev_losses = train_steps(&dev_model, &encoded, &site, &batches, &trainable, opts)?;
    println!("{:>5} {:>12} {:>12} {:>10}", "step", "cpu loss", "device loss", "rel diff");
    let mut worst = 0.0f64;
    let mut steps_json = Vec::new();
    for (i, (c, d)) in cpu_losses.iter().zip(&dev_losses).enumerate() {
        let rel = (c - d).abs() / c.abs().max(f64::MIN_POSITIVE);
        worst = worst.max(rel);
        println!("{:>5} {:>12.6} {:>12.6} {:>10.2e}", i + 1, c, d, rel);
        steps_json.push(serde_json::json!({"step": i + 1, "cpu_loss": c, "device_loss": d, "rel_diff": rel}));
    }
    ok &= report("loss, max relative diff over the steps", worst, opts.loss_rtol);
    let trained = logits_diff(&cpu_model, &dev_model, &encoded, &fixed)?;
    ok &= report("logits after training, max abs diff", trained, opts.logits_atol_trained);

    let epoch = if opts.no_epoch {
        None
    } else {
        if opts.tf32 {
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        let base = BertClassifier::from_tensors(cpu_model.config.clone(), labels.clone(), &weights, &Device::Cpu)?;
        Some(time_epochs(opts, &base, &encoder, &site, device, seq)?)
    };
    if let Some(out) = &opts.out {
        let json = serde_json::json!({
            "device": opts.device, "cpu_threads": threads, "model": which, "seq": seq, "batch": opts.batch,
            "trainable": opts.trainable.to_string(), "learning_rate": opts.learning_rate,
            "logits_init_max_abs_diff": init, "logits_trained_max_abs_diff": trained, "loss_max_rel_diff": worst,
            "tolerances": {"loss_rtol": opts.loss_rtol, "logits_atol_init": opts.logits_atol_init,
                "logits_atol_trained": opts.logits_atol_trained},
            "steps": steps_json, "epoch": epoch, "passed": ok,
        });
        std::fs::write(out, serde_json::to_vec_pretty(&json)?).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(ok)
}

/// The demo's first site's training notes (`data synth --seed 7 --notes-per-site 2500`).
fn demo_site(seed: u64, notes_per_site: usize) -> anyhow::Result<Vec<Example>> {
    let mut cfg = SynthConfig::new(seed, SynthConfig::default_sites());
    cfg.notes_per_site = notes_per_site;
    let corpus = synth::generate(&cfg)?;
    let site = corpus.sites.into_iter().next().context("the synthetic corpus has no site")?;
    Ok(site.train.into_iter().map(|e| Example { text: e.text, label: e.label.index() }).collect())
}

/// MiniLM with a seeded head when its weights are present, else the tiny test
/// configuration over the site's words, seeded.
fn base_model(opts: &Options, labels: &[String], site: &[Example]) -> anyhow::Result<(BertClassifier, TextEncoder, &'static str)> {
    if opts.model.join("model.safetensors").is_file() {
        let (model, encoder) = fedward_models::io::load_dir(&opts.model, Some(labels), opts.seed, &Device::Cpu)?;
        return Ok((model, encoder, "all-MiniLM-L6-v2"));
    }
    println!("({} has no weights: scripts/fetch-models.sh fetches them; using the tiny test model)", opts.model.display());
    let mut words: Vec<&str> = site.iter().flat_map(|e| e.text.split_whitespace()).collect();
    words.sort_unstable();
    words.dedup();
    let encoder = TextEncoder::tiny(&words);
    let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels.to_vec(), opts.seed, &Device::Cpu)?;
    Ok((model, encoder, "tiny"))
}

/// Max abs difference of the two models' logits on the examples `idx` (evaluation mode).
fn logits_diff(a: &BertClassifier, b: &BertClassifier, encoded: &[Encoded], idx: &[usize]) -> anyhow::Result<f64> {
    let none = HashSet::new();
    let logits = |m: &BertClassifier| -> anyhow::Result<Vec<f32>> {
        let refs: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
        let batch = make_batch(&refs, m.config.pad_token_id, m.device())?;
        let out = m.forward(&batch, &mut Mode { trainable: &none, dropout_rng: None, per_example: None })?;
        Ok(out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (x, y) = (logits(a)?, logits(b)?);
    Ok(x.iter().zip(&y).map(|(p, q)| f64::from((p - q).abs())).fold(0.0, f64::max))
}

/// Trains `model` in place on `batches` and returns each step's loss.
fn train_steps(
    model: &BertClassifier,
    encoded: &[Encoded],
    site: &[Example],
    batches: &[Vec<usize>],
    trainable: &HashSet<String>,
    opts: &Options,
) -> anyhow::Result<Vec<f64>> {
    let vars = model.vars_of(trainable)?;
    let mut opt = LocalOptimizer::new(vars, Optimizer::AdamW, opts.learning_rate, 0.01)?;
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(opts.seed.wrapping_add(1));
    let mut losses = Vec::with_capacity(batches.len());
    for idx in batches {
        let refs: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
        let batch = make_batch(&refs, model.config.pad_token_id, model.device())?;
        let labels = Tensor::from_vec(idx.iter().map(|&i| site[i].label as u32).collect::<Vec<_>>(), idx.len(), model.device())?;
        let logits = model.forward(&batch, &mut Mode { trainable, dropout_rng: Some(&mut dropout_rng), per_example: None })?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        opt.step(&loss.backward()?)?;
        losses.push(f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?));
    }
    Ok(losses)
}

/// One epoch of the demo's plan on the CPU and on `device`, each from the same weights:
/// the first (frozen prefix computed and cached) and a steady one.
fn time_epochs(
    opts: &Options,
    base: &BertClassifier,
    encoder: &TextEncoder,
    site: &[Example],
    device: &Device,
    seq: usize,
) -> anyhow::Result<serde_json::Value> {
    let weights = base.tensor_set()?;
    let trainable = Trainable::TopBody(1);
    let plan = TrainingPlan {
        local_epochs: 1,
        batch_size: 32,
        optimizer: Optimizer::AdamW,
        learning_rate: 1.5e-3,
        warmup_ratio: 0.1,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_seq_len: seq as u32,
        trainable,
        trainable_tensors: trainable.select(weights.names()),
        seed: opts.seed,
        privacy: PrivacyPlan::Off,
        prox_mu: 0.0,
    };
    let n = site.len() as f64;
    println!(
        "one epoch of the demo's plan ({trainable}, batch 32, AdamW 1.5e-3, seq {seq}) on {} notes{}:",
        site.len(),
        if opts.tf32 { ", TF32 on the device" } else { "" }
    );
    println!("{:>8} {:>16} {:>12} {:>16} {:>12}", "device", "1st epoch /s", "loss", "steady /s", "loss");
    let mut rows = Vec::new();
    for (name, dev) in [("cpu", Device::Cpu), (opts.device.as_str(), device.clone())] {
        let model = BertClassifier::from_tensors(base.config.clone(), base.labels.clone(), &weights, &dev)?;
        let mut trainer = BertTrainer::new(model, encoder.clone(), site.to_vec(), None)?;
        let t = Instant::now();
        let first_loss = trainer.fit(&plan, 1)?;
        let first = n / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let steady_loss = trainer.fit(&plan, 2)?;
        let steady = n / t.elapsed().as_secs_f64();
        println!("{name:>8} {first:>16.1} {first_loss:>12.4} {steady:>16.1} {steady_loss:>12.4}");
        rows.push((name.to_owned(), first, first_loss, steady, steady_loss));
    }
    let (cpu, dev) = (&rows[0], &rows[1]);
    println!("device / cpu: first epoch {:.2}x, steady epoch {:.2}x", dev.1 / cpu.1, dev.3 / cpu.3);
    Ok(serde_json::json!({
        "trainable": trainable.to_string(), "notes": site.len(), "tf32": opts.tf32,
        "cpu": {"first_samples_per_s": cpu.1, "first_loss": cpu.2, "steady_samples_per_s": cpu.3, "steady_loss": cpu.4},
        "device": {"first_samples_per_s": dev.1, "first_loss": dev.2, "steady_samples_per_s": dev.3, "steady_loss": dev.4},
        "ratio_first": dev.1 / cpu.1, "ratio_steady": dev.3 / cpu.3,
    }))
}

/// Prints one comparison against its tolerance; true when within it.
fn report(what: &str, value: f64, tolerance: f64) -> bool {
    let ok = value.is_finite() && value <= tolerance;
    println!("{what}: {value:.3e} (tolerance {tolerance:.0e}) {}", if ok { "ok" } else { "OVER" });
    ok
}
