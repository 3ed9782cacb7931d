//! Pipes and splice(2) for the splice data path.
#![expect(
    unsafe_code,
    reason = "pipe2, fcntl, splice, ioctl and write on a borrowed pipe have no safe std/tokio API"
)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd};

use super::{check, check_long};

/// A non-blocking pipe used as the in-kernel buffer between two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// Creates a non-blocking, close-on-exec pipe and asks for `size`
    /// bytes of capacity. If the kernel refuses the size (for example over
    /// `/proc/sys/fs/pipe-max-size` or the per-user pipe quota) the pipe
    /// keeps its default capacity.
    pub fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints that pipe2 fills in.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nobody else; wrapping them makes them closed exactly once.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size_arg = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: `write` is an open pipe descriptor borrowed for the call;
        // F_SETPIPE_SZ takes an int and does not retain pointers.
        let set = check(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size_arg) });
        let capacity = match set {
            Ok(n) => n as usize,
            Err(_) => {
                // SAFETY: as above; F_GETPIPE_SZ takes no argument.
                let n = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
                check(n)? as usize
            }
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Bytes the pipe can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The read end.
    pub fn reader(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The write end.
    pub fn writer(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// Both ends, read end first, for a user that shares them (io_uring).
    pub fn into_fds(self) -> (OwnedFd, OwnedFd) {
        (self.read, self.write)
    }
}

/// Moves up to `len` bytes from `from` to `to` without copying them through
/// userspace; one of the two must be a pipe. Never blocks
/// (`SPLICE_F_NONBLOCK`; the sockets are non-blocking too): `WouldBlock`
/// means wait for readiness. `Ok(0)` from a socket means end of stream.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed for the duration of the call
    // and stay open; null offsets mean "current position", which is what
    // sockets and pipes require. No memory is passed to the kernel.
    check_long(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        ) as libc::c_long
    })
}

/// Bytes waiting to be read on a socket or pipe (`FIONREAD`).
pub fn readable_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is borrowed and open for the call; FIONREAD writes one
    // int through the pointer, which points at `n` on our stack.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Writes `buf` into a pipe (non-blocking like the pipe). A write of at
/// most one page into an empty pipe always fits whole.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is borrowed and open for the call; the kernel reads
    // `buf.len()` bytes from `buf`, which we borrow for the call.
    check_long(unsafe {
        libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) as libc::c_long
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn splice_socket_to_socket_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        let pipe = Pipe::new(1 << 20).unwrap();
        assert!(pipe.capacity() >= 4096);
        a.write_all(b"spliced bytes").unwrap();
        // b is blocking; 13 bytes are there once the write returned on loopback.
        let mut moved = 0;
        while moved < 13 {
            assert!(readable_bytes(b.as_fd()).unwrap() > 0 || moved > 0);
            moved += splice(b.as_fd(), pipe.writer(), 64).unwrap();
        }
        assert_eq!(readable_bytes(pipe.reader()).unwrap(), 13);
        assert_eq!(splice(pipe.reader(), c.as_fd(), 64).unwrap(), 13);
        let mut got = [0u8; 13];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"spliced bytes");
        // An empty non-blocking pipe reports WouldBlock, not EOF.
        let e = splice(pipe.reader(), c.as_fd(), 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
