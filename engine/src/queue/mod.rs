//! The per-thread [`Queue`]: one io_uring, a slab of in-flight requests, a slab of
//! sub-I/Os (each SQE's `user_data` is its key), and the request state machines.
//!
//! A guest request walks its range cluster by cluster ([`read`]); each piece becomes a data
//! read SQE, a zero fill, a backing-file read or a compressed read. A piece whose L2 slice
//! is not cached parks the request and issues (or waits for) the slice load; the queue keeps
//! serving other requests meanwhile. The request completes when its last SQE does.

mod read;

use crate::image::Image;
use crate::io::AlignedBuf;
use crate::meta::cache::SlotId;
use crate::{Error, Result};
use io_uring::{IoUring, squeue};
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
    Read { offset: u64, buf: *mut u8, len: usize },
    /// Write `len` bytes at `offset` from `buf`.
    Write { offset: u64, buf: *const u8, len: usize },
    /// Make every completed write durable.
    Flush,
    /// Discard a range (reads zeros or backing data afterwards).
    Discard { offset: u64, len: u64 },
    /// Write zeros; with `unmap` the clusters may be deallocated.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqKind {
    Read,
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
    /// An fdatasync for a flush request.
    Flush { req: usize },
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
        Ok(Queue {
            image: image.clone(),
            ring,
            reqs: Slab::with_capacity(256),
            ios: Slab::with_capacity(512),
            parked: Vec::new(),
            done: Vec::new(),
            unsubmitted: 0,
            details: std::collections::VecDeque::new(),
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

    /// Requests submitted and not yet returned by [`Queue::reap`].
    pub fn in_flight(&self) -> usize {
        self.reqs.len() + self.done.len()
    }

    /// Starts a request. Never blocks. Errors in the request itself (bad range, read-only
    /// image) are returned here, before anything is started.
    ///
    /// # Safety
    /// The buffer in `req.op` must be valid for `len` bytes and stay valid and untouched
    /// until the request's completion is returned by [`Queue::reap`].
    pub unsafe fn submit(&mut self, req: Request) -> Result<()> {
        let size = self.image.size;
        match req.op {
            Op::Read { offset, buf, len } => {
                check_range(offset, len as u64, size)?;
                if buf.is_null() && len > 0 {
                    return Err(Error::InvalidRequest("null buffer".into()));
                }
                let id = self.reqs.insert(Req {
                    user_data: req.user_data,
                    kind: ReqKind::Read,
                    offset,
                    len: len as u64,
                    buf,
                    cursor: offset,
                    pending: 0,
                    error: 0,
                    parked: false,
                    detail: None,
                });
                self.drive_read(id);
                Ok(())
            }
            Op::Flush => {
                let id = self.reqs.insert(Req {
                    user_data: req.user_data,
                    kind: ReqKind::Flush,
                    offset: 0,
                    len: 0,
                    buf: std::ptr::null_mut(),
                    cursor: 0,
                    pending: 0,
                    error: 0,
                    parked: false,
                    detail: None,
                });
                if self.image.read_only {
                    self.finish(id);
                } else {
                    let fd = self.image.file.fd();
                    let io = self.ios.insert(Io::Flush { req: id });
                    let sqe = io_uring::opcode::Fsync::new(io_uring::types::Fd(fd))
                        .flags(io_uring::types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(io as u64);
                    self.reqs[id].pending += 1;
                    crate::counters::Counters::add(&self.image.counters.device_flushes, 1);
                    self.push(sqe);
                }
                Ok(())
            }
            Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. } => {
                if self.image.read_only {
                    Err(Error::InvalidRequest("the image is open read-only".into()))
                } else {
                    Err(Error::Unsupported("writes are not implemented yet".into()))
                }
            }
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
            match self.ring.submit() {
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

    /// Moves finished requests into `out`, waiting until at least `min` are available or
    /// `timeout` passes (`None`: no limit; `Some(ZERO)`: do not wait). Returns the count.
    pub fn reap(&mut self, out: &mut Vec<Completion>, min: usize, timeout: Option<Duration>) -> Result<usize> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            self.commit()?;
            self.process_cqes();
            self.retry_parked();
            self.commit()?;
            if self.done.len() >= min.max(1) || (min == 0) || self.reqs.is_empty() {
                break;
            }
            let now = std::time::Instant::now();
            if let Some(d) = deadline
                && now >= d
            {
                break;
            }
            // Wait for one CQE; when requests are parked on another queue's load, wake up
            // regularly to retry them.
            let mut wait = deadline.map(|d| d - now);
            if !self.parked.is_empty() && self.ios.is_empty() {
                wait = Some(wait.map_or(Duration::from_micros(50), |w| w.min(Duration::from_micros(50))));
            }
            self.wait_cqe(wait)?;
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
        let mut batch: Vec<(u64, i32)> = Vec::new();
        {
            let cq = self.ring.completion();
            for cqe in cq {
                batch.push((cqe.user_data(), cqe.result()));
            }
        }
        for (ud, res) in batch {
            self.complete_io(ud as usize, res);
        }
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
                self.io_done(req);
            }
            Io::Load { layer, slot, key, len } => {
                if res < 0 || (res as usize) < len {
                    layer.l2_cache.abort_load(slot);
                    // Fail the requests parked on this slice.
                    let err = if res < 0 { res } else { -libc::EIO };
                    let (hit, keep): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut self.parked).into_iter().partition(|&(_, k)| k == key);
                    self.parked = keep;
                    for (id, _) in hit {
                        self.reqs[id].parked = false;
                        self.fail(id, err);
                        self.maybe_finish(id);
                    }
                } else {
                    layer.l2_cache.complete_load(slot);
                }
                crate::counters::Counters::add(&layer.counters.meta_loads, 1);
                self.retry_parked();
            }
            Io::Flush { req } => {
                if res < 0 {
                    self.fail(req, res);
                }
                self.io_done(req);
            }
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

    fn io_done(&mut self, req: usize) {
        self.reqs[req].pending -= 1;
        self.maybe_finish(req);
    }

    /// Completes the request when nothing more is in flight or to be issued for it.
    pub(crate) fn maybe_finish(&mut self, req: usize) {
        let r = &self.reqs[req];
        let walked = r.cursor >= r.offset + r.len || r.error != 0;
        if r.pending == 0 && walked && !r.parked {
            self.finish(req);
        }
    }

    fn finish(&mut self, req: usize) {
        let r = self.reqs.remove(req);
        let c = &self.image.counters;
        if r.error == 0 {
            match r.kind {
                ReqKind::Read => {
                    crate::counters::Counters::add(&c.guest_reads, 1);
                    crate::counters::Counters::add(&c.read_bytes, r.len);
                }
                ReqKind::Flush => crate::counters::Counters::add(&c.guest_flushes, 1),
            }
        }
        if let Some(d) = r.detail {
            if self.details.len() >= 64 {
                self.details.pop_front();
            }
            self.details.push_back((r.user_data, d));
        }
        self.done.push(Completion { user_data: r.user_data, result: r.error });
    }

    fn retry_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        for (id, _) in std::mem::take(&mut self.parked) {
            if let Some(r) = self.reqs.get_mut(id) {
                r.parked = false;
                self.drive_read(id);
            }
        }
    }

    /// Blocking helper: reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = Op::Read { offset, buf: buf.as_mut_ptr(), len: buf.len() };
        self.run_one(op)
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
        // Wait for every SQE to finish: the kernel may still write into our buffers.
        while !self.ios.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.process_cqes();
            self.parked.clear();
        }
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
