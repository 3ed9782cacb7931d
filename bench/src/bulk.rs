//! Bulk throughput: `connections` sessions, each reading `bytes` of console
//! payload that the backend floods (a framebuffer-flood stand-in, see
//! [`crate::flood`]), timed from the first connect to the last byte.

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::tenant::Dial;
use crate::{CHUNK, mb_per_s, procstat};

/// What the bulk client does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Payload bytes to read on each session.
    pub bytes: u64,
    /// Parallel sessions.
    pub connections: u64,
    /// Discard plaintext payload in the kernel instead of reading it
    /// ([`crate::tenant::Session::discard_payload`]).
    pub discard: bool,
}

/// One run's outcome over all sessions.
#[derive(Clone, Debug)]
pub struct Report {
    pub front: &'static str,
    pub tls_suite: Option<String>,
    pub connected_to: String,
    pub connections: u64,
    /// Bytes asked for, over all sessions.
    pub expected: u64,
    /// Bytes received, over all sessions.
    pub received: u64,
    /// From the first connect to the last byte of the slowest session.
    pub took: Duration,
    /// CPU seconds this client used.
    pub cpu_s: f64,
    /// The first error a session met, if any.
    pub error: Option<String>,
}

impl Report {
    /// Every session got all its bytes.
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.received == self.expected
    }

    pub fn json(&self) -> serde_json::Value {
        let mb = mb_per_s(self.received, self.took);
        serde_json::json!({
            "mode": "bulk",
            "front": self.front,
            "tls": self.tls_suite.is_some(),
            "tls_suite": self.tls_suite,
            "connected_to": self.connected_to,
            "connections": self.connections,
            "bytes_expected": self.expected,
            "bytes": self.received,
            "seconds": self.took.as_secs_f64(),
            "mb_per_s": mb,
            "gbit_per_s": mb * 8.0 / 1000.0,
            "client_cpu_s": self.cpu_s,
            "complete": self.complete(),
            "error": self.error,
        })
    }
}

pub fn run(dial: &Dial, opts: &Options) -> Result<Report> {
    let cpu0 = procstat::self_cpu();
    let started = Instant::now();
    let results: Vec<(u64, Option<String>, Option<io::Error>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.connections)
            .map(|_| scope.spawn(|| read_from(dial, opts.bytes, opts.discard)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("bulk client worker panicked"))
            .collect()
    });
    let took = started.elapsed();
    Ok(Report {
        front: dial.front.name(),
        tls_suite: results.iter().find_map(|(_, s, _)| s.clone()),
        connected_to: dial.addr.to_string(),
        connections: opts.connections,
        expected: opts.bytes * opts.connections,
        received: results.iter().map(|(n, _, _)| n).sum(),
        took,
        cpu_s: procstat::self_cpu() - cpu0,
        error: results
            .into_iter()
            .find_map(|(_, _, e)| e)
            .map(|e| e.to_string()),
    })
}

