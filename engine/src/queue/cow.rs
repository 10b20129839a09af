//! The copy-on-write planner: given what a cluster holds now (its decoded L2 entry and, with
//! extended L2, its subcluster bitmap) and the guest bytes a write brings into it, decide
//! where the write goes, which bytes of the cluster must be written, which of them must
//! first be filled from what the guest sees there now, and what the L2 entry becomes.
//!
//! Pure: no I/O, no cache, no image. The allocation job ([`super::job`]) carries the plan
//! out. The rules (spec: "Cluster allocation" and "Extended L2 Entries"; QEMU's
//! `handle_alloc` / `calculate_l2_meta`):
//!
//! * A cluster the image owns (COPIED) with extended L2 gets the missing subclusters written
//!   in place. An edge subcluster that already holds data is written only where the guest
//!   writes (rewriting its other bytes from a fill read would race with concurrent writes
//!   there); an edge subcluster without data is written whole (filled around the guest's
//!   bytes).
//! * A preallocated zero cluster the image owns (standard L2) is written in place, whole,
//!   zero-filled.
//! * With extended L2, an unallocated or zero cluster gets a new cluster of which only the
//!   touched subclusters are written.
//! * Anything else (unallocated or zero without extended L2, compressed, shared with a
//!   snapshot) is copied whole into a new cluster; the old one is freed once the new entry
//!   is published.
//! * A new cluster reads as zeros (batch clusters are fresh or punched): when what the
//!   guest sees around the write is zeros too, only the guest's bytes are written. So does
//!   an owned extended-L2 cluster known clean (its bytes outside allocated subclusters read
//!   as zeros: [`crate::image::Image::clean_clusters`]).

use crate::format::Geometry;
use crate::format::l2::{ClusterKind, SubclusterBitmap, subcluster_mask};
use crate::format::types::HostOffset;
use std::ops::Range;

/// Where an allocation writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// In place, in the cluster the image already owns at this host offset.
    Own(HostOffset),
    /// Into a new cluster, from the queue's batch.
    Fresh,
}

/// What the L2 entry becomes once the data is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NewEntry {
    /// Unchanged (subclusters allocated in place: only the bitmap changes).
    Keep,
    /// A standard, COPIED entry for the target cluster.
    Normal,
}

/// The plan for one piece of a write into one cluster. Offsets are bytes inside the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CowPlan {
    /// Where the data goes.
    pub target: Target,
    /// The bytes of the cluster written by the job (the guest's and the fills).
    pub write: Range<u64>,
    /// Parts of `write` outside the guest's bytes, to fill from what the guest sees there
    /// now (clipped to the disk's end). Empty when `fill_zero` makes them zeros anyway.
    pub fills: Vec<Range<u64>>,
    /// What the fills read as now is known to be zeros (no fill reads: the bounce buffer
    /// starts zeroed).
    pub fill_zero: bool,
    /// The new L2 entry.
    pub entry: NewEntry,
    /// The new subcluster bitmap (extended L2; 0 otherwise).
    pub bitmap: SubclusterBitmap,
    /// The old entry's clusters are freed once the new one is published.
    pub free_old: bool,
}

