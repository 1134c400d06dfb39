//! Hidden states between candle tensors and wire frames.

use candle_core::{Device, Tensor};
use pollen_protocol::{HiddenError, HiddenStates, WireDType};

/// Why hidden states could not be converted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The tensor could not be read or built.
    #[error("hidden states: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The payload is not valid hidden states.
    #[error(transparent)]
    Hidden(#[from] HiddenError),
    /// The payload has the wrong shape.
    #[error("hidden states of shape {shape:?}, expected [1, n, {hidden}]")]
    Shape {
        /// The shape received.
        shape: Vec<usize>,
        /// The model's hidden size.
        hidden: usize,
    },
}

/// A `(1, n, hidden)` tensor as a frame payload of `dtype`.
pub fn to_wire(t: &Tensor, dtype: WireDType) -> Result<HiddenStates, WireError> {
    let dims: Vec<u32> = t
        .dims()
        .iter()
        .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
        .collect();
    let values = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(HiddenStates::from_f32(&values, dims, dtype)?)
}

/// A frame payload as a `(1, n, hidden)` f32 tensor, checked against `hidden`.
pub fn from_wire(h: &HiddenStates, hidden: usize, device: &Device) -> Result<Tensor, WireError> {
    let shape: Vec<usize> = h.shape().iter().map(|&d| d as usize).collect();
    if shape.len() != 3 || shape[0] != 1 || shape[1] == 0 || shape[2] != hidden {
        return Err(WireError::Shape { shape, hidden });
    }
    Ok(Tensor::from_vec(h.to_f32(), shape, device)?)
}

/// The last token's row of a `(1, n, hidden)` tensor, as `(1, 1, hidden)`.
pub fn last_row(t: &Tensor) -> Result<Tensor, WireError> {
    let n = t.dim(1)?;
    Ok(t.narrow(1, n.saturating_sub(1), 1)?)
}
