//! splice(2) data path for plaintext streams: each direction moves bytes
//! socket -> pipe -> socket inside the kernel, never through a userspace
//! buffer. Applies when both legs are plain TCP or UNIX sockets or kernel
//! TLS sockets ([`Socket::Ktls`]; a rustls leg has to be decrypted in
//! userspace). At a non-data record of a kTLS leg splice stops with
//! EINVAL: the record is read and judged as [`super::ktls`] says.
//!
//! Same contract as [`super::copy`]: counters, half-close (the peer gets
//! `shutdown(SHUT_WR)` at EOF once the pipe is drained, the other
//! direction keeps flowing), backpressure (a direction reads only when its
//! pipe is empty, so a slow reader stops the writer), idle timeout and
//! shutdown. The first error on either leg ends the session.

use std::future::Future;
use std::io;
use std::io::Read as _;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use super::ktls::RecvState;
use super::pipes::PipeSlot;
use super::{Counters, Dir, End, idle_watch};
use crate::offload::{KtlsKeys, TxLimit};
use crate::sys::pipe::{readable_bytes, splice};

/// Capacity asked for each pipe. Pages are allocated only when used;
/// the kernel keeps the default (64 KiB) if it refuses this.
pub const PIPE_SIZE: usize = 1 << 20;

/// A socket one side of a spliced session runs on.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TCP socket with kernel TLS in both directions: the kernel
    /// decrypts what we splice out of it and encrypts what we splice in.
    /// With what follows a KeyUpdate and the transmit key's record limit.
    Ktls(TcpStream, KtlsKeys),
}

/// A borrowed socket of a spliced leg.
#[derive(Debug, Clone, Copy)]
pub enum Sock<'a> {
    Tcp(&'a TcpStream),
    Unix(&'a UnixStream),
    Ktls(&'a TcpStream),
}

impl Socket {
    pub(super) fn borrow(&self) -> Sock<'_> {
        match self {
            Socket::Tcp(s) => Sock::Tcp(s),
            Socket::Unix(s) => Sock::Unix(s),
            Socket::Ktls(s, _) => Sock::Ktls(s),
        }
    }

    /// The receive state of the direction reading this socket: a kTLS
    /// socket's successor keys go into it.
    pub(super) fn take_recv_state(&mut self) -> RecvState {
        match self {
            Socket::Ktls(_, keys) => RecvState::new(keys.rekey.take()),
            Socket::Tcp(_) | Socket::Unix(_) => RecvState::default(),
        }
    }

    /// The transmit-key record limit of a kTLS socket, for the direction
    /// writing it.
    pub(super) fn take_tx_limit(&mut self) -> Option<Box<TxLimit>> {
        match self {
            Socket::Ktls(_, keys) => keys.tx.take(),
            Socket::Tcp(_) | Socket::Unix(_) => None,
        }
    }
}

impl<'a> Sock<'a> {
    pub(super) fn fd(self) -> BorrowedFd<'a> {
        match self {
            Sock::Tcp(s) | Sock::Ktls(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    pub(super) async fn ready(self, interest: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) | Sock::Ktls(s) => s.ready(interest).await.map(drop),
            Sock::Unix(s) => s.ready(interest).await.map(drop),
        }
    }

    /// Polls for readiness (one interest: readable or writable), with the
    /// waker of that interest's slot.
    pub(super) fn poll_ready(
        self,
        cx: &mut std::task::Context<'_>,
        interest: Interest,
    ) -> Poll<io::Result<()>> {
        match (self, interest.is_readable()) {
            (Sock::Tcp(s) | Sock::Ktls(s), true) => s.poll_read_ready(cx),
            (Sock::Tcp(s) | Sock::Ktls(s), false) => s.poll_write_ready(cx),
            (Sock::Unix(s), true) => s.poll_read_ready(cx),
            (Sock::Unix(s), false) => s.poll_write_ready(cx),
        }
    }

    /// Runs `f` if tokio thinks the socket is ready; a `WouldBlock` from
    /// `f` clears that readiness so the next `ready` waits for epoll.
    pub(super) fn try_io<R>(
        self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            Sock::Tcp(s) | Sock::Ktls(s) => s.try_io(interest, f),
            Sock::Unix(s) => s.try_io(interest, f),
        }
    }

    /// Waits until the socket is writable and runs `op` on it until it
    /// does not block; returns what `op` returned.
    pub(crate) fn poll_write_op<R>(
        self,
        cx: &mut std::task::Context<'_>,
        mut op: impl FnMut() -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            std::task::ready!(self.poll_ready(cx, Interest::WRITABLE))?;
            match self.try_io(Interest::WRITABLE, &mut op) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                done => return Poll::Ready(done),
            }
        }
    }

    /// The kTLS socket, if this is one.
    pub(super) fn ktls(self) -> Option<&'a TcpStream> {
        match self {
            Sock::Ktls(s) => Some(s),
            Sock::Tcp(_) | Sock::Unix(_) => None,
        }
    }

    /// End of our stream towards this peer: close_notify first on kTLS.
    async fn shutdown_write(self) -> io::Result<()> {
        if let Some(s) = self.ktls() {
            let _ = super::ktls::close_notify(s).await;
        }
        socket2::SockRef::from(&self.fd()).shutdown(Shutdown::Write)
    }
}

