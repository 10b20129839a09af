//! A bounded, lock-free cache of metadata slices (L2 table slices, refcount blocks) shared
//! by every queue of an image.
//!
//! Memory is one aligned arena of `slots * slot_size` bytes allocated at open; nothing is
//! allocated or freed afterwards, so readers never touch freed memory and no reclamation
//! scheme is needed. Each slot has one atomic control word:
//!
//! ```text
//!  63            24 23      16 15      2 1  0
//! [ key >> 9 (40b) | gen (8b) | pins 14b | st ]   st: 0 empty, 1 loading, 2 valid
//! ```
//!
//! The hit path is a seqlock read: load the control word (Acquire), check key and state,
//! load the entry word, fence, reload the control word; if key, generation and state are
//! unchanged the entry is valid. No lock, no syscall. A slot changes key only through a CAS
//! that bumps the generation, so a reader that raced with an eviction retries.
//!
//! Slots are grouped in sets of [`WAYS`] (set-associative); a key maps to one set. Victims
//! are chosen by a per-slot "recently used" bit (clock); a pinned slot (a request holds it
//! for an update or a write-back) is never evicted.

use crate::io::AlignedBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};

/// Slots per set.
pub const WAYS: usize = 8;

const ST_MASK: u64 = 0b11;
const ST_EMPTY: u64 = 0;
const ST_LOADING: u64 = 1;
const ST_VALID: u64 = 2;
const PIN_SHIFT: u32 = 2;
const PIN_MASK: u64 = 0x3fff << PIN_SHIFT;
const PIN_ONE: u64 = 1 << PIN_SHIFT;
const GEN_SHIFT: u32 = 16;
const GEN_MASK: u64 = 0xff << GEN_SHIFT;
const KEY_SHIFT: u32 = 24;

/// Largest key (host offset) the cache can hold: 2^49 bytes (512 TiB).
pub const MAX_KEY: u64 = (1 << 49) - 1;

#[inline]
fn key_bits(key: u64) -> u64 {
    debug_assert!(key <= MAX_KEY);
    (key >> 9) << KEY_SHIFT
}

const HIT_SHARDS: usize = 16;

/// One cache line of hit counter.
#[repr(align(64))]
struct HitShard(AtomicU64);

/// This thread's hit counter shard.
#[inline]
fn hit_shard() -> usize {
    use std::cell::Cell;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local!(static SHARD: Cell<usize> = const { Cell::new(usize::MAX) });
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) as usize % HIT_SHARDS);
        }
        s.get()
    })
}

/// Identifies a slot that a caller claimed for loading, or pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId(pub u32);

/// The outcome of [`MetaCache::claim`].
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is already cached (valid).
    Present(SlotId),
    /// Another request is loading it: wait and retry.
    Busy,
    /// The caller now owns this slot in loading state and must call
    /// [`MetaCache::complete_load`] (or [`MetaCache::abort_load`]).
    Load(SlotId),
}

/// The cache. Keys are host offsets of slices (multiples of 512).
pub struct MetaCache {
    slot_size: usize,
    sets: usize,
    ctl: Box<[AtomicU64]>,
    used: Box<[AtomicU8]>,
    dirty: Box<[AtomicU8]>,
    hand: Box<[AtomicU8]>,
    mem: AlignedBuf,
    /// Hit counts, sharded per thread (one cache line each) so that counting a hit never
    /// bounces a line between the cores doing lookups.
    hits: Box<[HitShard]>,
    misses: AtomicU64,
    evictions: AtomicU64,
}

// SAFETY: all shared mutable state is atomic; slot memory is only written by the owner of a
// slot in loading state (or by atomic stores), and read under seqlock validation.
unsafe impl Sync for MetaCache {}
// SAFETY: as above.
unsafe impl Send for MetaCache {}

