//! Pump between a WebSocket tenant and a raw compute stream.
//!
//! Compute-to-tenant: bytes are read into a buffer that leaves room for the
//! frame header in front, so each read becomes one frame written with one
//! call and no copy (binary mode). Tenant-to-compute: frames are decoded
//! and unmasked in userspace (they are small: keys and pointer events).

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::lazybuf::{LazyBuf, LazyBytes};
pub(super) use super::ws_control::{Control, ControlQueue};
use super::{Counters, End, idle_watch};
use crate::front::websocket::frame::{
    self, Decoder, MAX_HEADER_LEN, Opcode, close_code, close_payload, encode_frame,
};
use crate::front::websocket::message::{Action, Inbound, Mode, encode_base64};
use crate::front::websocket::stream::WsParts;

/// Largest payload of one compute-to-tenant frame.
const DOWN_CHUNK: usize = 64 * 1024;
/// Largest tenant frame payload accepted.
pub const MAX_TENANT_FRAME: u64 = 1 << 20;
/// How long to wait for the other side's close frame after sending ours.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Settings of one WebSocket pump.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    pub mode: Mode,
    pub idle: Option<Duration>,
    pub ping_interval: Option<Duration>,
    /// The session is closed (1001) after this long.
    pub max_duration: Option<Duration>,
}

/// Runs the session until either side ends it; returns why it ended.
/// `tenant` carries the socket plus what the handshake phase left: raw
/// bytes not yet decoded, decoded bytes for the compute side, and the
/// message state.
pub async fn pump<T, C>(
    tenant: WsParts<T>,
    compute: C,
    settings: WsSettings,
    counters: &Counters,
    shutdown: super::Stop,
) -> End
where
    T: AsyncRead + AsyncWrite,
    C: AsyncRead + AsyncWrite,
{
    let WsParts {
        inner,
        raw,
        pending,
        inbound,
    } = tenant;
    let (tr, tw) = tokio::io::split(inner);
    let (cr, cw) = tokio::io::split(compute);
    let ctl = ControlQueue::default();

    let up = up(tr, raw, pending, inbound, cw, counters, &ctl);
    let down = down(cr, tw, settings, counters, &ctl);
    tokio::pin!(up, down);

    tokio::select! {
        end = &mut up => {
            // A close frame (echo or error) may be queued: let `down` send it.
            if !matches!(end, End::TenantIo(_)) {
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
            }
            end
        }
        end = &mut down => {
            // We sent a close: give the tenant a moment to answer it.
            if !matches!(end, End::TenantIo(_)) {
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut up).await;
            }
            end
        }
        () = idle_watch(counters, settings.idle) => {
            ctl.try_send(Control::Close(close_code::GOING_AWAY, "idle timeout"));
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
            End::IdleTimeout
        }
        () = async { match settings.max_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        } } => {
            ctl.try_send(Control::Close(close_code::GOING_AWAY, "maximum session duration reached"));
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
            End::MaxDuration
        }
        () = shutdown.raised() => {
            ctl.try_send(Control::Close(close_code::GOING_AWAY, "proxy shutting down"));
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await;
            End::Shutdown
        }
    }
}

/// Tenant to compute: decode frames, forward data, route control frames.
pub(super) async fn up<R, W>(
    mut tr: R,
    mut rbuf: BytesMut,
    pending: BytesMut,
    mut inbound: Inbound,
    mut cw: W,
    counters: &Counters,
    ctl: &ControlQueue,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut decoder = Decoder::new(MAX_TENANT_FRAME);
    let mut reader = LazyBytes::new(16 * 1024);
    if !pending.is_empty() {
        let written = match cw.write_all(&pending).await {
            Ok(()) => cw.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let _ = Box::pin(ctl.send(Control::Close(
                close_code::COMPUTE_ERROR,
                "console write failed",
            )))
            .await;
            return End::ComputeIo(e.to_string());
        }
        counters.add_up(pending.len());
    }
    loop {
        let frame = match decoder.decode(&mut rbuf) {
            Ok(Some(f)) => f,
            Ok(None) => match reader.read(&mut tr, &mut rbuf).await {
                Ok(0) => {
                    let _ = Box::pin(cw.shutdown()).await;
                    return End::TenantClosed;
                }
                Ok(_) => continue,
                Err(e) => return End::TenantIo(e.to_string()),
            },
            Err(e) => {
                let reason = frame_error_reason(&e);
                let _ = Box::pin(ctl.send(Control::Close(e.close_code(), reason))).await;
                return End::TenantProtocol {
                    code: e.close_code(),
                    reason,
                };
            }
        };
        match inbound.on_frame(frame) {
            Ok(Action::Forward(data)) => {
                tracing::trace!(n = data.len(), "tenant data");
                if data.is_empty() {
                    continue;
                }
                // Flush: a rustls compute leg may hold written bytes back.
                let written = match cw.write_all(&data).await {
                    Ok(()) => cw.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    let _ = Box::pin(ctl.send(Control::Close(
                        close_code::COMPUTE_ERROR,
                        "console write failed",
                    )))
                    .await;
                    return End::ComputeIo(e.to_string());
                }
                counters.add_up(data.len());
            }
            Ok(Action::Pong(p)) => {
                let _ = Box::pin(ctl.send(Control::Pong(p))).await;
            }
            Ok(Action::PongReceived) => counters.unanswered_pings.store(0, Ordering::Relaxed),
            Ok(Action::Closed { code, .. }) => {
                let echo = if code == close_code::NORMAL || code == close_code::GOING_AWAY {
                    code
                } else {
                    close_code::NORMAL
                };
                let _ = Box::pin(ctl.send(Control::Close(echo, ""))).await;
                let _ = Box::pin(cw.shutdown()).await;
                return End::TenantClosed;
            }
            Err(v) => {
                let _ = Box::pin(ctl.send(Control::Close(v.code, v.reason))).await;
                return End::TenantProtocol {
                    code: v.code,
                    reason: v.reason,
                };
            }
        }
    }
}

