//! The training plan: what the consortium asks every site to do in a round.
//!
//! The coordinator puts a [`TrainingPlan`] into each `RoundOffer`; agents hand it to their
//! trainer. Tensor names follow Hugging Face transformers' `BertForSequenceClassification`
//! (`bert.embeddings.*`, `bert.encoder.layer.N.*`, `bert.pooler.*`, `classifier.*`), which
//! is how [`Trainable`] finds the head and the top layers without knowing the model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which part of the model trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trainable {
    /// The classification head: `classifier.*` and the pooler (`bert.pooler.*`).
    Head,
    /// The top `k` encoder layers plus the head.
    TopLayers(u32),
    /// The top `k` encoder layers and the pooler; the classifier stays as the initial model
    /// set it (seeded, shared by every site). The federated body-only training of FedBABU
    /// (Oh et al. 2022): when the sites' label mixes differ, a classifier each site trains
    /// is pulled toward its own labels every round and the average of those pulls is what
    /// the federation keeps; a fixed classifier leaves the body (which the pooler feeds
    /// into any direction the classifier needs) as the only thing that moves.
    TopBody(u32),
    /// Every tensor.
    All,
    /// BitFit (Ben Zaken et al. 2022): the bias and LayerNorm vectors of the top `k` encoder
    /// layers, the pooler's bias and the classifier. A few thousand parameters instead of
    /// millions, which is what makes record-level DP-SGD useful: the noise DP-SGD adds grows
    /// with the square root of the number of trained parameters, the signal does not.
    TopBiases(u32),
    /// Low-rank adapters (LoRA) of this rank on the six weight matrices of the top encoder
    /// layer, plus the classifier. Each round the agent trains fresh adapters (tens of
    /// thousands of parameters, few enough for record-level DP-SGD) and folds them into
    /// the weights, so the update, the global model and the exported checkpoint hold
    /// plain BERT tensors: the matrices and the classifier this selects.
    TopLora(u32),
}

/// The optimiser of local training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// AdamW with the plan's weight decay (decoupled). Suits training without DP.
    #[default]
    AdamW,
    /// SGD with heavy-ball momentum (PyTorch's update: `v = m v + g`, `w -= lr v`). Suits
    /// record-level DP-SGD: Adam divides each coordinate by its own running RMS, which
    /// turns DP noise into steps of about the learning rate in random directions, while
    /// SGD keeps the noise at its true, small scale against the signal.
    Sgd { momentum: f64 },
}

/// An `Optimizer` spec that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid optimizer {0:?}: expected \"adamw\", \"sgd\" or \"sgd:M\" (momentum M in [0, 1))")]
pub struct OptimizerParseError(String);

impl FromStr for Optimizer {
    type Err = OptimizerParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let momentum = match s {
            "adamw" => return Ok(Self::AdamW),
            "sgd" => Some(0.0),
            _ => s.strip_prefix("sgd:").and_then(|m| m.parse::<f64>().ok()),
        };
        momentum.filter(|m| (0.0..1.0).contains(m)).map(|momentum| Self::Sgd { momentum }).ok_or_else(|| OptimizerParseError(s.to_owned()))
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AdamW => f.write_str("adamw"),
            Self::Sgd { momentum } => write!(f, "sgd:{momentum}"),
        }
    }
}

/// The weight matrices of an encoder layer that [`Trainable::TopLora`] adapts.
pub const LORA_MATRICES: [&str; 6] = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
];

/// A `Trainable` spec that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid trainable spec {0:?}: expected \"head\", \"top:K\", \"body:K\", \"bias:K\", \"lora:R\" (R >= 1) or \"all\"")]
pub struct TrainableParseError(String);

