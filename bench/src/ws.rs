//! A WebSocket tenant for bulk reads through consolegate's WebSocket front
//! end (plain HTTP listener: `--plain-http`), counting binary payload bytes.
//! Frames from the proxy are unmasked; their headers are parsed here.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::thread;
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::CHUNK;
use crate::raw::{Options, Report};

const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Opens `opts.connections` WebSockets to `proxy` at `path` (which carries
/// the token, e.g. `/websockify?token=T`) and reads `opts.bytes` of console
/// payload on each.
pub fn run(proxy: &str, path: &str, opts: &Options) -> Result<Report> {
    let addr = proxy
        .to_socket_addrs()
        .with_context(|| format!("resolving {proxy}"))?
        .next()
        .with_context(|| format!("{proxy} resolves to no address"))?;
    let started = Instant::now();
    let results: Vec<(u64, Option<io::Error>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.connections)
            .map(|_| scope.spawn(|| read_ws(addr, path, opts)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("websocket client worker panicked"))
            .collect()
    });
    let took = started.elapsed();
    Ok(Report {
        target: format!("ws://{proxy}{path}"),
        connected_to: addr,
        via: true,
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

fn upgrade(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> io::Result<Vec<u8>> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: bG9hZGdlbi1iZW5jaG1hcg==\r\n\
         Sec-WebSocket-Protocol: binary\r\n\r\n"
    );
    stream.write_all(req.as_bytes())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(io::Error::other("upgrade response head too large"));
        }
        match stream.read(&mut buf)? {
            0 => {
                return Err(io::Error::other(
                    "proxy closed before answering the upgrade",
                ));
            }
            n => head.extend_from_slice(&buf[..n]),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let status = text.lines().next().unwrap_or_default().to_owned();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(io::Error::other(format!("upgrade refused: {status}")));
    }
    Ok(head.split_off(end))
}

/// Buffered reader over the socket, starting with bytes already read.
struct Input {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl Input {
    fn fill(&mut self) -> io::Result<()> {
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
        if self.len == self.buf.len() {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        let n = self.stream.read(&mut self.buf[self.len..])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "proxy closed"));
        }
        self.len += n;
        Ok(())
    }

    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        while self.len - self.pos < n {
            if self.pos > 0 && self.buf.len() - self.pos < n {
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
            }
            self.fill()?;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Skips `n` payload bytes without keeping them.
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.pos == self.len {
                self.fill()?;
            }
            let have = (self.len - self.pos) as u64;
            let k = have.min(n);
            self.pos += k as usize;
            n -= k;
        }
        Ok(())
    }
}

fn read_ws(addr: SocketAddr, path: &str, opts: &Options) -> (u64, Option<io::Error>) {
    let mut got = 0u64;
    let result = (|| -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, opts.connect_timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(opts.read_timeout))?;
        let rest = upgrade(&mut stream, addr, path)?;
        let mut buf = vec![0u8; CHUNK * 4];
        buf[..rest.len()].copy_from_slice(&rest);
        let mut input = Input {
            stream,
            buf,
            pos: 0,
            len: rest.len(),
        };
        while got < opts.bytes {
            let h = input.take(2)?;
            let (b0, b1) = (h[0], h[1]);
            let len = match b1 & 0x7F {
                126 => {
                    let b = input.take(2)?;
                    u64::from(u16::from_be_bytes([b[0], b[1]]))
                }
                127 => {
                    let b = input.take(8)?;
                    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                }
                l => u64::from(l),
            };
            match b0 & 0x0F {
                0x2 | 0x0 => {
                    input.skip(len)?;
                    got += len;
                }
                0x8 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "proxy closed the WebSocket after {got} of {} bytes",
                            opts.bytes
                        ),
                    ));
                }
                // Pings are not answered: a bulk run is shorter than the keepalive.
                _ => input.skip(len)?,
            }
        }
        Ok(())
    })();
    (got, result.err())
}
