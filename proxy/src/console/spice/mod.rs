//! SPICE: link-message aware proxying.
//!
//! The link phase (SpiceLinkMess / SpiceLinkReply / ticket) is terminated
//! on both sides so the tenant never needs the SPICE password, and main
//! channels' session ids are tracked so a session's secondary channels
//! (display, inputs, cursor, playback, usbredir...) can join it.
//!
//! (Until the link MITM lands this module only opens the compute leg: TLS
//! when the profile has a CA, and passes bytes through.)

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncWrite};

use super::security::SessionSecurity;
use super::{ComputeIo, ComputeStream};
use crate::auth::TokenId;

/// Live SPICE sessions: main-channel session id -> the token that opened it.
#[derive(Debug, Default)]
pub struct SpiceSessions {
    by_id: Mutex<HashMap<u32, TokenId>>,
}

impl SpiceSessions {
    /// The token that opened session `id`, if it is live.
    pub fn owner(&self, id: u32) -> Option<TokenId> {
        self.by_id.lock().ok()?.get(&id).copied()
    }
}

/// Why the SPICE link phase failed.
#[derive(Debug, thiserror::Error)]
pub enum SpiceError {
    #[error("compute TLS handshake failed: {0}")]
    Tls(String),
}

impl SpiceError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SpiceError::Tls(_) => "compute_tls",
        }
    }

    /// What the tenant is told.
    pub fn tenant_reason(&self) -> &'static str {
        match self {
            SpiceError::Tls(_) => "TLS to the console server failed",
        }
    }
}

/// Opens the compute leg of a SPICE channel and runs its link phase.
pub async fn establish<T: AsyncRead + AsyncWrite + Unpin>(
    _tenant: &mut T,
    compute: ComputeStream,
    security: &SessionSecurity,
    _sessions: &SpiceSessions,
    _token: TokenId,
) -> Result<(ComputeIo, String), SpiceError> {
    match &security.tls {
        Some((cfg, name)) => {
            let tls = super::tls_connect(compute, std::sync::Arc::clone(cfg), name.clone())
                .await
                .map_err(SpiceError::Tls)?;
            Ok((ComputeIo::Tls(Box::new(tls)), "tls".to_owned()))
        }
        None => Ok((ComputeIo::Plain(compute), "plain".to_owned())),
    }
}
