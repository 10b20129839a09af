//! The cache's protocol model-checked with loom (`scripts/loom.sh`).

use super::*;
use loom::sync::Arc;
use loom::thread;

const SLOT: usize = 16;
const A: u64 = 0x1000;
const B: u64 = 0x2000;
const C: u64 = 0x3000;
const D: u64 = 0x4000;

fn val(key: u64, w: usize) -> u64 {
    key * 16 + w as u64
}

fn cache() -> Arc<MetaCache> {
    Arc::new(MetaCache::with_sets(1, SLOT))
}

/// What the I/O of a load does: fills the owned (loading) slot with `key`'s words.
fn fill(c: &MetaCache, s: SlotId, key: u64) {
    for w in 0..SLOT / 8 {
        c.word_ptr(s.0 as usize, w).store(val(key, w).to_be(), Ordering::Relaxed);
    }
}

/// Claims `key`; if this thread must load it, loads it. Returns the loaded slot.
fn load(c: &MetaCache, key: u64) -> Option<SlotId> {
    match c.claim(key) {
        Claim::Load(s) => {
            fill(c, s, key);
            c.complete_load(s);
            Some(s)
        }
        _ => None,
    }
}

fn is_dirty(c: &MetaCache, s: SlotId) -> bool {
    c.dirty[s.0 as usize].load(Ordering::Acquire) != 0
}

/// Slots that hold `key` (loading or valid).
fn copies(c: &MetaCache, key: u64) -> usize {
    c.ctl
        .iter()
        .filter(|x| {
            let v = x.load(Ordering::Acquire);
            v >> KEY_SHIFT << KEY_SHIFT == key_bits(key) && v & ST_MASK != ST_EMPTY
        })
        .count()
}

/// A reader of A races an eviction (C loaded into the full set) and a forget + reload
/// of A: it sees A's exact words or a miss, never C's (or B's) words, never a mix.
#[test]
fn reader_sees_only_its_key() {
    loom::model(|| {
        let c = cache();
        load(&c, A).unwrap();
        load(&c, B).unwrap();
        let evictor = {
            let c = c.clone();
            thread::spawn(move || {
                load(&c, C);
            })
        };
        let reloader = {
            let c = c.clone();
            thread::spawn(move || {
                c.forget(A);
                load(&c, A);
            })
        };
        if let Some(p) = c.read_pair(A, 0) {
            assert_eq!(p, (val(A, 0), val(A, 1)));
        }
        if let Some(v) = c.read_word(A, 1) {
            assert_eq!(v, val(A, 1));
        }
        evictor.join().unwrap();
        reloader.join().unwrap();
        assert!(copies(&c, A) <= 1);
    });
}

/// Two claimers of one key: exactly one loads it, the other is told Busy or Present;
/// afterwards it is cached once and both find it.
#[test]
fn one_claimer_loads() {
    loom::model(|| {
        let c = cache();
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                thread::spawn(move || match c.claim(A) {
                    Claim::Load(s) => {
                        fill(&c, s, A);
                        c.complete_load(s);
                        true
                    }
                    Claim::Busy | Claim::Present(_) => false,
                })
            })
            .collect();
        let loads = hs.into_iter().map(|h| h.join().unwrap()).filter(|&l| l).count();
        assert_eq!(loads, 1);
        assert_eq!(copies(&c, A), 1);
        assert!(matches!(c.claim(A), Claim::Present(_)));
        assert_eq!(c.read_pair(A, 0), Some((val(A, 0), val(A, 1))));
        let s = c.pin(A).unwrap();
        c.unpin(s);
    });
}

/// A pinned slot is never a victim, and a dirtied slot is not evicted after its pin is
/// dropped (including when the evictor read the control word before the pin and the
/// unpin restored it).
#[test]
fn pinned_and_dirty_slots_stay() {
    loom::model(|| {
        let c = cache();
        load(&c, A).unwrap();
        load(&c, B).unwrap();
        let writer = {
            let c = c.clone();
            thread::spawn(move || {
                let s = c.pin(A)?;
                assert!(c.cas_word(s, 0, val(A, 0), 7));
                assert_eq!(c.slot_key(s), Some(A));
                assert_eq!(c.load_word(s, 1), val(A, 1));
                c.unpin(s);
                Some(s)
            })
        };
        let evictor = {
            let c = c.clone();
            thread::spawn(move || {
                load(&c, C);
                load(&c, D);
            })
        };
        let pinned = writer.join().unwrap();
        evictor.join().unwrap();
        if let Some(s) = pinned {
            assert_eq!(c.slot_key(s), Some(A));
            assert!(is_dirty(&c, s));
            assert_eq!(c.read_pair(A, 0), Some((7, val(A, 1))));
        }
    });
}

/// Two CAS of one word with the same expected value: exactly one wins.
#[test]
fn cas_word_one_winner() {
    loom::model(|| {
        let c = cache();
        load(&c, A).unwrap();
        let s = c.pin(A).unwrap();
        let hs: Vec<_> = [7u64, 8]
            .into_iter()
            .map(|new| {
                let c = c.clone();
                thread::spawn(move || c.cas_word(s, 0, val(A, 0), new).then_some(new))
            })
            .collect();
        let wins: Vec<u64> = hs.into_iter().filter_map(|h| h.join().unwrap()).collect();
        assert_eq!(wins.len(), 1);
        assert_eq!(c.load_word(s, 0), wins[0]);
        assert!(is_dirty(&c, s));
        c.unpin(s);
    });
}

/// A write-back (clear the mark, then copy the slot) racing a store_word or a cas_word:
/// its copy holds the new word, or the slot is dirty again afterwards.
#[test]
fn no_lost_dirty_mark() {
    for use_cas in [false, true] {
        loom::model(move || {
            let c = cache();
            load(&c, A).unwrap();
            let s = c.pin(A).unwrap();
            let writer = {
                let c = c.clone();
                thread::spawn(move || {
                    if use_cas {
                        assert!(c.cas_word(s, 1, val(A, 1), 8));
                    } else {
                        c.store_word(s, 1, 8);
                    }
                })
            };
            c.clear_dirty(s);
            let copy = c.load_word(s, 1);
            writer.join().unwrap();
            assert!(copy == 8 || is_dirty(&c, s), "write-back copied {copy} and the slot is clean (cas: {use_cas})");
            c.unpin(s);
        });
    }
}
