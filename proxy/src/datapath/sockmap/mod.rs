//! sockmap data path for plain TCP sessions: an sk_skb stream verdict
//! redirects each socket's incoming bytes to its peer socket inside the
//! kernel, so the bytes never wake this process. Applies only when both
//! legs are plain TCP sockets (a UNIX leg cannot enter a SOCKHASH here, a
//! rustls leg has to be decrypted in userspace).
//!
//! The maps and programs are someone else's ([`Redirect`], implemented by
//! the control plane with aya); this module only knows the three traps of
//! the mechanism and keeps the contract of the other raw paths (counters,
//! half-close, resets, backpressure, idle timeout, shutdown):
//! 1. A socket with the verdict attached is read only to learn about EOF
//!    and errors; wake-ups without user data give EAGAIN, and once the
//!    peer's FIN was seen epoll keeps reporting readiness, so an EAGAIN
//!    then is retried on a timer instead of spinning.
//! 2. FIN is not forwarded, and redirected bytes are sent later by a kernel
//!    worker: at EOF of one side the pump waits until the peer socket has
//!    taken everything the EOF side received (peer's acked bytes + its
//!    unacked queue, `TCP_INFO` + `SIOCOUTQ`, against the EOF side's
//!    `tcpi_bytes_received`) before it passes the half-close on with
//!    `shutdown(SHUT_WR)`.
//! 3. Bytes queued before a socket enters the map are not redirected until
//!    something kicks the socket, and a receive queue whose head skb
//!    userspace has read in part is mishandled (measured here: bytes
//!    duplicated with a verdict only, lost with the stream parser). So the
//!    pump forwards what is readable itself and lets the sockets enter the
//!    map only at a moment both receive queues are empty; it reads each
//!    socket once right after (a read runs whole skbs that arrived in
//!    between through the verdict, in order).
//!
//! The byte counters come from `TCP_INFO` too (sampled on a timer, and
//! exact at each half-close); the idle timeout sees them.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Counters, Dir, End, idle_watch};
use crate::sys::pipe::readable_bytes;
use crate::sys::tcpinfo::{self, TCP_CLOSE_WAIT};

/// The two sockets of a session in the kernel maps, by cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub tenant: u64,
    pub compute: u64,
}

/// The kernel side: puts two sockets into the redirect maps and takes them
/// out again. Implemented by `control::sockmap` (aya); this module does not
/// know how.
pub trait Redirect: Send + Sync + std::fmt::Debug {
    /// From now on the bytes arriving on `tenant` leave through `compute`
    /// and the other way round. Must make each socket the other's target
    /// before either starts forwarding.
    fn pair(&self, tenant: BorrowedFd<'_>, compute: BorrowedFd<'_>) -> io::Result<Pair>;
    /// Takes both sockets out of the maps (closed sockets are gone already).
    fn unpair(&self, pair: Pair);
}

/// The session did not enter the maps; the sockets are handed back (bytes
/// readable at the time were forwarded already) so another path can run.
#[derive(Debug)]
pub struct Declined {
    pub tenant: TcpStream,
    pub compute: TcpStream,
    pub reason: String,
}

/// Longest wait between two samples of the counters.
const SAMPLE_MAX: Duration = Duration::from_secs(1);
/// Polling while a half-close waits for the kernel worker, and for EOF
/// after an EAGAIN on a socket whose FIN epoll already reported.
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(20);
/// Bytes moved per drain call before the snapshot is tried again.
const DRAIN_MAX: usize = 4 << 20;
/// Tries to find both sockets quiet long enough for exact baselines.
const SETTLE_TRIES: usize = 200;

/// One non-blocking read straight from the socket (no tokio readiness
/// check): `Ok(0)` is EOF, `WouldBlock` nothing to read now.
fn recv_now(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read as _;
    let s = socket2::SockRef::from(sock);
    (&*s).read(buf)
}

/// Writes all of `buf` to `dst`, waiting for room.
async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        match dst.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards what `src` has queued to `dst` in userspace (up to
/// [`DRAIN_MAX`] bytes). Returns whether `src` is at EOF.
async fn drain(
    src: &TcpStream,
    dst: &TcpStream,
    dir: Dir,
    counters: Option<&Counters>,
) -> Result<bool, End> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut moved = 0usize;
    while moved < DRAIN_MAX {
        match recv_now(src, &mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                let data = buf.get(..n).unwrap_or_default();
                write_all(dst, data).await.map_err(|e| dir.write_err(e))?;
                if let Some(c) = counters {
                    dir.count(c, n);
                }
                moved += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(dir.read_err(e)),
        }
    }
    Ok(false)
}

