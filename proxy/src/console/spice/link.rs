//! Sans-io SPICE link phase (spice-protocol `spice/protocol.h`): the
//! SpiceLinkHeader, the client's SpiceLinkMess, the server's SpiceLinkReply,
//! the auth-mechanism choice, the link result, and the data header of the
//! first main-channel messages (to read SPICE_MSG_MAIN_INIT's session id).
//!
//! Everything is little-endian and packed. Every length read from the wire
//! is checked against a small limit before anything is allocated.
#![forbid(unsafe_code)]

/// "REDQ".
pub const MAGIC: [u8; 4] = *b"REDQ";
pub const VERSION_MAJOR: u32 = 2;
pub const VERSION_MINOR: u32 = 2;
/// SpiceLinkHeader: magic, major, minor, size.
pub const HEADER_LEN: usize = 16;
/// SpiceLinkMess without its capabilities.
pub const LINK_MESS_LEN: usize = 18;
/// SPICE_TICKET_PUBKEY_BYTES: a 1024-bit RSA SubjectPublicKeyInfo (DER).
pub const PUBKEY_LEN: usize = 162;
/// SpiceLinkReply without its capabilities.
pub const LINK_REPLY_LEN: usize = 4 + PUBKEY_LEN + 12;
/// SpiceLinkEncryptedTicket: one RSA-1024 block.
pub const TICKET_LEN: usize = 128;
/// Largest link message or reply body accepted (spice-server uses the same).
pub const MAX_LINK_SIZE: u32 = 4096;
/// Largest main-channel message read during the link phase.
pub const MAX_MESSAGE_SIZE: u32 = 64 * 1024;
/// SpiceDataHeader: serial u64, type u16, size u32, sub_list u32.
pub const DATA_HEADER_LEN: usize = 18;
/// SpiceMiniDataHeader: type u16, size u32.
pub const MINI_HEADER_LEN: usize = 6;
/// SPICE_MSG_MAIN_INIT.
pub const MSG_MAIN_INIT: u16 = 103;
/// SpiceMsgMainInit: eight u32 fields, session_id first.
pub const MAIN_INIT_LEN: usize = 32;

/// Channel types.
pub mod channel {
    pub const MAIN: u8 = 1;
    pub const DISPLAY: u8 = 2;
    pub const INPUTS: u8 = 3;
    pub const CURSOR: u8 = 4;
    pub const PLAYBACK: u8 = 5;
    pub const RECORD: u8 = 6;
    pub const TUNNEL: u8 = 7;
    pub const SMARTCARD: u8 = 8;
    pub const USBREDIR: u8 = 9;
    pub const PORT: u8 = 10;
    pub const WEBDAV: u8 = 11;

    /// A name for logs.
    pub fn name(t: u8) -> &'static str {
        match t {
            MAIN => "main",
            DISPLAY => "display",
            INPUTS => "inputs",
            CURSOR => "cursor",
            PLAYBACK => "playback",
            RECORD => "record",
            TUNNEL => "tunnel",
            SMARTCARD => "smartcard",
            USBREDIR => "usbredir",
            PORT => "port",
            WEBDAV => "webdav",
            _ => "unknown",
        }
    }
}

/// SpiceLinkErr: the `error` of a SpiceLinkReply and the link result.
pub mod link_err {
    pub const OK: u32 = 0;
    pub const ERROR: u32 = 1;
    pub const INVALID_MAGIC: u32 = 2;
    pub const INVALID_DATA: u32 = 3;
    pub const VERSION_MISMATCH: u32 = 4;
    pub const NEED_SECURED: u32 = 5;
    pub const NEED_UNSECURED: u32 = 6;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const BAD_CONNECTION_ID: u32 = 8;
    pub const CHANNEL_NOT_AVAILABLE: u32 = 9;

