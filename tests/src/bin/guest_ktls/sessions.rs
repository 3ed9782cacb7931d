//! The real consolegate binary in the guest: a TLS tenant front end, a
//! CONNECT listener, a compute profile (private CA, client certificate) and
//! two scripted TLS consoles that require the proxy's client certificate.
//! A TLS WebSocket session (binary) and a CONNECT session with a half-close
//! carry random payloads both ways; then the proxy's log must say
//! `datapath="ktls+splice"` for both.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use consolegate_tests::compute::Ca;
use consolegate_tests::net::{Transport, authority};
use consolegate_tests::proxy::{Proxy, raw_token, write_toml_tokens};
use consolegate_tests::{certs, http, random_token, within_for, ws};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::direct::random;
use crate::report;

/// The data path label the ktls branch gives kTLS sessions.
const EXPECTED: &str = "ktls+splice";

/// Compute -> tenant (the console's heavy direction) and tenant -> compute.
const DOWN: usize = 16 << 20;
const UP: usize = 4 << 20;

/// Upper bound for one session under TCG (never a performance assertion).
const SESSION_LIMIT: Duration = Duration::from_secs(120);

/// How a scripted console ends its side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Reads exactly the tenant's payload (a WebSocket tenant never
    /// half-closes), then sends the trailer and closes.
    Counted,
    /// Reads until the tenant's half-close arrives (close_notify), then
    /// sends the trailer and closes: bytes after the half-close prove the
    /// other direction kept flowing.
    HalfClose,
}

/// `renews`: this kernel takes new kTLS keys (a KeyUpdate is followed).
pub async fn through_proxy(renews: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("cg-guest-").tempdir()?;
    let ca = Ca::new("guest compute and tenant CA");
    let (compute_cert, compute_key) = ca.leaf("compute", &["127.0.0.1"], false);
    let (client_cert, client_key) = ca.leaf("consolegate", &[], false);
    let (tenant_cert, tenant_key) = ca.leaf("consolegate tenant front", &["127.0.0.1"], false);
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), &ca.pem)?;
    std::fs::write(d.join("proxy-client.pem"), &client_cert)?;
    std::fs::write(d.join("proxy-client.key"), &client_key)?;
    std::fs::write(d.join("tenant.pem"), format!("{tenant_cert}{}", ca.pem))?;
    std::fs::write(d.join("tenant.key"), &tenant_key)?;

    let server = Arc::new(compute_config(&ca.pem, &compute_cert, &compute_key)?);
    let ws_console = Console::start(Arc::clone(&server), Ending::Counted).await?;
    let connect_console = Console::start(Arc::clone(&server), Ending::HalfClose).await?;
    let rekey_consoles = crate::rekey::Consoles::bind(&server).await?;
    let limit_consoles = crate::limit::Consoles::bind(&server).await?;
    let handover_console = crate::handover::Console::bind(Arc::clone(&server)).await?;
    let handover_token = random_token();
    let echo_console = crate::idle::echo_console(server).await?;
    let (ws_token, connect_token, echo_token) = (random_token(), random_token(), random_token());
    let (rekey_ws_token, rekey_connect_token, rekey_stream_token) =
        (random_token(), random_token(), random_token());
    let (limit_ws_token, limit_connect_token) = (random_token(), random_token());
    write_toml_tokens(
        &d.join("tokens.toml"),
        &[
            raw_token(&ws_token, ws_console.addr),
            raw_token(&connect_token, connect_console.addr),
            raw_token(&echo_token, echo_console),
            raw_token(&rekey_ws_token, rekey_consoles.websocket.addr),
            raw_token(&rekey_connect_token, rekey_consoles.connect.addr),
            raw_token(&rekey_stream_token, rekey_consoles.stream.addr),
            raw_token(&limit_ws_token, limit_consoles.websocket.addr),
            raw_token(&limit_connect_token, limit_consoles.connect.addr),
            handover_console.token(&handover_token),
        ],
    )?;
    let config = d.join("consolegate.toml");
    std::fs::write(&config, CONFIG.replace("@STATE@", &d.display().to_string()))?;
    let proxy_dir = tempfile::Builder::new().prefix("cg-proxy-").tempdir()?;
    let args = ["serve", "--config"].map(String::from);
    let args = [&args[..], &[config.display().to_string()]].concat();
    let proxy = Proxy::start_args(proxy_dir, &args).await?;
    let ktls_line = proxy.wait_log(&["kTLS ", "available"]).await;
    match &ktls_line {
        Ok(l) => {
            report("proxy-ktls-probe", l.trim());
            let probed = l.contains("rekey=true");
            anyhow::ensure!(
                probed == renews,
                "the proxy's probe says rekey={probed}, but this kernel {} kTLS keys",
                if renews { "renews" } else { "cannot renew" }
            );
        }
        Err(_) => report(
            "proxy-ktls-probe",
            "no `kTLS available/unavailable` line: this proxy has no kTLS support",
        ),
    }

    let tenant_tls = Transport::Tls(certs::client_config_trusting(ca.pem.as_bytes())?);
    let (up, down) = (random(UP), random(DOWN));
    let started = Instant::now();
    let ws_run = within_for(
        SESSION_LIMIT,
        "TLS WebSocket session",
        websocket_session(
            proxy.ws_addr(),
            &tenant_tls,
            &ws_token,
            &up,
            &down,
            &ws_console,
        ),
    )
    .await?;
    ws_run.context("TLS WebSocket session")?;
    measure("websocket-tls", started);

    let (up, down) = (random(UP), random(DOWN));
    let started = Instant::now();
    let connect_run = within_for(
        SESSION_LIMIT,
        "CONNECT session",
        connect_session(
            proxy.connect_addr(),
            &connect_token,
            &up,
            &down,
            &connect_console,
        ),
    )
    .await?;
    connect_run.context("CONNECT session")?;
    measure("connect", started);

    proxy
        .wait_log_count(&["session established"], 2)
        .await
        .context("two sessions should be established")?;
    let logs = proxy.logs();
    let seen: Vec<String> = logs
        .lines()
        .filter(|l| l.contains("session established"))
        .map(|l| datapath_of(l).unwrap_or("<none>").to_owned())
        .collect();
    report("proxy-datapaths", seen.join(","));
    for l in logs.lines().filter(|l| l.contains("ktls enabled")) {
        report("proxy-ktls-leg", l.trim());
    }
    anyhow::ensure!(
        seen.len() == 2 && seen.iter().all(|d| d == EXPECTED),
        "the proxy ran the sessions on data path(s) {seen:?}, not {EXPECTED:?} \
         (bytes were correct; the kTLS offload is not in this proxy or was not chosen)"
    );
    crate::rekey::sessions(
        &proxy,
        rekey_consoles,
        certs::client_config_trusting(ca.pem.as_bytes())?,
        (&rekey_ws_token, &rekey_connect_token, &rekey_stream_token),
        renews,
    )
    .await?;
    let rekey_paths: Vec<String> = proxy
        .logs()
        .lines()
        .filter(|l| l.contains("session established"))
        .skip(2)
        .map(|l| datapath_of(l).unwrap_or("<none>").to_owned())
        .collect();
    anyhow::ensure!(
        rekey_paths.len() == 3 && rekey_paths.iter().all(|d| d == EXPECTED),
        "the KeyUpdate sessions ran on data path(s) {rekey_paths:?}, not {EXPECTED:?}"
    );
    crate::handover::session(&proxy, handover_console, &handover_token).await?;
    let handover_path: Vec<String> = proxy
        .logs()
        .lines()
        .filter(|l| l.contains("session established"))
        .skip(5)
        .map(|l| datapath_of(l).unwrap_or("<none>").to_owned())
        .collect();
    anyhow::ensure!(
        handover_path == [EXPECTED],
        "the KeyUpdate-at-the-hand-over session ran on data path(s) {handover_path:?}, not \
         {EXPECTED:?}"
    );
    drop(proxy);
    crate::limit::sessions(
        &config,
        limit_consoles,
        certs::client_config_trusting(ca.pem.as_bytes())?,
        (&limit_ws_token, &limit_connect_token),
        renews,
    )
    .await?;
    crate::idle::tls_sessions(&config, &echo_token, &tenant_tls).await
}

