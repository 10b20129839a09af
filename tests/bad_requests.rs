//! Invalid write requests: each one fails with a clear error and leaves the
//! image file byte-identical.
//!
//! Library API: past the end (and offset overflow), offsets or lengths that
//! are not multiples of 512, writes on an image opened read-only, writes on an
//! image whose header has the corrupt bit (incompatible bit 1) set, null
//! buffers, and zero-length requests. CLI: `quring io` past the end, on a
//! corrupt image, and with `-r`.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::queue::{Op, Queue, QueueOptions, Request};
use std::path::Path;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 8 * MIB;

fn make_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("img.qcow2");
    let cmds = ["write -P 0x33 0 1M".to_string(), "write -P 0x44 5M 100k".to_string()];
    build_qcow2(&p, &Qcow2Opts::cluster(65536), SIZE, &cmds);
    p
}

fn snapshot(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[track_caller]
fn assert_unchanged(p: &Path, before: &[u8], what: &str) {
    let after = snapshot(p);
    if after != before {
        let at = after.iter().zip(before).position(|(a, b)| a != b).unwrap_or(before.len().min(after.len()));
        panic!(
            "{what}: the image file changed (length {} -> {}, first difference at byte {at})",
            before.len(),
            after.len()
        );
    }
    let check = qemu_img(["check", &s(p)]);
    assert!(check.success(), "{what}: qemu-img check:\n{}", check.describe());
}

/// Submits `op` and expects `submit` itself to refuse it, with an error
/// message containing one of `needles`. Falls back to accepting a failed
/// completion (negative result) if submit accepted it.
#[track_caller]
fn expect_refused(q: &mut Queue, op: Op, needles: &[&str], what: &str) {
    // SAFETY: every buffer passed here is either null or a live static/local
    // that outlives the request (we reap it before returning).
    let r = unsafe { q.submit(Request { op, user_data: 7 }) };
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                needles.iter().any(|n| msg.to_lowercase().contains(&n.to_lowercase())),
                "{what}: refused, but the error is not clear: {msg:?} (expected one of {needles:?})"
            );
        }
        Ok(()) => {
            q.commit().unwrap();
            let mut out = Vec::new();
            q.reap(&mut out, 1, None).unwrap();
            assert_eq!(out.len(), 1, "{what}");
            panic!("{what}: {op:?} was accepted by submit and completed with result {}", out[0].result);
        }
    }
}

#[test]
fn invalid_ranges_are_refused() {
    let d = tempdir();
    let p = make_image(d.path());
    let before = snapshot(&p);
    {
        let img = Image::open(&p, &Options::default()).expect("open rw");
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        let buf = vec![0xabu8; 4096];
        let past = ["past the end"];
        let align = ["multiple", "align"];
        let w = |offset: u64, len: usize| Op::Write { offset, buf: buf.as_ptr(), len };
        expect_refused(&mut q, w(SIZE, 512), &past, "write at the end");
        expect_refused(&mut q, w(SIZE - 512, 1024), &past, "write across the end");
        expect_refused(&mut q, w(SIZE + MIB, 512), &past, "write far past the end");
        expect_refused(&mut q, w(u64::MAX - 511, 512), &past, "write with offset overflow");
        expect_refused(&mut q, Op::WriteZeroes { offset: SIZE - 512, len: 1024, unmap: false }, &past, "zero past end");
        expect_refused(
            &mut q,
            Op::WriteZeroes { offset: u64::MAX - 511, len: 1024, unmap: true },
            &past,
            "zero overflow",
        );
        expect_refused(&mut q, Op::Discard { offset: SIZE, len: 65536 }, &past, "discard past the end");
        expect_refused(&mut q, Op::Discard { offset: 512, len: u64::MAX - 511 }, &past, "discard length overflow");
        expect_refused(&mut q, w(100, 512), &align, "write at unaligned offset");
        expect_refused(&mut q, w(0, 100), &align, "write of unaligned length");
        expect_refused(&mut q, w(512, 513), &align, "write of unaligned length 513");
        expect_refused(&mut q, Op::WriteZeroes { offset: 1, len: 512, unmap: false }, &align, "zero unaligned");
        expect_refused(&mut q, Op::WriteZeroes { offset: 0, len: 4000, unmap: true }, &align, "zero unaligned len");
        expect_refused(&mut q, Op::Discard { offset: 256, len: 65536 }, &align, "discard unaligned");
        expect_refused(&mut q, Op::Write { offset: 0, buf: std::ptr::null(), len: 512 }, &["null"], "null buffer");
        let mut rbuf = vec![0u8; 512];
        expect_refused(&mut q, Op::Read { offset: SIZE, buf: rbuf.as_mut_ptr(), len: 512 }, &past, "read past end");
        // The blocking helpers report the same errors.
        assert!(q.write_at(&buf[..512], SIZE).is_err(), "write_at past the end accepted");
        assert!(q.write_at(&buf[..100], 0).is_err(), "write_at of 100 bytes accepted");
        assert!(q.write_zeroes(SIZE, 512, false).is_err(), "write_zeroes past the end accepted");
        assert!(q.discard(SIZE - 512, 1024).is_err(), "discard past the end accepted");
        // Nothing is in flight afterwards; the queue still works.
        assert_eq!(q.in_flight(), 0);
        q.read_at(&mut rbuf, 0).unwrap();
        assert!(rbuf.iter().all(|&b| b == 0x33));
        drop(q);
        img.close().unwrap();
    }
    assert_unchanged(&p, &before, "invalid ranges");
}

