//! Helpers of the compute-security tests against real QEMU VNC servers
//! (`tests/tests/compute_security.rs`, `compute_live.rs`): token lines with
//! compute credentials, a TLS WebSocket proxy with compute TLS flags, and
//! the two outcomes a tenant can see (a working console, or the RFB
//! refusal with its reason and WebSocket close 1011).

use std::path::Path;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::compute::Pki;
use crate::proxy::{Proxy, ProxySpec};
use crate::ws::{self, Mode, WsRequest};

/// A token line in the TOML form, with compute credentials.
pub fn token_toml(token: &str, target: &str, extra: &str) -> String {
    let target = match target.strip_prefix("unix_socket:") {
        Some(p) => format!("unix = \"{p}\""),
        None => format!("target = \"{target}\""),
    };
    format!("[[token]]\ntoken = \"{token}\"\nkind = \"vnc\"\n{target}\n{extra}\n")
}

/// Starts a TLS WebSocket proxy with these tokens and compute TLS flags.
pub async fn proxy(dir: &Path, tokens: &str, compute: &[String]) -> Proxy {
    let file = dir.join("tokens.toml");
    std::fs::write(&file, tokens).unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.extra = compute.to_vec();
    Proxy::start(spec).await.unwrap()
}

pub fn compute_flags(pki: &Pki, ca: &Path, client_cert: bool) -> Vec<String> {
    let mut f = vec!["--compute-ca".to_owned(), ca.display().to_string()];
    if client_cert {
        f.extend([
            "--compute-cert".to_owned(),
            pki.path("client-cert.pem").display().to_string(),
            "--compute-key".to_owned(),
            pki.path("client-key.pem").display().to_string(),
        ]);
    }
    f
}

/// Opens the console through the proxy and checks a full framebuffer update.
pub async fn console_works(p: &Proxy, token: &str) {
    let req = WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let (init, fb) = ws::rfb_over_ws(p.ws_addr(), &p.transport(), &req, Mode::Binary)
        .await
        .unwrap_or_else(|e| panic!("console through the proxy: {e:#}\nlogs:\n{}", p.logs()));
    assert_eq!((fb.width, fb.height), (init.width, init.height));
}

/// Opens the console and expects the RFB refusal: version, zero security
/// types and a reason, then WebSocket close 1011. Returns the reason.
pub async fn console_refused(p: &Proxy, token: &str) -> String {
    let req = WsRequest::path(format!("/websockify?token={token}")).protocol("binary");
    let (socket, _) = ws::connect(p.ws_addr(), &p.transport(), &req)
        .await
        .unwrap()
        .upgraded()
        .unwrap();
    let mut b = ws::into_bytes(socket, Mode::Binary);
    let got = crate::within("RFB refusal", async {
        let mut v = [0u8; 12];
        b.io.read_exact(&mut v).await?;
        anyhow::ensure!(&v == b"RFB 003.008\n", "version {v:?}");
        b.io.write_all(b"RFB 003.008\n").await?;
        let n = b.io.read_u8().await?;
        anyhow::ensure!(n == 0, "expected zero security types (a refusal), got {n}");
        let len = b.io.read_u32().await?;
        let mut reason = vec![0u8; len as usize];
        b.io.read_exact(&mut reason).await?;
        anyhow::Ok(String::from_utf8(reason)?)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("refusal: {e:#}\nlogs:\n{}", p.logs()));
    assert!(
        got.starts_with("consolegate: "),
        "RFB failure reason {got:?}"
    );
    let closed = crate::within("close frame", b.closed)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(closed.code, Some(1011), "close {closed:?}");
    assert_eq!(
        format!("consolegate: {}", closed.reason),
        got,
        "close reason matches RFB reason"
    );
    got
}
