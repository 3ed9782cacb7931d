//! Kernel TLS offload of a session's TLS legs, the `ktls+splice` rung of
//! the data-path ladder.
//!
//! At start, [`Offload::start`] probes once which (TLS version, cipher)
//! pairs this kernel takes keys for and logs the result (or why kTLS is not
//! used) a single time. After the handshake phase of a session, each rustls
//! leg whose negotiated suite the kernel offloads is handed over: rustls is
//! drained to the record boundary (the [`Cork`] under it never read
//! further), its secrets go to the socket (`ktls` crate for the key
//! structures, `sys::ktls::install` for `TCP_ULP`, `TLS_TX`, `TLS_RX`), and the plaintext rustls had decrypted but nobody
//! consumed is returned to go to the other side first. Only when every TLS
//! leg can be handed over (and the other legs are plain sockets) is any leg
//! touched; otherwise the session stays on rustls and the copy, with the
//! reason logged once for the session.

mod cork;
mod rekey;
mod rung;

use std::io;
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex};

pub use cork::Cork;
pub use rekey::{LIMIT_MARGIN, Rekey, SharedRekey, TxLimit, Why, lock, poll_key_update};
pub use rung::{pump_raw, pump_ws};
use rustls::CipherSuite;
use rustls::kernel::KernelConnection;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::config::kernel::KtlsMode;
use crate::console::{ComputeStream, ComputeTls};
use crate::front::TenantTls;
use crate::sys::ktls::{Cipher, TlsVersion, probe_cipher, probe_rekey};
use crate::tls_stream::{Side, TlsStream};

/// The data-path label of sessions whose TLS legs run in the kernel.
pub const LABEL: &str = "ktls+splice";

/// What the kernel offloads, probed once at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    /// `[TLS 1.2, TLS 1.3] x [AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305]`;
    /// all false when kTLS is off or absent.
    table: [[bool; 3]; 2],
    /// The kernel takes new TLS 1.3 keys (Linux 6.14+): a peer's KeyUpdate
    /// is followed rather than ending the session.
    rekey: bool,
    /// `kernel.ktls_records_per_key`: renew a kTLS transmit key after at
    /// most this many records (default: its cipher's limit).
    records_per_key: Option<u64>,
}

fn vi(v: TlsVersion) -> usize {
    match v {
        TlsVersion::Tls12 => 0,
        TlsVersion::Tls13 => 1,
    }
}

fn ci(c: Cipher) -> usize {
    match c {
        Cipher::AesGcm128 => 0,
        Cipher::AesGcm256 => 1,
        Cipher::Chacha20Poly1305 => 2,
    }
}

/// The kernel cipher a rustls suite needs, if the kernel has one for it.
pub fn kernel_cipher(suite: CipherSuite) -> Option<(TlsVersion, Cipher)> {
    use CipherSuite as S;
    Some(match suite {
        S::TLS13_AES_128_GCM_SHA256 => (TlsVersion::Tls13, Cipher::AesGcm128),
        S::TLS13_AES_256_GCM_SHA384 => (TlsVersion::Tls13, Cipher::AesGcm256),
        S::TLS13_CHACHA20_POLY1305_SHA256 => (TlsVersion::Tls13, Cipher::Chacha20Poly1305),
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            (TlsVersion::Tls12, Cipher::AesGcm128)
        }
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            (TlsVersion::Tls12, Cipher::AesGcm256)
        }
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            (TlsVersion::Tls12, Cipher::Chacha20Poly1305)
        }
        _ => return None,
    })
}

impl Offload {
    /// Nothing is offloaded.
    pub const NONE: Offload = Offload {
        table: [[false; 3]; 2],
        rekey: false,
        records_per_key: None,
    };

    /// Probes the kernel (unless `mode` is off) and logs once what the
    /// TLS legs of this process will run on.
    pub fn start(mode: KtlsMode) -> Offload {
        let (offload, why_not) = Self::probe(mode);
        cork::set_record_aligned(offload.enabled());
        match why_not {
            None => tracing::info!(
                ciphers = %offload.ciphers().join(","),
                rekey = offload.rekey,
                "kTLS available: TLS legs are handed to the kernel after the handshake{}",
                if offload.rekey {
                    ""
                } else {
                    " (this kernel cannot renew kTLS keys: a TLS 1.3 KeyUpdate ends the session)"
                }
            ),
            Some(reason) => tracing::info!(
                reason = %reason,
                "kTLS unavailable: TLS sessions use rustls and the copy"
            ),
        }
        offload
    }

