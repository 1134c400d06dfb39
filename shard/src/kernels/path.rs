//! Which kernel [`PackedMatrix`](super::PackedMatrix) runs on: detected once
//! per process from the CPU's features, or forced by `POLLEN_KERNEL`.

use std::sync::OnceLock;

/// The environment variable that forces a kernel path: `amx`, `avx512` (or
/// `avx512-vnni`), `avx-vnni`, `avx2`, `neon-dotprod` (or `neon-dot`, `dotprod`, `sdot`),
/// `neon`, `fallback` (or `none`), or `auto` (the
/// default when unset). A path this CPU lacks is refused with a logged warning, and
/// the automatic choice runs instead.
pub const KERNEL_ENV: &str = "POLLEN_KERNEL";

/// A kernel path of the fast weight mode.
///
/// The SIMD paths compute the same integer dot products and the same float
/// operations in the same order, so their results are bit-identical (tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelPath {
    /// Intel AMX-INT8 (`tdpbsud` on 16 output rows and up to 16 activation
    /// rows at once) where a product has several activation rows, the
    /// AVX-512 VNNI kernel for one row.
    Amx,
    /// AVX-512 F, BW, VNNI and F16C: `vpdpbusd` on 16 output rows at once.
    Avx512Vnni,
    /// AVX-VNNI (VEX-encoded `vpdpbusd`, no AVX-512), AVX2, FMA and F16C:
    /// `vpdpbusd` on 8 output rows at once.
    AvxVnni,
    /// AVX2, FMA and F16C: `vpmaddubsw` + `vpmaddwd` on 8 output rows at once.
    Avx2,
    /// NEON with the dot-product extension (Armv8.2-A and later, on aarch64):
    /// `sdot` on 4 output rows at once.
    NeonDot,
    /// NEON on aarch64: `smull` + pairwise adds on 4 output rows at once.
    Neon,
    /// No packed kernel: the fast mode runs as `Requantize(Q8_0)` on candle's
    /// own kernels (which an Armv8.0 CPU cannot run: [`candle_kernels_run`]).
    None,
}

impl KernelPath {
    /// Every path, fastest first.
    pub const ALL: [Self; 7] = [
        Self::Amx,
        Self::Avx512Vnni,
        Self::AvxVnni,
        Self::Avx2,
        Self::NeonDot,
        Self::Neon,
        Self::None,
    ];

    /// The path's name: `amx`, `avx512-vnni`, `avx-vnni`, `avx2`, `neon-dotprod`,
    /// `neon` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Amx => "amx",
            Self::Avx512Vnni => "avx512-vnni",
            Self::AvxVnni => "avx-vnni",
            Self::Avx2 => "avx2",
            Self::NeonDot => "neon-dotprod",
            Self::Neon => "neon",
            Self::None => "none",
        }
    }

    /// Whether this CPU can run the path (for [`KernelPath::None`], candle's
    /// kernels: see [`candle_kernels_run`]).
    pub fn supported(self) -> bool {
        match self {
            Self::Amx => cpu().amx && super::amx::granted(),
            Self::Avx512Vnni => cpu().vnni,
            Self::AvxVnni => cpu().avx_vnni,
            Self::Avx2 => cpu().avx2,
            Self::NeonDot => cpu().neon_dot,
            Self::Neon => cpu().neon,
            Self::None => cpu().candle,
        }
    }

    /// Reads a value of [`KERNEL_ENV`]; `None` for `auto` or empty.
    fn parse(text: &str) -> Result<Option<Self>, ()> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(None),
            "amx" | "amx-int8" => Ok(Some(Self::Amx)),
            "avx512" | "avx512-vnni" | "avx512vnni" | "vnni" => Ok(Some(Self::Avx512Vnni)),
            "avx-vnni" | "avxvnni" | "avx_vnni" => Ok(Some(Self::AvxVnni)),
            "avx2" => Ok(Some(Self::Avx2)),
            "neon-dotprod" | "neon-dot" | "dotprod" | "sdot" => Ok(Some(Self::NeonDot)),
            "neon" => Ok(Some(Self::Neon)),
            "none" | "fallback" => Ok(Some(Self::None)),
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether every one of candle's quantized CPU kernels runs on this CPU (the
/// exact and requantized weight modes use them, and [`KernelPath::None`]). On
/// aarch64 candle 0.11's kernels for Q4_0, Q8_0 and the K-quants issue `sdot`,
/// the dot-product extension's instruction, without asking the CPU, so on an
/// Armv8.0 core (a Cortex-A72, the Raspberry Pi 4's) they would stop with an
/// illegal instruction: there a matrix that would run on one is refused at
/// load with an error (candle's Q4_1, Q5_0, Q5_1 and Q8_1 products are plain
/// code there and run), and the `none` path is not offered.
pub fn candle_kernels_run() -> bool {
    cpu().candle
}

