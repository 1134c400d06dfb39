//! Property tests of the frame codec: every message round-trips, `encoded_len` is exact,
//! and arbitrary and mutated bytes never panic. Hand-built hostile frames are in
//! `hostile.rs`, pinned frames in `golden.rs`.

#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use pollen_protocol::limits::{MAX_ADDRS, MAX_AGENT_LEN, MAX_FRAME_BYTES, MAX_PEER_RTTS};
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, Announcement, BlockRange, CodecError, ErrorCode, Hello,
    HelloReply, HiddenError, HiddenStates, InferRequest, InferResponse, ModelId, PeerIdBytes,
    PeerRtt, ProtocolError, Roles, RouteHop, SessionBudget, SessionId, SignedAnnouncement,
    WireDType, WireMessage, decode_body, decode_frame, encode_frame, encoded_len, read_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Round-trip cases per message type.
const ROUND_TRIP_CASES: u32 = 128;
/// Random-bytes cases per message type.
const FUZZ_CASES: u32 = 512;

// ---- Strategies ----

fn model_id() -> impl Strategy<Value = ModelId> {
    any::<[u8; 32]>().prop_map(ModelId::from_bytes)
}

fn peer() -> impl Strategy<Value = PeerIdBytes> {
    vec(any::<u8>(), 1..=64).prop_map(PeerIdBytes)
}

fn text(max_chars: usize) -> impl Strategy<Value = String> {
    // Any Unicode, including multi-byte characters; at most 4 bytes per char.
    proptest::string::string_regex(&format!(".{{0,{max_chars}}}")).unwrap()
}

fn addrs() -> impl Strategy<Value = Vec<String>> {
    vec(text(60), 0..=MAX_ADDRS)
}

fn dtype() -> impl Strategy<Value = WireDType> {
    prop_oneof![
        Just(WireDType::F32),
        Just(WireDType::F16),
        Just(WireDType::BF16)
    ]
}

fn hidden() -> impl Strategy<Value = HiddenStates> {
    (dtype(), vec(1u32..=6, 1..=4)).prop_flat_map(|(dtype, shape)| {
        let len = HiddenStates::byte_len_for(dtype, &shape).unwrap();
        vec(any::<u8>(), len)
            .prop_map(move |data| HiddenStates::new(dtype, shape.clone(), data).unwrap())
    })
}

fn protocol_error() -> impl Strategy<Value = ProtocolError> {
    (proptest::sample::select(ErrorCode::ALL.to_vec()), text(200))
        .prop_map(|(code, message)| ProtocolError::new(code, message))
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u32>(),
        proptest::option::of(model_id()),
        any::<u8>(),
        text(MAX_AGENT_LEN / 4),
    )
        .prop_map(|(version, model_id, roles, agent)| Hello {
            version,
            model_id,
            roles: Roles::from_bits(roles),
            agent,
        })
}

fn hello_reply() -> impl Strategy<Value = HelloReply> {
    prop_oneof![
        hello().prop_map(HelloReply::Accept),
        protocol_error().prop_map(HelloReply::Refuse),
    ]
}

fn session() -> impl Strategy<Value = SessionId> {
    any::<u64>().prop_map(SessionId)
}

fn route() -> impl Strategy<Value = Vec<RouteHop>> {
    (0u32..100, vec((peer(), 1u32..20, addrs()), 1..=6)).prop_map(|(first, hops)| {
        let mut start = first;
        hops.into_iter()
            .map(|(peer, len, addrs)| {
                let blocks = BlockRange::new(start, start + len).unwrap();
                start += len;
                RouteHop {
                    peer,
                    blocks,
                    addrs,
                    step_us: 20_000,
                }
            })
            .collect()
    })
}

fn budget() -> impl Strategy<Value = SessionBudget> {
    (
        1u32..,
        1u32..=(MAX_FRAME_BYTES as u32),
        1u32..=600_000,
        1u32..=80_000,
    )
        .prop_map(
            |(max_tokens, max_message_bytes, idle_timeout_ms, open_within_ms)| SessionBudget {
                max_tokens,
                max_message_bytes,
                idle_timeout_ms,
                open_within_ms,
            },
        )
}

