//! The NEON kernels of [`PackedMatrix`], for aarch64: one for CPUs with the
//! dot-product extension (FEAT_DotProd, `sdot`, optional from Armv8.2-A:
//! Apple's M series, AWS Graviton 2 and later, Ampere Altra, the
//! Cortex-A76/A78/X cores of phones and of the Raspberry Pi 5), and one for
//! cores without it (the Cortex-A72 of the Raspberry Pi 4, the A53 of older
//! boards). Like `avx2.rs`, this
//! is unsafe code only because SIMD intrinsics and functions compiled for CPU
//! features the build does not assume need `unsafe`; the rest of the crate
//! reaches the kernels through [`NeonDot`] and [`Neon`], which exist only
//! where those features were detected at run time.
//!
//! Both run one loop ([`rows`]): 4 output rows (`c`) of a tile at a time,
//! four activation rows per loaded weight line (its nibbles unpacked once
//! for all four), the 32 activations of a block in two registers of four
//! 4-byte groups each. They differ only in the 4-byte dot products of 4
//! output rows with one group ([`Dot`]):
//!
//! - [`Sdot`]: one `sdot v.4s, w.16b, x.4b[i]` (inline assembly: Rust's
//!   `vdotq_laneq_s32` is not stable), exact in 32 bits;
//! - [`Smull`], as ggml-cpu's fallback does: `smull` and `smull2` multiply
//!   8 signed bytes each into 16-bit products, `addp` folds them to pairs
//!   and `sadalp` adds the pairs, widened, to each row's sum. The pairs stay
//!   in 16 bits: at most 2·15·127 (4-bit) or 2·128·127 = 32,512 (8-bit).
//!
//! 8-bit weights go in signed (`q = u - 128`) and `128 · Σx` is added back.
//! The integer sums are the exact `Σ u·x` and the float steps the other
//! kernels' (two fused multiply-adds in the same order), so the results are
//! bit-identical to the scalar path and to the x86 kernels.
#![allow(unsafe_code)]

use super::{Activations, BLOCK, Bits, PackedMatrix, TILE};
use std::arch::aarch64::*;
use std::arch::asm;

/// Proof that this CPU has NEON.
#[derive(Debug, Clone, Copy)]
pub(super) struct Neon(());

impl Neon {
    /// The proof, where the CPU has NEON.
    pub(super) fn detect() -> Option<Self> {
        super::path::cpu().neon.then_some(Self(()))
    }

    /// Computes tile `t` of `w` (16 output columns) for every activation row
    /// of `act`, one row of `out` each, without `sdot`.
    pub(super) fn tile(
        self,
        w: &PackedMatrix,
        t: usize,
        act: &Activations,
        out: &mut [[f32; TILE]],
    ) {
        // SAFETY: a `Neon` is only made where the CPU has NEON; the kernel
        // checks its own bounds.
        unsafe { tile_smull(w, t, act, out) }
    }
}

/// Proof that this CPU has NEON and the dot-product extension.
#[derive(Debug, Clone, Copy)]
pub(super) struct NeonDot(Neon);

impl NeonDot {
    /// The proof, where the CPU has NEON and `sdot`.
    pub(super) fn detect() -> Option<Self> {
        let neon = Neon::detect()?;
        super::path::cpu().neon_dot.then_some(Self(neon))
    }

    /// Computes tile `t` of `w` (16 output columns) for every activation row
    /// of `act`, one row of `out` each, with `sdot`.
    pub(super) fn tile(
        self,
        w: &PackedMatrix,
        t: usize,
        act: &Activations,
        out: &mut [[f32; TILE]],
    ) {
        // SAFETY: a `NeonDot` is only made where the CPU has NEON and the
        // dot-product extension; the kernel checks its own bounds.
        unsafe { tile_sdot(w, t, act, out) }
    }

    /// [`super::dot_peak`]: `sdot`.
    pub(super) fn dot_peak(self) -> f64 {
        // SAFETY: a `NeonDot` is only made where the CPU has the
        // dot-product extension.
        super::peak_of(16 * 16, |rounds| unsafe { dot_loop(rounds) })
    }
}

/// `rounds` rounds of sixteen independent `sdot` (16 multiply-adds each).
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_loop(rounds: usize) {
    let (w, x) = std::hint::black_box((vdupq_n_s8(3), vdupq_n_s8(-5)));
    let mut s = [vdupq_n_s32(0); 16];
    for _ in 0..rounds {
        for s in s.iter_mut() {
            // SAFETY: the caller's CPU has the dot-product extension.
            *s = unsafe { sdot::<0>(*s, w, x) };
        }
    }
    std::hint::black_box(s);
}

/// The 4-byte dot products of 4 output rows with one activation group.
trait Dot {
    /// `acc +` the dot products of the 4 output rows in `w` (4 bytes each)
    /// with lane `L` (bytes `4 L..4 L + 4`) of `x`.
    ///
    /// # Safety
    /// The CPU must have the features of the kernel that calls it.
    unsafe fn dot<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;
}

