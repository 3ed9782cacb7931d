//! The compute side with its security turned on: a private CA (rcgen) that
//! issues QEMU's server certificate and the proxy's client certificate, and
//! QEMU VNC servers with `tls-creds-x509,verify-peer=on`, VNC passwords and
//! SASL (a real sasldb). Used by `tests/compute_security.rs` and the
//! handshake-latency example.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};

use crate::process::ChildGuard;

/// A private CA that can issue server and client certificates.
#[expect(missing_debug_implementations, reason = "rcgen's Issuer is not Debug")]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf certificate and key (PEM) for `sans`, optionally expired.
    pub fn leaf(&self, cn: &str, sans: &[&str], expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            p.not_before = date_time_ymd(2001, 1, 1);
            p.not_after = date_time_ymd(2002, 1, 1);
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Files for one test: QEMU's x509 dir and the proxy's client credentials.
#[derive(Debug)]
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// QEMU's creds dir signed by `server_ca` with a server cert for
    /// `server_sans`; QEMU trusts `client_ca` for client certificates.
    pub fn new(server_ca: &Ca, client_ca: &Ca, server_sans: &[&str], expired: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cg-vncsec-")
            .tempdir()
            .unwrap();
        let x509 = dir.path().join("qemu-x509");
        std::fs::create_dir_all(&x509).unwrap();
        let (cert, key) = server_ca.leaf("qemu", server_sans, expired);
        std::fs::write(x509.join("server-cert.pem"), cert).unwrap();
        std::fs::write(x509.join("server-key.pem"), key).unwrap();
        // QEMU verifies client certificates against ca-cert.pem.
        std::fs::write(x509.join("ca-cert.pem"), &client_ca.pem).unwrap();
        let (ccert, ckey) = client_ca.leaf("consolegate", &[], false);
        std::fs::write(dir.path().join("client-cert.pem"), ccert).unwrap();
        std::fs::write(dir.path().join("client-key.pem"), ckey).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the CA the proxy trusts for compute certificates.
    pub fn proxy_trusts(&self, ca: &Ca) -> PathBuf {
        let p = self.path("compute-ca.pem");
        std::fs::write(&p, &ca.pem).unwrap();
        p
    }
}

/// How QEMU's VNC server is set up.
#[derive(Debug, Default)]
pub struct VncServer {
    /// `tls-creds-x509` from this dir, `verify-peer=on`.
    pub x509: Option<PathBuf>,
    /// Skip QEMU's own certificate sanity check (to serve an expired cert).
    pub no_sanity_check: bool,
    /// `tls-creds-anon` (VeNCrypt TLSNone).
    pub anon_tls: bool,
    pub password: Option<String>,
    /// SASL user and password (a sasldb in the test dir).
    pub sasl: Option<(String, String)>,
    /// Listen on a UNIX socket (QEMU then accepts SASL without a security layer).
    pub unix: bool,
}

#[derive(Debug)]
pub struct RunningVnc {
    _child: ChildGuard,
    pub target: String,
    _dir: tempfile::TempDir,
}

impl VncServer {
    pub async fn start(&self) -> RunningVnc {
        for attempt in 0..5 {
            match self.try_start().await {
                Ok(r) => return r,
                Err(e) => eprintln!("QEMU start attempt {attempt} failed: {e:#}"),
            }
        }
        panic!("QEMU VNC server did not start");
    }

    async fn try_start(&self) -> anyhow::Result<RunningVnc> {
        let dir = tempfile::Builder::new().prefix("cg-qemu-sec-").tempdir()?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-vga",
            "std",
            "-display",
            "none",
        ])
        .args(["-m", "64", "-smp", "1", "-no-reboot"]);
        let (target, mut vnc) = if self.unix {
            let p = dir.path().join("vnc.sock");
            (
                format!("unix_socket:{}", p.display()),
                format!("unix:{}", p.display()),
            )
        } else {
            let port = crate::net::free_port()?;
            (
                format!("127.0.0.1:{port}"),
                format!("127.0.0.1:{}", port - 5900),
            )
        };
        if let Some(x509) = &self.x509 {
            let sanity = if self.no_sanity_check {
                ",sanity-check=off"
            } else {
                ""
            };
            cmd.arg("-object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on{sanity}",
                x509.display()
            ));
            vnc.push_str(",tls-creds=tls0");
        }
        if self.anon_tls {
            cmd.args(["-object", "tls-creds-anon,id=tls0,endpoint=server"]);
            vnc.push_str(",tls-creds=tls0");
        }
        if let Some(pw) = &self.password {
            cmd.arg("-object").arg(format!("secret,id=vncpw,data={pw}"));
            vnc.push_str(",password-secret=vncpw");
        }
        if let Some((user, pw)) = &self.sasl {
            let db = dir.path().join("passwd.db");
            std::fs::write(
                dir.path().join("qemu.conf"),
                format!(
                    "mech_list: scram-sha-256 scram-sha-1\nsasldb_path: {}\n",
                    db.display()
                ),
            )?;
            let mut sp = Command::new("saslpasswd2")
                .args(["-f"])
                .arg(&db)
                .args(["-a", "qemu", "-c", "-p", user])
                .stdin(Stdio::piped())
                .spawn()
                .context("saslpasswd2 (package sasl2-bin)")?;
            sp.stdin
                .take()
                .context("stdin")?
                .write_all_sync(pw.as_bytes())?;
            anyhow::ensure!(sp.wait()?.success(), "saslpasswd2 failed");
            cmd.env("SASL_CONF_PATH", dir.path());
            vnc.push_str(",sasl=on");
        }
        cmd.args(["-vnc", &vnc]);
        let mut child = ChildGuard::spawn("qemu", cmd)?;
        let ready = async {
            loop {
                if let Some(st) = child.exited() {
                    child.drain_output();
                    anyhow::bail!("QEMU exited ({st}): {}", child.output());
                }
                let ok = match target.strip_prefix("unix_socket:") {
                    Some(p) => tokio::net::UnixStream::connect(p).await.is_ok(),
                    None => tokio::net::TcpStream::connect(&target).await.is_ok(),
                };
                if ok {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        crate::within("QEMU VNC socket", ready).await??;
        Ok(RunningVnc {
            _child: child,
            target,
            _dir: dir,
        })
    }
}

trait WriteAllSync {
    fn write_all_sync(&mut self, b: &[u8]) -> std::io::Result<()>;
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(&mut self, b: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        self.write_all(b)
    }
}
