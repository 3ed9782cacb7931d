//! An external HTTP resolver: the token is POSTed to a control-plane URL,
//! which answers with the grant.
//!
//! Protocol (JSON both ways):
//! - `POST <url>` `{"token": "<secret>"}` -> `200` + a grant document (see
//!   `auth::doc`), or `404` (unknown token). Anything else is a failure.
//! - `POST <url>` `{"target": "host:port"}` (CONNECT without proxy
//!   authentication) -> `200` `{"kind": "vnc"}` if some console lives
//!   there, `404` otherwise.
//!
//! Answers (including 404) are cached by token digest for `cache_ttl`;
//! each call is bounded by `timeout`; after `failure_threshold` failures in
//! a row the circuit opens for `open_for` (tenants get 503 at once), then
//! one trial call decides whether it closes again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;

use super::doc::GrantDoc;
use super::file::Grant;
use super::resolver::{BoxFuture, Resolver};
use super::token::Token;
use crate::config::tokens::HttpConfig;
use crate::console::{ConsoleKind, Host};
use crate::error::Refusal;

const MAX_ANSWER: usize = 64 * 1024;
const MAX_CACHE: usize = 10_000;

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    trial_running: bool,
}

/// Answers by token digest, with the time they arrived.
type Cache = HashMap<[u8; 32], (Instant, Option<Grant>)>;

/// The external resolver client.
#[derive(Debug)]
pub struct HttpResolver {
    host: String,
    port: u16,
    path: String,
    bearer: Option<String>,
    cfg: HttpConfig,
    cache: Mutex<Cache>,
    breaker: Mutex<Breaker>,
}

/// What one call got.
enum Answer {
    Found(Bytes),
    NotFound,
}

impl HttpResolver {
    pub fn new(cfg: &HttpConfig) -> Result<Self, String> {
        let rest = cfg
            .url
            .strip_prefix("http://")
            .ok_or("the URL must start with http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(['[', ']']).to_owned(),
                p.parse().map_err(|_| "bad port")?,
            ),
            _ => (authority.to_owned(), 80),
        };
        let bearer = cfg
            .key_file
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|k| k.trim().to_owned())
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .transpose()?;
        Ok(Self {
            host,
            port,
            path: path.to_owned(),
            bearer,
            cfg: cfg.clone(),
            cache: Mutex::default(),
            breaker: Mutex::default(),
        })
    }

    /// Whether a call may go out now (circuit closed, or this is the trial).
    fn admit_call(&self) -> bool {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match b.open_until {
            Some(t) if Instant::now() < t => false,
            Some(_) if b.trial_running => false,
            Some(_) => {
                b.trial_running = true;
                true
            }
            None => true,
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        b.trial_running = false;
        if ok {
            if b.open_until.is_some() {
                tracing::info!("HTTP resolver answers again: circuit closed");
            }
            *b = Breaker::default();
        } else {
            b.failures += 1;
            if b.failures >= self.cfg.failure_threshold {
                if b.open_until.is_none_or(|t| Instant::now() >= t) {
                    tracing::error!(
                        failures = b.failures,
                        open_for = ?self.cfg.open_for,
                        "HTTP resolver failing: circuit open"
                    );
                }
                b.open_until = Some(Instant::now() + self.cfg.open_for);
            }
        }
    }

    async fn call(&self, body: serde_json::Value) -> Result<Answer, String> {
        let fut = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = hyper::Request::post(self.path.as_str())
                .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
                .header(hyper::header::CONTENT_TYPE, "application/json");
            if let Some(k) = &self.bearer {
                req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
            }
            let req = req
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| e.to_string())?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            match status.as_u16() {
                200 => Ok(Answer::Found(bytes)),
                404 => Ok(Answer::NotFound),
                s => Err(format!("status {s}")),
            }
        };
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.cfg.timeout)),
        }
    }

    async fn lookup(&self, token: &Token) -> Result<Option<Grant>, Refusal> {
        let d = token.digest();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, g)) = cache.get(&d)
                && at.elapsed() < self.cfg.cache_ttl
            {
                return Ok(g.clone());
            }
        }
        if !self.admit_call() {
            return Err(Refusal::ResolverUnavailable);
        }
        let answer = self
            .call(serde_json::json!({ "token": token.expose() }))
            .await;
        self.record(answer.is_ok());
        let grant = match answer {
            Ok(Answer::NotFound) => None,
            Ok(Answer::Found(b)) => {
                let g = serde_json::from_slice::<GrantDoc>(&b)
                    .map_err(|e| e.to_string())
                    .and_then(|d| d.into_grant().map_err(|e| e.to_string()));
                match g {
                    Ok(g) => Some(g),
                    Err(e) => {
                        tracing::error!(token.id = %token.id(), error = %e, "HTTP resolver answered an invalid grant");
                        return Err(Refusal::ResolverUnavailable);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(token.id = %token.id(), error = %e, "HTTP resolver failed");
                return Err(Refusal::ResolverUnavailable);
            }
        };
        if !self.cfg.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= MAX_CACHE {
                let ttl = self.cfg.cache_ttl;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.len() >= MAX_CACHE {
                    cache.clear();
                }
            }
            cache.insert(d, (Instant::now(), grant.clone()));
        }
        Ok(grant)
    }
}

impl Resolver for HttpResolver {
    fn name(&self) -> &'static str {
        "http"
    }

    fn resolve<'a>(
        &'a self,
        token: &'a Token,
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<Grant>, Refusal>> {
        Box::pin(self.lookup(token))
    }

    fn target_kind<'a>(
        &'a self,
        host: &'a Host,
        port: u16,
    ) -> BoxFuture<'a, Result<Option<ConsoleKind>, Refusal>> {
        Box::pin(async move {
            if !self.admit_call() {
                return Err(Refusal::ResolverUnavailable);
            }
            let answer = self
                .call(serde_json::json!({ "target": format!("{host}:{port}") }))
                .await;
            self.record(answer.is_ok());
            match answer {
                Ok(Answer::Found(b)) => {
                    #[derive(serde::Deserialize)]
                    struct Kind {
                        kind: ConsoleKind,
                    }
                    Ok(serde_json::from_slice::<Kind>(&b).ok().map(|k| k.kind))
                }
                Ok(Answer::NotFound) => Ok(None),
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP resolver failed (CONNECT target check)");
                    Err(Refusal::ResolverUnavailable)
                }
            }
        })
    }
}
