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
    let rows = check_shape(h, hidden)?;
    Ok(Tensor::from_vec(h.to_f32(), (1, rows, hidden), device)?)
}

/// The rows `n` of hidden states of shape `(1, n, hidden)`, `n` at least 1; any other
/// shape is an error.
pub fn check_shape(h: &HiddenStates, hidden: usize) -> Result<usize, WireError> {
    let shape: Vec<usize> = h.shape().iter().map(|&d| d as usize).collect();
    match shape[..] {
        [1, rows, h] if rows > 0 && h == hidden => Ok(rows),
        _ => Err(WireError::Shape { shape, hidden }),
    }
}

/// The last token's row of a `(1, n, hidden)` tensor, as `(1, 1, hidden)`.
pub fn last_row(t: &Tensor) -> Result<Tensor, WireError> {
    let n = t.dim(1)?;
    Ok(t.narrow(1, n.saturating_sub(1), 1)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_one_sequence_of_rows_of_the_models_width_passes() {
        let states = |shape: &[u32]| {
            let n = shape.iter().product::<u32>() as usize;
            HiddenStates::from_f32(&vec![0.5; n], shape.to_vec(), WireDType::F32).unwrap()
        };
        assert_eq!(check_shape(&states(&[1, 3, 4]), 4).unwrap(), 3);
        // (No dimension can be 0: `HiddenStates` refuses it.)
        for bad in [&[2, 1, 4][..], &[1, 3, 5], &[3, 4], &[1, 1, 1, 4]] {
            let e = check_shape(&states(bad), 4).unwrap_err();
            assert!(
                e.to_string().starts_with("hidden states of shape"),
                "{bad:?}: {e}"
            );
        }
        let t = from_wire(&states(&[1, 2, 4]), 4, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 2, 4]);
    }
}
