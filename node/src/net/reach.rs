//! Reachability: what AutoNAT says about this node, the relays it may reserve slots
//! on, and the reservations it holds. A server that is not publicly reachable listens
//! through up to [`MAX_RESERVATIONS`] relays (bootstraps, and servers started with
//! `--relay`), so its announcement carries a relayed address that anyone can dial.

use super::Role;
use super::handle::Reachability;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Relays a node behind NAT listens through at once.
pub(super) const MAX_RESERVATIONS: usize = 2;
/// Most relay candidates remembered.
const MAX_CANDIDATES: usize = 32;
/// Most of them that are not trusted (not a bootstrap, configured or LAN peer).
const MAX_UNTRUSTED: usize = 8;
/// A listening node that AutoNAT has not confirmed public within this long reserves
/// relay slots anyway: being reachable through a relay beats not being reachable.
const DECIDE_AFTER: Duration = Duration::from_secs(12);
/// Failed dial-backs (with none succeeding) that make a node private.
const FAILURES_TO_PRIVATE: u32 = 1;

/// The reachability state of a node.
#[derive(Debug)]
pub(crate) struct Reach {
    /// Whether this node should become reachable (a server that listens).
    wants: bool,
    pub(super) status: Reachability,
    started: Instant,
    failures: u32,
    /// Peers that run a relay server, with the address we reached them on and whether
    /// they are trusted (reserved on first).
    candidates: HashMap<PeerId, (Multiaddr, bool)>,
    /// Our relayed listeners, by relay.
    reserved: HashMap<PeerId, ListenerId>,
}

