//! Compute-side security profiles, loaded from the configuration: TLS
//! towards QEMU with x509 client certificates from a private CA, and the
//! credentials for VNC, SASL and SPICE authentication.
//!
//! A session's settings are its token's profile (or the default profile)
//! overlaid with the token's own values ([`SessionSecurity`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{Host, Target};
use crate::auth::{ComputeAuth, Secret};
use crate::config::ProfileFile;
use crate::front::tls::provider;

/// A loaded profile.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    /// TLS client configuration (private CA roots, client certificate).
    pub tls: Option<Arc<ClientConfig>>,
    pub server_name: Option<String>,
    pub require_tls: bool,
    pub vnc_password: Option<Secret>,
    pub sasl: Option<(String, Secret)>,
    pub spice_password: Option<Secret>,
}

/// Why a profile could not be loaded (a start-up or reload error).
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("compute profile {profile:?}: reading {path}: {message}")]
    File {
        profile: String,
        path: PathBuf,
        message: String,
    },
    #[error("compute profile {profile:?}: {path} holds no certificate")]
    NoCert { profile: String, path: PathBuf },
    #[error("compute profile {profile:?}: {message}")]
    Tls { profile: String, message: String },
}

/// Every profile, swapped as a whole on reload.
#[derive(Debug, Default)]
pub struct Profiles {
    by_name: HashMap<String, Arc<Profile>>,
    default: Option<String>,
}

fn read_secret(profile: &str, path: &Path) -> Result<Secret, ProfileError> {
    let text = std::fs::read_to_string(path).map_err(|e| ProfileError::File {
        profile: profile.to_owned(),
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}

fn read_certs(profile: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ProfileError> {
    let file_err = |message: String| ProfileError::File {
        profile: profile.to_owned(),
        path: path.to_owned(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(ProfileError::NoCert {
            profile: profile.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn client_config(name: &str, p: &ProfileFile) -> Result<Option<Arc<ClientConfig>>, ProfileError> {
    let Some(ca) = &p.ca else {
        return Ok(None);
    };
    let tls_err = |message: String| ProfileError::Tls {
        profile: name.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(name, ca)? {
        roots
            .add(c)
            .map_err(|e| tls_err(format!("CA certificate {}: {e}", ca.display())))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match (&p.cert, &p.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(name, cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ProfileError::File {
                profile: name.to_owned(),
                path: key.clone(),
                message: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_err(format!("client certificate and key: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    // Secrets are extracted later for kernel TLS offload.
    cfg.enable_secret_extraction = true;
    Ok(Some(Arc::new(cfg)))
}

impl Profiles {
    /// Loads every profile: reads CA, certificates, keys and password files.
    pub fn load(
        specs: &BTreeMap<String, ProfileFile>,
        default: Option<&str>,
    ) -> Result<Self, ProfileError> {
        let mut by_name = HashMap::new();
        for (name, p) in specs {
            let tls = client_config(name, p)?;
            let read = |f: &Option<PathBuf>| f.as_deref().map(|f| read_secret(name, f)).transpose();
            let sasl = match (&p.sasl_username, read(&p.sasl_password_file)?) {
                (Some(u), Some(pw)) => Some((u.clone(), pw)),
                _ => None,
            };
            let profile = Profile {
                name: name.clone(),
                require_tls: p.require_tls.unwrap_or(tls.is_some()),
                tls,
                server_name: p.server_name.clone(),
                vnc_password: read(&p.vnc_password_file)?,
                sasl,
                spice_password: read(&p.spice_password_file)?,
            };
            by_name.insert(name.clone(), Arc::new(profile));
        }
        Ok(Self {
            by_name,
            default: default.map(str::to_owned),
        })
    }

    /// Whether any profile exists.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The profile a token selects (its own, or the default). `Err` names
    /// a profile the configuration lacks.
    pub fn select(&self, name: Option<&str>) -> Result<Option<Arc<Profile>>, String> {
        match name.or(self.default.as_deref()) {
            None => Ok(None),
            Some(n) => self
                .by_name
                .get(n)
                .cloned()
                .map(Some)
                .ok_or_else(|| n.to_owned()),
        }
    }
}

/// Reloadable holder of [`Profiles`].
#[derive(Debug, Default)]
pub struct ProfileSet {
    current: RwLock<Arc<Profiles>>,
}

impl ProfileSet {
    pub fn new(p: Profiles) -> Self {
        Self {
            current: RwLock::new(Arc::new(p)),
        }
    }

    pub fn current(&self) -> Arc<Profiles> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    pub fn replace(&self, p: Profiles) {
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(p),
            Err(e) => *e.into_inner() = Arc::new(p),
        }
    }
}

/// The compute-side settings of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionSecurity {
    /// Profile name, for logs.
    pub profile: Option<String>,
    /// TLS client config and the identity the server certificate must carry.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    pub require_tls: bool,
    pub vnc_password: Option<Secret>,
    pub sasl: Option<(String, Secret)>,
    pub spice_password: Option<Secret>,
}

/// Why a session's compute security could not be put together.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecurityConfigError {
    #[error("token names compute profile {0:?}, which the configuration lacks")]
    UnknownProfile(String),
    #[error("invalid server_name {0:?}")]
    BadServerName(String),
    #[error("TLS to a UNIX socket target needs server_name in the profile or token")]
    NoServerName,
}

impl SessionSecurity {
    /// Overlays the token's settings on its profile.
    pub fn resolve(
        profiles: &Profiles,
        auth: &ComputeAuth,
        target: &Target,
    ) -> Result<Self, SecurityConfigError> {
        let profile = profiles
            .select(auth.profile.as_deref())
            .map_err(SecurityConfigError::UnknownProfile)?;
        let Some(p) = profile else {
            return Ok(Self {
                vnc_password: auth.password.clone(),
                spice_password: auth.password.clone(),
                sasl: token_sasl(auth),
                ..Self::default()
            });
        };
        let tls = match &p.tls {
            None => None,
            Some(cfg) => {
                let name = auth.server_name.as_deref().or(p.server_name.as_deref());
                let server_name = match (name, target) {
                    (Some(n), _) => ServerName::try_from(n.to_owned())
                        .map_err(|_| SecurityConfigError::BadServerName(n.to_owned()))?,
                    (
                        None,
                        Target::Tcp {
                            host: Host::Ip(ip), ..
                        },
                    ) => ServerName::IpAddress((*ip).into()),
                    (
                        None,
                        Target::Tcp {
                            host: Host::Name(n),
                            ..
                        },
                    ) => match n.parse::<IpAddr>() {
                        Ok(ip) => ServerName::IpAddress(ip.into()),
                        Err(_) => ServerName::try_from(n.clone())
                            .map_err(|_| SecurityConfigError::BadServerName(n.clone()))?,
                    },
                    (None, Target::Unix(_)) => return Err(SecurityConfigError::NoServerName),
                };
                Some((Arc::clone(cfg), server_name))
            }
        };
        Ok(Self {
            profile: Some(p.name.clone()),
            tls,
            require_tls: p.require_tls,
            vnc_password: auth.password.clone().or_else(|| p.vnc_password.clone()),
            sasl: token_sasl(auth).or_else(|| p.sasl.clone()),
            spice_password: auth.password.clone().or_else(|| p.spice_password.clone()),
        })
    }
}

fn token_sasl(auth: &ComputeAuth) -> Option<(String, Secret)> {
    match (&auth.sasl_username, &auth.sasl_password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        _ => None,
    }
}
