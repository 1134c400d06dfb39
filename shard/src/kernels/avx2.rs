//! The AVX2 kernel of [`PackedMatrix`], for CPUs without AVX-512 VNNI. Like
//! `avx512.rs`, it is unsafe code only because SIMD intrinsics and functions
//! compiled for CPU features the build does not assume need `unsafe`; the
//! rest of the crate reaches it through [`Avx2`], which exists only where
//! those features were detected at run time.
//!
//! AVX2 has no `vpdpbusd`; as ggml-cpu does, `vpmaddubsw` multiplies unsigned
//! by signed bytes into pairs of 16-bit sums and `vpmaddwd` by ones adds
//! those pairs into 32 bits. `vpmaddubsw` saturates, so:
//!
//! - 4-bit weights (`u` < 16) times activations (|x| ≤ 127) make pairs of at
//!   most 3,810; the eight groups of a block add up in 16 bits (≤ 30,480)
//!   before one `vpmaddwd`;
//! - 8-bit weights (`u` < 256) would overflow, so the kernel takes
//!   `q = u - 128` (signed) and multiplies `|q|` by `x` with `q`'s sign
//!   (`vpsignb`), pairs of at most 2·128·127 = 32,512, then adds
//!   `128 · Σx` back.
//!
//! Both give the exact integer sum `Σ u·x` of the VNNI kernel, and the float
//! steps after it are the same operations in the same order, so the results
//! are bit-identical to it.
#![allow(unsafe_code)]

use super::{Activations, BLOCK, Bits, PackedMatrix, TILE};
use half::f16;
use std::arch::x86_64::*;

/// Proof that this CPU has AVX2, FMA and F16C.
#[derive(Debug, Clone, Copy)]
pub(super) struct Avx2(());

impl Avx2 {
    /// The proof, where the CPU has every feature the kernel enables.
    pub(super) fn detect() -> Option<Self> {
        super::path::cpu().avx2.then_some(Self(()))
    }

    /// Computes tile `t` of `w` (16 output columns) for every activation row
    /// of `act`, one row of `out` each.
    pub(super) fn tile(
        self,
        w: &PackedMatrix,
        t: usize,
        act: &Activations,
        out: &mut [[f32; TILE]],
    ) {
        // SAFETY: an `Avx2` is only made where the CPU has every feature the
        // kernel enables; the kernel checks its own bounds.
        unsafe { tile(w, t, act, out) }
    }

    /// [`super::dot_peak`]: `vpmaddubsw`, each added into a 16-bit sum as
    /// the kernel adds them (the kernel widens those sums with `vpmaddwd`
    /// once per four).
    pub(super) fn dot_peak(self) -> f64 {
        // SAFETY: an `Avx2` is only made where the CPU has AVX2.
        super::peak_of(12 * 32, |rounds| unsafe { dot_loop(rounds) })
    }
}

/// `rounds` rounds of twelve independent `vpmaddubsw` + `vpaddw` (32
/// multiply-adds each; each multiplies its own sum, so that none is the
/// same from round to round; the sums wrap, which a timing does not mind).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn dot_loop(rounds: usize) {
    let x = std::hint::black_box(_mm256_set1_epi8(-5));
    // Twelve: with the two inputs, within AVX2's sixteen registers.
    let mut s = [_mm256_setzero_si256(); 12];
    for _ in 0..rounds {
        for s in s.iter_mut() {
            *s = _mm256_add_epi16(*s, _mm256_maddubs_epi16(*s, x));
        }
    }
    std::hint::black_box(s);
}

impl Avx2 {
    /// Quantizes one row to int8 per block of 32, as
    /// [`super::quantize_row_scalar`] does, bit for bit: per block its
    /// unrounded scale (`amax / 127`) into `scales` and the sum of its quants
    /// into `sums`.
    pub(super) fn quantize_row(
        self,
        xs: &[f32],
        qs: &mut [i8],
        scales: &mut [f32],
        sums: &mut [i32],
    ) {
        let kb = xs.len() / BLOCK;
        assert!(xs.len() == kb * BLOCK && qs.len() == xs.len());
        assert!(scales.len() == kb && sums.len() == kb);
        // SAFETY: features as detected for `self`; lengths checked above.
        unsafe { quantize_row(xs, qs, scales, sums) }
    }

