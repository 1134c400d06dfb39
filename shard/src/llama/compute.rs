//! The compute mode a node announces: a name for the arithmetic it computes a
//! model's blocks with. A client chains only servers whose mode equals its own,
//! so two nodes of one name must give the same bits for the same input, and
//! names should differ only where bits do (each split divides the swarm).
//!
//! `fast` runs Pollen's packed kernels (AMX, AVX-512 VNNI, AVX-VNNI, AVX2 or
//! NEON, with and without `sdot`), bit-identical to each other on x86-64 and
//! aarch64 alike (tested in `kernels`, `shard/tests/kernel_paths.rs` and
//! `scripts/test-aarch64.sh --swarm`). The other modes, and a fast-mode block
//! matrix without a packed form, compute on candle 0.11.1's CPU kernels, whose
//! bits depend on the CPU; measured (`shard/tests/arithmetic.rs`, and by hand
//! under qemu-user on every tier):
//!
//! - by architecture: dense products differ between x86-64 and aarch64 (one
//!   row at a time), and so does every candle-computed mode's output;
//! - on x86-64, by AVX2 and FMA: without them candle's Q4_0, Q8_0 and K-quant
//!   products and `gemm`'s dense ones run plain code with other bits (every
//!   candle-computed mode differs, the default model's `exact` too);
//! - on x86-64, by candle's VNNI tier (AVX-512 VNNI, or AVX-VNNI): there its
//!   Q8_0 products take Q8_K activations through `vpdpbusd` (tiled), elsewhere
//!   Q8_0 ones; its Q4_K and Q6_K tiles, and its AMX Q4_K product, gave the
//!   AVX2 bits;
//! - on aarch64, by `i8mm`: candle's Q4_K, Q5_K and Q6_K products change bits
//!   (its Q4_0, Q8_0, Q2_K and Q3_K ones did not); without `sdot` its Q4_0,
//!   Q8_0 and K-quant products cannot run at all (refused at load).
//!
//! - by the L1 cache, for dense products (exact mode's attention; F32/F16
//!   block matrices, a safetensors model's): `gemm` 0.19 sums a product over
//!   `k` in chunks whose length it derives from the L1 cache's size and ways
//!   where either side of the output exceeds 64 (in attention, a prompt step
//!   over more than 512 tokens of context, of more than 64 tokens where heads
//!   are 64 wide, of 2 or more where they are wider), and each
//!   chunk boundary rounds: 512 on a 32 KiB 8-way L1, 1024 on this 48 KiB
//!   12-way one ([`dense_chunk`] measures it);
//! - by the C library, in exact mode: its rope tables come from the C
//!   library's `powf`, `sinf` and `cosf`, SiLU and softmax from its `expf`,
//!   as candle-transformers' do ([`math_library`] measures them; musl's
//!   `sinf` and `cosf` differ from glibc's). The other modes compute these
//!   with Pollen's own functions (`crate::elementary`, attention's `exp`),
//!   the same on every platform.
//!
//! - by the GPU: on CUDA every mode computes as exact, on cuBLAS (dense
//!   products: attention's, F32/F16 block matrices'), on candle's quantized
//!   products (machine code built for one architecture, which picks tiles by
//!   the shared memory a block may take) and on its other kernels (PTX that
//!   the driver compiles as they are first used). cuBLAS promises the same
//!   bits only on GPUs of one architecture with one number of SMs and one
//!   cuBLAS version, so the name says the architecture and the SMs and hashes
//!   the rest ([`cuda_name`]: `exact/cuda-sm90-132-3f0a1c`). Nothing here
//!   runs on the GPU to check the bits, as [`math_library`] does on the CPU.
//!   Metal is named by the device alone (not measured).
//!
//! Q4_1, Q5_0, Q5_1 and Q8_1 products are the same plain code everywhere.
//! So the name is `<mode>/<device>`, and for a CPU mode that computes on candle
//! the device adds the architecture off x86-64 (`exact/cpu-aarch64`), the
//! tier where this model's block matrices reach a kernel that tells tiers apart
//! (`q8_0/cpu-vnni`, `exact/cpu-noavx2`, `q4k/cpu-aarch64-i8mm`), and gemm's
//! chunk where dense products run and it is not 512 (`exact/cpu-kc1024`);
//! AVX2 and FMA without the VNNI tier, aarch64 without `i8mm`, and 512 are
//! the bare names. Exact mode on a CPU then adds the C library's part where
//! its functions are not glibc 2.36's (`exact/cpu-kc1024-libma64120` under
//! musl). Only block matrices count: the client's ends (embeddings,
//! head) never leave it. candle's `CANDLE_DEQUANTIZE_ALL` and
//! `CANDLE_DEQUANTIZE_ALL_F16`, which would turn every product dense under
//! the same name, are refused.

