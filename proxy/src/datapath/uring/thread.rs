//! The ring thread: owns the io_uring and every uring session's
//! descriptors, and runs each session's two directions as state machines
//! driven by completions (no hop back to tokio between a read and the
//! write that follows it).
//!
//! Per direction, at most one read and one write are in flight:
//! - splice flavour: `POLL_ADD(src, POLLIN)` linked to `splice(src ->
//!   pipe)` for the pipe's free room, and `POLL_ADD(dst, POLLOUT)` linked to
//!   `splice(pipe -> dst)` for what the pipe holds; both overlap. io_uring
//!   always runs a splice in a kernel worker: the polls (and
//!   `SPLICE_F_NONBLOCK` on non-blocking sockets) make sure that worker
//!   never waits, so idle sessions hold no worker threads. The pipe is
//!   held only while bytes move, as on the splice rung
//!   (`datapath::pipes`): a direction starts, and returns after a splice
//!   read that came back short or left the source empty (`FIONREAD`),
//!   with a bare `POLL_ADD`;
//!   once its pipe is empty and no splice names it, the pipe goes back to
//!   the ring thread's pool. Idle sessions hold two descriptors, not six.
//!   With no descriptor left for a pipe the direction goes on with the
//!   recv/send flavour.
//! - recv/send flavour (kernels without `IORING_OP_SPLICE`): `POLL_ADD`
//!   while idle, then `recv(MSG_DONTWAIT)` into a 16 KiB buffer allocated
//!   on the first readiness and freed when the socket runs dry, then `send`
//!   until the buffer is written out.
//!
//! A stop (idle timeout, shutdown, admin kill) or the first error cancels
//! the session's in-flight operations (`IORING_OP_ASYNC_CANCEL`); the
//! session is removed, its descriptors closed and its end reported only
//! when every operation has completed (`sys::uring::Ring` holds the
//! descriptors and buffers of in-flight operations until then anyway).

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use tokio::sync::{Notify, oneshot};

use super::pool::RingPipe;
use crate::datapath::End;
use crate::sys::pipe::readable_bytes;
use crate::sys::uring::{Completion, EventFd, Op, OpId, Ring, SharedFd};

/// How a uring session moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// IORING_OP_SPLICE socket -> pipe -> socket (zero copy).
    Splice,
    /// IORING_OP_RECV / IORING_OP_SEND through a small buffer.
    RecvSend,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Splice => "splice",
            Flavor::RecvSend => "recv-send",
        }
    }
}

/// Bytes moved, written by the ring thread and folded into the session's
/// `Counters` by its tokio task.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub up: AtomicU64,
    pub down: AtomicU64,
    pub notify: Notify,
    /// Pipes the session's directions hold now (splice flavour).
    pub pipes: AtomicUsize,
}

/// What a session hands the ring thread.
#[derive(Debug)]
pub(super) struct Start {
    pub id: u64,
    pub tenant: OwnedFd,
    pub compute: OwnedFd,
    pub flavor: Flavor,
    /// Capacity asked for each direction's pipe (splice flavour).
    pub pipe_size: usize,
    pub progress: Arc<Progress>,
    pub done: oneshot::Sender<End>,
}

#[derive(Debug)]
pub(super) enum Cmd {
    Start(Box<Start>),
    Stop { id: u64, reason: End },
}

/// The wake-up of the ring thread: an eventfd it polls through the ring,
/// written at most once per batch of commands. `woken` is true from the
/// first command of a batch until the ring thread [`Wake::rearm`]s; while
/// it is true, senders skip the eventfd write.
#[derive(Debug)]
struct Wake {
    fd: EventFd,
    woken: AtomicBool,
}

impl Wake {
    /// Sender side, after the command is queued.
    fn notify(&self) {
        if !self.woken.swap(true, Ordering::SeqCst) {
            self.fd.notify();
        }
    }

