//! The engine's self-audit ([`Image::audit`]): with every queue idle, is every cluster's
//! refcount equal to its references, and does the metadata in memory equal the metadata on
//! disk? Tests call it between batches of concurrent requests (tests/mq_model.rs); it is
//! what `qemu-img check` would say about the image at that moment, plus the cache
//! coherence that no on-disk check can see (a cached L2 slice or refcount block that differs
//! from its clean copy on disk is how lost updates and double frees start).
//!
//! The references are counted by [`crate::check`] (the `qemu-img check` walker), not by a
//! second walker.

use crate::check::FileMeta;
use crate::check::{self, CheckReport};
use crate::image::Image;
use crate::{Error, Result};
use std::sync::atomic::Ordering;

impl Image {
    /// Audits an image whose queues are all idle (nothing in flight; queues that hold
    /// reserved clusters report them as leaks, so drop them first or call this between
    /// batches of a fresh set of queues):
    ///
    /// 1. writes all metadata back in dependency order, as a flush does (refcounts too with
    ///    lazy refcounts), applying the queued decrements;
    /// 2. counts every cluster's references and compares them with the stored refcounts, as
    ///    `qemu-img check` does ([`crate::check::check`]);
    /// 3. compares every cached L2 slice, every cached refcount block, the refcount table
    ///    and the L1 table with their copies on disk: after the write-back they must be
    ///    equal, and a difference (a stale cached copy, or a write-back that lost an update)
    ///    counts as a corruption with a message that names the structure.
    ///
    /// Returns the report (`corruptions`, `leaks` and `check_errors` must all be 0 on a
    /// healthy image). Fails when requests are in flight, the image is read-only, or the
    /// write-back fails. Takes the metadata lock for the whole audit.
    pub fn audit(&self) -> Result<CheckReport> {
        let Some(mut st) = self.lock_meta_quiet() else {
            return Err(Error::InvalidRequest("the image is open read-only: nothing to audit".into()));
        };
        if self.writes_in_flight.load(Ordering::Acquire) != 0 {
            return Err(Error::InvalidRequest("audit: data writes are in flight (queues must be idle)".into()));
        }
        self.flush_metadata(&mut st, true, &self.counters)?;
        let len = self.file.len()?;
        let mut rep = check::check(&FileMeta { ring: &self.sync, file: &self.file, len })?;
        let mut problems = Vec::new();
        let queued = st.rc.pending_free.len() + st.rc.retiring.len();
        if queued > 0 {
            problems.push(format!("{queued} refcount decrements still queued after the write-back"));
        }
        // L2 slices in the cache.
        let cache = &self.l2_cache;
        let len = cache.slot_size();
        for s in 0..cache.slots() {
            let Some(key) = cache.slot_key(crate::meta::cache::SlotId(s as u32)) else { continue };
            let Some(slot) = cache.pin(key) else { continue };
            // SAFETY: pinned (valid, not evictable); nothing writes it (queues are idle).
            let mem = unsafe { std::slice::from_raw_parts(cache.slot_ptr(slot), len) }.to_vec();
            let dirty = cache.dirty_slots().contains(&slot);
            cache.unpin(slot);
            let (disk, valid) = self.sync.read(self.file.fd(), key, len)?;
            if dirty {
                problems.push(format!("L2 slice at {key:#x} is still dirty after the write-back"));
            }
            if let Some(i) = (0..len).find(|&i| mem[i] != if i < valid { disk[i] } else { 0 }) {
                let w = i / 8 * 8;
                let word = |b: &[u8]| u64::from_be_bytes(b[w..w + 8].try_into().expect("8 bytes"));
                problems.push(format!(
                    "cached L2 slice at {key:#x} differs from the disk: entry at {:#x} is {:#018x} in the cache, {:#018x} on disk",
                    key + w as u64,
                    word(&mem),
                    if w + 8 <= valid { word(&disk) } else { 0 }
                ));
            }
        }
        // Refcount blocks in the refcount cache, and the refcount table.
        for (off, mem, dirty) in st.rc.cached_blocks() {
            let (disk, valid) = self.sync.read(self.file.fd(), off, mem.len())?;
            if dirty {
                problems.push(format!("refcount block at {off:#x} is still dirty after the write-back"));
            }
            if (0..mem.len()).any(|i| mem[i] != if i < valid { disk[i] } else { 0 }) {
                problems.push(format!("cached refcount block at {off:#x} differs from the disk"));
            }
        }
        let h = self.header();
        if h.refcount_table_offset.0 != st.rc.table_offset {
            problems.push(format!(
                "refcount table at {:#x} in memory, {:#x} in the header",
                st.rc.table_offset, h.refcount_table_offset.0
            ));
        } else {
            let bytes = st.rc.table.len() * 8;
            let (disk, _) = self.sync.read(self.file.fd(), st.rc.table_offset, bytes)?;
            for (i, &e) in st.rc.table.iter().enumerate() {
                let d = u64::from_be_bytes(disk[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                if d != e {
                    problems.push(format!("refcount table entry {i} is {e:#x} in memory, {d:#x} on disk"));
                    break;
                }
            }
        }
        // The active L1 table.
        let n = h.l1_size as usize;
        if n > 0 {
            let (disk, _) = self.sync.read(self.file.fd(), h.l1_table_offset.0, n * 8)?;
            for i in 0..n {
                let d = u64::from_be_bytes(disk[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                let e = self.l1[i].load(Ordering::Acquire);
                if d != e {
                    problems.push(format!("L1 entry {i} is {e:#x} in memory, {d:#x} on disk"));
                }
            }
        }
        rep.corruptions += problems.len() as u64;
        for p in problems {
            rep.messages.push(format!("ERROR audit: {p}"));
        }
        Ok(rep)
    }
}
