//! WebSocket pump with a spliced compute-to-tenant direction, for plain
//! (non-TLS) WebSocket tenants in binary mode and plain compute sockets.
//!
//! Compute to tenant, the heavy direction: console bytes are spliced from
//! the compute socket into a pipe, which tells exactly how many arrived;
//! we write the frame header for that length ourselves (`MSG_MORE`, so it
//! leaves in the same segment) and splice the payload from the pipe to
//! the tenant. The bytes never enter userspace. Tenant to compute, masked
//! small frames, is decoded and unmasked in userspace exactly as in
//! [`super::websocket`]. Pongs, pings and close frames are written by the
//! same task between frames, so they never split one.
//!
//! Either leg may be a kernel TLS socket ([`Socket::Ktls`], `tenant_ktls`):
//! the tenant's frames are then read with recvmsg ([`KtlsRead`]), a
//! non-data record stops the compute splice and is judged as
//! [`super::ktls`] says, and each kTLS peer gets close_notify at the end.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt as _, Interest};
use tokio::net::{TcpStream, tcp, unix};

use super::ktls::{HandshakeCarry, KtlsRead, KtlsWrite, Next, RECORD_BUF, read_record};
use super::pipes::PipeSlot;
use super::splice::{NO_PIPE_RETRY, Sock, Socket};
use super::websocket::{CLOSE_GRACE, Control, ControlQueue, WsSettings, send_close, up};
use super::{Counters, End, idle_watch};
use crate::front::websocket::frame::{self, MAX_HEADER_LEN, Opcode, close_code, encode_frame};
use crate::front::websocket::stream::WsParts;
use crate::sys::pipe::splice;

/// Largest payload of one spliced compute-to-tenant frame.
const FRAME_MAX: usize = 256 * 1024;

enum ComputeRead {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Ktls(tcp::OwnedReadHalf),
}

impl ComputeRead {
    fn sock(&self) -> Sock<'_> {
        match self {
            ComputeRead::Tcp(r) => Sock::Tcp(r.as_ref()),
            ComputeRead::Unix(r) => Sock::Unix(r.as_ref()),
            ComputeRead::Ktls(r) => Sock::Ktls(r.as_ref()),
        }
    }
}

enum ComputeWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Ktls(KtlsWrite),
}

impl AsyncWrite for ComputeWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ComputeWrite::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            ComputeWrite::Unix(w) => Pin::new(w).poll_write(cx, buf),
            ComputeWrite::Ktls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeWrite::Tcp(w) => Pin::new(w).poll_flush(cx),
            ComputeWrite::Unix(w) => Pin::new(w).poll_flush(cx),
            ComputeWrite::Ktls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ComputeWrite::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            ComputeWrite::Unix(w) => Pin::new(w).poll_shutdown(cx),
            ComputeWrite::Ktls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// Runs the session until either side ends it, like
