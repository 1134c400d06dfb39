//! The architecture of a llama-family model, read from a GGUF file's metadata
//! or a safetensors model's `config.json`, and block spans over it.

use crate::{Result, ShardError};
use serde::Deserialize;

/// Positions beyond this are not supported (the rotary tables are this long).
pub const DEFAULT_MAX_SEQ_LEN: usize = 4096;

/// The shape of a llama-family model: what every span and client end needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture name as the file gives it (`llama`, `mistral`, ...).
    pub architecture: String,
    /// Display name (`general.name` or the file name).
    pub name: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Transformer blocks.
    pub num_blocks: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    pub rope_theta: f32,
    /// Rotary dimension (usually the head size).
    pub rope_dim: usize,
    /// GGUF files store q/k permuted for interleaved rotary pairs (2i, 2i+1);
    /// Hugging Face weights pair i with i+d/2.
    pub rope_interleaved: bool,
    /// The output head reuses the token embeddings.
    pub tied_embeddings: bool,
    /// Longest sequence a session may reach.
    pub max_seq_len: usize,
}

impl ModelConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Checks that the numbers are consistent before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(ShardError::BadInput(format!("model config: {d}")));
        if self.hidden_size == 0 || self.num_heads == 0 || self.num_kv_heads == 0 {
            return bad("zero hidden size or head count".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden size {} is not a multiple of {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.num_blocks == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad("zero blocks, vocabulary or MLP size".into());
        }
        // Sizes come from the file: bound them before anything is sized by
        // them (rope tables, cache accounting), so that products cannot
        // overflow. The largest open models stay far inside.
        for (what, v, max) in [
            ("hidden size", self.hidden_size, 1 << 17),
            ("MLP size", self.intermediate_size, 1 << 20),
            ("head count", self.num_heads, 1 << 12),
            ("block count", self.num_blocks, 1 << 12),
            ("vocabulary", self.vocab_size, 1 << 24),
        ] {
            if v > max {
                return bad(format!("{what} {v} exceeds the largest supported, {max}"));
            }
        }
        if self.rope_dim == 0 || self.rope_dim > self.head_dim() || !self.rope_dim.is_multiple_of(2)
        {
            return bad(format!(
                "rope dimension {} does not fit head size",
                self.rope_dim
            ));
        }
        Ok(())
    }

    /// Reads the config from `config.json` of a Hugging Face llama model.
    pub fn from_hf_json(json: &str, name: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: Option<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            vocab_size: usize,
            #[serde(default = "default_eps")]
            rms_norm_eps: f64,
            #[serde(default = "default_theta")]
            rope_theta: f32,
            #[serde(default)]
            tie_word_embeddings: Option<bool>,
            #[serde(default)]
            max_position_embeddings: Option<usize>,
            #[serde(default)]
            rope_scaling: Option<serde_json::Value>,
        }
        fn default_eps() -> f64 {
            1e-6
        }
        fn default_theta() -> f32 {
            10_000.0
        }
        let hf: Hf = serde_json::from_str(json)
            .map_err(|e| ShardError::BadInput(format!("config.json: {e}")))?;
        let arch = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .unwrap_or_default();
        let arch_ok = matches!(arch.as_str(), "llama" | "mistral" | "LlamaForCausalLM");
        if !arch_ok {
            return Err(ShardError::UnsupportedArchitecture(arch));
        }
        if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(ShardError::UnsupportedArchitecture(format!(
                "{arch} with rope_scaling {scaling}"
            )));
        }
        let cfg = Self {
            architecture: "llama".into(),
            name: name.to_string(),
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            num_blocks: hf.num_hidden_layers,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_dim: hf.hidden_size / hf.num_attention_heads.max(1),
            rope_interleaved: false,
            tied_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            max_seq_len: hf
                .max_position_embeddings
                .unwrap_or(DEFAULT_MAX_SEQ_LEN)
                .min(DEFAULT_MAX_SEQ_LEN),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The span of every block.
    pub fn full_range(&self) -> BlockRange {
        BlockRange {
            start: 0,
            end: self.num_blocks,
        }
    }
}

/// A half-open range of transformer blocks, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRange {
    /// First block.
    pub start: usize,
    /// One past the last block.
    pub end: usize,
}

impl BlockRange {
    /// A range, checked against a model of `num_blocks` blocks.
    pub fn new(start: usize, end: usize, num_blocks: usize) -> Result<Self> {
        if start >= end || end > num_blocks {
            return Err(ShardError::SpanOutOfRange {
                start,
                end,
                num_blocks,
            });
        }
        Ok(Self { start, end })
    }

    /// Parses `A:B` as the CLI writes it.
    pub fn parse(text: &str, num_blocks: usize) -> Result<Self> {
        let (a, b) = text
            .split_once(':')
            .ok_or_else(|| ShardError::BadInput(format!("span `{text}` is not of the form A:B")))?;
        let a = a
            .trim()
            .parse()
            .map_err(|_| ShardError::BadInput(format!("span `{text}`: bad start")))?;
        let b = b
            .trim()
            .parse()
            .map_err(|_| ShardError::BadInput(format!("span `{text}`: bad end")))?;
        Self::new(a, b, num_blocks)
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the range holds no block (never true for a checked range).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether block `i` is inside.
    pub fn contains(&self, i: usize) -> bool {
        (self.start..self.end).contains(&i)
    }
}

impl std::fmt::Display for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_reject_bad_ranges() {
        assert_eq!(
            BlockRange::parse("10:20", 30).ok(),
            Some(BlockRange { start: 10, end: 20 })
        );
        for bad in ["20:10", "0:31", "5:5", "x:3", "7"] {
            assert!(BlockRange::parse(bad, 30).is_err(), "{bad}");
        }
        let msg = BlockRange::parse("0:31", 30).err().map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some(
                "block span 0:31 is invalid for a model of 30 blocks \
                 (a span is START:END with 0 ≤ START < END ≤ 30)"
            )
        );
    }

    #[test]
    fn hf_config_rejects_other_architectures() {
        let json = r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#;
        assert!(matches!(
            ModelConfig::from_hf_json(json, "x"),
            Err(ShardError::UnsupportedArchitecture(_))
        ));
    }

    #[test]
    fn sizes_beyond_any_model_are_refused_before_anything_is_allocated() {
        let json = |hidden: u64, heads: u64| {
            format!(
                r#"{{"model_type":"llama","hidden_size":{hidden},"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":{heads},"vocab_size":10}}"#
            )
        };
        assert!(ModelConfig::from_hf_json(&json(8, 2), "x").is_ok());
        let msg = ModelConfig::from_hf_json(&json(1 << 40, 1), "x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("hidden size"), "{msg}");
        assert!(ModelConfig::from_hf_json(&json(1 << 14, 1 << 13), "x").is_err());
    }
}
