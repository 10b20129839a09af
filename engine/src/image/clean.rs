//! `cache-clean-interval` (QEMU's runtime option of that name): L2 slices that nobody used
//! for an interval are dropped and their memory given back to the system.

use super::{Backing, Image};

impl Image {
    /// `cache-clean-interval`: drops the L2 slices of this image and its backing chain that
    /// nobody used since the last clean, and gives their memory back; returns how many.
    /// Run by the queues once per interval as they reap; call it from a timer to clean an
    /// idle image.
    pub fn clean_cache(&self) -> usize {
        let mut n = self.l2_cache.clean();
        let mut layer = &self.backing;
        while let Some(Backing::Qcow2(b)) = layer {
            n += b.l2_cache.clean();
            layer = &b.backing;
        }
        n
    }

    /// Cleans the cache if the interval has passed (cheap otherwise: a clock read and a
    /// load). One caller wins each interval.
    #[inline]
    pub(crate) fn maybe_clean_cache(&self) {
        use std::sync::atomic::Ordering;
        let next = self.next_clean_ms.load(Ordering::Relaxed);
        if next == u64::MAX {
            return;
        }
        let now = self.opened_at.elapsed().as_millis() as u64;
        if now < next {
            return;
        }
        let Some(every) = self.opts.cache_clean_interval else { return };
        let every = (every.as_millis() as u64).max(1);
        if self.next_clean_ms.compare_exchange(next, now + every, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.clean_cache();
        }
    }
}
