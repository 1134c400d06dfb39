//! `pollen-bootstrap`: a stable entry point for a Pollen swarm.
//!
//! A Kademlia server, a relay v2 server (with libp2p's default resource
//! limits) for nodes behind NAT, an AutoNAT server, and an HTTP side with
//! `/health` (JSON) and a page that shows, per model, which peers serve which
//! blocks. Its first line on stdout is its full dialable address.

use clap::Parser;
use std::path::PathBuf;

/// A stable entry point for a Pollen swarm.
#[derive(Parser, Debug)]
#[command(name = "pollen-bootstrap", version, about)]
struct Args {
    /// Address to listen on (repeatable). Default: all interfaces, TCP port 4001 and QUIC port 4001.
    #[arg(long = "listen")]
    listen: Vec<libp2p::Multiaddr>,
    /// Identity key file, created on first run (mode 0600), so the peer id survives restarts.
    /// Default: $POLLEN_CACHE_DIR/bootstrap.key.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Serve /health (JSON) and a status page over HTTP on this address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Do not look for peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POLLEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let listen = if args.listen.is_empty() {
        ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    } else {
        args.listen
    };
    let cfg = pollen_node::bootstrap::BootstrapConfig {
        listen,
        identity: args
            .identity
            .unwrap_or_else(|| pollen_shard::fetch::cache_dir().join("bootstrap.key")),
        http: args.http,
        mdns: !args.no_mdns,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let signal_stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            signal_stop.cancel();
        });
        #[cfg(unix)]
        {
            let term_stop = stop.clone();
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::spawn(async move {
                    term.recv().await;
                    term_stop.cancel();
                });
            }
        }
        pollen_node::bootstrap::run(cfg, stop).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
