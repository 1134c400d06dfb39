//! Every kernel path against the scalar path, and the scalar path against
//! f32 products.
//!
//! Tolerance: the SIMD kernels must equal the scalar path bit for bit (the
//! integer sums are exact and the float steps are the same fused
//! multiply-adds in the same order). The scalar path differs from an f32
//! product only by the quantization of weights and activations, checked
//! against a loose bound relative to the size of the sums.
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

/// The SIMD kernels this CPU runs, whatever `POLLEN_KERNEL` says.
fn kernels() -> Vec<(KernelPath, Kernel)> {
    let paths = [
        KernelPath::Amx,
        KernelPath::Avx512Vnni,
        KernelPath::AvxVnni,
        KernelPath::Avx2,
        KernelPath::NeonDot,
        KernelPath::Neon,
    ];
    let found: Vec<_> = paths
        .into_iter()
        .filter_map(|p| Kernel::of(p).map(|k| (p, k)))
        .collect();
    for p in paths {
        assert_eq!(found.iter().any(|(q, _)| *q == p), p.supported(), "{p}");
        if !p.supported() {
            eprintln!("kernel path {p} not on this CPU: not tested here");
        }
    }
    found
}

fn pack(dtype: Option<GgmlDType>, w: &[f32], n: usize, k: usize) -> PackedMatrix {
    match dtype {
        Some(d) => {
            let t = Tensor::from_vec(w.to_vec(), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, d).unwrap();
            PackedMatrix::pack_any(&q).unwrap().unwrap()
        }
        None => PackedMatrix::from_dense(w, n, k),
    }
}

/// Asserts `got` equals `want` bit for bit.
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: [{i}] {a} vs {b}");
    }
}

/// Scalar path against f32, then every kernel (through the dispatch, on the
/// thread pool for larger products) against the scalar path.
fn check(dtype: Option<GgmlDType>, m: usize, n: usize, k: usize) {
    let mut seed = 7u64 + (m * 31 + n * 7 + k) as u64;
    let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
    let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let packed = pack(dtype, &w, n, k);
    let want = reference(&w, &x, m, n, k);
    let mut scalar = vec![0f32; m * n];
    packed.matmul_on(None, &x, m, &mut scalar);
    let tol = match dtype {
        Some(GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K) => 0.15,
        _ => 0.03,
    } * (k as f32).sqrt();
    for (a, b) in scalar.iter().zip(&want) {
        assert!((a - b).abs() < tol, "{dtype:?} scalar {a} vs f32 {b}");
    }
    for (path, kernel) in kernels() {
        let mut got = vec![0f32; m * n];
        packed.matmul_on(Some(kernel), &x, m, &mut got);
        assert_bits(&got, &scalar, &format!("{path} {dtype:?} {m}x{n}x{k}"));
    }
}

const TYPES: [Option<GgmlDType>; 4] = [
    Some(GgmlDType::Q4_1),
    Some(GgmlDType::Q4_0),
    Some(GgmlDType::Q8_0),
    None,
];

#[test]
fn every_kernel_path_matches_the_scalar_path_on_small_shapes() {
    for dtype in TYPES {
        // 2 to 8 rows: AMX takes two blocks a product (3 blocks: the last
        // pair has one). Every count of rows past the kernels' groups (1 to
        // 7 past eight, 1 to 3 past four), each in one more pass: 14 and 15
        // rows are a group of eight, then six or seven.
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 16, 17, 33] {
            check(dtype, m, 48, 96);
        }
        // One block: the AMX kernel's pipeline has one chunk, partly full.
        check(dtype, 6, 16, 32);
        // 11 blocks: AMX's second chunk ends with a pair of one block.
        for m in [5, 8] {
            check(dtype, m, 48, 352);
        }
        // 20 rows: 16, then 4 taken one block at a time (not stacked).
        check(dtype, 20, 48, 352);
        // Enough tiles times rows to run on the thread pool.
        check(dtype, 9, 128, 96);
    }
    // Types without a direct mapping are stored as 8-bit asymmetric quants.
    for m in [1, 5] {
        check(Some(GgmlDType::Q6K), m, 48, 256);
        check(Some(GgmlDType::Q4K), m, 32, 512);
    }
}

#[test]
fn every_kernel_path_matches_the_scalar_path_on_the_models_shapes() {
    // SmolLM2-135M: q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536
    // (rows × inner); one decode row, an odd prefill, a multiple of 4 plus 3.
    for dtype in TYPES {
        for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
            // 8 rows (a batch of 8 sessions' decode steps): AMX's stacked
            // tiles full; 16 and 18 rows: full AMX tiles over several chunks
            // of blocks (18 = 16 + 2), the last chunk partial.
            for m in [1, 3, 7, 8, 16, 18] {
                check(dtype, m, n, k);
            }
        }
    }
}

