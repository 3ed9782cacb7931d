//! A session's life, shared by the front ends:
//! accept -> resolve -> dial -> handshake -> pick data path -> pump -> audit.
//!
//! This module holds what every front end needs for that: the shared
//! context, session ids, the refusal path and the closing log line.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{Notify, watch};

use tokio::io::AsyncRead;

use crate::admin::sessions::SessionTable;
use crate::auth::{Admission, Grant, Resolvers, TokenId, TokenStore};
use crate::config::ConnectAuth;
use crate::config::kernel::DatapathMode;
use crate::console::security::{ProfileSet, SessionSecurity};
use crate::console::spice::{self, SpiceError, SpiceSessions};
use crate::console::vnc::{self, TenantRfbError, VncError};
use crate::console::{self, ComputeIo, ComputeStream, ConsoleKind, DialError, Target};
use crate::control::allowlist::{self, AllowList};
use crate::control::audit::SessionRecord;
use crate::datapath::{Counters, End};
use crate::error::Refusal;
use crate::front::http::error_response;
use crate::front::tls::TenantTls;

/// Everything a session needs from the running proxy.
#[derive(Debug)]
pub struct Context {
    pub tokens: Arc<TokenStore>,
    /// Every token source, in order (token files first).
    pub resolvers: Arc<Resolvers>,
    /// Live sessions (admin API: list, kill, revoke).
    pub sessions: Arc<SessionTable>,
    pub profiles: Arc<ProfileSet>,
    pub spice: Arc<SpiceSessions>,
    pub tenant_tls: Option<Arc<TenantTls>>,
    pub allow_origins: Vec<String>,
    /// Load balancers whose PROXY headers and X-Forwarded-For are believed.
    pub trusted_proxies: crate::front::forwarded::TrustedNets,
    /// Session count limits.
    pub limits: Arc<crate::limits::Limits>,
    /// Sessions end after this long.
    pub max_duration: Option<Duration>,
    /// Where the per-session audit records go.
    pub audit: Arc<crate::control::audit::Audit>,
    pub connect_auth: ConnectAuth,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub shutdown: watch::Receiver<bool>,
    pub live: LiveSessions,
    /// Data path preference of established sessions.
    pub datapath: DatapathMode,
    /// Which TLS legs kernel TLS can take (probed at start).
    pub ktls: crate::offload::Offload,
    /// The eBPF connect allow-list, when active.
    pub allowlist: Option<Arc<AllowList>>,
    /// The loaded sockmap path (`kernel.datapath = "sockmap"`), or why not.
    pub sockmap: Result<Arc<crate::control::sockmap::Sockmap>, String>,
    /// Static files (web console, `--web`) of the WebSocket front end.
    pub web: crate::front::web::Web,
}

impl Context {
    /// Names the tenant behind a trusted load balancer in the session span
    /// (`tenant.addr`, with the balancer as `tenant.via`), from the
    /// request's X-Forwarded-For / Forwarded headers.
    /// Returns the tenant's address: the forwarded one, or `peer`'s.
    pub fn record_forwarded(
        &self,
        head: &crate::front::http::RequestHead,
        peer: SocketAddr,
    ) -> std::net::IpAddr {
        let headers = head
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str(), std::str::from_utf8(v).ok()?)));
        if let Some(client) =
            crate::front::forwarded::forwarded_client(headers, peer.ip(), &self.trusted_proxies)
        {
            let span = tracing::Span::current();
            span.record("tenant.addr", tracing::field::display(client));
            span.record("tenant.via", tracing::field::display(peer));
            return client;
        }
        peer.ip()
    }

    /// Resolves a presented token for a tenant now. A use-limited token
    /// takes a use here, except SPICE tokens: their main channel claims in
    /// the link phase, their secondary channels never do (they join the
    /// session by connection id), so here SPICE only checks that a use or
    /// a live session of the token is left.
    pub async fn resolve(&self, token: &str, tenant: IpAddr) -> Result<Admission, Refusal> {
        let now = SystemTime::now();
        let a = self.resolvers.resolve(token, tenant, now).await?;
        if let Some(u) = &a.uses {
            if a.grant.kind == ConsoleKind::Spice {
                match u.peek(now).await {
                    Ok(_) => {}
                    Err(Refusal::TokenConsumed) if self.spice.has_token(a.token_id) => {}
                    Err(e) => return Err(e),
                }
            } else {
                let outcome = u.claim(now).await?;
                tracing::debug!(token.id = %a.token_id, ?outcome, "token use claimed");
            }
        }
        Ok(a)
    }

    /// The compute-side security settings of a grant.
    pub fn security(&self, grant: &Grant) -> Result<SessionSecurity, Refusal> {
        SessionSecurity::resolve(&self.profiles.current(), &grant.compute, &grant.target).map_err(
            |e| {
                tracing::error!(reason = %Refusal::ComputeConfig, error = %e, "session refused");
                Refusal::ComputeConfig
            },
        )
    }

    /// Dials the compute side, mapping failures to refusals (and logging them).
    pub async fn dial(&self, target: &Target) -> Result<ComputeStream, Refusal> {
        let dialled = match &self.allowlist {
            Some(list) => allowlist::dial(list, target, self.connect_timeout).await,
            None => console::dial(target, self.connect_timeout).await,
        };
        match dialled {
            Ok(s) => Ok(s),
            Err(e) => {
                let r = match e {
                    DialError::Timeout { .. } => Refusal::ComputeTimeout,
                    DialError::Io { .. } => Refusal::ComputeUnreachable,
                };
                tracing::warn!(reason = %r, side = %r.side(), error = %e, "session refused");
                Err(r)
            }
        }
    }
}

