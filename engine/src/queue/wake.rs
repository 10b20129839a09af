//! The queue's side of waiting for other queues ([`crate::meta::waiters`]): registering a
//! parked request's condition, the eventfd read that a wake from a thread without a ring
//! completes, the MSG_RING messages by which this queue wakes others from its own ring (and
//! receives theirs), and retrying the parked requests only when something they wait for
//! changed. No timer.

use super::*;
use crate::meta::waiters::{self, WAKE_CQE, WAKE_SENT_CQE, WAKE_SLOTS};
use io_uring::{opcode, squeue, types};

impl Queue {
    /// Opens a scope in which wakes made on this thread are recorded for this queue to
    /// send from its ring ([`Queue::send_wakes`]) instead of written to eventfds. Not for an
    /// SQPOLL ring (the kernel thread submits whenever it likes: the window between reading
    /// a target's ring fd and submitting would have no bound).
    pub(super) fn defer_wakes(&self) -> Option<waiters::Deferral> {
        if self.ring_wakes { Some(waiters::defer()) } else { None }
    }

    /// Turns the wakes recorded on this thread into MSG_RING SQEs on this ring, addressed
    /// to each woken queue's ring; called right before this queue enters the kernel. A
    /// wake of this queue itself is a NOP; a queue with no ring published (gone, or an
    /// SQPOLL one) is woken by eventfd.
    pub(super) fn send_wakes(&mut self) {
        if !self.ring_wakes {
            return;
        }
        let mut m = waiters::take_deferred();
        while m != 0 {
            let slot = m.trailing_zeros() as usize;
            m &= m - 1;
            if slot == self.waker.slot() {
                self.nudge();
                continue;
            }
            let Some(fd) = waiters::claim_ring(slot) else {
                waiters::signal_slot(slot);
                continue;
            };
            self.wake_claims.push(slot);
            let sqe = opcode::MsgRingData::new(types::Fd(fd), 0, WAKE_CQE, None)
                .build()
                .flags(squeue::Flags::SKIP_SUCCESS)
                .user_data(WAKE_SENT_CQE + slot as u64);
            self.push(sqe);
        }
    }

    /// After an io_uring_enter: once the kernel has taken every queued SQE, the MSG_RING
    /// wakes among them hold their target rings themselves; give up the claims.
    pub(super) fn settle_wakes(&mut self) {
        if !self.wake_claims.is_empty() && self.ring.submission().is_empty() {
            for slot in self.wake_claims.drain(..) {
                waiters::release_ring(slot);
            }
        }
    }

    /// End of a queue call that opened [`Queue::defer_wakes`]: wakes recorded since the
    /// last enter are sent and submitted now, not left for a later call.
    pub(super) fn finish_wakes(&mut self) -> Result<()> {
        if waiters::has_deferred() { self.commit() } else { Ok(()) }
    }

    /// A CQE with a reserved user_data: a wake from another queue's ring, or a wake this
    /// queue sent that failed (then sent by eventfd instead).
    pub(super) fn wake_cqe(&mut self, user_data: u64, res: i32) {
        if user_data == WAKE_CQE {
            self.woken = true;
        } else if res < 0 {
            let slot = (user_data - WAKE_SENT_CQE) as usize;
            if slot < WAKE_SLOTS {
                waiters::signal_slot(slot);
            }
        }
    }

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
        self.wake_io = io;
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
        let moved = self.image.lock_waiters.park_after(self.waker.bit(), self.lock_seen);
        self.arm_wake();
        if moved {
            self.nudge();
        }
    }

    /// Retries the parked requests, jobs and flushes if something they wait for changed.
    pub(super) fn retry_if_woken(&mut self) {
        if std::mem::take(&mut self.woken) {
            self.retry_parked();
        }
    }

    /// Teardown: completes this queue's own eventfd read, if in flight: cancelled from its
    /// own ring (no syscall of its own; the read's handler runs on -ECANCELED like on a
    /// wake), or, where the cancel cannot be issued (an SQPOLL ring), by a wake of its own
    /// eventfd.
    pub(super) fn disarm_wake(&mut self) {
        if !self.wake_armed {
            return;
        }
        if self.ring_wakes {
            let io = self.ios.insert(Io::Nudge);
            self.push(opcode::AsyncCancel::new(self.wake_io as u64).build().user_data(io as u64));
        } else {
            waiters::wake(self.waker.bit());
        }
    }
}
