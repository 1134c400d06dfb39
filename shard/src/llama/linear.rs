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

fn needs_requant(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    )
}

fn requantize(q: QTensor, target: GgmlDType) -> Result<QTensor> {
    let last = q.shape().dims().last().copied().unwrap_or(0);
    if !needs_requant(q.dtype()) || last % target.block_size() != 0 {
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

/// The error for a quantized matrix that would run on candle's CPU kernels
/// where they cannot run ([`crate::kernels::candle_kernels_run`]): an Armv8.0
/// CPU, which would stop with an illegal instruction at the first product.
fn no_candle_kernels(name: &str, dtype: GgmlDType, mode: WeightMode) -> ShardError {
    let way_out = if mode == WeightMode::Fast {
        format!(
            "Pollen's own NEON kernel does not take this matrix ({dtype:?} or its shape); \
             a model of Q4_0, Q4_1, Q8_0 or K-quants with rows in multiples of 16 runs here"
        )
    } else {
        "use `--weights fast` (the default), which runs on Pollen's own NEON kernel".to_string()
    };
    ShardError::BadInput(format!(
        "{name}: weights `{mode}` would compute this {dtype:?} matrix on candle's quantized \
         CPU kernels, which need the Arm dot-product extension (Armv8.2-A and later) that \
         this CPU lacks; {way_out}"
    ))
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
            let dims = q.shape().dims().to_vec();
            if dims != [rows, cols] {
                return Err(ShardError::ShapeMismatch {
                    name: name.into(),
                    got: dims,
                    expected: vec![rows, cols],
                });
            }
            let q = match mode {
                WeightMode::Exact => q,
                WeightMode::Requantize(t) => requantize(q, t)?,
                WeightMode::Fast => {
                    // Q4_K packs at 4 bits; Q5_K and Q6_K as 8-bit quants.
                    let packable = needs_requant(q.dtype())
                        || matches!(
                            q.dtype(),
                            GgmlDType::Q4_0
                                | GgmlDType::Q8_0
                                | GgmlDType::Q4K
                                | GgmlDType::Q5K
                                | GgmlDType::Q6K
                        );
                    if packable && let Some(p) = PackedMatrix::pack(&q)? {
                        return Ok(Linear {
                            inner: LinearInner::Packed(Arc::new(p)),
                            span: tracing::span!(tracing::Level::TRACE, "qmatmul"),
                        });
                    }
                    requantize(q, GgmlDType::Q8_0)?
                }
            };
            let m = QMatMul::from_qtensor(q)?;
            if let QMatMul::QTensor(t) = &m
                && t.device().is_cpu()
                && !crate::kernels::candle_kernels_run()
            {
                return Err(no_candle_kernels(name, t.dtype(), mode));
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

    /// A 32×64 Q4_1 matrix (the default model's type) of varied values.
    fn q4_1() -> QTensor {
        let w: Vec<f32> = (0..32 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let t = Tensor::from_vec(w, (32, 64), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()
    }

    /// On a CPU where candle's quantized kernels would stop with an illegal
    /// instruction (aarch64 without `sdot`; `scripts/test-aarch64.sh` runs
    /// this on an emulated Cortex-A72), the modes that use them are refused
    /// at load with the way out; the fast mode runs on Pollen's kernel.
    #[test]
    fn candles_kernels_are_used_only_where_they_run() {
        let x = Tensor::ones((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q8 = WeightMode::Requantize(GgmlDType::Q8_0);
        for mode in [WeightMode::Exact, q8] {
            let got = linear_from(Weight::Quantized(q4_1()), "w", 32, 64, mode);
            if crate::kernels::candle_kernels_run() {
                let y = got.unwrap().forward(&x).unwrap();
                assert_eq!(y.dims(), [2, 32], "{mode}");
            } else {
                let err = got.unwrap_err().to_string();
                assert!(err.contains("dot-product extension"), "{mode}: {err}");
                assert!(err.contains("`--weights fast`"), "{mode}: {err}");
            }
        }
        let fast = linear_from(Weight::Quantized(q4_1()), "w", 32, 64, WeightMode::Fast);
        if crate::kernels::simd_available() {
            let fast = fast.unwrap();
            assert!(fast.packed().is_some());
            assert_eq!(fast.forward(&x).unwrap().dims(), [2, 32]);
        }
    }
}
