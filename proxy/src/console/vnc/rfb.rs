//! Sans-io RFB (RFC 6143) security-phase messages and the choices the
//! proxy makes in them: protocol versions, security types, VeNCrypt
//! subtypes, failure reasons, and VNC Authentication's DES response.
#![forbid(unsafe_code)]

use std::fmt;

use des::cipher::{BlockEncrypt as _, KeyInit as _};

/// Length of a ProtocolVersion message.
pub const VERSION_LEN: usize = 12;
/// Longest failure reason or SASL mechanism list accepted from a server.
pub const MAX_REASON: u32 = 4096;

/// Security types (RFC 6143 section 7.1.2 and the IANA registry).
pub mod sec {
    pub const INVALID: u8 = 0;
    pub const NONE: u8 = 1;
    pub const VNC: u8 = 2;
    pub const VENCRYPT: u8 = 19;
    pub const SASL: u8 = 20;
}

/// VeNCrypt subtypes.
pub mod vencrypt {
    pub const PLAIN: u32 = 256;
    pub const TLS_NONE: u32 = 257;
    pub const TLS_VNC: u32 = 258;
    pub const TLS_PLAIN: u32 = 259;
    pub const X509_NONE: u32 = 260;
    pub const X509_VNC: u32 = 261;
    pub const X509_PLAIN: u32 = 262;
    /// QEMU, gtk-vnc and libvncclient number the SASL subtypes 263 =
    /// X509SASL and 264 = TLSSASL; rfbproto's table lists them the other way
    /// round. consolegate talks to QEMU, so it follows QEMU. Either way the
    /// proxy verifies the server certificate.
    pub const X509_SASL: u32 = 263;
    pub const TLS_SASL: u32 = 264;
}

/// RFB protocol versions the proxy speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V3_3,
    V3_7,
    V3_8,
}

impl Version {
    /// The ProtocolVersion message.
    pub fn bytes(self) -> &'static [u8; VERSION_LEN] {
        match self {
            Version::V3_3 => b"RFB 003.003\n",
            Version::V3_7 => b"RFB 003.007\n",
            Version::V3_8 => b"RFB 003.008\n",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V3_3 => "3.3",
            Version::V3_7 => "3.7",
            Version::V3_8 => "3.8",
        })
    }
}

/// Malformed or unacceptable RFB messages.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RfbError {
    #[error("not an RFB ProtocolVersion message")]
    NotRfb,
    #[error("RFB version {0}.{1} is too old")]
    TooOld(u32, u32),
    #[error("reason string of {0} bytes is too long")]
    ReasonTooLong(u32),
    #[error("VeNCrypt version {0}.{1} is not 0.2")]
    VencryptVersion(u8, u8),
}

/// Parses a ProtocolVersion message. Versions between the ones we know
/// map down as RFC 6143 asks (3.5 -> 3.3); newer ones (e.g. 4.x) to 3.8.
pub fn parse_version(b: &[u8]) -> Result<Version, RfbError> {
    if b.len() != VERSION_LEN || &b[..4] != b"RFB " || b[7] != b'.' || b[11] != b'\n' {
        return Err(RfbError::NotRfb);
    }
    let num = |s: &[u8]| -> Result<u32, RfbError> {
        if !s.iter().all(u8::is_ascii_digit) {
            return Err(RfbError::NotRfb);
        }
        std::str::from_utf8(s)
            .map_err(|_| RfbError::NotRfb)?
            .parse()
            .map_err(|_| RfbError::NotRfb)
    };
    let major = num(&b[4..7])?;
    let minor = num(&b[8..11])?;
    Ok(match (major, minor) {
        (0..=2, _) | (3, 0..=2) => return Err(RfbError::TooOld(major, minor)),
        (3, 3..=6) => Version::V3_3,
        (3, 7) => Version::V3_7,
        _ => Version::V3_8,
    })
}

