//! WebSocket pump with a spliced compute-to-tenant direction, for plain
//! (non-TLS) WebSocket tenants in binary mode and plain compute sockets.
//!
//! Compute to tenant, the heavy direction: console bytes are spliced from
//! the compute socket into a pipe, which tells exactly how many arrived;
//! we write the frame header for that length ourselves (`MSG_MORE`, so it
//! leaves in the same segment) and splice the payload from the pipe to
//! the tenant. The bytes never enter userspace. Tenant to compute, masked
//! small frames, is decoded and unmasked in userspace exactly as in
//! [`super::websocket`]; both run in [`super::ws_pump`]. Pongs, pings and
//! close frames go out between frames, so they never split one.
//!
//! Either leg may be a kernel TLS socket ([`Socket::Ktls`], `tenant_ktls`):
//! the tenant's frames are then read with recvmsg ([`KtlsRecv`]), a
//! non-data record stops the compute splice and is judged as
//! [`super::ktls`] says, and each kTLS peer gets close_notify at the end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::ktls::{KtlsRecv, RecvState, poll_close_notify};
use super::pipes::PipeSlot;
use super::splice::{Sock, Socket};
use super::websocket::{CLOSE_GRACE, WsSettings};
use super::ws_pump::{DownPath, Pump, WsLeg};
use super::{Counters, End};
use crate::front::websocket::stream::WsParts;
use crate::offload::{KtlsKeys, TxLimit};

/// Largest payload of one spliced compute-to-tenant frame.
const FRAME_MAX: usize = 256 * 1024;

/// The tenant socket: plain TCP, or kTLS (its frames read as records).
struct Tenant {
    tcp: TcpStream,
    /// Boxed: most tenants are plain, and every byte here is per session.
    ktls: Option<Box<TenantKtls>>,
}

/// What a kTLS tenant socket needs: its receiver, and its transmit key's
/// record limit.
struct TenantKtls {
    recv: KtlsRecv,
    tx: Option<Box<TxLimit>>,
}

impl AsyncRead for Tenant {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.ktls {
            Some(k) => k.recv.poll_read(&this.tcp, cx, buf),
            None => Pin::new(&mut this.tcp).poll_read(cx, buf),
        }
    }
}

/// Writes are plain: the kernel makes the records of a kTLS socket.
impl AsyncWrite for Tenant {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_keys(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        this.wrote(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl WsLeg for Tenant {
    fn sock(&self) -> Option<Sock<'_>> {
        Some(match self.ktls {
            Some(_) => Sock::Ktls(&self.tcp),
            None => Sock::Tcp(&self.tcp),
        })
    }

    fn poll_keys(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.ktls.as_mut().and_then(|k| k.tx.as_mut()) {
            Some(tx) => tx.poll_ready(&self.tcp, cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn wrote(&mut self, n: usize) {
        if let Some(tx) = self.ktls.as_mut().and_then(|k| k.tx.as_mut()) {
            tx.wrote(n);
        }
    }
}

/// The compute socket. Its bytes are spliced, never read through here;
/// writes carry the tenant's input, and the end of the tenant's stream
/// sends close_notify first on kTLS.
struct Compute {
    sock: Socket,
    /// kTLS: the transmit key's record limit.
    tx: Option<Box<TxLimit>>,
    notified: bool,
}

impl AsyncRead for Compute {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().sock {
            Socket::Tcp(s) | Socket::Ktls(s, _) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Compute {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_keys(cx))?;
        let n = std::task::ready!(match &mut this.sock {
            Socket::Tcp(s) | Socket::Ktls(s, _) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        })?;
        this.wrote(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().sock {
            Socket::Tcp(s) | Socket::Ktls(s, _) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.sock {
            Socket::Ktls(s, _) => {
                if !this.notified {
                    // The FIN still tells the peer we are done if this fails.
                    let _ = std::task::ready!(poll_close_notify(s, cx));
                    this.notified = true;
                }
                Pin::new(s).poll_shutdown(cx)
            }
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl WsLeg for Compute {
    fn sock(&self) -> Option<Sock<'_>> {
        Some(self.sock.borrow())
    }

    fn poll_keys(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match (&self.sock, self.tx.as_mut()) {
            (Socket::Ktls(s, _), Some(tx)) => tx.poll_ready(s, cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn wrote(&mut self, n: usize) {
        if let Some(tx) = self.tx.as_mut() {
            tx.wrote(n);
        }
    }
}

/// Runs the session until either side ends it, like
/// [`super::websocket::pump`] in binary mode, with the compute-to-tenant
/// payload spliced through `pipe` (held only while a frame is in flight).
/// `tenant_ktls`: the tenant socket is a kernel TLS socket with these
/// keys.
pub fn pump(
    tenant: WsParts<TcpStream>,
    tenant_ktls: Option<KtlsKeys>,
    compute: Socket,
    pipe: PipeSlot,
    settings: WsSettings,
    counters: &Counters,
    shutdown: super::Stop,
) -> impl Future<Output = End> + '_ {
    let WsParts {
        inner,
        raw,
        pending,
        inbound,
    } = tenant;
    let mut pipe = pipe;
    let chunk = pipe.get().map(|p| p.capacity().min(FRAME_MAX));
    pipe.release();
    let tenant_is_ktls = tenant_ktls.is_some();
    let tenant = Tenant {
        tcp: inner,
        ktls: tenant_ktls.map(|keys| {
            Box::new(TenantKtls {
                recv: KtlsRecv::new(RecvState::new(keys.rekey)),
                tx: keys.tx,
            })
        }),
    };
    let mut compute = compute;
    let compute_recv = compute.take_recv_state();
    let tx = compute.take_tx_limit();
    let compute = Compute {
        sock: compute,
        tx,
        notified: false,
    };
    // Built here, owned by the future below (see websocket::pump).
    let mut pump = chunk.map(|chunk| {
        let down = DownPath::splice(pipe, chunk, compute_recv);
        Pump::new(
            tenant, raw, pending, inbound, compute, down, settings, counters,
        )
    });
    async move {
        let pump = match pump.as_mut() {
            Ok(p) => p,
            Err(e) => return End::ComputeIo(e.to_string()),
        };
        let end = pump.run(&shutdown).await;
        // Our close frame is out: end the TLS stream properly before the FIN.
        if tenant_is_ktls && !matches!(end, End::TenantIo(_)) {
            let notify = super::ktls::close_notify(&pump.tenant().tcp);
            let _ = tokio::time::timeout(CLOSE_GRACE, notify).await;
        }
        end
    }
}
