//! What a write costs on the device (issue 15, items 1 and 2), read from the counters: a
//! request that allocates several clusters is one data write per contiguous host range, and
//! a write that needs no copy-on-write writes exactly the guest's bytes. Every image is
//! then checked by `qemu-img check` and compared with a raw file built by `qemu-io` from the
//! same writes.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Queue, QueueOptions};

const MIB: u64 = 1 << 20;

/// One step of [`run_ops`].
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Write (offset, length) of a pattern.
    Write(u64, u64),
    /// Zero write (offset, length), without unmap.
    Zero(u64, u64),
}

/// What [`run_ops`] read from the counters over the steps.
#[derive(Debug, Default)]
struct Moved {
    data_writes: u64,
    data_bytes: u64,
    cow_bytes: u64,
    zero_fill_bytes: u64,
    /// Guest bytes of the writes.
    guest: u64,
}

/// Applies `ops` to a fresh image of `opts` through one queue, one request at a time, and
/// returns what moved, from the counters. With `backing` (qemu-io commands building a raw
/// backing file of the image's size), the image is an overlay over that file. Checks the
/// image and its content against qemu-io's raw result of the same commands.
fn run_ops(opts: &Qcow2Opts, size: u64, backing: Option<&[String]>, ops: &[Op]) -> Moved {
    let dir = tempdir();
    let img_path = dir.path().join("w.qcow2");
    let raw_path = dir.path().join("w.raw");
    let mut opts = opts.clone();
    let mut cmds: Vec<String> = Vec::new();
    if let Some(b) = backing {
        let back = dir.path().join("back.raw");
        build_raw(&back, size, b);
        opts.backing = Some((s(&back), "raw".into()));
        cmds.extend(b.iter().cloned());
    }
    create_qcow2(&img_path, &opts, size);
    let img = Image::open(&img_path, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let before = img.counters();
    let mut guest = 0;
    for (i, &op) in ops.iter().enumerate() {
        match op {
            Op::Write(off, len) => {
                let pat = (i % 200 + 1) as u8;
                let mut b = AlignedBuf::new(len as usize);
                b.fill(pat);
                q.write_at(&b, off).unwrap();
                cmds.push(format!("write -P {pat} {off} {len}"));
                guest += len;
            }
            Op::Zero(off, len) => {
                q.write_zeroes(off, len, false).unwrap();
                cmds.push(format!("write -z {off} {len}"));
            }
        }
    }
    let after = img.counters();
    q.flush().unwrap();
    drop(q);
    img.close().unwrap();
    drop(img);
    let r = qemu_img(["check", &s(&img_path)]);
    assert_eq!(r.status(), 0, "{}: {}", opts.create_options(), r.describe());
    build_raw(&raw_path, size, &cmds);
    let r = qemu_img(["compare", "-f", "qcow2", "-F", "raw", &s(&img_path), &s(&raw_path)]);
    assert_eq!(r.status(), 0, "{}: {:?}: {}", opts.create_options(), ops, r.describe());
    Moved {
        data_writes: after.data_writes - before.data_writes,
        data_bytes: after.data_write_bytes - before.data_write_bytes,
        cow_bytes: after.cow_bytes - before.cow_bytes,
        zero_fill_bytes: after.zero_fill_bytes - before.zero_fill_bytes,
        guest,
    }
}

/// Writes `writes` (offset, length) to a fresh image of `opts` (see [`run_ops`]) and
/// returns (data writes, data bytes written, guest bytes) from the counters.
fn run(opts: &Qcow2Opts, size: u64, writes: &[(u64, u64)]) -> (u64, u64, u64) {
    let ops: Vec<Op> = writes.iter().map(|&(o, l)| Op::Write(o, l)).collect();
    let m = run_ops(opts, size, None, &ops);
    (m.data_writes, m.data_bytes, m.guest)
}

/// Sequential 1 MiB writes of whole clusters on a fresh image: no copy-on-write (device
/// bytes = guest bytes), and one data write per request when the request's clusters come
/// from one reserved batch (64 clusters: true for 64 KiB and 2 MiB clusters here).
#[test]
fn sequential_whole_cluster_writes_are_one_write_per_request() {
    for (cluster, ext) in [(65536, false), (65536, true), (2 * MIB as u32, false), (2 * MIB as u32, true)] {
        let opts = Qcow2Opts { extended_l2: ext, ..Qcow2Opts::cluster(cluster) };
        let chunk = MIB.max(cluster as u64);
        let writes: Vec<(u64, u64)> = (0..8).map(|i| (i * chunk, chunk)).collect();
        let (n, bytes, guest) = run(&opts, 64 * MIB, &writes);
        assert_eq!(bytes, guest, "{}: device bytes per guest byte", opts.create_options());
        assert_eq!(n, writes.len() as u64, "{}: data writes for {} requests", opts.create_options(), writes.len());
    }
}

/// Small clusters: a 1 MiB request spans several reserved batches, so it may take a few
/// writes (one per contiguous host range), never one per cluster, and never more bytes.
#[test]
fn small_cluster_writes_take_one_write_per_host_range() {
    for cluster in [512u32, 4096] {
        let opts = Qcow2Opts::cluster(cluster);
        let writes: Vec<(u64, u64)> = (0..4).map(|i| (i * MIB, MIB)).collect();
        let (n, bytes, guest) = run(&opts, 16 * MIB, &writes);
        assert_eq!(bytes, guest, "cluster {cluster}: device bytes per guest byte");
        let clusters = guest / cluster as u64;
        // At most one write per batch of 64 clusters (plus one per request for the edges).
        assert!(n <= clusters / 64 + writes.len() as u64, "cluster {cluster}: {n} data writes for {clusters} clusters");
    }
}

/// Requests that start and end inside clusters (and inside subclusters): the edges are
/// still written without copy-on-write on a fresh image without backing file, the middle
/// in one write with them where the host clusters follow each other; the content is
/// qemu-io's.
#[test]
fn unaligned_multi_cluster_writes_match_qemu() {
    for (cluster, ext) in [(4096u32, false), (65536, false), (65536, true), (2 * MIB as u32, true)] {
        let opts = Qcow2Opts { extended_l2: ext, ..Qcow2Opts::cluster(cluster) };
        let c = cluster as u64;
        let writes = vec![(512, 3 * c), (5 * c + 1024, 2 * c + 2048), (9 * c - 512, c + 1024), (20 * c, 4 * c)];
        let size = (32 * c).max(MIB);
        let (n, bytes, guest) = run(&opts, size, &writes);
        if ext {
            // Partly written subclusters are written whole (zeros around the guest's bytes,
            // through a bounce buffer): at most a head, a middle and a tail write.
            assert!(
                n >= writes.len() as u64 && n <= writes.len() as u64 * 3,
                "{}: {n} data writes",
                opts.create_options()
            );
        } else {
            assert_eq!(bytes, guest, "{}: device bytes per guest byte", opts.create_options());
            assert_eq!(n, writes.len() as u64, "{}: data writes", opts.create_options());
        }
    }
}

// ---------------------------------------------------------------------------
// The whole matrix: every cluster size, extended L2, refcount widths, lazy refcounts and
// L2-less ranges; requests in flight together.

const KIB: u64 = 1024;

/// Every cluster size qcow2 allows.
const CLUSTER_SIZES: [u64; 13] =
    [512, KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB];

/// One image layout of the matrix.
struct Layout {
    cluster: u64,
    /// Made by `qemu-img create` with these options, or (None) an L2-less image made by
    /// `quring create` (QEMU cannot open those).
    qemu: Option<Qcow2Opts>,
    /// `quring create -o` options of an L2-less image.
    l2less: String,
}

impl Layout {
    fn qemu(opts: Qcow2Opts) -> Layout {
        Layout { cluster: opts.cluster_size as u64, qemu: Some(opts), l2less: String::new() }
    }

    fn name(&self) -> String {
        match &self.qemu {
            Some(o) => o.create_options(),
            None => self.l2less.clone(),
        }
    }

    fn create(&self, path: &std::path::Path, size: u64) {
        match &self.qemu {
            Some(o) => create_qcow2(path, o, size),
            None => {
                let r = quring(["create", "-q", "-o", &self.l2less, &s(path), &size.to_string()]);
                assert_eq!(r.status(), 0, "{}", r.describe());
            }
        }
    }

    /// Checks the image (QEMU's check; an L2-less one is checked by quring, converted to
    /// the standard layout and that checked by QEMU) and compares its content with the raw
    /// file qemu-io made from the same writes.
    fn verify(&self, dir: &std::path::Path, img: &std::path::Path, raw: &std::path::Path) {
        let what = self.name();
        let std_img = if self.qemu.is_some() {
            img.to_path_buf()
        } else {
            let r = quring(["check", &s(img)]);
            assert_eq!(r.status(), 0, "{what}: quring check\n{}", r.describe());
            let std_img = dir.join("converted.qcow2");
            let r = quring(["convert", "-O", "qcow2", &s(img), &s(&std_img)]);
            assert_eq!(r.status(), 0, "{what}: {}", r.describe());
            std_img
        };
        let r = qemu_img(["check", &s(&std_img)]);
        assert_eq!(r.status(), 0, "{what}: {}", r.describe());
        let r = qemu_img(["compare", "-f", "qcow2", "-F", "raw", &s(&std_img), &s(raw)]);
        assert_eq!(r.status(), 0, "{what}: {}", r.describe());
    }

    /// The host runs of written data (`map --output=json`: `qemu-img map`, or `quring map`
    /// for an L2-less image) as (guest start, guest end) ranges.
    fn host_runs(&self, img: &std::path::Path) -> Vec<(u64, u64)> {
        let r = if self.qemu.is_some() {
            qemu_img(["map", "--output=json", &s(img)])
        } else {
            quring(["map", "--output=json", &s(img)])
        };
        assert_eq!(r.status(), 0, "{}", r.describe());
        let v = r.json();
        v.as_array()
            .expect("map: a JSON array")
            .iter()
            .filter(|e| e["data"] == true && e["zero"] == false && e.get("offset").is_some())
            .map(|e| {
                let start = e["start"].as_u64().unwrap();
                (start, start + e["length"].as_u64().unwrap())
            })
            .collect()
    }
}

/// Every layout of the matrix: each cluster size with 16- and 1-bit refcounts, extended
/// L2 where the cluster allows it (16 KiB and up), lazy refcounts, and L2-less ranges.
fn matrix() -> Vec<Layout> {
    let mut v = Vec::new();
    for cs in CLUSTER_SIZES {
        let base = Qcow2Opts::cluster(cs as u32);
        v.push(Layout::qemu(base.clone()));
        v.push(Layout::qemu(Qcow2Opts { refcount_bits: 1, ..base.clone() }));
        v.push(Layout::qemu(Qcow2Opts { lazy_refcounts: true, ..base.clone() }));
        if cs >= 16 * KIB {
            v.push(Layout::qemu(Qcow2Opts { extended_l2: true, ..base.clone() }));
            v.push(Layout::qemu(Qcow2Opts { extended_l2: true, refcount_bits: 1, ..base.clone() }));
        }
        v.push(Layout { cluster: cs, qemu: None, l2less: format!("l2_less=on,cluster_size={cs}") });
    }
    v
}

/// What a run of writes cost, from the counters.
struct Cost {
    data_writes: u64,
    data_bytes: u64,
    cow_bytes: u64,
    zero_fill_bytes: u64,
    guest_bytes: u64,
}

/// Writes `writes` (offset, length) to a fresh image of `layout` with up to `depth`
/// requests in flight on one queue, then verifies the image against qemu-io's result.
/// Returns the cost and the image's host runs.
fn run_layout(layout: &Layout, size: u64, writes: &[(u64, u64)], depth: usize) -> (Cost, Vec<(u64, u64)>) {
    use quring::queue::{Completion, Op, Request};
    let dir = tempdir();
    let img_path = dir.path().join("w.qcow2");
    let raw_path = dir.path().join("w.raw");
    layout.create(&img_path, size);
    let img = Image::open(&img_path, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let bufs: Vec<AlignedBuf> = writes
        .iter()
        .enumerate()
        .map(|(i, &(_, len))| {
            let mut b = AlignedBuf::new(len as usize);
            b.fill((i % 200 + 1) as u8);
            b
        })
        .collect();
    let before = img.counters();
    let (mut next, mut in_flight, mut done) = (0, 0, Vec::<Completion>::new());
    while next < writes.len() || in_flight > 0 {
        while next < writes.len() && in_flight < depth {
            let (offset, len) = writes[next];
            let op = Op::Write { offset, buf: bufs[next].as_ptr(), len: len as usize };
            // SAFETY: `bufs` outlives every request: all are reaped before it is dropped.
            unsafe { q.submit(Request { op, user_data: next as u64 }).unwrap() };
            next += 1;
            in_flight += 1;
        }
        done.clear();
        q.reap(&mut done, 1, None).unwrap();
        for c in &done {
            assert_eq!(c.result, 0, "{}: write {}", layout.name(), c.user_data);
            in_flight -= 1;
        }
    }
    let after = img.counters();
    q.flush().unwrap();
    drop(q);
    img.close().unwrap();
    drop(img);
    let cmds: Vec<String> =
        writes.iter().enumerate().map(|(i, &(off, len))| format!("write -P {} {off} {len}", i % 200 + 1)).collect();
    build_raw(&raw_path, size, &cmds);
    layout.verify(dir.path(), &img_path, &raw_path);
    let runs = layout.host_runs(&img_path);
    let cost = Cost {
        data_writes: after.data_writes - before.data_writes,
        data_bytes: after.data_write_bytes - before.data_write_bytes,
        cow_bytes: after.cow_bytes - before.cow_bytes,
        zero_fill_bytes: after.zero_fill_bytes - before.zero_fill_bytes,
        guest_bytes: writes.iter().map(|w| w.1).sum(),
    };
    (cost, runs)
}

/// Host runs of `runs` that guest range `[off, off + len)` touches.
fn runs_touched(runs: &[(u64, u64)], off: u64, len: u64) -> u64 {
    runs.iter().filter(|&&(a, b)| a < off + len && off < b).count() as u64
}

/// Sequential writes of whole clusters on a fresh image, one at a time and with 8 in
/// flight: exactly the guest's bytes reach the device (no copy-on-write), each request
/// is one data write per host run it covers, and the content is qemu-io's. With 8 in
/// flight, 2 MiB clusters take two 1 MiB requests each, which share a new cluster: the
/// second waits for the first's allocation and writes in place (it wrote its data twice,
/// 1.5 device bytes per guest byte, before).
#[test]
fn sequential_writes_write_only_the_guest_bytes_in_every_layout() {
    for layout in matrix() {
        let cs = layout.cluster;
        let total = 4 * MIB.max(cs);
        for (chunk, depth) in [(MIB.max(cs), 1), (MIB, 8)] {
            let writes: Vec<(u64, u64)> = (0..total / chunk).map(|i| (i * chunk, chunk)).collect();
            let (cost, runs) = run_layout(&layout, total + 8 * MIB, &writes, depth);
            let what = format!("{} ({} requests of {chunk}, {depth} in flight)", layout.name(), writes.len());
            assert_eq!(cost.data_bytes, cost.guest_bytes, "{what}: device data bytes per guest byte");
            assert_eq!(cost.cow_bytes, 0, "{what}: copy-on-write bytes");
            assert_eq!(cost.zero_fill_bytes, 0, "{what}: zero fill bytes");
            let expect: u64 = writes.iter().map(|&(o, l)| runs_touched(&runs, o, l)).sum();
            assert_eq!(cost.data_writes, expect, "{what}: data writes (host runs {runs:x?})");
            assert_eq!(expect, writes.len() as u64, "{what}: each request's clusters follow each other on the host");
        }
    }
}

/// Allocating writes over several clusters, starting and ending inside clusters, spanning
/// L2 tables (small clusters) and batch refills: exactly one data write per contiguous
/// host run each request covers, never one per cluster, and the content is qemu-io's.
#[test]
fn multi_cluster_writes_are_one_write_per_host_run() {
    for layout in matrix() {
        let c = layout.cluster;
        // Entries per L2 table: a write of 3 tables' worth spans at least 3 L1 entries.
        let per_table = c / if layout.qemu.as_ref().is_some_and(|o| o.extended_l2) { 16 } else { 8 };
        let span = (3 * per_table * c).min(8 * MIB).max(3 * c);
        let writes = vec![
            (512, 3 * c - 1024),
            (4 * c + 1024, 70 * c.min(64 * KIB) + 512),
            (span.next_multiple_of(c) + (c / 2).max(512), span),
            (3 * span.next_multiple_of(c), 2 * c),
        ];
        let size = (4 * span.next_multiple_of(c) + 4 * c).next_multiple_of(MIB);
        let (cost, runs) = run_layout(&layout, size, &writes, 1);
        let what = layout.name();
        let expect: u64 = writes.iter().map(|&(o, l)| runs_touched(&runs, o, l)).sum();
        assert_eq!(cost.data_writes, expect, "{what}: data writes (host runs {runs:x?})");
        assert_eq!(cost.data_bytes, cost.guest_bytes, "{what}: device data bytes per guest byte");
        assert_eq!(cost.cow_bytes, 0, "{what}: copy-on-write bytes");
        assert_eq!(cost.zero_fill_bytes, 0, "{what}: zero fill bytes");
        let clusters: u64 = writes.iter().map(|&(o, l)| (o + l).div_ceil(c) - o / c).sum();
        assert!(expect < clusters, "{what}: {expect} host runs for {clusters} clusters");
    }
}

// ---------------------------------------------------------------------------
// First touches of extended-L2 clusters (issue 15, point 3 of the copy-on-write session).

/// 4 KiB first touches scattered over 2 MiB extended-L2 clusters (64 KiB subclusters), and
/// 1 KiB ones over 64 KiB clusters (2 KiB subclusters), without a backing file: the first
/// write of a cluster takes a new one (reads as zeros), the next ones allocate subclusters
/// of it in place, and since nothing but those writes touched it, its unallocated
/// subclusters still read as zeros on the host: only the guest's bytes are written. Before
/// the fix each in-place write of a subcluster wrote it whole, zero-filled (1.9 device bytes
/// per guest byte in the bench's firsttouch-4k on xl2-2m).
#[test]
fn first_touches_of_extended_clusters_write_only_the_guest_bytes() {
    let k = 1024u64;
    let cases: [(u32, Vec<(u64, u64)>); 2] = [
        (
            2 * MIB as u32,
            vec![
                (0, 4 * k),
                (MIB, 4 * k),
                (68 * k, 4 * k),
                (76 * k, 4 * k),
                (2 * MIB + 12 * k, 4 * k),
                (124 * k, 8 * k),
            ],
        ),
        (65536, vec![(3 * k, k), (7 * k, k), (60 * k, 3 * k), (64 * k + 512, 512), (64 * k + 4 * k, 2 * k)]),
    ];
    for (cluster, writes) in cases {
        let opts = Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(cluster) };
        let ops: Vec<Op> = writes.iter().map(|&(o, l)| Op::Write(o, l)).collect();
        let m = run_ops(&opts, 8 * MIB, None, &ops);
        assert_eq!((m.data_bytes, m.zero_fill_bytes, m.cow_bytes), (m.guest, 0, 0), "{}: {m:?}", opts.create_options());
        assert_eq!(m.data_writes, writes.len() as u64, "{}: {m:?}", opts.create_options());
    }
}

/// A subcluster made zero keeps its old bytes on the host: the cluster is no longer known
/// to read as zeros outside its allocated subclusters, and a later partial write into that
/// subcluster writes it whole, zero-filled. Without that (a clean mark left after the zero
/// write) the rest of the subcluster would read the old data back.
#[test]
fn zeroed_subclusters_are_filled_again() {
    let k = 1024u64;
    let opts = Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(2 * MIB as u32) };
    let ops = [Op::Write(0, 4 * k), Op::Write(64 * k, 64 * k), Op::Zero(64 * k, 64 * k), Op::Write(72 * k, 4 * k)];
    let m = run_ops(&opts, 4 * MIB, None, &ops);
    assert_eq!(m.zero_fill_bytes, 60 * k, "{m:?}");
    // The same after a zero write of a subcluster that was never allocated.
    let ops = [Op::Write(0, 4 * k), Op::Zero(128 * k, 64 * k), Op::Write(64 * k, 4 * k), Op::Write(132 * k, 4 * k)];
    let m = run_ops(&opts, 4 * MIB, None, &ops);
    assert_eq!(m.zero_fill_bytes, 2 * 60 * k, "{m:?}");
}

