//! Map key layouts shared by the kernel programs (connect4/connect6 allow-list,
//! the sockmap data path) and the proxy that keeps the maps in sync, plus the
//! compiled programs.
//!
//! The programs are C (`programs/*.bpf.c`), compiled by `build.rs` with
//! clang-19 during the normal `cargo build`. The keys are defined once here
//! and once in `programs/allowlist.h` / `programs/sockmap.h`; the C compiler
//! checks the headers' `ALLOW_*` / `SOCK_KEY_*` numbers against its structs
//! and a unit test below checks them against these.
#![no_std]

/// Key of the IPv4 allow-list map: address and port in network byte order,
/// exactly as they appear in `struct bpf_sock_addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowV4 {
    /// `user_ip4`, network byte order.
    pub addr: u32,
    /// `user_port`, network byte order in the low 16 bits.
    pub port: u32,
}

/// Key of the IPv6 allow-list map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowV6 {
    /// `user_ip6[0..4]`, network byte order.
    pub addr: [u32; 4],
    /// `user_port`, network byte order in the low 16 bits.
    pub port: u32,
}

/// Name of the IPv4 allow-list map in the object.
pub const MAP_V4: &str = "ALLOW_V4";
/// Name of the IPv6 allow-list map in the object.
pub const MAP_V6: &str = "ALLOW_V6";
/// Name of the cgroup/connect4 program.
pub const PROG_CONNECT4: &str = "connect4";
/// Name of the cgroup/connect6 program.
pub const PROG_CONNECT6: &str = "connect6";

impl AllowV4 {
    /// Builds a key from host-order values.
    pub fn new(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr),
            port: u32::from(port.to_be()),
        }
    }

    /// The key's bytes as the kernel sees them (`#[repr(C)]`, no padding).
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&self.addr.to_ne_bytes());
        b[4..8].copy_from_slice(&self.port.to_ne_bytes());
        b
    }
}

impl AllowV6 {
    /// Builds a key from host-order values.
    pub fn new(addr: [u8; 16], port: u16) -> Self {
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            let b = &addr[i * 4..i * 4 + 4];
            *w = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        Self {
            addr: words,
            port: u32::from(port.to_be()),
        }
    }

    /// The key's bytes as the kernel sees them (`#[repr(C)]`, no padding).
    pub fn to_bytes(self) -> [u8; 20] {
        let mut b = [0u8; 20];
        for (i, w) in self.addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        b[16..20].copy_from_slice(&self.port.to_ne_bytes());
        b
    }
}

/// Key of the sockmap data path's maps: the cookie (`SO_COOKIE`) of the
/// socket whose incoming bytes are forwarded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// `bpf_get_socket_cookie()` of the receiving socket.
    pub cookie: u64,
}

impl SockKey {
    /// The key's bytes as the kernel sees them (`#[repr(C)]`, no padding).
    pub fn to_bytes(self) -> [u8; 8] {
        self.cookie.to_ne_bytes()
    }
}

/// SOCKHASH: cookie of a socket -> the socket its bytes are redirected to.
pub const MAP_PEER: &str = "PEER";
/// SOCKHASH with the parser and verdict attached: a socket in it has its
/// ingress forwarded.
pub const MAP_FORWARD: &str = "FORWARD";
/// Name of the sk_skb/stream_parser program.
pub const PROG_PARSER: &str = "sockmap_parser";
/// Name of the sk_skb/stream_verdict program.
pub const PROG_VERDICT: &str = "sockmap_verdict";

#[cfg(consolegate_bpf_built)]
#[repr(C, align(32))]
struct Aligned<B: ?Sized>(B);

/// The compiled allow-list object (connect4, connect6, ALLOW_V4, ALLOW_V6),
/// or `None` if clang-19 was missing at build time.
#[cfg(consolegate_bpf_built)]
pub static ALLOWLIST_OBJ: Option<&[u8]> = {
    static OBJ: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
        env!("OUT_DIR"),
        "/allowlist.bpf.o"
    )));
    Some(&OBJ.0)
};

/// The compiled allow-list object, or `None` if clang-19 was missing at
/// build time.
#[cfg(not(consolegate_bpf_built))]
pub static ALLOWLIST_OBJ: Option<&[u8]> = None;

