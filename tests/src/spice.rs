//! SPICE for the tests: a QEMU SPICE server (TLS with a private CA, ticket
//! from a `secret` object) and a small SPICE link client (the tenant) that
//! speaks spice-protocol's `protocol.h` link phase over any transport:
//! SpiceLinkHeader + SpiceLinkMess, SpiceLinkReply, auth mechanism,
//! RSA-OAEP (SHA-1) ticket, link result, then the main channel's
//! SPICE_MSG_MAIN_INIT.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rsa::pkcs8::DecodePublicKey as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::net::free_port;
use crate::process::ChildGuard;

const MAGIC: &[u8; 4] = b"REDQ";
const MAJOR: u32 = 2;
const MINOR: u32 = 2;
pub const CHANNEL_MAIN: u8 = 1;
pub const CHANNEL_DISPLAY: u8 = 2;
pub const CHANNEL_INPUTS: u8 = 3;
pub const LINK_ERR_OK: u32 = 0;
pub const LINK_ERR_PERMISSION_DENIED: u32 = 7;
pub const LINK_ERR_BAD_CONNECTION_ID: u32 = 8;
const CAP_AUTH_SELECTION: u32 = 0;
const CAP_AUTH_SPICE: u32 = 1;
const CAP_MINI_HEADER: u32 = 3;
const MSG_MAIN_INIT: u16 = 103;
const PUBKEY_LEN: usize = 162;
const LINK_REPLY_LEN: usize = 4 + PUBKEY_LEN + 12;

#[derive(Clone, Debug)]
pub struct LinkReply {
    pub major: u32,
    pub minor: u32,
    pub error: u32,
    pub num_common_caps: u32,
    pub num_channel_caps: u32,
    pub common_caps: Vec<u32>,
    pub pub_key: Vec<u8>,
}

impl LinkReply {
    fn has_common(&self, bit: u32) -> bool {
        self.common_caps
            .get((bit / 32) as usize)
            .is_some_and(|w| w & (1 << (bit % 32)) != 0)
    }
}

fn le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// What the client asks for in its SpiceLinkMess.
#[derive(Clone, Debug)]
pub struct LinkRequest {
    pub connection_id: u32,
    pub channel_type: u8,
    pub channel_id: u8,
    /// Advertise SPICE_COMMON_CAP_PROTOCOL_AUTH_SELECTION (spice-gtk does;
    /// old clients do not).
    pub auth_selection: bool,
    pub mini_header: bool,
}

impl LinkRequest {
    /// A new session's main channel, as spice-gtk links it.
    pub fn main() -> Self {
        Self {
            connection_id: 0,
            channel_type: CHANNEL_MAIN,
            channel_id: 0,
            auth_selection: true,
            mini_header: true,
        }
    }

