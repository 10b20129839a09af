//! The shared [`Image`]: opened once, used by every [`Queue`](crate::queue::Queue).
//!
//! Opening reads the header, the active L1 table and the snapshot table through io_uring
//! with O_DIRECT, validates them, and opens the backing chain (qcow2 or raw files, relative
//! names resolved against the directory of the image that names them, as QEMU does).

use crate::counters::{CounterSnapshot, Counters};
use crate::format::header::{CompressionType, Header};
use crate::format::l1::{self, L1Entry};
use crate::format::snapshot::{self, Snapshot};
use crate::format::{Geometry, feature};
use crate::io::lock::{ImageLock, LockMode};
use crate::io::{ImageFile, SyncRing};
use crate::meta::MetaCache;
use crate::meta::overlap::OverlapMap;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Deepest backing chain accepted (protects against loops).
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Default upper bound of the L2 cache (QEMU's default maximum).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// How writes complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// A write completes when its data is on the device; metadata reaches the disk at flush.
    #[default]
    Writeback,
    /// A write completes only when it and its metadata are durable.
    Writethrough,
}

/// What to do with the backing chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Open the whole chain.
    #[default]
    Open,
    /// Do not open backing files: unallocated ranges read as zeros (`qemu-img -U`-like tools
    /// that only inspect one layer).
    Ignore,
}

/// Options for [`Image::open`]. Cache sizes are named as QEMU's runtime options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode for writes.
    pub cache: CacheMode,
    /// `l2-cache-size` in bytes (None: enough for the whole image, at most 32 MiB). Capped
    /// at what the image can use, as QEMU does (see `cache_sizes`): any value is accepted,
    /// and one that is still larger than the machine's memory fails the open.
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes (None: a quarter of the L2 cache, at least 256 KiB),
    /// capped at what the image can use.
    pub refcount_cache_size: Option<u64>,
    /// `l2-cache-entry-size` in bytes (None: min(cluster size, 4 KiB)).
    pub l2_cache_entry_size: Option<u64>,
    /// Share the image with other users (`-U`): no write lock expected.
    pub force_share: bool,
    /// Backing chain policy.
    pub backing: BackingPolicy,
    /// Test hook that sees (and may fail) every device write and flush.
    pub hook: Option<crate::io::hook::Hook>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            cache: CacheMode::Writeback,
            l2_cache_size: None,
            refcount_cache_size: None,
            l2_cache_entry_size: None,
            force_share: false,
            backing: BackingPolicy::Open,
            hook: None,
        }
    }
}

/// A raw backing file.
pub struct RawBacking {
    /// The file.
    pub file: ImageFile,
    /// Its size (reads beyond it are zeros).
    pub size: u64,
}

/// The layer below an image.
pub enum Backing {
    /// A qcow2 image.
    Qcow2(Arc<Image>),
    /// A raw file.
    Raw(RawBacking),
}

/// Metadata state that writers change under the image's metadata mutex (see
/// [`crate::meta::refcount`]): refcounts, the L1/dirty-bit bookkeeping.
pub(crate) struct MetaState {
    pub rc: crate::meta::refcount::Refcounts,
    /// The in-memory L1 table has entries not yet written.
    pub l1_dirty: bool,
    /// Lazy refcounts (compatible bit 0) are in use.
    pub lazy: bool,
    /// The dirty bit is set on disk.
    pub dirty_bit_set: bool,
    /// close() already ran.
    pub closed: bool,
    /// The file length this session last extended the file to ahead of allocation (0: it
    /// has not; see [`Image::grow_ahead`]).
    pub grown_to: u64,
}

