//! Refusals and hostile input: every pre-upgrade status of the contract,
//! origin checks, token validity, compute failures, slow-loris heads, and
//! hostile WebSocket frames (close codes), with healthy sessions unaffected.

use std::net::SocketAddr;
use std::time::Duration;

use consolegate_tests::fake::{Blackhole, EchoServer, dead_port};
use consolegate_tests::http::{self, client_frame, frame, raw_websocket, read_close};
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, raw_token, write_toml_tokens};
use consolegate_tests::qemu::Sock;
use consolegate_tests::qemu::{Qemu, QemuOptions};
use consolegate_tests::scenario::{token_dir, vnc_behind_proxy};
use consolegate_tests::ws::{self, Mode, WsRequest};
use consolegate_tests::{random_token, rfb, within};
use tokio::io::AsyncWriteExt as _;

/// Status of a WebSocket upgrade attempt.
async fn upgrade_status(addr: SocketAddr, t: &Transport, req: &WsRequest) -> u16 {
    ws::connect(addr, t, req).await.unwrap().status()
}

/// Status of a raw request head.
async fn raw_status(addr: SocketAddr, t: &Transport, raw: &[u8]) -> u16 {
    let (r, _io) = http::exchange(addr, t, raw).await.unwrap();
    r.status
}

#[tokio::test]
async fn origin_same_origin_admitted_foreign_refused() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let (a, t) = (s.proxy.ws_addr(), s.proxy.transport());
    let path = format!("/websockify?token={}", s.token);

    let evil = WsRequest::path(&path)
        .protocol("binary")
        .origin("https://evil.example");
    assert_eq!(upgrade_status(a, &t, &evil).await, 403);
    s.proxy
        .wait_log(&["session refused", "reason=origin_not_allowed"])
        .await
        .unwrap();

    // The opaque origin of sandboxed frames and file:// pages.
    let null = WsRequest::path(&path).protocol("binary").origin("null");
    assert_eq!(upgrade_status(a, &t, &null).await, 403);

    // Same port but another host name than the Host header: not same-origin.
    let other_host = WsRequest::path(&path)
        .protocol("binary")
        .origin(&format!("https://localhost:{}", a.port()));
    assert_eq!(upgrade_status(a, &t, &other_host).await, 403);

    // Same origin (Origin host == Host) is admitted.
    let same = WsRequest::path(&path)
        .protocol("binary")
        .origin(&format!("https://{}", authority(a)));
    ws::rfb_over_ws(a, &t, &same, Mode::Binary).await.unwrap();
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn allow_origin_flag_is_an_exact_allow_list() {
    let mut spec = ProxySpec::tls_ws(&[]);
    spec.allow_origins = vec!["https://console.example.com".into()];
    let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
    let (a, t) = (s.proxy.ws_addr(), s.proxy.transport());
    let path = format!("/websockify?token={}", s.token);

    let ok = WsRequest::path(&path)
        .protocol("binary")
        .origin("https://console.example.com");
    ws::rfb_over_ws(a, &t, &ok, Mode::Binary).await.unwrap();

    for bad in [
        "https://console.example.com.evil.example",
        "http://console.example.com",
        "https://evil.example",
    ] {
        let req = WsRequest::path(&path).protocol("binary").origin(bad);
        assert_eq!(upgrade_status(a, &t, &req).await, 403, "Origin {bad}");
    }
    // With an allow-list, even same-origin must be listed.
    let same = WsRequest::path(&path)
        .protocol("binary")
        .origin(&format!("https://{}", authority(a)));
    assert_eq!(upgrade_status(a, &t, &same).await, 403);
    s.proxy
        .wait_log(&["session refused", "reason=origin_not_allowed"])
        .await
        .unwrap();
}