/// The largest products the saturating 16-bit steps of the AVX2 kernel can
/// meet: every quant at either end of its range, activations at ±127.
#[test]
fn extreme_quants_do_not_saturate() {
    let (n, k) = (32, 64);
    for bits in [Bits::Four, Bits::Eight] {
        let top = match bits {
            Bits::Four => 15,
            Bits::Eight => 255,
        };
        let w = PackedMatrix::build(n, k, bits, |r, b| {
            let mut u = [0u8; BLOCK];
            for (j, u) in u.iter_mut().enumerate() {
                *u = match r % 4 {
                    0 => top,
                    1 => 0,
                    2 => [0, top][(j + b) % 2],
                    _ => [1, top - 1, top / 2 + 1, top / 2][j % 4],
                };
            }
            RowBlock {
                d: f16::from_f32(0.01),
                m: f16::from_f32(-0.5),
                u,
            }
        });
        for pattern in 0..4 {
            let m = 5;
            let x: Vec<f32> = (0..m * k)
                .map(|i| match pattern {
                    0 => 1.0,
                    1 => -1.0,
                    2 => [1.0, -1.0][i % 2],
                    _ => [1.0, -1.0][(i / 3) % 2],
                })
                .collect();
            let mut scalar = vec![0f32; m * n];
            w.matmul_on(None, &x, m, &mut scalar);
            // The scalar path against the exact integer arithmetic.
            let act = Activations::quantize(&x, m, k);
            assert!(act.q.iter().all(|q| q.abs() == 127));
            for (path, kernel) in kernels() {
                let mut got = vec![0f32; m * n];
                w.matmul_on(Some(kernel), &x, m, &mut got);
                assert_bits(&got, &scalar, &format!("{path} {bits:?} pattern {pattern}"));
            }
        }
    }
}

#[test]
fn the_scalar_path_is_exact_integer_arithmetic() {
    // Weights and activations that quantize without error: d = 1, m = 0,
    // x = ±127 (scale 1): every output is the integer dot product.
    let (n, k, m) = (16, 64, 3);
    let mut seed = 11u64;
    let u: Vec<u8> = (0..n * k)
        .map(|_| ((lcg(&mut seed) + 1.0) * 127.9) as u8)
        .collect();
    let w = PackedMatrix::build(n, k, Bits::Eight, |r, b| {
        let mut q = [0u8; BLOCK];
        q.copy_from_slice(&u[r * k + b * BLOCK..][..BLOCK]);
        RowBlock {
            d: f16::ONE,
            m: f16::ZERO,
            u: q,
        }
    });
    let x: Vec<f32> = (0..m * k)
        .map(|_| if lcg(&mut seed) > 0.0 { 127.0 } else { -127.0 })
        .collect();
    let mut got = vec![0f32; m * n];
    w.matmul_on(None, &x, m, &mut got);
    for i in 0..m {
        for j in 0..n {
            let want: i64 = (0..k)
                .map(|l| i64::from(u[j * k + l]) * x[i * k + l] as i64)
                .sum();
            assert_eq!(got[i * n + j], want as f32, "row {i} col {j}");
        }
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

#[test]
fn pack_follows_the_active_path() {
    let t = Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let packed = PackedMatrix::pack(&q).unwrap();
    assert_eq!(packed.is_some(), kernel_path() != KernelPath::None);
    assert_eq!(Kernel::active().is_some(), simd_available());
}

/// The weights a packed matrix stands for, `d·u + m` per value.
fn unpack(p: &PackedMatrix) -> Vec<f32> {
    let (n, k) = (p.n, p.k);
    let kb = k / BLOCK;
    let per = 1 + p.bits.q_lines();
    let mut w = vec![0f32; n * k];
    for t in 0..n / TILE {
        for b in 0..kb {
            let base = (t * kb + b) * per;
            for r in 0..TILE {
                let d = f16_at(&p.lines[base].0, 2 * r).to_f32();
                let m = f16_at(&p.lines[base].0, 32 + 2 * r).to_f32();
                for v in 0..BLOCK {
                    let u = match p.bits {
                        Bits::Four => {
                            let (i, j) = ((v % 16) / 4, v % 4);
                            let byte = p.lines[base + 1 + i].0[4 * r + j];
                            if v < 16 { byte & 0x0F } else { byte >> 4 }
                        }
                        Bits::Eight => p.lines[base + 1 + v / 4].0[4 * r + v % 4],
                    };
                    w[(t * TILE + r) * k + b * BLOCK + v] = d * f32::from(u) + m;
                }
            }
        }
    }
    w
}

/// Q4_K keeps 4 bits per weight, and its weights are candle's own but for
/// the sub-block scales and mins kept as f16 (relative error ≤ 2⁻¹¹ each).
#[test]
fn q4k_packs_to_four_bits_near_candles_weights() {
    let (n, k) = (32, 512);
    let mut seed = 11u64;
    let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
    let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
    let want: Vec<f32> = want.to_vec1().unwrap();
    let p = PackedMatrix::pack_any(&q).unwrap().unwrap();
    assert_eq!(p.bits, Bits::Four);
    let got = unpack(&p);
    let amax = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= amax * 2e-3, "[{i}] {a} vs {b}");
    }
}

