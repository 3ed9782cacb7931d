//! Sans-io tenant-to-compute message handling: turns decoded frames into
//! console bytes and control actions, enforcing fragmentation rules and the
//! negotiated subprotocol (`binary`, or websockify's legacy `base64`).
#![forbid(unsafe_code)]

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::BytesMut;

use super::frame::{Frame, Opcode, close_code, parse_close};

/// How console bytes travel inside WebSocket messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Binary frames carry raw console bytes.
    Binary,
    /// Text frames carry base64 of the console bytes (websockify legacy).
    Base64,
}

impl Mode {
    /// The subprotocol name, as negotiated.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Binary => "binary",
            Mode::Base64 => "base64",
        }
    }
}

/// What the pump must do with one tenant frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the compute side (may be empty).
    Forward(BytesMut),
    /// Answer with a pong carrying this payload.
    Pong(BytesMut),
    /// A pong arrived (keepalive answered).
    PongReceived,
    /// The tenant closed; echo a close with this code and end the session.
    Closed { code: u16, reason: String },
}

/// A protocol violation: close the session with this code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Per-session inbound state.
#[derive(Debug)]
pub struct Inbound {
    mode: Mode,
    /// Opcode of a fragmented data message in progress.
    in_message: Option<Opcode>,
    /// Base64 characters not yet forming a whole quantum.
    carry: Vec<u8>,
}

impl Inbound {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            in_message: None,
            carry: Vec::new(),
        }
    }

    /// Handles one frame from the tenant.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Action, Violation> {
        match frame.opcode {
            Opcode::Ping => Ok(Action::Pong(frame.payload)),
            Opcode::Pong => Ok(Action::PongReceived),
            Opcode::Close => match parse_close(&frame.payload) {
                Ok((code, reason)) => {
                    let code = if code == 1005 {
                        close_code::NORMAL
                    } else {
                        code
                    };
                    Ok(Action::Closed { code, reason })
                }
                Err(_) => Err(Violation {
                    code: close_code::PROTOCOL_ERROR,
                    reason: "malformed close frame",
                }),
            },
            Opcode::Text | Opcode::Binary => {
                if self.in_message.is_some() {
                    return Err(Violation {
                        code: close_code::PROTOCOL_ERROR,
                        reason: "new message inside a fragmented message",
                    });
                }
                self.data(frame.opcode, frame.fin, frame.payload)
            }
            Opcode::Continuation => match self.in_message {
                Some(op) => self.data(op, frame.fin, frame.payload),
                None => Err(Violation {
                    code: close_code::PROTOCOL_ERROR,
                    reason: "continuation frame without a message",
                }),
            },
        }
    }

    fn data(&mut self, op: Opcode, fin: bool, payload: BytesMut) -> Result<Action, Violation> {
        self.in_message = if fin { None } else { Some(op) };
        match (self.mode, op) {
            (Mode::Binary, Opcode::Binary) => Ok(Action::Forward(payload)),
            (Mode::Binary, _) => Err(Violation {
                code: close_code::UNSUPPORTED_DATA,
                reason: "text frame on a binary session",
            }),
            (Mode::Base64, Opcode::Text) => self.base64(fin, &payload),
            (Mode::Base64, _) => Err(Violation {
                code: close_code::UNSUPPORTED_DATA,
                reason: "binary frame on a base64 session",
            }),
        }
    }

    fn base64(&mut self, fin: bool, payload: &[u8]) -> Result<Action, Violation> {
        let invalid = Violation {
            code: close_code::INVALID_PAYLOAD,
            reason: "invalid base64",
        };
        self.carry.extend_from_slice(payload);
        let whole = self.carry.len() / 4 * 4;
        if fin && whole != self.carry.len() {
            self.carry.clear();
            return Err(invalid);
        }
        let mut out = BytesMut::zeroed(whole / 4 * 3);
        let n = B64
            .decode_slice(&self.carry[..whole], &mut out[..])
            .map_err(|_| invalid)?;
        out.truncate(n);
        self.carry.drain(..whole);
        Ok(Action::Forward(out))
    }
}

/// Encodes compute bytes as the payload of one base64 text message.
pub fn encode_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: Opcode, p: &[u8]) -> Frame {
        Frame {
            fin,
            opcode,
            payload: BytesMut::from(p),
        }
    }

    #[test]
    fn binary_passes_through_and_fragments_join() {
        let mut ib = Inbound::new(Mode::Binary);
        assert_eq!(
            ib.on_frame(frame(false, Opcode::Binary, b"ab")),
            Ok(Action::Forward(BytesMut::from(&b"ab"[..])))
        );
        // A ping may interleave with a fragmented message.
        assert!(matches!(
            ib.on_frame(frame(true, Opcode::Ping, b"x")),
            Ok(Action::Pong(_))
        ));
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Continuation, b"c")),
            Ok(Action::Forward(BytesMut::from(&b"c"[..])))
        );
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Continuation, b"c"))
                .unwrap_err()
                .code,
            1002
        );
    }

    #[test]
    fn text_on_binary_is_1003() {
        let mut ib = Inbound::new(Mode::Binary);
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Text, b"hi"))
                .unwrap_err()
                .code,
            1003
        );
    }

    #[test]
    fn base64_across_fragments() {
        let mut ib = Inbound::new(Mode::Base64);
        let enc = encode_base64(b"hello world");
        let (a, b) = enc.as_bytes().split_at(5);
        let Action::Forward(x) = ib.on_frame(frame(false, Opcode::Text, a)).unwrap() else {
            panic!("expected data")
        };
        let Action::Forward(y) = ib.on_frame(frame(true, Opcode::Continuation, b)).unwrap() else {
            panic!("expected data")
        };
        assert_eq!([&x[..], &y[..]].concat(), b"hello world");
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Text, b"abc"))
                .unwrap_err()
                .code,
            1007
        );
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Text, b"@@@@"))
                .unwrap_err()
                .code,
            1007
        );
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Binary, b"AAAA"))
                .unwrap_err()
                .code,
            1003
        );
    }

    #[test]
    fn close_frames() {
        let mut ib = Inbound::new(Mode::Binary);
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Close, &[])),
            Ok(Action::Closed {
                code: 1000,
                reason: String::new()
            })
        );
        assert_eq!(
            ib.on_frame(frame(true, Opcode::Close, &[1]))
                .unwrap_err()
                .code,
            1002
        );
    }
}
