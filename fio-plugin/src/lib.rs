//! fio external ioengine "quring": runs fio jobs against a qcow2 image through the quring
//! engine's public API ([`quring::image::Image`], [`quring::queue::Queue`]), as a VMM
//! embeds it: one image per file, one queue per job thread.
//!
//! Load with `ioengine=external:/path/to/libquring_fio.so`.
//!
//! Design:
//! * **Per-job state** lives in a [`Job`] found through a process-wide open-addressing
//!   table keyed by the job's `td` pointer (fio's `struct thread_data` layout is not relied
//!   upon for this); a lookup takes no lock, no syscall and no thread-local access.
//!   The engine sets `FIO_NO_OFFLOAD`, so each `td` is only ever driven by its own thread.
//! * **Images** are shared: a process-wide registry keyed by canonical path holds one
//!   engine image plus a user count. With `thread=1`, every job thread on the same file
//!   uses that one image and owns its own queue. The last job to finish closes the image
//!   and prints its counters.
//! * **Engine options** are read from the job's option block (`td->eo`), found as
//!   described in `options.rs`.

pub mod abi;
pub mod options;

use abi::*;
use quring::image::{CacheMode, Image, Options};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString, c_char, c_int, c_uint};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Logging through fio (its binary exports log_info/log_err), falling back to stderr.

type LogFn = unsafe extern "C" fn(*const c_char, ...) -> isize;

fn fio_log_fn(name: &CStr) -> Option<LogFn> {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up; a non-null result for these
    // names in a fio process is fio's `ssize_t log_xxx(const char *fmt, ...)`.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: p is the address of fio's variadic logging function (see above).
        Some(unsafe { std::mem::transmute::<*mut libc::c_void, LogFn>(p) })
    }
}

/// fio's `uint64_t fio_gettime(struct timespec *, void *caller)`: the clock fio measures
/// latencies with (its clocksource may be the CPU's TSC, not CLOCK_MONOTONIC).
type GettimeFn = unsafe extern "C" fn(*mut libc::timespec, *mut libc::c_void) -> u64;

static FIO_GETTIME: LazyLock<Option<GettimeFn>> = LazyLock::new(|| {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"fio_gettime".as_ptr()) };
    // SAFETY: a non-null `fio_gettime` in a fio process is the function typed above.
    (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, GettimeFn>(p) })
});

/// fio's `void io_u_queued(struct thread_data *, struct io_u *)`: records the submission
/// latency (slat) of an io_u whose issue time the engine set.
type QueuedFn = unsafe extern "C" fn(*mut ThreadData, *mut IoU);

static FIO_IO_U_QUEUED: LazyLock<Option<QueuedFn>> = LazyLock::new(|| {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"io_u_queued".as_ptr()) };
    // SAFETY: a non-null `io_u_queued` in a fio process is the function typed above.
    (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, QueuedFn>(p) })
});

/// fio's `void put_file_log(struct thread_data *, struct fio_file *)`: drops one reference
/// on an open file; the last one closes it through the engine's `close_file`, and a
/// non-zero result becomes the job's error (`td_verror(td, ret, "file close")`), which makes
/// fio's exit status non-zero. The only exported way for an engine to fail its job after
/// the last I/O: fio ignores what `cleanup` and the `close_file` of the job's own files
/// report.
type PutFileLogFn = unsafe extern "C" fn(*mut ThreadData, *mut FioFile);

static FIO_PUT_FILE_LOG: LazyLock<Option<PutFileLogFn>> = LazyLock::new(|| {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"put_file_log".as_ptr()) };
    // SAFETY: a non-null `put_file_log` in a fio process is the function typed above.
    (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, PutFileLogFn>(p) })
});

/// `engine_data` of the stand-in file of [`fail_job`]: `close_file` returns its
/// `engine_pos` as the error.
const FAILED_CLOSE_FILE: usize = usize::MAX;

/// Makes `td`'s job fail with `errno` (fio then reports it in the job's `err=` and exits
/// non-zero): a stand-in `fio_file`, open with one reference, goes through fio's
/// `put_file_log`, whose close (our `close_file`) returns `errno`. Called from `cleanup`,
/// after fio closed and freed every file of the job; the one side effect is that fio's
/// count of the job's open files (used for its ETA line while the job exists) goes one
/// below zero, as it counts the stand-in's close too.
fn fail_job(td: *mut ThreadData, errno: c_int) {
    let Some(put) = *FIO_PUT_FILE_LOG else {
        log(true, "quring: this fio does not export put_file_log: the error above cannot fail the job\n");
        return;
    };
    let mut f = FioFile::zeroed();
    f.fd = -1;
    f.flags = FIO_FILE_OPEN;
    f.references = 1;
    f.engine_data = FAILED_CLOSE_FILE as *mut libc::c_void;
    f.engine_pos = errno.max(1) as u64;
    // SAFETY: td is the job's own thread_data (we are in one of its callbacks); `f` is a
    // complete fio_file that lives across the call, and fio only reads and updates it.
    unsafe { put(td, &mut f) };
}

