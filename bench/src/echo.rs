//! The echo server: a compute-side stand-in for keystroke-sized round trips
//! (a serial console echoing what is typed) and for idle sessions that only
//! need to be held open. One small-stack thread per client, blocking I/O,
//! TCP_NODELAY. It stops by itself once no client has been connected for
//! `idle_timeout`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

/// Stack of a client thread: echoing needs very little, and an idle-scale
/// run holds thousands of them.
const STACK: usize = 64 * 1024;

/// A bound echo server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
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

impl Server {
    pub fn bind(addr: &str, idle_timeout: Duration) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            idle_timeout,
            tls: None,
        })
    }

    /// Speak TLS to every client.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Echoes for every client until none has been connected for the idle
    /// timeout.
    pub fn serve(self) -> Result<Totals> {
        let active = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut totals = Totals::default();
        let mut last = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    totals.clients += 1;
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    totals.peak = totals.peak.max(now as u64);
                    let (mine, bytes) = (active.clone(), bytes.clone());
                    let tls = self.tls.clone();
                    let spawned = thread::Builder::new()
                        .name("echo".into())
                        .stack_size(STACK)
                        .spawn(move || {
                            let n = echo(stream, tls).unwrap_or(0);
                            bytes.fetch_add(n, Ordering::Relaxed);
                            mine.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        // Out of threads: this client is dropped (closed).
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if active.load(Ordering::SeqCst) > 0 {
                        last = Instant::now();
                    } else if last.elapsed() > self.idle_timeout {
                        break;
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EMFILE and friends: wait for clients to go away.
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        totals.bytes = bytes.load(Ordering::Relaxed);
        Ok(totals)
    }
}

/// Writes back everything read until the client closes; bytes echoed.
fn echo(stream: TcpStream, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<u64> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    match tls {
        None => echo_over(&mut &stream),
        Some(config) => {
            let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
            echo_over(&mut rustls::StreamOwned::new(conn, &stream))
        }
    }
}

fn echo_over(s: &mut (impl Read + Write)) -> io::Result<u64> {
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                s.write_all(&buf[..n])?;
                s.flush()?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A TLS peer that closes without close_notify.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_and_stops_when_idle() {
        let server = Server::bind("127.0.0.1:0", Duration::from_millis(200)).unwrap();
        let addr = server.local_addr().unwrap();
        let serving = thread::spawn(move || server.serve());
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).unwrap();
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
}
