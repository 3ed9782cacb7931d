//! The systemd service: the shipped unit file passes `systemd-analyze
//! verify`, and the real binary speaks the sd_notify protocol to a real
//! `NOTIFY_SOCKET` (READY, WATCHDOG keepalives, RELOADING/READY on SIGHUP,
//! STOPPING on SIGTERM), as `Type=notify` with `WatchdogSec=` expects.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use consolegate_tests::process::ChildGuard;
use consolegate_tests::proxy::{binary, raw_token, write_toml_tokens};
use consolegate_tests::{random_token, within};
use tokio::net::UnixDatagram;

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/dist/consolegate.service")
}

/// Runs `systemd-analyze verify` on `unit` (with ExecStart pointing at the
/// built binary, as `cargo xtask install` does); returns what it printed.
fn verify(unit_text: &str, name: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = binary().unwrap();
    let text = unit_text.replace("/usr/local/bin/consolegate", bin.to_str().unwrap());
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let text = std::fs::read_to_string(unit_file()).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "User=consolegate",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN",
    ] {
        assert!(text.contains(needed), "unit file lacks {needed:?}");
    }
    let (ok, printed) = verify(&text, "consolegate.service");
    assert!(ok && printed.trim().is_empty(), "verify: {printed}");
    // The check can fail: a misspelt hardening directive is reported.
    let typo = text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    let (_, printed) = verify(&typo, "typo.service");
    assert!(
        printed.contains("Unknown key"),
        "verify missed a typo: {printed}"
    );
}

/// Waits for the next datagram that contains `want`, collecting every
/// message seen on the way.
async fn expect(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let mut buf = vec![0u8; 4096];
    within(&format!("sd_notify {want:?}"), async {
        loop {
            let n = sock.recv(&mut buf).await.unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            if msg.lines().any(|l| l == want) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; messages so far: {seen:?}"));
}

#[tokio::test]
async fn notify_protocol_ready_watchdog_reload_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    let tokens = dir.path().join("tokens.toml");
    write_toml_tokens(
        &tokens,
        &[raw_token(&random_token(), "127.0.0.1:9".parse().unwrap())],
    )
    .unwrap();
    let bin = binary().unwrap();
    // systemd sets WATCHDOG_PID to the service's PID: `exec` keeps the
    // shell's PID for the proxy.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("export WATCHDOG_PID=$$; exec \"$0\" \"$@\"")
        .arg(&bin)
        .args(["serve", "--ws-listen", "127.0.0.1:0", "--plain-http"])
        .args(["--drain-timeout", "0", "--log-format", "text"])
        .arg("--token-file")
        .arg(&tokens)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("RUST_LOG");
    let mut child = ChildGuard::spawn("consolegate", cmd).unwrap();
    let mut seen = Vec::new();

    expect(&sock, "READY=1", &mut seen).await;
    assert!(
        seen.last().unwrap().contains("STATUS=serving"),
        "READY comes with a status: {seen:?}"
    );
    // Keepalives at half the watchdog timeout, from the running event loop.
    expect(&sock, "WATCHDOG=1", &mut seen).await;
    expect(&sock, "WATCHDOG=1", &mut seen).await;

    child.signal("HUP").unwrap();
    expect(&sock, "RELOADING=1", &mut seen).await;
    assert!(
        seen.last().unwrap().contains("MONOTONIC_USEC="),
        "RELOADING carries MONOTONIC_USEC: {seen:?}"
    );
    expect(&sock, "READY=1", &mut seen).await;

    child.signal("TERM").unwrap();
    expect(&sock, "STOPPING=1", &mut seen).await;
    let status = within("exit after SIGTERM", async {
        loop {
            if let Some(st) = child.exited() {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status}: {}", child.output());
}

/// Outside systemd (no NOTIFY_SOCKET) nothing is sent and nothing fails.
#[tokio::test]
async fn without_notify_socket_the_proxy_runs_normally() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    write_toml_tokens(
        &tokens,
        &[raw_token(&random_token(), "127.0.0.1:9".parse().unwrap())],
    )
    .unwrap();
    let mut spec = consolegate_tests::proxy::ProxySpec::plain_ws(&[&tokens]);
    spec.extra = vec!["--drain-timeout".into(), "0".into()];
    let mut p = consolegate_tests::proxy::Proxy::start(spec).await.unwrap();
    p.signal("TERM").unwrap();
    p.wait_log(&["consolegate stopped"]).await.unwrap();
    assert!(!p.logs().contains("sd_notify failed"), "{}", p.logs());
    within("exit", async {
        while p.alive() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}
