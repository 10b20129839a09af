//! The shared [`Image`]: opened once, used by every [`Queue`](crate::queue::Queue).
//!
//! Opening reads the header, the active L1 table and the snapshot table through io_uring
//! with O_DIRECT, validates them, and opens the backing chain (qcow2 or raw files, relative
//! names resolved against the directory of the image that names them, as QEMU does).
//!
//! Every `impl Image` lives in this folder, one concern per file:
//! [`mapping`] (guest -> host through L1 and the L2 cache), `alloc` (host clusters for
//! writers, L2 tables, L2-less extents), `writeback` (metadata write-back in dependency
//! order), `overlap` (metadata overlap checks on the live image), [`status`] (block status).

mod alloc;
pub mod amend;
mod audit;
mod backing;
pub mod bitmap_export;
pub mod bitmaps;
mod cache_sizes;
mod clean;
pub(crate) mod compressed;
mod create;
pub mod data_file;
pub(crate) mod epoch;
mod header;
mod identity;
pub mod mapping;
mod open;
mod overlap;
mod resize;
mod slices;
pub mod snapshot;
mod snapshot_refs;
pub mod status;
pub(crate) mod writeback;

pub(crate) use alloc::FREED_BOUND;
pub(crate) use slices::SliceClaim;

pub use amend::{Amend, amend};
pub use backing::NewBacking;
pub use bitmap_export::BitmapView;
pub use bitmaps::BitmapInfo;
pub use create::create;
pub use data_file::DataFile;
pub use identity::{find_by_guid, header_guid};
pub use open::{probe_format, resolve_backing_path};
pub use snapshot::NewSnapshot;

use crate::counters::{CounterSnapshot, Counters};
use crate::format::Geometry;
use crate::format::header::{CompressionType, Header};
use crate::format::l1::L1Entry;
use crate::format::snapshot::Snapshot;
use crate::io::lock::ImageLock;
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

/// What opening an image does when its external data file cannot be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DataFilePolicy {
    /// The open fails (every tool that reads or writes guest data).
    #[default]
    Require,
    /// A read-only open goes on without it, as QEMU opens an image for `qemu-img info`
    /// (`BDRV_O_NO_IO`): the metadata can be described, but no queue can be made
    /// ([`Image::data_file_unavailable`]). A writable open still fails.
    MetadataOnly,
}

/// What opening a chain does with the GUIDs of quring's identity extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IdentityPolicy {
    /// A backing image whose GUID differs from the recorded one is refused (or searched
    /// for in [`Options::backing_search`]).
    #[default]
    Check,
    /// GUIDs are not compared (`-o backing-identity=ignore`); the backing length still
    /// applies.
    Ignore,
}

/// Most directory entries [`Options::backing_search`] looks at per directory.
pub const MAX_SEARCH_ENTRIES: usize = 4096;

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
    /// `l2-cache-entry-size` in bytes (None: min(cluster size, 4 KiB), or 512 bytes when
    /// the L2 cache cannot hold every L2 table of the disk: see `cache_sizes.rs`).
    pub l2_cache_entry_size: Option<u64>,
    /// Share the image with other users (`-U`): no write lock expected.
    pub force_share: bool,
    /// Backing chain policy.
    pub backing: BackingPolicy,
    /// Test hook that sees (and may fail) every device write and flush.
    pub hook: Option<crate::io::hook::Hook>,
    /// `cache-clean-interval`: L2 slices unused for this long are dropped and their memory
    /// given back (QEMU's default on Linux: 600 s; None: never). The queues do it as they
    /// run; an idle image is cleaned by [`Image::clean_cache`] (e.g. from a VMM's timer).
    pub cache_clean_interval: Option<std::time::Duration>,
    /// Whether the backing images' GUIDs are checked against the ones an image recorded
    /// (quring's identity extension, docs/identity.md).
    pub backing_identity: IdentityPolicy,
    /// Directories searched for a backing image that is missing or has another GUID
    /// (`--backing-search`): the file whose identity carries the recorded GUID is opened
    /// instead. Only the first 64 KiB of each file are read, at most [`MAX_SEARCH_ENTRIES`]
    /// entries per directory.
    pub backing_search: Vec<PathBuf>,
    /// The largest virtual size a live [`crate::queue::Queue::resize`] may grow to without
    /// reopening (the in-memory L1 table is sized for it). None: 8 times the size at open.
    pub l1_room: Option<u64>,
    /// What to do when the external data file cannot be opened (backing images always
    /// require theirs).
    pub data_file: DataFilePolicy,
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
            cache_clean_interval: Some(std::time::Duration::from_secs(600)),
            l1_room: None,
            backing_identity: IdentityPolicy::Check,
            backing_search: Vec::new(),
            data_file: DataFilePolicy::Require,
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
    /// Compressed writes: the next free byte in the host cluster they fill, and the bytes of
    /// its 512-byte sector written so far (see `compressed.rs`; 0: start a new cluster).
    pub ctail: compressed::Tail,
}

