//! Packed quantized matrix products for [`WeightMode::Fast`](crate::WeightMode::Fast).
//!
//! candle 0.11 has no fast CPU kernel for Q4_1 (the type most small GGUF
//! files ship), and its Q8_0 kernels only use AVX-512 VNNI when the inner
//! dimension is a multiple of 256 (576, this model's width, is not). This
//! module keeps a weight matrix in one layout for all of them and multiplies
//! it with int8 dot products (`vpdpbusd`):
//!
//! - rows are grouped into tiles of 16, the inner dimension into blocks of 32;
//! - each (row, block) stores unsigned quants `u` (4 or 8 bits), a scale `d`
//!   and an offset `m`, so that the weight is `d * u + m`. Q4_1 maps onto this
//!   exactly (`u` = nibble), Q4_0 with `m = -8 d`, Q8_0 with `u = q + 128`,
//!   `m = -128 d`; any other type is dequantized and stored as 8-bit
//!   asymmetric quants (a small, measured change);
//! - activations are quantized per block of 32 to int8 with a scale, as ggml
//!   and candle do for every quantized product (candle's Q4_1 path uses Q8_1
//!   activations, the same numbers), so the result differs from candle's
//!   only by float rounding order.
//!
//! The SIMD kernel needs AVX-512 F/BW/VNNI and F16C, detected at run time;
//! [`PackedMatrix::pack`] returns `None` on other machines (the caller then
//! keeps candle's kernels). The scalar path computes the same integer sums
//! and is what the unit tests check the SIMD path against. The SIMD kernel
//! lives in `avx512.rs`, the crate's one file of unsafe code; this one packs,
//! detects and dispatches, in safe code.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use half::f16;
use std::sync::{Mutex, PoisonError};

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Off x86-64 there is no SIMD kernel: the proof of one cannot be made.
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use super::{Activations, PackedMatrix, TILE};

    /// Proof that this CPU runs the SIMD kernel; none can exist here.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Vnni {}

    impl Vnni {
        /// Never found off x86-64.
        pub(super) fn detect() -> Option<Self> {
            None
        }

        /// Unreachable: no `Vnni` exists.
        pub(super) fn tile(
            self,
            _: &PackedMatrix,
            _: usize,
            _: &Activations,
            _: &mut [[f32; TILE]],
        ) {
            match self {}
        }
    }
}

/// Output rows per tile.
pub const TILE: usize = 16;
/// Inner-dimension values per block.
pub const BLOCK: usize = 32;

/// One 64-byte, 64-byte-aligned line of packed data.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Bits per stored quant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    /// Two quants per byte, `u` in 0..16.
    Four,
    /// One quant per byte, `u` in 0..256.
    Eight,
}

impl Bits {
    /// Lines of quants per (tile, block).
    fn q_lines(self) -> usize {
        match self {
            Self::Four => 4,
            Self::Eight => 8,
        }
    }
}

/// A weight matrix `(n, k)` in the packed layout.
///
/// Per (tile, block), in order: one line of scales (16 `d` then 16 `m`, as
/// f16), then the quant lines. 4-bit: line `i` byte `4 r + j` holds row `r`'s
/// value `4 i + j` in its low nibble and `16 + 4 i + j` in its high nibble
/// (which is ggml's own Q4 byte order). 8-bit: line `g` byte `4 r + j` holds
/// row `r`'s value `4 g + j`.
pub struct PackedMatrix {
    n: usize,
    k: usize,
    bits: Bits,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("bits", &self.bits)
            .finish()
    }
}

/// Whether this CPU runs the SIMD kernel.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One (row, block) of a matrix being packed: scale, offset, quants.
struct RowBlock {
    d: f16,
    m: f16,
    u: [u8; BLOCK],
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

impl PackedMatrix {
    /// Rows of the matrix.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (the inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Stacks matrices of the same width and bit depth row-wise (one product
    /// then serves several projections of the same input).
    pub fn concat(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k || p.bits != first.bits) {
            return None;
        }
        let mut lines = Vec::with_capacity(parts.iter().map(|p| p.lines.len()).sum());
        for p in parts {
            lines.extend_from_slice(&p.lines);
        }
        Some(Self {
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            bits: first.bits,
            lines,
        })
    }

