//! Every raw data path under the same tests (copy, splice, io_uring with
//! IORING_OP_SPLICE and with recv/send): random payloads both ways,
//! half-close, resets, slow readers and many sessions at once.

use std::sync::Arc;

use rand::RngCore as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;

#[derive(Debug, Clone, Copy)]
enum Path {
    Copy,
    Splice,
    /// io_uring, IORING_OP_SPLICE (splice if io_uring is unavailable).
    Uring,
    /// io_uring forced to recv/send (splice if unavailable).
    UringRecvSend,
    /// The sockmap redirect; where the program cannot load, the
    /// fallback the ladder takes (splice) after printing `skipped:`.
    Sockmap,
}

const PATHS: [Path; 5] = [
    Path::Copy,
    Path::Splice,
    Path::Uring,
    Path::UringRecvSend,
    Path::Sockmap,
];

/// The sockmap program, loaded once per test process (test-only use of
/// the control plane's loader: the pump itself never sees it).
fn sockmap() -> Option<Arc<crate::control::sockmap::Sockmap>> {
    static LOADED: std::sync::OnceLock<Result<Arc<crate::control::sockmap::Sockmap>, String>> =
        std::sync::OnceLock::new();
    match LOADED.get_or_init(|| crate::control::sockmap::Sockmap::load().map_err(|e| e.to_string()))
    {
        Ok(s) => Some(Arc::clone(s)),
        Err(e) => {
            println!("skipped: sockmap cannot load here ({e}); testing its fallback, splice");
            None
        }
    }
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

struct Running {
    tenant: TcpStream,
    compute: TcpStream,
    counters: Arc<Counters>,
    end: tokio::task::JoinHandle<End>,
    stop: crate::datapath::Stop,
}

/// tenant <-> [proxy_t | path | proxy_c] <-> compute
async fn start(path: Path, idle: Option<Duration>) -> Running {
    start_with(path, idle, PIPE_SIZE).await
}

async fn start_with(path: Path, idle: Option<Duration>, pipe: usize) -> Running {
    let (tenant, proxy_t) = tcp_pair().await;
    let (proxy_c, compute) = tcp_pair().await;
    let stop = crate::datapath::Stop::new();
    let rx = stop.clone();
    let counters = Arc::new(Counters::new());
    let c = Arc::clone(&counters);
    // Sockmap: the test starts once the sockets are in the maps (a FIN
    // before that makes the pump decline, tested on its own).
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
    let end = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut go = move || {
            if let Some(t) = ready_tx.take() {
                let _ = t.send(());
            }
        };
        if !matches!(path, Path::Sockmap) {
            go();
        }
        match path {
            Path::Copy => super::super::copy::bidirectional(proxy_t, proxy_c, &c, idle, rx).await,
            Path::Splice => {
                Splicer::with_pipe_size(pipe)
                    .unwrap()
                    .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                    .await
            }
            Path::Uring | Path::UringRecvSend => {
                use super::super::uring::{Flavor, Uring};
                let flavor = match path {
                    Path::Uring => Flavor::Splice,
                    _ => Flavor::RecvSend,
                };
                match Uring::with(flavor, pipe) {
                    Ok(u) => {
                        u.run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                            .await
                    }
                    Err(why) => {
                        println!("skipped: {path:?}: {why}; testing the splice fallback");
                        Splicer::with_pipe_size(pipe)
                            .unwrap()
                            .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, idle, rx)
                            .await
                    }
                }
            }
            Path::Sockmap => {
                let (t, pc) = match sockmap() {
                    Some(sm) => {
                        let r = super::super::sockmap::run(
                            sm.as_ref(),
                            proxy_t,
                            proxy_c,
                            &c,
                            idle,
                            rx.clone(),
                            &mut go,
                        )
                        .await;
                        match r {
                            Ok(end) => return end,
                            // As the ladder does: splice goes on.
                            Err(d) => {
                                println!("sockmap declined ({}): splice", d.reason);
                                (d.tenant, d.compute)
                            }
                        }
                    }
                    None => (proxy_t, proxy_c),
                };
                go();
                Splicer::with_pipe_size(pipe)
                    .unwrap()
                    .run(Socket::Tcp(t), Socket::Tcp(pc), &c, idle, rx)
                    .await
            }
        }
    });
    let _ = ready.await;
    Running {
        tenant,
        compute,
        counters,
        end,
        stop,
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Writes `data` then half-closes, while reading everything the other
/// way; returns what was read.
async fn exchange(mut s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(write, read);
    got
}

#[tokio::test]
async fn large_random_payloads_both_ways_with_half_close() {
    for path in PATHS {
        let r = start(path, None).await;
        let up = random(8 << 20);
        let down = random(6 << 20 | 12345);
        let (got_down, got_up) = tokio::join!(
            exchange(r.tenant, up.clone()),
            exchange(r.compute, down.clone())
        );
        assert!(got_up == up, "{path:?}: up bytes differ");
        assert!(got_down == down, "{path:?}: down bytes differ");
        assert_eq!(r.end.await.unwrap(), End::Closed, "{path:?}");
        assert_eq!(r.counters.up_bytes(), up.len() as u64);
        assert_eq!(r.counters.down_bytes(), down.len() as u64);
    }
}

#[tokio::test]
async fn half_close_keeps_the_other_direction() {
    for path in PATHS {
        let mut r = start(path, None).await;
        r.tenant.write_all(b"request").await.unwrap();
        r.tenant.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.compute.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "{path:?}");
        // Long after the tenant's FIN, the compute side still answers.
        let answer = random(3 << 20);
        r.compute.write_all(&answer).await.unwrap();
        r.compute.shutdown().await.unwrap();
        let mut back = Vec::new();
        r.tenant.read_to_end(&mut back).await.unwrap();
        assert!(back == answer, "{path:?}");
        assert_eq!(r.end.await.unwrap(), End::Closed);
    }
}

