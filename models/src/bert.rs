//! BERT for sequence classification in candle: the equivalent of transformers'
//! `BertForSequenceClassification`, trainable end to end.
//!
//! Why our own encoder: candle-transformers' `BertModel` applies LayerNorm through a fused
//! op without a backward pass (gradients silently stop at every layer) and its dropout is a
//! no-op. Here the layer norm is written out in tensor ops when training (the fused op is
//! kept for inference, where it is faster), and dropout masks are drawn on the host from a
//! seeded RNG (candle's CPU RNG cannot be seeded).
//!
//! Pooling: the pooler of transformers (dense + tanh over the `[CLS]` token) feeds the
//! classifier, exactly as in `BertForSequenceClassification`, so an exported model gives the
//! same logits in transformers. The pooler is part of the trainable head.
//!
//! Tensor names are transformers' (`bert.embeddings.*`, `bert.encoder.layer.N.*`,
//! `bert.pooler.*`, `classifier.*`), so checkpoints load both ways.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use fedward_shared::plan::LORA_MATRICES;
use fedward_shared::tensor::{self as st, TensorSet};

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("model tensor {0} is missing")]
    Missing(String),
    #[error("model tensor {name}: shape {got:?}, expected {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("invalid model config: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// The subset of transformers' `BertConfig` the model uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub pad_token_id: u32,
}

fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}

impl BertConfig {
    /// A tiny configuration for tests: 2 layers, hidden 32, 2 heads.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 64,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.hidden_size == 0 || self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::Config(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// Every tensor name and shape of a classifier with `num_labels` labels.
    pub fn tensor_shapes(&self, num_labels: usize) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("bert.embeddings.word_embeddings.weight".into(), vec![self.vocab_size, h]),
            ("bert.embeddings.position_embeddings.weight".into(), vec![self.max_position_embeddings, h]),
            ("bert.embeddings.token_type_embeddings.weight".into(), vec![self.type_vocab_size, h]),
            ("bert.embeddings.LayerNorm.weight".into(), vec![h]),
            ("bert.embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("bert.encoder.layer.{l}");
            for (n, s) in [
                ("attention.self.query.weight", vec![h, h]),
                ("attention.self.query.bias", vec![h]),
                ("attention.self.key.weight", vec![h, h]),
                ("attention.self.key.bias", vec![h]),
                ("attention.self.value.weight", vec![h, h]),
                ("attention.self.value.bias", vec![h]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
                ("intermediate.dense.weight", vec![i, h]),
                ("intermediate.dense.bias", vec![i]),
                ("output.dense.weight", vec![h, i]),
                ("output.dense.bias", vec![h]),
                ("output.LayerNorm.weight", vec![h]),
                ("output.LayerNorm.bias", vec![h]),
            ] {
                v.push((format!("{p}.{n}"), s));
            }
        }
        v.push(("bert.pooler.dense.weight".into(), vec![h, h]));
        v.push(("bert.pooler.dense.bias".into(), vec![h]));
        v.push(("classifier.weight".into(), vec![num_labels, h]));
        v.push(("classifier.bias".into(), vec![num_labels]));
        v
    }
}

/// One tokenized batch, padded to its longest member.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    /// (batch, len) with 1 = real token, 0 = padding.
    pub attention_mask: Tensor,
}

/// Where a forward pass starts and which parameters carry gradients.
pub struct Mode<'a> {
    /// Names whose gradients are wanted; everything else is detached.
    pub trainable: &'a HashSet<String>,
    /// Draws dropout masks when set (training); `None` for evaluation.
    pub dropout_rng: Option<&'a mut rand_chacha::ChaCha8Rng>,
    /// Per-example copies of parameters, (batch, shape..) by name, used instead of the
    /// model's own: the gradient of a copy is then each example's own gradient (DP-SGD
    /// clips them one by one). Adapters, the classifier and bias or LayerNorm vectors can be copied
    /// ([`BertClassifier::supports_per_example`]).
    pub per_example: Option<&'a HashMap<String, Tensor>>,
}

/// A low-rank adapter (LoRA, Hu et al. 2021) on one weight matrix `W` (out, in): the layer
/// computes with `W + scale B A`, `A` (rank, in) drawn at random, `B` (out, rank) zero, so
/// a fresh adapter changes nothing until it trains.
struct Adapter {
    a: Var,
    b: Var,
}

/// `alpha / rank` of every adapter (`alpha = 2 rank`, the usual LoRA choice). Raising it
/// shifts clipped per-example gradients from the classifier toward the adapters; on the
/// demo data 8, 16 and 32 did not help DP-SGD (docs/DEVELOPMENT-NOTES.md).
const ADAPTER_ALPHA_PER_RANK: f64 = 2.0;

/// The names of the two tensors of the adapter on `weight`.
pub fn adapter_names(weight: &str) -> [String; 2] {
    [format!("{weight}.lora_a"), format!("{weight}.lora_b")]
}

/// `BertForSequenceClassification` with its weights in trainable candle `Var`s.
pub struct BertClassifier {
    pub config: BertConfig,
    pub labels: Vec<String>,
    vars: HashMap<String, Var>,
    /// Adapters by the name of the weight they adapt; never exported (see
    /// [`BertClassifier::merge_adapters`]).
    adapters: HashMap<String, Adapter>,
    device: Device,
}