/// [`super::websocket::pump`] in binary mode, with the compute-to-tenant
/// payload spliced through `pipe` (held only while a frame is in flight).
/// `tenant_ktls`: the tenant socket is a
/// kernel TLS socket.
pub async fn pump(
    tenant: WsParts<TcpStream>,
    tenant_ktls: bool,
    compute: Socket,
    pipe: PipeSlot,
    settings: WsSettings,
    counters: &Counters,
    shutdown: super::Stop,
) -> End {
    let WsParts {
        inner,
        raw,
        pending,
        inbound,
    } = tenant;
    let (tr, mut tw) = inner.into_split();
    let tr: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if tenant_ktls {
        Box::new(KtlsRead::new(tr))
    } else {
        Box::new(tr)
    };
    let (cr, cw) = match compute {
        Socket::Tcp(s) => {
            let (r, w) = s.into_split();
            (ComputeRead::Tcp(r), ComputeWrite::Tcp(w))
        }
        Socket::Unix(s) => {
            let (r, w) = s.into_split();
            (ComputeRead::Unix(r), ComputeWrite::Unix(w))
        }
        Socket::Ktls(s) => {
            let (r, w) = s.into_split();
            (ComputeRead::Ktls(r), ComputeWrite::Ktls(KtlsWrite::new(w)))
        }
    };
    let ctl = ControlQueue::default();
    let end = {
        let up = up(tr, raw, pending, inbound, cw, counters, &ctl);
        let down = down(&cr, &mut tw, pipe, settings, counters, &ctl);
        tokio::pin!(up, down);
        tokio::select! {
            end = &mut up => {
                if !matches!(end, End::TenantIo(_)) {
                    let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
                }
                end
            }
            end = &mut down => {
                if !matches!(end, End::TenantIo(_)) {
                    let _ = tokio::time::timeout(CLOSE_GRACE, &mut up).await;
                }
                end
            }
            () = idle_watch(counters, settings.idle) => {
                ctl.try_send(Control::Close(close_code::GOING_AWAY, "idle timeout"));
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
                End::IdleTimeout
            }
            () = async { match settings.max_duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            } } => {
                ctl.try_send(Control::Close(close_code::GOING_AWAY, "maximum session duration reached"));
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
                End::MaxDuration
            }
            () = shutdown.raised() => {
                ctl.try_send(Control::Close(close_code::GOING_AWAY, "proxy shutting down"));
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
                End::Shutdown
            }
        }
    };
    // Our close frame is out: end the TLS stream properly before the FIN.
    if tenant_ktls && !matches!(end, End::TenantIo(_)) {
        let _ = tokio::time::timeout(CLOSE_GRACE, super::ktls::close_notify(tw.as_ref())).await;
    }
    end
}

