//! Storing compressed clusters (spec: "Compressed Clusters Descriptor"): byte-granular
//! allocation as QEMU does it (`qcow2_alloc_bytes`: compressed clusters are packed one after
//! the other into host clusters, a payload may run on into the next cluster when that one is
//! allocated right after it; every host cluster a payload touches is referenced once more),
//! the payloads written with O_DIRECT (whole sectors: the sector shared with the previous
//! payload is rewritten from memory), then the descriptors published in the L2 cache.
//!
//! Everything here runs under the metadata lock, so payloads that share a sector are
//! written in order.

use crate::counters::Counters;
use crate::format::HostOffset;
use crate::format::l2::{L2Entry, SubclusterBitmap};
use crate::format::types::GuestOffset;
use crate::image::{Image, MetaState};
use crate::io::{AlignedBuf, SECTOR};
use crate::{Error, Result};

/// Where the next compressed payload goes (QEMU's `free_byte_offset`).
#[derive(Default)]
pub(crate) struct Tail {
    /// Next free byte (0: none, the next payload starts a new cluster).
    off: u64,
    /// The bytes of `off`'s sector before `off` (written with the previous payload).
    sector: Vec<u8>,
}

/// One compressed cluster to store.
pub(crate) struct Payload<'a> {
    /// Guest offset of the cluster.
    pub guest: u64,
    /// The compressed bytes (shorter than a cluster), or a whole cluster stored as it is.
    pub data: &'a [u8],
    /// `data` is compressed.
    pub compressed: bool,
}

