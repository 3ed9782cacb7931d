//! Redis as the shared token store of a fleet of proxies.
//!
//! Keys (under the configured prefix; never the secret, always its digest):
//! - `tok:<sha256 hex>`: the grant as JSON, expiring with the token
//!   (`PXAT not_after`), so Redis TTLs do the expiry;
//! - `use:<sha256 hex>`: a hash `uses`, `ip`, `until` (ms) counting uses of
//!   a use-limited token. A Lua script takes a use atomically, so of two
//!   proxies racing for a single-use token exactly one wins;
//! - the channel `revoked` carries the digests of revoked tokens, so every
//!   proxy of the fleet stops their sessions.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::doc::GrantDoc;
use super::file::Grant;
use super::resolver::{BoxFuture, Resolver, StoreError, StoredToken, TokenAdmin, hex, unhex};
use super::token::Token;
use super::uses::{UseLedger, UseOutcome, UseRequest, unavailable};
use crate::config::tokens::RedisConfig;
use crate::console::Target;
use crate::error::Refusal;

/// Takes a use, admits a reconnect, or refuses; `ARGV[6]` is `claim` or
/// `peek`. Returns 1 fresh, 2 reconnect, 0 consumed.
const CLAIM: &str = r"
local uses = tonumber(redis.call('HGET', KEYS[1], 'uses') or '0')
local max = tonumber(ARGV[1])
local now = tonumber(ARGV[3])
if uses < max then
  if ARGV[6] == 'claim' then
    redis.call('HINCRBY', KEYS[1], 'uses', 1)
    redis.call('HSET', KEYS[1], 'ip', ARGV[2], 'until', now + tonumber(ARGV[4]))
    local ttl = tonumber(ARGV[5])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  end
  return 1
end
local ip = redis.call('HGET', KEYS[1], 'ip')
local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if ip == ARGV[2] and now < untl then return 2 end
return 0
";

/// A session of the token ended: restart the window if the same tenant
/// holds it.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'ip') == ARGV[1] then
  local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  local want = tonumber(ARGV[2])
  if want > untl then redis.call('HSET', KEYS[1], 'until', want) end
end
return 0
";

/// Re-points a token at a new target, keeping its TTL.
const REPOINT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local d = cjson.decode(v)
d['grant']['target'] = ARGV[1]
redis.call('SET', KEYS[1], cjson.encode(d), 'KEEPTTL')
return 1
";

#[derive(Serialize, Deserialize)]
struct Stored {
    grant: GrantDoc,
    created: String,
}

/// The Redis store, resolver and use ledger.
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    claim: redis::Script,
    release: redis::Script,
    repoint: redis::Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedisStore {
    /// Connects (the connection re-establishes itself later on failures).
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(cfg.url.as_str())?;
        let mcfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(cfg.timeout)
            .set_response_timeout(cfg.timeout)
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            cfg.timeout * 3,
            ConnectionManager::new_with_config(client.clone(), mcfg),
        )
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out")))??;
        Ok(Self {
            client,
            conn,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            repoint: redis::Script::new(REPOINT),
        })
    }

    fn tok_key(&self, d: &[u8; 32]) -> String {
        format!("{}tok:{}", self.prefix, hex(d))
    }

    fn use_key(&self, d: &[u8; 32]) -> String {
        format!("{}use:{}", self.prefix, hex(d))
    }

    fn channel(&self) -> String {
        format!("{}revoked", self.prefix)
    }

    async fn timed<T>(&self, f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    fn decode(raw: &str, digest: [u8; 32]) -> Option<StoredToken> {
        let s: Stored = serde_json::from_str(raw).ok()?;
        Some(StoredToken {
            digest,
            grant: s.grant.into_grant().ok()?,
            created: humantime::parse_rfc3339_weak(&s.created).ok()?,
        })
    }

    async fn run_claim(
        &self,
        req: &UseRequest,
        now: SystemTime,
        mode: &str,
    ) -> Result<UseOutcome, Refusal> {
        let ttl = req
            .expires
            .map_or(0, |e| ms(e + req.window).saturating_sub(ms(now)).max(1));
        let mut conn = self.conn.clone();
        let mut inv = self.claim.key(self.use_key(&req.digest));
        inv.arg(req.max_uses)
            .arg(req.tenant.to_string())
            .arg(ms(now))
            .arg(req.window.as_millis() as u64)
            .arg(ttl)
            .arg(mode);
        let r: i64 = self
            .timed(inv.invoke_async(&mut conn))
            .await
            .map_err(unavailable)?;
        match r {
            1 => Ok(UseOutcome::Fresh),
            2 => Ok(UseOutcome::Reconnect),
            _ => Err(Refusal::TokenConsumed),
        }
    }

    /// Stops local sessions of tokens revoked anywhere in the fleet, until
    /// the process ends (re-subscribing after Redis failures).
    pub async fn watch_revocations(
        self: Arc<Self>,
        sessions: Arc<crate::admin::sessions::SessionTable>,
    ) {
        use futures_util::StreamExt as _;
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut ps) => {
                    if ps.subscribe(self.channel()).await.is_ok() {
                        let mut stream = ps.on_message();
                        while let Some(msg) = stream.next().await {
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if let Some(d) = unhex(&payload) {
                                let n = sessions.kill_token(&d);
                                if n > 0 {
                                    tracing::info!(
                                        token.id = &payload[..8],
                                        sessions_killed = n,
                                        "token revoked in the fleet: sessions stopped"
                                    );
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis: revocation channel unavailable; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Resolver for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn resolve<'a>(
        &'a self,
        token: &'a Token,
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<Grant>, Refusal>> {
        Box::pin(async move {
            let d = token.digest();
            let mut conn = self.conn.clone();
            let raw: Option<String> = self
                .timed(conn.get(self.tok_key(&d)))
                .await
                .map_err(unavailable)?;
            Ok(match raw {
                None => None,
                Some(raw) => match Self::decode(&raw, d) {
                    Some(t) => Some(t.grant),
                    None => {
                        tracing::error!(token.id = %token.id(), "redis: stored token is not a valid grant; ignored");
                        None
                    }
                },
            })
        })
    }
}

impl UseLedger for RedisStore {
    fn claim<'a>(
        &'a self,
        req: &'a UseRequest,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UseOutcome, Refusal>> {
        Box::pin(self.run_claim(req, now, "claim"))
    }

    fn peek<'a>(
        &'a self,
        req: &'a UseRequest,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<UseOutcome, Refusal>> {
        Box::pin(self.run_claim(req, now, "peek"))
    }

    fn release<'a>(&'a self, req: &'a UseRequest, now: SystemTime) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut inv = self.release.key(self.use_key(&req.digest));
            inv.arg(req.tenant.to_string()).arg(ms(now + req.window));
            if let Err(e) = self.timed(inv.invoke_async::<i64>(&mut conn)).await {
                tracing::warn!(error = %e, "redis: could not restart a reconnect window");
            }
        })
    }

    fn forget<'a>(&'a self, digest: [u8; 32]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _ = self.timed(conn.del::<_, i64>(self.use_key(&digest))).await;
        })
    }
}

