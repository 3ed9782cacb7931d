//! Tenant-facing TLS (rustls, TLS 1.3 and 1.2), reloadable.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the tenant certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error("reading certificate {path}: {message}")]
    Cert { path: String, message: String },
    #[error("reading private key {path}: {message}")]
    Key { path: String, message: String },
    #[error("certificate {path} holds no certificate")]
    NoCert { path: String },
    #[error("certificate and key do not fit together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere (ring: no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM chain and key into a server config.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsLoadError> {
    let cpath = cert.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsLoadError::Cert {
            path: cpath.clone(),
            message: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsLoadError::Cert {
            path: cpath.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsLoadError::NoCert { path: cpath });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsLoadError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Secrets are extracted after the handshake phase for kernel TLS.
    cfg.enable_secret_extraction = true;
    Ok(cfg)
}

/// The current tenant TLS configuration; swapped on reload, read per accept.
#[derive(Debug)]
pub struct TenantTls {
    current: RwLock<Arc<ServerConfig>>,
}

impl TenantTls {
    pub fn new(cfg: ServerConfig) -> Self {
        Self {
            current: RwLock::new(Arc::new(cfg)),
        }
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Replaces the configuration; live sessions keep theirs.
    pub fn replace(&self, cfg: ServerConfig) {
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(cfg),
            Err(p) => *p.into_inner() = Arc::new(cfg),
        }
    }
}