#[tokio::test]
async fn slow_reader_gets_everything() {
    for path in PATHS {
        let mut r = start(path, None).await;
        let data = random(4 << 20);
        let d2 = data.clone();
        let mut compute = r.compute;
        let writer = tokio::spawn(async move {
            compute.write_all(&d2).await.unwrap();
            compute.shutdown().await.unwrap();
            compute
        });
        // Read in small sips with pauses: the proxy must hold back
        // (socket buffers and the pipe fill up) without losing bytes.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut sips = 0u32;
        loop {
            let n = r.tenant.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            sips += 1;
            if sips.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(got == data, "{path:?}");
        drop(writer.await.unwrap());
        r.tenant.shutdown().await.unwrap();
        assert_eq!(r.end.await.unwrap(), End::Closed);
    }
}

/// Interactive traffic: messages of every size around the copy/splice
/// switch ([`SMALL`]), each answered before the next, then a burst
/// both ways: the bytes arrive whole and in order whichever way each
/// message took, and the counters add up.
#[tokio::test]
async fn messages_around_the_small_size_keep_their_order() {
    for path in PATHS {
        let mut r = start(path, None).await;
        r.tenant.set_nodelay(true).unwrap();
        r.compute.set_nodelay(true).unwrap();
        let sizes = [
            1,
            7,
            64,
            SMALL - 1,
            SMALL,
            SMALL + 1,
            3 * SMALL,
            100_000,
            5,
            SMALL,
            1,
        ];
        let (mut up, mut down) = (0u64, 0u64);
        for (i, &n) in sizes.iter().enumerate() {
            let msg = random(n);
            r.tenant.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; n];
            r.compute.read_exact(&mut got).await.unwrap();
            assert!(got == msg, "{path:?}: message {i} ({n} bytes) up");
            let back = random(n + i);
            r.compute.write_all(&back).await.unwrap();
            let mut got = vec![0u8; back.len()];
            r.tenant.read_exact(&mut got).await.unwrap();
            assert!(
                got == back,
                "{path:?}: answer {i} ({} bytes) down",
                back.len()
            );
            up += n as u64;
            down += back.len() as u64;
        }
        let burst_up = random(2 << 20);
        let burst_down = random(3 << 20 | 77);
        let (got_down, got_up) = tokio::join!(
            exchange(r.tenant, burst_up.clone()),
            exchange(r.compute, burst_down.clone())
        );
        assert!(got_up == burst_up, "{path:?}: burst up");
        assert!(got_down == burst_down, "{path:?}: burst down");
        assert_eq!(r.end.await.unwrap(), End::Closed, "{path:?}");
        assert_eq!(r.counters.up_bytes(), up + burst_up.len() as u64);
        assert_eq!(r.counters.down_bytes(), down + burst_down.len() as u64);
    }
}

