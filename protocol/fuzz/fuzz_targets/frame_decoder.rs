//! Feeds arbitrary bytes to every frame entry point for every message type: none may panic,
//! and whatever decodes must re-encode (with an exact `encoded_len`) to a frame that decodes
//! to the same message. (Not necessarily to the same bytes: the decoder accepts non-minimal
//! varints and skips hello extensions.)

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, Hello, HelloReply, InferRequest, InferResponse,
    SignedAnnouncement, WireMessage, decode_body, decode_frame, encode_frame, encoded_len,
    read_frame,
};

fn check<M: WireMessage + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let from_frame = decode_frame::<M>(data);
    let _ = decode_body::<M>(data);
    let from_reader = read_frame::<M, _>(Cursor::new(data), usize::MAX);
    if let Ok(msg) = from_frame {
        let again = encode_frame(&msg).expect("a decoded message re-encodes");
        assert_eq!(again.len(), encoded_len(&msg));
        assert_eq!(
            decode_frame::<M>(&again).expect("a re-encoded message decodes"),
            msg
        );
        assert_eq!(from_reader.expect("reader agrees with slice"), msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Hello>(data);
    check::<HelloReply>(data);
    check::<InferRequest>(data);
    check::<InferResponse>(data);
    check::<SignedAnnouncement>(data);
    check::<AnnounceRequest>(data);
    check::<AnnounceResponse>(data);
});
