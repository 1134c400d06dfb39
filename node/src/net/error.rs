//! What can go wrong in the network layer, keeping libp2p's failure kind and the peer.

use libp2p::{Multiaddr, PeerId};
use std::time::Duration;

/// A failure of the network layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The task that owns the swarm has stopped (the node is shutting down).
    #[error("the network task has stopped")]
    Stopped,
    /// A command or request got no answer in time.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// Dialing an address failed.
    #[error("cannot reach {addr}: {source}")]
    Dial {
        /// The address dialed.
        addr: Multiaddr,
        /// libp2p's reason.
        #[source]
        source: Box<libp2p::swarm::DialError>,
    },
    /// The node at an address is another peer than the address's `/p2p/` part names.
    #[error(
        "{addr} answered as peer {answered}: the peer id after /p2p/ is stale or mistyped \
         (a node's peer id comes from its key file; a bootstrap prints its full address \
         when it starts)"
    )]
    WrongPeer {
        /// The address dialed.
        addr: Multiaddr,
        /// The peer that answered there.
        answered: PeerId,
    },
    /// Dialing kept failing for longer than the caller's patience.
    #[error("gave up on {addr} after {tried:?}: {last}")]
    GaveUp {
        /// The address.
        addr: Multiaddr,
        /// How long it was tried.
        tried: Duration,
        /// The last failure.
        #[source]
        last: Box<NetError>,
    },
    /// A request-response request to `peer` failed.
    #[error("{protocol} request to {peer}: {source}")]
    Request {
        /// The protocol.
        protocol: &'static str,
        /// The peer.
        peer: PeerId,
        /// libp2p's reason (dial failure, timeout, connection closed, unsupported protocol...).
        #[source]
        source: libp2p::request_response::OutboundFailure,
    },
    /// Opening a session stream to `peer` failed.
    #[error("opening a session stream to {peer}: {source}")]
    OpenStream {
        /// The peer.
        peer: PeerId,
        /// libp2p's reason.
        #[source]
        source: libp2p_stream::OpenStreamError,
    },
    /// Building the node (transport, protocols, listeners) failed.
    #[error("{what}: {reason}")]
    Setup {
        /// What was being built.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// Result type of the network layer.
pub type NetResult<T> = Result<T, NetError>;
