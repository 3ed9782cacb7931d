//! The admin API: HTTP/1.1 + JSON on its own listener (TLS on TCP, or a
//! UNIX socket), authenticated by default (bearer key and/or client
//! certificates). Creates, lists, revokes and re-points tokens, lists and
//! kills live sessions, and serves Prometheus metrics. Described in
//! `docs/admin-api.openapi.yaml`.

pub mod sessions;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use self::sessions::SessionTable;
use crate::auth::doc::GrantDoc;
use crate::auth::resolver::{StoredToken, TokenAdmin, hex, unhex};
use crate::auth::uses::UseLedger;
use crate::auth::{Resolvers, Token};
use crate::config::tokens::{AdminAuthKind, AdminConfig};
use crate::console::Target;
use crate::front::tls::{TlsLoadError, load_server_config, provider};
use crate::session::LiveSessions;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin key file {path}: {message}")]
    Key { path: String, message: String },
    #[error("admin TLS: {0}")]
    Tls(#[from] TlsLoadError),
    #[error("admin client CA {path}: {message}")]
    ClientCa { path: String, message: String },
    #[error("admin API on {addr}: TLS needs a certificate (admin.tls_cert/tls_key or [tls])")]
    NoCert { addr: SocketAddr },
    #[error("binding admin listener {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// What request handlers share.
#[derive(Debug)]
pub struct AdminState {
    pub store: Arc<dyn TokenAdmin>,
    pub ledger: Arc<dyn UseLedger>,
    pub sessions: Arc<SessionTable>,
    pub resolvers: Arc<Resolvers>,
    pub live: LiveSessions,
    /// SHA-256 of the bearer key, if one is required.
    key_digest: Option<[u8; 32]>,
}

/// Bound admin listeners (for the ready file).
#[derive(Debug, Default)]
pub struct Bound {
    pub tcp: Option<SocketAddr>,
    pub unix: Option<std::path::PathBuf>,
}

/// What the admin API acts on.
#[derive(Debug)]
pub struct Deps {
    pub store: Arc<dyn TokenAdmin>,
    pub ledger: Arc<dyn UseLedger>,
    pub sessions: Arc<SessionTable>,
    pub resolvers: Arc<Resolvers>,
    pub live: LiveSessions,
}

/// Binds the admin listeners and serves them until shutdown.
/// `tenant_tls` is the tenant certificate, the default for the TCP listener.
pub async fn start(
    cfg: &AdminConfig,
    tenant_tls: Option<(&Path, &Path)>,
    deps: Deps,
    shutdown: watch::Receiver<bool>,
) -> Result<Bound, AdminError> {
    let Deps {
        store,
        ledger,
        sessions,
        resolvers,
        live,
    } = deps;
    let key_digest = match (&cfg.key_file, cfg.auth) {
        (Some(p), AdminAuthKind::Required) => {
            let key = std::fs::read_to_string(p).map_err(|e| AdminError::Key {
                path: p.display().to_string(),
                message: e.to_string(),
            })?;
            let key = key.trim();
            if key.len() < 16 {
                return Err(AdminError::Key {
                    path: p.display().to_string(),
                    message: "the key must be at least 16 characters".into(),
                });
            }
            Some(Sha256::digest(key.as_bytes()).into())
        }
        _ => None,
    };
    if cfg.auth == AdminAuthKind::None {
        tracing::warn!(
            "ADMIN API AUTHENTICATION IS DISABLED (admin.auth = \"none\"): anyone who can reach \
             the admin listener can create tokens and open any console"
        );
    }
    let state = Arc::new(AdminState {
        store,
        ledger,
        sessions,
        resolvers,
        live,
        key_digest,
    });
    let mut bound = Bound::default();
    if let Some(addr) = cfg.listen {
        let tls = if cfg.plain_http {
            tracing::warn!(%addr, "admin API serves plain HTTP on loopback (admin.plain_http)");
            None
        } else {
            let (c, k) = match (&cfg.tls, tenant_tls) {
                (Some((c, k)), _) => (c.as_path(), k.as_path()),
                (None, Some((c, k))) => (c, k),
                (None, None) => return Err(AdminError::NoCert { addr }),
            };
            Some(Arc::new(server_config(c, k, cfg.client_ca.as_deref())?))
        };
        let l = crate::front::listener::bind(addr).map_err(|source| AdminError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        bound.tcp = l.local_addr().ok();
        tokio::spawn(serve_tcp(l, tls, Arc::clone(&state), shutdown.clone()));
    }
    if let Some(path) = &cfg.unix {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).map_err(|source| AdminError::Bind {
            addr: path.display().to_string(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| AdminError::Bind {
                addr: path.display().to_string(),
                source,
            },
        )?;
        bound.unix = Some(path.clone());
        tokio::spawn(serve_unix(l, Arc::clone(&state), shutdown));
    }
    tracing::info!(
        tcp = ?bound.tcp,
        unix = ?bound.unix,
        bearer = state.key_digest.is_some(),
        client_certs = cfg.client_ca.is_some(),
        "admin API listening"
    );
    Ok(bound)
}

fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, AdminError> {
    let mut cfg = load_server_config(cert, key)?;
    if let Some(ca) = client_ca {
        let bad = |message: String| AdminError::ClientCa {
            path: ca.display().to_string(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
            roots
                .add(c.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| bad(e.to_string()))?;
        let (certs, key) = (
            CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?,
            rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| bad(e.to_string()))?,
        );
        cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| bad(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| bad(e.to_string()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(cfg)
}

async fn serve_tcp(
    l: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = crate::datapath::shutdown_signalled(&mut shutdown) => return,
            r = l.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(cfg) => {
                    let accept = crate::tls_stream::ServerTls::accept(cfg, tcp);
                    match tokio::time::timeout(std::time::Duration::from_secs(10), accept).await {
                        Ok(Ok(s)) => serve_conn(s, peer.to_string(), state).await,
                        Ok(Err(e)) => {
                            crate::error::count_refusal("admin_tls_handshake");
                            tracing::warn!(admin.peer = %peer, error = %e, "admin TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::warn!(admin.peer = %peer, "admin TLS handshake timed out")
                        }
                    }
                }
                None => serve_conn(tcp, peer.to_string(), state).await,
            }
        });
    }
}

async fn serve_unix(l: UnixListener, state: Arc<AdminState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let s = tokio::select! {
            () = crate::datapath::shutdown_signalled(&mut shutdown) => return,
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::error!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_conn(s, "unix".into(), Arc::clone(&state)));
    }
}

async fn serve_conn<S>(s: S, peer: String, state: Arc<AdminState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&state);
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handle(&state, &peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10))
        .serve_connection(TokioIo::new(s), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    reply(status, json!({ "error": message.into() }))
}

impl AdminState {
    /// Checks the bearer key in constant time (client certificates were
    /// checked by the TLS handshake).
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(want) = &self.key_digest else {
            return true;
        };
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, key) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            });
        let Some(key) = presented else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        got.ct_eq(want).into()
    }
}

