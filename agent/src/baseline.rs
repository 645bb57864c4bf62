//! The baselines a federation is judged against, trained from the same base model with the
//! same recipe: **centralized** training on the pooled data of every site (what federation
//! must approach, and what no consortium may legally do) and **local-only** training (each
//! site alone, what a hospital gets without the consortium). Both are evaluated on the
//! pooled test split of all sites.
//!
//! Data is laid out as `data synth` writes it: `DIR/<site>/{train,validation,test}.jsonl`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::info;

use fedward_models::bert::BertClassifier;
use fedward_models::eval::ClassificationReport;
use fedward_models::io::load_dir;
use fedward_models::text::TextEncoder;
use fedward_models::text::{read_jsonl, Example};
use fedward_models::train::{device, BertTrainer, EvalSet};
use fedward_models::trainer::Trainer;
use fedward_shared::plan::{PrivacyPlan, Trainable, TrainingPlan};

/// One site's files in a data directory.
#[derive(Clone, Debug)]
pub struct SiteFiles {
    pub name: String,
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub test: PathBuf,
}

/// The sites of a data directory: every subdirectory holding `train.jsonl` and `test.jsonl`,
/// in name order.
pub fn discover_sites(dir: &Path) -> Result<Vec<SiteFiles>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading data directory {}", dir.display()))?;
    let mut sites = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let (train, test) = (path.join("train.jsonl"), path.join("test.jsonl"));
        if !(train.is_file() && test.is_file()) {
            continue;
        }
        let validation = Some(path.join("validation.jsonl")).filter(|p| p.is_file());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        sites.push(SiteFiles { name, train, validation, test });
    }
    if sites.is_empty() {
        bail!("{} holds no site directories with train.jsonl and test.jsonl (make one with `fedward-agent data synth`)", dir.display());
    }
    sites.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(sites)
}

/// How a baseline trains: the federation's recipe, with `epochs` standing for
/// rounds x local epochs.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// Model directory to start from (the federation's base model).
    pub base: PathBuf,
    pub labels: Vec<String>,
    pub trainable: Trainable,
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub max_seq_len: u32,
    pub seed: u64,
    pub device: String,
    /// Threads for the frozen prefix, and for training side by side in `all` (when 2 or more).
    pub threads: usize,
}

impl Recipe {
    fn plan(&self, tensor_names: Vec<&str>) -> TrainingPlan {
        TrainingPlan {
            local_epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: Default::default(),
            learning_rate: self.learning_rate,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            max_seq_len: self.max_seq_len,
            trainable: self.trainable,
            trainable_tensors: self.trainable.select(tensor_names),
            seed: self.seed,
            privacy: PrivacyPlan::Off,
            prox_mu: 0.0,
        }
    }
}

/// What one baseline model scored on the pooled test split.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineResult {
    /// `centralized`, or the site's name for a local-only model.
    pub name: String,
    pub train_examples: usize,
    pub train_loss: f64,
    pub test: ClassificationReport,
    pub seconds: f64,
}

/// Trains baselines from one recipe and scores them on one pooled test split, whose frozen
/// prefix is computed once for all of them.
pub struct Baselines {
    recipe: Recipe,
    test: EvalSet,
    /// Where each trained model is exported (`DIR/<name>`), when asked.
    save_dir: Option<PathBuf>,
}

impl Baselines {
    /// Reads every site's test split into the pooled test set.
    pub fn new(recipe: Recipe, sites: &[SiteFiles]) -> Result<Self> {
        let mut test = Vec::new();
        for s in sites {
            test.extend(read_jsonl(&s.test, &recipe.labels)?);
        }
        let mut test = EvalSet::new(test);
        test.set_prefix_threads(recipe.threads);
        Ok(Self { recipe, test, save_dir: None })
    }

    /// Exports every model trained from now on to `dir/<name>` (`centralized`, or the
    /// site's name), a directory `predict`, `eval` and `allocate simulate` load.
    pub fn save_models_to(&mut self, dir: &Path) {
        self.save_dir = Some(dir.to_owned());
    }

