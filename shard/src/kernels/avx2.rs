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
}

impl Avx2 {
    /// Eight-lane sums of `a · b[i]` for four vectors `b[i]`: lane `l`
    /// of result `i` is `Σ_c a[8c + l] · b[i][8c + l]`, each product added
    /// in order (a multiply, then an add: the scalar loop's bits). `a` and
    /// every `b[i]` have the same length, a multiple of 8.
    pub(super) fn lanes4(self, a: &[f32], b: [&[f32]; 4]) -> [[f32; 8]; 4] {
        assert!(a.len().is_multiple_of(8) && b.iter().all(|b| b.len() == a.len()));
        // SAFETY: features as detected for `self`; lengths checked above.
        unsafe { lanes4(a, b) }
    }

    /// `y += p · x` element by element (a multiply, then an add).
    pub(super) fn axpy(self, p: f32, x: &[f32], y: &mut [f32]) {
        assert!(x.len() == y.len());
        // SAFETY: features as detected for `self`; lengths checked above.
        unsafe { axpy(p, x, y) }
    }
}

/// # Safety
/// The CPU must support AVX2; `a.len() % 8 == 0`, every `b[i]` as long as `a`.
#[target_feature(enable = "avx2")]
unsafe fn lanes4(a: &[f32], b: [&[f32]; 4]) -> [[f32; 8]; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (pa, pb) = (a.as_ptr(), b.map(<[f32]>::as_ptr));
    for c in (0..a.len()).step_by(8) {
        // SAFETY: `c + 8 <= len` for `a` and every `b[i]`.
        unsafe {
            let x = _mm256_loadu_ps(pa.add(c));
            for (acc, pb) in acc.iter_mut().zip(pb) {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, _mm256_loadu_ps(pb.add(c))));
            }
        }
    }
    let mut out = [[0f32; 8]; 4];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` holds exactly 8 f32s.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
    }
    out
}

/// # Safety
/// The CPU must support AVX2; `x.len() == y.len()`.
#[target_feature(enable = "avx2")]
unsafe fn axpy(p: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len() / 8 * 8;
    let pv = _mm256_set1_ps(p);
    for c in (0..n).step_by(8) {
        // SAFETY: `c + 8 <= n <= len` of both.
        unsafe {
            let yv = _mm256_loadu_ps(y.as_ptr().add(c));
            let xv = _mm256_loadu_ps(x.as_ptr().add(c));
            _mm256_storeu_ps(
                y.as_mut_ptr().add(c),
                _mm256_add_ps(yv, _mm256_mul_ps(pv, xv)),
            );
        }
    }
    for (y, &x) in y[n..].iter_mut().zip(&x[n..]) {
        *y += p * x;
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
    while row < m {
        // SAFETY: as above, one row.
        unsafe { rows::<1>(w, t, act, row, &mut out[row..row + 1]) };
        row += 1;
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
