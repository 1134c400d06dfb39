//! Engine benchmark: prefill and decode speed, memory, and the fast mode's
//! effect on logits, against candle-transformers' `quantized_llama` on the
//! same file. Prints a table, with the kernel path next to every figure: the
//! fast mode runs once per packed kernel this CPU has (`POLLEN_KERNEL`), so
//! one run compares them; `candle` marks candle's own kernels.
//!
//! `cargo bench -p pollen-shard --bench engine` (add `-- --quick` for a short run;
//! `-- --batch` for batched decode, `-- --batch --device cuda` for exact mode's on a
//! GPU, `-- --kernel` for the packed product alone by rows, its weights from memory
//! and from the cache, `-- --prefill-memory`,
//! `-- --vs-llama PATH`).
//! Each row runs in a fresh child process so that thread settings, peak
//! memory and the kernel path are its own.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
use bench_args::cpu_line;

/// The default model's fetch and the cache folder, shared with the node (which owns them).
#[path = "../../node/src/fetch.rs"]
#[allow(dead_code, unreachable_pub)]
mod fetch;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use pollen_shard::kernels::{KERNEL_ENV, KernelPath, active_path, candle_kernels_run};
use pollen_shard::{
    BlockRange, BlockSpan, CacheLimits, ClientEnds, LoadOptions, ModelFile, PollenTokenizer,
    WeightMode,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PROMPT_TEXT: &str = "Pollen runs open language models across volunteers' machines, so that no single entity holds or controls the model. Each server hosts a contiguous span of the model's transformer blocks. A client holds only the small ends of the model, finds a chain of servers that together cover every block, and streams hidden states through that chain, token by token. ";

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The device a child measures on: `POLLEN_BENCH_DEVICE` (`cpu`, `cuda[:N]`),
/// which the `--device` table sets for its children; the CPU otherwise.
const DEVICE_ENV: &str = "POLLEN_BENCH_DEVICE";

/// The device the `--device` table's children run on.
static CHILD_DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn bench_device() -> Device {
    let name = std::env::var(DEVICE_ENV).unwrap_or_else(|_| "cpu".into());
    pollen_shard::device::parse_device(&name).unwrap_or_else(|e| panic!("{e}"))
}

/// Device memory in use, MB (all processes; the GPU is this bench's alone),
/// or NaN on the CPU.
fn device_used_mb(dev: &Device) -> f64 {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return match d.cuda_stream().context().mem_get_info() {
            Ok((free, total)) => (total - free) as f64 / 1e6,
            Err(_) => f64::NAN,
        };
    }
    let _ = dev;
    f64::NAN
}

/// The kernel a child in `mode` computes with: the packed path in fast
/// mode (`none` means Q8_0 on candle's kernels), candle's own otherwise.
fn kernel_of(mode: &str) -> &'static str {
    if std::env::var(DEVICE_ENV).is_ok_and(|d| d != "cpu") {
        return "cuda";
    }
    match WeightMode::parse(mode) {
        Ok(WeightMode::Fast) if active_path() != KernelPath::None.as_str() => active_path(),
        _ => "candle",
    }
}

/// The packed kernel paths this CPU runs (the fast mode's rows).
fn simd_paths() -> Vec<KernelPath> {
    KernelPath::ALL
        .into_iter()
        .filter(|p| *p != KernelPath::None && p.supported())
        .collect()
}

fn prompt(path: &Path, n: usize) -> Vec<u32> {
    let file = ModelFile::open(path).unwrap();
    let tok = PollenTokenizer::from_model(&file).unwrap();
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tok.encode(PROMPT_TEXT).unwrap());
    }
    ids.truncate(n);
    ids
}

fn argmax(logits: &Tensor) -> u32 {
    logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The weight mode a child's kernel comes from (`exact` for candle's model).
fn engine_mode<'a>(engine: &str, mode: &'a str) -> &'a str {
    if engine == "candle" { "exact" } else { mode }
}

/// One measurement in this process: prints `KERNEL name` and
/// `RESULT prefill decode memory` (peak RSS on the CPU, device memory in use
/// after decode on a GPU).
fn child(engine: &str, mode: &str, path: &Path, prompt_len: usize, decode: usize) {
    let ids = prompt(path, prompt_len);
    let dev = bench_device();
    // On a GPU the first steps load kernels and libraries: run a short
    // prompt and a few steps first, outside the timing (a fresh sequence at
    // position 0 afterwards, for both engines).
    let warm = if dev.is_cpu() { 0 } else { 1 };
    let base = device_used_mb(&dev);
    let mut figures = (0.0, 0.0, f64::NAN);
    if engine == "candle" {
        use candle_transformers::models::quantized_llama::ModelWeights;
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut m = ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
        for round in 0..=warm {
            let (ids, decode) = if round < warm {
                (&ids[..16], 4)
            } else {
                (&ids[..], decode)
            };
            let t0 = Instant::now();
            let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
            let mut next = argmax(&m.forward(&input, 0).unwrap().squeeze(0).unwrap());
            let prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for i in 0..decode {
                let input = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
                next = argmax(
                    &m.forward(&input, ids.len() + i)
                        .unwrap()
                        .squeeze(0)
                        .unwrap(),
                );
            }
            let decoded = t1.elapsed().as_secs_f64();
            figures = (prefill, decoded, device_used_mb(&dev) - base);
        }
    } else {
        let opts = LoadOptions {
            device: dev.clone(),
            mode: WeightMode::parse(mode).unwrap(),
        };
        let file = ModelFile::open(path).unwrap();
        let cfg = file.config().unwrap();
        let ends = ClientEnds::load(&file, &opts).unwrap();
        let span = BlockSpan::load(&file, cfg.full_range(), &opts, &mut |_, _| {}).unwrap();
        for round in 0..=warm {
            let (ids, decode) = if round < warm {
                (&ids[..16], 4)
            } else {
                (&ids[..], decode)
            };
            let mut cache = span.new_cache(CacheLimits::default());
            let t0 = Instant::now();
            let h = span
                .forward(&ends.embed(ids).unwrap(), 0, &mut cache)
                .unwrap();
            let mut next = argmax(&ends.logits(&h).unwrap());
            let prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for i in 0..decode {
                let h = span
                    .forward(&ends.embed(&[next]).unwrap(), ids.len() + i, &mut cache)
                    .unwrap();
                next = argmax(&ends.logits(&h).unwrap());
            }
            let decoded = t1.elapsed().as_secs_f64();
            figures = (prefill, decoded, device_used_mb(&dev) - base);
        }
    }
    let (prefill_s, decode_s, held) = figures;
    let memory = if dev.is_cpu() { peak_rss_mb() } else { held };
    println!("KERNEL {}", kernel_of(engine_mode(engine, mode)));
    println!(
        "RESULT {:.3} {:.3} {:.1}",
        prompt_len as f64 / prefill_s,
        decode as f64 / decode_s,
        memory
    );
}