/// A queue's owed refcount decrements, (host cluster, count) pairs (see `Queue::local_frees`).
pub(crate) type OwedFrees = Arc<Mutex<Vec<(u64, u64)>>>;

/// An open qcow2 image, shared by all queues (wrap in `Arc`).
pub struct Image {
    pub(crate) file: ImageFile,
    /// The external data file (incompatible bit 2), where guest data lives ([`data_file`]).
    pub(crate) data_file: Option<DataFile>,
    /// Why the data file the header names is not open ([`DataFilePolicy::MetadataOnly`]).
    pub(crate) data_file_error: Option<String>,
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
    /// The snapshot table (changed by the snapshot operations of [`snapshot`]).
    pub(crate) snapshots: std::sync::RwLock<Vec<Snapshot>>,
    /// Counts of work done outside any queue, plus those of queues that are gone.
    pub(crate) counters: Counters,
    /// The counters of the live queues.
    pub(crate) queue_counters: Mutex<Vec<Arc<Counters>>>,
    /// Every live queue's owed refcount decrements (see `Queue::local_frees`).
    pub(crate) owed_frees: Mutex<Vec<OwedFrees>>,
    pub(crate) read_only: bool,
    pub(crate) opts: Options,
    pub(crate) depth: usize,
    /// QEMU's "metadata preallocation" detection result (block status only).
    pub(crate) prealloc_detected: std::sync::OnceLock<bool>,
    /// A raw backing file without holes (its allocated blocks cover its size when first
    /// asked): the copy-on-write zero check ([`Image::backing_reads_zero`]) then skips its
    /// SEEK_DATA per fill. Wrong only towards "has data", which costs a read, never content.
    pub(crate) backing_dense: std::sync::OnceLock<bool>,
    /// Writer state (None when read-only).
    pub(crate) meta: Option<Mutex<MetaState>>,
    /// Data writes submitted and not completed, over all queues ([`Image::audit`] requires
    /// none; when a freed cluster may be reused is decided by [`epoch`]).
    pub(crate) writes_in_flight: AtomicU64,
    /// Reclamation epoch: queued decrements wait for the requests of the previous epoch
    /// ([`epoch`]).
    pub(crate) epoch: AtomicU64,
    /// A snapshot operation runs: new requests are refused ([`Image::enter_request`]).
    pub(crate) snapshot_busy: std::sync::atomic::AtomicBool,
    /// Every live queue's requests in flight per epoch parity.
    pub(crate) gates: Mutex<Vec<Arc<epoch::Gate>>>,
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
    /// Guest clusters that an allocation job is writing into a new host cluster (until its
    /// L2 entry is published or given up): a second write into the same guest cluster
    /// waits for it and then writes in place, instead of allocating a second cluster whose
    /// publication would lose the race and be written again (QEMU's `handle_dependencies`;
    /// issue 15, item 2: sequential 1 MiB writes in flight together on 2 MiB clusters wrote
    /// every second half twice).
    pub(crate) alloc_busy: Mutex<std::collections::HashSet<crate::format::types::GuestCluster>>,
    /// Host clusters (extended L2) whose bytes outside their allocated subclusters are
    /// known to read as zeros: taken fresh from a batch (which reads as zeros) and published
    /// by this image with some subclusters unallocated, since when only allocating jobs
    /// wrote them. A write into an unallocated subcluster of such a cluster needs no zero
    /// fill around the guest's bytes (issue 15, item 3: 4 KiB first touches of 2 MiB
    /// clusters wrote each 64 KiB subcluster whole, 1.9 device bytes per guest byte).
    /// Anything that may leave other bytes there (a subcluster made zero or unallocated
    /// with its data kept, a failed or lost in-place job, the cluster being freed) removes
    /// it. Bounded by [`alloc::CLEAN_CLUSTERS_MAX`]; forgetting one only costs the fill.
    pub(crate) clean_clusters: Mutex<std::collections::HashSet<u64>>,
    /// The asynchronous metadata write-backs: one at a time, joined by the flushes it
    /// covers ([`writeback`]).
    pub(crate) wb: writeback::WbCoord,
    /// What a write-back in flight shares with the refcounts (None when read-only).
    pub(crate) wb_shared: Option<Arc<Mutex<crate::meta::refcount::WbShared>>>,
    /// Queues waiting for the metadata lock or a fill claim (woken when either is given
    /// back; see [`crate::meta::waiters`]).
    pub(crate) lock_waiters: crate::meta::waiters::Waiters,
    /// When the image was opened (the clock of `next_clean_ms`).
    pub(crate) opened_at: std::time::Instant,
    /// Milliseconds after `opened_at` when the cache is cleaned next (u64::MAX: never).
    pub(crate) next_clean_ms: AtomicU64,
    /// quring's identity extension, as in the header (None: the image has none).
    pub(crate) identity: Mutex<Option<crate::format::identity::Identity>>,
    /// Guest offsets at or past this read as zeros where this image has no data (the
    /// recorded backing length, rounded up to 512; u64::MAX without one).
    pub(crate) backing_limit: AtomicU64,
    /// The persistent bitmaps' directory and the bits this session tracks ([`bitmaps`]).
    pub(crate) bitmap_dir: Mutex<bitmaps::BitmapDir>,
    /// The tracked bitmaps as the queues see them (copied by each queue when
    /// [`Image::bitmap_gen`] moves).
    pub(crate) bitmap_live: Mutex<bitmaps::LiveList>,
    /// Changes whenever the list of tracked bitmaps changes.
    pub(crate) bitmap_gen: AtomicU64,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("path", &self.file.path()).field("size", &self.vsize()).finish()
    }
}

