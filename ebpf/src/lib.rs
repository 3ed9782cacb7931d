//! Map key layouts shared by the kernel programs (connect4/connect6 allow-list)
//! and the proxy that keeps the maps in sync.
//!
//! The programs themselves land with the kernel data-path issue; this crate
//! already fixes the key layout so both sides are defined once.
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

impl AllowV4 {
    /// Builds a key from host-order values.
    pub fn new(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr),
            port: u32::from(port.to_be()),
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_key_is_network_order() {
        let k = AllowV4::new([127, 0, 0, 1], 5900);
        assert_eq!(k.addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!((k.port as u16).to_ne_bytes(), 5900u16.to_be_bytes());
        assert_eq!(core::mem::size_of::<AllowV4>(), 8);
        assert_eq!(core::mem::size_of::<AllowV6>(), 20);
    }
}
