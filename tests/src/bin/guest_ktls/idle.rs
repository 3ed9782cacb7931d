//! Idle memory of TLS sessions, in the guest where kTLS exists: `SESSIONS`
//! TLS WebSocket sessions with TLS on the compute leg too (as to QEMU),
//! held idle through the real proxy, once with kTLS (`--ktls auto`: both
//! rustls legs are handed to the kernel and their state freed) and once
//! with `--ktls off` (rustls keeps both legs for the session's life).
//!
//! Reports the proxy's PSS growth per session for each (`/proc/<pid>/
//! smaps_rollup`, as `loadgen idle` reads it). Checks only what must hold:
//! every session answers a round trip and runs on the data path its
//! setting implies. The memory figures are measurements, not assertions.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use consolegate_tests::net::Transport;
use consolegate_tests::proxy::Proxy;
use consolegate_tests::ws;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::report;

/// Sessions held per run: enough that allocator granularity averages out
/// (about 1 KiB per session at 100), few enough for TCG. The test passes
/// `CONSOLEGATE_GUEST_IDLE_SESSIONS` on for runs by hand with more.
const SESSIONS: usize = 300;

fn sessions() -> usize {
    std::env::var("CONSOLEGATE_GUEST_IDLE_SESSIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(SESSIONS)
}

/// Upper bound for opening one session under TCG (never a performance
/// assertion).
const OPEN_LIMIT: Duration = Duration::from_secs(30);

/// Runs the kTLS and the rustls run against the [`echo_console`] that
/// `token` names; `config` is the proxy configuration file of the bulk
/// sessions (TLS front end, compute profile with the client certificate).
pub async fn tls_sessions(config: &Path, token: &str, tenant: &Transport) -> anyhow::Result<()> {
    let with_ktls = run(config, token, tenant, "auto", "ktls+splice").await?;
    let without = run(config, token, tenant, "off", "copy").await?;
    report(
        "idle-wss-tls2-kib-per-session",
        format!(
            "ktls+splice {with_ktls:.1} rustls-copy {without:.1} ({} sessions, \
             tenant and compute TLS)",
            sessions()
        ),
    );
    Ok(())
}

/// One proxy with `--ktls <ktls>`: opens the sessions, holds them, returns
/// KiB of PSS per session.
async fn run(
    config: &Path,
    token: &str,
    tenant: &Transport,
    ktls: &str,
    datapath: &str,
) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new().prefix("cg-idle-").tempdir()?;
    let args: Vec<String> = [
        "serve",
        "--config",
        &config.display().to_string(),
        "--ktls",
        ktls,
        "--max-sessions-per-token",
        "10000",
        "--max-sessions-per-source",
        "10000",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Proxy::start_args(dir, &args).await?;
    let req = ws::WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let n = sessions();
    let mut held = Vec::with_capacity(n + 1);
    // One session first, so the proxy's one-time allocations (TLS session
    // caches, per-thread pools) are in the baseline.
    held.push(open(proxy.ws_addr(), tenant, &req).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = pss_kib(proxy.pid())?;
    for i in 0..n {
        let s = open(proxy.ws_addr(), tenant, &req)
            .await
            .with_context(|| format!("session {} of {n} (--ktls {ktls})", i + 1))?;
        held.push(s);
    }
    // Idle buffers are freed after a quiet spell: read after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = pss_kib(proxy.pid())?;
    proxy
        .wait_log_count(&["session established"], n + 1)
        .await
        .context("every session should be established")?;
    let logs = proxy.logs();
    let wrong: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("session established"))
        .filter(|l| !l.contains(&format!("datapath=\"{datapath}\"")))
        .take(3)
        .collect();
    anyhow::ensure!(
        wrong.is_empty(),
        "with --ktls {ktls} every session should run on {datapath}: {wrong:?}"
    );
    drop(held);
    Ok((after - before) / n as f64)
}

/// A TLS WebSocket session proven by a one-byte round trip, kept open.
async fn open(
    addr: SocketAddr,
    tenant: &Transport,
    req: &ws::WsRequest,
) -> anyhow::Result<ws::WsBytes> {
    let round_trip = async {
        let (sock, _) = ws::connect(addr, tenant, req).await?.upgraded()?;
        let mut bytes = ws::into_bytes(sock, ws::Mode::Binary);
        bytes.io.write_all(b"k").await?;
        bytes.io.flush().await?;
        let mut b = [0u8; 1];
        bytes.io.read_exact(&mut b).await?;
        anyhow::ensure!(&b == b"k", "echo answered {b:?}");
        Ok(bytes)
    };
    tokio::time::timeout(OPEN_LIMIT, round_trip)
        .await
        .context("no echo within the limit")?
}

/// A TLS console requiring the proxy's client certificate that echoes
/// every connection (a serial console echoing keystrokes).
pub async fn echo_console(server: Arc<rustls::ServerConfig>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut rd, mut wr) = tokio::io::split(tls);
                let mut buf = [0u8; 1024];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 || wr.write_all(&buf[..n]).await.is_err() || wr.flush().await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// The proportional set size of a process, in KiB.
fn pss_kib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .with_context(|| format!("no Pss line in {path}"))
}
