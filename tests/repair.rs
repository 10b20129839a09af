//! `quring check -r leaks|all` against `qemu-img check -r`: images damaged in controlled
//! ways (leaked clusters, refcounts too high, too low and zero, COPIED flags cleared and set
//! wrongly, the dirty bit with and without stale refcounts) on 512 B, 64 KiB and 2 MiB
//! clusters, refcount widths 1, 16 and 64, v2 and v3, extended L2. Each damaged image is
//! copied; qemu-img repairs one copy and quring the other. The repair runs must print the
//! same text (stdout and stderr, "qemu-img:" read as "quring:") and JSON and exit alike;
//! afterwards `qemu-img check` and `quring check` give identical verdicts on both copies,
//! and the two copies hold the same guest content (`qemu-img compare`).

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// An image configuration.
struct Cfg {
    cluster: u64,
    bits: u32,
    v2: bool,
    extended_l2: bool,
}

impl Cfg {
    fn opts(&self, lazy: bool) -> String {
        let mut o = format!("cluster_size={},refcount_bits={}", self.cluster, self.bits);
        if self.v2 {
            o.push_str(",compat=0.10");
        }
        if self.extended_l2 {
            o.push_str(",extended_l2=on");
        }
        if lazy {
            o.push_str(",lazy_refcounts=on");
        }
        o
    }
    fn name(&self) -> String {
        format!(
            "{}-{}b-{}{}",
            self.cluster,
            self.bits,
            if self.v2 { "v2" } else { "v3" },
            if self.extended_l2 { "-xl2" } else { "" }
        )
    }
}

const CFGS: &[Cfg] = &[
    Cfg { cluster: 65536, bits: 16, v2: false, extended_l2: false },
    Cfg { cluster: 65536, bits: 16, v2: true, extended_l2: false },
    Cfg { cluster: 512, bits: 16, v2: false, extended_l2: false },
    Cfg { cluster: 512, bits: 64, v2: false, extended_l2: false },
    Cfg { cluster: 65536, bits: 1, v2: false, extended_l2: false },
    Cfg { cluster: 65536, bits: 64, v2: false, extended_l2: true },
    Cfg { cluster: 2 << 20, bits: 16, v2: false, extended_l2: false },
];

/// The writes every image gets (the last one leaves a cluster shared with the snapshot,
/// when there is one).
const WRITES: &[&str] = &["write -P 1 0 128k", "write -P 2 1M 64k", "write -P 3 40M 64k"];

/// Guest offset whose cluster the damage targets (its own cluster at every size, and not
/// rewritten after the snapshot).
const TARGET: u64 = 40 << 20;

fn make(dir: &Path, name: &str, cfg: &Cfg, lazy: bool, snapshot: bool) -> PathBuf {
    let p = dir.join(name);
    qemu_img(["create", "-q", "-f", "qcow2", "-o", &cfg.opts(lazy), &s(&p), "64M"]).ok();
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for w in WRITES {
        args.extend(["-c".into(), w.to_string()]);
    }
    args.push(s(&p));
    qemu_io(&args).ok();
    if snapshot {
        qemu_img(["snapshot", "-c", "s1", &s(&p)]).ok();
        // Cluster 0 is copied on write; the one at TARGET stays shared (refcount 2).
        qemu_io(["-f", "qcow2", "-c", "write -P 4 0 64k", &s(&p)]).ok();
    }
    p
}

/// The layout facts the damage needs.
struct Layout {
    cs: u64,
    order: u32,
    l1: u64,
    reftable: u64,
    entry: u64,
}

