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
pub(super) enum Sock<'a> {
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
    pub(super) fn fd(self) -> BorrowedFd<'a> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    pub(super) async fn ready(self, interest: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.ready(interest).await.map(drop),
            Sock::Unix(s) => s.ready(interest).await.map(drop),
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
pub(super) async fn splice_ready(
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

/// Both raw data paths under the same tests: random payloads both ways,
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
    }

    const PATHS: [Path; 2] = [Path::Copy, Path::Splice];

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
        stop: watch::Sender<bool>,
    }

    /// tenant <-> [proxy_t | path | proxy_c] <-> compute
    async fn start(path: Path, idle: Option<Duration>) -> Running {
        let (tenant, proxy_t) = tcp_pair().await;
        let (proxy_c, compute) = tcp_pair().await;
        let (stop, rx) = watch::channel(false);
        let counters = Arc::new(Counters::new());
        let c = Arc::clone(&counters);
        let end = tokio::spawn(async move {
            match path {
                Path::Copy => {
                    super::super::copy::bidirectional(proxy_t, proxy_c, &c, idle, rx).await
                }
                Path::Splice => {
                    Splicer::new()
                        .unwrap()
                        .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                        .await
                }
            }
        });
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
            r.stop.send(true).unwrap();
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
        let (_stop, rx) = watch::channel(false);
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
