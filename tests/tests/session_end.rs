//! How sessions end and what happens in between: compute close (1000),
//! compute reset (1014), proxy shutdown (1001), fragmented tenant messages,
//! tenant pings, keepalive with a responsive client, token directories.

use std::time::Duration;

use consolegate_tests::fake::ResetAfterRead;
use consolegate_tests::http::{self, frame, raw_websocket, read_close};
use consolegate_tests::net::authority;
use consolegate_tests::proxy::{
    Proxy, ProxySpec, TomlToken, raw_token, write_toml_tokens, write_websockify_tokens,
};
use consolegate_tests::qemu::{Qemu, QemuOptions, SERIAL_BANNER, Sock, read_until};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::ws::{self, Mode, WsOutcome, WsRequest};
use consolegate_tests::{contains, random_token, rfb, within, within_for};
use tokio::io::AsyncWriteExt as _;

async fn serial_proxy(extra: &[&str]) -> (Qemu, Proxy, String, tempfile::TempDir) {
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
    write_toml_tokens(
        &file,
        &[TomlToken {
            token: tok.clone(),
            kind: Some("serial".into()),
            target: Some(authority(qemu.serial.tcp())),
            ..TomlToken::default()
        }],
    )
    .unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    let proxy = Proxy::start(spec).await.unwrap();
    (qemu, proxy, tok, dir)
}

async fn serial_session(p: &Proxy, tok: &str) -> ws::WsBytes {
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    let (w, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    read_until(&mut b.io, SERIAL_BANNER).await.unwrap();
    b
}

#[tokio::test]
async fn compute_side_exit_closes_with_1000() {
    let (qemu, proxy, tok, _d) = serial_proxy(&[]).await;
    let b = serial_session(&proxy, &tok).await;
    drop(qemu); // SIGKILL: the guest's chardev socket closes.
    let closed = within("close after compute exit", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1000), "{closed:?}");
    proxy.wait_log(&["session closed"]).await.unwrap();
}

#[tokio::test]
async fn compute_side_reset_closes_with_compute_error_code() {
    let fake = ResetAfterRead::start().await.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&tok, fake.addr)]).unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[&file])).await.unwrap();
    let mut io = raw_websocket(
        proxy.ws_addr(),
        &proxy.transport(),
        &format!("/websockify?token={tok}"),
        &["Sec-WebSocket-Protocol: binary"],
    )
    .await
    .unwrap();
    http::write_all(&mut io, &http::client_frame(2, b"hello"))
        .await
        .unwrap();
    let (code, reason) = within("close after compute reset", read_close(&mut io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        code,
        Some(consolegate_tests::CLOSE_COMPUTE_ERROR),
        "reason {reason:?}"
    );
}