/// Span memory: weight bytes and peak RSS of a span alone, and the weight
/// bytes of the client's ends (measured after the RSS, so not in it).
fn child_span(path: &Path, start: usize, end: usize, mode: &str) {
    let opts = LoadOptions {
        device: Device::Cpu,
        mode: WeightMode::parse(mode).unwrap(),
    };
    let file = ModelFile::open(path).unwrap();
    let span = BlockSpan::load(&file, BlockRange { start, end }, &opts, &mut |_, _| {}).unwrap();
    let rss = peak_rss_mb();
    let ends = ClientEnds::load(&file, &opts).unwrap();
    println!("KERNEL {}", kernel_of(mode));
    println!(
        "RESULT {} {rss:.1} {}",
        span.weight_bytes(),
        ends.weight_bytes()
    );
}

/// This process's resident set now, in MB.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets this process's peak RSS to its current RSS (Linux `clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Prefill memory: one `n`-token prompt through blocks `start..end` in a
/// fresh cache. Prints `RESULT step_peak_mb whole_peak_mb estimate_mb secs`:
/// the peak RSS during the step over the RSS before it, the process's peak
/// RSS (weights, ends where loaded, cache and step), and the engine's own
/// estimate of the step's memory.
fn child_prefill_mem(path: &Path, start: usize, end: usize, mode: &str, n: usize) {
    let opts = LoadOptions {
        device: Device::Cpu,
        mode: WeightMode::parse(mode).unwrap(),
    };
    let file = ModelFile::open(path).unwrap();
    let cfg = file.config().unwrap();
    let ids = prompt(path, n);
    let span = BlockSpan::load(&file, BlockRange { start, end }, &opts, &mut |_, _| {}).unwrap();
    // The whole model keeps its ends (as a local run does); a span gets its
    // input from the ends, which are dropped before the step is measured.
    let whole = (start, end) == (0, cfg.num_blocks);
    let ends = ClientEnds::load(&file, &opts).unwrap();
    let hidden = ends.embed(&ids).unwrap();
    let ends = if whole {
        Some(ends)
    } else {
        drop(ends);
        reset_peak_rss();
        None
    };
    let mut cache = span.new_cache(CacheLimits::default());
    let estimate = step_estimate(&span, n, 0);
    let load_peak = peak_rss_mb();
    let before = rss_mb();
    reset_peak_rss();
    let t0 = Instant::now();
    let h = span.forward(&hidden, 0, &mut cache).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let step_peak = peak_rss_mb() - before;
    if let Some(ends) = &ends {
        ends.logits(&h).unwrap();
    }
    let whole_peak = load_peak.max(peak_rss_mb());
    println!("KERNEL {}", kernel_of(mode));
    println!("RESULT {step_peak:.1} {whole_peak:.1} {estimate:.1} {secs:.2}");
}

/// The engine's estimate of a step's memory, in MB.
fn step_estimate(span: &BlockSpan, n: usize, past: usize) -> f64 {
    span.step_memory_bytes(n, past) as f64 / (1024.0 * 1024.0)
}

/// Chat-formatted questions for the divergence measurement.
const QUESTIONS: [&str; 3] = [
    "What is the capital of France, and what is it famous for?",
    "Write a short Python function that reverses a string.",
    "Explain in two sentences why the sky is blue.",
];

fn chat_prompt(tok: &PollenTokenizer, question: &str) -> Vec<u32> {
    use pollen_shard::chat::{Message, render_chatml};
    let text = render_chatml(tok, &[Message::new("user", question)]);
    tok.encode(&text).unwrap()
}

