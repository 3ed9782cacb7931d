//! VNC over WebSocket (TLS and plain) to a real QEMU VNC server, with the
//! RFB 3.8 handshake and a full framebuffer update checked end to end.

use consolegate_tests::net::Transport;
use consolegate_tests::proxy::{ProxySpec, TomlToken, write_toml_tokens};
use consolegate_tests::qemu::Sock;
use consolegate_tests::rfb;
use consolegate_tests::scenario::{token_dir, vnc_behind_proxy};
use consolegate_tests::ws::{self, Mode, WsOutcome, WsRequest};

#[tokio::test]
async fn vnc_tls_binary_token_in_query() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let req = WsRequest::path(format!("/websockify?token={}", s.token)).protocol("binary");
    let (w, proto) = ws::connect(s.proxy.ws_addr(), &s.proxy.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    assert_eq!(proto.as_deref(), Some("binary"));
    let mut b = ws::into_bytes(w, Mode::Binary);
    let (init, fb) = rfb::check_session(&mut b.io).await.unwrap();
    assert_eq!((fb.width, fb.height), (init.width, init.height));
    // The tenant closes (1000); the proxy answers with 1000.
    drop(b.io);
    let closed = consolegate_tests::within("close handshake", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1000), "{closed:?}");
    // The session ends (we closed) and is logged with byte counts, never
    // with the token secret.
    let line = s.proxy.wait_log(&["session closed"]).await.unwrap();
    assert!(
        line.contains("bytes") && line.contains("duration"),
        "session closed without byte counts or duration: {line}"
    );
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn vnc_tls_base64_token_in_websockify_path() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let req = WsRequest::path(format!("/websockify/{}", s.token)).protocol("base64");
    ws::rfb_over_ws(s.proxy.ws_addr(), &s.proxy.transport(), &req, Mode::Base64)
        .await
        .unwrap();
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn vnc_tls_token_in_bare_path_and_in_cookie() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let t = s.proxy.transport();
    let bare = WsRequest::path(format!("/{}", s.token)).protocol("binary");
    ws::rfb_over_ws(s.proxy.ws_addr(), &t, &bare, Mode::Binary)
        .await
        .unwrap();
    for path in ["/websockify", "/"] {
        let cookie = WsRequest::path(path)
            .protocol("binary")
            .cookie(&format!("theme=dark; token={}; lang=en", s.token));
        ws::rfb_over_ws(s.proxy.ws_addr(), &t, &cookie, Mode::Binary)
            .await
            .unwrap_or_else(|e| panic!("cookie token on {path}: {e:#}"));
    }
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn vnc_unix_socket_server_websockify_and_toml_token_forms() {
    let s = vnc_behind_proxy(Sock::Unix, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let t = s.proxy.transport();
    // websockify form `tok: unix_socket:/path`.
    let req = WsRequest::path(format!("/websockify?token={}", s.token)).protocol("binary");
    ws::rfb_over_ws(s.proxy.ws_addr(), &t, &req, Mode::Binary)
        .await
        .unwrap();

    // TOML form `unix = "/path"`, in a second proxy reading a directory.
    let dir = token_dir();
    let tok = consolegate_tests::random_token();
    let unix = match &s.qemu.vnc {
        consolegate_tests::qemu::Endpoint::Unix(p) => p.clone(),
        other => panic!("not a UNIX socket: {other:?}"),
    };
    write_toml_tokens(
        &dir.path().join("vm.toml"),
        &[TomlToken {
            token: tok.clone(),
            unix: Some(unix),
            ..TomlToken::default()
        }],
    )
    .unwrap();
    let p2 = consolegate_tests::proxy::Proxy::start(ProxySpec::tls_ws(&[dir.path()]))
        .await
        .unwrap();
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("base64");
    ws::rfb_over_ws(p2.ws_addr(), &p2.transport(), &req, Mode::Base64)
        .await
        .unwrap();
}

#[tokio::test]
async fn vnc_over_ipv6_listener() {
    let mut spec = ProxySpec::tls_ws(&[]);
    spec.ws_listen = vec!["[::1]:0".into(), "127.0.0.1:0".into()];
    let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
    let v6 = s
        .proxy
        .websocket
        .iter()
        .copied()
        .find(|a| a.is_ipv6())
        .unwrap_or_else(|| panic!("no IPv6 address in the ready file: {:?}", s.proxy.websocket));
    assert!(s.proxy.websocket.iter().any(|a| a.is_ipv4()));
    // Same-origin over IPv6: Origin https://[::1]:port, Host [::1]:port.
    let req = WsRequest::path(format!("/websockify?token={}", s.token))
        .protocol("binary")
        .origin(&format!(
            "https://{}",
            consolegate_tests::net::authority(v6)
        ));
    ws::rfb_over_ws(v6, &s.proxy.transport(), &req, Mode::Binary)
        .await
        .unwrap();
}

#[tokio::test]
async fn vnc_plain_http_listener_without_subprotocol() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::plain_ws(&[]))
        .await
        .unwrap();
    // No subprotocol offered: binary mode and no protocol header.
    let req = WsRequest::path(format!("/websockify?token={}", s.token));
    ws::rfb_over_ws(s.proxy.ws_addr(), &Transport::Plain, &req, Mode::Binary)
        .await
        .unwrap();
}

