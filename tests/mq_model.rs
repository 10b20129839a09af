//! Multi-queue model test (issue 12): N threads (2..8), each with its own `Queue` on one
//! shared `Arc<Image>` opened with tiny caches, submit random writes, zero writes (with
//! and without unmap), discards, flushes and reads at queue depth > 1 over ranges that
//! overlap between threads and within a thread, at every alignment class (inside one
//! subcluster, straddling subclusters or clusters, whole subclusters, whole clusters,
//! multi-cluster). Images: 512 B, 4 KiB, 64 KiB and 2 MiB clusters, standard and extended
//! L2, 1-bit refcounts, a v2 image, lazy refcounts, overlays over a raw backing file, and
//! images that start with compressed and snapshot-shared clusters (built with
//! qemu-img/qemu-io first).
//!
//! The model, per 512-byte sector (every sector written by an op holds `(op id, sector)`
//! in all its 16-byte units, so a torn, misplaced or stale sector is recognized):
//!
//! * Every op gets a submit stamp (taken before `Queue::submit`) and a completion stamp
//!   (taken after `Queue::reap` returned it) from one global counter. Op X happened before
//!   op Y when X's completion stamp is below Y's submit stamp.
//! * Effects: a write sets its sectors to its own value; a zero write (with or without
//!   unmap) sets its sectors to zeros; a discard sets the sectors of every *whole* cluster
//!   it covers to zeros (v3 images, and v2 images without a backing file: the engine's
//!   zero flag / unallocated entry) and leaves every other sector unchanged (partial
//!   clusters are ignored, as QEMU does; on v2 with a backing file discards are ignored).
//!   Reads and flushes change nothing.
//! * At a batch boundary (every queue idle) a sector may hold the value of any op that
//!   affected it and was not followed by another op affecting it (no Y with
//!   X.complete < Y.submit): the last completed one, or any of those in flight together.
//!   A sector no op affected keeps the value read at the previous boundary (which is
//!   then the one value it may hold).
//! * A read during the batch may return, per sector, the boundary value when no op
//!   affecting the sector completed before the read was submitted, or the value of any op
//!   X affecting it that was submitted before the read completed and was not overwritten
//!   before the read started (no Y with X.complete < Y.submit and Y.complete < read.submit).
//!
//! After every batch: the engine's own audit (`Image::audit`: refcount of every cluster
//! equal to its references, cached metadata equal to the disk) must be clean, then every
//! sector that was ever touched is read back through a queue and checked. Sometimes the
//! image is closed and reopened at a boundary. At the end: close, `qemu-img check` exit 0
//! with no leaks and no corruptions, and `qemu-img convert -O raw` equal to the model in
//! every sector.
//!
//! The suite runs the matrix once with fixed seeds (bounded to a couple of minutes). The
//! campaign (scripts/mq-campaign.sh) runs fresh seeds for a time:
//! `QURING_MQ_SEED=<first seed> QURING_MQ_QUEUES=<n> QURING_MQ_SECS=<seconds>`; one
//! seed replays one run exactly in its op plan (`QURING_MQ_SECS=0`: that seed only;
//! `QURING_MQ_CONFIG=<name>` forces a configuration).

mod common;

use common::*;
use quring::image::{CacheMode, Image, Options};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

// Sector values.
const ZERO: u64 = 0;
const GARBAGE: u64 = u64::MAX;
const BACKING: u64 = 0x1000;
const FIRST_OP: u64 = 0x10000;

/// A sector filled with byte `b` by qemu-io (`write -P b`).
fn konst(b: u8) -> u64 {
    0x100 | b as u64
}

fn describe(v: u64) -> String {
    match v {
        ZERO => "zeros".into(),
        GARBAGE => "garbage (torn, misplaced or unknown)".into(),
        BACKING => "backing data".into(),
        v if v & !0xff == 0x100 => format!("qemu-io pattern {:#04x}", v & 0xff),
        v => format!("op {:#x}", v),
    }
}

fn fill_sector(buf: &mut [u8], id: u64, sector: u64) {
    for ch in buf.chunks_exact_mut(16) {
        ch[..8].copy_from_slice(&id.to_le_bytes());
        ch[8..].copy_from_slice(&sector.to_le_bytes());
    }
}

fn parse_sector(buf: &[u8], sector: u64) -> u64 {
    let b0 = buf[0];
    if buf.iter().all(|&b| b == b0) {
        return if b0 == 0 { ZERO } else { konst(b0) };
    }
    let id = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let ok = id >= BACKING
        && buf.chunks_exact(16).all(|ch| {
            u64::from_le_bytes(ch[..8].try_into().unwrap()) == id
                && u64::from_le_bytes(ch[8..].try_into().unwrap()) == sector
        });
    if ok { id } else { GARBAGE }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// A fresh image.
    Empty,
    /// Compressed clusters and clusters shared with an internal snapshot (qemu-io).
    Shared,
    /// An overlay over a raw backing file, with some clusters partly written (qemu-io).
    Backing,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    cluster: u64,
    ext: bool,
    refcount_bits: u32,
    v2: bool,
    lazy: bool,
    start: Start,
    size: u64,
    /// External data file next to the image (Some(data_file_raw)).
    data_file: Option<bool>,
}

