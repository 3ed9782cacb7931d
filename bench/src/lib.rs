//! Load generation and side-by-side benchmarks for consolegate, used by the
//! `loadgen` binary.
//!
//! # Layout
//!
//! The clients are plain blocking I/O on one buffer per session, so the load
//! generator costs as little CPU as it can and reports what it used (it must
//! never be the bottleneck it measures).
//!
//! - [`tenant`]: one tenant session: TCP, optional TLS ([`tls`]), then raw
//!   bytes, HTTP CONNECT or a WebSocket (masked binary frames, as a browser
//!   sends them).
//! - [`flood`] and [`echo`]: compute-side stand-ins. The flood server writes a
//!   fixed number of bytes to every client (a framebuffer flood); the echo
//!   server echoes (a serial console) and holds idle sessions.
//! - [`bulk`], [`latency`], [`idle`]: the three scenarios. Bulk throughput,
//!   keystroke-sized round trips into an HDR histogram, and connection scale
//!   (proxy memory per idle session, session set-up rate).
//! - [`procstat`]: CPU seconds and RSS of process trees, system CPU per core.
//! - [`scale`]: open-file limits and spreading sessions over loopback
//!   addresses and ports, for tens of thousands of idle sessions.
//! - [`compare`]: the side-by-side runner. Starts the backends and every peer
//!   (direct, socat, haproxy, nginx stream, websockify, consolegate with each
//!   data path) on loopback, runs each scenario several times through each,
//!   and writes `report.json`, `report.md` and SVG plots.
//!
//! Throughput is in MB/s (10^6 bytes per second) and Gbit/s.

pub mod bulk;
pub mod compare;
pub mod echo;
pub mod flood;
pub mod idle;
pub mod latency;
pub mod procstat;
pub mod scale;
pub mod tenant;
pub mod tls;

use std::time::Duration;

/// Size of one read or write.
pub const CHUNK: usize = 64 * 1024;

/// Bytes over time as MB/s (10^6 bytes per second); 0 for no time at all.
pub fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    let secs = took.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    }
}
