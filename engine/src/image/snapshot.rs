//! Internal snapshots on an open image (spec: "Snapshots"; `qemu-img snapshot -c|-a|-d`, a
//! VMM's savevm/loadvm/delvm without VM state): create, apply, delete, and the list
//! ([`Image::snapshots`]).
//!
//! Each operation takes the metadata lock and needs idle queues: no request in flight on any
//! queue of the image (a VMM pauses its virtqueues first, as QEMU drains the block node).
//! A request already in flight makes the operation fail with nothing changed; one submitted
//! while it runs is refused by `Queue::submit` (an error, nothing started), so a request
//! never sees a half-changed tree. The
//! operation first writes back and makes durable everything the queues did (as QEMU flushes
//! before a snapshot), drops the L2 cache, then changes the tables on disk directly through
//! the image's synchronous ring.
//!
//! Order of the writes (QEMU's, each stage durable before the next), so that a crash at any
//! point leaves the old or the new snapshot state, with at worst leaked clusters and COPIED
//! flags still clear on clusters whose refcount has already dropped to 1 (the harmless
//! direction: a write there copies instead of writing in place; `qemu-img check` reports
//! it, as for QEMU's own snapshot operations interrupted at the same point):
//! - create: the snapshot's L1 table (a copy of the active one) in new clusters; COPIED
//!   cleared in the active L2 tables, then in the active L1; refcount increments of every
//!   cluster the active L1 reaches; the new snapshot table in new clusters; the header
//!   (`nb_snapshots`, `snapshots_offset`); the old table freed. (QEMU increments before it
//!   clears COPIED, so its crash states can show COPIED on refcount 2; clearing first
//!   keeps every intermediate state in the harmless direction.)
//! - apply: refcount increments of what the snapshot reaches; COPIED cleared in its L2
//!   tables; the active L1 overwritten with the snapshot's (COPIED clear); the old active
//!   tree's refcounts decremented (freed clusters punched); COPIED set where the refcount
//!   is now 1 (L2 tables, then the L1).
//! - delete: the table without the snapshot and the header; the decrements of what the
//!   snapshot reached and of its L1 table (freed clusters punched); COPIED set where the
//!   refcount is now 1.

use super::*;
use crate::format::header::MAX_SNAPSHOTS;
use crate::format::snapshot::{self as sn};
use crate::format::types::HostCluster;
use crate::meta::overlap::MetaKind;
use snapshot_refs::Refs;

/// What a new snapshot records besides the disk state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSnapshot {
    /// The name (TAG); QEMU allows duplicates, so does quring.
    pub name: String,
    /// Creation time: seconds and nanoseconds since the epoch.
    pub date: (u32, u32),
    /// The guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The instruction counter (None: not recorded, stored as all ones).
    pub icount: Option<u64>,
}

impl NewSnapshot {
    /// A snapshot as `qemu-img snapshot -c NAME` records it: the current time with
    /// microsecond precision, VM clock 0, icount 0.
    pub fn named(name: &str) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        NewSnapshot {
            name: name.to_string(),
            date: (now.as_secs() as u32, now.subsec_micros() * 1000),
            vm_clock_nsec: 0,
            icount: Some(0),
        }
    }
}

/// The metadata lock held by a snapshot operation, and the flag that refuses new requests
/// meanwhile (cleared on drop).
pub(super) struct SnapshotGuard<'a> {
    meta: alloc::MetaGuard<'a>,
    busy: &'a std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for SnapshotGuard<'_> {
    type Target = MetaState;
    fn deref(&self) -> &MetaState {
        &self.meta
    }
}

impl std::ops::DerefMut for SnapshotGuard<'_> {
    fn deref_mut(&mut self) -> &mut MetaState {
        &mut self.meta
    }
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::SeqCst);
    }
}

