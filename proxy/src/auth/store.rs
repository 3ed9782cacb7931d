//! The token table loaded from token files, swapped atomically on reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use super::file::{Grant, TokenEntry, TokenFileError, parse_toml, parse_websockify};
use super::token::{Token, TokenId};
use crate::console::{ConsoleKind, Host};
use crate::error::Refusal;

/// A successful token resolution.
#[derive(Debug, Clone)]
pub struct Admission {
    pub token_id: TokenId,
    /// SHA-256 of the token: the key of stores, ledgers and sessions.
    pub digest: [u8; 32],
    /// Which resolver knew the token (`file`, `memory`, `redis`, ...).
    pub source: &'static str,
    pub grant: Grant,
    /// For a use-limited token: the claim to take on a primary connection.
    pub uses: Option<super::uses::UseClaim>,
}

/// Why token files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: TokenFileError,
    },
    #[error("{path}: token {id} is defined twice")]
    Duplicate { path: PathBuf, id: TokenId },
}

#[derive(Debug, Default)]
struct Table {
    by_digest: HashMap<[u8; 32], TokenEntry>,
    tcp_targets: HashMap<(Host, u16), ConsoleKind>,
}

type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

/// Tokens from files and directories; cheap to query from many sessions.
#[derive(Debug)]
pub struct TokenStore {
    sources: Vec<PathBuf>,
    table: RwLock<Arc<Table>>,
    seen: Mutex<Fingerprint>,
}

impl TokenStore {
    /// Loads every source once; any error fails the load.
    pub fn load(sources: Vec<PathBuf>) -> Result<Self, LoadError> {
        let (table, fp) = read_all(&sources)?;
        Ok(Self {
            sources,
            table: RwLock::new(Arc::new(table)),
            seen: Mutex::new(fp),
        })
    }

    fn snapshot(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Number of tokens loaded.
    pub fn len(&self) -> usize {
        self.snapshot().by_digest.len()
    }

    /// Whether no token is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves a presented secret to its grant, checking validity at `now`.
    pub fn resolve(&self, presented: &str, now: SystemTime) -> Result<Admission, Refusal> {
        let presented = Token::new(presented);
        let table = self.snapshot();
        let entry = table
            .by_digest
            .get(&presented.digest())
            .ok_or(Refusal::TokenUnknown)?;
        if !entry.token.ct_eq(&presented) {
            return Err(Refusal::TokenUnknown);
        }
        let g = &entry.grant;
        if g.not_before.is_some_and(|t| now < t) || g.not_after.is_some_and(|t| now >= t) {
            return Err(Refusal::TokenExpired);
        }
        Ok(Admission {
            token_id: presented.id(),
            digest: presented.digest(),
            source: "file",
            grant: g.clone(),
            uses: None,
        })
    }

    /// The grant of a token, if a file defines it (no validity checks).
    pub fn lookup(&self, presented: &Token) -> Option<Grant> {
        let table = self.snapshot();
        let entry = table.by_digest.get(&presented.digest())?;
        entry.token.ct_eq(presented).then(|| entry.grant.clone())
    }

    /// The console kind of this TCP endpoint if some token points at it
    /// (the CONNECT allow-list when proxy authentication is off).
    pub fn known_target_kind(&self, host: &Host, port: u16) -> Option<ConsoleKind> {
        self.snapshot()
            .tcp_targets
            .get(&(host.clone(), port))
            .copied()
    }

    /// Every TCP endpoint some token points at (for the eBPF allow-list).
    pub fn tcp_targets(&self) -> Vec<(Host, u16)> {
        self.snapshot().tcp_targets.keys().cloned().collect()
    }

    /// Re-reads every source; on error the previous table stays.
    pub fn reload(&self) -> Result<usize, LoadError> {
        let (table, fp) = read_all(&self.sources)?;
        let n = table.by_digest.len();
        self.install(table, fp);
        Ok(n)
    }

    /// Re-reads the sources only if a file changed, appeared or vanished.
    /// `Ok(None)` means nothing changed.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, LoadError> {
        let fp = fingerprint(&self.sources);
        let unchanged = match self.seen.lock() {
            Ok(seen) => *seen == fp,
            Err(p) => *p.into_inner() == fp,
        };
        if unchanged {
            return Ok(None);
        }
        match read_all(&self.sources) {
            Ok((table, fp)) => {
                let n = table.by_digest.len();
                self.install(table, fp);
                Ok(Some(n))
            }
            Err(e) => {
                // Remember the broken state so the error is logged once per change.
                if let Ok(mut seen) = self.seen.lock() {
                    *seen = fp;
                }
                Err(e)
            }
        }
    }

