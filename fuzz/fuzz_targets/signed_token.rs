//! Signed stateless tokens (`cg1.<claims>.<mac>`) and the grant documents
//! inside them (also what the admin API, Redis and the external HTTP
//! resolver carry): `auth::signed::verify` with a fixed key, then
//! `GrantDoc::into_grant`.
//!
//! Invariants: no panic; anything that verifies was signed with the key
//! (re-signing its claims gives a token that verifies to the same claims);
//! an accepted grant re-encodes to a document that validates to itself.
#![no_main]

use consolegate::auth::doc::GrantDoc;
use consolegate::auth::signed::{self, SignedError};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"fuzz-key-fuzz-key-fuzz-key-fuzz-key!";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As a token, verified against the key.
    match signed::verify(text, &[KEY.to_vec()]) {
        Ok(doc) => {
            let again = signed::sign(&doc, KEY);
            assert_eq!(signed::verify(&again, &[KEY.to_vec()]).as_ref(), Ok(&doc));
            check_grant(doc);
        }
        Err(SignedError::NotSigned) => assert!(!text.starts_with(signed::PREFIX)),
        Err(_) => {}
    }
    // As claims: signed by us, so only the claims parser decides.
    if let Ok(doc) = serde_json::from_str::<GrantDoc>(text) {
        if doc.not_after.is_some() {
            let t = signed::sign(&doc, KEY);
            assert!(signed::verify(&t, &[KEY.to_vec()]).is_ok() || t.len() > signed::MAX_LEN);
        }
        check_grant(doc);
    }
});

fn check_grant(doc: GrantDoc) {
    if let Ok(g) = doc.into_grant() {
        let back = GrantDoc::from_grant(&g, true);
        assert_eq!(back.into_grant().as_ref(), Ok(&g));
    }
}
