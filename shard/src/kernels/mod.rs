//! Packed quantized matrix products for [`WeightMode::Fast`](crate::WeightMode::Fast).
//!
//! candle 0.11 has no fast CPU kernel for Q4_1 (the type most small GGUF
//! files ship), and its Q8_0 kernels only use AVX-512 VNNI when the inner
//! dimension is a multiple of 256 (576, this model's width, is not). This
//! module keeps a weight matrix in one layout for all of them and multiplies
//! it with int8 dot products:
//!
//! - rows are grouped into tiles of 16, the inner dimension into blocks of 32;
//! - each (row, block) stores unsigned quants `u` (4 or 8 bits), a scale `d`
//!   and an offset `m`, so that the weight is `d * u + m`. Q4_1 maps onto this
//!   exactly (`u` = nibble), Q4_0 with `m = -8 d`, Q8_0 with `u = q + 128`,
//!   `m = -128 d`, Q4_K with `d = d·sc`, `m = -dmin·mn` per sub-block of
//!   32 (those products rounded to f16); any other type is dequantized and
//!   stored as 8-bit asymmetric quants (a small, measured change);
//! - activations are quantized per block of 32 to int8 with a scale, as ggml
//!   and candle do for every quantized product (candle's Q4_1 path uses Q8_1
//!   activations, the same numbers), so the result differs from candle's
//!   only by float rounding order.
//!
//! Six SIMD kernels run this layout, chosen at run time ([`kernel_path`],
//! forced by the `POLLEN_KERNEL` environment variable): AMX (`tdpbsud` tiles
//! for products of several rows, `amx.rs`), AVX-512 VNNI (`vpdpbusd`,
//! `avx512.rs`), AVX-VNNI (`vpdpbusd` on 256-bit registers, `avxvnni.rs`),
//! AVX2 (`vpmaddubsw` + `vpmaddwd`, `avx2.rs`) and, on aarch64, NEON with
//! the dot-product extension (`sdot`) and without it (`smull` and pairwise
//! adds; both in `neon.rs`), the crate's five files of unsafe code. Where
//! none runs,
//! [`PackedMatrix::pack`] returns `None` and the caller keeps candle's
//! kernels. Per output value, every path computes the same exact integer sum
//! per block and then the same two fused multiply-adds in the same order, so
//! the SIMD kernels and the scalar path here (the tests' reference) give
//! bit-identical results. This file packs and dispatches, in safe code.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use half::f16;
use std::sync::{Mutex, OnceLock, PoisonError};

mod path;
pub(crate) use path::no_dense_products;
pub use path::{
    KERNEL_ENV, KernelPath, active_path, candle_kernels_run, dense_products_run, kernel_path,
    simd_available,
};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avxvnni;

#[cfg(target_arch = "aarch64")]
mod neon;