/// An open qcow2 image, shared by all queues (wrap in `Arc`).
pub struct Image {
    pub(crate) file: ImageFile,
    pub(crate) sync: SyncRing,
    pub(crate) header: Mutex<Header>,
    pub(crate) geo: Geometry,
    /// Virtual size (grows with [`Image::resize`]).
    pub(crate) size: AtomicU64,
    pub(crate) compression: CompressionType,
    pub(crate) l1: Box<[AtomicU64]>,
    pub(crate) l2_cache: MetaCache,
    /// L2 entries per cache slot.
    pub(crate) slice_entries: u64,
    pub(crate) backing: Option<Backing>,
    pub(crate) file_len: AtomicU64,
    /// Length of the file when it was opened.
    pub(crate) opened_len: u64,
    pub(crate) snapshots: Vec<Snapshot>,
    /// Counts of work done outside any queue, plus those of queues that are gone.
    pub(crate) counters: Counters,
    /// The counters of the live queues.
    pub(crate) queue_counters: Mutex<Vec<Arc<Counters>>>,
    pub(crate) read_only: bool,
    pub(crate) opts: Options,
    pub(crate) depth: usize,
    /// QEMU's "metadata preallocation" detection result (block status only).
    pub(crate) prealloc_detected: std::sync::OnceLock<bool>,
    /// Writer state (None when read-only).
    pub(crate) meta: Option<Mutex<MetaState>>,
    /// Data writes submitted and not completed, over all queues (a freed cluster may be
    /// reused only when none is in flight).
    pub(crate) writes_in_flight: AtomicU64,
    /// The cache mode.
    pub(crate) cache_mode: CacheMode,
    /// QEMU-compatible image lock, held while open.
    _lock: ImageLock,
    /// quring's L2-less ranges are enabled (incompatible bit 61).
    pub(crate) l2less: bool,
    /// Test hook on device writes (see [`crate::io::hook`]).
    pub(crate) hook: Option<crate::io::hook::Hook>,
    /// Header version (2 or 3), kept out of the header mutex for the hot paths.
    pub(crate) version: u32,
    /// The corrupt bit (incompatible bit 1) is set: writes are refused.
    pub(crate) corrupt: std::sync::atomic::AtomicBool,
    /// A corruption event was already reported (QEMU: "further corruption events will be
    /// suppressed").
    pub(crate) signaled: std::sync::atomic::AtomicBool,
    /// The metadata clusters guest data must never be placed on ([`crate::meta::overlap`]).
    pub(crate) overlap: Arc<OverlapMap>,
    /// Host clusters that an allocation job is filling in place (subclusters of an owned
    /// cluster, a preallocated zero cluster): a second job for the same cluster waits, so
    /// two copy-on-write fills never overwrite each other's data.
    pub(crate) fill_busy: Mutex<std::collections::HashSet<u64>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("path", &self.file.path()).field("size", &self.vsize()).finish()
    }
}

impl Image {
    /// Opens a qcow2 image and its backing chain.
    pub fn open(path: &Path, opts: &Options) -> Result<Arc<Image>> {
        Self::open_at_depth(path, opts, 0)
    }

