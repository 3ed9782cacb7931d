//! The WebSocket pump: one state machine, polled by hand, that moves a
//! session both ways. The copy pump ([`super::websocket`]) and the spliced
//! one ([`super::ws_splice`]) differ only in how compute-to-tenant bytes
//! travel ([`DownPath`]).
//!
//! Tenant to compute: frames are decoded and unmasked in userspace and
//! their data written to the compute side; pings are answered and a close
//! frame is echoed. Compute to tenant: each read becomes one frame, written
//! whole before anything else goes out; control frames (pongs, keepalive
//! pings, the close) go between frames. The idle timeout, the maximum
//! duration, the keepalive pings and the close grace share one timer.
//!
//! An idle session is this struct and one timer: no nested futures, no
//! channel between the directions and no buffer ([`super::lazybuf`]), so
//! that tens of thousands of idle consoles cost a few KiB each.

use std::collections::VecDeque;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::ktls::RecvState;
use super::lazybuf::{LazyBuf, LazyBytes};
use super::pipes::PipeSlot;
use super::splice::Sock;
use super::websocket::{CLOSE_GRACE, DOWN_CHUNK, MAX_TENANT_FRAME, WsSettings};
use super::{Counters, Dir, End, Stop};
use crate::front::websocket::frame::{Decoder, FrameError, MAX_HEADER_LEN, close_code};
use crate::front::websocket::message::{Action, Inbound, Mode};

/// One side of a WebSocket pump: a byte stream, and for the spliced pump
/// the socket under it.
pub trait WsLeg: AsyncRead + AsyncWrite + Unpin {
    /// The socket whose bytes may be spliced (`None`: they pass through
    /// userspace, e.g. a rustls stream).
    fn sock(&self) -> Option<Sock<'_>> {
        None
    }

    /// Before a write to [`Self::sock`] made outside `poll_write` (a
    /// frame header, a splice): a kTLS socket's transmit key is renewed
    /// here when it reached its record limit.
    fn poll_keys(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// After such a write of `n` bytes.
    fn wrote(&mut self, _n: usize) {}
}

/// Control frames the tenant side queued for the tenant writer.
#[derive(Debug)]
enum Control {
    Pong(BytesMut),
    Close(u16, &'static str),
}

/// Pongs that may wait at once; beyond it the tenant reader waits (a
/// tenant that pings and never reads is slowed down, not buffered).
const CONTROL_CAPACITY: usize = 8;

/// How compute-to-tenant bytes travel.
pub(super) enum DownPath {
    /// Read into a buffer with room for the frame header in front, so each
    /// read is one frame written with one call (binary), or encoded
    /// (base64).
    Copy {
        buf: LazyBuf,
        mode: Mode,
        armed: bool,
    },
    /// Spliced from the compute socket into a pipe, which tells how many
    /// bytes arrived; we write the header (`MSG_MORE`) and splice the
    /// payload on to the tenant. The pipe is held only while a frame is in
    /// flight.
    Splice {
        slot: PipeSlot,
        chunk: usize,
        /// No pipe could be had: try again at this time.
        retry_at: Option<Instant>,
        /// A kTLS compute leg stopped the splice at a non-data record.
        at_record: bool,
        /// The last read was small: read the next one by copy, as the
        /// splice rung does ([`crate::datapath::splice`]'s `SMALL`).
        small: bool,
        /// A kTLS compute leg: tickets spanning records, KeyUpdates.
        recv: RecvState,
    },
}

impl DownPath {
    /// The userspace copy in `mode`.
    pub(super) fn copy(mode: Mode) -> Self {
        DownPath::Copy {
            buf: LazyBuf::new(MAX_HEADER_LEN, DOWN_CHUNK),
            mode,
            armed: false,
        }
    }

