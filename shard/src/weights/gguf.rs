//! GGUF files: the header is parsed when opened (and every tensor checked
//! against the file's length), tensors are read one at a time by seeking to
//! their offset, and the tensors bear llama.cpp's names.

use super::{BlockTensorNames, TensorLocation, io_err, open_file};
use crate::config::{DEFAULT_MAX_SEQ_LEN, ModelConfig};
use crate::{Result, ShardError};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Token embeddings, as llama.cpp names them.
pub(super) const EMBEDDINGS: &str = "token_embd.weight";
/// Final norm.
pub(super) const FINAL_NORM: &str = "output_norm.weight";
/// Output head (absent when tied to the embeddings).
pub(super) const HEAD: &str = "output.weight";

/// An opened GGUF file: only its header is in memory.
#[derive(Debug)]
pub struct GgufModel {
    pub(super) path: PathBuf,
    pub(super) content: gguf_file::Content,
}

/// Names of block `i`'s tensors.
pub(super) fn block_names(i: usize) -> BlockTensorNames {
    BlockTensorNames {
        attn_norm: format!("blk.{i}.attn_norm.weight"),
        wq: format!("blk.{i}.attn_q.weight"),
        wk: format!("blk.{i}.attn_k.weight"),
        wv: format!("blk.{i}.attn_v.weight"),
        wo: format!("blk.{i}.attn_output.weight"),
        ffn_norm: format!("blk.{i}.ffn_norm.weight"),
        w_gate: format!("blk.{i}.ffn_gate.weight"),
        w_up: format!("blk.{i}.ffn_up.weight"),
        w_down: format!("blk.{i}.ffn_down.weight"),
    }
}

fn gguf_tensor_len(info: &gguf_file::TensorInfo) -> Result<u64> {
    let dtype = info.ggml_dtype;
    let elems = info.shape.elem_count();
    let bs = dtype.block_size();
    if bs == 0 || !elems.is_multiple_of(bs) {
        return Err(ShardError::BadInput(format!(
            "tensor of {elems} elements is not a whole number of {dtype:?} blocks"
        )));
    }
    Ok((elems / bs * dtype.type_size()) as u64)
}

fn supported_gguf_dtype(d: GgmlDType) -> bool {
    use GgmlDType as G;
    matches!(
        d,
        G::F32
            | G::F16
            | G::BF16
            | G::Q4_0
            | G::Q4_1
            | G::Q5_0
            | G::Q5_1
            | G::Q8_0
            | G::Q8_1
            | G::Q2K
            | G::Q3K
            | G::Q4K
            | G::Q5K
            | G::Q6K
            | G::Q8K
    )
}

impl GgufModel {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let file = open_file(path)?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut r = BufReader::new(file);
        let content = gguf_file::Content::read(&mut r).map_err(|e| ShardError::Format {
            path: path.to_path_buf(),
            detail: format!("cannot read the GGUF header: {e}"),
        })?;
        for (name, info) in &content.tensor_infos {
            if !supported_gguf_dtype(info.ggml_dtype) {
                return Err(ShardError::UnsupportedTensorType {
                    name: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                });
            }
            let len = gguf_tensor_len(info)?;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|o| o.checked_add(len))
                .ok_or_else(|| ShardError::Format {
                    path: path.to_path_buf(),
                    detail: format!("tensor `{name}` has an impossible offset"),
                })?;
            if end > file_len {
                return Err(ShardError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!(
                        "tensor `{name}` ends at byte {end} but the file has {file_len} bytes"
                    ),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// Whether the file holds a tensor of this name.
    pub(super) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor, and only that one, in its stored type.
    pub(super) fn read(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(ShardError::MissingTensor(name.into()));
        }
        let mut r = BufReader::new(open_file(&self.path)?);
        Ok(self.content.tensor(&mut r, name, device)?)
    }

    /// Where a tensor's bytes are, without reading them.
    pub(super) fn locate(&self, name: &str) -> Result<TensorLocation> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ShardError::MissingTensor(name.into()))?;
        Ok(TensorLocation {
            path: self.path.clone(),
            offset: self.content.tensor_data_offset + info.offset,
            len: gguf_tensor_len(info)?,
            dtype: format!("{:?}", info.ggml_dtype),
            shape: info.shape.dims().to_vec(),
        })
    }

    fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    fn meta_u32(&self, key: &str) -> Result<usize> {
        let v = self.meta(key).ok_or_else(|| ShardError::Format {
            path: self.path.clone(),
            detail: format!("metadata key `{key}` is missing"),
        })?;
        Ok(v.to_u32().map_err(|e| ShardError::Format {
            path: self.path.clone(),
            detail: format!("metadata key `{key}`: {e}"),
        })? as usize)
    }

    pub(super) fn config(&self) -> Result<ModelConfig> {
        let arch = self
            .meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(ShardError::UnsupportedArchitecture(arch));
        }
        if self
            .meta(&format!("{arch}.expert_count"))
            .and_then(|v| v.to_u32().ok())
            .is_some_and(|n| n > 1)
        {
            return Err(ShardError::UnsupportedArchitecture(format!(
                "{arch} mixture-of-experts"
            )));
        }
        let hidden_size = self.meta_u32(&format!("{arch}.embedding_length"))?;
        let num_heads = self.meta_u32(&format!("{arch}.attention.head_count"))?;
        let num_kv_heads = self
            .meta_u32(&format!("{arch}.attention.head_count_kv"))
            .unwrap_or(num_heads);
        let num_blocks = self.meta_u32(&format!("{arch}.block_count"))?;
        let intermediate_size = self.meta_u32(&format!("{arch}.feed_forward_length"))?;
        let rope_dim = self
            .meta_u32(&format!("{arch}.rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads.max(1));
        let rms_norm_eps = self
            .meta(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-5) as f64;
        let rope_theta = self
            .meta(&format!("{arch}.rope.freq_base"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let context = self
            .meta_u32(&format!("{arch}.context_length"))
            .unwrap_or(DEFAULT_MAX_SEQ_LEN);
        let embd = self
            .content
            .tensor_infos
            .get(EMBEDDINGS)
            .ok_or_else(|| ShardError::MissingTensor(EMBEDDINGS.into()))?;
        let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
        let name = self
            .meta("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| {
                self.path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let cfg = ModelConfig {
            architecture: arch,
            name,
            hidden_size,
            intermediate_size,
            num_heads,
            num_kv_heads,
            num_blocks,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_dim,
            rope_interleaved: true,
            tied_embeddings: !self.content.tensor_infos.contains_key(HEAD),
            max_seq_len: context.clamp(1, DEFAULT_MAX_SEQ_LEN),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
