//! The command line: the README quick start (dev defaults in a state dir)
//! and exit code 64 on bad configurations.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use consolegate_tests::certs::client_config_trusting;
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, TomlToken, binary, toml_text, write_atomic};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::ws::{self, Mode, WsOutcome, WsRequest};
use consolegate_tests::{rfb, within_for};

fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn dev_token(state: &Path) -> (String, Option<String>) {
    let text = std::fs::read_to_string(state.join("tokens.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    let first = &v["token"].as_array().expect("[[token]] array")[0];
    (
        first["token"].as_str().expect("token").to_owned(),
        first
            .get("target")
            .and_then(|t| t.as_str())
            .map(str::to_owned),
    )
}

async fn start_dev(state: &Path) -> Proxy {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    if !(port_free(6080) && port_free(6081)) {
        // Someone else holds the documented dev ports; keep the dev default
        // but let the kernel pick ports.
        eprintln!("127.0.0.1:6080/6081 busy: overriding the dev listeners with port 0");
        args.extend(
            [
                "--ws-listen",
                "127.0.0.1:0",
                "--connect-listen",
                "127.0.0.1:0",
            ]
            .map(String::from),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    Proxy::start_args(dir, &args).await.unwrap()
}

#[tokio::test]
async fn quick_start_dev_default_creates_state_and_dev_token_works() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let proxy = start_dev(&state).await;
    assert!(
        state.join("tokens.toml").is_file(),
        "no <state>/tokens.toml"
    );
    let cert = state.join("tls/cert.pem");
    assert!(cert.is_file(), "no <state>/tls/cert.pem");
    assert!(
        state.join("tls/key.pem").is_file(),
        "no <state>/tls/key.pem"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("tls/key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "dev key readable by others: {mode:o}");
    assert!(!proxy.websocket.is_empty() && !proxy.connect.is_empty());

    let cert_pem = std::fs::read(&cert).unwrap();
    let tls = Transport::Tls(client_config_trusting(&cert_pem).unwrap());
    let ws_addr: SocketAddr = proxy.ws_addr();
    let (tok, _target) = dev_token(&state);

    // The dev token is known (whatever its target's state is) ...
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    let status = ws::connect(ws_addr, &tls, &req).await.unwrap().status();
    assert!(
        [101, 502, 504].contains(&status),
        "dev token refused with {status}"
    );

    // ... and once pointed at a real VM (editing the watched file), it
    // carries a full VNC session over the self-signed dev certificate.
    let q = Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    write_atomic(
        &state.join("tokens.toml"),
        &toml_text(&[TomlToken {
            token: tok.clone(),
            target: Some(authority(q.vnc.tcp())),
            ..TomlToken::default()
        }]),
    )
    .unwrap();
    let w = within_for(Duration::from_secs(30), "dev token re-pointed", async {
        loop {
            match ws::connect(ws_addr, &tls, &req).await.unwrap() {
                WsOutcome::Upgraded { ws, .. } => return *ws,
                WsOutcome::Refused { .. } => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .unwrap();
    let mut b = ws::into_bytes(w, Mode::Binary);
    rfb::check_session(&mut b.io).await.unwrap();
    proxy.assert_secrets_not_logged(&[&tok]);
    drop(b);
    drop(proxy);

    // A second start reuses the state: same certificate.
    let again = start_dev(&state).await;
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        cert_pem,
        "dev certificate regenerated"
    );
    let req = WsRequest::path(format!("/websockify?token={tok}")).protocol("binary");
    ws::rfb_over_ws(again.ws_addr(), &tls, &req, Mode::Binary)
        .await
        .unwrap();
}

/// Runs the binary to completion (bounded) and returns (exit code, stderr).
/// If `ready` is given and the file appears, the configuration was wrongly
/// accepted: the process is killed at once and the test fails.
fn run(args: &[&str], ready: Option<&Path>) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary().unwrap());
    cmd.args(args);
    if let Some(r) = ready {
        cmd.arg("--ready-file").arg(r);
    }
    let mut child = consolegate_tests::process::ChildGuard::spawn("consolegate", cmd).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.exited() {
            break st;
        }
        if ready.is_some_and(Path::exists) {
            drop(child);
            panic!("{args:?} was accepted (ready file written)");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.drain_output();
    (st.code(), child.output())
}

#[test]
fn broken_config_file_exits_64_with_one_line_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "this is [not toml\n").unwrap();
    let (code, err) = run(&["check-config", "--config", bad.to_str().unwrap()], None);
    assert_eq!(code, Some(64), "check-config on broken TOML: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "want a one-line reason, got:\n{err}"
    );
}

/// Plain HTTP is for loopback listeners only.
#[test]
fn plain_http_on_a_non_loopback_listener_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t: 127.0.0.1:5900\n").unwrap();
    let (code, err) = run(
        &[
            "serve",
            "--plain-http",
            "--ws-listen",
            "0.0.0.0:0",
            "--token-file",
            tokens.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ],
        Some(&dir.path().join("ready.json")),
    );
    assert_eq!(code, Some(64), "--plain-http on 0.0.0.0: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "want a one-line reason, got:\n{err}"
    );
}

/// True if `v` holds `key` = `want` at any depth.
fn has_field(v: &serde_json::Value, key: &str, want: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .any(|(k, x)| (k == key && x.as_str() == Some(want)) || has_field(x, key, want)),
        serde_json::Value::Array(a) => a.iter().any(|x| has_field(x, key, want)),
        _ => false,
    }
}

#[tokio::test]
async fn json_logs_are_json_and_carry_the_refusal_reason() {
    let tokens_dir = tempfile::tempdir().unwrap();
    let tokens = tokens_dir.path().join("tokens");
    let tok = consolegate_tests::random_token();
    std::fs::write(&tokens, format!("{tok}: 127.0.0.1:1\n")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "serve",
        "--ws-listen",
        "127.0.0.1:0",
        "--plain-http",
        "--token-file",
        tokens.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--log-format",
        "json",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Proxy::start_args(dir, &args).await.unwrap();
    let unknown = consolegate_tests::random_token();
    let req = WsRequest::path(format!("/websockify?token={unknown}")).protocol("binary");
    let status = ws::connect(proxy.ws_addr(), &Transport::Plain, &req)
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403);
    proxy.wait_log(&["session refused"]).await.unwrap();
    let logs = proxy.logs();
    let mut refusal = None;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if line.contains("session refused") {
            refusal = Some(v);
        }
    }
    let refusal = refusal.expect("a session refused line");
    assert!(
        has_field(&refusal, "reason", "token_unknown"),
        "no reason=token_unknown in {refusal}"
    );
    proxy.assert_secrets_not_logged(&[&tok, &unknown]);
}

/// `--config` with relative paths (relative to the file), validated by
/// `check-config`, served, and overridden by flags.
#[tokio::test]
async fn config_file_is_checked_served_and_overridden_by_flags() {
    let q = Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let pki = consolegate_tests::certs::TestPki::generate(&cfg_dir.path().join("pki")).unwrap();
    let tok = consolegate_tests::random_token();
    std::fs::create_dir(cfg_dir.path().join("tokens.d")).unwrap();
    std::fs::write(
        cfg_dir.path().join("tokens.d/vm"),
        format!("{tok}: {}\n", q.vnc.websockify_target()),
    )
    .unwrap();
    let cfg = cfg_dir.path().join("consolegate.toml");
    std::fs::write(
        &cfg,
        r#"
state_dir = "state"

[websocket]
listen = ["127.0.0.1:0"]
allow_origins = ["https://config.example"]

[tls]
cert = "pki/server.pem"
key = "pki/server.key"

[tokens]
files = ["tokens.d"]
"#,
    )
    .unwrap();
    let (code, err) = run(&["check-config", "--config", cfg.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "check-config: {err}");

    // Served from another working directory: paths resolve against the file.
    let args: Vec<String> = [
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--ws-listen",
        "[::1]:0",
        "--allow-origin",
        "https://flag.example",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Proxy::start_args(tempfile::tempdir().unwrap(), &args)
        .await
        .unwrap();
    assert!(
        proxy.websocket.iter().all(|a| a.is_ipv6()),
        "--ws-listen should replace the file's listen list: {:?}",
        proxy.websocket
    );
    let tls = Transport::Tls(pki.client_config().unwrap());
    let path = format!("/websockify?token={tok}");
    let ok = WsRequest::path(&path)
        .protocol("binary")
        .origin("https://flag.example");
    ws::rfb_over_ws(proxy.ws_addr(), &tls, &ok, Mode::Binary)
        .await
        .unwrap();
    let from_file = WsRequest::path(&path)
        .protocol("binary")
        .origin("https://config.example");
    let status = ws::connect(proxy.ws_addr(), &tls, &from_file)
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403, "--allow-origin should replace the file's list");
    proxy.assert_secrets_not_logged(&[&tok]);
}

#[test]
fn unknown_config_keys_and_duplicate_tokens_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[websocket]\nlisten = [\"127.0.0.1:0\"]\nlisten_typo = 1\n",
    )
    .unwrap();
    let (code, err) = run(&["check-config", "--config", cfg.to_str().unwrap()], None);
    assert_eq!(code, Some(64), "unknown key accepted: {err}");

    let tokens = dir.path().join("dup");
    std::fs::write(&tokens, "same: 127.0.0.1:5900\nsame: 127.0.0.1:5901\n").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[websocket]\nlisten = [\"127.0.0.1:0\"]\nplain_http = true\n[tokens]\nfiles = [{:?}]\n",
            tokens.display().to_string()
        ),
    )
    .unwrap();
    // check-config validates the file itself; the token files are read
    // when serving, and a token defined twice stops the start.
    let (code, err) = run(
        &[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ],
        Some(&dir.path().join("ready.json")),
    );
    assert_eq!(code, Some(64), "duplicate token accepted: {err}");
    assert!(!err.contains("same:"), "token secret in the error: {err}");
}

/// Bad configurations found at start-up: exit 64, and the last stderr line
/// names what is wrong.
#[test]
fn startup_configuration_errors_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t: 127.0.0.1:5900\n").unwrap();
    let missing = dir.path().join("missing");
    let state = dir.path().join("state");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--token-file".into(),
                missing.join("tokens").display().to_string(),
            ],
            "missing",
        ),
        (
            vec![
                "--token-file".into(),
                tokens.display().to_string(),
                "--tls-cert".into(),
                missing.join("cert.pem").display().to_string(),
                "--tls-key".into(),
                missing.join("key.pem").display().to_string(),
            ],
            "cert.pem",
        ),
        (
            vec![
                "--token-file".into(),
                tokens.display().to_string(),
                "--handshake-timeout".into(),
                "soon".into(),
            ],
            "soon",
        ),
    ];
    for (extra, mentions) in cases {
        let mut args = vec![
            "serve".to_owned(),
            "--ws-listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run(&args, Some(&dir.path().join("ready.json")));
        assert_eq!(code, Some(64), "{args:?}: {err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.contains(mentions),
            "{args:?}: last line {last:?} does not say what is wrong"
        );
    }
}
