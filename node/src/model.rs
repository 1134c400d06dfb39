//! The model on this machine: where its file is, its id (cached), and how this node
//! computes with it.

use crate::fetch;
use crate::manifest::manifest_from_digest;
use pollen_protocol::ModelId;
use pollen_shard::{LoadOptions, ModelFile};
use std::path::Path;

/// The compute mode this node runs the model at `path` in with `opts`, as announced and
/// checked by peers: a name for the weight arithmetic and the device, equal on two nodes
/// only where their hidden states are bit-identical ([`pollen_shard::compute_mode`] says
/// which CPUs and files tell modes apart). Reads the file's header.
pub fn compute_mode(path: &Path, opts: &LoadOptions) -> Result<String, pollen_shard::ShardError> {
    pollen_shard::compute_mode(&ModelFile::open(path)?, opts)
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
    #[test]
    fn mode_names_fit_the_wire() {
        // shard's names are checked against 48 (it does not depend on the protocol).
        assert_eq!(pollen_protocol::limits::MAX_COMPUTE_LEN, 48);
    }
}
