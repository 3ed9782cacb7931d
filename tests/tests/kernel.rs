//! Kernel paths through the real binary: the eBPF connect allow-list
//! (required mode in front of a real QEMU VNC server over CONNECT; the
//! warning fallback when privileges do not allow it) and each data path
//! (`--datapath copy|splice|uring`) moving large random payloads byte for
//! byte. Where io_uring is unavailable, `--datapath uring` must fall back
//! to splice (tested instead, with a `skipped:` line).
//!
//! That the kernel itself refuses an unlisted connect with EPERM is shown
//! by the unit test `control::allowlist::tests::kernel_refuses_unlisted_connects_with_eperm`
//! (a child process in an attached test cgroup); here the proxy refuses
//! such targets before dialling, and the kernel list must not get in the
//! way of anything a token names.

use std::process::Command;

use consolegate_tests::fake::EchoServer;
use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, ProxySpec, binary, raw_token, write_toml_tokens};
use consolegate_tests::qemu::Sock;
use consolegate_tests::scenario::{token_dir, vnc_behind_proxy};
use consolegate_tests::ws;
use consolegate_tests::{random_token, rfb};
use rand::RngCore as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `Ok` if `consolegate doctor` can attach the allow-list here, else why not.
fn allowlist_available() -> Result<(), String> {
    let out = Command::new(binary().map_err(|e| e.to_string())?)
        .arg("doctor")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("cgroup attach"))
        .ok_or_else(|| format!("doctor printed no cgroup attach line:\n{text}"))?;
    if line.trim_start().starts_with("yes") {
        Ok(())
    } else {
        Err(line.trim().to_owned())
    }
}

/// `Ok` if `consolegate doctor` says the uring data path can run here
/// (its IORING_OP_SPLICE line), else why not.
fn uring_available() -> Result<(), String> {
    let out = Command::new(binary().map_err(|e| e.to_string())?)
        .arg("doctor")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("uring splice"))
        .ok_or_else(|| format!("doctor printed no uring splice line:\n{text}"))?;
    if line.trim_start().starts_with("yes") {
        Ok(())
    } else {
        Err(line.trim().to_owned())
    }
}

/// The data path a session started with `--datapath <asked>` must report:
/// `uring` falls back to splice where io_uring is unavailable.
fn expected_datapath(asked: &str) -> &str {
    if asked != "uring" {
        return asked;
    }
    match uring_available() {
        Ok(()) => "uring",
        Err(why) => {
            println!("skipped: io_uring unavailable ({why}); testing the splice fallback");
            "splice"
        }
    }
}