    /// Probes without logging; the second value says why nothing is
    /// offloaded.
    pub fn probe(mode: KtlsMode) -> (Offload, Option<String>) {
        if mode == KtlsMode::Off {
            return (Self::NONE, Some("kernel.ktls = \"off\"".to_owned()));
        }
        let mut table = [[false; 3]; 2];
        let mut first_err = None;
        for v in TlsVersion::ALL {
            for c in Cipher::ALL {
                match probe_cipher(v, c) {
                    Ok(()) => table[vi(v)][ci(c)] = true,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        let rekey = table[vi(TlsVersion::Tls13)][ci(Cipher::AesGcm128)] && probe_rekey().is_ok();
        let offload = Offload {
            table,
            rekey,
            records_per_key: None,
        };
        if !offload.enabled() {
            let reason = match first_err {
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    "the kernel lacks kTLS (TCP_ULP \"tls\": ENOENT, the tls module is absent)"
                        .to_owned()
                }
                Some(e) => format!("kTLS set-up refused: {e}"),
                None => "no cipher offloaded".to_owned(),
            };
            return (offload, Some(reason));
        }
        (offload, None)
    }

    /// Whether any leg could be offloaded.
    pub fn enabled(&self) -> bool {
        self.table != Self::NONE.table
    }

    /// Whether the kernel takes new TLS 1.3 keys (a peer's KeyUpdate is
    /// followed on kTLS legs).
    pub fn rekey(&self) -> bool {
        self.rekey
    }

    /// With a configured number of records after which a kTLS transmit
    /// key is renewed (`kernel.ktls_records_per_key`).
    pub fn with_records_per_key(self, records_per_key: Option<u64>) -> Self {
        Self {
            records_per_key,
            ..self
        }
    }

    /// What the kernel offloads, as `TLS1.3/AES-128-GCM` names.
    pub fn ciphers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for v in TlsVersion::ALL {
            for c in Cipher::ALL {
                if self.table[vi(v)][ci(c)] {
                    out.push(format!("{}/{}", v.name(), c.name()));
                }
            }
        }
        out
    }

    /// Whether a leg that negotiated `suite` can be offloaded; the reason
    /// if not.
    pub fn check(&self, suite: Option<rustls::SupportedCipherSuite>) -> Result<(), String> {
        let Some(suite) = suite else {
            return Err("no negotiated cipher suite".to_owned());
        };
        match kernel_cipher(suite.suite()) {
            Some((v, c)) if self.table[vi(v)][ci(c)] => Ok(()),
            Some((v, c)) => Err(format!(
                "the kernel does not offload {}/{} ({:?})",
                v.name(),
                c.name(),
                suite.suite()
            )),
            None => Err(format!(
                "cipher suite {:?} has no kTLS cipher",
                suite.suite()
            )),
        }
    }

    /// Whether the tenant leg can be offloaded.
    pub fn check_tenant(&self, s: &TenantTls) -> Result<(), String> {
        self.check(s.get_ref().1.negotiated_cipher_suite())
            .map_err(|r| format!("tenant leg: {r}"))
    }

    /// Whether the compute leg can be offloaded (TCP only).
    pub fn check_compute(&self, s: &ComputeTls) -> Result<(), String> {
        if !matches!(s.get_ref().0.io, ComputeStream::Tcp(_)) {
            return Err("compute leg: kTLS needs a TCP socket".to_owned());
        }
        self.check(s.get_ref().1.negotiated_cipher_suite())
            .map_err(|r| format!("compute leg: {r}"))
    }
}

/// A leg after the hand-over: the kTLS socket and the plaintext rustls had
/// decrypted but nobody read (it goes to the other side first).
#[derive(Debug)]
pub struct Handed {
    pub socket: TcpStream,
    pub drained: Vec<u8>,
    /// The peer had already sent close_notify (rustls read it).
    pub peer_closed: bool,
    /// What the directions of the socket keep beside it.
    pub keys: KtlsKeys,
}

/// What the directions of a kTLS socket keep beside it.
#[derive(Debug, Default)]
pub struct KtlsKeys {
    /// What follows a KeyUpdate (TLS 1.3 on a kernel that takes new
    /// keys), shared by the direction reading the socket and the one
    /// writing it.
    pub rekey: Option<SharedRekey>,
    /// The transmit key's record limit, for the direction writing it
    /// (`None`: the cipher has none and none is configured).
    pub tx: Option<Box<TxLimit>>,
}

/// Flushes, corks and drains a TLS leg: the transport (at a record
/// boundary), the plaintext rustls had decrypted, and the connection. An
/// answer to a peer's KeyUpdate that rustls still held goes out first:
/// the secrets it gives up count it as sent.
pub async fn drain<IO: AsyncRead + AsyncWrite + Unpin, C: Side>(
    mut s: TlsStream<Cork<IO>, C>,
) -> io::Result<(IO, cork::Drained, C)> {
    s.flush().await?;
    s.get_mut().0.cork();
    let drained = cork::drain(&mut s).await?;
    if s.send_held().await? {
        tracing::info!("a TLS 1.3 KeyUpdate arrived at the kTLS hand-over: answered before it");
    }
    let (cork, conn) = s.into_inner()?;
    Ok((cork.io, drained, conn))
}

/// The kernel's key material for both directions of a drained connection,
/// and what the socket's directions keep beside it: (with `rekey`, for
/// TLS 1.3) what computes the keys after them, and the transmit key's
/// record limit (the suite's, or `per_key` if lower).
pub fn crypto_info<C: Side>(
    conn: C,
    leg: &'static str,
    rekey: bool,
    per_key: Option<u64>,
) -> io::Result<(ktls::CryptoInfo, ktls::CryptoInfo, KtlsKeys)>
where
    KernelConnection<C::Data>: Send + Sync + 'static,
{
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or_else(|| io::Error::other("no negotiated cipher suite"))?;
    let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let (secrets, kernel) = conn
        .into_kernel()
        .map_err(|e| io::Error::other(format!("extracting the TLS secrets: {e}")))?;
    let (cipher, suite_limit) = match kernel_cipher(suite.suite()) {
        Some((_, c)) => (c, confidentiality_limit(suite)),
        None => return Err(io::Error::other("the suite has no kernel cipher")),
    };
    let sealed = secrets.tx.0;
    let tx = ktls::CryptoInfo::from_rustls(suite, secrets.tx).map_err(io::Error::other)?;
    let rx = ktls::CryptoInfo::from_rustls(suite, secrets.rx).map_err(io::Error::other)?;
    let rekey = (rekey && tls13).then(|| Arc::new(Mutex::new(Rekey::new(kernel, suite, leg))));
    let limit = TxLimit::new(rekey.clone(), cipher, suite_limit, per_key, sealed);
    Ok((
        tx,
        rx,
        KtlsKeys {
            rekey,
            tx: limit.map(Box::new),
        },
    ))
}

/// How many records one key of `suite` may seal.
fn confidentiality_limit(suite: rustls::SupportedCipherSuite) -> u64 {
    match suite {
        rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
    }
}

/// Gives a drained leg's keys to the kernel: the socket is a kTLS socket
/// from here on, and what rustls had decrypted goes on with it.
fn install<C: Side>(
    leg: &'static str,
    socket: TcpStream,
    conn: C,
    drained: cork::Drained,
    offload: &Offload,
) -> io::Result<Handed>
where
    KernelConnection<C::Data>: Send + Sync + 'static,
{
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    let keys = crypto_info(conn, leg, offload.rekey, offload.records_per_key)
        .and_then(|(tx, rx, keys)| {
            crate::sys::ktls::install(socket.as_fd(), &tx, &rx)?;
            Ok(keys)
        })
        .map_err(|e| io::Error::other(format!("kTLS set-up of the {leg} leg failed: {e}")))?;
    tracing::info!(
        leg,
        cipher = %cipher,
        rekey = keys.rekey.is_some(),
        records_per_key = keys.tx.as_ref().map(|t| t.at()),
        "ktls enabled"
    );
    tracing::debug!(
        leg,
        drained = drained.bytes.len(),
        drained.peer_closed,
        "rustls drained"
    );
    Ok(Handed {
        socket,
        drained: drained.bytes,
        peer_closed: drained.peer_closed,
        keys,
    })
}

/// Hands the tenant leg to the kernel. Call only after
/// [`Offload::check_tenant`]; on error the connection is lost.
pub async fn tenant(s: Box<TenantTls>, offload: &Offload) -> io::Result<Handed> {
    let (socket, drained, conn) = drain(*s).await?;
    install("tenant", socket, conn, drained, offload)
}

/// Hands the compute leg to the kernel. Call only after
/// [`Offload::check_compute`]; on error the connection is lost.
pub async fn compute(s: Box<ComputeTls>, offload: &Offload) -> io::Result<Handed> {
    let (stream, drained, conn) = drain(*s).await?;
    let ComputeStream::Tcp(socket) = stream else {
        return Err(io::Error::other("kTLS on a compute leg that is not TCP"));
    };
    install("compute", socket, conn, drained, offload)
}

#[cfg(test)]
mod tests {
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
            let (server, mut tcp, (seq, keys)) =
                server_taking_a_key_update_in_the_drain(padded).await;
            let (_sock, drained, conn) =
                tokio::time::timeout(Duration::from_secs(5), drain(server))
                    .await
                    .expect("drain hangs")
                    .unwrap();
            assert!(drained.bytes.is_empty() && !drained.peer_closed);
            let (header, body) =
                tokio::time::timeout(Duration::from_secs(5), read_record(&mut tcp))
                    .await
                    .expect("the answer never came");
            assert_eq!(
                open_record(&keys, seq, header, body),
                [24, 0, 0, 1, 0, 22],
                "our KeyUpdate, not asking for the peer's (padded: {padded})"
            );
            let more =
                tokio::time::timeout(Duration::from_millis(200), read_record(&mut tcp)).await;
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
}
