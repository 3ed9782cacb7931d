//! consolegate: a secure, kernel-accelerated gateway to VM consoles.
//!
//! # Layout
//!
//! The modules follow a session's life from the tenant side to the compute
//! side.
//!
//! - [`cli`] and [`config`]: command line, the TOML file and the validated
//!   [`config::Config`]; [`config::dev`] creates the embedded development
//!   setup (self-signed certificate, token file).
//! - [`front`]: the tenant side. Listeners, TLS accept ([`front::tls`]),
//!   the sans-io HTTP head parser ([`front::http`]), the sans-io WebSocket
//!   handshake, frame codec and message rules ([`front::websocket`]), and the
//!   two front ends: [`front::ws`] (WebSocket) and [`front::connect`] (HTTP
//!   CONNECT).
//! - [`auth`]: the token secret type (masked, constant-time comparison),
//!   sans-io token file parsers and the reloadable [`auth::TokenStore`].
//! - [`console`]: the compute side: console kinds, backend targets and
//!   dialling QEMU over TCP or UNIX sockets.
//! - [`limits`]: admission limits (sessions in total, per token, per
//!   tenant address).
//! - [`ladder`]: picks a session's data path (ktls+splice, splice or copy) and records it.
//! - [`offload`]: kernel TLS: the start-up probe, and handing a session's
//!   rustls legs to the kernel after the handshake phase.
//! - [`session`]: what every front end shares: context, live-session
//!   accounting, refusals and the closing log line.
//! - [`datapath`]: the hot path once a session is established: the
//!   userspace bidirectional copy, splice(2) for plaintext streams and the
//!   WebSocket pump.
//! - [`control`]: the control plane beside the sessions: systemd
//!   notifications (ready, reload, stopping, watchdog), the eBPF connect
//!   allow-list kept in sync with the token table, cgroup v2 handling and
//!   the `doctor` capability report.
//! - [`tls_stream`]: the TLS stream of every TLS leg, tenant and compute
//!   side: rustls's unbuffered connection with buffers that exist only while
//!   bytes are in flight, so idle sessions hold none.
//! - [`sys`]: the only module with `unsafe` code: pipes, splice, FIONREAD,
//!   capability probes.
//! - [`admin`]: the admin API (tokens, live sessions, metrics) and the
//!   live-session table it acts on.
//! - [`app`]: start-up, reload (SIGHUP, token-file changes) and shutdown.
//! - [`error`]: refusal kinds with their stable names and HTTP statuses.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod datapath;
pub mod error;
pub mod front;
pub mod ladder;
pub mod limits;
pub mod offload;
pub mod session;
pub mod sys;
pub mod tls_stream;