const fn cfg(name: &'static str, cluster: u64, ext: bool, start: Start, size: u64) -> Config {
    Config { name, cluster, ext, refcount_bits: 16, v2: false, lazy: false, start, size, data_file: None }
}

const CONFIGS: &[Config] = &[
    cfg("c512", 512, false, Start::Empty, 4 * MIB),
    cfg("c4k", 4 * KIB, false, Start::Empty, 16 * MIB),
    Config { refcount_bits: 1, ..cfg("c4k-rc1", 4 * KIB, false, Start::Empty, 16 * MIB) },
    cfg("c4k-shared", 4 * KIB, false, Start::Shared, 16 * MIB),
    cfg("c4k-backing", 4 * KIB, false, Start::Backing, 16 * MIB),
    cfg("c64k", 64 * KIB, false, Start::Empty, 64 * MIB),
    cfg("c64k-ext", 64 * KIB, true, Start::Empty, 64 * MIB),
    cfg("c64k-ext-shared", 64 * KIB, true, Start::Shared, 64 * MIB),
    cfg("c64k-ext-backing", 64 * KIB, true, Start::Backing, 16 * MIB),
    Config { v2: true, ..cfg("c64k-v2", 64 * KIB, false, Start::Empty, 32 * MIB) },
    Config { v2: true, ..cfg("c64k-v2-backing", 64 * KIB, false, Start::Backing, 16 * MIB) },
    Config { lazy: true, ..cfg("c64k-lazy", 64 * KIB, false, Start::Empty, 32 * MIB) },
    Config { refcount_bits: 1, ..cfg("c64k-ext-rc1", 64 * KIB, true, Start::Empty, 32 * MIB) },
    cfg("c2m", 2 * MIB, false, Start::Empty, 64 * MIB),
    cfg("c2m-ext", 2 * MIB, true, Start::Empty, 64 * MIB),
    cfg("c2m-ext-shared", 2 * MIB, true, Start::Shared, 64 * MIB),
    // External data files (issue 17): new clusters at their guest offsets under the fill
    // claim, no refcounts for data, raw data files punched by zero writes and discards.
    Config { data_file: Some(false), ..cfg("c64k-datafile", 64 * KIB, false, Start::Empty, 32 * MIB) },
    Config { data_file: Some(true), ..cfg("c64k-ext-datafile-raw", 64 * KIB, true, Start::Empty, 32 * MIB) },
    Config { data_file: Some(false), ..cfg("c4k-datafile-backing", 4 * KIB, false, Start::Backing, 16 * MIB) },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zero { unmap: bool },
    Discard,
    Flush,
    Read,
}

/// One op of a batch, with its stamps.
#[derive(Clone, Debug)]
struct Rec {
    id: u64,
    thread: usize,
    kind: Kind,
    off: u64,
    len: u64,
    s: u64,
    c: u64,
    /// What a read returned.
    data: Vec<u8>,
}

/// One run's parameters.
#[derive(Clone, Debug)]
struct RunSpec {
    cfg: Config,
    seed: u64,
    queues: usize,
    batches: usize,
    ops: usize,
}

/// What a run did.
#[derive(Default, Debug)]
struct Outcome {
    ops: u64,
    audits: u64,
    sectors_checked: u64,
}

/// The image under test and the model of its content.
struct World {
    cfg: Config,
    path: std::path::PathBuf,
    opts: Options,
    /// The one value each sector holds at the last boundary.
    model: Vec<u64>,
    /// Clusters that may hold something other than their initial value.
    touched: BTreeSet<u64>,
    hot: Vec<u64>,
    backing: bool,
}

impl World {
    fn sectors(&self) -> u64 {
        self.cfg.size / SECTOR
    }
    fn clusters(&self) -> u64 {
        self.cfg.size / self.cfg.cluster
    }
}

fn qcow2_opts(c: &Config) -> Qcow2Opts {
    Qcow2Opts {
        cluster_size: c.cluster as u32,
        refcount_bits: c.refcount_bits,
        extended_l2: c.ext,
        compat: if c.v2 { Compat::V010 } else { Compat::V11 },
        lazy_refcounts: c.lazy,
        data_file: c.data_file.map(|raw| ("mq.data", raw)),
        ..Default::default()
    }
}

/// Applies a qemu-io `write [-c] -P b off len` to the model.
fn qemu_write(model: &mut [u64], touched: &mut BTreeSet<u64>, cs: u64, b: u8, off: u64, len: u64) {
    for s in off / SECTOR..(off + len) / SECTOR {
        model[s as usize] = konst(b);
    }
    for c in off / cs..=(off + len - 1) / cs {
        touched.insert(c);
    }
}

