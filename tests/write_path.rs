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

/// Writes `writes` (offset, length) to a fresh image of `opts` through one queue, one
/// request at a time, and returns (data writes, data bytes written, guest bytes) from the
/// counters. Checks the image and its content against qemu-io's raw result.
fn run(opts: &Qcow2Opts, size: u64, writes: &[(u64, u64)]) -> (u64, u64, u64) {
    let dir = tempdir();
    let img_path = dir.path().join("w.qcow2");
    let raw_path = dir.path().join("w.raw");
    create_qcow2(&img_path, opts, size);
    let img = Image::open(&img_path, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let before = img.counters();
    let mut cmds = Vec::new();
    for (i, &(off, len)) in writes.iter().enumerate() {
        let pat = (i % 200 + 1) as u8;
        let mut b = AlignedBuf::new(len as usize);
        b.fill(pat);
        q.write_at(&b, off).unwrap();
        cmds.push(format!("write -P {pat} {off} {len}"));
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
    assert_eq!(r.status(), 0, "{}: {}", opts.create_options(), r.describe());
    let guest: u64 = writes.iter().map(|w| w.1).sum();
    (after.data_writes - before.data_writes, after.data_write_bytes - before.data_write_bytes, guest)
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