    /// [`super::zip_map`]'s plain loop, compiled for AVX2's eight lanes.
    pub(super) fn zip_map(
        self,
        a: &[f32],
        b: &[f32],
        dst: &mut [f32],
        f: impl Fn(f32, f32) -> f32,
    ) {
        // SAFETY: features as detected for `self`; safe code inside.
        unsafe { zip_map(a, b, dst, f) }
    }

    /// [`super::lane_sums_heads`] for `H` (1 to 3) heads.
    pub(super) fn lane_sums_heads<const H: usize>(
        self,
        a: [&[f32]; H],
        b: &[f16],
        stride: usize,
        out: &mut [&mut [f32]; H],
    ) {
        let (len, n) = (a[0].len(), out[0].len());
        assert!((1..=3).contains(&H) && len.is_multiple_of(8) && len <= stride);
        assert!(a.iter().all(|a| a.len() == len) && out.iter().all(|o| o.len() == n));
        // Checked: a wrapped end would pass with a short `b`.
        let end = (n.max(1) - 1)
            .checked_mul(stride)
            .and_then(|e| e.checked_add(len));
        assert!(n == 0 || end.is_some_and(|e| e <= b.len()));
        // SAFETY: features as detected for `self`; lengths checked above.
        unsafe { lane_sums_heads(a, b, stride, out) }
    }

    /// [`super::weighted_sum_heads`] for `H` (1 to 3) heads.
    pub(super) fn weighted_sum_heads<const H: usize>(
        self,
        p: [&[f32]; H],
        x: &[f16],
        y: &mut [&mut [f32]; H],
    ) {
        let (n, d) = (p[0].len(), y[0].len());
        assert!((1..=3).contains(&H) && n.checked_mul(d) == Some(x.len()));
        assert!(p.iter().all(|p| p.len() == n) && y.iter().all(|y| y.len() == d));
        // SAFETY: features as detected for `self`; lengths checked above.
        unsafe { weighted_sum_heads(p, x, y) }
    }

    /// [`super::scale_max`]'s plain loop, compiled for AVX2's eight lanes.
    pub(super) fn scale_max(self, s: &mut [f32], scale: f32) -> f32 {
        // SAFETY: features as detected for `self`; safe code inside.
        unsafe { scale_max(s, scale) }
    }

    /// [`super::exp_below`]'s plain loop, compiled for AVX2's eight lanes.
    pub(super) fn exp_below(self, s: &mut [f32], max: f32) {
        // SAFETY: features as detected for `self`; safe code inside.
        unsafe { exp_below(s, max) }
    }

    /// [`super::to_f16_row`], eight values a conversion.
    pub(super) fn to_f16_row(self, src: &[f32], dst: &mut [f16]) {
        assert!(src.len() == dst.len());
        // SAFETY: features as detected for `self`; lengths checked above.
        unsafe { to_f16_row(src, dst) }
    }
}

