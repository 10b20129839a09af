//! The one path by which an L2 slice enters the cache, for every reader of it (the queues'
//! asynchronous loads and the tools' synchronous ones): claim a slot (counting the miss and
//! any eviction), have the caller read the slice into it, then check the bytes read
//! ([`Image::check_l2_slice`]) and publish them, or give the slot up.

use super::Image;
use crate::counters::Counters;
use crate::meta::cache::{Claim, SlotId};
use crate::{Error, Result};

/// What claiming a slice for loading gave.
pub(crate) enum SliceClaim {
    /// The slice is cached.
    Cached,
    /// Another request is loading it, or its cache set has no slot to give now.
    Busy,
    /// The caller owns `slot` (loading state) and must read `len` bytes at the slice's host
    /// offset into `ptr`, then call [`Image::publish_slice`].
    Load {
        /// The slot being loaded.
        slot: SlotId,
        /// Its memory.
        ptr: *mut u8,
        /// Its size (the slice size).
        len: usize,
    },
}

impl Image {
    /// Checks a slice read from the file: `read` is the read's outcome (bytes read, or an
    /// error), `word` reads its words (host-endian). A short read or contents that fail the
    /// overlap checks are errors ([`Error::Corrupt`] for bad contents).
    pub(crate) fn check_loaded_slice(&self, key: u64, read: Result<usize>, word: impl Fn(usize) -> u64) -> Result<()> {
        let len = self.l2_cache.slot_size();
        match read {
            Err(e) => Err(e),
            Ok(n) if n < len => Err(Error::corrupt(
                "L2 table",
                format!("the slice at {key:#x} extends past the end of the file (read {n} of {len} bytes)"),
            )),
            Ok(_) => self.check_l2_slice(key, word),
        }
    }

    /// Claims a cache slot to load L2 slice `key` into, counting a miss (and the eviction it
    /// causes) into `c` (atomically: the tools count into the image's shared counters; a
    /// miss costs a read anyway).
    pub(crate) fn claim_slice(&self, key: u64, c: &Counters) -> SliceClaim {
        let mut evicted = false;
        let claim = self.l2_cache.claim_noting(key, &mut evicted);
        if evicted {
            Counters::add(&c.l2_evictions, 1);
        }
        match claim {
            Claim::Present(_) => SliceClaim::Cached,
            Claim::Busy => SliceClaim::Busy,
            Claim::Load(slot) => {
                Counters::add(&c.l2_misses, 1);
                Counters::add(&c.meta_loads, 1);
                SliceClaim::Load { slot, ptr: self.l2_cache.slot_ptr(slot), len: self.l2_cache.slot_size() }
            }
        }
    }

    /// Finishes the load of slice `key` into `slot`: `read` is the read's outcome (bytes
    /// read, or an error). A short read or a slice that fails the overlap checks is not
    /// published: the slot is given up and the error returned (an [`Error::Corrupt`] for
    /// bad contents; marking the image corrupt is the caller's decision).
    pub(crate) fn publish_slice(&self, slot: SlotId, key: u64, read: Result<usize>) -> Result<()> {
        // The slot is ours (loading) until complete_load: nobody else reads or writes its
        // words, and nobody sees them before the check passed.
        let checked = self.check_loaded_slice(key, read, |w| self.l2_cache.load_word(slot, w));
        match checked {
            Ok(()) => {
                self.l2_cache.complete_load(slot);
                Ok(())
            }
            Err(e) => {
                self.l2_cache.abort_load(slot);
                Err(e)
            }
        }
    }

    /// Puts slices `keys` of an L2 table just written as zeros into the cache, clean, so
    /// that the writes that made the table do not read them back (an allocating write that
    /// spans L1 entries would otherwise park on a load per table). A slice already cached
    /// (another queue loaded it) or whose set has no slot to give now is left alone.
    pub(crate) fn install_zero_slices(&self, keys: impl Iterator<Item = u64>, c: &Counters) {
        let words = self.l2_cache.slot_size() / 8;
        for key in keys {
            let mut evicted = false;
            let claim = self.l2_cache.claim_noting(key, &mut evicted);
            if evicted {
                Counters::add(&c.l2_evictions, 1);
            }
            if let Claim::Load(slot) = claim {
                for w in 0..words {
                    self.l2_cache.init_word(slot, w, 0);
                }
                self.l2_cache.complete_load(slot);
            }
        }
    }
}
