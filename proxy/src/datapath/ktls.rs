//! Kernel TLS sockets on the data path: what to do with the records that
//! are not application data.
//!
//! A kTLS socket decrypts in the kernel, so splice and plain writes work on
//! it, with three traps: splice from it fails with EINVAL at a non-data
//! record, a plain `read` fails with EIO there, and nothing sends
//! close_notify for us. The record is then read with `recvmsg` and its
//! type ([`crate::sys::ktls::recv_record`]) and judged by [`classify`], a
//! sans-io function: close_notify is the end of that side's stream,
//! TLS 1.3 NewSessionTicket is ignored, a KeyUpdate is followed (below),
//! any other alert or a renegotiation ends the session with an error of
//! that side. At end of stream towards a kTLS peer we send close_notify
//! before `shutdown(SHUT_WR)` ([`close_notify`]).
//!
//! A peer's TLS 1.3 KeyUpdate: the kernel hands the message up and stops
//! decrypting until it has the next receive key (Linux 6.14 and later).
//! The direction reading the socket owns its [`RecvState`], with the
//! [`Rekey`] kept from the hand-over: it gives the socket the next receive
//! key at once and, if the peer asked for one, sends our KeyUpdate and
//! moves to the next transmit key before it reads on. Both directions of
//! a session run in one task, so no write of the other direction falls
//! between our KeyUpdate and the new transmit key. Without a [`Rekey`]
//! (a kernel that cannot take new keys, or TLS 1.2) a KeyUpdate ends the
//! session with an error saying so.

use std::io;
use std::os::fd::AsFd as _;
use std::task::{Context, Poll, ready};

use tokio::io::{Interest, ReadBuf};
use tokio::net::TcpStream;

use super::splice::Sock;
use crate::offload::{SharedRekey, Why, lock, poll_key_update};
use crate::sys::ktls::{
    ALERT, APPLICATION_DATA, HANDSHAKE, KeyDir, recv_record, send_close_notify,
};

const CHANGE_CIPHER_SPEC: u8 = 20;
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
    /// TLS 1.3 KeyUpdate, the last message of its record: the peer's next
    /// records use its next key; `requested`: it asks for ours too.
    KeyUpdate { requested: bool },
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
        "TLS 1.3 KeyUpdate from the peer, but this leg's kernel TLS keys cannot be renewed \
         (kTLS rekey needs Linux 6.14 or later): the session ends (set kernel.ktls = \"off\" \
         if peers rekey on such kernels)"
    )]
    KeyUpdate,
    #[error("malformed TLS KeyUpdate ({0} bytes, request byte {1:?})")]
    BadKeyUpdate(usize, Option<u8>),
    #[error("TLS KeyUpdate not at the end of its record (RFC 8446, 5.1)")]
    KeyUpdateNotLast,
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
                    NEW_SESSION_TICKET | KEY_UPDATE => {}
                    other => return Record::Fail(RecordError::Handshake(other)),
                }
                if carry.buf.len() < 4 + len {
                    return Record::Ignore;
                }
                if kind == KEY_UPDATE {
                    let request = carry.buf.get(4).copied();
                    let update = match (len, request) {
                        (1, Some(r @ (0 | 1))) if carry.buf.len() == 5 => {
                            Record::KeyUpdate { requested: r == 1 }
                        }
                        (1, Some(0 | 1)) => Record::Fail(RecordError::KeyUpdateNotLast),
                        _ => Record::Fail(RecordError::BadKeyUpdate(len, request)),
                    };
                    carry.buf = Vec::new();
                    return update;
                }
                carry.buf.drain(..4 + len);
            }
        }
        CHANGE_CIPHER_SPEC => Record::Fail(RecordError::RecordType(record_type)),
        other => Record::Fail(RecordError::RecordType(other)),
    }
}

/// What the direction reading a kTLS socket keeps between records.
#[derive(Debug, Default)]
pub struct RecvState {
    carry: HandshakeCarry,
    /// The next keys after a KeyUpdate; none: a KeyUpdate ends the session.
    keys: Option<SharedRekey>,
    /// The peer asked for our KeyUpdate: it goes out before we read on.
    owed: bool,
    /// A KeyUpdate was followed: [`poll_record`] reports it once our own
    /// (if owed) is out.
    followed: bool,
}

impl RecvState {
    /// The state of a socket just handed over, with its keys' successor.
    pub fn new(keys: Option<SharedRekey>) -> Self {
        Self {
            keys,
            ..Self::default()
        }
    }

