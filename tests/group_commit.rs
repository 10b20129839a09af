//! Asynchronous metadata write-back and group commit across queues (issue 14, items 3 and
//! 4): a flush's metadata writes and device flushes run on its own queue's ring without the
//! metadata lock, so while one queue's flush waits for the device every other queue keeps
//! completing requests, allocating ones included; and a flush that finds another queue's
//! write-back in flight that covers it joins it instead of writing and flushing again.
//!
//! A test hook stalls the first device flush it sees (as a slow device would) and releases
//! it when the test says so.

mod common;

use common::*;
use quring::image::{CacheMode, Image, Options};
use quring::io::hook::{Hook, IoHook, WriteData, WriteKind};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Stalls the first device flush issued after [`Stall::arm`] until [`Stall::release`].
#[derive(Default)]
struct Stall {
    st: Mutex<(bool, bool, bool)>, // (armed, stalled, released)
    cv: Condvar,
    next: AtomicU64,
}

impl Stall {
    fn arm(&self) {
        self.st.lock().unwrap().0 = true;
    }
    /// Waits until a flush is stalled (at most 10 s); returns whether one is.
    fn wait_stalled(&self) -> bool {
        let g = self.st.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, Duration::from_secs(10), |s| !s.1).unwrap();
        g.1
    }
    fn release(&self) {
        self.st.lock().unwrap().2 = true;
        self.cv.notify_all();
    }
}

impl IoHook for Stall {
    fn issued(&self, _kind: WriteKind, _off: u64, _data: WriteData<'_>) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
    fn completed(&self, _token: u64) {}
    fn flush_issued(&self) -> u64 {
        let mut g = self.st.lock().unwrap();
        if g.0 && !g.1 {
            // The first flush after arming stalls (on the thread that issues it, as long as
            // a device flush would take).
            g.1 = true;
            self.cv.notify_all();
            let (_g, _) = self.cv.wait_timeout_while(g, Duration::from_secs(20), |s| !s.2).unwrap();
        }
        self.next.fetch_add(1, Ordering::Relaxed)
    }
    fn flush_completed(&self, _token: u64, _ok: bool) {}
}

fn open(path: &std::path::Path, stall: &Arc<Stall>, cache: CacheMode) -> Arc<Image> {
    Image::open(path, &Options { cache, hook: Some(Hook(stall.clone())), ..Default::default() }).unwrap()
}

/// Submits `ops` on `q` and reaps until all completed or `limit` passed; returns how many
/// completed and their results.
fn run_for(q: &mut Queue, ops: &[Op], limit: Duration) -> Vec<Completion> {
    for (i, op) in ops.iter().enumerate() {
        // SAFETY: the callers' buffers outlive this function, which reaps every completion
        // it can before returning (the rest are reaped by the caller before they go).
        unsafe { q.submit(Request { op: *op, user_data: i as u64 }).unwrap() };
    }
    q.commit().unwrap();
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while out.len() < ops.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        q.reap(&mut out, 1, Some(left.min(Duration::from_millis(100)))).unwrap();
    }
    out
}