/// Builds the image of a run with qemu-img / qemu-io and the model of its initial content.
fn build(dir: &Path, c: &Config, rng: &mut Rng) -> World {
    let path = dir.join("mq.qcow2");
    let mut o = qcow2_opts(c);
    let sectors = c.size / SECTOR;
    let cs = c.cluster;
    let clusters = c.size / cs;
    let mut model = vec![ZERO; sectors as usize];
    let mut touched = BTreeSet::new();
    // Hot clusters, spread over the disk (and so over L2 slices): most ops start there.
    let nhot = (clusters / 2).clamp(1, 12);
    let mut hot: Vec<u64> = (0..nhot).map(|_| rng.below(clusters)).collect();
    hot.sort_unstable();
    hot.dedup();
    let backing = c.start == Start::Backing;
    if backing {
        let raw = dir.join("backing.raw");
        let mut bytes = vec![0u8; c.size as usize];
        for (s, ch) in bytes.chunks_exact_mut(SECTOR as usize).enumerate() {
            fill_sector(ch, BACKING, s as u64);
        }
        std::fs::write(&raw, &bytes).unwrap();
        o.backing = Some(("backing.raw".into(), "raw".into()));
        model.fill(BACKING);
        // Every cluster reads backing data: all may be checked.
        touched.extend(0..clusters);
    }
    create_qcow2(&path, &o, c.size);
    let pick =
        |rng: &mut Rng| if rng.percent(70) { hot[rng.below(hot.len() as u64) as usize] } else { rng.below(clusters) };
    let partial = |rng: &mut Rng, cl: u64| {
        let a = rng.below(cs / SECTOR);
        let n = rng.range(1, (2 * cs / SECTOR).min(256));
        let off = cl * cs + a * SECTOR;
        (off, (n * SECTOR).min(c.size - off))
    };
    // QEMU writes compressed clusters only where nothing is allocated yet.
    let fresh = |rng: &mut Rng, touched: &BTreeSet<u64>| loop {
        let cl = pick(rng);
        if !touched.contains(&cl) {
            break cl;
        }
    };
    let mut cmds = Vec::new();
    match c.start {
        Start::Empty => {}
        Start::Backing => {
            for _ in 0..rng.range(2, 8) {
                let cl = pick(rng);
                let (off, len) = partial(rng, cl);
                qemu_write(&mut model, &mut touched, cs, 0x55, off, len);
                cmds.push(format!("write -P 0x55 {off} {len}"));
            }
        }
        Start::Shared => {
            // Before the snapshot: compressed whole clusters and normal (partial) writes.
            for _ in 0..rng.range(3, 8) {
                let cl = fresh(rng, &touched);
                qemu_write(&mut model, &mut touched, cs, 0x11, cl * cs, cs);
                cmds.push(format!("write -c -P 0x11 {} {cs}", cl * cs));
            }
            for _ in 0..rng.range(3, 8) {
                let cl = pick(rng);
                let (off, len) = partial(rng, cl);
                qemu_write(&mut model, &mut touched, cs, 0x22, off, len);
                cmds.push(format!("write -P 0x22 {off} {len}"));
            }
        }
    }
    qemu_io_cmds(&path, "qcow2", &cmds);
    if c.start == Start::Shared {
        qemu_img(["snapshot", "-c", "s1", &s(&path)]).ok();
        // After it: private compressed clusters and partial writes that copy shared ones.
        let mut cmds = Vec::new();
        for _ in 0..rng.range(2, 5) {
            let cl = fresh(rng, &touched);
            qemu_write(&mut model, &mut touched, cs, 0x33, cl * cs, cs);
            cmds.push(format!("write -c -P 0x33 {} {cs}", cl * cs));
        }
        for _ in 0..rng.range(1, 4) {
            let cl = pick(rng);
            let (off, len) = partial(rng, cl);
            qemu_write(&mut model, &mut touched, cs, 0x44, off, len);
            cmds.push(format!("write -P 0x44 {off} {len}"));
        }
        qemu_io_cmds(&path, "qcow2", &cmds);
    }
    let r = qemu_img(["check", &s(&path)]);
    assert_eq!(r.status(), 0, "the initial image is not clean:\n{}", r.describe());
    // Tiny caches: one or two sets of slices of 512 bytes up to 4 KiB; the smallest
    // refcount cache (4 blocks).
    let entry = *[512, 1024, cs.min(4096)].get(rng.below(3) as usize).unwrap();
    let entry = entry.min(cs);
    let opts = Options {
        l2_cache_size: Some(entry * if rng.percent(50) { 8 } else { 16 }),
        l2_cache_entry_size: Some(entry),
        refcount_cache_size: Some(cs),
        cache: if rng.percent(20) { CacheMode::Writethrough } else { CacheMode::Writeback },
        ..Default::default()
    };
    World { cfg: *c, path, opts, model, touched, hot, backing }
}

