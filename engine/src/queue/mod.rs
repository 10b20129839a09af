//! The per-thread [`Queue`]: one io_uring, a slab of in-flight requests, a slab of
//! sub-I/Os (each SQE's `user_data` is its key), and the request state machines.
//!
//! A guest request walks its range cluster by cluster (`read.rs`, `write.rs`, `zero.rs`); each piece becomes a data
//! read SQE, a zero fill, a backing-file read or a compressed read. A piece whose L2 slice
//! is not cached parks the request and issues (or waits for) the slice load; the queue keeps
//! serving other requests meanwhile. The request completes when its last SQE does.

mod blocking;
mod compressed;
mod cow;
mod flush;
mod io;
mod job;
mod pool;
mod read;
mod req;
mod resize;
mod ring;
mod run;
mod slice;
mod wake;
mod write;
mod writeback;
mod zero;

pub use compressed::CompressedClusters;
use io::Io;
use req::{Parent, Req, ReqKind};
pub use resize::ResizeOptions;

use crate::counters::{CounterSnapshot, Counters};
use crate::image::Image;
use crate::io::AlignedBuf;
use crate::meta::cache::SlotId;
use crate::{Error, Result};
use io_uring::IoUring;
use slab::Slab;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::Duration;

/// Per-queue tuning.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Submission ring entries (completion ring is twice that).
    pub ring_entries: u32,
    /// Use a kernel SQ polling thread.
    pub sqpoll: bool,
    /// Register fixed buffers (reserved for the write path's bounce pool).
    pub register_buffers: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions { ring_entries: 256, sqpoll: false, register_buffers: false }
    }
}

/// A guest operation.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Read `len` bytes at `offset` into `buf`.
    Read {
        /// Guest byte offset (a multiple of 512).
        offset: u64,
        /// Guest buffer (valid until the completion).
        buf: *mut u8,
        /// Length in bytes.
        len: usize,
    },
    /// Write `len` bytes at `offset` from `buf`.
    Write {
        /// Guest byte offset (a multiple of 512).
        offset: u64,
        /// Guest buffer (valid until the completion).
        buf: *const u8,
        /// Length in bytes.
        len: usize,
    },
    /// Scatter read at `offset` into `iovcnt` segments (guest memory, no copy when the
    /// segments are 512-byte aligned). Each segment's length must be a multiple of 512;
    /// the iovec array itself is only read during `submit`.
    Readv {
        /// Guest byte offset (a multiple of 512).
        offset: u64,
        /// The segments.
        iov: *const libc::iovec,
        /// Number of segments.
        iovcnt: usize,
    },
    /// Gather write at `offset` from `iovcnt` segments (same rules as `Readv`).
    Writev {
        /// Guest byte offset (a multiple of 512).
        offset: u64,
        /// The segments.
        iov: *const libc::iovec,
        /// Number of segments.
        iovcnt: usize,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (reads zeros or backing data afterwards).
    Discard {
        /// Guest byte offset (a multiple of 512).
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write zeros; with `unmap` the clusters may be deallocated.
    WriteZeroes {
        /// Guest byte offset (a multiple of 512).
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The clusters may be deallocated.
        unmap: bool,
    },
}

/// A guest request with the caller's tag.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Returned unchanged in the [`Completion`].
    pub user_data: u64,
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub user_data: u64,
    /// 0 on success, a negative errno on failure.
    pub result: i32,
}

