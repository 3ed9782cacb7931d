//! Running the proxy: build state from the config, bind, serve, reload on
//! SIGHUP and token-file changes, and stop on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::auth::TokenStore;
use crate::auth::store::LoadError;
use crate::config::dev::{self, DevError};
use crate::config::{Config, TenantTls as TlsChoice};
use crate::console::security::{ProfileError, ProfileSet, Profiles};
use crate::front::tls::{TenantTls, TlsLoadError, load_server_config};
use crate::front::{connect, listener, ws};
use crate::session::{Context, LiveSessions};

/// How long shutdown waits for live sessions after telling them to close.
const DRAIN: Duration = Duration::from_secs(5);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("development files: {0}")]
    Dev(#[from] DevError),
    #[error("token files: {0}")]
    Tokens(#[from] LoadError),
    #[error("tenant TLS: {0}")]
    Tls(#[from] TlsLoadError),
    #[error("{0}")]
    Profile(#[from] ProfileError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing ready file {path}: {source}")]
    ReadyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

impl StartError {
    /// Whether this is a configuration problem (exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Tokens(_) | StartError::Tls(_) | StartError::Profile(_)
        )
    }
}

fn tls_paths(cfg: &Config) -> Result<Option<(std::path::PathBuf, std::path::PathBuf)>, DevError> {
    Ok(match &cfg.tenant_tls {
        TlsChoice::Files { cert, key } => Some((cert.clone(), key.clone())),
        TlsChoice::Dev { dir } => {
            let d = dev::ensure_cert(dir)?;
            if d.created {
                tracing::info!(cert = %d.cert.display(), "created a self-signed development certificate");
            }
            Some((d.cert, d.key))
        }
        TlsChoice::Off => None,
    })
}

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let mut sighup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    if let Some(path) = &cfg.dev_tokens
        && dev::ensure_tokens(path)?.is_some()
    {
        tracing::info!(file = %path.display(), "created a development token file");
    }
    let tokens = Arc::new(TokenStore::load(cfg.token_sources.clone())?);
    let profiles = Profiles::load(&cfg.profiles, cfg.default_profile.as_deref())?;
    if profiles.is_empty() {
        tracing::warn!(
            "no compute profile: connections to consoles are neither encrypted nor authenticated \
             (configure [compute.profiles] with the private CA and a client certificate)"
        );
    }
    let profiles = Arc::new(ProfileSet::new(profiles));
    let tls_files = tls_paths(&cfg)?;
    let tenant_tls = match &tls_files {
        Some((c, k)) => Some(Arc::new(TenantTls::new(load_server_config(c, k)?))),
        None => {
            tracing::warn!("WebSocket front end serves plain HTTP (explicitly configured)");
            None
        }
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let live = LiveSessions::default();
    let ctx = Arc::new(Context {
        tokens: Arc::clone(&tokens),
        profiles: Arc::clone(&profiles),
        spice: Arc::default(),
        tenant_tls: tenant_tls.clone(),
        allow_origins: cfg.allow_origins.clone(),
        connect_auth: cfg.connect_auth,
        handshake_timeout: cfg.handshake_timeout,
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.idle_timeout,
        ping_interval: cfg.ping_interval,
        shutdown: shutdown_rx.clone(),
        live: live.clone(),
        web: crate::front::web::Web::new(cfg.web.clone()),
    });

    let mut bound_ws = Vec::new();
    let mut bound_connect = Vec::new();
    let mut loops = Vec::new();
    for &addr in &cfg.ws_listen {
        let l = listener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        let local = l
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        bound_ws.push(local);
        loops.push(tokio::spawn(listener::accept_loop(
            l,
            Arc::clone(&ctx),
            shutdown_rx.clone(),
            ws::serve,
        )));
    }
    for &addr in &cfg.connect_listen {
        let l = listener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        let local = l
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        bound_connect.push(local);
        loops.push(tokio::spawn(listener::accept_loop(
            l,
            Arc::clone(&ctx),
            shutdown_rx.clone(),
            connect::serve,
        )));
    }
    tracing::info!(
        websocket = ?bound_ws,
        connect = ?bound_connect,
        tls = tenant_tls.is_some(),
        tokens = tokens.len(),
        datapath = "userspace",
        "consolegate ready"
    );
    if let Some(path) = &cfg.ready_file {
        write_ready(path, &bound_ws, &bound_connect).map_err(|source| StartError::ReadyFile {
            path: path.display().to_string(),
            source,
        })?;
    }
    if cfg.dev_tokens.is_some() {
        print_banner(
            &cfg,
            &bound_ws,
            &bound_connect,
            tls_files.as_ref().map(|(c, _)| c.as_path()),
        );
    }

    let mut poll = tokio::time::interval(cfg.reload_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = poll.tick() => match tokens.reload_if_changed() {
                Ok(Some(n)) => tracing::info!(tokens = n, "token files changed: reloaded"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "token files changed but are invalid: keeping the previous tokens"),
            },
            _ = sighup.recv() => reload(&cfg, &tokens, tenant_tls.as_deref(), &profiles),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    tracing::info!(sessions = live.count(), "shutting down: closing sessions");
    let _ = shutdown_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    if !live.drained(DRAIN).await {
        tracing::warn!(
            sessions = live.count(),
            "sessions still open at the drain deadline"
        );
    }
    Ok(())
}

/// SIGHUP: re-read tokens and the tenant certificate; keep the old ones on error.
fn reload(cfg: &Config, tokens: &TokenStore, tls: Option<&TenantTls>, profiles: &ProfileSet) {
    match Profiles::load(&cfg.profiles, cfg.default_profile.as_deref()) {
        Ok(p) => {
            profiles.replace(p);
            tracing::info!(
                "SIGHUP: compute profiles (CA, client certificates, passwords) reloaded"
            );
        }
        Err(e) => tracing::error!(
            error = %e,
            "SIGHUP: compute profiles invalid: keeping the previous ones"
        ),
    }
    match tokens.reload() {
        Ok(n) => tracing::info!(tokens = n, "SIGHUP: tokens reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: token files invalid: keeping the previous tokens")
        }
    }
    let paths = match &cfg.tenant_tls {
        TlsChoice::Files { cert, key } => Some((cert.clone(), key.clone())),
        TlsChoice::Dev { dir } => Some((dir.join("cert.pem"), dir.join("key.pem"))),
        TlsChoice::Off => None,
    };
    if let (Some(tls), Some((c, k))) = (tls, paths) {
        match load_server_config(&c, &k) {
            Ok(new) => {
                tls.replace(new);
                tracing::info!(cert = %c.display(), "SIGHUP: tenant certificate reloaded");
            }
            Err(e) => tracing::error!(
                error = %e,
                "SIGHUP: tenant certificate invalid: keeping the previous one"
            ),
        }
    }
}

fn write_ready(path: &Path, ws: &[SocketAddr], connect: &[SocketAddr]) -> std::io::Result<()> {
    let doc = serde_json::json!({
        "websocket": ws.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "connect": connect.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string())?;
    std::fs::rename(tmp, path)
}

#[expect(
    clippy::print_stdout,
    reason = "the development banner is for the person at the terminal"
)]
fn print_banner(cfg: &Config, ws: &[SocketAddr], connect: &[SocketAddr], cert: Option<&Path>) {
    let tokens = cfg
        .dev_tokens
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!();
    println!("consolegate is running with its embedded development setup");
    println!("  token file:   {tokens}");
    println!("                (re-read on change; each token names a VNC/serial console)");
    if let Some(c) = cert {
        println!(
            "  certificate:  {} (self-signed; your browser must trust it once:",
            c.display()
        );
        if let Some(a) = ws.first() {
            println!("                open https://{a}/ and accept it)");
        }
    }
    for a in ws {
        let scheme = if cert.is_some() { "wss" } else { "ws" };
        println!("  WebSocket:    {scheme}://{a}/websockify?token=<token from the token file>");
    }
    for a in connect {
        println!("  CONNECT:      {a} (Proxy-Authorization: Bearer <token>)");
    }
    if let Some(a) = ws.first() {
        println!(
            "  noVNC:        vnc.html?host={}&port={}&encrypt={}&path=websockify%3Ftoken%3D<token>",
            a.ip(),
            a.port(),
            u8::from(cert.is_some())
        );
    }
    if let Some(a) = ws.first() {
        let scheme = if cert.is_some() { "https" } else { "http" };
        println!("  web console:  {scheme}://{a}/vnc.html#token=<token> (serial: /serial.html)");
    }
    println!("  stop with Ctrl-C");
    println!();
}
