//! Configuration: the TOML file (`FileConfig`), CLI overrides, and the
//! validated [`Config`] the rest of the proxy uses.
//!
//! Precedence: command-line flags, then the config file, then defaults.
//! Relative paths in the file are relative to the file's directory.

pub mod dev;
pub mod kernel;
pub mod tokens;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{ConnectAuthArg, LogFormat, ServeArgs};

/// Default WebSocket listener of the embedded development setup.
pub const DEV_WS_LISTEN: &str = "127.0.0.1:6080";
/// Default CONNECT listener of the embedded development setup.
pub const DEV_CONNECT_LISTEN: &str = "127.0.0.1:6081";

/// Default limit on established sessions at once.
pub const DEFAULT_MAX_SESSIONS: usize = 20_000;
/// Default limit per token: a SPICE console opens a session per channel
/// (main, display, inputs, cursor, sound, several USB redirections).
pub const DEFAULT_MAX_PER_TOKEN: usize = 32;
/// Default limit per tenant address (offices behind one NAT address).
pub const DEFAULT_MAX_PER_SOURCE: usize = 256;

/// The config file as written by an operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub websocket: WebSocketSection,
    #[serde(default)]
    pub connect: ConnectSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub tokens: TokensSection,
    #[serde(default)]
    pub compute: ComputeSection,
    #[serde(default)]
    pub session: SessionSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub kernel: kernel::KernelSection,
    #[serde(default)]
    pub admin: tokens::AdminSection,
    #[serde(default)]
    pub forwarding: ForwardingSection,
}

/// `[forwarding]`: load balancers in front of consolegate.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingSection {
    /// Networks (CIDR) or addresses whose PROXY protocol headers and
    /// X-Forwarded-For / Forwarded headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSection {
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    #[serde(default)]
    pub plain_http: bool,
    /// Also allow plain HTTP on non-loopback addresses (behind a
    /// TLS-terminating load balancer). Off by default.
    #[serde(default)]
    pub plain_http_non_loopback: bool,
    #[serde(default)]
    pub allow_origins: Vec<String>,
    pub ping_interval: Option<String>,
    /// Connections from trusted proxies start with a PROXY protocol header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Directory whose files are served for plain GET requests (`--web`).
    pub web: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectSection {
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    pub auth: Option<ConnectAuthArg>,
    /// Connections from trusted proxies start with a PROXY protocol header.
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSection {
    #[serde(default)]
    pub files: Vec<PathBuf>,
    pub reload_interval: Option<String>,
    /// Reconnect window of use-limited tokens (default 30s).
    pub reconnect_window: Option<String>,
    /// Where admin-API tokens live: memory (default) or redis.
    pub store: Option<tokens::StoreKind>,
    pub redis: Option<tokens::RedisSection>,
    pub signed: Option<tokens::SignedSection>,
    pub http: Option<tokens::HttpSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSection {
    pub connect_timeout: Option<String>,
    /// Profile applied to tokens that name none.
    pub default_profile: Option<String>,
    /// Named compute-side security profiles.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileFile>,
}

/// One `[compute.profiles.NAME]` table: how consolegate authenticates to
/// and encrypts towards a group of compute hosts.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// PEM CA certificate(s) that sign the compute hosts' certificates.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain presented to QEMU.
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key: Option<PathBuf>,
    /// Expected identity in the server certificate (DNS name or IP); by
    /// default the target's host.
    pub server_name: Option<String>,
    /// Refuse compute security types without TLS (default: on when `ca` is set).
    pub require_tls: Option<bool>,
    /// File holding the VNC password.
    pub vnc_password_file: Option<PathBuf>,
    /// SASL (and VeNCrypt Plain) user name.
    pub sasl_username: Option<String>,
    /// File holding the SASL password.
    pub sasl_password_file: Option<PathBuf>,
    /// File holding the SPICE ticket (password).
    pub spice_password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    pub handshake_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    /// On SIGTERM, how long live sessions may go on before they are closed.
    pub drain_timeout: Option<String>,
    /// Sessions are closed after this long, busy or not ("0" = never).
    pub max_duration: Option<String>,
    /// Established sessions at once, in total (0 = no limit).
    pub max_sessions: Option<usize>,
    /// ... per token (a SPICE console uses one per channel).
    pub max_sessions_per_token: Option<usize>,
    /// ... per tenant address.
    pub max_sessions_per_source: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<LogFormat>,
    /// Append one JSON line per console session to this file.
    pub audit_file: Option<PathBuf>,
}

/// Where the tenant-facing certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantTls {
    /// Operator-provided PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// The self-signed development certificate in the state directory.
    Dev { dir: PathBuf },
    /// Plain HTTP, explicitly requested.
    Off,
}

