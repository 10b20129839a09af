//! Metadata write-back in the order that keeps the durable-state rule (QEMU's cache
//! dependencies): refcount increases, then the refcount table and header when the table
//! moved, then L2 slices, then the L1 table; refcount decreases only after the references
//! they drop are durable. Each stage ends with a device flush when it wrote anything.

use crate::Result;
use crate::counters::Counters;
use crate::image::{Image, MetaState};
use std::sync::atomic::Ordering;

impl Image {
    fn device_flush(&self, c: &Counters) -> Result<()> {
        Counters::add(&c.device_flushes, 1);
        // Guest data in an external data file is made durable with the metadata, first.
        self.sync_data_file()?;
        self.sync.fdatasync(self.file.fd())
    }

    /// Writes all dirty metadata and makes it durable. With lazy refcounts the refcount
    /// stages are skipped (the dirty bit covers them) unless `clean_close`.
    /// Counts into `c`: the counters of the queue (or of the image) doing the work.
    pub(crate) fn flush_metadata(&self, st: &mut MetaState, clean_close: bool, c: &Counters) -> Result<()> {
        let io = self.meta_io();
        let write_refcounts = !st.lazy || clean_close;
        let mut need_flush = false;
        // Has this write-back flushed the device yet? (Everything written under the metadata
        // lock before it, such as new L2 tables, is durable after its first flush.)
        let mut flushed = false;
        // 1. Refcount increases (and a moved table), durable before anything refers to them.
        if write_refcounts && st.rc.dirty() {
            let (b, t) = st.rc.write_back(&io)?;
            Counters::add(&c.refblock_writes, b);
            Counters::add(&c.reftable_writes, t);
            Counters::add(&c.refcount_write_bytes, (b + t * st.rc.table_clusters) * self.geo.cluster_size());
            self.device_flush(c)?;
            flushed = true;
        }
        if st.rc.table_moved && write_refcounts {
            let (off, clusters) = (st.rc.table_offset, st.rc.table_clusters as u32);
            self.update_header(c, |h| {
                h.refcount_table_offset = crate::format::HostOffset(off);
                h.refcount_table_clusters = clusters;
            })?;
            st.rc.table_moved = false;
            if let Some((o, n)) = st.rc.old_table.take() {
                for i in 0..n {
                    st.rc.free_later(self.geo.cluster_index(o) + i, 1);
                }
            }
        }
        // 2. L2 slices (data they point to was written before the entries changed, and the
        //    device flush above made it durable).
        let cache = &self.l2_cache;
        // Copy the dirty slices first, then flush the device, then write the copies: every
        // entry in a copy was published after its data write completed, so before this
        // device flush, which makes that data durable before the entry is. (Entries
        // published after the copy mark their slice dirty again for the next write-back.)
        //
        // Each slot stays pinned until its copy is on disk: once its dirty mark is cleared
        // an unpinned slot could be evicted, and a reload before the write lands would read
        // the old slice from disk and lose every update in the copy (a lost discard then
        // frees its cluster a second time).
        let mut copies = Vec::new();
        for slot in cache.dirty_slots() {
            let Some(key) = cache.slot_key(slot) else { continue };
            let Some(pinned) = cache.pin(key) else { continue };
            cache.clear_dirty(pinned);
            let len = cache.slot_size();
            // SAFETY: the slot is pinned (valid, not evictable); concurrent single-word CAS
            // updates may race with this copy, which then holds the old or the new word (and
            // the slot is dirty again).
            let bytes = unsafe { std::slice::from_raw_parts(cache.slot_ptr(pinned), len) }.to_vec();
            copies.push((pinned, key, bytes));
        }
        let result = self.write_l2_copies(&copies, c);
        for (slot, _, _) in &copies {
            if result.is_err() {
                // Not (all) written: the slices stay dirty for the next write-back.
                cache.mark_dirty(*slot);
            }
            cache.unpin(*slot);
        }
        need_flush |= result?;
        if need_flush {
            self.device_flush(c)?;
            flushed = true;
            need_flush = false;
        }
        // 3. The L1 table. The L2 tables it points to are durable first: new ones were
        //    written when they were made, and only a device flush since then orders them
        //    before it (with lazy refcounts and no dirty slice none has happened yet; an L1
        //    entry that lands first points past the end of the file, or at a table that is
        //    not there: seed 7700145 of the crash campaign, "512/rb64 lazy QD8").
        if st.l1_dirty && !flushed {
            self.device_flush(c)?;
        }
        if st.l1_dirty {
            let h = self.header();
            let mut bytes = Vec::with_capacity(self.l1.len() * 8);
            // Only the entries the on-disk table has (the in-memory one has room to grow).
            for e in self.l1.iter().take(h.l1_size as usize) {
                bytes.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
            }
            self.sync.write_kind(crate::io::hook::WriteKind::L1, self.file.fd(), h.l1_table_offset.0, &bytes)?;
            Counters::add(&c.l1_writes, 1);
            Counters::add(&c.l1_header_write_bytes, bytes.len() as u64);
            st.l1_dirty = false;
            need_flush = true;
        }
        if need_flush {
            self.device_flush(c)?;
        }
        // 4. Refcount decreases, now that nothing durable refers to those clusters, and
        //    only once no request that may still read or write them is in flight: the
        //    queued decrements retire at an epoch flip and are applied when every request
        //    of the old epoch is done, here or at a later flush (crate::meta::epoch).
        //    A decrement below zero (a cluster freed more often than it was referenced) is
        //    a corruption: the others are applied and written, then the image is marked
        //    corrupt (Image::signal_corruption) and the flush fails.
        let mut corrupt = None;
        loop {
            if st.rc.start_retiring() {
                self.flip_epoch();
            }
            if st.rc.retiring.is_empty() || !self.old_epoch_drained() {
                break;
            }
            match st.rc.apply_pending(&io) {
                Err(e @ crate::Error::Corrupt { .. }) => {
                    corrupt.get_or_insert(e);
                }
                other => other?,
            }
            for cl in std::mem::take(&mut st.rc.freed) {
                let off = self.geo.cluster_bytes(cl);
                self.l2_cache.forget(off);
                // Whatever it was, it is free now and may become data.
                self.overlap.forget(crate::format::types::HostCluster(cl));
                // Punch the freed cluster so it reads as zeros and frees space.
                let _ =
                    self.sync.punch(crate::io::hook::WriteKind::Other, self.file.fd(), off, self.geo.cluster_size());
            }
            if write_refcounts {
                let (b, t) = st.rc.write_back(&io)?;
                Counters::add(&c.refblock_writes, b);
                Counters::add(&c.reftable_writes, t);
                Counters::add(&c.refcount_write_bytes, (b + t * st.rc.table_clusters) * self.geo.cluster_size());
                self.device_flush(c)?;
            }
        }
        if let Some(e) = corrupt {
            return Err(self.signal_corruption(e));
        }
        Ok(())
    }

    /// Flushes the device (making the data the copies map durable), then writes the L2
    /// slice copies. Returns whether anything was written.
    fn write_l2_copies(&self, copies: &[(crate::meta::cache::SlotId, u64, Vec<u8>)], c: &Counters) -> Result<bool> {
        if copies.is_empty() {
            return Ok(false);
        }
        self.device_flush(c)?;
        for (_, key, bytes) in copies {
            self.sync.write_kind(crate::io::hook::WriteKind::L2, self.file.fd(), *key, bytes)?;
            Counters::add(&c.l2_writes, 1);
            Counters::add(&c.l2_write_bytes, bytes.len() as u64);
        }
        Ok(true)
    }

    /// Clean close: all metadata durable, lazy-refcount dirty bit cleared.
    pub(crate) fn close_metadata(&self, st: &mut MetaState) -> Result<()> {
        let c = &self.counters;
        self.flush_metadata(st, true, c)?;
        if st.dirty_bit_set {
            self.update_header(c, |h| h.incompatible_features &= !crate::format::feature::INCOMPAT_DIRTY)?;
            st.dirty_bit_set = false;
        }
        self.trim_tail(st)
    }
}
