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

/// What a CUDA GPU's arithmetic depends on besides Pollen's own code (which the
/// protocol version names) and candle's (pinned by Cargo.lock): cuBLAS gives the same
/// bits only on GPUs of one architecture and one number of SMs, with one cuBLAS version
/// and its workspace; candle's quantized products are machine code built for one
/// architecture that picks its tiles by the shared memory a block may take; its other
/// kernels are PTX that the driver compiles as they are first used.
/// `compute::compute_mode` names these, with a hash of the PTX itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaArithmetic {
    /// Compute capability, major and minor (9.0 for an H100 or H200).
    pub capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Bytes of shared memory a block may opt in to.
    pub shared_per_block: u32,
    /// cuBLAS's major, minor and patch version.
    pub cublas: (u32, u32, u32),
    /// The driver's CUDA version, as `cuDriverGetVersion` gives it (13000 for 13.0).
    pub driver: u32,
    /// The driver's own version (`580.159.04`), whose compiler turns PTX into machine
    /// code; empty where `/proc/driver/nvidia/version` cannot be read.
    pub driver_build: String,
    /// The environment variables that change cuBLAS's or the driver's code, as set
    /// ([`ARITHMETIC_VARS`]).
    pub settings: String,
    /// candle's switch for TF32 in f32 products (off unless set).
    pub reduced_f32: bool,
}

/// Environment variables that change which code cuBLAS or the driver runs, and so the
/// bits: the workspace cuBLAS may use (it picks algorithms by it), f32 products emulated
/// with BF16 (cuBLAS 12.9 and later on Blackwell), and cuBLAS's PTX compiled at start
/// in place of its machine code.
pub const ARITHMETIC_VARS: [&str; 3] = [
    "CUBLAS_WORKSPACE_CONFIG",
    "CUBLAS_EMULATE_SINGLE_PRECISION",
    "CUDA_FORCE_PTX_JIT",
];

/// [`ARITHMETIC_VARS`] as set in this process: `NAME=value` for each set, `;` between.
pub fn arithmetic_settings() -> String {
    ARITHMETIC_VARS
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|value| format!("{v}={value}")))
        .collect::<Vec<_>>()
        .join(";")
}

/// The driver's version in the text of `/proc/driver/nvidia/version`: the first word
/// of its first line made of numbers and dots (`NVRM version: NVIDIA UNIX x86_64 Kernel
/// Module  580.159.04  ...` gives `580.159.04`); empty if none.
pub fn driver_build_of(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .find(|w| {
            w.contains('.')
                && w.split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or("")
        .to_string()
}

/// [`CudaArithmetic`] of `dev`; `None` for the CPU and Metal.
pub fn cuda_arithmetic(dev: &Device) -> Result<Option<CudaArithmetic>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::{cublas, driver};
        let context = d.cuda_stream().context().clone();
        let fail = |what: &str, e: String| {
            ShardError::Device(format!("cannot read the GPU's {what}: {e}"))
        };
        let attribute = |a| {
            context
                .attribute(a)
                .map(|v| v.max(0) as u32)
                .map_err(|e| fail("attributes", format!("{e:?}")))
        };
        use driver::sys::CUdevice_attribute as A;
        let capability = (
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sms = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let shared_per_block = attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let mut version = [0i32; 3];
        for (v, p) in version.iter_mut().zip([
            cublas::sys::libraryPropertyType::MAJOR_VERSION,
            cublas::sys::libraryPropertyType::MINOR_VERSION,
            cublas::sys::libraryPropertyType::PATCH_LEVEL,
        ]) {
            // SAFETY: cublasGetProperty writes one int through a valid pointer.
            #[allow(unsafe_code)]
            let status = unsafe { cublas::sys::cublasGetProperty(p, v) };
            if status != cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(fail("cuBLAS version", format!("{status:?}")));
            }
        }
        let mut driver_version = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
        #[allow(unsafe_code)]
        let status = unsafe { driver::sys::cuDriverGetVersion(&mut driver_version) };
        if status != driver::sys::CUresult::CUDA_SUCCESS {
            return Err(fail("driver version", format!("{status:?}")));
        }
        let driver_build = std::fs::read_to_string("/proc/driver/nvidia/version")
            .map(|t| driver_build_of(&t))
            .unwrap_or_default();
        let [major, minor, patch] = version.map(|v| v.max(0) as u32);
        return Ok(Some(CudaArithmetic {
            capability,
            sms,
            shared_per_block,
            cublas: (major, minor, patch),
            driver: driver_version.max(0) as u32,
            driver_build,
            settings: arithmetic_settings(),
            reduced_f32: candle_core::cuda_backend::gemm_reduced_precision_f32(),
        }));
    }
    let _ = dev;
    Ok(None)
}

/// A hash (hex) of the PTX of candle's kernels in this build: nvcc's version and the
/// architecture they were built for (those of its quantized products' machine code
/// too, built alongside) and candle's kernel code are all in it. Empty in a build
/// without CUDA.
pub fn cuda_kernels_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(ptx_hash)
}

#[cfg(feature = "cuda")]
fn ptx_hash() -> String {
    use candle_core::cuda_backend::kernels as k;
    let mut h = blake3::Hasher::new();
    for m in [
        k::AFFINE,
        k::BINARY,
        k::CAST,
        k::CONV,
        k::FILL,
        k::INDEXING,
        k::QUANTIZED,
        k::REDUCE,
        k::SORT,
        k::TERNARY,
        k::UNARY,
    ] {
        h.update(&(m.ptx().len() as u64).to_le_bytes());
        h.update(m.ptx().as_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

#[cfg(not(feature = "cuda"))]
fn ptx_hash() -> String {
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver's version from the first line of `/proc/driver/nvidia/version`, as
    /// proprietary and open kernel modules write it.
    #[test]
    fn driver_versions_are_read() {
        for (text, want) in [
            (
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025\n\
                 GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n",
                "580.159.04",
            ),
            (
                "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.104.05  \
                 Release Build  (dvs-builder@U16-I3-B03-4-3)\n",
                "535.104.05",
            ),
            (
                "NVRM version: NVIDIA UNIX aarch64 Kernel Module  550.54\n",
                "550.54",
            ),
            ("", ""),
            ("nothing here 1. .2 a.b\n580.1.2\n", ""),
        ] {
            assert_eq!(driver_build_of(text), want, "{text}");
        }
    }

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
