//! Small pieces of the TLS stream: rustls's errors as `io::Error`s,
//! growing a buffer by what rustls encodes into it, and telling a TLS 1.3
//! KeyUpdate's record by its size.

use std::io;

use rustls::unbuffered::{EncodeError, EncryptError, InsufficientSizeError};

pub(super) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Grows `out` by what `f` writes into room of `first_guess` bytes, or of
/// the size it asks for if that was too little.
pub(super) fn append<E>(
    out: &mut Vec<u8>,
    first_guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
    what: &str,
) -> io::Result<()>
where
    E: std::fmt::Display,
{
    let start = out.len();
    let mut room = first_guess;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needs(&e) {
                Some(required) if required > room => room = required,
                _ => {
                    out.truncate(start);
                    return Err(io::Error::other(format!("{what}: {e}")));
                }
            },
        }
    }
}

/// Whether these whole TLS records (as rustls consumed them) include one
/// of a TLS 1.3 KeyUpdate's size: an application-data record (TLS 1.3
/// hides the real type) of 22 bytes, the 4-byte message header and its
/// request byte, the inner type byte and a 16-byte AEAD tag.
pub(super) fn key_update_among(mut records: &[u8]) -> bool {
    const KEY_UPDATE_RECORD: usize = 4 + 1 + 1 + 16;
    while let [kind, _, _, hi, lo, rest @ ..] = records {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if *kind == 23 && len == KEY_UPDATE_RECORD {
            return true;
        }
        let Some(next) = rest.get(len..) else {
            return false;
        };
        records = next;
    }
    false
}

/// Room for `n` plaintext bytes once sealed: per record of up to 2^14
/// bytes a header, a tag, an explicit nonce or inner type (and spare).
pub(super) fn sealed_len(n: usize) -> usize {
    n + (n / (1 << 14) + 1) * 64
}

pub(super) fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

pub(super) fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        r.resize(5 + len, 0xaa);
        r
    }

    #[test]
    fn a_key_update_is_told_by_its_record_size() {
        assert!(key_update_among(&record(23, 22)));
        // After a ticket in the same span, and not by its type alone.
        let mut two = record(23, 180);
        two.extend(record(23, 22));
        assert!(key_update_among(&two));
        assert!(!key_update_among(&record(23, 19)), "an alert");
        assert!(!key_update_among(&record(23, 180)), "a ticket");
        assert!(
            !key_update_among(&record(22, 22)),
            "a plaintext handshake record"
        );
        // Short or inconsistent input is no KeyUpdate and no panic.
        assert!(!key_update_among(&[]));
        assert!(!key_update_among(&[23, 3, 3, 0]));
        assert!(!key_update_among(&record(23, 40)[..20]));
        let mut cut = record(23, 40);
        cut.truncate(30);
        cut.extend(record(23, 22));
        assert!(!key_update_among(&cut[..30]));
    }
}