/// How the CONNECT front end authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectAuth {
    Token,
    None,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub ws_listen: Vec<SocketAddr>,
    pub connect_listen: Vec<SocketAddr>,
    pub tenant_tls: TenantTls,
    pub allow_origins: Vec<String>,
    /// Load balancers whose PROXY / X-Forwarded-For headers are believed.
    pub trusted_proxies: crate::front::forwarded::TrustedNets,
    /// PROXY protocol expected from trusted peers on the WebSocket listeners.
    pub ws_proxy_protocol: bool,
    /// PROXY protocol expected from trusted peers on the CONNECT listeners.
    pub connect_proxy_protocol: bool,
    pub connect_auth: ConnectAuth,
    pub token_sources: Vec<PathBuf>,
    /// The dev token file must be created if missing.
    pub dev_tokens: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub reload_interval: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    /// On SIGTERM, how long live sessions may go on before they are closed.
    pub drain_timeout: Duration,
    /// Sessions are closed after this long.
    pub max_duration: Option<Duration>,
    /// Session count limits.
    pub limits: crate::limits::Maxima,
    pub log_format: LogFormat,
    /// Audit records also go to this file (JSON lines).
    pub audit_file: Option<PathBuf>,
    pub ready_file: Option<PathBuf>,
    /// Compute-side security profiles by name.
    pub profiles: BTreeMap<String, ProfileFile>,
    /// Profile for tokens that name none.
    pub default_profile: Option<String>,
    /// Data path of established sessions.
    pub datapath: kernel::DatapathMode,
    /// eBPF connect allow-list.
    pub allowlist: kernel::AllowListMode,
    /// Where the allow-list attaches.
    pub cgroup: kernel::CgroupMode,
    /// Kernel TLS offload of TLS legs.
    pub ktls: kernel::KtlsMode,
    /// Records after which a kTLS transmit key is renewed, if lower than
    /// its cipher's limit.
    pub ktls_records_per_key: Option<u64>,
    /// Resolvers besides token files, reconnect window.
    pub resolvers: tokens::ResolverConfig,
    /// The admin API, if configured.
    pub admin: Option<tokens::AdminConfig>,
    /// Canonical path of the `--web` directory.
    pub web: Option<PathBuf>,
}

/// Why a configuration is invalid. Reported with exit code 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: invalid duration {value:?} (examples: 500ms, 10s, 5m, 1h, 0)")]
    Duration {
        setting: &'static str,
        value: String,
    },
    #[error("no listener configured: set websocket.listen and/or connect.listen")]
    NoListener,
    #[error(
        "plain HTTP on non-loopback address {0}: use TLS, or set websocket.plain_http_non_loopback = true"
    )]
    PlainHttpNotLoopback(SocketAddr),
    #[error("tls.cert and tls.key must be given together")]
    HalfTls,
    #[error("allowed origin {0:?} must look like scheme://host[:port]")]
    BadOrigin(String),
    #[error("no token source: give --token-file or tokens.files")]
    NoTokens,
    #[error("compute profile {profile:?}: {message}")]
    Profile {
        profile: String,
        message: &'static str,
    },
    #[error("forwarding.trusted_proxies: {0}")]
    TrustedProxy(#[from] crate::front::forwarded::BadNet),
    #[error(
        "proxy_protocol is on but forwarding.trusted_proxies is empty: no peer's PROXY header would be believed"
    )]
    ProxyProtocolUntrusted,
    #[error("compute.default_profile {0:?} names no [compute.profiles.{0}] table")]
    UnknownDefaultProfile(String),
    #[error("{0}")]
    Invalid(String),
    #[error("web directory {path}: {message}")]
    WebDir { path: PathBuf, message: String },
}