/// SIGTERM drains: the listener closes at once, a live session keeps
/// working until the drain deadline, is then closed with 1001, and the
/// process exits.
#[tokio::test]
async fn sigterm_drains_then_closes_sessions_with_1001() {
    let (_qemu, mut proxy, tok, _d) = serial_proxy(&["--drain-timeout", "3s"]).await;
    let mut b = serial_session(&proxy, &tok).await;
    proxy.signal("TERM").unwrap();
    proxy
        .wait_log(&["draining: no new sessions", "sessions=1"])
        .await
        .unwrap();
    // No new sessions: the listener is closed.
    let addr = proxy.ws_addr();
    within("listener closed", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    // The live session still carries console bytes during the drain.
    b.io.write_all(b"during-drain").await.unwrap();
    read_until(&mut b.io, b"during-drain").await.unwrap();
    // At the deadline it is closed with a reason.
    let closed = within("close at the drain deadline", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1001), "{closed:?}");
    assert_eq!(closed.reason, "proxy shutting down", "{closed:?}");
    proxy
        .wait_log(&["drain over: closing the remaining sessions"])
        .await
        .unwrap();
    proxy.wait_log(&["consolegate stopped"]).await.unwrap();
    within("process exit", async {
        while proxy.alive() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

/// A drain ends as soon as the last session ends on its own.
#[tokio::test]
async fn drain_ends_when_the_last_session_closes() {
    let (_qemu, proxy, tok, _d) = serial_proxy(&["--drain-timeout", "10m"]).await;
    let b = serial_session(&proxy, &tok).await;
    proxy.signal("TERM").unwrap();
    proxy
        .wait_log(&["draining: no new sessions"])
        .await
        .unwrap();
    drop(b.io); // the tenant is done: close frame 1000
    proxy
        .wait_log(&["session closed", "end=tenant_closed"])
        .await
        .unwrap();
    proxy.wait_log(&["consolegate stopped"]).await.unwrap();
    assert!(
        !proxy.logs().contains("drain over"),
        "the drain waited for its deadline:\n{}",
        proxy.logs()
    );
}

/// `--drain-timeout 0`: SIGTERM closes sessions at once with 1001.
#[tokio::test]
async fn proxy_shutdown_closes_sessions_with_1001() {
    let (_qemu, proxy, tok, _d) = serial_proxy(&["--drain-timeout", "0"]).await;
    let b = serial_session(&proxy, &tok).await;
    proxy.signal("TERM").unwrap();
    let closed = within("close on shutdown", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1001), "{closed:?}");
}

#[tokio::test]
async fn fragmented_message_and_interleaved_ping_reach_the_guest() {
    let (_qemu, proxy, tok, _d) = serial_proxy(&[]).await;
    let mut io = raw_websocket(
        proxy.ws_addr(),
        &proxy.transport(),
        &format!("/websockify?token={tok}"),
        &["Sec-WebSocket-Protocol: binary"],
    )
    .await
    .unwrap();
    let probe = format!("{:08x}", rand::random::<u32>());
    let mut msg = frame(false, 0, 2, Some(rand::random()), b"frag-");
    msg.extend(frame(true, 0, 9, Some(rand::random()), b"are-you-there"));
    msg.extend(frame(
        true,
        0,
        0,
        Some(rand::random()),
        format!("ment-{probe}\r").as_bytes(),
    ));
    let want = format!("frag-ment-{probe}");

    let mut data = Vec::new();
    let mut sent = false;
    let mut pong = false;
    within("echo of a fragmented message", async {
        while !(pong && contains(&data, want.as_bytes())) {
            let f = http::read_frame(&mut io).await?;
            match f.opcode {
                2 | 0 => data.extend_from_slice(&f.payload),
                10 => {
                    anyhow::ensure!(
                        f.payload == b"are-you-there",
                        "pong payload {:?}",
                        f.payload
                    );
                    pong = true;
                }
                8 => anyhow::bail!("closed: {:?}", String::from_utf8_lossy(&f.payload)),
                _ => {}
            }
            if !sent && contains(&data, SERIAL_BANNER) {
                http::write_all(&mut io, &msg).await?;
                sent = true;
            }
        }
        anyhow::Ok(())
    })
    .await
    .unwrap()
    .unwrap();
}

#[tokio::test]
async fn responsive_client_outlives_several_keepalive_pings() {
    let (_qemu, proxy, tok, _d) = serial_proxy(&["--ping-interval", "1s"]).await;
    let mut b = serial_session(&proxy, &tok).await;
    // Four ping intervals: a client that answers pings (tungstenite does)
    // must still be connected afterwards.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !b.closed.is_finished(),
        "session closed despite answering pings"
    );
    b.io.write_all(b"still-here").await.unwrap();
    read_until(&mut b.io, b"still-here").await.unwrap();
}

#[tokio::test]
async fn token_directory_skips_dotfiles_and_picks_up_new_files() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let dir = token_dir();
    let (a, hidden, c) = (random_token(), random_token(), random_token());
    let target = qemu.vnc.websockify_target();
    write_websockify_tokens(&dir.path().join("a"), &[(&a, target.clone())]).unwrap();
    write_websockify_tokens(&dir.path().join(".hidden"), &[(&hidden, target.clone())]).unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[dir.path()]))
        .await
        .unwrap();
    let t = proxy.transport();
    let req = |tok: &str| WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");

    ws::rfb_over_ws(proxy.ws_addr(), &t, &req(&a), Mode::Binary)
        .await
        .unwrap();
    assert_eq!(
        ws::connect(proxy.ws_addr(), &t, &req(&hidden))
            .await
            .unwrap()
            .status(),
        403,
        "a token from a dotfile was accepted"
    );

    write_websockify_tokens(&dir.path().join("c"), &[(&c, target)]).unwrap();
    let w = within_for(Duration::from_secs(30), "new file picked up", async {
        loop {
            match ws::connect(proxy.ws_addr(), &t, &req(&c)).await.unwrap() {
                WsOutcome::Upgraded { ws, .. } => return *ws,
                WsOutcome::Refused { .. } => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    rfb::check_session(&mut b.io).await.unwrap();
}

/// A VNC tenant that upgrades but never answers the RFB handshake is closed
/// when --handshake-timeout expires, and is not pinged before that.
#[tokio::test]
async fn vnc_tenant_stuck_in_rfb_handshake_is_closed_at_handshake_timeout() {
    let mut spec = ProxySpec::tls_ws(&[]);
    spec.handshake_timeout = Some("2s".into());
    spec.extra = vec!["--ping-interval".into(), "1s".into()];
    let s = consolegate_tests::scenario::vnc_behind_proxy(Sock::Tcp, spec)
        .await
        .unwrap();
    let mut io = raw_websocket(
        s.proxy.ws_addr(),
        &s.proxy.transport(),
        &format!("/websockify?token={}", s.token),
        &["Sec-WebSocket-Protocol: binary"],
    )
    .await
    .unwrap();
    let mut pings = 0;
    let mut data = Vec::new();
    let (code, reason) = within("close of a stuck RFB handshake", async {
        loop {
            let f = http::read_frame(&mut io).await?;
            match f.opcode {
                9 => pings += 1,
                2 | 0 => data.extend_from_slice(&f.payload),
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
    assert!(data.starts_with(b"RFB 003.008\n"), "tenant got {data:?}");
    assert_eq!(pings, 0, "pinged during the console handshake");
    assert_eq!(
        code,
        Some(consolegate_tests::CLOSE_COMPUTE_ERROR),
        "reason {reason:?}"
    );
}
