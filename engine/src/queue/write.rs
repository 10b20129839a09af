//! The write request state machine: walk the guest range cluster by cluster and resolve
//! each piece ([`WPiece`]).
//!
//! * An overwrite of data the image owns (a COPIED cluster; with extended L2, subclusters
//!   already allocated; an L2-less range) joins a run of contiguous host bytes, and each run
//!   is one data write: no metadata, no lock.
//! * Anything else in a cluster becomes an allocation job ([`super::job`], planned by
//!   [`super::cow`]) on a host cluster from the queue's reserved batch ([`BATCH`] clusters
//!   taken under the metadata lock at a time).
//! * A cluster whose L1 entry has no private L2 table gets one first (under the lock); a
//!   piece whose L2 slice is not cached parks the request on the slice's load.
//!
//! The metadata lock is only ever tried: when another queue holds it the request is parked
//! and retried, so a queue never blocks its thread on another queue.

use super::job::{MAX_GROUP_WRITE, Started};
use super::run::{Run, RunBuilder};
use super::{Io, Queue};
use crate::format::l2::{ClusterKind, L2Entry, SubclusterBitmap, subcluster_mask};
use crate::format::types::{GuestOffset, HostCluster, HostOffset};
use crate::image::mapping::L2Slot;
use crate::io::AlignedBuf;

use crate::{Error, Result};
use io_uring::{opcode, types};

/// Clusters a queue reserves at a time (at least).
const BATCH: u64 = 64;

/// How often a write parks to have the L2 slices of its range cached before it walks
/// (a slice evicted again meanwhile is then loaded when the walk reaches it).
const AHEAD_TRIES: u8 = 3;

/// Most L2 slices a write loads ahead of its walk.
const AHEAD_SLICES: u64 = 64;

/// Most bytes of clusters one batch refill reserves for the request that needs them (a
/// request that allocates more clusters than [`BATCH`] reserves them together, so that
/// they follow each other on the host and take one data write).
const MAX_REFILL_BYTES: u64 = 32 << 20;

/// What a write piece needs.
enum WPiece {
    /// Overwrite in place: `len` bytes at host offset `host`.
    InPlace { host: HostOffset, len: u64 },
    /// Allocation job for `len` bytes; the L2 entry at `slot` holds `entry` and `bitmap`.
    Alloc { slot: L2Slot, entry: L2Entry, bitmap: SubclusterBitmap, len: u64 },
    /// L1 entry `l1i` needs a (private) L2 table first.
    NeedTable { l1i: u64 },
    /// L2 slice `key` is not cached.
    Miss { key: u64 },
}

impl Queue {
    /// What writing up to `len` bytes at `pos` (never past the cluster) needs now.
    fn resolve_write(&self, pos: GuestOffset, len: u64) -> Result<WPiece> {
        let img = &self.image;
        let g = &img.geo;
        let in_c = g.offset_in_cluster(pos.0);
        let len = len.min(g.cluster_size() - in_c);
        let l1i = g.l1_index(g.guest_cluster(pos));
        if img.l1_entry(l1i).contiguous() && img.l1_entry(l1i).copied() {
            // L2-less range: the data lives at a fixed place; no metadata.
            let host = img.contiguous_host(pos).expect("contiguous");
            return Ok(WPiece::InPlace { host: HostOffset(host), len });
        }
        if !img.write_l1_ready(l1i) {
            return Ok(WPiece::NeedTable { l1i });
        }
        let slot = img.l2_slot(pos)?.expect("L1 entry checked");
        let (e, b) = if g.extended_l2 {
            match img.l2_cache.read_pair(slot.key, slot.word) {
                Some(p) => {
                    crate::counters::Counters::bump(&self.counters.l2_hits, 1);
                    p
                }
                None => return Ok(WPiece::Miss { key: slot.key }),
            }
        } else {
            match img.l2_cache.read_word(slot.key, slot.word) {
                Some(e) => {
                    crate::counters::Counters::bump(&self.counters.l2_hits, 1);
                    (e, 0)
                }
                None => return Ok(WPiece::Miss { key: slot.key }),
            }
        };
        let (entry, bitmap) = (L2Entry(e), SubclusterBitmap(b));
        if let ClusterKind::Normal { host, copied: true } = entry.decode(g)? {
            if !g.extended_l2 {
                return Ok(WPiece::InPlace { host: host + in_c, len });
            }
            if bitmap.alloc() & bitmap.zero() != 0 {
                return Err(Error::corrupt("L2 bitmap", format!("{b:#018x} has subclusters both allocated and zero")));
            }
            let m = subcluster_mask(g.subcluster_index(in_c), g.subcluster_index(in_c + len - 1));
            if bitmap.alloc() & m == m {
                return Ok(WPiece::InPlace { host: host + in_c, len });
            }
        }
        Ok(WPiece::Alloc { slot, entry, bitmap, len })
    }