    /// A secondary channel of session `connection_id`.
    pub fn secondary(connection_id: u32, channel_type: u8) -> Self {
        Self {
            connection_id,
            channel_type,
            ..Self::main()
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut common = 1 << CAP_AUTH_SPICE;
        if self.auth_selection {
            common |= 1 << CAP_AUTH_SELECTION;
        }
        if self.mini_header {
            common |= 1 << CAP_MINI_HEADER;
        }
        let mut mess = Vec::new();
        mess.extend_from_slice(&self.connection_id.to_le_bytes());
        mess.push(self.channel_type);
        mess.push(self.channel_id);
        mess.extend_from_slice(&1u32.to_le_bytes()); // num_common_caps
        mess.extend_from_slice(&0u32.to_le_bytes()); // num_channel_caps
        mess.extend_from_slice(&18u32.to_le_bytes()); // caps_offset
        mess.extend_from_slice(&(common as u32).to_le_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(MAGIC);
        msg.extend_from_slice(&MAJOR.to_le_bytes());
        msg.extend_from_slice(&MINOR.to_le_bytes());
        msg.extend_from_slice(&(mess.len() as u32).to_le_bytes());
        msg.extend_from_slice(&mess);
        msg
    }
}

async fn send_link<S: AsyncWrite + Unpin>(s: &mut S, req: &LinkRequest) -> anyhow::Result<()> {
    s.write_all(&req.encode()).await?;
    s.flush().await?;
    Ok(())
}

async fn read_link_reply<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<LinkReply> {
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr)
        .await
        .context("reading SpiceLinkHeader")?;
    ensure!(
        &hdr[0..4] == MAGIC,
        "not a SPICE server: {:02x?}",
        &hdr[0..4]
    );
    let (major, minor, size) = (le(&hdr[4..8]), le(&hdr[8..12]), le(&hdr[12..16]));
    ensure!(major == MAJOR, "SPICE major version {major}");
    ensure!(
        (LINK_REPLY_LEN as u32..1 << 16).contains(&size),
        "absurd link reply size {size}"
    );
    let mut body = vec![0u8; size as usize];
    s.read_exact(&mut body)
        .await
        .context("reading SpiceLinkReply")?;
    let num_common_caps = le(&body[166..170]);
    let num_channel_caps = le(&body[170..174]);
    let offset = le(&body[174..178]) as usize;
    let mut common_caps = Vec::new();
    for i in 0..num_common_caps as usize {
        let at = offset + 4 * i;
        ensure!(at + 4 <= body.len(), "capabilities past the reply");
        common_caps.push(le(&body[at..at + 4]));
    }
    Ok(LinkReply {
        major,
        minor,
        error: le(&body[0..4]),
        num_common_caps,
        num_channel_caps,
        common_caps,
        pub_key: body[4..4 + PUBKEY_LEN].to_vec(),
    })
}

/// Sends a main-channel link request and reads the server's link reply.
pub async fn link_main_channel<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> anyhow::Result<LinkReply> {
    send_link(s, &LinkRequest::main()).await?;
    read_link_reply(s).await
}

/// RSA-OAEP (SHA-1) encryption of `ticket` + NUL with a SpiceLinkReply key.
pub fn encrypt_ticket(pub_key: &[u8], ticket: &[u8]) -> anyhow::Result<Vec<u8>> {
    // The DER SEQUENCE of a 1024-bit key is 0x30 0x81 len.
    ensure!(pub_key.len() >= 3 && pub_key[0] == 0x30 && pub_key[1] == 0x81);
    let len = 3 + usize::from(pub_key[2]);
    ensure!(len <= pub_key.len(), "key DER longer than the field");
    let key = rsa::RsaPublicKey::from_public_key_der(&pub_key[..len])
        .context("SpiceLinkReply public key")?;
    let mut msg = ticket.to_vec();
    msg.push(0);
    Ok(key.encrypt(
        &mut rsa::rand_core::OsRng,
        rsa::Oaep::new::<sha1::Sha1>(),
        &msg,
    )?)
}

/// How a link attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The SpiceLinkReply carried this error (no ticket was asked for).
    ReplyError(u32),
    /// The link result after the ticket.
    Result(u32),
}

/// A finished link: the reply (capabilities) and how it ended.
#[derive(Clone, Debug)]
pub struct Linked {
    pub reply: LinkReply,
    pub outcome: LinkOutcome,
}

impl Linked {
    /// Whether data messages use the mini header on this channel.
    pub fn mini_header(&self, req: &LinkRequest) -> bool {
        req.mini_header && self.reply.has_common(CAP_MINI_HEADER)
    }

    pub fn ok(&self) -> bool {
        self.outcome == LinkOutcome::Result(LINK_ERR_OK)
    }
}

/// The whole link phase as a SPICE client: link message, reply, auth
/// mechanism (when both sides select), `ticket` encrypted with the key the
/// peer sent, link result.
pub async fn link<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: &LinkRequest,
    ticket: &[u8],
) -> anyhow::Result<Linked> {
    send_link(s, req).await?;
    let reply = read_link_reply(s).await?;
    if reply.error != LINK_ERR_OK {
        return Ok(Linked {
            outcome: LinkOutcome::ReplyError(reply.error),
            reply,
        });
    }
    let mut out = Vec::new();
    if req.auth_selection && reply.has_common(CAP_AUTH_SELECTION) {
        out.extend_from_slice(&CAP_AUTH_SPICE.to_le_bytes());
    }
    out.extend_from_slice(&encrypt_ticket(&reply.pub_key, ticket)?);
    s.write_all(&out).await?;
    s.flush().await?;
    let mut r = [0u8; 4];
    s.read_exact(&mut r).await.context("reading link result")?;
    Ok(Linked {
        reply,
        outcome: LinkOutcome::Result(u32::from_le_bytes(r)),
    })
}

