//! `pollen mesh`: create a private mesh's swarm key, admit peers, rotate the key.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use pollen_node::net::private::{self, SwarmKey};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `pollen mesh ...`
#[derive(Args, Debug)]
pub(crate) struct MeshArgs {
    #[command(subcommand)]
    command: MeshCommand,
}

#[derive(Subcommand, Debug)]
enum MeshCommand {
    /// Create a swarm key (256 bits, `/key/swarm/psk/1.0.0/` format, mode 0600) and
    /// print the lines with which members run a bootstrap, serve, generate and check status.
    Init(InitArgs),
    /// Add a peer id to the allowlist file given with --allow-peers (created if absent).
    /// Running nodes pick the change up within seconds, or at once on SIGHUP.
    AddPeer(AddPeerArgs),
    /// Replace the swarm key in --swarm-key FILE with a new one; the old key moves to
    /// FILE.previous and is still accepted for the overlap, so members can move over
    /// without downtime.
    Rotate(RotateArgs),
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Folder for the key file `swarm.key` (created if absent; an existing key is never overwritten).
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct AddPeerArgs {
    /// The peer id to admit (as `pollen serve` prints it). Or give --identity.
    peer: Option<String>,
    /// Admit the peer of this identity key file instead (e.g. this machine's
    /// $POLLEN_CACHE_DIR/identity.key, created if absent).
    #[arg(long, conflicts_with = "peer")]
    identity: Option<PathBuf>,
    /// A comment written after the peer id (who it is).
    #[arg(long)]
    note: Option<String>,
}

#[derive(Args, Debug)]
struct RotateArgs {
    /// How long the old key stays accepted, e.g. 90m, 24h, 7d (plain numbers are seconds).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    overlap: Duration,
    /// Rotate even while the previous rotation's overlap runs: the key before the
    /// current one is then refused at once, also by members that still dial with it.
    #[arg(long)]
    force: bool,
}

/// Parses `90`, `90s`, `30m`, `24h` or `7d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?}: expected a number with s, m, h or d"))?;
    // Longer would keep a retired key for good.
    const MAX: u64 = 365 * 86_400;
    if secs > MAX {
        return Err(format!("{s:?}: at most 365d"));
    }
    Ok(Duration::from_secs(secs))
}

/// Runs `pollen mesh`; `mesh` holds the global `--swarm-key` and `--allow-peers`
/// (the files `rotate` and `add-peer` change).
pub(crate) fn run(args: MeshArgs, mesh: &private::MeshArgs) -> Result<()> {
    match args.command {
        MeshCommand::Init(a) => init(&a.out),
        MeshCommand::AddPeer(a) => {
            let Some(allow) = &mesh.allow_peers else {
                bail!("give the allowlist file to add to with --allow-peers FILE");
            };
            add_peer(a, allow)
        }
        MeshCommand::Rotate(a) => {
            let Some(key) = &mesh.swarm_key else {
                bail!(
                    "give the key file to rotate with --swarm-key FILE (or {})",
                    private::SWARM_KEY_ENV
                );
            };
            rotate(key, a.overlap, a.force)
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn init(out: &Path) -> Result<()> {
    let path = absolute(&out.join("swarm.key"));
    let key = SwarmKey::generate();
    private::write_new_key(&path, &key)?;
    let k = shell_quote(&path);
    let allow = shell_quote(&absolute(&out.join("allow-peers.txt")));
    println!("created swarm key {}", path.display());
    println!("fingerprint {} (mode 0600)", key.fingerprint());
    println!();
    println!("Give this file only to members, over a private channel. Anyone who holds it");
    println!("can join the mesh. Then each member runs (BOOTSTRAP is the address the");
    println!("bootstrap prints on its first line):");
    println!();
    println!("bootstrap: pollen-bootstrap --swarm-key {k} --listen /ip4/0.0.0.0/tcp/4001");
    println!("serve:     pollen serve --swarm-key {k} --bootstrap BOOTSTRAP --blocks 0:30");
    println!("generate:  pollen generate --swarm-key {k} --bootstrap BOOTSTRAP --prompt \"Hello\"");
    println!("status:    pollen status --swarm-key {k} --bootstrap BOOTSTRAP");
    println!();
    println!(
        "(or export {}={k} instead of --swarm-key)",
        private::SWARM_KEY_ENV
    );
    println!("To admit only listed machines as well, add each one's peer id with");
    println!("  pollen mesh add-peer --allow-peers {allow} PEER_ID");
    println!("and add --allow-peers {allow} to the lines above.");
    Ok(())
}

fn add_peer(a: AddPeerArgs, allow: &Path) -> Result<()> {
    let peer: libp2p::PeerId = match (&a.peer, &a.identity) {
        (Some(p), _) => p
            .parse()
            .map_err(|e| anyhow::anyhow!("{p:?} is not a peer id: {e}"))?,
        (None, Some(id)) => pollen_node::net::identity::load_or_create(id)
            .with_context(|| format!("reading identity {}", id.display()))?
            .public()
            .to_peer_id(),
        (None, None) => bail!("give the peer id to admit, or --identity KEYFILE"),
    };
    if private::add_peer(allow, &peer, a.note.as_deref())? {
        println!("added {peer} to {}", allow.display());
        println!(
            "running nodes with --allow-peers on this file admit it within seconds (or at once on SIGHUP)"
        );
    } else {
        println!("{peer} is already in {}", allow.display());
    }
    Ok(())
}

fn rotate(path: &Path, overlap: Duration, force: bool) -> Result<()> {
    let keys = private::rotate(path, overlap, force)?;
    let prev = private::previous_path(path);
    println!("new swarm key in {}", path.display());
    println!("fingerprint {}", keys.current.fingerprint());
    if let Some((old, until)) = keys.previous {
        println!(
            "old key {} kept in {}, accepted for {} more seconds (until unix time {until})",
            old.fingerprint(),
            prev.display(),
            overlap.as_secs()
        );
    }
    println!();
    println!("Copy both files to every member before the overlap ends. Running nodes re-read");
    println!("them within seconds: during the overlap they accept both keys and dial with the");
    println!("old one; after it, only the new key connects.");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(
            parse_duration("365d").unwrap(),
            Duration::from_secs(365 * 86_400)
        );
        assert!(parse_duration("366d").unwrap_err().contains("at most 365d"));
        assert!(parse_duration("200000000000000d").is_err());
    }
}
