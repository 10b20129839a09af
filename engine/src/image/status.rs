//! Block status (what `qemu-img map` reports): for a guest range, which layer of the chain
//! provides it, and whether it is data, zeros, compressed, and where it is in that file.
//! Mirrors QEMU's per-layer block status rules (format layer first, then the backing
//! chain; raw files report holes as zeros via SEEK_DATA/SEEK_HOLE).

use crate::format::l2::Extent;
use crate::format::types::GuestOffset;
use crate::image::SliceClaim;
use crate::image::mapping::Lookup;
use crate::image::{Backing, Image};
use crate::{Error, Result};
use std::sync::Arc;

/// Status of a guest range, as `qemu-img map` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the range this status covers.
    pub len: u64,
    /// Chain depth of the layer that answered (0 = top).
    pub depth: usize,
    /// Allocated in that layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// A compressed cluster.
    pub compressed: bool,
    /// Offset in the layer's file, when it has one.
    pub offset: Option<u64>,
    /// The file of that layer (only set with an offset).
    pub file: Option<std::path::PathBuf>,
}

impl BlockStatus {
    /// `len` bytes not allocated in any layer down to `depth`: they read as zeros.
    fn unallocated(len: u64, depth: usize) -> Self {
        BlockStatus { len, depth, present: false, zero: true, data: false, compressed: false, offset: None, file: None }
    }

    /// `len` bytes of data in the layer at `depth`, at `offset` of its file (`zero`: they are
    /// known to read as zeros, e.g. a hole of a preallocated file).
    fn data(len: u64, depth: usize, zero: bool, offset: u64, file: Option<std::path::PathBuf>) -> Self {
        BlockStatus { len, depth, present: true, zero, data: true, compressed: false, offset: Some(offset), file }
    }

    /// `len` bytes that read as zeros in the layer at `depth` (allocated there or not),
    /// with the host offset QEMU reports for them, if any.
    fn zeros(len: u64, depth: usize, present: bool, offset: Option<u64>, file: Option<std::path::PathBuf>) -> Self {
        let file = offset.and(file);
        BlockStatus { len, depth, present, zero: true, data: false, compressed: false, offset, file }
    }
}

