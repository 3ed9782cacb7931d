//! Sans-io token file parsers: websockify's `token: host:port` TokenFile
//! format and consolegate's TOML form.
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::token::{Secret, Token};
use crate::console::{ConsoleKind, Target};

/// One token as read from a source.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub token: Token,
    pub grant: Grant,
}

/// What a token admits its holder to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub kind: ConsoleKind,
    pub target: Target,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// Compute-side security settings for this console.
    pub compute: ComputeAuth,
    /// Use limit, reconnect window and source-address restriction.
    pub limits: Limits,
}

/// How often, and from where, a token may be used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Primary connections this token admits (`Some(1)`: single-use);
    /// `None`: unlimited. SPICE secondary channels of a session the token
    /// opened never count.
    pub max_uses: Option<u32>,
    /// How long after its last use (or the end of its last session) a
    /// use-limited token still admits reconnects from the same tenant
    /// address; `None`: the configured default (`tokens.reconnect_window`).
    pub reconnect_window: Option<Duration>,
    /// Tenant address prefixes allowed to use the token; empty: any.
    pub sources: Vec<super::cidr::Cidr>,
}

/// Per-token compute-side settings: which security profile of the
/// configuration applies, and credentials that belong to this console.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComputeAuth {
    /// Name of a `[compute.profiles.NAME]` table; `None` = the default profile.
    pub profile: Option<String>,
    /// Expected server identity (DNS name or IP) in the compute certificate.
    pub server_name: Option<String>,
    /// VNC password or SPICE ticket.
    pub password: Option<Secret>,
    /// SASL (and VeNCrypt Plain) user name and password.
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
}

/// Why a token file was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenFileError {
    #[error("line {line}: expected `token: host:port` or `token: unix_socket:/path`")]
    Syntax { line: usize },
    #[error("line {line}: empty token")]
    EmptyToken { line: usize },
    #[error("line {line}: bad target: {reason}")]
    BadTarget { line: usize, reason: String },
    #[error("TOML: {0}")]
    Toml(String),
    #[error("token #{index}: {reason}")]
    BadEntry { index: usize, reason: String },
}

/// Parses websockify's TokenFile format. Every token is a VNC console.
pub fn parse_websockify(text: &str) -> Result<Vec<TokenEntry>, TokenFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (tok, target) = l.split_once(':').ok_or(TokenFileError::Syntax { line })?;
        let tok = tok.trim();
        if tok.is_empty() {
            return Err(TokenFileError::EmptyToken { line });
        }
        let target = Target::parse(target).map_err(|e| TokenFileError::BadTarget {
            line,
            reason: e.to_string(),
        })?;
        out.push(TokenEntry {
            token: Token::new(tok),
            grant: Grant {
                kind: ConsoleKind::Vnc,
                target,
                not_before: None,
                not_after: None,
                compute: ComputeAuth::default(),
                limits: Limits::default(),
            },
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    token: Vec<TomlToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlToken {
    token: String,
    #[serde(default = "default_kind")]
    kind: ConsoleKind,
    target: Option<String>,
    unix: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    /// Security profile name.
    security: Option<String>,
    server_name: Option<String>,
    password: Option<String>,
    sasl_username: Option<String>,
    sasl_password: Option<String>,
    /// 1 = single-use.
    max_uses: Option<u32>,
    reconnect_window: Option<String>,
    #[serde(default)]
    source: Vec<String>,
}

fn default_kind() -> ConsoleKind {
    ConsoleKind::Vnc
}

/// Parses the TOML token file form (`[[token]]` tables).
pub fn parse_toml(text: &str) -> Result<Vec<TokenEntry>, TokenFileError> {
    // The TOML error message may quote the offending line, which may hold a
    // secret: keep only the position.
    let file: TomlFile = toml::from_str(text).map_err(|e| {
        TokenFileError::Toml(match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!("invalid token file near line {line}")
            }
            None => "invalid token file".to_owned(),
        })
    })?;
    file.token
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let index = i + 1;
            let bad = |reason: String| TokenFileError::BadEntry { index, reason };
            if t.token.trim().is_empty() {
                return Err(bad("empty token".into()));
            }
            let target = match (t.target, t.unix) {
                (Some(tcp), None) => Target::parse(&tcp).map_err(|e| bad(e.to_string()))?,
                (None, Some(path)) if !path.trim().is_empty() => Target::Unix(path.into()),
                (None, Some(_)) => return Err(bad("empty unix path".into())),
                _ => return Err(bad("exactly one of `target` or `unix` is required".into())),
            };
            let time = |v: Option<String>, name: &str| {
                v.map(|s| {
                    humantime::parse_rfc3339_weak(&s)
                        .map_err(|e| bad(format!("{name}: {e} (want RFC 3339)")))
                })
                .transpose()
            };
            let not_before = time(t.not_before, "not_before")?;
            let not_after = time(t.not_after, "not_after")?;
            if t.sasl_username.is_some() != t.sasl_password.is_some() {
                return Err(bad("sasl_username and sasl_password go together".into()));
            }
            let compute = ComputeAuth {
                profile: t.security,
                server_name: t.server_name,
                password: t.password.map(Secret::new),
                sasl_username: t.sasl_username,
                sasl_password: t.sasl_password.map(Secret::new),
            };
            let limits =
                parse_limits(t.max_uses, t.reconnect_window.as_deref(), &t.source).map_err(bad)?;
            Ok(TokenEntry {
                token: Token::new(t.token.trim()),
                grant: Grant {
                    kind: t.kind,
                    target,
                    not_before,
                    not_after,
                    compute,
                    limits,
                },
            })
        })
        .collect()
}

