//! Signed announcements through the public API: peer ids and signatures agree with
//! libp2p's, tampering and foreign keys are refused, timestamps are checked against the
//! freshness policy, and the replay guard refuses older and equal announcements within a
//! bounded memory.

#![allow(clippy::unwrap_used)]

use ed25519_dalek::{Signer, SigningKey};
use pollen_protocol::{
    AnnounceError, Announcement, BlockRange, FreshnessPolicy, ModelId, PeerIdBytes, ReplayGuard,
    SignedAnnouncement, peer_id_bytes_for_ed25519,
};

const NOW: u64 = 1_700_000_000_000;

fn secret(n: u8) -> [u8; 32] {
    [n; 32]
}

fn peer_of(secret: &[u8; 32]) -> PeerIdBytes {
    peer_id_bytes_for_ed25519(&SigningKey::from_bytes(secret).verifying_key().to_bytes())
}

fn announcement(secret: &[u8; 32]) -> Announcement {
    Announcement {
        peer: peer_of(secret),
        model_id: ModelId::from_bytes([3; 32]),
        model_name: "SmolLM2-135M-Instruct".into(),
        num_blocks: 30,
        blocks: BlockRange::new(0, 15).unwrap(),
        throughput: 42.5,
        free_sessions: 8,
        free_cache_tokens: 16_384,
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        compute: "fast-vnni".into(),
        next_rtts: vec![],
        issued_at_ms: NOW,
        expires_at_ms: NOW + 120_000,
        seq: 1,
    }
}

fn policy() -> FreshnessPolicy {
    FreshnessPolicy::default()
}

#[test]
fn peer_id_matches_libp2p() {
    for n in [0u8, 1, 7, 255] {
        let mut secret = [n; 32];
        secret[0] = n.wrapping_add(1);
        let ours = peer_of(&secret);
        let kp = libp2p_identity::Keypair::ed25519_from_bytes(secret).unwrap();
        assert_eq!(ours.0, kp.public().to_peer_id().to_bytes());
        // libp2p's signature over our signing bytes is ours (ed25519 is deterministic).
        let a = Announcement {
            peer: ours,
            ..announcement(&secret)
        };
        let signed = SignedAnnouncement::sign(a.clone(), &secret).unwrap();
        assert_eq!(
            kp.sign(&a.signing_bytes()).unwrap(),
            signed.signature.to_vec()
        );
        assert!(kp.public().verify(&a.signing_bytes(), &signed.signature));
    }
}

#[test]
fn sign_and_verify() {
    let s = secret(1);
    let signed = SignedAnnouncement::sign(announcement(&s), &s).unwrap();
    let v = signed.verify(NOW + 1000, &policy()).unwrap();
    assert_eq!(v.blocks, BlockRange::new(0, 15).unwrap());
    assert_eq!(v.signed(), &signed);
}

#[test]
fn signing_with_another_key_fails() {
    let a = announcement(&secret(1));
    let err = SignedAnnouncement::sign(a, &secret(2)).unwrap_err();
    assert!(
        matches!(err, AnnounceError::WrongSigningKey { .. }),
        "{err}"
    );
}

#[test]
fn tampered_fields_break_the_signature() {
    let s = secret(1);
    let signed = SignedAnnouncement::sign(announcement(&s), &s).unwrap();
    let tamper: Vec<fn(&mut Announcement)> = vec![
        |a| a.blocks = BlockRange::new(0, 30).unwrap(),
        |a| a.throughput = 1000.0,
        |a| a.free_sessions += 1,
        |a| a.addrs.push("/ip4/6.6.6.6/tcp/1".into()),
        |a| a.model_name.push('!'),
        |a| a.seq += 1,
        |a| a.expires_at_ms += 1,
        |a| a.model_id = ModelId::from_bytes([4; 32]),
    ];
    for t in tamper {
        let mut bad = signed.clone();
        t(&mut bad.announcement);
        let err = bad.verify(NOW, &policy()).unwrap_err();
        assert!(matches!(err, AnnounceError::BadSignature { .. }), "{err}");
    }
    let mut bad = signed.clone();
    bad.signature[10] ^= 1;
    assert!(matches!(
        bad.verify(NOW, &policy()),
        Err(AnnounceError::BadSignature { .. })
    ));
}

