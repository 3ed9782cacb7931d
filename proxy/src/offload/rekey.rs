//! The keys that follow a kTLS leg's current ones: what a TLS 1.3
//! KeyUpdate needs once rustls no longer drives the connection, and the
//! limit on how many records one transmit key may seal.
//!
//! At the hand-over rustls gives up its connection as a
//! [`KernelConnection`], which can only compute the next traffic secrets
//! of either direction. A [`Rekey`] keeps it (boxed, with the negotiated
//! suite) beside the socket, only for TLS 1.3 legs and only when the
//! kernel takes new keys (probed at start): elsewhere a KeyUpdate ends the
//! session, and the session holds nothing for it. The direction reading
//! the socket and the one writing it share it ([`SharedRekey`]): both run
//! in the session's one task, so the lock is never contended.
//!
//! A peer may not make us renew keys without bound (each costs two
//! derivations and a system call): more than [`MAX_PEER_UPDATES`]
//! KeyUpdates within [`UPDATE_WINDOW`] end the session, as rustls caps
//! them on its own connections.
//!
//! AES-GCM keys may seal only so many records (the suite's
//! confidentiality limit, 2^24 for TLS 1.3; RFC 8446, 5.5). rustls counts
//! them on its own connections, but after the hand-over the kernel seals
//! our records, and rustls leaves the count to us. [`TxLimit`] keeps an
//! upper bound of the records written since the key was set and, when it
//! reaches the renewal point, asks the kernel for the exact count; at the
//! point it sends our KeyUpdate and moves the socket to the next transmit
//! key, or, where keys cannot be renewed (kernels before 6.14, TLS 1.2),
//! ends the session with an error saying so.

use std::fmt;
use std::io;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use rustls::kernel::KernelConnection;
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};
use tokio::net::TcpStream;

use crate::datapath::splice::Sock;
use crate::sys::ktls::{Cipher, KeyDir, send_key_update, set_key, tx_records};

/// The next traffic secrets of one direction (either side's connection).
trait NextSecrets: Send + Sync {
    fn next(&mut self, dir: KeyDir) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D> NextSecrets for KernelConnection<D>
where
    KernelConnection<D>: Send + Sync,
{
    fn next(&mut self, dir: KeyDir) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match dir {
            KeyDir::Tx => self.update_tx_secret(),
            KeyDir::Rx => self.update_rx_secret(),
        }
    }
}

/// Peer KeyUpdates allowed within [`UPDATE_WINDOW`].
pub const MAX_PEER_UPDATES: u32 = 8;
pub const UPDATE_WINDOW: Duration = Duration::from_secs(1);

/// Counts the peer's KeyUpdates in fixed windows.
#[derive(Debug, Default)]
struct UpdateRate {
    window: Option<Instant>,
    seen: u32,
}

impl UpdateRate {
    /// Whether one more KeyUpdate at `now` is within the allowance.
    fn admit(&mut self, now: Instant) -> bool {
        match self.window {
            Some(start) if now.duration_since(start) < UPDATE_WINDOW => self.seen += 1,
            _ => (self.window, self.seen) = (Some(now), 1),
        }
        self.seen <= MAX_PEER_UPDATES
    }
}

/// Why a key is renewed (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The peer's KeyUpdate (our receive key), or our answer to one that
    /// asked for ours (our transmit key).
    PeerUpdate,
    /// Our transmit key sealed as many records as it may.
    RecordLimit,
}

/// Computes and installs the next key of a kTLS socket, per direction.
pub struct Rekey {
    next: Box<dyn NextSecrets>,
    suite: SupportedCipherSuite,
    /// `tenant` or `compute` (for the log).
    leg: &'static str,
    /// Keys renewed so far (both directions): for the log.
    renewed: u32,
    rate: UpdateRate,
}

impl fmt::Debug for Rekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rekey")
            .field("suite", &self.suite.suite())
            .field("renewed", &self.renewed)
            .finish_non_exhaustive()
    }
}

