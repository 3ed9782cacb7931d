//! The HTTP CONNECT front end against a real QEMU VNC server: allowed
//! tunnels carry a full RFB session; refusals never relay anywhere.

use consolegate_tests::fake::{EchoServer, dead_port};
use consolegate_tests::http::{self, ConnectOutcome, basic, bearer, connect_tunnel};
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{
    Proxy, ProxySpec, raw_token, write_toml_tokens, write_websockify_tokens,
};
use consolegate_tests::qemu::Sock;
use consolegate_tests::scenario::{token_dir, vnc_behind_proxy};
use consolegate_tests::{random_token, rfb};

async fn rfb_through(outcome: ConnectOutcome) {
    let mut io = outcome.tunnel().unwrap();
    let (init, fb) = rfb::check_session(&mut io).await.unwrap();
    assert_eq!((fb.width, fb.height), (init.width, init.height));
}

#[tokio::test]
async fn connect_bearer_and_basic_auth_then_rfb() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::connect(&[]))
        .await
        .unwrap();
    let target = authority(s.qemu.vnc.tcp());
    let p = s.proxy.connect_addr();

    let o = connect_tunnel(p, &target, Some(&bearer(&s.token)))
        .await
        .unwrap();
    assert_eq!(o.status(), 200);
    rfb_through(o).await;

    let o = connect_tunnel(p, &target, Some(&basic("anyone", &s.token)))
        .await
        .unwrap();
    assert_eq!(o.status(), 200);
    rfb_through(o).await;
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn connect_token_as_host_selects_target() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::connect(&[]))
        .await
        .unwrap();
    let o = connect_tunnel(
        s.proxy.connect_addr(),
        &format!("{}:0", s.token),
        Some(&bearer(&s.token)),
    )
    .await
    .unwrap();
    assert_eq!(o.status(), 200);
    rfb_through(o).await;
}

#[tokio::test]
async fn connect_auth_none_known_target_only() {
    let mut spec = ProxySpec::connect(&[]);
    spec.connect_auth = Some("none".into());
    let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
    let p = s.proxy.connect_addr();
    let o = connect_tunnel(p, &authority(s.qemu.vnc.tcp()), None)
        .await
        .unwrap();
    assert_eq!(o.status(), 200);
    rfb_through(o).await;

    // A reachable loopback service that no token names: never an open relay.
    let other = EchoServer::start().await.unwrap();
    let o = connect_tunnel(p, &authority(other.addr), None)
        .await
        .unwrap();
    assert_eq!(o.status(), 403);
    assert_eq!(other.accepted(), 0, "the proxy dialled an unknown target");
    s.proxy
        .wait_log(&["session refused", "reason=target_not_allowed"])
        .await
        .unwrap();
}