/// Counts live sessions so shutdown can wait for them.
#[derive(Debug, Default, Clone)]
pub struct LiveSessions {
    inner: Arc<(AtomicUsize, Notify)>,
    next_id: Arc<AtomicU64>,
}

/// Held by each live session; dropping it ends the session's count.
#[derive(Debug)]
pub struct LiveGuard {
    inner: Arc<(AtomicUsize, Notify)>,
    pub id: u64,
}

impl LiveSessions {
    /// Registers a new connection and gives it an id.
    pub fn enter(&self) -> LiveGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        LiveGuard {
            inner: Arc::clone(&self.inner),
            id,
        }
    }

    /// Connections currently open.
    pub fn count(&self) -> usize {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, or `deadline` passes.
    pub async fn drained(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.1.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}

/// Sends an HTTP refusal to the tenant (best effort) and logs it.
pub async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, r: Refusal) {
    let (status, phrase) = r.status();
    let extra: &[(&str, &str)] = match r {
        Refusal::ProxyAuthRequired => &[("Proxy-Authenticate", "Basic realm=\"consolegate\"")],
        Refusal::UpgradeRequired => &[("Upgrade", "websocket")],
        Refusal::BadRequest => &[("Sec-WebSocket-Version", "13")],
        _ => &[],
    };
    crate::error::count_refusal(r.kind());
    let resp = error_response(status, phrase, extra, r.tenant_message());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = w.write_all(&resp).await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
    .await;
    if !matches!(r, Refusal::ComputeTimeout | Refusal::ComputeUnreachable) {
        tracing::warn!(reason = %r, side = %r.side(), status, "session refused");
    }
}

/// Logs the end of an established session.
/// `compute_tls` says whether the compute leg ran TLS, for the hint below.
pub fn log_end(end: &End, counters: &Counters, compute_tls: bool) {
    let bytes_up = counters.up_bytes();
    let bytes_down = counters.down_bytes();
    let duration_ms = counters.elapsed().as_millis() as u64;
    if compute_tls && bytes_down == 0 && matches!(end, End::ComputeIo(_) | End::ComputeClosed) {
        // With TLS 1.3 a client learns that the server rejected its
        // certificate only after the handshake, often by a bare close.
        tracing::warn!(
            reason = "compute_tls",
            "the compute host closed the TLS session before sending any data: it may reject \
             the proxy's client certificate (check the compute host's CA and the profile's cert)"
        );
    }
    match end {
        End::TenantIo(e) | End::ComputeIo(e) => tracing::info!(
            end = %end.kind(), error = %e, bytes_up, bytes_down, duration_ms, "session closed"
        ),
        End::TenantProtocol { code, reason } => tracing::info!(
            end = %end.kind(),
            close_code = code,
            close_reason = reason,
            bytes_up,
            bytes_down,
            duration_ms,
            "session closed"
        ),
        _ => tracing::info!(
            end = %end.kind(),
            bytes_up,
            bytes_down,
            duration_ms,
            "session closed"
        ),
    }
}

