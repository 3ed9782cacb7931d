//! Live sessions by id: what the admin API lists and kills, and how a
//! revoked token's sessions are found.
//!
//! Each session gets its own stop signal (a `watch` the data path waits
//! on); the table raises every signal when the proxy shuts down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::auth::TokenId;
use crate::auth::store::Admission;
use crate::auth::uses::UseClaim;

/// What the admin API shows of a session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub id: u64,
    pub front: &'static str,
    pub tenant: String,
    pub kind: String,
    pub target: String,
    pub token_id: Option<String>,
    pub token_source: Option<&'static str>,
    pub started: String,
    #[serde(skip)]
    pub digest: Option<[u8; 32]>,
}

#[derive(Debug)]
struct Entry {
    info: SessionInfo,
    stop: watch::Sender<bool>,
}

/// The live-session table.
#[derive(Debug)]
pub struct SessionTable {
    by_id: Mutex<HashMap<u64, Entry>>,
    shutdown: watch::Receiver<bool>,
}

impl SessionTable {
    /// A table whose sessions all stop when `shutdown` turns true. Must be
    /// called inside the runtime.
    pub fn new(shutdown: watch::Receiver<bool>) -> Arc<Self> {
        let table = Arc::new(Self {
            by_id: Mutex::default(),
            shutdown: shutdown.clone(),
        });
        let weak = Arc::downgrade(&table);
        let mut rx = shutdown;
        tokio::spawn(async move {
            crate::datapath::shutdown_signalled(&mut rx).await;
            if let Some(t) = weak.upgrade() {
                for e in t.lock().values() {
                    let _ = e.stop.send(true);
                }
            }
        });
        table
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an admitted session; it leaves the table when the handle
    /// drops (which also restarts a use-limited token's reconnect window).
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        front: &'static str,
        tenant: SocketAddr,
        kind: &str,
        target: String,
        admission: Option<&Admission>,
    ) -> SessionHandle {
        let (tx, rx) = watch::channel(*self.shutdown.borrow());
        let info = SessionInfo {
            id,
            front,
            tenant: tenant.to_string(),
            kind: kind.to_owned(),
            target,
            token_id: admission.map(|a| a.token_id.to_string()),
            token_source: admission.map(|a| a.source),
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            digest: admission.map(|a| a.digest),
        };
        self.lock().insert(id, Entry { info, stop: tx });
        SessionHandle {
            table: Arc::clone(self),
            id,
            stop: rx,
            uses: admission.and_then(|a| a.uses.clone()).map(Box::new),
            token_id: admission.map(|a| a.token_id),
        }
    }

    /// Live sessions, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self.lock().values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Stops one session; false if it is not live.
    pub fn kill(&self, id: u64) -> bool {
        self.lock()
            .get(&id)
            .map(|e| e.stop.send(true).is_ok())
            .is_some()
    }

    /// Stops every session of a token; returns how many.
    pub fn kill_token(&self, digest: &[u8; 32]) -> usize {
        let map = self.lock();
        map.values()
            .filter(|e| e.info.digest.as_ref() == Some(digest))
            .map(|e| {
                let _ = e.stop.send(true);
            })
            .count()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A registered session.
#[derive(Debug)]
pub struct SessionHandle {
    table: Arc<SessionTable>,
    id: u64,
    stop: watch::Receiver<bool>,
    uses: Option<Box<UseClaim>>,
    token_id: Option<TokenId>,
}

impl SessionHandle {
    /// The signal the data path stops on (admin kill, revocation, shutdown).
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// Whether the session was told to stop.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// The token the session was admitted with.
    pub fn token_id(&self) -> Option<TokenId> {
        self.token_id
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
        if let Some(u) = self.uses.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { u.release(SystemTime::now()).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kill_and_shutdown() {
        let (tx, rx) = watch::channel(false);
        let t = SessionTable::new(rx);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = t.register(1, "websocket", addr, "vnc", "x:1".into(), None);
        let b = t.register(2, "connect", addr, "vnc", "x:1".into(), None);
        assert_eq!(t.list().len(), 2);
        assert!(t.kill(1));
        assert!(a.stopped() && !b.stopped());
        assert!(!t.kill(9));
        drop(a);
        assert_eq!(t.len(), 1);
        tx.send(true).unwrap();
        let mut s = b.stop_signal();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.wait_for(|v| *v))
            .await
            .unwrap()
            .unwrap();
        let c = t.register(3, "connect", addr, "vnc", "x:1".into(), None);
        assert!(c.stopped(), "sessions after shutdown start stopped");
    }
}