// ---------------------------------------------------------------------------
// Copy-on-write over a backing file (issue 15, points 1 and 3 of the issue): the head and
// tail go in the same write as the guest's bytes, and where the backing file has a hole
// they are neither read nor, in a new cluster, written.

/// A raw backing file of 4 MiB with data (0x5a) in its first MiB and at 3 MiB..3.5 MiB,
/// holes elsewhere.
fn sparse_backing() -> Vec<String> {
    vec!["write -P 0x5a 0 1M".into(), "write -P 0x5a 3M 512k".into()]
}

#[test]
fn cow_over_backing_data_is_one_write_and_holes_are_skipped() {
    let k = 1024u64;
    let back = sparse_backing();
    let std = Qcow2Opts::cluster(65536);
    // Over data: head and tail copied, one write of the whole cluster.
    let m = run_ops(&std, 4 * MIB, Some(&back), &[Op::Write(64 * k + 4 * k, 4 * k)]);
    assert_eq!((m.cow_bytes, m.data_bytes, m.data_writes), (60 * k, 64 * k, 1), "{m:?}");
    // Over a hole: only the guest's bytes.
    let m = run_ops(&std, 4 * MIB, Some(&back), &[Op::Write(2 * MIB + 4 * k, 4 * k)]);
    assert_eq!((m.cow_bytes, m.data_bytes, m.zero_fill_bytes), (0, 4 * k, 0), "{m:?}");
    // A write straddling the end of the data at 3.5 MiB (a cluster boundary): the head of
    // the cluster over data is copied, the tail of the next one, over the hole, is not.
    let m = run_ops(&std, 4 * MIB, Some(&back), &[Op::Write(3 * MIB + 512 * k - 4 * k, 8 * k)]);
    assert_eq!((m.cow_bytes, m.data_bytes), (60 * k, 68 * k), "{m:?}");
    // 2 MiB clusters: a tail that is partly hole, partly data is copied whole.
    let big = Qcow2Opts::cluster(2 * MIB as u32);
    let m = run_ops(&big, 4 * MIB, Some(&back), &[Op::Write(2 * MIB + 512 * k, 4 * k)]);
    // Head 2 MiB..2.5 MiB is a hole, tail 2.5 MiB+4k..3 MiB hole, 3..3.5 MiB data, rest hole:
    // the tail range as a whole is not zero, so it is read and written.
    assert_eq!(m.cow_bytes, 2 * MIB - 512 * k - 4 * k, "{m:?}");
    assert_eq!(m.data_bytes, 2 * MIB - 512 * k, "{m:?}");
    assert_eq!(m.data_writes, 1, "{m:?}");
}

