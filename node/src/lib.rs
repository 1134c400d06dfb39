//! The `pollen` node: the libp2p roles of server, client and bootstrap, and the
//! command-line front end over them.
//!
//! This crate is where the model engine (`pollen-shard`) meets the wire format
//! (`pollen-protocol`); neither of those knows about the other. It also owns what is
//! specific to a machine: the cache folder, the default model's fetch, identity keys.
//!
//! Rooms: [`net`] (the swarm task and its handle), [`serve`] (the server role),
//! [`client`] (routing and generation through the swarm), [`bootstrap`] (entry points
//! and their page), [`mesh`] (a local mesh of processes for the demo, tests and bench),
//! [`fetch`] and [`model`] (the model on disk), [`wire`] and [`blocks`] (conversions
//! between the engine's and the wire's types), [`clock`], [`status`], [`signals`].

pub mod backend;
pub mod blocks;
pub mod bootstrap;
pub mod chat_template;
pub mod client;
pub mod clock;
pub mod demo;
pub mod fetch;
pub mod manifest;
pub mod mesh;
pub mod model;

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
