//! The node's persistent ed25519 identity: one key file, created on first run
//! with mode 0600, giving the same peer id after every restart; a key file that
//! other users may read or write is refused.

use libp2p::identity::Keypair;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the identity key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file could not be read, created or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds something else.
    #[error("{} is not a Pollen identity key ({reason})", path.display())]
    NotAKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file can be read by other users (or written by them): whoever reads it can act
    /// as this node.
    #[error(
        "{} is open to other users (mode {mode:o}): whoever reads it can sign as this node; \
         make it private with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another running node holds the file.
    #[error(
        "{} is the identity of another Pollen node running on this machine: two nodes with \
         one key are one peer to the swarm, and one of them would not be seen; give this one \
         its own key file with --identity FILE",
        path.display()
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
}

/// A key file held by this process ([`load_and_hold`]): while it lives, no other node
/// starts with the same identity.
#[derive(Debug)]
pub struct Held {
    _file: std::fs::File,
}

/// [`load_or_create`] for a node that runs for a while (a server, a bootstrap): the key,
/// and the file held (an advisory lock) until the [`Held`] is dropped or the process
/// ends, however it ends. A second node started with the same file meanwhile is refused
/// ([`IdentityError::InUse`]): with one peer id, the swarm would see only one of them.
pub fn load_and_hold(path: &Path) -> Result<(Keypair, Held), IdentityError> {
    let key = load_or_create(path)?;
    let io = |what, source| IdentityError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| io("opening", e))?;
    match file.try_lock() {
        Ok(()) => Ok((key, Held { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Err(IdentityError::InUse {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io("locking", e)),
    }
}

/// The most bytes a key file (an identity, a swarm key) may hold.
pub(crate) const KEY_FILE_MAX: u64 = 4096;

/// A key file's permission bits where its group or other users may read, write or run
/// it (`None` where only its owner may, and off Unix).
pub(crate) fn open_to_others(meta: &std::fs::Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Some(mode);
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    None
}

/// Loads the key in `path`, or creates it (and its folder) if absent.
pub fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    let io = |what, source| IdentityError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let not_a_key = |reason: String| IdentityError::NotAKey {
        path: path.to_path_buf(),
        reason,
    };
    if path.exists() {
        let meta = std::fs::metadata(path).map_err(|e| io("reading", e))?;
        if let Some(mode) = open_to_others(&meta) {
            return Err(IdentityError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        // An ed25519 key's encoding is 68 bytes.
        if meta.len() > KEY_FILE_MAX {
            return Err(not_a_key(format!("{} bytes is too long", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|e| io("reading", e))?;
        let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| not_a_key(e.to_string()))?;
        if key.clone().try_into_ed25519().is_err() {
            return Err(not_a_key("not an ed25519 key".into()));
        }
        return Ok(key);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| not_a_key(format!("cannot encode a new key: {e}")))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| io("creating", e))?;
    f.write_all(&bytes).map_err(|e| io("writing", e))?;
    Ok(key)
}

/// The 32-byte ed25519 secret of a key, which signs announcements (`None` for a key of
/// another type).
pub fn ed25519_secret(key: &Keypair) -> Option<[u8; 32]> {
    let kp = key.clone().try_into_ed25519().ok()?;
    let bytes = kp.secret();
    let slice: &[u8] = bytes.as_ref();
    slice.try_into().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_held_key_file_refuses_a_second_node_until_it_is_let_go() {
        let dir = std::env::temp_dir().join(format!("pollen-id-held-{}", std::process::id()));
        let path = dir.join("key");
        let _ = std::fs::remove_file(&path);
        let (a, held) = load_and_hold(&path).unwrap();
        let err = load_and_hold(&path).unwrap_err();
        assert!(matches!(err, IdentityError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("--identity"), "{err}");
        // Reading the key, as a status or mesh command does, still works.
        assert_eq!(load_or_create(&path).unwrap().public(), a.public());
        drop(held);
        let (b, _held) = load_and_hold(&path).unwrap();
        assert_eq!(a.public(), b.public());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn same_file_same_peer_id_and_private_mode() {
        let dir = std::env::temp_dir().join(format!("pollen-id-{}", std::process::id()));
        let path = dir.join("key");
        let _ = std::fs::remove_file(&path);
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            // Open to other users (as a copy under a 022 umask is): refused, saying how
            // to mend it; private again, the same key.
            for open in [0o644, 0o640, 0o606] {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open)).unwrap();
                let err = load_or_create(&path).err().unwrap();
                assert!(matches!(err, IdentityError::Exposed { mode, .. } if mode == open));
                assert!(err.to_string().contains("chmod 600"), "{err}");
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
            assert_eq!(load_or_create(&path).unwrap().public(), a.public());
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(&path, b"garbage").unwrap();
        let err = load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("not a Pollen identity key"), "{err}");
        ed25519_secret(&a).unwrap();
    }
}