/// The proxy's cgroup v2 path from /proc/<pid>/cgroup.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test]
async fn allowlist_required_vnc_over_connect_with_each_datapath() {
    if let Err(why) = allowlist_available() {
        println!(
            "skipped: the eBPF allow-list cannot attach here ({why}); \
             allowlist_without_privileges_warns_or_refuses tests the fallback"
        );
        return;
    }
    for asked in ["copy", "splice", "uring"] {
        let datapath = expected_datapath(asked);
        let mut spec = ProxySpec::connect(&[]);
        spec.extra = ["--allowlist", "required", "--datapath", asked]
            .map(String::from)
            .to_vec();
        let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
        s.proxy
            .wait_log(&["eBPF connect allow-list active", "entries=1"])
            .await
            .unwrap();
        let pid = s.proxy.pid();
        let cg = cgroup_of(pid);
        assert!(
            cg.ends_with(&format!("/consolegate-{pid}")),
            "the proxy is not in its own cgroup: {cg:?}"
        );

        let target = authority(s.qemu.vnc.tcp());
        let p = s.proxy.connect_addr();
        let mut io = connect_tunnel(p, &target, Some(&bearer(&s.token)))
            .await
            .unwrap()
            .tunnel()
            .unwrap();
        let (init, fb) = rfb::check_session(&mut io).await.unwrap();
        assert_eq!((fb.width, fb.height), (init.width, init.height));
        s.proxy
            .wait_log(&["session established", &format!("datapath=\"{datapath}\"")])
            .await
            .unwrap();
        drop(io);

        // A listening service no token names: refused, never dialled.
        let other = EchoServer::start().await.unwrap();
        let o = connect_tunnel(p, &authority(other.addr), Some(&bearer(&s.token)))
            .await
            .unwrap();
        assert_eq!(o.status(), 403);
        assert_eq!(other.accepted(), 0);

        // At exit the proxy leaves and removes its cgroup.
        let mut proxy = s.proxy;
        let dir = format!("/sys/fs/cgroup/unified{cg}");
        let mount_dir = std::path::Path::new(&dir);
        proxy.signal("TERM").unwrap();
        consolegate_tests::within("proxy exit", async {
            while proxy.alive() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap();
        if mount_dir.parent().is_some_and(|p| p.exists()) {
            assert!(!mount_dir.exists(), "{dir} left behind");
        }
    }
}

/// Sends `len` random bytes through a CONNECT tunnel to an echo server and
/// checks the echo byte for byte; half-closes after writing.
async fn echo_roundtrip(proxy: std::net::SocketAddr, token: &str, target: &str, len: usize) {
    let io = connect_tunnel(proxy, target, Some(&bearer(token)))
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    let (mut r, mut w) = tokio::io::split(io);
    let send = async {
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::with_capacity(len);
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) =
        consolegate_tests::within("echo round trip", async { tokio::join!(send, recv) })
            .await
            .unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
}

#[tokio::test]
async fn each_datapath_moves_bulk_and_many_sessions_byte_for_byte() {
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let token = random_token();
    let file = dir.path().join("tokens.toml");
    // By name: with the allow-list on, the address is resolved and allowed
    // just before the dial.
    let mut entry = raw_token(&token, echo.addr);
    entry.target = Some(format!("localhost:{}", echo.addr.port()));
    write_toml_tokens(&file, &[entry]).unwrap();
    let target = format!("localhost:{}", echo.addr.port());
    for asked in ["copy", "splice", "uring"] {
        let datapath = expected_datapath(asked);
        let mut spec = ProxySpec::connect(&[&file]);
        spec.extra = ["--datapath", asked].map(String::from).to_vec();
        let proxy = Proxy::start(spec).await.unwrap();
        let p = proxy.connect_addr();
        echo_roundtrip(p, &token, &target, 32 << 20).await;
        let many: Vec<_> = (0..24)
            .map(|i| {
                let (token, target) = (token.clone(), target.clone());
                tokio::spawn(
                    async move { echo_roundtrip(p, &token, &target, 200_000 + i * 4099).await },
                )
            })
            .collect();
        for t in many {
            t.await.unwrap();
        }
        proxy
            .wait_log_count(
                &["session established", &format!("datapath=\"{datapath}\"")],
                25,
            )
            .await
            .unwrap();
        proxy
            .wait_log_count(&["session closed", "end=closed"], 25)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn allowlist_without_privileges_warns_or_refuses() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("skipped: setpriv (util-linux) missing: cannot drop capabilities");
        return;
    }
    // Root without capabilities: bpf(2) and the cgroup are refused.
    let launcher: Vec<String> = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
        .map(String::from)
        .to_vec();
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let token = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&token, echo.addr)]).unwrap();

    // auto: starts anyway, says so loudly, and still serves.
    let mut spec = ProxySpec::connect(&[&file]);
    spec.launcher = launcher.clone();
    let proxy = Proxy::start(spec).await.unwrap();
    proxy
        .wait_log(&["WARN", "eBPF connect allow-list NOT active"])
        .await
        .unwrap();
    proxy
        .wait_log(&["consolegate ready", "allowlist=\"off\""])
        .await
        .unwrap();
    echo_roundtrip(
        proxy.connect_addr(),
        &token,
        &echo.addr.to_string(),
        1 << 20,
    )
    .await;
    drop(proxy);

    // required: refuses to start and says why.
    let mut spec = ProxySpec::connect(&[&file]);
    spec.launcher = launcher;
    spec.extra = ["--allowlist", "required"].map(String::from).to_vec();
    let err = Proxy::start(spec).await.unwrap_err().to_string();
    assert!(
        err.contains("eBPF allow-list is required") && err.contains("unavailable"),
        "{err}"
    );
}

/// Sends `len` random bytes through a plain WebSocket (binary or base64)
/// to the echo console and checks the echo byte for byte.
async fn ws_echo(addr: std::net::SocketAddr, token: &str, mode: ws::Mode, len: usize) {
    ws_echo_via(addr, &Transport::Plain, token, mode, len).await;
}

