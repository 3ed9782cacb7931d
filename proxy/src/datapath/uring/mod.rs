//! io_uring data path for plaintext streams (opt-in rung `uring`).
//!
//! One dedicated ring thread (`consolegate-uring`, started on first use)
//! owns an io_uring and every uring session's descriptors; a session hands
//! its two sockets over (deregistered from tokio) and its tokio task only
//! waits: for the end, for the idle timeout or the stop signal (which it
//! forwards as a cancel), and for progress notifications that it folds
//! into the session's [`Counters`]. See [`thread`] for the state machines:
//! `IORING_OP_SPLICE` socket -> pipe -> socket when the kernel has it,
//! `IORING_OP_RECV`/`IORING_OP_SEND` through a lazily allocated 16 KiB
//! buffer otherwise.
//!
//! Same contract as [`super::splice`]: counters per direction, half-close
//! (the peer gets `shutdown(SHUT_WR)` once everything read was written,
//! the other direction keeps flowing), backpressure (at most one pipe or
//! buffer per direction; nothing is read while it is full), idle timeout,
//! stop (in-flight operations cancelled with `IORING_OP_ASYNC_CANCEL`, the
//! descriptors closed only once every operation has completed) and errors
//! named by side. Applies when both legs are plain TCP or UNIX sockets.

mod pool;
mod thread;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

pub use self::thread::Flavor;
use self::thread::{Cmd, Driver, Progress, Start};
use super::pipes::PipeSlot;
use super::splice::{PIPE_SIZE, Socket};
use super::{Counters, End, idle_watch};
use crate::sys::uring::{self as ring, Support};

/// Submission slots of the shared ring (completions: four times as many).
const RING_ENTRIES: u32 = 1024;
/// While bytes flow, counters are folded at most this often (plus at the end).
const FOLD_EVERY: Duration = Duration::from_millis(5);

struct Available {
    driver: Driver,
    support: Support,
    flavor: Flavor,
}

static DRIVER: OnceLock<Result<Available, String>> = OnceLock::new();

/// Probes io_uring and the opcodes we need, and starts the ring thread.
fn init() -> Result<Available, String> {
    let support = ring::probe().map_err(|e| format!("io_uring unavailable: {e}"))?;
    if !support.poll_add || !support.async_cancel {
        return Err(format!(
            "io_uring lacks IORING_OP_POLL_ADD or IORING_OP_ASYNC_CANCEL ({support:?})"
        ));
    }
    let flavor = if support.splice {
        Flavor::Splice
    } else if support.recv && support.send {
        Flavor::RecvSend
    } else {
        return Err(format!(
            "io_uring has neither IORING_OP_SPLICE nor IORING_OP_RECV/SEND ({support:?})"
        ));
    };
    let r = ring::Ring::new(RING_ENTRIES).map_err(|e| format!("io_uring_setup: {e}"))?;
    let driver = Driver::spawn(r).map_err(|e| format!("io_uring ring thread: {e}"))?;
    Ok(Available {
        driver,
        support,
        flavor,
    })
}

fn available() -> Result<&'static Available, String> {
    match DRIVER.get_or_init(init) {
        Ok(a) if a.driver.alive() => Ok(a),
        Ok(_) => Err("the io_uring ring thread has stopped".to_owned()),
        Err(e) => Err(e.clone()),
    }
}

/// The flavour uring sessions get here, or why the path is unavailable.
/// The first call probes and starts the ring thread.
pub fn availability() -> Result<Flavor, String> {
    available().map(|a| a.flavor)
}

/// Why a session cannot take the uring path.
#[derive(Debug)]
pub enum Refused {
    /// io_uring, an opcode or the ring thread is missing (reason).
    Unavailable(String),
    /// The pipes of the splice flavour cannot be created.
    Pipes(io::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unavailable(why) => f.write_str(why),
            Refused::Pipes(e) => write!(f, "cannot create pipes: {e}"),
        }
    }
}