/// Divergence of a mode (on the bench's device) from exact mode on the CPU,
/// per prompt: max |logit diff| over
/// `steps` positions fed the same tokens (exact mode's greedy choices), and
/// how many free-running greedy tokens agree before the first difference.
fn divergence(path: &Path, modes: &[&str], steps: usize) -> Vec<(String, usize, f32, usize)> {
    let file = ModelFile::open(path).unwrap();
    let cfg = file.config().unwrap();
    let tok = PollenTokenizer::from_model(&file).unwrap();
    let load = |m: &str, device: Device| {
        let opts = LoadOptions {
            device,
            mode: WeightMode::parse(m).unwrap(),
        };
        let ends = ClientEnds::load(&file, &opts).unwrap();
        let span = BlockSpan::load(&file, cfg.full_range(), &opts, &mut |_, _| {}).unwrap();
        (ends, span)
    };
    let run = |ends: &ClientEnds, span: &BlockSpan, ids: &[u32], forced: Option<&[u32]>| {
        let mut cache = span.new_cache(CacheLimits::default());
        let mut all = Vec::new();
        let h = span
            .forward(&ends.embed(ids).unwrap(), 0, &mut cache)
            .unwrap();
        let mut logits = ends.logits(&h).unwrap();
        let mut toks = Vec::new();
        for i in 0..steps {
            let next = forced.map(|f| f[i]).unwrap_or_else(|| argmax(&logits));
            toks.push(argmax(&logits));
            all.push(logits.to_device(&Device::Cpu).unwrap());
            let h = span
                .forward(&ends.embed(&[next]).unwrap(), ids.len() + i, &mut cache)
                .unwrap();
            logits = ends.logits(&h).unwrap();
        }
        (toks, all)
    };
    let (e0, s0) = load("exact", Device::Cpu);
    let prompts: Vec<Vec<u32>> = QUESTIONS.iter().map(|q| chat_prompt(&tok, q)).collect();
    let exact: Vec<_> = prompts.iter().map(|ids| run(&e0, &s0, ids, None)).collect();
    drop((e0, s0));
    let mut out = Vec::new();
    for mode in modes {
        let (e1, s1) = load(mode, bench_device());
        for (n, (ids, (t0, l0))) in prompts.iter().zip(&exact).enumerate() {
            // Same inputs (exact mode's greedy tokens) for the logit comparison.
            let (_, l1) = run(&e1, &s1, ids, Some(t0));
            let worst = l0
                .iter()
                .zip(&l1)
                .map(|(a, b)| ClientEnds::max_abs_diff(a, b).unwrap())
                .fold(0f32, f32::max);
            // Free-running greedy text: tokens equal before the first difference.
            let (t1, _) = run(&e1, &s1, ids, None);
            let agree = t0.iter().zip(&t1).take_while(|(a, b)| a == b).count();
            out.push((mode.to_string(), n, worst, agree));
        }
    }
    out
}

/// Divergence in this process (on its kernel path): prints `KERNEL name`
/// and a `DIV mode prompt worst agree` line per mode and prompt.
fn child_divergence(path: &Path, modes: &[&str], steps: usize) {
    println!("KERNEL {}", kernel_of("fast"));
    for (mode, n, worst, agree) in divergence(path, modes, steps) {
        println!("DIV {mode} {n} {worst} {agree}");
    }
}