/// [`ws_echo`] over a chosen transport (TLS or plain).
async fn ws_echo_via(
    addr: std::net::SocketAddr,
    transport: &Transport,
    token: &str,
    mode: ws::Mode,
    len: usize,
) {
    let proto = if mode == ws::Mode::Base64 {
        "base64"
    } else {
        "binary"
    };
    let req = ws::WsRequest::path(format!("/websockify?token={token}")).protocol(proto);
    let (w, _) = ws::connect(addr, transport, &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(w, mode);
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    let (mut rd, mut wr) = tokio::io::split(&mut b.io);
    let send = async {
        for chunk in data.chunks(60_000) {
            wr.write_all(chunk).await.unwrap();
        }
        wr.flush().await.unwrap();
    };
    let mut back = vec![0u8; len];
    let recv = async { rd.read_exact(&mut back).await.unwrap() };
    consolegate_tests::within("WebSocket echo", async { tokio::join!(send, recv) })
        .await
        .unwrap();
    assert!(back == data, "echoed bytes differ");
}

#[tokio::test]
async fn websocket_each_datapath_echoes_bulk_and_many_sessions() {
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let token = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&token, echo.addr)]).unwrap();
    for datapath in ["copy", "splice"] {
        let mut spec = ProxySpec::plain_ws(&[&file]);
        spec.extra = ["--datapath", datapath].map(String::from).to_vec();
        let proxy = Proxy::start(spec).await.unwrap();
        let a = proxy.ws_addr();
        ws_echo(a, &token, ws::Mode::Binary, 16 << 20).await;
        proxy
            .wait_log(&["session established", &format!("datapath=\"{datapath}\"")])
            .await
            .unwrap();
        let many: Vec<_> = (0..16)
            .map(|i| {
                let token = token.clone();
                tokio::spawn(async move {
                    ws_echo(a, &token, ws::Mode::Binary, 100_000 + i * 7919).await
                })
            })
            .collect();
        for t in many {
            t.await.unwrap();
        }
        // base64 frames are re-encoded in userspace whatever is configured.
        ws_echo(a, &token, ws::Mode::Base64, 1 << 20).await;
        proxy
            .wait_log(&[
                "session established",
                "mode=\"base64\"",
                "datapath=\"copy\"",
            ])
            .await
            .unwrap();
    }
}

/// TLS WebSocket sessions: with kTLS in the kernel, binary sessions are
/// handed to it (`ktls+splice`); without (this host: TCP_ULP "tls" gives
/// ENOENT) they run on rustls and the copy exactly as before, with one
/// start-up line saying why and nothing per session. `--ktls off` keeps
/// rustls whatever the kernel has. Bulk and many sessions, byte for byte.
#[tokio::test]
async fn tls_websocket_uses_ktls_where_the_kernel_has_it_else_the_copy() {
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let token = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&token, echo.addr)]).unwrap();
    for ktls in ["auto", "off"] {
        let mut spec = ProxySpec::tls_ws(&[&file]);
        spec.extra = ["--ktls", ktls].map(String::from).to_vec();
        let proxy = Proxy::start(spec).await.unwrap();
        let expected = if ktls == "off" {
            let (available, line) = proxy.ktls_available().await.unwrap();
            assert!(!available && line.contains("kernel.ktls"), "{line}");
            "copy"
        } else {
            // Probed before the allow-list attaches (its loopback connects
            // would be refused with EPERM).
            let (_, line) = proxy.ktls_available().await.unwrap();
            assert!(!line.contains("os error 1)"), "{line}");
            proxy.tls_datapath().await.unwrap()
        };
        let (a, t) = (proxy.ws_addr(), proxy.transport());
        ws_echo_via(a, &t, &token, ws::Mode::Binary, 8 << 20).await;
        proxy
            .wait_log(&["session established", &format!("datapath=\"{expected}\"")])
            .await
            .unwrap();
        let many: Vec<_> = (0..8)
            .map(|i| {
                let (token, t) = (token.clone(), t.clone());
                tokio::spawn(async move {
                    ws_echo_via(a, &t, &token, ws::Mode::Binary, 100_000 + i * 7919).await
                })
            })
            .collect();
        for m in many {
            m.await.unwrap();
        }
        proxy
            .wait_log_count(
                &["session established", &format!("datapath=\"{expected}\"")],
                9,
            )
            .await
            .unwrap();
        // base64 is re-encoded in userspace: rustls and the copy.
        ws_echo_via(a, &t, &token, ws::Mode::Base64, 1 << 20).await;
        proxy
            .wait_log(&[
                "session established",
                "mode=\"base64\"",
                "datapath=\"copy\"",
            ])
            .await
            .unwrap();
        let logs = proxy.logs();
        if expected == "copy" {
            assert_eq!(logs.matches("kTLS unavailable").count(), 1, "{logs}");
            assert!(!logs.contains("ktls enabled"), "{logs}");
        }
        assert!(!logs.contains("kTLS not used for this session"), "{logs}");
    }
}

