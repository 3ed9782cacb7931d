//! What a TCP socket has received and sent, for the sockmap data path
//! (the bytes move in the kernel, so userspace counts them here):
//! `TCP_INFO`, `SIOCOUTQ` and the socket cookie (`SO_COOKIE`).
#![expect(
    unsafe_code,
    reason = "getsockopt(TCP_INFO/SO_COOKIE) and ioctl(SIOCOUTQ) have no safe std/tokio API"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::check;

/// The head of `struct tcp_info` (linux/tcp.h) up to `tcpi_bytes_received`
/// (Linux 4.1+); the kernel copies at most this many bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    u32s: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// `tcpi_state` values (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;
/// The states after a received FIN, besides `TCP_CLOSE_WAIT`.
pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_CLOSING: u8 = 11;

/// The fields of `TCP_INFO` the sockmap path uses, read in one snapshot
/// (the kernel takes the socket lock for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// `tcpi_state`.
    pub state: u8,
    /// Sequence space the peer has acknowledged (`tcpi_bytes_acked`): our
    /// data bytes, plus 1 for an acknowledged SYN or FIN; use differences.
    pub bytes_acked: u64,
    /// Sequence space received in order (`tcpi_bytes_received`): data
    /// bytes, plus 1 once the peer's FIN has arrived.
    pub bytes_received: u64,
}

/// Reads `TCP_INFO` of a TCP socket.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut raw = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed from its owner (a live socket) for the
    // call; the kernel writes at most `len` bytes into `raw`, a plain-data
    // struct on our stack, and updates `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut raw as *mut RawTcpInfo).cast(),
            &mut len,
        )
    })?;
    if (len as usize) < std::mem::size_of::<RawTcpInfo>() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO without tcpi_bytes_received (kernel older than 4.1)",
        ));
    }
    Ok(TcpInfo {
        state: raw.state,
        bytes_acked: raw.bytes_acked,
        bytes_received: raw.bytes_received,
    })
}

/// Bytes in the send queue not yet acknowledged, sent or not (`SIOCOUTQ`).
pub fn unacked_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is borrowed and open for the call; SIOCOUTQ writes one
    // int through the pointer, which points at `n` on our stack.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The socket's cookie (`SO_COOKIE`): unique per boot, never reused; the
/// sockmap program sees the same number (`bpf_get_socket_cookie`).
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut c: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed and open for the call; the kernel writes
    // one u64 into `c` on our stack and updates `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut c as *mut u64).cast(),
            &mut len,
        )
    })?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsFd as _;

    #[test]
    fn counts_bytes_each_way_and_the_fin() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let before = tcp_info(b.as_fd()).unwrap();
        assert_eq!(before.state, TCP_ESTABLISHED);
        assert_eq!(before.bytes_received, 0);
        let written = |s: &TcpStream| {
            tcp_info(s.as_fd()).unwrap().bytes_acked + unacked_bytes(s.as_fd()).unwrap() as u64
        };
        let w0 = written(&a);
        a.write_all(&[7u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        b.read_exact(&mut got).unwrap();
        assert_eq!(tcp_info(b.as_fd()).unwrap().bytes_received, 1000);
        // Written = acked + unacked (the acked SYN may count one: only
        // differences are meaningful).
        assert_eq!(written(&a) - w0, 1000);
        a.shutdown(Shutdown::Write).unwrap();
        assert_eq!(b.read(&mut got).unwrap(), 0);
        let after = tcp_info(b.as_fd()).unwrap();
        assert_eq!(after.state, TCP_CLOSE_WAIT);
        assert_eq!(after.bytes_received, 1001, "the FIN counts as one");
        let (ca, cb) = (cookie(a.as_fd()).unwrap(), cookie(b.as_fd()).unwrap());
        assert!(ca != 0 && cb != 0 && ca != cb);
        assert_eq!(cookie(a.as_fd()).unwrap(), ca);
    }
}
