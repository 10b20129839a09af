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
//!
//! Only [`MetaCache::claim`] gives a slot a new key, and it does so holding a per-set
//! claim flag (a try-lock: a claimer that finds it taken gets [`Claim::Busy`]), so a key is
//! never in two slots of its set at once.
//!
//! A claimer told [`Claim::Busy`] waits without polling: it registers its queue's bit in
//! the set's [`Waiters`] ([`MetaCache::wait`]) and claims once more; every change that can
//! end a busy claim in a set (a load completed or given up, the last pin of a slot gone, a
//! dirty mark cleared, the claim flag released) wakes the set's waiters (see
//! [`crate::meta::waiters`]).
//!
//! Under `--cfg loom` (see `scripts/loom.sh`) the atomics are loom's and slot memory is a
//! boxed slice of atomic words instead of the arena, so the protocol can be model-checked.

use crate::io::AlignedBuf;
use crate::meta::waiters::Waiters;
#[cfg(loom)]
use loom::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};
// Statistics only: kept out of the model under loom (they order nothing).
use std::sync::atomic::AtomicU64 as StatU64;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};

/// Slots per set.
#[cfg(not(loom))]
pub const WAYS: usize = 8;
/// Slots per set (small under loom to keep the model small).
#[cfg(loom)]
pub const WAYS: usize = 2;

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
    /// Per set: 1 while a claimer is choosing a victim (see [`MetaCache::claim`]).
    claiming: Box<[AtomicU8]>,
    /// Per set: the queues waiting for a busy claim there to end.
    waiters: Box<[Waiters]>,
    /// Under loom: the queue bits woken so far (the model checks that none is lost).
    #[cfg(loom)]
    pub(crate) woken: AtomicU64,
    #[cfg(not(loom))]
    mem: AlignedBuf,
    /// Slot memory under loom: `slot_size / 8` atomic words per slot.
    #[cfg(loom)]
    words: Box<[AtomicU64]>,
    /// Valid slices replaced by loads. Hits and misses are counted by the callers (each
    /// queue into its own counters), so the hit path writes no shared cache line.
    evictions: StatU64,
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
        Self::with_sets(slots.div_ceil(WAYS), slot_size)
    }

    /// `sets` sets of [`WAYS`] slots of `slot_size` bytes (a multiple of 8).
    fn with_sets(sets: usize, slot_size: usize) -> Self {
        assert!(sets > 0 && slot_size >= 8 && slot_size.is_multiple_of(8));
        let n = sets * WAYS;
        MetaCache {
            slot_size,
            sets,
            ctl: (0..n).map(|_| AtomicU64::new(ST_EMPTY)).collect(),
            used: (0..n).map(|_| AtomicU8::new(0)).collect(),
            dirty: (0..n).map(|_| AtomicU8::new(0)).collect(),
            hand: (0..sets).map(|_| AtomicU8::new(0)).collect(),
            claiming: (0..sets).map(|_| AtomicU8::new(0)).collect(),
            waiters: (0..sets).map(|_| Waiters::new()).collect(),
            #[cfg(loom)]
            woken: AtomicU64::new(0),
            #[cfg(not(loom))]
            mem: AlignedBuf::new(n * slot_size),
            #[cfg(loom)]
            words: (0..n * slot_size / 8).map(|_| AtomicU64::new(0)).collect(),
            evictions: StatU64::new(0),
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

    /// Valid slices evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    #[inline]
    fn set_of(&self, key: u64) -> usize {
        let h = (key >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((h >> 32) as usize) % self.sets
    }

    #[cfg(not(loom))]
    #[inline]
    fn word_ptr(&self, slot: usize, word: usize) -> &AtomicU64 {
        debug_assert!(word * 8 < self.slot_size);
        // SAFETY: the arena holds slots*slot_size bytes, 4 KiB aligned, so every 8-byte
        // word inside a slot is in bounds and aligned for AtomicU64.
        unsafe { &*(self.mem.as_ptr().add(slot * self.slot_size + word * 8) as *const AtomicU64) }
    }

    #[cfg(loom)]
    fn word_ptr(&self, slot: usize, word: usize) -> &AtomicU64 {
        assert!(word * 8 < self.slot_size);
        &self.words[slot * (self.slot_size / 8) + word]
    }

    /// The hit path: reads big-endian word `word` of the slice `key`, if cached.
    #[inline]
    pub fn read_word(&self, key: u64, word: usize) -> Option<u64> {
        self.read_words::<1>(key, word).map(|[a]| a)
    }

    /// Reads two consecutive words (extended L2 entries) under one validation.
    #[inline]
    pub fn read_pair(&self, key: u64, word: usize) -> Option<(u64, u64)> {
        self.read_words::<2>(key, word).map(|[a, b]| (a, b))
    }

    /// Reads `N` consecutive big-endian words from `word` of slice `key`, if cached, under
    /// one seqlock validation (no lock, no syscall).
    #[inline]
    fn read_words<const N: usize>(&self, key: u64, word: usize) -> Option<[u64; N]> {
        let set = self.set_of(key);
        let kb = key_bits(key);
        for s in set * WAYS..(set + 1) * WAYS {
            let c1 = self.ctl[s].load(Ordering::Acquire);
            if c1 & !(GEN_MASK | PIN_MASK) != kb | ST_VALID {
                continue;
            }
            let v: [u64; N] = std::array::from_fn(|i| self.word_ptr(s, word + i).load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            let c2 = self.ctl[s].load(Ordering::Relaxed);
            if (c1 ^ c2) & !PIN_MASK == 0 {
                if self.used[s].load(Ordering::Relaxed) == 0 {
                    self.used[s].store(1, Ordering::Relaxed);
                }
                return Some(v.map(u64::from_be));
            }
            // Raced with an eviction: treat as a miss, the caller will claim and retry.
            return None;
        }
        None
    }

    /// Finds `key` or claims a victim slot to load it into.
    pub fn claim(&self, key: u64) -> Claim {
        self.claim_noting(key, &mut false)
    }

    /// [`MetaCache::claim`] that also tells the caller whether the slot it got held a valid
    /// slice that is now evicted (`*evicted` set to true), so that the caller can count the
    /// eviction as its own (queues keep per-queue counters).
    pub fn claim_noting(&self, key: u64, evicted: &mut bool) -> Claim {
        let set = self.set_of(key);
        if let Some(found) = self.find_claimed(key, set) {
            return found;
        }
        // Only one claimer per set may pick a victim: two claimers of the same key that both
        // missed above would otherwise load it into two ways, and the copies diverge as soon
        // as one of them is updated. Not a lock: a claimer that finds the flag taken is told
        // to retry, as when the key is being loaded.
        if self.claiming[set].compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Claim::Busy;
        }
        let r = self.claim_victim(key, set, evicted);
        self.claiming[set].store(0, Ordering::Release);
        self.notify_set(set);
        r
    }

    /// Registers the queue bits `bits` as waiting for a busy claim of `key` to end. The
    /// caller then claims again and parks only if that is busy too: it is woken at the next
    /// change in `key`'s set that can end it.
    pub fn wait(&self, key: u64, bits: u64) {
        self.waiters[self.set_of(key)].add(bits);
    }

    /// Wakes the waiters of `set` (a state change there may end their busy claims).
    #[inline]
    fn notify_set(&self, set: usize) {
        let m = self.waiters[set].notify();
        if m != 0 {
            #[cfg(not(loom))]
            crate::meta::waiters::wake(m);
            #[cfg(loom)]
            self.woken.fetch_or(m, Ordering::SeqCst);
        }
    }

    /// The set of slot `s`.
    #[inline]
    fn set_of_slot(&self, s: usize) -> usize {
        s / WAYS
    }

    /// The claim outcome when `key` already has a slot in `set` (valid: present; loading:
    /// busy), None when it has none.
    fn find_claimed(&self, key: u64, set: usize) -> Option<Claim> {
        let kb = key_bits(key);
        (set * WAYS..(set + 1) * WAYS).find_map(|s| {
            let c = self.ctl[s].load(Ordering::Acquire);
            (c >> KEY_SHIFT << KEY_SHIFT == kb && c & ST_MASK != ST_EMPTY).then_some(if c & ST_MASK == ST_VALID {
                Claim::Present(SlotId(s as u32))
            } else {
                Claim::Busy
            })
        })
    }

    /// [`MetaCache::claim`] past the first lookup, with the set's claim flag held.
    fn claim_victim(&self, key: u64, set: usize, evicted: &mut bool) -> Claim {
        let kb = key_bits(key);
        let range = set * WAYS..(set + 1) * WAYS;
        // Look again: a claimer that held the flag since our first look may have inserted
        // the key (the flag's Acquire makes its CAS visible here).
        if let Some(found) = self.find_claimed(key, set) {
            return found;
        }
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
                // Seqlock writer side: the new contents are stored after this fence, so a
                // reader that sees any of them (and then fences) sees the CAS above on its
                // re-read of the control word, and retries. The CAS's own Release orders
                // only what came before it.
                fence(Ordering::Release);
                if c & ST_MASK == ST_VALID {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    *evicted = true;
                }
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
    #[cfg(not(loom))]
    pub fn slot_ptr(&self, slot: SlotId) -> *mut u8 {
        // SAFETY: in bounds of the arena (slot < slots()).
        unsafe { self.mem.as_ptr().add(slot.0 as usize * self.slot_size) as *mut u8 }
    }

    /// Slot memory is not addressable under loom (the model stores words atomically).
    #[cfg(loom)]
    pub fn slot_ptr(&self, _slot: SlotId) -> *mut u8 {
        unimplemented!("slot memory is not addressable under loom")
    }

    /// Stores word `word` (host-endian value, stored big-endian) of a slot the caller owns
    /// in loading state: a slice filled from memory instead of a read (a table the caller
    /// has just written), published by [`MetaCache::complete_load`]. No dirty mark.
    pub fn init_word(&self, slot: SlotId, word: usize, value: u64) {
        self.word_ptr(slot.0 as usize, word).store(value.to_be(), Ordering::Relaxed);
    }

    /// Marks a loaded slot valid (its memory now holds the slice), and wakes its set's
    /// waiters.
    pub fn complete_load(&self, slot: SlotId) {
        let s = slot.0 as usize;
        self.used[s].store(1, Ordering::Relaxed);
        // Loading (1) -> valid (2) by an add: pins taken meanwhile are kept.
        let c = self.ctl[s].fetch_add(ST_VALID - ST_LOADING, Ordering::Release);
        debug_assert_eq!(c & ST_MASK, ST_LOADING);
        self.notify_set(self.set_of_slot(s));
    }

    /// Gives up a claimed slot after a failed load, and wakes its set's waiters.
    pub fn abort_load(&self, slot: SlotId) {
        let s = slot.0 as usize;
        let mut c = self.ctl[s].load(Ordering::Relaxed);
        loop {
            let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
            match self.ctl[s].compare_exchange_weak(
                c,
                g | (c & PIN_MASK) | ST_EMPTY,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        self.notify_set(self.set_of_slot(s));
    }

    /// Drops every valid, unpinned slot (used when metadata changed underneath, e.g. a
    /// refcount rebuild). Slots being loaded are left alone.
    pub fn invalidate_all(&self) {
        for (i, c) in self.ctl.iter().enumerate() {
            let v = c.load(Ordering::Acquire);
            if v & ST_MASK == ST_VALID && v & PIN_MASK == 0 && self.dirty[i].load(Ordering::Acquire) == 0 {
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

    /// Releases a pin; the last one wakes the set's waiters (the slot may be a victim now).
    pub fn unpin(&self, slot: SlotId) {
        let prev = self.ctl[slot.0 as usize].fetch_sub(PIN_ONE, Ordering::AcqRel);
        debug_assert!(prev & PIN_MASK != 0);
        if prev & PIN_MASK == PIN_ONE {
            self.notify_set(self.set_of_slot(slot.0 as usize));
        }
    }

    /// Stores word `word` (host-endian value, stored big-endian) into a pinned slot and
    /// marks the slot dirty.
    ///
    /// The word is stored before the mark: a write-back that clears the mark
    /// ([`MetaCache::clear_dirty`]) after it was set also sees the word; one that clears it
    /// before leaves the slot dirty. (Marking first lost the update when the write-back
    /// cleared the mark and copied the slot between the mark and the store.)
    pub fn store_word(&self, slot: SlotId, word: usize, value: u64) {
        self.word_ptr(slot.0 as usize, word).store(value.to_be(), Ordering::Release);
        self.set_dirty(slot);
    }

    /// Stores the two words of an extended L2 entry at `word` as one seqlock write: while
    /// the words change the slot reads as "loading" (readers miss and retry), and the
    /// generation moves on afterwards, so no reader ever accepts one old and one new word.
    /// The caller holds a pin on the slot (and the metadata lock against other writers).
    pub fn store_pair(&self, slot: SlotId, word: usize, first: u64, second: u64) {
        let s = slot.0 as usize;
        let mut c = self.ctl[s].load(Ordering::Acquire);
        loop {
            debug_assert_eq!(c & ST_MASK, ST_VALID);
            let w = (c & !ST_MASK) | ST_LOADING;
            match self.ctl[s].compare_exchange_weak(c, w, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        fence(Ordering::Release);
        self.word_ptr(s, word).store(first.to_be(), Ordering::Release);
        self.word_ptr(s, word + 1).store(second.to_be(), Ordering::Release);
        self.set_dirty(slot);
        let mut c = self.ctl[s].load(Ordering::Acquire);
        loop {
            let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
            let v = (c & !(ST_MASK | GEN_MASK)) | g | ST_VALID;
            match self.ctl[s].compare_exchange_weak(c, v, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        // A claimer that saw the slot loading meanwhile was told busy.
        self.notify_set(self.set_of_slot(s));
    }

    /// Sets a slot's dirty mark (Release: the words stored before it go with it).
    #[cfg(not(loom))]
    #[inline]
    fn set_dirty(&self, slot: SlotId) {
        self.dirty[slot.0 as usize].store(1, Ordering::Release);
    }

    /// Under loom the mark is set with an RMW, which has the same effect in the memory model:
    /// loom 0.7 lets a plain store concurrent with an RMW (the write-back's swap in
    /// [`MetaCache::clear_dirty`]) slip before it in modification order, breaking RMW
    /// atomicity (tokio-rs/loom#254), and would report a lost mark that cannot happen.
    #[cfg(loom)]
    fn set_dirty(&self, slot: SlotId) {
        self.dirty[slot.0 as usize].swap(1, Ordering::Release);
    }

    /// Reads word `word` of a pinned slot.
    pub fn load_word(&self, slot: SlotId, word: usize) -> u64 {
        u64::from_be(self.word_ptr(slot.0 as usize, word).load(Ordering::Acquire))
    }

    /// Compare-and-swap of word `word` of a pinned slot (values host-endian). Marks the
    /// slot dirty on success. This is how a queue publishes a new L2 entry without a lock.
    /// As in [`MetaCache::store_word`], the mark follows the word.
    pub fn cas_word(&self, slot: SlotId, word: usize, old: u64, new: u64) -> bool {
        let ok = self
            .word_ptr(slot.0 as usize, word)
            .compare_exchange(old.to_be(), new.to_be(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            self.set_dirty(slot);
        }
        ok
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
    ///
    /// A swap, not a store: reading the mark it replaces (Acquire) makes every word stored
    /// before that mark visible to the copy that follows.
    pub fn clear_dirty(&self, slot: SlotId) {
        self.dirty[slot.0 as usize].swap(0, Ordering::AcqRel);
        self.notify_set(self.set_of_slot(slot.0 as usize));
    }

    /// Copies every dirty slice for a write-back: each slot is pinned (it cannot be evicted
    /// until the caller unpins it once the copy is on disk, or a reload before the write
    /// lands would read the old slice and lose the copy's updates) and its dirty mark is
    /// cleared (an entry stored after the copy marks it dirty again). Returns (slot, key,
    /// bytes), in key order.
    pub fn pin_dirty_copies(&self) -> Vec<(SlotId, u64, AlignedBuf)> {
        self.pin_dirty()
            .into_iter()
            .map(|(slot, key)| {
                let mut buf = AlignedBuf::new(self.slot_size());
                self.copy_pinned(slot, &mut buf);
                (slot, key, buf)
            })
            .collect()
    }

    /// The first half of [`MetaCache::pin_dirty_copies`]: pins every dirty slot and clears
    /// its dirty mark; returns (slot, key) in key order. The caller copies each slot with
    /// [`MetaCache::copy_pinned`] after this (a copy taken after the mark was cleared holds
    /// every entry stored before it), and unpins it once the copy is on disk.
    pub fn pin_dirty(&self) -> Vec<(SlotId, u64)> {
        let mut out = Vec::new();
        for slot in self.dirty_slots() {
            let Some(key) = self.slot_key(slot) else { continue };
            let Some(pinned) = self.pin(key) else { continue };
            self.clear_dirty(pinned);
            out.push((pinned, key));
        }
        out.sort_unstable_by_key(|&(_, key)| key);
        out
    }

    /// Copies the slice of a slot pinned by [`MetaCache::pin_dirty`] into `dst`
    /// ([`MetaCache::slot_size`] bytes).
    pub fn copy_pinned(&self, slot: SlotId, dst: &mut [u8]) {
        let len = self.slot_size();
        // SAFETY: the slot is pinned (valid, not evictable) and its slice is `len` bytes;
        // concurrent single-word CAS updates may race with this copy, which then holds the
        // old or the new word (and the slot is dirty again).
        dst.copy_from_slice(unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), len) });
    }

    /// Re-marks a slot dirty (its write-back failed).
    pub fn mark_dirty(&self, slot: SlotId) {
        self.set_dirty(slot);
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
            if c >> KEY_SHIFT << KEY_SHIFT == kb
                && c & ST_MASK == ST_VALID
                && c & PIN_MASK == 0
                && self.dirty[s].load(Ordering::Acquire) == 0
            {
                let g = ((c & GEN_MASK) + (1 << GEN_SHIFT)) & GEN_MASK;
                let _ = self.ctl[s].compare_exchange(c, g | ST_EMPTY, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }
}

mod clean;

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
