//! Live compute-TLS sessions against real QEMU VNC servers: credentials
//! reloaded on SIGHUP without dropping sessions, and concurrent TLS
//! sessions over WebSocket and CONNECT that keep flowing. Split from
//! `compute_security.rs` (the refusal matrix).

use consolegate_tests::compute::{Ca, Pki, VncServer};
use consolegate_tests::proxy::{Proxy, ProxySpec};
use consolegate_tests::vnc_matrix::{
    compute_flags, console_refused, console_works, proxy, token_toml,
};
use consolegate_tests::ws::{self, Mode, WsRequest};

/// Opens a VNC console over the TLS WebSocket front end and keeps it open:
/// handshake plus one full framebuffer update. Returns the byte stream and
/// the ServerInit so the caller can ask for more updates later.
async fn open_console(p: &Proxy, token: &str) -> (ws::WsBytes, consolegate_tests::rfb::ServerInit) {
    let req = WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(socket, Mode::Binary);
    let (init, _) = consolegate_tests::rfb::check_session(&mut b.io)
        .await
        .unwrap_or_else(|e| panic!("console {token}: {e:#}\nlogs:\n{}", p.logs()));
    (b, init)
}

/// Asks an open console for another full-screen update and reads it all.
async fn another_update<S>(io: &mut S, init: &mut consolegate_tests::rfb::ServerInit, what: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let fb = consolegate_tests::within(what, consolegate_tests::rfb::full_update(io, init))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!((fb.width, fb.height), (init.width, init.height), "{what}");
}

/// Compute credentials rotate on SIGHUP: a live TLS session keeps running on
/// the credentials it started with, new sessions use the new CA and client
/// certificate, and an invalid replacement is refused with the old profile
/// kept.
#[tokio::test]
async fn compute_credentials_reload_on_sighup_without_dropping_sessions() {
    let ca1 = Ca::new("compute CA 1");
    let ca2 = Ca::new("compute CA 2");
    let pki1 = Pki::new(&ca1, &ca1, &["127.0.0.1"], false);
    let pki2 = Pki::new(&ca2, &ca2, &["127.0.0.1"], false);
    let (server1, server2) = (
        VncServer {
            x509: Some(pki1.path("qemu-x509")),
            ..Default::default()
        },
        VncServer {
            x509: Some(pki2.path("qemu-x509")),
            ..Default::default()
        },
    );
    let (vnc1, vnc2) = tokio::join!(server1.start(), server2.start());
    // The proxy's credential files, rewritten in place for the rotation.
    let creds = tempfile::tempdir().unwrap();
    let (ca_f, cert_f, key_f) = (
        creds.path().join("ca.pem"),
        creds.path().join("client-cert.pem"),
        creds.path().join("client-key.pem"),
    );
    let install = |pki: &Pki, ca: &Ca| {
        use consolegate_tests::proxy::write_atomic;
        write_atomic(&ca_f, &ca.pem).unwrap();
        let cert = std::fs::read_to_string(pki.path("client-cert.pem")).unwrap();
        let key = std::fs::read_to_string(pki.path("client-key.pem")).unwrap();
        write_atomic(&cert_f, &cert).unwrap();
        write_atomic(&key_f, &key).unwrap();
    };
    install(&pki1, &ca1);
    let flags: Vec<String> = [
        "--compute-ca",
        ca_f.to_str().unwrap(),
        "--compute-cert",
        cert_f.to_str().unwrap(),
        "--compute-key",
        key_f.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let tokens = format!(
        "{}{}",
        token_toml("one", &vnc1.target, ""),
        token_toml("two", &vnc2.target, "")
    );
    let p = proxy(creds.path(), &tokens, &flags).await;

    let (mut live, mut init) = open_console(&p, "one").await;
    // Before the rotation the second host (CA 2) is not trusted.
    let reason = console_refused(&p, "two").await;
    assert!(reason.contains("TLS"), "{reason}");

    install(&pki2, &ca2);
    p.signal("HUP").unwrap();
    p.wait_log(&["SIGHUP: compute profiles", "reloaded"])
        .await
        .unwrap();

    // The live session still carries framebuffer updates.
    another_update(
        &mut live.io,
        &mut init,
        "update on the live session after SIGHUP",
    )
    .await;
    // New sessions use the new credentials: host two works, host one (its
    // certificate from CA 1) is now refused.
    console_works(&p, "two").await;
    console_refused(&p, "one").await;
    p.wait_log(&["console handshake failed", "compute_tls", "UnknownIssuer"])
        .await
        .unwrap();

    // A broken replacement keeps the working profile.
    std::fs::write(&ca_f, "not a certificate\n").unwrap();
    p.signal("HUP").unwrap();
    p.wait_log(&[
        "SIGHUP: compute profiles invalid",
        "keeping the previous ones",
    ])
    .await
    .unwrap();
    console_works(&p, "two").await;
    another_update(
        &mut live.io,
        &mut init,
        "update on the live session after a bad reload",
    )
    .await;
    p.wait_log_count(&["session established"], 2).await.unwrap();
}

/// Several TLS compute sessions at once, over both front ends, each asking
/// for many full-screen updates. Regression test for a stall where bytes
/// written to the rustls compute leg stayed in its buffer (no flush) until
/// the tenant sent more: the session hung with no framebuffer update.
#[tokio::test]
async fn concurrent_tls_sessions_over_websocket_and_connect_keep_flowing() {
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let vnc = VncServer {
        x509: Some(pki.path("qemu-x509")),
        password: Some("vncpass2".into()),
        ..Default::default()
    }
    .start()
    .await;
    let ca_file = pki.proxy_trusts(&ca);
    let file = pki.dir.path().join("tokens.toml");
    std::fs::write(
        &file,
        token_toml("tok", &vnc.target, "password = \"vncpass2\""),
    )
    .unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.connect_listen = vec!["127.0.0.1:0".into()];
    spec.extra = compute_flags(&pki, &ca_file, true);
    let p = Proxy::start(spec).await.unwrap();

    const ROUNDS: usize = 4;
    let ws_session = |n: usize| {
        let p = &p;
        async move {
            let (mut b, mut init) = open_console(p, "tok").await;
            for r in 0..ROUNDS {
                another_update(
                    &mut b.io,
                    &mut init,
                    &format!("WebSocket session {n} round {r}"),
                )
                .await;
            }
        }
    };
    let connect_session = |n: usize| {
        let p = &p;
        async move {
            let mut io = consolegate_tests::http::connect_tunnel(
                p.connect_addr(),
                "tok:0",
                Some(&consolegate_tests::http::bearer("tok")),
            )
            .await
            .unwrap()
            .tunnel()
            .unwrap();
            let (mut init, _) = consolegate_tests::rfb::check_session(&mut io)
                .await
                .unwrap_or_else(|e| panic!("CONNECT session {n}: {e:#}\n{}", p.logs()));
            for r in 0..ROUNDS {
                another_update(
                    &mut io,
                    &mut init,
                    &format!("CONNECT session {n} round {r}"),
                )
                .await;
            }
        }
    };
    tokio::join!(
        ws_session(0),
        ws_session(1),
        connect_session(0),
        connect_session(1)
    );
    p.wait_log_count(&["security=rfb 3.8 VeNCrypt/X509Vnc"], 4)
        .await
        .unwrap();
    p.assert_secrets_not_logged(&["vncpass2"]);
}
