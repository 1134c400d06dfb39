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

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::Endpoint;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, PortUse, Transport};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use salsa20::XSalsa20;
use salsa20::cipher::{KeyIvInit, StreamCipher};
use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
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

/// A 256-bit pre-shared swarm key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SwarmKey([u8; KEY_LEN]);

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwarmKey({})", self.fingerprint())
    }
}

impl SwarmKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut k = [0u8; KEY_LEN];
        rand::fill(&mut k);
        Self(k)
    }

    /// The key from its raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// libp2p's fingerprint of the key (safe to print and compare; it does not reveal it).
    pub fn fingerprint(&self) -> String {
        libp2p::pnet::PreSharedKey::new(self.0)
            .fingerprint()
            .to_string()
    }

    /// The key as libp2p's pnet type.
    pub fn to_psk(&self) -> libp2p::pnet::PreSharedKey {
        libp2p::pnet::PreSharedKey::new(self.0)
    }

    /// The key file's text: header, encoding, 64 hex digits.
    pub fn to_file_text(&self) -> String {
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("{KEY_HEADER}\n{KEY_ENCODING}\n{hex}\n")
    }

    /// Parses a key file's text. After the three lines only blank lines and `#` comments
    /// may follow (`FILE.previous` keeps the overlap's end there).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("").trim_end();
        if header != KEY_HEADER {
            return Err(format!("line 1 is {header:?}, not {KEY_HEADER:?}"));
        }
        let encoding = lines.next().unwrap_or("").trim_end();
        if encoding != KEY_ENCODING {
            return Err(format!(
                "line 2 is {encoding:?}, not {KEY_ENCODING:?} (only base16 keys are supported)"
            ));
        }
        let hex = lines.next().unwrap_or("").trim();
        if hex.len() != 2 * KEY_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "line 3 must be {} hex digits (a {}-bit key); it has {} characters",
                2 * KEY_LEN,
                KEY_LEN * 8,
                hex.chars().count()
            ));
        }
        let mut key = [0u8; KEY_LEN];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("line 3: {e}"))?;
        }
        for (n, line) in lines.enumerate() {
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                return Err(format!("unexpected text on line {}: {line:?}", n + 4));
            }
        }
        Ok(Self(key))
    }
}

/// Reads a file that must be private to its owner.
fn read_private(path: &Path) -> Result<String, PrivateError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PrivateError::KeyExposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    if meta.len() > 4096 {
        return Err(PrivateError::MalformedKey {
            path: path.to_path_buf(),
            reason: format!("{} bytes is too long for a key file", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Reads and checks a swarm key file (mode 0600 or stricter).
pub fn read_key(path: &Path) -> Result<SwarmKey, PrivateError> {
    let text = read_private(path)?;
    SwarmKey::parse(&text).map_err(|reason| PrivateError::MalformedKey {
        path: path.to_path_buf(),
        reason,
    })
}

/// Writes `text` to `path` with mode 0600: a new file when `replace` is false (an
/// existing one is an error), else atomically replacing it.
fn write_private(path: &Path, text: &str, replace: bool) -> Result<(), PrivateError> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let target = if replace {
        path.with_extension("tmp-write")
    } else {
        path.to_path_buf()
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if replace {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&target).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            PrivateError::Exists {
                path: target.clone(),
            }
        } else {
            PrivateError::Io {
                path: target.clone(),
                source: e,
            }
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&target))?;
    if replace {
        std::fs::rename(&target, path).map_err(io_err(path))?;
    }
    Ok(())
}

/// Writes a new key file with mode 0600; refuses to overwrite one.
pub fn write_new_key(path: &Path, key: &SwarmKey) -> Result<(), PrivateError> {
    write_private(path, &key.to_file_text(), false)
}

/// Where the previous key of a rotation is kept: `FILE.previous`.
pub fn previous_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".previous");
    PathBuf::from(name)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The keys a node holds: the current one and, during a rotation's overlap, the
/// previous one with the end of the overlap (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmKeys {
    /// The key of the mesh.
    pub current: SwarmKey,
    /// The key being retired, accepted until the given unix second.
    pub previous: Option<(SwarmKey, u64)>,
}

impl SwarmKeys {
    /// One key, no rotation.
    pub fn single(key: SwarmKey) -> Self {
        Self {
            current: key,
            previous: None,
        }
    }

    /// The keys in force at `now` (unix seconds), the one to dial with first: the
    /// previous key during the overlap (every member still holds it), then the current.
    pub fn active_at(&self, now: u64) -> Vec<SwarmKey> {
        match self.previous {
            Some((old, until)) if now < until && old != self.current => vec![old, self.current],
            _ => vec![self.current],
        }
    }

