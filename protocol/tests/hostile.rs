//! Hand-built hostile frames: length claims of 2^32 − 1 and 2^64 − 1 fail fast with a clear
//! error, shapes that disagree with their bytes, unknown codes and tags, invalid messages
//! refused on both ends, a future hello with extensions, and the exact size boundaries. The
//! property tests of the codec are in `codec.rs`.

#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use pollen_protocol::limits::{
    MAX_AGENT_LEN, MAX_COMPUTE_LEN, MAX_FRAME_BYTES, MAX_HELLO_BYTES, MAX_HIDDEN_BYTES,
};
use pollen_protocol::{
    AnnounceResponse, BlockRange, CodecError, ErrorCode, FRAME_HEADER_BYTES, Hello, HelloReply,
    HiddenError, HiddenStates, InferRequest, InferResponse, MessageError, ModelId,
    PROTOCOL_VERSION, PeerIdBytes, Roles, RouteHop, SessionBudget, SessionId, WireDType,
    WireMessage, check_frame_len, decode_frame, encode_frame, encoded_len, read_frame,
};

/// Puts a correct length prefix in front of `body`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// bincode's varint encoding of `n` (standard config).
fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [&[251u8][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &n.to_le_bytes()].concat(),
    }
}

const HUGE: [u64; 3] = [u32::MAX as u64, u64::MAX, MAX_FRAME_BYTES as u64 + 1];

fn expect_malformed<M: WireMessage + std::fmt::Debug>(body: &[u8], needle: &str) {
    let err = decode_frame::<M>(&framed(body)).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, CodecError::Malformed { .. }),
        "expected Malformed for {}, got {err:?}",
        M::NAME
    );
    assert!(
        text.contains(needle),
        "{text:?} does not mention {needle:?}"
    );
}

#[test]
fn length_prefix_of_u32_max_is_refused_before_reading() {
    let frame = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    for max in [MAX_FRAME_BYTES, MAX_HELLO_BYTES] {
        assert!(matches!(
            check_frame_len(u32::MAX, max),
            Err(CodecError::FrameTooLarge { len, .. }) if len == u32::MAX as u64
        ));
    }
    let err = decode_frame::<InferRequest>(&frame).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("frame body of 4294967295 bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")
    );
    // read_frame refuses after the prefix and reads nothing more.
    let mut cursor = Cursor::new(frame.to_vec());
    assert!(matches!(
        read_frame::<Hello, _>(&mut cursor, usize::MAX),
        Err(CodecError::FrameTooLarge { .. })
    ));
    assert_eq!(cursor.position(), 4);
    // A hello frame of 4 KiB + 1 is refused even though an infer frame of that size is fine.
    let len = (MAX_HELLO_BYTES as u32 + 1).to_le_bytes();
    assert!(matches!(
        decode_frame::<Hello>(&len),
        Err(CodecError::FrameTooLarge { .. })
    ));
    assert!(matches!(
        decode_frame::<InferRequest>(&len),
        Err(CodecError::Truncated { .. })
    ));
    // The caller's own cap (a session budget) applies too.
    let small = encode_frame(&InferRequest::Close {
        session: SessionId(1),
    })
    .unwrap();
    assert_eq!(small.len(), 4 + 9);
    assert!(read_frame::<InferRequest, _>(Cursor::new(&small), 9).is_ok());
    assert!(matches!(
        read_frame::<InferRequest, _>(Cursor::new(&small), 8),
        Err(CodecError::FrameTooLarge { .. })
    ));
}

