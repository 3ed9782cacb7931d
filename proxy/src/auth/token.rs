//! The token secret: masked in every printout, compared in constant time.
#![forbid(unsafe_code)]

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A console token as presented by a tenant or stored in a token source.
///
/// `Debug` and `Display` print `***`; use [`Token::id`] in logs.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the secret, the key of token tables (lookups by digest
    /// leak nothing useful about the secret through timing).
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// A short public identifier (first 4 bytes of the digest, as hex),
    /// safe for logs, metrics and audit records.
    pub fn id(&self) -> TokenId {
        let d = self.digest();
        TokenId([d[0], d[1], d[2], d[3]])
    }

    /// Constant-time equality of the secrets.
    pub fn ct_eq(&self, other: &Token) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Public identifier of a token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId([u8; 4]);

impl TokenId {
    /// Stands for "no token" (an unauthenticated CONNECT to a known target).
    pub const ANONYMOUS: TokenId = TokenId([0; 4]);
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_secret() {
        let t = Token::new("hunter2-secret");
        assert_eq!(format!("{t} {t:?}"), "*** Token(***)");
        assert_eq!(t.id().to_string().len(), 8);
        assert!(!t.id().to_string().contains("hunter2"));
    }

    #[test]
    fn equality() {
        assert!(Token::new("a").ct_eq(&Token::new("a")));
        assert!(!Token::new("a").ct_eq(&Token::new("ab")));
        assert!(!Token::new("a").ct_eq(&Token::new("b")));
    }
}

/// A credential for the compute side (VNC password, SASL password, SPICE
/// ticket). Prints as `***`, compares in constant time.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
