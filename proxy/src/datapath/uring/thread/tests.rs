//! The ring thread's own tests; the shared contract tests of the splice
//! rung (`datapath::splice::tests`) run both uring flavours too.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;
use crate::sys::uring::probe;

/// Whether this kernel's io_uring has the opcodes `what` names; says why
/// a test is skipped when not.
fn ring_offers(what: &str, has: impl Fn(&crate::sys::uring::Support) -> bool) -> bool {
    match probe() {
        Ok(s) if has(&s) => true,
        Ok(s) => {
            println!("skipped: io_uring lacks one of {what} ({s:?})");
            false
        }
        Err(e) => {
            println!("skipped: io_uring unavailable: {e}");
            false
        }
    }
}

/// Regression test for a lost wake-up (see `RingThread::commands`):
/// several threads queue commands at once, as concurrent sessions do,
/// and every one of them must reach the ring thread. Each session's
/// peers are already closed, so it ends (EOF both ways) as soon as the
/// ring thread has seen its `Start`.
#[test]
fn commands_from_racing_threads_all_reach_the_ring_thread() {
    if !ring_offers("POLL_ADD, RECV and SEND", |s| {
        s.poll_add && s.recv && s.send
    }) {
        return;
    }
    let driver = Arc::new(Driver::spawn(Ring::new(64).unwrap()).unwrap());
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let driver = Arc::clone(&driver);
            std::thread::spawn(move || {
                for _ in 0..500 {
                    let mut waiting = Vec::new();
                    for _ in 0..8 {
                        let (tenant, t_peer) = UnixStream::pair().unwrap();
                        let (compute, c_peer) = UnixStream::pair().unwrap();
                        drop((t_peer, c_peer));
                        let (done, rx) = oneshot::channel();
                        let start = Start {
                            id: driver.next_id(),
                            tenant: tenant.into(),
                            compute: compute.into(),
                            flavor: Flavor::RecvSend,
                            pipe_size: 0,
                            progress: Arc::new(Progress::default()),
                            done,
                        };
                        assert!(driver.send(Cmd::Start(Box::new(start))).is_ok());
                        waiting.push(rx);
                    }
                    for mut rx in waiting {
                        // Not a timing assertion: a lost wake-up
                        // leaves the ring thread asleep for ever.
                        let give_up = Instant::now() + Duration::from_secs(20);
                        let end = loop {
                            match rx.try_recv() {
                                Ok(end) => break end,
                                Err(oneshot::error::TryRecvError::Empty) => {
                                    assert!(
                                        Instant::now() < give_up,
                                        "the ring thread never saw a queued command"
                                    );
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                                Err(e) => panic!("session dropped: {e}"),
                            }
                        };
                        assert_eq!(end, End::Closed);
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    assert!(driver.alive());
}

/// Waits for `what` (not a timing assertion: the give-up only stops a
/// hung test).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < give_up, "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A splice-flavour session takes its pipes while bytes move and gives
/// them back once both directions wait for bytes again, then takes
/// them again for the next bytes.
#[test]
fn an_idle_splice_session_holds_no_pipe() {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    if !ring_offers("POLL_ADD, ASYNC_CANCEL and SPLICE", |s| {
        s.poll_add && s.async_cancel && s.splice
    }) {
        return;
    }
    let pair = || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (peer, ours)
    };
    let (mut tenant, proxy_t) = pair();
    let (mut compute, proxy_c) = pair();
    let driver = Driver::spawn(Ring::new(64).unwrap()).unwrap();
    let progress = Arc::new(Progress::default());
    let (done, mut end) = oneshot::channel();
    let start = Start {
        id: driver.next_id(),
        tenant: proxy_t.into(),
        compute: proxy_c.into(),
        flavor: Flavor::Splice,
        pipe_size: 64 * 1024,
        progress: Arc::clone(&progress),
        done,
    };
    assert!(driver.send(Cmd::Start(Box::new(start))).is_ok());
    let held = || progress.pipes.load(Ordering::Relaxed);
    for round in 0..4u8 {
        let up = vec![round; 300_000];
        tenant.write_all(&up).unwrap();
        let mut got = vec![0u8; up.len()];
        compute.read_exact(&mut got).unwrap();
        assert!(got == up, "round {round}: up bytes differ");
        let down = vec![!round; 200_000];
        compute.write_all(&down).unwrap();
        let mut back = vec![0u8; down.len()];
        tenant.read_exact(&mut back).unwrap();
        assert!(back == down, "round {round}: down bytes differ");
        eventually("both directions give their pipes back", || held() == 0);
    }
    // A read that fills the pipe's room exactly and empties the socket:
    // the direction must not keep the pipe in a splice waiting for more.
    for round in 0..8u8 {
        let up = vec![round; 64 * 1024];
        tenant.write_all(&up).unwrap();
        let mut got = vec![0u8; up.len()];
        compute.read_exact(&mut got).unwrap();
        assert!(got == up, "exact round {round}: up bytes differ");
        eventually("the pipe is back after a read that filled it", || {
            held() == 0
        });
    }
    // Bytes in both directions at once, then idle again.
    tenant.write_all(b"again up").unwrap();
    compute.write_all(b"again down").unwrap();
    let (mut a, mut b) = ([0u8; 8], [0u8; 10]);
    compute.read_exact(&mut a).unwrap();
    tenant.read_exact(&mut b).unwrap();
    assert_eq!((&a, &b), (b"again up", b"again down"));
    eventually("the pipes are back after the last bytes", || held() == 0);
    assert_eq!(
        progress.up.load(Ordering::Relaxed),
        4 * 300_000 + 8 * 64 * 1024 + 8,
        "up bytes counted"
    );
    assert_eq!(progress.down.load(Ordering::Relaxed), 4 * 200_000 + 10);
    drop((tenant, compute));
    eventually("the session ends on both EOFs", || {
        matches!(end.try_recv(), Ok(End::Closed))
    });
}

/// With no pipe to be had (descriptors ran out) a splice-flavour
/// direction goes on through a buffer: every byte still arrives, in both
/// directions, and the session ends normally.
#[test]
fn without_a_pipe_a_splice_session_moves_its_bytes_through_a_buffer() {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    if !ring_offers("POLL_ADD, RECV and SEND", |s| {
        s.poll_add && s.recv && s.send
    }) {
        return;
    }
    let pair = || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        // A stalled session fails the test instead of hanging it.
        peer.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (peer, ours)
    };
    let (mut tenant, proxy_t) = pair();
    let (mut compute, proxy_c) = pair();
    let driver = Driver::spawn(Ring::new(64).unwrap()).unwrap();
    let progress = Arc::new(Progress::default());
    let (done, mut end) = oneshot::channel();
    let start = Start {
        id: driver.next_id(),
        tenant: proxy_t.into(),
        compute: proxy_c.into(),
        flavor: Flavor::Splice,
        pipe_size: super::super::pool::NO_PIPE,
        progress: Arc::clone(&progress),
        done,
    };
    assert!(driver.send(Cmd::Start(Box::new(start))).is_ok());
    let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let writer = {
        let up = up.clone();
        let mut t = tenant.try_clone().unwrap();
        std::thread::spawn(move || t.write_all(&up).unwrap())
    };
    let mut got = vec![0u8; up.len()];
    compute.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == up, "up bytes differ");
    compute.write_all(&down).unwrap();
    let mut back = vec![0u8; down.len()];
    tenant.read_exact(&mut back).unwrap();
    assert!(back == down, "down bytes differ");
    assert_eq!(
        progress.pipes.load(Ordering::Relaxed),
        0,
        "no pipe was held"
    );
    // The ring counts a write when it reaps its completion, which may
    // come after the peer has read the bytes.
    eventually("every byte is counted", || {
        progress.up.load(Ordering::Relaxed) == up.len() as u64
            && progress.down.load(Ordering::Relaxed) == down.len() as u64
    });
    drop((tenant, compute));
    eventually("the session ends on both EOFs", || {
        matches!(end.try_recv(), Ok(End::Closed))
    });
}
