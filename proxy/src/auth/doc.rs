//! The JSON form of a grant, shared by the admin API, the Redis store, the
//! external HTTP resolver's answers and signed-token claims.
//!
//! Sans-io: [`GrantDoc::into_grant`] validates untrusted documents and
//! names the bad field, never its value.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use super::file::{ComputeAuth, Grant, parse_limits};
use super::token::Secret;
use crate::console::{ConsoleKind, Target};

/// A grant as JSON. Times are RFC 3339, durations like `30s`, targets
/// `host:port`, `[v6]:port` or `unix:/path`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ConsoleKind>,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_window: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<String>,
    /// Compute security profile name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password: Option<String>,
}

/// Why a grant document is invalid. Names the field, never quotes a value
/// that may be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid grant: {0}")]
pub struct DocError(pub String);

impl GrantDoc {
    /// Validates the document into a grant.
    pub fn into_grant(self) -> Result<Grant, DocError> {
        let bad = |m: String| DocError(m);
        let target = Target::parse(&self.target).map_err(|e| bad(format!("target: {e}")))?;
        let time = |v: &Option<String>, name: &str| {
            v.as_deref()
                .map(|s| {
                    humantime::parse_rfc3339_weak(s)
                        .map_err(|_| bad(format!("{name}: want RFC 3339")))
                })
                .transpose()
        };
        let not_before = time(&self.not_before, "not_before")?;
        let not_after = time(&self.not_after, "not_after")?;
        if self.sasl_username.is_some() != self.sasl_password.is_some() {
            return Err(bad("sasl_username and sasl_password go together".into()));
        }
        let limits = parse_limits(
            self.max_uses,
            self.reconnect_window.as_deref(),
            &self.source,
        )
        .map_err(bad)?;
        Ok(Grant {
            kind: self.kind.unwrap_or(ConsoleKind::Vnc),
            target,
            not_before,
            not_after,
            compute: ComputeAuth {
                profile: self.security,
                server_name: self.server_name,
                password: self.password.map(Secret::new),
                sasl_username: self.sasl_username,
                sasl_password: self.sasl_password.map(Secret::new),
            },
            limits,
        })
    }

    /// The document of a grant; compute secrets only with `secrets`.
    pub fn from_grant(g: &Grant, secrets: bool) -> Self {
        let time = |t: Option<std::time::SystemTime>| t.map(rfc3339);
        let c = &g.compute;
        Self {
            kind: Some(g.kind),
            target: match &g.target {
                Target::Unix(p) => format!("unix:{}", p.display()),
                t => t.to_string(),
            },
            not_before: time(g.not_before),
            not_after: time(g.not_after),
            max_uses: g.limits.max_uses,
            reconnect_window: g
                .limits
                .reconnect_window
                .map(|d| humantime::format_duration(d).to_string()),
            source: g.limits.sources.iter().map(ToString::to_string).collect(),
            security: c.profile.clone(),
            server_name: c.server_name.clone(),
            password: c
                .password
                .as_ref()
                .filter(|_| secrets)
                .map(|s| s.expose().to_owned()),
            sasl_username: c.sasl_username.clone(),
            sasl_password: c
                .sasl_password
                .as_ref()
                .filter(|_| secrets)
                .map(|s| s.expose().to_owned()),
        }
    }
}

/// RFC 3339 in whole seconds, or with nanoseconds when the time has them
/// (so documents round-trip exactly).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let whole = t
        .duration_since(std::time::UNIX_EPOCH)
        .is_ok_and(|d| d.subsec_nanos() == 0);
    if whole {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        humantime::format_rfc3339_nanos(t).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_secrets() {
        let doc: GrantDoc = serde_json::from_str(
            r#"{"kind":"spice","target":"unix:/run/vm.sock","not_after":"2030-01-01T00:00:00Z",
               "max_uses":1,"reconnect_window":"30s","source":["10.0.0.0/8"],"password":"pw"}"#,
        )
        .unwrap();
        let g = doc.clone().into_grant().unwrap();
        assert_eq!(g.kind, ConsoleKind::Spice);
        assert_eq!(g.limits.max_uses, Some(1));
        let back = GrantDoc::from_grant(&g, true);
        assert_eq!(back.clone().into_grant().unwrap(), g);
        assert_eq!(back.password.as_deref(), Some("pw"));
        assert_eq!(GrantDoc::from_grant(&g, false).password, None);
        let frac = GrantDoc {
            target: "a:1".into(),
            not_after: Some("2030-01-01T00:00:00.25Z".into()),
            reconnect_window: Some("90s".into()),
            ..Default::default()
        }
        .into_grant()
        .unwrap();
        let back = GrantDoc::from_grant(&frac, true);
        assert_eq!(back.into_grant().unwrap(), frac);
    }

    #[test]
    fn errors_name_fields_not_values() {
        let e = GrantDoc {
            target: "nope".into(),
            ..Default::default()
        }
        .into_grant()
        .unwrap_err();
        assert!(e.to_string().contains("target"), "{e}");
        let e = GrantDoc {
            target: "a:1".into(),
            not_after: Some("secret-ish".into()),
            ..Default::default()
        }
        .into_grant()
        .unwrap_err();
        assert!(!e.to_string().contains("secret-ish"), "{e}");
        assert!(serde_json::from_str::<GrantDoc>(r#"{"target":"a:1","bogus":1}"#).is_err());
    }
}
