//! GGUF files: the header is parsed when opened (and every tensor checked
//! against the file's length), tensors are read one at a time by seeking to
//! their offset, and the tensors bear llama.cpp's names.

use super::{BlockTensorNames, TensorLocation, io_err, open_file};
use crate::config::{DEFAULT_MAX_SEQ_LEN, ModelConfig};
use crate::{Result, ShardError};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use std::io::{BufReader, Read, Seek, SeekFrom};
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

/// Bytes of a tensor's data, from its dimensions as the file states them:
/// every product is checked, so huge dimensions are an error, not a wrap.
fn gguf_tensor_len(info: &gguf_file::TensorInfo) -> Result<u64> {
    let dtype = info.ggml_dtype;
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| {
            ShardError::BadInput(format!(
                "tensor of shape {dims:?} has more elements than any file holds"
            ))
        })?;
    let bs = dtype.block_size() as u64;
    if bs == 0 || !elems.is_multiple_of(bs) {
        return Err(ShardError::BadInput(format!(
            "tensor of {elems} elements is not a whole number of {dtype:?} blocks"
        )));
    }
    (elems / bs)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| {
            ShardError::BadInput(format!(
                "tensor of shape {dims:?} has more bytes than any file holds"
            ))
        })
}

/// A buffered reader that keeps count of its own position. candle's header
/// reader asks where it is before every length-prefixed value (each string of
/// a vocabulary of 49,152), and a `BufReader` asks the file: one `lseek` each.
struct Counted<R> {
    inner: BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> Counted<R> {
    fn new(mut inner: R) -> std::io::Result<Self> {
        let pos = inner.stream_position()?;
        Ok(Self {
            inner: BufReader::new(inner),
            pos,
        })
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for Counted<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

/// Reads a GGUF header. candle's reader bounds counts and lengths by the
/// file's size, but a few stated values (an alignment of 0) make it divide
/// by zero or overflow: a header that panics it is a malformed header.
fn read_header<R: Read + Seek>(r: &mut Counted<R>, path: &Path) -> Result<gguf_file::Content> {
    let read =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(r)));
    let fmt = |detail: String| ShardError::Format {
        path: path.to_path_buf(),
        detail,
    };
    match read {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(e)) => Err(fmt(format!("cannot read the GGUF header: {e}"))),
        Err(_) => Err(fmt(
            "cannot read the GGUF header: impossible values (an alignment of 0, or offsets that overflow)"
                .into(),
        )),
    }
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
        let mut r = Counted::new(file).map_err(io_err(path))?;
        let content = read_header(&mut r, path)?;
        for (name, info) in &content.tensor_infos {
            if !supported_gguf_dtype(info.ggml_dtype) {
                return Err(ShardError::UnsupportedTensorType {
                    name: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                });
            }
            let len = gguf_tensor_len(info).map_err(|e| ShardError::Format {
                path: path.to_path_buf(),
                detail: format!("tensor `{name}`: {e}"),
            })?;
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

    /// The type a tensor is stored in.
    pub(super) fn stored_type(&self, name: &str) -> Result<GgmlDType> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.ggml_dtype)
            .ok_or_else(|| ShardError::MissingTensor(name.into()))
    }

    /// Where a tensor's bytes are, without reading them.
    pub(super) fn locate(&self, name: &str) -> Result<TensorLocation> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ShardError::MissingTensor(name.into()))?;
        // Checked when the file was opened; checked again, never wrapped.
        let offset = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .ok_or_else(|| ShardError::Format {
                path: self.path.clone(),
                detail: format!("tensor `{name}` has an impossible offset"),
            })?;
        Ok(TensorLocation {
            path: self.path.clone(),
            offset,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A GGUF v3 file written by hand, so that its numbers can lie.
    struct Raw(Vec<u8>);

    impl Raw {
        fn new(tensors: u64, kvs: u64) -> Self {
            let mut b = Vec::new();
            b.extend(0x4655_4747u32.to_le_bytes());
            b.extend(3u32.to_le_bytes());
            b.extend(tensors.to_le_bytes());
            b.extend(kvs.to_le_bytes());
            Self(b)
        }
        fn string(&mut self, s: &str) -> &mut Self {
            self.0.extend((s.len() as u64).to_le_bytes());
            self.0.extend(s.as_bytes());
            self
        }
        fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.string(key);
            self.0.extend(4u32.to_le_bytes());
            self.0.extend(v.to_le_bytes());
            self
        }
        fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
            self.string(key);
            self.0.extend(8u32.to_le_bytes());
            self.string(v)
        }
        /// A tensor of f32 (type 0) of `dims` (innermost first) at `offset`.
        fn tensor(&mut self, name: &str, dims: &[u64], offset: u64) -> &mut Self {
            self.string(name);
            self.0.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.0.extend(d.to_le_bytes());
            }
            self.0.extend(0u32.to_le_bytes());
            self.0.extend(offset.to_le_bytes());
            self
        }
        fn open(&mut self, tag: &str) -> Result<GgufModel> {
            // Some data after the header, aligned.
            self.0.extend([0u8; 256]);
            let dir = std::env::temp_dir().join(format!("pollen-gguf-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{tag}.gguf"));
            std::fs::write(&path, &self.0).unwrap();
            GgufModel::open(&path)
        }
    }

    fn err(r: Result<GgufModel>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn the_counted_reader_is_where_the_file_is() {
        enum Op {
            Read(usize),
            Seek(SeekFrom),
        }
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut plain = std::io::Cursor::new(data.clone());
        let mut counted = Counted::new(std::io::Cursor::new(data)).unwrap();
        let mut a = vec![0u8; 9_000];
        let mut b = vec![0u8; 9_000];
        // A read that fills the 8 KiB buffer, one that runs past it, reads inside
        // it, seeks of every kind, and reads at the end of the data.
        let ops = [
            Op::Read(7),
            Op::Read(8_190),
            Op::Seek(SeekFrom::Current(-3)),
            Op::Read(1),
            Op::Seek(SeekFrom::Start(4_000)),
            Op::Read(3_000),
            Op::Seek(SeekFrom::Current(5)),
            Op::Read(3),
            Op::Seek(SeekFrom::End(-20)),
            Op::Read(20),
            Op::Read(1),
            Op::Seek(SeekFrom::Start(1)),
            Op::Read(2),
        ];
        for op in ops {
            match op {
                Op::Read(n) => {
                    let want = plain.read_exact(&mut a[..n]).map_err(|e| e.kind());
                    let got = counted.read_exact(&mut b[..n]).map_err(|e| e.kind());
                    assert_eq!(got, want);
                    if want.is_ok() {
                        assert_eq!(a[..n], b[..n]);
                    }
                }
                Op::Seek(to) => assert_eq!(counted.seek(to).unwrap(), plain.seek(to).unwrap()),
            }
            assert_eq!(counted.stream_position().unwrap(), plain.position());
        }
        // The read at the end was refused, and the last ones came after it.
        assert_eq!(plain.position(), 3);
    }

    #[test]
    fn a_well_formed_hand_written_file_opens() {
        let m = Raw::new(1, 1)
            .kv_str("general.architecture", "llama")
            .tensor("w", &[4, 2], 0)
            .open("ok")
            .unwrap();
        let loc = m.locate("w").unwrap();
        assert_eq!(loc.len, 32);
        assert_eq!(loc.offset % 32, 0);
    }

    #[test]
    fn huge_dimensions_are_an_error_not_an_overflow() {
        let e = err(Raw::new(1, 0)
            .tensor("w", &[1 << 33, 1 << 33], 0)
            .open("dims"));
        assert!(e.contains("more elements than any file holds"), "{e}");
        // Elements fit in 64 bits, bytes do not.
        let e = err(Raw::new(1, 0)
            .tensor("w", &[1 << 31, 1 << 31], 0)
            .open("bytes"));
        assert!(e.contains("more bytes than any file holds"), "{e}");
        let e = err(Raw::new(1, 0)
            .tensor("w", &[1 << 20, 1 << 20], 0)
            .open("big"));
        assert!(e.contains("truncated") || e.contains("ends at byte"), "{e}");
    }

    #[test]
    fn huge_offsets_are_an_error_not_an_overflow() {
        for offset in [u64::MAX, u64::MAX - 31, 1 << 62] {
            let e = err(Raw::new(1, 0).tensor("w", &[8], offset).open("offset"));
            assert!(
                e.contains("impossible offset") || e.contains("ends at byte"),
                "{offset}: {e}"
            );
        }
    }

    #[test]
    fn a_zero_or_huge_alignment_is_an_error_not_a_panic() {
        for align in [0u32, u32::MAX] {
            let e = err(Raw::new(1, 1)
                .kv_u32("general.alignment", align)
                .tensor("w", &[8], 0)
                .open("align"));
            assert!(!e.is_empty(), "alignment {align} opened");
        }
    }

    #[test]
    fn lying_counts_are_an_error() {
        let e = err(Raw::new(u64::MAX, u64::MAX).open("counts"));
        assert!(e.contains("cannot read the GGUF header"), "{e}");
        let e = err(Raw::new(1, 0).tensor("w", &[8; 2000], 0).open("ndims"));
        assert!(e.contains("cannot read the GGUF header"), "{e}");
    }
}
