use super::*;
use std::net::TcpListener;
use std::thread;

#[test]
fn client_frames_are_masked_and_unmask_to_the_payload() {
    let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
    let mut out = Vec::new();
    encode_masked(0x2, &payload, [1, 2, 3, 4], &mut out);
    assert_eq!(out[0], 0x82);
    assert_eq!(out[1], 0x80 | 126);
    assert_eq!(u16::from_be_bytes([out[2], out[3]]), 300);
    assert_eq!(&out[4..8], &[1, 2, 3, 4]);
    let unmasked: Vec<u8> = out[8..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
        .collect();
    assert_eq!(unmasked, payload);
    let mut small = Vec::new();
    encode_masked(0x2, b"hi", [0; 4], &mut small);
    assert_eq!(small, [0x82, 0x82, 0, 0, 0, 0, b'h', b'i']);
}

/// A one-shot WebSocket server written by hand: answers the upgrade,
/// then sends a ping, a data frame split in two, and a close.
#[test]
fn websocket_session_reads_payload_across_frames_and_answers_pings() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let head = read_head(&mut s);
        let mut out = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
        out.extend_from_slice(&[0x89, 2, b'p', b'!']); // ping
        out.extend_from_slice(&[0x02, 3, b'a', b'b', b'c']); // binary, not FIN
        out.extend_from_slice(&[0x80, 2, b'd', b'e']); // continuation, FIN
        s.write_all(&out).unwrap();
        // The pong comes back masked.
        let mut pong = [0u8; 8];
        s.read_exact(&mut pong).unwrap();
        let mut close = vec![0x88, 5];
        close.extend_from_slice(&1000u16.to_be_bytes());
        close.extend_from_slice(b"bye");
        s.write_all(&close).unwrap();
        (String::from_utf8(head).unwrap(), pong)
    });
    let mut session = open_ws(&addr);
    let mut got = [0u8; 5];
    session.read_payload_exact(&mut got).unwrap();
    assert_eq!(&got, b"abcde");
    let err = session.payload(10).unwrap_err();
    assert!(err.to_string().contains("1000 bye"), "{err}");
    let (head, pong) = server.join().unwrap();
    assert!(head.starts_with("GET /?token=x HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Protocol: binary\r\n"),
        "{head}"
    );
    assert_eq!(pong[0], 0x8A);
    assert_eq!(pong[1], 0x80 | 2);
    let key = [pong[2], pong[3], pong[4], pong[5]];
    assert_eq!([pong[6] ^ key[0], pong[7] ^ key[1]], *b"p!");
}

/// Discarding a WebSocket stream: every frame's payload is counted, the
/// 16- and 64-bit extended lengths included, and once discarding no
/// payload is copied out behind a frame header (only headers are
/// buffered, and only exactly).
#[test]
fn discarding_reads_frame_headers_exactly_and_counts_every_payload_byte() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sizes = [100usize, 300, 70_000, 5];
    let (opened, wait_open) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .unwrap();
        // The frames only once the client has read the head.
        wait_open.recv().unwrap();
        let mut out = Vec::new();
        for n in sizes {
            out.push(0x82);
            match n {
                0..=125 => out.push(n as u8),
                126..=65535 => {
                    out.push(126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
                _ => {
                    out.push(127);
                    out.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            out.extend(std::iter::repeat_n(0xAB, n));
        }
        // All frames at once: a buffered header read would take payload too.
        s.write_all(&out).unwrap();
        s
    });
    let mut session = open_ws(&addr);
    opened.send(()).unwrap();
    let total: usize = sizes.iter().sum();
    let mut got = 0;
    while got < total {
        got += session.discard_payload(1 << 16).unwrap();
        assert!(
            session.len - session.pos <= 14,
            "only a frame header is ever buffered: {session:?}"
        );
    }
    assert_eq!(got, total);
    drop(server.join().unwrap());
}

/// A request head, read byte by byte up to its blank line (nothing after).
/// A plain WebSocket session to a scripted server at `addr`.
fn open_ws(addr: &str) -> Session {
    let front = Front::Ws {
        path: "/?token=x".into(),
    };
    let dial = Dial::new(addr, front, None, Duration::from_secs(10)).unwrap();
    dial.open().unwrap()
}

fn read_head(s: &mut std::net::TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    head
}

#[test]
fn sessions_spread_over_source_addresses_and_ways_in() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (mut s, peer) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                head.push(b[0]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
            let head = String::from_utf8(head).unwrap();
            let target = head.split_whitespace().nth(1).unwrap().to_owned();
            let token = head
                .lines()
                .find_map(|l| l.strip_prefix("Proxy-Authorization: Bearer "))
                .unwrap()
                .to_owned();
            seen.push((peer.ip().to_string(), target, token));
        }
        seen
    });
    let connect = |target: &str, token: &str| Front::Connect {
        target: target.into(),
        token: Some(token.into()),
    };
    let mut dial = Dial::new(
        &addr,
        connect("127.0.0.1:1", "t1"),
        None,
        Duration::from_secs(10),
    )
    .unwrap()
    .with_sources(scale::source_addrs(2).unwrap())
    .unwrap();
    dial.more_fronts = vec![connect("127.0.0.1:2", "t2")];
    dial.buf_size = 16;
    let held: Vec<Session> = (0..4).map(|i| dial.open_nth(i).unwrap()).collect();
    let seen = server.join().unwrap();
    let want = [
        ("127.0.0.2", "127.0.0.1:1", "t1"),
        ("127.0.0.3", "127.0.0.1:2", "t2"),
        ("127.0.0.2", "127.0.0.1:1", "t1"),
        ("127.0.0.3", "127.0.0.1:2", "t2"),
    ];
    let seen: Vec<(&str, &str, &str)> = seen
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(held.len(), 4);
    assert_eq!(dial.fronts().count(), 2);
    // Sources must be able to reach the proxy over loopback.
    let far = Dial::new("192.0.2.1:9", Front::Raw, None, Duration::from_secs(1)).unwrap();
    assert!(far.with_sources(scale::source_addrs(1).unwrap()).is_err());
    let v6 = Dial::new("[::1]:9", Front::Raw, None, Duration::from_secs(1)).unwrap();
    assert!(v6.with_sources(scale::source_addrs(1).unwrap()).is_err());
}

#[test]
fn refused_connect_names_the_status() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 256];
        let _ = s.read(&mut b).unwrap();
        s.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap();
    });
    let front = Front::Connect {
        target: "127.0.0.1:1".into(),
        token: Some("t".into()),
    };
    let dial = Dial::new(&addr, front, None, Duration::from_secs(10)).unwrap();
    let err = dial.open().unwrap_err();
    assert!(err.to_string().contains("403 Forbidden"), "{err}");
    server.join().unwrap();
}