    /// Examples in the pooled test split.
    pub fn test_len(&self) -> usize {
        self.test.len()
    }

    /// Centralized training on the pooled training data of `sites`.
    pub fn centralized(&mut self, sites: &[SiteFiles]) -> Result<BaselineResult> {
        let mut train = Vec::new();
        for s in sites {
            train.extend(read_jsonl(&s.train, &self.recipe.labels)?);
        }
        self.run("centralized", train)
    }

    /// Local-only training on one site's training data.
    pub fn local_only(&mut self, site: &SiteFiles) -> Result<BaselineResult> {
        let train = read_jsonl(&site.train, &self.recipe.labels)?;
        self.run(&site.name, train)
    }

    /// The centralized baseline, then every site's local-only one, with one pass of the frozen
    /// layers over the pooled training data serving them all (each site's notes are a slice of
    /// the pool): the same figures as running them one by one, in less time. The centralized
    /// model trains on one thread while the local-only ones train in turn on another: a
    /// step of the small trainable suffix keeps one core busy at best.
    pub fn all(&mut self, sites: &[SiteFiles]) -> Result<Vec<BaselineResult>> {
        let started = Instant::now();
        let mut train = Vec::new();
        let mut slices = Vec::new();
        for s in sites {
            let start = train.len();
            train.extend(read_jsonl(&s.train, &self.recipe.labels)?);
            slices.push((s.name.as_str(), (start..train.len()).collect::<Vec<_>>()));
        }
        let (model, encoder) = self.load_base()?;
        let plan = self.recipe.plan(model.tensor_set()?.names().collect());
        let mut pooled = BertTrainer::new(model, encoder, train, None)?;
        pooled.set_prefix_threads(self.recipe.threads);
        pooled.prepare(&plan)?;
        // The test split's frozen prefix, once for both threads' copies of the set.
        self.test.prepare(pooled.model(), pooled.encoder(), &plan.trainable_tensors, plan.max_seq_len as usize)?;
        let local: Vec<(&str, BertTrainer)> =
            slices.iter().map(|(name, indices)| Ok((*name, pooled.subset(self.load_base()?.0, indices)?))).collect::<Result<_>>()?;
        let prepared = started.elapsed().as_secs_f64();
        info!(secs = format_args!("{prepared:.1}"), "frozen prefix of the pooled training and test data computed");
        let (recipe, test, save) = (&self.recipe, &self.test, self.save_dir.as_deref());
        let centralized = move || train_and_test(recipe, test.clone(), "centralized", pooled, started, save);
        let local_only = move || {
            local
                .into_iter()
                .map(|(name, trainer)| train_and_test(recipe, test.clone(), name, trainer, Instant::now(), save))
                .collect::<Result<Vec<_>>>()
        };
        let (centralized, local_only) = if recipe.threads > 1 {
            std::thread::scope(|scope| {
                let (c, l) = (scope.spawn(centralized), scope.spawn(local_only));
                (join(c), join(l))
            })
        } else {
            (centralized(), local_only())
        };
        let mut results = vec![centralized?];
        results.extend(local_only?);
        Ok(results)
    }

    fn run(&mut self, name: &str, train: Vec<Example>) -> Result<BaselineResult> {
        let started = Instant::now();
        let (model, encoder) = self.load_base()?;
        let mut trainer = BertTrainer::new(model, encoder, train, None)?;
        trainer.set_prefix_threads(self.recipe.threads);
        train_and_test(&self.recipe, self.test.clone(), name, trainer, started, self.save_dir.as_deref())
    }

    /// The base model with a freshly initialised head (the same seed every time).
    fn load_base(&self) -> Result<(BertClassifier, TextEncoder)> {
        let dev = device(&self.recipe.device)?;
        load_dir(&self.recipe.base, Some(&self.recipe.labels), self.recipe.seed, &dev)
            .with_context(|| format!("loading the base model from {}", self.recipe.base.display()))
    }
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle.join().map_err(|_| anyhow::anyhow!("a baseline's training thread panicked"))?
}

