//! Sans-io WebSocket opening handshake (RFC 6455 section 4.2).
#![forbid(unsafe_code)]

use base64::Engine as _;
use sha1::{Digest, Sha1};

use super::message::Mode;
use crate::error::Refusal;
use crate::front::http::RequestHead;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A validated upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Accept` value.
    pub accept: String,
    /// The data mode.
    pub mode: Mode,
    /// Whether the subprotocol must be echoed (the tenant offered one).
    pub echo_protocol: bool,
}

/// Checks that `head` is a WebSocket upgrade we can serve.
pub fn check_upgrade(head: &RequestHead) -> Result<Upgrade, Refusal> {
    if head.method != "GET" {
        return Err(Refusal::MethodNotAllowed);
    }
    if !head.header_has_token("upgrade", "websocket") {
        return Err(Refusal::UpgradeRequired);
    }
    if head.minor_version < 1 || !head.header_has_token("connection", "upgrade") {
        return Err(Refusal::BadRequest);
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err(Refusal::BadRequest);
    }
    let key = head
        .header("sec-websocket-key")
        .ok_or(Refusal::BadRequest)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| Refusal::BadRequest)?;
    if decoded.len() != 16 {
        return Err(Refusal::BadRequest);
    }
    let offered: Vec<&str> = head
        .header_all("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let (mode, echo_protocol) = if offered.is_empty() {
        (Mode::Binary, false)
    } else if offered.contains(&"binary") {
        (Mode::Binary, true)
    } else if offered.contains(&"base64") {
        (Mode::Base64, true)
    } else {
        return Err(Refusal::BadSubprotocol);
    };
    Ok(Upgrade {
        accept: accept_key(key),
        mode,
        echo_protocol,
    })
}

/// Computes `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The `101 Switching Protocols` response.
pub fn switching_response(up: &Upgrade) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        up.accept
    );
    if up.echo_protocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(up.mode.name());
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::http::{HeadLimits, parse_request_head};

    fn head(extra: &str) -> RequestHead {
        let raw = format!(
            "GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn subprotocol_choice() {
        let up = check_upgrade(&head("Sec-WebSocket-Version: 13\r\n")).unwrap();
        assert_eq!((up.mode, up.echo_protocol), (Mode::Binary, false));
        let up = check_upgrade(&head(
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: base64, binary\r\n",
        ))
        .unwrap();
        assert_eq!((up.mode, up.echo_protocol), (Mode::Binary, true));
        let up = check_upgrade(&head(
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: base64\r\n",
        ))
        .unwrap();
        assert_eq!(up.mode, Mode::Base64);
        let resp = String::from_utf8(switching_response(&up)).unwrap();
        assert!(resp.contains("Sec-WebSocket-Protocol: base64\r\n"));
        assert_eq!(
            check_upgrade(&head(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n"
            )),
            Err(Refusal::BadSubprotocol)
        );
    }

    #[test]
    fn bad_upgrades() {
        assert_eq!(
            check_upgrade(&head("Sec-WebSocket-Version: 8\r\n")),
            Err(Refusal::BadRequest)
        );
        let raw = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let h = parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(check_upgrade(&h), Err(Refusal::UpgradeRequired));
        let raw = "POST / HTTP/1.1\r\nHost: x\r\n\r\n";
        let h = parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(check_upgrade(&h), Err(Refusal::MethodNotAllowed));
    }
}