fn frame_error_reason(e: &frame::FrameError) -> &'static str {
    match e {
        frame::FrameError::ReservedBits => "reserved bits set",
        frame::FrameError::UnknownOpcode(_) => "unknown opcode",
        frame::FrameError::Unmasked => "client frames must be masked",
        frame::FrameError::BadControlFrame => "invalid control frame",
        frame::FrameError::TooLarge(_) => "frame too large",
        frame::FrameError::NonMinimalLength => "invalid frame length",
    }
}

/// Compute to tenant: frame console bytes, send pongs, pings and closes.
async fn down<R, W>(
    mut cr: R,
    mut tw: W,
    settings: WsSettings,
    counters: &Counters,
    ctl: &ControlQueue,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Buffer layout: [header room | payload]; the header is written just
    // before the payload so one write sends the whole frame.
    let mut buf = LazyBuf::new(MAX_HEADER_LEN, DOWN_CHUNK);
    let mut out = BytesMut::new();
    let mut ping = settings.ping_interval.map(|p| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some(Control::Pong(p)) => {
                    out.clear();
                    encode_frame(Opcode::Pong, &p, &mut out);
                    if let Err(e) = tw.write_all(&out).await {
                        return End::TenantIo(e.to_string());
                    }
                    let _ = tw.flush().await;
                }
                Some(Control::Close(code, reason)) => {
                    Box::pin(send_close(&mut tw, code, reason)).await;
                    return End::Closed;
                }
                None => return End::Closed,
            },
            r = buf.read(&mut cr) => match r {
                // EOF, or a TLS compute peer closing without close_notify
                // (QEMU does) after the console ran: an ordinary end. Before
                // any byte it is a failure (QEMU refusing our certificate).
                Ok(0) => {
                    Box::pin(send_close(&mut tw, close_code::NORMAL, "console closed")).await;
                    return End::ComputeClosed;
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && counters.down_bytes() > 0 => {
                    Box::pin(send_close(&mut tw, close_code::NORMAL, "console closed")).await;
                    return End::ComputeClosed;
                }
                Ok(n) => {
                    let res = match settings.mode {
                        Mode::Binary => {
                            let mut hdr = [0u8; MAX_HEADER_LEN];
                            let h = frame::encode_header(true, Opcode::Binary, None, n as u64, &mut hdr);
                            let start = MAX_HEADER_LEN - h;
                            let frame = buf.frame_mut(n);
                            frame[start..MAX_HEADER_LEN].copy_from_slice(&hdr[..h]);
                            tw.write_all(&frame[start..]).await
                        }
                        Mode::Base64 => {
                            out.clear();
                            let text = encode_base64(buf.data(n));
                            encode_frame(Opcode::Text, text.as_bytes(), &mut out);
                            tw.write_all(&out).await
                        }
                    };
                    if let Err(e) = res {
                        return End::TenantIo(e.to_string());
                    }
                    if let Err(e) = tw.flush().await {
                        return End::TenantIo(e.to_string());
                    }
                    tracing::trace!(n, "compute data");
                    counters.add_down(n);
                }
                Err(e) => {
                    Box::pin(send_close(&mut tw, close_code::COMPUTE_ERROR, "console connection failed")).await;
                    return End::ComputeIo(e.to_string());
                }
            },
            _ = async { match ping.as_mut() { Some(i) => i.tick().await, None => std::future::pending().await } } => {
                if counters.unanswered_pings.load(Ordering::Relaxed) >= 2 {
                    Box::pin(send_close(&mut tw, close_code::GOING_AWAY, "keepalive timeout")).await;
                    return End::KeepaliveTimeout;
                }
                counters.unanswered_pings.fetch_add(1, Ordering::Relaxed);
                out.clear();
                encode_frame(Opcode::Ping, b"consolegate", &mut out);
                if let Err(e) = tw.write_all(&out).await {
                    return End::TenantIo(e.to_string());
                }
                let _ = tw.flush().await;
            }
        }
    }
}

pub(super) async fn send_close<W: AsyncWrite + Unpin>(tw: &mut W, code: u16, reason: &str) {
    let mut out = BytesMut::new();
    encode_frame(Opcode::Close, &close_payload(code, reason), &mut out);
    let _ = tw.write_all(&out).await;
    let _ = tw.flush().await;
}
