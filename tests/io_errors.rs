//! I/O error matrix (issue 7): EIO and ENOSPC injected through the device hook on the Nth
//! write of each kind (Data, L2, RefBlock, RefTable, L1, Header) and on the Nth device flush,
//! one case each. For every case:
//! - the error reaches the caller of the request that needed the write (a metadata write
//!   done in the background must fail the next flush, like fsync's rule; one done while
//!   closing must fail `close`);
//! - the engine keeps serving reads: the whole disk read through the same queue holds every
//!   acknowledged write (failed requests may or may not have landed);
//! - after dropping the image, `qemu-img check` exits 0 or 3 (lazy refcounts: 0 after
//!   quring's repair open);
//! - nothing reported durable is not: crash states built from the recorded log pass the
//!   crash checks (failed flushes promise nothing).

mod common;
mod crash_harness;

use common::*;
use crash_harness::*;
use quring::image::CacheMode;
use quring::io::hook::WriteKind;
use quring::queue::{Queue, QueueOptions};
use std::path::Path;

const EIO: i32 = libc::EIO;
const ENOSPC: i32 = libc::ENOSPC;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Img {
    /// 512-byte clusters, 64-bit refcounts: blocks and the table grow quickly.
    Growth,
    /// 4 KiB clusters with lazy refcounts (header dirty bit).
    Lazy,
}

impl Img {
    fn size(self) -> u64 {
        8 * MIB
    }
    fn mode(self) -> CheckMode {
        match self {
            Img::Growth => CheckMode::Eager,
            Img::Lazy => CheckMode::Lazy,
        }
    }
    fn create(self, path: &Path) {
        let o = match self {
            Img::Growth => Qcow2Opts { cluster_size: 512, refcount_bits: 64, ..Default::default() },
            Img::Lazy => Qcow2Opts { cluster_size: 4096, lazy_refcounts: true, ..Default::default() },
        };
        create_qcow2(path, &o, self.size());
        qemu_io_cmds(path, "qcow2", &["write -P 0x11 0 64k".to_string(), "write -P 0x22 1M 8k".to_string()]);
    }
}

/// The workload: ~3 MiB of 64 KiB writes spread over the disk with flushes, small writes,
/// zero writes and a discard.
fn plan(img: Img) -> Vec<Planned> {
    let size = img.size();
    let mut v = Vec::new();
    for i in 0..48u64 {
        let off = (i * 167 * KIB + i * 512) % (size - 64 * KIB);
        v.push(Planned { kind: GKind::Write, off, len: 64 * KIB, batch: false });
        if i % 7 == 3 {
            v.push(Planned { kind: GKind::Write, off: (off + 3 * MIB) % (size - 4096), len: 1536, batch: false });
        }
        if i == 20 {
            v.push(Planned { kind: GKind::Zero { unmap: true }, off: 2 * MIB, len: 128 * KIB, batch: false });
            v.push(Planned { kind: GKind::Discard, off: 4 * MIB, len: 256 * KIB, batch: false });
        }
        if i % 6 == 5 {
            v.push(Planned { kind: GKind::Flush, off: 0, len: 0, batch: false });
        }
    }
    v.push(Planned { kind: GKind::Flush, off: 0, len: 0, batch: false });
    v
}

struct Outcome {
    model: Model,
    rec: std::sync::Arc<Recorder>,
    close: Result<(), String>,
    reads: Result<(), String>,
}

fn run(img: Img, start: &Path, work: &Path, fail: FailPlan) -> Outcome {
    std::fs::copy(start, work).unwrap();
    let base = read_disk(start).unwrap();
    let rec = Recorder::with_plan(fail);
    let mut model =
        Model { size: img.size(), base, ops: Vec::new(), durability: Durability::Acked, clock: Clock::default() };
    let im = open_recorded(work, &rec, CacheMode::Writeback);
    let mut q = Queue::new(&im, &QueueOptions::default()).unwrap();
    run_plan(&mut q, &rec, &mut model, &plan(img), 0x10e);
    // Reads after the error, through the same queue: every acknowledged write is there.
    let mut disk = vec![0u8; img.size() as usize];
    let mut reads = Ok(());
    for off in (0..img.size()).step_by(MIB as usize) {
        if let Err(e) = q.read_at(&mut disk[off as usize..(off + MIB) as usize], off) {
            reads = Err(format!("read {off:#x}+1M after the error failed: {e}"));
            break;
        }
    }
    if reads.is_ok() {
        reads = model.verify(&disk, usize::MAX).map_err(|e| format!("read-back after the error: {e}"));
    }
    drop(q);
    let close = im.close().map_err(|e| e.to_string());
    drop(im);
    Outcome { model, rec, close, reads }
}

