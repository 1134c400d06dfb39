//! Causal attention over a KV buffer in tiles, with an online softmax, for
//! the non-exact modes on the CPU.
//!
//! A step of `seq` queries at positions `pos..pos + seq` attends over the
//! first `pos + seq` positions of the in-place KV buffers. Done with candle
//! ops, that materialises a `(heads, seq, pos + seq)` score matrix (and a
//! mask and a softmax of the same size): 130 MB per block for a 1,900-token
//! prompt of the default model. This op never holds more than one tile of
//! scores per query: keys are visited in tiles of [`KEY_TILE`] positions,
//! and each query row keeps a running maximum, a running sum and an
//! unnormalised output that are rescaled whenever the maximum grows (the
//! online softmax of flash attention). Memory is linear in `seq`.
//!
//! Grouped-query style: query head `h` reads KV head `h / n_rep`, so keys and
//! values are never repeated or copied. The output has the heads side by
//! side, `(1, seq, heads * head_dim)`, ready for the output projection.
//!
//! Keys and values are f16 (as llama.cpp keeps them by default): half the
//! memory of a session, and half the bytes a step reads, which is what a
//! batched decode step's attention waits on. Queries, scores, the softmax
//! and the output are f32; each f16 value is widened exactly.
//!
//! Each query row is computed on its own, over the same tiles from position
//! 0 in the same order, whatever the step's length, the thread count or the
//! position of the row in its step: a prompt chunked differently, or run on
//! another machine, gives the same bits. A decode step is the one-row case.

use crate::kernels;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use half::f16;
use std::sync::{Mutex, PoisonError};

/// Key positions per tile of scores.
pub(crate) const KEY_TILE: usize = 64;
/// Query rows per unit of work handed to a thread.
const QUERY_BLOCK: usize = 16;

/// Attention of a step's f32 queries `(1, heads, seq, head_dim)` at
/// positions `pos..pos + seq` over f16 KV buffers `(1, kv_heads, capacity,
/// head_dim)` holding (at least) positions `0..pos + seq`; output `(1, seq,
/// heads * head_dim)`.
pub(crate) struct TiledAttention {
    pub(crate) pos: usize,
    pub(crate) scale: f32,
}

impl TiledAttention {
    /// Bytes this op allocates for a step of `seq` queries over `heads`
    /// heads of width `head_dim`, `n_rep` query heads to a KV group: its
    /// output and its results by group, plus per-thread scratch (a group's
    /// scores and softmax states for a block of rows; bounded, counted once
    /// per thread).
    pub(crate) fn bytes(
        seq: usize,
        heads: usize,
        n_rep: usize,
        head_dim: usize,
        threads: usize,
    ) -> usize {
        let rows = seq.saturating_mul(heads).saturating_mul(head_dim);
        let per_thread = n_rep
            .saturating_mul(QUERY_BLOCK)
            .saturating_mul(KEY_TILE + 2)
            .saturating_mul(4);
        rows.saturating_mul(8)
            .saturating_add(threads.saturating_mul(per_thread))
    }
}

/// Buffers an attention step reuses: its results by KV group, and one
/// thread's scores and running softmax states.
#[derive(Default)]
pub(crate) struct Scratch {
    by_group: Vec<f32>,
    scores: Vec<f32>,
    states: Vec<Row>,
}

/// Heads side by side, up to three at a time: `each::<H>(first)` for
/// `first = 0, H, ..` until `n` heads are done.
fn by_threes(n: usize, mut each: impl FnMut(usize, usize)) {
    let mut first = 0;
    while first < n {
        let h = (n - first).min(3);
        each(first, h);
        first += h;
    }
}

/// `H` slices of `len` values from consecutive `KEY_TILE`-wide rows of
/// `buf`, from row `first`.
fn rows_of<const H: usize>(buf: &mut [f32], first: usize, len: usize) -> [&mut [f32]; H] {
    let mut it = buf[first * KEY_TILE..]
        .chunks_exact_mut(KEY_TILE)
        .map(|r| &mut r[..len]);
    std::array::from_fn(|_| it.next().unwrap_or_default())
}

