//! `pollen`: serve blocks of a model to the swarm, or ask it for text.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use pollen_node::{manifest::manifest_from_digest, progress, threads};
use pollen_shard::generate::{GenerateParams, prompt_ids};
use pollen_shard::{LoadOptions, LocalModel, ModelFile, SamplingParams, WeightMode};
use std::io::Write;
use std::path::PathBuf;

/// Pollen: run open language models across volunteers' machines.
#[derive(Parser, Debug)]
#[command(name = "pollen", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (`--local` runs the whole model in this process).
    Generate(GenerateArgs),
    /// Print a model's manifest and id (the blake3 hash peers announce).
    Manifest(ManifestArgs),
    /// Fetch the default model (SmolLM2-135M-Instruct, Q4_1) if absent and print its path.
    FetchModel,
}

/// Where the model is and how to run it.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Model file (.gguf) or safetensors folder. Default: SmolLM2-135M-Instruct Q4_1,
    /// fetched into $POLLEN_CACHE_DIR (default ~/.cache/pollen) on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device: cpu, cuda, cuda:N or metal (GPU builds need the cuda/metal feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads for the model's kernels. Default: every core this process may use.
    #[arg(long)]
    threads: Option<usize>,
    /// Weights in memory: `q8_0` (default) requantizes types that lack a fast CPU kernel
    /// (Q4_1, Q5_x) to Q8_0 at load; `exact` keeps the file's arithmetic bit for bit.
    #[arg(long, default_value = "q8_0")]
    weights: String,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Run every block in this process instead of through the swarm.
    #[arg(long)]
    local: bool,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML, with its default system prompt).
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalty on recently generated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Run the prompt in chunks of at most this many tokens (0 = all at once).
    #[arg(long, default_value_t = 0)]
    prefill_chunk: usize,
    /// Print timing (tokens/s) to stderr at the end.
    #[arg(long)]
    stats: bool,
}

#[derive(Args, Debug)]
struct ManifestArgs {
    /// Model file (.gguf) or safetensors folder. Default: the default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object (with the model id as `id`).
    #[arg(long)]
    json: bool,
}

fn resolve_model(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => Ok(pollen_shard::fetch::ensure_default_model(&mut |line| {
            eprintln!("{line}")
        })?),
    }
}

fn load_options(args: &ModelArgs) -> Result<LoadOptions> {
    Ok(LoadOptions {
        device: pollen_shard::device::parse_device(&args.device)?,
        mode: WeightMode::parse(&args.weights)?,
    })
}

fn generate(args: GenerateArgs) -> Result<()> {
    if !args.local {
        bail!("swarm generation is not available in this build yet: pass --local to run the whole model in this process");
    }
    let path = resolve_model(&args.model.model)?;
    let opts = load_options(&args.model)?;
    let pb = progress::bar("loading", 0);
    let model = LocalModel::load(&path, &opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .with_context(|| format!("loading {}", path.display()))?;
    pb.finish_and_clear();
    let prompt = prompt_ids(&model.tokenizer, &args.prompt, args.chat)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repeat_penalty: args.repeat_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_strings: args.stop.clone(),
        prefill_chunk: args.prefill_chunk,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_failed = false;
    let result = model.generate(&prompt, &params, &mut |text| {
        if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
            write_failed = true;
            return false;
        }
        true
    })?;
    let _ = writeln!(out);
    if args.stats {
        eprintln!(
            "prompt {} tokens at {:.1} tokens/s; generated {} tokens at {:.1} tokens/s ({:?})",
            result.prompt_tokens,
            result.prefill_tokens_per_sec(),
            result.tokens.len(),
            result.decode_tokens_per_sec(),
            result.stop
        );
    }
    Ok(())
}

fn manifest(args: ManifestArgs) -> Result<()> {
    let path = resolve_model(&args.model)?;
    let file = ModelFile::open(&path)?;
    let pb = progress::bar("hashing", 0);
    let digest = pollen_shard::digest::digest(&file, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    let m = manifest_from_digest(&digest);
    if args.json {
        println!("{}", serde_json::to_string(&m.to_json())?);
    } else {
        println!("model id     {}", m.id());
        println!("name         {}", m.name);
        println!("file         {}", path.display());
        println!(
            "architecture {} ({} blocks, hidden {}, {} heads / {} kv heads, vocab {})",
            m.arch.architecture,
            m.arch.num_blocks,
            m.arch.hidden_size,
            m.arch.num_heads,
            m.arch.num_kv_heads,
            m.arch.vocab_size
        );
        for (i, h) in m.blocks.iter().enumerate() {
            println!("block {i:>4}   {}", blake3::Hash::from_bytes(*h).to_hex());
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Generate(g) => g.model.threads,
        _ => None,
    }
    .unwrap_or_else(threads::available_cores);
    threads::configure(threads);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POLLEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Manifest(args) => manifest(args),
        Command::FetchModel => resolve_model(&None).map(|p| println!("{}", p.display())),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
