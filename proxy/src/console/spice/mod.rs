//! SPICE: link-message aware proxying.
//!
//! The link phase (SpiceLinkMess / SpiceLinkReply / ticket / link result)
//! is terminated on both sides, so the tenant never needs the SPICE
//! password: towards the compute host the proxy links the channel the
//! tenant asked for and answers the ticket challenge with the configured
//! password; towards the tenant it answers with its own key, discards the
//! tenant's ticket (the consolegate token already authenticated it) and
//! passes on the server's link result.
//!
//! Capabilities pass through where they shape the data phase (the tenant's
//! channel capabilities and mini-header bit go to the server, the server's
//! come back), so both legs agree on message framing; only the
//! authentication capabilities are the proxy's own.
//!
//! A main channel's session id (from SPICE_MSG_MAIN_INIT) is recorded in
//! [`SpiceSessions`] with the token that opened it, for as long as the
//! main channel lives; a secondary channel (display, inputs, cursor...)
//! may join only a session its own token opened. From the first data
//! message on, bytes pass through untouched.

pub mod link;
pub mod migrate;
pub mod ticket;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::OnceCell;

use self::link::{Caps, LinkError, LinkMess, LinkReply, channel, common_cap, link_err};
use self::ticket::TicketError;
use super::security::SessionSecurity;
use super::{ComputeIo, ComputeStream};
use crate::auth::TokenId;

/// How many main-channel messages may precede SPICE_MSG_MAIN_INIT (none
/// do with spice-server today; a little slack for other servers).
const MAX_MESSAGES_BEFORE_INIT: usize = 8;

/// Live SPICE sessions: main-channel session id -> the token that opened it.
#[derive(Debug, Default)]
pub struct SpiceSessions {
    by_id: Mutex<HashMap<u32, Vec<(u64, TokenId)>>>,
    next: AtomicU64,
}

impl SpiceSessions {
    /// The token that opened session `id`, if it is live. Two live main
    /// channels (on different compute hosts) that drew the same id under
    /// different tokens make the id ambiguous: nobody owns it then.
    pub fn owner(&self, id: u32) -> Option<TokenId> {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let entries = map.get(&id)?;
        let (_, first) = entries.first()?;
        entries.iter().all(|(_, t)| t == first).then_some(*first)
    }

    /// Whether `token` opened a live session (its secondary channels may
    /// still join even when the token has no use left).
    pub fn has_token(&self, token: TokenId) -> bool {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        map.values().flatten().any(|(_, t)| *t == token)
    }

    /// Records that `token` opened session `id`, until the guard drops.
    pub fn register(self: &Arc<Self>, id: u32, token: TokenId) -> SessionGuard {
        let serial = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .push((serial, token));
        SessionGuard {
            sessions: Arc::clone(self),
            id,
            serial,
        }
    }

