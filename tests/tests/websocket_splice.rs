//! The spliced WebSocket pump (`--datapath splice`, binary WebSocket,
//! plain legs) against a real QEMU serial console: control frames between
//! spliced frames and every way a session ends. Split from `kernel.rs`,
//! which moves bulk through each data path.

use consolegate_tests::fake::EchoServer;
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec, raw_token, write_toml_tokens};
use consolegate_tests::random_token;
use consolegate_tests::scenario::token_dir;
use consolegate_tests::ws;
use tokio::io::AsyncWriteExt as _;

/// The spliced WebSocket pump against QEMU's serial console: a fragmented
/// message with an interleaved ping (the pong is written between spliced
/// frames), keepalive pings with a responsive client, and the close codes
/// for compute exit (1000), compute reset (1011) and proxy shutdown (1001).
#[tokio::test]
async fn websocket_splice_control_frames_and_session_ends() {
    use consolegate_tests::fake::ResetAfterRead;
    use consolegate_tests::http::{self, frame, raw_websocket, read_close};
    use consolegate_tests::proxy::TomlToken;
    use consolegate_tests::qemu::{Qemu, QemuOptions, SERIAL_BANNER, Sock, read_until};
    use consolegate_tests::{contains, within};

    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Tcp,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let reset = ResetAfterRead::start().await.unwrap();
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let (serial_tok, reset_tok, echo_tok) = (random_token(), random_token(), random_token());
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(
        &file,
        &[
            TomlToken {
                token: serial_tok.clone(),
                kind: Some("serial".into()),
                target: Some(authority(qemu.serial.tcp())),
                ..TomlToken::default()
            },
            raw_token(&reset_tok, reset.addr),
            raw_token(&echo_tok, echo.addr),
        ],
    )
    .unwrap();
    let mut spec = ProxySpec::plain_ws(&[&file]);
    spec.extra = [
        "--datapath",
        "splice",
        "--ping-interval",
        "1s",
        "--drain-timeout",
        "0",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Proxy::start(spec).await.unwrap();
    let path = |t: &str| format!("/websockify?token={t}");
    let binary = ["Sec-WebSocket-Protocol: binary"];

    // Fragmented message + interleaved ping, hand-driven frames. Ping
    // frames from the proxy (every second) are skipped.
    let mut io = raw_websocket(
        proxy.ws_addr(),
        &Transport::Plain,
        &path(&serial_tok),
        &binary,
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
    let (mut data, mut sent, mut pong) = (Vec::new(), false, false);
    within("echo of a fragmented message", async {
        while !(pong && contains(&data, want.as_bytes())) {
            let f = http::read_frame(&mut io).await?;
            match f.opcode {
                2 | 0 => data.extend_from_slice(&f.payload),
                10 => {
                    anyhow::ensure!(f.payload == b"are-you-there", "pong {:?}", f.payload);
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
    proxy
        .wait_log(&["session established", "datapath=\"splice\""])
        .await
        .unwrap();
    drop(io);
    proxy.wait_log(&["session closed"]).await.unwrap();

    // A responsive client (tungstenite answers pings) outlives several
    // keepalive pings; then the console exits: close 1000.
    let req = ws::WsRequest::path(path(&serial_tok)).protocol("binary");
    let mut b = within("second serial session", async {
        loop {
            let (w, _) = ws::connect(proxy.ws_addr(), &Transport::Plain, &req)
                .await
                .unwrap()
                .upgraded()
                .unwrap();
            let mut b = ws::into_bytes(w, ws::Mode::Binary);
            // The guest stopped printing its banner once it got a byte: it
            // echoes now. QEMU's chardev takes the next client once the
            // first is gone, so retry until the echo comes back.
            b.io.write_all(b"second-session").await.unwrap();
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                read_until(&mut b.io, b"second-session"),
            )
            .await;
            if matches!(got, Ok(Ok(_))) {
                return b;
            }
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        !b.closed.is_finished(),
        "session closed despite answering pings"
    );
    b.io.write_all(b"still-here").await.unwrap();
    read_until(&mut b.io, b"still-here").await.unwrap();
    drop(qemu);
    let closed = within("close after compute exit", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1000), "{closed:?}");

    // Compute reset: close 1011.
    let mut io = raw_websocket(
        proxy.ws_addr(),
        &Transport::Plain,
        &path(&reset_tok),
        &binary,
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
        "{reason:?}"
    );

    // Proxy shutdown: close 1001.
    let req = ws::WsRequest::path(path(&echo_tok)).protocol("binary");
    let (w, _) = ws::connect(proxy.ws_addr(), &Transport::Plain, &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, ws::Mode::Binary);
    b.io.write_all(b"ping-me").await.unwrap();
    read_until(&mut b.io, b"ping-me").await.unwrap();
    proxy.signal("TERM").unwrap();
    let closed = within("close on shutdown", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1001), "{closed:?}");
}
