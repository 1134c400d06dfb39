//! Reading model files tensor by tensor.
//!
//! A span `[a, b)` must never read the other blocks' weights into memory, so
//! nothing here reads a whole file: GGUF tensors are read one at a time by
//! seeking to their offset, and safetensors tensors likewise from the byte
//! ranges in the file's JSON header. Both formats are checked for truncation
//! when opened, so a partial download fails at once with the tensor's name.

use crate::config::{DEFAULT_MAX_SEQ_LEN, ModelConfig};
use crate::{Result, ShardError};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Largest safetensors JSON header we accept (the format's own limit is 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// A weight as read from the file: quantized (GGUF) or dense (safetensors).
#[derive(Debug)]
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

/// An opened GGUF file: only its header is in memory.
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: gguf_file::Content,
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone)]
struct StEntry {
    file: usize,
    dtype: DType,
    dtype_name: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// An opened safetensors model: headers, config and tokenizer path.
#[derive(Debug)]
pub struct SafetensorsModel {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: HashMap<String, StEntry>,
    config_json: String,
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
            Self::Safetensors(s) => {
                let name = s
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into());
                let mut cfg = ModelConfig::from_hf_json(&s.config_json, &name)?;
                if !cfg.tied_embeddings && !s.tensors.contains_key("lm_head.weight") {
                    cfg.tied_embeddings = true;
                }
                Ok(cfg)
            }
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

    pub(crate) fn block_names(&self, i: usize) -> BlockTensorNames {
        match self {
            Self::Gguf(_) => BlockTensorNames {
                attn_norm: format!("blk.{i}.attn_norm.weight"),
                wq: format!("blk.{i}.attn_q.weight"),
                wk: format!("blk.{i}.attn_k.weight"),
                wv: format!("blk.{i}.attn_v.weight"),
                wo: format!("blk.{i}.attn_output.weight"),
                ffn_norm: format!("blk.{i}.ffn_norm.weight"),
                w_gate: format!("blk.{i}.ffn_gate.weight"),
                w_up: format!("blk.{i}.ffn_up.weight"),
                w_down: format!("blk.{i}.ffn_down.weight"),
            },
            Self::Safetensors(_) => {
                let p = format!("model.layers.{i}");
                BlockTensorNames {
                    attn_norm: format!("{p}.input_layernorm.weight"),
                    wq: format!("{p}.self_attn.q_proj.weight"),
                    wk: format!("{p}.self_attn.k_proj.weight"),
                    wv: format!("{p}.self_attn.v_proj.weight"),
                    wo: format!("{p}.self_attn.o_proj.weight"),
                    ffn_norm: format!("{p}.post_attention_layernorm.weight"),
                    w_gate: format!("{p}.mlp.gate_proj.weight"),
                    w_up: format!("{p}.mlp.up_proj.weight"),
                    w_down: format!("{p}.mlp.down_proj.weight"),
                }
            }
        }
    }

