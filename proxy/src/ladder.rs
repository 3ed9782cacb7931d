//! The data-path ladder: which rung an established session runs on.
//!
//! `ktls+splice` when every TLS leg can be handed to kernel TLS
//! ([`crate::offload`]), splice(2) when both legs are plain sockets and
//! `kernel.datapath` allows it (CONNECT tunnels; plain-HTTP WebSocket
//! sessions in binary mode), the userspace copy otherwise and whenever
//! pipes cannot be created. The
//! choice goes into the session span (`datapath`) and the `session
//! established` line. The pumps themselves live in [`crate::datapath`],
//! which knows nothing of the configuration.

use crate::config::kernel::DatapathMode;
use crate::console::{ComputeIo, ComputeStream};
use crate::datapath::splice::{Socket, Splicer};
use crate::datapath::{Counters, End, copy};
use crate::session::Context;

/// Runs the data path of an established raw (CONNECT) session: splice
/// when both legs are plain sockets and the configuration allows it, the
/// userspace copy otherwise. Records the choice in the span (`datapath`)
/// and logs "session established" with it. Returns how the session ended
/// and the data path it ran on.
pub async fn pump_raw(
    ctx: &Context,
    tenant: tokio::net::TcpStream,
    compute: ComputeIo,
    counters: &Counters,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (End, &'static str) {
    let span = tracing::Span::current();
    // kTLS: a TLS compute leg handed to the kernel, then splice.
    let (tenant, compute) =
        match crate::offload::pump_raw(ctx, tenant, compute, counters, stop.clone()).await {
            Ok(done) => return done,
            Err(legs) => legs,
        };
    let compute = match compute {
        ComputeIo::Plain(c) if ctx.datapath != DatapathMode::Copy => match Splicer::new() {
            Ok(splicer) => {
                span.record("datapath", "splice");
                tracing::info!(datapath = "splice", "session established");
                let compute = match c {
                    ComputeStream::Tcp(s) => Socket::Tcp(s),
                    ComputeStream::Unix(s) => Socket::Unix(s),
                };
                let end = splicer
                    .run(
                        Socket::Tcp(tenant),
                        compute,
                        counters,
                        ctx.idle_timeout,
                        stop.clone(),
                    )
                    .await;
                return (end, "splice");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create pipes for splice: using the copy");
                ComputeIo::Plain(c)
            }
        },
        other => other,
    };
    span.record("datapath", "copy");
    tracing::info!(datapath = "copy", "session established");
    let end = copy::bidirectional(tenant, compute, counters, ctx.idle_timeout, stop.clone()).await;
    (end, "copy")
}

/// Runs the data path of an established WebSocket session: the spliced
/// pump (`datapath = "splice"`) when the tenant is plain HTTP in binary
/// mode and the compute leg a plain socket, the userspace pump otherwise.
/// Records the choice in the span and calls `established` with it before
/// the pump starts.
pub async fn pump_ws(
    ctx: &Context,
    tenant: crate::front::websocket::stream::WsParts<crate::front::TenantStream>,
    compute: ComputeIo,
    settings: crate::datapath::websocket::WsSettings,
    counters: &Counters,
    stop: tokio::sync::watch::Receiver<bool>,
    established: impl FnOnce(&'static str),
) -> End {
    use crate::front::TenantStream;
    use crate::front::websocket::message::Mode;
    use crate::front::websocket::stream::WsParts;
    let span = tracing::Span::current();
    // kTLS: every TLS leg handed to the kernel, then the spliced pump.
    let mut established = Some(established);
    let (tenant, compute) = match crate::offload::pump_ws(
        ctx,
        tenant,
        compute,
        settings,
        counters,
        stop.clone(),
        &mut established,
    )
    .await
    {
        Ok(end) => return end,
        Err(legs) => legs,
    };
    let Some(established) = established else {
        return End::ComputeIo("data path chosen twice".into());
    };
    let WsParts {
        inner,
        raw,
        pending,
        inbound,
    } = tenant;
    let try_splice = ctx.datapath != DatapathMode::Copy && settings.mode == Mode::Binary;
    let (inner, compute) = match (inner, compute) {
        (TenantStream::Plain(tcp), ComputeIo::Plain(c)) if try_splice => {
            match crate::sys::pipe::Pipe::new(crate::datapath::splice::PIPE_SIZE) {
                Ok(pipe) => {
                    span.record("datapath", "splice");
                    established("splice");
                    let compute = match c {
                        ComputeStream::Tcp(s) => Socket::Tcp(s),
                        ComputeStream::Unix(s) => Socket::Unix(s),
                    };
                    let parts = WsParts {
                        inner: tcp,
                        raw,
                        pending,
                        inbound,
                    };
                    return crate::datapath::ws_splice::pump(
                        parts,
                        false,
                        compute,
                        pipe,
                        settings,
                        counters,
                        stop.clone(),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create a pipe for splice: using the copy");
                    (TenantStream::Plain(tcp), ComputeIo::Plain(c))
                }
            }
        }
        other => other,
    };
    span.record("datapath", "copy");
    established("copy");
    let parts = WsParts {
        inner,
        raw,
        pending,
        inbound,
    };
    crate::datapath::websocket::pump(parts, compute, settings, counters, stop.clone()).await
}
