//! Persistent dirty bitmaps with QEMU itself as the oracle (issue 17, acceptance 1 and 2;
//! resize with bitmaps): `qemu-system-x86_64 -machine none` over QMP adds persistent
//! bitmaps with `block-dirty-bitmap-add`, runs a seeded stream of writes, zero writes and
//! discards through `qemu-io` in the human monitor and stores the bitmaps at
//! `blockdev-del`; quring adds the same bitmaps and runs the same stream (one queue, or
//! four queues on threads) on a copy of the same image. The stored bitmaps must be equal
//! (read back by quring's `map --bitmap` and by QEMU's NBD export), equal to the model of
//! the stream, listed alike by `qemu-img info`, and both images pass `qemu-img check`.
//! A writer killed with SIGKILL in the middle of its writes leaves the bitmap in use, which
//! QEMU then reports as inconsistent; quring and QEMU then treat it alike. Resizing an
//! image with bitmaps (grow, shrink, unaligned, over a backing file, preallocated, live in
//! a session) resizes them as QEMU does, and refuses an inconsistent one with its message.

mod common;

use common::bitmap_ops::*;
use common::*;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions, ResizeOptions};
use serde_json::json;
use std::path::Path;

/// One case: `grans` bitmaps (named by granularity) on copies of one image that holds
/// data, added through QMP on one copy and `quring bitmap --add` on the other, the same
/// stream through QEMU and quring (`queues` queues).
fn qmp_case(cs: u64, size: u64, grans: &[u64], queues: usize, seed: u64, n: usize) {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, &Qcow2Opts::cluster(cs as u32), size);
    qemu_io_cmds(&base, "qcow2", &[format!("write -P 7 0 {}", size / 3), format!("write -P 8 {} {cs}", size - cs)]);
    let qemu = dir.path().join("qemu.qcow2");
    let ours = dir.path().join("quring.qcow2");
    std::fs::copy(&base, &qemu).unwrap();
    std::fs::copy(&base, &ours).unwrap();
    let gmin = *grans.iter().min().unwrap();
    let ops = stream(seed, n, size, gmin, cs);

    let mut q = Qmp::start();
    q.add("d", &qemu);
    for g in grans {
        q.ok(
            "block-dirty-bitmap-add",
            json!({ "node": "d", "name": format!("g{g}"), "granularity": g, "persistent": true }),
        );
    }
    for op in &ops {
        q.io("d", &op.qemu_io());
    }
    q.del("d");
    q.quit();

    for g in grans {
        quring_bitmap(&["--add", "-g", &g.to_string(), &s(&ours), &format!("g{g}")]);
    }
    run_quring(&ours, &ops, queues);

    let what = format!("cluster {cs}, granularities {grans:?}, {queues} queue(s), seed {seed}");
    check_clean(&qemu, &what);
    check_clean(&ours, &what);
    if queues == 1 {
        let cmp = qemu_img(["compare", &s(&qemu), &s(&ours)]);
        assert_eq!(cmp.code, Some(0), "guest data differs ({what}):\n{}", cmp.describe());
    }
    // QEMU stores the bitmaps one session adds in the reverse order of their creation
    // (new ones go to the end of the directory, newest first); quring's directory is in
    // the order of creation. The set (names, granularities, flags) is the same.
    let sorted = |p: &Path| {
        let mut l = qemu_bitmaps(p);
        l.sort();
        l
    };
    assert_eq!(sorted(&ours), sorted(&qemu), "qemu-img info ({what})");
    assert_eq!(qemu_bitmaps(&ours).len(), grans.len());
    for (name, _, flags) in qemu_bitmaps(&ours) {
        assert_eq!(flags, vec!["auto".to_string()], "{name} ({what})");
    }
    for g in grans {
        let name = format!("g{g}");
        let want = model(&ops, *g, size);
        assert!(!want.is_empty());
        assert_eq!(quring_dirty(&qemu, &name), want, "{name} stored by QEMU vs the model ({what})");
        assert_eq!(quring_dirty(&ours, &name), want, "{name} stored by quring vs the model ({what})");
    }
    // QEMU reads both stored bitmaps alike (its own table decoder, not quring's).
    let name = format!("g{gmin}");
    assert_eq!(qemu_nbd_dirty(&ours, &name), qemu_nbd_dirty(&qemu, &name), "{name} through qemu-nbd ({what})");
}

#[test]
fn qmp_512_byte_clusters_one_queue() {
    qmp_case(512, 4 << 20, &[512, 65536], 1, 101, 100);
}

