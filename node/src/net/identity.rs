//! The node's persistent ed25519 identity: one key file, created on first run
//! with mode 0600, giving the same peer id after every restart.

use anyhow::{Context, Result, bail};
use libp2p::identity::Keypair;
use std::io::Write;
use std::path::Path;

/// Loads the key in `path`, or creates it (and its folder) if absent.
pub fn load_or_create(path: &Path) -> Result<Keypair> {
    if path.exists() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let key = Keypair::from_protobuf_encoding(&bytes)
            .with_context(|| format!("{} is not a Pollen identity key", path.display()))?;
        if key.clone().try_into_ed25519().is_err() {
            bail!("{} holds a key that is not ed25519", path.display());
        }
        return Ok(key);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().context("encoding the new key")?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// The 32-byte ed25519 secret of a key, which signs announcements.
pub fn ed25519_secret(key: &Keypair) -> Result<[u8; 32]> {
    let kp = key
        .clone()
        .try_into_ed25519()
        .map_err(|_| anyhow::anyhow!("the identity key is not ed25519"))?;
    let bytes = kp.secret();
    let slice: &[u8] = bytes.as_ref();
    slice
        .try_into()
        .map_err(|_| anyhow::anyhow!("ed25519 secret of unexpected length"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        }
        std::fs::write(&path, b"garbage").unwrap();
        let err = load_or_create(&path).err().unwrap().to_string();
        assert!(err.contains("not a Pollen identity key"), "{err}");
        ed25519_secret(&a).unwrap();
    }
}
