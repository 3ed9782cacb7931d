//! The tenant's HTTP request head (WebSocket upgrade or CONNECT), the first
//! bytes a stranger sends us: the parser and the upgrade check on its result
//! must never panic, must respect the limits and must consume only what it got.
#![no_main]

use consolegate::front::http::{HeadLimits, parse_request_head};
use consolegate::front::websocket::handshake::check_upgrade;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let Ok(Some((head, used))) = parse_request_head(data, &limits) else {
        return;
    };
    assert!(
        used <= data.len(),
        "consumed {used} of {} bytes",
        data.len()
    );
    assert!(
        used <= limits.max_bytes,
        "head of {used} bytes passed the limit"
    );
    assert!(head.headers.len() <= limits.max_headers);

    // The head alone, without what followed it, parses the same way.
    let again = parse_request_head(&data[..used], &limits);
    assert_eq!(again, Ok(Some((head.clone(), used))));

    // What the front end asks of a parsed head.
    let _ = (
        head.path(),
        head.query(),
        head.header("host"),
        head.header("origin"),
    );
    let _ = (head.query_param("token"), head.cookie("token"));
    let _ = head.header_has_token("connection", "upgrade");
    let _ = check_upgrade(&head);
});
