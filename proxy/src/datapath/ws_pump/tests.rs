//! The pump against a scripted tenant (frames built and checked by hand)
//! over in-memory streams for the copy path, and over loopback sockets for
//! the spliced path. Timers run on tokio's paused clock.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};

use super::*;
use crate::datapath::websocket::pump as copy_pump;
use crate::front::websocket::frame::{
    self, Frame, MAX_HEADER_LEN, Opcode, apply_mask, close_payload, parse_close,
};
use crate::front::websocket::stream::WsParts;

impl WsLeg for DuplexStream {}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn settings() -> WsSettings {
    WsSettings {
        mode: Mode::Binary,
        idle: None,
        ping_interval: None,
        max_duration: None,
    }
}

/// Sends one masked client frame.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, opcode: Opcode, payload: &[u8]) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = frame::encode_header(true, opcode, Some(MASK), payload.len() as u64, &mut hdr);
    let mut body = payload.to_vec();
    apply_mask(&mut body, MASK);
    w.write_all(&hdr[..h]).await.unwrap();
    w.write_all(&body).await.unwrap();
}

/// The tenant's view: server frames read off the stream.
struct Client<R> {
    r: R,
    buf: BytesMut,
    dec: Decoder,
}

impl<R: AsyncRead + Unpin> Client<R> {
    fn new(r: R) -> Self {
        Self {
            r,
            buf: BytesMut::new(),
            dec: Decoder::unmasked(u64::MAX),
        }
    }

    /// The next frame; `None` at end of stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.r.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until a close; returns the console bytes before it
    /// and the close's code and reason.
    async fn until_close(&mut self) -> (Vec<u8>, u16, String) {
        let mut data = Vec::new();
        loop {
            let f = self.frame().await.expect("a close frame before the end");
            match f.opcode {
                Opcode::Binary | Opcode::Continuation => data.extend_from_slice(&f.payload),
                Opcode::Close => {
                    let (code, reason) = parse_close(&f.payload).unwrap();
                    return (data, code, reason);
                }
                _ => {}
            }
        }
    }
}

fn parts(inner: DuplexStream) -> WsParts<DuplexStream> {
    WsParts {
        inner,
        raw: BytesMut::new(),
        pending: BytesMut::new(),
        inbound: Inbound::new(Mode::Binary),
    }
}

/// A copy pump between a scripted tenant and an in-memory console.
struct Rig {
    client_r: Client<tokio::io::ReadHalf<DuplexStream>>,
    client_w: tokio::io::WriteHalf<DuplexStream>,
    console: DuplexStream,
    stop: Stop,
    pump: tokio::task::JoinHandle<(End, u64, u64)>,
}

fn rig(settings: WsSettings, pending: &[u8]) -> Rig {
    let (client, tenant) = tokio::io::duplex(1 << 20);
    let (console, compute) = tokio::io::duplex(1 << 20);
    let stop = Stop::new();
    let s = stop.clone();
    let mut p = parts(tenant);
    p.pending.extend_from_slice(pending);
    let pump = tokio::spawn(async move {
        let counters = Counters::new();
        let end = copy_pump(p, compute, settings, &counters, s).await;
        (end, counters.up_bytes(), counters.down_bytes())
    });
    let (r, w) = tokio::io::split(client);
    Rig {
        client_r: Client::new(r),
        client_w: w,
        console,
        stop,
        pump,
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn bytes_cross_both_ways_and_a_tenant_close_is_echoed() {
    let mut rig = rig(settings(), b"early ");
    let up = payload(300_000, 7);
    let down = payload(1_000_000, 9);
    // Tenant to console, in frames of assorted sizes, after the bytes the
    // handshake phase left.
    let mut client_w = rig.client_w;
    let up2 = up.clone();
    let writer = tokio::spawn(async move {
        for chunk in up2.chunks(7_001) {
            send(&mut client_w, Opcode::Binary, chunk).await;
        }
        client_w
    });
    let mut got = vec![0u8; 6 + up.len()];
    rig.console.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..6], b"early ");
    assert!(got[6..] == up[..], "tenant bytes arrive in order, unmasked");
    let mut client_w = writer.await.unwrap();
    // Console to tenant.
    let (mut console_r, mut console_w) = tokio::io::split(rig.console);
    let down2 = down.clone();
    let feeder = tokio::spawn(async move {
        console_w.write_all(&down2).await.unwrap();
        console_w
    });
    let mut seen = Vec::new();
    while seen.len() < down.len() {
        let f = rig.client_r.frame().await.unwrap();
        assert_eq!(f.opcode, Opcode::Binary);
        assert!(f.fin);
        seen.extend_from_slice(&f.payload);
    }
    assert!(
        seen == down,
        "console bytes arrive in order as binary frames"
    );
    let _console_w = feeder.await.unwrap();
    // A ping is answered with its payload.
    send(&mut client_w, Opcode::Ping, b"are you there").await;
    let f = rig.client_r.frame().await.unwrap();
    assert_eq!(
        (f.opcode, &f.payload[..]),
        (Opcode::Pong, &b"are you there"[..])
    );
    // The tenant closes: the close is echoed, the console sees EOF.
    send(&mut client_w, Opcode::Close, &close_payload(1000, "bye")).await;
    let (_, code, _) = rig.client_r.until_close().await;
    assert_eq!(code, 1000);
    let mut rest = Vec::new();
    console_r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let (end, up_n, down_n) = rig.pump.await.unwrap();
    assert_eq!(end, End::TenantClosed);
    assert_eq!(up_n, 6 + up.len() as u64);
    assert_eq!(down_n, down.len() as u64);
}