    fn open_at_depth(path: &Path, opts: &Options, depth: usize) -> Result<Arc<Image>> {
        if depth > MAX_CHAIN_DEPTH {
            return Err(Error::InvalidRequest(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH} at '{}' (a loop?)",
                path.display()
            )));
        }
        let file = ImageFile::open(path, !opts.read_only)?;
        // QEMU's file locking protocol: two writers never open one image, and QEMU tools
        // refuse an image quring writes (and the other way round).
        let mode = if opts.read_only { LockMode::ReadOnly } else { LockMode::ReadWrite };
        let lock = ImageLock::acquire(file.file(), path, mode, opts.force_share && opts.read_only)?;
        let sync = SyncRing::with_hook(opts.hook.clone())?;
        let file_len = file.len()?;
        let (first, valid) = sync.read(file.fd(), 0, 4096)?;
        let cluster_size = Header::peek_cluster_size(&first[..valid])?;
        let (c0, valid) = sync.read(file.fd(), 0, cluster_size as usize)?;
        let header = Header::parse(&c0[..valid], file_len)?;
        let geo = header.geometry();
        let read_only = opts.read_only;
        if !read_only && header.incompatible_features & feature::INCOMPAT_CORRUPT != 0 {
            return Err(Error::InvalidRequest(
                "the image is marked corrupt (incompatible bit 1): it can only be opened read-only \
                 until it is repaired (qemu-img check -r all)"
                    .into(),
            ));
        }

        // Active L1 table.
        let l1_bytes = header.l1_size as usize * 8;
        let raw_l1 = if l1_bytes > 0 {
            sync.read_exact(file.fd(), header.l1_table_offset.0, l1_bytes, "L1 table")?
        } else {
            Vec::new()
        };
        let l2less = header.incompatible_features & feature::INCOMPAT_L2LESS != 0;
        let l2less_bit = l2less;
        let entries = l1::decode_table(&raw_l1);
        for (i, e) in entries.iter().enumerate() {
            if e.0 != 0 {
                e.validate(i as u64, geo.cluster_size(), l2less)?;
            }
        }
        // Room in memory for the L1 table to grow (Image::resize) up to 8x the size,
        // within QEMU's L1 limit.
        let cap = geo
            .l1_entries_for(header.size.saturating_mul(8))
            .unwrap_or(0)
            .clamp(entries.len() as u64, crate::format::geometry::MAX_L1_BYTES / 8)
            .min(entries.len() as u64 + (1 << 16)) as usize;
        let l1: Box<[AtomicU64]> =
            (0..cap.max(entries.len())).map(|i| AtomicU64::new(entries.get(i).map_or(0, |e| e.0))).collect();

        // Snapshot table (bounded reads: each entry's size is validated before use).
        let (snapshots, snapshot_table_bytes) = read_snapshots(&sync, &file, &header, file_len)?;

        // L2 cache geometry.
        let entry_size = match opts.l2_cache_entry_size {
            Some(s) => {
                if !s.is_power_of_two() || s < 512 || s > geo.cluster_size() {
                    return Err(Error::InvalidRequest(format!(
                        "l2-cache-entry-size {s} must be a power of two between 512 and the cluster size {}",
                        geo.cluster_size()
                    )));
                }
                s
            }
            None => geo.cluster_size().min(4096),
        };
        let (l2_bytes, rc_bytes) = cache_sizes(&geo, header.size, file_len, entry_size, opts)?;
        let l2_cache = MetaCache::new(l2_bytes, entry_size as usize);
        let slice_entries = entry_size / geo.l2_entry_size();

        // Backing chain.
        let backing = if opts.backing == BackingPolicy::Ignore {
            None
        } else if let Some(name) = &header.backing_file {
            Some(open_backing(path, name, header.backing_format().as_deref(), opts, depth)?)
        } else {
            None
        };

        // Writer state: refcounts, lazy-refcount bookkeeping, autoclear bits.
        let mut header = header;
        if !read_only {
            if header.incompatible_features & feature::INCOMPAT_DIRTY != 0 {
                // Lazy refcounts were in use when the image was last left: refcounts may
                // be stale. Rebuild them before the first write.
                crate::meta::rebuild::rebuild_refcounts(&sync, &file, &mut header)?;
            }
            if header.autoclear_features != 0 && header.version >= 3 {
                // Autoclear bits we do not maintain (bitmaps, unknown ones) are cleared on
                // the first read-write open, as the spec requires.
                header.autoclear_features = 0;
                write_header(&sync, file.fd(), &mut header)?;
            }
        }
        let file_len = file.len()?; // a rebuild may have grown the file

        // The refcount table (in every mode: the overlap checks need the refcount blocks),
        // and the record of metadata clusters.
        let rt_bytes = header.refcount_table_clusters as usize * geo.cluster_size() as usize;
        let reftable: Vec<u64> = sync
            .read_exact(file.fd(), header.refcount_table_offset.0, rt_bytes, "refcount table")?
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let overlap =
            Arc::new(OverlapMap::build(&geo, &header, &entries, &reftable, &snapshots, snapshot_table_bytes, file_len));

        let meta = if read_only {
            None
        } else {
            // A refcount block on other metadata or past the end of the file would be
            // written over it at the first allocation: mark the image corrupt now.
            if let Err(e) = crate::meta::overlap::check_reftable(&geo, &overlap, &reftable, file_len) {
                return Err(mark_corrupt_at_open(&sync, file.fd(), &mut header, e));
            }
            let rc = crate::meta::refcount::Refcounts::open(
                geo,
                reftable,
                header.refcount_table_offset.0,
                header.refcount_table_clusters as u64,
                file_len,
                rc_bytes,
                overlap.clone(),
            )?;
            Some(Mutex::new(MetaState {
                rc,
                l1_dirty: false,
                lazy: header.lazy_refcounts(),
                dirty_bit_set: false,
                closed: false,
                grown_to: 0,
            }))
        };

        let file_len = file.len()?;
        let img = Arc::new(Image {
            size: AtomicU64::new(header.size),
            compression: header.compression_type,
            geo,
            file,
            sync,
            l1,
            l2_cache,
            slice_entries,
            backing,
            file_len: AtomicU64::new(file_len),
            opened_len: file_len,
            snapshots,
            counters: Counters::default(),
            queue_counters: Mutex::new(Vec::new()),
            read_only,
            opts: opts.clone(),
            depth,
            prealloc_detected: std::sync::OnceLock::new(),
            meta,
            writes_in_flight: AtomicU64::new(0),
            cache_mode: opts.cache,
            _lock: lock,
            fill_busy: Mutex::new(std::collections::HashSet::new()),
            l2less: l2less_bit,
            hook: opts.hook.clone(),
            version: header.version,
            corrupt: std::sync::atomic::AtomicBool::new(header.incompatible_features & feature::INCOMPAT_CORRUPT != 0),
            signaled: std::sync::atomic::AtomicBool::new(false),
            overlap,
            header: Mutex::new(header),
        });
        if let Err(e) = img.check_contiguous_ranges() {
            return Err(img.signal_corruption(e));
        }
        Ok(img)
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.vsize()
    }

    /// The virtual size (hot paths).
    #[inline]
    pub(crate) fn vsize(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512), like
    /// `qemu-img resize`: the L1 table grows (moved to new clusters, written and made
    /// durable before the header points to it) and the new range reads as zeros.
    /// Shrinking is refused. Blocks the caller for the metadata updates.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let Some(m) = &self.meta else {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        };
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidRequest(format!("new size {new_size} is not a multiple of 512")));
        }
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
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
            self.sync.write_kind(crate::io::hook::WriteKind::L1, self.file.fd(), c << g.cluster_bits, &bytes)?;
            self.sync.fdatasync(self.file.fd())?;
            let old_off = h.l1_table_offset.0;
            let old_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
            h.l1_table_offset = crate::format::HostOffset(c << g.cluster_bits);
            h.l1_size = need as u32;
            for i in 0..old_clusters {
                st.rc.free_later((old_off >> g.cluster_bits) + i, 1);
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

    /// The image geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.header.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The open image file (tools compare it with other files by device and inode, e.g. to
    /// refuse to overwrite a file of an image's own backing chain).
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    /// The backing layer, if any.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// Is the image open read-only?
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The options it was opened with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Counters of the whole image: every queue's (live or gone) plus the work done
    /// outside queues, with the shared cache's evictions. [`crate::queue::Queue::counters`]
    /// has one queue's.
    pub fn counters(&self) -> CounterSnapshot {
        let mut s = self.counters.snapshot();
        for q in self.queue_counters.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            s.accumulate(&q.snapshot());
        }
        s.l2_evictions = self.l2_cache.evictions();
        s
    }

    /// A new queue's counters join the image's sum.
    pub(crate) fn register_queue_counters(&self, c: &Arc<Counters>) {
        self.queue_counters.lock().unwrap_or_else(|e| e.into_inner()).push(c.clone());
    }

    /// A queue is gone: its counts move into the image's own.
    pub(crate) fn retire_queue_counters(&self, c: &Arc<Counters>) {
        let mut list = self.queue_counters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().position(|x| Arc::ptr_eq(x, c)) {
            list.swap_remove(i);
            self.counters.absorb(&c.snapshot());
        }
    }

    /// Current L1 entry `i` (0 when out of range).
    #[inline]
    pub(crate) fn l1_entry(&self, i: u64) -> L1Entry {
        self.l1.get(i as usize).map(|a| L1Entry(a.load(Ordering::Acquire))).unwrap_or_default()
    }

    /// Reads host bytes synchronously (tools: check, map of metadata).
    pub fn read_host(&self, off: u64, len: usize) -> Result<(Vec<u8>, usize)> {
        self.sync.read(self.file.fd(), off, len)
    }

    /// Length of the image file.
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Does the image use quring's L2-less ranges (incompatible bit 61)?
    pub fn l2_less(&self) -> bool {
        self.l2less
    }

    /// Virtual-disk clusters of L1 range `i` (what a contiguous extent covers).
    pub(crate) fn range_clusters(&self, i: u64) -> u64 {
        let g = &self.geo;
        let start = i.saturating_mul(g.l1_coverage());
        let end = start.saturating_add(g.l1_coverage()).min(self.vsize());
        end.saturating_sub(start).div_ceil(g.cluster_size())
    }

    /// Depth of this image in its chain (0 = top).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Makes every completed write durable (metadata write-back in dependency order plus
    /// device flushes). Blocks the calling thread; queues use [`Op::Flush`](crate::queue::Op)
    /// instead.
    pub fn flush(&self) -> Result<()> {
        let Some(m) = &self.meta else { return Ok(()) };
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_metadata(&mut st, false, &self.counters)
    }

    /// Flushes metadata and closes the image cleanly (clears the lazy-refcount dirty bit).
    /// Call when the last queue is gone; dropping the last `Arc` does it too, ignoring
    /// errors.
    pub fn close(&self) -> Result<()> {
        let Some(m) = &self.meta else { return Ok(()) };
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            return Ok(());
        }
        self.close_metadata(&mut st)?;
        st.closed = true;
        Ok(())
    }

    /// The cache mode writes use.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache_mode
    }

    /// The engine's one header-update path: applies `f` to a copy of the header, writes it
    /// to cluster 0 and flushes the device, all under the header mutex (so that two updates
    /// never reach the disk in the wrong order), and keeps the copy only when it is on disk.
    pub(crate) fn update_header(&self, cnt: &Counters, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut cur = self.header.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = cur.clone();
        f(&mut h);
        let n = write_header(&self.sync, self.file.fd(), &mut h)?;
        Counters::add(&cnt.header_writes, 1);
        Counters::add(&cnt.l1_header_write_bytes, n as u64);
        Counters::add(&cnt.device_flushes, 1);
        *cur = h;
        Ok(())
    }

    /// QEMU's `qcow2_signal_corruption` for a fatal event: metadata found on the way to a
    /// write would make that write (or a later one) damage the image. When the image is open
    /// for writing and not marked yet, writes are refused from now on, incompatible bit 1
    /// ("corrupt") is set in the on-disk header through [`Image::update_header`], and the
    /// event is reported on stderr with QEMU's wording; later events are not reported again.
    /// A read-only image is left alone, as QEMU downgrades the event to non-fatal there.
    /// Returns the error for the request, saying whether the image was marked. Errors other
    /// than [`Error::Corrupt`] pass through.
    pub(crate) fn signal_corruption(&self, e: Error) -> Error {
        use std::sync::atomic::Ordering::AcqRel;
        let Error::Corrupt { what, detail } = e else { return e };
        if self.read_only || self.meta.is_none() || self.signaled.swap(true, AcqRel) {
            return Error::Corrupt { what, detail };
        }
        // First: no new write starts (check_writable).
        self.corrupt.store(true, std::sync::atomic::Ordering::Release);
        let marked = if self.version >= 3 {
            let r = self.update_header(&self.counters, |h| h.incompatible_features |= feature::INCOMPAT_CORRUPT);
            if r.is_err() {
                // Keep the bit in memory: any later header write carries it.
                self.header.lock().unwrap_or_else(|e| e.into_inner()).incompatible_features |=
                    feature::INCOMPAT_CORRUPT;
            }
            r
        } else {
            Ok(())
        };
        corruption_event(what, detail, self.version, marked)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            eprintln!("quring: closing '{}' failed: {e}", self.path().display());
        }
    }
}

