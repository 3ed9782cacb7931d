//! The real tenant address behind a load balancer: PROXY protocol v1/v2
//! headers (haproxy `send-proxy`, nginx `proxy_protocol on`) and the
//! `X-Forwarded-For` / `Forwarded` request headers, honoured only from
//! configured trusted networks, so logs (and later limits and audit) name
//! the tenant rather than the balancer.
//!
//! Sans-io: pure functions over bytes and header values. The PROXY header
//! itself is decoded by the `ppp` crate; this module bounds it, maps it to
//! an address and decides whom to believe.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult as _, v1, v2};

/// Longest PROXY header accepted: a v1 line is at most 107 bytes; a v2
/// header is 16 bytes plus addresses and TLVs, which balancers keep small.
pub const MAX_PROXY_HEADER: usize = 1024;

/// Networks whose PROXY headers and forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedNets(Vec<IpNet>);

/// A trusted-network entry that is not a CIDR or an address.
#[derive(Debug, thiserror::Error)]
#[error(
    "trusted proxy {0:?} is neither an address nor a CIDR network (e.g. 10.0.0.0/8, 2001:db8::/32)"
)]
pub struct BadNet(pub String);

impl TrustedNets {
    /// Parses `10.0.0.0/8`, `2001:db8::/32` or single addresses.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, BadNet> {
        items
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BadNet(s.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is in a trusted network (v4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a PROXY protocol header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header (the listener expects one from trusted peers)")]
    Missing,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("PROXY protocol header longer than {MAX_PROXY_HEADER} bytes")]
    TooLong,
}

/// A decoded PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header occupies at the start of the stream.
    pub len: usize,
    /// The original client, or `None` for `UNKNOWN` / `LOCAL` headers
    /// (health checks): then the TCP peer is the client.
    pub source: Option<SocketAddr>,
}

/// Decodes a PROXY header (v1 or v2) at the start of `buf`. `Ok(None)`:
/// incomplete, read more (up to [`MAX_PROXY_HEADER`]).
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Neither signature can start here: fail at once, without waiting.
    let v1_sig = v1::PROTOCOL_PREFIX.as_bytes();
    let v2_sig = &b"\r\n\r\n\0\r\nQUIT\n"[..];
    let n = buf.len().min(v2_sig.len());
    let m = buf.len().min(v1_sig.len());
    if buf[..n] != v2_sig[..n] && buf[..m] != v1_sig[..m] {
        return Err(ProxyHeaderError::Missing);
    }
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return if buf.len() >= MAX_PROXY_HEADER {
            Err(ProxyHeaderError::TooLong)
        } else {
            Ok(None)
        };
    }
    let header = match parsed {
        HeaderResult::V1(Ok(h)) => ProxyHeader {
            len: h.header.len(),
            source: match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            },
        },
        HeaderResult::V2(Ok(h)) => ProxyHeader {
            len: h.len(),
            source: match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::Unix(_) | v2::Addresses::Unspecified) => None,
            },
        },
        HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
    };
    if header.len > MAX_PROXY_HEADER || header.len > buf.len() {
        return Err(ProxyHeaderError::TooLong);
    }
    Ok(Some(header))
}

