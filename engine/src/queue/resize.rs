//! Live resize (`qemu-img resize`, a VMM's block_resize): QEMU's `qcow2_co_truncate` and the
//! block layer's zeroing of a grown range over a backing file, on one queue while the
//! others keep serving requests.

use super::blocking::BLOCKING_TAG;
use super::*;
use crate::format::layout::Preallocation;

/// How [`Queue::resize`] may change the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// A smaller size is accepted (`qemu-img resize --shrink`); without it a shrink is
    /// refused.
    pub shrink: bool,
    /// Preallocation of the grown range (`--preallocation=`): `metadata` writes zero
    /// clusters there (v3), `falloc` and `full` write zeros as data. Only for growing.
    pub preallocation: Preallocation,
}

impl Queue {
    /// Resizes the virtual disk to `new_size` bytes (a positive multiple of 512), blocking
    /// this queue's thread; other queues keep running. Requests past the new end are
    /// refused once a shrink has lowered the size (a VMM stops guest I/O there first: a
    /// write still in flight past the new end when the shrink starts may leave a leaked
    /// cluster).
    ///
    /// Growing: the L1 table gets room, and when the backing file is longer than the old
    /// size the grown range is written as zeros (zero clusters on v3; QEMU's rule, so that
    /// the backing file's data past the old end never shows; v2 images cannot say it and
    /// the resize fails as QEMU's does). Shrinking: every cluster from the first cluster
    /// boundary at or past the new end is unmapped and freed (shared clusters lose one
    /// reference), the L2 tables past the end are freed and the file is truncated after
    /// its last cluster in use.
    pub fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        let img = self.image.clone();
        img.check_resizable(new_size)?;
        let old = img.vsize();
        if new_size == old {
            return Ok(());
        }
        // Before any change (the bitmaps are in use on disk from begin_bitmap_resize on).
        img.check_bitmaps_resizable(new_size)?;
        if new_size < old {
            if !opts.shrink {
                return Err(Error::InvalidRequest("Use the --shrink option to perform a shrink operation.".into()));
            }
            if opts.preallocation != Preallocation::Off {
                return Err(Error::InvalidRequest("Preallocation can't be used for shrinking an image".into()));
            }
            img.begin_bitmap_resize()?;
            let cs = img.geo.cluster_size();
            let cut = new_size.div_ceil(cs) * cs;
            if cut < old {
                self.full_discard(cut, old - cut)?;
            }
            self.flush()?;
            img.finish_shrink(new_size)?;
            // Persistent bitmaps follow (QEMU's bdrv_dirty_bitmap_truncate).
            return img.finish_bitmap_resize(old, new_size);
        }
        let zero_below = img.backing_len() > old;
        if zero_below && img.version < 3 {
            return Err(Error::Unsupported("Failed to zero out new clusters: Operation not supported".into()));
        }
        // The bitmaps follow after the zeroing and preallocation below, which QEMU does not
        // count as guest writes (the tracked bitmaps, still of the old size, clip those
        // marks); the untracked ones are in use on disk meanwhile.
        img.begin_bitmap_resize()?;
        img.grow(new_size)?;
        let len = new_size - old;
        match opts.preallocation {
            Preallocation::Off | Preallocation::Metadata if zero_below || opts.preallocation != Preallocation::Off => {
                self.write_zeroes(old, len, false)?
            }
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc | Preallocation::Full => {
                let chunk = crate::io::AlignedBuf::new(1 << 20);
                let mut pos = old;
                while pos < new_size {
                    let n = (new_size - pos).min(chunk.len() as u64) as usize;
                    self.write_at(&chunk[..n], pos)?;
                    pos += n as u64;
                }
            }
        }
        self.flush()?;
        img.finish_bitmap_resize(old, new_size)
    }

    /// Blocking: unmaps and frees `[offset, offset + len)` whatever lies below (QEMU's full
    /// discard: the range becomes unallocated and shows the backing file again; used by a
    /// shrink, where the range may lie past the size it is about to set, and by `commit`,
    /// which empties the overlay as QEMU's `make_empty` does).
    pub fn full_discard(&mut self, offset: u64, len: u64) -> Result<()> {
        let entered = self.image.enter(&self.gate);
        let id = self.new_req(
            BLOCKING_TAG,
            ReqKind::Discard { full: true },
            offset,
            len,
            std::ptr::null_mut(),
            Parent::Caller,
        );
        self.admit(id, Some(entered));
        self.drive(id);
        self.wait_blocking()
    }
}
