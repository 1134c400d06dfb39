//! The AMX kernel of [`PackedMatrix`], for several activation rows at once
//! (a batch of sessions' decode steps, a prefill): Intel's tile matrix unit
//! (`tdpbsud`, AMX-INT8) computes a block's integer sums for up to 16 rows
//! and 16 output columns in one instruction, where the AVX-512 kernel needs
//! eight `vpdpbusd` per row. The packed layout already is AMX's: a block's
//! eight 8-bit quant lines are the right-hand tile (4-bit lines are split
//! into nibbles first). Integer sums are exact, and the float steps after
//! them are the AVX-512 kernel's, in its order, so every path still gives the
//! same bits. One row runs on the AVX-512 kernel: it is bound by reading the
//! weights, which the tile unit does not speed up. For 2 to 8 rows (a batch
//! of sessions' decode steps) one product takes two blocks, the activations
//! stacked beforehand ([`Activations`]): the tile loads, not the products,
//! bound the one-block loop (in a loop of loads, products and stores alone,
//! about 19 ns a block one at a time against 11 two at a time, on a
//! Sapphire Rapids under KVM).
//!
//! Stable Rust has no AMX intrinsics, so the tile instructions are inline
//! assembly; Linux hands out AMX only to a process that asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`granted`] does once, and
//! only where the AMX path could be chosen. Before its tile instructions, a
//! product checks the tile configuration in force on its thread (see
//! [`configure`]), so no shape left behind by other code is trusted. With
//! the other kernel files, this is the crate's only unsafe code.
#![allow(unsafe_code)]

use super::avx512::Vnni;
use super::{Activations, BLOCK, Bits, PackedMatrix, STACK_ROWS, TILE};
use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Rows at which the tile unit takes over from the AVX-512 kernel.
pub(super) const MIN_ROWS: usize = 2;

/// Proof that this CPU has AMX-TILE and AMX-INT8, that Linux granted this
/// process their state, and that the AVX-512 kernel runs too.
#[derive(Debug, Clone, Copy)]
pub(super) struct Amx(Vnni);

impl Amx {
    /// The proof, where [`super::path::cpu`] found AMX and Linux grants it.
    pub(super) fn detect() -> Option<Self> {
        if !super::path::cpu().amx || !granted() {
            return None;
        }
        Vnni::detect().map(Self)
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
        if out.len() < MIN_ROWS {
            return self.0.tile(w, t, act, out);
        }
        if !act.stacked.is_empty() && out.len() == act.rows {
            // SAFETY: as below; `rows` checks that `act` is stacked for
            // exactly its rows.
            unsafe {
                match out.len() {
                    8 => return rows::<8>(w, t, act, 0, out, true),
                    7 => return rows::<7>(w, t, act, 0, out, true),
                    6 => return rows::<6>(w, t, act, 0, out, true),
                    5 => return rows::<5>(w, t, act, 0, out, true),
                    4 => return rows::<4>(w, t, act, 0, out, true),
                    3 => return rows::<3>(w, t, act, 0, out, true),
                    2 => return rows::<2>(w, t, act, 0, out, true),
                    _ => {}
                }
            }
        }
        let mut row = 0;
        while row < out.len() {
            // Chunks of 16 rows, never leaving one row alone (17 = 15 + 2).
            let left = out.len() - row;
            let r = if left == 17 { 15 } else { left.min(16) };
            let o = &mut out[row..row + r];
            // SAFETY: an `Amx` is only made where the CPU has AMX-TILE,
            // AMX-INT8 and the AVX-512 kernel's features and Linux granted
            // the tile state; `rows` loads its own tile configuration and
            // checks its own bounds.
            unsafe {
                match r {
                    16 => rows::<16>(w, t, act, row, o, false),
                    15 => rows::<15>(w, t, act, row, o, false),
                    14 => rows::<14>(w, t, act, row, o, false),
                    13 => rows::<13>(w, t, act, row, o, false),
                    12 => rows::<12>(w, t, act, row, o, false),
                    11 => rows::<11>(w, t, act, row, o, false),
                    10 => rows::<10>(w, t, act, row, o, false),
                    9 => rows::<9>(w, t, act, row, o, false),
                    8 => rows::<8>(w, t, act, row, o, false),
                    7 => rows::<7>(w, t, act, row, o, false),
                    6 => rows::<6>(w, t, act, row, o, false),
                    5 => rows::<5>(w, t, act, row, o, false),
                    4 => rows::<4>(w, t, act, row, o, false),
                    3 => rows::<3>(w, t, act, row, o, false),
                    2 => rows::<2>(w, t, act, row, o, false),
                    _ => unreachable!("chunks hold 2 to 16 rows"),
                }
            }
            row += r;
        }
    }
}

