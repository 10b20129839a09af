//! `quring resize` against `qemu-img resize` (issue 16, item 4): grow and shrink on v2/v3,
//! 512 B to 2 MiB clusters, extended L2, overlays (shrink then grow reads zeros whichever
//! tool resized), preallocation, the same exit codes and messages, and a live resize while
//! another thread's queue does I/O.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Queue, QueueOptions, ResizeOptions};
use std::path::Path;

const MIB: u64 = 1 << 20;

#[track_caller]
fn check_clean(p: &Path) {
    let c = qemu_img(["check", &s(p)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

#[track_caller]
fn same_content(a: &Path, b: &Path) {
    let c = qemu_img(["compare", &s(a), &s(b)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
    let va = qemu_img(["info", "--output=json", &s(a)]).ok().json()["virtual-size"].clone();
    let vb = qemu_img(["info", "--output=json", &s(b)]).ok().json()["virtual-size"].clone();
    assert_eq!(va, vb);
}

/// One resize step through qemu-img (`qemu`) or quring; both must succeed.
#[track_caller]
fn resize_with(qemu: bool, p: &Path, args: &[&str]) {
    let mut v = vec!["resize".to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v.insert(v.len() - 1, s(p));
    let r = if qemu { qemu_img(&v) } else { quring(&v) };
    assert_eq!(r.status(), 0, "{}", r.describe());
    assert_eq!(r.stdout.trim(), "Image resized.", "{}", r.describe());
}

#[test]
fn grow_and_shrink_match_qemu_img() {
    let dir = tempdir();
    let cases: &[(Compat, u32, bool)] = &[
        (Compat::V010, 65536, false),
        (Compat::V11, 512, false),
        (Compat::V11, 4096, false),
        (Compat::V11, 65536, false),
        (Compat::V11, 65536, true),
        (Compat::V11, 2 << 20, false),
        (Compat::V11, 2 << 20, true),
    ];
    for &(compat, cs, ext) in cases {
        let opts = Qcow2Opts { cluster_size: cs, extended_l2: ext, compat, ..Default::default() };
        let q = dir.path().join("q.qcow2");
        let u = dir.path().join("u.qcow2");
        let cmds: Vec<String> = vec![
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 3M 1536k".into(),
            "write -z 5M 512k".into(),
            "write -P 0x33 7M 1M".into(),
        ];
        build_qcow2(&q, &opts, 8 * MIB, &cmds);
        std::fs::copy(&q, &u).unwrap();
        // Shrink inside a cluster, grow past the old end (stale data of the cut cluster,
        // if any, shows as in QEMU), shrink again, relative sizes.
        let steps: &[&[&str]] =
            &[&["--shrink", "3500k"], &["+5M"], &["--shrink", "--", "-6M"], &["20M"], &["--shrink", "1M"]];
        for st in steps {
            resize_with(true, &q, st);
            resize_with(false, &u, st);
            check_clean(&u);
            same_content(&q, &u);
        }
        let (lq, lu) = (std::fs::metadata(&q).unwrap().len(), std::fs::metadata(&u).unwrap().len());
        assert!(lu <= lq + 4 * cs as u64, "{compat:?} {cs}: quring's file {lu} vs qemu-img's {lq}");
    }
}

#[test]
fn shrink_frees_clusters_and_truncates() {
    let dir = tempdir();
    let p = dir.path().join("t.qcow2");
    build_qcow2(&p, &Qcow2Opts::default(), 64 * MIB, &["write -P 0x5a 0 64M".to_string()]);
    let before = std::fs::metadata(&p).unwrap().len();
    resize_with(false, &p, &["--shrink", "8M"]);
    check_clean(&p);
    let after = std::fs::metadata(&p).unwrap().len();
    assert!(after < 9 * MIB && after < before, "file {before} -> {after}");
    let r = qemu_io(["-c", "read -P 0x5a 0 8M", &s(&p)]);
    assert!(r.status() == 0 && !r.stdout.contains("fail"), "{}", r.describe());
}

/// The overlay scenario of issue 16 item 4 / issue 19: shrink an overlay below its backing
/// file's end, grow it past that end: the grown range reads zeros, whichever tool did it.
#[test]
fn overlay_shrink_then_grow_reads_zeros() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    build_qcow2(&base, &Qcow2Opts::default(), 4 * MIB, &["write -P 0x11 0 4M".to_string()]);
    for ext in [false, true] {
        for (shrink_q, grow_q) in [(true, true), (false, false), (true, false), (false, true)] {
            let ov = dir.path().join(format!("ov-{ext}-{shrink_q}-{grow_q}.qcow2"));
            let opts = Qcow2Opts {
                extended_l2: ext,
                backing: Some(("base.qcow2".into(), "qcow2".into())),
                ..Default::default()
            };
            build_qcow2(&ov, &opts, 4 * MIB, &["write -P 0x22 512k 1M".to_string()]);
            resize_with(shrink_q, &ov, &["--shrink", "1000k"]);
            resize_with(grow_q, &ov, &["6M"]);
            check_clean(&ov);
            for tool in ["qemu", "quring"] {
                let args = [
                    "-c",
                    "read -P 0x11 0 512k",
                    "-c",
                    "read -P 0x22 512k 488k",
                    "-c",
                    "read -P 0 1000k 5144k",
                    &s(&ov),
                ];
                let r = if tool == "qemu" {
                    qemu_io(args)
                } else {
                    let mut v = vec!["io"];
                    v.extend(args);
                    quring(v)
                };
                assert!(
                    r.status() == 0 && !r.stdout.contains("fail"),
                    "{tool} reads {shrink_q}/{grow_q} ext={ext}: {}",
                    r.describe()
                );
            }
        }
    }
}

#[test]
fn v2_overlay_growth_fails_as_in_qemu() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    build_qcow2(&base, &Qcow2Opts::default(), 4 * MIB, &["write -P 0x11 0 4M".to_string()]);
    let opts =
        Qcow2Opts { compat: Compat::V010, backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
    let q = dir.path().join("q.qcow2");
    build_qcow2(&q, &opts, 2 * MIB, &[]);
    let u = dir.path().join("u.qcow2");
    std::fs::copy(&q, &u).unwrap();
    let a = qemu_img(["resize", &s(&q), "3M"]);
    let b = quring(["resize", &s(&u), "3M"]);
    assert_eq!(a.status(), b.status(), "{}\n{}", a.describe(), b.describe());
    assert_eq!(a.stderr.replace("qemu-img:", "quring:"), b.stderr, "{}", b.describe());
    check_clean(&u);
    same_content(&q, &u);
}

#[test]
fn errors_match_qemu_img() {
    let dir = tempdir();
    let p = dir.path().join("e.qcow2");
    create_qcow2(&p, &Qcow2Opts::default(), 4 * MIB);
    let cases: &[&[&str]] = &[
        &["2M"],
        &["--", "-1M"],
        &["--shrink", "0"],
        &["--shrink", "--", "-8M"],
        &["--preallocation=bogus", "8M"],
        &["--preallocation=full", "--shrink", "1M"],
        &["5000000"],
        &["1X"],
        &["+1X"],
    ];
    for c in cases {
        let mut v: Vec<String> = vec!["resize".into()];
        v.extend(c.iter().map(|a| a.to_string()));
        v.insert(v.len() - 1, s(&p));
        let a = qemu_img(&v);
        let b = quring(&v);
        assert_eq!(a.status(), b.status(), "{c:?}\n{}\n{}", a.describe(), b.describe());
        assert_eq!(a.stderr.replace("qemu-img:", "quring:"), b.stderr, "{c:?}");
        assert_eq!(a.stdout, b.stdout, "{c:?}");
    }
    let missing = dir.path().join("missing.qcow2");
    let a = qemu_img(["resize", &s(&missing), "1M"]);
    let b = quring(["resize", &s(&missing), "1M"]);
    assert_eq!(a.status(), b.status());
    assert_eq!(a.stderr.replace("qemu-img:", "quring:"), b.stderr);
    check_clean(&p);
}

#[test]
fn preallocation_matches_qemu_img() {
    let dir = tempdir();
    for (compat, mode) in
        [(Compat::V11, "metadata"), (Compat::V11, "falloc"), (Compat::V11, "full"), (Compat::V010, "full")]
    {
        let opts = Qcow2Opts { compat, ..Default::default() };
        let q = dir.path().join("q.qcow2");
        let u = dir.path().join("u.qcow2");
        build_qcow2(&q, &opts, 2 * MIB, &["write -P 0x44 1M 1M".to_string()]);
        std::fs::copy(&q, &u).unwrap();
        let arg = format!("--preallocation={mode}");
        resize_with(true, &q, &[&arg, "5M"]);
        resize_with(false, &u, &[&arg, "5M"]);
        check_clean(&u);
        same_content(&q, &u);
    }
}

/// A VMM's live resize: one thread's queue keeps writing and reading back its range while
/// another grows the disk, writes past the old end and shrinks it again.
#[test]
fn live_resize_while_a_queue_does_io() {
    let dir = tempdir();
    let p = dir.path().join("live.qcow2");
    create_qcow2(&p, &Qcow2Opts::cluster(4096), 8 * MIB);
    let img = Image::open(&p, &Options { l1_room: Some(64 * MIB), ..Default::default() }).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
            let mut w = AlignedBuf::new(65536);
            let mut r = AlignedBuf::new(65536);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) || n < 64 {
                let off = (n * 65536) % (4 * MIB);
                w.fill((n % 251) as u8 + 1);
                q.write_at(&w, off).unwrap();
                q.read_at(&mut r, off).unwrap();
                assert_eq!(&r[..], &w[..], "read back at {off}");
                n += 1;
            }
            q.flush().unwrap();
            n
        })
    };
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let grow = ResizeOptions::default();
    q.resize(48 * MIB, &grow).unwrap();
    assert_eq!(img.size(), 48 * MIB);
    let mut b = AlignedBuf::new(1 << 20);
    b.fill(0x77);
    q.write_at(&b, 40 * MIB).unwrap();
    q.write_at(&b, 20 * MIB).unwrap();
    assert!(q.resize(16 * MIB, &grow).is_err(), "a shrink needs ResizeOptions::shrink");
    q.resize(30 * MIB, &ResizeOptions { shrink: true, ..Default::default() }).unwrap();
    assert_eq!(img.size(), 30 * MIB);
    assert!(q.write_at(&b, 40 * MIB).is_err(), "past the new end");
    q.resize(50 * MIB, &grow).unwrap();
    let mut r = AlignedBuf::new(1 << 20);
    q.read_at(&mut r, 40 * MIB).unwrap();
    assert!(r.iter().all(|&x| x == 0), "the cut range reads zeros after growing again");
    q.read_at(&mut r, 20 * MIB).unwrap();
    assert!(r.iter().all(|&x| x == 0x77));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let n = worker.join().unwrap();
    assert!(n >= 64);
    drop(q);
    img.close().unwrap();
    drop(img);
    check_clean(&p);
    let info = qemu_img(["info", "--output=json", &s(&p)]).ok().json();
    assert_eq!(info["virtual-size"], 50 * MIB);
    let r = qemu_io(["-c", "read -P 0x77 20M 1M", "-c", "read -P 0 40M 1M", &s(&p)]);
    assert!(r.status() == 0 && !r.stdout.contains("fail"), "{}", r.describe());
}

/// Shrinking an image with an internal snapshot (v3, as QEMU allows): the snapshot keeps
/// its data, the active layer loses the cut range; growing again with snapshots too.
#[test]
fn shrink_with_a_snapshot_keeps_the_snapshot() {
    let dir = tempdir();
    let q = dir.path().join("q.qcow2");
    let u = dir.path().join("u.qcow2");
    build_qcow2(&q, &Qcow2Opts::default(), 8 * MIB, &["write -P 0x61 0 8M".to_string()]);
    qemu_img(["snapshot", "-c", "s1", &s(&q)]).ok();
    qemu_io_cmds(&q, "qcow2", &["write -P 0x62 1M 6M".to_string()]);
    std::fs::copy(&q, &u).unwrap();
    for st in [&["--shrink", "3M"][..], &["12M"][..]] {
        resize_with(true, &q, st);
        resize_with(false, &u, st);
        check_clean(&u);
        same_content(&q, &u);
    }
    for (p, name) in [(&q, "q.raw"), (&u, "u.raw")] {
        let out = dir.path().join(name);
        qemu_img(["convert", "-l", "snapshot.name=s1", "-O", "raw", &s(p), &s(&out)]).ok();
    }
    assert!(raw_bytes_equal(&dir.path().join("q.raw"), &dir.path().join("u.raw")));
}

/// L2-less images (quring's own mode, which QEMU cannot open): contiguous ranges cut by a
/// shrink are split first; quring's check stays clean and the kept data reads back.
#[test]
fn l2_less_images_shrink_and_grow() {
    let dir = tempdir();
    let p = dir.path().join("l.qcow2");
    quring(["create", "-q", "-o", "l2_less=on,cluster_size=4k", &s(&p), "8M"]).ok();
    quring(["io", "-c", "write -P 0x66 0 8M", &s(&p)]).ok();
    resize_with(false, &p, &["--shrink", "3000k"]);
    let c = quring(["check", &s(&p)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
    resize_with(false, &p, &["12M"]);
    let c = quring(["check", &s(&p)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
    let r = quring(["io", "-c", "read -P 0x66 0 3000k", "-c", "read -P 0 3M 9M", &s(&p)]);
    assert!(r.status() == 0 && !r.stdout.contains("fail"), "{}", r.describe());
}

/// Raw images are resized as files, with qemu-img's probing warning and messages.
#[test]
fn raw_images_resize_like_qemu_img() {
    let dir = tempdir();
    let q = dir.path().join("q.raw");
    let u = dir.path().join("u.raw");
    for p in [&q, &u] {
        build_raw(p, MIB, &["write -P 0x9 0 1M".to_string()]);
    }
    let steps: &[&[&str]] = &[&["-f", "raw", "+1M"], &["1M"], &["--shrink", "1000"], &["-f", "raw", "3M"]];
    for st in steps {
        let run = |tool: &str, p: &Path| {
            let mut v: Vec<String> = vec!["resize".into()];
            v.extend(st.iter().map(|a| a.to_string()));
            v.insert(v.len() - 1, s(p));
            if tool == "qemu" { qemu_img(&v) } else { quring(&v) }
        };
        let (a, b) = (run("qemu", &q), run("quring", &u));
        assert_eq!(a.status(), b.status(), "{st:?}\n{}\n{}", a.describe(), b.describe());
        assert_eq!(a.stderr.replace("qemu-img:", "quring:").replace(&s(&q), &s(&u)), b.stderr, "{st:?}");
        assert_eq!(a.stdout, b.stdout, "{st:?}");
        assert_eq!(std::fs::read(&q).unwrap(), std::fs::read(&u).unwrap(), "{st:?}");
    }
}
