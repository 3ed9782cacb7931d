//! VNC: the proxy terminates the RFB security phase on both sides.
//!
//! Towards the compute host it speaks whatever the server and the
//! configuration allow (None, VNC Authentication, VeNCrypt X509* with TLS
//! and a client certificate, SASL SCRAM), choosing the strongest; towards the
//! tenant it always offers RFB 3.8 with security type None, because the
//! token already authenticated the tenant. From ClientInit/ServerInit on,
//! bytes pass through untouched.

pub mod rfb;
mod sasl;

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use self::rfb::{Capabilities, NoChoice, RfbError, Version, sec, vencrypt};
use super::security::SessionSecurity;
use super::{ComputeIo, ComputeStream};

/// Why the compute-side security phase failed. Variants are named after
/// the step; `tenant_reason` is what the tenant may see.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error("compute closed the connection or failed during {step}: {source}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
    #[error("compute sent an invalid {step}: {source}")]
    Protocol {
        step: &'static str,
        source: RfbError,
    },
    #[error("compute refused the connection: {0}")]
    ServerRefused(String),
    #[error("{0}")]
    NoChoice(#[from] NoChoice),
    #[error("compute rejected VeNCrypt subtype {0}")]
    SubtypeRejected(String),
    #[error("compute VeNCrypt version not accepted")]
    VencryptRefused,
    #[error("compute TLS handshake failed: {0}")]
    Tls(String),
    #[error("compute rejected the credentials ({method}): {reason}")]
    AuthFailed { method: String, reason: String },
    #[error(
        "compute offers SASL mechanisms [{offered}], none of which consolegate supports (SCRAM-SHA-256, SCRAM-SHA-1)"
    )]
    SaslNoMechanism { offered: String },
    #[error("SASL {mechanism}: {message}")]
    Sasl { mechanism: String, message: String },
    #[error("{0} is required for this security type but not configured")]
    MissingCredential(&'static str),
}

impl VncError {
    /// A short reason for the tenant: what failed, without internal detail.
    pub fn tenant_reason(&self) -> &'static str {
        match self {
            VncError::Io { .. } | VncError::Protocol { .. } | VncError::VencryptRefused => {
                "console server failed during the security handshake"
            }
            VncError::ServerRefused(_) => "console server refused the connection",
            VncError::NoChoice(_)
            | VncError::SaslNoMechanism { .. }
            | VncError::SubtypeRejected(_) => {
                "console server security settings not supported by the proxy configuration"
            }
            VncError::Tls(_) => "TLS to the console server failed",
            VncError::AuthFailed { .. } | VncError::Sasl { .. } => {
                "the proxy could not authenticate to the console server"
            }
            VncError::MissingCredential(_) => "console credentials are not configured",
        }
    }

    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            VncError::Io { .. } => "compute_io",
            VncError::Protocol { .. } => "compute_protocol",
            VncError::ServerRefused(_) => "compute_refused",
            VncError::NoChoice(_) => "no_common_security",
            VncError::SubtypeRejected(_) => "vencrypt_subtype_rejected",
            VncError::VencryptRefused => "vencrypt_version_rejected",
            VncError::Tls(_) => "compute_tls",
            VncError::AuthFailed { .. } => "compute_auth_failed",
            VncError::SaslNoMechanism { .. } => "sasl_no_mechanism",
            VncError::Sasl { .. } => "sasl_failed",
            VncError::MissingCredential(_) => "missing_credential",
        }
    }
}

/// What the compute-side negotiation settled on, for the session span.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub version: Version,
    /// e.g. "None", "VNC", "VeNCrypt/X509SASL (SCRAM-SHA-256)".
    pub security: String,
    pub tls: bool,
}

fn io(step: &'static str) -> impl FnOnce(io::Error) -> VncError {
    move |source| VncError::Io { step, source }
}

async fn read_u8<S: AsyncRead + Unpin>(s: &mut S, step: &'static str) -> Result<u8, VncError> {
    s.read_u8().await.map_err(io(step))
}

