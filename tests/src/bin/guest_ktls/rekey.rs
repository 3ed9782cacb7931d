//! TLS 1.3 KeyUpdates on kTLS legs, through the real proxy in the guest.
//!
//! Two sessions run in rounds: the tenant sends a random chunk, the
//! console checks it and answers with its own, the tenant checks that.
//! Before some rounds a peer refreshes its keys (rustls's
//! `refresh_traffic_keys`: a KeyUpdate that asks for ours too):
//! - a TLS WebSocket session, both legs on kTLS: the tenant before rounds
//!   1 and 3, the console before rounds 2 and 3 (the tenant's KeyUpdates
//!   reach the proxy's frame reader, the console's its spliced direction);
//! - a CONNECT session, the compute leg on kTLS: the console before
//!   rounds 1 and 2 (the splice rung's record path).
//!
//! A third session, a TLS WebSocket again, has the KeyUpdates arrive in
//! the middle of a stream: the console sends 4 MiB without pause and
//! refreshes its keys halfway; the tenant, 1 MiB in, refreshes its own and
//! sends 64 KiB up. The proxy then answers each KeyUpdate on a socket the
//! other direction is splicing into at that moment.
//!
//! On a kernel that renews kTLS keys, every byte must arrive and the
//! proxy must log each key it renewed (receive and send, per KeyUpdate:
//! 16 in all). On one that cannot, the first KeyUpdate of each session
//! must end that session (and only it) with the proxy's error naming the
//! cause.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use consolegate_tests::net::authority;
use consolegate_tests::proxy::Proxy;
use consolegate_tests::{http, within_for, ws};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::direct::random;
use crate::report;

/// Upper bound for one session under TCG (never a performance assertion).
const SESSION_LIMIT: Duration = Duration::from_secs(120);
/// Keys the proxy renews when every KeyUpdate is followed: receive and
/// send for each of the 8 KeyUpdates below.
const RENEWALS: usize = 16;
/// The proxy's log line of a key renewed after a KeyUpdate.
const FOLLOWED: &str = "kTLS key renewed after a TLS 1.3 KeyUpdate";
/// The streaming session: console to tenant, tenant to console, and how
/// far into the stream the tenant refreshes its keys.
const STREAM_DOWN: usize = 4 << 20;
const STREAM_UP: usize = 64 << 10;
const STREAM_TENANT_REKEY_AT: usize = 1 << 20;

/// One exchange: the tenant's chunk up, the console's down, and who
/// refreshes its keys first.
#[derive(Clone)]
pub struct Round {
    pub up: Vec<u8>,
    pub down: Vec<u8>,
    pub tenant_rekeys: bool,
    pub console_rekeys: bool,
}

fn rounds(who: &[(bool, bool)]) -> Vec<Round> {
    who.iter()
        .map(|&(tenant_rekeys, console_rekeys)| Round {
            up: random(64 << 10),
            down: random(256 << 10),
            tenant_rekeys,
            console_rekeys,
        })
        .collect()
}

/// Rounds 0..=3 of the WebSocket session and 0..=2 of the CONNECT one.
fn websocket_rounds() -> Vec<Round> {
    rounds(&[(false, false), (true, false), (false, true), (true, true)])
}

fn connect_rounds() -> Vec<Round> {
    rounds(&[(false, false), (false, true), (false, true)])
}

/// A console that serves one session of rounds; its verdict comes back on
/// the handle.
pub struct Console {
    pub addr: SocketAddr,
    pub listener: TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl Console {
    pub async fn bind(config: Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self {
            addr: listener.local_addr()?,
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        })
    }

    async fn accept(&self) -> anyhow::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let (tcp, _) = self.listener.accept().await?;
        tcp.set_nodelay(true)?;
        self.acceptor
            .accept(tcp)
            .await
            .context("console TLS handshake")
    }

    pub fn serve(self, rounds: Vec<Round>) -> tokio::task::JoinHandle<anyhow::Result<usize>> {
        tokio::spawn(async move {
            let mut tls = self.accept().await?;
            for (i, r) in rounds.iter().enumerate() {
                let mut got = vec![0u8; r.up.len()];
                tls.read_exact(&mut got)
                    .await
                    .with_context(|| format!("console reading round {i}"))?;
                anyhow::ensure!(got == r.up, "console: round {i} arrived altered");
                if r.console_rekeys {
                    tls.get_mut().1.refresh_traffic_keys()?;
                }
                tls.write_all(&r.down).await?;
                tls.flush().await?;
            }
            close(tls).await?;
            Ok(rounds.len())
        })
    }
}

