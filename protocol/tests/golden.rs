//! Golden frames: one fixed instance of every message and every variant, encoded and compared
//! byte for byte with frames pinned when the format was frozen, then decoded from the pinned
//! bytes back to the same message. The proptests in `codec.rs` prove that encoding and
//! decoding agree with each other; this file proves that they still agree with the peers
//! already deployed. A refactor of the codec must leave every pin as it is; a deliberate
//! format change bumps `PROTOCOL_VERSION` and re-pins (the failure message prints the whole
//! table in the form below).
//!
//! The fixtures reach every varint width bincode uses (one byte below 251, then `0xfb` u16,
//! `0xfc` u32, `0xfd` u64), every enum tag, both option states, every hidden-state dtype,
//! multi-byte UTF-8 and a signature by a fixed ed25519 key (ed25519 is deterministic).

#![allow(clippy::unwrap_used)]

use std::fmt::Debug;

use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, Announcement, BlockRange, ErrorCode, Hello, HelloReply,
    HiddenStates, InferRequest, InferResponse, ListCursor, ModelId, PeerIdBytes, PeerRtt,
    ProtocolError, Roles, RouteHop, SessionBudget, SessionId, SignedAnnouncement, WireDType,
    WireMessage, decode_frame, encode_frame, encoded_len, peer_id_bytes_for_ed25519,
};

/// The ed25519 secret of the announcing server in every announcement fixture.
const SECRET: [u8; 32] = [7; 32];

fn model() -> ModelId {
    ModelId::from_bytes(std::array::from_fn(|i| i as u8))
}

fn peer(n: u8) -> PeerIdBytes {
    PeerIdBytes((0..38).map(|i| n.wrapping_add(i)).collect())
}

fn hidden(dtype: WireDType, shape: Vec<u32>) -> HiddenStates {
    let len = HiddenStates::byte_len_for(dtype, &shape).unwrap();
    let data = (0..len).map(|i| (i * 37 + 11) as u8).collect();
    HiddenStates::new(dtype, shape, data).unwrap()
}

fn hello(model_id: Option<ModelId>) -> Hello {
    Hello {
        version: 2,
        model_id,
        roles: Roles::SERVER.with(Roles::CLIENT),
        agent: "pollen/0.1 ünïcode".into(),
    }
}

fn open() -> InferRequest {
    InferRequest::Open {
        session: SessionId(0x0123_4567_89ab_cdef),
        model_id: model(),
        route: vec![
            RouteHop {
                peer: peer(1),
                blocks: BlockRange::new(0, 12).unwrap(),
                addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
                step_us: 250,
            },
            RouteHop {
                peer: peer(2),
                blocks: BlockRange::new(12, 300).unwrap(),
                addrs: vec![
                    "/ip4/10.0.0.2/tcp/4001".into(),
                    "/ip6/::1/udp/4001/quic-v1".into(),
                ],
                step_us: 70_000,
            },
        ],
        hop: 1,
        budget: SessionBudget {
            max_tokens: 4096,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 30_000,
            open_within_ms: 20_000,
        },
        wire_dtype: WireDType::BF16,
        compute: "fast-vnni".into(),
        client: peer(3),
    }
}

fn announcement(seq: u64) -> Announcement {
    let public = ed25519_public(&SECRET);
    Announcement {
        peer: peer_id_bytes_for_ed25519(&public),
        model_id: model(),
        model_name: "SmolLM2-135M-Instruct".into(),
        num_blocks: 30,
        blocks: BlockRange::new(10, 30).unwrap(),
        throughput: 42.5,
        free_sessions: 8,
        free_cache_tokens: 16_384,
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        compute: "exact".into(),
        next_rtts: vec![
            PeerRtt {
                peer: peer(4),
                rtt_us: 1_200,
            },
            PeerRtt {
                peer: peer(5),
                rtt_us: 250,
            },
        ],
        issued_at_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_000_120_000,
        seq,
    }
}

fn ed25519_public(secret: &[u8; 32]) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(secret)
        .verifying_key()
        .to_bytes()
}

fn signed(seq: u64) -> SignedAnnouncement {
    SignedAnnouncement::sign(announcement(seq), &SECRET).unwrap()
}

/// One golden case: its name, its frame, and whether the pinned frame decodes to the same
/// message.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    decodes_back: bool,
}