    /// Reads `path` and, if present and not expired, `path.previous`.
    pub fn load(path: &Path) -> Result<Self, PrivateError> {
        let current = read_key(path)?;
        let prev = previous_path(path);
        let previous = if prev.exists() {
            let text = read_private(&prev)?;
            let key = SwarmKey::parse(&text).map_err(|reason| PrivateError::MalformedKey {
                path: prev.clone(),
                reason,
            })?;
            let until = overlap_until(&text).ok_or_else(|| PrivateError::MalformedKey {
                path: prev.clone(),
                reason: "no `# overlap-until UNIX_SECONDS` line".into(),
            })?;
            (until > unix_now()).then_some((key, until))
        } else {
            None
        };
        Ok(Self { current, previous })
    }
}

/// The keys of a running node, re-read when the key file (or `FILE.previous`) changes,
/// so that a rotation reaches running nodes without a restart. A changed file that does
/// not parse is logged and the keys in force are kept.
#[derive(Debug)]
pub struct KeyRing {
    path: Option<PathBuf>,
    state: std::sync::Mutex<RingState>,
}

#[derive(Debug)]
struct RingState {
    keys: SwarmKeys,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    checked: std::time::Instant,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl KeyRing {
    /// Keys read from `path` (and `path.previous`), watched for changes.
    pub fn from_file(path: &Path) -> Result<Self, PrivateError> {
        let keys = SwarmKeys::load(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            state: std::sync::Mutex::new(RingState {
                keys,
                stamp: (mtime(path), mtime(&previous_path(path))),
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// Fixed keys (tests and benches).
    pub fn fixed(keys: SwarmKeys) -> Self {
        Self {
            path: None,
            state: std::sync::Mutex::new(RingState {
                keys,
                stamp: (None, None),
                checked: std::time::Instant::now(),
            }),
        }
    }

    /// The keys now, after re-reading the files if they changed (checked at most once a second).
    pub fn keys(&self) -> SwarmKeys {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(path) = &self.path
            && st.checked.elapsed() >= Duration::from_secs(1)
        {
            st.checked = std::time::Instant::now();
            let stamp = (mtime(path), mtime(&previous_path(path)));
            if stamp != st.stamp {
                st.stamp = stamp;
                match SwarmKeys::load(path) {
                    Ok(keys) => {
                        if keys != st.keys {
                            tracing::warn!(
                                current = %keys.current.fingerprint(),
                                previous = ?keys.previous.map(|(k, until)| (k.fingerprint(), until)),
                                "swarm key changed on disk: new connections use it"
                            );
                        }
                        st.keys = keys;
                    }
                    Err(e) => {
                        tracing::error!("swarm key not reloaded, keeping the one in force: {e}")
                    }
                }
            }
        }
        st.keys.clone()
    }

    /// The keys in force now, the one to dial with first.
    pub fn active(&self) -> Vec<SwarmKey> {
        self.keys().active_at(unix_now())
    }
}

fn overlap_until(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("# overlap-until ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    })
}

/// Rotates the key in `path`: the old key moves to `path.previous`, accepted for
/// `overlap`, and a fresh key takes its place. Returns the new keys.
pub fn rotate(path: &Path, overlap: Duration) -> Result<SwarmKeys, PrivateError> {
    let old = read_key(path)?;
    let until = unix_now().saturating_add(overlap.as_secs());
    let text = format!(
        "{}# overlap-until {until} (the previous key of this mesh; accepted until then)\n",
        old.to_file_text()
    );
    write_private(&previous_path(path), &text, true)?;
    let new = SwarmKey::generate();
    write_private(path, &new.to_file_text(), true)?;
    Ok(SwarmKeys {
        current: new,
        previous: Some((old, until)),
    })
}

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

/// A private mesh's status page shows who serves what: it may listen only on a loopback
/// address unless it requires a token.
pub fn check_page(
    addr: std::net::SocketAddr,
    mesh: &MeshConfig,
    token: Option<&str>,
) -> Result<(), PageError> {
    if token.is_some_and(|t| t.len() < 16) {
        return Err(PageError::ShortToken);
    }
    if mesh.is_private() && !addr.ip().is_loopback() && token.is_none() {
        return Err(PageError::Exposed { addr });
    }
    Ok(())
}

/// Why the status page may not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    /// A private mesh's page on a non-loopback address without a token.
    #[error(
        "refusing to show a private mesh's page on {addr}: bind --http to a loopback address (127.0.0.1:PORT), or require a token with --http-token (or POLLEN_HTTP_TOKEN)"
    )]
    Exposed {
        /// The address asked for.
        addr: std::net::SocketAddr,
    },
    /// A token too short to resist guessing.
    #[error("--http-token must have at least 16 characters")]
    ShortToken,
}

/// `router` answering 401 to requests without `token` (as a bearer token or `?token=`);
/// unchanged when `token` is none.
pub fn with_token(router: axum::Router, token: Option<String>) -> axum::Router {
    let Some(token) = token else {
        return router;
    };
    let token = Arc::new(token);
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                if request_has_token(&req, &token) {
                    next.run(req).await
                } else {
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::UNAUTHORIZED,
                        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                        "this private mesh's page needs its token\n",
                    ))
                }
            }
        },
    ))
}

