//! Userspace bidirectional copy with TCP half-close, backpressure (a read
//! waits for the previous write to finish) and an idle timeout. Each
//! direction's buffer exists only while bytes move ([`super::lazybuf`]).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::watch;

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

async fn pump<R, W>(mut r: R, mut w: W, dir: Dir, counters: &Counters) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = LazyBuf::new(0, BUF);
    loop {
        let n = match buf.read(&mut r).await {
            Ok(n) => n,
            // A TLS compute peer that closes without close_notify (QEMU
            // does) after the console ran: an ordinary end. Before any byte
            // it is a failure (e.g. QEMU refusing our client certificate).
            Err(e)
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    && matches!(dir, Dir::Down)
                    && counters.down_bytes() > 0 =>
            {
                0
            }
            Err(e) => {
                return Err(match dir {
                    Dir::Up => End::TenantIo(e.to_string()),
                    Dir::Down => End::ComputeIo(e.to_string()),
                });
            }
        };
        tracing::trace!(dir = dir.name(), n, "read");
        if n == 0 {
            // Pass the half-close on; the other direction keeps flowing.
            let _ = w.shutdown().await;
            return Ok(());
        }
        // A TLS writer (rustls) may keep bytes buffered after `write_all`
        // returns when its socket would block: flush, or they wait for the
        // next chunk (a stalled console until the tenant sends again).
        let written = match w.write_all(buf.data(n)).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            return Err(match dir {
                Dir::Up => End::ComputeIo(e.to_string()),
                Dir::Down => End::TenantIo(e.to_string()),
            });
        }
        tracing::trace!(dir = dir.name(), n, "written");
        match dir {
            Dir::Up => counters.add_up(n),
            Dir::Down => counters.add_down(n),
        }
    }
}

/// Copies both ways between `tenant` and `compute` until both directions
/// reach EOF, one side fails, the session idles out or shutdown is signalled.
pub async fn bidirectional<T, C>(
    tenant: T,
    compute: C,
    counters: &Counters,
    idle: Option<Duration>,
    mut shutdown: watch::Receiver<bool>,
) -> End
where
    T: AsyncRead + AsyncWrite,
    C: AsyncRead + AsyncWrite,
{
    let (tr, tw) = tokio::io::split(tenant);
    let (cr, cw) = tokio::io::split(compute);
    let up = pump(tr, cw, Dir::Up, counters);
    let down = pump(cr, tw, Dir::Down, counters);
    let both = async {
        let (u, d) = tokio::join!(up, down);
        u.and(d).err().unwrap_or(End::Closed)
    };
    tokio::select! {
        end = both => end,
        () = idle_watch(counters, idle) => End::IdleTimeout,
        () = crate::datapath::shutdown_signalled(&mut shutdown) => End::Shutdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
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
        let (_tx, rx) = watch::channel(false);
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
        let (_tx, rx) = watch::channel(false);
        let c = Counters::new();
        let end = bidirectional(proxy_t, proxy_c, &c, Some(Duration::from_millis(100)), rx).await;
        assert_eq!(end, End::IdleTimeout);
    }
}