    /// Ring thread side, after the eventfd poll fired and before the
    /// command queue is drained.
    ///
    /// The order matters. This used to clear `woken` first and read the
    /// eventfd second: a sender whose `notify` fell between the two (more
    /// likely when the ring thread is preempted there, e.g. two test
    /// processes on two CPUs) had its eventfd write swallowed by that
    /// read, so `woken` stayed true with the counter at zero. The ring
    /// thread still took that sender's command, but every later sender
    /// saw `woken` set and skipped the write: the ring thread slept in
    /// `io_uring_enter` for ever and every uring session started after
    /// that hung (both flavours; the recv/send contract tests hit it most).
    ///
    /// Reading the eventfd first means every write it swallows came from a
    /// sender whose `swap(true)` precedes our `swap(false)` below; that
    /// sender's command is already queued, and the `swap` (a read-modify-
    /// write, unlike the old `store`) synchronizes with it, so the drain
    /// that follows sees it. A sender that comes after our `swap(false)`
    /// writes the eventfd again and the re-armed poll fires at once.
    fn rearm(&self) {
        self.fd.drain();
        self.woken.swap(false, Ordering::SeqCst);
    }
}

/// The sending side of the ring thread, shared by every session.
#[derive(Debug)]
pub(super) struct Driver {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<Wake>,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
}

impl Driver {
    /// Starts the ring thread on `ring`.
    pub fn spawn(ring: Ring) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(Wake {
            fd: EventFd::new()?,
            woken: AtomicBool::new(false),
        });
        let alive = Arc::new(AtomicBool::new(true));
        let (w, a) = (Arc::clone(&wake), Arc::clone(&alive));
        std::thread::Builder::new()
            .name("consolegate-uring".into())
            .spawn(move || {
                RingThread {
                    ring,
                    rx,
                    wake: w,
                    sessions: HashMap::new(),
                }
                .run();
                a.store(false, Ordering::SeqCst);
            })?;
        Ok(Self {
            tx,
            wake,
            next_id: AtomicU64::new(1),
            alive,
        })
    }

    /// Whether the ring thread still runs.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues `cmd` and wakes the ring thread (once per batch).
    pub fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        self.tx.send(cmd).map_err(|e| e.0)?;
        self.wake.notify();
        Ok(())
    }
}

/// Tag of the eventfd poll; session tags are `id << 2 | dir << 1 | write`.
const WAKE_TAG: u64 = u64::MAX;
const RECV_BUF: usize = 16 * 1024;
const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;

fn tag(id: u64, dir: usize, write: bool) -> u64 {
    (id << 2) | ((dir as u64) << 1) | u64::from(write)
}

struct RingThread {
    ring: Ring,
    rx: mpsc::Receiver<Cmd>,
    wake: Arc<Wake>,
    /// Boxed: the table keeps spare buckets (a quarter to a half of them
    /// at any size), which should cost a pointer each, not a `Session`.
    sessions: HashMap<u64, Box<Session>>,
}

impl RingThread {
    fn run(mut self) {
        // The Driver lives in a static for the life of the process; the
        // thread runs until the ring fails.
        if let Err(e) = self.arm_wake() {
            tracing::error!(error = %e, "io_uring data path: cannot poll the wake-up eventfd");
            return;
        }
        let mut done = Vec::new();
        loop {
            if let Err(e) = self.ring.wait(&mut done) {
                tracing::error!(error = %e, "io_uring data path: the ring failed; uring sessions end");
                for (_, mut s) in self.sessions.drain() {
                    if let Some(tx) = s.done.take() {
                        let _ = tx.send(End::Shutdown);
                    }
                }
                return;
            }
            for c in done.drain(..) {
                if c.tag == WAKE_TAG {
                    self.commands();
                    if let Err(e) = self.arm_wake() {
                        tracing::error!(error = %e, "io_uring data path: cannot re-poll the eventfd");
                        return;
                    }
                    continue;
                }
                let id = c.tag >> 2;
                let dir = ((c.tag >> 1) & 1) as usize;
                let write = c.tag & 1 == 1;
                let Some(s) = self.sessions.get_mut(&id) else {
                    continue;
                };
                s.complete(&mut self.ring, dir, write, c);
                if s.over() {
                    self.finish(id);
                }
            }
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let op = Op::Poll {
            fd: self.wake.fd.shared(),
            events: POLLIN,
        };
        self.ring.submit(WAKE_TAG, op).map(drop)
    }

    fn commands(&mut self) {
        // Before draining the queue: a command sent after this point writes
        // the eventfd again and re-fires the poll (see `Wake::rearm`).
        self.wake.rearm();
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Start(start) => {
                    let id = start.id;
                    let mut s = Box::new(Session::new(*start));
                    s.drive(&mut self.ring, 0);
                    s.drive(&mut self.ring, 1);
                    self.sessions.insert(id, s);
                    if self.sessions.get(&id).is_some_and(|s| s.over()) {
                        self.finish(id);
                    }
                }
                Cmd::Stop { id, reason } => {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        s.fail(&mut self.ring, reason);
                        if s.over() {
                            self.finish(id);
                        }
                    }
                }
            }
        }
    }

    /// Removes a session with nothing in flight: closes its descriptors
    /// (the last references) and reports its end.
    fn finish(&mut self, id: u64) {
        if let Some(mut s) = self.sessions.remove(&id) {
            let end = s.end.take().unwrap_or(End::Closed);
            if let Some(tx) = s.done.take() {
                let _ = tx.send(end);
            }
        }
    }
}

