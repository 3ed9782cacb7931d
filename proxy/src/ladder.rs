//! The data-path ladder: which rung an established session runs on.
//!
//! `ktls+splice` when every TLS leg can be handed to kernel TLS
//! ([`crate::offload`]); io_uring for raw sessions whose legs are plain
//! sockets when `kernel.datapath = "uring"` (opt-in); splice(2) when both
//! legs are plain sockets and `kernel.datapath` allows it (CONNECT tunnels;
//! plain-HTTP WebSocket sessions in binary mode), the userspace copy
//! otherwise and whenever pipes cannot be created. The
//! choice goes into the session span (`datapath`) and the `session
//! established` line. The pumps themselves live in [`crate::datapath`],
//! which knows nothing of the configuration. Each rung's pump is boxed,
//! so a session's task holds the state of the rung it runs on, not of the
//! largest one.

use crate::config::kernel::DatapathMode;
use crate::console::{ComputeIo, ComputeStream};
use crate::datapath::splice::{Socket, Splicer};
use crate::datapath::{Counters, End, copy};
use crate::session::Context;

/// A session's rung, chosen: either it already ran (kTLS, sockmap: their
/// set-up and pump are one), or its boxed pump is returned for the caller
/// to await, so that while the session runs only the rung's state is
/// held, not the ladder's.
pub enum Rung<'a> {
    Ended(End, &'static str),
    Run(
        std::pin::Pin<Box<dyn std::future::Future<Output = End> + Send + 'a>>,
        &'static str,
    ),
}

impl std::fmt::Debug for Rung<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rung::Ended(end, datapath) => write!(f, "Ended({end:?}, {datapath})"),
            Rung::Run(_, datapath) => write!(f, "Run({datapath})"),
        }
    }
}

impl Rung<'_> {
    /// Runs the rung to its end; returns how it ended and its name.
    pub async fn finish(self) -> (End, &'static str) {
        match self {
            Rung::Ended(end, datapath) => (end, datapath),
            Rung::Run(pump, datapath) => (pump.await, datapath),
        }
    }
}

/// Chooses the data path of an established raw (CONNECT) session: splice
/// when both legs are plain sockets and the configuration allows it, the
/// userspace copy otherwise. Records the choice in the span (`datapath`)
/// and logs "session established" with it. Returns how the session ended
/// and the data path it ran on.
pub async fn choose_raw<'a>(
    ctx: &'a Context,
    tenant: tokio::net::TcpStream,
    compute: ComputeIo,
    counters: &'a Counters,
    stop: crate::datapath::Stop,
) -> Rung<'a> {
    let span = tracing::Span::current();
    // kTLS: a TLS compute leg handed to the kernel, then splice.
    let (tenant, compute) = match Box::pin(crate::offload::pump_raw(
        ctx,
        tenant,
        compute,
        counters,
        stop.clone(),
    ))
    .await
    {
        Ok((end, datapath)) => return Rung::Ended(end, datapath),
        Err(legs) => legs,
    };
    let (tenant, compute) = if ctx.datapath == DatapathMode::Sockmap {
        match Box::pin(try_sockmap(ctx, tenant, compute, counters, stop.clone())).await {
            Ok(rung) => return rung,
            Err(legs) => legs,
        }
    } else {
        (tenant, compute)
    };
    let compute = match compute {
        ComputeIo::Plain(c) if ctx.datapath == DatapathMode::Uring => {
            match crate::datapath::uring::Uring::new() {
                Ok(uring) => {
                    span.record("datapath", "uring");
                    tracing::info!(
                        datapath = "uring",
                        uring = uring.flavor().name(),
                        "session established"
                    );
                    let compute = match c {
                        ComputeStream::Tcp(s) => Socket::Tcp(s),
                        ComputeStream::Unix(s) => Socket::Unix(s),
                    };
                    let run = uring.run(
                        Socket::Tcp(tenant),
                        compute,
                        counters,
                        ctx.idle_timeout,
                        stop,
                    );
                    return Rung::Run(Box::pin(run), "uring");
                }
                Err(e) => {
                    // Start-up already warned once if io_uring is missing.
                    tracing::debug!(reason = %e, "io_uring data path refused: trying splice");
                    ComputeIo::Plain(c)
                }
            }
        }
        other if ctx.datapath == DatapathMode::Uring => {
            tracing::info!(
                "io_uring data path needs plain sockets on both legs (the compute leg is TLS): trying the next rung"
            );
            other
        }
        other => other,
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
                let run = splicer.run(
                    Socket::Tcp(tenant),
                    compute,
                    counters,
                    ctx.idle_timeout,
                    stop,
                );
                return Rung::Run(Box::pin(run), "splice");
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
    let run = copy::bidirectional(tenant, compute, counters, ctx.idle_timeout, stop);
    Rung::Run(Box::pin(run), "copy")
}

