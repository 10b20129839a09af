//! The shape of a VMM's block device on quring, in one file.
//!
//! A VMM has one I/O thread per virtqueue (or iothread). Each thread owns one quring
//! [`Queue`] (an io_uring; queues are per thread and not `Send`), takes guest requests from
//! its virtqueue (here: a crossbeam channel fed by `main`), submits them without blocking,
//! and finishes them when [`Queue::reap`] returns their completions. The thread sleeps in
//! poll(2) on the queue's ring fd, which is readable when completions wait.
//!
//! Run: `cargo run --example virtio_blk_loop -- IMAGE.qcow2 [THREADS]` on a scratch image of at
//! least 64 MiB. Each thread writes its own region with a known pattern, flushes, reads it
//! back and checks every byte; the program exits non-zero on any mismatch.

use crossbeam_channel::{Receiver, TryRecvError, bounded};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use quring::image::{CacheMode, Image, Options};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

/// A virtio-blk-like request: what the VMM parsed out of a descriptor chain.
enum BlkRequest {
    /// VIRTIO_BLK_T_IN: read `len` bytes at `sector`; `expect` is what we wrote there.
    Read { sector: u64, len: usize, expect: Vec<u8> },
    /// VIRTIO_BLK_T_OUT: write `data` at `sector`.
    Write { sector: u64, data: Vec<u8> },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
}

/// A request in flight. Its buffer must not move or be freed until the completion arrives:
/// the kernel reads or writes it asynchronously (a `Vec`'s heap buffer does not move when the
/// `Vec` is moved into the map).
struct InFlight {
    req: BlkRequest,
    buf: Vec<u8>,
}

/// What one I/O thread did.
#[derive(Default, Debug)]
struct Report {
    completed: u64,
    verified_bytes: u64,
    mismatches: u64,
    errors: u64,
    /// How often poll(2) on the ring fd woke the loop up.
    ring_wakeups: u64,
}

/// Requests a thread keeps in flight at most (a virtqueue's size plays this role).
const QUEUE_DEPTH: usize = 32;

/// One I/O thread: the event loop a VMM would run per virtqueue.
fn io_thread(image: Arc<Image>, requests: Receiver<BlkRequest>) -> Report {
    let mut queue = Queue::new(&image, &QueueOptions::default()).expect("queue");
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut completions: Vec<Completion> = Vec::new();
    let mut report = Report::default();
    let mut next_tag = 0u64;
    let mut closed = false;
    // A flush waits here until the writes before it completed (a guest's flush only covers
    // writes it saw complete; holding it also orders our reads after our writes).
    let mut held: Option<BlkRequest> = None;

    while !closed || !in_flight.is_empty() || held.is_some() {
        // 1. Take new requests (the virtqueue's available ring) while there is room.
        while in_flight.len() < QUEUE_DEPTH {
            let req = match held.take() {
                Some(r) => r,
                // Block for work only when nothing is in flight.
                None if in_flight.is_empty() => match requests.recv() {
                    Ok(r) => r,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                },
                None => match requests.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                },
            };
            if matches!(req, BlkRequest::Flush) && !in_flight.is_empty() {
                held = Some(req);
                break;
            }
            let mut job = InFlight { buf: Vec::new(), req };
            let op = match &job.req {
                BlkRequest::Read { sector, len, .. } => {
                    job.buf = vec![0u8; *len];
                    Op::Read { offset: sector * 512, buf: job.buf.as_mut_ptr(), len: *len }
                }
                BlkRequest::Write { sector, data } => {
                    Op::Write { offset: sector * 512, buf: data.as_ptr(), len: data.len() }
                }
                BlkRequest::Flush => Op::Flush,
            };
            let tag = next_tag;
            next_tag += 1;
            // SAFETY: the buffer belongs to `job`, which stays in `in_flight` (its heap data
            // unmoved) until this tag's completion is reaped below.
            unsafe { queue.submit(Request { op, user_data: tag }) }.expect("submit");
            in_flight.insert(tag, job);
        }
        // 2. One system call for everything queued.
        queue.commit().expect("commit");

        // 3. Sleep until the ring has completions. The timeout is short because requests
        //    waiting on another queue's metadata I/O are retried by `reap`, not signalled
        //    on the ring fd, and because new requests may arrive on the channel.
        if !in_flight.is_empty() {
            // SAFETY: the ring fd stays open for as long as `queue`, which outlives this call.
            let fd = unsafe { BorrowedFd::borrow_raw(queue.ring_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(1u8)).unwrap_or(0) > 0 {
                report.ring_wakeups += 1;
            }
        }

        // 4. Finish what completed (the VMM writes the status byte and the used ring here).
        completions.clear();
        queue.reap(&mut completions, 0, Some(Duration::ZERO)).expect("reap");
        for c in &completions {
            let job = in_flight.remove(&c.user_data).expect("known tag");
            report.completed += 1;
            if c.result != 0 {
                report.errors += 1;
                continue;
            }
            if let BlkRequest::Read { expect, .. } = &job.req {
                report.verified_bytes += expect.len() as u64;
                if job.buf != *expect {
                    report.mismatches += 1;
                }
            }
        }
    }
    report
}