async fn handle(state: &AdminState, peer: &str, req: Request<Incoming>) -> Resp {
    if !state.authorized(&req) {
        crate::error::count_refusal("admin_unauthorized");
        tracing::warn!(admin.peer = %peer, method = %req.method(), path = req.uri().path(), "admin request refused: not authenticated");
        let mut r = error(StatusCode::UNAUTHORIZED, "authentication required");
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"consolegate-admin\""),
        );
        return r;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let now = SystemTime::now();
    let resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["v1", "tokens"]) => list_tokens(state, now).await,
        (&Method::POST, ["v1", "tokens"]) => match body_json(req).await {
            Ok(v) => create_token(state, v, now).await,
            Err(r) => r,
        },
        (&Method::GET, ["v1", "tokens", d]) => match unhex(d) {
            Some(d) => match state.store.get(d, now).await {
                Ok(Some(t)) => reply(StatusCode::OK, token_json(&t)),
                Ok(None) => error(StatusCode::NOT_FOUND, "no such token"),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            None => error(
                StatusCode::BAD_REQUEST,
                "token digest must be 64 hex digits",
            ),
        },
        (&Method::PATCH, ["v1", "tokens", d]) => match (unhex(d), body_json(req).await) {
            (Some(d), Ok(v)) => repoint(state, d, v).await,
            (None, _) => error(
                StatusCode::BAD_REQUEST,
                "token digest must be 64 hex digits",
            ),
            (_, Err(r)) => r,
        },
        (&Method::DELETE, ["v1", "tokens", d]) => match unhex(d) {
            Some(d) => revoke(state, d).await,
            None => error(
                StatusCode::BAD_REQUEST,
                "token digest must be 64 hex digits",
            ),
        },
        (&Method::GET, ["v1", "sessions"]) => {
            reply(StatusCode::OK, json!({ "sessions": state.sessions.list() }))
        }
        (&Method::DELETE, ["v1", "sessions", id]) => match id.parse::<u64>() {
            Ok(id) if state.sessions.kill(id) => {
                tracing::info!(session.id = id, admin.peer = %peer, "session killed by the admin API");
                reply(StatusCode::OK, json!({ "killed": id }))
            }
            Ok(_) => error(StatusCode::NOT_FOUND, "no such live session"),
            Err(_) => error(StatusCode::BAD_REQUEST, "session id must be a number"),
        },
        (&Method::GET, ["metrics"]) => metrics(state),
        (
            _,
            ["v1", "tokens"]
            | ["v1", "tokens", _]
            | ["v1", "sessions"]
            | ["v1", "sessions", _]
            | ["metrics"],
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    tracing::info!(admin.peer = %peer, %method, path, status = resp.status().as_u16(), "admin request");
    resp
}

async fn body_json(req: Request<Incoming>) -> Result<Value, Resp> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or unreadable",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON at line {} column {}", e.line(), e.column()),
        )
    })
}

