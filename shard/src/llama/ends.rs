//! [`ClientEnds`]: what a client runs itself, before the first block and
//! after the last: embeddings, final norm and output head.

use super::linear::{Linear, linear_from, load_linear, load_vector};
use super::options::LoadOptions;
use crate::config::ModelConfig;
use crate::kernels::PackedMatrix;
use crate::weights::{ModelFile, Weight};
use crate::{Result, ShardError};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, IndexOp, Tensor};
use half::f16;
use std::sync::Arc;

/// The embedding table: kept in the file's quantized type (rows are
/// dequantized when looked up, with the same arithmetic as dequantizing the
/// whole table, so exact mode stays bit-identical), or dense as stored. A
/// tied head's weights are the same table: where the head keeps the file's
/// quants (candle's matrix, or the packed one of a Q4_0, Q4_1 or Q8_0 table),
/// the rows are read from it and the table is held once.
#[derive(Debug)]
enum Embeddings {
    Quantized(Arc<QTensor>),
    /// Rows of a packed head, packed from a table of this type.
    Packed(Arc<PackedMatrix>, GgmlDType),
    Dense(Tensor),
}

impl Embeddings {
    fn bytes(&self) -> usize {
        match self {
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Packed(p, _) => p.bytes(),
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// Rows `ids` (each below the vocabulary size), as f32 `(ids.len(), hidden)`.
    fn rows(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.embedding(&Tensor::new(ids, device)?),
            Self::Dense(t) => t
                .index_select(&Tensor::new(ids, device)?, 0)?
                .to_dtype(DType::F32),
            Self::Packed(p, from) => {
                let k = p.k();
                let mut out = Vec::with_capacity(ids.len() * k);
                for &id in ids {
                    p.row_blocks(id as usize, |d, m, u| {
                        out.extend(u.iter().map(|&u| dequantized(*from, d, m, u)));
                    });
                }
                Tensor::from_vec(out, (ids.len(), k), device)
            }
        }
    }
}

/// A value of a row packed from a Q4_0, Q4_1 or Q8_0 table ([`packs_exactly`]):
/// candle's own dequantization of the stored quant, operation for operation
/// (`u` is the quant as packed: Q4_0's plus 8, Q8_0's plus 128).
#[inline]
fn dequantized(from: GgmlDType, d: f16, m: f16, u: u8) -> f32 {
    match from {
        GgmlDType::Q4_1 => f32::from(u) * d.to_f32() + m.to_f32(),
        GgmlDType::Q4_0 => f32::from(i16::from(u) - 8) * d.to_f32(),
        _ => f32::from(i16::from(u) - 128) * d.to_f32(),
    }
}

/// Whether a packed matrix of this stored type keeps every quant and scale of
/// the file as they were, so that [`dequantized`] gives candle's values.
fn packs_exactly(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// The client's ends of the model: embeddings, final norm and output head.
#[derive(Debug)]
pub struct ClientEnds {
    cfg: ModelConfig,
    embeddings: Embeddings,
    /// Whether the embeddings are the head's own weights (held once).
    shared: bool,
    final_norm: Tensor,
    head: Linear,
    device: Device,
}

impl ClientEnds {
    /// Loads the embeddings, final norm and head, and no block. A quantized
    /// embedding table stays quantized (a row is dequantized when a token
    /// is embedded); a tied head is built from it (packed for the fast
    /// kernels in the fast mode), and where the head keeps the table's quants
    /// the rows are looked up in the head's weights, held once.
    pub fn load(file: &ModelFile, opts: &LoadOptions) -> Result<Self> {
        opts.check()?;
        let cfg = file.config()?;
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let emb_name = file.embeddings_name();
        let read = |name: &str| -> Result<Weight> {
            let w = file.read_weight(name, &opts.device)?;
            let dims = match &w {
                Weight::Quantized(q) => q.shape().dims().to_vec(),
                Weight::Dense(t) => t.dims().to_vec(),
            };
            if dims != [vocab, hidden] {
                return Err(ShardError::ShapeMismatch {
                    name: name.into(),
                    got: dims,
                    expected: vec![vocab, hidden],
                });
            }
            Ok(w)
        };
        let table = |w: Weight| -> Result<Embeddings> {
            Ok(match w {
                Weight::Quantized(q) if hidden % q.dtype().block_size() == 0 => {
                    Embeddings::Quantized(Arc::new(q))
                }
                Weight::Quantized(q) => Embeddings::Dense(q.dequantize(&opts.device)?),
                Weight::Dense(t) => Embeddings::Dense(t),
            })
        };
        let mode = opts.effective_mode();
        let (embeddings, head, shared) = if cfg.tied_embeddings {
            // One read of the table for both; a second only where the head does
            // not keep the file's quants (requantized, dense, or packed from a
            // type whose packing changes them).
            let w = read(emb_name)?;
            let stored = match &w {
                Weight::Quantized(q) => Some(q.dtype()),
                Weight::Dense(_) => None,
            };
            let head = linear_from(w, emb_name, vocab, hidden, mode)?;
            let rows_in_head = match (stored, head.packed_shared(), head.quantized_shared()) {
                (Some(t), Some(p), _) if packs_exactly(t) => Some(Embeddings::Packed(p.clone(), t)),
                (Some(t), None, Some(q)) if q.dtype() == t && hidden % t.block_size() == 0 => {
                    Some(Embeddings::Quantized(q.clone()))
                }
                _ => None,
            };
            match rows_in_head {
                Some(e) => (e, head, true),
                None => (table(read(emb_name)?)?, head, false),
            }
        } else {
            let embeddings = table(read(emb_name)?)?;
            let head = load_linear(file, file.head_name(), vocab, hidden, opts)?;
            (embeddings, head, false)
        };
        let final_norm = load_vector(file, file.final_norm_name(), hidden, &opts.device)?;
        Ok(Self {
            cfg,
            embeddings,
            shared,
            final_norm,
            head,
            device: opts.device.clone(),
        })
    }

    /// The model's architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Device of the tensors.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let table = if self.shared {
            0
        } else {
            self.embeddings.bytes()
        };
        table + self.final_norm.elem_count() * 4 + self.head.bytes()
    }

