//! Command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// consolegate: a secure gateway to virtual-machine consoles.
#[derive(Debug, Parser)]
#[command(name = "consolegate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy. Without --config or --token-file it runs the embedded
    /// development default (loopback, self-signed certificate, generated token).
    Serve(Box<ServeArgs>),
    /// Print which kernel accelerations this kernel and these privileges
    /// allow, and which the configuration would use.
    Doctor {
        /// TOML configuration file (default: the development setup).
        #[arg(long)]
        config: Option<PathBuf>,
        /// As `serve --datapath`.
        #[arg(long, value_enum)]
        datapath: Option<crate::config::kernel::DatapathMode>,
        /// As `serve --allowlist`.
        #[arg(long, value_enum)]
        allowlist: Option<crate::config::kernel::AllowListMode>,
        /// As `serve --ktls`.
        #[arg(long, value_enum)]
        ktls: Option<crate::config::kernel::KtlsMode>,
    },
    /// Validate a configuration file and exit (0 = valid, 64 = invalid).
    CheckConfig {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

/// Flags of `serve`; each overrides the same setting of the config file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// WebSocket listener address (repeatable). HTTPS unless --plain-http.
    #[arg(long = "ws-listen", value_name = "ADDR")]
    pub ws_listen: Vec<SocketAddr>,
    /// HTTP CONNECT listener address (repeatable).
    #[arg(long = "connect-listen", value_name = "ADDR")]
    pub connect_listen: Vec<SocketAddr>,
    /// Token file or directory (repeatable): websockify format, or TOML if it ends in .toml.
    #[arg(long = "token-file", value_name = "PATH")]
    pub token_file: Vec<PathBuf>,
    /// PEM certificate chain for tenant-facing TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for tenant-facing TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve WebSocket over unencrypted HTTP (loopback listeners only).
    #[arg(long)]
    pub plain_http: bool,
    /// Allowed WebSocket Origin, e.g. https://console.example.com (repeatable).
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// CONNECT proxy authentication.
    #[arg(long, value_enum)]
    pub connect_auth: Option<ConnectAuthArg>,
    /// Directory for the development certificate and token file.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Write the bound listener addresses as JSON to this file once ready.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Also append one JSON audit record per console session to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Time allowed for TLS and the HTTP request head (e.g. 10s).
    #[arg(long, value_name = "DUR")]
    pub handshake_timeout: Option<String>,
    /// Compute-side dial timeout (e.g. 5s).
    #[arg(long, value_name = "DUR")]
    pub connect_timeout: Option<String>,
    /// Close sessions with no data either way for this long (0 = never).
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// CA of the compute hosts' certificates (PEM): enables TLS to QEMU with
    /// the default compute profile.
    #[arg(long, value_name = "PATH")]
    pub compute_ca: Option<PathBuf>,
    /// Client certificate presented to QEMU (PEM).
    #[arg(long, value_name = "PATH", requires_all = ["compute_key", "compute_ca"])]
    pub compute_cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM).
    #[arg(long, value_name = "PATH", requires = "compute_cert")]
    pub compute_key: Option<PathBuf>,
    /// WebSocket keepalive ping interval (0 = off).
    #[arg(long, value_name = "DUR")]
    pub ping_interval: Option<String>,
    /// Data path of established sessions: auto, copy or splice.
    #[arg(long, value_enum)]
    pub datapath: Option<crate::config::kernel::DatapathMode>,
    /// eBPF connect allow-list: off, auto (warn if unavailable) or required.
    #[arg(long, value_enum)]
    pub allowlist: Option<crate::config::kernel::AllowListMode>,
    /// Kernel TLS offload of TLS legs after the handshake: auto or off.
    #[arg(long, value_enum)]
    pub ktls: Option<crate::config::kernel::KtlsMode>,
    /// On SIGTERM, how long live sessions may go on before they are closed
    /// (default 30s; 0 = close them at once).
    #[arg(long, value_name = "DUR")]
    pub drain_timeout: Option<String>,
    /// Load balancer network (CIDR) or address whose PROXY protocol and
    /// X-Forwarded-For headers are believed (repeatable).
    #[arg(long = "trusted-proxy", value_name = "NET")]
    pub trusted_proxy: Vec<String>,
    /// Expect a PROXY protocol header (v1 or v2) from trusted proxies on
    /// every listener.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Close sessions after this long, busy or not (default 24h; 0 = never).
    #[arg(long, value_name = "DUR")]
    pub max_session_duration: Option<String>,
    /// Established sessions at once, in total (default 20000; 0 = no limit).
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// Established sessions at once per token (default 32; 0 = no limit).
    #[arg(long, value_name = "N")]
    pub max_sessions_per_token: Option<usize>,
    /// Established sessions at once per tenant address (default 256; 0 = no limit).
    #[arg(long, value_name = "N")]
    pub max_sessions_per_source: Option<usize>,
    /// Serve this directory's files for plain GET requests on the WebSocket
    /// listeners (like websockify --web), before the built-in console pages.
    #[arg(long, value_name = "DIR")]
    pub web: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectAuthArg {
    /// Proxy-Authorization must carry a token for the requested target.
    Token,
    /// No authentication; the target must still be a known console.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
