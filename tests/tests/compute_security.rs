//! The compute-side security matrix against real QEMU VNC servers: TLS with
//! x509 client certificates (`tls-creds-x509,verify-peer=on`), VNC
//! passwords, SASL SCRAM (a real sasldb), and the refusals a tenant sees
//! when the proxy cannot authenticate (wrong CA, wrong SAN, expired or
//! missing certificates, wrong passwords, unsupported security types).
//!
//! The tenant always sees RFB 3.8 with security None; the proxy does the
//! real negotiation. Every test runs its own private CA.

use std::process::Command;

use consolegate_tests::compute::{Ca, Pki, VncServer};
use consolegate_tests::net::free_port;
use consolegate_tests::process::ChildGuard;
use consolegate_tests::proxy::{Proxy, ProxySpec};
use consolegate_tests::vnc_matrix::{
    compute_flags, console_refused, console_works, proxy, token_toml,
};
use consolegate_tests::ws::{self, Mode, WsRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn vencrypt_x509none_with_client_certificate() {
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let vnc = VncServer {
        x509: Some(pki.path("qemu-x509")),
        ..Default::default()
    }
    .start()
    .await;
    let ca_file = pki.proxy_trusts(&ca);
    let p = proxy(
        pki.dir.path(),
        &token_toml("tok", &vnc.target, ""),
        &compute_flags(&pki, &ca_file, true),
    )
    .await;
    console_works(&p, "tok").await;
    // Both legs are TLS: handed to the kernel where it has kTLS, else
    // rustls and the copy, said once at start and not per session.
    let datapath = p.tls_datapath().await.unwrap();
    p.wait_log(&[
        "session established",
        "VeNCrypt/X509None",
        &format!("datapath=\"{datapath}\""),
    ])
    .await
    .unwrap();
    let logs = p.logs();
    assert_eq!(
        logs.matches("kTLS unavailable").count(),
        usize::from(datapath == "copy"),
        "{logs}"
    );
    assert!(!logs.contains("kTLS not used for this session"), "{logs}");
    if datapath == "ktls+splice" {
        p.wait_log(&["ktls enabled", "leg=\"tenant\""])
            .await
            .unwrap();
        p.wait_log(&["ktls enabled", "leg=\"compute\""])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn vencrypt_x509vnc_password_from_token() {
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let server = VncServer {
        x509: Some(pki.path("qemu-x509")),
        password: Some("vncpass1".into()),
        ..Default::default()
    };
    let vnc = server.start().await;
    let ca_file = pki.proxy_trusts(&ca);
    let tokens = format!(
        "{}{}",
        token_toml("good", &vnc.target, "password = \"vncpass1\""),
        token_toml("bad", &vnc.target, "password = \"wrong-pw\"")
    );
    let p = proxy(
        pki.dir.path(),
        &tokens,
        &compute_flags(&pki, &ca_file, true),
    )
    .await;
    console_works(&p, "good").await;
    p.wait_log(&["session established", "VeNCrypt/X509Vnc"])
        .await
        .unwrap();
    // Wrong password: the tenant gets a clear refusal and the log says why.
    let reason = console_refused(&p, "bad").await;
    assert!(reason.contains("could not authenticate"), "{reason}");
    p.wait_log(&["console handshake failed", "compute_auth_failed"])
        .await
        .unwrap();
    // Missing password: the server offers only X509Vnc.
    let tokens2 = token_toml("nopw", &vnc.target, "");
    std::fs::write(pki.dir.path().join("tokens2.toml"), &tokens2).unwrap();
    let mut spec = ProxySpec::tls_ws(&[&pki.dir.path().join("tokens2.toml")]);
    spec.extra = compute_flags(&pki, &ca_file, true);
    let p2 = Proxy::start(spec).await.unwrap();
    let reason = console_refused(&p2, "nopw").await;
    assert!(reason.contains("not supported"), "{reason}");
    p2.wait_log(&["no_common_security", "need a VNC password"])
        .await
        .unwrap();
    // The first proxy still serves good sessions after the failures.
    console_works(&p, "good").await;
    p.assert_secrets_not_logged(&["vncpass1", "wrong-pw"]);
}

#[tokio::test]
async fn vnc_password_without_tls() {
    let server = VncServer {
        password: Some("plainpw".into()),
        ..Default::default()
    };
    let vnc = server.start().await;
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        dir.path(),
        &token_toml("t", &vnc.target, "password = \"plainpw\""),
        &[],
    )
    .await;
    console_works(&p, "t").await;
    p.wait_log(&["session established", "security=rfb 3.8 VNC"])
        .await
        .unwrap();
    p.assert_secrets_not_logged(&["plainpw"]);
}

#[tokio::test]
async fn vencrypt_x509sasl_scram() {
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let server = VncServer {
        x509: Some(pki.path("qemu-x509")),
        sasl: Some(("consolegate".into(), "s3cr3t-sasl".into())),
        ..Default::default()
    };
    let vnc = server.start().await;
    let ca_file = pki.proxy_trusts(&ca);
    let tokens = format!(
        "{}{}",
        token_toml(
            "good",
            &vnc.target,
            "sasl_username = \"consolegate\"\nsasl_password = \"s3cr3t-sasl\""
        ),
        token_toml(
            "bad",
            &vnc.target,
            "sasl_username = \"consolegate\"\nsasl_password = \"nope\""
        )
    );
    let p = proxy(
        pki.dir.path(),
        &tokens,
        &compute_flags(&pki, &ca_file, true),
    )
    .await;
    console_works(&p, "good").await;
    p.wait_log(&["session established", "VeNCrypt/X509SASL (SCRAM-SHA-"])
        .await
        .unwrap();
    let reason = console_refused(&p, "bad").await;
    assert!(
        reason.contains("could not authenticate") || reason.contains("failed"),
        "{reason}"
    );
    p.wait_log(&["console handshake failed", "side=compute"])
        .await
        .unwrap();
    console_works(&p, "good").await;
    p.assert_secrets_not_logged(&["s3cr3t-sasl", "nope"]);
}

/// SASL without VeNCrypt: QEMU demands a SASL security layer (SSF >= 56)
/// on TCP, which SCRAM does not have, so it lists no usable mechanism. (Over
/// a UNIX socket QEMU 7.2 fails SASL with "Cannot format local IP".) The
/// proxy must refuse clearly, naming what the server offered.
#[tokio::test]
async fn sasl_without_tls_is_refused_when_no_mechanism_fits() {
    let server = VncServer {
        sasl: Some(("alice".into(), "pw-for-alice".into())),
        ..Default::default()
    };
    let vnc = server.start().await;
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        dir.path(),
        &token_toml(
            "t",
            &vnc.target,
            "sasl_username = \"alice\"\nsasl_password = \"pw-for-alice\"",
        ),
        &[],
    )
    .await;
    let reason = console_refused(&p, "t").await;
    assert!(reason.contains("not supported"), "{reason}");
    p.wait_log(&[
        "console handshake failed",
        "sasl_no_mechanism",
        "compute offers SASL mechanisms",
    ])
    .await
    .unwrap();
    p.assert_secrets_not_logged(&["pw-for-alice"]);
}

#[tokio::test]
async fn compute_certificate_problems_are_refused_with_reasons() {
    let ca = Ca::new("compute CA");
    let other = Ca::new("some other CA");
    // 1. The proxy trusts a different CA than the one that signed QEMU's cert.
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let good = VncServer {
        x509: Some(pki.path("qemu-x509")),
        ..Default::default()
    }
    .start()
    .await;
    let wrong_ca = pki.proxy_trusts(&other);
    let p = proxy(
        pki.dir.path(),
        &token_toml("t", &good.target, ""),
        &compute_flags(&pki, &wrong_ca, true),
    )
    .await;
    let reason = console_refused(&p, "t").await;
    assert!(reason.contains("TLS"), "{reason}");
    p.wait_log(&["console handshake failed", "compute_tls", "UnknownIssuer"])
        .await
        .unwrap();

    // 2. QEMU's certificate names another address.
    let pki2 = Pki::new(&ca, &ca, &["127.0.0.2", "compute-9.example"], false);
    let vnc2 = VncServer {
        x509: Some(pki2.path("qemu-x509")),
        ..Default::default()
    }
    .start()
    .await;
    let ca2 = pki2.proxy_trusts(&ca);
    let p2 = proxy(
        pki2.dir.path(),
        &token_toml("t", &vnc2.target, ""),
        &compute_flags(&pki2, &ca2, true),
    )
    .await;
    console_refused(&p2, "t").await;
    p2.wait_log(&[
        "console handshake failed",
        "compute_tls",
        "not valid for name",
    ])
    .await
    .unwrap();
    // ...but naming the identity explicitly in the token makes it work.
    let named = token_toml("named", &vnc2.target, "server_name = \"compute-9.example\"");
    std::fs::write(pki2.dir.path().join("tokens.toml"), named).unwrap();
    p2.signal("HUP").unwrap();
    p2.wait_log(&["SIGHUP: tokens reloaded"]).await.unwrap();
    console_works(&p2, "named").await;

    // 3. QEMU serves an expired certificate (its own sanity check off).
    let pki3 = Pki::new(&ca, &ca, &["127.0.0.1"], true);
    let server3 = VncServer {
        x509: Some(pki3.path("qemu-x509")),
        no_sanity_check: true,
        ..Default::default()
    };
    let vnc3 = server3.start().await;
    let ca3 = pki3.proxy_trusts(&ca);
    let p3 = proxy(
        pki3.dir.path(),
        &token_toml("t", &vnc3.target, ""),
        &compute_flags(&pki3, &ca3, true),
    )
    .await;
    console_refused(&p3, "t").await;
    p3.wait_log(&["console handshake failed", "compute_tls", "expired"])
        .await
        .unwrap();

    // 4. No client certificate: QEMU (verify-peer=on) refuses the handshake.
    let p4 = proxy(
        pki.dir.path(),
        &token_toml("t", &good.target, ""),
        &compute_flags(&pki, &pki.proxy_trusts(&ca), false),
    )
    .await;
    console_refused(&p4, "t").await;
    p4.wait_log(&["console handshake failed", "side=compute"])
        .await
        .unwrap();

    // A correctly configured proxy still reaches the same QEMU.
    let ok = proxy(
        pki.dir.path(),
        &token_toml("ok", &good.target, ""),
        &compute_flags(&pki, &pki.proxy_trusts(&ca), true),
    )
    .await;
    console_works(&ok, "ok").await;
}

#[tokio::test]
async fn unsupported_security_types_are_refused_with_reasons() {
    // VeNCrypt with anonymous TLS only (QEMU tls-creds-anon, subtype
    // TLSNone): the TLS handshake fails, since it would not authenticate
    // the compute host (rustls has no anonymous suites).
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let anon = VncServer {
        anon_tls: true,
        ..Default::default()
    }
    .start()
    .await;
    let ca_file = pki.proxy_trusts(&ca);
    let p = proxy(
        pki.dir.path(),
        &token_toml("t", &anon.target, ""),
        &compute_flags(&pki, &ca_file, true),
    )
    .await;
    let reason = console_refused(&p, "t").await;
    assert!(reason.contains("TLS"), "{reason}");
    p.wait_log(&["compute_tls", "TLSNone", "tls-creds-anon"])
        .await
        .unwrap();

    // A plain VNC server while the profile requires TLS: refused.
    let plain = VncServer::default().start().await;
    let p2 = proxy(
        pki.dir.path(),
        &token_toml("t", &plain.target, ""),
        &compute_flags(&pki, &ca_file, true),
    )
    .await;
    console_refused(&p2, "t").await;
    p2.wait_log(&["no_common_security", "requires TLS"])
        .await
        .unwrap();
}

#[tokio::test]
async fn rfb_version_3_3_and_3_7_tenants_are_served() {
    let vnc = VncServer::default().start().await;
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(dir.path(), &token_toml("t", &vnc.target, ""), &[]).await;
    for version in [&b"RFB 003.003\n"[..], &b"RFB 003.007\n"[..]] {
        let req = WsRequest::path("/websockify?token=t").protocol("binary");
        let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
            .await
            .unwrap()
            .upgraded()
            .unwrap();
        let mut b = ws::into_bytes(socket, Mode::Binary);
        let init = consolegate_tests::within("old RFB client", async {
            let mut v = [0u8; 12];
            b.io.read_exact(&mut v).await?;
            b.io.write_all(version).await?;
            if version == b"RFB 003.003\n" {
                anyhow::ensure!(b.io.read_u32().await? == 1, "3.3: security type None");
            } else {
                let mut types = [0u8; 2];
                b.io.read_exact(&mut types).await?;
                anyhow::ensure!(types == [1, 1], "3.7: one type, None: {types:?}");
                b.io.write_all(&[1]).await?;
            }
            // No SecurityResult before 3.8: straight to ClientInit.
            b.io.write_all(&[1]).await?;
            let mut si = [0u8; 24];
            b.io.read_exact(&mut si).await?;
            let name_len = u32::from_be_bytes([si[20], si[21], si[22], si[23]]);
            let mut name = vec![0u8; name_len as usize];
            b.io.read_exact(&mut name).await?;
            anyhow::Ok((
                u16::from_be_bytes([si[0], si[1]]),
                u16::from_be_bytes([si[2], si[3]]),
            ))
        })
        .await
        .unwrap()
        .unwrap();
        assert!(init.0 > 0 && init.1 > 0, "ServerInit size {init:?}");
    }
}

/// Serial console over TLS: QEMU's chardev with `tls-creds` and
/// `verify-peer=on`; the guest (our boot sector) prints a banner and echoes.
#[tokio::test]
async fn serial_chardev_over_tls_with_client_certificate() {
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let img = pki.path("boot.img");
    std::fs::write(&img, consolegate_tests::qemu::boot_image()).unwrap();
    let port = free_port().unwrap();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64",
        "-no-reboot",
    ])
    .arg("-object")
    .arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        pki.path("qemu-x509").display()
    ))
    .arg("-chardev")
    .arg(format!(
        "socket,id=ser0,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=tls0"
    ))
    .args(["-serial", "chardev:ser0", "-drive"])
    .arg(format!("file={},format=raw,if=floppy", img.display()));
    let _qemu = ChildGuard::spawn("qemu", cmd).unwrap();
    consolegate_tests::within("serial socket", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    let ca_file = pki.proxy_trusts(&ca);
    let tokens =
        format!("[[token]]\ntoken = \"ser\"\nkind = \"serial\"\ntarget = \"127.0.0.1:{port}\"\n");
    let p = proxy(
        pki.dir.path(),
        &tokens,
        &compute_flags(&pki, &ca_file, true),
    )
    .await;
    let req = WsRequest::path("/websockify?token=ser").protocol("binary");
    let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(socket, Mode::Binary);
    consolegate_tests::qemu::read_until(&mut b.io, consolegate_tests::qemu::SERIAL_BANNER)
        .await
        .unwrap_or_else(|e| panic!("banner through TLS: {e:#}\n{}", p.logs()));
    b.io.write_all(b"ping-over-tls").await.unwrap();
    consolegate_tests::qemu::read_until(&mut b.io, b"ping-over-tls")
        .await
        .unwrap();
    p.wait_log(&["session established", "security=tls"])
        .await
        .unwrap();

    // The chardev takes one client at a time: end this session first.
    drop(b);
    p.wait_log(&["session closed"]).await.unwrap();

    // Without a client certificate QEMU refuses the TLS session.
    let file = pki.dir.path().join("tokens-nocert.toml");
    std::fs::write(&file, &tokens).unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.extra = compute_flags(&pki, &ca_file, false);
    spec.extra
        .extend(["--handshake-timeout".to_owned(), "3s".to_owned()]);
    let p2 = Proxy::start(spec).await.unwrap();
    let (socket, _) = ws::connect(p2.ws_addr(), &p2.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let b2 = ws::into_bytes(socket, Mode::Binary);
    let closed = consolegate_tests::within("close", b2.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    eprintln!("refusal without a client certificate: {closed:?}");
    assert_eq!(closed.code, Some(1011), "{closed:?}");
    p2.wait_log(&[
        "closed the TLS session before sending any data",
        "client certificate",
    ])
    .await
    .unwrap();
    // The correctly configured proxy still reaches the console.
    let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b3 = ws::into_bytes(socket, Mode::Binary);
    b3.io.write_all(b"still-here").await.unwrap();
    consolegate_tests::qemu::read_until(&mut b3.io, b"still-here")
        .await
        .unwrap();
}

/// Unreadable or mismatched compute credentials are a start-up error with
/// exit code 64 and a reason naming the file.
#[test]
fn bad_compute_credentials_exit_64() {
    let ca = Ca::new("compute CA");
    let other = Ca::new("other CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let tokens = pki.path("t.toml");
    std::fs::write(&tokens, token_toml("t", "127.0.0.1:5999", "")).unwrap();
    // A key that does not belong to the certificate.
    let (_, stray_key) = other.leaf("stray", &[], false);
    std::fs::write(pki.path("stray-key.pem"), stray_key).unwrap();
    let ca_file = pki.proxy_trusts(&ca);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--compute-ca".into(),
                pki.path("missing.pem").display().to_string(),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--compute-ca".into(),
                ca_file.display().to_string(),
                "--compute-cert".into(),
                pki.path("client-cert.pem").display().to_string(),
                "--compute-key".into(),
                pki.path("stray-key.pem").display().to_string(),
            ],
            "client certificate and key",
        ),
    ];
    let bin = consolegate_tests::proxy::binary().unwrap();
    for (flags, want) in cases {
        let out = Command::new(&bin)
            .args(["serve", "--ws-listen", "127.0.0.1:0", "--token-file"])
            .arg(&tokens)
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flags:?}: {err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(last.contains(want), "{flags:?}: last line {last:?}");
    }
}