/// A small message that the tenant cannot take whole (its buffers are
/// full: it does not read) goes on through the pipe, ahead of what
/// follows: nothing is lost or reordered when the copy meets a full
/// destination.
#[tokio::test]
async fn a_small_message_a_full_tenant_cannot_take_waits_in_the_pipe() {
    let (mut tenant, proxy_t) = tcp_pair().await;
    let (proxy_c, mut compute) = tcp_pair().await;
    socket2::SockRef::from(&tenant)
        .set_recv_buffer_size(2048)
        .unwrap();
    socket2::SockRef::from(&proxy_t)
        .set_send_buffer_size(2048)
        .unwrap();
    compute.set_nodelay(true).unwrap();
    let counters = Arc::new(Counters::new());
    let c = Arc::clone(&counters);
    let stop = crate::datapath::Stop::new();
    let rx = stop.clone();
    let end = tokio::spawn(async move {
        Splicer::new()
            .unwrap()
            .run(Socket::Tcp(proxy_t), Socket::Tcp(proxy_c), &c, None, rx)
            .await
    });
    let data = random(40 * 1000);
    // One message at a time, so each is read on its own (by copy).
    for m in data.chunks(1000) {
        compute.write_all(m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    compute.shutdown().await.unwrap();
    let mut got = Vec::new();
    tenant.read_to_end(&mut got).await.unwrap();
    assert!(got == data, "{} of {} bytes", got.len(), data.len());
    tenant.shutdown().await.unwrap();
    assert_eq!(end.await.unwrap(), End::Closed);
    assert_eq!(counters.down_bytes(), data.len() as u64);
    drop((compute, stop));
}

/// With a one-page pipe, a few bytes occupy its only slot long before
/// its byte capacity is reached: the next splice in gets EAGAIN while
/// the socket has data (what FIONREAD disambiguates). Tiny segments
/// with a stalled reader must neither stall nor lose bytes.
#[tokio::test]
async fn tiny_segments_fill_pipe_slots_without_stalling() {
    for path in PATHS {
        let mut r = start_with(path, None, 4096).await;
        r.compute.set_nodelay(true).unwrap();
        let data = random(7 * 20_000);
        let d2 = data.clone();
        let mut compute = r.compute;
        let writer = tokio::spawn(async move {
            for chunk in d2.chunks(7) {
                compute.write_all(chunk).await.unwrap();
            }
            compute.shutdown().await.unwrap();
            compute
        });
        // Let the segments pile up in the proxy before reading.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        r.tenant.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "{path:?}: {} of {} bytes",
            got.len(),
            data.len()
        );
        drop(writer.await.unwrap());
        r.tenant.shutdown().await.unwrap();
        assert_eq!(r.end.await.unwrap(), End::Closed);
    }
}

/// An idle spliced session gives both pipes back to the pool (the
/// test runtime has one thread, so they land in this thread's pool).
#[tokio::test]
async fn idle_session_holds_no_pipes() {
    let before = super::super::pipes::pooled();
    let mut r = start(Path::Splice, None).await;
    for round in 0..3u8 {
        r.tenant.write_all(&[round; 1000]).await.unwrap();
        let mut got = [0u8; 1000];
        r.compute.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round; 1000]);
        r.compute.write_all(&[round; 2000]).await.unwrap();
        let mut back = [0u8; 2000];
        r.tenant.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [round; 2000]);
    }
    // Both directions are waiting for bytes now: no pipe held, and
    // the one or two pipes used are back in the pool.
    let mut held = usize::MAX;
    for _ in 0..200 {
        held = super::super::pipes::held();
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(held, 0, "an idle session holds no pipe");
    assert!(super::super::pipes::pooled() > before);
    // And the session still works after that, taking them again.
    r.tenant.write_all(b"again").await.unwrap();
    let mut got = [0u8; 5];
    r.compute.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"again");
    drop(r.tenant);
    drop(r.compute);
    let _ = r.end.await.unwrap();
    let _ = r.stop;
}

/// EAGAIN from splice(socket -> pipe) means "socket empty" or "pipe
/// slots full"; only the first may clear tokio's readiness.
#[tokio::test]
async fn full_pipe_is_told_apart_from_an_empty_socket() {
    let (mut a, b) = tcp_pair().await;
    let (c, mut d) = tcp_pair().await;
    let mut slot = PipeSlot::new(4096);
    let sock = Sock::Tcp(&b);
    async fn arrived(b: &TcpStream, n: usize) {
        while readable_bytes(b.as_fd()).unwrap() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.readable().await.unwrap();
    }
    a.write_all(b"1234567").await.unwrap();
    arrived(&b, 7).await;
    assert!(matches!(
        splice_in(sock, &mut slot, 4096, 0).unwrap(),
        In::Moved(7)
    ));
    a.write_all(b"abcdefg").await.unwrap();
    arrived(&b, 7).await;
    // One page, one slot, already holding 7 bytes.
    assert!(matches!(
        splice_in(sock, &mut slot, 4089, 7).unwrap(),
        In::PipeFull
    ));
    // Readiness was kept: no wait needed to move on once the pipe drains.
    assert_eq!(
        splice(slot.get().unwrap().reader(), c.as_fd(), 7).unwrap(),
        7
    );
    assert!(matches!(
        splice_in(sock, &mut slot, 4096, 0).unwrap(),
        In::Moved(7)
    ));
    assert_eq!(
        splice(slot.get().unwrap().reader(), c.as_fd(), 7).unwrap(),
        7
    );
    let e = splice_in(sock, &mut slot, 4096, 0).err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    let mut got = [0u8; 14];
    d.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"1234567abcdefg");
}