const CONFIG: &str = r#"
state_dir = "@STATE@/state"

[websocket]
listen = ["127.0.0.1:0"]

[connect]
listen = ["127.0.0.1:0"]
auth = "token"

[tls]
cert = "tenant.pem"
key = "tenant.key"

[tokens]
files = ["tokens.toml"]

[compute]
default_profile = "guest"

[compute.profiles.guest]
ca = "ca.pem"
cert = "proxy-client.pem"
key = "proxy-client.key"

[kernel]
datapath = "auto"
allowlist = "off"
"#;

/// The `datapath="..."` value of a log line (after the message, where the
/// event field is; the span may carry it too).
fn datapath_of(line: &str) -> Option<&str> {
    let key = "datapath=\"";
    let at = line.rfind(key)? + key.len();
    line[at..].split('"').next()
}

fn measure(name: &str, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    let mib = (UP + DOWN) as f64 / f64::from(1 << 20);
    report(
        &format!("session-{name}"),
        format!(
            "ok {} MiB down + {} MiB up in {secs:.2} s ({:.1} MiB/s)",
            DOWN >> 20,
            UP >> 20,
            mib / secs
        ),
    );
}

/// What the tenant must read: the console's payload, then the SHA-256 of
/// what the console received.
fn expected(down: &[u8], up: &[u8]) -> Vec<u8> {
    let mut v = down.to_vec();
    v.extend_from_slice(&Sha256::digest(up));
    v
}

