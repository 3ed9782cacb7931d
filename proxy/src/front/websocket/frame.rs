//! Sans-io WebSocket frame codec (RFC 6455 section 5).
//!
//! The decoder takes bytes from the tenant and yields whole, unmasked frames;
//! the encoder writes frame headers so the data path can put payload after a
//! header it wrote itself (the kernel data path splices payload after it).
#![forbid(unsafe_code)]

use bytes::{Buf, BytesMut};

/// Frame opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Control frames: close, ping, pong.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One decoded frame with its payload already unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: BytesMut,
}

/// Why a frame was rejected. Each maps to a close code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("client frame is not masked")]
    Unmasked,
    #[error("control frame longer than 125 bytes or fragmented")]
    BadControlFrame,
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("payload length not in minimal encoding")]
    NonMinimalLength,
}

impl FrameError {
    /// RFC 6455 close code for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLarge(_) => close_code::TOO_BIG,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Close codes used by consolegate.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Compute-side failures. (IANA's 1014 "Bad Gateway" would fit better,
    /// but common WebSocket clients, e.g. tungstenite, treat it as a
    /// protocol error, so the tenant would lose the reason.)
    pub const COMPUTE_ERROR: u16 = 1011;
}

/// Incremental frame decoder for frames sent by a tenant (client).
#[derive(Debug, Clone)]
pub struct Decoder {
    max_payload: u64,
    require_mask: bool,
}

impl Decoder {
    /// A decoder for client-to-server frames: masking is required.
    pub fn new(max_payload: u64) -> Self {
        Self {
            max_payload,
            require_mask: true,
        }
    }

    /// A decoder for server-to-client frames (no masking), for clients and tests.
    pub fn unmasked(max_payload: u64) -> Self {
        Self {
            max_payload,
            require_mask: false,
        }
    }

    /// Decodes one frame from the front of `buf`, consuming its bytes.
    /// Returns `Ok(None)` when `buf` does not hold a whole frame yet; the
    /// header is validated as soon as it is complete, so a hostile length
    /// is refused before its payload is buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let b0 = buf[0];
        let b1 = buf[1];
        if b0 & 0x70 != 0 {
            return Err(FrameError::ReservedBits);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
        let masked = b1 & 0x80 != 0;
        if self.require_mask && !masked {
            return Err(FrameError::Unmasked);
        }
        let (len, mut pos) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let l = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
                if l < 126 {
                    return Err(FrameError::NonMinimalLength);
                }
                (l, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let l = u64::from_be_bytes(b);
                if l <= u64::from(u16::MAX) || l >> 63 != 0 {
                    return Err(FrameError::NonMinimalLength);
                }
                (l, 10)
            }
            l => (u64::from(l), 2),
        };
        if opcode.is_control() && (len > 125 || !fin) {
            return Err(FrameError::BadControlFrame);
        }
        if len > self.max_payload {
            return Err(FrameError::TooLarge(len));
        }
        let mask = if masked {
            if buf.len() < pos + 4 {
                return Ok(None);
            }
            let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
            pos += 4;
            Some(m)
        } else {
            None
        };
        // `len <= max_payload`, which the caller keeps far below usize::MAX.
        let len = usize::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
        if buf.len() < pos + len {
            buf.reserve(pos + len - buf.len());
            return Ok(None);
        }
        buf.advance(pos);
        let mut payload = buf.split_to(len);
        if let Some(m) = mask {
            apply_mask(&mut payload, m);
        }
        Ok(Some(Frame {
            fin,
            opcode,
            payload,
        }))
    }
}

/// XORs `data` with the 4-byte masking key (RFC 6455 section 5.3).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Largest frame header: 2 + 8 length bytes + 4 mask bytes.
pub const MAX_HEADER_LEN: usize = 14;

/// Writes a frame header into `out` and returns its length. With a `mask`,
/// the caller must mask the payload with it (clients do; servers do not).
pub fn encode_header(
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | opcode.as_u8();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    n
}

/// Appends a whole unmasked server frame to `out`.
pub fn encode_frame(opcode: Opcode, payload: &[u8], out: &mut BytesMut) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(true, opcode, None, payload.len() as u64, &mut hdr);
    out.reserve(n + payload.len());
    out.extend_from_slice(&hdr[..n]);
    out.extend_from_slice(payload);
}