#[test]
fn zero_length_and_null_buffers() {
    let d = tempdir();
    let p = make_image(d.path());
    let before = snapshot(&p);
    {
        let img = Image::open(&p, &Options::default()).expect("open rw");
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        // Zero-length requests, with and without a buffer: either refused
        // or completed without effect; never a crash or a change.
        let buf = [0u8; 16];
        let ops = [
            Op::Write { offset: 0, buf: buf.as_ptr(), len: 0 },
            Op::Write { offset: 4096, buf: std::ptr::null(), len: 0 },
            Op::Write { offset: SIZE, buf: std::ptr::null(), len: 0 },
            Op::WriteZeroes { offset: 65536, len: 0, unmap: true },
            Op::Discard { offset: 0, len: 0 },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            // SAFETY: zero-length; `buf` outlives the request.
            let r = unsafe { q.submit(Request { op, user_data: i as u64 }) };
            if r.is_ok() {
                q.commit().unwrap();
                let mut out = Vec::new();
                while out.is_empty() {
                    q.reap(&mut out, 1, None).unwrap();
                }
                assert_eq!(out[0].user_data, i as u64);
                assert!(out[0].result <= 0, "{op:?}: positive result {}", out[0].result);
            }
        }
        assert_eq!(q.in_flight(), 0);
        // A null buffer with a length is always refused.
        expect_refused(&mut q, Op::Write { offset: 0, buf: std::ptr::null(), len: 4096 }, &["null"], "null write");
        expect_refused(&mut q, Op::Read { offset: 0, buf: std::ptr::null_mut(), len: 4096 }, &["null"], "null read");
        drop(q);
        img.close().unwrap();
    }
    assert_unchanged(&p, &before, "zero-length requests");
}

#[test]
fn read_only_image_refuses_writes() {
    let d = tempdir();
    let p = make_image(d.path());
    let before = snapshot(&p);
    {
        let img = Image::open(&p, &Options { read_only: true, ..Default::default() }).expect("open ro");
        assert!(img.read_only());
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        let buf = vec![0x99u8; 65536];
        let ro = ["read-only", "read only"];
        expect_refused(&mut q, Op::Write { offset: 0, buf: buf.as_ptr(), len: 65536 }, &ro, "ro write");
        expect_refused(&mut q, Op::WriteZeroes { offset: 0, len: 65536, unmap: false }, &ro, "ro zero");
        expect_refused(&mut q, Op::WriteZeroes { offset: 0, len: 65536, unmap: true }, &ro, "ro zero unmap");
        expect_refused(&mut q, Op::Discard { offset: 0, len: 65536 }, &ro, "ro discard");
        // Reads and flushes still work.
        let mut rbuf = vec![0u8; 4096];
        q.read_at(&mut rbuf, 0).unwrap();
        assert!(rbuf.iter().all(|&b| b == 0x33));
        q.flush().expect("flush on a read-only image");
        drop(q);
        img.close().unwrap();
    }
    assert_unchanged(&p, &before, "read-only image");
    // The CLI with -r.
    let r = quring(["io", "-r", "-c", "write -P 0x99 0 64k", &s(&p)]);
    assert_ne!(r.code, Some(0), "quring io -r accepted a write:\n{}", r.describe());
    assert!(r.stderr.contains("read-only") || r.stderr.contains("read only"), "unclear error:\n{}", r.describe());
    assert_unchanged(&p, &before, "quring io -r write");
}

#[test]
fn corrupt_bit_refuses_writes() {
    let d = tempdir();
    let p = make_image(d.path());
    // incompatible_features (offset 72): set bit 1 (corrupt).
    let inc = read_be64(&p, 72);
    patch_be64(&p, 72, inc | 2);
    let before = snapshot(&p);
    // Opening read-write is refused with a clear message...
    match Image::open(&p, &Options::default()) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("corrupt"), "unclear error opening a corrupt image read-write: {msg}");
        }
        Ok(img) => {
            // ... or, if it opens, writes must be refused.
            let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
            let buf = vec![1u8; 512];
            expect_refused(&mut q, Op::Write { offset: 0, buf: buf.as_ptr(), len: 512 }, &["corrupt"], "corrupt write");
        }
    }
    assert_eq!(snapshot(&p), before, "opening a corrupt image read-write changed it");
    // Read-only opens work and refuse writes.
    {
        let img = Image::open(&p, &Options { read_only: true, ..Default::default() }).expect("open ro");
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        let buf = vec![1u8; 512];
        expect_refused(&mut q, Op::Write { offset: 0, buf: buf.as_ptr(), len: 512 }, &["read-only", "corrupt"], "ro");
        let mut rbuf = vec![0u8; 512];
        q.read_at(&mut rbuf, 0).unwrap();
        assert!(rbuf.iter().all(|&b| b == 0x33));
    }
    // The CLI refuses too, naming the reason.
    let r = quring(["io", "-c", "write -P 0x99 0 64k", &s(&p)]);
    assert_ne!(r.code, Some(0), "quring io wrote to a corrupt image:\n{}", r.describe());
    assert!(r.stderr.contains("corrupt"), "unclear error:\n{}", r.describe());
    assert_eq!(snapshot(&p), before, "quring io on a corrupt image changed it");
}

#[test]
fn cli_past_end_fails_cleanly() {
    let d = tempdir();
    let p = make_image(d.path());
    let before = snapshot(&p);
    for cmd in ["write -P 0x99 8M 512", "write -P 0x99 8388000 1000", "write -z 8M 64k", "discard 8M 64k"] {
        let r = quring(["io", "-c", cmd, &s(&p)]);
        assert_eq!(r.code, Some(1), "quring io -c '{cmd}' should fail with exit 1:\n{}", r.describe());
        assert!(r.stderr.contains("past the end"), "unclear error for '{cmd}':\n{}", r.describe());
        assert_unchanged(&p, &before, cmd);
    }
}
