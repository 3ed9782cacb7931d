//! Compute side: console kinds, backend addresses and dialling QEMU.
//!
//! Plain TCP and UNIX sockets for now; the TLS/VeNCrypt/SASL matrix and
//! SPICE link handling build on this module.

pub mod security;
pub mod spice;
pub mod vnc;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Which console a token opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    Vnc,
    Spice,
    Serial,
}

impl ConsoleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleKind::Vnc => "vnc",
            ConsoleKind::Spice => "spice",
            ConsoleKind::Serial => "serial",
        }
    }
}

impl fmt::Display for ConsoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Host part of a TCP backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name, stored lower-case.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Where a console lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Tcp { host: Host, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why an address string is not a valid target.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TargetParseError {
    #[error("missing :port")]
    MissingPort,
    #[error("invalid port")]
    BadPort,
    #[error("invalid host")]
    BadHost,
    #[error("empty UNIX socket path")]
    EmptyPath,
}

impl Target {
    /// Parses `host:port`, `[v6]:port` or `unix_socket:/path` (websockify's
    /// spelling) / `unix:/path`.
    pub fn parse(s: &str) -> Result<Self, TargetParseError> {
        let s = s.trim();
        // Prefixes match in any case: host names are case-insensitive, so a
        // host called `UNIX_SOCKET` would otherwise print (lower-cased) as a
        // UNIX socket target and read back as a different target.
        let strip = |prefix: &str| {
            s.get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(prefix))
                .map(|_| &s[prefix.len()..])
        };
        if let Some(p) = strip("unix_socket:").or_else(|| strip("unix:")) {
            let p = p.trim();
            if p.is_empty() {
                return Err(TargetParseError::EmptyPath);
            }
            return Ok(Target::Unix(PathBuf::from(p)));
        }
        let (host, port) = split_host_port(s)?;
        Ok(Target::Tcp { host, port })
    }

    /// The TCP host and port, if this is a TCP target.
    pub fn tcp(&self) -> Option<(&Host, u16)> {
        match self {
            Target::Tcp { host, port } => Some((host, *port)),
            Target::Unix(_) => None,
        }
    }
}

/// Splits an authority `host:port` / `[v6]:port` into typed parts.
pub fn split_host_port(s: &str) -> Result<(Host, u16), TargetParseError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or(TargetParseError::BadHost)?;
        let p = p.strip_prefix(':').ok_or(TargetParseError::MissingPort)?;
        let ip: std::net::Ipv6Addr = h.parse().map_err(|_| TargetParseError::BadHost)?;
        (Host::Ip(IpAddr::V6(ip)), p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or(TargetParseError::MissingPort)?;
        if h.contains(':') {
            return Err(TargetParseError::BadHost);
        }
        (parse_host(h)?, p)
    };
    let port: u16 = port.parse().map_err(|_| TargetParseError::BadPort)?;
    Ok((host, port))
}

fn parse_host(h: &str) -> Result<Host, TargetParseError> {
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(Host::Name(h.to_ascii_lowercase()))
    } else {
        Err(TargetParseError::BadHost)
    }
}

/// Why dialling the compute side failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {target} timed out after {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("connecting to {target}: {source}")]
    Io { target: String, source: io::Error },
}

/// A connected compute-side stream.
#[derive(Debug)]
pub enum ComputeStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl std::os::fd::AsRawFd for ComputeStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            ComputeStream::Tcp(s) => s.as_raw_fd(),
            ComputeStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A TLS connection to the compute host. rustls reads through a
/// [`crate::offload::Cork`] (never past a record boundary), so the stream can
/// be handed to kernel TLS after the console handshake ([`crate::offload`]).
pub type ComputeTls = crate::tls_stream::ClientTls<crate::offload::Cork<ComputeStream>>;

