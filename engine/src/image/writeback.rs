//! Metadata write-back in the order that keeps the durable-state rule (QEMU's cache
//! dependencies): refcount increases, then the refcount table and header when the table
//! moved, then L2 slices, then the L1 table; refcount decreases only after the references
//! they drop are durable. Each stage ends with a device flush when it wrote anything.
//!
//! Two ways to run it:
//!
//! * [`Image::flush_metadata`]: synchronously on the image's `SyncRing`, under the metadata
//!   lock (open, close, tools, resize, snapshots, the audit).
//! * Asynchronously on a queue's own ring (guest flushes, writethrough writes, a cache set
//!   full of dirty slices, the freed-cluster bound): [`Image::begin_writeback`] copies the dirty metadata under the
//!   metadata lock into a [`WbPlan`] (stages of writes, each followed by a device flush),
//!   the lock is released, and the queue's state machine (`queue/writeback.rs`) issues each
//!   stage's writes as SQEs, then an `IORING_OP_FSYNC` (datasync) once they all completed,
//!   then the next stage. [`Image::settle_writeback`] hands the outcome back without the
//!   lock (see [`crate::meta::refcount::WbShared`]): a failure leaves everything the plan
//!   copied dirty again for the next attempt.
//!
//! Stages of a plan: (1) the dirty refcount blocks, device flush; (2) the refcount table
//! when it changed, device flush; (3) the L2 slices and the L1 table, after a device flush
//! that makes the data they map durable (the flush of stage 1 or 2, issued after the copies
//! were taken, or one of its own), device flush. The refcount decrements queued when the
//! plan was made retire once it completed: they are applied at the start of the next
//! write-back, whose first stage writes them. A refcount table that moved (the header must
//! change) is rare: that write-back runs synchronously.
//!
//! One write-back at a time per image ([`WbCoord`]): two in flight could write different
//! copies of one slice or block, and the older could land last. A flush that finds one in
//! flight that started after its own data writes completed joins it (group commit across
//! queues); otherwise it waits for it to end and starts the next.

use crate::Result;
use crate::counters::Counters;
use crate::image::{Image, MetaState};
use crate::io::AlignedBuf;
use crate::io::hook::WriteKind;
use crate::meta::cache::SlotId;
use crate::meta::waiters::{Waiters, wake};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Condvar, Mutex, MutexGuard};

/// One write of an asynchronous write-back: a copy taken under the metadata lock.
pub(crate) struct WbWrite {
    pub kind: WriteKind,
    pub off: u64,
    pub buf: AlignedBuf,
}

/// Writes issued together, then (with `flush`) a device flush before the next stage.
pub(crate) struct WbStage {
    pub writes: Vec<WbWrite>,
    pub flush: bool,
}

/// An asynchronous write-back: what to write, in stages, and what to settle afterwards.
pub(crate) struct WbPlan {
    /// Its generation ([`WbCoord`]).
    pub generation: u64,
    pub stages: Vec<WbStage>,
    /// L2 slots copied (pinned until settled).
    slots: Vec<SlotId>,
    /// Refcount blocks copied (pinned in the refcount cache until settled).
    blocks: Vec<u64>,
    table: bool,
    l1: bool,
    /// Decrements whose reference drops this write-back makes durable.
    frees: Vec<(u64, u64)>,
    /// The epoch flipped for `frees` when it began: once it completed they retire at
    /// once instead of waiting for a flip of their own ([`Image::begin_writeback`]).
    early: bool,
    /// A decrement applied at its start went below zero (reported when it ends).
    corrupt: Option<crate::Error>,
}

/// The largest write of consecutive L2 slices one write-back issues.
const MAX_L2_RUN_BYTES: usize = 1 << 20;

/// Results of the last generations kept for queues that joined them.
const RESULTS_KEPT: usize = 1024;

/// The state of [`WbCoord`].
#[derive(Default)]
pub(crate) struct CoordState {
    /// The generation of the write-back in flight.
    pub in_flight: Option<u64>,
    /// The last generation started (a flush remembers it when it arrives: a generation
    /// started later covers the writes completed before it).
    pub started: u64,
    /// The last generation that ended.
    pub done: u64,
    /// (generation, error as errno and text) of the last generations.
    results: VecDeque<(u64, Option<(i32, String)>)>,
    /// Threads blocked in [`WbCoord::wait_idle`] (the condition variable is signalled
    /// only when there are some: no syscall per write-back otherwise).
    sleepers: usize,
}