/// # Safety
/// The CPU must support AVX2 and F16C; `dst` is as long as `src`.
#[target_feature(enable = "avx2,f16c")]
unsafe fn to_f16_row(src: &[f32], dst: &mut [f16]) {
    let hi = _mm256_set1_ps(crate::llama::cache::F16_MAX);
    let lo = _mm256_set1_ps(-crate::llama::cache::F16_MAX);
    let whole = src.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: values `i..i + 8` of both, `i + 8 <= whole`.
        unsafe {
            let x = _mm256_loadu_ps(src.as_ptr().add(i));
            // `f32::clamp`'s steps: `min` and `max` return their second
            // operand where either is NaN, so a NaN stays NaN.
            let c = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(c);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
    }
    super::to_f16_plain(&src[whole..], &mut dst[whole..]);
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn zip_map(a: &[f32], b: &[f32], dst: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    super::zip_map_plain(a, b, dst, f)
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
    super::scale_max_plain(s, scale)
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn exp_below(s: &mut [f32], max: f32) {
    super::exp_below_plain(s, max)
}

/// How far past the weight block being computed the x86 kernels ask for
/// the lines of a block to come, in bytes: four KiB (about thirteen 4-bit
/// blocks); attention's loops ask as far ahead in a KV group's keys and
/// values. A whole model's weights are read once a step, and a batch's
/// caches too, from the L3 cache or from memory, and the CPU's own
/// prefetchers stay too close behind to keep the loops fed: this is the
/// distance that fed them on the 2-core Xeon VM of the engine bench (4 and
/// 8 KiB alike; the README has figures).
pub(super) const PREFETCH_AHEAD: usize = 4096;

/// Asks for `lines` 64-byte lines from [`PREFETCH_AHEAD`] bytes past `base`
/// to be brought into the L1 cache: a weight block, keys or a value to come,
/// or memory past the data's end, which costs a wasted request and nothing
/// else.
#[inline(always)]
pub(super) fn prefetch_ahead(base: *const u8, lines: usize) {
    let ahead = base.wrapping_add(PREFETCH_AHEAD);
    for l in 0..lines {
        // SAFETY: a prefetch is a hint: it changes nothing the program can
        // see and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8) };
    }
}

/// Eight f16 values from `p`, widened.
///
/// # Safety
/// The CPU must support F16C; `p` points at 8 readable values.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn load8(p: *const f16) -> __m256 {
    // SAFETY: 16 readable bytes at `p` (the caller's promise).
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

/// Lane `i` of the result is `v[i]`'s lanes combined by `op` in order,
/// `op(..op(op(lane 0, lane 1), lane 2).., lane 7)`: an 8×8 transpose,
/// then one vector `op` a lane. With a float add, the lane sums' bits.
#[target_feature(enable = "avx2")]
#[inline]
fn across(v: [__m256; 8], op: impl Fn(__m256, __m256) -> __m256) -> __m256 {
    let [r0, r1, r2, r3, r4, r5, r6, r7] = v;
    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
    let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
    let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
    // u0: lanes 0 | 4 of vectors 0..4; u1: 1 | 5; u2: 2 | 6; u3: 3 | 7;
    // u4..u7 the same of vectors 4..8.
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let lane = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    lane[1..].iter().fold(lane[0], |acc, &l| op(acc, l))
}

/// [`lane_sums`] of `H` (1 to 3) query vectors over the same keys, four
/// keys at a time: each key's eight values are widened once for every
/// head. Each head's lanes take the steps they take alone.
///
/// # Safety
/// The CPU must support AVX2 and F16C; every `a[h]` is `a[0].len()` long,
/// a multiple of 8 and at most `stride`; every `out[h]` is `out[0].len()`
/// long; `b` holds `(out[0].len() - 1) * stride + a[0].len()` values.
// Keys, heads and lanes index several arrays of different shapes at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,f16c")]
unsafe fn lane_sums_heads<const H: usize>(
    a: [&[f32]; H],
    b: &[f16],
    stride: usize,
    out: &mut [&mut [f32]; H],
) {
    let len = a[0].len();
    let n = out[0].len();
    let pb = b.as_ptr();
    let mut j = 0;
    while j + 4 <= n {
        // The four keys' lines 4 KiB on.
        prefetch_ahead(
            pb.wrapping_add(j * stride) as *const u8,
            (8 * stride).div_ceil(64),
        );
        let mut acc = [[_mm256_setzero_ps(); 4]; H];
        for c in (0..len).step_by(8) {
            // SAFETY: `c + 8 <= len`; key `j + i` is in `b` (the caller's
            // promise).
            unsafe {
                for i in 0..4 {
                    let y = load8(pb.add((j + i) * stride + c));
                    for h in 0..H {
                        let x = _mm256_loadu_ps(a[h].as_ptr().add(c));
                        acc[h][i] = _mm256_add_ps(acc[h][i], _mm256_mul_ps(x, y));
                    }
                }
            }
        }
        // Two heads' four keys to a transpose.
        let mut h = 0;
        while h < H {
            let second = if h + 1 < H {
                acc[h + 1]
            } else {
                [_mm256_setzero_ps(); 4]
            };
            let [a0, a1, a2, a3] = acc[h];
            let [b0, b1, b2, b3] = second;
            let sum = across([a0, a1, a2, a3, b0, b1, b2, b3], |a, b| _mm256_add_ps(a, b));
            let mut l = [0f32; 8];
            // SAFETY: `l` holds exactly 8 f32s.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), sum) };
            out[h][j..j + 4].copy_from_slice(&l[..4]);
            if h + 1 < H {
                out[h + 1][j..j + 4].copy_from_slice(&l[4..]);
            }
            h += 2;
        }
        j += 4;
    }
    for (h, out) in out.iter_mut().enumerate() {
        if j < n {
            // SAFETY: as promised, the remaining keys for one head.
            unsafe { lane_sums(a[h], &b[j * stride..], stride, &mut out[j..]) };
        }
    }
}

/// `super::weighted_sum_scalar`'s steps for `H` (1 to 3) heads' weights
/// over the same values: each value's eight f16s are widened once for every
/// head; each head's elements take the steps they take alone.
///
/// # Safety
/// The CPU must support AVX2 and F16C; every `p[h]` is `p[0].len()` long,
/// every `y[h]` `y[0].len()` long, and `x` holds `p[0].len() * y[0].len()`.
// Values, heads and lanes index several arrays of different shapes at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,f16c")]
unsafe fn weighted_sum_heads<const H: usize>(p: [&[f32]; H], x: &[f16], y: &mut [&mut [f32]; H]) {
    const CHUNK: usize = 32;
    let d = y[0].len();
    let full = d / 8 * 8;
    let px = x.as_ptr();
    let mut c0 = 0;
    while c0 < full {
        let w = (full - c0).min(CHUNK) / 8;
        let mut acc = [[_mm256_setzero_ps(); CHUNK / 8]; H];
        for h in 0..H {
            for (i, a) in acc[h].iter_mut().enumerate().take(w) {
                // SAFETY: `c0 + 8 i + 8 <= full <= d`.
                *a = unsafe { _mm256_loadu_ps(y[h].as_ptr().add(c0 + 8 * i)) };
            }
        }
        for j in 0..p[0].len() {
            if c0 == 0 {
                // Value `j`'s lines 4 KiB on, once for all chunks.
                prefetch_ahead(px.wrapping_add(j * d) as *const u8, (2 * d).div_ceil(64));
            }
            let pv: [__m256; H] = std::array::from_fn(|h| _mm256_set1_ps(p[h][j]));
            for i in 0..w {
                // SAFETY: `j * d + c0 + 8 i + 8 <= (j + 1) * d <= x.len()`.
                let xv = unsafe { load8(px.add(j * d + c0 + 8 * i)) };
                for h in 0..H {
                    acc[h][i] = _mm256_add_ps(acc[h][i], _mm256_mul_ps(pv[h], xv));
                }
            }
        }
        for h in 0..H {
            for (i, a) in acc[h].iter().enumerate().take(w) {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(y[h].as_mut_ptr().add(c0 + 8 * i), *a) };
            }
        }
        c0 += CHUNK;
    }
    for (p, y) in p.iter().zip(y.iter_mut()) {
        super::weighted_sum_from(p, x, y, full);
    }
}

/// # Safety
/// The CPU must support AVX2 and F16C; `a.len() % 8 == 0`, `a.len() <=
/// stride`, and `b` holds `(out.len() - 1) * stride + a.len()` values.
#[target_feature(enable = "avx2,f16c")]
unsafe fn lane_sums(a: &[f32], b: &[f16], stride: usize, out: &mut [f32]) {
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut j = 0;
    // Eight vectors at a time: eight independent chains of additions, then
    // an 8×8 transpose so that one vector add sums lane `l` of all eight.
    while j + 8 <= out.len() {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..a.len()).step_by(8) {
            // SAFETY: `c + 8 <= a.len()`; vector `j + i` is in `b` (checked).
            unsafe {
                let x = _mm256_loadu_ps(pa.add(c));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let y = load8(pb.add((j + i) * stride + c));
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
                }
            }
        }
        let sum = across(acc, |a, b| _mm256_add_ps(a, b));
        // SAFETY: `j + 8 <= out.len()`.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(j), sum) };
        j += 8;
    }
    while j < out.len() {
        let mut acc = _mm256_setzero_ps();
        for c in (0..a.len()).step_by(8) {
            // SAFETY: as above.
            unsafe {
                let y = load8(pb.add(j * stride + c));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(pa.add(c)), y));
            }
        }
        let mut l = [0f32; 8];
        // SAFETY: `l` holds exactly 8 f32s.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
        out[j] = l[1..].iter().fold(l[0], |s, &x| s + x);
        j += 1;
    }
}

