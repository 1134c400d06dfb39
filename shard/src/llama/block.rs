//! One transformer block: its weights, and attention plus MLP over a step
//! of hidden states with that block's slice of a session's KV cache.

use super::cache::{self, LayerKv};
use super::fused::FusedWeights;
use super::linear::{Linear, Projections, load_linear, load_vector};
use super::options::{LoadOptions, WeightMode};
use crate::Result;
use crate::config::ModelConfig;
use crate::weights::{BlockTensorNames, ModelFile};
use candle_core::{DType, Device, Tensor};

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub(super) struct Block {
    attn_norm: Tensor,
    /// q, k, v.
    qkv: Projections<3>,
    wo: Linear,
    ffn_norm: Tensor,
    /// gate, up.
    gate_up: Projections<2>,
    w_down: Linear,
    /// The norms' weights as plain values (for the fused CPU path).
    norms: [Vec<f32>; 2],
    span_attn: tracing::Span,
    span_mlp: tracing::Span,
}

/// The shared constants every block of a model uses.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub(super) cfg: ModelConfig,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) neg_inf: Tensor,
    /// Non-exact modes: growable KV buffers and grouped attention without
    /// repeated keys (see [`Block::attention_fast`]).
    pub(super) fast: bool,
}

/// The rotary tables `(cos, sin)`, `(max_seq_len, rope_dim / 2)`: entry
/// `(p, j)` is the cosine and sine of `p · θ^(−2j/d)`. Exact mode computes
/// them as candle-transformers does (candle's `cos` and `sin` ops, the C
/// library's `powf`, `cosf` and `sinf`: its bits on this machine); the
/// other modes with Pollen's own functions ([`crate::elementary`]), rounded
/// to f32, the same bits on every platform (C libraries' `sinf` differ).
pub(super) fn rope_tables(
    cfg: &ModelConfig,
    device: &Device,
    own: bool,
) -> Result<(Tensor, Tensor)> {
    let half = cfg.rope_dim / 2;
    let n = cfg.max_seq_len;
    if own {
        let frequencies: Vec<f32> = (0..cfg.rope_dim)
            .step_by(2)
            .map(|i| {
                let e = i as f32 / cfg.rope_dim as f32;
                1f32 / crate::elementary::pow(f64::from(cfg.rope_theta), f64::from(e)) as f32
            })
            .collect();
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for p in 0..n {
            for &f in &frequencies {
                // The angle as candle-transformers rounds it, in f32.
                let (s, c) = crate::elementary::sin_cos(f64::from(p as f32 * f));
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        return Ok((
            Tensor::from_vec(cos, (n, half), device)?,
            Tensor::from_vec(sin, (n, half), device)?,
        ));
    }
    let theta: Vec<_> = (0..cfg.rope_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / cfg.rope_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    // candle-transformers' table is this outer product as a matmul; with one
    // term per value it is the same rounded products, and needs no dense
    // product (which cannot run on every CPU: `dense_products_run`).
    let idx_theta = Tensor::arange(0, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .broadcast_mul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

/// `mask[i][j] = 1` where query `i` (at position `index_pos + i`) must not see key `j`.
pub(super) fn causal_mask(seq_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
    let kv_len = index_pos + seq_len;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > index_pos + i)))
        .collect();
    Ok(Tensor::from_slice(&mask, (seq_len, kv_len), device)?)
}

/// `mask[i][j] = -inf` where query `i` (at position `index_pos + i`) must not see key `j`, else 0.
pub(super) fn causal_mask_additive(
    seq_len: usize,
    index_pos: usize,
    device: &Device,
) -> Result<Tensor> {
    let kv_len = index_pos + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j > index_pos + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_slice(&mask, (seq_len, kv_len), device)?)
}

fn repeat_kv(xs: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        Ok(xs)
    } else {
        let (b_sz, n_kv_head, seq_len, head_dim) = xs.dims4()?;
        Tensor::cat(&vec![&xs; n_rep], 2)?.reshape((b_sz, n_kv_head * n_rep, seq_len, head_dim))
    }
}