#[tokio::test]
async fn console_eof_sends_a_normal_close_and_waits_for_the_answer() {
    let mut rig = rig(settings(), b"");
    rig.console.write_all(b"last words").await.unwrap();
    drop(rig.console);
    let (data, code, reason) = rig.client_r.until_close().await;
    assert_eq!(data, b"last words");
    assert_eq!((code, reason.as_str()), (1000, "console closed"));
    send(&mut rig.client_w, Opcode::Close, &close_payload(1000, "")).await;
    let (end, _, down_n) = rig.pump.await.unwrap();
    assert_eq!(end, End::ComputeClosed);
    assert_eq!(down_n, 10);
}

#[tokio::test]
async fn protocol_violations_close_with_their_code() {
    let mut rig = rig(settings(), b"");
    // Unmasked client frame.
    rig.client_w.write_all(&[0x82, 0x01, 0x41]).await.unwrap();
    let (_, code, reason) = rig.client_r.until_close().await;
    assert_eq!(
        (code, reason.as_str()),
        (1002, "client frames must be masked")
    );
    let (end, ..) = rig.pump.await.unwrap();
    assert!(
        matches!(end, End::TenantProtocol { code: 1002, .. }),
        "{end:?}"
    );

    // Continuation without a message.
    let mut rig = self::rig(settings(), b"");
    send(&mut rig.client_w, Opcode::Continuation, b"x").await;
    let (_, code, _) = rig.client_r.until_close().await;
    assert_eq!(code, 1002);
    drop(rig.client_w);
    let (end, ..) = rig.pump.await.unwrap();
    assert!(
        matches!(end, End::TenantProtocol { code: 1002, .. }),
        "{end:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_time_out_and_activity_defers_it() {
    let mut s = settings();
    s.idle = Some(Duration::from_secs(60));
    let mut rig = rig(s, b"");
    // Activity at 40 s moves the deadline to 100 s.
    tokio::time::sleep(Duration::from_secs(40)).await;
    rig.console.write_all(b"tick").await.unwrap();
    let f = rig.client_r.frame().await.unwrap();
    assert_eq!(&f.payload[..], b"tick");
    let start = tokio::time::Instant::now();
    let (_, code, reason) = rig.client_r.until_close().await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61),
        "{waited:?}"
    );
    // The session ends once our close is out.
    let (end, ..) = rig.pump.await.unwrap();
    assert_eq!(end, End::IdleTimeout);
}

