//! Tenant side: listeners, TLS accept, HTTP head reading, and the two
//! front ends (WebSocket and HTTP CONNECT).

pub mod connect;
pub mod forwarded;
pub mod http;
pub mod listener;
pub mod tls;
pub mod web;
pub mod websocket;
pub mod ws;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::Refusal;
use http::{HeadLimits, HttpError, RequestHead, parse_request_head};

/// A tenant TLS connection. rustls reads through a [`crate::offload::Cork`],
/// which never hands it bytes past a record boundary, so the stream can be
/// handed to kernel TLS after the handshake phase ([`crate::offload`]).
pub type TenantTls = crate::tls_stream::ServerTls<crate::offload::Cork<TcpStream>>;

/// A tenant connection, with or without TLS.
pub enum TenantStream {
    Plain(TcpStream),
    Tls(Box<TenantTls>),
}

impl std::fmt::Debug for TenantStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TenantStream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            TenantStream::Tls(s) => f.debug_tuple("Tls").field(&s.get_ref().0.io).finish(),
        }
    }
}

/// Reads one request head. Returns the head and any bytes after it.
/// `Err(None)` means the tenant went away without sending anything useful.
pub async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    limits: &HeadLimits,
) -> Result<(RequestHead, BytesMut), Option<Refusal>> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match parse_request_head(&buf, limits) {
            Ok(Some((head, used))) => {
                // The bytes after the head get a buffer of their own, so the
                // head buffer is freed now rather than living as long as
                // the session does.
                let rest = BytesMut::from(&buf[used..]);
                return Ok((head, rest));
            }
            Ok(None) => {}
            Err(HttpError::TooLarge(_) | HttpError::TooManyHeaders(_)) => {
                return Err(Some(Refusal::HeadTooLarge));
            }
            Err(HttpError::Malformed(_)) => return Err(Some(Refusal::BadRequest)),
        }
        let want = (limits.max_bytes + 1)
            .saturating_sub(buf.len())
            .clamp(1, 4096);
        buf.reserve(want);
        match s.read_buf(&mut (&mut buf).limit(want)).await {
            Ok(0) if buf.is_empty() => return Err(None),
            Ok(0) => return Err(Some(Refusal::BadRequest)),
            Ok(_) => {}
            Err(_) => return Err(None),
        }
    }
}

/// A rustls or plain stream: bytes pass through userspace.
impl crate::datapath::websocket::WsLeg for TenantStream {}

impl AsyncRead for TenantStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TenantStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            TenantStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TenantStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TenantStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            TenantStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TenantStream::Plain(s) => Pin::new(s).poll_flush(cx),
            TenantStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TenantStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            TenantStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