/// Data bytes a socket has received (the FIN takes one unit of
/// `tcpi_bytes_received`).
fn data_received(info: tcpinfo::TcpInfo, fin: bool) -> u64 {
    info.bytes_received.saturating_sub(u64::from(fin))
}

/// Exact counts of one socket while nobody else reads or writes it: data
/// bytes consumed from it, and bytes ever written into it. `None` if bytes
/// arrived or were acknowledged during the reads (try again).
fn quiet_counts(s: BorrowedFd<'_>) -> io::Result<Option<(u64, u64)>> {
    let inq = readable_bytes(s)?;
    let outq = tcpinfo::unacked_bytes(s)?;
    let info = tcpinfo::tcp_info(s)?;
    // The receive queue must be empty: the kernel mishandles a queue whose
    // head skb userspace has read in part (the verdict gets the whole skb
    // again, or loses it), so only whole new skbs may be waiting when the
    // socket enters the map.
    if inq != 0 || readable_bytes(s)? != 0 || tcpinfo::unacked_bytes(s)? != outq {
        return Ok(None);
    }
    // Nothing shut down yet: CLOSE_WAIT is exactly "the peer's FIN is in".
    let fin = info.state == TCP_CLOSE_WAIT;
    let consumed = data_received(info, fin).saturating_sub(inq as u64);
    Ok(Some((consumed, info.bytes_acked + outq as u64)))
}

/// A lower bound of the bytes ever written into `s` (acked, then the
/// queue: an ack between the two reads is missed, never counted twice).
fn written_at_least(s: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcpinfo::tcp_info(s)?.bytes_acked;
    Ok(acked + tcpinfo::unacked_bytes(s)? as u64)
}

/// One direction, src -> dst.
#[derive(Debug)]
struct Flow {
    dir: Dir,
    /// Data bytes consumed from src before it entered the map.
    consumed_base: u64,
    /// Bytes written into dst before the maps.
    written_base: u64,
    /// Kernel-moved bytes already in the counters.
    reported: u64,
    /// src is at EOF; the data bytes it received since the base.
    target: Option<u64>,
    /// dst got `shutdown(SHUT_WR)`.
    done: bool,
    /// Polling src for EOF on a timer (after an EAGAIN once src's FIN
    /// had arrived), with this delay, next at `poll_at`.
    poll: Option<Duration>,
    poll_at: Option<Instant>,
    /// Last `tcpi_bytes_received` of src (activity for the idle timeout).
    seen: u64,
}

impl Flow {
    fn new(dir: Dir, consumed_base: u64, written_base: u64) -> Self {
        Self {
            dir,
            consumed_base,
            written_base,
            reported: 0,
            target: None,
            done: false,
            poll: None,
            poll_at: None,
            seen: 0,
        }
    }

    /// Updates the counters from what dst has taken; returns it.
    fn sample(&mut self, dst: &TcpStream, counters: &Counters) -> Result<u64, End> {
        let written = written_at_least(dst.as_fd()).map_err(|e| self.dir.write_err(e))?;
        let moved = written.saturating_sub(self.written_base);
        if moved > self.reported {
            self.dir.count(
                counters,
                usize::try_from(moved - self.reported).unwrap_or(usize::MAX),
            );
            self.reported = moved;
        }
        Ok(moved)
    }

    /// src reached EOF: remember how much it received.
    fn at_eof(&mut self, src: &TcpStream) -> Result<(), End> {
        let info = tcpinfo::tcp_info(src.as_fd()).map_err(|e| self.dir.read_err(e))?;
        self.target = Some(data_received(info, true).saturating_sub(self.consumed_base));
        self.set_poll(None);
        Ok(())
    }

    /// Polls src for EOF every `delay` from now on, or not at all.
    fn set_poll(&mut self, delay: Option<Duration>) {
        self.poll = delay;
        self.poll_at = delay.map(|d| Instant::now() + d);
    }

    /// While src is at EOF: once dst has taken everything, pass the
    /// half-close on. Returns whether the flow is finished.
    fn try_finish(&mut self, dst: &TcpStream, counters: &Counters) -> Result<bool, End> {
        let Some(target) = self.target else {
            return Ok(false);
        };
        if self.done {
            return Ok(true);
        }
        let m = self.sample(dst, counters)?;
        if m < target {
            return Ok(false);
        }
        let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
        self.done = true;
        tracing::trace!(dir = ?self.dir, bytes = target, "sockmap half-close passed on");
        Ok(true)
    }
}