impl BertClassifier {
    /// A model with transformers' initialisation (normal(0, 0.02), LayerNorm 1/0, biases
    /// 0), drawn from a seeded RNG on the host.
    pub fn random(config: BertConfig, labels: Vec<String>, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| ModelError::Config(e.to_string()))?;
        let mut set = TensorSet::new();
        for (name, shape) in config.tensor_shapes(labels.len()) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") || name.ends_with("LayerNorm.bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            set.insert(name, st::Tensor::new(shape, data).map_err(|e| ModelError::Config(e.to_string()))?);
        }
        Self::from_tensors(config, labels, &set, device)
    }

    /// A model holding exactly the tensors of `set` (transformers' names).
    pub fn from_tensors(config: BertConfig, labels: Vec<String>, set: &TensorSet, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut vars = HashMap::new();
        for (name, shape) in config.tensor_shapes(labels.len()) {
            let t = set.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::Shape { name, expected: shape, got: t.shape().to_vec() });
            }
            let tensor = Tensor::from_slice(t.data(), t.shape(), device)?;
            vars.insert(name, Var::from_tensor(&tensor)?);
        }
        Ok(Self { config, labels, vars, adapters: HashMap::new(), device: device.clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Overwrites every weight from `set`, which must hold them all with the right shapes,
    /// and drops any adapters (they live for one round of training).
    pub fn load(&mut self, set: &TensorSet) -> Result<()> {
        self.drop_adapters();
        for (name, shape) in self.config.tensor_shapes(self.labels.len()) {
            let t = set.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::Shape { name, expected: shape, got: t.shape().to_vec() });
            }
            let var = self.vars.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?;
            var.set(&Tensor::from_slice(t.data(), t.shape(), &self.device)?)?;
        }
        Ok(())
    }

    /// All weights as named f32 tensors.
    pub fn tensor_set(&self) -> Result<TensorSet> {
        let mut out = TensorSet::new();
        for (name, var) in &self.vars {
            let t = var.as_tensor();
            let data = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            out.insert(name.clone(), st::Tensor::new(t.dims().to_vec(), data).map_err(|e| ModelError::Config(e.to_string()))?);
        }
        Ok(out)
    }

    /// The `Var`s of the given names, weights or adapter tensors, sorted by name (for the
    /// optimiser).
    pub fn vars_of(&self, names: &HashSet<String>) -> Result<Vec<Var>> {
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.into_iter().map(|n| self.var(n).cloned().ok_or_else(|| ModelError::Missing(n.clone()))).collect()
    }

    fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name).or_else(|| {
            let (weight, part) = name.rsplit_once('.')?;
            let adapter = self.adapters.get(weight)?;
            match part {
                "lora_a" => Some(&adapter.a),
                "lora_b" => Some(&adapter.b),
                _ => None,
            }
        })
    }

    /// Adds fresh adapters of `rank` (scale `alpha / rank` with `alpha = 2 rank`) to the
    /// six matrices of the last encoder layer ([`LORA_MATRICES`]), `A` drawn from
    /// normal(0, 1/in) with `seed`, `B` zero. Returns the adapter tensors' names. Only the
    /// last layer can be adapted: its `[CLS]`-only path is where per-example copies are
    /// supported.
    pub fn add_adapters(&mut self, rank: usize, seed: u64) -> Result<Vec<String>> {
        if rank == 0 {
            return Err(ModelError::Config("adapter rank must be at least 1".into()));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let layer = self.config.num_hidden_layers - 1;
        let mut names = Vec::new();
        for m in LORA_MATRICES {
            let weight = format!("bert.encoder.layer.{layer}.{m}");
            let (out, inp) = self.vars.get(&weight).ok_or_else(|| ModelError::Missing(weight.clone()))?.dims2()?;
            let normal = Normal::new(0.0f32, (1.0 / inp as f32).sqrt()).map_err(|e| ModelError::Config(e.to_string()))?;
            let a: Vec<f32> = (0..rank * inp).map(|_| normal.sample(&mut rng)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), &self.device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, rank), DType::F32, &self.device)?)?;
            names.extend(adapter_names(&weight));
            self.adapters.insert(weight, Adapter { a, b });
        }
        Ok(names)
    }

    /// Drops every adapter without merging it (what a failed training leaves behind).
    pub fn drop_adapters(&mut self) {
        self.adapters.clear();
    }

    /// Folds every adapter into its weight (`W += scale B A`) and drops the adapters: the
    /// model is a plain BERT again, its weights what the adapted model computed with.
    pub fn merge_adapters(&mut self) -> Result<()> {
        for (weight, adapter) in self.adapters.drain() {
            let var = self.vars.get(&weight).ok_or_else(|| ModelError::Missing(weight.clone()))?;
            let update = (adapter.b.as_tensor().matmul(adapter.a.as_tensor())? * ADAPTER_ALPHA_PER_RANK)?;
            var.set(&var.as_tensor().add(&update)?)?;
        }
        Ok(())
    }

    /// The change each adapter makes to its weight, `scale B A`, in name order of the
    /// weights, as tensors that carry gradients back to `A` and `B` (FedProx's term under
    /// `lora:R` is over this merged change).
    pub fn adapter_deltas(&self) -> Result<Vec<Tensor>> {
        let mut weights: Vec<&String> = self.adapters.keys().collect();
        weights.sort();
        weights
            .into_iter()
            .map(|w| {
                let adapter = &self.adapters[w];
                Ok((adapter.b.as_tensor().matmul(adapter.a.as_tensor())? * ADAPTER_ALPHA_PER_RANK)?)
            })
            .collect()
    }

    /// Whether every name in `trainable` can be trained through per-example copies
    /// ([`Mode::per_example`]): adapters, the classifier, and the bias and LayerNorm vectors
    /// of the encoder layers and the pooler (BitFit).
    pub fn supports_per_example(&self, trainable: &HashSet<String>) -> bool {
        trainable.iter().all(|n| {
            let vector = !n.starts_with("bert.embeddings.") && (n.ends_with(".bias") || n.ends_with("LayerNorm.weight"));
            n.starts_with("classifier.") || ((vector || n.ends_with(".lora_a") || n.ends_with(".lora_b")) && self.var(n).is_some())
        })
    }

    fn p(&self, name: &str, mode: &Mode<'_>) -> Result<Tensor> {
        let var = self.vars.get(name).ok_or_else(|| ModelError::Missing(name.to_owned()))?;
        Ok(if mode.trainable.contains(name) { var.as_tensor().clone() } else { var.as_tensor().detach() })
    }

    /// A parameter with a leading batch axis: the per-example copies (batch, ..) when the
    /// mode has them, else the model's own (1, ..), which broadcasts.
    fn p_batched(&self, name: &str, mode: &Mode<'_>) -> Result<Tensor> {
        if let Some(copy) = mode.per_example.and_then(|m| m.get(name)) {
            return Ok(copy.clone());
        }
        let var = self.var(name).ok_or_else(|| ModelError::Missing(name.to_owned()))?;
        let t = if mode.trainable.contains(name) { var.as_tensor().clone() } else { var.as_tensor().detach() };
        Ok(t.unsqueeze(0)?)
    }

    /// A vector parameter (a bias or a LayerNorm scale) shaped to broadcast over (batch,
    /// rows, width) activations: the per-example copies as (batch, 1, width) when the mode
    /// has them, else the model's own (width).
    fn vector(&self, name: &str, mode: &Mode<'_>) -> Result<Tensor> {
        match mode.per_example.and_then(|m| m.get(name)) {
            Some(copy) => Ok(copy.unsqueeze(1)?),
            None => self.p(name, mode),
        }
    }

    /// The adapter's `A` (E, rank, in) and `B` (E, out, rank) with E = batch or 1, if
    /// `weight` has one.
    fn adapter(&self, weight: &str, mode: &Mode<'_>) -> Result<Option<(Tensor, Tensor)>> {
        if !self.adapters.contains_key(weight) {
            return Ok(None);
        }
        let [a, b] = adapter_names(weight);
        Ok(Some((self.p_batched(&a, mode)?, self.p_batched(&b, mode)?)))
    }

    /// `x W^T + bias` plus the adapter's `scale (x A^T) B^T` on (batch, rows, in).
    fn linear_adapted(&self, x: &Tensor, prefix: &str, mode: &Mode<'_>) -> Result<Tensor> {
        let weight = format!("{prefix}.weight");
        let y = linear3d(x, &self.p(&weight, mode)?, &self.vector(&format!("{prefix}.bias"), mode)?)?;
        match self.adapter(&weight, mode)? {
            None => Ok(y),
            Some((a, b)) => {
                let low = x.broadcast_matmul(&a.transpose(1, 2)?)?.broadcast_matmul(&b.transpose(1, 2)?)?;
                Ok(y.add(&(low * ADAPTER_ALPHA_PER_RANK)?)?)
            }
        }
    }

    /// The index of the first encoder layer with a trainable tensor (the layers below it
    /// and the embeddings are a frozen prefix whose output can be cached), or `None` when
    /// the embeddings train.
    pub fn frozen_prefix_layers(&self, trainable: &HashSet<String>) -> Option<usize> {
        if trainable.iter().any(|n| n.starts_with("bert.embeddings.")) {
            return None;
        }
        Some(trainable.iter().filter_map(|n| fedward_shared::plan::encoder_layer_index(n)).min().unwrap_or(self.config.num_hidden_layers))
    }

    /// Embeddings plus layers `0..upto`: the hidden states (batch, len, hidden), or only the
    /// `[CLS]` row (batch, 1, hidden) when `upto` includes the last layer.
    pub fn forward_prefix(&self, batch: &Batch, upto: usize, mode: &mut Mode<'_>) -> Result<Tensor> {
        let x = self.embeddings(batch, mode)?;
        let bias = attention_bias(&batch.attention_mask)?;
        self.forward_layers(x, &bias, 0, upto, mode)
    }

    /// Layers `from..` , the pooler and the classifier on hidden states from layer
    /// `from - 1` (or the embeddings): the logits (batch, labels).
    pub fn forward_suffix(&self, hidden: Tensor, attention_mask: &Tensor, from: usize, mode: &mut Mode<'_>) -> Result<Tensor> {
        let bias = attention_bias(attention_mask)?;
        let x = self.forward_layers(hidden, &bias, from, self.config.num_hidden_layers, mode)?;
        self.head(&x, mode)
    }

    /// The whole model: logits (batch, labels).
    ///
    /// In inference (nothing trains, no dropout, no per-example copies, no adapters) on a
    /// batch padded on the right, it runs on the real tokens only ([`Self::forward_packed`]):
    /// the same logits, to float rounding.
    pub fn forward(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<Tensor> {
        let inference = mode.trainable.is_empty() && mode.dropout_rng.is_none() && mode.per_example.is_none() && self.adapters.is_empty();
        if inference && self.config.num_hidden_layers > 0 {
            if let Some(packing) = Packing::of(&batch.attention_mask)? {
                return self.forward_packed(batch, &packing, mode);
            }
        }
        let x = self.forward_prefix(batch, self.config.num_hidden_layers, mode)?;
        self.head(&x, mode)
    }

    /// Inference without the padding: embeddings, layer norms, projections and the FFN
    /// run on the batch's real tokens packed into (tokens, hidden), and only the attention
    /// scores are formed on the padded (batch, heads, len, len) layout, with the padding
    /// mask as in the standard layer. In a batch of notes of mixed lengths most of the
    /// padded rows are padding (the demo's notes: about 40 tokens on average, batches padded
    /// to about 80), and the matrix products on them were most of the work. The last layer
    /// is the `[CLS]`-only one, as in training.
    fn forward_packed(&self, batch: &Batch, packing: &Packing, mode: &mut Mode<'_>) -> Result<Tensor> {
        let len = packing.len;
        if len > self.config.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "sequence of {len} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let table = |name: &str, ids: &Tensor| -> Result<Tensor> { Ok(self.p(name, mode)?.index_select(ids, 0)?) };
        let ids = batch.input_ids.flatten_all()?.index_select(&packing.gather, 0)?;
        let types = batch.token_type_ids.flatten_all()?.index_select(&packing.gather, 0)?;
        let w = table("bert.embeddings.word_embeddings.weight", &ids)?;
        let t = table("bert.embeddings.token_type_embeddings.weight", &types)?;
        let p = table("bert.embeddings.position_embeddings.weight", &packing.positions)?;
        let mut x = self.layer_norm(&w.add(&t)?.add(&p)?, "bert.embeddings.LayerNorm", mode)?;
        let bias = attention_bias(&batch.attention_mask)?;
        let last = self.config.num_hidden_layers - 1;
        for l in 0..last {
            x = self.packed_layer(&x, &bias, l, packing, mode)?;
        }
        let padded = x.index_select(&packing.scatter, 0)?.reshape((packing.batch, len, self.config.hidden_size))?;
        let x = self.layer(&padded, &bias, last, true, mode)?;
        self.head(&x, mode)
    }

    /// One encoder layer on packed tokens (tokens, hidden), in inference: the query, key and
    /// value projections as one product with the three weights stacked, the attention on
    /// the padded layout (fused softmax), everything else on the packed rows.
    fn packed_layer(&self, x: &Tensor, bias: &Tensor, l: usize, packing: &Packing, mode: &Mode<'_>) -> Result<Tensor> {
        let p = format!("bert.encoder.layer.{l}");
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let dh = h / heads;
        let (b, len) = (packing.batch, packing.len);
        let param = |name: &str| self.p(&format!("{p}.{name}"), mode);
        let [wq, wk, wv] = ["query", "key", "value"].map(|m| param(&format!("attention.self.{m}.weight")));
        let [bq, bk, bv] = ["query", "key", "value"].map(|m| param(&format!("attention.self.{m}.bias")));
        let qkv = linear2d(x, &Tensor::cat(&[wq?, wk?, wv?], 0)?, &Tensor::cat(&[bq?, bk?, bv?], 0)?)?;
        // (batch, 3 heads, len, head size); a padding slot holds a copy of a real token of its
        // sequence, which the mask keeps out of every score.
        let qkv = qkv.index_select(&packing.scatter, 0)?.reshape((b, len, 3 * heads, dh))?.transpose(1, 2)?.contiguous()?;
        let (q, k, v) = (qkv.narrow(1, 0, heads)?, qkv.narrow(1, heads, heads)?.contiguous()?, qkv.narrow(1, 2 * heads, heads)?);
        let scores = (q.contiguous()?.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v.contiguous()?)?.transpose(1, 2)?.contiguous()?.reshape((b * len, h))?;
        let ctx = ctx.index_select(&packing.gather, 0)?;
        let attn = linear2d(&ctx, &param("attention.output.dense.weight")?, &param("attention.output.dense.bias")?)?;
        let attn = self.layer_norm(&attn.add(x)?, &format!("{p}.attention.output.LayerNorm"), mode)?;
        let inter = linear2d(&attn, &param("intermediate.dense.weight")?, &param("intermediate.dense.bias")?)?.gelu_erf()?;
        let out = linear2d(&inter, &param("output.dense.weight")?, &param("output.dense.bias")?)?;
        self.layer_norm(&out.add(&attn)?, &format!("{p}.output.LayerNorm"), mode)
    }

    fn forward_layers(&self, mut x: Tensor, bias: &Tensor, from: usize, to: usize, mode: &mut Mode<'_>) -> Result<Tensor> {
        let last = self.config.num_hidden_layers - 1;
        for l in from..to {
            // Only `[CLS]` of the last layer reaches the pooler, so that layer computes
            // only its row, attending over every token without projecting them to keys
            // and values (`cls_attention`): the same logits for a small part of the work.
            x = self.layer(&x, bias, l, l == last, mode)?;
        }
        Ok(x)
    }

    /// Pooler over `[CLS]`, dropout, classifier. Accepts (batch, len, hidden) or, for a
    /// cache of the `[CLS]` rows, (batch, 1, hidden).
    pub fn head(&self, x: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        // The bias is (batch, hidden) per example, else (1, hidden): either adds to `cls`.
        let pooler_bias = self.p_batched("bert.pooler.dense.bias", mode)?;
        let pooled = linear2d(&cls, &self.p("bert.pooler.dense.weight", mode)?, &pooler_bias)?.tanh()?;
        let pooled = self.dropout(&pooled, self.config.hidden_dropout_prob, mode)?;
        if mode.per_example.is_some_and(|m| m.contains_key("classifier.weight")) {
            // (batch, 1, hidden) x (batch, hidden, labels): each example its own classifier.
            let weight = self.p_batched("classifier.weight", mode)?;
            let bias = self.p_batched("classifier.bias", mode)?;
            let logits = pooled.unsqueeze(1)?.broadcast_matmul(&weight.transpose(1, 2)?)?.squeeze(1)?;
            return Ok(logits.broadcast_add(&bias)?);
        }
        linear2d(&pooled, &self.p("classifier.weight", mode)?, &self.p("classifier.bias", mode)?)
    }

    fn embeddings(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<Tensor> {
        let (b, l) = batch.input_ids.dims2()?;
        if l > self.config.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "sequence of {l} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let h = self.config.hidden_size;
        let word = self.p("bert.embeddings.word_embeddings.weight", mode)?;
        let pos = self.p("bert.embeddings.position_embeddings.weight", mode)?;
        let typ = self.p("bert.embeddings.token_type_embeddings.weight", mode)?;
        let w = word.index_select(&batch.input_ids.flatten_all()?, 0)?.reshape((b, l, h))?;
        let t = typ.index_select(&batch.token_type_ids.flatten_all()?, 0)?.reshape((b, l, h))?;
        let p = pos.narrow(0, 0, l)?.unsqueeze(0)?;
        let x = w.add(&t)?.broadcast_add(&p)?;
        let x = self.layer_norm(&x, "bert.embeddings.LayerNorm", mode)?;
        self.dropout(&x, self.config.hidden_dropout_prob, mode)
    }

    /// One encoder layer; with `cls_only` it returns only the `[CLS]` row (batch, 1, hidden).
    fn layer(&self, x: &Tensor, bias: &Tensor, l: usize, cls_only: bool, mode: &mut Mode<'_>) -> Result<Tensor> {
        let p = format!("bert.encoder.layer.{l}");
        let (b, _, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let dh = h / heads;
        let proj = |input: &Tensor, name: &str, mode: &Mode<'_>| -> Result<Tensor> {
            let rows = input.dim(1)?;
            let y = linear3d(input, &self.p(&format!("{p}.{name}.weight"), mode)?, &self.vector(&format!("{p}.{name}.bias"), mode)?)?;
            Ok(y.reshape((b, rows, heads, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let x_q = if cls_only { x.narrow(1, 0, 1)? } else { x.clone() };
        let ctx = if cls_only {
            self.cls_attention(x, bias, &p, mode)?
        } else {
            let q = proj(&x_q, "attention.self.query", mode)?;
            let k = proj(x, "attention.self.key", mode)?;
            let v = proj(x, "attention.self.value", mode)?;
            let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(bias)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let probs = self.dropout(&probs, self.config.attention_probs_dropout_prob, mode)?;
            probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape(x_q.shape())?
        };
        let attn = self.linear_adapted(&ctx, &format!("{p}.attention.output.dense"), mode)?;
        let attn = self.dropout(&attn, self.config.hidden_dropout_prob, mode)?;
        let attn = self.layer_norm(&attn.add(&x_q)?, &format!("{p}.attention.output.LayerNorm"), mode)?;
        let inter = self.linear_adapted(&attn, &format!("{p}.intermediate.dense"), mode)?.gelu_erf()?;
        let out = self.linear_adapted(&inter, &format!("{p}.output.dense"), mode)?;
        let out = self.dropout(&out, self.config.hidden_dropout_prob, mode)?;
        self.layer_norm(&out.add(&attn)?, &format!("{p}.output.LayerNorm"), mode)
    }

    /// The self-attention context of the `[CLS]` query alone, (batch, 1, hidden), computed
    /// without projecting every token to keys and values. For head `j`, the score of token
    /// `t` is `q_j . (Wk_j x_t + bk_j) = (Wk_j^T q_j) . x_t + q_j . bk_j`; the last term is
    /// the same for every token, so softmax cancels it. The context is
    /// `sum_t p_jt (Wv_j x_t + bv_j) = Wv_j (sum_t p_jt x_t) + (sum_t p_jt) bv_j` (the sum of
    /// the probabilities is 1 but for attention dropout). Both sides are exactly the
    /// standard layer's, gradients included, for about 1/30 of the work on the tokens:
    /// `2 len hidden^2` multiply-adds for the key and value projections become
    /// `2 heads len hidden`, and the layer's cost no longer grows with the note's length
    /// much beyond that of its `[CLS]` row.
    fn cls_attention(&self, x: &Tensor, bias: &Tensor, p: &str, mode: &mut Mode<'_>) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let dh = h / heads;
        let param = |name: &str| self.p(&format!("{p}.attention.self.{name}"), mode);
        let (key, value) = (param("key.weight")?, param("value.weight")?);
        // (E, 1, hidden), E = batch for per-example copies, else 1 (from (hidden)).
        let value_bias = self.vector(&format!("{p}.attention.self.value.bias"), mode)?;
        let value_bias = value_bias.reshape((value_bias.elem_count() / h, heads, dh))?;
        let q = self.linear_adapted(&x.narrow(1, 0, 1)?, &format!("{p}.attention.self.query"), mode)?.squeeze(1)?;
        // (heads, batch, dh) x (heads, dh, hidden): each head's query pulled back through its
        // key projection, scaled as the scores are.
        let q = (q.reshape((b, heads, dh))? / (dh as f64).sqrt())?;
        let mut pulled = q.transpose(0, 1)?.contiguous()?.matmul(&key.reshape((heads, dh, h))?)?.transpose(0, 1)?.contiguous()?;
        if let Some((a, bk)) = self.adapter(&format!("{p}.attention.self.key.weight"), mode)? {
            // Through `scale B A` instead: each head's query against its rows of B
            // (batch, heads, 1, dh) x (E, heads, dh, rank), then A (E, rank, hidden).
            let e = bk.dim(0)?;
            let rank = bk.dim(2)?;
            let u = q.unsqueeze(2)?.broadcast_matmul(&bk.reshape((e, heads, dh, rank))?)?.squeeze(2)?;
            pulled = pulled.add(&(u.broadcast_matmul(&a)? * ADAPTER_ALPHA_PER_RANK)?)?;
        }
        // (batch, heads, hidden) x (batch, hidden, len) plus the padding mask (batch, 1, len).
        let scores = pulled.matmul(&x.t()?)?.broadcast_add(&bias.reshape((b, 1, len))?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let probs = self.dropout(&probs, self.config.attention_probs_dropout_prob, mode)?;
        // Probability-weighted token mixture per head (batch, heads, hidden), then each head's
        // value projection: (heads, batch, hidden) x (heads, hidden, dh).
        let mixed = probs.matmul(x)?;
        let mut values = mixed.transpose(0, 1)?.contiguous()?.matmul(&value.reshape((heads, dh, h))?.t()?)?.transpose(0, 1)?;
        if let Some((a, bv)) = self.adapter(&format!("{p}.attention.self.value.weight"), mode)? {
            // scale B_j (A mixed_j) per head j: (batch, heads, rank), then each head's rows
            // of B: (batch, heads, 1, rank) x (E, heads, rank, dh).
            let e = bv.dim(0)?;
            let rank = bv.dim(2)?;
            let u = mixed.broadcast_matmul(&a.transpose(1, 2)?)?.unsqueeze(2)?;
            let bv = bv.reshape((e, heads, dh, rank))?.transpose(2, 3)?;
            values = values.add(&(u.broadcast_matmul(&bv)?.squeeze(2)? * ADAPTER_ALPHA_PER_RANK)?)?;
        }
        let mass = probs.sum_keepdim(D::Minus1)?;
        let ctx = values.broadcast_add(&mass.broadcast_mul(&value_bias)?)?;
        Ok(ctx.contiguous()?.reshape((b, 1, h))?)
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str, mode: &Mode<'_>) -> Result<Tensor> {
        let w = self.vector(&format!("{prefix}.weight"), mode)?;
        let b = self.vector(&format!("{prefix}.bias"), mode)?;
        let eps = self.config.layer_norm_eps as f32;
        // The fused op has no backward pass: use it only where no gradient can flow, i.e.
        // nothing at or below this layer trains.
        let layer = fedward_shared::plan::encoder_layer_index(prefix);
        let needs_grad = mode.trainable.iter().any(|n| {
            n.starts_with("bert.embeddings.") || layer.is_some_and(|l| fedward_shared::plan::encoder_layer_index(n).is_some_and(|i| i <= l))
        });
        Ok(if needs_grad { candle_nn::ops::layer_norm_slow(x, &w, &b, eps)? } else { candle_nn::ops::layer_norm(x, &w, &b, eps)? })
    }

    fn dropout(&self, x: &Tensor, p: f64, mode: &mut Mode<'_>) -> Result<Tensor> {
        let Some(rng) = mode.dropout_rng.as_deref_mut() else { return Ok(x.clone()) };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() < keep { scale } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        Ok(x.mul(&mask)?)
    }
}

/// Where the real tokens of a batch padded on the right sit, for
/// [`BertClassifier::forward_packed`].
struct Packing {
    batch: usize,
    len: usize,
    /// (tokens): each real token's row in the flattened (batch * len) layout, in order.
    gather: Tensor,
    /// (batch * len): the packed row each padded slot takes, the slot's own token or, for
    /// padding, the first token of its sequence.
    scatter: Tensor,
    /// (tokens): each real token's position in its sequence.
    positions: Tensor,
}

impl Packing {
    /// `None` unless every row of the mask is ones then zeros, with at least one token.
    fn of(mask: &Tensor) -> Result<Option<Self>> {
        let (batch, len) = mask.dims2()?;
        let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let (mut gather, mut scatter, mut positions) = (Vec::new(), Vec::with_capacity(batch * len), Vec::new());
        for (i, row) in rows.iter().enumerate() {
            let n = row.iter().take_while(|&&m| m == 1).count();
            if n == 0 || row[n..].iter().any(|&m| m != 0) {
                return Ok(None);
            }
            let first = gather.len() as u32;
            gather.extend((0..n).map(|t| (i * len + t) as u32));
            positions.extend(0..n as u32);
            scatter.extend((0..len).map(|t| if t < n { first + t as u32 } else { first }));
        }
        let device = mask.device();
        let tokens = gather.len();
        Ok(Some(Self {
            batch,
            len,
            gather: Tensor::from_vec(gather, tokens, device)?,
            scatter: Tensor::from_vec(scatter, batch * len, device)?,
            positions: Tensor::from_vec(positions, tokens, device)?,
        }))
    }
}

/// (batch, len) mask of 1/0 to an additive bias (batch, 1, 1, len): 0 to keep, a large
/// negative number to ignore.
pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    Ok(((m - 1.0)? * 1e9)?.reshape((b, 1, 1, l))?)
}

/// `x W^T + b` on (batch, rows, in) as one 2-D matmul (faster on CPU than a batched one);
/// `b` is (out) or per example (batch, 1, out).
fn linear3d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (bs, l, i) = x.dims3()?;
    let o = w.dim(0)?;
    let y = x.reshape((bs * l, i))?.matmul(&w.t()?)?;
    Ok(y.reshape((bs, l, o))?.broadcast_add(b)?)
}

fn linear2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[CLS]`-only attention of the last layer gives the standard layer's `[CLS]` row
    /// and the same gradients for every weight of the layer, with non-zero biases and
    /// padded sequences.
    #[test]
    fn cls_only_layer_matches_the_full_layer_row_and_its_gradients() {
        let mut config = BertConfig::tiny(50);
        config.num_attention_heads = 4;
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let device = Device::Cpu;
        let mut set = BertClassifier::random(config.clone(), labels.clone(), 3, &device).unwrap().tensor_set().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (name, t) in set.iter_mut() {
            if name.ends_with(".bias") {
                t.data_mut().iter_mut().for_each(|v| *v = rng.random_range(-0.5..0.5));
            }
        }
        let model = BertClassifier::from_tensors(config, labels, &set, &device).unwrap();
        let last = model.config.num_hidden_layers - 1;
        let trainable: HashSet<String> =
            set.names().filter(|n| fedward_shared::plan::encoder_layer_index(n) == Some(last)).map(str::to_owned).collect();

        let (b, len, h) = (3, 7, model.config.hidden_size);
        let x: Vec<f32> = (0..b * len * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        // A variable, so that the gradient flowing down to the layers below is compared too.
        let x = Var::from_tensor(&Tensor::from_vec(x, (b, len, h), &device).unwrap()).unwrap();
        let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0], (b, len), &device).unwrap();
        let bias = attention_bias(&mask).unwrap();
        let probe: Vec<f32> = (0..b * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let probe = Tensor::from_vec(probe, (b, 1, h), &device).unwrap();

        let run = |cls_only: bool| {
            let mut mode = Mode { trainable: &trainable, dropout_rng: None, per_example: None };
            let out = model.layer(&x, &bias, last, cls_only, &mut mode).unwrap().narrow(1, 0, 1).unwrap();
            let grads = out.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
            let mut by_name: Vec<(String, Vec<f32>)> = trainable
                .iter()
                .map(|n| {
                    let g = grads.get(model.vars[n].as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    (n.clone(), g.unwrap_or_else(|| vec![0.0; model.vars[n].elem_count()]))
                })
                .collect();
            by_name.sort_by(|a, b| a.0.cmp(&b.0));
            by_name.push(("input".to_owned(), grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()));
            (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), by_name)
        };
        let (full, full_grads) = run(false);
        let (cls, cls_grads) = run(true);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(close(&full, &cls) < 1e-5, "outputs differ by {}", close(&full, &cls));
        for ((name, a), (_, b)) in full_grads.iter().zip(&cls_grads) {
            let scale = a.iter().map(|v| v.abs()).fold(1e-3f32, f32::max);
            assert!(close(a, b) / scale < 1e-4, "{name}: gradients differ by {} (scale {scale})", close(a, b));
        }
        // The key bias cancels in softmax: its gradient is zero in both forms.
        let key_bias = format!("bert.encoder.layer.{last}.attention.self.key.bias");
        let g = &cls_grads.iter().find(|(n, _)| *n == key_bias).unwrap().1;
        assert!(g.iter().all(|v| v.abs() < 1e-5));
    }

    /// The packed inference path gives the padded path's logits, on a batch with padding
    /// and non-zero biases everywhere; a mask that is not ones-then-zeros takes the padded
    /// path.
    #[test]
    fn packed_inference_matches_the_padded_forward() {
        let mut config = BertConfig::tiny(50);
        config.num_attention_heads = 4;
        config.num_hidden_layers = 3;
        let labels = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let device = Device::Cpu;
        let mut set = BertClassifier::random(config.clone(), labels.clone(), 3, &device).unwrap().tensor_set().unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (name, t) in set.iter_mut() {
            if name.ends_with(".bias") {
                t.data_mut().iter_mut().for_each(|v| *v = rng.random_range(-0.5..0.5));
            }
        }
        let model = BertClassifier::from_tensors(config, labels, &set, &device).unwrap();
        let none = HashSet::new();
        let padded = |batch: &Batch| -> Vec<Vec<f32>> {
            let mut mode = Mode { trainable: &none, dropout_rng: None, per_example: None };
            let x = model.forward_prefix(batch, model.config.num_hidden_layers, &mut mode).unwrap();
            model.head(&x, &mut mode).unwrap().to_vec2().unwrap()
        };
        let forward = |batch: &Batch| -> Vec<Vec<f32>> {
            model.forward(batch, &mut Mode { trainable: &none, dropout_rng: None, per_example: None }).unwrap().to_vec2().unwrap()
        };
        let batch = tiny_batch(&device);
        assert!(Packing::of(&batch.attention_mask).unwrap().is_some());
        let (want, got) = (padded(&batch), forward(&batch));
        for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Padding on the left: not packed, the padded path's own logits.
        let left = Batch {
            input_ids: Tensor::from_vec(vec![0u32, 2, 7, 3, 2, 8, 9, 3], (2, 4), &device).unwrap(),
            token_type_ids: Tensor::zeros((2, 4), DType::U32, &device).unwrap(),
            attention_mask: Tensor::from_vec(vec![0u32, 1, 1, 1, 1, 1, 1, 1], (2, 4), &device).unwrap(),
        };
        assert!(Packing::of(&left.attention_mask).unwrap().is_none());
        assert_eq!(padded(&left), forward(&left));
    }

    fn tiny_with_adapters(rank: usize) -> (BertClassifier, Vec<String>) {
        let mut config = BertConfig::tiny(50);
        config.num_attention_heads = 4;
        let labels = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let mut model = BertClassifier::random(config, labels, 3, &Device::Cpu).unwrap();
        let names = model.add_adapters(rank, 5).unwrap();
        // Non-zero B, so that every adapter path contributes.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for n in names.iter().filter(|n| n.ends_with(".lora_b")) {
            let v = model.var(n).unwrap();
            let data: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.3..0.3)).collect();
            v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        (model, names)
    }

    fn tiny_batch(device: &Device) -> Batch {
        let ids = Tensor::from_vec(vec![2u32, 7, 9, 11, 3, 2, 8, 3, 0, 0, 2, 40, 41, 42, 3], (3, 5), device).unwrap();
        let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1], (3, 5), device).unwrap();
        Batch { input_ids: ids, token_type_ids: Tensor::zeros((3, 5), DType::U32, device).unwrap(), attention_mask: mask }
    }

    /// The adapted layer computes with `W + scale B A`: merging the adapters into the
    /// weights gives the same logits.
    #[test]
    fn merged_adapters_give_the_adapted_models_logits() {
        let (mut model, _) = tiny_with_adapters(3);
        let batch = tiny_batch(&Device::Cpu);
        let none = HashSet::new();
        let logits = |m: &BertClassifier| -> Vec<Vec<f32>> {
            m.forward(&batch, &mut Mode { trainable: &none, dropout_rng: None, per_example: None }).unwrap().to_vec2().unwrap()
        };
        let adapted = logits(&model);
        let plain =
            BertClassifier::from_tensors(model.config.clone(), model.labels.clone(), &model.tensor_set().unwrap(), &Device::Cpu).unwrap();
        assert_ne!(logits(&plain), adapted, "the adapters change the logits");
        model.merge_adapters().unwrap();
        assert!(model.adapters.is_empty());
        let merged = logits(&model);
        for (a, b) in adapted.iter().flatten().zip(merged.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// Per-example copies of the adapters and the classifier: the gradient of example i's
    /// copy in a batched pass is example i's own gradient from a pass on it alone.
    #[test]
    fn per_example_copies_give_each_examples_own_gradient() {
        let (model, mut names) = tiny_with_adapters(2);
        names.extend(["classifier.weight".to_owned(), "classifier.bias".to_owned()]);
        assert_per_example_gradients(&model, &names);
    }

    /// The same for the bias and LayerNorm vectors of every layer (the full-sequence layer
    /// and the `[CLS]`-only last one), the pooler's bias and the classifier (BitFit).
    #[test]
    fn per_example_copies_of_biases_and_layer_norms_give_each_examples_own_gradient() {
        let (model, _) = tiny_with_adapters(2);
        let names: Vec<String> = model
            .vars
            .keys()
            .filter(|n| {
                !n.starts_with("bert.embeddings.")
                    && (n.ends_with(".bias") || n.ends_with("LayerNorm.weight") || n.starts_with("classifier."))
            })
            .cloned()
            .collect();
        assert!(names.iter().any(|n| n.contains("layer.0.") && n.ends_with("value.bias")));
        assert!(names.contains(&"bert.pooler.dense.bias".to_owned()));
        assert_per_example_gradients(&model, &names);
    }

    fn assert_per_example_gradients(model: &BertClassifier, names: &[String]) {
        let trainable: HashSet<String> = names.iter().cloned().collect();
        assert!(model.supports_per_example(&trainable));
        let device = Device::Cpu;
        let batch = tiny_batch(&device);
        let labels = [0u32, 2, 1];
        let n = labels.len();

        let copies: HashMap<String, Var> = names
            .iter()
            .map(|name| {
                let t = model.var(name).unwrap().as_tensor();
                let mut shape = vec![n];
                shape.extend(t.dims());
                (name.clone(), Var::from_tensor(&t.unsqueeze(0).unwrap().broadcast_as(shape).unwrap().contiguous().unwrap()).unwrap())
            })
            .collect();
        let tensors: HashMap<String, Tensor> = copies.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let logits = model.forward(&batch, &mut Mode { trainable: &trainable, dropout_rng: None, per_example: Some(&tensors) }).unwrap();
        let target = Tensor::from_vec(labels.to_vec(), n, &device).unwrap();
        let grads = (candle_nn::loss::cross_entropy(&logits, &target).unwrap() * n as f64).unwrap().backward().unwrap();

        for (i, &label) in labels.iter().enumerate() {
            let one = Batch {
                input_ids: batch.input_ids.narrow(0, i, 1).unwrap(),
                token_type_ids: batch.token_type_ids.narrow(0, i, 1).unwrap(),
                attention_mask: batch.attention_mask.narrow(0, i, 1).unwrap(),
            };
            let logits = model.forward(&one, &mut Mode { trainable: &trainable, dropout_rng: None, per_example: None }).unwrap();
            let target = Tensor::from_vec(vec![label], 1, &device).unwrap();
            let alone = candle_nn::loss::cross_entropy(&logits, &target).unwrap().backward().unwrap();
            for name in names {
                // The key bias cancels in softmax: no gradient at all, alone or batched.
                let Some(own) = alone.get(model.var(name).unwrap().as_tensor()) else {
                    assert!(name.ends_with("key.bias"), "{name} has no gradient");
                    assert!(grads.get(copies[name].as_tensor()).is_none(), "{name}: a gradient batched but none alone");
                    continue;
                };
                let want = own.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = grads.get(copies[name].as_tensor()).unwrap().get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = want.iter().map(|v| v.abs()).fold(1e-4f32, f32::max);
                let diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(diff / scale < 1e-4, "example {i}, {name}: differs by {diff} (scale {scale})");
            }
        }
    }
}
