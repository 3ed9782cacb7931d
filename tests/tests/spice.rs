//! SPICE consoles (TOML `kind = "spice"`) through the proxy to QEMU's real
//! SPICE server. The proxy terminates the link phase on both sides: it
//! answers QEMU's ticket challenge with the password from the token file
//! over TLS verified against a private CA, while the tenant's own ticket
//! is ignored; it tracks main-channel session ids so a secondary channel
//! may join only a session its own token opened.

use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::net::{BoxIo, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, write_toml_tokens};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::spice::{
    CHANNEL_DISPLAY, CHANNEL_INPUTS, LINK_ERR_BAD_CONNECTION_ID, LINK_ERR_OK,
    LINK_ERR_PERMISSION_DENIED, LinkOutcome, LinkRequest, SpicePki, SpiceQemu, SpiceToken, link,
    link_main_channel, open_session, open_session_as, write_spice_tokens,
};
use consolegate_tests::ws::{self, Mode, WsBytes, WsRequest};
use consolegate_tests::{random_token, within};

/// QEMU without ticketing, plain TCP, no compute profile: the link still
/// completes through the proxy.
#[tokio::test]
async fn spice_link_over_websocket_and_connect() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Unix,
        spice: true,
    })
    .await
    .unwrap();
    let spice = qemu.spice.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("spice.toml");
    write_toml_tokens(
        &file,
        &[TomlToken {
            token: tok.clone(),
            kind: Some("spice".into()),
            target: Some(authority(spice)),
            ..TomlToken::default()
        }],
    )
    .unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.connect_listen = vec!["127.0.0.1:0".into()];
    let proxy = Proxy::start(spec).await.unwrap();

    let mut b = ws_tenant(&proxy, &tok).await;
    let reply = within("SPICE link over WebSocket", link_main_channel(&mut b.io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.error, 0, "{reply:?}");
    drop(b);

    let mut io = connect_tenant(&proxy, &tok, spice).await;
    let reply = within("SPICE link over CONNECT", link_main_channel(&mut io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.error, 0, "{reply:?}");
    proxy.assert_secrets_not_logged(&[&tok]);
}

/// A QEMU SPICE server with TLS and a ticket, and a proxy (TLS WebSocket +
/// CONNECT listeners) that reaches it with the compute flags of `pki`.
struct Setup {
    qemu: SpiceQemu,
    proxy: Proxy,
    ticket: String,
    _dir: tempfile::TempDir,
}

/// `tokens` are (token, password) pairs, all for QEMU's TLS port; `pki`
/// picks the proxy's compute CA and client certificate (None: QEMU's own).
async fn setup(tokens: &[(&str, Option<&str>)], other_pki: bool) -> Setup {
    let ticket = format!("tk{:08x}", rand_u32());
    let qemu = SpiceQemu::start(&ticket).await.unwrap();
    eprintln!("QEMU: {}", qemu.command_line);
    let dir = token_dir();
    let file = dir.path().join("spice.toml");
    let list: Vec<SpiceToken> = tokens
        .iter()
        .map(|(t, p)| SpiceToken {
            token: (*t).to_owned(),
            target: qemu.tls,
            password: p.map(|p| p.replace("{ticket}", &ticket)),
        })
        .collect();
    write_spice_tokens(&file, &list).unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.connect_listen = vec!["127.0.0.1:0".into()];
    spec.extra = if other_pki {
        SpicePki::generate(&dir.path().join("other-pki"))
            .unwrap()
            .proxy_flags()
    } else {
        qemu.pki.proxy_flags()
    };
    let proxy = Proxy::start(spec).await.unwrap();
    Setup {
        qemu,
        proxy,
        ticket,
        _dir: dir,
    }
}

fn rand_u32() -> u32 {
    u32::from_str_radix(&random_token()[..8], 16).unwrap()
}

async fn ws_tenant(proxy: &Proxy, tok: &str) -> WsBytes {
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    let (w, _) = ws::connect(proxy.ws_addr(), &proxy.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    ws::into_bytes(w, Mode::Binary)
}

async fn connect_tenant(proxy: &Proxy, tok: &str, target: std::net::SocketAddr) -> BoxIo {
    connect_tunnel(proxy.connect_addr(), &authority(target), Some(&bearer(tok)))
        .await
        .unwrap()
        .tunnel()
        .unwrap()
}

#[tokio::test]
async fn main_and_secondary_channels_over_tls_websocket() {
    let tok = random_token();
    let s = setup(&[(&tok, Some("{ticket}"))], false).await;

    // The tenant's ticket is wrong: the proxy ignores it.
    let mut main = ws_tenant(&s.proxy, &tok).await;
    let id = within(
        "main channel",
        open_session(&mut main.io, b"not the ticket"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_ne!(id, 0);

    for (channel, ticket) in [(CHANNEL_INPUTS, &b""[..]), (CHANNEL_DISPLAY, b"x")] {
        let mut b = ws_tenant(&s.proxy, &tok).await;
        let req = LinkRequest::secondary(id, channel);
        let l = within("secondary channel", link(&mut b.io, &req, ticket))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            l.outcome,
            LinkOutcome::Result(LINK_ERR_OK),
            "channel {channel}"
        );
    }
    s.proxy
        .wait_log(&["session established", "spice tls main:0"])
        .await
        .unwrap();
    s.proxy
        .wait_log(&["session established", "spice tls inputs:0"])
        .await
        .unwrap();
    s.proxy.assert_secrets_not_logged(&[&tok, &s.ticket]);
}

#[tokio::test]
async fn main_and_secondary_channels_over_connect() {
    let tok = random_token();
    let s = setup(&[(&tok, Some("{ticket}"))], false).await;
    let target = s.qemu.tls;

    // An old client: no auth selection, no mini header (so the proxy
    // forwards SPICE_MSG_MAIN_INIT with the full SpiceDataHeader).
    let old = LinkRequest {
        auth_selection: false,
        mini_header: false,
        ..LinkRequest::main()
    };
    let mut main = connect_tenant(&s.proxy, &tok, target).await;
    let id = within("main channel", open_session_as(&mut main, &old, b""))
        .await
        .unwrap()
        .unwrap();

    let mut inputs = connect_tenant(&s.proxy, &tok, target).await;
    let req = LinkRequest {
        connection_id: id,
        channel_type: CHANNEL_INPUTS,
        ..old
    };
    let l = within("inputs channel", link(&mut inputs, &req, b"whatever"))
        .await
        .unwrap()
        .unwrap();
    assert!(l.ok(), "{l:?}");
    s.proxy
        .wait_log(&["console handshake done", "spice tls inputs:0"])
        .await
        .unwrap();
    s.proxy.assert_secrets_not_logged(&[&tok, &s.ticket]);
}

#[tokio::test]
async fn wrong_spice_password_is_reported_and_other_sessions_go_on() {
    let good = random_token();
    let bad = random_token();
    let s = setup(
        &[(&good, Some("{ticket}")), (&bad, Some("wrong-password"))],
        false,
    )
    .await;

    let mut main = ws_tenant(&s.proxy, &good).await;
    let id = within("main channel", open_session(&mut main.io, b""))
        .await
        .unwrap()
        .unwrap();

    // Same tenant ticket, but the proxy holds the wrong SPICE password.
    let mut b = ws_tenant(&s.proxy, &bad).await;
    let l = within("main channel", link(&mut b.io, &LinkRequest::main(), b""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.outcome, LinkOutcome::Result(LINK_ERR_PERMISSION_DENIED));
    let closed = within("close frame", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1011), "{closed:?}");
    let line = s
        .proxy
        .wait_log(&["console handshake failed", "compute_auth_failed"])
        .await
        .unwrap();
    assert!(line.contains("rejected the SPICE ticket"), "{line}");
    assert!(line.contains("permission denied"), "{line}");

    // The first session is untouched: it can still add channels.
    let mut c = ws_tenant(&s.proxy, &good).await;
    let l = within(
        "inputs channel",
        link(&mut c.io, &LinkRequest::secondary(id, CHANNEL_INPUTS), b""),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(l.ok(), "{l:?}");
    s.proxy
        .assert_secrets_not_logged(&[&good, &bad, &s.ticket, "wrong-password"]);
}

#[tokio::test]
async fn secondary_channel_of_an_unknown_or_foreign_session_is_refused() {
    let owner = random_token();
    let other = random_token();
    let s = setup(
        &[(&owner, Some("{ticket}")), (&other, Some("{ticket}"))],
        false,
    )
    .await;

    let mut main = ws_tenant(&s.proxy, &owner).await;
    let id = within("main channel", open_session(&mut main.io, b""))
        .await
        .unwrap()
        .unwrap();

    // An id no session has.
    let mut b = ws_tenant(&s.proxy, &owner).await;
    let req = LinkRequest::secondary(id.wrapping_add(1), CHANNEL_INPUTS);
    let l = within("unknown id", link(&mut b.io, &req, b""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        l.outcome,
        LinkOutcome::ReplyError(LINK_ERR_BAD_CONNECTION_ID)
    );

    // The right id, but another token: refused, over CONNECT too.
    let mut io = connect_tenant(&s.proxy, &other, s.qemu.tls).await;
    let req = LinkRequest::secondary(id, CHANNEL_INPUTS);
    let l = within("foreign session", link(&mut io, &req, b""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        l.outcome,
        LinkOutcome::ReplyError(LINK_ERR_BAD_CONNECTION_ID)
    );
    s.proxy
        .wait_log_count(&["console handshake failed", "spice_session_not_owned"], 2)
        .await
        .unwrap();

    // The owner's session is unaffected.
    let mut c = ws_tenant(&s.proxy, &owner).await;
    let l = within("owned session", link(&mut c.io, &req, b""))
        .await
        .unwrap()
        .unwrap();
    assert!(l.ok(), "{l:?}");

    // Once the main channel ends, its id is no longer joinable.
    drop(main);
    let refused = within("ended session", async {
        loop {
            let mut d = ws_tenant(&s.proxy, &owner).await;
            let l = link(&mut d.io, &LinkRequest::secondary(id, CHANNEL_DISPLAY), b"")
                .await
                .unwrap();
            if l.outcome == LinkOutcome::ReplyError(LINK_ERR_BAD_CONNECTION_ID) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    refused.unwrap();
}

#[tokio::test]
async fn compute_ca_mismatch_is_refused_with_a_clear_log_line() {
    let tok = random_token();
    let mut s = setup(&[(&tok, Some("{ticket}"))], true).await;

    let mut b = ws_tenant(&s.proxy, &tok).await;
    let l = within("main channel", link(&mut b.io, &LinkRequest::main(), b""))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(l.outcome, LinkOutcome::ReplyError(code) if code != LINK_ERR_OK),
        "{l:?}"
    );
    let closed = within("close frame", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1011), "{closed:?}");
    assert!(closed.reason.contains("TLS"), "{closed:?}");
    let line = s
        .proxy
        .wait_log(&["console handshake failed", "compute_tls"])
        .await
        .unwrap();
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");

    // The proxy and QEMU both keep serving.
    assert!(s.proxy.alive());
    assert!(s.qemu.alive());
    let mut io = connect_tenant(&s.proxy, &tok, s.qemu.tls).await;
    let l = within(
        "again over CONNECT",
        link(&mut io, &LinkRequest::main(), b""),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(matches!(l.outcome, LinkOutcome::ReplyError(_)), "{l:?}");
    s.proxy
        .wait_log_count(&["console handshake failed", "compute_tls"], 2)
        .await
        .unwrap();
}
