//! The matrix products of a block: candle's own (quantized or dense), or
//! packed for this crate's kernel ([`crate::kernels`]), and projections of
//! one input fused into one product.

use super::options::{LoadOptions, WeightMode};
use crate::kernels::PackedMatrix;
use crate::weights::{ModelFile, Weight};
use crate::{Result, ShardError};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, Device, Module, Tensor};
use std::sync::Arc;

/// Weights of a matrix product: candle's own, or packed for our kernel.
#[derive(Debug, Clone)]
enum LinearInner {
    Candle(QMatMul),
    Packed(Arc<PackedMatrix>),
}

/// A matrix product with a stored weight, quantized or dense.
#[derive(Debug, Clone)]
pub(super) struct Linear {
    inner: LinearInner,
    span: tracing::Span,
}

impl Linear {
    pub(super) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        match &self.inner {
            LinearInner::Candle(m) => m.forward(xs),
            LinearInner::Packed(p) => xs.contiguous()?.apply_op1_no_bwd(p.as_ref()),
        }
    }

    /// The packed weights, where this product runs on this crate's kernel.
    pub(super) fn packed(&self) -> Option<&PackedMatrix> {
        match &self.inner {
            LinearInner::Packed(p) => Some(p),
            LinearInner::Candle(_) => None,
        }
    }

    /// The packed matrix itself, to share (a tied head's with the embeddings).
    pub(super) fn packed_shared(&self) -> Option<&Arc<PackedMatrix>> {
        match &self.inner {
            LinearInner::Packed(p) => Some(p),
            LinearInner::Candle(_) => None,
        }
    }

    /// Candle's quantized matrix, to share (a tied head's with the embeddings).
    pub(super) fn quantized_shared(&self) -> Option<&Arc<QTensor>> {
        match &self.inner {
            LinearInner::Candle(QMatMul::QTensor(q)) => Some(q),
            _ => None,
        }
    }

    /// How many rows one product of this matrix on `device` may take while each row
    /// gets the bits of a product of that row alone ([`rows_keep_bits`]).
    pub(super) fn batch_rows(&self, device: &Device) -> usize {
        match &self.inner {
            LinearInner::Packed(_) => usize::MAX,
            LinearInner::Candle(QMatMul::QTensor(q)) => rows_keep_bits(q.dtype(), device),
            LinearInner::Candle(QMatMul::Tensor(_) | QMatMul::TensorF16(_)) => 1,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match &self.inner {
            LinearInner::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearInner::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            LinearInner::Packed(p) => p.bytes(),
        }
    }
}

/// Rows of activations at which candle's product of a `dtype` matrix on `device` still
/// gives each row the bits of that row alone (1: no batching keeps them), read from
/// candle 0.11's kernels; re-read on any candle upgrade.
///
/// - CPU: `k_quants::matmul` quantizes each row alone and computes every output with
///   the same `vec_dot_4`/`vec_dot_2`/`vec_dot` calls whatever the row count, for the
///   types candle does not repack. It repacks Q8_0, Q4_K and Q6_K on x86-64
///   (`repack_x86`: Q6_K only past one row, Q4_K to AMX from 32 rows) and Q4_0, Q4_K,
///   Q5_K, Q6_K and Q8_0 on aarch64 (`repack`: one kernel for one row, another for
///   multiples of four), where row counts change the kernel: 1. Dense matrices go to
///   gemm, whose blocking follows the shape: 1.
/// - CUDA: `fast_mmvq` computes up to eight rows with one kernel template whose
///   per-output sums are split across `nwarps` warps, four for one to four rows and
///   two for five to eight: the same order, and so the same bits, for up to four.
///   Past eight rows candle takes another kernel.
/// - Metal: not read: 1.
pub(super) fn rows_keep_bits(dtype: GgmlDType, device: &Device) -> usize {
    use GgmlDType as D;
    match device {
        Device::Cpu => match dtype {
            D::Q4_1 | D::Q5_0 | D::Q5_1 | D::Q2K | D::Q3K => usize::MAX,
            D::Q4_0 | D::Q5K if cfg!(not(target_arch = "aarch64")) => usize::MAX,
            _ => 1,
        },
        Device::Cuda(_) => match dtype {
            D::Q4_0
            | D::Q4_1
            | D::Q5_0
            | D::Q5_1
            | D::Q8_0
            | D::Q2K
            | D::Q3K
            | D::Q4K
            | D::Q5K
            | D::Q6K => CUDA_SAME_BITS_ROWS,
            _ => 1,
        },
        Device::Metal(_) => 1,
    }
}