/// Why a session could not be established after the dial.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    #[error("{0}")]
    Vnc(#[from] VncError),
    #[error("{0}")]
    TenantRfb(#[from] TenantRfbError),
    #[error("{0}")]
    Spice(#[from] SpiceError),
    #[error("compute TLS handshake failed: {0}")]
    Tls(String),
    #[error("{step} did not finish within {after:?}")]
    Timeout { step: &'static str, after: Duration },
}

impl EstablishError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EstablishError::Vnc(e) => e.kind(),
            EstablishError::Spice(e) => e.kind(),
            EstablishError::TenantRfb(_) => "tenant_protocol",
            EstablishError::Tls(_) => "compute_tls",
            EstablishError::Timeout { .. } => "handshake_timeout",
        }
    }

    /// Which side failed.
    pub fn side(&self) -> crate::error::Side {
        match self {
            EstablishError::TenantRfb(_) => crate::error::Side::Tenant,
            EstablishError::Spice(e) => e.side(),
            EstablishError::Vnc(VncError::MissingCredential(_) | VncError::NoChoice(_)) => {
                crate::error::Side::Proxy
            }
            _ => crate::error::Side::Compute,
        }
    }

    /// What the tenant is told.
    pub fn tenant_reason(&self) -> &'static str {
        match self {
            EstablishError::Vnc(e) => e.tenant_reason(),
            EstablishError::Spice(e) => e.tenant_reason(),
            EstablishError::TenantRfb(_) => "invalid RFB handshake from the client",
            EstablishError::Tls(_) => "TLS to the console server failed",
            EstablishError::Timeout { .. } => "console security handshake timed out",
        }
    }
}

/// Runs the console security phase on both sides after the dial and
/// returns the compute stream ready for the data path, with a label of
/// what was negotiated. VNC gets the RFB security MITM (the tenant sees
/// RFB 3.8 / None); serial and SPICE get TLS when the profile has it.
/// On a VNC failure the tenant is told why in RFB terms before returning.
pub async fn establish<T: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Context,
    kind: ConsoleKind,
    admission: Option<&Admission>,
    security: &SessionSecurity,
    compute: ComputeStream,
    tenant: &mut T,
) -> Result<(ComputeIo, spice::Label), EstablishError> {
    let limit = ctx.handshake_timeout;
    match kind {
        ConsoleKind::Vnc => {
            let negotiated = within(
                "compute RFB security handshake",
                limit,
                vnc::negotiate_compute(compute, security),
            )
            .await?;
            let (io, n) = match negotiated {
                Ok(v) => v,
                Err(e) => {
                    let refusal = format!("consolegate: {}", e.tenant_reason());
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        vnc::refuse_tenant(tenant, &refusal),
                    )
                    .await;
                    return Err(e.into());
                }
            };
            within("tenant RFB handshake", limit, vnc::serve_tenant(tenant)).await??;
            Ok((io, format!("rfb {} {}", n.version, n.security).into()))
        }
        ConsoleKind::Spice => {
            let token = admission.map_or(TokenId::ANONYMOUS, |a| a.token_id);
            let claim = admission.and_then(|a| a.uses.as_ref());
            let link = spice::establish(tenant, compute, security, &ctx.spice, token, claim);
            Ok(within("SPICE link", limit, link).await??)
        }
        ConsoleKind::Serial => match &security.tls {
            Some((cfg, name)) => {
                let tls = within(
                    COMPUTE_TLS_STEP,
                    limit,
                    console::tls_connect(compute, Arc::clone(cfg), name.clone()),
                )
                .await?
                .map_err(EstablishError::Tls)?;
                Ok((ComputeIo::Tls(Box::new(tls)), "tls".into()))
            }
            None => Ok((ComputeIo::Plain(compute), "plain".into())),
        },
    }
}

/// A TLS handshake to QEMU that never finishes usually means QEMU rejected
/// the proxy's client certificate without sending an alert.
const COMPUTE_TLS_STEP: &str =
    "compute TLS handshake (does the compute host accept the proxy's client certificate?)";

