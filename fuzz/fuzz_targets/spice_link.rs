//! SPICE link phase: the bytes a tenant (SpiceLinkHeader + SpiceLinkMess)
//! or a compute host (SpiceLinkHeader + SpiceLinkReply, then main-channel
//! data headers and SPICE_MSG_MAIN_INIT, and the ticket key) may send.
//! The same input is offered to every parser.
//!
//! Invariants: no panic; a header that parses announces a body within
//! MAX_LINK_SIZE; parsed link messages and replies re-encode to bytes that
//! parse to themselves; data headers never announce more than
//! MAX_MESSAGE_SIZE.
#![no_main]

use consolegate::console::spice::link::{
    self, HEADER_LEN, LINK_MESS_LEN, LINK_REPLY_LEN, MAX_LINK_SIZE, MAX_MESSAGE_SIZE, PUBKEY_LEN,
};
use consolegate::console::spice::ticket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a whole message: header, then its body.
    if let Some((h, body)) = data.split_first_chunk::<HEADER_LEN>() {
        for min in [LINK_MESS_LEN, LINK_REPLY_LEN] {
            if let Ok(hdr) = link::parse_header(h, min) {
                assert!(hdr.size <= MAX_LINK_SIZE && hdr.size as usize >= min);
            }
        }
        let _ = link::parse_link_mess(body);
        let _ = link::parse_link_reply(body);
    }

    // As a bare body.
    if let Ok(m) = link::parse_link_mess(data) {
        let wire = link::encode_link_mess(&m);
        let again = link::parse_link_mess(&wire[HEADER_LEN..]);
        assert_eq!(again.as_ref(), Ok(&m));
    }
    if let Ok(r) = link::parse_link_reply(data) {
        let wire = link::encode_link_reply(&r);
        let again = link::parse_link_reply(&wire[HEADER_LEN..]);
        assert_eq!(again.as_ref(), Ok(&r));
    }

    for mini in [true, false] {
        if let Ok(h) = link::parse_data_header(data, mini) {
            assert!(h.size <= MAX_MESSAGE_SIZE);
        }
    }
    let _ = link::parse_main_init(data);

    if let Some(key) = data.first_chunk::<PUBKEY_LEN>() {
        let _ = ticket::parse_public_key(key);
    }
});
