//! Named f32 tensors: the model-agnostic currency between agent, coordinator and models.
//!
//! The coordinator never links candle: it sees a model as a [`TensorSet`], an ordered map
//! from tensor name to a shape and a flat little-endian-ready `Vec<f32>`. Digests are
//! blake3 over the raw little-endian bytes, so both sides agree without serialising.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One dense f32 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Why a tensor or tensor set could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor {name}: shape {shape:?} holds {expected} values, got {got}")]
    ShapeMismatch { name: String, shape: Vec<usize>, expected: usize, got: usize },
    #[error("tensor {name}: {count} non-finite values (first at index {first})")]
    NonFinite { name: String, count: usize, first: usize },
    #[error("tensor {name} has dtype {dtype}; only f32 tensors are accepted")]
    Dtype { name: String, dtype: String },
    #[error("tensor {0} is missing")]
    Missing(String),
    #[error("unexpected tensor {0}")]
    Unexpected(String),
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
}

impl Tensor {
    /// Builds a tensor, checking that `data` fills `shape` exactly.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, TensorError> {
        let expected = element_count(&shape);
        if expected != data.len() {
            return Err(TensorError::ShapeMismatch { name: String::new(), shape, expected, got: data.len() });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = element_count(&shape);
        Self { shape, data: vec![0.0; n] }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The raw little-endian bytes of the values (a view on little-endian hosts).
    pub fn le_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        f32s_to_le_bytes(&self.data)
    }

    /// blake3 of the shape and the little-endian bytes.
    pub fn digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        hash_shape(&mut h, &self.shape);
        h.update(&self.le_bytes());
        Digest(*h.finalize().as_bytes())
    }

    /// Index of the first non-finite value and how many there are, if any.
    pub fn non_finite(&self) -> Option<(usize, usize)> {
        let mut first = None;
        let mut count = 0;
        for (i, v) in self.data.iter().enumerate() {
            if !v.is_finite() {
                first.get_or_insert(i);
                count += 1;
            }
        }
        first.map(|f| (f, count))
    }

    /// Squared L2 norm, accumulated in f64.
    pub fn norm_sq(&self) -> f64 {
        self.data.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
    }
}

/// A blake3 digest, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The name, shape and digest of one tensor: what a peer needs to know before the bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub digest: Digest,
}

/// One tensor's name, little-endian bytes and shape, as safetensors serialises them.
type ByteView<'a> = (&'a str, std::borrow::Cow<'a, [u8]>, &'a [usize]);

/// Named tensors in name order. Name order makes digests and sums reproducible.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorSet {
    tensors: BTreeMap<String, Tensor>,
}

impl TensorSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of f32 values.
    pub fn element_count(&self) -> usize {
        self.tensors.values().map(Tensor::len).sum()
    }

    /// Total payload in bytes.
    pub fn byte_len(&self) -> usize {
        self.element_count() * 4
    }

    /// Keeps only the tensors whose names are in `names`.
    pub fn subset<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Self, TensorError> {
        let mut out = Self::new();
        for name in names {
            let t = self.get(name).ok_or_else(|| TensorError::Missing(name.to_owned()))?;
            out.insert(name, t.clone());
        }
        Ok(out)
    }

    /// Name, shape and digest of every tensor, in name order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.iter().map(|(name, t)| TensorSpec { name: name.to_owned(), shape: t.shape.clone(), digest: t.digest() }).collect()
    }

    /// Digest of the whole set: blake3 over the names and per-tensor digests in name order.
    pub fn digest(&self) -> Digest {
        manifest_digest(&self.specs())
    }

    /// Global L2 norm over every tensor, in f64.
    pub fn l2_norm(&self) -> f64 {
        self.tensors.values().map(Tensor::norm_sq).sum::<f64>().sqrt()
    }

    /// Fails on the first tensor holding NaN or infinity.
    pub fn check_finite(&self) -> Result<(), TensorError> {
        for (name, t) in self.iter() {
            if let Some((first, count)) = t.non_finite() {
                return Err(TensorError::NonFinite { name: name.to_owned(), count, first });
            }
        }
        Ok(())
    }

    /// `self - base` for every tensor of `self`; `base` must hold each with the same shape.
    pub fn delta_from(&self, base: &TensorSet) -> Result<TensorSet, TensorError> {
        let mut out = TensorSet::new();
        for (name, t) in self.iter() {
            let b = base.get(name).ok_or_else(|| TensorError::Missing(name.to_owned()))?;
            check_same_shape(name, b, t)?;
            let data = t.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
            out.insert(name, Tensor { shape: t.shape.clone(), data });
        }
        Ok(out)
    }

    /// Adds `delta` in place; every tensor of `delta` must exist here with the same shape.
    pub fn add_assign(&mut self, delta: &TensorSet) -> Result<(), TensorError> {
        for (name, d) in delta.iter() {
            let t = self.get_mut(name).ok_or_else(|| TensorError::Missing(name.to_owned()))?;
            check_same_shape(name, t, d)?;
            for (x, y) in t.data.iter_mut().zip(&d.data) {
                *x += y;
            }
        }
        Ok(())
    }

    /// Serialises to safetensors bytes (all f32), with optional string metadata.
    pub fn to_safetensors(&self, metadata: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>, TensorError> {
        let bytes = self.le_byte_views();
        Ok(safetensors::serialize(Self::views(&bytes)?, metadata)?)
    }

    /// Writes a safetensors file without building it in memory first (the values are
    /// borrowed on little-endian hosts): for checkpoints of large models.
    pub fn write_safetensors(
        &self,
        path: &std::path::Path,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<(), TensorError> {
        let bytes = self.le_byte_views();
        Ok(safetensors::serialize_to_file(Self::views(&bytes)?, metadata, path)?)
    }

    fn le_byte_views(&self) -> Vec<ByteView<'_>> {
        self.iter().map(|(n, t)| (n, t.le_bytes(), t.shape())).collect()
    }

    fn views<'a>(bytes: &'a [ByteView<'a>]) -> Result<Vec<(&'a str, safetensors::tensor::TensorView<'a>)>, TensorError> {
        bytes
            .iter()
            .map(|(n, b, s)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.to_vec(), b).map(|v| (*n, v)))
            .collect::<Result<_, _>>()
            .map_err(TensorError::from)
    }

    /// Reads f32 tensors from safetensors bytes. Tensors of other dtypes are skipped only
    /// when `skip_non_f32` is set (model files carry e.g. an i64 `position_ids` buffer).
    pub fn from_safetensors(bytes: &[u8], skip_non_f32: bool) -> Result<Self, TensorError> {
        let st = safetensors::SafeTensors::deserialize(bytes)?;
        let mut out = TensorSet::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                if skip_non_f32 {
                    continue;
                }
                return Err(TensorError::Dtype { name, dtype: format!("{:?}", view.dtype()) });
            }
            let data = le_bytes_to_f32s(view.data());
            out.insert(name, Tensor { shape: view.shape().to_vec(), data });
        }
        Ok(out)
    }
}