async fn read_u32<S: AsyncRead + Unpin>(s: &mut S, step: &'static str) -> Result<u32, VncError> {
    s.read_u32().await.map_err(io(step))
}

async fn read_reason<S: AsyncRead + Unpin>(
    s: &mut S,
    step: &'static str,
) -> Result<String, VncError> {
    let len = read_u32(s, step).await?;
    let len = rfb::check_reason_len(len).map_err(|source| VncError::Protocol { step, source })?;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.map_err(io(step))?;
    Ok(rfb::sanitize(&buf))
}

async fn write<S: AsyncWrite + Unpin>(
    s: &mut S,
    b: &[u8],
    step: &'static str,
) -> Result<(), VncError> {
    s.write_all(b).await.map_err(io(step))?;
    s.flush().await.map_err(io(step))
}

fn capabilities(sec: &SessionSecurity) -> Capabilities {
    Capabilities {
        tls: sec.tls.is_some(),
        require_tls: sec.require_tls,
        vnc_password: sec.vnc_password.is_some(),
        user_password: sec.sasl.is_some(),
    }
}

/// Runs the RFB security phase as a client of the compute host. On
/// success the stream (TLS-wrapped for VeNCrypt) is positioned right
/// before ClientInit.
pub async fn negotiate_compute(
    mut s: ComputeStream,
    security: &SessionSecurity,
) -> Result<(ComputeIo, Negotiated), VncError> {
    let caps = capabilities(security);
    let mut v = [0u8; rfb::VERSION_LEN];
    s.read_exact(&mut v).await.map_err(io("ProtocolVersion"))?;
    let server = rfb::parse_version(&v).map_err(|source| VncError::Protocol {
        step: "ProtocolVersion",
        source,
    })?;
    let version = server.min(Version::V3_8);
    write(&mut s, version.bytes(), "ProtocolVersion").await?;

    let chosen = if version == Version::V3_3 {
        match read_u32(&mut s, "security type").await? {
            0 => {
                return Err(VncError::ServerRefused(
                    read_reason(&mut s, "failure reason").await?,
                ));
            }
            t if t == u32::from(sec::NONE) && !caps.require_tls => sec::NONE,
            t if t == u32::from(sec::VNC) && !caps.require_tls && caps.vnc_password => sec::VNC,
            t => {
                let offered = u8::try_from(t)
                    .map(rfb::sec_name)
                    .unwrap_or_else(|_| t.to_string());
                return Err(NoChoice::Types {
                    offered,
                    why: "an RFB 3.3 server offers no TLS; VNC needs a password",
                }
                .into());
            }
        }
    } else {
        let n = read_u8(&mut s, "security types").await?;
        if n == 0 {
            return Err(VncError::ServerRefused(
                read_reason(&mut s, "failure reason").await?,
            ));
        }
        let mut types = vec![0u8; usize::from(n)];
        s.read_exact(&mut types)
            .await
            .map_err(io("security types"))?;
        let t = rfb::choose_security(&types, caps)?;
        write(&mut s, &[t], "security type choice").await?;
        t
    };

    match chosen {
        sec::NONE => {
            if version == Version::V3_8 {
                security_result(&mut s, version, "None").await?;
            }
            Ok((
                ComputeIo::Plain(s),
                Negotiated {
                    version,
                    security: "None".into(),
                    tls: false,
                },
            ))
        }
        sec::VNC => {
            vnc_auth(&mut s, security).await?;
            security_result(&mut s, version, "VNC").await?;
            Ok((
                ComputeIo::Plain(s),
                Negotiated {
                    version,
                    security: "VNC".into(),
                    tls: false,
                },
            ))
        }
        sec::SASL => {
            let mech = sasl::authenticate(&mut s, security).await?;
            security_result(&mut s, version, "SASL").await?;
            let security = format!("SASL ({mech})");
            Ok((
                ComputeIo::Plain(s),
                Negotiated {
                    version,
                    security,
                    tls: false,
                },
            ))
        }
        _ => vencrypt_flow(s, security, caps, version).await,
    }
}

