//! How an update's tensors travel: raw f32, or quantized (fp16, int8 with one scale per
//! tensor or per row) to cut the bytes a site uploads by 2x to 4x.
//!
//! Quantization is applied by the site **after** its privacy step (clipping and noise), so
//! it is post-processing of a private release and costs no privacy. The site quantizes its
//! delta in place first ([`UpdateEncoding::quantize`]): the values it then records in its
//! ledger (the update's digest), caches for a resend, and sends are exactly the values the
//! coordinator decodes. That needs the encoding to be idempotent: encoding a quantized
//! tensor again gives the same bytes. fp16 is (an f16 value converts to f32 and back
//! exactly); int8 is, because its scales are powers of two: a value `q * 2^k` is exact in
//! f32, dividing by `2^k` recovers `q` exactly, and the largest `|q|` of a row lies in
//! 64..=127, so the scale chosen again is `2^k` again. A power-of-two scale uses at worst
//! 7 of the 8 bits (the largest value maps to 64..=127 rather than to 127).
//!
//! Wire layout per tensor, little-endian: `f32`: the values; `f16`: the values as IEEE
//! half floats; `int8`: one f32 scale, then one i8 per value; `int8-row`: one f32 scale
//! per row (the first dimension; a 1-D tensor is one row), then one i8 per value. The
//! receiver checks the decoded values against the declared digest and for finiteness as
//! it does for f32, so a lying scale is caught like a lying value. Pure.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::tensor::Tensor;

/// The encoding of an update's tensors on the wire, chosen by the coordinator's plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UpdateEncoding {
    /// Raw little-endian f32 (4 bytes a value).
    #[default]
    F32,
    /// IEEE 754 half precision (2 bytes a value).
    F16,
    /// One power-of-two f32 scale per tensor, one i8 per value.
    Int8Tensor,
    /// One power-of-two f32 scale per row, one i8 per value.
    Int8Row,
}

/// A tensor the encoding cannot carry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("a value of {tensor} is beyond what {encoding} can carry (|x| = {value:e})")]
    OutOfRange { tensor: String, encoding: UpdateEncoding, value: f32 },
    #[error("a value of {tensor} is not finite")]
    NonFinite { tensor: String },
    #[error("{got} bytes for a tensor of shape {shape:?} in {encoding}; expected {expected}")]
    Length { shape: Vec<usize>, encoding: UpdateEncoding, expected: usize, got: usize },
}

const NAMES: [(UpdateEncoding, &str); 4] = [
    (UpdateEncoding::F32, "f32"),
    (UpdateEncoding::F16, "f16"),
    (UpdateEncoding::Int8Tensor, "int8"),
    (UpdateEncoding::Int8Row, "int8-row"),
];

