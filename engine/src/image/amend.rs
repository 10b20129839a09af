//! `qemu-img amend` for qcow2 (QEMU's `qcow2_amend_options`): the compatibility level
//! (version 2 <-> 3), lazy refcounts, the refcount width and the external data file's name
//! and `data_file_raw` bit, on a closed image.
//!
//! The steps run in QEMU's order: upgrade to version 3, change the refcount width, the data
//! file's name and raw bit, switch lazy refcounts, downgrade to version 2. Each step ends with one header write (cluster 0,
//! made durable), so a crash leaves the image as it was before or after that step:
//! * The refcount width: a new refcount table and blocks of the new width are written after
//!   the end of the file (the refcounts counted from the image's tables, as a rebuild
//!   counts them), then the header points at them with the new `refcount_order`; the old
//!   structures become free space.
//! * The downgrade: version 2 has no zero flag, so zero clusters are expanded first, as
//!   QEMU's `qcow2_expand_zero_clusters` does (active and snapshot L2 tables): without a
//!   backing file a zero cluster that does not own a host cluster becomes unallocated; one
//!   with a host cluster it owns (COPIED) gets zeros written there and loses the flag; the
//!   others get a new cluster of zeros. (QEMU 10 also writes zeros into a host cluster that
//!   a snapshot shares and sets COPIED on it, which changes the snapshot and fails its own
//!   check: not done here.) The new clusters and a refcount structure that counts them are
//!   made durable before any L2 table points at them (a crash in between leaks them); then
//!   the L2 tables; then, when they dropped references to shared host clusters, a refcount
//!   structure without those (a crash before it leaks, never undercounts); then the version
//!   2 header.
//!
//! quring's identity extension (and any unknown extension) is kept through every step.

use crate::check::{FileMeta, reference_counts};
use crate::format::feature;
use crate::format::geometry::OFFSET_MASK;
use crate::format::header::{CompressionType, Header, V2_HEADER_LENGTH, V3_HEADER_LENGTH};
use crate::format::l1;
use crate::format::l2::{L2_COMPRESSED, L2_COPIED, L2_ZERO};
use crate::format::snapshot::Snapshot;
use crate::io::hook::WriteKind;
use crate::io::lock::{ImageLock, LockMode};
use crate::io::{ImageFile, SyncRing};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// What [`amend`] changes (None: keep).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Amend {
    /// Some(true): version 2 (`compat=0.10`); Some(false): version 3 (`compat=1.1`).
    pub compat_v2: Option<bool>,
    /// Lazy refcounts (compatible bit 0; version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits (a power of two up to 64; version 3 only but 16).
    pub refcount_bits: Option<u32>,
    /// The external data file's name (header extension 0x44415441), for an image that has
    /// one (incompatible bit 2): the image is re-pointed at this name, which is not opened
    /// here. `""` removes the name, as QEMU does: the image keeps the incompatible bit and
    /// opens only when the data file is given another way.
    pub data_file: Option<String>,
    /// `data_file_raw` (autoclear bit 1): `false` clears it; `true` keeps it on an image
    /// that has it and is refused on the others (QEMU sets it only at creation).
    pub data_file_raw: Option<bool>,
}