/// Whether candle's dense CPU products run here. candle 0.11 computes them
/// with the `gemm` crate (0.19), which takes its FMA kernel wherever the CPU
/// has FMA and there requires every feature of x86-64-v3 (AVX2, BMI1, BMI2,
/// LZCNT besides), panicking where one is missing: on AMD's Bulldozer to
/// Excavator cores (FX, Opteron 6300, A-series APUs of 2012–2016: FMA, no
/// AVX2). Exact mode (whose attention is dense) and float block matrices
/// are refused there with [`no_dense_products`]; quantized models in the
/// other modes run.
pub fn dense_products_run() -> bool {
    cpu().dense
}

/// The error for dense work (`what`) on a CPU where [`dense_products_run`]
/// is false.
pub(crate) fn no_dense_products(what: &str) -> crate::ShardError {
    crate::ShardError::BadInput(format!(
        "{what} needs candle's dense products, which stop on this CPU: it has FMA but not \
         every feature of x86-64-v3 (AVX2, BMI1, BMI2, LZCNT), as AMD's FX and A-series \
         chips of 2012-2016; run a quantized (GGUF) model in the fast or q8_0 mode instead"
    ))
}

/// The CPU features the kernels need.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cpu {
    /// AMX-TILE and AMX-INT8, granted by the OS, with everything `vnni` needs.
    pub(super) amx: bool,
    /// AVX-512 F, BW, VNNI and F16C.
    pub(super) vnni: bool,
    /// AVX-VNNI, with everything `avx2` needs.
    pub(super) avx_vnni: bool,
    /// AVX2, FMA and F16C.
    pub(super) avx2: bool,
    /// NEON and the dot-product extension (aarch64).
    pub(super) neon_dot: bool,
    /// NEON (aarch64).
    pub(super) neon: bool,
    /// Every one of candle's quantized CPU kernels runs ([`candle_kernels_run`]).
    pub(super) candle: bool,
    /// candle's dense products run ([`dense_products_run`]).
    pub(super) dense: bool,
}

/// This CPU's features, detected once.
pub(super) fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = is_x86_feature_detected!("f16c");
            let vnni = f16c
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni");
            let avx2 = f16c && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            Cpu {
                // Present only: Linux's grant is asked where the path runs.
                amx: vnni && super::amx::present(),
                vnni,
                avx_vnni: avx2 && is_x86_feature_detected!("avxvnni"),
                avx2,
                neon_dot: false,
                neon: false,
                candle: true,
                // gemm 0.19's choice (`init_gemm_fn`): FMA takes pulp's V3,
                // whose `try_new` checks these.
                dense: !is_x86_feature_detected!("fma")
                    || [
                        is_x86_feature_detected!("avx"),
                        is_x86_feature_detected!("avx2"),
                        is_x86_feature_detected!("bmi1"),
                        is_x86_feature_detected!("bmi2"),
                        is_x86_feature_detected!("lzcnt"),
                        is_x86_feature_detected!("popcnt"),
                        is_x86_feature_detected!("sse4.2"),
                        is_x86_feature_detected!("ssse3"),
                        is_x86_feature_detected!("fxsr"),
                    ]
                    .iter()
                    .all(|&f| f),
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            let neon = std::arch::is_aarch64_feature_detected!("neon");
            Cpu {
                amx: false,
                vnni: false,
                avx_vnni: false,
                avx2: false,
                neon_dot: neon && std::arch::is_aarch64_feature_detected!("dotprod"),
                neon,
                candle: std::arch::is_aarch64_feature_detected!("dotprod"),
                dense: true,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Cpu {
                amx: false,
                vnni: false,
                avx_vnni: false,
                avx2: false,
                neon_dot: false,
                neon: false,
                candle: true,
                dense: true,
            }
        }
    })
}

