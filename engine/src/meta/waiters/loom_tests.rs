//! The wait/wake protocols outside the cache, model-checked with loom (`scripts/loom.sh`):
//! the metadata lock and the fill claims (waiters that note [`Waiters::events`], fail an
//! attempt, then register and compare: [`Waiters::park_after`]), group-flush joins
//! (registration under the write-back coordinator's lock), and the MSG_RING target
//! teardown ([`RingSlot`]). The cache's own waits (a load, a free way) are modelled in
//! `meta/cache/loom_tests.rs`.
//!
//! Each lost-wake-up model has a twin that leaves out the step that prevents the race and
//! must fail: the models can fail.
//!
//! A queue's "wake" is the mask a notifier takes; the models record it in `woken` (the
//! eventfd or MSG_RING delivery after it is the kernel's).

use super::*;
use loom::sync::atomic::AtomicBool;
use loom::sync::{Arc, Mutex};
use loom::thread;

/// What a waiter's single attempt ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// It took the lock or the claim (and gave it back, waking).
    Got,
    /// Its attempt failed and the state moved before it registered: retries at once.
    Retry,
    /// Registered and sleeps: something must wake it.
    Parked,
}

/// The metadata lock as the queues use it: `try_meta` fails, the waiter registers and
/// compares the event count it noted before trying ([`crate::queue`]'s
/// `note_lock_events` / `wait_lock`); a release unlocks, then counts and notifies
/// (`MetaGuard::drop`). The lock is a try-lock flag, held at the start by a third thread
/// (a mutex guard cannot be handed to a thread); `recheck: false` leaves out the comparison.
fn lock_model(recheck: bool) {
    fn release(w: &Waiters, lock: &AtomicBool, woken: &AtomicU64) {
        lock.store(false, Ordering::Release);
        woken.fetch_or(w.notify_counted(), Ordering::SeqCst);
    }
    fn attempt(me: u64, recheck: bool, w: &Waiters, lock: &AtomicBool, woken: &AtomicU64) -> Outcome {
        let seen = w.events();
        if lock.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            release(w, lock, woken);
            return Outcome::Got;
        }
        let moved = w.park_after(me, seen);
        if moved && recheck { Outcome::Retry } else { Outcome::Parked }
    }
    loom::model(move || {
        let w = Arc::new(Waiters::new());
        let lock = Arc::new(AtomicBool::new(true));
        let woken = Arc::new(AtomicU64::new(0));
        let holder = {
            let (w, lock, woken) = (w.clone(), lock.clone(), woken.clone());
            thread::spawn(move || release(&w, &lock, &woken))
        };
        let other = {
            let (w, lock, woken) = (w.clone(), lock.clone(), woken.clone());
            thread::spawn(move || attempt(1 << 1, recheck, &w, &lock, &woken))
        };
        let mine = attempt(1 << 0, recheck, &w, &lock, &woken);
        holder.join().unwrap();
        let theirs = other.join().unwrap();
        let woken = woken.load(Ordering::SeqCst);
        for (bit, outcome) in [(1u64 << 0, mine), (1 << 1, theirs)] {
            if outcome == Outcome::Parked {
                assert!(woken & bit != 0, "a lock waiter ({bit:#x}) sleeps and nobody woke it");
            }
        }
    });
}

/// Two queues' requests fail to take the metadata lock while a third thread holds and
/// releases it (and each may take it and release it in turn): a waiter that parks is woken.
#[test]
fn a_lock_waiter_is_woken_even_if_the_release_came_before_it_registered() {
    lock_model(true);
}

/// Without comparing the event count after registering, a release between the failed
/// attempt and the registration is lost: the model must find that interleaving.
#[test]
#[should_panic(expected = "nobody woke it")]
fn without_the_recheck_a_lock_wake_is_lost() {
    lock_model(false);
}

/// Fill claims (`Image::claim_fill` / `release_fill`): a set of claimed host clusters
/// under a short lock; a claim of a cluster in the set fails and parks on the lock
/// waiters; a release removes it and then counts and notifies.
fn fill_model(recheck: bool) {
    const HOST: u64 = 0x30000;
    loom::model(move || {
        let w = Arc::new(Waiters::new());
        let set = Arc::new(Mutex::new(vec![HOST]));
        let woken = Arc::new(AtomicU64::new(0));
        let claim = |set: &Mutex<Vec<u64>>| {
            let mut s = set.lock().unwrap();
            if s.contains(&HOST) {
                false
            } else {
                s.push(HOST);
                true
            }
        };
        let release = |set: &Mutex<Vec<u64>>, w: &Waiters, woken: &AtomicU64| {
            set.lock().unwrap().retain(|&h| h != HOST);
            woken.fetch_or(w.notify_counted(), Ordering::SeqCst);
        };
        // The job holding the claim finishes its fill.
        let holder = {
            let (w, set, woken) = (w.clone(), set.clone(), woken.clone());
            thread::spawn(move || release(&set, &w, &woken))
        };
        const ME: u64 = 1 << 3;
        let seen = w.events();
        let outcome = if claim(&set) {
            release(&set, &w, &woken);
            Outcome::Got
        } else if w.park_after(ME, seen) && recheck {
            Outcome::Retry
        } else {
            Outcome::Parked
        };
        holder.join().unwrap();
        if outcome == Outcome::Parked {
            assert!(woken.load(Ordering::SeqCst) & ME != 0, "a fill waiter sleeps and nobody woke it");
        }
    });
}