fn request_has_token(req: &axum::extract::Request, token: &str) -> bool {
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    [bearer, query]
        .into_iter()
        .flatten()
        .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

// ---------------------------------------------------------------------------------
// pnet with one or two keys

fn key_refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the peer does not hold this mesh's swarm key (pre-shared key mismatch)",
    )
}

/// Runs libp2p's pnet handshake on `socket` with the keys in force now: sends a random
/// nonce, reads the peer's, and returns the encrypted stream. Which key the peer uses
/// is learnt from its first 20 bytes (see the module's notes).
pub async fn handshake<S>(mut socket: S, keys: Arc<KeyRing>) -> io::Result<PnetStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut local_nonce = [0u8; NONCE_LEN];
    rand::fill(&mut local_nonce);
    socket.write_all(&local_nonce).await?;
    socket.flush().await?;
    let mut remote_nonce = [0u8; NONCE_LEN];
    socket.read_exact(&mut remote_nonce).await?;
    Ok(PnetStream {
        inner: socket,
        keys: keys.active(),
        local_nonce,
        remote_nonce,
        read: ReadState::Detecting {
            buf: [0; MULTISTREAM_HEADER.len()],
            filled: 0,
        },
        write: None,
        pending: Vec::new(),
        pending_at: 0,
    })
}

enum ReadState {
    /// Collecting the peer's first encrypted bytes.
    Detecting {
        buf: [u8; MULTISTREAM_HEADER.len()],
        filled: usize,
    },
    /// Key found; `plain[at..]` is still to be handed out.
    Ready {
        key: usize,
        cipher: XSalsa20,
        plain: [u8; MULTISTREAM_HEADER.len()],
        at: usize,
    },
}

/// A socket under libp2p's pnet encryption (XSalsa20, one nonce per direction).
pub struct PnetStream<S> {
    inner: S,
    keys: Vec<SwarmKey>,
    local_nonce: [u8; NONCE_LEN],
    remote_nonce: [u8; NONCE_LEN],
    read: ReadState,
    /// The write cipher and the index of its key, made at the first write.
    write: Option<(usize, XSalsa20)>,
    /// Encrypted bytes not yet taken by `inner` (at most one chunk).
    pending: Vec<u8>,
    pending_at: usize,
}

impl<S> PnetStream<S> {
    /// Index (into the keys in force) of the key the peer was found to use.
    fn read_key(&self) -> Option<usize> {
        match self.read {
            ReadState::Ready { key, .. } => Some(key),
            ReadState::Detecting { .. } => None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> PnetStream<S> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_at < self.pending.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.pending_at..])
            {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.pending_at += n;
        }
        self.pending.clear();
        self.pending_at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PnetStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match &mut this.read {
                ReadState::Detecting { buf: head, filled } => {
                    let n = match Pin::new(&mut this.inner).poll_read(cx, &mut head[*filled..]) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    };
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    *filled += n;
                    if *filled < head.len() {
                        continue;
                    }
                    let head = *head;
                    let found = this.keys.iter().enumerate().find_map(|(i, k)| {
                        let mut cipher = XSalsa20::new(&k.0.into(), &this.remote_nonce.into());
                        let mut plain = head;
                        cipher.apply_keystream(&mut plain);
                        (&plain == MULTISTREAM_HEADER).then_some((i, cipher, plain))
                    });
                    let Some((key, cipher, plain)) = found else {
                        return Poll::Ready(Err(key_refused()));
                    };
                    if matches!(this.write, Some((w, _)) if w != key) {
                        return Poll::Ready(Err(key_refused()));
                    }
                    this.read = ReadState::Ready {
                        key,
                        cipher,
                        plain,
                        at: 0,
                    };
                }
                ReadState::Ready {
                    cipher, plain, at, ..
                } => {
                    if *at < plain.len() {
                        let n = buf.len().min(plain.len() - *at);
                        buf[..n].copy_from_slice(&plain[*at..*at + n]);
                        *at += n;
                        return Poll::Ready(Ok(n));
                    }
                    let n = match Pin::new(&mut this.inner).poll_read(cx, buf) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    };
                    cipher.apply_keystream(&mut buf[..n]);
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PnetStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if this.write.is_none() {
            // The listener writes only after it has read the dialer's first bytes, so
            // it answers with the dialer's key; a dialer starts with the first key.
            let key = this.read_key().unwrap_or(0);
            let k = this.keys.get(key).copied().unwrap_or(this.keys[0]);
            this.write = Some((key, XSalsa20::new(&k.0.into(), &this.local_nonce.into())));
        }
        let Some((_, cipher)) = this.write.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::Other.into()));
        };
        let n = buf.len().min(WRITE_CHUNK);
        this.pending.extend_from_slice(&buf[..n]);
        cipher.apply_keystream(&mut this.pending);
        // Start sending now; what the socket does not take yet goes at the next call.
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}

