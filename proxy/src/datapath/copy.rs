//! Userspace bidirectional copy with TCP half-close, backpressure (a read
//! waits for the previous write to finish) and an idle timeout. Each
//! direction's buffer exists only while bytes move ([`super::lazybuf`]).

use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};

use super::lazybuf::LazyBuf;
use super::{Counters, End, idle_watch};

const BUF: usize = 32 * 1024;

enum Dir {
    Up,
    Down,
}

impl Dir {
    fn name(&self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// Where one direction is.
#[derive(Debug, Clone, Copy)]
enum St {
    Read,
    /// Writing the `n` bytes read, `off` of them written.
    Write {
        n: usize,
        off: usize,
    },
    /// Flushing after writing `n` bytes: a TLS writer (rustls) may keep
    /// bytes buffered after its writes return when its socket would block,
    /// and they would wait for the next chunk (a stalled console until the
    /// tenant sends again).
    Flush {
        n: usize,
    },
    /// End of stream read: passing the half-close on.
    Shutdown,
    Done,
}

/// One direction, polled by hand (no nested futures): an idle direction
/// is its state and an unallocated [`LazyBuf`].
struct Half {
    dir: Dir,
    buf: LazyBuf,
    /// The current read has started its idle timer.
    armed: bool,
    st: St,
}

impl Half {
    fn new(dir: Dir) -> Self {
        Self {
            dir,
            buf: LazyBuf::new(0, BUF),
            armed: false,
            st: St::Read,
        }
    }

    fn read_err(&self, e: std::io::Error) -> End {
        match self.dir {
            Dir::Up => End::TenantIo(e.to_string()),
            Dir::Down => End::ComputeIo(e.to_string()),
        }
    }

    fn write_err(&self, e: std::io::Error) -> End {
        match self.dir {
            Dir::Up => End::ComputeIo(e.to_string()),
            Dir::Down => End::TenantIo(e.to_string()),
        }
    }

    /// Moves bytes from `r` to `w` until one of them is not ready;
    /// `Ready(Ok)` once the direction is done (and on every poll after).
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        counters: &Counters,
    ) -> Poll<Result<(), End>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self.st {
                St::Read => {
                    let n = match ready!(self.buf.poll_read(r.as_mut(), cx, &mut self.armed)) {
                        Ok(n) => n,
                        // A TLS compute peer that closes without close_notify
                        // (QEMU does) after the console ran: an ordinary end.
                        // Before any byte it is a failure (e.g. QEMU refusing
                        // our client certificate).
                        Err(e)
                            if e.kind() == std::io::ErrorKind::UnexpectedEof
                                && matches!(self.dir, Dir::Down)
                                && counters.down_bytes() > 0 =>
                        {
                            0
                        }
                        Err(e) => return Poll::Ready(Err(self.read_err(e))),
                    };
                    self.armed = false;
                    tracing::trace!(dir = self.dir.name(), n, "read");
                    self.st = if n == 0 {
                        St::Shutdown
                    } else {
                        St::Write { n, off: 0 }
                    };
                }
                St::Write { n, off } => {
                    let data = &self.buf.data(n)[off..];
                    match ready!(w.as_mut().poll_write(cx, data)) {
                        Ok(0) => {
                            return Poll::Ready(Err(
                                self.write_err(std::io::ErrorKind::WriteZero.into())
                            ));
                        }
                        Ok(m) if off + m >= n => self.st = St::Flush { n },
                        Ok(m) => self.st = St::Write { n, off: off + m },
                        Err(e) => return Poll::Ready(Err(self.write_err(e))),
                    }
                }
                St::Flush { n } => {
                    if let Err(e) = ready!(w.as_mut().poll_flush(cx)) {
                        return Poll::Ready(Err(self.write_err(e)));
                    }
                    tracing::trace!(dir = self.dir.name(), n, "written");
                    match self.dir {
                        Dir::Up => counters.add_up(n),
                        Dir::Down => counters.add_down(n),
                    }
                    self.st = St::Read;
                }
                St::Shutdown => {
                    // Pass the half-close on; the other direction keeps flowing.
                    let _ = ready!(w.as_mut().poll_shutdown(cx));
                    self.st = St::Done;
                }
                St::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Copies both ways between `tenant` and `compute` until both directions
/// reach EOF, one side fails (the first error ends the session), the
/// session idles out or shutdown is signalled.
pub async fn bidirectional<T, C>(
    tenant: T,
    compute: C,
    counters: &Counters,
    idle: Option<Duration>,
    shutdown: super::Stop,
) -> End
where
    T: AsyncRead + AsyncWrite,
    C: AsyncRead + AsyncWrite,
{
    let mut tenant = std::pin::pin!(tenant);
    let mut compute = std::pin::pin!(compute);
    let (mut up, mut down) = (Half::new(Dir::Up), Half::new(Dir::Down));
    // Both directions in one poll: each stream is read by one direction
    // and written by the other, from this one task.
    let both = std::future::poll_fn(|cx| {
        let u = up.poll(cx, tenant.as_mut(), compute.as_mut(), counters);
        if let Poll::Ready(Err(end)) = u {
            return Poll::Ready(end);
        }
        let d = down.poll(cx, compute.as_mut(), tenant.as_mut(), counters);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn half_close_passes_and_other_direction_continues() {
        let (mut tenant, proxy_t) = pair().await;
        let (proxy_c, mut compute) = pair().await;
        let rx = crate::datapath::Stop::new();
        let counters = std::sync::Arc::new(Counters::new());
        let c2 = counters.clone();
        let task =
            tokio::spawn(async move { bidirectional(proxy_t, proxy_c, &c2, None, rx).await });
        tenant.write_all(b"hello").await.unwrap();
        tenant.shutdown().await.unwrap();
        let mut got = Vec::new();
        compute.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The compute side can still answer after the tenant's half-close.
        compute.write_all(b"world").await.unwrap();
        compute.shutdown().await.unwrap();
        let mut back = Vec::new();
        tenant.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world");
        assert_eq!(task.await.unwrap(), End::Closed);
        assert_eq!((counters.up_bytes(), counters.down_bytes()), (5, 5));
    }

    #[tokio::test]
    async fn idle_timeout_ends_session() {
        let (_tenant, proxy_t) = pair().await;
        let (proxy_c, _compute) = pair().await;
        let rx = crate::datapath::Stop::new();
        let c = Counters::new();
        let end = bidirectional(proxy_t, proxy_c, &c, Some(Duration::from_millis(100)), rx).await;
        assert_eq!(end, End::IdleTimeout);
    }
}