#[tokio::test]
async fn token_missing_unknown_expired_not_yet_valid() {
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let (expired, future, good) = (random_token(), random_token(), random_token());
    let target = Some(authority(echo.addr));
    write_toml_tokens(
        &dir.path().join("t.toml"),
        &[
            TomlToken {
                kind: Some("serial".into()),
                token: expired.clone(),
                target: target.clone(),
                not_after: Some("2001-01-01T00:00:00Z".into()),
                ..TomlToken::default()
            },
            TomlToken {
                kind: Some("serial".into()),
                token: future.clone(),
                target: target.clone(),
                not_before: Some("2999-01-01T00:00:00Z".into()),
                ..TomlToken::default()
            },
            TomlToken {
                kind: Some("serial".into()),
                token: good.clone(),
                target,
                not_after: Some("2999-01-01T00:00:00Z".into()),
                ..TomlToken::default()
            },
        ],
    )
    .unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[&dir.path().join("t.toml")]))
        .await
        .unwrap();
    let (a, t) = (proxy.ws_addr(), proxy.transport());
    let req = |p: String| WsRequest::path(p).protocol("binary");

    assert_eq!(upgrade_status(a, &t, &req("/websockify".into())).await, 401);
    proxy
        .wait_log(&["session refused", "reason=token_missing"])
        .await
        .unwrap();
    let unknown = random_token();
    assert_eq!(
        upgrade_status(a, &t, &req(format!("/websockify?token={unknown}"))).await,
        403
    );
    proxy
        .wait_log(&["session refused", "reason=token_unknown"])
        .await
        .unwrap();
    assert_eq!(
        upgrade_status(a, &t, &req(format!("/websockify?token={expired}"))).await,
        403
    );
    proxy
        .wait_log(&["session refused", "reason=token_expired"])
        .await
        .unwrap();
    assert_eq!(
        upgrade_status(a, &t, &req(format!("/websockify?token={future}"))).await,
        403
    );
    // docs/config.md: not yet valid is refused "exactly like" expired.
    proxy
        .wait_log_count(&["session refused", "reason=token_expired"], 2)
        .await
        .unwrap();
    assert_eq!(
        echo.accepted(),
        0,
        "a refused token dialled the compute side"
    );

    // The valid one (with a future not_after) reaches the compute side.
    assert_eq!(
        upgrade_status(a, &t, &req(format!("/websockify?token={good}"))).await,
        101
    );
    proxy.assert_secrets_not_logged(&[&expired, &future, &good, &unknown]);
}

