//! Refusal kinds shared by every front end.
//!
//! A refusal is the proxy saying "no" to a tenant before a session exists.
//! Each kind has a stable name (metric label, `reason=` log field), a
//! side that caused it, and the HTTP status the tenant gets.

use std::fmt;

/// Which side of a session caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The tenant (browser, VNC client) sent something wrong.
    Tenant,
    /// The compute host (QEMU) failed or misbehaved.
    Compute,
    /// consolegate itself (configuration, resources).
    Proxy,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Tenant => "tenant",
            Side::Compute => "compute",
            Side::Proxy => "proxy",
        })
    }
}

/// Why a tenant request was refused before a session started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    HeadTooLarge,
    HandshakeTimeout,
    MethodNotAllowed,
    NotFound,
    UpgradeRequired,
    BadSubprotocol,
    TokenMissing,
    TokenUnknown,
    TokenExpired,
    OriginNotAllowed,
    TargetNotAllowed,
    ProxyAuthRequired,
    ComputeUnreachable,
    ComputeTimeout,
    ComputeConfig,
    TlsHandshake,
    TooManySessions,
    TokenSessionLimit,
    SourceSessionLimit,
    /// A use-limited token has no use left and is outside its reconnect window.
    TokenConsumed,
    /// The token does not admit this tenant address.
    SourceNotAllowed,
    /// A token resolver (Redis, the external HTTP resolver) did not answer.
    ResolverUnavailable,
    /// A signed token whose signature or claims do not verify.
    TokenInvalid,
}

impl Refusal {
    /// Stable name, used as `reason=` in logs and as a metric label.
    pub fn kind(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::NotFound => "not_found",
            Refusal::UpgradeRequired => "upgrade_required",
            Refusal::BadSubprotocol => "bad_subprotocol",
            Refusal::TokenMissing => "token_missing",
            Refusal::TokenUnknown => "token_unknown",
            Refusal::TokenExpired => "token_expired",
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::TargetNotAllowed => "target_not_allowed",
            Refusal::ProxyAuthRequired => "proxy_auth_required",
            Refusal::ComputeUnreachable => "compute_unreachable",
            Refusal::ComputeTimeout => "compute_timeout",
            Refusal::ComputeConfig => "compute_config",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::TooManySessions => "too_many_sessions",
            Refusal::TokenSessionLimit => "token_session_limit",
            Refusal::SourceSessionLimit => "source_session_limit",
            Refusal::TokenConsumed => "token_consumed",
            Refusal::SourceNotAllowed => "source_not_allowed",
            Refusal::ResolverUnavailable => "resolver_unavailable",
            Refusal::TokenInvalid => "token_invalid",
        }
    }

    /// HTTP status and reason phrase sent to the tenant.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::BadRequest | Refusal::BadSubprotocol | Refusal::TlsHandshake => {
                (400, "Bad Request")
            }
            Refusal::HeadTooLarge => (431, "Request Header Fields Too Large"),
            Refusal::HandshakeTimeout => (408, "Request Timeout"),
            Refusal::MethodNotAllowed => (405, "Method Not Allowed"),
            Refusal::NotFound => (404, "Not Found"),
            Refusal::UpgradeRequired => (426, "Upgrade Required"),
            Refusal::TokenMissing => (401, "Unauthorized"),
            Refusal::TokenUnknown
            | Refusal::TokenExpired
            | Refusal::OriginNotAllowed
            | Refusal::TargetNotAllowed
            | Refusal::TokenConsumed
            | Refusal::TokenInvalid
            | Refusal::SourceNotAllowed => (403, "Forbidden"),
            Refusal::ResolverUnavailable => (503, "Service Unavailable"),
            Refusal::ProxyAuthRequired => (407, "Proxy Authentication Required"),
            Refusal::ComputeUnreachable | Refusal::ComputeConfig => (502, "Bad Gateway"),
            Refusal::ComputeTimeout => (504, "Gateway Timeout"),
            Refusal::TooManySessions => (503, "Service Unavailable"),
            Refusal::TokenSessionLimit | Refusal::SourceSessionLimit => (429, "Too Many Requests"),
        }
    }

    /// Which side caused the refusal.
    pub fn side(self) -> Side {
        match self {
            Refusal::ComputeUnreachable | Refusal::ComputeTimeout => Side::Compute,
            Refusal::ComputeConfig | Refusal::TooManySessions | Refusal::ResolverUnavailable => {
                Side::Proxy
            }
            _ => Side::Tenant,
        }
    }

    /// Text sent to the tenant in the response body. Never contains secrets,
    /// and never says whether a token exists but expired (both read the same).
    pub fn tenant_message(self) -> &'static str {
        match self {
            Refusal::BadRequest => "malformed request",
            Refusal::HeadTooLarge => "request head too large",
            Refusal::HandshakeTimeout => "request not received in time",
            Refusal::MethodNotAllowed => "method not allowed",
            Refusal::NotFound => "no such console endpoint",
            Refusal::UpgradeRequired => "this endpoint speaks WebSocket only",
            Refusal::BadSubprotocol => "no supported WebSocket subprotocol (binary, base64)",
            Refusal::TokenMissing => "a console token is required",
            Refusal::TokenUnknown | Refusal::TokenExpired | Refusal::TokenInvalid => {
                "invalid or expired console token"
            }
            Refusal::OriginNotAllowed => "origin not allowed",
            Refusal::TargetNotAllowed => "target is not a console endpoint",
            Refusal::ProxyAuthRequired => "proxy authentication required",
            Refusal::ComputeUnreachable => "console backend unreachable",
            Refusal::ComputeTimeout => "console backend did not answer in time",
            Refusal::ComputeConfig => "console backend misconfigured on the proxy",
            Refusal::TlsHandshake => "TLS handshake failed",
            Refusal::TooManySessions => {
                "the console proxy is at its session limit; try again later"
            }
            Refusal::TokenSessionLimit => "too many open sessions for this console token",
            Refusal::SourceSessionLimit => "too many open sessions from your address",
            Refusal::TokenConsumed => "console token already used",
            Refusal::SourceNotAllowed => "console token not valid from this address",
            Refusal::ResolverUnavailable => "token service unavailable, try again",
        }
    }
}

/// Refusals counted by kind since start (the `consolegate_refusals_total`
/// metric family).
static REFUSALS: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts one refusal of `kind` (a [`Refusal::kind`] or another stable
/// label such as a SPICE link refusal).
pub fn count_refusal(kind: &'static str) {
    *REFUSALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(kind)
        .or_default() += 1;
}

/// Refusal counts by kind.
pub fn refusal_counts() -> Vec<(&'static str, u64)> {
    REFUSALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect()
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}
