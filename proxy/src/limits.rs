//! Admission limits: established sessions in total, per token and per
//! tenant address (the real one, after PROXY protocol / X-Forwarded-For
//! from trusted balancers). A session holds a [`Slot`] from admission to
//! its end; dropping the slot gives it back. 0 means no limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::auth::TokenId;
use crate::error::Refusal;

/// The configured maxima (0 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Maxima {
    pub total: usize,
    pub per_token: usize,
    pub per_source: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_token: HashMap<TokenId, usize>,
    by_source: HashMap<IpAddr, usize>,
}

/// Live session counts against [`Maxima`].
#[derive(Debug)]
pub struct Limits {
    max: Maxima,
    counts: Mutex<Counts>,
}

/// One admitted session's place; released on drop.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    token: Option<TokenId>,
    source: IpAddr,
}

fn over(max: usize, now: usize) -> bool {
    max != 0 && now >= max
}

impl Limits {
    pub fn new(max: Maxima) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more session from `source` with `token`, or says which
    /// limit it would break.
    pub fn acquire(
        self: &Arc<Self>,
        source: IpAddr,
        token: Option<TokenId>,
    ) -> Result<Slot, Refusal> {
        let mut c = self.counts();
        if over(self.max.total, c.total) {
            return Err(Refusal::TooManySessions);
        }
        if let Some(t) = token
            && over(self.max.per_token, c.by_token.get(&t).copied().unwrap_or(0))
        {
            return Err(Refusal::TokenSessionLimit);
        }
        if over(
            self.max.per_source,
            c.by_source.get(&source).copied().unwrap_or(0),
        ) {
            return Err(Refusal::SourceSessionLimit);
        }
        c.total += 1;
        if let Some(t) = token {
            *c.by_token.entry(t).or_default() += 1;
        }
        *c.by_source.entry(source).or_default() += 1;
        Ok(Slot {
            limits: Arc::clone(self),
            token,
            source,
        })
    }

    /// Sessions admitted and not yet ended.
    pub fn active(&self) -> usize {
        self.counts().total
    }
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(t) = &self.token {
            release(&mut c.by_token, t);
        }
        release(&mut c.by_source, &self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(b: u8) -> Option<TokenId> {
        Some(crate::auth::Token::new(format!("token-{b}")).id())
    }

    #[test]
    fn each_limit_refuses_with_its_reason_and_slots_come_back() {
        let l = Limits::new(Maxima {
            total: 3,
            per_token: 2,
            per_source: 2,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a, tok(1)).unwrap();
        let s2 = l.acquire(b, tok(1)).unwrap();
        assert_eq!(
            l.acquire(b, tok(1)).unwrap_err(),
            Refusal::TokenSessionLimit
        );
        let s3 = l.acquire(b, tok(2)).unwrap();
        assert_eq!(l.acquire(a, tok(3)).unwrap_err(), Refusal::TooManySessions);
        drop(s1);
        assert_eq!(
            l.acquire(b, tok(3)).unwrap_err(),
            Refusal::SourceSessionLimit
        );
        let s4 = l.acquire(a, None).unwrap();
        assert_eq!(l.active(), 3);
        drop((s2, s3, s4));
        assert_eq!(l.active(), 0);
        let c = l.counts();
        assert!(c.by_token.is_empty() && c.by_source.is_empty(), "{c:?}");
    }

    #[test]
    fn zero_means_unlimited() {
        let l = Limits::new(Maxima {
            total: 0,
            per_token: 0,
            per_source: 0,
        });
        let ip: IpAddr = "::1".parse().unwrap();
        let slots: Vec<_> = (0..1000).map(|_| l.acquire(ip, tok(9)).unwrap()).collect();
        assert_eq!(l.active(), 1000);
        drop(slots);
        assert_eq!(l.active(), 0);
    }
}
