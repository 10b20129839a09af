//! The per-thread [`Queue`]: one io_uring, a slab of in-flight requests, a slab of
//! sub-I/Os (each SQE's `user_data` is its key), and the request state machines.
//!
//! A guest request walks its range cluster by cluster ([`read`]); each piece becomes a data
//! read SQE, a zero fill, a backing-file read or a compressed read. A piece whose L2 slice
//! is not cached parks the request and issues (or waits for) the slice load; the queue keeps
//! serving other requests meanwhile. The request completes when its last SQE does.

mod read;
mod write;

use crate::counters::{CounterSnapshot, Counters};
use crate::image::Image;
use crate::io::AlignedBuf;
use crate::meta::cache::SlotId;
use crate::{Error, Result};
use io_uring::{IoUring, squeue};
use slab::Slab;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::Duration;

/// `IORING_ENTER_GETEVENTS` (include/uapi/linux/io_uring.h): the enter also posts (and with
/// `min_complete > 0` waits for) completions.
const IORING_ENTER_GETEVENTS: u32 = 1;

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

/// State of one guest request.
pub(crate) struct Req {
    pub user_data: u64,
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
    pub buf: *mut u8,
    /// Next guest offset to translate.
    pub cursor: u64,
    /// SQEs (or loads) in flight for this request.
    pub pending: u32,
    /// First error (negative errno).
    pub error: i32,
    /// Waiting for a metadata slice.
    pub parked: bool,
    /// The error behind `error`, when the engine knows more than an errno.
    pub detail: Option<Error>,
    /// Who waits for this request: the caller, or (internal requests) a job or request.
    pub parent: Parent,
    /// Writethrough: flush before completing.
    pub wt_flush: bool,
    /// Counted in the image's `writes_in_flight`.
    pub counted: bool,
    /// The epoch parity this (caller) request entered the queue's gate with
    /// ([`crate::meta::epoch`]); it leaves when it finishes.
    pub entered: Option<u8>,
    /// Data done; the writethrough flush runs now.
    pub flushing: bool,
}

