//! The open-file limit: a spliced session holds two sockets and two pipes
//! (six descriptors), so the soft limit is raised to the hard one at start.
#![expect(unsafe_code, reason = "getrlimit/setrlimit have no safe std API")]

use std::io;

use super::check;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (before, after).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct for the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit struct; the kernel only reads it.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok((before, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    #[test]
    fn raising_is_idempotent() {
        let (_, first) = super::raise_nofile().unwrap();
        let (before, after) = super::raise_nofile().unwrap();
        assert_eq!((before, after), (first, first));
    }
}