#[tokio::test(start_paused = true)]
async fn unanswered_pings_end_the_session_and_pongs_keep_it() {
    let mut s = settings();
    s.ping_interval = Some(Duration::from_secs(30));
    let mut rig = rig(s, b"");
    // Answered pings keep the session.
    for _ in 0..4 {
        let f = rig.client_r.frame().await.unwrap();
        assert_eq!(
            (f.opcode, &f.payload[..]),
            (Opcode::Ping, &b"consolegate"[..])
        );
        send(&mut rig.client_w, Opcode::Pong, &f.payload).await;
    }
    // Then silence: two more pings, then the keepalive close.
    let mut pings = 0;
    let (code, reason) = loop {
        let f = rig.client_r.frame().await.unwrap();
        match f.opcode {
            Opcode::Ping => pings += 1,
            Opcode::Close => break parse_close(&f.payload).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(pings, 2);
    assert_eq!((code, reason.as_str()), (1001, "keepalive timeout"));
    // No answer to our close: the grace ends the session.
    let (end, ..) = rig.pump.await.unwrap();
    assert_eq!(end, End::KeepaliveTimeout);
}

#[tokio::test(start_paused = true)]
async fn maximum_duration_and_stop_close_with_going_away() {
    let mut s = settings();
    s.max_duration = Some(Duration::from_secs(3600));
    s.idle = Some(Duration::from_secs(7200));
    let mut rig = rig(s, b"");
    let (_, code, reason) = rig.client_r.until_close().await;
    assert_eq!(
        (code, reason.as_str()),
        (1001, "maximum session duration reached")
    );
    let (end, ..) = rig.pump.await.unwrap();
    assert_eq!(end, End::MaxDuration);

    let mut rig = self::rig(settings(), b"");
    tokio::time::sleep(Duration::from_secs(5)).await;
    rig.stop.raise();
    let (_, code, reason) = rig.client_r.until_close().await;
    assert_eq!((code, reason.as_str()), (1001, "proxy shutting down"));
    let (end, ..) = rig.pump.await.unwrap();
    assert_eq!(end, End::Shutdown);
}

#[tokio::test]
async fn a_tenant_that_pings_and_never_reads_is_slowed_not_buffered() {
    // A tiny tenant pipe: our pongs fill it at once.
    let (client, tenant) = tokio::io::duplex(64);
    let (_console, compute) = tokio::io::duplex(1024);
    let stop = Stop::new();
    let s = stop.clone();
    let pump = tokio::spawn(async move {
        let counters = Counters::new();
        copy_pump(parts(tenant), compute, settings(), &counters, s).await
    });
    let (mut r, mut w) = tokio::io::split(client);
    let pinger = tokio::spawn(async move {
        for _ in 0..10_000 {
            send(&mut w, Opcode::Ping, &[7u8; 100]).await;
        }
        w
    });
    // The pinger is held back by its own unread pongs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pinger.is_finished());
    // Reading the pongs lets it go on.
    let mut client = Client::new(&mut r);
    for _ in 0..10_000 {
        let f = client.frame().await.unwrap();
        assert_eq!(f.opcode, Opcode::Pong);
    }
    let _w = pinger.await.unwrap();
    stop.raise();
    let end = pump.await.unwrap();
    assert_eq!(end, End::Shutdown);
}

#[tokio::test]
async fn base64_mode_sends_text_frames() {
    let (client, tenant) = tokio::io::duplex(1 << 16);
    let (mut console, compute) = tokio::io::duplex(1 << 16);
    let mut s = settings();
    s.mode = Mode::Base64;
    let stop = Stop::new();
    let st = stop.clone();
    let pump = tokio::spawn(async move {
        let counters = Counters::new();
        let mut p = parts(tenant);
        p.inbound = Inbound::new(Mode::Base64);
        copy_pump(p, compute, s, &counters, st).await
    });
    let (r, mut w) = tokio::io::split(client);
    let mut client = Client::new(r);
    console.write_all(b"hello").await.unwrap();
    let f = client.frame().await.unwrap();
    assert_eq!((f.opcode, &f.payload[..]), (Opcode::Text, &b"aGVsbG8="[..]));
    send(&mut w, Opcode::Text, b"d29ybGQ=").await;
    let mut got = [0u8; 5];
    console.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"world");
    stop.raise();
    assert_eq!(pump.await.unwrap(), End::Shutdown);
}

/// A spliced pump between loopback sockets: the tenant's client socket,
/// the console's socket, the stop signal and the pump's task (its end and
/// counters up and down).
struct Spliced {
    client: tokio::net::TcpStream,
    console: tokio::net::TcpStream,
    stop: Stop,
    pump: tokio::task::JoinHandle<(End, u64, u64)>,
}

async fn spliced() -> Spliced {
    use crate::datapath::splice::{PIPE_SIZE, Socket};
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(a, l.accept());
        (a.unwrap(), b.unwrap().0)
    }
    let (client, tenant) = pair().await;
    let (console, compute) = pair().await;
    console.set_nodelay(true).unwrap();
    let stop = Stop::new();
    let st = stop.clone();
    let pump = tokio::spawn(async move {
        let counters = Counters::new();
        let p = WsParts {
            inner: tenant,
            raw: BytesMut::new(),
            pending: BytesMut::new(),
            inbound: Inbound::new(Mode::Binary),
        };
        let end = crate::datapath::ws_splice::pump(
            p,
            None,
            Socket::Tcp(compute),
            PipeSlot::new(PIPE_SIZE),
            settings(),
            &counters,
            st,
        )
        .await;
        (end, counters.up_bytes(), counters.down_bytes())
    });
    Spliced {
        client,
        console,
        stop,
        pump,
    }
}

