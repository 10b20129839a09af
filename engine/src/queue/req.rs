//! The request lifecycle: creation, driving by kind, failure, completion of sub-I/Os,
//! and finishing (to the caller or to the parent request or job).

use super::*;

/// State of one guest request.
pub(crate) struct Req {
    pub user_data: u64,
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
    /// The memory of `offset..offset + len` (none for zero writes, discards and flushes).
    pub buf: GuestBuf,
    /// Next guest offset to translate.
    pub cursor: u64,
    /// SQEs (or loads) in flight for this request.
    pub pending: u32,
    /// First error (negative errno).
    pub error: i32,
    /// Where the request is in its life (see [`ReqState`]).
    pub state: ReqState,
    /// The error behind `error`, when the engine knows more than an errno.
    pub detail: Option<Error>,
    /// Who waits for this request: the caller, or (internal requests) a job or request.
    pub parent: Parent,
    /// The epoch parity a guest request entered the queue's gate with
    /// ([`crate::image::epoch`]); it leaves when its I/O is done.
    pub entered: Option<u8>,
    /// A read's private copy of the L2 slice it last missed (see `queue/read.rs`).
    pub private: Option<super::read::PrivateSlice>,
    /// How often a write parked to have every L2 slice of its range cached before its
    /// walk (see `queue/write.rs`, `Queue::slices_ahead`).
    pub ahead: u8,
}

/// A request's memory: `len` bytes at `ptr` that the submitter keeps valid until the
/// request completes ([`Queue::submit`]'s contract; internal requests point into a job's
/// bounce buffer, the queue's zero cluster or their parent's memory). Pointers into it are
/// only handed out for ranges inside it: a range outside is an engine bug, and panics
/// before any memory is touched.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuestBuf {
    ptr: *mut u8,
    len: u64,
}

impl GuestBuf {
    /// `len` bytes at `ptr` (null for requests without memory, with `len` 0 then).
    pub fn new(ptr: *mut u8, len: u64) -> Self {
        GuestBuf { ptr, len: if ptr.is_null() { 0 } else { len } }
    }

    /// The address of `n` bytes at byte `at` of the buffer.
    #[inline]
    pub fn at(&self, at: u64, n: u64) -> *mut u8 {
        assert!(
            !self.ptr.is_null() && at.checked_add(n).is_some_and(|end| end <= self.len),
            "request memory: {n} bytes at {at} lie outside its {} bytes",
            self.len
        );
        // SAFETY: at + n <= len, so the result lies inside (or one past the end of) the
        // submitter's allocation of `len` bytes at `ptr`.
        unsafe { self.ptr.add(at as usize) }
    }
}

/// Where a request is in its life. Transitions (each asserted where it happens):
///
/// ```text
///   Active --park--> Parked --retry--> Active
///   Active --data done, writethrough write--> Syncing --group flush--> (finished)
///   Active --nothing pending, range walked--> (finished)
/// ```
///
/// A guest write (write, zero write, discard) counts in the image's `writes_in_flight`
/// while it is `Active` or `Parked` (freed clusters are not reused while any is); a
/// writethrough one leaves that count when it starts `Syncing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqState {
    /// Walking its range and issuing sub-I/Os (`pending` counts those in flight).
    Active,
    /// Waiting before it walks on: for an L2 slice load (listed in `Queue::parked`) or for
    /// the metadata lock (`Queue::lock_parked`). Its sub-I/Os already issued run on.
    Parked,
    /// A writethrough guest write whose data is done: waiting for the flush that makes it
    /// and its metadata durable (`Queue::flush_waiters`).
    Syncing,
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

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReqKind {
    Read,
    Write,
    Zero {
        unmap: bool,
    },
    /// `full`: the entries become 0 whatever is below (a shrink's cut-off range, QEMU's
    /// full discard); otherwise a guest discard.
    Discard {
        full: bool,
    },
    Flush,
}

impl ReqKind {
    /// Does it change the image (a write, zero write or discard)?
    pub fn writes(self) -> bool {
        matches!(self, ReqKind::Write | ReqKind::Zero { .. } | ReqKind::Discard { .. })
    }
}

impl Req {
    /// The address of the request's memory for `n` bytes at guest offset `pos`.
    #[inline]
    pub fn mem(&self, pos: u64, n: u64) -> *mut u8 {
        self.buf.at(pos - self.offset, n)
    }

    /// A guest write that counts in the image's `writes_in_flight` (see [`ReqState`]).
    fn counts_in_flight(&self) -> bool {
        self.parent == Parent::Caller && self.kind.writes() && self.state != ReqState::Syncing
    }
}