async fn vencrypt_flow(
    mut s: ComputeStream,
    security: &SessionSecurity,
    caps: Capabilities,
    version: Version,
) -> Result<(ComputeIo, Negotiated), VncError> {
    let mut vv = [0u8; 2];
    s.read_exact(&mut vv)
        .await
        .map_err(io("VeNCrypt version"))?;
    if (vv[0], vv[1]) < (0, 2) {
        return Err(VncError::Protocol {
            step: "VeNCrypt version",
            source: RfbError::VencryptVersion(vv[0], vv[1]),
        });
    }
    write(&mut s, &[0, 2], "VeNCrypt version").await?;
    if read_u8(&mut s, "VeNCrypt version ack").await? != 0 {
        return Err(VncError::VencryptRefused);
    }
    let n = read_u8(&mut s, "VeNCrypt subtypes").await?;
    let mut subtypes = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        subtypes.push(read_u32(&mut s, "VeNCrypt subtypes").await?);
    }
    let st = rfb::choose_subtype(&subtypes, caps)?;
    write(&mut s, &st.to_be_bytes(), "VeNCrypt subtype choice").await?;
    let ack = read_u8(&mut s, "VeNCrypt subtype ack").await?;
    if ack != 1 {
        return Err(VncError::SubtypeRejected(format!(
            "{} (answer {ack})",
            rfb::vencrypt_name(st)
        )));
    }
    let (cfg, name) = security
        .tls
        .clone()
        .ok_or(VncError::MissingCredential("a compute TLS profile"))?;
    let mut tls = super::tls_connect(s, cfg, name).await.map_err(|e| {
        if rfb::subtype_is_anonymous_label(st) {
            VncError::Tls(format!(
                "{e} (the server offered {}: if it uses anonymous TLS credentials \
                 (tls-creds-anon), give it tls-creds-x509 instead)",
                rfb::vencrypt_name(st)
            ))
        } else {
            VncError::Tls(e)
        }
    })?;
    let mut label = format!("VeNCrypt/{}", rfb::vencrypt_name(st));
    match st {
        vencrypt::X509_NONE | vencrypt::TLS_NONE => {}
        vencrypt::X509_VNC | vencrypt::TLS_VNC => vnc_auth(&mut tls, security).await?,
        vencrypt::X509_PLAIN | vencrypt::TLS_PLAIN => plain_auth(&mut tls, security).await?,
        vencrypt::X509_SASL | vencrypt::TLS_SASL => {
            let mech = sasl::authenticate(&mut tls, security).await?;
            label = format!("{label} ({mech})");
        }
        _ => return Err(VncError::SubtypeRejected(rfb::vencrypt_name(st))),
    }
    security_result(&mut tls, version, &label).await?;
    Ok((
        ComputeIo::Tls(Box::new(tls)),
        Negotiated {
            version,
            security: label,
            tls: true,
        },
    ))
}

async fn vnc_auth<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    security: &SessionSecurity,
) -> Result<(), VncError> {
    let pw = security
        .vnc_password
        .as_ref()
        .ok_or(VncError::MissingCredential("a VNC password"))?;
    let mut challenge = [0u8; 16];
    s.read_exact(&mut challenge)
        .await
        .map_err(io("VNC challenge"))?;
    let resp = rfb::vnc_auth_response(&challenge, pw.expose().as_bytes());
    write(s, &resp, "VNC response").await
}

async fn plain_auth<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    security: &SessionSecurity,
) -> Result<(), VncError> {
    let (user, pw) = security
        .sasl
        .as_ref()
        .ok_or(VncError::MissingCredential("sasl_username and password"))?;
    let mut m = Vec::new();
    m.extend_from_slice(&(user.len() as u32).to_be_bytes());
    m.extend_from_slice(&(pw.expose().len() as u32).to_be_bytes());
    m.extend_from_slice(user.as_bytes());
    m.extend_from_slice(pw.expose().as_bytes());
    write(s, &m, "Plain credentials").await
}

