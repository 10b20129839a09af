//! Zero writes and discards: L2 entry changes (zero flag, zero bitmap, deallocation) where
//! the metadata can say it, zeros written as data where it cannot.

use super::*;
use crate::format::l2::{self, ClusterKind, L2Entry, SubclusterBitmap, subcluster_mask};
use crate::format::types::GuestOffset;
use crate::meta::cache::SlotId;

/// What a zero write or discard does to one L2 entry.
#[derive(Clone, Copy)]
enum ZeroHow {
    /// A zero write (`unmap`: allocated clusters may be deallocated).
    Zero { unmap: bool },
    /// A guest discard: reads zeros or backing data afterwards (v3 images with a backing
    /// file keep the zero flag).
    Discard,
    /// The entry becomes 0 and its cluster is freed (the range a shrink cuts off).
    Full,
}

impl Queue {
    /// Advances a zero-write or discard request.
    pub(crate) fn drive_zero(&mut self, id: usize) {
        // Hold the request open while we walk it: a nested completion (a child request
        // that finishes at once) must not finish it under our feet.
        self.reqs[id].pending += 1;
        let img = self.image.clone();
        let g = img.geo;
        let cs = g.cluster_size();
        let v3 = img.version >= 3;
        while let Some((pos, end)) = self.walk_next(id) {
            let kind = self.reqs[id].kind;
            let cstart = pos - g.offset_in_cluster(pos);
            let cend = (cstart + cs).min(img.vsize());
            let n = end.min(cend) - pos;
            let whole = pos == cstart && pos + n == cend;
            // v2 images have no zero flag; without a backing file an unallocated cluster
            // reads as zeros, so a zero write of whole clusters deallocates them as a
            // discard does (QEMU's qcow2_subcluster_zeroize resorts to discard there).
            // Writing zeros as data would allocate every cluster a guest zeroes.
            let full = kind == ReqKind::Discard { full: true };
            let v2_zero_as_discard = !v3 && whole && img.backing.is_none() && !matches!(kind, ReqKind::Discard { .. });
            let discard = matches!(kind, ReqKind::Discard { .. }) || v2_zero_as_discard;
            let unmap = matches!(kind, ReqKind::Zero { unmap: true });
            // Pieces the metadata cannot express are written as zeros (zero writes) or
            // ignored (discards).
            let (meta_start, meta_end) = if whole {
                (pos, pos + n)
            } else if g.extended_l2 && !discard && v3 {
                // Only whole subclusters can be zeroed in the bitmap: the ones that lie
                // inside [pos, pos+n). A range inside one subcluster has none (the last
                // subcluster of a disk that ends inside it counts as whole).
                let scs = g.subcluster_size();
                let a = pos.div_ceil(scs) * scs;
                let b = if pos + n == cend { pos + n } else { (pos + n) / scs * scs };
                if a < b { (a, b) } else { (pos, pos) }
            } else {
                (pos, pos)
            };
            // v2 images have no zero flag: a discard there would expose the backing file,
            // so QEMU ignores discards on v2 images with a backing file, and so do we.
            if discard && (meta_start == meta_end || (!v3 && img.backing.is_some() && !full)) {
                self.reqs[id].cursor += n;
                continue;
            }
            if !discard && (!v3 || meta_start == meta_end || meta_start > pos || meta_end < pos + n) {
                // Zero data for the parts outside [meta_start, meta_end).
                let parts: Vec<(u64, u64)> = if !v3 || meta_start >= meta_end {
                    vec![(pos, pos + n)]
                } else {
                    [(pos, meta_start), (meta_end, pos + n)].into_iter().filter(|(a, b)| b > a).collect()
                };
                if !parts.is_empty() {
                    for (a, b) in parts {
                        let zp = self.zeros.as_mut_ptr();
                        self.reqs[id].pending += 1;
                        let rid = self.new_req(0, ReqKind::Write, a, b - a, zp, Parent::Req(id));
                        self.drive_write(rid);
                    }
                    if !v3 || meta_start >= meta_end {
                        self.reqs[id].cursor += n;
                        continue;
                    }
                }
            }
            // Metadata change for [meta_start, meta_end) of this cluster.
            let l1i = g.l1_index(g.guest_cluster(GuestOffset(pos)));
            let l1e = img.l1_entry(l1i);
            if l1e.l2_offset().0 == 0 && (img.backing.is_none() || full) {
                // No table and nothing below (or a full discard): nothing to change.
                self.reqs[id].cursor += n;
                continue;
            }
            if !img.write_l1_ready(l1i) {
                if self.table_ready(id, l1i) {
                    continue;
                }
                break;
            }
            let at = match img.l2_slot(GuestOffset(pos)) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    self.fail_write(id, e);
                    break;
                }
            };
            let Some(slot) = img.l2_cache.pin(at.key) else {
                self.park_slice(id, at.key);
                break;
            };
            let st = match img.try_meta() {
                Ok(Some(st)) => st,
                Ok(None) => {
                    img.l2_cache.unpin(slot);
                    self.park_lock(id);
                    break;
                }
                Err(e) => {
                    img.l2_cache.unpin(slot);
                    self.fail_with(id, e);
                    break;
                }
            };
            let how = if full {
                ZeroHow::Full
            } else if discard {
                ZeroHow::Discard
            } else {
                ZeroHow::Zero { unmap }
            };
            let mut dropped = None;
            let r =
                self.zero_entry(slot, at.word, meta_start - cstart, meta_end - meta_start, whole, how, &mut dropped);
            drop(st);
            img.l2_cache.unpin(slot);
            match r {
                Ok(true) => {
                    // A raw data file stays a raw image of the disk: the range reads as
                    // zeros there too (QEMU zeroes the data file in qcow2_subcluster_zeroize
                    // and passes discards through). Otherwise a dropped mapping gives its
                    // cluster's space back (the discard passed through), when it is the
                    // cluster at the guest offset, where quring and QEMU place data.
                    let punch = match &img.data_file {
                        Some(d) if d.raw() => Some((meta_start, meta_end - meta_start)),
                        Some(_) => dropped.filter(|&h| h == cstart).map(|h| (h, cs)),
                        None => None,
                    };
                    if let Some((off, len)) = punch
                        && let Err(e) = img.punch_data(off, len)
                    {
                        self.fail_with(id, e);
                        break;
                    }
                }
                Ok(false) => {
                    // The entry cannot express it (part of a compressed cluster): zeros
                    // are written as data, which copies the cluster (as QEMU does).
                    let zp = self.zeros.as_mut_ptr();
                    self.reqs[id].pending += 1;
                    let rid = self.new_req(0, ReqKind::Write, meta_start, meta_end - meta_start, zp, Parent::Req(id));
                    self.drive_write(rid);
                }
                Err(e) => {
                    self.fail_write(id, e);
                    break;
                }
            }
            self.reqs[id].cursor += n;
        }
        self.reqs[id].pending -= 1;
        self.maybe_finish(id);
    }

    /// Rewrites one L2 entry for a zero write or discard (metadata lock held). `Ok(false)`:
    /// the entry cannot express the change (a partial zero write to a compressed cluster);
    /// nothing was changed and the range must be written as zeros. `dropped` receives the
    /// host offset of a cluster the entry no longer maps.
    #[allow(clippy::too_many_arguments)]
    fn zero_entry(
        &mut self,
        slot: SlotId,
        word: usize,
        in_c: u64,
        len: u64,
        whole: bool,
        how: ZeroHow,
        dropped: &mut Option<u64>,
    ) -> Result<bool> {
        let (discard, unmap, full) = match how {
            ZeroHow::Zero { unmap } => (false, unmap, false),
            ZeroHow::Discard => (true, false, false),
            ZeroHow::Full => (true, false, true),
        };
        let img = self.image.clone();
        let g = img.geo;
        let cache = &img.l2_cache;
        loop {
            let e = cache.load_word(slot, word);
            let kind = L2Entry(e).decode(&g)?;
            let allocated = matches!(kind, ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. });
            let compressed = matches!(kind, ClusterKind::Compressed { .. });
            if g.extended_l2 {
                let b = cache.load_word(slot, word + 1);
                let (ne, nb, free) = if whole && full {
                    (0, 0, allocated || compressed)
                } else if whole {
                    let drop_it = compressed || (allocated && (unmap || discard));
                    let ne = if drop_it { 0 } else { e };
                    (ne, SubclusterBitmap::from_parts(0, u32::MAX).0, drop_it)
                } else {
                    if compressed {
                        return Ok(false);
                    }
                    let s0 = g.subcluster_index(in_c);
                    let s1 = g.subcluster_index(in_c + len - 1);
                    let m = subcluster_mask(s0, s1);
                    let bm = SubclusterBitmap(b);
                    (e, SubclusterBitmap::from_parts(bm.alloc() & !m, bm.zero() | m).0, false)
                };
                if allocated {
                    // The subclusters keep their bytes: the cluster is no longer known
                    // clean (before the entry changes, so a job planned from it loses its
                    // publication rather than trust a stale mark).
                    img.unmark_clean(L2Entry(e).host_offset().0);
                }
                cache.store_pair(slot, word, ne, nb);
                if free {
                    self.owe_free(L2Entry(e));
                    *dropped = allocated.then(|| L2Entry(e).host_offset().0);
                }
                return Ok(true);
            }
            let has_backing = img.backing.is_some();
            let (ne, free) = if discard {
                let v3 = img.version >= 3;
                let ne = if v3 && !full && (has_backing || allocated || compressed) { l2::L2_ZERO } else { 0 };
                (ne, allocated || compressed)
            } else {
                let drop_it = compressed || (unmap && allocated);
                let ne = if drop_it { l2::L2_ZERO } else { e | l2::L2_ZERO };
                (ne, drop_it)
            };
            if ne == e {
                return Ok(true);
            }
            if cache.cas_word(slot, word, e, ne) {
                if free {
                    self.owe_free(L2Entry(e));
                    *dropped = allocated.then(|| L2Entry(e).host_offset().0);
                }
                return Ok(true);
            }
        }
    }
}
