//! The llama architecture, cut into spans of blocks.
//!
//! This module follows candle-transformers' `quantized_llama.rs` op for op (the
//! same norms, rotary kernels, mask, grouped-query repeat and softmax) so that
//! spans chained across machines give bit-identical logits to that reference
//! when the prompt is chunked the same way. Two things differ by design:
//! weights are loaded per span, tensor by tensor, and the KV cache lives in a
//! [`SpanCache`] per session instead of inside the layers, so many sessions
//! share one copy of the weights.
//!
//! Hazards of the convention, kept from the reference:
//! - GGUF llama files store q/k rows permuted for *interleaved* rotary pairs
//!   (`rope_i`); Hugging Face weights use the half-split form (`rope`).
//! - A position-0 step ignores whatever the cache held, as the reference does;
//!   we refuse a position that is not the cache's length instead.
//!
//! The pieces, bottom up: `options` (how to load), `linear`
//! (the matrix products: candle's quantized ones or our packed kernel),
//! `cache` (a session's keys and values), `block` (one transformer block's
//! weights and forward), `span` ([`BlockSpan`], blocks `[a, b)`) and `ends`
//! ([`ClientEnds`], embeddings and head).

mod block;
pub(crate) mod cache;
mod compute;
mod ends;
mod fused;
mod linear;
mod options;
mod span;

pub use cache::{CacheLimits, SpanCache};
pub use compute::compute_mode;
pub use ends::ClientEnds;
pub use options::{LoadOptions, WeightMode};
pub use span::{BlockSpan, BlocksStep, SharedSpan};
