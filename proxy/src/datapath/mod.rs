//! HOT PATH: moving console bytes once a session is established.
//!
//! `copy` is the universal userspace bidirectional copy (CONNECT and other
//! raw streams); `splice` moves plaintext streams socket -> pipe -> socket
//! in the kernel; `websocket` pumps between a WebSocket tenant and a raw
//! compute stream, and `ws_splice` does the same with the heavy
//! compute-to-tenant payload spliced behind a frame header we write. The session picks the highest rung its legs allow
//! (splice when both are plain sockets) with the copy as the fallback that
//! always exists; `uring` (opt-in) forwards plain streams through a
//! dedicated io_uring thread; `sockmap` (opt-in) forwards plain TCP
//! sessions with an sk_skb verdict redirect in the kernel; `ktls` handles
//! the records of kernel TLS sockets for the `ktls+splice` rung. This
//! module never imports config, serde or control-plane code.

pub mod copy;
pub mod ktls;
pub mod lazybuf;
pub mod pipes;
pub mod sockmap;
pub mod splice;
pub mod uring;
pub mod websocket;
pub mod ws_pump;
pub mod ws_splice;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock (the system's, except in tests that pause it).
use tokio::time::Instant;

/// A direction of a session: tenant to compute (up) or back (down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Up,
    Down,
}

impl Dir {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }

    /// The error of the side this direction reads from.
    pub(crate) fn read_err(self, e: std::io::Error) -> End {
        match self {
            Dir::Up => End::TenantIo(e.to_string()),
            Dir::Down => End::ComputeIo(e.to_string()),
        }
    }

    /// The error of the side this direction writes to.
    pub(crate) fn write_err(self, e: std::io::Error) -> End {
        match self {
            Dir::Up => End::ComputeIo(e.to_string()),
            Dir::Down => End::TenantIo(e.to_string()),
        }
    }

    /// Counts `n` bytes moved this way.
    pub(crate) fn count(self, counters: &Counters, n: usize) {
        match self {
            Dir::Up => counters.add_up(n),
            Dir::Down => counters.add_down(n),
        }
    }
}

/// Byte counters and last-activity time of one session, shared by its pumps.
#[derive(Debug)]
pub struct Counters {
    start: Instant,
    /// Tenant to compute bytes.
    pub up: AtomicU64,
    /// Compute to tenant bytes.
    pub down: AtomicU64,
    last_ms: AtomicU64,
    /// Keepalive pings sent and not yet answered.
    pub unanswered_pings: AtomicU32,
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            unanswered_pings: AtomicU32::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Records `n` bytes tenant to compute.
    pub fn add_up(&self, n: usize) {
        self.up.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Records `n` bytes compute to tenant.
    pub fn add_down(&self, n: usize) {
        self.down.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Time since data last moved either way.
    pub fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Time since the session's data path started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn up_bytes(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    pub fn down_bytes(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

/// How a session's data path ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides finished normally (EOF / close handshake).
    Closed,
    /// The tenant closed (WebSocket close frame or EOF).
    TenantClosed,
    /// The compute side closed.
    ComputeClosed,
    /// No data either way for the idle timeout.
    IdleTimeout,
    /// The tenant stopped answering keepalive pings.
    KeepaliveTimeout,
    /// The proxy is shutting down.
    Shutdown,
    /// The session reached its maximum duration.
    MaxDuration,
    /// The tenant broke the protocol; closed with this code.
    TenantProtocol { code: u16, reason: &'static str },
    /// An I/O error on the tenant side.
    TenantIo(String),
    /// An I/O error on the compute side.
    ComputeIo(String),
}

impl End {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::TenantClosed => "tenant_closed",
            End::ComputeClosed => "compute_closed",
            End::IdleTimeout => "idle_timeout",
            End::KeepaliveTimeout => "keepalive_timeout",
            End::Shutdown => "shutdown",
            End::MaxDuration => "max_duration",
            End::TenantProtocol { .. } => "tenant_protocol_error",
            End::TenantIo(_) => "tenant_io_error",
            End::ComputeIo(_) => "compute_io_error",
        }
    }
}

/// Resolves when the session has been idle for `idle` (never if `None`).
pub(crate) async fn idle_watch(counters: &Counters, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let quiet = counters.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// A session's stop signal (admin kill, token revocation, shutdown):
/// raised once, seen by every clone. Every live session holds one, so it
/// is an atomic flag and a `Notify` (about 60 bytes) rather than a `watch`
/// channel (about 350).
#[derive(Debug, Clone, Default)]
pub struct Stop(std::sync::Arc<StopInner>);

#[derive(Debug, Default)]
struct StopInner {
    raised: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    /// A signal not raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the signal: every [`Stop::raised`] wait resolves, now and later.
    pub fn raise(&self) {
        self.0
            .raised
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether the signal was raised.
    pub fn is_raised(&self) -> bool {
        self.0.raised.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once the signal is raised.
    pub async fn raised(&self) {
        loop {
            let notified = self.0.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a raise in between is not lost.
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn shutdown_signalled(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone: the proxy is going away too.
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::Stop;
    use std::time::Duration;

    /// A raise reaches waits that started before it, waits that start after
    /// it, and every clone; a wait on a signal never raised stays pending.
    #[tokio::test]
    async fn stop_reaches_every_wait_and_clone() {
        let stop = Stop::new();
        let (a, b) = (stop.clone(), stop.clone());
        assert!(!a.is_raised());
        let early = tokio::spawn(async move { a.raised().await });
        tokio::task::yield_now().await;
        let pending = tokio::time::timeout(Duration::from_millis(50), b.raised()).await;
        assert!(pending.is_err(), "not raised yet");
        stop.raise();
        tokio::time::timeout(Duration::from_secs(5), early)
            .await
            .expect("the waiting clone woke")
            .unwrap();
        assert!(b.is_raised());
        tokio::time::timeout(Duration::from_secs(5), b.raised())
            .await
            .expect("a wait after the raise resolves at once");
    }
}
