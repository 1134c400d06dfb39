//! Routing: the cheapest chain of announced spans that covers every block of a model.
//!
//! A route's cost per token is the sum of its servers' times per token plus the round
//! trips its hidden states cross: client to the first server and the last server back to
//! the client (measured by the client), and each server to the next (measured by the
//! server before, and announced). Unmeasured edges count [`DEFAULT_RTT`].
//!
//! A server's time per token is not taken on its word: it is the slower of what it
//! announces and what this client measured of it ([`super::speed::Speeds`]); until it
//! is measured, no server is believed faster than [`UNPROVEN_STEP_PER_BLOCK`] per block.

use super::error::ClientError;
use crate::blocks::BlockRange;
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::{ModelId, VerifiedAnnouncement};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// The round trip assumed for an edge nobody measured.
pub const DEFAULT_RTT: Duration = Duration::from_millis(2);
/// Slowest throughput believed, in tokens per second (a zero would divide by zero).
const MIN_THROUGHPUT: f64 = 0.01;
/// The fastest a server that this client has not measured yet is believed to be, per
/// block and token: 20 µs (a 30-block span at 1,667 tokens/s). A claim of more is
/// capped here until the server proves it.
pub const UNPROVEN_STEP_PER_BLOCK: Duration = Duration::from_micros(20);

/// One server on a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The server.
    pub peer: PeerId,
    /// Its blocks.
    pub blocks: BlockRange,
    /// Where to reach it.
    pub addrs: Vec<Multiaddr>,
    /// Its announced time per token, in microseconds.
    pub step_us: u32,
}

/// A server's time per token as this client believes it: the slower of what it
/// announces and what it has proven (measured, or the unproven floor for its blocks).
fn believed(
    a: &VerifiedAnnouncement,
    peer: &PeerId,
    blocks: usize,
    measured: &HashMap<PeerId, f64>,
) -> f64 {
    let proven = measured
        .get(peer)
        .copied()
        .filter(|s| s.is_finite())
        .unwrap_or(UNPROVEN_STEP_PER_BLOCK.as_secs_f64() * blocks as f64);
    seconds_per_token(a).max(proven)
}

fn seconds_per_token(a: &VerifiedAnnouncement) -> f64 {
    let tps = f64::from(a.throughput);
    1.0 / if tps.is_finite() {
        tps.max(MIN_THROUGHPUT)
    } else {
        MIN_THROUGHPUT
    }
}

/// The cheapest chain over `announcements` that covers blocks `[0, num_blocks)` of
/// `model`, using only servers that compute as `compute` does and have a free session.
/// `client_rtts` are the round trips the client measured to servers. Servers are
/// believed no faster than [`UNPROVEN_STEP_PER_BLOCK`] per block.
pub fn route(
    announcements: &[VerifiedAnnouncement],
    model: ModelId,
    num_blocks: usize,
    compute: &str,
    client_rtts: &HashMap<PeerId, Duration>,
) -> Result<Vec<Hop>, ClientError> {
    route_measured(
        announcements,
        model,
        num_blocks,
        compute,
        client_rtts,
        &HashMap::new(),
    )
}

/// Like [`route`], with the times per token this client measured of servers
/// (`measured`, seconds per token over each one's span): a server counts at the slower
/// of its announced and its measured time, or, unmeasured, of its announced time and
/// [`UNPROVEN_STEP_PER_BLOCK`] per block.
pub fn route_measured(
    announcements: &[VerifiedAnnouncement],
    model: ModelId,
    num_blocks: usize,
    compute: &str,
    client_rtts: &HashMap<PeerId, Duration>,
    measured: &HashMap<PeerId, f64>,
) -> Result<Vec<Hop>, ClientError> {
    route_apart(
        announcements,
        model,
        num_blocks,
        compute,
        client_rtts,
        measured,
        &HashSet::new(),
    )
}

