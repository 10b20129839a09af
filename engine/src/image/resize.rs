//! Growing the virtual disk (`qemu-img resize`).

use super::*;

impl Image {
    /// Grows the virtual disk to `new_size` bytes (a multiple of 512), like
    /// `qemu-img resize`: the L1 table grows (moved to new clusters, written and made
    /// durable before the header points to it) and the new range reads as zeros.
    /// Shrinking is refused. Blocks the caller for the metadata updates.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.meta.is_none() {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidRequest(format!("new size {new_size} is not a multiple of 512")));
        }
        let Some(mut st) = self.lock_meta() else { unreachable!("checked above") };
        let old = self.vsize();
        if new_size < old {
            return Err(Error::Unsupported("shrinking an image is not supported".into()));
        }
        if new_size == old {
            return Ok(());
        }
        if self.backing.is_some() {
            return Err(Error::Unsupported("resizing an image with a backing file is not supported yet".into()));
        }
        let g = self.geo;
        let need = g
            .l1_entries_for(new_size)
            .filter(|&n| n <= crate::format::geometry::MAX_L1_BYTES / 8)
            .ok_or_else(|| Error::InvalidRequest(format!("new size {new_size} is too large")))?;
        if need as usize > self.l1.len() {
            return Err(Error::Unsupported(format!(
                "growing to {new_size} bytes needs {need} L1 entries; this open image has room for {} (reopen it to grow further)",
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
        self.update_header(&self.counters, |cur| {
            cur.l1_table_offset = h.l1_table_offset;
            cur.l1_size = h.l1_size;
            cur.size = h.size;
        })?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