impl Console {
    /// The streaming session's console: `down` without pause (its keys
    /// refreshed halfway), then `up` checked, then the close.
    fn serve_stream(
        self,
        down: Vec<u8>,
        up: Vec<u8>,
    ) -> tokio::task::JoinHandle<anyhow::Result<usize>> {
        tokio::spawn(async move {
            let mut tls = self.accept().await?;
            let chunks = down.chunks(64 << 10);
            let half = chunks.len() / 2;
            for (i, chunk) in chunks.enumerate() {
                if i == half {
                    tls.get_mut().1.refresh_traffic_keys()?;
                }
                tls.write_all(chunk).await.context("console streaming")?;
            }
            tls.flush().await?;
            let mut got = vec![0u8; up.len()];
            tls.read_exact(&mut got)
                .await
                .context("console reading the tenant's bytes")?;
            anyhow::ensure!(got == up, "console: the tenant's bytes arrived altered");
            close(tls).await?;
            Ok(1)
        })
    }
}

/// A console's end: close_notify, then reading on to the proxy's end (its
/// answer to our last KeyUpdate may still be on the way, and closing with
/// it unread would reset the connection under the last bytes).
pub async fn close(mut tls: tokio_rustls::server::TlsStream<TcpStream>) -> anyhow::Result<()> {
    tls.shutdown().await.context("console close_notify")?;
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .await
        .context("console reading to the end")?;
    anyhow::ensure!(
        rest.is_empty(),
        "console: {} bytes after its end",
        rest.len()
    );
    Ok(())
}

/// The tenant's TLS stream, which refreshes its keys before the next
/// write once asked to.
#[derive(Debug)]
struct Rekeying {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    now: Arc<AtomicBool>,
}

