//! The keys that follow a kTLS leg's current ones: what a TLS 1.3
//! KeyUpdate needs once rustls no longer drives the connection.
//!
//! At the hand-over rustls gives up its connection as a
//! [`KernelConnection`], which can only compute the next traffic secrets
//! of either direction. A [`Rekey`] keeps it (boxed, with the negotiated
//! suite) beside the socket, only for TLS 1.3 legs and only when the
//! kernel takes new keys (probed at start): elsewhere a KeyUpdate ends the
//! session, and the session holds nothing for it.
//!
//! A peer may not make us renew keys without bound (each costs two
//! derivations and a system call): more than [`MAX_PEER_UPDATES`]
//! KeyUpdates within [`UPDATE_WINDOW`] end the session, as rustls caps
//! them on its own connections.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use rustls::kernel::KernelConnection;
use rustls::{ConnectionTrafficSecrets, SupportedCipherSuite};

use crate::sys::ktls::{KeyDir, set_key};

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

/// Computes and installs the next key of a kTLS socket, per direction.
pub struct Rekey {
    next: Box<dyn NextSecrets>,
    suite: SupportedCipherSuite,
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
    pub fn new<D>(conn: KernelConnection<D>, suite: SupportedCipherSuite) -> Self
    where
        KernelConnection<D>: Send + Sync + 'static,
    {
        Self {
            next: Box::new(conn),
            suite,
            renewed: 0,
            rate: UpdateRate::default(),
        }
    }

    /// Moves direction `dir` of the kTLS socket `fd` to its next key
    /// (record sequence 0). For receiving: right after the peer's
    /// KeyUpdate; for sending: right after ours went out.
    pub fn renew(&mut self, fd: BorrowedFd<'_>, dir: KeyDir) -> io::Result<()> {
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
        tracing::info!(
            direction = match dir {
                KeyDir::Tx => "send",
                KeyDir::Rx => "receive",
            },
            renewed = self.renewed,
            "kTLS key renewed after a TLS 1.3 KeyUpdate"
        );
        Ok(())
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
}