/// Q4_0, Q4_1 and Q8_0 pack exactly: the packed weights are candle's.
#[test]
fn legacy_types_pack_exactly() {
    let (n, k) = (32, 96);
    let mut seed = 5u64;
    let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QTensor::quantize(&t, dtype).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = unpack(&PackedMatrix::pack_any(&q).unwrap().unwrap());
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= b.abs() * 1e-3 + 1e-6,
                "{dtype:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn widening_f16_is_exact_for_every_value() {
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        let (got, want) = (widen(h), h.to_f32());
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
        }
    }
}

/// A SIMD path's weighted sums, for [`check_weighted_sums`].
trait WeightedSums {
    fn sums<const H: usize>(&self, p: [&[f32]; H], x: &[f16], y: &mut [&mut [f32]; H]);
}

impl WeightedSums for super::avx2::Avx2 {
    fn sums<const H: usize>(&self, p: [&[f32]; H], x: &[f16], y: &mut [&mut [f32]; H]) {
        self.weighted_sum_heads(p, x, y);
    }
}

#[cfg(target_arch = "x86_64")]
impl WeightedSums for super::avx512::Float16 {
    fn sums<const H: usize>(&self, p: [&[f32]; H], x: &[f16], y: &mut [&mut [f32]; H]) {
        self.weighted_sum_heads(p, x, y);
    }
}

/// `k`'s weighted sums over the `n` values of width `d` in `b`, for three
/// heads at once and for two and one, equal the scalar loop's bit for bit
/// (random weights and starting outputs from `seed`).
fn check_weighted_sums(
    k: &impl WeightedSums,
    b: &[f16],
    d: usize,
    n: usize,
    seed: &mut u64,
    what: &str,
) {
    let p: Vec<f32> = (0..3 * n).map(|_| lcg(seed)).collect();
    let p = |h: usize| &p[h * n..(h + 1) * n];
    let y0: Vec<f32> = (0..3 * d).map(|_| lcg(seed)).collect();
    let mut want = y0.clone();
    for (h, w) in want.chunks_exact_mut(d).enumerate() {
        weighted_sum_scalar(p(h), b, w);
    }
    let mut got = y0.clone();
    let mut ys = got.chunks_exact_mut(d);
    let mut y = || ys.next().unwrap();
    k.sums([p(0), p(1), p(2)], b, &mut [y(), y(), y()]);
    assert_bits(&got, &want, &format!("{what} d {d} n {n}, 3 heads"));
    let mut got = y0.clone();
    let (first, rest) = got.split_at_mut(2 * d);
    let (g0, g1) = first.split_at_mut(d);
    k.sums([p(0), p(1)], b, &mut [g0, g1]);
    k.sums([p(2)], b, &mut [rest]);
    assert_bits(&got, &want, &format!("{what} d {d} n {n}, 2 + 1 heads"));
}

