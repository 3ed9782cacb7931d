//! Question: what does WebSocket framing cost on the hot path, per message
//! and per byte? Tenant-to-compute frames are masked and must be decoded and
//! unmasked (keystrokes and pointer events: tens of bytes; clipboard and file
//! pastes: kilobytes); compute-to-tenant data is wrapped in server frames
//! (framebuffer updates: up to the pump's chunk size). If decoding a 64-byte
//! frame costs a large part of a round trip's ~20-50 us, or unmasking runs
//! far below memory bandwidth, the WebSocket front end is the bottleneck,
//! not the network.
//!
//! Run: `cargo bench -p consolegate-bench --bench websocket_frame`.

use bytes::BytesMut;
use consolegate::front::websocket::frame::{
    Decoder, MAX_HEADER_LEN, Opcode, apply_mask, encode_frame, encode_header,
};
use consolegate::front::websocket::message::{Inbound, Mode};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 64 * 1024];
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked client frame carrying `len` payload bytes, as a browser sends it.
fn client_frame(len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(true, Opcode::Binary, Some(MASK), len as u64, &mut hdr);
    let mut frame = hdr[..n].to_vec();
    let mut body = payload;
    apply_mask(&mut body, MASK);
    frame.extend_from_slice(&body);
    frame
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_masked_client_frame");
    for len in SIZES {
        let frame = client_frame(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &frame, |b, frame| {
            let mut dec = Decoder::new(1 << 20);
            let mut buf = BytesMut::with_capacity(frame.len());
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(frame);
                let f = dec
                    .decode(&mut buf)
                    .expect("valid frame")
                    .expect("whole frame");
                black_box(f.payload.len())
            });
        });
    }
    g.finish();
}

fn decode_and_apply_message_rules(c: &mut Criterion) {
    // The whole inbound path for one keystroke: decode, unmask, message rules.
    let frame = client_frame(64);
    c.bench_function("inbound_keystroke_64B_decode_plus_rules", |b| {
        let mut dec = Decoder::new(1 << 20);
        let mut inbound = Inbound::new(Mode::Binary);
        let mut buf = BytesMut::with_capacity(frame.len());
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&frame);
            let f = dec.decode(&mut buf).expect("valid").expect("whole");
            black_box(inbound.on_frame(f).is_ok())
        });
    });
}

fn unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply_mask");
    for len in SIZES {
        let mut data = vec![0x5au8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::from_parameter(len), |b| {
            b.iter(|| {
                apply_mask(black_box(&mut data), MASK);
            });
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_server_frame");
    for len in SIZES {
        let payload = vec![0xa5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::from_parameter(len), |b| {
            let mut out = BytesMut::with_capacity(len + MAX_HEADER_LEN);
            b.iter(|| {
                out.clear();
                encode_frame(Opcode::Binary, black_box(&payload), &mut out);
                black_box(out.len())
            });
        });
    }
    g.finish();
    c.bench_function("encode_header_only", |b| {
        let mut hdr = [0u8; MAX_HEADER_LEN];
        b.iter(|| {
            black_box(encode_header(
                true,
                Opcode::Binary,
                None,
                black_box(65_536),
                &mut hdr,
            ))
        });
    });
}

criterion_group!(
    benches,
    decode,
    decode_and_apply_message_rules,
    unmask,
    encode
);
criterion_main!(benches);