use super::linear::{Product, product_of};
use super::options::{LoadOptions, WeightMode};
use crate::weights::ModelFile;
use crate::{Result, ShardError};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use std::sync::OnceLock;

/// The tiers of candle 0.11.1's CPU kernels whose bits differ, as candle
/// itself chooses them at run time (`candle-core/src/cpu/features.rs`,
/// `quantized/repack_x86.rs`'s `level()`, `quantized/repack.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // each architecture makes only its own
enum Tier {
    /// x86-64 without AVX2 and FMA: plain code.
    X86Plain,
    /// x86-64 with AVX2 and FMA, below the VNNI tier.
    X86Avx2,
    /// x86-64 where candle's Q8_0 products use `vpdpbusd`.
    X86Vnni,
    /// aarch64 without `i8mm`.
    Arm,
    /// aarch64 with `i8mm`.
    ArmI8mm,
    /// Any other architecture: one tier as far as Pollen knows.
    Other,
}

impl Tier {
    /// This CPU's tier, as candle 0.11.1 detects it (its environment
    /// variables that force a lower x86-64 tier included).
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2");
            if !(avx2 && is_x86_feature_detected!("fma")) {
                return Self::X86Plain;
            }
            let forced = |v: &str| std::env::var(v).as_deref() == Ok("1");
            let (force_avx2, force_vnni) = (
                forced("MISTRALRS_FORCE_AVX2"),
                forced("MISTRALRS_FORCE_AVXVNNI"),
            );
            let avx512_vnni =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni");
            let avx_vnni = force_vnni || is_x86_feature_detected!("avxvnni");
            if !force_avx2 && ((!force_vnni && avx512_vnni) || avx_vnni) {
                Self::X86Vnni
            } else {
                Self::X86Avx2
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("i8mm") {
                Self::ArmI8mm
            } else {
                Self::Arm
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Self::Other
        }
    }

    /// The tier's part of a mode's name where block matrices compute on
    /// candle's products as `reach` says.
    fn suffix(self, reach: &Reach) -> Option<&'static str> {
        match self {
            // Dense work (attention) runs on `gemm` in every candle mode.
            Self::X86Plain => Some("noavx2"),
            Self::X86Vnni if reach.q8_0_tiled => Some("vnni"),
            Self::ArmI8mm if reach.k_quants => Some("i8mm"),
            _ => None,
        }
    }
}

/// What of candle's arithmetic a model's block matrices reach in a mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reach {
    /// Some block matrix computes on candle.
    candle: bool,
    /// A Q8_0 product candle 0.11.1 tiles on its VNNI tier (`repack_x86::select`:
    /// rows in multiples of 16, columns of 256).
    q8_0_tiled: bool,
    /// A Q4_K, Q5_K or Q6_K product.
    k_quants: bool,
    /// A dense (F32) product.
    dense: bool,
}

impl Reach {
    fn add(&mut self, product: Product, rows: usize, cols: usize) {
        use GgmlDType as D;
        let Product::Candle(t) = product else {
            return;
        };
        self.candle = true;
        self.q8_0_tiled |= t == D::Q8_0 && rows.is_multiple_of(16) && cols.is_multiple_of(256);
        self.k_quants |= matches!(t, D::Q4K | D::Q5K | D::Q6K);
        self.dense |= matches!(t, D::F32 | D::F16 | D::BF16);
    }
}

