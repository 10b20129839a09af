//! Refcount rebuild for images opened with the dirty bit set (lazy refcounts after a crash,
//! spec: "dirty bit"): count every reference from the header, L1/L2 tables, data and
//! snapshots, write a fresh refcount table and blocks after the end of the file (covering
//! themselves), make them durable, then point the header at them and clear the dirty bit.
//! Until the header is rewritten the old (stale) structures stay in place, so a crash during
//! the rebuild leaves the image as dirty as before; the old structures become free space.

use crate::check::{FileMeta, reference_counts};
use crate::format::HostOffset;
use crate::format::feature::INCOMPAT_DIRTY;
use crate::format::header::Header;
use crate::format::refcount as rc;
use crate::io::{ImageFile, SyncRing};
use crate::{Error, Result};

/// Rebuilds the refcounts of a dirty image and clears the dirty bit (on disk and in `h`).
pub(crate) fn rebuild_refcounts(sync: &SyncRing, file: &ImageFile, h: &mut Header) -> Result<()> {
    let len = file.len()?;
    let counts = reference_counts(&FileMeta { ring: sync, file, len })?;
    let order = h.refcount_order;
    write_refcounts(sync, file, h, counts, order, |h| h.incompatible_features &= !INCOMPAT_DIRTY)
}

/// Writes a fresh refcount structure of width `2^order` for `counts` (the references of
/// every cluster of the file, the refcount structures left out; clusters past the file's
/// end may be included) after the last counted cluster, covering itself, makes it durable,
/// then writes the header `h` pointing at it (with `refcount_order = order` and whatever
/// `edit` changes). The old structure stays valid until that header write and becomes free
/// space after it: a crash before leaves the old image, after it the new one.
pub(crate) fn write_refcounts(
    sync: &SyncRing,
    file: &ImageFile,
    h: &mut Header,
    mut counts: Vec<u64>,
    order: u32,
    edit: impl FnOnce(&mut Header),
) -> Result<()> {
    let g = crate::format::Geometry::new(h.cluster_bits, h.geometry().extended_l2, order)?;
    let cs = g.cluster_size();
    let e = g.refblock_entries();
    let n = counts.len() as u64;
    // Blocks and table after the data, covering the data and themselves.
    let (mut b, mut t) = (0u64, 0u64);
    loop {
        let total = n + b + t;
        let nb = total.div_ceil(e);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    if t * cs > crate::format::geometry::MAX_REFTABLE_BYTES.max(cs) {
        return Err(Error::Unsupported("rebuilt refcount table would exceed 8 MiB".into()));
    }
    counts.resize((n + b + t) as usize, 0);
    for c in &mut counts[n as usize..] {
        *c = 1;
    }
    let max = g.refcount_max();
    if let Some((i, &v)) = counts.iter().enumerate().find(|&(_, &v)| v > max) {
        return Err(Error::corrupt(
            "refcount",
            format!("cluster {i} has {v} references, more than {max} ({}-bit refcounts)", g.refcount_bits()),
        ));
    }
    let mut table = vec![0u8; (t * cs) as usize];
    for bi in 0..b {
        let mut buf = vec![0u8; cs as usize];
        for j in 0..e {
            let idx = (bi * e + j) as usize;
            if idx >= counts.len() {
                break;
            }
            rc::set(&mut buf, j, order, counts[idx]);
        }
        let off = (n + bi) * cs;
        sync.write_kind(crate::io::hook::WriteKind::RefBlock, file.fd(), off, &buf)?;
        table[(bi * 8) as usize..(bi * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let table_off = (n + b) * cs;
    sync.write_kind(crate::io::hook::WriteKind::RefTable, file.fd(), table_off, &table)?;
    sync.fdatasync(file.fd())?;
    let mut nh = h.clone();
    nh.refcount_table_offset = HostOffset(table_off);
    nh.refcount_table_clusters = t as u32;
    nh.refcount_order = order;
    edit(&mut nh);
    let bytes = nh.serialize()?;
    sync.write_kind(crate::io::hook::WriteKind::Header, file.fd(), 0, &bytes)?;
    sync.fdatasync(file.fd())?;
    *h = nh;
    Ok(())
}
