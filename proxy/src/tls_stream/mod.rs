//! The TLS stream of every TLS leg (tenant and compute side): rustls's
//! unbuffered connection API behind `AsyncRead`/`AsyncWrite`, with the
//! buffers owned here so an idle session holds none of them.
//!
//! tokio-rustls drives rustls's buffered connection, which keeps a 4 KiB
//! receive buffer for the connection's whole life: 4 KiB of every idle
//! TLS leg. Here the ciphertext buffers exist only while bytes are in
//! flight:
//! - received ciphertext: read into a 2 KiB stack buffer while none is
//!   pending, kept on the heap only for a partial record or a burst (then
//!   up to four records per read), and freed as soon as a read finds the
//!   socket drained;
//! - decrypted plaintext the reader has not taken yet: freed when taken;
//! - ciphertext the socket has not taken yet: freed once written.
//!
//! The semantics follow tokio-rustls, so callers see no difference: a
//! close_notify reads as end of stream; the transport ending without one is
//! `UnexpectedEof` (the kTLS hand-over tells its corked record boundary
//! from a real close by that); writes are accepted while less than
//! [`MAX_PENDING_OUT`] bytes wait for the socket.
//!
//! `blocking` gives the same stream over a blocking transport
//! (`std::io::Read + Write`, client side), for the load generator.

use std::io;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ExtractedSecrets;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, UnbufferedConnectionCommon, UnbufferedStatus};
use seal::{append, encode_needs, encrypt_needs, sealed_len, tls_error};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod blocking;
mod seal;
#[cfg(test)]
pub(crate) mod tests;

/// Bytes read at once into the stack while no ciphertext is pending.
const STACK_READ: usize = 2048;
/// One TLS record on the wire at most: header, 2^14 + 2048 payload.
const MAX_RECORD: usize = 5 + (1 << 14) + 2048;
/// Ciphertext held while a handshake message spans records: rustls
/// accepts handshake messages up to 64 KiB.
const MAX_INCOMING: usize = 0x1_0000 + MAX_RECORD;
/// The receive buffer during a burst: four full records per read.
const BURST: usize = 4 * MAX_RECORD;
/// Plaintext taken per `poll_write`.
const MAX_WRITE: usize = 4 << 14;
/// Writes return `Pending` while this much ciphertext waits for the socket.
pub const MAX_PENDING_OUT: usize = 64 * 1024;

/// The two sides of rustls's unbuffered connection.
pub trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Unpin {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// Gives up the connection for kernel TLS: the traffic secrets now,
    /// and what computes the next ones after a TLS 1.3 KeyUpdate.
    fn into_kernel(self)
    -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
}

/// A tenant leg: we are the TLS server.
pub type ServerTls<IO> = TlsStream<IO, UnbufferedServerConnection>;
/// A compute leg: we are the TLS client.
pub type ClientTls<IO> = TlsStream<IO, UnbufferedClientConnection>;

/// A TLS connection over `IO` (see the module docs).
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    /// Ciphertext read and not yet processed (a partial record, mostly):
    /// `incoming[in_at..in_len]`; before it what rustls discarded, after it
    /// room for reads.
    incoming: Vec<u8>,
    in_at: usize,
    in_len: usize,
    /// Plaintext decrypted and not yet read: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Ciphertext not yet written: `outgoing[out_at..]`.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer's close_notify has arrived.
    peer_closed: bool,
    /// The transport has ended.
    eof: bool,
    /// Our close_notify is queued.
    close_queued: bool,
    /// We asked rustls for the records it holds back ([`TlsStream::send_held`]).
    release_pending: bool,
}

impl<IO: std::fmt::Debug, C> std::fmt::Debug for TlsStream<IO, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

/// Where processing stopped.
enum Stop {
    /// Bytes from the peer are needed (handshake) or welcome (traffic).
    Read,
    /// Application data may be written: this many bytes of the write were.
    Open(usize),
    /// Both close_notify alerts have passed.
    Closed,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTls<IO> {
    /// Accepts a TLS connection from a client on `io`.
    pub async fn accept(config: Arc<rustls::ServerConfig>, io: IO) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Self::new(io, conn).handshake().await
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ClientTls<IO> {
    /// Connects as a TLS client to `name` over `io`.
    pub async fn connect(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        io: IO,
    ) -> io::Result<Self> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        Self::new(io, conn).handshake().await
    }
}

impl<IO, C> TlsStream<IO, C> {
    /// The transport and the connection.
    pub fn get_ref(&self) -> (&IO, &C) {
        (&self.io, &self.conn)
    }

    /// The transport and the connection.
    pub fn get_mut(&mut self) -> (&mut IO, &mut C) {
        (&mut self.io, &mut self.conn)
    }
}

impl<IO, C: Side> TlsStream<IO, C> {
    fn new(io: IO, conn: C) -> Self {
        Self {
            io,
            conn,
            incoming: Vec::new(),
            in_at: 0,
            in_len: 0,
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            peer_closed: false,
            eof: false,
            close_queued: false,
            release_pending: false,
        }
    }