impl CoordState {
    /// The outcome of generation `generation`: None while it has not ended.
    pub fn result(&self, generation: u64) -> Option<Result<()>> {
        if generation > self.done {
            return None;
        }
        // From the newest: a joiner asks about a generation that has just ended, and the
        // list keeps the last RESULTS_KEPT (a search from the oldest cost 4% of the CPU of
        // writethrough writes on tmpfs).
        let r = match self.results.iter().rev().find(|(g, _)| *g == generation) {
            Some((_, None)) => Ok(()),
            Some((_, Some((errno, text)))) => Err(crate::Error::errno(text.clone(), *errno)),
            None => Err(crate::Error::errno("write-back result no longer known", libc::EIO)),
        };
        Some(r)
    }
}

/// The image's asynchronous write-backs: at most one in flight; the queues waiting for it
/// to end (to start the next, or because they joined it) are woken when it does.
#[derive(Default)]
pub(crate) struct WbCoord {
    state: Mutex<CoordState>,
    cv: Condvar,
    /// Queues waiting for the write-back in flight to end.
    pub waiters: Waiters,
    /// [`CoordState::started`], readable without the lock.
    started: AtomicU64,
    /// The highest value of `started` seen by a guest write when it completed: a write-back
    /// of a later generation covers every write completed so far (its entries were
    /// published before it began copying). A guest flush needs one past this.
    need: AtomicU64,
    /// Decrements (clusters) of the write-back in flight that retire as soon as it
    /// completed (it flipped the epoch for them when it began): an allocation that would
    /// otherwise take fresh space waits for it ([`WbCoord::early_frees`]).
    early: AtomicU64,
}

impl WbCoord {
    /// A new generation starts (under the lock `st`); returns it.
    pub fn start(&self, st: &mut CoordState) -> u64 {
        st.started += 1;
        st.in_flight = Some(st.started);
        self.started.store(st.started, Ordering::SeqCst);
        // Before the copies: pairs with the fence in `note_completion` (store buffering).
        fence(Ordering::SeqCst);
        st.started
    }

    /// A guest write completed (its L2 entries are published): records the generations
    /// that cover it. Two loads when nothing changed.
    pub fn note_completion(&self) {
        fence(Ordering::SeqCst);
        let s = self.started.load(Ordering::SeqCst);
        if self.need.load(Ordering::Relaxed) < s {
            self.need.fetch_max(s, Ordering::SeqCst);
        }
    }

    /// For a guest flush arriving now: a generation above the returned one covers every
    /// write completed before it.
    pub fn flush_mark(&self) -> u64 {
        fence(Ordering::SeqCst);
        self.need.load(Ordering::SeqCst)
    }

    /// For a writethrough write whose data and entries are done now: a generation above
    /// the returned one covers it.
    pub fn write_mark(&self) -> u64 {
        fence(Ordering::SeqCst);
        self.started.load(Ordering::SeqCst)
    }

    pub fn lock(&self) -> MutexGuard<'_, CoordState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Generation `generation` ended with `err`: the next may start, joiners learn the outcome.
    pub fn end(&self, generation: u64, err: Option<&crate::Error>) {
        let sleepers = {
            let mut st = self.lock();
            st.in_flight = None;
            st.done = generation;
            let text = |e: &crate::Error| match e {
                crate::Error::Io { op, .. } => op.clone(),
                e => e.to_string(),
            };
            st.results.push_back((generation, err.map(|e| (e.raw_os_error(), text(e)))));
            if st.results.len() > RESULTS_KEPT {
                st.results.pop_front();
            }
            st.sleepers
        };
        if sleepers > 0 {
            self.cv.notify_all();
        }
        wake(self.waiters.notify());
    }

    /// The decrements (clusters) that the write-back in flight makes reusable when it
    /// completed (0 when none is in flight).
    pub fn early_frees(&self) -> u64 {
        self.early.load(Ordering::SeqCst)
    }

    /// Is a write-back in flight?
    pub fn busy(&self) -> bool {
        self.lock().in_flight.is_some()
    }

