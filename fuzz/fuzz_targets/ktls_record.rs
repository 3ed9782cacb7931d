//! The kTLS record classifier over a sequence of non-data records a hostile
//! peer could send after the hand-over (alerts, handshake messages split
//! across records, unknown types): each record is `[type, len, payload..]`.
//!
//! Invariants: no panic; application data is always forwarded; a KeyUpdate
//! comes only from a handshake record (the session goes on under the next
//! keys); the bytes a split handshake message keeps stay bounded; after a
//! failure the session ends (nothing further is judged).
#![no_main]

use consolegate::datapath::ktls::{HandshakeCarry, Record, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut carry = HandshakeCarry::default();
    let mut rest = data;
    while let [record_type, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        match classify(*record_type, payload, &mut carry) {
            Record::Data => assert_eq!(*record_type, 23),
            Record::Fail(_) => return,
            Record::KeyUpdate { .. } => assert_eq!(*record_type, 22),
            Record::CloseNotify | Record::Ignore => {}
        }
    }
});
