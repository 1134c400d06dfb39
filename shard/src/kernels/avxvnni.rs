//! The AVX-VNNI kernel of [`PackedMatrix`]: `vpdpbusd` on 256-bit registers
//! (the VEX encoding), for CPUs with AVX-VNNI and no AVX-512: Intel's desktop
//! and laptop chips since Alder Lake (CPUs that also have AVX-512 VNNI, such
//! as AMD's Zen 5, run that kernel instead). Like `avx2.rs`,
//! it is unsafe code only because SIMD intrinsics and functions compiled for
//! CPU features the build does not assume need `unsafe`; the rest of the
//! crate reaches it through [`AvxVnni`], which exists only where those
//! features were detected at run time.
//!
//! The layout and the float steps are the AVX2 kernel's; only the integer
//! sums differ. `vpdpbusd` multiplies unsigned weight bytes by signed
//! activation bytes and adds each four products into 32 bits with no
//! intermediate saturation, so it replaces AVX2's `vpmaddubsw` + `vpmaddwd`
//! pair by one instruction, and 8-bit weights (`u = q + 128`, unsigned) go
//! in as they are, with no sign trick and no `128 · Σx` added back. The
//! integer sums `Σ u·x` are the same exact integers, and the float steps
//! after them the same operations in the same order, so the results are
//! bit-identical to the AVX2 and AVX-512 VNNI kernels.
#![allow(unsafe_code)]

use super::avx2::Avx2;
use super::{Activations, BLOCK, Bits, PackedMatrix, TILE};
use std::arch::x86_64::*;

/// Proof that this CPU has AVX-VNNI, AVX2, FMA and F16C.
#[derive(Debug, Clone, Copy)]
pub(super) struct AvxVnni(Avx2);

impl AvxVnni {
    /// The proof, where the CPU has every feature the kernel enables.
    pub(super) fn detect() -> Option<Self> {
        let avx2 = Avx2::detect()?;
        super::path::cpu().avx_vnni.then_some(Self(avx2))
    }

    /// Computes tile `t` of `w` (16 output columns) for every activation row
    /// of `act`, one row of `out` each. One row (a decode step) is bound by
    /// reading the weights, where the AVX2 kernel is as fast (the same bits).
    pub(super) fn tile(
        self,
        w: &PackedMatrix,
        t: usize,
        act: &Activations,
        out: &mut [[f32; TILE]],
    ) {
        if out.len() == 1 {
            return self.0.tile(w, t, act, out);
        }
        // SAFETY: an `AvxVnni` is only made where the CPU has every feature
        // the kernel enables; the kernel checks its own bounds.
        unsafe { tile(w, t, act, out) }
    }

    /// [`super::dot_peak`]: `vpdpbusd` on 256-bit registers.
    pub(super) fn dot_peak(self) -> f64 {
        // SAFETY: an `AvxVnni` is only made where the CPU has AVX-VNNI.
        super::peak_of(12 * 32, |rounds| unsafe { dot_loop(rounds) })
    }
}

/// `rounds` rounds of twelve independent `vpdpbusd` (32 multiply-adds each).
///
/// # Safety
/// The CPU must support AVX-VNNI.
#[target_feature(enable = "avxvnni")]
unsafe fn dot_loop(rounds: usize) {
    let (w, x) = std::hint::black_box((_mm256_set1_epi8(3), _mm256_set1_epi8(-5)));
    // Twelve: with the two inputs, within AVX2's sixteen registers.
    let mut s = [_mm256_setzero_si256(); 12];
    for _ in 0..rounds {
        for s in s.iter_mut() {
            *s = _mm256_dpbusd_avx_epi32(*s, w, x);
        }
    }
    std::hint::black_box(s);
}

/// Rows of activations processed against one loaded weight group, as AVX2
/// (with two integer sums a row, four rows keep about 17 values live in 16
/// vector registers; the compiler reads the nibble mask from memory).
const ROWS: usize = 4;

/// Computes tile `t` (16 output columns) for every activation row.
///
/// # Safety
/// The CPU must support AVX-VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avxvnni,avx2,fma,f16c")]
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
#[target_feature(enable = "avxvnni,avx2,fma,f16c")]
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
                    super::avx2::prefetch_ahead(base, per);
                }
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16 * half) as *const __m128i));
                let mv =
                    _mm256_cvtph_ps(_mm_loadu_si128(base.add(32 + 16 * half) as *const __m128i));
                let xp: [*const i32; R] = std::array::from_fn(|r| {
                    act.q.as_ptr().add((row + r) * k + b * BLOCK) as *const i32
                });
                // Two sums a row, so that each chain of `vpdpbusd` (whose
                // latency is several cycles) is half as long; added at the end
                // (integers: the order does not matter).
                let mut even = [_mm256_setzero_si256(); R];
                let mut odd = [_mm256_setzero_si256(); R];
                match w.bits {
                    Bits::Four => {
                        // Low nibbles of line i are values 4i.., high nibbles
                        // 16 + 4i..: activation groups i and 4 + i.
                        for i in 0..4 {
                            let v = _mm256_loadu_si256(
                                base.add(64 * (1 + i) + 32 * half) as *const __m256i
                            );
                            let lo = _mm256_and_si256(v, nib);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                            for r in 0..R {
                                let a0 = _mm256_set1_epi32(xp[r].add(i).read_unaligned());
                                let a1 = _mm256_set1_epi32(xp[r].add(4 + i).read_unaligned());
                                even[r] = _mm256_dpbusd_avx_epi32(even[r], lo, a0);
                                odd[r] = _mm256_dpbusd_avx_epi32(odd[r], hi, a1);
                            }
                        }
                    }
                    Bits::Eight => {
                        for g in (0..8).step_by(2) {
                            let v0 = _mm256_loadu_si256(
                                base.add(64 * (1 + g) + 32 * half) as *const __m256i
                            );
                            let v1 = _mm256_loadu_si256(
                                base.add(64 * (2 + g) + 32 * half) as *const __m256i
                            );
                            for r in 0..R {
                                let a0 = _mm256_set1_epi32(xp[r].add(g).read_unaligned());
                                let a1 = _mm256_set1_epi32(xp[r].add(g + 1).read_unaligned());
                                even[r] = _mm256_dpbusd_avx_epi32(even[r], v0, a0);
                                odd[r] = _mm256_dpbusd_avx_epi32(odd[r], v1, a1);
                            }
                        }
                    }
                }
                let isum: [__m256i; R] = std::array::from_fn(|r| _mm256_add_epi32(even[r], odd[r]));
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