async fn security_result<S: AsyncRead + Unpin>(
    s: &mut S,
    version: Version,
    method: &str,
) -> Result<(), VncError> {
    match read_u32(s, "SecurityResult").await? {
        0 => Ok(()),
        _ => {
            let reason = if version == Version::V3_8 {
                read_reason(s, "SecurityResult reason")
                    .await
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let reason = if reason.is_empty() {
                "authentication failed".into()
            } else {
                reason
            };
            Err(VncError::AuthFailed {
                method: method.to_owned(),
                reason,
            })
        }
    }
}

/// Why the tenant side of the RFB handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantRfbError {
    #[error("tenant went away during {step}: {source}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
    #[error("tenant sent an invalid ProtocolVersion: {0}")]
    Version(RfbError),
    #[error("tenant chose security type {0}, not None")]
    BadChoice(u8),
}

/// Runs the tenant side: RFB 3.8 offered (3.3 and 3.7 clients accepted),
/// security type None. Returns the tenant's version.
pub async fn serve_tenant<T: AsyncRead + AsyncWrite + Unpin>(
    t: &mut T,
) -> Result<Version, TenantRfbError> {
    let tio = |step| move |source| TenantRfbError::Io { step, source };
    let version = tenant_version(t).await?;
    match version {
        Version::V3_3 => {
            t.write_all(&u32::from(sec::NONE).to_be_bytes())
                .await
                .map_err(tio("security type"))?;
        }
        Version::V3_7 | Version::V3_8 => {
            t.write_all(&[1, sec::NONE])
                .await
                .map_err(tio("security types"))?;
            t.flush().await.map_err(tio("security types"))?;
            let choice = t.read_u8().await.map_err(tio("security type choice"))?;
            if choice != sec::NONE {
                return Err(TenantRfbError::BadChoice(choice));
            }
            if version == Version::V3_8 {
                t.write_all(&0u32.to_be_bytes())
                    .await
                    .map_err(tio("SecurityResult"))?;
            }
        }
    }
    t.flush().await.map_err(tio("SecurityResult"))?;
    Ok(version)
}

async fn tenant_version<T: AsyncRead + AsyncWrite + Unpin>(
    t: &mut T,
) -> Result<Version, TenantRfbError> {
    let tio = |step| move |source| TenantRfbError::Io { step, source };
    t.write_all(Version::V3_8.bytes())
        .await
        .map_err(tio("ProtocolVersion"))?;
    t.flush().await.map_err(tio("ProtocolVersion"))?;
    let mut v = [0u8; rfb::VERSION_LEN];
    t.read_exact(&mut v).await.map_err(tio("ProtocolVersion"))?;
    rfb::parse_version(&v).map_err(TenantRfbError::Version)
}

/// Tells the tenant, in RFB terms, that the console cannot be opened:
/// ProtocolVersion, then zero security types (3.7/3.8) or type 0 (3.3)
/// with `reason`, which VNC clients show to the user.
pub async fn refuse_tenant<T: AsyncRead + AsyncWrite + Unpin>(
    t: &mut T,
    reason: &str,
) -> Result<(), TenantRfbError> {
    let tio = |step| move |source| TenantRfbError::Io { step, source };
    let version = tenant_version(t).await?;
    let mut m = Vec::new();
    match version {
        Version::V3_3 => m.extend_from_slice(&0u32.to_be_bytes()),
        _ => m.push(0),
    }
    m.extend_from_slice(&(reason.len() as u32).to_be_bytes());
    m.extend_from_slice(reason.as_bytes());
    t.write_all(&m).await.map_err(tio("failure reason"))?;
    t.flush().await.map_err(tio("failure reason"))
}