    /// Runs rustls over the pending ciphertext until it needs bytes from the
    /// peer or may send application data. Decrypted plaintext goes to `out`
    /// while it has room, the rest to `plain`; handshake and alert records
    /// to `outgoing`. In the traffic state, encrypts `write` and, with
    /// `close`, a close_notify.
    fn process(
        &mut self,
        mut out: Option<&mut ReadBuf<'_>>,
        write: Option<&[u8]>,
        close: bool,
    ) -> io::Result<Stop> {
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process(&mut self.incoming[self.in_at..self.in_len]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.discard(discard);
                    self.queue_alert();
                    return Err(tls_error(e));
                }
            };
            let stop = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if self.plain.len() == self.plain_at
                            && let Some(out) = out.as_deref_mut()
                        {
                            let n = payload.len().min(out.remaining());
                            out.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        self.plain.extend_from_slice(payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    append(
                        &mut self.outgoing,
                        0,
                        |b| e.encode(b),
                        encode_needs,
                        "encoding TLS",
                    )?;
                    None
                }
                ConnectionState::TransmitTlsData(t) => {
                    // Everything goes out through `outgoing`, in order.
                    t.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Stop::Read),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Stop::Closed),
                ConnectionState::WriteTraffic(mut w) if self.release_pending => {
                    // Sealing one byte into no room fails before anything
                    // is sealed, but only after rustls has moved a held
                    // KeyUpdate answer to its outgoing records: the next
                    // turn hands that out as EncodeTlsData.
                    self.release_pending = false;
                    match w.encrypt(&[0], &mut []) {
                        Err(e) if encrypt_needs(&e).is_some() => None,
                        Err(e) => {
                            return Err(io::Error::other(format!("sending what rustls held: {e}")));
                        }
                        Ok(_) => return Err(io::Error::other("rustls sealed into no room")),
                    }
                }
                ConnectionState::WriteTraffic(mut w) => {
                    let mut n = 0;
                    if let Some(data) = write {
                        n = data.len().min(MAX_WRITE);
                        append(
                            &mut self.outgoing,
                            sealed_len(n),
                            |b| w.encrypt(&data[..n], b),
                            encrypt_needs,
                            "encrypting",
                        )?;
                    }
                    if close && !self.close_queued {
                        append(
                            &mut self.outgoing,
                            sealed_len(2),
                            |b| w.queue_close_notify(b),
                            encrypt_needs,
                            "encrypting close_notify",
                        )?;
                        self.close_queued = true;
                    }
                    Some(Stop::Open(n))
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS early data, which we never accept",
                    ));
                }
                _ => return Err(io::Error::other("TLS connection in an unknown state")),
            };
            self.discard(discard);
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Drops `n` processed bytes from the front of the pending ciphertext
    /// (moved down only when a read needs the room: see `poll_fill`).
    fn discard(&mut self, n: usize) {
        self.in_at += n;
        if self.in_at == self.in_len {
            self.in_at = 0;
            self.in_len = 0;
        }
    }

    /// After an error rustls still hands out the alert it queued for the
    /// peer (bad certificate, decrypt error...): into `outgoing`, for a
    /// last best-effort write. (rustls must see the same buffer as before,
    /// less what it discarded: it keeps offsets into it.)
    fn queue_alert(&mut self) {
        let status = self
            .conn
            .process(&mut self.incoming[self.in_at..self.in_len]);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = status.state {
            let _ = append(
                &mut self.outgoing,
                0,
                |b| e.encode(b),
                encode_needs,
                "alert",
            );
        }
    }

    /// Makes room for a read after the pending ciphertext (moved to the
    /// front first, the buffer grown for a burst): `incoming[in_len..]`.
    fn make_room(&mut self) -> io::Result<()> {
        if self.in_at > 0 {
            self.incoming.copy_within(self.in_at..self.in_len, 0);
            self.in_len -= self.in_at;
            self.in_at = 0;
        }
        if self.in_len >= MAX_INCOMING {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS handshake message larger than 64 KiB",
            ));
        }
        if self.incoming.len() - self.in_len < 4096 {
            let want = BURST.max(self.in_len + 4096).min(MAX_INCOMING);
            self.incoming.resize(want, 0);
        }
        Ok(())
    }

    /// Hands the transport and the connection over (the kTLS hand-over),
    /// after the caller has flushed and drained the stream and sent what
    /// rustls held ([`Self::send_held`]). Ciphertext not yet processed or
    /// not yet sent would be lost, so either is an error.
    pub fn into_inner(self) -> io::Result<(IO, C)> {
        if self.in_len > self.in_at || self.plain_at < self.plain.len() {
            return Err(io::Error::other(
                "TLS bytes past the record boundary at the hand-over",
            ));
        }
        if !self.pending_out().is_empty() {
            // Say a KeyUpdate answer: the secrets rustls gives up already
            // count it as sent.
            return Err(io::Error::other("TLS bytes not yet sent at the hand-over"));
        }
        Ok((self.io, self.conn))
    }

    /// Takes plaintext already decrypted into `buf`; whether there was any.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plain_at == self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.plain_at).min(buf.remaining());
        buf.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        true
    }

    /// Ciphertext not yet written.
    fn pending_out(&self) -> &[u8] {
        &self.outgoing[self.out_at..]
    }

    /// Marks `n` more bytes of [`Self::pending_out`] written; frees the
    /// buffer once all are.
    fn wrote_out(&mut self, n: usize) {
        self.out_at += n;
        if self.out_at == self.outgoing.len() {
            self.outgoing = Vec::new();
            self.out_at = 0;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, C: Side> TlsStream<IO, C> {
    /// Sends the records rustls holds back for our next application data:
    /// the answer to a peer's TLS 1.3 KeyUpdate that asked for ours. rustls
    /// seals it when the KeyUpdate arrives, under the key it then leaves,
    /// and the secrets it gives up for kernel TLS count it as sent, so at
    /// the hand-over it must go out first. Returns whether there was one.
    pub async fn send_held(&mut self) -> io::Result<bool> {
        let before = self.pending_out().len();
        self.release_pending = true;
        self.process(None, None, false)?;
        if self.release_pending {
            self.release_pending = false;
            return Err(io::Error::other(
                "TLS connection not ready to send application data",
            ));
        }
        let held = self.pending_out().len() > before;
        std::future::poll_fn(|cx| self.poll_write_out(cx)).await?;
        Ok(held)
    }

    async fn handshake(mut self) -> io::Result<Self> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await?;
        Ok(self)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let stop = match self.process(None, None, false) {
                Ok(stop) => stop,
                Err(e) => {
                    // The alert goes out if the socket takes it now.
                    let _ = self.poll_write_out(cx);
                    return Poll::Ready(Err(e));
                }
            };
            match stop {
                Stop::Open(_) => return self.poll_write_out(cx),
                Stop::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS connection closed during the handshake",
                    )));
                }
                Stop::Read => {
                    ready!(self.poll_write_out(cx))?;
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection during the TLS handshake",
                        )));
                    }
                }
            }
        }
    }

    /// Reads ciphertext from the transport. Returns the bytes read (0 at the
    /// end of the stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.is_empty() {
            // No buffer: read into the stack, so a drained socket costs
            // none.
            let mut stack = [0u8; STACK_READ];
            let mut rb = ReadBuf::new(&mut stack);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.incoming = Vec::new();
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            }
            let n = rb.filled().len();
            if self.incoming.len() < n {
                // A burst (a full stack read) gets room for a few records.
                let room = if n == STACK_READ { BURST } else { n };
                self.incoming = vec![0; room];
            }
            self.incoming[..n].copy_from_slice(rb.filled());
            self.in_len = n;
            return Poll::Ready(Ok(n));
        }
        self.make_room()?;
        let mut rb = ReadBuf::new(&mut self.incoming[self.in_len..]);
        if Pin::new(&mut self.io).poll_read(cx, &mut rb)?.is_pending() {
            if self.in_len == 0 {
                // Drained: the burst is over.
                self.incoming = Vec::new();
            }
            return Poll::Pending;
        }
        let n = rb.filled().len();
        self.in_len += n;
        Poll::Ready(Ok(n))
    }

    /// Writes pending ciphertext to the transport.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending_out().is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote_out(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, C: Side> AsyncRead for TlsStream<IO, C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.take_plain(buf) {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let stop = match this.process(Some(buf), None, false) {
                Ok(stop) => stop,
                Err(e) => {
                    let _ = this.poll_write_out(cx);
                    return Poll::Ready(Err(e));
                }
            };
            // A peer's key update is answered here, whether or not anyone
            // writes; a full socket just keeps it for later.
            if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before || this.plain_at < this.plain.len() {
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if matches!(stop, Stop::Closed) || this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without sending TLS close_notify",
                )));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.eof = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, C: Side> AsyncWrite for TlsStream<IO, C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.outgoing.len() - this.out_at >= MAX_PENDING_OUT {
            ready!(this.poll_write_out(cx))?;
        }
        match this.process(None, Some(buf), false)? {
            Stop::Open(n) => {
                // Start sending; a full socket keeps the rest for later.
                if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            Stop::Read | Stop::Closed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection can no longer carry data",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            // A connection that can no longer write has nothing to close.
            let _ = this.process(None, None, true);
            this.close_queued = true;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