/// Whether this CPU reports AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits
/// 24 and 25). Asks the OS nothing.
pub(super) fn present() -> bool {
    let edx = __cpuid_count(7, 0).edx;
    edx & (3 << 24) == 3 << 24
}

/// Whether Linux grants this process the AMX tile state, asking once (the
/// grant holds for every thread), where [`present`].
pub(super) fn granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| present() && request_permission())
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    /// `arch_prctl` code that asks for an extended state component.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    /// The AMX tile data component.
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments, no memory passed.
    // Its effects are process-wide: AMX instructions may run, and signal
    // frames grow by the tile state (Linux refuses the request where a
    // thread's alternate signal stack is too small for that, and afterwards
    // refuses such stacks; std sizes its own from AT_MINSIGSTKSZ, which
    // already counts the tile state).
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r != 0 {
        tracing::info!(
            error = %std::io::Error::last_os_error(),
            "this CPU has AMX but Linux did not grant it; the AVX-512 kernel runs"
        );
    }
    r == 0
}

/// Other systems: not asked, so not used.
#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// The tile configuration for `r` activation rows. One block at a time:
/// tile 0 holds a block's activations (`r` rows of 32 bytes), tile 1 its
/// weights (8 rows of 64 bytes: 16 columns of 4 bytes), tile 2 their
/// integer sums (`r` rows of 16 `i32`). Two blocks at a time (`stacked`,
/// see [`Activations`]): tile 0 holds both blocks' activations (`2r` rows
/// of 64 bytes, each block's against zeros), tile 1 both blocks' weights
/// (16 rows), tile 2 the sums of the first block over those of the second
/// (`2r` rows).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new(r: u8, stacked: bool) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let tiles: [(u16, u8); 3] = if stacked {
            [(64, 2 * r), (64, 16), (64, 2 * r)]
        } else {
            [(32, r), (64, 8), (64, r)]
        };
        for (i, (colsb, rows)) in tiles.into_iter().enumerate() {
            c[16 + 2 * i..18 + 2 * i].copy_from_slice(&colsb.to_le_bytes());
            c[48 + i] = rows;
        }
        Self(c)
    }
}

/// Makes this thread's tile configuration the one for `r` rows. Reads the
/// configuration in force (`sttilecfg`, a few nanoseconds) rather than
/// trusting a record of it, so whatever ran on this thread before (a release,
/// another shape) is seen, and loads `r`'s only where it differs (`ldtilecfg`
/// costs about 90 ns, a tenth of a small product's tile). The tiles stay
/// configured after; Linux saves their state on a context switch.
///
/// # Safety
/// The CPU must have AMX-TILE and Linux must have granted its state.
unsafe fn configure(r: u8, stacked: bool) {
    let want = Config::new(r, stacked);
    let mut now = Config([0; 64]);
    // SAFETY: `now` is 64 writable bytes; the caller vouches for AMX.
    unsafe { asm!("sttilecfg [{0}]", in(reg) now.0.as_mut_ptr(), options(nostack)) };
    if now.0 != want.0 {
        // SAFETY: `want` is 64 valid bytes; the caller vouches for AMX.
        unsafe {
            asm!(
                "ldtilecfg [{0}]",
                in(reg) want.0.as_ptr(),
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, readonly),
            )
        };
    }
}

/// Blocks whose integer sums the tile unit computes ahead of the float steps.
const CHUNK: usize = 8;

/// Blocks ahead of the tile unit that the weights are prefetched.
const AHEAD: usize = 32;

/// 64-byte-aligned scratch lines.
#[repr(C, align(64))]
struct Lines<const N: usize>([[u8; 64]; N]);

