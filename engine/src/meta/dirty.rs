//! A dirty bitmap in memory: one bit per granule of the guest disk in lock-free 64-bit
//! words, set by every queue without a lock (one relaxed load, and a `fetch_or` only when
//! a bit is missing, per 64 granules a request covers). The word layout is the on-disk bit
//! order of the spec's "Bitmap data": bit `b` of word `w` is granule `64 w + b`, and the
//! words stored little-endian are the data clusters' bytes.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bitmap's bits.
pub struct DirtyBitmap {
    granularity_bits: u8,
    /// Guest bytes covered (the virtual size when loaded).
    disk_size: u64,
    granules: u64,
    words: Box<[AtomicU64]>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap").field("granularity", &(1u64 << self.granularity_bits)).finish()
    }
}

impl DirtyBitmap {
    /// An empty bitmap over `disk_size` bytes (the caller has bounded the size: one bit
    /// per granule).
    pub fn new(disk_size: u64, granularity_bits: u8) -> DirtyBitmap {
        let granules = disk_size.div_ceil(1u64 << granularity_bits);
        let words = (0..granules.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DirtyBitmap { granularity_bits, disk_size, granules, words }
    }

    /// log2 of the bytes one bit covers.
    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// Bytes the bitmap covers.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Bytes of bitmap data (the granules rounded up to whole bytes).
    pub fn data_bytes(&self) -> u64 {
        self.granules.div_ceil(8)
    }

    /// Marks the granules that guest bytes `[offset, offset + len)` touch. The hot path of
    /// every write, zero write and discard: no lock, no allocation.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = ((offset.saturating_add(len) - 1) >> self.granularity_bits).min(self.granules - 1);
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let word = &self.words[w];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
    }

    /// Is granule `g` set?
    pub fn get(&self, g: u64) -> bool {
        g < self.granules && self.words[(g / 64) as usize].load(Ordering::Relaxed) & (1 << (g % 64)) != 0
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Sets every bit `other` has (granularities may differ: a source bit sets every
    /// granule of this bitmap that its range touches).
    pub fn merge(&self, other: &DirtyBitmap) {
        if other.granularity_bits == self.granularity_bits && other.disk_size == self.disk_size {
            for (a, b) in self.words.iter().zip(other.words.iter()) {
                a.fetch_or(b.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            return;
        }
        for (off, len) in other.dirty_ranges() {
            self.mark(off, len);
        }
    }

    /// The dirty guest ranges, merged, clipped to the disk size: (offset, length).
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let gb = self.granularity_bits;
        for (wi, w) in self.words.iter().enumerate() {
            let mut v = w.load(Ordering::Relaxed);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                let run = (!(v >> b)).trailing_zeros() as u64;
                let g = wi as u64 * 64 + b;
                let start = g << gb;
                let end = ((g + run) << gb).min(self.disk_size);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == start => *l = end - *o,
                    _ => out.push((start, end - start)),
                }
                v = if b + run >= 64 { 0 } else { v & !((u64::MAX >> (64 - run)) << b) };
            }
        }
        out
    }

    /// The data bytes `[from, from + len)` in the on-disk bit order (zero past the end).
    pub fn read_bytes(&self, from: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let byte = from + i as u64;
            let w = (byte / 8) as usize;
            *b = match self.words.get(w) {
                Some(word) => (word.load(Ordering::Relaxed) >> ((byte % 8) * 8)) as u8,
                None => 0,
            };
        }
        // Bits past the last granule are never set (mark clips), so nothing to mask.
    }

