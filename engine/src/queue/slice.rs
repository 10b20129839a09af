//! L2 slice loads on the queue's ring: claim a cache slot, read the slice into it, park
//! requests on it.

use super::*;
use crate::meta::cache::Claim;
use io_uring::{opcode, types};

impl Queue {
    /// When the L2 cache set of `key` is full of dirty slices, writes metadata back (under
    /// the metadata lock, if free) so that a slot can be reused.
    pub(crate) fn unclog(&mut self, layer: &std::sync::Arc<crate::image::Image>, key: u64) {
        if layer.meta.is_none() || !layer.l2_cache.set_clogged(key) {
            return;
        }
        if let Ok(Some(mut st)) = layer.try_meta() {
            st.rc.pending_free.append(&mut self.local_frees);
            let _ = layer.flush_metadata(&mut st, false, &self.counters);
        }
    }

    /// Starts loading L2 slice `key` of `layer` (or waits for the queue loading it).
    /// Returns true when it is already cached.
    pub(crate) fn load_slice(&mut self, layer: std::sync::Arc<crate::image::Image>, key: u64) -> bool {
        let mut evicted = false;
        let claim = layer.l2_cache.claim_noting(key, &mut evicted);
        if evicted {
            crate::counters::Counters::bump(&self.counters.l2_evictions, 1);
        }
        match claim {
            Claim::Present(_) => true,
            Claim::Busy => {
                self.unclog(&layer, key);
                false
            }
            Claim::Load(slot) => {
                crate::counters::Counters::bump(&self.counters.l2_misses, 1);
                let len = layer.l2_cache.slot_size();
                let ptr = layer.l2_cache.slot_ptr(slot);
                let fd = layer.file.fd();
                let io = self.ios.insert(Io::Load { layer, slot, key, len });
                let sqe = opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(key).build().user_data(io as u64);
                self.push(sqe);
                false
            }
        }
    }

    /// Parks request `id` until L2 slice `key` of this image is cached (starting its load).
    pub(crate) fn park_slice(&mut self, id: usize, key: u64) {
        // If it is cached already the parked request is simply retried at once.
        self.load_slice(self.image.clone(), key);
        self.reqs[id].parked = true;
        self.parked.push((id, key));
    }
}
