//! Reading a persistent bitmap for export (backup tools through the library, `quring map
//! --bitmap`, the NBD `qemu:dirty-bitmap:NAME` metadata context): the dirty ranges of the
//! whole disk, or a [`BitmapView`] that answers block-status queries range by range.
//!
//! A bitmap this session tracks is read live (writes still in flight may or may not show
//! yet, as with QEMU's exports); any other bitmap is read from disk once, its table and data
//! validated. A bitmap left `in_use` by another writer is inconsistent and refused, with
//! QEMU's message.

use super::bitmaps::{find, inconsistent, read_data};
use super::*;
use crate::format::types::GuestOffset;
use crate::meta::dirty::DirtyBitmap;

/// The bits of one bitmap, for block-status queries.
#[derive(Clone, Debug)]
pub struct BitmapView {
    bits: Arc<DirtyBitmap>,
}

impl BitmapView {
    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.bits.granularity_bits()
    }

    /// The runs of guest bytes `[offset, offset + len)` (clipped to the disk): `(length,
    /// dirty)`, adjacent runs of one state merged, at most `max` runs.
    pub fn runs(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        self.bits.runs(offset, len, max)
    }
}

impl Image {
    /// The dirty guest ranges of bitmap `name` (merged, clipped to the disk size): what
    /// changed since the bitmap was created or cleared, for a backup tool to copy.
    pub fn dirty_ranges(&self, name: &str) -> Result<Vec<(GuestOffset, u64)>> {
        let bits = self.bits_of(name)?;
        Ok(bits.dirty_ranges().into_iter().map(|(o, l)| (GuestOffset(o), l)).collect())
    }

    /// A view of bitmap `name` for range queries (an NBD export of the bitmap).
    pub fn bitmap_view(&self, name: &str) -> Result<BitmapView> {
        Ok(BitmapView { bits: self.bits_of(name)? })
    }

    /// The bits of bitmap `name`: the tracked ones, or read from disk.
    pub(super) fn bits_of(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let dir = self.bitmap_dir.lock().unwrap_or_else(|e| e.into_inner());
        let r = find(&dir, name)?;
        if let Some(l) = &r.live {
            return Ok(l.clone());
        }
        if r.entry.in_use() {
            return Err(inconsistent(name));
        }
        let cs = self.geo.cluster_size();
        Ok(Arc::new(read_data(&self.sync, self.file.fd(), cs, &r.entry, self.vsize(), self.file_len())?))
    }
}
