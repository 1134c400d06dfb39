//! [`BlockSpan`]: the weights of blocks `[a, b)`, shared by every session,
//! and the forward pass over them.

use super::block::{Block, Shared, causal_mask, causal_mask_additive, rope_tables};
use super::cache::{CacheLimits, SpanCache};
use super::options::{LoadOptions, WeightMode};
use crate::config::{BlockRange, ModelConfig};
use crate::weights::ModelFile;
use crate::{Result, ShardError};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// The weights of blocks `[a, b)` of one model, shared by every session.
#[derive(Debug)]
pub struct BlockSpan {
    range: BlockRange,
    blocks: Vec<Block>,
    shared: Shared,
    device: Device,
    weight_bytes: usize,
}

impl BlockSpan {
    /// Loads blocks `range` of `file`, reading no other block's tensors.
    /// `progress(done, total)` is called after each block.
    pub fn load(
        file: &ModelFile,
        range: BlockRange,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = file.config()?;
        let range = BlockRange::new(range.start, range.end, cfg.num_blocks)?;
        let (cos, sin) = rope_tables(&cfg, &opts.device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &opts.device)?;
        let mut blocks = Vec::with_capacity(range.len());
        for (n, i) in (range.start..range.end).enumerate() {
            blocks.push(Block::load(file, i, &cfg, opts)?);
            progress(n + 1, range.len());
        }
        let weight_bytes = blocks.iter().map(Block::bytes).sum();
        Ok(Self {
            range,
            blocks,
            shared: Shared {
                cfg,
                cos,
                sin,
                neg_inf,
                fast: opts.mode != WeightMode::Exact,
            },
            device: opts.device.clone(),
            weight_bytes,
        })
    }

    /// The blocks held.
    pub fn range(&self) -> BlockRange {
        self.range
    }

    /// The model's architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.shared.cfg
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A new, empty cache for one session.
    pub fn new_cache(&self, limits: CacheLimits) -> SpanCache {
        let limits = CacheLimits {
            max_tokens: limits.max_tokens.min(self.shared.cfg.max_seq_len),
            ..limits
        };
        SpanCache::new(
            self.range,
            self.blocks.len(),
            limits,
            self.shared.cfg.kv_bytes_per_token_per_block() * self.blocks.len(),
            self.shared.fast,
        )
    }

    /// Runs hidden states `(1, seq, hidden)` for positions `pos..pos+seq`
    /// through the span, extending `cache`. `pos` must equal `cache.len()`.
    /// On error the cache is left as it was.
    pub fn forward(&self, hidden: &Tensor, pos: usize, cache: &mut SpanCache) -> Result<Tensor> {
        let cfg = &self.shared.cfg;
        let (b, seq, h) = hidden.dims3().map_err(|_| {
            ShardError::BadInput(format!("hidden states of shape {:?}", hidden.dims()))
        })?;
        if b != 1 || seq == 0 || h != cfg.hidden_size {
            return Err(ShardError::BadInput(format!(
                "hidden states of shape {:?}, expected (1, n, {})",
                hidden.dims(),
                cfg.hidden_size
            )));
        }
        let new_len = cache.check_step(self.range, self.shared.fast, pos, seq)?;
        let hidden = hidden.to_device(&self.device)?.to_dtype(DType::F32)?;
        let mask = if seq == 1 {
            None
        } else if self.shared.fast {
            Some(causal_mask_additive(seq, pos, &self.device)?)
        } else {
            Some(causal_mask(seq, pos, &self.device)?)
        };
        let max_tokens = cache.limits().max_tokens;
        cache.step(new_len, |layers| {
            let mut x = hidden;
            for (block, kv) in self.blocks.iter().zip(layers) {
                x = block.forward(x, mask.as_ref(), pos, kv, max_tokens, &self.shared)?;
            }
            Ok(x)
        })
    }
}

/// A span shared between sessions.
pub type SharedSpan = Arc<BlockSpan>;