#[test]
fn attentions_float_loops_equal_the_scalar_loops_bit_for_bit() {
    let Some(k) = super::float_simd() else {
        return;
    };
    let mut seed = 11;
    for d in [64, 24, 19, 8, 16, 150] {
        for n in [1, 3, 4, 5, 8, 13, 64] {
            let a: Vec<f32> = (0..3 * d).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f16> = (0..n * d).map(|_| f16::from_f32(lcg(&mut seed))).collect();
            let full = d / 8 * 8;
            let q = |h: usize| &a[h * d..h * d + full];
            let mut want = vec![vec![0f32; n]; 3];
            for (h, w) in want.iter_mut().enumerate() {
                lane_sums_scalar(q(h), &b, d, w);
            }
            let mut got = vec![vec![0f32; n]; 3];
            let [g0, g1, g2] = &mut got[..] else {
                unreachable!()
            };
            k.lane_sums_heads(
                [q(0), q(1), q(2)],
                &b,
                d,
                &mut [&mut g0[..], &mut g1[..], &mut g2[..]],
            );
            for h in 0..3 {
                assert_bits(
                    &got[h],
                    &want[h],
                    &format!("lane sums d {d} n {n} head {h} of 3"),
                );
            }
            let mut two = [vec![0f32; n], vec![0f32; n]];
            let [t0, t1] = &mut two;
            k.lane_sums_heads([q(0), q(1)], &b, d, &mut [&mut t0[..], &mut t1[..]]);
            let mut one = vec![0f32; n];
            k.lane_sums_heads([q(2)], &b, d, &mut [&mut one[..]]);
            assert_bits(
                &two[0],
                &want[0],
                &format!("lane sums d {d} n {n} head 0 of 2"),
            );
            assert_bits(
                &two[1],
                &want[1],
                &format!("lane sums d {d} n {n} head 1 of 2"),
            );
            assert_bits(
                &one,
                &want[2],
                &format!("lane sums d {d} n {n} head 0 of 1"),
            );

            check_weighted_sums(&k, &b, d, n, &mut seed, "weighted sums");
        }
    }
}

#[test]
fn softmax_loops_give_the_one_at_a_time_bits_in_every_lane_count() {
    let mut seed = 17;
    for n in [1, 5, 8, 13, 64] {
        let mut s: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 30.0).collect();
        // A NaN score is left out of the maximum, as `f32::max` leaves it.
        if n > 4 {
            s[3] = f32::NAN;
            s[4] = -0.0;
        }
        let scale = 0.125;
        let want_scaled: Vec<f32> = s.iter().map(|x| x * scale).collect();
        let want_max = want_scaled.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut plain = s.clone();
        let got_max = scale_max_plain(&mut plain, scale);
        assert_bits(&plain, &want_scaled, &format!("scaled, n {n}"));
        assert_eq!(got_max, want_max, "maximum, n {n}");
        let mut dispatched = s.clone();
        assert_eq!(scale_max(&mut dispatched, scale), want_max);
        assert_bits(&dispatched, &want_scaled, &format!("dispatched, n {n}"));
        let want_exp: Vec<f32> = want_scaled
            .iter()
            .map(|&x| crate::attention::exp(x - want_max))
            .collect();
        exp_below(&mut dispatched, want_max);
        assert_bits(&dispatched, &want_exp, &format!("exp, n {n}"));
        exp_below_plain(&mut plain, want_max);
        assert_bits(&plain, &want_exp, &format!("plain exp, n {n}"));
    }
    let mut none = [f32::NAN; 3];
    assert_eq!(scale_max(&mut none, 1.0), f32::NEG_INFINITY);
}

#[test]
fn simd_activation_quantization_equals_the_scalar_one_bit_for_bit() {
    let Some(k) = super::float_simd() else {
        return;
    };
    let mut seed = 5;
    let mut xs: Vec<f32> = (0..32 * 40).map(|_| lcg(&mut seed) * 3.0).collect();
    // Special blocks: zeros, a NaN among values, infinities, subnormals (whose
    // scale's inverse overflows), exact halves, ±0 and the largest values.
    xs[32..64].fill(0.0);
    xs[70] = f32::NAN;
    xs[100] = f32::INFINITY;
    xs[101] = f32::NEG_INFINITY;
    for (i, x) in xs[128..160].iter_mut().enumerate() {
        *x = f32::from_bits(i as u32 + 1) * if i % 2 == 0 { 1.0 } else { -1.0 };
    }
    for (i, x) in xs[160..192].iter_mut().enumerate() {
        *x = (i as f32 - 16.0) * 0.5;
    }
    xs[192] = -0.0;
    xs[224] = f32::MAX;
    xs[225] = f32::MIN;
    xs[256..288].fill(f32::NAN);
    // Whole groups of eight blocks, and groups cut short.
    for kb in [40, 37, 5, 1] {
        let xs = &xs[..kb * BLOCK];
        let (mut q1, mut q2) = (vec![0i8; xs.len()], vec![0i8; xs.len()]);
        let (mut d1, mut d2) = (vec![0f32; kb], vec![0f32; kb]);
        let (mut s1, mut s2) = (vec![0i32; kb], vec![0i32; kb]);
        k.quantize_row(xs, &mut q1, &mut d1, &mut s1);
        quantize_row_scalar(xs, &mut q2, &mut d2, &mut s2);
        assert_eq!(q1, q2, "{kb} blocks");
        assert_eq!(s1, s2, "{kb} blocks");
        assert_bits(&d1, &d2, &format!("scales of {kb} blocks"));
    }
}

