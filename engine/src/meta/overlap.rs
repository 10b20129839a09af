//! Metadata overlap checks, after QEMU's `qcow2_check_metadata_overlap` in its default
//! "cached" overlap-check mode: the header cluster, the active L1 table, the refcount table,
//! every refcount block, every active L2 table, the snapshot table and the snapshots' L1
//! tables ("inactive L1") are metadata, and guest data must never be placed on them. (QEMU's
//! "cached" mode leaves out inactive L2 tables, which it would have to read from disk; so
//! does quring, except for tables that were active in this session and were copied away
//! from a snapshot, which stay recorded as inactive L2 tables.)
//!
//! Where QEMU checks every host write against these ranges (walking the L1 and refcount
//! tables each time), quring checks each guest-visible mapping once, when it enters memory:
//!
//! * an L2 slice is checked entry by entry when it is read from disk, before the cache
//!   publishes it (`Image::check_l2_slice`): a slice with an entry that points into
//!   metadata or past the end of the file never becomes visible, so neither a read nor a
//!   write can use any of its entries (the read hit path is unchanged);
//! * the L2 table an L1 entry points to is checked with it (the slice's own cluster must
//!   not be another kind of metadata);
//! * refcount table entries and quring's L2-less ranges are checked at open
//!   (`check_reftable`, `Image::check_contiguous_ranges`);
//! * the allocator never hands out a cluster recorded here, even if its refcount reads 0
//!   (QEMU: "Preventing invalid allocation of ...").
//!
//! The record is a bitmap with one bit per host cluster (the test on the slice-load path is
//! one load and a shift), plus the kind of each recorded cluster for error messages. Writers
//! keep it current under the metadata lock: clusters are recorded when they become metadata
//! (new L2 tables, refcount blocks, a moved refcount table or L1 table) and forgotten when
//! their refcount drops to zero.
//!
//! What a bad entry does (QEMU's `qcow2_signal_corruption`, see
//! `Image::signal_corruption` in `image/header.rs`):
//!
//! * the request that meets it fails (EIO) with an error naming the entry, the guest offset,
//!   the host offset and the structure there (or the end of the file);
//! * a *write* that meets it (guest write, zero write, discard, or the allocation it needs)
//!   is a fatal corruption event: the image is marked corrupt (incompatible bit 1, written
//!   durably through the header-update path), writes are refused from then on, and the next
//!   read-write open is refused (a read-only one works);
//! * a *read* that meets an overlapping or past-the-end mapping only fails: QEMU does not
//!   check reads against metadata at all (it returns the metadata's bytes), so it never marks
//!   an image for them, and neither does quring. Where QEMU does mark on a read (a misaligned
//!   data offset, an invalid extended L2 bitmap:
//!   [`signals_corruption_on_read`](crate::format::l2::signals_corruption_on_read)), quring
//!   marks too, when the image is open for writing;
//! * on an image open read-only nothing is marked (QEMU downgrades the event to non-fatal).
//!
//! Known gap, compared with QEMU's per-write check: a data mapping that was checked at load
//! and that points at a cluster whose refcount is 0 (itself a corruption `qemu-img check`
//! reports) is not re-checked if that cluster later becomes metadata. The allocator takes
//! clusters by refcount, so it can happen only on an image whose refcounts are already
//! wrong.

use crate::Error;
use crate::format::Geometry;
use crate::format::header::Header;
use crate::format::l1::L1Entry;
use crate::format::snapshot::Snapshot;
use crate::format::types::{HostCluster, HostOffset};
use std::collections::HashMap;
use std::fmt;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A kind of metadata cluster: QEMU's overlap-check categories (the bitmap directory aside,
/// which quring does not read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaKind {
    /// Cluster 0: the header, its extensions and the backing file name.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table of the active L1 table.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    InactiveL1,
    /// An L2 table only a snapshot refers to.
    InactiveL2,
}

impl MetaKind {
    /// What the structure is called in messages (QEMU's names, spelled out).
    pub fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2 header (cluster 0)",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::InactiveL1 => "inactive L1 table (of a snapshot)",
            MetaKind::InactiveL2 => "inactive L2 table (of a snapshot)",
        }
    }

    /// Is this an L2 table (active or not)?
    pub(crate) fn is_l2(self) -> bool {
        matches!(self, MetaKind::ActiveL2 | MetaKind::InactiveL2)
    }
}