impl Queue {
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
            buf: GuestBuf::new(buf, len),
            cursor: offset,
            pending: 0,
            error: 0,
            state: ReqState::Active,
            detail: None,
            parent,
            entered: None,
            private: None,
            ahead: 0,
        })
    }

    /// A guest request (from the caller) that entered the epoch gate with parity `entered`
    /// joins the image's accounting: its epoch, and `writes_in_flight` for a write.
    pub(super) fn admit(&mut self, id: usize, entered: Option<u8>) {
        self.reqs[id].entered = entered;
        if self.reqs[id].counts_in_flight() {
            self.image.writes_in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// The next guest offset to walk and the request's end, or None when the request is
    /// walked (or has failed): the head of every walk loop.
    #[inline]
    pub(super) fn walk_next(&self, id: usize) -> Option<(u64, u64)> {
        let r = &self.reqs[id];
        let end = r.offset + r.len;
        (r.cursor < end && r.error == 0).then_some((r.cursor, end))
    }

    /// Parks an active request (it waits for a slice load or the metadata lock; the caller
    /// lists it where that wait ends).
    pub(super) fn park(&mut self, id: usize) {
        let r = &mut self.reqs[id];
        assert_eq!(r.state, ReqState::Active, "request {id} parked twice");
        r.state = ReqState::Parked;
    }

    /// Makes a parked request active again; false when it is gone or was not parked.
    pub(super) fn unpark(&mut self, id: usize) -> bool {
        match self.reqs.get_mut(id) {
            Some(r) if r.state == ReqState::Parked => {
                r.state = ReqState::Active;
                true
            }
            _ => false,
        }
    }

    /// Advances a request of any kind.
    pub(crate) fn drive(&mut self, id: usize) {
        if self.reqs[id].state == ReqState::Syncing {
            self.drive_flush(id);
            return;
        }
        if self.reqs[id].kind.writes() {
            // Writers may park on the metadata lock or a fill claim (queue/wake.rs).
            self.note_lock_events();
        }
        match self.reqs[id].kind {
            ReqKind::Read => self.drive_read(id),
            ReqKind::Write => self.drive_write(id),
            ReqKind::Zero { .. } | ReqKind::Discard { .. } => self.drive_zero(id),
            ReqKind::Flush => self.drive_flush(id),
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
        if r.pending == 0 && walked && r.state == ReqState::Active {
            let writethrough = self.image.cache_mode == crate::image::CacheMode::Writethrough;
            if writethrough && r.parent == Parent::Caller && r.kind.writes() && r.error == 0 {
                // Writethrough: the data is written; now make it and its metadata durable.
                self.uncount(req);
                self.reqs[req].state = ReqState::Syncing;
                self.drive_flush(req);
                return;
            }
            self.finish(req);
        }
    }

    /// Its I/O is done: drops a request from the image's in-flight write count (if it is in
    /// it) and from its epoch.
    fn uncount(&mut self, req: usize) {
        if self.reqs[req].counts_in_flight() {
            self.image.writes_in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        if let Some(p) = self.reqs[req].entered.take() {
            self.image.leave(&self.gate, p);
        }
    }

    pub(crate) fn finish(&mut self, req: usize) {
        self.uncount(req);
        let mut r = self.reqs.remove(req);
        if let Some(p) = r.private.take() {
            self.put_buf(p.buf);
        }
        if matches!(r.kind, ReqKind::Discard { .. } | ReqKind::Zero { .. }) && r.parent == Parent::Caller {
            // It may have freed clusters: past the bound, make that durable now so that the
            // requests after it (a new epoch) reuse them (Image::reclaim_if_many_freed).
            self.reclaim_freed();
        }
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
                ReqKind::Discard { .. } => Counters::bump(&c.guest_discards, 1),
                ReqKind::Flush => Counters::bump(&c.guest_flushes, 1),
            }
        }
        match r.parent {
            Parent::Caller => {
                if r.error == 0 && r.kind.writes() {
                    // Flushes that arrive from now on must be covered by a write-back that
                    // started after this write's entries were published (queue/flush.rs).
                    self.image.wb.note_completion();
                }
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

    pub(super) fn retry_parked(&mut self) {
        for (id, _) in std::mem::take(&mut self.parked) {
            if self.unpark(id) {
                self.drive(id);
            }
        }
        for id in std::mem::take(&mut self.lock_parked) {
            if self.unpark(id) {
                self.drive(id);
            }
        }
        for j in std::mem::take(&mut self.job_parked) {
            if self.jobs.contains(j) {
                self.job_commit(j);
            }
        }
    }
}
