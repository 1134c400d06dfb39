//! Private meshes: a swarm that only its members can enter.
//!
//! Two locks, each optional, both checked on every connection:
//!
//! - **The swarm key** (`--swarm-key FILE`): 256 bits in the `/key/swarm/psk/1.0.0/`
//!   text format that IPFS and libp2p tools read and write. Every TCP connection runs
//!   libp2p's pre-shared-key layer (pnet: XSalsa20 over the raw socket, under noise), so
//!   a node without the key cannot even start the noise handshake. rust-libp2p cannot put
//!   a pre-shared key under QUIC, so a private node has no QUIC.
//! - **The allowlist** (`--allow-peers FILE`): peer ids, one a line. [`MeshGate`] refuses
//!   every connection with another peer at libp2p's connection gate, inbound and
//!   outbound, logs each refused peer once, reloads the file on SIGHUP (and when its
//!   modification time changes), and closes the connections of a peer that was removed.
//!
//! **Rotation.** `pollen mesh rotate` writes a new key to the key file and keeps the old
//! one beside it (`FILE.previous`, with the end of the overlap). During the overlap a
//! node accepts both keys and dials with the old one (which every member still holds);
//! after it, only the new key works. To accept two keys on one port, the listener reads
//! the first 20 encrypted bytes after the nonces and decrypts them with each key: the
//! one that yields multistream-select's header (which every libp2p TCP upgrade sends
//! first) is the peer's key. The same check runs on every connection, with one key or
//! two, so a node with another key is told so at once. The bytes on the wire are
//! libp2p's pnet exactly (the tests talk to `libp2p::pnet::PnetConfig` both ways).
//!
//! The module's parts: [`key`] (swarm key files, rotation and the key ring of a running
//! node), [`pnet`] (the pre-shared-key layer with one or two keys, and the transport of a
//! private node), [`gate`] (allowlist files and the connection gate) and [`page`] (who
//! may see a private mesh's status page).

pub mod gate;
pub mod key;
pub mod page;
pub mod pnet;
#[cfg(test)]
mod tests;

pub use gate::{
    Allowlist, GateStats, MeshGate, NotAllowed, add_peer, parse_allowlist, read_allowlist,
};
pub use key::{KeyRing, SwarmKey, SwarmKeys, previous_path, read_key, rotate, write_new_key};
pub use page::{PageError, check_page, with_token};
pub use pnet::{PnetStream, handshake, secure, tcp_transport};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first line of a swarm key file.
pub const KEY_HEADER: &str = "/key/swarm/psk/1.0.0/";
/// The second line: the key's encoding (the only one IPFS tools write).
pub const KEY_ENCODING: &str = "/base16/";
/// Key length in bytes (256 bits).
pub const KEY_LEN: usize = 32;
/// The environment variable that stands for `--swarm-key`.
pub const SWARM_KEY_ENV: &str = "POLLEN_SWARM_KEY";
/// The default overlap of a key rotation.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// Length of the pnet nonce each side sends first.
const NONCE_LEN: usize = 24;
/// What every libp2p TCP upgrade sends first: multistream-select's header, length-prefixed.
const MULTISTREAM_HEADER: &[u8; 20] = b"\x13/multistream/1.0.0\n";
/// Most plaintext bytes encrypted and queued per write.
const WRITE_CHUNK: usize = 8 * 1024;
/// Most refused peers remembered so that each is logged once.
const MAX_LOGGED_REFUSALS: usize = 4096;
/// How often the allowlist's modification time is checked.
const ALLOWLIST_POLL: Duration = Duration::from_secs(2);
/// Longest a connection's whole upgrade (pnet, noise, yamux) may take: a peer that
/// opens a socket and stays silent is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most lines an allowlist may have.
const MAX_ALLOWLIST_LINES: usize = 100_000;

