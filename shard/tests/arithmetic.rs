//! Two CPUs whose compute modes have the same name give the same bits: a
//! client chains only servers of its own mode's name
//! ([`pollen_shard::compute_mode`]), and swarm text equals local text only if
//! equal names mean equal arithmetic.
//!
//! Each CPU is a child process running this test again: this machine as it
//! is; this machine with candle's AVX2 tier forced (`MISTRALRS_FORCE_AVX2=1`,
//! which candle 0.11 reads: another arithmetic where candle's VNNI tier is
//! the one that runs here); and, where qemu-user is installed (`bash .ci/run`
//! installs it), an emulated x86-64 CPU without AVX-512 (a Haswell), one
//! without AVX2 (a Nehalem) and one with FMA but no AVX2 (a Piledriver, where
//! candle's dense products cannot run: exact mode and the float model must be
//! refused there, and every other model and mode must run). Under
//! `scripts/test-aarch64.sh` (an emulator in `POLLEN_TEST_RUNNER`) the
//! children are emulated aarch64 CPUs instead: a Cortex-A72 (no `sdot`), a
//! Cortex-A76 (`sdot`, no `i8mm`) and qemu's `max` (`i8mm`).
//!
//! Other builds of this test that run here, a static musl one say (`bash
//! scripts/test-musl.sh`), are children too, named in `POLLEN_ARITHMETIC_BUILDS`
//! (paths, space-separated; the emulated CPUs are then left out): the C
//! library's `sinf`, `cosf` and `expf` are part of exact mode's bits (as of
//! candle-transformers'), and of no other mode's (Pollen's own functions).
//!
//! Each child loads tiny random models whose block matrices are Q4_0, Q4_1,
//! Q8_0, Q4_K or Q6_K (256 wide, a shape candle's tiled kernels take), and an
//! F16 safetensors one (dense products), in the weight modes `exact`, `fast`,
//! `q8_0`, `q4_0` and `q4k`, computes a prompt (5 tokens, or
//! `POLLEN_ARITHMETIC_PROMPT`: rope tables from different C libraries differ
//! from position 4 on) and a decode step through all blocks, and reports its
//! mode's name and a hash of the outputs' bits (or that the CPU refused the
//! model in that mode).
//!
//! Not vacuous: where several tiers ran, some model and mode must compute
//! other bits on one of them; and on a CPU with candle's VNNI tier every
//! `-vnni` name must compute other bits than the same model and mode with
//! candle's AVX2 tier forced (else the suffix would split the swarm for
//! nothing); and a build whose names carry another C library's part
//! (`-libm…`) must compute other bits than this one somewhere, and only
//! exact mode's names may carry it.
#![allow(clippy::unwrap_used)]

#[allow(unreachable_pub)]
mod common {
    pub mod tiny;
}

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::tiny::{Shape, rand_tensor, write_gguf, write_safetensors};
use pollen_shard::{BlockSpan, CacheLimits, LoadOptions, ModelFile, WeightMode, compute_mode};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const TEST_NAME: &str = "equal_mode_names_mean_equal_bits_across_cpus";
/// Set in a child: the file its report goes to.
const CHILD_OUT: &str = "POLLEN_ARITHMETIC_OUT";
/// Set in a child: the folder holding the models.
const MODELS: &str = "POLLEN_ARITHMETIC_MODELS";
/// Where this test binary runs under an emulator: its command line (see
/// `kernel_paths.rs`).
const RUNNER_ENV: &str = "POLLEN_TEST_RUNNER";
/// Other builds of this test to run as children (see the module's documentation).
const BUILDS_ENV: &str = "POLLEN_ARITHMETIC_BUILDS";
/// Tokens in each child's prompt: `POLLEN_ARITHMETIC_PROMPT` (at most 200),
/// else 5.
const PROMPT_ENV: &str = "POLLEN_ARITHMETIC_PROMPT";

fn prompt_len() -> Result<usize> {
    match std::env::var(PROMPT_ENV) {
        Ok(v) => {
            let n: usize = v.parse().with_context(|| format!("{PROMPT_ENV}={v}"))?;
            anyhow::ensure!((1..=200).contains(&n), "{PROMPT_ENV}={v}: 1 to 200");
            Ok(n)
        }
        Err(_) => Ok(5),
    }
}

