//! Waiting between queues without polling.
//!
//! A request that cannot go on because of another queue (the L2 slice it needs is being
//! loaded elsewhere, its cache set has no slot to give, the metadata lock or a fill claim is
//! taken) is parked, and its queue registers its bit in a [`Waiters`] mask for that
//! condition: one mask per cache set, one for the metadata lock. Whoever changes the state
//! the waiters wait for (a load completes, a pin or a dirty mark goes, the lock is released)
//! calls [`Waiters::notify`], which takes the mask and wakes every queue in it.
//!
//! How a wake travels depends on the thread that wakes:
//!
//! * **From a queue's thread** (inside [`crate::queue::Queue`]'s `submit`, `commit` or
//!   `reap`, which open a [`defer`] scope): [`wake`] only records the bits; before that
//!   queue enters the kernel (and at the latest before the call returns to its caller) it
//!   turns them into `IORING_OP_MSG_RING` SQEs on its own ring, one per woken queue,
//!   addressed to the target queue's ring fd ([`Waker::publish_ring`]). The target gets a
//!   CQE with a reserved user_data ([`WAKE_CQE`]), its ring fd polls readable, and it
//!   retries its parked requests. No syscall of its own: the message rides on the
//!   `io_uring_enter` the waker makes anyway (strace shows only io_uring_enter).
//! * **From any other thread** (tools, a closing image, a queue's drop, a queue with an
//!   SQPOLL ring, the queues past the registry): a write(2) of 8 bytes to the target's
//!   eventfd, on which every queue keeps an io_uring read in flight while it has parked
//!   requests. Such threads have no ring to send from.
//!
//! Why MSG_RING and not an `IORING_OP_WRITE` to the target's eventfd from the waker's
//! ring: eventfd has a `write` file operation, not `write_iter`, and io_uring issues such
//! writes non-blocking only on O_NONBLOCK files (our eventfds are blocking, so that the
//! target's read waits poll-armed instead of failing with EAGAIN): every wake would be
//! punted to an io-wq worker thread. MSG_RING completes inline. Its constraints:
//!
//! * Rings are set up with SINGLE_ISSUER and DEFER_TASKRUN when the kernel has them. The
//!   MSG_RING SQE is submitted by the waker's own thread on its own ring (single issuer
//!   holds); for a DEFER_TASKRUN target the kernel posts the CQE as task work of the
//!   target's thread and wakes it if it waits in io_uring_enter, like any completion.
//! * The SQE must not sit unsubmitted: the waker pushes it just before an enter it makes
//!   anyway (commit, or the wait for completions), and a call that recorded wakes and
//!   has no enter left submits before it returns. A wake is therefore late by at most the
//!   rest of the waker's current call.
//! * Teardown: the kernel resolves the target fd when the SQE is submitted and then holds
//!   the ring file until the message is delivered, so only the window between reading the
//!   fd and submitting matters (a closed and reused fd number could reach another ring).
//!   A sender announces itself in the slot ([`claim_ring`]) before it reads the fd and
//!   leaves ([`release_ring`]) once its SQ is empty; a retiring queue clears its fd first
//!   and then waits for announced senders to leave ([`Waker::retire_ring`]) before its
//!   ring closes (the store-buffer pattern again, SeqCst on both sides).
//! * A message that fails (no MSG_RING in the kernel, the target's CQ overflowing) comes
//!   back to the sender as a CQE ([`WAKE_SENT_CQE`] + slot), and the sender falls back to
//!   the eventfd write; successful sends post no CQE (CQE_SKIP_SUCCESS).
//!
//! No wake is lost: a waiter registers first and then checks its condition again (the
//! cache re-claims; lock waiters compare [`Waiters::events`] with the count they read
//! before trying), and a notifier changes the state first and then reads the mask, with a
//! SeqCst fence on both sides between the two steps (the store-buffer pattern: at least one
//! of them sees the other's write). The loom models in `meta/cache/loom_tests.rs` check it.
//!
//! Queue bits come from a process-wide registry of [`WAKE_SLOTS`] eventfds, each created
//! once and never closed, so a late wake from a queue that read a slot just before its owner
//! left reaches at worst the slot's next owner (a spurious retry), never a reused fd
//! number. Queues beyond the registry share the last bit; their eventfds live in a list
//! under a mutex, and a wake of that bit reaches all of them (always by write(2)).

