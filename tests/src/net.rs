//! Transports: plain TCP, TLS (rustls, ring) or UNIX sockets, boxed behind
//! one `Io` trait so every client in the harness runs over any of them.

use std::net::SocketAddr;
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
