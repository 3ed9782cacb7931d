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
use crate::control::audit::{Audit, AuditFileError};
use crate::control::systemd::Notifier;
use crate::front::tls::{TenantTls, TlsLoadError, load_server_config};
use crate::front::{connect, listener, ws};
use crate::session::{Context, LiveSessions};

/// How long shutdown waits for sessions after telling them to close (close
/// frames, then the sockets), once the drain deadline has passed.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

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
    #[error("{0}")]
    Audit(#[from] AuditFileError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("eBPF allow-list is required (kernel.allowlist = \"required\") but unavailable: {0}")]
    AllowList(#[from] crate::control::allowlist::AllowListError),
    #[error("token resolvers: {0}")]
    Resolvers(#[from] crate::auth::setup::SetupError),
    #[error("{0}")]
    Admin(#[from] crate::admin::AdminError),
}

impl StartError {
    /// Whether this is a configuration problem (exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Tokens(_)
                | StartError::Tls(_)
                | StartError::Profile(_)
                | StartError::Audit(_)
        ) || matches!(self, StartError::Resolvers(e) if e.is_config())
            || matches!(
                self,
                StartError::Admin(
                    crate::admin::AdminError::Key { .. }
                        | crate::admin::AdminError::Tls(_)
                        | crate::admin::AdminError::ClientCa { .. }
                        | crate::admin::AdminError::NoCert { .. }
                )
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
    run_reloadable(cfg, None).await
}

/// Runs the proxy; with `args`, SIGHUP also re-reads the configuration
/// file they name (see [`reload_config`]).
pub async fn run_reloadable(
    cfg: Config,
    args: Option<crate::cli::ServeArgs>,
) -> Result<(), StartError> {
    let mut sighup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    if let Some(path) = &cfg.dev_tokens
        && dev::ensure_tokens(path)?.is_some()
    {
        tracing::info!(file = %path.display(), "created a development token file");
    }
    match crate::sys::rlimit::raise_nofile() {
        Ok((before, after)) => {
            tracing::info!(before, limit = after, "open-file limit");
            // Two sockets per session: past that the accept loop meets
            // EMFILE instead of refusing cleanly at max_sessions.
            let sessions = after.saturating_sub(64) / 2;
            let max = cfg.limits.total as u64;
            if max == 0 || max > sessions {
                tracing::warn!(
                    limit = after,
                    sessions,
                    max_sessions = max,
                    "the open-file limit holds fewer sessions than max_sessions allows: \
                     raise the hard limit (LimitNOFILE=, ulimit -Hn)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let tokens = Arc::new(TokenStore::load(cfg.token_sources.clone())?);
    // Before the allow-list: the probes connect over loopback.
    let ktls =
        crate::offload::Offload::start(cfg.ktls).with_records_per_key(cfg.ktls_records_per_key);
    let ktls_available = crate::sys::probe::ktls().is_ok();
    let allowlist =
        crate::control::allowlist::start_configured(cfg.allowlist, cfg.cgroup, &tokens)?;
    if let Some(list) = &allowlist {
        allow_control_endpoints(list, &cfg).await;
    }
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

    // Two stages of stopping: `stop_accepting` closes the listeners (drain
    // starts), `shutdown` tells live sessions to close (drain deadline).
    let (stop_accepting_tx, stop_accepting_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let audit = Arc::new(Audit::new(cfg.audit_file.as_deref())?);
    let live = LiveSessions::default();
    let built = crate::auth::setup::build(Arc::clone(&tokens), &cfg.resolvers).await?;
    let sessions = crate::admin::sessions::SessionTable::new(shutdown_rx.clone());
    let admin = match &cfg.admin {
        Some(a) => Some(
            crate::admin::start(
                a,
                tls_files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                crate::admin::Deps {
                    store: Arc::clone(&built.admin_store),
                    ledger: Arc::clone(&built.ledger),
                    sessions: Arc::clone(&sessions),
                    resolvers: Arc::clone(&built.resolvers),
                    live: live.clone(),
                },
                shutdown_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    if let Some(redis) = built.redis.clone() {
        tokio::spawn(redis.watch_revocations(Arc::clone(&sessions)));
    }
    let sockmap = if cfg.datapath == crate::config::kernel::DatapathMode::Sockmap {
        crate::control::sockmap::start()
    } else {
        Err("kernel.datapath is not \"sockmap\"".to_owned())
    };
    let ctx = Arc::new(Context {
        resolvers: Arc::clone(&built.resolvers),
        sessions,
        tokens: Arc::clone(&tokens),
        profiles: Arc::clone(&profiles),
        spice: Arc::default(),
        tenant_tls: tenant_tls.clone(),
        allow_origins: cfg.allow_origins.clone(),
        trusted_proxies: cfg.trusted_proxies.clone(),
        limits: crate::limits::Limits::new(cfg.limits),
        max_duration: cfg.max_duration,
        audit: Arc::clone(&audit),
        connect_auth: cfg.connect_auth,
        handshake_timeout: cfg.handshake_timeout,
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.idle_timeout,
        ping_interval: cfg.ping_interval,
        shutdown: shutdown_rx.clone(),
        live: live.clone(),
        datapath: cfg.datapath,
        ktls,
        allowlist: allowlist.clone(),
        sockmap: sockmap.clone(),
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
            stop_accepting_rx.clone(),
            cfg.ws_proxy_protocol,
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
            stop_accepting_rx.clone(),
            cfg.connect_proxy_protocol,
            connect::serve,
        )));
    }
    {
        use crate::control::metrics as m;
        m::token_resolvers(&built.resolvers.names());
        m::kernel_feature("ebpf_allowlist", allowlist.is_some());
        m::kernel_feature(
            "splice",
            cfg.datapath != crate::config::kernel::DatapathMode::Copy,
        );
        m::kernel_feature("ktls", ktls.enabled());
        m::kernel_feature_available("ktls", ktls_available);
        m::kernel_feature_available("ebpf_allowlist", allowlist.is_some());
        m::kernel_feature_available("io_uring", crate::sys::probe::io_uring().is_ok());
        if cfg.datapath == crate::config::kernel::DatapathMode::Uring {
            // Probe (and start the ring thread) now, so a missing io_uring
            // is said once, loudly, at start rather than per session.
            match crate::datapath::uring::availability() {
                Ok(flavor) => {
                    tracing::info!(uring = flavor.name(), "io_uring data path ready");
                    m::kernel_feature("io_uring", true);
                }
                Err(why) => {
                    tracing::warn!(
                        reason = %why,
                        "io_uring data path UNAVAILABLE: kernel.datapath = \"uring\" falls back to splice, then the copy"
                    );
                    m::kernel_feature("io_uring", false);
                }
            }
        }
        m::kernel_feature("sockmap", sockmap.is_ok());
    }
    tracing::info!(
        websocket = ?bound_ws,
        connect = ?bound_connect,
        tls = tenant_tls.is_some(),
        tokens = tokens.len(),
        datapath = cfg.datapath.as_str(),
        allowlist = if allowlist.is_some() { "on" } else { "off" },
        resolvers = ?built.resolvers.names(),
        "consolegate ready"
    );
    if let Some(path) = &cfg.ready_file {
        write_ready(path, &bound_ws, &bound_connect, admin.as_ref()).map_err(|source| {
            StartError::ReadyFile {
                path: path.display().to_string(),
                source,
            }
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

    let notifier = Notifier::from_env();
    notifier.ready(&format!(
        "serving: websocket {bound_ws:?}, connect {bound_connect:?}"
    ));
    let mut watchdog = notifier.watchdog_interval().map(|i| {
        let mut t = tokio::time::interval(i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });

    let mut poll = tokio::time::interval(cfg.reload_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = poll.tick() => match tokens.reload_if_changed() {
                Ok(Some(n)) => tracing::info!(tokens = n, "token files changed: reloaded"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "token files changed but are invalid: keeping the previous tokens"),
            },
            _ = sighup.recv() => {
                notifier.reloading();
                let fresh = reload_config(&cfg, args.as_ref());
                reload(fresh.as_ref().unwrap_or(&cfg), &tokens, tenant_tls.as_deref(), &profiles);
                match audit.reopen() {
                    Ok(()) => {}
                    Err(e) => tracing::error!(error = %e, "SIGHUP: audit file not reopened: keeping the old one"),
                }
                notifier.ready(&format!("serving; reloaded; {} sessions", live.count()));
            }
            _ = async { match watchdog.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                notifier.watchdog();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if let Some(list) = &allowlist {
            list.sync_static(tokens.tcp_targets());
        }
    }

    // Graceful drain: stop accepting at once, let live sessions finish on
    // their own until the drain deadline, then close them with a reason
    // (WebSocket close 1001 "proxy shutting down"). A second SIGTERM or
    // SIGINT skips the wait.
    let open = live.count();
    tracing::info!(
        sessions = open,
        deadline = ?cfg.drain_timeout,
        "draining: no new sessions; live sessions may finish"
    );
    notifier.stopping(&format!("draining {open} sessions"));
    let _ = stop_accepting_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let finished = tokio::select! {
        done = live.drained(cfg.drain_timeout) => done,
        _ = sigterm.recv() => false,
        _ = sigint.recv() => false,
    };
    if !finished {
        tracing::info!(
            sessions = live.count(),
            "drain over: closing the remaining sessions"
        );
    }
    let _ = shutdown_tx.send(true);
    if !live.drained(CLOSE_WAIT).await {
        tracing::warn!(
            sessions = live.count(),
            "sessions still open after closing them; exiting anyway"
        );
    }
    if let Some(list) = &allowlist {
        list.close();
    }
    tracing::info!("consolegate stopped");
    Ok(())
}

/// SIGHUP: re-reads the configuration (file and flags, as at start). An
/// invalid one is refused, naming the problem, and the running one stays.
/// A valid one supplies the compute profiles and certificate paths that
/// [`reload`] applies; settings that only take effect at start are named in
/// a WARN line ("needs a restart") when they changed.
fn reload_config(running: &Config, args: Option<&crate::cli::ServeArgs>) -> Option<Config> {
    let args = args?;
    args.config.as_ref()?;
    let new = match Config::build(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                error = %e,
                "SIGHUP: configuration invalid: keeping the running configuration"
            );
            return None;
        }
    };
    let mut restart = Vec::new();
    let mut differs = |name: &'static str, changed: bool| {
        if changed {
            restart.push(name);
        }
    };
    differs("websocket.listen", new.ws_listen != running.ws_listen);
    differs(
        "connect.listen",
        new.connect_listen != running.connect_listen,
    );
    differs("tokens.files", new.token_sources != running.token_sources);
    differs(
        "websocket.allow_origins",
        new.allow_origins != running.allow_origins,
    );
    differs("connect.auth", new.connect_auth != running.connect_auth);
    differs(
        "session timeouts",
        (
            new.handshake_timeout,
            new.idle_timeout,
            new.ping_interval,
            new.max_duration,
        ) != (
            running.handshake_timeout,
            running.idle_timeout,
            running.ping_interval,
            running.max_duration,
        ),
    );
    differs("session limits", new.limits != running.limits);
    differs(
        "forwarding",
        (
            &new.trusted_proxies,
            new.ws_proxy_protocol,
            new.connect_proxy_protocol,
        ) != (
            &running.trusted_proxies,
            running.ws_proxy_protocol,
            running.connect_proxy_protocol,
        ),
    );
    differs(
        "kernel",
        (new.datapath, new.allowlist) != (running.datapath, running.allowlist),
    );
    differs(
        "log",
        new.log_format != running.log_format || new.audit_file != running.audit_file,
    );
    if restart.is_empty() {
        tracing::info!("SIGHUP: configuration re-read");
    } else {
        tracing::warn!(
            settings = ?restart,
            "SIGHUP: configuration re-read; these changed settings need a restart to take effect"
        );
    }
    Some(new)
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

fn write_ready(
    path: &Path,
    ws: &[SocketAddr],
    connect: &[SocketAddr],
    admin: Option<&crate::admin::Bound>,
) -> std::io::Result<()> {
    let mut doc = serde_json::json!({
        "websocket": ws.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "connect": connect.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    if let Some(a) = admin {
        doc["admin"] = serde_json::json!({
            "tcp": a.tcp.map(|t| t.to_string()),
            "unix": a.unix.as_ref().map(|p| p.display().to_string()),
        });
    }
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

/// `host` and `port` of a `scheme://[user@]host[:port]/...` URL, with the
/// scheme's default port; `None` for UNIX-socket URLs.
fn url_endpoint(url: &str, default_port: u16) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme.contains("unix") {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after
            .strip_prefix(':')
            .map_or(Some(default_port), |p| p.parse().ok())?;
        return Some((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((hostport.to_owned(), default_port)),
    }
}

/// The token services the proxy itself talks to (Redis, the external HTTP
/// resolver) go into the eBPF allow-list for as long as it runs; their names
/// are resolved once, here.
async fn allow_control_endpoints(list: &crate::control::allowlist::AllowList, cfg: &Config) {
    let mut endpoints = Vec::new();
    if let Some(r) = &cfg.resolvers.redis
        && let Some(e) = url_endpoint(&r.url, 6379)
    {
        endpoints.push(("redis", e));
    }
    if let Some(h) = &cfg.resolvers.http
        && let Some(e) = url_endpoint(&h.url, if h.url.starts_with("https") { 443 } else { 80 })
    {
        endpoints.push(("http resolver", e));
    }
    for (what, (host, port)) in endpoints {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => {
                for a in addrs {
                    list.allow_always(a);
                    tracing::info!(service = what, addr = %a, "allow-list: token service allowed");
                }
            }
            Err(e) => tracing::warn!(
                service = what, host = %host, error = %e,
                "allow-list: cannot resolve a token service; connections to it will be refused"
            ),
        }
    }
}

#[cfg(test)]
mod url_tests {
    use super::url_endpoint;

    #[test]
    fn endpoints_of_service_urls() {
        assert_eq!(
            url_endpoint("redis://127.0.0.1:6380/0", 6379),
            Some(("127.0.0.1".into(), 6380))
        );
        assert_eq!(
            url_endpoint("redis://:pw@cache.example/", 6379),
            Some(("cache.example".into(), 6379))
        );
        assert_eq!(
            url_endpoint("http://[::1]:8080/resolve", 80),
            Some(("::1".into(), 8080))
        );
        assert_eq!(url_endpoint("redis+unix:///run/redis.sock", 6379), None);
        assert_eq!(url_endpoint("unix:///run/redis.sock", 6379), None);
    }
}
