//! WebSocket clients: tokio-tungstenite over our own transport (plain TCP or
//! rustls TLS trusting the test CA), plus [`into_bytes`], which turns a
//! WebSocket into a byte stream for the `binary` or `base64` subprotocol so
//! the RFB client and serial checks run over it unchanged.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, handshake::client::generate_key};

use crate::net::{BoxIo, Transport};

pub type Ws = WebSocketStream<BoxIo>;

/// The request a tenant's browser would send.
#[derive(Clone, Debug, Default)]
pub struct WsRequest {
    /// Path and query, e.g. `/websockify?token=abc`.
    pub path: String,
    /// Offered subprotocols, in order (empty: no header).
    pub protocols: Vec<String>,
    pub origin: Option<String>,
    pub cookie: Option<String>,
    /// Host header; defaults to the listener's address.
    pub host: Option<String>,
}

impl WsRequest {
    pub fn path(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    pub fn protocol(mut self, p: &str) -> Self {
        self.protocols.push(p.to_owned());
        self
    }

    pub fn origin(mut self, o: &str) -> Self {
        self.origin = Some(o.to_owned());
        self
    }

    pub fn cookie(mut self, c: &str) -> Self {
        self.cookie = Some(c.to_owned());
        self
    }
}

/// What the proxy answered to an upgrade request.
#[derive(Debug)]
pub enum WsOutcome {
    Upgraded {
        ws: Box<Ws>,
        protocol: Option<String>,
    },
    Refused {
        status: u16,
        body: String,
    },
}

impl WsOutcome {
    pub fn status(&self) -> u16 {
        match self {
            WsOutcome::Upgraded { .. } => 101,
            WsOutcome::Refused { status, .. } => *status,
        }
    }

    pub fn upgraded(self) -> anyhow::Result<(Ws, Option<String>)> {
        match self {
            WsOutcome::Upgraded { ws, protocol } => Ok((*ws, protocol)),
            WsOutcome::Refused { status, body } => {
                bail!("upgrade refused with HTTP {status}: {body}")
            }
        }
    }
}

/// Opens a WebSocket to a consolegate listener.
pub async fn connect(
    addr: SocketAddr,
    transport: &Transport,
    req: &WsRequest,
) -> anyhow::Result<WsOutcome> {
    let io = crate::net::connect(addr, transport).await?;
    let scheme = match transport {
        Transport::Plain => "ws",
        _ => "wss",
    };
    upgrade(io, addr, scheme, req).await
}

/// The WebSocket upgrade over a connection the caller opened (`scheme`:
/// `ws` or `wss`, for the request URI).
pub async fn upgrade(
    io: BoxIo,
    addr: SocketAddr,
    scheme: &str,
    req: &WsRequest,
) -> anyhow::Result<WsOutcome> {
    let host = req
        .host
        .clone()
        .unwrap_or_else(|| crate::net::authority(addr));
    let mut builder = tungstenite::http::Request::builder()
        .method("GET")
        .uri(format!("{scheme}://{host}{}", req.path))
        .header("Host", &host)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key());
    if !req.protocols.is_empty() {
        builder = builder.header("Sec-WebSocket-Protocol", req.protocols.join(", "));
    }
    if let Some(o) = &req.origin {
        builder = builder.header("Origin", o);
    }
    if let Some(c) = &req.cookie {
        builder = builder.header("Cookie", c);
    }
    let request = builder.body(())?;
    let res = crate::within(
        "WebSocket upgrade",
        tokio_tungstenite::client_async(request, io),
    )
    .await?;
    match res {
        Ok((ws, resp)) => {
            let protocol = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            Ok(WsOutcome::Upgraded {
                ws: Box::new(ws),
                protocol,
            })
        }
        Err(tungstenite::Error::Http(resp)) => Ok(WsOutcome::Refused {
            status: resp.status().as_u16(),
            body: resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        }),
        Err(e) => Err(e).context("WebSocket handshake"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Binary,
    Base64,
}

/// How the WebSocket ended, as seen by the byte adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: Option<u16>,
    pub reason: String,
}

/// A WebSocket as a byte stream: `io` reads what the compute side sent and
/// writes go out as binary frames (or base64 text frames). `closed` yields
/// the close frame once the proxy closed.
#[derive(Debug)]
pub struct WsBytes {
    pub io: DuplexStream,
    pub closed: JoinHandle<anyhow::Result<Closed>>,
}

pub fn into_bytes(ws: Ws, mode: Mode) -> WsBytes {
    let (mine, theirs) = tokio::io::duplex(1 << 18);
    let closed = tokio::spawn(bridge(ws, mine, mode));
    WsBytes { io: theirs, closed }
}

async fn bridge(ws: Ws, local: DuplexStream, mode: Mode) -> anyhow::Result<Closed> {
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(local);
    let mut buf = vec![0u8; 64 * 1024];
    let mut local_open = true;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let data = match msg {
                    None => return Ok(Closed { code: None, reason: "EOF without close frame".into() }),
                    Some(Err(e)) => return Err(e).context("reading WebSocket"),
                    Some(Ok(Message::Binary(b))) => {
                        if mode == Mode::Base64 {
                            bail!("binary frame in base64 mode");
                        }
                        b.to_vec()
                    }
                    Some(Ok(Message::Text(t))) => {
                        if mode == Mode::Binary {
                            bail!("text frame in binary mode");
                        }
                        B64.decode(t.as_str()).context("proxy sent invalid base64")?
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let _ = wr.shutdown().await;
                        return Ok(match frame {
                            Some(f) => Closed { code: Some(u16::from(f.code)), reason: f.reason.to_string() },
                            None => Closed { code: None, reason: String::new() },
                        });
                    }
                    Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
                };
                // The local reader may be gone; keep draining frames then.
                let _ = wr.write_all(&data).await;
            }
            n = rd.read(&mut buf), if local_open => {
                let n = n?;
                if n == 0 {
                    local_open = false;
                    sink.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "tenant done".into(),
                    }))).await?;
                    continue;
                }
                let msg = match mode {
                    Mode::Binary => Message::Binary(buf[..n].to_vec().into()),
                    Mode::Base64 => Message::Text(B64.encode(&buf[..n]).into()),
                };
                sink.send(msg).await.context("writing WebSocket")?;
            }
        }
    }
}

/// Upgrades, checks the negotiated subprotocol, then runs the RFB check
/// (handshake + full framebuffer update) over the WebSocket.
pub async fn rfb_over_ws(
    addr: SocketAddr,
    transport: &Transport,
    req: &WsRequest,
    mode: Mode,
) -> anyhow::Result<(crate::rfb::ServerInit, crate::rfb::Framebuffer)> {
    let (ws, protocol) = connect(addr, transport, req).await?.upgraded()?;
    let expected = match (req.protocols.is_empty(), mode) {
        (true, _) => None,
        (false, Mode::Binary) => Some("binary"),
        (false, Mode::Base64) => Some("base64"),
    };
    anyhow::ensure!(
        protocol.as_deref() == expected,
        "negotiated subprotocol {protocol:?}, expected {expected:?}"
    );
    let mut bytes = into_bytes(ws, mode);
    let out = crate::rfb::check_session(&mut bytes.io).await?;
    drop(bytes.io);
    Ok(out)
}
