//! What a load balancer (or anyone pretending to be one) sends first: the
//! PROXY protocol header, and X-Forwarded-For / Forwarded values. The
//! parsers must never panic, never claim more bytes than they got or than
//! the limit, give the same answer on the header alone, and never believe
//! forwarding headers from an untrusted peer.
#![no_main]

use std::net::IpAddr;

use consolegate::front::forwarded::{
    MAX_PROXY_HEADER, TrustedNets, forwarded_client, parse_proxy_header,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = parse_proxy_header(data) {
        assert!(h.len <= data.len() && h.len <= MAX_PROXY_HEADER);
        assert_eq!(parse_proxy_header(&data[..h.len]), Ok(Some(h)));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let trusted = TrustedNets::parse(&["127.0.0.0/8", "10.0.0.0/8"]).expect("valid");
    let (xff, fwd) = text.split_once('\n').unwrap_or((text, ""));
    let headers = [("x-forwarded-for", xff), ("forwarded", fwd)];
    let lb: IpAddr = "127.0.0.1".parse().expect("valid");
    let outsider: IpAddr = "192.0.2.1".parse().expect("valid");
    let _ = forwarded_client(headers.iter().copied(), lb, &trusted);
    assert_eq!(
        forwarded_client(headers.iter().copied(), outsider, &trusted),
        None
    );
    let _ = TrustedNets::parse(&[text]);
});
