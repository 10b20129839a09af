//! The engine's fio options: the per-job option struct fio fills in, the option table,
//! and how a job finds its option struct from its `td` pointer.
//!
//! fio allocates `option_struct_size` bytes per job (`td->eo`), fills them from the table,
//! and stores the job's `td` pointer in the first 8 bytes. The layout of
//! `struct thread_data` is not part of the documented ABI, so the engine does not hard-code
//! where `td->eo` lives: [`locate`] scans the job's `td` for a pointer to a block whose
//! first word is that same `td` and whose fields are plausible for [`EngineOptions`].
//! All reads during the scan go through `process_vm_readv` on our own process, which
//! reports unreadable addresses as an error instead of faulting, so a wrong guess cannot
//! crash fio. The offset found first is cached and re-validated for every later job.

use crate::abi::{FIO_OPT_INT, FIO_OPT_STR_SET, FIO_OPT_STR_STORE, FIO_OPT_STR_VAL, FioOption, ThreadData};
use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The per-job option block (`td->eo`). Its first 8 bytes belong to fio (the td pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub td: *mut ThreadData,
    pub cache: *mut c_char,
    pub l2_cache_size: u64,
    pub refcount_cache_size: u64,
    pub ring_entries: u32,
    pub sqpoll: u32,
    pub register_buffers: u32,
    /// Never set by any option: fio zero-fills the block, so it stays 0. Part of the
    /// plausibility check in [`locate`].
    pub reserved: u32,
    /// `cache_clean_interval` in seconds (0: never).
    pub cache_clean_interval: u32,
    /// Padding (stays 0).
    pub pad: u32,
}

/// Highest accepted `ring_entries`.
pub const MAX_RING_ENTRIES: u64 = 32768;

/// The option table handed to fio (writable: fio's `options_init` updates entries).
pub static mut OPTIONS: [FioOption; 8] = [
    FioOption::engine(
        c"cache",
        c"quring image cache mode",
        FIO_OPT_STR_STORE,
        offset_of!(EngineOptions, cache),
        0,
        0,
        c"Metadata cache mode: writeback (default) or writethrough",
        Some(c"writeback"),
    ),
    FioOption::engine(
        c"l2_cache_size",
        c"quring L2 cache size",
        FIO_OPT_STR_VAL,
        offset_of!(EngineOptions, l2_cache_size),
        0,
        0,
        c"L2 table cache size in bytes (k/m/g suffixes allowed; 0 = engine default)",
        Some(c"0"),
    ),
    FioOption::engine(
        c"refcount_cache_size",
        c"quring refcount cache size",
        FIO_OPT_STR_VAL,
        offset_of!(EngineOptions, refcount_cache_size),
        0,
        0,
        c"Refcount block cache size in bytes (k/m/g suffixes allowed; 0 = engine default)",
        Some(c"0"),
    ),
    FioOption::engine(
        c"ring_entries",
        c"quring io_uring entries",
        FIO_OPT_INT,
        offset_of!(EngineOptions, ring_entries),
        0,
        MAX_RING_ENTRIES,
        c"io_uring size per job (0 = engine default, raised to iodepth rounded up to a power of 2)",
        Some(c"0"),
    ),
    FioOption::engine(
        c"sqpoll",
        c"quring SQPOLL",
        FIO_OPT_STR_SET,
        offset_of!(EngineOptions, sqpoll),
        0,
        1,
        c"Use an SQPOLL kernel thread for each job's ring",
        None,
    ),
    FioOption::engine(
        c"register_buffers",
        c"quring registered buffers",
        FIO_OPT_STR_SET,
        offset_of!(EngineOptions, register_buffers),
        0,
        1,
        c"Register the engine's I/O buffers with io_uring",
        None,
    ),
    FioOption::engine(
        c"cache_clean_interval",
        c"quring cache clean interval",
        FIO_OPT_INT,
        offset_of!(EngineOptions, cache_clean_interval),
        0,
        u32::MAX as u64,
        c"Drop L2 slices unused for this many seconds (QEMU's cache-clean-interval; 0 = never)",
        Some(c"600"),
    ),
    FioOption::END,
];

/// Copies `buf.len()` bytes from our own address `addr` without risking a fault.
/// Returns how many bytes were readable (0 if none).
fn safe_read(addr: usize, buf: &mut [u8]) -> usize {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast::<c_void>(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut c_void, iov_len: buf.len() };
    // SAFETY: `local` describes our own writable buffer; the remote side is only read by
    // the kernel, which fails with EFAULT (or returns a short count) for unmapped
    // addresses instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n < 0 { 0 } else { n as usize }
}

fn read_opts(addr: usize) -> Option<EngineOptions> {
    let mut raw = [0u8; size_of::<EngineOptions>()];
    if safe_read(addr, &mut raw) != raw.len() {
        return None;
    }
    // SAFETY: EngineOptions is plain old data (integers and raw pointers); any bit
    // pattern is a valid value, and `raw` has exactly its size.
    Some(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<EngineOptions>()) })
}

