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

use super::pipes::PipeSlot;
use super::{Counters, End, idle_watch};
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
    Ktls(TcpStream),
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
            Socket::Ktls(s) => Sock::Ktls(s),
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

#[derive(Debug, Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }

    /// The error of the side we read from.
    fn read_err(self, e: io::Error) -> End {
        match self {
            Dir::Up => End::TenantIo(e.to_string()),
            Dir::Down => End::ComputeIo(e.to_string()),
        }
    }

    /// The error of the side we write to.
    fn write_err(self, e: io::Error) -> End {
        match self {
            Dir::Up => End::ComputeIo(e.to_string()),
            Dir::Down => End::TenantIo(e.to_string()),
        }
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
        tenant: Socket,
        compute: Socket,
        counters: &Counters,
        idle: Option<Duration>,
        shutdown: super::Stop,
    ) -> End {
        let (t, c) = (tenant.borrow(), compute.borrow());
        let mut up = match Flow::new(t, c, Dir::Up, self.size, counters) {
            Ok(f) => f,
            Err(end) => return end,
        };
        let mut down = match Flow::new(c, t, Dir::Down, self.size, counters) {
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
    /// A kTLS record was consumed (`eof`: it ended that side's stream);
    /// the handshake carry comes back.
    Record {
        carry: super::ktls::HandshakeCarry,
        eof: bool,
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
    carry: super::ktls::HandshakeCarry,
    slow: Option<Slow<'a>>,
}

impl<'a> Flow<'a> {
    fn new(
        src: Sock<'a>,
        dst: Sock<'a>,
        dir: Dir,
        size: usize,
        counters: &'a Counters,
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
            carry: Default::default(),
            slow: None,
        })
    }

    fn count(&self, n: usize) {
        match self.dir {
            Dir::Up => self.counters.add_up(n),
            Dir::Down => self.counters.add_down(n),
        }
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
                    Slowed::Record { carry, eof } => {
                        self.carry = carry;
                        self.eof |= eof;
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
                let carry = std::mem::take(&mut self.carry);
                self.slow = Some(Box::pin(forward_record(
                    s,
                    self.dst,
                    dir,
                    carry,
                    self.counters,
                )));
                continue;
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
    mut carry: super::ktls::HandshakeCarry,
    counters: &Counters,
) -> Result<Slowed, End> {
    let mut buf = vec![0u8; super::ktls::RECORD_BUF];
    match super::ktls::read_record(src, &mut buf, &mut carry).await {
        Ok(super::ktls::Next::Data(n)) => {
            write_all(dst, &buf[..n])
                .await
                .map_err(|e| dir.write_err(e))?;
            match dir {
                Dir::Up => counters.add_up(n),
                Dir::Down => counters.add_down(n),
            }
            Ok(Slowed::Record { carry, eof: false })
        }
        Ok(super::ktls::Next::Eof) => Ok(Slowed::Record { carry, eof: true }),
        Ok(super::ktls::Next::Ignored) => Ok(Slowed::Record { carry, eof: false }),
        Err(e) => Err(dir.read_err(e)),
    }
}

/// Every raw data path under the same tests (copy, splice, io_uring with
/// IORING_OP_SPLICE and with recv/send): random payloads both ways,
/// half-close, resets, slow readers and many sessions at once.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::RngCore as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Path {
        Copy,
        Splice,
        /// io_uring, IORING_OP_SPLICE (splice if io_uring is unavailable).
        Uring,
        /// io_uring forced to recv/send (splice if unavailable).
        UringRecvSend,
        /// The sockmap redirect; where the program cannot load, the
        /// fallback the ladder takes (splice) after printing `skipped:`.
        Sockmap,
    }

    const PATHS: [Path; 5] = [
        Path::Copy,
        Path::Splice,
        Path::Uring,
        Path::UringRecvSend,
        Path::Sockmap,
    ];

    /// The sockmap program, loaded once per test process (test-only use of
    /// the control plane's loader: the pump itself never sees it).
    fn sockmap() -> Option<Arc<crate::control::sockmap::Sockmap>> {
        static LOADED: std::sync::OnceLock<Result<Arc<crate::control::sockmap::Sockmap>, String>> =
            std::sync::OnceLock::new();
        match LOADED
            .get_or_init(|| crate::control::sockmap::Sockmap::load().map_err(|e| e.to_string()))
        {
            Ok(s) => Some(Arc::clone(s)),
            Err(e) => {
                println!("skipped: sockmap cannot load here ({e}); testing its fallback, splice");
                None
            }
        }
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    struct Running {
        tenant: TcpStream,
        compute: TcpStream,
        counters: Arc<Counters>,
        end: tokio::task::JoinHandle<End>,
        stop: crate::datapath::Stop,
    }

    /// tenant <-> [proxy_t | path | proxy_c] <-> compute
    async fn start(path: Path, idle: Option<Duration>) -> Running {
        start_with(path, idle, PIPE_SIZE).await
    }

    async fn start_with(path: Path, idle: Option<Duration>, pipe: usize) -> Running {
        let (tenant, proxy_t) = tcp_pair().await;
        let (proxy_c, compute) = tcp_pair().await;
        let stop = crate::datapath::Stop::new();
        let rx = stop.clone();
        let counters = Arc::new(Counters::new());
        let c = Arc::clone(&counters);
        // Sockmap: the test starts once the sockets are in the maps (a FIN
        // before that makes the pump decline, tested on its own).
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
        let end = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let mut go = move || {
                if let Some(t) = ready_tx.take() {
                    let _ = t.send(());
                }
            };
            if !matches!(path, Path::Sockmap) {
                go();
            }
            match path {
                Path::Copy => {
                    super::super::copy::bidirectional(proxy_t, proxy_c, &c, idle, rx).await
                }
                Path::Splice => {
                    Splicer::with_pipe_size(pipe)
                        .unwrap()
                        .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                        .await
                }
                Path::Uring | Path::UringRecvSend => {
                    use super::super::uring::{Flavor, Uring};
                    let flavor = match path {
                        Path::Uring => Flavor::Splice,
                        _ => Flavor::RecvSend,
                    };
                    match Uring::with(flavor, pipe) {
                        Ok(u) => {
                            u.run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                                .await
                        }
                        Err(why) => {
                            println!("skipped: {path:?}: {why}; testing the splice fallback");
                            Splicer::with_pipe_size(pipe)
                                .unwrap()
                                .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                                .await
                        }
                    }
                }
                Path::Sockmap => {
                    let (t, pc) = match sockmap() {
                        Some(sm) => {
                            let r = super::super::sockmap::run(
                                sm.as_ref(),
                                proxy_t,
                                proxy_c,
                                &c,
                                idle,
                                rx.clone(),
                                &mut go,
                            )
                            .await;
                            match r {
                                Ok(end) => return end,
                                // As the ladder does: splice goes on.
                                Err(d) => {
                                    println!("sockmap declined ({}): splice", d.reason);
                                    (d.tenant, d.compute)
                                }
                            }
                        }
                        None => (proxy_t, proxy_c),
                    };
                    go();
                    Splicer::with_pipe_size(pipe)
                        .unwrap()
                        .run(Socket::Tcp(t), Socket::Tcp(pc), &c, idle, rx)
                        .await
                }
            }
        });
        let _ = ready.await;
        Running {
            tenant,
            compute,
            counters,
            end,
            stop,
        }
    }

    fn random(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rng().fill_bytes(&mut v);
        v
    }

    /// Writes `data` then half-closes, while reading everything the other
    /// way; returns what was read.
    async fn exchange(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(write, read);
        got
    }

    #[tokio::test]
    async fn large_random_payloads_both_ways_with_half_close() {
        for path in PATHS {
            let r = start(path, None).await;
            let up = random(8 << 20);
            let down = random(6 << 20 | 12345);
            let (got_down, got_up) = tokio::join!(
                exchange(r.tenant, up.clone()),
                exchange(r.compute, down.clone())
            );
            assert!(got_up == up, "{path:?}: up bytes differ");
            assert!(got_down == down, "{path:?}: down bytes differ");
            assert_eq!(r.end.await.unwrap(), End::Closed, "{path:?}");
            assert_eq!(r.counters.up_bytes(), up.len() as u64);
            assert_eq!(r.counters.down_bytes(), down.len() as u64);
        }
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        for path in PATHS {
            let mut r = start(path, None).await;
            r.tenant.write_all(b"request").await.unwrap();
            r.tenant.shutdown().await.unwrap();
            let mut got = Vec::new();
            r.compute.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"request", "{path:?}");
            // Long after the tenant's FIN, the compute side still answers.
            let answer = random(3 << 20);
            r.compute.write_all(&answer).await.unwrap();
            r.compute.shutdown().await.unwrap();
            let mut back = Vec::new();
            r.tenant.read_to_end(&mut back).await.unwrap();
            assert!(back == answer, "{path:?}");
            assert_eq!(r.end.await.unwrap(), End::Closed);
        }
    }

    #[tokio::test]
    async fn slow_reader_gets_everything() {
        for path in PATHS {
            let mut r = start(path, None).await;
            let data = random(4 << 20);
            let d2 = data.clone();
            let mut compute = r.compute;
            let writer = tokio::spawn(async move {
                compute.write_all(&d2).await.unwrap();
                compute.shutdown().await.unwrap();
                compute
            });
            // Read in small sips with pauses: the proxy must hold back
            // (socket buffers and the pipe fill up) without losing bytes.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let mut sips = 0u32;
            loop {
                let n = r.tenant.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                sips += 1;
                if sips.is_multiple_of(64) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            assert!(got == data, "{path:?}");
            drop(writer.await.unwrap());
            r.tenant.shutdown().await.unwrap();
            assert_eq!(r.end.await.unwrap(), End::Closed);
        }
    }

    /// Interactive traffic: messages of every size around the copy/splice
    /// switch ([`SMALL`]), each answered before the next, then a burst
    /// both ways: the bytes arrive whole and in order whichever way each
    /// message took, and the counters add up.
    #[tokio::test]
    async fn messages_around_the_small_size_keep_their_order() {
        for path in PATHS {
            let mut r = start(path, None).await;
            r.tenant.set_nodelay(true).unwrap();
            r.compute.set_nodelay(true).unwrap();
            let sizes = [
                1,
                7,
                64,
                SMALL - 1,
                SMALL,
                SMALL + 1,
                3 * SMALL,
                100_000,
                5,
                SMALL,
                1,
            ];
            let (mut up, mut down) = (0u64, 0u64);
            for (i, &n) in sizes.iter().enumerate() {
                let msg = random(n);
                r.tenant.write_all(&msg).await.unwrap();
                let mut got = vec![0u8; n];
                r.compute.read_exact(&mut got).await.unwrap();
                assert!(got == msg, "{path:?}: message {i} ({n} bytes) up");
                let back = random(n + i);
                r.compute.write_all(&back).await.unwrap();
                let mut got = vec![0u8; back.len()];
                r.tenant.read_exact(&mut got).await.unwrap();
                assert!(
                    got == back,
                    "{path:?}: answer {i} ({} bytes) down",
                    back.len()
                );
                up += n as u64;
                down += back.len() as u64;
            }
            let burst_up = random(2 << 20);
            let burst_down = random(3 << 20 | 77);
            let (got_down, got_up) = tokio::join!(
                exchange(r.tenant, burst_up.clone()),
                exchange(r.compute, burst_down.clone())
            );
            assert!(got_up == burst_up, "{path:?}: burst up");
            assert!(got_down == burst_down, "{path:?}: burst down");
            assert_eq!(r.end.await.unwrap(), End::Closed, "{path:?}");
            assert_eq!(r.counters.up_bytes(), up + burst_up.len() as u64);
            assert_eq!(r.counters.down_bytes(), down + burst_down.len() as u64);
        }
    }

    /// A small message that the tenant cannot take whole (its buffers are
    /// full: it does not read) goes on through the pipe, ahead of what
    /// follows: nothing is lost or reordered when the copy meets a full
    /// destination.
    #[tokio::test]
    async fn a_small_message_a_full_tenant_cannot_take_waits_in_the_pipe() {
        let (mut tenant, proxy_t) = tcp_pair().await;
        let (proxy_c, mut compute) = tcp_pair().await;
        socket2::SockRef::from(&tenant)
            .set_recv_buffer_size(2048)
            .unwrap();
        socket2::SockRef::from(&proxy_t)
            .set_send_buffer_size(2048)
            .unwrap();
        compute.set_nodelay(true).unwrap();
        let counters = Arc::new(Counters::new());
        let c = Arc::clone(&counters);
        let stop = crate::datapath::Stop::new();
        let rx = stop.clone();
        let end = tokio::spawn(async move {
            Splicer::new()
                .unwrap()
                .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, None, rx)
                .await
        });
        let data = random(40 * 1000);
        // One message at a time, so each is read on its own (by copy).
        for m in data.chunks(1000) {
            compute.write_all(m).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        compute.shutdown().await.unwrap();
        let mut got = Vec::new();
        tenant.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "{} of {} bytes", got.len(), data.len());
        tenant.shutdown().await.unwrap();
        assert_eq!(end.await.unwrap(), End::Closed);
        assert_eq!(counters.down_bytes(), data.len() as u64);
        drop((compute, stop));
    }

    /// With a one-page pipe, a few bytes occupy its only slot long before
    /// its byte capacity is reached: the next splice in gets EAGAIN while
    /// the socket has data (what FIONREAD disambiguates). Tiny segments
    /// with a stalled reader must neither stall nor lose bytes.
    #[tokio::test]
    async fn tiny_segments_fill_pipe_slots_without_stalling() {
        for path in PATHS {
            let mut r = start_with(path, None, 4096).await;
            r.compute.set_nodelay(true).unwrap();
            let data = random(7 * 20_000);
            let d2 = data.clone();
            let mut compute = r.compute;
            let writer = tokio::spawn(async move {
                for chunk in d2.chunks(7) {
                    compute.write_all(chunk).await.unwrap();
                }
                compute.shutdown().await.unwrap();
                compute
            });
            // Let the segments pile up in the proxy before reading.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut got = Vec::new();
            r.tenant.read_to_end(&mut got).await.unwrap();
            assert!(
                got == data,
                "{path:?}: {} of {} bytes",
                got.len(),
                data.len()
            );
            drop(writer.await.unwrap());
            r.tenant.shutdown().await.unwrap();
            assert_eq!(r.end.await.unwrap(), End::Closed);
        }
    }

    /// An idle spliced session gives both pipes back to the pool (the
    /// test runtime has one thread, so they land in this thread's pool).
    #[tokio::test]
    async fn idle_session_holds_no_pipes() {
        let before = super::super::pipes::pooled();
        let mut r = start(Path::Splice, None).await;
        for round in 0..3u8 {
            r.tenant.write_all(&[round; 1000]).await.unwrap();
            let mut got = [0u8; 1000];
            r.compute.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 1000]);
            r.compute.write_all(&[round; 2000]).await.unwrap();
            let mut back = [0u8; 2000];
            r.tenant.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round; 2000]);
        }
        // Both directions are waiting for bytes now: no pipe held, and
        // the one or two pipes used are back in the pool.
        let mut held = usize::MAX;
        for _ in 0..200 {
            held = super::super::pipes::held();
            if held == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(held, 0, "an idle session holds no pipe");
        assert!(super::super::pipes::pooled() > before);
        // And the session still works after that, taking them again.
        r.tenant.write_all(b"again").await.unwrap();
        let mut got = [0u8; 5];
        r.compute.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
        drop(r.tenant);
        drop(r.compute);
        let _ = r.end.await.unwrap();
        let _ = r.stop;
    }

    /// EAGAIN from splice(socket -> pipe) means "socket empty" or "pipe
    /// slots full"; only the first may clear tokio's readiness.
    #[tokio::test]
    async fn full_pipe_is_told_apart_from_an_empty_socket() {
        let (mut a, b) = tcp_pair().await;
        let (c, mut d) = tcp_pair().await;
        let mut slot = PipeSlot::new(4096);
        let sock = Sock::Tcp(&b);
        async fn arrived(b: &TcpStream, n: usize) {
            while readable_bytes(b.as_fd()).unwrap() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            b.readable().await.unwrap();
        }
        a.write_all(b"1234567").await.unwrap();
        arrived(&b, 7).await;
        assert!(matches!(
            splice_in(sock, &mut slot, 4096, 0).unwrap(),
            In::Moved(7)
        ));
        a.write_all(b"abcdefg").await.unwrap();
        arrived(&b, 7).await;
        // One page, one slot, already holding 7 bytes.
        assert!(matches!(
            splice_in(sock, &mut slot, 4089, 7).unwrap(),
            In::PipeFull
        ));
        // Readiness was kept: no wait needed to move on once the pipe drains.
        assert_eq!(
            splice(slot.get().unwrap().reader(), c.as_fd(), 7).unwrap(),
            7
        );
        assert!(matches!(
            splice_in(sock, &mut slot, 4096, 0).unwrap(),
            In::Moved(7)
        ));
        assert_eq!(
            splice(slot.get().unwrap().reader(), c.as_fd(), 7).unwrap(),
            7
        );
        let e = splice_in(sock, &mut slot, 4096, 0).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let mut got = [0u8; 14];
        d.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"1234567abcdefg");
    }

    #[tokio::test]
    async fn compute_reset_ends_the_session_with_a_compute_error() {
        for path in PATHS {
            let mut r = start(path, None).await;
            r.tenant.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            r.compute.read_exact(&mut one).await.unwrap();
            // SO_LINGER 0: close sends RST.
            socket2::SockRef::from(&r.compute)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(r.compute);
            // Keep writing until the proxy notices.
            let end = loop {
                if r.end.is_finished() {
                    break r.end.await.unwrap();
                }
                if r.tenant.write_all(&[0u8; 65536]).await.is_err() {
                    break r.end.await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            assert!(matches!(end, End::ComputeIo(_)), "{path:?}: {end:?}");
            assert!(r.counters.up_bytes() >= 1);
        }
    }

    #[tokio::test]
    async fn tenant_reset_ends_the_session() {
        for path in PATHS {
            let r = start(path, None).await;
            socket2::SockRef::from(&r.tenant)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(r.tenant);
            let mut compute = r.compute;
            let end = loop {
                if r.end.is_finished() {
                    break r.end.await.unwrap();
                }
                if compute.write_all(&[0u8; 65536]).await.is_err() {
                    break r.end.await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            assert!(matches!(end, End::TenantIo(_)), "{path:?}: {end:?}");
        }
    }

    #[tokio::test]
    async fn idle_timeout_and_shutdown() {
        for path in PATHS {
            let r = start(path, Some(Duration::from_millis(100))).await;
            assert_eq!(r.end.await.unwrap(), End::IdleTimeout, "{path:?}");
            let r = start(path, None).await;
            r.stop.raise();
            assert_eq!(r.end.await.unwrap(), End::Shutdown, "{path:?}");
            drop((r.tenant, r.compute));
        }
    }

    #[tokio::test]
    async fn many_concurrent_sessions() {
        for path in PATHS {
            let mut tasks = Vec::new();
            for i in 0..64usize {
                tasks.push(tokio::spawn(async move {
                    let r = start(path, None).await;
                    let up = random(64 * 1024 + i * 977);
                    let down = random(128 * 1024 + i * 131);
                    let (got_down, got_up) = tokio::join!(
                        exchange(r.tenant, up.clone()),
                        exchange(r.compute, down.clone())
                    );
                    assert!(got_up == up && got_down == down, "{path:?} session {i}");
                    assert_eq!(r.end.await.unwrap(), End::Closed);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn splice_to_a_unix_socket_compute() {
        let dir = std::env::temp_dir().join(format!("cg-splice-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let proxy_c = UnixStream::connect(&path).await.unwrap();
        let (compute, _) = l.accept().await.unwrap();
        let (tenant, proxy_t) = tcp_pair().await;
        let rx = crate::datapath::Stop::new();
        let counters = Arc::new(Counters::new());
        let c = Arc::clone(&counters);
        let end = tokio::spawn(async move {
            Splicer::new()
                .unwrap()
                .run(Socket::Tcp(proxy_t), Socket::Unix(proxy_c), &c, None, rx)
                .await
        });
        let up = random(2 << 20);
        let down = random(3 << 20);
        let (mut cr, mut cw) = compute.into_split();
        let d2 = down.clone();
        let compute_side = async move {
            let mut got = Vec::new();
            let w = async {
                cw.write_all(&d2).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let r = cr.read_to_end(&mut got);
            let ((), n) = tokio::join!(w, r);
            n.unwrap();
            got
        };
        let (got_down, got_up) = tokio::join!(exchange(tenant, up.clone()), compute_side);
        assert!(got_up == up && got_down == down);
        assert_eq!(end.await.unwrap(), End::Closed);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
