//! TLS towards the proxy's tenant side (rustls, ring), as a browser would
//! do it: the server certificate is verified against a CA file the operator
//! gives (`--ca`), under a server name (`--server-name`, default localhost).
//! And TLS for the backends ([`server_config`]), for proxies that speak TLS
//! to the compute side too, as consolegate does to QEMU.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Where and how to speak TLS to the proxy.
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl TlsClient {
    /// A client trusting the certificates in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path, server_name: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading CA file {}", ca.display()))?
        {
            let cert = cert.with_context(|| format!("parsing CA file {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("CA certificate in {}", ca.display()))?;
            n += 1;
        }
        if n == 0 {
            bail!("{} holds no PEM certificate", ca.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("bad TLS server name {server_name:?}"))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// A rustls server configuration (ring) from a PEM chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("server certificate and key")?;
    Ok(Arc::new(config))
}