fn token_json(t: &StoredToken) -> Value {
    let mut v = serde_json::to_value(GrantDoc::from_grant(&t.grant, false)).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        let id = hex(&t.digest)[..8].to_owned();
        m.insert("id".into(), Value::String(id));
        m.insert("digest".into(), Value::String(hex(&t.digest)));
        m.insert(
            "created".into(),
            Value::String(humantime::format_rfc3339_seconds(t.created).to_string()),
        );
    }
    v
}

async fn list_tokens(state: &AdminState, now: SystemTime) -> Resp {
    match state.store.list(now).await {
        Ok(v) => reply(
            StatusCode::OK,
            json!({ "tokens": v.iter().map(token_json).collect::<Vec<_>>() }),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn create_token(state: &AdminState, mut v: Value, now: SystemTime) -> Resp {
    let secret = match v.as_object_mut().map(|m| m.remove("token")) {
        None => return error(StatusCode::BAD_REQUEST, "expected a JSON object"),
        Some(None) => {
            let mut raw = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        }
        Some(Some(Value::String(s))) if s.len() >= 16 && s.len() <= 512 && s.is_ascii() => s,
        Some(Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "token: an ASCII string of 16 to 512 characters (omit it to get a random one)",
            );
        }
    };
    let doc: GrantDoc = match serde_json::from_value(v) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid token request: {e}"),
            );
        }
    };
    let grant = match doc.into_grant() {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let token = Token::new(secret);
    match state.store.create(&token, grant, now).await {
        Ok(t) => {
            tracing::info!(token.id = %token.id(), target = %t.grant.target, "token created by the admin API");
            let mut body = token_json(&t);
            if let Value::Object(m) = &mut body {
                m.insert("token".into(), Value::String(token.expose().to_owned()));
            }
            reply(StatusCode::CREATED, body)
        }
        Err(e @ crate::auth::resolver::StoreError::Exists) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn repoint(state: &AdminState, digest: [u8; 32], v: Value) -> Resp {
    let Some(target) = v.get("target").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"target\": \"host:port\"}",
        );
    };
    let target = match Target::parse(target) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("target: {e}")),
    };
    match state.store.repoint(digest, target.clone()).await {
        Ok(true) => {
            tracing::info!(token.id = &hex(&digest)[..8], %target, "token re-pointed by the admin API");
            reply(
                StatusCode::OK,
                json!({ "digest": hex(&digest), "target": target.to_string() }),
            )
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "no such token"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn revoke(state: &AdminState, digest: [u8; 32]) -> Resp {
    match state.store.revoke(digest).await {
        Ok(found) => {
            state.ledger.forget(digest).await;
            let killed = state.sessions.kill_token(&digest);
            if !found && killed == 0 {
                return error(StatusCode::NOT_FOUND, "no such token");
            }
            tracing::info!(
                token.id = &hex(&digest)[..8],
                sessions_killed = killed,
                "token revoked by the admin API"
            );
            reply(
                StatusCode::OK,
                json!({ "revoked": found, "sessions_killed": killed }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn metrics(state: &AdminState) -> Resp {
    crate::control::metrics::connections(state.live.count());
    let out = crate::control::metrics::render();
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(crate::control::metrics::CONTENT_TYPE),
    );
    r
}
