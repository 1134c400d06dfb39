//! What a server says about itself: its speed, measured at start; its round-trip times
//! to the servers of the spans after its own, measured by ping; and the signed
//! announcement built from them, renewed at a third of its lifetime.

use super::Server;
use crate::clock::unix_ms;
use crate::net::NetHandle;
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::limits::{MAX_ADDRS, MAX_MODEL_NAME_LEN, MAX_PEER_RTTS};
use pollen_protocol::{
    Announcement, BlockRange, ModelId, PeerIdBytes, PeerRtt, VerifiedAnnouncement,
};
use pollen_shard::{BlockSpan, CacheLimits};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `name` cut to at most `max` bytes, at a character boundary.
pub fn cut_to_bytes(name: &str, max: usize) -> &str {
    let mut cut = name.len().min(max);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    &name[..cut]
}

/// Measures this span's decode speed (tokens/s through these blocks alone).
pub fn measure_throughput(span: &BlockSpan) -> f32 {
    let Ok(x) = candle_core::Tensor::zeros(
        (1, 1, span.config().hidden_size),
        candle_core::DType::F32,
        span.device(),
    ) else {
        return 0.0;
    };
    let mut cache = span.new_cache(CacheLimits::default());
    let _ = span.forward(&x, 0, &mut cache);
    let started = Instant::now();
    let steps = 8;
    for i in 1..=steps {
        if span.forward(&x, i, &mut cache).is_err() {
            return 0.0;
        }
    }
    steps as f32 / started.elapsed().as_secs_f32().max(1e-6)
}

impl Server {
    /// This server's announcement, valid for `ttl`.
    pub(super) fn announcement(
        &self,
        addrs: &[Multiaddr],
        next_rtts: Vec<PeerRtt>,
        ttl: Duration,
        seq: u64,
    ) -> Announcement {
        let now = unix_ms();
        let free_sessions = if self.draining.load(Ordering::Relaxed) {
            0
        } else {
            u32::try_from(self.table.free()).unwrap_or(u32::MAX)
        };
        let cfg = self.span.config();
        Announcement {
            peer: PeerIdBytes(self.me.to_bytes()),
            model_id: self.model_id,
            model_name: cut_to_bytes(&cfg.name, MAX_MODEL_NAME_LEN).to_string(),
            num_blocks: u32::try_from(cfg.num_blocks).unwrap_or(u32::MAX),
            blocks: self.wire_blocks,
            #[cfg(not(feature = "fault-injection"))]
            throughput: self.throughput,
            #[cfg(feature = "fault-injection")]
            throughput: crate::fault::claim(self.throughput),
            free_sessions,
            free_cache_tokens: u32::try_from(
                (free_sessions as usize).saturating_mul(self.cfg.max_session_tokens),
            )
            .unwrap_or(u32::MAX),
            addrs: addrs
                .iter()
                .take(MAX_ADDRS)
                .map(|a| a.to_string())
                .collect(),
            compute: self.compute.clone(),
            next_rtts,
            issued_at_ms: now,
            expires_at_ms: now + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            seq,
        }
    }
}

/// How long asking the bootstraps for announcements may take when an `Open` names a next
/// hop this server has no announcement of.
pub const NEXT_HOP_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A new look-up is made at most this often; meanwhile the book's answer stands.
pub const NEXT_HOP_LOOKUP_EVERY: Duration = Duration::from_secs(2);

/// Where a server learns that a next hop is a server: its book of verified announcements
/// (signature, expiry and replay checked on the way in), refreshed from the bootstraps
/// when a next hop is missing, at most every [`NEXT_HOP_LOOKUP_EVERY`], bounded by
/// [`NEXT_HOP_LOOKUP_TIMEOUT`].
#[derive(Debug, Default)]
pub struct NextHops {
    last_lookup: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

/// What a next hop must be: a server of this model, compute mode and span.
pub(crate) struct Wanted<'a> {
    pub peer: PeerId,
    pub model: ModelId,
    pub compute: &'a str,
    pub blocks: BlockRange,
}

impl NextHops {
    /// Takes the turn to look up if one is due; otherwise how long until the next is.
    /// The lock is held only for this: a lookup of a bogus next hop may take its whole
    /// timeout, and other sessions' opens must not wait behind it.
    async fn lookup_turn(&self) -> Result<(), Duration> {
        let mut last = self.last_lookup.lock().await;
        match *last {
            Some(t) if t.elapsed() < NEXT_HOP_LOOKUP_EVERY => {
                Err(NEXT_HOP_LOOKUP_EVERY.saturating_sub(t.elapsed()))
            }
            _ => {
                *last = Some(tokio::time::Instant::now());
                Ok(())
            }
        }
    }