/// The waiter of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Parent {
    /// A guest request: completes to the caller.
    Caller,
    /// A copy-on-write fill read for an allocation job.
    Job(usize),
    /// A piece of another request (retried allocation, zero data write).
    Req(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqKind {
    Read,
    Write,
    Zero { unmap: bool },
    Discard,
    Flush,
}

/// What one SQE is for.
pub(crate) enum Io {
    /// Data read straight into the guest buffer.
    Data { req: usize, dst: *mut u8, len: usize },
    /// Data read through an aligned bounce buffer.
    Bounce { req: usize, buf: AlignedBuf, skip: usize, dst: *mut u8, len: usize },
    /// A compressed cluster read; decompressed into `dst` on completion.
    Compressed {
        req: usize,
        buf: AlignedBuf,
        skip: usize,
        clen: usize,
        layer: Arc<Image>,
        in_cluster: usize,
        dst: *mut u8,
        len: usize,
    },
    /// An L2 slice load into a cache slot.
    Load { layer: Arc<Image>, slot: SlotId, key: u64, len: usize },
    /// A whole guest read served by one data read straight into its buffer: the request
    /// needs no state beyond this (no [`Req`]); see `Queue::try_whole_read`.
    Whole { user_data: u64, dst: *mut u8, len: usize, entered: u8 },
    /// A data write straight from the guest buffer (`token`: the test hook's).
    Write { req: usize, token: u64 },
    /// A data write from an aligned copy of an unaligned guest buffer.
    WriteBounce { req: usize, _buf: AlignedBuf, token: u64 },
    /// An allocation job's data write (from its bounce buffer or the guest buffer).
    JobWrite { job: usize },
}

/// One I/O queue: use one per thread. Not `Send`-shared: it owns its ring.
pub struct Queue {
    pub(crate) image: Arc<Image>,
    pub(crate) ring: IoUring,
    pub(crate) reqs: Slab<Req>,
    pub(crate) ios: Slab<Io>,
    /// Requests waiting for an L2 slice: (request, slice key).
    pub(crate) parked: Vec<(usize, u64)>,
    pub(crate) done: Vec<Completion>,
    pub(crate) unsubmitted: usize,
    /// Detailed errors of failed requests, by user_data (the most recent few).
    pub(crate) details: std::collections::VecDeque<(u64, Error)>,
    /// Allocation jobs (copy-on-write writes of one cluster).
    pub(crate) jobs: Slab<write::Job>,
    /// Host clusters reserved for this queue (refcount already 1).
    pub(crate) batch: Vec<u64>,
    /// Requests waiting for the metadata lock.
    pub(crate) lock_parked: Vec<usize>,
    /// Jobs waiting for the metadata lock to commit.
    pub(crate) job_parked: Vec<usize>,
    /// Refcount decrements found without the lock, handed over when it is next taken.
    pub(crate) local_frees: Vec<(u64, u64)>,
    /// A cluster of zeros (zero writes that cannot use the zero flag).
    pub(crate) zeros: AlignedBuf,
    /// Reused buffer for completions taken from the ring.
    pub(crate) cqe_buf: Vec<(u64, i32)>,
    /// The queue's pool of aligned bounce buffers (copy-on-write, compressed reads).
    pub(crate) pool: Vec<AlignedBuf>,
    /// Flushes (and writethrough writes) waiting for the next group commit.
    pub(crate) flush_waiters: Vec<usize>,
    /// This queue's counters (written only by this queue's thread; registered with the
    /// image, which sums every queue's into [`Image::counters`]).
    pub(crate) counters: Arc<Counters>,
    /// Guest reads in flight as a single [`Io::Whole`] (not in `reqs`).
    pub(crate) whole_in_flight: usize,
    /// This queue's requests in flight per epoch parity ([`crate::meta::epoch`]).
    pub(crate) gate: Arc<crate::meta::epoch::Gate>,
}

impl Queue {
    /// Creates a queue with its own io_uring on `image`.
    pub fn new(image: &Arc<Image>, opts: &QueueOptions) -> Result<Queue> {
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
        let counters = Arc::new(Counters::default());
        image.register_queue_counters(&counters);
        Ok(Queue {
            image: image.clone(),
            ring,
            reqs: Slab::with_capacity(256),
            ios: Slab::with_capacity(512),
            parked: Vec::new(),
            done: Vec::new(),
            unsubmitted: 0,
            details: std::collections::VecDeque::new(),
            jobs: Slab::new(),
            batch: Vec::new(),
            lock_parked: Vec::new(),
            job_parked: Vec::new(),
            local_frees: Vec::new(),
            zeros: AlignedBuf::new(image.geo.cluster_size() as usize),
            cqe_buf: Vec::with_capacity(256),
            pool: Vec::new(),
            flush_waiters: Vec::new(),
            counters,
            whole_in_flight: 0,
            gate: image.open_gate(),
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

    /// For event loops that wait on [`Queue::ring_fd`]: when some request waits for
    /// something the ring fd does not signal (metadata another queue is loading, the
    /// metadata lock, a group flush), returns how soon [`Queue::reap`] should be called
    /// again even if the fd stays quiet. `None`: waiting on the fd alone is enough.
    pub fn poll_hint(&self) -> Option<Duration> {
        let waiting = !self.parked.is_empty()
            || !self.lock_parked.is_empty()
            || !self.job_parked.is_empty()
            || !self.flush_waiters.is_empty();
        waiting.then_some(Duration::from_micros(50))
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
            Op::Discard { offset, len } => (ReqKind::Discard, offset, len, std::ptr::null_mut()),
            Op::Flush => (ReqKind::Flush, 0, 0, std::ptr::null_mut()),
            Op::Readv { .. } | Op::Writev { .. } => unreachable!("handled above"),
        };
        if kind != ReqKind::Flush {
            check_range(offset, len, size)?;
        }
        if matches!(kind, ReqKind::Read | ReqKind::Write) && buf.is_null() && len > 0 {
            return Err(Error::InvalidRequest("null buffer".into()));
        }
        let writes = matches!(kind, ReqKind::Write | ReqKind::Zero { .. } | ReqKind::Discard);
        if writes {
            self.image.check_writable()?;
        }
        // Every request that may touch host clusters holds its epoch until it is done: no
        // cluster it looks up can be freed and reused under it.
        let entered = (kind != ReqKind::Flush).then(|| self.image.enter(&self.gate));
        if let Some(p) = entered
            && kind == ReqKind::Read
            && self.try_whole_read(req.user_data, offset, len, buf, p)
        {
            return Ok(());
        }
        let id = self.new_req(req.user_data, kind, offset, len, buf, Parent::Caller);
        self.reqs[id].entered = entered;
        if writes {
            self.reqs[id].counted = true;
            self.image.writes_in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.reqs[id].wt_flush = self.image.cache_mode == crate::image::CacheMode::Writethrough;
        }
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
        let entered = self.image.enter(&self.gate);
        let id = self.new_req(user_data, kind, offset, len, std::ptr::null_mut(), Parent::Caller);
        self.reqs[id].entered = Some(entered);
        if write {
            self.reqs[id].counted = true;
            self.image.writes_in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.reqs[id].wt_flush = self.image.cache_mode == crate::image::CacheMode::Writethrough;
        }
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

    /// Creates a request in the slab.
    pub(crate) fn new_req(
        &mut self,
        user_data: u64,
        kind: ReqKind,
        offset: u64,
        len: u64,
        buf: *mut u8,
        parent: Parent,
    ) -> usize {
        self.reqs.insert(Req {
            user_data,
            kind,
            offset,
            len,
            buf,
            cursor: offset,
            pending: 0,
            error: 0,
            parked: false,
            detail: None,
            parent,
            wt_flush: false,
            counted: false,
            entered: None,
            flushing: false,
        })
    }

    /// Advances a request of any kind.
    pub(crate) fn drive(&mut self, id: usize) {
        if self.reqs[id].flushing {
            self.drive_flush(id);
            return;
        }
        match self.reqs[id].kind {
            ReqKind::Read => self.drive_read(id),
            ReqKind::Write => self.drive_write(id),
            ReqKind::Zero { .. } | ReqKind::Discard => self.drive_zero(id),
            ReqKind::Flush => self.drive_flush(id),
        }
    }

    /// Pushes queued SQEs to the kernel (one `io_uring_enter`). Never blocks.
    pub fn commit(&mut self) -> Result<()> {
        // Enter the kernel when SQEs are queued, or when deferred task work (completions)
        // is waiting to be posted.
        if self.unsubmitted == 0 && !self.ring.submission().taskrun() {
            return Ok(());
        }
        loop {
            match self.submit_posting() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.process_cqes();
                }
                Err(e) => return Err(Error::io("io_uring_enter", e)),
            }
        }
        self.unsubmitted = 0;
        Ok(())
    }

    /// Submits the queued SQEs without waiting, and (IORING_ENTER_GETEVENTS with
    /// `min_complete == 0`) has the kernel post the completions it holds as deferred task
    /// work in the same call: the caller's next reap then finds them in the CQ ring
    /// instead of entering again for them (fio's io_uring engine commits the same way).
    fn submit_posting(&mut self) -> std::io::Result<usize> {
        if self.ring.params().is_setup_sqpoll() {
            // The SQ thread submits; the crate enters only to wake it (SQ_WAKEUP).
            return self.ring.submit();
        }
        let n = self.ring.submission().len() as u32;
        // SAFETY: no argument pointer is passed (arg = None); every queued SQE points at
        // memory that outlives it (see `push`).
        unsafe { self.ring.submitter().enter::<libc::sigset_t>(n, 0, IORING_ENTER_GETEVENTS, None) }
    }

    /// Moves finished requests into `out`, waiting until at least `min` are available or
    /// `timeout` passes (`None`: no limit; `Some(ZERO)`: do not wait). Returns the count.
    pub fn reap(&mut self, out: &mut Vec<Completion>, min: usize, timeout: Option<Duration>) -> Result<usize> {
        // The clock is read only when there is a real timeout to keep.
        let no_wait = timeout == Some(Duration::ZERO);
        let deadline = timeout.filter(|t| !t.is_zero()).map(|t| std::time::Instant::now() + t);
        loop {
            if min == 0 {
                // Not waiting: one enter (only if needed) posts deferred completions.
                self.commit()?;
            }
            self.process_cqes();
            self.retry_parked();
            self.group_flush();
            if self.done.len() >= min.max(1) || (min == 0) || (self.reqs.is_empty() && self.whole_in_flight == 0) {
                // Push SQEs that completions and retries queued. Only then: completions the
                // kernel holds as deferred task work are posted by the next enter anyway
                // (the caller's next commit or reap), and the ring fd polls readable
                // while they wait, so entering just for them would cost a syscall per reap.
                if self.unsubmitted > 0 {
                    self.commit()?;
                }
                break;
            }
            if no_wait {
                break;
            }
            // Wait for one CQE (at most until the deadline); when requests are parked on
            // another queue's load, wake up regularly to retry them.
            let mut wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => break,
                },
            };
            let waiting = !self.parked.is_empty()
                || !self.lock_parked.is_empty()
                || !self.job_parked.is_empty()
                || !self.flush_waiters.is_empty();
            if waiting && self.ios.is_empty() {
                wait = Some(wait.map_or(Duration::from_micros(50), |w| w.min(Duration::from_micros(50))));
            }
            self.wait_cqe(wait)?;
        }
        let n = self.done.len();
        out.append(&mut self.done);
        Ok(n)
    }

    /// Like [`Queue::reap`] with `min == 0`, but without entering the kernel just to have it
    /// post completions it holds back (the ring defers them to this thread's next
    /// `io_uring_enter`): moves what is already posted into `out` and submits only SQEs
    /// that the completions queued. For callers that enter soon anyway (a submission loop
    /// that commits after every batch) and want to save that syscall; an event loop woken by
    /// the ring fd must call [`Queue::reap`], which does enter. Returns the count.
    pub fn reap_posted(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        self.process_cqes();
        self.retry_parked();
        self.group_flush();
        if self.unsubmitted > 0 {
            self.commit()?;
        }
        let n = self.done.len();
        out.append(&mut self.done);
        Ok(n)
    }

    fn wait_cqe(&mut self, wait: Option<Duration>) -> Result<()> {
        let r = match wait {
            None => self.ring.submit_and_wait(1),
            Some(d) => {
                let ts = io_uring::types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        // The enter also submitted every queued SQE.
        self.unsubmitted = 0;
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(Error::io("io_uring_enter", e)),
        }
    }

    /// Queues an SQE, submitting first if the ring is full.
    pub(crate) fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every SQE we build points at memory owned by an `Io` entry in
            // `self.ios` or by a guest buffer the caller promised to keep valid; both
            // outlive the SQE (the Io entry is removed only after its CQE).
            let pushed = unsafe { self.ring.submission().push(&sqe).is_ok() };
            if pushed {
                self.unsubmitted += 1;
                return;
            }
            // Ring full: submit what is queued, reaping completions if the kernel is busy.
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(_) => {}
            }
            self.process_cqes();
        }
    }

    fn process_cqes(&mut self) {
        let mut batch = std::mem::take(&mut self.cqe_buf);
        batch.clear();
        batch.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &batch {
            self.complete_io(ud as usize, res);
        }
        self.cqe_buf = batch;
    }

    fn complete_io(&mut self, io: usize, res: i32) {
        let Some(entry) = self.ios.try_remove(io) else {
            return;
        };
        match entry {
            Io::Data { req, dst, len } => {
                if res < 0 {
                    self.fail(req, res);
                } else if (res as usize) < len {
                    // Past the end of the file: the rest reads as zeros.
                    // SAFETY: dst..dst+len is inside the request's guest buffer.
                    unsafe { std::ptr::write_bytes(dst.add(res as usize), 0, len - res as usize) };
                }
                self.io_done(req);
            }
            Io::Bounce { req, buf, skip, dst, len } => {
                if res < 0 {
                    self.fail(req, res);
                } else {
                    let avail = (res as usize).saturating_sub(skip).min(len);
                    // SAFETY: dst..dst+len is inside the guest buffer; buf holds skip+len bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(buf.as_ptr().add(skip), dst, avail);
                        std::ptr::write_bytes(dst.add(avail), 0, len - avail);
                    }
                }
                self.put_buf(buf);
                self.io_done(req);
            }
            Io::Compressed { req, buf, skip, clen, layer, in_cluster, dst, len } => {
                if res < 0 {
                    self.fail(req, res);
                } else {
                    let avail = (res as usize).saturating_sub(skip).min(clen);
                    let mut cluster = vec![0u8; layer.geo.cluster_size() as usize];
                    match crate::format::compress::decompress(layer.compression, &buf[skip..skip + avail], &mut cluster)
                    {
                        Ok(()) => {
                            // SAFETY: dst..dst+len is inside the guest buffer.
                            unsafe { std::ptr::copy_nonoverlapping(cluster.as_ptr().add(in_cluster), dst, len) };
                        }
                        Err(e) => self.fail_with(req, e),
                    }
                }
                self.put_buf(buf);
                self.io_done(req);
            }
            Io::Load { layer, slot, key, len } => {
                let checked = if res < 0 || (res as usize) < len {
                    Err(None)
                } else {
                    // The slot is ours (loading) until complete_load: nobody else reads or
                    // writes its words, and nobody sees them before the check passed.
                    layer.check_l2_slice(key, |w| layer.l2_cache.load_word(slot, w)).map_err(Some)
                };
                match checked {
                    Ok(()) => layer.l2_cache.complete_load(slot),
                    Err(bad) => {
                        layer.l2_cache.abort_load(slot);
                        // Fail the requests parked on this slice.
                        let err = if res < 0 { res } else { -libc::EIO };
                        let (hit, keep): (Vec<_>, Vec<_>) =
                            std::mem::take(&mut self.parked).into_iter().partition(|&(_, k)| k == key);
                        self.parked = keep;
                        for (id, _) in hit {
                            self.reqs[id].parked = false;
                            match &bad {
                                Some(Error::Corrupt { what, detail }) => {
                                    let e = Error::corrupt(what, detail.clone());
                                    // A write that would have used the slice marks the image
                                    // corrupt; a read only fails (see Image::check_l2_slice).
                                    let writes = !matches!(self.reqs[id].kind, ReqKind::Read);
                                    let e = if writes && Arc::ptr_eq(&layer, &self.image) {
                                        layer.signal_corruption(e)
                                    } else {
                                        e
                                    };
                                    self.fail_with(id, e);
                                }
                                _ => self.fail(id, err),
                            }
                            self.maybe_finish(id);
                        }
                    }
                }
                crate::counters::Counters::add(&self.counters.meta_loads, 1);
                self.retry_parked();
            }
            Io::Whole { user_data, dst, len, entered } => {
                self.whole_in_flight -= 1;
                self.image.leave(&self.gate, entered);
                if res >= 0 {
                    if (res as usize) < len {
                        // Past the end of the file: the rest reads as zeros.
                        // SAFETY: dst..dst+len is the request's guest buffer.
                        unsafe { std::ptr::write_bytes(dst.add(res as usize), 0, len - res as usize) };
                    }
                    Counters::bump(&self.counters.guest_reads, 1);
                    Counters::bump(&self.counters.read_bytes, len as u64);
                }
                self.done.push(Completion { user_data, result: res.min(0) });
            }
            Io::Write { req, token } | Io::WriteBounce { req, token, .. } => {
                if res < 0 {
                    self.fail(req, res);
                } else if let Some(h) = &self.image.hook {
                    h.0.completed(token);
                }
                self.io_done(req);
            }
            Io::JobWrite { job } => self.job_write_done(job, res),
        }
    }

    /// Fails a request with a detailed error.
    pub(crate) fn fail_with(&mut self, req: usize, e: Error) {
        let r = &mut self.reqs[req];
        if r.error == 0 {
            r.error = -e.raw_os_error();
            r.detail = Some(e);
        }
    }

    /// The detailed error of a failed request (by its user_data), if the engine has one:
    /// e.g. the corrupt field behind an EIO. Kept for the most recent 64 failures.
    pub fn error_detail(&mut self, user_data: u64) -> Option<Error> {
        let pos = self.details.iter().position(|(u, _)| *u == user_data)?;
        self.details.remove(pos).map(|(_, e)| e)
    }

    pub(crate) fn fail(&mut self, req: usize, err: i32) {
        let r = &mut self.reqs[req];
        if r.error == 0 {
            r.error = err;
        }
    }

    pub(crate) fn io_done(&mut self, req: usize) {
        self.reqs[req].pending -= 1;
        self.maybe_finish(req);
    }

    /// Completes the request when nothing more is in flight or to be issued for it.
    pub(crate) fn maybe_finish(&mut self, req: usize) {
        let r = &self.reqs[req];
        let walked = r.cursor >= r.offset + r.len || r.error != 0;
        if r.pending == 0 && walked && !r.parked {
            if r.wt_flush && r.error == 0 {
                // Writethrough: the data is written; now make it and its metadata durable.
                self.reqs[req].wt_flush = false;
                self.reqs[req].flushing = true;
                self.uncount(req);
                self.drive_flush(req);
                return;
            }
            self.finish(req);
        }
    }

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

    /// Drops a request from the image's in-flight write count and from its epoch.
    fn uncount(&mut self, req: usize) {
        if std::mem::replace(&mut self.reqs[req].counted, false) {
            self.image.writes_in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        if let Some(p) = self.reqs[req].entered.take() {
            self.image.leave(&self.gate, p);
        }
    }

    pub(crate) fn finish(&mut self, req: usize) {
        self.uncount(req);
        let r = self.reqs.remove(req);
        // This queue's own counters: single writer (see `Counters::bump`).
        let c = &self.counters;
        if r.error == 0 && r.parent == Parent::Caller {
            match r.kind {
                ReqKind::Read => {
                    Counters::bump(&c.guest_reads, 1);
                    Counters::bump(&c.read_bytes, r.len);
                }
                ReqKind::Write | ReqKind::Zero { .. } => {
                    Counters::bump(&c.guest_writes, 1);
                    Counters::bump(&c.write_bytes, r.len);
                }
                ReqKind::Discard => Counters::bump(&c.guest_discards, 1),
                ReqKind::Flush => Counters::bump(&c.guest_flushes, 1),
            }
        }
        match r.parent {
            Parent::Caller => {
                if let Some(d) = r.detail {
                    if self.details.len() >= 64 {
                        self.details.pop_front();
                    }
                    self.details.push_back((r.user_data, d));
                }
                self.done.push(Completion { user_data: r.user_data, result: r.error });
            }
            Parent::Req(p) => {
                if r.error != 0 {
                    match r.detail {
                        Some(d) => self.fail_with(p, d),
                        None => self.fail(p, r.error),
                    }
                }
                self.io_done(p);
            }
            Parent::Job(j) => self.job_read_done(j, r.error, r.detail),
        }
    }

    fn retry_parked(&mut self) {
        for (id, _) in std::mem::take(&mut self.parked) {
            if let Some(r) = self.reqs.get_mut(id) {
                r.parked = false;
                self.drive(id);
            }
        }
        for id in std::mem::take(&mut self.lock_parked) {
            if let Some(r) = self.reqs.get_mut(id) {
                r.parked = false;
                self.drive(id);
            }
        }
        for j in std::mem::take(&mut self.job_parked) {
            if self.jobs.contains(j) {
                self.job_commit(j);
            }
        }
    }

    /// Blocking helper: reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = Op::Read { offset, buf: buf.as_mut_ptr(), len: buf.len() };
        self.run_one(op)
    }

    /// Blocking helper: writes `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.run_one(Op::Write { offset, buf: buf.as_ptr(), len: buf.len() })
    }

    /// Blocking helper: writes zeros (`unmap`: clusters may be deallocated).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.run_one(Op::WriteZeroes { offset, len, unmap })
    }

    /// Blocking helper: discards.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.run_one(Op::Discard { offset, len })
    }

    /// Blocking helper: flushes.
    pub fn flush(&mut self) -> Result<()> {
        self.run_one(Op::Flush)
    }

    fn run_one(&mut self, op: Op) -> Result<()> {
        const TAG: u64 = u64::MAX - 1;
        // SAFETY: the buffer (if any) is borrowed by our caller for the whole call, and we
        // wait for the completion of this request before returning.
        unsafe { self.submit(Request { op, user_data: TAG })? };
        let mut out = Vec::new();
        loop {
            self.reap(&mut out, 1, None)?;
            if let Some(pos) = out.iter().position(|c| c.user_data == TAG) {
                let c = out.remove(pos);
                self.done.extend(out);
                if c.result == 0 {
                    return Ok(());
                }
                return Err(self.error_detail(TAG).unwrap_or_else(|| Error::errno("request", -c.result)));
            }
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.release_batch();
        // Wait for every SQE to finish: the kernel may still write into our buffers.
        while !self.ios.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.process_cqes();
            self.parked.clear();
        }
        self.image.retire_queue_counters(&self.counters);
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