/// Plans writing `len` bytes at `in_c` (inside one cluster: `in_c + len <= cluster size`)
/// into a cluster that holds `kind` with subcluster bitmap `bitmap`. `in_disk` is how many
/// bytes of the cluster lie inside the virtual disk; `backing` says whether the image has a
/// backing file (unallocated ranges then read from it); `own_clean` that the cluster, when
/// the image owns it (extended L2), reads as zeros outside its allocated subclusters;
/// `backing_zero(range)` whether the backing file reads as zeros at that range of the
/// cluster (QEMU's `is_zero_cow`: such a fill needs no read, and none at all in a target
/// that reads as zeros).
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan(
    g: &Geometry,
    kind: ClusterKind,
    bitmap: SubclusterBitmap,
    in_c: u64,
    len: u64,
    in_disk: u64,
    backing: bool,
    own_clean: bool,
    backing_zero: &dyn Fn(Range<u64>) -> bool,
) -> CowPlan {
    debug_assert!(len > 0 && in_c + len <= g.cluster_size());
    let cs = g.cluster_size();
    let ext = g.extended_l2;
    let scs = g.subcluster_size();
    let s0 = g.subcluster_index(in_c);
    let s1 = g.subcluster_index(in_c + len - 1);
    let touched = if ext { subcluster_mask(s0, s1) } else { 0 };
    let with_touched = SubclusterBitmap::from_parts(bitmap.alloc() | touched, bitmap.zero() & !touched);
    let whole_subclusters = (s0 as u64 * scs)..((s1 as u64 + 1) * scs);
    // (target, write range, fills read as zeros, entry, bitmap, free old)
    let (target, write, fill_zero, entry, new_bitmap, free_old) = match kind {
        ClusterKind::Normal { host, copied: true } if ext => {
            let start = if bitmap.alloc() >> s0 & 1 != 0 { in_c } else { whole_subclusters.start };
            let end = if bitmap.alloc() >> s1 & 1 != 0 { in_c + len } else { whole_subclusters.end };
            // Only unallocated edge subclusters are filled: zeros without a backing file.
            (Target::Own(host), start..end, !backing, NewEntry::Keep, with_touched, false)
        }
        ClusterKind::ZeroAlloc { host, copied: true } if !ext => {
            (Target::Own(host), 0..cs, true, NewEntry::Normal, SubclusterBitmap(0), false)
        }
        ClusterKind::Unallocated | ClusterKind::ZeroPlain if ext => {
            let zero = matches!(kind, ClusterKind::ZeroPlain) || !backing;
            (Target::Fresh, whole_subclusters, zero, NewEntry::Normal, with_touched, false)
        }
        _ => {
            let zero = match kind {
                ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc { .. } => true,
                ClusterKind::Unallocated => !backing,
                _ => false,
            };
            let free = matches!(
                kind,
                ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. } | ClusterKind::Compressed { .. }
            );
            let b = if ext { SubclusterBitmap::from_parts(u32::MAX, 0) } else { SubclusterBitmap(0) };
            (Target::Fresh, 0..cs, zero, NewEntry::Normal, b, free)
        }
    };
    // A fresh cluster reads as zeros: with zeros around the write, only the guest's bytes
    // are written. Not in an external data file, where the new cluster is the one at the
    // guest offset, which may hold old bytes: the whole range is written (zero-filled).
    let target_zero = match target {
        Target::Fresh => !g.external_data,
        Target::Own(_) => own_clean && ext && entry == NewEntry::Keep,
    };
    let mut write = if target_zero && fill_zero { in_c..in_c + len } else { write };
    let mut fills: Vec<Range<u64>> = if fill_zero {
        Vec::new()
    } else {
        [write.start..in_c, (in_c + len)..write.end.min(in_disk)].into_iter().filter(|r| r.end > r.start).collect()
    };
    // The fills read what the guest sees there now: from the backing file where the cluster
    // (or, with extended L2, the subcluster: fills lie only in unallocated or zero ones) is
    // unallocated here. Where that reads as zeros there is nothing to read, and nothing to
    // write in a target that reads as zeros already.
    let from_backing = backing
        && match kind {
            ClusterKind::Unallocated => true,
            ClusterKind::Normal { copied: true, .. } => ext,
            _ => false,
        };
    if from_backing && !fills.is_empty() {
        fills.retain(|r| !backing_zero(r.clone()));
        if target_zero {
            if !fills.iter().any(|r| r.end <= in_c) {
                write.start = in_c;
            }
            if !fills.iter().any(|r| r.start >= in_c + len) {
                write.end = in_c + len;
            }
        }
    }
    CowPlan { target, write, fills, fill_zero, entry, bitmap: new_bitmap, free_old }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    fn std64k() -> Geometry {
        Geometry::new(16, false, 4).unwrap()
    }
    fn ext64k() -> Geometry {
        Geometry::new(16, true, 4).unwrap()
    }
    const H: HostOffset = HostOffset(0x50000);
    /// A backing file with data everywhere.
    fn never(_: Range<u64>) -> bool {
        false
    }
    fn normal(copied: bool) -> ClusterKind {
        ClusterKind::Normal { host: H, copied }
    }

    #[test]
    fn standard_unallocated_without_backing_writes_only_the_guest_bytes() {
        let p = plan(
            &std64k(),
            ClusterKind::Unallocated,
            SubclusterBitmap(0),
            4 * KIB,
            4 * KIB,
            64 * KIB,
            false,
            false,
            &never,
        );
        assert_eq!(p.target, Target::Fresh);
        assert_eq!(p.write, 4 * KIB..8 * KIB);
        assert!(p.fills.is_empty() && p.fill_zero && !p.free_old);
        assert_eq!(p.entry, NewEntry::Normal);
    }

    #[test]
    fn standard_unallocated_over_backing_copies_the_whole_cluster() {
        let p = plan(
            &std64k(),
            ClusterKind::Unallocated,
            SubclusterBitmap(0),
            4 * KIB,
            4 * KIB,
            64 * KIB,
            true,
            false,
            &never,
        );
        assert_eq!(p.write, 0..64 * KIB);
        assert_eq!(p.fills, vec![0..4 * KIB, 8 * KIB..64 * KIB]);
        assert!(!p.fill_zero && !p.free_old);
    }

    #[test]
    fn fills_over_backing_zeros_are_skipped() {
        // The backing file reads as zeros before 32 KiB (a hole), data after it.
        let hole = |r: Range<u64>| r.end <= 32 * KIB;
        // A new cluster: the zero head is neither read nor written; the tail is copied.
        let p = plan(
            &std64k(),
            ClusterKind::Unallocated,
            SubclusterBitmap(0),
            4 * KIB,
            4 * KIB,
            64 * KIB,
            true,
            false,
            &hole,
        );
        assert_eq!(p.write, 4 * KIB..64 * KIB);
        assert_eq!(p.fills, vec![8 * KIB..64 * KIB]);
        // Zeros on both sides: only the guest's bytes.
        let p = plan(
            &std64k(),
            ClusterKind::Unallocated,
            SubclusterBitmap(0),
            4 * KIB,
            4 * KIB,
            64 * KIB,
            true,
            false,
            &|_| true,
        );
        assert_eq!((p.write.clone(), p.fills.len()), (4 * KIB..8 * KIB, 0));
        // Extended L2, only the touched subcluster's missing part, skipped when zero.
        let p =
            plan(&ext64k(), ClusterKind::Unallocated, SubclusterBitmap(0), 3 * KIB, KIB, 64 * KIB, true, false, &hole);
        assert_eq!((p.write.clone(), p.fills.len()), (3 * KIB..4 * KIB, 0));
        // In place in an owned cluster not known clean: the zero edge is still written
        // (zeros from the buffer), but not read.
        let bm = SubclusterBitmap::from_parts(0b10, 0);
        let p = plan(&ext64k(), normal(true), bm, 3 * KIB, 2 * KIB, 64 * KIB, true, false, &hole);
        assert_eq!((p.write.clone(), p.fills.len()), (3 * KIB..6 * KIB, 0));
        // Known clean: not written either.
        let p = plan(&ext64k(), normal(true), bm, 3 * KIB, 2 * KIB, 64 * KIB, true, true, &hole);
        assert_eq!((p.write.clone(), p.fills.len()), (3 * KIB..5 * KIB, 0));
        // A cluster shared with a snapshot is copied from itself, not from the backing file.
        let p = plan(&std64k(), normal(false), SubclusterBitmap(0), 0, 512, 64 * KIB, true, false, &|_| true);
        assert_eq!((p.write.clone(), p.fills.len()), (0..64 * KIB, 1));
    }

    #[test]
    fn fills_stop_at_the_end_of_the_disk() {
        let p =
            plan(&std64k(), ClusterKind::Unallocated, SubclusterBitmap(0), 0, 4 * KIB, 10 * KIB, true, false, &never);
        assert_eq!(p.fills, vec![4 * KIB..10 * KIB]);
    }

    #[test]
    fn compressed_and_shared_clusters_are_copied_and_freed() {
        for kind in [ClusterKind::Compressed { host: H, len: 1000 }, normal(false)] {
            let p = plan(&std64k(), kind, SubclusterBitmap(0), 0, 512, 64 * KIB, false, false, &never);
            assert_eq!((p.target, p.write.clone(), p.free_old, p.fill_zero), (Target::Fresh, 0..64 * KIB, true, false));
            assert_eq!(p.fills, vec![512..64 * KIB]);
        }
    }

    #[test]
    fn zero_clusters_need_no_fill() {
        let p =
            plan(&std64k(), ClusterKind::ZeroPlain, SubclusterBitmap(0), 8 * KIB, 512, 64 * KIB, true, false, &never);
        assert_eq!((p.target, p.write.clone(), p.fill_zero), (Target::Fresh, 8 * KIB..8 * KIB + 512, true));
        let own = ClusterKind::ZeroAlloc { host: H, copied: true };
        let p = plan(&std64k(), own, SubclusterBitmap(0), 8 * KIB, 512, 64 * KIB, true, false, &never);
        assert_eq!((p.target, p.write.clone(), p.fill_zero, p.free_old), (Target::Own(H), 0..64 * KIB, true, false));
        let shared = ClusterKind::ZeroAlloc { host: H, copied: false };
        let p = plan(&std64k(), shared, SubclusterBitmap(0), 8 * KIB, 512, 64 * KIB, true, false, &never);
        assert_eq!((p.target, p.free_old), (Target::Fresh, true));
    }

    #[test]
    fn extended_unallocated_writes_the_touched_subclusters() {
        // 64 KiB clusters: 2 KiB subclusters. 1 KiB at 3 KiB touches subcluster 1 only.
        let g = ext64k();
        let p = plan(&g, ClusterKind::Unallocated, SubclusterBitmap(0), 3 * KIB, KIB, 64 * KIB, true, false, &never);
        assert_eq!(p.target, Target::Fresh);
        assert_eq!(p.write, 2 * KIB..4 * KIB);
        assert_eq!(p.fills, vec![2 * KIB..3 * KIB]);
        assert_eq!(p.bitmap, SubclusterBitmap::from_parts(0b10, 0));
        // Without a backing file only the guest's bytes.
        let p = plan(&g, ClusterKind::Unallocated, SubclusterBitmap(0), 3 * KIB, KIB, 64 * KIB, false, false, &never);
        assert_eq!((p.write.clone(), p.fills.len()), (3 * KIB..4 * KIB, 0));
        // Straddling subclusters 1..=3, zero bits of the touched ones cleared.
        let p = plan(
            &g,
            ClusterKind::ZeroPlain,
            SubclusterBitmap::from_parts(0, 0b11110),
            3 * KIB,
            4 * KIB,
            64 * KIB,
            true,
            false,
            &never,
        );
        assert_eq!(p.bitmap, SubclusterBitmap::from_parts(0b1110, 0b10000));
    }

    #[test]
    fn extended_own_cluster_fills_only_unallocated_edges() {
        let g = ext64k();
        // Subcluster 1 holds data, 2 does not: a write from 3 KiB to 5 KiB writes subcluster
        // 1 only where the guest writes and subcluster 2 whole.
        let bm = SubclusterBitmap::from_parts(0b10, 0);
        let p = plan(&g, normal(true), bm, 3 * KIB, 2 * KIB, 64 * KIB, true, false, &never);
        assert_eq!(p.target, Target::Own(H));
        assert_eq!(p.write, 3 * KIB..6 * KIB);
        assert_eq!(p.fills, vec![5 * KIB..6 * KIB]);
        assert_eq!(p.entry, NewEntry::Keep);
        assert_eq!(p.bitmap, SubclusterBitmap::from_parts(0b110, 0));
        assert!(!p.free_old);
        // No backing file: the unallocated edge reads as zeros; no fill reads.
        let p = plan(&g, normal(true), bm, 3 * KIB, 2 * KIB, 64 * KIB, false, false, &never);
        assert!(p.fill_zero && p.fills.is_empty());
        assert_eq!(
            p.write,
            3 * KIB..6 * KIB,
            "in place: the zero edge is still written (the cluster may hold old bytes)"
        );
        // Known clean (its unallocated subclusters read as zeros on the host): only the
        // guest's bytes, the subclusters allocated as before.
        let p = plan(&g, normal(true), bm, 3 * KIB, 2 * KIB, 64 * KIB, false, true, &never);
        assert_eq!((p.write.clone(), p.fills.len()), (3 * KIB..5 * KIB, 0));
        assert_eq!(p.bitmap, SubclusterBitmap::from_parts(0b110, 0));
        // Clean does not help over a backing file: the edge is copied from it.
        let p = plan(&g, normal(true), bm, 3 * KIB, 2 * KIB, 64 * KIB, true, true, &never);
        assert_eq!(p.write, 3 * KIB..6 * KIB);
        assert_eq!((p.fills.len(), p.fills[0].clone()), (1, 5 * KIB..6 * KIB));
        // Nor in a standard cluster (no subclusters to leave unallocated).
        let own = ClusterKind::ZeroAlloc { host: H, copied: true };
        let p = plan(&std64k(), own, SubclusterBitmap(0), 8 * KIB, 512, 64 * KIB, false, true, &never);
        assert_eq!(p.write, 0..64 * KIB);
    }
}