/// Reads up to `bytes` of payload on one session: the count, the TLS suite
/// and the error that stopped it early (an early end is an error too).
fn read_from(dial: &Dial, bytes: u64, discard: bool) -> (u64, Option<String>, Option<io::Error>) {
    let mut got = 0u64;
    let mut suite = None;
    let result = (|| -> io::Result<()> {
        let mut session = dial.open()?;
        suite.clone_from(&session.tls_suite);
        while got < bytes {
            let want = usize::try_from(bytes - got).map_or(CHUNK, |left| left.min(CHUNK));
            let read = if discard {
                session.discard_payload(want)
            } else {
                session.payload(want).map(<[u8]>::len)
            };
            match read {
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{e} after {got} of {bytes} bytes"),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })();
    (got, suite, result.err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flood;
    use crate::tenant::Front;
    use std::io::{Read as _, Write as _};

    fn server(bytes: u64, clients: u64) -> flood::Server {
        server_waiting(bytes, clients, Duration::from_secs(10))
    }

    fn server_waiting(bytes: u64, clients: u64, accept_timeout: Duration) -> flood::Server {
        let opts = flood::Options {
            bytes,
            clients,
            accept_timeout,
            write_timeout: Duration::from_secs(10),
            tls: None,
        };
        flood::Server::bind("127.0.0.1:0", opts).unwrap()
    }

    fn dial(addr: &str, front: Front) -> Dial {
        Dial::new(addr, front, None, Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn bulk_client_reads_what_the_flood_server_writes() {
        let server = server(3 << 20, 2);
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve(|_| {}));
        let opts = Options {
            bytes: 3 << 20,
            connections: 2,
            discard: false,
        };
        let report = run(&dial(&addr, Front::Raw), &opts).unwrap();
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
        let json = report.json();
        assert!(json["mb_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(json["front"], "raw");
        assert_eq!(json["tls"], false);
    }

    /// Discarding in the kernel counts exactly the bytes served, and a
    /// short stream is still an error that says how far it got.
    #[test]
    fn discarding_client_counts_what_the_flood_server_writes() {
        let server = server(5 << 20, 2);
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve(|_| {}));
        let opts = Options {
            bytes: 5 << 20,
            connections: 1,
            discard: true,
        };
        let report = run(&dial(&addr, Front::Raw), &opts).unwrap();
        assert!(report.complete(), "{report:?}");
        assert_eq!(report.received, 5 << 20);
        let more = Options {
            bytes: 6 << 20,
            ..opts
        };
        let short = run(&dial(&addr, Front::Raw), &more).unwrap();
        assert!(!short.complete());
        assert_eq!(short.received, 5 << 20);
        let err = short.error.expect("a short stream is an error");
        assert!(err.contains("after 5242880 of 6291456 bytes"), "{err}");
        serving.join().unwrap().unwrap();
    }

    /// A silent peer ends a discarding read with the same timeout error a
    /// copying read gives, not a bare EAGAIN.
    #[test]
    fn discarding_client_reports_a_silent_peer_as_a_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let holding = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let dial = Dial::new(&addr, Front::Raw, None, Duration::from_millis(200)).unwrap();
        let opts = Options {
            bytes: 1 << 20,
            connections: 1,
            discard: true,
        };
        let report = run(&dial, &opts).unwrap();
        assert_eq!(report.received, 0);
        let err = report.error.expect("a silent peer is an error");
        assert!(
            err.contains("no data from the proxy within the I/O timeout"),
            "{err}"
        );
        holding.join().unwrap();
    }

    #[test]
    fn early_close_is_reported_not_hidden() {
        let server = server(1000, 1);
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve(|_| {}));
        let opts = Options {
            bytes: 5000,
            connections: 1,
            discard: false,
        };
        let report = run(&dial(&addr, Front::Raw), &opts).unwrap();
        serving.join().unwrap().unwrap();
        assert_eq!(report.received, 1000);
        assert!(!report.complete());
        let error = report.error.as_deref().unwrap();
        assert!(error.contains("after 1000 of 5000 bytes"), "{error}");
    }

    #[test]
    fn tls_backends_and_a_verifying_tls_client() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::compare::Pki::generate(dir.path()).unwrap();
        let config = crate::tls::server_config(&pki.cert, &pki.key).unwrap();
        let client = crate::tls::TlsClient::from_ca_file(&pki.ca, "localhost").unwrap();

        let opts = flood::Options {
            bytes: 1 << 20,
            clients: 2,
            accept_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            tls: Some(config.clone()),
        };
        let server = flood::Server::bind("127.0.0.1:0", opts).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve(|_| {}));
        let timeout = Duration::from_secs(10);
        let dial = Dial::new(&addr, Front::Raw, Some(client.clone()), timeout).unwrap();
        let opts = Options {
            bytes: 1 << 20,
            connections: 1,
            discard: false,
        };
        let report = run(&dial, &opts).unwrap();
        assert!(report.complete(), "{report:?}");
        assert!(report.tls_suite.as_deref().unwrap().starts_with("TLS13_"));
        // A client expecting another name refuses the certificate.
        let wrong = crate::tls::TlsClient::from_ca_file(&pki.ca, "example.com").unwrap();
        let err = Dial::new(&addr, Front::Raw, Some(wrong), timeout)
            .unwrap()
            .open()
            .unwrap_err();
        assert!(err.to_string().contains("TLS handshake"), "{err}");
        serving.join().unwrap().unwrap();

        let echo = crate::echo::Server::bind("127.0.0.1:0", Duration::from_millis(300))
            .unwrap()
            .with_tls(config);
        let addr = echo.local_addr().unwrap().to_string();
        let echoing = thread::spawn(move || echo.serve());
        let dial = Dial::new(&addr, Front::Raw, Some(client), timeout).unwrap();
        let opts = crate::latency::Options {
            messages: 50,
            warmup: 5,
            size: 64,
            connections: 1,
        };
        let report = crate::latency::run(&dial, &opts).unwrap();
        assert!(report.complete(), "{report:?}");
        assert_eq!(echoing.join().unwrap().unwrap().bytes, 55 * 64);
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
        let front = Front::Connect {
            target: "127.0.0.1:5900".into(),
            token: Some("t0k".into()),
        };
        let opts = Options {
            bytes: 100_000,
            connections: 1,
            discard: false,
        };
        let report = run(&dial(&proxy, front), &opts).unwrap();
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
        assert_eq!(report.json()["front"], "connect");
    }
}