impl fmt::Display for MetaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a host range may not hold what an entry says it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// It overlaps a metadata cluster.
    Metadata {
        /// What the cluster is.
        kind: MetaKind,
        /// Where the cluster starts.
        cluster: HostOffset,
    },
    /// It starts at or beyond the end of the file.
    PastEof {
        /// The file's length.
        file_len: u64,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Metadata { kind, cluster } => write!(f, "overlaps the {kind} at {cluster}"),
            Conflict::PastEof { file_len } => write!(f, "lies past the end of the file ({file_len} bytes)"),
        }
    }
}

/// The metadata clusters of one image (see the module documentation).
pub(crate) struct OverlapMap {
    geo: Geometry,
    inner: RwLock<Clusters>,
}

/// The recorded clusters: read under the map's lock.
pub(crate) struct Clusters {
    /// Bit `c`: host cluster `c` is metadata.
    bits: Vec<u64>,
    /// The kind of each recorded cluster.
    kinds: HashMap<u64, MetaKind>,
}

impl Clusters {
    /// Is host cluster `c` recorded as metadata?
    #[inline]
    pub fn is_meta(&self, c: u64) -> bool {
        let w = (c / 64) as usize;
        w < self.bits.len() && self.bits[w] >> (c % 64) & 1 != 0
    }

    /// The kind of host cluster `c`, if it is metadata.
    pub fn kind(&self, c: u64) -> Option<MetaKind> {
        if self.is_meta(c) { self.kinds.get(&c).copied() } else { None }
    }