impl Image {
    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.vsize()
    }

    /// The virtual size (hot paths).
    #[inline]
    pub(crate) fn vsize(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The image geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.header.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The internal snapshots (a copy of the table: [`Image::create_snapshot`] and
    /// [`Image::delete_snapshot`] change it).
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.snapshots.read().unwrap_or_else(|e| e.into_inner()).clone()
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

    /// A new queue's list of owed refcount decrements, registered so that a snapshot
    /// operation can take them while the queue is idle ([`Image::take_owed_frees`]).
    pub(crate) fn register_owed_frees(&self) -> OwedFrees {
        let l = Arc::new(Mutex::new(Vec::new()));
        self.owed_frees.lock().unwrap_or_else(|e| e.into_inner()).push(l.clone());
        l
    }

    /// A queue is gone (it handed its decrements over first).
    pub(crate) fn retire_owed_frees(&self, l: &OwedFrees) {
        let mut list = self.owed_frees.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().position(|x| Arc::ptr_eq(x, l)) {
            let gone = list.swap_remove(i);
            // Anything still owed (the metadata lock was not to be had at teardown) stays
            // with the image rather than being lost.
            let rest = std::mem::take(&mut *gone.lock().unwrap_or_else(|e| e.into_inner()));
            if !rest.is_empty() {
                list.push(Arc::new(Mutex::new(rest)));
            }
        }
    }

    /// Moves every queue's owed decrements into `to` (under the metadata lock, with every
    /// queue idle: a snapshot operation must see the refcounts the published L2 entries
    /// imply, or it sets COPIED from a count that is about to drop).
    pub(crate) fn take_owed_frees(&self, to: &mut Vec<(u64, u64)>) {
        for l in self.owed_frees.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            to.append(&mut l.lock().unwrap_or_else(|e| e.into_inner()));
        }
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

    /// Guest offsets at or past this read as zeros where this image has no data (the
    /// recorded backing length of the identity extension; u64::MAX without one).
    #[inline]
    pub(crate) fn backing_limit(&self) -> u64 {
        self.backing_limit.load(Ordering::Acquire)
    }

    /// Depth of this image in its chain (0 = top).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Makes every completed write durable (metadata write-back in dependency order plus
    /// device flushes). Blocks the calling thread; queues use [`Op::Flush`](crate::queue::Op)
    /// instead. A write-back a queue runs on its ring for its flushes ends first: do not
    /// call this from the thread of a queue with a flush in flight (that queue must keep
    /// reaping for it to end).
    pub fn flush(&self) -> Result<()> {
        let Some(mut st) = self.lock_meta_quiet() else { return Ok(()) };
        self.flush_metadata(&mut st, false, &self.counters)
    }

    /// Flushes metadata and closes the image cleanly (clears the lazy-refcount dirty bit).
    /// Call when the last queue is gone; dropping the last `Arc` does it too, ignoring
    /// errors.
    pub fn close(&self) -> Result<()> {
        let Some(mut st) = self.lock_meta_quiet() else { return Ok(()) };
        if st.closed {
            return Ok(());
        }
        // The tracked bitmaps stored with in_use cleared (not on an image marked corrupt:
        // they stay in use, inconsistent, as after a crash).
        let stored = if self.corrupt.load(Ordering::Acquire) { Ok(()) } else { self.store_bitmaps(&mut st) };
        self.close_metadata(&mut st)?;
        // An external data file's writes are durable when the image is closed cleanly.
        self.sync_data_file()?;
        stored?;
        st.closed = true;
        Ok(())
    }

    /// The cache mode writes use.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache_mode
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            eprintln!("quring: closing '{}' failed: {e}", self.path().display());
        }
    }
}
