//! Changing the virtual disk size (`qemu-img resize`, QEMU's `qcow2_co_truncate`): the
//! metadata half. Growing makes room in the L1 table; shrinking (after the queue has cut
//! off the clusters past the new end, see [`crate::queue::Queue::resize`]) frees the L2
//! tables past the new end and truncates the file after its last cluster in use.

use super::*;

impl Image {
    /// Grows the virtual disk to `new_size` bytes (a multiple of 512), like
    /// `qemu-img resize` on an image without a backing file: the L1 table grows (moved to
    /// new clusters, written and made durable before the header points to it) and the new
    /// range reads as zeros. Shrinking and images with a backing file (whose grown range
    /// must be zeroed through a queue) go through [`crate::queue::Queue::resize`].
    /// Blocks the caller for the metadata updates.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if new_size < self.vsize() {
            return Err(Error::Unsupported("shrinking needs Queue::resize".into()));
        }
        if self.backing.is_some() {
            return Err(Error::Unsupported("growing an image with a backing file needs Queue::resize".into()));
        }
        if new_size == self.vsize() {
            return Ok(());
        }
        self.check_resizable(new_size)?;
        self.check_bitmaps_resizable(new_size)?;
        let old = self.vsize();
        self.begin_bitmap_resize()?;
        self.grow(new_size)?;
        self.finish_bitmap_resize(old, new_size)
    }

    /// Checks that the image can be resized to `new_size`.
    pub(crate) fn check_resizable(&self, new_size: u64) -> Result<()> {
        if self.meta.is_none() {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        }
        self.check_writable()?;
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidRequest(format!("new size {new_size} is not a multiple of 512")));
        }
        if new_size == 0 {
            return Err(Error::InvalidRequest("New image size must be positive".into()));
        }
        if self.version < 3
            && !self.snapshots.read().unwrap_or_else(|e| e.into_inner()).is_empty()
            && new_size != self.vsize()
        {
            // QEMU's qcow2_co_truncate: v2 snapshots do not record their disk size.
            return Err(Error::Unsupported("Can't resize a v2 image which has snapshots".into()));
        }
        Ok(())
    }

    /// The growing half of a resize: the L1 table gets room for `new_size`, then the
    /// header's size changes. Ranges past the old end read as unallocated (zeros, or the
    /// backing file: the caller zeroes them where the backing file has data).
    pub(crate) fn grow(&self, new_size: u64) -> Result<()> {
        self.check_resizable(new_size)?;
        let Some(mut st) = self.lock_meta_quiet() else { unreachable!("checked above") };
        let old = self.vsize();
        if new_size <= old {
            return Ok(());
        }
        let g = self.geo;
        let need = g
            .l1_entries_for(new_size)
            .filter(|&n| n <= crate::format::geometry::MAX_L1_BYTES / 8)
            .ok_or_else(|| Error::InvalidRequest(format!("new size {new_size} is too large")))?;
        if need as usize > self.l1.len() {
            return Err(Error::Unsupported(format!(
                "growing to {new_size} bytes needs {need} L1 entries; this open image has room for {} \
                 (reopen it with Options::l1_room to grow further)",
                self.l1.len()
            )));
        }
        // Everything written so far becomes durable first (the L1 may move).
        self.flush_metadata(&mut st, false, &self.counters)?;
        let mut h = self.header();
        if need > h.l1_size as u64 {
            let cs = g.cluster_size();
            let clusters = (need * 8).div_ceil(cs);
            let io = self.meta_io();
            let c = st.rc.alloc_contiguous(&io, clusters)?;
            self.note_end(&st);
            self.overlap.record(
                crate::meta::overlap::MetaKind::ActiveL1,
                crate::format::types::HostCluster(c),
                clusters,
            );
            let mut bytes = vec![0u8; (clusters * cs) as usize];
            for (i, e) in self.l1.iter().take(need as usize).enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
            }
            self.flush_metadata(&mut st, false, &self.counters)?; // the new clusters' refcounts
            self.sync.write_kind(crate::io::hook::WriteKind::L1, self.file.fd(), g.cluster_bytes(c), &bytes)?;
            self.sync.fdatasync(self.file.fd())?;
            let old_off = h.l1_table_offset.0;
            let old_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
            h.l1_table_offset = crate::format::HostOffset(g.cluster_bytes(c));
            h.l1_size = need as u32;
            for i in 0..old_clusters {
                st.rc.free_later(g.cluster_index(old_off) + i, 1);
            }
        }
        h.size = new_size;
        // The data file grows with the disk, as QEMU's qcow2_co_truncate resizes it.
        if let Some(d) = &self.data_file
            && d.file().len()? < new_size
        {
            d.file().file().set_len(new_size).map_err(|e| Error::io("ftruncate data file", e))?;
        }
        self.update_header(&self.counters, |cur| {
            cur.l1_table_offset = h.l1_table_offset;
            cur.l1_size = h.l1_size;
            cur.size = h.size;
        })?;
        self.size.store(new_size, Ordering::Release);
        // A raw data file's new range is mapped at its guest offsets, as qemu-img does.
        if self.data_file.as_ref().is_some_and(|d| d.raw()) {
            self.map_raw_range(&mut st, old, new_size)?;
            self.flush_metadata(&mut st, false, &self.counters)?;
        }
        Ok(())
    }

    /// The metadata half of a shrink to `new_size`, once every cluster past
    /// `round_up(new_size, cluster_size)` is unmapped (the queue's full discard): as QEMU,
    /// the L1 entries past the new end are zeroed (the table keeps its `l1_size`) and their
    /// L2 tables freed, the header's size changes, and the file is truncated after its last
    /// cluster in use. The part of the last cluster past the new end is left as it is
    /// (QEMU does the same; a later grow zeroes it where a backing file would show through).
    pub(crate) fn finish_shrink(&self, new_size: u64) -> Result<()> {
        self.check_resizable(new_size)?;
        let Some(mut st) = self.lock_meta_quiet() else { unreachable!("checked above") };
        let g = self.geo;
        let cs = g.cluster_size();
        // The L2 entries the discard cleared become durable; their decrements are queued.
        self.flush_metadata(&mut st, false, &self.counters)?;
        let keep = g.l1_entries_for(new_size).unwrap_or(0) as usize;
        let slot = self.l2_cache.slot_size() as u64;
        for i in keep..self.l1.len() {
            let e = self.l1_entry(i as u64);
            let off = e.l2_offset().0;
            if off == 0 {
                continue;
            }
            if e.contiguous() {
                // The discard split every contiguous range it covered.
                return Err(Error::corrupt(
                    "L1 table",
                    format!("L1 entry {i} is still a contiguous range after the shrink's discard"),
                ));
            }
            self.mark_dirty_for_lazy(&mut st, &self.counters)?;
            st.rc.free_later(g.cluster_index(off), 1);
            for k in 0..cs / slot {
                self.l2_cache.forget(off + k * slot);
            }
            self.l1[i].store(0, Ordering::Release);
            st.l1_dirty = true;
        }
        self.size.store(new_size, Ordering::Release);
        // The L1 (zeroed entries) is durable before the tables are freed and the header
        // says the new size.
        self.flush_metadata(&mut st, false, &self.counters)?;
        self.update_header(&self.counters, |h| {
            h.size = new_size;
            // The identity extension's backing length stays true (docs/identity.md).
            self.shrink_identity(h, new_size);
        })?;
        // The freed clusters retire at this flush (their requests are gone when no queue is
        // busy); the file then ends after its last cluster in use.
        self.flush_metadata(&mut st, false, &self.counters)?;
        let io = self.meta_io();
        let mut end = st.rc.end_cluster;
        loop {
            while end > 1 && st.rc.get(&io, end - 1)? == 0 {
                end -= 1;
            }
            // A refcount block that only counts itself goes too (small clusters leave one
            // every few hundred clusters).
            if end <= 1 || !st.rc.drop_unused_block(&io, end - 1)? {
                break;
            }
            end -= 1;
        }
        if st.rc.dirty() {
            st.rc.write_back(&io)?;
            self.sync.fdatasync(self.file.fd())?;
        }
        let bytes = g.cluster_bytes(end);
        if self.file.len()? > bytes {
            self.sync.ftruncate(self.file.fd(), bytes)?;
            st.rc.set_end(end);
            st.grown_to = 0;
            self.file_len.store(bytes, Ordering::Release);
        }
        // The data file shrinks with the disk, as QEMU's qcow2_co_truncate does.
        if let Some(d) = &self.data_file
            && d.file().len()? > new_size
        {
            self.sync.ftruncate(d.file().fd(), new_size)?;
        }
        Ok(())
    }

    /// The length of the backing layer in bytes (0 without one): ranges of a grown image
    /// below it must be zeroed, or the backing file would show through.
    pub(crate) fn backing_len(&self) -> u64 {
        match &self.backing {
            None => 0,
            Some(Backing::Qcow2(b)) => b.vsize(),
            Some(Backing::Raw(r)) => r.size,
        }
    }
}
