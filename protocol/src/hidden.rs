//! Hidden states (activations between transformer blocks) as they travel: raw
//! little-endian bytes with a shape and a dtype, never element by element.

use std::fmt;
use std::str::FromStr;

use crate::limits::{MAX_HIDDEN_BYTES, MAX_HIDDEN_DIMS};

/// The element type of hidden states on the wire. Servers compute in whatever precision
/// they like; this is only how the numbers travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WireDType {
    /// IEEE 754 single precision, 4 bytes little-endian. Exact; the default.
    F32,
    /// IEEE 754 half precision, 2 bytes little-endian. Halves traffic; loses precision.
    F16,
    /// bfloat16, 2 bytes little-endian. Halves traffic; keeps f32's range.
    BF16,
}

impl WireDType {
    /// Every dtype.
    pub const ALL: [WireDType; 3] = [WireDType::F32, WireDType::F16, WireDType::BF16];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::BF16 => 2,
        }
    }

    /// The stable tag that travels on the wire.
    pub const fn tag(self) -> u8 {
        match self {
            WireDType::F32 => 0,
            WireDType::F16 => 1,
            WireDType::BF16 => 2,
        }
    }

    /// The dtype with wire tag `tag`, if any.
    pub const fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(WireDType::F32),
            1 => Some(WireDType::F16),
            2 => Some(WireDType::BF16),
            _ => None,
        }
    }

    /// The lowercase name: `f32`, `f16` or `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for WireDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WireDType {
    type Err = HiddenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WireDType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| HiddenError::UnknownDType(s.chars().take(16).collect()))
    }
}

