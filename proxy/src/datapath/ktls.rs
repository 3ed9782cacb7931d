//! Kernel TLS sockets on the data path: what to do with the records that
//! are not application data.
//!
//! A kTLS socket decrypts in the kernel, so splice and plain writes work on
//! it, with three traps: splice from it fails with EINVAL at a non-data
//! record, a plain `read` fails with EIO there, and nothing sends
//! close_notify for us. The record is then read with `recvmsg` and its
//! type ([`crate::sys::ktls::recv_record`]) and judged by [`classify`], a
//! sans-io function: close_notify is the end of that side's stream,
//! TLS 1.3 NewSessionTicket is ignored, any other alert, a KeyUpdate (a
//! 6.1 kernel cannot rekey) or a renegotiation ends the session with an
//! error of that side. At end of stream towards a kTLS peer we send
//! close_notify before `shutdown(SHUT_WR)` ([`close_notify`]).

use std::io;
use std::os::fd::AsFd as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, tcp};

use crate::sys::ktls::{ALERT, APPLICATION_DATA, recv_record, send_close_notify};

const CHANGE_CIPHER_SPEC: u8 = 20;
const HANDSHAKE: u8 = 22;
/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Alert descriptions.
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;
/// Largest handshake message we carry across records (a ticket is far
/// smaller); beyond it the peer is misbehaving.
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;
/// Room for one record's plaintext (2^14) with margin.
pub const RECORD_BUF: usize = 16 * 1024 + 256;

/// What one record read with its type means for the data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Application data: forward it.
    Data,
    /// close_notify: that side's stream has ended (half-close).
    CloseNotify,
    /// Nothing to forward (a session ticket, a part of a handshake message).
    Ignore,
    /// The session cannot go on.
    Fail(RecordError),
}

/// Why a non-data record ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("TLS alert from the peer: level {level}, description {description}")]
    Alert { level: u8, description: u8 },
    #[error("malformed TLS alert record ({0} bytes)")]
    BadAlert(usize),
    #[error(
        "TLS 1.3 KeyUpdate from the peer: kernel TLS cannot take new keys on this kernel, \
         the session ends (set kernel.ktls = \"off\" if peers rekey)"
    )]
    KeyUpdate,
    #[error("unexpected TLS handshake message (type {0}) after the handshake")]
    Handshake(u8),
    #[error("TLS handshake message of {0} bytes after the handshake")]
    HandshakeTooLarge(usize),
    #[error("unexpected TLS record type {0}")]
    RecordType(u8),
}

/// Handshake bytes of a message that spans records.
#[derive(Debug, Default)]
pub struct HandshakeCarry {
    buf: Vec<u8>,
}

/// Judges one record read from a kTLS socket: its type as the kernel
/// reported it and its plaintext. Handshake records may hold several
/// messages or part of one; `carry` keeps the part until the rest comes.
pub fn classify(record_type: u8, payload: &[u8], carry: &mut HandshakeCarry) -> Record {
    match record_type {
        APPLICATION_DATA => Record::Data,
        ALERT => match *payload {
            [_, CLOSE_NOTIFY] => Record::CloseNotify,
            // TLS 1.3 peers may warn before their close_notify.
            [1, USER_CANCELED] => Record::Ignore,
            [level, description] => Record::Fail(RecordError::Alert { level, description }),
            _ => Record::Fail(RecordError::BadAlert(payload.len())),
        },
        HANDSHAKE => {
            carry.buf.extend_from_slice(payload);
            loop {
                let [kind, a, b, c, ..] = carry.buf[..] else {
                    return Record::Ignore;
                };
                let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                if len > MAX_HANDSHAKE_MESSAGE {
                    return Record::Fail(RecordError::HandshakeTooLarge(len));
                }
                match kind {
                    NEW_SESSION_TICKET => {}
                    KEY_UPDATE => return Record::Fail(RecordError::KeyUpdate),
                    other => return Record::Fail(RecordError::Handshake(other)),
                }
                if carry.buf.len() < 4 + len {
                    return Record::Ignore;
                }
                carry.buf.drain(..4 + len);
            }
        }
        CHANGE_CIPHER_SPEC => Record::Fail(RecordError::RecordType(record_type)),
        other => Record::Fail(RecordError::RecordType(other)),
    }
}