impl FromStr for Trainable {
    type Err = TrainableParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "head" => Ok(Self::Head),
            "all" => Ok(Self::All),
            _ => {
                let layers = |prefix: &str| s.strip_prefix(prefix).and_then(|k| k.parse().ok());
                layers("top:")
                    .map(Self::TopLayers)
                    .or_else(|| layers("body:").map(Self::TopBody))
                    .or_else(|| layers("bias:").map(Self::TopBiases))
                    .or_else(|| layers("lora:").filter(|&r| r >= 1).map(Self::TopLora))
                    .ok_or_else(|| TrainableParseError(s.to_owned()))
            }
        }
    }
}

impl fmt::Display for Trainable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Head => f.write_str("head"),
            Self::TopLayers(k) => write!(f, "top:{k}"),
            Self::TopBody(k) => write!(f, "body:{k}"),
            Self::TopBiases(k) => write!(f, "bias:{k}"),
            Self::TopLora(r) => write!(f, "lora:{r}"),
            Self::All => f.write_str("all"),
        }
    }
}

impl Trainable {
    /// The names among `names` that train under this spec, in the order given.
    pub fn select<'a>(&self, names: impl IntoIterator<Item = &'a str> + Clone) -> Vec<String> {
        let n_layers = names.clone().into_iter().filter_map(encoder_layer_index).max().map_or(0, |m| m + 1);
        let in_top = |name: &str, k: u32| encoder_layer_index(name).is_some_and(|i| i + (k as usize) >= n_layers);
        names
            .into_iter()
            .filter(|name| match self {
                Self::All => true,
                Self::Head => is_head(name),
                Self::TopLayers(k) => is_head(name) || in_top(name, *k),
                Self::TopBody(k) => name.starts_with("bert.pooler.") || in_top(name, *k),
                Self::TopBiases(k) => {
                    name.starts_with("classifier.") || (is_bias_or_norm(name) && (name.starts_with("bert.pooler.") || in_top(name, *k)))
                }
                Self::TopLora(_) => {
                    name.starts_with("classifier.")
                        || (in_top(name, 1)
                            && name
                                .strip_prefix("bert.encoder.layer.")
                                .and_then(|rest| rest.split_once('.'))
                                .is_some_and(|(_, matrix)| LORA_MATRICES.contains(&matrix)))
                }
            })
            .map(str::to_owned)
            .collect()
    }
}

/// The head: the classifier and the pooler that feeds it.
pub fn is_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.starts_with("bert.pooler.")
}

/// A bias vector or a LayerNorm's scale and shift (BitFit's trainable set).
fn is_bias_or_norm(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("LayerNorm.")
}

/// `N` for a tensor of `bert.encoder.layer.N.*`.
pub fn encoder_layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("bert.encoder.layer.")?.split('.').next()?.parse().ok()
}

/// The DP mechanism a site applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrivacyMode {
    Off,
    RecordLevel,
    SiteLevel,
    /// Site-level adjacency, the noise split among the sites of a secure round (protocol 8;
    /// appended last so the other variants keep their encoding).
    Distributed,
}

impl PrivacyMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::RecordLevel => "record-level",
            Self::SiteLevel => "site-level",
            Self::Distributed => "distributed",
        }
    }
}

impl fmt::Display for PrivacyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PrivacyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "record-level" => Ok(Self::RecordLevel),
            "site-level" => Ok(Self::SiteLevel),
            "distributed" => Ok(Self::Distributed),
            _ => Err(format!("unknown privacy mode {s:?}: expected off, record-level, site-level or distributed")),
        }
    }
}