#[test]
fn qmp_4k_clusters_four_queues() {
    qmp_case(4096, 16 << 20, &[4096, 1 << 20], 4, 102, 120);
}

#[test]
fn qmp_64k_clusters_one_queue() {
    qmp_case(65536, 32 << 20, &[512, 65536, 2 << 20], 1, 103, 100);
}

#[test]
fn qmp_64k_clusters_four_queues() {
    qmp_case(65536, 64 << 20, &[8192, 65536], 4, 104, 140);
}

#[test]
fn qmp_2m_clusters_four_queues() {
    qmp_case(2 << 20, 64 << 20, &[65536, 2 << 20], 4, 105, 60);
}

/// A quring writer killed with SIGKILL while its writes are in progress: the enabled
/// bitmap is left `in-use` (qemu-img info), the disabled one untouched, the image is
/// otherwise consistent (leaks at most); QEMU opens it and reports the bitmap inconsistent
/// (query-named-block-nodes), and a session of writes through QEMU and through quring on
/// copies leaves both with the same bitmaps; both refuse to clear it with the same
/// message and both remove it.
#[test]
fn sigkill_during_writes_qemu_sees_inconsistent() {
    let dir = tempdir();
    let img = dir.path().join("k.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(65536), 64 << 20);
    qemu_bitmap(&["--add", &s(&img), "b"]);
    qemu_bitmap(&["--add", "--disable", &s(&img), "off"]);
    // Many writes, each a command of its own, with a short pause every 50 (the stream lasts
    // over 1.6 s however fast the build); the writer is killed well before the end.
    let mut args: Vec<String> = vec!["io".into()];
    let mut st = 77u64;
    for i in 0..4000 {
        let off = splitmix64(&mut st) % 1000 * 65536;
        args.push("-c".into());
        args.push(format!("write -P {} {off} 64k", 1 + i % 200));
        if i % 50 == 49 {
            args.push("-c".into());
            args.push("sleep 20".into());
        }
    }
    args.push(s(&img));
    let mut child =
        std::process::Command::new(quring_bin()).args(&args).stdout(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "the writer never marked the bitmap in use");
        let l = qemu_bitmaps(&img);
        if l.iter().any(|b| b.0 == "b" && b.2.contains(&"in-use".to_string())) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(child.try_wait().unwrap().is_none(), "the writer finished before the kill: make the stream longer");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_unlocked(&img);
    let l = qemu_bitmaps(&img);
    assert_eq!(
        l,
        vec![
            ("b".to_string(), 65536, vec!["in-use".to_string(), "auto".to_string()]),
            ("off".to_string(), 65536, vec![]),
        ]
    );
    let r = qemu_img(["check", &s(&img)]);
    assert!(matches!(r.code, Some(0) | Some(3)), "{}", r.describe());
    qemu_img(["check", "-q", "-r", "leaks", &s(&img)]).ok();
    check_clean(&img, "SIGKILL and leak repair");

    let (qemu, ours) = (dir.path().join("qemu.qcow2"), dir.path().join("quring.qcow2"));
    std::fs::copy(&img, &qemu).unwrap();
    std::fs::copy(&img, &ours).unwrap();
    let mut q = Qmp::start();
    q.add("d", &qemu);
    assert_eq!(
        q.bitmaps("d"),
        vec![("b".to_string(), 65536, false, true), ("off".to_string(), 65536, false, false)],
        "QEMU: b inconsistent, off consistent and disabled"
    );
    q.io("d", "write -P 3 5M 64k");
    q.del("d");
    q.quit();
    quring(["io", "-c", "write -P 3 5M 64k", &s(&ours)]).ok();
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&qemu));
    assert_eq!(qemu_bitmaps(&ours), l, "the inconsistent bitmap stays as it is");
    check_clean(&ours, "a session after the kill");
    check_clean(&qemu, "a QEMU session after the kill");
    for args in [vec!["--clear"], vec!["--enable"], vec!["--merge", "off"]] {
        let mut a = vec!["bitmap"];
        a.extend(&args);
        let r = quring([&a[..], &[&s(&ours), "b"]].concat());
        let qr = qemu_img([&a[..], &[&s(&qemu), "b"]].concat());
        assert_eq!((r.code, qr.code), (Some(1), Some(1)), "{args:?}");
        assert_eq!(r.stderr.replace("quring:", "qemu-img:"), qr.stderr, "{args:?}");
    }
    let r = quring(["map", "--bitmap", "b", "--output=json", &s(&ours)]);
    assert_eq!(r.code, Some(1), "an inconsistent bitmap is not exported:\n{}", r.describe());
    assert!(r.stderr.contains("inconsistent"), "{}", r.describe());
    quring_bitmap(&["--remove", &s(&ours), "b"]);
    qemu_bitmap(&["--remove", &s(&qemu), "b"]);
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&qemu));
    check_clean(&ours, "removing the inconsistent bitmap");
}

