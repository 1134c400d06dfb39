//! The fast modes' block on the CPU in a few fused passes over plain
//! buffers, instead of about twenty candle ops (each with its tensor, its
//! allocation and its dispatch) per block:
//!
//! 1. RMS norm computed row by row straight into the input quantization of
//!    the fused q/k/v product;
//! 2. rotary on keys while they are written into the in-place f16 KV
//!    buffers, values written in the same pass, and rotary on queries while
//!    they are gathered head-major for attention;
//! 3. tiled attention ([`crate::attention::attend`]) over the cache buffers
//!    as they are, with no reshape or copy of keys and values;
//! 4. output projection with the residual added in its result copy;
//! 5. RMS norm into the gate/up product's quantization, SiLU(gate)·up into
//!    the down projection's quantization, the residual added again.
//!
//! Buffers live in a [`Scratch`] reused by every block of a step. Every
//! float operation is the one the op-by-op path performs, in the same order
//! (candle's RMS norm and `rope`/`rope_i`, Pollen's [`silu`], and the packed
//! product), so this path gives the same bits as the op-by-op one; a test
//! checks that.

use super::block::Shared;
use super::cache::{self, LayerKv};
use crate::attention::{self, Dims};
use crate::kernels::{Activations, PackedMatrix, TILE};
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Storage, Tensor};
use half::f16;
use std::sync::{Mutex, PoisonError};

/// One block's weights, where every product is packed.
pub(super) struct FusedWeights<'a> {
    pub(super) attn_norm: &'a [f32],
    pub(super) qkv: &'a PackedMatrix,
    pub(super) wo: &'a PackedMatrix,
    pub(super) ffn_norm: &'a [f32],
    pub(super) gate_up: &'a PackedMatrix,
    pub(super) w_down: &'a PackedMatrix,
}

/// Buffers reused by every block of a step.
#[derive(Default)]
pub(super) struct Scratch {
    act: Activations,
    tiles: Vec<[f32; TILE]>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    attn: Vec<f32>,
    /// Attention's scratch: the first for sessions one after another, one a
    /// session for a batch's attention side by side on the pool.
    attentions: Vec<Mutex<attention::Scratch>>,
    norms: Vec<f32>,
    gate_up: Vec<f32>,
}

/// Rows of a step that belong to one session: `rows` tokens at positions
/// `pos..`, with that session's KV layer for this block.
pub(super) struct Segment<'a> {
    pub(super) pos: usize,
    pub(super) rows: usize,
    pub(super) kv: &'a mut LayerKv,
    pub(super) max_tokens: usize,
}

/// The rotary tables `(max_seq_len, head_dim / 2)`.
#[derive(Clone, Copy)]
pub(super) struct Rope<'a> {
    pub(super) cos: &'a [f32],
    pub(super) sin: &'a [f32],
    pub(super) interleaved: bool,
}

/// What a rotated or copied value is stored as: f32 as it is, or f16
/// saturated at ±65504 and rounded to nearest (the op-by-op path's clamp and
/// `to_dtype`).
trait Store: Copy {
    fn store(v: f32) -> Self;
}

impl Store for f32 {
    #[inline]
    fn store(v: f32) -> Self {
        v
    }
}

impl Store for f16 {
    #[inline]
    fn store(v: f32) -> Self {
        super::cache::to_f16(v)
    }
}

impl Rope<'_> {
    /// Rotates one head's row `src` (width `d`) at position `pos` into
    /// `dst`: candle's `rope_i` (pairs side by side) or `rope` (halves).
    #[inline]
    fn apply<T: Store>(&self, src: &[f32], dst: &mut [T], pos: usize) {
        let half = src.len() / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        if self.interleaved {
            for j in 0..half {
                let (a, b) = (src[2 * j], src[2 * j + 1]);
                dst[2 * j] = T::store(a * cos[j] - b * sin[j]);
                dst[2 * j + 1] = T::store(a * sin[j] + b * cos[j]);
            }
        } else {
            for j in 0..half {
                let (a, b) = (src[j], src[j + half]);
                dst[j] = T::store(a * cos[j] - b * sin[j]);
                dst[j + half] = T::store(a * sin[j] + b * cos[j]);
            }
        }
    }
}