impl Image {
    /// Loads the L2 slice `key` into the cache synchronously (tools only).
    pub(crate) fn load_slice_sync(&self, key: u64) -> Result<()> {
        loop {
            match self.claim_slice(key, &self.counters) {
                SliceClaim::Cached => return Ok(()),
                SliceClaim::Busy => std::thread::yield_now(),
                SliceClaim::Load { slot, ptr, len } => {
                    let read = self.sync.read(self.file.fd(), key, len).map(|(buf, valid)| {
                        // SAFETY: we own the slot in loading state; it holds `len` bytes.
                        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), ptr, len) };
                        valid
                    });
                    // Checked before it is published, as on the queues' load path (tools
                    // only read: nothing is marked).
                    return self.publish_slice(slot, key, read);
                }
            }
        }
    }

    /// Translates in this layer only, loading L2 slices synchronously on a miss.
    pub(crate) fn lookup_sync(&self, off: u64, len: u64) -> Result<(Extent, u64)> {
        loop {
            match self.lookup(GuestOffset(off), len)? {
                Lookup::Mapped { extent, len, cached } => {
                    if cached {
                        crate::counters::Counters::add(&self.counters.l2_hits, 1);
                    }
                    return Ok((extent, len));
                }
                Lookup::Miss { key } => self.load_slice_sync(key)?,
            }
        }
    }

    /// Block status of up to `len` bytes at `off` through the whole chain.
    pub fn block_status(self: &Arc<Self>, off: u64, len: u64) -> Result<BlockStatus> {
        let mut layer = self.clone();
        let mut len = len;
        let mut depth = 0;
        loop {
            // Past the end of this layer: zeros, not allocated.
            if off >= layer.vsize() {
                return Ok(BlockStatus::unallocated(len, depth));
            }
            let (ext, n) = layer.lookup_sync(off, len.min(layer.vsize() - off))?;
            // Data lives in the external data file when there is one (qemu-img map names it).
            let path = Some(layer.data_file().map_or(layer.path(), |d| d.path()).to_path_buf());
            match ext {
                Extent::Data(h) => {
                    // QEMU recurses into the file for images it detects as metadata-
                    // preallocated: holes in the file then report as zeros.
                    if layer.data_file().is_none() && layer.metadata_preallocated()? {
                        let flen = layer.file_len();
                        let (data, run) = if h.0 >= flen {
                            (false, n)
                        } else {
                            seek_data_hole(layer.file.fd(), h.0, n.min(flen - h.0), flen)?
                        };
                        let run = if h.0 < flen && h.0 + run >= flen && !data { n } else { run };
                        return Ok(BlockStatus::data(run.min(n), depth, !data, h.0, path));
                    }
                    return Ok(BlockStatus::data(n, depth, false, h.0, path));
                }
                Extent::Zero => {
                    // Zero clusters with a host offset report it (QEMU: ZERO_ALLOC).
                    return Ok(BlockStatus::zeros(n, depth, true, layer.alloc_offset(off)?, path));
                }
                Extent::Compressed { .. } => {
                    return Ok(BlockStatus {
                        len: n,
                        depth,
                        present: true,
                        zero: false,
                        data: true,
                        compressed: true,
                        offset: None,
                        file: None,
                    });
                }
                Extent::Unallocated if off >= layer.backing_limit() => {
                    // Past the recorded backing length (identity extension): zeros.
                    return Ok(BlockStatus::unallocated(n, depth));
                }
                Extent::Unallocated => match &layer.backing {
                    None => {
                        // Extended L2: unallocated subclusters of an allocated cluster still
                        // report the host offset (QEMU: UNALLOCATED_ALLOC).
                        return Ok(BlockStatus::zeros(n, depth, false, layer.alloc_offset(off)?, path));
                    }
                    Some(Backing::Raw(raw)) => {
                        if off >= raw.size {
                            return Ok(BlockStatus::unallocated(n, depth));
                        }
                        let n = n.min(raw.size - off).min(layer.backing_limit() - off);
                        let (data, run) = seek_data_hole(raw.file.fd(), off, n, raw.size)?;
                        return Ok(BlockStatus {
                            len: run,
                            depth: depth + 1,
                            present: true,
                            zero: !data,
                            data,
                            compressed: false,
                            offset: Some(off),
                            file: Some(raw.file.path().to_path_buf()),
                        });
                    }
                    Some(Backing::Qcow2(b)) => {
                        let b = b.clone();
                        len = n.min(layer.backing_limit() - off);
                        layer = b;
                        depth += 1;
                    }
                },
            }
        }
    }

    /// Whether `len` bytes at guest offset `off` of what this image's unallocated ranges
    /// read (its backing chain, zeros past it) are known to read as zeros, without
    /// blocking: raw files by SEEK_DATA, qcow2 layers from their cached L2 entries. Unknown
    /// (an uncached slice, an error) counts as data. QEMU's `is_zero_cow` asks the same of
    /// the backing file before copying a cluster's head or tail.
    pub(crate) fn backing_reads_zero(&self, off: u64, len: u64) -> bool {
        let lim = self.backing_limit();
        if off >= lim {
            return true;
        }
        let len = len.min(lim - off);
        match &self.backing {
            None => true,
            Some(Backing::Raw(raw)) => {
                if off >= raw.size {
                    return true;
                }
                let dense = *self.backing_dense.get_or_init(|| {
                    use std::os::unix::fs::MetadataExt;
                    raw.file.file().metadata().is_ok_and(|m| m.blocks().saturating_mul(512) >= raw.size)
                });
                !dense && hole_at(raw.file.fd(), off, len.min(raw.size - off))
            }
            Some(Backing::Qcow2(b)) => b.reads_zero(off, len),
        }
    }

    /// Whether `len` bytes at `off` of this image read as zeros, known without blocking
    /// (see [`Image::backing_reads_zero`]).
    fn reads_zero(&self, off: u64, len: u64) -> bool {
        let (mut pos, end) = (off, off.saturating_add(len));
        if pos >= self.vsize() {
            return true;
        }
        let end = end.min(self.vsize());
        while pos < end {
            let Ok(Lookup::Mapped { extent, len: n, .. }) = self.lookup(GuestOffset(pos), end - pos) else {
                return false;
            };
            let zero = match extent {
                Extent::Zero => true,
                Extent::Unallocated => self.backing_reads_zero(pos, n),
                _ => false,
            };
            if !zero || n == 0 {
                return false;
            }
            pos += n;
        }
        true
    }

    /// QEMU's metadata-preallocation heuristic: the image refcounts clearly more clusters
    /// (>= max(10/9 of them, +2)) than the file really has allocated on the filesystem.
    pub fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(v) = self.prealloc_detected.get() {
            return Ok(*v);
        }
        let v = self.detect_metadata_preallocation()?;
        let _ = self.prealloc_detected.set(v);
        Ok(v)
    }

    fn detect_metadata_preallocation(&self) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let md = self.file.file().metadata().map_err(|e| Error::io("stat", e))?;
        let real_clusters = md.blocks() * 512 / self.geo.cluster_size();
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = self.geo.clusters_for(self.file_len());
        let h = self.header();
        let rt = self
            .sync
            .read(
                self.file.fd(),
                h.refcount_table_offset.0,
                h.refcount_table_clusters as usize * self.geo.cluster_size() as usize,
            )?
            .0;
        let per_block = self.geo.refblock_entries();
        let mut count = 0u64;
        let mut i = 0u64;
        while i < end && count < threshold {
            let ti = (i / per_block) as usize;
            let Some(e) = rt.get(ti * 8..ti * 8 + 8) else { break };
            let block = crate::format::refcount::RefTableEntry(crate::format::bytes::be64(e, 0)).block_offset().0;
            let span_end = ((ti as u64 + 1) * per_block).min(end);
            if block == 0 {
                i = span_end;
                continue;
            }
            let (b, _) = self.sync.read(self.file.fd(), block, self.geo.cluster_size() as usize)?;
            while i < span_end && count < threshold {
                if crate::format::refcount::get(&b, i % per_block, self.geo.refcount_order) != 0 {
                    count += 1;
                }
                i += 1;
            }
        }
        Ok(count >= threshold)
    }

    /// The host offset of `off` when its cluster has one although it does not read data
    /// from it (zero flag with an offset; extended L2 zero or unallocated subclusters in an
    /// allocated cluster).
    fn alloc_offset(&self, off: u64) -> Result<Option<u64>> {
        let Some(slot) = self.l2_slot(GuestOffset(off))? else {
            return Ok(None);
        };
        self.load_slice_sync(slot.key)?;
        let Some(e) = self.l2_cache.read_word(slot.key, slot.word) else {
            return Ok(None);
        };
        let host = e & crate::format::geometry::OFFSET_MASK;
        // Host offset 0 is the data file's first cluster when COPIED says it is allocated
        // (not a zero cluster without an offset).
        let at_zero = self.geo.external_data
            && e & crate::format::l2::L2_COPIED != 0
            && (self.geo.extended_l2 || e & crate::format::l2::L2_ZERO == 0);
        if (host == 0 && !at_zero) || e & crate::format::l2::L2_COMPRESSED != 0 {
            return Ok(None);
        }
        Ok(Some(host + self.geo.offset_in_cluster(off)))
    }
}

/// Whether `len` bytes at `off` of a raw file are a hole: one SEEK_DATA (not SEEK_HOLE,
/// which on tmpfs walks every page of the data that follows: 150 us a call in a 256 MiB
/// file full of data). Unknown (SEEK_DATA unsupported) is data.
fn hole_at(fd: i32, off: u64, len: u64) -> bool {
    // SAFETY: lseek on a valid fd has no memory effects.
    let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
    if data < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= off.saturating_add(len)
}

/// Data/hole status of `len` bytes at `off` in a raw file: (is data, run length).
fn seek_data_hole(fd: i32, off: u64, len: u64, size: u64) -> Result<(bool, u64)> {
    // SAFETY: lseek on a valid fd has no memory effects.
    let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
    if data < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok((false, len)); // a hole up to EOF
        }
        return Ok((true, len)); // SEEK_DATA unsupported: everything is data
    }
    let data = data as u64;
    if data > off {
        return Ok((false, (data - off).min(len)));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off as i64, libc::SEEK_HOLE) };
    let hole = if hole < 0 { size } else { hole as u64 };
    Ok((true, (hole.max(off + 1) - off).min(len)))
}
