//! Persistent dirty bitmaps on an open image (spec: "Bitmaps extension"; QEMU's
//! `block-dirty-bitmap-*` and `qemu-img bitmap`): the directory read and validated at open,
//! the enabled bitmaps tracked in memory while the image is open for writing, stored back
//! at close, and the management operations.
//!
//! Life of an enabled bitmap in a read-write session, as with QEMU:
//! - open: autoclear bit 0 set and the extension valid: the directory is read; each enabled
//!   (`auto`) bitmap that is consistent (not `in_use`) is loaded into a
//!   [`DirtyBitmap`](crate::meta::dirty::DirtyBitmap) and marked `in_use` on disk (the
//!   directory rewritten in place and made durable) before any guest write can be
//!   acknowledged. Autoclear bits other than bit 0 are cleared; an extension whose bit 0 is
//!   clear was left by a writer that did not know bitmaps: it is dropped (its clusters leak,
//!   as with QEMU).
//! - every write, zero write and discard submitted to any queue sets the bits of the
//!   granules it touches, without a lock ([`crate::queue::Queue`] keeps a copy of the list
//!   of tracked bitmaps and refreshes it when [`Image::bitmap_gen`] changes).
//! - clean close: each tracked bitmap is written to new clusters (a data cluster per
//!   non-zero part, zero table entries elsewhere, a new table), then a new directory with
//!   `in_use` cleared; their refcounts are made durable, then the header points to the new
//!   directory, then the old table, data and directory clusters are freed. A crash before
//!   that leaves `in_use` set: QEMU and quring then treat the bitmap as inconsistent.
//!
//! Disabled bitmaps, bitmaps already `in_use` at open (inconsistent) and bitmaps with extra
//! data that is not flagged compatible are never changed by writes; the management
//! operations rewrite a bitmap's table and data when they change its bits.
//!
//! Management operations need idle queues (like internal snapshots): they take the
//! metadata lock, refuse new requests meanwhile, and fail when a request is in flight.

use super::header::write_header;
use super::snapshot_refs::Refs;
use super::*;
use crate::format::bitmap::{self as bm, BitmapsExt, DirEntry, TableEntry};
use crate::format::extension::{EXT_BITMAPS, EXT_FEATURE_TABLE};
use crate::format::feature::{AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW};
use crate::format::types::HostOffset;
use crate::meta::dirty::DirtyBitmap;

/// A bitmap as [`Image::bitmaps`] lists it (its directory entry on disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name.
    pub name: String,
    /// Bytes one bit covers.
    pub granularity: u64,
    /// `in_use` on disk: the bitmap is being tracked by this session, or was left
    /// inconsistent by a writer that did not close the image.
    pub in_use: bool,
    /// Enabled (`auto`): tracks writes.
    pub auto: bool,
    /// This session tracks the bitmap's writes in memory.
    pub tracking: bool,
}

/// One bitmap of the directory.
pub(crate) struct Rec {
    /// The entry as on disk.
    pub entry: DirEntry,
    /// The bits this session tracks (enabled bitmaps of a writable image).
    pub live: Option<Arc<DirtyBitmap>>,
}

/// The bitmap directory of an image, as this session knows it.
#[derive(Default)]
pub(crate) struct BitmapDir {
    pub recs: Vec<Rec>,
    /// The extension on disk (None: the image has no bitmaps).
    pub ext: Option<BitmapsExt>,
}

/// The tracked bitmaps, as the queues see them.
pub(crate) type LiveList = Arc<[Arc<DirtyBitmap>]>;

/// Reads and validates the directory an extension points to.
fn read_directory(sync: &SyncRing, fd: i32, h: &Header, file_len: u64) -> Result<(BitmapsExt, Vec<DirEntry>)> {
    let cs = h.geometry().cluster_size();
    let raw = h.extensions.iter().find(|e| e.kind == EXT_BITMAPS).map(|e| e.data.clone()).unwrap_or_default();
    let ext = BitmapsExt::parse(&raw, cs, file_len)?;
    let buf = sync.read_exact(fd, ext.directory_offset.0, ext.directory_size as usize, "bitmap directory")?;
    let entries = bm::parse_directory(&buf, ext.nb_bitmaps)?;
    for e in &entries {
        e.validate(cs, file_len, h.size)?;
    }
    bm::check_overlaps(&entries, (ext.directory_offset.0, ext.directory_size), cs)?;
    // Every table entry, as QEMU checks them when it loads the bitmaps at open (bounded:
    // at most 512 MiB of data per bitmap, so at most 8 MiB of table at 512-byte clusters).
    for e in &entries {
        let table = sync.read_exact(fd, e.table_offset.0, e.table_size as usize * 8, "bitmap table")?;
        for (i, raw) in crate::format::bytes::be64_words(&table).enumerate() {
            TableEntry::decode(raw, cs, file_len, &e.name, i as u64)?;
        }
    }
    Ok((ext, entries))
}