#[test]
fn huge_claimed_lengths_inside_bodies_fail_fast() {
    for n in HUGE {
        // Hello: agent length.
        let mut body = vec![1, 0, 0];
        body.extend(varint(n));
        expect_malformed::<Hello>(&body, "agent claims length");

        // Hello: extensions length.
        let mut body = vec![1, 0, 0, 0];
        body.extend(varint(n));
        expect_malformed::<Hello>(&body, "hello extensions claims length");

        // Forward: shape length.
        let mut body = vec![1];
        body.extend([0; 8]); // session
        body.extend([0, 0]); // position, step
        body.push(0); // f32
        body.extend(varint(n));
        expect_malformed::<InferRequest>(&body, "hidden states shape claims length");

        // Forward: data length (shape [1, 1, 576] needs 2304 bytes).
        let mut body = vec![1];
        body.extend([0; 8]);
        body.extend([0, 0, 0, 3, 1, 1]);
        body.extend(varint(576));
        body.extend(varint(n));
        expect_malformed::<InferRequest>(&body, "hidden states claim");

        // Open: route length.
        let mut body = vec![0];
        body.extend([0; 8]);
        body.extend([7; 32]);
        body.extend(varint(n));
        expect_malformed::<InferRequest>(&body, "route claims length");

        // Open: one hop's peer id length, then its address count.
        let mut body = vec![0];
        body.extend([0; 8]);
        body.extend([7; 32]);
        body.push(1);
        let mut peer = body.clone();
        peer.extend(varint(n));
        expect_malformed::<InferRequest>(&peer, "peer id claims length");
        body.extend([1, 9, 0, 1]); // peer [9], blocks [0, 1)
        body.extend(varint(n));
        expect_malformed::<InferRequest>(&body, "address list claims length");

        // Error response: message length.
        let mut body = vec![3, 7];
        body.extend(varint(n));
        expect_malformed::<InferResponse>(&body, "error message claims length");

        // Announcement: model name length.
        let mut body = vec![0, 1, 9];
        body.extend([7; 32]);
        body.extend(varint(n));
        expect_malformed::<AnnounceResponse>(&body, "model name claims length");
    }
}

#[test]
fn hidden_shape_that_disagrees_with_its_bytes_is_refused() {
    let h = HiddenStates::from_f32(&[0.5; 576], vec![1, 1, 576], WireDType::F32).unwrap();
    let frame = encode_frame(&InferResponse::Output {
        session: SessionId(1),
        step: 0,
        position: 0,
        hidden: h,
    })
    .unwrap();
    // Declare 2 tokens instead of 1: the shape now needs 4608 bytes, the blob says 2304.
    let shape_at = frame.windows(4).position(|w| w == [3, 1, 1, 251]).unwrap();
    let mut bad = frame.clone();
    bad[shape_at + 2] = 2;
    let err = decode_frame::<InferResponse>(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed infer response: hidden states claim 2304 bytes but shape [1, 2, 576] of f32 needs 4608"
    );
    // A zero dimension or five dimensions are refused too.
    let mut zero = frame.clone();
    zero[shape_at + 1] = 0;
    assert!(
        decode_frame::<InferResponse>(&zero)
            .unwrap_err()
            .to_string()
            .contains("zero dimension")
    );
    // A shape beyond the byte limit is refused before its bytes are read.
    let mut body = vec![1];
    body.extend([0; 8]);
    body.extend([0, 0, 0, 2]);
    body.extend(varint(u32::MAX as u64));
    body.extend(varint(u32::MAX as u64));
    body.extend(varint(16));
    let err = decode_frame::<InferRequest>(&framed(&body)).unwrap_err();
    assert!(err.to_string().contains("larger than the limit"), "{err}");
}

#[test]
fn unknown_codes_and_tags_are_clear_errors() {
    // InferResponse::Error with code 42.
    let err = decode_frame::<InferResponse>(&framed(&[3, 42, 0])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed infer response: unknown error code 42"
    );
    let err = decode_frame::<InferRequest>(&framed(&[9])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed infer request: unknown infer request variant tag 9"
    );
    let mut body = vec![1];
    body.extend([0; 8]);
    body.extend([0, 0, 5]);
    let err = decode_frame::<InferRequest>(&framed(&body)).unwrap_err();
    assert!(
        err.to_string().ends_with("unknown wire dtype tag 5"),
        "{err}"
    );
    let err = decode_frame::<InferRequest>(&framed(&[1, 0])).unwrap_err();
    assert!(err.to_string().contains("body ends early"), "{err}");
}

