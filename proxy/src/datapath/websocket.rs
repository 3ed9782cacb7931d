//! Pump between a WebSocket tenant and a raw compute stream, in userspace.
//!
//! Compute-to-tenant: bytes are read into a buffer that leaves room for the
//! frame header in front, so each read becomes one frame written with one
//! call and no copy (binary mode). Tenant-to-compute: frames are decoded
//! and unmasked in userspace (they are small: keys and pointer events).
//! Both run in the hand-polled state machine of [`super::ws_pump`].

use std::time::Duration;

pub use super::ws_pump::WsLeg;
use super::ws_pump::{DownPath, Pump};
use super::{Counters, End};
use crate::front::websocket::message::Mode;
use crate::front::websocket::stream::WsParts;

/// Largest payload of one compute-to-tenant frame.
pub(super) const DOWN_CHUNK: usize = 64 * 1024;
/// Largest tenant frame payload accepted.
pub const MAX_TENANT_FRAME: u64 = 1 << 20;
/// How long to wait for the other side's close frame after sending ours.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Settings of one WebSocket pump.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    pub mode: Mode,
    pub idle: Option<Duration>,
    pub ping_interval: Option<Duration>,
    /// The session is closed (1001) after this long.
    pub max_duration: Option<Duration>,
}

/// Runs the session until either side ends it; returns why it ended.
/// `tenant` carries the stream plus what the handshake phase left: raw
/// bytes not yet decoded, decoded bytes for the compute side, and the
/// message state. (A plain function building the state the future then
/// owns: an async fn would keep its arguments' storage beside it.)
pub fn pump<'a, T: WsLeg + 'a, C: WsLeg + 'a>(
    tenant: WsParts<T>,
    compute: C,
    settings: WsSettings,
    counters: &'a Counters,
    shutdown: super::Stop,
) -> impl Future<Output = End> + 'a {
    let WsParts {
        inner,
        raw,
        pending,
        inbound,
    } = tenant;
    let down = DownPath::copy(settings.mode);
    let mut pump = Pump::new(
        inner, raw, pending, inbound, compute, down, settings, counters,
    );
    async move { pump.run(&shutdown).await }
}