/// Why a swarm key, an allowlist or a private node's settings are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivateError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The key file is not a swarm key.
    #[error(
        "{path}: not a swarm key: {reason} (expected {KEY_HEADER}, {KEY_ENCODING} and 64 hex digits on three lines, as `pollen mesh init` writes)"
    )]
    MalformedKey {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        reason: String,
    },
    /// Someone other than its owner may read the key file.
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a swarm key must be private: run `chmod 600 {path}`"
    )]
    KeyExposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line of the allowlist is not a peer id.
    #[error("{path}:{line}: not a peer id: {text:?} ({reason})")]
    BadPeerLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The text found.
        text: String,
        /// The parser's reason.
        reason: String,
    },
    /// The allowlist is too long.
    #[error("{path}: more than {MAX_ALLOWLIST_LINES} lines")]
    AllowlistTooLong {
        /// The file.
        path: PathBuf,
    },
    /// A rotation while the previous one's overlap runs would retire its old key early.
    #[error(
        "the key before this one ({fingerprint}, in {path}) is still accepted for {left_s} \
         more seconds: rotating again now would retire it at once for every member that \
         has not moved to the current key; wait for the overlap to end, or pass --force"
    )]
    OverlapRunning {
        /// The previous key's file.
        path: PathBuf,
        /// The previous key's fingerprint.
        fingerprint: String,
        /// Seconds its overlap has left.
        left_s: u64,
    },
    /// A file that must not be overwritten exists.
    #[error("{path} already exists; refusing to overwrite it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A private node was asked to use QUIC.
    #[error(
        "{addr}: a private mesh runs on TCP only (rust-libp2p cannot put a pre-shared key under QUIC); use a /tcp/ address"
    )]
    QuicInPrivateMesh {
        /// The address.
        addr: Multiaddr,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PrivateError + '_ {
    move |source| PrivateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Refuses QUIC addresses for a private node.
pub fn check_tcp_only(addrs: &[Multiaddr]) -> Result<(), PrivateError> {
    match addrs.iter().find(|a| {
        a.iter()
            .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
    }) {
        Some(addr) => Err(PrivateError::QuicInPrivateMesh { addr: addr.clone() }),
        None => Ok(()),
    }
}

/// What makes a node private; the default is a public node.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    /// The swarm keys: every connection runs pnet with them, and QUIC is off.
    pub keys: Option<Arc<KeyRing>>,
    /// Only these peers may connect.
    pub allow: Option<Allowlist>,
    /// The gate's counters.
    pub gate_stats: Arc<GateStats>,
    /// A client's identity (`--client-identity`); none: a fresh one per node.
    pub identity: Option<Keypair>,
}

impl MeshConfig {
    /// Loads `--swarm-key` and `--allow-peers`, failing clearly on anything wrong.
    pub fn load(swarm_key: Option<&Path>, allow: Option<&Path>) -> Result<Self, PrivateError> {
        let keys = swarm_key.map(KeyRing::from_file).transpose()?.map(Arc::new);
        let allow = allow
            .map(|p| {
                read_allowlist(p).map(|peers| Allowlist {
                    path: p.to_path_buf(),
                    peers,
                })
            })
            .transpose()?;
        Ok(Self {
            keys,
            allow,
            gate_stats: Arc::default(),
            identity: None,
        })
    }

    /// Whether this node runs with a swarm key.
    pub fn is_private(&self) -> bool {
        self.keys.is_some()
    }

    /// The node's connection gate: when it has an allowlist file, or `extra` peers
    /// (`NetConfig::allow_peers`); both together admit the union.
    pub fn gate(&self, extra: Option<&[PeerId]>) -> Option<MeshGate> {
        let mut allow = match (&self.allow, extra) {
            (Some(a), _) => a.clone(),
            (None, Some(_)) => Allowlist {
                path: PathBuf::new(),
                peers: HashSet::new(),
            },
            (None, None) => return None,
        };
        allow
            .peers
            .extend(extra.unwrap_or_default().iter().copied());
        Some(MeshGate::new(allow, self.gate_stats.clone()))
    }
}

