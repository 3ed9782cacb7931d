//! Raw HTTP/1.1 and raw WebSocket frames, for CONNECT and for the hostile
//! inputs a real client never sends (malformed heads, unmasked frames...).

use std::net::SocketAddr;

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::net::{BoxIo, Transport};

#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a response head byte by byte (so nothing after it is consumed).
/// Errors if the peer closes before a complete head.
pub async fn read_response_head<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<RawResponse> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 64 * 1024, "response head too large");
        let mut b = [0u8; 1];
        let n = s.read(&mut b).await.context("reading response head")?;
        if n == 0 {
            bail!(
                "connection closed before a complete response head (got {:?})",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(b[0]);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&head).context("parsing response head")?;
    Ok(RawResponse {
        status: resp.code.context("no status")?,
        reason: resp.reason.unwrap_or_default().to_owned(),
        headers: resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    })
}

/// Sends `raw` bytes and reads the response head.
pub async fn exchange(
    addr: SocketAddr,
    transport: &Transport,
    raw: &[u8],
) -> anyhow::Result<(RawResponse, BoxIo)> {
    let mut io = crate::net::connect(addr, transport).await?;
    io.write_all(raw).await?;
    io.flush().await?;
    let resp = crate::within("response head", read_response_head(&mut io)).await??;
    Ok((resp, io))
}

/// A WebSocket upgrade request head with the given extra header lines.
pub fn upgrade_head(host: &str, path: &str, extra: &[&str]) -> String {
    let key = B64.encode(rand::random::<[u8; 16]>());
    let mut s = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// Encodes one WebSocket frame. `mask: None` produces an (illegal from a
/// client) unmasked frame.
pub fn frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        f.push(m | len as u8);
    } else if len <= 0xffff {
        f.push(m | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A masked client frame with a random key.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, opcode, Some(rand::random()), payload)
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Reads one server frame (servers never mask).
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<Frame> {
    let b0 = s.read_u8().await.context("reading frame header")?;
    let b1 = s.read_u8().await?;
    ensure!(b1 & 0x80 == 0, "server frame is masked");
    let len = match b1 & 0x7f {
        126 => u64::from(s.read_u16().await?),
        127 => s.read_u64().await?,
        n => u64::from(n),
    };
    ensure!(len <= 16 << 20, "absurd frame length {len}");
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await?;
    Ok(Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload,
    })
}

/// Reads frames until a close frame; returns its code and reason
/// (code `None` for an empty close payload, or if the TCP stream ended
/// without a close frame and `allow_eof`).
pub async fn read_close<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<(Option<u16>, String)> {
    loop {
        let f = read_frame(s).await?;
        if f.opcode == 8 {
            if f.payload.len() >= 2 {
                let code = u16::from_be_bytes([f.payload[0], f.payload[1]]);
                return Ok((
                    Some(code),
                    String::from_utf8_lossy(&f.payload[2..]).into_owned(),
                ));
            }
            return Ok((None, String::new()));
        }
    }
}

/// Opens a raw (hand-driven) WebSocket: sends the upgrade head and checks
/// for 101. The stream is positioned right after the response head.
pub async fn raw_websocket(
    addr: SocketAddr,
    transport: &Transport,
    path: &str,
    extra: &[&str],
) -> anyhow::Result<BoxIo> {
    let head = upgrade_head(&crate::net::authority(addr), path, extra);
    let (resp, io) = exchange(addr, transport, head.as_bytes()).await?;
    ensure!(
        resp.status == 101,
        "expected 101, got {} {}",
        resp.status,
        resp.reason
    );
    Ok(io)
}

/// Outcome of a CONNECT request.
#[derive(Debug)]
pub enum ConnectOutcome {
    Tunnel(BoxIo, RawResponse),
    Refused(RawResponse),
}

impl ConnectOutcome {
    pub fn status(&self) -> u16 {
        match self {
            ConnectOutcome::Tunnel(_, r) | ConnectOutcome::Refused(r) => r.status,
        }
    }

    pub fn tunnel(self) -> anyhow::Result<BoxIo> {
        match self {
            ConnectOutcome::Tunnel(io, _) => Ok(io),
            ConnectOutcome::Refused(r) => bail!("CONNECT refused: {} {}", r.status, r.reason),
        }
    }
}

/// `CONNECT target HTTP/1.1` with optional `Proxy-Authorization` value.
pub async fn connect_tunnel(
    proxy: SocketAddr,
    target: &str,
    proxy_authorization: Option<&str>,
) -> anyhow::Result<ConnectOutcome> {
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = proxy_authorization {
        head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    let (resp, io) = exchange(proxy, &Transport::Plain, head.as_bytes()).await?;
    Ok(if resp.status == 200 {
        ConnectOutcome::Tunnel(io, resp)
    } else {
        ConnectOutcome::Refused(resp)
    })
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub fn basic(user: &str, token: &str) -> String {
    format!("Basic {}", B64.encode(format!("{user}:{token}")))
}

/// Reads until EOF or error (bounded), returning what arrived; used to see
/// that the proxy closed a connection.
pub async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

pub async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> anyhow::Result<()> {
    s.write_all(b).await?;
    s.flush().await?;
    Ok(())
}

/// `CONNECT target` from a chosen local address (e.g. 127.0.0.2, to be a
/// different tenant on loopback) with an optional `Proxy-Authorization`.
pub async fn connect_tunnel_from(
    src: std::net::IpAddr,
    proxy: SocketAddr,
    target: &str,
    proxy_authorization: Option<&str>,
) -> anyhow::Result<ConnectOutcome> {
    let sock = if src.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = crate::within("TCP connect", sock.connect(proxy)).await??;
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = proxy_authorization {
        head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    let resp = crate::within("response head", read_response_head(&mut s)).await??;
    Ok(if resp.status == 200 {
        ConnectOutcome::Tunnel(Box::new(s), resp)
    } else {
        ConnectOutcome::Refused(resp)
    })
}

/// `CONNECT target` with a bearer `token` from `src`: the status and, on
/// 200, the tunnel.
pub async fn connect_bearer_from(
    src: std::net::IpAddr,
    proxy: SocketAddr,
    target: &str,
    token: &str,
) -> (u16, Option<BoxIo>) {
    match connect_tunnel_from(src, proxy, target, Some(&bearer(token)))
        .await
        .unwrap()
    {
        ConnectOutcome::Tunnel(io, r) => (r.status, Some(io)),
        ConnectOutcome::Refused(r) => (r.status, None),
    }
}