    /// Hidden states `(1, n, hidden)` for `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(ShardError::BadInput("no tokens to embed".into()));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ShardError::BadInput(format!(
                "token id {t} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let values = self.embeddings.rows(tokens, &self.device)?;
        Ok(values.reshape((1, tokens.len(), self.cfg.hidden_size))?)
    }

    /// Logits `(vocab,)` of the last position of hidden states `(1, n, hidden)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (_b, seq, h) = hidden.dims3()?;
        if h != self.cfg.hidden_size || seq == 0 {
            return Err(ShardError::BadInput(format!(
                "hidden states of shape {:?} for a model of width {}",
                hidden.dims(),
                self.cfg.hidden_size
            )));
        }
        let hidden = hidden.to_device(&self.device)?;
        let x = candle_nn::ops::rms_norm(&hidden, &self.final_norm, self.cfg.rms_norm_eps as f32)?;
        let x = x.i((.., seq - 1, ..))?;
        let logits = self.head.forward(&x)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// The largest absolute difference between two logit vectors (for tests).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Rows read from a packed head equal candle's dequantized rows of the
    /// same table, bit for bit, for every type whose rows are read there:
    /// rows of every magnitude, from f16-subnormal scales to Q8_0 scales
    /// whose packed offset (-128 d) no longer fits an f16.
    #[test]
    fn rows_of_a_packed_head_are_candles_rows_bit_for_bit() {
        let (n, k) = (48, 96);
        let mut seed = 0x5eed_u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let scale = |r: usize| match r % 8 {
            0 => 6.5e4,
            1 => 1e-6,
            2 => 0.0,
            s => 10f32.powi(s as i32 - 5),
        };
        let w: Vec<f32> = (0..n * k).map(|i| next() * scale(i / k)).collect();
        // Every row, out of order, some twice.
        let ids: Vec<u32> = (0..n as u32).rev().chain([3, 0, 47, 3]).collect();
        let cpu = Device::Cpu;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            assert!(packs_exactly(dtype));
            let q = QTensor::quantize(&Tensor::from_vec(w.clone(), (n, k), &cpu).unwrap(), dtype)
                .unwrap();
            let want = q
                .embedding(&Tensor::new(ids.as_slice(), &cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let p = PackedMatrix::pack_any(&q).unwrap().unwrap();
            let got = Embeddings::Packed(Arc::new(p), dtype)
                .rows(&ids, &cpu)
                .unwrap();
            assert_eq!(got.dims(), [ids.len(), k]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        }
    }
}
