//! The tenant side of one session: TCP, optionally TLS, then the front end
//! the proxy speaks (nothing, HTTP CONNECT or a WebSocket upgrade), then
//! console payload both ways. Blocking I/O on one buffer, so a client costs
//! as little CPU as possible.
//!
//! Over a WebSocket, payload goes out as binary frames masked with a fresh
//! random key each, as a browser sends them (RFC 6455 section 5.3), and
//! comes back from unmasked server frames whose headers are parsed here;
//! pings are answered, a close frame ends the session with an error.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::scale;
use crate::tls::TlsClient;

/// How the tenant asks for its console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Front {
    /// Bytes straight through: a direct connection or a TCP proxy.
    Raw,
    /// HTTP CONNECT `target`, with `Proxy-Authorization: Bearer <token>`.
    Connect {
        target: String,
        token: Option<String>,
    },
    /// WebSocket upgrade at `path` (which carries the token), subprotocol
    /// `binary`.
    Ws { path: String },
}

impl Front {
    /// Short name for reports: raw, connect, ws.
    pub fn name(&self) -> &'static str {
        match self {
            Front::Raw => "raw",
            Front::Connect { .. } => "connect",
            Front::Ws { .. } => "ws",
        }
    }
}

/// Where and how to open sessions.
#[derive(Clone, Debug)]
pub struct Dial {
    /// The address connected to: the backend (direct) or the proxy.
    pub addr: SocketAddr,
    pub front: Front,
    /// More ways in (other CONNECT targets or WebSocket paths, each with its
    /// token): session `i` uses `[front, more_fronts..][i % n]`, so a proxy
    /// dials several backend addresses (see [`crate::scale`]).
    pub more_fronts: Vec<Front>,
    /// Local addresses to bind before connecting, round robin per session
    /// (empty: the kernel's choice).
    pub sources: Vec<IpAddr>,
    pub tls: Option<TlsClient>,
    pub connect_timeout: Duration,
    /// Give up on a read or write that blocks for this long.
    pub io_timeout: Duration,
    /// Initial size of a session's receive buffer (it grows while a
    /// response head does not fit).
    pub buf_size: usize,
}

impl Dial {
    /// Resolves `addr` (first address) into a dial plan.
    pub fn new(
        addr: &str,
        front: Front,
        tls: Option<TlsClient>,
        timeout: Duration,
    ) -> Result<Self> {
        let addr = addr
            .to_socket_addrs()
            .with_context(|| format!("resolving {addr}"))?
            .next()
            .with_context(|| format!("{addr} resolves to no address"))?;
        Ok(Self {
            addr,
            front,
            more_fronts: Vec::new(),
            sources: Vec::new(),
            tls,
            connect_timeout: timeout,
            io_timeout: timeout,
            buf_size: BUF,
        })
    }

    /// Binds every session to one of `sources` first (round robin); they
    /// must be loopback addresses of the family of the proxy's, which must
    /// be on loopback too.
    pub fn with_sources(mut self, sources: Vec<IpAddr>) -> Result<Self> {
        if let Some(bad) = sources
            .iter()
            .find(|s| !s.is_loopback() || s.is_ipv4() != self.addr.is_ipv4())
        {
            anyhow::bail!(
                "source address {bad} cannot reach {} over loopback",
                self.addr
            );
        }
        if !sources.is_empty() && !self.addr.ip().is_loopback() {
            anyhow::bail!(
                "--source-addrs spreads over 127.0.0.0/8: {} is not a loopback address",
                self.addr
            );
        }
        self.sources = sources;
        Ok(self)
    }

    /// Opens one session, ready for payload.
    pub fn open(&self) -> io::Result<Session> {
        self.open_nth(0)
    }

    /// Opens the `i`-th session: its source address and front end chosen
    /// round robin.
    pub fn open_nth(&self, i: u64) -> io::Result<Session> {
        let k = i % (self.more_fronts.len() as u64 + 1);
        let front = match k.checked_sub(1) {
            None => &self.front,
            Some(m) => scale::nth(&self.more_fronts, m).unwrap_or(&self.front),
        };
        Session::open(self, front, scale::nth(&self.sources, i).copied())
    }

    /// Every way in, in the order sessions use them.
    pub fn fronts(&self) -> impl Iterator<Item = &Front> {
        std::iter::once(&self.front).chain(&self.more_fronts)
    }
}