/// Creates a new qcow2 image at `path` exactly as `qemu-img create` would lay it out
/// ([`crate::format::layout`]), writing through io_uring with O_DIRECT. Fails if the file
/// exists and `overwrite` is false.
///
/// An existing file is truncated only once QEMU's write lock on it is held (as qemu-img
/// does): an image that another process (or another open in this one) uses fails with
/// [`Error::Locked`] ("Failed to get \"write\" lock") and keeps every byte.
pub fn create(path: &Path, o: &crate::format::layout::CreateOptions, overwrite: bool) -> Result<()> {
    use crate::format::layout::{Preallocation, plan_create};
    use std::os::unix::fs::OpenOptionsExt;
    let plan = plan_create(o)?;
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true).custom_flags(libc::O_CLOEXEC);
    if overwrite {
        oo.create(true);
    } else {
        oo.create_new(true);
    }
    let f = oo.open(path).map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
    // Held until the image is written: nobody opens it half made either.
    let _lock = ImageLock::acquire(&f, path, LockMode::ReadWrite, false)?;
    f.set_len(0).map_err(|e| Error::io(format!("Could not truncate '{}'", path.display()), e))?;
    let file = ImageFile::open(path, true)?;
    let sync = SyncRing::new()?;
    for (off, bytes) in &plan.writes {
        sync.write(file.fd(), *off, bytes)?;
    }
    match o.preallocation {
        Preallocation::Falloc => {
            for &(off, len) in &plan.data_ranges {
                sync.fallocate(file.fd(), off, len, 0)?;
            }
        }
        Preallocation::Full => {
            let chunk = crate::io::AlignedBuf::new(8 << 20);
            for &(off, len) in &plan.data_ranges {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(chunk.len() as u64) as usize;
                    sync.write(file.fd(), off + done, &chunk[..n])?;
                    done += n as u64;
                }
            }
        }
        _ => {}
    }
    file.file().set_len(plan.file_len).map_err(|e| Error::io("ftruncate", e))?;
    sync.fdatasync(file.fd())?;
    Ok(())
}