/// Chooses a path for `request` (the value of [`KERNEL_ENV`], if set) on a
/// CPU with `cpu`'s features; the second value is a warning to log when the
/// request cannot be honoured.
pub(super) fn choose(request: Option<&str>, cpu: Cpu) -> (KernelPath, Option<String>) {
    let best = if cpu.amx {
        KernelPath::Amx
    } else if cpu.vnni {
        KernelPath::Avx512Vnni
    } else if cpu.avx_vnni {
        KernelPath::AvxVnni
    } else if cpu.avx2 {
        KernelPath::Avx2
    } else if cpu.neon_dot {
        KernelPath::NeonDot
    } else if cpu.neon {
        KernelPath::Neon
    } else {
        KernelPath::None
    };
    let has = |p: KernelPath| match p {
        KernelPath::Amx => cpu.amx,
        KernelPath::Avx512Vnni => cpu.vnni,
        KernelPath::AvxVnni => cpu.avx_vnni,
        KernelPath::Avx2 => cpu.avx2,
        KernelPath::NeonDot => cpu.neon_dot,
        KernelPath::Neon => cpu.neon,
        KernelPath::None => cpu.candle,
    };
    match request.map(KernelPath::parse) {
        None | Some(Ok(None)) => (best, None),
        Some(Ok(Some(p))) if has(p) => (p, None),
        Some(Ok(Some(p))) => (
            best,
            Some(format!(
                "{KERNEL_ENV}={p}: this CPU lacks the features that path needs; using {best}"
            )),
        ),
        Some(Err(())) => (
            best,
            Some(format!(
                "{KERNEL_ENV}={:?} is not a kernel path (expected amx, avx512, avx-vnni, avx2, neon-dotprod, neon, fallback or auto); using {best}",
                request.unwrap_or_default()
            )),
        ),
    }
}

/// The kernel path this process runs the fast weight mode on: the fastest
/// one the CPU has, unless [`KERNEL_ENV`] forces another. Decided on first
/// use and fixed for the life of the process.
pub fn kernel_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let request = std::env::var(KERNEL_ENV).ok();
        let mut cpu = cpu();
        let (mut path, mut warning) = choose(request.as_deref(), cpu);
        // Linux grants AMX on request, process-wide: asked only here, where
        // the AMX path would run; refused, the next path runs.
        if path == KernelPath::Amx && !super::amx::granted() {
            cpu.amx = false;
            (path, warning) = choose(request.as_deref(), cpu);
        }
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        tracing::debug!(kernel = path.as_str(), "fast-mode kernel path");
        path
    })
}

/// The name of the kernel path this process runs the fast weight mode on:
/// `"amx"`, `"avx512-vnni"`, `"avx-vnni"`, `"avx2"`, `"neon-dotprod"`, `"neon"` or `"none"`
/// (fast mode runs as `q8_0` on
/// candle's kernels). See [`kernel_path`].
pub fn active_path() -> &'static str {
    kernel_path().as_str()
}