/// The longest reconnect window a token may ask for.
pub const MAX_RECONNECT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Validates the limit fields shared by every token source.
pub fn parse_limits(
    max_uses: Option<u32>,
    reconnect_window: Option<&str>,
    source: &[String],
) -> Result<Limits, String> {
    if max_uses == Some(0) {
        return Err("max_uses must be at least 1".into());
    }
    let reconnect_window = reconnect_window
        .map(|w| match w.trim() {
            "0" => Ok(Duration::ZERO),
            w => humantime::parse_duration(w)
                .map_err(|_| format!("reconnect_window: invalid duration {w:?}")),
        })
        .transpose()?;
    if reconnect_window.is_some_and(|w| w > MAX_RECONNECT_WINDOW) {
        return Err("reconnect_window: at most 24h".into());
    }
    let sources = source
        .iter()
        .map(|s| s.parse().map_err(|e: super::cidr::CidrError| e.to_string()))
        .collect::<Result<_, _>>()?;
    Ok(Limits {
        max_uses,
        reconnect_window,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websockify_format() {
        let text = "# a comment\n\ntok1: 127.0.0.1:5900\n tok2 : [::1]:5901 \ntok3: unix_socket:/run/vm3.sock\n";
        let e = parse_websockify(text).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].token.expose(), "tok1");
        assert_eq!(e[1].token.expose(), "tok2");
        assert_eq!(e[1].grant.target.to_string(), "[::1]:5901");
        assert_eq!(e[2].grant.target, Target::Unix("/run/vm3.sock".into()));
        assert!(e.iter().all(|t| t.grant.kind == ConsoleKind::Vnc));
    }

    #[test]
    fn websockify_errors_name_the_line() {
        assert_eq!(
            parse_websockify("ok: 1.2.3.4:1\nbroken\n").unwrap_err(),
            TokenFileError::Syntax { line: 2 }
        );
        assert_eq!(
            parse_websockify(": 1.2.3.4:1").unwrap_err(),
            TokenFileError::EmptyToken { line: 1 }
        );
        assert!(matches!(
            parse_websockify("t: 1.2.3.4:70000").unwrap_err(),
            TokenFileError::BadTarget { line: 1, .. }
        ));
    }

    #[test]
    fn toml_format() {
        let text = r#"
[[token]]
token = "s1"
kind = "serial"
target = "127.0.0.1:4555"
not_after = "2030-01-01T00:00:00Z"

[[token]]
token = "s2"
unix = "/run/vm.vnc"
security = "x509"
server_name = "compute-1"
password = "vncpw"
sasl_username = "u"
sasl_password = "p"
max_uses = 1
reconnect_window = "20s"
source = ["10.0.0.0/8", "::1"]
"#;
        let e = parse_toml(text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].grant.kind, ConsoleKind::Serial);
        assert!(e[0].grant.not_after.is_some());
        assert_eq!(e[1].grant.kind, ConsoleKind::Vnc);
        assert_eq!(e[1].grant.target, Target::Unix("/run/vm.vnc".into()));
        let c = &e[1].grant.compute;
        assert_eq!(c.profile.as_deref(), Some("x509"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("vncpw"));
        assert_eq!(c.sasl_username.as_deref(), Some("u"));
        assert!(!format!("{:?}", e[1].grant).contains("vncpw"));
        assert_eq!(e[0].grant.limits, Limits::default());
        let l = &e[1].grant.limits;
        assert_eq!(l.max_uses, Some(1));
        assert_eq!(l.reconnect_window, Some(Duration::from_secs(20)));
        assert_eq!(l.sources.len(), 2);
        let err =
            parse_toml("[[token]]\ntoken='x'\ntarget='a:1'\nreconnect_window='30d'\n").unwrap_err();
        assert!(err.to_string().contains("24h"), "{err}");
        let err = parse_toml("[[token]]\ntoken='x'\ntarget='a:1'\nmax_uses=0\n").unwrap_err();
        assert!(err.to_string().contains("max_uses"), "{err}");
        let err = parse_toml("[[token]]\ntoken='x'\ntarget='a:1'\nsource=['nope']\n").unwrap_err();
        assert!(err.to_string().contains("prefix"), "{err}");
    }

    #[test]
    fn toml_errors_do_not_quote_secrets() {
        let err = parse_toml("[[token]]\ntoken = \"topsecret\"\nbogus = 1\n").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        let err = parse_toml("[[token]]\ntoken = \"topsecret\"\n").unwrap_err();
        assert!(matches!(err, TokenFileError::BadEntry { index: 1, .. }));
        let err = parse_toml("[[token]]\ntoken = \"x\"\ntarget = \"a:1\"\nnot_after = \"soon\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("not_after"));
    }
}
