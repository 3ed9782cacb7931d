//! splice(2) data path for plaintext streams: each direction moves bytes
//! socket -> pipe -> socket inside the kernel, never through a userspace
//! buffer. Applies only when both legs are plain TCP or UNIX sockets (a
//! rustls leg has to be decrypted in userspace).
//!
//! Same contract as [`super::copy`]: counters, half-close (the peer gets
//! `shutdown(SHUT_WR)` at EOF once the pipe is drained, the other
//! direction keeps flowing), backpressure (a direction reads only when its
//! pipe is empty, so a slow reader stops the writer), idle timeout and
//! shutdown. The first error on either leg ends the session.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;

use super::{Counters, End, idle_watch};
use crate::sys::pipe::{Pipe, splice};

/// Capacity asked for each pipe. Pages are allocated only when used;
/// the kernel keeps the default (64 KiB) if it refuses this.
pub const PIPE_SIZE: usize = 1 << 20;

/// A plain socket one side of a spliced session runs on.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

#[derive(Debug, Clone, Copy)]
enum Sock<'a> {
    Tcp(&'a TcpStream),
    Unix(&'a UnixStream),
}

impl Socket {
    fn borrow(&self) -> Sock<'_> {
        match self {
            Socket::Tcp(s) => Sock::Tcp(s),
            Socket::Unix(s) => Sock::Unix(s),
        }
    }
}

impl<'a> Sock<'a> {
    fn fd(self) -> BorrowedFd<'a> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    async fn ready(self, interest: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.ready(interest).await.map(drop),
            Sock::Unix(s) => s.ready(interest).await.map(drop),
        }
    }

    /// Runs `f` if tokio thinks the socket is ready; a `WouldBlock` from
    /// `f` clears that readiness so the next `ready` waits for epoll.
    fn try_io<R>(self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Sock::Tcp(s) => s.try_io(interest, f),
            Sock::Unix(s) => s.try_io(interest, f),
        }
    }

    fn shutdown_write(self) -> io::Result<()> {
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

/// The two pipes of a spliced session, made before the session commits to
/// this path so that running out of descriptors falls back to the copy.
#[derive(Debug)]
pub struct Splicer {
    up: Pipe,
    down: Pipe,
}

impl Splicer {
    /// Creates both pipes.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            up: Pipe::new(PIPE_SIZE)?,
            down: Pipe::new(PIPE_SIZE)?,
        })
    }

    /// Splices both ways until both directions reach EOF, one side fails,
    /// the session idles out or shutdown is signalled.
    pub async fn run(
        self,
        tenant: Socket,
        compute: Socket,
        counters: &Counters,
        idle: Option<Duration>,
        mut shutdown: watch::Receiver<bool>,
    ) -> End {
        let (t, c) = (tenant.borrow(), compute.borrow());
        let up = pump(t, c, &self.up, Dir::Up, counters);
        let down = pump(c, t, &self.down, Dir::Down, counters);
        let both = async {
            match tokio::try_join!(up, down) {
                Ok(((), ())) => End::Closed,
                Err(e) => e,
            }
        };
        tokio::select! {
            end = both => end,
            () = idle_watch(counters, idle) => End::IdleTimeout,
            () = crate::datapath::shutdown_signalled(&mut shutdown) => End::Shutdown,
        }
    }
}

/// Waits for `interest` on `sock` and runs one splice call.
async fn splice_ready(
    sock: Sock<'_>,
    interest: Interest,
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    loop {
        sock.ready(interest).await?;
        match sock.try_io(interest, || splice(from, to, len)) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One direction: fill the (empty) pipe from `src`, drain it into `dst`.
async fn pump(
    src: Sock<'_>,
    dst: Sock<'_>,
    pipe: &Pipe,
    dir: Dir,
    counters: &Counters,
) -> Result<(), End> {
    loop {
        let n = splice_ready(
            src,
            Interest::READABLE,
            src.fd(),
            pipe.writer(),
            pipe.capacity(),
        )
        .await
        .map_err(|e| dir.read_err(e))?;
        tracing::trace!(dir = dir.name(), n, "spliced in");
        if n == 0 {
            // The pipe is empty here: everything read has been written.
            let _ = dst.shutdown_write();
            return Ok(());
        }
        let mut pending = n;
        while pending > 0 {
            let m = splice_ready(dst, Interest::WRITABLE, pipe.reader(), dst.fd(), pending)
                .await
                .map_err(|e| dir.write_err(e))?;
            if m == 0 {
                return Err(dir.write_err(io::ErrorKind::WriteZero.into()));
            }
            pending -= m;
            match dir {
                Dir::Up => counters.add_up(m),
                Dir::Down => counters.add_down(m),
            }
        }
        tracing::trace!(dir = dir.name(), n, "spliced out");
    }
}
