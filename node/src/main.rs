//! `pollen`: serve blocks of a model to the swarm, or ask it for text.

mod mesh_cmd;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use pollen_node::serve::sessions::cli as sessions_cli;
use pollen_node::{manifest::manifest_from_digest, progress, threads};
use pollen_shard::generate::{GenerateParams, prompt_ids};
use pollen_shard::{LoadOptions, LocalModel, ModelFile, SamplingParams, WeightMode};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Pollen: run open language models across volunteers' machines.
#[derive(Parser, Debug)]
#[command(
    name = "pollen",
    version,
    about = "Pollen: run open language models across volunteers' machines, so no one holds the whole model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text or as one JSON object a line (for log shippers).
    /// Which lines: POLLEN_LOG or RUST_LOG (e.g. `info`, `pollen_node=debug`; default `warn`).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: pollen_node::LogFormat,
    #[command(flatten)]
    mesh: pollen_node::net::private::MeshArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (`--local` runs the whole model in this process).
    Generate(GenerateArgs),
    /// Print a model's manifest and id (the blake3 hash peers announce).
    Manifest(ManifestArgs),
    /// Fetch the default model (SmolLM2-135M-Instruct, Q4_1) if absent and print its path.
    FetchModel,
    /// Serve a span of the model's blocks to the swarm.
    Serve(ServeArgs),
    /// Show what the swarm serves: per model, who holds which blocks, and the gaps.
    Status(StatusArgs),
    /// The local mesh demo: a bootstrap and three servers on 127.0.0.1, one question.
    Demo(DemoArgs),
    /// Serve an OpenAI-compatible HTTP API and a web chat with a live swarm view.
    Api(pollen_node::api::cli::ApiArgs),
    /// Chat in the terminal, streaming answers (`--local` runs the whole model here).
    Chat(pollen_node::chat::ChatArgs),
    /// Run a bootstrap node (the same as the `pollen-bootstrap` binary).
    Bootstrap(pollen_node::bootstrap::BootstrapArgs),
    /// A private mesh: create its swarm key, admit peers, rotate the key.
    Mesh(mesh_cmd::MeshArgs),
}