    /// Live sessions (for tests and metrics).
    pub fn len(&self) -> usize {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A main channel's registration; dropping it ends the session's record.
#[derive(Debug)]
pub struct SessionGuard {
    sessions: Arc<SpiceSessions>,
    id: u32,
    serial: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut map = self
            .sessions
            .by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get_mut(&self.id) {
            v.retain(|(s, _)| *s != self.serial);
            if v.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

/// What a console handshake negotiated, as a label for the session log,
/// plus (for a SPICE main channel) the session registration that must live
/// as long as the data path: `session::Established` takes it over
/// ([`Label::into_parts`]) and keeps it until the session ends; dropping
/// it releases the registration.
#[derive(Debug)]
pub struct Label {
    text: String,
    _session: Option<SessionGuard>,
}

impl Label {
    fn with_session(text: String, session: SessionGuard) -> Self {
        Self {
            text,
            _session: Some(session),
        }
    }

    /// The text, and the registration that must outlive the handshake.
    pub fn into_parts(self) -> (String, Option<SessionGuard>) {
        (self.text, self._session)
    }
}

impl From<String> for Label {
    fn from(text: String) -> Self {
        Self {
            text,
            _session: None,
        }
    }
}

impl From<&str> for Label {
    fn from(text: &str) -> Self {
        text.to_owned().into()
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why the SPICE link phase failed. Variants are named after the step;
/// none carries a password, a ticket or a token.
#[derive(Debug, thiserror::Error)]
pub enum SpiceError {
    #[error("tenant closed the connection or failed during {step}: {source}")]
    TenantIo {
        step: &'static str,
        source: io::Error,
    },
    #[error("tenant sent an invalid {step}: {source}")]
    TenantProtocol {
        step: &'static str,
        source: LinkError,
    },
    #[error("tenant asked for auth mechanism {0}; only SPICE tickets are offered")]
    TenantAuthMechanism(u32),
    #[error(
        "tenant linked a main channel to an existing session (migration), which is not supported"
    )]
    MigrationUnsupported,
    #[error(
        "tenant linked a {channel} channel to a SPICE session its token did not open (or that has ended)"
    )]
    SessionNotOwned { channel: &'static str },
    #[error("compute TLS handshake failed: {0}")]
    Tls(String),
    #[error("compute closed the connection or failed during {step}: {source}")]
    ComputeIo {
        step: &'static str,
        source: io::Error,
    },
    #[error("compute sent an invalid {step}: {source}")]
    ComputeProtocol {
        step: &'static str,
        source: LinkError,
    },
    #[error("compute refused the {channel} channel link: error {code} ({})", link_err::name(*code))]
    LinkRefused { channel: &'static str, code: u32 },
    #[error("compute offers no SPICE ticket authentication (SASL only?)")]
    NoTicketAuth,
    #[error("compute sent an unusable ticket key: {0}")]
    ServerKey(TicketError),
    #[error("the configured SPICE password cannot be sent: {0}")]
    Password(TicketError),
    #[error(
        "compute rejected the SPICE ticket: link result {code} ({}); check the SPICE password configured for this token or profile",
        link_err::name(*code)
    )]
    TicketRejected { code: u32 },
    #[error("compute refused the {channel} channel after the ticket: link result {code} ({})", link_err::name(*code))]
    LinkResult { channel: &'static str, code: u32 },
    #[error(
        "compute did not start the main channel with SPICE_MSG_MAIN_INIT (got message type {0})"
    )]
    NoMainInit(u16),
    #[error("the proxy's ticket key is unavailable: {0}")]
    ProxyKey(String),
    #[error("main channel refused: {0}")]
    Token(crate::error::Refusal),
}

impl SpiceError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SpiceError::TenantIo { .. } => "tenant_io",
            SpiceError::TenantProtocol { .. } | SpiceError::TenantAuthMechanism(_) => {
                "tenant_protocol"
            }
            SpiceError::MigrationUnsupported => "spice_migration_unsupported",
            SpiceError::SessionNotOwned { .. } => "spice_session_not_owned",
            SpiceError::Tls(_) => "compute_tls",
            SpiceError::ComputeIo { .. } => "compute_io",
            SpiceError::ComputeProtocol { .. } | SpiceError::NoMainInit(_) => "compute_protocol",
            SpiceError::LinkRefused { .. } | SpiceError::LinkResult { .. } => "compute_refused",
            SpiceError::NoTicketAuth => "no_common_security",
            SpiceError::ServerKey(_) => "compute_protocol",
            SpiceError::Password(_) => "missing_credential",
            SpiceError::TicketRejected { .. } => "compute_auth_failed",
            SpiceError::ProxyKey(_) => "internal",
            SpiceError::Token(r) => r.kind(),
        }
    }

    /// Which side failed.
    pub fn side(&self) -> crate::error::Side {
        use crate::error::Side;
        match self {
            SpiceError::TenantIo { .. }
            | SpiceError::TenantProtocol { .. }
            | SpiceError::TenantAuthMechanism(_)
            | SpiceError::MigrationUnsupported
            | SpiceError::SessionNotOwned { .. } => Side::Tenant,
            SpiceError::Password(_) | SpiceError::ProxyKey(_) => Side::Proxy,
            SpiceError::Token(r) => r.side(),
            _ => Side::Compute,
        }
    }

    /// What the tenant is told.
    pub fn tenant_reason(&self) -> &'static str {
        match self {
            SpiceError::TenantIo { .. } => "the client went away during the SPICE link",
            SpiceError::TenantProtocol { .. } | SpiceError::TenantAuthMechanism(_) => {
                "invalid SPICE link message from the client"
            }
            SpiceError::MigrationUnsupported => "SPICE migration is not supported by the proxy",
            SpiceError::SessionNotOwned { .. } => "unknown SPICE session",
            SpiceError::Tls(_) => "TLS to the console server failed",
            SpiceError::ComputeIo { .. }
            | SpiceError::ComputeProtocol { .. }
            | SpiceError::ServerKey(_)
            | SpiceError::NoMainInit(_) => "console server failed during the SPICE link",
            SpiceError::LinkRefused { .. } | SpiceError::LinkResult { .. } => {
                "console server refused the SPICE channel"
            }
            SpiceError::NoTicketAuth => {
                "console server security settings not supported by the proxy configuration"
            }
            SpiceError::TicketRejected { .. } => {
                "the proxy could not authenticate to the console server"
            }
            SpiceError::Password(_) => "console credentials are not configured correctly",
            SpiceError::ProxyKey(_) => "internal error",
            SpiceError::Token(r) => r.tenant_message(),
        }
    }
}

