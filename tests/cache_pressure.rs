//! Reads under cache pressure (issue 14): many queues, an L2 cache of one set (8 slices)
//! against an image with several times that many slices, and writers that allocate
//! clusters (change L2 entries) while readers read. Reads whose slice the cache cannot
//! take load a private copy (`queue/read.rs`); this checks that such a copy is never stale:
//! a read submitted after a write of the same block completed returns that write's data
//! (or a later one), never zeros or another block's data; and that the private path was
//! taken at all.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const READERS: usize = 6;
const WRITERS: usize = 2;
const DEPTH: usize = 16;

/// Block `b` written with generation `g`: (b, g) as two u64 repeated.
fn pattern(b: u64, g: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        v.extend_from_slice(&b.to_le_bytes());
        v.extend_from_slice(&g.to_le_bytes());
    }
    v
}

/// The generation a read of block `b` returned: 0 for zeros; panics on anything that is
/// not one whole write of block `b`.
fn generation(b: u64, data: &[u8], ctx: &str) -> u64 {
    if data.iter().all(|&x| x == 0) {
        return 0;
    }
    let g = u64::from_le_bytes(data[8..16].try_into().unwrap());
    assert!(data == pattern(b, g).as_slice(), "{ctx}: block {b} holds neither zeros nor one write of it");
    g
}

fn aligned(n: usize) -> Vec<u8> {
    // The engine bounces what O_DIRECT cannot take.
    vec![0u8; n]
}

fn wait_one(q: &mut Queue, out: &mut Vec<Completion>) {
    while out.is_empty() {
        q.reap(out, 1, None).expect("reap");
    }
}

fn case(opts: Qcow2Opts, size: u64, secs: u64) {
    let d = tempdir();
    let path = d.path().join("p.qcow2");
    build_qcow2(&path, &opts, size, &[]);
    let blocks = size / BLOCK as u64;
    let cluster_blocks = (opts.cluster_size as usize / BLOCK).max(1) as u64;
    // Every other cluster holds generation 1; the rest is unallocated until the writers
    // allocate it.
    {
        let img = Image::open(&path, &Options::default()).expect("open");
        let mut q = Queue::new(&img, &QueueOptions::default()).expect("queue");
        for b in (0..blocks).filter(|b| (b / cluster_blocks).is_multiple_of(2)) {
            q.write_at(&pattern(b, 1), b * BLOCK as u64).expect("prefill");
        }
        drop(q);
        img.close().expect("close");
    }
    let slice = 4096u64;
    let img = Image::open(&path, &Options { l2_cache_size: Some(8 * slice), ..Options::default() }).expect("open");
    let done: Arc<Vec<AtomicU64>> = Arc::new(
        (0..blocks).map(|b| AtomicU64::new(if (b / cluster_blocks).is_multiple_of(2) { 1 } else { 0 })).collect(),
    );
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|sc| {
        for w in 0..WRITERS {
            let (img, done, stop) = (img.clone(), done.clone(), &stop);
            sc.spawn(move || {
                // Before the queue: see the readers.
                let mut batch: Vec<(u64, u64, Vec<u8>)> = Vec::new();
                let mut q = Queue::new(&img, &QueueOptions::default()).expect("queue");
                let mut rng = Rng(0xc0ffee + w as u64);
                let mut g = 2u64;
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // A batch of writes of this writer's blocks, then their completions.
                    batch.clear();
                    for _ in 0..DEPTH / 2 {
                        let b = rng.below(blocks / WRITERS as u64) * WRITERS as u64 + w as u64;
                        if batch.iter().any(|(x, _, _)| *x == b) {
                            continue;
                        }
                        batch.push((b, g, pattern(b, g)));
                        g += 1;
                    }
                    for (i, (b, _, data)) in batch.iter().enumerate() {
                        let op = Op::Write { offset: b * BLOCK as u64, buf: data.as_ptr(), len: BLOCK };
                        // SAFETY: `data` lives in `batch` until every completion is reaped below.
                        unsafe { q.submit(Request { op, user_data: i as u64 }) }.expect("submit write");
                    }
                    q.commit().expect("commit");
                    let mut left = batch.len();
                    while left > 0 {
                        out.clear();
                        wait_one(&mut q, &mut out);
                        for c in &out {
                            assert_eq!(c.result, 0, "write failed");
                            let (b, g, _) = &batch[c.user_data as usize];
                            done[*b as usize].store(*g, Ordering::Release);
                            left -= 1;
                        }
                    }
                }
            });
        }
        for r in 0..READERS {
            let (img, done, reads) = (img.clone(), done.clone(), &reads);
            sc.spawn(move || {
                // Declared before the queue: dropped after it, so a failed assertion's
                // unwinding waits for the reads in flight before it frees their buffers.
                let mut bufs: Vec<Vec<u8>> = (0..DEPTH).map(|_| aligned(BLOCK)).collect();
                let mut q = Queue::new(&img, &QueueOptions::default()).expect("queue");
                let mut rng = Rng(0xbeef + r as u64);
                // Per slot: the block read and the generation completed before submission.
                let mut what = vec![(0u64, 0u64); DEPTH];
                let mut out = Vec::new();
                let mut submit = |q: &mut Queue, i: usize, bufs: &mut Vec<Vec<u8>>, what: &mut Vec<(u64, u64)>| {
                    let b = rng.below(blocks);
                    what[i] = (b, done[b as usize].load(Ordering::Acquire));
                    let op = Op::Read { offset: b * BLOCK as u64, buf: bufs[i].as_mut_ptr(), len: BLOCK };
                    // SAFETY: bufs[i] is not touched until this request's completion.
                    unsafe { q.submit(Request { op, user_data: i as u64 }) }.expect("submit read");
                };
                for i in 0..DEPTH {
                    submit(&mut q, i, &mut bufs, &mut what);
                }
                q.commit().expect("commit");
                while Instant::now() < deadline {
                    out.clear();
                    wait_one(&mut q, &mut out);
                    for c in out.drain(..) {
                        let i = c.user_data as usize;
                        assert_eq!(c.result, 0, "read failed");
                        let (b, min) = what[i];
                        let g = generation(b, &bufs[i], "reader");
                        assert!(
                            g >= min,
                            "block {b}: read generation {g} after generation {min} was written (a stale L2 entry)"
                        );
                        reads.fetch_add(1, Ordering::Relaxed);
                        submit(&mut q, i, &mut bufs, &mut what);
                    }
                    q.commit().expect("commit");
                }
                while q.in_flight() > 0 {
                    out.clear();
                    q.reap(&mut out, 1, None).expect("reap");
                }
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let c = img.counters();
    assert!(reads.load(Ordering::Relaxed) > 1000, "too few reads to say anything");
    assert!(c.l2_private_loads > 0, "no read took the private slice path: {c:?}");
    img.close().expect("close");
    drop(img);
    let r = qemu_img(["check", path.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "qemu-img check after the run:\n{}", r.describe());
}

#[test]
fn private_slices_are_never_stale_4k_clusters() {
    case(Qcow2Opts { cluster_size: 4096, ..Default::default() }, 64 << 20, 4);
}

#[test]
fn private_slices_are_never_stale_extended_l2() {
    case(Qcow2Opts { cluster_size: 16384, extended_l2: true, ..Default::default() }, 128 << 20, 4);
}
