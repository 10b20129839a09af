//! Flushes: metadata written back in dependency order and the device flushed, once for
//! every flush waiting in the queue (group commit).

use super::*;

impl Queue {
    /// Flush: write metadata back in dependency order and flush the device, under the
    /// metadata lock (parked when another queue holds it).
    pub(crate) fn drive_flush(&mut self, id: usize) {
        if self.image.meta.is_none() {
            self.finish(id);
            return;
        }
        // Group commit: every flush (and writethrough write) waiting in this queue is
        // served by one metadata write-back and one device flush, in the reap loop.
        self.flush_waiters.push(id);
    }

    /// Serves the waiting flushes with one write-back and one device flush, if the
    /// metadata lock is free (otherwise they wait for the next round).
    pub(crate) fn group_flush(&mut self) {
        if self.flush_waiters.is_empty() {
            return;
        }
        let img = self.image.clone();
        self.note_lock_events();
        let mut st = match img.try_meta() {
            Ok(Some(st)) => st,
            Ok(None) => {
                self.wait_lock();
                return;
            }
            Err(e) => {
                for id in std::mem::take(&mut self.flush_waiters) {
                    self.fail(id, -e.raw_os_error());
                    self.finish(id);
                }
                return;
            }
        };
        let waiters = std::mem::take(&mut self.flush_waiters);
        st.rc.pending_free.append(&mut self.local_frees);
        let r = img.flush_metadata(&mut st, false, &self.counters).and_then(|_| {
            crate::counters::Counters::add(&self.counters.device_flushes, 1);
            img.sync.fdatasync(img.file.fd())
        });
        drop(st);
        let err = r.err();
        for id in waiters {
            if let Some(e) = &err {
                self.fail(id, -e.raw_os_error());
                if self.reqs[id].detail.is_none() {
                    self.reqs[id].detail = Some(Error::errno(format!("flush failed: {e}"), e.raw_os_error()));
                }
            }
            self.finish(id);
        }
    }
}