    /// Takes a host cluster from the batch, refilling it under the metadata lock with at
    /// least [`BATCH`] clusters, or `want` (the clusters the request may still take, up to
    /// [`MAX_REFILL_BYTES`]). `Ok(None)`: the lock is busy, or a write-back that brings
    /// freed clusters back is about to end (park).
    pub(super) fn take_cluster(&mut self, id: usize, want: u64) -> Result<Option<HostCluster>> {
        if let Some(c) = self.batch.pop() {
            return Ok(Some(c));
        }
        let img = self.image.clone();
        // A write-back in flight brings back at least FREED_BOUND bytes of freed clusters
        // as soon as it completed: a request that entered after the epoch flip of those
        // decrements (it does not hold them back) waits for it, woken by its end, rather
        // than take fresh space, so that the file stays compact. (While it is in flight
        // no other flip happens, so the current parity is the one after that flip.) A
        // request of the old epoch goes on: the decrements wait for it.
        let bound = (crate::image::FREED_BOUND >> img.geo.cluster_bits).max(1);
        let newer = self.entered_parity(id) == Some((img.epoch.load(std::sync::atomic::Ordering::SeqCst) & 1) as u8);
        if newer && img.wb.early_frees() >= bound {
            // Registered first, then looked at again: an end after this look wakes us.
            img.wb.waiters.add(self.waker.bit());
            if img.wb.early_frees() >= bound {
                self.arm_wake();
                return Ok(None);
            }
        }
        let Some(mut st) = img.try_meta()? else { return Ok(None) };
        self.hand_over_frees(&mut st.rc.pending_free);
        if img.reclaim_if_many_freed(&mut st)? {
            self.wb_wanted = true;
        }
        let n = want.min(MAX_REFILL_BYTES >> img.geo.cluster_bits).max(BATCH);
        let mut got = Vec::with_capacity(n as usize);
        img.reserve_clusters(&mut st, n, &mut got, &self.counters)?;
        drop(st);
        // Pop from the end: keep ascending order for contiguous layout.
        self.batch = got.into_iter().rev().map(HostCluster).collect();
        Ok(self.batch.pop())
    }

    /// The epoch parity request `id` (or the guest request it is part of) entered with.
    fn entered_parity(&self, mut id: usize) -> Option<u8> {
        loop {
            let r = &self.reqs[id];
            if let Some(p) = r.entered {
                return Some(p);
            }
            match r.parent {
                super::req::Parent::Req(p) if self.reqs.contains(p) => id = p,
                _ => return None,
            }
        }
    }