#[tokio::test]
async fn compute_reset_ends_the_session_with_a_compute_error() {
    for path in PATHS {
        let mut r = start(path, None).await;
        r.tenant.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        r.compute.read_exact(&mut one).await.unwrap();
        // SO_LINGER 0: close sends RST.
        socket2::SockRef::from(&r.compute)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(r.compute);
        // Keep writing until the proxy notices.
        let end = loop {
            if r.end.is_finished() {
                break r.end.await.unwrap();
            }
            if r.tenant.write_all(&[0u8; 65536]).await.is_err() {
                break r.end.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert!(matches!(end, End::ComputeIo(_)), "{path:?}: {end:?}");
        assert!(r.counters.up_bytes() >= 1);
    }
}

#[tokio::test]
async fn tenant_reset_ends_the_session() {
    for path in PATHS {
        let r = start(path, None).await;
        socket2::SockRef::from(&r.tenant)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(r.tenant);
        let mut compute = r.compute;
        let end = loop {
            if r.end.is_finished() {
                break r.end.await.unwrap();
            }
            if compute.write_all(&[0u8; 65536]).await.is_err() {
                break r.end.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert!(matches!(end, End::TenantIo(_)), "{path:?}: {end:?}");
    }
}

#[tokio::test]
async fn idle_timeout_and_shutdown() {
    for path in PATHS {
        let r = start(path, Some(Duration::from_millis(100))).await;
        assert_eq!(r.end.await.unwrap(), End::IdleTimeout, "{path:?}");
        let r = start(path, None).await;
        r.stop.raise();
        assert_eq!(r.end.await.unwrap(), End::Shutdown, "{path:?}");
        drop((r.tenant, r.compute));
    }
}

#[tokio::test]
async fn many_concurrent_sessions() {
    for path in PATHS {
        let mut tasks = Vec::new();
        for i in 0..64usize {
            tasks.push(tokio::spawn(async move {
                let r = start(path, None).await;
                let up = random(64 * 1024 + i * 977);
                let down = random(128 * 1024 + i * 131);
                let (got_down, got_up) = tokio::join!(
                    exchange(r.tenant, up.clone()),
                    exchange(r.compute, down.clone())
                );
                assert!(got_up == up && got_down == down, "{path:?} session {i}");
                assert_eq!(r.end.await.unwrap(), End::Closed);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test]
async fn splice_to_a_unix_socket_compute() {
    let dir = std::env::temp_dir().join(format!("cg-splice-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("c.sock");
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let proxy_c = UnixStream::connect(&path).await.unwrap();
    let (compute, _) = l.accept().await.unwrap();
    let (tenant, proxy_t) = tcp_pair().await;
    let rx = crate::datapath::Stop::new();
    let counters = Arc::new(Counters::new());
    let c = Arc::clone(&counters);
    let end = tokio::spawn(async move {
        Splicer::new()
            .unwrap()
            .run(Socket::Tcp(proxy_t), Socket::Unix(proxy_c), &c, None, rx)
            .await
    });
    let up = random(2 << 20);
    let down = random(3 << 20);
    let (mut cr, mut cw) = compute.into_split();
    let d2 = down.clone();
    let compute_side = async move {
        let mut got = Vec::new();
        let w = async {
            cw.write_all(&d2).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let r = cr.read_to_end(&mut got);
        let ((), n) = tokio::join!(w, r);
        n.unwrap();
        got
    };
    let (got_down, got_up) = tokio::join!(exchange(tenant, up.clone()), compute_side);
    assert!(got_up == up && got_down == down);
    assert_eq!(end.await.unwrap(), End::Closed);
    let _ = std::fs::remove_dir_all(&dir);
}
