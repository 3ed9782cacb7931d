//! Binding listeners (IPv4 and IPv6) and accepting connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::forwarded::{MAX_PROXY_HEADER, ProxyHeader, ProxyHeaderError, parse_proxy_header};
use crate::session::Context;

/// Binds a listening socket: SO_REUSEADDR, IPV6_V6ONLY for v6 addresses (so
/// `[::]` and `0.0.0.0` can both be bound), backlog 1024.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Accepts until shutdown, handing each connection to `handler`. With
/// `proxy_protocol`, a connection from a trusted proxy must start with a
/// PROXY protocol header (v1 or v2), and the handler sees the address it
/// names; connections from elsewhere are served as they are.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
    proxy_protocol: bool,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        tokio::select! {
            () = crate::datapath::shutdown_signalled(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok((tcp, peer)) if proxy_protocol && ctx.trusted_proxies.contains(peer.ip()) => {
                    let (ctx, handler) = (Arc::clone(&ctx), Arc::clone(&handler));
                    tokio::spawn(async move {
                        let mut tcp = tcp;
                        let limit = ctx.handshake_timeout;
                        match tokio::time::timeout(limit, read_proxy_header(&mut tcp)).await {
                            Ok(Ok(h)) => {
                                let tenant = h.source.unwrap_or(peer);
                                handler(tcp, tenant, ctx).await;
                            }
                            Ok(Err(e)) => tracing::warn!(
                                reason = "proxy_protocol", via = %peer, error = %e, "session refused"
                            ),
                            Err(_) => tracing::warn!(
                                reason = "proxy_protocol", via = %peer,
                                "session refused: no complete PROXY protocol header in time"
                            ),
                        }
                    });
                }
                Ok((tcp, peer)) => {
                    tokio::spawn(handler(tcp, peer, Arc::clone(&ctx)));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Reads exactly the PROXY protocol header from `tcp` (peeking first, so
/// not one byte of what follows is consumed).
async fn read_proxy_header(tcp: &mut TcpStream) -> Result<ProxyHeader, ProxyHeaderError> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; MAX_PROXY_HEADER];
    let mut seen = 0;
    loop {
        let n = tcp
            .peek(&mut buf)
            .await
            .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
        if n == 0 {
            return Err(ProxyHeaderError::Missing);
        }
        if let Some(h) = parse_proxy_header(&buf[..n])? {
            tcp.read_exact(&mut buf[..h.len])
                .await
                .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
            return Ok(h);
        }
        if n == seen {
            // Peeking again at once would see the same bytes: balancers
            // send the header in one segment, so this wait is rare.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = n;
    }
}
