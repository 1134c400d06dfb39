//! Hostile length claims must not make the decoder allocate what they claim.
//!
//! A counting global allocator records the largest single allocation while each hostile
//! frame is decoded. This file holds one test, so no other test thread allocates at the
//! same time.

#![allow(clippy::unwrap_used)]
// A `GlobalAlloc` impl is necessarily `unsafe`; this test-only allocator forwards to the
// system allocator and only records sizes.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Cursor, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

use pollen_protocol::limits::MAX_FRAME_BYTES;
use pollen_protocol::{
    AnnounceResponse, CodecError, Hello, InferRequest, InferResponse, WireMessage, decode_frame,
    read_frame,
};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Generous bound on any single allocation while decoding a small hostile frame: the
/// decoder's read chunk (64 KiB) plus slack.
const BOUND: usize = 128 * 1024;

fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [&[251u8][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &n.to_le_bytes()].concat(),
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Decodes `frame` as `M` (from a slice and from a reader), expecting an error, and returns
/// the largest single allocation made meanwhile.
fn largest_allocation<M: WireMessage + std::fmt::Debug>(frame: &[u8]) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    let a = decode_frame::<M>(frame);
    let b = read_frame::<M, _>(Cursor::new(frame), usize::MAX);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(a.is_err(), "{a:?}");
    assert!(b.is_err(), "{b:?}");
    largest
}

/// A reader that serves a prefix and then `n` bytes of zeros, slowly (64 bytes per read),
/// like a peer that claims a large frame and trickles it.
struct Trickle {
    prefix: Cursor<Vec<u8>>,
    left: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.prefix.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        let n = buf.len().min(64).min(self.left);
        buf[..n].fill(0);
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn hostile_lengths_allocate_little() {
    type Measure = fn(&[u8]) -> usize;
    let mut cases: Vec<(&str, Vec<u8>, Measure)> = Vec::new();
    for n in [u32::MAX as u64, u64::MAX, (MAX_FRAME_BYTES - 64) as u64] {
        let mut agent = vec![1, 0, 0];
        agent.extend(varint(n));
        cases.push(("hello agent", framed(&agent), largest_allocation::<Hello>));

        let mut shape = vec![1];
        shape.extend([0; 8]);
        shape.extend([0, 0, 0]);
        shape.extend(varint(n));
        cases.push(("shape", framed(&shape), largest_allocation::<InferRequest>));

        let mut route = vec![0];
        route.extend([0; 8]);
        route.extend([7; 32]);
        route.extend(varint(n));
        cases.push(("route", framed(&route), largest_allocation::<InferRequest>));

        let mut message = vec![3, 7];
        message.extend(varint(n));
        cases.push((
            "error message",
            framed(&message),
            largest_allocation::<InferResponse>,
        ));

        let mut name = vec![0, 1, 9];
        name.extend([7; 32]);
        name.extend(varint(n));
        cases.push((
            "model name",
            framed(&name),
            largest_allocation::<AnnounceResponse>,
        ));
    }
    // A shape that needs exactly 64 MiB, with a matching length claim but only a few bytes
    // of data: the decoder must not allocate the 64 MiB up front.
    let mut blob = vec![1];
    blob.extend([0; 8]);
    blob.extend([0, 0, 0, 2]);
    blob.extend(varint(4096));
    blob.extend(varint(4096 * 4));
    blob.extend(varint(64 << 20));
    blob.extend([1, 2, 3, 4]);
    cases.push((
        "64 MiB blob",
        framed(&blob),
        largest_allocation::<InferRequest>,
    ));

    for (what, frame, measure) in cases {
        let largest = measure(&frame);
        assert!(
            largest <= BOUND,
            "{what}: largest allocation {largest} bytes for a {} byte frame",
            frame.len()
        );
    }

    // A prefix claiming a maximal frame, followed by only 1 KiB: the reader grows its buffer
    // with the bytes that actually arrive.
    let prefix = (MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
    LARGEST.store(0, Ordering::Relaxed);
    let result = read_frame::<InferRequest, _>(
        Trickle {
            prefix: Cursor::new(prefix),
            left: 1024,
        },
        usize::MAX,
    );
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        matches!(result, Err(CodecError::Truncated { .. })),
        "{result:?}"
    );
    assert!(
        largest <= BOUND,
        "trickled frame: largest allocation {largest}"
    );
}