/// The first chunk gemm 0.19 sums a long dense f32 product in, on this CPU
/// (see the module's documentation), measured once (~40 ms): a 65 × 32,768 ×
/// 65 product of ones against a column whose first value, 1e8, swallows
/// every one added to it in the first chunk (1e8 + 1 rounds to 1e8: floats
/// there are 8 apart), while each later chunk's sum of ones is added, so the
/// result is `1e8 + 32,768 − chunk` (gemm keeps one accumulator per output,
/// runs k in order within a chunk, and never splits k across threads).
/// Exact where chunks are multiples of 8, as the L1 geometries CPUs report
/// give (512, 1024, 2048); a stranger chunk reads to within 8, a label still
/// equal on CPUs that chunk alike.
fn dense_chunk() -> Result<u32> {
    static CHUNK: OnceLock<u32> = OnceLock::new();
    if let Some(c) = CHUNK.get() {
        return Ok(*c);
    }
    const K: usize = 32768;
    const M: usize = 65;
    let cpu = Device::Cpu;
    let lhs = Tensor::ones((M, K), DType::F32, &cpu)?;
    let mut column = vec![1f32; K];
    column[0] = 1e8;
    let rhs = Tensor::from_vec(column, (K, 1), &cpu)?
        .broadcast_as((K, M))?
        .contiguous()?;
    let v = lhs.matmul(&rhs)?.i((0, 0))?.to_scalar::<f32>()?;
    // Below 2^27: whole numbers 8 apart.
    let chunk = (K as f64 - (f64::from(v) - 1e8)).clamp(0.0, K as f64) as u32;
    Ok(*CHUNK.get_or_init(|| chunk))
}

/// The C library's mathematics in exact mode's bits: `sinf` and `cosf` (the
/// rope tables), `powf` (their frequencies) and `expf` (SiLU, softmax), which
/// candle takes from the C library. They differ between C libraries: musl's
/// `sinf` and `cosf` give other bits than glibc's for 1–2% of a rope table's
/// values (from position 4 of a 64-wide head at base 10,000), so a static
/// musl build and a glibc one would not compute the same bits. Measured once
/// per process, where exact mode is named (a few ms): a hash of the four
/// functions on inputs like Pollen's (rope frequencies and angles for two
/// bases and head widths, small and past the point where `sinf` changes its
/// reduction; `expf` across its range). Empty where it is [`REFERENCE_MATH`],
/// else `libm` and the hash's first 6 hex digits: a name part that sets apart
/// a C library whose functions differ on these inputs (one that differs only
/// elsewhere would go unnoticed).
fn math_library() -> &'static str {
    static PART: OnceLock<String> = OnceLock::new();
    PART.get_or_init(|| {
        let hash = math_hash();
        if hash == REFERENCE_MATH {
            String::new()
        } else {
            format!("libm{}", &hash[..6])
        }
    })
}

/// [`math_library`]'s hash (hex) of this C library's functions.
fn math_hash() -> String {
    let mut h = blake3::Hasher::new();
    let mut put = |v: f32| {
        h.update(&v.to_bits().to_le_bytes());
    };
    for (base, width) in [(10_000f32, 64usize), (500_000.0, 128)] {
        for i in (0..width).step_by(2) {
            // As exact mode's `block::rope_tables` computes them.
            let frequency = 1f32 / base.powf(i as f32 / width as f32);
            put(frequency);
            for position in (0..512u32).chain((512..131_072).step_by(1021)) {
                let angle = position as f32 * frequency;
                put(angle.sin());
                put(angle.cos());
            }
        }
    }
    for i in 0..32_768u16 {
        put((-87.0 + 174.0 * (f32::from(i) / 32_768.0)).exp());
    }
    h.finalize().to_hex()[..16].to_string()
}

/// [`math_hash`] under glibc 2.36 (Debian 12), the same on x86-64 natively,
/// on emulated x86-64 CPUs without AVX2 and FMA, and on aarch64 under qemu:
/// the bare names. (glibc's `sinf`, `cosf`, `expf` and `powf` have been the
/// code of these since 2.28; other versions are not measured.)
const REFERENCE_MATH: &str = "7b91cf1f6bcc7763";

/// The chunk most CPUs' L1 caches give, named by the bare mode.
const USUAL_CHUNK: u32 = 512;

