//! Capability probes for `consolegate doctor` and start-up: can this
//! kernel, with these privileges, create BPF maps, set up an io_uring,
//! switch a TCP socket to kTLS? Each probe creates a throw-away object and
//! closes it at once.
#![expect(
    unsafe_code,
    reason = "bpf(2), io_uring_setup(2) and TCP_ULP have no safe wrapper here"
)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd};

use super::{check, check_long};

const BPF_MAP_CREATE: libc::c_long = 0;
/// `BPF_MAP_TYPE_HASH`.
pub const MAP_HASH: u32 = 1;
/// `BPF_MAP_TYPE_SOCKHASH`.
pub const MAP_SOCKHASH: u32 = 18;

/// Creates (and closes) a one-entry BPF map of `map_type` with 4-byte keys
/// and values: tells whether `bpf(2)` works here and for this map type.
pub fn bpf_map(map_type: u32) -> io::Result<()> {
    // The first fields of `union bpf_attr` for BPF_MAP_CREATE: map_type,
    // key_size, value_size, max_entries; the rest must be zero.
    let mut attr = [0u32; 16];
    attr[0] = map_type;
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: `attr` is a valid, initialised buffer of the size we pass;
    // the kernel only reads it for BPF_MAP_CREATE and keeps no pointer.
    let fd = check_long(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    })?;
    // SAFETY: the call succeeded and returned a new descriptor that nothing
    // else owns; OwnedFd closes it once when dropped here.
    drop(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
    Ok(())
}

/// Sets up (and closes) a 2-entry io_uring.
pub fn io_uring() -> io::Result<()> {
    // `struct io_uring_params` is 120 bytes; zero means default settings.
    let mut params = [0u32; 30];
    // SAFETY: `params` is a valid, writable buffer of the size of
    // `struct io_uring_params`; the kernel fills it in during the call and
    // keeps no pointer to it.
    let fd = check_long(unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            2 as libc::c_uint,
            params.as_mut_ptr(),
        )
    })?;
    // SAFETY: a new descriptor owned by nobody else; closed once here.
    drop(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
    Ok(())
}

/// Whether a connected TCP socket accepts the "tls" upper-layer protocol
/// (kTLS). ENOENT means the `tls` module is absent.
pub fn ktls() -> io::Result<()> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let c = std::net::TcpStream::connect(l.local_addr()?)?;
    let _server = l.accept()?;
    let name = b"tls";
    // SAFETY: `c` stays open for the call; the option value points at 3
    // valid bytes whose length we pass; the kernel copies them.
    check(unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_without_panicking() {
        // The answers depend on the kernel and privileges; each must be a
        // clean Ok or an OS error with an errno.
        for r in [bpf_map(MAP_HASH), bpf_map(MAP_SOCKHASH), io_uring(), ktls()] {
            if let Err(e) = r {
                assert!(e.raw_os_error().is_some(), "{e}");
            }
        }
        // An invalid map type is refused by the kernel (or bpf is unavailable).
        assert!(bpf_map(u32::MAX).is_err());
    }
}