fn infer_request() -> impl Strategy<Value = InferRequest> {
    prop_oneof![
        (
            session(),
            model_id(),
            route(),
            any::<u32>(),
            budget(),
            dtype(),
            ("[a-z0-9_-]{0,32}", peer()),
        )
            .prop_map(
                |(session, model_id, route, hop, budget, wire_dtype, (compute, client))| {
                    let hop = hop % route.len() as u32;
                    InferRequest::Open {
                        session,
                        model_id,
                        route,
                        hop,
                        budget,
                        wire_dtype,
                        compute,
                        client,
                    }
                }
            ),
        (
            session(),
            any::<u32>(),
            any::<u64>(),
            hidden(),
            any::<bool>()
        )
            .prop_map(|(session, position, step, hidden, last_row_only)| {
                InferRequest::Forward {
                    session,
                    position,
                    step,
                    hidden,
                    last_row_only,
                }
            }),
        session().prop_map(|session| InferRequest::Close { session }),
        session().prop_map(|session| InferRequest::Attach { session }),
    ]
}

fn infer_response() -> impl Strategy<Value = InferResponse> {
    prop_oneof![
        (session(), any::<u32>()).prop_map(|(session, free_tokens)| InferResponse::Opened {
            session,
            free_tokens
        }),
        (session(), any::<u64>(), any::<u32>(), hidden()).prop_map(
            |(session, step, position, hidden)| InferResponse::Output {
                session,
                step,
                position,
                hidden,
            }
        ),
        session().prop_map(|session| InferResponse::Closed { session }),
        protocol_error().prop_map(InferResponse::Error),
        (session(), any::<u64>()).prop_map(|(session, step)| InferResponse::Ack { session, step }),
        (
            session(),
            any::<u64>(),
            any::<u32>(),
            peer(),
            protocol_error(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(session, step, hop, peer, error, by, a, b)| {
                let mut signature = [0; 64];
                signature[..32].copy_from_slice(&a);
                signature[32..].copy_from_slice(&b);
                InferResponse::HopFailed {
                    session,
                    step,
                    hop,
                    peer,
                    error,
                    by,
                    signature,
                }
            }),
        session().prop_map(|session| InferResponse::Attached { session }),
    ]
}

fn announcement() -> impl Strategy<Value = Announcement> {
    (
        (peer(), model_id(), text(60), 0u32..200, 1u32..50, 0u32..10),
        (0.0f32..1e6, any::<u32>(), any::<u32>(), addrs()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        (
            "[a-z0-9_-]{0,32}",
            proptest::collection::vec(
                (peer(), any::<u32>()).prop_map(|(peer, rtt_us)| PeerRtt { peer, rtt_us }),
                0..=MAX_PEER_RTTS,
            ),
        ),
    )
        .prop_map(
            |(
                (peer, model_id, model_name, start, len, extra),
                (throughput, free_sessions, free_cache_tokens, addrs),
                (issued_at_ms, expires_at_ms, seq),
                (compute, next_rtts),
            )| Announcement {
                peer,
                model_id,
                model_name,
                num_blocks: start + len + extra,
                blocks: BlockRange::new(start, start + len).unwrap(),
                throughput,
                free_sessions,
                free_cache_tokens,
                addrs,
                compute,
                next_rtts,
                issued_at_ms,
                expires_at_ms,
                seq,
            },
        )
}

fn signed_announcement() -> impl Strategy<Value = SignedAnnouncement> {
    // The codec does not verify signatures; random keys and signatures must round-trip.
    (announcement(), any::<[u8; 32]>(), vec(any::<u8>(), 64)).prop_map(
        |(announcement, public_key, sig)| SignedAnnouncement {
            announcement,
            public_key,
            signature: sig.try_into().unwrap(),
        },
    )
}

fn announce_response() -> impl Strategy<Value = AnnounceResponse> {
    prop_oneof![
        signed_announcement().prop_map(|a| AnnounceResponse::Announcement(Box::new(a))),
        Just(AnnounceResponse::NotServing),
        Just(AnnounceResponse::Accepted),
        prop::collection::vec(signed_announcement(), 0..3).prop_map(AnnounceResponse::List),
    ]
}

// ---- Round trips ----

fn round_trip<M: WireMessage + PartialEq + std::fmt::Debug>(msg: &M) {
    let frame = encode_frame(msg).unwrap();
    assert_eq!(encoded_len(msg), frame.len(), "encoded_len of {msg:?}");
    let prefix = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(prefix, frame.len() - 4);
    assert_eq!(&decode_frame::<M>(&frame).unwrap(), msg);
    assert_eq!(&decode_body::<M>(&frame[4..]).unwrap(), msg);
    assert_eq!(
        &read_frame::<M, _>(Cursor::new(&frame), usize::MAX).unwrap(),
        msg
    );
    // One byte too many after the frame, or inside the body, is an error.
    let mut longer = frame.clone();
    longer.push(0);
    assert!(matches!(
        decode_frame::<M>(&longer),
        Err(CodecError::TrailingBytes { extra: 1, .. })
    ));
    let body_len = u32::try_from(longer.len() - 4).unwrap();
    longer[..4].copy_from_slice(&body_len.to_le_bytes());
    assert!(matches!(
        decode_frame::<M>(&longer),
        Err(CodecError::TrailingBytes { extra: 1, .. })
    ));
    // Every proper prefix of the frame is an error, never a panic.
    for cut in [0, 1, 3, 4, frame.len() / 2, frame.len() - 1] {
        assert!(decode_frame::<M>(&frame[..cut]).is_err());
        assert!(read_frame::<M, _>(Cursor::new(&frame[..cut]), usize::MAX).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(ROUND_TRIP_CASES))]

    #[test]
    fn hello_round_trips(m in hello()) { round_trip(&m) }

    #[test]
    fn hello_reply_round_trips(m in hello_reply()) { round_trip(&m) }

    #[test]
    fn infer_request_round_trips(m in infer_request()) { round_trip(&m) }

    #[test]
    fn infer_response_round_trips(m in infer_response()) { round_trip(&m) }

    #[test]
    fn signed_announcement_round_trips(m in signed_announcement()) { round_trip(&m) }

    #[test]
    fn announce_request_round_trips(model_id in model_id()) {
        round_trip(&AnnounceRequest::Get { model_id })
    }

    #[test]
    fn announce_response_round_trips(m in announce_response()) { round_trip(&m) }

    #[test]
    fn hidden_states_reject_mismatched_lengths(
        dtype in dtype(),
        shape in vec(1u32..=8, 1..=4),
        delta in -3i64..=3,
    ) {
        let expected = HiddenStates::byte_len_for(dtype, &shape).unwrap();
        let len = (expected as i64 + delta).max(0) as usize;
        let result = HiddenStates::new(dtype, shape.clone(), vec![0; len]);
        if len == expected {
            prop_assert!(result.is_ok());
        } else {
            let is_length_mismatch = matches!(result, Err(HiddenError::LengthMismatch { .. }));
            prop_assert!(is_length_mismatch);
        }
    }

    #[test]
    fn f32_conversion_round_trips(values in vec(any::<f32>().prop_filter("not NaN", |v| !v.is_nan()), 1..64)) {
        let n = values.len() as u32;
        let h = HiddenStates::from_f32(&values, vec![1, n], WireDType::F32).unwrap();
        prop_assert_eq!(h.to_f32(), values);
    }
}

// ---- Random and mutated bytes ----

/// Decodes `bytes` as every message type, through every entry point; only checks that
/// nothing panics.
fn decode_all(bytes: &[u8]) {
    fn one<M: WireMessage>(bytes: &[u8]) {
        let _ = decode_frame::<M>(bytes);
        let _ = decode_body::<M>(bytes);
        let _ = read_frame::<M, _>(Cursor::new(bytes), usize::MAX);
    }
    one::<Hello>(bytes);
    one::<HelloReply>(bytes);
    one::<InferRequest>(bytes);
    one::<InferResponse>(bytes);
    one::<SignedAnnouncement>(bytes);
    one::<AnnounceRequest>(bytes);
    one::<AnnounceResponse>(bytes);
}

/// Puts a correct length prefix in front of `body`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(FUZZ_CASES))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
        decode_all(&framed(&bytes));
    }

    #[test]
    fn mutated_frames_never_panic(
        m in infer_request(),
        flips in vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mut frame = encode_frame(&m).unwrap();
        for (at, byte) in flips {
            // Keep the prefix intact so the body decoder sees the mutation.
            let i = 4 + at % (frame.len() - 4);
            frame[i] = byte;
        }
        decode_all(&frame);
    }

    #[test]
    fn mutated_announcements_never_panic(
        m in signed_announcement(),
        flips in vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mut frame = encode_frame(&AnnounceResponse::Announcement(Box::new(m))).unwrap();
        for (at, byte) in flips {
            let i = 4 + at % (frame.len() - 4);
            frame[i] = byte;
        }
        decode_all(&frame);
    }
}
