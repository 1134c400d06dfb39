//! Tests of the private mesh: key files, rotation, allowlists and pnet against libp2p's.
#![allow(clippy::unwrap_used)]
use super::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    let keys = rotate(&p, Duration::from_secs(3600), false).unwrap();
    let loaded = SwarmKeys::load(&p).unwrap();
    assert_eq!(loaded, keys);
    assert_ne!(loaded.current, old);
    let now = unix_now();
    assert_eq!(loaded.active_at(now), vec![old, loaded.current]);
    assert_eq!(loaded.active_at(now + 3601), vec![loaded.current]);
    // Again during the overlap: refused (it would retire `old` at once), unless forced.
    let e = rotate(&p, Duration::ZERO, false).unwrap_err();
    assert!(matches!(e, PrivateError::OverlapRunning { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(SwarmKeys::load(&p).unwrap(), keys, "nothing changed");
    rotate(&p, Duration::ZERO, true).unwrap();
    // An expired overlap loads as one key, and the next rotation needs no force.
    assert!(SwarmKeys::load(&p).unwrap().previous.is_none());
    rotate(&p, Duration::ZERO, false).unwrap();
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

/// A connection made with a rotation's old key during the overlap fails once the
/// overlap ends (at its next read or write a second or more after the last check):
/// a member rotated out cannot stay in by keeping its connections busy. One made with
/// the current key goes on.
#[tokio::test]
async fn a_connection_on_a_retired_key_ends_with_the_overlap() {
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (old, new) = (SwarmKey::generate(), SwarmKey::generate());
    let until = unix_now() + 2;
    let member = || {
        Arc::new(KeyRing::fixed(SwarmKeys {
            current: new,
            previous: Some((old, until)),
        }))
    };
    let rotated_out = Arc::new(KeyRing::fixed(SwarmKeys::single(old)));
    let msg: Vec<u8> = [MULTISTREAM_HEADER.as_slice(), b"ping"].concat();
    for (dialer_keys, stays) in [(rotated_out, false), (member(), true)] {
        let (a, b) = tokio::io::duplex(4096);
        let (a, b) = (a.compat(), b.compat());
        let (d, l) = tokio::join!(handshake(a, dialer_keys), handshake(b, member()));
        let (mut d, mut l) = (d.unwrap(), l.unwrap());
        let mut got = vec![0u8; msg.len()];
        d.write_all(&msg).await.unwrap();
        d.flush().await.unwrap();
        l.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
        // Past the overlap's end and a check's interval.
        while unix_now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        d.write_all(b"more").await.unwrap();
        d.flush().await.unwrap();
        let mut more = [0u8; 4];
        let read = l.read_exact(&mut more).await;
        if stays {
            read.unwrap();
            assert_eq!(&more, b"more");
        } else {
            let e = read.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains("retired"), "{e}");
        }
    }
}