/// A range at one of the alignment classes, starting in a hot cluster most of the time.
fn pick_range(rng: &mut Rng, w: &World, max_len: u64) -> (u64, u64) {
    let c = &w.cfg;
    let cs = c.cluster;
    let scs = if c.ext { cs / 32 } else { cs };
    let cl = if rng.percent(75) { w.hot[rng.below(w.hot.len() as u64) as usize] } else { rng.below(w.clusters()) };
    let cstart = cl * cs;
    let (off, len) = match rng.below(7) {
        0 => {
            // Inside one subcluster (one cluster without extended L2).
            let ustart = cstart + rng.below(cs / scs) * scs;
            let n = scs / SECTOR;
            let a = rng.below(n);
            let b = rng.range(a, n - 1);
            (ustart + a * SECTOR, (b - a + 1) * SECTOR)
        }
        1 => {
            // Straddling a subcluster or cluster boundary.
            let unit = if rng.percent(50) { scs } else { cs };
            let boundary = cstart + rng.range(1, cs / unit) * unit;
            let before = rng.range(1, (unit / SECTOR).min(24));
            let after = rng.range(1, (unit / SECTOR).min(24));
            (boundary.saturating_sub(before * SECTOR), (before + after) * SECTOR)
        }
        2 => (cstart, rng.range(1, 2) * cs),
        3 => {
            // Whole subclusters.
            let k = rng.below(cs / scs);
            let m = rng.range(1, cs / scs - k);
            (cstart + k * scs, m * scs)
        }
        4 => (cstart + rng.below(cs / SECTOR) * SECTOR, rng.range(1, 3 * cs / SECTOR) * SECTOR),
        5 => (cstart + rng.below(cs / SECTOR) * SECTOR, rng.range(1, 8) * SECTOR),
        _ => {
            // Unaligned, up to 64 KiB.
            let off = cstart + rng.below(cs / SECTOR) * SECTOR;
            (off, rng.range(1, 128) * SECTOR)
        }
    };
    let off = off.min(c.size - SECTOR);
    let len = len.min(c.size - off).min(max_len).max(SECTOR);
    (off, len)
}