impl Image {
    /// Stores compressed clusters at unallocated guest clusters (QEMU refuses to compress
    /// over an allocated cluster: "compressed writes only go to unallocated clusters").
    pub(crate) fn store_compressed(&self, items: &[Payload<'_>], cnt: &Counters) -> Result<()> {
        if self.data_file.is_some() {
            return Err(Error::Unsupported(
                "compressed writes to an image with an external data file (qcow2 does not allow them)".into(),
            ));
        }
        // The guard wakes the queues parked on the lock when it is released.
        let Some(mut st) = self.lock_meta() else {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        };
        self.mark_dirty_for_lazy(&mut st, cnt)?;
        let g = self.geo;
        // Each target entry: its slot, pinned until published.
        let mut slots = Vec::with_capacity(items.len());
        let r = (|| {
            for it in items {
                let l1i = g.l1_index(g.guest_cluster(GuestOffset(it.guest)));
                if !self.write_l1_ready(l1i) {
                    self.ensure_l2_table(&mut st, l1i, cnt)?;
                }
                let slot = loop {
                    let at = self.l2_slot(GuestOffset(it.guest))?.ok_or_else(|| {
                        Error::InvalidRequest(format!("no L2 table for guest offset {:#x}", it.guest))
                    })?;
                    self.load_slice_sync(at.key)?;
                    if let Some(s) = self.l2_cache.pin(at.key) {
                        break (s, at.word);
                    }
                };
                slots.push(slot);
                let e = L2Entry(self.l2_cache.load_word(slot.0, slot.1));
                if e.host_offset().0 != 0 || e.0 & crate::format::l2::L2_COMPRESSED != 0 {
                    return Err(Error::InvalidRequest(format!(
                        "guest cluster at {:#x} is allocated: compressed writes only go to unallocated clusters",
                        it.guest
                    )));
                }
            }
            // Allocate every payload, then write them in runs of adjacent bytes.
            let mut placed: Vec<(u64, usize)> = Vec::with_capacity(items.len());
            let mut run_start: Option<(u64, Vec<u8>)> = None;
            let mut run: Vec<u8> = Vec::new();
            for (i, it) in items.iter().enumerate() {
                if !it.compressed {
                    let io = self.meta_io();
                    let c = st.rc.alloc_contiguous(&io, 1)?;
                    self.note_end(&st);
                    Counters::add(&cnt.clusters_allocated, 1);
                    let off = g.cluster_bytes(c);
                    self.write_payloads(off, &[], it.data, cnt)?;
                    placed.push((off, i));
                    continue;
                }
                let prefix = st.ctail.sector.clone();
                let off = self.alloc_bytes(&mut st, it.data.len() as u64, cnt)?;
                match &run_start {
                    Some((s, _)) if s + run.len() as u64 == off => {}
                    _ => {
                        if let Some((s, p)) = run_start.take() {
                            self.write_payloads(s, &p, &run, cnt)?;
                        }
                        // A payload that continues the tail's sector rewrites its start.
                        let p = if off.is_multiple_of(SECTOR) { Vec::new() } else { prefix };
                        run_start = Some((off, p));
                        run.clear();
                    }
                }
                run.extend_from_slice(it.data);
                placed.push((off, i));
                // What the next payload's sector starts with: the last `keep` bytes of
                // prefix + run (which ends at `end`).
                let keep = ((off + it.data.len() as u64) % SECTOR) as usize;
                st.ctail.sector = match &run_start {
                    Some(_) if st.ctail.off == 0 || keep == 0 => Vec::new(),
                    Some((_, p)) if keep > run.len() => {
                        let mut v = p[p.len() - (keep - run.len())..].to_vec();
                        v.extend_from_slice(&run);
                        v
                    }
                    _ => run[run.len() - keep..].to_vec(),
                };
            }
            if let Some((s, p)) = run_start.take() {
                self.write_payloads(s, &p, &run, cnt)?;
            }
            // Publish the descriptors (the payloads are written).
            for (off, i) in placed {
                let (slot, word) = slots[i];
                let (e, b) = if items[i].compressed {
                    (L2Entry::compressed(&g, HostOffset(off), items[i].data.len() as u64), SubclusterBitmap(0))
                } else {
                    (L2Entry::normal(HostOffset(off), true), SubclusterBitmap::from_parts(u32::MAX, 0))
                };
                if g.extended_l2 {
                    self.l2_cache.store_pair(slot, word, e.0, b.0);
                } else {
                    let old = self.l2_cache.load_word(slot, word);
                    if !self.l2_cache.cas_word(slot, word, old, e.0) {
                        return Err(Error::InvalidRequest(format!(
                            "guest cluster at {:#x} was written during the compressed write",
                            items[i].guest
                        )));
                    }
                }
            }
            Ok(())
        })();
        for (slot, _) in slots {
            self.l2_cache.unpin(slot);
        }
        r
    }

    /// QEMU's byte allocator for compressed payloads: returns where `size` bytes go and
    /// takes their references.
    fn alloc_bytes(&self, st: &mut MetaState, size: u64, cnt: &Counters) -> Result<u64> {
        let g = self.geo;
        let cs = g.cluster_size();
        let io = self.meta_io();
        let mut off = st.ctail.off;
        if off != 0 && st.rc.get(&io, g.cluster_index(off))? >= g.refcount_max() {
            off = 0;
        }
        let free_in = if off == 0 { 0 } else { cs - off % cs };
        if off == 0 || free_in < size {
            let nc = st.rc.alloc_contiguous(&io, 1)?; // refcount 1: the new cluster's reference
            self.note_end(st);
            Counters::add(&cnt.clusters_allocated, 1);
            let nb = g.cluster_bytes(nc);
            if off == 0 || off.div_ceil(cs) * cs != nb {
                off = nb;
            } else {
                // Runs on from the tail cluster into the one right after it.
                st.rc.add(&io, g.cluster_index(off), 1)?;
            }
        } else {
            st.rc.add(&io, g.cluster_index(off), 1)?;
        }
        let end = off + size;
        st.ctail.off = if end.is_multiple_of(cs) { 0 } else { end };
        Ok(off)
    }

    /// Writes payload bytes `run` at host offset `start`; `prefix` holds the bytes of
    /// `start`'s sector before it (written before with the previous payload).
    fn write_payloads(&self, start: u64, prefix: &[u8], run: &[u8], cnt: &Counters) -> Result<()> {
        let from = start - prefix.len() as u64;
        debug_assert_eq!(from % SECTOR, 0);
        let total = (prefix.len() + run.len()).div_ceil(SECTOR as usize) * SECTOR as usize;
        let mut buf = AlignedBuf::new(total);
        buf[..prefix.len()].copy_from_slice(prefix);
        buf[prefix.len()..prefix.len() + run.len()].copy_from_slice(run);
        buf[prefix.len() + run.len()..].fill(0);
        self.sync.write_kind(crate::io::hook::WriteKind::Data, self.file.fd(), from, &buf)?;
        self.file_len.fetch_max(from + total as u64, std::sync::atomic::Ordering::AcqRel);
        Counters::add(&cnt.data_writes, 1);
        Counters::add(&cnt.data_write_bytes, total as u64);
        Ok(())
    }
}
