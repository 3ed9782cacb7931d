//! Read buffers that exist only while bytes move, so an idle session holds
//! none (haproxy and nginx do the same with pooled buffers).
//!
//! A [`LazyBuf`] reads straight into its own buffer while data flows. Once a
//! read has waited for [`TRIM_AFTER`] with nothing to read, the buffer is
//! freed and further waiting polls the reader with a per-thread scratch
//! buffer that is borrowed only inside one `poll_read` call (never across
//! an await). When bytes arrive there they are copied into a fresh buffer
//! once, and the session is back on the fast path. The copy happens only
//! at the first read after an idle spell, never per chunk while data flows.
//!
//! The buffer grows with the stream: it starts just big enough for the
//! first chunk (at least [`MIN_BUF`]) and quadruples, up to its full size,
//! each time a read fills it. Interactive consoles (keystrokes, small
//! screen updates) so never take full-size buffers, which matters beyond
//! the bytes held: a full-size buffer freed after an idle spell stays in
//! the allocator's heap as a hole, and thousands of sessions' holes keep
//! the proxy's resident memory as if they were still held.

use std::cell::RefCell;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a read waits with its buffer held before freeing it.
pub const TRIM_AFTER: Duration = Duration::from_millis(250);

/// Smallest buffer a [`LazyBuf`] allocates: room for a keystroke's frame
/// or a small screen update. Kept small because a freed buffer leaves a
/// hole in the heap, and thousands of idle sessions' holes stay resident
/// (2 KiB here cost WebSocket sessions 0.5-1 KiB each when idle, measured
/// with `loadgen compare --scenarios idle`); a stream quadruples it in a
/// few reads.
pub const MIN_BUF: usize = 256;

