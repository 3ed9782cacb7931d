//! Keeps SPICE migration announcements away from the tenant.
//!
//! During a live migration spice-server tells a connected client where the
//! VM is going (SPICE_MSG_MAIN_MIGRATE_BEGIN, _BEGIN_SEAMLESS,
//! _SWITCH_HOST carry the destination compute host's address, port and
//! certificate subject). Those are private addresses the tenant must never
//! learn, and the client could not reach them anyway: the proxy drops the
//! messages, the client loses its session when the source goes away, and
//! reconnects through the proxy with its token, which then resolves to the
//! new host (`PATCH /v1/tokens/{digest}` or the Redis store).
//!
//! [`MainFilter`] is sans-io over the compute-to-tenant bytes of a main
//! channel after SPICE_MSG_MAIN_INIT (fuzz target `spice_migrate`);
//! [`Filtered`] applies it to a stream.
#![forbid(unsafe_code)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::link::data_header_len;

/// SPICE_MSG_MAIN_MIGRATE_BEGIN.
pub const MSG_MIGRATE_BEGIN: u16 = 101;
/// SPICE_MSG_MAIN_MIGRATE_SWITCH_HOST.
pub const MSG_MIGRATE_SWITCH_HOST: u16 = 111;
/// SPICE_MSG_MAIN_MIGRATE_BEGIN_SEAMLESS.
pub const MSG_MIGRATE_BEGIN_SEAMLESS: u16 = 116;

/// Whether a main-channel server message names a migration target.
pub fn announces_target(msg_type: u16) -> bool {
    matches!(
        msg_type,
        MSG_MIGRATE_BEGIN | MSG_MIGRATE_SWITCH_HOST | MSG_MIGRATE_BEGIN_SEAMLESS
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a data header (`have` bytes so far).
    Header { have: usize },
    /// Passing (or skipping) the rest of a message body.
    Body { remaining: u32, drop: bool },
}

/// Removes migration announcements from a main channel's server messages.
#[derive(Debug, Clone)]
pub struct MainFilter {
    mini: bool,
    header: [u8; 18],
    state: State,
    dropped: Vec<u16>,
}

impl MainFilter {
    /// A filter positioned at a message boundary; `mini` says which data
    /// header the channel uses.
    pub fn new(mini: bool) -> Self {
        Self {
            mini,
            header: [0; 18],
            state: State::Header { have: 0 },
            dropped: Vec::new(),
        }
    }

    /// Feeds compute bytes, appending what the tenant may see to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) {
        let hlen = data_header_len(self.mini);
        while !input.is_empty() {
            match self.state {
                State::Header { have } => {
                    let take = (hlen - have).min(input.len());
                    self.header[have..have + take].copy_from_slice(&input[..take]);
                    input = &input[take..];
                    let have = have + take;
                    if have < hlen {
                        self.state = State::Header { have };
                        continue;
                    }
                    let at = if self.mini { 0 } else { 8 };
                    let h = &self.header;
                    let msg_type = u16::from_le_bytes([h[at], h[at + 1]]);
                    let size = u32::from_le_bytes([h[at + 2], h[at + 3], h[at + 4], h[at + 5]]);
                    let drop = announces_target(msg_type);
                    if drop {
                        self.dropped.push(msg_type);
                    } else {
                        out.extend_from_slice(&self.header[..hlen]);
                    }
                    self.state = if size == 0 {
                        State::Header { have: 0 }
                    } else {
                        State::Body {
                            remaining: size,
                            drop,
                        }
                    };
                }
                State::Body { remaining, drop } => {
                    let take = (remaining as usize).min(input.len());
                    if !drop {
                        out.extend_from_slice(&input[..take]);
                    }
                    input = &input[take..];
                    let remaining = remaining - take as u32;
                    self.state = if remaining == 0 {
                        State::Header { have: 0 }
                    } else {
                        State::Body { remaining, drop }
                    };
                }
            }
        }
    }

    /// Message types dropped since the last call.
    pub fn take_dropped(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.dropped)
    }
}

/// A compute stream whose reads pass through a [`MainFilter`]; writes are
/// untouched.
#[derive(Debug)]
pub struct Filtered<S> {
    inner: S,
    filter: MainFilter,
    out: BytesMut,
    raw: Box<[u8]>,
}

impl<S> Filtered<S> {
    pub fn new(inner: S, mini: bool) -> Self {
        Self {
            inner,
            filter: MainFilter::new(mini),
            out: BytesMut::new(),
            raw: vec![0u8; 16 * 1024].into_boxed_slice(),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Filtered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.raw);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.filter.feed(got, &mut this.out);
            for t in this.filter.take_dropped() {
                tracing::info!(
                    msg_type = t,
                    "SPICE migration announcement dropped: the tenant never learns the compute \
                     host's address and reconnects through the proxy"
                );
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Filtered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini(t: u16, body: &[u8]) -> Vec<u8> {
        let mut m = t.to_le_bytes().to_vec();
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn full(serial: u64, t: u16, body: &[u8]) -> Vec<u8> {
        let mut m = serial.to_le_bytes().to_vec();
        m.extend_from_slice(&t.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn drops_announcements_in_any_chunking() {
        for is_mini in [true, false] {
            let enc = |t: u16, b: &[u8]| if is_mini { mini(t, b) } else { full(7, t, b) };
            let keep1 = enc(105, b"mouse");
            let begin = enc(MSG_MIGRATE_BEGIN, b"10.0.0.9:5901 secret subject");
            let keep2 = enc(106, &[]);
            let switch = enc(MSG_MIGRATE_SWITCH_HOST, &[1, 2, 3]);
            let keep3 = enc(109, &[9; 40]);
            let stream = [&keep1[..], &begin, &keep2, &switch, &keep3].concat();
            let want = [&keep1[..], &keep2, &keep3].concat();
            for chunk in [1, 2, 5, 7, stream.len()] {
                let mut f = MainFilter::new(is_mini);
                let mut out = BytesMut::new();
                for c in stream.chunks(chunk) {
                    f.feed(c, &mut out);
                }
                assert_eq!(&out[..], &want[..], "mini={is_mini} chunk={chunk}");
                assert_eq!(
                    f.take_dropped(),
                    vec![MSG_MIGRATE_BEGIN, MSG_MIGRATE_SWITCH_HOST]
                );
            }
        }
    }

    #[tokio::test]
    async fn filtered_stream() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut server, client) = tokio::io::duplex(64);
        let mut f = Filtered::new(client, true);
        let msgs = [
            mini(MSG_MIGRATE_BEGIN_SEAMLESS, &[0; 100]),
            mini(105, b"ok"),
        ]
        .concat();
        tokio::spawn(async move {
            server.write_all(&msgs).await.unwrap();
        });
        let mut got = Vec::new();
        f.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, mini(105, b"ok"));
    }
}
