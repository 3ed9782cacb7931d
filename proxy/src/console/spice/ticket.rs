//! The SPICE ticket: RSA-1024 keys in SubjectPublicKeyInfo form and the
//! RSA-OAEP (SHA-1, MGF1-SHA-1) encryption of a NUL-terminated password,
//! as spice-gtk and spice-html5 do it. Pure functions over buffers.
//!
//! The proxy only ever *encrypts* (towards the compute host). Its own key
//! pair exists so tenants have a real key to encrypt their ticket with;
//! that ticket is discarded unread, so the private key is never used.
#![forbid(unsafe_code)]

use rsa::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use rsa::rand_core::CryptoRngCore;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};

use super::link::{PUBKEY_LEN, TICKET_LEN};

/// Bits of the ticket key (SPICE_TICKET_KEY_PAIR_LENGTH).
pub const KEY_BITS: usize = 1024;
/// Longest password that fits one OAEP-SHA1 block with its NUL:
/// 128 - 2 * 20 - 2 - 1.
pub const MAX_PASSWORD_LEN: usize = TICKET_LEN - 2 * 20 - 2 - 1;

/// Why a ticket could not be made.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TicketError {
    #[error("the server's ticket key is not an RSA SubjectPublicKeyInfo: {0}")]
    BadKey(String),
    #[error("the server's ticket key has {0} bits, not 1024")]
    KeySize(usize),
    #[error("the SPICE password is {0} bytes; at most {MAX_PASSWORD_LEN} fit a ticket")]
    PasswordTooLong(usize),
    #[error("the SPICE password contains a NUL byte")]
    PasswordNul,
    #[error("RSA encryption failed: {0}")]
    Encrypt(String),
    #[error("generating the ticket key failed: {0}")]
    Generate(String),
}

/// The DER length of the SEQUENCE that starts `b` (the key field is fixed
/// size; a shorter key would be followed by padding).
fn der_len(b: &[u8]) -> Option<usize> {
    match b {
        [0x30, n @ 0..=0x7f, ..] => Some(2 + usize::from(*n)),
        [0x30, 0x81, n, ..] => Some(3 + usize::from(*n)),
        [0x30, 0x82, hi, lo, ..] => Some(4 + (usize::from(*hi) << 8 | usize::from(*lo))),
        _ => None,
    }
    .filter(|&n| n <= b.len())
}

/// Parses the public key of a SpiceLinkReply.
pub fn parse_public_key(spki: &[u8; PUBKEY_LEN]) -> Result<RsaPublicKey, TicketError> {
    let len = der_len(spki).ok_or_else(|| TicketError::BadKey("not a DER SEQUENCE".into()))?;
    let key = RsaPublicKey::from_public_key_der(&spki[..len])
        .map_err(|e| TicketError::BadKey(e.to_string()))?;
    let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
    if bits != KEY_BITS {
        return Err(TicketError::KeySize(bits));
    }
    Ok(key)
}

/// Encrypts `password` (plus its NUL) for the holder of `spki`.
pub fn encrypt(
    spki: &[u8; PUBKEY_LEN],
    password: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<[u8; TICKET_LEN], TicketError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(TicketError::PasswordTooLong(password.len()));
    }
    if password.contains(&0) {
        return Err(TicketError::PasswordNul);
    }
    let key = parse_public_key(spki)?;
    let mut msg = Vec::with_capacity(password.len() + 1);
    msg.extend_from_slice(password);
    msg.push(0);
    let ct = key
        .encrypt(rng, Oaep::new::<sha1::Sha1>(), &msg)
        .map_err(|e| TicketError::Encrypt(e.to_string()))?;
    ct.as_slice()
        .try_into()
        .map_err(|_| TicketError::Encrypt(format!("ciphertext of {} bytes", ct.len())))
}

/// A fresh RSA-1024 key pair and its public key in the SpiceLinkReply
/// form. Slow (tens to hundreds of milliseconds): call it off the runtime.
pub fn generate(
    rng: &mut impl CryptoRngCore,
) -> Result<(RsaPrivateKey, [u8; PUBKEY_LEN]), TicketError> {
    let key =
        RsaPrivateKey::new(rng, KEY_BITS).map_err(|e| TicketError::Generate(e.to_string()))?;
    let der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| TicketError::Generate(e.to_string()))?;
    let spki: [u8; PUBKEY_LEN] = der.as_bytes().try_into().map_err(|_| {
        TicketError::Generate(format!("public key of {} bytes", der.as_bytes().len()))
    })?;
    Ok((key, spki))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::rand_core::OsRng;

    #[test]
    fn encrypts_what_the_key_holder_decrypts() {
        let (key, spki) = generate(&mut OsRng).unwrap();
        let ct = encrypt(&spki, b"TICKET", &mut OsRng).unwrap();
        let pt = key.decrypt(Oaep::new::<sha1::Sha1>(), &ct).unwrap();
        assert_eq!(pt, b"TICKET\0");
        // Empty password: just the NUL, as spice clients send it.
        let ct = encrypt(&spki, b"", &mut OsRng).unwrap();
        assert_eq!(key.decrypt(Oaep::new::<sha1::Sha1>(), &ct).unwrap(), b"\0");
        let long = vec![b'a'; MAX_PASSWORD_LEN];
        assert!(encrypt(&spki, &long, &mut OsRng).is_ok());
        let longer = vec![b'a'; MAX_PASSWORD_LEN + 1];
        assert_eq!(
            encrypt(&spki, &longer, &mut OsRng),
            Err(TicketError::PasswordTooLong(MAX_PASSWORD_LEN + 1))
        );
        assert_eq!(
            encrypt(&spki, b"a\0b", &mut OsRng),
            Err(TicketError::PasswordNul)
        );
    }

    #[test]
    fn rejects_garbage_keys() {
        assert!(matches!(
            parse_public_key(&[0; PUBKEY_LEN]),
            Err(TicketError::BadKey(_))
        ));
        let mut k = [0u8; PUBKEY_LEN];
        k[0] = 0x30;
        k[1] = 0x81;
        k[2] = 0xff;
        assert!(matches!(parse_public_key(&k), Err(TicketError::BadKey(_))));
        k[2] = 10;
        assert!(matches!(parse_public_key(&k), Err(TicketError::BadKey(_))));
    }
}