/// Decodes a length-prefixed reason string (lossy UTF-8, control
/// characters replaced) after checking its announced length.
pub fn check_reason_len(len: u32) -> Result<usize, RfbError> {
    if len > MAX_REASON {
        return Err(RfbError::ReasonTooLong(len));
    }
    Ok(len as usize)
}

/// Makes a server-provided string safe to log and to show a tenant.
pub fn sanitize(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Name of a security type, for errors and logs.
pub fn sec_name(t: u8) -> String {
    match t {
        sec::INVALID => "Invalid".into(),
        sec::NONE => "None".into(),
        sec::VNC => "VNC".into(),
        sec::VENCRYPT => "VeNCrypt".into(),
        sec::SASL => "SASL".into(),
        5 => "RA2".into(),
        16 => "Tight".into(),
        18 => "TLS".into(),
        other => format!("type {other}"),
    }
}

/// Name of a VeNCrypt subtype.
pub fn vencrypt_name(t: u32) -> String {
    match t {
        vencrypt::PLAIN => "Plain".into(),
        vencrypt::TLS_NONE => "TLSNone".into(),
        vencrypt::TLS_VNC => "TLSVnc".into(),
        vencrypt::TLS_PLAIN => "TLSPlain".into(),
        vencrypt::X509_NONE => "X509None".into(),
        vencrypt::X509_VNC => "X509Vnc".into(),
        vencrypt::X509_PLAIN => "X509Plain".into(),
        vencrypt::TLS_SASL => "TLSSASL".into(),
        vencrypt::X509_SASL => "X509SASL".into(),
        other => format!("subtype {other}"),
    }
}

/// What the proxy can do towards one compute host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// A TLS client configuration (private CA, client certificate) exists.
    pub tls: bool,
    /// Only security types that run inside TLS are acceptable.
    pub require_tls: bool,
    pub vnc_password: bool,
    /// SASL / Plain user name and password.
    pub user_password: bool,
}

/// Why no security type could be chosen. The message lists what the
/// server offered so operators can fix either side.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NoChoice {
    #[error(
        "compute offers no security type usable with this configuration (offered: {offered}; {why})"
    )]
    Types { offered: String, why: &'static str },
    #[error(
        "compute offers no VeNCrypt subtype usable with this configuration (offered: {offered}; {why})"
    )]
    Subtypes { offered: String, why: &'static str },
}