impl TokenAdmin for RedisStore {
    fn create<'a>(
        &'a self,
        token: &'a Token,
        grant: Grant,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<StoredToken, StoreError>> {
        Box::pin(async move {
            let d = token.digest();
            let value = serde_json::to_string(&Stored {
                grant: GrantDoc::from_grant(&grant, true),
                created: humantime::format_rfc3339_seconds(now).to_string(),
            })
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.tok_key(&d)).arg(value).arg("NX");
            if let Some(t) = grant.not_after {
                cmd.arg("PXAT").arg(ms(t).max(1));
            }
            let mut conn = self.conn.clone();
            let ok: Option<String> = self
                .timed(cmd.query_async(&mut conn))
                .await
                .map_err(StoreError::Unavailable)?;
            match ok {
                Some(_) => Ok(StoredToken {
                    digest: d,
                    grant,
                    created: now,
                }),
                None => Err(StoreError::Exists),
            }
        })
    }

    fn list<'a>(&'a self, _now: SystemTime) -> BoxFuture<'a, Result<Vec<StoredToken>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let pattern = format!("{}tok:*", self.prefix);
            let mut cursor: u64 = 0;
            let mut keys: Vec<String> = Vec::new();
            loop {
                let (next, batch): (u64, Vec<String>) = self
                    .timed(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(200)
                            .query_async(&mut conn),
                    )
                    .await
                    .map_err(StoreError::Unavailable)?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 || keys.len() > 100_000 {
                    break;
                }
            }
            let mut out = Vec::new();
            for chunk in keys.chunks(200) {
                let vals: Vec<Option<String>> = self
                    .timed(redis::cmd("MGET").arg(chunk).query_async(&mut conn))
                    .await
                    .map_err(StoreError::Unavailable)?;
                for (k, v) in chunk.iter().zip(vals) {
                    let d = k.rsplit(':').next().and_then(unhex);
                    if let (Some(d), Some(v)) = (d, v)
                        && let Some(t) = Self::decode(&v, d)
                    {
                        out.push(t);
                    }
                }
            }
            out.sort_by_key(|t| t.created);
            Ok(out)
        })
    }

    fn get<'a>(
        &'a self,
        digest: [u8; 32],
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<StoredToken>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let raw: Option<String> = self
                .timed(conn.get(self.tok_key(&digest)))
                .await
                .map_err(StoreError::Unavailable)?;
            Ok(raw.and_then(|r| Self::decode(&r, digest)))
        })
    }

    fn revoke<'a>(&'a self, digest: [u8; 32]) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (n, _, _): (i64, i64, i64) = self
                .timed(
                    redis::pipe()
                        .atomic()
                        .del(self.tok_key(&digest))
                        .del(self.use_key(&digest))
                        .publish(self.channel(), hex(&digest))
                        .query_async(&mut conn),
                )
                .await
                .map_err(StoreError::Unavailable)?;
            Ok(n > 0)
        })
    }

    fn repoint<'a>(
        &'a self,
        digest: [u8; 32],
        target: Target,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let t = match &target {
                Target::Unix(p) => format!("unix:{}", p.display()),
                t => t.to_string(),
            };
            let mut conn = self.conn.clone();
            let mut inv = self.repoint.key(self.tok_key(&digest));
            inv.arg(t);
            let n: i64 = self
                .timed(inv.invoke_async(&mut conn))
                .await
                .map_err(StoreError::Unavailable)?;
            Ok(n == 1)
        })
    }
}
