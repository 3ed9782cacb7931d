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
//! On a kernel that renews kTLS keys, every round must carry its bytes and
//! the proxy must log each key it renewed (receive and send, per
//! KeyUpdate: 12 in all). On one that cannot, the first KeyUpdate of each
//! session must end that session (and only it) with the proxy's error
//! naming the cause.

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
/// send for each of the 6 KeyUpdates below.
const RENEWALS: usize = 12;

/// One exchange: the tenant's chunk up, the console's down, and who
/// refreshes its keys first.
#[derive(Clone)]
struct Round {
    up: Vec<u8>,
    down: Vec<u8>,
    tenant_rekeys: bool,
    console_rekeys: bool,
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
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
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

    fn serve(self, rounds: Vec<Round>) -> tokio::task::JoinHandle<anyhow::Result<usize>> {
        tokio::spawn(async move {
            let (tcp, _) = self.listener.accept().await?;
            tcp.set_nodelay(true)?;
            let mut tls = self
                .acceptor
                .accept(tcp)
                .await
                .context("console TLS handshake")?;
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
            tls.shutdown().await.context("console close_notify")?;
            // Read on to the proxy's end: its answer to our last KeyUpdate
            // may still be on the way, and closing with it unread would
            // reset the connection under the last round's bytes.
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest)
                .await
                .context("console reading to the end")?;
            anyhow::ensure!(
                rest.is_empty(),
                "console: {} bytes after the rounds",
                rest.len()
            );
            Ok(rounds.len())
        })
    }
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
async fn tenant_rounds(
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

async fn websocket_session(
    addr: SocketAddr,
    tenant_tls: Arc<rustls::ClientConfig>,
    token: &str,
    rounds: &[Round],
) -> anyhow::Result<usize> {
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
    let mut bytes = ws::into_bytes(sock, ws::Mode::Binary);
    let done = tenant_rounds(&mut bytes.io, rounds, Some(&now)).await?;
    let closed = bytes.closed.await??;
    anyhow::ensure!(
        closed.code == Some(1000),
        "WebSocket closed with {closed:?}, expected 1000 when the console closed"
    );
    Ok(done)
}

async fn connect_session(
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

/// The two consoles, bound before the proxy's token file is written.
pub struct Consoles {
    pub websocket: Console,
    pub connect: Console,
}

impl Consoles {
    pub async fn bind(config: &Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        Ok(Self {
            websocket: Console::bind(Arc::clone(config)).await?,
            connect: Console::bind(Arc::clone(config)).await?,
        })
    }
}

/// Runs both sessions through `proxy` and checks the outcome the kernel
/// calls for (`renews`: it takes new kTLS keys).
pub async fn sessions(
    proxy: &Proxy,
    consoles: Consoles,
    tenant_tls: Arc<rustls::ClientConfig>,
    (ws_token, connect_token): (&str, &str),
    renews: bool,
) -> anyhow::Result<()> {
    let connect_console = consoles.connect.addr;
    let (ws_rounds, connect_rounds) = (websocket_rounds(), connect_rounds());
    let ws_console = consoles.websocket.serve(ws_rounds.clone());
    let ws_tenant = within_for(
        SESSION_LIMIT,
        "KeyUpdate WebSocket session",
        websocket_session(proxy.ws_addr(), tenant_tls, ws_token, &ws_rounds),
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
    if renews {
        ws_tenant.context("KeyUpdate WebSocket session, tenant")?;
        ws_console.context("KeyUpdate WebSocket session, console")?;
        connect_tenant.context("KeyUpdate CONNECT session, tenant")?;
        connect_console_run.context("KeyUpdate CONNECT session, console")?;
        proxy
            .wait_log_count(&["kTLS key renewed"], RENEWALS)
            .await
            .context("the proxy should log every key it renewed")?;
        let renewed = proxy
            .logs()
            .lines()
            .filter(|l| l.contains("kTLS key renewed"))
            .count();
        anyhow::ensure!(
            renewed == RENEWALS,
            "the proxy renewed {renewed} kTLS keys, expected {RENEWALS}"
        );
        report(
            "rekey",
            format!(
                "followed: {} + {} rounds with 6 KeyUpdates (tenant and console) carried byte for byte, {renewed} kTLS keys renewed",
                ws_rounds.len(),
                connect_rounds.len()
            ),
        );
    } else {
        // The first KeyUpdate (round 1) ends each session: no round after it.
        for (what, got) in [
            ("WebSocket tenant", &ws_tenant),
            ("WebSocket console", &ws_console),
            ("CONNECT tenant", &connect_tenant),
            ("CONNECT console", &connect_console_run),
        ] {
            if let Ok(n) = got {
                anyhow::bail!(
                    "{what}: {n} rounds completed although this kernel cannot renew kTLS keys"
                );
            }
        }
        proxy
            .wait_log_count(&["KeyUpdate from the peer", "cannot be renewed"], 2)
            .await
            .context("the proxy should end both sessions naming the KeyUpdate")?;
        report(
            "rekey",
            "not followed (kernel cannot renew kTLS keys): each session ended at its first KeyUpdate with the proxy's error",
        );
    }
    Ok(())
}