#[test]
fn invalid_messages_are_refused_on_both_ends() {
    let hop = |start, end| RouteHop {
        peer: PeerIdBytes(vec![1; 38]),
        blocks: BlockRange::new(start, end).unwrap(),
        addrs: vec![],
        step_us: 100_000,
    };
    let open = InferRequest::Open {
        session: SessionId(1),
        model_id: ModelId::from_bytes([0; 32]),
        route: vec![hop(0, 10), hop(12, 30)],
        hop: 0,
        budget: SessionBudget {
            max_tokens: 100,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 1000,
            open_within_ms: 20_000,
        },
        wire_dtype: WireDType::F32,
        compute: "exact".into(),
        client: PeerIdBytes(vec![2; 38]),
    };
    let err = encode_frame(&open).unwrap_err();
    assert!(matches!(
        err,
        CodecError::Invalid {
            source: MessageError::RouteGap { .. },
            ..
        }
    ));
    assert_eq!(err.to_protocol_error().code, ErrorCode::SpanMismatch);
    // Make the same frame by hand (from a valid one) and check the receiver refuses it too.
    let InferRequest::Open {
        session,
        model_id,
        budget,
        wire_dtype,
        compute,
        client,
        ..
    } = open.clone()
    else {
        unreachable!()
    };
    let ok = InferRequest::Open {
        session,
        model_id,
        route: vec![hop(0, 10), hop(10, 30)],
        hop: 0,
        budget,
        wire_dtype,
        compute,
        client,
    };
    let mut frame = encode_frame(&ok).unwrap();
    let at = frame.windows(3).position(|w| w == [1, 10, 30]).unwrap();
    frame[at + 1] = 12;
    assert!(matches!(
        decode_frame::<InferRequest>(&frame),
        Err(CodecError::Invalid {
            source: MessageError::RouteGap { .. },
            ..
        })
    ));

    let long_agent = Hello::new(None, Roles::CLIENT, "x".repeat(MAX_AGENT_LEN + 1));
    assert!(matches!(
        encode_frame(&long_agent),
        Err(CodecError::Invalid { .. })
    ));
}

/// A compute mode's name of `MAX_COMPUTE_LEN` bytes (the longest Pollen
/// makes is 40, with a C library's part) passes; one byte more is refused by
/// the sender and, made by hand, by the receiver.
#[test]
fn compute_names_over_the_limit_are_refused() {
    let open = |compute: String| InferRequest::Open {
        session: SessionId(1),
        model_id: ModelId::from_bytes([3; 32]),
        route: vec![RouteHop {
            peer: PeerIdBytes(vec![1; 38]),
            blocks: BlockRange::new(0, 30).unwrap(),
            addrs: vec![],
            step_us: 100_000,
        }],
        hop: 0,
        budget: SessionBudget {
            max_tokens: 64,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 1000,
            open_within_ms: 20_000,
        },
        wire_dtype: WireDType::F32,
        compute,
        client: PeerIdBytes(vec![2; 38]),
    };
    let longest = "exact/cpu-aarch64-i8mm-kc1024-libm0a1b2c";
    assert!(longest.len() <= MAX_COMPUTE_LEN);
    let at_limit = "e".repeat(MAX_COMPUTE_LEN);
    let frame = encode_frame(&open(at_limit.clone())).unwrap();
    assert!(matches!(
        decode_frame::<InferRequest>(&frame),
        Ok(InferRequest::Open { compute, .. }) if compute == at_limit
    ));
    let over = open("e".repeat(MAX_COMPUTE_LEN + 1));
    assert!(matches!(
        encode_frame(&over),
        Err(CodecError::Invalid { .. })
    ));
    // The same bytes by hand: the at-limit frame with its name one byte longer.
    let mut frame = encode_frame(&open(at_limit.clone())).unwrap();
    let at = frame
        .windows(at_limit.len())
        .position(|w| w == at_limit.as_bytes())
        .unwrap();
    assert_eq!(frame[at - 1] as usize, MAX_COMPUTE_LEN, "a one-byte length");
    frame[at - 1] += 1;
    frame.insert(at, b'e');
    let body = (frame.len() - FRAME_HEADER_BYTES) as u32;
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&body.to_le_bytes());
    let err = decode_frame::<InferRequest>(&frame).unwrap_err();
    assert!(err.to_string().contains("compute mode"), "{err}");
}