    /// Sets bits from data bytes at byte offset `from` in the on-disk bit order (bits past
    /// the last granule are ignored).
    pub fn or_bytes(&self, from: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if b == 0 {
                continue;
            }
            let byte = from + i as u64;
            let mut v = b as u64;
            let first = byte * 8;
            if first >= self.granules {
                break;
            }
            if first + 8 > self.granules {
                v &= (1u64 << (self.granules - first)) - 1;
            }
            if let Some(w) = self.words.get((byte / 8) as usize) {
                w.fetch_or(v << ((byte % 8) * 8), Ordering::Relaxed);
            }
        }
    }

    /// The runs of equal state over guest bytes `[offset, offset + len)` (clipped to the
    /// disk): `(length, dirty)`, adjacent runs of one state merged, at most `max` runs (the
    /// last one reported ends where the next would start). Whole words of one state are
    /// skipped at once.
    pub fn runs(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.disk_size);
        let gb = self.granularity_bits;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let dirty = self.get(pos >> gb);
            let mut g = (pos >> gb) + 1;
            while g < self.granules && (g << gb) < end {
                if g.is_multiple_of(64) {
                    let w = self.words[(g / 64) as usize].load(Ordering::Relaxed);
                    if w == if dirty { u64::MAX } else { 0 } {
                        g += 64;
                        continue;
                    }
                }
                if self.get(g) != dirty {
                    break;
                }
                g += 1;
            }
            let next = (g << gb).min(end);
            let n = out.len();
            match out.last_mut() {
                Some((l, d)) if *d == dirty => *l += next - pos,
                _ if n >= max => break,
                _ => out.push((next - pos, dirty)),
            }
            pos = next;
        }
        out
    }

    /// Sets every bit of data bytes `[from, from + len)` (an all-ones table entry).
    pub fn fill_bytes(&self, from: u64, len: u64) {
        let first = from * 8;
        let end = (from + len).saturating_mul(8).min(self.granules);
        if first < end {
            self.mark(first << self.granularity_bits, (end - first) << self.granularity_bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn mark_matches_model(ops in proptest::collection::vec((0u64..1 << 20, 1u64..1 << 18), 1..30), gb in 9u8..17) {
            let size = 1u64 << 20;
            let b = DirtyBitmap::new(size, gb);
            let mut model = vec![false; size.div_ceil(1 << gb) as usize];
            for (o, l) in ops {
                let l = l.min(size - o);
                b.mark(o, l);
                if l > 0 {
                    for g in (o >> gb)..=((o + l - 1) >> gb) {
                        model[g as usize] = true;
                    }
                }
            }
            for (g, &m) in model.iter().enumerate() {
                prop_assert_eq!(b.get(g as u64), m);
            }
            // Bytes out and back in.
            let mut bytes = vec![0u8; b.data_bytes() as usize];
            b.read_bytes(0, &mut bytes);
            let c = DirtyBitmap::new(size, gb);
            c.or_bytes(0, &bytes);
            for g in 0..model.len() as u64 {
                prop_assert_eq!(c.get(g), model[g as usize]);
            }
            // Ranges cover exactly the set granules.
            let mut from_ranges = vec![false; model.len()];
            for (o, l) in b.dirty_ranges() {
                for g in (o >> gb)..=((o + l - 1) >> gb) {
                    from_ranges[g as usize] = true;
                }
            }
            prop_assert_eq!(&from_ranges, &model);
            // Runs of any window match the model granule by granule.
            for (o, l) in [(0, size), (777, 300_000), (size - 5000, 5000), (65536, 1)] {
                let mut at = o;
                for (n, d) in b.runs(o, l, usize::MAX) {
                    for x in (at..at + n).step_by(1 << gb).chain([at + n - 1]) {
                        prop_assert_eq!(d, model[(x >> gb) as usize], "byte {} of the window {}+{}", x, o, l);
                    }
                    at += n;
                }
                prop_assert_eq!(at, o + l);
                prop_assert!(b.runs(o, l, 1).len() == 1);
            }
        }
    }

    #[test]
    fn partial_last_granule_and_fill() {
        let b = DirtyBitmap::new(1000, 9);
        b.mark(512, 488);
        assert_eq!(b.dirty_ranges(), vec![(512, 488)]);
        b.fill_bytes(0, 1);
        assert_eq!(b.dirty_ranges(), vec![(0, 1000)]);
        b.clear();
        assert!(b.dirty_ranges().is_empty());
    }
}
