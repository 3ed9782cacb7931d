//! Transports: plain TCP, TLS (rustls, ring) or UNIX sockets, boxed behind
//! one `Io` trait so every client in the harness runs over any of them.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Anything a client can talk over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// How to reach a tenant-facing listener.
#[derive(Clone, Debug)]
pub enum Transport {
    Plain,
    /// TLS with this client config; SNI/verification name is the listener IP.
    Tls(Arc<rustls::ClientConfig>),
    /// TLS, verifying this DNS name instead of the IP.
    TlsNamed(Arc<rustls::ClientConfig>, String),
}

pub async fn tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = crate::within("TCP connect", TcpStream::connect(addr))
        .await?
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects to `addr` and, for TLS transports, completes the TLS handshake.
pub async fn connect(addr: SocketAddr, transport: &Transport) -> anyhow::Result<BoxIo> {
    let tcp = tcp(addr).await?;
    wrap(tcp, addr, transport).await
}

pub async fn wrap(
    tcp: TcpStream,
    addr: SocketAddr,
    transport: &Transport,
) -> anyhow::Result<BoxIo> {
    let (config, name) = match transport {
        Transport::Plain => return Ok(Box::new(tcp)),
        Transport::Tls(c) => (Arc::clone(c), ServerName::IpAddress(addr.ip().into())),
        Transport::TlsNamed(c, n) => (Arc::clone(c), ServerName::try_from(n.clone())?),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = crate::within("TLS handshake", connector.connect(name, tcp))
        .await?
        .context("TLS handshake with the proxy")?;
    Ok(Box::new(tls))
}

/// The `host[:port]` text for a Host header or URL authority.
pub fn authority(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// A TCP port on `ip` for a server a test starts itself (QEMU), free a
/// moment ago and at least 5900 (QEMU takes VNC ports as display numbers).
///
/// The port is drawn at random from below the kernel's ephemeral range: a
/// port that `bind(0)` hands out comes from that range, where the client end
/// of any other test's connection can take it before QEMU binds it. Below the
/// range only another test drawing the same number can, so callers still
/// retry the start with fresh ports.
pub fn free_port_on(ip: IpAddr) -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_low.max(10_001));
    for _ in 0..1000 {
        let port = rand::random_range(low..high);
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free TCP port on {ip} in {low}..{high} after 1000 draws")
}

/// [`free_port_on`] on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
}
