//! Hidden states between candle tensors and wire frames.

use anyhow::{Result, anyhow, bail};
use candle_core::{Device, Tensor};
use pollen_protocol::{HiddenStates, WireDType};

/// A `(1, n, hidden)` tensor as a frame payload of `dtype`.
pub fn to_wire(t: &Tensor, dtype: WireDType) -> Result<HiddenStates> {
    let dims: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
    let values = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    HiddenStates::from_f32(&values, dims, dtype).map_err(|e| anyhow!("{e}"))
}

/// A frame payload as a `(1, n, hidden)` f32 tensor, checked against `hidden`.
pub fn from_wire(h: &HiddenStates, hidden: usize, device: &Device) -> Result<Tensor> {
    let shape: Vec<usize> = h.shape().iter().map(|&d| d as usize).collect();
    if shape.len() != 3 || shape[0] != 1 || shape[1] == 0 || shape[2] != hidden {
        bail!("hidden states of shape {shape:?}, expected [1, n, {hidden}]");
    }
    Ok(Tensor::from_vec(h.to_f32(), shape, device)?)
}