/// Changes the image at `path` as `a` says. The image is first opened and closed through
/// [`super::Image::open`] with `opts` (a dirty image gets its refcounts rebuilt, as QEMU's
/// open does), then changed with QEMU's write lock held. `progress` is told the fraction
/// done (0.0 to 1.0). Errors carry qemu-img's messages where qemu-img refuses the same.
pub fn amend(path: &Path, opts: &super::Options, a: &Amend, progress: &mut dyn FnMut(f64)) -> Result<()> {
    let ro =
        super::Options { read_only: true, force_share: true, backing: super::BackingPolicy::Ignore, ..opts.clone() };
    check(&super::Image::open(path, &ro)?.header(), a)?;
    let settle =
        super::Options { read_only: false, backing: super::BackingPolicy::Ignore, force_share: false, ..opts.clone() };
    super::Image::open(path, &settle)?.close()?;
    let file = ImageFile::open(path, true)?;
    let _lock = ImageLock::acquire(file.file(), path, LockMode::ReadWrite, false)?;
    let sync = SyncRing::with_hook(opts.hook.clone())?;
    let mut h = read_header(&sync, &file)?;

    let order = check(&h, a)?;
    let v2_now = h.version == 2;
    let to_v2 = a.compat_v2.unwrap_or(v2_now);
    let downgrade = to_v2 && !v2_now;
    if downgrade {
        // QEMU checks these when it reaches the downgrade, after the steps before it; those
        // steps change neither the snapshots nor the features, so checking first refuses
        // the same images (and leaves them untouched).
        let (snaps, _) = super::open::read_snapshots(&sync, &file, &h, file.len()?)?;
        check_downgrade(&h, &snaps, order)?;
    }
    progress(0.0);

    // 1. Upgrade.
    if !to_v2 && v2_now {
        h.version = 3;
        h.header_length = V3_HEADER_LENGTH;
        h.extra = vec![0u8; (V3_HEADER_LENGTH - 105) as usize];
        h.compression_type = CompressionType::Deflate;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.refcount_order = 4;
        // QEMU names the features only in clusters over 4 KiB (as `create` does).
        if h.geometry().cluster_size() > 4096
            && !h.extensions.iter().any(|e| e.kind == crate::format::extension::EXT_FEATURE_TABLE)
        {
            let at = h.extensions.iter().take_while(|e| e.kind == crate::format::extension::EXT_BACKING_FORMAT).count();
            h.extensions.insert(
                at,
                crate::format::extension::Extension {
                    kind: crate::format::extension::EXT_FEATURE_TABLE,
                    data: feature::serialize_feature_table(&feature::default_feature_table(false)),
                },
            );
        }
        write_full_header(&sync, &file, &mut h)?;
    }
    progress(0.1);

    // 2. Refcount width.
    if order != h.refcount_order {
        let len = file.len()?;
        let counts = reference_counts(&FileMeta { ring: &sync, file: &file, len })?;
        check_width(&counts, order, h.geometry().cluster_size())?;
        crate::meta::rebuild::write_refcounts(&sync, &file, &mut h, counts, order, |_| {})?;
    }
    // 3. The data file's raw bit and name (one header write, as QEMU's).
    if set_data_file(&mut h, a) {
        write_full_header(&sync, &file, &mut h)?;
    }
    progress(0.4);

    // 4. Lazy refcounts.
    let lazy = if to_v2 { false } else { a.lazy_refcounts.unwrap_or(h.lazy_refcounts()) };
    if !to_v2 && lazy != h.lazy_refcounts() {
        h.compatible_features ^= feature::COMPAT_LAZY_REFCOUNTS;
        write_full_header(&sync, &file, &mut h)?;
    }

    // 5. Downgrade.
    if downgrade {
        expand_zero_clusters(&sync, &file, &mut h, &mut |f| progress(0.4 + 0.5 * f))?;
        h.version = 2;
        h.header_length = V2_HEADER_LENGTH;
        h.extra.clear();
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = CompressionType::Deflate;
        h.extensions.retain(|e| e.kind != crate::format::extension::EXT_FEATURE_TABLE);
        write_full_header(&sync, &file, &mut h)?;
    }
    progress(1.0);
    Ok(())
}