/// Runs this bench as a child with `args`, on `threads` threads and, where
/// given, the forced kernel path; returns its stdout.
fn spawn(args: &[String], threads: usize, kernel: Option<KernelPath>) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string());
    match kernel {
        Some(k) => cmd.env(KERNEL_ENV, k.as_str()),
        None => cmd.env_remove(KERNEL_ENV),
    };
    if let Some(d) = CHILD_DEVICE.get() {
        cmd.env(DEVICE_ENV, d);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        panic!(
            "child {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel a child reported.
fn kernel_line(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("KERNEL "))
        .unwrap_or("?")
        .to_string()
}

/// Runs a measuring child; returns its `RESULT` figures and its kernel.
fn run_child(args: &[String], threads: usize, kernel: Option<KernelPath>) -> (Vec<f64>, String) {
    let text = spawn(args, threads, kernel);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("child {args:?} printed no result"));
    let figures = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    (figures, kernel_line(&text))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let path = PathBuf::from(&args[3]);
        child(
            &args[1],
            &args[2],
            &path,
            args[4].parse().unwrap(),
            args[5].parse().unwrap(),
        );
        return;
    }
    if args.first().map(String::as_str) == Some("--child-span") {
        let path = PathBuf::from(&args[1]);
        child_span(
            &path,
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            &args[4],
        );
        return;
    }
    if args.first().map(String::as_str) == Some("--child-prefill-mem") {
        child_prefill_mem(
            &PathBuf::from(&args[1]),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            &args[4],
            args[5].parse().unwrap(),
        );
        return;
    }
    if args.first().map(String::as_str) == Some("--batch") {
        let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
        match args.iter().position(|a| a == "--device") {
            Some(i) => device_batch_table(&path, args.get(i + 1).expect("--device needs a device")),
            None => batch_table(&path),
        }
        return;
    }
    if args.first().map(String::as_str) == Some("--kernel") {
        kernel_table();
        return;
    }
    if args.first().map(String::as_str) == Some("--child-kernel") {
        child_kernel(args[1].parse().unwrap());
        return;
    }
    if args.first().map(String::as_str) == Some("--child-batch") {
        child_batch(
            &PathBuf::from(&args[1]),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
        );
        return;
    }
    if args.first().map(String::as_str) == Some("--prefill-memory") {
        let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
        prefill_memory_table(&path, args.iter().any(|a| a == "--with-exact"));
        return;
    }
    if args.first().map(String::as_str) == Some("--child-divergence") {
        let path = PathBuf::from(&args[1]);
        let modes: Vec<&str> = args[3..].iter().map(String::as_str).collect();
        child_divergence(&path, &modes, args[2].parse().unwrap());
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--device") {
        let name = args
            .get(i + 1)
            .expect("--device needs a device: cuda or cuda:N");
        let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
        device_table(&path, name, bench_args::arg("--rounds", 3));
        return;
    }
    if args.first().map(String::as_str) == Some("--vs-llama") {
        let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
        let rounds = args
            .iter()
            .position(|a| a == "--rounds")
            .and_then(|i| args.get(i + 1))
            .map(|r| r.parse().unwrap())
            .unwrap_or(5);
        vs_llama(&path, Path::new(&args[1]), rounds);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let skip_prefill_memory = args.iter().any(|a| a == "--no-prefill-memory");
    let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let (prompt_len, decode) = if quick { (32, 32) } else { (128, 128) };
    let reps = if quick { 1 } else { 2 };
    println!(
        "engine bench: {}, prompt {prompt_len} tokens, decode {decode} tokens, best of {reps}",
        path.display()
    );
    println!("CPU: {}", cpu_line());
    // The fast mode once per packed kernel this CPU has; without one it runs
    // as q8_0, which has its own row.
    let simd = simd_paths();
    // Where candle's quantized products would stop with an illegal
    // instruction (aarch64 without `sdot`), only Pollen's fast mode runs.
    let candle = candle_kernels_run();
    if !candle {
        println!(
            "candle's quantized products need the Arm dot-product extension, which this CPU \
             lacks: only the fast mode is measured"
        );
    }
    let mut rows: Vec<(&str, &str, Option<KernelPath>)> = Vec::new();
    if candle {
        rows.push(("candle", "exact", None));
        rows.push(("pollen", "exact", None));
    }
    rows.extend(simd.iter().map(|&p| ("pollen", "fast", Some(p))));
    if candle {
        rows.push(("pollen", "q8_0", None));
    }
    println!();
    println!(
        "| engine | weights | kernel | threads | prefill tok/s | decode tok/s | peak RSS MB | decode vs candle |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for threads in [1usize, 2] {
        let mut candle_decode = f64::NAN;
        for &(engine, mode, kernel) in &rows {
            let mut best = vec![0.0, 0.0, 0.0];
            let mut ran = String::new();
            for _ in 0..reps {
                let (r, k) = run_child(
                    &child_args(engine, mode, &path, prompt_len, decode),
                    threads,
                    kernel,
                );
                ran = k;
                if r[1] > best[1] {
                    best = r;
                }
            }
            if engine == "candle" {
                candle_decode = best[1];
            }
            let label = if engine == "candle" {
                "candle-transformers ModelWeights"
            } else {
                "pollen shard"
            };
            let mode = if mode == "fast" {
                "fast (default)"
            } else {
                mode
            };
            let vs = if candle_decode.is_nan() {
                "–".to_string()
            } else {
                format!("{:.2}x", best[1] / candle_decode)
            };
            println!(
                "| {label} | {mode} | {ran} | {threads} | {:.1} | {:.1} | {:.0} | {vs} |",
                best[0], best[1], best[2],
            );
        }
    }
    println!();
    println!("| span | weights | kernel | block weight MB | peak RSS MB (span alone) |");
    println!("| --- | --- | --- | --- | --- |");
    let mut whole = std::collections::HashMap::new();
    let span_modes: &[&str] = if candle {
        &["exact", "fast"]
    } else {
        &["fast"]
    };
    for &mode in span_modes {
        for (a, b) in [(0usize, 30usize), (10, 20)] {
            let (r, ran) = run_child(
                &[
                    "--child-span".into(),
                    path.display().to_string(),
                    a.to_string(),
                    b.to_string(),
                    mode.into(),
                ],
                1,
                None,
            );
            let mb = r[0] / 1e6;
            if (a, b) == (0, 30) {
                whole.insert(mode, (mb, mb + r[2] / 1e6));
            } else {
                let (blocks, model) = whole[mode];
                println!(
                    "| {a}:{b} | {mode} | {ran} | {mb:.1} ({:.1}% of all blocks' {blocks:.1}; {:.1}% of the whole model's {model:.1} with ends) | {:.0} |",
                    100.0 * mb / blocks,
                    100.0 * mb / model,
                    r[1]
                );
                continue;
            }
            println!("| {a}:{b} | {mode} | {ran} | {mb:.1} | {:.0} |", r[1]);
        }
    }
    if !skip_prefill_memory {
        println!();
        prefill_memory_table(&path, false);
    }
    if !candle {
        return;
    }
    println!();
    let steps = if quick { 16 } else { 64 };
    println!(
        "Divergence from exact on {} chat-formatted questions, {steps} greedy tokens each:",
        QUESTIONS.len()
    );
    println!();
    println!(
        "| mode | kernel | prompt | max abs logit diff (same inputs) | greedy tokens equal before first difference |"
    );
    println!("| --- | --- | --- | --- | --- |");
    // One child per packed kernel; the first also measures q8_0 (candle's kernels).
    let mut runs: Vec<(Option<KernelPath>, Vec<&str>)> = simd
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            (
                Some(p),
                if i == 0 {
                    vec!["fast", "q8_0"]
                } else {
                    vec!["fast"]
                },
            )
        })
        .collect();
    if runs.is_empty() {
        runs.push((None, vec!["fast", "q8_0"]));
    }
    for (kernel, modes) in runs {
        let mut args = vec![
            "--child-divergence".to_string(),
            path.display().to_string(),
            steps.to_string(),
        ];
        args.extend(modes.iter().map(|m| m.to_string()));
        let text = spawn(&args, 1, kernel);
        let ran = kernel_line(&text);
        for line in text.lines().filter_map(|l| l.strip_prefix("DIV ")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (mode, n, worst, agree) = (f[0], f[1], f[2], f[3]);
            let n: usize = n.parse().unwrap();
            let worst: f32 = worst.parse().unwrap();
            let ran = if mode == "fast" {
                ran.as_str()
            } else {
                "candle"
            };
            println!(
                "| {mode} | {ran} | {} | {worst:.4} | {agree} of {steps} |",
                n + 1
            );
        }
    }
}

