//! The WebSocket front end: TLS accept, upgrade, Origin and token checks,
//! compute dial, then the WebSocket pump.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::http::{HeadLimits, RequestHead, decode_component};
use super::websocket::frame::close_code;
use super::websocket::handshake::{check_upgrade, switching_response};
use super::websocket::message::Mode;
use super::websocket::stream::{WsParts, WsStream};
use super::{TenantStream, read_head, web};
use crate::console::ComputeIo;
use crate::control::metrics;
use crate::datapath::websocket::{CLOSE_GRACE, WsSettings};
use crate::error::Refusal;
use crate::session::{Context, Established, Parties, establish, refuse};

/// Serves one tenant connection on a WebSocket listener.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let guard = ctx.live.enter();
    let accepted = std::time::Instant::now();
    let span = tracing::info_span!(
        "session",
        session.id = guard.id,
        tenant.addr = %peer,
        tenant.via = tracing::field::Empty,
        front = "websocket",
        console.kind = tracing::field::Empty,
        token.id = tracing::field::Empty,
        compute.addr = tracing::field::Empty,
        datapath = tracing::field::Empty,
    );
    // Each phase's future is boxed (`Box::pin`) and the handshake's state
    // is dropped once done, so that the session task holds only the phase
    // it is in: an idle session keeps `Established` and the pump's state,
    // not the largest handshake state (a few KiB) for its lifetime.
    async move {
        // Bound straight from the temporary: a `Handshaken` local taken
        // apart field by field would keep its whole storage (632 bytes) in
        // the task for the session's lifetime.
        let Some(Handshaken {
            est,
            ws,
            compute,
            mode,
            profile,
        }) = Box::pin(handshake(&ctx, tcp, peer, guard.id)).await
        else {
            return;
        };
        let settings = WsSettings {
            mode,
            idle: ctx.idle_timeout,
            ping_interval: ctx.ping_interval,
            max_duration: ctx.max_duration,
        };
        let established = |datapath: &'static str| {
            est.chosen(datapath, accepted.elapsed());
            tracing::info!(
                mode = mode.name(),
                security = %est.security(),
                profile = profile.as_deref().unwrap_or("-"),
                datapath,
                "session established"
            );
        };
        let stop = est.stop_signal();
        let choosing = crate::ladder::choose_ws(
            &ctx,
            ws,
            compute,
            settings,
            &est.counters,
            stop,
            established,
        );
        // The data path is the one `established` was told.
        let (end, _) = Box::pin(choosing).await.finish().await;
        est.finish(&ctx.audit, &end, None);
        drop(guard);
    }
    .instrument(span)
    .await;
}

/// A WebSocket session whose handshake phase is done.
struct Handshaken {
    est: Established,
    ws: WsParts<TenantStream>,
    compute: ComputeIo,
    mode: Mode,
    /// The console security profile, for the `session established` line.
    profile: Option<Box<str>>,
}

/// TLS, head, upgrade, token, limits, dial and the console handshake of
/// one WebSocket session (or a plain GET served from the web files).
/// Returns `None` once the tenant has been refused (or went away, or was
/// served a file) and it was logged.
async fn handshake(
    ctx: &Context,
    tcp: TcpStream,
    peer: SocketAddr,
    session_id: u64,
) -> Option<Handshaken> {
    let _ = tcp.set_nodelay(true);
    // Slow or silent tenants (slow-loris) get one deadline for TLS and head.
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let mut stream = match &ctx.tenant_tls {
        Some(tls) => {
            let corked = crate::offload::Cork::for_leg(tcp);
            let accept = crate::tls_stream::ServerTls::accept(tls.current(), corked);
            match tokio::time::timeout_at(deadline, Box::pin(accept)).await {
                Ok(Ok(s)) => TenantStream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    crate::error::count_refusal(Refusal::TlsHandshake.kind());
                    tracing::info!(reason = %Refusal::TlsHandshake, error = %e, "session refused");
                    return None;
                }
                Err(_) => {
                    crate::error::count_refusal(Refusal::HandshakeTimeout.kind());
                    tracing::warn!(reason = %Refusal::HandshakeTimeout, "session refused");
                    return None;
                }
            }
        }
        None => TenantStream::Plain(tcp),
    };
    let limits = HeadLimits::default();
    let read = Box::pin(read_head(&mut stream, &limits));
    let (head, rest) = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(v)) => v,
        Ok(Err(Some(r))) => return refused(&mut stream, r).await,
        Ok(Err(None)) => return None,
        Err(_) => return refused(&mut stream, Refusal::HandshakeTimeout).await,
    };
    // Plain GET/HEAD: the web console and --web files (docs/contract.md).
    if !head.header_has_token("upgrade", "websocket")
        && Box::pin(web::serve(&ctx.web, &head, &mut stream)).await == web::Outcome::Done
    {
        return None;
    }
    let source = ctx.record_forwarded(&head, peer);
    // The tenant: the forwarded address from a trusted balancer, or the peer.
    let tenant = if source == peer.ip() {
        peer
    } else {
        SocketAddr::new(source, 0)
    };
    let resolving = std::time::Instant::now();
    let admitted = Box::pin(admit(ctx, &head, tenant)).await;
    metrics::resolved("websocket", admitted.is_ok(), resolving.elapsed());
    let (upgrade, admission) = match admitted {
        Ok(v) => v,
        Err(r) => return refused(&mut stream, r).await,
    };
    let slot = match ctx.limits.acquire(source, Some(admission.token_id)) {
        Ok(s) => s,
        Err(r) => return refused(&mut stream, r).await,
    };
    let grant = &admission.grant;
    let span = tracing::Span::current();
    span.record("console.kind", grant.kind.as_str());
    span.record("token.id", tracing::field::display(admission.token_id));
    span.record("compute.addr", tracing::field::display(&grant.target));
    let session = ctx.sessions.register(
        session_id,
        "websocket",
        tenant,
        grant.kind.as_str(),
        grant.target.to_string(),
        Some(&admission),
    );
    let security = match ctx.security(grant) {
        Ok(s) => s,
        Err(r) => return refused(&mut stream, r).await,
    };
    let compute = match Box::pin(ctx.dial(&grant.target)).await {
        Ok(c) => c,
        Err(r) => return refused(&mut stream, r).await,
    };
    if let Err(e) = stream.write_all(&switching_response(&upgrade)).await {
        tracing::info!(error = %e, "tenant went away during upgrade");
        return None;
    }
    let mut ws = WsStream::new(stream, rest, upgrade.mode);
    let establishing = establish(
        ctx,
        grant.kind,
        Some(&admission),
        &security,
        compute,
        &mut ws,
    );
    let (compute, negotiated) = match Box::pin(establishing).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                reason = e.kind(),
                side = %e.side(),
                profile = security.profile.as_deref().unwrap_or("-"),
                error = %e,
                "console handshake failed"
            );
            ws.queue_close(close_code::COMPUTE_ERROR, e.tenant_reason());
            let _ = tokio::time::timeout(CLOSE_GRACE, ws.flush()).await;
            return None;
        }
    };
    if let Err(e) = ws.flush().await {
        tracing::info!(error = %e, "tenant went away during the handshake");
        return None;
    }
    let est = Established::new(
        Parties {
            session_id,
            front: "websocket",
            tenant: source,
            via: (source != peer.ip()).then_some(peer),
            token_id: Some(admission.token_id),
            console_kind: grant.kind.as_str(),
            compute: grant.target.to_string(),
            security: negotiated,
            compute_tls: compute.is_tls(),
        },
        slot,
        session,
    );
    Some(Handshaken {
        est,
        ws: ws.into_parts(),
        compute,
        mode: upgrade.mode,
        profile: security.profile.as_deref().map(Box::from),
    })
}

