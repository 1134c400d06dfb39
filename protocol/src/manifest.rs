//! The model manifest: the architecture config and the blake3 hash of every part of the
//! weights. The blake3 hash of its canonical bytes is the [`ModelId`] that servers announce
//! and clients ask for.
//!
//! `pollen-shard` computes a manifest from a GGUF or safetensors file; this module only
//! defines it, its canonical bytes and its JSON form.

use serde::{Deserialize, Serialize};

use crate::hex;
use crate::limits::{MAX_ARCHITECTURE_LEN, MAX_MANIFEST_BLOCKS};
use crate::types::ModelId;

/// The domain tag at the start of a manifest's canonical bytes.
pub const MANIFEST_DOMAIN_TAG: &[u8] = b"pollen-manifest-v1";

/// The architecture config: everything needed to run the blocks, besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchConfig {
    /// The architecture's name, as GGUF's `general.architecture` spells it (`llama`).
    pub architecture: String,
    /// Width of the residual stream (576 for SmolLM2-135M).
    pub hidden_size: u32,
    /// Width of the MLP's inner layer.
    pub intermediate_size: u32,
    /// Number of query heads.
    pub num_heads: u32,
    /// Number of key/value heads (grouped-query attention); divides `num_heads`.
    pub num_kv_heads: u32,
    /// Width of one attention head.
    pub head_dim: u32,
    /// Number of transformer blocks.
    pub num_blocks: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Base frequency of the rotary embeddings.
    pub rope_theta: f32,
    /// Whether rotary embeddings rotate interleaved pairs (GGUF's layout) rather than
    /// halves.
    pub rope_interleaved: bool,
    /// Whether the output head shares the embedding matrix.
    pub tied_embeddings: bool,
    /// Longest sequence the model supports.
    pub max_seq_len: u32,
}

/// A model manifest. See [`Manifest::canonical_bytes`] for what the id covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// A display name (such as the file name). Not part of the id: two files with the same
    /// weights and config but different names are the same model.
    pub name: String,
    /// The architecture config.
    pub arch: ArchConfig,
    /// The blake3 hash of each block's weight bytes, block 0 first.
    #[serde(with = "hex::serde32_vec")]
    pub blocks: Vec<[u8; 32]>,
    /// The blake3 hash of the token embedding weights.
    #[serde(with = "hex::serde32")]
    pub embeddings: [u8; 32],
    /// The blake3 hash of the output head's weights; equals `embeddings` when tied.
    #[serde(with = "hex::serde32")]
    pub head: [u8; 32],
    /// The blake3 hash of the final norm's weights.
    #[serde(with = "hex::serde32")]
    pub final_norm: [u8; 32],
    /// The blake3 hash of the tokenizer (its canonical serialization, as `pollen-shard`
    /// defines it).
    #[serde(with = "hex::serde32")]
    pub tokenizer: [u8; 32],
}

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The number of block hashes differs from `num_blocks`.
    #[error("manifest lists {listed} block hashes but the config has {num_blocks} blocks")]
    BlockCountMismatch {
        /// Hashes listed.
        listed: usize,
        /// Blocks in the config.
        num_blocks: u32,
    },
    /// More blocks than [`MAX_MANIFEST_BLOCKS`].
    #[error("manifest has {num_blocks} blocks; at most {MAX_MANIFEST_BLOCKS} are supported")]
    TooManyBlocks {
        /// Blocks in the config.
        num_blocks: u32,
    },
    /// A size in the config is zero.
    #[error("manifest config field {what} is zero")]
    ZeroField {
        /// Which field.
        what: &'static str,
    },
    /// A float in the config is not finite and positive.
    #[error("manifest config field {what} = {value} is not a finite positive number")]
    BadFloat {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// Query heads are not a multiple of key/value heads.
    #[error("{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")]
    HeadsNotDivisible {
        /// Query heads.
        num_heads: u32,
        /// Key/value heads.
        num_kv_heads: u32,
    },
    /// Tied embeddings but the head hash differs from the embeddings hash.
    #[error("embeddings are tied but the head hash differs from the embeddings hash")]
    TiedHeadDiffers,
    /// The architecture name is empty or longer than [`MAX_ARCHITECTURE_LEN`].
    #[error("architecture name of {len} bytes; expected 1 to {MAX_ARCHITECTURE_LEN}")]
    BadArchitecture {
        /// Its length.
        len: usize,
    },
    /// The JSON could not be parsed as a manifest.
    #[error("manifest JSON is malformed: {0}")]
    Json(String),
    /// The JSON states an `id` other than the one its contents hash to.
    #[error("manifest JSON states id {stated} but its contents hash to {computed}")]
    IdMismatch {
        /// The id stated in the JSON.
        stated: String,
        /// The id computed from the contents.
        computed: ModelId,
    },
}