/// The proxy's ticket key (public part, SpiceLinkReply form), generated
/// once per process on first use, off the async runtime.
async fn proxy_key() -> Result<&'static [u8; link::PUBKEY_LEN], SpiceError> {
    static KEY: OnceCell<[u8; link::PUBKEY_LEN]> = OnceCell::const_new();
    KEY.get_or_try_init(|| async {
        let generated = tokio::task::spawn_blocking(|| {
            // The private half is dropped here: tenants' tickets are never
            // decrypted.
            ticket::generate(&mut rsa::rand_core::OsRng).map(|(_, spki)| spki)
        })
        .await
        .map_err(|e| SpiceError::ProxyKey(e.to_string()))?;
        generated.map_err(|e| SpiceError::ProxyKey(e.to_string()))
    })
    .await
}

async fn read_exact<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    err: impl FnOnce(io::Error) -> SpiceError,
) -> Result<(), SpiceError> {
    s.read_exact(buf).await.map(|_| ()).map_err(err)
}

async fn write_flush<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> io::Result<()> {
    s.write_all(b).await?;
    s.flush().await
}

fn tenant_io(step: &'static str) -> impl FnOnce(io::Error) -> SpiceError {
    move |source| SpiceError::TenantIo { step, source }
}

fn compute_io(step: &'static str) -> impl FnOnce(io::Error) -> SpiceError {
    move |source| SpiceError::ComputeIo { step, source }
}

/// Tells the tenant, best effort, that its link failed.
async fn refuse_tenant<T: AsyncWrite + Unpin>(tenant: &mut T, code: u32) {
    let _ = write_flush(tenant, &link::encode_link_error(code)).await;
}

/// Reads a SpiceLinkHeader and its body (bounded by [`link::MAX_LINK_SIZE`]).
async fn read_link<S: AsyncRead + Unpin>(
    s: &mut S,
    min: usize,
    io_err: fn(io::Error) -> SpiceError,
    proto_err: fn(LinkError) -> SpiceError,
) -> Result<Vec<u8>, SpiceError> {
    let mut h = [0u8; link::HEADER_LEN];
    read_exact(s, &mut h, io_err).await?;
    let header = link::parse_header(&h, min).map_err(proto_err)?;
    let mut body = vec![0u8; header.size as usize];
    read_exact(s, &mut body, io_err).await?;
    Ok(body)
}

