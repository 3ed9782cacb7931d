//! io_uring submission for the uring data path: a [`Ring`] that owns every
//! resource an in-flight operation references, and the wake-up eventfd of
//! the ring thread.
//!
//! The unsafe part of io_uring is the submission: an SQE names file
//! descriptors (and, for recv/send, a buffer) by number and address, and the
//! kernel uses them until the operation's completion (CQE) is posted, long
//! after `push` returned. [`Ring::submit`] therefore takes the descriptors
//! as [`SharedFd`] (`Arc<OwnedFd>`) and buffers by value, and keeps a clone
//! of each in its table of in-flight operations until the CQE arrives. A
//! caller that drops its own handles while an operation runs only drops
//! its references: the descriptor is closed (and the buffer freed) when the
//! last operation referencing it has completed, so the kernel never sees a
//! closed or reused descriptor number and never writes into freed memory.
#![expect(
    unsafe_code,
    reason = "io_uring SQE submission and eventfd(2) have no safe API"
)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};

use super::check;

/// A descriptor shared between its user and the operations that use it.
pub type SharedFd = Arc<OwnedFd>;

/// Which operations the data path needs this kernel has (IORING_REGISTER_PROBE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    pub splice: bool,
    pub poll_add: bool,
    pub async_cancel: bool,
    pub recv: bool,
    pub send: bool,
}

/// Creates a small ring and asks the kernel which opcodes it supports.
pub fn probe() -> io::Result<Support> {
    let ring = IoUring::new(8)?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p)?;
    Ok(Support {
        splice: p.is_supported(opcode::Splice::CODE),
        poll_add: p.is_supported(opcode::PollAdd::CODE),
        async_cancel: p.is_supported(opcode::AsyncCancel::CODE),
        recv: p.is_supported(opcode::Recv::CODE),
        send: p.is_supported(opcode::Send::CODE),
    })
}

/// One operation to submit.
#[derive(Debug)]
pub enum Op {
    /// `POLL_ADD(poll, events)` linked to `splice(from -> to, len)` with
    /// `SPLICE_F_NONBLOCK`: the splice runs only once `poll` is ready, so
    /// it never waits inside a kernel worker.
    PollSplice {
        poll: SharedFd,
        events: u32,
        from: SharedFd,
        to: SharedFd,
        len: u32,
    },
    /// `POLL_ADD(fd, events)`; completes with the ready mask.
    Poll { fd: SharedFd, events: u32 },
    /// `recv(fd, buf[..], flags)` into the whole of `buf` (its length).
    Recv {
        fd: SharedFd,
        buf: Vec<u8>,
        flags: i32,
    },
    /// `send(fd, buf[start..end])`.
    Send {
        fd: SharedFd,
        buf: Vec<u8>,
        start: usize,
        end: usize,
    },
}

/// Identifies a submitted operation, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpId {
    slot: u32,
    generation: u32,
}

/// A finished operation: the caller's tag, the result (bytes, or the poll
/// mask) and the buffer of a recv/send, handed back.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: io::Result<usize>,
    pub buf: Option<Vec<u8>>,
}

/// What an in-flight operation keeps alive until its final CQE.
#[derive(Debug)]
struct InFlight {
    tag: u64,
    generation: u32,
    linked_poll: bool,
    _fds: Vec<SharedFd>,
    buf: Option<Vec<u8>>,
}

/// Marks the user_data of the poll half of a `PollSplice`.
const POLL_BIT: u64 = 1 << 63;
/// user_data of cancel requests, whose CQEs are ignored.
const CANCEL_UD: u64 = u64::MAX;

fn user_data(slot: u32, generation: u32) -> u64 {
    (u64::from(generation & 0x7fff_ffff) << 32) | u64::from(slot)
}

/// An io_uring owned by one thread, with the table of what its in-flight
/// operations reference.
pub struct Ring {
    ring: IoUring,
    table: Vec<Option<InFlight>>,
    free: Vec<u32>,
    generation: u32,
    in_flight: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Sets up a ring with `entries` submission slots (and four times as
    /// many completion slots).
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .build(entries)?;
        Ok(Self {
            ring,
            table: Vec::new(),
            free: Vec::new(),
            generation: 0,
            in_flight: 0,
        })
    }