#[test]
fn key_of_another_peer_is_refused() {
    let s = secret(1);
    let mut signed = SignedAnnouncement::sign(announcement(&s), &s).unwrap();
    // Re-signed by another key, but still claiming the first peer.
    let other = SigningKey::from_bytes(&secret(2));
    signed.public_key = other.verifying_key().to_bytes();
    signed.signature = other.sign(&signed.announcement.signing_bytes()).to_bytes();
    let err = signed.verify(NOW, &policy()).unwrap_err();
    assert!(matches!(err, AnnounceError::PeerIdMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("announcement claims peer 00240801")
    );
}

#[test]
fn timestamps_are_checked() {
    let s = secret(1);
    let p = policy();
    let signed = |f: fn(&mut Announcement)| {
        let mut a = announcement(&s);
        f(&mut a);
        SignedAnnouncement::sign(a, &s).unwrap()
    };
    let ok = signed(|_| {});
    assert!(matches!(
        ok.verify(NOW + 120_000 + p.max_clock_skew_ms, &p),
        Err(AnnounceError::Expired { .. })
    ));
    assert!(
        ok.verify(NOW + 120_000 + p.max_clock_skew_ms - 1, &p)
            .is_ok()
    );
    let err = ok.verify(NOW - p.max_clock_skew_ms - 5, &p).unwrap_err();
    assert!(
        matches!(err, AnnounceError::FromTheFuture { ahead_ms, .. } if ahead_ms == p.max_clock_skew_ms + 5),
        "{err}"
    );
    assert!(ok.verify(NOW - p.max_clock_skew_ms, &p).is_ok());
    let long = signed(|a| a.expires_at_ms = a.issued_at_ms + 11 * 60 * 1000);
    assert!(matches!(
        long.verify(NOW, &p),
        Err(AnnounceError::TtlTooLong { .. })
    ));
    let backwards = signed(|a| a.expires_at_ms = a.issued_at_ms);
    assert!(matches!(
        backwards.verify(NOW, &p),
        Err(AnnounceError::BadLifetime { .. })
    ));
    let extreme = signed(|a| {
        a.issued_at_ms = u64::MAX - 1;
        a.expires_at_ms = u64::MAX;
    });
    assert!(matches!(
        extreme.verify(NOW, &p),
        Err(AnnounceError::FromTheFuture { .. })
    ));
    assert!(matches!(
        ok.verify(u64::MAX, &p),
        Err(AnnounceError::Expired { .. })
    ));
}

#[test]
fn bad_fields_are_refused() {
    let s = secret(1);
    let mut a = announcement(&s);
    a.blocks = BlockRange::new(20, 31).unwrap();
    let err = SignedAnnouncement::sign(a, &s).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid announcement: block range [20, 31) lies outside a model of 30 blocks"
    );
    let mut a = announcement(&s);
    a.throughput = f32::NAN;
    assert!(SignedAnnouncement::sign(a, &s).is_err());
}

#[test]
fn replay_guard_refuses_older_and_equal() {
    let s = secret(1);
    let p = policy();
    let at = |issued: u64, seq: u64| {
        let mut a = announcement(&s);
        a.issued_at_ms = issued;
        a.expires_at_ms = issued + 60_000;
        a.seq = seq;
        SignedAnnouncement::sign(a, &s)
            .unwrap()
            .verify(NOW, &p)
            .unwrap()
    };
    let mut g = ReplayGuard::new(16);
    g.check(&at(NOW, 5)).unwrap();
    assert!(matches!(
        g.check(&at(NOW, 5)),
        Err(AnnounceError::Duplicate { .. })
    ));
    assert!(matches!(
        g.check(&at(NOW, 4)),
        Err(AnnounceError::Stale { .. })
    ));
    let err = g.check(&at(NOW - 1, 9)).unwrap_err();
    assert!(err.to_string().contains("stale announcement"), "{err}");
    g.check(&at(NOW, 6)).unwrap();
    g.check(&at(NOW + 1, 0)).unwrap();
    assert!(matches!(
        g.check(&at(NOW, 7)),
        Err(AnnounceError::Stale { .. })
    ));
    // Another model of the same peer is tracked separately.
    let mut a = announcement(&s);
    a.model_id = ModelId::from_bytes([9; 32]);
    let other = SignedAnnouncement::sign(a, &s)
        .unwrap()
        .verify(NOW, &p)
        .unwrap();
    g.check(&other).unwrap();
    assert_eq!(g.len(), 2);
    g.prune(NOW + 10 * 60_000);
    assert!(g.is_empty());
}

#[test]
fn admitting_does_not_record_only_recording_does() {
    let s = secret(2);
    let at = |seq: u64| {
        let mut a = announcement(&s);
        a.issued_at_ms = NOW;
        a.expires_at_ms = NOW + 60_000;
        a.seq = seq;
        SignedAnnouncement::sign(a, &s)
            .unwrap()
            .verify(NOW, &policy())
            .unwrap()
    };
    let mut g = ReplayGuard::new(16);
    // Admitted but then refused for another reason: not recorded, so it may come again.
    g.admit(&at(3)).unwrap();
    g.admit(&at(3)).unwrap();
    assert!(g.is_empty());
    g.record(&at(3));
    assert!(matches!(
        g.admit(&at(3)),
        Err(AnnounceError::Duplicate { .. })
    ));
    // Recording an older one never moves the guard back.
    g.record(&at(1));
    assert!(matches!(g.admit(&at(2)), Err(AnnounceError::Stale { .. })));
    g.admit(&at(4)).unwrap();
}

#[test]
fn replay_guard_is_bounded() {
    let p = policy();
    let mut g = ReplayGuard::new(4);
    for n in 0..20u8 {
        let s = secret(n);
        let mut a = announcement(&s);
        a.expires_at_ms = NOW + 1000 + u64::from(n);
        let v = SignedAnnouncement::sign(a, &s)
            .unwrap()
            .verify(NOW, &p)
            .unwrap();
        g.check(&v).unwrap();
        assert!(g.len() <= 4);
    }
}