/// A TCP connection to `addr` from `source` (port chosen at connect time).
fn connect_from(
    source: Option<IpAddr>,
    addr: &SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(addr, timeout);
    };
    let domain = socket2::Domain::for_address(*addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if source.is_ipv4() {
        // Bind the address only; the port is picked per 4-tuple at connect,
        // so one source address reaches many destinations with the same port.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
    }
    sock.bind(&SocketAddr::new(source, 0).into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding {source}: {e}")))?;
    sock.connect_timeout(&(*addr).into(), timeout)?;
    Ok(sock.into())
}

/// The byte stream under a session.
enum Io {
    Plain(TcpStream),
    Tls(Box<consolegate::tls_stream::ClientTls<TcpStream>>),
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(s) => match s.read(buf) {
                // A peer that closes without close_notify: the end, as for TCP.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(buf),
            Io::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.flush(),
            Io::Tls(s) => s.flush(),
        }
    }
}

/// Size of a session's receive buffer (bulk reads into it).
pub const BUF: usize = 256 * 1024;
/// Largest HTTP response head accepted from a proxy.
const MAX_HEAD: usize = 16 * 1024;

/// One open session.
pub struct Session {
    io: Io,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    ws: bool,
    /// Payload bytes still to come in the current WebSocket data frame.
    frame_left: u64,
    /// Discarding payload in the kernel: frame headers are read exactly,
    /// so no payload is copied out behind them.
    exact: bool,
    out: Vec<u8>,
    /// The negotiated TLS cipher suite, if TLS.
    pub tls_suite: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("ws", &self.ws)
            .field("buffered", &(self.len - self.pos))
            .field("tls_suite", &self.tls_suite)
            .finish()
    }
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Session {
    fn open(dial: &Dial, front: &Front, source: Option<IpAddr>) -> io::Result<Self> {
        let tcp = connect_from(source, &dial.addr, dial.connect_timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(dial.io_timeout))?;
        tcp.set_write_timeout(Some(dial.io_timeout))?;
        let (io, tls_suite) = match &dial.tls {
            None => (Io::Plain(tcp), None),
            Some(tls) => {
                // rustls's unbuffered connection (the proxy's TLS stream,
                // blocking): the buffered one spends more on growing and
                // shrinking its 4 KiB reads than on decrypting, and made
                // the client the limit of TLS bulk runs.
                let stream = consolegate::tls_stream::ClientTls::connect_blocking(
                    tls.config.clone(),
                    tls.server_name.clone(),
                    tcp,
                )
                .map_err(|e| other(format!("TLS handshake: {e}")))?;
                let suite = stream
                    .get_ref()
                    .1
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()));
                (Io::Tls(Box::new(stream)), suite)
            }
        };
        let mut session = Session {
            io,
            buf: vec![0; dial.buf_size.max(16)],
            pos: 0,
            len: 0,
            ws: false,
            frame_left: 0,
            exact: false,
            out: Vec::with_capacity(1024),
            tls_suite,
        };
        match front {
            Front::Raw => {}
            Front::Connect { target, token } => {
                let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
                if let Some(token) = token {
                    req.push_str(&format!("Proxy-Authorization: Bearer {token}\r\n"));
                }
                req.push_str("\r\n");
                session.io.write_all(req.as_bytes())?;
                session.io.flush()?;
                session.expect_status("200", "CONNECT")?;
            }
            Front::Ws { path } => {
                let host = dial.addr;
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: bG9hZGdlbi1iZW5jaG1hcg==\r\n\
                     Sec-WebSocket-Protocol: binary\r\n\r\n"
                );
                session.io.write_all(req.as_bytes())?;
                session.io.flush()?;
                session.expect_status("101", "WebSocket upgrade")?;
                session.ws = true;
            }
        }
        Ok(session)
    }

    /// Reads a response head and checks its status code; bytes after the
    /// head stay buffered as payload.
    fn expect_status(&mut self, code: &str, what: &str) -> io::Result<()> {
        let end = loop {
            if let Some(i) = self.buf[self.pos..self.len]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                break self.pos + i + 4;
            }
            if self.len - self.pos > MAX_HEAD {
                return Err(other(format!("{what} response head too large")));
            }
            self.fill()
                .map_err(|e| other(format!("proxy closed before answering {what}: {e}")))?;
        };
        let head = String::from_utf8_lossy(&self.buf[self.pos..end]).into_owned();
        self.pos = end;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some(code) {
            return Err(other(format!("proxy refused the {what}: {status}")));
        }
        Ok(())
    }

    /// Reads more bytes into the buffer; EOF is an error.
    fn fill(&mut self) -> io::Result<()> {
        self.fill_upto(usize::MAX)
    }

    /// [`Session::fill`], reading at most `most` bytes.
    fn fill_upto(&mut self, most: usize) -> io::Result<()> {
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        } else if self.len == self.buf.len() {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            // A response head longer than a small buffer (idle sessions
            // start with one): grow; expect_status bounds the head.
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        let end = self.len.saturating_add(most).min(self.buf.len());
        loop {
            match self.io.read(&mut self.buf[self.len..end]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection",
                    ));
                }
                Ok(n) => {
                    self.len += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no data from the proxy within the I/O timeout",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next `n` buffered bytes (n is at most a frame header's 14).
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        while self.len - self.pos < n {
            if self.buf.len() - self.pos < n {
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
            }
            let most = if self.exact {
                n - (self.len - self.pos)
            } else {
                usize::MAX
            };
            self.fill_upto(most)?;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Up to `max` bytes of console payload (at least one), reading from the
    /// network only when nothing is buffered.
    pub fn payload(&mut self, max: usize) -> io::Result<&[u8]> {
        if self.ws {
            while self.frame_left == 0 {
                self.next_frame()?;
            }
        }
        if self.pos == self.len {
            self.fill()?;
        }
        let mut n = (self.len - self.pos).min(max);
        if self.ws {
            n = n.min(usize::try_from(self.frame_left).unwrap_or(usize::MAX));
            self.frame_left -= n as u64;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Like [`Session::payload`], but payload that is not buffered yet is
    /// discarded in the kernel (`recv` with `MSG_TRUNC`: TCP drops the bytes
    /// without copying them out) instead of read. Only the count comes
    /// back. TLS sessions must decrypt, so they read as `payload` does.
    /// For bulk runs whose client would otherwise spend its CPU on copying
    /// (on a small machine the client shares CPUs with the backends, and
    /// its copy would limit every proxy's row, not the proxy).
    pub fn discard_payload(&mut self, max: usize) -> io::Result<usize> {
        // Frame headers exactly from here on: what `take` would buffer
        // behind them is payload, copied out instead of discarded.
        self.exact = matches!(self.io, Io::Plain(_));
        if self.ws {
            while self.frame_left == 0 {
                self.next_frame()?;
            }
        }
        let Io::Plain(tcp) = &self.io else {
            return self.payload(max).map(<[u8]>::len);
        };
        if self.pos < self.len {
            return self.payload(max).map(<[u8]>::len);
        }
        let mut want = max.min(self.buf.len());
        if self.ws {
            want = want.min(usize::try_from(self.frame_left).unwrap_or(usize::MAX));
        }
        let n = loop {
            match nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(tcp),
                &mut self.buf[..want],
                nix::sys::socket::MsgFlags::MSG_TRUNC,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                // The socket's read timeout, as `fill` reports it.
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ETIMEDOUT) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no data from the proxy within the I/O timeout",
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            ));
        }
        if self.ws {
            self.frame_left -= n as u64;
        }
        Ok(n)
    }

    /// Reads exactly `out.len()` payload bytes.
    pub fn read_payload_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            let s = self.payload(out.len() - got)?;
            out[got..got + s.len()].copy_from_slice(s);
            got += s.len();
        }
        Ok(())
    }

    /// Reads one WebSocket frame header; data frames set `frame_left`,
    /// control frames are handled here.
    fn next_frame(&mut self) -> io::Result<()> {
        let h = self.take(2)?;
        let (b0, b1) = (h[0], h[1]);
        if b1 & 0x80 != 0 {
            return Err(other("server sent a masked frame"));
        }
        let len = match b1 & 0x7F {
            126 => {
                let b = self.take(2)?;
                u64::from(u16::from_be_bytes([b[0], b[1]]))
            }
            127 => {
                let b = self.take(8)?;
                u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            l => u64::from(l),
        };
        match b0 & 0x0F {
            0x0..=0x2 => self.frame_left = len,
            0x8 => {
                let n = usize::try_from(len.min(125)).unwrap_or(125);
                let body = self.take(n).map(<[u8]>::to_vec).unwrap_or_default();
                let code = body
                    .get(..2)
                    .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                let reason = String::from_utf8_lossy(body.get(2..).unwrap_or_default());
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("proxy closed the WebSocket: {code} {reason}"),
                ));
            }
            0x9 => {
                let n = usize::try_from(len.min(125)).unwrap_or(125);
                let body = self.take(n)?.to_vec();
                self.send_frame(0xA, &body)?;
            }
            0xA => {
                let n = usize::try_from(len.min(125)).unwrap_or(125);
                self.take(n)?;
            }
            op => return Err(other(format!("server sent opcode {op:#x}"))),
        }
        Ok(())
    }

    /// Sends console payload: as is, or as one masked binary frame.
    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        if self.ws {
            self.send_frame(0x2, payload)
        } else {
            self.io.write_all(payload)?;
            self.io.flush()
        }
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let key: [u8; 4] = rand::random();
        self.out.clear();
        encode_masked(opcode, payload, key, &mut self.out);
        self.io.write_all(&self.out)?;
        self.io.flush()
    }
}

/// A client frame (FIN set): header, the mask key, the masked payload.
pub fn encode_masked(opcode: u8, payload: &[u8], key: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
}

#[cfg(test)]
mod tests;
