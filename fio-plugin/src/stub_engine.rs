//! Temporary stand-in for the `quring` engine API (image + queue) used until the real
//! engine lands. It serves a *raw* file with synchronous `pread`/`pwrite`: every request
//! completes inside `submit`, and `reap` hands the completions back. The surface mirrors
//! the agreed API exactly, so `engine_glue.rs` switches engines with one `use` line.
//!
//! Like the real engine it takes a lock on open (`flock`: exclusive for read-write,
//! shared for read-only, none with `force_share`), so fork-mode jobs sharing an image
//! fail the same way they will with quring.

pub use quring::{Error, Result};

pub mod counters {
    use std::fmt;

    /// Operation counters of one image.
    #[derive(Clone, Debug, Default)]
    pub struct CounterSnapshot {
        pub reads: u64,
        pub writes: u64,
        pub bytes_read: u64,
        pub bytes_written: u64,
        pub flushes: u64,
        pub discards: u64,
        pub write_zeroes: u64,
    }

    impl fmt::Display for CounterSnapshot {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            writeln!(f, "stub engine (raw file, synchronous):")?;
            writeln!(f, "  reads        {:>12} ({} bytes)", self.reads, self.bytes_read)?;
            writeln!(f, "  writes       {:>12} ({} bytes)", self.writes, self.bytes_written)?;
            writeln!(f, "  flushes      {:>12}", self.flushes)?;
            writeln!(f, "  discards     {:>12}", self.discards)?;
            write!(f, "  write_zeroes {:>12}", self.write_zeroes)
        }
    }
}

pub mod image {
    use super::counters::CounterSnapshot;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsRawFd;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum CacheMode {
        Writeback,
        Writethrough,
    }

    #[derive(Clone, Debug)]
    pub struct Options {
        pub read_only: bool,
        pub cache: CacheMode,
        pub l2_cache_size: Option<u64>,
        pub refcount_cache_size: Option<u64>,
        pub force_share: bool,
    }

    impl Default for Options {
        fn default() -> Self {
            Options {
                read_only: false,
                cache: CacheMode::Writeback,
                l2_cache_size: None,
                refcount_cache_size: None,
                force_share: false,
            }
        }
    }

    #[derive(Default)]
    pub(crate) struct Counters {
        pub reads: AtomicU64,
        pub writes: AtomicU64,
        pub bytes_read: AtomicU64,
        pub bytes_written: AtomicU64,
        pub flushes: AtomicU64,
        pub discards: AtomicU64,
        pub write_zeroes: AtomicU64,
    }

    pub struct Image {
        pub(crate) file: File,
        pub(crate) size: u64,
        pub(crate) writethrough: bool,
        pub(crate) read_only: bool,
        pub(crate) counters: Counters,
    }

    impl Image {
        pub fn open(path: &Path, opts: &Options) -> crate::stub_engine::Result<Arc<Image>> {
            let file = OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(path)
                .map_err(|e| crate::stub_engine::Error::io(format!("open {}", path.display()), e))?;
            if !opts.force_share {
                let how = if opts.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
                // SAFETY: flock on an fd we own; no memory is passed.
                let rc = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
                if rc != 0 {
                    return Err(crate::stub_engine::Error::Locked(format!(
                        "{} is locked by another process (failed to get an {} lock)",
                        path.display(),
                        if opts.read_only { "shared" } else { "exclusive" }
                    )));
                }
            }
            let size = file.metadata().map_err(|e| crate::stub_engine::Error::io("fstat", e))?.len();
            Ok(Arc::new(Image {
                file,
                size,
                writethrough: opts.cache == CacheMode::Writethrough,
                read_only: opts.read_only,
                counters: Counters::default(),
            }))
        }

        pub fn size(&self) -> u64 {
            self.size
        }

        pub fn counters(&self) -> CounterSnapshot {
            let c = &self.counters;
            CounterSnapshot {
                reads: c.reads.load(Ordering::Relaxed),
                writes: c.writes.load(Ordering::Relaxed),
                bytes_read: c.bytes_read.load(Ordering::Relaxed),
                bytes_written: c.bytes_written.load(Ordering::Relaxed),
                flushes: c.flushes.load(Ordering::Relaxed),
                discards: c.discards.load(Ordering::Relaxed),
                write_zeroes: c.write_zeroes.load(Ordering::Relaxed),
            }
        }

        pub fn close(&self) -> crate::stub_engine::Result<()> {
            if self.read_only {
                return Ok(());
            }
            self.file.sync_all().map_err(|e| crate::stub_engine::Error::io("fsync", e))
        }
    }
}

pub mod queue {
    use super::image::Image;
    use std::collections::VecDeque;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[derive(Clone, Debug)]
    pub struct QueueOptions {
        pub ring_entries: u32,
        pub sqpoll: bool,
        pub register_buffers: bool,
    }

    impl Default for QueueOptions {
        fn default() -> Self {
            QueueOptions { ring_entries: 128, sqpoll: false, register_buffers: false }
        }
    }