    /// Name of the token embedding tensor.
    pub(crate) fn embeddings_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "token_embd.weight",
            Self::Safetensors(_) => "model.embed_tokens.weight",
        }
    }

    /// Name of the final norm tensor.
    pub(crate) fn final_norm_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "output_norm.weight",
            Self::Safetensors(_) => "model.norm.weight",
        }
    }

    /// Name of the output head tensor (absent when tied).
    pub(crate) fn head_name(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "output.weight",
            Self::Safetensors(_) => "lm_head.weight",
        }
    }

    /// Whether the file holds a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.content.tensor_infos.contains_key(name),
            Self::Safetensors(s) => s.tensors.contains_key(name),
        }
    }

    /// Reads one tensor, and only that one, from the file.
    pub fn read_weight(&self, name: &str, device: &Device) -> Result<Weight> {
        match self {
            Self::Gguf(g) => {
                if !g.content.tensor_infos.contains_key(name) {
                    return Err(ShardError::MissingTensor(name.into()));
                }
                let mut r = BufReader::new(open_file(&g.path)?);
                let t = g.content.tensor(&mut r, name, device)?;
                Ok(Weight::Quantized(t))
            }
            Self::Safetensors(s) => s.read(name, device).map(Weight::Dense),
        }
    }

    /// Where a tensor's bytes are, without reading them.
    pub fn locate(&self, name: &str) -> Result<TensorLocation> {
        match self {
            Self::Gguf(g) => {
                let info = g
                    .content
                    .tensor_infos
                    .get(name)
                    .ok_or_else(|| ShardError::MissingTensor(name.into()))?;
                Ok(TensorLocation {
                    path: g.path.clone(),
                    offset: g.content.tensor_data_offset + info.offset,
                    len: gguf_tensor_len(info)?,
                    dtype: format!("{:?}", info.ggml_dtype),
                    shape: info.shape.dims().to_vec(),
                })
            }
            Self::Safetensors(s) => {
                let e = s
                    .tensors
                    .get(name)
                    .ok_or_else(|| ShardError::MissingTensor(name.into()))?;
                Ok(TensorLocation {
                    path: s.files[e.file].clone(),
                    offset: e.start,
                    len: e.end - e.start,
                    dtype: e.dtype_name.clone(),
                    shape: e.shape.clone(),
                })
            }
        }
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
    fn open(path: &Path) -> Result<Self> {
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

    fn config(&self) -> Result<ModelConfig> {
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
            .get("token_embd.weight")
            .ok_or_else(|| ShardError::MissingTensor("token_embd.weight".into()))?;
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
            tied_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            max_seq_len: context.clamp(1, DEFAULT_MAX_SEQ_LEN),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl SafetensorsModel {
    fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ShardError::Format {
                    path: index.clone(),
                    detail: e.to_string(),
                })?;
            let mut names: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_files(dir, files)
    }

    fn open_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_json =
            std::fs::read_to_string(&config_path).map_err(|source| ShardError::Open {
                path: config_path.clone(),
                source,
            })?;
        let mut tensors = HashMap::new();
        for (idx, path) in files.iter().enumerate() {
            for (name, mut e) in read_safetensors_header(path)? {
                e.file = idx;
                tensors.insert(name, e);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            config_json,
        })
    }

    fn read(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ShardError::MissingTensor(name.into()))?;
        let path = &self.files[e.file];
        let mut f = open_file(path)?;
        f.seek(SeekFrom::Start(e.start)).map_err(io_err(path))?;
        let len = usize::try_from(e.end - e.start).map_err(|_| ShardError::Format {
            path: path.clone(),
            detail: format!("tensor `{name}` is too large for this machine"),
        })?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).map_err(io_err(path))?;
        let t = Tensor::from_raw_buffer(&buf, e.dtype, &e.shape, device)?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

fn read_safetensors_header(path: &Path) -> Result<Vec<(String, StEntry)>> {
    let mut f = open_file(path)?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let fmt = |detail: String| ShardError::Format {
        path: path.to_path_buf(),
        detail,
    };
    let mut len_buf = [0u8; 8];
    f.read_exact(&mut len_buf)
        .map_err(|_| fmt("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_buf);
    if header_len > MAX_SAFETENSORS_HEADER || header_len + 8 > file_len {
        return Err(fmt(format!(
            "header length {header_len} is impossible for a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| fmt(format!("header JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| fmt("header is not a JSON object".into()))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| fmt(format!("tensor `{name}` has no dtype")))?
            .to_string();
        let dtype = match dtype_name.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            _ => {
                return Err(ShardError::UnsupportedTensorType {
                    name: name.clone(),
                    dtype: dtype_name,
                });
            }
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64())
                    .map(|d| d as usize)
                    .collect()
            })
            .ok_or_else(|| fmt(format!("tensor `{name}` has no shape")))?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        let [s, e] = offs[..] else {
            return Err(fmt(format!("tensor `{name}` has bad data_offsets")));
        };
        let expected = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            });
        if e < s || expected != Some(e - s) {
            return Err(fmt(format!(
                "tensor `{name}`: {} bytes do not match shape {shape:?} of {dtype_name}",
                e.saturating_sub(s)
            )));
        }
        let (start, end) = (data_start + s, data_start + e);
        if end > file_len {
            return Err(ShardError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor `{name}` ends at byte {end} but the file has {file_len} bytes"
                ),
            });
        }
        out.push((
            name.clone(),
            StEntry {
                file: 0,
                dtype,
                dtype_name,
                shape,
                start,
                end,
            },
        ));
    }
    Ok(out)
}