#[test]
fn a_future_hello_with_extensions_still_decodes() {
    let future = Hello {
        version: PROTOCOL_VERSION + 1,
        model_id: Some(ModelId::from_bytes([5; 32])),
        roles: Roles::from_bits(0x10) | Roles::SERVER,
        agent: "pollen/9.0".into(),
    };
    let mut frame = encode_frame(&future).unwrap();
    // This version writes empty extensions (a single 0); a later version fills them.
    assert_eq!(frame.pop(), Some(0));
    frame.extend([3, 0xaa, 0xbb, 0xcc]);
    let len = (frame.len() as u32 - 4).to_le_bytes();
    frame[..4].copy_from_slice(&len);
    let decoded = decode_frame::<Hello>(&frame).unwrap();
    assert_eq!(decoded, future);
    // ...so this version can refuse it with a clear error.
    let ours = Hello::new(
        Some(ModelId::from_bytes([5; 32])),
        Roles::SERVER,
        "pollen/0.1",
    );
    let reply = HelloReply::answer(&ours, &decoded);
    let frame = encode_frame(&reply).unwrap();
    let back = decode_frame::<HelloReply>(&frame).unwrap();
    assert_eq!(
        back.into_result(&future).unwrap_err().to_string(),
        format!(
            "version_mismatch: protocol version mismatch: we speak {PROTOCOL_VERSION}, peer speaks {}",
            PROTOCOL_VERSION + 1
        )
    );
}

#[test]
fn largest_prefill_fits_and_one_more_byte_does_not() {
    // 4096 tokens × 4096 hidden × f32 = 64 MiB: the largest hidden state accepted.
    let data = vec![0u8; MAX_HIDDEN_BYTES];
    let h = HiddenStates::new(WireDType::F32, vec![1, 4096, 4096], data).unwrap();
    let msg = InferRequest::Forward {
        session: SessionId(3),
        position: 0,
        step: 0,
        hidden: h,
        last_row_only: true,
    };
    let frame = encode_frame(&msg).unwrap();
    assert_eq!(frame.len(), encoded_len(&msg));
    assert!(frame.len() <= MAX_FRAME_BYTES + 4);
    assert_eq!(decode_frame::<InferRequest>(&frame).unwrap(), msg);
    assert!(matches!(
        HiddenStates::new(WireDType::F32, vec![1, 4097, 4096], vec![]),
        Err(HiddenError::TooLarge { .. })
    ));
}

#[test]
fn eof_is_distinguished_from_truncation() {
    assert!(matches!(
        read_frame::<Hello, _>(Cursor::new(Vec::new()), usize::MAX),
        Err(CodecError::Eof)
    ));
    assert!(matches!(
        read_frame::<Hello, _>(Cursor::new(vec![5, 0]), usize::MAX),
        Err(CodecError::Truncated {
            expected: 4,
            actual: 2
        })
    ));
    assert!(matches!(
        read_frame::<Hello, _>(Cursor::new(vec![5, 0, 0, 0, 1]), usize::MAX),
        Err(CodecError::Truncated {
            expected: 9,
            actual: 5
        })
    ));
}