/// A CPU tensor's contiguous data.
pub(super) fn cpu_data<'a, T: candle_core::WithDType>(
    s: &'a Storage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(c) = s else {
        candle_core::bail!("fused block: tensor not on the CPU")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused block: tensor not contiguous")
    };
    Ok(&c.as_slice::<T>()?[a..b])
}

/// candle's RMS norm of rows `x` (each `w.len()` wide),
/// `x / sqrt(mean(x²) + eps) * w`: the divisors of every row into
/// `divisors`, and a function that writes row `i`'s norm. The rows' sums of squares, each added in
/// order as candle adds them, run side by side, up to eight rows at a time,
/// so that their additions overlap; the elementwise step runs in AVX2's
/// lanes where the CPU has them. The same bits as one row at a time.
fn rms_rows<'a>(
    x: &'a [f32],
    w: &'a [f32],
    eps: f32,
    divisors: &'a mut Vec<f32>,
) -> impl Fn(usize, &mut [f32]) + 'a {
    let h = w.len();
    let m = x.len() / h;
    divisors.clear();
    divisors.resize(m, 0.0);
    let mut at = 0;
    while at + 8 <= m {
        sums_of_squares::<8>(&x[at * h..], h, &mut divisors[at..at + 8]);
        at += 8;
    }
    if at + 4 <= m {
        sums_of_squares::<4>(&x[at * h..], h, &mut divisors[at..at + 4]);
        at += 4;
    }
    while at < m {
        sums_of_squares::<1>(&x[at * h..], h, &mut divisors[at..at + 1]);
        at += 1;
    }
    for d in divisors.iter_mut() {
        *d = (*d / h as f32 + eps).sqrt();
    }
    let divisors = &*divisors;
    move |i, dst| {
        let m = divisors[i];
        crate::kernels::zip_map(&x[i * h..(i + 1) * h], w, dst, |s, a| s / m * a);
    }
}

/// `out[r]` = the sum of squares of row `r` of `rows` (`h` wide), added in
/// order, for `R` rows side by side.
#[inline]
fn sums_of_squares<const R: usize>(rows: &[f32], h: usize, out: &mut [f32]) {
    let rs: [&[f32]; R] = std::array::from_fn(|r| &rows[r * h..(r + 1) * h]);
    let mut acc = [0f32; R];
    for j in 0..h {
        for (a, row) in acc.iter_mut().zip(&rs) {
            let v = row[j];
            *a += v * v;
        }
    }
    out.copy_from_slice(&acc);
}

/// SiLU, `v / (1 + e^-v)`, with Pollen's exponential
/// ([`crate::attention::exp`]: the same bits on every platform, where the C
/// library's `expf`, which candle's SiLU takes, is not). The non-exact modes'
/// SiLU, fused or op by op.
#[inline(always)]
pub(super) fn silu(v: f32) -> f32 {
    v / (1.0 + crate::attention::exp(-v))
}

/// The widest head whose rotated row [`WriteKv`] rounds to f16 in one go
/// (wider ones, which no model at hand has, value by value: the same bits).
const ROTATED_MAX: usize = 512;

/// Writes keys or values of a segment into an f16 KV buffer `(1, kv_heads,
/// cap, d)` at positions `pos..`, rotating them on the way where `rope` is
/// set (in f32, then rounded: the op-by-op path's bits).
/// `rows` are the q/k/v product's rows (width `stride`), the heads at
/// column `col`.
struct WriteKv<'a> {
    rows: &'a [f32],
    stride: usize,
    col: usize,
    pos: usize,
    d: usize,
    rope: Option<Rope<'a>>,
}