/// candle's switches that would make every product dense under the same name.
const DEQUANTIZE_VARS: [&str; 2] = ["CANDLE_DEQUANTIZE_ALL", "CANDLE_DEQUANTIZE_ALL_F16"];

/// The compute mode a node runs `file`'s blocks in with `opts`, as announced
/// and checked by peers (see the module's documentation). Reads the file's
/// header only.
pub fn compute_mode(file: &ModelFile, opts: &LoadOptions) -> Result<String> {
    for var in DEQUANTIZE_VARS {
        // As candle reads them: set, not empty, not "0".
        if std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0") {
            return Err(ShardError::BadInput(format!(
                "{var} makes candle compute every matrix dense, with other bits than its \
                 compute mode's name says; unset it"
            )));
        }
    }
    let mode = opts.effective_mode();
    if let Some(gpu) = crate::device::cuda_arithmetic(&opts.device)? {
        // What the name hashes, for telling two GPUs' names apart.
        tracing::info!(
            "GPU arithmetic: {gpu:?}, PTX {}",
            crate::device::cuda_kernels_hash()
        );
        let math = if mode == WeightMode::Exact {
            math_library()
        } else {
            ""
        };
        return Ok(cuda_name(
            mode,
            &gpu,
            crate::device::cuda_kernels_hash(),
            math,
        ));
    }
    let packs = opts.device.is_cpu() && crate::kernels::simd_available();
    let cfg = file.config()?;
    let mut reach = Reach::default();
    for i in 0..cfg.num_blocks {
        for (name, rows, cols) in super::block::matrices(&file.block_names(i), &cfg) {
            let stored = file.stored_type(&name)?;
            reach.add(product_of(mode, stored, rows, cols, packs), rows, cols);
        }
    }
    // Exact mode's attention is candle's, dense.
    let dense = opts.device.is_cpu() && (reach.dense || mode == WeightMode::Exact);
    if dense && !crate::kernels::dense_products_run() {
        // Exact mode: load's own refusal (`LoadOptions::check`).
        opts.check()?;
        return Err(crate::kernels::no_dense_products(
            "this model's float matrices",
        ));
    }
    let chunk = if dense { dense_chunk()? } else { USUAL_CHUNK };
    Ok(mode_name(
        opts,
        packs,
        &reach,
        std::env::consts::ARCH,
        Tier::detect(),
        chunk,
        if mode == WeightMode::Exact {
            math_library()
        } else {
            ""
        },
    ))
}

/// A CUDA GPU's compute mode: `<mode>/cuda-sm<major><minor>-<SMs>-<hash>`,
/// the hash (6 hex digits) over the rest of [`crate::device::CudaArithmetic`]
/// (cuBLAS's version, the driver's CUDA version and its build, the shared memory
/// a block may take, the environment variables that change cuBLAS's or the
/// driver's code, candle's TF32 switch), `kernels` (the hash of candle's PTX,
/// `device::cuda_kernels_hash`) and `math` (the C library's part, of whose
/// functions only `powf`, for exact mode's rope frequencies, runs on the host
/// here). GPUs of other kinds, or with other libraries, get other names:
/// `exact/cuda-sm90-132-3f0a1c` on an H100 or H200 (SXM).
fn cuda_name(
    mode: WeightMode,
    gpu: &crate::device::CudaArithmetic,
    kernels: &str,
    math: &str,
) -> String {
    let mut h = blake3::Hasher::new();
    let (major, minor, patch) = gpu.cublas;
    for v in [
        major,
        minor,
        patch,
        gpu.driver,
        gpu.shared_per_block,
        u32::from(gpu.reduced_f32),
    ] {
        h.update(&v.to_le_bytes());
    }
    for part in [kernels, math, &gpu.driver_build, &gpu.settings] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    // Bounded for the wire's limit on names; real GPUs are far below.
    let (cc_major, cc_minor) = (gpu.capability.0.min(99), gpu.capability.1.min(99));
    format!(
        "{mode}/cuda-sm{cc_major}{cc_minor}-{}-{}",
        gpu.sms.min(99_999),
        &h.finalize().to_hex()[..6]
    )
}

