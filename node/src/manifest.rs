//! A model's manifest: the engine's weight digest in the protocol's terms.

use pollen_protocol::manifest::{ArchConfig, Manifest};
use pollen_shard::digest::ModelDigest;

/// The protocol manifest of a digested model.
pub fn manifest_from_digest(d: &ModelDigest) -> Manifest {
    let c = &d.config;
    Manifest {
        name: c.name.clone(),
        arch: ArchConfig {
            architecture: c.architecture.clone(),
            hidden_size: c.hidden_size as u32,
            intermediate_size: c.intermediate_size as u32,
            num_heads: c.num_heads as u32,
            num_kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim() as u32,
            num_blocks: c.num_blocks as u32,
            vocab_size: c.vocab_size as u32,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_interleaved: c.rope_interleaved,
            tied_embeddings: c.tied_embeddings,
            max_seq_len: c.max_seq_len as u32,
        },
        blocks: d.blocks.clone(),
        embeddings: d.embeddings,
        head: d.head,
        final_norm: d.final_norm,
        tokenizer: d.tokenizer,
    }
}
