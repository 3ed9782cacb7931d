//! Binding listeners (IPv4 and IPv6) and accepting connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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

/// Accepts until shutdown, handing each connection to `handler`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Context>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            () = crate::datapath::shutdown_signalled(&mut shutdown) => return,
            r = listener.accept() => match r {
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
