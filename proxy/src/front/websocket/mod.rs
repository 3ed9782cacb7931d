//! WebSocket (RFC 6455): sans-io handshake, frame codec and message rules.

pub mod frame;
pub mod handshake;
pub mod message;
pub mod stream;
