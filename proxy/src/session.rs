//! A session's life, shared by the front ends:
//! accept -> resolve -> dial -> handshake -> pick data path -> pump -> audit.
//!
//! This module holds what every front end needs for that: the shared
//! context, session ids, the refusal path and the closing log line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{Notify, watch};

use crate::auth::{Admission, TokenStore};
use crate::config::ConnectAuth;
use crate::console::{self, ComputeStream, DialError, Target};
use crate::datapath::{Counters, End};
use crate::error::Refusal;
use crate::front::http::error_response;
use crate::front::tls::TenantTls;

/// Everything a session needs from the running proxy.
#[derive(Debug)]
pub struct Context {
    pub tokens: Arc<TokenStore>,
    pub tenant_tls: Option<Arc<TenantTls>>,
    pub allow_origins: Vec<String>,
    pub connect_auth: ConnectAuth,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub shutdown: watch::Receiver<bool>,
    pub live: LiveSessions,
}

impl Context {
    /// Resolves a presented token now.
    pub fn resolve(&self, token: &str) -> Result<Admission, Refusal> {
        self.tokens.resolve(token, SystemTime::now())
    }

    /// Dials the compute side, mapping failures to refusals (and logging them).
    pub async fn dial(&self, target: &Target) -> Result<ComputeStream, Refusal> {
        match console::dial(target, self.connect_timeout).await {
            Ok(s) => Ok(s),
            Err(e) => {
                let r = match e {
                    DialError::Timeout { .. } => Refusal::ComputeTimeout,
                    DialError::Io { .. } => Refusal::ComputeUnreachable,
                };
                tracing::warn!(reason = %r, side = %r.side(), error = %e, "session refused");
                Err(r)
            }
        }
    }
}

/// Counts live sessions so shutdown can wait for them.
#[derive(Debug, Default, Clone)]
pub struct LiveSessions {
    inner: Arc<(AtomicUsize, Notify)>,
    next_id: Arc<AtomicU64>,
}

/// Held by each live session; dropping it ends the session's count.
#[derive(Debug)]
pub struct LiveGuard {
    inner: Arc<(AtomicUsize, Notify)>,
    pub id: u64,
}

impl LiveSessions {
    /// Registers a new connection and gives it an id.
    pub fn enter(&self) -> LiveGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        LiveGuard {
            inner: Arc::clone(&self.inner),
            id,
        }
    }

    /// Connections currently open.
    pub fn count(&self) -> usize {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, or `deadline` passes.
    pub async fn drained(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.1.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}

/// Sends an HTTP refusal to the tenant (best effort) and logs it.
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, r: Refusal) {
    let (status, phrase) = r.status();
    let extra: &[(&str, &str)] = match r {
        Refusal::ProxyAuthRequired => &[("Proxy-Authenticate", "Basic realm=\"consolegate\"")],
        Refusal::UpgradeRequired => &[("Upgrade", "websocket")],
        Refusal::BadRequest => &[("Sec-WebSocket-Version", "13")],
        _ => &[],
    };
    let resp = error_response(status, phrase, extra, r.tenant_message());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = w.write_all(&resp).await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
    .await;
    if !matches!(r, Refusal::ComputeTimeout | Refusal::ComputeUnreachable) {
        tracing::warn!(reason = %r, side = %r.side(), status, "session refused");
    }
}

/// Logs the end of an established session.
pub fn log_end(end: &End, counters: &Counters) {
    let bytes_up = counters.up_bytes();
    let bytes_down = counters.down_bytes();
    let duration_ms = counters.elapsed().as_millis() as u64;
    match end {
        End::TenantIo(e) | End::ComputeIo(e) => tracing::info!(
            end = %end.kind(), error = %e, bytes_up, bytes_down, duration_ms, "session closed"
        ),
        End::TenantProtocol { code, reason } => tracing::info!(
            end = %end.kind(),
            close_code = code,
            close_reason = reason,
            bytes_up,
            bytes_down,
            duration_ms,
            "session closed"
        ),
        _ => tracing::info!(
            end = %end.kind(),
            bytes_up,
            bytes_down,
            duration_ms,
            "session closed"
        ),
    }
}