/// What woke one side.
enum Wake {
    /// epoll said src is readable.
    Ready,
    /// Its EOF poll (or the kick after the maps) is due.
    Timer,
}

/// One read of what is on `src` after a wake-up (empty at EOF). A plain
/// function, so its 4 KiB stack buffer is not part of the session's
/// future (which every idle session would carry).
fn read_left(src: &TcpStream, wake: &Wake) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; 4096];
    let n = match wake {
        Wake::Ready => src.try_io(Interest::READABLE, || recv_now(src, &mut buf))?,
        Wake::Timer => recv_now(src, &mut buf)?,
    };
    Ok(buf.get(..n).unwrap_or_default().to_vec())
}

/// Handles a wake-up of `src` (the source of `flow`): EOF, an error, or
/// bytes the verdict left on the socket (no peer in the map: forwarded
/// here, which should not happen while both sockets are paired).
async fn on_wake(src: &TcpStream, dst: &TcpStream, flow: &mut Flow, wake: Wake) -> Result<(), End> {
    match wake_read(src, flow, wake)? {
        None => Ok(()),
        // Boxed: this rare await would otherwise size every idle session.
        Some(data) => Box::pin(write_all(dst, &data))
            .await
            .map_err(|e| flow.dir.write_err(e)),
    }
}

/// The synchronous part of [`on_wake`]: EOF, an error or a timer change
/// are handled here; bytes to forward are returned.
fn wake_read(src: &TcpStream, flow: &mut Flow, wake: Wake) -> Result<Option<Vec<u8>>, End> {
    match read_left(src, &wake) {
        Ok(data) if data.is_empty() => flow.at_eof(src).map(|()| None),
        Ok(data) => {
            tracing::debug!(
                dir = ?flow.dir,
                n = data.len(),
                "sockmap left bytes on the socket (peer not in the map): forwarding them"
            );
            Ok(Some(data))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            // Woken with nothing to read: once src's FIN has arrived epoll
            // keeps saying readable, so poll for the EOF on a timer.
            let closed = matches!(wake, Wake::Ready)
                && fin_received(src).map_err(|e| flow.dir.read_err(e))?;
            flow.set_poll(match (flow.poll, closed) {
                (Some(d), _) => Some((d * 2).min(POLL_MAX)),
                (None, true) => Some(POLL_MIN),
                // Readiness cleared by try_io: epoll wakes us again.
                (None, false) => None,
            });
            Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(flow.dir.read_err(e)),
    }
}

/// Whether the peer's FIN has reached `sock` (its TCP state is one that
/// follows a received FIN): what epoll's read-closed readiness says.
fn fin_received(sock: &TcpStream) -> io::Result<bool> {
    let state = tcpinfo::tcp_info(sock.as_fd())?.state;
    Ok(matches!(
        state,
        TCP_CLOSE_WAIT
            | tcpinfo::TCP_LAST_ACK
            | tcpinfo::TCP_CLOSING
            | tcpinfo::TCP_TIME_WAIT
            | tcpinfo::TCP_CLOSE
    ))
}

/// Runs the session on the sockmap path until both directions reached
/// EOF, one side failed, the session idled out or shutdown was signalled.
/// `established` runs once both sockets are in the maps. `Err` if they
/// could not enter them (nothing lost: what was readable has been
/// forwarded and counted, the caller goes on with another path).
pub async fn run(
    redirect: &dyn Redirect,
    tenant: TcpStream,
    compute: TcpStream,
    counters: &Counters,
    idle: Option<Duration>,
    shutdown: super::Stop,
    established: impl FnOnce(),
) -> Result<End, Declined> {
    match start(
        redirect,
        tenant,
        compute,
        counters,
        idle,
        shutdown,
        established,
    )
    .await?
    {
        Started::Ended(end) => Ok(end),
        Started::Run(pump) => Ok(pump.await),
    }
}

/// A session set up on the sockmap path.
pub enum Started<'a> {
    /// It ended during the set-up (idle, shutdown, an error).
    Ended(End),
    /// Both sockets are in the maps: this runs the session to its end
    /// (and takes them out). Boxed on its own, so the session holds only
    /// the pump's state while it runs, not the set-up's.
    Run(Pin<Box<dyn Future<Output = End> + Send + 'a>>),
}

impl std::fmt::Debug for Started<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Started::Ended(end) => write!(f, "Ended({end:?})"),
            Started::Run(_) => f.write_str("Run"),
        }
    }
}