#[derive(Debug)]
struct Dir {
    /// Splice, or recv/send (also after a pipe could not be had).
    flavor: Flavor,
    /// This direction's pipe while bytes move (splice flavour).
    pipe: Option<RingPipe>,
    pipe_size: usize,
    /// Bytes in the pipe not yet written (splice flavour).
    pending: usize,
    /// Length of the splice read in flight; 0 while the read in flight is
    /// a bare poll (splice flavour).
    asked: usize,
    /// The last splice read came back short, or none ran yet: poll before
    /// the next one, and let the pipe go once it is empty.
    dry: bool,
    /// The buffer when no op holds it, and its unwritten bytes (recv/send).
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    eof: bool,
    /// The last splice into the pipe found no free slot: wait for a write.
    pipe_full: bool,
    /// The peer got `shutdown(SHUT_WR)`: this direction is over.
    shut: bool,
    reading: Option<OpId>,
    writing: Option<OpId>,
}

struct Session {
    id: u64,
    /// Tenant, compute.
    fds: [SharedFd; 2],
    /// Up (tenant -> compute), down.
    dirs: [Dir; 2],
    progress: Arc<Progress>,
    done: Option<oneshot::Sender<End>>,
    /// Set by the first error or a stop; nothing new is submitted after.
    end: Option<End>,
}

impl Session {
    fn new(start: Start) -> Self {
        let dir = || Dir {
            flavor: start.flavor,
            pipe: None,
            pipe_size: start.pipe_size,
            pending: 0,
            asked: 0,
            dry: true,
            buf: None,
            start: 0,
            end: 0,
            eof: false,
            pipe_full: false,
            shut: false,
            reading: None,
            writing: None,
        };
        Self {
            id: start.id,
            fds: [Arc::new(start.tenant), Arc::new(start.compute)],
            dirs: [dir(), dir()],
            progress: start.progress,
            done: Some(start.done),
            end: None,
        }
    }

    fn src_dst(&self, dir: usize) -> (SharedFd, SharedFd) {
        let (s, d) = if dir == 0 { (0, 1) } else { (1, 0) };
        (Arc::clone(&self.fds[s]), Arc::clone(&self.fds[d]))
    }

    /// The error of the side `dir` reads from, or writes to.
    fn side_err(dir: usize, write: bool, e: &io::Error) -> End {
        let tenant = (dir == 0) != write;
        if tenant {
            End::TenantIo(e.to_string())
        } else {
            End::ComputeIo(e.to_string())
        }
    }

    fn in_flight(&self) -> bool {
        self.dirs
            .iter()
            .any(|d| d.reading.is_some() || d.writing.is_some())
    }

    /// Nothing in flight and either stopped/failed or both directions shut.
    fn over(&self) -> bool {
        !self.in_flight() && (self.end.is_some() || self.dirs.iter().all(|d| d.shut))
    }

    /// Records the first reason to end and cancels what is in flight.
    fn fail(&mut self, ring: &mut Ring, end: End) {
        if self.end.is_some() {
            return;
        }
        tracing::trace!(session = self.id, end = end.kind(), "uring session ending");
        self.end = Some(end);
        for d in &self.dirs {
            for id in [d.reading, d.writing].into_iter().flatten() {
                // A failed cancel leaves the op to finish on its own; the
                // ring keeps its descriptors until it does.
                let _ = ring.cancel(id);
            }
        }
    }