/// Opens the compute leg of a SPICE channel and runs its link phase on
/// both sides. On success the compute stream is positioned at the start
/// of the data phase (for a main channel, just after SPICE_MSG_MAIN_INIT,
/// which the tenant has been sent). On failure the tenant has been told in
/// SPICE terms (a link reply error or link result) where the protocol
/// allows it.
pub async fn establish<T: AsyncRead + AsyncWrite + Unpin>(
    tenant: &mut T,
    compute: ComputeStream,
    security: &SessionSecurity,
    sessions: &Arc<SpiceSessions>,
    token: TokenId,
    claim: Option<&crate::auth::uses::UseClaim>,
) -> Result<(ComputeIo, Label), SpiceError> {
    // 1. The tenant's link message.
    let body = read_link(
        tenant,
        link::LINK_MESS_LEN,
        |source| SpiceError::TenantIo {
            step: "SpiceLinkHeader",
            source,
        },
        |source| SpiceError::TenantProtocol {
            step: "SpiceLinkHeader",
            source,
        },
    )
    .await;
    let mess = match body.and_then(|b| {
        link::parse_link_mess(&b).map_err(|source| SpiceError::TenantProtocol {
            step: "SpiceLinkMess",
            source,
        })
    }) {
        Ok(m) => m,
        Err(e) => {
            if let SpiceError::TenantProtocol { source, .. } = &e {
                refuse_tenant(tenant, source.code()).await;
            }
            return Err(e);
        }
    };
    let channel = channel::name(mess.channel_type);
    if mess.channel_type == channel::MAIN && mess.connection_id != 0 {
        refuse_tenant(tenant, link_err::BAD_CONNECTION_ID).await;
        return Err(SpiceError::MigrationUnsupported);
    }
    if mess.channel_type != channel::MAIN && sessions.owner(mess.connection_id) != Some(token) {
        refuse_tenant(tenant, link_err::BAD_CONNECTION_ID).await;
        return Err(SpiceError::SessionNotOwned { channel });
    }
    // A use-limited token: the main channel takes the use (secondary
    // channels were admitted above by the session their token opened).
    if mess.channel_type == channel::MAIN
        && let Some(c) = claim
        && let Err(r) = c.claim(std::time::SystemTime::now()).await
    {
        crate::error::count_refusal(r.kind());
        let code = match r {
            crate::error::Refusal::ResolverUnavailable => link_err::ERROR,
            _ => link_err::PERMISSION_DENIED,
        };
        refuse_tenant(tenant, code).await;
        return Err(SpiceError::Token(r));
    }

    // 2. The compute leg, its link and ticket.
    let (mut io, tls) = match &security.tls {
        Some((cfg, name)) => match super::tls_connect(compute, Arc::clone(cfg), name.clone()).await
        {
            Ok(s) => (ComputeIo::Tls(Box::new(s)), true),
            Err(e) => {
                refuse_tenant(tenant, link_err::ERROR).await;
                return Err(SpiceError::Tls(e));
            }
        },
        None => (ComputeIo::Plain(compute), false),
    };
    let server = match link_compute(&mut io, &mess, security).await {
        Ok(s) => s,
        Err(e) => {
            let code = match &e {
                SpiceError::LinkRefused { code, .. } => *code,
                _ => link_err::ERROR,
            };
            refuse_tenant(tenant, code).await;
            return Err(e);
        }
    };

    // 3. The tenant's side: our key, its (ignored) ticket, the server's result.
    let key = match proxy_key().await {
        Ok(k) => k,
        Err(e) => {
            refuse_tenant(tenant, link_err::ERROR).await;
            return Err(e);
        }
    };
    let mut common = vec![common_cap::AUTH_SELECTION, common_cap::AUTH_SPICE];
    if server.caps.has_common(common_cap::MINI_HEADER) {
        common.push(common_cap::MINI_HEADER);
    }
    let reply = LinkReply {
        error: link_err::OK,
        pub_key: *key,
        caps: Caps {
            common: Caps::common_bits(&common),
            channel: server.caps.channel.clone(),
        },
    };
    write_flush(tenant, &link::encode_link_reply(&reply))
        .await
        .map_err(tenant_io("SpiceLinkReply"))?;
    if mess.caps.has_common(common_cap::AUTH_SELECTION) {
        let mut m = [0u8; 4];
        read_exact(tenant, &mut m, tenant_io("SpiceLinkAuthMechanism")).await?;
        let mechanism = u32::from_le_bytes(m);
        if mechanism != common_cap::AUTH_SPICE {
            let _ = write_flush(tenant, &link_err::INVALID_DATA.to_le_bytes()).await;
            return Err(SpiceError::TenantAuthMechanism(mechanism));
        }
    }
    let mut ignored = [0u8; link::TICKET_LEN];
    read_exact(tenant, &mut ignored, tenant_io("SpiceLinkEncryptedTicket")).await?;
    write_flush(tenant, &server.result.to_le_bytes())
        .await
        .map_err(tenant_io("link result"))?;
    match server.result {
        link_err::OK => {}
        link_err::PERMISSION_DENIED => {
            return Err(SpiceError::TicketRejected {
                code: server.result,
            });
        }
        code => return Err(SpiceError::LinkResult { channel, code }),
    }

    let leg = if tls { "tls" } else { "plain" };
    let label = format!("spice {leg} {channel}:{}", mess.channel_id);
    if mess.channel_type != channel::MAIN {
        return Ok((io, label.into()));
    }

    // 4. Main channel: register the session before the tenant can learn
    // its id, then pass the messages up to SPICE_MSG_MAIN_INIT on.
    let mini = mess.caps.has_common(common_cap::MINI_HEADER)
        && server.caps.has_common(common_cap::MINI_HEADER);
    let guard = forward_until_main_init(&mut io, tenant, mini, sessions, token).await?;
    // From here on, migration announcements never reach the tenant.
    let io = ComputeIo::SpiceMain(Box::new(migrate::Filtered::new(io, mini)));
    Ok((io, Label::with_session(label, guard)))
}

