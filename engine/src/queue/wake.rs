//! The queue's side of waiting for other queues ([`crate::meta::waiters`]): registering a
//! parked request's condition, the eventfd read that a wake completes, and retrying the
//! parked requests only when something they wait for changed. No timer.

use super::*;
use io_uring::{opcode, types};

impl Queue {
    /// Keeps a read of this queue's eventfd in flight, so that a wake from any thread
    /// completes it and the ring (or the event loop polling its fd) runs again.
    pub(super) fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let buf = Box::new(0u64);
        let ptr = (&*buf as *const u64).cast_mut().cast::<u8>();
        let io = self.ios.insert(Io::Wake { _buf: buf });
        let sqe = opcode::Read::new(types::Fd(self.waker.fd()), ptr, 8).build().user_data(io as u64);
        self.wake_armed = true;
        self.push(sqe);
    }

    /// The eventfd read completed: someone woke this queue.
    pub(super) fn woke(&mut self) {
        self.wake_armed = false;
        self.woken = true;
    }

    /// Has the parked requests retried at the next reap, through a completion of this
    /// ring (a NOP), so that an event loop that waits on the ring fd also comes back.
    pub(super) fn nudge(&mut self) {
        if self.nudged {
            return;
        }
        let io = self.ios.insert(Io::Nudge);
        self.nudged = true;
        self.push(opcode::Nop::new().build().user_data(io as u64));
    }

    /// The NOP of [`Queue::nudge`] completed.
    pub(super) fn nudged(&mut self) {
        self.nudged = false;
        self.woken = true;
    }

    /// Waits for a busy claim of slice `key` of `layer` to end: registers this queue with
    /// the slice's cache set. The caller claims once more before it parks.
    pub(super) fn wait_slice(&mut self, layer: &Image, key: u64) {
        layer.l2_cache.wait(key, self.waker.bit());
        self.arm_wake();
    }

    /// Records how often the metadata lock and fill claims were given back so far; a
    /// request that then fails to take one and parks compares ([`Queue::wait_lock`]).
    pub(super) fn note_lock_events(&mut self) {
        self.lock_seen = self.image.lock_waiters.events();
    }

    /// Waits for the metadata lock or a fill claim: registers this queue, and if either
    /// was given back since [`Queue::note_lock_events`] (before the failed attempt),
    /// retries at once instead (that release may have found nobody registered).
    pub(super) fn wait_lock(&mut self) {
        self.image.lock_waiters.add(self.waker.bit());
        self.arm_wake();
        if self.image.lock_waiters.events() != self.lock_seen {
            self.nudge();
        }
    }

    /// Retries the parked requests, jobs and flushes if something they wait for changed.
    pub(super) fn retry_if_woken(&mut self) {
        if std::mem::take(&mut self.woken) {
            self.retry_parked();
        }
    }

    /// Teardown: completes this queue's own eventfd read, if in flight.
    pub(super) fn disarm_wake(&mut self) {
        if self.wake_armed {
            crate::meta::waiters::wake(self.waker.bit());
        }
    }
}
