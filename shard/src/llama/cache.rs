//! A session's keys and values for one span, and the bounds on them.
//!
//! Exact mode keeps each block's keys and values as tensors concatenated
//! step by step, as the reference does. The other modes keep growable
//! buffers `(1, kv_heads, capacity, head_dim)` written in place, of which
//! the first `len` positions are valid; capacity doubles as needed, up to the
//! session's token limit. On the CPU those buffers are f16 ([`kv_dtype`]):
//! half the memory and half the bytes attention reads. Keys and values come
//! out of the RMS norm and a product with the block's weights, so their size
//! is bounded by the model's weights whatever a peer sends; that bound is not
//! checked against f16's range, so values are saturated at ±65504
//! ([`F16_MAX`]) rather than rounded to infinity, which would let the hop
//! before make this server answer NaN and be blamed for it.

use crate::config::BlockRange;
use crate::{Result, ShardError};
use candle_core::{DType, Tensor};

/// Bounds on one session's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most tokens (prompt plus generated) a session may hold.
    pub max_tokens: usize,
    /// Most bytes of keys and values a session may hold in this span.
    pub max_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_tokens: 2048,
            max_bytes: 512 * 1024 * 1024,
        }
    }
}

/// One session's KV cache for one span.
#[derive(Debug)]
pub struct SpanCache {
    /// Tells this cache from every other in the process (a clone gets its own).
    id: u64,
    range: BlockRange,
    /// Exact mode: keys and values `(1, kv_heads, len, head_dim)`. Fast
    /// modes: buffers `(1, kv_heads, capacity, head_dim)` written in place,
    /// of which the first `len` positions are valid.
    layers: Vec<LayerKv>,
    len: usize,
    limits: CacheLimits,
    bytes_per_token: usize,
    fast: bool,
}

impl Clone for SpanCache {
    /// A clone owns its keys and values: fast-mode buffers are written in
    /// place, so they are copied rather than shared.
    fn clone(&self) -> Self {
        let layers = if self.fast {
            self.layers
                .iter()
                .map(|l| {
                    l.as_ref().and_then(|(k, v)| match (k.copy(), v.copy()) {
                        (Ok(k), Ok(v)) => Some((k, v)),
                        // Cannot happen on a working device; an empty layer
                        // would make the next step fail loudly, never silently.
                        _ => None,
                    })
                })
                .collect()
        } else {
            self.layers.clone()
        };
        Self {
            id: next_cache_id(),
            range: self.range,
            layers,
            len: self.len,
            limits: self.limits,
            bytes_per_token: self.bytes_per_token,
            fast: self.fast,
        }
    }
}

