//! The SPICE main-channel migration filter over compute-to-tenant bytes
//! (first byte: mini header or not, and a chunk size).
//!
//! Invariants: no panic; any chunking gives the same output; the output,
//! re-read from a message boundary, holds no migration announcement and
//! is never longer than the input.
#![no_main]

use bytes::BytesMut;
use consolegate::console::spice::migrate::{MainFilter, announces_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mini = first & 1 == 1;
    let chunk = usize::from(first >> 1).max(1);
    let mut whole = BytesMut::new();
    MainFilter::new(mini).feed(rest, &mut whole);
    let mut chunked = BytesMut::new();
    let mut f = MainFilter::new(mini);
    for c in rest.chunks(chunk) {
        f.feed(c, &mut chunked);
    }
    assert_eq!(whole, chunked);
    assert!(whole.len() <= rest.len());
    // Walk the output's messages.
    let hlen = if mini { 6 } else { 18 };
    let at = if mini { 0 } else { 8 };
    let mut p = 0usize;
    while p + hlen <= whole.len() {
        let t = u16::from_le_bytes([whole[p + at], whole[p + at + 1]]);
        assert!(!announces_target(t), "announcement {t} leaked");
        let size = u32::from_le_bytes([
            whole[p + at + 2],
            whole[p + at + 3],
            whole[p + at + 4],
            whole[p + at + 5],
        ]) as usize;
        p = p.saturating_add(hlen).saturating_add(size);
    }
});
