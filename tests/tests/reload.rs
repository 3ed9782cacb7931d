//! Token files are re-read on change and on SIGHUP without restarting; live
//! sessions survive a reload; a broken file keeps the previous tokens.

use std::time::{Duration, SystemTime};

use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, toml_text, write_toml_tokens};
use consolegate_tests::qemu::{Qemu, QemuOptions, SERIAL_BANNER, Sock, read_until};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::ws::{self, Mode, WsOutcome, WsRequest};
use consolegate_tests::{random_token, rfb, within_for};
use tokio::io::AsyncWriteExt as _;

fn serial(tok: &str, q: &Qemu) -> TomlToken {
    TomlToken {
        token: tok.to_owned(),
        kind: Some("serial".into()),
        target: Some(authority(q.serial.tcp())),
        ..TomlToken::default()
    }
}

fn vnc(tok: &str, q: &Qemu) -> TomlToken {
    TomlToken {
        token: tok.to_owned(),
        target: Some(authority(q.vnc.tcp())),
        ..TomlToken::default()
    }
}

/// Retries an upgrade with `tok` until it is no longer refused (bounded).
async fn wait_token_accepted(p: &Proxy, t: &Transport, tok: &str) -> WsOutcome {
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    within_for(
        Duration::from_secs(30),
        "token picked up by reload",
        async {
            loop {
                match ws::connect(p.ws_addr(), t, &req).await.unwrap() {
                    WsOutcome::Refused { status: 403, .. } => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    other => return other,
                }
            }
        },
    )
    .await
    .unwrap()
}

async fn qemu() -> Qemu {
    Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Tcp,
        ..QemuOptions::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn edited_token_file_is_reloaded_and_live_sessions_stay_up() {
    let q = qemu().await;
    let dir = token_dir();
    let file = dir.path().join("tokens.toml");
    let (old, new) = (random_token(), random_token());
    write_toml_tokens(&file, &[serial(&old, &q)]).unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[&file])).await.unwrap();
    let t = proxy.transport();

    // A live serial session on the old token.
    let req = WsRequest::path(format!("/websockify?token={old}")).protocol("binary");
    let (w, _) = ws::connect(proxy.ws_addr(), &t, &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut live = ws::into_bytes(w, Mode::Binary);
    read_until(&mut live.io, SERIAL_BANNER).await.unwrap();

    // The new token is unknown until the file changes.
    let req_new = WsRequest::path(format!("/websockify?token={new}")).protocol("binary");
    assert_eq!(
        ws::connect(proxy.ws_addr(), &t, &req_new)
            .await
            .unwrap()
            .status(),
        403
    );

    write_toml_tokens(&file, &[serial(&old, &q), vnc(&new, &q)]).unwrap();
    let (w, _) = wait_token_accepted(&proxy, &t, &new)
        .await
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    rfb::check_session(&mut b.io).await.unwrap();

    // The session opened before the reload still carries data both ways.
    live.io.write_all(b"after-reload").await.unwrap();
    read_until(&mut live.io, b"after-reload").await.unwrap();
    proxy.assert_secrets_not_logged(&[&old, &new]);
}

#[tokio::test]
async fn broken_token_file_keeps_previous_tokens() {
    let q = qemu().await;
    let dir = token_dir();
    let file = dir.path().join("tokens.toml");
    let tok = random_token();
    write_toml_tokens(&file, &[vnc(&tok, &q)]).unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[&file])).await.unwrap();
    let t = proxy.transport();

    consolegate_tests::proxy::write_atomic(&file, "[[token]\nthis is = = not toml\n").unwrap();
    // The error is logged (naming the file) ...
    within_for(Duration::from_secs(30), "reload error logged", async {
        loop {
            let logs = proxy.logs();
            if logs
                .lines()
                .any(|l| l.contains("tokens.toml") && (l.contains("ERROR") || l.contains("error")))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; logs:\n{}", proxy.logs()));
    // ... and the previous token still works.
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    ws::rfb_over_ws(proxy.ws_addr(), &t, &req, Mode::Binary)
        .await
        .unwrap();
}

#[tokio::test]
async fn sighup_reloads_token_file() {
    let q = qemu().await;
    let dir = token_dir();
    let file = dir.path().join("tokens.toml");
    let (a, b) = (random_token(), random_token());
    std::fs::write(&file, toml_text(&[vnc(&a, &q)])).unwrap();
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let proxy = Proxy::start(ProxySpec::tls_ws(&[&file])).await.unwrap();
    let t = proxy.transport();

    // Same length, same inode, same mtime: a stat-based poll sees no change,
    // so only the SIGHUP can make the proxy pick up token `b`.
    let text = toml_text(&[vnc(&b, &q)]);
    assert_eq!(text.len(), std::fs::metadata(&file).unwrap().len() as usize);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(false)
            .open(&file)
            .unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f.set_modified(mtime.max(SystemTime::UNIX_EPOCH)).unwrap();
    }
    proxy.signal("HUP").unwrap();
    let (w, _) = wait_token_accepted(&proxy, &t, &b)
        .await
        .upgraded()
        .unwrap();
    let mut s = ws::into_bytes(w, Mode::Binary);
    rfb::check_session(&mut s.io).await.unwrap();
    let req = WsRequest::path(format!("/websockify?token={a}")).protocol("binary");
    assert_eq!(
        ws::connect(proxy.ws_addr(), &t, &req)
            .await
            .unwrap()
            .status(),
        403
    );
}

/// SIGHUP re-reads the configuration file: an invalid one is refused and the
/// running configuration stays (a live VNC session goes on, new ones are
/// admitted); a valid one with a changed listener is accepted with a WARN
/// naming the settings that need a restart.
#[tokio::test]
async fn sighup_rereads_the_config_file_and_refuses_an_invalid_one() {
    let q = qemu().await;
    let dir = token_dir();
    let tok = random_token();
    std::fs::write(dir.path().join("tokens.toml"), toml_text(&[vnc(&tok, &q)])).unwrap();
    let cfg = dir.path().join("consolegate.toml");
    let text = "[websocket]\nlisten = [\"127.0.0.1:0\"]\nplain_http = true\n\
                [tokens]\nfiles = [\"tokens.toml\"]\n";
    std::fs::write(&cfg, text).unwrap();
    let p = Proxy::start(ProxySpec {
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    let t = Transport::Plain;
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    let (w, _) = ws::connect(p.ws_addr(), &t, &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut live = ws::into_bytes(w, Mode::Binary);
    let (mut init, _) = rfb::check_session(&mut live.io).await.unwrap();

    std::fs::write(&cfg, "[websocket]\nlisten = 6080\n").unwrap();
    p.signal("HUP").unwrap();
    p.wait_log(&[
        "SIGHUP: configuration invalid",
        "keeping the running configuration",
        "line 2",
    ])
    .await
    .unwrap();
    rfb::full_update(&mut live.io, &mut init).await.unwrap();
    assert!(matches!(
        wait_token_accepted(&p, &t, &tok).await,
        WsOutcome::Upgraded { .. }
    ));

    std::fs::write(&cfg, text.replace("127.0.0.1:0", "127.0.0.1:1")).unwrap();
    p.signal("HUP").unwrap();
    p.wait_log(&["need a restart", "websocket.listen"])
        .await
        .unwrap();
    rfb::full_update(&mut live.io, &mut init).await.unwrap();
}