/// What the compute host answered during its link.
#[derive(Debug)]
struct ServerLink {
    caps: Caps,
    result: u32,
}

/// Links `mess`'s channel on the compute host and answers the ticket
/// challenge with the configured password.
async fn link_compute(
    io: &mut ComputeIo,
    mess: &LinkMess,
    security: &SessionSecurity,
) -> Result<ServerLink, SpiceError> {
    let channel = channel::name(mess.channel_type);
    let mut common = vec![common_cap::AUTH_SELECTION, common_cap::AUTH_SPICE];
    if mess.caps.has_common(common_cap::MINI_HEADER) {
        common.push(common_cap::MINI_HEADER);
    }
    let ours = LinkMess {
        connection_id: mess.connection_id,
        channel_type: mess.channel_type,
        channel_id: mess.channel_id,
        caps: Caps {
            common: Caps::common_bits(&common),
            channel: mess.caps.channel.clone(),
        },
    };
    write_flush(io, &link::encode_link_mess(&ours))
        .await
        .map_err(compute_io("SpiceLinkMess"))?;
    let body = read_link(
        io,
        link::LINK_REPLY_LEN,
        |source| SpiceError::ComputeIo {
            step: "SpiceLinkReply",
            source,
        },
        |source| SpiceError::ComputeProtocol {
            step: "SpiceLinkHeader",
            source,
        },
    )
    .await?;
    let reply = link::parse_link_reply(&body).map_err(|source| SpiceError::ComputeProtocol {
        step: "SpiceLinkReply",
        source,
    })?;
    if reply.error != link_err::OK {
        return Err(SpiceError::LinkRefused {
            channel,
            code: reply.error,
        });
    }
    let selection = reply.caps.has_common(common_cap::AUTH_SELECTION);
    if selection && !reply.caps.has_common(common_cap::AUTH_SPICE) {
        return Err(SpiceError::NoTicketAuth);
    }
    let password = security
        .spice_password
        .as_ref()
        .map(|p| p.expose().as_bytes())
        .unwrap_or_default();
    let ticket = match ticket::encrypt(&reply.pub_key, password, &mut rsa::rand_core::OsRng) {
        Ok(t) => t,
        Err(e @ (TicketError::PasswordTooLong(_) | TicketError::PasswordNul)) => {
            return Err(SpiceError::Password(e));
        }
        Err(e) => return Err(SpiceError::ServerKey(e)),
    };
    let mut out = Vec::with_capacity(4 + link::TICKET_LEN);
    if selection {
        out.extend_from_slice(&common_cap::AUTH_SPICE.to_le_bytes());
    }
    out.extend_from_slice(&ticket);
    write_flush(io, &out)
        .await
        .map_err(compute_io("SpiceLinkEncryptedTicket"))?;
    let mut r = [0u8; 4];
    read_exact(io, &mut r, compute_io("link result")).await?;
    Ok(ServerLink {
        caps: reply.caps,
        result: u32::from_le_bytes(r),
    })
}

