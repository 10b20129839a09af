//! Refcount bookkeeping for writers (spec: "Host cluster management"): the refcount table in
//! memory, a bounded cache of refcount blocks, updates at every width 1..64, growth of
//! refcount blocks and of the table (self-describing blocks included), and deferred
//! decrements.
//!
//! All of it lives behind the image's metadata mutex ([`crate::image::Image`]'s `meta`),
//! which the allocating paths take with `try_lock` (a queue never waits for it: it parks the
//! request). The hot paths (reads, overwrites of allocated clusters, per-queue allocation
//! from a reserved batch) do not touch it.
//!
//! Durable-state rule: an increase may reach the disk at any time (it can only leak); a
//! decrease is queued in `pending_free` and applied only by the flush, after the L2/L1
//! change that dropped the reference is durable.

use crate::format::Geometry;
use crate::format::refcount as rc;
use crate::format::types::HostCluster;
use crate::io::{AlignedBuf, SyncRing};
use crate::meta::overlap::{MetaKind, OverlapMap};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

mod handover;
pub(crate) use handover::WbShared;

/// The I/O a refcount operation may need (loading a block).
pub(crate) struct MetaIo<'a> {
    pub ring: &'a SyncRing,
    pub fd: i32,
}

/// Hasher for cluster-aligned offsets (cheap: one multiply; keys are not attacker-chosen
/// in a way that matters for a bounded, per-image map).
#[derive(Default)]
struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type BlockMap = HashMap<u64, Block, std::hash::BuildHasherDefault<OffsetHasher>>;

struct Block {
    buf: AlignedBuf,
    dirty: bool,
    used: u64,
}

/// Refcount state of one image.
pub(crate) struct Refcounts {
    geo: Geometry,
    /// The image's metadata clusters: new refcount blocks and tables are recorded there,
    /// and the allocator never hands one out.
    overlap: Arc<OverlapMap>,
    /// Refcount table entries (block offsets; 0 = none).
    pub table: Vec<u64>,
    /// Where the table lives and how many clusters it has.
    pub table_offset: u64,
    pub table_clusters: u64,
    /// The table (or its location) changed since the last write-back.
    pub table_dirty: bool,
    /// The table moved: the header must be rewritten (after the table is durable).
    pub table_moved: bool,
    /// Clusters of a table that was replaced, freed once the header points elsewhere.
    pub old_table: Option<(u64, u64)>,
    blocks: BlockMap,
    cap: usize,
    tick: u64,
    /// No cluster below this index is free (allocation scan start).
    free_hint: u64,
    /// One past the highest cluster in use or reserved (the logical end of the file).
    pub end_cluster: u64,
    /// Decrements waiting for the reference drop to be durable: (cluster, count).
    pub pending_free: Vec<(u64, u64)>,
    /// Decrements taken from `pending_free` at the last epoch flip, applied once every
    /// request that may still use their clusters is done ([`crate::meta::epoch`]).
    pub retiring: Vec<(u64, u64)>,
    /// Clusters whose refcount dropped to zero in the last applied batch (to punch).
    pub freed: Vec<u64>,
    /// Decrements whose reference drop is durable (a write-back completed since they were
    /// queued): they may retire at once.
    pub safe_free: Vec<(u64, u64)>,
    /// Shared with an asynchronous write-back in flight ([`WbShared`]).
    pub shared: Arc<std::sync::Mutex<WbShared>>,
}

impl Refcounts {
    /// Takes over the refcount table read at open (its entries already checked by
    /// [`crate::meta::overlap::check_reftable`]).
    pub fn open(
        geo: Geometry,
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
        cache_bytes: u64,
        overlap: Arc<OverlapMap>,
    ) -> Result<Self> {
        for (i, &e) in table.iter().enumerate() {
            rc::RefTableEntry(e).validate(i as u64, geo.cluster_size())?;
        }
        Ok(Refcounts {
            overlap,
            geo,
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            table_moved: false,
            old_table: None,
            blocks: BlockMap::default(),
            cap: ((cache_bytes / geo.cluster_size()) as usize).max(4),
            tick: 0,
            free_hint: 0,
            end_cluster: geo.clusters_for(file_len),
            pending_free: Vec::new(),
            retiring: Vec::new(),
            freed: Vec::new(),
            safe_free: Vec::new(),
            shared: Arc::new(std::sync::Mutex::new(WbShared::default())),
        })
    }

