//! Crash consistency (issue 7): seeded random workloads run through the library with a
//! recording hook; crash states are materialized from the device-write log (everything
//! durable, a random subset of the rest, some torn into 4 KiB pieces) and each must pass
//! `qemu-img check` (exit 0/3; exit 0 after quring's repair open for lazy refcounts; `quring
//! check` for L2-less images) and read back, sector by sector, only values the guest wrote
//! there, with every durable write intact.
//!
//! Environment:
//! - `QURING_CRASH_STATES=N`: check at least N states (default 300; the campaign script
//!   sets tens of thousands).
//! - `QURING_CRASH_SEED=S`: run only workload seed S (reproduce a failure).
//! - `QURING_CRASH_SEED_BASE=B`: first seed (default 0).
//! - `QURING_CRASH_PER_WORKLOAD=K`: crash states per workload (default 10).

mod common;
mod crash_harness;

use common::*;
use crash_harness::*;
use quring::image::CacheMode;
use quring::queue::{Queue, QueueOptions};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Crash states checked so far (for the failure message).
static CHECKED: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    cluster: u64,
    refcount_bits: u32,
    size: u64,
    lazy: bool,
    l2_less: bool,
    extended_l2: bool,
    backing: bool,
    snapshot: bool,
    writethrough: bool,
    qd: bool,
    /// Growth-heavy: large writes (refcount blocks and table grow).
    big: bool,
    compat_v2: bool,
    /// Queues (threads) running the workload at once, each over its own half of the disk:
    /// their metadata (L1, refcount blocks, write-backs) is shared, and their write-backs
    /// and device flushes interleave in the log.
    queues: usize,
}

const BASE: Scenario = Scenario {
    name: "",
    cluster: 4096,
    refcount_bits: 16,
    size: 8 * MIB,
    lazy: false,
    l2_less: false,
    extended_l2: false,
    backing: false,
    snapshot: false,
    writethrough: false,
    qd: false,
    big: false,
    compat_v2: false,
    queues: 1,
};

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "512/rb64 growth", cluster: 512, refcount_bits: 64, big: true, ..BASE },
    Scenario { name: "4K/rb1 growth", cluster: 4096, refcount_bits: 1, size: 16 * MIB, big: true, ..BASE },
    Scenario { name: "64K backing COW", cluster: 65536, backing: true, ..BASE },
    Scenario { name: "4K snapshot-shared", snapshot: true, ..BASE },
    Scenario { name: "4K lazy refcounts", lazy: true, ..BASE },
    Scenario { name: "4K L2-less", l2_less: true, size: 16 * MIB, ..BASE },
    Scenario { name: "4K writethrough", writethrough: true, ..BASE },
    Scenario { name: "64K QD8", cluster: 65536, qd: true, ..BASE },
    Scenario { name: "32K extended L2 backing", cluster: 32768, extended_l2: true, backing: true, ..BASE },
    Scenario { name: "512/rb64 lazy QD8", cluster: 512, refcount_bits: 64, lazy: true, qd: true, big: true, ..BASE },
    Scenario { name: "4K L2-less backing QD8", l2_less: true, backing: true, qd: true, size: 16 * MIB, ..BASE },
    Scenario { name: "64K v2 snapshot", cluster: 65536, compat_v2: true, snapshot: true, ..BASE },
    Scenario { name: "4K two queues QD8", qd: true, queues: 2, ..BASE },
    Scenario { name: "64K two queues writethrough", cluster: 65536, writethrough: true, queues: 2, ..BASE },
    Scenario { name: "512/rb64 two queues growth", cluster: 512, refcount_bits: 64, big: true, queues: 2, ..BASE },
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Prefill commands (qemu-io syntax) over the disk.
fn prefill(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let len = rng.range(1, 64) * 4096;
            let off = rng.below((size - len) / 512) * 512;
            format!("write -P 0x{:02x} {off} {len}", pattern_byte(i + rng.below(50) as usize))
        })
        .collect()
}

