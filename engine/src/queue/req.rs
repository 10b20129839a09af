//! The request lifecycle: creation, driving by kind, failure, completion of sub-I/Os,
//! and finishing (to the caller or to the parent request or job).

use super::*;

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
            buf,
            cursor: offset,
            pending: 0,
            error: 0,
            parked: false,
            detail: None,
            parent,
            wt_flush: false,
            counted: false,
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

    /// Drops a request from the image's in-flight write count.
    fn uncount(&mut self, req: usize) {
        if std::mem::replace(&mut self.reqs[req].counted, false) {
            self.image.writes_in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
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

    pub(super) fn retry_parked(&mut self) {
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
}
