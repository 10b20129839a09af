//! The only file that calls the storage engine API. Everything else in the plugin talks
//! to the small wrappers below, so adapting to engine API changes happens here.
//!
//! Switching engines is the one `use ... as engine;` line: the stub serves raw files
//! synchronously; `quring` serves qcow2 images on io_uring.

use quring as engine;

use engine::image::{CacheMode, Image, Options};
use engine::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A failed engine call: positive errno plus the engine's message.
#[derive(Debug)]
pub struct GlueError {
    pub errno: i32,
    pub msg: String,
}

impl GlueError {
    fn from_engine(e: engine::Error) -> Self {
        GlueError { errno: e.raw_os_error(), msg: e.to_string() }
    }

    /// The engine reports "image locked by another process" as EAGAIN.
    pub fn is_lock_conflict(&self) -> bool {
        self.errno == libc::EAGAIN || self.errno == libc::EWOULDBLOCK
    }
}

/// Image-level settings taken from the fio engine options.
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    pub read_only: bool,
    pub force_share: bool,
    pub writethrough: bool,
    pub l2_cache_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
}

/// Queue-level settings; `ring_entries == 0` means the engine default.
#[derive(Clone, Debug, Default)]
pub struct QueueConfig {
    pub ring_entries: u32,
    pub sqpoll: bool,
    pub register_buffers: bool,
}

/// One image shared by every job thread of the process that uses it.
#[derive(Clone)]
pub struct SharedImage(Arc<Image>);

impl SharedImage {
    pub fn open(path: &Path, cfg: &ImageConfig) -> Result<SharedImage, GlueError> {
        let opts = Options {
            read_only: cfg.read_only,
            cache: if cfg.writethrough { CacheMode::Writethrough } else { CacheMode::Writeback },
            l2_cache_size: cfg.l2_cache_size,
            refcount_cache_size: cfg.refcount_cache_size,
            force_share: cfg.force_share,
            // Fault injection for tests (QURING_INJECT_ERROR), none otherwise.
            hook: engine::io::hook::from_env(),
            ..Options::default()
        };
        Image::open(path, &opts).map(SharedImage).map_err(GlueError::from_engine)
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.0.size()
    }

    /// Multi-line counter report.
    pub fn counters_text(&self) -> String {
        self.0.counters().to_string()
    }

    /// Flushes metadata and clears the dirty bit; called once, by the last user.
    pub fn close(&self) -> Result<(), GlueError> {
        self.0.close().map_err(GlueError::from_engine)
    }
}

/// What fio asks for, already translated from its ddir.
#[derive(Clone, Copy, Debug)]
pub enum IoKind {
    Read { offset: u64, buf: *mut u8, len: usize },
    Write { offset: u64, buf: *const u8, len: usize },
    Flush,
    Discard { offset: u64, len: u64 },
}

/// Why a submission was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// No room right now: retry after reaping (fio: FIO_Q_BUSY).
    Full,
    /// Hard failure with a positive errno.
    Failed(i32),
}

/// A finished request: `token` is what was submitted, `res` is 0 or a negative errno.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub token: u64,
    pub res: i32,
}

/// One job thread's queue on one image.
pub struct JobQueue {
    q: Queue,
    scratch: Vec<Completion>,
}

impl JobQueue {
    pub fn new(image: &SharedImage, cfg: &QueueConfig) -> Result<JobQueue, GlueError> {
        let mut opts = QueueOptions::default();
        if cfg.ring_entries != 0 {
            opts.ring_entries = cfg.ring_entries;
        }
        opts.sqpoll = cfg.sqpoll;
        opts.register_buffers = cfg.register_buffers;
        let q = Queue::new(&image.0, &opts).map_err(GlueError::from_engine)?;
        Ok(JobQueue { q, scratch: Vec::with_capacity(opts.ring_entries as usize) })
    }

    /// The engine's default ring size (used when the user did not choose one).
    pub fn default_ring_entries() -> u32 {
        QueueOptions::default().ring_entries
    }

    /// Queues one request without blocking.
    ///
    /// # Safety
    /// Read/Write buffers must stay valid (and, for reads, unaliased) until the request's
    /// completion has been returned by [`JobQueue::reap`].
    pub unsafe fn submit(&mut self, kind: IoKind, token: u64) -> Result<(), SubmitError> {
        let op = match kind {
            IoKind::Read { offset, buf, len } => Op::Read { offset, buf, len },
            IoKind::Write { offset, buf, len } => Op::Write { offset, buf, len },
            IoKind::Flush => Op::Flush,
            IoKind::Discard { offset, len } => Op::Discard { offset, len },
        };
        // SAFETY: forwarded caller contract: buffers outlive the request.
        let r = unsafe { self.q.submit(Request { op, user_data: token }) };
        r.map_err(|e| match e.raw_os_error() {
            libc::EAGAIN | libc::EBUSY => SubmitError::Full,
            errno => SubmitError::Failed(errno),
        })
    }

    /// Pushes queued requests to the kernel.
    pub fn commit(&mut self) -> Result<(), GlueError> {
        self.q.commit().map_err(GlueError::from_engine)
    }

    /// Appends finished requests to `out`, waiting for at least `min` up to `timeout`
    /// (None = forever). Returns how many were appended.
    pub fn reap(&mut self, out: &mut Vec<Done>, min: usize, timeout: Option<Duration>) -> Result<usize, GlueError> {
        self.scratch.clear();
        let n = self.q.reap(&mut self.scratch, min, timeout).map_err(GlueError::from_engine)?;
        out.extend(self.scratch.drain(..).map(|c| Done { token: c.user_data, res: c.result }));
        Ok(n)
    }

    /// Appends finished requests the kernel has already posted, without entering it.
    pub fn reap_posted(&mut self, out: &mut Vec<Done>) -> Result<usize, GlueError> {
        self.scratch.clear();
        let n = self.q.reap_posted(&mut self.scratch).map_err(GlueError::from_engine)?;
        out.extend(self.scratch.drain(..).map(|c| Done { token: c.user_data, res: c.result }));
        Ok(n)
    }

    /// Requests submitted and not yet returned by `reap`.
    pub fn in_flight(&self) -> usize {
        self.q.in_flight()
    }
}
