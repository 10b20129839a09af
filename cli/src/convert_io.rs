//! `quring convert`'s two ends and its copy loop: a raw or qcow2 source (block status:
//! which ranges hold data, read as zeros, or are left to the target's backing file), a raw
//! or qcow2 target, and the per-thread worker that copies chunks between them, writing
//! holes (or zero clusters) for zero runs as qemu-img does.

use quring::image::Image;
use quring::io::AlignedBuf;
use quring::queue::{Completion, CompressedClusters, Op, Queue, QueueOptions, Request};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// What a source range is, for the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Read it (it may still turn out to be zeros).
    Data,
    /// Known to read as zeros.
    Zero,
    /// Not allocated in the source's top layer: the target's backing file provides it (-B).
    Backing,
}

/// The image being converted.
pub enum Source {
    /// A qcow2 image with its backing chain.
    Qcow2(Arc<Image>),
    /// A raw file (with QEMU's read lock held on it).
    Raw { file: File, size: u64, _lock: quring::io::lock::ImageLock },
}

impl Source {
    pub fn size(&self) -> u64 {
        match self {
            Source::Qcow2(img) => img.size(),
            Source::Raw { size, .. } => *size,
        }
    }

    /// The status of up to `len` bytes at `off` and how far it reaches. `top_only`: the
    /// target has a backing file, so only the source's top layer is copied.
    pub fn status(&self, off: u64, len: u64, top_only: bool) -> Result<(Status, u64), String> {
        match self {
            Source::Raw { file, size, .. } => {
                let (data, n) = crate::probe::raw_extent(file, off, len, *size);
                Ok((if data { Status::Data } else { Status::Zero }, n.max(1).min(len)))
            }
            Source::Qcow2(img) => {
                let st = img
                    .block_status(off, len)
                    .map_err(|e| format!("error while reading block status at offset {off}: {e}"))?;
                let n = st.len.max(1).min(len);
                let s = if top_only && (st.depth > 0 || (!st.present && img.backing().is_some())) {
                    Status::Backing
                } else if top_only {
                    // qemu-img: with a backing file on the target, what the top layer says
                    // is zero is still copied (written as zeros, not left to the backing).
                    Status::Data
                } else if st.zero && !st.data {
                    Status::Zero
                } else {
                    Status::Data
                };
                Ok((s, n))
            }
        }
    }
}

/// Where converted data goes.
pub enum Target {
    /// A raw file (QEMU's write lock held on it until the end).
    Raw { file: File, _lock: quring::io::lock::ImageLock },
    /// A qcow2 image: every worker has its own queue on it.
    Qcow2(Arc<Image>),
}

/// What every worker shares.
pub struct Shared<'a> {
    pub src: &'a Source,
    pub dst: &'a Target,
    pub size: u64,
    /// Bytes per chunk (a multiple of the target's cluster size).
    pub chunk: u64,
    /// Zero runs at least this long (aligned) become holes; 0: write everything.
    pub gran: u64,
    /// The target reads as zeros where nothing is written (a new file without backing).
    pub zero_init: bool,
    /// The target has a backing file (-B): copy only the source's top layer.
    pub top_only: bool,
    /// Write compressed clusters (-c): whole target clusters of `cluster` bytes.
    pub compress: bool,
    pub cluster: u64,
    /// Writes may go out of order (-W); otherwise chunks are written in guest order.
    pub unordered: bool,
    /// Buffers (requests) in flight per worker.
    pub depth: usize,
    /// The next chunk to take.
    pub next: AtomicU64,
    /// The next chunk whose writes may be issued (in-order mode).
    pub turn: Mutex<u64>,
    pub turn_cv: Condvar,
    /// Source bytes done (progress).
    pub done: AtomicU64,
    /// Set when a worker failed: the others stop.
    pub failed: AtomicBool,
}

/// One worker thread's ends: its queues on the source and target images.
struct Ends {
    src_q: Option<Queue>,
    dst_q: Option<Queue>,
}

/// A buffer of the worker's ring of chunk buffers: writes in flight from it.
struct Slot {
    buf: AlignedBuf,
    pending: usize,
}

