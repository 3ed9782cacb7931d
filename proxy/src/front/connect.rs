//! The HTTP CONNECT front end: target validated against the token table
//! (never an open relay), optional token authentication, then a raw tunnel.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::http::{HeadLimits, RequestHead};
use super::read_head;
use crate::auth::{Admission, Grant};
use crate::config::ConnectAuth;
use crate::console::ComputeIo;
use crate::console::{ConsoleKind, Host, Target, split_host_port};
use crate::control::metrics;
use crate::datapath::End;
use crate::error::Refusal;
use crate::session::{Context, Established, Parties, establish, refuse};

/// What an admitted CONNECT request opens.
struct Admitted {
    target: Target,
    kind: Option<ConsoleKind>,
    token: Option<Admission>,
}

impl Admitted {
    /// The grant whose compute settings apply: the token's, or for an
    /// unauthenticated CONNECT to a known target, default settings.
    fn grant(&self) -> Grant {
        match &self.token {
            Some(a) => a.grant.clone(),
            None => Grant {
                kind: self.kind.unwrap_or(ConsoleKind::Vnc),
                target: self.target.clone(),
                not_before: None,
                not_after: None,
                compute: Default::default(),
                limits: Default::default(),
            },
        }
    }
}

/// Serves one tenant connection on a CONNECT listener.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Context>) {
    let guard = ctx.live.enter();
    let accepted = std::time::Instant::now();
    let span = tracing::info_span!(
        "session",
        session.id = guard.id,
        tenant.addr = %peer,
        tenant.via = tracing::field::Empty,
        front = "connect",
        console.kind = tracing::field::Empty,
        token.id = tracing::field::Empty,
        compute.addr = tracing::field::Empty,
        datapath = tracing::field::Empty,
    );
    // The handshake phase is boxed and dropped once done, so an idle
    // session's task holds only `Established` and the rung it runs on.
    async move {
        let Some((est, tenant, compute)) = Box::pin(handshake(&ctx, tcp, peer, guard.id)).await
        else {
            return;
        };
        est.chosen("-", accepted.elapsed());
        let stop = est.stop_signal();
        let choosing = crate::ladder::choose_raw(&ctx, tenant, compute, &est.counters, stop);
        let rung = Box::pin(choosing).await;
        let pump = rung.finish();
        // At the maximum duration both sockets are dropped (closed): a raw
        // tunnel has no close frame to carry a reason.
        let (end, datapath) = match ctx.max_duration {
            Some(d) => tokio::time::timeout(d, pump)
                .await
                .unwrap_or((End::MaxDuration, "-")),
            None => pump.await,
        };
        est.finish(&ctx.audit, &end, Some(datapath));
        drop(guard);
    }
    .instrument(span)
    .await;
}

/// Head, token, limits, dial and the console handshake of one CONNECT
/// session. Returns the established session and its two legs, or `None`
/// once the tenant has been refused (or went away) and it was logged.
async fn handshake(
    ctx: &Context,
    mut tcp: TcpStream,
    peer: SocketAddr,
    session_id: u64,
) -> Option<(Established, TcpStream, ComputeIo)> {
    let _ = tcp.set_nodelay(true);
    let limits = HeadLimits::default();
    let read = Box::pin(read_head(&mut tcp, &limits));
    let (head, rest) = match tokio::time::timeout(ctx.handshake_timeout, read).await {
        Ok(Ok(v)) => v,
        Ok(Err(Some(r))) => return refused(&mut tcp, r).await,
        Ok(Err(None)) => return None,
        Err(_) => return refused(&mut tcp, Refusal::HandshakeTimeout).await,
    };
    let source = ctx.record_forwarded(&head, peer);
    let tenant = if source == peer.ip() {
        peer
    } else {
        SocketAddr::new(source, 0)
    };
    let resolving = std::time::Instant::now();
    let admitted = Box::pin(admit(ctx, &head, tenant)).await;
    metrics::resolved("connect", admitted.is_ok(), resolving.elapsed());
    let admitted = match admitted {
        Ok(a) => a,
        Err(r) => return refused(&mut tcp, r).await,
    };
    let token_id = admitted.token.as_ref().map(|a| a.token_id);
    let slot = match ctx.limits.acquire(source, token_id) {
        Ok(s) => s,
        Err(r) => return refused(&mut tcp, r).await,
    };
    let span = tracing::Span::current();
    if let Some(k) = admitted.kind {
        span.record("console.kind", k.as_str());
    }
    if let Some(a) = &admitted.token {
        span.record("token.id", tracing::field::display(a.token_id));
    }
    span.record("compute.addr", tracing::field::display(&admitted.target));
    let grant = admitted.grant();
    let session = ctx.sessions.register(
        session_id,
        "connect",
        tenant,
        grant.kind.as_str(),
        admitted.target.to_string(),
        admitted.token.as_ref(),
    );
    let security = match ctx.security(&grant) {
        Ok(s) => s,
        Err(r) => return refused(&mut tcp, r).await,
    };
    let compute = match Box::pin(ctx.dial(&admitted.target)).await {
        Ok(c) => c,
        Err(r) => return refused(&mut tcp, r).await,
    };
    if let Err(e) = tcp
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
    {
        tracing::info!(error = %e, "tenant went away before the tunnel opened");
        return None;
    }
    // Bytes the tenant sent right after the head belong to the console.
    let mut tenant_io = Prefixed {
        prefix: rest,
        inner: tcp,
    };
    let (mut compute, negotiated) = match Box::pin(establish(
        ctx,
        grant.kind,
        admitted.token.as_ref(),
        &security,
        compute,
        &mut tenant_io,
    ))
    .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                reason = e.kind(),
                side = %e.side(),
                profile = security.profile.as_deref().unwrap_or("-"),
                error = %e,
                "console handshake failed"
            );
            return None;
        }
    };
    let est = Established::new(
        Parties {
            session_id,
            front: "connect",
            tenant: source,
            via: (source != peer.ip()).then_some(peer),
            token_id,
            console_kind: grant.kind.as_str(),
            compute: admitted.target.to_string(),
            security: negotiated,
            compute_tls: compute.is_tls(),
        },
        slot,
        session,
    );
    let Prefixed { prefix, inner: tcp } = tenant_io;
    if !prefix.is_empty() {
        let written = match compute.write_all(&prefix).await {
            Ok(()) => compute.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::info!(error = %e, "compute write failed");
            return None;
        }
        est.counters.add_up(prefix.len());
    }
    drop(prefix);
    tracing::info!(security = %est.security(), "console handshake done");
    if compute.is_tls()
        && let Err(e) = compute.flush().await
    {
        tracing::info!(error = %e, "compute write failed");
        return None;
    }
    Some((est, tcp, compute))
}