/// Dials `target` within `timeout`. TCP streams get TCP_NODELAY (console
/// traffic is interactive) and keepalive.
pub async fn dial(target: &Target, timeout: Duration) -> Result<ComputeStream, DialError> {
    let name = target.to_string();
    let fut = async {
        match target {
            Target::Tcp { host, port } => {
                let stream = match host {
                    Host::Ip(ip) => TcpStream::connect(SocketAddr::new(*ip, *port)).await?,
                    Host::Name(n) => TcpStream::connect((n.as_str(), *port)).await?,
                };
                stream.set_nodelay(true)?;
                let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
                socket2::SockRef::from(&stream).set_tcp_keepalive(&ka)?;
                Ok(ComputeStream::Tcp(stream))
            }
            Target::Unix(p) => Ok(ComputeStream::Unix(UnixStream::connect(p).await?)),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(DialError::Io {
            target: name,
            source,
        }),
        Err(_) => Err(DialError::Timeout {
            target: name,
            after: timeout,
        }),
    }
}

impl AsyncRead for ComputeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ComputeStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ComputeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ComputeStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ComputeStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ComputeStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ComputeStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// TLS handshake towards the compute host with the profile's client
/// certificate; the server certificate is verified against the private CA
/// and `name` (IP or DNS SAN). The error text is rustls's, which names the
/// problem (unknown issuer, wrong name, expired...).
pub async fn tls_connect(
    s: ComputeStream,
    cfg: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> Result<ComputeTls, String> {
    crate::tls_stream::ClientTls::connect(cfg, name, crate::offload::Cork::for_leg(s))
        .await
        .map_err(|e| e.to_string())
}

/// The compute side of an established session: plain, or TLS to QEMU.
pub enum ComputeIo {
    Plain(ComputeStream),
    Tls(Box<ComputeTls>),
    /// A SPICE main channel: reads drop migration announcements.
    SpiceMain(Box<spice::migrate::Filtered<ComputeIo>>),
}

impl fmt::Debug for ComputeIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeIo::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            ComputeIo::Tls(s) => f.debug_tuple("Tls").field(&s.get_ref().0.io).finish(),
            ComputeIo::SpiceMain(s) => f.debug_tuple("SpiceMain").field(s).finish(),
        }
    }
}

impl ComputeIo {
    /// Whether the compute leg is encrypted.
    pub fn is_tls(&self) -> bool {
        match self {
            ComputeIo::Plain(_) => false,
            ComputeIo::Tls(_) => true,
            ComputeIo::SpiceMain(f) => f.get_ref().is_tls(),
        }
    }
}

/// Bytes pass through userspace (rustls, or a filtered SPICE channel).
impl crate::datapath::websocket::WsLeg for ComputeIo {}

impl AsyncRead for ComputeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ComputeIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ComputeIo::SpiceMain(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ComputeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ComputeIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ComputeIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ComputeIo::SpiceMain(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ComputeIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ComputeIo::SpiceMain(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ComputeIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ComputeIo::SpiceMain(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            Target::parse("127.0.0.1:5900").unwrap(),
            Target::Tcp {
                host: Host::Ip("127.0.0.1".parse().unwrap()),
                port: 5900
            }
        );
        assert_eq!(
            Target::parse("[::1]:5901").unwrap().to_string(),
            "[::1]:5901"
        );
        assert_eq!(
            Target::parse("Compute-1.example:5900").unwrap().to_string(),
            "compute-1.example:5900"
        );
        assert_eq!(
            Target::parse("unix_socket:/run/vm.sock").unwrap(),
            Target::Unix("/run/vm.sock".into())
        );
        assert_eq!(Target::parse("h"), Err(TargetParseError::MissingPort));
        assert_eq!(Target::parse("h:99999"), Err(TargetParseError::BadPort));
        assert_eq!(Target::parse("::1:5900"), Err(TargetParseError::BadHost));
        assert_eq!(Target::parse("a b:1"), Err(TargetParseError::BadHost));
        assert_eq!(
            Target::parse("unix_socket:"),
            Err(TargetParseError::EmptyPath)
        );
        assert_eq!(
            Target::parse("UNIX_sOcket:55").unwrap(),
            Target::Unix(PathBuf::from("55")),
            "found by the signed_token fuzz target: must not parse as host `unix_socket`"
        );
        assert_eq!(
            Target::parse("unix_socket:"),
            Err(TargetParseError::EmptyPath)
        );
    }

    #[tokio::test]
    async fn dial_refused_is_io_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let t = Target::parse(&addr.to_string()).unwrap();
        assert!(matches!(
            dial(&t, Duration::from_secs(5)).await,
            Err(DialError::Io { .. })
        ));
    }
}