#[test]
fn doctor_reports_every_acceleration_and_the_configured_use() {
    let out = Command::new(binary().unwrap())
        .args(["doctor", "--datapath", "copy"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for probe in [
        "bpf",
        "ebpf object",
        "cgroup v2",
        "cgroup attach",
        "sockmap",
        "io_uring",
        "uring splice",
        "kTLS",
        "kTLS rekey",
        "splice",
    ] {
        let line = text
            .lines()
            .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(probe)))
            .unwrap_or_else(|| panic!("no {probe} line:\n{text}"));
        let verdict = line.trim_start();
        assert!(
            verdict.starts_with("yes ") || verdict.starts_with("no "),
            "{line}"
        );
    }
    assert!(text.contains("this configuration would use:"), "{text}");
    assert!(text.contains("copy for every session"), "{text}");
    // kTLS: the ciphers it would offload, or why not; never used with copy.
    assert!(
        text.contains("not used: kernel.datapath = \"copy\""),
        "{text}"
    );
    // The kTLS probe names the ciphers it would offload, or why none.
    assert!(
        text.lines()
            .any(|l| l.contains("kTLS") && (l.contains("offloads ") || l.contains("TCP_ULP"))),
        "{text}"
    );
    // Key renewal is probed only where kTLS is (the guest test sees it).
    let rekey = text
        .lines()
        .find(|l| l.contains("kTLS rekey"))
        .unwrap_or_default();
    if text.contains("TCP_ULP \"tls\": ENOENT") {
        assert!(rekey.contains("no kTLS here"), "{text}");
    }
    let out = Command::new(binary().unwrap())
        .args(["doctor", "--datapath", "uring"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let want = if uring_available().is_ok() {
        "io_uring (IORING_OP_SPLICE) for CONNECT sessions"
    } else {
        "io_uring is unavailable here"
    };
    assert!(text.contains(want), "{text}");
    // With the allow-list required, the exit code follows the attach probe.
    let attach_ok = allowlist_available().is_ok();
    let st = Command::new(binary().unwrap())
        .args(["doctor", "--allowlist", "required"])
        .output()
        .unwrap()
        .status;
    assert_eq!(st.success(), attach_ok);
}

/// A live `--datapath uring` CONNECT session is stopped cleanly by the
/// proxy's shutdown: the ring's in-flight operations are cancelled, the
/// tenant sees the tunnel closed, and the session ends `shutdown`.
#[tokio::test]
async fn uring_session_ends_cleanly_at_shutdown() {
    let datapath = expected_datapath("uring");
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let token = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&token, echo.addr)]).unwrap();
    let mut spec = ProxySpec::connect(&[&file]);
    spec.extra = ["--datapath", "uring", "--drain-timeout", "0"]
        .map(String::from)
        .to_vec();
    let proxy = Proxy::start(spec).await.unwrap();
    let mut io = connect_tunnel(
        proxy.connect_addr(),
        &echo.addr.to_string(),
        Some(&bearer(&token)),
    )
    .await
    .unwrap()
    .tunnel()
    .unwrap();
    io.write_all(b"ping through the ring").await.unwrap();
    let mut got = [0u8; 21];
    io.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping through the ring");
    proxy
        .wait_log(&["session established", &format!("datapath=\"{datapath}\"")])
        .await
        .unwrap();
    // Both directions now wait on the ring with nothing to move.
    proxy.signal("TERM").unwrap();
    let mut rest = Vec::new();
    let n = consolegate_tests::within("tunnel closed at shutdown", io.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(n.is_err() || rest.is_empty(), "{n:?} {rest:?}");
    proxy
        .wait_log(&["session closed", "end=shutdown"])
        .await
        .unwrap();
}
