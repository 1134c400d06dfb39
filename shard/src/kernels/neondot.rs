//! The NEON kernel of [`PackedMatrix`] for aarch64 CPUs with the dot-product
//! extension (FEAT_DotProd, `sdot`): optional from Armv8.2-A and present on
//! nearly every 64-bit Arm chip since about 2018: Apple's M-series, AWS
//! Graviton 2 and later, Ampere Altra, the Cortex-A76/A78/X cores of phones
//! and of the Raspberry Pi 5. Like `neon.rs`, it is unsafe code only because
//! SIMD intrinsics and functions compiled for CPU features the build does not
//! assume need `unsafe`; the rest of the crate reaches it through
//! [`NeonDot`], which exists only where both were detected at run time.
//!
//! The layout and the float steps are the NEON kernel's; only the integer
//! sums differ. `sdot v.4s, w.16b, x.4b[i]` multiplies the 4 bytes of each
//! of 4 output rows in `w` by the 4 activation bytes in lane `i` of `x` and
//! adds each row's four products into its 32-bit lane, exactly: one
//! instruction in place of NEON's `smull` ×2, `addp`, `saddlp` and `add`,
//! and the 16 activation bytes of half a block stay in one register for
//! four lines. 8-bit weights go in signed (`q = u - 128`, `128 · Σx` added
//! back), as in `neon.rs`. Four activation rows share each loaded weight
//! line (the nibbles are unpacked once for all four).
//!
//! Rust's `vdotq_laneq_s32` is not stable, so `sdot` is written in inline
//! assembly ([`sdot`]); everything else is ordinary intrinsics. The integer
//! sums are the same exact integers and the float steps the same fused
//! multiply-adds in the same order, so the results are bit-identical to the
//! NEON kernel, the scalar path and the x86 kernels.
#![allow(unsafe_code)]

use super::neon::{Neon, widen4};
use super::{Activations, BLOCK, Bits, PackedMatrix, TILE};
use std::arch::aarch64::*;
use std::arch::asm;

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
    /// of `act`, one row of `out` each.
    pub(super) fn tile(
        self,
        w: &PackedMatrix,
        t: usize,
        act: &Activations,
        out: &mut [[f32; TILE]],
    ) {
        // SAFETY: a `NeonDot` is only made where the CPU has NEON and the
        // dot-product extension; the kernel checks its own bounds.
        unsafe { tile(w, t, act, out) }
    }
}

/// `acc + ` the 4-byte dot products of the 4 output rows in `w` with lane
/// `L` (bytes `4 L..4 L + 4`) of `x`: one `sdot` by element.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot<const L: usize>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
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

/// Rows of activations processed against one loaded weight line: about 23
/// of the 32 vector registers live (4 float and 4 integer sums, 8 halves of
/// activation blocks, the line and its nibbles, constants, scales).
const ROWS: usize = 4;

/// Computes tile `t` (16 output columns) for every activation row.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
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

/// Rows `row..row + R` of `act` against tile `t`, 4 output columns (`c`) at
/// a time: their bytes are `16 c..16 c + 16` of each line, 4 per output row.
///
/// # Safety
/// CPU features as for [`tile`]; `row + R` rows of `act`, `R` of `out`.
#[target_feature(enable = "neon,dotprod")]
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
    let lines = &w.lines[first..first + kb * per];
    assert!((row + R) * k <= act.q.len() && (row + R) * kb <= act.d.len());
    assert!(act.s.len() == act.d.len() && act.sum.len() == act.d.len());
    assert!(out.len() >= R);
    let nib = vdupq_n_u8(0x0F);
    let flip = vdupq_n_u8(0x80);
    for c in 0..TILE / 4 {
        let mut acc = [vdupq_n_f32(0.0); R];
        for b in 0..kb {
            let block = &lines[b * per..(b + 1) * per];
            // Activation groups 0..4 (lanes of `x0`) and 4..8 (of `x1`).
            let (x0, x1): ([int8x16_t; R], [int8x16_t; R]) = {
                let half = |r: usize, h: usize| {
                    let at = (row + r) * k + b * BLOCK + 16 * h;
                    let x = &act.q[at..at + 16];
                    // SAFETY: 16 bytes in bounds; NEON as required.
                    unsafe { vld1q_s8(x.as_ptr()) }
                };
                (
                    std::array::from_fn(|r| half(r, 0)),
                    std::array::from_fn(|r| half(r, 1)),
                )
            };
            let mut isum = [vdupq_n_s32(0); R];
            // One weight line: 16 bytes, 4 per output row, at `16 c`.
            let line = |l: usize| {
                let bytes = &block[l].0[16 * c..16 * c + 16];
                // SAFETY: 16 bytes in bounds; NEON as required.
                unsafe { vld1q_u8(bytes.as_ptr()) }
            };
            // SAFETY (every block below): register arithmetic only; NEON and
            // the dot-product extension as required.
            match w.bits {
                Bits::Four => {
                    // Low nibbles of line 1 + i are values 4i.., high
                    // nibbles 16 + 4i..: activation groups i and 4 + i.
                    macro_rules! four {
                        ($i:literal) => {{
                            let v = line(1 + $i);
                            let lo = vreinterpretq_s8_u8(vandq_u8(v, nib));
                            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                            for r in 0..R {
                                isum[r] = unsafe { sdot::<$i>(isum[r], lo, x0[r]) };
                                isum[r] = unsafe { sdot::<$i>(isum[r], hi, x1[r]) };
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
                            let q = vreinterpretq_s8_u8(veorq_u8(line(1 + $g), flip));
                            for r in 0..R {
                                isum[r] = unsafe { sdot::<$lane>(isum[r], q, $x[r]) };
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
                        *isum = vaddq_s32(*isum, vdupq_n_s32(128 * xsum));
                    }
                }
            }
            // Scales `d` and offsets `m` of output rows `4 c..4 c + 4`.
            let sc = &block[0].0;
            // SAFETY: NEON as required.
            let (dv, mv) = unsafe { (widen4(&sc[8 * c..]), widen4(&sc[32 + 8 * c..])) };
            // The other kernels' float steps, in their order.
            for (r, acc) in acc.iter_mut().enumerate() {
                let (dx, sx) = (act.d[(row + r) * kb + b], act.s[(row + r) * kb + b]);
                let fsum = vcvtq_f32_s32(isum[r]);
                *acc = vfmaq_f32(*acc, vmulq_f32(dv, vdupq_n_f32(dx)), fsum);
                *acc = vfmaq_f32(*acc, mv, vdupq_n_f32(sx));
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: `o[4 c..]` holds at least 4 f32s; NEON as required.
            unsafe { vst1q_f32(o[4 * c..].as_mut_ptr(), *a) };
        }
    }
}