/// The L2 and refcount cache sizes in bytes for an image of `vsize` bytes in a file of
/// `file_len` bytes, from the options, as QEMU's `read_cache_sizes` does it: a cache is never
/// larger than what the image can use, whatever the option says.
///
/// * L2: what the image can use is room for every L2 slice of the whole disk, twice over
///   (the cache is set-associative) plus one set. The default is that, at most
///   [`DEFAULT_L2_CACHE_MAX`]; an `l2-cache-size` above it is cut down to it (QEMU caps at the
///   L2 tables of the whole disk). What remains is allocated at open, so a size larger than
///   the machine's memory is refused ("L2 cache size too big") instead of aborting.
/// * Refcounts: what the image can use is the refcount blocks covering a file of
///   `file_len + 2 * vsize` bytes (the file as it is plus a fully allocated disk and its
///   metadata, or a second copy for snapshots), at least 4 clusters. The default is a quarter
///   of the L2 cache, at least 256 KiB, within that. (The refcount cache only holds blocks
///   it has read, so this bounds a count, not an allocation.)
pub(crate) fn cache_sizes(
    geo: &Geometry,
    vsize: u64,
    file_len: u64,
    entry_size: u64,
    opts: &Options,
) -> Result<(u64, u64)> {
    let whole = geo.clusters_for(vsize).saturating_mul(geo.l2_entry_size());
    let l2_need = whole.saturating_mul(2).saturating_add(crate::meta::cache::WAYS as u64 * entry_size).max(entry_size);
    let l2 = match opts.l2_cache_size {
        Some(s) => s.min(l2_need),
        None => l2_need.min(DEFAULT_L2_CACHE_MAX),
    };
    if let Some(mem) = crate::io::buf::physical_memory()
        && l2 > mem
    {
        return Err(Error::InvalidRequest(format!(
            "L2 cache size too big: l2-cache-size {} makes a {l2}-byte cache for this image (whose L2 \
             tables need {l2_need}), more than this machine's memory ({mem} bytes)",
            opts.l2_cache_size.unwrap_or(l2)
        )));
    }
    let host = file_len.saturating_add(vsize.saturating_mul(2));
    let blocks = geo.clusters_for(host).div_ceil(geo.refblock_entries()).max(4);
    let rc_need = blocks.saturating_mul(geo.cluster_size());
    let rc = opts.refcount_cache_size.unwrap_or((l2 / 4).max(256 << 10)).min(rc_need);
    Ok((l2, rc))
}