/// Builds a close frame payload: code plus a reason cut to fit 125 bytes
/// on a character boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// Parses a close frame payload into (code, reason). An empty payload is
/// "no status" (1005); a one-byte payload, an invalid code or a reason that
/// is not UTF-8 is a protocol error.
pub fn parse_close(payload: &[u8]) -> Result<(u16, String), FrameError> {
    match payload.len() {
        0 => Ok((1005, String::new())),
        1 => Err(FrameError::BadControlFrame),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 1012..=1014 | 3000..=4999);
            if !valid {
                return Err(FrameError::BadControlFrame);
            }
            let reason =
                std::str::from_utf8(&payload[2..]).map_err(|_| FrameError::BadControlFrame)?;
            Ok((code, reason.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, op: Opcode, payload: &[u8], mask: [u8; 4]) -> BytesMut {
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(fin, op, Some(mask), payload.len() as u64, &mut hdr);
        let mut out = BytesMut::from(&hdr[..n]);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask);
        out.extend_from_slice(&p);
        out
    }

    #[test]
    fn round_trips_all_length_encodings_byte_by_byte() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = client_frame(true, Opcode::Binary, &payload, [1, 2, 3, 4]);
            let mut dec = Decoder::new(1 << 20);
            // Feed in uneven pieces to exercise partial headers and payloads.
            let mut buf = BytesMut::new();
            let mut got = None;
            for piece in wire.chunks(7777) {
                buf.extend_from_slice(piece);
                if let Some(f) = dec.decode(&mut buf).unwrap() {
                    got = Some(f);
                }
            }
            let f = got.expect("frame decoded");
            assert_eq!(f.opcode, Opcode::Binary);
            assert!(f.fin);
            assert_eq!(&f.payload[..], &payload[..]);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut buf = client_frame(true, Opcode::Binary, b"abc", [9, 9, 9, 9]);
        buf.extend_from_slice(&client_frame(true, Opcode::Ping, b"p", [5, 6, 7, 8]));
        let mut dec = Decoder::new(1024);
        assert_eq!(&dec.decode(&mut buf).unwrap().unwrap().payload[..], b"abc");
        let ping = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(ping.opcode, Opcode::Ping);
        assert_eq!(&ping.payload[..], b"p");
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn rejects_hostile_frames() {
        let mut dec = Decoder::new(1024);
        let mut unmasked = BytesMut::from(&[0x82u8, 0x01, 0x00][..]);
        assert_eq!(dec.decode(&mut unmasked), Err(FrameError::Unmasked));
        let mut rsv = BytesMut::from(&[0xC2u8, 0x80][..]);
        assert_eq!(dec.decode(&mut rsv), Err(FrameError::ReservedBits));
        let mut op = BytesMut::from(&[0x83u8, 0x80][..]);
        assert_eq!(dec.decode(&mut op), Err(FrameError::UnknownOpcode(3)));
        let mut big = BytesMut::from(&[0x82u8, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 0][..]);
        assert_eq!(dec.decode(&mut big), Err(FrameError::TooLarge(0x10_0000)));
        let mut frag_ping = client_frame(false, Opcode::Ping, b"x", [0; 4]);
        assert_eq!(dec.decode(&mut frag_ping), Err(FrameError::BadControlFrame));
        let mut nonmin = BytesMut::from(&[0x82u8, 0xFE, 0, 5][..]);
        assert_eq!(dec.decode(&mut nonmin), Err(FrameError::NonMinimalLength));
        assert_eq!(FrameError::TooLarge(1).close_code(), 1009);
        assert_eq!(FrameError::Unmasked.close_code(), 1002);
    }

    #[test]
    fn close_payloads() {
        let p = close_payload(1014, &"é".repeat(100));
        assert!(p.len() <= 125);
        let (code, reason) = parse_close(&p).unwrap();
        assert_eq!(code, 1014);
        assert!(reason.chars().all(|c| c == 'é'));
        assert_eq!(parse_close(&[]).unwrap().0, 1005);
        assert!(parse_close(&[3]).is_err());
        assert!(parse_close(&999u16.to_be_bytes()).is_err());
        assert!(parse_close(&[0x03, 0xE8, 0xFF]).is_err());
    }

    #[test]
    fn mask_matches_bytewise_definition() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let data: Vec<u8> = (0..37).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, mask);
        let slow: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(fast, slow);
    }
}
