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

pub mod api;
pub mod backend;
pub mod backend_args;
pub mod blocks;
pub mod bootstrap;
pub mod chat_template;
pub mod client;
pub mod clock;
pub mod demo;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod fetch;
pub mod http_listener;
pub mod manifest;
pub mod mesh;
pub mod model;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log shippers.
    Json,
}

/// An error and its causes on one line, `what: why: why`, leaving out a cause whose
/// text the line already holds (an error that prints its source in its own message
/// would otherwise repeat it).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(text.trim()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Logs to stderr as text, filtered by `POLLEN_LOG` or `RUST_LOG` (see
/// [`init_logging_as`]).
pub fn init_logging() {
    init_logging_as(LogFormat::Text);
}

/// Logs to stderr in `format`, filtered by `POLLEN_LOG`, else `RUST_LOG` (the
/// `tracing_subscriber::EnvFilter` syntax, such as `info` or `pollen_node=debug`); by
/// default warnings, minus Kademlia's bootstrap chatter on a lone node.
pub fn init_logging_as(format: LogFormat) {
    let filter = ["POLLEN_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|var| tracing_subscriber::EnvFilter::try_from_env(var).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn,libp2p_kad=error"));
    // Colours only for a person at a terminal: not in a file, a pipe or a journal,
    // nor where NO_COLOR is set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
pub mod chat;
pub mod metrics;
pub mod net;
pub mod placement;
pub mod progress;
pub mod serve;
pub mod signals;
pub mod status;
pub mod threads;
pub mod wire;

#[cfg(test)]
mod tests {
    use super::error_line;

    /// A cause an error already prints in its own message is not printed again; other
    /// causes all are, outermost first.
    #[test]
    fn error_line_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let open = pollen_shard::ShardError::Open {
            path: "/m.gguf".into(),
            source: io,
        };
        let e = anyhow::Error::new(open).context("loading the span");
        assert_eq!(
            error_line(&e),
            "loading the span: cannot open model file /m.gguf: No such file"
        );
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_line(&e), "outer: middle: inner");
    }
}