/// The client address named by `X-Forwarded-For` / `Forwarded` headers, as
/// seen by a trusted hop: the list is read from the right (the hop nearest
/// to us) and trusted proxies are skipped; the first untrusted address is
/// the client. `peer` is the address that sent us the request: if it is
/// not trusted the headers are ignored (anyone can write them). Values that
/// do not parse end the walk (nothing after a forged or garbled entry is
/// believed).
pub fn forwarded_client<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    peer: IpAddr,
    trusted: &TrustedNets,
) -> Option<IpAddr> {
    if !trusted.contains(peer) {
        return None;
    }
    let mut chain: Vec<Option<IpAddr>> = Vec::new();
    let mut forwarded: Vec<Option<IpAddr>> = Vec::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            chain.extend(value.split(',').map(|v| parse_node(v.trim())));
        } else if name.eq_ignore_ascii_case("forwarded") {
            for element in value.split(',') {
                for pair in element.split(';') {
                    if let Some((k, v)) = pair.trim().split_once('=')
                        && k.trim().eq_ignore_ascii_case("for")
                    {
                        forwarded.push(parse_node(v.trim().trim_matches('"')));
                    }
                }
            }
        }
    }
    // RFC 7239 `Forwarded` wins when both are present.
    let list = if forwarded.is_empty() {
        chain
    } else {
        forwarded
    };
    let mut client = None;
    for hop in list.into_iter().rev() {
        let ip = hop?;
        client = Some(ip);
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// One node of a forwarding header: `192.0.2.1`, `192.0.2.1:4711`,
/// `[2001:db8::1]:4711`, `2001:db8::1`. Obfuscated (`_hidden`) and
/// `unknown` nodes are not addresses.
fn parse_node(v: &str) -> Option<IpAddr> {
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let inner = v.strip_prefix('[')?.split(']').next()?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> TrustedNets {
        TrustedNets::parse(s).unwrap()
    }

    #[test]
    fn trusted_nets_parse_and_match() {
        let t = nets(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]);
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(t.contains("2001:db8::5".parse().unwrap()));
        assert!(t.contains("192.0.2.7".parse().unwrap()));
        assert!(!t.contains("192.0.2.8".parse().unwrap()));
        assert!(TrustedNets::parse(&["10.0.0.0/33"]).is_err());
        assert!(TrustedNets::parse(&["lb.example"]).is_err());
    }

    #[test]
    fn proxy_v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 6080\r\nGET / HTTP/1.1\r\n";
        let p = parse_proxy_header(h).unwrap().unwrap();
        assert_eq!(&h[p.len..p.len + 3], b"GET");
        assert_eq!(p.source, Some("203.0.113.7:40000".parse().unwrap()));
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 6080\r\n";
        let p = parse_proxy_header(h).unwrap().unwrap();
        assert_eq!(p.source, Some("[2001:db8::7]:40000".parse().unwrap()));
        let p = parse_proxy_header(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!((p.len, p.source), (15, None));
    }

    #[test]
    fn proxy_v2_built_by_ppp_roundtrips() {
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (
                "198.51.100.4:5555".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:6080".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut buf = header.clone();
        buf.extend_from_slice(b"\x16\x03\x01");
        let p = parse_proxy_header(&buf).unwrap().unwrap();
        assert_eq!(p.len, header.len());
        assert_eq!(p.source, Some("198.51.100.4:5555".parse().unwrap()));
        // Every prefix is incomplete, never an error or a bogus header.
        for cut in 1..header.len() {
            assert_eq!(parse_proxy_header(&header[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn proxy_header_refusals() {
        assert_eq!(
            parse_proxy_header(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::Missing)
        );
        assert_eq!(
            parse_proxy_header(b"\x16\x03\x01"),
            Err(ProxyHeaderError::Missing)
        );
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n"),
            Err(ProxyHeaderError::Invalid(_))
        ));
        assert_eq!(parse_proxy_header(b"PROXY TCP4 203.0."), Ok(None));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 2000]].concat();
        assert!(parse_proxy_header(&long).is_err());
    }

    #[test]
    fn forwarded_for_from_trusted_peers_only() {
        let t = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        let lb: IpAddr = "127.0.0.1".parse().unwrap();
        let h = [("X-Forwarded-For", "198.51.100.9, 10.0.0.5")];
        assert_eq!(
            forwarded_client(h.iter().copied(), lb, &t),
            Some("198.51.100.9".parse().unwrap())
        );
        // A forged entry left of the real client is not believed.
        let h = [("x-forwarded-for", "1.2.3.4, 198.51.100.9")];
        assert_eq!(
            forwarded_client(h.iter().copied(), lb, &t),
            Some("198.51.100.9".parse().unwrap())
        );
        // From an untrusted peer the header is ignored.
        let outsider: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(forwarded_client(h.iter().copied(), outsider, &t), None);
        // Garbage stops the walk.
        let h = [("X-Forwarded-For", "198.51.100.9, bogus")];
        assert_eq!(forwarded_client(h.iter().copied(), lb, &t), None);
        // RFC 7239 with ports and quoted IPv6.
        let h = [(
            "Forwarded",
            "for=\"[2001:db8::9]:4711\";proto=https, for=10.0.0.3",
        )];
        assert_eq!(
            forwarded_client(h.iter().copied(), lb, &t),
            Some("2001:db8::9".parse().unwrap())
        );
        // Only trusted hops: the leftmost one is the best we know.
        let h = [("X-Forwarded-For", "10.0.0.7")];
        assert_eq!(
            forwarded_client(h.iter().copied(), lb, &t),
            Some("10.0.0.7".parse().unwrap())
        );
    }
}