/// Reads main-channel messages from the compute host up to and including
/// SPICE_MSG_MAIN_INIT, registers its session id, and forwards each
/// message to the tenant unchanged.
async fn forward_until_main_init<T: AsyncWrite + Unpin>(
    io: &mut ComputeIo,
    tenant: &mut T,
    mini: bool,
    sessions: &Arc<SpiceSessions>,
    token: TokenId,
) -> Result<SessionGuard, SpiceError> {
    let hlen = link::data_header_len(mini);
    let mut last = 0;
    for _ in 0..MAX_MESSAGES_BEFORE_INIT {
        let mut msg = vec![0u8; hlen];
        read_exact(io, &mut msg, compute_io("main channel message")).await?;
        let h =
            link::parse_data_header(&msg, mini).map_err(|source| SpiceError::ComputeProtocol {
                step: "main channel message",
                source,
            })?;
        msg.resize(hlen + h.size as usize, 0);
        read_exact(io, &mut msg[hlen..], compute_io("main channel message")).await?;
        let guard = if h.msg_type == link::MSG_MAIN_INIT {
            let id = link::parse_main_init(&msg[hlen..]).map_err(|source| {
                SpiceError::ComputeProtocol {
                    step: "SPICE_MSG_MAIN_INIT",
                    source,
                }
            })?;
            Some(sessions.register(id, token))
        } else {
            None
        };
        write_flush(tenant, &msg)
            .await
            .map_err(tenant_io("SPICE_MSG_MAIN_INIT"))?;
        if let Some(g) = guard {
            return Ok(g);
        }
        last = h.msg_type;
    }
    Err(SpiceError::NoMainInit(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(b: u8) -> TokenId {
        // TokenIds come from tokens; derive distinct ones for tests.
        crate::auth::Token::new(format!("token-{b}")).id()
    }

    #[test]
    fn sessions_track_owners_until_the_guard_drops() {
        let s = Arc::new(SpiceSessions::default());
        let (a, b) = (tid(1), tid(2));
        assert_eq!(s.owner(7), None);
        let g1 = s.register(7, a);
        assert_eq!(s.owner(7), Some(a));
        let g2 = s.register(7, a);
        drop(g1);
        assert_eq!(s.owner(7), Some(a));
        // The same id under another token: ambiguous, so nobody owns it.
        let g3 = s.register(7, b);
        assert_eq!(s.owner(7), None);
        drop(g2);
        assert_eq!(s.owner(7), Some(b));
        drop(g3);
        assert_eq!(s.owner(7), None);
        assert!(s.is_empty());
    }

    #[test]
    fn label_displays_its_text() {
        let l: Label = "tls".into();
        assert_eq!(l.to_string(), "tls");
        let s = Arc::new(SpiceSessions::default());
        let l = Label::with_session("spice tls main:0".into(), s.register(1, tid(1)));
        assert_eq!(l.to_string(), "spice tls main:0");
        assert_eq!(s.len(), 1);
        drop(l);
        assert!(s.is_empty());
    }

    #[test]
    fn errors_name_their_side_and_never_the_password() {
        let e = SpiceError::TicketRejected {
            code: link_err::PERMISSION_DENIED,
        };
        assert_eq!(e.kind(), "compute_auth_failed");
        assert!(e.to_string().contains("permission denied"));
        assert_eq!(e.side(), crate::error::Side::Compute);
        let e = SpiceError::SessionNotOwned { channel: "inputs" };
        assert_eq!(e.side(), crate::error::Side::Tenant);
        assert_eq!(e.tenant_reason(), "unknown SPICE session");
    }
}