#[tokio::test]
async fn connect_refusals_407_403_405() {
    let echo = EchoServer::start().await.unwrap();
    let other = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("tokens");
    write_websockify_tokens(&file, &[(&tok, authority(echo.addr))]).unwrap();
    let proxy = Proxy::start(ProxySpec::connect(&[&file])).await.unwrap();
    let p = proxy.connect_addr();

    // Missing auth: 407 with the Basic challenge.
    match connect_tunnel(p, &authority(echo.addr), None)
        .await
        .unwrap()
    {
        ConnectOutcome::Refused(r) => {
            assert_eq!(r.status, 407);
            let challenge = r.header("proxy-authenticate").unwrap_or_default();
            assert_eq!(challenge, r#"Basic realm="consolegate""#);
        }
        ConnectOutcome::Tunnel(..) => panic!("tunnel without authentication"),
    }
    proxy
        .wait_log(&["session refused", "reason=proxy_auth_required"])
        .await
        .unwrap();

    // A valid token whose target is not the CONNECT target: 403.
    let o = connect_tunnel(p, &authority(other.addr), Some(&bearer(&tok)))
        .await
        .unwrap();
    assert_eq!(o.status(), 403);
    assert_eq!(
        other.accepted(),
        0,
        "the proxy dialled a target the token does not name"
    );

    // Another method on the CONNECT listener: 405.
    let (r, _io) = http::exchange(
        p,
        &Transport::Plain,
        format!(
            "GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: Bearer {tok}\r\n\r\n",
            authority(echo.addr)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405);
    proxy
        .wait_log(&["session refused", "reason=method_not_allowed"])
        .await
        .unwrap();
    assert_eq!(echo.accepted(), 0);
    proxy.assert_secrets_not_logged(&[&tok]);
}

#[tokio::test]
async fn connect_compute_down_is_502_and_half_close_passes() {
    let echo = EchoServer::start().await.unwrap();
    let dead = dead_port().unwrap();
    let dir = token_dir();
    let (live_tok, dead_tok) = (random_token(), random_token());
    let file = dir.path().join("tokens.toml");
    let mut dead_vnc = raw_token(&dead_tok, dead);
    dead_vnc.kind = None; // vnc: refused at dial time, before any RFB
    write_toml_tokens(&file, &[raw_token(&live_tok, echo.addr), dead_vnc]).unwrap();
    let proxy = Proxy::start(ProxySpec::connect(&[&file])).await.unwrap();
    let p = proxy.connect_addr();

    let o = connect_tunnel(p, &authority(dead), Some(&bearer(&dead_tok)))
        .await
        .unwrap();
    assert_eq!(o.status(), 502);
    proxy
        .wait_log(&["session refused", "reason=compute_unreachable"])
        .await
        .unwrap();

    // Half-close: after our FIN, the echo's reply still arrives, then EOF.
    let mut io = connect_tunnel(p, &authority(echo.addr), Some(&bearer(&live_tok)))
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let payload = vec![0x5au8; 100_000];
    http::write_all(&mut io, &payload).await.unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut io).await.unwrap();
    let back = consolegate_tests::within("echo after half-close", http::read_to_close(&mut io))
        .await
        .unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload);
}

#[tokio::test]
async fn connect_over_ipv6_listener_to_ipv6_target() {
    let mut spec = ProxySpec::connect(&[]);
    spec.connect_listen = vec!["[::1]:0".into()];
    let s = vnc_behind_proxy(Sock::Tcp6, spec).await.unwrap();
    let p = s.proxy.connect_addr();
    assert!(p.is_ipv6(), "{p}");
    let o = connect_tunnel(p, &authority(s.qemu.vnc.tcp()), Some(&bearer(&s.token)))
        .await
        .unwrap();
    assert_eq!(o.status(), 200);
    rfb_through(o).await;
}

#[tokio::test]
async fn connect_slow_head_gets_408() {
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("tokens");
    write_websockify_tokens(&file, &[(&tok, authority(echo.addr))]).unwrap();
    let mut spec = ProxySpec::connect(&[&file]);
    spec.handshake_timeout = Some("2s".into());
    let proxy = Proxy::start(spec).await.unwrap();
    let mut io = consolegate_tests::net::tcp(proxy.connect_addr())
        .await
        .unwrap();
    // Half a head, then nothing.
    http::write_all(
        &mut io,
        format!("CONNECT {} HTTP/1.1\r\nProxy-Auth", authority(echo.addr)).as_bytes(),
    )
    .await
    .unwrap();
    let r = consolegate_tests::within("408", http::read_response_head(&mut io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 408);
    proxy
        .wait_log(&["session refused", "reason=handshake_timeout"])
        .await
        .unwrap();
    assert_eq!(echo.accepted(), 0);
}

#[tokio::test]
async fn connect_dial_timeout_is_504() {
    let hole = consolegate_tests::fake::Blackhole::new().unwrap();
    hole.verify().unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("tokens");
    write_websockify_tokens(&file, &[(&tok, authority(hole.addr))]).unwrap();
    let mut spec = ProxySpec::connect(&[&file]);
    spec.connect_timeout = Some("1s".into());
    let proxy = Proxy::start(spec).await.unwrap();
    let o = connect_tunnel(
        proxy.connect_addr(),
        &authority(hole.addr),
        Some(&bearer(&tok)),
    )
    .await
    .unwrap();
    assert_eq!(o.status(), 504);
    proxy
        .wait_log(&["session refused", "reason=compute_timeout"])
        .await
        .unwrap();
}
