//! [`BlockSpan`]: the weights of blocks `[a, b)`, shared by every session,
//! and the forward pass over them.

use super::block::{Block, Shared, causal_mask, causal_mask_additive, rope_tables};
use super::cache::{CacheLimits, LayerKv, SpanCache};
use super::fused::{self, Rope, Scratch, Segment, cpu_data};
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
    /// Whether steps run the fused CPU path ([`super::fused`]).
    fused: bool,
}

/// A step being computed a few blocks at a time ([`BlockSpan::begin_in_blocks`]).
#[derive(Debug)]
#[must_use = "a step in blocks leaves its cache half-written until finished or abandoned"]
pub struct BlocksStep {
    /// The hidden states after the blocks done so far.
    x: Tensor,
    mask: Option<Tensor>,
    pos: usize,
    new_len: usize,
    /// Blocks run so far.
    done: usize,
    /// The cache's layers before the step, to put back if it fails.
    saved: Vec<LayerKv>,
    /// The cache it runs on ([`SpanCache::id`]).
    cache: u64,
    /// It ended: its output was given, or a block failed.
    ended: bool,
}

impl BlocksStep {
    /// Blocks run so far.
    pub fn blocks_done(&self) -> usize {
        self.done
    }
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
        opts.check()?;
        let cfg = file.config()?;
        let range = BlockRange::new(range.start, range.end, cfg.num_blocks)?;
        let (cos, sin) = rope_tables(
            &cfg,
            &opts.device,
            opts.effective_mode() != WeightMode::Exact,
        )?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &opts.device)?;
        let mut blocks = Vec::with_capacity(range.len());
        for (n, i) in (range.start..range.end).enumerate() {
            blocks.push(Block::load(file, i, &cfg, opts)?);
            progress(n + 1, range.len());
        }
        let weight_bytes = blocks.iter().map(Block::bytes).sum();
        let fused = opts.effective_mode() != WeightMode::Exact
            && opts.device.is_cpu()
            && cfg.rope_dim == cfg.head_dim()
            && blocks.iter().all(|b| b.fused().is_some());
        Ok(Self {
            fused,
            range,
            blocks,
            shared: Shared {
                cfg,
                cos,
                sin,
                neg_inf,
                fast: opts.effective_mode() != WeightMode::Exact,
            },
            device: opts.device.clone(),
            weight_bytes,
        })
    }

    /// Turns the fused CPU path off or back on (where it is available) and
    /// says whether it is on: for tests and benches comparing it with the
    /// op-by-op path, which gives the same bits.
    #[doc(hidden)]
    pub fn set_fused(&mut self, on: bool) -> bool {
        self.fused = on
            && self.shared.fast
            && self.device.is_cpu()
            && self.shared.cfg.rope_dim == self.shared.cfg.head_dim()
            && self.blocks.iter().all(|b| b.fused().is_some());
        self.fused
    }

    /// Runs `segments` (one session's rows each, in `x`'s order) through
    /// every block on the fused CPU path; `kv(b, i)` is segment `i`'s layer
    /// for block `b`.
    fn forward_fused(
        &self,
        hidden: &Tensor,
        layers: &mut [&mut [LayerKv]],
        segments: &[(usize, usize, usize)],
    ) -> Result<Tensor> {
        let (cos, cl) = self.shared.cos.storage_and_layout();
        let (sin, sl) = self.shared.sin.storage_and_layout();
        let rope = Rope {
            cos: cpu_data(&cos, cl)?,
            sin: cpu_data(&sin, sl)?,
            interleaved: self.shared.cfg.rope_interleaved,
        };
        let mut x = fused::to_rows(hidden)?;
        let mut scratch = Scratch::default();
        for (b, block) in self.blocks.iter().enumerate() {
            let Some(w) = block.fused() else {
                return Err(ShardError::BadInput("block not packed".into()));
            };
            let mut segs: Vec<Segment<'_>> = layers
                .iter_mut()
                .zip(segments)
                .map(|(l, &(pos, rows, max_tokens))| Segment {
                    pos,
                    rows,
                    kv: &mut l[b],
                    max_tokens,
                })
                .collect();
            fused::block_forward(&w, &mut x, &mut segs, &self.shared, rope, &mut scratch)?;
        }
        let m = x.len() / self.shared.cfg.hidden_size;
        Ok(Tensor::from_vec(
            x,
            (1, m, self.shared.cfg.hidden_size),
            &self.device,
        )?)
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

    /// Whether a prompt step may be computed in parts (rows `a..b`, then `b..c`, each
    /// attending over the cache the parts before it wrote) with the same bits as whole,
    /// so that a server can let other sessions' steps run between the parts of a long
    /// prompt. True in the fast modes on the CPU where every block's products are
    /// packed for this crate's kernels, which compute every row alone, and attention
    /// runs in tiles from the first position whatever the step's size (tested on the
    /// default model, `a_prompt_in_chunks_equals_the_prompt_whole`). False in exact
    /// mode, where candle's products of a few rows can differ in the last bits from
    /// those of many, for weights left to candle (dense or requantized: its dense
    /// products choose their kernel by shape), and off the CPU.
    pub fn splits_prompts_exactly(&self) -> bool {
        self.shared.fast && self.device.is_cpu() && self.blocks.iter().all(|b| b.fused().is_some())
    }

    /// An upper bound on the memory, in bytes, that one step of `n_tokens`
    /// tokens after `past` cached ones takes in this span beyond the
    /// weights and the keys and values the session already holds: the cache
    /// buffers the step grows (the old ones live until the step succeeds, so
    /// a failed step leaves the cache as it was), the widest moment of a
    /// block's activations, and attention.
    ///
    /// Linear in `n_tokens` in the fast modes on the CPU (attention in tiles);
    /// in exact mode (and off the CPU) attention materialises a
    /// `(heads, n_tokens, past + n_tokens)` score matrix, and this grows with
    /// its square. The engine bench (`--prefill-memory`) checks it against
    /// the measured peak. A server's memory budget can refuse a step beyond
    /// it before running it.
    pub fn step_memory_bytes(&self, n_tokens: usize, past: usize) -> usize {
        let (cache, working) = self.step_memory_terms(n_tokens, past);
        cache.saturating_add(working)
    }

    /// Of [`Self::step_memory_bytes`], the part that lives from a step's first block to
    /// its end when the step runs a few blocks at a time ([`Self::begin_in_blocks`]):
    /// the cache buffers it grows, its input and its hidden states between blocks, and
    /// its attention mask (bytes, or f32 in the additive form). The rest, `step_memory_bytes`
    /// less this, is what one part's pass needs on top.
    pub fn step_held_bytes(&self, n_tokens: usize, past: usize) -> usize {
        let (cache, working) = self.step_memory_terms(n_tokens, past);
        let total = past.saturating_add(n_tokens);
        let hidden = n_tokens.saturating_mul(self.shared.cfg.hidden_size * 4);
        let mask = n_tokens.saturating_mul(total).saturating_mul(4);
        // The input and the mask are in the working figure already: moved, not added.
        cache.saturating_add(hidden.saturating_mul(2).saturating_add(mask).min(working))
    }

    /// [`Self::step_memory_bytes`] as the cache buffers a step grows and its working
    /// memory (activations and attention).
    fn step_memory_terms(&self, n_tokens: usize, past: usize) -> (usize, usize) {
        let cfg = &self.shared.cfg;
        let f = 4usize; // f32
        let (h, ff, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_heads, cfg.num_kv_heads * d);
        let n = n_tokens;
        let total = past.saturating_add(n);
        // Keys and values: fast modes grow buffers by doubling (all blocks'
        // new buffers, the old kept until the step ends); exact mode appends.
        let kv_per_pos = self.kv_bytes_per_token();
        let cache = if self.shared.fast {
            let cap = |len: usize| len.checked_next_power_of_two().unwrap_or(len).max(64);
            if past > 0 && cap(past) >= total {
                0
            } else {
                cap(total).min(cfg.max_seq_len.max(total))
            }
        } else {
            total
        }
        .saturating_mul(kv_per_pos);
        // One block's widest moment: the step's input and residual, the fused
        // gate/up product (its result and its tile-major scratch), the SiLU
        // and its product, the down projection's input quantized and output;
        // or, in attention, q/k/v with their rotary copies.
        let mlp = f * (3 * h + 6 * ff) + ff + 2 * f * h;
        let qkv = f * (3 * h + 4 * (h + 2 * kv));
        let per_token = mlp.max(qkv) + f * h;
        let activations = n.saturating_mul(per_token);
        let attention = if self.shared.fast && self.device.is_cpu() {
            crate::attention::TiledAttention::bytes(
                n,
                heads,
                heads / cfg.num_kv_heads.max(1),
                d,
                candle_core::utils::get_num_threads(),
            )
        } else {
            // Scores, their scaled and masked copies and the softmax (two
            // live at once, counted three times for headroom), the mask, and
            // repeated keys and values.
            let scores = heads.saturating_mul(n).saturating_mul(total);
            scores
                .saturating_mul(3 * f)
                .saturating_add(n.saturating_mul(total).saturating_mul(f))
                .saturating_add(total.saturating_mul(2 * heads * d * f))
        };
        (cache, activations.saturating_add(attention))
    }

    /// Bytes of keys and values one token takes in this span: f16 in the
    /// non-exact modes on the CPU, f32 otherwise.
    pub fn kv_bytes_per_token(&self) -> usize {
        let per_block = super::cache::kv_bytes_per_token_per_block(
            &self.shared.cfg,
            self.shared.fast,
            &self.device,
        );
        per_block * self.blocks.len()
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
            self.kv_bytes_per_token(),
            self.shared.fast,
        )
    }

    /// Checks a step of hidden states `(1, seq, hidden)` at `pos` against this span and
    /// `cache`; returns the input on this span's device, the step's attention mask and
    /// the cache's length after it.
    fn prepare(
        &self,
        hidden: &Tensor,
        pos: usize,
        cache: &SpanCache,
    ) -> Result<(Tensor, Option<Tensor>, usize)> {
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
        crate::device::bind_thread(&self.device)?;
        let hidden = hidden.to_device(&self.device)?.to_dtype(DType::F32)?;
        let mask = if seq == 1 || (self.shared.fast && self.device.is_cpu()) {
            // Fast mode on the CPU masks inside its tiled attention.
            None
        } else if self.shared.fast {
            Some(causal_mask_additive(seq, pos, &self.device)?)
        } else {
            Some(causal_mask(seq, pos, &self.device)?)
        };
        Ok((hidden, mask, new_len))
    }

    /// Runs hidden states `(1, seq, hidden)` for positions `pos..pos+seq`
    /// through the span, extending `cache`. `pos` must equal `cache.len()`.
    /// On error the cache is left as it was.
    pub fn forward(&self, hidden: &Tensor, pos: usize, cache: &mut SpanCache) -> Result<Tensor> {
        let (hidden, mask, new_len) = self.prepare(hidden, pos, cache)?;
        let max_tokens = cache.limits().max_tokens;
        if self.fused {
            let seq = new_len - pos;
            return cache.step(new_len, |layers| {
                self.forward_fused(&hidden, &mut [layers], &[(pos, seq, max_tokens)])
            });
        }
        cache.step(new_len, |layers| {
            let mut x = hidden;
            for (block, kv) in self.blocks.iter().zip(layers) {
                x = block.forward(x, mask.as_ref(), pos, kv, max_tokens, &self.shared)?;
            }
            Ok(x)
        })
    }

    /// Whether a step may be computed a few blocks at a time
    /// ([`Self::begin_in_blocks`]): on the CPU, off the fused path (which runs every
    /// block in one pass, and splits prompts by rows instead:
    /// [`Self::splits_prompts_exactly`]). The blocks run the same operations on the
    /// same rows as in [`Self::forward`], so the bits are the same in every mode,
    /// exact included.
    pub fn splits_prompts_by_blocks(&self) -> bool {
        !self.fused && self.device.is_cpu()
    }

    /// Starts a step of hidden states `(1, seq, hidden)` at `pos` (`cache.len()`) that
    /// [`Self::forward_blocks`] computes a few blocks at a time, so that a server can
    /// compute other sessions' steps between the parts of a long prompt. Until the last
    /// block has run the cache holds the step in some blocks only: the step must be
    /// finished, or given up with [`Self::abandon_blocks`], before the cache is used
    /// again.
    pub fn begin_in_blocks(
        &self,
        hidden: &Tensor,
        pos: usize,
        cache: &SpanCache,
    ) -> Result<BlocksStep> {
        if !self.splits_prompts_by_blocks() {
            return Err(ShardError::BadInput(
                "this span computes every block in one pass (fused, or off the CPU)".into(),
            ));
        }
        let (x, mask, new_len) = self.prepare(hidden, pos, cache)?;
        Ok(BlocksStep {
            x,
            mask,
            pos,
            new_len,
            done: 0,
            saved: cache.snapshot(),
            cache: cache.id(),
            ended: false,
        })
    }

    /// Runs the next `blocks` (at least one) blocks of `step` over `cache`, the cache
    /// it was begun on; the step's output once every block has run, and then the cache
    /// holds the step. On error the cache is put back as it was before the step, and the
    /// step is over (it is refused from then on, as it is after its output).
    pub fn forward_blocks(
        &self,
        step: &mut BlocksStep,
        cache: &mut SpanCache,
        blocks: usize,
    ) -> Result<Option<Tensor>> {
        if step.ended {
            return Err(ShardError::BadInput(
                "a step in blocks run past its end".into(),
            ));
        }
        if cache.id() != step.cache || cache.len() != step.pos {
            return Err(ShardError::BadInput(
                "a step in blocks continued on another cache".into(),
            ));
        }
        let end = step
            .done
            .saturating_add(blocks.max(1))
            .min(self.blocks.len());
        let max_tokens = cache.limits().max_tokens;
        let mut ran = || -> Result<()> {
            let layers = cache.layers_mut();
            let todo = self.blocks.iter().zip(layers.iter_mut());
            for (block, kv) in todo.take(end).skip(step.done) {
                let x = step.x.clone();
                step.x = block.forward(
                    x,
                    step.mask.as_ref(),
                    step.pos,
                    kv,
                    max_tokens,
                    &self.shared,
                )?;
                step.done += 1;
            }
            Ok(())
        };
        if let Err(e) = ran() {
            step.ended = true;
            cache.finish(false, step.pos, std::mem::take(&mut step.saved));
            return Err(e);
        }
        if step.done < self.blocks.len() {
            return Ok(None);
        }
        step.ended = true;
        cache.finish(true, step.new_len, Vec::new());
        Ok(Some(step.x.clone()))
    }

    /// Gives up `step` before its last block: puts `cache` back as it was before it.
    pub fn abandon_blocks(&self, step: BlocksStep, cache: &mut SpanCache) {
        if !step.ended && cache.id() == step.cache {
            cache.finish(false, step.pos, step.saved);
        }
    }

    /// How many sessions' decode steps [`Self::forward_batch`] takes at once (1: it
    /// refuses batches). Where a batched product would give a row other bits than its
    /// own step, batches are smaller or refused, never computed: any number where
    /// Pollen's packed kernels compute every product (the fast mode on a CPU that has
    /// them); elsewhere as many as candle's products keep a row's bits for on this
    /// device (`linear::rows_keep_bits`: four on a CUDA GPU, any on the CPU for the
    /// default model's Q4_1, none for types candle repacks by row count, dense
    /// matrices or on Metal), in exact mode and the requantizing modes alike.
    pub fn batch_rows(&self) -> usize {
        if self.fused {
            return usize::MAX;
        }
        self.blocks
            .iter()
            .map(|b| b.batch_rows(&self.device))
            .min()
            .unwrap_or(1)
    }

    /// One single-token step for each of several sessions at once, each with
    /// its own cache: `steps[i]` is hidden states `(1, 1, hidden)`, the
    /// position (the cache's length) and the cache. The matrix products run
    /// once over all sessions' rows, so the weights are read once per batch
    /// instead of once per session; rotary, the KV write and attention run
    /// per session. Each session's output is bit-identical to its own
    /// [`Self::forward`] step.
    ///
    /// Each step is checked on its own first ([`Self::check_step`] and its
    /// shape): one that is refused gets its error in its own place and its
    /// cache does not move, and the others still compute as one batch, so
    /// one session's bad step cannot cost the others their batch. An error
    /// for the whole call (more than [`Self::batch_rows`] steps, or the
    /// batch's computation failing) changes no cache.
    pub fn forward_batch(
        &self,
        steps: &mut [(&Tensor, usize, &mut SpanCache)],
    ) -> Result<Vec<Result<Tensor>>> {
        let most = self.batch_rows();
        if steps.len() > most {
            return Err(ShardError::BadInput(format!(
                "a batch of {} steps where this span keeps each step's bits for {most} at most",
                steps.len()
            )));
        }
        crate::device::bind_thread(&self.device)?;
        let hidden_size = self.shared.cfg.hidden_size;
        let checked: Vec<Result<usize>> = steps
            .iter()
            .map(|(hidden, pos, cache)| {
                if hidden.dims() != [1, 1, hidden_size] {
                    return Err(ShardError::BadInput(format!(
                        "hidden states of shape {:?}, expected (1, 1, {hidden_size}) in a batch",
                        hidden.dims(),
                    )));
                }
                cache.check_step(self.range, self.shared.fast, *pos, 1)
            })
            .collect();
        let mut batch: Vec<(&Tensor, usize, &mut SpanCache, usize)> = steps
            .iter_mut()
            .zip(&checked)
            .filter_map(|((hidden, pos, cache), c)| {
                c.as_ref()
                    .ok()
                    .map(|&len| (&**hidden, *pos, &mut **cache, len))
            })
            .collect();
        // The outputs of the steps that passed, in their order: one step left computes
        // as a step alone (the same path as `forward`), more as one batch, its rows.
        let outs: Vec<Result<Tensor>> = match &mut batch[..] {
            [] => Vec::new(),
            [(hidden, pos, cache, _)] => vec![self.forward(hidden, *pos, cache)],
            _ => {
                let out = self.compute_batch(&mut batch)?;
                (0..batch.len())
                    .map(|row| Ok(out.narrow(1, row, 1)?))
                    .collect()
            }
        };
        let mut outs = outs.into_iter();
        Ok(checked
            .into_iter()
            .map(|c| {
                c?;
                outs.next()
                    .unwrap_or_else(|| Err(ShardError::BadInput("a batch lost a step".into())))
            })
            .collect())
    }

    /// Checks a step of `n_tokens` at position `pos` against `cache` as
    /// [`Self::forward`] will, without running it: the cache is this span's,
    /// `pos` is the length it holds, and the step fits its session's limits.
    /// A server asks before giving a step memory or a place in a batch.
    pub fn check_step(&self, cache: &SpanCache, pos: usize, n_tokens: usize) -> Result<()> {
        cache
            .check_step(self.range, self.shared.fast, pos, n_tokens)
            .map(|_| ())
    }

    /// [`Self::forward_batch`]'s computation of steps already checked, each
    /// with the length its cache will have after it: their outputs as the
    /// rows of one tensor `(1, steps, hidden)`.
    fn compute_batch(
        &self,
        steps: &mut [(&Tensor, usize, &mut SpanCache, usize)],
    ) -> Result<Tensor> {
        let rows: Vec<Tensor> = steps
            .iter()
            .map(|s| Ok(s.0.to_device(&self.device)?.to_dtype(DType::F32)?))
            .collect::<Result<_>>()?;
        let max_tokens: Vec<usize> = steps.iter().map(|s| s.2.limits().max_tokens).collect();
        let saved: Vec<_> = steps.iter().map(|s| s.2.snapshot()).collect();
        let mut run = || -> Result<Tensor> {
            let x = Tensor::cat(&rows, 1)?;
            if self.fused {
                let segments: Vec<_> = steps
                    .iter()
                    .zip(&max_tokens)
                    .map(|((_, pos, _, _), &max)| (*pos, 1, max))
                    .collect();
                let mut layers: Vec<&mut [LayerKv]> =
                    steps.iter_mut().map(|s| s.2.layers_mut()).collect();
                return self.forward_fused(&x, &mut layers, &segments);
            }
            let mut x = x;
            for (b, block) in self.blocks.iter().enumerate() {
                let mut items: Vec<(usize, &mut _)> = steps
                    .iter_mut()
                    .map(|(_, pos, cache, _)| (*pos, &mut cache.layers_mut()[b]))
                    .collect();
                x = block.forward_batch(x, &mut items, &max_tokens, &self.shared)?;
            }
            Ok(x)
        };
        let out = run();
        for (step, saved) in steps.iter_mut().zip(saved) {
            step.2.finish(out.is_ok(), step.3, saved);
        }
        out
    }
}

/// A span shared between sessions.
pub type SharedSpan = Arc<BlockSpan>;
