//! The `[tokens]` resolver settings (reconnect window, Redis, signed
//! tokens, the external HTTP resolver) and the `[admin]` API section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, duration};

/// `[tokens.redis]`: the shared store of a fleet of proxies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://host:port/db` or `unix:///path`.
    pub url: String,
    /// Key prefix (default `consolegate:`).
    pub prefix: Option<String>,
    /// Per-command timeout (default 2s).
    pub timeout: Option<String>,
}

/// `[tokens.signed]`: stateless tokens signed with HMAC-SHA256.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedSection {
    /// Files each holding one key (at least 32 bytes); several allow rotation.
    pub hmac_key_files: Vec<PathBuf>,
}

/// `[tokens.http]`: an external resolver.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// `http://host:port/path` the token is POSTed to.
    pub url: String,
    pub timeout: Option<String>,
    pub cache_ttl: Option<String>,
    pub failure_threshold: Option<u32>,
    pub open_for: Option<String>,
    /// File with a bearer key sent as `Authorization: Bearer ...`.
    pub key_file: Option<PathBuf>,
}

/// Where the admin API keeps the tokens it creates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

/// How the admin API authenticates callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminAuthKind {
    /// Bearer key and/or client certificates (whichever are configured).
    #[default]
    Required,
    /// No authentication at all: explicit, loudly logged.
    None,
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub auth: Option<AdminAuthKind>,
    pub key_file: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Serve the TCP listener without TLS (loopback addresses only).
    #[serde(default)]
    pub plain_http: bool,
}

/// Validated resolver settings.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    pub reconnect_window: Duration,
    pub store: StoreKind,
    pub redis: Option<RedisConfig>,
    pub signed_keys: Vec<PathBuf>,
    pub http: Option<HttpConfig>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub url: String,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub key_file: Option<PathBuf>,
}

/// Validated admin API settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub auth: AdminAuthKind,
    pub key_file: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Certificate and key for the TCP listener (default: the tenant's).
    pub tls: Option<(PathBuf, PathBuf)>,
    pub plain_http: bool,
}

impl ResolverConfig {
    /// Whether any source besides token files is configured.
    pub fn has_other_sources(&self, admin: bool) -> bool {
        admin || self.redis.is_some() || !self.signed_keys.is_empty() || self.http.is_some()
    }
}

/// Makes the paths of these sections relative to the config file.
pub fn anchor(
    base: &Path,
    signed: &mut Option<SignedSection>,
    http: &mut Option<HttpSection>,
    admin: &mut AdminSection,
) {
    let rel = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    if let Some(s) = signed {
        s.hmac_key_files.iter_mut().for_each(rel);
    }
    if let Some(h) = http {
        h.key_file.as_mut().map(rel);
    }
    for p in [
        &mut admin.unix,
        &mut admin.key_file,
        &mut admin.client_ca,
        &mut admin.tls_cert,
        &mut admin.tls_key,
    ] {
        p.as_mut().map(rel);
    }
}

/// Validates the resolver settings of `[tokens]`.
pub fn build_resolvers(
    reconnect_window: Option<&str>,
    store: Option<StoreKind>,
    redis: Option<&RedisSection>,
    signed: Option<&SignedSection>,
    http: Option<&HttpSection>,
) -> Result<ResolverConfig, ConfigError> {
    let reconnect_window = duration(
        "tokens.reconnect_window",
        reconnect_window,
        Duration::from_secs(30),
    )?;
    let redis = redis
        .map(|r| {
            if r.url.trim().is_empty() {
                return Err(ConfigError::Invalid("tokens.redis.url is empty".into()));
            }
            Ok(RedisConfig {
                url: r.url.clone(),
                prefix: r.prefix.clone().unwrap_or_else(|| "consolegate:".into()),
                timeout: duration(
                    "tokens.redis.timeout",
                    r.timeout.as_deref(),
                    Duration::from_secs(2),
                )?,
            })
        })
        .transpose()?;
    let store = store.unwrap_or_default();
    if store == StoreKind::Redis && redis.is_none() {
        return Err(ConfigError::Invalid(
            "tokens.store = \"redis\" needs a [tokens.redis] table".into(),
        ));
    }
    let signed_keys = signed.map(|s| s.hmac_key_files.clone()).unwrap_or_default();
    if signed.is_some() && signed_keys.is_empty() {
        return Err(ConfigError::Invalid(
            "tokens.signed.hmac_key_files is empty".into(),
        ));
    }
    let http = http
        .map(|h| {
            if !h.url.starts_with("http://") {
                return Err(ConfigError::Invalid(
                    "tokens.http.url must be an http:// URL (loopback or a trusted network)".into(),
                ));
            }
            Ok(HttpConfig {
                url: h.url.clone(),
                timeout: duration(
                    "tokens.http.timeout",
                    h.timeout.as_deref(),
                    Duration::from_secs(2),
                )?,
                cache_ttl: duration(
                    "tokens.http.cache_ttl",
                    h.cache_ttl.as_deref(),
                    Duration::from_secs(5),
                )?,
                failure_threshold: h.failure_threshold.unwrap_or(5).max(1),
                open_for: duration(
                    "tokens.http.open_for",
                    h.open_for.as_deref(),
                    Duration::from_secs(10),
                )?,
                key_file: h.key_file.clone(),
            })
        })
        .transpose()?;
    Ok(ResolverConfig {
        reconnect_window,
        store,
        redis,
        signed_keys,
        http,
    })
}

/// Validates `[admin]`; `None` when no admin listener is configured.
pub fn build_admin(a: &AdminSection) -> Result<Option<AdminConfig>, ConfigError> {
    if a.listen.is_none() && a.unix.is_none() {
        return Ok(None);
    }
    let auth = a.auth.unwrap_or_default();
    if auth == AdminAuthKind::Required && a.key_file.is_none() && a.client_ca.is_none() {
        return Err(ConfigError::Invalid(
            "admin API: set admin.key_file (bearer key) and/or admin.client_ca (client \
             certificates), or disable authentication explicitly with admin.auth = \"none\""
                .into(),
        ));
    }
    if a.client_ca.is_some() && (a.listen.is_none() || a.plain_http) {
        return Err(ConfigError::Invalid(
            "admin.client_ca needs the TLS listener (admin.listen without plain_http)".into(),
        ));
    }
    if let Some(l) = a.listen
        && a.plain_http
        && !l.ip().is_loopback()
    {
        return Err(ConfigError::Invalid(format!(
            "admin.plain_http on non-loopback address {l}: use TLS"
        )));
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => {
            return Err(ConfigError::Invalid(
                "admin.tls_cert and admin.tls_key go together".into(),
            ));
        }
    };
    Ok(Some(AdminConfig {
        listen: a.listen,
        unix: a.unix.clone(),
        auth,
        key_file: a.key_file.clone(),
        client_ca: a.client_ca.clone(),
        tls,
        plain_http: a.plain_http,
    }))
}
