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
/// same matrices on every CPU; on a CPU with none of them it runs as `q8_0`.
pub fn compute_mode(opts: &LoadOptions) -> String {
    let mode = match opts.effective_mode() {
        WeightMode::Exact => "exact".to_string(),
        WeightMode::Requantize(t) => format!("{t:?}").to_ascii_lowercase(),
        WeightMode::Fast if opts.device.is_cpu() && pollen_shard::kernels::simd_available() => {
            "fast".to_string()
        }
        WeightMode::Fast if opts.device.is_cpu() => "q8_0".to_string(),
        WeightMode::Fast => "fast".to_string(),
    };
    let device = if opts.device.is_cpu() {
        "cpu"
    } else if opts.device.is_cuda() {
        "cuda"
    } else {
        "metal"
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
