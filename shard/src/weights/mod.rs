//! Reading model files tensor by tensor.
//!
//! A span `[a, b)` must never read the other blocks' weights into memory, so
//! nothing here reads a whole file: GGUF tensors are read one at a time by
//! seeking to their offset, and safetensors tensors likewise from the byte
//! ranges in the file's JSON header. Both formats are checked for truncation
//! when opened, so a partial download fails at once with the tensor's name.

mod gguf;
mod safetensors;

pub use gguf::GgufModel;
pub use safetensors::SafetensorsModel;

use crate::config::ModelConfig;
use crate::{Result, ShardError};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A weight as read from the file: quantized (GGUF) or dense (safetensors).
#[derive(Debug)]
// One per model or per tensor read: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Weight {
    /// A GGUF tensor in its stored type.
    Quantized(QTensor),
    /// A dense tensor, already converted to f32.
    Dense(Tensor),
}

impl Weight {
    /// The weight as a dense f32 tensor.
    pub fn into_dense(self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.dequantize(device)?,
            Self::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }
}

/// Where a tensor's bytes lie in the files, for hashing without loading.
#[derive(Debug, Clone)]
pub struct TensorLocation {
    /// File that holds it.
    pub path: PathBuf,
    /// Absolute byte offset of its data.
    pub offset: u64,
    /// Length of its data in bytes.
    pub len: u64,
    /// Stored type, as the file names it.
    pub dtype: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
}

/// An opened model: GGUF file or safetensors model.
#[derive(Debug)]
pub enum ModelFile {
    /// A GGUF file (quantized weights, tokenizer in its metadata).
    Gguf(GgufModel),
    /// Safetensors weights with `config.json` and `tokenizer.json` beside them.
    Safetensors(SafetensorsModel),
}

/// Names of a block's tensors, in the file's own naming scheme.
#[derive(Debug, Clone)]
pub(crate) struct BlockTensorNames {
    pub(crate) attn_norm: String,
    pub(crate) wq: String,
    pub(crate) wk: String,
    pub(crate) wv: String,
    pub(crate) wo: String,
    pub(crate) ffn_norm: String,
    pub(crate) w_gate: String,
    pub(crate) w_up: String,
    pub(crate) w_down: String,
}

impl BlockTensorNames {
    pub(crate) fn all(&self) -> [&str; 9] {
        [
            &self.attn_norm,
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.ffn_norm,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_file(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| ShardError::Open {
        path: path.to_path_buf(),
        source,
    })
}

impl ModelFile {
    /// Opens a model: a `.gguf` file, a `.safetensors` file (with
    /// `config.json` beside it) or a directory holding a safetensors model.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| ShardError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            return SafetensorsModel::open_dir(path).map(Self::Safetensors);
        }
        let mut magic = [0u8; 4];
        let mut f = open_file(path)?;
        let n = f.read(&mut magic).map_err(io_err(path))?;
        if n == 4 && &magic == b"GGUF" {
            GgufModel::open(path).map(Self::Gguf)
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let dir = path.parent().unwrap_or(Path::new("."));
            SafetensorsModel::open_files(dir, vec![path.to_path_buf()]).map(Self::Safetensors)
        } else {
            Err(ShardError::Format {
                path: path.to_path_buf(),
                detail: "neither a GGUF file (no GGUF magic) nor a .safetensors file".into(),
            })
        }
    }

    /// The file or directory this model was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(g) => &g.path,
            Self::Safetensors(s) => &s.dir,
        }
    }

    /// The model's architecture.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Gguf(g) => g.config(),
            Self::Safetensors(s) => s.config(),
        }
    }

    /// The GGUF header, for the tokenizer.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            Self::Gguf(g) => Some(&g.content),
            Self::Safetensors(_) => None,
        }
    }

    /// `tokenizer.json` of a safetensors model.
    pub fn tokenizer_json_path(&self) -> Option<PathBuf> {
        match self {
            Self::Gguf(_) => None,
            Self::Safetensors(s) => Some(s.dir.join("tokenizer.json")),
        }
    }

    /// Names of block `i`'s tensors.
    pub(crate) fn block_names(&self, i: usize) -> BlockTensorNames {
        match self {
            Self::Gguf(_) => gguf::block_names(i),
            Self::Safetensors(_) => safetensors::block_names(i),
        }
    }

    /// Name of the token embedding tensor.
    pub(crate) fn embeddings_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => gguf::EMBEDDINGS,
            Self::Safetensors(_) => safetensors::EMBEDDINGS,
        }
    }

    /// Name of the final norm tensor.
    pub(crate) fn final_norm_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => gguf::FINAL_NORM,
            Self::Safetensors(_) => safetensors::FINAL_NORM,
        }
    }

    /// Name of the output head tensor (absent when tied).
    pub(crate) fn head_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => gguf::HEAD,
            Self::Safetensors(_) => safetensors::HEAD,
        }
    }

    /// Whether the file holds a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.has_tensor(name),
            Self::Safetensors(s) => s.has_tensor(name),
        }
    }

    /// Reads one tensor, and only that one, from the file.
    pub fn read_weight(&self, name: &str, device: &Device) -> Result<Weight> {
        match self {
            Self::Gguf(g) => g.read(name, device).map(Weight::Quantized),
            Self::Safetensors(s) => s.read(name, device).map(Weight::Dense),
        }
    }

    /// The type a tensor is stored in, as the engine reads it: a GGUF
    /// tensor's own; F32 for a safetensors model's (read as f32).
    pub(crate) fn stored_type(&self, name: &str) -> Result<GgmlDType> {
        match self {
            Self::Gguf(g) => g.stored_type(name),
            Self::Safetensors(s) => s.locate(name).map(|_| GgmlDType::F32),
        }
    }

    /// Where a tensor's bytes are, without reading them.
    pub fn locate(&self, name: &str) -> Result<TensorLocation> {
        match self {
            Self::Gguf(g) => g.locate(name),
            Self::Safetensors(s) => s.locate(name),
        }
    }
}
