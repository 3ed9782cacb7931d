//! systemd integration over the `sd_notify` protocol: `READY=1` once the
//! listeners are bound, `RELOADING=1` / `READY=1` around a SIGHUP reload,
//! `STOPPING=1` when a drain starts, `STATUS=` lines an operator sees in
//! `systemctl status`, and `WATCHDOG=1` keepalives from the event loop when
//! the unit sets `WatchdogSec=`.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends state changes to systemd, if systemd asked for them.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from the
    /// environment (and leaves them there: child processes are not ours).
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0u64;
        let watchdog = (enabled && sd_notify::watchdog_enabled(false, &mut usec))
            .then(|| Duration::from_micros(usec));
        if let Some(w) = watchdog {
            tracing::info!(watchdog = ?w, "systemd watchdog enabled");
        }
        Self { enabled, watchdog }
    }

    /// How often to send watchdog keepalives: half the systemd timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
            .map(|w| (w / 2).max(Duration::from_millis(10)))
    }

    fn send(&self, what: &str, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, state = what, "sd_notify failed");
        }
    }

    /// The proxy serves: listeners are bound (and eBPF attached).
    pub fn ready(&self, status: &str) {
        self.send("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload (SIGHUP) starts; follow with [`Notifier::ready`].
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send("RELOADING", &states);
    }

    /// A graceful drain starts: no new sessions, live ones may finish.
    pub fn stopping(&self, status: &str) {
        self.send(
            "STOPPING",
            &[NotifyState::Stopping, NotifyState::Status(status)],
        );
    }

    /// A human-readable status line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send("STATUS", &[NotifyState::Status(status)]);
    }

    /// Watchdog keepalive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG", &[NotifyState::Watchdog]);
    }
}
