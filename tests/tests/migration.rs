//! A real QEMU live migration on loopback (two QEMU processes, `migrate`
//! over QMP) while a tenant has the VM's VNC console open through the
//! proxy with a single-use token: the control plane re-points the token
//! through the admin API, the source QEMU goes away as it does after a
//! migration, and the tenant's reconnect with the same token (inside its
//! reconnect window) reaches the destination and sees the same screen.

use std::net::SocketAddr;
use std::time::Instant;

use consolegate_tests::admin;
use consolegate_tests::http::{connect_tunnel, read_response_head, read_to_close};
use consolegate_tests::net::free_port;
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::qmp::Qmp;
use consolegate_tests::{rfb, within};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

const KEY: &str = "migration-admin-key-0123456789";

#[tokio::test]
async fn vnc_tenant_reconnects_to_the_destination_after_live_migration() {
    let opts = QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    };
    let src = Qemu::start_migratable(opts, None).await.unwrap();
    let port = free_port().unwrap();
    let dst = Qemu::start_migratable(opts, Some(port)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.key"), KEY).unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[admin]\nlisten = \"127.0.0.1:0\"\nplain_http = true\nkey_file = \"admin.key\"\n\
         [tokens]\nreconnect_window = \"60s\"\n",
    )
    .unwrap();
    let proxy = Proxy::start(ProxySpec {
        connect_listen: vec!["127.0.0.1:0".into()],
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    let adm = proxy.admin.unwrap();
    let r = admin::request(
        adm,
        &Transport::Plain,
        "POST",
        "/v1/tokens",
        Some(KEY),
        Some(&json!({"kind": "vnc", "target": authority(src.vnc.tcp()), "max_uses": 1})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json().unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let digest = v["digest"].as_str().unwrap().to_owned();
    // The tenant names only the token (CONNECT <token>:0): the proxy picks
    // the backend, so a re-pointed token reaches the new host.
    let via_token = format!("{token}:0");

    let mut io = connect_tunnel(proxy.connect_addr(), &via_token, None)
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let (init, before) = rfb::check_session(&mut io).await.unwrap();

    // The destination's screen before the migration is not the guest's.
    let pre = {
        let mut s = dst.vnc.connect().await.unwrap();
        let mut i = rfb::handshake(&mut s).await.unwrap();
        within("destination screen", rfb::full_update(&mut s, &mut i))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(
        pre.rows_differing(&before) > 16,
        "the paused destination already shows the guest's screen?"
    );

    let mut qmp = Qmp::connect(&src.qmp()).await.unwrap();
    qmp.migrate(&format!("tcp:127.0.0.1:{port}")).await.unwrap();
    let r = admin::request(
        adm,
        &Transport::Plain,
        "PATCH",
        &format!("/v1/tokens/{digest}"),
        Some(KEY),
        Some(&json!({"target": authority(dst.vnc.tcp())})),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // The source goes away (libvirt ends it after a migration): the
    // tenant's session drops, and it reconnects with the same token.
    let t0 = Instant::now();
    drop(qmp);
    drop(src);
    within("the tenant sees its session end", read_to_close(&mut io))
        .await
        .unwrap();
    let dropped = t0.elapsed();
    let mut io = connect_tunnel(proxy.connect_addr(), &via_token, None)
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let admitted = t0.elapsed();
    let (init2, after) = rfb::check_session(&mut io).await.unwrap();
    let reconnect = t0.elapsed();
    println!(
        "live migration: source QEMU gone -> tenant reconnected through the proxy and got the \
         destination's full screen in {} ms (session drop seen at {} ms, reconnect admitted at \
         {} ms, then RFB handshake + full 32 bpp screen)",
        reconnect.as_millis(),
        dropped.as_millis(),
        admitted.as_millis()
    );
    assert_eq!((init2.width, init2.height), (init.width, init.height));
    // The same text screen (a blinking cursor may differ in one text row).
    assert!(
        after.rows_differing(&before) <= 16,
        "{} of {} pixel rows differ from the screen before the migration",
        after.rows_differing(&before),
        before.row_hashes.len()
    );
    proxy
        .wait_log(&[
            "session established",
            &format!("compute.addr={}", authority(dst.vnc.tcp())),
        ])
        .await
        .unwrap();

    // Another tenant address cannot use the consumed single-use token.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse::<SocketAddr>().unwrap())
        .unwrap();
    let mut s = sock.connect(proxy.connect_addr()).await.unwrap();
    s.write_all(format!("CONNECT {via_token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = within("refusal", read_response_head(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 403);
    proxy.assert_secrets_not_logged(&[&token]);
}

/// spice-server announces a migration to its client with the destination's
/// address (MIGRATE_BEGIN, _SEAMLESS or SWITCH_HOST after QMP
/// `client_migrate_info`): through the proxy the tenant never sees them.
#[tokio::test]
async fn spice_migration_announcements_never_reach_the_tenant() {
    use consolegate_tests::proxy::write_atomic;
    use consolegate_tests::spice::open_session;
    use tokio::io::AsyncReadExt as _;

    let opts = QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Unix,
        spice: true,
    };
    let src = Qemu::start_migratable(opts, None).await.unwrap();
    let port = free_port().unwrap();
    let dst = Qemu::start_migratable(opts, Some(port)).await.unwrap();
    let dst_spice = dst.spice.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let tok = consolegate_tests::random_token();
    let file = dir.path().join("spice.toml");
    let target = authority(src.spice.unwrap());
    write_atomic(
        &file,
        &format!("[[token]]\ntoken = \"{tok}\"\nkind = \"spice\"\ntarget = \"{target}\"\n"),
    )
    .unwrap();
    let proxy = Proxy::start(ProxySpec::connect(&[&file])).await.unwrap();
    let mut main = connect_tunnel(
        proxy.connect_addr(),
        &target,
        Some(&consolegate_tests::http::bearer(&tok)),
    )
    .await
    .unwrap()
    .tunnel()
    .unwrap();
    within("main channel", open_session(&mut main, b""))
        .await
        .unwrap()
        .unwrap();

    // Everything the tenant's main channel receives from now on (mini
    // headers: type u16, size u32).
    let reader = tokio::spawn(async move {
        let mut types = Vec::new();
        let mut raw = Vec::new();
        loop {
            let mut h = [0u8; 6];
            let r =
                tokio::time::timeout(std::time::Duration::from_secs(20), main.read_exact(&mut h))
                    .await;
            let Ok(Ok(_)) = r else { break };
            let t = u16::from_le_bytes([h[0], h[1]]);
            let size = u32::from_le_bytes([h[2], h[3], h[4], h[5]]) as usize;
            let mut body = vec![0u8; size];
            if main.read_exact(&mut body).await.is_err() {
                break;
            }
            types.push(t);
            raw.extend_from_slice(&body);
        }
        (types, raw)
    });

    let mut qmp = Qmp::connect(&src.qmp()).await.unwrap();
    qmp.execute(
        "client_migrate_info",
        json!({"protocol": "spice", "hostname": "127.0.0.1", "port": dst_spice.port()}),
    )
    .await
    .unwrap();
    qmp.migrate(&format!("tcp:127.0.0.1:{port}")).await.unwrap();
    let line = proxy
        .wait_log(&["SPICE migration announcement dropped"])
        .await
        .unwrap();
    println!("proxy: {line}");
    // The source goes away; the tenant's main channel ends.
    drop(qmp);
    drop(src);
    let (types, raw) = within("tenant main channel ends", reader)
        .await
        .unwrap()
        .unwrap();
    println!("tenant saw main-channel message types {types:?}");
    for t in [101u16, 111, 116] {
        assert!(
            !types.contains(&t),
            "announcement {t} reached the tenant: {types:?}"
        );
    }
    assert!(
        !raw.windows(9).any(|w| w == b"127.0.0.1"),
        "the destination's address reached the tenant"
    );
    proxy.assert_secrets_not_logged(&[&tok]);
}
