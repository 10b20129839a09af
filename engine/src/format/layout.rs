//! Pure planner for `quring create`: computes every byte `qemu-img create -f qcow2` (QEMU 10)
//! writes, without doing any I/O.
//!
//! QEMU does not lay a new image out from a formula: it writes a minimal image (header,
//! a one-cluster refcount table at cluster 1, an empty refcount block at cluster 2), opens it
//! and then grows it through its ordinary cluster allocator (L1 table, preallocated L2 tables
//! and data clusters, extra refcount blocks, a relocated refcount table). To reproduce its
//! placement exactly, this module replays that allocator on an in-memory model of the file:
//! the first-fit free cluster search, refcount block allocation (self-describing or not), the
//! "try again" restarts after a new refcount block, and the refcount table growth. The model
//! keeps what is left behind on disk too (a freed old refcount table keeps its bytes).

use std::collections::{BTreeMap, HashMap};

use super::extension::{EXT_FEATURE_TABLE, Extension};
use super::feature;
use super::geometry::{Geometry, MAX_L1_BYTES, OFFSET_MASK};
use super::header::{CompressionType, Header, MAX_BACKING_NAME, V2_HEADER_LENGTH};
use super::l1::L1_COPIED;
use super::l2::{self, L2Entry, SubclusterBitmap};
use super::refcount;
use super::types::HostOffset;
use crate::{Error, Result};

/// Preallocation mode (qemu-img's `preallocation=` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only the header, refcount structures and L1 table.
    #[default]
    Off,
    /// Also every L2 table and every data cluster's refcount and L2 entry (data not written).
    Metadata,
    /// Like metadata; the data area is additionally fallocated by the caller.
    Falloc,
    /// Like metadata; the data area is additionally written with zeros by the caller.
    Full,
}

impl Preallocation {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// Options of a new image, with qemu-img's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512, as qemu-img does).
    pub size: u64,
    /// Cluster size in bytes (power of two, 512..=2 MiB).
    pub cluster_size: u64,
    /// Extended L2 entries (subclusters); needs cluster_size >= 16 KiB.
    pub extended_l2: bool,
    /// Refcount width in bits (power of two, 1..=64).
    pub refcount_bits: u32,
    /// Compatible feature bit 0.
    pub lazy_refcounts: bool,
    /// Version 2 image (`compat=0.10`).
    pub compat_v2: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format (backing format header extension).
    pub backing_fmt: Option<String>,
    /// Compression type for compressed clusters.
    pub compression: CompressionType,
    /// quring's L2-less ranges: sets incompatible bit 61 and its feature table entry.
    pub l2_less: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            extended_l2: false,
            refcount_bits: 16,
            lazy_refcounts: false,
            compat_v2: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_fmt: None,
            compression: CompressionType::Deflate,
            l2_less: false,
        }
    }
}

/// What to write to a new, empty file to create the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatePlan {
    /// Non-overlapping `(host offset, bytes)` writes in ascending offset order. Ranges not
    /// covered read as zeros (holes).
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Final file length (set with ftruncate after the writes).
    pub file_len: u64,
    /// Preallocated data clusters `(offset, len)`: for `Falloc` the caller fallocates them,
    /// for `Full` it writes zeros there. Empty for `Off` and `Metadata`.
    pub data_ranges: Vec<(u64, u64)>,
    /// The final header (for callers that want the table offsets).
    pub header: Header,
}