/// How a site's contribution is made differentially private.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum PrivacyPlan {
    /// No differential privacy (for tests and trusted pilots only).
    Off,
    /// DP-SGD inside local training: Poisson sampling at `sampling_rate`, per-example
    /// gradients clipped to `clip_norm`, Gaussian noise of std `noise_multiplier * clip_norm`
    /// on each summed step; the update is then clipped to `update_clip_norm`.
    RecordLevel { noise_multiplier: f64, clip_norm: f64, sampling_rate: f64, update_clip_norm: f64 },
    /// DP-FedAvg style: the update is clipped to `clip_norm` and Gaussian noise of std
    /// `noise_multiplier * clip_norm` is added to each coordinate.
    SiteLevel { noise_multiplier: f64, clip_norm: f64 },
    /// Distributed DP under secure aggregation (site-level adjacency): each site clips its
    /// update to `clip_norm`, quantizes it and adds integer discrete Gaussian noise whose
    /// sum over any `min_honest` sites has std at least `noise_multiplier * clip_norm`
    /// (`dp::distributed`); the coordinator sees only the sum. Offered only with a
    /// `RoundOffer::secure`.
    Distributed { noise_multiplier: f64, clip_norm: f64, min_honest: u64 },
}

impl PrivacyPlan {
    /// The mechanism this plan uses.
    pub fn mode(&self) -> PrivacyMode {
        match self {
            Self::Off => PrivacyMode::Off,
            Self::RecordLevel { .. } => PrivacyMode::RecordLevel,
            Self::SiteLevel { .. } => PrivacyMode::SiteLevel,
            Self::Distributed { .. } => PrivacyMode::Distributed,
        }
    }

    /// The mode's name as written in configs and ledgers.
    pub fn mode_name(&self) -> &'static str {
        self.mode().as_str()
    }
}

/// What a site is asked to do with the global model in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    /// Passes over the local training set (record-level DP: expected passes).
    pub local_epochs: u32,
    /// Mini-batch size (record-level DP: expected batch size is `sampling_rate * n`).
    pub batch_size: u32,
    /// The local optimiser.
    pub optimizer: Optimizer,
    /// Peak learning rate of the optimiser.
    pub learning_rate: f64,
    /// Fraction of the local steps spent warming the learning rate up linearly.
    pub warmup_ratio: f64,
    /// Weight decay (AdamW: decoupled; SGD: added to the gradient).
    pub weight_decay: f64,
    /// Global-norm gradient clipping for non-private training (0 disables).
    pub max_grad_norm: f64,
    /// Tokens per example after truncation.
    pub max_seq_len: u32,
    /// Which part of the model trains.
    pub trainable: Trainable,
    /// The resolved names of the trainable tensors: exactly what an update must contain.
    pub trainable_tensors: Vec<String>,
    /// Seed for local shuffling, dropout and initialisation (never for DP noise).
    pub seed: u64,
    /// The privacy mechanism every site applies.
    pub privacy: PrivacyPlan,
    /// FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): the
    /// weight `mu` of the proximal term `mu/2 ||w - w_global||^2` over the trainable
    /// parameters (under `lora:R`, over the merged change the adapters make), added to the
    /// local objective; 0 turns it off. Data-independent: under DP-SGD its gradient is added
    /// after per-example clipping and noise, so it changes neither.
    pub prox_mu: f64,
}