impl InplaceOp1 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "fused-kv-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (_, n_kv, cap, d) = layout.shape().dims4()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("kv write: buffer not contiguous")
        };
        let seq = self.rows.len() / self.stride;
        if d != self.d || self.pos + seq > cap || self.col + n_kv * d > self.stride {
            candle_core::bail!("kv write: {seq} rows at {} into {cap}", self.pos)
        }
        let CpuStorage::F16(buf) = storage else {
            candle_core::bail!("kv write: buffer not f16")
        };
        let buf = &mut buf[a..b];
        // A rotated head row in f32, then rounded to f16 a row at a time.
        let mut rotated = [0f32; ROTATED_MAX];
        for (i, row) in self.rows.chunks_exact(self.stride).enumerate() {
            for g in 0..n_kv {
                let src = &row[self.col + g * d..self.col + (g + 1) * d];
                let dst = &mut buf[(g * cap + self.pos + i) * d..][..d];
                match &self.rope {
                    Some(r) if d <= ROTATED_MAX => {
                        r.apply(src, &mut rotated[..d], self.pos + i);
                        crate::kernels::to_f16_row(&rotated[..d], dst);
                    }
                    Some(r) => r.apply(src, dst, self.pos + i),
                    None => crate::kernels::to_f16_row(src, dst),
                }
            }
        }
        Ok(())
    }
}

