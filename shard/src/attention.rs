//! One-token attention over a KV buffer, for the non-exact modes.
//!
//! A decode step attends one query per head over `len` cached positions. In
//! candle ops that is two tiny batched matrix products, a scale and a
//! softmax, each with its own allocation and dispatch; at this model's size
//! they cost more than the arithmetic. This op does it in one pass over the
//! KV buffers, grouped-query style (query head `h` reads KV head
//! `h / n_rep`), and writes the heads side by side, ready for the output
//! projection.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

/// Attention of one position's queries `(1, heads, 1, head_dim)` over the first
/// `len` positions of KV buffers `(1, kv_heads, capacity, head_dim)`; output
/// `(1, 1, heads * head_dim)`.
pub(crate) struct DecodeAttention {
    pub(crate) len: usize,
    pub(crate) scale: f32,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
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
            candle_core::bail!("decode attention: inputs must be contiguous")
        };
        let (_, heads, one, d) = ql.shape().dims4()?;
        let (_, kv_heads, cap, kd) = kl.shape().dims4()?;
        if one != 1 || kd != d || vl.shape() != kl.shape() || kv_heads == 0 || heads % kv_heads != 0
        {
            candle_core::bail!("decode attention: shapes {:?} {:?}", ql.shape(), kl.shape())
        }
        if self.len == 0 || self.len > cap {
            candle_core::bail!("decode attention: {} positions of {cap}", self.len)
        }
        let q = &q.as_slice::<f32>()?[q0..q1];
        let k = &k.as_slice::<f32>()?[k0..k1];
        let v = &v.as_slice::<f32>()?[v0..v1];
        let n_rep = heads / kv_heads;
        let mut out = vec![0f32; heads * d];
        let mut scores = vec![0f32; self.len];
        for h in 0..heads {
            let g = h / n_rep;
            let qh = &q[h * d..(h + 1) * d];
            let kg = &k[g * cap * d..];
            let vg = &v[g * cap * d..];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qh, &kg[j * d..(j + 1) * d]) * self.scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[h * d..(h + 1) * d];
            for (j, &p) in scores.iter().enumerate() {
                let p = p / sum;
                for (o, &x) in o.iter_mut().zip(&vg[j * d..(j + 1) * d]) {
                    *o += p * x;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((1, 1, heads * d))))
    }
}
