//! A cap on the incoming connections from one IP address: peer ids cost nothing to
//! make, so the caps per peer and in total (libp2p's connection limits) let one host
//! take every connection a node keeps. Counted from a connection's handshake to its
//! close, against [`super::book::share_of`] the address; a relayed connection (whose
//! remote address holds no IP) is not counted. Of those, at most [`PENDING_PER_IP`] may
//! be in their handshake at once: libp2p's cap on pending incoming connections (256)
//! is shared by everyone, and silent sockets from one address would otherwise hold it
//! for the handshake's timeout and keep every other peer out.

use super::book::ip_of;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ListenFailure};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

/// Most incoming connections from one IP address in their handshake at once.
pub const PENDING_PER_IP: u32 = 16;

/// Refuses an incoming connection from an IP address that has `max` already, or
/// [`PENDING_PER_IP`] still in their handshake.
#[derive(Debug)]
pub struct IpCap {
    max: u32,
    per_ip: HashMap<IpAddr, u32>,
    each: HashMap<ConnectionId, IpAddr>,
    /// Connections in their handshake, by address, and which they are.
    pending: HashMap<IpAddr, u32>,
    in_handshake: std::collections::HashSet<ConnectionId>,
}

/// The refusal.
#[derive(Debug, thiserror::Error)]
#[error("{ip} has {max} incoming connections already")]
pub struct TooManyFromIp {
    ip: IpAddr,
    max: u32,
}

impl IpCap {
    /// At most `max` incoming connections from one address.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            per_ip: HashMap::new(),
            each: HashMap::new(),
            pending: HashMap::new(),
            in_handshake: std::collections::HashSet::new(),
        }
    }

    /// Incoming connections counted against `ip` now.
    pub fn count(&self, ip: &IpAddr) -> u32 {
        self.per_ip.get(ip).copied().unwrap_or(0)
    }

    /// Connection `id` finished its handshake: no longer counted as pending.
    fn handshaken(&mut self, id: ConnectionId) {
        if self.in_handshake.remove(&id)
            && let Some(ip) = self.each.get(&id)
        {
            less(&mut self.pending, ip);
        }
    }

    fn release(&mut self, id: ConnectionId) {
        self.handshaken(id);
        let Some(ip) = self.each.remove(&id) else {
            return;
        };
        less(&mut self.per_ip, &ip);
    }
}

fn less(counts: &mut HashMap<IpAddr, u32>, ip: &IpAddr) {
    if let Some(n) = counts.get_mut(ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(ip);
        }
    }
}

impl NetworkBehaviour for IpCap {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if remote.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            return Ok(());
        }
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        if self.count(&ip) >= self.max {
            return Err(ConnectionDenied::new(TooManyFromIp { ip, max: self.max }));
        }
        if self.pending.get(&ip).copied().unwrap_or(0) >= PENDING_PER_IP {
            return Err(ConnectionDenied::new(TooManyFromIp {
                ip,
                max: PENDING_PER_IP,
            }));
        }
        *self.per_ip.entry(ip).or_default() += 1;
        *self.pending.entry(ip).or_default() += 1;
        self.each.insert(id, ip);
        self.in_handshake.insert(id);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.handshaken(id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // Closed after it was established, or refused or failed before (by this or
            // another behaviour, or in its handshake).
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.release(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// At most `PENDING_PER_IP` connections from one address in their handshake at
    /// once: one that finishes its handshake, or fails, makes room; other addresses
    /// are not held up; the cap on established ones still applies.
    #[test]
    fn one_address_holds_few_handshakes() {
        let mut cap = IpCap::new(20);
        let local: Multiaddr = "/ip4/192.0.2.1/tcp/4001".parse().unwrap();
        let from = |ip: &str| -> Multiaddr { format!("/ip4/{ip}/tcp/5000").parse().unwrap() };
        let ids: Vec<ConnectionId> = (0..PENDING_PER_IP as usize + 4)
            .map(ConnectionId::new_unchecked)
            .collect();
        for id in &ids[..PENDING_PER_IP as usize] {
            cap.handle_pending_inbound_connection(*id, &local, &from("198.51.100.7"))
                .unwrap();
        }
        let next = ids[PENDING_PER_IP as usize];
        assert!(
            cap.handle_pending_inbound_connection(next, &local, &from("198.51.100.7"))
                .is_err()
        );
        cap.handle_pending_inbound_connection(next, &local, &from("198.51.100.8"))
            .unwrap();
        // One handshake done, one failed: room for two more from the address.
        let peer = PeerId::random();
        cap.handle_established_inbound_connection(ids[0], peer, &local, &from("198.51.100.7"))
            .unwrap();
        cap.release(ids[1]);
        for id in &ids[PENDING_PER_IP as usize + 1..PENDING_PER_IP as usize + 3] {
            cap.handle_pending_inbound_connection(*id, &local, &from("198.51.100.7"))
                .unwrap();
        }
        assert_eq!(
            cap.count(&"198.51.100.7".parse().unwrap()),
            PENDING_PER_IP + 1
        );
        assert!(
            cap.handle_pending_inbound_connection(
                ids[PENDING_PER_IP as usize + 3],
                &local,
                &from("198.51.100.7")
            )
            .is_err()
        );
        // Established ones count against the address's cap, not its handshakes.
        cap.release(ids[0]);
        assert_eq!(cap.count(&"198.51.100.7".parse().unwrap()), PENDING_PER_IP);
    }
}