/// The plan of one thread in one batch.
fn plan(w: &World, seed: u64, batch: usize, thread: usize, n: usize) -> Vec<Rec> {
    let mut rng = Rng(seed ^ ((batch as u64) << 32 | thread as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    (0..n)
        .map(|i| {
            let kind = match rng.below(100) {
                0..=44 => Kind::Write,
                45..=56 => Kind::Zero { unmap: rng.percent(50) },
                57..=71 => Kind::Discard,
                72..=79 => Kind::Flush,
                _ => Kind::Read,
            };
            let max_len = match kind {
                Kind::Write | Kind::Read => (4 * MIB).max(w.cfg.cluster),
                _ => u64::MAX,
            };
            let (off, len) = if kind == Kind::Flush { (0, 0) } else { pick_range(&mut rng, w, max_len) };
            let id = FIRST_OP + ((batch as u64 * 64 + thread as u64) << 12) + i as u64;
            Rec { id, thread, kind, off, len, s: 0, c: 0, data: Vec::new() }
        })
        .collect()
}

/// A buffer at a chosen alignment (sector-aligned, or off by 8 bytes to take the bounce
/// path), kept alive while its op is in flight.
struct Buf {
    mem: Vec<u8>,
    start: usize,
    /// The segments of a vectored request over `mem`.
    iov: Vec<libc::iovec>,
}

impl Buf {
    fn new(len: usize, misalign: bool) -> Buf {
        let mem = vec![0u8; len + 4096 + 8];
        let base = mem.as_ptr() as usize;
        let start = base.next_multiple_of(4096) - base + if misalign { 8 } else { 0 };
        Buf { mem, start, iov: Vec::new() }
    }
    fn bytes(&mut self, len: usize) -> &mut [u8] {
        &mut self.mem[self.start..self.start + len]
    }
}

/// Runs one thread's batch on its own queue; returns the ops with their stamps, or the
/// first failure.
fn run_thread(
    img: &Arc<Image>,
    mut ops: Vec<Rec>,
    seq: &AtomicU64,
    seed: u64,
    barrier: &Barrier,
) -> Result<Vec<Rec>, String> {
    let mut q = Queue::new(img, &QueueOptions::default()).map_err(|e| format!("Queue::new: {e}"))?;
    let mut rng = Rng(seed ^ 0x7175_6575_6500 ^ ops.first().map_or(0, |r| r.id));
    barrier.wait();
    let depth = rng.range(2, 16) as usize;
    let mut bufs: HashMap<usize, Buf> = HashMap::new();
    let mut next = 0;
    let mut in_flight = 0;
    let mut done: Vec<Completion> = Vec::new();
    while next < ops.len() || in_flight > 0 {
        if next < ops.len() && in_flight < depth && (in_flight == 0 || rng.percent(60)) {
            let r = &ops[next];
            let op = match r.kind {
                Kind::Write | Kind::Read => {
                    let mut b = Buf::new(r.len as usize, rng.percent(10));
                    if r.kind == Kind::Write {
                        let bytes = b.bytes(r.len as usize);
                        for (i, ch) in bytes.chunks_exact_mut(SECTOR as usize).enumerate() {
                            fill_sector(ch, r.id, r.off / SECTOR + i as u64);
                        }
                    }
                    let ptr = b.bytes(r.len as usize).as_mut_ptr();
                    let sectors = r.len / SECTOR;
                    let op = if sectors > 1 && rng.percent(15) {
                        // Vectored: up to 4 segments at sector boundaries (one may be empty).
                        let mut cuts: Vec<u64> = (0..rng.range(1, 3)).map(|_| rng.below(sectors + 1)).collect();
                        cuts.extend([0, sectors]);
                        cuts.sort_unstable();
                        b.iov = cuts
                            .windows(2)
                            .map(|w| libc::iovec {
                                // SAFETY: every cut is at most `sectors`: inside the buffer.
                                iov_base: unsafe { ptr.add((w[0] * SECTOR) as usize) }.cast(),
                                iov_len: ((w[1] - w[0]) * SECTOR) as usize,
                            })
                            .collect();
                        let (iov, iovcnt) = (b.iov.as_ptr(), b.iov.len());
                        if r.kind == Kind::Write {
                            Op::Writev { offset: r.off, iov, iovcnt }
                        } else {
                            Op::Readv { offset: r.off, iov, iovcnt }
                        }
                    } else if r.kind == Kind::Write {
                        Op::Write { offset: r.off, buf: ptr, len: r.len as usize }
                    } else {
                        Op::Read { offset: r.off, buf: ptr, len: r.len as usize }
                    };
                    bufs.insert(next, b);
                    op
                }
                Kind::Zero { unmap } => Op::WriteZeroes { offset: r.off, len: r.len, unmap },
                Kind::Discard => Op::Discard { offset: r.off, len: r.len },
                Kind::Flush => Op::Flush,
            };
            ops[next].s = seq.fetch_add(1, SeqCst);
            // SAFETY: the buffer lives in `bufs` until the op's completion is reaped.
            unsafe { q.submit(Request { op, user_data: next as u64 }) }
                .map_err(|e| format!("submit of {:?}: {e}", ops[next]))?;
            next += 1;
            in_flight += 1;
            if rng.percent(40) {
                q.commit().map_err(|e| format!("commit: {e}"))?;
            }
            continue;
        }
        // Now and then the thread stalls with requests not entered yet or in flight (as
        // a descheduled I/O thread does), so that other queues overtake them.
        if rng.percent(4) {
            std::thread::sleep(Duration::from_micros(rng.below(1500)));
        }
        q.commit().map_err(|e| format!("commit: {e}"))?;
        done.clear();
        q.reap(&mut done, 1, Some(Duration::from_secs(60))).map_err(|e| format!("reap: {e}"))?;
        if done.is_empty() {
            return Err(format!("no completion within 60 s ({in_flight} ops in flight)"));
        }
        let c = seq.fetch_add(1, SeqCst);
        for d in &done {
            let i = d.user_data as usize;
            ops[i].c = c;
            in_flight -= 1;
            if d.result != 0 {
                let detail = q.error_detail(d.user_data).map_or(String::new(), |e| format!(": {e}"));
                return Err(format!("{:?} failed with {}{detail}", ops[i], d.result));
            }
            let mut b = bufs.remove(&i);
            if ops[i].kind == Kind::Read {
                let len = ops[i].len as usize;
                ops[i].data = b.as_mut().expect("read buffer").bytes(len).to_vec();
            }
        }
    }
    drop(q);
    Ok(ops)
}

/// The sectors op `r` sets, and to what (None: it changes nothing).
fn effect(w: &World, r: &Rec) -> Option<(u64, Vec<(u64, u64)>)> {
    let cs = w.cfg.cluster;
    match r.kind {
        Kind::Write => Some((r.id, vec![(r.off, r.off + r.len)])),
        Kind::Zero { .. } => Some((ZERO, vec![(r.off, r.off + r.len)])),
        Kind::Discard => {
            if w.cfg.v2 && w.backing {
                return None;
            }
            let end = r.off + r.len;
            let ranges: Vec<(u64, u64)> = (r.off / cs..=(end - 1) / cs)
                .map(|c| (c * cs, ((c + 1) * cs).min(w.cfg.size)))
                .filter(|&(a, b)| r.off <= a && end >= b)
                .collect();
            (!ranges.is_empty()).then_some((ZERO, ranges))
        }
        Kind::Flush | Kind::Read => None,
    }
}

/// Checks one batch against the model and moves the model on. Returns the violations.
fn check_batch(w: &mut World, img: &Arc<Image>, recs: &[Rec], out: &mut Outcome) -> Vec<String> {
    let mut bad = Vec::new();
    // Which ops affect each sector, with the value they leave.
    let mut by_sector: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); w.sectors() as usize]; // (s, c, value)
    for r in recs {
        if let Some((v, ranges)) = effect(w, r) {
            for (a, b) in ranges {
                for s in a / SECTOR..b / SECTOR {
                    by_sector[s as usize].push((r.s, r.c, v));
                }
                for c in a / w.cfg.cluster..=(b - 1) / w.cfg.cluster {
                    w.touched.insert(c);
                }
            }
        }
    }
    // Reads during the batch.
    for r in recs.iter().filter(|r| r.kind == Kind::Read) {
        for i in 0..r.len / SECTOR {
            let s = r.off / SECTOR + i;
            let got = parse_sector(&r.data[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize], s);
            let ops = &by_sector[s as usize][..];
            let prior_visible = !ops.iter().any(|&(_, c, _)| c < r.s);
            let ok = (prior_visible && got == w.model[s as usize])
                || ops
                    .iter()
                    .any(|&(xs, xc, v)| v == got && xs < r.c && !ops.iter().any(|&(ys, yc, _)| xc < ys && yc < r.s));
            if !ok && bad.len() < 20 {
                let allowed: Vec<String> = ops
                    .iter()
                    .filter(|&&(xs, xc, _)| xs < r.c && !ops.iter().any(|&(ys, yc, _)| xc < ys && yc < r.s))
                    .map(|&(_, _, v)| describe(v))
                    .chain(prior_visible.then(|| describe(w.model[s as usize])))
                    .collect();
                bad.push(format!(
                    "read {:#x} (thread {}, [{}, {}]) at guest {:#x}: got {}, allowed {:?}",
                    r.id,
                    r.thread,
                    r.s,
                    r.c,
                    s * SECTOR,
                    describe(got),
                    allowed
                ));
            }
        }
    }
    // The engine's audit.
    match img.audit() {
        Ok(rep) => {
            out.audits += 1;
            if rep.corruptions + rep.leaks + rep.check_errors > 0 {
                bad.push(format!(
                    "audit: {} corruptions, {} leaks, {} check errors:\n  {}",
                    rep.corruptions,
                    rep.leaks,
                    rep.check_errors,
                    rep.messages.iter().take(30).cloned().collect::<Vec<_>>().join("\n  ")
                ));
            }
        }
        Err(e) => bad.push(format!("audit failed: {e}")),
    }
    // Read back every touched cluster.
    // A sector may end with the value of any op that affected it and that no later op
    // affecting it followed (X.complete > every Y.submit).
    let allowed_final = |s: u64| -> Option<Vec<u64>> {
        let ops = &by_sector[s as usize];
        let max_s = ops.iter().map(|o| o.0).max()?;
        Some(ops.iter().filter(|o| o.1 > max_s).map(|o| o.2).collect())
    };
    let cs = w.cfg.cluster;
    let runs = cluster_runs(&w.touched, (MIB / cs).max(1));
    let mut q = Queue::new(img, &QueueOptions::default()).expect("verify queue");
    for chunk in runs.chunks(8) {
        let mut bufs: Vec<Buf> = Vec::new();
        for (i, &(c0, n)) in chunk.iter().enumerate() {
            let mut b = Buf::new((n * cs) as usize, false);
            let ptr = b.bytes((n * cs) as usize).as_mut_ptr();
            bufs.push(b);
            // SAFETY: the buffer lives until the reap below.
            unsafe {
                q.submit(Request {
                    op: Op::Read { offset: c0 * cs, buf: ptr, len: (n * cs) as usize },
                    user_data: i as u64,
                })
            }
            .expect("verify read");
        }
        q.commit().expect("commit");
        let mut done = Vec::new();
        while done.len() < chunk.len() {
            let want = chunk.len() - done.len();
            q.reap(&mut done, want, Some(Duration::from_secs(60))).expect("reap");
        }
        for d in &done {
            assert_eq!(d.result, 0, "verify read failed: {:?}", q.error_detail(d.user_data));
        }
        for (i, &(c0, n)) in chunk.iter().enumerate() {
            let bytes = bufs[i].bytes((n * cs) as usize);
            for k in 0..n * cs / SECTOR {
                let s = c0 * cs / SECTOR + k;
                let got = parse_sector(&bytes[(k * SECTOR) as usize..((k + 1) * SECTOR) as usize], s);
                out.sectors_checked += 1;
                let fin = allowed_final(s);
                let ok = match &fin {
                    Some(a) => a.contains(&got),
                    None => got == w.model[s as usize],
                };
                if !ok && bad.len() < 40 {
                    let allowed: Vec<String> = match &fin {
                        Some(a) => a.iter().map(|&v| describe(v)).collect(),
                        None => vec![describe(w.model[s as usize])],
                    };
                    let ops: Vec<String> = recs
                        .iter()
                        .filter(|r| r.off / SECTOR <= s && s < (r.off + r.len) / SECTOR)
                        .map(|r| {
                            format!(
                                "{:#x} t{} {:?} {:#x}+{:#x} [{}, {}]",
                                r.id, r.thread, r.kind, r.off, r.len, r.s, r.c
                            )
                        })
                        .collect();
                    bad.push(format!(
                        "after the batch, guest {:#x} holds {}, allowed {:?}; ops over it: {:?}",
                        s * SECTOR,
                        describe(got),
                        allowed,
                        ops
                    ));
                    if bad.len() == 1 {
                        // Every op of the batch in the same cluster, in submit order.
                        let cl = s * SECTOR / cs;
                        let mut near: Vec<&Rec> = recs
                            .iter()
                            .filter(|r| r.len > 0 && r.off / cs <= cl && cl <= (r.off + r.len - 1) / cs)
                            .collect();
                        near.sort_by_key(|r| r.s);
                        let list: Vec<String> = near
                            .iter()
                            .map(|r| {
                                format!(
                                    "  {:#x} t{} {:?} {:#x}+{:#x} [{}, {}]",
                                    r.id, r.thread, r.kind, r.off, r.len, r.s, r.c
                                )
                            })
                            .collect();
                        bad.push(format!("ops of batch in cluster {:#x}:\n{}", cl * cs, list.join("\n")));
                    }
                }
                w.model[s as usize] = got;
            }
        }
    }
    bad
}