/// Like [`route_measured`], never with the second server of a pair in `apart` right
/// after the first (two servers in a dispute: one said the other sent it wrong hidden
/// states).
pub fn route_apart(
    announcements: &[VerifiedAnnouncement],
    model: ModelId,
    num_blocks: usize,
    compute: &str,
    client_rtts: &HashMap<PeerId, Duration>,
    measured: &HashMap<PeerId, f64>,
    apart: &HashSet<(PeerId, PeerId)>,
) -> Result<Vec<Hop>, ClientError> {
    struct Node<'a> {
        a: &'a VerifiedAnnouncement,
        peer: PeerId,
        start: usize,
        end: usize,
    }
    let mut nodes: Vec<Node<'_>> = announcements
        .iter()
        .filter(|a| {
            a.model_id == model
                && a.free_sessions > 0
                && a.num_blocks as usize == num_blocks
                && a.compute == compute
                && a.blocks.end() as usize <= num_blocks
        })
        .filter_map(|a| {
            Some(Node {
                peer: PeerId::from_bytes(&a.peer.0).ok()?,
                start: a.blocks.start() as usize,
                end: a.blocks.end() as usize,
                a,
            })
        })
        .collect();
    nodes.sort_by_key(|n| (n.start, n.end));
    let client_rtt = |p: &PeerId| {
        client_rtts
            .get(p)
            .copied()
            .unwrap_or(DEFAULT_RTT)
            .as_secs_f64()
    };
    let edge = |from: &Node<'_>, to: &Node<'_>| {
        let to_bytes = to.peer.to_bytes();
        from.a
            .next_rtts
            .iter()
            .find(|r| r.peer.0 == to_bytes)
            .map(|r| f64::from(r.rtt_us) / 1e6)
            .unwrap_or(DEFAULT_RTT.as_secs_f64())
    };
    // best[i]: cost of the cheapest chain covering [0, end_i) that ends with node i.
    let mut best: Vec<Option<(f64, Option<usize>)>> = vec![None; nodes.len()];
    let mut by_end: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..nodes.len() {
        let n = &nodes[i];
        let own = believed(n.a, &n.peer, n.end - n.start, measured);
        best[i] = if n.start == 0 {
            Some((client_rtt(&n.peer) + own, None))
        } else {
            by_end
                .get(&n.start)
                .into_iter()
                .flatten()
                .filter(|&&j| !apart.contains(&(nodes[j].peer, n.peer)))
                .filter_map(|&j| best[j].map(|(c, _)| (c + edge(&nodes[j], n) + own, Some(j))))
                .min_by(|x, y| x.0.total_cmp(&y.0))
        };
        by_end.entry(n.end).or_default().push(i);
    }
    let last = (0..nodes.len())
        .filter(|&i| nodes[i].end == num_blocks)
        .filter_map(|i| best[i].map(|(c, _)| (c + client_rtt(&nodes[i].peer), i)))
        .min_by(|x, y| x.0.total_cmp(&y.0));
    let Some((_, mut at)) = last else {
        let covered: Vec<bool> = (0..num_blocks)
            .map(|b| nodes.iter().any(|n| n.start <= b && b < n.end))
            .collect();
        let uncovered = crate::status::gaps(&covered)
            .into_iter()
            .map(|(start, end)| BlockRange { start, end })
            .collect::<Vec<_>>();
        let mut other_modes: Vec<(String, usize)> = Vec::new();
        for a in announcements
            .iter()
            .filter(|a| a.model_id == model && a.compute != compute)
        {
            let shown = crate::status::shown_mode(&a.compute);
            match other_modes.iter_mut().find(|(m, _)| *m == shown) {
                Some((_, n)) => *n += 1,
                None => other_modes.push((shown, 1)),
            }
        }
        other_modes.sort();
        return Err(ClientError::NoRoute {
            model,
            compute: compute.to_string(),
            misaligned: uncovered.is_empty(),
            uncovered,
            servers: announcements.iter().filter(|a| a.model_id == model).count(),
            other_modes,
        });
    };
    let mut hops = Vec::new();
    loop {
        let n = &nodes[at];
        hops.push(Hop {
            peer: n.peer,
            blocks: BlockRange {
                start: n.start,
                end: n.end,
            },
            addrs: n.a.addrs.iter().filter_map(|s| s.parse().ok()).collect(),
            step_us: (seconds_per_token(n.a) * 1e6).min(f64::from(u32::MAX)) as u32,
        });
        match best[at].and_then(|(_, prev)| prev) {
            Some(prev) => at = prev,
            None => break,
        }
    }
    hops.reverse();
    Ok(hops)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ed25519_dalek::SigningKey;
    use pollen_protocol::{
        Announcement, BlockRange as WireRange, FreshnessPolicy, PeerRtt, SignedAnnouncement,
        peer_id_bytes_for_ed25519,
    };

    const MODEL: ModelId = ModelId::from_bytes([7; 32]);

    struct Server {
        key: [u8; 32],
        peer: PeerId,
    }

    fn server(n: u8) -> Server {
        let key = [n; 32];
        let bytes =
            peer_id_bytes_for_ed25519(&SigningKey::from_bytes(&key).verifying_key().to_bytes());
        Server {
            key,
            peer: PeerId::from_bytes(&bytes.0).unwrap(),
        }
    }

    fn ann(
        s: &Server,
        start: u32,
        end: u32,
        tps: f32,
        rtts: &[(&Server, u32)],
    ) -> VerifiedAnnouncement {
        let now = crate::clock::unix_ms();
        let a = Announcement {
            peer: pollen_protocol::PeerIdBytes(s.peer.to_bytes()),
            model_id: MODEL,
            model_name: "m".into(),
            num_blocks: 30,
            blocks: WireRange::new(start, end).unwrap(),
            throughput: tps,
            free_sessions: 1,
            free_cache_tokens: 1000,
            addrs: vec![],
            compute: "exact/cpu".into(),
            next_rtts: rtts
                .iter()
                .map(|(p, us)| PeerRtt {
                    peer: pollen_protocol::PeerIdBytes(p.peer.to_bytes()),
                    rtt_us: *us,
                })
                .collect(),
            issued_at_ms: now,
            expires_at_ms: now + 30_000,
            seq: 1,
        };
        SignedAnnouncement::sign(a, &s.key)
            .unwrap()
            .verify(now, &FreshnessPolicy::default())
            .unwrap()
    }

    fn spans(r: &[Hop]) -> Vec<(usize, usize)> {
        r.iter().map(|h| (h.blocks.start, h.blocks.end)).collect()
    }

    #[test]
    fn chains_three_spans_and_prefers_the_faster_server() {
        let (a, b, c, d) = (server(1), server(2), server(3), server(4));
        let book = vec![
            ann(&a, 0, 10, 100.0, &[]),
            ann(&b, 10, 20, 100.0, &[]),
            ann(&c, 20, 30, 100.0, &[]),
            ann(&d, 10, 30, 20.0, &[]),
        ];
        let r = route(&book, MODEL, 30, "exact/cpu", &HashMap::new()).unwrap();
        assert_eq!(spans(&r), vec![(0, 10), (10, 20), (20, 30)]);
        assert_eq!(r[1].peer, b.peer);
        assert_eq!(r[0].step_us, 10_000);
    }

    /// Two servers in a dispute are never chained: the route takes the other server of
    /// the span, or of the span before; with no other, there is no route.
    #[test]
    fn servers_kept_apart_are_never_chained() {
        let (a, b1, b2, c) = (server(1), server(2), server(3), server(4));
        let (none, unmeasured) = (HashMap::new(), HashMap::new());
        let book = vec![
            ann(&a, 0, 10, 100.0, &[]),
            ann(&b1, 10, 20, 110.0, &[]),
            ann(&b2, 10, 20, 100.0, &[]),
            ann(&c, 20, 30, 100.0, &[]),
        ];
        let r = route_apart(
            &book,
            MODEL,
            30,
            "exact/cpu",
            &none,
            &unmeasured,
            &HashSet::new(),
        );
        assert_eq!(r.unwrap()[1].peer, b1.peer, "the faster one, undisputed");
        let apart = HashSet::from([(b1.peer, c.peer)]);
        let r = route_apart(&book, MODEL, 30, "exact/cpu", &none, &unmeasured, &apart).unwrap();
        assert_eq!(
            r.iter().map(|h| h.peer).collect::<Vec<_>>(),
            vec![a.peer, b2.peer, c.peer]
        );
        // Apart means next to each other in this order only: a before b1 is fine.
        let apart = HashSet::from([(b1.peer, c.peer), (b2.peer, c.peer)]);
        assert!(matches!(
            route_apart(&book, MODEL, 30, "exact/cpu", &none, &unmeasured, &apart),
            Err(ClientError::NoRoute { .. })
        ));
        let apart = HashSet::from([(c.peer, b1.peer)]);
        let r = route_apart(&book, MODEL, 30, "exact/cpu", &none, &unmeasured, &apart).unwrap();
        assert_eq!(r[1].peer, b1.peer);
    }

    #[test]
    fn measured_edges_steer_the_route() {
        let (a, b1, b2, c) = (server(1), server(2), server(3), server(4));
        // b1 is a little faster, but the edge a -> b1 is slow (50 ms) and a -> b2 fast.
        let book = vec![
            ann(&a, 0, 10, 100.0, &[(&b1, 50_000), (&b2, 100)]),
            ann(&b1, 10, 20, 110.0, &[]),
            ann(&b2, 10, 20, 100.0, &[]),
            ann(&c, 20, 30, 100.0, &[]),
        ];
        let r = route(&book, MODEL, 30, "exact/cpu", &HashMap::new()).unwrap();
        assert_eq!(r[1].peer, b2.peer);
        // Without measurements the faster b1 wins.
        let book = vec![
            ann(&a, 0, 10, 100.0, &[]),
            ann(&b1, 10, 20, 110.0, &[]),
            ann(&b2, 10, 20, 100.0, &[]),
            ann(&c, 20, 30, 100.0, &[]),
        ];
        let r = route(&book, MODEL, 30, "exact/cpu", &HashMap::new()).unwrap();
        assert_eq!(r[1].peer, b1.peer);
        // A slow measured first hop makes a two-hop route through d cheaper.
        let d = server(5);
        let book = vec![
            ann(&a, 0, 10, 100.0, &[]),
            ann(&b1, 10, 20, 100.0, &[]),
            ann(&c, 20, 30, 100.0, &[]),
            ann(&d, 0, 20, 50.0, &[]),
        ];
        let rtts = HashMap::from([(a.peer, Duration::from_millis(200))]);
        let r = route(&book, MODEL, 30, "exact/cpu", &rtts).unwrap();
        assert_eq!(spans(&r), vec![(0, 20), (20, 30)]);
    }

    #[test]
    fn a_claim_is_capped_until_measured_and_measurements_decide() {
        let (a, b, c, liar) = (server(1), server(2), server(3), server(4));
        // A 3-server chain at 100 tokens/s each, and one server claiming all 30 blocks
        // at 1e9 tokens/s.
        let book = vec![
            ann(&a, 0, 10, 100.0, &[]),
            ann(&b, 10, 20, 100.0, &[]),
            ann(&c, 20, 30, 100.0, &[]),
            ann(&liar, 0, 30, 1e9, &[]),
        ];
        let none = HashMap::new();
        // Unmeasured, the claim is believed only up to the floor (600 µs): still first.
        let r = route(&book, MODEL, 30, "exact/cpu", &none).unwrap();
        assert_eq!(r[0].peer, liar.peer);
        // Measured at 1 s per token, it loses to the chain.
        let measured = HashMap::from([(liar.peer, 1.0)]);
        let r = route_measured(&book, MODEL, 30, "exact/cpu", &none, &measured).unwrap();
        assert_eq!(spans(&r), vec![(0, 10), (10, 20), (20, 30)]);
        // A server measured faster than it announces is still counted at its claim.
        let measured = HashMap::from([(liar.peer, 1e-9), (a.peer, 1e-9)]);
        let r = route_measured(&book, MODEL, 30, "exact/cpu", &none, &measured).unwrap();
        assert_eq!(r[0].peer, liar.peer);
    }

    #[test]
    fn gaps_other_modes_and_full_servers_are_reported() {
        let (a, b, c) = (server(1), server(2), server(3));
        let mut full = ann(&c, 20, 30, 100.0, &[]);
        let book = vec![ann(&a, 0, 10, 100.0, &[]), ann(&b, 10, 20, 100.0, &[])];
        let err = route(&book, MODEL, 30, "exact/cpu", &HashMap::new()).unwrap_err();
        assert!(
            matches!(&err, ClientError::NoRoute { uncovered, .. } if uncovered == &vec![BlockRange { start: 20, end: 30 }]),
            "{err}"
        );
        assert!(err.to_string().contains("uncovered: 20:30"), "{err}");
        // The last span exists but computes differently: still uncovered for us.
        let mut book2 = book.clone();
        book2.push(ann(&c, 20, 30, 100.0, &[]));
        let err = route(&book2, MODEL, 30, "exact/cpu-kc1024", &HashMap::new()).unwrap_err();
        // The error names this client's mode and the others', so that a user sees why.
        let text = err.to_string();
        assert!(text.contains("computing exact/cpu-kc1024"), "{text}");
        assert!(text.contains("uncovered: 0:30"), "{text}");
        assert!(text.contains("other compute modes"), "{text}");
        assert!(text.contains("exact/cpu × 3"), "{text}");
        assert!(route(&book2, MODEL, 30, "exact/cpu", &HashMap::new()).is_ok());
        // A full server is skipped.
        full = {
            let now = crate::clock::unix_ms();
            let mut x = full.announcement().clone();
            x.free_sessions = 0;
            x.seq = 2;
            SignedAnnouncement::sign(x, &c.key)
                .unwrap()
                .verify(now, &FreshnessPolicy::default())
                .unwrap()
        };
        let mut book3 = book.clone();
        book3.push(full);
        assert!(route(&book3, MODEL, 30, "exact/cpu", &HashMap::new()).is_err());
        // Spans that cover every block but do not line up.
        let book4 = vec![ann(&a, 0, 12, 100.0, &[]), ann(&b, 10, 30, 100.0, &[])];
        let err = route(&book4, MODEL, 30, "exact/cpu", &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("do not line up"), "{err}");
    }
}
