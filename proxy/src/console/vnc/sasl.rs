//! SASL authentication towards a VNC server (QEMU's wire form: u32
//! lengths, NUL-terminated data, a "complete" byte after each server step),
//! with rsasl doing the mechanism work (SCRAM-SHA-256, SCRAM-SHA-1).

use rsasl::prelude::{Mechname, SASLClient, SASLConfig};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};

use super::rfb::{self, MAX_REASON};
use super::{VncError, io, read_u8, read_u32, write};
use crate::console::security::SessionSecurity;

/// Largest SASL step accepted from a server (QEMU's own limit).
const MAX_STEP: u32 = 1024 * 1024;

/// Runs the exchange; returns the mechanism used.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    security: &SessionSecurity,
) -> Result<String, VncError> {
    let (user, password) = security
        .sasl
        .as_ref()
        .ok_or(VncError::MissingCredential("sasl_username and password"))?;
    let len = read_u32(s, "SASL mechanism list").await?;
    if len > MAX_REASON {
        return Err(VncError::Protocol {
            step: "SASL mechanism list",
            source: rfb::RfbError::ReasonTooLong(len),
        });
    }
    let mut raw = vec![0u8; len as usize];
    s.read_exact(&mut raw)
        .await
        .map_err(io("SASL mechanism list"))?;
    let offered = rfb::parse_mechlist(&raw);
    let sasl_err = |mechanism: &str, message: String| VncError::Sasl {
        mechanism: mechanism.to_owned(),
        message,
    };
    let config = SASLConfig::with_credentials(None, user.clone(), password.expose().to_owned())
        .map_err(|e| sasl_err("-", e.to_string()))?;
    let names: Vec<&Mechname> = offered
        .iter()
        .filter_map(|m| Mechname::parse(m.as_bytes()).ok())
        .collect();
    let mut session = SASLClient::new(config)
        .start_suggested(&names)
        .map_err(|_| VncError::SaslNoMechanism {
            offered: offered.join(", "),
        })?;
    let mech = session.get_mechname().as_str().to_owned();

    let mut m = Vec::new();
    m.extend_from_slice(&(mech.len() as u32).to_be_bytes());
    m.extend_from_slice(mech.as_bytes());
    let mut out = Vec::new();
    let mut state = session
        .step(None, &mut out)
        .map_err(|e| sasl_err(&mech, e.to_string()))?;
    m.extend_from_slice(&rfb::sasl_message(
        state.has_sent_message().then_some(out.as_slice()),
    ));
    write(s, &m, "SASL start").await?;

    loop {
        let len = read_u32(s, "SASL server step").await?;
        if len > MAX_STEP {
            return Err(sasl_err(
                &mech,
                format!("server step of {len} bytes is too large"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .await
            .map_err(io("SASL server step"))?;
        let complete = read_u8(s, "SASL server step").await? == 1;
        let input = rfb::sasl_payload(&data);
        if complete {
            // The server is done; check its final message (SCRAM proves
            // the server knew the password too).
            if state.is_running() && !input.is_empty() {
                let mut sink = Vec::new();
                state = session
                    .step(Some(input), &mut sink)
                    .map_err(|e| sasl_err(&mech, format!("server final message rejected: {e}")))?;
            }
            if state.is_running() {
                return Err(sasl_err(
                    &mech,
                    "server finished before the mechanism did".into(),
                ));
            }
            return Ok(mech);
        }
        if state.is_finished() {
            return Err(sasl_err(
                &mech,
                "server wants more steps than the mechanism has".into(),
            ));
        }
        out.clear();
        state = session
            .step(Some(input), &mut out)
            .map_err(|e| sasl_err(&mech, e.to_string()))?;
        let msg = rfb::sasl_message(state.has_sent_message().then_some(out.as_slice()));
        write(s, &msg, "SASL client step").await?;
    }
}