/// Runs a handshake step within the handshake timeout.
async fn within<F: std::future::Future>(
    step: &'static str,
    limit: Duration,
    f: F,
) -> Result<F::Output, EstablishError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| EstablishError::Timeout { step, after: limit })
}

/// What a session keeps once its handshake is done, and what its end
/// needs (the closing line, metrics, the audit record). Built at the end
/// of the (boxed) handshake phase, whose state is then dropped: an idle
/// session's task holds this, its guards and the running rung's boxed
/// future, and nothing of the token, grant or security profile.
#[derive(Debug)]
pub struct Established {
    pub counters: Counters,
    /// The audit record, all but the data path, times, bytes and end.
    record: SessionRecord,
    compute_tls: bool,
    /// The data path, once the rung is chosen.
    chosen: std::sync::OnceLock<&'static str>,
    metrics: std::sync::OnceLock<crate::control::metrics::SessionMetrics>,
    /// The session's place in the limits and in the session table: held
    /// until the end.
    _slot: crate::limits::Slot,
    /// The SPICE main channel's registration (secondary channels join
    /// while it lives), else nothing.
    _spice: Option<spice::SessionGuard>,
    session: crate::admin::sessions::SessionHandle,
}

/// Who the session is for and what it reaches, for [`Established::new`].
#[derive(Debug)]
pub struct Parties {
    pub session_id: u64,
    pub front: &'static str,
    pub tenant: IpAddr,
    pub via: Option<SocketAddr>,
    pub token_id: Option<TokenId>,
    pub console_kind: &'static str,
    pub compute: String,
    /// What the console handshake negotiated; for a SPICE main channel it
    /// holds the session registration, which must live as long as the
    /// session so that its secondary channels can join.
    pub security: spice::Label,
    pub compute_tls: bool,
}

impl Established {
    pub fn new(
        parties: Parties,
        slot: crate::limits::Slot,
        session: crate::admin::sessions::SessionHandle,
    ) -> Self {
        let (security, spice) = parties.security.into_parts();
        let record = SessionRecord {
            session_id: parties.session_id,
            front: parties.front,
            tenant: parties.tenant,
            via: parties.via,
            token_id: parties.token_id,
            console_kind: parties.console_kind,
            compute: parties.compute,
            security,
            datapath: "-",
            started: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
            end: "",
        };
        Self {
            counters: Counters::new(),
            record,
            compute_tls: parties.compute_tls,
            chosen: std::sync::OnceLock::new(),
            metrics: std::sync::OnceLock::new(),
            _slot: slot,
            _spice: spice,
            session,
        }
    }

    /// The signal the data path stops on (admin kill, revocation, shutdown).
    pub fn stop_signal(&self) -> crate::datapath::Stop {
        self.session.stop_signal()
    }

    /// The negotiated console security, as logged and audited.
    pub fn security(&self) -> &str {
        &self.record.security
    }

    /// The data path is chosen: counts the session as established
    /// `handshake` after the tenant connected. Only the first call counts.
    pub fn chosen(&self, datapath: &'static str, handshake: Duration) {
        if self.chosen.set(datapath).is_ok() {
            let _ = self
                .metrics
                .set(crate::control::metrics::SessionMetrics::established(
                    self.record.front,
                    self.record.console_kind,
                    handshake,
                ));
        }
    }

    /// The session ended: the closing line, metrics and the audit record.
    /// `datapath` is the rung it ended on, when the caller knows it better
    /// than [`Self::chosen`] did.
    pub fn finish(
        mut self,
        audit: &crate::control::audit::Audit,
        end: &End,
        datapath: Option<&'static str>,
    ) {
        log_end(end, &self.counters, self.compute_tls);
        let datapath = datapath
            .or_else(|| self.chosen.get().copied())
            .unwrap_or("-");
        let c = &self.counters;
        if let Some(m) = self.metrics.get() {
            m.ended(datapath, end.kind(), c.up_bytes(), c.down_bytes());
        }
        let r = &mut self.record;
        r.datapath = datapath;
        r.duration = c.elapsed();
        r.started = SystemTime::now() - r.duration;
        r.bytes_up = c.up_bytes();
        r.bytes_down = c.down_bytes();
        r.end = end.kind();
        audit.session(r);
    }
}
