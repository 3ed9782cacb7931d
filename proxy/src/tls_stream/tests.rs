//! The stream against tokio-rustls (rustls's buffered connection) on the
//! other end of a loopback TCP connection, both TLS versions, both sides.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];

/// A fresh self-signed server and a client trusting it, for `version`
/// only; secret extraction on (the kTLS hand-over tests use them too).
pub(crate) fn configs(
    version: &'static rustls::SupportedProtocolVersion,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = certified.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (s, c)
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Ours as the server, tokio-rustls as the client.
async fn ours_serving(
    version: &'static rustls::SupportedProtocolVersion,
) -> (
    ServerTls<TcpStream>,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let (server_cfg, client_cfg) = configs(version);
    let (s, c) = tcp_pair().await;
    let (ours, theirs) = tokio::join!(
        ServerTls::accept(server_cfg, s),
        tokio_rustls::TlsConnector::from(client_cfg).connect(name(), c),
    );
    (ours.unwrap(), theirs.unwrap())
}

/// Ours as the client, tokio-rustls as the server.
async fn ours_dialling(
    version: &'static rustls::SupportedProtocolVersion,
) -> (
    ClientTls<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
) {
    let (server_cfg, client_cfg) = configs(version);
    let (s, c) = tcp_pair().await;
    let (ours, theirs) = tokio::join!(
        ClientTls::connect(client_cfg, name(), c),
        tokio_rustls::TlsAcceptor::from(server_cfg).accept(s),
    );
    (ours.unwrap(), theirs.unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `data` through `w` in writes of assorted sizes while `r` reads it
/// with reads of assorted sizes; returns what `r` read.
async fn through<W, R>(w: &mut W, r: &mut R, data: &[u8]) -> Vec<u8>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let sizes = [1usize, 7, 100, 2048, 2049, 16_384, 16_385, 70_000];
    let write = async {
        let mut at = 0;
        let mut i = 0;
        while at < data.len() {
            let n = sizes[i % sizes.len()].min(data.len() - at);
            w.write_all(&data[at..at + n]).await.unwrap();
            w.flush().await.unwrap();
            at += n;
            i += 1;
        }
    };
    let read = async {
        let mut got = Vec::new();
        let mut i = 3;
        while got.len() < data.len() {
            let mut buf = vec![0u8; sizes[i % sizes.len()]];
            let n = r.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "stream ended after {} of {} bytes",
                got.len(),
                data.len()
            );
            got.extend_from_slice(&buf[..n]);
            i += 1;
        }
        got
    };
    tokio::join!(write, read).1
}

/// `data` through the pair one way, then the other.
async fn both_ways<A, B>(a: &mut A, b: &mut B, data: &[u8], what: &str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    assert!(through(a, b, data).await == data, "{what}: one way");
    assert!(through(b, a, data).await == data, "{what}: the other way");
}

#[tokio::test]
async fn both_directions_byte_for_byte_on_both_sides() {
    let data = pattern(600_000, 5);
    for version in VERSIONS {
        let (mut ours, mut theirs) = ours_serving(version).await;
        both_ways(
            &mut ours,
            &mut theirs,
            &data,
            &format!("server {version:?}"),
        )
        .await;
        let (mut ours, mut theirs) = ours_dialling(version).await;
        both_ways(
            &mut ours,
            &mut theirs,
            &data,
            &format!("client {version:?}"),
        )
        .await;
    }
}

/// Both ways at once with nobody reading for a while: writes stop at the
/// pending limit and resume, nothing is lost or reordered.
#[tokio::test]
async fn full_duplex_with_a_slow_reader() {
    let data = pattern(2_000_000, 9);
    let (ours, theirs) = ours_serving(&rustls::version::TLS13).await;
    let (mut our_r, our_w) = tokio::io::split(ours);
    let (mut their_r, their_w) = tokio::io::split(theirs);
    fn send<W: AsyncWrite + Unpin + Send + 'static>(
        mut w: W,
        data: Vec<u8>,
    ) -> tokio::task::JoinHandle<W> {
        tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.flush().await.unwrap();
            w
        })
    }
    let a = send(our_w, data.clone());
    let b = send(their_w, data.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut got_ours = vec![0u8; data.len()];
    let mut got_theirs = vec![0u8; data.len()];
    let (x, y) = tokio::join!(
        our_r.read_exact(&mut got_ours),
        their_r.read_exact(&mut got_theirs)
    );
    x.unwrap();
    y.unwrap();
    assert!(got_ours == data && got_theirs == data);
    a.await.unwrap();
    b.await.unwrap();
}