/// [`refuse`], for a handshake phase that then gives up.
async fn refused<T>(stream: &mut TenantStream, r: Refusal) -> Option<T> {
    refuse(stream, r).await;
    None
}

/// Validates the upgrade, Origin and token; returns the upgrade and grant.
async fn admit(
    ctx: &Context,
    head: &RequestHead,
    peer: SocketAddr,
) -> Result<(super::websocket::handshake::Upgrade, crate::auth::Admission), Refusal> {
    let path_token = path_token(head.path())?;
    let upgrade = check_upgrade(head)?;
    if !origin_allowed(head, &ctx.allow_origins) {
        return Err(Refusal::OriginNotAllowed);
    }
    let token = head
        .query_param("token")
        .filter(|t| !t.is_empty())
        .or(path_token)
        .or_else(|| head.cookie("token").filter(|t| !t.is_empty()))
        .ok_or(Refusal::TokenMissing)?;
    let admission = ctx.resolve(&token, peer.ip()).await?;
    Ok((upgrade, admission))
}

/// The token carried in the path: `/<token>` or `/websockify/<token>`.
fn path_token(path: &str) -> Result<Option<String>, Refusal> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [] | ["websockify"] => Ok(None),
        ["websockify", t] | [t] => Ok(Some(decode_component(t))),
        _ => Err(Refusal::NotFound),
    }
}

/// Origin policy: an explicit allow-list, or same-origin only. Requests
/// without an Origin header (native clients) are allowed.
fn origin_allowed(head: &RequestHead, allow: &[String]) -> bool {
    let Some(origin) = head.header("origin") else {
        return true;
    };
    if !allow.is_empty() {
        return allow
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin));
    }
    let Some(host) = head.header("host") else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::http::parse_request_head;

    fn head(extra: &str) -> RequestHead {
        let raw = format!("GET / HTTP/1.1\r\nHost: proxy.example:6080\r\n{extra}\r\n");
        parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn token_in_path() {
        assert_eq!(path_token("/"), Ok(None));
        assert_eq!(path_token("/websockify"), Ok(None));
        assert_eq!(path_token("/websockify/abc"), Ok(Some("abc".into())));
        assert_eq!(path_token("/a%2Fb"), Ok(Some("a/b".into())));
        assert_eq!(path_token("/a/b/c"), Err(Refusal::NotFound));
    }

    #[test]
    fn origin_policy() {
        assert!(origin_allowed(&head(""), &[]));
        assert!(origin_allowed(
            &head("Origin: https://proxy.example:6080\r\n"),
            &[]
        ));
        assert!(!origin_allowed(
            &head("Origin: https://evil.example\r\n"),
            &[]
        ));
        assert!(!origin_allowed(&head("Origin: null\r\n"), &[]));
        let allow = vec!["https://console.example".to_owned()];
        assert!(origin_allowed(
            &head("Origin: https://console.example\r\n"),
            &allow
        ));
        assert!(!origin_allowed(
            &head("Origin: https://proxy.example:6080\r\n"),
            &allow
        ));
    }
}