/// Reads a bitmap's bits (table and data clusters, each entry validated) over `disk_size`.
pub(super) fn read_data(
    sync: &SyncRing,
    fd: i32,
    cs: u64,
    e: &DirEntry,
    disk_size: u64,
    file_len: u64,
) -> Result<DirtyBitmap> {
    let b = DirtyBitmap::new(disk_size, e.granularity_bits);
    let table = sync.read_exact(fd, e.table_offset.0, e.table_size as usize * 8, "bitmap table")?;
    let need = b.data_bytes().div_ceil(cs);
    for (i, raw) in crate::format::bytes::be64_words(&table).enumerate() {
        let te = TableEntry::decode(raw, cs, file_len, &e.name, i as u64)?;
        if i as u64 >= need {
            continue;
        }
        match te {
            TableEntry::Zeros => {}
            TableEntry::Ones => b.fill_bytes(i as u64 * cs, cs),
            TableEntry::Data(off) => {
                let data = sync.read_exact(fd, off.0, cs as usize, "bitmap data")?;
                b.or_bytes(i as u64 * cs, &data);
            }
        }
    }
    Ok(b)
}

/// The clusters a bitmap's table and data occupy (cluster indices; entries that fail
/// validation are skipped: they were never counted as references either).
fn used_clusters(sync: &SyncRing, fd: i32, cs: u64, e: &DirEntry, file_len: u64) -> Result<Vec<u64>> {
    let (off, n) = e.table_clusters(cs);
    let mut out: Vec<u64> = (0..n).map(|i| off / cs + i).collect();
    let table = sync.read_exact(fd, e.table_offset.0, e.table_size as usize * 8, "bitmap table")?;
    for (i, raw) in crate::format::bytes::be64_words(&table).enumerate() {
        if let Ok(TableEntry::Data(o)) = TableEntry::decode(raw, cs, file_len, &e.name, i as u64) {
            out.push(o.0 / cs);
        }
    }
    Ok(out)
}

/// Opening: the directory (when autoclear bit 0 says it is consistent); on a read-write
/// open, the autoclear bits quring does not maintain cleared, a stale extension dropped,
/// and the enabled bitmaps loaded and marked `in_use` on disk.
pub(super) fn open_bitmaps(
    sync: &SyncRing,
    fd: i32,
    h: &mut Header,
    file_len: u64,
    read_only: bool,
) -> Result<BitmapDir> {
    let has_ext = h.extensions.iter().any(|e| e.kind == EXT_BITMAPS);
    let consistent = h.version >= 3 && has_ext && h.autoclear_features & AUTOCLEAR_BITMAPS != 0;
    let mut dir = BitmapDir::default();
    if consistent {
        let (ext, entries) = read_directory(sync, fd, h, file_len)?;
        dir.ext = Some(ext);
        dir.recs = entries.into_iter().map(|entry| Rec { entry, live: None }).collect();
    }
    if read_only || h.version < 3 {
        return Ok(dir);
    }
    // quring keeps the external data file raw-consistent (image/data_file.rs), so the raw
    // bit stays too.
    let keep = if consistent { AUTOCLEAR_BITMAPS } else { 0 } | (h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW);
    if h.autoclear_features != keep || (has_ext && !consistent) {
        h.autoclear_features = keep;
        if !consistent {
            h.extensions.retain(|e| e.kind != EXT_BITMAPS);
        }
        write_header(sync, fd, h)?;
    }
    let cs = h.geometry().cluster_size();
    let mut changed = false;
    for r in &mut dir.recs {
        if r.entry.auto() && !r.entry.in_use() && r.entry.usable() {
            r.live = Some(Arc::new(read_data(sync, fd, cs, &r.entry, h.size, file_len)?));
            r.entry.flags |= bm::FLAG_IN_USE;
            changed = true;
        }
    }
    if let (true, Some(ext)) = (changed, dir.ext) {
        // Only flags change: the directory keeps its size and place.
        let bytes = bm::serialize_directory(&dir.recs.iter().map(|r| r.entry.clone()).collect::<Vec<_>>());
        sync.write_kind(crate::io::hook::WriteKind::Other, fd, ext.directory_offset.0, &bytes)?;
        sync.fdatasync(fd)?;
    }
    Ok(dir)
}

