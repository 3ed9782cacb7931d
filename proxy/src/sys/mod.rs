//! The only module with `unsafe` code: thin wrappers over Linux system
//! calls the standard library and tokio do not offer (pipes with a chosen
//! size, splice(2), FIONREAD, the open-file limit, kernel TLS records and
//! cipher probes, io_uring submission (`uring.rs`), TCP_INFO / SIOCOUTQ /
//! SO_COOKIE for the sockmap path, and the capability probes of `doctor`).
//!
//! Every wrapper takes borrowed file descriptors (`BorrowedFd`) or owns
//! them (`OwnedFd`), so no raw descriptor outlives its owner; every
//! `unsafe` block says why the call is sound in a `// SAFETY:` comment.

pub mod ktls;
pub mod pipe;
pub mod probe;
pub mod rlimit;
pub mod tcpinfo;
pub mod uring;

use std::io;

/// Turns a `-1` return into the thread's `errno`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same for calls that return `ssize_t`/`long`.
fn check_long(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}
