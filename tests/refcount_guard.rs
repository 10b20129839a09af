//! The engine stops an image whose refcounts contradict its references (issue 12): a
//! refcount that would go below zero, or a free cluster handed out while metadata still
//! refers to it, marks the image corrupt (incompatible bit 1, as the overlap checks do) and
//! fails the request, instead of carrying on. Each image here is made inconsistent by hand
//! (qemu-img check calls what is done to it a refcount error), then driven through a queue.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions};
use std::path::Path;

const CS: u64 = 65536;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Host offset of L2 entry `i` of the first L2 table, and the entry.
fn l2_entry(path: &Path, i: u64) -> (u64, u64) {
    let l1 = read_be64(path, 40);
    let l2 = read_be64(path, l1) & L2_OFFSET_MASK;
    (l2 + 8 * i, read_be64(path, l2 + 8 * i))
}

/// Host offset of the 16-bit refcount of host cluster `c` (first refcount block).
fn refcount_at(path: &Path, c: u64) -> u64 {
    let table = read_be64(path, 48);
    let block = read_be64(path, table) & !0x1ff;
    block + 2 * c
}

fn incompatible(path: &Path) -> u64 {
    read_be64(path, 72)
}

fn check_json(path: &Path) -> (i32, serde_json::Value) {
    let r = qemu_img(["check", "--output=json", &s(path)]);
    (r.status(), serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}", r.describe())))
}

/// Three guest clusters A, B, C with their own host clusters; then B's L2 entry is made to
/// point at A's host cluster (B's own becomes a leak, A's is referenced twice with
/// refcount 1). Discarding all three frees A's host cluster twice. Before the fix the flush
/// failed at the second decrement and dropped the decrement of C (a second leak) without
/// marking anything: now C is freed, the image is marked corrupt and the flush that applies
/// the decrements fails.
#[test]
fn double_free_marks_corrupt_and_applies_the_other_decrements() {
    let dir = tempdir();
    let img = dir.path().join("shared.qcow2");
    build_qcow2(
        &img,
        &Qcow2Opts::cluster(CS as u32),
        16 * CS,
        &["write -P 0xa1 0 64k".into(), "write -P 0xa2 64k 64k".into(), "write -P 0xa3 128k 64k".into()],
    );
    let (_, a) = l2_entry(&img, 0);
    let (b_at, _) = l2_entry(&img, 1);
    patch_be64(&img, b_at, a);
    let (status, j) = check_json(&img);
    assert_eq!(status, 2, "the prepared image has a refcount error: {j}");

    let image = Image::open(&img, &Options::default()).unwrap();
    let mut q = Queue::new(&image, &QueueOptions::default()).unwrap();
    q.discard(0, 3 * CS).unwrap();
    // The flush after the discards makes the dropped references durable; their decrements
    // retire at the start of the next write-back (the flush's write-back runs on the queue's
    // ring without the metadata lock), and the double free fails that flush.
    q.flush().expect("the first flush writes the discards' L2 entries");
    let e = q.flush().expect_err("a double free must fail the flush that applies it");
    assert!(e.to_string().contains("refcount"), "{e}");
    // Stopped: no write is accepted any more.
    assert!(q.write_at(&[0x55; 512], 5 * CS).is_err(), "writes are refused after the corruption event");
    drop(q);
    drop(image);

    assert_ne!(incompatible(&img) & 2, 0, "the corrupt bit is set on disk");
    let (status, j) = check_json(&img);
    // Left: B's original host cluster, leaked by the hand edit. C's cluster was freed (before
    // the fix its decrement was dropped: 2 leaks).
    assert_eq!((status, j.get("leaks").and_then(|v| v.as_u64()), j.get("corruptions")), (3, Some(1), None), "{j}");
}

/// Guest cluster A's host cluster is given refcount 0 while A still maps it. Discarding A
/// queues its decrement; the next allocation finds the cluster free (refcount 0) although
/// durable metadata still refers to it, and must not hand it out: before the fix the write
/// got it (two owners, and the queued decrement would later free it under the new one).
#[test]
fn allocation_of_a_referenced_free_cluster_marks_corrupt() {
    let dir = tempdir();
    let img = dir.path().join("zero-ref.qcow2");
    build_qcow2(&img, &Qcow2Opts::cluster(CS as u32), 16 * CS, &["write -P 0xa1 0 64k".into()]);
    let (_, a) = l2_entry(&img, 0);
    let host = (a & L2_OFFSET_MASK) / CS;
    patch_be16(&img, refcount_at(&img, host), 0);
    let (status, j) = check_json(&img);
    assert_eq!(status, 2, "the prepared image has a refcount error: {j}");

    let image = Image::open(&img, &Options::default()).unwrap();
    let mut q = Queue::new(&image, &QueueOptions::default()).unwrap();
    q.discard(0, CS).unwrap();
    let e = q.write_at(&[0x55; 4096], 5 * CS).expect_err("the allocation must be refused");
    assert!(e.to_string().contains("still referenced"), "{e}");
    drop(q);
    drop(image);
    assert_ne!(incompatible(&img) & 2, 0, "the corrupt bit is set on disk");
}