fn duration(
    setting: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value.map(str::trim) {
        None => Ok(default),
        Some("0") => Ok(Duration::ZERO),
        Some(v) => humantime::parse_duration(v).map_err(|_| ConfigError::Duration {
            setting,
            value: v.to_owned(),
        }),
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut fc: FileConfig = toml::from_str(text).map_err(|e| {
            // One line: "line N, column M: what is wrong".
            let message = match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: {}", e.message().trim())
                }
                None => e.message().trim().to_owned(),
            };
            ConfigError::Parse {
                path: path.to_owned(),
                message: message.replace('\n', " "),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fc.tokens.files.iter_mut().for_each(rel);
        fc.tls.cert.as_mut().map(rel);
        fc.tls.key.as_mut().map(rel);
        fc.state_dir.as_mut().map(rel);
        fc.log.audit_file.as_mut().map(rel);
        tokens::anchor(
            base,
            &mut fc.tokens.signed,
            &mut fc.tokens.http,
            &mut fc.admin,
        );
        fc.websocket.web.as_mut().map(rel);
        for p in fc.compute.profiles.values_mut() {
            for path in [
                &mut p.ca,
                &mut p.cert,
                &mut p.key,
                &mut p.vnc_password_file,
                &mut p.sasl_password_file,
                &mut p.spice_password_file,
            ] {
                path.as_mut().map(rel);
            }
        }
        Ok(fc)
    }
}

impl Config {
    /// Builds the validated configuration from flags and an optional file.
    pub fn build(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => Some(FileConfig::read(p)?),
            None => None,
        };
        let dev = file.is_none() && args.token_file.is_empty();
        let fc = file.unwrap_or_default();

        let state_dir = args
            .state_dir
            .clone()
            .or(fc.state_dir)
            .unwrap_or_else(|| PathBuf::from("consolegate-dev"));

        let pick = |flag: &[SocketAddr], file: &[SocketAddr]| -> Vec<SocketAddr> {
            if flag.is_empty() {
                file.to_vec()
            } else {
                flag.to_vec()
            }
        };
        let mut ws_listen = pick(&args.ws_listen, &fc.websocket.listen);
        let mut connect_listen = pick(&args.connect_listen, &fc.connect.listen);
        if dev && ws_listen.is_empty() && connect_listen.is_empty() {
            ws_listen = vec![DEV_WS_LISTEN.parse().expect("constant address")];
            connect_listen = vec![DEV_CONNECT_LISTEN.parse().expect("constant address")];
        }
        if ws_listen.is_empty() && connect_listen.is_empty() {
            return Err(ConfigError::NoListener);
        }

        let plain = args.plain_http || fc.websocket.plain_http;
        let (cert, key) = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
            _ => (fc.tls.cert, fc.tls.key),
        };
        let tenant_tls = match (cert, key) {
            (Some(cert), Some(key)) => TenantTls::Files { cert, key },
            (None, None) if plain => TenantTls::Off,
            (None, None) => TenantTls::Dev {
                dir: state_dir.join("tls"),
            },
            _ => return Err(ConfigError::HalfTls),
        };
        if tenant_tls == TenantTls::Off
            && !fc.websocket.plain_http_non_loopback
            && let Some(a) = ws_listen.iter().find(|a| !a.ip().is_loopback())
        {
            return Err(ConfigError::PlainHttpNotLoopback(*a));
        }

        let allow_origins = if args.allow_origin.is_empty() {
            fc.websocket.allow_origins
        } else {
            args.allow_origin.clone()
        };
        for o in &allow_origins {
            let ok = o
                .split_once("://")
                .is_some_and(|(s, h)| !s.is_empty() && !h.is_empty() && !h.contains('/'));
            if !ok {
                return Err(ConfigError::BadOrigin(o.clone()));
            }
        }

        let trusted = if args.trusted_proxy.is_empty() {
            fc.forwarding.trusted_proxies
        } else {
            args.trusted_proxy.clone()
        };
        let trusted_proxies = crate::front::forwarded::TrustedNets::parse(&trusted)?;
        let ws_proxy_protocol = args.proxy_protocol || fc.websocket.proxy_protocol;
        let connect_proxy_protocol = args.proxy_protocol || fc.connect.proxy_protocol;
        if (ws_proxy_protocol || connect_proxy_protocol) && trusted_proxies.is_empty() {
            return Err(ConfigError::ProxyProtocolUntrusted);
        }

        let connect_auth = match args.connect_auth.or(fc.connect.auth) {
            Some(ConnectAuthArg::None) => ConnectAuth::None,
            Some(ConnectAuthArg::Token) | None => ConnectAuth::Token,
        };

        let mut token_sources = if args.token_file.is_empty() {
            fc.tokens.files
        } else {
            args.token_file.clone()
        };
        let dev_tokens = if dev {
            let p = state_dir.join("tokens.toml");
            token_sources = vec![p.clone()];
            Some(p)
        } else {
            None
        };
        let resolvers = tokens::build_resolvers(
            fc.tokens.reconnect_window.as_deref(),
            fc.tokens.store,
            fc.tokens.redis.as_ref(),
            fc.tokens.signed.as_ref(),
            fc.tokens.http.as_ref(),
        )?;
        let admin = tokens::build_admin(&fc.admin)?;
        if token_sources.is_empty() && !resolvers.has_other_sources(admin.is_some()) {
            return Err(ConfigError::NoTokens);
        }

        let d = |s: &'static str, flag: &Option<String>, file: &Option<String>, def: u64| {
            duration(
                s,
                flag.as_deref().or(file.as_deref()),
                Duration::from_secs(def),
            )
        };
        let handshake_timeout = d(
            "handshake_timeout",
            &args.handshake_timeout,
            &fc.session.handshake_timeout,
            10,
        )?;
        let connect_timeout = d(
            "connect_timeout",
            &args.connect_timeout,
            &fc.compute.connect_timeout,
            5,
        )?;
        let idle_timeout = d(
            "idle_timeout",
            &args.idle_timeout,
            &fc.session.idle_timeout,
            3600,
        )?;
        let ping_interval = d(
            "ping_interval",
            &args.ping_interval,
            &fc.websocket.ping_interval,
            30,
        )?;
        let reload_interval = d("reload_interval", &None, &fc.tokens.reload_interval, 2)?;
        let drain_timeout = d(
            "drain_timeout",
            &args.drain_timeout,
            &fc.session.drain_timeout,
            30,
        )?;
        let max_duration = d(
            "max_duration",
            &args.max_session_duration,
            &fc.session.max_duration,
            24 * 3600,
        )?;
        let limits = crate::limits::Maxima {
            total: args
                .max_sessions
                .or(fc.session.max_sessions)
                .unwrap_or(DEFAULT_MAX_SESSIONS),
            per_token: args
                .max_sessions_per_token
                .or(fc.session.max_sessions_per_token)
                .unwrap_or(DEFAULT_MAX_PER_TOKEN),
            per_source: args
                .max_sessions_per_source
                .or(fc.session.max_sessions_per_source)
                .unwrap_or(DEFAULT_MAX_PER_SOURCE),
        };

        let mut profiles = fc.compute.profiles;
        let mut default_profile = fc.compute.default_profile;
        if args.compute_ca.is_some() || args.compute_cert.is_some() {
            profiles.insert(
                "cli".to_owned(),
                ProfileFile {
                    ca: args.compute_ca.clone(),
                    cert: args.compute_cert.clone(),
                    key: args.compute_key.clone(),
                    ..Default::default()
                },
            );
            default_profile = Some("cli".to_owned());
        }
        for (name, p) in &profiles {
            let err = |message| ConfigError::Profile {
                profile: name.clone(),
                message,
            };
            if p.cert.is_some() != p.key.is_some() {
                return Err(err("cert and key must be given together"));
            }
            if p.cert.is_some() && p.ca.is_none() {
                return Err(err(
                    "a client certificate needs the CA of the compute hosts (ca)",
                ));
            }
            if p.require_tls == Some(true) && p.ca.is_none() {
                return Err(err("require_tls needs the CA of the compute hosts (ca)"));
            }
            if p.sasl_username.is_some() != p.sasl_password_file.is_some() {
                return Err(err("sasl_username and sasl_password_file go together"));
            }
        }
        if let Some(d) = &default_profile
            && !profiles.contains_key(d)
        {
            return Err(ConfigError::UnknownDefaultProfile(d.clone()));
        }

        let web = match args.web.clone().or(fc.websocket.web) {
            Some(dir) => Some(web_dir(dir)?),
            None => None,
        };

        Ok(Config {
            resolvers,
            admin,
            ws_listen,
            connect_listen,
            tenant_tls,
            allow_origins,
            connect_auth,
            token_sources,
            dev_tokens,
            state_dir,
            reload_interval: if reload_interval.is_zero() {
                Duration::from_secs(2)
            } else {
                reload_interval
            },
            handshake_timeout: if handshake_timeout.is_zero() {
                Duration::from_secs(10)
            } else {
                handshake_timeout
            },
            connect_timeout: if connect_timeout.is_zero() {
                Duration::from_secs(5)
            } else {
                connect_timeout
            },
            idle_timeout: nonzero(idle_timeout),
            ping_interval: nonzero(ping_interval),
            drain_timeout,
            max_duration: nonzero(max_duration),
            limits,
            trusted_proxies,
            ws_proxy_protocol,
            connect_proxy_protocol,
            log_format: args.log_format.or(fc.log.format).unwrap_or_default(),
            audit_file: args.audit_log.clone().or(fc.log.audit_file),
            ready_file: args.ready_file.clone(),
            profiles,
            default_profile,
            datapath: args.datapath.or(fc.kernel.datapath).unwrap_or_default(),
            allowlist: args.allowlist.or(fc.kernel.allowlist).unwrap_or_default(),
            cgroup: fc.kernel.cgroup.unwrap_or_default(),
            ktls: args.ktls.or(fc.kernel.ktls).unwrap_or_default(),
            ktls_records_per_key: fc
                .kernel
                .ktls_records_per_key
                .map(std::num::NonZeroU64::get),
            web,
        })
    }
}

/// The canonical path of a `--web` directory, which must exist.
fn web_dir(dir: PathBuf) -> Result<PathBuf, ConfigError> {
    let err = |message: String| ConfigError::WebDir {
        path: dir.clone(),
        message,
    };
    let canonical = dir.canonicalize().map_err(|e| err(e.to_string()))?;
    if !canonical.is_dir() {
        return Err(err("not a directory".to_owned()));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests;
