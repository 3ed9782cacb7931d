//! The `ktls+splice` rung: every TLS leg of the session handed to the
//! kernel, then the splice pumps of [`crate::datapath`] on the sockets.

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::LABEL;
use crate::config::kernel::DatapathMode;
use crate::console::{ComputeIo, ComputeStream};
use crate::datapath::splice::{Socket, Splicer};
use crate::datapath::websocket::WsSettings;
use crate::datapath::{Counters, End};
use crate::front::TenantStream;
use crate::front::websocket::frame::{Opcode, encode_frame};
use crate::front::websocket::message::Mode;
use crate::front::websocket::stream::WsParts;
use crate::session::Context;

/// The `ktls+splice` rung of a raw (CONNECT) session: the tenant is a
/// plain socket, the compute leg TLS. Gives the legs back unchanged when
/// the session cannot run on it (the reason is logged).
pub async fn pump_raw(
    ctx: &Context,
    tenant: TcpStream,
    compute: ComputeIo,
    counters: &Counters,
    stop: crate::datapath::Stop,
) -> Result<(End, &'static str), (TcpStream, ComputeIo)> {
    let ComputeIo::Tls(tls) = compute else {
        return Err((tenant, compute));
    };
    if ctx.datapath == DatapathMode::Copy || !ctx.ktls.enabled() {
        return Err((tenant, ComputeIo::Tls(tls)));
    }
    if let Err(reason) = ctx.ktls.check_compute(&tls) {
        tracing::info!(reason = %reason, "kTLS not used for this session");
        return Err((tenant, ComputeIo::Tls(tls)));
    }
    let splicer = match Splicer::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create pipes for splice: using the copy");
            return Err((tenant, ComputeIo::Tls(tls)));
        }
    };
    // Boxed: the hand-over's state (about 2.5 KB) would otherwise stay in
    // this future, and so in every idle session, for the session's life.
    let hand_over = tokio::time::timeout(ctx.handshake_timeout, super::compute(tls, &ctx.ktls));
    let handed = match Box::pin(hand_over).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Ok((End::ComputeIo(e.to_string()), "-")),
        Err(_) => return Ok((End::ComputeIo("kTLS hand-over timed out".into()), "-")),
    };
    tracing::Span::current().record("datapath", LABEL);
    tracing::info!(datapath = LABEL, "session established");
    let mut tenant = tenant;
    if !handed.drained.is_empty() {
        // Console bytes rustls had decrypted: they precede the spliced ones.
        if let Err(e) = tenant.write_all(&handed.drained).await {
            return Ok((End::TenantIo(e.to_string()), LABEL));
        }
        counters.add_down(handed.drained.len());
    }
    if handed.peer_closed {
        // The compute host closed before the data path started.
        return Ok((End::ComputeClosed, LABEL));
    }
    let end = splicer
        .run(
            Socket::Tcp(tenant),
            Socket::Ktls(handed.socket, handed.keys),
            counters,
            ctx.idle_timeout,
            stop,
        )
        .await;
    Ok((end, LABEL))
}