/// Builds the starting image in `dir` and returns its path.
fn setup(dir: &Path, sc: &Scenario, rng: &mut Rng) -> std::path::PathBuf {
    let img = dir.join("start.qcow2");
    let mut back = None;
    if sc.backing {
        let b = dir.join("base.qcow2");
        build_qcow2(&b, &Qcow2Opts::cluster(65536), sc.size, &prefill(rng, sc.size, 12));
        back = Some(("base.qcow2".to_string(), "qcow2".to_string()));
    }
    if sc.l2_less {
        let mut o = format!("cluster_size={},refcount_bits={},l2_less=on", sc.cluster, sc.refcount_bits);
        if sc.lazy {
            o += ",lazy_refcounts=on";
        }
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), "qcow2".into(), "-o".into(), o];
        if let Some((b, f)) = &back {
            args.extend(["-b".into(), b.clone(), "-F".into(), f.clone()]);
        }
        args.extend([s(&img), sc.size.to_string()]);
        quring_in(dir, &args).ok();
        let mut io = vec!["io".to_string()];
        for c in prefill(rng, sc.size, 4) {
            io.extend(["-c".to_string(), c]);
        }
        io.push(s(&img));
        quring_in(dir, &io).ok();
    } else {
        let opts = Qcow2Opts {
            cluster_size: sc.cluster as u32,
            refcount_bits: sc.refcount_bits,
            extended_l2: sc.extended_l2,
            lazy_refcounts: sc.lazy,
            compat: if sc.compat_v2 { Compat::V010 } else { Compat::V11 },
            backing: back,
            ..Default::default()
        };
        create_qcow2(&img, &opts, sc.size);
        qemu_io_cmds(&img, "qcow2", &prefill(rng, sc.size, 6));
        if sc.snapshot {
            qemu_img(["snapshot", "-c", "s1", &s(&img)]).ok();
            qemu_io_cmds(&img, "qcow2", &prefill(rng, sc.size, 3));
        }
    }
    img
}

fn gen_plan(sc: &Scenario, rng: &mut Rng) -> Vec<Planned> {
    let n = if sc.big { 60 } else { 40 };
    let mut v = Vec::new();
    for _ in 0..n {
        let r = rng.below(100);
        let cl = sc.cluster;
        let len = match rng.below(10) {
            0..=2 => rng.range(1, 8) * 512,
            3..=5 => rng.range(1, 16) * 4096,
            6 | 7 => rng.range(1, 4) * cl,
            _ if sc.big => rng.range(64, 512) * KIB,
            _ => rng.range(1, 24) * 4096 + rng.range(0, 7) * 512,
        }
        .min(sc.size);
        let mut off = rng.below((sc.size - len) / 512 + 1) * 512;
        if rng.chance(0.3) {
            off = off / cl * cl;
        }
        let batch = sc.qd && rng.chance(0.6);
        let p = match r {
            0..=54 => Planned { kind: GKind::Write, off, len, batch },
            55..=64 => Planned { kind: GKind::Zero { unmap: rng.chance(0.5) }, off, len, batch },
            65..=74 => {
                // Whole clusters mostly; sometimes a ragged range.
                let (o, l) = if rng.chance(0.7) {
                    let o = off / cl * cl;
                    (o, (len.div_ceil(cl) * cl).min(sc.size - o))
                } else {
                    (off, len)
                };
                Planned { kind: GKind::Discard, off: o, len: l, batch }
            }
            _ => Planned { kind: GKind::Flush, off: 0, len: 0, batch },
        };
        v.push(p);
    }
    v
}

