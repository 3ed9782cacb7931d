//! The hand-over's unit tests: real rustls peers over loopback TCP.

use super::*;
use crate::tls_stream::tests::configs;

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (s, c)
}

fn localhost() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("localhost").unwrap()
}

/// Both our TLS legs over loopback, each on a cork: (server, client).
async fn corked_pair(
    server_cfg: std::sync::Arc<rustls::ServerConfig>,
    client_cfg: std::sync::Arc<rustls::ClientConfig>,
) -> (
    crate::tls_stream::ServerTls<Cork<TcpStream>>,
    crate::tls_stream::ClientTls<Cork<TcpStream>>,
) {
    let (s, c) = tcp_pair().await;
    let (server, client) = tokio::join!(
        crate::tls_stream::ServerTls::accept(server_cfg, Cork::new(s)),
        crate::tls_stream::ClientTls::connect(client_cfg, localhost(), Cork::new(c)),
    );
    (server.unwrap(), client.unwrap())
}

/// Reads one whole TLS record from a raw socket; returns its type.
/// The next TLS record from the peer's side: header and body.
async fn read_record(s: &mut TcpStream) -> ([u8; 5], Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut h = [0u8; 5];
    s.read_exact(&mut h).await.unwrap();
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (h, body)
}

/// The type and length of the next TLS record.
async fn raw_record(s: &mut TcpStream) -> (u8, usize) {
    let (h, body) = read_record(s).await;
    (h[0], body.len())
}

/// The hand-over without the kernel part: after the handshake and a
/// partial read, draining returns exactly the plaintext rustls had
/// decrypted, the socket is left at a record boundary holding the next
/// record untouched, and the secrets can be turned into kernel key
/// structures. Both legs (rustls server = tenant, client = compute),
/// TLS 1.2 and 1.3.
#[tokio::test]
async fn drain_stops_at_the_record_boundary_and_loses_nothing() {
    use tokio::io::AsyncReadExt as _;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let (server_cfg, client_cfg) = configs(version);
        let (mut server, mut client) = corked_pair(server_cfg, client_cfg).await;
        // Each write_all + flush is one record.
        for data in [&b"hello"[..], b"world"] {
            client.write_all(data).await.unwrap();
            client.flush().await.unwrap();
        }
        for data in [&b"console"[..], b"more"] {
            server.write_all(data).await.unwrap();
            server.flush().await.unwrap();
        }
        let mut three = [0u8; 3];
        server.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"hel");
        let mut four = [0u8; 4];
        client.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"cons");
        // Let the second records arrive before draining.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (mut s_sock, drained, conn) = drain(server).await.unwrap();
        assert_eq!(drained.bytes, b"lo", "{version:?}");
        assert!(!drained.peer_closed);
        assert_eq!(
            raw_record(&mut s_sock).await,
            (23, raw_len(version, 5)),
            "{version:?}"
        );
        let (tx, rx, keys) = crypto_info(conn, "tenant", true, None).unwrap();
        assert!(tx.size() > 0 && rx.size() > 0);
        let tls13 = version.version == rustls::ProtocolVersion::TLSv1_3;
        assert_eq!(
            keys.rekey.is_some(),
            tls13,
            "successor keys for TLS 1.3 only"
        );
        // AES-GCM: renewed (or the session ended) just under 2^24
        // records (TLS 1.3 and 1.2 alike in rustls's providers).
        let limit = keys.tx.as_ref().expect("AES-GCM keys have a record limit");
        assert_eq!(limit.at(), (1 << 24) - LIMIT_MARGIN, "{version:?}");
        let (mut c_sock, drained, conn) = drain(client).await.unwrap();
        assert_eq!(drained.bytes, b"ole", "{version:?}");
        assert!(!drained.peer_closed);
        assert_eq!(
            raw_record(&mut c_sock).await,
            (23, raw_len(version, 4)),
            "{version:?}"
        );
        let (_, _, keys) = crypto_info(conn, "compute", false, Some(1000)).unwrap();
        assert!(
            keys.rekey.is_none(),
            "no successor keys where the kernel cannot rekey"
        );
        let limit = keys.tx.as_ref().expect("a configured limit");
        assert_eq!(limit.at(), 1000, "a configured limit lowers the suite's");
    }
}