/// Reads data messages until SPICE_MSG_MAIN_INIT; returns its session id.
pub async fn read_main_init<S: AsyncRead + Unpin>(s: &mut S, mini: bool) -> anyhow::Result<u32> {
    for _ in 0..8 {
        let (msg_type, size) = if mini {
            let mut h = [0u8; 6];
            s.read_exact(&mut h).await.context("mini data header")?;
            (u16::from_le_bytes([h[0], h[1]]), le(&h[2..6]))
        } else {
            let mut h = [0u8; 18];
            s.read_exact(&mut h).await.context("data header")?;
            (u16::from_le_bytes([h[8], h[9]]), le(&h[10..14]))
        };
        ensure!(size < 1 << 20, "absurd message size {size}");
        let mut body = vec![0u8; size as usize];
        s.read_exact(&mut body).await.context("message body")?;
        if msg_type == MSG_MAIN_INIT {
            ensure!(body.len() >= 32, "short SPICE_MSG_MAIN_INIT");
            return Ok(le(&body[0..4]));
        }
    }
    bail!("no SPICE_MSG_MAIN_INIT among the first messages")
}

/// Links the main channel with `ticket` and reads the session id.
pub async fn open_session<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    ticket: &[u8],
) -> anyhow::Result<u32> {
    open_session_as(s, &LinkRequest::main(), ticket).await
}

/// [`open_session`] with the client's capabilities chosen by `req`.
pub async fn open_session_as<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: &LinkRequest,
    ticket: &[u8],
) -> anyhow::Result<u32> {
    let l = link(s, req, ticket).await?;
    ensure!(l.ok(), "main channel link failed: {:?}", l.outcome);
    read_main_init(s, l.mini_header(req)).await
}

/// A private CA with a server certificate (SAN IP 127.0.0.1) for QEMU and
/// a client certificate for the proxy, as PEM files.
#[derive(Debug)]
pub struct SpicePki {
    /// QEMU's `x509-dir`: ca-cert.pem, server-cert.pem, server-key.pem.
    pub x509_dir: PathBuf,
    pub ca_path: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl SpicePki {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("consolegate SPICE test CA {:08x}", rand::random::<u32>()),
        );
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut sp = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        sp.distinguished_name
            .push(DnType::CommonName, "qemu spice test server");
        let server_cert = sp.signed_by(&server_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut cp = CertificateParams::new(Vec::<String>::new())?;
        cp.distinguished_name
            .push(DnType::CommonName, "consolegate proxy");
        let client_cert = cp.signed_by(&client_key, &issuer)?;

        let x509_dir = dir.join("qemu-x509");
        std::fs::create_dir_all(&x509_dir)?;
        std::fs::write(x509_dir.join("ca-cert.pem"), ca_cert.pem())?;
        std::fs::write(x509_dir.join("server-cert.pem"), server_cert.pem())?;
        std::fs::write(x509_dir.join("server-key.pem"), server_key.serialize_pem())?;
        let ca_path = dir.join("compute-ca.pem");
        let client_cert_path = dir.join("proxy-client.pem");
        let client_key_path = dir.join("proxy-client.key");
        std::fs::write(&ca_path, ca_cert.pem())?;
        std::fs::write(&client_cert_path, client_cert.pem())?;
        std::fs::write(&client_key_path, client_key.serialize_pem())?;
        Ok(Self {
            x509_dir,
            ca_path,
            client_cert: client_cert_path,
            client_key: client_key_path,
        })
    }