fn train_and_test(
    recipe: &Recipe,
    mut test: EvalSet,
    name: &str,
    mut trainer: BertTrainer,
    started: Instant,
    save: Option<&Path>,
) -> Result<BaselineResult> {
    let plan = recipe.plan(trainer.model().tensor_set()?.names().collect());
    let train_examples = trainer.num_examples() as usize;
    info!(baseline = name, examples = train_examples, trainable = %plan.trainable, epochs = plan.local_epochs, "training baseline");
    let train_loss = trainer.fit(&plan, 0)?;
    let (_, test) = test.evaluate(trainer.model(), trainer.encoder(), &plan.trainable_tensors, plan.max_seq_len as usize)?;
    if let Some(dir) = save {
        let dir = dir.join(name);
        fedward_models::io::export_dir(trainer.model(), trainer.encoder(), &dir)
            .with_context(|| format!("exporting the {name} baseline to {}", dir.display()))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    info!(baseline = name, accuracy = test.accuracy, macro_f1 = test.macro_f1, secs = format_args!("{seconds:.1}"), "baseline done");
    Ok(BaselineResult { name: name.to_owned(), train_examples, train_loss, test, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedward_models::bert::BertConfig;
    use fedward_models::io::export_dir;

    const WORDS: [&str; 12] =
        ["review", "consult", "surgeon", "admit", "ward", "icu", "ventilator", "scan", "pump", "pharmacy", "transport", "please"];

    /// A tiny base model and two sites whose notes tell the labels apart by their words
    /// (three words per label).
    fn fixture(dir: &Path) -> (Recipe, Vec<SiteFiles>) {
        let labels: Vec<String> = ["doctor", "bed", "device", "other"].iter().map(|s| (*s).to_owned()).collect();
        let encoder = TextEncoder::tiny(&WORDS);
        let model = BertClassifier::random(BertConfig::tiny(encoder.vocab_size()), labels.clone(), 1, &candle_core::Device::Cpu).unwrap();
        export_dir(&model, &encoder, &dir.join("base")).unwrap();
        for (s, site) in ["north", "south"].iter().enumerate() {
            let site_dir = dir.join(site);
            std::fs::create_dir_all(&site_dir).unwrap();
            for (split, n) in [("train", 12), ("test", 4)] {
                let lines: Vec<String> = (0..n)
                    .map(|i| {
                        let label = (i + s) % 4;
                        let text = format!("{} {}", WORDS[label * 3 + i % 3], WORDS[label * 3 + (i + 1) % 3]);
                        serde_json::json!({ "text": text, "label": labels[label] }).to_string()
                    })
                    .collect();
                std::fs::write(site_dir.join(format!("{split}.jsonl")), lines.join("\n")).unwrap();
            }
        }
        let recipe = Recipe {
            base: dir.join("base"),
            labels,
            trainable: Trainable::TopLayers(1),
            epochs: 3,
            batch_size: 4,
            learning_rate: 5e-3,
            max_seq_len: 16,
            seed: 3,
            device: "cpu".to_owned(),
            threads: 1,
        };
        (recipe, discover_sites(dir).unwrap())
    }

    fn figures(results: &[BaselineResult]) -> Vec<(String, usize, f64, f64)> {
        results.iter().map(|r| (r.name.clone(), r.train_examples, r.train_loss, r.test.accuracy)).collect()
    }

    /// `all` on two threads gives exactly what each baseline gives when trained on its own.
    #[test]
    fn all_on_two_threads_matches_each_baseline_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (recipe, sites) = fixture(dir.path());
        assert_eq!(sites.len(), 2);
        let mut alone = Baselines::new(recipe.clone(), &sites).unwrap();
        let mut one_by_one = vec![alone.centralized(&sites).unwrap()];
        for site in &sites {
            one_by_one.push(alone.local_only(site).unwrap());
        }
        let threaded = Baselines::new(Recipe { threads: 2, ..recipe }, &sites).unwrap().all(&sites).unwrap();
        assert_eq!(figures(&threaded), figures(&one_by_one));
        let names: Vec<&str> = threaded.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["centralized", "north", "south"]);
        assert_eq!(threaded[0].train_examples, 24);
    }
}