/// [`refuse`], for a handshake phase that then gives up.
async fn refused<T>(tcp: &mut TcpStream, r: Refusal) -> Option<T> {
    refuse(tcp, r).await;
    None
}

async fn admit(ctx: &Context, head: &RequestHead, peer: SocketAddr) -> Result<Admitted, Refusal> {
    if head.method != "CONNECT" {
        return Err(Refusal::MethodNotAllowed);
    }
    let authority = head.target.as_str();
    // Token as pseudo-hostname: `CONNECT <token>:0`. Tokens are case
    // sensitive, so look at the host exactly as sent.
    // An IP address is never taken for a token (no resolver is asked).
    if let Some((raw_host, _)) = authority.rsplit_once(':')
        && !raw_host.is_empty()
        && !raw_host.starts_with('[')
        && raw_host.parse::<std::net::IpAddr>().is_err()
    {
        match ctx.resolve(raw_host, peer.ip()).await {
            Ok(a) => {
                return Ok(Admitted {
                    target: a.grant.target.clone(),
                    kind: Some(a.grant.kind),
                    token: Some(a),
                });
            }
            Err(
                r @ (Refusal::TokenExpired | Refusal::TokenConsumed | Refusal::SourceNotAllowed),
            ) => {
                return Err(r);
            }
            Err(_) => {}
        }
    }
    let (host, port) = split_host_port(authority).map_err(|_| Refusal::BadRequest)?;
    match ctx.connect_auth {
        ConnectAuth::Token => {
            let token = proxy_token(head).ok_or(Refusal::ProxyAuthRequired)?;
            let a = ctx.resolve(&token, peer.ip()).await?;
            if !same_endpoint(&a.grant.target, &host, port) {
                return Err(Refusal::TargetNotAllowed);
            }
            Ok(Admitted {
                target: a.grant.target.clone(),
                kind: Some(a.grant.kind),
                token: Some(a),
            })
        }
        ConnectAuth::None => {
            let kind = ctx.resolvers.target_kind(&host, port).await?;
            Ok(Admitted {
                target: Target::Tcp { host, port },
                kind: Some(kind),
                token: None,
            })
        }
    }
}

fn same_endpoint(target: &Target, host: &Host, port: u16) -> bool {
    target.tcp().is_some_and(|(h, p)| h == host && p == port)
}

/// The token from `Proxy-Authorization: Bearer <t>` or `Basic b64(user:t)`.
fn proxy_token(head: &RequestHead) -> Option<String> {
    let value = head.header("proxy-authorization")?;
    let (scheme, cred) = value.split_once(' ')?;
    let cred = cred.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!cred.is_empty()).then(|| cred.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(cred)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (_, token) = text.split_once(':')?;
        return (!token.is_empty()).then(|| token.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::http::parse_request_head;

    fn head(extra: &str) -> RequestHead {
        let raw = format!("CONNECT 127.0.0.1:5900 HTTP/1.1\r\nHost: 127.0.0.1:5900\r\n{extra}\r\n");
        parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn proxy_authorization_forms() {
        assert_eq!(
            proxy_token(&head("Proxy-Authorization: Bearer abc\r\n")).as_deref(),
            Some("abc")
        );
        // base64("user:s3cret")
        assert_eq!(
            proxy_token(&head("Proxy-Authorization: Basic dXNlcjpzM2NyZXQ=\r\n")).as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            proxy_token(&head("Proxy-Authorization: Basic !!!\r\n")),
            None
        );
        assert_eq!(
            proxy_token(&head("Proxy-Authorization: Digest x\r\n")),
            None
        );
        assert_eq!(proxy_token(&head("")), None);
    }
}

/// A stream with bytes already read in front of it.
#[derive(Debug)]
struct Prefixed<S> {
    prefix: bytes::BytesMut,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