/// [`run`] up to the pump, which it returns to be awaited.
pub async fn start<'a>(
    redirect: &'a dyn Redirect,
    tenant: TcpStream,
    compute: TcpStream,
    counters: &'a Counters,
    idle: Option<Duration>,
    shutdown: super::Stop,
    established: impl FnOnce(),
) -> Result<Started<'a>, Declined> {
    let settled = tokio::select! {
        r = settle(&tenant, &compute, counters) => r,
        () = idle_watch(counters, idle) => return Ok(Started::Ended(End::IdleTimeout)),
        () = shutdown.raised() => return Ok(Started::Ended(End::Shutdown)),
    };
    let (mut up, mut down) = match settled {
        Ok(Some(flows)) => flows,
        Ok(None) => {
            return Err(Declined {
                tenant,
                compute,
                reason: "the stream never paused long enough to count it exactly".to_owned(),
            });
        }
        Err(end) => return Ok(Started::Ended(end)),
    };
    // The kernel takes only established TCP sockets into a SOCKHASH.
    if let Some(reason) = not_established(&tenant, &compute) {
        return Err(Declined {
            tenant,
            compute,
            reason,
        });
    }
    let pair = match redirect.pair(tenant.as_fd(), compute.as_fd()) {
        Ok(p) => p,
        Err(e) => {
            return Err(Declined {
                tenant,
                compute,
                reason: format!("entering the sockmap: {e}"),
            });
        }
    };
    // Made now: a pump dropped before its first poll still unpairs.
    let unpair = Unpair { redirect, pair };
    established();
    Ok(Started::Run(Box::pin(async move {
        let _unpair = unpair;
        // The flows by reference: an async fn keeps a second copy of what
        // it takes by value, for the session's life.
        pump(
            &tenant, &compute, &mut up, &mut down, counters, idle, shutdown,
        )
        .await
    })))
}

/// Why a socket cannot enter the maps: it is no longer established.
fn not_established(tenant: &TcpStream, compute: &TcpStream) -> Option<String> {
    [("tenant", tenant), ("compute", compute)]
        .into_iter()
        .find_map(|(side, s)| match tcpinfo::tcp_info(s.as_fd()) {
            Ok(i) if i.state == tcpinfo::TCP_ESTABLISHED => None,
            Ok(_) => Some(format!("the {side} side closed its half before the maps")),
            Err(e) => Some(format!("TCP_INFO of the {side} side: {e}")),
        })
}

/// Takes the sockets out of the maps when the session ends, however it ends.
struct Unpair<'a> {
    redirect: &'a dyn Redirect,
    pair: Pair,
}

impl Drop for Unpair<'_> {
    fn drop(&mut self) {
        self.redirect.unpair(self.pair);
    }
}

/// Trap 3: forwards what is readable, then takes exact baselines once
/// neither socket has unread bytes arriving or acks in flight.
async fn settle(
    tenant: &TcpStream,
    compute: &TcpStream,
    counters: &Counters,
) -> Result<Option<(Flow, Flow)>, End> {
    for _ in 0..SETTLE_TRIES {
        drain(tenant, compute, Dir::Up, Some(counters)).await?;
        drain(compute, tenant, Dir::Down, Some(counters)).await?;
        let t = quiet_counts(tenant.as_fd()).map_err(|e| Dir::Up.read_err(e))?;
        let c = quiet_counts(compute.as_fd()).map_err(|e| Dir::Down.read_err(e))?;
        if let (Some((t_consumed, t_written)), Some((c_consumed, c_written))) = (t, c) {
            return Ok(Some((
                Flow::new(Dir::Up, t_consumed, c_written),
                Flow::new(Dir::Down, c_consumed, t_written),
            )));
        }
        tokio::time::sleep(POLL_MIN).await;
    }
    Ok(None)
}

/// What ended one wait of a paired session.
enum Event {
    /// epoll says this direction's source is readable (EOF, an error, or
    /// bytes the verdict left on it).
    Readable(Dir),
    /// Waiting for readiness failed.
    Failed(Dir, io::Error),
    /// The one timer: a sample, a drain check, an EOF poll or the idle
    /// deadline is due.
    Timer,
    Shutdown,
}

