//! When a freed cluster may be reused: reclamation epochs.
//!
//! A request resolves guest offsets to host clusters and then reads or writes them, with
//! no lock held between the two. A discard (or a copy-on-write that replaced a cluster)
//! running meanwhile on another queue drops the mapping and queues the cluster's decrement;
//! if the flush applied it at once, the cluster could be handed out and written for
//! another guest offset while the first request's I/O is still in flight: a read would
//! return another offset's data, a write would land in someone else's cluster.
//!
//! So decrements wait for every request that started before the reference was dropped.
//! Each queue has a [`Gate`]: two counters of its requests in flight, one per epoch
//! parity. A request enters the gate of the current epoch when it is submitted (before
//! any lookup) and leaves it when it completes. The flush moves the queued decrements into
//! a retiring batch and flips the epoch (every reference drop in the batch happened before
//! the flip, so a request that enters after it cannot see the old mappings); the batch is
//! applied once no queue has a request of the old parity in flight, at that flush or a
//! later one. Only one batch retires at a time (the parity is reused after two flips), and
//! an epoch flips only once the previous flip's old parity has drained.
//! Unlike a count of all requests in flight, this cannot be starved by a steady stream of
//! requests: the old parity only drains.
//!
//! An asynchronous write-back (`image/writeback.rs`) flips the epoch for the decrements it
//! carries when it begins, if no batch retires or waits to: their reference drops
//! happened before that flip just the same, so once the write-back completed they retire
//! at once, one write-back earlier than a flip after its completion would allow (the
//! freed-cluster bound, issue 14).

use crate::image::Image;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::*, fence};

/// One queue's requests in flight, per epoch parity (each counter written by the queue's
/// thread only; read by flushes).
#[derive(Default, Debug)]
pub(crate) struct Gate {
    active: [AtomicU64; 2],
}

impl Image {
    /// A queue's gate joins the image (counted by flushes until [`Image::close_gate`]).
    pub(crate) fn open_gate(&self) -> Arc<Gate> {
        let g = Arc::new(Gate::default());
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).push(g.clone());
        g
    }

    /// A queue is gone: its gate no longer holds anything back (requests it abandoned
    /// have no I/O in flight any more: the queue drains its ring before this).
    pub(crate) fn close_gate(&self, g: &Arc<Gate>) {
        let mut list = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().position(|x| Arc::ptr_eq(x, g)) {
            list.swap_remove(i);
        }
    }

    /// A request starts (before it looks anything up): counts it in the current epoch.
    /// Returns the parity to pass to [`Image::leave`].
    #[inline]
    pub(crate) fn enter(&self, g: &Gate) -> u8 {
        loop {
            let e = self.epoch.load(SeqCst);
            let p = (e & 1) as usize;
            g.active[p].fetch_add(1, SeqCst);
            // The flip may have happened between the load and the increment: then the
            // flush may already have found the old parity drained; count in the new one.
            if self.epoch.load(SeqCst) == e {
                return p as u8;
            }
            g.active[p].fetch_sub(1, Release);
        }
    }

    /// A request that entered with parity `p` is complete (its I/O is done).
    #[inline]
    pub(crate) fn leave(&self, g: &Gate, p: u8) {
        g.active[p as usize].fetch_sub(1, Release);
    }

    /// Starts a new epoch (the metadata lock is held: one flip at a time).
    pub(crate) fn flip_epoch(&self) {
        self.epoch.fetch_add(1, SeqCst);
    }

    /// Have all requests that entered before the last flip completed?
    pub(crate) fn old_epoch_drained(&self) -> bool {
        fence(SeqCst);
        let old = ((self.epoch.load(SeqCst) + 1) & 1) as usize;
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).iter().all(|g| g.active[old].load(SeqCst) == 0)
    }

    /// Requests in flight over every queue (both parities).
    pub(crate) fn requests_in_flight(&self) -> u64 {
        fence(SeqCst);
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|g| g.active[0].load(SeqCst) + g.active[1].load(SeqCst))
            .sum()
    }

    /// [`Image::enter`] for a new request, refused while a snapshot operation runs
    /// ([`crate::image::snapshot`]): the request counts itself first and then looks at the
    /// flag, the operation sets the flag first and then counts the requests (both SeqCst),
    /// so one of the two always sees the other.
    pub(crate) fn enter_request(&self, g: &Gate) -> crate::Result<u8> {
        let p = self.enter(g);
        if self.snapshot_busy.load(SeqCst) {
            self.leave(g, p);
            return Err(crate::Error::InvalidRequest(
                "a snapshot operation is running on the image: submit again when it is done".into(),
            ));
        }
        Ok(p)
    }
}