/// Once a read finds the socket drained, the stream holds no buffer.
#[tokio::test]
async fn an_idle_stream_holds_no_buffers() {
    for version in VERSIONS {
        let (mut ours, mut theirs) = ours_serving(version).await;
        let data = pattern(100_000, 1);
        assert_eq!(through(&mut theirs, &mut ours, &data).await, data);
        assert_eq!(through(&mut ours, &mut theirs, &data).await, data);
        let mut buf = [0u8; 64];
        let idle = tokio::time::timeout(Duration::from_millis(50), ours.read(&mut buf)).await;
        assert!(idle.is_err(), "nothing was sent");
        assert_eq!(
            (
                ours.incoming.capacity(),
                ours.plain.capacity(),
                ours.outgoing.capacity()
            ),
            (0, 0, 0),
            "{version:?}"
        );
        // And it still works afterwards.
        theirs.write_all(b"wake").await.unwrap();
        theirs.flush().await.unwrap();
        let n = ours.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"wake");
    }
}

/// close_notify reads as the end of the stream, the transport ending
/// without one as `UnexpectedEof` (as tokio-rustls reports them).
#[tokio::test]
async fn close_notify_is_eof_and_a_bare_tcp_close_is_unexpected() {
    let (mut ours, mut theirs) = ours_serving(&rustls::version::TLS13).await;
    theirs.write_all(b"bye").await.unwrap();
    theirs.shutdown().await.unwrap();
    let mut got = Vec::new();
    ours.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    // We close too; the peer sees a clean end.
    ours.shutdown().await.unwrap();
    let mut rest = Vec::new();
    theirs.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    let (mut ours, theirs) = ours_dialling(&rustls::version::TLS12).await;
    let (tcp, _) = theirs.into_inner();
    drop(tcp);
    let mut buf = [0u8; 8];
    let e = ours.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

/// The peer refreshes its keys (TLS 1.3 KeyUpdate, asking us to update
/// ours too): traffic goes on both ways.
#[tokio::test]
async fn peer_key_update_is_followed() {
    let (mut ours, mut theirs) = ours_serving(&rustls::version::TLS13).await;
    for round in 0..3u8 {
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        let data = pattern(50_000, round);
        assert_eq!(
            through(&mut theirs, &mut ours, &data).await,
            data,
            "round {round}"
        );
        assert_eq!(
            through(&mut ours, &mut theirs, &data).await,
            data,
            "round {round}"
        );
    }
}

/// A peer's KeyUpdate asking for ours leaves rustls holding its answer
/// until our next application data (what the kTLS hand-over must not
/// lose): `send_held` sends it on its own, after which the peer reads our
/// data under the next key. Tickets, data, or an answer already sent with
/// our data leave nothing held.
#[tokio::test]
async fn a_held_key_update_answer_is_sent_on_its_own() {
    let (mut ours, mut theirs) = ours_serving(&rustls::version::TLS13).await;
    let data = pattern(1000, 1);
    assert_eq!(through(&mut theirs, &mut ours, &data).await, data);
    assert!(
        !ours.send_held().await.unwrap(),
        "tickets and data hold nothing"
    );
    theirs.get_mut().1.refresh_traffic_keys().unwrap();
    assert_eq!(through(&mut theirs, &mut ours, &data).await, data);
    assert!(ours.send_held().await.unwrap(), "the answer");
    assert!(!ours.send_held().await.unwrap(), "sent once");
    for round in 0..2u8 {
        let data = pattern(5000, round);
        assert_eq!(through(&mut ours, &mut theirs, &data).await, data);
        assert_eq!(through(&mut theirs, &mut ours, &data).await, data);
    }
    // An answer that went out ahead of our data is not held any more.
    theirs.get_mut().1.refresh_traffic_keys().unwrap();
    assert_eq!(through(&mut theirs, &mut ours, &data).await, data);
    assert_eq!(through(&mut ours, &mut theirs, &data).await, data);
    assert!(!ours.send_held().await.unwrap());
}

/// A server certificate that does not chain to our roots fails our client's
/// handshake with rustls's reason.
#[tokio::test]
async fn untrusted_server_certificate_fails_the_handshake() {
    let (server_cfg, _) = configs(&rustls::version::TLS13);
    let (_, other_client) = configs(&rustls::version::TLS13);
    let (s, c) = tcp_pair().await;
    let (ours, theirs) = tokio::join!(
        ClientTls::connect(other_client, name(), c),
        tokio_rustls::TlsAcceptor::from(server_cfg).accept(s),
    );
    let e = ours.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    // The server hears why: our alert, not a bare close.
    let theirs = theirs.unwrap_err().to_string();
    assert!(theirs.contains("received fatal alert"), "{theirs}");
}

/// Bytes that are not TLS, a header announcing an oversized record, and a
/// peer that stops mid-handshake: each is an error, none a panic or a hang.
#[tokio::test]
async fn bad_input_is_an_error() {
    let (server_cfg, _) = configs(&rustls::version::TLS13);
    let mut big = vec![22u8, 3, 1, 0xff, 0xff];
    big.extend(std::iter::repeat_n(0u8, 70_000));
    let inputs: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &big,
        &[22, 3, 1, 0, 200, 1, 0, 0, 196],
        &[],
    ];
    for input in inputs {
        let (s, mut c) = tcp_pair().await;
        c.write_all(input).await.unwrap();
        c.shutdown().await.unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            ServerTls::accept(Arc::clone(&server_cfg), s),
        )
        .await
        .expect("an answer, not a hang");
        assert!(r.is_err(), "{:?}", &input[..input.len().min(8)]);
    }
}

