//! Flushes: metadata written back in dependency order and the device flushed, once for
//! every flush waiting in the queue (group commit). The write-back runs under the metadata
//! lock; the closing device flush (the one that makes the guest's data durable) is an
//! `IORING_OP_FSYNC` on this queue's ring, issued after the lock is given back, so neither
//! this queue's thread nor the other queues wait for the device there.

use super::*;
use io_uring::{opcode, types};

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
        self.hand_over_frees(&mut st.rc.pending_free);
        let r = img.flush_metadata(&mut st, false, &self.counters);
        drop(st);
        if let Err(e) = r {
            self.flushed(waiters, Some(e));
            return;
        }
        if let Some(errno) = img.hook.as_ref().and_then(|h| h.0.fail_flush()) {
            self.flushed(waiters, Some(Error::errno("fdatasync", errno)));
            return;
        }
        // The external data file's writes, durable before this flush completes (the image
        // file's are the SQE below).
        if let Err(e) = img.sync_data_file() {
            self.flushed(waiters, Some(e));
            return;
        }
        crate::counters::Counters::add(&self.counters.device_flushes, 1);
        let token = img.hook.as_ref().map_or(0, |h| h.0.flush_issued());
        let io = self.ios.insert(Io::Fsync { waiters, token });
        let sqe = opcode::Fsync::new(types::Fd(img.file.fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(io as u64);
        self.push(sqe);
    }

    /// The device flush of a group flush completed with `res`.
    pub(super) fn fsync_done(&mut self, waiters: Vec<usize>, token: u64, res: i32) {
        if let Some(h) = &self.image.hook {
            h.0.flush_completed(token, res >= 0);
        }
        let err = (res < 0).then(|| Error::errno("fdatasync", -res));
        self.flushed(waiters, err);
    }

    /// Finishes the flushes (and writethrough writes) of a group flush, failed with `err`.
    fn flushed(&mut self, waiters: Vec<usize>, err: Option<Error>) {
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