/// What a directory rewrite does with one bitmap.
enum Store {
    /// Keep the table and data on disk.
    Keep,
    /// Write these bits to new clusters (and free the old ones).
    Bits(Arc<DirtyBitmap>),
}

impl Image {
    /// The persistent bitmaps, in directory order.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        let dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        dir.recs
            .iter()
            .map(|r| BitmapInfo {
                name: r.entry.name.clone(),
                granularity: r.entry.granularity(),
                in_use: r.entry.in_use(),
                auto: r.entry.auto(),
                tracking: r.live.is_some(),
            })
            .collect()
    }

    /// The granularity a new bitmap gets by default (QEMU's: the cluster size, within
    /// 4 KiB..=64 KiB).
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.geo.cluster_size().clamp(4096, 65536)
    }

    /// The tracked bitmaps and their generation (queues refresh their copy when it moves).
    pub(crate) fn live_bitmaps(&self) -> (u64, LiveList) {
        let l = self.bitmap_live.lock().unwrap_or_else(|e| e.into_inner());
        (self.bitmap_gen.load(Ordering::Acquire), l.clone())
    }

    /// Republishes the list of tracked bitmaps after `dir` changed.
    fn publish_live(&self, dir: &BitmapDir) {
        let list: LiveList = dir.recs.iter().filter_map(|r| r.live.clone()).collect();
        let mut l = self.bitmap_live.lock().unwrap_or_else(|e| e.into_inner());
        *l = list;
        self.bitmap_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds an empty bitmap, as `qemu-img bitmap --add [-g GRANULARITY] [--disable]`:
    /// enabled unless `disabled`; the granularity defaults to
    /// [`Image::default_bitmap_granularity`].
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, disabled: bool) -> Result<()> {
        // QEMU's order of checks and its messages (qmp_block_dirty_bitmap_add, then
        // qcow2_co_can_store_new_dirty_bitmap).
        if name.is_empty() {
            return Err(Error::InvalidRequest("Bitmap name cannot be empty".into()));
        }
        let g = granularity.unwrap_or_else(|| self.default_bitmap_granularity());
        let gb = g.trailing_zeros() as u8;
        if !g.is_power_of_two() || !(bm::MIN_GRANULARITY_BITS..=bm::MAX_GRANULARITY_BITS).contains(&gb) {
            return Err(Error::InvalidRequest("Granularity must be power of 2 and at least 512".into()));
        }
        let persist = |why: String| {
            Error::InvalidRequest(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.path().display()
            ))
        };
        if self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner()).recs.iter().any(|r| r.entry.name == name) {
            return Err(Error::InvalidRequest(format!("Bitmap already exists: {name}")));
        }
        if self.version < 3 {
            return Err(persist("Cannot store dirty bitmaps in qcow2 v2 files".into()));
        }
        if name.len() > bm::MAX_NAME_SIZE {
            return Err(persist(format!("Name length exceeds maximum ({} characters)", bm::MAX_NAME_SIZE)));
        }
        let cs = self.geo.cluster_size();
        bm::check_new(self.vsize(), gb, cs).map_err(|e| match e {
            Error::InvalidRequest(s) => persist(s),
            other => other,
        })?;
        let mut st = self.idle_lock("bitmap operations")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        if dir.recs.iter().any(|r| r.entry.name == name) {
            return Err(Error::InvalidRequest(format!("Bitmap already exists: {name}")));
        }
        if dir.recs.len() >= bm::MAX_BITMAPS as usize {
            return Err(persist("Maximum number of persistent bitmaps is already reached".into()));
        }
        let bits = Arc::new(DirtyBitmap::new(self.vsize(), gb));
        let entry = DirEntry {
            table_offset: HostOffset(0),
            table_size: bm::table_size_for(self.vsize(), gb, cs) as u32,
            flags: if disabled { 0 } else { bm::FLAG_AUTO },
            kind: bm::TYPE_DIRTY_TRACKING,
            granularity_bits: gb,
            name: name.to_string(),
            extra: Vec::new(),
        };
        let mut plan: Vec<Store> = dir.recs.iter().map(|_| Store::Keep).collect();
        plan.push(Store::Bits(bits.clone()));
        let live = (!disabled).then_some(bits);
        dir.recs.push(Rec { entry, live: None });
        if let Err(e) = self.rewrite_directory(&mut st, &mut dir, plan) {
            dir.recs.pop();
            return Err(e);
        }
        if let Some(b) = live {
            self.track(&mut dir, name, b)?;
        }
        Ok(())
    }

    /// Removes bitmap `name` and frees its clusters (`qemu-img bitmap --remove`).
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        let mut st = self.idle_lock("bitmap operations")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let i = index(&dir, name)?;
        let cs = self.geo.cluster_size();
        let freed = used_clusters(&self.sync, self.file.fd(), cs, &dir.recs[i].entry, self.file_len())?;
        let rec = dir.recs.remove(i);
        let plan = dir.recs.iter().map(|_| Store::Keep).collect();
        if let Err(e) = self.rewrite_directory(&mut st, &mut dir, plan) {
            dir.recs.insert(i, rec);
            return Err(e);
        }
        self.publish_live(&dir);
        self.free_clusters(&mut st, &freed)
    }

    /// Clears every bit of bitmap `name` (`qemu-img bitmap --clear`).
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        let mut st = self.idle_lock("bitmap operations")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let i = index(&dir, name)?;
        if let Some(l) = &dir.recs[i].live {
            // Stored at close (in use on disk until then).
            l.clear();
            return Ok(());
        }
        self.check_usable(&dir.recs[i].entry)?;
        let bits = Arc::new(DirtyBitmap::new(self.vsize(), dir.recs[i].entry.granularity_bits));
        self.replace_bits(&mut st, &mut dir, i, bits)
    }

    /// Enables bitmap `name`: it tracks writes from now on (`qemu-img bitmap --enable`).
    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        let mut st = self.idle_lock("bitmap operations")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let i = index(&dir, name)?;
        if dir.recs[i].live.is_some() {
            return Ok(());
        }
        self.check_usable(&dir.recs[i].entry)?;
        let e = &dir.recs[i].entry;
        let bits =
            Arc::new(read_data(&self.sync, self.file.fd(), self.geo.cluster_size(), e, self.vsize(), self.file_len())?);
        let old = dir.recs[i].entry.flags;
        dir.recs[i].entry.flags |= bm::FLAG_AUTO;
        let plan = dir.recs.iter().map(|_| Store::Keep).collect();
        if let Err(e) = self.rewrite_directory(&mut st, &mut dir, plan) {
            dir.recs[i].entry.flags = old;
            return Err(e);
        }
        self.track(&mut dir, name, bits)
    }

    /// Disables bitmap `name`: its bits are stored and stay as they are
    /// (`qemu-img bitmap --disable`).
    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        let mut st = self.idle_lock("bitmap operations")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let i = index(&dir, name)?;
        if dir.recs[i].entry.in_use() && dir.recs[i].live.is_none() {
            return Err(inconsistent(name));
        }
        let live = dir.recs[i].live.clone();
        let old = dir.recs[i].entry.flags;
        dir.recs[i].entry.flags &= !(bm::FLAG_AUTO | bm::FLAG_IN_USE);
        let mut plan: Vec<Store> = dir.recs.iter().map(|_| Store::Keep).collect();
        if let Some(l) = &live {
            plan[i] = Store::Bits(l.clone());
        }
        if let Err(e) = self.rewrite_directory(&mut st, &mut dir, plan) {
            dir.recs[i].entry.flags = old;
            return Err(e);
        }
        dir.recs[i].live = None;
        self.publish_live(&dir);
        Ok(())
    }

    /// Sets in bitmap `dst` every bit of bitmap `src` of `src_image` (this image when None),
    /// as `qemu-img bitmap --merge SRC [-b SOURCE_IMAGE] IMG DST`.
    pub fn merge_bitmap(&self, dst: &str, src_image: Option<&Image>, src: &str) -> Result<()> {
        let from = src_image.unwrap_or(self).bits_of(src)?;
        let mut st = self.idle_lock("bitmap operations")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let i = index(&dir, dst)?;
        if let Some(l) = &dir.recs[i].live {
            l.merge(&from);
            return Ok(());
        }
        self.check_usable(&dir.recs[i].entry)?;
        let e = &dir.recs[i].entry;
        let bits = read_data(&self.sync, self.file.fd(), self.geo.cluster_size(), e, self.vsize(), self.file_len())?;
        bits.merge(&from);
        self.replace_bits(&mut st, &mut dir, i, Arc::new(bits))
    }

    /// Can every bitmap follow a resize to `new_size` (QEMU's `qcow2_co_truncate` with
    /// persistent bitmaps)? Not one left inconsistent (`in_use`) by another writer, nor one
    /// with incompatible extra data (QEMU's message), nor one that would outgrow the limits.
    pub(crate) fn check_bitmaps_resizable(&self, new_size: u64) -> Result<()> {
        let dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let cs = self.geo.cluster_size();
        for r in &dir.recs {
            if r.live.is_none() {
                self.check_usable(&r.entry)?;
            }
            bm::check_new(new_size, r.entry.granularity_bits, cs)?;
        }
        Ok(())
    }

    /// First half of a resize with bitmaps: every bitmap this session does not track is
    /// marked `in_use` on disk (the directory rewritten in place and made durable) before
    /// the header's size changes. QEMU needs a table of exactly the size the disk needs,
    /// so the header's size and the tables cannot change together: a crash in between
    /// leaves the bitmaps in use (inconsistent), as QEMU leaves every bitmap it had loaded.
    pub(crate) fn begin_bitmap_resize(&self) -> Result<()> {
        if self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner()).recs.is_empty() {
            return Ok(());
        }
        let _st = self.idle_lock("resizing an image with bitmaps")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let old: Vec<u32> = dir.recs.iter().map(|r| r.entry.flags).collect();
        let mut changed = false;
        for r in dir.recs.iter_mut().filter(|r| r.live.is_none()) {
            r.entry.flags |= bm::FLAG_IN_USE;
            changed = true;
        }
        if !changed {
            return Ok(());
        }
        if let Err(e) = self.write_directory_in_place(&dir) {
            for (r, f) in dir.recs.iter_mut().zip(old) {
                r.entry.flags = f;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Second half of a resize from `old_size` (the header says the new size now): the
    /// bitmaps cover `new_size` bytes as with QEMU (bits past the new end dropped, a grown
    /// range clean; the resize's own zeroing and preallocation are not guest writes and
    /// marked nothing, the tracked bitmaps still had the old size then). The tracked ones
    /// are replaced in memory by resized copies (stored at close); the others get new
    /// tables and data with `in_use` cleared.
    pub(crate) fn finish_bitmap_resize(&self, old_size: u64, new_size: u64) -> Result<()> {
        if self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner()).recs.is_empty() {
            return Ok(());
        }
        let mut st = self.idle_lock("resizing an image with bitmaps")?;
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let cs = self.geo.cluster_size();
        let mut plan: Vec<Store> = Vec::with_capacity(dir.recs.len());
        let (mut stored, mut live) = (false, false);
        let old_flags: Vec<u32> = dir.recs.iter().map(|r| r.entry.flags).collect();
        // The untracked bitmaps' bits first (their tables still cover the old size), so
        // that a read error changes nothing.
        let mut on_disk = Vec::with_capacity(dir.recs.len());
        for r in &dir.recs {
            on_disk.push(match r.live {
                Some(_) => None,
                None => Some(read_data(&self.sync, self.file.fd(), cs, &r.entry, old_size, self.file_len())?),
            });
        }
        for (r, disk) in dir.recs.iter_mut().zip(on_disk) {
            let gb = r.entry.granularity_bits;
            let b = DirtyBitmap::new(new_size, gb);
            match (&r.live, disk) {
                (Some(l), _) => {
                    b.merge(l);
                    r.live = Some(Arc::new(b));
                    live = true;
                    plan.push(Store::Keep);
                }
                (None, d) => {
                    if let Some(d) = d {
                        b.merge(&d);
                    }
                    r.entry.flags &= !bm::FLAG_IN_USE;
                    plan.push(Store::Bits(Arc::new(b)));
                    stored = true;
                }
            }
        }
        if live {
            self.publish_live(&dir);
        }
        if stored && let Err(e) = self.rewrite_directory(&mut st, &mut dir, plan) {
            for (r, f) in dir.recs.iter_mut().zip(old_flags) {
                r.entry.flags = f;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Rewrites the directory where it is (only flags changed: same size) and makes it
    /// durable.
    fn write_directory_in_place(&self, dir: &BitmapDir) -> Result<()> {
        let Some(ext) = dir.ext else { return Err(Error::InvalidRequest("no bitmap directory".into())) };
        let bytes = bm::serialize_directory(&dir.recs.iter().map(|r| r.entry.clone()).collect::<Vec<_>>());
        self.sync.write_kind(crate::io::hook::WriteKind::Other, self.file.fd(), ext.directory_offset.0, &bytes)?;
        self.sync.fdatasync(self.file.fd())
    }

    /// Clean close: every tracked bitmap stored with `in_use` cleared.
    pub(super) fn store_bitmaps(&self, st: &mut MetaState) -> Result<()> {
        let mut dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        if dir.recs.iter().all(|r| r.live.is_none()) {
            return Ok(());
        }
        let mut plan = Vec::with_capacity(dir.recs.len());
        let old: Vec<u32> = dir.recs.iter().map(|r| r.entry.flags).collect();
        for r in dir.recs.iter_mut() {
            match &r.live {
                Some(l) => {
                    r.entry.flags &= !bm::FLAG_IN_USE;
                    plan.push(Store::Bits(l.clone()));
                }
                None => plan.push(Store::Keep),
            }
        }
        if let Err(e) = self.rewrite_directory(st, &mut dir, plan) {
            for (r, f) in dir.recs.iter_mut().zip(old) {
                r.entry.flags = f;
            }
            return Err(e);
        }
        for r in dir.recs.iter_mut() {
            r.live = None;
        }
        self.publish_live(&dir);
        Ok(())
    }

    /// Starts tracking `bits` as bitmap `name`: `in_use` on disk first.
    fn track(&self, dir: &mut BitmapDir, name: &str, bits: Arc<DirtyBitmap>) -> Result<()> {
        let i = index(dir, name)?;
        dir.recs[i].entry.flags |= bm::FLAG_IN_USE;
        let Some(ext) = dir.ext else { return Err(Error::InvalidRequest("no bitmap directory".into())) };
        let bytes = bm::serialize_directory(&dir.recs.iter().map(|r| r.entry.clone()).collect::<Vec<_>>());
        let r = self
            .sync
            .write_kind(crate::io::hook::WriteKind::Other, self.file.fd(), ext.directory_offset.0, &bytes)
            .and_then(|_| self.sync.fdatasync(self.file.fd()));
        if let Err(e) = r {
            dir.recs[i].entry.flags &= !bm::FLAG_IN_USE;
            return Err(e);
        }
        dir.recs[i].live = Some(bits);
        self.publish_live(dir);
        Ok(())
    }

    /// Rewrites bitmap `i`'s table and data with `bits`.
    fn replace_bits(&self, st: &mut MetaState, dir: &mut BitmapDir, i: usize, bits: Arc<DirtyBitmap>) -> Result<()> {
        let mut plan: Vec<Store> = dir.recs.iter().map(|_| Store::Keep).collect();
        plan[i] = Store::Bits(bits);
        self.rewrite_directory(st, dir, plan)
    }

    fn check_usable(&self, e: &DirEntry) -> Result<()> {
        if e.in_use() {
            return Err(inconsistent(&e.name));
        }
        if !e.usable() {
            return Err(Error::Unsupported(format!(
                "bitmap '{}' has extra data that is not flagged compatible: it can only be removed",
                e.name
            )));
        }
        Ok(())
    }

    /// Writes the bits of the bitmaps `plan` says to store in new clusters, then a new
    /// directory of `dir.recs`, makes them and their refcounts durable, points the header
    /// at the new directory (no bitmaps left: the extension and autoclear bit 0 go), and
    /// frees the old directory and the replaced tables and data.
    fn rewrite_directory(&self, st: &mut MetaState, dir: &mut BitmapDir, plan: Vec<Store>) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let io = self.meta_io();
        let mut freed: Vec<u64> = Vec::new();
        let mut entries: Vec<DirEntry> = dir.recs.iter().map(|r| r.entry.clone()).collect();
        // 1. Tables and data of the bitmaps to store.
        for (e, p) in entries.iter_mut().zip(&plan) {
            let Store::Bits(bits) = p else { continue };
            if e.table_offset.0 != 0 {
                freed.extend(used_clusters(&self.sync, self.file.fd(), cs, e, self.file_len())?);
            }
            let n = bm::table_size_for(bits.disk_size(), bits.granularity_bits(), cs);
            let mut table = Vec::with_capacity(n as usize);
            let mut buf = vec![0u8; cs as usize];
            for k in 0..n {
                bits.read_bytes(k * cs, &mut buf);
                if buf.iter().all(|&b| b == 0) {
                    table.push(TableEntry::Zeros.encode());
                    continue;
                }
                let c = st.rc.alloc_contiguous(&io, 1)?;
                self.note_end(st);
                self.sync.write_kind(crate::io::hook::WriteKind::Other, self.file.fd(), g.cluster_bytes(c), &buf)?;
                table.push(TableEntry::Data(HostOffset(g.cluster_bytes(c))).encode());
            }
            let tbytes = crate::format::bytes::to_be64_bytes(table);
            let c = st.rc.alloc_contiguous(&io, (tbytes.len() as u64).div_ceil(cs))?;
            self.note_end(st);
            self.sync.write_kind(crate::io::hook::WriteKind::Other, self.file.fd(), g.cluster_bytes(c), &tbytes)?;
            e.table_offset = HostOffset(g.cluster_bytes(c));
            e.table_size = n as u32;
        }
        // 2. The directory.
        let new_ext = if entries.is_empty() {
            None
        } else {
            let bytes = bm::serialize_directory(&entries);
            if bytes.len() as u64 > bm::MAX_DIRECTORY_SIZE {
                return Err(Error::InvalidRequest(format!(
                    "the bitmap directory would take {} bytes, more than the maximum of {}",
                    bytes.len(),
                    bm::MAX_DIRECTORY_SIZE
                )));
            }
            let c = st.rc.alloc_contiguous(&io, (bytes.len() as u64).div_ceil(cs))?;
            self.note_end(st);
            self.sync.write_kind(crate::io::hook::WriteKind::Other, self.file.fd(), g.cluster_bytes(c), &bytes)?;
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: HostOffset(g.cluster_bytes(c)),
            })
        };
        // 3. Everything durable (refcounts included) before the header names it.
        self.flush_metadata(st, true, &self.counters)?;
        Counters::add(&self.counters.device_flushes, 1);
        self.sync.fdatasync(self.file.fd())?;
        self.update_header(&self.counters, |h| set_extension(h, new_ext))?;
        if let Some(old) = dir.ext {
            let first = old.directory_offset.0 / cs;
            freed.extend(first..first + old.directory_size.div_ceil(cs));
        }
        dir.ext = new_ext;
        for (r, e) in dir.recs.iter_mut().zip(entries) {
            r.entry = e;
        }
        // 4. The old clusters.
        self.free_clusters(st, &freed)
    }

    fn free_clusters(&self, st: &mut MetaState, clusters: &[u64]) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let mut refs = Refs::new();
        for &c in clusters {
            *refs.entry(c).or_default() += 1;
        }
        self.apply_decrements(st, &refs)
    }
}