/// Runs one worker until every chunk is taken (or another worker failed).
pub fn worker(sh: &Shared) -> Result<(), String> {
    let mut ends = Ends {
        src_q: match sh.src {
            Source::Qcow2(img) => Some(Queue::new(img, &QueueOptions::default()).map_err(|e| e.to_string())?),
            Source::Raw { .. } => None,
        },
        dst_q: match sh.dst {
            Target::Qcow2(img) => Some(Queue::new(img, &QueueOptions::default()).map_err(|e| e.to_string())?),
            Target::Raw { .. } => None,
        },
    };
    let mut slots: Vec<Slot> =
        (0..sh.depth.max(1)).map(|_| Slot { buf: AlignedBuf::new(sh.chunk as usize), pending: 0 }).collect();
    let r = run_chunks(sh, &mut ends, &mut slots);
    // Wait for every write issued, also after an error: the buffers must outlive them.
    let drained = drain(&mut ends, &mut slots);
    if let Some(q) = &mut ends.dst_q
        && r.is_ok()
        && drained.is_ok()
    {
        q.flush().map_err(|e| format!("error while flushing: {e}"))?;
    }
    if r.is_err() || drained.is_err() {
        sh.failed.store(true, Ordering::Release);
        // Let a worker waiting for its turn give up.
        sh.turn_cv.notify_all();
    }
    r.and(drained)
}

fn run_chunks(sh: &Shared, ends: &mut Ends, slots: &mut [Slot]) -> Result<(), String> {
    loop {
        if sh.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let ci = sh.next.fetch_add(1, Ordering::AcqRel);
        let start = ci.saturating_mul(sh.chunk);
        if start >= sh.size {
            return Ok(());
        }
        let end = (start + sh.chunk).min(sh.size);
        // A free buffer: wait for the writes of the oldest one.
        let si = loop {
            if let Some(i) = slots.iter().position(|s| s.pending == 0) {
                break i;
            }
            reap(ends, slots, 1, None)?;
        };
        let runs = plan_chunk(sh, ends, &mut slots[si].buf, start, end)?;
        // Compression happens here, before the chunk's turn: every worker compresses its
        // own chunk at once, and only the stores go in guest order.
        let mut packed = compress_chunk(sh, &slots[si].buf, start, &runs)?;
        if !sh.unordered {
            // Wait for this chunk's turn, serving this worker's queue meanwhile: another
            // worker's request may wait for an L2 slice this queue is loading.
            loop {
                let t = sh.turn.lock().unwrap_or_else(|e| e.into_inner());
                if *t == ci {
                    break;
                }
                if sh.failed.load(Ordering::Acquire) {
                    return Ok(());
                }
                let (t, _) = sh.turn_cv.wait_timeout(t, Duration::from_micros(200)).unwrap_or_else(|e| e.into_inner());
                if *t == ci {
                    break;
                }
                drop(t);
                reap(ends, slots, 0, Some(Duration::ZERO))?;
            }
        }
        let issued = issue(sh, ends, slots, si, start, &runs, &mut packed);
        if !sh.unordered {
            *sh.turn.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            sh.turn_cv.notify_all();
        }
        issued?;
        sh.done.fetch_add(end - start, Ordering::Relaxed);
    }
}

/// Reads the chunk's data into `buf` and returns its runs: (status, offset, length), data
/// runs split where sparse detection finds zeros.
fn plan_chunk(
    sh: &Shared,
    ends: &mut Ends,
    buf: &mut AlignedBuf,
    start: u64,
    end: u64,
) -> Result<Vec<(Status, u64, u64)>, String> {
    let mut runs: Vec<(Status, u64, u64)> = Vec::new();
    let mut off = start;
    while off < end {
        let (s, n) = sh.src.status(off, end - off, sh.top_only)?;
        // -S 0: the output is fully allocated (zeros are written as data, as qemu-img).
        let s = if s == Status::Zero && sh.gran == 0 && !sh.compress { Status::Data } else { s };
        match runs.last_mut() {
            Some((ls, lo, ll)) if *ls == s && *lo + *ll == off => *ll += n,
            _ => runs.push((s, off, n)),
        }
        off += n;
    }
    if sh.compress {
        runs = whole_clusters(&runs, sh.cluster, end);
    }
    let gran = if sh.compress { sh.cluster } else { sh.gran };
    buf.set_len((end - start) as usize);
    let mut out = Vec::with_capacity(runs.len());
    for (s, o, n) in runs {
        if s != Status::Data {
            out.push((s, o, n));
            continue;
        }
        let dst = &mut buf[(o - start) as usize..(o - start + n) as usize];
        read_source(sh.src, ends, dst, o)?;
        if gran == 0 {
            out.push((Status::Data, o, n));
            continue;
        }
        // Sparse detection on blocks of `gran` bytes aligned in the guest.
        let mut p = o;
        while p < o + n {
            let q = ((p / gran + 1) * gran).min(o + n);
            let b = &buf[(p - start) as usize..(q - start) as usize];
            let s = if is_zero(b) { Status::Zero } else { Status::Data };
            match out.last_mut() {
                Some((ls, lo, ll)) if *ls == s && *lo + *ll == p => *ll += q - p,
                _ => out.push((s, p, q - p)),
            }
            p = q;
        }
    }
    Ok(out)
}