/// The `ktls+splice` rung of a WebSocket session in binary mode: every
/// TLS leg is handed to the kernel, then [`ws_splice`] runs over the
/// sockets. Gives the legs back unchanged when the session cannot run on
/// it (the reason is logged). `established` is called with the label
/// before the pump starts.
pub async fn pump_ws(
    ctx: &Context,
    tenant: WsParts<TenantStream>,
    compute: ComputeIo,
    settings: WsSettings,
    counters: &Counters,
    stop: crate::datapath::Stop,
    established: &mut Option<impl FnOnce(&'static str)>,
) -> Result<End, (WsParts<TenantStream>, ComputeIo)> {
    let tls_leg =
        matches!(tenant.inner, TenantStream::Tls(_)) || matches!(compute, ComputeIo::Tls(_));
    if !tls_leg
        || ctx.datapath == DatapathMode::Copy
        || settings.mode != Mode::Binary
        || !ctx.ktls.enabled()
    {
        return Err((tenant, compute));
    }
    let tenant_ok = match &tenant.inner {
        TenantStream::Tls(t) => ctx.ktls.check_tenant(t),
        TenantStream::Plain(_) => Ok(()),
    };
    let checked = tenant_ok.and_then(|()| match &compute {
        ComputeIo::Tls(c) => ctx.ktls.check_compute(c),
        ComputeIo::Plain(_) => Ok(()),
        ComputeIo::SpiceMain(_) => {
            Err("the SPICE main channel is filtered in userspace".to_owned())
        }
    });
    if let Err(reason) = checked {
        tracing::info!(reason = %reason, "kTLS not used for this session");
        return Err((tenant, compute));
    }
    let size = crate::datapath::splice::PIPE_SIZE;
    let pipe = match crate::datapath::pipes::PipeSlot::available(size) {
        Ok(()) => crate::datapath::pipes::PipeSlot::new(size),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create a pipe for splice: using the copy");
            return Err((tenant, compute));
        }
    };
    let WsParts {
        inner,
        mut raw,
        pending,
        inbound,
    } = tenant;
    let offload = &ctx.ktls;
    let hand_over = async {
        let (tenant, tenant_ktls) = match inner {
            TenantStream::Plain(s) => (s, None),
            TenantStream::Tls(t) => {
                let h = super::tenant(t, offload)
                    .await
                    .map_err(|e| End::TenantIo(e.to_string()))?;
                if h.peer_closed {
                    return Err(End::TenantClosed);
                }
                // Frames rustls had decrypted come before the kernel's.
                raw.extend_from_slice(&h.drained);
                (h.socket, Some(h.keys))
            }
        };
        let (compute, down_first) = match compute {
            ComputeIo::Plain(ComputeStream::Tcp(s)) => (Socket::Tcp(s), Vec::new()),
            ComputeIo::Plain(ComputeStream::Unix(s)) => (Socket::Unix(s), Vec::new()),
            ComputeIo::Tls(c) => {
                let h = super::compute(c, offload)
                    .await
                    .map_err(|e| End::ComputeIo(e.to_string()))?;
                if h.peer_closed {
                    return Err(End::ComputeClosed);
                }
                (Socket::Ktls(h.socket, h.keys), h.drained)
            }
            ComputeIo::SpiceMain(_) => {
                return Err(End::ComputeIo("SPICE main channel on the kTLS rung".into()));
            }
        };
        Ok::<_, End>((tenant, tenant_ktls, compute, down_first))
    };
    let (mut tenant, mut tenant_ktls, compute, down_first) =
        // Boxed, as in `pump_raw`: the hand-over's state is dead weight after it.
        match Box::pin(tokio::time::timeout(ctx.handshake_timeout, hand_over)).await {
            Ok(Ok(v)) => v,
            Ok(Err(end)) => return Ok(end),
            Err(_) => return Ok(End::ComputeIo("kTLS hand-over timed out".into())),
        };
    tracing::Span::current().record("datapath", LABEL);
    if let Some(f) = established.take() {
        f(LABEL);
    }
    if !down_first.is_empty() {
        // Console bytes rustls had decrypted: one frame before the spliced ones.
        let mut out = bytes::BytesMut::new();
        encode_frame(Opcode::Binary, &down_first, &mut out);
        if let Err(e) = tenant.write_all(&out).await {
            return Ok(End::TenantIo(e.to_string()));
        }
        // A few records far below any limit, but counted all the same.
        if let Some(tx) = tenant_ktls.as_mut().and_then(|k| k.tx.as_mut()) {
            tx.wrote(out.len());
        }
        counters.add_down(down_first.len());
    }
    let parts = WsParts {
        inner: tenant,
        raw,
        pending,
        inbound,
    };
    Ok(crate::datapath::ws_splice::pump(
        parts,
        tenant_ktls,
        compute,
        pipe,
        settings,
        counters,
        stop,
    )
    .await)
}
