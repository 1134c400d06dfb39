//! Encode and decode cost of inference frames for the default model (SmolLM2-135M, hidden
//! size 576): a one-token decode step and a 512-token prefill, in f32 and f16.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pollen_protocol::{
    HiddenStates, InferRequest, SessionId, WireDType, decode_frame, encode_frame, encoded_len,
};

const HIDDEN: u32 = 576;

fn forward(tokens: u32, dtype: WireDType) -> InferRequest {
    let values: Vec<f32> = (0..tokens * HIDDEN)
        .map(|i| ((i % 97) as f32 - 48.0) / 13.0)
        .collect();
    InferRequest::Forward {
        session: SessionId(0x1234_5678_9abc_def0),
        position: 35,
        step: 7,
        hidden: HiddenStates::from_f32(&values, vec![1, tokens, HIDDEN], dtype).unwrap(),
        last_row_only: true,
    }
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("decode_step_1x576", 1, WireDType::F32),
        ("decode_step_1x576", 1, WireDType::F16),
        ("prefill_512x576", 512, WireDType::F32),
        ("prefill_512x576", 512, WireDType::F16),
    ];
    for (name, tokens, dtype) in cases {
        let msg = forward(tokens, dtype);
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(frame.len(), encoded_len(&msg));
        println!(
            "{name}/{dtype}: {} bytes per frame ({} payload + {} overhead)",
            frame.len(),
            tokens * HIDDEN * dtype.size_bytes() as u32,
            frame.len() - (tokens * HIDDEN) as usize * dtype.size_bytes()
        );
        let mut group = c.benchmark_group(format!("{name}/{dtype}"));
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function("encode", |b| {
            b.iter(|| encode_frame(black_box(&msg)).unwrap())
        });
        group.bench_function("decode", |b| {
            b.iter(|| decode_frame::<InferRequest>(black_box(&frame)).unwrap())
        });
        group.bench_function("encode+decode", |b| {
            b.iter(|| {
                let f = encode_frame(black_box(&msg)).unwrap();
                decode_frame::<InferRequest>(&f).unwrap()
            })
        });
        group.finish();
    }
    // What the f32 <-> f16 conversion costs on top (done by the sender and the receiver).
    let values: Vec<f32> = (0..512 * HIDDEN).map(|i| i as f32 / 1e4).collect();
    c.bench_function("prefill_512x576/from_f32(f16)", |b| {
        b.iter(|| HiddenStates::from_f32(black_box(&values), vec![1, 512, HIDDEN], WireDType::F16))
    });
    let h = HiddenStates::from_f32(&values, vec![1, 512, HIDDEN], WireDType::F16).unwrap();
    c.bench_function("prefill_512x576/to_f32(f16)", |b| {
        b.iter(|| black_box(&h).to_f32())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
