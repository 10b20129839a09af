//! Concurrent writers through the library API: 4 threads, each with its own
//! `Queue` on one shared `Arc<Image>`, at queue depth > 1.
//!
//! Layout of the virtual disk (seeded, deterministic final content):
//! - a shared region of 4 KiB blocks, each owned by exactly one thread chosen
//!   by hash, so the blocks of one cluster belong to different threads and
//!   the same cluster is allocated concurrently by several queues;
//! - one private region per thread with writes, zero writes and discards of
//!   varied sizes.
//!
//! Within a thread, requests in flight at the same time never overlap (phases
//! are separated by reaping everything), so the expected content is a plain
//! model. After closing, the image must equal a raw file written from the
//! model (`qemu-img compare`) and `qemu-img check` must pass.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::path::Path;
use std::sync::{Arc, Barrier};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const THREADS: usize = 4;
const BLOCK: u64 = 4 * KIB;
const SHARED: u64 = 8 * MIB;
const PRIVATE: u64 = 4 * MIB;
const VIRT: u64 = SHARED + THREADS as u64 * PRIVATE + 4 * MIB;
const DEPTH: usize = 32;

#[derive(Clone, Debug)]
enum Act {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
}

fn owner(seed: u64, block: u64) -> usize {
    let mut st = seed ^ block.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (splitmix64(&mut st) % THREADS as u64) as usize
}

/// The phases of thread `t`: requests of one phase may all be in flight at once.
fn plan(seed: u64, t: usize, cluster: u64) -> Vec<Vec<Act>> {
    let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let blocks: Vec<u64> = (0..SHARED / BLOCK).filter(|&b| owner(seed, b) == t).collect();
    let data = |rng: &mut Rng, len: u64| pattern_bytes(rng.next(), len as usize);
    // Phase 1: every owned shared block, plus consecutive extents of the
    // private region.
    let mut p1: Vec<Act> = blocks.iter().map(|&b| Act::Write { off: b * BLOCK, data: data(&mut rng, BLOCK) }).collect();
    let base = SHARED + t as u64 * PRIVATE;
    let mut pos = base;
    let mut extents = Vec::new();
    while pos < base + PRIVATE {
        let len = (512 * (1 + rng.below(2 * cluster / 512))).min(base + PRIVATE - pos);
        if rng.below(4) != 0 {
            p1.push(Act::Write { off: pos, data: data(&mut rng, len) });
        }
        extents.push((pos, len));
        pos += len + 512 * rng.below(16);
    }
    // Interleave so that shared and private requests mix in flight.
    shuffle(&mut rng, &mut p1);
    // Phase 2: rewrite or zero a part of the owned blocks; zero/discard some
    // private extents and whole private clusters; rewrite others.
    let mut p2 = Vec::new();
    for &b in &blocks {
        match rng.below(6) {
            0 | 1 => p2.push(Act::Write { off: b * BLOCK, data: data(&mut rng, BLOCK) }),
            2 => p2.push(Act::Zero { off: b * BLOCK, len: BLOCK, unmap: rng.below(2) == 0 }),
            _ => {}
        }
    }
    let mut used_clusters = std::collections::HashSet::new();
    for &(off, len) in &extents {
        let first = off / cluster;
        let last = (off + len - 1) / cluster;
        match rng.below(5) {
            0 => p2.push(Act::Zero { off, len, unmap: rng.below(2) == 0 }),
            1 => p2.push(Act::Write { off, data: data(&mut rng, len) }),
            _ => continue,
        }
        for c in first..=last {
            used_clusters.insert(c);
        }
    }
    // Whole-cluster discards (deterministic result: zeros) on clusters no
    // other phase-2 request touches.
    for c in base / cluster..(base + PRIVATE) / cluster {
        if !used_clusters.contains(&c) && rng.below(3) == 0 {
            p2.push(Act::Discard { off: c * cluster, len: cluster });
        }
    }
    shuffle(&mut rng, &mut p2);
    vec![p1, p2]
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

fn apply_model(model: &mut [u8], act: &Act) {
    match act {
        Act::Write { off, data } => model[*off as usize..*off as usize + data.len()].copy_from_slice(data),
        Act::Zero { off, len, .. } | Act::Discard { off, len } => model[*off as usize..(*off + *len) as usize].fill(0),
    }
}

/// Runs one phase on `q` keeping up to DEPTH requests in flight.
fn run_phase(q: &mut Queue, t: usize, phase: usize, acts: &[Act]) {
    let mut next = 0;
    let mut in_flight = 0;
    let mut done = Vec::<Completion>::new();
    let mut completed = 0;
    while completed < acts.len() {
        while next < acts.len() && in_flight < DEPTH {
            let op = match &acts[next] {
                Act::Write { off, data } => Op::Write { offset: *off, buf: data.as_ptr(), len: data.len() },
                Act::Zero { off, len, unmap } => Op::WriteZeroes { offset: *off, len: *len, unmap: *unmap },
                Act::Discard { off, len } => Op::Discard { offset: *off, len: *len },
            };
            // SAFETY: `acts` (and so every buffer) outlives the phase: we
            // reap every request before returning.
            unsafe { q.submit(Request { op, user_data: next as u64 }) }
                .unwrap_or_else(|e| panic!("thread {t} phase {phase}: submit {:?} failed: {e}", acts[next]));
            next += 1;
            in_flight += 1;
        }
        q.commit().unwrap();
        done.clear();
        q.reap(&mut done, 1, None).unwrap();
        for c in &done {
            if c.result != 0 {
                let detail = q.error_detail(c.user_data);
                panic!(
                    "thread {t} phase {phase}: request {:?} failed: {} ({detail:?})",
                    acts[c.user_data as usize], c.result
                );
            }
        }
        in_flight -= done.len();
        completed += done.len();
    }
    q.flush().unwrap_or_else(|e| panic!("thread {t} phase {phase}: flush: {e}"));
}

fn concurrency_case(seed: u64, opts: Qcow2Opts) {
    let d = tempdir();
    let img_path = d.path().join("img.qcow2");
    let cluster = opts.cluster_size as u64;
    // Pre-existing data in part of the shared region and private region 0.
    let pre = vec![
        "write -P 0x5a 0 1M".to_string(),
        format!("write -P 0x6b {} 640k", SHARED + 100 * KIB),
        format!("write -P 0x7c {} 64k", 4 * MIB + 32 * KIB),
    ];
    build_qcow2(&img_path, &opts, VIRT, &pre);
    let mut model = vec![0u8; VIRT as usize];
    model[..MIB as usize].fill(0x5a);
    model[(SHARED + 100 * KIB) as usize..(SHARED + 740 * KIB) as usize].fill(0x6b);
    model[(4 * MIB + 32 * KIB) as usize..(4 * MIB + 96 * KIB) as usize].fill(0x7c);

    let plans: Vec<Vec<Vec<Act>>> = (0..THREADS).map(|t| plan(seed, t, cluster)).collect();
    let img = Image::open(&img_path, &Options::default()).expect("open read-write");
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|sc| {
        for (t, phases) in plans.iter().enumerate() {
            let img = img.clone();
            let barrier = barrier.clone();
            sc.spawn(move || {
                let mut q = Queue::new(&img, &QueueOptions::default()).expect("queue");
                for (p, acts) in phases.iter().enumerate() {
                    barrier.wait();
                    run_phase(&mut q, t, p, acts);
                }
            });
        }
    });
    img.close().expect("close");
    drop(img);
    // Threads touch disjoint blocks, so phase order is the only ordering.
    for p in 0..2 {
        for phases in &plans {
            for a in &phases[p] {
                apply_model(&mut model, a);
            }
        }
    }
    let raw = d.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    verify(&img_path, &raw, seed, &opts);
}