    /// Packs a 2-d CPU `QTensor`, or returns `None` when its shape does not
    /// fit the layout (rows not a multiple of 16, columns not of 32) or the
    /// CPU lacks the SIMD kernel.
    pub fn pack(q: &QTensor) -> candle_core::Result<Option<Self>> {
        if !simd_available() {
            return Ok(None);
        }
        Self::pack_any(q)
    }

    /// [`Self::pack`] without the CPU check (for tests of the scalar path).
    pub fn pack_any(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let Ok((n, k)) = q.shape().dims2() else {
            return Ok(None);
        };
        if n == 0 || k == 0 || n % TILE != 0 || k % BLOCK != 0 || !q.device().is_cpu() {
            return Ok(None);
        }
        let kb = k / BLOCK;
        Ok(Some(match q.dtype() {
            GgmlDType::Q4_1 => {
                let raw = q.data()?;
                Self::build(n, k, Bits::Four, |r, b| {
                    let at = (r * kb + b) * 20;
                    let blk = &raw[at..at + 20];
                    let mut u = [0u8; BLOCK];
                    for j in 0..16 {
                        u[j] = blk[4 + j] & 0x0F;
                        u[j + 16] = blk[4 + j] >> 4;
                    }
                    RowBlock {
                        d: f16_at(blk, 0),
                        m: f16_at(blk, 2),
                        u,
                    }
                })
            }
            GgmlDType::Q4_0 => {
                let raw = q.data()?;
                Self::build(n, k, Bits::Four, |r, b| {
                    let at = (r * kb + b) * 18;
                    let blk = &raw[at..at + 18];
                    let mut u = [0u8; BLOCK];
                    for j in 0..16 {
                        u[j] = blk[2 + j] & 0x0F;
                        u[j + 16] = blk[2 + j] >> 4;
                    }
                    let d = f16_at(blk, 0);
                    RowBlock {
                        d,
                        m: f16::from_f32(-8.0 * d.to_f32()),
                        u,
                    }
                })
            }
            GgmlDType::Q8_0 => {
                let raw = q.data()?;
                Self::build(n, k, Bits::Eight, |r, b| {
                    let at = (r * kb + b) * 34;
                    let blk = &raw[at..at + 34];
                    let mut u = [0u8; BLOCK];
                    for j in 0..BLOCK {
                        u[j] = (blk[2 + j] as i8 as i16 + 128) as u8;
                    }
                    let d = f16_at(blk, 0);
                    RowBlock {
                        d,
                        m: f16::from_f32(-128.0 * d.to_f32()),
                        u,
                    }
                })
            }
            _ => {
                let dense = q
                    .dequantize(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Self::from_dense(&dense, n, k)
            }
        }))
    }

    /// Packs a dense row-major `(n, k)` matrix as 8-bit asymmetric quants.
    pub fn from_dense(w: &[f32], n: usize, k: usize) -> Self {
        Self::build(n, k, Bits::Eight, |r, b| {
            let xs = &w[r * k + b * BLOCK..r * k + (b + 1) * BLOCK];
            let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m = f16::from_f32(lo);
            let ml = m.to_f32();
            let d = f16::from_f32((hi - ml).max(0.0) / 255.0);
            let dl = d.to_f32();
            let inv = if dl > 0.0 { 1.0 / dl } else { 0.0 };
            let mut u = [0u8; BLOCK];
            for (u, &x) in u.iter_mut().zip(xs) {
                *u = ((x - ml) * inv).round().clamp(0.0, 255.0) as u8;
            }
            RowBlock { d, m, u }
        })
    }

    fn build(n: usize, k: usize, bits: Bits, get: impl Fn(usize, usize) -> RowBlock) -> Self {
        let kb = k / BLOCK;
        let per = 1 + bits.q_lines();
        let mut lines = vec![Line([0; 64]); n / TILE * kb * per];
        for t in 0..n / TILE {
            for b in 0..kb {
                let base = (t * kb + b) * per;
                for r in 0..TILE {
                    let rb = get(t * TILE + r, b);
                    lines[base].0[2 * r..2 * r + 2].copy_from_slice(&rb.d.to_le_bytes());
                    lines[base].0[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&rb.m.to_le_bytes());
                    for j in 0..4 {
                        match bits {
                            Bits::Four => {
                                for i in 0..4 {
                                    lines[base + 1 + i].0[4 * r + j] =
                                        rb.u[4 * i + j] | (rb.u[16 + 4 * i + j] << 4);
                                }
                            }
                            Bits::Eight => {
                                for g in 0..8 {
                                    lines[base + 1 + g].0[4 * r + j] = rb.u[4 * g + j];
                                }
                            }
                        }
                    }
                }
            }
        }
        Self { n, k, bits, lines }
    }

    /// `dst (m, n) = x (m, k) · selfᵀ`, on candle's CPU thread pool.
    pub fn matmul(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "lhs length");
        assert_eq!(dst.len(), m * self.n, "dst length");
        let n_tiles = self.n / TILE;
        if m == 0 || n_tiles == 0 {
            return;
        }
        let act = Activations::quantize(x, m, self.k);
        let simd = avx512::Vnni::detect();
        // Tile-major results: tile `t`'s 16 columns of every row at `t * m..`,
        // one slot per tile, so workers write disjoint slots without sharing.
        let mut tiles = vec![[0f32; TILE]; n_tiles * m];
        {
            let slots: Vec<Mutex<&mut [[f32; TILE]]>> =
                tiles.chunks_exact_mut(m).map(Mutex::new).collect();
            let work = |range: std::ops::Range<usize>| {
                for t in range {
                    // Each tile is handed to one worker: the lock is never contended.
                    let mut out = slots[t].lock().unwrap_or_else(PoisonError::into_inner);
                    match simd {
                        Some(vnni) => vnni.tile(self, t, &act, &mut out),
                        None => self.tile_scalar(t, &act, &mut out),
                    }
                }
            };
            if n_tiles * m < 64 {
                work(0..n_tiles);
            } else {
                candle_core::utils::barrier_pool().execute_chunked(n_tiles, work);
            }
        }
        for (t, out) in tiles.chunks_exact(m).enumerate() {
            for (row, o) in out.iter().enumerate() {
                dst[row * self.n + t * TILE..][..TILE].copy_from_slice(o);
            }
        }
    }