/// The hand-over refuses to lose bytes: unread plaintext is an error.
#[tokio::test]
async fn into_inner_keeps_nothing_back() {
    let (mut ours, mut theirs) = ours_serving(&rustls::version::TLS13).await;
    theirs.write_all(b"0123456789").await.unwrap();
    theirs.flush().await.unwrap();
    let mut two = [0u8; 2];
    ours.read_exact(&mut two).await.unwrap();
    assert!(ours.into_inner().is_err());
    let (mut ours, _theirs) = ours_serving(&rustls::version::TLS13).await;
    ours.flush().await.unwrap();
    let (_tcp, conn) = ours.into_inner().unwrap();
    assert!(conn.negotiated_cipher_suite().is_some());
    // Nor ciphertext not yet written: a peer that does not read fills the
    // socket, then our buffer.
    let (mut ours, _theirs) = ours_serving(&rustls::version::TLS13).await;
    let chunk = vec![7u8; 64 * 1024];
    loop {
        let wrote = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            ours.write_all(&chunk),
        )
        .await;
        if wrote.is_err() {
            break;
        }
    }
    assert!(!ours.pending_out().is_empty());
    let Err(e) = ours.into_inner() else {
        panic!("into_inner dropped unsent ciphertext");
    };
    assert!(e.to_string().contains("not yet sent"), "{e}");
}

/// A record tampered with on the wire fails the read with rustls's reason,
/// and the peer is told with a fatal alert (TLS 1.2: a plain alert record).
#[tokio::test]
async fn a_tampered_record_is_an_error_and_an_alert() {
    let (mut ours, theirs) = ours_serving(&rustls::version::TLS12).await;
    let (mut tcp, mut conn) = theirs.into_inner();
    std::io::Write::write_all(&mut conn.writer(), b"console bytes").unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    let last = wire.len() - 1;
    wire[last] ^= 0x55;
    tcp.write_all(&wire).await.unwrap();
    let mut buf = [0u8; 64];
    let e = ours.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("decrypt"), "{e}");
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 21, "an alert record: {header:?}");
}

/// The blocking client (the load generator's) against our async server:
/// both ways byte for byte, then a clean close.
#[tokio::test]
async fn blocking_client_both_ways() {
    for version in VERSIONS {
        let (server_cfg, client_cfg) = configs(version);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data = pattern(300_000, 3);
        let sent = data.clone();
        let client = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            let mut tls = ClientTls::connect_blocking(client_cfg, name(), tcp).unwrap();
            for chunk in sent.chunks(10_000) {
                tls.write_all(chunk).unwrap();
            }
            tls.flush().unwrap();
            let mut back = vec![0u8; sent.len()];
            tls.read_exact(&mut back).unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).unwrap();
            (back, rest)
        });
        let (s, _) = l.accept().await.unwrap();
        let mut ours = ServerTls::accept(server_cfg, s).await.unwrap();
        let mut got = vec![0u8; data.len()];
        ours.read_exact(&mut got).await.unwrap();
        assert!(got == data, "{version:?}");
        ours.write_all(&got).await.unwrap();
        ours.shutdown().await.unwrap();
        let (back, rest) = client.await.unwrap();
        assert!(back == data && rest.is_empty(), "{version:?}");
    }
}