    /// The spliced path, frames of at most `chunk` bytes; `recv`: the
    /// receive state of a kTLS compute socket.
    pub(super) fn splice(slot: PipeSlot, chunk: usize, recv: RecvState) -> Self {
        DownPath::Splice {
            slot,
            chunk,
            retry_at: None,
            at_record: false,
            small: true,
            recv,
        }
    }
}

/// What happens once a frame is out.
#[derive(Debug)]
enum Then {
    Nothing,
    /// Console bytes delivered: count them.
    Count(usize),
    /// That was our close frame: the compute-to-tenant direction ends so.
    End(End),
}

/// The frame going to the tenant now.
#[derive(Debug)]
enum Tx {
    Idle,
    /// A frame in its own buffer (control, base64, a kTLS record's data).
    Owned {
        buf: BytesMut,
        off: usize,
        then: Then,
    },
    /// A binary frame in place in the copy buffer: from `off` to the end
    /// of the `n` payload bytes.
    InPlace {
        off: usize,
        n: usize,
    },
    /// A spliced frame's header, then its `n` bytes from the pipe.
    Header {
        hdr: [u8; MAX_HEADER_LEN],
        off: usize,
        len: usize,
        n: usize,
    },
    Payload {
        left: usize,
        n: usize,
    },
    /// Written: flush (a rustls tenant holds bytes back), then `Then`.
    Flush(Then),
}

/// The state of one session's pump; see the module docs.
pub(super) struct Pump<'a, T, C> {
    tenant: T,
    compute: C,
    counters: &'a Counters,
    // Tenant to compute.
    rbuf: BytesMut,
    reader: LazyBytes,
    up_armed: bool,
    decoder: Decoder,
    inbound: Inbound,
    /// Data being written to the compute side, from `up_off`.
    up_out: BytesMut,
    up_off: usize,
    up_flush: bool,
    held_pong: Option<BytesMut>,
    /// The tenant's stream ended: shut down the compute side's writing,
    /// then this direction ends ([`End::TenantClosed`]).
    up_closing: bool,
    // Compute to tenant.
    down: DownPath,
    tx: Tx,
    ctl: VecDeque<Control>,
    ping_due: bool,
    // The one timer and its deadlines.
    timer: Option<Pin<Box<Sleep>>>,
    timer_at: Option<Instant>,
    ping_every: Option<Duration>,
    ping_at: Option<Instant>,
    idle: Option<Duration>,
    idle_at: Option<Instant>,
    max_at: Option<Instant>,
    grace_at: Option<Instant>,
    // How it ends.
    up_done: bool,
    down_done: bool,
    result: Option<End>,
    over: bool,
}

