//! Userspace bidirectional copy with TCP half-close, backpressure (a read
//! waits for the previous write to finish) and an idle timeout. Each
//! direction's buffer exists only while bytes move ([`super::lazybuf`]);
//! a direction holding none reads into the thread's scratch buffer and
//! writes straight on, keeping (in a buffer of its own) only what the
//! writer cannot take now. Keystrokes and small screen updates, and
//! streams whose reader keeps up, so never allocate a buffer at all.

use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};

use super::lazybuf::{LazyBuf, poll_scratch};
use super::{Counters, Dir, End, idle_watch};

const BUF: usize = 32 * 1024;

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

/// What a read through the scratch buffer did.
enum Through {
    /// `n` bytes read (0: end of stream), `taken` of them written on.
    Read { n: usize, taken: usize },
    /// Writing them on failed.
    WriteFailed(std::io::Error),
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
        self.dir.read_err(e)
    }

    fn write_err(&self, e: std::io::Error) -> End {
        self.dir.write_err(e)
    }

    /// A read error, or the end of stream it stands for: a TLS compute
    /// peer that closes without close_notify (QEMU does) after the console
    /// ran ends normally; before any byte it is a failure (e.g. QEMU
    /// refusing our client certificate).
    fn eof_or_err(&self, e: std::io::Error, counters: &Counters) -> Result<(), End> {
        if e.kind() == std::io::ErrorKind::UnexpectedEof
            && matches!(self.dir, Dir::Down)
            && counters.down_bytes() > 0
        {
            Ok(())
        } else {
            Err(self.read_err(e))
        }
    }

    fn count(&self, counters: &Counters, n: usize) {
        self.dir.count(counters, n);
    }

    /// With no buffer held: one read into the thread's scratch buffer,
    /// written on at once as far as `w` takes it; what it does not take
    /// goes into a buffer of this direction's own.
    fn poll_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<std::io::Result<Through>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let buf = &mut self.buf;
        poll_scratch(r, cx, BUF, |got, cx| {
            let mut taken = 0;
            while taken < got.len() {
                match w.as_mut().poll_write(cx, &got[taken..]) {
                    Poll::Ready(Ok(0)) => {
                        return Through::WriteFailed(std::io::ErrorKind::WriteZero.into());
                    }
                    Poll::Ready(Ok(m)) => taken += m,
                    Poll::Ready(Err(e)) => return Through::WriteFailed(e),
                    Poll::Pending => break,
                }
            }
            if taken < got.len() {
                buf.keep(&got[taken..]);
            }
            Through::Read {
                n: got.len(),
                taken,
            }
        })
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
                St::Read if !self.buf.is_allocated() => {
                    let read = ready!(self.poll_through(cx, r.as_mut(), w.as_mut()));
                    let (n, taken) = match read {
                        Ok(Through::Read { n, taken }) => (n, taken),
                        Ok(Through::WriteFailed(e)) => return Poll::Ready(Err(self.write_err(e))),
                        Err(e) => match self.eof_or_err(e, counters) {
                            Ok(()) => (0, 0),
                            Err(end) => return Poll::Ready(Err(end)),
                        },
                    };
                    tracing::trace!(dir = self.dir.name(), n, taken, "read and written");
                    self.st = if n == 0 {
                        St::Shutdown
                    } else if taken == n {
                        St::Flush { n }
                    } else {
                        // The rest waits in a buffer of its own.
                        self.count(counters, taken);
                        St::Write {
                            n: n - taken,
                            off: 0,
                        }
                    };
                }
                St::Read => {
                    let n = match ready!(self.buf.poll_read(r.as_mut(), cx, &mut self.armed)) {
                        Ok(n) => n,
                        // A TLS compute peer that closes without close_notify
                        // (QEMU does) after the console ran: an ordinary end.
                        // Before any byte it is a failure (e.g. QEMU refusing
                        // our client certificate).
                        Err(e) => match self.eof_or_err(e, counters) {
                            Ok(()) => 0,
                            Err(end) => return Poll::Ready(Err(end)),
                        },
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
                    self.count(counters, n);
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

    /// A writer that takes at most `room` bytes until opened, then all.
    struct Narrow {
        got: Vec<u8>,
        room: usize,
        waker: Option<std::task::Waker>,
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.room == 0 {
                self.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Bytes the writer takes at once never enter a buffer of the
    /// direction's own; what it cannot take waits in one, in order, and
    /// the counters see every byte once.
    #[tokio::test]
    async fn bytes_go_straight_through_and_only_the_rest_is_kept() {
        use tokio::io::AsyncWriteExt as _;
        let (mut src, mut r) = tokio::io::duplex(1 << 16);
        let mut w = Narrow {
            got: Vec::new(),
            room: usize::MAX,
            waker: None,
        };
        let counters = Counters::new();
        let mut half = Half::new(Dir::Up);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        src.write_all(b"keystroke").await.unwrap();
        let polled = half.poll(&mut cx, Pin::new(&mut r), Pin::new(&mut w), &counters);
        assert!(polled.is_pending(), "waiting for the next read");
        assert_eq!(w.got, b"keystroke");
        assert!(
            !half.buf.is_allocated(),
            "no buffer for what went straight through"
        );
        assert_eq!(counters.up_bytes(), 9);
        // A writer that takes 4 bytes, then nothing for now.
        w.room = 4;
        src.write_all(b"screen update").await.unwrap();
        let polled = half.poll(&mut cx, Pin::new(&mut r), Pin::new(&mut w), &counters);
        assert!(polled.is_pending());
        assert_eq!(w.got, b"keystrokescre");
        assert!(half.buf.is_allocated(), "the rest waits in a buffer");
        assert_eq!(counters.up_bytes(), 13, "what was written is counted");
        w.room = usize::MAX;
        src.write_all(b"!").await.unwrap();
        drop(src);
        let polled = half.poll(&mut cx, Pin::new(&mut r), Pin::new(&mut w), &counters);
        assert!(matches!(polled, Poll::Ready(Ok(()))), "ends at EOF");
        assert_eq!(w.got, b"keystrokescreen update!");
        assert_eq!(counters.up_bytes(), 23);
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
