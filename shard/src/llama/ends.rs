//! [`ClientEnds`]: what a client runs itself, before the first block and
//! after the last: embeddings, final norm and output head.

use super::linear::{Linear, load_linear, load_vector};
use super::options::LoadOptions;
use crate::config::ModelConfig;
use crate::weights::{ModelFile, Weight};
use crate::{Result, ShardError};
use candle_core::quantized::QTensor;
use candle_core::{D, DType, Device, IndexOp, Tensor};

/// The embedding table: kept in the file's quantized type (rows are
/// dequantized when looked up, with the same arithmetic as dequantizing the
/// whole table, so exact mode stays bit-identical), or dense as stored.
#[derive(Debug)]
// One per model: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Embeddings {
    Quantized(QTensor),
    Dense(Tensor),
}

impl Embeddings {
    fn dims(&self) -> &[usize] {
        match self {
            Self::Quantized(q) => q.shape().dims(),
            Self::Dense(t) => t.dims(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// Rows `ids`, as f32 `(ids.len(), hidden)`.
    fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.embedding(ids),
            Self::Dense(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
        }
    }
}

/// The client's ends of the model: embeddings, final norm and output head.
#[derive(Debug)]
pub struct ClientEnds {
    cfg: ModelConfig,
    embeddings: Embeddings,
    final_norm: Tensor,
    head: Linear,
    device: Device,
}

impl ClientEnds {
    /// Loads the embeddings, final norm and head, and no block. A quantized
    /// embedding table stays quantized (a row is dequantized when a token
    /// is embedded); a tied head is built from a second read of it, packed
    /// for the fast kernels in the fast mode.
    pub fn load(file: &ModelFile, opts: &LoadOptions) -> Result<Self> {
        opts.check()?;
        let cfg = file.config()?;
        let emb_name = file.embeddings_name();
        let embeddings = match file.read_weight(emb_name, &opts.device)? {
            Weight::Quantized(q)
                if q.rank() == 2 && q.shape().dims()[1] % q.dtype().block_size() == 0 =>
            {
                Embeddings::Quantized(q)
            }
            Weight::Quantized(q) => Embeddings::Dense(q.dequantize(&opts.device)?),
            Weight::Dense(t) => Embeddings::Dense(t),
        };
        if embeddings.dims() != [cfg.vocab_size, cfg.hidden_size] {
            return Err(ShardError::ShapeMismatch {
                name: emb_name.into(),
                got: embeddings.dims().to_vec(),
                expected: vec![cfg.vocab_size, cfg.hidden_size],
            });
        }
        let head_name = if cfg.tied_embeddings {
            emb_name
        } else {
            file.head_name()
        };
        let head = load_linear(file, head_name, cfg.vocab_size, cfg.hidden_size, opts)?;
        let final_norm = load_vector(file, file.final_norm_name(), cfg.hidden_size, &opts.device)?;
        Ok(Self {
            cfg,
            embeddings,
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
        self.embeddings.bytes() + self.final_norm.elem_count() * 4 + self.head.bytes()
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
        let ids = Tensor::new(tokens, &self.device)?;
        let values = self.embeddings.rows(&ids)?;
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