    pub enum Op {
        Read { offset: u64, buf: *mut u8, len: usize },
        Write { offset: u64, buf: *const u8, len: usize },
        Flush,
        Discard { offset: u64, len: u64 },
        WriteZeroes { offset: u64, len: u64, unmap: bool },
    }

    pub struct Request {
        pub op: Op,
        pub user_data: u64,
    }

    pub struct Completion {
        pub user_data: u64,
        pub result: i32,
    }

    pub struct Queue {
        image: Arc<Image>,
        entries: usize,
        done: VecDeque<Completion>,
        // Not Send, like the real per-thread queue.
        _not_send: std::marker::PhantomData<*mut ()>,
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    }

    impl Queue {
        pub fn new(image: &Arc<Image>, opts: &QueueOptions) -> crate::stub_engine::Result<Queue> {
            if opts.ring_entries == 0 {
                return Err(crate::stub_engine::Error::InvalidRequest("ring_entries must be > 0".into()));
            }
            Ok(Queue {
                image: Arc::clone(image),
                entries: opts.ring_entries as usize,
                done: VecDeque::new(),
                _not_send: std::marker::PhantomData,
            })
        }

        /// # Safety
        /// Buffers must stay valid until the completion is returned.
        pub unsafe fn submit(&mut self, req: Request) -> crate::stub_engine::Result<()> {
            if self.done.len() >= self.entries {
                return Err(crate::stub_engine::Error::errno("submit: queue full", libc::EAGAIN));
            }
            // SAFETY: the caller guarantees the request's buffer is valid for its length.
            let result = unsafe { self.execute(&req.op) };
            self.done.push_back(Completion { user_data: req.user_data, result });
            Ok(())
        }

        /// Runs one request synchronously; returns 0 or -errno.
        ///
        /// # Safety
        /// Read/Write buffers must be valid for `len` bytes.
        unsafe fn execute(&self, op: &Op) -> i32 {
            let img = &*self.image;
            let fd = img.file.as_raw_fd();
            let c = &img.counters;
            let in_range = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= img.size);
            match *op {
                Op::Read { offset, buf, len } => {
                    if !in_range(offset, len as u64) {
                        return -libc::EINVAL;
                    }
                    let mut done = 0usize;
                    while done < len {
                        // SAFETY: buf is valid for len bytes (caller contract); we write
                        // only inside [done, len).
                        let n =
                            unsafe { libc::pread(fd, buf.add(done).cast(), len - done, (offset + done as u64) as i64) };
                        if n < 0 {
                            let e = errno();
                            if e == libc::EINTR {
                                continue;
                            }
                            return -e;
                        }
                        if n == 0 {
                            // Past EOF of a sparse/short file: reads as zeroes.
                            // SAFETY: same buffer range as above.
                            unsafe { std::ptr::write_bytes(buf.add(done), 0, len - done) };
                            break;
                        }
                        done += n as usize;
                    }
                    c.reads.fetch_add(1, Ordering::Relaxed);
                    c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    0
                }
                Op::Write { offset, buf, len } => {
                    if img.read_only {
                        return -libc::EROFS;
                    }
                    if !in_range(offset, len as u64) {
                        return -libc::EINVAL;
                    }
                    let mut done = 0usize;
                    while done < len {
                        // SAFETY: buf is valid for len bytes (caller contract).
                        let n = unsafe {
                            libc::pwrite(fd, buf.add(done).cast(), len - done, (offset + done as u64) as i64)
                        };
                        if n < 0 {
                            let e = errno();
                            if e == libc::EINTR {
                                continue;
                            }
                            return -e;
                        }
                        done += n as usize;
                    }
                    if img.writethrough {
                        // SAFETY: plain syscall on an fd we own.
                        if unsafe { libc::fdatasync(fd) } != 0 {
                            return -errno();
                        }
                    }
                    c.writes.fetch_add(1, Ordering::Relaxed);
                    c.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                    0
                }
                Op::Flush => {
                    c.flushes.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: plain syscall on an fd we own.
                    if unsafe { libc::fdatasync(fd) } != 0 { -errno() } else { 0 }
                }
                Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                    if img.read_only {
                        return -libc::EROFS;
                    }
                    if !in_range(offset, len) {
                        return -libc::EINVAL;
                    }
                    let mode = if matches!(op, Op::Discard { .. }) {
                        c.discards.fetch_add(1, Ordering::Relaxed);
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        c.write_zeroes.fetch_add(1, Ordering::Relaxed);
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    };
                    // SAFETY: plain syscall on an fd we own.
                    if unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) } != 0 { -errno() } else { 0 }
                }
            }
        }

        pub fn commit(&mut self) -> crate::stub_engine::Result<()> {
            Ok(())
        }

        pub fn reap(
            &mut self,
            out: &mut Vec<Completion>,
            _min: usize,
            _timeout: Option<Duration>,
        ) -> crate::stub_engine::Result<usize> {
            // Everything submitted has already finished: no waiting is ever needed.
            let n = self.done.len();
            out.extend(self.done.drain(..));
            Ok(n)
        }

        pub fn in_flight(&self) -> usize {
            self.done.len()
        }
    }
}