impl MetaCache {
    /// A cache of at least `bytes` bytes in slices of `slot_size` bytes (a power of two,
    /// >= 512); at least one set of [`WAYS`] slots.
    pub fn new(bytes: u64, slot_size: usize) -> Self {
        assert!(slot_size.is_power_of_two() && slot_size >= 512);
        let slots = ((bytes / slot_size as u64) as usize).max(WAYS);
        let sets = slots.div_ceil(WAYS);
        let n = sets * WAYS;
        MetaCache {
            slot_size,
            sets,
            ctl: (0..n).map(|_| AtomicU64::new(ST_EMPTY)).collect(),
            used: (0..n).map(|_| AtomicU8::new(0)).collect(),
            dirty: (0..n).map(|_| AtomicU8::new(0)).collect(),
            hand: (0..sets).map(|_| AtomicU8::new(0)).collect(),
            mem: AlignedBuf::new(n * slot_size),
            hits: (0..HIT_SHARDS).map(|_| HitShard(AtomicU64::new(0))).collect(),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.ctl.len()
    }

    /// (hits, misses, evictions) so far.
    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.hits.iter().map(|h| h.0.load(Ordering::Relaxed)).sum(),
            self.misses.load(Ordering::Relaxed),
            self.evictions.load(Ordering::Relaxed),
        )
    }

    #[inline]
    fn set_of(&self, key: u64) -> usize {
        let h = (key >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((h >> 32) as usize) % self.sets
    }

    #[inline]
    fn word_ptr(&self, slot: usize, word: usize) -> &AtomicU64 {
        debug_assert!(word * 8 < self.slot_size);
        // SAFETY: the arena holds slots*slot_size bytes, 4 KiB aligned, so every 8-byte
        // word inside a slot is in bounds and aligned for AtomicU64.
        unsafe { &*(self.mem.as_ptr().add(slot * self.slot_size + word * 8) as *const AtomicU64) }
    }

    /// The hit path: reads big-endian word `word` of the slice `key`, if cached.
    #[inline]
    pub fn read_word(&self, key: u64, word: usize) -> Option<u64> {
        let set = self.set_of(key);
        let kb = key_bits(key);
        for s in set * WAYS..(set + 1) * WAYS {
            let c1 = self.ctl[s].load(Ordering::Acquire);
            if c1 & !(GEN_MASK | PIN_MASK) != kb | ST_VALID {
                continue;
            }
            let v = self.word_ptr(s, word).load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let c2 = self.ctl[s].load(Ordering::Relaxed);
            if (c1 ^ c2) & !PIN_MASK == 0 {
                if self.used[s].load(Ordering::Relaxed) == 0 {
                    self.used[s].store(1, Ordering::Relaxed);
                }
                self.hits[hit_shard()].0.fetch_add(1, Ordering::Relaxed);
                return Some(u64::from_be(v));
            }
            // Raced with an eviction: treat as a miss, the caller will claim and retry.
            return None;
        }
        None
    }

    /// Reads two consecutive words (extended L2 entries) under one validation.
    #[inline]
    pub fn read_pair(&self, key: u64, word: usize) -> Option<(u64, u64)> {
        let set = self.set_of(key);
        let kb = key_bits(key);
        for s in set * WAYS..(set + 1) * WAYS {
            let c1 = self.ctl[s].load(Ordering::Acquire);
            if c1 & !(GEN_MASK | PIN_MASK) != kb | ST_VALID {
                continue;
            }
            let a = self.word_ptr(s, word).load(Ordering::Relaxed);
            let b = self.word_ptr(s, word + 1).load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let c2 = self.ctl[s].load(Ordering::Relaxed);
            if (c1 ^ c2) & !PIN_MASK == 0 {
                if self.used[s].load(Ordering::Relaxed) == 0 {
                    self.used[s].store(1, Ordering::Relaxed);
                }
                self.hits[hit_shard()].0.fetch_add(1, Ordering::Relaxed);
                return Some((u64::from_be(a), u64::from_be(b)));
            }
            return None;
        }
        None
    }

    /// Finds `key` or claims a victim slot to load it into.
    pub fn claim(&self, key: u64) -> Claim {
        let set = self.set_of(key);
        let kb = key_bits(key);
        let range = set * WAYS..(set + 1) * WAYS;
        for s in range.clone() {
            let c = self.ctl[s].load(Ordering::Acquire);
            if c >> KEY_SHIFT << KEY_SHIFT == kb && c & ST_MASK != ST_EMPTY {
                return if c & ST_MASK == ST_VALID { Claim::Present(SlotId(s as u32)) } else { Claim::Busy };
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Clock sweep over the set: two passes clear "used" bits, then take any free slot.
        for _ in 0..3 * WAYS {
            let h = self.hand[set].fetch_add(1, Ordering::Relaxed) as usize % WAYS;
            let s = range.start + h;
            let c = self.ctl[s].load(Ordering::Acquire);
            if c & ST_MASK == ST_LOADING || c & PIN_MASK != 0 || self.dirty[s].load(Ordering::Acquire) != 0 {
                continue;
            }
            if c & ST_MASK == ST_VALID && self.used[s].swap(0, Ordering::Relaxed) != 0 {
                continue;
            }
            let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
            let new = kb | g | ST_LOADING;
            if self.ctl[s].compare_exchange(c, new, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                if self.dirty[s].load(Ordering::Acquire) != 0 {
                    // Marked dirty between our check and the CAS: the writer held no pin
                    // (it must), so give the slot back.
                    self.ctl[s].store(c, Ordering::Release);
                    continue;
                }
                if c & ST_MASK == ST_VALID {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                // Another claimer may have inserted the same key in another way meanwhile;
                // that is harmless (both hold identical content), lookups take the first.
                return Claim::Load(SlotId(s as u32));
            }
        }
        Claim::Busy
    }

    /// Is every slot of `key`'s set dirty, pinned or loading (so no victim can be found
    /// until dirty slots are written back)?
    pub fn set_clogged(&self, key: u64) -> bool {
        let set = self.set_of(key);
        (set * WAYS..(set + 1) * WAYS).all(|s| {
            let c = self.ctl[s].load(Ordering::Acquire);
            c & ST_MASK == ST_LOADING || c & PIN_MASK != 0 || self.dirty[s].load(Ordering::Acquire) != 0
        })
    }

    /// Memory of a slot the caller owns in loading state (the I/O target).
    pub fn slot_ptr(&self, slot: SlotId) -> *mut u8 {
        // SAFETY: in bounds of the arena (slot < slots()).
        unsafe { self.mem.as_ptr().add(slot.0 as usize * self.slot_size) as *mut u8 }
    }

    /// Marks a loaded slot valid (its memory now holds the slice).
    pub fn complete_load(&self, slot: SlotId) {
        let s = slot.0 as usize;
        self.used[s].store(1, Ordering::Relaxed);
        let c = self.ctl[s].load(Ordering::Relaxed);
        debug_assert_eq!(c & ST_MASK, ST_LOADING);
        self.ctl[s].store((c & !ST_MASK) | ST_VALID, Ordering::Release);
    }

    /// Gives up a claimed slot after a failed load.
    pub fn abort_load(&self, slot: SlotId) {
        let s = slot.0 as usize;
        let c = self.ctl[s].load(Ordering::Relaxed);
        let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
        self.ctl[s].store(g | ST_EMPTY, Ordering::Release);
    }

    /// Drops every valid, unpinned slot (used when metadata changed underneath, e.g. a
    /// refcount rebuild). Slots being loaded are left alone.
    pub fn invalidate_all(&self) {
        for c in self.ctl.iter() {
            let v = c.load(Ordering::Acquire);
            if v & ST_MASK == ST_VALID && v & PIN_MASK == 0 {
                let g = ((v & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
                let _ = c.compare_exchange(v, g | ST_EMPTY, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Pins a valid slot holding `key` so it cannot be evicted; returns it.
    pub fn pin(&self, key: u64) -> Option<SlotId> {
        let set = self.set_of(key);
        let kb = key_bits(key);
        for s in set * WAYS..(set + 1) * WAYS {
            let mut c = self.ctl[s].load(Ordering::Acquire);
            loop {
                if c & !(GEN_MASK | PIN_MASK) != kb | ST_VALID || c & PIN_MASK == PIN_MASK {
                    break;
                }
                match self.ctl[s].compare_exchange_weak(c, c + PIN_ONE, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some(SlotId(s as u32)),
                    Err(now) => c = now,
                }
            }
        }
        None
    }

    /// Releases a pin.
    pub fn unpin(&self, slot: SlotId) {
        let prev = self.ctl[slot.0 as usize].fetch_sub(PIN_ONE, Ordering::AcqRel);
        debug_assert!(prev & PIN_MASK != 0);
    }

    /// Stores word `word` (host-endian value, stored big-endian) into a pinned slot and
    /// marks the slot dirty.
    pub fn store_word(&self, slot: SlotId, word: usize, value: u64) {
        self.dirty[slot.0 as usize].store(1, Ordering::Release);
        self.word_ptr(slot.0 as usize, word).store(value.to_be(), Ordering::Release);
    }

    /// Reads word `word` of a pinned slot.
    pub fn load_word(&self, slot: SlotId, word: usize) -> u64 {
        u64::from_be(self.word_ptr(slot.0 as usize, word).load(Ordering::Acquire))
    }

    /// Compare-and-swap of word `word` of a pinned slot (values host-endian). Marks the
    /// slot dirty on success. This is how a queue publishes a new L2 entry without a lock.
    pub fn cas_word(&self, slot: SlotId, word: usize, old: u64, new: u64) -> bool {
        self.dirty[slot.0 as usize].store(1, Ordering::Release);
        self.word_ptr(slot.0 as usize, word)
            .compare_exchange(old.to_be(), new.to_be(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The key of a valid slot.
    pub fn slot_key(&self, slot: SlotId) -> Option<u64> {
        let c = self.ctl[slot.0 as usize].load(Ordering::Acquire);
        (c & ST_MASK == ST_VALID).then_some((c >> KEY_SHIFT) << 9)
    }

    /// Slots currently marked dirty.
    pub fn dirty_slots(&self) -> Vec<SlotId> {
        (0..self.ctl.len()).filter(|&s| self.dirty[s].load(Ordering::Acquire) != 0).map(|s| SlotId(s as u32)).collect()
    }

    /// Clears a slot's dirty mark before its contents are written back; a store after this
    /// marks it dirty again (and the next write-back writes it again).
    pub fn clear_dirty(&self, slot: SlotId) {
        self.dirty[slot.0 as usize].store(0, Ordering::Release);
    }

    /// Re-marks a slot dirty (its write-back failed).
    pub fn mark_dirty(&self, slot: SlotId) {
        self.dirty[slot.0 as usize].store(1, Ordering::Release);
    }

    /// Are any slots dirty?
    pub fn any_dirty(&self) -> bool {
        self.dirty.iter().any(|d| d.load(Ordering::Relaxed) != 0)
    }

    /// Drops a cached key (used when the cluster it lived in is freed), if not pinned/dirty.
    pub fn forget(&self, key: u64) {
        let set = self.set_of(key);
        let kb = key_bits(key);
        for s in set * WAYS..(set + 1) * WAYS {
            let c = self.ctl[s].load(Ordering::Acquire);
            if c >> KEY_SHIFT << KEY_SHIFT == kb && c & ST_MASK == ST_VALID && c & PIN_MASK == 0 {
                let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
                let _ = self.ctl[s].compare_exchange(c, g | ST_EMPTY, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn load(c: &MetaCache, key: u64, fill: u64) -> SlotId {
        match c.claim(key) {
            Claim::Load(s) => {
                let p = c.slot_ptr(s) as *mut u64;
                for i in 0..c.slot_size() / 8 {
                    // SAFETY: we own the slot in loading state; in bounds.
                    unsafe { p.add(i).write((fill + i as u64).to_be()) };
                }
                c.complete_load(s);
                s
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn miss_load_hit() {
        let c = MetaCache::new(64 * 512, 512);
        assert_eq!(c.read_word(0x10000, 3), None);
        load(&c, 0x10000, 100);
        assert_eq!(c.read_word(0x10000, 3), Some(103));
        assert_eq!(c.read_pair(0x10000, 4), Some((104, 105)));
        assert!(matches!(c.claim(0x10000), Claim::Present(_)));
    }

    #[test]
    fn bounded_and_evicts() {
        let c = MetaCache::new(8 * 512, 512);
        assert_eq!(c.slots(), WAYS);
        for k in 0..100u64 {
            load(&c, (k + 1) << 16, k * 1000);
            assert_eq!(c.read_word((k + 1) << 16, 1), Some(k * 1000 + 1));
        }
        let live = (0..100u64).filter(|k| c.read_word((k + 1) << 16, 0).is_some()).count();
        assert!(live <= WAYS);
        assert!(c.stats().2 >= 92);
    }

    #[test]
    fn pinned_slots_are_not_evicted() {
        let c = MetaCache::new(8 * 512, 512);
        for k in 0..WAYS as u64 {
            load(&c, (k + 1) << 16, 0);
            assert!(c.pin((k + 1) << 16).is_some());
        }
        assert_eq!(c.claim(999 << 16), Claim::Busy);
    }

    #[test]
    fn concurrent_readers_see_only_valid_contents() {
        // Each key's slot holds words key+i; readers must never see another key's data.
        let c = Arc::new(MetaCache::new(16 * 512, 512));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut hs = Vec::new();
        for t in 0..2 {
            let c = c.clone();
            let stop = stop.clone();
            hs.push(std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let key = ((i % 64) + 1) << 16;
                    match c.claim(key) {
                        Claim::Load(s) => {
                            let p = c.slot_ptr(s) as *mut u64;
                            for w in 0..64 {
                                // SAFETY: owned loading slot, in bounds.
                                unsafe { p.add(w).write((key + w as u64).to_be()) };
                            }
                            c.complete_load(s);
                        }
                        _ => {
                            if let Some(v) = c.read_word(key, (i % 64) as usize) {
                                assert_eq!(v, key + i % 64);
                                n += 1;
                            }
                        }
                    }
                    i += 7;
                }
                n
            }));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            assert!(h.join().unwrap() > 0);
        }
    }
}
