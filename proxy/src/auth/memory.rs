//! The admin API's token store when no Redis is configured: tokens live in
//! this process's memory, keyed by digest, and vanish on restart.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::SystemTime;

use super::file::Grant;
use super::resolver::{BoxFuture, Resolver, StoreError, StoredToken, TokenAdmin};
use super::token::Token;
use crate::console::{ConsoleKind, Host, Target};
use crate::error::Refusal;

/// Tokens created through the admin API.
#[derive(Debug, Default)]
pub struct MemoryStore {
    by_digest: RwLock<HashMap<[u8; 32], StoredToken>>,
}

fn expired(t: &StoredToken, now: SystemTime) -> bool {
    t.grant.not_after.is_some_and(|a| now >= a)
}

impl MemoryStore {
    fn prune(&self, now: SystemTime) {
        let mut map = self.by_digest.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, t| !expired(t, now));
    }
}

impl Resolver for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn resolve<'a>(
        &'a self,
        token: &'a Token,
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<Grant>, Refusal>> {
        let map = self.by_digest.read().unwrap_or_else(|p| p.into_inner());
        let g = map.get(&token.digest()).map(|t| t.grant.clone());
        Box::pin(async move { Ok(g) })
    }

    fn target_kind<'a>(
        &'a self,
        host: &'a Host,
        port: u16,
    ) -> BoxFuture<'a, Result<Option<ConsoleKind>, Refusal>> {
        let map = self.by_digest.read().unwrap_or_else(|p| p.into_inner());
        let k = map
            .values()
            .find(|t| t.grant.target.tcp() == Some((host, port)))
            .map(|t| t.grant.kind);
        Box::pin(async move { Ok(k) })
    }
}

impl TokenAdmin for MemoryStore {
    fn create<'a>(
        &'a self,
        token: &'a Token,
        grant: Grant,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<StoredToken, StoreError>> {
        self.prune(now);
        let mut map = self.by_digest.write().unwrap_or_else(|p| p.into_inner());
        let digest = token.digest();
        let r = match map.entry(digest) {
            std::collections::hash_map::Entry::Occupied(_) => Err(StoreError::Exists),
            std::collections::hash_map::Entry::Vacant(v) => Ok(v
                .insert(StoredToken {
                    digest,
                    grant,
                    created: now,
                })
                .clone()),
        };
        Box::pin(async move { r })
    }

    fn list<'a>(&'a self, now: SystemTime) -> BoxFuture<'a, Result<Vec<StoredToken>, StoreError>> {
        self.prune(now);
        let map = self.by_digest.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<StoredToken> = map.values().cloned().collect();
        v.sort_by_key(|t| t.created);
        Box::pin(async move { Ok(v) })
    }

    fn get<'a>(
        &'a self,
        digest: [u8; 32],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        self.prune(now);
        let map = self.by_digest.read().unwrap_or_else(|p| p.into_inner());
        let t = map.get(&digest).cloned();
        Box::pin(async move { Ok(t) })
    }

    fn revoke<'a>(&'a self, digest: [u8; 32]) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut map = self.by_digest.write().unwrap_or_else(|p| p.into_inner());
        let found = map.remove(&digest).is_some();
        Box::pin(async move { Ok(found) })
    }

    fn repoint<'a>(
        &'a self,
        digest: [u8; 32],
        target: Target,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut map = self.by_digest.write().unwrap_or_else(|p| p.into_inner());
        let found = match map.get_mut(&digest) {
            Some(t) => {
                t.grant.target = target;
                true
            }
            None => false,
        };
        Box::pin(async move { Ok(found) })
    }
}