/// [`compute_mode`] from what decides it: whether packed kernels run here,
/// what of candle the block matrices reach, the architecture, candle's tier,
/// gemm's chunk and the C library's mathematics ([`math_library`]).
fn mode_name(
    opts: &LoadOptions,
    packs: bool,
    reach: &Reach,
    arch: &str,
    tier: Tier,
    chunk: u32,
    math: &str,
) -> String {
    // A CUDA GPU is named by `cuda_name`; Metal by the device alone.
    let device = if opts.device.is_cuda() {
        return format!("{}/cuda", opts.effective_mode());
    } else if !opts.device.is_cpu() {
        return format!("{}/metal", opts.effective_mode());
    } else {
        "cpu"
    };
    let (mode, on_candle) = match opts.effective_mode() {
        WeightMode::Fast if packs => ("fast".to_string(), reach.candle),
        WeightMode::Fast => ("q8_0".to_string(), true),
        m => (m.to_string(), true),
    };
    let mut name = format!("{mode}/{device}");
    if on_candle {
        if arch != "x86_64" {
            name = format!("{name}-{arch}");
        }
        if let Some(s) = tier.suffix(reach) {
            name = format!("{name}-{s}");
        }
        if chunk != USUAL_CHUNK {
            name = format!("{name}-kc{chunk}");
        }
    }
    // Exact mode computes rope tables, SiLU and softmax with the C library.
    if opts.effective_mode() == WeightMode::Exact && !math.is_empty() {
        name = format!("{name}-{math}");
    }
    name
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use GgmlDType as D;

    fn cpu(mode: WeightMode) -> LoadOptions {
        LoadOptions {
            device: Device::Cpu,
            mode,
        }
    }

    /// What block matrices of these types and shapes, all on candle, reach.
    fn reach(matrices: &[(D, usize, usize)]) -> Reach {
        let mut r = Reach::default();
        for &(t, rows, cols) in matrices {
            r.add(Product::Candle(t), rows, cols);
        }
        r
    }

    #[test]
    fn names_tell_candle_tiers_apart_only_where_the_blocks_reach_them() {
        let (exact, fast) = (cpu(WeightMode::Exact), cpu(WeightMode::Fast));
        let q8 = cpu(WeightMode::Requantize(D::Q8_0));
        let q4k = cpu(WeightMode::Requantize(D::Q4K));
        let name = |o: &LoadOptions, packs, r: &Reach, arch, tier| {
            mode_name(o, packs, r, arch, tier, USUAL_CHUNK, "")
        };
        use Tier::*;
        // Every block packed: the same name on every CPU.
        let none = Reach::default();
        for (arch, tier) in [
            ("x86_64", X86Avx2),
            ("x86_64", X86Vnni),
            ("aarch64", Arm),
            ("aarch64", ArmI8mm),
        ] {
            assert_eq!(name(&fast, true, &none, arch, tier), "fast/cpu");
            assert_eq!(
                mode_name(&fast, true, &none, arch, tier, 1024, ""),
                "fast/cpu",
                "no dense product"
            );
        }
        // The default model's blocks (Q4_1) in exact mode: the architecture,
        // and plain x86-64 (its dense work), tell bits apart.
        let q4_1 = reach(&[(D::Q4_1, 576, 576), (D::Q4_1, 576, 1536)]);
        for tier in [X86Avx2, X86Vnni] {
            assert_eq!(name(&exact, true, &q4_1, "x86_64", tier), "exact/cpu");
        }
        assert_eq!(
            name(&exact, false, &q4_1, "x86_64", X86Plain),
            "exact/cpu-noavx2"
        );
        for tier in [Arm, ArmI8mm] {
            assert_eq!(
                name(&exact, true, &q4_1, "aarch64", tier),
                "exact/cpu-aarch64"
            );
        }
        // Q8_0 blocks: candle's VNNI tier is its own arithmetic where it
        // tiles them (rows in 16s, columns in 256s).
        let q8_0 = reach(&[(D::Q8_0, 576, 576), (D::Q8_0, 576, 1536)]);
        assert_eq!(name(&q8, true, &q8_0, "x86_64", X86Avx2), "q8_0/cpu");
        assert_eq!(name(&q8, true, &q8_0, "x86_64", X86Vnni), "q8_0/cpu-vnni");
        let untiled = reach(&[(D::Q8_0, 896, 896), (D::Q8_0, 4864, 896)]);
        assert_eq!(name(&q8, true, &untiled, "x86_64", X86Vnni), "q8_0/cpu");
        assert_eq!(
            name(&q8, false, &q8_0, "x86_64", X86Plain),
            "q8_0/cpu-noavx2"
        );
        // Fast mode without a packed kernel runs as q8_0, and is named so.
        assert_eq!(
            name(&fast, false, &q8_0, "x86_64", X86Plain),
            "q8_0/cpu-noavx2"
        );
        assert_eq!(
            name(&q8, true, &q8_0, "aarch64", ArmI8mm),
            "q8_0/cpu-aarch64"
        );
        // K-quants: aarch64's i8mm tier is its own arithmetic.
        let k = reach(&[(D::Q4K, 512, 512), (D::Q6K, 512, 512)]);
        assert_eq!(name(&q4k, true, &k, "x86_64", X86Vnni), "q4k/cpu");
        assert_eq!(
            name(&q4k, true, &k, "aarch64", ArmI8mm),
            "q4k/cpu-aarch64-i8mm"
        );
        assert_eq!(name(&q4k, true, &k, "aarch64", Arm), "q4k/cpu-aarch64");
        // A fast-mode block matrix without a packed form computes on candle.
        let q3k = reach(&[(D::Q3K, 512, 512)]);
        assert_eq!(name(&fast, true, &q3k, "x86_64", X86Avx2), "fast/cpu");
        let q4k_odd = reach(&[(D::Q4K, 520, 512)]);
        assert_eq!(
            name(&fast, true, &q4k_odd, "aarch64", ArmI8mm),
            "fast/cpu-aarch64-i8mm"
        );
        let dense = reach(&[(D::F32, 512, 512)]);
        assert_eq!(
            name(&fast, true, &dense, "aarch64", Arm),
            "fast/cpu-aarch64"
        );
        // gemm's chunk, where it is not the usual one.
        assert_eq!(
            mode_name(&exact, true, &q4_1, "x86_64", X86Vnni, 1024, ""),
            "exact/cpu-kc1024"
        );
        assert_eq!(
            mode_name(&fast, true, &dense, "x86_64", X86Avx2, 1024, ""),
            "fast/cpu-kc1024"
        );
        // Another C library's mathematics: exact mode only (the others use
        // Pollen's own functions).
        let musl = "libm1a2b3c";
        for (o, r) in [(&fast, &none), (&fast, &dense), (&q4k, &k), (&q8, &q8_0)] {
            let plain = mode_name(o, true, r, "x86_64", X86Vnni, 1024, "");
            assert_eq!(mode_name(o, true, r, "x86_64", X86Vnni, 1024, musl), plain);
        }
        assert_eq!(
            mode_name(&exact, true, &q4_1, "x86_64", X86Vnni, 1024, musl),
            "exact/cpu-kc1024-libm1a2b3c"
        );
        assert_eq!(
            mode_name(&exact, true, &q4_1, "aarch64", Arm, USUAL_CHUNK, musl),
            "exact/cpu-aarch64-libm1a2b3c"
        );
        // Every name fits the wire's limit (the chunk measured is at most 32,768).
        for (arch, tier) in [
            ("x86_64", X86Plain),
            ("aarch64", ArmI8mm),
            ("riscv64", Other),
            ("powerpc64", Other),
            ("loongarch64", Other),
        ] {
            for o in [&exact, &q4k] {
                let long = mode_name(o, true, &k, arch, tier, 32768, musl);
                assert!(long.len() <= MAX_COMPUTE_LEN, "{long}");
            }
        }
    }

    /// A CUDA GPU's name changes with each thing its bits depend on, and
    /// with nothing else.
    #[test]
    fn gpu_names_tell_apart_what_cublas_and_the_driver_decide() {
        use crate::device::CudaArithmetic;
        let h200 = CudaArithmetic {
            capability: (9, 0),
            sms: 132,
            shared_per_block: 232_448,
            cublas: (13, 1, 0),
            driver: 13000,
            driver_build: "580.159.04".into(),
            settings: String::new(),
            reduced_f32: false,
        };
        let ptx = "0123456789abcdef";
        let name = |g: &CudaArithmetic, k: &str, m: &str| cuda_name(WeightMode::Exact, g, k, m);
        let base = name(&h200, ptx, "");
        assert!(base.starts_with("exact/cuda-sm90-132-"), "{base}");
        assert_eq!(base.len(), "exact/cuda-sm90-132-".len() + 6, "{base}");
        assert_eq!(name(&h200, ptx, ""), base, "the same GPU and libraries");
        let mut names = std::collections::HashSet::from([base.clone()]);
        let changes: [fn(&mut CudaArithmetic); 12] = [
            |g| g.sms = 114,
            |g| (g.capability, g.sms) = ((8, 0), 108),
            |g| g.capability = (8, 9),
            |g| g.shared_per_block = 101_376,
            |g| g.cublas = (13, 0, 2),
            |g| g.cublas = (13, 1, 1),
            |g| g.driver = 13010,
            |g| g.driver_build = "580.65.06".into(),
            |g| g.driver_build = String::new(),
            |g| g.settings = "CUBLAS_WORKSPACE_CONFIG=:4096:8".into(),
            |g| g.settings = "CUDA_FORCE_PTX_JIT=1".into(),
            |g| g.reduced_f32 = true,
        ];
        for change in changes {
            let mut other = h200.clone();
            change(&mut other);
            let n = name(&other, ptx, "");
            assert!(
                names.insert(n.clone()),
                "{n} names two arithmetics: {other:?}"
            );
        }
        for (k, m) in [("fedcba9876543210", ""), (ptx, "libm0a1b2c")] {
            let n = name(&h200, k, m);
            assert!(names.insert(n.clone()), "{n} names two arithmetics");
        }
        let mut thor = h200.clone();
        (thor.capability, thor.sms) = ((12, 1), 20);
        assert_eq!(name(&thor, ptx, "")[..18], *"exact/cuda-sm121-2");
        let mut huge = h200.clone();
        (huge.capability, huge.sms) = ((u32::MAX, u32::MAX), u32::MAX);
        let long = name(&huge, ptx, "libm0a1b2c");
        assert!(long.len() <= MAX_COMPUTE_LEN, "{long}");
        // A CPU build has no CUDA device and no PTX.
        assert_eq!(crate::device::cuda_arithmetic(&Device::Cpu).unwrap(), None);
        let built = crate::device::cuda_kernels_hash();
        #[cfg(not(feature = "cuda"))]
        assert_eq!(built, "");
        #[cfg(feature = "cuda")]
        assert!(
            built.len() == 16 && built.bytes().all(|b| b.is_ascii_hexdigit()),
            "{built}"
        );
    }

    /// The chunk measured here is a whole number of values of a product, and
    /// the same on a second look.
    #[test]
    fn gemm_chunk_is_measured() {
        let c = dense_chunk().unwrap();
        assert!((1..=32768).contains(&c), "{c}");
        assert_eq!(dense_chunk().unwrap(), c);
    }

    /// The C library these tests run with gives the bare names where it is
    /// glibc 2.36 (`REFERENCE_MATH`); another gives them or `libm` and six
    /// hex digits.
    #[test]
    fn glibc_math_is_the_reference() {
        let part = math_library();
        assert_eq!(math_hash(), math_hash(), "the hash is of fixed inputs");
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: glibc returns a static NUL-terminated string.
            #[allow(unsafe_code)]
            let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
            let version = version.to_str().unwrap();
            let (major, minor) = version.split_once('.').unwrap();
            let minor: u32 = minor.split('.').next().unwrap().parse().unwrap();
            if (major.parse::<u32>().unwrap(), minor) == (2, 36) {
                assert_eq!(part, "", "glibc {version}: {}", math_hash());
                return;
            }
        }
        assert!(
            part.is_empty() || (part.len() == 10 && part.starts_with("libm")),
            "{part}: {}",
            math_hash()
        );
    }

    /// `pollen_protocol::limits::MAX_COMPUTE_LEN` (shard does not depend on
    /// the protocol crate; node's `model.rs` checks that it is still 48).
    const MAX_COMPUTE_LEN: usize = 48;
}