/// Touched clusters as (first, count) runs of at most `max` clusters.
fn cluster_runs(set: &BTreeSet<u64>, max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &c in set {
        match runs.last_mut() {
            Some((a, n)) if *a + *n == c && *n < max => *n += 1,
            _ => runs.push((c, 1)),
        }
    }
    runs
}

fn open(w: &World) -> Arc<Image> {
    Image::open(&w.path, &w.opts).unwrap_or_else(|e| panic!("open {}: {e}", w.path.display()))
}

/// One run of the model test. Panics with the run's parameters on a violation.
fn run(p: &RunSpec) -> Outcome {
    let dir = tempdir();
    let mut rng = Rng(p.seed);
    let mut w = build(dir.path(), &p.cfg, &mut rng);
    let ctx = format!(
        "config {} seed {} queues {} batches {} ops/thread {} (replay: QURING_MQ_SEED={} QURING_MQ_QUEUES={} QURING_MQ_CONFIG={} QURING_MQ_SECS=0 cargo test --test mq_model -- --nocapture); cache {:?}/{:?}/{:?} {:?}",
        p.cfg.name,
        p.seed,
        p.queues,
        p.batches,
        p.ops,
        p.seed,
        p.queues,
        p.cfg.name,
        w.opts.l2_cache_size,
        w.opts.l2_cache_entry_size,
        w.opts.refcount_cache_size,
        w.opts.cache
    );
    let mut out = Outcome::default();
    let mut img = open(&w);
    let seq = AtomicU64::new(1);
    for batch in 0..p.batches {
        let barrier = Barrier::new(p.queues);
        let results: Vec<Result<Vec<Rec>, String>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..p.queues)
                .map(|t| {
                    let ops = plan(&w, p.seed, batch, t, p.ops);
                    let (img, seq, barrier) = (&img, &seq, &barrier);
                    sc.spawn(move || run_thread(img, ops, seq, p.seed, barrier))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread panicked")).collect()
        });
        let mut recs = Vec::new();
        for r in results {
            match r {
                Ok(v) => recs.extend(v),
                Err(e) => panic!("{ctx}: batch {batch}: {e}"),
            }
        }
        out.ops += recs.len() as u64;
        let bad = check_batch(&mut w, &img, &recs, &mut out);
        assert!(bad.is_empty(), "{ctx}: batch {batch}: {} violation(s):\n{}", bad.len(), bad.join("\n"));
        if rng.percent(25) {
            img.close().unwrap_or_else(|e| panic!("{ctx}: close after batch {batch}: {e}"));
            drop(img);
            img = open(&w);
        }
    }
    img.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
    drop(img);
    let r = qemu_img(["check", "--output=json", &s(&w.path)]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or(serde_json::Value::Null);
    assert!(
        r.status() == 0 && j.get("leaks").is_none() && j.get("corruptions").is_none(),
        "{ctx}: qemu-img check after close:\n{}",
        r.describe()
    );
    let raw = dir.path().join("final.raw");
    qemu_img(["convert", "-O", "raw", &s(&w.path), &s(&raw)]).ok();
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes.len() as u64, w.cfg.size, "{ctx}: converted size");
    let mut bad = Vec::new();
    for s in 0..w.sectors() {
        let got = parse_sector(&bytes[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize], s);
        if got != w.model[s as usize] && bad.len() < 20 {
            bad.push(format!(
                "guest {:#x}: qemu-img reads {}, the engine read {}",
                s * SECTOR,
                describe(got),
                describe(w.model[s as usize])
            ));
        }
    }
    assert!(bad.is_empty(), "{ctx}: after close, qemu-img convert differs:\n{}", bad.join("\n"));
    out
}

