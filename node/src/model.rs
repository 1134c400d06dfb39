//! The model on this machine: where its file is, its id (cached), and how this node
//! computes with it.

use crate::fetch;
use crate::manifest::manifest_from_digest;
use pollen_protocol::ModelId;
use pollen_shard::{LoadOptions, ModelFile, WeightMode};
use std::path::Path;

/// The compute mode this node runs with `opts`, as announced and checked by peers: the
/// weight arithmetic and the device kind. Two nodes give bit-identical hidden states only
/// if their modes are equal. `fast` runs Pollen's packed kernels (AMX, AVX-512 VNNI,
/// AVX-VNNI, AVX2 or NEON, bit-identical to each other, tested in shard), packing the
/// same matrices on every CPU, with the same bits on x86-64 and aarch64 where every
/// matrix packs (the default model's logits compared); on a CPU with none of them it runs
/// as `q8_0`. The other CPU modes compute on candle's kernels, which differ by
/// architecture: exact mode's logits on aarch64 differ from x86-64's (by up to 0.86 on
/// the default model), so off x86-64 their device names the architecture
/// (`exact/cpu-aarch64`). Not named: candle also picks some kernels by CPU feature (Q8_0
/// and K-quant products on x86-64 with AVX-512; `i8mm` on aarch64), and a fast-mode
/// matrix without a packed form (Q2_K, Q3_K, odd shapes) computes on candle's product;
/// neither touches the default model's blocks (all Q4_1).
pub fn compute_mode(opts: &LoadOptions) -> String {
    let packed = opts.device.is_cpu() && pollen_shard::kernels::simd_available();
    mode_name(opts, packed, std::env::consts::ARCH)
}

/// [`compute_mode`] where `packed` says whether the fast mode runs on Pollen's packed
/// kernels and `arch` names the CPU architecture.
fn mode_name(opts: &LoadOptions, packed: bool, arch: &str) -> String {
    let (mode, on_candle) = match opts.effective_mode() {
        WeightMode::Exact => ("exact".to_string(), true),
        WeightMode::Requantize(t) => (format!("{t:?}").to_ascii_lowercase(), true),
        WeightMode::Fast if opts.device.is_cpu() && packed => ("fast".to_string(), false),
        WeightMode::Fast if opts.device.is_cpu() => ("q8_0".to_string(), true),
        WeightMode::Fast => ("fast".to_string(), false),
    };
    let device = if opts.device.is_cpu() {
        if on_candle && arch != "x86_64" {
            format!("cpu-{arch}")
        } else {
            "cpu".to_string()
        }
    } else if opts.device.is_cuda() {
        "cuda".to_string()
    } else {
        "metal".to_string()
    };
    format!("{mode}/{device}")
}

/// The model id of the file at `path`: the blake3 hash of its manifest. Hashing reads
/// every byte of the file, so the result is cached in the cache folder, keyed by the
/// file's path, size and modification time; `progress(done, total)` reports bytes hashed
/// when the cache misses.
pub fn model_id(
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ModelId, pollen_shard::ShardError> {
    let key = fetch::file_key(path);
    let cached = key
        .as_deref()
        .and_then(|k| fetch::read_cached("model-ids", k));
    if let Some(id) = cached.and_then(|t| t.parse::<ModelId>().ok()) {
        return Ok(id);
    }
    let file = ModelFile::open(path)?;
    let digest = pollen_shard::digest::digest(&file, &mut |d, t| progress(d as u64, t as u64))?;
    let id = manifest_from_digest(&digest).id();
    if let Some(key) = key {
        fetch::write_cached("model-ids", &key, &id.to_string());
    }
    Ok(id)
}

#[cfg(test)]
mod mode_tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn candle_modes_name_the_architecture_off_x86_64() {
        let cpu = |mode| LoadOptions {
            device: candle_core::Device::Cpu,
            mode,
        };
        let q8 = WeightMode::Requantize(GgmlDType::Q8_0);
        for arch in ["x86_64", "aarch64"] {
            assert_eq!(mode_name(&cpu(WeightMode::Fast), true, arch), "fast/cpu");
        }
        assert_eq!(
            mode_name(&cpu(WeightMode::Exact), true, "x86_64"),
            "exact/cpu"
        );
        assert_eq!(mode_name(&cpu(q8), true, "x86_64"), "q8_0/cpu");
        assert_eq!(
            mode_name(&cpu(WeightMode::Fast), false, "x86_64"),
            "q8_0/cpu"
        );
        let arm = mode_name(&cpu(WeightMode::Exact), true, "aarch64");
        assert_eq!(arm, "exact/cpu-aarch64");
        assert_eq!(mode_name(&cpu(q8), true, "aarch64"), "q8_0/cpu-aarch64");
        assert_eq!(
            mode_name(&cpu(WeightMode::Fast), false, "aarch64"),
            "q8_0/cpu-aarch64"
        );
        for arch in ["aarch64", "riscv64", "powerpc64", "loongarch64"] {
            let long = mode_name(&cpu(WeightMode::Requantize(GgmlDType::Q4K)), true, arch);
            assert!(
                long.len() <= pollen_protocol::limits::MAX_COMPUTE_LEN,
                "{long}"
            );
        }
    }
}