/// Sets (or, with None, removes) the bitmaps extension and autoclear bit 0. A new
/// extension goes after the feature name table, where QEMU writes it.
fn set_extension(h: &mut Header, ext: Option<BitmapsExt>) {
    let at = h.extensions.iter().position(|e| e.kind == EXT_BITMAPS);
    h.extensions.retain(|e| e.kind != EXT_BITMAPS);
    match ext {
        Some(x) => {
            let pos = at.unwrap_or_else(|| {
                h.extensions.iter().position(|e| e.kind == EXT_FEATURE_TABLE).map_or(h.extensions.len(), |p| p + 1)
            });
            h.extensions.insert(pos.min(h.extensions.len()), x.to_extension());
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        None => h.autoclear_features &= !AUTOCLEAR_BITMAPS,
    }
}

fn index(dir: &BitmapDir, name: &str) -> Result<usize> {
    dir.recs
        .iter()
        .position(|r| r.entry.name == name)
        .ok_or_else(|| Error::InvalidRequest(format!("Dirty bitmap '{name}' not found")))
}

pub(super) fn find<'a>(dir: &'a BitmapDir, name: &str) -> Result<&'a Rec> {
    Ok(&dir.recs[index(dir, name)?])
}

pub(super) fn inconsistent(name: &str) -> Error {
    Error::InvalidRequest(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}