    fn tile_scalar(&self, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
        let kb = self.k / BLOCK;
        let per = 1 + self.bits.q_lines();
        for (row, o) in out.iter_mut().enumerate() {
            *o = [0.0; TILE];
            for b in 0..kb {
                let base = (t * kb + b) * per;
                let sc = &self.lines[base].0;
                let xq = &act.q[row * self.k + b * BLOCK..row * self.k + (b + 1) * BLOCK];
                let (dx, sx) = (act.d[row * kb + b], act.s[row * kb + b]);
                for (r, o) in o.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for j in 0..4 {
                        match self.bits {
                            Bits::Four => {
                                for i in 0..4 {
                                    let byte = self.lines[base + 1 + i].0[4 * r + j];
                                    isum += i32::from(byte & 0x0F) * i32::from(xq[4 * i + j]);
                                    isum += i32::from(byte >> 4) * i32::from(xq[16 + 4 * i + j]);
                                }
                            }
                            Bits::Eight => {
                                for g in 0..8 {
                                    let byte = self.lines[base + 1 + g].0[4 * r + j];
                                    isum += i32::from(byte) * i32::from(xq[4 * g + j]);
                                }
                            }
                        }
                    }
                    let d = f16_at(sc, 2 * r).to_f32();
                    let m = f16_at(sc, 32 + 2 * r).to_f32();
                    *o += d * dx * isum as f32 + m * sx;
                }
            }
        }
    }
}

impl candle_core::CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed matmul: input is not contiguous")
        };
        let dims = layout.shape().dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("packed matmul: scalar input")
        };
        if k != self.k {
            candle_core::bail!(
                "packed matmul: input width {k}, weights ({}, {})",
                self.n,
                self.k
            )
        }
        let x = &storage.as_slice::<f32>()?[start..end];
        let m: usize = batch.iter().product();
        let mut dst = vec![0f32; m * self.n];
        self.matmul(x, m, &mut dst);
        let mut out = batch.to_vec();
        out.push(self.n);
        Ok((candle_core::CpuStorage::F32(dst), out.into()))
    }
}

