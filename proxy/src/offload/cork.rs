//! The transport under rustls on every TLS leg: it reads one TLS record at
//! a time (header, then exactly its payload), so rustls never holds bytes
//! past a record boundary, and once corked it answers at the next boundary
//! with an empty read. That is what makes a clean hand-over to kernel TLS
//! possible: drain rustls to the boundary, and the socket holds exactly the
//! records that follow.
//!
//! Like `ktls::CorkStream`, but it never panics: a header is handed to
//! rustls in as many pieces as its buffer takes.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest record payload we frame (2^14 + 2048, TLSCiphertext); a header
/// claiming more, or an unknown record type, switches to passthrough and
/// rustls reports the error.
const MAX_RECORD: usize = (1 << 14) + 2048;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 5-byte header: `have` bytes read, `given` handed on.
    Header {
        buf: [u8; 5],
        have: usize,
        given: usize,
    },
    /// This many payload bytes of the current record are still to come.
    Payload { left: usize },
    /// End of stream or not TLS: plain reads.
    Passthrough,
}

const FRESH: State = State::Header {
    buf: [0; 5],
    have: 0,
    given: 0,
};

/// Whether TLS legs read record at a time: set once at start when kTLS
/// can take legs over.
static RECORD_ALIGNED: AtomicBool = AtomicBool::new(false);

/// Called at start with whether kTLS may take TLS legs over.
pub fn set_record_aligned(on: bool) {
    RECORD_ALIGNED.store(on, Ordering::Relaxed);
}

/// Record-at-a-time reader (see the module docs).
#[derive(Debug)]
pub struct Cork<IO> {
    pub io: IO,
    corked: bool,
    state: State,
}

impl<IO> Cork<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            corked: false,
            state: FRESH,
        }
    }

    /// The transport of a TLS leg of this process: record at a time when
    /// kTLS may take the leg over ([`set_record_aligned`], at start),
    /// plain reads otherwise, so a host without kTLS pays no extra read
    /// per record.
    pub fn for_leg(io: IO) -> Self {
        let mut c = Self::new(io);
        if !RECORD_ALIGNED.load(Ordering::Relaxed) {
            c.state = State::Passthrough;
        }
        c
    }

    /// From now on, reads end (empty) at the next record boundary.
    pub fn cork(&mut self) {
        self.corked = true;
    }
}

impl<IO: AsFd> AsFd for Cork<IO> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.io.as_fd()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Cork<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match &mut this.state {
                State::Header { buf, have, given } => {
                    if *have == 0 && this.corked {
                        return Poll::Ready(Ok(()));
                    }
                    if *have < 5 {
                        let mut rb = ReadBuf::new(&mut buf[*have..]);
                        ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                        let n = rb.filled().len();
                        if n == 0 {
                            // EOF inside a header: hand over what came, rustls
                            // reports the truncation.
                            out.put_slice(&buf[*given..*have]);
                            this.state = State::Passthrough;
                            return Poll::Ready(Ok(()));
                        }
                        *have += n;
                        continue;
                    }
                    let k = (5 - *given).min(out.remaining());
                    out.put_slice(&buf[*given..*given + k]);
                    *given += k;
                    if *given == 5 {
                        let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
                        let known = (20..=24).contains(&buf[0]);
                        this.state = if !known || len > MAX_RECORD {
                            State::Passthrough
                        } else if len == 0 {
                            FRESH
                        } else {
                            State::Payload { left: len }
                        };
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Payload { left } => {
                    let want = (*left).min(out.remaining());
                    let dst = out.initialize_unfilled_to(want);
                    let mut rb = ReadBuf::new(dst);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        this.state = State::Passthrough;
                        return Poll::Ready(Ok(()));
                    }
                    out.advance(n);
                    *left -= n;
                    if *left == 0 {
                        this.state = FRESH;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Passthrough => {
                    if this.corked {
                        return Poll::Ready(Ok(()));
                    }
                    return Pin::new(&mut this.io).poll_read(cx, out);
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Cork<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What draining a rustls stream found.
#[derive(Debug, Default)]
pub struct Drained {
    /// Plaintext rustls had decrypted that nobody had read.
    pub bytes: Vec<u8>,
    /// The peer's close_notify was among it: its stream has ended.
    pub peer_closed: bool,
}

/// Reads what rustls has decrypted (or can decrypt from the record it is
/// in the middle of) until the corked transport reports the boundary.
/// The TLS stream tells the two ends apart: an empty read after close_notify,
/// `UnexpectedEof` at our boundary.
pub async fn drain<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Drained> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Drained::default();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => {
                out.peer_closed = true;
                return Ok(out);
            }
            Ok(n) => out.bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn record(t: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![t, 3, 3];
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Tiny read buffers (down to one byte) still get whole headers in
    /// pieces, and corking stops exactly at a boundary.
    #[tokio::test]
    async fn records_in_pieces_and_cork_at_the_boundary() {
        let mut wire = record(23, &[7; 300]);
        wire.extend(record(23, &[8; 10]));
        let (mut a, b) = tokio::io::duplex(64);
        let w = wire.clone();
        tokio::spawn(async move {
            a.write_all(&w).await.unwrap();
            a.write_all(&record(23, b"after")).await.unwrap();
            a.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let mut c = Cork::new(b);
        let mut got = Vec::new();
        let mut one = [0u8; 1];
        while got.len() < 305 {
            let n = c.read(&mut one).await.unwrap();
            got.extend_from_slice(&one[..n]);
        }
        // In the middle of the second record's header: cork, read on.
        let mut three = [0u8; 3];
        let n = c.read(&mut three).await.unwrap();
        got.extend_from_slice(&three[..n]);
        c.cork();
        let mut big = [0u8; 4096];
        loop {
            let n = c.read(&mut big).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&big[..n]);
        }
        assert_eq!(got, wire, "exactly up to the boundary");
        // The next record is still in the transport, untouched.
        let mut rest = [0u8; 10];
        c.io.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, &record(23, b"after")[..]);
    }

    #[tokio::test]
    async fn garbage_and_eof_pass_through() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(a);
        let mut c = Cork::new(b);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\n");
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[23, 3]).await.unwrap();
        drop(a);
        let mut c = Cork::new(b);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [23, 3]);
    }
}
