//! WebSocket frames from the tenant, then the message layer (fragmentation,
//! binary/base64 modes). The first byte picks the set-up (payload limit,
//! masked or not, binary or base64 mode, how the bytes arrive); the rest is
//! the byte stream.
//!
//! Invariants: no panic; decoding the stream whole or in pieces gives the same
//! frames and the same error; no payload exceeds the limit; a decoded frame
//! re-encodes to a frame that decodes to itself.
#![no_main]

use bytes::BytesMut;
use consolegate::front::websocket::frame::{Decoder, Frame, MAX_HEADER_LEN, encode_header};
use consolegate::front::websocket::message::{Action, Inbound, Mode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&setup, stream)) = data.split_first() else {
        return;
    };
    let max_payload: u64 = if setup & 1 == 0 { 1 << 20 } else { 200 };
    let masked = setup & 2 == 0;
    let mode = if setup & 4 == 0 {
        Mode::Binary
    } else {
        Mode::Base64
    };
    let chunk = usize::from(setup >> 3) + 1;
    let decoder = || {
        if masked {
            Decoder::new(max_payload)
        } else {
            Decoder::unmasked(max_payload)
        }
    };

    let whole = decode_all(decoder(), stream, stream.len().max(1));
    let pieces = decode_all(decoder(), stream, chunk);
    assert_eq!(whole, pieces, "decoding depends on how the bytes arrive");

    let (frames, _error) = whole;
    let mut inbound = Inbound::new(mode);
    for frame in frames {
        assert!(frame.payload.len() as u64 <= max_payload);
        if frame.opcode.is_control() {
            assert!(frame.fin && frame.payload.len() <= 125);
        }
        round_trip(&frame, max_payload);
        match inbound.on_frame(frame) {
            Ok(Action::Closed { .. }) | Err(_) => break,
            Ok(_) => {}
        }
    }
});

/// Decodes `stream` fed `chunk` bytes at a time, up to the first error.
fn decode_all(
    mut decoder: Decoder,
    stream: &[u8],
    chunk: usize,
) -> (
    Vec<Frame>,
    Option<consolegate::front::websocket::frame::FrameError>,
) {
    let mut frames = Vec::new();
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    consumed += before - buf.len();
                    assert!(consumed <= stream.len());
                    frames.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "a partial frame consumed bytes");
                    break;
                }
                Err(err) => return (frames, Some(err)),
            }
        }
    }
    (frames, None)
}

/// Writes `frame` back out unmasked and decodes it again.
fn round_trip(frame: &Frame, max_payload: u64) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(
        frame.fin,
        frame.opcode,
        None,
        frame.payload.len() as u64,
        &mut header,
    );
    let mut wire = BytesMut::from(&header[..n]);
    wire.extend_from_slice(&frame.payload);
    let again = Decoder::unmasked(max_payload).decode(&mut wire);
    assert_eq!(again.as_ref().ok().and_then(Option::as_ref), Some(frame));
    assert!(wire.is_empty());
}