impl Rekey {
    /// The successor keys of a TLS 1.3 connection given up for kTLS.
    pub fn new<D>(conn: KernelConnection<D>, suite: SupportedCipherSuite, leg: &'static str) -> Self
    where
        KernelConnection<D>: Send + Sync + 'static,
    {
        Self {
            next: Box::new(conn),
            suite,
            leg,
            renewed: 0,
            rate: UpdateRate::default(),
        }
    }

    /// Moves direction `dir` of the kTLS socket `fd` to its next key
    /// (record sequence 0). For receiving: right after the peer's
    /// KeyUpdate; for sending: right after ours went out.
    pub fn renew(&mut self, fd: BorrowedFd<'_>, dir: KeyDir, why: Why) -> io::Result<()> {
        if dir == KeyDir::Rx && !self.rate.admit(Instant::now()) {
            return Err(io::Error::other(format!(
                "the peer sent more than {MAX_PEER_UPDATES} TLS KeyUpdates within {} s",
                UPDATE_WINDOW.as_secs()
            )));
        }
        let secrets = self.next.next(dir).map_err(io::Error::other)?;
        let info = ktls::CryptoInfo::from_rustls(self.suite, secrets).map_err(io::Error::other)?;
        set_key(fd, dir, &info)?;
        self.renewed += 1;
        let direction = match dir {
            KeyDir::Tx => "send",
            KeyDir::Rx => "receive",
        };
        match why {
            Why::PeerUpdate => tracing::info!(
                leg = self.leg,
                direction,
                renewed = self.renewed,
                "kTLS key renewed after a TLS 1.3 KeyUpdate"
            ),
            Why::RecordLimit => tracing::info!(
                leg = self.leg,
                direction,
                renewed = self.renewed,
                "kTLS key renewed at the record limit"
            ),
        }
        let reason = match why {
            Why::PeerUpdate => "peer_key_update",
            Why::RecordLimit => "record_limit",
        };
        crate::control::metrics::ktls_key_renewed(self.leg, direction, reason);
        Ok(())
    }
}

/// Sends our KeyUpdate (`update_not_requested`) on a kTLS socket under its
/// current transmit key, waiting for room in its send buffer, then moves
/// the socket to the next transmit key.
pub fn poll_key_update(
    sock: &TcpStream,
    cx: &mut Context<'_>,
    keys: &SharedRekey,
    why: Why,
) -> Poll<io::Result<()>> {
    ready!(Sock::Ktls(sock).poll_write_op(cx, || send_key_update(sock.as_fd())))?;
    Poll::Ready(lock(keys).renew(sock.as_fd(), KeyDir::Tx, why))
}

/// A leg's [`Rekey`], shared by the direction reading its socket and the
/// one writing it (one task: never contended).
pub type SharedRekey = Arc<Mutex<Rekey>>;

/// Locks a [`SharedRekey`]. Nothing panics while holding it, so a
/// poisoned lock still holds consistent keys.
pub fn lock(keys: &SharedRekey) -> MutexGuard<'_, Rekey> {
    keys.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The largest plaintext of one TLS record.
const RECORD_MAX: usize = 1 << 14;

/// Records kept in hand below a suite's confidentiality limit: one write
/// between two checks seals at most `n / 2^14 + 1` records, 65 for the
/// largest splice (a 1 MiB pipe), far fewer than this.
pub const LIMIT_MARGIN: u64 = 1 << 12;

/// The transmit-key record limit of one kTLS socket, kept by the
/// direction writing it.
#[derive(Debug)]
pub struct TxLimit {
    /// Successor keys (`None`: this leg's keys cannot be renewed).
    keys: Option<SharedRekey>,
    cipher: Cipher,
    /// Renew the key once the kernel has sealed this many records with it.
    at: u64,
    /// Records sealed under the current key, at most (exact after each
    /// question to the kernel).
    bound: u64,
}

impl TxLimit {
    /// The limit of a key that has sealed `sealed` records so far, of a
    /// suite whose keys may seal `suite_limit`; `per_key` lowers the
    /// renewal point (configuration). `None` when no limit applies (the
    /// suite has none and none is configured).
    pub fn new(
        keys: Option<SharedRekey>,
        cipher: Cipher,
        suite_limit: u64,
        per_key: Option<u64>,
        sealed: u64,
    ) -> Option<Self> {
        let suite_at = (suite_limit < u64::MAX).then(|| suite_limit.saturating_sub(LIMIT_MARGIN));
        let at = match (suite_at, per_key) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(Self {
            keys,
            cipher,
            at: at.max(1),
            bound: sealed,
        })
    }

    /// The renewal point, in records.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// After `n` bytes were written to the socket: they went into at most
    /// `n / 2^14 + 1` records (one more if they close a record left open).
    pub fn wrote(&mut self, n: usize) {
        let records = n.div_ceil(RECORD_MAX) as u64 + 1;
        self.bound = self.bound.saturating_add(records);
    }