impl Manifest {
    /// Checks consistency: one hash per block, non-zero sizes, heads divisible, finite
    /// positive floats, head hash equal to the embeddings hash when tied.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let a = &self.arch;
        if a.architecture.is_empty() || a.architecture.len() > MAX_ARCHITECTURE_LEN {
            return Err(ManifestError::BadArchitecture {
                len: a.architecture.len(),
            });
        }
        for (what, v) in [
            ("hidden_size", a.hidden_size),
            ("intermediate_size", a.intermediate_size),
            ("num_heads", a.num_heads),
            ("num_kv_heads", a.num_kv_heads),
            ("head_dim", a.head_dim),
            ("num_blocks", a.num_blocks),
            ("vocab_size", a.vocab_size),
            ("max_seq_len", a.max_seq_len),
        ] {
            if v == 0 {
                return Err(ManifestError::ZeroField { what });
            }
        }
        if usize::try_from(a.num_blocks).map_or(true, |n| n > MAX_MANIFEST_BLOCKS) {
            return Err(ManifestError::TooManyBlocks {
                num_blocks: a.num_blocks,
            });
        }
        if self.blocks.len() != a.num_blocks as usize {
            return Err(ManifestError::BlockCountMismatch {
                listed: self.blocks.len(),
                num_blocks: a.num_blocks,
            });
        }
        if !a.num_heads.is_multiple_of(a.num_kv_heads) {
            return Err(ManifestError::HeadsNotDivisible {
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
            });
        }
        for (what, v) in [
            ("rms_norm_eps", a.rms_norm_eps),
            ("rope_theta", f64::from(a.rope_theta)),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ManifestError::BadFloat { what, value: v });
            }
        }
        if a.tied_embeddings && self.head != self.embeddings {
            return Err(ManifestError::TiedHeadDiffers);
        }
        Ok(())
    }

    /// The canonical bytes that the model id hashes. Deterministic and independent of the
    /// wire codec and of JSON; changing it changes every model id, so it carries a version in
    /// its domain tag.
    ///
    /// Layout (integers little-endian; floats by their IEEE bits, `to_bits`):
    ///
    /// | field | encoding |
    /// | --- | --- |
    /// | domain tag | the 18 bytes `pollen-manifest-v1` |
    /// | `architecture` | u32 byte length, then UTF-8 bytes |
    /// | `hidden_size`, `intermediate_size`, `num_heads`, `num_kv_heads`, `head_dim`, `num_blocks`, `vocab_size` | u32 each, in this order |
    /// | `rms_norm_eps` | u64 (`f64::to_bits`) |
    /// | `rope_theta` | u32 (`f32::to_bits`) |
    /// | `rope_interleaved`, `tied_embeddings` | one byte each, 0 or 1 |
    /// | `max_seq_len` | u32 |
    /// | `blocks` | u32 count, then 32 bytes per block |
    /// | `embeddings`, `head`, `final_norm`, `tokenizer` | 32 bytes each |
    ///
    /// The display `name` is deliberately left out.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let a = &self.arch;
        let mut out = Vec::with_capacity(128 + 32 * self.blocks.len());
        out.extend_from_slice(MANIFEST_DOMAIN_TAG);
        // Lengths fit in u32 for any manifest that validates; saturating keeps the bytes
        // well-defined for one that does not.
        let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        out.extend_from_slice(&len32(a.architecture.len()));
        out.extend_from_slice(a.architecture.as_bytes());
        for v in [
            a.hidden_size,
            a.intermediate_size,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            a.num_blocks,
            a.vocab_size,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&a.rms_norm_eps.to_bits().to_le_bytes());
        out.extend_from_slice(&a.rope_theta.to_bits().to_le_bytes());
        out.push(u8::from(a.rope_interleaved));
        out.push(u8::from(a.tied_embeddings));
        out.extend_from_slice(&a.max_seq_len.to_le_bytes());
        out.extend_from_slice(&len32(self.blocks.len()));
        for b in &self.blocks {
            out.extend_from_slice(b);
        }
        for h in [
            &self.embeddings,
            &self.head,
            &self.final_norm,
            &self.tokenizer,
        ] {
            out.extend_from_slice(h);
        }
        out
    }

    /// The model id: the blake3 hash of [`Manifest::canonical_bytes`].
    pub fn id(&self) -> ModelId {
        ModelId::from_bytes(*blake3::hash(&self.canonical_bytes()).as_bytes())
    }

    /// The manifest as one JSON object, hashes as hex strings, with the model id added as
    /// `id` (what `pollen manifest --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = &mut v {
            map.insert(
                "id".to_owned(),
                serde_json::Value::String(self.id().to_string()),
            );
        }
        v
    }

    /// Parses the JSON form (as [`Manifest::to_json`] writes it) and validates it. If the
    /// JSON has an `id`, it must be the id the contents hash to.
    pub fn from_json(json: &str) -> Result<Self, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ManifestError::Json(e.to_string()))?;
        let stated = value.get("id").cloned();
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| ManifestError::Json(e.to_string()))?;
        manifest.validate()?;
        if let Some(stated) = stated {
            let computed = manifest.id();
            let stated = stated
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| stated.to_string());
            if stated.parse::<ModelId>().ok() != Some(computed) {
                return Err(ManifestError::IdMismatch { stated, computed });
            }
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn smollm2() -> Manifest {
        Manifest {
            name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            arch: ArchConfig {
                architecture: "llama".into(),
                hidden_size: 576,
                intermediate_size: 1536,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                num_blocks: 30,
                vocab_size: 49152,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                rope_interleaved: true,
                tied_embeddings: true,
                max_seq_len: 8192,
            },
            blocks: (0..30u8).map(|i| *blake3::hash(&[i]).as_bytes()).collect(),
            embeddings: [1; 32],
            head: [1; 32],
            final_norm: [2; 32],
            tokenizer: [3; 32],
        }
    }

    #[test]
    fn valid_manifest_validates() {
        smollm2().validate().unwrap();
    }

    #[test]
    fn one_changed_block_hash_changes_the_id() {
        let m = smollm2();
        let mut changed = m.clone();
        changed.blocks[17][5] ^= 1;
        assert_ne!(m.id(), changed.id());
    }

    #[test]
    fn every_field_but_the_name_is_in_the_id() {
        let m = smollm2();
        let id = m.id();
        let mut renamed = m.clone();
        renamed.name = "renamed.gguf".into();
        assert_eq!(renamed.id(), id);

        let changes: Vec<fn(&mut Manifest)> = vec![
            |m| m.arch.architecture = "qwen2".into(),
            |m| m.arch.hidden_size += 1,
            |m| m.arch.intermediate_size += 1,
            |m| m.arch.num_heads += 1,
            |m| m.arch.num_kv_heads += 1,
            |m| m.arch.head_dim += 1,
            |m| m.arch.vocab_size += 1,
            |m| m.arch.rms_norm_eps = 1e-6,
            |m| m.arch.rope_theta = 10_000.0,
            |m| m.arch.rope_interleaved = false,
            |m| m.arch.tied_embeddings = false,
            |m| m.arch.max_seq_len = 2048,
            |m| {
                m.arch.num_blocks = 29;
                m.blocks.pop();
            },
            |m| m.embeddings[0] ^= 1,
            |m| m.head[0] ^= 1,
            |m| m.final_norm[0] ^= 1,
            |m| m.tokenizer[0] ^= 1,
        ];
        for (i, change) in changes.into_iter().enumerate() {
            let mut c = m.clone();
            change(&mut c);
            assert_ne!(c.id(), id, "change {i} did not change the id");
        }
    }

    #[test]
    fn canonical_bytes_are_pinned() {
        // Changing the layout changes every model id in the swarm: bump the domain tag.
        let m = smollm2();
        let bytes = m.canonical_bytes();
        assert!(bytes.starts_with(b"pollen-manifest-v1"));
        assert_eq!(
            bytes.len(),
            18 + 4 + 5 + 7 * 4 + 8 + 4 + 2 + 4 + 4 + 30 * 32 + 4 * 32
        );
        assert_eq!(
            m.id(),
            ModelId::from_bytes(*blake3::hash(&bytes).as_bytes())
        );
    }

    #[test]
    fn validation_errors() {
        let mut m = smollm2();
        m.blocks.pop();
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "manifest lists 29 block hashes but the config has 30 blocks"
        );
        let mut m = smollm2();
        m.head = [9; 32];
        assert_eq!(m.validate(), Err(ManifestError::TiedHeadDiffers));
        let mut m = smollm2();
        m.arch.num_kv_heads = 2;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::HeadsNotDivisible { .. })
        ));
        let mut m = smollm2();
        m.arch.rms_norm_eps = f64::NAN;
        assert!(matches!(m.validate(), Err(ManifestError::BadFloat { .. })));
        let mut m = smollm2();
        m.arch.head_dim = 0;
        assert_eq!(
            m.validate(),
            Err(ManifestError::ZeroField { what: "head_dim" })
        );
    }

    #[test]
    fn json_has_id_and_hex_hashes_and_round_trips() {
        let m = smollm2();
        let v = m.to_json();
        assert_eq!(v["id"], m.id().to_string());
        assert_eq!(v["embeddings"], "01".repeat(32));
        assert_eq!(v["blocks"].as_array().unwrap().len(), 30);
        assert_eq!(v["arch"]["hidden_size"], 576);
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(Manifest::from_json(&text).unwrap(), m);

        let mut tampered = v.clone();
        tampered["arch"]["vocab_size"] = 1.into();
        let err = Manifest::from_json(&tampered.to_string()).unwrap_err();
        assert!(matches!(err, ManifestError::IdMismatch { .. }), "{err}");
        assert!(matches!(
            Manifest::from_json("{\"name\": 1}"),
            Err(ManifestError::Json(_))
        ));
    }
}