/// Serializes `h` and writes it to cluster 0, then flushes the device (the header write of
/// every header update). Returns the number of bytes written.
fn write_header(sync: &SyncRing, fd: i32, h: &mut Header) -> Result<usize> {
    let bytes = h.serialize()?;
    sync.write_kind(crate::io::hook::WriteKind::Header, fd, 0, &bytes)?;
    sync.fdatasync(fd)?;
    Ok(bytes.len())
}

/// The message of a corruption event: QEMU prints "qcow2: Marking image as corrupt: ...;
/// further corruption events will be suppressed" on stderr, and so does quring (once per
/// image); the returned error says whether the mark reached the disk.
fn corruption_event(what: &'static str, detail: String, version: u32, marked: Result<()>) -> Error {
    eprintln!("qcow2: Marking image as corrupt: {what}: {detail}; further corruption events will be suppressed");
    let detail = match marked {
        Ok(()) if version >= 3 => {
            format!(
                "{detail}; the image has been marked corrupt (incompatible bit 1) and can now only be opened read-only"
            )
        }
        Ok(()) => format!(
            "{detail}; the image is treated as corrupt, but a version 2 header cannot record the corrupt bit on disk"
        ),
        Err(e) => format!("{detail}; writes to the image are refused, but marking it corrupt on disk failed: {e}"),
    };
    Error::Corrupt { what, detail }
}

