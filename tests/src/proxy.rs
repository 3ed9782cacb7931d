//! Launches the real `consolegate` binary: token files and PEM files in a
//! temp dir, `serve ... --ready-file F`, waits for F, captures its log
//! output, and kills it by PID on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::certs::TestPki;
use crate::net::Transport;
use crate::process::ChildGuard;

/// Path of the consolegate binary: `$CONSOLEGATE_BIN`, else
/// `<target>/debug/consolegate` next to this test executable (built with
/// `cargo build -p consolegate` if it is missing).
pub fn binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn locate() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CONSOLEGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot derive the target dir from the test executable")?;
    let bin = profile_dir.join("consolegate");
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let st = Command::new(cargo)
            .current_dir(&workspace)
            .args(["build", "-p", "consolegate", "--bin", "consolegate"])
            .status()
            .context("running cargo build -p consolegate")?;
        anyhow::ensure!(st.success(), "cargo build -p consolegate failed");
    }
    anyhow::ensure!(bin.exists(), "{} not found", bin.display());
    warn_if_stale(
        &bin,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy"),
    );
    Ok(bin)
}

/// `cargo test -p consolegate-tests` does not rebuild the binary: say so
/// loudly when a proxy source file is newer than it.
fn warn_if_stale(bin: &Path, src: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        let mut best = None;
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest(&p)
            } else {
                e.metadata().ok()?.modified().ok()
            };
            best = best.max(t);
        }
        best
    }
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(src_time)) = (built, newest(src))
        && src_time > built
    {
        eprintln!(
            "WARNING: {} is older than the proxy sources; run `cargo build -p consolegate` \
             (or set CONSOLEGATE_BIN) to test the current code",
            bin.display()
        );
    }
}

/// What to pass to `consolegate serve`. Empty listener lists mean the flag
/// is not passed at all.
#[derive(Clone, Debug, Default)]
pub struct ProxySpec {
    pub ws_listen: Vec<String>,
    pub connect_listen: Vec<String>,
    pub token_files: Vec<PathBuf>,
    /// Generate a CA + server cert and pass `--tls-cert/--tls-key`.
    pub tls: bool,
    pub plain_http: bool,
    pub allow_origins: Vec<String>,
    pub connect_auth: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub handshake_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub extra: Vec<String>,
    /// A command the binary is started through, e.g. `setpriv ... --`
    /// (empty: run it directly).
    pub launcher: Vec<String>,
}

impl ProxySpec {
    /// TLS WebSocket listener on 127.0.0.1:0 serving these token files.
    pub fn tls_ws(token_files: &[&Path]) -> Self {
        Self {
            ws_listen: vec!["127.0.0.1:0".into()],
            token_files: token_files.iter().map(|p| p.to_path_buf()).collect(),
            tls: true,
            ..Self::default()
        }
    }

    /// Plain-HTTP WebSocket listener on 127.0.0.1:0.
    pub fn plain_ws(token_files: &[&Path]) -> Self {
        Self {
            ws_listen: vec!["127.0.0.1:0".into()],
            token_files: token_files.iter().map(|p| p.to_path_buf()).collect(),
            plain_http: true,
            ..Self::default()
        }
    }

    /// CONNECT listener on 127.0.0.1:0.
    pub fn connect(token_files: &[&Path]) -> Self {
        Self {
            connect_listen: vec!["127.0.0.1:0".into()],
            token_files: token_files.iter().map(|p| p.to_path_buf()).collect(),
            // A WebSocket listener is needed too unless the proxy accepts
            // CONNECT-only configurations; keep it plain and loopback.
            ws_listen: vec!["127.0.0.1:0".into()],
            plain_http: true,
            ..Self::default()
        }
    }
}

#[derive(Debug)]
pub struct Proxy {
    child: ChildGuard,
    pub websocket: Vec<SocketAddr>,
    pub connect: Vec<SocketAddr>,
    /// The admin API's TCP listener, if one is configured.
    pub admin: Option<SocketAddr>,
    pub pki: Option<TestPki>,
    pub dir: tempfile::TempDir,
    plain: bool,
}