/// How to reach the swarm.
#[derive(Args, Debug, Clone)]
struct SwarmArgs {
    /// Bootstrap peer to join through, with its /p2p/ id (repeatable).
    #[arg(long = "bootstrap", value_parser = pollen_node::bootstrap::parse_bootstrap_addr)]
    bootstrap: Vec<libp2p::Multiaddr>,
    /// Do not look for peers on the local network with mDNS (on by default).
    #[arg(long)]
    no_mdns: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Test builds only: corrupt outputs, falsely accuse the hop before, forge a report
    /// in the last hop's name, or claim no room, as KIND:AFTER[:EVERY] (`perturb:5`,
    /// `nan:0:100`, `accuse:0`, `forge:2`, `noroom:0`).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    fault: Option<String>,
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    net: pollen_node::net::NetOptions,
    /// Blocks to serve, as A:B (half-open: 0:10 is blocks 0 to 9). Default: automatic
    /// placement — measure this machine, read the swarm's coverage, hold the span that
    /// helps the weakest blocks most, and move when the swarm needs it elsewhere.
    #[arg(long)]
    blocks: Option<String>,
    /// Memory this server may use, weights and runtime (KV caches, activations) together,
    /// like 2G or 512M. Automatic placement holds as many blocks as fit.
    /// Default: half the memory available at start (on a GPU, half its free memory).
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Blocks to hold under automatic placement (overrides what --max-memory allows).
    #[arg(long, conflicts_with = "blocks")]
    num_blocks: Option<usize>,
    /// Seconds between automatic placement's checks (jittered; a server leaving triggers
    /// one sooner).
    #[arg(long, default_value_t = 60, hide = true)]
    rebalance_every: u64,
    /// Address to listen on (repeatable). Default: all interfaces, a free TCP port and a free QUIC port.
    #[arg(long = "listen")]
    listen: Vec<libp2p::Multiaddr>,
    /// Identity key file, created on first run (mode 0600). Default: $POLLEN_CACHE_DIR/identity.key.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Most concurrent inference sessions.
    #[arg(long, default_value_t = 16)]
    max_sessions: usize,
    /// Most tokens (prompt and answer) per session; a session asking for more is
    /// refused (`over_budget: session cap: ...`), and its client routes around.
    #[arg(long, default_value_t = pollen_node::serve::DEFAULT_MAX_SESSION_TOKENS)]
    max_session_tokens: usize,
    /// Megabytes of KV cache all sessions together may hold; a session takes, when it
    /// opens, the most its token limit needs. When one does not fit, sessions idle for
    /// 5 s or more are evicted, the idlest first, else it is refused as busy.
    /// Default: enough for --max-sessions full sessions of this span.
    #[arg(long)]
    max_cache_mb: Option<usize>,
    /// Seconds an idle session is kept (1 to 600).
    #[arg(long, default_value_t = 120, value_parser = sessions_cli::idle_timeout)]
    idle_timeout: u64,
    /// Most sessions one client may hold open on this server (and, twice this, one
    /// server before this one may open here): below --max-sessions so that no one
    /// client can take the server out of every route, yet room for an API gateway
    /// running many generations under one identity. Default: half of the default
    /// --max-sessions.
    #[arg(long, default_value_t = 8, value_parser = sessions_cli::count)]
    max_sessions_per_client: usize,
    /// Most session streams one connected peer may hold open at once (a server before
    /// this one carries one per session it routes here).
    #[arg(long, default_value_t = 24, value_parser = sessions_cli::count)]
    max_streams_per_peer: usize,
    /// Seconds, per hop before this one (at most 4 hops' worth), a session may stay open
    /// without a first step before it is freed.
    #[arg(long, default_value = "10", value_parser = sessions_cli::first_step_timeout)]
    first_step_timeout: Duration,
    /// Seconds an announcement stays valid (renewed every third of it).
    #[arg(long, default_value_t = 30)]
    announce_ttl: u64,
    /// Seconds running sessions get to finish after Ctrl-C.
    #[arg(long, default_value_t = 30)]
    grace: u64,
    /// Milliseconds a prompt computes before other sessions' next tokens get their turn:
    /// a long prompt is computed in parts of about this long, and the sessions decoding
    /// beside it wait one part, not the whole prompt (which can take seconds). Same
    /// output either way: the fast weight modes split a prompt's rows, exact mode runs
    /// all of them through a few blocks at a time (on the CPU; a GPU computes prompts
    /// whole). 0 computes every prompt whole.
    #[arg(
        long,
        default_value_t = pollen_node::serve::batch::DEFAULT_PROMPT_PART.as_millis() as u64,
        value_name = "MS"
    )]
    prompt_part_ms: u64,
    /// Most decode steps computed as one batch: when several sessions have their next
    /// token waiting, one pass over the weights computes them all (much more throughput
    /// than one at a time, each session's output unchanged). 1 computes each alone.
    /// Batches are only as large as keep every session's bits: any size on the CPU's
    /// packed kernels (the default fast mode); otherwise any on the CPU where candle
    /// computes each row alone (the default model's Q4_1 blocks among them), at most 4
    /// on a CUDA GPU, and none otherwise.
    #[arg(
        long,
        env = pollen_node::serve::batch::MAX_BATCH_ENV,
        default_value_t = pollen_node::serve::batch::DEFAULT_MAX_BATCH,
        value_parser = sessions_cli::max_batch,
        value_name = "N"
    )]
    max_batch: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100; port 0 picks
    /// one, printed as `metrics http://...`). No authentication: keep it on a private address
    /// (in a private mesh, a loopback one).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    /// Only this model: its id (as `pollen manifest` prints it) or its model file.
    #[arg(long, value_name = "ID|FILE")]
    model: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for peers (mDNS discovery needs a moment).
    #[arg(long, default_value_t = 3)]
    wait: u64,
    /// Do not connect to each server to show how it is reached (`public`, `local` for a
    /// server announcing loopback addresses only, `direct` after hole punching through
    /// its NAT, `relayed`, or `unreachable`).
    #[arg(long)]
    no_reach: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// The question to ask through the swarm.
    #[arg(long, default_value = "Give me three tips for staying healthy.")]
    prompt: String,
    /// Most tokens to generate (1 to 32768).
    #[arg(long, default_value_t = 96, value_parser = sessions_cli::max_tokens)]
    max_tokens: usize,
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
    /// CPU threads for the model's kernels. Default: 1 for `serve` (servers sharing a machine
    /// must not fight over cores), every core this process may use otherwise.
    #[arg(long)]
    threads: Option<usize>,
    /// Weights in memory: `fast` (default) repacks quantized weights for Pollen's own
    /// kernels (AMX, AVX-512 VNNI, AVX-VNNI, AVX2 or NEON, chosen at run time; Q4_1 kept
    /// at 4 bits), and on a GPU runs as `exact`; `exact` keeps candle's arithmetic bit for
    /// bit; `q8_0`, `q4_0`, `q4k` and `q6k` requantize (CPU only). On an Armv8.0 CPU
    /// (no dot-product extension, such as a Raspberry Pi 4's) candle's products for
    /// Q4_0, Q8_0 and K-quants cannot run and a matrix that needs one is refused at load:
    /// there a client of the default model (its head is Q8_0) runs only in `fast`.
    #[arg(long, default_value = "fast")]
    weights: String,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
    /// Hidden states on the wire: f32 (exact, default), f16 or bf16 (half the bytes).
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    /// Seconds to wait for servers covering every block.
    #[arg(long, default_value_t = 20)]
    route_wait: u64,
    /// Run every block in this process instead of through the swarm.
    #[arg(long)]
    local: bool,
    /// Route through servers of this compute mode, as `pollen status` shows it (e.g. a
    /// GPU swarm's `exact/cuda-...` from a CPU), instead of the one this client's
    /// --device and --weights compute. The text then need not equal local text.
    #[arg(long, value_name = "MODE", value_parser = pollen_node::client::parse_compute, conflicts_with = "local")]
    compute: Option<String>,
    /// Probability (0 to 1) that a step is spot-checked: one span of the route is
    /// computed again by another server of it, and a server caught disagreeing with
    /// two others is banned and routed around. 0 turns spot checks off.
    #[arg(long, default_value_t = pollen_node::client::DEFAULT_VERIFY, value_parser = parse_probability)]
    verify: f64,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML, with its default system prompt).
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate (1 to 32768).
    #[arg(long, default_value_t = 128, value_parser = sessions_cli::max_tokens)]
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