#[cfg(loom)]
use loom::sync::atomic::{AtomicI32, AtomicU64, Ordering, fence};
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

    /// A waiter whose attempt failed after it read [`Waiters::events`] as `seen` parks:
    /// registers `bits`, and returns true when the state moved since `seen` (a release
    /// between the attempt and the registration, which may have found nobody to wake):
    /// the caller must retry at once instead of sleeping.
    #[must_use = "true: retry now, the wake may have gone before the registration"]
    pub fn park_after(&self, bits: u64, seen: u64) -> bool {
        self.add(bits);
        self.events() != seen
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

/// One queue's ring as the target of MSG_RING wakes: its fd, and the senders that read it
/// and have not submitted their message yet (see the module documentation, "Teardown").
#[derive(Debug)]
pub struct RingSlot {
    /// The ring fd plus one; 0 when none is published.
    fd: AtomicI32,
    /// Senders between [`RingSlot::claim`] and [`RingSlot::release`].
    sending: AtomicU64,
}

impl RingSlot {
    /// No ring published.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        RingSlot { fd: AtomicI32::new(0), sending: AtomicU64::new(0) }
    }

    /// No ring published (loom's atomics have no const constructor).
    #[cfg(loom)]
    pub fn new() -> Self {
        RingSlot { fd: AtomicI32::new(0), sending: AtomicU64::new(0) }
    }

    /// The owner's ring `fd` may now be messaged.
    pub fn publish(&self, fd: i32) {
        self.fd.store(fd + 1, Ordering::SeqCst);
    }

    /// A sender announces itself, then reads the fd: `Some(fd)` obliges it to
    /// [`RingSlot::release`] once its message is submitted; `None`: no ring (wake by
    /// eventfd).
    pub fn claim(&self) -> Option<i32> {
        self.sending.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        match self.fd.load(Ordering::SeqCst) {
            0 => {
                self.sending.fetch_sub(1, Ordering::SeqCst);
                None
            }
            fd => Some(fd - 1),
        }
    }

    /// The claimed message is submitted: the kernel holds the ring file now.
    pub fn release(&self) {
        self.sending.fetch_sub(1, Ordering::SeqCst);
    }

    /// The owner, before its ring closes: no new claim gets the fd, and every claim that
    /// got it is released when this returns.
    pub fn retire(&self) {
        self.fd.store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while self.sending.load(Ordering::SeqCst) != 0 {
            #[cfg(loom)]
            loom::thread::yield_now();
            #[cfg(not(loom))]
            std::thread::yield_now();
        }
    }
}

