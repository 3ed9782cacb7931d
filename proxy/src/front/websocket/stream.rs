//! A byte-stream view of a WebSocket connection, for the handshake phase.
//!
//! The console security handshakes (RFB, SPICE link) are written against
//! `AsyncRead + AsyncWrite`; over WebSocket they go through this adapter.
//! Once the handshake is done, [`WsStream::into_parts`] hands the socket,
//! undecoded bytes and message state to the data path, which frames
//! without this layer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{Decoder, Opcode, close_payload, encode_frame};
use super::message::{Action, Inbound, Mode, encode_base64};
use crate::datapath::websocket::MAX_TENANT_FRAME;

/// What the data path takes over from a [`WsStream`].
#[derive(Debug)]
pub struct WsParts<S> {
    pub inner: S,
    /// Tenant bytes read but not yet decoded.
    pub raw: BytesMut,
    /// Decoded console bytes not yet consumed (go to the compute side first).
    pub pending: BytesMut,
    /// Message state (fragmentation, base64 carry).
    pub inbound: Inbound,
}

/// WebSocket connection as a byte stream (see the module docs).
#[derive(Debug)]
pub struct WsStream<S> {
    inner: S,
    mode: Mode,
    decoder: Decoder,
    inbound: Inbound,
    raw: BytesMut,
    payload: BytesMut,
    out: BytesMut,
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wraps an upgraded connection; `raw` holds bytes read after the head.
    pub fn new(inner: S, raw: BytesMut, mode: Mode) -> Self {
        Self {
            inner,
            mode,
            decoder: Decoder::new(MAX_TENANT_FRAME),
            inbound: Inbound::new(mode),
            raw,
            payload: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
        }
    }

    /// Queues a close frame; it is sent by the next flush.
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        encode_frame(Opcode::Close, &close_payload(code, reason), &mut self.out);
        self.eof = true;
    }

    /// Gives the parts to the data path. Flush first: queued frames are
    /// not part of the result.
    pub fn into_parts(self) -> WsParts<S> {
        WsParts {
            inner: self.inner,
            raw: self.raw,
            pending: self.payload,
            inbound: self.inbound,
        }
    }

    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

fn invalid(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.payload.is_empty() {
                let n = this.payload.len().min(buf.remaining());
                buf.put_slice(&this.payload.split_to(n));
                return Poll::Ready(Ok(()));
            }
            // Pongs and close echoes go out as soon as the socket takes them.
            let _ = this.poll_flush_out(cx);
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.decoder.decode(&mut this.raw) {
                Ok(Some(frame)) => match this.inbound.on_frame(frame) {
                    Ok(Action::Forward(d)) => this.payload.extend_from_slice(&d),
                    Ok(Action::Pong(p)) => encode_frame(Opcode::Pong, &p, &mut this.out),
                    Ok(Action::PongReceived) => {}
                    Ok(Action::Closed { code, .. }) => {
                        let echo = if code == 1001 { 1001 } else { 1000 };
                        this.queue_close(echo, "");
                    }
                    Err(v) => {
                        this.queue_close(v.code, v.reason);
                        let _ = this.poll_flush_out(cx);
                        return Poll::Ready(Err(invalid(v.reason)));
                    }
                },
                Ok(None) => {
                    if this.raw.capacity() - this.raw.len() < 4096 {
                        this.raw.reserve(8192);
                    }
                    let n = ready!(read_into_spare(&mut this.inner, cx, &mut this.raw))?;
                    if n == 0 {
                        this.eof = true;
                    }
                }
                Err(e) => {
                    this.queue_close(e.close_code(), "invalid frame");
                    let _ = this.poll_flush_out(cx);
                    return Poll::Ready(Err(invalid("invalid WebSocket frame")));
                }
            }
        }
    }
}

/// Reads into the spare capacity of `buf`.
fn read_into_spare<S: AsyncRead + Unpin>(
    s: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let start = buf.len();
    let cap = buf.capacity();
    buf.resize(cap, 0);
    let mut rb = ReadBuf::new(&mut buf[start..]);
    let res = Pin::new(s).poll_read(cx, &mut rb);
    let n = match &res {
        Poll::Ready(Ok(())) => rb.filled().len(),
        _ => 0,
    };
    buf.truncate(start + n);
    res.map_ok(|()| n)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        match this.mode {
            Mode::Binary => encode_frame(Opcode::Binary, buf, &mut this.out),
            Mode::Base64 => {
                encode_frame(Opcode::Text, encode_base64(buf).as_bytes(), &mut this.out)
            }
        }
        // The frame is queued; a failure to send it shows up at flush.
        let _ = this.poll_flush_out(cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::websocket::frame::{MAX_HEADER_LEN, apply_mask, encode_header};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn client_frame(op: Opcode, payload: &[u8]) -> Vec<u8> {
        let mask = [7, 1, 9, 3];
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(true, op, Some(mask), payload.len() as u64, &mut hdr);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask);
        [&hdr[..n], &p[..]].concat()
    }

    #[tokio::test]
    async fn reads_payload_answers_ping_and_writes_frames() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut ws = WsStream::new(server, BytesMut::new(), Mode::Binary);
        client
            .write_all(&client_frame(Opcode::Ping, b"p"))
            .await
            .unwrap();
        client
            .write_all(&client_frame(Opcode::Binary, b"RFB 003.008\n"))
            .await
            .unwrap();
        let mut v = [0u8; 12];
        ws.read_exact(&mut v).await.unwrap();
        assert_eq!(&v, b"RFB 003.008\n");
        ws.write_all(b"hi").await.unwrap();
        ws.flush().await.unwrap();
        // The pong comes first, then our binary frame.
        let mut got = vec![0u8; 3 + 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x8A, 1, b'p', 0x82, 2, b'h', b'i']);
        client
            .write_all(&client_frame(Opcode::Binary, b"tail"))
            .await
            .unwrap();
        let mut one = [0u8; 1];
        ws.read_exact(&mut one).await.unwrap();
        let parts = ws.into_parts();
        assert_eq!(&parts.pending[..], b"ail");
    }

    #[tokio::test]
    async fn protocol_errors_close_and_fail_reads() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut ws = WsStream::new(server, BytesMut::new(), Mode::Binary);
        client.write_all(&[0x82, 0x01, 0x00]).await.unwrap(); // unmasked
        let mut b = [0u8; 1];
        assert!(ws.read_exact(&mut b).await.is_err());
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], 0x88);
        assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1002);
    }
}
