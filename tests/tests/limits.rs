//! Session limits against a real QEMU VNC server (which takes many shared
//! clients): per token, per tenant address and in total, each refused with
//! its own status and reason while other sessions go on; and the maximum
//! session duration, which closes WebSocket sessions with 1001 and a reason
//! and ends CONNECT tunnels.

use consolegate_tests::http::{bearer, connect_tunnel, read_to_close};
use consolegate_tests::proxy::{Proxy, ProxySpec, write_websockify_tokens};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::ws::{self, Mode, WsBytes, WsRequest};
use consolegate_tests::{random_token, rfb, within};

async fn vnc() -> Qemu {
    Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap()
}

/// A proxy with `tokens` tokens for `qemu` and these limit flags.
async fn proxy(
    qemu: &Qemu,
    tokens: usize,
    flags: &[&str],
) -> (Proxy, Vec<String>, tempfile::TempDir) {
    let dir = token_dir();
    let toks: Vec<String> = (0..tokens).map(|_| random_token()).collect();
    let entries: Vec<(&str, String)> = toks
        .iter()
        .map(|t| (t.as_str(), qemu.vnc.websockify_target()))
        .collect();
    let file = dir.path().join("tokens");
    write_websockify_tokens(&file, &entries).unwrap();
    let mut spec = ProxySpec::plain_ws(&[&file]);
    spec.connect_listen = vec!["127.0.0.1:0".into()];
    spec.extra = flags.iter().map(|s| s.to_string()).collect();
    (Proxy::start(spec).await.unwrap(), toks, dir)
}

fn req(token: &str) -> WsRequest {
    WsRequest::path(format!("/websockify?token={token}")).protocol("binary")
}

/// An established console (RFB handshake done), held open.
async fn open(p: &Proxy, token: &str) -> (WsBytes, rfb::ServerInit) {
    let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req(token))
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(socket, Mode::Binary);
    let init = within("RFB handshake", rfb::handshake(&mut b.io))
        .await
        .unwrap()
        .unwrap();
    (b, init)
}

async fn status(p: &Proxy, token: &str) -> u16 {
    ws::connect(p.ws_addr(), &p.transport(), &req(token))
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn per_token_and_per_source_limits() {
    let qemu = vnc().await;
    let (p, t, _d) = proxy(
        &qemu,
        3,
        &[
            "--max-sessions-per-token",
            "2",
            "--max-sessions-per-source",
            "3",
        ],
    )
    .await;
    // Per token: the third session of one token is refused (429), the
    // others go on.
    let (a1, _) = open(&p, &t[0]).await;
    let (mut a2, mut init2) = open(&p, &t[0]).await;
    assert_eq!(status(&p, &t[0]).await, 429);
    p.wait_log(&["session refused", "reason=token_session_limit"])
        .await
        .unwrap();
    // Per source: a fourth session from 127.0.0.1, with another token,
    // over either front end.
    let (b1, _) = open(&p, &t[1]).await;
    assert_eq!(status(&p, &t[2]).await, 429);
    p.wait_log(&["session refused", "reason=source_session_limit"])
        .await
        .unwrap();
    let tunnel = connect_tunnel(
        p.connect_addr(),
        &format!("{}:0", t[2]),
        Some(&bearer(&t[2])),
    )
    .await
    .unwrap();
    assert_eq!(tunnel.status(), 429);
    // A freed slot comes back.
    drop(a1);
    p.wait_log(&["session closed"]).await.unwrap();
    within("slot released", async {
        while status(&p, &t[2]).await != 101 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    // The sessions that were admitted never noticed.
    within("update", rfb::full_update(&mut a2.io, &mut init2))
        .await
        .unwrap()
        .unwrap();
    drop(b1);
}

#[tokio::test]
async fn total_limit_refuses_with_503() {
    let qemu = vnc().await;
    let (p, t, _d) = proxy(&qemu, 2, &["--max-sessions", "1"]).await;
    let held = open(&p, &t[0]).await;
    assert_eq!(status(&p, &t[1]).await, 503);
    p.wait_log(&["session refused", "reason=too_many_sessions", "side=proxy"])
        .await
        .unwrap();
    drop(held);
}

#[tokio::test]
async fn max_session_duration_closes_websocket_and_connect_sessions() {
    let qemu = vnc().await;
    let (p, t, _d) = proxy(&qemu, 1, &["--max-session-duration", "2s"]).await;
    let (b, _) = open(&p, &t[0]).await;
    let closed = within("close at the maximum duration", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1001), "{closed:?}");
    assert_eq!(closed.reason, "maximum session duration reached");
    let mut io = connect_tunnel(
        p.connect_addr(),
        &format!("{}:0", t[0]),
        Some(&bearer(&t[0])),
    )
    .await
    .unwrap()
    .tunnel()
    .unwrap();
    rfb::handshake(&mut io).await.unwrap();
    // The tunnel ends (EOF) at the deadline; everything before it arrived.
    within(
        "tunnel closed at the maximum duration",
        read_to_close(&mut io),
    )
    .await
    .unwrap();
    p.wait_log_count(&["session closed", "end=max_duration"], 2)
        .await
        .unwrap();
}