/// Sets `issue_time` of every io_u in `ios` to now, with one clock read for the batch, and
/// lets fio record each one's submission latency, as fio's own io_uring engine does at
/// commit (fio skips its per-io_u clock read in `td_io_queue` because the engine sets
/// `FIO_ASYNCIO_SETS_ISSUE_TIME`). Without fio's clock (never the case in fio 3.33, which
/// exports it) CLOCK_MONOTONIC is used.
fn stamp_issue_time(td: *mut ThreadData, ios: &mut Vec<*mut IoU>) {
    if ios.is_empty() {
        return;
    }
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    match *FIO_GETTIME {
        // SAFETY: fio_gettime writes one timespec; a null caller is what fio passes itself.
        Some(f) => unsafe {
            f(&mut now, std::ptr::null_mut());
        },
        // SAFETY: clock_gettime writes one timespec.
        None => unsafe {
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
        },
    }
    for u in ios.drain(..) {
        // SAFETY: every pointer is an io_u fio handed to q_queue that has not been returned
        // through event() yet (stamping happens at the commit that follows the queue), so
        // fio keeps it alive and does not touch it concurrently (FIO_NO_OFFLOAD).
        unsafe { (*u).issue_time = now };
        if let Some(f) = *FIO_IO_U_QUEUED {
            // SAFETY: td is the job's thread_data and u one of its queued io_us (above).
            unsafe { f(td, u) };
        }
    }
}

static LOG_INFO: LazyLock<Option<LogFn>> = LazyLock::new(|| fio_log_fn(c"log_info"));
static LOG_ERR: LazyLock<Option<LogFn>> = LazyLock::new(|| fio_log_fn(c"log_err"));

fn log(err: bool, msg: &str) {
    let f = if err { *LOG_ERR } else { *LOG_INFO };
    match (f, CString::new(msg.replace('\0', " "))) {
        (Some(f), Ok(c)) => {
            // SAFETY: "%s" consumes exactly the one C string argument we pass.
            unsafe { f(c"%s".as_ptr(), c.as_ptr()) };
        }
        _ => eprint!("{msg}"),
    }
}

fn debug_enabled() -> bool {
    static ON: LazyLock<bool> = LazyLock::new(|| std::env::var_os("QURING_FIO_DEBUG").is_some());
    *ON
}

// ---------------------------------------------------------------------------------------
// Completion journal (`QURING_FIO_ACK_LOG`), for crash tests that kill fio.

/// With `QURING_FIO_ACK_LOG=PATH` in the environment, the plugin appends one line per
/// event to PATH, each with a single write(2) on an O_APPEND descriptor, so the journal
/// survives the process being killed at any moment and its line order is the real order
/// of the events, across job threads:
///
/// * `W <offset> <len> <res>`: the engine completed a write (`res` 0 or -errno); written
///   before fio learns of the completion;
/// * `S <id>`: a flush is about to be submitted (`id`: its io_u address, unique while it
///   is in flight);
/// * `F <id> <res>`: that flush completed;
/// * `C`: the image was closed cleanly (every write completed before is durable).
///
/// Every `W ... 0` line before an `S <id>` whose `F <id> 0` line exists names a write the
/// engine promised to keep; in cache=writethrough mode every `W ... 0` line does.
/// `tests/sigkill.rs` kills fio with SIGKILL and checks exactly that.
static ACK_LOG: LazyLock<Option<std::fs::File>> = LazyLock::new(|| {
    let path = std::env::var_os("QURING_FIO_ACK_LOG")?;
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            log(true, &format!("quring: QURING_FIO_ACK_LOG={}: {e}\n", Path::new(&path).display()));
            None
        }
    }
});