fn case<M: WireMessage + PartialEq + Debug>(name: &'static str, msg: M) -> Case {
    let frame = encode_frame(&msg).unwrap();
    assert_eq!(frame.len(), encoded_len(&msg), "{name}: encoded_len");
    let decodes_back = match pinned(name) {
        Some(hex) => decode_frame::<M>(&from_hex(hex)).ok().as_ref() == Some(&msg),
        None => false,
    };
    Case {
        name,
        frame,
        decodes_back,
    }
}

fn cases() -> Vec<Case> {
    let err = ProtocolError::new(ErrorCode::SpanMismatch, "blocks 12..300 ≠ 12..30");
    vec![
        case("hello/no-model", hello(None)),
        case("hello/model", hello(Some(model()))),
        case(
            "hello-reply/accept",
            HelloReply::Accept(hello(Some(model()))),
        ),
        case(
            "hello-reply/refuse",
            HelloReply::Refuse(ProtocolError::version_mismatch(2, 3)),
        ),
        case("infer-request/open", open()),
        case(
            "infer-request/forward-f32",
            InferRequest::Forward {
                session: SessionId(1),
                position: 300,
                step: 1 << 40,
                hidden: hidden(WireDType::F32, vec![1, 2, 3]),
                last_row_only: true,
            },
        ),
        case(
            "infer-request/forward-f16",
            InferRequest::Forward {
                session: SessionId(u64::MAX),
                position: 0,
                step: 70_000,
                hidden: hidden(WireDType::F16, vec![2, 1, 1, 4]),
                last_row_only: false,
            },
        ),
        case(
            "infer-request/close",
            InferRequest::Close {
                session: SessionId(42),
            },
        ),
        case(
            "infer-request/attach",
            InferRequest::Attach {
                session: SessionId(43),
            },
        ),
        case(
            "infer-response/opened",
            InferResponse::Opened {
                session: SessionId(7),
                free_tokens: 70_000,
            },
        ),
        case(
            "infer-response/output-bf16",
            InferResponse::Output {
                session: SessionId(7),
                step: 251,
                position: 65_536,
                hidden: hidden(WireDType::BF16, vec![5]),
            },
        ),
        case(
            "infer-response/closed",
            InferResponse::Closed {
                session: SessionId(7),
            },
        ),
        case(
            "infer-response/error",
            InferResponse::Error(ProtocolError::new(ErrorCode::Busy, "busy")),
        ),
        case(
            "infer-response/ack",
            InferResponse::Ack {
                session: SessionId(7),
                step: 250,
            },
        ),
        case(
            "infer-response/hop-failed",
            InferResponse::HopFailed {
                session: SessionId(7),
                step: 9,
                hop: 2,
                peer: peer(9),
                error: err.clone(),
                by: 1,
                signature: std::array::from_fn(|i| (i * 3 + 1) as u8),
            },
        ),
        case(
            "infer-response/attached",
            InferResponse::Attached {
                session: SessionId(7),
            },
        ),
        case("signed-announcement", signed(1)),
        case(
            "announce-request/get",
            AnnounceRequest::Get { model_id: model() },
        ),
        case(
            "announce-request/publish",
            AnnounceRequest::Publish(Box::new(signed(2))),
        ),
        case(
            "announce-request/list-all",
            AnnounceRequest::List { model_id: None },
        ),
        case(
            "announce-request/list-model",
            AnnounceRequest::List {
                model_id: Some(model()),
            },
        ),
        case(
            "announce-response/announcement",
            AnnounceResponse::Announcement(Box::new(signed(3))),
        ),
        case(
            "announce-response/not-serving",
            AnnounceResponse::NotServing,
        ),
        case("announce-response/accepted", AnnounceResponse::Accepted),
        case("announce-response/refused", AnnounceResponse::Refused(err)),
        case(
            "announce-response/list",
            AnnounceResponse::List(vec![signed(4), signed(5)]),
        ),
        case(
            "announce-response/list-empty",
            AnnounceResponse::List(vec![]),
        ),
        case(
            "announce-request/list-page-first",
            AnnounceRequest::ListPage {
                model_id: Some(model()),
                order: std::array::from_fn(|i| 0xa0 + i as u8),
                after: None,
            },
        ),
        case(
            "announce-request/list-page-after",
            AnnounceRequest::ListPage {
                model_id: None,
                order: [0x5a; 16],
                after: Some(ListCursor {
                    model_id: model(),
                    rank: 300,
                    place: 0x0123_4567_89ab_cdef,
                    peer: peer(6),
                }),
            },
        ),
        case(
            "announce-response/page",
            AnnounceResponse::Page {
                list: vec![signed(7)],
                next: Some(ListCursor {
                    model_id: model(),
                    rank: 0,
                    place: 7,
                    peer: peer(7),
                }),
            },
        ),
        case(
            "announce-response/page-last",
            AnnounceResponse::Page {
                list: vec![],
                next: None,
            },
        ),
    ]
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn pinned(name: &str) -> Option<&'static str> {
    GOLDEN.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

#[test]
fn every_message_encodes_to_its_golden_frame_and_back() {
    let cases = cases();
    let mut wrong = Vec::new();
    for c in &cases {
        let hex = to_hex(&c.frame);
        match pinned(c.name) {
            Some(p) if p == hex && c.decodes_back => {}
            Some(p) if p == hex => {
                wrong.push(format!("{}: pinned frame decodes differently", c.name))
            }
            Some(_) => wrong.push(format!("{}: frame differs from the pin", c.name)),
            None => wrong.push(format!("{}: no pin", c.name)),
        }
    }
    let names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    for (n, _) in GOLDEN {
        if !names.contains(n) {
            wrong.push(format!("{n}: pinned but no longer encoded"));
        }
    }
    if !wrong.is_empty() {
        let table: String = cases
            .iter()
            .map(|c| {
                format!(
                    "    (\n        \"{}\",\n        \"{}\",\n    ),\n",
                    c.name,
                    to_hex(&c.frame)
                )
            })
            .collect();
        panic!("{}\n\nframes as encoded now:\n{table}", wrong.join("\n"));
    }
}

/// `(case, frame as hex)`, pinned from the encoder of protocol version 2.
const GOLDEN: &[(&str, &str)] = &[
    (
        "hello/no-model",
        "1900000002000314706f6c6c656e2f302e3120c3bc6ec3af636f646500",
    ),
    (
        "hello/model",
        "390000000201000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0314706f6c6c656e2f302e3120c3bc6ec3af636f646500",
    ),
    (
        "hello-reply/accept",
        "3a000000000201000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0314706f6c6c656e2f302e3120c3bc6ec3af636f646500",
    ),
    (
        "hello-reply/refuse",
        "3700000001013470726f746f636f6c2076657273696f6e206d69736d617463683a20776520737065616b20322c207065657220737065616b732033",
    ),
    (
        "infer-request/open",
        "0f01000000efcdab8967452301000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f02260102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526000c01162f6970342f31302e302e302e312f7463702f34303031fa2602030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526270cfb2c0102162f6970342f31302e302e302e322f7463702f34303031192f6970362f3a3a312f7564702f343030312f717569632d7631fc7011010001fb0010fc00001000fb3075fb204e0209666173742d766e6e6926030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728",
    ),
    (
        "infer-request/forward-f32",
        "34000000010100000000000000fb2c01fd00000000000100000003010203180b30557a9fc4e90e33587da2c7ec11365b80a5caef14395e01",
    ),
    (
        "infer-request/forward-f16",
        "2700000001ffffffffffffffff00fc70110100010402010104100b30557a9fc4e90e33587da2c7ec113600",
    ),
    ("infer-request/close", "09000000022a00000000000000"),
    ("infer-request/attach", "09000000032b00000000000000"),
    (
        "infer-response/opened",
        "0e000000000700000000000000fc70110100",
    ),
    (
        "infer-response/output-bf16",
        "1f000000010700000000000000fbfb00fc000001000201050a0b30557a9fc4e90e3358",
    ),
    ("infer-response/closed", "09000000020700000000000000"),
    ("infer-response/error", "0700000003060462757379"),
    ("infer-response/ack", "0a000000040700000000000000fa"),
    (
        "infer-response/hop-failed",
        "8e000000050700000000000000090226090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e0319626c6f636b732031322e2e33303020e289a02031322e2e3330010104070a0d101316191c1f2225282b2e3134373a3d404346494c4f5255585b5e6164676a6d707376797c7f8285888b8e9194979a9da0a3a6a9acafb2b5b8bbbe",
    ),
    ("infer-response/attached", "09000000060700000000000000"),
    (
        "signed-announcement",
        "4d01000026002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f15536d6f6c4c4d322d3133354d2d496e7374727563741e0a1e00002a4208fb004001172f6970342f3132372e302e302e312f7463702f3430303105657861637402260405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829fbb0042605060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292afafd0068e5cf8b010000fdc03ce7cf8b01000001ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c27b0048b61c2c684c4c8c1083382ea564b23b2913e07a5abc137623539ad15101181c868c1379afd55e8fbb3f0f3462151e4de34c3cb946747974376c790320b",
    ),
    (
        "announce-request/get",
        "2100000000000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    ),
    (
        "announce-request/publish",
        "4e0100000126002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f15536d6f6c4c4d322d3133354d2d496e7374727563741e0a1e00002a4208fb004001172f6970342f3132372e302e302e312f7463702f3430303105657861637402260405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829fbb0042605060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292afafd0068e5cf8b010000fdc03ce7cf8b01000002ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c476800410c7757ec7abfc8e73f15eb064456546f834c029f93dc03bde9a6519f08fb678ddf065dc09626aaa3cb1398398089aa3e463100a4d326176257fb6609",
    ),
    ("announce-request/list-all", "020000000200"),
    (
        "announce-request/list-model",
        "220000000201000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    ),
    (
        "announce-response/announcement",
        "4e0100000026002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f15536d6f6c4c4d322d3133354d2d496e7374727563741e0a1e00002a4208fb004001172f6970342f3132372e302e302e312f7463702f3430303105657861637402260405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829fbb0042605060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292afafd0068e5cf8b010000fdc03ce7cf8b01000003ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22cd4d19dd9e88a47aed916d08c4f642392dc600afd0e7391797513f60a56623c4d5cfb0f4ec9d452ad8fa4e01a1a2c3ebd4265a5e73eca46182bc4e8d2de65a60e",
    ),
    ("announce-response/not-serving", "0100000001"),
    ("announce-response/accepted", "0100000002"),
    (
        "announce-response/refused",
        "1c000000030319626c6f636b732031322e2e33303020e289a02031322e2e3330",
    ),
    (
        "announce-response/list",
        "9c020000040226002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f15536d6f6c4c4d322d3133354d2d496e7374727563741e0a1e00002a4208fb004001172f6970342f3132372e302e302e312f7463702f3430303105657861637402260405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829fbb0042605060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292afafd0068e5cf8b010000fdc03ce7cf8b01000004ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c787ab03dcb0a168bf7cf10b98f89344792388fcbd6ae7499bdd63934e446fd5516c6268f9885d492e065a274be221b3b4062b8e33cf92383efe18054f758dd0726002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f15536d6f6c4c4d322d3133354d2d496e7374727563741e0a1e00002a4208fb004001172f6970342f3132372e302e302e312f7463702f3430303105657861637402260405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829fbb0042605060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292afafd0068e5cf8b010000fdc03ce7cf8b01000005ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c84d6910370df19a4c3f20ef0a48ed94870b78d7a191d24a6a0fd7c5669bb1b56f3cb1c1def8537a6a2efe8619076ab4d8f7a927504624871338feed3c794fd03",
    ),
    ("announce-response/list-empty", "020000000400"),
    (
        "announce-request/list-page-first",
        "330000000301000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf00",
    ),
    (
        "announce-request/list-page-after",
        "6600000003005a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a01000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1ffb2c01fdefcdab896745230126060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b",
    ),
    (
        "announce-response/page",
        "99010000050126002408011220ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f15536d6f6c4c4d322d3133354d2d496e7374727563741e0a1e00002a4208fb004001172f6970342f3132372e302e302e312f7463702f3430303105657861637402260405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829fbb0042605060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292afafd0068e5cf8b010000fdc03ce7cf8b01000007ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c76be35c1648bac7fc97fe1d6234596cf9021f6caa3ce79008f7b48b43003e0884eb3da6fc342380a4fec240d80a9a2c017135dc4ce8250b2ceef2af0d776c60d01000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0007260708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c",
    ),
    ("announce-response/page-last", "03000000050000"),
];
