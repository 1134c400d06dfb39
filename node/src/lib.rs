//! The `pollen` node: command-line front end, local generation, and (in the
//! swarm modules) the libp2p roles of server and client.
//!
//! This crate is where the model engine (`pollen-shard`) meets the wire
//! format (`pollen-protocol`); neither of those knows about the other.

pub mod bootstrap;
pub mod client;
pub mod demo;
pub mod manifest;
pub mod net;
pub mod progress;
pub mod serve;
pub mod signals;
pub mod status;
pub mod threads;
pub mod wire;