/// A session committed to the uring path: its flavour and, for the splice
/// flavour, the size of the pipes its directions take while bytes move
/// (one is made or pooled before the session commits, so a proxy out of
/// descriptors falls back to the next rung).
#[derive(Debug)]
pub struct Uring {
    flavor: Flavor,
    pipe_size: usize,
}

impl Uring {
    /// The flavour this kernel supports best, with 1 MiB pipes.
    pub fn new() -> Result<Self, Refused> {
        let flavor = availability().map_err(Refused::Unavailable)?;
        Self::with(flavor, PIPE_SIZE)
    }

    /// A chosen flavour (tests force recv/send) and pipe size.
    pub fn with(flavor: Flavor, pipe_size: usize) -> Result<Self, Refused> {
        let a = available().map_err(Refused::Unavailable)?;
        let supported = match flavor {
            Flavor::Splice => a.support.splice,
            Flavor::RecvSend => a.support.recv && a.support.send,
        };
        if !supported {
            return Err(Refused::Unavailable(format!(
                "io_uring flavour {} unsupported here ({:?})",
                flavor.name(),
                a.support
            )));
        }
        if flavor == Flavor::Splice {
            PipeSlot::available(pipe_size).map_err(Refused::Pipes)?;
        }
        Ok(Self { flavor, pipe_size })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Moves both ways until both directions reach EOF, one side fails,
    /// the session idles out or shutdown is signalled.
    pub async fn run(
        self,
        tenant: Socket,
        compute: Socket,
        counters: &Counters,
        idle: Option<Duration>,
        shutdown: crate::datapath::Stop,
    ) -> End {
        let a = match available() {
            Ok(a) => a,
            Err(e) => return End::ComputeIo(e),
        };
        let tenant = match into_fd(tenant) {
            Ok(fd) => fd,
            Err(e) => return End::TenantIo(e.to_string()),
        };
        let compute = match into_fd(compute) {
            Ok(fd) => fd,
            Err(e) => return End::ComputeIo(e.to_string()),
        };
        let progress = Arc::new(Progress::default());
        let (tx, mut done) = oneshot::channel();
        let id = a.driver.next_id();
        let start = Start {
            id,
            tenant,
            compute,
            flavor: self.flavor,
            pipe_size: self.pipe_size,
            progress: Arc::clone(&progress),
            done: tx,
        };
        if a.driver.send(Cmd::Start(Box::new(start))).is_err() {
            // The command (and the sockets in it) is dropped unsubmitted.
            tracing::error!("the io_uring ring thread is gone");
            return End::Shutdown;
        }
        let mut guard = StopOnDrop {
            driver: &a.driver,
            id,
            armed: true,
        };
        let mut stopping = false;
        let mut hold: Option<tokio::time::Instant> = None;
        let end = loop {
            tokio::select! {
                end = &mut done => break end.unwrap_or(End::Shutdown),
                () = progress.notify.notified(), if hold.is_none() => {
                    fold(&progress, counters);
                    hold = Some(tokio::time::Instant::now() + FOLD_EVERY);
                }
                () = sleep_until(hold), if hold.is_some() => {
                    fold(&progress, counters);
                    hold = None;
                }
                () = idle_watch(counters, idle), if !stopping => {
                    fold(&progress, counters);
                    if idle.is_some_and(|i| counters.idle_for() >= i) {
                        guard.stop(End::IdleTimeout);
                        stopping = true;
                    }
                }
                () = shutdown.raised(), if !stopping => {
                    guard.stop(End::Shutdown);
                    stopping = true;
                }
            }
        };
        guard.armed = false;
        fold(&progress, counters);
        end
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn fold(progress: &Progress, counters: &Counters) {
    let up = progress.up.swap(0, Ordering::Relaxed);
    if up > 0 {
        counters.add_up(up as usize);
    }
    let down = progress.down.swap(0, Ordering::Relaxed);
    if down > 0 {
        counters.add_down(down as usize);
    }
}

/// Takes a socket away from tokio's reactor; it stays non-blocking.
fn into_fd(s: Socket) -> io::Result<OwnedFd> {
    Ok(match s {
        Socket::Tcp(s) => OwnedFd::from(s.into_std()?),
        Socket::Unix(s) => OwnedFd::from(s.into_std()?),
        // The ladder never hands a kTLS socket here: its non-data records
        // need the splice rung's recvmsg handling.
        Socket::Ktls(..) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kTLS sockets do not run on the io_uring rung",
            ));
        }
    })
}