    /// Moves this queue's owed refcount decrements to `to` (the image's pending frees,
    /// under the metadata lock).
    pub(crate) fn hand_over_frees(&self, to: &mut Vec<(u64, u64)>) {
        to.append(&mut self.local_frees.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Hands this queue's owed decrements over and, when the freed clusters queued reach
    /// the bound, has them made durable and reusable (if the metadata lock is free; else
    /// the next allocation or flush does it): those already safe are applied now, the
    /// others by a write-back on this queue's ring (started at the next reap, or joined
    /// when one is in flight). A failed write-back leaves the metadata dirty for the next
    /// flush, which reports it.
    pub(crate) fn reclaim_freed(&mut self) {
        let img = self.image.clone();
        if img.meta.is_none() {
            return;
        }
        if let Ok(Some(mut st)) = img.try_meta() {
            self.hand_over_frees(&mut st.rc.pending_free);
            if let Ok(true) = img.reclaim_if_many_freed(&mut st) {
                self.wb_wanted = true;
            }
        }
    }

    /// Returns the unused batch and owed decrements to the image (queue teardown).
    pub(crate) fn release_batch(&mut self) {
        if self.batch.is_empty() && self.local_frees.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return;
        }
        let img = self.image.clone();
        if let Some(mut st) = img.lock_meta() {
            self.hand_over_frees(&mut st.rc.pending_free);
            let batch: Vec<u64> = std::mem::take(&mut self.batch).into_iter().map(|c| c.0).collect();
            let _ = img.unreserve_clusters(&mut st, &batch);
        }
    }

    /// Fails write request `id` with an error met before it wrote anything. Corrupt
    /// metadata of this image found on a write's way is a fatal corruption event, as in
    /// QEMU (which signals it for invalid or misaligned L1/L2 entries and for writes that
    /// would overlap metadata): the image is marked corrupt ([`Image::signal_corruption`]).
    ///
    /// [`Image::signal_corruption`]: crate::image::Image::signal_corruption
    pub(super) fn fail_write(&mut self, id: usize, e: Error) {
        let e = self.image.signal_corruption(e);
        self.fail_with(id, e);
    }

    /// Parks request `id` until the metadata lock or a fill claim is given back.
    pub(super) fn park_lock(&mut self, id: usize) {
        self.park(id);
        self.lock_parked.push(id);
        self.wait_lock();
    }

    /// Ensures a private L2 table for `l1i` under the lock (for request `id`'s walk).
    /// `Ok(false)`: lock busy.
    fn make_table(&mut self, id: usize, l1i: u64) -> Result<bool> {
        let img = self.image.clone();
        let Some(mut st) = img.try_meta()? else { return Ok(false) };
        let new = self.new_table(l1i);
        img.ensure_l2_table(&mut st, l1i, &self.counters)?;
        if new {
            self.cache_new_table(id, l1i);
        }
        Ok(true)
    }

    /// Whether L1 entry `l1i` gets a new, zeroed L2 table (not an L2-less extent, not a
    /// copy of a table shared with a snapshot) when it is made private.
    fn new_table(&self, l1i: u64) -> bool {
        let img = &self.image;
        let e = img.l1_entry(l1i);
        e.l2_offset().0 == 0 && !(img.l2less && img.backing.is_none())
    }

    /// Puts the slices of the new (zeroed) L2 table of `l1i` that the rest of request `id`
    /// covers into the cache ([`Image::install_zero_slices`]): the walk goes on without
    /// reading back what was just written.
    ///
    /// [`Image::install_zero_slices`]: crate::image::Image::install_zero_slices
    fn cache_new_table(&self, id: usize, l1i: u64) {
        let img = &self.image;
        let g = &img.geo;
        let r = &self.reqs[id];
        let start = l1i.saturating_mul(g.l1_coverage());
        let (a, b) = (r.cursor.max(start), (r.offset + r.len).min(start.saturating_add(g.l1_coverage())));
        let table = img.l1_entry(l1i).l2_offset().0;
        if a >= b || table == 0 {
            return;
        }
        let per = img.slice_entries;
        let (first, last) =
            (g.l2_index(g.guest_cluster(GuestOffset(a))) / per, g.l2_index(g.guest_cluster(GuestOffset(b - 1))) / per);
        let size = img.l2_cache.slot_size() as u64;
        img.install_zero_slices((first..=last).map(|s| table + s * size), &self.counters);
    }

    /// Makes sure L1 entry `l1i` has a private L2 table for request `id`'s walk; when it
    /// cannot now, parks the request (lock busy) or fails it. Returns whether the walk goes on.
    pub(super) fn table_ready(&mut self, id: usize, l1i: u64) -> bool {
        let r = self.make_table(id, l1i);
        self.locked_step(id, r)
    }

    /// The outcome of a step of request `id` under the metadata lock: done (the walk goes
    /// on), the lock busy (the request parks on it) or an error (the request fails).
    fn locked_step(&mut self, id: usize, r: Result<bool>) -> bool {
        match r {
            Ok(true) => true,
            Ok(false) => {
                self.park_lock(id);
                false
            }
            Err(e) => {
                self.fail_write(id, e);
                false
            }
        }
    }

    /// Makes the private L2 tables (or L2-less extents) of every L1 entry that the rest of
    /// request `id` spans before its data clusters are taken, under one hold of the lock:
    /// made one by one as the walk reaches them, each table would land between two clusters
    /// of the request's data and split its one write into several. Returns whether the
    /// walk goes on (false: parked on the lock, or failed).
    fn tables_ahead(&mut self, id: usize) -> bool {
        let img = self.image.clone();
        let g = &img.geo;
        let r = &self.reqs[id];
        let (first, last) = (
            g.l1_index(g.guest_cluster(GuestOffset(r.cursor))),
            g.l1_index(g.guest_cluster(GuestOffset(r.offset + r.len - 1))),
        );
        if first >= last {
            return true;
        }
        let needs = |l1i: u64| {
            // Neither an L2-less range the image owns nor a private table yet.
            let e = img.l1_entry(l1i);
            !(img.write_l1_ready(l1i) || e.contiguous() && e.copied())
        };
        if !(first..=last).any(needs) {
            return true;
        }
        let res = (|| {
            let Some(mut st) = img.try_meta()? else { return Ok(false) };
            let l1is: Vec<u64> = (first..=last).filter(|&l| needs(l)).collect();
            let new: Vec<u64> = l1is.iter().copied().filter(|&l| self.new_table(l)).collect();
            img.ensure_l2_tables(&mut st, &l1is, &self.counters)?;
            for l1i in new {
                self.cache_new_table(id, l1i);
            }
            Ok(true)
        })();
        self.locked_step(id, res)
    }

    /// Has every L2 slice that the rest of request `id` covers cached before the walk
    /// starts jobs: a slice missed half way would park the walk and split the request's
    /// data into one write before and one after the load. Loads the missing ones together
    /// and parks on the first (returns false); at most [`AHEAD_TRIES`] times per request
    /// and for at most [`AHEAD_SLICES`] slices, so that a cache too small to hold them all
    /// cannot keep a request from walking.
    fn slices_ahead(&mut self, id: usize) -> bool {
        let img = self.image.clone();
        let g = &img.geo;
        let r = &self.reqs[id];
        if r.ahead >= AHEAD_TRIES {
            return true;
        }
        let (a, end) = (r.cursor, r.offset + r.len);
        let per = img.slice_entries;
        let size = img.l2_cache.slot_size() as u64;
        let mut keys = Vec::new();
        let mut pos = a;
        while pos < end {
            let gc = g.guest_cluster(GuestOffset(pos));
            let l1i = g.l1_index(gc);
            let l1_end = (l1i + 1).saturating_mul(g.l1_coverage()).min(end);
            let e = img.l1_entry(l1i);
            let table = e.l2_offset().0;
            if img.write_l1_ready(l1i) {
                let first = g.l2_index(gc) / per;
                let last = g.l2_index(g.guest_cluster(GuestOffset(l1_end - 1))) / per;
                keys.extend((first..=last).map(|s| table + s * size));
            }
            if keys.len() as u64 > AHEAD_SLICES {
                return true;
            }
            pos = l1_end;
        }
        if keys.len() < 2 {
            return true;
        }
        let missing: Vec<u64> = keys.into_iter().filter(|&k| img.l2_cache.read_word(k, 0).is_none()).collect();
        let Some((&first, rest)) = missing.split_first() else {
            self.reqs[id].ahead = AHEAD_TRIES;
            return true;
        };
        self.reqs[id].ahead += 1;
        for &k in rest {
            self.load_slice(img.clone(), k);
        }
        self.park_slice(id, first);
        false
    }

    /// Advances a write request.
    pub(crate) fn drive_write(&mut self, id: usize) {
        // Hold the request open while we walk it: a nested completion (a child request
        // that finishes at once) must not finish it under our feet.
        self.reqs[id].pending += 1;
        self.grouping += 1;
        let fd = self.image.data_fd();
        let mut run = RunBuilder::default();
        let ahead = self.walk_next(id).is_none() || (self.tables_ahead(id) && self.slices_ahead(id));
        while let Some((pos, end)) = self.walk_next(id).filter(|_| ahead) {
            let pos = GuestOffset(pos);
            let piece = match self.resolve_write(pos, end - pos.0) {
                Ok(p) => p,
                Err(e) => {
                    self.fail_write(id, e);
                    break;
                }
            };
            match piece {
                WPiece::InPlace { host, len } => {
                    if let Some(done) = run.add(Run { fd, host, guest: pos, len }) {
                        self.issue_write(id, done);
                    }
                    self.reqs[id].cursor += len;
                }
                WPiece::Miss { key } => {
                    self.park_slice(id, key);
                    break;
                }
                WPiece::NeedTable { l1i } => {
                    if !self.table_ready(id, l1i) {
                        break;
                    }
                }
                WPiece::Alloc { slot, entry, bitmap, len } => {
                    if let Some(r) = run.take() {
                        // The overwrite before the allocation: the jobs' write may continue it.
                        let src = self.reqs[id].mem(r.guest.0, r.len) as *const u8;
                        if (src as usize).is_multiple_of(512) && r.len <= MAX_GROUP_WRITE {
                            self.lead_group(id, src, r.host.0, r.len);
                        } else {
                            self.issue_write(id, r);
                        }
                    }
                    match self.start_job(id, pos, len, slot, entry, bitmap) {
                        Ok(Started::Yes) => self.reqs[id].cursor += len,
                        Ok(Started::NeedLock) => {
                            self.park_lock(id);
                            break;
                        }
                        Ok(Started::Parked) => break,
                        Ok(Started::Stale) => continue,
                        Err(err) => {
                            self.fail_write(id, err);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(r) = run.take() {
            self.issue_write(id, r);
        }
        self.grouping -= 1;
        if self.grouping == 0 {
            self.issue_group();
        }
        self.reqs[id].pending -= 1;
        self.maybe_finish(id);
    }

    /// Issues the data write of one run of an overwrite (straight from the guest buffer
    /// when it is aligned).
    fn issue_write(&mut self, id: usize, Run { fd, host, guest, len }: Run) {
        let src = self.reqs[id].mem(guest.0, len) as *const u8;
        let host = host.0;
        if let Some(h) = &self.image.hook
            && let Some(errno) = h.0.fail_write(crate::io::hook::WriteKind::Data, host, len)
        {
            self.fail(id, -errno);
            return;
        }
        let token = self.image.hook.as_ref().map_or(0, |h| {
            // SAFETY: src is valid for len bytes (inside the request buffer).
            let data = unsafe { std::slice::from_raw_parts(src, len as usize) };
            h.0.issued(crate::io::hook::WriteKind::Data, host, crate::io::hook::WriteData::Bytes(data))
        });
        self.reqs[id].pending += 1;
        crate::counters::Counters::add(&self.counters.data_writes, 1);
        crate::counters::Counters::add(&self.counters.data_write_bytes, len);
        if (src as usize).is_multiple_of(512) {
            let io = self.ios.insert(Io::Write { req: id, token });
            let sqe = opcode::Write::new(types::Fd(fd), src, len as u32).offset(host).build().user_data(io as u64);
            self.push(sqe);
        } else {
            // Unaligned guest buffer: bounce through an aligned copy, kept by a job-less Io.
            let mut b = AlignedBuf::new(len as usize);
            // SAFETY: src is valid for len bytes (inside the request buffer).
            unsafe { std::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), len as usize) };
            let ptr = b.as_ptr();
            let io = self.ios.insert(Io::WriteBounce { req: id, _buf: b, token });
            let sqe = opcode::Write::new(types::Fd(fd), ptr, len as u32).offset(host).build().user_data(io as u64);
            self.push(sqe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::CreateOptions;
    use crate::image::{Image, Options};
    use crate::queue::{Parent, QueueOptions, ReqKind};

    /// A job that fills subclusters of its own cluster in place must plan from the entry as
    /// it is once it holds the cluster's fill claim. Here the write into the first half of
    /// subcluster 23 is resolved while that subcluster is unallocated; then a whole-cluster
    /// write allocates every subcluster and publishes; then the first job starts. Planned
    /// from the stale bitmap it filled the second half of subcluster 23 with zeros over the
    /// whole-cluster write's data (its commit then failed and it redid only its own bytes):
    /// found by tests/mq_model.rs (c64k-ext-rc1, 8 queues, seed 886000275).
    #[test]
    fn in_place_fill_plans_from_the_entry_under_its_claim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fill.qcow2");
        let cs = 65536u64;
        let o = CreateOptions { size: 4 * cs, cluster_size: cs, extended_l2: true, ..Default::default() };
        crate::image::create(&path, &o, false).unwrap();
        let img = Image::open(&path, &Options::default()).unwrap();
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        // Cluster 0 exists with only subcluster 0 allocated.
        q.write_at(&[0x11; 2048], 0).unwrap();
        let (pos, len) = (GuestOffset(23 * 2048), 1024);
        let Ok(WPiece::Alloc { slot, entry, bitmap, .. }) = q.resolve_write(pos, len) else {
            panic!("subcluster 23 is not allocated yet: an allocation job is planned");
        };
        // Another writer allocates every subcluster meanwhile.
        q.write_at(&vec![0xb2; cs as usize], 0).unwrap();
        // The first job starts with what it looked up.
        let data = vec![0xa5u8; len as usize];
        let id = q.new_req(9, ReqKind::Write, pos.0, len, data.as_ptr() as *mut u8, Parent::Caller);
        q.reqs[id].pending += 1;
        let started = q.start_job(id, pos, len, slot, entry, bitmap).unwrap();
        q.reqs[id].pending -= 1;
        if matches!(started, Started::Yes) {
            q.reqs[id].cursor += len;
            q.maybe_finish(id);
        } else {
            q.drive_write(id);
        }
        q.commit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            q.reap(&mut done, 1, Some(std::time::Duration::from_secs(10))).unwrap();
        }
        assert_eq!(done[0], crate::queue::Completion { user_data: 9, result: 0 });
        let mut got = vec![0u8; 2048];
        q.read_at(&mut got, pos.0).unwrap();
        assert!(got[..1024].iter().all(|&x| x == 0xa5), "the job's own bytes");
        let bad = got[1024..].iter().position(|&x| x != 0xb2);
        assert_eq!(bad, None, "the rest of subcluster 23 holds the whole-cluster write's data");
        drop(q);
        img.close().unwrap();
    }
}