/// A block's matrices in `cfg`: name, rows, columns; in the order q, k, v,
/// output, gate, up, down.
pub(super) fn matrices(n: &BlockTensorNames, cfg: &ModelConfig) -> [(String, usize, usize); 7] {
    let h = cfg.hidden_size;
    let kv = cfg.num_kv_heads * cfg.head_dim();
    let ff = cfg.intermediate_size;
    [
        (n.wq.clone(), h, h),
        (n.wk.clone(), kv, h),
        (n.wv.clone(), kv, h),
        (n.wo.clone(), h, h),
        (n.w_gate.clone(), ff, h),
        (n.w_up.clone(), ff, h),
        (n.w_down.clone(), h, ff),
    ]
}

impl Block {
    pub(super) fn load(
        file: &ModelFile,
        i: usize,
        cfg: &ModelConfig,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let n = file.block_names(i);
        let h = cfg.hidden_size;
        let fuse = opts.effective_mode() == WeightMode::Fast;
        let [q, k, v, o, gate, up, down] =
            matrices(&n, cfg).map(|(name, rows, cols)| load_linear(file, &name, rows, cols, opts));
        let qkv = [q?, k?, v?];
        let gate_up = [gate?, up?];
        let attn_norm = load_vector(file, &n.attn_norm, h, &opts.device)?;
        let ffn_norm = load_vector(file, &n.ffn_norm, h, &opts.device)?;
        let values = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(Self {
            norms: [values(&attn_norm)?, values(&ffn_norm)?],
            attn_norm,
            qkv: Projections::new(qkv, fuse),
            wo: o?,
            ffn_norm,
            gate_up: Projections::new(gate_up, fuse),
            w_down: down?,
            span_attn: tracing::span!(tracing::Level::TRACE, "attn"),
            span_mlp: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }

    /// The weights of the fused CPU path, where every product is packed.
    pub(super) fn fused(&self) -> Option<FusedWeights<'_>> {
        Some(FusedWeights {
            attn_norm: &self.norms[0],
            qkv: self.qkv.packed()?,
            wo: self.wo.packed()?,
            ffn_norm: &self.norms[1],
            gate_up: self.gate_up.packed()?,
            w_down: self.w_down.packed()?,
        })
    }

    /// How many sessions' rows one batched step of this block may take on `device`
    /// with each row's bits those of its own step: the fewest any product allows
    /// ([`super::linear::rows_keep_bits`]); the norms, rotary, SiLU and sums are row by
    /// row, and attention runs per session.
    pub(super) fn batch_rows(&self, device: &Device) -> usize {
        self.qkv
            .batch_rows(device)
            .min(self.wo.batch_rows(device))
            .min(self.gate_up.batch_rows(device))
            .min(self.w_down.batch_rows(device))
    }

    pub(super) fn bytes(&self) -> usize {
        self.qkv.bytes()
            + self.wo.bytes()
            + self.gate_up.bytes()
            + self.w_down.bytes()
            + (self.attn_norm.elem_count() + self.ffn_norm.elem_count()) * 4
    }

    fn rotary(&self, x: &Tensor, pos: usize, sh: &Shared) -> candle_core::Result<Tensor> {
        let (_b, _h, seq_len, _d) = x.dims4()?;
        let cos = sh.cos.narrow(0, pos, seq_len)?;
        let sin = sh.sin.narrow(0, pos, seq_len)?;
        let x = x.contiguous()?;
        if sh.cfg.rope_interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        }
    }

