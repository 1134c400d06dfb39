//! The AVX-512 VNNI kernel of [`PackedMatrix`], and with the other kernel
//! files (`amx.rs`, `avxvnni.rs`, `avx2.rs`, `neon.rs`) the
//! crate's only unsafe code: SIMD intrinsics need `unsafe`, and so does
//! calling a function compiled for CPU features the build does not assume.
//! The rest of the crate reaches the kernel through [`Vnni`], which exists
//! only where those features were detected at run time, so every call is
//! sound by construction.
#![allow(unsafe_code)]

use super::{Activations, BLOCK, Bits, PackedMatrix, TILE};
use half::f16;
use std::arch::x86_64::*;

/// Proof that this CPU has AVX-512 F, BW, VNNI and F16C.
#[derive(Debug, Clone, Copy)]
pub(super) struct Vnni(());

impl Vnni {
    /// The proof, where the CPU has every feature the kernel enables.
    pub(super) fn detect() -> Option<Self> {
        super::path::cpu().vnni.then_some(Self(()))
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
        // SAFETY: a `Vnni` is only made where the CPU has every feature the
        // kernel enables; the kernel checks its own bounds.
        unsafe { tile(w, t, act, out) }
    }

    /// [`super::dot_peak`]: `vpdpbusd` on 512-bit registers.
    pub(super) fn dot_peak(self) -> f64 {
        // SAFETY: a `Vnni` is only made where the CPU has AVX-512 VNNI.
        super::peak_of(16 * 64, |rounds| unsafe { dot_loop(rounds) })
    }
}

/// `rounds` rounds of sixteen independent `vpdpbusd` (64 multiply-adds each).
///
/// # Safety
/// The CPU must support AVX-512 F and VNNI.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dot_loop(rounds: usize) {
    let (w, x) = std::hint::black_box((_mm512_set1_epi8(3), _mm512_set1_epi8(-5)));
    let mut s = [_mm512_setzero_si512(); 16];
    for _ in 0..rounds {
        for s in s.iter_mut() {
            *s = _mm512_dpbusd_epi32(*s, w, x);
        }
    }
    std::hint::black_box(s);
}

/// Computes tile `t` (16 output columns) for every activation row: eight
/// rows against each loaded weight block where there are eight (a batch of
/// decode steps: the weights' unpacking is shared by more rows), then the
/// rest, up to seven, in one more pass over the weights. Each row's
/// arithmetic is the same whatever its group.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VNNI and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile(w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
    let m = out.len();
    let mut row = 0;
    while row + 8 <= m {
        // SAFETY: rows `row..row+8` exist; CPU features as required above.
        unsafe { rows::<8>(w, t, act, row, &mut out[row..row + 8]) };
        row += 8;
    }
    let rest = &mut out[row..];
    // SAFETY (every arm): rows `row..m` exist, `rest` holds them; CPU
    // features as required above.
    unsafe {
        match rest.len() {
            1 => rows::<1>(w, t, act, row, rest),
            2 => rows::<2>(w, t, act, row, rest),
            3 => rows::<3>(w, t, act, row, rest),
            4 => rows::<4>(w, t, act, row, rest),
            5 => rows::<5>(w, t, act, row, rest),
            6 => rows::<6>(w, t, act, row, rest),
            7 => rows::<7>(w, t, act, row, rest),
            _ => {}
        }
    }
}

