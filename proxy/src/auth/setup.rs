//! Builds the resolver chain and the admin store from the configuration.

use std::sync::Arc;

use super::memory::MemoryStore;
use super::resolver::{Resolver, Resolvers, TokenAdmin};
use super::store::TokenStore;
use super::uses::{LocalLedger, UseLedger};
use crate::config::tokens::{ResolverConfig, StoreKind};

/// Why a resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("signed tokens: {0}")]
    Signed(String),
    #[error("HTTP resolver: {0}")]
    Http(String),
}

impl SetupError {
    /// Whether this is a configuration problem (exit 64) rather than an
    /// unreachable service.
    pub fn is_config(&self) -> bool {
        !matches!(self, SetupError::Redis(_))
    }
}

/// The chain (token files first, then the admin store, signed tokens, the
/// HTTP resolver) and the store the admin API writes to.
#[derive(Debug)]
pub struct Built {
    pub resolvers: Arc<Resolvers>,
    pub admin_store: Arc<dyn TokenAdmin>,
    pub ledger: Arc<dyn UseLedger>,
    /// The Redis store, when configured (fleet-wide revocation channel).
    pub redis: Option<Arc<super::redis::RedisStore>>,
}

/// Connects what needs connecting and builds the chain.
pub async fn build(files: Arc<TokenStore>, cfg: &ResolverConfig) -> Result<Built, SetupError> {
    let mut list: Vec<Arc<dyn Resolver>> = vec![files];
    let mut ledger: Arc<dyn UseLedger> = Arc::new(LocalLedger::default());
    let admin_store: Arc<dyn TokenAdmin>;
    let mut redis_store = None;
    match (&cfg.redis, cfg.store) {
        (Some(r), store) => {
            let redis = Arc::new(
                super::redis::RedisStore::connect(r)
                    .await
                    .map_err(|e| SetupError::Redis(e.to_string()))?,
            );
            ledger = redis.clone();
            redis_store = Some(Arc::clone(&redis));
            list.push(redis.clone());
            admin_store = if store == StoreKind::Redis {
                redis
            } else {
                let m = Arc::new(MemoryStore::default());
                list.push(m.clone());
                m
            };
        }
        (None, _) => {
            let m = Arc::new(MemoryStore::default());
            list.push(m.clone());
            admin_store = m;
        }
    }
    if !cfg.signed_keys.is_empty() {
        let s = super::signed::SignedResolver::load(&cfg.signed_keys)
            .map_err(|e| SetupError::Signed(e.to_string()))?;
        list.push(Arc::new(s));
    }
    if let Some(h) = &cfg.http {
        let r = super::http::HttpResolver::new(h).map_err(|e| SetupError::Http(e.to_string()))?;
        list.push(Arc::new(r));
    }
    Ok(Built {
        resolvers: Arc::new(Resolvers::new(
            list,
            Arc::clone(&ledger),
            cfg.reconnect_window,
        )),
        admin_store,
        ledger,
        redis: redis_store,
    })
}
