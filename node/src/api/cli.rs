//! `pollen api`: its command-line arguments and its start.

use super::{ApiState, web::SwarmViewCache};
use crate::backend::Backend;
use crate::client::ClientConfig;
use anyhow::{Context, Result, bail};
use clap::Args;
use pollen_shard::{LoadOptions, WeightMode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `pollen api [--bootstrap MULTIADDR]... [--listen 127.0.0.1:8080] [--local]`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// Address to serve HTTP on. Port 0 picks a free one; the address is printed as
    /// `api http://ADDR`. Without --http-token anyone who can reach it may use it: keep
    /// it on a private address. In a private mesh (--swarm-key) it must be a loopback
    /// address unless --http-token is given. On a loopback address, requests for other
    /// host names (DNS rebinding) are refused with 403.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Require this bearer token on every route (`Authorization: Bearer TOKEN`, or
    /// `?token=TOKEN`); others get 401. At least 16 characters. Default: none.
    #[arg(long, env = "POLLEN_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Bootstrap peer to join the swarm through, with its /p2p/ id (repeatable).
    #[arg(long = "bootstrap", value_parser = crate::bootstrap::parse_bootstrap_addr)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Do not look for peers on the local network with mDNS (on by default).
    #[arg(long)]
    pub no_mdns: bool,
    /// Run every block in this process instead of through the swarm.
    #[arg(long)]
    pub local: bool,
    /// Model file (.gguf) or safetensors folder; its file name is the model's name in the
    /// API. Default: SmolLM2-135M-Instruct Q4_1, fetched into $POLLEN_CACHE_DIR on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device: cpu, cuda, cuda:N or metal (GPU builds need the cuda/metal feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for the model's kernels. Default: every core this process may use.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weights in memory: fast (default), exact, q8_0 or q4_0 (as for `pollen generate`).
    #[arg(long, default_value = "fast")]
    pub weights: String,
    /// Hidden states on the wire: f32 (exact, default), f16 or bf16 (half the bytes).
    #[arg(long, default_value = "f32")]
    pub wire_dtype: String,
    /// Seconds a request waits for servers covering every block before it fails with 503.
    #[arg(long, default_value_t = 10)]
    pub route_wait: u64,
    /// Most generations at once; more are refused with 429.
    #[arg(long, default_value_t = 32)]
    pub max_concurrent: usize,
}

fn wire_dtype(s: &str) -> Result<pollen_protocol::WireDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => pollen_protocol::WireDType::F32,
        "f16" => pollen_protocol::WireDType::F16,
        "bf16" => pollen_protocol::WireDType::BF16,
        other => bail!("unknown --wire-dtype `{other}` (expected f32, f16 or bf16)"),
    })
}

/// Loads the model (or joins the swarm), then serves until Ctrl-C or SIGTERM.
pub async fn run(args: ApiArgs) -> Result<()> {
    let model = match &args.model {
        Some(p) => p.clone(),
        None => crate::fetch::ensure_default_model(&mut |line| eprintln!("{line}"))?,
    };
    let load = LoadOptions {
        device: pollen_shard::device::parse_device(&args.device)?,
        mode: WeightMode::parse(&args.weights)?,
    };
    // A private mesh's swarm view (peer ids, addresses, spans) and its generation are for
    // its members: not on an open address without a token.
    crate::net::private::check_page(
        args.listen,
        &crate::net::private::process_mesh(),
        args.http_token.as_deref(),
    )
    .context("pollen api --listen")?;
    // Bind first: a taken port fails before minutes of loading.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let backend = if args.local {
        let pb = crate::progress::bar("loading", 0);
        let bar = pb.clone();
        let b = Backend::local(
            model.clone(),
            load,
            args.max_concurrent,
            move |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .await;
        pb.finish_and_clear();
        b
    } else {
        Backend::swarm(
            ClientConfig {
                model: model.clone(),
                load,
                bootstrap: args.bootstrap.clone(),
                listen: Vec::new(),
                mdns: !args.no_mdns,
                wire_dtype: wire_dtype(&args.wire_dtype)?,
                route_wait: Duration::from_secs(args.route_wait),
                verify: crate::client::DEFAULT_VERIFY,
            },
            args.max_concurrent,
        )
        .await
    }
    .with_context(|| format!("loading {}", model.display()))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(ApiState {
        backend,
        swarm_view: SwarmViewCache::default(),
        shutdown: CancellationToken::new(),
    });
    println!("api http://{addr}");
    println!("model {}", state.backend.name());
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    crate::signals::watch(stop.clone(), kill.clone());
    super::serve(state, listener, args.http_token.clone(), stop).await?;
    Ok(())
}
