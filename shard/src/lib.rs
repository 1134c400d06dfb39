//! Pollen's model engine, on candle.
//!
//! `shard` loads a llama-family model (GGUF or safetensors) and runs any
//! contiguous span of its transformer blocks, `[a, b)`, with one KV cache per
//! session and explicit token positions, so that spans held by different
//! machines chain into the whole model. It also holds the client's ends of the
//! model: tokenizer, chat template, embeddings, final norm, output head and
//! sampling.
//!
//! It must not know about the network: no libp2p, no tokio, no wire format.
//! Hidden states go in and out as candle tensors; the node crate turns them
//! into frames.

mod attention;
pub mod chat;
pub mod config;
pub mod device;
pub mod digest;
mod elementary;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod llama;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::{BlockRange, ModelConfig};
pub use error::ShardError;
pub use generate::{GenerateParams, LocalModel};
pub use llama::{
    BlockSpan, CacheLimits, ClientEnds, LoadOptions, SpanCache, WeightMode, compute_mode,
};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::PollenTokenizer;
pub use weights::ModelFile;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ShardError>;