/// The two directions' pipes of a spliced session. Each is taken from the
/// pool only while its direction has bytes in flight ([`super::pipes`]),
/// so an idle session holds none.
#[derive(Debug)]
pub struct Splicer {
    size: usize,
}

impl Splicer {
    /// Checks that a pipe can be had now (so a session that cannot splice
    /// falls back to the copy before it starts).
    pub fn new() -> io::Result<Self> {
        Self::with_pipe_size(PIPE_SIZE)
    }

    /// The same, with pipes of `size` bytes of capacity.
    pub fn with_pipe_size(size: usize) -> io::Result<Self> {
        PipeSlot::available(size)?;
        Ok(Self { size })
    }

    /// Splices both ways until both directions reach EOF, one side fails,
    /// the session idles out or shutdown is signalled.
    pub async fn run(
        self,
        mut tenant: Socket,
        mut compute: Socket,
        counters: &Counters,
        idle: Option<Duration>,
        shutdown: super::Stop,
    ) -> End {
        let up_keys = (tenant.take_recv_state(), compute.take_tx_limit());
        let down_keys = (compute.take_recv_state(), tenant.take_tx_limit());
        let (t, c) = (tenant.borrow(), compute.borrow());
        let mut up = match Flow::new(t, c, Dir::Up, self.size, counters, up_keys) {
            Ok(f) => f,
            Err(end) => return end,
        };
        let mut down = match Flow::new(c, t, Dir::Down, self.size, counters, down_keys) {
            Ok(f) => f,
            Err(end) => return end,
        };
        // Both directions in one hand-written poll (no nested futures):
        // an idle session's pump is the two `Flow`s and the two waits below.
        let both = std::future::poll_fn(|cx| {
            let u = up.poll(cx);
            if let Poll::Ready(Err(end)) = u {
                return Poll::Ready(end);
            }
            let d = down.poll(cx);
            if let Poll::Ready(Err(end)) = d {
                return Poll::Ready(end);
            }
            if u.is_ready() && d.is_ready() {
                Poll::Ready(End::Closed)
            } else {
                Poll::Pending
            }
        });
        tokio::select! {
            end = both => end,
            () = idle_watch(counters, idle) => End::IdleTimeout,
            () = shutdown.raised() => End::Shutdown,
        }
    }
}

