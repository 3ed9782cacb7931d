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
mod tests;