    /// The first metadata cluster among `n` clusters from `first` (word at a time).
    pub fn first_meta_in(&self, first: u64, n: u64) -> Option<u64> {
        let end = first.saturating_add(n).min(self.bits.len() as u64 * 64);
        let mut c = first;
        while c < end {
            let w = (c / 64) as usize;
            let word = self.bits[w] >> (c % 64);
            if word != 0 {
                let hit = c + word.trailing_zeros() as u64;
                return (hit < end).then_some(hit);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    fn set(&mut self, c: u64, kind: MetaKind, replace: bool) {
        let w = (c / 64) as usize;
        if w >= self.bits.len() {
            // Grow geometrically: allocations at the end of the file add one cluster at a
            // time.
            let want = (w + 1).max(self.bits.len() + self.bits.len() / 2);
            self.bits.resize(want, 0);
        }
        if self.bits[w] >> (c % 64) & 1 != 0 && !replace {
            return;
        }
        self.bits[w] |= 1 << (c % 64);
        self.kinds.insert(c, kind);
    }

    fn clear(&mut self, c: u64) {
        let w = (c / 64) as usize;
        if w < self.bits.len() && self.bits[w] >> (c % 64) & 1 != 0 {
            self.bits[w] &= !(1 << (c % 64));
            self.kinds.remove(&c);
        }
    }
}

impl OverlapMap {
    fn new(geo: Geometry) -> Self {
        OverlapMap { geo, inner: RwLock::new(Clusters { bits: Vec::new(), kinds: HashMap::new() }) }
    }

    /// Records every metadata structure the header, the active L1 table, the refcount table
    /// and the snapshot table name (QEMU's "cached" set). Only clusters inside the file are
    /// recorded: references past its end are refused by the checks themselves. On a corrupt
    /// image two structures may share a cluster; the first one recorded here keeps it (in
    /// this order: header, L1, refcount table, refcount blocks, snapshot table, snapshot L1
    /// tables, L2 tables), so that the later one is the one reported.
    pub fn build(
        geo: &Geometry,
        h: &Header,
        l1: &[L1Entry],
        reftable: &[u64],
        snapshots: &[Snapshot],
        snapshot_table_bytes: u64,
        file_len: u64,
    ) -> Self {
        let map = OverlapMap::new(*geo);
        let cs = geo.cluster_size();
        let eof = geo.clusters_for(file_len);
        {
            let mut m = map.write();
            let mut range = |kind: MetaKind, off: u64, bytes: u64| {
                if bytes == 0 {
                    return;
                }
                let first = off / cs;
                let end = off.saturating_add(bytes).div_ceil(cs).min(eof);
                for c in first..end {
                    m.set(c, kind, false);
                }
            };
            range(MetaKind::Header, 0, cs);
            range(MetaKind::ActiveL1, h.l1_table_offset.0, h.l1_size as u64 * 8);
            range(MetaKind::RefcountTable, h.refcount_table_offset.0, h.refcount_table_clusters as u64 * cs);
            for &e in reftable {
                let off = e & !crate::format::refcount::REFTABLE_RESERVED;
                if off != 0 && e & crate::format::refcount::REFTABLE_RESERVED == 0 && geo.is_cluster_aligned(off) {
                    range(MetaKind::RefcountBlock, off, cs);
                }
            }
            if h.nb_snapshots > 0 {
                range(MetaKind::SnapshotTable, h.snapshots_offset.0, snapshot_table_bytes);
            }
            for s in snapshots {
                range(MetaKind::InactiveL1, s.l1_table_offset.0, s.l1_size as u64 * 8);
            }
            for e in l1 {
                let off = e.l2_offset().0;
                if off != 0 && !e.contiguous() && geo.is_cluster_aligned(off) {
                    range(MetaKind::ActiveL2, off, cs);
                }
            }
        }
        map
    }

    /// Read access for a batch of checks (one lock for a whole L2 slice).
    pub fn read(&self) -> RwLockReadGuard<'_, Clusters> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Clusters> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `n` clusters from `first` as metadata of `kind` (writers, when a structure
    /// is allocated: the clusters were free, so nothing is replaced but stale kinds).
    pub fn record(&self, kind: MetaKind, first: HostCluster, n: u64) {
        let mut m = self.write();
        for c in first.0..first.0 + n {
            m.set(c, kind, true);
        }
    }

    /// Changes the kind of a recorded cluster (an L2 table that stopped being active but
    /// that a snapshot still uses).
    pub fn relabel(&self, c: HostCluster, from: MetaKind, to: MetaKind) {
        let mut m = self.write();
        if m.kind(c.0) == Some(from) {
            m.set(c.0, to, true);
        }
    }

    /// Forgets a cluster whose refcount dropped to zero (it may become data).
    pub fn forget(&self, c: HostCluster) {
        self.write().clear(c.0);
    }

    /// Is host cluster `c` metadata? (The allocator's guard.)
    pub fn kind_of(&self, c: HostCluster) -> Option<MetaKind> {
        self.read().kind(c.0)
    }

    /// Checks that `len` bytes at `host` may hold guest data: inside the file (the start;
    /// compressed data may end in a partial sector past it) and on no metadata cluster.
    pub fn check_data(&self, m: &Clusters, host: HostOffset, len: u64, file_len: u64) -> Option<Conflict> {
        if host.0 >= file_len {
            return Some(Conflict::PastEof { file_len });
        }
        let first = self.geo.cluster_index(host.0);
        let last = self.geo.cluster_index(host.0 + len.max(1) - 1);
        m.first_meta_in(first, last - first + 1).map(|c| Conflict::Metadata {
            kind: m.kind(c).unwrap_or(MetaKind::Header),
            cluster: HostOffset(self.geo.cluster_bytes(c)),
        })
    }
}

/// Checks the refcount table's entries against the other metadata and the end of the file
/// (at a read-write open, before any refcount block is used): a refcount block must be
/// cluster aligned, inside the file, and on no other structure (QEMU finds these when the
/// block is first used: "Refblock offset ... unaligned" and its pre-write overlap check).
pub(crate) fn check_reftable(geo: &Geometry, map: &OverlapMap, table: &[u64], file_len: u64) -> crate::Result<()> {
    let m = map.read();
    let cs = geo.cluster_size();
    for (i, &e) in table.iter().enumerate() {
        crate::format::refcount::RefTableEntry(e).validate(i as u64, cs)?;
        let off = e & !crate::format::refcount::REFTABLE_RESERVED;
        if off == 0 {
            continue;
        }
        let c = geo.cluster_index(off);
        let conflict = if off >= file_len {
            Some(Conflict::PastEof { file_len })
        } else {
            m.kind(c)
                .filter(|&k| k != MetaKind::RefcountBlock)
                .map(|kind| Conflict::Metadata { kind, cluster: HostOffset(off) })
        };
        if let Some(conflict) = conflict {
            return Err(Error::corrupt(
                "refcount table entry",
                format!("entry {i} points to a refcount block at {off:#x}, which {conflict}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(cb: u32) -> OverlapMap {
        OverlapMap::new(Geometry::new(cb, false, 4).unwrap())
    }

    #[test]
    fn record_forget_and_ranges() {
        let m = map(16);
        m.record(MetaKind::ActiveL2, HostCluster(3), 1);
        m.record(MetaKind::RefcountBlock, HostCluster(130), 2);
        assert_eq!(m.kind_of(HostCluster(3)), Some(MetaKind::ActiveL2));
        assert_eq!(m.kind_of(HostCluster(131)), Some(MetaKind::RefcountBlock));
        assert_eq!(m.kind_of(HostCluster(4)), None);
        assert_eq!(m.kind_of(HostCluster(1 << 40)), None);
        let r = m.read();
        assert_eq!(r.first_meta_in(0, 3), None);
        assert_eq!(r.first_meta_in(0, 4), Some(3));
        assert_eq!(r.first_meta_in(4, 126), None);
        assert_eq!(r.first_meta_in(4, 127), Some(130));
        assert_eq!(r.first_meta_in(132, 1 << 50), None);
        drop(r);
        m.relabel(HostCluster(3), MetaKind::ActiveL2, MetaKind::InactiveL2);
        assert_eq!(m.kind_of(HostCluster(3)), Some(MetaKind::InactiveL2));
        m.forget(HostCluster(3));
        assert_eq!(m.kind_of(HostCluster(3)), None);
        m.forget(HostCluster(1 << 40));
    }

    #[test]
    fn check_data_reports_metadata_and_eof() {
        let m = map(16);
        m.record(MetaKind::ActiveL1, HostCluster(3), 1);
        let r = m.read();
        let file = 10 << 16;
        assert_eq!(m.check_data(&r, HostOffset(5 << 16), 1 << 16, file), None);
        assert_eq!(
            m.check_data(&r, HostOffset(3 << 16), 1 << 16, file),
            Some(Conflict::Metadata { kind: MetaKind::ActiveL1, cluster: HostOffset(3 << 16) })
        );
        // Compressed data straddling into the L1 cluster.
        assert!(m.check_data(&r, HostOffset((3 << 16) - 512), 1024, file).is_some());
        assert_eq!(m.check_data(&r, HostOffset(file), 512, file), Some(Conflict::PastEof { file_len: file }));
    }

    #[test]
    fn build_first_structure_keeps_a_shared_cluster() {
        let g = Geometry::new(16, false, 4).unwrap();
        let mut h = Header::new_v3(1 << 30, g, crate::format::header::CompressionType::Deflate);
        h.l1_size = 2;
        h.l1_table_offset = HostOffset(0x30000);
        h.refcount_table_offset = HostOffset(0x10000);
        h.refcount_table_clusters = 1;
        // L1[0] points at the refcount block, L1[1] at a real table, L1[2] past the file.
        let l1 = [L1Entry(0x20000), L1Entry(0x40000), L1Entry(0x1000_0000)];
        let m = OverlapMap::build(&g, &h, &l1, &[0x20000], &[], 0, 0x50000);
        assert_eq!(m.kind_of(HostCluster(0)), Some(MetaKind::Header));
        assert_eq!(m.kind_of(HostCluster(1)), Some(MetaKind::RefcountTable));
        assert_eq!(m.kind_of(HostCluster(2)), Some(MetaKind::RefcountBlock));
        assert_eq!(m.kind_of(HostCluster(3)), Some(MetaKind::ActiveL1));
        assert_eq!(m.kind_of(HostCluster(4)), Some(MetaKind::ActiveL2));
        assert_eq!(m.kind_of(HostCluster(0x1000)), None);
        assert!(m.read().bits.len() <= 1);
    }

    #[test]
    fn reftable_entries_are_checked() {
        let g = Geometry::new(16, false, 4).unwrap();
        let m = map(16);
        m.record(MetaKind::ActiveL1, HostCluster(3), 1);
        m.record(MetaKind::RefcountBlock, HostCluster(2), 1);
        let file = 0x60000;
        assert!(check_reftable(&g, &m, &[0x20000, 0], file).is_ok());
        let e = check_reftable(&g, &m, &[0x20000, 0x30000], file).unwrap_err().to_string();
        assert!(e.contains("entry 1") && e.contains("active L1 table"), "{e}");
        let e = check_reftable(&g, &m, &[0x100000], file).unwrap_err().to_string();
        assert!(e.contains("past the end of the file"), "{e}");
        assert!(check_reftable(&g, &m, &[0x20200], file).is_err());
    }
}
