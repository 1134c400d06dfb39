//! The llama architecture, cut into spans of blocks.
//!
//! This file follows candle-transformers' `quantized_llama.rs` op for op (the
//! same norms, rotary kernels, mask, grouped-query repeat and softmax) so that
//! spans chained across machines give bit-identical logits to that reference
//! when the prompt is chunked the same way. Two things differ by design:
//! weights are loaded per span, tensor by tensor, and the KV cache lives in a
//! [`SpanCache`] per session instead of inside the layers, so many sessions
//! share one copy of the weights.
//!
//! Hazards of the convention, kept from the reference:
//! - GGUF llama files store q/k rows permuted for *interleaved* rotary pairs
//!   (`rope_i`); Hugging Face weights use the half-split form (`rope`).
//! - A position-0 step ignores whatever the cache held, as the reference does;
//!   we refuse a position that is not the cache's length instead.

use crate::config::{BlockRange, ModelConfig};
use crate::kernels::PackedMatrix;
use crate::weights::{ModelFile, Weight};
use crate::{Result, ShardError};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use std::sync::Arc;

/// How weights are kept in memory. The default is [`WeightMode::Fast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// As stored in the file: bit-identical to candle-transformers' own model.
    Exact,
    /// Quantized types without a fast CPU kernel in candle (Q4_1, Q5_0, Q5_1,
    /// Q8_1) are requantized at load to this type, which has one. Logits move
    /// slightly (measured in the engine bench); the text rarely does.
    Requantize(GgmlDType),
    /// Q4_0, Q4_1 and Q8_0 weights keep their values but are repacked at load
    /// for this crate's own AVX-512 VNNI kernel ([`crate::kernels`]); Q5_0,
    /// Q5_1 and Q8_1 become 8-bit asymmetric quants. Activations are quantized
    /// per 32 values as candle does, so logits differ from exact only by
    /// rounding (summation order, fused attention; measured in the engine
    /// bench). Uses the same growable KV cache and fused attention as
    /// `Requantize`.
    /// On CPUs without AVX-512 VNNI this behaves as `Requantize(Q8_0)`.
    #[default]
    Fast,
}

impl WeightMode {
    /// Parses `exact`, `q8_0`, `q4_0`, `q4k`... as the CLI takes it.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "exact" => Self::Exact,
            "fast" => Self::Fast,
            "q8_0" | "q8" => Self::Requantize(GgmlDType::Q8_0),
            "q4_0" => Self::Requantize(GgmlDType::Q4_0),
            "q4k" | "q4_k" => Self::Requantize(GgmlDType::Q4K),
            "q6k" | "q6_k" => Self::Requantize(GgmlDType::Q6K),
            _ => {
                return Err(ShardError::BadInput(format!(
                    "unknown weight mode `{text}` (expected fast, exact, q8_0, q4_0, q4k or q6k)"
                )));
            }
        })
    }
}

impl std::fmt::Display for WeightMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact => f.write_str("exact"),
            Self::Fast => f.write_str("fast"),
            Self::Requantize(d) => write!(f, "{}", format!("{d:?}").to_ascii_lowercase()),
        }
    }
}

/// Where and how to load weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Device for weights, caches and activations.
    pub device: Device,
    /// Exact or requantized weights.
    pub mode: WeightMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            mode: WeightMode::default(),
        }
    }
}

/// Bounds on one session's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most tokens (prompt plus generated) a session may hold.
    pub max_tokens: usize,
    /// Most bytes of keys and values a session may hold in this span.
    pub max_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_tokens: 2048,
            max_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Weights of a matrix product: candle's own, or packed for our kernel.
#[derive(Debug, Clone)]
enum LinearInner {
    Candle(QMatMul),
    Packed(Arc<PackedMatrix>),
}

/// A matrix product with a stored weight, quantized or dense.
#[derive(Debug, Clone)]
struct Linear {
    inner: LinearInner,
    span: tracing::Span,
}