/// A stride whose end offset wraps past `usize::MAX` (here to 0) is refused
/// by the SIMD path as by the scalar one, not read from before `b`.
#[test]
#[should_panic]
fn lane_sums_refuse_a_stride_whose_end_wraps() {
    let keys: Vec<f16> = vec![f16::ONE; 16];
    let a = [1f32; 8];
    let mut out = [0f32; 2];
    super::lane_sums_heads::<1>([&a[..]], &keys[8..], usize::MAX - 7, &mut [&mut out[..]]);
}

/// A dense matrix packs only in the packed layout's shapes: rows in
/// multiples of 16, columns of 32 (else outputs past the last whole tile
/// would be left unwritten, and the quantizers would differ by CPU).
#[test]
fn dense_matrices_of_other_shapes_are_refused() {
    for (n, k) in [(24, 64), (16, 40), (16, 0), (0, 32)] {
        let w = vec![0.5f32; n * k];
        let r = std::panic::catch_unwind(|| PackedMatrix::from_dense(&w, n, k));
        assert_eq!(r.is_ok(), n == 0, "({n}, {k})");
    }
    let short = std::panic::catch_unwind(|| PackedMatrix::from_dense(&[0.5; 16 * 31], 16, 32));
    assert!(short.is_err(), "fewer values than the shape");
    let whole = PackedMatrix::from_dense(&vec![0.5f32; 16 * 32], 16, 32);
    assert!(PackedMatrix::concat(&[&whole, &whole]).is_some());
}

/// Activations are quantized in whole blocks on every path.
#[test]
#[should_panic]
fn activations_of_a_partial_block_are_refused() {
    let mut act = Activations::default();
    act.quantize_rows_with(1, 40, |_, row| row.fill(1.0));
}

/// The AVX-512 weighted sums give the scalar loop's bits for every width
/// (sixteen-lane vectors, then single elements) and head count.
#[cfg(target_arch = "x86_64")]
#[test]
fn sixteen_lane_weighted_sums_equal_the_scalar_loop_bit_for_bit() {
    let Some(k) = super::avx512::Float16::detect() else {
        eprintln!("no AVX-512 on this CPU: its weighted sums do not run here");
        return;
    };
    let mut seed = 23;
    for d in 1..=150 {
        for n in [0, 1, 3, 17, 70] {
            let b: Vec<f16> = (0..n * d).map(|_| f16::from_f32(lcg(&mut seed))).collect();
            check_weighted_sums(&k, &b, d, n, &mut seed, "sixteen-lane weighted sums");
        }
    }
}

/// The bench's multiply-instruction ceiling: a positive rate for every path
/// with such a loop on this CPU, none for AMX and NEON without `sdot`.
#[test]
fn every_multiply_loop_times_to_a_positive_rate() {
    for (p, k) in kernels() {
        match (p, k.dot_peak()) {
            (KernelPath::Amx | KernelPath::Neon, peak) => assert_eq!(peak, None, "{p}"),
            (_, Some(g)) => assert!(g.is_finite() && g > 0.1, "{p}: {g}"),
            (_, None) => panic!("{p}: no multiply loop timed"),
        }
    }
}

/// Keys and values rounded to f16 a row at a time take the bits of one at a
/// time: saturation at ±65504 (and around the rounding edge above it), NaN,
/// infinities, signed zeros, f16 subnormals and what underflows them, and
/// random values, at every length's remainder.
#[test]
fn f16_rows_round_as_one_value_at_a_time() {
    let mut seed = 5u64;
    let mut vals = vec![
        0.0,
        -0.0,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        -65504.0,
        65519.0,
        65520.0,
        -65520.0,
        1e9,
        -1e9,
        6e-8,
        -6e-8,
        2.9e-8,
        3.0e-8,
        1e-30,
        f32::MIN_POSITIVE,
        1.0 + f32::EPSILON,
    ];
    for _ in 0..1000 {
        let v = lcg(&mut seed);
        vals.push(v * 10f32.powi((lcg(&mut seed) * 6.0) as i32));
    }
    for len in (0..=20).chain([vals.len()]) {
        let src = &vals[..len];
        let mut got = vec![f16::ZERO; len];
        to_f16_row(src, &mut got);
        for (g, &s) in got.iter().zip(src) {
            let want = crate::llama::cache::to_f16(s);
            assert_eq!(g.to_bits(), want.to_bits(), "{s:e}: {g} against {want}");
        }
    }
}