/// Why hidden states were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HiddenError {
    /// The shape has no dimension or too many.
    #[error("hidden states have {dims} dimensions; expected 1 to {MAX_HIDDEN_DIMS}")]
    BadRank {
        /// The number of dimensions given.
        dims: usize,
    },
    /// A dimension is zero.
    #[error("hidden states shape {shape:?} has a zero dimension")]
    ZeroDim {
        /// The shape given.
        shape: Vec<u32>,
    },
    /// The shape describes more bytes than a frame may carry.
    #[error(
        "hidden states shape {shape:?} of {dtype} is larger than the limit of {MAX_HIDDEN_BYTES} bytes"
    )]
    TooLarge {
        /// The shape given.
        shape: Vec<u32>,
        /// The dtype given.
        dtype: WireDType,
    },
    /// The byte count does not match the shape and dtype.
    #[error("hidden states shape {shape:?} of {dtype} needs {expected} bytes, got {actual}")]
    LengthMismatch {
        /// The shape given.
        shape: Vec<u32>,
        /// The dtype given.
        dtype: WireDType,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The number of f32 values does not match the shape.
    #[error("hidden states shape {shape:?} needs {expected} values, got {actual}")]
    ElementMismatch {
        /// The shape given.
        shape: Vec<u32>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A dtype name that is not `f32`, `f16` or `bf16`.
    #[error("unknown wire dtype {0:?}; expected f32, f16 or bf16")]
    UnknownDType(String),
}

/// Hidden states: `data` holds `product(shape)` elements of `dtype`, little-endian, in
/// row-major order. The usual shape is `[batch, tokens, hidden]`.
///
/// The fields are private, so every value in memory is consistent: 1 to
/// [`MAX_HIDDEN_DIMS`] non-zero dimensions, at most [`MAX_HIDDEN_BYTES`] bytes, and exactly
/// as many bytes as the shape and dtype say.
#[derive(Clone, PartialEq, Eq)]
pub struct HiddenStates {
    dtype: WireDType,
    shape: Vec<u32>,
    data: Vec<u8>,
}

impl HiddenStates {
    /// Checks that `data` holds exactly the bytes that `shape` and `dtype` need.
    pub fn new(dtype: WireDType, shape: Vec<u32>, data: Vec<u8>) -> Result<Self, HiddenError> {
        let expected = Self::byte_len_for(dtype, &shape)?;
        if expected != data.len() {
            return Err(HiddenError::LengthMismatch {
                shape,
                dtype,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { dtype, shape, data })
    }

    /// The number of bytes hidden states of `shape` and `dtype` take, if the shape is
    /// valid: 1 to [`MAX_HIDDEN_DIMS`] non-zero dimensions, at most [`MAX_HIDDEN_BYTES`]
    /// bytes. Computed with checked arithmetic, so any claimed shape is safe to ask about.
    pub fn byte_len_for(dtype: WireDType, shape: &[u32]) -> Result<usize, HiddenError> {
        Self::element_count_for(shape, dtype)?
            .checked_mul(dtype.size_bytes())
            .filter(|&n| n <= MAX_HIDDEN_BYTES)
            .ok_or_else(|| HiddenError::TooLarge {
                shape: shape.to_vec(),
                dtype,
            })
    }

    fn element_count_for(shape: &[u32], dtype: WireDType) -> Result<usize, HiddenError> {
        if shape.is_empty() || shape.len() > MAX_HIDDEN_DIMS {
            return Err(HiddenError::BadRank { dims: shape.len() });
        }
        if shape.contains(&0) {
            return Err(HiddenError::ZeroDim {
                shape: shape.to_vec(),
            });
        }
        shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
            .ok_or_else(|| HiddenError::TooLarge {
                shape: shape.to_vec(),
                dtype,
            })
    }

    /// Converts f32 `values` of `shape` to `dtype` (round to nearest for f16 and bf16).
    pub fn from_f32(
        values: &[f32],
        shape: Vec<u32>,
        dtype: WireDType,
    ) -> Result<Self, HiddenError> {
        let expected = Self::element_count_for(&shape, dtype)?;
        if expected != values.len() {
            return Err(HiddenError::ElementMismatch {
                shape,
                expected,
                actual: values.len(),
            });
        }
        // Checks the byte limit.
        let byte_len = Self::byte_len_for(dtype, &shape)?;
        let mut data = Vec::with_capacity(byte_len);
        match dtype {
            WireDType::F32 => {
                for v in values {
                    data.extend_from_slice(&v.to_le_bytes());
                }
            }
            WireDType::F16 => {
                for v in values {
                    data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            WireDType::BF16 => {
                for v in values {
                    data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
        Ok(Self { dtype, shape, data })
    }

    /// The values as f32 (exact for every dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.data.len() / self.dtype.size_bytes());
        match self.dtype {
            WireDType::F32 => out.extend(
                self.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            WireDType::F16 => out.extend(
                self.data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            WireDType::BF16 => out.extend(
                self.data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
        out
    }

    /// The element type.
    pub fn dtype(&self) -> WireDType {
        self.dtype
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The number of elements.
    pub fn num_elements(&self) -> usize {
        self.data.len() / self.dtype.size_bytes()
    }

    /// The number of tokens, if the shape is `[batch, tokens, hidden]` or `[tokens, hidden]`
    /// (the second-to-last dimension); `None` for one-dimensional states.
    pub fn num_tokens(&self) -> Option<u32> {
        self.shape.len().checked_sub(2).map(|i| self.shape[i])
    }

    /// Takes the parts apart: dtype, shape and bytes.
    pub fn into_parts(self) -> (WireDType, Vec<u32>, Vec<u8>) {
        (self.dtype, self.shape, self.data)
    }
}

impl fmt::Debug for HiddenStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes can be megabytes; print their size, not their contents.
        f.debug_struct("HiddenStates")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rejects_mismatched_bytes() {
        let err = HiddenStates::new(WireDType::F32, vec![1, 2, 576], vec![0; 576 * 4]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hidden states shape [1, 2, 576] of f32 needs 4608 bytes, got 2304"
        );
        assert!(HiddenStates::new(WireDType::F16, vec![1, 1, 576], vec![0; 576 * 2]).is_ok());
    }

    #[test]
    fn rejects_bad_shapes_without_overflow() {
        assert!(matches!(
            HiddenStates::new(WireDType::F32, vec![], vec![]),
            Err(HiddenError::BadRank { dims: 0 })
        ));
        assert!(matches!(
            HiddenStates::new(WireDType::F32, vec![1; 5], vec![0; 4]),
            Err(HiddenError::BadRank { dims: 5 })
        ));
        assert!(matches!(
            HiddenStates::new(WireDType::F32, vec![0, 4], vec![]),
            Err(HiddenError::ZeroDim { .. })
        ));
        assert!(matches!(
            HiddenStates::byte_len_for(WireDType::F32, &[u32::MAX; 4]),
            Err(HiddenError::TooLarge { .. })
        ));
        assert_eq!(
            HiddenStates::byte_len_for(WireDType::F32, &[4096, 4096]),
            Ok(MAX_HIDDEN_BYTES)
        );
        assert!(matches!(
            HiddenStates::byte_len_for(WireDType::F32, &[4097, 4096, 1024]),
            Err(HiddenError::TooLarge { .. })
        ));
    }

    #[test]
    fn f32_round_trips_exactly_and_halves_approximately() {
        let values: Vec<f32> = (0..576).map(|i| (i as f32 - 288.0) / 37.0).collect();
        let h = HiddenStates::from_f32(&values, vec![1, 1, 576], WireDType::F32).unwrap();
        assert_eq!(h.data().len(), 2304);
        assert_eq!(h.to_f32(), values);
        assert_eq!(h.num_tokens(), Some(1));
        for dtype in [WireDType::F16, WireDType::BF16] {
            let h = HiddenStates::from_f32(&values, vec![1, 1, 576], dtype).unwrap();
            assert_eq!(h.data().len(), 1152);
            for (a, b) in h.to_f32().iter().zip(&values) {
                assert!(
                    (a - b).abs() <= b.abs() / 128.0 + 1e-3,
                    "{dtype}: {a} vs {b}"
                );
            }
        }
        assert!(matches!(
            HiddenStates::from_f32(&values, vec![2, 576], WireDType::F32),
            Err(HiddenError::ElementMismatch { .. })
        ));
    }

    #[test]
    fn dtype_names_parse() {
        for d in WireDType::ALL {
            assert_eq!(d.name().parse::<WireDType>().unwrap(), d);
            assert_eq!(WireDType::from_tag(d.tag()), Some(d));
        }
        assert!("f64".parse::<WireDType>().is_err());
        assert_eq!(WireDType::from_tag(3), None);
    }
}