    fn submit(&mut self, ring: &mut Ring, dir: usize, write: bool, op: Op) -> Option<OpId> {
        match ring.submit(tag(self.id, dir, write), op) {
            Ok(id) => Some(id),
            Err(e) => {
                let e = io::Error::new(e.kind(), format!("io_uring submit: {e}"));
                self.fail(ring, Self::side_err(dir, write, &e));
                None
            }
        }
    }

    /// Submits what direction `dir` can do next.
    fn drive(&mut self, ring: &mut Ring, dir: usize) {
        if self.end.is_some() || self.dirs[dir].shut {
            return;
        }
        let (src, dst) = self.src_dst(dir);
        match self.dirs[dir].flavor {
            Flavor::Splice => self.drive_splice(ring, dir, src, &dst),
            Flavor::RecvSend => self.drive_recv_send(ring, dir, src, &dst),
        }
        let d = &mut self.dirs[dir];
        let idle = d.reading.is_none() && d.writing.is_none();
        if self.end.is_none() && d.eof && idle && d.pending == 0 && d.start == d.end {
            // Everything read has been written: pass the half-close on.
            let _ = socket2::SockRef::from(&*dst).shutdown(Shutdown::Write);
            d.shut = true;
        }
    }

    fn drive_splice(&mut self, ring: &mut Ring, dir: usize, src: SharedFd, dst: &SharedFd) {
        let d = &self.dirs[dir];
        if !d.eof && d.reading.is_none() && !d.pipe_full {
            if d.dry {
                // Readable first: no pipe is needed to wait.
                let op = Op::Poll {
                    fd: src,
                    events: POLLIN,
                };
                let id = self.submit(ring, dir, false, op);
                self.dirs[dir].reading = id;
            } else if self.take_pipe(dir) {
                let d = &self.dirs[dir];
                if let Some(pipe) = d.pipe.as_ref().filter(|p| d.pending < p.cap) {
                    let room = pipe.cap - d.pending;
                    let op = Op::PollSplice {
                        poll: Arc::clone(&src),
                        events: POLLIN,
                        from: src,
                        to: Arc::clone(&pipe.write),
                        len: u32::try_from(room).unwrap_or(u32::MAX),
                    };
                    let id = self.submit(ring, dir, false, op);
                    let d = &mut self.dirs[dir];
                    d.reading = id;
                    d.asked = room;
                }
            } else {
                // No pipe to be had: recv/send from now on.
                self.drive_recv_send(ring, dir, src, dst);
                return;
            }
        }
        let d = &self.dirs[dir];
        if let Some(pipe) = d.pipe.as_ref()
            && self.end.is_none()
            && d.pending > 0
            && d.writing.is_none()
        {
            let op = Op::PollSplice {
                poll: Arc::clone(dst),
                events: POLLOUT,
                from: Arc::clone(&pipe.read),
                to: Arc::clone(dst),
                len: u32::try_from(d.pending).unwrap_or(u32::MAX),
            };
            let id = self.submit(ring, dir, true, op);
            self.dirs[dir].writing = id;
        }
        let d = &self.dirs[dir];
        if d.pipe.is_some() && d.pending == 0 && d.writing.is_none() && d.asked == 0 {
            self.release_pipe(dir);
        }
    }