/// Reads a NUL-terminated string of at most 63 bytes through [`safe_read`].
pub fn read_c_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    let mut buf = [0u8; 64];
    let n = safe_read(ptr as usize, &mut buf);
    // A short read may still contain the terminator (string near the end of a mapping).
    let end = buf[..n].iter().position(|&b| b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// Is the block plausibly this job's [`EngineOptions`]?
///
/// fio 3.33 leaves the first word NULL for a job's own option block (observed with
/// Debian's binary, despite what the option-struct convention suggests) and may set it
/// to `td` elsewhere, so both are accepted. `cache` always points to a short string
/// because its option has a default, which is what makes a match specific.
fn plausible(td: *mut ThreadData, o: &EngineOptions) -> bool {
    (o.td == td || o.td.is_null())
        && o.reserved == 0
        && o.sqpoll <= 1
        && o.register_buffers <= 1
        && u64::from(o.ring_entries) <= MAX_RING_ENTRIES
        && read_c_string(o.cache).is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()))
}

fn looks_like_pointer(v: usize) -> bool {
    (0x10000..(1usize << 47)).contains(&v) && v.is_multiple_of(8)
}

/// Where `td->eo` was found in Debian's fio 3.33 (x86_64); tried first, then validated.
const EO_OFFSET_FIO_3_33: usize = 4216;

/// Offset of `eo` inside `struct thread_data` (starts at the fio 3.33 value; replaced by
/// the scan result if that does not validate).
static EO_OFFSET: AtomicUsize = AtomicUsize::new(EO_OFFSET_FIO_3_33);

/// How far into `struct thread_data` to look for `eo`.
const SCAN_LIMIT: usize = 512 * 1024;

fn candidate_at(td: *mut ThreadData, off: usize) -> Option<EngineOptions> {
    let mut word = [0u8; 8];
    if safe_read(td as usize + off, &mut word) != 8 {
        return None;
    }
    let p = usize::from_ne_bytes(word);
    if !looks_like_pointer(p) {
        return None;
    }
    read_opts(p).filter(|o| plausible(td, o))
}

/// Finds this job's engine options (a copy) and the offset of `td->eo` it was found at.
pub fn locate(td: *mut ThreadData) -> Option<(EngineOptions, usize)> {
    let known = EO_OFFSET.load(Ordering::Relaxed);
    if let Some(o) = candidate_at(td, known) {
        return Some((o, known));
    }
    let mut chunk = vec![0u8; 64 * 1024];
    let mut base = 0usize;
    while base < SCAN_LIMIT {
        let n = safe_read(td as usize + base, &mut chunk);
        for i in (0..n.saturating_sub(7)).step_by(8) {
            let p = usize::from_ne_bytes(chunk[i..i + 8].try_into().unwrap_or([0; 8]));
            if !looks_like_pointer(p) {
                continue;
            }
            if let Some(o) = read_opts(p).filter(|o| plausible(td, o)) {
                EO_OFFSET.store(base + i, Ordering::Relaxed);
                return Some((o, base + i));
            }
        }
        if n < chunk.len() {
            break;
        }
        base += chunk.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_struct_layout() {
        assert_eq!(offset_of!(EngineOptions, td), 0);
        assert!(offset_of!(EngineOptions, cache) >= 8, "first 8 bytes belong to fio");
        assert_eq!(offset_of!(EngineOptions, l2_cache_size), 16);
        assert_eq!(offset_of!(EngineOptions, ring_entries), 32);
        assert_eq!(size_of::<EngineOptions>(), 56);
    }

    #[test]
    fn locate_finds_eo_in_fake_td() {
        // A fake "thread_data": some junk words, then a pointer to the option block.
        let mut td = vec![0usize; 4096];
        let td_ptr = td.as_mut_ptr().cast::<ThreadData>();
        let cache = c"writethrough";
        let eo = Box::new(EngineOptions {
            td: td_ptr,
            cache: cache.as_ptr().cast_mut(),
            l2_cache_size: 1 << 20,
            refcount_cache_size: 0,
            ring_entries: 64,
            sqpoll: 1,
            register_buffers: 0,
            reserved: 0,
            cache_clean_interval: 600,
            pad: 0,
        });
        td[3] = 0xdead_beef; // not a pointer
        td[5] = td_ptr as usize; // a pointer, but not to an option block
        td[1234] = &raw const *eo as usize;
        let (found, off) = locate(td_ptr).expect("found");
        assert_eq!(off, 1234 * 8);
        assert_eq!(found.ring_entries, 64);
        assert_eq!(read_c_string(found.cache).as_deref(), Some("writethrough"));
        // Unreadable addresses are reported, not faulted on.
        assert_eq!(safe_read(8, &mut [0u8; 8]), 0);
    }

    #[test]
    fn option_table_is_terminated() {
        let table = &raw const OPTIONS;
        // SAFETY: tests only read the table; nothing else mutates it in this process.
        let opts = unsafe { &*table };
        assert!(opts.last().is_some_and(|o| o.name.is_null()));
        assert!(opts[..opts.len() - 1].iter().all(|o| !o.name.is_null() && o.off1 >= 8));
    }
}