impl Proxy {
    pub async fn start(spec: ProxySpec) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cg-proxy-").tempdir()?;
        let mut args: Vec<String> = vec!["serve".into()];
        for a in &spec.ws_listen {
            args.extend(["--ws-listen".into(), a.clone()]);
        }
        for a in &spec.connect_listen {
            args.extend(["--connect-listen".into(), a.clone()]);
        }
        for t in &spec.token_files {
            args.extend(["--token-file".into(), t.display().to_string()]);
        }
        let pki = if spec.tls {
            let pki = TestPki::generate(&dir.path().join("pki"))?;
            args.extend(["--tls-cert".into(), pki.cert_path.display().to_string()]);
            args.extend(["--tls-key".into(), pki.key_path.display().to_string()]);
            Some(pki)
        } else {
            None
        };
        if spec.plain_http {
            args.push("--plain-http".into());
        }
        for o in &spec.allow_origins {
            args.extend(["--allow-origin".into(), o.clone()]);
        }
        if let Some(a) = &spec.connect_auth {
            args.extend(["--connect-auth".into(), a.clone()]);
        }
        let state = spec
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        args.extend(["--state-dir".into(), state.display().to_string()]);
        if let Some(t) = &spec.handshake_timeout {
            args.extend(["--handshake-timeout".into(), t.clone()]);
        }
        if let Some(t) = &spec.connect_timeout {
            args.extend(["--connect-timeout".into(), t.clone()]);
        }
        args.extend(spec.extra.iter().cloned());
        let mut p = Self::start_args_via(dir, &spec.launcher, &args).await?;
        p.pki = pki;
        p.plain = spec.plain_http;
        Ok(p)
    }

    /// Runs `consolegate <args> --ready-file <dir>/ready.json` (plus
    /// `--log-format text` unless `args` choose a format) and waits for the
    /// ready file.
    pub async fn start_args(dir: tempfile::TempDir, args: &[String]) -> anyhow::Result<Self> {
        Self::start_args_via(dir, &[], args).await
    }

    /// [`Proxy::start_args`] through a `launcher` command (empty: none).
    pub async fn start_args_via(
        dir: tempfile::TempDir,
        launcher: &[String],
        args: &[String],
    ) -> anyhow::Result<Self> {
        let ready = dir.path().join("ready.json");
        let mut cmd = match launcher.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(binary()?);
                c
            }
            None => Command::new(binary()?),
        };
        cmd.args(args)
            .arg("--ready-file")
            .arg(&ready)
            .current_dir(dir.path())
            .env_remove("RUST_LOG");
        if !args.iter().any(|a| a == "--log-format") {
            cmd.args(["--log-format", "text"]);
        }
        let mut child = ChildGuard::spawn("consolegate", cmd)?;
        let addrs = crate::within("consolegate ready file", async {
            loop {
                if let Some(st) = child.exited() {
                    child.drain_output();
                    bail!("consolegate exited early ({st}): {}", child.output());
                }
                if let Ok(text) = std::fs::read_to_string(&ready)
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                {
                    let list = |k: &str| -> anyhow::Result<Vec<SocketAddr>> {
                        match v.get(k) {
                            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                            Some(a) => a
                                .as_array()
                                .context("ready file: not an array")?
                                .iter()
                                .map(|s| {
                                    s.as_str()
                                        .context("ready file: not a string")?
                                        .parse::<SocketAddr>()
                                        .context("ready file: bad address")
                                })
                                .collect(),
                        }
                    };
                    let admin = v
                        .get("admin")
                        .and_then(|a| a.get("tcp"))
                        .and_then(|t| t.as_str())
                        .and_then(|t| t.parse::<SocketAddr>().ok());
                    return Ok((list("websocket")?, list("connect")?, admin));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await??;
        Ok(Self {
            child,
            websocket: addrs.0,
            connect: addrs.1,
            admin: addrs.2,
            pki: None,
            dir,
            plain: false,
        })
    }

    /// The first WebSocket listener.
    pub fn ws_addr(&self) -> SocketAddr {
        self.websocket[0]
    }

    /// The first CONNECT listener.
    pub fn connect_addr(&self) -> SocketAddr {
        self.connect[0]
    }

    /// How a tenant reaches the WebSocket listeners (TLS trusting our CA,
    /// or plain).
    pub fn transport(&self) -> Transport {
        match (&self.pki, self.plain) {
            (Some(pki), false) => Transport::Tls(pki.client_config().expect("client config")),
            _ => Transport::Plain,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.child.output()
    }

    /// Whether the proxy found kernel TLS at start (its one start-up line
    /// says "kTLS available" or "kTLS unavailable"), and that line.
    pub async fn ktls_available(&self) -> anyhow::Result<(bool, String)> {
        let line = self.wait_log(&["kTLS ", "available"]).await?;
        Ok((line.contains("kTLS available"), line))
    }

    /// The data path label TLS sessions in binary mode get from this proxy:
    /// `ktls+splice` where the kernel has kTLS, else `copy`. Prints
    /// `skipped: ...` for the kTLS path when the kernel lacks it.
    pub async fn tls_datapath(&self) -> anyhow::Result<&'static str> {
        let (ktls, line) = self.ktls_available().await?;
        if ktls {
            Ok("ktls+splice")
        } else {
            println!("skipped: the ktls+splice path ({line}); testing the rustls fallback");
            Ok("copy")
        }
    }

    /// Waits (bounded) until the logs contain a line with every one of `parts`.
    pub async fn wait_log(&self, parts: &[&str]) -> anyhow::Result<String> {
        let found = crate::within_for(Duration::from_secs(30), "log line", async {
            loop {
                let logs = self.logs();
                if let Some(l) = logs.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                    return l.to_owned();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.with_context(|| format!("no log line with {parts:?}; logs:\n{}", self.logs()))
    }

    /// Waits (bounded) until at least `n` log lines contain every one of `parts`.
    pub async fn wait_log_count(&self, parts: &[&str], n: usize) -> anyhow::Result<()> {
        let found = crate::within_for(Duration::from_secs(30), "log lines", async {
            loop {
                let logs = self.logs();
                let c = logs
                    .lines()
                    .filter(|l| parts.iter().all(|p| l.contains(p)))
                    .count();
                if c >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.with_context(|| {
            format!(
                "fewer than {n} log lines with {parts:?}; logs:\n{}",
                self.logs()
            )
        })
    }

    /// Fails if any secret appears anywhere in the output so far.
    pub fn assert_secrets_not_logged(&self, secrets: &[&str]) {
        let logs = self.logs();
        for s in secrets {
            assert!(
                !logs.contains(s),
                "token secret {s:?} appears in the logs:\n{logs}"
            );
        }
    }

    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        self.child.signal(sig)
    }

    /// True while the proxy process runs.
    pub fn alive(&mut self) -> bool {
        self.child.exited().is_none()
    }
}

/// One `[[token]]` entry of the TOML token file form.
#[derive(Clone, Debug, Default)]
pub struct TomlToken {
    pub token: String,
    pub kind: Option<String>,
    pub target: Option<String>,
    pub unix: Option<PathBuf>,
    pub not_after: Option<String>,
    pub not_before: Option<String>,
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

pub fn toml_text(tokens: &[TomlToken]) -> String {
    let mut s = String::new();
    for t in tokens {
        s.push_str("[[token]]\n");
        s.push_str(&format!("token = {}\n", quote(&t.token)));
        if let Some(k) = &t.kind {
            s.push_str(&format!("kind = {}\n", quote(k)));
        }
        if let Some(x) = &t.target {
            s.push_str(&format!("target = {}\n", quote(x)));
        }
        if let Some(u) = &t.unix {
            s.push_str(&format!("unix = {}\n", quote(&u.display().to_string())));
        }
        if let Some(x) = &t.not_after {
            s.push_str(&format!("not_after = {}\n", quote(x)));
        }
        if let Some(x) = &t.not_before {
            s.push_str(&format!("not_before = {}\n", quote(x)));
        }
        s.push('\n');
    }
    s
}

/// Writes a file atomically (temp name starting with '.' + rename), so a
/// polling proxy never sees half a file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path.file_name().context("no file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", rand::random::<u32>()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn write_toml_tokens(path: &Path, tokens: &[TomlToken]) -> anyhow::Result<()> {
    write_atomic(path, &toml_text(tokens))
}

/// websockify TokenFile form: `token: target` lines.
pub fn write_websockify_tokens(path: &Path, entries: &[(&str, String)]) -> anyhow::Result<()> {
    let mut s = String::from("# written by consolegate-tests\n");
    for (t, target) in entries {
        s.push_str(&format!("{t}: {target}\n"));
    }
    write_atomic(path, &s)
}

/// A token for a scripted raw-byte compute peer (echo, reset...): kind
/// `serial`, which the contract relays as plain bytes. (A `vnc` token makes
/// the proxy speak RFB to the compute side, which a scripted peer is not.)
pub fn raw_token(token: &str, target: SocketAddr) -> TomlToken {
    TomlToken {
        token: token.to_owned(),
        kind: Some("serial".into()),
        target: Some(crate::net::authority(target)),
        ..TomlToken::default()
    }
}