/// # Safety
/// The CPU must support AVX2; `xs` and `qs` hold `32 · scales.len()` values,
/// `sums` as many as `scales`.
#[target_feature(enable = "avx2")]
unsafe fn quantize_row(xs: &[f32], qs: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let zero = _mm256_setzero_ps();
    // Packing works within 128-bit halves; this puts the bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // SAFETY (every load and store below): block `b` is values `32 b..32 b
    // + 32` of `xs` and `qs`, and `b < scales.len()` (the caller's promise).
    let load = |b: usize, i: usize| unsafe { _mm256_loadu_ps(xs.as_ptr().add(BLOCK * b + 8 * i)) };
    // Eight blocks at a time: their largest |x| side by side, then their
    // scales and inverses in one vector division each.
    for first in (0..scales.len()).step_by(8) {
        let n = (scales.len() - first).min(8);
        let mut amax = [zero; 8];
        for (j, m) in amax.iter_mut().enumerate().take(n) {
            // NaNs left out (`max` returns its second operand for a NaN, as
            // `f32::max` keeps the non-NaN one); max is exact in any order.
            for i in 0..4 {
                *m = _mm256_max_ps(_mm256_andnot_ps(sign, load(first + j, i)), *m);
            }
        }
        let amax = across(amax, |a, b| _mm256_max_ps(a, b));
        let d = _mm256_div_ps(amax, hi);
        let inv = _mm256_and_ps(
            _mm256_div_ps(_mm256_set1_ps(1.0), d),
            _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero),
        );
        let (mut dv, mut iv) = ([0f32; 8], [0f32; 8]);
        // SAFETY: both hold exactly 8 f32s.
        unsafe {
            _mm256_storeu_ps(dv.as_mut_ptr(), d);
            _mm256_storeu_ps(iv.as_mut_ptr(), inv);
        }
        let mut totals = [_mm256_setzero_si256(); 8];
        for (j, total) in totals.iter_mut().enumerate().take(n) {
            let b = first + j;
            let inv = _mm256_set1_ps(iv[j]);
            let mut q = [_mm256_setzero_si256(); 4];
            for (i, q) in q.iter_mut().enumerate() {
                // x + copysign(0.5, x), clamped to ±127, NaN to 0, truncated.
                let x = _mm256_mul_ps(load(b, i), inv);
                let y = _mm256_add_ps(x, _mm256_or_ps(_mm256_and_ps(x, sign), half));
                let c = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
                let c = _mm256_and_ps(c, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
                *q = _mm256_cvttps_epi32(c);
                *total = _mm256_add_epi32(*total, *q);
            }
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            // SAFETY: as for the loads.
            unsafe { _mm256_storeu_si256(qs.as_mut_ptr().add(BLOCK * b) as *mut __m256i, bytes) };
        }
        let totals = across(totals.map(|t| _mm256_castsi256_ps(t)), |a, b| {
            _mm256_castsi256_ps(_mm256_add_epi32(
                _mm256_castps_si256(a),
                _mm256_castps_si256(b),
            ))
        });
        let mut t = [0i32; 8];
        // SAFETY: `t` holds exactly 8 i32s.
        unsafe { _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, _mm256_castps_si256(totals)) };
        scales[first..first + n].copy_from_slice(&dv[..n]);
        sums[first..first + n].copy_from_slice(&t[..n]);
    }
}