/// A close_notify behind the data stays on the socket for the kernel
/// to report (rustls never reads ahead of the record in use); one that
/// rustls has already read is reported as `peer_closed`.
#[tokio::test]
async fn close_notify_is_left_for_the_kernel_or_reported() {
    use tokio::io::AsyncReadExt as _;
    for read_to_end in [false, true] {
        let (server_cfg, client_cfg) = configs(&rustls::version::TLS13);
        let (mut server, mut client) = corked_pair(server_cfg, client_cfg).await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut five = [0u8; 5];
        server.read_exact(&mut five).await.unwrap();
        if read_to_end {
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"words");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (mut sock, drained, _conn) = drain(server).await.unwrap();
        if read_to_end {
            assert!(drained.bytes.is_empty() && drained.peer_closed);
        } else {
            assert_eq!(drained.bytes, b"words");
            assert!(!drained.peer_closed);
            // TLS 1.3 hides the alert type: an encrypted 2-byte record.
            assert_eq!(raw_record(&mut sock).await, (23, 2 + 1 + 16));
        }
    }
}

/// A peer's KeyUpdate asking for ours, arriving as the hand-over
/// begins: the drain completes its record and rustls takes it. rustls
/// seals its answer at once, under the key it then leaves, but sends it
/// only ahead of our next application data, while the secrets it gives
/// up count it as sent. The hand-over sends exactly that answer first,
/// on any kernel: the peer opens it with the key it reads with, nothing
/// of ours follows, and the kernel's keys start after it (record 0 of
/// the next keys, both ways). A padded KeyUpdate (RFC 8446 5.4; sealed
/// by hand, since rustls never pads) is answered the same way.
#[tokio::test]
async fn a_key_update_taken_by_the_drain_is_answered_exactly_before_the_hand_over() {
    use std::time::Duration;
    for padded in [false, true] {
        let (server, mut tcp, (seq, keys)) = server_taking_a_key_update_in_the_drain(padded).await;
        let (_sock, drained, conn) = tokio::time::timeout(Duration::from_secs(5), drain(server))
            .await
            .expect("drain hangs")
            .unwrap();
        assert!(drained.bytes.is_empty() && !drained.peer_closed);
        let (header, body) = tokio::time::timeout(Duration::from_secs(5), read_record(&mut tcp))
            .await
            .expect("the answer never came");
        assert_eq!(
            open_record(&keys, seq, header, body),
            [24, 0, 0, 1, 0, 22],
            "our KeyUpdate, not asking for the peer's (padded: {padded})"
        );
        let more = tokio::time::timeout(Duration::from_millis(200), read_record(&mut tcp)).await;
        assert!(more.is_err(), "nothing of ours after the answer");
        let (secrets, _) = conn.into_kernel().unwrap();
        assert_eq!((secrets.tx.0, secrets.rx.0), (0, 0), "padded: {padded}");
    }
}

