//! consolegate behind a real load balancer (haproxy): the PROXY protocol
//! (v1 `send-proxy` and v2 `send-proxy-v2`, `mode tcp`) and
//! X-Forwarded-For (`mode http`, `option forwardfor`) name the tenant in
//! the session log, but only when they come from a trusted network. The
//! tenant connects from its own loopback address (127.0.0.55) so the logs
//! can tell it from haproxy (127.0.0.1). Forged and malformed headers are
//! scripted: a real balancer never sends them.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use consolegate_tests::http::{self, client_frame, read_frame, read_response_head, upgrade_head};
use consolegate_tests::net::authority;
use consolegate_tests::process::ChildGuard;
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, write_toml_tokens};
use consolegate_tests::qemu::{Qemu, QemuOptions, Sock};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::{contains, random_token, within};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};

const TENANT_IP: &str = "127.0.0.55";

/// A TCP connection from the tenant's own loopback address.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    let ip: IpAddr = source.parse().unwrap();
    sock.bind(SocketAddr::new(ip, 0)).unwrap();
    within("TCP connect", sock.connect(to))
        .await
        .unwrap()
        .unwrap()
}

/// Upgrades `io` to a WebSocket on the serial console and checks that a
/// probe echoes back through the guest. `extra` headers go in the request.
async fn serial_echo(mut io: TcpStream, host: SocketAddr, token: &str, extra: &[&str]) {
    let mut headers = vec!["Sec-WebSocket-Protocol: binary"];
    headers.extend_from_slice(extra);
    let head = upgrade_head(
        &authority(host),
        &format!("/websockify?token={token}"),
        &headers,
    );
    io.write_all(head.as_bytes()).await.unwrap();
    let resp = within("upgrade", read_response_head(&mut io))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status, 101, "{resp:?}");
    let probe = format!("probe-{:08x}", rand::random::<u32>());
    http::write_all(&mut io, &client_frame(2, probe.as_bytes()))
        .await
        .unwrap();
    within("echo through the guest", async {
        let mut got = Vec::new();
        while !contains(&got, probe.as_bytes()) {
            let f = read_frame(&mut io).await.unwrap();
            assert_eq!(f.opcode, 2, "binary frames only: {f:?}");
            got.extend_from_slice(&f.payload);
        }
    })
    .await
    .unwrap();
    // Close: the chardev serves one client at a time.
    http::write_all(&mut io, &client_frame(8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let _ = within("close", http::read_close(&mut io)).await;
}

/// A real haproxy with `cfg` (its `{{BACKEND}}` replaced), running until dropped.
async fn haproxy(cfg: &str, listen: &[SocketAddr]) -> (ChildGuard, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let mut child = ChildGuard::spawn("haproxy", cmd).expect("haproxy (Debian package haproxy)");
    for addr in listen {
        within("haproxy listening", async {
            while TcpStream::connect(addr).await.is_err() {
                if let Some(st) = child.exited() {
                    panic!("haproxy exited ({st}): {}", child.output());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
    }
    (child, dir)
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn serial_guest() -> (Qemu, String, tempfile::TempDir, std::path::PathBuf) {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Tcp,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("serial.toml");
    write_toml_tokens(
        &file,
        &[TomlToken {
            token: tok.clone(),
            kind: Some("serial".into()),
            target: Some(authority(qemu.serial.tcp())),
            ..TomlToken::default()
        }],
    )
    .unwrap();
    (qemu, tok, dir, file)
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_haproxy_name_the_tenant() {
    let (_qemu, tok, _d, file) = serial_guest().await;
    let mut spec = ProxySpec::plain_ws(&[&file]);
    spec.extra = ["--proxy-protocol", "--trusted-proxy", "127.0.0.1/32"]
        .map(String::from)
        .to_vec();
    let p = Proxy::start(spec).await.unwrap();
    let backend = p.ws_addr();
    let (v2, v1) = (free_addr(), free_addr());
    let cfg = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend v2\n  bind {v2}\n  default_backend cg2\n\
         frontend v1\n  bind {v1}\n  default_backend cg1\n\
         backend cg2\n  server consolegate {backend} send-proxy-v2\n\
         backend cg1\n  server consolegate {backend} send-proxy\n"
    );
    let (_hap, _hd) = haproxy(&cfg, &[v2, v1]).await;

    serial_echo(connect_from(TENANT_IP, v2).await, v2, &tok, &[]).await;
    p.wait_log(&["session established", "tenant.addr=127.0.0.55:"])
        .await
        .unwrap();
    serial_echo(connect_from(TENANT_IP, v1).await, v1, &tok, &[]).await;
    p.wait_log_count(&["session established", "tenant.addr=127.0.0.55:"], 2)
        .await
        .unwrap();

    // An untrusted peer (the tenant itself) is served as it is...
    serial_echo(connect_from(TENANT_IP, backend).await, backend, &tok, &[]).await;
    p.wait_log_count(&["session established", "tenant.addr=127.0.0.55:"], 3)
        .await
        .unwrap();
    // ...and cannot claim another address with a PROXY header of its own:
    // it is not parsed, so the request is not HTTP (400).
    let mut forged = connect_from(TENANT_IP, backend).await;
    forged
        .write_all(b"PROXY TCP4 6.6.6.6 127.0.0.1 1234 80\r\n")
        .await
        .unwrap();
    let resp = within("forged PROXY header", read_response_head(&mut forged))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status, 400, "{resp:?}");

    // A trusted peer must send the header: a bare request is refused.
    let mut bare = connect_from("127.0.0.1", backend).await;
    bare.write_all(upgrade_head(&authority(backend), "/websockify", &[]).as_bytes())
        .await
        .unwrap();
    p.wait_log(&[
        "session refused",
        "proxy_protocol",
        "no PROXY protocol header",
    ])
    .await
    .unwrap();
    // A malformed header from a trusted peer closes only that connection.
    let mut bad = connect_from("127.0.0.1", backend).await;
    bad.write_all(b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n")
        .await
        .unwrap();
    p.wait_log(&["session refused", "invalid PROXY protocol header"])
        .await
        .unwrap();
    let logs = p.logs();
    assert!(
        !logs.contains("6.6.6.6"),
        "a forged address was believed:\n{logs}"
    );
    // The proxy still serves through haproxy.
    serial_echo(connect_from(TENANT_IP, v2).await, v2, &tok, &[]).await;
}

#[tokio::test]
async fn x_forwarded_for_from_haproxy_http_mode_names_the_tenant() {
    let (_qemu, tok, _d, file) = serial_guest().await;
    let mut spec = ProxySpec::plain_ws(&[&file]);
    spec.extra = ["--trusted-proxy", "127.0.0.1"].map(String::from).to_vec();
    let p = Proxy::start(spec).await.unwrap();
    let backend = p.ws_addr();
    let front = free_addr();
    let cfg = format!(
        "global\n  maxconn 100\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 60s\n\
         frontend web\n  bind {front}\n  option forwardfor\n  default_backend cg\n\
         backend cg\n  server consolegate {backend}\n"
    );
    let (_hap, _hd) = haproxy(&cfg, &[front]).await;

    serial_echo(connect_from(TENANT_IP, front).await, front, &tok, &[]).await;
    p.wait_log(&[
        "session established",
        "tenant.addr=127.0.0.55",
        "tenant.via=127.0.0.1:",
    ])
    .await
    .unwrap();

    // Straight to consolegate, the tenant's own X-Forwarded-For is ignored.
    serial_echo(
        connect_from(TENANT_IP, backend).await,
        backend,
        &tok,
        &["X-Forwarded-For: 6.6.6.6"],
    )
    .await;
    p.wait_log_count(&["session established", "tenant.addr=127.0.0.55"], 2)
        .await
        .unwrap();
    // Through haproxy, a forged entry left of the real client is skipped.
    serial_echo(
        connect_from(TENANT_IP, front).await,
        front,
        &tok,
        &["X-Forwarded-For: 6.6.6.6"],
    )
    .await;
    p.wait_log_count(&["session established", "tenant.addr=127.0.0.55"], 3)
        .await
        .unwrap();
    let logs = p.logs();
    assert!(
        !logs.contains("6.6.6.6"),
        "a forged address was believed:\n{logs}"
    );
}