    /// Operations submitted whose final completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Pushes one SQE, flushing the submission queue to the kernel first
    /// if it is full.
    ///
    /// # Safety
    /// Every descriptor and buffer `entry` names must stay valid until its
    /// CQE is reaped (the callers below keep them in `self.table`).
    unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel, then retry.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completions must be reaped first; the caller's next
                    // `wait` does, but we cannot drop this entry.
                    return Err(e);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits `op`; its completion will carry `tag`.
    pub fn submit(&mut self, tag: u64, op: Op) -> io::Result<OpId> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = u32::try_from(self.table.len())
                    .map_err(|_| io::Error::other("io_uring op table full"))?;
                self.table.push(None);
                s
            }
        };
        self.generation = self.generation.wrapping_add(1) & 0x7fff_ffff;
        let generation = self.generation;
        let ud = user_data(slot, generation);
        let (entries, fds, buf, linked_poll): (Vec<squeue::Entry>, Vec<SharedFd>, _, bool) =
            match op {
                Op::PollSplice {
                    poll,
                    events,
                    from,
                    to,
                    len,
                } => {
                    let p = opcode::PollAdd::new(types::Fd(poll.as_raw_fd()), events)
                        .build()
                        .flags(squeue::Flags::IO_LINK)
                        .user_data(ud | POLL_BIT);
                    let s = opcode::Splice::new(
                        types::Fd(from.as_raw_fd()),
                        -1,
                        types::Fd(to.as_raw_fd()),
                        -1,
                        len,
                    )
                    .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                    .build()
                    .user_data(ud);
                    (vec![p, s], vec![poll, from, to], None, true)
                }
                Op::Poll { fd, events } => {
                    let p = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), events)
                        .build()
                        .user_data(ud);
                    (vec![p], vec![fd], None, false)
                }
                Op::Recv { fd, mut buf, flags } => {
                    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                    let r = opcode::Recv::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
                        .flags(flags)
                        .build()
                        .user_data(ud);
                    (vec![r], vec![fd], Some(buf), false)
                }
                Op::Send {
                    fd,
                    buf,
                    start,
                    end,
                } => {
                    let bytes = buf.get(start..end).unwrap_or_default();
                    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                    let s = opcode::Send::new(types::Fd(fd.as_raw_fd()), bytes.as_ptr(), len)
                        .build()
                        .user_data(ud);
                    (vec![s], vec![fd], Some(buf), false)
                }
            };
        // SAFETY: the SQEs name the descriptors in `fds` and, for recv/send,
        // the heap block of `buf` (a Vec's block does not move when the Vec
        // value is moved). Both go into `self.table[slot]` below before the
        // kernel can see the SQEs (they are only handed over by a later
        // `submit`), and stay there until `wait` reaps the final CQE of this
        // user_data; for a linked poll + splice the poll completes before
        // the splice's CQE is posted. Nothing reads or writes `buf` while
        // it is in the table. If `push` fails, the SQEs were not queued and
        // the resources are dropped with nothing referencing them.
        unsafe { self.push(&entries) }.inspect_err(|_| self.free.push(slot))?;
        if let Some(entry) = self.table.get_mut(slot as usize) {
            *entry = Some(InFlight {
                tag,
                generation,
                linked_poll,
                _fds: fds,
                buf,
            });
        }
        self.in_flight += 1;
        Ok(OpId { slot, generation })
    }

    /// Asks the kernel to cancel `id` (both halves of a poll + splice). The
    /// operation still completes (usually with `ECANCELED`) and its
    /// resources are released then, never earlier.
    pub fn cancel(&mut self, id: OpId) -> io::Result<()> {
        let live = self
            .table
            .get(id.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.generation == id.generation);
        if !live {
            return Ok(());
        }
        let ud = user_data(id.slot, id.generation);
        let linked = self
            .table
            .get(id.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.linked_poll);
        let mut entries = vec![opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD)];
        if linked {
            entries.push(
                opcode::AsyncCancel::new(ud | POLL_BIT)
                    .build()
                    .user_data(CANCEL_UD),
            );
        }
        // SAFETY: an ASYNC_CANCEL SQE names no descriptor or memory, only
        // the user_data of the request to cancel.
        unsafe { self.push(&entries) }
    }

    /// Submits what is queued, waits for at least one completion (or
    /// `EINTR`), and appends every final completion to `out`.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            if ud == CANCEL_UD || ud & POLL_BIT != 0 {
                // A cancel's answer, or the poll half of a poll + splice
                // (its splice completes after it and reports for both).
                continue;
            }
            let slot = (ud & 0xffff_ffff) as u32;
            let generation = (ud >> 32) as u32;
            let Some(entry) = self.table.get_mut(slot as usize) else {
                continue;
            };
            if entry.as_ref().is_none_or(|e| e.generation != generation) {
                continue;
            }
            if let Some(e) = entry.take() {
                self.free.push(slot);
                self.in_flight -= 1;
                let result = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                };
                out.push(Completion {
                    tag: e.tag,
                    result,
                    buf: e.buf,
                });
            }
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Cancel everything and reap it before the table (the descriptors
        // and buffers) goes away; if the kernel does not answer, leak the
        // table rather than free memory it may still write to.
        let ids: Vec<OpId> = self
            .table
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| {
                e.as_ref().map(|e| OpId {
                    slot: slot as u32,
                    generation: e.generation,
                })
            })
            .collect();
        for id in ids {
            let _ = self.cancel(id);
        }
        let mut out = Vec::new();
        for _ in 0..1000 {
            if self.in_flight == 0 {
                return;
            }
            if self.wait(&mut out).is_err() {
                break;
            }
            out.clear();
        }
        std::mem::forget(std::mem::take(&mut self.table));
    }
}