/// Checks `a` against the image's header `h` as qemu-img does before it changes anything
/// (its messages); returns the new refcount order.
pub fn check(h: &Header, a: &Amend) -> Result<u32> {
    // QEMU's option loop meets these before the refcount width.
    if a.data_file.is_some() && !h.has_data_file() {
        return Err(Error::InvalidRequest(
            "data-file can only be set for images that use an external data file".into(),
        ));
    }
    if a.data_file_raw == Some(true) && !h.data_file_raw() {
        return Err(Error::InvalidRequest("data-file-raw cannot be set on existing images".into()));
    }
    if let Some(name) = a.data_file.as_deref().filter(|n| !n.is_empty()) {
        // The name must read back (no NUL, not longer than a path).
        crate::format::data_file::parse_name(name.as_bytes())
            .map_err(|e| Error::InvalidRequest(format!("Invalid data file name '{name}': {e}")))?;
    }
    let v2_now = h.version == 2;
    let to_v2 = a.compat_v2.unwrap_or(v2_now);
    let order = match a.refcount_bits {
        Some(b) if b == 0 || !b.is_power_of_two() || b > 64 => {
            return Err(Error::InvalidRequest(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        Some(b) => b.trailing_zeros(),
        None => h.refcount_order,
    };
    if to_v2 && a.lazy_refcounts == Some(true) {
        return Err(Error::InvalidRequest(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
        ));
    }
    if to_v2 && a.refcount_bits.is_some_and(|b| b != 16) {
        return Err(Error::InvalidRequest(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                .into(),
        ));
    }
    if order != h.refcount_order || (to_v2 && !v2_now) {
        refuse_bitmaps(h)?;
    }
    Ok(order)
}

/// Applies `a`'s data file options to `h` (checked by [`check`]): the raw bit set or
/// cleared, the name extension replaced in place (after the backing format's when the
/// image has none) or removed. Returns whether the header changed.
fn set_data_file(h: &mut Header, a: &Amend) -> bool {
    use crate::format::extension::{EXT_BACKING_FORMAT, EXT_DATA_FILE};
    let before = (h.autoclear_features, h.extensions.clone());
    if let Some(raw) = a.data_file_raw {
        if raw {
            h.autoclear_features |= feature::AUTOCLEAR_DATA_FILE_RAW;
        } else {
            h.autoclear_features &= !feature::AUTOCLEAR_DATA_FILE_RAW;
        }
    }
    if let Some(name) = &a.data_file {
        let at = h
            .extensions
            .iter()
            .position(|e| e.kind == EXT_DATA_FILE)
            .unwrap_or_else(|| h.extensions.iter().take_while(|e| e.kind == EXT_BACKING_FORMAT).count());
        h.extensions.retain(|e| e.kind != EXT_DATA_FILE);
        if !name.is_empty() {
            h.extensions.insert(at.min(h.extensions.len()), crate::format::data_file::to_extension(name));
        }
    }
    (h.autoclear_features, &h.extensions) != (before.0, &before.1)
}

/// What QEMU's downgrade to version 2 checks when it gets there (its messages): the
/// refcount width `order` the earlier steps left, internal snapshots whose virtual disk
/// size differs from the image's or whose VM state needs more than 32 bits (version 2
/// readers may ignore the extra data that records them), incompatible features.
pub fn check_downgrade(h: &Header, snaps: &[Snapshot], order: u32) -> Result<()> {
    if order != 4 {
        return Err(Error::Unsupported("compat=0.10 requires refcount_bits=16".into()));
    }
    if snaps.iter().any(|s| s.vm_state_size() > u32::MAX as u64 || s.disk_size().is_some_and(|d| d != h.size)) {
        return Err(Error::Unsupported("Internal snapshots prevent downgrade of image".into()));
    }
    if h.has_data_file() {
        return Err(Error::Unsupported("Cannot downgrade an image with a data file".into()));
    }
    let blocking = h.incompatible_features & !(feature::INCOMPAT_DIRTY | feature::INCOMPAT_COMPRESSION);
    if blocking != 0 {
        return Err(Error::Unsupported(format!(
            "Cannot downgrade an image with incompatible features {blocking:#x} set"
        )));
    }
    Ok(())
}

/// Refcount structures are rebuilt from the image's tables, which leaves out persistent
/// bitmaps: refused for images that have them.
fn refuse_bitmaps(h: &Header) -> Result<()> {
    if h.extensions.iter().any(|e| e.kind == crate::format::extension::EXT_BITMAPS) {
        return Err(Error::Unsupported(
            "changing the refcount structures of an image with persistent bitmaps is not supported".into(),
        ));
    }
    Ok(())
}

/// QEMU's refusal of a narrower refcount width that a cluster's count does not fit.
fn check_width(counts: &[u64], order: u32, cs: u64) -> Result<()> {
    let bits = 1u32 << order;
    let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    if let Some((i, &v)) = counts.iter().enumerate().find(|&(_, &v)| v > max) {
        return Err(Error::InvalidRequest(format!(
            "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {v}",
            i as u64 * cs
        )));
    }
    Ok(())
}

/// Reads and parses the header of an open file.
fn read_header(sync: &SyncRing, file: &ImageFile) -> Result<Header> {
    let (first, valid) = sync.read(file.fd(), 0, 4096)?;
    let cs = Header::peek_cluster_size(&first[..valid])?;
    let (c0, valid) = sync.read(file.fd(), 0, cs as usize)?;
    Header::parse(&c0[..valid], file.len()?)
}

/// Writes `h` to cluster 0 (what follows the new header, up to 4 KiB or the cluster, is
/// zeroed: a shorter version 2 header leaves no stale bytes) and makes it durable.
fn write_full_header(sync: &SyncRing, file: &ImageFile, h: &mut Header) -> Result<()> {
    let mut bytes = h.serialize()?;
    let pad = (h.geometry().cluster_size() as usize).min(4096);
    if bytes.len() < pad {
        bytes.resize(pad, 0);
    }
    sync.write_kind(WriteKind::Header, file.fd(), 0, &bytes)?;
    sync.fdatasync(file.fd())
}

/// One L2 table met while walking the L1 tables.
struct Table {
    /// How many L1 entries (active and snapshots) point at it.
    visits: u64,
}

/// Version 2 has no zero flag: QEMU's `qcow2_expand_zero_clusters` (see the module doc).
/// Refuses zstd-compressed clusters (version 2 can only say deflate).
fn expand_zero_clusters(
    sync: &SyncRing,
    file: &ImageFile,
    h: &mut Header,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let g = h.geometry();
    let cs = g.cluster_size();
    let backed = h.backing_file.is_some();
    let len = file.len()?;
    // Every L1 table: the active one and the snapshots'.
    let mut l1s = vec![(h.l1_table_offset.0, h.l1_size)];
    let (snaps, _) = super::open::read_snapshots(sync, file, h, len)?;
    l1s.extend(snaps.iter().map(|s| (s.l1_table_offset.0, s.l1_size)));
    let mut tables: BTreeMap<u64, Table> = BTreeMap::new();
    for (off, size) in l1s {
        if size == 0 {
            continue;
        }
        let raw = sync.read_exact(file.fd(), off, size as usize * 8, "L1 table")?;
        for e in l1::decode_table(&raw) {
            let l2 = e.l2_offset().0;
            if l2 != 0 {
                tables.entry(l2).or_insert(Table { visits: 0 }).visits += 1;
            }
        }
    }
    let zstd = h.compression_type == CompressionType::Zstd;
    let mut counts: Option<Vec<u64>> = None;
    let mut next_new = 0u64;
    let mut new_clusters: Vec<u64> = Vec::new();
    let mut rewritten: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut in_place: Vec<u64> = Vec::new();
    // References the rewritten tables drop: (host cluster, how many).
    let mut drops: Vec<(u64, u64)> = Vec::new();
    let total = tables.len().max(1) as f64;
    for (done, (&off, t)) in tables.iter().enumerate() {
        progress(done as f64 / total);
        let mut buf = sync.read_exact(file.fd(), off, cs as usize, "L2 table")?;
        let mut changed = false;
        for i in 0..g.l2_entries() as usize {
            let at = i * 8;
            let e = u64::from_be_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
            if e & L2_COMPRESSED != 0 {
                if zstd {
                    return Err(Error::Unsupported(
                        "Cannot downgrade an image with zstd-compressed clusters (version 2 images can only \
                         hold deflate-compressed clusters)"
                            .into(),
                    ));
                }
                continue;
            }
            if e & L2_ZERO == 0 {
                continue;
            }
            let host = e & OFFSET_MASK;
            let new = if host != 0 && e & L2_COPIED != 0 {
                // Its own cluster: zeros there.
                in_place.push(host);
                e & !L2_ZERO
            } else if !backed {
                // Unallocated reads as zeros without a backing file (a shared host
                // cluster loses this reference).
                if host != 0 {
                    drops.push((host / cs, t.visits));
                }
                0
            } else {
                if host != 0 {
                    drops.push((host / cs, t.visits));
                }
                let c = counts_of(&mut counts, sync, file)?;
                if next_new == 0 {
                    next_new = (c.len() as u64).max(len.div_ceil(cs));
                }
                let k = next_new;
                next_new += 1;
                if c.len() as u64 <= k {
                    c.resize(k as usize + 1, 0);
                }
                c[k as usize] = t.visits;
                new_clusters.push(k * cs);
                (k * cs) | if t.visits == 1 { L2_COPIED } else { 0 }
            };
            buf[at..at + 8].copy_from_slice(&new.to_be_bytes());
            changed = true;
        }
        if changed {
            rewritten.push((off, buf));
        }
    }
    if rewritten.is_empty() {
        return Ok(());
    }
    // The counts of the tables as they are (before any rewrite below).
    if !drops.is_empty() {
        counts_of(&mut counts, sync, file)?;
    }
    // Zeros first (nothing points at the new clusters yet; the in-place ones read as
    // zeros already), then the refcounts that count the new clusters.
    let zeros = vec![0u8; cs as usize];
    for &at in new_clusters.iter().chain(in_place.iter()) {
        sync.write_kind(WriteKind::Data, file.fd(), at, &zeros)?;
    }
    sync.fdatasync(file.fd())?;
    let order = h.refcount_order;
    if !new_clusters.is_empty() {
        // Counts with the new clusters and every old reference still there.
        let c = counts_of(&mut counts, sync, file)?.clone();
        crate::meta::rebuild::write_refcounts(sync, file, h, c, order, |_| {})?;
    }
    for (off, buf) in &rewritten {
        sync.write_kind(WriteKind::L2, file.fd(), *off, buf)?;
    }
    sync.fdatasync(file.fd())?;
    if !drops.is_empty() {
        // Only now that no table holds the dropped references (until here a crash leaves
        // counts too high: leaks, never a count below the references). The new structure
        // goes past the one written above, which stays valid until the header switches.
        let file_clusters = file.len()?.div_ceil(cs) as usize;
        let c = counts_of(&mut counts, sync, file)?;
        for &(k, n) in &drops {
            if let Some(v) = c.get_mut(k as usize) {
                *v = v.saturating_sub(n);
            }
        }
        if c.len() < file_clusters {
            c.resize(file_clusters, 0);
        }
        let c = c.clone();
        crate::meta::rebuild::write_refcounts(sync, file, h, c, order, |_| {})?;
    }
    Ok(())
}

/// The reference counts of the file, counted once when first needed.
fn counts_of<'a>(counts: &'a mut Option<Vec<u64>>, sync: &SyncRing, file: &ImageFile) -> Result<&'a mut Vec<u64>> {
    if counts.is_none() {
        let len = file.len()?;
        *counts = Some(reference_counts(&FileMeta { ring: sync, file, len })?);
    }
    Ok(counts.as_mut().expect("just set"))
}