/// Rows of activations processed against one loaded weight group.
const ROWS: usize = 4;

/// Computes tile `t` (16 output columns) for every activation row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile(w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
    let m = out.len();
    let mut row = 0;
    while row + ROWS <= m {
        // SAFETY: rows `row..row+ROWS` exist; CPU features as required above.
        unsafe { rows::<ROWS>(w, t, act, row, &mut out[row..row + ROWS]) };
        row += ROWS;
    }
    // The rest, up to three rows, in one more pass over the weights.
    let rest = &mut out[row..];
    // SAFETY (every arm): rows `row..m` exist, `rest` holds them; CPU
    // features as required above.
    unsafe {
        match rest.len() {
            1 => rows::<1>(w, t, act, row, rest),
            2 => rows::<2>(w, t, act, row, rest),
            3 => rows::<3>(w, t, act, row, rest),
            _ => {}
        }
    }
}

/// Rows `row..row + R` of `act` against tile `t`, one half (8 output
/// columns) at a time: a half's lines are bytes `32 h..32 h + 32` of each
/// line, 4 bytes per output row.
///
/// # Safety
/// CPU features as for [`tile`]; `row + R` rows of `act`, `R` of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows<const R: usize>(
    w: &PackedMatrix,
    t: usize,
    act: &Activations,
    row: usize,
    out: &mut [[f32; TILE]],
) {
    let k = w.k;
    let kb = k / BLOCK;
    let per = 1 + w.bits.q_lines();
    let first = t * kb * per;
    // Bounds: every line read below is in `first..first + kb * per`.
    assert!(first + kb * per <= w.lines.len());
    assert!((row + R) * k <= act.q.len() && (row + R) * kb <= act.d.len());
    assert!(act.s.len() == act.d.len() && act.sum.len() == act.d.len());
    assert!(out.len() >= R);
    let lines = w.lines[first..].as_ptr() as *const u8;
    let nib = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            // SAFETY: `base` points at this (tile, block)'s `per` lines, in
            // bounds (asserted above), and the activation reads are rows
            // `row..row + R`, block `b` (asserted above); unaligned loads
            // need no alignment.
            unsafe {
                let base = lines.add(b * per * 64);
                // The second half reads the lines the first brought in.
                if half == 0 {
                    prefetch_ahead(base, per);
                }
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16 * half) as *const __m128i));
                let mv =
                    _mm256_cvtph_ps(_mm_loadu_si128(base.add(32 + 16 * half) as *const __m128i));
                let xp: [*const i32; R] = std::array::from_fn(|r| {
                    act.q.as_ptr().add((row + r) * k + b * BLOCK) as *const i32
                });
                let mut isum = [_mm256_setzero_si256(); R];
                match w.bits {
                    Bits::Four => {
                        // Low nibbles of line i are values 4i.., high nibbles
                        // 16 + 4i..: activation groups i and 4 + i.
                        let mut s16 = [_mm256_setzero_si256(); R];
                        for i in 0..4 {
                            let v = _mm256_loadu_si256(
                                base.add(64 * (1 + i) + 32 * half) as *const __m256i
                            );
                            let lo = _mm256_and_si256(v, nib);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                            for r in 0..R {
                                let a0 = _mm256_set1_epi32(xp[r].add(i).read_unaligned());
                                let a1 = _mm256_set1_epi32(xp[r].add(4 + i).read_unaligned());
                                s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, a0));
                                s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, a1));
                            }
                        }
                        for r in 0..R {
                            isum[r] = _mm256_madd_epi16(s16[r], ones);
                        }
                    }
                    Bits::Eight => {
                        for g in 0..8 {
                            let v = _mm256_loadu_si256(
                                base.add(64 * (1 + g) + 32 * half) as *const __m256i
                            );
                            let q = _mm256_xor_si256(v, flip);
                            let qa = _mm256_abs_epi8(q);
                            for r in 0..R {
                                let a = _mm256_set1_epi32(xp[r].add(g).read_unaligned());
                                let p = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(a, q));
                                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones));
                            }
                        }
                        for (r, s) in isum.iter_mut().enumerate() {
                            let xsum = *act.sum.get_unchecked((row + r) * kb + b);
                            *s = _mm256_add_epi32(*s, _mm256_set1_epi32(128 * xsum));
                        }
                    }
                }
                // The VNNI kernel's float steps, in its order.
                for (r, acc) in acc.iter_mut().enumerate() {
                    let dx = *act.d.get_unchecked((row + r) * kb + b);
                    let sx = *act.s.get_unchecked((row + r) * kb + b);
                    let fsum = _mm256_cvtepi32_ps(isum[r]);
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(dx)), fsum, *acc);
                    *acc = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx), *acc);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: `o[8 * half..]` holds at least 8 f32s.
            unsafe { _mm256_storeu_ps(o[8 * half..].as_mut_ptr(), a) };
        }
    }
}