/// Dot products of the `n_rep` queries `qs` (query `r` at `qs[r * q_stride..]`,
/// `d` long) with `len` consecutive keys of `keys` (each `d` long), query
/// `r`'s into row `r` of `scores` (rows `KEY_TILE` apart): each in eight
/// lanes, lane `l` adding `q[8c + l] · key[8c + l]` in order of `c`, the
/// lanes added in order, then the products of the values past the last
/// multiple of 8 (the tests' `dot`, bit for bit, on every CPU). Up to three
/// queries read each key at once.
fn dots(qs: &[f32], q_stride: usize, d: usize, keys: &[f16], len: usize, scores: &mut [f32]) {
    let n_rep = scores.len() / KEY_TILE;
    let q = |r: usize| &qs[r * q_stride..r * q_stride + d];
    by_threes(n_rep, |first, h| match h {
        3 => kernels::lane_sums_heads(
            [q(first), q(first + 1), q(first + 2)],
            keys,
            d,
            &mut rows_of::<3>(scores, first, len),
        ),
        2 => kernels::lane_sums_heads(
            [q(first), q(first + 1)],
            keys,
            d,
            &mut rows_of::<2>(scores, first, len),
        ),
        _ => kernels::lane_sums_heads([q(first)], keys, d, &mut rows_of::<1>(scores, first, len)),
    });
    let full = d / 8 * 8;
    if full == d {
        return;
    }
    for r in 0..n_rep {
        let rest = &q(r)[full..];
        for (j, o) in scores[r * KEY_TILE..][..len].iter_mut().enumerate() {
            let key = &keys[j * d..(j + 1) * d];
            let tail: f32 = rest
                .iter()
                .zip(&key[full..])
                .map(|(x, &y)| x * kernels::widen(y))
                .sum();
            *o += tail;
        }
    }
}

/// Adds the values `vals` (`len` of them, each `d` long), weighted by row
/// `r` of `scores`, to output `r` of `out` (`d` apart), for every row:
/// [`kernels::weighted_sum_heads`], each head's steps as alone, up to three
/// heads reading each value at once.
fn weigh(scores: &[f32], vals: &[f16], len: usize, d: usize, out: &mut [f32]) {
    let n_rep = out.len() / d;
    let mut outs = out.chunks_exact_mut(d);
    let p = |r: usize| &scores[r * KEY_TILE..][..len];
    by_threes(n_rep, |first, h| {
        let mut y = |_| outs.next().unwrap_or_default();
        match h {
            3 => kernels::weighted_sum_heads(
                [p(first), p(first + 1), p(first + 2)],
                vals,
                &mut [y(0), y(1), y(2)],
            ),
            2 => kernels::weighted_sum_heads([p(first), p(first + 1)], vals, &mut [y(0), y(1)]),
            _ => kernels::weighted_sum_heads([p(first)], vals, &mut [y(0)]),
        }
    });
}

/// `e^x` to within one ulp, in plain IEEE operations (no calls, no branches,
/// no fused multiply-adds), so that a loop of them vectorises and gives the
/// same bits on every CPU: `x` is clamped to [-87, 88] (the softmax only asks
/// `x ≤ 0`, where e^-87 ≈ 1.6e-38 is as good as 0 next to the row's maximum,
/// whose weight is exactly 1), `x = n ln 2 + f` with `n` rounded to nearest
/// and `|f| ≤ ln 2 / 2`, then Cephes' `expf` polynomial for `e^f`, times `2^n`
/// built in the exponent bits. NaN stays NaN. Replaces libm's `expf`, which
/// was 5% of a batched decode step.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5 × 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts; `n * LN2_HI` is exact for |n| < 2^15.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let r = x * std::f32::consts::LOG2_E + ROUND;
    let n = r - ROUND;
    let f = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * f + 1.398_2e-3;
    let p = p * f + 8.333_452e-3;
    let p = p * f + 4.166_579_6e-2;
    let p = p * f + 0.166_666_65;
    let p = p * f + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5
    let e = p * (f * f) + f + 1.0;
    // `n` in -126..=127 (the clamp), so `2^n` is a normal float.
    let k = (r.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits(((k + 127) as u32) << 23)
}