/// What [`read_record`] found at the head of a kTLS socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// This many bytes of application data are at the start of the buffer.
    Data(usize),
    /// End of that side's stream (close_notify or FIN).
    Eof,
    /// A record with nothing to forward was consumed.
    Ignored,
}

/// Reads the record at the head of a kTLS socket (after splice stopped at
/// it with EINVAL) into `buf` (at least [`RECORD_BUF`] bytes) and judges
/// it. A fatal record becomes an `io::Error` naming it.
pub async fn read_record(
    sock: &TcpStream,
    buf: &mut [u8],
    carry: &mut HandshakeCarry,
) -> io::Result<Next> {
    loop {
        sock.readable().await?;
        let got = sock.try_io(Interest::READABLE, || recv_record(sock.as_fd(), buf));
        match got {
            Ok((APPLICATION_DATA, 0)) => return Ok(Next::Eof),
            Ok((t, n)) => {
                return match classify(t, &buf[..n], carry) {
                    Record::Data => Ok(Next::Data(n)),
                    Record::CloseNotify => Ok(Next::Eof),
                    Record::Ignore => Ok(Next::Ignored),
                    Record::Fail(e) => Err(io::Error::other(e)),
                };
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends close_notify on a kTLS socket, waiting for room in its send
/// buffer. Errors are the caller's to ignore: the FIN follows anyway.
pub async fn close_notify(sock: &TcpStream) -> io::Result<()> {
    loop {
        sock.writable().await?;
        match sock.try_io(Interest::WRITABLE, || send_close_notify(sock.as_fd())) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The read half of a kTLS socket as a byte stream of its application
/// data: reads with `recvmsg` into a record buffer, skips tickets, ends at
/// close_notify and fails on other records. For the directions decoded in
/// userspace (WebSocket frames from the tenant).
#[derive(Debug)]
pub struct KtlsRead {
    inner: tcp::OwnedReadHalf,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    carry: HandshakeCarry,
    eof: bool,
}

impl KtlsRead {
    pub fn new(inner: tcp::OwnedReadHalf) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            carry: HandshakeCarry::default(),
            eof: false,
        }
    }
}

impl AsyncRead for KtlsRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.start < this.end {
                let n = (this.end - this.start).min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                if this.start == this.end {
                    // Drained: an idle session holds no record buffer.
                    this.buf = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let sock: &TcpStream = this.inner.as_ref();
            // The record buffer (16 KiB) exists only while a record is
            // being read or handed out, never while the session waits.
            ready!(sock.poll_read_ready(cx))?;
            if this.buf.len() < RECORD_BUF {
                this.buf.resize(RECORD_BUF, 0);
            }
            let buf = &mut this.buf;
            match sock.try_io(Interest::READABLE, || recv_record(sock.as_fd(), buf)) {
                Ok((APPLICATION_DATA, 0)) => this.eof = true,
                Ok((t, n)) => match classify(t, &this.buf[..n], &mut this.carry) {
                    Record::Data => (this.start, this.end) = (0, n),
                    Record::CloseNotify => this.eof = true,
                    Record::Ignore => {}
                    Record::Fail(e) => return Poll::Ready(Err(io::Error::other(e))),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.start == this.end {
                this.buf = Vec::new();
            }
        }
    }
}

/// The write half of a kTLS socket: writes are plain (the kernel makes
/// records), shutdown sends close_notify before the FIN.
#[derive(Debug)]
pub struct KtlsWrite {
    inner: tcp::OwnedWriteHalf,
    notified: bool,
}

impl KtlsWrite {
    pub fn new(inner: tcp::OwnedWriteHalf) -> Self {
        Self {
            inner,
            notified: false,
        }
    }
}

impl AsyncWrite for KtlsWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.notified {
            let sock: &TcpStream = this.inner.as_ref();
            ready!(sock.poll_write_ready(cx))?;
            match sock.try_io(Interest::WRITABLE, || send_close_notify(sock.as_fd())) {
                Ok(()) => this.notified = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The FIN still tells the peer we are done.
                Err(_) => this.notified = true,
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(t: u8, p: &[u8]) -> Record {
        classify(t, p, &mut HandshakeCarry::default())
    }

    #[test]
    fn data_and_alerts() {
        assert_eq!(one(23, b"abc"), Record::Data);
        assert_eq!(one(21, &[1, 0]), Record::CloseNotify);
        // TLS 1.3 ignores the level of close_notify.
        assert_eq!(one(21, &[2, 0]), Record::CloseNotify);
        assert_eq!(one(21, &[1, 90]), Record::Ignore);
        assert_eq!(
            one(21, &[2, 40]),
            Record::Fail(RecordError::Alert {
                level: 2,
                description: 40
            })
        );
        assert_eq!(one(21, &[1]), Record::Fail(RecordError::BadAlert(1)));
        assert_eq!(one(21, &[]), Record::Fail(RecordError::BadAlert(0)));
        assert_eq!(one(21, &[1, 0, 0]), Record::Fail(RecordError::BadAlert(3)));
        assert_eq!(one(20, &[1]), Record::Fail(RecordError::RecordType(20)));
        assert_eq!(one(99, &[]), Record::Fail(RecordError::RecordType(99)));
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = body.len();
        let mut v = vec![kind, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn session_tickets_are_ignored_even_split_across_records() {
        let mut two = msg(4, &[7; 200]);
        two.extend(msg(4, &[8; 100]));
        assert_eq!(one(22, &two), Record::Ignore);
        let mut carry = HandshakeCarry::default();
        // One ticket cut in three records: the header itself split.
        assert_eq!(classify(22, &two[..2], &mut carry), Record::Ignore);
        assert_eq!(classify(22, &two[2..150], &mut carry), Record::Ignore);
        assert_eq!(classify(22, &two[150..], &mut carry), Record::Ignore);
        assert!(carry.buf.is_empty());
    }

    #[test]
    fn key_update_and_renegotiation_end_the_session() {
        assert_eq!(
            one(22, &msg(24, &[0])),
            Record::Fail(RecordError::KeyUpdate)
        );
        let mut carry = HandshakeCarry::default();
        assert_eq!(classify(22, &msg(4, &[1; 10]), &mut carry), Record::Ignore);
        assert_eq!(
            classify(22, &msg(24, &[1])[..3], &mut carry),
            Record::Ignore,
            "header incomplete"
        );
        assert_eq!(
            classify(22, &[1, 1], &mut carry),
            Record::Fail(RecordError::KeyUpdate)
        );
        assert!(RecordError::KeyUpdate.to_string().contains("KeyUpdate"));
        // HelloRequest (TLS 1.2 renegotiation).
        assert_eq!(
            one(22, &msg(0, &[])),
            Record::Fail(RecordError::Handshake(0))
        );
        assert_eq!(
            one(22, &[4, 0xff, 0xff, 0xff]),
            Record::Fail(RecordError::HandshakeTooLarge(0xff_ffff))
        );
    }

    /// Over a plain socket (no kTLS here), the reader and writer behave
    /// as the stream they wrap: data in, FIN as end of stream.
    #[tokio::test]
    async fn reader_and_writer_on_a_plain_socket() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        let mut w = KtlsWrite::new(aw);
        let mut r = KtlsRead::new(br);
        w.write_all(b"console bytes").await.unwrap();
        let mut got = [0u8; 13];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"console bytes");
        assert_eq!(r.buf.capacity(), 0, "no record buffer once drained");
        // Shutdown sends the 2-byte close_notify payload (plain TCP takes
        // it as data), then the FIN.
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [1, 0]);
        drop((ar, bw));
    }
}