/// Activations quantized per block of 32: int8 values, scales `d`, and
/// `s = d * sum(q)` for the weights' offsets.
struct Activations {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / BLOCK;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * kb];
        let mut s = vec![0f32; m * kb];
        for (i, (xs, qs)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            // As ggml's (and candle's) Q8_0/Q8_1 activations: scale amax/127
            // kept as f16, values rounded half away from zero.
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                let x = v * inv;
                let r = (x + 0.5f32.copysign(x)).clamp(-127.0, 127.0) as i8;
                sum += i32::from(r);
                *q = r;
            }
            let scale = f16::from_f32(scale).to_f32();
            d[i] = scale;
            s[i] = scale * sum as f32;
        }
        Self { q, d, s }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Tensor;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
            }
        }
        out
    }

    fn check(dtype: Option<GgmlDType>, m: usize, n: usize, k: usize) {
        let mut seed = 7u64 + (m * 31 + n * 7 + k) as u64;
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let packed = match dtype {
            Some(d) => {
                let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, d).unwrap();
                PackedMatrix::pack_any(&q).unwrap().unwrap()
            }
            None => PackedMatrix::from_dense(&w, n, k),
        };
        let want = reference(&w, &x, m, n, k);
        let act = Activations::quantize(&x, m, k);
        let mut scalar = vec![[0f32; TILE]; m];
        let mut got_scalar = vec![0f32; m * n];
        for t in 0..n / TILE {
            packed.tile_scalar(t, &act, &mut scalar);
            for (r, o) in scalar.iter().enumerate() {
                got_scalar[r * n + t * TILE..r * n + t * TILE + TILE].copy_from_slice(o);
            }
        }
        // Quantization error bound: loose, relative to the size of the sums.
        let tol = match dtype {
            Some(GgmlDType::Q4_0 | GgmlDType::Q4_1) => 0.15,
            _ => 0.03,
        } * (k as f32).sqrt();
        for (a, b) in got_scalar.iter().zip(&want) {
            assert!((a - b).abs() < tol, "{dtype:?} scalar {a} vs f32 {b}");
        }
        // The dispatch (SIMD where the CPU has it, on the thread pool for
        // larger products) against the scalar tiles.
        let mut got = vec![0f32; m * n];
        packed.matmul(&x, m, &mut got);
        for (a, b) in got.iter().zip(&got_scalar) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{dtype:?} matmul {a} vs scalar {b} (simd: {})",
                simd_available()
            );
        }
    }

    #[test]
    fn packed_products_match_scalar_and_f32() {
        for dtype in [
            Some(GgmlDType::Q4_1),
            Some(GgmlDType::Q4_0),
            Some(GgmlDType::Q8_0),
            Some(GgmlDType::Q6K),
            None,
        ] {
            let k = if dtype == Some(GgmlDType::Q6K) {
                256
            } else {
                96
            };
            for m in [1, 3, 5, 9] {
                check(dtype, m, 48, k);
            }
            // Enough tiles times rows to run on the thread pool.
            check(dtype, 9, 128, k);
        }
    }

    #[test]
    fn q4_1_packing_is_exact() {
        let mut seed = 3u64;
        let (n, k) = (32, 64);
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let p = PackedMatrix::pack_any(&q).unwrap().unwrap();
        // One-hot activations read single weights back: d*u + m, as Q4_1 dequantizes.
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for col in [0, 5, 17, 31, 40] {
            let mut x = vec![0f32; k];
            x[col] = 1.0;
            let act = Activations::quantize(&x, 1, k);
            for tile in 0..n / TILE {
                let mut out = vec![[0f32; TILE]; 1];
                p.tile_scalar(tile, &act, &mut out);
                for r in 0..TILE {
                    let want = deq[tile * TILE + r][col];
                    assert!((out[0][r] - want).abs() < 1e-3, "{} vs {want}", out[0][r]);
                }
            }
        }
    }
}
