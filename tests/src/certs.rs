//! A throw-away CA and a server certificate (SANs 127.0.0.1, ::1, localhost)
//! written as PEM files, plus a rustls client config that trusts that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_path: PathBuf,
}

impl TestPki {
    /// Generates a CA and a server certificate under `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "consolegate test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "consolegate test server");
        let cert = params.signed_by(&key, &issuer)?;

        std::fs::create_dir_all(dir)?;
        let cert_path = dir.join("server.pem");
        let key_path = dir.join("server.key");
        let ca_path = dir.join("ca.pem");
        // Full chain: leaf then CA.
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca_cert.pem()))?;
        std::fs::write(&key_path, key.serialize_pem())?;
        std::fs::write(&ca_path, ca_cert.pem())?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            cert_path,
            key_path,
            ca_path,
        })
    }

    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        client_config_trusting(self.ca_pem.as_bytes())
    }
}

/// A ring-backed rustls client config whose only roots are the PEM
/// certificates in `pem` (a CA, or a self-signed server certificate).
pub fn client_config_trusting(pem: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.context("parsing PEM certificate")?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