/// Extended L2 over a sparse backing file: only the touched subcluster's missing part is
/// copied, not at all over a hole, and in place in a cluster this image allocated (clean)
/// the same holds.
#[test]
fn subclusters_over_backing_copy_only_their_missing_part() {
    let k = 1024u64;
    let back = sparse_backing();
    let ext64 = Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(65536) };
    // 2 KiB subclusters: 1 KiB at 3 KiB over data copies 1 KiB, over a hole nothing.
    let m = run_ops(&ext64, 4 * MIB, Some(&back), &[Op::Write(3 * k, k), Op::Write(2 * MIB + 3 * k, k)]);
    assert_eq!((m.cow_bytes, m.data_bytes, m.data_writes), (k, 2 * k + k, 2), "{m:?}");
    let ext2m = Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(2 * MIB as u32) };
    // 64 KiB subclusters of cluster 0 (data below 1 MiB, hole above): a first touch over
    // the hole, an in-place one over data (head and tail of its subcluster copied, one
    // write), an in-place one over the hole again, and one straddling two subclusters.
    let ops = [
        Op::Write(MIB + 4 * k, 4 * k),
        Op::Write(64 * k + 4 * k, 4 * k),
        Op::Write(MIB + 68 * k, 4 * k),
        Op::Write(192 * k - 2 * k, 4 * k),
    ];
    let m = run_ops(&ext2m, 4 * MIB, Some(&back), &ops);
    assert_eq!(m.cow_bytes, 60 * k + 2 * 62 * k, "{m:?}");
    assert_eq!(m.data_bytes, 4 * k + 64 * k + 4 * k + 128 * k, "{m:?}");
    assert_eq!(m.data_writes, 4, "{m:?}");
}

/// Partial writes over a backing file into clusters whose subclusters were made zero
/// (their bytes kept on the host), and whole clusters rewritten after a zero write:
/// content as qemu-io's.
#[test]
fn cow_over_backing_after_zero_writes_matches_qemu() {
    let k = 1024u64;
    let back = sparse_backing();
    for opts in [
        Qcow2Opts::cluster(65536),
        Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(65536) },
        Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(2 * MIB as u32) },
    ] {
        let ops = [
            Op::Write(0, 128 * k),
            Op::Zero(64 * k, 64 * k),
            Op::Write(68 * k, 4 * k),
            Op::Write(1020 * k, 8 * k),
            Op::Zero(2 * MIB, 256 * k),
            Op::Write(2 * MIB + 6 * k, 3 * k),
            Op::Write(3 * MIB + 510 * k, 4 * k),
        ];
        run_ops(&opts, 4 * MIB, Some(&back), &ops);
    }
}