/// One I/O queue: use one per thread. Not `Send`-shared: it owns its ring.
pub struct Queue {
    pub(crate) image: Arc<Image>,
    pub(crate) ring: IoUring,
    pub(crate) reqs: Slab<Req>,
    pub(crate) ios: Slab<Io>,
    /// Requests waiting for an L2 slice: (request, slice key).
    pub(crate) parked: Vec<(usize, u64)>,
    /// Scratch list of the requests a completed slice load drives (`Queue::slice_loaded`).
    pub(crate) ready_scratch: Vec<usize>,
    pub(crate) done: Vec<Completion>,
    pub(crate) unsubmitted: usize,
    /// Detailed errors of failed requests, by user_data (the most recent few).
    pub(crate) details: std::collections::VecDeque<(u64, Error)>,
    /// Allocation jobs (copy-on-write writes of one cluster).
    pub(crate) jobs: Slab<job::Job>,
    /// Host clusters reserved for this queue (refcount already 1).
    pub(crate) batch: Vec<crate::format::types::HostCluster>,
    /// Requests waiting for the metadata lock.
    pub(crate) lock_parked: Vec<usize>,
    /// Jobs waiting for the metadata lock to commit.
    pub(crate) job_parked: Vec<usize>,
    /// Data writes of jobs started by the write being walked that continue each other on
    /// the host and in the guest buffer, not issued yet (see [`job::WriteGroup`]).
    pub(crate) group: Option<job::WriteGroup>,
    /// `drive_write` calls under way on this thread (the group is issued when the outermost
    /// returns).
    pub(crate) grouping: u32,
    /// Refcount decrements found without the lock, handed over when it is next taken.
    /// Shared with the image (registered there): a snapshot operation, which runs while
    /// every queue is idle, takes the decrements idle queues still owe.
    pub(crate) local_frees: crate::image::OwedFrees,
    /// A cluster of zeros (zero writes that cannot use the zero flag).
    pub(crate) zeros: AlignedBuf,
    /// Reused buffer for completions taken from the ring.
    pub(crate) cqe_buf: Vec<(u64, i32)>,
    /// Completions taken from the ring but not handled yet (see `Queue::push`).
    pub(crate) cqe_backlog: Vec<(u64, i32)>,
    /// The queue's pool of aligned bounce buffers (copy-on-write, compressed reads).
    pub(crate) pool: Vec<AlignedBuf>,
    /// Flushes (and writethrough writes) waiting for a write-back that covers them, with
    /// the last write-back generation started when they arrived (`queue/flush.rs`).
    pub(crate) flush_waiters: Vec<(usize, u64)>,
    /// Flushes joined to write-back generations in flight (here or on other queues).
    pub(crate) flush_joined: Vec<(usize, u64)>,
    /// This queue's metadata write-back in flight (`queue/writeback.rs`).
    pub(crate) wb: Option<Box<writeback::Writeback>>,
    /// A cache set full of dirty slices asks for a write-back (`Queue::unclog`).
    pub(crate) wb_wanted: bool,
    /// This queue's counters (written only by this queue's thread; registered with the
    /// image, which sums every queue's into [`Image::counters`]).
    pub(crate) counters: Arc<Counters>,
    /// Guest reads in flight as a single [`Io::Whole`] (not in `reqs`).
    pub(crate) whole_in_flight: usize,
    /// This queue's requests in flight per epoch parity ([`crate::image::epoch`]).
    pub(crate) gate: Arc<crate::image::epoch::Gate>,
    /// This queue's bit and eventfd for wakes from other queues ([`crate::meta::waiters`]).
    pub(crate) waker: crate::meta::waiters::Waker,
    /// A read of the waker's eventfd is in flight.
    pub(crate) wake_armed: bool,
    /// That read's I/O index (its user_data).
    pub(crate) wake_io: usize,
    /// Something parked requests wait for changed: retry them.
    pub(crate) woken: bool,
    /// A NOP from [`Queue::nudge`] is in flight.
    pub(crate) nudged: bool,
    /// This queue wakes others by MSG_RING from its ring (not an SQPOLL ring).
    pub(crate) ring_wakes: bool,
    /// Registry slots whose ring fd a queued MSG_RING wake names, until it is submitted
    /// ([`crate::meta::waiters::claim_ring`]).
    pub(crate) wake_claims: Vec<usize>,
    /// Private slice loads of reads in flight (`queue/read.rs`).
    pub(crate) private_in_flight: usize,
    /// [`Image::lock_waiters`]' event count before the last attempt at the lock.
    pub(crate) lock_seen: u64,
    /// The image's tracked dirty bitmaps as last seen, and their generation
    /// ([`Image::bitmap_gen`]).
    pub(crate) bitmaps: (u64, crate::image::bitmaps::LiveList),
}