    /// A name for logs.
    pub fn name(code: u32) -> &'static str {
        match code {
            OK => "ok",
            ERROR => "error",
            INVALID_MAGIC => "invalid magic",
            INVALID_DATA => "invalid data",
            VERSION_MISMATCH => "version mismatch",
            NEED_SECURED => "need secured",
            NEED_UNSECURED => "need unsecured",
            PERMISSION_DENIED => "permission denied",
            BAD_CONNECTION_ID => "bad connection id",
            CHANNEL_NOT_AVAILABLE => "channel not available",
            _ => "unknown",
        }
    }
}

/// Common capability bit numbers (also the auth-mechanism values).
pub mod common_cap {
    pub const AUTH_SELECTION: u32 = 0;
    pub const AUTH_SPICE: u32 = 1;
    pub const AUTH_SASL: u32 = 2;
    pub const MINI_HEADER: u32 = 3;
}

/// Malformed or unacceptable link-phase bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    #[error("not a SPICE link header (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("SPICE protocol version {0} is not 2")]
    Version(u32),
    #[error("link message size {0} is out of range")]
    Size(u32),
    #[error("{what} is {got} bytes, shorter than {need}")]
    Short {
        what: &'static str,
        got: usize,
        need: usize,
    },
    #[error("capabilities ({common} common, {channel} channel at offset {offset}) do not fit")]
    Caps {
        common: u32,
        channel: u32,
        offset: u32,
    },
    #[error("message size {0} exceeds the limit")]
    MessageSize(u32),
}

impl LinkError {
    /// The SpiceLinkErr code a peer gets for this problem.
    pub fn code(&self) -> u32 {
        match self {
            LinkError::BadMagic(_) => link_err::INVALID_MAGIC,
            LinkError::Version(_) => link_err::VERSION_MISMATCH,
            _ => link_err::INVALID_DATA,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn short(what: &'static str, got: usize, need: usize) -> Result<(), LinkError> {
    if got < need {
        Err(LinkError::Short { what, got, need })
    } else {
        Ok(())
    }
}

/// A parsed SpiceLinkHeader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub major: u32,
    pub minor: u32,
    /// Size of the body that follows.
    pub size: u32,
}

/// Parses a SpiceLinkHeader; `min_size` is the smallest body the caller
/// expects (the fixed part of a SpiceLinkMess or SpiceLinkReply).
pub fn parse_header(b: &[u8; HEADER_LEN], min_size: usize) -> Result<Header, LinkError> {
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&b[0..4]);
    if magic != MAGIC {
        return Err(LinkError::BadMagic(magic));
    }
    let h = Header {
        major: u32_at(b, 4),
        minor: u32_at(b, 8),
        size: u32_at(b, 12),
    };
    if h.major != VERSION_MAJOR {
        return Err(LinkError::Version(h.major));
    }
    if (h.size as usize) < min_size || h.size > MAX_LINK_SIZE {
        return Err(LinkError::Size(h.size));
    }
    Ok(h)
}

/// A SpiceLinkHeader announcing a body of `size` bytes.
pub fn encode_header(size: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
    h[8..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
    h[12..16].copy_from_slice(&(size as u32).to_le_bytes());
    h
}

/// Common and channel capability words.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    pub common: Vec<u32>,
    pub channel: Vec<u32>,
}

impl Caps {
    /// Whether common capability `bit` is set.
    pub fn has_common(&self, bit: u32) -> bool {
        test(&self.common, bit)
    }

    /// Common capabilities with exactly these bits set.
    pub fn common_bits(bits: &[u32]) -> Vec<u32> {
        let mut words = Vec::new();
        for &bit in bits {
            let i = (bit / 32) as usize;
            if words.len() <= i {
                words.resize(i + 1, 0);
            }
            words[i] |= 1 << (bit % 32);
        }
        words
    }