/// [`Dot`] by `sdot`, for [`NeonDot`]: only [`tile_sdot`], compiled for the
/// dot-product extension, instantiates [`rows`] with it.
struct Sdot;

impl Dot for Sdot {
    #[inline(always)]
    unsafe fn dot<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // SAFETY: the caller's CPU has the dot-product extension.
        unsafe { sdot::<L>(acc, w, x) }
    }
}

/// One `sdot` by element: [`Dot::dot`] for [`Sdot`].
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    const { assert!(0 <= L && L < 4, "a lane of four 4-byte groups") };
    let mut acc = acc;
    macro_rules! by_lane {
        ($lane:literal) => {
            // SAFETY: `sdot` reads and writes only these registers; the
            // caller guarantees the CPU has it.
            unsafe {
                asm!(
                    concat!("sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[", $lane, "]"),
                    acc = inout(vreg) acc,
                    w = in(vreg) w,
                    x = in(vreg) x,
                    options(pure, nomem, nostack, preserves_flags),
                )
            }
        };
    }
    match L {
        0 => by_lane!(0),
        1 => by_lane!(1),
        2 => by_lane!(2),
        _ => by_lane!(3),
    }
    acc
}

/// [`Dot`] by `smull` and pairwise adds, for [`Neon`].
struct Smull;

impl Dot for Smull {
    #[inline(always)]
    unsafe fn dot<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        // SAFETY: register arithmetic; NEON is baseline on aarch64.
        unsafe {
            // The group in every 4 bytes: one `dup` by element; `smull2`
            // takes the high halves where they are.
            let a = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(x)));
            let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
            let hi = vmull_high_s8(w, a);
            vaddq_s32(acc, vpaddlq_s16(vpaddq_s16(lo, hi)))
        }
    }
}

/// The 4 f16 values at `bytes[..8]` (little-endian), widened exactly to f32
/// by one `fcvtl` (base NEON; Rust's `vcvt_f32_f16` is not stable, and
/// `half`'s conversion is a call per value).
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn widen4(bytes: &[u8]) -> float32x4_t {
    let b = &bytes[..8];
    // SAFETY: 8 bytes in bounds; NEON as required.
    let h = vreinterpret_u16_u8(unsafe { vld1_u8(b.as_ptr()) });
    let wide: float32x4_t;
    // SAFETY: `fcvtl` reads and writes only these registers (and may raise
    // the invalid-operation flag, on a signalling NaN: not `preserves_flags`).
    unsafe {
        asm!(
            "fcvtl {wide:v}.4s, {h:v}.4h",
            wide = lateout(vreg) wide,
            h = in(vreg) h,
            options(pure, nomem, nostack),
        )
    };
    wide
}

/// Rows of activations processed against one loaded weight line: about 23
/// of the 32 vector registers live (4 float and 4 integer sums, 8 halves of
/// activation blocks, the line and its nibbles, constants, scales).
const ROWS: usize = 4;

/// [`all_rows`] with `sdot`.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_sdot(w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
    // SAFETY: CPU features as required above.
    unsafe { all_rows::<Sdot>(w, t, act, out) }
}

/// [`all_rows`] without `sdot`.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn tile_smull(w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
    // SAFETY: NEON as required above.
    unsafe { all_rows::<Smull>(w, t, act, out) }
}

/// [`rows`] for every activation row, [`ROWS`] at a time; inlined into
/// [`tile_sdot`] and [`tile_smull`], so compiled with their CPU features.
///
/// # Safety
/// The CPU features `D` needs.
#[inline(always)]
unsafe fn all_rows<D: Dot>(w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
    let m = out.len();
    let mut row = 0;
    while row + ROWS <= m {
        // SAFETY: rows `row..row+ROWS` exist; CPU features as the caller's.
        unsafe { rows::<ROWS, D>(w, t, act, row, &mut out[row..row + ROWS]) };
        row += ROWS;
    }
    // The rest, up to three rows, in one more pass over the weights.
    let rest = &mut out[row..];
    // SAFETY (every arm): rows `row..m` exist, `rest` holds them; CPU
    // features as the caller's.
    unsafe {
        match rest.len() {
            1 => rows::<1, D>(w, t, act, row, rest),
            2 => rows::<2, D>(w, t, act, row, rest),
            3 => rows::<3, D>(w, t, act, row, rest),
            _ => {}
        }
    }
}