fn check(what: &str, got: &[u8], want: &[u8]) -> anyhow::Result<()> {
    if got == want {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    anyhow::bail!(
        "{what}: {} bytes, expected {}, first difference at byte {first}",
        got.len(),
        want.len()
    )
}

async fn websocket_session(
    addr: SocketAddr,
    transport: &Transport,
    token: &str,
    up: &[u8],
    down: &[u8],
    console: &Console,
) -> anyhow::Result<()> {
    console.expect(up.to_vec(), down.to_vec()).await?;
    let req = ws::WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let (sock, protocol) = ws::connect(addr, transport, &req).await?.upgraded()?;
    anyhow::ensure!(
        protocol.as_deref() == Some("binary"),
        "subprotocol {protocol:?}"
    );
    let bytes = ws::into_bytes(sock, ws::Mode::Binary);
    let (mut rd, mut wr) = tokio::io::split(bytes.io);
    let mut got = Vec::new();
    let (wrote, read) = tokio::join!(
        async {
            wr.write_all(up).await?;
            wr.flush().await
        },
        rd.read_to_end(&mut got)
    );
    wrote.context("tenant write")?;
    read.context("tenant read")?;
    console.done().await?;
    check("tenant (WebSocket) received", &got, &expected(down, up))?;
    let closed = bytes.closed.await??;
    anyhow::ensure!(
        closed.code == Some(1000),
        "WebSocket closed with {closed:?}, expected 1000 when the console closed"
    );
    drop((rd, wr));
    Ok(())
}

async fn connect_session(
    addr: SocketAddr,
    token: &str,
    up: &[u8],
    down: &[u8],
    console: &Console,
) -> anyhow::Result<()> {
    console.expect(up.to_vec(), down.to_vec()).await?;
    let target = authority(console.addr);
    let tunnel = http::connect_tunnel(addr, &target, Some(&http::bearer(token)))
        .await?
        .tunnel()?;
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let mut got = Vec::new();
    let (wrote, read) = tokio::join!(
        async {
            wr.write_all(up).await?;
            // The half-close: FIN from the tenant, close_notify towards the
            // console; the console answers after it.
            wr.shutdown().await
        },
        rd.read_to_end(&mut got)
    );
    wrote.context("tenant write + shutdown")?;
    read.context("tenant read")?;
    console.done().await?;
    check("tenant (CONNECT) received", &got, &expected(down, up))
}

/// rustls server config for a console: the compute certificate, and the
/// proxy's client certificate required (QEMU's `verify-peer=on`).
fn compute_config(ca: &str, cert: &str, key: &str) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?)
}

type Job = (
    Vec<u8>,
    Vec<u8>,
    tokio::sync::oneshot::Sender<anyhow::Result<()>>,
);

/// A scripted TLS console: for each job, accepts one connection, sends the
/// job's payload while reading the tenant's, then the trailer.
struct Console {
    addr: SocketAddr,
    jobs: tokio::sync::mpsc::Sender<Job>,
    result: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>>,
}

impl Console {
    async fn start(config: Arc<rustls::ServerConfig>, ending: Ending) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (jobs, mut rx) = tokio::sync::mpsc::channel::<Job>(1);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Some((up, down, done)) = rx.recv().await {
                let r = serve_one(&listener, &acceptor, ending, &up, &down).await;
                let _ = done.send(r);
            }
        });
        Ok(Self {
            addr,
            jobs,
            result: tokio::sync::Mutex::new(None),
        })
    }

    async fn expect(&self, up: Vec<u8>, down: Vec<u8>) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send((up, down, tx))
            .await
            .map_err(|_| anyhow::anyhow!("console task gone"))?;
        *self.result.lock().await = Some(rx);
        Ok(())
    }

    /// The console's own verdict on the session.
    async fn done(&self) -> anyhow::Result<()> {
        let rx = self.result.lock().await.take().context("no session")?;
        rx.await
            .context("console task gone")?
            .context("console side")
    }
}

async fn serve_one(
    listener: &TcpListener,
    acceptor: &tokio_rustls::TlsAcceptor,
    ending: Ending,
    up: &[u8],
    down: &[u8],
) -> anyhow::Result<()> {
    let (tcp, _) = listener.accept().await?;
    tcp.set_nodelay(true)?;
    let tls = acceptor
        .accept(tcp)
        .await
        .context("console TLS handshake (with the proxy's client certificate)")?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut got = Vec::new();
    let reading = async {
        match ending {
            Ending::Counted => {
                got.resize(up.len(), 0);
                rd.read_exact(&mut got).await.map(|_| ())
            }
            Ending::HalfClose => rd.read_to_end(&mut got).await.map(|_| ()),
        }
    };
    let (wrote, read) = tokio::join!(
        async {
            wr.write_all(down).await?;
            wr.flush().await
        },
        reading
    );
    wrote.context("console write")?;
    read.context("console read")?;
    check("console received", &got, up)?;
    // After the tenant's half-close (HalfClose) these bytes still reach it.
    wr.write_all(&Sha256::digest(&got)).await?;
    wr.shutdown().await.context("console close_notify")?;
    Ok(())
}
