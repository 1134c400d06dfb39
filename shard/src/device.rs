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
        return Device::new_cuda(ordinal).map_err(|e| {
            let e = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            ShardError::Device(format!(
                "cannot open CUDA device {ordinal} (needs an NVIDIA GPU and its driver): {e}"
            ))
        });
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
