//! Waiting between queues without polling.
//!
//! A request that cannot go on because of another queue (the L2 slice it needs is being
//! loaded elsewhere, its cache set has no slot to give, the metadata lock or a fill claim is
//! taken) is parked, and its queue registers its bit in a [`Waiters`] mask for that
//! condition: one mask per cache set, one for the metadata lock. Whoever changes the state
//! the waiters wait for (a load completes, a pin or a dirty mark goes, the lock is released)
//! calls [`Waiters::notify`], which takes the mask and wakes every queue in it.
//!
//! The wake is a write to the queue's eventfd, on which the queue keeps an io_uring read
//! in flight while it has parked requests: the read completes, the queue's ring has a
//! completion, and the queue (or the event loop that polls its ring fd) runs again and
//! retries its parked requests. An eventfd rather than `IORING_OP_MSG_RING`, because the
//! state changes happen on any thread: queues, but also tools and the image's own flush
//! and close, which have no ring of their own to send from; a write(2) of 8 bytes works
//! from all of them, never blocks (the counter is drained by the reads) and costs one
//! syscall per woken queue per state change, only when someone waits.
//!
//! No wake is lost: a waiter registers first and then checks its condition again (the
//! cache re-claims; lock waiters compare [`Waiters::events`] with the count they read
//! before trying), and a notifier changes the state first and then reads the mask, with a
//! SeqCst fence on both sides between the two steps (the store-buffer pattern: at least one
//! of them sees the other's write).
//!
//! Queue bits come from a process-wide registry of [`WAKE_SLOTS`] eventfds, each created
//! once and never closed, so a late wake from a queue that read a slot just before its owner
//! left reaches at worst the slot's next owner (a spurious retry), never a reused fd
//! number. Queues beyond the registry share the last bit; their eventfds live in a list
//! under a mutex, and a wake of that bit reaches all of them.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering, fence};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering, fence};

/// A set of queues (one bit each) waiting for one condition, and the number of times the
/// condition's state changed.
#[derive(Debug, Default)]
pub struct Waiters {
    mask: AtomicU64,
    events: AtomicU64,
}

impl Waiters {
    /// No waiters.
    pub fn new() -> Self {
        Waiters { mask: AtomicU64::new(0), events: AtomicU64::new(0) }
    }

