//! Load generation for consolegate, used by the `loadgen` binary.
//!
//! Two halves of a bulk-transfer measurement, both plain blocking TCP so the
//! load generator costs as little CPU as possible and never looks like the
//! bottleneck:
//! - [`flood`]: a compute-side stand-in that writes a fixed number of bytes
//!   to every client, like a VNC server flooding framebuffer updates.
//! - [`raw`]: a tenant-side client that connects (directly, or to a proxy
//!   listener that forwards to a flood server) and reads a fixed number of
//!   bytes, timing them.
//!
//! Throughput is in MB/s, 10^6 bytes per second.

pub mod flood;
pub mod raw;
pub mod ws;

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
