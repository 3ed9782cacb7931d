//! `loadgen`: bulk-transfer load for consolegate, results as JSON on stdout.
//!
//! ```text
//! loadgen flood-server --listen 127.0.0.1:5900 --bytes 1073741824 --clients 1
//! loadgen raw --target 127.0.0.1:5900 --bytes 1073741824
//! loadgen raw --target 127.0.0.1:5900 --via 127.0.0.1:6081 --token s3cret
//! ```
//! The flood server prints `{"event":"listening","addr":...}` once bound (so
//! `--listen 127.0.0.1:0` works), a `served` line per client and a `done`
//! line; the raw client prints one report. Both exit nonzero when a transfer
//! came up short.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use consolegate_bench::{flood, mb_per_s, raw, ws};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Bulk-transfer load for consolegate; JSON on stdout"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Connect to ADDR and read N bytes per connection; report MB/s.
    Raw {
        /// Address to connect to (a flood server, or a proxy in front of one).
        #[arg(long, value_name = "ADDR")]
        target: String,
        /// Bytes to read on each connection.
        #[arg(long, value_name = "N", default_value_t = 1 << 30)]
        bytes: u64,
        /// Parallel connections.
        #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        connections: u64,
        /// Seconds a connect or a blocked read may take.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
        /// Reach the target through this HTTP CONNECT proxy (consolegate's
        /// --connect-listen address).
        #[arg(long, value_name = "ADDR")]
        via: Option<String>,
        /// Token for the CONNECT proxy (sent as a Bearer token).
        #[arg(long, value_name = "TOKEN", requires = "via", env = "LOADGEN_TOKEN")]
        token: Option<String>,
    },
    /// Open WebSockets to consolegate's plain-HTTP WebSocket listener and read
    /// N bytes of console payload on each (binary subprotocol); report MB/s.
    Ws {
        /// consolegate's WebSocket listener (started with --plain-http).
        #[arg(long, value_name = "ADDR")]
        proxy: String,
        /// Request path with the token, e.g. /websockify?token=T.
        #[arg(long, value_name = "PATH")]
        path: String,
        /// Payload bytes to read on each WebSocket.
        #[arg(long, value_name = "N", default_value_t = 1 << 30)]
        bytes: u64,
        /// Parallel WebSockets.
        #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        connections: u64,
        /// Seconds a connect or a blocked read may take.
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
        /// Clients to serve before exiting.
        #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        clients: u64,
        /// Seconds to wait for a client, or for a blocked write, before giving up.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Mode::Raw {
            target,
            bytes,
            connections,
            timeout,
            via,
            token,
        } => {
            let timeout = Duration::from_secs(timeout);
            let opts = raw::Options {
                bytes,
                connections,
                connect_timeout: timeout,
                read_timeout: timeout,
                via: via.map(|proxy| raw::Via { proxy, token }),
            };
            let report = raw::run(&target, &opts)?;
            println!("{}", report.json());
            Ok(if report.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Mode::Ws {
            proxy,
            path,
            bytes,
            connections,
            timeout,
        } => {
            let timeout = Duration::from_secs(timeout);
            let opts = raw::Options {
                bytes,
                connections,
                connect_timeout: timeout,
                read_timeout: timeout,
                via: None,
            };
            let report = ws::run(&proxy, &path, &opts)?;
            println!("{}", report.json());
            Ok(if report.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Mode::FloodServer {
            listen,
            bytes,
            clients,
            timeout,
        } => {
            let timeout = Duration::from_secs(timeout);
            let opts = flood::Options {
                bytes,
                clients,
                accept_timeout: timeout,
                write_timeout: timeout,
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
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