/// Arguments of a `--child` run: `engine` in `mode` on the model at `path`, a
/// prompt of `prompt_len` tokens, then `decode` tokens.
fn child_args(
    engine: &str,
    mode: &str,
    path: &Path,
    prompt_len: usize,
    decode: usize,
) -> [String; 6] {
    [
        "--child".into(),
        engine.into(),
        mode.into(),
        path.display().to_string(),
        prompt_len.to_string(),
        decode.to_string(),
    ]
}

/// The GPU's name, driver and memory, from `nvidia-smi`.
fn gpu_line() -> String {
    Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown (no nvidia-smi)".into())
}

/// The engine on a GPU (`-- --device cuda`): prefill and decode against
/// candle-transformers on the same device, interleaved rounds, medians; the
/// device memory each engine holds; and each mode's logits against exact
/// mode on the CPU.
fn device_table(path: &Path, name: &str, rounds: usize) {
    // Fail here, clearly, rather than in every child.
    if let Err(e) = pollen_shard::device::parse_device(name) {
        panic!("{e}");
    }
    CHILD_DEVICE.set(name.to_string()).unwrap();
    let decode = 128;
    println!(
        "engine bench on {name}: {}, decode {decode} tokens, median of {rounds} interleaved rounds",
        path.display()
    );
    println!("GPU: {}", gpu_line());
    println!("CPU: {}", cpu_line());
    println!();
    println!(
        "| engine | weights | kernel | prompt tokens | prefill tok/s | decode tok/s | device MB held | decode vs candle | prefill vs candle |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let rows = [("candle", "exact"), ("pollen", "exact"), ("pollen", "fast")];
    for prompt_len in [128usize, 1024] {
        let mut got: Vec<Vec<Vec<f64>>> = vec![Vec::new(); rows.len()];
        let mut ran = vec![String::new(); rows.len()];
        for _ in 0..rounds {
            for (n, &(engine, mode)) in rows.iter().enumerate() {
                let (r, k) =
                    run_child(&child_args(engine, mode, path, prompt_len, decode), 1, None);
                got[n].push(r);
                ran[n] = k;
            }
        }
        let med = |n: usize, i: usize| {
            let mut v: Vec<f64> = got[n].iter().map(|r| r[i]).collect();
            bench_args::median(&mut v)
        };
        for (n, &(engine, mode)) in rows.iter().enumerate() {
            let label = if engine == "candle" {
                "candle-transformers ModelWeights"
            } else {
                "pollen shard"
            };
            println!(
                "| {label} | {mode} | {} | {prompt_len} | {:.1} | {:.1} | {:.0} | {:.2}x | {:.2}x |",
                ran[n],
                med(n, 0),
                med(n, 1),
                med(n, 2),
                med(n, 1) / med(0, 1),
                med(n, 0) / med(0, 0),
            );
        }
    }
    println!();
    let steps = 64;
    println!(
        "Divergence on {name} from exact mode on the CPU, {} chat-formatted questions, {steps} greedy tokens each:",
        QUESTIONS.len()
    );
    println!();
    println!(
        "| mode | kernel | prompt | max abs logit diff (same inputs) | greedy tokens equal before first difference |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let text = spawn(
        &[
            "--child-divergence".to_string(),
            path.display().to_string(),
            steps.to_string(),
            // Requantized weights are CPU-only (`LoadOptions::check`).
            "exact".into(),
            "fast".into(),
        ],
        1,
        None,
    );
    let ran = kernel_line(&text);
    for line in text.lines().filter_map(|l| l.strip_prefix("DIV ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let n: usize = f[1].parse().unwrap();
        let worst: f32 = f[2].parse().unwrap();
        // Exact mode on the CPU runs candle's kernels whatever the packed path.
        let ran = if f[0] == "exact" && ran != "cuda" {
            "candle"
        } else {
            ran.as_str()
        };
        println!(
            "| {} | {ran} | {} | {worst:.4} | {} of {steps} |",
            f[0],
            n + 1,
            f[3]
        );
    }
}

/// The prefill-memory table: a 1,900-token prompt through a 10-block span
/// and through the whole local model, fast mode on each kernel (and exact
/// mode on the span with `with_exact`: slow, its attention is materialised).
fn prefill_memory_table(path: &Path, with_exact: bool) {
    const N: usize = 1900;
    println!("Prefill memory, one {N}-token step, 1 thread:");
    println!();
    println!(
        "| blocks | weights | kernel | step peak MB (over RSS before) | estimate MB (`step_memory_bytes`) | process peak MB | step s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut rows: Vec<(&str, Option<KernelPath>)> = simd_paths()
        .into_iter()
        .map(|p| ("fast", Some(p)))
        .collect();
    if with_exact {
        rows.push(("exact", None));
    }
    for (mode, kernel) in rows {
        for (a, b) in [(10usize, 20usize), (0, 30)] {
            if mode == "exact" && (a, b) == (0, 30) {
                continue;
            }
            let (r, ran) = run_child(
                &[
                    "--child-prefill-mem".into(),
                    path.display().to_string(),
                    a.to_string(),
                    b.to_string(),
                    mode.into(),
                    N.to_string(),
                ],
                1,
                kernel,
            );
            let what = if (a, b) == (0, 30) {
                "0:30 + ends (local model)".to_string()
            } else {
                format!("{a}:{b}")
            };
            println!(
                "| {what} | {mode} | {ran} | {:.0} | {:.0} | {:.0} | {:.1} |",
                r[0], r[2], r[1], r[3]
            );
        }
    }
}

/// Decode throughput of `sessions` sessions (each 64 tokens in) through the
/// whole model's blocks, `steps` steps each: one at a time, then as one
/// batch per step (`BlockSpan::forward_batch`). Prints `RESULT single batched`
/// in aggregate tokens/s.
fn child_batch(path: &Path, sessions: usize, steps: usize) {
    let opts = LoadOptions::default();
    let file = ModelFile::open(path).unwrap();
    let cfg = file.config().unwrap();
    let span = BlockSpan::load(&file, cfg.full_range(), &opts, &mut |_, _| {}).unwrap();
    let h = cfg.hidden_size;
    let prompt = Tensor::randn(0f32, 1.0, (1, 64, h), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, h), &Device::Cpu).unwrap();
    let fresh = || {
        (0..sessions)
            .map(|_| {
                let mut c = span.new_cache(CacheLimits::default());
                span.forward(&prompt, 0, &mut c).unwrap();
                c
            })
            .collect::<Vec<_>>()
    };
    let mut caches = fresh();
    let t0 = Instant::now();
    for _ in 0..steps {
        for c in caches.iter_mut() {
            span.forward(&x, c.len(), c).unwrap();
        }
    }
    let single = (sessions * steps) as f64 / t0.elapsed().as_secs_f64();
    let mut caches = fresh();
    let t0 = Instant::now();
    for _ in 0..steps {
        let mut batch: Vec<(&Tensor, usize, &mut pollen_shard::SpanCache)> =
            caches.iter_mut().map(|c| (&x, c.len(), c)).collect();
        for out in span.forward_batch(&mut batch).unwrap() {
            out.unwrap();
        }
    }
    let batched = (sessions * steps) as f64 / t0.elapsed().as_secs_f64();
    println!("KERNEL {}", kernel_of("fast"));
    println!("RESULT {single:.1} {batched:.1}");
}

/// Rows of activations the kernel table measures.
const KERNEL_ROWS: [usize; 6] = [1, 2, 4, 7, 8, 16];

/// The packed product alone: `count` random 3072×576 Q4_1 matrices (the shape
/// of a block's gate/up product, 1.1 MB packed each: 240, 264 MB, are more
/// than any CPU's L3 cache; thirty, 33 MB, half the default model's blocks,
/// more than most; one stays in the L2 cache), times `rows` rows of
/// activations, one thread, 1,200 matrices' products a row count. Prints
/// `RESULT` and billions of multiply-adds a second per row count of
/// [`KERNEL_ROWS`].
fn child_kernel(count: usize) {
    use candle_core::quantized::{GgmlDType, QTensor};
    use pollen_shard::kernels::PackedMatrix;
    let (n, k) = (3072usize, 576usize);
    let mut seed = 1u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
    let mats: Vec<PackedMatrix> = (0..count)
        .map(|_| {
            PackedMatrix::pack(&q)
                .unwrap()
                .expect("a packed kernel runs here")
        })
        .collect();
    let mut figures = Vec::new();
    for rows in KERNEL_ROWS {
        let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
        let mut dst = vec![0f32; rows * n];
        let pass = |dst: &mut [f32]| mats.iter().for_each(|m| m.matmul(&x, rows, dst));
        pass(&mut dst);
        let reps = (1200 / count).max(1);
        let t0 = Instant::now();
        for _ in 0..reps {
            pass(&mut dst);
        }
        let macs = (reps * count * rows * n * k) as f64;
        figures.push(format!("{:.1}", macs / t0.elapsed().as_secs_f64() / 1e9));
    }
    // The kernel's multiply instruction alone (NaN where the path has no
    // such loop): the ceiling the many-row figures approach.
    let peak = pollen_shard::kernels::dot_peak().unwrap_or(f64::NAN);
    figures.push(format!("{peak:.1}"));
    println!("KERNEL {}", kernel_of("fast"));
    println!("RESULT {}", figures.join(" "));
}

/// The packed product's throughput by rows, per kernel path, 1 thread: from
/// memory (240 matrices), from half a model's worth (thirty: memory or the L3
/// cache, by the CPU) and from the cache (one). Where a row count's rates are
/// equal, the kernel's arithmetic bounds it; where the first are lower,
/// reading the weights does. The last column is the path's multiply
/// instruction alone ([`pollen_shard::kernels::dot_peak`]): how far the
/// many-row figures are from it is what the kernel's other operations cost.
fn kernel_table() {
    println!(
        "Packed product alone (3072x576 Q4_1 matrices: 240, 264 MB, from memory; thirty, 33 MB, from memory or L3; one, 1.1 MB, from L2), 1 thread, billions of multiply-adds a second:"
    );
    println!();
    let head: Vec<String> = KERNEL_ROWS
        .iter()
        .map(|&r| format!("{r} row{}", if r == 1 { "" } else { "s" }))
        .collect();
    println!(
        "| kernel | weights | {} | multiply instruction alone |",
        head.join(" | ")
    );
    println!("|{}", " --- |".repeat(KERNEL_ROWS.len() + 3));
    for kernel in simd_paths() {
        for (count, weights) in [(240, "264 MB"), (30, "33 MB"), (1, "1.1 MB")] {
            let (r, ran) = run_child(
                &["--child-kernel".into(), count.to_string()],
                1,
                Some(kernel),
            );
            let cells: Vec<String> = r
                .iter()
                .map(|g| {
                    if g.is_nan() {
                        "—".to_string()
                    } else {
                        format!("{g:.1}")
                    }
                })
                .collect();
            println!("| {ran} | {weights} | {} |", cells.join(" | "));
        }
    }
}

/// Batched decode against one session at a time, fast mode, at 1 and 2 threads.
fn batch_table(path: &Path) {
    println!("Batched decode (BlockSpan::forward_batch), all 30 blocks, fast mode:");
    println!();
    println!(
        "| sessions | kernel | threads | one at a time, tok/s | one batch per step, tok/s | ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for kernel in simd_paths() {
        for threads in [1usize, 2] {
            for sessions in [1usize, 8] {
                let (r, ran) = run_child(
                    &[
                        "--child-batch".into(),
                        path.display().to_string(),
                        sessions.to_string(),
                        "32".into(),
                    ],
                    threads,
                    Some(kernel),
                );
                println!(
                    "| {sessions} | {ran} | {threads} | {:.1} | {:.1} | {:.2}x |",
                    r[0],
                    r[1],
                    r[1] / r[0]
                );
            }
        }
    }
}

/// Batched decode on a device (`-- --batch --device cuda`), exact mode, in this
/// process: first whether candle's quantized product of 1 to 8 rows gives each row the
/// bits of that row alone (what `BlockSpan::batch_rows` assumes), then sessions' decode
/// steps one at a time against batches of at most `batch_rows`, every batched output
/// compared with its own step's bits.
fn device_batch_table(path: &Path, name: &str) {
    use candle_core::Module;
    use candle_core::quantized::QMatMul;
    let device = pollen_shard::device::parse_device(name).unwrap_or_else(|e| panic!("{e}"));
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    println!("Batched decode on {name} ({}), exact mode:", gpu_line());
    println!("CPU: {}", cpu_line());
    println!();
    // The product alone, on block 0's matrices.
    let mut reader = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    println!("| matrix | type | rows in one product | rows with the bits of a one-row product |");
    println!("| --- | --- | --- | --- |");
    for tensor in [
        "blk.0.attn_q.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.ffn_down.weight",
    ] {
        let q = content.tensor(&mut reader, tensor, &device).unwrap();
        let (dtype, k) = (q.dtype(), q.shape().dims()[1]);
        let m = QMatMul::from_qtensor(q).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 8, k), &device).unwrap();
        let alone: Vec<Vec<u32>> = (0..8)
            .map(|r| {
                bits(
                    &m.forward(&x.narrow(1, r, 1).unwrap().contiguous().unwrap())
                        .unwrap(),
                )
            })
            .collect();
        for rows in 1..=8 {
            let y = m
                .forward(&x.narrow(1, 0, rows).unwrap().contiguous().unwrap())
                .unwrap();
            let same = (0..rows)
                .filter(|&r| bits(&y.narrow(1, r, 1).unwrap()) == alone[r])
                .count();
            println!("| {tensor} | {dtype:?} | {rows} | {same} of {rows} |");
        }
    }
    println!();
    let opts = LoadOptions {
        device: device.clone(),
        mode: WeightMode::Exact,
    };
    let file = ModelFile::open(path).unwrap();
    let cfg = file.config().unwrap();
    let span = BlockSpan::load(&file, cfg.full_range(), &opts, &mut |_, _| {}).unwrap();
    let most = span.batch_rows();
    let steps = 32;
    println!(
        "All {} blocks, sessions 64 tokens in, {steps} steps each; batches of {} (`BlockSpan::batch_rows`):",
        cfg.num_blocks,
        if most == usize::MAX {
            "any size".to_string()
        } else {
            format!("at most {most}")
        }
    );
    println!();
    println!(
        "| sessions | one at a time, tok/s | batched, tok/s | ratio | batched outputs with their own step's bits |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let h = cfg.hidden_size;
    let prompt = Tensor::randn(0f32, 1.0, (1, 64, h), &device).unwrap();
    let fresh = |n: usize| {
        (0..n)
            .map(|_| {
                let mut c = span.new_cache(CacheLimits::default());
                span.forward(&prompt, 0, &mut c).unwrap();
                c
            })
            .collect::<Vec<_>>()
    };
    for sessions in [1usize, 2, 4, 8, 16] {
        let xs: Vec<Tensor> = (0..sessions)
            .map(|_| Tensor::randn(0f32, 1.0, (1, 1, h), &device).unwrap())
            .collect();
        // One step of every session, in batches of at most `most`; the outputs in order.
        let batched_step = |caches: &mut [pollen_shard::SpanCache]| -> Vec<Tensor> {
            caches
                .chunks_mut(most)
                .zip(xs.chunks(most))
                .flat_map(|(cs, xs)| {
                    let mut batch: Vec<(&Tensor, usize, &mut pollen_shard::SpanCache)> = cs
                        .iter_mut()
                        .zip(xs)
                        .map(|(c, x)| (x, c.len(), c))
                        .collect();
                    span.forward_batch(&mut batch).unwrap()
                })
                .map(|o| o.unwrap())
                .collect()
        };
        // Bits: each session's batched step against the same step alone.
        let mut caches = fresh(sessions);
        let alone: Vec<Vec<u32>> = caches
            .iter()
            .zip(&xs)
            .map(|(c, x)| {
                let mut c = c.clone();
                bits(&span.forward(x, c.len(), &mut c).unwrap())
            })
            .collect();
        let same = batched_step(&mut caches)
            .iter()
            .zip(&alone)
            .filter(|(o, a)| bits(o) == **a)
            .count();
        let mut caches = fresh(sessions);
        device.synchronize().unwrap();
        let t0 = Instant::now();
        for _ in 0..steps {
            for (c, x) in caches.iter_mut().zip(&xs) {
                span.forward(x, c.len(), c).unwrap();
            }
            device.synchronize().unwrap();
        }
        let single = (sessions * steps) as f64 / t0.elapsed().as_secs_f64();
        let mut caches = fresh(sessions);
        device.synchronize().unwrap();
        let t0 = Instant::now();
        for _ in 0..steps {
            batched_step(&mut caches);
            device.synchronize().unwrap();
        }
        let batched = (sessions * steps) as f64 / t0.elapsed().as_secs_f64();
        println!(
            "| {sessions} | {single:.1} | {batched:.1} | {:.2}x | {same} of {sessions} |",
            batched / single
        );
    }
}

/// The load average now (1, 5 and 15 minutes), for the record of a run.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `llama-bench` with `args` on `threads` threads; returns its
/// `(n_prompt, n_gen, n_depth, avg tok/s)` rows and its peak RSS in MB
/// (its `VmHWM`, polled while it runs).
fn llama_run(bin: &Path, args: &[String], threads: usize) -> (Vec<[f64; 4]>, f64) {
    let mut child = Command::new(bin)
        .args(args)
        .args(["-t", &threads.to_string(), "-r", "1", "-o", "csv"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0f64;
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    while child.try_wait().unwrap().is_none() {
        if let Some(kb) = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        }) {
            peak = peak.max(kb / 1024.0);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let text = reader.join().unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|h| h.trim_matches('"').to_string())
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (p, g, d, ts) = (col("n_prompt"), col("n_gen"), col("n_depth"), col("avg_ts"));
    let rows = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').map(|v| v.trim_matches('"')).collect();
            [p, g, d, ts].map(|i| f[i].parse::<f64>().unwrap())
        })
        .collect();
    (rows, peak)
}

