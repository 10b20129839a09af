//! L2 slice loads on the queue's ring: claim a cache slot, read the slice into it, park
//! requests on it. A claim that is busy (another queue loads the slice, or its cache set
//! has no slot to give now) registers this queue with the set and claims once more; the
//! request then sleeps until that set changes (`queue/wake.rs`).

use super::*;
use crate::image::SliceClaim;
use io_uring::{opcode, types};

impl Queue {
    /// When the L2 cache set of `key` is full of dirty slices, asks for a metadata
    /// write-back (this queue's ring runs it at the next reap, or joins the one in flight)
    /// so that a slot can be reused: the slices are clean once copied and free once written;
    /// the set's waiters are woken then. For a backing image (never dirty) nothing to do.
    pub(crate) fn unclog(&mut self, layer: &Arc<Image>, key: u64) {
        if layer.meta.is_none() || !layer.l2_cache.set_clogged(key) {
            return;
        }
        if Arc::ptr_eq(layer, &self.image) {
            self.wb_wanted = true;
        }
    }

    /// Starts loading L2 slice `key` of `layer` (or waits for the queue loading it).
    /// Returns true when it is already cached.
    pub(crate) fn load_slice(&mut self, layer: Arc<Image>, key: u64) -> bool {
        let mut claim = layer.claim_slice(key, &self.counters);
        if let SliceClaim::Busy = claim {
            // Register, then look again: a change after this look wakes us.
            self.wait_slice(&layer, key);
            claim = layer.claim_slice(key, &self.counters);
        }
        match claim {
            SliceClaim::Cached => true,
            SliceClaim::Busy => {
                self.unclog(&layer, key);
                false
            }
            SliceClaim::Load { slot, ptr, len } => {
                self.issue_load(layer, slot, key, ptr, len);
                false
            }
        }
    }

    /// Reads slice `key` of `layer` into the cache slot this queue claimed for it.
    pub(super) fn issue_load(&mut self, layer: Arc<Image>, slot: SlotId, key: u64, ptr: *mut u8, len: usize) {
        let fd = layer.file.fd();
        let io = self.ios.insert(Io::Load { layer, slot, key });
        let sqe = opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(key).build().user_data(io as u64);
        self.push(sqe);
    }

    /// A slice load completed with `res` (bytes read or -errno): publish the slice and
    /// drive the requests parked on it, or fail them and retry every parked request.
    ///
    /// A successful load drives only the requests parked on its key: every other parked
    /// request waits for a load of its own key on this ring (its own completion drives it)
    /// or for a change another queue or a write-back signals (its wake drives it). Driving
    /// them here too made a read whose own load was still in flight miss again, find that
    /// slice loading, and read a private copy besides (1.4 metadata reads per guest read
    /// under cache pressure instead of one).
    pub(super) fn slice_loaded(&mut self, layer: Arc<Image>, slot: SlotId, key: u64, res: i32) {
        let read = if res < 0 {
            Err(Error::errno(format!("reading the L2 slice at {key:#x}"), -res))
        } else {
            Ok(res as usize)
        };
        let Err(bad) = layer.publish_slice(slot, key, read) else {
            self.drive_parked_on(key);
            return;
        };
        let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked).into_iter().partition(|&(_, k)| k == key);
        self.parked = keep;
        for (id, _) in hit {
            self.unpark(id);
            let e = match &bad {
                Error::Corrupt { what, detail } => {
                    let e = Error::corrupt(what, detail.clone());
                    // A write that would have used the slice marks the image corrupt; a
                    // read only fails (see Image::check_l2_slice).
                    let writes = !matches!(self.reqs[id].kind, ReqKind::Read);
                    if writes && Arc::ptr_eq(&layer, &self.image) { layer.signal_corruption(e) } else { e }
                }
                e => Error::errno(e.to_string(), e.raw_os_error()),
            };
            self.fail_with(id, e);
            self.maybe_finish(id);
        }
        self.retry_parked();
    }

    /// Drives the requests parked on slice `key` (just published).
    fn drive_parked_on(&mut self, key: u64) {
        let mut ready = std::mem::take(&mut self.ready_scratch);
        self.parked.retain(|&(id, k)| {
            if k == key {
                ready.push(id);
            }
            k != key
        });
        for id in ready.drain(..) {
            if self.unpark(id) {
                self.drive(id);
            }
        }
        self.ready_scratch = ready;
    }

    /// Parks request `id` until L2 slice `key` of this image is cached (starting its load).
    pub(crate) fn park_slice(&mut self, id: usize, key: u64) {
        // If it is cached already the parked request is simply retried at the next reap.
        if self.load_slice(self.image.clone(), key) {
            self.nudge();
        }
        self.park(id);
        self.parked.push((id, key));
    }
}