/// A claimer of a host cluster whose fill another job is finishing: it gets the claim,
/// retries at once, or is woken by the release.
#[test]
fn a_fill_claim_waiter_is_never_forgotten() {
    fill_model(true);
}

/// The fill claim's race, found without the recheck.
#[test]
#[should_panic(expected = "nobody woke it")]
fn without_the_recheck_a_fill_wake_is_lost() {
    fill_model(false);
}

/// Group-flush joins (`queue/flush.rs: group_flush`, `image/writeback.rs: end`): a flush
/// that finds a write-back in flight registers with its waiters while it holds the
/// coordinator's lock; the write-back's end clears `in_flight` under that lock and
/// notifies after giving it back. `under_lock: false` registers after the lock is given
/// back (and must lose a wake).
fn join_model(under_lock: bool) {
    loom::model(move || {
        let w = Arc::new(Waiters::new());
        // The write-back generation in flight (one is, at the start).
        let coord = Arc::new(Mutex::new(Some(1u64)));
        let woken = Arc::new(AtomicU64::new(0));
        let ender = {
            let (w, coord, woken) = (w.clone(), coord.clone(), woken.clone());
            thread::spawn(move || {
                *coord.lock().unwrap() = None;
                woken.fetch_or(w.notify(), Ordering::SeqCst);
            })
        };
        const ME: u64 = 1 << 7;
        let parked = {
            let c = coord.lock().unwrap();
            if c.is_some() {
                if under_lock {
                    w.add(ME);
                    drop(c);
                } else {
                    drop(c);
                    w.add(ME);
                }
                true
            } else {
                false
            }
        };
        ender.join().unwrap();
        if parked {
            assert!(woken.load(Ordering::SeqCst) & ME != 0, "a joined flush sleeps and nobody woke it");
        }
    });
}

/// A flush joins a write-back that ends meanwhile: it saw none in flight, or it is woken.
#[test]
fn a_joined_flush_is_woken_when_the_write_back_ends() {
    join_model(true);
}

/// Registering after giving the coordinator's lock back loses the end's wake.
#[test]
#[should_panic(expected = "nobody woke it")]
fn a_join_registered_outside_the_lock_can_be_lost() {
    join_model(false);
}

/// MSG_RING wakes and queue teardown (`RingSlot`): two senders may address the owner's
/// ring while it retires; no message is submitted to a ring after it closed (a closed fd
/// number could be reused by another ring), and a sender that comes too late is told to
/// use the eventfd.
#[test]
fn no_wake_message_reaches_a_closed_ring() {
    loom::model(|| {
        let slot = Arc::new(RingSlot::new());
        let closed = Arc::new(AtomicBool::new(false));
        slot.publish(7);
        let senders: Vec<_> = (0..2)
            .map(|_| {
                let (slot, closed) = (slot.clone(), closed.clone());
                thread::spawn(move || match slot.claim() {
                    Some(fd) => {
                        assert_eq!(fd, 7);
                        // The submit: the kernel resolves the fd now.
                        assert!(!closed.load(Ordering::SeqCst), "a wake message was submitted to a closed ring");
                        slot.release();
                        true
                    }
                    None => false,
                })
            })
            .collect();
        slot.retire();
        closed.store(true, Ordering::SeqCst);
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(slot.claim(), None, "a retired ring is still published");
    });
}

/// The same teardown with a retire that only clears the fd (no wait for announced
/// senders): a sender that read the fd just before can submit after the ring closed.
#[test]
#[should_panic(expected = "submitted to a closed ring")]
fn a_retire_that_does_not_wait_for_senders_can_lose_the_race() {
    loom::model(|| {
        let slot = Arc::new(RingSlot::new());
        let closed = Arc::new(AtomicBool::new(false));
        slot.publish(7);
        let sender = {
            let (slot, closed) = (slot.clone(), closed.clone());
            thread::spawn(move || {
                if slot.claim().is_some() {
                    assert!(!closed.load(Ordering::SeqCst), "a wake message was submitted to a closed ring");
                    slot.release();
                }
            })
        };
        slot.fd.store(0, Ordering::SeqCst);
        closed.store(true, Ordering::SeqCst);
        sender.join().unwrap();
    });
}
