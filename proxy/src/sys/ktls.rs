//! Kernel TLS at the descriptor level: which ciphers this kernel offloads,
//! reading one record with its type (`recvmsg` + `TLS_GET_RECORD_TYPE`)
//! and sending an alert (`sendmsg` + `TLS_SET_RECORD_TYPE`).
//!
//! The key structures come from the `ktls` crate (built from the secrets
//! rustls gives up); [`install`] hands them to the socket, and what the
//! data path needs afterwards is here too. The sockets are borrowed (`BorrowedFd`): their owner
//! is the session's `TcpStream`, which outlives every call.
#![expect(
    unsafe_code,
    reason = "setsockopt(SOL_TLS), recvmsg and sendmsg with control messages have no safe wrapper"
)]

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

use super::{check, check_long};

/// `SOL_TLS` (linux/socket.h).
const SOL_TLS: libc::c_int = 282;
/// `TLS_TX` option of `SOL_TLS`.
const TLS_TX: libc::c_int = 1;
/// Control message type on send: the record type of the data.
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
/// Control message type on receive: the record type of the data.
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
/// The record type of application data; what a read without a control
/// message is.
pub const APPLICATION_DATA: u8 = 23;
/// The record type of alerts.
pub const ALERT: u8 = 21;

/// A TLS version the kernel can take keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    pub const ALL: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

    fn wire(self) -> u16 {
        match self {
            TlsVersion::Tls12 => 0x0303,
            TlsVersion::Tls13 => 0x0304,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLS1.2",
            TlsVersion::Tls13 => "TLS1.3",
        }
    }
}

/// A record cipher the kernel may implement (`TLS_CIPHER_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    AesGcm128,
    AesGcm256,
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [
        Cipher::AesGcm128,
        Cipher::AesGcm256,
        Cipher::Chacha20Poly1305,
    ];

    fn kernel_id(self) -> u16 {
        match self {
            Cipher::AesGcm128 => 51,
            Cipher::AesGcm256 => 52,
            Cipher::Chacha20Poly1305 => 54,
        }
    }

    /// Size of `struct tls12_crypto_info_*`: the 4-byte header, then iv,
    /// key, salt and record sequence.
    fn info_len(self) -> usize {
        match self {
            Cipher::AesGcm128 => 4 + 8 + 16 + 4 + 8,
            Cipher::AesGcm256 => 4 + 8 + 32 + 4 + 8,
            Cipher::Chacha20Poly1305 => 4 + 12 + 32 + 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::AesGcm128 => "AES-128-GCM",
            Cipher::AesGcm256 => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        }
    }
}

/// Switches a throw-away loopback TCP socket to kTLS and gives it an
/// all-zero transmit key of `cipher` for `version`: tells whether this
/// kernel offloads that combination. ENOENT from `TCP_ULP` means the `tls`
/// module is absent.
pub fn probe_cipher(version: TlsVersion, cipher: Cipher) -> io::Result<()> {
    zero_key_socket(version, cipher).map(drop)
}

/// Whether this kernel takes new TLS 1.3 keys on a kTLS socket (Linux
/// 6.14 and later: a peer's KeyUpdate can be followed). Gives a second
/// all-zero transmit key to a probe socket; older kernels refuse it with
/// EBUSY.
pub fn probe_rekey() -> io::Result<()> {
    let (c, _server) = zero_key_socket(TlsVersion::Tls13, Cipher::AesGcm128)?;
    set_zero_tx(&c, TlsVersion::Tls13, Cipher::AesGcm128)
}

/// A connected loopback socket with kTLS transmit on an all-zero key (and
/// its peer, to be kept open while it is used).
fn zero_key_socket(
    version: TlsVersion,
    cipher: Cipher,
) -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let c = std::net::TcpStream::connect(l.local_addr()?)?;
    let (server, _) = l.accept()?;
    let ulp = b"tls";
    // SAFETY: `c` is open for the whole call; the value points at 3 valid
    // bytes whose length we pass; the kernel copies them.
    check(unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    })?;
    set_zero_tx(&c, version, cipher)?;
    Ok((c, server))
}