/// Whether `addr` goes through a relay.
pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Reach {
    /// The state of a node with `role` that listens (or not).
    pub(crate) fn new(role: Role, listens: bool) -> Self {
        Self {
            wants: role == Role::Server && listens,
            status: Reachability::Unknown,
            started: Instant::now(),
            failures: 0,
            candidates: HashMap::new(),
            reserved: HashMap::new(),
        }
    }

    /// An AutoNAT dial-back of one of our addresses succeeded or failed.
    pub(super) fn probed(&mut self, ok: bool) {
        if ok {
            if self.status != Reachability::Public {
                tracing::info!("reachability: public (a peer dialed us back)");
            }
            self.status = Reachability::Public;
        } else if self.status != Reachability::Public {
            self.failures += 1;
            if self.failures >= FAILURES_TO_PRIVATE && self.status != Reachability::Private {
                tracing::info!("reachability: behind NAT (dial-backs fail); reserving relay slots");
                self.status = Reachability::Private;
            }
        }
    }

    /// `peer`, reached on `addr`, runs a relay server; `trusted` when it is a bootstrap
    /// or a peer this node was given (at most [`MAX_UNTRUSTED`] others are kept).
    pub(super) fn relay_found(&mut self, peer: PeerId, addr: Multiaddr, trusted: bool) {
        if is_relayed(&addr) {
            return;
        }
        let addr: Multiaddr = addr
            .iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .collect();
        if let Some(known) = self.candidates.get_mut(&peer) {
            *known = (addr, trusted);
            return;
        }
        let untrusted = self.candidates.values().filter(|(_, t)| !t).count();
        if self.candidates.len() < MAX_CANDIDATES && (trusted || untrusted < MAX_UNTRUSTED) {
            self.candidates.insert(peer, (addr, trusted));
        }
    }

    /// `peer` disconnected: it is no longer a relay of ours, nor a candidate (a dead or
    /// hostile relay must not keep its place among the [`MAX_CANDIDATES`]; a live one
    /// is found again when it reconnects and identifies itself).
    pub(super) fn relay_gone(&mut self, peer: &PeerId) {
        self.reserved.remove(peer);
        self.candidates.remove(peer);
    }

    /// Our relayed listener `id` closed: the reservation failed or ended, so its relay
    /// is dropped from the candidates, and the next reservation goes to another.
    pub(super) fn listener_closed(&mut self, id: ListenerId) {
        let gone: Vec<PeerId> = self
            .reserved
            .iter()
            .filter(|(_, l)| **l == id)
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            self.reserved.remove(&p);
            self.candidates.remove(&p);
        }
    }

    /// The relayed addresses to listen on now (each `/…/p2p/RELAY/p2p-circuit`).
    pub(super) fn to_reserve(&self) -> Vec<(PeerId, Multiaddr)> {
        let private = self.status == Reachability::Private
            || (self.status == Reachability::Unknown && self.started.elapsed() >= DECIDE_AFTER);
        if !self.wants || !private || self.reserved.len() >= MAX_RESERVATIONS {
            return Vec::new();
        }
        let mut free: Vec<(&PeerId, &(Multiaddr, bool))> = self
            .candidates
            .iter()
            .filter(|(p, _)| !self.reserved.contains_key(p))
            .collect();
        // Trusted relays first.
        free.sort_by_key(|(_, (_, trusted))| !trusted);
        free.into_iter()
            .take(MAX_RESERVATIONS - self.reserved.len())
            .map(|(p, (a, _))| {
                let addr = a.clone().with(Protocol::P2p(*p)).with(Protocol::P2pCircuit);
                (*p, addr)
            })
            .collect()
    }

    /// Whether this node is behind NAT (or may be) and holds fewer slots than it wants.
    pub(super) fn wants_more(&self) -> bool {
        self.wants && self.status != Reachability::Public && self.reserved.len() < MAX_RESERVATIONS
    }

    /// Whether `peer` is a known relay.
    pub(super) fn is_candidate(&self, peer: &PeerId) -> bool {
        self.candidates.contains_key(peer)
    }

    /// We listen through `relay` with listener `id`.
    pub(super) fn reserving(&mut self, relay: PeerId, id: ListenerId) {
        self.reserved.insert(relay, id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn behind_nat() -> Reach {
        let mut r = Reach::new(Role::Server, true);
        r.probed(false);
        r
    }

    fn addr(last: u8) -> Multiaddr {
        format!("/ip4/198.51.100.{last}/tcp/4001").parse().unwrap()
    }

    /// A relay whose reservation fails is dropped, so that the next reservation goes
    /// to another candidate instead of retrying a dead or hostile one forever.
    #[test]
    fn a_failed_reservation_drops_its_relay() {
        let mut r = behind_nat();
        let dead = PeerId::random();
        r.relay_found(dead, addr(1), true);
        let wanted = r.to_reserve();
        assert_eq!(wanted.len(), 1);
        let id = ListenerId::next();
        r.reserving(dead, id);
        r.listener_closed(id);
        assert!(!r.is_candidate(&dead));
        let live = PeerId::random();
        r.relay_found(live, addr(2), true);
        let wanted: Vec<PeerId> = r.to_reserve().into_iter().map(|(p, _)| p).collect();
        assert_eq!(wanted, vec![live]);
    }

    /// Candidates that disconnect leave room: a full table of gone relays does not
    /// keep a live one out.
    #[test]
    fn disconnected_relays_leave_the_candidates() {
        let mut r = behind_nat();
        let gone: Vec<PeerId> = (0..MAX_CANDIDATES).map(|_| PeerId::random()).collect();
        for (i, p) in gone.iter().enumerate() {
            r.relay_found(*p, addr(i as u8 + 1), true);
        }
        let live = PeerId::random();
        r.relay_found(live, addr(200), true);
        assert!(!r.is_candidate(&live), "the table is full");
        for p in &gone {
            r.relay_gone(p);
        }
        r.relay_found(live, addr(200), true);
        assert!(r.is_candidate(&live));
    }

    /// Peers that merely claim to run a relay hold at most a few candidate places, and
    /// a bootstrap is reserved on before any of them.
    #[test]
    fn untrusted_relays_are_few_and_reserved_on_last() {
        let mut r = behind_nat();
        for i in 0..MAX_CANDIDATES {
            r.relay_found(PeerId::random(), addr(i as u8 + 1), false);
        }
        assert_eq!(r.candidates.len(), MAX_UNTRUSTED);
        let boot = PeerId::random();
        r.relay_found(boot, addr(250), true);
        let first = r.to_reserve().first().map(|(p, _)| *p);
        assert_eq!(first, Some(boot));
    }
}
