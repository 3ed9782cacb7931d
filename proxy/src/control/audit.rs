//! The audit trail: one record per console session, saying who opened
//! which console, when, for how long, how much moved and how it ended.
//! Always emitted as a log event with target `consolegate::audit` (filter
//! or route it with `CONSOLEGATE_LOG`); with `log.audit_file` also appended
//! as one JSON object per line to that file (mode 0600, reopened on SIGHUP
//! so logrotate can move it). Token secrets never appear: only token ids.

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::auth::TokenId;

/// What is known about a session when it ends.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub session_id: u64,
    pub front: &'static str,
    /// The tenant (after PROXY protocol / X-Forwarded-For from trusted peers).
    pub tenant: IpAddr,
    /// The TCP peer, when it is a load balancer rather than the tenant.
    pub via: Option<SocketAddr>,
    pub token_id: Option<TokenId>,
    pub console_kind: &'static str,
    pub compute: String,
    pub security: String,
    pub datapath: &'static str,
    pub started: SystemTime,
    pub duration: Duration,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub end: &'static str,
}

impl SessionRecord {
    /// The JSON object written to the audit file.
    pub fn to_json(&self) -> serde_json::Value {
        let ended = self.started + self.duration;
        serde_json::json!({
            "event": "console_session",
            "session_id": self.session_id,
            "front": self.front,
            "tenant_addr": self.tenant.to_string(),
            "tenant_via": self.via.map(|v| v.to_string()),
            "token_id": self.token_id.map(|t| t.to_string()),
            "console_kind": self.console_kind,
            "compute_addr": self.compute,
            "security": self.security,
            "datapath": self.datapath,
            "started": humantime::format_rfc3339_millis(self.started).to_string(),
            "ended": humantime::format_rfc3339_millis(ended).to_string(),
            "duration_ms": self.duration.as_millis() as u64,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "end": self.end,
        })
    }
}

/// Why the audit file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit file {path}: {source}")]
pub struct AuditFileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Where audit records go.
#[derive(Debug, Default)]
pub struct Audit {
    file: Option<(PathBuf, Mutex<File>)>,
}

fn open(path: &Path) -> Result<File, AuditFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| AuditFileError {
            path: path.to_owned(),
            source,
        })
}

impl Audit {
    /// Records to the log only, or also to `file`.
    pub fn new(file: Option<&Path>) -> Result<Self, AuditFileError> {
        Ok(Self {
            file: match file {
                Some(p) => Some((p.to_owned(), Mutex::new(open(p)?))),
                None => None,
            },
        })
    }

    /// Reopens the file (after logrotate moved it); keeps the old handle on error.
    pub fn reopen(&self) -> Result<(), AuditFileError> {
        if let Some((path, f)) = &self.file {
            let new = open(path)?;
            *f.lock().unwrap_or_else(|p| p.into_inner()) = new;
        }
        Ok(())
    }

    /// Records one ended session.
    pub fn session(&self, r: &SessionRecord) {
        // The file first: whoever sees the log line finds the record.
        if let Some((path, f)) = &self.file {
            let mut line = r.to_json().to_string();
            line.push('\n');
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::error!(file = %path.display(), error = %e, "audit record not written");
            }
        }
        tracing::info!(
            target: "consolegate::audit",
            session_id = r.session_id,
            front = r.front,
            tenant_addr = %r.tenant,
            tenant_via = r.via.map(|v| v.to_string()).as_deref().unwrap_or("-"),
            token_id = r.token_id.map(|t| t.to_string()).as_deref().unwrap_or("-"),
            console_kind = r.console_kind,
            compute_addr = %r.compute,
            security = %r.security,
            datapath = r.datapath,
            started = %humantime::format_rfc3339_millis(r.started),
            duration_ms = r.duration.as_millis() as u64,
            bytes_up = r.bytes_up,
            bytes_down = r.bytes_down,
            end = r.end,
            "audit: console session"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_gets_one_json_line_per_session_and_survives_rotation() {
        let dir = std::env::temp_dir().join(format!("cg-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let audit = Audit::new(Some(&path)).unwrap();
        let rec = SessionRecord {
            session_id: 7,
            front: "websocket",
            tenant: "198.51.100.9".parse().unwrap(),
            via: Some("10.0.0.2:4000".parse().unwrap()),
            token_id: Some(crate::auth::Token::new("very-secret").id()),
            console_kind: "vnc",
            compute: "192.0.2.10:5900".into(),
            security: "rfb 3.8 VeNCrypt/X509None".into(),
            datapath: "userspace",
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            duration: Duration::from_millis(1500),
            bytes_up: 10,
            bytes_down: 20,
            end: "tenant_closed",
        };
        audit.session(&rec);
        std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
        audit.reopen().unwrap();
        audit.session(&rec);
        let old = std::fs::read_to_string(dir.join("audit.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!((old.lines().count(), new.lines().count()), (1, 1));
        let v: serde_json::Value = serde_json::from_str(old.trim()).unwrap();
        assert_eq!(v["tenant_addr"], "198.51.100.9");
        assert_eq!(v["started"], "2027-01-15T08:00:00.000Z");
        assert_eq!(v["ended"], "2027-01-15T08:00:01.500Z");
        assert_eq!(v["token_id"].as_str().unwrap().len(), 8);
        assert!(!old.contains("very-secret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