    /// Makes sure direction `dir` holds a pipe: from the ring thread's pool
    /// or a new one. With no descriptor left the direction switches to
    /// recv/send (bytes keep moving through a buffer) and this says false.
    fn take_pipe(&mut self, dir: usize) -> bool {
        let d = &mut self.dirs[dir];
        if d.pipe.is_some() {
            return true;
        }
        let pipe = match RingPipe::take(d.pipe_size) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    session = self.id,
                    dir = if dir == 0 { "up" } else { "down" },
                    error = %e,
                    "no pipe for the io_uring splice (descriptors ran out?): this direction goes on through a buffer"
                );
                d.flavor = Flavor::RecvSend;
                return false;
            }
        };
        d.pipe = Some(pipe);
        self.progress.pipes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Gives direction `dir`'s empty pipe back to the pool (closed when
    /// the pool is full, or if an operation still held it).
    fn release_pipe(&mut self, dir: usize) {
        let Some(pipe) = self.dirs[dir].pipe.take() else {
            return;
        };
        self.progress.pipes.fetch_sub(1, Ordering::Relaxed);
        pipe.give_back();
    }

    fn drive_recv_send(&mut self, ring: &mut Ring, dir: usize, src: SharedFd, dst: &SharedFd) {
        let d = &mut self.dirs[dir];
        if d.reading.is_some() || d.writing.is_some() {
            return;
        }
        if d.start < d.end {
            let Some(buf) = d.buf.take() else { return };
            let (start, end) = (d.start, d.end);
            let op = Op::Send {
                fd: Arc::clone(dst),
                buf,
                start,
                end,
            };
            let id = self.submit(ring, dir, true, op);
            self.dirs[dir].writing = id;
        } else if !d.eof {
            let op = match d.buf.take() {
                Some(buf) => Op::Recv {
                    fd: src,
                    buf,
                    flags: libc::MSG_DONTWAIT,
                },
                None => Op::Poll {
                    fd: src,
                    events: POLLIN,
                },
            };
            let id = self.submit(ring, dir, false, op);
            self.dirs[dir].reading = id;
        }
    }

    fn complete(&mut self, ring: &mut Ring, dir: usize, write: bool, c: Completion) {
        let ending = self.end.is_some();
        let flavor = self.dirs[dir].flavor;
        let d = &mut self.dirs[dir];
        let asked = if write {
            d.writing = None;
            0
        } else {
            d.reading = None;
            std::mem::take(&mut d.asked)
        };
        if let Some(buf) = c.buf {
            d.buf = Some(buf);
        }
        let err = match c.result {
            Ok(0) if write => Some(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                self.moved(dir, write, n, asked);
                None
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => {
                    let d = &mut self.dirs[dir];
                    if !write && flavor == Flavor::Splice && d.pending > 0 {
                        // Polled readable, yet no room: the pipe's slots are
                        // full of partial pages. Read again after a write.
                        d.pipe_full = true;
                    }
                    if !write && flavor == Flavor::Splice && d.pending == 0 {
                        // Nothing came after all: poll again.
                        d.dry = true;
                    }
                    if !write && flavor == Flavor::RecvSend {
                        // The socket ran dry: free the buffer, poll again.
                        d.buf = None;
                    }
                    None
                }
                Some(libc::ECANCELED) if ending => None,
                _ => Some(e),
            },
        };
        if let Some(e) = err {
            self.fail(ring, Self::side_err(dir, write, &e));
            return;
        }
        self.drive(ring, dir);
    }

    /// A successful completion of `n` (bytes, or a poll mask), for a read
    /// of `asked` bytes (0: a bare poll).
    fn moved(&mut self, dir: usize, write: bool, n: usize, asked: usize) {
        let src = &self.fds[if dir == 0 { 0 } else { 1 }];
        let d = &mut self.dirs[dir];
        match (d.flavor, write) {
            // The source is readable: splice from it next.
            (Flavor::Splice, false) if asked == 0 => d.dry = false,
            (Flavor::Splice, false) => {
                if n == 0 {
                    d.eof = true;
                } else {
                    d.pending += n;
                    // A short read found the source dry (or the pipe's
                    // slots full): poll before reading again. A read that
                    // filled the room may have emptied the source too; a
                    // splice waiting on it would keep the pipe while idle.
                    d.dry = n < asked || readable_bytes(src.as_fd()).is_ok_and(|b| b == 0);
                }
            }
            (Flavor::Splice, true) => {
                d.pending = d.pending.saturating_sub(n);
                d.pipe_full = false;
                self.count(dir, n);
            }
            (Flavor::RecvSend, false) => match d.buf.as_ref() {
                // A poll fired: allocate the buffer for the recv.
                None => d.buf = Some(vec![0u8; RECV_BUF]),
                Some(_) if n == 0 => {
                    d.eof = true;
                    d.buf = None;
                }
                Some(_) => {
                    d.start = 0;
                    d.end = n;
                }
            },
            (Flavor::RecvSend, true) => {
                d.start = (d.start + n).min(d.end);
                if d.start == d.end {
                    d.start = 0;
                    d.end = 0;
                }
                self.count(dir, n);
            }
        }
    }

    fn count(&self, dir: usize, n: usize) {
        let counter = if dir == 0 {
            &self.progress.up
        } else {
            &self.progress.down
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.progress.notify.notify_one();
    }
}

#[cfg(test)]
mod tests;