fn ack_log(line: std::fmt::Arguments) {
    if let Some(mut f) = ACK_LOG.as_ref() {
        let mut s = line.to_string();
        s.push('\n');
        // One write(2) of a short line: appended atomically, never interleaved.
        let _ = std::io::Write::write_all(&mut f, s.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// Process-wide image registry.

struct ImageEntry {
    image: Arc<Image>,
    users: usize,
}

static IMAGES: LazyLock<Mutex<HashMap<PathBuf, ImageEntry>>> = LazyLock::new(Default::default);

fn images() -> MutexGuard<'static, HashMap<PathBuf, ImageEntry>> {
    IMAGES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens the image at `key` with the engine's fault injection for tests
/// (`QURING_INJECT_ERROR`, none otherwise).
fn open_image(key: &Path, opts: &Options) -> quring::Result<Arc<Image>> {
    let opts = Options { hook: quring::io::hook::from_env(), ..opts.clone() };
    Image::open(key, &opts)
}

fn acquire_image(key: &Path, opts: &Options) -> quring::Result<Arc<Image>> {
    let mut map = images();
    if let Some(e) = map.get_mut(key) {
        e.users += 1;
        return Ok(e.image.clone());
    }
    let image = open_image(key, opts)?;
    map.insert(key.to_path_buf(), ImageEntry { image: image.clone(), users: 1 });
    Ok(image)
}

/// Drops one user of the image at `key`; the last user closes it. A failed close fails
/// the job of `td` (when given), so that fio's exit status reports it.
fn release_image(key: &Path, td: Option<*mut ThreadData>) {
    let last = {
        let mut map = images();
        match map.get_mut(key) {
            Some(e) if e.users > 1 => {
                e.users -= 1;
                None
            }
            Some(_) => map.remove(key).map(|e| e.image),
            None => None,
        }
    };
    if let Some(image) = last {
        match image.close() {
            Ok(()) => ack_log(format_args!("C")),
            Err(e) => {
                log(true, &format!("quring: closing {}: {e}\n", key.display()));
                if let Some(td) = td {
                    fail_job(td, e.raw_os_error());
                }
            }
        }
        // On stderr (fio's log_err): stdout may be fio's JSON (--output-format=json).
        log(true, &format!("quring: {}:\n{}\n", key.display(), image.counters()));
    }
}

// ---------------------------------------------------------------------------------------
// Per-job state.

struct Slot {
    key: PathBuf,
    queue: Queue,
}

struct Job {
    image_opts: Options,
    queue_opts: QueueOptions,
    /// The `ring_entries` option; None: sized from the iodepth.
    ring_entries: Option<u32>,
    io_u_count: usize,
    /// Images this job holds a registry reference on (released in cleanup).
    held: Vec<(PathBuf, Arc<Image>)>,
    /// Open files (one queue each); `fio_file.engine_data` holds index + 1.
    slots: Vec<Slot>,
    /// Valid descriptor handed to fio as `f->fd` (fio asserts on -1 while open).
    fake_fd: Option<OwnedFd>,
    uncommitted: bool,
    /// io_us queued since the last commit, whose `issue_time` the commit stamps (the engine
    /// sets `FIO_ASYNCIO_SETS_ISSUE_TIME`).
    unstamped: Vec<*mut IoU>,
    /// Reaped completions not yet handed to fio.
    pending: VecDeque<Completion>,
    scratch: Vec<Completion>,
    /// The batch returned by the last getevents, indexed by `event(i)`.
    events: Vec<*mut IoU>,
}

/// The jobs of this process by thread_data pointer: an open-addressing table of
/// (td, job) pairs, looked up on every callback without a lock, a syscall or thread-local
/// storage (in a cdylib a `thread_local!` costs a `__tls_get_addr` call). A td slot
/// holds 0 (never used), `GONE` (freed) or a td pointer; the job word is written before
/// the td word is published and read after it is seen (Release/Acquire).
const JOB_SLOTS: usize = 1024;
const GONE: usize = usize::MAX;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: (AtomicUsize, AtomicUsize) = (AtomicUsize::new(0), AtomicUsize::new(0));
static JOB_TABLE: [(AtomicUsize, AtomicUsize); JOB_SLOTS] = [EMPTY_SLOT; JOB_SLOTS];

fn job_home(td: usize) -> usize {
    // thread_data structs are large and aligned: drop the low bits before folding.
    ((td >> 6) ^ (td >> 16)) % JOB_SLOTS
}

/// Links `job` to `td`; false when the table is full.
fn link_job(td: usize, job: usize) -> bool {
    let h = job_home(td);
    for i in 0..JOB_SLOTS {
        let (k, v) = &JOB_TABLE[(h + i) % JOB_SLOTS];
        let cur = k.load(Ordering::Acquire);
        if cur == 0 || cur == GONE {
            // Claim the slot with a placeholder, then publish job and td.
            if k.compare_exchange(cur, GONE - 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                v.store(job, Ordering::Relaxed);
                k.store(td, Ordering::Release);
                return true;
            }
        }
    }
    false
}

/// Unlinks `td`'s job and returns it (0 when there was none).
fn unlink_job(td: usize) -> usize {
    let h = job_home(td);
    for i in 0..JOB_SLOTS {
        let (k, v) = &JOB_TABLE[(h + i) % JOB_SLOTS];
        match k.load(Ordering::Acquire) {
            0 => return 0,
            cur if cur == td => {
                let job = v.swap(0, Ordering::Relaxed);
                k.store(GONE, Ordering::Release);
                return job;
            }
            _ => {}
        }
    }
    0
}

fn job_ptr(td: *mut ThreadData) -> *mut Job {
    let td = td as usize;
    let h = job_home(td);
    for i in 0..JOB_SLOTS {
        let (k, v) = &JOB_TABLE[(h + i) % JOB_SLOTS];
        match k.load(Ordering::Acquire) {
            0 => break,
            cur if cur == td => return v.load(Ordering::Relaxed) as *mut Job,
            _ => {}
        }
    }
    std::ptr::null_mut()
}

/// The job of `td`, if `init` ran for it.
///
/// # Safety
/// Must only be called from the thread driving `td` (guaranteed by fio without offload,
/// which `FIO_NO_OFFLOAD` forbids), and the reference must not outlive the callback.
unsafe fn job<'a>(td: *mut ThreadData) -> Option<&'a mut Job> {
    let p = job_ptr(td);
    // SAFETY: p came from Box::into_raw in `init` and stays valid until `cleanup` removes
    // it; only td's own thread dereferences it and callbacks do not nest, so this is
    // the only live reference.
    unsafe { p.as_mut() }
}

/// The job's engine options as the engine's image and queue options, plus the
/// `ring_entries` option when set.
fn read_config(td: *mut ThreadData) -> Result<(Options, QueueOptions, Option<u32>), String> {
    let mut image = Options::default();
    let mut queue = QueueOptions::default();
    let Some((o, off)) = options::locate(td) else {
        log(true, "quring: could not locate this job's engine options; using defaults\n");
        return Ok((image, queue, None));
    };
    if debug_enabled() {
        log(false, &format!("quring: td {td:p}: engine options at td+{off}: {o:?}\n"));
    }
    match options::read_c_string(o.cache).as_deref() {
        None | Some("") | Some("writeback") => {}
        Some("writethrough") => image.cache = CacheMode::Writethrough,
        Some(other) => {
            return Err(format!("quring: cache={other} is invalid (use writeback or writethrough)\n"));
        }
    }
    image.l2_cache_size = (o.l2_cache_size != 0).then_some(o.l2_cache_size);
    image.refcount_cache_size = (o.refcount_cache_size != 0).then_some(o.refcount_cache_size);
    image.cache_clean_interval =
        (o.cache_clean_interval != 0).then(|| Duration::from_secs(o.cache_clean_interval.into()));
    queue.sqpoll = o.sqpoll != 0;
    queue.register_buffers = o.register_buffers != 0;
    Ok((image, queue, (o.ring_entries != 0).then_some(o.ring_entries)))
}

fn file_key(f: &FioFile) -> Result<PathBuf, (i32, String)> {
    if f.file_name.is_null() {
        return Err((libc::EINVAL, "quring: file has no name\n".into()));
    }
    // SAFETY: fio's file_name is a NUL-terminated string owned by the fio_file.
    let name = unsafe { CStr::from_ptr(f.file_name) };
    let path = Path::new(std::ffi::OsStr::from_bytes_compat(name.to_bytes()));
    std::fs::canonicalize(path)
        .map_err(|e| (e.raw_os_error().unwrap_or(libc::ENOENT), format!("quring: {}: {e}\n", path.display())))
}

/// `OsStr::from_bytes` without importing the extension trait at every use.
trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &Self;
}
impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &Self {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

// ---------------------------------------------------------------------------------------
// ioengine callbacks.

/// Files seen by get_file_size, per td, for init to open early.
static SIZED: LazyLock<Mutex<HashMap<usize, Vec<PathBuf>>>> = LazyLock::new(Default::default);

fn sized_files() -> MutexGuard<'static, HashMap<usize, Vec<PathBuf>>> {
    SIZED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes (or reuses) this job's reference on the image at `key`. On failure the error
/// has been logged and its errno is returned.
fn hold_image(job: &mut Job, key: &Path) -> Result<Arc<Image>, c_int> {
    if let Some((_, image)) = job.held.iter().find(|(k, _)| k == key) {
        return Ok(image.clone());
    }
    match acquire_image(key, &job.image_opts) {
        Ok(image) => {
            job.held.push((key.to_path_buf(), image.clone()));
            Ok(image)
        }
        Err(e) => {
            log(true, &format!("quring: cannot open {}: {e}\n", key.display()));
            if matches!(e, quring::Error::Locked(_)) {
                log(
                    true,
                    "quring: the image is in use by another process. Without thread=1 fio runs \
                     every job (and every numjobs clone) in its own process, and only one process \
                     may open an image for writing. Add thread=1 (--thread) so all jobs share one \
                     image inside one process.\n",
                );
            }
            Err(e.raw_os_error())
        }
    }
}

/// Drops this job's image references; the last user of an image closes it (and a failed
/// close fails the job of `td`, when given).
fn release_all(job: &mut Job, td: Option<*mut ThreadData>) {
    for (key, image) in job.held.drain(..) {
        drop(image);
        release_image(&key, td);
    }
}

unsafe extern "C" fn q_init(td: *mut ThreadData) -> c_int {
    let (image_opts, queue_opts, ring_entries) = match read_config(td) {
        Ok(c) => c,
        Err(msg) => {
            log(true, &msg);
            return 1;
        }
    };
    let job = Box::new(Job {
        image_opts,
        queue_opts,
        ring_entries,
        io_u_count: 0,
        held: Vec::new(),
        slots: Vec::new(),
        fake_fd: None,
        uncommitted: false,
        unstamped: Vec::new(),
        pending: VecDeque::new(),
        scratch: Vec::new(),
        events: Vec::new(),
    });
    let mut job = job;
    // Open the images now when fio already told us the job's files (get_file_size runs
    // before init, in the parent in fork mode), so a lock conflict fails the job visibly.
    let known = sized_files().remove(&(td as usize)).unwrap_or_default();
    for key in known {
        if let Err(errno) = hold_image(&mut job, &key) {
            release_all(&mut job, None);
            return errno;
        }
    }
    let old = unlink_job(td as usize);
    if old != 0 {
        // SAFETY: `old` came from Box::into_raw for this td and was just unlinked.
        drop(unsafe { Box::from_raw(old as *mut Job) });
    }
    let p = Box::into_raw(job);
    if !link_job(td as usize, p as usize) {
        // SAFETY: p came from Box::into_raw just above and was never shared.
        let mut job = unsafe { Box::from_raw(p) };
        release_all(&mut job, None);
        log(true, &format!("quring: more than {JOB_SLOTS} jobs in one fio process"));
        return 1;
    }
    0
}

unsafe extern "C" fn q_io_u_init(td: *mut ThreadData, _io_u: *mut IoU) -> c_int {
    // SAFETY: called on td's own thread, no other Job reference is live.
    if let Some(job) = unsafe { job(td) } {
        job.io_u_count += 1;
    }
    0
}

fn memfd() -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a valid C string; on success we own the new descriptor.
    let fd = unsafe { libc::memfd_create(c"quring-fio".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: fd >= 0 is a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

unsafe extern "C" fn q_open_file(td: *mut ThreadData, f: *mut FioFile) -> c_int {
    // SAFETY: fio passes a valid fio_file owned by this td for the whole call.
    let f = unsafe { &mut *f };
    // SAFETY: called on td's own thread, no other Job reference is live.
    let Some(job) = (unsafe { job(td) }) else {
        log(true, "quring: open_file before init\n");
        return libc::EINVAL;
    };
    let key = match file_key(f) {
        Ok(k) => k,
        Err((errno, msg)) => {
            log(true, &msg);
            return errno;
        }
    };
    let idx = match job.slots.iter().position(|s| s.key == key) {
        Some(i) => i,
        None => {
            let image = match hold_image(job, &key) {
                Ok(i) => i,
                Err(errno) => return errno,
            };
            let mut qopts = job.queue_opts.clone();
            if let Some(n) = job.ring_entries.filter(|&n| (n as usize) < job.io_u_count) {
                log(
                    true,
                    &format!(
                        "quring: ring_entries={} < iodepth={}: the engine will report BUSY and fio \
                         will requeue; with fio 3.33 that breaks verify of mixed read/write jobs\n",
                        n, job.io_u_count
                    ),
                );
            }
            qopts.ring_entries = job.ring_entries.unwrap_or_else(|| {
                let depth = (job.io_u_count.max(1) as u32).next_power_of_two();
                qopts.ring_entries.max(depth)
            });
            let queue = match Queue::new(&image, &qopts) {
                Ok(q) => q,
                Err(e) => {
                    log(true, &format!("quring: creating queue for {}: {e}\n", key.display()));
                    return e.raw_os_error();
                }
            };
            job.slots.push(Slot { key, queue });
            job.slots.len() - 1
        }
    };
    if job.fake_fd.is_none() {
        job.fake_fd = memfd();
    }
    let Some(fd) = job.fake_fd.as_ref().map(|fd| fd.as_raw_fd()) else {
        log(true, "quring: memfd_create failed\n");
        return libc::EMFILE;
    };
    f.fd = fd;
    f.engine_data = (idx + 1) as *mut libc::c_void;
    0
}

unsafe extern "C" fn q_close_file(_td: *mut ThreadData, f: *mut FioFile) -> c_int {
    // SAFETY: fio passes a valid fio_file owned by this td for the whole call.
    let f = unsafe { &mut *f };
    if f.engine_data as usize == FAILED_CLOSE_FILE {
        // fail_job's stand-in: report its error.
        f.fd = -1;
        return f.engine_pos as c_int;
    }
    // The image and queue stay with the job until cleanup (fio may reopen the file).
    f.fd = -1;
    0
}

unsafe extern "C" fn q_get_file_size(td: *mut ThreadData, f: *mut FioFile) -> c_int {
    // SAFETY: fio passes a valid fio_file for the whole call.
    let f = unsafe { &mut *f };
    let key = match file_key(f) {
        Ok(k) => k,
        Err((errno, msg)) => {
            log(true, &msg);
            return errno;
        }
    };
    let shared = images().get(&key).map(|e| e.image.clone());
    let size = match shared {
        Some(image) => image.size(),
        None => {
            // Probe without locking: this may run in fio's parent process before fork.
            let opts = Options { read_only: true, force_share: true, ..Default::default() };
            match open_image(&key, &opts) {
                Ok(image) => {
                    let size = image.size();
                    let _ = image.close();
                    size
                }
                Err(e) => {
                    log(true, &format!("quring: cannot open {}: {e}\n", key.display()));
                    return e.raw_os_error();
                }
            }
        }
    };
    f.real_file_size = size;
    f.flags |= FIO_FILE_SIZE_KNOWN;
    let mut sized = sized_files();
    let list = sized.entry(td as usize).or_default();
    if !list.contains(&key) {
        list.push(key);
    }
    0
}

unsafe extern "C" fn q_invalidate(_td: *mut ThreadData, _f: *mut FioFile) -> c_int {
    0
}

unsafe extern "C" fn q_queue(td: *mut ThreadData, io_u: *mut IoU) -> c_int {
    // SAFETY: fio passes a valid io_u it owns until we complete it.
    let u = unsafe { &mut *io_u };
    // SAFETY: called on td's own thread, no other Job reference is live.
    let Some(job) = (unsafe { job(td) }) else {
        u.error = libc::EINVAL as c_uint;
        return FIO_Q_COMPLETED;
    };
    // SAFETY: io_u->file is the open fio_file this io targets.
    let slot_idx = unsafe { u.file.as_ref() }.map_or(0, |f| f.engine_data as usize);
    let Some(slot) = slot_idx.checked_sub(1).and_then(|i| job.slots.get_mut(i)) else {
        u.error = libc::EBADF as c_uint;
        return FIO_Q_COMPLETED;
    };
    let op = match u.ddir {
        DDIR_READ => Op::Read { offset: u.offset, buf: u.xfer_buf.cast(), len: u.xfer_buflen as usize },
        DDIR_WRITE => Op::Write { offset: u.offset, buf: u.xfer_buf.cast_const().cast(), len: u.xfer_buflen as usize },
        DDIR_TRIM => Op::Discard { offset: u.offset, len: u.xfer_buflen },
        DDIR_SYNC | DDIR_DATASYNC | DDIR_SYNC_FILE_RANGE => Op::Flush,
        _ => {
            u.error = libc::EINVAL as c_uint;
            return FIO_Q_COMPLETED;
        }
    };
    if matches!(op, Op::Flush) {
        ack_log(format_args!("S {io_u:p}"));
    }
    // SAFETY: fio keeps the io_u and its xfer_buf alive and untouched until the io_u is
    // handed back through event(); the token is the io_u pointer itself.
    let r = unsafe { slot.queue.submit(Request { op, user_data: io_u as u64 }) };
    // The queue is full (EAGAIN/EBUSY): fio retries after reaping, when there is
    // something to reap.
    let full = |e: &quring::Error| matches!(e.raw_os_error(), libc::EAGAIN | libc::EBUSY);
    match r {
        Ok(()) => {
            job.uncommitted = true;
            job.unstamped.push(io_u);
            FIO_Q_QUEUED
        }
        Err(e) if full(&e) && (slot.queue.in_flight() > 0 || !job.pending.is_empty()) => FIO_Q_BUSY,
        Err(e) if full(&e) => {
            u.error = libc::EAGAIN as c_uint;
            FIO_Q_COMPLETED
        }
        Err(e) => {
            let errno = e.raw_os_error();
            u.error = errno as c_uint;
            u.resid = u.xfer_buflen;
            FIO_Q_COMPLETED
        }
    }
}

fn commit_all(td: *mut ThreadData, job: &mut Job) -> c_int {
    job.uncommitted = false;
    stamp_issue_time(td, &mut job.unstamped);
    for s in &mut job.slots {
        if let Err(e) = s.queue.commit() {
            return -e.raw_os_error();
        }
    }
    0
}

unsafe extern "C" fn q_commit(td: *mut ThreadData) -> c_int {
    // SAFETY: called on td's own thread, no other Job reference is live.
    match unsafe { job(td) } {
        Some(job) if job.uncommitted => commit_all(td, job),
        _ => 0,
    }
}

/// Moves finished requests into `job.pending` until at least `min` are there, the
/// deadline passes, or nothing is left in flight.
fn collect(job: &mut Job, min: usize, deadline: Option<Instant>) -> quring::Result<()> {
    // One image (the usual case): let the engine wait, with a single io_uring_enter.
    if job.slots.len() == 1 && min > job.pending.len() {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let need = min - job.pending.len();
        if job.slots[0].queue.in_flight() > 0 {
            job.slots[0].queue.reap(&mut job.scratch, need, remaining)?;
            job.pending.extend(job.scratch.drain(..));
        }
        if job.pending.len() >= min || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
    }
    loop {
        // Cheap non-blocking sweep of every queue: first what the kernel has posted (no
        // syscall; fio commits again right after, and that enter posts the rest), and only
        // when that is nothing, an enter that posts what the kernel holds back (so that
        // repeated min == 0 calls always make progress).
        for s in job.slots.iter_mut().filter(|s| s.queue.in_flight() > 0) {
            if s.queue.reap_posted(&mut job.scratch)? == 0 {
                s.queue.reap(&mut job.scratch, 0, Some(Duration::ZERO))?;
            }
        }
        job.pending.extend(job.scratch.drain(..));
        if job.pending.len() >= min {
            return Ok(());
        }
        let busy: Vec<usize> = (0..job.slots.len()).filter(|&i| job.slots[i].queue.in_flight() > 0).collect();
        let Some(&first) = busy.first() else {
            return Ok(());
        };
        let remaining = match deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(r) if !r.is_zero() => Some(r),
                _ => return Ok(()),
            },
        };
        let need = min - job.pending.len();
        if busy.len() == 1 {
            // One queue: let the engine wait for us.
            job.slots[first].queue.reap(&mut job.scratch, need, remaining)?;
        } else {
            // Several images in one job: the API can only wait on one queue at a time,
            // so wait briefly on the busiest and sweep again.
            let slice = Duration::from_micros(100);
            let wait = remaining.map_or(slice, |r| r.min(slice));
            let i = busy.iter().copied().max_by_key(|&i| job.slots[i].queue.in_flight()).unwrap_or(first);
            job.slots[i].queue.reap(&mut job.scratch, 1, Some(wait))?;
        }
        job.pending.extend(job.scratch.drain(..));
        if job.pending.len() >= min || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
    }
}

unsafe extern "C" fn q_getevents(td: *mut ThreadData, min: c_uint, max: c_uint, t: *const libc::timespec) -> c_int {
    // SAFETY: called on td's own thread, no other Job reference is live.
    let Some(job) = (unsafe { job(td) }) else {
        return -libc::EINVAL;
    };
    job.events.clear();
    // A request can finish without a commit of ours (a zero read completes at submit, a
    // reap with min == 0 submits on its own): stamp what is still unstamped first.
    stamp_issue_time(td, &mut job.unstamped);
    // SAFETY: t is NULL or points to a timespec fio owns for the duration of the call.
    let deadline = unsafe { t.as_ref() }
        .map(|t| Instant::now() + Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32));
    if min > 0 && job.uncommitted {
        let rc = commit_all(td, job);
        if rc != 0 {
            return rc;
        }
    }
    let in_flight: usize = job.slots.iter().map(|s| s.queue.in_flight()).sum();
    let min = (min as usize).min(job.pending.len() + in_flight);
    let max = (max as usize).max(min);
    if let Err(e) = collect(job, min, deadline) {
        return -e.raw_os_error();
    }
    while job.events.len() < max {
        let Some(d) = job.pending.pop_front() else {
            break;
        };
        let io_u = d.user_data as *mut IoU;
        // SAFETY: the token is an io_u pointer submitted in q_queue; fio keeps it alive
        // until we return it from event().
        let u = unsafe { &mut *io_u };
        if d.result < 0 {
            u.error = (-d.result) as c_uint;
            u.resid = u.xfer_buflen;
        } else {
            u.error = 0;
            u.resid = 0;
        }
        match u.ddir {
            DDIR_WRITE => ack_log(format_args!("W {} {} {}", u.offset, u.xfer_buflen, d.result.min(0))),
            DDIR_SYNC | DDIR_DATASYNC | DDIR_SYNC_FILE_RANGE => ack_log(format_args!("F {io_u:p} {}", d.result.min(0))),
            _ => {}
        }
        job.events.push(io_u);
    }
    job.events.len() as c_int
}

unsafe extern "C" fn q_event(td: *mut ThreadData, i: c_int) -> *mut IoU {
    // SAFETY: called on td's own thread, no other Job reference is live.
    let Some(job) = (unsafe { job(td) }) else {
        return std::ptr::null_mut();
    };
    usize::try_from(i).ok().and_then(|i| job.events.get(i).copied()).unwrap_or(std::ptr::null_mut())
}

unsafe extern "C" fn q_cleanup(td: *mut ThreadData) {
    let p = unlink_job(td as usize);
    if p == 0 {
        return;
    }
    // SAFETY: p came from Box::into_raw in q_init and was just unlinked from the map,
    // so this is the sole owner.
    let mut job = unsafe { Box::from_raw(p as *mut Job) };
    for mut slot in job.slots.drain(..) {
        // Nothing should be in flight here; drain anyway so no buffer is left referenced.
        let mut sink = Vec::new();
        while slot.queue.in_flight() > 0 {
            if slot.queue.commit().is_err() || slot.queue.reap(&mut sink, 1, None).is_err() {
                break;
            }
            sink.clear();
        }
        drop(slot);
    }
    release_all(&mut job, Some(td));
}

// ---------------------------------------------------------------------------------------
// The exported engine.

/// The engine descriptor fio looks up with `dlsym("ioengine")`. fio writes into it
/// (`dlhandle`, `flags`), hence `static mut`.
#[allow(non_upper_case_globals)]
#[unsafe(no_mangle)]
pub static mut ioengine: IoengineOps = IoengineOps {
    list: [std::ptr::null_mut(); 2],
    name: c"quring".as_ptr(),
    version: FIO_IOOPS_VERSION,
    // FIO_RAWIO: the engine does O_DIRECT I/O, so fio must hand it page-aligned io_u
    // buffers even without `direct=1` (fio aligns them only for odirect, mem_align or
    // this flag). Unaligned buffers cost a bounce buffer and a copy on every request.
    // FIO_ASYNCIO_SETS_ISSUE_TIME: the commit stamps issue times, one clock read per batch
    // (see `stamp_issue_time`) instead of fio's one per io_u.
    flags: FIO_RAWIO | FIO_DISKLESSIO | FIO_NODISKUTIL | FIO_NOEXTEND | FIO_NO_OFFLOAD | FIO_ASYNCIO_SETS_ISSUE_TIME,
    dlhandle: std::ptr::null_mut(),
    setup: None,
    init: Some(q_init),
    post_init: None,
    prep: None,
    queue: Some(q_queue),
    commit: Some(q_commit),
    getevents: Some(q_getevents),
    event: Some(q_event),
    errdetails: None,
    cancel: None,
    cleanup: Some(q_cleanup),
    open_file: Some(q_open_file),
    close_file: Some(q_close_file),
    invalidate: Some(q_invalidate),
    unlink_file: None,
    get_file_size: Some(q_get_file_size),
    prepopulate_file: None,
    terminate: None,
    iomem_alloc: None,
    iomem_free: None,
    io_u_init: Some(q_io_u_init),
    io_u_free: None,
    get_zoned_model: None,
    report_zones: None,
    reset_wp: None,
    get_max_open_zones: None,
    option_struct_size: std::mem::size_of::<options::EngineOptions>() as c_int,
    options: (&raw mut options::OPTIONS).cast::<FioOption>(),
};