impl AsyncRead for Rekeying {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rekeying {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.now.swap(false, Ordering::SeqCst) {
            self.tls
                .get_mut()
                .1
                .refresh_traffic_keys()
                .map_err(std::io::Error::other)?;
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The tenant's side of the rounds over any byte stream; `rekey` asks the
/// TLS stream under it for a KeyUpdate. Returns the rounds completed.
pub async fn tenant_rounds(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    rounds: &[Round],
    rekey: Option<&AtomicBool>,
) -> anyhow::Result<usize> {
    for (i, r) in rounds.iter().enumerate() {
        if r.tenant_rekeys {
            rekey
                .context("no tenant TLS to rekey")?
                .store(true, Ordering::SeqCst);
        }
        io.write_all(&r.up).await?;
        io.flush().await?;
        let mut got = vec![0u8; r.down.len()];
        io.read_exact(&mut got)
            .await
            .with_context(|| format!("tenant reading round {i}"))?;
        anyhow::ensure!(got == r.down, "tenant: round {i} arrived altered");
    }
    Ok(rounds.len())
}

/// A TLS WebSocket (binary) whose TLS stream refreshes its keys when the
/// flag returned is set.
pub async fn wss(
    addr: SocketAddr,
    tenant_tls: Arc<rustls::ClientConfig>,
    token: &str,
) -> anyhow::Result<(ws::WsBytes, Arc<AtomicBool>)> {
    let tcp = consolegate_tests::net::tcp(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(tenant_tls)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("tenant TLS handshake")?;
    let now = Arc::new(AtomicBool::new(false));
    let io = Box::new(Rekeying {
        tls,
        now: Arc::clone(&now),
    });
    let req = ws::WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let (sock, _) = ws::upgrade(io, addr, "wss", &req).await?.upgraded()?;
    Ok((ws::into_bytes(sock, ws::Mode::Binary), now))
}

async fn websocket_session(
    addr: SocketAddr,
    tenant_tls: Arc<rustls::ClientConfig>,
    token: &str,
    rounds: &[Round],
) -> anyhow::Result<usize> {
    let (mut bytes, now) = wss(addr, tenant_tls, token).await?;
    let done = tenant_rounds(&mut bytes.io, rounds, Some(&now)).await?;
    let closed = bytes.closed.await??;
    anyhow::ensure!(
        closed.code == Some(1000),
        "WebSocket closed with {closed:?}, expected 1000 when the console closed"
    );
    Ok(done)
}

/// The streaming session's tenant: reads `down`, and 1 MiB in refreshes
/// its keys and sends `up`.
async fn websocket_stream_session(
    addr: SocketAddr,
    tenant_tls: Arc<rustls::ClientConfig>,
    token: &str,
    down: &[u8],
    up: &[u8],
) -> anyhow::Result<usize> {
    let (mut bytes, now) = wss(addr, tenant_tls, token).await?;
    let mut got = Vec::with_capacity(down.len());
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = false;
    while got.len() < down.len() {
        let n = bytes
            .io
            .read(&mut buf)
            .await
            .context("tenant reading the stream")?;
        anyhow::ensure!(n > 0, "tenant: the stream ended after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        if !sent && got.len() >= STREAM_TENANT_REKEY_AT {
            now.store(true, Ordering::SeqCst);
            bytes.io.write_all(up).await?;
            bytes.io.flush().await?;
            sent = true;
        }
    }
    anyhow::ensure!(got == down, "tenant: the stream arrived altered");
    let closed = bytes.closed.await??;
    anyhow::ensure!(
        closed.code == Some(1000),
        "WebSocket closed with {closed:?}, expected 1000 when the console closed"
    );
    Ok(1)
}

pub async fn connect_session(
    addr: SocketAddr,
    token: &str,
    console: SocketAddr,
    rounds: &[Round],
) -> anyhow::Result<usize> {
    let mut tunnel = http::connect_tunnel(addr, &authority(console), Some(&http::bearer(token)))
        .await?
        .tunnel()?;
    tenant_rounds(&mut tunnel, rounds, None).await
}

/// The three consoles, bound before the proxy's token file is written.
pub struct Consoles {
    pub websocket: Console,
    pub connect: Console,
    pub stream: Console,
}

impl Consoles {
    pub async fn bind(config: &Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        Ok(Self {
            websocket: Console::bind(Arc::clone(config)).await?,
            connect: Console::bind(Arc::clone(config)).await?,
            stream: Console::bind(Arc::clone(config)).await?,
        })
    }
}

/// Runs both sessions through `proxy` and checks the outcome the kernel
/// calls for (`renews`: it takes new kTLS keys).
pub async fn sessions(
    proxy: &Proxy,
    consoles: Consoles,
    tenant_tls: Arc<rustls::ClientConfig>,
    (ws_token, connect_token, stream_token): (&str, &str, &str),
    renews: bool,
) -> anyhow::Result<()> {
    let connect_console = consoles.connect.addr;
    let (ws_rounds, connect_rounds) = (websocket_rounds(), connect_rounds());
    let ws_console = consoles.websocket.serve(ws_rounds.clone());
    let ws_tenant = within_for(
        SESSION_LIMIT,
        "KeyUpdate WebSocket session",
        websocket_session(
            proxy.ws_addr(),
            Arc::clone(&tenant_tls),
            ws_token,
            &ws_rounds,
        ),
    )
    .await?;
    let ws_console = within_for(SESSION_LIMIT, "KeyUpdate WebSocket console", ws_console).await??;
    let connect_console_run = consoles.connect.serve(connect_rounds.clone());
    let connect_tenant = within_for(
        SESSION_LIMIT,
        "KeyUpdate CONNECT session",
        connect_session(
            proxy.connect_addr(),
            connect_token,
            connect_console,
            &connect_rounds,
        ),
    )
    .await?;
    let connect_console_run = within_for(
        SESSION_LIMIT,
        "KeyUpdate CONNECT console",
        connect_console_run,
    )
    .await??;
    let (down, up) = (random(STREAM_DOWN), random(STREAM_UP));
    let stream_console = consoles.stream.serve_stream(down.clone(), up.clone());
    let stream_tenant = within_for(
        SESSION_LIMIT,
        "KeyUpdate streaming session",
        websocket_stream_session(proxy.ws_addr(), tenant_tls, stream_token, &down, &up),
    )
    .await?;
    let stream_console =
        within_for(SESSION_LIMIT, "KeyUpdate streaming console", stream_console).await??;
    if renews {
        ws_tenant.context("KeyUpdate WebSocket session, tenant")?;
        ws_console.context("KeyUpdate WebSocket session, console")?;
        connect_tenant.context("KeyUpdate CONNECT session, tenant")?;
        connect_console_run.context("KeyUpdate CONNECT session, console")?;
        stream_tenant.context("KeyUpdate streaming session, tenant")?;
        stream_console.context("KeyUpdate streaming session, console")?;
        proxy
            .wait_log_count(&[FOLLOWED], RENEWALS)
            .await
            .context("the proxy should log every key it renewed")?;
        let renewed = proxy
            .logs()
            .lines()
            .filter(|l| l.contains(FOLLOWED))
            .count();
        anyhow::ensure!(
            renewed == RENEWALS,
            "the proxy renewed {renewed} kTLS keys, expected {RENEWALS}"
        );
        report(
            "rekey",
            format!(
                "followed: {} + {} rounds with 6 KeyUpdates (tenant and console) and a {} MiB stream with 2 more in mid-stream carried byte for byte, {renewed} kTLS keys renewed",
                ws_rounds.len(),
                connect_rounds.len(),
                STREAM_DOWN >> 20
            ),
        );
    } else {
        // The first KeyUpdate (round 1) ends each session: no round after it.
        for (what, got) in [
            ("WebSocket tenant", &ws_tenant),
            ("WebSocket console", &ws_console),
            ("CONNECT tenant", &connect_tenant),
            ("CONNECT console", &connect_console_run),
            ("streaming tenant", &stream_tenant),
            ("streaming console", &stream_console),
        ] {
            if let Ok(n) = got {
                anyhow::bail!(
                    "{what}: {n} rounds completed although this kernel cannot renew kTLS keys"
                );
            }
        }
        proxy
            .wait_log_count(&["KeyUpdate from the peer", "cannot be renewed"], 3)
            .await
            .context("the proxy should end both sessions naming the KeyUpdate")?;
        report(
            "rekey",
            "not followed (kernel cannot renew kTLS keys): each of the 3 sessions ended at its first KeyUpdate with the proxy's error",
        );
    }
    Ok(())
}