    fn attention(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: usize,
        kv_cache: &mut LayerKv,
        sh: &Shared,
    ) -> candle_core::Result<Tensor> {
        let _enter = self.span_attn.enter();
        let cfg = &sh.cfg;
        let head_dim = cfg.head_dim();
        let (b_sz, seq_len, n_embd) = x.dims3()?;
        let [q, k, v] = self.qkv.forward(x)?;
        let q = q
            .reshape((b_sz, seq_len, cfg.num_heads, head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b_sz, seq_len, cfg.num_kv_heads, head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, cfg.num_kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let y = self.attend_exact(&q, k, v, mask, pos, kv_cache, sh)?;
        self.wo.forward(&y.reshape(&[b_sz, seq_len, n_embd])?)
    }

    /// Exact mode's attention from the projections `(1, heads, seq, head_dim)` (`v`
    /// contiguous, none rotated yet), as candle-transformers computes it; returns
    /// `(1, seq, heads, head_dim)`, before the output product.
    #[allow(clippy::too_many_arguments)]
    fn attend_exact(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
        pos: usize,
        kv_cache: &mut LayerKv,
        sh: &Shared,
    ) -> candle_core::Result<Tensor> {
        let cfg = &sh.cfg;
        let head_dim = cfg.head_dim();
        let q = self.rotary(q, pos, sh)?;
        let k = self.rotary(&k, pos, sh)?;
        let (k, v) = cache::append(kv_cache, k, v, pos)?;
        let n_rep = cfg.num_heads / cfg.num_kv_heads;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let att = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let att = match mask {
            None => att,
            Some(mask) => {
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&sh.neg_inf.broadcast_as(mask.shape().dims())?, &att)?
            }
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
        y.transpose(1, 2)
    }

    /// Attention for the non-exact modes. The KV cache is a pair of buffers
    /// `(1, kv_heads, capacity, head_dim)` written in place and grown by
    /// doubling. On the CPU, attention runs in tiles with an online softmax
    /// ([`crate::attention`]): no score matrix, memory linear in the step's
    /// length, and the same bits for a row however the prompt is chunked.
    /// Elsewhere queries are grouped per KV head `(1, kv_heads, n_rep * seq,
    /// head_dim)` so keys and values are never repeated or copied, and `mask`
    /// is additive `(seq, kv_len)`.
    fn attention_fast(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: usize,
        kv_cache: &mut LayerKv,
        max_tokens: usize,
        sh: &Shared,
    ) -> candle_core::Result<Tensor> {
        let _enter = self.span_attn.enter();
        let cfg = &sh.cfg;
        let head_dim = cfg.head_dim();
        let (b_sz, seq_len, n_embd) = x.dims3()?;
        let (n_head, n_kv) = (cfg.num_heads, cfg.num_kv_heads);
        let [q, k, v] = self.qkv.forward(x)?;
        let q = q
            .reshape((b_sz, seq_len, n_head, head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b_sz, seq_len, n_kv, head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, n_kv, head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.rotary(&q, pos, sh)?;
        let k = self.rotary(&k, pos, sh)?;
        let need = pos + seq_len;
        let (kb, vb) = cache::write_in_place(kv_cache, &k, &v, pos, max_tokens)?;
        if x.device().is_cpu() {
            let op = crate::attention::TiledAttention {
                pos,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let y = q.apply_op3_no_bwd(&kb, &vb, &op)?;
            return self.wo.forward(&y);
        }
        let keys = kb.narrow(2, 0, need)?;
        let values = vb.narrow(2, 0, need)?;
        let n_rep = n_head / n_kv;
        let q = q.reshape((b_sz, n_kv, n_rep * seq_len, head_dim))?;
        let att = (q.matmul(&keys.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let att = match mask {
            None => att,
            Some(mask) => att
                .reshape((b_sz, n_kv, n_rep, seq_len, need))?
                .broadcast_add(mask)?
                .reshape((b_sz, n_kv, n_rep * seq_len, need))?,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&values)?;
        let y = y
            .reshape((b_sz, n_head, seq_len, head_dim))?
            .transpose(1, 2)?
            .reshape((b_sz, seq_len, n_embd))?;
        self.wo.forward(&y)
    }

    /// The block's second half, op by op: `x + down(silu(gate(n)) · up(n))` with
    /// `n = rms_norm(x)`; SiLU is candle's in exact mode, Pollen's
    /// ([`super::fused::silu`]) in the others (`sh.fast`).
    fn mlp(&self, x: &Tensor, sh: &Shared) -> candle_core::Result<Tensor> {
        let _enter = self.span_mlp.enter();
        let h = candle_nn::ops::rms_norm(x, &self.ffn_norm, sh.cfg.rms_norm_eps as f32)?;
        let [gate, up] = self.gate_up.forward(&h)?;
        let act = if sh.fast && gate.device().is_cpu() {
            let values: Vec<f32> = gate
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(super::fused::silu)
                .collect();
            Tensor::from_vec(values, gate.shape(), gate.device())?
        } else {
            candle_nn::ops::silu(&gate)?
        };
        let h = self.w_down.forward(&(act * up)?)?;
        h + x
    }

    /// One decode step for each of several sessions at once: `x` is `(1, sessions,
    /// hidden)`, row `i` at position `items[i].0` with KV layer `items[i].1`. The
    /// matrix products run once over all rows (one pass over the weights); rotary, the
    /// KV write and attention run per session, as [`Self::forward`] runs them in this
    /// mode. Each row's numbers are those of a single step where the products keep a
    /// row's bits at this many rows ([`Self::batch_rows`]: the caller's check); the
    /// norms and the rest are row by row.
    pub(super) fn forward_batch(
        &self,
        x: Tensor,
        items: &mut [(usize, &mut LayerKv)],
        max_tokens: &[usize],
        sh: &Shared,
    ) -> candle_core::Result<Tensor> {
        let eps = sh.cfg.rms_norm_eps as f32;
        let cfg = &sh.cfg;
        let head_dim = cfg.head_dim();
        let (n_head, n_kv) = (cfg.num_heads, cfg.num_kv_heads);
        let residual = &x;
        let h = candle_nn::ops::rms_norm(&x, &self.attn_norm, eps)?;
        let y = {
            let _enter = self.span_attn.enter();
            let [q, k, v] = self.qkv.forward(&h)?;
            let mut ys = Vec::with_capacity(items.len());
            for (i, ((pos, kv), &max)) in items.iter_mut().zip(max_tokens).enumerate() {
                let row = |t: &Tensor, heads: usize| {
                    t.narrow(1, i, 1)?
                        .reshape((1, 1, heads, head_dim))?
                        .transpose(1, 2)
                };
                if !sh.fast {
                    let v = row(&v, n_kv)?.contiguous()?;
                    let y = self.attend_exact(
                        &row(&q, n_head)?,
                        row(&k, n_kv)?,
                        v,
                        None,
                        *pos,
                        kv,
                        sh,
                    )?;
                    ys.push(y.reshape((1, 1, cfg.hidden_size))?);
                    continue;
                }
                let q = self.rotary(&row(&q, n_head)?, *pos, sh)?;
                let k = self.rotary(&row(&k, n_kv)?, *pos, sh)?;
                let v = row(&v, n_kv)?.contiguous()?;
                let (kb, vb) = cache::write_in_place(kv, &k, &v, *pos, max)?;
                let op = crate::attention::TiledAttention {
                    pos: *pos,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                };
                ys.push(q.apply_op3_no_bwd(&kb, &vb, &op)?);
            }
            let y = Tensor::cat(&ys, 1)?;
            self.wo.forward(&y)?
        };
        let x = (y + residual)?;
        self.mlp(&x, sh)
    }

    pub(super) fn forward(
        &self,
        x: Tensor,
        mask: Option<&Tensor>,
        pos: usize,
        kv_cache: &mut LayerKv,
        max_tokens: usize,
        sh: &Shared,
    ) -> candle_core::Result<Tensor> {
        let eps = sh.cfg.rms_norm_eps as f32;
        let residual = &x;
        let h = candle_nn::ops::rms_norm(&x, &self.attn_norm, eps)?;
        let attn = if sh.fast {
            self.attention_fast(&h, mask, pos, kv_cache, max_tokens, sh)?
        } else {
            self.attention(&h, mask, pos, kv_cache, sh)?
        };
        let x = (attn + residual)?;
        self.mlp(&x, sh)
    }
}
