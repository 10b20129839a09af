//! The queue's pool of aligned bounce buffers.

use super::*;

impl Queue {
    /// An aligned, zeroed buffer of `len` bytes from the queue's pool.
    pub(crate) fn get_buf(&mut self, len: usize) -> AlignedBuf {
        match self.take_pooled(len) {
            Some(mut b) => {
                b.fill(0);
                b
            }
            None => AlignedBuf::new(len),
        }
    }

    /// An aligned buffer of `len` bytes from the queue's pool whose contents are
    /// unspecified (old data of this queue): only for reads that overwrite it and of which
    /// only the bytes the kernel returned are used.
    pub(crate) fn get_read_buf(&mut self, len: usize) -> AlignedBuf {
        self.take_pooled(len).unwrap_or_else(|| AlignedBuf::new(len))
    }

    /// A pooled buffer of at least `len` bytes (and not much more), its length set to `len`.
    fn take_pooled(&mut self, len: usize) -> Option<AlignedBuf> {
        let i = self.pool.iter().rposition(|b| b.capacity() >= len && b.capacity() <= len.max(4096) * 2)?;
        let mut b = self.pool.swap_remove(i);
        b.set_len(len);
        Some(b)
    }

    /// Returns a buffer to the pool (bounded).
    pub(crate) fn put_buf(&mut self, b: AlignedBuf) {
        if self.pool.len() < 256 {
            self.pool.push(b);
        }
    }
}
