//! `pollen-bootstrap`: a stable entry point for a Pollen swarm.
//!
//! A Kademlia server, a relay v2 server (with libp2p's default resource
//! limits) for nodes behind NAT, an AutoNAT server, and an HTTP side with
//! `/health` (JSON) and a page that shows, per model, which peers serve which
//! blocks. Its first line on stdout is its full dialable address. The same
//! role runs as `pollen bootstrap`.

use clap::Parser;

/// A stable entry point for a Pollen swarm.
#[derive(Parser, Debug)]
#[command(name = "pollen-bootstrap", version, about)]
struct Args {
    #[command(flatten)]
    bootstrap: pollen_node::bootstrap::BootstrapArgs,
    #[command(flatten)]
    mesh: pollen_node::net::private::MeshArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    pollen_node::init_logging();
    if let Err(e) = args.mesh.install() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|rt| rt.block_on(pollen_node::bootstrap::run_cli(&args.bootstrap)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", pollen_node::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