/// The opt-in sockmap rung (`kernel.datapath = "sockmap"`): both legs plain
/// TCP and the program loaded, else the legs come back for splice/copy with
/// the reason logged.
async fn try_sockmap<'a>(
    ctx: &'a Context,
    tenant: tokio::net::TcpStream,
    compute: ComputeIo,
    counters: &'a Counters,
    stop: crate::datapath::Stop,
) -> Result<Rung<'a>, (tokio::net::TcpStream, ComputeIo)> {
    let fallback = |why: &str| {
        tracing::info!(reason = why, "sockmap not used for this session");
    };
    let (c, sm) = match (compute, &ctx.sockmap) {
        (ComputeIo::Plain(ComputeStream::Tcp(c)), Ok(sm)) => (c, sm),
        (compute @ ComputeIo::Plain(ComputeStream::Tcp(_)), Err(e)) => {
            fallback(&format!("the sockmap program is not loaded: {e}"));
            return Err((tenant, compute));
        }
        (compute @ ComputeIo::Plain(ComputeStream::Unix(_)), _) => {
            fallback("the compute leg is a UNIX socket");
            return Err((tenant, compute));
        }
        (compute, _) => {
            fallback("the compute leg is TLS");
            return Err((tenant, compute));
        }
    };
    let span = tracing::Span::current();
    let established = || {
        span.record("datapath", "sockmap");
        tracing::info!(datapath = "sockmap", "session established");
    };
    let started = crate::datapath::sockmap::start(
        sm.as_ref(),
        tenant,
        c,
        counters,
        ctx.idle_timeout,
        stop,
        established,
    );
    match started.await {
        Ok(crate::datapath::sockmap::Started::Ended(end)) => Ok(Rung::Ended(end, "sockmap")),
        Ok(crate::datapath::sockmap::Started::Run(pump)) => Ok(Rung::Run(pump, "sockmap")),
        Err(d) => {
            tracing::warn!(reason = %d.reason, "sockmap declined the session");
            Err((d.tenant, ComputeIo::Plain(ComputeStream::Tcp(d.compute))))
        }
    }
}

/// Runs the data path of an established WebSocket session: the spliced
/// pump (`datapath = "splice"`) when the tenant is plain HTTP in binary
/// mode and the compute leg a plain socket, the userspace pump otherwise.
/// Records the choice in the span and calls `established` with it before
/// the pump starts.
pub async fn choose_ws<'a>(
    ctx: &'a Context,
    tenant: crate::front::websocket::stream::WsParts<crate::front::TenantStream>,
    compute: ComputeIo,
    settings: crate::datapath::websocket::WsSettings,
    counters: &'a Counters,
    stop: crate::datapath::Stop,
    established: impl FnOnce(&'static str),
) -> Rung<'a> {
    use crate::front::TenantStream;
    use crate::front::websocket::message::Mode;
    use crate::front::websocket::stream::WsParts;
    let span = tracing::Span::current();
    // kTLS: every TLS leg handed to the kernel, then the spliced pump.
    let mut established = Some(established);
    let (tenant, compute) = match Box::pin(crate::offload::pump_ws(
        ctx,
        tenant,
        compute,
        settings,
        counters,
        stop.clone(),
        &mut established,
    ))
    .await
    {
        Ok(end) => return Rung::Ended(end, "ktls+splice"),
        Err(legs) => legs,
    };
    let Some(established) = established else {
        return Rung::Ended(End::ComputeIo("data path chosen twice".into()), "-");
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
            let size = crate::datapath::splice::PIPE_SIZE;
            match crate::datapath::pipes::PipeSlot::available(size) {
                Ok(()) => {
                    let pipe = crate::datapath::pipes::PipeSlot::new(size);
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
                    let run = crate::datapath::ws_splice::pump(
                        parts, None, compute, pipe, settings, counters, stop,
                    );
                    return Rung::Run(Box::pin(run), "splice");
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
    let run = crate::datapath::websocket::pump(parts, compute, settings, counters, stop);
    Rung::Run(Box::pin(run), "copy")
}