const SHAPE: Shape = Shape {
    hidden: 256,
    ff: 512,
    heads: 4,
    kv_heads: 2,
    blocks: 2,
    vocab: 64,
};
const TYPES: [GgmlDType; 5] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];
const MODES: [&str; 5] = ["exact", "fast", "q8_0", "q4_0", "q4k"];
/// The labels of the first two x86-64 children (see [`cpus`]).
const NATIVE: &str = "this CPU";
const FORCED_AVX2: &str = "this CPU, candle's AVX2 tier";
/// The emulated x86-64 CPU with FMA and no AVX2.
const PILEDRIVER: &str = "emulated Piledriver";
/// The model whose block matrices are dense.
const DENSE: &str = "safetensors-F16";

/// The models: a label and where each is.
fn models(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut all: Vec<(String, PathBuf)> = TYPES
        .iter()
        .map(|t| (format!("{t:?}"), dir.join(format!("tiny-{t:?}.gguf"))))
        .collect();
    all.push((DENSE.into(), dir.join("tiny-safetensors")));
    all
}

/// The mode's name and a hash of a prompt's and a decode step's outputs.
fn compute(path: &Path, mode: WeightMode) -> Result<(String, String)> {
    let file = ModelFile::open(path)?;
    let opts = LoadOptions {
        device: Device::Cpu,
        mode,
    };
    let name = compute_mode(&file, &opts)?;
    let span = BlockSpan::load(&file, file.config()?.full_range(), &opts, &mut |_, _| {})?;
    let mut cache = span.new_cache(CacheLimits::default());
    let n = prompt_len()?;
    let prompt = span.forward(&rand_tensor(&[1, n, SHAPE.hidden], 7, 1.0)?, 0, &mut cache)?;
    let step = span.forward(&rand_tensor(&[1, 1, SHAPE.hidden], 8, 1.0)?, n, &mut cache)?;
    let mut hash = blake3::Hasher::new();
    for t in [prompt, step] {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            hash.update(&v.to_le_bytes());
        }
    }
    Ok((name, hash.finalize().to_hex()[..16].to_string()))
}

/// In a child: one line per model and mode into `out`.
fn child(out: &Path) -> Result<()> {
    let dir = PathBuf::from(std::env::var_os(MODELS).context("no models folder")?);
    let mut report = String::new();
    for (model, path) in models(&dir) {
        for mode in MODES {
            let line = match compute(&path, WeightMode::parse(mode)?) {
                Ok((name, hash)) => format!("{model} {mode} {name} {hash}\n"),
                // Only an Armv8.0 CPU (candle's quantized products) and an
                // x86-64 one with FMA and no AVX2 (its dense ones) refuse.
                Err(e)
                    if ["dot-product extension", "candle's dense products"]
                        .iter()
                        .any(|why| format!("{e:#}").contains(why)) =>
                {
                    format!("{model} {mode} refused\n")
                }
                Err(e) => return Err(e).with_context(|| format!("{model} in {mode}")),
            };
            report.push_str(&line);
        }
    }
    std::fs::write(out, report)?;
    Ok(())
}

/// A CPU to run the child on: a label and the command that runs this test
/// binary there.
struct Cpu {
    label: String,
    cmd: Command,
}