impl TrainingPlan {
    /// The smallest useful plan: `trainable_tensors` (chosen by `trainable`) train for one
    /// epoch of AdamW at 1e-3 in batches of 4, on notes cut at 16 tokens, without warm-up,
    /// weight decay, gradient clipping, proximal term or differential privacy, seed 1. For tests and dry
    /// runs; set other fields with struct update syntax.
    pub fn minimal(trainable: Trainable, trainable_tensors: Vec<String>) -> Self {
        Self {
            local_epochs: 1,
            batch_size: 4,
            optimizer: Optimizer::default(),
            learning_rate: 1e-3,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 0.0,
            max_seq_len: 16,
            trainable,
            trainable_tensors,
            seed: 1,
            privacy: PrivacyPlan::Off,
            prox_mu: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 7] = [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "bert.encoder.layer.2.output.dense.bias",
        "bert.pooler.dense.weight",
        "classifier.bias",
        "classifier.weight",
    ];

    #[test]
    fn parse_and_display_round_trip() {
        for s in ["head", "top:2", "body:1", "bias:3", "lora:8", "all"] {
            assert_eq!(s.parse::<Trainable>().unwrap().to_string(), s);
        }
        assert!("top:x".parse::<Trainable>().is_err());
        assert!("bias:".parse::<Trainable>().is_err());
        assert!("body:-1".parse::<Trainable>().is_err());
        assert!("lora:0".parse::<Trainable>().is_err());
        for s in ["adamw", "sgd:0", "sgd:0.9"] {
            assert_eq!(s.parse::<Optimizer>().unwrap().to_string(), s);
        }
        assert_eq!("sgd".parse::<Optimizer>().unwrap(), Optimizer::Sgd { momentum: 0.0 });
        assert!("sgd:1".parse::<Optimizer>().is_err());
        assert!("adam".parse::<Optimizer>().is_err());
        assert!("everything".parse::<Trainable>().is_err());
    }

    #[test]
    fn select_head_top_and_all() {
        let head = Trainable::Head.select(NAMES);
        assert_eq!(head, ["bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]);
        let top2 = Trainable::TopLayers(2).select(NAMES);
        assert_eq!(top2.len(), 5);
        assert!(top2.iter().any(|n| n.starts_with("bert.encoder.layer.1.")));
        assert!(!top2.iter().any(|n| n.starts_with("bert.encoder.layer.0.")));
        assert_eq!(Trainable::All.select(NAMES).len(), NAMES.len());
        assert_eq!(Trainable::TopLayers(0).select(NAMES), head);
    }

    #[test]
    fn select_body_is_top_layers_without_the_classifier() {
        let body = Trainable::TopBody(2).select(NAMES);
        let top: Vec<String> = Trainable::TopLayers(2).select(NAMES).into_iter().filter(|n| !n.starts_with("classifier.")).collect();
        assert_eq!(body, top);
        assert!(body.contains(&"bert.pooler.dense.weight".to_owned()));
        assert_eq!(Trainable::TopBody(0).select(NAMES), ["bert.pooler.dense.weight"]);
    }

    #[test]
    fn select_lora_takes_the_adapted_matrices_of_the_top_layer_and_the_classifier() {
        let mut names: Vec<String> = ["bert.pooler.dense.weight", "classifier.bias", "classifier.weight"].map(str::to_owned).to_vec();
        for l in 0..2 {
            for m in LORA_MATRICES {
                names.push(format!("bert.encoder.layer.{l}.{m}"));
            }
            names.push(format!("bert.encoder.layer.{l}.attention.self.query.bias"));
            names.push(format!("bert.encoder.layer.{l}.output.LayerNorm.weight"));
        }
        let selected = Trainable::TopLora(8).select(names.iter().map(String::as_str));
        assert_eq!(selected.len(), 8);
        assert!(selected.contains(&"classifier.weight".to_owned()) && selected.contains(&"classifier.bias".to_owned()));
        assert!(selected
            .iter()
            .filter(|n| n.starts_with("bert."))
            .all(|n| n.starts_with("bert.encoder.layer.1.") && n.ends_with(".weight")));
        assert!(!selected.iter().any(|n| n.contains("LayerNorm")));
    }

    #[test]
    fn select_biases_takes_vectors_of_the_top_layers_and_the_whole_classifier() {
        let names = [
            "bert.encoder.layer.0.output.dense.bias",
            "bert.encoder.layer.1.attention.output.LayerNorm.weight",
            "bert.encoder.layer.1.attention.self.query.bias",
            "bert.encoder.layer.1.attention.self.query.weight",
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight",
        ];
        assert_eq!(
            Trainable::TopBiases(1).select(names),
            [
                "bert.encoder.layer.1.attention.output.LayerNorm.weight",
                "bert.encoder.layer.1.attention.self.query.bias",
                "bert.pooler.dense.bias",
                "classifier.bias",
                "classifier.weight",
            ]
        );
        assert_eq!(Trainable::TopBiases(2).select(names).len(), 6);
    }
}
