//! The refcount structure `check -r all` rebuilds when it cannot repair it in place, laid
//! out as QEMU 10's `rebuild_refcount_structure()` lays it out (block/qcow2-refcount.c), so
//! that both tools leave the same file.

use crate::format::refcount as rc;
use crate::io::{ImageFile, SyncRing};
use crate::{Error, Result};

/// A rebuilt refcount structure, placed as QEMU's `qemu-img check -r all` places it
/// (`rebuild_refcount_structure()`): each refcount block in the first cluster that nothing
/// references, at or after the clusters it describes, then the refcount table in the first
/// free run, the blocks covering the table rewritten (and the table moved when that needs a
/// new block beyond its size). Everything lands in clusters no structure of the image uses
/// (the old refcount structures count as used), so until the header points at the new table
/// the old one stays valid.
pub(crate) struct RebuildPlan {
    /// Refcount blocks by host offset (the last content planned for each).
    pub blocks: std::collections::BTreeMap<u64, Vec<u8>>,
    /// Host offset of the new refcount table.
    pub table_offset: u64,
    /// The table, whole clusters.
    pub table: Vec<u8>,
}

/// The in-memory refcount array of the rebuild: packed like refcount blocks, sized to whole
/// clusters so that block `i` is bytes `i * cluster_size ..`.
struct RefArray {
    bytes: Vec<u8>,
    clusters: u64,
    order: u32,
    cs: u64,
}

impl RefArray {
    fn get(&self, k: u64) -> u64 {
        if k >= self.clusters { 0 } else { rc::get(&self.bytes, k, self.order) }
    }
    fn set(&mut self, k: u64, v: u64) {
        rc::set(&mut self.bytes, k, self.order, v);
    }
    /// Grows to `clusters` entries (new ones zero).
    fn grow(&mut self, clusters: u64) -> Result<()> {
        let bytes = (clusters << self.order).div_ceil(8).div_ceil(self.cs) * self.cs;
        let bytes = usize::try_from(bytes).map_err(|_| Error::Unsupported("refcount array too large".into()))?;
        if bytes > self.bytes.len() {
            self.bytes
                .try_reserve_exact(bytes - self.bytes.len())
                .map_err(|_| Error::Unsupported("out of memory for the refcount array".into()))?;
            self.bytes.resize(bytes, 0);
        }
        self.clusters = clusters;
        Ok(())
    }
    /// The bytes of refcount block `i`.
    fn block(&self, i: u64) -> Vec<u8> {
        let cs = self.cs as usize;
        let start = i as usize * cs;
        let mut b = vec![0u8; cs];
        if start < self.bytes.len() {
            let end = (start + cs).min(self.bytes.len());
            b[..end - start].copy_from_slice(&self.bytes[start..end]);
        }
        b
    }
    /// QEMU's `alloc_clusters_imrt()`: the first run of `count` free clusters at or after
    /// `*first_free` (growing the array past its end when there is none), marked used.
    fn alloc(&mut self, count: u64, first_free: &mut u64) -> Result<u64> {
        let mut cluster = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while cluster < self.clusters && run < count {
            if self.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < count {
            self.grow(cluster + count - run)?;
        }
        cluster -= run;
        for k in cluster..cluster + count {
            self.set(k, 1);
        }
        Ok(cluster * self.cs)
    }
}

/// Plans the rebuild of a refcount structure from `refs` (the references of every cluster
/// of the file, packed with the image's refcount width, the old refcount structures
/// included), QEMU's layout: see [`RebuildPlan`].
pub(crate) fn plan_rebuild(g: &crate::format::Geometry, refs: &[u8], clusters: u64) -> Result<RebuildPlan> {
    let cs = g.cluster_size();
    let mut arr = RefArray { bytes: refs.to_vec(), clusters: 0, order: g.refcount_order, cs };
    arr.grow(clusters)?;
    let mut plan = RebuildPlan { blocks: Default::default(), table_offset: 0, table: Vec::new() };
    let mut table: Vec<u64> = Vec::new();
    let grown = write_refblocks(&mut arr, g, 0, clusters, &mut table, &mut plan)?;
    debug_assert!(grown);
    loop {
        let table_clusters = (table.len() as u64 * 8).div_ceil(cs);
        if table_clusters * cs > crate::format::geometry::MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::Unsupported("rebuilt refcount table would exceed 8 MiB".into()));
        }
        let mut first_free = 0;
        let off = arr.alloc(table_clusters, &mut first_free)?;
        let (start, end) = (off / cs, off / cs + table_clusters);
        if !write_refblocks(&mut arr, g, start, end, &mut table, &mut plan)? {
            plan.table_offset = off;
            plan.table = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            return Ok(plan);
        }
        for k in start..end {
            arr.set(k, 0);
        }
    }
}

/// QEMU's `rebuild_refcounts_write_refblocks()`: a refcount block for every block's worth
/// of clusters in `first..end` that holds a used cluster (allocated when the table has none
/// yet), its content the slice of `arr`. Returns whether the table had to grow.
fn write_refblocks(
    arr: &mut RefArray,
    g: &crate::format::Geometry,
    first: u64,
    mut end: u64,
    table: &mut Vec<u64>,
    plan: &mut RebuildPlan,
) -> Result<bool> {
    let cs = g.cluster_size();
    let per_block = g.refblock_entries();
    let mut first_free = 0u64;
    let mut grown = false;
    let mut cluster = first;
    while cluster < end {
        if arr.get(cluster) == 0 {
            cluster += 1;
            continue;
        }
        let index = cluster / per_block;
        let block_start = index * per_block;
        let off = match table.get(index as usize) {
            Some(&o) if o != 0 => o,
            _ => {
                // Never inside a block already written.
                first_free = first_free.max(block_start);
                let off = arr.alloc(1, &mut first_free)?;
                end = end.max(off / cs + 1);
                if table.len() as u64 <= index {
                    let entries = ((index + 1) * 8).div_ceil(cs) * cs / 8;
                    table.resize(entries as usize, 0);
                    grown = true;
                }
                table[index as usize] = off;
                off
            }
        };
        plan.blocks.insert(off, arr.block(index));
        cluster = block_start + per_block;
    }
    Ok(grown)
}

/// Writes a planned refcount structure and switches the header to it (QEMU writes the
/// table offset and size, bytes 48-59), each step made durable before the next: a crash
/// before the switch leaves the old structure in charge, after it the new one.
pub(crate) fn write_rebuild(sync: &SyncRing, file: &ImageFile, plan: &RebuildPlan, cs: u64) -> Result<()> {
    use crate::io::hook::WriteKind;
    for (&off, block) in &plan.blocks {
        sync.write_kind(WriteKind::RefBlock, file.fd(), off, block)?;
    }
    sync.write_kind(WriteKind::RefTable, file.fd(), plan.table_offset, &plan.table)?;
    sync.fdatasync(file.fd())?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&plan.table_offset.to_be_bytes());
    fields[8..].copy_from_slice(&((plan.table.len() as u64 / cs) as u32).to_be_bytes());
    sync.write_kind(WriteKind::Header, file.fd(), 48, &fields)?;
    sync.fdatasync(file.fd())
}
