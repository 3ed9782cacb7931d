//! The raw client: `connections` TCP connections to one address, each reading
//! `bytes` bytes (or until the peer closes), timed from connect to last byte.
//! With a [`Via`] proxy, each connection first asks an HTTP CONNECT proxy
//! (consolegate's CONNECT front end) for the target, so the bytes cross it.

use std::io::{self, Read as _, Write as _};
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
    /// Reach the target through this HTTP CONNECT proxy.
    pub via: Option<Via>,
}

/// An HTTP CONNECT proxy in front of the target.
#[derive(Clone, Debug)]
pub struct Via {
    /// The proxy's listening address.
    pub proxy: String,
    /// Sent as `Proxy-Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// Largest CONNECT response head we accept.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// One run's outcome over all connections.
#[derive(Clone, Debug)]
pub struct Report {
    /// The target as given (reached through `via`, if set).
    pub target: String,
    /// The address connected to: the target's, or the proxy's.
    pub connected_to: SocketAddr,
    pub via: bool,
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
            "target": self.target,
            "connected_to": self.connected_to.to_string(),
            "via_connect_proxy": self.via,
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
    let dial = opts.via.as_ref().map_or(target, |v| v.proxy.as_str());
    let addr = dial
        .to_socket_addrs()
        .with_context(|| format!("resolving {dial}"))?
        .next()
        .with_context(|| format!("{dial} resolves to no address"))?;
    let started = Instant::now();
    let results: Vec<(u64, Option<io::Error>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.connections)
            .map(|_| scope.spawn(|| read_from(addr, target, opts)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("raw client worker panicked"))
            .collect()
    });
    let took = started.elapsed();
    Ok(Report {
        target: target.to_owned(),
        connected_to: addr,
        via: opts.via.is_some(),
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

/// Asks the CONNECT proxy on `stream` for `target`; returns the bytes that
/// came after the response head (already tunnelled data).
fn connect_through(stream: &mut TcpStream, target: &str, via: &Via) -> io::Result<Vec<u8>> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(token) = &via.token {
        request.push_str(&format!("Proxy-Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(io::Error::other("CONNECT response head too large"));
        }
        match stream.read(&mut buf)? {
            0 => return Err(io::Error::other("proxy closed before answering CONNECT")),
            n => head.extend_from_slice(&buf[..n]),
        }
    };
    let status_line = String::from_utf8_lossy(&head[..end]);
    let status_line = status_line.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::other(format!(
            "proxy refused CONNECT: {status_line}"
        )));
    }
    Ok(head.split_off(end))
}

/// Reads up to `opts.bytes` from one connection; the count and the error
/// that stopped it early, if any (an early EOF is an error too).
fn read_from(addr: SocketAddr, target: &str, opts: &Options) -> (u64, Option<io::Error>) {
    let mut got = 0u64;
    let result = (|| -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, opts.connect_timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(opts.read_timeout))?;
        if let Some(via) = &opts.via {
            got = connect_through(&mut stream, target, via)?.len() as u64;
        }
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
            via: None,
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

    /// A one-shot CONNECT proxy that checks the request, answers 200 with
    /// some tunnelled bytes in the same write, then floods the rest.
    fn fake_connect_proxy(bytes: usize) -> (String, thread::JoinHandle<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let proxy = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                head.push(b[0]);
            }
            let mut out = b"HTTP/1.1 200 Connection Established\r\n\r\n".to_vec();
            out.extend(std::iter::repeat_n(7u8, bytes));
            s.write_all(&out).unwrap();
            String::from_utf8(head).unwrap()
        });
        (addr, proxy)
    }

    #[test]
    fn goes_through_a_connect_proxy_with_the_token() {
        let (proxy, handle) = fake_connect_proxy(100_000);
        let mut opts = client(100_000, 1);
        opts.via = Some(Via {
            proxy,
            token: Some("t0k".into()),
        });
        let report = run("127.0.0.1:5900", &opts).unwrap();
        let head = handle.join().unwrap();
        assert!(
            head.starts_with("CONNECT 127.0.0.1:5900 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Bearer t0k\r\n"),
            "{head}"
        );
        assert!(report.complete(), "{report:?}");
        assert_eq!(report.json()["via_connect_proxy"], true);
    }
}
