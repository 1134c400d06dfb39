//! Choosing where tensors live: `cpu`, `cuda[:N]` or `metal`.

use crate::{Result, ShardError};
use candle_core::Device;

/// Parses a device name as the CLI takes it and opens the device.
///
/// `cuda` and `metal` need the matching cargo feature; a CPU build says so
/// clearly instead of failing deep inside candle.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(rest) = name.strip_prefix("cuda") {
        let ordinal = match rest.strip_prefix(':') {
            None if rest.is_empty() => 0,
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| ShardError::Device(format!("bad CUDA ordinal in `{name}`")))?,
            None => return Err(ShardError::Device(format!("unknown device `{name}`"))),
        };
        if !candle_core::utils::cuda_is_available() {
            return Err(ShardError::Device(
                "this build of pollen has no CUDA support (rebuild with `--features cuda`)".into(),
            ));
        }
        // Without a driver or a GPU, say which device and why, not only candle's
        // driver error code (and without its backtrace).
        let device = Device::new_cuda(ordinal).map_err(|e| {
            let e = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            ShardError::Device(format!(
                "cannot open CUDA device {ordinal} (needs an NVIDIA GPU and its driver): {e}"
            ))
        })?;
        let _ = OPENED.set(device.clone());
        return Ok(device);
    }
    if name == "metal" {
        if !candle_core::utils::metal_is_available() {
            return Err(ShardError::Device(
                "this build of pollen has no Metal support (rebuild with `--features metal`)"
                    .into(),
            ));
        }
        return Ok(Device::new_metal(0)?);
    }
    Err(ShardError::Device(format!(
        "unknown device `{name}` (expected cpu, cuda, cuda:N or metal)"
    )))
}

/// The first GPU this process opened, for [`bind_opened`].
static OPENED: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Makes the first GPU this process opened current on this thread, if any. An async
/// runtime calls it as its threads start and wake: a GPU tensor can be dropped on any
/// of them, and a free on a thread without the context fails and leaves an error that
/// the next step on the GPU reports (seen on an H200 with concurrent sessions).
pub fn bind_opened() {
    if let Some(dev) = OPENED.get()
        && let Err(e) = bind_thread(dev)
    {
        tracing::warn!("{e}");
    }
}

/// Makes `dev`'s CUDA context current on this thread (nothing for other devices).
/// Candle's CUDA calls on a thread that never held the context, such as a pool's
/// worker running a server's step, fail with `CUDA_ERROR_INVALID_CONTEXT`.
pub fn bind_thread(dev: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        d.cuda_stream().context().bind_to_thread().map_err(|e| {
            ShardError::Device(format!("cannot make the CUDA context current: {e:?}"))
        })?;
    }
    let _ = dev;
    Ok(())
}

/// Bytes free and in all on `dev` now, where the device can say (CUDA); `None` on
/// the CPU and on Metal, whose memory is the host's.
pub fn memory_info(dev: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return match d.cuda_stream().context().mem_get_info() {
            Ok((free, total)) => Some((free as u64, total as u64)),
            Err(e) => {
                tracing::warn!("cannot read the GPU's free memory: {e:?}");
                None
            }
        };
    }
    let _ = dev;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_unknown_is_a_clear_error() {
        assert!(parse_device("cpu").is_ok_and(|d| d.is_cpu()));
        let err = parse_device("tpu")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown device `tpu`"), "{err}");
        let err = parse_device("cuda:x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cuda"), "{err}");
    }
}