/// The private-mesh flags every command of both binaries takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MeshArgs {
    /// Join the private mesh of this swarm key file (`pollen mesh init` makes one; it must
    /// be mode 0600). Every connection then runs libp2p's pre-shared-key layer (pnet)
    /// under noise on TCP, and QUIC is off: rust-libp2p cannot put a pre-shared key under
    /// QUIC. A bad or exposed key file is an error, never a fallback to the public swarm.
    /// Default: none (the public swarm).
    #[arg(long, global = true, env = SWARM_KEY_ENV, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Admit only the peer ids in this file (one a line, `#` comments), inbound and
    /// outbound. Reloaded on SIGHUP and when the file changes; a removed peer's
    /// connections are closed. Default: none (every holder of the key is admitted).
    #[arg(long, global = true, value_name = "FILE")]
    pub allow_peers: Option<PathBuf>,
    /// Identity key file of a client (generate, status, api, chat), created if absent
    /// (mode 0600), so that allowlists can name it (`pollen mesh add-peer --identity
    /// FILE`). Servers and bootstraps keep their own --identity. Default: a fresh
    /// identity on every run.
    #[arg(long, global = true, value_name = "FILE")]
    pub client_identity: Option<PathBuf>,
}

static PROCESS_MESH: std::sync::OnceLock<MeshConfig> = std::sync::OnceLock::new();

impl MeshArgs {
    /// Loads the flags and makes them this process's mesh, which every
    /// [`super::NetConfig::new`] then starts from: every role in the process (serve,
    /// generate, status, api, chat, bootstrap) joins the same mesh. Call once, before
    /// any node starts.
    pub fn install(&self) -> Result<&'static MeshConfig, PrivateError> {
        let mut cfg = MeshConfig::load(self.swarm_key.as_deref(), self.allow_peers.as_deref())?;
        if let Some(path) = &self.client_identity {
            let keypair = super::identity::load_or_create(path).map_err(|e| PrivateError::Io {
                path: path.clone(),
                source: io::Error::other(e.to_string()),
            })?;
            cfg.identity = Some(keypair);
        }
        if let Some(keys) = &cfg.keys {
            let k = keys.keys();
            tracing::info!(
                fingerprint = %k.current.fingerprint(),
                overlap = k.previous.is_some(),
                "private mesh: pnet on TCP, QUIC off"
            );
        }
        Ok(PROCESS_MESH.get_or_init(|| cfg))
    }
}

impl MeshArgs {
    /// [`MeshArgs::install`], unless `skip` (then the public default, nothing read).
    pub fn install_unless(&self, skip: bool) -> Result<MeshConfig, PrivateError> {
        if skip {
            Ok(MeshConfig::default())
        } else {
            self.install().cloned()
        }
    }
}

/// This process's mesh ([`MeshArgs::install`]); public when none was installed.
pub fn process_mesh() -> MeshConfig {
    PROCESS_MESH.get().cloned().unwrap_or_default()
}

/// What to tell a user whose node could reach no entry point.
pub fn unreachable_hint(mesh: &MeshConfig) -> &'static str {
    if mesh.is_private() {
        "hint: a private mesh admits only holders of its current swarm key (check --swarm-key \
         or POLLEN_SWARM_KEY against the mesh's fingerprint), and, if it keeps an allowlist, \
         only the peers on it; a private node dials TCP addresses only"
    } else {
        "hint: if this is a private mesh, give its swarm key with --swarm-key FILE \
         (or POLLEN_SWARM_KEY)"
    }
}

/// What to say when a private mesh shows no server at all: a bootstrap that keeps an
/// allowlist closes a connection from a peer not on it, which then sees an empty mesh.
pub fn empty_mesh_hint(mesh: &MeshConfig) -> Option<&'static str> {
    mesh.is_private().then_some(
        "hint: a private mesh that keeps an allowlist shows nothing to a peer not on it: \
         give this client a fixed identity (--client-identity FILE) and have its peer id \
         added (`pollen mesh add-peer --identity FILE --allow-peers LIST` on the mesh's \
         nodes)",
    )
}

/// Whether `addr` is a QUIC address.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// `addrs` without QUIC when this process is in a private mesh (for default listen addresses).
pub fn default_listen(addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    if process_mesh().is_private() {
        addrs.into_iter().filter(|a| !is_quic(a)).collect()
    } else {
        addrs
    }
}
