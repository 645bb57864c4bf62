//! Bringing a BERT checkpoint into fedward's naming: transformers'
//! `BertForSequenceClassification` keys, with a classification head when the base lacks one.
//!
//! Sentence-transformers checkpoints such as all-MiniLM-L6-v2 store the bare encoder
//! (`embeddings.*`, `encoder.*`, `pooler.*`); fedward's global model always uses the
//! `bert.` prefix and has `classifier.*`. Used by the coordinator to initialise round 0
//! and by the models crate when it loads a pretrained base, so both agree bit for bit.

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::tensor::{Tensor, TensorError, TensorSet};

/// Standard deviation of transformers' default `initializer_range` for BERT.
pub const INIT_STD: f64 = 0.02;

/// Adds the `bert.` prefix to encoder keys that lack it and drops keys that are not model
/// weights (`*.position_ids`).
pub fn normalise_bert_names(set: TensorSet) -> TensorSet {
    set.into_iter()
        .filter(|(name, _)| !name.ends_with("position_ids"))
        .map(|(name, t)| {
            let bare = ["embeddings.", "encoder.", "pooler."].iter().any(|p| name.starts_with(p));
            (if bare { format!("bert.{name}") } else { name }, t)
        })
        .collect()
}

/// Ensures the pooler and a classifier for `num_labels` exist; missing ones are drawn
/// from N(0, 0.02) with zero bias (transformers' initialisation), seeded by `seed`.
/// An existing classifier with another number of labels is an error.
pub fn ensure_classification_head(set: &mut TensorSet, num_labels: usize, seed: u64) -> Result<(), TensorError> {
    let hidden = set
        .get("bert.embeddings.word_embeddings.weight")
        .and_then(|t| t.shape().get(1).copied())
        .ok_or_else(|| TensorError::Missing("bert.embeddings.word_embeddings.weight".into()))?;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f64, INIT_STD).unwrap_or_else(|_| unreachable!("0.02 is a valid std"));
    let mut draw = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| normal.sample(&mut rng) as f32).collect();
        Tensor::new(shape, data)
    };
    if !set.contains("bert.pooler.dense.weight") {
        set.insert("bert.pooler.dense.weight", draw(vec![hidden, hidden])?);
        set.insert("bert.pooler.dense.bias", Tensor::zeros(vec![hidden]));
    }
    match set.get("classifier.weight").map(|t| t.shape().to_vec()) {
        Some(shape) if shape == [num_labels, hidden] => Ok(()),
        Some(shape) => Err(TensorError::ShapeMismatch { name: "classifier.weight".into(), shape, expected: num_labels * hidden, got: 0 }),
        None => {
            set.insert("classifier.weight", draw(vec![num_labels, hidden])?);
            set.insert("classifier.bias", Tensor::zeros(vec![num_labels]));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bare() -> TensorSet {
        let mut s = TensorSet::new();
        s.insert("embeddings.word_embeddings.weight", Tensor::zeros(vec![10, 4]));
        s.insert("encoder.layer.0.output.dense.bias", Tensor::zeros(vec![4]));
        s.insert("pooler.dense.weight", Tensor::zeros(vec![4, 4]));
        s.insert("pooler.dense.bias", Tensor::zeros(vec![4]));
        s.insert("embeddings.position_ids", Tensor::zeros(vec![1, 8]));
        s
    }

    #[test]
    fn bare_encoder_gets_prefix_and_a_seeded_head() {
        let mut s = normalise_bert_names(bare());
        assert!(s.contains("bert.encoder.layer.0.output.dense.bias"));
        assert!(!s.names().any(|n| n.contains("position_ids")));
        ensure_classification_head(&mut s, 3, 7).unwrap();
        assert_eq!(s.get("classifier.weight").unwrap().shape(), &[3, 4]);
        assert_eq!(s.get("bert.pooler.dense.weight").unwrap().data(), &[0.0; 16], "existing pooler kept");
        let mut again = normalise_bert_names(bare());
        ensure_classification_head(&mut again, 3, 7).unwrap();
        assert_eq!(s, again, "same seed, same head");
        let mut wrong = s.clone();
        assert!(ensure_classification_head(&mut wrong, 5, 7).is_err());
    }
}
