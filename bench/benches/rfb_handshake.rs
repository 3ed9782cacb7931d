//! Question: what does the RFB (VNC) security phase cost the proxy in CPU
//! per session, apart from waiting on the network? consolegate terminates
//! RFB on both sides: it serves the tenant RFB 3.8 with security None, and
//! negotiates the strongest type with QEMU (parsing versions, choosing
//! among offered types and VeNCrypt subtypes, answering the VNC DES
//! challenge). The tenant side runs here as the real async state machine
//! over an in-memory pipe with a scripted noVNC-like client; the compute-side
//! decisions are the sans-io functions the state machine calls. A thousand
//! sessions opening at once should cost milliseconds of CPU in total here,
//! leaving TLS as the only significant set-up cost.
//!
//! Run: `cargo bench -p consolegate-bench --bench rfb_handshake`.

use consolegate::console::vnc::rfb::{
    Capabilities, choose_security, choose_subtype, parse_version, sec, vencrypt, vnc_auth_response,
};
use consolegate::console::vnc::serve_tenant;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A tenant (noVNC) answering the proxy: RFB 3.8, picks None, reads the result.
async fn tenant(mut s: tokio::io::DuplexStream) {
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await.expect("server version");
    s.write_all(b"RFB 003.008\n").await.expect("client version");
    let n = s.read_u8().await.expect("type count");
    let mut types = vec![0u8; usize::from(n)];
    s.read_exact(&mut types).await.expect("types");
    s.write_all(&[sec::NONE]).await.expect("choice");
    let result = s.read_u32().await.expect("SecurityResult");
    assert_eq!(result, 0);
}

fn tenant_side(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("serve_tenant/rfb_3_8_none_over_a_pipe", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut proxy, client) = tokio::io::duplex(256);
                let (served, ()) = tokio::join!(serve_tenant(&mut proxy), tenant(client));
                black_box(served.expect("handshake"))
            })
        });
    });
}

fn compute_side_decisions(c: &mut Criterion) {
    let caps = Capabilities {
        tls: true,
        require_tls: true,
        vnc_password: true,
        user_password: true,
    };
    // What QEMU offers with `-vnc ...,tls-creds=...,sasl=on,password=on`.
    let offered_types = [sec::VENCRYPT, sec::SASL, sec::VNC];
    let offered_subtypes = [
        vencrypt::X509_SASL,
        vencrypt::X509_VNC,
        vencrypt::X509_NONE,
        vencrypt::TLS_VNC,
    ];
    c.bench_function("rfb/parse_version", |b| {
        b.iter(|| black_box(parse_version(black_box(b"RFB 003.008\n")).expect("valid")));
    });
    c.bench_function("rfb/choose_security_and_subtype", |b| {
        b.iter(|| {
            let t = choose_security(black_box(&offered_types), caps).expect("a choice");
            let s = choose_subtype(black_box(&offered_subtypes), caps).expect("a subtype");
            black_box((t, s))
        });
    });
    c.bench_function("rfb/vnc_auth_des_response", |b| {
        let challenge = [7u8; 16];
        b.iter(|| black_box(vnc_auth_response(black_box(&challenge), b"s3cr3t!!")));
    });
}

criterion_group!(benches, tenant_side, compute_side_decisions);
criterion_main!(benches);