/// Cancels the session on the ring if its task goes away first (the
/// maximum session duration drops the pump future).
struct StopOnDrop<'a> {
    driver: &'a Driver,
    id: u64,
    armed: bool,
}

impl StopOnDrop<'_> {
    fn stop(&self, reason: End) {
        let _ = self.driver.send(Cmd::Stop {
            id: self.id,
            reason,
        });
    }
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.stop(End::Shutdown);
        }
    }
}

/// What the shared contract tests in `splice.rs` do not show: a UNIX
/// compute leg, and that a stop cancels the ring's in-flight operations
/// and closes both sockets (the peers see EOF) rather than leaving them.
#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream, UnixStream};

    use super::*;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn uring(flavor: Flavor) -> Option<Uring> {
        match Uring::with(flavor, PIPE_SIZE) {
            Ok(u) => Some(u),
            Err(why) => {
                // The fallback (splice) runs the same contract tests.
                println!("skipped: {why}");
                None
            }
        }
    }

    #[tokio::test]
    async fn unix_compute_and_stop_closes_both_sockets() {
        for flavor in [Flavor::Splice, Flavor::RecvSend] {
            let Some(u) = uring(flavor) else { return };
            let (mut tenant, proxy_t) = tcp_pair().await;
            let (proxy_c, mut compute) = UnixStream::pair().unwrap();
            let stop = crate::datapath::Stop::new();
            let rx = stop.clone();
            let counters = Arc::new(Counters::new());
            let c = Arc::clone(&counters);
            let end = tokio::spawn(async move {
                u.run(Socket::Tcp(proxy_t), Socket::Unix(proxy_c), &c, None, rx)
                    .await
            });
            tenant.write_all(b"up via uring").await.unwrap();
            let mut got = [0u8; 12];
            compute.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"up via uring", "{flavor:?}");
            compute.write_all(b"down").await.unwrap();
            let mut back = [0u8; 4];
            tenant.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"down");
            // Both reads are now in flight on the ring; stop cancels them.
            stop.raise();
            assert_eq!(end.await.unwrap(), End::Shutdown, "{flavor:?}");
            assert_eq!((counters.up_bytes(), counters.down_bytes()), (12, 4));
            let mut rest = Vec::new();
            assert_eq!(tenant.read_to_end(&mut rest).await.unwrap(), 0);
            assert_eq!(compute.read_to_end(&mut rest).await.unwrap(), 0);
        }
    }

    #[tokio::test]
    async fn dropping_the_pump_cancels_the_session() {
        let Some(u) = uring(Flavor::Splice) else {
            return;
        };
        let (mut tenant, proxy_t) = tcp_pair().await;
        let (proxy_c, mut compute) = tcp_pair().await;
        let rx = crate::datapath::Stop::new();
        let counters = Counters::new();
        // As the maximum session duration does: the future is dropped.
        let pump = u.run(
            Socket::Tcp(proxy_t),
            Socket::Tcp(proxy_c),
            &counters,
            None,
            rx,
        );
        let r = tokio::time::timeout(Duration::from_millis(100), pump).await;
        assert!(r.is_err());
        let mut rest = Vec::new();
        assert_eq!(tenant.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(compute.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
