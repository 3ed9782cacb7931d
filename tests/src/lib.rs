//! Test harness: starts real QEMU, the consolegate binary and real clients.
//!
//! * [`qemu`]: QEMU (TCG only) with a VNC server (TCP or UNIX) and a serial
//!   chardev wired to a tiny boot sector that prints a banner and echoes.
//! * [`rfb`]: an RFC 6143 client over any transport.
//! * [`ws`]: WebSocket clients (tokio-tungstenite over our own rustls TLS)
//!   and a byte-stream adapter for the `binary` and `base64` subprotocols.
//! * [`http`]: raw HTTP/1.1 and raw WebSocket frames for hostile inputs.
//! * [`proxy`]: the real `consolegate` binary, its token files and logs.
//! * [`compute`]: a private CA and QEMU VNC servers with TLS, passwords, SASL.
//! * [`spice`]: the SPICE link handshake (main channel).
//! * [`redis`]: a real `redis-server` on a UNIX socket; [`admin`]: an
//!   admin API client.
//! * [`fake`]: scripted peers, only for faults a real peer never produces.
//! * [`browser`]: headless Chromium over the DevTools protocol (web console).
//! * [`guest`]: a QEMU guest with Debian's kernel (kTLS), its initramfs and
//!   boot; driven by the `guest_ktls` binary (`src/bin/guest_ktls/`).

pub mod admin;
pub mod browser;
pub mod certs;
pub mod compute;
pub mod fake;
pub mod guest;
pub mod http;
pub mod net;
pub mod process;
pub mod proxy;
pub mod qemu;
pub mod qmp;
pub mod redis;
pub mod rfb;
pub mod scenario;
pub mod spice;
pub mod vnc_matrix;
pub mod ws;

use std::future::Future;
use std::time::Duration;

/// The WebSocket close code docs/contract.md gives for compute-side errors
/// (and for a tenant that never completes the console handshake).
pub const CLOSE_COMPUTE_ERROR: u16 = 1011;

/// Upper bound for any single step, so a broken proxy fails a test instead
/// of hanging it. Never used as a performance assertion.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(45);

/// Runs `f` with [`STEP_TIMEOUT`] as an upper bound.
pub async fn within<F: Future>(what: &str, f: F) -> anyhow::Result<F::Output> {
    within_for(STEP_TIMEOUT, what, f).await
}

/// Runs `f` with `limit` as an upper bound.
pub async fn within_for<F: Future>(limit: Duration, what: &str, f: F) -> anyhow::Result<F::Output> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {limit:?}: {what}"))
}

/// A fresh random token secret (hex), unique per call.
pub fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `haystack` contains `needle` as a byte substring.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
