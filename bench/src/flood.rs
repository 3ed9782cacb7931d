//! The flood server: accepts clients and writes `bytes` to each, then closes.
//! It serves a bounded number of clients and gives up when none arrives for a
//! while, so it always stops by itself.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{CHUNK, mb_per_s};

/// How the flood server behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes written to each client.
    pub bytes: u64,
    /// Clients to serve before stopping; 0 serves until no client has been
    /// connected for `accept_timeout` (a long-lived backend for many runs).
    pub clients: u64,
    /// Give up when no client arrives for this long.
    pub accept_timeout: Duration,
    /// Give up on a client whose writes block for this long.
    pub write_timeout: Duration,
    /// Speak TLS to every client.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What happened to one client.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub peer: SocketAddr,
    /// Bytes written (less than asked if the client went away).
    pub bytes: u64,
    /// When the client was accepted, and how long it took to flood.
    pub started: Instant,
    pub took: Duration,
    /// Why the client got fewer bytes than asked, if it did.
    pub error: Option<String>,
}

/// A bound flood server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    options: Options,
}

impl Server {
    pub fn bind(addr: &str, options: Options) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, options })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves `clients` clients, one thread each, calling `on_served` as each
    /// finishes; returns them all once the last is done.
    pub fn serve(self, on_served: impl Fn(&Served) + Send + Sync) -> Result<Vec<Served>> {
        let opts = &self.options;
        let on_served = &on_served;
        thread::scope(|scope| {
            let mut workers = Vec::new();
            let mut done = Vec::new();
            let mut last = Instant::now();
            let unlimited = opts.clients == 0;
            while unlimited || ((workers.len() + done.len()) as u64) < opts.clients {
                if unlimited {
                    // Keep the finished ones' results, and do not time out
                    // while a client is still being served.
                    let (finished, running): (Vec<_>, Vec<_>) = workers
                        .into_iter()
                        .partition(|w: &thread::ScopedJoinHandle<'_, Served>| w.is_finished());
                    done.extend(
                        finished
                            .into_iter()
                            .map(|w| w.join().expect("flood worker panicked")),
                    );
                    workers = running;
                    if !workers.is_empty() {
                        last = Instant::now();
                    }
                }
                match self.listener.accept() {
                    Ok((stream, peer)) => {
                        last = Instant::now();
                        workers.push(scope.spawn(move || {
                            let served = flood(stream, peer, opts);
                            on_served(&served);
                            served
                        }));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if unlimited && last.elapsed() > opts.accept_timeout {
                            break;
                        }
                        if last.elapsed() > opts.accept_timeout {
                            bail!(
                                "no client for {:?} ({} of {} served)",
                                opts.accept_timeout,
                                workers.len() + done.len(),
                                opts.clients
                            );
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            }
            done.extend(
                workers
                    .into_iter()
                    .map(|w| w.join().expect("flood worker panicked")),
            );
            Ok(done)
        })
    }
}

fn flood(stream: TcpStream, peer: SocketAddr, opts: &Options) -> Served {
    let started = Instant::now();
    let mut sent = 0u64;
    let result = (|| -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(opts.write_timeout))?;
        stream.set_read_timeout(Some(opts.write_timeout))?;
        match &opts.tls {
            None => write_flood(&mut &stream, opts.bytes, &mut sent)?,
            Some(config) => {
                let conn =
                    rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, &stream);
                write_flood(&mut tls, opts.bytes, &mut sent)?;
                tls.conn.send_close_notify();
                tls.flush()?;
            }
        }
        stream.shutdown(Shutdown::Write)
    })();
    Served {
        peer,
        bytes: sent,
        started,
        took: started.elapsed(),
        error: result.err().map(|e| e.to_string()),
    }
}

/// Writes `bytes` of a fixed pattern, counting into `sent`.
fn write_flood(out: &mut impl Write, bytes: u64, sent: &mut u64) -> io::Result<()> {
    let block: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    while *sent < bytes {
        let n = usize::try_from(bytes - *sent).map_or(CHUNK, |left| left.min(CHUNK));
        out.write_all(&block[..n])?;
        *sent += n as u64;
    }
    out.flush()
}

/// From the first client's start to the last client's end.
pub fn span(served: &[Served]) -> Duration {
    let first = served.iter().map(|s| s.started).min();
    let last = served.iter().map(|s| s.started + s.took).max();
    match (first, last) {
        (Some(first), Some(last)) => last - first,
        _ => Duration::ZERO,
    }
}

impl Served {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "event": "served",
            "peer": self.peer.to_string(),
            "bytes": self.bytes,
            "seconds": self.took.as_secs_f64(),
            "mb_per_s": mb_per_s(self.bytes, self.took),
            "error": self.error,
        })
    }
}
