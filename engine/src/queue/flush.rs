//! Flushes: metadata written back in dependency order and the device flushed, once for
//! every flush waiting in the queue and, across queues, once for every flush that a
//! write-back already in flight covers (group commit).
//!
//! A flush remembers the last write-back generation started when the guest writes
//! completed before it did ([`crate::image::writeback::WbCoord`]; a writethrough write:
//! when its own data completed). A write-back started after that copies every L2 entry
//! those writes published and flushes the device after their data, so it covers the flush: when one is in flight, the flush joins it and completes when it
//! completes, on whichever queue it runs. Otherwise the queue waits for the write-back in
//! flight to end (woken through its ring, `queue/wake.rs`), and then starts the next one
//! itself: the dirty metadata is copied under the metadata lock, the lock is given back,
//! and the writes and device flushes run on this queue's ring (`queue/writeback.rs`). No
//! queue thread waits for the device or for another queue's I/O.

use super::*;

impl Queue {
    /// Flush (or a writethrough write whose data is written): waits for the next write-back
    /// that covers it.
    pub(crate) fn drive_flush(&mut self, id: usize) {
        if self.image.meta.is_none() {
            self.finish(id);
            return;
        }
        let wb = &self.image.wb;
        let seen = if self.reqs[id].kind == ReqKind::Flush { wb.flush_mark() } else { wb.write_mark() };
        self.flush_waiters.push((id, seen));
    }

    /// Serves the waiting flushes: those joined to a write-back that ended complete; the
    /// others join the one in flight when it covers them, or this queue starts the next
    /// write-back when none is in flight (or waits for the one in flight to end).
    pub(crate) fn group_flush(&mut self) {
        self.resolve_joined();
        if self.flush_waiters.is_empty() && self.flush_joined.is_empty() && !self.wb_wanted {
            return;
        }
        let img = self.image.clone();
        if img.meta.is_none() {
            return;
        }
        loop {
            {
                let coord = img.wb.lock();
                if let Some(g) = coord.in_flight {
                    let mut i = 0;
                    while i < self.flush_waiters.len() {
                        let (id, seen) = self.flush_waiters[i];
                        if seen < g {
                            self.flush_waiters.swap_remove(i);
                            self.flush_joined.push((id, g));
                            if self.wb.as_ref().is_none_or(|w| w.generation() != g) {
                                crate::counters::Counters::add(&self.counters.flush_joins, 1);
                            }
                        } else {
                            i += 1;
                        }
                    }
                    // A full cache set waits for the slices being written to be unpinned.
                    self.wb_wanted = false;
                    let own = self.wb.as_ref().is_some_and(|w| w.generation() == g);
                    if !own && (!self.flush_waiters.is_empty() || !self.flush_joined.is_empty()) {
                        // Registered under the coordinator's lock: its end (which changes the
                        // state under the same lock, then wakes) cannot be missed.
                        img.wb.waiters.add(self.waker.bit());
                        drop(coord);
                        self.arm_wake();
                    }
                    return;
                }
            }
            if self.flush_waiters.is_empty() && !self.wb_wanted {
                // Only joined flushes, whose write-back ended meanwhile.
                self.resolve_joined();
                return;
            }
            // None in flight: start one, under the metadata lock.
            self.note_lock_events();
            let mut st = match img.try_meta() {
                Ok(Some(st)) => st,
                Ok(None) => {
                    self.wait_lock();
                    return;
                }
                Err(e) => {
                    for (id, _) in std::mem::take(&mut self.flush_waiters) {
                        self.fail(id, -e.raw_os_error());
                        self.finish(id);
                    }
                    return;
                }
            };
            let generation = {
                let mut coord = img.wb.lock();
                if coord.in_flight.is_some() {
                    // Another queue started one meanwhile: join or wait for it.
                    continue;
                }
                img.wb.start(&mut coord)
            };
            self.hand_over_frees(&mut st.rc.pending_free);
            let plan = img.begin_writeback(&mut st, generation, &self.counters);
            drop(st);
            self.wb_wanted = false;
            for (id, _) in std::mem::take(&mut self.flush_waiters) {
                self.flush_joined.push((id, generation));
            }
            match plan {
                Ok(plan) => self.start_writeback(plan),
                Err(e) => {
                    img.wb.end(generation, Some(&e));
                    self.resolve_joined();
                }
            }
            return;
        }
    }

    /// Completes the flushes joined to write-backs that ended, with their outcome.
    pub(super) fn resolve_joined(&mut self) {
        if self.flush_joined.is_empty() {
            return;
        }
        let mut ended = Vec::new();
        {
            let coord = self.image.wb.lock();
            self.flush_joined.retain(|&(id, g)| match coord.result(g) {
                Some(r) => {
                    ended.push((id, r.err()));
                    false
                }
                None => true,
            });
        }
        for (id, err) in ended {
            self.flushed(id, err);
        }
    }

    /// Finishes a flush (or writethrough write), failed with `err`.
    fn flushed(&mut self, id: usize, err: Option<Error>) {
        if let Some(e) = &err {
            self.fail(id, -e.raw_os_error());
            if self.reqs[id].detail.is_none() {
                self.reqs[id].detail = Some(Error::errno(format!("flush failed: {e}"), e.raw_os_error()));
            }
        }
        self.finish(id);
    }
}