fn layout(p: &Path) -> Layout {
    let cs = 1u64 << read_be32(p, 20);
    let order = if read_be32(p, 4) >= 3 { read_be32(p, 96) } else { 4 };
    let incompat = if read_be32(p, 4) >= 3 { read_be64(p, 72) } else { 0 };
    Layout {
        cs,
        order,
        l1: read_be64(p, 40),
        reftable: read_be64(p, 48),
        entry: if incompat & (1 << 4) != 0 { 16 } else { 8 },
    }
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

/// File offsets of the L1 entry and L2 entry that map guest offset `g`.
fn entries(p: &Path, g: u64) -> (u64, u64) {
    let l = layout(p);
    let l2_entries = l.cs / l.entry;
    let c = g / l.cs;
    let l1_pos = l.l1 + 8 * (c / l2_entries);
    let l2 = read_be64(p, l1_pos) & OFFSET_MASK;
    (l1_pos, l2 + (c % l2_entries) * l.entry)
}

/// Host cluster index of the data at guest offset `g`.
fn data_cluster(p: &Path, g: u64) -> u64 {
    let (_, l2e) = entries(p, g);
    (read_be64(p, l2e) & OFFSET_MASK) / layout(p).cs
}

/// Sets the stored refcount of host cluster `k` (its refcount block must exist).
fn set_refcount(p: &Path, k: u64, v: u64) {
    let l = layout(p);
    let per_block = (l.cs * 8) >> l.order;
    let block = read_be64(p, l.reftable + 8 * (k / per_block)) & OFFSET_MASK;
    assert_ne!(block, 0, "{}: no refcount block for cluster {k}", p.display());
    let i = k % per_block;
    let bits = 1u64 << l.order;
    let bit = i * bits;
    let byte = block + bit / 8;
    match bits {
        1 | 2 | 4 => {
            let mut b = read_bytes(p, byte, 1)[0];
            let shift = bit % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b = (b & !mask) | ((v as u8) << shift & mask);
            patch_u8(p, byte, b);
        }
        8 => patch_u8(p, byte, v as u8),
        16 => patch_be16(p, byte, v as u16),
        32 => patch_be32(p, byte, v as u32),
        _ => patch_be64(p, byte, v),
    }
}

/// One way of damaging an image.
struct Damage {
    name: &'static str,
    /// Needs an internal snapshot (refcounts of 2: widths of 2 bits and more).
    snapshot: bool,
    /// Made with lazy refcounts and left dirty (v3 only).
    lazy: bool,
    /// Needs refcounts above 1.
    wide: bool,
    /// Needs v3 (zero clusters) and clusters above 512 bytes (a misaligned offset).
    v3: bool,
    apply: fn(&Path),
}

const DAMAGES: &[Damage] = &[
    Damage {
        name: "leaked cluster past the data",
        snapshot: false,
        lazy: false,
        wide: false,
        v3: false,
        apply: |p| {
            let len = file_len(p);
            let cs = layout(p).cs;
            truncate_file(p, len.next_multiple_of(cs) + cs);
            set_refcount(p, len.div_ceil(cs), 1);
        },
    },
    Damage {
        name: "refcounts too high (header, data)",
        snapshot: false,
        lazy: false,
        wide: true,
        v3: false,
        apply: |p| {
            set_refcount(p, 0, 2);
            set_refcount(p, data_cluster(p, TARGET), 3);
        },
    },
    Damage {
        name: "refcount too low (shared cluster)",
        snapshot: true,
        lazy: false,
        wide: true,
        v3: false,
        apply: |p| set_refcount(p, data_cluster(p, TARGET), 1),
    },
    Damage {
        name: "refcount zero (rebuild)",
        snapshot: false,
        lazy: false,
        wide: false,
        v3: false,
        apply: |p| set_refcount(p, data_cluster(p, TARGET), 0),
    },
    Damage {
        name: "COPIED cleared (L1 and L2)",
        snapshot: false,
        lazy: false,
        wide: false,
        v3: false,
        apply: |p| {
            let (l1, l2) = entries(p, TARGET);
            patch_be64(p, l1, read_be64(p, l1) & !COPIED);
            patch_be64(p, l2, read_be64(p, l2) & !COPIED);
        },
    },
    Damage {
        name: "COPIED set on a shared cluster (and its L2 table, where shared)",
        snapshot: true,
        lazy: false,
        wide: true,
        v3: false,
        apply: |p| {
            let (l1, l2) = entries(p, TARGET);
            patch_be64(p, l2, read_be64(p, l2) | COPIED);
            patch_be64(p, l1, read_be64(p, l1) | COPIED);
        },
    },
    Damage {
        name: "mixed: leaks, a refcount too low, COPIED cleared",
        snapshot: true,
        lazy: false,
        wide: true,
        v3: false,
        apply: |p| {
            set_refcount(p, 0, 2);
            set_refcount(p, data_cluster(p, TARGET), 1);
            let (_, l2) = entries(p, 0);
            patch_be64(p, l2, read_be64(p, l2) & !COPIED);
        },
    },
    Damage {
        name: "dirty, refcounts stale (lazy refcounts, crash)",
        snapshot: false,
        lazy: true,
        wide: false,
        v3: false,
        apply: |p| {
            let r =
                qemu_io(["-f", "qcow2", "-c", "write -P 7 8M 192k", "-c", "write -P 8 0 64k", "-c", "abort", &s(p)]);
            assert!(!r.success());
            assert_eq!(read_be64(p, 72) & 1, 1, "dirty bit");
        },
    },
    Damage {
        name: "preallocated zero cluster misaligned",
        snapshot: false,
        lazy: false,
        wide: false,
        v3: true,
        apply: |p| {
            let cs = layout(p).cs;
            let r = qemu_io(["-f", "qcow2", "-c", &format!("write -z {TARGET} {cs}"), &s(p)]);
            assert!(r.success());
            let (_, l2) = entries(p, TARGET);
            let e = read_be64(p, l2);
            assert_ne!(e & OFFSET_MASK, 0, "a preallocated zero cluster");
            patch_be64(p, l2, e + 0x200);
        },
    },
    Damage {
        name: "dirty, refcounts right",
        snapshot: false,
        lazy: true,
        wide: false,
        v3: false,
        apply: |p| patch_be64(p, 72, read_be64(p, 72) | 1),
    },
];

/// qemu-img's output in quring's words.
fn as_quring(t: &str) -> String {
    t.replace("qemu-img: ", "quring: ")
}

/// Repairs copies of `damaged` with both tools in `mode` (and `json`) and compares.
fn repair_both(damaged: &Path, mode: &str, json: bool, ctx: &str) {
    let dir = damaged.parent().unwrap();
    let tag = format!("{mode}{}", if json { "-json" } else { "" });
    let q = dir.join(format!("qemu-{tag}.qcow2"));
    let o = dir.join(format!("ours-{tag}.qcow2"));
    std::fs::copy(damaged, &q).unwrap();
    std::fs::copy(damaged, &o).unwrap();
    let mut args = vec!["check", "-r", mode];
    if json {
        args.push("--output=json");
    }
    let qr = qemu_img(args.iter().copied().chain([s(&q).as_str()]));
    let or = quring(args.iter().copied().chain([s(&o).as_str()]));
    let ctx = format!("{ctx}, check -r {tag}\nqemu-img:\n{}\nquring:\n{}", qr.describe(), or.describe());
    assert_eq!(qr.status(), or.status(), "exit codes: {ctx}");
    assert_eq!(qr.stdout.replace(&s(&q), "IMG"), or.stdout.replace(&s(&o), "IMG"), "stdout: {ctx}");
    assert_eq!(as_quring(&qr.stderr), or.stderr, "stderr: {ctx}");

    // Identical verdicts afterwards, from both checkers.
    for tool in ["qemu-img", "quring"] {
        let c = |p: &Path| {
            let r = if tool == "qemu-img" { qemu_img(["check", &s(p)]) } else { quring(["check", &s(p)]) };
            (r.status(), r.stdout, r.stderr)
        };
        assert_eq!(c(&q), c(&o), "{tool} check after the repairs: {ctx}");
    }
    // The dirty bit ends alike (except where QEMU's close clears it after a repair that
    // failed: quring keeps an image whose refcounts are still wrong marked dirty).
    if qr.status() != 1 && read_be32(&q, 4) >= 3 {
        assert_eq!(read_be64(&q, 72), read_be64(&o, 72), "incompatible features: {ctx}");
    }
    // The same guest content (an image left corrupt cannot be read: then the same bytes).
    if qemu_img(["check", &s(&q)]).status() == 2 {
        // (The incompatible features aside: see the dirty bit above.)
        let bytes = |p: &Path| {
            let mut b = std::fs::read(p).unwrap();
            b[72..80].fill(0);
            b
        };
        assert!(bytes(&q) == bytes(&o), "files differ: {ctx}");
    } else {
        let cmp = qemu_img(["compare", "-q", "-f", "qcow2", "-F", "qcow2", &s(&q), &s(&o)]);
        assert_eq!(cmp.status(), 0, "guest content: {ctx}\n{}", cmp.describe());
    }
    std::fs::remove_file(&q).unwrap();
    std::fs::remove_file(&o).unwrap();
}

/// Every damage on one configuration, both modes (and JSON on the first configuration).
fn repairs_match_qemu_img(ci: usize) {
    let cfg = &CFGS[ci];
    let d = tempdir();
    let mut cases = 0;
    for dm in DAMAGES {
        if (dm.wide && cfg.bits < 2)
            || ((dm.lazy || dm.v3) && cfg.v2)
            || (dm.v3 && cfg.cluster == 512)
            || (dm.snapshot && cfg.bits < 2)
        {
            continue;
        }
        let dir = d.path().join(format!("{}-{}", cfg.name(), cases));
        std::fs::create_dir(&dir).unwrap();
        let p = make(&dir, "damaged.qcow2", cfg, dm.lazy, dm.snapshot);
        (dm.apply)(&p);
        let ctx = format!("{} / {}", cfg.name(), dm.name);
        let before = qemu_img(["check", &s(&p)]);
        let dirty = read_be32(&p, 4) >= 3 && read_be64(&p, 72) & 1 != 0;
        assert!(before.status() != 0 || dirty, "the damage shows: {ctx}\n{}", before.describe());
        for mode in ["leaks", "all"] {
            repair_both(&p, mode, false, &ctx);
            if ci == 0 {
                repair_both(&p, mode, true, &ctx);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        cases += 1;
    }
    assert!(cases >= 4, "{cases} cases");
}

#[test]
fn repairs_64k_16bit_v3() {
    repairs_match_qemu_img(0);
}
#[test]
fn repairs_64k_16bit_v2() {
    repairs_match_qemu_img(1);
}
#[test]
fn repairs_512_16bit() {
    repairs_match_qemu_img(2);
}
#[test]
fn repairs_512_64bit() {
    repairs_match_qemu_img(3);
}
#[test]
fn repairs_64k_1bit() {
    repairs_match_qemu_img(4);
}
#[test]
fn repairs_64k_64bit_extended_l2() {
    repairs_match_qemu_img(5);
}
#[test]
fn repairs_2m_16bit() {
    repairs_match_qemu_img(6);
}

/// A clean image: nothing to repair, both say so, exit 0.
#[test]
fn clean_image_and_bad_mode() {
    let d = tempdir();
    let p = make(d.path(), "clean.qcow2", &CFGS[0], false, true);
    for mode in ["leaks", "all"] {
        repair_both(&p, mode, false, "clean");
        repair_both(&p, mode, true, "clean");
    }
    // Raw images (probed: with the warning for writing), -U, a missing file, -q.
    let raw = d.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let dir = d.path();
    for args in [
        &["check", "-r", "leaks", "r.raw"][..],
        &["check", "-r", "all", "-f", "raw", "r.raw"],
        &["check", "-r", "all", "-U", "clean.qcow2"],
        &["check", "-r", "all", "missing.qcow2"],
    ] {
        let q = run_in(dir, "qemu-img", args);
        let o = quring_in(dir, args);
        assert_eq!((o.status(), o.stdout.as_str()), (q.status(), q.stdout.as_str()), "{args:?}");
        assert_eq!(as_quring(&q.stderr), o.stderr, "{args:?}");
    }
    let leaky = make(d.path(), "leaky.qcow2", &CFGS[0], false, false);
    set_refcount(&leaky, 0, 5);
    for mode in ["leaks", "all"] {
        let (q, o) = (d.path().join("q.qcow2"), d.path().join("o.qcow2"));
        std::fs::copy(&leaky, &q).unwrap();
        std::fs::copy(&leaky, &o).unwrap();
        let qr = qemu_img(["check", "-q", "-r", mode, &s(&q)]);
        let or = quring(["check", "-q", "-r", mode, &s(&o)]);
        assert_eq!(
            (qr.status(), qr.stdout.as_str(), qr.stderr.as_str()),
            (or.status(), or.stdout.as_str(), or.stderr.as_str())
        );
        let qr = qemu_img(["check", "-q", &s(&leaky)]);
        let or = quring(["check", "-q", &s(&leaky)]);
        assert_eq!(
            (qr.status(), qr.stdout.as_str(), qr.stderr.as_str()),
            (or.status(), or.stdout.as_str(), or.stderr.as_str())
        );
    }
    let q = qemu_img(["check", "-r", "some", &s(&p)]);
    let o = quring(["check", "-r", "some", &s(&p)]);
    assert_eq!((q.status(), o.status()), (1, 1));
    assert!(o.stderr.contains("--repair (-r) expects 'leaks' or 'all' not 'some'"), "{}", o.describe());
}

/// Stops a repair at its `n`th write: that write and every later one fail (a crash there,
/// with everything issued before on the disk), counting the writes it saw.
struct StopAt {
    n: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl quring::io::hook::IoHook for StopAt {
    fn fail_write(&self, _kind: quring::io::hook::WriteKind, _off: u64, _len: u64) -> Option<i32> {
        let i = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (i >= self.n).then_some(libc::EIO)
    }
    fn issued(&self, _kind: quring::io::hook::WriteKind, _off: u64, _data: quring::io::hook::WriteData<'_>) -> u64 {
        0
    }
    fn completed(&self, _token: u64) {}
    fn flush_issued(&self) -> u64 {
        0
    }
    fn flush_completed(&self, _token: u64, _ok: bool) {}
}

/// Runs `check -r all` in the library on `p`, crashing at write `n` (never with
/// `usize::MAX`); returns how many writes the repair issued or tried.
fn repair_stopping_at(p: &Path, n: usize) -> usize {
    let hook = std::sync::Arc::new(StopAt { n, seen: Default::default() });
    let ring = quring::io::SyncRing::with_hook(Some(quring::io::hook::Hook(hook.clone()))).unwrap();
    let file = quring::io::ImageFile::open(p, true).unwrap();
    let r = quring::check::repair(&ring, &file, quring::check::Fix::ALL);
    if n == usize::MAX {
        r.unwrap();
    }
    hook.seen.load(std::sync::atomic::Ordering::SeqCst)
}

/// (exit status, corruptions, leaks) of `qemu-img check`.
fn verdict(p: &Path) -> (i32, u64, u64) {
    let r = qemu_img(["check", "--output=json", &s(p)]);
    let j = r.json();
    (r.status(), j["corruptions"].as_u64().unwrap_or(0), j["leaks"].as_u64().unwrap_or(0))
}

/// A repair interrupted at any of its writes leaves no corruption it did not find (at worst
/// leaked clusters more), the guest content is untouched, and repairing again finishes the
/// job: refcount increases are durable before decreases, a rebuilt structure before the
/// header points at it, COPIED flags are corrected after the refcounts.
#[test]
fn interrupted_repairs_leave_at_worst_leaks() {
    let d = tempdir();
    for (ci, cfg) in [&CFGS[2]].into_iter().enumerate() {
        for dm in DAMAGES.iter().filter(|dm| !(dm.v3 && cfg.cluster == 512)) {
            let dir = d.path().join(format!("c{ci}-{}", dm.name.replace(' ', "_")));
            std::fs::create_dir(&dir).unwrap();
            let damaged = make(&dir, "damaged.qcow2", cfg, dm.lazy, dm.snapshot);
            (dm.apply)(&damaged);
            let ctx = format!("{} / {}", cfg.name(), dm.name);
            let (_, corrupt_before, _) = verdict(&damaged);
            let work = dir.join("work.qcow2");
            std::fs::copy(&damaged, &work).unwrap();
            let writes = repair_stopping_at(&work, usize::MAX);
            assert_eq!(verdict(&work).0, 0, "{ctx}: a whole repair");
            for n in 0..writes {
                std::fs::copy(&damaged, &work).unwrap();
                repair_stopping_at(&work, n);
                let (code, corrupt, _) = verdict(&work);
                assert!(
                    corrupt <= corrupt_before && code != 1,
                    "{ctx}: crash at write {n} of {writes}: qemu-img check exit {code}, {corrupt} corruptions (before: {corrupt_before})"
                );
                let cmp = qemu_img(["compare", "-q", "-f", "qcow2", "-F", "qcow2", &s(&damaged), &s(&work)]);
                assert_eq!(cmp.status(), 0, "{ctx}: crash at write {n}: guest content changed");
                repair_stopping_at(&work, usize::MAX);
                assert_eq!(verdict(&work).0, 0, "{ctx}: repair after a crash at write {n}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Random refcount damage (zeros, leaks, raises) on images with several refcount blocks
/// and a snapshot, and a refcount table entry that shares a block (a rebuild): both tools
/// print the same repair and leave byte-identical files (QEMU's rebuild layout included).
#[test]
fn random_damage_repairs_byte_identical() {
    let d = tempdir();
    let dir = d.path();
    for (cfg, snapshot) in [("cluster_size=512,refcount_bits=16", true), ("cluster_size=1k,refcount_bits=1", false)] {
        let base = dir.join("base.qcow2");
        qemu_img(["create", "-q", "-f", "qcow2", "-o", cfg, &s(&base), "256M"]).ok();
        qemu_io([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 3M",
            "-c",
            "write -P 2 10M 2M",
            "-c",
            "write -P 3 100M 1M",
            &s(&base),
        ])
        .ok();
        if snapshot {
            qemu_img(["snapshot", "-c", "s", &s(&base)]).ok();
            qemu_io(["-f", "qcow2", "-c", "write -P 4 1M 1M", &s(&base)]).ok();
        }
        let l = layout(&base);
        let clusters = file_len(&base) / l.cs;
        let max = if l.order == 0 { 1 } else { 3 };
        for seed in 1..=4u64 {
            let damaged = dir.join("damaged.qcow2");
            std::fs::copy(&base, &damaged).unwrap();
            let mut rng = Rng(seed);
            for _ in 0..30 {
                let k = rng.below(clusters);
                set_refcount(&damaged, k, rng.below(max + 1));
            }
            if seed == 4 {
                // Refcount table entry 1 points at block 0 as well.
                patch_be64(&damaged, l.reftable + 8, read_be64(&damaged, l.reftable));
            }
            let ctx = format!("{cfg} seed {seed}");
            for mode in ["leaks", "all"] {
                let (q, o) = (dir.join("q.qcow2"), dir.join("o.qcow2"));
                std::fs::copy(&damaged, &q).unwrap();
                std::fs::copy(&damaged, &o).unwrap();
                let qr = qemu_img(["check", "-r", mode, &s(&q)]);
                let or = quring(["check", "-r", mode, &s(&o)]);
                assert_eq!(qr.status(), or.status(), "{ctx} -r {mode}\n{}\n{}", qr.describe(), or.describe());
                assert_eq!(qr.stdout.replace(&s(&q), "IMG"), or.stdout.replace(&s(&o), "IMG"), "{ctx} -r {mode}");
                assert_eq!(qr.stderr.replace("qemu-img: ", "quring: "), or.stderr, "{ctx} -r {mode}");
                assert_eq!(first_difference(&q, &o).unwrap(), None, "{ctx} -r {mode}: files differ");
            }
        }
    }
}