impl Queue {
    /// Creates a queue with its own io_uring on `image`.
    pub fn new(image: &Arc<Image>, opts: &QueueOptions) -> Result<Queue> {
        // An image opened without its data file has nowhere to read or write guest data.
        if let Some(e) = image.data_file_unavailable() {
            return Err(Error::InvalidRequest(format!("the image was opened without its data file: {e}")));
        }
        let entries = opts.ring_entries.max(8);
        let build = |defer: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(entries * 4);
            if opts.sqpoll {
                b.setup_sqpoll(1000);
            } else if defer {
                // Completions are posted when this thread asks for them: no IPIs from io-wq
                // workers, and task work batches with our own io_uring_enter calls.
                b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer().setup_defer_taskrun();
            }
            b.build(entries)
        };
        let ring = build(true).or_else(|_| build(false)).map_err(|e| Error::io("io_uring_setup", e))?;
        let waker = crate::meta::waiters::Waker::register().map_err(|e| Error::io("eventfd", e))?;
        {
            use std::os::unix::io::AsRawFd;
            waker.publish_ring(ring.as_raw_fd());
        }
        let counters = Arc::new(Counters::default());
        image.register_queue_counters(&counters);
        Ok(Queue {
            image: image.clone(),
            ring,
            reqs: Slab::with_capacity(256),
            ios: Slab::with_capacity(512),
            parked: Vec::new(),
            ready_scratch: Vec::new(),
            done: Vec::new(),
            unsubmitted: 0,
            details: std::collections::VecDeque::new(),
            jobs: Slab::new(),
            batch: Vec::new(),
            lock_parked: Vec::new(),
            job_parked: Vec::new(),
            group: None,
            grouping: 0,
            local_frees: image.register_owed_frees(),
            zeros: AlignedBuf::new(image.geo.cluster_size() as usize),
            cqe_buf: Vec::with_capacity(256),
            cqe_backlog: Vec::new(),
            pool: Vec::new(),
            flush_waiters: Vec::new(),
            flush_joined: Vec::new(),
            wb: None,
            wb_wanted: false,
            counters,
            whole_in_flight: 0,
            gate: image.open_gate(),
            waker,
            wake_armed: false,
            wake_io: 0,
            woken: false,
            nudged: false,
            ring_wakes: !opts.sqpoll,
            wake_claims: Vec::new(),
            private_in_flight: 0,
            lock_seen: 0,
            bitmaps: (0, Arc::from(Vec::new())),
        })
    }

    /// The image this queue serves.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The io_uring fd: poll it for readability (POLLIN) from an event loop to learn that
    /// completions are waiting, then call [`Queue::reap`] with a zero timeout.
    pub fn ring_fd(&self) -> RawFd {
        use std::os::unix::io::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// For event loops that wait on [`Queue::ring_fd`]: how soon [`Queue::reap`] must be
    /// called again even if the fd stays quiet. Always `None` now: a request that waits for
    /// another queue (a slice it is loading, the metadata lock, a group flush) is woken
    /// through this queue's ring ([`crate::meta::waiters`]), so the fd alone is enough.
    /// Kept so that event loops written against earlier versions keep compiling.
    pub fn poll_hint(&self) -> Option<Duration> {
        None
    }

    /// Whether a [`Queue::reap`] would find something without waiting: completions posted
    /// to the ring, completions the kernel holds back as task work for this thread (the
    /// ring's TASKRUN flag), or finished requests not returned yet. Reads shared memory
    /// only (no system call), so an event loop can check it before deciding to sleep.
    pub fn events_waiting(&mut self) -> bool {
        !self.done.is_empty() || !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    /// Requests that have finished and wait for the next reap (a request can finish inside
    /// [`Queue::submit`], with no completion of the ring behind it: a read of a hole).
    pub fn finished(&self) -> usize {
        self.done.len()
    }

    /// What this queue's requests have cost so far: guest requests and bytes, device
    /// writes by kind, device flushes, copy-on-write bytes, clusters allocated, slice loads,
    /// L2 cache hits, misses and the evictions its loads caused. ([`Image::counters`]
    /// reports the shared cache's evictions by everyone, tools included.)
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// Requests submitted and not yet returned by [`Queue::reap`].
    pub fn in_flight(&self) -> usize {
        self.reqs.len() + self.whole_in_flight + self.done.len()
    }

    /// Starts a request. Never blocks. Errors in the request itself (bad range, read-only
    /// image) are returned here, before anything is started.
    ///
    /// # Safety
    /// The buffer in `req.op` must be valid for `len` bytes and stay valid and untouched
    /// until the request's completion is returned by [`Queue::reap`].
    pub unsafe fn submit(&mut self, req: Request) -> Result<()> {
        let _defer = self.defer_wakes();
        // SAFETY: our caller's promise, passed on.
        let r = unsafe { self.submit_inner(req) };
        let w = self.finish_wakes();
        r.and(w)
    }

    /// [`Queue::submit`] inside its wake scope.
    unsafe fn submit_inner(&mut self, req: Request) -> Result<()> {
        let size = self.image.vsize();
        if let Op::Readv { offset, iov, iovcnt } | Op::Writev { offset, iov, iovcnt } = req.op {
            let write = matches!(req.op, Op::Writev { .. });
            // SAFETY: the caller passes `iovcnt` valid iovecs (read only during this call).
            let segs = unsafe { std::slice::from_raw_parts(iov, iovcnt) };
            return self.submit_vectored(req.user_data, offset, segs, write);
        }
        let (kind, offset, len, buf) = match req.op {
            Op::Read { offset, buf, len } => (ReqKind::Read, offset, len as u64, buf),
            Op::Write { offset, buf, len } => (ReqKind::Write, offset, len as u64, buf as *mut u8),
            Op::WriteZeroes { offset, len, unmap } => (ReqKind::Zero { unmap }, offset, len, std::ptr::null_mut()),
            Op::Discard { offset, len } => (ReqKind::Discard { full: false }, offset, len, std::ptr::null_mut()),
            Op::Flush => (ReqKind::Flush, 0, 0, std::ptr::null_mut()),
            Op::Readv { .. } | Op::Writev { .. } => unreachable!("handled above"),
        };
        if kind != ReqKind::Flush {
            check_range(offset, len, size)?;
        }
        if matches!(kind, ReqKind::Read | ReqKind::Write) && buf.is_null() && len > 0 {
            return Err(Error::InvalidRequest("null buffer".into()));
        }
        if kind.writes() {
            self.image.check_writable()?;
        }
        // Every request that may touch host clusters holds its epoch until it is done: no
        // cluster it looks up can be freed and reused under it.
        let entered = if kind != ReqKind::Flush { Some(self.image.enter_request(&self.gate)?) } else { None };
        if kind.writes() {
            self.mark_bitmaps(offset, len);
        }
        if let Some(p) = entered
            && kind == ReqKind::Read
            && self.try_whole_read(req.user_data, offset, len, buf, p)
        {
            return Ok(());
        }
        let id = self.new_req(req.user_data, kind, offset, len, buf, Parent::Caller);
        self.admit(id, entered);
        self.drive(id);
        Ok(())
    }

    /// One guest request over several buffers: a parent request whose pieces are child
    /// requests, one per segment.
    fn submit_vectored(&mut self, user_data: u64, offset: u64, segs: &[libc::iovec], write: bool) -> Result<()> {
        let mut len = 0u64;
        for (i, s) in segs.iter().enumerate() {
            if s.iov_len % 512 != 0 || (s.iov_base.is_null() && s.iov_len > 0) {
                return Err(Error::InvalidRequest(format!(
                    "segment {i}: length {} must be a non-null multiple of 512",
                    s.iov_len
                )));
            }
            len += s.iov_len as u64;
        }
        check_range(offset, len, self.image.vsize())?;
        if write {
            self.image.check_writable()?;
        }
        let kind = if write { ReqKind::Write } else { ReqKind::Read };
        let entered = self.image.enter_request(&self.gate)?;
        if write {
            self.mark_bitmaps(offset, len);
        }
        let id = self.new_req(user_data, kind, offset, len, std::ptr::null_mut(), Parent::Caller);
        self.admit(id, Some(entered));
        // The parent is walked at once; its children carry the work.
        self.reqs[id].cursor = offset + len;
        self.reqs[id].pending += 1;
        let mut pos = offset;
        for s in segs.iter().filter(|s| s.iov_len > 0) {
            self.reqs[id].pending += 1;
            let child = self.new_req(0, kind, pos, s.iov_len as u64, s.iov_base as *mut u8, Parent::Req(id));
            self.drive(child);
            pos += s.iov_len as u64;
        }
        self.reqs[id].pending -= 1;
        self.maybe_finish(id);
        Ok(())
    }

    /// Sets the bits of `[offset, offset + len)` in every tracked dirty bitmap (after the
    /// request entered its epoch: a bitmap operation, which needs idle queues, cannot run
    /// between this and the request's completion). No lock: one generation load, and per
    /// bitmap one atomic per 64 granules.
    #[inline]
    pub(crate) fn mark_bitmaps(&mut self, offset: u64, len: u64) {
        let generation = self.image.bitmap_gen.load(std::sync::atomic::Ordering::Acquire);
        if generation != self.bitmaps.0 {
            self.bitmaps = self.image.live_bitmaps();
        }
        for b in self.bitmaps.1.iter() {
            b.mark(offset, len);
        }
    }

    /// The detailed error of a failed request (by its user_data), if the engine has one:
    /// e.g. the corrupt field behind an EIO. Kept for the most recent 64 failures.
    pub fn error_detail(&mut self, user_data: u64) -> Option<Error> {
        let pos = self.details.iter().position(|(u, _)| *u == user_data)?;
        self.details.remove(pos).map(|(_, e)| e)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // A write-back of this ring ends first: blocking for the metadata lock below while
        // it is in flight could wait for a thread that waits for it.
        self.drain_writeback();
        self.release_batch();
        self.disarm_wake();
        // Wait for every SQE to finish: the kernel may still write into our buffers.
        while !self.ios.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.process_cqes();
            self.parked.clear();
        }
        // Wakes this queue sent are submitted (or die with its ring); then no other queue
        // may still be about to address a message to this ring when it closes.
        for slot in self.wake_claims.drain(..) {
            crate::meta::waiters::release_ring(slot);
        }
        self.waker.retire_ring();
        self.image.retire_queue_counters(&self.counters);
        self.image.retire_owed_frees(&self.local_frees);
        self.image.close_gate(&self.gate);
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(Error::InvalidRequest(format!("offset {offset} and length {len} must be multiples of 512")));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidRequest(format!("range {offset}+{len} is past the end of the image ({size} bytes)"))),
    }
}
