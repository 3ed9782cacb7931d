//! One trait behind every token source, and the chain that asks them in
//! order: token files, the admin-API store (memory or Redis), signed
//! stateless tokens, the external HTTP resolver.
//!
//! A resolver maps a presented token to a [`Grant`]; the chain then checks
//! what is common to every source (validity times, source address) and
//! attaches the use ledger that counts use-limited tokens. Resolvers see
//! the [`Token`] (masked) and key everything by its SHA-256 digest.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::file::Grant;
use super::store::Admission;
use super::token::Token;
use super::uses::{UseClaim, UseLedger, UseRequest};
use crate::console::{ConsoleKind, Host, Target};
use crate::error::Refusal;

/// A boxed, sendable future (the resolver trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of tokens.
pub trait Resolver: Send + Sync + fmt::Debug {
    /// Stable name for logs and metrics: `file`, `memory`, `redis`, `signed`, `http`.
    fn name(&self) -> &'static str;

    /// The grant of `token`, `Ok(None)` if this source does not know it
    /// (the next one is asked), or a refusal (`token_expired` for a token
    /// this source knows to be invalid, `resolver_unavailable`).
    fn resolve<'a>(
        &'a self,
        token: &'a Token,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<Grant>, Refusal>>;

    /// For an unauthenticated CONNECT: the console kind of a TCP endpoint
    /// some token of this source names.
    fn target_kind<'a>(
        &'a self,
        _host: &'a Host,
        _port: u16,
    ) -> BoxFuture<'a, Result<Option<ConsoleKind>, Refusal>> {
        Box::pin(async { Ok(None) })
    }
}

/// The resolvers in the order they are asked, and the use ledger.
#[derive(Debug)]
pub struct Resolvers {
    list: Vec<Arc<dyn Resolver>>,
    pub ledger: Arc<dyn UseLedger>,
    /// Reconnect window of use-limited tokens that set none.
    pub default_window: Duration,
}

impl Resolvers {
    pub fn new(
        list: Vec<Arc<dyn Resolver>>,
        ledger: Arc<dyn UseLedger>,
        default_window: Duration,
    ) -> Self {
        Self {
            list,
            ledger,
            default_window,
        }
    }

    /// Names of the configured resolvers, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|r| r.name()).collect()
    }

    /// Resolves a presented token for a tenant at `now`. Does not take a
    /// use: the caller claims [`Admission::uses`] when the connection turns
    /// out to be a primary one.
    pub async fn resolve(
        &self,
        presented: &str,
        tenant: IpAddr,
        now: SystemTime,
    ) -> Result<Admission, Refusal> {
        let token = Token::new(presented);
        let mut unavailable = false;
        for r in &self.list {
            match r.resolve(&token, now).await {
                Ok(Some(grant)) => return self.check(&token, grant, r.name(), tenant, now),
                Ok(None) => {}
                Err(Refusal::ResolverUnavailable) => unavailable = true,
                Err(e) => return Err(e),
            }
        }
        Err(if unavailable {
            Refusal::ResolverUnavailable
        } else {
            Refusal::TokenUnknown
        })
    }

    fn check(
        &self,
        token: &Token,
        grant: Grant,
        source: &'static str,
        tenant: IpAddr,
        now: SystemTime,
    ) -> Result<Admission, Refusal> {
        if grant.not_before.is_some_and(|t| now < t) || grant.not_after.is_some_and(|t| now >= t) {
            return Err(Refusal::TokenExpired);
        }
        let l = &grant.limits;
        if !l.sources.is_empty() && !l.sources.iter().any(|c| c.contains(tenant)) {
            return Err(Refusal::SourceNotAllowed);
        }
        let uses = l.max_uses.map(|max_uses| UseClaim {
            ledger: Arc::clone(&self.ledger),
            req: UseRequest {
                digest: token.digest(),
                max_uses,
                window: l.reconnect_window.unwrap_or(self.default_window),
                tenant,
                expires: grant.not_after,
            },
        });
        Ok(Admission {
            token_id: token.id(),
            digest: token.digest(),
            source,
            grant,
            uses,
        })
    }

    /// The console kind of a TCP endpoint some token names (the CONNECT
    /// allow-list without proxy authentication).
    pub async fn target_kind(&self, host: &Host, port: u16) -> Result<ConsoleKind, Refusal> {
        for r in &self.list {
            if let Ok(Some(k)) = r.target_kind(host, port).await {
                return Ok(k);
            }
        }
        Err(Refusal::TargetNotAllowed)
    }
}

/// A token held by a writable store (the admin API's view).
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub digest: [u8; 32],
    pub grant: Grant,
    pub created: SystemTime,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a token with this secret already exists")]
    Exists,
    #[error("token store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Exists => "exists",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

/// A store the admin API writes to (in memory, or Redis for a fleet).
pub trait TokenAdmin: Send + Sync + fmt::Debug {
    fn create<'a>(
        &'a self,
        token: &'a Token,
        grant: Grant,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<StoredToken, StoreError>>;

    fn list<'a>(&'a self, now: SystemTime) -> BoxFuture<'a, Result<Vec<StoredToken>, StoreError>>;

    fn get<'a>(
        &'a self,
        digest: [u8; 32],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>>;

    /// Removes the token; `Ok(false)` if there was none.
    fn revoke<'a>(&'a self, digest: [u8; 32]) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Points the token at a new backend atomically (migration);
    /// `Ok(false)` if there is no such token.
    fn repoint<'a>(
        &'a self,
        digest: [u8; 32],
        target: Target,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
}

/// Lower-case hex of a digest (admin API resource names, Redis keys).
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::memory::MemoryStore;
    use crate::auth::uses::LocalLedger;
    use crate::auth::{Limits, doc::GrantDoc};

    #[tokio::test]
    async fn chain_checks_time_and_source() {
        let mem = Arc::new(MemoryStore::default());
        let now = SystemTime::now();
        let mut g = GrantDoc {
            target: "127.0.0.1:5900".into(),
            ..Default::default()
        }
        .into_grant()
        .unwrap();
        g.limits = Limits {
            max_uses: Some(1),
            sources: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        mem.create(&Token::new("a"), g.clone(), now).await.unwrap();
        g.not_after = Some(now - Duration::from_secs(1));
        mem.create(&Token::new("old"), g, now).await.unwrap();
        let r = Resolvers::new(
            vec![mem.clone()],
            Arc::new(LocalLedger::default()),
            Duration::from_secs(30),
        );
        let inside: IpAddr = "10.1.1.1".parse().unwrap();
        let a = r.resolve("a", inside, now).await.unwrap();
        assert_eq!(a.source, "memory");
        assert_eq!(a.uses.as_ref().unwrap().req.window, Duration::from_secs(30));
        assert_eq!(
            r.resolve("a", "192.0.2.1".parse().unwrap(), now)
                .await
                .unwrap_err(),
            Refusal::SourceNotAllowed
        );
        assert_eq!(
            r.resolve("old", inside, now).await.unwrap_err(),
            Refusal::TokenExpired
        );
        assert_eq!(
            r.resolve("zz", inside, now).await.unwrap_err(),
            Refusal::TokenUnknown
        );
        assert!(mem.revoke(Token::new("a").digest()).await.unwrap());
        assert_eq!(
            r.resolve("a", inside, now).await.unwrap_err(),
            Refusal::TokenUnknown
        );
    }

    #[test]
    fn hex_round_trip() {
        let d = Token::new("x").digest();
        assert_eq!(unhex(&hex(&d)), Some(d));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(64)), None);
    }
}