/// The spliced pump over loopback sockets: large payloads both ways,
/// byte for byte, then the console's EOF.
#[tokio::test]
async fn spliced_frames_carry_the_console_bytes() {
    let Spliced {
        client,
        mut console,
        stop,
        pump,
    } = spliced().await;
    let (r, mut w) = client.into_split();
    let mut client = Client::new(r);
    let up = payload(500_000, 3);
    let down = payload(3_000_000, 5);
    let up2 = up.clone();
    let writer = tokio::spawn(async move {
        for chunk in up2.chunks(4096) {
            send(&mut w, Opcode::Binary, chunk).await;
        }
        w
    });
    let (mut cr, mut cw) = console.split();
    let reading = async {
        let mut got = vec![0u8; up.len()];
        cr.read_exact(&mut got).await.unwrap();
        got
    };
    let writing = async {
        cw.write_all(&down).await.unwrap();
        cw.shutdown().await.unwrap();
    };
    let receiving = client.until_close();
    let (got_up, (), (got_down, code, reason)) = tokio::join!(reading, writing, receiving);
    assert!(got_up == up, "tenant bytes arrive in order");
    assert!(got_down == down, "console bytes arrive in order");
    assert_eq!((code, reason.as_str()), (1000, "console closed"));
    let mut w = writer.await.unwrap();
    send(&mut w, Opcode::Close, &close_payload(1000, "")).await;
    let (end, up_n, down_n) = pump.await.unwrap();
    assert_eq!(end, End::ComputeClosed);
    assert_eq!((up_n, down_n), (up.len() as u64, down.len() as u64));
    drop(console);
    drop(stop);
}

/// The spliced pump with interactive traffic: console messages of every
/// size around the copy/splice switch, each read by the tenant before the
/// next is written, then a burst; every frame carries its bytes in order.
#[tokio::test]
async fn spliced_pump_small_messages_and_a_burst_keep_their_order() {
    use crate::datapath::splice::SMALL;
    let Spliced {
        client,
        mut console,
        stop,
        pump,
    } = spliced().await;
    let (r, mut w) = client.into_split();
    let mut client = Client::new(r);
    let mut total = 0u64;
    for (i, n) in [1, 64, SMALL - 1, SMALL, SMALL + 1, 40_000, 3, SMALL, 9]
        .into_iter()
        .enumerate()
    {
        let msg = payload(n, i as u64 + 11);
        console.write_all(&msg).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < n {
            let f = client.frame().await.unwrap();
            assert_eq!(f.opcode, Opcode::Binary);
            seen.extend_from_slice(&f.payload);
        }
        assert!(seen == msg, "message {i} ({n} bytes)");
        total += n as u64;
    }
    let burst = payload(2_000_000, 99);
    let (_, (got, code, _)) = tokio::join!(
        async {
            console.write_all(&burst).await.unwrap();
            console.shutdown().await.unwrap();
        },
        client.until_close()
    );
    assert!(got == burst, "the burst after the small messages");
    assert_eq!(code, 1000);
    send(&mut w, Opcode::Close, &close_payload(1000, "")).await;
    let (end, _, down) = pump.await.unwrap();
    assert_eq!(end, End::ComputeClosed);
    assert_eq!(down, total + burst.len() as u64);
    drop(stop);
}