impl<'a, T: WsLeg, C: WsLeg> Pump<'a, T, C> {
    /// A pump between `tenant` (with what the handshake phase left: `raw`
    /// bytes not yet decoded, `pending` decoded bytes for the compute side,
    /// the message state) and `compute`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        tenant: T,
        raw: BytesMut,
        pending: BytesMut,
        inbound: Inbound,
        compute: C,
        down: DownPath,
        settings: WsSettings,
        counters: &'a Counters,
    ) -> Self {
        let now = Instant::now();
        let nonzero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        let ping_every = nonzero(settings.ping_interval);
        let idle = nonzero(settings.idle);
        Self {
            tenant,
            compute,
            counters,
            rbuf: raw,
            reader: LazyBytes::new(16 * 1024),
            up_armed: false,
            decoder: Decoder::new(MAX_TENANT_FRAME),
            inbound,
            up_out: pending,
            up_off: 0,
            up_flush: false,
            held_pong: None,
            up_closing: false,
            down,
            tx: Tx::Idle,
            ctl: VecDeque::new(),
            ping_due: false,
            timer: None,
            timer_at: None,
            ping_every,
            ping_at: ping_every.map(|p| now + p),
            idle,
            idle_at: idle.map(|i| now + i),
            max_at: nonzero(settings.max_duration).map(|d| now + d),
            grace_at: None,
            up_done: false,
            down_done: false,
            result: None,
            over: false,
        }
    }

    /// Runs the session until either side ends it, it times out or `stop`
    /// is raised; returns why it ended. The pump is borrowed, not moved,
    /// so the session's future holds its state once.
    pub(super) async fn run(&mut self, stop: &Stop) -> End {
        let raised = stop.raised();
        tokio::pin!(raised);
        let mut stopped = false;
        std::future::poll_fn(|cx| {
            if !stopped && raised.as_mut().poll(cx).is_ready() {
                stopped = true;
                self.stop_with(End::Shutdown, "proxy shutting down");
            }
            self.poll(cx)
        })
        .await
    }

    /// The tenant leg.
    pub(super) fn tenant(&self) -> &T {
        &self.tenant
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        // Bounded: each turn either ends, waits, or handled a timer event
        // or a pong that was waiting for room.
        for _ in 0..64 {
            if !self.up_done
                && let Poll::Ready(end) = self.poll_up(cx)
            {
                self.finish(Dir::Up, end);
            }
            if !self.down_done
                && let Poll::Ready(end) = self.poll_down(cx)
            {
                self.finish(Dir::Down, end);
            }
            let fired = !self.over && self.poll_timer(cx);
            if self.over {
                return Poll::Ready(self.result.take().unwrap_or(End::Closed));
            }
            let pong_fits = self.held_pong.is_some() && self.ctl.len() < CONTROL_CAPACITY;
            let again = fired || (pong_fits && !self.up_done);
            if !again {
                return Poll::Pending;
            }
        }
        // Never spin: come back on the next turn of the runtime.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One direction ended with `end`.
    fn finish(&mut self, dir: Dir, end: End) {
        match dir {
            Dir::Up => self.up_done = true,
            Dir::Down => self.down_done = true,
        }
        if self.result.is_some() {
            // The direction we were waiting for.
            self.over = true;
            return;
        }
        // A tenant that is gone cannot take a close frame; otherwise the
        // other direction gets a moment to finish the close handshake.
        let tenant_gone = matches!(end, End::TenantIo(_));
        self.result = Some(end);
        if tenant_gone || (self.up_done && self.down_done) {
            self.over = true;
        } else {
            self.grace_at = Some(Instant::now() + CLOSE_GRACE);
        }
    }

    /// The session ends for a reason of ours: a close frame to the tenant,
    /// then the session ends once it is out (or after the grace).
    fn stop_with(&mut self, end: End, reason: &'static str) {
        if self.result.is_some() {
            return;
        }
        self.result = Some(end);
        self.ctl
            .push_back(Control::Close(close_code::GOING_AWAY, reason));
        self.up_done = true;
        if self.down_done {
            self.over = true;
        } else {
            self.grace_at = Some(Instant::now() + CLOSE_GRACE);
        }
    }

    /// Handles the deadlines that passed and arms the timer for the next
    /// one. Returns whether something happened (the directions may have
    /// work now).
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let now = Instant::now();
        if self.grace_at.is_some_and(|at| at <= now) {
            self.over = true;
            return true;
        }
        let mut fired = false;
        if self.result.is_none() {
            if self.max_at.is_some_and(|at| at <= now) {
                self.stop_with(End::MaxDuration, "maximum session duration reached");
                fired = true;
            } else if let (Some(at), Some(idle)) = (self.idle_at, self.idle)
                && at <= now
            {
                let quiet = self.counters.idle_for();
                if quiet >= idle {
                    self.stop_with(End::IdleTimeout, "idle timeout");
                } else {
                    self.idle_at = Some(now + (idle - quiet));
                }
                fired = true;
            }
            if let (Some(at), Some(every)) = (self.ping_at, self.ping_every)
                && at <= now
                && !self.down_done
            {
                self.ping_due = true;
                self.ping_at = Some(now + every);
                fired = true;
            }
        }
        if self.over {
            return true;
        }
        let retry_at = match &self.down {
            DownPath::Splice { retry_at, .. } => *retry_at,
            DownPath::Copy { .. } => None,
        };
        let next = if self.result.is_some() {
            [self.grace_at, retry_at].into_iter().flatten().min()
        } else {
            [self.max_at, self.idle_at, self.ping_at, retry_at]
                .into_iter()
                .flatten()
                .min()
        };
        let Some(at) = next else {
            self.timer = None;
            self.timer_at = None;
            return fired;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if self.timer_at != Some(at) {
            timer.as_mut().reset(at);
            self.timer_at = Some(at);
        }
        if timer.as_mut().poll(cx).is_ready() {
            // Due (the clock may read a hair earlier than the timer):
            // handle it on the next turn, with the timer re-armed then.
            self.timer_at = None;
            if at <= Instant::now() {
                return true;
            }
            cx.waker().wake_by_ref();
        }
        fired
    }

    /// A write to the compute side failed: tell the tenant, end so.
    fn compute_write_failed(&mut self, e: io::Error) -> End {
        self.ctl.push_back(Control::Close(
            close_code::COMPUTE_ERROR,
            "console write failed",
        ));
        End::ComputeIo(e.to_string())
    }

    /// Tenant to compute: decode frames, forward data, route control frames.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            if self.up_off < self.up_out.len() {
                let w = Pin::new(&mut self.compute).poll_write(cx, &self.up_out[self.up_off..]);
                match ready!(w) {
                    Ok(0) => {
                        return Poll::Ready(
                            self.compute_write_failed(io::ErrorKind::WriteZero.into()),
                        );
                    }
                    Ok(n) => {
                        self.up_off += n;
                        self.up_flush = self.up_off == self.up_out.len();
                    }
                    Err(e) => return Poll::Ready(self.compute_write_failed(e)),
                }
                continue;
            }
            if self.up_flush {
                // A rustls compute leg may hold written bytes back.
                if let Err(e) = ready!(Pin::new(&mut self.compute).poll_flush(cx)) {
                    return Poll::Ready(self.compute_write_failed(e));
                }
                self.up_flush = false;
                self.counters.add_up(self.up_out.len());
                self.up_out = BytesMut::new();
                self.up_off = 0;
                continue;
            }
            if self.up_closing {
                // Pass the end of the tenant's stream on; an error changes
                // nothing now.
                let _ = ready!(Pin::new(&mut self.compute).poll_shutdown(cx));
                return Poll::Ready(End::TenantClosed);
            }
            if let Some(p) = self.held_pong.take() {
                if self.ctl.len() >= CONTROL_CAPACITY {
                    // The writer makes room in this same poll.
                    self.held_pong = Some(p);
                    return Poll::Pending;
                }
                self.ctl.push_back(Control::Pong(p));
            }
            let frame = match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let tenant = Pin::new(&mut self.tenant);
                    match ready!(self.reader.poll_read(
                        tenant,
                        &mut self.rbuf,
                        cx,
                        &mut self.up_armed
                    )) {
                        Ok(0) => self.up_closing = true,
                        Ok(_) => self.up_armed = false,
                        Err(e) => return Poll::Ready(End::TenantIo(e.to_string())),
                    }
                    continue;
                }
                Err(e) => {
                    let (code, reason) = (e.close_code(), frame_error_reason(&e));
                    self.ctl.push_back(Control::Close(code, reason));
                    return Poll::Ready(End::TenantProtocol { code, reason });
                }
            };
            match self.inbound.on_frame(frame) {
                Ok(Action::Forward(data)) => {
                    tracing::trace!(n = data.len(), "tenant data");
                    if !data.is_empty() {
                        self.up_out = data;
                        self.up_off = 0;
                    }
                }
                Ok(Action::Pong(p)) => self.held_pong = Some(p),
                Ok(Action::PongReceived) => {
                    self.counters.unanswered_pings.store(0, Ordering::Relaxed);
                }
                Ok(Action::Closed { code, .. }) => {
                    let echo = if code == close_code::NORMAL || code == close_code::GOING_AWAY {
                        code
                    } else {
                        close_code::NORMAL
                    };
                    self.ctl.push_back(Control::Close(echo, ""));
                    self.up_closing = true;
                }
                Err(v) => {
                    self.ctl.push_back(Control::Close(v.code, v.reason));
                    return Poll::Ready(End::TenantProtocol {
                        code: v.code,
                        reason: v.reason,
                    });
                }
            }
        }
    }
}

fn frame_error_reason(e: &FrameError) -> &'static str {
    match e {
        FrameError::ReservedBits => "reserved bits set",
        FrameError::UnknownOpcode(_) => "unknown opcode",
        FrameError::Unmasked => "client frames must be masked",
        FrameError::BadControlFrame => "invalid control frame",
        FrameError::TooLarge(_) => "frame too large",
        FrameError::NonMinimalLength => "invalid frame length",
    }
}

mod down;
#[cfg(test)]
mod tests;
