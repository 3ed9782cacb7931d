//! A minimal HTTP/1.1 client for consolegate's admin API (JSON in and out,
//! one request per connection), over TCP, TLS or a UNIX socket.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::net::Transport;
use crate::proxy::Proxy;

/// One admin API answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("admin answer {:?}", self.body))
    }
}

fn head(method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    if let Some(k) = key {
        h.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if !body.is_empty() {
        h.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    h.push_str("\r\n");
    h.push_str(&body);
    h.into_bytes()
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
) -> anyhow::Result<Answer> {
    s.write_all(req).await?;
    s.flush().await?;
    let mut raw = Vec::new();
    let _ = crate::within("admin answer", s.read_to_end(&mut raw)).await?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    // Bodies are small and may be chunked: strip chunk framing.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok(Answer {
        status,
        headers: head.to_owned(),
        body,
    })
}

/// A request over TCP (plain or TLS).
pub async fn request(
    addr: SocketAddr,
    transport: &Transport,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let s = crate::net::connect(addr, transport).await?;
    exchange(s, &head(method, path, key, body)).await
}

/// A request over the admin UNIX socket.
pub async fn request_unix(
    socket: &Path,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let s = tokio::net::UnixStream::connect(socket).await?;
    exchange(s, &head(method, path, key, body)).await
}

/// The bearer key the token and admin API tests give their proxies.
pub const TEST_KEY: &str = "admin-key-0123456789abcdef";

/// A call to `p`'s plain-HTTP admin listener with [`TEST_KEY`].
pub async fn call(p: &Proxy, method: &str, path: &str, body: Option<&Value>) -> Answer {
    request(
        p.admin.expect("admin listener"),
        &Transport::Plain,
        method,
        path,
        Some(TEST_KEY),
        body,
    )
    .await
    .unwrap()
}

/// Creates a token through the admin API; returns (secret, digest).
pub async fn create_token(p: &Proxy, body: Value) -> (String, String) {
    let a = call(p, "POST", "/v1/tokens", Some(&body)).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let v = a.json().unwrap();
    (
        v["token"].as_str().unwrap().to_owned(),
        v["digest"].as_str().unwrap().to_owned(),
    )
}

/// `consolegate_refusals_total{reason}` in a metrics page (0 if absent).
pub fn refusals(metrics: &str, reason: &str) -> u64 {
    let want = format!("consolegate_refusals_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