#[tokio::test]
async fn compute_refused_is_502_and_dial_timeout_is_504() {
    let dead = dead_port().unwrap();
    let hole = Blackhole::new().unwrap();
    let dir = token_dir();
    let (dead_tok, hole_tok) = (random_token(), random_token());
    let file = dir.path().join("tokens");
    consolegate_tests::proxy::write_websockify_tokens(
        &file,
        &[
            (&dead_tok, authority(dead)),
            (&hole_tok, authority(hole.addr)),
        ],
    )
    .unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.connect_timeout = Some("1s".into());
    let proxy = Proxy::start(spec).await.unwrap();
    let (a, t) = (proxy.ws_addr(), proxy.transport());

    let req = WsRequest::path(format!("/websockify?token={dead_tok}")).protocol("binary");
    assert_eq!(upgrade_status(a, &t, &req).await, 502);
    proxy
        .wait_log(&["session refused", "reason=compute_unreachable"])
        .await
        .unwrap();

    hole.verify().unwrap();
    let req = WsRequest::path(format!("/websockify?token={hole_tok}")).protocol("binary");
    assert_eq!(upgrade_status(a, &t, &req).await, 504);
    proxy
        .wait_log(&["session refused", "reason=compute_timeout"])
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_and_oversized_heads_and_wrong_requests() {
    let s = vnc_behind_proxy(Sock::Unix, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let (a, t) = (s.proxy.ws_addr(), s.proxy.transport());
    let host = authority(a);
    let tokq = format!("/websockify?token={}", s.token);

    // Malformed request lines / header lines: 400.
    assert_eq!(raw_status(a, &t, b"GARBAGE\r\n\r\n").await, 400);
    assert_eq!(
        raw_status(
            a,
            &t,
            format!("GET {tokq} HTTP/1.1\r\nHost: {host}\r\nno colon here\r\n\r\n").as_bytes()
        )
        .await,
        400
    );
    s.proxy
        .wait_log(&["session refused", "reason=bad_request"])
        .await
        .unwrap();
    // Upgrade request missing Sec-WebSocket-Key: bad WebSocket handshake, 400.
    assert_eq!(
        raw_status(
            a,
            &t,
            format!(
                "GET {tokq} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes()
        )
        .await,
        400
    );

    // Head over 8 KiB: 431.
    let big = format!("X-Filler: {}", "a".repeat(9 * 1024));
    let head = http::upgrade_head(&host, &tokq, &[&big]);
    assert_eq!(raw_status(a, &t, head.as_bytes()).await, 431);
    // More than 64 headers: 431.
    let many: Vec<String> = (0..70).map(|i| format!("X-H{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let head = http::upgrade_head(&host, &tokq, &many);
    assert_eq!(raw_status(a, &t, head.as_bytes()).await, 431);
    s.proxy
        .wait_log(&["session refused", "reason=head_too_large"])
        .await
        .unwrap();

    // Within the limits (64 headers, a 7 KiB head) is not refused.
    let filler: Vec<String> = (0..58).map(|i| format!("X-H{i}: v")).collect();
    let mut filler: Vec<&str> = filler.iter().map(String::as_str).collect();
    filler.push("Sec-WebSocket-Protocol: binary");
    let head = http::upgrade_head(&host, &tokq, &filler);
    assert_eq!(head.matches("\r\n").count() - 2, 64, "64 header lines");
    assert_eq!(raw_status(a, &t, head.as_bytes()).await, 101, "64 headers");
    let big = format!("X-Filler: {}", "a".repeat(7 * 1024));
    let head = http::upgrade_head(&host, &tokq, &[&big, "Sec-WebSocket-Protocol: binary"]);
    assert_eq!(raw_status(a, &t, head.as_bytes()).await, 101, "7 KiB head");

    // Deeper path: 404.
    let head = http::upgrade_head(&host, &format!("/websockify/{}/more", s.token), &[]);
    assert_eq!(raw_status(a, &t, head.as_bytes()).await, 404);
    s.proxy
        .wait_log(&["session refused", "reason=not_found"])
        .await
        .unwrap();
    // Not GET: 405.
    let post = format!("POST {tokq} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(raw_status(a, &t, post.as_bytes()).await, 405);
    s.proxy
        .wait_log(&["session refused", "reason=method_not_allowed"])
        .await
        .unwrap();
    // Plain GET without Upgrade: 426.
    let get = format!("GET {tokq} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    assert_eq!(raw_status(a, &t, get.as_bytes()).await, 426);
    s.proxy
        .wait_log(&["session refused", "reason=upgrade_required"])
        .await
        .unwrap();

    // After all that, a real session works.
    let req = WsRequest::path(&tokq).protocol("binary");
    ws::rfb_over_ws(a, &t, &req, Mode::Binary).await.unwrap();
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn slow_loris_gets_408_while_a_real_session_works() {
    let mut spec = ProxySpec::tls_ws(&[]);
    spec.handshake_timeout = Some("2s".into());
    let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
    let (a, t) = (s.proxy.ws_addr(), s.proxy.transport());

    // A client that completes TLS and then sends its head one byte every
    // 200 ms: the whole head would take far longer than 2 s.
    let head = http::upgrade_head(
        &authority(a),
        &format!("/websockify?token={}", s.token),
        &[],
    );
    let io = consolegate_tests::net::connect(a, &t).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(io);
    let dribble = tokio::spawn(async move {
        for b in head.as_bytes() {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // A client that never even starts TLS.
    let mut silent = consolegate_tests::net::tcp(a).await.unwrap();

    // Meanwhile a real tenant gets a full VNC session.
    let req = WsRequest::path(format!("/websockify?token={}", s.token)).protocol("binary");
    ws::rfb_over_ws(a, &t, &req, Mode::Binary).await.unwrap();

    let resp = within("408 for the slow head", http::read_response_head(&mut rd))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status, 408);
    dribble.abort();
    s.proxy
        .wait_log(&["session refused", "reason=handshake_timeout"])
        .await
        .unwrap();
    // The silent TCP client is dropped too (EOF or reset, bounded).
    within("silent client closed", http::read_to_close(&mut silent))
        .await
        .unwrap();
}

/// What a hostile frame must produce, and what it did.
async fn hostile_case(
    a: SocketAddr,
    t: &Transport,
    path: &str,
    protocol: &str,
    bytes: Vec<u8>,
) -> anyhow::Result<(Option<u16>, String)> {
    let proto = format!("Sec-WebSocket-Protocol: {protocol}");
    let mut io = raw_websocket(a, t, path, &[&proto]).await?;
    // Writing may fail if the proxy closes early; the close frame decides.
    let _ = http::write_all(&mut io, &bytes).await;
    within("close frame", read_close(&mut io)).await?
}

#[tokio::test]
async fn hostile_frames_get_close_codes_and_other_sessions_survive() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let (a, t) = (s.proxy.ws_addr(), s.proxy.transport());
    let path = format!("/websockify?token={}", s.token);

    // A healthy session, opened first and kept open throughout.
    let (w, _) = ws::connect(a, &t, &WsRequest::path(&path).protocol("binary"))
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut healthy = ws::into_bytes(w, Mode::Binary);
    let mut init = within("RFB handshake", rfb::handshake(&mut healthy.io))
        .await
        .unwrap()
        .unwrap();

    let mut too_big = frame(true, 0, 2, Some([1, 2, 3, 4]), &[]);
    too_big.truncate(2);
    too_big[1] = 0x80 | 127;
    too_big.extend_from_slice(&(2u64 << 20).to_be_bytes());
    too_big.extend_from_slice(&[1, 2, 3, 4]);
    too_big.extend_from_slice(&[0u8; 4096]);

    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (
            "unmasked client frame",
            "binary",
            frame(true, 0, 2, None, b"RFB 003.008\n"),
            1002,
        ),
        (
            "RSV1 set",
            "binary",
            frame(true, 4, 2, Some([9, 9, 9, 9]), b"x"),
            1002,
        ),
        (
            "reserved opcode 0x3",
            "binary",
            client_frame(0x3, b"x"),
            1002,
        ),
        (
            "reserved control opcode 0xB",
            "binary",
            client_frame(0xb, b""),
            1002,
        ),
        (
            "text frame in binary mode",
            "binary",
            client_frame(0x1, b"hello"),
            1003,
        ),
        (
            "invalid base64",
            "base64",
            client_frame(0x1, b"!!not base64!!"),
            1007,
        ),
        (
            "ping payload over 125 bytes",
            "binary",
            client_frame(0x9, &[7u8; 200]),
            1002,
        ),
        (
            "fragmented ping",
            "binary",
            frame(false, 0, 0x9, Some([5, 6, 7, 8]), b"p"),
            1002,
        ),
        (
            "continuation without a start",
            "binary",
            client_frame(0x0, b"orphan"),
            1002,
        ),
        (
            "new message inside a fragmented one",
            "binary",
            {
                let mut f = frame(false, 0, 2, Some([1, 1, 1, 1]), b"first");
                f.extend(client_frame(2, b"second"));
                f
            },
            1002,
        ),
        ("payload over 1 MiB", "binary", too_big, 1009),
    ];
    let mut failures = Vec::new();
    for (name, proto, bytes, want) in cases {
        match hostile_case(a, &t, &path, proto, bytes).await {
            Ok((code, reason)) if code == Some(want) => {
                eprintln!("{name}: close {want} ({reason})");
            }
            Ok((code, reason)) => failures.push(format!(
                "{name}: want close {want}, got {code:?} {reason:?}"
            )),
            Err(e) => failures.push(format!("{name}: want close {want}, got error {e:#}")),
        }
    }

    // The healthy session still gets a full framebuffer.
    within(
        "full update after hostile sessions",
        rfb::full_update(&mut healthy.io, &mut init),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn unanswered_pings_close_with_1001_keepalive_timeout() {
    // A serial console: bytes flow without any console-level handshake.
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Tcp,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("serial.toml");
    write_toml_tokens(&file, &[raw_token(&tok, qemu.serial.tcp())]).unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.extra = vec!["--ping-interval".into(), "1s".into()];
    let proxy = Proxy::start(spec).await.unwrap();
    // A raw client that reads everything and never answers pings.
    let mut io = raw_websocket(
        proxy.ws_addr(),
        &proxy.transport(),
        &format!("/websockify?token={tok}"),
        &["Sec-WebSocket-Protocol: binary"],
    )
    .await
    .unwrap();
    let mut pings = 0;
    let (code, reason) = within("keepalive close", async {
        loop {
            let f = http::read_frame(&mut io).await?;
            match f.opcode {
                9 => pings += 1,
                8 => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    let reason = String::from_utf8_lossy(&f.payload[2.min(f.payload.len())..]);
                    return anyhow::Ok((code, reason.into_owned()));
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert!(pings >= 2, "closed after {pings} pings");
    assert_eq!(code, Some(1001), "reason {reason:?}");
    assert!(reason.contains("keepalive"), "reason {reason:?}");
}

#[tokio::test]
async fn quiet_vnc_session_hits_idle_timeout_1001() {
    let mut spec = ProxySpec::tls_ws(&[]);
    spec.extra = vec![
        "--idle-timeout".into(),
        "2s".into(),
        "--ping-interval".into(),
        "0".into(),
    ];
    let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
    let req = WsRequest::path(format!("/websockify?token={}", s.token)).protocol("binary");
    let (w, _) = ws::connect(s.proxy.ws_addr(), &s.proxy.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    // A real RFB handshake, then silence: no update requests, no input.
    within("RFB handshake", rfb::handshake(&mut b.io))
        .await
        .unwrap()
        .unwrap();
    let closed = within("idle close", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1001), "{closed:?}");
}

/// The 1 MiB payload limit is inclusive: a 1 MiB frame is relayed whole,
/// one byte more is 1009. (Scripted echo compute side: a serial guest
/// echoes far too slowly for a megabyte.)
#[tokio::test]
async fn one_mib_frame_passes_one_more_byte_is_1009() {
    let echo = consolegate_tests::fake::EchoServer::start().await.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("raw.toml");
    write_toml_tokens(&file, &[raw_token(&tok, echo.addr)]).unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[&file])).await.unwrap();
    let (a, t) = (proxy.ws_addr(), proxy.transport());
    let path = format!("/websockify?token={tok}");

    let payload: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let mut io = raw_websocket(a, &t, &path, &["Sec-WebSocket-Protocol: binary"])
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(&mut io);
    let send = async {
        wr.write_all(&client_frame(2, &payload)).await?;
        wr.flush().await?;
        anyhow::Ok(())
    };
    let recv = async {
        let mut back = Vec::new();
        while back.len() < payload.len() {
            let f = http::read_frame(&mut rd).await?;
            anyhow::ensure!(
                f.opcode != 8,
                "closed: {:?}",
                String::from_utf8_lossy(&f.payload)
            );
            if f.opcode == 2 || f.opcode == 0 {
                back.extend_from_slice(&f.payload);
            }
        }
        anyhow::Ok(back)
    };
    let (sent, back) = within("1 MiB echo", async { tokio::join!(send, recv) })
        .await
        .unwrap();
    sent.unwrap();
    assert!(back.unwrap() == payload, "1 MiB payload not echoed intact");

    let mut over = payload;
    over.push(0);
    let (code, reason) = hostile_case(a, &t, &path, "binary", client_frame(2, &over))
        .await
        .unwrap();
    assert_eq!(code, Some(1009), "reason {reason:?}");
}
