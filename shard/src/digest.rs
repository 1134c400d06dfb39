//! Hashes of a model's weights, block by block, computed by streaming the
//! file (never holding it in memory). The node turns a [`ModelDigest`] into
//! the protocol's manifest, whose hash is the model id peers announce.

use crate::config::ModelConfig;
use crate::weights::{ModelFile, TensorLocation};
use crate::{Result, ShardError};
use candle_core::quantized::gguf_file;
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

/// Appends the canonical bytes of a GGUF metadata value to `out`.
///
/// The encoding is written out here, rather than taken from candle's types,
/// so that it cannot change with a candle or Rust upgrade (it feeds the
/// model id). A value is a one-byte type tag, GGUF's own type code, then
/// its contents:
///
/// | tag | type   | contents                                            |
/// |-----|--------|-----------------------------------------------------|
/// | 0   | u8     | 1 byte                                              |
/// | 1   | i8     | 1 byte, two's complement                            |
/// | 2   | u16    | 2 bytes, little-endian                              |
/// | 3   | i16    | 2 bytes, little-endian                              |
/// | 4   | u32    | 4 bytes, little-endian                              |
/// | 5   | i32    | 4 bytes, little-endian                              |
/// | 6   | f32    | the 4 bytes of its IEEE 754 bits, little-endian     |
/// | 7   | bool   | 1 byte, 0 or 1                                      |
/// | 8   | string | length in bytes as u64 LE, then the UTF-8 bytes     |
/// | 9   | array  | item count as u64 LE, then each item's own encoding |
/// | 10  | u64    | 8 bytes, little-endian                              |
/// | 11  | i64    | 8 bytes, little-endian                              |
/// | 12  | f64    | the 8 bytes of its IEEE 754 bits, little-endian     |
///
/// Array items carry their own tags, so nested and mixed arrays are
/// unambiguous.
pub fn encode_gguf_value(v: &gguf_file::Value, out: &mut Vec<u8>) {
    use gguf_file::Value as V;
    match v {
        V::U8(x) => {
            out.push(0);
            out.push(*x);
        }
        V::I8(x) => {
            out.push(1);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::U16(x) => {
            out.push(2);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::I16(x) => {
            out.push(3);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::U32(x) => {
            out.push(4);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::I32(x) => {
            out.push(5);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::F32(x) => {
            out.push(6);
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        V::Bool(x) => {
            out.push(7);
            out.push(u8::from(*x));
        }
        V::String(x) => {
            out.push(8);
            out.extend_from_slice(&(x.len() as u64).to_le_bytes());
            out.extend_from_slice(x.as_bytes());
        }
        V::Array(items) => {
            out.push(9);
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_gguf_value(item, out);
            }
        }
        V::U64(x) => {
            out.push(10);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::I64(x) => {
            out.push(11);
            out.extend_from_slice(&x.to_le_bytes());
        }
        V::F64(x) => {
            out.push(12);
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
}

/// GGUF metadata keys that define the tokenizer, in hashing order.
const TOKENIZER_KEYS: [&str; 7] = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.bos_token_id",
];

/// The tokenizer's hash. GGUF: blake3 over, for each of [`TOKENIZER_KEYS`]
/// in order, the key's length as u64 LE and its bytes, then one byte 0 if
/// the file lacks the key, or 1 and the value as [`encode_gguf_value`]
/// writes it. Safetensors: blake3 of `tokenizer.json`'s bytes.
fn hash_tokenizer(file: &ModelFile) -> Result<Hash> {
    let mut h = blake3::Hasher::new();
    if let Some(ct) = file.gguf_content() {
        let mut buf = Vec::new();
        for key in TOKENIZER_KEYS {
            buf.clear();
            buf.extend_from_slice(&(key.len() as u64).to_le_bytes());
            buf.extend_from_slice(key.as_bytes());
            match ct.metadata.get(key) {
                None => buf.push(0),
                Some(v) => {
                    buf.push(1);
                    encode_gguf_value(v, &mut buf);
                }
            }
            h.update(&buf);
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

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value as V;

    fn encode(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        encode_gguf_value(v, &mut out);
        out
    }

    #[test]
    fn scalars_are_a_tag_then_little_endian_bytes() {
        assert_eq!(encode(&V::U8(0xAB)), [0, 0xAB]);
        assert_eq!(encode(&V::I8(-2)), [1, 0xFE]);
        assert_eq!(encode(&V::U16(0x0102)), [2, 0x02, 0x01]);
        assert_eq!(encode(&V::I16(-1)), [3, 0xFF, 0xFF]);
        assert_eq!(encode(&V::U32(0x01020304)), [4, 4, 3, 2, 1]);
        assert_eq!(encode(&V::I32(-2)), [5, 0xFE, 0xFF, 0xFF, 0xFF]);
        assert_eq!(encode(&V::F32(1.0)), [6, 0x00, 0x00, 0x80, 0x3F]);
        assert_eq!(encode(&V::Bool(false)), [7, 0]);
        assert_eq!(encode(&V::Bool(true)), [7, 1]);
        assert_eq!(
            encode(&V::U64(0x0102030405060708)),
            [10, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(
            encode(&V::I64(-1)),
            [11, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        );
        assert_eq!(encode(&V::F64(-2.0)), [12, 0, 0, 0, 0, 0, 0, 0, 0xC0]);
        // Floats by their bits: the two zeros differ, a NaN keeps its payload.
        assert_eq!(encode(&V::F32(-0.0)), [6, 0, 0, 0, 0x80]);
        assert_eq!(
            encode(&V::F32(f32::from_bits(0x7FC0_0001))),
            [6, 0x01, 0x00, 0xC0, 0x7F]
        );
    }

    #[test]
    fn strings_and_arrays_are_length_prefixed_and_nest() {
        assert_eq!(
            encode(&V::String("hé".into())),
            [8, 3, 0, 0, 0, 0, 0, 0, 0, b'h', 0xC3, 0xA9]
        );
        assert_eq!(encode(&V::Array(vec![])), [9, 0, 0, 0, 0, 0, 0, 0, 0]);
        let nested = V::Array(vec![
            V::String("a".into()),
            V::Array(vec![V::U8(7), V::Bool(true)]),
        ]);
        #[rustfmt::skip]
        let want = [
            9, 2, 0, 0, 0, 0, 0, 0, 0,
            8, 1, 0, 0, 0, 0, 0, 0, 0, b'a',
            9, 2, 0, 0, 0, 0, 0, 0, 0,
            0, 7,
            7, 1,
        ];
        assert_eq!(encode(&nested), want);
        // Where an item ends is unambiguous: ["ab"] and ["a", "b"] differ.
        assert_ne!(
            encode(&V::Array(vec![V::String("ab".into())])),
            encode(&V::Array(vec![
                V::String("a".into()),
                V::String("b".into())
            ]))
        );
    }
}