    /// Registers the queue bits `bits` as waiting. The caller must then check its condition
    /// again and sleep only if it still fails.
    pub fn add(&self, bits: u64) {
        self.mask.fetch_or(bits, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// How many times [`Waiters::notify_counted`] ran: a waiter reads it before trying,
    /// and after registering compares; a change means the state moved meanwhile.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// After a state change that may let waiters go on: takes the registered bits (the
    /// caller wakes them). Costs a fence and a load when nobody waits.
    #[must_use = "the queues taken must be woken"]
    pub fn notify(&self) -> u64 {
        fence(Ordering::SeqCst);
        if self.mask.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.mask.swap(0, Ordering::AcqRel)
    }

    /// [`Waiters::notify`] that also counts the event, for waiters that cannot re-check
    /// their condition without taking it (a lock).
    #[must_use = "the queues taken must be woken"]
    pub fn notify_counted(&self) -> u64 {
        self.events.fetch_add(1, Ordering::SeqCst);
        self.notify()
    }
}

/// Registry slots with a bit of their own; later queues share bit [`WAKE_SLOTS`].
pub const WAKE_SLOTS: usize = 63;

/// A queue's place in the wake registry: its bit and its eventfd.
#[cfg(not(loom))]
#[derive(Debug)]
pub struct Waker {
    slot: usize,
    fd: i32,
}

#[cfg(not(loom))]
mod registry {
    use super::*;
    use std::sync::Mutex;

    /// Slot i: its eventfd (created at first use, never closed), 0 when none yet.
    pub(super) static FDS: [AtomicI32; WAKE_SLOTS] = [const { AtomicI32::new(0) }; WAKE_SLOTS];
    /// Whether slot i has an owner.
    pub(super) static TAKEN: [AtomicU64; WAKE_SLOTS] = [const { AtomicU64::new(0) }; WAKE_SLOTS];
    /// The eventfds of the queues that share the last bit.
    pub(super) static OVERFLOW: Mutex<Vec<i32>> = Mutex::new(Vec::new());

    pub(super) fn eventfd() -> std::io::Result<i32> {
        // Blocking on purpose: io_uring turns a read of a blocking eventfd with a zero
        // counter into a poll-armed wait; on an O_NONBLOCK one it would fail with EAGAIN.
        // SAFETY: eventfd(2) takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 { Err(std::io::Error::last_os_error()) } else { Ok(fd) }
    }

    pub(super) fn signal(fd: i32) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is 8 readable bytes; fd is an eventfd this module owns (never
        // closed while registered: see `Waker`). A failed write (EAGAIN cannot happen on a
        // blocking eventfd short of 2^64 wakes) is ignored: the target retries anyway when
        // any of its own I/O completes.
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    }
}

#[cfg(not(loom))]
impl Waker {
    /// Takes a registry slot (or a place among the queues sharing the last bit).
    pub fn register() -> std::io::Result<Waker> {
        for slot in 0..WAKE_SLOTS {
            if registry::TAKEN[slot].compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                let mut fd = registry::FDS[slot].load(Ordering::Acquire);
                if fd == 0 {
                    fd = match registry::eventfd() {
                        Ok(fd) => fd,
                        Err(e) => {
                            registry::TAKEN[slot].store(0, Ordering::Release);
                            return Err(e);
                        }
                    };
                    registry::FDS[slot].store(fd, Ordering::Release);
                }
                return Ok(Waker { slot, fd });
            }
        }
        let fd = registry::eventfd()?;
        registry::OVERFLOW.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
        Ok(Waker { slot: WAKE_SLOTS, fd })
    }

    /// This queue's bit in [`Waiters`] masks.
    pub fn bit(&self) -> u64 {
        1 << self.slot
    }

    /// The eventfd the queue reads to learn that it was woken.
    pub fn fd(&self) -> i32 {
        self.fd
    }
}

#[cfg(not(loom))]
impl Drop for Waker {
    fn drop(&mut self) {
        if self.slot < WAKE_SLOTS {
            // The eventfd stays with the slot for its next owner.
            registry::TAKEN[self.slot].store(0, Ordering::Release);
        } else {
            let mut list = registry::OVERFLOW.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|&fd| fd != self.fd);
            // Closed under the lock: a waker writes to the list's fds only while holding it.
            // SAFETY: the fd is ours (created in `register`) and no longer listed.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// Wakes the queues in `mask` (from any thread).
#[cfg(not(loom))]
pub fn wake(mask: u64) {
    if mask == 0 {
        return;
    }
    let mut m = mask & ((1 << WAKE_SLOTS) - 1);
    while m != 0 {
        let slot = m.trailing_zeros() as usize;
        m &= m - 1;
        let fd = registry::FDS[slot].load(Ordering::Acquire);
        if fd != 0 {
            registry::signal(fd);
        }
    }
    if mask >> WAKE_SLOTS != 0 {
        for &fd in registry::OVERFLOW.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            registry::signal(fd);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn counter(fd: i32) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: fd is an eventfd; b is 8 writable bytes. Made non-blocking for the check.
        unsafe {
            libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
            let n = libc::read(fd, b.as_mut_ptr().cast(), 8);
            libc::fcntl(fd, libc::F_SETFL, 0);
            if n != 8 {
                return 0;
            }
        }
        u64::from_ne_bytes(b)
    }

    #[test]
    fn a_notify_wakes_exactly_the_registered_queues() {
        let a = Waker::register().unwrap();
        let b = Waker::register().unwrap();
        assert_ne!(a.bit(), b.bit());
        let w = Waiters::new();
        assert_eq!(w.notify(), 0, "nobody waits yet");
        w.add(a.bit());
        let m = w.notify();
        assert_eq!(m, a.bit());
        wake(m);
        assert_eq!(counter(a.fd()), 1);
        assert_eq!(counter(b.fd()), 0);
        assert_eq!(w.notify(), 0, "a notify takes the bits: the next one wakes nobody");
    }

    #[test]
    fn counted_notifies_move_the_event_count() {
        let w = Waiters::new();
        let e = w.events();
        let _ = w.notify();
        assert_eq!(w.events(), e);
        let _ = w.notify_counted();
        assert_eq!(w.events(), e + 1);
    }

    #[test]
    fn queues_past_the_registry_share_the_last_bit_and_all_wake() {
        let mut held = Vec::new();
        // Tests run in parallel in one process: take slots until the overflow is reached.
        let over = loop {
            let w = Waker::register().unwrap();
            if w.slot == WAKE_SLOTS {
                break w;
            }
            held.push(w);
        };
        let over2 = Waker::register().unwrap();
        assert_eq!(over.bit(), over2.bit());
        wake(over.bit());
        assert_eq!(counter(over.fd()), 1);
        assert_eq!(counter(over2.fd()), 1);
        drop(held);
    }
}
