//! Use accounting for use-limited tokens: how many primary connections a
//! token has admitted, and the reconnect window after its last use.
//!
//! The rule, the same for every ledger:
//! - while `uses < max_uses`, a claim takes one use ([`UseOutcome::Fresh`])
//!   and remembers the tenant address and `now + window`;
//! - after that, a claim from the same tenant address before the window
//!   ends is a reconnect ([`UseOutcome::Reconnect`]); anything else is
//!   [`Refusal::TokenConsumed`];
//! - the end of a session of the token moves the window to `end + window`
//!   (so a tenant whose VM migrated can reconnect);
//! - SPICE secondary channels never claim: the SPICE session registry
//!   admits them by connection id.
//!
//! [`LocalLedger`] keeps this in memory (one proxy); the Redis ledger in
//! `auth::redis` does the same atomically for a fleet.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::resolver::BoxFuture;
use crate::error::Refusal;

/// One claim on a use-limited token.
#[derive(Clone, Debug)]
pub struct UseRequest {
    pub digest: [u8; 32],
    pub max_uses: u32,
    pub window: Duration,
    pub tenant: IpAddr,
    /// When the token itself expires (the ledger may forget it after that
    /// plus the window).
    pub expires: Option<SystemTime>,
}

/// What a successful claim was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UseOutcome {
    /// A use was taken.
    Fresh,
    /// No use left, but the same tenant is inside the reconnect window.
    Reconnect,
}

/// Why a ledger could not answer.
pub fn unavailable(e: impl fmt::Display) -> Refusal {
    tracing::error!(error = %e, "token use ledger unavailable");
    Refusal::ResolverUnavailable
}

/// Where uses are counted.
pub trait UseLedger: Send + Sync + fmt::Debug {
    /// Takes a use, or admits a reconnect, atomically.
    fn claim<'a>(
        &'a self,
        req: &'a UseRequest,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UseOutcome, Refusal>>;

    /// What [`UseLedger::claim`] would answer, without taking anything.
    fn peek<'a>(
        &'a self,
        req: &'a UseRequest,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UseOutcome, Refusal>>;

    /// A session of the token ended at `now`: the reconnect window restarts.
    fn release<'a>(&'a self, req: &'a UseRequest, now: SystemTime) -> BoxFuture<'a, ()>;

    /// The token was revoked: forget its uses.
    fn forget<'a>(&'a self, digest: [u8; 32]) -> BoxFuture<'a, ()>;
}

/// A use-limited admission's claim on its ledger.
#[derive(Clone, Debug)]
pub struct UseClaim {
    pub ledger: std::sync::Arc<dyn UseLedger>,
    pub req: UseRequest,
}

impl UseClaim {
    /// Takes a use (or admits a reconnect).
    pub async fn claim(&self, now: SystemTime) -> Result<UseOutcome, Refusal> {
        self.ledger.claim(&self.req, now).await
    }

    /// What a claim would answer now.
    pub async fn peek(&self, now: SystemTime) -> Result<UseOutcome, Refusal> {
        self.ledger.peek(&self.req, now).await
    }

    /// The session ended: restart the reconnect window.
    pub async fn release(&self, now: SystemTime) {
        self.ledger.release(&self.req, now).await
    }
}

#[derive(Debug, Clone)]
struct State {
    uses: u32,
    tenant: IpAddr,
    until: SystemTime,
    forget_after: Option<SystemTime>,
}

/// Uses counted in this process.
#[derive(Debug, Default)]
pub struct LocalLedger {
    by_digest: Mutex<HashMap<[u8; 32], State>>,
}

impl LocalLedger {
    fn decide(&self, req: &UseRequest, now: SystemTime, take: bool) -> Result<UseOutcome, Refusal> {
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        if take && map.len() > 1024 {
            map.retain(|_, s| s.forget_after.is_none_or(|t| t > now));
        }
        let state = map.get(&req.digest);
        let uses = state.map_or(0, |s| s.uses);
        if uses < req.max_uses {
            if take {
                map.insert(
                    req.digest,
                    State {
                        uses: uses + 1,
                        tenant: req.tenant,
                        until: now + req.window,
                        forget_after: req.expires.map(|t| t + req.window),
                    },
                );
            }
            return Ok(UseOutcome::Fresh);
        }
        match state {
            Some(s) if s.tenant == req.tenant && now < s.until => Ok(UseOutcome::Reconnect),
            _ => Err(Refusal::TokenConsumed),
        }
    }
}

impl UseLedger for LocalLedger {
    fn claim<'a>(
        &'a self,
        req: &'a UseRequest,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UseOutcome, Refusal>> {
        let r = self.decide(req, now, true);
        Box::pin(async move { r })
    }

    fn peek<'a>(
        &'a self,
        req: &'a UseRequest,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UseOutcome, Refusal>> {
        let r = self.decide(req, now, false);
        Box::pin(async move { r })
    }

    fn release<'a>(&'a self, req: &'a UseRequest, now: SystemTime) -> BoxFuture<'a, ()> {
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get_mut(&req.digest)
            && s.tenant == req.tenant
        {
            s.until = s.until.max(now + req.window);
        }
        Box::pin(async {})
    }

    fn forget<'a>(&'a self, digest: [u8; 32]) -> BoxFuture<'a, ()> {
        self.by_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest);
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ip: &str) -> UseRequest {
        UseRequest {
            digest: [7; 32],
            max_uses: 1,
            window: Duration::from_secs(10),
            tenant: ip.parse().unwrap(),
            expires: None,
        }
    }

    #[tokio::test]
    async fn single_use_then_reconnect_window() {
        let l = LocalLedger::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let a = req("192.0.2.1");
        assert_eq!(l.peek(&a, t0).await, Ok(UseOutcome::Fresh));
        assert_eq!(l.claim(&a, t0).await, Ok(UseOutcome::Fresh));
        assert_eq!(l.claim(&a, t0).await, Ok(UseOutcome::Reconnect));
        let b = req("192.0.2.2");
        assert_eq!(l.claim(&b, t0).await, Err(Refusal::TokenConsumed));
        let late = t0 + Duration::from_secs(11);
        assert_eq!(l.claim(&a, late).await, Err(Refusal::TokenConsumed));
        // A session that ends reopens the window from its end.
        l.release(&a, late).await;
        assert_eq!(
            l.claim(&a, late + Duration::from_secs(5)).await,
            Ok(UseOutcome::Reconnect)
        );
        l.forget(a.digest).await;
        assert_eq!(l.claim(&b, late).await, Ok(UseOutcome::Fresh));
    }
}