/// The running state of one query row.
#[derive(Clone, Copy)]
struct Row {
    max: f32,
    sum: f32,
}

/// Rows `rows` of the `n_rep` query heads of one KV group: queries `q`
/// (head `r`'s rows at `q[r * seq * d..]`, `seq` rows a head), keys and
/// values of the group (`cap * d` each), into `out` (row by row, the
/// group's heads side by side: `(rows.len(), n_rep, d)`). Row `i`
/// (step-relative) sees key positions `0..=pos + i`. At most
/// [`QUERY_BLOCK`] rows. The heads of a row see the same keys and values,
/// which they read together; each head's row takes the steps it takes
/// alone.
#[allow(clippy::too_many_arguments)]
fn group_block(
    q: &[f32],
    seq: usize,
    k: &[f16],
    v: &[f16],
    d: usize,
    pos: usize,
    rows: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let n = rows.len();
    let n_rep = out.len() / (n * d);
    out.fill(0.0);
    let start = Row {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };
    scratch.states.clear();
    scratch.states.resize(n * n_rep, start);
    scratch.scores.resize(n * n_rep * KEY_TILE, 0.0);
    // Keys seen by the block's last row; tiles from 0, in order.
    let visible = pos + rows.end;
    let mut t0 = 0;
    while t0 < visible {
        let t1 = (t0 + KEY_TILE).min(visible);
        let each = out
            .chunks_exact_mut(n_rep * d)
            .zip(scratch.scores.chunks_exact_mut(n_rep * KEY_TILE))
            .zip(scratch.states.chunks_exact_mut(n_rep));
        for (r, ((o, s), states)) in each.enumerate() {
            let i = rows.start + r;
            // This row sees keys `..end` of the tile.
            let end = t1.min(pos + i + 1);
            if end <= t0 {
                continue;
            }
            let len = end - t0;
            dots(&q[i * d..], seq * d, d, &k[t0 * d..end * d], len, s);
            for ((s, st), o) in s
                .chunks_exact_mut(KEY_TILE)
                .zip(states)
                .zip(o.chunks_exact_mut(d))
            {
                let s = &mut s[..len];
                let tile_max = kernels::scale_max(s, scale);
                if tile_max > st.max {
                    let corr = exp(st.max - tile_max);
                    st.sum *= corr;
                    o.iter_mut().for_each(|x| *x *= corr);
                    st.max = tile_max;
                }
                // Scores become weights; they are summed, and the values
                // added, in key order.
                kernels::exp_below(s, st.max);
                st.sum = s.iter().fold(st.sum, |acc, &p| acc + p);
            }
            weigh(s, &v[t0 * d..end * d], len, d, o);
        }
        t0 = t1;
    }
    for (st, o) in scratch.states.iter().zip(out.chunks_exact_mut(d)) {
        let inv = 1.0 / st.sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The shapes [`attend`] works on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    /// Query heads.
    pub(crate) heads: usize,
    /// Key/value heads (`heads` is a multiple).
    pub(crate) kv_heads: usize,
    /// Positions the KV buffers hold.
    pub(crate) cap: usize,
    /// Head width.
    pub(crate) d: usize,
}

/// Attention of `seq` queries at positions `pos..` over KV buffers
/// `(kv_heads, cap, d)`: `q` is head-major `(heads, seq, d)`, `out` is
/// `(seq, heads * d)`. `scratch` is reused between calls. With `split`, a
/// step of many key visits is shared out on candle's thread pool; without,
/// it stays on this thread (a caller already on the pool's threads).
/// The caller checks that `pos + seq <= cap` and the slices' lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    dims: Dims,
    pos: usize,
    scale: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
    split: bool,
) {
    let Dims {
        heads,
        kv_heads,
        cap,
        d,
    } = dims;
    let seq = q.len() / (heads * d);
    let n_rep = heads / kv_heads;
    let blocks = seq.div_ceil(QUERY_BLOCK);
    // Results by (group, block): the block's rows, each with the group's
    // heads side by side, one slot per (group, block), so that workers
    // write disjoint slots.
    let mut by_group = std::mem::take(&mut scratch.by_group);
    by_group.clear();
    by_group.resize(heads * seq * d, 0.0);
    {
        let work = |item: usize, out: &mut [f32], scratch: &mut Scratch| {
            let (g, b) = (item / blocks, item % blocks);
            let rows = b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(seq);
            let qg = &q[g * n_rep * seq * d..(g + 1) * n_rep * seq * d];
            let kg = &k[g * cap * d..(g + 1) * cap * d];
            let vg = &v[g * cap * d..(g + 1) * cap * d];
            group_block(qg, seq, kg, vg, d, pos, rows, scale, out, scratch);
        };
        let items = kv_heads * blocks;
        // Key visits of the step: small steps stay on this thread.
        let visits = heads * seq * (pos + seq);
        let chunks = by_group
            .chunks_mut(n_rep * seq * d)
            .flat_map(|g| g.chunks_mut(n_rep * QUERY_BLOCK * d));
        if visits < 1 << 15 || !split {
            for (item, out) in chunks.enumerate() {
                work(item, out, scratch);
            }
        } else {
            let slots: Vec<Mutex<&mut [f32]>> = chunks.map(Mutex::new).collect();
            candle_core::utils::barrier_pool().execute_chunked(items, |range| {
                let mut mine = Scratch::default();
                for item in range {
                    // Each slot is handed to one worker: the lock is never contended.
                    let mut out = slots[item].lock().unwrap_or_else(PoisonError::into_inner);
                    work(item, &mut out, &mut mine);
                }
            });
        }
    }
    for (g, group) in by_group.chunks_exact(n_rep * seq * d).enumerate() {
        for (i, row) in group.chunks_exact(n_rep * d).enumerate() {
            out[(i * heads + g * n_rep) * d..][..n_rep * d].copy_from_slice(row);
        }
    }
    scratch.by_group = by_group;
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) = (
            ql.contiguous_offsets(),
            kl.contiguous_offsets(),
            vl.contiguous_offsets(),
        ) else {
            candle_core::bail!("attention: inputs must be contiguous")
        };
        let (_, heads, seq, d) = ql.shape().dims4()?;
        let (_, kv_heads, cap, kd) = kl.shape().dims4()?;
        if kd != d
            || d == 0
            || heads == 0
            || vl.shape() != kl.shape()
            || kv_heads == 0
            || heads % kv_heads != 0
        {
            candle_core::bail!("attention: shapes {:?} {:?}", ql.shape(), kl.shape())
        }
        let len = self.pos.checked_add(seq).filter(|&n| seq > 0 && n <= cap);
        let Some(_) = len else {
            candle_core::bail!("attention: {seq} queries at {} over {cap}", self.pos)
        };
        let q = &q.as_slice::<f32>()?[q0..q1];
        let k = &k.as_slice::<f16>()?[k0..k1];
        let v = &v.as_slice::<f16>()?[v0..v1];
        let dims = Dims {
            heads,
            kv_heads,
            cap,
            d,
        };
        let mut out = vec![0f32; seq * heads * d];
        attend(
            q,
            k,
            v,
            dims,
            self.pos,
            self.scale,
            &mut Scratch::default(),
            &mut out,
            true,
        );
        Ok((CpuStorage::F32(out), Shape::from((1, seq, heads * d))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Plain softmax attention, materialised, as the reference.
    fn reference(q: &[f32], k: &[f16], v: &[f16], dims: [usize; 5], pos: usize) -> Vec<f32> {
        let [heads, kv, seq, cap, d] = dims;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; seq * heads * d];
        for h in 0..heads {
            let g = h / (heads / kv);
            for i in 0..seq {
                let qr = &q[(h * seq + i) * d..][..d];
                let n = pos + i + 1;
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let kj = &k[(g * cap + j) * d..][..d];
                        let dot = qr.iter().zip(kj).map(|(a, b)| (a * b.to_f32()) as f64);
                        dot.sum::<f64>() * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for c in 0..d {
                        out[(i * heads + h) * d + c] +=
                            (p / z * v[(g * cap + j) * d + c].to_f64()) as f32;
                    }
                }
            }
        }
        out
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn halves(xs: &[f32]) -> Vec<f16> {
        xs.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn run(q: &[f32], k: &[f16], v: &[f16], dims: [usize; 5], pos: usize) -> Vec<f32> {
        let [heads, kv, seq, cap, d] = dims;
        let dev = Device::Cpu;
        let qt = Tensor::from_slice(q, (1, heads, seq, d), &dev).unwrap();
        let kt = Tensor::from_slice(k, (1, kv, cap, d), &dev).unwrap();
        let vt = Tensor::from_slice(v, (1, kv, cap, d), &dev).unwrap();
        let op = TiledAttention {
            pos,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let y = qt.apply_op3_no_bwd(&kt, &vt, &op).unwrap();
        assert_eq!(y.dims(), &[1, seq, heads * d]);
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The largest difference between `got` and [`reference`].
    fn worst_against_reference(
        got: &[f32],
        q: &[f32],
        k: &[f16],
        v: &[f16],
        dims: [usize; 5],
        pos: usize,
    ) -> f32 {
        let want = reference(q, k, v, dims, pos);
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn matches_materialised_softmax_and_is_chunk_invariant() {
        // 6 query heads over 2 KV heads; steps crossing several key tiles.
        let (heads, kv, d, cap) = (6, 2, 16, 256);
        let k = halves(&rand(kv * cap * d, 1));
        let v = halves(&rand(kv * cap * d, 2));
        for (pos, seq) in [(0, 1), (0, 37), (5, 150), (130, 70), (199, 1)] {
            let q = rand(heads * seq * d, 3 + pos as u64);
            let dims = [heads, kv, seq, cap, d];
            let got = run(&q, &k, &v, dims, pos);
            let worst = worst_against_reference(&got, &q, &k, &v, dims, pos);
            assert!(worst < 1e-4, "pos {pos} seq {seq}: {worst}");
            // Row by row, as decode steps: the same bits.
            for i in [0, seq / 2, seq - 1] {
                let qi: Vec<f32> = (0..heads)
                    .flat_map(|h| q[(h * seq + i) * d..][..d].to_vec())
                    .collect();
                let one = run(&qi, &k, &v, [heads, kv, 1, cap, d], pos + i);
                assert_eq!(one, got[i * heads * d..(i + 1) * heads * d], "row {i}");
            }
        }
    }

    fn dot(a: &[f32], b: &[f16]) -> f32 {
        let mut acc = [0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ac
            .remainder()
            .iter()
            .zip(bc.remainder())
            .map(|(x, y)| x * y.to_f32())
            .sum();
        for (x, y) in ac.zip(bc) {
            for l in 0..8 {
                acc[l] += x[l] * y[l].to_f32();
            }
        }
        acc[1..].iter().fold(acc[0], |s, &x| s + x) + tail
    }

    #[test]
    fn many_dots_and_heads_at_once_equal_one_at_a_time_bit_for_bit() {
        for d in [64, 19, 8, 3] {
            for n in [1, 3, 4, 7, 64] {
                // 1 to 5 heads: groups of three, two and one.
                for n_rep in 1..=5 {
                    let qs = rand(n_rep * d, 7 + n_rep as u64);
                    let keys = halves(&rand(n * d, 20 + n as u64));
                    let mut got = vec![0f32; n_rep * KEY_TILE];
                    dots(&qs, d, d, &keys, n, &mut got);
                    for r in 0..n_rep {
                        for j in 0..n {
                            let want = dot(&qs[r * d..(r + 1) * d], &keys[j * d..(j + 1) * d]);
                            let g = got[r * KEY_TILE + j];
                            assert_eq!(
                                g.to_bits(),
                                want.to_bits(),
                                "width {d}, head {r}, key {j} of {n}"
                            );
                        }
                    }
                    // Weights of each head over the same values, added to
                    // outputs that already hold something.
                    let vals = halves(&rand(n * d, 40 + n as u64));
                    let out0 = rand(n_rep * d, 50);
                    let mut out = out0.clone();
                    weigh(&got, &vals, n, d, &mut out);
                    for r in 0..n_rep {
                        for c in 0..d {
                            let mut want = out0[r * d + c];
                            for j in 0..n {
                                want += got[r * KEY_TILE + j] * vals[j * d + c].to_f32();
                            }
                            let g = out[r * d + c];
                            assert_eq!(
                                g.to_bits(),
                                want.to_bits(),
                                "width {d}, head {r}, value {c}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The softmax's exponential against f64's, over its whole range: within
    /// one unit in the last place of the true value (measured: see the
    /// output), monotonic across every point where `n` steps (all adjacent
    /// floats around it), 1 at 0, clamped outside [-87, 88], NaN for NaN.
    #[test]
    fn exp_is_within_one_ulp_and_monotonic() {
        // The f32 spacing at `y > 0`.
        let ulp = |y: f32| f64::from(f32::from_bits(y.to_bits() + 1) - y);
        let mut worst = 0f64;
        let mut check = |xs: &mut dyn Iterator<Item = f32>| {
            let mut last: Option<(f32, f32)> = None;
            for x in xs {
                let got = exp(x);
                let want = f64::from(x).exp();
                worst = worst.max((f64::from(got) - want).abs() / ulp(want as f32));
                if let Some((lx, lg)) = last {
                    assert!(x > lx && got >= lg, "not monotonic from {lx} to {x}");
                }
                last = Some((x, got));
            }
        };
        // Two million points over the range; the 2^20 floats just below 0,
        // every 1024th; and 1,200 adjacent floats around each point where
        // `x · log2 e` crosses a half, where `n` steps.
        check(&mut (0..=2_000_000).map(|i| (-87.0 + 175.0 * f64::from(i) / 2e6) as f32));
        check(&mut (0..1u32 << 20).rev().map(|b| -f32::from_bits(b << 10)));
        for n in -126..=127 {
            let edge = ((f64::from(n) + 0.5) * std::f64::consts::LN_2) as f32;
            if !(-87.0..=88.0).contains(&edge) {
                continue;
            }
            // The float `d` steps above `edge` (below it for negative `d`).
            let sign = if edge > 0.0 { 1 } else { -1 };
            let nudge = |d: i32| f32::from_bits(edge.to_bits().wrapping_add_signed(sign * d));
            check(&mut (-599..600).map(nudge));
        }
        eprintln!("exp: worst error {worst:.3} ulp of the true value");
        assert!(worst <= 1.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        for x in [-87.5, -1e4, -1e30, f32::MIN, f32::NEG_INFINITY] {
            assert_eq!(exp(x), exp(-87.0), "{x}");
        }
        for x in [88.5, 1e30, f32::MAX, f32::INFINITY] {
            assert_eq!(exp(x), exp(88.0), "{x}");
        }
        assert!(exp(-87.0) > 0.0 && exp(-87.0) < 2e-38);
        assert!(exp(88.0).is_finite());
        assert!(exp(f32::NAN).is_nan() && exp(-f32::NAN).is_nan());
    }

    /// Head widths and groupings no default model has (not multiples of 8,
    /// one or five query heads a KV head) against the materialised softmax.
    #[test]
    fn odd_head_widths_and_groups_match_the_materialised_softmax() {
        for (heads, kv, d) in [
            (6, 2, 60),
            (5, 1, 60),
            (10, 2, 6),
            (4, 4, 1),
            (3, 1, 2),
            (2, 1, 100),
        ] {
            let cap = 160;
            let k = halves(&rand(kv * cap * d, 1));
            let v = halves(&rand(kv * cap * d, 2));
            for (pos, seq) in [(0, 1), (0, 70), (63, 2), (100, 33)] {
                let q = rand(heads * seq * d, 3 + pos as u64);
                let dims = [heads, kv, seq, cap, d];
                let got = run(&q, &k, &v, dims, pos);
                let worst = worst_against_reference(&got, &q, &k, &v, dims, pos);
                assert!(
                    worst < 1e-4,
                    "d {d} heads {heads}/{kv} pos {pos} seq {seq}: {worst}"
                );
            }
        }
    }

    #[test]
    fn refuses_a_step_past_the_buffer() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((1, 1, 8, 8), candle_core::DType::F16, &dev).unwrap();
        let op = TiledAttention { pos: 6, scale: 1.0 };
        assert!(q.apply_op3_no_bwd(&kv, &kv, &op).is_err());
    }
}