/// Size of the per-thread scratch buffer: the largest read any lazy buffer
/// asks for.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Polls `r` once with the thread's scratch buffer (at most `max` bytes)
/// and hands what was read to `take` (with the context, to write it on).
pub fn poll_scratch<R, T>(
    r: Pin<&mut R>,
    cx: &mut Context<'_>,
    max: usize,
    take: impl FnOnce(&[u8], &mut Context<'_>) -> T,
) -> Poll<io::Result<T>>
where
    R: AsyncRead + ?Sized,
{
    SCRATCH_BUF.with(|cell| {
        // A reader that polls another lazy reader from inside its own
        // poll_read would find the scratch borrowed: give it a private one.
        let mut own;
        let mut guard = cell.try_borrow_mut().ok();
        let scratch: &mut Vec<u8> = match guard.as_deref_mut() {
            Some(s) => s,
            None => {
                own = Vec::new();
                &mut own
            }
        };
        if scratch.len() < SCRATCH {
            scratch.resize(SCRATCH, 0);
        }
        let mut rb = ReadBuf::new(&mut scratch[..max.min(SCRATCH)]);
        match r.poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(take(rb.filled(), cx))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
}

/// The idle timer of one reader: armed at the first `Pending` of a read.
#[derive(Debug)]
struct Trim {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Trim {
    fn new() -> Self {
        Self { sleep: None }
    }

    /// Arms the timer for a read that just started waiting.
    fn arm(&mut self) {
        let deadline = Instant::now() + TRIM_AFTER;
        match self.sleep.as_mut() {
            Some(s) => s.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// Whether the armed timer has fired (registers the waker if not).
    fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }

    /// Frees the timer too once idle (it is recreated on the next wait).
    fn release(&mut self) {
        self.sleep = None;
    }
}

/// A read buffer of up to `size` bytes behind `head` bytes of room (for a
/// frame header written in front of the payload), allocated only while
/// needed and grown only while reads fill it.
#[derive(Debug)]
pub struct LazyBuf {
    /// `head` bytes of room, then the payload space (empty: not allocated).
    buf: Vec<u8>,
    head: usize,
    size: usize,
    /// The last read filled the buffer: grow it before the next one.
    grow: bool,
    trim: Trim,
}

impl LazyBuf {
    pub fn new(head: usize, size: usize) -> Self {
        Self {
            buf: Vec::new(),
            head,
            size,
            grow: false,
            trim: Trim::new(),
        }
    }

    /// Whether the buffer is allocated now.
    pub fn is_allocated(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Payload bytes the buffer holds now (0: not allocated).
    pub fn capacity(&self) -> usize {
        self.buf.len().saturating_sub(self.head)
    }

    /// Reads once from `r`; the bytes are then in [`LazyBuf::data`]. 0 is
    /// end of stream. Cancel-safe like `AsyncReadExt::read`.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        let mut armed = false;
        std::future::poll_fn(|cx| self.poll_read(Pin::new(&mut *r), cx, &mut armed)).await
    }

    /// [`LazyBuf::read`] as a poll; `armed` belongs to the read in
    /// progress (false when it starts).
    pub fn poll_read<R: AsyncRead + ?Sized>(
        &mut self,
        mut r: Pin<&mut R>,
        cx: &mut Context<'_>,
        armed: &mut bool,
    ) -> Poll<io::Result<usize>> {
        let (head, size) = (self.head, self.size);
        if !self.buf.is_empty() {
            if std::mem::take(&mut self.grow) {
                let cap = (self.capacity() * 4).min(size);
                self.buf.resize(head + cap, 0);
            }
            let mut rb = ReadBuf::new(&mut self.buf[head..]);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.grow = n == self.buf.len() - head && n < size;
                    return Poll::Ready(Ok(n));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if !*armed {
                self.trim.arm();
                *armed = true;
            }
            if !self.trim.fired(cx) {
                return Poll::Pending;
            }
            // Idle: free the buffer and wait with the scratch buffer.
            self.buf = Vec::new();
            self.trim.release();
        }
        let (buf, grow) = (&mut self.buf, &mut self.grow);
        poll_scratch(r, cx, size, |got, _| {
            if !got.is_empty() {
                let cap = got.len().next_power_of_two().max(MIN_BUF).min(size);
                buf.resize(head + cap, 0);
                buf[head..head + got.len()].copy_from_slice(got);
                *grow = got.len() == cap && cap < size;
            }
            got.len()
        })
    }

    /// Takes `rest` into a fresh buffer (none may be held), as the first
    /// read after an idle spell does: afterwards [`LazyBuf::data`] of
    /// `rest.len()` bytes is `rest`, and reads use the buffer.
    pub fn keep(&mut self, rest: &[u8]) {
        let cap = rest.len().next_power_of_two().max(MIN_BUF).min(self.size);
        let cap = cap.max(rest.len());
        self.buf.clear();
        self.buf.resize(self.head + cap, 0);
        self.buf[self.head..self.head + rest.len()].copy_from_slice(rest);
        self.grow = rest.len() == cap && cap < self.size;
    }

    /// The bytes the last read returned (`n` of them).
    pub fn data(&self, n: usize) -> &[u8] {
        &self.buf[self.head..self.head + n]
    }

    /// The header room followed by the `n` bytes the last read returned.
    pub fn frame_mut(&mut self, n: usize) -> &mut [u8] {
        &mut self.buf[..self.head + n]
    }
}

/// `read_buf` into a `BytesMut` that may hold a partial message: while it
/// is empty and the read has waited for [`TRIM_AFTER`], its allocation is
/// freed and the wait goes on with the scratch buffer. Returns the bytes
/// appended (0: end of stream).
#[derive(Debug)]
pub struct LazyBytes {
    reserve: usize,
    /// The last read filled the room it had: give the next one more.
    grow: bool,
    trim: Trim,
}

impl LazyBytes {
    /// Reads grow the buffer by up to `reserve` bytes at a time: a fresh
    /// buffer gets just enough for the first chunk (at least [`MIN_BUF`]),
    /// and the room quadruples each time a read fills it, as
    /// [`LazyBuf`] does. (Small first buffers also keep the heap compact:
    /// a large buffer freed after an idle spell leaves a hole whose
    /// touched pages stay resident.)
    pub fn new(reserve: usize) -> Self {
        Self {
            reserve,
            grow: false,
            trim: Trim::new(),
        }
    }

    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
        buf: &mut BytesMut,
    ) -> io::Result<usize> {
        let mut armed = false;
        std::future::poll_fn(|cx| self.poll_read(Pin::new(&mut *r), buf, cx, &mut armed)).await
    }

    /// [`LazyBytes::read`] as a poll; `armed` belongs to the read in
    /// progress (false when it starts).
    pub fn poll_read<R: AsyncRead + ?Sized>(
        &mut self,
        mut r: Pin<&mut R>,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
        armed: &mut bool,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() > 0 {
            let spare = buf.capacity() - buf.len();
            if spare == 0 || std::mem::take(&mut self.grow) {
                let room = (buf.capacity() * 4).clamp(MIN_BUF, self.reserve.max(MIN_BUF));
                buf.reserve(room);
            }
            let spare = buf.capacity() - buf.len();
            match tokio_util::io::poll_read_buf(r.as_mut(), cx, buf) {
                Poll::Pending => {}
                Poll::Ready(Ok(n)) => {
                    self.grow = n > 0 && n >= spare;
                    return Poll::Ready(Ok(n));
                }
                done => return done,
            }
            if !*armed {
                self.trim.arm();
                *armed = true;
            }
            // A partial message keeps its buffer.
            if !buf.is_empty() || !self.trim.fired(cx) {
                return Poll::Pending;
            }
            *buf = BytesMut::new();
            self.trim.release();
        }
        let reserve = self.reserve;
        let grow = &mut self.grow;
        poll_scratch(r, cx, reserve, |got, _| {
            if !got.is_empty() {
                let room = got
                    .len()
                    .next_power_of_two()
                    .max(MIN_BUF)
                    .min(reserve.max(got.len()));
                buf.reserve(room);
                buf.extend_from_slice(got);
                *grow = got.len() >= room;
            }
            got.len()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test(start_paused = true)]
    async fn idle_reader_frees_its_buffer_and_still_reads_everything() {
        let (mut w, mut r) = tokio::io::duplex(1 << 20);
        let mut buf = LazyBuf::new(14, 64 * 1024);
        assert!(
            !buf.is_allocated(),
            "nothing allocated before the first byte"
        );
        w.write_all(b"first").await.unwrap();
        let n = buf.read(&mut r).await.unwrap();
        assert_eq!(buf.data(n), b"first");
        assert!(buf.is_allocated());
        // Shorter than TRIM_AFTER: the buffer stays for the next chunk.
        let quick = tokio::time::timeout(TRIM_AFTER / 2, buf.read(&mut r)).await;
        assert!(quick.is_err());
        assert!(buf.is_allocated());
        // Idle for longer: freed.
        let idle = tokio::time::timeout(TRIM_AFTER * 2, buf.read(&mut r)).await;
        assert!(idle.is_err());
        assert!(!buf.is_allocated(), "an idle reader holds no buffer");
        // The next bytes arrive through the scratch buffer, whole.
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&payload).await.unwrap();
        drop(w);
        let mut got = Vec::new();
        loop {
            let n = buf.read(&mut r).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= 64 * 1024);
            got.extend_from_slice(buf.data(n));
        }
        assert_eq!(got, payload);
    }

    /// A keystroke takes a small buffer; a stream grows it, a read that
    /// fills it at a time, to the full size and no further.
    #[tokio::test(start_paused = true)]
    async fn the_buffer_grows_only_while_reads_fill_it() {
        let (mut w, mut r) = tokio::io::duplex(1 << 20);
        let mut buf = LazyBuf::new(4, 64 * 1024);
        w.write_all(b"k").await.unwrap();
        let n = buf.read(&mut r).await.unwrap();
        assert_eq!((n, buf.capacity()), (1, MIN_BUF));
        w.write_all(b"ey").await.unwrap();
        assert_eq!(buf.read(&mut r).await.unwrap(), 2);
        assert_eq!(buf.capacity(), MIN_BUF, "small reads do not grow it");
        let payload: Vec<u8> = (0..500_000u32).map(|i| (i % 241) as u8).collect();
        w.write_all(&payload).await.unwrap();
        let (mut got, mut caps) = (Vec::new(), Vec::new());
        while got.len() < payload.len() {
            let n = buf.read(&mut r).await.unwrap();
            assert!(n > 0 && n <= buf.capacity());
            got.extend_from_slice(buf.data(n));
            caps.push(buf.capacity());
        }
        assert_eq!(got, payload);
        // Quadrupling from the smallest size, capped at the full one.
        let mut want = vec![MIN_BUF];
        while *want.last().unwrap() < 64 * 1024 {
            want.push((want.last().unwrap() * 4).min(64 * 1024));
        }
        assert_eq!(caps[..want.len()], want[..]);
        assert_eq!(
            caps.iter().max(),
            Some(&(64 * 1024)),
            "never beyond the size"
        );
        assert_eq!(buf.frame_mut(0).len(), 4, "the header room stays");
    }

    #[tokio::test(start_paused = true)]
    async fn header_room_stays_in_front_of_the_payload() {
        let (mut w, mut r) = tokio::io::duplex(1024);
        let mut buf = LazyBuf::new(4, 16);
        let _ = tokio::time::timeout(TRIM_AFTER * 2, buf.read(&mut r)).await;
        w.write_all(b"abc").await.unwrap();
        let n = buf.read(&mut r).await.unwrap();
        let frame = buf.frame_mut(n);
        frame[..4].copy_from_slice(b"HDR:");
        assert_eq!(&frame[..], b"HDR:abc");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_message_keeps_its_bytes() {
        let (mut w, mut r) = tokio::io::duplex(1024);
        let mut lazy = LazyBytes::new(1024);
        let mut buf = BytesMut::new();
        w.write_all(b"par").await.unwrap();
        assert_eq!(lazy.read(&mut r, &mut buf).await.unwrap(), 3);
        let idle = tokio::time::timeout(TRIM_AFTER * 2, lazy.read(&mut r, &mut buf)).await;
        assert!(idle.is_err());
        assert_eq!(&buf[..], b"par", "a partial message survives an idle spell");
        assert!(buf.capacity() > 0);
        // Once consumed, an idle wait frees the allocation.
        buf.clear();
        let idle = tokio::time::timeout(TRIM_AFTER * 2, lazy.read(&mut r, &mut buf)).await;
        assert!(idle.is_err());
        assert_eq!(buf.capacity(), 0, "an idle, empty buffer is freed");
        w.write_all(b"tial").await.unwrap();
        assert_eq!(lazy.read(&mut r, &mut buf).await.unwrap(), 4);
        assert_eq!(&buf[..], b"tial");
        drop(w);
        assert_eq!(lazy.read(&mut r, &mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn bytes_start_small_and_grow_while_reads_fill_them() {
        let (mut w, mut r) = tokio::io::duplex(1 << 20);
        let mut lazy = LazyBytes::new(16 * 1024);
        let mut buf = BytesMut::new();
        w.write_all(b"key").await.unwrap();
        assert_eq!(lazy.read(&mut r, &mut buf).await.unwrap(), 3);
        assert!(
            buf.capacity() <= MIN_BUF,
            "a keystroke takes a small buffer: {}",
            buf.capacity()
        );
        // A flood that is never consumed: reads fill the room and it grows
        // fourfold each time, every byte kept in order.
        let flood: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&flood).await.unwrap();
        let mut caps = Vec::new();
        while buf.len() < 3 + flood.len() {
            lazy.read(&mut r, &mut buf).await.unwrap();
            caps.push(buf.capacity());
        }
        assert_eq!(&buf[..3], b"key");
        assert!(buf[3..] == flood[..]);
        assert!(
            caps.windows(2).any(|c| c[1] >= c[0] * 2),
            "the buffer grew while reads filled it: {caps:?}"
        );
    }
}
