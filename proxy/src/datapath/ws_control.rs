//! The control frames a WebSocket pump's tenant reader hands to its writer
//! (pongs to send, the close to send), and the pump's own closes (idle,
//! shutdown). Both halves run in one task, so a locked queue and two
//! wake-ups do: nothing is allocated while the queue is empty, where a
//! tokio mpsc channel holds a block of slots for every session.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::BytesMut;
use tokio::sync::Notify;

/// Frames queued for the tenant writer.
#[derive(Debug)]
pub(super) enum Control {
    Pong(BytesMut),
    Close(u16, &'static str),
}

/// Queued control frames the tenant reader may have waiting at once
/// (pongs beyond it wait: a tenant that pings and never reads is slowed
/// down, not buffered without bound).
const CAPACITY: usize = 8;

#[derive(Debug, Default)]
pub(super) struct ControlQueue {
    queue: Mutex<VecDeque<Control>>,
    /// Wakes the writer: something was queued.
    queued: Notify,
    /// Wakes a waiting sender: room was made.
    room: Notify,
}

impl ControlQueue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Control>> {
        // Never held across an await or a panic-prone call.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `c`, waiting while the queue is full.
    pub(super) async fn send(&self, c: Control) {
        loop {
            {
                let mut q = self.lock();
                if q.len() < CAPACITY {
                    q.push_back(c);
                    drop(q);
                    self.queued.notify_one();
                    return;
                }
            }
            self.room.notified().await;
        }
    }

    /// Queues `c` now. A close always fits (it is the last frame); a pong
    /// is dropped when the queue is full.
    pub(super) fn try_send(&self, c: Control) {
        let mut q = self.lock();
        if q.len() < CAPACITY || matches!(c, Control::Close(..)) {
            q.push_back(c);
            drop(q);
            self.queued.notify_one();
        }
    }

    /// The next queued frame, waiting for one. Cancel-safe: a frame is
    /// taken only when returned. Never `None` (the shape of a channel's
    /// `recv`, so the pumps read alike).
    pub(super) async fn recv(&self) -> Option<Control> {
        loop {
            let next = self.lock().pop_front();
            if let Some(c) = next {
                self.room.notify_one();
                return Some(c);
            }
            self.queued.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_come_out_in_order_and_a_full_queue_waits() {
        let q = ControlQueue::default();
        for i in 0..CAPACITY {
            q.send(Control::Pong(BytesMut::from(&[i as u8][..]))).await;
        }
        // Full: a pong sent now waits until the writer takes one.
        let waiting = q.send(Control::Pong(BytesMut::from(&b"late"[..])));
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut waiting)
                .await
                .is_err()
        );
        // A close always fits, even now.
        q.try_send(Control::Close(1001, "bye"));
        // Two frames out (the close took one slot): the late pong gets in.
        for i in 0..2 {
            match q.recv().await {
                Some(Control::Pong(p)) => assert_eq!(&p[..], &[i as u8]),
                other => panic!("{other:?}"),
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("a sender waiting for room gets in once there is room");
        for i in 2..CAPACITY {
            match q.recv().await {
                Some(Control::Pong(p)) => assert_eq!(&p[..], &[i as u8]),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(q.recv().await, Some(Control::Close(1001, "bye"))));
        assert!(matches!(q.recv().await, Some(Control::Pong(p)) if &p[..] == b"late"));
        // Dropped when full: pongs only.
        for _ in 0..CAPACITY {
            q.try_send(Control::Pong(BytesMut::new()));
        }
        q.try_send(Control::Pong(BytesMut::from(&b"dropped"[..])));
        assert_eq!(q.lock().len(), CAPACITY);
    }
}
