//! Errors of the model engine.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The model file does not exist or cannot be opened.
    #[error("cannot open model file {path}: {source}")]
    Open {
        /// The path that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is shorter than its header says: a partial download.
    #[error("model file {path} is truncated: {detail}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Which tensor runs past the end, and by how much.
        detail: String,
    },
    /// The file is not a GGUF or safetensors model we can read.
    #[error("model file {path} is not a valid model: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The model is of an architecture the engine does not implement.
    #[error("unsupported architecture `{0}` (supported: llama and its GGUF/HF variants)")]
    UnsupportedArchitecture(String),
    /// A tensor has a type the engine cannot compute with.
    #[error("tensor `{name}` has unsupported type {dtype}")]
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// Its type, as the file names it.
        dtype: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    /// A tensor has the wrong shape for the config.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A span outside the model's blocks, or an empty one.
    #[error(
        "block span {start}:{end} is invalid for a model of {num_blocks} blocks \
         (a span is START:END with 0 ≤ START < END ≤ {num_blocks})"
    )]
    SpanOutOfRange {
        /// First block asked for.
        start: usize,
        /// One past the last block asked for.
        end: usize,
        /// Blocks in the model.
        num_blocks: usize,
    },
    /// A session's KV cache would grow past its bound.
    #[error("session cache full: {detail}")]
    CacheFull {
        /// Which bound, with the numbers.
        detail: String,
    },
    /// A step was sent at the wrong position.
    #[error("position mismatch: the session holds {cached} tokens, the step starts at {got}")]
    PositionMismatch {
        /// Tokens already in the cache.
        cached: usize,
        /// Position the caller gave.
        got: usize,
    },
    /// Input tensor of the wrong shape.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A device that this build or machine does not have.
    #[error("device: {0}")]
    Device(String),
    /// I/O while reading a model.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The blocks ran elsewhere (a swarm) and failed there.
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
