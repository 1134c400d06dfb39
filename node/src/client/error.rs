//! What can go wrong for a client, keeping the failing hop and peer.

use crate::blocks::BlockRange;
use crate::net::NetError;
use libp2p::PeerId;
use pollen_protocol::{ErrorCode, ModelId};

/// Which server of a route failed, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hop {hop} (blocks {blocks}, peer {peer}) failed: {code}: {message}")]
pub struct HopFailure {
    /// Its index in the route.
    pub hop: usize,
    /// Its peer id.
    pub peer: PeerId,
    /// Its blocks.
    pub blocks: BlockRange,
    /// What went wrong.
    pub code: ErrorCode,
    /// In words.
    pub message: String,
    /// The next hop, when the failure is its report about this one (non-finite hidden
    /// states): a dispute, since the client cannot tell which of the two is at fault.
    pub reported_by: Option<PeerId>,
    /// The hop before, when the failure is its report that this one failed it (could
    /// not be reached, went silent, answered wrong): its word, so the two are kept
    /// apart for a while (the same hop cannot report this one again and again).
    pub blamed_by: Option<PeerId>,
}

/// A failure of a generation through the swarm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No chain of announced servers covers every block.
    #[error("{}", no_route_text(.model, .compute, .uncovered, .servers, .other_modes, .misaligned))]
    NoRoute {
        /// The model.
        model: ModelId,
        /// The compute mode every server of a route must run (the client's).
        compute: String,
        /// Blocks no usable server covers.
        uncovered: Vec<BlockRange>,
        /// Servers announced for the model.
        servers: usize,
        /// Servers announced for the model in other compute modes, by mode (as shown).
        other_modes: Vec<(String, usize)>,
        /// Every block is covered, but no chain of spans lines up end to start.
        misaligned: bool,
    },
    /// A server of the route failed.
    #[error(transparent)]
    HopFailed(Box<HopFailure>),
    /// A server answered something the protocol does not allow here.
    #[error("peer {peer}: {message}")]
    Protocol {
        /// Who.
        peer: PeerId,
        /// What.
        message: String,
    },
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The model's ends failed (loading, embedding, head, tokenizer).
    #[error(transparent)]
    Model(#[from] pollen_shard::ShardError),
    /// Hidden states could not be converted.
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    /// No bootstrap could be reached and mDNS is off.
    #[error("{0}")]
    NoEntry(String),
    /// A compute task panicked.
    #[error("a compute task failed: {0}")]
    Task(String),
}

/// A compute mode's name without the C library's part (`-libm` and six hex
/// digits at its end, `pollen_shard::compute_mode`), if it has one.
fn without_libm(mode: &str) -> &str {
    match mode.rsplit_once("-libm") {
        Some((base, hash)) if hash.len() == 6 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            base
        }
        _ => mode,
    }
}

fn no_route_text(
    model: &ModelId,
    compute: &str,
    uncovered: &[BlockRange],
    servers: &usize,
    other_modes: &[(String, usize)],
    misaligned: &bool,
) -> String {
    let gaps = if *misaligned {
        "none, but the spans do not line up".to_string()
    } else {
        uncovered
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let others = if other_modes.is_empty() {
        String::new()
    } else {
        let each: Vec<String> = other_modes
            .iter()
            .map(|(m, n)| format!("{m} × {n}"))
            .collect();
        let libm = if other_modes
            .iter()
            .any(|(m, _)| m != compute && without_libm(m) == without_libm(compute))
        {
            " (names that differ only in a `-libm` part are one arithmetic under two C \
             libraries whose `sinf`, `cosf`, `expf` or `powf` give other bits, glibc and a \
             static musl build say: a build on the servers' C library chains with them)"
        } else {
            ""
        };
        let on_gpu = |m: &str| m.contains("/cuda-");
        let gpu = if on_gpu(compute) && other_modes.iter().any(|(m, _)| on_gpu(m)) {
            " (a GPU's mode names its architecture and number of SMs and hashes its \
             libraries, driver, settings and candle's kernels, which a server logs at \
             `info` as `GPU arithmetic`: GPUs compute the same bits only where all of \
             these agree)"
        } else if !on_gpu(compute) && other_modes.iter().any(|(m, _)| on_gpu(m)) {
            " (servers on GPUs compute a client's own text only for a client on the same \
             kind of GPU, with the same libraries: `--device cuda` there)"
        } else {
            ""
        };
        format!(
            "; in other compute modes, which compute other bits and which this client \
             does not chain: {}{libm}{gpu} (`--compute MODE` routes through one of these; \
             the text then need not equal local text)",
            each.join(", ")
        )
    };
    format!(
        "no chain of servers computing {} covers every block of model {model} (uncovered: \
         {gaps}); {servers} server{} announced{others}",
        crate::status::shown_mode(compute),
        if *servers == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the servers' mode differs from the client's only by the C
    /// library, or where GPUs are apart, the error says so.
    #[test]
    fn no_route_names_a_c_library_difference() {
        let model = ModelId::from_bytes([7; 32]);
        let text = |compute: &str, others: &[(&str, usize)]| {
            let others: Vec<(String, usize)> =
                others.iter().map(|(m, n)| (m.to_string(), *n)).collect();
            no_route_text(&model, compute, &[], &3, &others, &true)
        };
        let musl = text("exact/cpu-libma64120", &[("exact/cpu", 3)]);
        assert!(musl.contains("exact/cpu × 3"), "{musl}");
        assert!(musl.contains("C library"), "{musl}");
        let glibc = text("exact/cpu", &[("exact/cpu-libma64120", 2), ("fast/cpu", 1)]);
        assert!(glibc.contains("C library"), "{glibc}");
        let plain = text("fast/cpu", &[("exact/cpu", 3), ("q8_0/cpu-vnni", 1)]);
        assert!(!plain.contains("C library"), "{plain}");
        assert!(!plain.contains("GPU"), "{plain}");
        let h100 = "exact/cuda-sm90-132-3f0a1c";
        let a100 = text(h100, &[("exact/cuda-sm80-108-77e0b2", 3)]);
        assert!(a100.contains("GPUs compute the same bits only"), "{a100}");
        let cpu = text("fast/cpu", &[(h100, 3), ("exact/cpu", 1)]);
        assert!(cpu.contains("`--device cuda`"), "{cpu}");
        assert!(!cpu.contains("C library"), "{cpu}");
        assert!(cpu.contains("`--compute MODE`"), "{cpu}");
        assert_eq!(
            without_libm("exact/cpu-kc1024-libm0a1b2c"),
            "exact/cpu-kc1024"
        );
        assert_eq!(without_libm("fast/cpu-libmz"), "fast/cpu-libmz");
        assert_eq!(without_libm("fast/cpu"), "fast/cpu");
    }
}