#[tokio::test]
async fn subprotocol_negotiation_prefers_binary() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let t = s.proxy.transport();
    let path = format!("/websockify?token={}", s.token);
    // Both offered, base64 first: binary is preferred.
    let req = WsRequest::path(&path).protocol("base64").protocol("binary");
    let (ws, proto) = ws::connect(s.proxy.ws_addr(), &t, &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    assert_eq!(proto.as_deref(), Some("binary"));
    let mut b = ws::into_bytes(ws, Mode::Binary);
    rfb::check_session(&mut b.io).await.unwrap();
    drop(b);

    // An unknown protocol next to a known one is fine.
    let req = WsRequest::path(&path).protocol("chat").protocol("base64");
    let (_ws, proto) = ws::connect(s.proxy.ws_addr(), &t, &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    assert_eq!(proto.as_deref(), Some("base64"));

    // Only unknown ones: 400.
    let req = WsRequest::path(&path).protocol("chat").protocol("mqtt");
    match ws::connect(s.proxy.ws_addr(), &t, &req).await.unwrap() {
        WsOutcome::Refused { status, .. } => assert_eq!(status, 400),
        WsOutcome::Upgraded { protocol, .. } => {
            panic!("upgraded with only unknown subprotocols offered (got {protocol:?})")
        }
    }
    s.proxy
        .wait_log(&["session refused", "reason=bad_subprotocol"])
        .await
        .unwrap();
}

#[tokio::test]
async fn vnc_ipv6_compute_target_and_query_with_other_parameters() {
    // websockify form `tok: [::1]:port`.
    let s = vnc_behind_proxy(Sock::Tcp6, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    assert!(s.qemu.vnc.tcp().is_ipv6());
    let req = WsRequest::path(format!(
        "/websockify?autoconnect=1&token={}&resize=scale",
        s.token
    ))
    .protocol("binary");
    ws::rfb_over_ws(s.proxy.ws_addr(), &s.proxy.transport(), &req, Mode::Binary)
        .await
        .unwrap();
}

/// The proxy terminates the RFB security phase: every tenant sees exactly
/// one security type (None), and 3.3 / 3.7 tenants get their version's form.
#[tokio::test]
async fn tenant_sees_security_none_only_in_every_rfb_version() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let req = WsRequest::path(format!("/websockify?token={}", s.token)).protocol("binary");
    for minor in [8, 7, 3] {
        let (w, _) = ws::connect(s.proxy.ws_addr(), &s.proxy.transport(), &req)
            .await
            .unwrap()
            .upgraded()
            .unwrap();
        let mut b = ws::into_bytes(w, Mode::Binary);
        let mut init =
            consolegate_tests::within("RFB handshake", rfb::handshake_as(&mut b.io, minor))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("RFB 3.{minor}: {e:#}"));
        assert_eq!(init.security_types, vec![1], "RFB 3.{minor}");
        let fb = consolegate_tests::within("full update", rfb::full_update(&mut b.io, &mut init))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("RFB 3.{minor}: {e:#}"));
        assert_eq!((fb.width, fb.height), (init.width, init.height));
    }
}

/// Heads as real browsers write them: Firefox's `Connection: keep-alive,
/// Upgrade`, lower-case header names, mixed-case `WebSocket`; the compute
/// side's RFB greeting then arrives as a binary frame.
#[tokio::test]
async fn browser_style_upgrade_heads_are_accepted() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    let (a, t) = (s.proxy.ws_addr(), s.proxy.transport());
    let host = consolegate_tests::net::authority(a);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let heads = [
        format!(
            "GET /websockify?token={tok} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0\r\n\
             Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: binary\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\nPragma: no-cache\r\n\r\n",
            tok = s.token
        ),
        format!(
            "GET /websockify/{tok} HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\n\
             upgrade: WebSocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: {key}\r\n\
             sec-websocket-protocol: binary\r\n\r\n",
            tok = s.token
        ),
    ];
    for head in heads {
        let (resp, mut io) = consolegate_tests::http::exchange(a, &t, head.as_bytes())
            .await
            .unwrap();
        assert_eq!(resp.status, 101, "head:\n{head}");
        // RFC 6455's sample key and its accept value.
        assert_eq!(
            resp.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(resp.header("sec-websocket-protocol"), Some("binary"));
        assert_eq!(
            resp.header("sec-websocket-extensions"),
            None,
            "no extension was implemented, none may be accepted"
        );
        let f =
            consolegate_tests::within("RFB greeting", consolegate_tests::http::read_frame(&mut io))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(f.opcode, 2);
        assert_eq!(f.payload, b"RFB 003.008\n");
    }
    s.proxy.assert_secrets_not_logged(&[&s.token]);
}

#[tokio::test]
async fn empty_tokens_are_missing_tokens() {
    let s = vnc_behind_proxy(Sock::Unix, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    for path in ["/websockify?token=", "/websockify", "/", "/?token="] {
        let req = WsRequest::path(path).protocol("binary");
        let status = ws::connect(s.proxy.ws_addr(), &s.proxy.transport(), &req)
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401, "{path}");
    }
}