/// A corruption found while opening an image for writing (before the [`Image`] exists):
/// sets the corrupt bit in the header on disk, like [`Image::signal_corruption`].
fn mark_corrupt_at_open(sync: &SyncRing, fd: i32, h: &mut Header, e: Error) -> Error {
    let Error::Corrupt { what, detail } = e else { return e };
    let marked = if h.version >= 3 {
        h.incompatible_features |= feature::INCOMPAT_CORRUPT;
        write_header(sync, fd, h).map(|_| ())
    } else {
        Ok(())
    };
    corruption_event(what, detail, h.version, marked)
}

/// Reads the snapshot table; returns the snapshots and the table's length in bytes.
fn read_snapshots(sync: &SyncRing, file: &ImageFile, h: &Header, file_len: u64) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset.0;
    for i in 0..h.nb_snapshots {
        if off.checked_add(snapshot::FIXED_LEN as u64).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(
                "snapshot table",
                format!("entry {i} at {off:#x} lies past the end of the file"),
            ));
        }
        let fixed = sync.read_exact(file.fd(), off, snapshot::FIXED_LEN, "snapshot table")?;
        let len = snapshot::entry_len(&fixed)?;
        let buf = sync.read_exact(file.fd(), off, len, "snapshot table")?;
        let (s, padded) = snapshot::parse_entry(&buf)?;
        if s.l1_size as u64 * 8 > crate::format::geometry::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "snapshot L1 size",
                format!("snapshot '{}' has {} L1 entries, more than the limit", s.name, s.l1_size),
            ));
        }
        if !h.geometry().is_cluster_aligned(s.l1_table_offset.0) {
            return Err(Error::corrupt(
                "snapshot L1 offset",
                format!("snapshot '{}' L1 table offset {:#x} is not cluster aligned", s.name, s.l1_table_offset.0),
            ));
        }
        out.push(s);
        off += padded as u64;
    }
    Ok((out, off - h.snapshots_offset.0))
}

