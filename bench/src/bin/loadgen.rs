//! `loadgen`: load for consolegate and the proxies people use today; every
//! result is one JSON line on stdout.
//!
//! ```text
//! # compute-side stand-ins
//! loadgen flood-server --listen 127.0.0.1:0 --bytes 1073741824 --clients 1
//! loadgen echo-server --listen 127.0.0.1:0
//! # tenant side: --connect is the backend (direct) or the proxy in front of it
//! loadgen bulk    --connect 127.0.0.1:5900 --bytes 1073741824
//! loadgen latency --connect 127.0.0.1:6080 --front ws --path '/websockify?token=T' --tls --ca ca.pem
//! loadgen idle    --connect 127.0.0.1:6081 --front connect --target 127.0.0.1:4555 --token T \
//!                 --sessions 1000 --proxy-pid 4242
//! # everything side by side, with a report
//! loadgen compare --quick --out target/bench
//! ```
//! The servers print `{"event":"listening","addr":...}` once bound (so port 0
//! works). Clients exit nonzero when a run came up short.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use consolegate_bench::tenant::{Dial, Front};
use consolegate_bench::tls::TlsClient;
use consolegate_bench::{bulk, compare, echo, flood, idle, latency, mb_per_s, scale};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load for consolegate and its peers: bulk, round-trip latency, idle scale; JSON on stdout"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FrontArg {
    /// Bytes straight through (direct, or a TCP proxy).
    Raw,
    /// HTTP CONNECT to --target, token as a Bearer Proxy-Authorization.
    Connect,
    /// WebSocket upgrade at --path, binary frames (masked, as a browser sends).
    Ws,
}

/// How to reach the console: shared by bulk, latency and idle.
#[derive(Debug, Args)]
struct TenantArgs {
    /// Address to connect to: the backend itself, or the proxy in front of it.
    #[arg(long, value_name = "ADDR")]
    connect: String,
    /// What the proxy speaks on that address.
    #[arg(long, value_enum, default_value = "raw")]
    front: FrontArg,
    /// CONNECT target, host:port (--front connect). Repeatable: sessions
    /// take the targets in turn (with the --token of the same position, or
    /// the only one), so the proxy dials several backend addresses.
    #[arg(long, value_name = "HOST:PORT", required_if_eq("front", "connect"))]
    target: Vec<String>,
    /// Token for --front connect (sent as a Bearer token); repeatable, one
    /// per --target.
    #[arg(long, value_name = "TOKEN", env = "LOADGEN_TOKEN")]
    token: Vec<String>,
    /// WebSocket request path with the token (--front ws), e.g.
    /// /websockify?token=T. Repeatable: sessions take the paths in turn.
    #[arg(long, value_name = "PATH", default_value = "/")]
    path: Vec<String>,
    /// Bind each session to one of N loopback source addresses first
    /// (127.0.0.2 to 127.0.0.N+1, in turn), for more sessions than one
    /// address has ephemeral ports for (about 28,000); 0: the kernel's choice.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=250))]
    source_addrs: u16,
    /// Speak TLS to --connect (wss://, TLS-terminating proxies).
    #[arg(long)]
    tls: bool,
    /// PEM CA file that the proxy's certificate must chain to.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// Name checked against the proxy's certificate.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    server_name: String,
    /// Seconds a connect or a blocked read may take.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

impl TenantArgs {
    fn fronts(&self) -> Result<Vec<Front>> {
        Ok(match self.front {
            FrontArg::Raw => vec![Front::Raw],
            FrontArg::Connect => {
                let (targets, tokens) = (&self.target, &self.token);
                if tokens.len() > 1 && tokens.len() != targets.len() {
                    anyhow::bail!(
                        "{} --token for {} --target: give one token, or one per target",
                        tokens.len(),
                        targets.len()
                    );
                }
                targets
                    .iter()
                    .enumerate()
                    .map(|(i, target)| Front::Connect {
                        target: target.clone(),
                        token: tokens.get(i).or(tokens.first()).cloned(),
                    })
                    .collect()
            }
            FrontArg::Ws => self
                .path
                .iter()
                .map(|path| Front::Ws { path: path.clone() })
                .collect(),
        })
    }