fn verify(img: &Path, raw: &Path, seed: u64, opts: &Qcow2Opts) {
    let ctx = format!("seed {seed}, image -o {}", opts.create_options());
    let cmp = qemu_img(["compare", "-f", "raw", "-F", "qcow2", &s(raw), &s(img)]);
    let check = qemu_img(["check", &s(img)]);
    assert!(cmp.success(), "{ctx}: image differs from the model:\n{}\ncheck:\n{}", cmp.describe(), check.describe());
    assert!(check.success(), "{ctx}: qemu-img check failed:\n{}", check.describe());
}

/// The cases run one after another (each already runs 4 threads at queue depth 32).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn standard_64k() {
    let _g = serial();
    for seed in [1, 2] {
        concurrency_case(seed, Qcow2Opts::cluster(65536));
    }
}

#[test]
fn extended_l2_64k() {
    let _g = serial();
    for seed in [3, 4] {
        concurrency_case(seed, Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(65536) });
    }
}

#[test]
fn refcount_bits_1() {
    let _g = serial();
    concurrency_case(5, Qcow2Opts { refcount_bits: 1, ..Qcow2Opts::cluster(65536) });
}

#[test]
fn small_clusters_4k() {
    let _g = serial();
    // 4 KiB clusters: every shared block is a cluster of its own, but L2
    // slices and refcount blocks are shared by all threads.
    concurrency_case(6, Qcow2Opts { refcount_bits: 2, ..Qcow2Opts::cluster(4096) });
}