/// An image with an enabled bitmap (64 KiB) and a disabled one (4 KiB), both with bits
/// near the end of the disk.
fn resize_base(path: &Path, size: u64, backing: Option<&Path>) {
    let mut o = Qcow2Opts::cluster(65536);
    if let Some(b) = backing {
        o.backing = Some((s(b), "qcow2".into()));
    }
    create_qcow2(path, &o, size);
    qemu_bitmap(&["--add", "-g", "4k", &s(path), "off"]);
    qemu_io_cmds(path, "qcow2", &[format!("write -P 1 {} 12k", size - 20480), "write -P 2 1M 64k".into()]);
    qemu_bitmap(&["--disable", &s(path), "off"]);
    qemu_bitmap(&["--add", &s(path), "b"]);
    qemu_io_cmds(path, "qcow2", &[format!("write -P 3 {} 4k", size - 4096), "write -P 4 3M 4k".into()]);
}

/// `quring resize` and `qemu-img resize` on copies of one image with bitmaps: the bitmaps
/// follow the new size alike (bits past a shrunken end dropped, a grown range clean, the
/// zeroing over a backing file and preallocation not counted), qemu-img info lists them
/// alike, check is clean; an inconsistent bitmap makes both refuse with the same message
/// and leave the size as it was.
#[test]
fn resize_with_bitmaps_matches_qemu_img() {
    let dir = tempdir();
    let size = 16u64 << 20;
    let back = dir.path().join("back.qcow2");
    create_qcow2(&back, &Qcow2Opts::cluster(65536), 32 << 20);
    qemu_io_cmds(&back, "qcow2", &["write -P 9 0 32M".into()]);
    // (what, options, new size, over a backing file)
    let cases: &[(&str, &[&str], &str, bool)] = &[
        ("grow", &[], "32M", false),
        ("grow unaligned", &[], "16777728", false),
        ("grow relative", &[], "+3G", false),
        ("shrink", &["--shrink"], "8M", false),
        ("shrink unaligned", &["--shrink"], "16756736", false),
        ("shrink to one granule", &["--shrink"], "4096", false),
        ("grow over a backing file", &[], "24M", true),
        ("grow preallocated", &["--preallocation=full"], "20M", false),
        ("grow preallocated metadata", &["--preallocation=metadata"], "20M", false),
    ];
    for (what, args, new_size, backed) in cases {
        let base = dir.path().join("base.qcow2");
        let _ = std::fs::remove_file(&base);
        resize_base(&base, size, backed.then_some(back.as_path()));
        let (qemu, ours) = (dir.path().join("qemu.qcow2"), dir.path().join("quring.qcow2"));
        std::fs::copy(&base, &qemu).unwrap();
        std::fs::copy(&base, &ours).unwrap();
        let mut a = vec!["resize"];
        a.extend(args.iter().copied());
        qemu_img([&a[..], &[&s(&qemu), new_size]].concat()).ok();
        let r = quring([&a[..], &[&s(&ours), new_size]].concat()).ok();
        assert_eq!(r.stdout, "Image resized.\n", "{what}");
        check_clean(&ours, what);
        let info = |p: &Path| qemu_img(["info", "--output=json", &s(p)]).ok().json()["virtual-size"].as_u64();
        assert_eq!(info(&ours), info(&qemu), "{what}");
        assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&qemu), "{what}");
        for name in ["b", "off"] {
            let want = quring_dirty(&qemu, name);
            assert_eq!(quring_dirty(&ours, name), want, "{what}: bitmap {name}");
            assert!(want.iter().all(|(o, l)| o + l <= info(&qemu).unwrap()), "{what}: {want:?}");
        }
        let cmp = qemu_img(["compare", &s(&qemu), &s(&ours)]);
        assert_eq!(cmp.code, Some(0), "{what}: {}", cmp.describe());
    }

    // An inconsistent bitmap: both refuse, nothing changes size.
    let base = dir.path().join("base.qcow2");
    let _ = std::fs::remove_file(&base);
    resize_base(&base, size, None);
    let killed = dir.path().join("killed.qcow2");
    std::fs::copy(&base, &killed).unwrap();
    let mut child = std::process::Command::new(quring_bin())
        .args(["io", "-c", "write 0 4k", "-c", "sleep 60000", &s(&killed)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !qemu_bitmaps(&killed).iter().any(|b| b.0 == "b" && b.2.contains(&"in-use".to_string())) {
        assert!(std::time::Instant::now() < deadline, "the writer never marked the bitmap in use");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    wait_unlocked(&killed);
    qemu_img(["check", "-q", "-r", "leaks", &s(&killed)]).ok();
    for (args, new_size) in [(&[][..], "32M"), (&["--shrink"][..], "8M")] {
        let (qemu, ours) = (dir.path().join("iq.qcow2"), dir.path().join("iu.qcow2"));
        std::fs::copy(&killed, &qemu).unwrap();
        std::fs::copy(&killed, &ours).unwrap();
        let mut a = vec!["resize"];
        a.extend(args.iter().copied());
        let q = qemu_img([&a[..], &[&s(&qemu), new_size]].concat());
        let r = quring([&a[..], &[&s(&ours), new_size]].concat());
        assert_eq!((r.code, q.code), (Some(1), Some(1)), "{args:?}\n{}\n{}", r.describe(), q.describe());
        assert_eq!(r.stderr.replace("quring:", "qemu-img:"), q.stderr, "{args:?}");
        let info = |p: &Path| qemu_img(["info", "--output=json", &s(p)]).ok().json()["virtual-size"].as_u64();
        assert_eq!(info(&ours), Some(size), "{args:?}");
        assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&qemu), "{args:?}");
        check_clean(&ours, "a refused resize");
    }
}