    /// Blocks until no write-back is in flight (threads that own no queue with one).
    pub fn wait_idle(&self) {
        let mut st = self.lock();
        while st.in_flight.is_some() {
            st.sleepers += 1;
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.sleepers -= 1;
        }
    }
}

impl Image {
    fn device_flush(&self, c: &Counters) -> Result<()> {
        Counters::add(&c.device_flushes, 1);
        // Guest data in an external data file is made durable with the metadata, first.
        self.sync_data_file()?;
        self.sync.fdatasync(self.file.fd())
    }

    /// The metadata lock for a synchronous write-back: taken when no asynchronous one is
    /// in flight (one starts only under the lock, so none starts while it is held). Never
    /// called from a queue whose own write-back may be in flight. None on a read-only image.
    pub(crate) fn lock_meta_quiet(&self) -> Option<super::alloc::MetaGuard<'_>> {
        loop {
            self.wb.wait_idle();
            let st = self.lock_meta()?;
            if !self.wb.busy() {
                return Some(st);
            }
        }
    }

    /// Writes all dirty metadata and makes it durable. With lazy refcounts the refcount
    /// stages are skipped (the dirty bit covers them) unless `clean_close`.
    /// Counts into `c`: the counters of the queue (or of the image) doing the work.
    /// An asynchronous write-back in flight ends first (callers take the lock with
    /// [`Image::lock_meta_quiet`], or check that none is in flight).
    pub(crate) fn flush_metadata(&self, st: &mut MetaState, clean_close: bool, c: &Counters) -> Result<()> {
        self.wb.wait_idle();
        self.flush_metadata_now(st, clean_close, c)
    }

    /// Takes back what asynchronous write-backs handed over (under the metadata lock).
    pub(crate) fn absorb_writeback(&self, st: &mut MetaState) {
        if st.rc.absorb_writeback() {
            st.l1_dirty = true;
        }
    }

    /// [`Image::flush_metadata`] once no asynchronous write-back is in flight.
    fn flush_metadata_now(&self, st: &mut MetaState, clean_close: bool, c: &Counters) -> Result<()> {
        self.absorb_writeback(st);
        // Decrements made safe by an asynchronous write-back retire with this one's.
        let mut safe = std::mem::take(&mut st.rc.safe_free);
        safe.append(&mut st.rc.pending_free);
        st.rc.pending_free = safe;
        let io = self.meta_io();
        let write_refcounts = !st.lazy || clean_close;
        let mut need_flush = false;
        // Has this write-back flushed the device yet? (Everything written under the metadata
        // lock before it, such as new L2 tables, is durable after its first flush.)
        let mut flushed = false;
        // 1. Refcount increases (and a moved table), durable before anything refers to them.
        if write_refcounts && st.rc.dirty() {
            let (b, t) = st.rc.write_back(&io)?;
            Counters::add(&c.refblock_writes, b);
            Counters::add(&c.reftable_writes, t);
            Counters::add(&c.refcount_write_bytes, (b + t * st.rc.table_clusters) * self.geo.cluster_size());
            self.device_flush(c)?;
            flushed = true;
        }
        if st.rc.table_moved && write_refcounts {
            let (off, clusters) = (st.rc.table_offset, st.rc.table_clusters as u32);
            self.update_header(c, |h| {
                h.refcount_table_offset = crate::format::HostOffset(off);
                h.refcount_table_clusters = clusters;
            })?;
            st.rc.table_moved = false;
            if let Some((o, n)) = st.rc.old_table.take() {
                for i in 0..n {
                    st.rc.free_later(self.geo.cluster_index(o) + i, 1);
                }
            }
        }
        // 2. L2 slices (data they point to was written before the entries changed, and the
        //    device flush above made it durable).
        let cache = &self.l2_cache;
        // Copy the dirty slices first, then flush the device, then write the copies: every
        // entry in a copy was published after its data write completed, so before this
        // device flush, which makes that data durable before the entry is. (Entries
        // published after the copy mark their slice dirty again for the next write-back.)
        //
        // Each slot stays pinned until its copy is on disk: once its dirty mark is cleared
        // an unpinned slot could be evicted, and a reload before the write lands would read
        // the old slice from disk and lose every update in the copy (a lost discard then
        // frees its cluster a second time).
        let copies = cache.pin_dirty_copies();
        let result = self.write_l2_copies(&copies, c);
        for (slot, _, _) in &copies {
            if result.is_err() {
                // Not (all) written: the slices stay dirty for the next write-back.
                cache.mark_dirty(*slot);
            }
            cache.unpin(*slot);
        }
        need_flush |= result?;
        if need_flush {
            self.device_flush(c)?;
            flushed = true;
            need_flush = false;
        }
        // 3. The L1 table. The L2 tables it points to are durable first: new ones were
        //    written when they were made, and only a device flush since then orders them
        //    before it (with lazy refcounts and no dirty slice none has happened yet; an L1
        //    entry that lands first points past the end of the file, or at a table that is
        //    not there: seed 7700145 of the crash campaign, "512/rb64 lazy QD8").
        if st.l1_dirty && !flushed {
            self.device_flush(c)?;
        }
        if st.l1_dirty {
            let h = self.header();
            let mut bytes = Vec::with_capacity(self.l1.len() * 8);
            // Only the entries the on-disk table has (the in-memory one has room to grow).
            for e in self.l1.iter().take(h.l1_size as usize) {
                bytes.extend_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
            }
            self.sync.write_kind(crate::io::hook::WriteKind::L1, self.file.fd(), h.l1_table_offset.0, &bytes)?;
            Counters::add(&c.l1_writes, 1);
            Counters::add(&c.l1_header_write_bytes, bytes.len() as u64);
            st.l1_dirty = false;
            need_flush = true;
        }
        if need_flush {
            self.device_flush(c)?;
        }
        // 4. Refcount decreases, now that nothing durable refers to those clusters, and
        //    only once no request that may still read or write them is in flight: the
        //    queued decrements retire at an epoch flip and are applied when every request
        //    of the old epoch is done, here or at a later flush (crate::meta::epoch).
        //    A decrement below zero (a cluster freed more often than it was referenced) is
        //    a corruption: the others are applied and written, then the image is marked
        //    corrupt (Image::signal_corruption) and the flush fails.
        let mut corrupt = None;
        loop {
            // A flip only once the previous flip's old epoch is drained (a write-back that
            // flipped early and then failed leaves one that no batch waited for).
            if st.rc.retiring.is_empty() && self.old_epoch_drained() && st.rc.start_retiring() {
                self.flip_epoch();
            }
            if st.rc.retiring.is_empty() || !self.old_epoch_drained() {
                break;
            }
            match st.rc.apply_pending(&io) {
                Err(e @ crate::Error::Corrupt { .. }) => {
                    corrupt.get_or_insert(e);
                }
                other => other?,
            }
            self.punch_freed(st);
            if write_refcounts {
                let (b, t) = st.rc.write_back(&io)?;
                Counters::add(&c.refblock_writes, b);
                Counters::add(&c.reftable_writes, t);
                Counters::add(&c.refcount_write_bytes, (b + t * st.rc.table_clusters) * self.geo.cluster_size());
                self.device_flush(c)?;
            }
        }
        if let Some(e) = corrupt {
            return Err(self.signal_corruption(e));
        }
        Ok(())
    }

    /// Flushes the device (making the data the copies map durable), then writes the L2
    /// slice copies. Returns whether anything was written.
    fn write_l2_copies(&self, copies: &[(crate::meta::cache::SlotId, u64, AlignedBuf)], c: &Counters) -> Result<bool> {
        if copies.is_empty() {
            return Ok(false);
        }
        self.device_flush(c)?;
        for (_, key, bytes) in copies {
            self.sync.write_kind(crate::io::hook::WriteKind::L2, self.file.fd(), *key, bytes)?;
            Counters::add(&c.l2_writes, 1);
            Counters::add(&c.l2_write_bytes, bytes.len() as u64);
        }
        Ok(true)
    }

    /// Starts an asynchronous write-back of generation `generation` (under the metadata lock, with
    /// `generation` registered as in flight): applies the decrements an earlier one made safe,
    /// then copies the dirty refcount blocks and table, L2 slices and L1 table into a plan
    /// and marks them clean. The caller issues the plan on its ring and calls
    /// [`Image::settle_writeback`] when it ended.
    pub(crate) fn begin_writeback(&self, st: &mut MetaState, generation: u64, c: &Counters) -> Result<WbPlan> {
        let mut plan = WbPlan {
            generation,
            stages: Vec::new(),
            slots: Vec::new(),
            blocks: Vec::new(),
            table: false,
            l1: false,
            frees: Vec::new(),
            early: false,
            corrupt: None,
        };
        let write_refcounts = !st.lazy;
        if st.rc.table_moved && write_refcounts {
            // Rare (the refcount table grew): the header changes too; done synchronously,
            // then one device flush for the data (the sync path's last flush may precede
            // nothing else).
            self.flush_metadata_now(st, false, c)?;
            plan.stages.push(WbStage { writes: Vec::new(), flush: true });
            return Ok(plan);
        }
        self.absorb_writeback(st);
        plan.corrupt = self.retire_safe(st)?;
        let cs = self.geo.cluster_size();
        let mut flushed = false;
        if write_refcounts {
            let blocks = st.rc.take_dirty_blocks();
            if !blocks.is_empty() {
                Counters::add(&c.refblock_writes, blocks.len() as u64);
                Counters::add(&c.refcount_write_bytes, blocks.len() as u64 * cs);
                plan.blocks = blocks.iter().map(|(off, _)| *off).collect();
                let writes =
                    blocks.into_iter().map(|(off, buf)| WbWrite { kind: WriteKind::RefBlock, off, buf }).collect();
                plan.stages.push(WbStage { writes, flush: true });
                flushed = true;
            }
            if let Some((off, buf)) = st.rc.take_table() {
                Counters::add(&c.reftable_writes, 1);
                Counters::add(&c.refcount_write_bytes, buf.len() as u64);
                plan.table = true;
                plan.stages
                    .push(WbStage { writes: vec![WbWrite { kind: WriteKind::RefTable, off, buf }], flush: true });
                flushed = true;
            }
        }
        // L2 slices: each copy holds entries published after their data write completed,
        // so before the device flush that precedes this stage. Each slot stays pinned
        // until the write-back ended (see flush_metadata_now).
        //
        // Slices that follow each other on disk (the slices of one table, tables in
        // consecutive clusters) go out as one write of one buffer: a write-back of many
        // slices (extended L2 entries change with every subcluster written) costs a few
        // SQEs instead of one per slice.
        let cache = &self.l2_cache;
        let mut writes = Vec::new();
        let dirty = cache.pin_dirty();
        let ss = cache.slot_size();
        let mut rest = &dirty[..];
        while let Some(&(_, first)) = rest.first() {
            let mut n = 1;
            while n < rest.len() && n < MAX_L2_RUN_BYTES / ss && Some(rest[n].1) == rest[n - 1].1.checked_add(ss as u64)
            {
                n += 1;
            }
            let mut buf = AlignedBuf::new(n * ss);
            for (i, &(slot, _)) in rest[..n].iter().enumerate() {
                cache.copy_pinned(slot, &mut buf[i * ss..(i + 1) * ss]);
                plan.slots.push(slot);
            }
            Counters::add(&c.l2_writes, 1);
            Counters::add(&c.l2_write_bytes, buf.len() as u64);
            writes.push(WbWrite { kind: WriteKind::L2, off: first, buf });
            rest = &rest[n..];
        }
        if st.l1_dirty {
            let h = self.header();
            let n = h.l1_size as usize * 8;
            if n > 0 {
                // Whole sectors (O_DIRECT); the rest of the last sector is zeros, as QEMU
                // writes it (the table's clusters hold nothing else).
                let mut buf = AlignedBuf::new(n.div_ceil(512) * 512);
                buf.fill(0);
                for (i, e) in self.l1.iter().take(h.l1_size as usize).enumerate() {
                    buf[i * 8..i * 8 + 8].copy_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
                }
                Counters::add(&c.l1_writes, 1);
                Counters::add(&c.l1_header_write_bytes, n as u64);
                writes.push(WbWrite { kind: WriteKind::L1, off: h.l1_table_offset.0, buf });
            }
            st.l1_dirty = false;
            plan.l1 = true;
        }
        if !writes.is_empty() && !flushed {
            plan.stages.push(WbStage { writes: Vec::new(), flush: true });
        }
        if !writes.is_empty() || !flushed {
            // The closing device flush (with nothing to write: the one that makes the
            // guest's data durable).
            plan.stages.push(WbStage { writes, flush: true });
        }
        plan.frees = std::mem::take(&mut st.rc.pending_free);
        // The epoch flips for these decrements now, when no batch retires and none waits
        // to (so this flip cannot be confused with another) and the previous flip's old
        // epoch is drained: every reference they drop was dropped before this point, so
        // no request entering after it can use their clusters, and once the write-back
        // completed they are applied as soon as the requests that entered before it are
        // done: freed clusters come back one write-back earlier (issue 14).
        if !plan.frees.is_empty() && st.rc.retiring.is_empty() && st.rc.safe_free.is_empty() && self.old_epoch_drained()
        {
            self.flip_epoch();
            plan.early = true;
            self.wb.early.store(plan.frees.len() as u64, Ordering::SeqCst);
        }
        Ok(plan)
    }

    /// Applies the decrements that earlier write-backs made safe, once no request of an
    /// older epoch may still use their clusters (see the sync path's step 4); the freed
    /// clusters are punched. Returns a corruption found (a decrement below zero), which
    /// fails the write-back when it ends.
    pub(crate) fn retire_safe(&self, st: &mut MetaState) -> Result<Option<crate::Error>> {
        let io = self.meta_io();
        let mut corrupt = None;
        loop {
            if st.rc.retiring.is_empty() && !st.rc.safe_free.is_empty() && self.old_epoch_drained() {
                st.rc.retiring = std::mem::take(&mut st.rc.safe_free);
                self.flip_epoch();
            }
            if st.rc.retiring.is_empty() || !self.old_epoch_drained() {
                break;
            }
            match st.rc.apply_pending(&io) {
                Err(e @ crate::Error::Corrupt { .. }) => {
                    corrupt.get_or_insert(e);
                }
                other => other?,
            }
            self.punch_freed(st);
        }
        Ok(corrupt)
    }

    /// Clusters whose refcount dropped to zero: forgotten as metadata and punched (they
    /// read as zeros and give their space back) before anyone can allocate them again.
    fn punch_freed(&self, st: &mut MetaState) {
        for cl in std::mem::take(&mut st.rc.freed) {
            let off = self.geo.cluster_bytes(cl);
            self.l2_cache.forget(off);
            // Whatever it was, it is free now and may become data.
            self.overlap.forget(crate::format::types::HostCluster(cl));
            let _ = self.sync.punch(WriteKind::Other, &self.file, off, self.geo.cluster_size());
        }
    }

    /// An asynchronous write-back ended (`ok`: every write and device flush succeeded);
    /// no lock needed. Unpins what it pinned; after a failure everything it copied is dirty
    /// again and its decrements are queued again, after a success they may retire.
    /// Returns a corruption found when it started (a decrement below zero; the image is
    /// marked corrupt).
    pub(crate) fn settle_writeback(&self, plan: WbPlan, ok: bool) -> Option<crate::Error> {
        for &slot in &plan.slots {
            if !ok {
                self.l2_cache.mark_dirty(slot);
            }
            self.l2_cache.unpin(slot);
        }
        // The shared part of the refcounts is reached without the metadata lock.
        let Some(shared) = &self.wb_shared else { return None };
        crate::meta::refcount::Refcounts::settle_blocks(shared, &plan.blocks, ok);
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
        if plan.early {
            // Before the write-back's end wakes its waiters (`WbCoord::end`).
            self.wb.early.store(0, Ordering::SeqCst);
        }
        if ok && plan.early {
            sh.early_frees.extend(plan.frees);
        } else if ok {
            sh.safe_frees.extend(plan.frees);
        } else {
            sh.failed_frees.extend(plan.frees);
            sh.table_redirty |= plan.table;
            sh.l1_redirty |= plan.l1;
        }
        drop(sh);
        plan.corrupt.map(|e| self.signal_corruption(e))
    }

    /// Clean close: all metadata durable, lazy-refcount dirty bit cleared.
    pub(crate) fn close_metadata(&self, st: &mut MetaState) -> Result<()> {
        let c = &self.counters;
        self.flush_metadata(st, true, c)?;
        if st.dirty_bit_set {
            self.update_header(c, |h| h.incompatible_features &= !crate::format::feature::INCOMPAT_DIRTY)?;
            st.dirty_bit_set = false;
        }
        self.trim_tail(st)
    }
}
