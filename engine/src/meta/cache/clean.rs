//! `cache-clean-interval` (QEMU's option of that name): dropping slices nobody used for an
//! interval and giving their memory back to the system.

use super::Ordering;
#[cfg(not(loom))]
use super::SlotId;
use super::{GEN_MASK, GEN_SHIFT, MetaCache, PIN_MASK, ST_EMPTY, ST_LOADING, ST_MASK, ST_VALID};

impl MetaCache {
    /// `cache-clean-interval`'s work, called once per interval: drops every valid slice
    /// that nobody used since the previous call (not pinned, not dirty) and returns its
    /// memory to the system where a slot spans whole pages; clears the "used" mark of the
    /// others for the next call. Returns how many slices were dropped.
    ///
    /// A dropped slot is taken into loading state first, so no claimer can load into it
    /// while its pages are given back (a load that landed before the `madvise` would be
    /// zeroed under it).
    pub fn clean(&self) -> usize {
        let mut dropped = 0;
        for s in 0..self.ctl.len() {
            let c = self.ctl[s].load(Ordering::Acquire);
            if c & ST_MASK != ST_VALID || c & PIN_MASK != 0 || self.dirty[s].load(Ordering::Acquire) != 0 {
                continue;
            }
            if self.used[s].swap(0, Ordering::Relaxed) != 0 {
                continue;
            }
            let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
            if self.ctl[s].compare_exchange(c, g | ST_LOADING, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            if self.dirty[s].load(Ordering::Acquire) != 0 {
                // Marked dirty meanwhile (by a writer that held no pin: it must): keep it.
                self.ctl[s].store(c, Ordering::Release);
                continue;
            }
            self.release_memory(s);
            let g = (g + (1 << GEN_SHIFT)) & GEN_MASK;
            self.ctl[s].store(g | ST_EMPTY, Ordering::Release);
            self.notify_set(self.set_of_slot(s));
            dropped += 1;
        }
        dropped
    }

    /// Gives the pages of slot `s` (owned in loading state) back to the system, when the
    /// slot covers whole pages; they read as zeros until loaded again.
    #[cfg(not(loom))]
    fn release_memory(&self, s: usize) {
        if self.slot_size >= 4096 {
            // SAFETY: the range is one slot inside the arena, page aligned (the arena is 4 KiB
            // aligned and slots are power-of-two multiples of 4 KiB here); the slot is ours
            // in loading state, so no load writes into it, and readers only read it under
            // seqlock validation (they retry after the generation moved).
            unsafe { libc::madvise(self.slot_ptr(SlotId(s as u32)).cast(), self.slot_size, libc::MADV_DONTNEED) };
        }
    }

    #[cfg(loom)]
    fn release_memory(&self, _s: usize) {}
}
