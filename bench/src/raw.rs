//! The raw client: `connections` TCP connections to one address, each reading
//! `bytes` bytes (or until the peer closes), timed from connect to last byte.

use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::{CHUNK, mb_per_s};

/// What the raw client does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bytes to read on each connection.
    pub bytes: u64,
    /// Parallel connections.
    pub connections: u64,
    pub connect_timeout: Duration,
    /// Give up on a connection whose reads block for this long.
    pub read_timeout: Duration,
}

/// One run's outcome over all connections.
#[derive(Clone, Debug)]
pub struct Report {
    pub target: SocketAddr,
    pub connections: u64,
    /// Bytes asked for, over all connections.
    pub expected: u64,
    /// Bytes received, over all connections.
    pub received: u64,
    /// From the first connect to the last byte of the slowest connection.
    pub took: Duration,
    /// The first error a connection met, if any.
    pub error: Option<String>,
}

impl Report {
    /// Every connection got all its bytes.
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.received == self.expected
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": "raw",
            "target": self.target.to_string(),
            "connections": self.connections,
            "bytes_expected": self.expected,
            "bytes": self.received,
            "seconds": self.took.as_secs_f64(),
            "mb_per_s": mb_per_s(self.received, self.took),
            "complete": self.complete(),
            "error": self.error,
        })
    }
}

pub fn run(target: &str, opts: &Options) -> Result<Report> {
    let addr = target
        .to_socket_addrs()
        .with_context(|| format!("resolving {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))?;
    let started = Instant::now();
    let results: Vec<(u64, Option<io::Error>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.connections)
            .map(|_| scope.spawn(|| read_from(addr, opts)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("raw client worker panicked"))
            .collect()
    });
    let took = started.elapsed();
    Ok(Report {
        target: addr,
        connections: opts.connections,
        expected: opts.bytes * opts.connections,
        received: results.iter().map(|(n, _)| n).sum(),
        took,
        error: results
            .into_iter()
            .find_map(|(_, e)| e)
            .map(|e| e.to_string()),
    })
}

/// Reads up to `opts.bytes` from one connection; the count and the error
/// that stopped it early, if any (an early EOF is an error too).
fn read_from(addr: SocketAddr, opts: &Options) -> (u64, Option<io::Error>) {
    let mut got = 0u64;
    let result = (|| -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, opts.connect_timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(opts.read_timeout))?;
        let mut buf = vec![0u8; CHUNK];
        while got < opts.bytes {
            let want = usize::try_from(opts.bytes - got).map_or(CHUNK, |left| left.min(CHUNK));
            match stream.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("peer closed after {got} of {} bytes", opts.bytes),
                    ));
                }
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })();
    (got, result.err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flood;

    fn server(bytes: u64, clients: u64) -> flood::Server {
        server_waiting(bytes, clients, Duration::from_secs(10))
    }

    fn server_waiting(bytes: u64, clients: u64, accept_timeout: Duration) -> flood::Server {
        let opts = flood::Options {
            bytes,
            clients,
            accept_timeout,
            write_timeout: Duration::from_secs(10),
        };
        flood::Server::bind("127.0.0.1:0", opts).unwrap()
    }

    fn client(bytes: u64, connections: u64) -> Options {
        Options {
            bytes,
            connections,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn raw_client_reads_what_the_flood_server_writes() {
        let server = server(3 << 20, 2);
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve(|_| {}));
        let report = run(&addr, &client(3 << 20, 2)).unwrap();
        assert!(report.complete(), "{report:?}");
        assert_eq!(report.received, 6 << 20);
        let served = serving.join().unwrap().unwrap();
        assert_eq!(served.len(), 2);
        assert!(
            served
                .iter()
                .all(|s| s.bytes == 3 << 20 && s.error.is_none()),
            "{served:?}"
        );
        assert!(report.json()["mb_per_s"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn early_close_is_reported_not_hidden() {
        let server = server(1000, 1);
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve(|_| {}));
        let report = run(&addr, &client(5000, 1)).unwrap();
        serving.join().unwrap().unwrap();
        assert_eq!(report.received, 1000);
        assert!(!report.complete());
        assert!(
            report.error.as_deref().unwrap().contains("peer closed"),
            "{report:?}"
        );
    }

    #[test]
    fn flood_server_gives_up_without_clients() {
        let server = server_waiting(1, 1, Duration::from_millis(50));
        assert!(server.serve(|_| {}).is_err());
    }
}
