//! Allowlist files and the connection gate that enforces them.

use super::{ALLOWLIST_POLL, MAX_ALLOWLIST_LINES, MAX_LOGGED_REFUSALS, PrivateError, io_err};
use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

/// Parses an allowlist: one peer id a line; `#` starts a comment; blank lines are skipped.
pub fn parse_allowlist(path: &Path, text: &str) -> Result<HashSet<PeerId>, PrivateError> {
    let mut peers = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        if i >= MAX_ALLOWLIST_LINES {
            return Err(PrivateError::AllowlistTooLong {
                path: path.to_path_buf(),
            });
        }
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let peer = line
            .parse::<PeerId>()
            .map_err(|e| PrivateError::BadPeerLine {
                path: path.to_path_buf(),
                line: i + 1,
                text: line.chars().take(80).collect(),
                reason: e.to_string(),
            })?;
        peers.insert(peer);
    }
    Ok(peers)
}

/// Reads an allowlist file.
pub fn read_allowlist(path: &Path) -> Result<HashSet<PeerId>, PrivateError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.len() > 64 * 1024 * 1024 {
        return Err(PrivateError::AllowlistTooLong {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse_allowlist(path, &text)
}

/// Appends `peer` (with an optional comment) to the allowlist at `path`, creating it.
/// Returns false if it was already there.
pub fn add_peer(path: &Path, peer: &PeerId, note: Option<&str>) -> Result<bool, PrivateError> {
    use std::io::Write;
    let existing = if path.exists() {
        read_allowlist(path)?
    } else {
        HashSet::new()
    };
    if existing.contains(peer) {
        return Ok(false);
    }
    let text = if path.exists() {
        std::fs::read_to_string(path).map_err(io_err(path))?
    } else {
        String::new()
    };
    let mut line = String::new();
    if !text.is_empty() && !text.ends_with('\n') {
        line.push('\n');
    }
    line.push_str(&peer.to_string());
    if let Some(note) = note.map(|n| n.replace(['\n', '\r'], " ")) {
        line.push_str(&format!("  # {note}"));
    }
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(line.as_bytes()).map_err(io_err(path))?;
    Ok(true)
}

/// Counters of the connection gate (what the private-mesh bench reads).
#[derive(Debug, Default)]
pub struct GateStats {
    /// Connections the gate let through.
    pub admitted: AtomicU64,
    /// Connections it refused.
    pub refused: AtomicU64,
}

/// The allowlist a node enforces: the file and the peers read from it at start.
#[derive(Debug, Clone)]
pub struct Allowlist {
    /// The file (reloaded on SIGHUP and when it changes).
    pub path: PathBuf,
    /// The peers at start.
    pub peers: HashSet<PeerId>,
}

/// libp2p behaviour that admits only the peers of an allowlist, in both directions.
pub struct MeshGate {
    allow: Allowlist,
    modified: Option<SystemTime>,
    connections: HashMap<PeerId, HashSet<ConnectionId>>,
    logged: HashSet<PeerId>,
    unlogged: u64,
    close: VecDeque<PeerId>,
    stats: Arc<GateStats>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    tick: Option<tokio::time::Interval>,
}

impl MeshGate {
    /// A gate for `allow`; reloads it on SIGHUP when running inside tokio.
    pub fn new(allow: Allowlist, stats: Arc<GateStats>) -> Self {
        let in_tokio =
            tokio::runtime::Handle::try_current().is_ok() && !allow.path.as_os_str().is_empty();
        let modified = std::fs::metadata(&allow.path)
            .and_then(|m| m.modified())
            .ok();
        Self {
            allow,
            modified,
            connections: HashMap::new(),
            logged: HashSet::new(),
            unlogged: 0,
            close: VecDeque::new(),
            stats,
            #[cfg(unix)]
            hangup: in_tokio
                .then(|| {
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
                })
                .flatten(),
            tick: in_tokio.then(|| {
                let mut t = tokio::time::interval(ALLOWLIST_POLL);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            }),
        }
    }

    /// Admits `peer` from now on; false if it already was.
    pub fn allow_peer(&mut self, peer: PeerId) -> bool {
        self.logged.remove(&peer);
        self.allow.peers.insert(peer)
    }

    /// Refuses `peer` from now on and closes its connections; false if it was not admitted.
    pub fn disallow_peer(&mut self, peer: PeerId) -> bool {
        let was = self.allow.peers.remove(&peer);
        if self.connections.contains_key(&peer) {
            self.close.push_back(peer);
        }
        was
    }

    /// Replaces the allowed peers and closes the connections of those no longer in it.
    pub fn set_peers(&mut self, peers: HashSet<PeerId>) {
        for peer in self.connections.keys() {
            if !peers.contains(peer) {
                tracing::warn!(%peer, "removed from the allowlist: closing its connections");
                self.close.push_back(*peer);
            }
        }
        self.allow.peers = peers;
        self.logged.clear();
    }

    fn reload(&mut self) {
        if self.allow.path.as_os_str().is_empty() {
            return;
        }
        match read_allowlist(&self.allow.path) {
            Ok(peers) => {
                tracing::info!(
                    path = %self.allow.path.display(),
                    peers = peers.len(),
                    "allowlist reloaded"
                );
                self.set_peers(peers);
            }
            Err(e) => tracing::error!("allowlist not reloaded, keeping the previous one: {e}"),
        }
    }

    fn check(&mut self, peer: &PeerId, direction: &str) -> Result<(), ConnectionDenied> {
        if self.allow.peers.contains(peer) {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        if self.logged.len() < MAX_LOGGED_REFUSALS {
            if self.logged.insert(*peer) {
                tracing::warn!(%peer, direction, "refused: peer not on the allowlist");
            }
        } else {
            self.unlogged += 1;
            if self.unlogged.is_power_of_two() {
                tracing::warn!(
                    more = self.unlogged,
                    "refused more peers not on the allowlist (too many to name)"
                );
            }
        }
        Err(ConnectionDenied::new(NotAllowed(*peer)))
    }
}

/// Why the gate refused a connection.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is not on this mesh's allowlist")]
pub struct NotAllowed(pub PeerId);

impl NetworkBehaviour for MeshGate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer, "inbound")?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.check(&peer, "outbound")?;
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer, "outbound")?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections
                    .entry(e.peer_id)
                    .or_default()
                    .insert(e.connection_id);
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(set) = self.connections.get_mut(&e.peer_id) {
                    set.remove(&e.connection_id);
                    if set.is_empty() {
                        self.connections.remove(&e.peer_id);
                    }
                }
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

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        let mut reload = false;
        #[cfg(unix)]
        if let Some(h) = self.hangup.as_mut() {
            while let Poll::Ready(Some(())) = h.poll_recv(cx) {
                reload = true;
            }
        }
        if let Some(t) = self.tick.as_mut() {
            while t.poll_tick(cx).is_ready() {
                let m = std::fs::metadata(&self.allow.path)
                    .and_then(|m| m.modified())
                    .ok();
                if m != self.modified {
                    self.modified = m;
                    reload = true;
                }
            }
        }
        if reload {
            self.reload();
        }
        if let Some(peer) = self.close.pop_front() {
            return Poll::Ready(ToSwarm::CloseConnection {
                peer_id: peer,
                connection: CloseConnection::All,
            });
        }
        Poll::Pending
    }
}
