//! How a model is loaded: onto which device, and with which weight layout.

use crate::{Result, ShardError};
use candle_core::Device;
use candle_core::quantized::GgmlDType;

/// How weights are kept in memory. The default is [`WeightMode::Fast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// As stored in the file: bit-identical to candle-transformers' own model.
    /// A matrix whose candle product cannot run on this CPU is refused at
    /// load ([`crate::kernels::candle_kernels_run`]: Q4_0, Q8_0 and K-quants
    /// on an Armv8.0 CPU).
    Exact,
    /// Quantized types without a fast CPU kernel in candle (Q4_1, Q5_0, Q5_1,
    /// Q8_1) are requantized at load to this type, which has one. Logits move
    /// slightly (measured in the engine bench); the text rarely does.
    Requantize(GgmlDType),
    /// Q4_0, Q4_1 and Q8_0 weights keep their values but are repacked at load
    /// for this crate's own kernels ([`crate::kernels`]: AMX, AVX-512 VNNI,
    /// AVX-VNNI, AVX2 or NEON, chosen at run time; all give bit-identical
    /// results); Q4_K keeps
    /// 4 bits with its sub-block scales rounded to f16; Q5_0, Q5_1, Q8_1,
    /// Q5_K and Q6_K become 8-bit asymmetric quants. Activations are quantized
    /// per 32 values as candle does, so logits differ from exact only by
    /// rounding (summation order, fused attention; measured in the engine
    /// bench). Uses the same growable KV cache and fused attention as
    /// `Requantize`.
    /// On CPUs with none of them (or with `POLLEN_KERNEL=fallback`) this behaves
    /// as `Requantize(Q8_0)`.
    #[default]
    Fast,
}

impl WeightMode {
    /// Parses `exact`, `q8_0`, `q4_0`, `q4k`... as the CLI takes it.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "exact" => Self::Exact,
            "fast" => Self::Fast,
            "q8_0" | "q8" => Self::Requantize(GgmlDType::Q8_0),
            "q4_0" => Self::Requantize(GgmlDType::Q4_0),
            "q4k" | "q4_k" => Self::Requantize(GgmlDType::Q4K),
            "q6k" | "q6_k" => Self::Requantize(GgmlDType::Q6K),
            _ => {
                return Err(ShardError::BadInput(format!(
                    "unknown weight mode `{text}` (expected fast, exact, q8_0, q4_0, q4k or q6k)"
                )));
            }
        })
    }
}

impl std::fmt::Display for WeightMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact => f.write_str("exact"),
            Self::Fast => f.write_str("fast"),
            Self::Requantize(d) => write!(f, "{}", format!("{d:?}").to_ascii_lowercase()),
        }
    }
}

/// Where and how to load weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Device for weights, caches and activations.
    pub device: Device,
    /// Exact or requantized weights.
    pub mode: WeightMode,
}

impl LoadOptions {
    /// The mode weights load in on this device. `fast` names Pollen's packed CPU
    /// kernels; on a GPU it loads as `exact`, candle's own quantized kernels for
    /// the file's types, which are that device's fast path (requantizing there
    /// gained nothing and gave non-finite logits on an H200).
    pub fn effective_mode(&self) -> WeightMode {
        match self.mode {
            WeightMode::Fast if !self.device.is_cpu() => WeightMode::Exact,
            m => m,
        }
    }
}

impl LoadOptions {
    /// Bytes of KV cache one token takes in one block of `cfg` loaded with
    /// these options: f16 keys and values in the non-exact modes on the CPU,
    /// f32 otherwise.
    pub fn kv_bytes_per_token_per_block(&self, cfg: &crate::ModelConfig) -> usize {
        let fast = self.effective_mode() != WeightMode::Exact;
        super::cache::kv_bytes_per_token_per_block(cfg, fast, &self.device)
    }

    /// Checks that the weight mode can load on this device. Requantized weights
    /// (`q8_0`, `q4_0`, `q4k`, `q6k`) are CPU-only: on a CUDA GPU (an H200) requantizing
    /// to Q8_0 gave non-finite logits, and the others were never checked there.
    pub fn check(&self) -> Result<()> {
        check_mode(self.mode, self.device.is_cpu())?;
        if self.device.is_cpu()
            && self.effective_mode() == WeightMode::Exact
            && !crate::kernels::dense_products_run()
        {
            return Err(crate::kernels::no_dense_products(
                "the exact mode (its attention is candle's)",
            ));
        }
        Ok(())
    }
}

fn check_mode(mode: WeightMode, on_cpu: bool) -> Result<()> {
    match mode {
        WeightMode::Requantize(_) if !on_cpu => Err(ShardError::BadInput(format!(
            "weights `{mode}` are CPU-only (requantized weights gave non-finite logits on a \
             GPU); on a GPU use `fast` or `exact`, which keep the file's own types"
        ))),
        _ => Ok(()),
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            mode: WeightMode::default(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requantized_weights_are_refused_on_a_gpu_with_the_way_out() {
        let q8 = WeightMode::Requantize(GgmlDType::Q8_0);
        for mode in [WeightMode::Fast, WeightMode::Exact, q8] {
            assert!(check_mode(mode, true).is_ok(), "{mode} on the CPU");
        }
        assert!(check_mode(WeightMode::Fast, false).is_ok());
        assert!(check_mode(WeightMode::Exact, false).is_ok());
        let err = check_mode(q8, false).unwrap_err().to_string();
        assert!(err.contains("q8_0") && err.contains("CPU-only"), "{err}");
        assert!(err.contains("`fast` or `exact`"), "{err}");
        assert!(LoadOptions::default().check().is_ok());
    }
}
