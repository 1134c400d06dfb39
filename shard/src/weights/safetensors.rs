//! Safetensors models: one file or several (with an index), `config.json`
//! and `tokenizer.json` beside them. Each file's JSON header is read and
//! checked when opened; tensors are read one at a time from their byte
//! ranges, and bear Hugging Face's names.

use super::{BlockTensorNames, TensorLocation, io_err, open_file};
use crate::config::ModelConfig;
use crate::{Result, ShardError};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Largest safetensors JSON header we accept (the format's own limit is 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// Token embeddings, as Hugging Face names them.
pub(super) const EMBEDDINGS: &str = "model.embed_tokens.weight";
/// Final norm.
pub(super) const FINAL_NORM: &str = "model.norm.weight";
/// Output head (absent when tied to the embeddings).
pub(super) const HEAD: &str = "lm_head.weight";

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
    pub(super) dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: HashMap<String, StEntry>,
    config_json: String,
}

/// Names of block `i`'s tensors.
pub(super) fn block_names(i: usize) -> BlockTensorNames {
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

impl SafetensorsModel {
    pub(super) fn open_dir(dir: &Path) -> Result<Self> {
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

    pub(super) fn open_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
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

    /// The architecture, from `config.json`; the head counts as tied when
    /// the weights have none.
    pub(super) fn config(&self) -> Result<ModelConfig> {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let mut cfg = ModelConfig::from_hf_json(&self.config_json, &name)?;
        if !cfg.tied_embeddings && !self.tensors.contains_key(HEAD) {
            cfg.tied_embeddings = true;
        }
        Ok(cfg)
    }

    /// Whether the model holds a tensor of this name.
    pub(super) fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Where a tensor's bytes are, without reading them.
    pub(super) fn locate(&self, name: &str) -> Result<TensorLocation> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ShardError::MissingTensor(name.into()))?;
        Ok(TensorLocation {
            path: self.files[e.file].clone(),
            offset: e.start,
            len: e.end - e.start,
            dtype: e.dtype_name.clone(),
            shape: e.shape.clone(),
        })
    }

    /// Reads one tensor, and only that one, as f32.
    pub(super) fn read(&self, name: &str, device: &Device) -> Result<Tensor> {
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
        // Every dimension must be a whole number that fits this machine;
        // one that is not is an error, not a dimension dropped.
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| fmt(format!("tensor `{name}` has no valid shape")))?;
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
        // Offsets come from the file: add them without overflow. `s <= e`,
        // so once `end` fits, `start` does.
        let end = match data_start.checked_add(e) {
            Some(end) if end <= file_len => end,
            _ => {
                return Err(ShardError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!(
                        "tensor `{name}` ends {e} bytes after the header, \
                         but the file has {file_len} bytes"
                    ),
                });
            }
        };
        let start = data_start + s;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Writes a safetensors file with this JSON header and `data` after it.
    fn write(name: &str, header: &str, data: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pollen-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn err(path: &Path) -> String {
        read_safetensors_header(path).err().unwrap().to_string()
    }

    #[test]
    fn a_well_formed_header_reads() {
        let path = write(
            "ok.safetensors",
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
            &[0; 16],
        );
        let entries = read_safetensors_header(&path).unwrap();
        assert_eq!(entries.len(), 1);
        let (name, e) = &entries[0];
        assert_eq!(
            (name.as_str(), &e.shape[..], e.end - e.start),
            ("w", &[2, 2][..], 16)
        );
    }

    #[test]
    fn offsets_past_any_file_are_an_error_not_an_overflow() {
        let max = u64::MAX;
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[2],"data_offsets":[{},{max}]}}}}"#,
            max - 8
        );
        let path = write("huge.safetensors", &header, &[0; 8]);
        let e = err(&path);
        assert!(e.contains("truncated") && e.contains("`w`"), "{e}");
    }

    #[test]
    fn a_dimension_that_is_not_a_whole_number_is_an_error() {
        for (i, shape) in [r#"[2,"x"]"#, "[2,-1]", "[2,1.5]"].iter().enumerate() {
            let header =
                format!(r#"{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,8]}}}}"#);
            let path = write(&format!("shape{i}.safetensors"), &header, &[0; 8]);
            let e = err(&path);
            assert!(e.contains("no valid shape"), "{shape}: {e}");
        }
    }
}
