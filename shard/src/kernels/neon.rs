//! The NEON kernel of [`PackedMatrix`], for aarch64. Like `avx2.rs` and
//! `avx512.rs`, it is unsafe code only because SIMD intrinsics need
//! `unsafe`; the rest of the crate reaches it through [`Neon`], which exists
//! only where NEON was detected at run time.
//!
//! For CPUs without the optional `sdot` instruction (Armv8.0 cores such as
//! the Cortex-A72; `neondot.rs` runs where it exists), as ggml-cpu's
//! fallback does: `smull` multiplies 8 signed bytes into 16-bit products,
//! one pairwise add (`addp`) folds them to pairs and a widening pairwise add
//! (`saddlp`) to the 4-value sums of 4 output rows. 8-bit weights are taken as `q = u -
//! 128` (signed) and `128 · Σx` is added back. The pairs stay in 16 bits:
//! at most 2·15·127 (4-bit) or 2·128·127 = 32,512 (8-bit).
//!
//! The integer sums are exact and the float steps are the other kernels'
//! (two fused multiply-adds in the same order), so the results are
//! bit-identical to the scalar path and to the x86 kernels.
#![allow(unsafe_code)]

use super::{Activations, BLOCK, Bits, PackedMatrix, TILE};
use std::arch::aarch64::*;

/// Proof that this CPU has NEON.
#[derive(Debug, Clone, Copy)]
pub(super) struct Neon(());

impl Neon {
    /// The proof, where the CPU has NEON.
    pub(super) fn detect() -> Option<Self> {
        super::path::cpu().neon.then_some(Self(()))
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
        // SAFETY: a `Neon` is only made where the CPU has NEON; the kernel
        // checks its own bounds.
        unsafe { tile(w, t, act, out) }
    }
}

/// The 4-value dot products of 4 output rows: `w` holds 4 bytes per row,
/// `a` the same 4 activations twice.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn dot4(w: int8x16_t, a: int8x8_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(w), a);
    let hi = vmull_s8(vget_high_s8(w), a);
    vpaddlq_s16(vpaddq_s16(lo, hi))
}

/// The 4 f16 values at `bytes[..8]` (little-endian), widened exactly to f32
/// by one `fcvtl` (base NEON; Rust's `vcvt_f32_f16` is not stable, and
/// `half`'s conversion is a call per value).
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
#[inline]
pub(super) unsafe fn widen4(bytes: &[u8]) -> float32x4_t {
    let b = &bytes[..8];
    // SAFETY: 8 bytes in bounds; NEON as required.
    let h = vreinterpret_u16_u8(unsafe { vld1_u8(b.as_ptr()) });
    let wide: float32x4_t;
    // SAFETY: `fcvtl` reads and writes only these registers.
    unsafe {
        std::arch::asm!(
            "fcvtl {wide:v}.4s, {h:v}.4h",
            wide = lateout(vreg) wide,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    wide
}

/// Activations `x[4 g..4 g + 4]` of a block, twice over 8 lanes.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn group(x: &[i8], g: usize) -> int8x8_t {
    let b = [x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3]];
    let word = i32::from_le_bytes(b.map(|v| v as u8));
    vreinterpret_s8_s32(vdup_n_s32(word))
}

/// Computes tile `t` (16 output columns) for every activation row.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn tile(w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
    let k = w.k;
    let kb = k / BLOCK;
    let per = 1 + w.bits.q_lines();
    let first = t * kb * per;
    let lines = &w.lines[first..first + kb * per];
    assert!(out.len() * k <= act.q.len() && out.len() * kb <= act.d.len());
    let nib = vdupq_n_u8(0x0F);
    let flip = vdupq_n_u8(0x80);
    for (row, o) in out.iter_mut().enumerate() {
        let mut acc = [vdupq_n_f32(0.0); TILE / 4];
        for b in 0..kb {
            let block = &lines[b * per..(b + 1) * per];
            let x = &act.q[row * k + b * BLOCK..row * k + (b + 1) * BLOCK];
            let (dx, sx) = (act.d[row * kb + b], act.s[row * kb + b]);
            let xsum = act.sum[row * kb + b];
            for (c, acc) in acc.iter_mut().enumerate() {
                let mut isum = vdupq_n_s32(0);
                match w.bits {
                    Bits::Four => {
                        // Low nibbles of line i are values 4i.., high nibbles
                        // 16 + 4i..: activation groups i and 4 + i.
                        for i in 0..4 {
                            let bytes = &block[1 + i].0[16 * c..16 * c + 16];
                            // SAFETY: 16 bytes in bounds; NEON as required.
                            unsafe {
                                let v = vld1q_u8(bytes.as_ptr());
                                let lo = vreinterpretq_s8_u8(vandq_u8(v, nib));
                                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                                isum = vaddq_s32(isum, dot4(lo, group(x, i)));
                                isum = vaddq_s32(isum, dot4(hi, group(x, 4 + i)));
                            }
                        }
                    }
                    Bits::Eight => {
                        for g in 0..8 {
                            let bytes = &block[1 + g].0[16 * c..16 * c + 16];
                            // SAFETY: 16 bytes in bounds; NEON as required.
                            unsafe {
                                let v = vld1q_u8(bytes.as_ptr());
                                let q = vreinterpretq_s8_u8(veorq_u8(v, flip));
                                isum = vaddq_s32(isum, dot4(q, group(x, g)));
                            }
                        }
                        isum = vaddq_s32(isum, vdupq_n_s32(128 * xsum));
                    }
                }
                let sc = &block[0].0;
                // The other kernels' float steps, in their order.
                // SAFETY: NEON as required.
                unsafe {
                    let dv = widen4(&sc[8 * c..]);
                    let mv = widen4(&sc[32 + 8 * c..]);
                    let fsum = vcvtq_f32_s32(isum);
                    *acc = vfmaq_f32(*acc, vmulq_f32(dv, vdupq_n_f32(dx)), fsum);
                    *acc = vfmaq_f32(*acc, mv, vdupq_n_f32(sx));
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: `o[4 c..]` holds at least 4 f32s; NEON as required.
            unsafe { vst1q_f32(o[4 * c..].as_mut_ptr(), *a) };
        }
    }
}
