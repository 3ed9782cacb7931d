//! The embedded development setup: a self-signed certificate and a token
//! file created on first run, so `consolegate serve` works with nothing else.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::RngCore as _;

/// Files of the development certificate.
#[derive(Debug, Clone)]
pub struct DevCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub created: bool,
}

/// Why the development files could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating the development certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), DevError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DevError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

/// Creates `dir/cert.pem` and `dir/key.pem` (self-signed; SANs localhost,
/// 127.0.0.1 and ::1) unless both already exist.
pub fn ensure_cert(dir: &Path) -> Result<DevCert, DevError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok(DevCert {
            cert,
            key,
            created: false,
        });
    }
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let certified = rcgen::generate_simple_self_signed(names)?;
    let _ = std::fs::remove_file(&cert);
    let _ = std::fs::remove_file(&key);
    write_private(&key, certified.signing_key.serialize_pem().as_bytes())?;
    write_private(&cert, certified.cert.pem().as_bytes())?;
    Ok(DevCert {
        cert,
        key,
        created: true,
    })
}

/// A fresh random token: 32 bytes as URL-safe hex.
pub fn random_token() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates the development token file (one VNC token for 127.0.0.1:5900)
/// unless it exists. Returns the new token when one was created.
pub fn ensure_tokens(path: &Path) -> Result<Option<String>, DevError> {
    if path.exists() {
        return Ok(None);
    }
    let token = random_token();
    let text = format!(
        "# consolegate development tokens (TOML form; see docs/config.md).\n\
         # Edit freely: the file is re-read on change and on SIGHUP.\n\
         [[token]]\n\
         token = \"{token}\"\n\
         kind = \"vnc\"\n\
         target = \"127.0.0.1:5900\"   # a QEMU started with -vnc 127.0.0.1:0\n"
    );
    write_private(path, text.as_bytes())?;
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once() {
        let d = std::env::temp_dir().join(format!("cg-dev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let c = ensure_cert(&d.join("tls")).unwrap();
        assert!(c.created);
        assert!(
            std::fs::read_to_string(&c.cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert!(!ensure_cert(&d.join("tls")).unwrap().created);
        let t = ensure_tokens(&d.join("tokens.toml")).unwrap().unwrap();
        assert_eq!(t.len(), 48);
        assert!(ensure_tokens(&d.join("tokens.toml")).unwrap().is_none());
        let parsed =
            crate::auth::file::parse_toml(&std::fs::read_to_string(d.join("tokens.toml")).unwrap())
                .unwrap();
        assert_eq!(parsed[0].token.expose(), t);
        let _ = std::fs::remove_dir_all(&d);
    }
}