/// Gives a kTLS socket an all-zero transmit key of `cipher` for `version`.
fn set_zero_tx(c: &std::net::TcpStream, version: TlsVersion, cipher: Cipher) -> io::Result<()> {
    let mut info = [0u8; 56];
    info[..2].copy_from_slice(&version.wire().to_ne_bytes());
    info[2..4].copy_from_slice(&cipher.kernel_id().to_ne_bytes());
    // SAFETY: `c` is open; `info` holds at least `info_len` initialised
    // bytes laid out as `struct tls12_crypto_info_*` (u16 version, u16
    // cipher type, then byte arrays); the kernel copies them.
    check(unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            SOL_TLS,
            TLS_TX,
            info.as_ptr().cast(),
            cipher.info_len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `TLS_RX` option of `SOL_TLS`.
const TLS_RX: libc::c_int = 2;

/// Switches a connected TCP socket to kernel TLS with these keys (built by
/// the `ktls` crate from the secrets rustls gave up): `TCP_ULP "tls"`,
/// then `TLS_TX` and `TLS_RX`.
pub fn install(fd: BorrowedFd<'_>, tx: &ktls::CryptoInfo, rx: &ktls::CryptoInfo) -> io::Result<()> {
    let ulp = b"tls";
    // SAFETY: the descriptor is borrowed from its open owner for the call;
    // the value points at 3 valid bytes whose length we pass.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    })?;
    set_key(fd, KeyDir::Tx, tx)?;
    set_key(fd, KeyDir::Rx, rx)
}

/// Which direction of a kTLS socket a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDir {
    Tx,
    Rx,
}

/// Gives a kTLS socket the key of one direction (`TLS_TX` or `TLS_RX`):
/// the first one at the hand-over, a new one after a TLS 1.3 KeyUpdate
/// (Linux 6.14 and later; older kernels answer EBUSY).
pub fn set_key(fd: BorrowedFd<'_>, dir: KeyDir, info: &ktls::CryptoInfo) -> io::Result<()> {
    let opt = match dir {
        KeyDir::Tx => TLS_TX,
        KeyDir::Rx => TLS_RX,
    };
    // SAFETY: the descriptor is borrowed for the call; `info.as_ptr()`
    // points at the `struct tls12_crypto_info_*` that `info` owns and
    // `info.size()` is that struct's size; `info` outlives the call and
    // the kernel copies the bytes.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            opt,
            info.as_ptr(),
            info.size() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The records a kTLS socket has sealed under its current transmit key
/// (the record sequence number the kernel keeps, `getsockopt(TLS_TX)`),
/// for the cipher the key is of. The key material the kernel copies out
/// with it is wiped before returning.
pub fn tx_records(fd: BorrowedFd<'_>, cipher: Cipher) -> io::Result<u64> {
    let mut info = [0u8; 56];
    let want = cipher.info_len();
    let mut len = want as libc::socklen_t;
    // SAFETY: the descriptor is borrowed for the call; `info` is 56
    // writable bytes, at least `len` (the cipher's struct size, which the
    // kernel requires exactly); the kernel writes at most `len` bytes and
    // updates `len`.
    let r = check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            TLS_TX,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    });
    // The record sequence is the struct's last 8 bytes, big-endian.
    let seq = info
        .get(want - 8..want)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes);
    info.fill(0);
    std::hint::black_box(&info);
    r?;
    match seq {
        Some(seq) if len as usize == want => Ok(seq),
        _ => Err(io::Error::other(format!(
            "getsockopt(TLS_TX) returned {len} bytes, expected {want}"
        ))),
    }
}