fn config_named(name: &str) -> Config {
    *CONFIGS.iter().find(|c| c.name == name).unwrap_or_else(|| {
        panic!("no configuration {name}; known: {:?}", CONFIGS.iter().map(|c| c.name).collect::<Vec<_>>())
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// The run a campaign seed stands for.
fn campaign_run(seed: u64, queues: usize, forced: Option<Config>) -> RunSpec {
    let mut r = Rng(seed ^ 0x006d_716d_6f64_656c);
    let cfg = forced.unwrap_or(CONFIGS[r.below(CONFIGS.len() as u64) as usize]);
    // Fewer ops per batch for the big-cluster configurations (their ops move MiBs).
    let ops = if cfg.cluster >= 2 * MIB { r.range(12, 32) } else { r.range(16, 64) } as usize;
    RunSpec { cfg, seed, queues, batches: r.range(4, 12) as usize, ops }
}

#[test]
fn model() {
    if let Some(seed) = env_u64("QURING_MQ_SEED") {
        // Campaign or replay.
        let queues = env_u64("QURING_MQ_QUEUES").unwrap_or(4) as usize;
        assert!((1..=64).contains(&queues));
        let secs = env_u64("QURING_MQ_SECS").unwrap_or(0);
        let forced = std::env::var("QURING_MQ_CONFIG").ok().map(|n| config_named(&n));
        let start = Instant::now();
        let (mut runs, mut ops) = (0u64, 0u64);
        let mut seed = seed;
        loop {
            let p = campaign_run(seed, queues, forced);
            let t = Instant::now();
            let o = run(&p);
            println!(
                "mq-run seed={} queues={} config={} batches={} ops={} audits={} sectors={} ms={}",
                p.seed,
                p.queues,
                p.cfg.name,
                p.batches,
                o.ops,
                o.audits,
                o.sectors_checked,
                t.elapsed().as_millis()
            );
            runs += 1;
            ops += o.ops;
            seed += 1;
            if start.elapsed().as_secs() >= secs {
                break;
            }
        }
        println!(
            "mq-campaign queues={queues} runs={runs} ops={ops} next_seed={seed} secs={} violations=0",
            start.elapsed().as_secs()
        );
        return;
    }
    // The suite: every configuration twice, with 2 or 4 queues and with 8.
    let start = Instant::now();
    let mut total = 0;
    for (i, cfg) in CONFIGS.iter().enumerate() {
        for queues in [[2, 4][i % 2], 8] {
            let big = cfg.cluster >= 2 * MIB;
            let seed = ((0x5eed_0000 + i as u64) << 4) | queues as u64;
            let p = RunSpec { cfg: *cfg, seed, queues, batches: 3, ops: if big { 8 } else { 16 } };
            let t = Instant::now();
            let o = run(&p);
            total += o.ops;
            println!("{} queues={} seed={} ops={} in {:?}", cfg.name, queues, seed, o.ops, t.elapsed());
        }
    }
    println!("mq_model suite: {} configurations x 2, {total} ops in {:?}", CONFIGS.len(), start.elapsed());
}

/// A read in flight keeps the host cluster it reads from: a concurrent discard may free
/// the cluster, but the cluster must not be reused (and written) before the read is done,
/// or the read returns another guest offset's data. Queue A submits a read of guest
/// cluster 0 (its SQE not entered yet, as when A's thread is descheduled); queue B
/// discards that cluster, flushes (which frees it), and writes guest cluster 1, which is
/// given the freed host cluster; then A's read runs. It may return the old data or zeros,
/// never B's.
#[test]
fn read_in_flight_never_sees_a_reused_cluster() {
    let dir = tempdir();
    let path = dir.path().join("reuse.qcow2");
    let cs = 64 * KIB;
    build_qcow2(&path, &Qcow2Opts::cluster(cs as u32), 16 * cs, &["write -P 0xa1 0 64k".into()]);
    let img = Image::open(&path, &Options::default()).unwrap();
    let mut a = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut b = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut warm = vec![0u8; 4096];
    a.read_at(&mut warm, 0).unwrap(); // the L2 slice is cached: the read goes straight out
    let mut buf = Buf::new(cs as usize, false);
    let ptr = buf.bytes(cs as usize).as_mut_ptr();
    // SAFETY: `buf` outlives the reap below.
    unsafe { a.submit(Request { op: Op::Read { offset: 0, buf: ptr, len: cs as usize }, user_data: 7 }) }.unwrap();
    b.discard(0, cs).unwrap();
    b.flush().unwrap();
    b.write_at(&vec![0xb2; cs as usize], cs).unwrap();
    a.commit().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        a.reap(&mut done, 1, Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(done[0].result, 0);
    let got = buf.bytes(cs as usize);
    let first_bad = got.iter().position(|&x| x != 0xa1 && x != 0);
    assert!(
        first_bad.is_none() && (got.iter().all(|&x| x == 0) || got.iter().all(|&x| x == 0xa1)),
        "the read in flight returned {:#04x} at {:#x} (0xb2 is the data written to guest cluster 1 later)",
        got[first_bad.unwrap_or(0)],
        first_bad.unwrap_or(0)
    );
    drop((a, b));
    img.close().unwrap();
}
