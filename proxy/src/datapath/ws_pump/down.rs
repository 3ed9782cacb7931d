//! Compute to tenant: the frames in flight, control frames between them,
//! and how console bytes are read (copied or spliced).

use std::io;
use std::io::Read as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::time::Instant;

use super::{Control, DownPath, Pump, Then, Tx, WsLeg};
use crate::datapath::End;
use crate::datapath::ktls::{Next, RECORD_BUF, poll_record};
use crate::datapath::splice::{NO_PIPE_RETRY, SMALL};
use crate::front::websocket::frame::{
    self, MAX_HEADER_LEN, Opcode, close_code, close_payload, encode_frame,
};
use crate::front::websocket::message::{Mode, encode_base64};
use crate::sys::pipe::splice;

impl<T: WsLeg, C: WsLeg> Pump<'_, T, C> {
    /// Compute to tenant: console frames, and between them pongs, pings
    /// and the close.
    pub(super) fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            match ready!(self.poll_tx(cx)) {
                Ok(Some(end)) => return Poll::Ready(end),
                Ok(None) => {}
                Err(e) => return Poll::Ready(End::TenantIo(e.to_string())),
            }
            if let Some(c) = self.ctl.pop_front() {
                match c {
                    Control::Pong(p) => self.send_frame(Opcode::Pong, &p, Then::Nothing),
                    Control::Close(code, reason) => self.send_close(code, reason, End::Closed),
                }
                continue;
            }
            if std::mem::take(&mut self.ping_due) {
                let pings = &self.counters.unanswered_pings;
                if pings.load(Ordering::Relaxed) >= 2 {
                    self.send_close(
                        close_code::GOING_AWAY,
                        "keepalive timeout",
                        End::KeepaliveTimeout,
                    );
                } else {
                    pings.fetch_add(1, Ordering::Relaxed);
                    self.send_frame(Opcode::Ping, b"consolegate", Then::Nothing);
                }
                continue;
            }
            match ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                // EOF, or a TLS compute peer closing without close_notify
                // (QEMU does) after the console ran: an ordinary end.
                // Before any byte it is a failure (QEMU refusing our
                // certificate).
                Ok(false) => {
                    self.send_close(close_code::NORMAL, "console closed", End::ComputeClosed);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        && self.counters.down_bytes() > 0 =>
                {
                    self.send_close(close_code::NORMAL, "console closed", End::ComputeClosed);
                }
                Err(e) => self.send_close(
                    close_code::COMPUTE_ERROR,
                    "console connection failed",
                    End::ComputeIo(e.to_string()),
                ),
            }
        }
    }

    fn send_frame(&mut self, opcode: Opcode, payload: &[u8], then: Then) {
        let mut buf = BytesMut::new();
        encode_frame(opcode, payload, &mut buf);
        self.tx = Tx::Owned { buf, off: 0, then };
    }

    fn send_close(&mut self, code: u16, reason: &str, end: End) {
        self.send_frame(Opcode::Close, &close_payload(code, reason), Then::End(end));
    }

    /// Writes the frame in flight. `Ok(Some)`: that was our close frame
    /// (written or not: the tenant may be gone), the direction ends so.
    fn poll_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<End>>> {
        loop {
            let next = match &mut self.tx {
                Tx::Idle => return Poll::Ready(Ok(None)),
                Tx::Owned { buf, off, then } => {
                    while *off < buf.len() {
                        let w = Pin::new(&mut self.tenant).poll_write(cx, &buf[*off..]);
                        match ready!(w) {
                            Ok(n) if n > 0 => *off += n,
                            r => {
                                let e = r.err().unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                                return Poll::Ready(match std::mem::replace(then, Then::Nothing) {
                                    Then::End(end) => Ok(Some(end)),
                                    _ => Err(e),
                                });
                            }
                        }
                    }
                    Tx::Flush(std::mem::replace(then, Then::Nothing))
                }
                Tx::InPlace { off, n } => {
                    let DownPath::Copy { buf, .. } = &mut self.down else {
                        return Poll::Ready(Err(io::Error::other("frame without a buffer")));
                    };
                    let frame = buf.frame_mut(*n);
                    while *off < frame.len() {
                        let w = Pin::new(&mut self.tenant).poll_write(cx, &frame[*off..]);
                        match ready!(w)? {
                            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            m => *off += m,
                        }
                    }
                    Tx::Flush(Then::Count(*n))
                }
                Tx::Header { hdr, off, len, n } => {
                    while *off < *len {
                        ready!(self.tenant.poll_keys(cx))?;
                        let Some(sock) = self.tenant.sock() else {
                            return Poll::Ready(Err(io::Error::other(
                                "no tenant socket to splice to",
                            )));
                        };
                        let part = &hdr[*off..*len];
                        let m = ready!(sock.poll_write_op(cx, || {
                            socket2::SockRef::from(&sock.fd()).send_with_flags(part, libc::MSG_MORE)
                        }))?;
                        *off += m;
                        self.tenant.wrote(m);
                    }
                    Tx::Payload { left: *n, n: *n }
                }
                Tx::Payload { left, n } => {
                    let DownPath::Splice { slot, .. } = &mut self.down else {
                        return Poll::Ready(Err(io::Error::other("no pipe to splice from")));
                    };
                    while *left > 0 {
                        ready!(self.tenant.poll_keys(cx))?;
                        let Some(sock) = self.tenant.sock() else {
                            return Poll::Ready(Err(io::Error::other(
                                "no tenant socket to splice to",
                            )));
                        };
                        let want = *left;
                        let moved = ready!(sock.poll_write_op(cx, || {
                            splice(slot.get()?.reader(), sock.fd(), want)
                        }))?;
                        if moved == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *left -= moved;
                        self.tenant.wrote(moved);
                    }
                    // The frame is out: the pipe is empty again.
                    slot.release();
                    tracing::trace!(n = *n, "compute data spliced");
                    Tx::Flush(Then::Count(*n))
                }
                Tx::Flush(then) => {
                    if let Err(e) = ready!(Pin::new(&mut self.tenant).poll_flush(cx)) {
                        return Poll::Ready(match std::mem::replace(then, Then::Nothing) {
                            Then::End(end) => Ok(Some(end)),
                            _ => Err(e),
                        });
                    }
                    match std::mem::replace(then, Then::Nothing) {
                        Then::Nothing => {}
                        Then::Count(n) => self.counters.add_down(n),
                        Then::End(end) => {
                            self.tx = Tx::Idle;
                            return Poll::Ready(Ok(Some(end)));
                        }
                    }
                    Tx::Idle
                }
            };
            self.tx = next;
        }
    }

    /// Reads console bytes and sets up the frame that carries them.
    /// `Ok(false)`: end of the console's stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        match &mut self.down {
            DownPath::Copy { buf, mode, armed } => {
                let n = ready!(buf.poll_read(Pin::new(&mut self.compute), cx, armed))?;
                *armed = false;
                if n == 0 {
                    return Poll::Ready(Ok(false));
                }
                tracing::trace!(n, "compute data");
                self.tx = match mode {
                    Mode::Binary => {
                        let mut hdr = [0u8; MAX_HEADER_LEN];
                        let h =
                            frame::encode_header(true, Opcode::Binary, None, n as u64, &mut hdr);
                        let off = MAX_HEADER_LEN - h;
                        buf.frame_mut(n)[off..MAX_HEADER_LEN].copy_from_slice(&hdr[..h]);
                        Tx::InPlace { off, n }
                    }
                    Mode::Base64 => {
                        let text = encode_base64(buf.data(n));
                        let mut out = BytesMut::new();
                        encode_frame(Opcode::Text, text.as_bytes(), &mut out);
                        Tx::Owned {
                            buf: out,
                            off: 0,
                            then: Then::Count(n),
                        }
                    }
                };
                Poll::Ready(Ok(true))
            }
            DownPath::Splice {
                slot,
                chunk,
                retry_at,
                at_record,
                small,
                recv,
            } => {
                let Some(src) = self.compute.sock() else {
                    return Poll::Ready(Err(io::Error::other("no console socket to splice from")));
                };
                if *at_record && let Some(sock) = src.ktls() {
                    // A non-data record (splice stopped at it, so it is
                    // there): read it with its type.
                    let mut rec = vec![0u8; RECORD_BUF];
                    let next = ready!(poll_record(sock, cx, &mut rec, recv))?;
                    *at_record = false;
                    match next {
                        Next::Data(n) => {
                            let mut out = BytesMut::new();
                            encode_frame(Opcode::Binary, &rec[..n], &mut out);
                            self.tx = Tx::Owned {
                                buf: out,
                                off: 0,
                                then: Then::Count(n),
                            };
                        }
                        Next::Eof => return Poll::Ready(Ok(false)),
                        Next::Ignored => {}
                    }
                    return Poll::Ready(Ok(true));
                }
                if let Some(at) = *retry_at {
                    if Instant::now() < at {
                        // The timer wakes us.
                        return Poll::Pending;
                    }
                    *retry_at = None;
                }
                if *small && src.ktls().is_none() {
                    // Keystroke echoes and small screen updates: one recv
                    // and the frame written whole, no pipe (two splices
                    // and a header cost more than this copy saves).
                    let mut buf = [0u8; MAX_HEADER_LEN + SMALL];
                    let n = loop {
                        ready!(src.poll_ready(cx, Interest::READABLE))?;
                        let mut got = 0;
                        let r = src.try_io(Interest::READABLE, || {
                            let into = &mut buf[MAX_HEADER_LEN..];
                            let n = (&*socket2::SockRef::from(&src.fd())).read(into)?;
                            got = n;
                            // A short read drained the socket: clear the
                            // readiness without asking again.
                            if n > 0 && n < SMALL {
                                Err(io::ErrorKind::WouldBlock.into())
                            } else {
                                Ok(n)
                            }
                        });
                        match r {
                            Ok(n) => break n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                                break got;
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                                ) => {}
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    };
                    if n == 0 {
                        return Poll::Ready(Ok(false));
                    }
                    *small = n < SMALL;
                    let mut hdr = [0u8; MAX_HEADER_LEN];
                    let h = frame::encode_header(true, Opcode::Binary, None, n as u64, &mut hdr);
                    let start = MAX_HEADER_LEN - h;
                    buf[start..MAX_HEADER_LEN].copy_from_slice(&hdr[..h]);
                    self.tx = Tx::Owned {
                        buf: BytesMut::from(&buf[start..MAX_HEADER_LEN + n]),
                        off: 0,
                        then: Then::Count(n),
                    };
                    return Poll::Ready(Ok(true));
                }
                loop {
                    ready!(src.poll_ready(cx, Interest::READABLE))?;
                    let mut no_pipe = None;
                    let r = src.try_io(Interest::READABLE, || {
                        let pipe = match slot.get() {
                            Ok(p) => p,
                            Err(e) => {
                                no_pipe = Some(e);
                                return Ok(0);
                            }
                        };
                        splice(src.fd(), pipe.writer(), *chunk)
                    });
                    if let Some(e) = no_pipe {
                        // Descriptors ran out: the bytes wait in the socket.
                        tracing::warn!(error = %e, "no pipe for splice: retrying");
                        *retry_at = Some(Instant::now() + NO_PIPE_RETRY);
                        // Re-arms the timer with the retry.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    match r {
                        Ok(0) => {
                            slot.release();
                            return Poll::Ready(Ok(false));
                        }
                        Ok(n) => {
                            *small = n < SMALL;
                            // The pipe holds exactly the n bytes just read.
                            let mut hdr = [0u8; MAX_HEADER_LEN];
                            let len = frame::encode_header(
                                true,
                                Opcode::Binary,
                                None,
                                n as u64,
                                &mut hdr,
                            );
                            self.tx = Tx::Header {
                                hdr,
                                off: 0,
                                len,
                                n,
                            };
                            return Poll::Ready(Ok(true));
                        }
                        // Nothing to read: give the pipe back while waiting.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => slot.release(),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e)
                            if e.raw_os_error() == Some(libc::EINVAL) && src.ktls().is_some() =>
                        {
                            slot.release();
                            *at_record = true;
                            return Poll::Ready(Ok(true));
                        }
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
    }
}
