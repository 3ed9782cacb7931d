//! Prometheus metrics on the admin listener, scraped around real console
//! sessions (QEMU VNC over WebSocket and CONNECT) and a refusal: sessions
//! active and ended by front end and kind, bytes each way, handshake and
//! resolve latency histograms, refusals by reason, kernel features.

use consolegate_tests::admin;
use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::net::Transport;
use consolegate_tests::proxy::{Proxy, ProxySpec, write_websockify_tokens};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::ws::{self, Mode, WsRequest};
use consolegate_tests::{random_token, rfb, within};

const KEY: &str = "metrics-admin-key-0123456789";

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().split(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_follow_sessions_and_refusals() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = random_token();
    let tokens = dir.path().join("tokens");
    write_websockify_tokens(&tokens, &[(&token, qemu.vnc.websockify_target())]).unwrap();
    std::fs::write(dir.path().join("admin.key"), KEY).unwrap();
    let cfg = dir.path().join("consolegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nplain_http = true\nkey_file = \"admin.key\"\n\
             [tokens]\nfiles = [\"{}\"]\n",
            tokens.display()
        ),
    )
    .unwrap();
    let p = Proxy::start(ProxySpec {
        ws_listen: vec!["127.0.0.1:0".into()],
        connect_listen: vec!["127.0.0.1:0".into()],
        plain_http: true,
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    let scrape = || async {
        let a = admin::request(
            p.admin.expect("admin listener"),
            &Transport::Plain,
            "GET",
            "/metrics",
            Some(KEY),
            None,
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200);
        a.body
    };

    // A live WebSocket session is active.
    let req = WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(socket, Mode::Binary);
    rfb::check_session(&mut b.io).await.unwrap();
    let live = scrape().await;
    assert_eq!(
        sample(
            &live,
            r#"consolegate_sessions_active{front="websocket",kind="vnc"} "#
        ),
        Some(1.0),
        "{live}"
    );
    drop(b);
    // A CONNECT session, and a refused request.
    let mut io = connect_tunnel(
        p.connect_addr(),
        &format!("{token}:0"),
        Some(&bearer(&token)),
    )
    .await
    .unwrap()
    .tunnel()
    .unwrap();
    rfb::check_session(&mut io).await.unwrap();
    drop(io);
    let bad = WsRequest::path("/websockify?token=not-a-token").protocol("binary");
    assert_eq!(
        ws::connect(p.ws_addr(), &p.transport(), &bad)
            .await
            .unwrap()
            .status(),
        403
    );
    p.wait_log_count(&["session closed"], 2).await.unwrap();

    let text = within("metrics settle", async {
        loop {
            let t = scrape().await;
            if sample(
                &t,
                r#"consolegate_sessions_active{front="connect",kind="vnc"} "#,
            ) == Some(0.0)
                && sample(
                    &t,
                    r#"consolegate_sessions_active{front="websocket",kind="vnc"} "#,
                ) == Some(0.0)
            {
                return t;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    println!("--- /metrics after the sessions ---\n{text}");
    let ended = |front: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("consolegate_sessions_total{")
                    && l.contains(&format!("front=\"{front}\""))
                    && l.contains("kind=\"vnc\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(ended("websocket"), 1.0, "{text}");
    assert_eq!(ended("connect"), 1.0, "{text}");
    for front in ["websocket", "connect"] {
        let down = sample(
            &text,
            &format!("consolegate_bytes_total{{front=\"{front}\",direction=\"down\"}} "),
        )
        .unwrap();
        assert!(
            down > 720.0 * 400.0 * 4.0,
            "{front}: a full screen went down: {down}"
        );
        let hs = sample(
            &text,
            &format!("consolegate_handshake_seconds_count{{front=\"{front}\",kind=\"vnc\"}} "),
        );
        assert_eq!(hs, Some(1.0), "{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"consolegate_refusals_total{reason="token_unknown"} "#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"consolegate_resolve_seconds_count{front="websocket",outcome="admitted"} "#
        )
        .is_some(),
        "{text}"
    );
    assert!(
        text.contains("consolegate_kernel_feature{feature=\"ktls\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("consolegate_kernel_feature{feature=\"splice\"}"),
        "{text}"
    );
    assert!(text.contains("consolegate_token_resolvers{"), "{text}");
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    p.assert_secrets_not_logged(&[&token, KEY]);
    assert!(!text.contains(&token));
}
