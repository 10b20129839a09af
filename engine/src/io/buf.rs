//! Page-aligned heap buffers for O_DIRECT I/O.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zero-initialised, 4 KiB-aligned byte buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (capacity rounded up to 4 KiB, at least 4 KiB).
    ///
    /// Panics when `len` cannot be a buffer at all (rounded up, more than `isize::MAX`) and
    /// aborts when the allocation fails, like `Vec`; lengths that come from users go through
    /// [`AlignedBuf::try_new`] instead.
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap: layout.size() }
    }

    /// Like [`AlignedBuf::new`], but `None` instead of a panic or an abort when `len` is too
    /// large for a buffer or the memory cannot be had.
    pub fn try_new(len: usize) -> Option<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: layout has non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, len, cap: layout.size() })
    }

    /// The layout of a buffer of `len` bytes: capacity rounded up to [`super::DIRECT_ALIGN`]
    /// (at least one unit), aligned to it; `None` when that does not fit in `isize`.
    fn layout(len: usize) -> Option<Layout> {
        let cap = len.max(1).checked_next_multiple_of(super::DIRECT_ALIGN)?;
        Layout::from_size_align(cap, super::DIRECT_ALIGN).ok()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is the buffer empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable capacity (a multiple of 4 KiB).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity (new bytes keep whatever was there).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Raw pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw const pointer to the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

/// The machine's physical memory in bytes (`None` when the system does not say). Sizes that
/// users choose (cache sizes, request lengths times queue depths) are checked against it
/// before anything is allocated, so that an absurd value is an error rather than an abort.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && page > 0).then(|| (pages as u64).saturating_mul(page as u64))
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes (alloc_zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, super::DIRECT_ALIGN).expect("buffer layout");
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|&x| x == 0));
        b[4999] = 7;
        assert_eq!(b[4999], 7);
    }

    #[test]
    fn impossible_lengths_are_refused_not_panics() {
        assert!(AlignedBuf::try_new(usize::MAX).is_none());
        assert!(AlignedBuf::try_new(isize::MAX as usize).is_none());
        assert!(AlignedBuf::try_new(1 << 62).is_none());
        assert!(physical_memory().is_some_and(|m| m >= 1 << 20));
        let b = AlignedBuf::try_new(100).unwrap();
        assert_eq!((b.len(), b.capacity()), (100, 4096));
    }
}
