//! Bench (not a test): MiniLM training and inference samples/s on this machine's CPU at
//! batch 16, sequence 64 and 128, for head-only, top-2 layers and full fine-tuning.
//!
//! Needs `scripts/fetch-models.sh`. Run with `scripts/bench.sh train`. Training figures
//! are given twice: the first epoch (which computes and caches the frozen prefix) and a
//! steady-state epoch (prefix cached, as in every later round of a federation).

use std::path::Path;
use std::time::Instant;

use fedward_models::io::load_dir;
use fedward_models::text::Example;
use fedward_models::train::{predict, BertTrainer};
use fedward_shared::plan::{PrivacyPlan, Trainable, TrainingPlan};

const BATCH: u32 = 16;
const EXAMPLES: usize = 64;

fn notes() -> Vec<Example> {
    let words = [
        "pt",
        "72yo",
        "with",
        "sob",
        "and",
        "chest",
        "pain",
        "needs",
        "cardiology",
        "review",
        "bed",
        "on",
        "ward",
        "7",
        "sats",
        "91%",
        "on",
        "2l",
        "ct",
        "head",
        "slot",
        "please",
        "family",
        "aware",
        "plan",
        "discussed",
        "with",
        "reg",
    ];
    (0..EXAMPLES)
        .map(|i| {
            // 200 words: long enough to fill 128 tokens after truncation.
            let text = (0..200).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" ");
            Example { text, label: i % 4 }
        })
        .collect()
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models-data/all-MiniLM-L6-v2");
    let device = candle_core::Device::Cpu;
    println!("{:<10} {:>4} {:>16} {:>16} {:>14}", "trains", "seq", "1st epoch /s", "steady /s", "infer /s");
    let mut rows = Vec::new();
    for seq in [64u32, 128] {
        for trainable in [Trainable::Head, Trainable::TopLayers(2), Trainable::All] {
            let (model, encoder) = load_dir(&dir, None, 0, &device)?;
            let names = model.tensor_set()?;
            let plan = TrainingPlan {
                local_epochs: 1,
                batch_size: BATCH,
                optimizer: Default::default(),
                learning_rate: 5e-5,
                warmup_ratio: 0.0,
                weight_decay: 0.01,
                max_grad_norm: 1.0,
                max_seq_len: seq,
                trainable,
                trainable_tensors: trainable.select(names.names()),
                seed: 1,
                privacy: PrivacyPlan::Off,
                prox_mu: 0.0,
            };
            let mut trainer = BertTrainer::new(model, encoder, notes(), None)?;
            let t = Instant::now();
            trainer.fit(&plan, 1)?;
            let first = EXAMPLES as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            trainer.fit(&plan, 2)?;
            let steady = EXAMPLES as f64 / t.elapsed().as_secs_f64();
            let texts: Vec<String> = notes().into_iter().map(|e| e.text).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let t = Instant::now();
            predict(trainer.model(), trainer.encoder(), &refs, seq as usize)?;
            let infer = EXAMPLES as f64 / t.elapsed().as_secs_f64();
            println!("{:<10} {:>4} {:>16.1} {:>16.1} {:>14.1}", trainable.to_string(), seq, first, steady, infer);
            rows.push(serde_json::json!({"trainable": trainable.to_string(), "seq": seq, "batch": BATCH,
                "first_epoch_samples_per_s": first, "steady_samples_per_s": steady, "inference_samples_per_s": infer}));
        }
    }
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
    if let Some(out) = std::env::args().skip_while(|a| a != "--out").nth(1) {
        std::fs::write(out, serde_json::to_vec_pretty(&serde_json::json!({"rows": rows, "peak_rss_mib": peak_rss_mib()}))?)?;
    }
    Ok(())
}