    /// `--compute-ca/--compute-cert/--compute-key` for the proxy.
    pub fn proxy_flags(&self) -> Vec<String> {
        vec![
            "--compute-ca".into(),
            self.ca_path.display().to_string(),
            "--compute-cert".into(),
            self.client_cert.display().to_string(),
            "--compute-key".into(),
            self.client_key.display().to_string(),
        ]
    }
}

/// A QEMU whose only job is a SPICE server: no disks, a standard VGA card
/// (so there is a display channel), the CPU stopped (`-S`, so TCG burns no
/// CPU): the SPICE main, display, inputs and cursor channels all link.
#[derive(Debug)]
pub struct SpiceQemu {
    child: ChildGuard,
    /// The plain-text SPICE port.
    pub plain: SocketAddr,
    /// The TLS SPICE port.
    pub tls: SocketAddr,
    pub pki: SpicePki,
    pub dir: tempfile::TempDir,
    /// The command line, for reports.
    pub command_line: String,
}

impl SpiceQemu {
    /// Starts QEMU with SPICE on loopback, TLS from a fresh private CA,
    /// and `ticket` as the SPICE password.
    /// QEMU binds ports that were free a moment ago; a start that loses
    /// one to a parallel test is retried with fresh ports.
    pub async fn start(ticket: &str) -> anyhow::Result<Self> {
        let mut last_err = None;
        for attempt in 0..5 {
            match Self::try_start(ticket).await {
                Ok(q) => return Ok(q),
                Err(e) => {
                    eprintln!("QEMU SPICE start attempt {attempt} failed: {e:#}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("QEMU SPICE did not start")))
    }

    async fn try_start(ticket: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cg-spice-").tempdir()?;
        let pki = SpicePki::generate(dir.path())?;
        let plain = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let tls = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let spice = format!(
            "port={},tls-port={},addr=127.0.0.1,x509-dir={},password-secret=sec0",
            plain.port(),
            tls.port(),
            pki.x509_dir.display()
        );
        let secret = format!("secret,id=sec0,data={ticket}");
        let args: Vec<String> = [
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-nodefaults",
            "-S",
            "-display",
            "none",
            "-vga",
            "std",
            "-spice",
            &spice,
            "-object",
            &secret,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let command_line = format!("qemu-system-x86_64 {}", args.join(" "));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args);
        let mut child = ChildGuard::spawn("qemu-spice", cmd)?;
        crate::within("QEMU SPICE ports", async {
            for a in [plain, tls] {
                loop {
                    if let Some(st) = child.exited() {
                        child.drain_output();
                        bail!("QEMU exited ({st}): {}", child.output());
                    }
                    if tokio::net::TcpStream::connect(a).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok(())
        })
        .await??;
        Ok(Self {
            child,
            plain,
            tls,
            pki,
            dir,
            command_line,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What QEMU printed (spice-server warnings such as "Invalid password").
    pub fn output(&self) -> String {
        self.child.output()
    }

    /// True while QEMU runs.
    pub fn alive(&mut self) -> bool {
        self.child.exited().is_none()
    }
}

/// One `[[token]]` of a SPICE token file (TOML form, with the compute-side
/// password that the tests' generic writer does not know about).
#[derive(Clone, Debug)]
pub struct SpiceToken {
    pub token: String,
    pub target: SocketAddr,
    pub password: Option<String>,
}

/// Writes a TOML token file of `kind = "spice"` tokens.
pub fn write_spice_tokens(path: &Path, tokens: &[SpiceToken]) -> anyhow::Result<()> {
    let q = |s: &str| serde_json::to_string(s).expect("string");
    let mut text = String::new();
    for t in tokens {
        text.push_str("[[token]]\n");
        text.push_str(&format!("token = {}\n", q(&t.token)));
        text.push_str("kind = \"spice\"\n");
        text.push_str(&format!(
            "target = {}\n",
            q(&crate::net::authority(t.target))
        ));
        if let Some(p) = &t.password {
            text.push_str(&format!("password = {}\n", q(p)));
        }
        text.push('\n');
    }
    crate::proxy::write_atomic(path, &text)
}
