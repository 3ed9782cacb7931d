//! Serial consoles (TOML `kind = "serial"`) to a real QEMU chardev: the
//! guest's banner reaches the tenant and the tenant's bytes are echoed back
//! by the guest, both through the proxy.

use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::net::authority;
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, write_toml_tokens};
use consolegate_tests::qemu::{Endpoint, Qemu, QemuOptions, SERIAL_BANNER, Sock, read_until};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::ws::{self, Mode, WsRequest};
use consolegate_tests::{net::BoxIo, random_token};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

fn serial_token(token: &str, ep: &Endpoint) -> TomlToken {
    let mut t = TomlToken {
        token: token.to_owned(),
        kind: Some("serial".into()),
        ..TomlToken::default()
    };
    match ep {
        Endpoint::Tcp(a) => t.target = Some(authority(*a)),
        Endpoint::Unix(p) => t.unix = Some(p.clone()),
    }
    t
}

/// Banner from the guest, then an echo of a fresh probe string.
async fn banner_and_echo<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    read_until(io, SERIAL_BANNER).await.unwrap();
    let probe = format!("probe-{:08x}\r", rand::random::<u32>());
    io.write_all(probe.as_bytes()).await.unwrap();
    io.flush().await.unwrap();
    read_until(io, probe.as_bytes()).await.unwrap();
}

async fn serial_setup(serial: Sock) -> (Qemu, Proxy, String, tempfile::TempDir) {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("consoles.toml");
    write_toml_tokens(&file, &[serial_token(&tok, &qemu.serial)]).unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.connect_listen = vec!["127.0.0.1:0".into()];
    let proxy = Proxy::start(spec).await.unwrap();
    (qemu, proxy, tok, dir)
}

#[tokio::test]
async fn serial_over_websocket_tcp_chardev_binary() {
    let (_qemu, proxy, tok, _dir) = serial_setup(Sock::Tcp).await;
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    let (w, _) = ws::connect(proxy.ws_addr(), &proxy.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    banner_and_echo(&mut b.io).await;
    proxy.assert_secrets_not_logged(&[&tok]);
}

#[tokio::test]
async fn serial_over_websocket_unix_chardev_base64() {
    let (_qemu, proxy, tok, _dir) = serial_setup(Sock::Unix).await;
    let req = WsRequest::path(format!("/{tok}")).protocol("base64");
    let (w, proto) = ws::connect(proxy.ws_addr(), &proxy.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    assert_eq!(proto.as_deref(), Some("base64"));
    let mut b = ws::into_bytes(w, Mode::Base64);
    banner_and_echo(&mut b.io).await;
}

#[tokio::test]
async fn serial_over_connect_tunnel() {
    let (qemu, proxy, tok, _dir) = serial_setup(Sock::Tcp).await;
    let mut io: BoxIo = connect_tunnel(
        proxy.connect_addr(),
        &authority(qemu.serial.tcp()),
        Some(&bearer(&tok)),
    )
    .await
    .unwrap()
    .tunnel()
    .unwrap();
    banner_and_echo(&mut io).await;
}