/// Largest image length QEMU's block layer accepts (`BDRV_MAX_LENGTH`).
pub const MAX_IMAGE_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);
/// Highest host offset a qcow2 cluster may have (`QCOW_MAX_CLUSTER_OFFSET`).
const MAX_CLUSTER_OFFSET: u64 = (1u64 << 56) - 1;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE` (compared against entry counts, as QEMU does).
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// `BDRV_REQUEST_MAX_BYTES`.
const REQUEST_MAX_BYTES: u64 = (i32::MAX as u64) & !511;
/// Most metadata bytes (refcount blocks, tables, L2 tables) a plan may hold in memory.
pub const MAX_PLAN_METADATA: u64 = 1 << 30;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

/// Validates `o` and computes the image qemu-img would create.
pub fn plan_create(o: &CreateOptions) -> Result<CreatePlan> {
    let cs = o.cluster_size;
    if !(512..=(2 << 20)).contains(&cs) || !cs.is_power_of_two() {
        return Err(invalid("Cluster size must be a power of two between 512 and 2048k"));
    }
    let cluster_bits = cs.trailing_zeros();
    if o.extended_l2 && cs < 16384 {
        return Err(invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
    }
    if o.refcount_bits == 0 || o.refcount_bits > 64 || !o.refcount_bits.is_power_of_two() {
        return Err(invalid("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    if o.compat_v2 {
        if o.refcount_bits != 16 {
            return Err(invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if o.compression != CompressionType::Deflate {
            return Err(invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.lazy_refcounts {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.extended_l2 {
            return Err(invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.l2_less {
            return Err(invalid(
                "L2-less ranges are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(invalid("Backing format cannot be used without backing file"));
    }
    if let Some(b) = &o.backing_file {
        if b.is_empty() {
            return Err(invalid("Backing file name must not be empty"));
        }
        if b.len() > MAX_BACKING_NAME as usize {
            return Err(invalid(format!(
                "Backing file name is {} bytes, longer than the {MAX_BACKING_NAME} bytes qcow2 allows",
                b.len()
            )));
        }
        if o.preallocation != Preallocation::Off && !o.extended_l2 {
            return Err(invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
    }
    if let Some(f) = &o.backing_fmt
        && f.is_empty()
    {
        return Err(invalid("Backing format must not be empty"));
    }
    let size = o.size.checked_next_multiple_of(512).filter(|&s| s <= MAX_IMAGE_LENGTH).ok_or_else(|| {
        invalid(format!("Could not resize image: offset({}) exceeds maximum({MAX_IMAGE_LENGTH})", o.size))
    })?;
    let g = Geometry::new(cluster_bits, o.extended_l2, o.refcount_bits.trailing_zeros())?;
    let l1_entries = g.l1_entries_for(size).filter(|&n| n <= MAX_L1_BYTES / 8).ok_or_else(|| {
        invalid("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    })?;
    if o.preallocation != Preallocation::Off {
        // L2 tables alone; refcount blocks are checked as they are created.
        let l2_bytes = l1_entries.saturating_mul(cs);
        if l2_bytes > MAX_PLAN_METADATA {
            return Err(invalid(format!(
                "preallocating metadata for {size} bytes needs {l2_bytes} bytes of L2 tables, more than the planner's limit of {MAX_PLAN_METADATA}"
            )));
        }
    }

    // The header QEMU ends up with (tables are filled in below).
    let mut header = Header::new_v3(size, g, o.compression);
    if o.compat_v2 {
        header.version = 2;
        header.header_length = V2_HEADER_LENGTH;
        header.extra.clear();
        header.extensions.clear();
    }
    if o.lazy_refcounts {
        header.compatible_features |= feature::COMPAT_LAZY_REFCOUNTS;
    }
    // QEMU omits the feature name table for clusters of 4 KiB and less, to leave room for
    // the backing file name.
    if cs <= 4096 {
        header.extensions.clear();
    }
    header.backing_file = o.backing_file.clone();
    header.set_backing_format(o.backing_fmt.as_deref());
    if o.l2_less {
        header.incompatible_features |= feature::INCOMPAT_L2LESS;
        // quring's own bit is named whenever the table fits, so that other implementations
        // refuse the image with a readable message.
        let table = Extension {
            kind: EXT_FEATURE_TABLE,
            data: feature::serialize_feature_table(&feature::default_feature_table(true)),
        };
        header.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
        header.extensions.push(table);
        if header.clone().serialize().is_err() {
            header.extensions.pop();
        }
    }
    // Fail early when header, extensions and name do not fit in cluster 0.
    header.serialize()?;

    let mut sim = Sim::new(g);
    // qcow2_co_create: clusters 0-2 (header, refcount table, refcount block) get refcount 1.
    sim.alloc_clusters(3 * cs)?;
    // qcow2_co_truncate: grow the L1 table to its exact size.
    sim.grow_l1(l1_entries)?;
    match o.preallocation {
        Preallocation::Off => {}
        Preallocation::Metadata => sim.preallocate_metadata(size)?,
        Preallocation::Falloc | Preallocation::Full => sim.preallocate_data(size)?,
    }

    header.l1_size = l1_entries as u32;
    header.l1_table_offset = HostOffset(sim.l1_offset);
    header.refcount_table_offset = HostOffset(sim.reftable_offset);
    header.refcount_table_clusters = (sim.reftable.len() as u64 / (cs / 8)) as u32;
    let mut hbytes = header.serialize()?;
    hbytes.resize(cs as usize, 0);
    sim.write(0, &hbytes);
    sim.finish(header)
}

/// A failed step of the replayed allocator: QEMU's `-EAGAIN` restart, or a real error.
enum SimErr {
    Again,
    Fail(Error),
}

impl From<Error> for SimErr {
    fn from(e: Error) -> Self {
        SimErr::Fail(e)
    }
}

type SimResult<T> = std::result::Result<T, SimErr>;

fn fail<T>(msg: impl Into<String>) -> SimResult<T> {
    Err(SimErr::Fail(invalid(msg)))
}

fn no_again(r: SimResult<u64>) -> Result<u64> {
    match r {
        Ok(v) => Ok(v),
        Err(SimErr::Fail(e)) => Err(e),
        Err(SimErr::Again) => Err(invalid("internal: unexpected allocation restart")),
    }
}

/// In-memory model of QEMU's qcow2 allocator state and of the file contents.
struct Sim {
    g: Geometry,
    cb: u32,
    cs: u64,
    rb_bits: u32,
    reftable: Vec<u64>,
    reftable_offset: u64,
    max_rt_index: u64,
    /// Refcount blocks by host offset (final contents).
    blocks: HashMap<u64, Vec<u8>>,
    free: u64,
    /// Bytes written so far that are not regenerated at the end, by cluster index.
    file: BTreeMap<u64, Vec<u8>>,
    file_end: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    l2: BTreeMap<u64, Vec<u8>>,
    data_ranges: Vec<(u64, u64)>,
    /// Explicit zeros QEMU writes after the end of the preallocated disk.
    tail_zeros: Option<(u64, u64)>,
    mem: u64,
}

impl Sim {
    fn new(g: Geometry) -> Sim {
        let cs = g.cluster_size();
        let mut reftable = vec![0u64; (cs / 8) as usize];
        reftable[0] = 2 * cs;
        let mut s = Sim {
            g,
            cb: g.cluster_bits,
            cs,
            rb_bits: g.refblock_bits(),
            reftable,
            reftable_offset: cs,
            max_rt_index: 0,
            blocks: HashMap::new(),
            free: 0,
            file: BTreeMap::new(),
            file_end: 3 * cs,
            l1: Vec::new(),
            l1_offset: 0,
            l2: BTreeMap::new(),
            data_ranges: Vec::new(),
            tail_zeros: None,
            mem: 3 * cs,
        };
        s.blocks.insert(2 * cs, vec![0u8; cs as usize]);
        s.write(cs, &(2 * cs).to_be_bytes());
        s
    }

    fn charge(&mut self, bytes: u64) -> SimResult<()> {
        self.mem = self.mem.saturating_add(bytes);
        if self.mem > MAX_PLAN_METADATA {
            return fail(format!(
                "the image needs more than {MAX_PLAN_METADATA} bytes of metadata, the planner's limit"
            ));
        }
        Ok(())
    }

    /// Overlays `data` at `off` in the modelled file.
    fn write(&mut self, off: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let ci = at >> self.cb;
            let in_c = (at & (self.cs - 1)) as usize;
            let n = (self.cs as usize - in_c).min(data.len() - pos);
            let c = self.file.entry(ci).or_default();
            if c.len() < in_c + n {
                c.resize(in_c + n, 0);
            }
            c[in_c..in_c + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        self.extend(off + data.len() as u64);
    }

    fn extend(&mut self, end: u64) {
        self.file_end = self.file_end.max(end);
    }

    fn rb_mask(&self) -> u64 {
        (1u64 << self.rb_bits) - 1
    }

    fn get_refcount(&self, ci: u64) -> u64 {
        let ti = ci >> self.rb_bits;
        let Some(&e) = self.reftable.get(ti as usize) else {
            return 0;
        };
        let off = e & !0x1ff;
        if off == 0 {
            return 0;
        }
        match self.blocks.get(&off) {
            Some(b) => refcount::get(b, ci & self.rb_mask(), self.g.refcount_order),
            None => 0,
        }
    }

    /// QEMU's `alloc_clusters_noref`: first fit from the free cluster index.
    fn alloc_noref(&mut self, size: u64, max: u64) -> SimResult<u64> {
        let nb = size.div_ceil(self.cs);
        let max_index = max >> self.cb;
        'retry: loop {
            for _ in 0..nb {
                let idx = self.free;
                self.free += 1;
                if self.free > max_index.saturating_add(1) {
                    return fail("image file would exceed the largest qcow2 host offset");
                }
                if self.get_refcount(idx) != 0 {
                    continue 'retry;
                }
            }
            break;
        }
        Ok((self.free - nb) << self.cb)
    }

    /// QEMU's `update_refcount` with an addend of +1 or -1.
    fn update_refcount(&mut self, offset: u64, length: u64, decrease: bool) -> SimResult<()> {
        if length == 0 {
            return Ok(());
        }
        let mask = !(self.cs - 1);
        let start = offset & mask;
        let last = (offset + length - 1) & mask;
        let mut old_ti = None;
        let mut block = 0u64;
        let mut co = start;
        while co <= last {
            let ci = co >> self.cb;
            let ti = ci >> self.rb_bits;
            if old_ti != Some(ti) {
                match self.alloc_refcount_block(ci) {
                    Ok(b) => block = b,
                    Err(e) => {
                        if matches!(e, SimErr::Again) && self.free > start >> self.cb {
                            self.free = start >> self.cb;
                        }
                        // Undo what was done, as QEMU does.
                        let _ = self.update_refcount(offset, co - offset, !decrease);
                        return Err(e);
                    }
                }
            }
            old_ti = Some(ti);
            let order = self.g.refcount_order;
            let bi = ci & self.rb_mask();
            let max = self.g.refcount_max();
            let Some(b) = self.blocks.get_mut(&block) else {
                return fail("internal: refcount block missing");
            };
            let r = refcount::get(b, bi, order);
            let n = if decrease { r.checked_sub(1) } else { r.checked_add(1).filter(|&n| n <= max) };
            let Some(n) = n else {
                return fail(format!("internal: refcount of cluster {ci} out of range"));
            };
            refcount::set(b, bi, order, n);
            if n == 0 && ci < self.free {
                self.free = ci;
            }
            co += self.cs;
        }
        Ok(())
    }

    /// QEMU's `alloc_refcount_block`: returns the block for cluster `ci`, or allocates one
    /// (and maybe a new refcount table) and asks the caller to restart.
    fn alloc_refcount_block(&mut self, ci: u64) -> SimResult<u64> {
        let ti = ci >> self.rb_bits;
        if let Some(&e) = self.reftable.get(ti as usize) {
            let off = e & !0x1ff;
            if off != 0 {
                return Ok(off);
            }
        }
        let new_block = self.alloc_noref(self.cs, i64::MAX as u64)?;
        if new_block == 0 {
            return fail("internal: refcount block allocated at offset 0");
        }
        self.charge(self.cs)?;
        if (new_block >> self.cb) >> self.rb_bits == ti {
            let mut b = vec![0u8; self.cs as usize];
            let bi = (new_block >> self.cb) & self.rb_mask();
            refcount::set(&mut b, bi, self.g.refcount_order, 1);
            self.blocks.insert(new_block, b);
        } else {
            self.update_refcount(new_block, self.cs, false)?;
            self.blocks.insert(new_block, vec![0u8; self.cs as usize]);
        }
        self.extend(new_block + self.cs);
        if (ti as usize) < self.reftable.len() {
            self.reftable[ti as usize] = new_block;
            self.write(self.reftable_offset + ti * 8, &new_block.to_be_bytes());
            self.max_rt_index = self.max_rt_index.max(ti);
            return Err(SimErr::Again);
        }
        let rb_entries = 1u64 << self.rb_bits;
        let blocks_used = (ci + 1).max((new_block >> self.cb) + 1).div_ceil(rb_entries);
        let meta_offset = blocks_used
            .checked_mul(rb_entries)
            .and_then(|v| v.checked_mul(self.cs))
            .ok_or_else(|| invalid("image file too large"))?;
        self.refcount_area(meta_offset, 0, false, ti, new_block)?;
        Err(SimErr::Again)
    }

    /// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed for `clusters`.
    fn refblocks_for(&self, mut clusters: u64, mut generous: bool) -> SimResult<u64> {
        let per_table = self.cs / 8;
        let per_block = 1u64 << self.rb_bits;
        let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
        loop {
            let last = n;
            let total = clusters
                .checked_add(table)
                .and_then(|v| v.checked_add(blocks))
                .ok_or_else(|| invalid("image file too large"))?;
            blocks = total.div_ceil(per_block);
            table = blocks.div_ceil(per_table);
            n = clusters + blocks + table;
            if n == last && generous {
                clusters += table.div_ceil(2);
                n = 0;
                generous = false;
            }
            if n == last {
                return Ok(blocks);
            }
        }
    }

    /// QEMU's `qcow2_refcount_area`: writes new refcount blocks and a new refcount table
    /// at `start` (covering `additional` more clusters), switches to it and frees the old
    /// table. Returns the end of the new structures.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_idx: u64,
        new_off: u64,
    ) -> SimResult<u64> {
        let cs = self.cs;
        let total = self.refblocks_for(start / cs + additional, !exact)?;
        if total > MAX_REFTABLE_SIZE {
            return fail("Could not resize image: File too large (refcount table)");
        }
        let area_idx = (start / cs) >> self.rb_bits;
        let mut table_size = if exact { total } else { total + total.div_ceil(2) };
        table_size = table_size.next_multiple_of(cs / 8);
        let table_clusters = table_size * 8 / cs;
        if table_size > MAX_REFTABLE_SIZE {
            return fail("Could not resize image: File too large (refcount table)");
        }
        self.charge(table_size * 8)?;
        let mut table = vec![0u64; table_size as usize];
        let keep = if table_size > self.max_rt_index { self.max_rt_index + 1 } else { table_size } as usize;
        let keep = keep.min(self.reftable.len());
        table[..keep].copy_from_slice(&self.reftable[..keep]);
        if new_off != 0 {
            if new_idx >= total {
                return fail("internal: new refcount block outside the new table");
            }
            table[new_idx as usize] = new_off;
        }
        let missing = (area_idx..total).filter(|&i| table[i as usize] == 0).count() as u64;
        let table_offset = start + missing * cs;
        let end_offset = table_offset + table_clusters * cs;
        self.charge(missing * cs)?;
        let mut block_offset = start;
        let rb_entries = 1u64 << self.rb_bits;
        for i in area_idx..total {
            let off = if table[i as usize] != 0 {
                table[i as usize]
            } else {
                let off = block_offset;
                self.blocks.insert(off, vec![0u8; cs as usize]);
                table[i as usize] = off;
                block_offset += cs;
                off
            };
            let first = i * rb_entries * cs;
            if first < end_offset {
                let j0 = if first < start { (start - first) / cs } else { 0 };
                let j1 = ((end_offset - first) / cs).min(rb_entries);
                let order = self.g.refcount_order;
                let Some(b) = self.blocks.get_mut(&off) else {
                    return fail("internal: refcount block missing");
                };
                for j in j0..j1 {
                    if refcount::get(b, j, order) != 0 {
                        return fail("internal: refcount area overlaps used clusters");
                    }
                    refcount::set(b, j, order, 1);
                }
            }
        }
        self.extend(table_offset);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write(table_offset, &bytes);
        let old_off = self.reftable_offset;
        let old_len = self.reftable.len() as u64;
        self.reftable = table;
        self.reftable_offset = table_offset;
        self.max_rt_index = self.reftable.iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        // QEMU ignores a failure to free the old table (it only leaks).
        let _ = self.update_refcount(old_off, old_len * 8, true);
        Ok(end_offset)
    }

    /// QEMU's `qcow2_alloc_clusters`.
    fn alloc_clusters(&mut self, size: u64) -> Result<u64> {
        loop {
            let off = match self.alloc_noref(size, MAX_CLUSTER_OFFSET) {
                Ok(o) => o,
                Err(e) => return no_again(Err(e)),
            };
            match self.update_refcount(off, size, false) {
                Ok(()) => return Ok(off),
                Err(SimErr::Again) => continue,
                Err(SimErr::Fail(e)) => return Err(e),
            }
        }
    }

    /// QEMU's `qcow2_alloc_clusters_at`: allocates up to `nb` free clusters at `offset`.
    fn alloc_clusters_at(&mut self, offset: u64, nb: u64) -> Result<u64> {
        if nb == 0 {
            return Ok(0);
        }
        loop {
            let ci = offset >> self.cb;
            let mut i = 0;
            while i < nb && self.get_refcount(ci + i) == 0 {
                i += 1;
            }
            match self.update_refcount(offset, i << self.cb, false) {
                Ok(()) => return Ok(i),
                Err(SimErr::Again) => continue,
                Err(SimErr::Fail(e)) => return Err(e),
            }
        }
    }

    /// `qcow2_grow_l1_table` from an empty table to `entries` entries.
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        let bytes = entries * 8;
        no_again(self.charge(bytes).map(|_| 0))?;
        let off = self.alloc_clusters(bytes)?;
        self.extend(off + bytes);
        self.l1 = vec![0; entries as usize];
        self.l1_offset = off;
        Ok(())
    }

    /// `get_cluster_table`: the L2 table for guest offset `guest`, allocated if missing.
    fn l2_table(&mut self, guest: u64) -> Result<u64> {
        let idx = (guest >> (self.cb + self.g.l2_bits())) as usize;
        if idx >= self.l1.len() {
            return Err(invalid("internal: guest offset beyond the L1 table"));
        }
        if self.l1[idx] & L1_COPIED == 0 {
            no_again(self.charge(self.cs).map(|_| 0))?;
            let off = self.alloc_clusters(self.cs)?;
            self.l2.insert(off, vec![0u8; self.cs as usize]);
            self.extend(off + self.cs);
            self.l1[idx] = off | L1_COPIED;
        }
        Ok(self.l1[idx] & OFFSET_MASK)
    }

    /// `qcow2_alloc_cluster_link_l2` for a preallocated run.
    fn link(&mut self, guest: u64, host: u64, nb: u64) -> Result<()> {
        let table = self.l2_table(guest)?;
        let first = (guest >> self.cb) & (self.g.l2_entries() - 1);
        let g = self.g;
        let Some(t) = self.l2.get_mut(&table) else {
            return Err(invalid("internal: L2 table missing"));
        };
        for i in 0..nb {
            let e = L2Entry::normal(HostOffset(host + (i << self.cb)), true);
            l2::write_entry(&g, t, (first + i) as usize, e, SubclusterBitmap(0));
        }
        Ok(())
    }

    /// `preallocate_co` (preallocation=metadata).
    fn preallocate_metadata(&mut self, size: u64) -> Result<()> {
        let cs = self.cs;
        let chunk_max = (i32::MAX as u64) & !(cs - 1);
        let mut offset = 0u64;
        let mut bytes = size;
        let mut end = 0u64;
        while bytes > 0 {
            let cur = bytes.min(chunk_max);
            // qcow2_alloc_host_offset(offset, cur)
            let mut start = offset;
            let mut remaining = cur;
            let mut cont: Option<u64> = None; // next contiguous host offset
            let mut first_host: Option<u64> = None;
            let mut runs = Vec::new();
            while remaining > 0 {
                // handle_copied: loads (and allocates) the L2 table; nothing is allocated.
                self.l2_table(start)?;
                // handle_alloc
                let l2_index = (start >> self.cb) & (self.g.l2_entries() - 1);
                let nb = remaining.div_ceil(cs).min(self.g.l2_entries() - l2_index).min(REQUEST_MAX_BYTES >> self.cb);
                let (host, nb) = match cont {
                    None => (self.alloc_clusters(nb * cs)?, nb),
                    Some(c) => (c, self.alloc_clusters_at(c, nb)?),
                };
                if nb == 0 {
                    break;
                }
                first_host.get_or_insert(host);
                runs.push((start, host, nb));
                let done = (nb * cs).min(remaining);
                start += done;
                remaining -= done;
                cont = Some(host + nb * cs);
            }
            for (g, h, n) in runs {
                self.link(g, h, n)?;
            }
            let covered = cur - remaining;
            if let Some(h) = first_host {
                end = h + covered;
            }
            bytes -= covered;
            offset += covered;
        }
        // QEMU extends the file to the end of the virtual disk, then the rest of the last
        // cluster is written with zeros (allocated, not a hole).
        let tail = end.next_multiple_of(cs);
        if tail > end {
            self.tail_zeros = Some((end, tail - end));
        }
        self.extend(tail);
        Ok(())
    }

    /// The falloc/full branch of `qcow2_co_truncate`.
    fn preallocate_data(&mut self, size: u64) -> Result<()> {
        let cs = self.cs;
        let mut last = self.file_end.div_ceil(cs);
        while last > 0 && self.get_refcount(last - 1) == 0 {
            last -= 1;
        }
        if last == 0 {
            return Err(invalid("internal: no references in the refcount table"));
        }
        let old_file_size = last * cs;
        let nb_data = size.next_multiple_of(cs) >> self.cb;
        let nb_l2 = nb_data.div_ceil(self.g.l2_entries()) + 1;
        let start = no_again(self.refcount_area(old_file_size, nb_data + nb_l2, true, 0, 0))?;
        let got = self.alloc_clusters_at(start, nb_data)?;
        if got != nb_data {
            return Err(invalid("internal: preallocated data area is not free"));
        }
        let data_len = nb_data * cs;
        self.extend(start + data_len);
        if data_len > 0 {
            self.data_ranges.push((start, data_len));
        }
        let mut host = start;
        let mut guest = 0u64;
        let mut left = nb_data;
        while left > 0 {
            let l2_index = (guest >> self.cb) & (self.g.l2_entries() - 1);
            let nb = left.min(self.g.l2_entries() - l2_index);
            self.link(guest, host, nb)?;
            guest += nb * cs;
            host += nb * cs;
            left -= nb;
        }
        Ok(())
    }

    /// Overlays the final refcount blocks, L1 and L2 tables and builds the plan.
    fn finish(mut self, header: Header) -> Result<CreatePlan> {
        let blocks = std::mem::take(&mut self.blocks);
        for (off, b) in &blocks {
            self.write(*off, b);
        }
        let l2 = std::mem::take(&mut self.l2);
        for (off, t) in &l2 {
            self.write(*off, t);
        }
        if !self.l1.is_empty() {
            let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write(self.l1_offset, &bytes);
        }
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let cs = self.cs;
        for (ci, mut data) in std::mem::take(&mut self.file) {
            while data.last() == Some(&0) {
                data.pop();
            }
            let lead = data.iter().take_while(|&&b| b == 0).count();
            if lead == data.len() {
                continue;
            }
            let off = (ci << self.cb) + lead as u64;
            let data = data.split_off(lead);
            if let Some((lo, ld)) = writes.last_mut()
                && *lo + ld.len() as u64 == (ci << self.cb)
                && (ld.len() as u64).is_multiple_of(cs)
                && lead == 0
            {
                ld.extend_from_slice(&data);
                continue;
            }
            writes.push((off, data));
        }
        if let Some((off, len)) = self.tail_zeros {
            let at = writes.partition_point(|(o, _)| *o < off);
            writes.insert(at, (off, vec![0u8; len as usize]));
        }
        Ok(CreatePlan { writes, file_len: self.file_end, data_ranges: self.data_ranges, header })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn write_plan(p: &CreatePlan, path: &Path, mode: Preallocation) {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::fd::AsRawFd;
        let mut f = std::fs::File::create(path).unwrap();
        for &(off, len) in &p.data_ranges {
            match mode {
                Preallocation::Falloc => {
                    // SAFETY: plain fallocate on an owned descriptor.
                    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off as i64, len as i64) };
                    assert_eq!(r, 0, "fallocate");
                }
                Preallocation::Full => {
                    f.seek(SeekFrom::Start(off)).unwrap();
                    let zeros = vec![0u8; 1 << 20];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        f.write_all(&zeros[..n]).unwrap();
                        left -= n as u64;
                    }
                }
                _ => panic!("data ranges without falloc/full"),
            }
        }
        for (off, d) in &p.writes {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(d).unwrap();
        }
        f.set_len(p.file_len).unwrap();
    }

    fn qemu_opts(o: &CreateOptions) -> String {
        let mut v = vec![
            format!("cluster_size={}", o.cluster_size),
            format!("refcount_bits={}", o.refcount_bits),
            format!("preallocation={}", o.preallocation.name()),
            format!("compression_type={}", o.compression.name()),
        ];
        if o.extended_l2 {
            v.push("extended_l2=on".into());
        }
        if o.lazy_refcounts {
            v.push("lazy_refcounts=on".into());
        }
        if o.compat_v2 {
            v.push("compat=0.10".into());
        }
        v.join(",")
    }

    fn qemu_create(o: &CreateOptions, path: &Path) {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "-o", &qemu_opts(o)]);
        if let Some(b) = &o.backing_file {
            c.args(["-u", "-b", b]);
        }
        if let Some(f) = &o.backing_fmt {
            c.args(["-F", f]);
        }
        c.arg(path).arg(o.size.to_string());
        let out = c.output().unwrap();
        assert!(out.status.success(), "qemu-img create {o:?}: {out:?}");
    }

    struct Pair {
        _dir: tempfile::TempDir,
        ours: PathBuf,
        theirs: PathBuf,
    }

    fn make_pair(o: &CreateOptions) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("qemu.qcow2");
        let plan = plan_create(o).unwrap_or_else(|e| panic!("{o:?}: {e}"));
        write_plan(&plan, &ours, o.preallocation);
        qemu_create(o, &theirs);
        Pair { _dir: dir, ours, theirs }
    }

    fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
        (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
    }

    fn assert_identical(o: &CreateOptions) {
        let p = make_pair(o);
        let a = std::fs::read(&p.ours).unwrap();
        let b = std::fs::read(&p.theirs).unwrap();
        if let Some(i) = first_diff(&a, &b) {
            panic!("{o:?}: differs from qemu-img at {i:#x} (ours {} bytes, qemu {} bytes)", a.len(), b.len());
        }
        check_clean(&p.ours);
    }

    fn check_clean(path: &Path) {
        // Check without opening the backing file (it does not exist).
        let spec = format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
            path.display()
        );
        let out = Command::new("qemu-img").args(["check", "-q", &spec]).output().unwrap();
        assert!(out.status.success(), "qemu-img check {path:?}: {out:?}");
    }

    fn json(args: &[&str], path: &Path) -> serde_json::Value {
        let out = Command::new("qemu-img").args(args).arg("--output=json").arg(path).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn opts(size: u64) -> CreateOptions {
        CreateOptions { size, ..Default::default() }
    }

    #[test]
    fn identical_sizes_and_cluster_sizes() {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            for size in [0u64, 1 << 20, 1 << 30, 100 << 30, 1 << 40, 1000] {
                let o = CreateOptions { cluster_size: cs, ..opts(size) };
                if plan_create(&o).is_err() {
                    // 512-byte clusters cannot describe 1 TiB; qemu-img refuses too.
                    assert!(cs == 512 && size == 1 << 40, "{o:?}");
                    continue;
                }
                assert_identical(&o);
            }
        }
    }

    #[test]
    fn identical_refcount_widths() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            for (cs, size) in [(65536u64, 1u64 << 30), (512, 1 << 30), (512, 16 << 30), (4096, 100 << 30)] {
                assert_identical(&CreateOptions { refcount_bits: bits, cluster_size: cs, ..opts(size) });
            }
        }
    }

    #[test]
    fn identical_features() {
        let base = opts(10 << 30);
        let cases = vec![
            CreateOptions { extended_l2: true, ..base.clone() },
            CreateOptions { extended_l2: true, cluster_size: 16384, ..base.clone() },
            CreateOptions { extended_l2: true, cluster_size: 2 << 20, refcount_bits: 1, ..base.clone() },
            CreateOptions { lazy_refcounts: true, ..base.clone() },
            CreateOptions { compat_v2: true, ..base.clone() },
            CreateOptions { compat_v2: true, cluster_size: 512, ..base.clone() },
            CreateOptions { compression: CompressionType::Zstd, ..base.clone() },
            CreateOptions {
                backing_file: Some("base.qcow2".into()),
                backing_fmt: Some("qcow2".into()),
                ..base.clone()
            },
            CreateOptions {
                backing_file: Some("base.raw".into()),
                backing_fmt: Some("raw".into()),
                compat_v2: true,
                ..base.clone()
            },
            CreateOptions {
                extended_l2: true,
                lazy_refcounts: true,
                compression: CompressionType::Zstd,
                refcount_bits: 64,
                backing_file: Some("b.img".into()),
                backing_fmt: Some("raw".into()),
                ..base.clone()
            },
        ];
        for o in cases {
            assert_identical(&o);
        }
    }

    #[test]
    fn backing_without_format() {
        // qemu-img 10 insists on -F, so compare with its image minus the format extension:
        // the same layout, the name right after the end-of-extensions marker.
        let o = CreateOptions { backing_file: Some("/some/base.raw".into()), ..opts(10 << 30) };
        let p = plan_create(&o).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.qcow2");
        write_plan(&p, &path, Preallocation::Off);
        check_clean(&path);
        let info = json(&["info", "-U"], &path);
        assert_eq!(info["backing-filename"], "/some/base.raw");
        assert!(info.get("backing-filename-format").is_none(), "{info}");
        let with_fmt = plan_create(&CreateOptions { backing_fmt: Some("raw".into()), ..o.clone() }).unwrap();
        assert_eq!(p.writes[1..], with_fmt.writes[1..]);
        assert_eq!(p.file_len, with_fmt.file_len);
    }

    fn check_prealloc(o: &CreateOptions) {
        let p = make_pair(o);
        check_clean(&p.ours);
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
            .arg(&p.ours)
            .arg(&p.theirs)
            .status()
            .unwrap();
        assert!(cmp.success(), "{o:?}: qemu-img compare");
        let (a, b) = (json(&["info"], &p.ours), json(&["info"], &p.theirs));
        for k in ["virtual-size", "cluster-size", "format"] {
            assert_eq!(a[k], b[k], "{o:?}: info {k}");
        }
        assert_eq!(a["format-specific"], b["format-specific"], "{o:?}");
        let same = std::fs::read(&p.ours).unwrap() == std::fs::read(&p.theirs).unwrap();
        assert!(same, "{o:?}: not byte-identical to qemu-img");
        let (ma, mb) = (json(&["map"], &p.ours), json(&["map"], &p.theirs));
        assert_eq!(ma, mb, "{o:?}: qemu-img map");
        if !o.extended_l2 && o.size > 0 {
            assert!(ma.as_array().unwrap().iter().all(|e| e["data"] == true), "{o:?}: {ma}");
        }
    }

    #[test]
    fn preallocation_modes() {
        for mode in [Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
            for (cs, size, bits, ext) in [
                (65536u64, 0u64, 16u32, false),
                (65536, 1000000, 16, false),
                (65536, 256 << 20, 16, false),
                (512, 8 << 20, 64, false),
                (4096, 48 << 20, 1, false),
                (65536, 256 << 20, 16, true),
                (2 << 20, 1 << 30, 8, false),
                (16384, 256 << 20, 2, true),
                (512, 16 << 20, 16, false),
            ] {
                // Full writes every data byte: keep it small.
                let size = if mode == Preallocation::Full { size.min(16 << 20) } else { size };
                let o = CreateOptions {
                    cluster_size: cs,
                    refcount_bits: bits,
                    extended_l2: ext,
                    preallocation: mode,
                    ..opts(size)
                };
                check_prealloc(&o);
            }
        }
    }

    #[test]
    fn preallocation_with_backing_and_extended_l2() {
        for mode in [Preallocation::Metadata, Preallocation::Falloc] {
            assert_identical(&CreateOptions {
                extended_l2: true,
                preallocation: mode,
                backing_file: Some("base.raw".into()),
                backing_fmt: Some("raw".into()),
                ..opts(1 << 30)
            });
        }
    }

    #[test]
    fn refuses_bad_options() {
        let cases: Vec<(CreateOptions, &str)> = vec![
            (CreateOptions { cluster_size: 1000, ..opts(1) }, "power of two between 512"),
            (CreateOptions { cluster_size: 256, ..opts(1) }, "power of two between 512"),
            (CreateOptions { cluster_size: 4 << 20, ..opts(1) }, "power of two between 512"),
            (CreateOptions { refcount_bits: 3, ..opts(1) }, "Refcount width"),
            (CreateOptions { refcount_bits: 0, ..opts(1) }, "Refcount width"),
            (CreateOptions { refcount_bits: 128, ..opts(1) }, "Refcount width"),
            (CreateOptions { extended_l2: true, cluster_size: 8192, ..opts(1) }, "at least 16384"),
            (CreateOptions { compat_v2: true, extended_l2: true, ..opts(1) }, "compatibility level 1.1"),
            (CreateOptions { compat_v2: true, lazy_refcounts: true, ..opts(1) }, "Lazy refcounts"),
            (CreateOptions { compat_v2: true, refcount_bits: 8, ..opts(1) }, "refcount widths"),
            (CreateOptions { compat_v2: true, compression: CompressionType::Zstd, ..opts(1) }, "Non-zlib"),
            (CreateOptions { compat_v2: true, l2_less: true, ..opts(1) }, "L2-less"),
            (CreateOptions { backing_fmt: Some("raw".into()), ..opts(1) }, "without backing file"),
            (
                CreateOptions { backing_file: Some("b".into()), preallocation: Preallocation::Metadata, ..opts(1) },
                "extended_l2",
            ),
            (CreateOptions { backing_file: Some("x".repeat(1024)), ..opts(1) }, "longer"),
            (
                CreateOptions { backing_file: Some("x".repeat(600)), cluster_size: 512, ..opts(1) },
                "more than one cluster",
            ),
            (CreateOptions { cluster_size: 512, ..opts(1 << 62) }, "too large"),
            (CreateOptions { ..opts(u64::MAX) }, "exceeds maximum"),
            (CreateOptions { ..opts(1 << 63) }, "exceeds maximum"),
            (CreateOptions { cluster_size: 2 << 20, preallocation: Preallocation::Metadata, ..opts(1 << 60) }, "limit"),
        ];
        for (o, want) in cases {
            let e = plan_create(&o).unwrap_err().to_string();
            assert!(e.contains(want), "{o:?}: {e}");
        }
    }

    #[test]
    fn l2_less_sets_bit_and_name() {
        let p = plan_create(&CreateOptions { l2_less: true, ..opts(1 << 30) }).unwrap();
        assert_ne!(p.header.incompatible_features & feature::INCOMPAT_L2LESS, 0);
        let t = p.header.feature_table().unwrap();
        assert!(t.iter().any(|f| f.bit == 61 && f.name.contains("l2-less")));
        let (off, d) = &p.writes[0];
        assert_eq!(*off, 0);
        let mut d = d.clone();
        d.resize(65536, 0);
        let h = Header::parse(&d, p.file_len).unwrap();
        assert_eq!(h, p.header);
    }

    fn any_options() -> impl Strategy<Value = CreateOptions> {
        (
            9u32..=21,
            0u32..=6,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            any::<bool>(),
            any::<bool>(),
            prop_oneof![0u64..(1 << 20), 0u64..(1 << 34), any::<u64>()],
        )
            .prop_map(|(cb, order, ext, lazy, v2, pre, zstd, backing, size)| CreateOptions {
                size,
                cluster_size: 1 << cb,
                extended_l2: ext,
                refcount_bits: 1 << order,
                lazy_refcounts: lazy,
                compat_v2: v2,
                preallocation: [
                    Preallocation::Off,
                    Preallocation::Metadata,
                    Preallocation::Falloc,
                    Preallocation::Full,
                ][pre as usize],
                backing_file: backing.then(|| "base.img".to_string()),
                backing_fmt: None,
                compression: if zstd { CompressionType::Zstd } else { CompressionType::Deflate },
                l2_less: false,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn plans_are_sane(o in any_options()) {
            // Keep preallocated plans small enough for a unit test.
            let mut o = o;
            if o.preallocation != Preallocation::Off {
                o.size %= 64 << (o.cluster_size.trailing_zeros() - 9 + 10);
            }
            let Ok(p) = plan_create(&o) else { return Ok(()); };
            let mut end = 0u64;
            for (off, d) in &p.writes {
                prop_assert!(*off >= end, "overlapping writes at {off:#x}");
                prop_assert!(!d.is_empty());
                end = off + d.len() as u64;
                prop_assert!(end <= p.file_len);
            }
            for (off, len) in &p.data_ranges {
                prop_assert!(off + len <= p.file_len);
                prop_assert!(p.writes.iter().all(|(w, d)| w + d.len() as u64 <= *off || *w >= off + len));
            }
            let (off, d) = &p.writes[0];
            prop_assert_eq!(*off, 0);
            let mut d = d.clone();
            d.resize(o.cluster_size as usize, 0);
            let h = Header::parse(&d, p.file_len).unwrap();
            prop_assert_eq!(h.size, o.size.next_multiple_of(512));
        }
    }
}
