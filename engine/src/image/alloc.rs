//! Host cluster allocation for writers: per-queue batches reserved from the shared
//! refcounts (one short critical section per batch, none per write), L2 table allocation
//! and L2 table copy-on-write (tables shared with an internal snapshot).

use crate::counters::Counters;
use crate::format::l1::L1Entry;
use crate::format::types::{GuestCluster, HostCluster};
use crate::image::{Image, MetaState};
use crate::meta::overlap::MetaKind;
use crate::meta::refcount::MetaIo;
use crate::meta::waiters::{Waiters, wake};
use crate::{Error, Result};
use std::ops::{Deref, DerefMut};
use std::sync::MutexGuard;

/// Most host clusters [`Image::clean_clusters`] remembers (16 bytes or so each).
pub(crate) const CLEAN_CLUSTERS_MAX: usize = 1 << 16;
use std::sync::atomic::Ordering;

/// The metadata lock, held. Releasing it wakes the queues parked on it (see
/// [`crate::meta::waiters`]): requests waiting for the lock, jobs waiting to commit, group
/// flushes.
pub(crate) struct MetaGuard<'a> {
    guard: Option<MutexGuard<'a, MetaState>>,
    waiters: &'a Waiters,
}

impl Deref for MetaGuard<'_> {
    type Target = MetaState;
    fn deref(&self) -> &MetaState {
        self.guard.as_ref().expect("held until drop")
    }
}

impl DerefMut for MetaGuard<'_> {
    fn deref_mut(&mut self) -> &mut MetaState {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for MetaGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        wake(self.waiters.notify_counted());
    }
}

/// Bytes of freed clusters that may wait for a flush before an allocating queue makes
/// their freeing durable itself ([`Image::reclaim_if_many_freed`]).
pub(crate) const FREED_BOUND: u64 = 2 << 20;