    fn install(&self, table: Table, fp: Fingerprint) {
        match self.table.write() {
            Ok(mut t) => *t = Arc::new(table),
            Err(p) => *p.into_inner() = Arc::new(table),
        }
        if let Ok(mut seen) = self.seen.lock() {
            *seen = fp;
        }
    }
}

impl super::resolver::Resolver for TokenStore {
    fn name(&self) -> &'static str {
        "file"
    }

    fn resolve<'a>(
        &'a self,
        token: &'a Token,
        _now: SystemTime,
    ) -> super::resolver::BoxFuture<'a, Result<Option<Grant>, Refusal>> {
        let g = self.lookup(token);
        Box::pin(async move { Ok(g) })
    }

    fn target_kind<'a>(
        &'a self,
        host: &'a Host,
        port: u16,
    ) -> super::resolver::BoxFuture<'a, Result<Option<ConsoleKind>, Refusal>> {
        let k = self.known_target_kind(host, port);
        Box::pin(async move { Ok(k) })
    }
}

fn files_of(source: &Path) -> Vec<PathBuf> {
    if source.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(source)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        files
    } else {
        vec![source.to_path_buf()]
    }
}

fn fingerprint(sources: &[PathBuf]) -> Fingerprint {
    sources
        .iter()
        .flat_map(|s| files_of(s))
        .map(|p| {
            let meta = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (p, meta)
        })
        .collect()
}

fn read_all(sources: &[PathBuf]) -> Result<(Table, Fingerprint), LoadError> {
    let fp = fingerprint(sources);
    let mut table = Table::default();
    for source in sources {
        for path in files_of(source) {
            let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            let is_toml = path.extension().is_some_and(|e| e == "toml");
            let entries = if is_toml {
                parse_toml(&text)
            } else {
                parse_websockify(&text)
            }
            .map_err(|source| LoadError::Parse {
                path: path.clone(),
                source,
            })?;
            for e in entries {
                if let Some((host, port)) = e.grant.target.tcp() {
                    table.tcp_targets.insert((host.clone(), port), e.grant.kind);
                }
                let id = e.token.id();
                if table.by_digest.insert(e.token.digest(), e).is_some() {
                    return Err(LoadError::Duplicate { path, id });
                }
            }
        }
    }
    Ok((table, fp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cg-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resolves_and_expires() {
        let d = tmpdir("expire");
        let f = write(
            &d,
            "t.toml",
            "[[token]]\ntoken='old'\ntarget='127.0.0.1:1'\nnot_after='2001-01-01T00:00:00Z'\n\
             [[token]]\ntoken='future'\ntarget='127.0.0.1:2'\nnot_before='2999-01-01T00:00:00Z'\n\
             [[token]]\ntoken='ok'\nkind='serial'\ntarget='127.0.0.1:3'\n",
        );
        let s = TokenStore::load(vec![f]).unwrap();
        let now = SystemTime::now();
        assert_eq!(s.resolve("old", now).unwrap_err(), Refusal::TokenExpired);
        assert_eq!(s.resolve("future", now).unwrap_err(), Refusal::TokenExpired);
        assert_eq!(s.resolve("nope", now).unwrap_err(), Refusal::TokenUnknown);
        let a = s.resolve("ok", now).unwrap();
        assert_eq!(a.grant.kind, crate::console::ConsoleKind::Serial);
        let lo = Host::Ip("127.0.0.1".parse().unwrap());
        assert_eq!(
            s.known_target_kind(&lo, 3),
            Some(crate::console::ConsoleKind::Serial)
        );
        assert_eq!(s.known_target_kind(&lo, 4), None);
    }

    #[test]
    fn directory_reload_and_broken_file_keeps_old_table() {
        let d = tmpdir("reload");
        write(&d, "a", "a: 127.0.0.1:1\n");
        write(&d, ".hidden", "garbage");
        let s = TokenStore::load(vec![d.clone()]).unwrap();
        assert_eq!(s.len(), 1);
        assert!(s.reload_if_changed().unwrap().is_none());
        write(&d, "b.toml", "[[token]]\ntoken='b'\nunix='/x'\n");
        assert_eq!(s.reload_if_changed().unwrap(), Some(2));
        std::thread::sleep(Duration::from_millis(20));
        write(&d, "a", "this is not a token line\n");
        assert!(s.reload_if_changed().is_err());
        assert_eq!(s.len(), 2, "old table kept");
        assert!(s.resolve("a", SystemTime::now()).is_ok());
        write(&d, "c", "a: 127.0.0.1:9\n");
        write(&d, "a", "a: 127.0.0.1:1\n");
        assert!(matches!(s.reload(), Err(LoadError::Duplicate { .. })));
    }
}
