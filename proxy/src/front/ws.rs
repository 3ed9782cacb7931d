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
use super::websocket::stream::WsStream;
use super::{TenantStream, read_head, web};
use crate::control::audit::SessionRecord;
use crate::control::metrics;
use crate::datapath::websocket::{CLOSE_GRACE, WsSettings};
use crate::datapath::{Counters, End};
use crate::error::Refusal;
use crate::session::{Context, establish, log_end, refuse};

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
    async move {
        let _ = tcp.set_nodelay(true);
        // Slow or silent tenants (slow-loris) get one deadline for TLS and head.
        let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
        let mut stream = match &ctx.tenant_tls {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let corked = crate::offload::Cork::new(tcp);
                match tokio::time::timeout_at(deadline, acceptor.accept(corked)).await {
                    Ok(Ok(s)) => TenantStream::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        crate::error::count_refusal(Refusal::TlsHandshake.kind());
                        tracing::info!(reason = %Refusal::TlsHandshake, error = %e, "session refused");
                        return;
                    }
                    Err(_) => {
                        crate::error::count_refusal(Refusal::HandshakeTimeout.kind());
                        tracing::warn!(reason = %Refusal::HandshakeTimeout, "session refused");
                        return;
                    }
                }
            }
            None => TenantStream::Plain(tcp),
        };
        let (head, rest) =
            match tokio::time::timeout_at(deadline, read_head(&mut stream, &HeadLimits::default()))
                .await
            {
                Ok(Ok(v)) => v,
                Ok(Err(Some(r))) => return refuse(&mut stream, r).await,
                Ok(Err(None)) => return,
                Err(_) => return refuse(&mut stream, Refusal::HandshakeTimeout).await,
            };
        // Plain GET/HEAD: the web console and --web files (docs/contract.md).
        if !head.header_has_token("upgrade", "websocket")
            && web::serve(&ctx.web, &head, &mut stream).await == web::Outcome::Done
        {
            return;
        }
        let source = ctx.record_forwarded(&head, peer);
        // The tenant: the forwarded address from a trusted balancer, or the peer.
        let tenant = if source == peer.ip() {
            peer
        } else {
            SocketAddr::new(source, 0)
        };
        let resolving = std::time::Instant::now();
        let admitted = admit(&ctx, &head, tenant).await;
        metrics::resolved("websocket", admitted.is_ok(), resolving.elapsed());
        let (upgrade, admission) = match admitted {
            Ok(v) => v,
            Err(r) => return refuse(&mut stream, r).await,
        };
        let _slot = match ctx.limits.acquire(source, Some(admission.token_id)) {
            Ok(s) => s,
            Err(r) => return refuse(&mut stream, r).await,
        };
        let grant = &admission.grant;
        let span = tracing::Span::current();
        span.record("console.kind", grant.kind.as_str());
        span.record("token.id", tracing::field::display(admission.token_id));
        span.record("compute.addr", tracing::field::display(&grant.target));
        let session = ctx.sessions.register(
            guard.id,
            "websocket",
            tenant,
            grant.kind.as_str(),
            grant.target.to_string(),
            Some(&admission),
        );
        let security = match ctx.security(grant) {
            Ok(s) => s,
            Err(r) => return refuse(&mut stream, r).await,
        };
        let compute = match ctx.dial(&grant.target).await {
            Ok(c) => c,
            Err(r) => return refuse(&mut stream, r).await,
        };
        if let Err(e) = stream.write_all(&switching_response(&upgrade)).await {
            tracing::info!(error = %e, "tenant went away during upgrade");
            return;
        }
        let mut ws = WsStream::new(stream, rest, upgrade.mode);
        let (compute, negotiated) =
            match establish(&ctx, grant.kind, Some(&admission), &security, compute, &mut ws).await {
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
                    return;
                }
            };
        if let Err(e) = ws.flush().await {
            tracing::info!(error = %e, "tenant went away during the handshake");
            return;
        }
        let counters = Counters::new();
        let settings = WsSettings {
            mode: upgrade.mode,
            idle: ctx.idle_timeout,
            ping_interval: ctx.ping_interval,
            max_duration: ctx.max_duration,
        };
        let compute_tls = compute.is_tls();
        let chosen = std::sync::OnceLock::new();
        let session_metrics = std::sync::OnceLock::new();
        let established = |datapath: &'static str| {
            let _ = chosen.set(datapath);
            let _ = session_metrics.set(metrics::SessionMetrics::established(
                "websocket",
                grant.kind.as_str(),
                accepted.elapsed(),
            ));
            tracing::info!(
                mode = upgrade.mode.name(),
                security = %negotiated,
                profile = security.profile.as_deref().unwrap_or("-"),
                datapath,
                "session established"
            );
        };
        let end: End = crate::ladder::pump_ws(
            &ctx,
            ws.into_parts(),
            compute,
            settings,
            &counters,
            session.stop_signal(),
            established,
        )
        .await;
        log_end(&end, &counters, compute_tls);
        if let Some(m) = session_metrics.get() {
            m.ended(
                chosen.get().copied().unwrap_or("-"),
                end.kind(),
                counters.up_bytes(),
                counters.down_bytes(),
            );
        }
        ctx.audit.session(&SessionRecord {
            session_id: guard.id,
            front: "websocket",
            tenant: source,
            via: (source != peer.ip()).then_some(peer),
            token_id: Some(admission.token_id),
            console_kind: grant.kind.as_str(),
            compute: grant.target.to_string(),
            security: negotiated.to_string(),
            datapath: chosen.get().copied().unwrap_or("-"),
            started: std::time::SystemTime::now() - counters.elapsed(),
            duration: counters.elapsed(),
            bytes_up: counters.up_bytes(),
            bytes_down: counters.down_bytes(),
            end: end.kind(),
        });
        drop(session);
        drop(guard);
    }
    .instrument(span)
    .await;
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