    /// Before writing to `sock`: when the key may be at its limit, asks the
    /// kernel and, if it is, renews the key (our KeyUpdate, then the next
    /// transmit key) or fails where that cannot be done.
    pub fn poll_ready(&mut self, sock: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.bound < self.at {
            return Poll::Ready(Ok(()));
        }
        let sealed = tx_records(sock.as_fd(), self.cipher)?;
        self.bound = sealed;
        if sealed < self.at {
            return Poll::Ready(Ok(()));
        }
        let Some(keys) = &self.keys else {
            return Poll::Ready(Err(io::Error::other(format!(
                "this leg's kernel TLS key has sealed {sealed} records, its limit, and \
                 cannot be renewed here (that needs TLS 1.3 and Linux 6.14 or later): the \
                 session ends"
            ))));
        };
        ready!(poll_key_update(sock, cx, keys, Why::RecordLimit)).map_err(|e| {
            io::Error::other(format!("renewing a kTLS key at its record limit: {e}"))
        })?;
        self.bound = 0;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_key_updates_are_capped_per_window() {
        let mut rate = UpdateRate::default();
        let t0 = Instant::now();
        for i in 0..MAX_PEER_UPDATES {
            assert!(
                rate.admit(t0 + Duration::from_millis(u64::from(i))),
                "update {i}"
            );
        }
        assert!(!rate.admit(t0 + Duration::from_millis(500)), "one too many");
        // A new window starts afresh.
        assert!(rate.admit(t0 + UPDATE_WINDOW + Duration::from_millis(1)));
        // Spread out, any number is fine.
        let mut rate = UpdateRate::default();
        for i in 0..100u64 {
            assert!(rate.admit(t0 + Duration::from_millis(300 * i)));
        }
    }

    #[test]
    fn the_renewal_point_is_the_suite_limit_less_a_margin_or_lower() {
        let gcm = 1 << 24;
        let at = |suite, per_key| TxLimit::new(None, Cipher::AesGcm128, suite, per_key, 0);
        assert_eq!(at(gcm, None).unwrap().at(), gcm - LIMIT_MARGIN);
        assert_eq!(at(gcm, Some(1000)).unwrap().at(), 1000, "configured lower");
        assert_eq!(
            at(gcm, Some(u64::MAX)).unwrap().at(),
            gcm - LIMIT_MARGIN,
            "never above the suite's"
        );
        // ChaCha20-Poly1305 has no limit: nothing to count unless configured.
        assert!(at(u64::MAX, None).is_none());
        assert_eq!(at(u64::MAX, Some(48)).unwrap().at(), 48);
        assert_eq!(at(gcm, Some(0)).unwrap().at(), 1, "at least one record");
    }

    /// Each write counts as the most records it can have made: one per
    /// 2^14 bytes, and one more for a record it may have closed.
    #[test]
    fn writes_count_as_the_most_records_they_can_make() {
        let mut l = TxLimit::new(None, Cipher::AesGcm256, 1 << 24, None, 5).unwrap();
        assert_eq!(l.bound, 5, "records rustls sealed before the hand-over");
        l.wrote(1);
        assert_eq!(l.bound, 7);
        l.wrote(RECORD_MAX);
        assert_eq!(l.bound, 9);
        l.wrote(RECORD_MAX + 1);
        assert_eq!(l.bound, 12);
        l.wrote(1 << 20);
        assert_eq!(l.bound, 12 + 64 + 1);
        assert!(
            (1u64 << 20).div_ceil(RECORD_MAX as u64) + 1 < LIMIT_MARGIN,
            "the largest splice fits in the margin"
        );
    }

    /// Below the renewal point the kernel is not asked (here it would
    /// fail: a plain socket); at it the kernel's count is read, and a
    /// socket without kTLS answers with an error for the session, never a
    /// panic.
    #[tokio::test]
    async fn the_kernel_is_asked_only_at_the_renewal_point() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let _b = l.accept().await.unwrap();
        let mut limit = TxLimit::new(None, Cipher::AesGcm128, 1 << 24, Some(10), 0).unwrap();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..4 {
            limit.wrote(100);
            assert!(matches!(limit.poll_ready(&a, &mut cx), Poll::Ready(Ok(()))));
        }
        limit.wrote(100);
        match limit.poll_ready(&a, &mut cx) {
            Poll::Ready(Err(e)) => assert!(e.raw_os_error().is_some(), "{e}"),
            other => panic!("a plain socket has no kTLS record count: {other:?}"),
        }
    }
}