#[cfg(not(loom))]
impl Default for RingSlot {
    fn default() -> Self {
        Self::new()
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
    /// Slot i's owner's ring, for MSG_RING wakes.
    pub(super) static RINGS: [RingSlot; WAKE_SLOTS] = [const { RingSlot::new() }; WAKE_SLOTS];

    std::thread_local! {
        /// A queue call on this thread collects wakes instead of writing eventfds.
        pub(super) static DEFER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// The bits collected.
        pub(super) static PENDING: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        /// Eventfd writes made by this thread (tests check that queue threads make none).
        pub(super) static WRITES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        /// MSG_RING wakes sent from this thread.
        pub(super) static MESSAGES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

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
        WRITES.with(|w| w.set(w.get() + 1));
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

    /// Lets queues wake this one with `IORING_OP_MSG_RING` to `ring_fd` (its io_uring).
    /// Queues past the registry are woken by eventfd only.
    pub fn publish_ring(&self, ring_fd: i32) {
        if self.slot < WAKE_SLOTS && ring_fd >= 0 {
            registry::RINGS[self.slot].publish(ring_fd);
        }
    }

    /// Before the ring published by [`Waker::publish_ring`] closes: no new message is
    /// addressed to it, and every sender that read its fd has submitted (the kernel then
    /// holds the ring file itself). Senders submit before their queue call returns, so the
    /// wait is short; it never waits for this thread's own messages (released before).
    pub fn retire_ring(&self) {
        if self.slot >= WAKE_SLOTS {
            return;
        }
        registry::RINGS[self.slot].retire();
    }

    /// This queue's registry slot ([`WAKE_SLOTS`] for the queues sharing the last bit).
    pub fn slot(&self) -> usize {
        self.slot
    }
}

/// user_data of the CQE a MSG_RING wake posts on the woken queue's ring (no [`crate::queue`]
/// I/O index comes near it).
pub const WAKE_CQE: u64 = u64::MAX;

/// user_data of a MSG_RING wake's own SQE, plus the target slot: its CQE (posted only on
/// failure) names the queue to wake by eventfd instead.
pub const WAKE_SENT_CQE: u64 = u64::MAX - 1 - WAKE_SLOTS as u64;

/// While alive, [`wake`] on this thread records bits (for [`take_deferred`]) instead of
/// writing eventfds; bits still recorded when the outermost scope ends are woken by
/// eventfd then. Opened by a queue call that sends the recorded bits from its own ring.
#[cfg(not(loom))]
#[derive(Debug)]
pub struct Deferral {
    outer: bool,
}

/// Opens a [`Deferral`] scope on this thread.
#[cfg(not(loom))]
pub fn defer() -> Deferral {
    Deferral { outer: !registry::DEFER.with(|d| d.replace(true)) }
}

#[cfg(not(loom))]
impl Drop for Deferral {
    fn drop(&mut self) {
        if self.outer {
            registry::DEFER.with(|d| d.set(false));
            signal_mask(registry::PENDING.with(|p| p.replace(0)));
        }
    }
}

/// Takes the bits recorded on this thread by [`wake`] in a [`Deferral`] scope.
#[cfg(not(loom))]
pub fn take_deferred() -> u64 {
    registry::PENDING.with(|p| p.replace(0))
}

/// Whether [`wake`] recorded bits on this thread that are not taken yet.
#[cfg(not(loom))]
pub fn has_deferred() -> bool {
    registry::PENDING.with(|p| p.get()) != 0
}

/// Eventfd writes (wakes by write(2)) made by the calling thread so far.
#[cfg(not(loom))]
pub fn eventfd_writes_on_this_thread() -> u64 {
    registry::WRITES.with(|w| w.get())
}

/// MSG_RING wakes queued by the calling thread's queues so far.
#[cfg(not(loom))]
pub fn ring_wakes_on_this_thread() -> u64 {
    registry::MESSAGES.with(|w| w.get())
}

/// A sender's first step for a MSG_RING wake of registry slot `slot`: announces itself and
/// returns the slot owner's ring fd, or `None` (no ring published: wake by eventfd). When
/// `Some`, the caller must call [`release_ring`] once its message is submitted.
#[cfg(not(loom))]
pub fn claim_ring(slot: usize) -> Option<i32> {
    let fd = registry::RINGS[slot].claim();
    if fd.is_some() {
        registry::MESSAGES.with(|w| w.set(w.get() + 1));
    }
    fd
}

/// The message to the ring of `slot` claimed by [`claim_ring`] is submitted (or dropped).
#[cfg(not(loom))]
pub fn release_ring(slot: usize) {
    registry::RINGS[slot].release();
}

/// Wakes registry slot `slot` by a write(2) to its eventfd.
#[cfg(not(loom))]
pub fn signal_slot(slot: usize) {
    if slot < WAKE_SLOTS {
        let fd = registry::FDS[slot].load(Ordering::Acquire);
        if fd != 0 {
            registry::signal(fd);
        }
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

/// Wakes the queues in `mask` (from any thread). Inside a [`Deferral`] scope the bits with
/// a registry slot of their own are recorded for the scope's queue to send from its ring.
#[cfg(not(loom))]
pub fn wake(mask: u64) {
    if mask == 0 {
        return;
    }
    let own = mask & ((1 << WAKE_SLOTS) - 1);
    if own != 0 && registry::DEFER.with(|d| d.get()) {
        registry::PENDING.with(|p| p.set(p.get() | own));
        signal_mask(mask & !own);
    } else {
        signal_mask(mask);
    }
}

/// Wakes the queues in `mask` by eventfd writes.
#[cfg(not(loom))]
fn signal_mask(mask: u64) {
    if mask == 0 {
        return;
    }
    let mut m = mask & ((1 << WAKE_SLOTS) - 1);
    while m != 0 {
        let slot = m.trailing_zeros() as usize;
        m &= m - 1;
        signal_slot(slot);
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

#[cfg(all(test, loom))]
mod loom_tests;

/// Under loom the registry is not modelled (the cache's tests record wakes instead).
#[cfg(loom)]
#[derive(Debug)]
pub struct Waker;

#[cfg(loom)]
impl Waker {
    /// A stand-in.
    pub fn register() -> std::io::Result<Waker> {
        Ok(Waker)
    }
    /// No bit.
    pub fn bit(&self) -> u64 {
        0
    }
    /// No fd.
    pub fn fd(&self) -> i32 {
        -1
    }
    /// No ring.
    pub fn publish_ring(&self, _ring_fd: i32) {}
    /// No ring.
    pub fn retire_ring(&self) {}
    /// No slot.
    pub fn slot(&self) -> usize {
        WAKE_SLOTS
    }
}

/// Under loom: nothing to wake.
#[cfg(loom)]
pub fn wake(_mask: u64) {}

/// Under loom: no deferral.
#[cfg(loom)]
#[derive(Debug)]
pub struct Deferral;

/// Under loom: no deferral.
#[cfg(loom)]
pub fn defer() -> Deferral {
    Deferral
}

/// Under loom: nothing recorded.
#[cfg(loom)]
pub fn take_deferred() -> u64 {
    0
}

/// Under loom: nothing recorded.
#[cfg(loom)]
pub fn has_deferred() -> bool {
    false
}

/// Under loom: no rings.
#[cfg(loom)]
pub fn claim_ring(_slot: usize) -> Option<i32> {
    None
}

/// Under loom: no rings.
#[cfg(loom)]
pub fn release_ring(_slot: usize) {}

/// Under loom: nothing to wake.
#[cfg(loom)]
pub fn signal_slot(_slot: usize) {}