/// The paired session until it ends. Hand-polled around one timer (the
/// counter samples, the drain checks, both EOF polls and the idle
/// timeout), so an idle session's future is small: it is held for the
/// session's life.
async fn pump(
    tenant: &TcpStream,
    compute: &TcpStream,
    up: &mut Flow,
    down: &mut Flow,
    counters: &Counters,
    idle: Option<Duration>,
    shutdown: super::Stop,
) -> End {
    let sample_every = idle.map_or(SAMPLE_MAX, |i| (i / 4).clamp(POLL_MAX, SAMPLE_MAX));
    // Kick: bytes that arrived between the drain and the insertion go
    // through the verdict now, and an early EOF is seen.
    if let Err(end) = on_wake(tenant, compute, up, Wake::Timer).await {
        return end;
    }
    if let Err(end) = on_wake(compute, tenant, down, Wake::Timer).await {
        return end;
    }
    up.set_poll(None);
    down.set_poll(None);
    let mut next_sample = Instant::now();
    let mut drain_poll = POLL_MIN;
    let timer = tokio::time::sleep_until(next_sample);
    let stop = shutdown.raised();
    tokio::pin!(timer, stop);
    loop {
        let now = Instant::now();
        let draining = (up.target.is_some() && !up.done) || (down.target.is_some() && !down.done);
        let tick = if draining {
            now + drain_poll
        } else {
            next_sample
        };
        let idle_at = idle.map(|i| now + i.saturating_sub(counters.idle_for()));
        let due = [up.poll_at, down.poll_at, idle_at]
            .into_iter()
            .flatten()
            .fold(tick, Instant::min);
        timer.as_mut().reset(due);
        let event = std::future::poll_fn(|cx| {
            if stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            for (sock, flow) in [(tenant, &*up), (compute, &*down)] {
                // A source at EOF has nothing more to say; one polled for
                // its EOF waits for the timer.
                if flow.target.is_some() || flow.poll.is_some() {
                    continue;
                }
                match sock.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Event::Readable(flow.dir)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::Failed(flow.dir, e)),
                    Poll::Pending => {}
                }
            }
            timer.as_mut().poll(cx).map(|()| Event::Timer)
        })
        .await;
        let step = match event {
            Event::Shutdown => Err(End::Shutdown),
            Event::Failed(dir, e) => Err(dir.read_err(e)),
            Event::Readable(Dir::Up) => on_wake(tenant, compute, up, Wake::Ready).await,
            Event::Readable(Dir::Down) => on_wake(compute, tenant, down, Wake::Ready).await,
            Event::Timer => {
                let now = Instant::now();
                let mut r = Ok(());
                if up.poll_at.is_some_and(|at| at <= now) {
                    r = on_wake(tenant, compute, up, Wake::Timer).await;
                }
                if r.is_ok() && down.poll_at.is_some_and(|at| at <= now) {
                    r = on_wake(compute, tenant, down, Wake::Timer).await;
                }
                if r.is_ok() && now >= tick {
                    r = on_tick(tenant, compute, up, down, counters);
                    if now >= next_sample {
                        next_sample = now + sample_every;
                    }
                    drain_poll = if draining {
                        (drain_poll * 2).min(POLL_MAX)
                    } else {
                        POLL_MIN
                    };
                }
                if r.is_ok() && idle.is_some_and(|i| counters.idle_for() >= i) {
                    r = Err(End::IdleTimeout);
                }
                r
            }
        };
        if let Err(end) = step {
            let _ = up.sample(compute, counters);
            let _ = down.sample(tenant, counters);
            return end;
        }
        // A flow whose source hit EOF may be finished now.
        let finished = up
            .try_finish(compute, counters)
            .and_then(|u| Ok(down.try_finish(tenant, counters)? && u));
        match finished {
            Ok(true) => return End::Closed,
            Ok(false) => {}
            Err(end) => return end,
        }
    }
}

/// Samples the counters (and the activity seen by the idle timeout) and
/// re-reads the sources that are not at EOF, in case a wake-up was missed.
fn on_tick(
    tenant: &TcpStream,
    compute: &TcpStream,
    up: &mut Flow,
    down: &mut Flow,
    counters: &Counters,
) -> Result<(), End> {
    for (src, dst, flow) in [(tenant, compute, &mut *up), (compute, tenant, &mut *down)] {
        if flow.done {
            continue;
        }
        flow.sample(dst, counters)?;
        let received = tcpinfo::tcp_info(src.as_fd())
            .map_err(|e| flow.dir.read_err(e))?
            .bytes_received;
        if received != flow.seen {
            flow.seen = received;
            counters.touch();
        }
        if flow.target.is_none() && flow.poll.is_none() {
            let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            // Peek: bytes left on the socket are read by on_wake, which
            // epoll triggers; here only EOF and errors matter.
            match socket2::SockRef::from(src).peek(&mut one) {
                Ok(0) => flow.at_eof(src)?,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(flow.dir.read_err(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
