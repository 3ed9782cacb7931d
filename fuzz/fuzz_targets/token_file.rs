//! Token files, in both forms (websockify's `token: host:port` lines and the
//! TOML form). Operators write them, but a directory of them may be fed by
//! other tools: neither parser may panic, and what they accept is sane.
#![no_main]

use consolegate::auth::file::{parse_toml, parse_websockify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = parse_websockify(text) {
        assert!(entries.len() <= text.lines().count());
        check(&entries);
    }
    if let Ok(entries) = parse_toml(text) {
        check(&entries);
    }
});

fn check(entries: &[consolegate::auth::file::TokenEntry]) {
    for e in entries {
        let secret = e.token.expose();
        assert!(
            !secret.is_empty() && secret.trim() == secret,
            "untrimmed or empty token"
        );
        let _ = (
            e.token.id(),
            e.grant.target.to_string(),
            e.grant.kind.as_str(),
        );
    }
}
