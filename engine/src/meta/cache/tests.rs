//! The cache's protocol under real threads: claims, loads, evictions, pins, seqlock reads.

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
    assert!(c.evictions() >= 92);
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
