//! What this client measured of each server's speed, smoothed: routes are chosen on it
//! rather than on what servers announce.
//!
//! A decode step gives two times: until the first hop acknowledges it (the first hop's
//! own work plus a round trip), and until the output arrives. The first is the first
//! hop's; the rest is shared among the later hops in proportion to their blocks (the
//! client cannot see inside the chain). Each server's figure is an exponentially
//! weighted moving average of its share, in seconds per token over its span.

use super::route::Hop;
use libp2p::PeerId;
use std::collections::HashMap;
use std::time::Duration;

/// Weight of the newest sample in the moving average.
const ALPHA: f64 = 0.3;
/// Most servers remembered.
const MAX_PEERS: usize = 4096;
/// The time charged to a server that failed a step: it proved nothing better.
pub const FAILED_STEP: Duration = Duration::from_secs(1);

/// Measured seconds per token, per server.
#[derive(Debug, Default, Clone)]
pub struct Speeds {
    seconds: HashMap<PeerId, f64>,
}

impl Speeds {
    /// Adds one sample for `peer`: `secs` per token over its span.
    pub fn sample(&mut self, peer: PeerId, secs: f64) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        if self.seconds.len() >= MAX_PEERS && !self.seconds.contains_key(&peer) {
            return;
        }
        self.seconds
            .entry(peer)
            .and_modify(|s| *s = ALPHA * secs + (1.0 - ALPHA) * *s)
            .or_insert(secs);
    }

    /// Records a one-token step through `route`: acknowledged by the first hop after
    /// `ack`, output after `total`.
    pub fn record_step(&mut self, route: &[Hop], ack: Duration, total: Duration) {
        let Some((first, rest)) = route.split_first() else {
            return;
        };
        let ack = ack.min(total).as_secs_f64();
        if rest.is_empty() {
            self.sample(first.peer, total.as_secs_f64());
            return;
        }
        self.sample(first.peer, ack);
        let blocks: usize = rest.iter().map(|h| h.blocks.end - h.blocks.start).sum();
        let after = (total.as_secs_f64() - ack).max(0.0);
        for h in rest {
            let share = (h.blocks.end - h.blocks.start) as f64 / blocks.max(1) as f64;
            self.sample(h.peer, after * share);
        }
    }

    /// The measured seconds per token of every server measured.
    pub fn all(&self) -> &HashMap<PeerId, f64> {
        &self.seconds
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::blocks::BlockRange;

    fn hop(start: usize, end: usize) -> Hop {
        Hop {
            peer: PeerId::random(),
            blocks: BlockRange { start, end },
            addrs: vec![],
            step_us: 1,
        }
    }

    #[test]
    fn steps_are_shared_and_smoothed() {
        let route = vec![hop(0, 10), hop(10, 20), hop(20, 30)];
        let mut s = Speeds::default();
        s.record_step(&route, Duration::from_millis(4), Duration::from_millis(24));
        let get = |s: &Speeds, i: usize| s.all()[&route[i].peer];
        assert!((get(&s, 0) - 0.004).abs() < 1e-9);
        assert!((get(&s, 1) - 0.010).abs() < 1e-9);
        assert!((get(&s, 2) - 0.010).abs() < 1e-9);
        // A slow step moves the average by ALPHA of the difference.
        s.record_step(&route, Duration::from_millis(4), Duration::from_millis(44));
        assert!((get(&s, 1) - (0.3 * 0.020 + 0.7 * 0.010)).abs() < 1e-9);
        s.sample(route[0].peer, f64::NAN);
        assert!((get(&s, 0) - 0.004).abs() < 1e-9);
    }
}