/// Rows `row..row + R` of `act` against tile `t`, 4 output columns (`c`) at
/// a time: their bytes are `16 c..16 c + 16` of each line, 4 per output row.
/// Inlined, through [`all_rows`], into [`tile_sdot`] and [`tile_smull`], so
/// compiled with their CPU features.
///
/// # Safety
/// The CPU features `D` needs; `row + R` rows of `act`, `R` of `out`.
#[inline(always)]
unsafe fn rows<const R: usize, D: Dot>(
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
    let lines = &w.lines[first..first + kb * per];
    assert!((row + R) * k <= act.q.len() && (row + R) * kb <= act.d.len());
    assert!(act.s.len() == act.d.len() && act.sum.len() == act.d.len());
    assert!(out.len() >= R);
    // SAFETY (every `unsafe` below without its own comment): register
    // arithmetic; NEON is baseline on aarch64.
    let (nib, flip) = unsafe { (vdupq_n_u8(0x0F), vdupq_n_u8(0x80)) };
    for c in 0..TILE / 4 {
        let mut acc = [unsafe { vdupq_n_f32(0.0) }; R];
        for b in 0..kb {
            let block = &lines[b * per..(b + 1) * per];
            // Activation groups 0..4 (lanes of `x0`) and 4..8 (of `x1`).
            let half = |r: usize, h: usize| {
                let at = (row + r) * k + b * BLOCK + 16 * h;
                let x = &act.q[at..at + 16];
                // SAFETY: 16 bytes in bounds; NEON is baseline on aarch64.
                unsafe { vld1q_s8(x.as_ptr()) }
            };
            let x0: [int8x16_t; R] = std::array::from_fn(|r| half(r, 0));
            let x1: [int8x16_t; R] = std::array::from_fn(|r| half(r, 1));
            let mut isum = [unsafe { vdupq_n_s32(0) }; R];
            // One weight line: 16 bytes, 4 per output row, at `16 c`.
            let line = |l: usize| {
                let bytes = &block[l].0[16 * c..16 * c + 16];
                // SAFETY: 16 bytes in bounds; NEON is baseline on aarch64.
                unsafe { vld1q_u8(bytes.as_ptr()) }
            };
            match w.bits {
                Bits::Four => {
                    // Low nibbles of line 1 + i are values 4i.., high
                    // nibbles 16 + 4i..: activation groups i and 4 + i.
                    macro_rules! four {
                        ($i:literal) => {{
                            let v = line(1 + $i);
                            let (lo, hi) = unsafe {
                                (
                                    vreinterpretq_s8_u8(vandq_u8(v, nib)),
                                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)),
                                )
                            };
                            for r in 0..R {
                                // SAFETY: CPU features as the caller's.
                                isum[r] = unsafe { D::dot::<$i>(isum[r], lo, x0[r]) };
                                // SAFETY: as above.
                                isum[r] = unsafe { D::dot::<$i>(isum[r], hi, x1[r]) };
                            }
                        }};
                    }
                    four!(0);
                    four!(1);
                    four!(2);
                    four!(3);
                }
                Bits::Eight => {
                    // Line 1 + g holds activation group g's values.
                    macro_rules! eight {
                        ($g:literal, $x:ident, $lane:literal) => {{
                            let v = line(1 + $g);
                            let q = unsafe { vreinterpretq_s8_u8(veorq_u8(v, flip)) };
                            for r in 0..R {
                                // SAFETY: CPU features as the caller's.
                                isum[r] = unsafe { D::dot::<$lane>(isum[r], q, $x[r]) };
                            }
                        }};
                    }
                    eight!(0, x0, 0);
                    eight!(1, x0, 1);
                    eight!(2, x0, 2);
                    eight!(3, x0, 3);
                    eight!(4, x1, 0);
                    eight!(5, x1, 1);
                    eight!(6, x1, 2);
                    eight!(7, x1, 3);
                    for (r, isum) in isum.iter_mut().enumerate() {
                        let xsum = act.sum[(row + r) * kb + b];
                        *isum = unsafe { vaddq_s32(*isum, vdupq_n_s32(128 * xsum)) };
                    }
                }
            }
            // Scales `d` and offsets `m` of output rows `4 c..4 c + 4`.
            let sc = &block[0].0;
            // SAFETY: NEON is baseline on aarch64.
            let (dv, mv) = unsafe { (widen4(&sc[8 * c..]), widen4(&sc[32 + 8 * c..])) };
            // The other kernels' float steps, in their order.
            for (r, acc) in acc.iter_mut().enumerate() {
                let (dx, sx) = (act.d[(row + r) * kb + b], act.s[(row + r) * kb + b]);
                *acc = unsafe {
                    let fsum = vcvtq_f32_s32(isum[r]);
                    let acc = vfmaq_f32(*acc, vmulq_f32(dv, vdupq_n_f32(dx)), fsum);
                    vfmaq_f32(acc, mv, vdupq_n_f32(sx))
                };
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: `o[4 c..]` holds at least 4 f32s; NEON is baseline.
            unsafe { vst1q_f32(o[4 * c..].as_mut_ptr(), *a) };
        }
    }
}
