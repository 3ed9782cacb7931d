//! The admin API against the real binary: bearer-key and client-certificate
//! authentication, refusals counted and logged without secrets, sessions
//! listed and killed, and `auth = "none"` only when asked for, loudly.

use std::net::IpAddr;
use std::sync::Arc;

use consolegate_tests::admin::{self, TEST_KEY, refusals};
use consolegate_tests::fake::{EchoServer, echo_ok};
use consolegate_tests::http::{connect_bearer_from, read_to_close};
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec};
use consolegate_tests::within;
use serde_json::json;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn admin_api_refuses_unauthenticated_calls_and_kills_sessions() {
    let dir = tempfile::Builder::new()
        .prefix("cg-adm-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("admin.key"), TEST_KEY).unwrap();
    let sock = dir.path().join("admin.sock");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nunix = \"{}\"\nkey_file = \"admin.key\"\n",
            sock.display()
        ),
    )
    .unwrap();
    // TLS on the admin listener with the tenant certificate.
    let p = Proxy::start(ProxySpec {
        connect_listen: vec!["127.0.0.1:0".into()],
        ws_listen: vec!["127.0.0.1:0".into()],
        tls: true,
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    let tls = Transport::Tls(p.pki.as_ref().unwrap().client_config().unwrap());
    let addr = p.admin.unwrap();
    for key in [None, Some("wrong-key-wrong-key-wrong")] {
        let r = admin::request(addr, &tls, "GET", "/v1/tokens", key, None)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{r:?}");
        assert!(r.headers.contains("Bearer"));
        let r = admin::request(
            addr,
            &tls,
            "POST",
            "/v1/tokens",
            key,
            Some(&json!({"target": "127.0.0.1:1"})),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 401);
    }
    // Plain HTTP to a TLS admin listener gets nowhere.
    assert!(
        admin::request(
            addr,
            &Transport::Plain,
            "GET",
            "/v1/tokens",
            Some(TEST_KEY),
            None
        )
        .await
        .map_or(true, |r| r.status != 200)
    );
    let r = admin::request_unix(&sock, "GET", "/v1/sessions", None, None)
        .await
        .unwrap();
    assert_eq!(r.status, 401, "the UNIX socket needs the key too");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Authenticated: create, open a session, list and kill it.
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let r = admin::request_unix(
        &sock,
        "POST",
        "/v1/tokens",
        Some(TEST_KEY),
        Some(&json!({"kind": "serial", "target": target})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.json().unwrap()["token"].as_str().unwrap().to_owned();
    // Bad requests name the problem, never echo a secret.
    let r = admin::request_unix(
        &sock,
        "POST",
        "/v1/tokens",
        Some(TEST_KEY),
        Some(&json!({"target": "127.0.0.1:1", "password": "pw-secret-1", "bogus": 1})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("bogus") && !r.body.contains("pw-secret-1"),
        "{}",
        r.body
    );
    let r = admin::request_unix(
        &sock,
        "POST",
        "/v1/tokens",
        Some(TEST_KEY),
        Some(&json!({"token": "short", "target": "127.0.0.1:1"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = admin::request_unix(&sock, "DELETE", "/v1/tokens/not-hex", Some(TEST_KEY), None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let (st, s) = connect_bearer_from(ip("127.0.0.1"), p.connect_addr(), &target, &token).await;
    assert_eq!(st, 200);
    let mut s = s.unwrap();
    echo_ok(&mut s).await;
    let r = admin::request(addr, &tls, "GET", "/v1/sessions", Some(TEST_KEY), None)
        .await
        .unwrap();
    let v = r.json().unwrap();
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{v}");
    let id = sessions[0]["id"].as_u64().unwrap();
    assert_eq!(sessions[0]["kind"], "serial");
    let r = admin::request(
        addr,
        &tls,
        "DELETE",
        &format!("/v1/sessions/{id}"),
        Some(TEST_KEY),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    within("killed session closes", read_to_close(&mut s))
        .await
        .unwrap();
    let m = admin::request(addr, &tls, "GET", "/metrics", Some(TEST_KEY), None)
        .await
        .unwrap();
    assert_eq!(refusals(&m.body, "admin_unauthorized"), 5, "{}", m.body);
    p.assert_secrets_not_logged(&[&token, TEST_KEY]);
}

#[test]
fn admin_api_without_authentication_needs_an_explicit_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[connect]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(consolegate_tests::proxy::binary().unwrap())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("admin.auth = \\\"none\\\"") || err.contains("admin.auth"),
        "{err}"
    );
}

#[tokio::test]
async fn admin_api_auth_none_is_loudly_logged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[admin]\nlisten = \"127.0.0.1:0\"\nplain_http = true\nauth = \"none\"\n",
    )
    .unwrap();
    let p = Proxy::start(ProxySpec {
        connect_listen: vec!["127.0.0.1:0".into()],
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    p.wait_log(&["WARN", "ADMIN API AUTHENTICATION IS DISABLED"])
        .await
        .unwrap();
    let r = admin::request(
        p.admin.unwrap(),
        &Transport::Plain,
        "GET",
        "/v1/tokens",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

/// `admin.client_ca` without a bearer key: TLS client certificates from
/// that CA are the authentication; without one the handshake fails.
#[tokio::test]
async fn admin_api_with_client_certificates() {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = tempfile::tempdir().unwrap();
    let clients =
        consolegate_tests::spice::SpicePki::generate(&dir.path().join("clients")).unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nclient_ca = \"{}\"\n",
            clients.ca_path.display()
        ),
    )
    .unwrap();
    let p = Proxy::start(ProxySpec {
        connect_listen: vec!["127.0.0.1:0".into()],
        tls: true,
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    let pki = p.pki.as_ref().unwrap();
    let addr = p.admin.unwrap();

    // No client certificate: the TLS handshake is refused.
    let anonymous = Transport::Tls(pki.client_config().unwrap());
    let r = admin::request(addr, &anonymous, "GET", "/v1/tokens", None, None).await;
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|a| a.status != 200),
        "{r:?}"
    );
    p.wait_log(&["admin TLS handshake failed"]).await.unwrap();

    // With one from the configured CA: admitted, no bearer key needed.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&clients.client_cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&clients.client_key).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    let with_cert = Transport::Tls(Arc::new(cfg));
    let r = admin::request(addr, &with_cert, "GET", "/v1/tokens", None, None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}