    fn dial(&self) -> Result<Dial> {
        let mut fronts = self.fronts()?.into_iter();
        let front = fronts.next().unwrap_or(Front::Raw);
        let tls = if self.tls {
            let ca = self
                .ca
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--tls needs --ca FILE"))?;
            Some(TlsClient::from_ca_file(ca, &self.server_name)?)
        } else {
            None
        };
        let mut dial = Dial::new(&self.connect, front, tls, Duration::from_secs(self.timeout))?
            .with_sources(scale::source_addrs(self.source_addrs)?)?;
        dial.more_fronts = fronts.collect();
        Ok(dial)
    }
}

/// TLS for a backend (a compute host speaking TLS, as QEMU does).
#[derive(Debug, Args)]
struct ServerTls {
    /// PEM certificate chain: serve TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ServerTls {
    fn config(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some(consolegate_bench::tls::server_config(c, k)?)),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Read N bytes of payload per session from a flood backend; Gbit/s.
    Bulk {
        #[command(flatten)]
        tenant: TenantArgs,
        /// Payload bytes to read on each session.
        #[arg(long, value_name = "N", default_value_t = 1 << 30)]
        bytes: u64,
        /// Parallel sessions.
        #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        connections: u64,
        /// Discard plaintext payload in the kernel (recv with MSG_TRUNC)
        /// instead of copying it out: the client then costs little CPU, so
        /// the proxy, not the client, limits the run. TLS still decrypts.
        #[arg(long)]
        discard: bool,
    },
    /// Ping-pong small messages through an echo backend; HDR percentiles.
    Latency {
        #[command(flatten)]
        tenant: TenantArgs,
        /// Timed round trips per session.
        #[arg(long, value_name = "M", default_value_t = 10_000)]
        messages: u64,
        /// Untimed round trips first.
        #[arg(long, value_name = "W", default_value_t = 500)]
        warmup: u64,
        /// Payload bytes per message (a keystroke event is tens of bytes).
        #[arg(long, value_name = "BYTES", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
        size: u64,
        /// Parallel sessions.
        #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        connections: u64,
    },
    /// Hold N sessions to an echo backend; proxy memory (PSS) per session, set-up rate.
    Idle {
        #[command(flatten)]
        tenant: TenantArgs,
        /// Sessions to open and hold (the open-file limit is raised to fit,
        /// as far as allowed; beyond about 20,000 add --source-addrs).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        sessions: u64,
        /// The proxy's process (repeatable): PSS is summed over these and
        /// their children, before the first session and with all open.
        #[arg(long = "proxy-pid", value_name = "PID")]
        proxy_pid: Vec<u32>,
        /// Seconds to hold the sessions once all are open.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        hold: u64,
    },
    /// Bulk read through nothing or a CONNECT proxy (kept for scripts; see bulk).
    Raw {
        /// Address to connect to (a flood server, or a proxy in front of one).
        #[arg(long, value_name = "ADDR")]
        target: String,
        #[arg(long, value_name = "N", default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        connections: u64,
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
        /// Reach the target through this HTTP CONNECT proxy.
        #[arg(long, value_name = "ADDR")]
        via: Option<String>,
        #[arg(long, value_name = "TOKEN", requires = "via", env = "LOADGEN_TOKEN")]
        token: Option<String>,
    },
    /// Bulk read through a plain-HTTP WebSocket listener (kept for scripts; see bulk).
    Ws {
        #[arg(long, value_name = "ADDR")]
        proxy: String,
        #[arg(long, value_name = "PATH")]
        path: String,
        #[arg(long, value_name = "N", default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        connections: u64,
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
    },
    /// Listen on ADDR and write N bytes to every client (a framebuffer flood).
    FloodServer {
        /// Address to listen on (port 0 picks one; see the "listening" line).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Bytes written to each client.
        #[arg(long, value_name = "N", default_value_t = 1 << 30)]
        bytes: u64,
        /// Clients to serve before exiting (0: until idle for --timeout).
        #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        clients: u64,
        /// Seconds to wait for a client, or for a blocked write, before giving up.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        tls: ServerTls,
    },
    /// Listen on ADDR and echo every client; exits when idle for --timeout.
    EchoServer {
        /// Address to listen on; repeatable (each `127.0.0.1:0` gets its own
        /// port; the "listening" line lists them all under "addrs").
        #[arg(long, value_name = "ADDR", required = true)]
        listen: Vec<String>,
        /// Seconds without any client before exiting.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        tls: ServerTls,
    },
    /// Run every scenario through every peer side by side; write
    /// report.json, report.md and SVG plots.
    Compare(Box<compare::CompareArgs>),
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn bulk_report(dial: &Dial, bytes: u64, connections: u64, discard: bool) -> Result<ExitCode> {
    let opts = bulk::Options {
        bytes,
        connections,
        discard,
    };
    let report = bulk::run(dial, &opts)?;
    println!("{}", report.json());
    Ok(exit(report.complete()))
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Mode::Bulk {
            tenant,
            bytes,
            connections,
            discard,
        } => bulk_report(&tenant.dial()?, bytes, connections, discard),
        Mode::Latency {
            tenant,
            messages,
            warmup,
            size,
            connections,
        } => {
            let opts = latency::Options {
                messages,
                warmup,
                size: size as usize,
                connections,
            };
            let report = latency::run(&tenant.dial()?, &opts)?;
            println!("{}", report.json());
            Ok(exit(report.complete()))
        }
        Mode::Idle {
            tenant,
            sessions,
            proxy_pid,
            hold,
        } => {
            let opts = idle::Options {
                sessions,
                proxy_pids: proxy_pid,
                hold: Duration::from_secs(hold),
            };
            let report = idle::run(&tenant.dial()?, &opts)?;
            println!("{}", report.json());
            Ok(exit(report.complete()))
        }
        Mode::Raw {
            target,
            bytes,
            connections,
            timeout,
            via,
            token,
        } => {
            let timeout = Duration::from_secs(timeout);
            let dial = match via {
                Some(proxy) => Dial::new(&proxy, Front::Connect { target, token }, None, timeout)?,
                None => Dial::new(&target, Front::Raw, None, timeout)?,
            };
            bulk_report(&dial, bytes, connections, false)
        }
        Mode::Ws {
            proxy,
            path,
            bytes,
            connections,
            timeout,
        } => {
            let dial = Dial::new(
                &proxy,
                Front::Ws { path },
                None,
                Duration::from_secs(timeout),
            )?;
            bulk_report(&dial, bytes, connections, false)
        }
        Mode::FloodServer {
            listen,
            bytes,
            clients,
            timeout,
            tls,
        } => {
            let timeout = Duration::from_secs(timeout);
            let opts = flood::Options {
                bytes,
                clients,
                accept_timeout: timeout,
                write_timeout: timeout,
                tls: tls.config()?,
            };
            let server = flood::Server::bind(&listen, opts)?;
            let addr = server.local_addr()?;
            println!(
                "{}",
                serde_json::json!({ "event": "listening", "addr": addr.to_string() })
            );
            let served = server.serve(|s| println!("{}", s.json()))?;
            let took = flood::span(&served);
            let total: u64 = served.iter().map(|s| s.bytes).sum();
            let failed = served.iter().filter(|s| s.error.is_some()).count();
            println!(
                "{}",
                serde_json::json!({
                    "event": "done",
                    "clients": served.len(),
                    "failed": failed,
                    "bytes": total,
                    "seconds": took.as_secs_f64(),
                    "mb_per_s": mb_per_s(total, took),
                })
            );
            Ok(exit(failed == 0))
        }
        Mode::EchoServer {
            listen,
            timeout,
            tls,
        } => {
            let listen: Vec<&str> = listen.iter().map(String::as_str).collect();
            let mut server = echo::Server::bind_all(&listen, Duration::from_secs(timeout))?;
            if let Some(config) = tls.config()? {
                server = server.with_tls(config);
            }
            // One descriptor per client: as many as this process may have.
            let nofile = scale::raise_nofile_toward(scale::nofile_limits().1);
            let addrs: Vec<String> = server
                .local_addrs()?
                .iter()
                .map(ToString::to_string)
                .collect();
            println!(
                "{}",
                serde_json::json!({ "event": "listening", "addr": addrs[0], "addrs": addrs, "nofile": nofile })
            );
            let totals = server.serve()?;
            println!(
                "{}",
                serde_json::json!({
                    "event": "done",
                    "clients": totals.clients,
                    "bytes": totals.bytes,
                    "peak_clients": totals.peak,
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        Mode::Compare(args) => compare::main(*args),
    }
}