/// # Safety
/// CPU features as for [`tile`]; `row + R <= out.len()` rows of `act`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn rows<const R: usize>(
    w: &PackedMatrix,
    t: usize,
    act: &Activations,
    row: usize,
    out: &mut [[f32; TILE]],
) {
    const { assert!(R <= 8) };
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
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        // SAFETY: `base` points at this (tile, block)'s `per` lines, in bounds
        // (asserted above); unaligned loads need no alignment.
        unsafe {
            let base = lines.add(b * per * 64);
            super::avx2::prefetch_ahead(base, per);
            let sc = _mm512_loadu_si512(base as *const __m512i);
            let dv = _mm512_cvtph_ps(_mm512_castsi512_si256(sc));
            let mv = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(sc));
            let mut wq = [_mm512_setzero_si512(); 8];
            match w.bits {
                Bits::Four => {
                    for i in 0..4 {
                        let v = _mm512_loadu_si512(base.add(64 * (1 + i)) as *const __m512i);
                        wq[i] = _mm512_and_si512(v, nib);
                        wq[4 + i] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                    }
                }
                Bits::Eight => {
                    for (g, q) in wq.iter_mut().enumerate() {
                        *q = _mm512_loadu_si512(base.add(64 * (1 + g)) as *const __m512i);
                    }
                }
            }
            // Four-byte groups of activations for line order: value 4g..4g+4
            // for 8-bit line g; for 4-bit, low nibbles of line i are values
            // 4i.. and high nibbles 16+4i.., i.e. group i and group 4+i: the
            // same order as `wq` above. The rows are written out one by one
            // (`if $r < R` is settled at compile time), so that their sums
            // stay in registers: a loop over `acc` kept them on the stack
            // (the kernel table's 4, 7 and 8 rows 1.06x, 1.09x, 1.02x).
            let xb = act.q.as_ptr().add(row * k + b * BLOCK) as *const i32;
            let sb = (row * kb + b, kb);
            macro_rules! one_row {
                ($($r:literal)*) => {$(
                    if $r < R {
                        let xp = xb.add($r * k / 4);
                        let mut s0 = _mm512_setzero_si512();
                        let mut s1 = _mm512_setzero_si512();
                        for g in 0..4 {
                            let a0 = _mm512_set1_epi32(xp.add(g).read_unaligned());
                            let a1 = _mm512_set1_epi32(xp.add(4 + g).read_unaligned());
                            s0 = _mm512_dpbusd_epi32(s0, wq[g], a0);
                            s1 = _mm512_dpbusd_epi32(s1, wq[4 + g], a1);
                        }
                        let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                        let dx = *act.d.get_unchecked(sb.0 + $r * sb.1);
                        let sx = *act.s.get_unchecked(sb.0 + $r * sb.1);
                        let scale = _mm512_mul_ps(dv, _mm512_set1_ps(dx));
                        acc[$r] = _mm512_fmadd_ps(scale, isum, acc[$r]);
                        acc[$r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx), acc[$r]);
                    }
                )*};
            }
            one_row!(0 1 2 3 4 5 6 7);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` holds exactly 16 f32s.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
}

/// Proof that this CPU has AVX-512 F and F16C (detected with the VNNI
/// kernel's features and AVX2's, which include them): attention's float
/// loops in sixteen lanes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Float16(());

impl Float16 {
    /// The proof, where the CPU has the VNNI kernel's features (AVX-512 F,
    /// BW, VNNI, F16C) and AVX2's (AVX2, FMA, F16C).
    pub(super) fn detect() -> Option<Self> {
        let c = super::path::cpu();
        (c.vnni && c.avx2).then_some(Self(()))
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
}

/// `super::weighted_sum_scalar`'s steps for `H` (1 to 3) heads' weights
/// over the same values, sixteen elements a vector: each element of `y`
/// takes the multiply and the add it takes alone, in the same order of
/// values, so the width of the vectors changes no bit.
///
/// # Safety
/// The CPU must support AVX-512 F, AVX2 and F16C; every `p[h]` is
/// `p[0].len()` long, every `y[h]` `y[0].len()` long, and `x` holds
/// `p[0].len() * y[0].len()` values.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn weighted_sum_heads<const H: usize>(p: [&[f32]; H], x: &[f16], y: &mut [&mut [f32]; H]) {
    const CHUNK: usize = 64;
    let d = y[0].len();
    let wide = d / 16 * 16;
    let px = x.as_ptr();
    let mut c0 = 0;
    while c0 < wide {
        let w = (wide - c0).min(CHUNK) / 16;
        let mut acc = [[_mm512_setzero_ps(); CHUNK / 16]; H];
        for h in 0..H {
            for (i, a) in acc[h].iter_mut().enumerate().take(w) {
                // SAFETY: `c0 + 16 i + 16 <= wide <= d`.
                *a = unsafe { _mm512_loadu_ps(y[h].as_ptr().add(c0 + 16 * i)) };
            }
        }
        for j in 0..p[0].len() {
            if c0 == 0 {
                // Value `j`'s lines 4 KiB on, once for all chunks.
                super::avx2::prefetch_ahead(
                    px.wrapping_add(j * d) as *const u8,
                    (2 * d).div_ceil(64),
                );
            }
            let pv: [__m512; H] = std::array::from_fn(|h| _mm512_set1_ps(p[h][j]));
            for i in 0..w {
                // SAFETY: `j * d + c0 + 16 i + 16 <= (j + 1) * d <= x.len()`.
                let xv = unsafe {
                    _mm512_cvtph_ps(_mm256_loadu_si256(
                        px.add(j * d + c0 + 16 * i) as *const __m256i
                    ))
                };
                for h in 0..H {
                    acc[h][i] = _mm512_add_ps(acc[h][i], _mm512_mul_ps(pv[h], xv));
                }
            }
        }
        for h in 0..H {
            for (i, a) in acc[h].iter().enumerate().take(w) {
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_ps(y[h].as_mut_ptr().add(c0 + 16 * i), *a) };
            }
        }
        c0 += CHUNK;
    }
    // The rest of the elements (fewer than 16): one at a time, the same steps.
    for (p, y) in p.iter().zip(y.iter_mut()) {
        super::weighted_sum_from(p, x, y, wide);
    }
}