impl Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        match &self.inner {
            LinearInner::Candle(m) => m.forward(xs),
            LinearInner::Packed(p) => xs.contiguous()?.apply_op1_no_bwd(p.as_ref()),
        }
    }

    fn bytes(&self) -> usize {
        match &self.inner {
            LinearInner::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearInner::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            LinearInner::Packed(p) => p.bytes(),
        }
    }
}

fn needs_requant(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

fn requantize(q: QTensor, target: GgmlDType) -> Result<QTensor> {
    let last = q.shape().dims().last().copied().unwrap_or(0);
    if !needs_requant(q.dtype()) || last % target.block_size() != 0 {
        return Ok(q);
    }
    let dense = q.dequantize(&Device::Cpu)?;
    let out = QTensor::quantize(&dense, target)?;
    if q.device().is_cpu() {
        Ok(out)
    } else {
        let dense = out.dequantize(&Device::Cpu)?;
        Ok(QTensor::quantize_onto(&dense, target, &q.device())?)
    }
}

fn linear_from(
    weight: Weight,
    name: &str,
    rows: usize,
    cols: usize,
    mode: WeightMode,
) -> Result<Linear> {
    let inner = match weight {
        Weight::Quantized(q) => {
            let dims = q.shape().dims().to_vec();
            if dims != [rows, cols] {
                return Err(ShardError::ShapeMismatch {
                    name: name.into(),
                    got: dims,
                    expected: vec![rows, cols],
                });
            }
            let q = match mode {
                WeightMode::Exact => q,
                WeightMode::Requantize(t) => requantize(q, t)?,
                WeightMode::Fast => {
                    let packable = needs_requant(q.dtype())
                        || matches!(q.dtype(), GgmlDType::Q4_0 | GgmlDType::Q8_0);
                    if packable && let Some(p) = PackedMatrix::pack(&q)? {
                        return Ok(Linear {
                            inner: LinearInner::Packed(Arc::new(p)),
                            span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
                        });
                    }
                    requantize(q, GgmlDType::Q8_0)?
                }
            };
            LinearInner::Candle(QMatMul::from_qtensor(q)?)
        }
        Weight::Dense(t) => {
            if t.dims() != [rows, cols] {
                return Err(ShardError::ShapeMismatch {
                    name: name.into(),
                    got: t.dims().to_vec(),
                    expected: vec![rows, cols],
                });
            }
            LinearInner::Candle(QMatMul::Tensor(t))
        }
    };
    Ok(Linear {
        inner,
        span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
    })
}

fn load_linear(
    file: &ModelFile,
    name: &str,
    rows: usize,
    cols: usize,
    opts: &LoadOptions,
) -> Result<Linear> {
    let w = file.read_weight(name, &opts.device)?;
    linear_from(w, name, rows, cols, opts.mode)
}

fn load_vector(file: &ModelFile, name: &str, len: usize, device: &Device) -> Result<Tensor> {
    let t = file.read_weight(name, device)?.into_dense(device)?;
    if t.dims() != [len] {
        return Err(ShardError::ShapeMismatch {
            name: name.into(),
            got: t.dims().to_vec(),
            expected: vec![len],
        });
    }
    Ok(t)
}

/// Projections of the same input: separate products (exact mode, op for op
/// as the reference) or one fused packed product whose output is split.
#[derive(Debug, Clone)]
enum Projections<const N: usize> {
    Separate([Linear; N]),
    Fused(Linear, [usize; N]),
}

impl<const N: usize> Projections<N> {
    fn new(parts: [Linear; N], fuse: bool) -> Self {
        if fuse {
            let packed: Vec<&PackedMatrix> = parts
                .iter()
                .filter_map(|l| match &l.inner {
                    LinearInner::Packed(p) => Some(p.as_ref()),
                    LinearInner::Candle(_) => None,
                })
                .collect();
            if packed.len() == N
                && let Some(m) = PackedMatrix::concat(&packed)
            {
                let widths = std::array::from_fn(|i| packed[i].n());
                return Self::Fused(
                    Linear {
                        inner: LinearInner::Packed(Arc::new(m)),
                        span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
                    },
                    widths,
                );
            }
        }
        Self::Separate(parts)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let out: Vec<Tensor> = match self {
            Self::Separate(ls) => ls
                .iter()
                .map(|l| l.forward(x))
                .collect::<candle_core::Result<_>>()?,
            Self::Fused(l, widths) => {
                let y = l.forward(x)?;
                let mut at = 0;
                let mut out = Vec::with_capacity(N);
                for &w in widths {
                    out.push(y.narrow(D::Minus1, at, w)?);
                    at += w;
                }
                out
            }
        };
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("projection count".into()))
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Separate(ls) => ls.iter().map(Linear::bytes).sum(),
            Self::Fused(l, _) => l.bytes(),
        }
    }
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    /// q, k, v.
    qkv: Projections<3>,
    wo: Linear,
    ffn_norm: Tensor,
    /// gate, up.
    gate_up: Projections<2>,
    w_down: Linear,
    span_attn: tracing::Span,
    span_mlp: tracing::Span,
}