/// A TLS 1.3 server leg (ours), the peer's socket, and the key the
/// peer reads with (its record number and secrets). The peer's
/// KeyUpdate (asking for ours) is cut inside its header: the first three
/// bytes read before the hand-over, the rest left for the drain.
/// `padded`: the KeyUpdate carries 100 bytes of padding, sealed by hand
/// with the peer's keys; otherwise rustls seals it.
async fn server_taking_a_key_update_in_the_drain(
    padded: bool,
) -> (
    crate::tls_stream::ServerTls<Cork<TcpStream>>,
    TcpStream,
    (u64, rustls::ConnectionTrafficSecrets),
) {
    use std::time::Duration;
    use tokio::io::AsyncReadExt as _;
    let (server_cfg, client_cfg) = configs(&rustls::version::TLS13);
    let (s, c) = tcp_pair().await;
    let (server, client) = tokio::join!(
        crate::tls_stream::ServerTls::accept(server_cfg, Cork::new(s)),
        tokio_rustls::TlsConnector::from(client_cfg).connect(localhost(), c),
    );
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    // The session tickets of the handshake: the peer takes them first,
    // so that its record count is right.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await;
    assert!(read.is_err(), "no application data from our leg");
    let (mut tcp, mut conn) = client.into_inner();
    let (wire, reads_with) = if padded {
        let secrets = conn.dangerous_extract_secrets().unwrap();
        let (seq, keys) = secrets.tx;
        (
            seal_record(&keys, seq, &[24, 0, 0, 1, 1, 22], 100),
            secrets.rx,
        )
    } else {
        conn.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        assert_eq!(wire.len(), 5 + 22, "one KeyUpdate record");
        (wire, conn.dangerous_extract_secrets().unwrap().rx)
    };
    tcp.write_all(&wire[..3]).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await;
    assert!(read.is_err(), "no application data yet");
    tcp.write_all(&wire[3..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    (server, tcp, reads_with)
}

/// A TLS 1.3 AEAD key of `keys` and its IV (ring).
fn aead_key(keys: &rustls::ConnectionTrafficSecrets) -> (ring::aead::LessSafeKey, [u8; 12]) {
    use rustls::ConnectionTrafficSecrets as K;
    let (alg, key, iv) = match keys {
        K::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
        K::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
        K::Chacha20Poly1305 { key, iv } => (&ring::aead::CHACHA20_POLY1305, key, iv),
        _ => panic!("not a TLS 1.3 AEAD suite"),
    };
    let key = ring::aead::UnboundKey::new(alg, key.as_ref()).unwrap();
    (
        ring::aead::LessSafeKey::new(key),
        iv.as_ref().try_into().unwrap(),
    )
}

/// The TLS 1.3 nonce of record `seq`: the IV with the number XORed in.
fn nonce(mut iv: [u8; 12], seq: u64) -> ring::aead::Nonce {
    for (b, s) in iv[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    ring::aead::Nonce::assume_unique_for_key(iv)
}

/// A TLS 1.3 record of `inner` (the content and its type byte) and
/// `pad` zero bytes, sealed with `keys` as record `seq`.
fn seal_record(
    keys: &rustls::ConnectionTrafficSecrets,
    seq: u64,
    inner: &[u8],
    pad: usize,
) -> Vec<u8> {
    let (key, iv) = aead_key(keys);
    let mut body = inner.to_vec();
    body.resize(inner.len() + pad, 0);
    let len = u16::try_from(body.len() + key.algorithm().tag_len()).unwrap();
    let [hi, lo] = len.to_be_bytes();
    let header = [23, 3, 3, hi, lo];
    key.seal_in_place_append_tag(nonce(iv, seq), ring::aead::Aad::from(header), &mut body)
        .unwrap();
    [&header[..], &body].concat()
}

/// The inner plaintext (content and type byte) of a TLS 1.3 record
/// sealed with `keys` as record `seq`.
fn open_record(
    keys: &rustls::ConnectionTrafficSecrets,
    seq: u64,
    header: [u8; 5],
    mut body: Vec<u8>,
) -> Vec<u8> {
    let (key, iv) = aead_key(keys);
    key.open_in_place(nonce(iv, seq), ring::aead::Aad::from(header), &mut body)
        .expect("sealed with the peer's read key at its record number")
        .to_vec()
}

/// The size of an application-data record with `n` plaintext bytes
/// (AES-GCM: 16-byte tag; TLS 1.3 adds the inner type byte, TLS 1.2 an
/// 8-byte explicit nonce).
fn raw_len(version: &rustls::SupportedProtocolVersion, n: usize) -> usize {
    if version.version == rustls::ProtocolVersion::TLSv1_3 {
        n + 1 + 16
    } else {
        n + 8 + 16
    }
}

#[test]
fn suites_map_to_kernel_ciphers() {
    assert_eq!(
        kernel_cipher(CipherSuite::TLS13_AES_256_GCM_SHA384),
        Some((TlsVersion::Tls13, Cipher::AesGcm256))
    );
    assert_eq!(
        kernel_cipher(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
        Some((TlsVersion::Tls12, Cipher::AesGcm128))
    );
    assert_eq!(
        kernel_cipher(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
        Some((TlsVersion::Tls12, Cipher::Chacha20Poly1305))
    );
    assert_eq!(
        kernel_cipher(CipherSuite::TLS_RSA_WITH_AES_128_CBC_SHA),
        None
    );
}

#[test]
fn every_ring_suite_is_known() {
    for s in rustls::crypto::ring::default_provider().cipher_suites {
        assert!(kernel_cipher(s.suite()).is_some(), "{:?}", s.suite());
    }
}

#[test]
fn off_offloads_nothing_and_says_why() {
    let (o, why) = Offload::probe(KtlsMode::Off);
    assert!(!o.enabled());
    assert!(why.unwrap().contains("off"));
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    assert!(
        o.check(Some(suite))
            .unwrap_err()
            .contains("does not offload")
    );
    assert!(o.check(None).is_err());
}

/// The probe agrees with itself: a cipher it lists is accepted, and a
/// kernel without the tls module says so.
#[test]
fn probe_matches_the_kernel() {
    let (o, why) = Offload::probe(KtlsMode::Auto);
    match crate::sys::probe::ktls() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            assert!(!o.enabled());
            assert!(why.unwrap().contains("ENOENT"));
        }
        _ => {
            if o.enabled() {
                assert!(why.is_none());
                assert!(!o.ciphers().is_empty());
            }
        }
    }
}