/// Sends a frame header with `MSG_MORE`: the payload spliced right after
/// it goes out in the same segment.
async fn send_header(tenant: &TcpStream, mut hdr: &[u8]) -> io::Result<()> {
    while !hdr.is_empty() {
        tenant.writable().await?;
        match tenant.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(tenant).send_with_flags(hdr, libc::MSG_MORE)
        }) {
            Ok(n) => hdr = &hdr[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `src` is readable, then splices up to `len` bytes into the
/// slot's pipe (taken from the pool only now). A wake-up without data gives
/// the pipe back. No pipe to be had (descriptors ran out): wait and retry,
/// the bytes wait in the socket.
async fn splice_from(src: Sock<'_>, slot: &Mutex<PipeSlot>, len: usize) -> io::Result<usize> {
    loop {
        src.ready(Interest::READABLE).await?;
        let mut no_pipe = None;
        let r = src.try_io(Interest::READABLE, || {
            let mut slot = lock(slot);
            let pipe = match slot.get() {
                Ok(p) => p,
                Err(e) => {
                    no_pipe = Some(e);
                    return Ok(0);
                }
            };
            splice(src.fd(), pipe.writer(), len)
        });
        if let Some(e) = no_pipe {
            tracing::warn!(error = %e, "no pipe for splice: retrying");
            tokio::time::sleep(NO_PIPE_RETRY).await;
            continue;
        }
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => lock(slot).release(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn lock(slot: &Mutex<PipeSlot>) -> std::sync::MutexGuard<'_, PipeSlot> {
    // A panic while holding it cannot leave the slot half-changed.
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Splices up to `len` bytes from the slot's pipe (which holds them) to `dst`.
async fn splice_to(dst: Sock<'_>, slot: &Mutex<PipeSlot>, len: usize) -> io::Result<usize> {
    loop {
        dst.ready(Interest::WRITABLE).await?;
        let r = dst.try_io(Interest::WRITABLE, || {
            let mut slot = lock(slot);
            let pipe = slot.get()?;
            splice(pipe.reader(), dst.fd(), len)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Compute to tenant: spliced binary frames, plus pongs, pings and closes.
async fn down(
    cr: &ComputeRead,
    tw: &mut tcp::OwnedWriteHalf,
    pipe: PipeSlot,
    settings: WsSettings,
    counters: &Counters,
    ctl: &ControlQueue,
) -> End {
    let mut out = BytesMut::new();
    let mut ping = settings.ping_interval.map(|p| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let compute = cr.sock();
    let mut pipe = pipe;
    let chunk = match pipe.get() {
        Ok(p) => p.capacity().min(FRAME_MAX),
        Err(e) => return End::ComputeIo(e.to_string()),
    };
    pipe.release();
    // Shared by the splice futures and the select! arms of one task;
    // never locked across an await.
    let pipe = Mutex::new(pipe);
    let mut carry = HandshakeCarry::default();
    loop {
        tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some(Control::Pong(p)) => {
                    out.clear();
                    encode_frame(Opcode::Pong, &p, &mut out);
                    if let Err(e) = tw.write_all(&out).await {
                        return End::TenantIo(e.to_string());
                    }
                }
                Some(Control::Close(code, reason)) => {
                    send_close(tw, code, reason).await;
                    return End::Closed;
                }
                None => return End::Closed,
            },
            r = splice_from(compute, &pipe, chunk) => match r {
                Ok(0) => {
                    send_close(tw, close_code::NORMAL, "console closed").await;
                    return End::ComputeClosed;
                }
                Ok(n) => {
                    // The pipe holds exactly the n bytes just read.
                    let mut hdr = [0u8; MAX_HEADER_LEN];
                    let h = frame::encode_header(true, Opcode::Binary, None, n as u64, &mut hdr);
                    let tenant: &TcpStream = tw.as_ref();
                    if let Err(e) = send_header(tenant, &hdr[..h]).await {
                        return End::TenantIo(e.to_string());
                    }
                    let mut left = n;
                    while left > 0 {
                        let sock = Sock::Tcp(tenant);
                        match splice_to(sock, &pipe, left).await {
                            Ok(0) => return End::TenantIo(io::Error::from(io::ErrorKind::WriteZero).to_string()),
                            Ok(m) => left -= m,
                            Err(e) => return End::TenantIo(e.to_string()),
                        }
                    }
                    // The frame is out: the pipe is empty again.
                    lock(&pipe).release();
                    tracing::trace!(n, "compute data spliced");
                    counters.add_down(n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && compute.ktls().is_some() => {
                    // A non-data record of the kTLS compute leg.
                    let Some(sock) = compute.ktls() else { continue };
                    let mut buf = vec![0u8; RECORD_BUF];
                    match read_record(sock, &mut buf, &mut carry).await {
                        Ok(Next::Data(n)) => {
                            out.clear();
                            encode_frame(Opcode::Binary, &buf[..n], &mut out);
                            if let Err(e) = tw.write_all(&out).await {
                                return End::TenantIo(e.to_string());
                            }
                            counters.add_down(n);
                        }
                        Ok(Next::Eof) => {
                            send_close(tw, close_code::NORMAL, "console closed").await;
                            return End::ComputeClosed;
                        }
                        Ok(Next::Ignored) => {}
                        Err(e) => {
                            send_close(tw, close_code::COMPUTE_ERROR, "console connection failed").await;
                            return End::ComputeIo(e.to_string());
                        }
                    }
                }
                Err(e) => {
                    send_close(tw, close_code::COMPUTE_ERROR, "console connection failed").await;
                    return End::ComputeIo(e.to_string());
                }
            },
            _ = async { match ping.as_mut() { Some(i) => i.tick().await, None => std::future::pending().await } } => {
                if counters.unanswered_pings.load(Ordering::Relaxed) >= 2 {
                    send_close(tw, close_code::GOING_AWAY, "keepalive timeout").await;
                    return End::KeepaliveTimeout;
                }
                counters.unanswered_pings.fetch_add(1, Ordering::Relaxed);
                out.clear();
                encode_frame(Opcode::Ping, b"consolegate", &mut out);
                if let Err(e) = tw.write_all(&out).await {
                    return End::TenantIo(e.to_string());
                }
            }
        }
    }
}