/// Control buffer for one `cmsghdr` with a 1-byte payload, aligned as
/// `cmsghdr` must be.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Reads from a kTLS socket with `recvmsg` and a control buffer, without
/// blocking. Returns the record type (23 for application data; the
/// kernel never mixes types in one call) and the number of bytes read.
/// A plain `read` would fail with EIO at a non-data record.
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = CmsgBuf([0; 64]);
    // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: the descriptor is borrowed from its open owner for the call;
    // `msg` points at `iov` (our writable `buf`, its true length) and at
    // `control` (64 writable bytes), all alive until the call returns; the
    // kernel writes at most those lengths and keeps no pointer.
    let n = check_long(
        unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) } as libc::c_long,
    )?;
    let mut record_type = APPLICATION_DATA;
    // SAFETY: `msg` was filled in by a successful recvmsg: its control
    // pointer and (kernel-updated) length describe `control`, which is
    // still alive; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside that length and
    // return null at its end; CMSG_DATA of a header of our level and type
    // points at its (at least 1-byte) payload inside `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_TLS && (*c).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((record_type, n))
}

/// Sends `payload` as one record of `record_type` on a kTLS socket,
/// without blocking (`WouldBlock` when the send buffer is full).
pub fn send_record(fd: BorrowedFd<'_>, record_type: u8, payload: &[u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = CmsgBuf([0; 64]);
    // SAFETY: all-zero is a valid `msghdr`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: `msg_control` points at 64 writable, aligned bytes, more than
    // CMSG_SPACE(1); CMSG_FIRSTHDR therefore returns a header inside them
    // and CMSG_DATA its 1-byte payload, both written before the call.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = record_type;
    }
    // SAFETY: the descriptor is borrowed from its open owner for the call;
    // `msg` points at `iov` (the caller's `payload`, only read) and at the
    // control bytes, alive until the call returns; the kernel keeps no
    // pointer.
    check_long(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    } as libc::c_long)
}

/// The record type of handshake messages.
pub const HANDSHAKE: u8 = 22;

/// Our TLS 1.3 KeyUpdate, `update_not_requested` (RFC 8446, 4.6.3):
/// message type 24, a 3-byte length of 1, the request byte.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

/// Sends our KeyUpdate (not requesting one back) as a handshake record,
/// under the transmit key still in use; the caller gives the socket the
/// next key right after. `WouldBlock` when the send buffer is full.
pub fn send_key_update(fd: BorrowedFd<'_>) -> io::Result<()> {
    match send_record(fd, HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)? {
        n if n == KEY_UPDATE_NOT_REQUESTED.len() => Ok(()),
        n => Err(io::Error::other(format!(
            "the kernel took {n} of the 5 bytes of our TLS KeyUpdate"
        ))),
    }
}

/// Sends the close_notify alert (warning level 1, description 0): the
/// end of our stream towards a kTLS peer. Shut the socket down (SHUT_WR)
/// after it.
pub fn send_close_notify(fd: BorrowedFd<'_>) -> io::Result<()> {
    send_record(fd, ALERT, &[1, 0]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsFd as _;

    #[test]
    fn probe_answers_with_an_errno_or_ok() {
        for v in TlsVersion::ALL {
            for c in Cipher::ALL {
                if let Err(e) = probe_cipher(v, c) {
                    assert!(e.raw_os_error().is_some(), "{e}");
                }
            }
        }
    }

    /// A socket without kTLS has no transmit record count: an error.
    #[test]
    fn tx_records_of_a_plain_socket_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        for c in Cipher::ALL {
            let e = tx_records(a.as_fd(), c).unwrap_err();
            assert!(e.raw_os_error().is_some(), "{e}");
        }
    }

    /// On a socket without kTLS, recvmsg with a control buffer reads plain
    /// bytes as application data, and sendmsg with an unknown control
    /// message level is refused or ignored, never a crash.
    #[test]
    fn recv_record_on_a_plain_socket_reads_data() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut buf = [0u8; 16];
        let e = recv_record(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        a.write_all(b"hello").unwrap();
        let got = loop {
            match recv_record(b.as_fd(), &mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(got, (APPLICATION_DATA, 5));
        assert_eq!(&buf[..5], b"hello");
        // TCP ignores SOL_TLS control messages: the two bytes arrive as data.
        match send_close_notify(b.as_fd()) {
            Ok(()) => {
                let mut two = [0u8; 2];
                a.read_exact(&mut two).unwrap();
                assert_eq!(two, [1, 0]);
            }
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
        drop(a);
        let eof = loop {
            match recv_record(b.as_fd(), &mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(eof, (APPLICATION_DATA, 0));
    }
}
