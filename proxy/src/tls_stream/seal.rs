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