/// The shared constants every block of a model uses.
#[derive(Debug, Clone)]
struct Shared {
    cfg: ModelConfig,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    /// Non-exact modes: growable KV buffers and grouped attention without
    /// repeated keys (see [`Block::attention_fast`]).
    fast: bool,
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<_> = (0..cfg.rope_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / cfg.rope_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let n = cfg.max_seq_len;
    let idx_theta = Tensor::arange(0, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

/// `mask[i][j] = 1` where query `i` (at position `index_pos + i`) must not see key `j`.
fn causal_mask(seq_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
    let kv_len = index_pos + seq_len;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > index_pos + i)))
        .collect();
    Ok(Tensor::from_slice(&mask, (seq_len, kv_len), device)?)
}

/// `mask[i][j] = -inf` where query `i` (at position `index_pos + i`) must not see key `j`, else 0.
fn causal_mask_additive(seq_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
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

impl Block {
    fn load(file: &ModelFile, i: usize, cfg: &ModelConfig, opts: &LoadOptions) -> Result<Self> {
        let n = file.block_names(i);
        let h = cfg.hidden_size;
        let kv = cfg.num_kv_heads * cfg.head_dim();
        let ff = cfg.intermediate_size;
        let fuse = opts.mode == WeightMode::Fast;
        let qkv = [
            load_linear(file, &n.wq, h, h, opts)?,
            load_linear(file, &n.wk, kv, h, opts)?,
            load_linear(file, &n.wv, kv, h, opts)?,
        ];
        let gate_up = [
            load_linear(file, &n.w_gate, ff, h, opts)?,
            load_linear(file, &n.w_up, ff, h, opts)?,
        ];
        Ok(Self {
            attn_norm: load_vector(file, &n.attn_norm, h, &opts.device)?,
            qkv: Projections::new(qkv, fuse),
            wo: load_linear(file, &n.wo, h, h, opts)?,
            ffn_norm: load_vector(file, &n.ffn_norm, h, &opts.device)?,
            gate_up: Projections::new(gate_up, fuse),
            w_down: load_linear(file, &n.w_down, h, ff, opts)?,
            span_attn: tracing::span!(tracing::Level::TRACE, "attn"),
            span_mlp: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }

    fn bytes(&self) -> usize {
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
        kv_cache: &mut Option<(Tensor, Tensor)>,
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
        let q = self.rotary(&q, pos, sh)?;
        let k = self.rotary(&k, pos, sh)?;
        let (k, v) = match kv_cache.as_ref() {
            Some((k_cache, v_cache)) if pos > 0 => (
                Tensor::cat(&[k_cache, &k], 2)?,
                Tensor::cat(&[v_cache, &v], 2)?,
            ),
            _ => (k, v),
        };
        *kv_cache = Some((k.clone(), v.clone()));
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
        let y = y.transpose(1, 2)?.reshape(&[b_sz, seq_len, n_embd])?;
        self.wo.forward(&y)
    }

    /// Attention for the non-exact modes. The KV cache is a pair of buffers
    /// `(1, kv_heads, capacity, head_dim)` written in place and grown by
    /// doubling; queries are grouped per KV head `(1, kv_heads, n_rep * seq,
    /// head_dim)` so keys and values are never repeated or copied; `mask` is
    /// additive `(seq, kv_len)`.
    fn attention_fast(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: usize,
        kv_cache: &mut Option<(Tensor, Tensor)>,
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
        let (kb, vb) = match kv_cache.take() {
            Some((kb, vb)) if kb.dim(2)? >= need => (kb, vb),
            old => {
                let cap = need.next_power_of_two().max(64).min(max_tokens.max(need));
                let shape = (b_sz, n_kv, cap, head_dim);
                let kb = Tensor::zeros(shape, DType::F32, x.device())?;
                let vb = Tensor::zeros(shape, DType::F32, x.device())?;
                if let Some((ok, ov)) = old
                    && pos > 0
                {
                    kb.slice_set(&ok.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
                    vb.slice_set(&ov.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
                }
                (kb, vb)
            }
        };
        kb.slice_set(&k, 2, pos)?;
        vb.slice_set(&v, 2, pos)?;
        let keys = kb.narrow(2, 0, need)?;
        let values = vb.narrow(2, 0, need)?;
        if seq_len == 1 && x.device().is_cpu() {
            let op = crate::attention::DecodeAttention {
                len: need,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let y = q.apply_op3_no_bwd(&kb, &vb, &op)?;
            *kv_cache = Some((kb, vb));
            return self.wo.forward(&y);
        }
        *kv_cache = Some((kb, vb));
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

    fn forward(
        &self,
        x: Tensor,
        mask: Option<&Tensor>,
        pos: usize,
        kv_cache: &mut Option<(Tensor, Tensor)>,
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
        let _enter = self.span_mlp.enter();
        let residual = &x;
        let h = candle_nn::ops::rms_norm(&x, &self.ffn_norm, eps)?;
        let [gate, up] = self.gate_up.forward(&h)?;
        let h = self.w_down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
        h + residual
    }
}

/// The weights of blocks `[a, b)` of one model, shared by every session.
#[derive(Debug)]
pub struct BlockSpan {
    range: BlockRange,
    blocks: Vec<Block>,
    shared: Shared,
    device: Device,
    weight_bytes: usize,
}

/// One session's KV cache for one span.
#[derive(Debug)]
pub struct SpanCache {
    range: BlockRange,
    /// Exact mode: keys and values `(1, kv_heads, len, head_dim)`. Fast
    /// modes: buffers `(1, kv_heads, capacity, head_dim)` written in place,
    /// of which the first `len` positions are valid.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    limits: CacheLimits,
    bytes_per_token: usize,
    fast: bool,
}

impl Clone for SpanCache {
    /// A clone owns its keys and values: fast-mode buffers are written in
    /// place, so they are copied rather than shared.
    fn clone(&self) -> Self {
        let layers = if self.fast {
            self.layers
                .iter()
                .map(|l| {
                    l.as_ref().and_then(|(k, v)| match (k.copy(), v.copy()) {
                        (Ok(k), Ok(v)) => Some((k, v)),
                        // Cannot happen on a working device; an empty layer
                        // would make the next step fail loudly, never silently.
                        _ => None,
                    })
                })
                .collect()
        } else {
            self.layers.clone()
        };
        Self {
            range: self.range,
            layers,
            len: self.len,
            limits: self.limits,
            bytes_per_token: self.bytes_per_token,
            fast: self.fast,
        }
    }
}

impl SpanCache {
    /// Tokens the cache holds (the next position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_token
    }

    /// The bounds this cache enforces.
    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Tokens that may still be added.
    pub fn free_tokens(&self) -> usize {
        let by_bytes = self.limits.max_bytes / self.bytes_per_token.max(1);
        self.limits
            .max_tokens
            .min(by_bytes)
            .saturating_sub(self.len)
    }

    /// Empties the cache, keeping its limits.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Drops every position from `len` on, so those steps can be run again.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if self.fast {
            // Positions from `len` on are overwritten by the next steps.
            self.len = len;
            if len == 0 {
                self.clear();
            }
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        if len == 0 {
            self.clear();
        }
        self.len = len;
        Ok(())
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
        SpanCache {
            range: self.range,
            layers: vec![None; self.blocks.len()],
            len: 0,
            limits,
            bytes_per_token: self.shared.cfg.kv_bytes_per_token_per_block() * self.blocks.len(),
            fast: self.shared.fast,
        }
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
        if cache.range != self.range || cache.fast != self.shared.fast {
            return Err(ShardError::BadInput(format!(
                "a cache for blocks {} used with blocks {}",
                cache.range, self.range
            )));
        }
        if pos != cache.len {
            return Err(ShardError::PositionMismatch {
                cached: cache.len,
                got: pos,
            });
        }
        let new_len = cache.len + seq;
        if new_len > cache.limits.max_tokens {
            return Err(ShardError::CacheFull {
                detail: format!(
                    "{new_len} tokens exceed the session limit of {} tokens",
                    cache.limits.max_tokens
                ),
            });
        }
        if new_len * cache.bytes_per_token > cache.limits.max_bytes {
            return Err(ShardError::CacheFull {
                detail: format!(
                    "{} bytes of keys and values exceed the session limit of {} bytes",
                    new_len * cache.bytes_per_token,
                    cache.limits.max_bytes
                ),
            });
        }
        let hidden = hidden.to_device(&self.device)?.to_dtype(DType::F32)?;
        let mask = if seq == 1 {
            None
        } else if self.shared.fast {
            Some(causal_mask_additive(seq, pos, &self.device)?)
        } else {
            Some(causal_mask(seq, pos, &self.device)?)
        };
        let max_tokens = cache.limits.max_tokens;
        let saved = cache.layers.clone();
        let mut x = hidden;
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            match block.forward(x, mask.as_ref(), pos, kv, max_tokens, &self.shared) {
                Ok(y) => x = y,
                Err(e) => {
                    cache.layers = saved;
                    return Err(e.into());
                }
            }
        }
        cache.len = new_len;
        Ok(x)
    }
}

/// The client's ends of the model: embeddings, final norm and output head.
#[derive(Debug)]
pub struct ClientEnds {
    cfg: ModelConfig,
    embeddings: Tensor,
    final_norm: Tensor,
    head: Linear,
    device: Device,
}

impl ClientEnds {
    /// Loads the embeddings, final norm and head, and no block.
    pub fn load(file: &ModelFile, opts: &LoadOptions) -> Result<Self> {
        let cfg = file.config()?;
        let emb_name = file.embeddings_name();
        let emb = file.read_weight(emb_name, &opts.device)?;
        let (emb_dense, head) = match emb {
            Weight::Quantized(q) => {
                let dense = q.dequantize(&opts.device)?;
                let head = if cfg.tied_embeddings {
                    Some(linear_from(
                        Weight::Quantized(q),
                        emb_name,
                        cfg.vocab_size,
                        cfg.hidden_size,
                        opts.mode,
                    )?)
                } else {
                    None
                };
                (dense, head)
            }
            Weight::Dense(t) => {
                let head = if cfg.tied_embeddings {
                    Some(linear_from(
                        Weight::Dense(t.clone()),
                        emb_name,
                        cfg.vocab_size,
                        cfg.hidden_size,
                        opts.mode,
                    )?)
                } else {
                    None
                };
                (t, head)
            }
        };
        if emb_dense.dims() != [cfg.vocab_size, cfg.hidden_size] {
            return Err(ShardError::ShapeMismatch {
                name: emb_name.into(),
                got: emb_dense.dims().to_vec(),
                expected: vec![cfg.vocab_size, cfg.hidden_size],
            });
        }
        let head = match head {
            Some(h) => h,
            None => load_linear(
                file,
                file.head_name(),
                cfg.vocab_size,
                cfg.hidden_size,
                opts,
            )?,
        };
        let final_norm = load_vector(file, file.final_norm_name(), cfg.hidden_size, &opts.device)?;
        Ok(Self {
            cfg,
            embeddings: emb_dense,
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
        (self.embeddings.elem_count() + self.final_norm.elem_count()) * 4 + self.head.bytes()
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
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let values = self.embeddings.index_select(&ids.flatten_all()?, 0)?;
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

/// A span shared between sessions.
pub type SharedSpan = Arc<BlockSpan>;
