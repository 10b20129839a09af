//! Guest -> host translation through the active L1 table and the L2 cache (spec: "Cluster
//! mapping"). The hit path is index math plus one or two atomic loads.

use crate::format::l2::{self, Extent, L2Entry, SubclusterBitmap};
use crate::format::types::GuestOffset;
use crate::image::Image;
use crate::{Error, Result};

/// The result of translating a guest range in one image (one layer of a chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// What the first `len` bytes are.
    Mapped {
        /// What the bytes are.
        extent: Extent,
        /// Length in bytes.
        len: u64,
        /// The L2 cache answered (a hit); false when no L2 entry was needed (an empty L1
        /// entry or an L2-less range).
        cached: bool,
    },
    /// The L2 slice at host offset `key` is not cached: load it and retry.
    Miss {
        /// Host offset of the slice (the cache key).
        key: u64,
    },
}

/// Where an L2 entry lives: cache key (slice host offset) and word index in the slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Slot {
    /// Host offset of the slice (cache key).
    pub key: u64,
    /// Index of the entry's first 64-bit word inside the slice.
    pub word: usize,
}

impl Image {
    /// Locates the L2 entry of the cluster at `off`; `None` when its L1 entry is empty.
    #[inline]
    pub(crate) fn l2_slot(&self, off: GuestOffset) -> Result<Option<L2Slot>> {
        let g = &self.geo;
        let c = g.guest_cluster(off);
        let l1i = g.l1_index(c);
        let l1e = self.l1_entry(l1i);
        let l2_off = l1e.l2_offset().0;
        if l2_off == 0 {
            return Ok(None);
        }
        if l1e.contiguous() {
            return Err(Error::InvalidRequest(format!("L1 entry {l1i} is an L2-less range: it has no L2 table")));
        }
        if l2_off > crate::meta::cache::MAX_KEY {
            return Err(Error::corrupt("L1 entry", format!("entry {l1i}: L2 table offset {l2_off:#x} is too large")));
        }
        if l2_off.checked_add(g.cluster_size()).is_none_or(|e| e > self.file_len()) {
            return Err(Error::corrupt(
                "L1 entry",
                format!(
                    "entry {l1i} (guest offset {:#x}) points to an L2 table at {l2_off:#x}, which lies past the end of the file ({} bytes)",
                    l1i.saturating_mul(g.l1_coverage()),
                    self.file_len()
                ),
            ));
        }
        let idx = g.l2_index(c);
        let slice = idx / self.slice_entries;
        let in_slice = idx % self.slice_entries;
        let key = l2_off + slice * self.l2_cache.slot_size() as u64;
        let word = (in_slice * (g.l2_entry_size() / 8)) as usize;
        Ok(Some(L2Slot { key, word }))
    }

    /// The host offset of `off` when it lies in an L2-less (contiguous) range.
    #[inline]
    pub(crate) fn contiguous_host(&self, off: GuestOffset) -> Option<u64> {
        if !self.l2less {
            return None;
        }
        let g = &self.geo;
        let l1e = self.l1_entry(g.l1_index(g.guest_cluster(off)));
        (l1e.contiguous() && l1e.l2_offset().0 != 0).then(|| l1e.l2_offset().0 + (off.0 & (g.l1_coverage() - 1)))
    }

    /// Translates up to `len` bytes at `off` (which must lie inside the image) in this layer
    /// only, never past the end of the cluster.
    #[inline]
    pub(crate) fn lookup(&self, off: GuestOffset, len: u64) -> Result<Lookup> {
        self.lookup_with(off, len, |slot, pair| {
            if pair {
                self.l2_cache.read_pair(slot.key, slot.word)
            } else {
                self.l2_cache.read_word(slot.key, slot.word).map(|e| (e, 0))
            }
        })
    }

    /// [`Image::lookup`] with the L2 entry (and, with `pair`, the subcluster bitmap) read
    /// by `entry` instead of from the cache: None is a miss. Used for a request's private
    /// copy of a slice (see `queue/read.rs`).
    #[inline]
    pub(crate) fn lookup_with(
        &self,
        off: GuestOffset,
        len: u64,
        entry: impl Fn(L2Slot, bool) -> Option<(u64, u64)>,
    ) -> Result<Lookup> {
        let g = &self.geo;
        let in_cluster = g.offset_in_cluster(off.0);
        let len = len.min(g.cluster_size() - in_cluster).min(self.vsize() - off.0);
        if let Some(host) = self.contiguous_host(off) {
            return Ok(Lookup::Mapped { extent: Extent::Data(crate::format::HostOffset(host)), len, cached: false });
        }
        let Some(slot) = self.l2_slot(off)? else {
            return Ok(Lookup::Mapped { extent: Extent::Unallocated, len, cached: false });
        };
        let (entry, bitmap) = match entry(slot, g.extended_l2) {
            Some((e, b)) => (L2Entry(e), SubclusterBitmap(b)),
            None => return Ok(Lookup::Miss { key: slot.key }),
        };
        let (extent, len) = l2::classify(g, entry, bitmap, in_cluster, len).map_err(|e| match e {
            Error::Corrupt { what, detail } => {
                let e =
                    Error::corrupt(what, format!("{detail} (guest offset {:#x}, L2 slice at {:#x})", off.0, slot.key));
                // Where QEMU marks the image corrupt on a read too, so does quring (only
                // when this layer is open for writing; see Image::signal_corruption).
                if self.meta.is_some() && l2::signals_corruption_on_read(g, entry, bitmap) {
                    self.signal_corruption(e)
                } else {
                    e
                }
            }
            e => e,
        })?;
        // (An external data file is not bounded by the image file: past its end it reads
        // as zeros, as in QEMU.)
        if let Extent::Data(h) = extent
            && !g.external_data
            && h.0.checked_add(len).is_none_or(|e| e > self.file_len().div_ceil(g.cluster_size()) * g.cluster_size())
        {
            return Err(Error::corrupt(
                "L2 entry",
                format!("guest offset {:#x} maps to host offset {:#x}, past the end of the file", off.0, h.0),
            ));
        }
        Ok(Lookup::Mapped { extent, len, cached: true })
    }
}
