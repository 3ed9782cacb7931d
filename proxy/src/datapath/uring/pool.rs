//! Pipes of the io_uring splice flavour, held only while bytes move: a
//! direction takes one when its source turns readable and gives it back,
//! empty, once nothing is in flight (see `thread`). The pool belongs to the
//! ring thread, the only thread that runs uring sessions.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use crate::sys::pipe::Pipe;
use crate::sys::uring::SharedFd;

/// Empty pipes kept for the next direction that reads; more are closed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<RingPipe>> = const { RefCell::new(Vec::new()) };
}

/// Tests: a pipe size for which no pipe can be had, as when the process
/// has run out of descriptors.
#[cfg(test)]
pub(super) const NO_PIPE: usize = usize::MAX;

/// A pipe as the ring hands it to operations.
#[derive(Debug)]
pub(super) struct RingPipe {
    pub read: SharedFd,
    pub write: SharedFd,
    /// The capacity asked for (the pool's key).
    size: usize,
    /// The capacity the kernel granted.
    pub cap: usize,
}

impl RingPipe {
    /// An empty pipe of `size` bytes from this thread's pool, or a new one.
    pub fn take(size: usize) -> io::Result<Self> {
        #[cfg(test)]
        if size == NO_PIPE {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let pooled = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let at = p.iter().position(|q| q.size == size)?;
            Some(p.swap_remove(at))
        });
        if let Some(p) = pooled {
            return Ok(p);
        }
        let p = Pipe::new(size)?;
        let cap = p.capacity();
        let (read, write) = p.into_fds();
        Ok(Self {
            read: Arc::new(read),
            write: Arc::new(write),
            size,
            cap,
        })
    }

    /// Back to the pool; the caller's accounting says it is empty. Closed
    /// instead when the pool is full or an operation still holds an end.
    pub fn give_back(self) {
        if Arc::strong_count(&self.read) == 1 && Arc::strong_count(&self.write) == 1 {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(self);
                }
            });
        }
    }
}