/// Rows up to which candle's CUDA products keep a row's bits ([`rows_keep_bits`]).
pub(super) const CUDA_SAME_BITS_ROWS: usize = 4;

fn needs_requant(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

/// The type a matrix of stored type `dtype`, rows of `cols` values, has
/// after requantizing to `target`: `target` for the types candle has no fast
/// CPU kernel for, where whole blocks fit; its own otherwise.
fn requantized_type(dtype: GgmlDType, cols: usize, target: GgmlDType) -> GgmlDType {
    if needs_requant(dtype) && cols.is_multiple_of(target.block_size()) {
        target
    } else {
        dtype
    }
}

/// What computes a block matrix in a weight mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// Pollen's packed kernel (the same bits on every CPU).
    Packed,
    /// Candle's product on a matrix of this type (F32 or F16: dense).
    Candle(GgmlDType),
}

/// What computes a matrix of stored type `dtype` (F32 for a safetensors
/// model's), `rows` × `cols`, in `mode`, where `packs` says whether a packed
/// kernel runs on this CPU ([`crate::kernels::simd_available`]). What
/// [`linear_from`] builds, decided from the type and shape alone, so that a
/// node can name its arithmetic before it loads anything
/// ([`crate::compute::compute_mode`]).
pub(crate) fn product_of(
    mode: WeightMode,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    packs: bool,
) -> Product {
    match mode {
        WeightMode::Exact => Product::Candle(dtype),
        WeightMode::Requantize(t) => Product::Candle(requantized_type(dtype, cols, t)),
        // Q4_K packs at 4 bits; Q5_K and Q6_K as 8-bit quants. The same on
        // every CPU: fast-mode servers must agree bit for bit, so what does
        // not pack takes candle's product everywhere (or is refused where it
        // cannot run).
        WeightMode::Fast if packs && PackedMatrix::has_packed_form(dtype, rows, cols) => {
            Product::Packed
        }
        WeightMode::Fast => Product::Candle(requantized_type(dtype, cols, GgmlDType::Q8_0)),
    }
}

fn requantize(q: QTensor, target: GgmlDType) -> Result<QTensor> {
    let last = q.shape().dims().last().copied().unwrap_or(0);
    if requantized_type(q.dtype(), last, target) == q.dtype() {
        return Ok(q);
    }
    let dense = q.dequantize(&Device::Cpu)?;
    let out = QTensor::quantize(&dense, target)?;
    if q.device().is_cpu() {
        Ok(out)
    } else {
        let dense = out.dequantize(&Device::Cpu)?;
        Ok(QTensor::quantize_onto(&dense, target, &q.device())?)
    }
}

/// Whether candle's CPU product for a quantized `dtype` runs here
/// ([`crate::kernels::candle_kernels_run`] says whether all of them do).
fn candle_runs(dtype: GgmlDType) -> bool {
    candle_product_runs(crate::kernels::candle_kernels_run(), dtype)
}

