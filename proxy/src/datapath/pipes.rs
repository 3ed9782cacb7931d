//! Pipes for the splice paths, held only while bytes are in flight.
//!
//! A spliced direction needs its pipe only between reading a chunk from
//! one socket and writing all of it to the other. An idle direction gives
//! its (empty) pipe back to a per-thread pool, so idle sessions hold no
//! pipe descriptors and no pipe pages: the proxy's pipes grow with the
//! sessions that are moving bytes, not with those it holds. That also
//! keeps an unprivileged proxy under `fs.pipe-user-pages-soft`, past which
//! the kernel shrinks every new pipe to a page or two.

use std::cell::RefCell;
use std::io;

use crate::sys::pipe::{Pipe, readable_bytes};

/// Empty pipes kept per worker thread; more are closed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Pipes held by slots on this thread (tests).
    static HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One direction's pipe: taken from the pool (or created) when bytes are
/// about to move, given back when the direction has nothing in flight.
#[derive(Debug)]
pub struct PipeSlot {
    size: usize,
    pipe: Option<Pipe>,
}

impl PipeSlot {
    /// A slot for pipes of `size` bytes (only [`super::splice::PIPE_SIZE`]
    /// pipes are pooled; others are made for the slot and closed after).
    pub fn new(size: usize) -> Self {
        Self { size, pipe: None }
    }

    /// Checks now that a pipe can be had (descriptors left), so a session
    /// that cannot splice falls back to the copy before it starts.
    pub fn available(size: usize) -> io::Result<()> {
        let mut slot = Self::new(size);
        slot.get()?;
        slot.release();
        Ok(())
    }

    /// The pipe, taken from the pool or created if the slot has none.
    pub fn get(&mut self) -> io::Result<&Pipe> {
        if self.pipe.is_none() {
            let pooled = if self.pooled() {
                POOL.with(|p| p.borrow_mut().pop())
            } else {
                None
            };
            self.pipe = Some(match pooled {
                Some(p) => p,
                None => Pipe::new(self.size)?,
            });
            #[cfg(test)]
            HELD.with(|h| h.set(h.get() + 1));
        }
        match self.pipe.as_ref() {
            Some(p) => Ok(p),
            None => Err(io::ErrorKind::Other.into()),
        }
    }

    /// Whether the slot holds a pipe now.
    pub fn is_held(&self) -> bool {
        self.pipe.is_some()
    }

    /// Gives the pipe back; the caller's accounting says it is empty. A
    /// pipe that still holds bytes (it never should) is closed, never
    /// pooled: another session must not receive them.
    pub fn release(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        #[cfg(test)]
        HELD.with(|h| h.set(h.get() - 1));
        let empty = readable_bytes(pipe.reader()).is_ok_and(|n| n == 0);
        if empty && self.pooled() {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(pipe);
                }
            });
        }
    }

    fn pooled(&self) -> bool {
        self.size == super::splice::PIPE_SIZE
    }
}

impl Drop for PipeSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// Empty pipes pooled on this thread (tests).
#[cfg(test)]
pub(crate) fn pooled() -> usize {
    POOL.with(|p| p.borrow().len())
}

/// Pipes held by slots of this thread (tests).
#[cfg(test)]
pub(crate) fn held() -> usize {
    HELD.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pipe::splice;
    use std::io::Write as _;

    #[test]
    fn an_empty_pipe_goes_back_to_the_pool_and_is_reused() {
        let before = pooled();
        let mut a = PipeSlot::new(super::super::splice::PIPE_SIZE);
        assert!(!a.is_held());
        let fd = {
            use std::os::fd::AsRawFd as _;
            a.get().unwrap().reader().as_raw_fd()
        };
        a.release();
        assert!(!a.is_held());
        assert_eq!(pooled(), before + 1);
        let mut b = PipeSlot::new(super::super::splice::PIPE_SIZE);
        let again = {
            use std::os::fd::AsRawFd as _;
            b.get().unwrap().reader().as_raw_fd()
        };
        assert_eq!(fd, again, "the pooled pipe is handed out again");
        assert_eq!(pooled(), before);
    }

    #[test]
    fn a_pipe_holding_bytes_is_never_pooled() {
        let before = pooled();
        let mut slot = PipeSlot::new(super::super::splice::PIPE_SIZE);
        let pipe = slot.get().unwrap();
        // Put bytes into the pipe through a socket pair and splice.
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"left over").unwrap();
        use std::os::fd::AsFd as _;
        let n = splice(b.as_fd(), pipe.writer(), 9).unwrap();
        assert_eq!(n, 9);
        slot.release();
        assert_eq!(pooled(), before, "a non-empty pipe is closed instead");
    }

    #[test]
    fn odd_sizes_are_not_pooled() {
        let before = pooled();
        let mut slot = PipeSlot::new(4096);
        slot.get().unwrap();
        slot.release();
        assert_eq!(pooled(), before);
        assert!(PipeSlot::available(4096).is_ok());
    }
}
