//! The `pollen` node: command-line front end, local generation, and (in the
//! swarm modules) the libp2p roles of server and client.
//!
//! This crate is where the model engine (`pollen-shard`) meets the wire
//! format (`pollen-protocol`); neither of those knows about the other.

pub mod bootstrap;
pub mod client;
pub mod demo;
pub mod manifest;

/// Logs to stderr, filtered by `POLLEN_LOG` (default: warnings, minus Kademlia's
/// bootstrap chatter on a lone node).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POLLEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error")),
        )
        .init();
}
pub mod net;
pub mod progress;
pub mod serve;
pub mod signals;
pub mod status;
pub mod threads;
pub mod wire;