impl FromIterator<(String, Tensor)> for TensorSet {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        Self { tensors: iter.into_iter().collect() }
    }
}

impl IntoIterator for TensorSet {
    type Item = (String, Tensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

/// Digest of a manifest (names, shapes and tensor digests in the given order).
pub fn manifest_digest(specs: &[TensorSpec]) -> Digest {
    let mut h = blake3::Hasher::new();
    for s in specs {
        h.update(&(s.name.len() as u64).to_le_bytes());
        h.update(s.name.as_bytes());
        hash_shape(&mut h, &s.shape);
        h.update(&s.digest.0);
    }
    Digest(*h.finalize().as_bytes())
}

/// Number of values a shape holds (1 for a scalar).
pub fn element_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Number of values a shape holds, or `None` on overflow: for shapes a peer declared.
pub fn checked_element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Little-endian bytes of f32 values; borrowed on little-endian hosts.
pub fn f32s_to_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// f32 values from little-endian bytes (length must be a multiple of 4).
pub fn le_bytes_to_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn hash_shape(h: &mut blake3::Hasher, shape: &[usize]) {
    h.update(&(shape.len() as u64).to_le_bytes());
    for d in shape {
        h.update(&(*d as u64).to_le_bytes());
    }
}

fn check_same_shape(name: &str, a: &Tensor, b: &Tensor) -> Result<(), TensorError> {
    if a.shape != b.shape {
        return Err(TensorError::ShapeMismatch { name: name.to_owned(), shape: a.shape.clone(), expected: a.len(), got: b.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> TensorSet {
        let mut s = TensorSet::new();
        s.insert("b", Tensor::new(vec![2], vec![1.0, 2.0]).unwrap());
        s.insert("a", Tensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        s
    }

    #[test]
    fn shape_must_match_data() {
        assert!(Tensor::new(vec![2, 3], vec![0.0; 5]).is_err());
        assert!(Tensor::new(vec![], vec![1.0]).is_ok());
    }

    #[test]
    fn safetensors_round_trip_keeps_values_and_digest() {
        let s = set();
        let bytes = s.to_safetensors(None).unwrap();
        let back = TensorSet::from_safetensors(&bytes, false).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.digest(), s.digest());
    }

    #[test]
    fn digest_changes_with_one_value_and_with_shape() {
        let s = set();
        let mut t = s.clone();
        t.get_mut("a").unwrap().data_mut()[3] = 4.0001;
        assert_ne!(s.digest(), t.digest());
        let mut u = s.clone();
        u.insert("a", Tensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        assert_ne!(s.digest(), u.digest());
    }

    #[test]
    fn delta_then_add_restores() {
        let base = set();
        let mut moved = base.clone();
        moved.get_mut("b").unwrap().data_mut()[0] = 5.0;
        let d = moved.delta_from(&base).unwrap();
        assert_eq!(d.get("b").unwrap().data(), &[4.0, 0.0]);
        let mut back = base.clone();
        back.add_assign(&d).unwrap();
        assert_eq!(back, moved);
    }

    #[test]
    fn non_finite_is_found() {
        let mut s = set();
        s.get_mut("b").unwrap().data_mut()[1] = f32::NAN;
        let err = s.check_finite().unwrap_err();
        assert!(matches!(err, TensorError::NonFinite { ref name, first: 1, count: 1 } if name == "b"));
    }

    #[test]
    fn checked_count_catches_overflow() {
        assert_eq!(checked_element_count(&[usize::MAX, 2]), None);
        assert_eq!(checked_element_count(&[3, 4]), Some(12));
    }
}