    /// After [`classify`] found a KeyUpdate: the socket gets the peer's
    /// next key now (the kernel decrypts nothing until it has it).
    fn follow(&mut self, sock: &TcpStream, requested: bool) -> io::Result<()> {
        let Some(keys) = self.keys.as_ref() else {
            return Err(io::Error::other(RecordError::KeyUpdate));
        };
        lock(keys)
            .renew(sock.as_fd(), KeyDir::Rx, Why::PeerUpdate)
            .map_err(|e| io::Error::other(format!("following the peer's TLS KeyUpdate: {e}")))?;
        self.owed |= requested;
        self.followed = true;
        Ok(())
    }

    /// Sends the KeyUpdate the peer asked for (under the current transmit
    /// key), then moves the socket to the next transmit key.
    fn poll_owed(&mut self, sock: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.owed {
            let Some(keys) = self.keys.as_ref() else {
                return Poll::Ready(Err(io::Error::other(RecordError::KeyUpdate)));
            };
            ready!(poll_key_update(sock, cx, keys, Why::PeerUpdate)).map_err(|e| {
                io::Error::other(format!("answering the peer's TLS KeyUpdate: {e}"))
            })?;
            self.owed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// What [`read_record`] found at the head of a kTLS socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// This many bytes of application data are at the start of the buffer.
    Data(usize),
    /// End of that side's stream (close_notify or FIN).
    Eof,
    /// A record with nothing to forward was consumed (a ticket, or a
    /// KeyUpdate now followed).
    Ignored,
}

/// Reads the record at the head of a kTLS socket (after splice stopped at
/// it with EINVAL) into `buf` (at least [`RECORD_BUF`] bytes) and judges
/// it. A fatal record becomes an `io::Error` naming it.
pub async fn read_record(
    sock: &TcpStream,
    buf: &mut [u8],
    state: &mut RecvState,
) -> io::Result<Next> {
    std::future::poll_fn(|cx| poll_record(sock, cx, buf, state)).await
}

/// [`read_record`] as a poll: waits for the socket to be readable, then
/// reads one record. A KeyUpdate is reported (as `Ignored`) only once it
/// is followed both ways.
pub fn poll_record(
    sock: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut [u8],
    state: &mut RecvState,
) -> Poll<io::Result<Next>> {
    loop {
        ready!(state.poll_owed(sock, cx))?;
        if std::mem::take(&mut state.followed) {
            return Poll::Ready(Ok(Next::Ignored));
        }
        ready!(sock.poll_read_ready(cx))?;
        let got = sock.try_io(Interest::READABLE, || recv_record(sock.as_fd(), buf));
        match got {
            Ok((APPLICATION_DATA, 0)) => return Poll::Ready(Ok(Next::Eof)),
            Ok((t, n)) => {
                return Poll::Ready(match classify(t, &buf[..n], &mut state.carry) {
                    Record::Data => Ok(Next::Data(n)),
                    Record::CloseNotify => Ok(Next::Eof),
                    Record::Ignore => Ok(Next::Ignored),
                    Record::KeyUpdate { requested } => {
                        state.follow(sock, requested)?;
                        continue;
                    }
                    Record::Fail(e) => Err(io::Error::other(e)),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Sends close_notify on a kTLS socket, waiting for room in its send
/// buffer. Errors are the caller's to ignore: the FIN follows anyway.
pub async fn close_notify(sock: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| poll_close_notify(sock, cx)).await
}

/// [`close_notify`] as a poll.
pub fn poll_close_notify(sock: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    Sock::Ktls(sock).poll_write_op(cx, || send_close_notify(sock.as_fd()))
}

/// The receiving state of a kTLS socket read as a byte stream of its
/// application data: reads with `recvmsg` into a record buffer, skips
/// tickets, ends at close_notify and fails on other records. For the
/// directions decoded in userspace (WebSocket frames from the tenant).
#[derive(Debug, Default)]
pub struct KtlsRecv {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    state: RecvState,
    eof: bool,
}

impl KtlsRecv {
    /// The receiver of a socket just handed over.
    pub fn new(state: RecvState) -> Self {
        Self {
            state,
            ..Self::default()
        }
    }

    /// Reads application data of `sock` into `out`, as `AsyncRead` does.
    pub fn poll_read(
        &mut self,
        sock: &TcpStream,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.start < self.end {
                let n = (self.end - self.start).min(out.remaining());
                out.put_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                if self.start == self.end {
                    // Drained: an idle session holds no record buffer.
                    self.buf = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            if self.eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Our KeyUpdate, if the peer asked for one, before we read on.
            ready!(self.state.poll_owed(sock, cx))?;
            self.state.followed = false;
            // The record buffer (16 KiB) exists only while a record is
            // being read or handed out, never while the session waits.
            ready!(sock.poll_read_ready(cx))?;
            if self.buf.len() < RECORD_BUF {
                self.buf.resize(RECORD_BUF, 0);
            }
            let buf = &mut self.buf;
            match sock.try_io(Interest::READABLE, || recv_record(sock.as_fd(), buf)) {
                Ok((APPLICATION_DATA, 0)) => self.eof = true,
                Ok((t, n)) => match classify(t, &self.buf[..n], &mut self.state.carry) {
                    Record::Data => (self.start, self.end) = (0, n),
                    Record::CloseNotify => self.eof = true,
                    Record::Ignore => {}
                    Record::KeyUpdate { requested } => {
                        if let Err(e) = self.state.follow(sock, requested) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    Record::Fail(e) => return Poll::Ready(Err(io::Error::other(e))),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.start == self.end {
                self.buf = Vec::new();
            }
        }
    }

    /// Whether a record buffer is held now.
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
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
    fn key_updates_are_followed_and_renegotiation_ends_the_session() {
        assert_eq!(
            one(22, &msg(24, &[0])),
            Record::KeyUpdate { requested: false }
        );
        assert_eq!(
            one(22, &msg(24, &[1])),
            Record::KeyUpdate { requested: true }
        );
        // After a ticket in the same record, and split across records.
        let mut carry = HandshakeCarry::default();
        assert_eq!(classify(22, &msg(4, &[1; 10]), &mut carry), Record::Ignore);
        assert_eq!(
            classify(22, &msg(24, &[1])[..3], &mut carry),
            Record::Ignore,
            "header incomplete"
        );
        assert_eq!(
            classify(22, &[1, 1], &mut carry),
            Record::KeyUpdate { requested: true }
        );
        assert!(carry.buf.is_empty());
        let mut ticket_then_update = msg(4, &[3; 20]);
        ticket_then_update.extend(msg(24, &[0]));
        assert_eq!(
            one(22, &ticket_then_update),
            Record::KeyUpdate { requested: false }
        );
        // A key change must end its record.
        let mut update_then_ticket = msg(24, &[0]);
        update_then_ticket.extend(msg(4, &[3; 20]));
        assert_eq!(
            one(22, &update_then_ticket),
            Record::Fail(RecordError::KeyUpdateNotLast)
        );
        assert_eq!(
            one(22, &msg(24, &[2])),
            Record::Fail(RecordError::BadKeyUpdate(1, Some(2)))
        );
        assert_eq!(
            one(22, &msg(24, &[])),
            Record::Fail(RecordError::BadKeyUpdate(0, None))
        );
        assert_eq!(
            one(22, &msg(24, &[0, 0])),
            Record::Fail(RecordError::BadKeyUpdate(2, Some(0)))
        );
        assert!(RecordError::KeyUpdate.to_string().contains("6.14"));
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

    /// Over a plain socket (no kTLS here), the receiver reads the stream
    /// it is given: data in, FIN as end of stream; close_notify goes out
    /// as a 2-byte record payload (plain TCP takes it as data).
    #[tokio::test]
    async fn receiver_and_close_notify_on_a_plain_socket() {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        async fn read(r: &mut KtlsRecv, b: &TcpStream, want: usize) -> Vec<u8> {
            let mut got = Vec::new();
            let mut chunk = [0u8; 64];
            while got.len() < want {
                let mut rb = ReadBuf::new(&mut chunk);
                std::future::poll_fn(|cx| r.poll_read(b, cx, &mut rb))
                    .await
                    .unwrap();
                if rb.filled().is_empty() {
                    break;
                }
                got.extend_from_slice(rb.filled());
            }
            got
        }
        let mut r = KtlsRecv::default();
        a.write_all(b"console bytes").await.unwrap();
        assert_eq!(read(&mut r, &b, 13).await, b"console bytes");
        assert!(!r.holds_buffer(), "no record buffer once drained");
        close_notify(&a).await.unwrap();
        a.shutdown().await.unwrap();
        assert_eq!(read(&mut r, &b, 64).await, [1, 0]);
    }
}
