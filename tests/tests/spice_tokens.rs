//! Single-use tokens and SPICE's multi-channel sessions, against QEMU's
//! real SPICE server: the main channel takes the one use; the session's
//! secondary channels (matched by connection id) are admitted without
//! using anything; another tenant's main channel is refused; after the
//! session ends, only the same tenant may reconnect, inside the window.

use std::net::IpAddr;

use consolegate_tests::http::{ConnectOutcome, bearer, connect_tunnel_from};
use consolegate_tests::net::{BoxIo, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec, write_atomic};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::spice::{
    CHANNEL_INPUTS, LINK_ERR_PERMISSION_DENIED, LinkOutcome, LinkRequest, link, open_session,
};
use consolegate_tests::{random_token, within};

async fn tenant(proxy: &Proxy, src: &str, target: &str, tok: &str) -> ConnectOutcome {
    connect_tunnel_from(
        src.parse::<IpAddr>().unwrap(),
        proxy.connect_addr(),
        target,
        Some(&bearer(tok)),
    )
    .await
    .unwrap()
}

async fn tunnel(proxy: &Proxy, src: &str, target: &str, tok: &str) -> BoxIo {
    tenant(proxy, src, target, tok).await.tunnel().unwrap()
}

#[tokio::test]
async fn single_use_spice_token_admits_its_secondary_channels_only() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Unix,
        spice: true,
    })
    .await
    .unwrap();
    let target = authority(qemu.spice.unwrap());
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("spice.toml");
    write_atomic(
        &file,
        &format!(
            "[[token]]\ntoken = \"{tok}\"\nkind = \"spice\"\ntarget = \"{target}\"\n\
             max_uses = 1\nreconnect_window = \"60s\"\n"
        ),
    )
    .unwrap();
    let proxy = Proxy::start(ProxySpec::connect(&[&file])).await.unwrap();

    // Tenant A opens the session: the main channel takes the only use.
    let mut main = tunnel(&proxy, "127.0.0.2", &target, &tok).await;
    let id = within("main channel", open_session(&mut main, b""))
        .await
        .unwrap()
        .unwrap();
    // Its secondary channels join by connection id and use nothing. (Only
    // inputs: the QEMU/spice-server here stops listening on its port once
    // a session that had a display channel ends, and this test reconnects.)
    let mut secondaries = Vec::new();
    for channel in [CHANNEL_INPUTS] {
        let mut io = tunnel(&proxy, "127.0.0.2", &target, &tok).await;
        let l = within(
            "secondary channel",
            link(&mut io, &LinkRequest::secondary(id, channel), b""),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(l.ok(), "channel {channel}: {l:?}");
        secondaries.push(io);
    }

    // Tenant B cannot open a second session with the used token.
    let mut other = tunnel(&proxy, "127.0.0.3", &target, &tok).await;
    let l = within(
        "second main channel",
        link(&mut other, &LinkRequest::main(), b""),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        l.outcome,
        LinkOutcome::ReplyError(LINK_ERR_PERMISSION_DENIED),
        "{l:?}"
    );
    proxy
        .wait_log(&["console handshake failed", "token_consumed"])
        .await
        .unwrap();

    // The session ends; no live session is left for the token.
    drop(main);
    drop(secondaries);
    proxy.wait_log_count(&["session closed"], 2).await.unwrap();
    // Tenant B is now refused before anything is dialled...
    let o = tenant(&proxy, "127.0.0.3", &target, &tok).await;
    assert_eq!(o.status(), 403);
    proxy
        .wait_log(&["session refused", "reason=token_consumed"])
        .await
        .unwrap();
    // ...while tenant A reconnects inside its window (e.g. after a migration).
    let mut again = tunnel(&proxy, "127.0.0.2", &target, &tok).await;
    let id2 = within("reconnected main channel", open_session(&mut again, b""))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(id2, 0);
    proxy.assert_secrets_not_logged(&[&tok]);
}
