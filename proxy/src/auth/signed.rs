//! Signed stateless tokens: a control plane mints them with a shared key,
//! and any proxy verifies them without a store.
//!
//! Format (URL-safe, no padding): `cg1.<base64url(claims JSON)>.<base64url(HMAC-SHA256)>`
//! where the MAC covers `cg1.<base64url(claims JSON)>` and the claims are a
//! grant document (see `auth::doc`) that must carry `not_after`. Validity
//! times are checked like every other token's; a single-use signed token
//! is counted by its digest in the use ledger (Redis for a fleet).
//!
//! [`verify`] is sans-io and fuzzed (`fuzz/fuzz_targets/signed_token.rs`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::SystemTime;

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::doc::GrantDoc;
use super::file::Grant;
use super::resolver::{BoxFuture, Resolver};
use super::token::Token;
use crate::error::Refusal;

/// Version prefix of the format.
pub const PREFIX: &str = "cg1.";
/// Longest signed token accepted.
pub const MAX_LEN: usize = 4096;
/// Shortest HMAC key accepted.
pub const MIN_KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed token is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("not a signed token")]
    NotSigned,
    #[error("signed token too long")]
    TooLong,
    #[error("malformed signed token: {0}")]
    Malformed(&'static str),
    #[error("signed token signature does not verify")]
    BadSignature,
    #[error("signed token claims: {0}")]
    Claims(String),
    #[error("signed token has no not_after claim")]
    NoExpiry,
}

impl SignedError {
    /// Stable label.
    pub fn kind(&self) -> &'static str {
        match self {
            SignedError::NotSigned => "not_signed",
            SignedError::TooLong | SignedError::Malformed(_) => "malformed",
            SignedError::BadSignature => "bad_signature",
            SignedError::Claims(_) | SignedError::NoExpiry => "bad_claims",
        }
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Verifies a token against any of `keys` and returns its claims (not yet
/// checked for time validity).
pub fn verify(token: &str, keys: &[Vec<u8>]) -> Result<GrantDoc, SignedError> {
    let rest = token.strip_prefix(PREFIX).ok_or(SignedError::NotSigned)?;
    if token.len() > MAX_LEN {
        return Err(SignedError::TooLong);
    }
    let (payload, sig) = rest
        .split_once('.')
        .ok_or(SignedError::Malformed("missing signature"))?;
    let sig = b64()
        .decode(sig)
        .map_err(|_| SignedError::Malformed("signature is not base64url"))?;
    let signed = &token[..PREFIX.len() + payload.len()];
    let ok = keys.iter().any(|k| {
        HmacSha256::new_from_slice(k).is_ok_and(|mut m| {
            m.update(signed.as_bytes());
            m.verify_slice(&sig).is_ok()
        })
    });
    if !ok {
        return Err(SignedError::BadSignature);
    }
    let json = b64()
        .decode(payload)
        .map_err(|_| SignedError::Malformed("claims are not base64url"))?;
    let doc: GrantDoc = serde_json::from_slice(&json).map_err(|e| {
        SignedError::Claims(format!(
            "invalid JSON at column {}: {}",
            e.column(),
            e.classify_name()
        ))
    })?;
    if doc.not_after.is_none() {
        return Err(SignedError::NoExpiry);
    }
    Ok(doc)
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "unexpected field or type",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Mints a token (for control planes written in Rust, and tests).
pub fn sign(claims: &GrantDoc, key: &[u8]) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let mut out = format!("{PREFIX}{}", b64().encode(json));
    // HMAC accepts keys of any length.
    if let Ok(mut m) = HmacSha256::new_from_slice(key) {
        m.update(out.as_bytes());
        let sig = m.finalize().into_bytes();
        out.push('.');
        out.push_str(&b64().encode(sig));
    }
    out
}

/// Resolves `cg1.` tokens with the configured keys.
pub struct SignedResolver {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for SignedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedResolver({} keys)", self.keys.len())
    }
}

impl SignedResolver {
    /// Reads the key files (trailing whitespace is not part of a key).
    pub fn load(files: &[PathBuf]) -> Result<Self, String> {
        let mut keys = Vec::new();
        for f in files {
            let raw = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
            let key = raw.trim_ascii_end().to_vec();
            if key.len() < MIN_KEY_LEN {
                return Err(format!(
                    "{}: an HMAC key must be at least {MIN_KEY_LEN} bytes",
                    f.display()
                ));
            }
            keys.push(key);
        }
        Ok(Self { keys })
    }

    /// From keys in memory.
    pub fn new(keys: Vec<Vec<u8>>) -> Self {
        Self { keys }
    }
}

impl Resolver for SignedResolver {
    fn name(&self) -> &'static str {
        "signed"
    }

    fn resolve<'a>(
        &'a self,
        token: &'a Token,
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<Grant>, Refusal>> {
        let r = match verify(token.expose(), &self.keys) {
            Err(SignedError::NotSigned) => Ok(None),
            Err(e) => {
                tracing::warn!(token.id = %token.id(), reason = %e.kind(), error = %e, "signed token rejected");
                Err(Refusal::TokenInvalid)
            }
            Ok(doc) => match doc.into_grant() {
                Ok(g) => Ok(Some(g)),
                Err(e) => {
                    tracing::warn!(token.id = %token.id(), reason = %"bad_claims", error = %e, "signed token rejected");
                    Err(Refusal::TokenInvalid)
                }
            },
        };
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> GrantDoc {
        GrantDoc {
            target: "127.0.0.1:5900".into(),
            not_after: Some("2999-01-01T00:00:00Z".into()),
            max_uses: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn sign_verify_and_tamper() {
        let key = vec![7u8; 32];
        let t = sign(&claims(), &key);
        assert!(t.starts_with("cg1."));
        assert_eq!(verify(&t, std::slice::from_ref(&key)).unwrap(), claims());
        // Key rotation: any configured key verifies.
        assert!(verify(&t, &[vec![1u8; 32], key.clone()]).is_ok());
        assert_eq!(verify(&t, &[vec![1u8; 32]]), Err(SignedError::BadSignature));
        // Flip one payload character.
        let mut bad = t.clone().into_bytes();
        bad[6] ^= 1;
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(
            verify(&bad, std::slice::from_ref(&key)),
            Err(SignedError::BadSignature)
        );
        assert_eq!(
            verify("hello", std::slice::from_ref(&key)),
            Err(SignedError::NotSigned)
        );
        assert!(matches!(
            verify("cg1.abc", std::slice::from_ref(&key)),
            Err(SignedError::Malformed(_))
        ));
        let mut no_exp = claims();
        no_exp.not_after = None;
        assert_eq!(
            verify(&sign(&no_exp, &key), &[key]),
            Err(SignedError::NoExpiry)
        );
    }

    #[test]
    fn errors_never_quote_the_token() {
        let key = vec![7u8; 32];
        let t = sign(&claims(), &key);
        let e = verify(&t, &[vec![0u8; 32]]).unwrap_err();
        assert!(!e.to_string().contains(&t[4..20]));
    }
}