/// Chooses the strongest security type that both the server offers and
/// the configuration allows: VeNCrypt (TLS) > SASL > VNC > None.
pub fn choose_security(offered: &[u8], caps: Capabilities) -> Result<u8, NoChoice> {
    let has = |t| offered.contains(&t);
    if has(sec::VENCRYPT) && caps.tls {
        return Ok(sec::VENCRYPT);
    }
    let names = || {
        offered
            .iter()
            .map(|t| sec_name(*t))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if caps.require_tls {
        let why = if has(sec::VENCRYPT) {
            "VeNCrypt needs a CA in the compute profile"
        } else {
            "the compute profile requires TLS (enable tls-creds on the VNC server)"
        };
        return Err(NoChoice::Types {
            offered: names(),
            why,
        });
    }
    if has(sec::SASL) && caps.user_password {
        return Ok(sec::SASL);
    }
    if has(sec::VNC) && caps.vnc_password {
        return Ok(sec::VNC);
    }
    if has(sec::NONE) {
        return Ok(sec::NONE);
    }
    let why = if has(sec::VENCRYPT) {
        "VeNCrypt needs a compute profile with a CA"
    } else if has(sec::VNC) {
        "VNC authentication needs a password in the token or profile"
    } else if has(sec::SASL) {
        "SASL needs sasl_username and a password in the token or profile"
    } else {
        "none of them is supported"
    };
    Err(NoChoice::Types {
        offered: names(),
        why,
    })
}

/// Chooses the strongest VeNCrypt subtype we can complete.
///
/// Every subtype but Plain runs TLS, and the proxy always verifies the
/// server certificate against the profile's CA: the X509/TLS prefix is only
/// the server's label (QEMU 7.2 says TLSSASL for x509 credentials). A server
/// with anonymous credentials (`tls-creds-anon`) fails the TLS handshake,
/// since rustls has no anonymous cipher suites. Plain (no TLS) is refused.
pub fn choose_subtype(offered: &[u32], caps: Capabilities) -> Result<u32, NoChoice> {
    use vencrypt::*;
    let has = |t| offered.contains(&t);
    let order: [(u32, bool); 8] = [
        (X509_SASL, caps.user_password),
        (TLS_SASL, caps.user_password),
        (X509_PLAIN, caps.user_password),
        (TLS_PLAIN, caps.user_password),
        (X509_VNC, caps.vnc_password),
        (TLS_VNC, caps.vnc_password),
        (X509_NONE, true),
        (TLS_NONE, true),
    ];
    if caps.tls
        && let Some((t, _)) = order.iter().find(|(t, ok)| *ok && has(*t))
    {
        return Ok(*t);
    }
    let offered_names = offered
        .iter()
        .map(|t| vencrypt_name(*t))
        .collect::<Vec<_>>()
        .join(", ");
    let why = if !caps.tls {
        "VeNCrypt needs a compute profile with a CA"
    } else if has(X509_VNC) || has(TLS_VNC) {
        "X509Vnc/TLSVnc need a VNC password in the token or profile"
    } else if has(X509_SASL) || has(TLS_SASL) || has(X509_PLAIN) || has(TLS_PLAIN) {
        "SASL and Plain subtypes need sasl_username and a password"
    } else if has(PLAIN) {
        "Plain sends the password without TLS and is refused"
    } else {
        "none of them is supported"
    };
    Err(NoChoice::Subtypes {
        offered: offered_names,
        why,
    })
}

/// Whether the subtype's name says anonymous TLS (TLS* rather than X509*).
pub fn subtype_is_anonymous_label(t: u32) -> bool {
    matches!(
        t,
        vencrypt::TLS_NONE | vencrypt::TLS_VNC | vencrypt::TLS_PLAIN | vencrypt::TLS_SASL
    )
}

/// VNC Authentication: DES-encrypts the 16-byte challenge with the
/// password (first 8 bytes, zero padded) as key, each key byte bit-reversed.
pub fn vnc_auth_response(challenge: &[u8; 16], password: &[u8]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password.iter()) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(block.into());
    }
    out
}

/// Builds a SASL step message: u32 length then the data with a trailing
/// NUL (QEMU's wire form), or a zero length for "no data".
pub fn sasl_message(data: Option<&[u8]>) -> Vec<u8> {
    match data {
        None => 0u32.to_be_bytes().to_vec(),
        Some(d) => {
            let mut m = Vec::with_capacity(d.len() + 5);
            m.extend_from_slice(&(d.len() as u32 + 1).to_be_bytes());
            m.extend_from_slice(d);
            m.push(0);
            m
        }
    }
}

/// Strips the trailing NUL QEMU puts on SASL server data.
pub fn sasl_payload(raw: &[u8]) -> &[u8] {
    raw.strip_suffix(&[0]).unwrap_or(raw)
}