/// Compressed output is written by whole clusters: a cluster with any data in it is read
/// whole (its other parts read as the source has them).
fn whole_clusters(runs: &[(Status, u64, u64)], cluster: u64, end: u64) -> Vec<(Status, u64, u64)> {
    let mut out: Vec<(Status, u64, u64)> = Vec::new();
    for &(s, o, n) in runs {
        let (mut o, mut n) = (o, n);
        if s == Status::Data {
            let a = o / cluster * cluster;
            let b = ((o + n).div_ceil(cluster) * cluster).min(end);
            // Take back what earlier runs claimed of the first cluster.
            while let Some(last) = out.last_mut() {
                if last.1 + last.2 <= a {
                    break;
                }
                if last.1 >= a {
                    out.pop();
                } else {
                    last.2 = a - last.1;
                }
            }
            o = a;
            n = b - a;
        } else if let Some(last) = out.last()
            && last.0 == Status::Data
            && last.1 + last.2 > o
        {
            // Already inside a data cluster.
            let e = last.1 + last.2;
            if e >= o + n {
                continue;
            }
            n -= e - o;
            o = e;
        }
        match out.last_mut() {
            Some((ls, lo, ll)) if *ls == s && *lo + *ll == o => *ll += n,
            _ => out.push((s, o, n)),
        }
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    let (head, mid, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

fn read_source(src: &Source, ends: &mut Ends, dst: &mut [u8], off: u64) -> Result<(), String> {
    let err = |e: String| format!("error while reading at byte {off}: {e}");
    match src {
        Source::Raw { file, size, .. } => {
            // Past the end of a file that shrank meanwhile reads as zeros.
            let avail = size.saturating_sub(off).min(dst.len() as u64) as usize;
            let mut got = 0;
            while got < avail {
                match file.read_at(&mut dst[got..avail], off + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(err(crate::probe::os_text(&e))),
                }
            }
            dst[got..].fill(0);
            Ok(())
        }
        Source::Qcow2(_) => {
            let q = ends.src_q.as_mut().expect("a qcow2 source has a queue");
            q.read_at(dst, off).map_err(|e| err(e.to_string()))
        }
    }
}

/// With -c into qcow2: each data run of the chunk compressed (`None` for other runs), as
/// one or more pieces in guest order. A run of several clusters is split in two and its
/// second half compressed on a helper thread: with two workers, up to four threads compress
/// at once, as QEMU's qcow2 driver compresses up to four clusters at once (QCOW2_MAX_THREADS).
fn compress_chunk(
    sh: &Shared,
    buf: &AlignedBuf,
    start: u64,
    runs: &[(Status, u64, u64)],
) -> Result<Vec<Vec<CompressedClusters>>, String> {
    let Target::Qcow2(img) = sh.dst else { return Ok(Vec::new()) };
    if !sh.compress {
        return Ok(Vec::new());
    }
    let pack = |o: u64, b: &[u8]| {
        CompressedClusters::new(img, o, b).map_err(|e| format!("error while writing at byte {o}: {e}"))
    };
    runs.iter()
        .map(|&(s, o, n)| {
            if s != Status::Data {
                return Ok(Vec::new());
            }
            let b = &buf[(o - start) as usize..(o - start + n) as usize];
            let half = n / sh.cluster / 2 * sh.cluster;
            if half == 0 {
                return pack(o, b).map(|c| vec![c]);
            }
            let (first, second) = b.split_at(half as usize);
            std::thread::scope(|sc| {
                let helper = sc.spawn(|| pack(o + half, second));
                let a = pack(o, first);
                let b = helper.join().map_err(|_| "a compression thread panicked".to_string())?;
                Ok(vec![a?, b?])
            })
        })
        .collect()
}

/// Issues the writes of one chunk's runs from slot `si` (`packed`: the runs compressed by
/// [`compress_chunk`]).
fn issue(
    sh: &Shared,
    ends: &mut Ends,
    slots: &mut [Slot],
    si: usize,
    start: u64,
    runs: &[(Status, u64, u64)],
    packed: &mut [Vec<CompressedClusters>],
) -> Result<(), String> {
    for (i, &(s, o, n)) in runs.iter().enumerate() {
        let werr = |e: String| format!("error while writing at byte {o}: {e}");
        match s {
            Status::Backing => {}
            Status::Zero if sh.zero_init => {}
            Status::Zero => match sh.dst {
                Target::Raw { file, .. } => punch(file, o, n).map_err(werr)?,
                Target::Qcow2(_) => {
                    let q = ends.dst_q.as_mut().expect("a qcow2 target has a queue");
                    let op = Op::WriteZeroes { offset: o, len: n, unmap: true };
                    // SAFETY: no buffer.
                    unsafe { q.submit(Request { op, user_data: si as u64 }) }.map_err(|e| werr(e.to_string()))?;
                    slots[si].pending += 1;
                }
            },
            Status::Data => {
                let b = &slots[si].buf[(o - start) as usize..(o - start + n) as usize];
                match sh.dst {
                    Target::Raw { file, .. } => file.write_all_at(b, o).map_err(|e| werr(crate::probe::os_text(&e)))?,
                    Target::Qcow2(_) => {
                        let q = ends.dst_q.as_mut().expect("a qcow2 target has a queue");
                        if sh.compress {
                            let mut pieces = packed.get_mut(i).map(std::mem::take).unwrap_or_default();
                            if pieces.is_empty() {
                                pieces.push(q.compress_clusters(o, b).map_err(|e| werr(e.to_string()))?);
                            }
                            for c in pieces {
                                q.write_compressed_clusters(c).map_err(|e| werr(e.to_string()))?;
                            }
                            continue;
                        }
                        let op = Op::Write { offset: o, buf: b.as_ptr(), len: b.len() };
                        // SAFETY: the slot's buffer is not touched again until its pending
                        // count drops to zero (every write from it completed).
                        unsafe { q.submit(Request { op, user_data: si as u64 }) }.map_err(|e| werr(e.to_string()))?;
                        slots[si].pending += 1;
                    }
                }
            }
        }
    }
    if let Some(q) = &mut ends.dst_q {
        q.commit().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Waits for at least `min` completions on the target queue (0: all of them).
fn reap(ends: &mut Ends, slots: &mut [Slot], min: usize, timeout: Option<Duration>) -> Result<(), String> {
    let Some(q) = &mut ends.dst_q else { return Ok(()) };
    let mut done: Vec<Completion> = Vec::new();
    q.reap(&mut done, min, timeout).map_err(|e| e.to_string())?;
    let mut first_err = None;
    for c in done {
        let s = &mut slots[c.user_data as usize];
        s.pending -= 1;
        if c.result != 0 && first_err.is_none() {
            let e = q
                .error_detail(c.user_data)
                .map(|e| e.to_string())
                .unwrap_or_else(|| std::io::Error::from_raw_os_error(-c.result).to_string());
            first_err = Some(format!("error while writing: {e}"));
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn drain(ends: &mut Ends, slots: &mut [Slot]) -> Result<(), String> {
    let mut r = Ok(());
    while slots.iter().any(|s| s.pending > 0) {
        if let Err(e) = reap(ends, slots, 1, None) {
            if r.is_ok() {
                r = Err(e);
            }
            if ends.dst_q.as_ref().is_none_or(|q| q.in_flight() == 0) {
                break;
            }
        }
    }
    r
}

/// Zeros in a raw target that is not known to read as zeros: a hole (QEMU's write_zeroes
/// with MAY_UNMAP), zeros written where the filesystem cannot punch.
fn punch(f: &File, off: u64, len: u64) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on a valid fd has no memory effects.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut p = off;
    while p < off + len {
        let n = (off + len - p).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], p).map_err(|e| crate::probe::os_text(&e))?;
        p += n as u64;
    }
    Ok(())
}
