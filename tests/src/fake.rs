//! Scripted peers, only for conditions a real peer never produces: many
//! concurrent compute sessions (one QEMU is one console), and a compute
//! address whose dial never completes.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;

/// A TCP echo server on 127.0.0.1 standing in for many consoles at once.
#[derive(Debug)]
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoServer {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address with nothing listening (connections are refused).
pub fn dead_port() -> anyhow::Result<SocketAddr> {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let a = l.local_addr()?;
    drop(l);
    Ok(a)
}

/// A loopback listener that never accepts, with backlog 0 and its accept
/// queue already full: Linux then drops further SYNs silently, so a dial to
/// it neither succeeds nor is refused until the dialer gives up.
#[derive(Debug)]
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: Socket,
    _fillers: Vec<Socket>,
}

impl Blackhole {
    pub fn new() -> anyhow::Result<Self> {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        listener.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        listener.listen(0)?;
        let addr = listener
            .local_addr()?
            .as_socket()
            .ok_or_else(|| anyhow::anyhow!("no address"))?;
        let mut fillers = Vec::new();
        // Fill the queue: connect until one connect no longer completes.
        for _ in 0..16 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            match s.connect_timeout(&addr.into(), Duration::from_millis(500)) {
                Ok(()) => fillers.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Ok(Self {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("could not fill the accept queue of {addr}")
    }

    /// Checks the blackhole still swallows SYNs (a dial times out).
    pub fn verify(&self) -> anyhow::Result<()> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        match s.connect_timeout(&self.addr.into(), Duration::from_millis(300)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
            other => anyhow::bail!("blackhole dial did not time out: {other:?}"),
        }
    }
}

/// A compute side that accepts, reads whatever the tenant sends first, then
/// resets the connection (RST via SO_LINGER 0): a fault QEMU never shows.
#[derive(Debug)]
pub struct ResetAfterRead {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ResetAfterRead {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    drop(s);
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for ResetAfterRead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One round trip through a tunnel to an [`EchoServer`].
pub async fn echo_ok<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    crate::within("echo", s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"ping");
}