/// A new [`SpanCache::id`].
fn next_cache_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl SpanCache {
    /// What tells this cache from every other in the process (a clone has its own).
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// An empty cache for `blocks` blocks of `range`.
    pub(super) fn new(
        range: BlockRange,
        blocks: usize,
        limits: CacheLimits,
        bytes_per_token: usize,
        fast: bool,
    ) -> Self {
        Self {
            id: next_cache_id(),
            range,
            layers: vec![None; blocks],
            len: 0,
            limits,
            bytes_per_token,
            fast,
        }
    }

    /// Checks that a step of `seq` tokens at `pos`, run by blocks `range`
    /// (in a fast mode or not), fits this cache; returns its length after.
    pub(super) fn check_step(
        &self,
        range: BlockRange,
        fast: bool,
        pos: usize,
        seq: usize,
    ) -> Result<usize> {
        if self.range != range || self.fast != fast {
            return Err(ShardError::BadInput(format!(
                "a cache for blocks {} used with blocks {range}",
                self.range
            )));
        }
        if pos != self.len {
            return Err(ShardError::PositionMismatch {
                cached: self.len,
                got: pos,
            });
        }
        let new_len = self.len + seq;
        if new_len > self.limits.max_tokens {
            return Err(ShardError::CacheFull {
                detail: format!(
                    "{new_len} tokens exceed the session limit of {} tokens",
                    self.limits.max_tokens
                ),
            });
        }
        if new_len * self.bytes_per_token > self.limits.max_bytes {
            return Err(ShardError::CacheFull {
                detail: format!(
                    "{} bytes of keys and values exceed the session limit of {} bytes",
                    new_len * self.bytes_per_token,
                    self.limits.max_bytes
                ),
            });
        }
        Ok(new_len)
    }

    /// Runs one step's blocks, `f`, over the layers. On success the cache
    /// holds `new_len` tokens; on error its layers are put back as they were.
    pub(super) fn step<T>(
        &mut self,
        new_len: usize,
        f: impl FnOnce(&mut [LayerKv]) -> Result<T>,
    ) -> Result<T> {
        let saved = self.layers.clone();
        match f(&mut self.layers) {
            Ok(out) => {
                self.len = new_len;
                Ok(out)
            }
            Err(e) => {
                self.layers = saved;
                Err(e)
            }
        }
    }

    /// The layers, for a batched step that manages its own rollback.
    pub(super) fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// A copy of the layers' handles, to put back if a step fails.
    pub(super) fn snapshot(&self) -> Vec<LayerKv> {
        self.layers.clone()
    }

    /// Ends a batched step: on success the cache holds `new_len` tokens, on
    /// failure its layers are put back from `saved`.
    pub(super) fn finish(&mut self, ok: bool, new_len: usize, saved: Vec<LayerKv>) {
        if ok {
            self.len = new_len;
        } else {
            self.layers = saved;
        }
    }

    /// Tokens the cache holds (the next position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_token
    }

    /// The bounds this cache enforces.
    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Tokens that may still be added.
    pub fn free_tokens(&self) -> usize {
        let by_bytes = self.limits.max_bytes / self.bytes_per_token.max(1);
        self.limits
            .max_tokens
            .min(by_bytes)
            .saturating_sub(self.len)
    }

    /// Empties the cache, keeping its limits.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Drops every position from `len` on, so those steps can be run again.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if self.fast {
            // Positions from `len` on are overwritten by the next steps.
            self.len = len;
            if len == 0 {
                self.clear();
            }
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        if len == 0 {
            self.clear();
        }
        self.len = len;
        Ok(())
    }
}

/// One block's keys and values in a [`SpanCache`].
pub(super) type LayerKv = Option<(Tensor, Tensor)>;

/// Exact mode: appends keys and values `(1, kv_heads, seq, head_dim)` for
/// positions `pos..` to the layer's and returns all of them. A position-0
/// step starts afresh, as the reference does.
pub(super) fn append(
    layer: &mut LayerKv,
    k: Tensor,
    v: Tensor,
    pos: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (k, v) = match layer.as_ref() {
        Some((k_cache, v_cache)) if pos > 0 => (
            Tensor::cat(&[k_cache, &k], 2)?,
            Tensor::cat(&[v_cache, &v], 2)?,
        ),
        _ => (k, v),
    };
    *layer = Some((k.clone(), v.clone()));
    Ok((k, v))
}

/// Other modes: writes keys and values `(1, kv_heads, seq, head_dim)` for
/// positions `pos..` into the layer's buffers in place, first growing them
/// (doubling, at least 64 positions, at most `max_tokens` unless more are
/// needed) when they are too short. Returns the whole buffers; positions
/// from `pos + seq` on hold stale values.
pub(super) fn write_in_place(
    layer: &mut LayerKv,
    k: &Tensor,
    v: &Tensor,
    pos: usize,
    max_tokens: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b_sz, n_kv, seq_len, head_dim) = k.dims4()?;
    let (kb, vb) = reserve(
        layer,
        (b_sz, n_kv, head_dim),
        pos,
        pos + seq_len,
        max_tokens,
        k.device(),
    )?;
    // To f16 on the CPU, saturated and rounded to nearest as the fused path's
    // writer does ([`to_f16`]; candle's clamp keeps NaN, as `f32::clamp` does).
    let store = |t: &Tensor| match kb.dtype() {
        DType::F16 => t.clamp(-F16_MAX, F16_MAX)?.to_dtype(DType::F16),
        dt => t.to_dtype(dt),
    };
    kb.slice_set(&store(k)?, 2, pos)?;
    vb.slice_set(&store(v)?, 2, pos)?;
    *layer = Some((kb.clone(), vb.clone()));
    Ok((kb, vb))
}

/// The largest finite f16.
pub(crate) const F16_MAX: f32 = 65504.0;

