//! Opening an image: the header, the active L1 table and the snapshot table read through
//! io_uring with O_DIRECT and validated, the writer state set up, and the backing chain
//! opened (qcow2 or raw files, relative names resolved against the directory of the image
//! that names them, as QEMU does).

use super::cache_sizes::{cache_sizes, default_l2_entry_size};
use super::header::mark_corrupt_at_open;
use super::*;
use crate::format::feature;
use crate::format::l1;
use crate::format::snapshot;
use crate::io::ImageFile;
use crate::io::lock::{ImageLock, LockMode};
use crate::meta::MetaCache;
use crate::meta::overlap::OverlapMap;

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
        let identity = header.identity()?;
        // The backing fields count only while they describe the backing file the header
        // names (another tool may have changed it: Image::identity_stale).
        let current = identity.as_ref().is_some_and(|id| id.backing_current(header.backing_file.as_deref()));
        let backing_limit = match (&identity, &header.backing_file) {
            (Some(id), Some(_)) if current => super::identity::limit_of(id.backing_len),
            _ => u64::MAX,
        };
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
        // Room in memory for the L1 table to grow (Image::resize) up to 8x the size (or
        // Options::l1_room), within QEMU's L1 limit.
        let room = header.size.saturating_mul(8).max(opts.l1_room.unwrap_or(0));
        let cap = geo
            .l1_entries_for(room)
            .unwrap_or(0)
            .clamp(entries.len() as u64, crate::format::geometry::MAX_L1_BYTES / 8)
            .min(entries.len() as u64 + (1 << 16))
            .max(
                opts.l1_room
                    .and_then(|r| geo.l1_entries_for(r))
                    .unwrap_or(0)
                    .min(crate::format::geometry::MAX_L1_BYTES / 8),
            ) as usize;
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
            None => default_l2_entry_size(&geo, header.size, opts),
        };
        let (l2_bytes, rc_bytes) = cache_sizes(&geo, header.size, file_len, entry_size, opts)?;
        let l2_cache = MetaCache::new(l2_bytes, entry_size as usize);
        let slice_entries = entry_size / geo.l2_entry_size();

        // External data file (same file layer and lock mode as the image).
        let (data_file, data_file_error) = match super::data_file::open(&header, read_only, opts.force_share) {
            Ok(d) => (d, None),
            Err(e) if read_only && opts.data_file == super::DataFilePolicy::MetadataOnly => (None, Some(e.to_string())),
            Err(e) => return Err(e),
        };

        // Backing chain.
        let backing = if opts.backing == BackingPolicy::Ignore {
            None
        } else if let Some(name) = &header.backing_file {
            let want = identity.as_ref().filter(|_| current).map(|id| id.backing_guid);
            Some(super::identity::open_checked_backing(
                path,
                name,
                header.backing_format().as_deref(),
                opts,
                depth,
                want,
            )?)
        } else {
            None
        };

        // Writer state: refcounts, lazy-refcount bookkeeping, autoclear bits.
        let mut header = header;
        if !read_only && header.incompatible_features & feature::INCOMPAT_DIRTY != 0 {
            // Lazy refcounts were in use when the image was last left: refcounts may be
            // stale. Rebuild them before the first write.
            crate::meta::rebuild::rebuild_refcounts(&sync, &file, &mut header)?;
        }
        let file_len = file.len()?; // a rebuild may have grown the file
        // Persistent bitmaps; on a read-write open the autoclear bits quring does not
        // maintain are cleared, as the spec requires, and the enabled bitmaps are loaded
        // and marked in use.
        let bitmap_dir = super::bitmaps::open_bitmaps(&sync, file.fd(), &mut header, file_len, read_only)?;
        let live: super::bitmaps::LiveList = bitmap_dir.recs.iter().filter_map(|r| r.live.clone()).collect();

        // The refcount table (in every mode: the overlap checks need the refcount blocks),
        // and the record of metadata clusters.
        let rt_bytes = header.refcount_table_clusters as usize * geo.cluster_size() as usize;
        let reftable: Vec<u64> = sync
            .read_exact(file.fd(), header.refcount_table_offset.0, rt_bytes, "refcount table")?
            .chunks_exact(8)
            .map(|c| crate::format::bytes::be64(c, 0))
            .collect();
        let overlap =
            Arc::new(OverlapMap::build(&geo, &header, &entries, &reftable, &snapshots, snapshot_table_bytes, file_len));

        let mut wb_shared = None;
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
            wb_shared = Some(rc.shared.clone());
            Some(Mutex::new(MetaState {
                rc,
                l1_dirty: false,
                lazy: header.lazy_refcounts(),
                dirty_bit_set: false,
                closed: false,
                grown_to: 0,
                ctail: Default::default(),
            }))
        };

        let file_len = file.len()?;
        let img = Arc::new(Image {
            size: AtomicU64::new(header.size),
            compression: header.compression_type,
            geo,
            file,
            data_file,
            data_file_error,
            sync,
            l1,
            l2_cache,
            slice_entries,
            backing,
            file_len: AtomicU64::new(file_len),
            opened_len: file_len,
            snapshots: std::sync::RwLock::new(snapshots),
            counters: Counters::default(),
            queue_counters: Mutex::new(Vec::new()),
            owed_frees: Mutex::new(Vec::new()),
            read_only,
            opts: opts.clone(),
            depth,
            prealloc_detected: std::sync::OnceLock::new(),
            backing_dense: std::sync::OnceLock::new(),
            meta,
            writes_in_flight: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            gates: Mutex::new(Vec::new()),
            snapshot_busy: std::sync::atomic::AtomicBool::new(false),
            cache_mode: opts.cache,
            _lock: lock,
            fill_busy: Mutex::new(std::collections::HashSet::new()),
            alloc_busy: Mutex::new(std::collections::HashSet::new()),
            clean_clusters: Mutex::new(std::collections::HashSet::new()),
            lock_waiters: crate::meta::waiters::Waiters::new(),
            wb: Default::default(),
            wb_shared,
            opened_at: std::time::Instant::now(),
            next_clean_ms: AtomicU64::new(opts.cache_clean_interval.map_or(u64::MAX, |d| d.as_millis() as u64)),
            l2less: l2less_bit,
            hook: opts.hook.clone(),
            version: header.version,
            corrupt: std::sync::atomic::AtomicBool::new(header.incompatible_features & feature::INCOMPAT_CORRUPT != 0),
            signaled: std::sync::atomic::AtomicBool::new(false),
            overlap,
            identity: Mutex::new(identity),
            backing_limit: AtomicU64::new(backing_limit),
            header: Mutex::new(header),
            bitmap_dir: Mutex::new(bitmap_dir),
            bitmap_live: Mutex::new(live),
            bitmap_gen: AtomicU64::new(1),
        });
        if let Err(e) = img.check_contiguous_ranges() {
            return Err(img.signal_corruption(e));
        }
        Ok(img)
    }
}

/// Reads the snapshot table; returns the snapshots and the table's length in bytes.
pub(super) fn read_snapshots(
    sync: &SyncRing,
    file: &ImageFile,
    h: &Header,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
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

pub(super) fn open_backing(
    image: &Path,
    name: &str,
    fmt: Option<&str>,
    opts: &Options,
    depth: usize,
) -> Result<Backing> {
    let path = resolve_backing_path(image, name);
    let bopts = Options { read_only: true, l1_room: None, data_file: super::DataFilePolicy::Require, ..opts.clone() };
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
