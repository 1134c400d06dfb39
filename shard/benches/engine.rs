//! Engine benchmark: prefill and decode speed, memory, and the fast mode's
//! effect on logits, against candle-transformers' `quantized_llama` on the
//! same file. Prints a table.
//!
//! `cargo bench -p pollen-shard --bench engine` (add `-- --quick` for a short run).
//! Each row runs in a fresh child process so that thread settings and peak
//! memory are its own.
#![allow(clippy::unwrap_used, missing_docs)]

/// The default model's fetch and the cache folder, shared with the node (which owns them).
#[path = "../../node/src/fetch.rs"]
#[allow(dead_code, unreachable_pub)]
mod fetch;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
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

/// One measurement in this process: prints `RESULT prefill decode rss`.
fn child(engine: &str, mode: &str, path: &Path, prompt_len: usize, decode: usize) {
    let ids = prompt(path, prompt_len);
    let dev = Device::Cpu;
    let (prefill_s, decode_s) = if engine == "candle" {
        use candle_transformers::models::quantized_llama::ModelWeights;
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut m = ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
        let t0 = Instant::now();
        let input = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
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
        (prefill, t1.elapsed().as_secs_f64())
    } else {
        let opts = LoadOptions {
            device: dev.clone(),
            mode: WeightMode::parse(mode).unwrap(),
        };
        let file = ModelFile::open(path).unwrap();
        let cfg = file.config().unwrap();
        let ends = ClientEnds::load(&file, &opts).unwrap();
        let span = BlockSpan::load(&file, cfg.full_range(), &opts, &mut |_, _| {}).unwrap();
        let mut cache = span.new_cache(CacheLimits::default());
        let t0 = Instant::now();
        let h = span
            .forward(&ends.embed(&ids).unwrap(), 0, &mut cache)
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
        (prefill, t1.elapsed().as_secs_f64())
    };
    println!(
        "RESULT {:.3} {:.3} {:.1}",
        prompt_len as f64 / prefill_s,
        decode as f64 / decode_s,
        peak_rss_mb()
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
    println!(
        "RESULT {} {rss:.1} {}",
        span.weight_bytes(),
        ends.weight_bytes()
    );
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

/// Divergence of a fast mode from exact, per prompt: max |logit diff| over
/// `steps` positions fed the same tokens (exact mode's greedy choices), and
/// how many free-running greedy tokens agree before the first difference.
fn divergence(path: &Path, modes: &[&str], steps: usize) -> Vec<(String, usize, f32, usize)> {
    let file = ModelFile::open(path).unwrap();
    let cfg = file.config().unwrap();
    let tok = PollenTokenizer::from_model(&file).unwrap();
    let load = |m: &str| {
        let opts = LoadOptions {
            device: Device::Cpu,
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
            all.push(logits.clone());
            let h = span
                .forward(&ends.embed(&[next]).unwrap(), ids.len() + i, &mut cache)
                .unwrap();
            logits = ends.logits(&h).unwrap();
        }
        (toks, all)
    };
    let (e0, s0) = load("exact");
    let prompts: Vec<Vec<u32>> = QUESTIONS.iter().map(|q| chat_prompt(&tok, q)).collect();
    let exact: Vec<_> = prompts.iter().map(|ids| run(&e0, &s0, ids, None)).collect();
    drop((e0, s0));
    let mut out = Vec::new();
    for mode in modes {
        let (e1, s1) = load(mode);
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

fn run_child(args: &[String], threads: usize) -> Vec<f64> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| {
            panic!(
                "child {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect()
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
    let quick = args.iter().any(|a| a == "--quick");
    let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let (prompt_len, decode) = if quick { (32, 32) } else { (128, 128) };
    let reps = if quick { 1 } else { 2 };
    println!(
        "engine bench: {}, prompt {prompt_len} tokens, decode {decode} tokens, best of {reps}",
        path.display()
    );
    println!();
    println!(
        "| engine | weights | threads | prefill tok/s | decode tok/s | peak RSS MB | decode vs candle |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for threads in [1usize, 2] {
        let mut candle_decode = f64::NAN;
        for (engine, mode) in [
            ("candle", "exact"),
            ("pollen", "exact"),
            ("pollen", "fast"),
            ("pollen", "q8_0"),
        ] {
            let mut best = vec![0.0, 0.0, 0.0];
            for _ in 0..reps {
                let r = run_child(
                    &[
                        "--child".into(),
                        engine.into(),
                        mode.into(),
                        path.display().to_string(),
                        prompt_len.to_string(),
                        decode.to_string(),
                    ],
                    threads,
                );
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
            println!(
                "| {label} | {mode} | {threads} | {:.1} | {:.1} | {:.0} | {:.2}x |",
                best[0],
                best[1],
                best[2],
                best[1] / candle_decode
            );
        }
    }
    println!();
    println!("| span | weights | block weight MB | peak RSS MB (span alone) |");
    println!("| --- | --- | --- | --- |");
    let mut whole = std::collections::HashMap::new();
    for mode in ["exact", "fast"] {
        for (a, b) in [(0usize, 30usize), (10, 20)] {
            let r = run_child(
                &[
                    "--child-span".into(),
                    path.display().to_string(),
                    a.to_string(),
                    b.to_string(),
                    mode.into(),
                ],
                1,
            );
            let mb = r[0] / 1e6;
            if (a, b) == (0, 30) {
                whole.insert(mode, (mb, mb + r[2] / 1e6));
            } else {
                let (blocks, model) = whole[mode];
                println!(
                    "| {a}:{b} | {mode} | {mb:.1} ({:.1}% of all blocks' {blocks:.1}; {:.1}% of the whole model's {model:.1} with ends) | {:.0} |",
                    100.0 * mb / blocks,
                    100.0 * mb / model,
                    r[1]
                );
                continue;
            }
            println!("| {a}:{b} | {mode} | {mb:.1} | {:.0} |", r[1]);
        }
    }
    println!();
    let steps = if quick { 16 } else { 64 };
    println!(
        "Divergence from exact on {} chat-formatted questions, {steps} greedy tokens each:",
        QUESTIONS.len()
    );
    println!();
    println!(
        "| mode | prompt | max abs logit diff (same inputs) | greedy tokens equal before first difference |"
    );
    println!("| --- | --- | --- | --- |");
    for (mode, n, worst, agree) in divergence(&path, &["fast", "q8_0"], steps) {
        println!("| {mode} | {} | {worst:.4} | {agree} of {steps} |", n + 1);
    }
}