/// The emulator's command words, where this binary runs under one.
fn runner() -> Vec<String> {
    std::env::var(RUNNER_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// qemu-user for x86-64 on this machine's `PATH`, if any.
fn qemu_x86() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["qemu-x86_64-static", "qemu-x86_64"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

/// The CPUs this machine can run children on (see the module's documentation).
fn cpus() -> Result<Vec<Cpu>> {
    let exe = std::env::current_exe()?;
    let mut cpus = Vec::new();
    let words = runner();
    if let Some((emulator, args)) = words.split_first() {
        // Under an emulator: the same emulator, each CPU it emulates of these.
        let listed = Command::new(emulator).args(["-cpu", "help"]).output()?;
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        for model in ["cortex-a72", "cortex-a76", "max"] {
            if !listed.split_whitespace().any(|w| w == model) {
                eprintln!("the emulator has no {model}: not tested");
                continue;
            }
            let mut cmd = Command::new(emulator);
            cmd.args(args)
                .args(["-cpu", model])
                .arg(&exe)
                .env_remove("QEMU_CPU");
            cpus.push(Cpu {
                label: format!("emulated {model}"),
                cmd,
            });
        }
        return Ok(cpus);
    }
    cpus.push(Cpu {
        label: NATIVE.into(),
        cmd: Command::new(&exe),
    });
    let builds = std::env::var(BUILDS_ENV).unwrap_or_default();
    for build in builds.split_whitespace() {
        // Cargo's `target/<triple>/...`: the triple, else the file's name.
        let parts: Vec<&str> = build.split('/').collect();
        let name = parts
            .windows(2)
            .find(|w| w[0] == "target")
            .map_or(parts[parts.len() - 1], |w| w[1]);
        cpus.push(Cpu {
            label: format!("{NATIVE}, {name} build"),
            cmd: Command::new(build),
        });
    }
    if cfg!(target_arch = "x86_64") {
        let mut cmd = Command::new(&exe);
        cmd.env("MISTRALRS_FORCE_AVX2", "1");
        cpus.push(Cpu {
            label: FORCED_AVX2.into(),
            cmd,
        });
        match qemu_x86() {
            // Other builds are compared on this CPU alone.
            _ if !builds.is_empty() => {}
            Some(qemu) => {
                // As kernel_paths.rs: a Haswell less what qemu's TCG cannot emulate.
                for (label, model) in [
                    (
                        "emulated Haswell",
                        "Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid",
                    ),
                    ("emulated Nehalem", "Nehalem"),
                    (PILEDRIVER, "Opteron_G5"),
                ] {
                    let mut cmd = Command::new(&qemu);
                    cmd.args(["-cpu", model]).arg(&exe);
                    cpus.push(Cpu {
                        label: label.into(),
                        cmd,
                    });
                }
            }
            None => eprintln!("no qemu-x86_64 here: emulated CPUs not tested"),
        }
    }
    Ok(cpus)
}

/// Whether candle's VNNI tier runs on this CPU (AVX-512 VNNI or AVX-VNNI).
fn vnni_tier() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
            || is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A child's report: (model, mode) → (name, hash), and what the CPU refused.
#[derive(Default)]
struct Report {
    ran: BTreeMap<(String, String), (String, String)>,
    refused: BTreeSet<(String, String)>,
}

/// Runs the child on `cpu`.
fn run(mut cpu: Cpu, dir: &Path) -> Result<Report> {
    let out = dir.join(format!(
        "report-{}",
        cpu.label.replace([' ', ',', '\'', '/'], "-")
    ));
    let status = cpu
        .cmd
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_OUT, &out)
        .env(MODELS, dir)
        .status()?;
    if !status.success() {
        bail!("child on {} failed: {status}", cpu.label);
    }
    let mut report = Report::default();
    for line in std::fs::read_to_string(&out)?.lines() {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [t, m, "refused"] => {
                eprintln!("{}: {t} in {m} refused", cpu.label);
                report.refused.insert((t.into(), m.into()));
            }
            [t, m, name, hash] => {
                report
                    .ran
                    .insert((t.into(), m.into()), (name.into(), hash.into()));
            }
            _ => bail!("{}: bad report line {line:?}", cpu.label),
        }
    }
    Ok(report)
}

#[test]
fn equal_mode_names_mean_equal_bits_across_cpus() -> Result<()> {
    if let Some(out) = std::env::var_os(CHILD_OUT) {
        return child(Path::new(&out));
    }
    /// Removes the models' folder however the test ends.
    struct Folder(PathBuf);
    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let folder =
        Folder(std::env::temp_dir().join(format!("pollen-arithmetic-{}", std::process::id())));
    let dir = folder.0.clone();
    std::fs::create_dir_all(&dir)?;
    for (dtype, (_, path)) in TYPES.iter().zip(models(&dir)) {
        write_gguf(&path, &SHAPE, *dtype, 1.0)?;
    }
    let dense = dir.join("tiny-safetensors");
    std::fs::create_dir_all(&dense)?;
    write_safetensors(&dense, &SHAPE, DType::F16)?;
    let cpus = cpus()?;
    let several = cpus.len() > 2 || !runner().is_empty();
    let mut runs = Vec::new();
    for cpu in cpus {
        let label = cpu.label.clone();
        runs.push((label, run(cpu, &dir)?));
    }
    // Where candle's dense products cannot run, exactly the dense work is
    // refused: exact mode (dense attention) and the float model.
    if let Some((_, piledriver)) = runs.iter().find(|(l, _)| l == PILEDRIVER) {
        let dense: BTreeSet<(String, String)> = models(&dir)
            .into_iter()
            .flat_map(|(model, _)| MODES.map(|mode| (model.clone(), mode.to_string())))
            .filter(|(model, mode)| model == DENSE || mode == "exact")
            .collect();
        assert_eq!(piledriver.refused, dense, "{PILEDRIVER} refused other work");
    }
    let mut split = 0;
    let mut vnni = 0;
    let mut libm = BTreeSet::new();
    let report = |label: &str| runs.iter().find(|(l, _)| l == label).map(|(_, r)| &r.ran);
    let (native, forced) = (report(NATIVE), report(FORCED_AVX2));
    for (model, _) in models(&dir) {
        for mode in MODES {
            let key = (model.clone(), mode.to_string());
            let got: Vec<(&str, &(String, String))> = runs
                .iter()
                .filter_map(|(label, r)| r.ran.get(&key).map(|v| (label.as_str(), v)))
                .collect();
            for (label, (name, hash)) in &got {
                eprintln!("{model} in {mode} on {label}: {name} {hash}");
            }
            for (i, (a, (name_a, hash_a))) in got.iter().enumerate() {
                for (b, (name_b, hash_b)) in &got[i + 1..] {
                    assert!(
                        name_a != name_b || hash_a == hash_b,
                        "{model} in {mode}: {a} and {b} both announce {name_a} but \
                         compute different bits"
                    );
                }
            }
            let mut hashes: Vec<_> = got.iter().map(|(_, (_, h))| h).collect();
            hashes.sort();
            hashes.dedup();
            if hashes.len() > 1 {
                split += 1;
            }
            if let (Some(native), Some(forced)) = (native, forced)
                && let Some((name, hash)) = native.get(&key)
                && name.contains("-vnni")
            {
                let (forced_name, forced_hash) =
                    forced.get(&key).context("the forced child has no report")?;
                assert!(
                    !forced_name.contains("-vnni") && forced_hash != hash,
                    "{model} in {mode}: {name} computes {hash}, as {forced_name} does \
                     with candle's AVX2 tier forced: the suffix tells nothing apart"
                );
                vnni += 1;
            }
            // Another C library's part: named apart and computing apart, in
            // exact mode alone.
            if let Some((name, hash)) = native.and_then(|n| n.get(&key)) {
                for (label, (other, other_hash)) in &got {
                    assert!(
                        mode == "exact" || !other.contains("-libm"),
                        "{model} in {mode} on {label}: {other} depends on the C library"
                    );
                    if other.contains("-libm") && !name.contains("-libm") && other_hash != hash {
                        libm.insert(*label);
                    }
                }
            }
        }
    }
    for (label, r) in &runs {
        if r.ran.values().any(|(name, _)| name.contains("-libm"))
            && native.is_some_and(|n| n.values().all(|(name, _)| !name.contains("-libm")))
        {
            assert!(
                libm.contains(label.as_str()),
                "{label} names another C library's mathematics but computes this one's bits"
            );
            eprintln!("{label}: another C library, other bits, another name");
        }
    }
    // Candle's VNNI tier runs where AVX-512 VNNI or AVX-VNNI does (see
    // compute.rs); the Q8_0 model's q8_0 mode reaches it.
    if native.is_some() && std::env::var_os("MISTRALRS_FORCE_AVX2").is_none() && vnni_tier() {
        assert!(
            vnni > 0,
            "this CPU has candle's VNNI tier but no mode named it"
        );
        eprintln!("{vnni} model-and-mode pairs compute differently on candle's VNNI tier");
    }
    // Not vacuous: where several tiers ran, some model and mode computes
    // other bits on one of them (and so, above, under another name).
    if several {
        assert!(split > 0, "every CPU computed the same bits in every mode");
        eprintln!("{split} model-and-mode pairs compute differently across these CPUs");
    }
    Ok(())
}