    fn block(&mut self, io: &MetaIo, off: u64) -> Result<&mut Block> {
        self.tick += 1;
        let tick = self.tick;
        if !self.blocks.contains_key(&off) {
            if self.blocks.len() >= self.cap {
                self.evict(io)?;
            }
            let cs = self.geo.cluster_size() as usize;
            let (data, valid) = io.ring.read(io.fd, off, cs)?;
            let mut buf = AlignedBuf::new(cs);
            buf[..valid].copy_from_slice(&data[..valid]);
            self.blocks.insert(off, Block { buf, dirty: false, used: tick });
        }
        let b = self.blocks.get_mut(&off).expect("block present");
        b.used = tick;
        Ok(b)
    }

    /// Evicts the least recently used block; a dirty one is written first (an increase
    /// reaching the disk early is safe; decreases are only applied at flush time).
    fn evict(&mut self, io: &MetaIo) -> Result<()> {
        let victim = {
            let sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            // Blocks an asynchronous write-back is writing (or failed to write) stay: the
            // cache then holds more than its capacity for a while.
            self.blocks
                .iter()
                .filter(|(off, _)| !sh.writing.contains_key(off) && !sh.redirty.contains(off))
                .min_by_key(|(_, b)| b.used)
                .map(|(&off, _)| off)
        };
        let Some(off) = victim else { return Ok(()) };
        let b = self.blocks.remove(&off).expect("present");
        if b.dirty {
            io.ring.write_kind(crate::io::hook::WriteKind::RefBlock, io.fd, off, &b.buf)?;
        }
        Ok(())
    }

    /// The refcount of a host cluster (0 when no block covers it).
    pub fn get(&mut self, io: &MetaIo, cluster: u64) -> Result<u64> {
        let ti = (cluster >> self.geo.refblock_bits()) as usize;
        let Some(&e) = self.table.get(ti) else { return Ok(0) };
        let off = rc::RefTableEntry(e).block_offset().0;
        if off == 0 {
            return Ok(0);
        }
        let idx = cluster & (self.geo.refblock_entries() - 1);
        let order = self.geo.refcount_order;
        Ok(rc::get(&self.block(io, off)?.buf, idx, order))
    }