/// Whether the fast weight mode runs on one of this crate's packed SIMD
/// kernels here (AMX, AVX-512 VNNI, AVX-VNNI, AVX2 or NEON with or without `sdot`, per
/// [`kernel_path`]).
/// Where it is false, [`WeightMode::Fast`](crate::WeightMode::Fast) runs as
/// `Requantize(Q8_0)`.
pub fn simd_available() -> bool {
    kernel_path() != KernelPath::None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Cpu = Cpu {
        amx: true,
        vnni: true,
        avx_vnni: true,
        avx2: true,
        neon_dot: false,
        neon: false,
        candle: true,
        dense: true,
    };
    const BOTH: Cpu = Cpu {
        amx: false,
        vnni: true,
        avx_vnni: false,
        avx2: true,
        neon_dot: false,
        neon: false,
        candle: true,
        dense: true,
    };
    const AVX2: Cpu = Cpu {
        amx: false,
        vnni: false,
        avx_vnni: false,
        avx2: true,
        neon_dot: false,
        neon: false,
        candle: true,
        dense: true,
    };
    /// An Intel desktop chip since Alder Lake: AVX-VNNI, no AVX-512.
    const DESK: Cpu = Cpu {
        amx: false,
        vnni: false,
        avx_vnni: true,
        avx2: true,
        neon_dot: false,
        neon: false,
        candle: true,
        dense: true,
    };
    const BARE: Cpu = Cpu {
        amx: false,
        vnni: false,
        avx_vnni: false,
        avx2: false,
        neon_dot: false,
        neon: false,
        candle: true,
        dense: true,
    };
    const ARM: Cpu = Cpu {
        amx: false,
        vnni: false,
        avx_vnni: false,
        avx2: false,
        neon_dot: false,
        neon: true,
        candle: false,
        dense: true,
    };
    /// An Armv8.2-A or later chip: NEON with `sdot`.
    const ARM_DOT: Cpu = Cpu {
        amx: false,
        vnni: false,
        avx_vnni: false,
        avx2: false,
        neon_dot: true,
        neon: true,
        candle: true,
        dense: true,
    };

    #[test]
    fn the_fastest_supported_path_is_chosen_unless_forced() {
        assert_eq!(choose(None, ALL), (KernelPath::Amx, None));
        assert_eq!(choose(Some("avx512"), ALL), (KernelPath::Avx512Vnni, None));
        assert_eq!(choose(None, BOTH), (KernelPath::Avx512Vnni, None));
        assert_eq!(choose(Some("auto"), AVX2), (KernelPath::Avx2, None));
        assert_eq!(choose(None, BARE), (KernelPath::None, None));
        assert_eq!(choose(Some("avx2"), BOTH), (KernelPath::Avx2, None));
        assert_eq!(
            choose(Some(" AVX512 "), BOTH),
            (KernelPath::Avx512Vnni, None)
        );
        assert_eq!(choose(Some("fallback"), BOTH), (KernelPath::None, None));
        assert_eq!(choose(Some("none"), AVX2), (KernelPath::None, None));
        assert_eq!(choose(None, DESK), (KernelPath::AvxVnni, None));
        assert_eq!(choose(Some("avx2"), DESK), (KernelPath::Avx2, None));
        assert_eq!(choose(Some("avx-vnni"), ALL), (KernelPath::AvxVnni, None));
        assert_eq!(choose(Some("AVX_VNNI"), DESK), (KernelPath::AvxVnni, None));
    }

    #[test]
    fn a_path_the_cpu_lacks_or_a_bad_name_is_refused_with_a_warning() {
        let (p, w) = choose(Some("avx512"), AVX2);
        assert_eq!(p, KernelPath::Avx2);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        let (p, w) = choose(Some("amx"), BOTH);
        assert_eq!(p, KernelPath::Avx512Vnni);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        let (p, w) = choose(Some("avx-vnni"), AVX2);
        assert_eq!(p, KernelPath::Avx2);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        let (p, w) = choose(Some("avx-vnni"), BOTH);
        assert_eq!(p, KernelPath::Avx512Vnni);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        let (p, w) = choose(Some("avx2"), BARE);
        assert_eq!(p, KernelPath::None);
        assert!(w.is_some());
        let (p, w) = choose(Some("neon"), BOTH);
        assert_eq!(p, KernelPath::Avx512Vnni);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        let (p, w) = choose(Some("sse9"), BOTH);
        assert_eq!(p, KernelPath::Avx512Vnni);
        assert!(w.is_some_and(|w| w.contains("not a kernel path")));
        assert_eq!(choose(None, ARM), (KernelPath::Neon, None));
        let (p, w) = choose(Some("avx2"), ARM);
        assert_eq!(p, KernelPath::Neon);
        assert!(w.is_some());
        assert_eq!(choose(None, ARM_DOT), (KernelPath::NeonDot, None));
        assert_eq!(choose(Some("neon"), ARM_DOT), (KernelPath::Neon, None));
        assert_eq!(
            choose(Some("DotProd"), ARM_DOT),
            (KernelPath::NeonDot, None)
        );
        let (p, w) = choose(Some("neon-dotprod"), ARM);
        assert_eq!(p, KernelPath::Neon);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        let (p, w) = choose(Some("none"), ARM);
        assert_eq!(p, KernelPath::Neon);
        assert!(w.is_some_and(|w| w.contains("lacks")));
        assert_eq!(choose(Some("none"), ARM_DOT), (KernelPath::None, None));
        let (p, w) = choose(Some("sdot"), AVX2);
        assert_eq!(p, KernelPath::Avx2);
        assert!(w.is_some_and(|w| w.contains("lacks")));
    }

    #[test]
    fn names_round_trip() {
        for p in KernelPath::ALL {
            assert_eq!(KernelPath::parse(p.as_str()), Ok(Some(p)));
        }
        assert!(simd_available() == (kernel_path() != KernelPath::None));
        assert_eq!(active_path(), kernel_path().as_str());
    }
}
