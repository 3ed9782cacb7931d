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
use crate::datapath::Stop;

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

/// One live session as the table keeps it: compact, because every idle
/// session holds one (the admin API's [`SessionInfo`] is rendered from it
/// on demand). Boxed in the map, so the map's slots stay small too.
#[derive(Debug)]
struct Entry {
    front: &'static str,
    kind: &'static str,
    tenant: SocketAddr,
    target: Box<str>,
    started: SystemTime,
    token: Option<EntryToken>,
    stop: Stop,
}

#[derive(Debug)]
struct EntryToken {
    id: TokenId,
    source: &'static str,
    digest: [u8; 32],
}

impl Entry {
    fn info(&self, id: u64) -> SessionInfo {
        SessionInfo {
            id,
            front: self.front,
            tenant: self.tenant.to_string(),
            kind: self.kind.to_owned(),
            target: self.target.to_string(),
            token_id: self.token.as_ref().map(|t| t.id.to_string()),
            token_source: self.token.as_ref().map(|t| t.source),
            started: humantime::format_rfc3339_seconds(self.started).to_string(),
            digest: self.token.as_ref().map(|t| t.digest),
        }
    }
}

/// The live-session table.
#[derive(Debug)]
pub struct SessionTable {
    by_id: Mutex<HashMap<u64, Box<Entry>>>,
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
                    e.stop.raise();
                }
            }
        });
        table
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<Entry>>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an admitted session; it leaves the table when the handle
    /// drops (which also restarts a use-limited token's reconnect window).
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        front: &'static str,
        tenant: SocketAddr,
        kind: &'static str,
        target: String,
        admission: Option<&Admission>,
    ) -> SessionHandle {
        let stop = Stop::new();
        if *self.shutdown.borrow() {
            stop.raise();
        }
        let entry = Entry {
            front,
            kind,
            tenant,
            target: target.into_boxed_str(),
            started: SystemTime::now(),
            token: admission.map(|a| EntryToken {
                id: a.token_id,
                source: a.source,
                digest: a.digest,
            }),
            stop: stop.clone(),
        };
        self.lock().insert(id, Box::new(entry));
        SessionHandle {
            table: Arc::clone(self),
            id,
            stop,
            uses: admission.and_then(|a| a.uses.clone()).map(Box::new),
            token_id: admission.map(|a| a.token_id),
        }
    }

    /// Live sessions, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self.lock().iter().map(|(id, e)| e.info(*id)).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Stops one session; false if it is not live.
    pub fn kill(&self, id: u64) -> bool {
        self.lock().get(&id).map(|e| e.stop.raise()).is_some()
    }

    /// Stops every session of a token; returns how many.
    pub fn kill_token(&self, digest: &[u8; 32]) -> usize {
        let map = self.lock();
        map.values()
            .filter(|e| e.token.as_ref().is_some_and(|t| &t.digest == digest))
            .map(|e| e.stop.raise())
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
    stop: Stop,
    uses: Option<Box<UseClaim>>,
    token_id: Option<TokenId>,
}

impl SessionHandle {
    /// The signal the data path stops on (admin kill, revocation, shutdown).
    pub fn stop_signal(&self) -> Stop {
        self.stop.clone()
    }

    /// Whether the session was told to stop.
    pub fn stopped(&self) -> bool {
        self.stop.is_raised()
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
        let s = b.stop_signal();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.raised())
            .await
            .unwrap();
        let c = t.register(3, "connect", addr, "vnc", "x:1".into(), None);
        assert!(c.stopped(), "sessions after shutdown start stopped");
    }
}