    /// Sets the refcount of a host cluster, creating refcount blocks (and growing the
    /// table) as needed.
    pub fn set(&mut self, io: &MetaIo, cluster: u64, value: u64) -> Result<()> {
        if value > self.geo.refcount_max() {
            return Err(Error::InvalidRequest(format!(
                "refcount of cluster {cluster} would overflow the {}-bit refcount width",
                self.geo.refcount_bits()
            )));
        }
        let off = self.ensure_block(io, cluster)?;
        let idx = cluster & (self.geo.refblock_entries() - 1);
        let order = self.geo.refcount_order;
        let b = self.block(io, off)?;
        rc::set(&mut b.buf, idx, order, value);
        b.dirty = true;
        if cluster >= self.end_cluster && value > 0 {
            self.end_cluster = cluster + 1;
        }
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Adds `delta` (may be negative) to a cluster's refcount. A refcount that would go
    /// below zero (a cluster freed more often than it was referenced) or above the width's
    /// maximum is a corruption ([`Error::Corrupt`]): nothing is changed, and the caller marks
    /// the image corrupt ([`crate::image::Image::signal_corruption`]).
    pub fn add(&mut self, io: &MetaIo, cluster: u64, delta: i64) -> Result<u64> {
        let cur = self.get(io, cluster)?;
        let new = cur.checked_add_signed(delta).ok_or_else(|| {
            Error::corrupt("refcount", format!("cluster {cluster}: refcount {cur} cannot change by {delta}"))
        })?;
        if new > self.geo.refcount_max() {
            return Err(Error::corrupt(
                "refcount",
                format!(
                    "cluster {cluster}: refcount {cur} cannot change by {delta} (the {}-bit maximum is {})",
                    self.geo.refcount_bits(),
                    self.geo.refcount_max()
                ),
            ));
        }
        self.set(io, cluster, new)?;
        Ok(new)
    }

    /// Returns the offset of the refcount block covering `cluster`, allocating it.
    fn ensure_block(&mut self, io: &MetaIo, cluster: u64) -> Result<u64> {
        let ti = (cluster >> self.geo.refblock_bits()) as usize;
        if ti >= self.table.len() {
            self.grow_table(io, ti)?;
        }
        let e = rc::RefTableEntry(self.table[ti]).block_offset().0;
        if e != 0 {
            return Ok(e);
        }
        // A new block at the end of the file. If it falls in the range it describes it
        // counts itself; otherwise its own refcount lives in another block (recursion,
        // which terminates: each level moves to a later cluster).
        let bc = self.end_cluster;
        self.end_cluster += 1;
        let off = self.geo.cluster_bytes(bc);
        self.tick += 1;
        let cs = self.geo.cluster_size() as usize;
        self.blocks.insert(off, Block { buf: AlignedBuf::new(cs), dirty: true, used: self.tick });
        self.overlap.record(MetaKind::RefcountBlock, HostCluster(bc), 1);
        self.table[ti] = off;
        self.table_dirty = true;
        self.set(io, bc, 1)?;
        Ok(off)
    }

    /// Moves the refcount table to a larger place at the end of the file.
    fn grow_table(&mut self, io: &MetaIo, need_index: usize) -> Result<()> {
        let per_cluster = self.geo.reftable_entries_per_cluster() as usize;
        let want = (need_index + 1).max(self.table.len() * 3 / 2).div_ceil(per_cluster) * per_cluster;
        let clusters = (want / per_cluster) as u64;
        if clusters * self.geo.cluster_size() > crate::format::geometry::MAX_REFTABLE_BYTES.max(self.geo.cluster_size())
        {
            return Err(Error::InvalidRequest("the refcount table would exceed its 8 MiB limit".into()));
        }
        let start = self.end_cluster;
        self.end_cluster += clusters;
        let old = (self.table_offset, self.table_clusters);
        self.table.resize(want, 0);
        self.table_offset = self.geo.cluster_bytes(start);
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.table_moved = true;
        self.overlap.record(MetaKind::RefcountTable, HostCluster(start), clusters);
        // The old table is freed once the header points to the new one (flush).
        if let Some((o, n)) = self.old_table.replace(old) {
            // A table from an earlier growth that was never made durable: never referenced
            // by the header, so it can simply be freed with the others.
            self.pending_free.extend((0..n).map(|i| (self.geo.cluster_index(o) + i, 1)));
        }
        for c in start..start + clusters {
            self.set(io, c, 1)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters (refcount 1). Returns the first cluster index.
    ///
    /// A free cluster (refcount 0) that is recorded as metadata is never handed out: its
    /// refcount is wrong, and using it would overwrite the structure (QEMU: "Preventing
    /// invalid allocation of ..."). That is a corruption error.
    ///
    /// A free cluster with a decrement still queued (`pending_free`) is referenced by
    /// metadata on disk: its refcount dropped to zero before every reference to it was gone
    /// (it was freed too often). Handing it out would give one cluster two owners; that is a
    /// corruption error too.
    pub fn alloc_contiguous(&mut self, io: &MetaIo, n: u64) -> Result<u64> {
        // Clusters with queued decrements (built only when there are any).
        let pending = self.pending_clusters();
        // Move the hint past clusters in use: allocations that do not start at the hint
        // (refcount blocks, a grown table, clusters taken after a gap) leave used clusters
        // at it, and every later scan would walk over them again.
        while self.free_hint < self.end_cluster && self.get(io, self.free_hint)? != 0 {
            self.free_hint += 1;
        }
        let mut start = self.free_hint;
        'search: loop {
            if start >= self.end_cluster {
                start = self.end_cluster;
                break;
            }
            for i in 0..n {
                let c = start + i;
                if c >= self.end_cluster {
                    break 'search;
                }
                if self.get(io, c)? != 0 {
                    start = c + 1;
                    continue 'search;
                }
                self.check_allocatable(c, &pending)?;
            }
            break;
        }
        if start == self.free_hint {
            self.free_hint = start + n;
        }
        // Claim the range before setting refcounts: a refcount block created on the way is
        // placed at the end of the file and must not land inside it.
        if start + n > self.end_cluster {
            self.end_cluster = start + n;
        }
        for c in start..start + n {
            self.set(io, c, 1)?;
        }
        Ok(start)
    }

    /// Allocates `n` clusters, lowest offsets first: the free clusters inside the file
    /// (freed ones, in runs of any length) before any past its end, where the rest are
    /// contiguous. Reusing scattered free clusters keeps the file as compact as QEMU's when
    /// random discards leave no run of `n` (issue 14); a write that spans clusters is still
    /// issued per contiguous host run.
    pub fn alloc_batch(&mut self, io: &MetaIo, n: u64, out: &mut Vec<u64>) -> Result<()> {
        let mut got = 0;
        let mut c = self.free_hint;
        let mut pending: Option<std::collections::HashSet<u64>> = None;
        while got < n && c < self.end_cluster {
            if self.get(io, c)? == 0 {
                let pending = pending.get_or_insert_with(|| self.pending_clusters());
                self.check_allocatable(c, pending)?;
                self.set(io, c, 1)?;
                out.push(c);
                got += 1;
            }
            c += 1;
        }
        if got == n {
            return Ok(());
        }
        let first = self.alloc_contiguous(io, n - got)?;
        out.extend(first..first + (n - got));
        Ok(())
    }

    /// Clusters with queued decrements.
    fn pending_clusters(&self) -> std::collections::HashSet<u64> {
        self.pending_free.iter().chain(&self.retiring).chain(&self.safe_free).map(|&(c, _)| c).collect()
    }

    /// A cluster with refcount 0 may be handed out only if nothing still refers to it: no
    /// decrement queued for it (it was freed too often) and no metadata recorded on it.
    fn check_allocatable(&self, c: u64, pending: &std::collections::HashSet<u64>) -> Result<()> {
        if pending.contains(&c) {
            return Err(Error::corrupt(
                "refcount",
                format!(
                    "cluster {c} (host offset {:#x}) has refcount 0 but is still referenced (a decrement \
                     is queued for it): preventing its allocation",
                    self.geo.cluster_bytes(c)
                ),
            ));
        }
        if let Some(kind) = self.overlap.kind_of(HostCluster(c)) {
            return Err(Error::corrupt(
                "refcount",
                format!(
                    "cluster {c} (host offset {:#x}, the {kind}) has refcount 0: preventing its allocation",
                    self.geo.cluster_bytes(c)
                ),
            ));
        }
        Ok(())
    }

    /// A shrink's last step (QEMU's `qcow2_shrink_reftable`, for the block at the end of
    /// the file): when cluster `c` is a refcount block that describes itself and no other
    /// cluster of its range is in use, its table entry is cleared (written at the next
    /// write-back) and the block forgotten, so the file can be truncated before it.
    /// Returns whether it was dropped.
    pub fn drop_unused_block(&mut self, io: &MetaIo, c: u64) -> Result<bool> {
        let ti = (c >> self.geo.refblock_bits()) as usize;
        let off = self.geo.cluster_bytes(c);
        if self.table.get(ti).map(|&e| rc::RefTableEntry(e).block_offset().0) != Some(off) {
            return Ok(false);
        }
        let own = c & (self.geo.refblock_entries() - 1);
        let order = self.geo.refcount_order;
        let n = self.geo.refblock_entries();
        let b = self.block(io, off)?;
        if (0..n).any(|i| i != own && rc::get(&b.buf, i, order) != 0) {
            return Ok(false);
        }
        self.blocks.remove(&off);
        self.table[ti] = 0;
        self.table_dirty = true;
        self.overlap.forget(HostCluster(c));
        if self.end_cluster > c {
            self.end_cluster = c;
        }
        if self.free_hint > c {
            self.free_hint = c;
        }
        Ok(true)
    }

    /// The file ends at `end` clusters (a shrink truncated it).
    pub fn set_end(&mut self, end: u64) {
        self.end_cluster = end;
        self.free_hint = self.free_hint.min(end);
    }

    /// Queues a decrement to be applied after the reference drop is durable.
    pub fn free_later(&mut self, cluster: u64, count: u64) {
        self.pending_free.push((cluster, count));
    }

    /// Makes the queued decrements the retiring batch, if none is retiring. Returns whether
    /// a batch started retiring (the caller then flips the epoch).
    pub fn start_retiring(&mut self) -> bool {
        if !self.retiring.is_empty() || self.pending_free.is_empty() {
            return false;
        }
        self.retiring = std::mem::take(&mut self.pending_free);
        true
    }

    /// Applies the retiring decrements (the flush calls this once the L2/L1 changes that
    /// dropped the references are durable and no request that may still use the clusters
    /// is in flight).
    ///
    /// Every decrement that can be applied is, even after one that cannot: a decrement below
    /// zero (a double free) is left out and reported as a corruption error after the rest
    /// are applied, so one bad decrement does not turn every other freed cluster of the
    /// batch into a leak. An I/O error stops at once; the decrements not applied yet stay
    /// queued.
    pub fn apply_pending(&mut self, io: &MetaIo) -> Result<()> {
        let pending = std::mem::take(&mut self.retiring);
        let mut bad: Vec<String> = Vec::new();
        for (i, &(c, n)) in pending.iter().enumerate() {
            match self.add(io, c, -(n as i64)) {
                Ok(0) => self.freed.push(c),
                Ok(_) => {}
                Err(Error::Corrupt { detail, .. }) => bad.push(detail),
                Err(e) => {
                    self.retiring.extend_from_slice(&pending[i..]);
                    return Err(e);
                }
            }
        }
        match bad.len() {
            0 => Ok(()),
            1 => Err(Error::corrupt("refcount", bad.remove(0))),
            n => Err(Error::corrupt("refcount", format!("{} (and {} more)", bad[0], n - 1))),
        }
    }

    /// The cached refcount blocks as (offset, contents, dirty) ([`crate::meta::audit`]
    /// compares them with the disk).
    pub fn cached_blocks(&self) -> impl Iterator<Item = (u64, &[u8], bool)> {
        self.blocks.iter().map(|(&off, b)| (off, &b.buf[..], b.dirty))
    }

    /// Are there unwritten changes?
    pub fn dirty(&self) -> bool {
        self.table_dirty || self.blocks.values().any(|b| b.dirty)
    }

    /// Writes every dirty refcount block and, when changed, the table. Returns the number of
    /// (block, table) writes issued.
    pub fn write_back(&mut self, io: &MetaIo) -> Result<(u64, u64)> {
        let mut nb = 0;
        for (&off, b) in self.blocks.iter_mut() {
            if b.dirty {
                io.ring.write_kind(crate::io::hook::WriteKind::RefBlock, io.fd, off, &b.buf)?;
                b.dirty = false;
                nb += 1;
            }
        }
        let mut nt = 0;
        if self.table_dirty {
            // New refcount blocks must be durable before a table entry points to them.
            if nb > 0 {
                io.ring.fdatasync(io.fd)?;
            }
            let mut bytes = vec![0u8; (self.table_clusters * self.geo.cluster_size()) as usize];
            for (i, e) in self.table.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            io.ring.write_kind(crate::io::hook::WriteKind::RefTable, io.fd, self.table_offset, &bytes)?;
            self.table_dirty = false;
            nt = 1;
        }
        Ok((nb, nt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::{CompressionType, Header};

    /// Refcounts of a 1-bit (order 0) or 16-bit (order 4) image of 4 KiB clusters whose
    /// blocks are all created in memory (no I/O reaches the file).
    fn counts(order: u32) -> (Refcounts, SyncRing, std::fs::File) {
        let geo = Geometry::new(12, false, order).unwrap();
        let h = Header::new_v3(1 << 20, geo, CompressionType::Deflate);
        let overlap = Arc::new(OverlapMap::build(&geo, &h, &[], &[], &[], 0, 0));
        let rc = Refcounts::open(geo, vec![0; 4], 1 << 12, 1, 16 << 12, 1 << 16, overlap).unwrap();
        (rc, SyncRing::new().unwrap(), tempfile::tempfile().unwrap())
    }

    #[test]
    fn refcount_below_zero_or_above_the_width_is_corruption() {
        use std::os::fd::AsRawFd;
        for order in [0, 4] {
            let (mut rc, ring, f) = counts(order);
            let io = MetaIo { ring: &ring, fd: f.as_raw_fd() };
            assert!(matches!(rc.add(&io, 40, -1), Err(Error::Corrupt { .. })), "order {order}: 0 - 1");
            assert_eq!(rc.get(&io, 40).unwrap(), 0);
            let max = rc.geo.refcount_max();
            rc.set(&io, 41, max).unwrap();
            let e = rc.add(&io, 41, 1).unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "order {order}: max + 1: {e}");
            assert_eq!(rc.get(&io, 41).unwrap(), max, "unchanged");
        }
    }

    #[test]
    fn apply_pending_applies_every_good_decrement_and_reports_the_bad_one() {
        use std::os::fd::AsRawFd;
        let (mut rc, ring, f) = counts(4);
        let io = MetaIo { ring: &ring, fd: f.as_raw_fd() };
        for c in [40, 41, 42] {
            rc.set(&io, c, 1).unwrap();
        }
        rc.set(&io, 43, 2).unwrap();
        // 40 is freed twice (a double free); everything queued after it must still be applied.
        for c in [40, 40, 41, 43, 42] {
            rc.free_later(c, 1);
        }
        assert!(rc.start_retiring());
        let e = rc.apply_pending(&io).unwrap_err();
        assert!(matches!(&e, Error::Corrupt { detail, .. } if detail.contains("cluster 40")), "{e}");
        for (c, want) in [(40, 0), (41, 0), (42, 0), (43, 1)] {
            assert_eq!(rc.get(&io, c).unwrap(), want, "cluster {c}");
        }
        let mut freed = rc.freed.clone();
        freed.sort_unstable();
        assert_eq!(freed, [40, 41, 42]);
        assert!(rc.pending_free.is_empty() && rc.retiring.is_empty());
    }

    #[test]
    fn a_free_cluster_with_a_queued_decrement_is_not_handed_out() {
        use std::os::fd::AsRawFd;
        let (mut rc, ring, f) = counts(4);
        let io = MetaIo { ring: &ring, fd: f.as_raw_fd() };
        // Clusters 0..8 in use, 8 free but still referenced (a decrement is queued for it).
        for c in 0..8 {
            rc.set(&io, c, 1).unwrap();
        }
        rc.free_later(8, 1);
        for retiring in [false, true] {
            if retiring {
                assert!(rc.start_retiring());
            }
            let e = rc.alloc_contiguous(&io, 2).unwrap_err();
            assert!(matches!(&e, Error::Corrupt { detail, .. } if detail.contains("cluster 8")), "{e}");
            assert_eq!(rc.get(&io, 8).unwrap(), 0, "nothing allocated");
        }
    }
}