/// A non-blocking eventfd: other threads `notify`, the ring thread polls it
/// through the ring and `drain`s it.
#[derive(Debug)]
pub struct EventFd(SharedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; on success it returns a new
        // descriptor owned by nobody else.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` was just created and is owned only by this OwnedFd.
        Ok(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// The descriptor, to poll it through the ring.
    pub fn shared(&self) -> SharedFd {
        Arc::clone(&self.0)
    }

    fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Adds one to the counter (wakes a poller).
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: the descriptor is open while `self` lives; we pass a
        // pointer to 8 valid bytes on our stack and their length.
        let _ = unsafe { libc::write(self.raw(), (&raw const one).cast(), 8) };
    }

    /// Resets the counter.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: as above; the kernel writes at most 8 bytes into `v`.
        let _ = unsafe { libc::read(self.raw(), (&raw mut v).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};

    fn ring() -> Option<Ring> {
        match Ring::new(16) {
            Ok(r) => Some(r),
            Err(e) => {
                println!("skipped: io_uring_setup: {e}");
                None
            }
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn poll_splice_moves_bytes_and_cancel_releases_the_descriptors() {
        let Some(mut ring) = ring() else { return };
        let (mut a, b) = pair();
        let (c, mut d) = pair();
        b.set_nonblocking(true).unwrap();
        c.set_nonblocking(true).unwrap();
        let b: SharedFd = Arc::new(OwnedFd::from(b));
        let c: SharedFd = Arc::new(OwnedFd::from(c));
        let pipe = crate::sys::pipe::Pipe::new(1 << 16).unwrap();
        let (pr, pw) = pipe.into_fds();
        let (pr, pw) = (Arc::new(pr), Arc::new(pw));
        a.write_all(b"through the ring").unwrap();
        let mut out = Vec::new();
        let op = Op::PollSplice {
            poll: Arc::clone(&b),
            events: libc::POLLIN as u32,
            from: Arc::clone(&b),
            to: Arc::clone(&pw),
            len: 1 << 16,
        };
        ring.submit(1, op).unwrap();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        let n = out.pop().unwrap().result.unwrap();
        assert!(n > 0 && n <= 16);
        let op = Op::PollSplice {
            poll: Arc::clone(&c),
            events: libc::POLLOUT as u32,
            from: Arc::clone(&pr),
            to: Arc::clone(&c),
            len: n as u32,
        };
        ring.submit(2, op).unwrap();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        assert_eq!(out.pop().unwrap().result.unwrap(), n);
        let mut got = vec![0u8; n];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, &b"through the ring"[..n]);

        // A poll that never fires, cancelled: its CQE hands the descriptor
        // back (the table held the only other reference).
        let (_quiet, e) = pair();
        let e: SharedFd = Arc::new(OwnedFd::from(e));
        let id = ring
            .submit(
                3,
                Op::Poll {
                    fd: Arc::clone(&e),
                    events: libc::POLLIN as u32,
                },
            )
            .unwrap();
        assert_eq!(Arc::strong_count(&e), 2);
        ring.cancel(id).unwrap();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        let done = out.pop().unwrap();
        assert_eq!(done.tag, 3);
        assert_eq!(
            done.result.unwrap_err().raw_os_error(),
            Some(libc::ECANCELED)
        );
        assert_eq!(Arc::strong_count(&e), 1);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn recv_and_send_hand_the_buffer_back() {
        let Some(mut ring) = ring() else { return };
        let (mut a, b) = pair();
        let b: SharedFd = Arc::new(OwnedFd::from(b));
        a.write_all(b"hello").unwrap();
        let mut out = Vec::new();
        ring.submit(
            7,
            Op::Recv {
                fd: Arc::clone(&b),
                buf: vec![0u8; 64],
                flags: 0,
            },
        )
        .unwrap();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        let c = out.pop().unwrap();
        let n = c.result.unwrap();
        let buf = c.buf.unwrap();
        assert_eq!(&buf[..n], &b"hello"[..n]);
        ring.submit(
            8,
            Op::Send {
                fd: Arc::clone(&b),
                buf,
                start: 0,
                end: n,
            },
        )
        .unwrap();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        assert_eq!(out.pop().unwrap().result.unwrap(), n);
        let mut back = vec![0u8; n];
        a.read_exact(&mut back).unwrap();
        assert_eq!(&back, &b"hello"[..n]);
    }

    #[test]
    fn probe_answers() {
        match probe() {
            Ok(s) => println!("io_uring ops: {s:?}"),
            Err(e) => println!("skipped: io_uring unavailable: {e}"),
        }
    }
}