impl Image {
    /// Creates an internal snapshot of the current disk state, as `qemu-img snapshot -c`:
    /// the next numeric ID, no VM state, the v3 extra data (64-bit VM state size, the
    /// virtual disk size, icount). Returns the new table entry. Needs idle queues (module
    /// documentation).
    pub fn create_snapshot(&self, new: &NewSnapshot) -> Result<Snapshot> {
        if self.data_file.is_some() {
            // As QEMU (qcow2_snapshot_create: -ENOTSUP): the data file has one copy of the data.
            return Err(Error::Unsupported("internal snapshots of an image with an external data file".into()));
        }
        let mut st = self.snapshot_lock()?;
        let mut snaps = self.snapshots();
        if snaps.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidRequest(format!(
                "the image already has the maximum of {MAX_SNAPSHOTS} snapshots"
            )));
        }
        if new.name.len() > u16::MAX as usize {
            return Err(Error::InvalidRequest("the snapshot name is longer than 65535 bytes".into()));
        }
        self.quiesce(&mut st)?;
        let l1 = self.active_l1();
        let mut refs = Refs::new();
        self.count_refs(&l1, &mut refs)?;
        self.check_increments(&mut st, &refs)?;
        // 1. The snapshot's L1 table: a copy of the active one, byte for byte as QEMU copies
        //    it (COPIED flags included: nothing reads them in an inactive table, and every
        //    apply sets them exactly).
        let g = self.geo;
        let l1_bytes = l1.len() as u64 * 8;
        let l1_off = if l1.is_empty() {
            0
        } else {
            let clusters = l1_bytes.div_ceil(g.cluster_size());
            let io = self.meta_io();
            let c = st.rc.alloc_contiguous(&io, clusters)?;
            self.note_end(&st);
            self.overlap.record(MetaKind::InactiveL1, HostCluster(c), clusters);
            self.sync.write_kind(
                crate::io::hook::WriteKind::L1,
                self.file.fd(),
                g.cluster_bytes(c),
                &crate::format::l1::encode_table(&l1),
            )?;
            g.cluster_bytes(c)
        };
        // 2. COPIED cleared on everything the snapshot will share: L2 tables, then the L1.
        let mut active = l1.clone();
        if self.fix_copied(&mut st, &mut active, true)? {
            self.write_active_l1(&active)?;
        }
        // 3. The increments (durable with the copy: the write-back flushes the device).
        self.apply_increments(&mut st, &refs)?;
        // 4. The table and the header.
        let snap = Snapshot {
            l1_table_offset: crate::format::HostOffset(l1_off),
            l1_size: l1.len() as u32,
            id: sn::next_id(&snaps),
            name: new.name.clone(),
            date_sec: new.date.0,
            date_nsec: new.date.1,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: 0,
            extra: Snapshot::v3_extra(0, self.vsize(), new.icount),
        };
        snaps.push(snap.clone());
        self.write_snapshot_table(&mut st, snaps)?;
        self.l2_cache.invalidate_all();
        Ok(snap)
    }

    /// Reverts the disk to the snapshot `key` names (an ID first, then a name, as QEMU
    /// finds it), as `qemu-img snapshot -a`; the snapshot stays. Needs idle queues (module
    /// documentation). A snapshot of another virtual size is refused (QEMU resizes the
    /// disk; quring does not yet).
    pub fn apply_snapshot(&self, key: &str) -> Result<()> {
        let mut st = self.snapshot_lock()?;
        let snaps = self.snapshots();
        let s = sn::find(&snaps, key)
            .map(|i| snaps[i].clone())
            .ok_or_else(|| Error::InvalidRequest(format!("no snapshot with the ID or name '{key}'")))?;
        let h = self.header();
        if s.disk_size().is_some_and(|d| d != self.vsize()) {
            return Err(Error::Unsupported(format!(
                "snapshot '{}' has a virtual size of {} bytes, the disk {}: applying it would resize the disk",
                s.name,
                s.disk_size().unwrap_or(0),
                self.vsize()
            )));
        }
        if s.l1_size > h.l1_size {
            return Err(Error::Unsupported(format!(
                "snapshot '{}' has {} L1 entries, more than the active table's {}",
                s.name, s.l1_size, h.l1_size
            )));
        }
        self.quiesce(&mut st)?;
        let mut new = self.read_snapshot_l1(&s)?;
        new.resize(h.l1_size as usize, L1Entry(0));
        let mut refs = Refs::new();
        self.count_refs(&new, &mut refs)?;
        self.check_increments(&mut st, &refs)?;
        let old = self.active_l1();
        let mut old_refs = Refs::new();
        self.count_refs(&old, &mut old_refs)?;
        // 1. What the snapshot reaches gains a reference; its tables lose COPIED.
        self.apply_increments(&mut st, &refs)?;
        let before = new.clone();
        self.fix_copied(&mut st, &mut new, false)?;
        if new != before {
            // QEMU's walk writes the snapshot's own L1 table back with the flags it set.
            let own = crate::format::l1::encode_table(&new[..s.l1_size as usize]);
            self.sync.write_kind(crate::io::hook::WriteKind::L1, self.file.fd(), s.l1_table_offset.0, &own)?;
            Counters::add(&self.counters.device_flushes, 1);
            self.sync.fdatasync(self.file.fd())?;
        }
        // 2. The switch.
        for e in &old {
            let t = e.l2_offset().0;
            if t != 0 && new.iter().all(|n| n.l2_offset().0 != t) {
                let c = HostCluster(self.geo.cluster_index(t));
                self.overlap.relabel(c, MetaKind::ActiveL2, MetaKind::InactiveL2);
            }
        }
        self.write_active_l1(&new)?;
        // 3. The old tree loses its reference (the compressed writers' partly filled cluster
        //    may be freed with it).
        st.ctail = Default::default();
        self.apply_decrements(&mut st, &old_refs)?;
        // 4. COPIED where clusters became private again.
        if self.fix_copied(&mut st, &mut new, false)? {
            self.write_active_l1(&new)?;
        }
        self.l2_cache.invalidate_all();
        Ok(())
    }

    /// Deletes the snapshot `key` names (an ID first, then a name), as `qemu-img snapshot
    /// -d`: its clusters that nothing else uses are freed and punched. Needs idle queues
    /// (module documentation).
    pub fn delete_snapshot(&self, key: &str) -> Result<()> {
        let mut st = self.snapshot_lock()?;
        let mut snaps = self.snapshots();
        let i = sn::find(&snaps, key)
            .ok_or_else(|| Error::InvalidRequest(format!("no snapshot with the ID or name '{key}'")))?;
        self.quiesce(&mut st)?;
        let s = snaps.remove(i);
        let l1 = self.read_snapshot_l1(&s)?;
        let mut refs = Refs::new();
        self.count_refs(&l1, &mut refs)?;
        let cs = self.geo.cluster_size();
        let l1_clusters = (s.l1_size as u64 * 8).div_ceil(cs);
        for k in 0..l1_clusters {
            *refs.entry(s.l1_table_offset.0 / cs + k).or_default() += 1;
        }
        // 1. The table without it: from here on its clusters leak at worst.
        self.write_snapshot_table(&mut st, snaps)?;
        // 2. The decrements (freed clusters are punched).
        st.ctail = Default::default();
        self.apply_decrements(&mut st, &refs)?;
        // 3. COPIED where clusters became private again.
        let mut active = self.active_l1();
        if self.fix_copied(&mut st, &mut active, false)? {
            self.write_active_l1(&active)?;
        }
        self.l2_cache.invalidate_all();
        Ok(())
    }

    /// The metadata lock for a snapshot operation on a writable image, with new requests
    /// refused until the returned guard is dropped; fails when a request is in flight.
    fn snapshot_lock(&self) -> Result<SnapshotGuard<'_>> {
        if self.l2less {
            return Err(Error::Unsupported("internal snapshots of L2-less images".into()));
        }
        self.idle_lock("snapshot operations")
    }

    /// The metadata lock for an operation that needs idle queues (`what` names it in the
    /// error), with new requests refused until the guard is dropped; fails when a request
    /// is in flight.
    pub(super) fn idle_lock(&self, what: &str) -> Result<SnapshotGuard<'_>> {
        self.check_writable()?;
        let meta = self.lock_meta_quiet().ok_or_else(|| Error::InvalidRequest("the image is open read-only".into()))?;
        self.snapshot_busy.store(true, Ordering::SeqCst);
        let g = SnapshotGuard { meta, busy: &self.snapshot_busy };
        let n = self.requests_in_flight();
        if n != 0 {
            return Err(Error::InvalidRequest(format!("{what} need idle queues: {n} requests are in flight")));
        }
        Ok(g)
    }

    /// Makes the image ready for a snapshot operation: everything the queues did durable,
    /// no L2 slice cached.
    fn quiesce(&self, st: &mut MetaState) -> Result<()> {
        self.take_owed_frees(&mut st.rc.pending_free);
        self.flush_metadata(st, true, &self.counters)?;
        self.drain_decrements(st)?;
        self.l2_cache.invalidate_all();
        if self.l2_cache.any_dirty() {
            return Err(Error::InvalidRequest("snapshot operations need idle queues: L2 slices are in use".into()));
        }
        Ok(())
    }

    /// Reads and validates a snapshot's L1 table.
    fn read_snapshot_l1(&self, s: &Snapshot) -> Result<Vec<L1Entry>> {
        let bytes = s.l1_size as u64 * 8;
        if bytes > crate::format::geometry::MAX_L1_BYTES
            || !self.geo.is_cluster_aligned(s.l1_table_offset.0)
            || s.l1_table_offset.0.checked_add(bytes).is_none_or(|e| e > self.file_len())
        {
            return Err(Error::corrupt(
                "snapshot L1 table",
                format!(
                    "snapshot '{}': {} entries at offset {:#x} do not fit in the file",
                    s.name, s.l1_size, s.l1_table_offset.0
                ),
            ));
        }
        let raw = self.sync.read_exact(self.file.fd(), s.l1_table_offset.0, bytes as usize, "snapshot L1 table")?;
        let l1 = crate::format::l1::decode_table(&raw);
        for (i, e) in l1.iter().enumerate() {
            if e.0 != 0 {
                e.validate(i as u64, self.geo.cluster_size(), false)?;
            }
        }
        Ok(l1)
    }

    /// Writes `snaps` as the new snapshot table in new clusters, durable, then points the
    /// header to it, then frees the old table (QEMU's `qcow2_write_snapshots`). Entries
    /// with short extra data are written with QEMU's 24 bytes. No snapshots: offset 0.
    fn write_snapshot_table(&self, st: &mut MetaState, mut snaps: Vec<Snapshot>) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        for s in &mut snaps {
            s.upgrade_extra(self.vsize());
        }
        let bytes = sn::serialize_table(&snaps);
        if bytes.len() as u64 > sn::MAX_TABLE_BYTES {
            return Err(Error::InvalidRequest(format!(
                "the snapshot table would take {} bytes, more than QEMU's limit of {}",
                bytes.len(),
                sn::MAX_TABLE_BYTES
            )));
        }
        let h = self.header();
        let old_len = sn::table_len(&self.snapshots());
        let off = if snaps.is_empty() {
            0
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cs);
            let io = self.meta_io();
            let c = st.rc.alloc_contiguous(&io, clusters)?;
            self.note_end(st);
            self.overlap.record(MetaKind::SnapshotTable, HostCluster(c), clusters);
            // Without the last entry's padding, as QEMU writes it.
            let last = snaps.last().map_or(0, |s| sn::FIXED_LEN + s.extra.len() + s.id.len() + s.name.len());
            let used = bytes.len() - (last.div_ceil(8) * 8 - last);
            self.sync.write_kind(
                crate::io::hook::WriteKind::Other,
                self.file.fd(),
                g.cluster_bytes(c),
                &bytes[..used],
            )?;
            g.cluster_bytes(c)
        };
        // The table and its refcounts durable before the header names them.
        self.flush_metadata(st, true, &self.counters)?;
        Counters::add(&self.counters.device_flushes, 1);
        self.sync.fdatasync(self.file.fd())?;
        let n = snaps.len() as u32;
        self.update_header(&self.counters, |h| {
            h.nb_snapshots = n;
            h.snapshots_offset = crate::format::HostOffset(off);
        })?;
        *self.snapshots.write().unwrap_or_else(|e| e.into_inner()) = snaps;
        if h.nb_snapshots > 0 && h.snapshots_offset.0 != 0 {
            let first = h.snapshots_offset.0 / cs;
            let last = (h.snapshots_offset.0 + old_len.max(1) - 1) / cs;
            let mut refs = Refs::new();
            for c in first..=last {
                refs.insert(c, 1);
            }
            self.apply_decrements(st, &refs)?;
        }
        Ok(())
    }
}