/// Resolves a backing file name like QEMU: absolute names as they are, relative names
/// against the directory of the image that names them.
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

fn open_backing(image: &Path, name: &str, fmt: Option<&str>, opts: &Options, depth: usize) -> Result<Backing> {
    let path = resolve_backing_path(image, name);
    let bopts = Options { read_only: true, ..opts.clone() };
    let fmt = match fmt {
        Some(f) => f.to_string(),
        None => probe_format(&path)?,
    };
    match fmt.as_str() {
        "qcow2" => {
            Ok(Backing::Qcow2(Image::open_at_depth(&path, &bopts, depth + 1).map_err(|e| {
                Error::InvalidRequest(format!("Could not open backing file '{}': {e}", path.display()))
            })?))
        }
        "raw" => {
            let file = ImageFile::open(&path, false)
                .map_err(|e| Error::InvalidRequest(format!("Could not open backing file '{}': {e}", path.display())))?;
            let size = file.len()?;
            Ok(Backing::Raw(RawBacking { file, size }))
        }
        other => Err(Error::Unsupported(format!("backing file format '{other}' (only qcow2 and raw are supported)"))),
    }
}

/// Guesses a file's format from its first bytes (qcow2 magic, else raw), as QEMU's probe.
pub fn probe_format(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::io(format!("read '{}'", path.display()), e))?;
    Ok(if n == 4 && u32::from_be_bytes(magic) == crate::format::header::MAGIC { "qcow2".into() } else { "raw".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(cluster_bits: u32, vsize: u64, l2: Option<u64>, rc: Option<u64>) -> Result<(u64, u64)> {
        let geo = Geometry::new(cluster_bits, false, 4).unwrap();
        let opts = Options { l2_cache_size: l2, refcount_cache_size: rc, ..Options::default() };
        cache_sizes(&geo, vsize, 0, geo.cluster_size().min(4096), &opts)
    }

    #[test]
    fn caches_are_capped_at_what_the_image_can_use() {
        // 16 MiB of 64 KiB clusters: 256 L2 entries (2 KiB), twice over plus a set of 4 KiB
        // slices.
        let need = 2 * 2048 + crate::meta::cache::WAYS as u64 * 4096;
        assert_eq!(sizes(16, 16 << 20, None, None).unwrap().0, need);
        for asked in [2 << 30, 8 << 30, 1 << 40, u64::MAX] {
            let (l2, rc) = sizes(16, 16 << 20, Some(asked), Some(asked)).unwrap();
            assert_eq!(l2, need, "l2-cache-size {asked}");
            // 16 MiB + 32 MiB of 64 KiB clusters fit in one refcount block: 4 clusters minimum.
            assert_eq!(rc, 4 << 16, "refcount-cache-size {asked}");
        }
        // Smaller than the need: taken as is.
        assert_eq!(sizes(16, 16 << 20, Some(4096), None).unwrap().0, 4096);
        // The default stays at 32 MiB for large disks.
        assert_eq!(sizes(16, 1 << 50, None, None).unwrap().0, DEFAULT_L2_CACHE_MAX);
    }

    #[test]
    fn a_cache_larger_than_memory_is_an_error() {
        // 2^60 bytes of 512-byte clusters would need 2^54 bytes of L2 tables.
        let e = sizes(9, 1 << 60, Some(1 << 53), None).unwrap_err();
        assert!(e.to_string().contains("L2 cache size too big"), "{e}");
    }
}