impl UpdateEncoding {
    pub fn as_str(self) -> &'static str {
        NAMES.iter().find(|(e, _)| *e == self).map_or("f32", |(_, n)| n)
    }

    /// Rows of `shape` that carry a scale of their own under [`Self::Int8Row`].
    fn rows(shape: &[usize]) -> usize {
        match shape {
            [] | [_] => 1,
            [rows, ..] => *rows,
        }
    }

    /// Bytes one tensor of `shape` takes on the wire.
    pub fn encoded_len(self, shape: &[usize]) -> usize {
        let n: usize = shape.iter().product();
        match self {
            Self::F32 => 4 * n,
            Self::F16 => 2 * n,
            Self::Int8Tensor => 4 + n,
            Self::Int8Row => 4 * Self::rows(shape) + n,
        }
    }

    /// Rounds `t` in place to the values its encoding decodes to (idempotent).
    pub fn quantize(self, name: &str, t: &mut Tensor) -> Result<(), CodecError> {
        if self == Self::F32 {
            return Ok(());
        }
        let mut bytes = Vec::new();
        self.encode(name, t, &mut bytes)?;
        let shape = t.shape().to_vec();
        self.decode(&shape, &bytes, t.data_mut())
    }

    /// Appends `t`'s wire bytes to `out`.
    pub fn encode(self, name: &str, t: &Tensor, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let values = t.data();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(CodecError::NonFinite { tensor: name.to_owned() });
        }
        out.reserve(self.encoded_len(t.shape()));
        match self {
            Self::F32 => out.extend_from_slice(&t.le_bytes()),
            Self::F16 => {
                for &v in values {
                    let h = half::f16::from_f32(v);
                    if h.is_infinite() {
                        return Err(CodecError::OutOfRange { tensor: name.to_owned(), encoding: self, value: v.abs() });
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Self::Int8Tensor => encode_int8_rows(values, 1, out),
            Self::Int8Row => encode_int8_rows(values, Self::rows(t.shape()), out),
        }
        Ok(())
    }

    /// Decodes one tensor of `shape` from exactly its wire bytes into `out`.
    pub fn decode(self, shape: &[usize], bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        let expected = self.encoded_len(shape);
        if bytes.len() != expected || out.len() != shape.iter().product::<usize>() {
            return Err(CodecError::Length { shape: shape.to_vec(), encoding: self, expected, got: bytes.len() });
        }
        match self {
            Self::F32 => {
                for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Self::F16 => {
                for (v, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::Int8Tensor => decode_int8_rows(bytes, 1, out),
            Self::Int8Row => decode_int8_rows(bytes, Self::rows(shape), out),
        }
        Ok(())
    }
}

/// The smallest power of two `s` with `max_abs / s <= 127` (1 for an all-zero row).
fn power_of_two_scale(max_abs: f32) -> f32 {
    if max_abs == 0.0 {
        return 1.0;
    }
    // Normal scales only (2^-126..=2^127), so every `q * s` is exact; log2 rounds, so the
    // exponent is then settled exactly (at most a step either way).
    let mut exponent = ((max_abs / 127.0).log2().ceil() as i32).clamp(-126, 127);
    while exponent < 127 && max_abs / 2f32.powi(exponent) > 127.0 {
        exponent += 1;
    }
    while exponent > -126 && max_abs / 2f32.powi(exponent - 1) <= 127.0 {
        exponent -= 1;
    }
    2f32.powi(exponent)
}

fn encode_int8_rows(values: &[f32], rows: usize, out: &mut Vec<u8>) {
    let row_len = values.len().checked_div(rows).unwrap_or(0);
    let scales: Vec<f32> =
        (0..rows).map(|r| power_of_two_scale(values[r * row_len..(r + 1) * row_len].iter().fold(0.0f32, |m, v| m.max(v.abs())))).collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for (r, s) in scales.iter().enumerate() {
        for &v in &values[r * row_len..(r + 1) * row_len] {
            // Within -127..=127 by the scale's choice; exact division by a power of two.
            out.push(((v / s).round() as i8) as u8);
        }
    }
}

fn decode_int8_rows(bytes: &[u8], rows: usize, out: &mut [f32]) {
    let (scales, codes) = bytes.split_at(4 * rows);
    let row_len = out.len().checked_div(rows).unwrap_or(0);
    for (r, s) in scales.chunks_exact(4).enumerate() {
        let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let range = r * row_len..(r + 1) * row_len;
        for (v, &c) in out[range.clone()].iter_mut().zip(&codes[range]) {
            *v = f32::from(c as i8) * s;
        }
    }
}

impl fmt::Display for UpdateEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UpdateEncoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        NAMES.iter().find(|(_, n)| *n == s).map(|(e, _)| *e).ok_or_else(|| {
            let names: Vec<&str> = NAMES.iter().map(|(_, n)| *n).collect();
            format!("unknown update encoding {s:?}; one of {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    const ALL: [UpdateEncoding; 4] = [UpdateEncoding::F32, UpdateEncoding::F16, UpdateEncoding::Int8Tensor, UpdateEncoding::Int8Row];

    fn random(shape: Vec<usize>, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        // Rows of very different magnitudes, as a noised delta's are.
        let row = shape.get(1).copied().unwrap_or(n).max(1);
        let data = (0..n).map(|i| rng.random_range(-1.0f32..1.0) * 10f32.powi((i / row % 5) as i32 - 3)).collect();
        Tensor::new(shape, data).unwrap()
    }

    #[test]
    fn quantizing_is_idempotent_and_what_the_wire_carries() {
        for encoding in ALL {
            for shape in [vec![7usize, 33], vec![129], vec![1, 1], vec![3, 4, 5]] {
                let original = random(shape.clone(), 7);
                let mut q = original.clone();
                encoding.quantize("t", &mut q).unwrap();
                let mut again = q.clone();
                encoding.quantize("t", &mut again).unwrap();
                assert_eq!(again, q, "{encoding} {shape:?}: quantizing twice changes values");
                let mut bytes = Vec::new();
                encoding.encode("t", &q, &mut bytes).unwrap();
                assert_eq!(bytes.len(), encoding.encoded_len(&shape));
                let mut first = Vec::new();
                encoding.encode("t", &original, &mut first).unwrap();
                assert_eq!(bytes, first, "{encoding}: the quantized tensor's bytes are the original's");
                let mut decoded = vec![0.0; q.len()];
                encoding.decode(&shape, &bytes, &mut decoded).unwrap();
                assert_eq!(decoded, q.data(), "{encoding} {shape:?}: decoding gives the quantized values");
                assert_eq!(Tensor::new(shape.clone(), decoded).unwrap().digest(), q.digest());
            }
        }
    }

    #[test]
    fn the_error_is_within_the_documented_bound() {
        let t = random(vec![16, 64], 3);
        for encoding in ALL {
            let mut q = t.clone();
            encoding.quantize("t", &mut q).unwrap();
            for (r, (a, b)) in t.data().chunks(64).zip(q.data().chunks(64)).enumerate() {
                let row_max = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let all_max = t.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Half a step of the scale, which is below 2 max / 127 (a power of two).
                let bound = match encoding {
                    UpdateEncoding::F32 => 0.0,
                    UpdateEncoding::F16 => row_max * 2f32.powi(-11) + 6e-8,
                    UpdateEncoding::Int8Tensor => all_max / 127.0,
                    UpdateEncoding::Int8Row => row_max / 127.0,
                };
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= bound, "{encoding} row {r}: {x} -> {y}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn bytes_per_value_and_names() {
        assert_eq!(UpdateEncoding::F32.encoded_len(&[384, 1536]), 4 * 384 * 1536);
        assert_eq!(UpdateEncoding::F16.encoded_len(&[384, 1536]), 2 * 384 * 1536);
        assert_eq!(UpdateEncoding::Int8Tensor.encoded_len(&[384, 1536]), 4 + 384 * 1536);
        assert_eq!(UpdateEncoding::Int8Row.encoded_len(&[384, 1536]), 4 * 384 + 384 * 1536);
        assert_eq!(UpdateEncoding::Int8Row.encoded_len(&[4]), 4 + 4);
        for encoding in ALL {
            assert_eq!(encoding.as_str().parse::<UpdateEncoding>(), Ok(encoding));
        }
        assert!("int4".parse::<UpdateEncoding>().unwrap_err().contains("f32, f16, int8, int8-row"));
    }

    #[test]
    fn what_cannot_be_carried_is_refused_with_the_reason() {
        let big = Tensor::new(vec![2], vec![1.0, 1e6]).unwrap();
        let err = UpdateEncoding::F16.encode("w", &big, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, CodecError::OutOfRange { .. }) && err.to_string().contains("w"), "{err}");
        for encoding in ALL {
            let nan = Tensor::new(vec![2], vec![1.0, f32::NAN]).unwrap();
            assert!(matches!(encoding.encode("w", &nan, &mut Vec::new()), Err(CodecError::NonFinite { .. })));
        }
        // The receiver's side: a wrong length is refused before anything is decoded.
        let mut out = vec![0.0; 4];
        assert!(matches!(UpdateEncoding::Int8Row.decode(&[2, 2], &[0; 9], &mut out), Err(CodecError::Length { expected: 12, .. })));
        // A lying scale decodes to what the receiver's finiteness check refuses.
        let mut bytes = f32::NAN.to_le_bytes().to_vec();
        bytes.extend([1u8, 2, 3, 4]);
        UpdateEncoding::Int8Tensor.decode(&[4], &bytes, &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_nan()));
    }
}
