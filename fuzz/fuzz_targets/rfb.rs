//! The RFB security-phase parsers a compute host (or a tenant) feeds:
//! ProtocolVersion, reason lengths, server strings, SASL mechanism lists
//! and step payloads, and the security / VeNCrypt choices made from
//! server-offered lists. None may panic; choices must be among the offers.
#![no_main]

use consolegate::console::vnc::rfb::{
    Capabilities, check_reason_len, choose_security, choose_subtype, parse_mechlist, parse_version,
    sanitize, sasl_message, sasl_payload, vnc_auth_response,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let flags = data[0];
    let rest = &data[1..];
    let caps = Capabilities {
        tls: flags & 1 != 0,
        require_tls: flags & 2 != 0,
        vnc_password: flags & 4 != 0,
        user_password: flags & 8 != 0,
    };

    if rest.len() >= 12 {
        let _ = parse_version(&rest[..12]);
    }
    let _ = parse_version(rest);

    if let Ok(t) = choose_security(rest, caps) {
        assert!(rest.contains(&t), "chose a type the server did not offer");
    }
    let subtypes: Vec<u32> = rest
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Ok(t) = choose_subtype(&subtypes, caps) {
        assert!(
            subtypes.contains(&t),
            "chose a subtype the server did not offer"
        );
        assert!(caps.tls, "chose a VeNCrypt subtype without a TLS profile");
    }

    if rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if let Ok(n) = check_reason_len(len) {
            assert!(n <= 4096);
        }
    }
    let clean = sanitize(rest);
    assert!(
        !clean.chars().any(char::is_control),
        "control character survived"
    );
    for m in parse_mechlist(rest) {
        assert!(!m.is_empty() && !m.contains(','));
    }
    let framed = sasl_message(Some(rest));
    assert_eq!(sasl_payload(&framed[4..]), rest);

    if rest.len() >= 16 {
        let mut challenge = [0u8; 16];
        challenge.copy_from_slice(&rest[..16]);
        let a = vnc_auth_response(&challenge, &rest[16..]);
        let b = vnc_auth_response(&challenge, &rest[16..]);
        assert_eq!(a, b);
    }
});
