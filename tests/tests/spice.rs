//! SPICE consoles (TOML `kind = "spice"`) to QEMU's real SPICE server: the
//! main-channel link handshake completes through the proxy.

use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::net::authority;
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, write_toml_tokens};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::spice::link_main_channel;
use consolegate_tests::ws::{self, Mode, WsRequest};
use consolegate_tests::{random_token, within};

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

    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    let (w, _) = ws::connect(proxy.ws_addr(), &proxy.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    let reply = within("SPICE link over WebSocket", link_main_channel(&mut b.io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.error, 0, "{reply:?}");
    drop(b);

    let mut io = connect_tunnel(proxy.connect_addr(), &authority(spice), Some(&bearer(&tok)))
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let reply = within("SPICE link over CONNECT", link_main_channel(&mut io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.error, 0, "{reply:?}");
    proxy.assert_secrets_not_logged(&[&tok]);
}
