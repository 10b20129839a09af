//! The hand-over between an asynchronous write-back of refcount metadata and the holders of
//! the metadata lock (`crate::image::writeback`, `crate::queue::writeback`): the write-back
//! copies the dirty blocks and the table under the lock, writes them without it, and leaves
//! its results here for the next lock holder to take.

use super::Refcounts;
use crate::io::AlignedBuf;
use std::collections::HashMap;

/// What an asynchronous write-back in flight shares with the holders of the metadata lock
/// (`crate::image::writeback`): it runs without the lock, so it hands its results back here
/// and the next lock holder takes them ([`Refcounts::absorb_writeback`]).
#[derive(Default)]
pub(crate) struct WbShared {
    /// Refcount blocks whose copy is being written (offset, writes in flight): never
    /// evicted meanwhile, since a reload from the disk before the write lands would read
    /// the old counts.
    pub writing: HashMap<u64, u32>,
    /// Blocks whose write failed: dirty again (not evicted before the next lock holder
    /// marks them).
    pub redirty: Vec<u64>,
    /// The refcount table write failed: dirty again.
    pub table_redirty: bool,
    /// The L1 table write failed: dirty again.
    pub l1_redirty: bool,
    /// Decrements whose reference drop a completed write-back made durable.
    pub safe_frees: Vec<(u64, u64)>,
    /// Decrements of a write-back that failed: queued again as they were.
    pub failed_frees: Vec<(u64, u64)>,
    /// Decrements of a completed write-back that flipped the epoch for them when it began
    /// (`Image::begin_writeback`): they retire at once (no other flip can have happened
    /// since: see `Refcounts::absorb_writeback`).
    pub early_frees: Vec<(u64, u64)>,
}

impl Refcounts {
    /// Takes back what an asynchronous write-back handed over ([`WbShared`]): failed
    /// writes make their blocks and the table dirty again, failed decrements are queued
    /// again, safe ones join [`Refcounts::safe_free`]. Returns whether the L1 table must be
    /// marked dirty again.
    pub fn absorb_writeback(&mut self) -> bool {
        let sh = self.shared.clone();
        let mut sh = sh.lock().unwrap_or_else(|e| e.into_inner());
        for off in std::mem::take(&mut sh.redirty) {
            if let Some(b) = self.blocks.get_mut(&off) {
                b.dirty = true;
            }
        }
        if std::mem::take(&mut sh.table_redirty) {
            self.table_dirty = true;
        }
        self.pending_free.append(&mut sh.failed_frees);
        self.safe_free.append(&mut sh.safe_frees);
        if !sh.early_frees.is_empty() {
            if self.retiring.is_empty() {
                // The epoch flip at the write-back's start is the last one: every flip
                // needs an empty retiring batch and a drained old epoch, and while the
                // write-back ran, no batch could start (no safe decrements: one
                // write-back at a time, and it began with none).
                self.retiring = std::mem::take(&mut sh.early_frees);
            } else {
                // Not expected; the conservative way: retire after a flip of their own.
                self.safe_free.append(&mut sh.early_frees);
            }
        }
        std::mem::take(&mut sh.l1_redirty)
    }

    /// Copies every dirty refcount block for an asynchronous write-back: the blocks are
    /// clean from now on (a change after this makes them dirty again) and pinned in the
    /// cache until [`Refcounts::settle_blocks`].
    pub fn take_dirty_blocks(&mut self) -> Vec<(u64, AlignedBuf)> {
        let mut out = Vec::new();
        let sh = self.shared.clone();
        let mut sh = sh.lock().unwrap_or_else(|e| e.into_inner());
        for (&off, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            let mut copy = AlignedBuf::new(b.buf.len());
            copy.copy_from_slice(&b.buf);
            b.dirty = false;
            *sh.writing.entry(off).or_insert(0) += 1;
            out.push((off, copy));
        }
        out.sort_unstable_by_key(|&(off, _)| off);
        out
    }

    /// The refcount table's bytes, if it changed (clean from now on), for an asynchronous
    /// write-back: (offset, bytes of `table_clusters` clusters).
    pub fn take_table(&mut self) -> Option<(u64, AlignedBuf)> {
        if !self.table_dirty {
            return None;
        }
        let mut bytes = AlignedBuf::new((self.table_clusters * self.geo.cluster_size()) as usize);
        for (i, e) in self.table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.table_dirty = false;
        Some((self.table_offset, bytes))
    }

    /// An asynchronous write-back of these blocks ended (without the metadata lock): the
    /// pins go, and when it failed the blocks are dirty again.
    pub fn settle_blocks(shared: &std::sync::Mutex<WbShared>, blocks: &[u64], ok: bool) {
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
        for off in blocks {
            if let Some(n) = sh.writing.get_mut(off) {
                *n -= 1;
                if *n == 0 {
                    sh.writing.remove(off);
                }
            }
            if !ok {
                sh.redirty.push(*off);
            }
        }
    }
}