/// A probability from 0 to 1.
fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        Ok(p) => Err(format!("{p} is not a probability (0 to 1)")),
        Err(e) => Err(e.to_string()),
    }
}

fn resolve_model(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => Ok(pollen_node::fetch::ensure_default_model(&mut |line| {
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

fn generate_params(args: &GenerateArgs) -> GenerateParams {
    GenerateParams {
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
    }
}

/// Streams text to stdout; stops generation if stdout is gone.
fn stdout_sink() -> impl FnMut(&str) -> bool + Send {
    move |text: &str| {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_ok()
    }
}

/// Says on stderr why the answer is empty, where it is, and prints `--stats`.
fn print_stats(args: &GenerateArgs, result: &pollen_shard::generate::Generation) {
    if result.tokens.is_empty() && result.stop == pollen_shard::generate::StopReason::EndOfTurn {
        eprintln!(
            "the model ended its answer at once (nothing generated){}",
            if args.chat {
                ""
            } else {
                "; chat models answer a question wrapped in their template: add --chat"
            }
        );
    }
    if args.stats {
        eprintln!(
            "prompt {} tokens at {:.1} tokens/s; generated {} tokens at {:.1} tokens/s; stopped: {}",
            result.prompt_tokens,
            result.prefill_tokens_per_sec(),
            result.tokens.len(),
            result.decode_tokens_per_sec(),
            result.stop
        );
    }
}

fn generate_local(args: GenerateArgs) -> Result<()> {
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
    let result = model.generate(&prompt, &generate_params(&args), &mut stdout_sink())?;
    println!();
    print_stats(&args, &result);
    Ok(())
}

async fn generate_swarm(args: GenerateArgs) -> Result<()> {
    use pollen_node::client::{ClientConfig, SwarmClient};
    let wire_dtype = match args.wire_dtype.to_ascii_lowercase().as_str() {
        "f32" => pollen_protocol::WireDType::F32,
        "f16" => pollen_protocol::WireDType::F16,
        "bf16" => pollen_protocol::WireDType::BF16,
        other => bail!("unknown --wire-dtype `{other}` (expected f32, f16 or bf16)"),
    };
    let client = SwarmClient::connect(ClientConfig {
        model: resolve_model(&args.model.model)?,
        load: load_options(&args.model)?,
        bootstrap: args.swarm.bootstrap.clone(),
        // Listening (on free ports) lets hole punching reach servers behind NAT.
        listen: default_listen(),
        mdns: !args.swarm.no_mdns,
        wire_dtype,
        route_wait: Duration::from_secs(args.route_wait),
        verify: args.verify,
        compute: args.compute.clone(),
    })
    .await?;
    let prompt = prompt_ids(&client.model().tokenizer, &args.prompt, args.chat)?;
    let params = generate_params(&args);
    // Ctrl-C mid-answer: exiting closes the connections, and every server frees the
    // session as soon as its stream breaks.
    let mut sink = stdout_sink();
    let result = tokio::select! {
        r = client.generate(&prompt, &params, &mut sink) => r,
        _ = tokio::signal::ctrl_c() => {
            println!();
            std::process::exit(130);
        }
    };
    client.shutdown().await;
    let result = result?;
    println!();
    print_stats(&args, &result);
    Ok(())
}

fn parse_size(text: &str) -> Result<u64, String> {
    pollen_node::placement::memory::parse_size(text).map_err(|e| e.to_string())
}

fn default_listen() -> Vec<libp2p::Multiaddr> {
    pollen_node::net::private::default_listen(
        ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect(),
    )
}

async fn serve(args: ServeArgs) -> Result<()> {
    #[cfg(feature = "fault-injection")]
    if let Some(spec) = &args.fault {
        pollen_node::fault::Fault::parse(spec)
            .and_then(pollen_node::fault::install)
            .map_err(|e| anyhow::anyhow!("--fault: {e}"))?;
    }
    let path = resolve_model(&args.model.model)?;
    let cfg = pollen_node::serve::ServeConfig {
        model: path,
        blocks: args.blocks.clone(),
        load: load_options(&args.model)?,
        listen: if args.listen.is_empty() {
            default_listen()
        } else {
            args.listen.clone()
        },
        bootstrap: args.swarm.bootstrap.clone(),
        identity: args
            .identity
            .clone()
            .unwrap_or_else(|| pollen_node::fetch::cache_dir().join("identity.key")),
        mdns: !args.swarm.no_mdns,
        max_sessions: args.max_sessions.max(1),
        max_session_tokens: args.max_session_tokens.max(1),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        announce_ttl: Duration::from_secs(args.announce_ttl.clamp(3, 600)),
        grace: Duration::from_secs(args.grace),
        compute_slots: args.model.threads.unwrap_or(1),
        prompt_part: Duration::from_millis(args.prompt_part_ms),
        max_batch: args.max_batch,
        max_cache_bytes: args.max_cache_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
        max_memory_bytes: args.max_memory,
        num_blocks: args.num_blocks,
        rebalance_every: Duration::from_secs(args.rebalance_every.max(1)),
        peer_limits: pollen_node::serve::sessions::PeerLimits {
            sessions_per_client: args.max_sessions_per_client,
            streams_per_peer: args.max_streams_per_peer,
            first_step_timeout: args.first_step_timeout,
        },
        net: args.net,
    };
    let metrics = match args.metrics {
        Some(addr) => {
            // A private mesh's metrics name the servers of its routes, and they take no
            // token: only on a loopback address there.
            if pollen_node::net::private::process_mesh().is_private() && !addr.ip().is_loopback() {
                bail!(
                    "refusing to serve a private mesh's metrics on {addr}: they take no token, so bind --metrics to a loopback address (127.0.0.1:PORT)"
                );
            }
            let (bound, task) = pollen_node::metrics::listen(addr)
                .await
                .with_context(|| format!("--metrics {addr}"))?;
            println!("metrics http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let kill = tokio_util::sync::CancellationToken::new();
    pollen_node::signals::watch(stop.clone(), kill.clone());
    let result = pollen_node::serve::run(cfg, stop, kill).await;
    if let Some(task) = metrics {
        task.abort();
    }
    Ok(result?)
}

async fn status(args: StatusArgs) -> Result<()> {
    let model = match &args.model {
        Some(m) => Some(match m.parse::<pollen_protocol::ModelId>() {
            Ok(id) => id,
            Err(_) if std::path::Path::new(m).is_file() => {
                pollen_node::model::model_id(std::path::Path::new(m), &mut |_, _| {})
                    .with_context(|| format!("--model {m}"))?
            }
            Err(e) => bail!("--model {m}: neither a model id ({e}) nor a model file"),
        }),
        None => None,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    // Listening (on free ports) lets hole punching reach servers behind NAT.
    let (handle, net_task) = pollen_node::client::connect_listening(
        &args.swarm.bootstrap,
        default_listen(),
        !args.swarm.no_mdns,
        cancel.clone(),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    if args.swarm.bootstrap.is_empty() {
        // mDNS only: give discovery its moment.
        tokio::time::sleep_until(deadline).await;
    }
    let book = handle.gather(model).await?;
    let reach = if args.no_reach {
        Default::default()
    } else {
        pollen_node::status::reach(&handle, &book, Duration::from_secs(3)).await
    };
    cancel.cancel();
    let _ = net_task.await;
    let mut status = pollen_node::status::to_json(&book, pollen_node::clock::unix_ms());
    pollen_node::status::with_reach(&mut status, &reach);
    if status["models"].as_array().is_some_and(Vec::is_empty)
        && let Some(hint) =
            pollen_node::net::private::empty_mesh_hint(&pollen_node::net::private::process_mesh())
    {
        eprintln!("{hint}");
    }
    if args.json {
        println!("{status}");
    } else {
        use std::io::IsTerminal;
        print!(
            "{}",
            pollen_node::status::to_text(&status, std::io::stdout().is_terminal())
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
        Command::Serve(s) => Some(s.model.threads.unwrap_or(1)),
        Command::Api(a) => a.backend.threads,
        Command::Chat(c) => c.backend.threads,
        _ => None,
    }
    .unwrap_or_else(threads::available_cores);
    threads::configure(threads);
    pollen_node::init_logging_as(cli.log_format);
    // `pollen mesh` edits the files the flags name; it starts no node.
    let mesh = match cli
        .mesh
        .install_unless(matches!(cli.command, Command::Mesh(_)))
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(pollen_shard::device::bind_opened)
        .on_thread_unpark(pollen_shard::device::bind_opened)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) if args.local => generate_local(args),
        Command::Generate(args) => runtime.block_on(generate_swarm(args)),
        Command::Manifest(args) => manifest(args),
        Command::FetchModel => resolve_model(&None).map(|p| println!("{}", p.display())),
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Demo(args) => {
            runtime.block_on(pollen_node::demo::run(args.prompt, args.max_tokens))
        }
        Command::Bootstrap(args) => runtime.block_on(pollen_node::bootstrap::run_cli(&args)),
        Command::Api(args) => runtime.block_on(pollen_node::api::cli::run(args)),
        Command::Chat(args) => runtime.block_on(pollen_node::chat::run_cli(args)),
        Command::Mesh(args) => mesh_cmd::run(args, &cli.mesh),
    };
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", pollen_node::error_line(&e));
            match e.downcast_ref() {
                Some(pollen_node::client::ClientError::NoEntry(_)) => {
                    eprintln!("{}", pollen_node::net::private::unreachable_hint(&mesh));
                }
                Some(pollen_node::client::ClientError::NoRoute { servers: 0, .. }) => {
                    if let Some(hint) = pollen_node::net::private::empty_mesh_hint(&mesh) {
                        eprintln!("{hint}");
                    }
                }
                _ => {}
            }
            std::process::ExitCode::FAILURE
        }
    }
}