/// Integer sums of two chunks (one being written by the tile unit while the
/// float steps read the other), 16 `i32` a line: of chunk parity `p`, block
/// `j` of the chunk and row `r` (of `R`) at line `p · 16 · CHUNK + j · R + r`.
#[allow(dead_code)]
#[repr(C, align(64))]
struct Sums([[[i32; TILE]; 16 * CHUNK]; 2]);

/// Computes tile `t` (16 output columns) for activation rows `row..row+R`.
///
/// A three-stage pipeline over chunks of [`CHUNK`] blocks: 4-bit quants of
/// chunk `c + 2` are split into 8-bit lines (and weights [`AHEAD`] blocks on
/// prefetched) while the tile unit computes chunk `c + 1`'s integer sums and
/// the vector unit runs chunk `c`'s float steps, so that no stage waits on
/// the one before: the tile unit cannot take data from stores still in
/// flight, nor the vector unit from tile stores.
///
/// `stacked` (`act` stacked for exactly these rows, see [`Activations`]):
/// the tile unit takes two blocks per product; otherwise one.
///
/// # Safety
/// The CPU must support AMX-TILE and AMX-INT8 (granted by Linux) and the
/// AVX-512 kernel's features; `2 <= R <= 16`.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn rows<const R: usize>(
    w: &PackedMatrix,
    t: usize,
    act: &Activations,
    row: usize,
    out: &mut [[f32; TILE]],
    stacked: bool,
) {
    let k = w.k;
    let kb = k / BLOCK;
    let per = 1 + w.bits.q_lines();
    let first = t * kb * per;
    // Bounds: every line read below is in `first..first + kb * per`; tile
    // loads of activations read rows `row..row+R`, 32 bytes each.
    let fits = |n: Option<usize>, len: usize| n.is_some_and(|n| n <= len);
    assert!((2..=16).contains(&R));
    assert!(fits(
        kb.checked_mul(per).and_then(|l| l.checked_add(first)),
        w.lines.len()
    ));
    let rows_end = row.checked_add(R);
    assert!(fits(rows_end.and_then(|e| e.checked_mul(k)), act.q.len()));
    assert!(fits(rows_end.and_then(|e| e.checked_mul(kb)), act.d.len()));
    assert!(fits(rows_end.and_then(|e| e.checked_mul(kb)), act.s.len()));
    assert!(out.len() >= R);
    // Stacked: pair `p`'s tile is lines `2pR..2pR + 2R` of `act.stacked`.
    assert!(
        !stacked
            || (row == 0
                && R == act.rows
                && R <= STACK_ROWS
                && Some(act.stacked.len()) == kb.div_ceil(2).checked_mul(2 * R))
    );
    // SAFETY: the caller vouches for AMX; nothing below changes the
    // configuration, so every tile instruction runs on this one.
    unsafe { configure(R as u8, stacked) };
    let chunk = Chunks {
        lines: w.lines[first..].as_ptr() as *const u8,
        per,
        four: w.bits == Bits::Four,
        kb,
        xq: act.q[row * k..].as_ptr(),
        k,
        stacked: stacked.then_some(act.stacked.as_ptr() as *const [u8; 64]),
        rows: R,
    };
    // Written before read, so not cleared (clearing 24 KB would cost a
    // third of a small product).
    let mut split = MaybeUninit::<Lines<{ 16 * CHUNK }>>::uninit();
    let mut sums = MaybeUninit::<Sums>::uninit();
    let split = split.as_mut_ptr() as *mut [u8; 64];
    let sums = sums.as_mut_ptr() as *mut [i32; TILE];
    let mut acc = [_mm512_setzero_ps(); R];
    let chunks = kb.div_ceil(CHUNK);
    for c in 0..chunks + 2 {
        // SAFETY: `split` holds two chunks' lines and `sums` two chunks'
        // sums, 64-byte aligned; the chunks exist; AMX as the caller vouches.
        unsafe {
            if c < chunks {
                chunk.fetch(c, split.add(8 * CHUNK * (c % 2)));
            }
            if (1..=chunks).contains(&c) {
                let p = (c - 1) % 2;
                chunk.integer_sums(c - 1, split.add(8 * CHUNK * p), sums.add(16 * CHUNK * p));
            }
        }
        if c < 2 {
            continue;
        }
        // SAFETY: `sums` holds two chunks.
        let done = unsafe { sums.add(16 * CHUNK * (c % 2)) };
        for (j, blk) in chunk.blocks(c - 2).enumerate() {
            // SAFETY: block `blk` is in bounds (asserted above), as are the
            // activation scales of rows `row..row+R`; unaligned loads need no
            // alignment; the tile unit wrote `done`'s rows of this block
            // (64-byte aligned) in the chunk's `integer_sums`.
            unsafe {
                let sc = _mm512_loadu_si512(chunk.block(blk) as *const __m512i);
                let dv = _mm512_cvtph_ps(_mm512_castsi512_si256(sc));
                let mv = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(sc));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let s = _mm512_load_si512(done.add(j * R + r) as *const __m512i);
                    let isum = _mm512_cvtepi32_ps(s);
                    let dx = *act.d.get_unchecked((row + r) * kb + blk);
                    let sx = *act.s.get_unchecked((row + r) * kb + blk);
                    *acc = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(dx)), isum, *acc);
                    *acc = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx), *acc);
                }
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` holds exactly 16 f32s.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
}

/// One weight tile's blocks and the activation rows they meet, in chunks.
struct Chunks {
    /// The tile's first line: `kb` blocks of `per` lines.
    lines: *const u8,
    per: usize,
    /// 4-bit quants (split into 8-bit lines before the tile unit reads them).
    four: bool,
    kb: usize,
    /// The first activation row's quants; rows are `k` apart.
    xq: *const i8,
    k: usize,
    /// The stacked activations ([`Activations`]), where the tile unit takes
    /// two blocks at a time.
    stacked: Option<*const [u8; 64]>,
    /// Activation rows.
    rows: usize,
}

impl Chunks {
    /// The blocks of chunk `c`.
    fn blocks(&self, c: usize) -> std::ops::Range<usize> {
        c * CHUNK..self.kb.min((c + 1) * CHUNK)
    }

    /// Block `blk`'s first line (its scales), for `blk < kb`.
    fn block(&self, blk: usize) -> *const u8 {
        self.lines.wrapping_add(blk * self.per * 64)
    }

    /// Prefetches the weights `AHEAD` blocks past chunk `c`'s (the tile
    /// unit waits for each load from memory in turn, and the hardware
    /// prefetcher does not run far enough ahead of it; past the tile's end
    /// this is the next tile's, and a prefetch never faults, wherever it
    /// points), and for 4-bit quants writes chunk `c`'s blocks as 8-bit
    /// lines into `split` (block `j` of the chunk at line `8j`): low nibbles
    /// of line `i` are values `4i..`, high ones `16+4i..`, lines `i` and
    /// `4+i` of the 8-bit layout. Stacked, 8-bit quants are copied there too
    /// (a pair's weights must be one run of 16 lines), and a missing last
    /// block of a pair is zeros.
    ///
    /// # Safety
    /// Chunk `c` exists; `split` holds `8 * CHUNK` 64-byte-aligned lines.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fetch(&self, c: usize, split: *mut [u8; 64]) {
        let nib = _mm512_set1_epi8(0x0F);
        let blocks = self.blocks(c);
        if self.stacked.is_some() && blocks.len() % 2 == 1 {
            // SAFETY: an odd count is below `CHUNK` (even), so line
            // `8 * len + 7` is in `split`.
            unsafe {
                let dst = split.add(8 * blocks.len());
                for i in 0..8 {
                    _mm512_store_si512(dst.add(i) as *mut __m512i, _mm512_setzero_si512());
                }
            }
        }
        for (j, blk) in blocks.enumerate() {
            let base = self.block(blk);
            let ahead = base.wrapping_add(AHEAD * self.per * 64);
            for l in 0..self.per {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            if !self.four {
                if self.stacked.is_some() {
                    // SAFETY: block `blk` exists, so its 8 quant lines do;
                    // `split` holds line `8 * j + 7`, 64-byte aligned.
                    unsafe {
                        let dst = split.add(8 * j);
                        for i in 0..8 {
                            let v = _mm512_loadu_si512(base.add(64 * (1 + i)) as *const __m512i);
                            _mm512_store_si512(dst.add(i) as *mut __m512i, v);
                        }
                    }
                }
                continue;
            }
            // SAFETY: block `blk` exists, so its 4 quant lines do; `split`
            // holds line `8 * j + 7` (`j < CHUNK`), 64-byte aligned.
            unsafe {
                let dst = split.add(8 * j);
                for i in 0..4 {
                    let v = _mm512_loadu_si512(base.add(64 * (1 + i)) as *const __m512i);
                    let lo = _mm512_and_si512(v, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                    _mm512_store_si512(dst.add(i) as *mut __m512i, lo);
                    _mm512_store_si512(dst.add(4 + i) as *mut __m512i, hi);
                }
            }
        }
    }

    /// The tile unit's part of chunk `c`: for each block, the integer sums
    /// of the configured activation rows against its weights (8-bit lines
    /// in place, 4-bit ones as [`Self::fetch`] split them into `split`),
    /// block `j` of the chunk's row `r` at line `j · rows + r` of `out`.
    /// Stacked, two blocks a product, their weights from `split`.
    ///
    /// # Safety
    /// AMX granted and configured for the activation rows (stacked or not
    /// as `self`); chunk `c` exists; [`Self::fetch`] wrote chunk `c` into
    /// `split`; `out` holds `16 * CHUNK` lines, 64-byte aligned.
    unsafe fn integer_sums(&self, c: usize, split: *const [u8; 64], out: *mut [i32; TILE]) {
        if let Some(stacked) = self.stacked {
            let blocks = self.blocks(c);
            // Chunks start at an even block (`CHUNK` is even), so block `j`
            // of the chunk (`j` even) is the first of pair `blk / 2`.
            for j in (0..blocks.len()).step_by(2) {
                let pair = (blocks.start + j) / 2;
                // SAFETY: pair `pair` has `2 * rows` stacked lines (checked
                // in `rows`); `split` has lines `8j..8j + 16` (the second
                // block's, or zeros, from `fetch`); `out` has lines
                // `j * rows..(j + 2) * rows` (`j + 2 <= CHUNK`, `rows <= 8`).
                unsafe {
                    tile_product(
                        stacked.add(pair * 2 * self.rows) as *const u8,
                        64,
                        split.add(8 * j) as *const u8,
                        out.add(j * self.rows),
                    )
                };
            }
            return;
        }
        for (j, blk) in self.blocks(c).enumerate() {
            // SAFETY: block `blk` exists (its lines and its 32 activation
            // bytes of every configured row); `split` and `out` as promised.
            unsafe {
                let wq = if self.four {
                    split.add(8 * j) as *const u8
                } else {
                    self.block(blk).add(64)
                };
                let a = self.xq.add(blk * BLOCK) as *const u8;
                tile_product(a, self.k, wq, out.add(j * self.rows));
            }
        }
    }
}

/// One tile product: `s` (tile 2's rows, 64 bytes apart) = A (tile 0: signed
/// activations, rows `a_stride` bytes apart) · B (tile 1: unsigned weights,
/// rows 64 bytes apart), in the configuration in force.
///
/// # Safety
/// AMX granted and configured; every row of the three tiles is readable (A,
/// B) or writable (`s`) at those strides.
#[inline(always)]
unsafe fn tile_product(a: *const u8, a_stride: usize, w: *const u8, s: *mut [i32; TILE]) {
    // SAFETY: as the caller promises.
    unsafe {
        asm!(
            "tilezero tmm2",
            "tileloadd tmm0, [{a} + {a_stride}*1]",
            "tileloadd tmm1, [{w} + {sixty_four}*1]",
            "tdpbsud tmm2, tmm0, tmm1",
            "tilestored [{s} + {sixty_four}*1], tmm2",
            a = in(reg) a,
            a_stride = in(reg) a_stride,
            w = in(reg) w,
            s = in(reg) s,
            sixty_four = in(reg) 64usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _,
            options(nostack),
        )
    };
}
