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
    /// The driver's own build, whose compiler turns PTX into machine code
    /// ([`driver_identity`]): the kernel module's line and the user-space library's
    /// file; empty where neither can be read.
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
    settings_from(|v| std::env::var_os(v))
}

/// [`arithmetic_settings`] from `get`, which reads a variable.
fn settings_from(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> String {
    ARITHMETIC_VARS
        .iter()
        .filter_map(|v| get(v).map(|value| format!("{v}={}", value.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(";")
}

/// The driver's build from the first line of `/proc/driver/nvidia/version` (the
/// kernel module: `NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ...`)
/// and the file of the `libcuda.so` this process mapped, from `/proc/self/maps` (the
/// user-space driver, which compiles PTX: `libcuda.so.580.159.04`, or a newer one from
/// CUDA's forward-compatibility package), joined by `;`. Either may be empty (no
/// such file on Jetson's older drivers or under WSL2).
pub fn driver_identity(version_file: &str, maps: &str) -> String {
    let module = version_file.lines().next().unwrap_or("").trim();
    let library = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter_map(|path| path.rsplit('/').next())
        .find(|file| file.starts_with("libcuda.so"))
        .unwrap_or("");
    format!("{module};{library}")
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
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        let driver_build = driver_identity(
            &read("/proc/driver/nvidia/version"),
            &read("/proc/self/maps"),
        );
        if driver_build == ";" {
            tracing::warn!(
                "cannot tell the NVIDIA driver's build (no /proc/driver/nvidia/version, no \
                 libcuda.so in /proc/self/maps): the compute mode names its CUDA version only"
            );
        }
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The driver's build from the kernel module's line and the user-space library
    /// mapped, as proprietary and open kernel modules and the compatibility package
    /// give them.
    #[test]
    fn driver_builds_are_read() {
        let module = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 \
                      2025\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n";
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.104.05  \
                    Release Build  (dvs-builder@U16-I3-B03-4-3)\n";
        let maps = "7f0a1c000000-7f0a1d000000 r-xp 00000000 08:01 131 \
                    /usr/lib/x86_64-linux-gnu/libcudart.so.13\n\
                    7f0a2c000000-7f0a2d000000 r-xp 00000000 08:01 132 \
                    /usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04\n";
        let compat = "7f0a2c000000-7f0a2d000000 r-xp 00000000 08:01 132 \
                      /usr/local/cuda-13.1/compat/libcuda.so.590.44.01\n";
        let module_line = module.lines().next().unwrap();
        assert_eq!(
            driver_identity(module, maps),
            format!("{module_line};libcuda.so.580.159.04")
        );
        let open_line = open.lines().next().unwrap().trim();
        assert_eq!(driver_identity(open, ""), format!("{open_line};"));
        let names = [
            driver_identity(module, maps),
            driver_identity(module, compat),
            driver_identity(open, maps),
            driver_identity("", maps),
            driver_identity("", ""),
        ];
        let apart: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(apart.len(), names.len(), "{names:?}");
        assert_eq!(driver_identity("", "anonymous mapping\n"), ";");
    }

    /// The variables that change cuBLAS's code are named with their values, set or
    /// not, whatever their bytes.
    #[test]
    fn arithmetic_variables_are_named() {
        use std::ffi::OsString;
        assert_eq!(settings_from(|_| None), "");
        let all = settings_from(|v| Some(OsString::from(format!("{}", v.len()))));
        assert_eq!(
            all,
            "CUBLAS_WORKSPACE_CONFIG=23;CUBLAS_EMULATE_SINGLE_PRECISION=31;CUDA_FORCE_PTX_JIT=18"
        );
        let one = settings_from(|v| (v == "CUDA_FORCE_PTX_JIT").then(|| OsString::from("1")));
        assert_eq!(one, "CUDA_FORCE_PTX_JIT=1");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let odd = settings_from(|v| {
                (v == "CUBLAS_WORKSPACE_CONFIG").then(|| OsString::from_vec(vec![0xff, b':']))
            });
            assert_eq!(odd, "CUBLAS_WORKSPACE_CONFIG=\u{fffd}:");
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