/// One block over `x` (`(m, hidden)` row-major, updated in place), whose
/// rows are split into `segments` of consecutive positions of one session.
pub(super) fn block_forward(
    w: &FusedWeights<'_>,
    x: &mut [f32],
    segments: &mut [Segment<'_>],
    sh: &Shared,
    rope: Rope<'_>,
    s: &mut Scratch,
) -> candle_core::Result<()> {
    let cfg = &sh.cfg;
    let (h, d, ff) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let (n_head, n_kv) = (cfg.num_heads, cfg.num_kv_heads);
    let kvw = n_kv * d;
    let qn = h + 2 * kvw;
    let m = x.len() / h;
    let eps = cfg.rms_norm_eps as f32;
    if segments.iter().map(|g| g.rows).sum::<usize>() != m || w.qkv.n() != qn {
        candle_core::bail!("fused block: rows or widths do not match");
    }

    // Attention: norm into the q/k/v product's input.
    let norm = rms_rows(x, w.attn_norm, eps, &mut s.norms);
    s.act.quantize_rows_with(m, h, norm);
    s.qkv.resize(m * qn, 0.0);
    w.qkv
        .matmul_quantized(&s.act, &mut s.qkv, &mut s.tiles, false);
    s.attn.resize(m * h, 0.0);
    let scale = 1.0 / (d as f32).sqrt();
    // Keys and values into each session's cache, and its queries, rotated,
    // head-major for attention (a session's at `row0 * n_head * d`).
    s.q.resize(n_head * m * d, 0.0);
    let mut caches = Vec::with_capacity(segments.len());
    let mut row0 = 0;
    for seg in segments.iter_mut() {
        let rows = &s.qkv[row0 * qn..(row0 + seg.rows) * qn];
        let (kb, vb) = cache::reserve(
            seg.kv,
            (1, n_kv, d),
            seg.pos,
            seg.pos + seg.rows,
            seg.max_tokens,
            &Device::Cpu,
        )?;
        let write = |col, rope| WriteKv {
            rows,
            stride: qn,
            col,
            pos: seg.pos,
            d,
            rope,
        };
        kb.inplace_op1(&write(h, Some(rope)))?;
        vb.inplace_op1(&write(h + kvw, None))?;
        let q = &mut s.q[row0 * n_head * d..(row0 + seg.rows) * n_head * d];
        for hd in 0..n_head {
            for (i, row) in rows.chunks_exact(qn).enumerate() {
                let dst = &mut q[(hd * seg.rows + i) * d..][..d];
                rope.apply(&row[hd * d..(hd + 1) * d], dst, seg.pos + i);
            }
        }
        caches.push((kb, vb));
        row0 += seg.rows;
    }
    // Each session's attention over its own cache.
    let guards: Vec<_> = caches
        .iter()
        .map(|(kb, vb)| (kb.storage_and_layout(), vb.storage_and_layout()))
        .collect();
    let mut jobs = Vec::with_capacity(segments.len());
    let (mut q, mut out) = (&s.q[..], &mut s.attn[..]);
    for (seg, ((ks, kl), (vs, vl))) in segments.iter().zip(&guards) {
        let (sq, rest) = q.split_at(n_head * seg.rows * d);
        let (so, others) = std::mem::take(&mut out).split_at_mut(seg.rows * h);
        (q, out) = (rest, others);
        let (_, _, cap, _) = kl.shape().dims4()?;
        let dims = Dims {
            heads: n_head,
            kv_heads: n_kv,
            cap,
            d,
        };
        let (k, v) = (cpu_data::<f16>(ks, kl)?, cpu_data::<f16>(vs, vl)?);
        jobs.push((sq, k, v, dims, seg.pos, Mutex::new(so)));
    }
    let pool = candle_core::utils::barrier_pool();
    if jobs.len() > 1 && pool.n_workers() > 0 {
        // A batch's sessions side by side on the pool, each on one thread
        // with its own scratch: the same arithmetic as one after another.
        s.attentions.resize_with(jobs.len(), Default::default);
        let scratches = &s.attentions;
        pool.execute_chunked(jobs.len(), |range| {
            for i in range {
                let (q, k, v, dims, pos, out) = &jobs[i];
                // Each job and scratch is handed to one worker: the locks are never contended.
                let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
                let mut scratch = scratches[i].lock().unwrap_or_else(PoisonError::into_inner);
                attention::attend(q, k, v, *dims, *pos, scale, &mut scratch, &mut out, false);
            }
        });
    } else {
        s.attentions.resize_with(1, Default::default);
        let scratch = s.attentions[0]
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (q, k, v, dims, pos, out) in jobs {
            let out = out.into_inner().unwrap_or_else(PoisonError::into_inner);
            attention::attend(q, k, v, dims, pos, scale, scratch, out, true);
        }
    }
    drop(guards);
    let attn = &s.attn;
    s.act.quantize_rows_with(m, h, |i, row| {
        row.copy_from_slice(&attn[i * h..(i + 1) * h])
    });
    w.wo.matmul_quantized(&s.act, x, &mut s.tiles, true);

    // MLP: norm into gate/up, SiLU(gate)·up into down.
    let norm = rms_rows(x, w.ffn_norm, eps, &mut s.norms);
    s.act.quantize_rows_with(m, h, norm);
    s.gate_up.resize(m * 2 * ff, 0.0);
    w.gate_up
        .matmul_quantized(&s.act, &mut s.gate_up, &mut s.tiles, false);
    let gu = &s.gate_up;
    s.act.quantize_rows_with(m, ff, |i, row| {
        let (g, u) = gu[i * 2 * ff..(i + 1) * 2 * ff].split_at(ff);
        crate::kernels::zip_map(g, u, row, |g, u| silu(g) * u);
    });
    w.w_down.matmul_quantized(&s.act, x, &mut s.tiles, true);
    Ok(())
}

/// Reads a step's hidden states `(1, m, hidden)` into a buffer.
pub(super) fn to_rows(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// candle's RMS norm of one row, as its CPU op computes it.
    fn one_row(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / x.len() as f32 + eps).sqrt();
        x.iter().zip(w).map(|(&s, &a)| s / m * a).collect()
    }

    #[test]
    fn norms_of_rows_side_by_side_give_each_rows_own_bits() {
        let h = 40;
        let mut seed = 3u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 7.0
        };
        let w: Vec<f32> = (0..h).map(|_| next()).collect();
        for m in [1, 3, 4, 5, 8, 9, 13, 16] {
            let x: Vec<f32> = (0..m * h).map(|_| next()).collect();
            let mut divisors = Vec::new();
            let norm = rms_rows(&x, &w, 1e-5, &mut divisors);
            for i in 0..m {
                let mut got = vec![0f32; h];
                norm(i, &mut got);
                let want = one_row(&x[i * h..(i + 1) * h], &w, 1e-5);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "row {i} of {m}");
            }
        }
    }
}