/// Whether candle's CPU product for a quantized `dtype` runs on a CPU where
/// all of them do (`all`) or not: an aarch64 CPU without the dot-product
/// extension, where candle 0.11's NEON products for Q4_0, Q8_0 and the
/// K-quants would stop with an illegal instruction and only its plain-code
/// ones (Q4_1, Q5_0, Q5_1, Q8_1) run (to be checked again when candle
/// changes). Float matrices never get here: candle keeps them dense.
fn candle_product_runs(all: bool, dtype: GgmlDType) -> bool {
    all || matches!(
        dtype,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

/// The error for a quantized matrix that would run on a candle CPU product
/// that cannot run here ([`candle_runs`]).
fn no_candle_kernel(name: &str, from: GgmlDType, now: GgmlDType, mode: WeightMode) -> ShardError {
    let what = if from == now {
        format!("this {now:?} matrix")
    } else {
        format!("this matrix ({from:?}, requantized to {now:?})")
    };
    let lacks = "which needs the Arm dot-product extension (Armv8.2-A and later) that this \
                 CPU lacks";
    ShardError::BadInput(if mode == WeightMode::Fast {
        format!(
            "{name}: {what} has no packed form in the fast mode (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q4_K, \
             Q5_K or Q6_K, rows in multiples of 16, columns of 32), so it computes on \
             candle's product, as on every CPU, {lacks}"
        )
    } else {
        format!(
            "{name}: weights `{mode}` compute {what} on candle's product, {lacks}; \
             `--weights fast` (the default) runs the packed types on Pollen's own NEON kernel"
        )
    })
}

pub(super) fn linear_from(
    weight: Weight,
    name: &str,
    rows: usize,
    cols: usize,
    mode: WeightMode,
) -> Result<Linear> {
    let inner = match weight {
        Weight::Quantized(q) => {
            let from = q.dtype();
            let dims = q.shape().dims().to_vec();
            if dims != [rows, cols] {
                return Err(ShardError::ShapeMismatch {
                    name: name.into(),
                    got: dims,
                    expected: vec![rows, cols],
                });
            }
            let packs = q.device().is_cpu() && crate::kernels::simd_available();
            let q = match product_of(mode, from, rows, cols, packs) {
                Product::Packed => {
                    let p = PackedMatrix::pack(&q)?.ok_or_else(|| {
                        ShardError::BadInput(format!(
                            "{name}: this {from:?} matrix has a packed form but no packed \
                             kernel runs here"
                        ))
                    })?;
                    return Ok(Linear {
                        inner: LinearInner::Packed(Arc::new(p)),
                        span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
                    });
                }
                Product::Candle(t) => requantize(q, t)?,
            };
            let m = QMatMul::from_qtensor(q)?;
            if let QMatMul::QTensor(t) = &m
                && t.device().is_cpu()
                && !candle_runs(t.dtype())
            {
                return Err(no_candle_kernel(name, from, t.dtype(), mode));
            }
            LinearInner::Candle(m)
        }
        Weight::Dense(t) => {
            if t.dims() != [rows, cols] {
                return Err(ShardError::ShapeMismatch {
                    name: name.into(),
                    got: t.dims().to_vec(),
                    expected: vec![rows, cols],
                });
            }
            if t.device().is_cpu() && !crate::kernels::dense_products_run() {
                return Err(crate::kernels::no_dense_products(&format!(
                    "{name}: this {:?} matrix",
                    t.dtype()
                )));
            }
            LinearInner::Candle(QMatMul::Tensor(t))
        }
    };
    Ok(Linear {
        inner,
        span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
    })
}

pub(super) fn load_linear(
    file: &ModelFile,
    name: &str,
    rows: usize,
    cols: usize,
    opts: &LoadOptions,
) -> Result<Linear> {
    let w = file.read_weight(name, &opts.device)?;
    linear_from(w, name, rows, cols, opts.effective_mode())
}

pub(super) fn load_vector(
    file: &ModelFile,
    name: &str,
    len: usize,
    device: &Device,
) -> Result<Tensor> {
    let t = file.read_weight(name, device)?.into_dense(device)?;
    if t.dims() != [len] {
        return Err(ShardError::ShapeMismatch {
            name: name.into(),
            got: t.dims().to_vec(),
            expected: vec![len],
        });
    }
    Ok(t)
}

/// Projections of the same input: separate products (exact mode, op for op
/// as the reference) or one fused packed product whose output is split.
#[derive(Debug, Clone)]
pub(super) enum Projections<const N: usize> {
    Separate([Linear; N]),
    Fused(Linear, [usize; N]),
}

impl<const N: usize> Projections<N> {
    pub(super) fn new(parts: [Linear; N], fuse: bool) -> Self {
        if fuse {
            let packed: Vec<&PackedMatrix> = parts
                .iter()
                .filter_map(|l| match &l.inner {
                    LinearInner::Packed(p) => Some(p.as_ref()),
                    LinearInner::Candle(_) => None,
                })
                .collect();
            if packed.len() == N
                && let Some(m) = PackedMatrix::concat(&packed)
            {
                let widths = std::array::from_fn(|i| packed[i].n());
                return Self::Fused(
                    Linear {
                        inner: LinearInner::Packed(Arc::new(m)),
                        span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
                    },
                    widths,
                );
            }
        }
        Self::Separate(parts)
    }

    /// [`Linear::batch_rows`] of every product.
    pub(super) fn batch_rows(&self, device: &Device) -> usize {
        match self {
            Self::Separate(ls) => ls.iter().map(|l| l.batch_rows(device)).min().unwrap_or(1),
            Self::Fused(l, _) => l.batch_rows(device),
        }
    }

    /// The fused product's packed weights (all projections' rows, in order).
    pub(super) fn packed(&self) -> Option<&PackedMatrix> {
        match self {
            Self::Fused(l, _) => l.packed(),
            Self::Separate(_) => None,
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let out: Vec<Tensor> = match self {
            Self::Separate(ls) => ls
                .iter()
                .map(|l| l.forward(x))
                .collect::<candle_core::Result<_>>()?,
            Self::Fused(l, widths) => {
                let y = l.forward(x)?;
                let mut at = 0;
                let mut out = Vec::with_capacity(N);
                for &w in widths {
                    out.push(y.narrow(D::Minus1, at, w)?);
                    at += w;
                }
                out
            }
        };
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("projection count".into()))
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::Separate(ls) => ls.iter().map(Linear::bytes).sum(),
            Self::Fused(l, _) => l.bytes(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A `rows`×`cols` matrix of varied values in `dtype`.
    fn matrix(dtype: GgmlDType, rows: usize, cols: usize) -> Weight {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        Weight::Quantized(QTensor::quantize(&t, dtype).unwrap())
    }

    /// Loads the matrix and runs a product of 2 rows through it; `Err` with
    /// the load's message.
    fn product(dtype: GgmlDType, rows: usize, cols: usize, mode: WeightMode) -> Result<Linear> {
        let l = linear_from(matrix(dtype, rows, cols), "w", rows, cols, mode)?;
        let x = Tensor::ones((2, cols), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(l.forward(&x).unwrap().dims(), [2, rows], "{dtype:?} {mode}");
        Ok(l)
    }

    /// What `product_of` says a matrix computes with, from its type and
    /// shape, is what `linear_from` builds from the matrix itself (compute-mode
    /// names rest on it).
    #[test]
    fn the_plan_from_type_and_shape_is_what_loads() {
        use GgmlDType::*;
        let packs = crate::kernels::simd_available();
        let modes = [
            WeightMode::Exact,
            WeightMode::Fast,
            WeightMode::Requantize(Q8_0),
            WeightMode::Requantize(Q4K),
        ];
        let mut seen = (0, 0);
        for t in [Q4_0, Q4_1, Q5_0, Q8_0, Q3K, Q4K, Q6K, F16, F32] {
            // Packed shapes, rows not in 16s, columns not in 256s.
            for (rows, cols) in [(32usize, 256usize), (24, 256), (16, 288)] {
                if !cols.is_multiple_of(t.block_size()) {
                    continue;
                }
                for mode in modes {
                    let what = format!("{t:?} {rows}x{cols} {mode}");
                    let plan = product_of(mode, t, rows, cols, packs);
                    let Ok(l) = linear_from(matrix(t, rows, cols), "w", rows, cols, mode) else {
                        // Refused where candle's product cannot run (Armv8.0).
                        assert!(!crate::kernels::candle_kernels_run(), "{what}");
                        continue;
                    };
                    match (plan, &l.inner) {
                        (Product::Packed, LinearInner::Packed(_)) => seen.0 += 1,
                        (Product::Candle(want), LinearInner::Candle(QMatMul::QTensor(q))) => {
                            assert_eq!(q.dtype(), want, "{what}");
                            seen.1 += 1;
                        }
                        (Product::Candle(F16 | F32), LinearInner::Candle(_)) => seen.1 += 1,
                        (plan, _) => panic!("{what}: planned {plan:?}, built otherwise"),
                    }
                }
            }
        }
        assert!(seen.1 > 0 && (seen.0 > 0 || !packs), "{seen:?}");
    }

    /// Which of candle's products an Armv8.0 CPU runs: the plain-code ones.
    #[test]
    fn without_sdot_only_candles_plain_products_run() {
        use GgmlDType::*;
        for t in [
            Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K,
        ] {
            assert!(candle_product_runs(true, t), "{t:?}");
            let plain = matches!(t, Q4_1 | Q5_0 | Q5_1 | Q8_1);
            assert_eq!(candle_product_runs(false, t), plain, "{t:?}");
        }
    }

    /// On a CPU where some of candle's quantized products would stop with an
    /// illegal instruction (aarch64 without `sdot`; `scripts/test-aarch64.sh`
    /// runs this on an emulated Cortex-A72), a matrix that would run on one
    /// is refused at load with an error, the others run, and the fast mode
    /// chooses the same arithmetic as on any other CPU.
    #[test]
    fn candle_products_are_used_only_where_they_run() {
        let all = crate::kernels::candle_kernels_run();
        let refused = |r: Result<Linear>, what: &str, hint: &str| {
            let err = r.err().unwrap().to_string();
            assert!(err.contains("dot-product extension"), "{what}: {err}");
            assert!(err.contains(hint), "{what}: {err}");
        };
        let on_candle = |l: Linear, what: &str| {
            assert!(l.packed().is_none(), "{what} packed");
        };
        // Plain code in candle on every CPU: Q4_1, Q5_0 (exact), and a Q4_1
        // matrix `q4k` leaves as it is (64 columns are not a Q4_K block).
        for t in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            on_candle(product(t, 32, 64, WeightMode::Exact).unwrap(), "exact");
        }
        let kept = product(
            GgmlDType::Q4_1,
            32,
            64,
            WeightMode::Requantize(GgmlDType::Q4K),
        );
        on_candle(kept.unwrap(), "q4k of 64 columns");
        // Float matrices stay dense in every mode.
        on_candle(
            product(GgmlDType::F16, 32, 64, WeightMode::Fast).unwrap(),
            "f16",
        );
        let exact_q8 = product(GgmlDType::Q8_0, 32, 64, WeightMode::Exact);
        let requantized = product(
            GgmlDType::Q4_1,
            32,
            64,
            WeightMode::Requantize(GgmlDType::Q8_0),
        );
        // Rows not a multiple of 16 do not pack: requantized to Q8_0 for
        // candle's product, as on every CPU.
        let unfit = product(GgmlDType::Q4_1, 8, 64, WeightMode::Fast);
        // Q2_K has no packed form: candle's product, as on every CPU.
        let q2k = product(GgmlDType::Q2K, 32, 256, WeightMode::Fast);
        if all {
            on_candle(exact_q8.unwrap(), "exact Q8_0");
            on_candle(requantized.unwrap(), "q8_0");
            on_candle(unfit.unwrap(), "unfit Q4_1");
            on_candle(q2k.unwrap(), "Q2_K");
        } else {
            refused(exact_q8, "exact Q8_0", "`--weights fast`");
            refused(requantized, "q8_0", "requantized to Q8_0");
            refused(unfit, "unfit Q4_1", "no packed form");
            refused(q2k, "Q2_K", "no packed form");
        }
        if crate::kernels::simd_available() {
            let fast = product(GgmlDType::Q4_1, 32, 64, WeightMode::Fast).unwrap();
            assert!(fast.packed().is_some());
        }
    }
}
