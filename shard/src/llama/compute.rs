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
//! Q4_1, Q5_0, Q5_1 and Q8_1 products are the same plain code everywhere.
//! So the name is `<mode>/<device>`, and for a CPU mode that computes on candle
//! the device adds the architecture off x86-64 (`exact/cpu-aarch64`) and the
//! tier where this model's block matrices reach a kernel that tells tiers apart
//! (`q8_0/cpu-vnni`, `exact/cpu-noavx2`, `q4k/cpu-aarch64-i8mm`); AVX2 and FMA
//! without the VNNI tier, and aarch64 without `i8mm`, are the bare names. Only
//! block matrices count: the client's ends (embeddings, head) never leave it.

use super::linear::{Product, product_of};
use super::options::{LoadOptions, WeightMode};
use crate::Result;
use crate::weights::ModelFile;
use candle_core::quantized::GgmlDType;

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

    /// The tier's part of a mode's name where a block matrix computes on
    /// candle's product of one of `types` (F32/F16: dense).
    fn suffix(self, types: &[GgmlDType]) -> Option<&'static str> {
        use GgmlDType as D;
        match self {
            // Dense work (attention) runs on `gemm` in every candle mode.
            Self::X86Plain => Some("noavx2"),
            Self::X86Vnni if types.contains(&D::Q8_0) => Some("vnni"),
            Self::ArmI8mm if types.iter().any(|t| matches!(t, D::Q4K | D::Q5K | D::Q6K)) => {
                Some("i8mm")
            }
            _ => None,
        }
    }
}

/// The compute mode a node runs `file`'s blocks in with `opts`, as announced
/// and checked by peers (see the module's documentation). Reads the file's
/// header only.
pub fn compute_mode(file: &ModelFile, opts: &LoadOptions) -> Result<String> {
    let packs = opts.device.is_cpu() && crate::kernels::simd_available();
    let mode = opts.effective_mode();
    let cfg = file.config()?;
    let mut types = Vec::new();
    for i in 0..cfg.num_blocks {
        for (name, rows, cols) in super::block::matrices(&file.block_names(i), &cfg) {
            let stored = file.stored_type(&name)?;
            if let Product::Candle(t) = product_of(mode, stored, rows, cols, packs)
                && !types.contains(&t)
            {
                types.push(t);
            }
        }
    }
    Ok(mode_name(
        opts,
        packs,
        &types,
        std::env::consts::ARCH,
        Tier::detect(),
    ))
}

/// [`compute_mode`] from what decides it: whether packed kernels run here,
/// the types of the block matrices that compute on candle, the architecture
/// and candle's tier.
fn mode_name(
    opts: &LoadOptions,
    packs: bool,
    types: &[GgmlDType],
    arch: &str,
    tier: Tier,
) -> String {
    let device = if opts.device.is_cuda() {
        return format!("{}/cuda", opts.effective_mode());
    } else if !opts.device.is_cpu() {
        return format!("{}/metal", opts.effective_mode());
    } else {
        "cpu"
    };
    let (mode, on_candle) = match opts.effective_mode() {
        WeightMode::Fast if packs => ("fast".to_string(), !types.is_empty()),
        WeightMode::Fast => ("q8_0".to_string(), true),
        m => (m.to_string(), true),
    };
    let mut name = format!("{mode}/{device}");
    if on_candle {
        if arch != "x86_64" {
            name = format!("{name}-{arch}");
        }
        if let Some(s) = tier.suffix(types) {
            name = format!("{name}-{s}");
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlDType as D;
    use candle_core::Device;

    fn cpu(mode: WeightMode) -> LoadOptions {
        LoadOptions {
            device: Device::Cpu,
            mode,
        }
    }

    #[test]
    fn names_tell_candle_tiers_apart_only_where_the_blocks_reach_them() {
        let (exact, fast) = (cpu(WeightMode::Exact), cpu(WeightMode::Fast));
        let q8 = cpu(WeightMode::Requantize(D::Q8_0));
        let q4k = cpu(WeightMode::Requantize(D::Q4K));
        let name = |o: &LoadOptions, packs, types: &[D], arch, tier| {
            mode_name(o, packs, types, arch, tier)
        };
        use Tier::*;
        // Every block packed: the same name on every CPU.
        for (arch, tier) in [
            ("x86_64", X86Avx2),
            ("x86_64", X86Vnni),
            ("aarch64", Arm),
            ("aarch64", ArmI8mm),
        ] {
            assert_eq!(name(&fast, true, &[], arch, tier), "fast/cpu");
        }
        // The default model's blocks (Q4_1) in exact mode: the architecture,
        // and plain x86-64 (its dense work), tell bits apart.
        let q4_1 = [D::Q4_1];
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
        // Q8_0 blocks: candle's VNNI tier is its own arithmetic.
        let q8_0 = [D::Q8_0];
        assert_eq!(name(&q8, true, &q8_0, "x86_64", X86Avx2), "q8_0/cpu");
        assert_eq!(name(&q8, true, &q8_0, "x86_64", X86Vnni), "q8_0/cpu-vnni");
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
        let k = [D::Q4K, D::Q6K];
        assert_eq!(name(&q4k, true, &k, "x86_64", X86Vnni), "q4k/cpu");
        assert_eq!(
            name(&q4k, true, &k, "aarch64", ArmI8mm),
            "q4k/cpu-aarch64-i8mm"
        );
        assert_eq!(name(&q4k, true, &k, "aarch64", Arm), "q4k/cpu-aarch64");
        // A fast-mode block matrix without a packed form computes on candle.
        assert_eq!(name(&fast, true, &[D::Q3K], "x86_64", X86Avx2), "fast/cpu");
        assert_eq!(
            name(&fast, true, &[D::Q4K], "aarch64", ArmI8mm),
            "fast/cpu-aarch64-i8mm"
        );
        assert_eq!(
            name(&fast, true, &[D::F16], "aarch64", Arm),
            "fast/cpu-aarch64"
        );
        // Every name fits the wire's limit.
        for arch in ["aarch64", "riscv64", "powerpc64", "loongarch64"] {
            for tier in [X86Plain, ArmI8mm, Other] {
                let long = name(&q4k, true, &k, arch, tier);
                assert!(long.len() <= MAX_COMPUTE_LEN, "{long}");
            }
        }
    }

    /// `pollen_protocol::limits::MAX_COMPUTE_LEN` (shard does not depend on
    /// the protocol crate; node's `model.rs` checks that it is still 32).
    const MAX_COMPUTE_LEN: usize = 32;
}