/// The byte written at `offset` by thread `t`.
fn pattern(t: u64, offset: u64) -> u8 {
    (offset / 512).wrapping_mul(31).wrapping_add(offset % 512).wrapping_add(t * 101) as u8
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: virtio_blk_loop IMAGE.qcow2 [THREADS]");
        std::process::exit(2);
    };
    let threads: u64 = args.get(2).map_or(2, |t| t.parse().expect("THREADS"));

    let image = Image::open(path.as_ref(), &Options { cache: CacheMode::Writeback, ..Default::default() })
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let region = image.size() / threads / 512 * 512;
    assert!(region >= 4 << 20, "image too small");

    // Start one I/O thread per "virtqueue".
    let mut workers = Vec::new();
    let mut feeds = Vec::new();
    for _ in 0..threads {
        let (tx, rx) = bounded::<BlkRequest>(64);
        let image = image.clone();
        workers.push(std::thread::spawn(move || io_thread(image, rx)));
        feeds.push(tx);
    }

    // Feed them: writes of 4 KiB to 60 KiB, separated by gaps, then a flush, then reads of
    // the same ranges (ranges in flight together never overlap).
    for (t, tx) in feeds.iter().enumerate() {
        let t = t as u64;
        let base = t * region;
        let mut ranges = Vec::new();
        let mut off = base;
        let mut n = 0u64;
        while off + (128 << 10) < base + region.min(16 << 20) {
            let len = (1 + n % 15) * 4096;
            ranges.push((off, len as usize));
            off += len + 512 * (1 + n % 7);
            n += 1;
        }
        for &(off, len) in &ranges {
            let data = (0..len as u64).map(|i| pattern(t, off + i)).collect();
            tx.send(BlkRequest::Write { sector: off / 512, data }).unwrap();
        }
        tx.send(BlkRequest::Flush).unwrap();
        for &(off, len) in &ranges {
            let expect = (0..len as u64).map(|i| pattern(t, off + i)).collect();
            tx.send(BlkRequest::Read { sector: off / 512, len, expect }).unwrap();
        }
    }
    drop(feeds);

    let mut failed = false;
    for (t, w) in workers.into_iter().enumerate() {
        let r = w.join().expect("io thread panicked");
        println!("thread {t}: {r:?}");
        failed |= r.mismatches > 0 || r.errors > 0 || r.verified_bytes == 0;
    }
    let c = image.counters();
    image.close().expect("close");
    if failed {
        eprintln!("virtio_blk_loop: FAILED");
        std::process::exit(1);
    }
    println!("virtio_blk_loop: ok ({threads} threads; counters: {c:?})");
}
