//! The `pollen` node: command-line front end, local generation, and (in the
//! swarm modules) the libp2p roles of server and client.
//!
//! This crate is where the model engine (`pollen-shard`) meets the wire
//! format (`pollen-protocol`); neither of those knows about the other.

pub mod manifest;
pub mod progress;
pub mod threads;
