//! Hashes of a model's weights, block by block, computed by streaming the
//! file (never holding it in memory). The node turns a [`ModelDigest`] into
//! the protocol's manifest, whose hash is the model id peers announce.

use crate::config::ModelConfig;
use crate::weights::{ModelFile, TensorLocation};
use crate::{Result, ShardError};
use std::io::{Read, Seek, SeekFrom};

/// A blake3 hash.
pub type Hash = [u8; 32];

/// Hashes of everything a peer might hold of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDigest {
    /// The architecture.
    pub config: ModelConfig,
    /// One hash per block, over its tensors' names, types, shapes and bytes.
    pub blocks: Vec<Hash>,
    /// Token embeddings.
    pub embeddings: Hash,
    /// Output head (the embeddings' hash when tied).
    pub head: Hash,
    /// Final norm.
    pub final_norm: Hash,
    /// Tokenizer: vocabulary, merges and token types.
    pub tokenizer: Hash,
}

fn hash_tensor(h: &mut blake3::Hasher, loc: &TensorLocation, buf: &mut [u8]) -> Result<()> {
    h.update(loc.dtype.as_bytes());
    h.update(&(loc.shape.len() as u64).to_le_bytes());
    for d in &loc.shape {
        h.update(&(*d as u64).to_le_bytes());
    }
    h.update(&loc.len.to_le_bytes());
    let io = |source| ShardError::Io {
        path: loc.path.clone(),
        source,
    };
    let mut f = std::fs::File::open(&loc.path).map_err(io)?;
    f.seek(SeekFrom::Start(loc.offset)).map_err(io)?;
    let mut left = loc.len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n]).map_err(io)?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

fn hash_tensors(file: &ModelFile, names: &[&str], buf: &mut [u8]) -> Result<Hash> {
    let mut h = blake3::Hasher::new();
    for (i, name) in names.iter().enumerate() {
        h.update(&(i as u64).to_le_bytes());
        hash_tensor(&mut h, &file.locate(name)?, buf)?;
    }
    Ok(*h.finalize().as_bytes())
}

fn hash_tokenizer(file: &ModelFile) -> Result<Hash> {
    let mut h = blake3::Hasher::new();
    if let Some(ct) = file.gguf_content() {
        for key in [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.bos_token_id",
        ] {
            h.update(key.as_bytes());
            if let Some(v) = ct.metadata.get(key) {
                // Debug output of a GGUF value is deterministic: type and contents.
                h.update(format!("{v:?}").as_bytes());
            }
            h.update(&[0]);
        }
    } else if let Some(path) = file.tokenizer_json_path() {
        let bytes = std::fs::read(&path).map_err(|source| ShardError::Io {
            path: path.clone(),
            source,
        })?;
        h.update(&bytes);
    }
    Ok(*h.finalize().as_bytes())
}

/// Hashes every block and end of `file`, streaming its bytes.
pub fn digest(file: &ModelFile, progress: &mut dyn FnMut(usize, usize)) -> Result<ModelDigest> {
    let config = file.config()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut blocks = Vec::with_capacity(config.num_blocks);
    for i in 0..config.num_blocks {
        let names = file.block_names(i);
        blocks.push(hash_tensors(file, &names.all(), &mut buf)?);
        progress(i + 1, config.num_blocks);
    }
    let embeddings = hash_tensors(file, &[file.embeddings_name()], &mut buf)?;
    let head = if file.has_tensor(file.head_name()) {
        hash_tensors(file, &[file.head_name()], &mut buf)?
    } else {
        embeddings
    };
    let final_norm = hash_tensors(file, &[file.final_norm_name()], &mut buf)?;
    Ok(ModelDigest {
        config,
        blocks,
        embeddings,
        head,
        final_norm,
        tokenizer: hash_tokenizer(file)?,
    })
}