/// While queue A's flush stalls in the device, queue B reads, allocates clusters in the L2
/// table A is writing back and in a region that needs a new L2 table (which takes the
/// metadata lock), and zero-writes, all completing. Before the write-back left the metadata
/// lock, A held it for the whole flush and B's table allocation waited for A's device.
#[test]
fn a_queue_keeps_completing_while_another_queue_flush_waits_for_the_device() {
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    // 4 KiB clusters: an L2 table maps 2 MiB.
    create_qcow2(&path, &Qcow2Opts::cluster(4096), 64 * MIB);
    let stall = Arc::new(Stall::default());
    let img = open(&path, &stall, CacheMode::Writeback);
    let a_buf = pattern_bytes(1, 64 * KIB as usize);
    let b_bufs: Vec<Vec<u8>> = (0..4).map(|i| pattern_bytes(10 + i, 64 * KIB as usize)).collect();
    let mut read_back = vec![0u8; 64 * KIB as usize];
    let mut qb = Queue::new(&img, &QueueOptions::default()).unwrap();
    qb.write_at(&b_bufs[0], 8 * MIB).unwrap();

    let a = {
        let img = img.clone();
        let stall = stall.clone();
        let a_buf = a_buf.clone();
        std::thread::spawn(move || {
            let mut qa = Queue::new(&img, &QueueOptions::default()).unwrap();
            // Dirty metadata (new clusters in the first L2 table), then a flush that stalls.
            qa.write_at(&a_buf, 0).unwrap();
            stall.arm();
            qa.flush()
        })
    };
    assert!(stall.wait_stalled(), "queue A's flush never reached the device");
    let ops = [
        Op::Read { offset: 8 * MIB, buf: read_back.as_mut_ptr(), len: read_back.len() },
        Op::Write { offset: 12 * MIB, buf: b_bufs[1].as_ptr(), len: b_bufs[1].len() },
        Op::Write { offset: 64 * KIB, buf: b_bufs[2].as_ptr(), len: b_bufs[2].len() },
        Op::Write { offset: 40 * MIB, buf: b_bufs[3].as_ptr(), len: b_bufs[3].len() },
        Op::WriteZeroes { offset: 8 * MIB, len: 64 * KIB, unmap: true },
    ];
    let done = run_for(&mut qb, &ops, Duration::from_secs(5));
    let b_done = done.len();
    stall.release();
    let a_result = a.join().unwrap();
    let mut rest = done;
    while rest.len() < ops.len() {
        qb.reap(&mut rest, 1, Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(
        b_done,
        ops.len(),
        "queue B completed only {b_done} of {} requests while queue A's flush waited for the device",
        ops.len()
    );
    assert!(rest.iter().all(|c| c.result == 0), "{rest:?}");
    assert_eq!(read_back, b_bufs[0]);
    a_result.unwrap();
    qb.flush().unwrap();
    drop(qb);
    img.close().unwrap();
    drop(img);
    let chk = qemu_img(["check", &s(&path)]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
    let img = Image::open(&path, &Options { read_only: true, ..Default::default() }).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut got = vec![0u8; 64 * KIB as usize];
    for (off, want) in [(0, &a_buf), (64 * KIB, &b_bufs[2]), (12 * MIB, &b_bufs[1]), (40 * MIB, &b_bufs[3])] {
        q.read_at(&mut got, off).unwrap();
        assert!(got == *want, "data at {off:#x}");
    }
    q.read_at(&mut got, 8 * MIB).unwrap();
    assert!(got.iter().all(|&b| b == 0), "zeros at 8M");
}

/// Two queues flush at once: queue B's flush arrives while queue A's write-back is in
/// flight and started after B's data was written, so B joins it: one write-back, one set
/// of device flushes for both guest flushes, and B's data is durable with it.
#[test]
fn two_queues_flushing_at_once_share_one_write_back() {
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    create_qcow2(&path, &Qcow2Opts::cluster(65536), 64 * MIB);
    let stall = Arc::new(Stall::default());
    let img = open(&path, &stall, CacheMode::Writeback);
    let mut qb = Queue::new(&img, &QueueOptions::default()).unwrap();
    let b_data = pattern_bytes(2, 64 * KIB as usize);
    qb.write_at(&b_data, 16 * MIB).unwrap();
    let before = img.counters();
    let a = {
        let img = img.clone();
        let stall = stall.clone();
        std::thread::spawn(move || {
            let mut qa = Queue::new(&img, &QueueOptions::default()).unwrap();
            qa.write_at(&pattern_bytes(1, 64 * KIB as usize), 0).unwrap();
            stall.arm();
            let r = qa.flush();
            (r, qa.counters())
        })
    };
    assert!(stall.wait_stalled(), "queue A's flush never reached the device");
    // B's flush: A's write-back started after B's write completed, so it covers it.
    // SAFETY: a flush carries no buffer.
    unsafe { qb.submit(Request { op: Op::Flush, user_data: 7 }).unwrap() };
    qb.commit().unwrap();
    let mut out = Vec::new();
    qb.reap(&mut out, 0, Some(Duration::ZERO)).unwrap();
    assert!(out.is_empty(), "B's flush completed while A's write-back was stalled: {out:?}");
    stall.release();
    let (ra, ca) = a.join().unwrap();
    ra.unwrap();
    while out.is_empty() {
        qb.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(out, [Completion { user_data: 7, result: 0 }]);
    let cb = qb.counters();
    assert_eq!((cb.flush_joins, cb.writebacks, cb.device_flushes), (1, 0, 0), "queue B: {cb:?}");
    assert_eq!(ca.writebacks, 1, "queue A: {ca:?}");
    let after = img.counters();
    let flushes = after.device_flushes - before.device_flushes;
    let guest = after.guest_flushes - before.guest_flushes;
    assert_eq!(guest, 2);
    // The write-back's flushes (the one before the L2 slices, the one after) serve both.
    assert!(flushes <= 2, "{flushes} device flushes for 2 guest flushes: {after:?}");
    drop(qb);
    img.close().unwrap();
    drop(img);
    let chk = qemu_img(["check", &s(&path)]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
}

/// A wake from another queue's thread reaches a parked request through the rings, with no
/// eventfd write: queue B's flush joins queue A's write-back and parks; A's thread ends the
/// write-back and wakes B by an `IORING_OP_MSG_RING` on A's own ring (counted per thread
/// by `quring::meta::waiters`), and B's flush completes.
#[test]
fn a_wake_from_another_queue_reaches_a_parked_flush_without_an_eventfd_write() {
    use quring::meta::waiters::{eventfd_writes_on_this_thread, ring_wakes_on_this_thread};
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    create_qcow2(&path, &Qcow2Opts::cluster(65536), 64 * MIB);
    let stall = Arc::new(Stall::default());
    let img = open(&path, &stall, CacheMode::Writeback);
    let mut qb = Queue::new(&img, &QueueOptions::default()).unwrap();
    qb.write_at(&pattern_bytes(3, 64 * KIB as usize), 16 * MIB).unwrap();
    let a = {
        let img = img.clone();
        let stall = stall.clone();
        std::thread::spawn(move || {
            let mut qa = Queue::new(&img, &QueueOptions::default()).unwrap();
            qa.write_at(&pattern_bytes(4, 64 * KIB as usize), 0).unwrap();
            let (writes, messages) = (eventfd_writes_on_this_thread(), ring_wakes_on_this_thread());
            stall.arm();
            let r = qa.flush();
            // Counted before the queue's drop, which may wake by eventfd (no queue call).
            let counts = (eventfd_writes_on_this_thread() - writes, ring_wakes_on_this_thread() - messages);
            (r, counts)
        })
    };
    assert!(stall.wait_stalled(), "queue A's flush never reached the device");
    // SAFETY: a flush carries no buffer.
    unsafe { qb.submit(Request { op: Op::Flush, user_data: 9 }).unwrap() };
    qb.commit().unwrap();
    let mut out = Vec::new();
    qb.reap(&mut out, 0, Some(Duration::ZERO)).unwrap();
    assert!(out.is_empty(), "B's flush completed while A's write-back was stalled: {out:?}");
    stall.release();
    let (ra, (writes, messages)) = a.join().unwrap();
    ra.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.is_empty() && Instant::now() < deadline {
        qb.reap(&mut out, 1, Some(Duration::from_millis(100))).unwrap();
    }
    assert_eq!(out, [Completion { user_data: 9, result: 0 }], "B's parked flush was not woken");
    assert_eq!(qb.counters().flush_joins, 1, "B's flush did not park on A's write-back");
    assert_eq!(writes, 0, "queue A's thread woke B by eventfd write(2)");
    assert!(messages >= 1, "queue A's thread sent no MSG_RING wake");
    drop(qb);
    img.close().unwrap();
    drop(img);
    let chk = qemu_img(["check", &s(&path)]);
    assert_eq!(chk.code, Some(0), "{}", chk.describe());
}