/// Runs one workload and checks `states` crash states of it. Returns the number checked.
/// With `QURING_CRASH_KEEP_GOING` set, a violation is printed and counted instead of
/// failing at once (the test still fails at the end).
fn run_seed(seed: u64, states: usize, violations: &mut Vec<String>) -> usize {
    let sc = SCENARIOS[(seed % SCENARIOS.len() as u64) as usize];
    let mut rng = harness_rng(seed);
    let dir = shm_dir();
    let start = setup(dir.path(), &sc, &mut rng);
    let start_bytes = std::fs::read(&start).unwrap();
    let base = read_disk(&start).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let work = dir.path().join("work.qcow2");
    std::fs::copy(&start, &work).unwrap();

    // One plan per queue; with several, each over its own half of the disk.
    let plans: Vec<Vec<Planned>> = if sc.queues <= 1 {
        vec![gen_plan(&sc, &mut rng)]
    } else {
        let part = sc.size / sc.queues as u64;
        let sub = Scenario { size: part, ..sc };
        (0..sc.queues as u64)
            .map(|t| {
                let mut p = gen_plan(&sub, &mut rng);
                for x in p.iter_mut().filter(|x| x.kind != GKind::Flush) {
                    x.off += t * part;
                }
                p
            })
            .collect()
    };
    let rec = Recorder::new();
    let cache = if sc.writethrough { CacheMode::Writethrough } else { CacheMode::Writeback };
    let mut model = Model {
        size: sc.size,
        base,
        ops: Vec::new(),
        durability: if sc.writethrough {
            Durability::Acked
        } else if sc.queues > 1 {
            Durability::FlushedAcrossQueues
        } else {
            Durability::Flushed
        },
        clock: Clock::default(),
    };
    {
        let img = open_recorded(&work, &rec, cache);
        if plans.len() == 1 {
            let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
            run_plan(&mut q, &rec, &mut model, &plans[0], seed);
            drop(q);
        } else {
            // The queues run at once on their own threads; their ops carry marks of one
            // shared clock, so the model sees how they overlap.
            let durability = model.durability;
            let clock = model.clock.clone();
            let ops: Vec<Vec<GuestOp>> = std::thread::scope(|sc_| {
                let hs: Vec<_> = plans
                    .iter()
                    .enumerate()
                    .map(|(t, plan)| {
                        let (img, rec, clock) = (&img, &rec, clock.clone());
                        sc_.spawn(move || {
                            let mut q = Queue::new(img, &QueueOptions::default()).unwrap();
                            let mut m = Model { size: sc.size, base: Vec::new(), ops: Vec::new(), durability, clock };
                            run_plan(&mut q, rec, &mut m, plan, seed ^ ((t as u64 + 1) << 40));
                            drop(q);
                            m.ops
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            model.ops = ops.concat();
        }
        if let Some(bad) = model.ops.iter().find(|o| !o.ok) {
            panic!("seed {seed} ({}): a request failed without injected errors: {}", sc.name, bad.describe());
        }
        // Crash points may also fall inside close (final write-back).
        img.close().unwrap_or_else(|e| panic!("seed {seed}: close: {e}"));
    }
    let events = rec.events();
    let log = Log::new(&events);
    let mode = if sc.l2_less {
        CheckMode::L2Less
    } else if sc.lazy {
        CheckMode::Lazy
    } else {
        CheckMode::Eager
    };
    let state = dir.path().join("state.qcow2");
    for k in 0..states {
        let mut srng = harness_rng(seed.wrapping_mul(1_000_003) ^ (k as u64 + 1));
        // Crash point: anywhere; some right after a flush completed or at the very end.
        let c = match srng.below(8) {
            0 => events.len(),
            1 => {
                let done: Vec<usize> = log.flushes.iter().filter_map(|f| f.1).collect();
                if done.is_empty() { events.len() } else { done[srng.below(done.len() as u64) as usize] + 1 }
            }
            _ => srng.range(1, events.len() as u64) as usize,
        };
        let (bytes, desc) = materialize(&start_bytes, &log, c, &mut srng);
        std::fs::write(&state, &bytes).unwrap();
        let res = check_state(&state, mode, &model, c);
        CHECKED.fetch_add(1, Ordering::Relaxed);
        if let Err(v) = res {
            let kept = keep_copy(&state, &format!("quring-crash-seed{seed}-state{k}.qcow2"));
            let kept_start = keep_copy(&start, &format!("quring-crash-seed{seed}-start.qcow2"));
            if sc.backing {
                keep_copy(&dir.path().join("base.qcow2"), "base.qcow2");
            }
            let ops: String =
                model.ops.iter().enumerate().map(|(i, o)| format!("  op #{i} {}\n", o.describe())).collect();
            let msg = format!(
                "CRASH CONSISTENCY VIOLATION (after {} crash states checked)\nscenario: {} ({sc:?})\nseed: {seed} (reproduce: QURING_CRASH_SEED={seed} \
                 cargo test --test crash -- --nocapture), state #{k} of this workload\n{} events logged\n{desc}\
                 violation: {v}\nguest requests:\n{ops}events from the last durable barrier to the crash point:\n{}state kept at {} (start image {})",
                CHECKED.load(Ordering::Relaxed),
                sc.name,
                events.len(),
                event_listing(&events, log.durable_barrier(c).saturating_sub(1), c),
                kept.display(),
                kept_start.display()
            );
            if std::env::var_os("QURING_CRASH_KEEP_GOING").is_none() {
                panic!("{msg}");
            }
            let first = v.lines().take(2).collect::<Vec<_>>().join(" | ");
            eprintln!("VIOLATION seed {seed} ({}) state #{k} crash point {c}: {first}", sc.name);
            violations.push(format!("seed {seed} ({}) state #{k}: {first}", sc.name));
            return k + 1;
        }
    }
    states
}

#[test]
fn crash_states() {
    let t0 = Instant::now();
    let per = env_u64("QURING_CRASH_PER_WORKLOAD").unwrap_or(10) as usize;
    if let Some(seed) = env_u64("QURING_CRASH_SEED") {
        let mut v = Vec::new();
        let n = run_seed(seed, per.max(40), &mut v);
        eprintln!("crash: seed {seed}: {n} crash states checked in {:.1?}", t0.elapsed());
        assert!(v.is_empty(), "{v:?}");
        return;
    }
    let target = env_u64("QURING_CRASH_STATES").unwrap_or(300) as usize;
    let base = env_u64("QURING_CRASH_SEED_BASE").unwrap_or(0);
    let mut total = 0;
    let mut seed = base;
    let mut workloads = 0;
    let mut violations = Vec::new();
    while total < target {
        total += run_seed(seed, per, &mut violations);
        workloads += 1;
        seed += 1;
        if workloads % 50 == 0 {
            eprintln!("crash: {total} states, {workloads} workloads, {:.0?}", t0.elapsed());
        }
    }
    eprintln!(
        "crash: {total} crash states checked ({workloads} workloads, seeds {base}..{}, {} scenarios) in {:.1?}",
        seed - 1,
        SCENARIOS.len(),
        t0.elapsed()
    );
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
}

/// The checks can fail: a state that loses a flushed data write, and one that maps a guest
/// range to another range's data, must both be reported.
#[test]
fn harness_detects_lost_and_stale_data() {
    let dir = shm_dir();
    let img = dir.path().join("t.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(4096), 4 * MIB);
    let start_bytes = std::fs::read(&img).unwrap();
    let base = read_disk(&img).unwrap();
    let rec = Recorder::new();
    let mut model =
        Model { size: 4 * MIB, base, ops: Vec::new(), durability: Durability::Flushed, clock: Clock::default() };
    let plan = [
        Planned { kind: GKind::Write, off: 0, len: 8192, batch: false },
        Planned { kind: GKind::Write, off: MIB, len: 8192, batch: false },
        Planned { kind: GKind::Flush, off: 0, len: 0, batch: false },
    ];
    {
        let im = open_recorded(&img, &rec, CacheMode::Writeback);
        let mut q = Queue::new(&im, &QueueOptions::default()).unwrap();
        run_plan(&mut q, &rec, &mut model, &plan, 7);
        drop(q);
        im.close().unwrap();
    }
    let events = rec.events();
    let c = events.len();
    let state = dir.path().join("s.qcow2");
    // Everything applied: passes.
    let log = Log::new(&events);
    let (bytes, _) = materialize(&start_bytes, &log, c, &mut harness_rng(1));
    std::fs::write(&state, &bytes).unwrap();
    check_state(&state, CheckMode::Eager, &model, c).unwrap();
    // Lost data writes (metadata kept; the clusters hold zeros): the flushed write is gone.
    let mut lost = Log::new(&events);
    for w in lost.writes.iter_mut().filter(|w| w.kind == quring::io::hook::WriteKind::Data) {
        w.data = Some(std::sync::Arc::new(vec![0; w.len as usize]));
    }
    let (bytes, _) = materialize(&start_bytes, &lost, c, &mut harness_rng(1));
    std::fs::write(&state, &bytes).unwrap();
    let e = check_state(&state, CheckMode::Eager, &model, c).expect_err("lost durable data must be reported");
    assert!(e.contains("not allowed"), "{e}");
    // The second write's data at the first write's host clusters: stale data elsewhere.
    let mut swapped = Log::new(&events);
    let data_of = |o: &GuestOp| -> Vec<DevWrite> {
        swapped
            .writes
            .iter()
            .filter(|w| w.kind == quring::io::hook::WriteKind::Data && w.issued_at >= o.start && w.issued_at < o.end)
            .cloned()
            .collect()
    };
    let (a, b) = (data_of(&model.ops[0]), data_of(&model.ops[1]));
    assert!(!a.is_empty() && a.len() == b.len(), "{}", event_listing(&events, 0, c));
    for w in swapped.writes.iter_mut() {
        if let Some(i) = a.iter().position(|x| x.token == w.token) {
            w.data = b[i].data.clone();
        }
    }
    let (bytes, _) = materialize(&start_bytes, &swapped, c, &mut harness_rng(1));
    std::fs::write(&state, &bytes).unwrap();
    let e = check_state(&state, CheckMode::Eager, &model, c).expect_err("misplaced data must be reported");
    assert!(e.contains("op #1's data for guest offset 0x100000"), "{e}");
}

/// Campaign seeds that once failed, replayed in every run: 7700145 ("512/rb64 lazy QD8",
/// new L2 tables and no dirty slice: the write-back wrote the L1 entry without a device
/// flush after the tables, and a state with the entry but not the table pointed past the
/// end of the file) and 7500180 (the checker's own mistake, see
/// `requests_without_device_events_keep_their_order`).
#[test]
fn campaign_regressions() {
    for seed in [7700145, 7500180] {
        let mut v = Vec::new();
        let n = run_seed(seed, 40, &mut v);
        assert!(n > 0 && v.is_empty(), "seed {seed}: {v:?}");
    }
}

/// Two zero writes that issue no device event (zeros over an unallocated range) share
/// their event marks; the checker orders requests by submission and completion instead, so
/// neither rules out the other (before, each did, and the zeros on disk were reported as a
/// violation: crash campaign seed 7500180, "512/rb64 growth").
#[test]
fn requests_without_device_events_keep_their_order() {
    let dir = shm_dir();
    let img = dir.path().join("t.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(4096), 4 * MIB);
    let start_bytes = std::fs::read(&img).unwrap();
    let base = read_disk(&img).unwrap();
    let rec = Recorder::new();
    let mut model =
        Model { size: 4 * MIB, base, ops: Vec::new(), durability: Durability::Flushed, clock: Clock::default() };
    let plan = [
        Planned { kind: GKind::Zero { unmap: false }, off: 0, len: 8192, batch: false },
        Planned { kind: GKind::Zero { unmap: true }, off: 4096, len: 8192, batch: false },
        Planned { kind: GKind::Flush, off: 0, len: 0, batch: false },
    ];
    {
        let im = open_recorded(&img, &rec, CacheMode::Writeback);
        let mut q = Queue::new(&im, &QueueOptions::default()).unwrap();
        run_plan(&mut q, &rec, &mut model, &plan, 7);
        drop(q);
        im.close().unwrap();
    }
    assert_eq!((model.ops[0].start, model.ops[0].end), (model.ops[1].start, model.ops[1].end), "no device events");
    let events = rec.events();
    let c = events.len();
    let state = dir.path().join("s.qcow2");
    let (bytes, _) = materialize(&start_bytes, &Log::new(&events), c, &mut harness_rng(1));
    std::fs::write(&state, &bytes).unwrap();
    check_state(&state, CheckMode::Eager, &model, c).unwrap();
}

/// Shrink and grow (issue 16 acceptance 5, in part): an overlay shrunk inside a cluster and
/// grown again past its backing file's end, crashed at points all through both: every
/// state checks clean or with leaks only (`qemu-img check` 0 or 3), and the kept range reads
/// what was written there (the overlay's data over the backing file's).
#[test]
fn shrink_and_grow_are_crash_consistent() {
    use quring::queue::ResizeOptions;
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let work = dir.path().join("work.qcow2");
    build_qcow2(&base, &Qcow2Opts::cluster(4096), 4 * MIB, &["write -P 0x11 0 4M".to_string()]);
    let opts = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Qcow2Opts::cluster(4096) };
    build_qcow2(&work, &opts, 4 * MIB, &["write -P 0x22 512k 2M".to_string()]);
    let start_bytes = std::fs::read(&work).unwrap();
    let rec = Recorder::new();
    {
        let img = open_recorded(&work, &rec, CacheMode::Writeback);
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        q.resize(1500 * 1024, &ResizeOptions { shrink: true, ..Default::default() }).unwrap();
        q.resize(6 * MIB, &ResizeOptions::default()).unwrap();
        drop(q);
        img.close().unwrap();
    }
    let events = rec.events();
    let log = Log::new(&events);
    let state = dir.path().join("state.qcow2");
    let mut rng = harness_rng(42);
    let n = events.len();
    let points: Vec<usize> = (1..=n).step_by((n / 60).max(1)).chain([n]).collect();
    for c in points {
        let (bytes, desc) = materialize(&start_bytes, &log, c, &mut rng);
        std::fs::write(&state, &bytes).unwrap();
        let chk = qemu_img(["check", &s(&state)]);
        assert!(matches!(chk.code, Some(0) | Some(3)), "crash point {c}/{n}: {desc}\n{}", chk.describe());
        let r = qemu_io(["-r", "-c", "read -P 0x11 0 512k", "-c", "read -P 0x22 512k 988k", &s(&state)]);
        assert!(r.status() == 0 && !r.stdout.contains("fail"), "crash point {c}/{n}: {desc}\n{}", r.describe());
    }
    // The end state: the new size, zeros past the shrunk end.
    let r = qemu_io(["-r", "-c", "read -P 0 1500k 4644k", &s(&work)]);
    assert!(r.status() == 0 && !r.stdout.contains("fail"), "{}", r.describe());
}

/// Amend (issue 16 acceptance 5, in part): a refcount width change and a downgrade to
/// version 2 that expands zero clusters (over a backing file, some shared with a snapshot),
/// crashed at points all through both: every state checks clean or with leaks only
/// (`qemu-img check` 0 or 3) and shows the same guest content as before (amend changes no
/// content), its snapshot too.
#[test]
fn amend_is_crash_consistent() {
    // Over a backing file zero clusters get new clusters; without one, those that share a
    // snapshot's host cluster become unallocated (references dropped).
    amend_crash_case(true);
    amend_crash_case(false);
}

fn amend_crash_case(backed: bool) {
    use quring::image::{Amend, Options, amend};
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let work = dir.path().join("work.qcow2");
    let orig = dir.path().join("orig.qcow2");
    build_qcow2(&base, &Qcow2Opts::cluster(4096), 4 * MIB, &["write -P 0x11 0 4M".to_string()]);
    let backing = backed.then(|| ("base.qcow2".into(), "qcow2".into()));
    let opts = Qcow2Opts { backing, ..Qcow2Opts::cluster(4096) };
    let cmds = ["write -P 0x22 0 1M", "write -z 256k 128k", "write -z 2M 256k"].map(String::from);
    build_qcow2(&work, &opts, 4 * MIB, &cmds);
    qemu_img(["snapshot", "-c", "s1", &s(&work)]).ok();
    qemu_io_cmds(&work, "qcow2", &["write -z 0 64k".into(), "write -z 3M 64k".into()]);
    std::fs::copy(&work, &orig).unwrap();
    let snap_raw = |p: &Path, n: &str| {
        let out = dir.path().join(n);
        qemu_img(["convert", "-O", "raw", "-l", "snapshot.name=s1", &s(p), &s(&out)]).ok();
        std::fs::read(&out).unwrap()
    };
    let snap_before = snap_raw(&orig, "orig-s1.raw");
    let start_bytes = std::fs::read(&work).unwrap();
    let rec = Recorder::new();
    let o = Options { hook: Some(quring::io::hook::Hook(rec.clone())), ..Default::default() };
    let steps = [
        Amend { refcount_bits: Some(4), ..Default::default() },
        Amend { refcount_bits: Some(16), compat_v2: Some(true), ..Default::default() },
    ];
    for a in &steps {
        amend(&work, &o, a, &mut |_| {}).unwrap();
    }
    let events = rec.events();
    let log = Log::new(&events);
    let state = dir.path().join("state.qcow2");
    let mut rng = harness_rng(7);
    let n = events.len();
    let points: Vec<usize> = (1..=n).step_by((n / 40).max(1)).chain([n]).collect();
    for c in points {
        let (bytes, desc) = materialize(&start_bytes, &log, c, &mut rng);
        std::fs::write(&state, &bytes).unwrap();
        let chk = qemu_img(["check", &s(&state)]);
        assert!(
            matches!(chk.code, Some(0) | Some(3)),
            "backed={backed} crash point {c}/{n}: {desc}\n{}",
            chk.describe()
        );
        let cmp = qemu_img(["compare", &s(&orig), &s(&state)]);
        assert_eq!(cmp.status(), 0, "backed={backed} crash point {c}/{n}: {desc}\n{}", cmp.describe());
        assert!(
            snap_raw(&state, "state-s1.raw") == snap_before,
            "backed={backed} crash point {c}/{n}: snapshot content\n{desc}"
        );
    }
    let v = qemu_img(["info", "--output=json", &s(&work)]).ok().json();
    assert_eq!(v["format-specific"]["data"]["compat"], "0.10");
}
