//! The echo server: a compute-side stand-in for keystroke-sized round trips
//! (a serial console echoing what is typed) and for idle sessions that only
//! need to be held open, tens of thousands of them (a thread per client
//! would run into `kernel.pid_max` and `vm.max_map_count` first). One
//! thread with an event loop (a current-thread tokio runtime), TCP_NODELAY;
//! a plain client holds no buffer while it is idle. It may listen on
//! several addresses (a proxy dialling one address runs out of ephemeral
//! ports near 28,000 sessions, see [`crate::scale`]). It stops by itself
//! once no client has been connected for `idle_timeout`.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Largest read at once.
const BUF: usize = 16 * 1024;

/// A bound echo server.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<TcpListener>,
    idle_timeout: Duration,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// What the echo server did, for its closing line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub clients: u64,
    pub bytes: u64,
    /// Most clients connected at once.
    pub peak: u64,
}

#[derive(Debug, Default)]
struct Counters {
    clients: AtomicU64,
    active: AtomicU64,
    peak: AtomicU64,
    bytes: AtomicU64,
}

impl Server {
    pub fn bind(addr: &str, idle_timeout: Duration) -> Result<Self> {
        Self::bind_all(&[addr], idle_timeout)
    }

    /// Listens on every address (port 0 picks a different port for each).
    pub fn bind_all(addrs: &[&str], idle_timeout: Duration) -> Result<Self> {
        anyhow::ensure!(!addrs.is_empty(), "no address to listen on");
        let listeners = addrs
            .iter()
            .map(|a| {
                let l = TcpListener::bind(a).with_context(|| format!("binding {a}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            listeners,
            idle_timeout,
            tls: None,
        })
    }

    /// Speak TLS to every client.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// The first listening address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listeners[0].local_addr()?)
    }

    /// Every listening address, in the order bound.
    pub fn local_addrs(&self) -> Result<Vec<SocketAddr>> {
        Ok(self
            .listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<_>>()?)
    }

    /// Echoes for every client until none has been connected for the idle
    /// timeout.
    pub fn serve(self) -> Result<Totals> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the echo server's event loop")?;
        rt.block_on(self.run())
    }

    async fn run(self) -> Result<Totals> {
        let counters = Arc::new(Counters::default());
        let acceptor = self.tls.map(tokio_rustls::TlsAcceptor::from);
        for l in self.listeners {
            let listener = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(accept_loop(listener, acceptor.clone(), counters.clone()));
        }
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if counters.active.load(Ordering::SeqCst) > 0 {
                last = Instant::now();
            } else if last.elapsed() > self.idle_timeout {
                break;
            }
        }
        Ok(Totals {
            clients: counters.clients.load(Ordering::SeqCst),
            bytes: counters.bytes.load(Ordering::Relaxed),
            peak: counters.peak.load(Ordering::SeqCst),
        })
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    counters: Arc<Counters>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                counters.clients.fetch_add(1, Ordering::SeqCst);
                let now = counters.active.fetch_add(1, Ordering::SeqCst) + 1;
                counters.peak.fetch_max(now, Ordering::SeqCst);
                let (counters, tls) = (counters.clone(), tls.clone());
                tokio::spawn(async move {
                    let n = echo(stream, tls).await.unwrap_or(0);
                    counters.bytes.fetch_add(n, Ordering::Relaxed);
                    counters.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            // EMFILE and friends: wait for clients to go away.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Writes back everything read until the client closes; bytes echoed.
async fn echo(stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) -> io::Result<u64> {
    stream.set_nodelay(true)?;
    match tls {
        None => echo_plain(stream).await,
        Some(acceptor) => {
            let mut s = acceptor.accept(stream).await?;
            let mut buf = vec![0u8; BUF];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(total),
                    Ok(n) => {
                        s.write_all(&buf[..n]).await?;
                        s.flush().await?;
                        total += n as u64;
                    }
                    // A TLS peer that closes without close_notify.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(total),
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// The plain echo: waits for readability without a buffer, so an idle
/// client costs its socket and a small task.
async fn echo_plain(mut s: TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        s.readable().await?;
        let mut buf = vec![0u8; BUF];
        match s.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                s.write_all(&buf[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::thread;

    #[test]
    fn echoes_and_stops_when_idle() {
        let server = Server::bind("127.0.0.1:0", Duration::from_millis(200)).unwrap();
        let addr = server.local_addr().unwrap();
        let serving = thread::spawn(move || server.serve());
        for _ in 0..2 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"ping");
        }
        let totals = serving.join().unwrap().unwrap();
        assert_eq!(totals.clients, 2);
        assert_eq!(totals.bytes, 8);
        assert!(totals.peak >= 1);
    }

    #[test]
    fn listens_on_several_ports_and_counts_clients_held_at_once() {
        let server =
            Server::bind_all(&["127.0.0.1:0", "127.0.0.1:0"], Duration::from_millis(200)).unwrap();
        let addrs = server.local_addrs().unwrap();
        assert_eq!(addrs.len(), 2);
        assert_ne!(addrs[0], addrs[1]);
        assert_eq!(server.local_addr().unwrap(), addrs[0]);
        let serving = thread::spawn(move || server.serve());
        let mut held = Vec::new();
        for (i, a) in addrs.iter().cycle().take(6).enumerate() {
            let mut s = std::net::TcpStream::connect(a).unwrap();
            s.write_all(&[i as u8]).unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
            held.push(s);
        }
        drop(held);
        let totals = serving.join().unwrap().unwrap();
        assert_eq!(totals.clients, 6);
        assert_eq!(totals.peak, 6);
        assert_eq!(totals.bytes, 6);
    }
}