/// One key or value as the f16 cache keeps it: saturated at ±[`F16_MAX`],
/// then rounded to nearest (NaN stays NaN).
#[inline]
pub(crate) fn to_f16(v: f32) -> half::f16 {
    half::f16::from_f32(v.clamp(-F16_MAX, F16_MAX))
}

/// The element type of the non-exact modes' KV buffers on `device`: f16 on
/// the CPU, where attention is [`crate::attention`]'s; f32 elsewhere, where
/// it is candle's ops.
pub(crate) fn kv_dtype(device: &candle_core::Device) -> DType {
    if device.is_cpu() {
        DType::F16
    } else {
        DType::F32
    }
}

/// Bytes of keys and values one token takes in one block of `cfg`: the
/// [`kv_dtype`] buffers of the non-exact (`fast`) modes, f32 tensors in exact
/// mode.
pub(crate) fn kv_bytes_per_token_per_block(
    cfg: &crate::ModelConfig,
    fast: bool,
    device: &candle_core::Device,
) -> usize {
    let elem = if fast { kv_dtype(device) } else { DType::F32 };
    2 * cfg.num_kv_heads * cfg.head_dim() * elem.size_in_bytes()
}

/// Other modes: the layer's buffers `(b, kv_heads, capacity, head_dim)`
/// with room for positions `..need`, grown first where they are too short
/// (doubling, at least 64 positions, at most `max_tokens` unless more are
/// needed; positions `..pos` are kept). The layer keeps holding them (a
/// write through the returned tensors lands in the cache).
pub(super) fn reserve(
    layer: &mut LayerKv,
    (b_sz, n_kv, head_dim): (usize, usize, usize),
    pos: usize,
    need: usize,
    max_tokens: usize,
    device: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (kb, vb) = match layer.take() {
        Some((kb, vb)) if kb.dim(2)? >= need => (kb, vb),
        old => {
            let cap = need.next_power_of_two().max(64).min(max_tokens.max(need));
            let shape = (b_sz, n_kv, cap, head_dim);
            let kb = Tensor::zeros(shape, kv_dtype(device), device)?;
            let vb = Tensor::zeros(shape, kv_dtype(device), device)?;
            if let Some((ok, ov)) = old
                && pos > 0
            {
                kb.slice_set(&ok.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
                vb.slice_set(&ov.narrow(2, 0, pos)?.contiguous()?, 2, 0)?;
            }
            (kb, vb)
        }
    };
    *layer = Some((kb.clone(), vb.clone()));
    Ok((kb, vb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Keys and values past f16's range saturate instead of becoming
    /// infinite, in the fused writer's rounding and in the op-by-op write,
    /// bit for bit alike; NaN stays NaN and in-range values round as before.
    #[test]
    fn f16_keys_and_values_saturate_alike_on_both_paths() -> candle_core::Result<()> {
        let vals = [
            0.0,
            -0.0,
            1.0 / 3.0,
            65503.0,
            65519.0,
            65520.0,
            -65520.0,
            1e9,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-8,
        ];
        for &v in &vals {
            let h = to_f16(v);
            if v.abs() < F16_MAX {
                assert_eq!(h.to_bits(), half::f16::from_f32(v).to_bits(), "{v}");
            } else {
                assert_eq!(h.to_f32(), F16_MAX.copysign(v), "{v}");
            }
        }
        assert!(to_f16(f32::NAN).is_nan());
        let n = vals.len();
        let k = Tensor::from_vec(vals.to_vec(), (1, 1, n, 1), &Device::Cpu)?;
        let v = k.neg()?;
        let mut layer: LayerKv = None;
        let (kb, vb) = write_in_place(&mut layer, &k, &v, 0, 64)?;
        assert_eq!(kb.dtype(), DType::F16);
        let got = |t: &Tensor| -> candle_core::Result<Vec<u16>> {
            Ok(t.narrow(2, 0, n)?
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .iter()
                .map(|h| h.to_bits())
                .collect())
        };
        let want: Vec<u16> = vals.iter().map(|&x| to_f16(x).to_bits()).collect();
        assert_eq!(got(&kb)?, want);
        let want: Vec<u16> = vals.iter().map(|&x| to_f16(-x).to_bits()).collect();
        assert_eq!(got(&vb)?, want);
        Ok(())
    }
}