/// Parses a comma-separated SASL mechanism list.
pub fn parse_mechlist(raw: &[u8]) -> Vec<String> {
    sanitize(sasl_payload(raw))
        .split(',')
        .map(|m| m.trim().to_ascii_uppercase())
        .filter(|m| !m.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version(b"RFB 003.008\n"), Ok(Version::V3_8));
        assert_eq!(parse_version(b"RFB 003.007\n"), Ok(Version::V3_7));
        assert_eq!(parse_version(b"RFB 003.003\n"), Ok(Version::V3_3));
        assert_eq!(parse_version(b"RFB 003.005\n"), Ok(Version::V3_3));
        assert_eq!(parse_version(b"RFB 004.001\n"), Ok(Version::V3_8));
        assert_eq!(parse_version(b"RFB 003.889\n"), Ok(Version::V3_8));
        assert_eq!(parse_version(b"RFB 002.000\n"), Err(RfbError::TooOld(2, 0)));
        assert_eq!(parse_version(b"SSH-2.0-xxxx"), Err(RfbError::NotRfb));
        assert_eq!(parse_version(b"RFB 0-3.008\n"), Err(RfbError::NotRfb));
        assert_eq!(parse_version(b"RFB 003.008"), Err(RfbError::NotRfb));
    }

    #[test]
    fn security_choice() {
        let tls = Capabilities {
            tls: true,
            require_tls: true,
            ..Default::default()
        };
        assert_eq!(choose_security(&[1, 19], tls), Ok(sec::VENCRYPT));
        assert!(
            choose_security(&[1, 2], tls)
                .unwrap_err()
                .to_string()
                .contains("None, VNC")
        );
        let plain = Capabilities {
            vnc_password: true,
            ..Default::default()
        };
        assert_eq!(choose_security(&[1, 2], plain), Ok(sec::VNC));
        assert_eq!(
            choose_security(&[1, 2], Capabilities::default()),
            Ok(sec::NONE)
        );
        let e = choose_security(&[2], Capabilities::default()).unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
        let sasl = Capabilities {
            user_password: true,
            vnc_password: true,
            ..Default::default()
        };
        assert_eq!(choose_security(&[2, 20], sasl), Ok(sec::SASL));
    }

    #[test]
    fn subtype_choice() {
        use vencrypt::*;
        let all = Capabilities {
            tls: true,
            require_tls: true,
            vnc_password: true,
            user_password: true,
        };
        assert_eq!(
            choose_subtype(&[X509_NONE, X509_VNC, X509_SASL], all),
            Ok(X509_SASL)
        );
        let some = Capabilities {
            tls: true,
            ..Default::default()
        };
        assert_eq!(choose_subtype(&[X509_NONE, X509_VNC], some), Ok(X509_NONE));
        let e = choose_subtype(&[X509_VNC], some).unwrap_err().to_string();
        assert!(e.contains("need a VNC password"), "{e}");
        // QEMU 7.2 labels x509 SASL as TLSSASL: accepted (the certificate is verified).
        assert_eq!(choose_subtype(&[TLS_SASL], all), Ok(TLS_SASL));
        assert_eq!(choose_subtype(&[TLS_NONE, X509_NONE], all), Ok(X509_NONE));
        let e = choose_subtype(&[PLAIN], all).unwrap_err().to_string();
        assert!(e.contains("without TLS"), "{e}");
        let e = choose_subtype(&[X509_NONE], Capabilities::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a compute profile"), "{e}");
    }

    #[test]
    fn vnc_des_known_answer() {
        // Expected value computed independently with
        // `openssl enc -des-ecb -K 0e86ceceeef64e26 -nopad` (the key is
        // "password" with each byte bit-reversed).
        let mut challenge = [0u8; 16];
        for (i, b) in challenge.iter_mut().enumerate() {
            *b = (i % 8) as u8;
        }
        let expect = [0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb];
        let r = vnc_auth_response(&challenge, b"password");
        assert_eq!(r[..8], expect);
        assert_eq!(r[8..], expect);
        // Only the first 8 password bytes count.
        assert_eq!(vnc_auth_response(&challenge, b"passwordEXTRA"), r);
        assert_ne!(vnc_auth_response(&challenge, b"passwore"), r);
    }

    #[test]
    fn sasl_framing() {
        assert_eq!(sasl_message(None), vec![0, 0, 0, 0]);
        assert_eq!(sasl_message(Some(b"ab")), vec![0, 0, 0, 3, b'a', b'b', 0]);
        assert_eq!(sasl_payload(b"xy\0"), b"xy");
        assert_eq!(
            parse_mechlist(b"scram-sha-256,SCRAM-SHA-1\0"),
            vec!["SCRAM-SHA-256", "SCRAM-SHA-1"]
        );
    }

    #[test]
    fn sanitize_strips_controls() {
        assert_eq!(sanitize(b"bad\x1b[31m pass\n"), "bad [31m pass");
    }
}