    /// The addresses of `want.peer` from its valid announcement for `want.model` that
    /// covers `want.blocks` in the same compute mode; a clear reason when there is none.
    pub(crate) async fn addresses(
        &self,
        net: &NetHandle,
        want: &Wanted<'_>,
    ) -> Result<Vec<Multiaddr>, String> {
        let find = |book: &[VerifiedAnnouncement]| {
            book.iter()
                .filter(|a| PeerId::from_bytes(&a.peer.0).ok() == Some(want.peer))
                .find(|a| {
                    a.compute == want.compute
                        && a.blocks.start() <= want.blocks.start()
                        && a.blocks.end() >= want.blocks.end()
                })
                .cloned()
        };
        let mut found = find(&net.book(Some(want.model)).await.unwrap_or_default());
        if found.is_none() {
            let mut turn = self.lookup_turn().await;
            if let Err(wait) = turn {
                // Another open took the turn (one naming a bogus next hop, say): this
                // one waits for the next turn, once, rather than being refused for it,
                // and meanwhile that lookup may have filled the book.
                tokio::time::sleep(wait).await;
                found = find(&net.book(Some(want.model)).await.unwrap_or_default());
                if found.is_none() {
                    turn = self.lookup_turn().await;
                }
            }
            if found.is_none() && turn.is_ok() {
                let gathered =
                    tokio::time::timeout(NEXT_HOP_LOOKUP_TIMEOUT, net.gather(Some(want.model)))
                        .await;
                if let Ok(Ok(book)) = gathered {
                    found = find(&book);
                }
            }
            // A gather stores each peer's answer as it comes, and one peer that does not
            // answer (a hung server, which the DHT still names and whose lookup and list
            // requests run to their deadlines) can hold the whole gather past its timeout
            // after the bootstraps have answered: what they gave is in the book.
            if found.is_none() {
                found = find(&net.book(Some(want.model)).await.unwrap_or_default());
            }
        }
        let Some(a) = found else {
            return Err(format!(
                "the next hop {} has no valid announcement for model {} serving blocks {} in \
                 compute mode `{}`: this server forwards only to servers",
                want.peer, want.model, want.blocks, want.compute
            ));
        };
        let addrs: Vec<Multiaddr> = a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
        if addrs.is_empty() {
            return Err(format!(
                "the next hop {} announces no address this server can dial",
                want.peer
            ));
        }
        Ok(addrs)
    }
}

/// Finds the servers whose spans start where this one ends (from the bootstraps' books),
/// connects to them so that ping measures them, and returns the round-trip times measured
/// so far, at most [`MAX_PEER_RTTS`].
pub(crate) async fn next_hop_rtts(net: &NetHandle, server: &Server) -> Vec<PeerRtt> {
    let Ok(book) = net.gather(Some(server.model_id)).await else {
        return Vec::new();
    };
    let end = server.wire_blocks.end();
    let next: Vec<(PeerId, Vec<Multiaddr>)> = book
        .iter()
        .filter(|a| a.blocks.start() == end && a.compute == server.compute)
        .filter_map(|a| {
            let peer = PeerId::from_bytes(&a.peer.0).ok()?;
            let addrs = a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
            Some((peer, addrs))
        })
        .take(MAX_PEER_RTTS)
        .collect();
    for (peer, addrs) in &next {
        let _ = net.add_addresses(*peer, addrs.clone(), true).await;
    }
    let peers = net.peers().await.unwrap_or_default();
    next.iter()
        .filter_map(|(peer, _)| {
            let rtt = peers.iter().find(|p| p.peer == *peer)?.rtt?;
            Some(PeerRtt {
                peer: PeerIdBytes(peer.to_bytes()),
                rtt_us: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_lookup_per_interval_and_the_lock_is_not_held_through_it() {
        let hops = NextHops::default();
        assert_eq!(hops.lookup_turn().await, Ok(()));
        // The turn is taken and the lock free again while that lookup runs.
        assert!(hops.last_lookup.try_lock().is_ok());
        tokio::time::advance(Duration::from_millis(500)).await;
        // The next open is told when the next turn comes, not refused one.
        let wait = hops
            .lookup_turn()
            .await
            .expect_err("a turn was taken 0.5 s ago");
        assert_eq!(wait, NEXT_HOP_LOOKUP_EVERY - Duration::from_millis(500));
        tokio::time::advance(wait).await;
        assert_eq!(hops.lookup_turn().await, Ok(()));
    }

    #[test]
    fn long_names_are_cut_by_bytes_at_a_character_boundary() {
        assert_eq!(cut_to_bytes("SmolLM2", 256), "SmolLM2");
        let long = "é".repeat(200); // 400 bytes
        let cut = cut_to_bytes(&long, MAX_MODEL_NAME_LEN);
        assert_eq!(cut.len(), 256);
        assert!(cut.chars().all(|c| c == 'é'));
        let odd = format!("a{}", "é".repeat(200));
        assert_eq!(cut_to_bytes(&odd, MAX_MODEL_NAME_LEN).len(), 255);
    }
}