/// Writes all of `data` to a socket (application data read with recvmsg
/// from a kTLS source; rare).
pub(super) async fn write_all(dst: Sock<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.ready(Interest::WRITABLE).await?;
        match dst.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(&dst.fd()).send_with_flags(data, libc::MSG_NOSIGNAL)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Result of one attempt to move bytes from a socket into the pipe.
enum In {
    /// This many bytes are now in the pipe (0: end of stream).
    Moved(usize),
    /// A small message went by copy ([`Flow::copy_small`]): `sent` bytes
    /// are at the destination, `piped` more wait in the pipe; `full`: the
    /// read filled its buffer (more may wait: splice again).
    Sent {
        sent: usize,
        piped: usize,
        full: bool,
    },
    /// Sending the small message failed (the destination's error).
    SendFailed(io::Error),
    /// The socket has data but the pipe has no free slot.
    PipeFull,
    /// The socket has data but no pipe could be had (descriptors ran out).
    NoPipe(io::Error),
}

/// One non-blocking `splice(src -> pipe)` inside `try_io`. EAGAIN is
/// ambiguous (socket empty, or pipe slots full with partial pages), so
/// FIONREAD tells them apart: only an empty socket clears tokio's
/// readiness, otherwise the next wake-up could be lost. An empty pipe
/// (`pending` 0) always has a free slot, so there EAGAIN can only mean an
/// empty socket and the extra system call is spared (one per message of
/// an interactive session). The pipe is taken from the pool only here,
/// when tokio says the socket is readable.
fn splice_in(src: Sock<'_>, slot: &mut PipeSlot, len: usize, pending: usize) -> io::Result<In> {
    src.try_io(Interest::READABLE, || {
        let pipe = match slot.get() {
            Ok(p) => p,
            Err(e) => return Ok(In::NoPipe(e)),
        };
        match splice(src.fd(), pipe.writer(), len) {
            Ok(n) => Ok(In::Moved(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if pending > 0 && readable_bytes(src.fd()).unwrap_or(0) > 0 {
                    Ok(In::PipeFull)
                } else {
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    })
}

/// Messages up to this size move by copy (recv into a stack buffer, send
/// on) rather than by two splices: for keystrokes and small screen updates
/// a splice costs more than the copy it saves, and a short recv also tells
/// that the socket is drained without one more call that fails with
/// EAGAIN. A read that fills the buffer switches back to splice.
pub(super) const SMALL: usize = 2048;

/// How long a direction waits before trying again when no pipe could be
/// had; its bytes wait in the socket meanwhile (TCP backpressure).
pub(super) const NO_PIPE_RETRY: Duration = Duration::from_millis(50);

/// A rare step of one direction, boxed only while it runs, so that an
/// idle direction holds none: a kTLS record read and forwarded, the wait
/// for a pipe when descriptors ran out, close_notify before the half-close.
type Slow<'a> = Pin<Box<dyn Future<Output = Result<Slowed, End>> + Send + 'a>>;

/// How a [`Slow`] step ended.
enum Slowed {
    /// A kTLS record was consumed (`eof`: it ended that side's stream)
    /// and `wrote` bytes of it forwarded; the receive state comes back.
    Record {
        state: RecvState,
        eof: bool,
        wrote: usize,
    },
    /// Try again (a pipe may be had now).
    Retry,
    /// The half-close went out: the direction is done.
    Finished,
}

/// One direction, as a state machine polled by hand. Reading into the pipe
/// and writing out of it overlap: the pipe is filled while it has room and
/// drained while it has bytes, and the direction waits only when neither
/// can move (for the source to become readable, the destination writable,
/// or both). At end of stream the pipe is drained, then the destination
/// gets `shutdown(SHUT_WR)`.
struct Flow<'a> {
    src: Sock<'a>,
    dst: Sock<'a>,
    dir: Dir,
    counters: &'a Counters,
    slot: PipeSlot,
    cap: usize,
    /// Bytes in the pipe.
    pending: usize,
    eof: bool,
    /// kTLS source: splice stopped at a non-data record, to be read with
    /// recvmsg once the pipe is empty (so the order of bytes holds).
    at_record: bool,
    done: bool,
    /// The last read was small: try the next one by copy ([`SMALL`]).
    small: bool,
    /// kTLS source: tickets spanning records, KeyUpdates.
    recv: RecvState,
    /// kTLS destination: its transmit key's record limit.
    tx: Option<Box<TxLimit>>,
    slow: Option<Slow<'a>>,
}

impl<'a> Flow<'a> {
    fn new(
        src: Sock<'a>,
        dst: Sock<'a>,
        dir: Dir,
        size: usize,
        counters: &'a Counters,
        (recv, tx): (RecvState, Option<Box<TxLimit>>),
    ) -> Result<Self, End> {
        let mut slot = PipeSlot::new(size);
        let cap = slot.get().map_err(|e| dir.read_err(e))?.capacity();
        slot.release();
        Ok(Self {
            src,
            dst,
            dir,
            counters,
            slot,
            cap,
            pending: 0,
            eof: false,
            at_record: false,
            done: false,
            small: true,
            recv,
            tx,
            slow: None,
        })
    }

    /// `n` bytes went to the destination.
    fn count(&mut self, n: usize) {
        if let Some(tx) = self.tx.as_mut() {
            tx.wrote(n);
        }
        self.dir.count(self.counters, n);
    }

    /// Reads a small message into a stack buffer and sends it on; what the
    /// destination cannot take now goes into the (empty) pipe, to be
    /// spliced out as usual, so the order of bytes holds. The pipe is taken
    /// only then: a message that goes straight through touches no pipe (no
    /// pool check per message).
    fn copy_small(&mut self) -> io::Result<In> {
        let (src, dst) = (self.src, self.dst);
        let mut buf = [0u8; SMALL];
        let mut got = 0;
        let read = src.try_io(Interest::READABLE, || {
            let n = (&*socket2::SockRef::from(&src.fd())).read(&mut buf)?;
            got = n;
            // A short read drained the socket (tokio's own reads assume
            // the same): clear the readiness without asking again.
            if n > 0 && n < SMALL {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(In::Moved(0));
        }
        let data = &buf[..n];
        let sent = match dst.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(&dst.fd()).send_with_flags(data, libc::MSG_NOSIGNAL)
        }) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => return Ok(In::SendFailed(e)),
        };
        let rest = &data[sent..];
        if !rest.is_empty() {
            let pipe = match self.slot.get() {
                Ok(p) => p,
                // Bytes read must go somewhere: with no descriptor left for
                // a pipe the session ends (the proxy is out of descriptors).
                Err(e) => {
                    return Ok(In::SendFailed(io::Error::other(format!(
                        "no pipe for the rest of a message (descriptors ran out): {e}"
                    ))));
                }
            };
            // At most SMALL bytes into an empty pipe of at least a page:
            // they fit whole.
            let piped = crate::sys::pipe::write(pipe.writer(), rest)?;
            if piped < rest.len() {
                return Err(io::Error::other("pipe took a small message in part"));
            }
        }
        Ok(In::Sent {
            sent,
            piped: rest.len(),
            full: n == SMALL,
        })
    }

    /// Moves what can be moved now; `Ready(Ok)` once the direction is done
    /// (and on every poll after).
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), End>> {
        let dir = self.dir;
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(slow) = self.slow.as_mut() {
                let r = std::task::ready!(slow.as_mut().poll(cx));
                self.slow = None;
                match r? {
                    Slowed::Record { state, eof, wrote } => {
                        self.recv = state;
                        self.eof |= eof;
                        if let Some(tx) = self.tx.as_mut() {
                            tx.wrote(wrote);
                        }
                    }
                    Slowed::Retry => {}
                    Slowed::Finished => self.done = true,
                }
                continue;
            }
            if self.at_record
                && self.pending == 0
                && let Some(s) = self.src.ktls()
            {
                self.at_record = false;
                let state = std::mem::take(&mut self.recv);
                self.slow = Some(Box::pin(forward_record(
                    s,
                    self.dst,
                    dir,
                    state,
                    self.counters,
                )));
                continue;
            }
            // A kTLS destination's key is renewed at its record limit
            // before anything more is written to it.
            if let (Some(tx), Some(s)) = (self.tx.as_mut(), self.dst.ktls())
                && let Err(e) = std::task::ready!(tx.poll_ready(s, cx))
            {
                return Poll::Ready(Err(dir.write_err(e)));
            }
            let mut pipe_full = false;
            let mut progressed = false;
            if !self.eof && !self.at_record && self.pending < self.cap {
                let moved = if self.small && self.pending == 0 && self.src.ktls().is_none() {
                    self.copy_small()
                } else {
                    splice_in(
                        self.src,
                        &mut self.slot,
                        self.cap - self.pending,
                        self.pending,
                    )
                };
                match moved {
                    Ok(In::Moved(0)) => {
                        self.eof = true;
                        progressed = true;
                    }
                    Ok(In::Moved(n)) => {
                        tracing::trace!(dir = dir.name(), n, "spliced in");
                        self.pending += n;
                        self.small = n < SMALL;
                        progressed = true;
                    }
                    Ok(In::Sent { sent, piped, full }) => {
                        tracing::trace!(dir = dir.name(), sent, piped, "copied small");
                        self.count(sent);
                        self.pending += piped;
                        self.small = !full;
                        progressed = true;
                    }
                    Ok(In::SendFailed(e)) => return Poll::Ready(Err(dir.write_err(e))),
                    Ok(In::PipeFull) => pipe_full = true,
                    Ok(In::NoPipe(e)) => {
                        tracing::warn!(dir = dir.name(), error = %e, "no pipe for splice: retrying");
                        self.slow = Some(Box::pin(async {
                            tokio::time::sleep(NO_PIPE_RETRY).await;
                            Ok(Slowed::Retry)
                        }));
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing to read and nothing in flight: give the pipe back.
                        if self.pending == 0 {
                            self.slot.release();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EINVAL) && self.src.ktls().is_some() =>
                    {
                        self.at_record = true;
                        progressed = true;
                    }
                    Err(e) => return Poll::Ready(Err(dir.read_err(e))),
                }
            }
            if self.pending > 0 {
                let Ok(pipe) = self.slot.get() else {
                    // Unreachable: a direction with bytes in flight holds its pipe.
                    return Poll::Ready(Err(dir.write_err(io::ErrorKind::BrokenPipe.into())));
                };
                let (dst, pending) = (self.dst, self.pending);
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pipe.reader(), dst.fd(), pending)
                }) {
                    Ok(0) => {
                        return Poll::Ready(Err(dir.write_err(io::ErrorKind::WriteZero.into())));
                    }
                    Ok(m) => {
                        tracing::trace!(dir = dir.name(), m, "spliced out");
                        self.pending -= m;
                        progressed = true;
                        self.count(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e) => return Poll::Ready(Err(dir.write_err(e))),
                }
            }
            if self.eof && self.pending == 0 {
                // Everything read has been written: pass the half-close on.
                self.slot.release();
                let dst = self.dst;
                if dst.ktls().is_some() {
                    self.slow = Some(Box::pin(async move {
                        let _ = dst.shutdown_write().await;
                        Ok(Slowed::Finished)
                    }));
                    continue;
                }
                let _ = socket2::SockRef::from(&dst.fd()).shutdown(Shutdown::Write);
                self.done = true;
                continue;
            }
            if progressed {
                continue;
            }
            let want_read = !self.eof && !self.at_record && self.pending < self.cap && !pipe_full;
            let want_write = self.pending > 0;
            if want_read {
                match self.src.poll_ready(cx, Interest::READABLE) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(dir.read_err(e))),
                    Poll::Pending => {}
                }
            }
            if want_write {
                match self.dst.poll_ready(cx, Interest::WRITABLE) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(dir.write_err(e))),
                    Poll::Pending => {}
                }
            }
            if !want_read && !want_write {
                // Not reachable (a full pipe holds bytes to write), but
                // never spin or panic: try again on the next turn.
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
    }
}

/// Reads one record from a kTLS source with its type and forwards its
/// application data, if any (the rare, boxed step of [`Flow`]).
async fn forward_record(
    src: &TcpStream,
    dst: Sock<'_>,
    dir: Dir,
    mut state: RecvState,
    counters: &Counters,
) -> Result<Slowed, End> {
    let mut buf = vec![0u8; super::ktls::RECORD_BUF];
    match super::ktls::read_record(src, &mut buf, &mut state).await {
        Ok(super::ktls::Next::Data(n)) => {
            write_all(dst, &buf[..n])
                .await
                .map_err(|e| dir.write_err(e))?;
            dir.count(counters, n);
            Ok(Slowed::Record {
                state,
                eof: false,
                wrote: n,
            })
        }
        Ok(super::ktls::Next::Eof) => Ok(Slowed::Record {
            state,
            eof: true,
            wrote: 0,
        }),
        Ok(super::ktls::Next::Ignored) => Ok(Slowed::Record {
            state,
            eof: false,
            wrote: 0,
        }),
        Err(e) => Err(dir.read_err(e)),
    }
}

#[cfg(test)]
mod tests;
