//! Question: what does reading a tenant's request head cost per session,
//! and how bad is the worst head a hostile tenant can send? Every session
//! starts with one: a browser's WebSocket upgrade (noVNC sends ~500 bytes of
//! headers) or a native client's CONNECT. The limit is 8 KiB and 64 fields,
//! so a head at the limit bounds the parsing work an attacker can cause per
//! connection. Compare with a full TLS handshake (~600 us of CPU here): the
//! head should be a rounding error of session set-up.
//!
//! Run: `cargo bench -p consolegate-bench --bench http_head`.

use consolegate::front::http::{HeadLimits, parse_request_head};
use consolegate::front::websocket::handshake::{accept_key, check_upgrade, switching_response};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const NOVNC_UPGRADE: &[u8] = b"GET /websockify?token=9f86d081884c7d659a2feaa0c55ad015 HTTP/1.1\r\n\
Host: console.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://console.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Cookie: session=abc; token=9f86d081884c7d659a2feaa0c55ad015\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: binary, base64\r\n\r\n";

const CONNECT: &[u8] = b"CONNECT 10.0.3.17:5901 HTTP/1.1\r\n\
Host: 10.0.3.17:5901\r\n\
Proxy-Authorization: Bearer 9f86d081884c7d659a2feaa0c55ad015\r\n\r\n";

/// A head just under the limits: 62 fields of filler, ~8 KiB in all.
fn largest_head() -> Vec<u8> {
    let limits = HeadLimits::default();
    let mut h = b"GET /websockify?token=t HTTP/1.1\r\nHost: x\r\n".to_vec();
    let per = (limits.max_bytes - h.len() - 200) / (limits.max_headers - 2);
    for i in 0..limits.max_headers - 2 {
        let name = format!("X-Filler-{i:02}: ");
        let pad = per.saturating_sub(name.len() + 2);
        h.extend_from_slice(name.as_bytes());
        h.extend(std::iter::repeat_n(b'a', pad));
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    assert!(h.len() <= limits.max_bytes, "{} bytes", h.len());
    h
}

fn parse(c: &mut Criterion) {
    let limits = HeadLimits::default();
    let big = largest_head();
    let mut g = c.benchmark_group("parse_request_head");
    for (name, head) in [
        ("novnc_upgrade", NOVNC_UPGRADE),
        ("connect", CONNECT),
        ("at_the_limit", big.as_slice()),
    ] {
        g.throughput(Throughput::Bytes(head.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let (h, used) = parse_request_head(black_box(head), &limits)
                    .expect("valid")
                    .expect("complete");
                black_box((h.headers.len(), used))
            });
        });
    }
    g.finish();
    // A slow tenant delivers the head in pieces: each read re-parses from
    // the start until the blank line arrives (here: 8 reads).
    c.bench_function("parse_request_head/novnc_upgrade_in_8_reads", |b| {
        let step = NOVNC_UPGRADE.len() / 8 + 1;
        b.iter(|| {
            let mut n = step;
            loop {
                let end = n.min(NOVNC_UPGRADE.len());
                if let Some(done) =
                    parse_request_head(&NOVNC_UPGRADE[..end], &limits).expect("valid")
                {
                    break black_box(done.1);
                }
                n += step;
            }
        });
    });
}

fn upgrade(c: &mut Criterion) {
    let limits = HeadLimits::default();
    let (head, _) = parse_request_head(NOVNC_UPGRADE, &limits)
        .expect("valid")
        .expect("complete");
    c.bench_function("websocket_upgrade/check_token_accept_response", |b| {
        b.iter(|| {
            let up = check_upgrade(black_box(&head)).expect("valid upgrade");
            let token = head.query_param("token");
            black_box((switching_response(&up).len(), token))
        });
    });
    c.bench_function("websocket_upgrade/accept_key_sha1", |b| {
        b.iter(|| black_box(accept_key(black_box("dGhlIHNhbXBsZSBub25jZQ=="))));
    });
}

criterion_group!(benches, parse, upgrade);
criterion_main!(benches);
