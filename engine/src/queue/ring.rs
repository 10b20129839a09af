//! The ring driver: submission (one `io_uring_enter` per commit), completion reaping and
//! waiting. No request policy lives here.
//!
//! Completion handlers run only from [`Queue::reap`] (and [`Queue::reap_posted`]), never from
//! inside a submission: when the submission queue is full, [`Queue::push`] hands the queued
//! SQEs to the kernel, and if the kernel refuses because its completion queue overflowed,
//! the posted completions are moved into a backlog that the next reap handles first.

use super::*;
use io_uring::squeue;

/// `IORING_ENTER_GETEVENTS` (include/uapi/linux/io_uring.h): the enter also posts (and with
/// `min_complete > 0` waits for) completions.
const IORING_ENTER_GETEVENTS: u32 = 1;

impl Queue {
    /// Pushes queued SQEs to the kernel (one `io_uring_enter`). Never blocks.
    pub fn commit(&mut self) -> Result<()> {
        let _defer = self.defer_wakes();
        self.send_wakes();
        let r = self.commit_inner();
        self.settle_wakes();
        r
    }

    fn commit_inner(&mut self) -> Result<()> {
        // Enter the kernel when SQEs are queued, or when deferred task work (completions)
        // is waiting to be posted.
        if self.unsubmitted == 0 && !self.ring.submission().taskrun() {
            return Ok(());
        }
        loop {
            match self.submit_posting() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.stash_cqes(),
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
        let _defer = self.defer_wakes();
        let r = self.reap_inner(out, min, timeout);
        let w = self.finish_wakes();
        r.and_then(|n| w.map(|()| n))
    }

    fn reap_inner(&mut self, out: &mut Vec<Completion>, min: usize, timeout: Option<Duration>) -> Result<usize> {
        // The clock is read only when there is a real timeout to keep.
        let no_wait = timeout == Some(Duration::ZERO);
        self.image.maybe_clean_cache();
        let deadline = timeout.filter(|t| !t.is_zero()).map(|t| std::time::Instant::now() + t);
        loop {
            if min == 0 {
                // Not waiting: one enter (only if needed) posts deferred completions.
                self.commit()?;
            }
            self.process_cqes();
            self.retry_if_woken();
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
            // Wait for one CQE (at most until the deadline). Requests parked on another
            // queue are woken by a completion too: the read of this queue's wake eventfd.
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => break,
                },
            };
            debug_assert!(
                !self.ios.is_empty() || self.unsubmitted > 0,
                "requests wait, yet nothing can complete: {} requests, {} parked on slices, {} on the lock, \
                 {} jobs parked, {} flushes waiting, {} joined, write-back here: {}, wanted: {}",
                self.reqs.len(),
                self.parked.len(),
                self.lock_parked.len(),
                self.job_parked.len(),
                self.flush_waiters.len(),
                self.flush_joined.len(),
                self.wb.is_some(),
                self.wb_wanted
            );
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
        let _defer = self.defer_wakes();
        self.image.maybe_clean_cache();
        self.process_cqes();
        self.retry_if_woken();
        self.group_flush();
        if self.unsubmitted > 0 || crate::meta::waiters::has_deferred() {
            self.commit()?;
        }
        let n = self.done.len();
        out.append(&mut self.done);
        Ok(n)
    }

    /// Submits the queued SQEs and, in the same `io_uring_enter`, waits until the kernel
    /// has posted at least `min` completions (CQEs, which are not requests one for one) or
    /// `timeout` has passed. Handles nothing: the next [`Queue::reap_posted`] (or
    /// [`Queue::reap`]) does. For an event loop that knows it has nothing else to do until
    /// its batch completes: one system call submits the batch and sleeps, where
    /// [`Queue::commit`] followed by a wait would take two. On a DEFER_TASKRUN ring the
    /// kernel wakes the thread once `min` completions are queued, not once per completion.
    pub fn submit_and_wait(&mut self, min: usize, timeout: Duration) -> Result<()> {
        // Wakes recorded since the last enter go with this one, before this thread sleeps.
        self.send_wakes();
        let ts = io_uring::types::Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        let r = self.ring.submitter().submit_with_args(min.max(1), &args);
        // What the kernel did not take (an interrupted or refused enter) goes with the next.
        self.unsubmitted = self.ring.submission().len();
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME)) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // The completion queue overflowed: make room; the next commit submits.
                self.stash_cqes();
                Ok(())
            }
            Err(e) => Err(Error::io("io_uring_enter", e)),
        }
    }

    fn wait_cqe(&mut self, wait: Option<Duration>) -> Result<()> {
        // Wakes recorded since the last enter go with this one, before this thread sleeps.
        self.send_wakes();
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
        self.settle_wakes();
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
            // Ring full: hand what is queued to the kernel. When it refuses (its completion
            // queue overflowed, or the enter was interrupted), make room in the completion
            // queue by moving what is posted into the backlog, and try again. Handlers are
            // not run here: this may be inside one.
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    self.settle_wakes();
                }
                Err(_) => self.stash_cqes(),
            }
        }
    }

    /// Moves the completions the kernel has posted into the backlog, unhandled.
    fn stash_cqes(&mut self) {
        let backlog = &mut self.cqe_backlog;
        backlog.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }

    /// Runs the handlers of the backlog and of every posted completion (handlers may push
    /// SQEs, which may add to the backlog: it is drained until empty).
    pub(super) fn process_cqes(&mut self) {
        let mut batch = std::mem::take(&mut self.cqe_buf);
        loop {
            batch.clear();
            std::mem::swap(&mut batch, &mut self.cqe_backlog);
            batch.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if batch.is_empty() {
                break;
            }
            for &(ud, res) in &batch {
                if ud >= crate::meta::waiters::WAKE_SENT_CQE {
                    self.wake_cqe(ud, res);
                } else {
                    self.complete_io(ud as usize, res);
                }
            }
        }
        self.cqe_buf = batch;
    }
}
