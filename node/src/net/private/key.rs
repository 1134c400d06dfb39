//! Swarm key files (`/key/swarm/psk/1.0.0/`, mode 0600), their rotation, and the keys
//! of a running node, re-read when the files change.

use super::{KEY_ENCODING, KEY_HEADER, KEY_LEN, PrivateError, io_err, unix_now};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A 256-bit pre-shared swarm key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SwarmKey(pub(super) [u8; KEY_LEN]);

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
    if let Some(mode) = crate::net::identity::open_to_others(&meta) {
        return Err(PrivateError::KeyExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > crate::net::identity::KEY_FILE_MAX {
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
pub fn rotate(path: &Path, overlap: Duration, force: bool) -> Result<SwarmKeys, PrivateError> {
    let keys = SwarmKeys::load(path)?;
    if let Some((previous, until)) = keys.previous
        && !force
        && previous != keys.current
    {
        return Err(PrivateError::OverlapRunning {
            path: previous_path(path),
            fingerprint: previous.fingerprint(),
            left_s: until.saturating_sub(unix_now()),
        });
    }
    let old = keys.current;
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