    fn wire_len(&self) -> usize {
        4 * (self.common.len() + self.channel.len())
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        for w in self.common.iter().chain(&self.channel) {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

fn test(words: &[u32], bit: u32) -> bool {
    words
        .get((bit / 32) as usize)
        .is_some_and(|w| w & (1 << (bit % 32)) != 0)
}

/// Reads the capabilities a link body announces. `fixed` is the size of the
/// struct they follow; counts and offset come from the body itself.
fn parse_caps(
    body: &[u8],
    fixed: usize,
    common: u32,
    channel: u32,
    offset: u32,
) -> Result<Caps, LinkError> {
    let bad = LinkError::Caps {
        common,
        channel,
        offset,
    };
    if common == 0 && channel == 0 {
        return Ok(Caps::default());
    }
    // Both counts are bounded by the body (<= MAX_LINK_SIZE) before any
    // allocation: u64 arithmetic cannot overflow here.
    let end = u64::from(offset) + 4 * (u64::from(common) + u64::from(channel));
    if (offset as usize) < fixed || end > body.len() as u64 {
        return Err(bad);
    }
    let at = offset as usize;
    let word = |i: usize| u32_at(body, at + 4 * i);
    let common_words = (0..common as usize).map(word).collect();
    let channel_words = (common as usize..common as usize + channel as usize)
        .map(word)
        .collect();
    Ok(Caps {
        common: common_words,
        channel: channel_words,
    })
}

/// SpiceLinkMess: which channel of which session a client wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkMess {
    /// 0 for a new session (main channel), else the session id.
    pub connection_id: u32,
    pub channel_type: u8,
    pub channel_id: u8,
    pub caps: Caps,
}

/// Parses the body of a client's link message.
pub fn parse_link_mess(body: &[u8]) -> Result<LinkMess, LinkError> {
    short("SpiceLinkMess", body.len(), LINK_MESS_LEN)?;
    let caps = parse_caps(
        body,
        LINK_MESS_LEN,
        u32_at(body, 6),
        u32_at(body, 10),
        u32_at(body, 14),
    )?;
    Ok(LinkMess {
        connection_id: u32_at(body, 0),
        channel_type: body[4],
        channel_id: body[5],
        caps,
    })
}

/// SpiceLinkHeader + SpiceLinkMess + capabilities.
pub fn encode_link_mess(m: &LinkMess) -> Vec<u8> {
    let size = LINK_MESS_LEN + m.caps.wire_len();
    let mut out = Vec::with_capacity(HEADER_LEN + size);
    out.extend_from_slice(&encode_header(size));
    out.extend_from_slice(&m.connection_id.to_le_bytes());
    out.push(m.channel_type);
    out.push(m.channel_id);
    out.extend_from_slice(&(m.caps.common.len() as u32).to_le_bytes());
    out.extend_from_slice(&(m.caps.channel.len() as u32).to_le_bytes());
    out.extend_from_slice(&(LINK_MESS_LEN as u32).to_le_bytes());
    m.caps.encode_into(&mut out);
    out
}

/// SpiceLinkReply: the server's answer, its ticket key and capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkReply {
    pub error: u32,
    pub pub_key: [u8; PUBKEY_LEN],
    pub caps: Caps,
}

/// Parses the body of a server's link reply. An error reply carries no
/// usable key or capabilities; they are returned as they came (zeros).
pub fn parse_link_reply(body: &[u8]) -> Result<LinkReply, LinkError> {
    short("SpiceLinkReply", body.len(), LINK_REPLY_LEN)?;
    let error = u32_at(body, 0);
    let mut pub_key = [0u8; PUBKEY_LEN];
    pub_key.copy_from_slice(&body[4..4 + PUBKEY_LEN]);
    let at = 4 + PUBKEY_LEN;
    let caps = if error == link_err::OK {
        parse_caps(
            body,
            LINK_REPLY_LEN,
            u32_at(body, at),
            u32_at(body, at + 4),
            u32_at(body, at + 8),
        )?
    } else {
        Caps::default()
    };
    Ok(LinkReply {
        error,
        pub_key,
        caps,
    })
}

/// SpiceLinkHeader + SpiceLinkReply + capabilities.
pub fn encode_link_reply(r: &LinkReply) -> Vec<u8> {
    let size = LINK_REPLY_LEN + r.caps.wire_len();
    let mut out = Vec::with_capacity(HEADER_LEN + size);
    out.extend_from_slice(&encode_header(size));
    out.extend_from_slice(&r.error.to_le_bytes());
    out.extend_from_slice(&r.pub_key);
    out.extend_from_slice(&(r.caps.common.len() as u32).to_le_bytes());
    out.extend_from_slice(&(r.caps.channel.len() as u32).to_le_bytes());
    out.extend_from_slice(&(LINK_REPLY_LEN as u32).to_le_bytes());
    r.caps.encode_into(&mut out);
    out
}

/// A link reply that only reports `error` (what spice-server sends when it
/// refuses a link before the ticket).
pub fn encode_link_error(error: u32) -> Vec<u8> {
    encode_link_reply(&LinkReply {
        error,
        pub_key: [0; PUBKEY_LEN],
        caps: Caps::default(),
    })
}

/// The length of a data-message header: mini when both sides negotiated
/// SPICE_COMMON_CAP_MINI_HEADER.
pub fn data_header_len(mini: bool) -> usize {
    if mini {
        MINI_HEADER_LEN
    } else {
        DATA_HEADER_LEN
    }
}

/// A data-message header: message type and body size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    pub msg_type: u16,
    pub size: u32,
}

/// Parses a SpiceDataHeader or SpiceMiniDataHeader (`b` holds exactly
/// [`data_header_len`] bytes or more) and checks the body size limit.
pub fn parse_data_header(b: &[u8], mini: bool) -> Result<DataHeader, LinkError> {
    let need = data_header_len(mini);
    short("data header", b.len(), need)?;
    let at = if mini { 0 } else { 8 };
    let msg_type = u16::from_le_bytes([b[at], b[at + 1]]);
    let size = u32_at(b, at + 2);
    if size > MAX_MESSAGE_SIZE {
        return Err(LinkError::MessageSize(size));
    }
    Ok(DataHeader { msg_type, size })
}

/// The session id of a SPICE_MSG_MAIN_INIT body.
pub fn parse_main_init(body: &[u8]) -> Result<u32, LinkError> {
    short("SpiceMsgMainInit", body.len(), MAIN_INIT_LEN)?;
    Ok(u32_at(body, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(wire: &[u8]) -> &[u8] {
        &wire[HEADER_LEN..]
    }

    #[test]
    fn link_mess_round_trip() {
        let m = LinkMess {
            connection_id: 0xdead_beef,
            channel_type: channel::INPUTS,
            channel_id: 2,
            caps: Caps {
                common: Caps::common_bits(&[common_cap::AUTH_SELECTION, common_cap::MINI_HEADER]),
                channel: vec![1, 2],
            },
        };
        let wire = encode_link_mess(&m);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&wire[..HEADER_LEN]);
        let hdr = parse_header(&h, LINK_MESS_LEN).unwrap();
        assert_eq!(hdr.size as usize, wire.len() - HEADER_LEN);
        let back = parse_link_mess(body(&wire)).unwrap();
        assert_eq!(back, m);
        assert!(back.caps.has_common(common_cap::MINI_HEADER));
        assert!(!back.caps.has_common(common_cap::AUTH_SPICE));
        assert!(!back.caps.has_common(999));
    }

    #[test]
    fn link_reply_round_trip_and_error_form() {
        let r = LinkReply {
            error: link_err::OK,
            pub_key: [7; PUBKEY_LEN],
            caps: Caps {
                common: vec![11],
                channel: vec![15],
            },
        };
        let wire = encode_link_reply(&r);
        assert_eq!(wire.len(), HEADER_LEN + LINK_REPLY_LEN + 8);
        assert_eq!(parse_link_reply(body(&wire)).unwrap(), r);

        let e = encode_link_error(link_err::PERMISSION_DENIED);
        assert_eq!(e.len(), HEADER_LEN + LINK_REPLY_LEN);
        let back = parse_link_reply(body(&e)).unwrap();
        assert_eq!(back.error, link_err::PERMISSION_DENIED);
        assert_eq!(back.caps, Caps::default());
    }

    #[test]
    fn header_checks() {
        let mut h = encode_header(LINK_MESS_LEN);
        assert!(parse_header(&h, LINK_MESS_LEN).is_ok());
        h[0] = b'X';
        assert_eq!(
            parse_header(&h, LINK_MESS_LEN),
            Err(LinkError::BadMagic(*b"XEDQ"))
        );
        assert_eq!(
            LinkError::BadMagic(*b"XEDQ").code(),
            link_err::INVALID_MAGIC
        );
        let mut h = encode_header(LINK_MESS_LEN);
        h[4] = 3;
        assert_eq!(parse_header(&h, LINK_MESS_LEN), Err(LinkError::Version(3)));
        let h = encode_header(MAX_LINK_SIZE as usize + 1);
        assert_eq!(
            parse_header(&h, LINK_MESS_LEN),
            Err(LinkError::Size(MAX_LINK_SIZE + 1))
        );
        let h = encode_header(LINK_MESS_LEN - 1);
        assert!(parse_header(&h, LINK_MESS_LEN).is_err());
    }

    #[test]
    fn hostile_caps_are_refused_without_allocating() {
        let mut b = vec![0u8; LINK_MESS_LEN];
        b[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        b[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        b[14..18].copy_from_slice(&(LINK_MESS_LEN as u32).to_le_bytes());
        assert!(matches!(parse_link_mess(&b), Err(LinkError::Caps { .. })));
        // Offset pointing into the fixed part.
        let mut b = vec![0u8; LINK_MESS_LEN + 4];
        b[6..10].copy_from_slice(&1u32.to_le_bytes());
        b[14..18].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(parse_link_mess(&b), Err(LinkError::Caps { .. })));
        // Offset past the end.
        b[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse_link_mess(&b), Err(LinkError::Caps { .. })));
        assert!(matches!(
            parse_link_mess(&[0; 5]),
            Err(LinkError::Short { .. })
        ));
        assert!(matches!(
            parse_link_reply(&[0; 100]),
            Err(LinkError::Short { .. })
        ));
    }

    #[test]
    fn data_headers_and_main_init() {
        let mini = [103u8, 0, 32, 0, 0, 0];
        assert_eq!(
            parse_data_header(&mini, true).unwrap(),
            DataHeader {
                msg_type: MSG_MAIN_INIT,
                size: 32
            }
        );
        let mut full = [0u8; DATA_HEADER_LEN];
        full[0] = 1; // serial
        full[8..10].copy_from_slice(&MSG_MAIN_INIT.to_le_bytes());
        full[10..14].copy_from_slice(&32u32.to_le_bytes());
        assert_eq!(
            parse_data_header(&full, false).unwrap(),
            DataHeader {
                msg_type: MSG_MAIN_INIT,
                size: 32
            }
        );
        assert!(parse_data_header(&mini, false).is_err());
        let huge = [103u8, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            parse_data_header(&huge, true),
            Err(LinkError::MessageSize(u32::MAX))
        );
        let mut init = [0u8; MAIN_INIT_LEN];
        init[0..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        assert_eq!(parse_main_init(&init), Ok(0x1234_5678));
        assert!(parse_main_init(&init[..8]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(channel::name(channel::INPUTS), "inputs");
        assert_eq!(channel::name(200), "unknown");
        assert_eq!(link_err::name(7), "permission denied");
    }
}