impl Image {
    /// Refuses writes to read-only or corrupt images.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only || self.meta.is_none() {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        }
        if self.corrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::InvalidRequest("the image is marked corrupt; writes are refused".into()));
        }
        Ok(())
    }

    /// L1 entry checks for writers: a private table is needed.
    pub(crate) fn write_l1_ready(&self, l1i: u64) -> bool {
        let e = self.l1_entry(l1i);
        e.l2_offset().0 != 0 && e.copied() && !e.contiguous()
    }

    pub(crate) fn meta_io(&self) -> MetaIo<'_> {
        MetaIo { ring: &self.sync, fd: self.file.fd() }
    }

    /// Takes the metadata lock without waiting (None: another queue holds it; park, after
    /// registering with [`Image::lock_waiters`]).
    pub(crate) fn try_meta(&self) -> Result<Option<MetaGuard<'_>>> {
        let Some(m) = &self.meta else {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        };
        let guard = match m.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        Ok(Some(MetaGuard { guard: Some(guard), waiters: &self.lock_waiters }))
    }

    /// Takes the metadata lock, waiting for it (tools, open and close, queue teardown);
    /// None on a read-only image.
    pub(crate) fn lock_meta(&self) -> Option<MetaGuard<'_>> {
        let m = self.meta.as_ref()?;
        let guard = m.lock().unwrap_or_else(|e| e.into_inner());
        Some(MetaGuard { guard: Some(guard), waiters: &self.lock_waiters })
    }

    /// Takes the in-place fill claim of host cluster `host` (see [`Image::fill_busy`]);
    /// false when another job holds it (park on [`Image::lock_waiters`]).
    pub(crate) fn claim_fill(&self, host: u64) -> bool {
        match self.fill_busy.try_lock() {
            Ok(mut set) => set.insert(host),
            Err(_) => false,
        }
    }

    /// Gives the fill claim of `host` back and wakes the queues waiting for one.
    pub(crate) fn release_fill(&self, host: u64) {
        self.fill_busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&host);
        wake(self.lock_waiters.notify_counted());
    }

    /// Takes the allocation claim of guest cluster `c` (see [`Image::alloc_busy`]); false
    /// when another job holds it (park on [`Image::lock_waiters`]). The set's own lock is
    /// held only for the insert, so it is waited for rather than tried: a failed try would
    /// park a request without anyone to wake it.
    pub(crate) fn claim_alloc(&self, c: GuestCluster) -> bool {
        self.alloc_busy.lock().unwrap_or_else(|e| e.into_inner()).insert(c)
    }

    /// Gives the allocation claim of guest cluster `c` back and wakes the queues waiting
    /// for one.
    pub(crate) fn release_alloc(&self, c: GuestCluster) {
        self.alloc_busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&c);
        wake(self.lock_waiters.notify_counted());
    }

    /// Records that host cluster `host`'s bytes outside its allocated subclusters read as
    /// zeros (see [`Image::clean_clusters`]); `full`: every subcluster is allocated now,
    /// so there is nothing left to know.
    pub(crate) fn mark_clean(&self, host: u64, full: bool) {
        let mut set = self.clean_clusters.lock().unwrap_or_else(|e| e.into_inner());
        if full {
            set.remove(&host);
        } else if set.len() < CLEAN_CLUSTERS_MAX {
            set.insert(host);
        }
    }

    /// Whether host cluster `host` is known clean (see [`Image::clean_clusters`]).
    pub(crate) fn is_clean(&self, host: u64) -> bool {
        self.clean_clusters.lock().unwrap_or_else(|e| e.into_inner()).contains(&host)
    }

    /// Forgets that host cluster `host` is clean: bytes outside its allocated subclusters
    /// may be anything now.
    pub(crate) fn unmark_clean(&self, host: u64) {
        let mut set = self.clean_clusters.lock().unwrap_or_else(|e| e.into_inner());
        if !set.is_empty() {
            set.remove(&host);
        }
    }

    /// Sets the dirty bit before the first refcount-skipping write (lazy refcounts).
    pub(crate) fn mark_dirty_for_lazy(&self, st: &mut MetaState, cnt: &Counters) -> Result<()> {
        if st.lazy && !st.dirty_bit_set {
            self.update_header(cnt, |h| h.incompatible_features |= crate::format::feature::INCOMPAT_DIRTY)?;
            st.dirty_bit_set = true;
        }
        Ok(())
    }

    /// Records the logical end of the file (allocated clusters may not be written yet).
    pub(crate) fn note_end(&self, st: &MetaState) {
        let end = self.geo.cluster_bytes(st.rc.end_cluster);
        self.file_len.fetch_max(end, Ordering::AcqRel);
    }

    /// Freed clusters come back to the allocator without waiting for the guest's flush
    /// (issue 14). Under the metadata lock, called by an allocating queue (and by one that
    /// finished a discard): takes back what asynchronous write-backs made safe, and once
    /// the decrements queued cover [`FREED_BOUND`] bytes applies those whose reference
    /// drops are durable (when every request of the old epoch is done: see
    /// `image/epoch.rs`), so that the next batch reuses them, lowest offsets first, and the
    /// file stays as compact as QEMU's. Returns whether decrements whose reference drops
    /// are not durable yet are queued: the caller then asks for a metadata write-back on its
    /// own ring (`Queue::wb_wanted`), which writes the L2 changes that dropped the
    /// references (after the refcount increases, before a device flush) and hands the
    /// decrements back as safe when it completed; a later call applies them. No I/O of the
    /// write-back runs here or under this lock.
    pub(crate) fn reclaim_if_many_freed(&self, st: &mut MetaState) -> Result<bool> {
        self.absorb_writeback(st);
        let queued = (st.rc.pending_free.len() + st.rc.retiring.len() + st.rc.safe_free.len()) as u64;
        if queued.saturating_mul(self.geo.cluster_size()) < FREED_BOUND {
            return Ok(false);
        }
        if let Some(e) = self.retire_safe(st)? {
            return Err(self.signal_corruption(e));
        }
        Ok(!st.rc.pending_free.is_empty())
    }

    /// Reserves `n` host clusters (refcount 1) for a queue's batch (counted into `cnt`).
    pub(crate) fn reserve_clusters(
        &self,
        st: &mut MetaState,
        n: u64,
        out: &mut Vec<u64>,
        cnt: &Counters,
    ) -> Result<()> {
        self.mark_dirty_for_lazy(st, cnt)?;
        let io = self.meta_io();
        let first_new = out.len();
        // Every cluster at or past the allocation end reads as zeros: it lay past the end of
        // the file at open (`end_cluster` starts there and only grows), was never allocated
        // since, and the file only grew over it by `grow_ahead` (holes).
        let zero_from = self.geo.cluster_bytes(st.rc.end_cluster);
        st.rc.alloc_batch(&io, n, out)?;
        self.note_end(st);
        Counters::add(&cnt.clusters_allocated, n);
        // Batch clusters must read as zeros (writers rely on it to skip zero fills): fresh
        // ones do; reused ones inside the file are punched now.
        let mut phys_end = None;
        let mut top = 0;
        let mut i = first_new;
        while i < out.len() {
            let mut j = i + 1;
            while j < out.len() && out[j] == out[j - 1] + 1 {
                j += 1;
            }
            let (a, b) = (self.geo.cluster_bytes(out[i]), self.geo.cluster_bytes(out[j - 1] + 1));
            top = top.max(b);
            let reused_end = b.min(zero_from);
            if a < reused_end {
                let pe = match phys_end {
                    Some(pe) => pe,
                    None => *phys_end.insert(self.file.len()?),
                };
                if a < pe {
                    self.sync.punch(crate::io::hook::WriteKind::Other, &self.file, a, reused_end.min(pe) - a)?;
                }
            }
            i = j;
        }
        self.grow_ahead(st, top)
    }

    /// Keeps the file's length ahead of the clusters handed out, so that a first write into
    /// a fresh cluster lands inside the file (in a hole) instead of extending it: on ext4 an
    /// extending O_DIRECT write takes the inode lock exclusively and cannot be issued
    /// without blocking, so io_uring hands it to a worker thread and such writes run one at
    /// a time. The file grows by an eighth of its length (4 MiB..128 MiB) past `top`; the
    /// tail is a hole and reads as zeros; [`Image::trim_tail`] cuts it off on clean close.
    /// Never shrinks the file (its length is read before growing it).
    pub(crate) fn grow_ahead(&self, st: &mut MetaState, top: u64) -> Result<()> {
        if top <= st.grown_to {
            return Ok(());
        }
        let len = self.file.len()?;
        if top <= len {
            st.grown_to = len;
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let ahead = (len / 8).clamp(4 << 20, 128 << 20).div_ceil(cs) * cs;
        let new = top
            .checked_add(ahead)
            .and_then(|n| n.checked_next_multiple_of(4096))
            .ok_or_else(|| Error::InvalidRequest(format!("file length {top} + {ahead} overflows")))?;
        // Extending a file whose length ends inside a block makes the file system zero the
        // rest of that block through the page cache, where other queues' O_DIRECT writes to
        // the same block then collide with a dirty cached page (see
        // `ImageFile::hole_granule`): the block's tail is written with zeros first (nothing
        // lies past the end of the file: every cluster handed out is below it).
        let g = self.file.hole_granule();
        if len % g != 0 && len.is_multiple_of(crate::io::SECTOR) {
            self.sync.write_zeros(self.file.fd(), len, len.next_multiple_of(g) - len)?;
        }
        self.sync.ftruncate(self.file.fd(), new)?;
        st.grown_to = new;
        Ok(())
    }

    /// Clean close: cuts off the hole that [`Image::grow_ahead`] left past the last
    /// cluster in use (only when this session grew the file, and never below the length
    /// the file had at open).
    pub(crate) fn trim_tail(&self, st: &mut MetaState) -> Result<()> {
        if st.grown_to == 0 {
            return Ok(());
        }
        // The file ends after the last cluster in use: skip back over the free clusters
        // at the end of the allocated range (a queue's unused batch, returned at teardown),
        // but not below the length of the file at open.
        let io = self.meta_io();
        let floor = self.opened_len.div_ceil(self.geo.cluster_size());
        let mut end = st.rc.end_cluster;
        while end > floor && st.rc.get(&io, end - 1)? == 0 {
            end -= 1;
        }
        let end = self.geo.cluster_bytes(end).max(self.opened_len);
        if self.file.len()? > end {
            self.sync.ftruncate(self.file.fd(), end)?;
        }
        st.grown_to = 0;
        Ok(())
    }

    /// Returns unused batch clusters (never referenced, so freed at once). One whose
    /// refcount is already zero was freed by someone else while the queue held it: every
    /// other cluster is still returned, then the image is marked corrupt.
    pub(crate) fn unreserve_clusters(&self, st: &mut MetaState, clusters: &[u64]) -> Result<()> {
        let io = self.meta_io();
        let mut bad = None;
        for &c in clusters {
            match st.rc.add(&io, c, -1) {
                Ok(_) => {}
                Err(e @ Error::Corrupt { .. }) => {
                    bad.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match bad {
            Some(e) => Err(self.signal_corruption(e)),
            None => Ok(()),
        }
    }

    /// Makes L1 entry `l1i` point to a private (COPIED) L2 table: allocates a zeroed table
    /// when there is none, or copies a table shared with a snapshot. The new table is on
    /// disk before the L1 entry changes in memory (the L1 write happens at flush time).
    pub(crate) fn ensure_l2_table(&self, st: &mut MetaState, l1i: u64, cnt: &Counters) -> Result<()> {
        let old = self.l1_entry(l1i);
        if old.contiguous() {
            return self.split_range(st, l1i, cnt);
        }
        if old.l2_offset().0 != 0 && old.copied() {
            return Ok(()); // another queue did it
        }
        if old.l2_offset().0 == 0 && self.l2less && self.backing.is_none() {
            return self.alloc_extent(st, l1i, cnt);
        }
        if l1i as usize >= self.l1.len() {
            return Err(Error::InvalidRequest(format!("L1 index {l1i} is beyond the L1 table")));
        }
        self.mark_dirty_for_lazy(st, cnt)?;
        let io = self.meta_io();
        let cs = self.geo.cluster_size() as usize;
        let c = st.rc.alloc_contiguous(&io, 1)?;
        self.note_end(st);
        self.overlap.record(MetaKind::ActiveL2, HostCluster(c), 1);
        let off = self.geo.cluster_bytes(c);
        let mut table = crate::io::AlignedBuf::new(cs);
        if old.l2_offset().0 != 0 {
            let data = self.sync.read_exact(self.file.fd(), old.l2_offset().0, cs, "L2 table")?;
            table.copy_from_slice(&data);
            // Slices of the old table that we changed in cache were written... they cannot
            // be dirty: writes never modify a shared table in place.
        }
        self.sync.write_kind(crate::io::hook::WriteKind::L2, self.file.fd(), off, &table)?;
        Counters::add(&cnt.l2_writes, 1);
        Counters::add(&cnt.l2_write_bytes, cs as u64);
        Counters::add(&cnt.clusters_allocated, 1);
        if old.l2_offset().0 != 0 {
            let oc = self.geo.cluster_index(old.l2_offset().0);
            st.rc.free_later(oc, 1);
            // A snapshot still uses the old table.
            self.overlap.relabel(HostCluster(oc), MetaKind::ActiveL2, MetaKind::InactiveL2);
        }
        self.l1[l1i as usize].store(L1Entry::new(crate::format::HostOffset(off), true).0, Ordering::Release);
        st.l1_dirty = true;
        Ok(())
    }

    /// [`Image::ensure_l2_table`] for each of the L1 entries `l1is` (ascending), except
    /// that consecutive entries that get new L2-less extents get them from one contiguous
    /// allocation ([`Image::alloc_extents`]): a request that spans them is one host run.
    pub(crate) fn ensure_l2_tables(&self, st: &mut MetaState, l1is: &[u64], cnt: &Counters) -> Result<()> {
        let new_extent = |l1i: u64| {
            let e = self.l1_entry(l1i);
            !e.contiguous() && e.l2_offset().0 == 0 && self.l2less && self.backing.is_none()
        };
        let mut i = 0;
        while i < l1is.len() {
            if !new_extent(l1is[i]) {
                self.ensure_l2_table(st, l1is[i], cnt)?;
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < l1is.len() && l1is[j] == l1is[j - 1] + 1 && new_extent(l1is[j]) {
                j += 1;
            }
            self.alloc_extents(st, l1is[i], (j - i) as u64, cnt)?;
            i = j;
        }
        Ok(())
    }

    /// L2-less mode: makes L1 range `l1i` one contiguous extent on its first write.
    fn alloc_extent(&self, st: &mut MetaState, l1i: u64, cnt: &Counters) -> Result<()> {
        self.alloc_extents(st, l1i, 1, cnt)
    }

    /// L2-less mode: makes each of the `count` L1 ranges from `first` on one contiguous
    /// extent, the extents following each other in one allocation (refcount blocks made on
    /// the way land after it, not between them). The space comes from fresh space, is
    /// punched so that never-written parts read as zeros (also when it reuses freed space),
    /// and every cluster is refcounted. The L1 entries are written at flush time, after the
    /// refcounts are durable.
    fn alloc_extents(&self, st: &mut MetaState, first: u64, count: u64, cnt: &Counters) -> Result<()> {
        let last = first
            .checked_add(count)
            .filter(|&e| e <= self.l1.len() as u64)
            .ok_or_else(|| Error::InvalidRequest(format!("L1 indices {first}+{count} are beyond the L1 table")))?;
        self.mark_dirty_for_lazy(st, cnt)?;
        let io = self.meta_io();
        let n: u64 = (first..last).map(|i| self.range_clusters(i)).sum();
        let c = st.rc.alloc_contiguous(&io, n)?;
        self.note_end(st);
        let off = self.geo.cluster_bytes(c);
        let len = self.geo.cluster_bytes(n);
        self.sync.punch(crate::io::hook::WriteKind::Data, &self.file, off, len)?;
        // The extents lie inside the file, so their first writes are not extending ones.
        self.grow_ahead(st, off + len)?;
        Counters::add(&cnt.clusters_allocated, n);
        let mut at = c;
        for l1i in first..last {
            let e =
                L1Entry(self.geo.cluster_bytes(at) | crate::format::l1::L1_CONTIGUOUS | crate::format::l1::L1_COPIED);
            self.l1[l1i as usize].store(e.0, Ordering::Release);
            at += self.range_clusters(l1i);
        }
        st.l1_dirty = true;
        Ok(())
    }

    /// L2-less mode: turns contiguous range `l1i` back into a real L2 table that maps the
    /// same clusters, so per-cluster changes (discard, zero, copy-on-write) can follow.
    /// Crash-safe: the table is written before the L1 entry changes, and the L1 entry is
    /// written (after a device flush) at flush time; until then the old entry stays valid.
    fn split_range(&self, st: &mut MetaState, l1i: u64, cnt: &Counters) -> Result<()> {
        self.mark_dirty_for_lazy(st, cnt)?;
        let old = self.l1_entry(l1i);
        let io = self.meta_io();
        let g = self.geo;
        let cs = g.cluster_size() as usize;
        let t = st.rc.alloc_contiguous(&io, 1)?;
        self.note_end(st);
        self.overlap.record(MetaKind::ActiveL2, HostCluster(t), 1);
        let toff = g.cluster_bytes(t);
        let mut table = crate::io::AlignedBuf::new(cs);
        let ext = old.l2_offset().0;
        for j in 0..self.range_clusters(l1i) {
            let host = crate::format::HostOffset(ext + (g.cluster_bytes(j)));
            let bitmap = crate::format::l2::SubclusterBitmap::from_parts(u32::MAX, 0);
            crate::format::l2::write_entry(
                &g,
                &mut table,
                j as usize,
                crate::format::l2::L2Entry::normal(host, old.copied()),
                bitmap,
            );
        }
        self.sync.write_kind(crate::io::hook::WriteKind::L2, self.file.fd(), toff, &table)?;
        Counters::add(&cnt.l2_writes, 1);
        Counters::add(&cnt.l2_write_bytes, cs as u64);
        Counters::add(&cnt.clusters_allocated, 1);
        self.l2_cache.forget(toff);
        self.l1[l1i as usize].store(L1Entry::new(crate::format::HostOffset(toff), true).0, Ordering::Release);
        st.l1_dirty = true;
        Ok(())
    }
}
