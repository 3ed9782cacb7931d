//! kTLS without the proxy: which ciphers the kernel takes keys for, and a
//! rustls client and server over loopback, both handed to kTLS after the
//! handshake (the `ktls` crate: `TCP_ULP "tls"`, `TLS_TX`, `TLS_RX`), moving
//! random bytes both ways, checked byte for byte.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use consolegate_tests::compute::Ca;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::report;

/// Prints the kernel's kTLS cipher table; fails if it takes none.
pub async fn probe() -> anyhow::Result<()> {
    let c = ktls::CompatibleCiphers::new()
        .await
        .context("probing kTLS ciphers")?;
    let row = |v: &ktls::CompatibleCiphersForVersion| {
        format!(
            "aes-gcm-128={} aes-gcm-256={} chacha20-poly1305={}",
            v.aes_gcm_128, v.aes_gcm_256, v.chacha20_poly1305
        )
    };
    report("ciphers-tls13", row(&c.tls13));
    report("ciphers-tls12", row(&c.tls12));
    anyhow::ensure!(
        c.tls13.aes_gcm_128 || c.tls13.aes_gcm_256 || c.tls12.aes_gcm_128 || c.tls12.aes_gcm_256,
        "the kernel takes no AES-GCM kTLS keys (setsockopt TCP_ULP \"tls\" / TLS_TX refused)"
    );
    Ok(())
}

/// One rustls pair per (version, suite), both ends on kTLS.
pub async fn transfer() -> anyhow::Result<()> {
    use rustls::crypto::ring::cipher_suite as cs;
    let cases = [
        ("tls13-aes-128-gcm", cs::TLS13_AES_128_GCM_SHA256),
        ("tls13-aes-256-gcm", cs::TLS13_AES_256_GCM_SHA384),
        (
            "tls12-aes-256-gcm",
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
    ];
    for (name, suite) in cases {
        pair(name, suite)
            .await
            .with_context(|| format!("direct kTLS pair {name}"))?;
    }
    Ok(())
}

async fn pair(name: &str, suite: rustls::SupportedCipherSuite) -> anyhow::Result<()> {
    let ca = Ca::new("guest direct CA");
    let (cert, key) = ca.leaf("guest direct", &["127.0.0.1"], false);
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let version = suite.version();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[version])?
        .with_no_client_auth()
        .with_single_cert(certs, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?;
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(c?)?;
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let down = random(8 << 20);
    let up = random(2 << 20);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let started = Instant::now();
    let (down2, up2) = (down.clone(), up.clone());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let tls = acceptor.accept(ktls::CorkStream::new(tcp)).await?;
        let k = ktls::config_ktls_server(tls)
            .await
            .map_err(|e| anyhow::anyhow!("config_ktls_server: {e:?}"))?;
        let mut got = vec![0u8; up2.len()];
        exchange(k, &down2, &mut got).await?;
        anyhow::ensure!(got == up2, "server received different bytes");
        anyhow::Ok(())
    });
    let tcp = TcpStream::connect(addr).await?;
    let tls = connector
        .connect(
            ServerName::IpAddress(addr.ip().into()),
            ktls::CorkStream::new(tcp),
        )
        .await?;
    let k = ktls::config_ktls_client(tls)
        .await
        .map_err(|e| anyhow::anyhow!("config_ktls_client: {e:?}"))?;
    let mut got = vec![0u8; down.len()];
    exchange(k, &up, &mut got).await?;
    anyhow::ensure!(got == down, "client received different bytes");
    server_side.await??;
    let secs = started.elapsed().as_secs_f64();
    let mib = (down.len() + up.len()) as f64 / f64::from(1 << 20);
    report(
        &format!("direct-{name}"),
        format!("ok {mib:.0} MiB in {secs:.2} s ({:.1} MiB/s)", mib / secs),
    );
    Ok(())
}

/// Writes all of `out` while reading exactly `into.len()` bytes on one
/// kTLS stream.
async fn exchange<S>(s: S, out: &[u8], into: &mut [u8]) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(s);
    let (wrote, read) = tokio::join!(
        async {
            w.write_all(out).await?;
            w.flush().await
        },
        r.read_exact(into)
    );
    wrote.context("kTLS write")?;
    read.context("kTLS read")?;
    Ok(())
}

pub fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::fill(&mut v[..]);
    v
}
