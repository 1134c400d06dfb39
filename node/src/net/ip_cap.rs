//! A cap on the incoming connections from one IP address: peer ids cost nothing to
//! make, so the caps per peer and in total (libp2p's connection limits) let one host
//! take every connection a node keeps. Counted from a connection's handshake to its
//! close, against [`super::book::share_of`] the address; a relayed connection (whose
//! remote address holds no IP) is not counted.

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

/// Refuses an incoming connection from an IP address that has `max` already.
#[derive(Debug)]
pub struct IpCap {
    max: u32,
    per_ip: HashMap<IpAddr, u32>,
    each: HashMap<ConnectionId, IpAddr>,
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
        }
    }

    /// Incoming connections counted against `ip` now.
    pub fn count(&self, ip: &IpAddr) -> u32 {
        self.per_ip.get(ip).copied().unwrap_or(0)
    }

    fn release(&mut self, id: ConnectionId) {
        let Some(ip) = self.each.remove(&id) else {
            return;
        };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
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
        *self.per_ip.entry(ip).or_default() += 1;
        self.each.insert(id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
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