/// A live resize in a session with enabled bitmaps (the library's Queue::resize; QEMU's
/// QMP block_resize): writes before, between and after a grow and a shrink, on copies of
/// one image; the stored bitmaps are equal, the data too, check is clean.
#[test]
fn live_resize_with_bitmaps_matches_qmp_block_resize() {
    let dir = tempdir();
    let size = 8u64 << 20;
    let base = dir.path().join("base.qcow2");
    resize_base(&base, size, None);
    qemu_bitmap(&["--add", "-g", "1M", &s(&base), "coarse"]);
    let (qemu, ours) = (dir.path().join("qemu.qcow2"), dir.path().join("quring.qcow2"));
    std::fs::copy(&base, &qemu).unwrap();
    std::fs::copy(&base, &ours).unwrap();
    // (size, then writes)
    let steps: Vec<(u64, Vec<GuestOp>)> = vec![
        (size, vec![GuestOp::Write(512, 4096, 1), GuestOp::Discard(7 << 20, 65536)]),
        (20 << 20, vec![GuestOp::Write(size, 512, 2), GuestOp::Zero(19 << 20, 1 << 20, false)]),
        ((6 << 20) + 512, vec![GuestOp::Write(6 << 20, 512, 3), GuestOp::Write(5 << 20, 70_000 / 512 * 512, 4)]),
        (12 << 20, vec![GuestOp::Write(11 << 20, 8192, 5)]),
    ];
    let mut q = Qmp::start();
    q.add("d", &qemu);
    for (sz, ops) in &steps {
        if *sz != size {
            q.ok("block_resize", json!({ "node-name": "d", "size": sz }));
        }
        for op in ops {
            q.io("d", &op.qemu_io());
        }
    }
    q.del("d");
    q.quit();

    let img = Image::open(&ours, &Options { l1_room: Some(64 << 20), ..Default::default() }).unwrap();
    let mut qu = Queue::new(&img, &QueueOptions::default()).unwrap();
    for (sz, ops) in &steps {
        if *sz != img.size() {
            qu.resize(*sz, &ResizeOptions { shrink: true, ..Default::default() }).unwrap();
        }
        for op in ops {
            match *op {
                GuestOp::Write(o, l, p) => qu.write_at(&vec![p; l as usize], o).unwrap(),
                GuestOp::Zero(o, l, u) => qu.write_zeroes(o, l, u).unwrap(),
                GuestOp::Discard(o, l) => qu.discard(o, l).unwrap(),
            }
        }
    }
    qu.flush().unwrap();
    drop(qu);
    img.close().unwrap();
    drop(img);

    check_clean(&ours, "a live resize");
    check_clean(&qemu, "QEMU's live resize");
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&qemu));
    for name in ["b", "off", "coarse"] {
        assert_eq!(quring_dirty(&ours, name), quring_dirty(&qemu, name), "bitmap {name}");
    }
    let cmp = qemu_img(["compare", &s(&qemu), &s(&ours)]);
    assert_eq!(cmp.code, Some(0), "{}", cmp.describe());
}
