//! The refcount walk of internal snapshots (spec: "Snapshots" and "Host cluster
//! management"): every cluster an L1 table reaches (its L2 tables, the host clusters their
//! entries map, each host cluster a compressed cluster's bytes touch) counted once per
//! reference, as QEMU's `qcow2_update_snapshot_refcount` counts them, and the COPIED flags of
//! an L1 table and its L2 tables set exactly where the refcount is 1.
//!
//! Both run on a quiesced image (see [`super::snapshot`]): the L2 tables are read from and
//! written to the file directly, the L2 cache holds no dirty slice and is invalidated after.

use super::*;
use crate::format::l2::{self, ClusterKind, L2Entry};
use crate::format::types::HostCluster;
use crate::meta::overlap::MetaKind;
use std::collections::HashMap;

/// References per host cluster.
pub(super) type Refs = HashMap<u64, u64>;

impl Image {
    /// Reads the L2 table at `off` (a whole cluster), which must lie inside the file.
    fn read_l2_table(&self, off: u64, l1_index: usize) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        if !self.geo.is_cluster_aligned(off) || off.checked_add(cs).is_none_or(|e| e > self.file_len()) {
            return Err(Error::corrupt(
                "L1 entry",
                format!("entry {l1_index} points to L2 table offset {off:#x}, outside the file or unaligned"),
            ));
        }
        self.sync.read_exact(self.file.fd(), off, cs as usize, "L2 table")
    }

    /// Adds to `out` one reference for every cluster `l1` reaches: each L2 table once per L1
    /// entry naming it, each standard or preallocated-zero host cluster once per L2 entry
    /// mapping it, and each host cluster a compressed cluster's bytes touch once per
    /// compressed entry.
    pub(super) fn count_refs(&self, l1: &[L1Entry], out: &mut Refs) -> Result<()> {
        let cs = self.geo.cluster_size();
        // A host offset past the end of the file is a corrupt entry (counting it would grow
        // the refcount structures to wherever it points).
        let end = self.file_len().div_ceil(cs) * cs;
        let inside = |host: u64, entry: L2Entry| {
            if host < end {
                Ok(())
            } else {
                Err(Error::corrupt(
                    "L2 entry",
                    format!("entry {:#018x} maps host offset {host:#x}, past the end of the file ({end:#x})", entry.0),
                ))
            }
        };
        for (i, e) in l1.iter().enumerate() {
            let t = e.l2_offset().0;
            if t == 0 {
                continue;
            }
            let table = self.read_l2_table(t, i)?;
            *out.entry(t / cs).or_default() += 1;
            for j in 0..self.geo.l2_entries() as usize {
                let (entry, _) = l2::read_entry(&self.geo, &table, j);
                match entry.decode(&self.geo)? {
                    ClusterKind::Normal { host, .. } | ClusterKind::ZeroAlloc { host, .. } => {
                        inside(host.0, entry)?;
                        *out.entry(host.0 / cs).or_default() += 1;
                    }
                    ClusterKind::Compressed { host, len } => {
                        inside(host.0, entry)?;
                        let last = host.0.checked_add(len.max(1) - 1).ok_or_else(|| {
                            Error::corrupt("L2 entry", format!("compressed descriptor {:#018x} overflows", entry.0))
                        })?;
                        for c in host.0 / cs..=last / cs {
                            *out.entry(c).or_default() += 1;
                        }
                    }
                    ClusterKind::Unallocated | ClusterKind::ZeroPlain => {}
                }
            }
        }
        Ok(())
    }

    /// Fails, before anything is written, when adding `refs` would take a refcount past the
    /// width's maximum (QEMU fails the same operation half-way, leaking clusters; its
    /// message is "Invalid argument").
    pub(super) fn check_increments(&self, st: &mut MetaState, refs: &Refs) -> Result<()> {
        let io = self.meta_io();
        let max = self.geo.refcount_max();
        for (&c, &n) in refs {
            let cur = st.rc.get(&io, c)?;
            if cur.checked_add(n).is_none_or(|v| v > max) {
                return Err(Error::InvalidRequest(format!(
                    "cluster {c}: refcount {cur} + {n} exceeds the {}-bit refcount maximum {max}",
                    self.geo.refcount_bits()
                )));
            }
        }
        Ok(())
    }

    /// Adds `refs` to the refcounts and makes them durable (with a moved refcount table and
    /// its header update, as every write-back does).
    pub(super) fn apply_increments(&self, st: &mut MetaState, refs: &Refs) -> Result<()> {
        let io = self.meta_io();
        let mut v: Vec<(u64, u64)> = refs.iter().map(|(&c, &n)| (c, n)).collect();
        v.sort_unstable();
        for (c, n) in v {
            st.rc.add(&io, c, n as i64).map_err(|e| self.signal_corruption(e))?;
        }
        self.note_end(st);
        self.flush_metadata(st, true, &self.counters)
    }

    /// Applies `refs` as decrements now, with every decrement the queues left waiting,
    /// and makes them durable (the caller has made the reference drops durable first).
    /// Freed clusters are forgotten by the overlap map and the L2 cache and punched (QEMU's
    /// discard of freed snapshot clusters).
    pub(super) fn apply_decrements(&self, st: &mut MetaState, refs: &Refs) -> Result<()> {
        let mut v: Vec<(u64, u64)> = refs.iter().map(|(&c, &n)| (c, n)).collect();
        v.sort_unstable();
        for (c, n) in v {
            st.rc.free_later(c, n);
        }
        self.drain_decrements(st)
    }

    /// Applies every queued decrement at once and writes the refcounts back, durable.
    ///
    /// The flush applies queued decrements only once the requests of the previous epoch
    /// are done ([`super::epoch`]); a snapshot operation does not need to wait for that: it
    /// runs with no request in flight and new ones refused, so no request can still use a
    /// freed cluster. (Waiting would not work either: a request that is refused counts
    /// itself in the epoch for a moment, and a writer retrying in a loop could keep the old
    /// epoch from ever looking drained, leaving decrements for after the COPIED pass.)
    pub(super) fn drain_decrements(&self, st: &mut MetaState) -> Result<()> {
        let io = self.meta_io();
        let mut batch = std::mem::take(&mut st.rc.retiring);
        batch.append(&mut st.rc.pending_free);
        st.rc.retiring = batch;
        let applied = st.rc.apply_pending(&io);
        for cl in std::mem::take(&mut st.rc.freed) {
            let off = self.geo.cluster_bytes(cl);
            self.l2_cache.forget(off);
            self.overlap.forget(HostCluster(cl));
            let _ = self.sync.punch(crate::io::hook::WriteKind::Other, &self.file, off, self.geo.cluster_size());
        }
        let (b, t) = st.rc.write_back(&io)?;
        Counters::add(&self.counters.refblock_writes, b);
        Counters::add(&self.counters.reftable_writes, t);
        Counters::add(&self.counters.device_flushes, 1);
        self.sync.fdatasync(self.file.fd())?;
        applied.map_err(|e| self.signal_corruption(e))
    }

    /// Sets COPIED in `l1` and in every L2 table it reaches exactly where the refcount is 1
    /// (QEMU's `qcow2_update_snapshot_refcount` with addend 0, run after every refcount
    /// change), or with `clear_all` clears it everywhere (before the increments of a new
    /// snapshot, so that no crash state has COPIED on a cluster with refcount 2). Changed L2
    /// tables are written and made durable; `l1` is changed in memory only (the caller
    /// writes it: the active table, or the table that becomes active). Returns whether `l1`
    /// changed.
    pub(super) fn fix_copied(&self, st: &mut MetaState, l1: &mut [L1Entry], clear_all: bool) -> Result<bool> {
        let io = self.meta_io();
        let cs = self.geo.cluster_size();
        let mut wrote = false;
        let mut l1_changed = false;
        for (i, e) in l1.iter_mut().enumerate() {
            let t = e.l2_offset().0;
            if t == 0 {
                continue;
            }
            let mut table = self.read_l2_table(t, i)?;
            let mut changed = false;
            for j in 0..self.geo.l2_entries() as usize {
                let (entry, bitmap) = l2::read_entry(&self.geo, &table, j);
                let host = match entry.decode(&self.geo)? {
                    ClusterKind::Normal { host, .. } | ClusterKind::ZeroAlloc { host, .. } => host,
                    _ => continue,
                };
                let one = !clear_all && st.rc.get(&io, host.0 / cs)? == 1;
                if one != entry.copied() {
                    let w = if one { entry.0 | l2::L2_COPIED } else { entry.0 & !l2::L2_COPIED };
                    l2::write_entry(&self.geo, &mut table, j, L2Entry(w), bitmap);
                    changed = true;
                }
            }
            if changed {
                self.sync.write_kind(crate::io::hook::WriteKind::L2, self.file.fd(), t, &table)?;
                Counters::add(&self.counters.l2_writes, 1);
                Counters::add(&self.counters.l2_write_bytes, cs);
                wrote = true;
            }
            let one = !clear_all && st.rc.get(&io, t / cs)? == 1;
            if one != e.copied() {
                *e = L1Entry::new(e.l2_offset(), one);
                l1_changed = true;
            }
        }
        if wrote {
            Counters::add(&self.counters.device_flushes, 1);
            self.sync.fdatasync(self.file.fd())?;
        }
        Ok(l1_changed)
    }

    /// Makes `l1` the active L1 table: written over the on-disk table (whose size it has)
    /// and made durable, then published to the queues. The L2 tables it names are recorded
    /// as active L2 tables in the overlap map.
    pub(super) fn write_active_l1(&self, l1: &[L1Entry]) -> Result<()> {
        let h = self.header();
        debug_assert_eq!(l1.len(), h.l1_size as usize);
        let bytes = crate::format::l1::encode_table(l1);
        self.sync.write_kind(crate::io::hook::WriteKind::L1, self.file.fd(), h.l1_table_offset.0, &bytes)?;
        Counters::add(&self.counters.l1_writes, 1);
        Counters::add(&self.counters.l1_header_write_bytes, bytes.len() as u64);
        Counters::add(&self.counters.device_flushes, 1);
        self.sync.fdatasync(self.file.fd())?;
        for (i, e) in l1.iter().enumerate() {
            self.l1[i].store(e.0, Ordering::Release);
            let t = e.l2_offset().0;
            if t != 0 {
                let c = HostCluster(self.geo.cluster_index(t));
                self.overlap.relabel(c, MetaKind::InactiveL2, MetaKind::ActiveL2);
                if self.overlap.kind_of(c).is_none() {
                    self.overlap.record(MetaKind::ActiveL2, c, 1);
                }
            }
        }
        Ok(())
    }

    /// The active L1 table as it is in memory (the on-disk table's entries).
    pub(super) fn active_l1(&self) -> Vec<L1Entry> {
        let n = self.header().l1_size as u64;
        (0..n).map(|i| self.l1_entry(i)).collect()
    }
}