/// Upgrades any raw transport (TCP, or the in-process one in tests) the way a private
/// node does: pnet with `keys`, then noise and yamux.
pub fn secure<T>(
    raw: T,
    keypair: &Keypair,
    keys: Arc<KeyRing>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = noise::Config::new(keypair)?;
    Ok(raw
        .and_then(move |socket, _| handshake(socket, keys))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// The transport of a private node on the network: TCP, pnet, noise, yamux; no QUIC.
pub fn tcp_transport(
    keypair: &Keypair,
    keys: Arc<KeyRing>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    secure(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)),
        keypair,
        keys,
    )
}

// ---------------------------------------------------------------------------------
// the connection gate

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pollen-private-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_file_round_trips_and_matches_libp2p() {
        let k = SwarmKey::generate();
        let text = k.to_file_text();
        assert_eq!(SwarmKey::parse(&text).unwrap(), k);
        // libp2p's own parser reads what we write, and we read what it writes.
        let theirs: libp2p::pnet::PreSharedKey = text.parse().unwrap();
        assert_eq!(theirs, k.to_psk());
        assert_eq!(SwarmKey::parse(&theirs.to_string()).unwrap(), k);
    }

    #[test]
    fn malformed_keys_say_what_is_wrong() {
        let hex = "ab".repeat(32);
        for (text, needle) in [
            ("", "line 1"),
            ("/key/swarm/psk/2.0.0/\n/base16/\n", "line 1"),
            (&format!("{KEY_HEADER}\n/base64/\n{hex}\n"), "line 2"),
            (
                &format!("{KEY_HEADER}\n{KEY_ENCODING}\n{}\n", &hex[..62]),
                "64 hex digits",
            ),
            (
                &format!("{KEY_HEADER}\n{KEY_ENCODING}\n{}zz\n", &hex[..62]),
                "64 hex digits",
            ),
            (
                &format!("{KEY_HEADER}\n{KEY_ENCODING}\n{hex}\nextra\n"),
                "line 4",
            ),
        ] {
            let e = SwarmKey::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        assert!(SwarmKey::parse(&format!("{KEY_HEADER}\r\n{KEY_ENCODING}\r\n{hex}\r\n")).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("perm");
        let p = d.join("swarm.key");
        let k = SwarmKey::generate();
        write_new_key(&p, &k).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key(&p).unwrap(), k);
        assert!(matches!(
            write_new_key(&p, &SwarmKey::generate()),
            Err(PrivateError::Exists { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key(&p).unwrap_err();
        assert!(
            matches!(e, PrivateError::KeyExposed { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_key(&p).is_err());
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_overlap() {
        let d = tmp("rotate");
        let p = d.join("swarm.key");
        let old = SwarmKey::generate();
        write_new_key(&p, &old).unwrap();
        let keys = rotate(&p, Duration::from_secs(3600)).unwrap();
        let loaded = SwarmKeys::load(&p).unwrap();
        assert_eq!(loaded, keys);
        assert_ne!(loaded.current, old);
        let now = unix_now();
        assert_eq!(loaded.active_at(now), vec![old, loaded.current]);
        assert_eq!(loaded.active_at(now + 3601), vec![loaded.current]);
        // An expired overlap loads as one key.
        rotate(&p, Duration::ZERO).unwrap();
        assert!(SwarmKeys::load(&p).unwrap().previous.is_none());
    }

    #[test]
    fn allowlists_name_the_bad_line() {
        let a = PeerId::random();
        let b = PeerId::random();
        let p = Path::new("allow.txt");
        let text = format!("# members\n{a}  # alice\n\n  {b}\n");
        let got = parse_allowlist(p, &text).unwrap();
        assert_eq!(got, HashSet::from([a, b]));
        let e = parse_allowlist(p, &format!("{a}\nnot-a-peer\n")).unwrap_err();
        assert!(
            matches!(e, PrivateError::BadPeerLine { line: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().starts_with("allow.txt:2:"), "{e}");
    }

    #[test]
    fn add_peer_appends_once() {
        let d = tmp("add");
        let p = d.join("allow.txt");
        let a = PeerId::random();
        assert!(add_peer(&p, &a, Some("alice")).unwrap());
        assert!(!add_peer(&p, &a, None).unwrap());
        let b = PeerId::random();
        assert!(add_peer(&p, &b, None).unwrap());
        assert_eq!(read_allowlist(&p).unwrap(), HashSet::from([a, b]));
    }

    #[test]
    fn quic_is_refused_in_a_private_mesh() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        assert!(check_tcp_only(std::slice::from_ref(&tcp)).is_ok());
        let e = check_tcp_only(&[tcp, quic]).unwrap_err();
        assert!(e.to_string().contains("QUIC"), "{e}");
    }

    /// Runs a dialer and a listener over an in-memory pipe: the dialer sends the
    /// multistream header then `msg`; the listener echoes what it read.
    async fn exchange(
        dial_keys: Vec<SwarmKey>,
        listen_keys: Vec<SwarmKey>,
        upstream: Option<bool>,
    ) -> io::Result<Vec<u8>> {
        let (a, b) = tokio::io::duplex(4096);
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (a, b) = (a.compat(), b.compat());
        let msg: Vec<u8> = [MULTISTREAM_HEADER.as_slice(), b"hello private mesh"].concat();
        let keys_of = |v: Vec<SwarmKey>| {
            Arc::new(KeyRing::fixed(SwarmKeys {
                current: *v.last().unwrap(),
                previous: (v.len() > 1).then(|| (v[0], u64::MAX)),
            }))
        };
        let m = msg.clone();
        let dialer = async move {
            let mut s: Box<dyn DuplexIo> = if upstream == Some(true) {
                Box::new(
                    libp2p::pnet::PnetConfig::new(dial_keys[0].to_psk())
                        .handshake(a)
                        .await
                        .map_err(io::Error::other)?,
                )
            } else {
                Box::new(handshake(a, keys_of(dial_keys)).await?)
            };
            s.write_all(&m).await?;
            s.flush().await?;
            let mut back = vec![0u8; m.len()];
            s.read_exact(&mut back).await?;
            io::Result::Ok(back)
        };
        let listener = async move {
            let mut s: Box<dyn DuplexIo> = if upstream == Some(false) {
                Box::new(
                    libp2p::pnet::PnetConfig::new(listen_keys[0].to_psk())
                        .handshake(b)
                        .await
                        .map_err(io::Error::other)?,
                )
            } else {
                Box::new(handshake(b, keys_of(listen_keys)).await?)
            };
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await?;
            s.write_all(&got).await?;
            s.flush().await?;
            io::Result::Ok(())
        };
        let (d, l) = tokio::join!(dialer, listener);
        l?;
        d
    }

    trait DuplexIo: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> DuplexIo for T {}

    #[tokio::test]
    async fn pnet_speaks_libp2p_pnet_and_tells_keys_apart() {
        let (k1, k2, k3) = (
            SwarmKey::generate(),
            SwarmKey::generate(),
            SwarmKey::generate(),
        );
        let want: Vec<u8> = [MULTISTREAM_HEADER.as_slice(), b"hello private mesh"].concat();
        // Same key, ours on both ends and ours against libp2p's in both directions.
        assert_eq!(exchange(vec![k1], vec![k1], None).await.unwrap(), want);
        assert_eq!(
            exchange(vec![k1], vec![k1], Some(true)).await.unwrap(),
            want
        );
        assert_eq!(
            exchange(vec![k1], vec![k1], Some(false)).await.unwrap(),
            want
        );
        // A listener in a rotation's overlap accepts the old and the new key.
        assert_eq!(exchange(vec![k1], vec![k1, k2], None).await.unwrap(), want);
        assert_eq!(exchange(vec![k2], vec![k1, k2], None).await.unwrap(), want);
        assert_eq!(
            exchange(vec![k2], vec![k1, k2], Some(true)).await.unwrap(),
            want
        );
        // Another key is refused by the listener, clearly.
        let e = exchange(vec![k3], vec![k1, k2], None).await.unwrap_err();
        assert!(
            e.to_string().contains("swarm key") || e.kind() == io::ErrorKind::UnexpectedEof,
            "{e}"
        );
        assert!(exchange(vec![k3], vec![k1], Some(true)).await.is_err());
    }
}