/// A kernel module for another architecture: `$module::$proof`, each proof
/// that this CPU runs one of its kernels, can never be made, so the dispatch
/// that names it compiles and never reaches it.
macro_rules! absent_kernel {
    ($module:ident, $kernel:literal, $arch:literal, $($proof:ident),+) => {
        #[doc = concat!("Off ", $arch, " there is no ", $kernel, " kernel: no proof of one can be made.")]
        mod $module {
            use super::{Activations, PackedMatrix, TILE};
            $(
            #[doc = concat!("Proof that this CPU runs a ", $kernel, " kernel; none can exist here.")]
            #[derive(Debug, Clone, Copy)]
            pub(super) enum $proof {}

            impl $proof {
                #[doc = concat!("Never found off ", $arch, ".")]
                pub(super) fn detect() -> Option<Self> {
                    None
                }

                /// Unreachable: no proof exists.
                #[allow(dead_code, reason = "NEON without `sdot` has no peak to time")]
                pub(super) fn dot_peak(self) -> f64 {
                    match self {}
                }

                /// Unreachable: no proof exists.
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
            )+
        }
    };
}

#[cfg(not(target_arch = "aarch64"))]
absent_kernel!(neon, "NEON", "aarch64", Neon, NeonDot);
#[cfg(not(target_arch = "x86_64"))]
absent_kernel!(avx512, "AVX-512 VNNI", "x86-64", Vnni);
#[cfg(not(target_arch = "x86_64"))]
absent_kernel!(avxvnni, "AVX-VNNI", "x86-64", AvxVnni);

/// Off x86-64 there is no AMX kernel: no proof of one can be made.
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use super::{Activations, PackedMatrix, TILE};

    /// Proof that this CPU runs the AMX kernel; none can exist here.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Amx {}

    /// Off x86-64 there is no AMX to grant.
    pub(super) fn granted() -> bool {
        false
    }

    impl Amx {
        /// Never found off x86-64.
        pub(super) fn detect() -> Option<Self> {
            None
        }

        /// Unreachable: no `Amx` exists.
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

/// Off x86-64 there is no SIMD kernel: no proof of one can be made.
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::{Activations, PackedMatrix, TILE};

    /// Proof that this CPU runs the AVX2 kernel; none can exist here.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Avx2 {}

    impl Avx2 {
        /// Never found off x86-64.
        pub(super) fn detect() -> Option<Self> {
            None
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn dot_peak(self) -> f64 {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn zip_map(
            self,
            _: &[f32],
            _: &[f32],
            _: &mut [f32],
            _: impl Fn(f32, f32) -> f32,
        ) {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn lane_sums_heads<const H: usize>(
            self,
            _: [&[f32]; H],
            _: &[half::f16],
            _: usize,
            _: &mut [&mut [f32]; H],
        ) {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn weighted_sum_heads<const H: usize>(
            self,
            _: [&[f32]; H],
            _: &[half::f16],
            _: &mut [&mut [f32]; H],
        ) {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn scale_max(self, _: &mut [f32], _: f32) -> f32 {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn exp_below(self, _: &mut [f32], _: f32) {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn to_f16_row(self, _: &[f32], _: &mut [half::f16]) {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
        pub(super) fn quantize_row(self, _: &[f32], _: &mut [i8], _: &mut [f32], _: &mut [i32]) {
            match self {}
        }

        /// Unreachable: no `Avx2` exists.
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

/// A SIMD kernel, with the proof that this CPU runs it.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Amx(amx::Amx),
    Vnni(avx512::Vnni),
    AvxVnni(avxvnni::AvxVnni),
    Avx2(avx2::Avx2),
    NeonDot(neon::NeonDot),
    Neon(neon::Neon),
}

impl Kernel {
    /// The kernel of `path`, where this CPU runs it.
    fn of(path: KernelPath) -> Option<Self> {
        match path {
            KernelPath::Amx => amx::Amx::detect().map(Self::Amx),
            KernelPath::Avx512Vnni => avx512::Vnni::detect().map(Self::Vnni),
            KernelPath::AvxVnni => avxvnni::AvxVnni::detect().map(Self::AvxVnni),
            KernelPath::Avx2 => avx2::Avx2::detect().map(Self::Avx2),
            KernelPath::NeonDot => neon::NeonDot::detect().map(Self::NeonDot),
            KernelPath::Neon => neon::Neon::detect().map(Self::Neon),
            KernelPath::None => None,
        }
    }

    /// The kernel of this process's [`kernel_path`].
    fn active() -> Option<Self> {
        static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
        *KERNEL.get_or_init(|| Self::of(kernel_path()))
    }

    fn tile(self, w: &PackedMatrix, t: usize, act: &Activations, out: &mut [[f32; TILE]]) {
        match self {
            Self::Amx(k) => k.tile(w, t, act, out),
            Self::Vnni(k) => k.tile(w, t, act, out),
            Self::AvxVnni(k) => k.tile(w, t, act, out),
            Self::Avx2(k) => k.tile(w, t, act, out),
            Self::NeonDot(k) => k.tile(w, t, act, out),
            Self::Neon(k) => k.tile(w, t, act, out),
        }
    }

    /// [`dot_peak`] for this kernel; `None` for AMX and NEON without `sdot`.
    fn dot_peak(self) -> Option<f64> {
        match self {
            Self::Vnni(k) => Some(k.dot_peak()),
            Self::AvxVnni(k) => Some(k.dot_peak()),
            Self::Avx2(k) => Some(k.dot_peak()),
            Self::NeonDot(k) => Some(k.dot_peak()),
            Self::Amx(_) | Self::Neon(_) => None,
        }
    }
}

/// Rounds of [`dot_peak`]'s loops: 12 or 16 instructions each, a few
/// milliseconds in all.
const PEAK_ROUNDS: usize = 1 << 20;

/// Billions of multiply-adds a second of `run` (which does `per_round`
/// of them a round, [`PEAK_ROUNDS`] rounds): the best of three runs.
fn peak_of(per_round: usize, run: impl Fn(usize)) -> f64 {
    (0..3)
        .map(|_| {
            let t0 = std::time::Instant::now();
            run(PEAK_ROUNDS);
            (per_round * PEAK_ROUNDS) as f64 / t0.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// What the multiply instruction of this process's kernel path does by
/// itself on one thread, in billions of multiply-adds a second: sixteen
/// independent sums in registers (twelve in AVX2's sixteen), no loads,
/// nothing else (`vpdpbusd` on 512- or 256-bit registers for AVX-512 VNNI
/// and AVX-VNNI, `vpmaddubsw` into 16-bit sums for AVX2, `sdot` for NEON).
/// The packed product's other operations (unpacking, scales, sums) share
/// the same vector units, so this is a ceiling its many-row figures
/// approach, not one they reach. `None` for AMX, NEON without `sdot` and
/// where no kernel runs.
pub fn dot_peak() -> Option<f64> {
    Kernel::active()?.dot_peak()
}

/// AVX2 for attention's float loops, where the CPU has it (whatever the
/// packed kernel path): the same operations as the scalar loops, so the
/// same bits on every CPU.
fn float_simd() -> Option<avx2::Avx2> {
    static F: OnceLock<Option<avx2::Avx2>> = OnceLock::new();
    *F.get_or_init(avx2::Avx2::detect)
}

/// AVX-512 for attention's weighted sums, where the packed kernel path is
/// an AVX-512 one (AMX or AVX-512 VNNI: `POLLEN_KERNEL=avx2` or `avx-vnni`
/// keeps every loop in AVX2, so those paths are tested whole on any CPU).
/// Each element takes the scalar loop's steps whatever the lanes: the same
/// bits as the AVX2 and scalar loops.
#[cfg(target_arch = "x86_64")]
fn float512() -> Option<avx512::Float16> {
    static F: OnceLock<Option<avx512::Float16>> = OnceLock::new();
    *F.get_or_init(|| match kernel_path() {
        KernelPath::Amx | KernelPath::Avx512Vnni => avx512::Float16::detect(),
        _ => None,
    })
}

/// `h` as f32, exactly (the same value as `f16::to_f32` and the CPUs'
/// conversion instructions, NaN to NaN), in branch-free integer and float
/// steps that a compiler can vectorize: where no SIMD code reads the f16
/// keys and values (aarch64), the plain loops stay vector loops rather than
/// one conversion call a value.
#[inline]
pub(crate) fn widen(h: f16) -> f32 {
    let h = u32::from(h.to_bits());
    let bits = (h & 0x7fff) << 13;
    // Exponent and mantissa moved into f32's places; times 2^112 rebiases a
    // normal value and makes a subnormal one normal, both exactly.
    let magnitude = if h & 0x7c00 == 0x7c00 {
        f32::from_bits(bits | 0x7f80_0000)
    } else {
        f32::from_bits(bits) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

/// Dot products of `a` with several f16 vectors in eight lanes: lane `l`
/// adds `a[8c + l] · b_j[8c + l]` for `c = 0, 1, ..` in order, from 0 (the
/// f16 value widened to f32, exactly; a multiply, then an add), and
/// `out[j]` is `lane 0 + lane 1 + .. + lane 7` in that order, where `b_j` is
/// `b[j * stride..]`, for `a.len()` a multiple of 8 (values past the last
/// multiple of 8 are the caller's). `b` must hold `out.len()` such vectors.
/// The reference of [`lane_sums_heads`], whose every path gives these bits.
fn lane_sums_scalar(a: &[f32], b: &[f16], stride: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = [0f32; 8];
        let bj = &b[j * stride..j * stride + a.len()];
        for (x, y) in a.chunks_exact(8).zip(bj.chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += x[l] * widen(y[l]);
            }
        }
        *o = acc[1..].iter().fold(acc[0], |s, &x| s + x);
    }
}

/// `y += p[j] · x_j` for `j = 0, 1, ..` in order, element by element (the
/// f16 value widened to f32, exactly; a multiply, then an add), where
/// `x_j` is `x[j * y.len()..]` (`x` holds `p.len()` of them). The reference
/// of [`weighted_sum_heads`], whose every path gives these bits.
fn weighted_sum_scalar(p: &[f32], x: &[f16], y: &mut [f32]) {
    weighted_sum_from(p, x, y, 0);
}

/// [`weighted_sum_scalar`] of elements `from..` of `y` only: the SIMD
/// loops' last elements, past their whole vectors.
fn weighted_sum_from(p: &[f32], x: &[f16], y: &mut [f32], from: usize) {
    let d = y.len();
    for (j, &pj) in p.iter().enumerate() {
        for (y, &x) in y[from..].iter_mut().zip(&x[j * d + from..(j + 1) * d]) {
            *y += pj * widen(x);
        }
    }
}

/// [`lane_sums_scalar`] of `H` (1 to 3) query vectors of one length over
/// the same vectors `b` (`out[h]` gets `a[h]`'s; values past the last
/// multiple of 8 of the length are left out): the same bits as one at a time,
/// with each of `b`'s values widened once for all of them.
pub(crate) fn lane_sums_heads<const H: usize>(
    a: [&[f32]; H],
    b: &[f16],
    stride: usize,
    out: &mut [&mut [f32]; H],
) {
    let a = a.map(|a| &a[..a.len() / 8 * 8]);
    match float_simd() {
        Some(k) => k.lane_sums_heads(a, b, stride, out),
        None => {
            for (a, out) in a.iter().zip(out.iter_mut()) {
                lane_sums_scalar(a, b, stride, out);
            }
        }
    }
}

/// [`weighted_sum_scalar`] of `H` (1 to 3) heads' weights `p` over the same
/// vectors `x` (`y[h]` gets `p[h]`'s): the same bits as one at a time, with
/// each of `x`'s values widened once for all of them.
pub(crate) fn weighted_sum_heads<const H: usize>(
    p: [&[f32]; H],
    x: &[f16],
    y: &mut [&mut [f32]; H],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = float512() {
        return k.weighted_sum_heads(p, x, y);
    }
    match float_simd() {
        Some(k) => k.weighted_sum_heads(p, x, y),
        None => {
            for (p, y) in p.iter().zip(y.iter_mut()) {
                weighted_sum_scalar(p, x, y);
            }
        }
    }
}

/// Multiplies every score of `s` by `scale`, in place, and returns the
/// largest (NaNs left out; -inf where there is none). Each product is one
/// IEEE multiply and a maximum is exact, so the lanes a CPU takes them in
/// change no bit.
pub(crate) fn scale_max(s: &mut [f32], scale: f32) -> f32 {
    match float_simd() {
        Some(k) => k.scale_max(s, scale),
        None => scale_max_plain(s, scale),
    }
}

/// [`scale_max`] in plain code that a compiler vectorises: eight running
/// maxima, each a compare and a select (`maxps`' own semantics, where a NaN
/// score keeps the running value).
#[inline(always)]
fn scale_max_plain(s: &mut [f32], scale: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = s.chunks_exact_mut(8);
    for c in &mut chunks {
        for (x, m) in c.iter_mut().zip(&mut m) {
            *x *= scale;
            *m = if *x > *m { *x } else { *m };
        }
    }
    for x in chunks.into_remainder() {
        *x *= scale;
        m[0] = if *x > m[0] { *x } else { m[0] };
    }
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// `s[i] = e^(s[i] - max)` for every score, with attention's own
/// exponential (plain IEEE operations: the same bits in any lanes).
pub(crate) fn exp_below(s: &mut [f32], max: f32) {
    match float_simd() {
        Some(k) => k.exp_below(s, max),
        None => exp_below_plain(s, max),
    }
}

/// [`exp_below`] in plain code that a compiler vectorises.
#[inline(always)]
fn exp_below_plain(s: &mut [f32], max: f32) {
    s.iter_mut()
        .for_each(|x| *x = crate::attention::exp(*x - max));
}

/// `dst[i]` = [`to_f16`](crate::llama::cache::to_f16)`(src[i])`, as the
/// f16 KV cache keeps a value (saturated at ±65504, rounded to nearest even,
/// NaN kept), eight at a time where the CPU has AVX2 and F16C (the
/// conversion instruction `half` itself uses there: the same bits as one at
/// a time).
pub(crate) fn to_f16_row(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f16 row length");
    match float_simd() {
        Some(k) => k.to_f16_row(src, dst),
        None => to_f16_plain(src, dst),
    }
}

/// [`to_f16_row`] one value at a time.
fn to_f16_plain(src: &[f32], dst: &mut [f16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = crate::llama::cache::to_f16(s);
    }
}

/// `dst[i] = f(a[i], b[i])` for every value: a norm's or a gate's
/// elementwise step, in AVX2's lanes where the CPU has them. `f` must be
/// plain IEEE arithmetic without calls, so that every lane count gives the
/// same bits and the loop vectorises.
pub(crate) fn zip_map(a: &[f32], b: &[f32], dst: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    match float_simd() {
        Some(k) => k.zip_map(a, b, dst, f),
        None => zip_map_plain(a, b, dst, f),
    }
}

/// [`zip_map`] in plain code that a compiler vectorises.
#[inline(always)]
fn zip_map_plain(a: &[f32], b: &[f32], dst: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
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
        if parts
            .iter()
            .any(|p| p.k != first.k || p.bits != first.bits || !p.n.is_multiple_of(TILE))
        {
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

    /// Whether a matrix of stored type `dtype`, `n` rows of `k` columns, has
    /// a packed form: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q4_K (columns in
    /// multiples of 256), Q5_K or Q6_K, rows in multiples of 16, columns of
    /// 32. The same on every CPU; [`Self::pack_any`] packs exactly these.
    pub fn has_packed_form(dtype: GgmlDType, n: usize, k: usize) -> bool {
        use GgmlDType as D;
        let typed = match dtype {
            D::Q4K => k.is_multiple_of(256),
            D::Q4_0 | D::Q4_1 | D::Q5_0 | D::Q5_1 | D::Q8_0 | D::Q8_1 | D::Q5K | D::Q6K => true,
            _ => false,
        };
        typed && n > 0 && k > 0 && n.is_multiple_of(TILE) && k.is_multiple_of(BLOCK)
    }

    /// Packs a 2-d CPU `QTensor`, or returns `None` when it has no packed
    /// form ([`Self::has_packed_form`]) or no SIMD kernel runs here
    /// ([`kernel_path`] is [`KernelPath::None`]).
    pub fn pack(q: &QTensor) -> candle_core::Result<Option<Self>> {
        if Kernel::active().is_none() {
            return Ok(None);
        }
        Self::pack_any(q)
    }

    /// [`Self::pack`] without the CPU check (for tests of the scalar path).
    pub fn pack_any(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let Ok((n, k)) = q.shape().dims2() else {
            return Ok(None);
        };
        if !Self::has_packed_form(q.dtype(), n, k) || !q.device().is_cpu() {
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
            GgmlDType::Q4K => {
                // Super-blocks of 256: f16 `d` and `dmin`, 12 bytes of 6-bit
                // sub-block scales and mins, 128 bytes of nibbles. Sub-block
                // `s` (32 values) is the low (even `s`) or high nibbles of
                // bytes `32 (s / 2)..`, weight `d·sc·u − dmin·mn`. The
                // products are kept as f16 (within 2⁻¹¹ of candle's f32).
                // Columns in multiples of 256: `has_packed_form`.
                let raw = q.data()?;
                let supers = k / 256;
                Self::build(n, k, Bits::Four, |r, b| {
                    let at = (r * supers + b / 8) * 144;
                    let blk = &raw[at..at + 144];
                    let (d, dmin) = (f16_at(blk, 0).to_f32(), f16_at(blk, 2).to_f32());
                    let sc = &blk[4..16];
                    let s = b % 8;
                    let (scale, min) = if s < 4 {
                        (sc[s] & 63, sc[s + 4] & 63)
                    } else {
                        (
                            (sc[s + 4] & 0x0F) | ((sc[s - 4] >> 6) << 4),
                            (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4),
                        )
                    };
                    let qs = &blk[16 + 32 * (s / 2)..16 + 32 * (s / 2) + 32];
                    let mut u = [0u8; BLOCK];
                    for (u, &q) in u.iter_mut().zip(qs) {
                        *u = if s % 2 == 0 { q & 0x0F } else { q >> 4 };
                    }
                    RowBlock {
                        d: f16::from_f32(d * f32::from(scale)),
                        m: f16::from_f32(-(dmin * f32::from(min))),
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
    ///
    /// # Panics
    /// Where `n` is not a multiple of 16, `k` not a positive multiple of 32,
    /// or `w` not `n · k` values long: the shapes the packed layout has.
    pub fn from_dense(w: &[f32], n: usize, k: usize) -> Self {
        assert!(
            n.is_multiple_of(TILE) && k > 0 && k.is_multiple_of(BLOCK),
            "a packed matrix has rows in multiples of {TILE} and columns of {BLOCK}: ({n}, {k})"
        );
        assert_eq!(
            n.checked_mul(k),
            Some(w.len()),
            "values of a ({n}, {k}) matrix"
        );
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

    /// Row `r`'s blocks in order, as packed: `f(d, m, quants)` with the
    /// block's scale and offset and its 32 quants (4-bit ones as 0..=15,
    /// 8-bit ones as 0..=255), exactly what the row was packed from.
    pub(crate) fn row_blocks(&self, r: usize, mut f: impl FnMut(f16, f16, &[u8; BLOCK])) {
        assert!(r < self.n, "row {r} of a matrix of {} rows", self.n);
        let kb = self.k / BLOCK;
        let per = 1 + self.bits.q_lines();
        let (t, lane) = (r / TILE, r % TILE);
        for b in 0..kb {
            let base = (t * kb + b) * per;
            let scales = &self.lines[base].0;
            let mut u = [0u8; BLOCK];
            for j in 0..4 {
                let at = 4 * lane + j;
                match self.bits {
                    Bits::Four => {
                        for i in 0..4 {
                            let byte = self.lines[base + 1 + i].0[at];
                            u[4 * i + j] = byte & 0x0F;
                            u[16 + 4 * i + j] = byte >> 4;
                        }
                    }
                    Bits::Eight => {
                        for g in 0..8 {
                            u[4 * g + j] = self.lines[base + 1 + g].0[at];
                        }
                    }
                }
            }
            f(f16_at(scales, 2 * lane), f16_at(scales, 32 + 2 * lane), &u);
        }
    }

    /// `dst (m, n) = x (m, k) · selfᵀ`, on candle's CPU thread pool.
    pub fn matmul(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        self.matmul_on(Kernel::active(), x, m, dst);
    }

    /// [`Self::matmul`] on `kernel`, or on the scalar path for `None`.
    fn matmul_on(&self, kernel: Option<Kernel>, x: &[f32], m: usize, dst: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "lhs length");
        let act = Activations::quantize(x, m, self.k);
        self.product(kernel, &act, dst, &mut Vec::new(), false);
    }

    /// `dst (m, n) = act · selfᵀ` (or `+=` with `accumulate`) for quantized
    /// activations, on candle's CPU thread pool. `scratch` holds the
    /// tile-major results between calls (reused, so a step allocates once).
    /// The value added to `dst` is the one [`Self::matmul`] stores, so a
    /// residual added here has the bits of a separate addition.
    pub(crate) fn matmul_quantized(
        &self,
        act: &Activations,
        dst: &mut [f32],
        scratch: &mut Vec<[f32; TILE]>,
        accumulate: bool,
    ) {
        self.product(Kernel::active(), act, dst, scratch, accumulate);
    }

    fn product(
        &self,
        kernel: Option<Kernel>,
        act: &Activations,
        dst: &mut [f32],
        tiles: &mut Vec<[f32; TILE]>,
        accumulate: bool,
    ) {
        let m = act.rows;
        assert_eq!(act.k, self.k, "activation width");
        assert_eq!(dst.len(), m * self.n, "dst length");
        let n_tiles = self.n / TILE;
        if m == 0 || n_tiles == 0 {
            return;
        }
        let pool = candle_core::utils::barrier_pool();
        if n_tiles * m < 64 || pool.n_workers() == 0 {
            // On this thread: each tile's rows into a buffer that stays in
            // L1, then straight to their places in `dst`.
            tiles.clear();
            tiles.resize(m, [0f32; TILE]);
            for t in 0..n_tiles {
                match kernel {
                    Some(k) => k.tile(self, t, act, tiles),
                    None => self.tile_scalar(t, act, tiles),
                }
                self.put(t, tiles, dst, accumulate);
            }
            return;
        }
        // Tile-major results: tile `t`'s 16 columns of every row at `t * m..`,
        // one slot per tile, so workers write disjoint slots without sharing.
        tiles.clear();
        tiles.resize(n_tiles * m, [0f32; TILE]);
        {
            let work = |slots: &[Mutex<&mut [[f32; TILE]]>], range: std::ops::Range<usize>| {
                for t in range {
                    // Each tile is handed to one worker: the lock is never contended.
                    let mut out = slots[t].lock().unwrap_or_else(PoisonError::into_inner);
                    match kernel {
                        Some(k) => k.tile(self, t, act, &mut out),
                        None => self.tile_scalar(t, act, &mut out),
                    }
                }
            };
            let slots: Vec<Mutex<&mut [[f32; TILE]]>> =
                tiles.chunks_exact_mut(m).map(Mutex::new).collect();
            pool.execute_chunked(n_tiles, |r| work(&slots, r));
        }
        for (t, out) in tiles.chunks_exact(m).enumerate() {
            self.put(t, out, dst, accumulate);
        }
    }

    /// Tile `t`'s rows `out` into their columns of `dst` (rows `n` wide),
    /// added to what is there where `accumulate`.
    fn put(&self, t: usize, out: &[[f32; TILE]], dst: &mut [f32], accumulate: bool) {
        for (row, o) in out.iter().enumerate() {
            let d = &mut dst[row * self.n + t * TILE..][..TILE];
            if accumulate {
                d.iter_mut().zip(o).for_each(|(d, o)| *d += o);
            } else {
                d.copy_from_slice(o);
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
                    // The SIMD kernels' steps: two fused multiply-adds.
                    *o = (d * dx).mul_add(isum as f32, *o);
                    *o = m.mul_add(sx, *o);
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

/// Activations quantized per block of 32: int8 values, scales `d`,
/// `s = d * sum(q)` for the weights' offsets, and `sum(q)` itself (the AVX2
/// kernel's 8-bit path adds `128 * sum(q)` back to its signed products).
#[derive(Default)]
pub(crate) struct Activations {
    rows: usize,
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    sum: Vec<i32>,
    /// One row before quantization (for [`Self::quantize_rows_with`]).
    row: Vec<f32>,
    /// Where the AMX kernel runs and there are 2 to [`STACK_ROWS`] rows: the
    /// quants as the tile unit's left-hand tiles of two blocks at once, so
    /// that one tile load and one tile product serve both. Pair `p` (blocks
    /// `2p` and `2p + 1`) has `2 · rows` lines from line `2p · rows`: line
    /// `i` holds row `i`'s block `2p` in its first 32 bytes, line `rows + i`
    /// row `i`'s block `2p + 1` in its last 32, zeros elsewhere (a missing
    /// last block is zeros). Empty otherwise.
    stacked: Vec<Line>,
}

/// Rows up to which [`Activations`] are stacked for the AMX kernel: two
/// blocks of that many rows fill its 16-row tiles.
pub(crate) const STACK_ROWS: usize = 8;

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let mut a = Self::default();
        a.quantize_rows_with(m, k, |i, row| row.copy_from_slice(&x[i * k..(i + 1) * k]));
        a
    }

    /// Quantizes `m` rows of width `k` (a multiple of 32), row `i` written
    /// by `fill(i, row)` first: a norm or a gate fused into the
    /// quantization, without a tensor in between. Reuses this value's
    /// buffers. Row by row, so each row's quants are those of the whole.
    pub(crate) fn quantize_rows_with(
        &mut self,
        m: usize,
        k: usize,
        mut fill: impl FnMut(usize, &mut [f32]),
    ) {
        // Every path quantizes whole blocks: the same refusal on every CPU.
        assert!(
            k.is_multiple_of(BLOCK),
            "rows of {k} values are not whole blocks"
        );
        let kb = k / BLOCK;
        self.rows = m;
        self.k = k;
        self.q.resize(m * k, 0);
        self.d.resize(m * kb, 0.0);
        self.s.resize(m * kb, 0.0);
        self.sum.resize(m * kb, 0);
        self.row.resize(k, 0.0);
        for i in 0..m {
            fill(i, &mut self.row);
            let at = i * kb..(i + 1) * kb;
            let qs = &mut self.q[i * k..(i + 1) * k];
            let (scales, sums) = (&mut self.d[at.clone()], &mut self.sum[at.clone()]);
            match float_simd() {
                Some(simd) => simd.quantize_row(&self.row, qs, scales, sums),
                None => quantize_row_scalar(&self.row, qs, scales, sums),
            }
            for ((d, s), &sum) in scales.iter_mut().zip(&mut self.s[at]).zip(sums.iter()) {
                let scale = f16::from_f32(*d).to_f32();
                *d = scale;
                *s = scale * sum as f32;
            }
        }
        self.stacked.clear();
        let amx = matches!(Kernel::active(), Some(Kernel::Amx(_)));
        if amx && kb > 0 && (2..=STACK_ROWS).contains(&m) {
            self.stacked.resize(kb.div_ceil(2) * 2 * m, Line([0; 64]));
            for (i, row) in self.q.chunks_exact(k).enumerate() {
                for (b, quants) in row.chunks_exact(BLOCK).enumerate() {
                    let line = &mut self.stacked[(b / 2) * 2 * m + (b % 2) * m + i].0;
                    let half = &mut line[(b % 2) * BLOCK..][..BLOCK];
                    half.iter_mut().zip(quants).for_each(|(d, &q)| *d = q as u8);
                }
            }
        }
    }
}

/// Quantizes one row per block of 32 as ggml's (and candle's) Q8_0/Q8_1
/// activations: scale `amax / 127` (into `scales`, not yet rounded to f16),
/// values rounded half away from zero; the sum of each block's quants into
/// `sums`. The SIMD path gives the same bits.
fn quantize_row_scalar(xs: &[f32], qs: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let blocks = xs.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK));
    for ((xs, qs), (scale, total)) in blocks.zip(scales.iter_mut().zip(sums.iter_mut())) {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(xs) {
            let x = v * inv;
            let r = (x + 0.5f32.copysign(x)).clamp(-127.0, 127.0) as i8;
            sum += i32::from(r);
            *q = r;
        }
        *scale = d;
        *total = sum;
    }
}

#[cfg(test)]
mod tests;