/// Pollen against llama.cpp's `llama-bench` on the same file: prefill of
/// 128 tokens and decode of 128 tokens, 1 and 2 threads, `rounds` rounds,
/// each round running llama-bench and then Pollen on every packed kernel
/// path of this CPU (interleaved, so that a busy moment hits all of them).
/// Pollen's decode follows its 128-token prefill, so llama.cpp's decode is
/// measured both from an empty context and at depth 128. Prints the
/// medians and their ratios.
fn vs_llama(path: &Path, llama: &Path, rounds: usize) {
    let kernels = simd_paths();
    println!(
        "Pollen vs llama.cpp ({}), {}, 128-token prompt, 128 decoded tokens, {rounds} interleaved rounds, medians",
        llama.display(),
        path.display()
    );
    println!("CPU: {}", cpu_line());
    println!("load average before: {}", load_average());
    let m = path.display().to_string();
    let mut table = Vec::new();
    for threads in [1usize, 2] {
        // [llama pp, llama tg, llama tg@d128, llama rss], per kernel [pp, tg, rss].
        let mut ll: [Vec<f64>; 4] = Default::default();
        let mut po: Vec<[Vec<f64>; 3]> = kernels.iter().map(|_| Default::default()).collect();
        let mut ran = vec![String::new(); kernels.len()];
        for round in 0..rounds {
            let (rows, rss) = llama_run(
                llama,
                &["-m", &m, "-p", "128", "-n", "128"].map(String::from),
                threads,
            );
            for r in rows {
                match (r[0] as usize, r[1] as usize) {
                    (128, 0) => ll[0].push(r[3]),
                    (0, 128) => ll[1].push(r[3]),
                    _ => {}
                }
            }
            ll[3].push(rss);
            let (rows, _) = llama_run(
                llama,
                &["-m", &m, "-p", "0", "-n", "128", "-d", "128"].map(String::from),
                threads,
            );
            ll[2].extend(rows.iter().filter(|r| r[1] as usize == 128).map(|r| r[3]));
            for (i, &k) in kernels.iter().enumerate() {
                let (r, name) = run_child(
                    &child_args("pollen", "fast", Path::new(&m), 128, 128),
                    threads,
                    Some(k),
                );
                for (v, x) in po[i].iter_mut().zip(r) {
                    v.push(x);
                }
                ran[i] = name;
            }
            eprintln!(
                "threads {threads} round {}: llama pp {:.1} tg {:.1} tg@128 {:.1}; pollen {}",
                round + 1,
                ll[0].last().unwrap_or(&f64::NAN),
                ll[1].last().unwrap_or(&f64::NAN),
                ll[2].last().unwrap_or(&f64::NAN),
                po.iter()
                    .zip(&ran)
                    .map(|(p, k)| format!(
                        "{k} pp {:.1} tg {:.1}",
                        p[0].last().unwrap_or(&f64::NAN),
                        p[1].last().unwrap_or(&f64::NAN)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        table.push((threads, ll, po, ran));
    }
    println!("load average after: {}", load_average());
    println!();
    let (_, _, _, ran) = &table[0];
    let mut head = "| threads | measure | llama.cpp |".to_string();
    let mut rule = "| --- | --- | --- |".to_string();
    for k in ran {
        head += &format!(" Pollen ({k}) | ratio |");
        rule += " --- | --- |";
    }
    println!("{head}");
    println!("{rule}");
    for (threads, ll, po, _) in &table {
        let row = |what: &str, l: f64, pick: &dyn Fn(&[Vec<f64>; 3]) -> f64, unit: &str| {
            let mut line = format!("| {threads} | {what} | {l:.1}{unit} |");
            for p in po {
                let v = pick(p);
                line += &format!(" {v:.1}{unit} | {:.2}x |", v / l);
            }
            println!("{line}");
        };
        row("prefill 128, tok/s", median(&ll[0]), &|p| median(&p[0]), "");
        row(
            "decode 128 (llama.cpp from an empty context), tok/s",
            median(&ll[1]),
            &|p| median(&p[1]),
            "",
        );
        row(
            "decode 128 after 128 (llama.cpp `-d 128`), tok/s",
            median(&ll[2]),
            &|p| median(&p[1]),
            "",
        );
        row("peak RSS, MB", median(&ll[3]), &|p| median(&p[2]), "");
    }
}
