//! Block status and CACHE off the connection thread.
//!
//! Block status answers one chunk per context the client selected: `base:allocation` from
//! the engine's block status, `qemu:dirty-bitmap:NAME` from the bitmap's bits
//! ([`BitmapView`]; bit 0 of the flags set on dirty extents, as qemu-nbd reports them).
//!
//! The engine's block status ([`Image::block_status`]) is synchronous: on an L2 cache miss it
//! loads the slice through the image's admin ring, and when another queue is loading the
//! same slice it waits for that load. Called on the connection thread it could wait for a
//! slice the connection's own queue is loading, which only that thread completes: a
//! deadlock. So each connection hands block status (and CACHE, which warms the metadata
//! cache the same way) to a worker thread of its own, started on the first such request.
//! The worker owns no queue, so it never holds up a load anyone waits for; the connection
//! thread keeps reaping its queue while it waits, and learns of results through an eventfd.

use super::negotiate::bitmap_context_id;
use super::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use super::sock::EventFd;
use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use quring::image::{BitmapView, Image};
use std::sync::Arc;

/// At most this many extents per reply (the protocol asks for at most 2^20).
const MAX_EXTENTS: usize = 1 << 16;

/// Work for the worker.
pub enum Job {
    /// The selected contexts of `[offset, offset+len)`: `base:allocation` (with its
    /// context id) and the exported bitmaps in the mask.
    Status { key: usize, offset: u64, len: u32, req_one: bool, base: Option<u32>, bitmaps: u64 },
    /// Warm the metadata cache for `[offset, offset+len)`.
    Cache { key: usize, offset: u64, len: u32 },
}

/// One context's answer: its id and `(length, flags)` extents.
pub type ContextExtents = (u32, Vec<(u32, u32)>);

/// A finished job: per context, its id and extents (nothing for CACHE), or an errno and
/// message.
pub struct Done {
    pub key: usize,
    pub result: Result<Vec<ContextExtents>, (i32, String)>,
}

/// The connection's handle on its worker.
pub struct Worker {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    pub wake: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Jobs sent and not yet received back.
    pub busy: usize,
}

impl Worker {
    /// `bitmaps`: the exported bitmaps, in the export's order.
    pub fn start(image: Arc<Image>, bitmaps: Arc<[BitmapView]>, name: String) -> std::io::Result<Worker> {
        let (jtx, jrx) = unbounded::<Job>();
        let (dtx, drx) = unbounded::<Done>();
        let wake = Arc::new(EventFd::new()?);
        let w = wake.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || work(image, bitmaps, jrx, dtx, w))?;
        Ok(Worker { jobs: Some(jtx), done: drx, wake, thread: Some(thread), busy: 0 })
    }

    pub fn send(&mut self, job: Job) {
        if let Some(j) = &self.jobs
            && j.send(job).is_ok()
        {
            self.busy += 1;
        }
    }

    /// A finished job, if any.
    pub fn try_recv(&mut self) -> Option<Done> {
        match self.done.try_recv() {
            Ok(d) => {
                self.busy -= 1;
                Some(d)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the job channel ends the worker after its current job.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn work(image: Arc<Image>, bitmaps: Arc<[BitmapView]>, jobs: Receiver<Job>, done: Sender<Done>, wake: Arc<EventFd>) {
    for job in jobs {
        let d = match job {
            Job::Status { key, offset, len, req_one, base, bitmaps: mask } => {
                let mut chunks = Vec::new();
                let mut result = Ok(());
                if let Some(id) = base {
                    match extents(&image, offset, len, req_one) {
                        Ok(e) => chunks.push((id, e)),
                        Err(e) => result = Err(e),
                    }
                }
                for (i, b) in bitmaps.iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        chunks.push((bitmap_context_id(i), dirty_extents(b, offset, len, req_one)));
                    }
                }
                Done { key, result: result.map(|()| chunks) }
            }
            Job::Cache { key, offset, len } => {
                Done { key, result: extents(&image, offset, len, false).map(|_| Vec::new()) }
            }
        };
        if done.send(d).is_err() {
            return;
        }
        wake.signal();
    }
}

/// The `qemu:dirty-bitmap` extents of `[offset, offset+len)` (inside the image).
fn dirty_extents(b: &BitmapView, offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> =
        b.runs(offset, len as u64, max).into_iter().map(|(l, d)| (l as u32, if d { STATE_DIRTY } else { 0 })).collect();
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

/// `base:allocation` flags of one block status answer, as qemu-nbd derives them: a hole
/// unless the range holds data, zero when it reads as zeros.
pub fn allocation_flags(data: bool, zero: bool) -> u32 {
    (if data { 0 } else { STATE_HOLE }) | (if zero { STATE_ZERO } else { 0 })
}

/// The extents of `[offset, offset+len)` (the range is inside the image), adjacent extents
/// with equal flags merged. With `req_one`, only the first extent.
fn extents(image: &Arc<Image>, offset: u64, len: u32, req_one: bool) -> Result<Vec<(u32, u32)>, (i32, String)> {
    let end = offset + len as u64;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let st = image.block_status(pos, end - pos).map_err(|e| (e.raw_os_error(), e.to_string()))?;
        let n = st.len.min(end - pos);
        if n == 0 {
            break;
        }
        let flags = allocation_flags(st.data, st.zero);
        let full = out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += n as u32,
            Some(_) if req_one || full => break,
            _ => out.push((n as u32, flags)),
        }
        pos += n;
    }
    if out.is_empty() {
        // Nothing reported (cannot happen for a range inside the image): the protocol needs
        // one extent, and 0 ("allocated, contents unknown") is always true.
        out.push((len, 0));
    }
    Ok(out)
}