/// The compiled sockmap object (sockmap_parser, sockmap_verdict, PEER,
/// FORWARD), or `None` if clang-19 was missing at build time.
#[cfg(consolegate_bpf_built)]
pub static SOCKMAP_OBJ: Option<&[u8]> = {
    static OBJ: &Aligned<[u8]> =
        &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/sockmap.bpf.o")));
    Some(&OBJ.0)
};

/// The compiled sockmap object, or `None` if clang-19 was missing at build
/// time.
#[cfg(not(consolegate_bpf_built))]
pub static SOCKMAP_OBJ: Option<&[u8]> = None;

/// Why [`ALLOWLIST_OBJ`] is `None`.
pub const NOT_BUILT: &str =
    "eBPF program not built: clang-19 (or libbpf-dev) missing at build time";

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn v4_key_is_network_order() {
        let k = AllowV4::new([127, 0, 0, 1], 5900);
        assert_eq!(k.addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!((k.port as u16).to_ne_bytes(), 5900u16.to_be_bytes());
        assert_eq!(&k.to_bytes()[..6], &[127, 0, 0, 1, 0x17, 0x0c]);
        let k6 = AllowV6::new(core::net::Ipv6Addr::LOCALHOST.octets(), 5900);
        assert_eq!(k6.to_bytes()[15], 1);
        assert_eq!(&k6.to_bytes()[16..18], &[0x17, 0x0c]);
    }

    /// The `#define ALLOW_*` numbers of the C header.
    fn header_value(name: &str) -> usize {
        define_in(include_str!("../programs/allowlist.h"), name)
    }

    /// A `#define NAME number` of a C header.
    fn define_in(header: &str, name: &str) -> usize {
        header
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix("#define ")?;
                let (n, v) = rest.split_once(' ')?;
                (n == name).then(|| v.trim().parse().expect("a number"))
            })
            .unwrap_or_else(|| panic!("{name} missing from the header"))
    }

    #[test]
    fn sock_key_layout_matches_the_c_header() {
        let header = include_str!("../programs/sockmap.h");
        assert_eq!(size_of::<SockKey>(), define_in(header, "SOCK_KEY_SIZE"));
        assert_eq!(
            offset_of!(SockKey, cookie),
            define_in(header, "SOCK_KEY_COOKIE_OFFSET")
        );
        let k = SockKey {
            cookie: 0x0102_0304_0506_0708,
        };
        assert_eq!(k.to_bytes().len(), size_of::<SockKey>());
        assert_eq!(k.to_bytes(), 0x0102_0304_0506_0708u64.to_ne_bytes());
    }

    #[test]
    fn layout_matches_the_c_header() {
        assert_eq!(size_of::<AllowV4>(), header_value("ALLOW_V4_SIZE"));
        assert_eq!(
            offset_of!(AllowV4, addr),
            header_value("ALLOW_V4_ADDR_OFFSET")
        );
        assert_eq!(
            offset_of!(AllowV4, port),
            header_value("ALLOW_V4_PORT_OFFSET")
        );
        assert_eq!(size_of::<AllowV6>(), header_value("ALLOW_V6_SIZE"));
        assert_eq!(
            offset_of!(AllowV6, addr),
            header_value("ALLOW_V6_ADDR_OFFSET")
        );
        assert_eq!(
            offset_of!(AllowV6, port),
            header_value("ALLOW_V6_PORT_OFFSET")
        );
        assert_eq!(
            AllowV4::new([0; 4], 0).to_bytes().len(),
            size_of::<AllowV4>()
        );
        assert_eq!(
            AllowV6::new([0; 16], 0).to_bytes().len(),
            size_of::<AllowV6>()
        );
    }

    #[test]
    fn object_is_embedded_when_clang_is_there() {
        match ALLOWLIST_OBJ {
            Some(obj) => assert_eq!(&obj[..4], b"\x7fELF"),
            None => std::println!("skipped: {NOT_BUILT}"),
        }
        match SOCKMAP_OBJ {
            Some(obj) => assert_eq!(&obj[..4], b"\x7fELF"),
            None => std::println!("skipped: {NOT_BUILT}"),
        }
    }
}