/// One case of the matrix; returns the problems found.
fn case(img: Img, kind: Option<WriteKind>, nth: u64, errno: i32) -> Vec<String> {
    let name = format!(
        "{img:?} {} #{nth} {}",
        kind.map_or("flush".to_string(), |k| format!("{k:?} write")),
        errno_name(errno)
    );
    let dir = shm_dir();
    let start = dir.path().join("start.qcow2");
    img.create(&start);
    let start_bytes = std::fs::read(&start).unwrap();
    let work = dir.path().join("work.qcow2");
    let fail = match kind {
        Some(k) => FailPlan { write: Some((k, nth, errno)), flush: None },
        None => FailPlan { write: None, flush: Some((nth, errno)) },
    };
    let o = run(img, &start, &work, fail);
    let mut problems = Vec::new();
    let inj = o.rec.injected();
    let Some(inj) = inj.first() else {
        return vec![format!("[{name}] the failure was never injected (workload too small?)")];
    };
    let ops = o.model.ops.clone();
    let ops_text =
        || -> String { ops.iter().enumerate().map(|(i, o)| format!("    op #{i} {}\n", o.describe())).collect() };
    // 1. The error reaches a caller.
    if inj.op == usize::MAX {
        if o.close.is_ok() {
            problems.push(format!("[{name}] {} failed during close, but close() returned Ok", inj.what));
        }
    } else {
        let x = &ops[inj.op];
        let reached = if !x.ok {
            if x.errno != errno {
                problems.push(format!(
                    "[{name}] {} failed request #{} with errno {} instead of {}",
                    inj.what, inj.op, x.errno, errno
                ));
            }
            true
        } else if kind == Some(WriteKind::Data) || x.kind == GKind::Flush {
            false
        } else {
            // A background metadata write: the next flush must fail.
            match ops[inj.op + 1..].iter().position(|o| o.kind == GKind::Flush) {
                Some(p) => !ops[inj.op + 1 + p].ok,
                None => o.close.is_err(),
            }
        };
        if !reached {
            problems.push(format!(
                "[{name}] {} (during request #{} {}) was not reported: the request{} succeeded\n{}",
                inj.what,
                inj.op,
                x.describe(),
                if x.kind == GKind::Flush { "" } else { " and the next flush" },
                ops_text()
            ));
        }
    }
    // 2. Reads keep working and return acknowledged data.
    if let Err(e) = &o.reads {
        problems.push(format!("[{name}] {e}"));
    }
    // 3. The file is consistent after dropping the image.
    if let Err(e) = check_image(&work, img.mode(), true) {
        problems.push(format!("[{name}] after the error and close ({:?}): {e}", o.close));
    }
    // 4. Crash states from the log: what was reported durable is.
    let mut model = o.model;
    model.durability = Durability::Flushed;
    let events = o.rec.events();
    let log = Log::new(&events);
    let state = dir.path().join("state.qcow2");
    for k in 0..6u64 {
        let mut rng = harness_rng(nth * 1000 + errno as u64 * 7 + k);
        let c = if k == 0 { events.len() } else { rng.range(inj.at as u64, events.len() as u64) as usize };
        let (bytes, desc) = materialize(&start_bytes, &log, c, &mut rng);
        std::fs::write(&state, &bytes).unwrap();
        let r = check_image(&state, img.mode(), true)
            .and_then(|_| read_disk(&state))
            .and_then(|disk| model.verify(&disk, c));
        if let Err(e) = r {
            problems.push(format!(
                "[{name}] crash state #{k} after the injected error ({} at event {}): {e}\n{desc}\
                 metadata events from the last durable barrier to the crash point:\n{}guest requests:\n{}",
                inj.what,
                inj.at,
                meta_listing(&events, log.durable_barrier(c).saturating_sub(1), c),
                ops_text()
            ));
            break;
        }
    }
    eprintln!(
        "io_errors: {name}: injected {} during request #{}: {} problem(s)",
        inj.what,
        inj.op as i64,
        problems.len()
    );
    problems
}

fn errno_name(e: i32) -> &'static str {
    match e {
        EIO => "EIO",
        ENOSPC => "ENOSPC",
        _ => "?",
    }
}

/// Counts of each write kind and of flushes in an error-free run.
fn dry_counts(img: Img) -> (Vec<(WriteKind, u64)>, u64) {
    let dir = shm_dir();
    let start = dir.path().join("start.qcow2");
    img.create(&start);
    let o = run(img, &start, &dir.path().join("work.qcow2"), FailPlan::default());
    assert!(o.model.ops.iter().all(|x| x.ok), "error-free run failed");
    o.reads.unwrap();
    o.close.unwrap();
    let kinds =
        [WriteKind::Data, WriteKind::L2, WriteKind::RefBlock, WriteKind::RefTable, WriteKind::L1, WriteKind::Header];
    (kinds.iter().map(|&k| (k, o.rec.count(k))).collect(), o.rec.flush_count())
}

fn matrix(img: Img, kind: Option<WriteKind>) {
    let (counts, flushes) = dry_counts(img);
    let n = match kind {
        Some(k) => counts.iter().find(|c| c.0 == k).unwrap().1,
        None => flushes,
    };
    assert!(n > 0, "{img:?}: the workload issues no {kind:?} write (counts {counts:?}, flushes {flushes})");
    let mut nths = vec![1, n.div_ceil(2), n];
    nths.dedup();
    let mut problems = Vec::new();
    for &nth in &nths {
        for errno in [EIO, ENOSPC] {
            problems.extend(case(img, kind, nth, errno));
        }
    }
    eprintln!("io_errors: {img:?} {kind:?}: {} cases (nth {nths:?} of {n}), counts {counts:?}", nths.len() * 2);
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n\n"));
}

#[test]
fn data_write_errors() {
    matrix(Img::Growth, Some(WriteKind::Data));
}

#[test]
fn l2_write_errors() {
    matrix(Img::Growth, Some(WriteKind::L2));
}

#[test]
fn refblock_write_errors() {
    matrix(Img::Growth, Some(WriteKind::RefBlock));
}

#[test]
fn reftable_write_errors() {
    matrix(Img::Growth, Some(WriteKind::RefTable));
}

#[test]
fn l1_write_errors() {
    matrix(Img::Growth, Some(WriteKind::L1));
}

#[test]
fn header_write_errors_growth() {
    matrix(Img::Growth, Some(WriteKind::Header));
}

#[test]
fn header_write_errors_lazy() {
    matrix(Img::Lazy, Some(WriteKind::Header));
}

#[test]
fn flush_errors() {
    matrix(Img::Growth, None);
}

#[test]
fn flush_errors_lazy() {
    matrix(Img::Lazy, None);
}

#[test]
fn l2_write_errors_lazy() {
    matrix(Img::Lazy, Some(WriteKind::L2));
}
