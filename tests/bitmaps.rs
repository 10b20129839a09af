//! Persistent dirty bitmaps against QEMU: bitmaps made by `qemu-img bitmap`, then seeded
//! streams of writes, zero writes and discards through quring (one and four queues) and
//! through qemu-io (QEMU's own block layer, which loads the image's persistent bitmaps,
//! tracks the writes and stores them at close) on copies of one image: the stored bitmaps
//! must equal each other and a model of the stream; QEMU's NBD export of the bitmap shows
//! the same extents; bitmaps quring creates, clears, merges, enables, disables and removes
//! are listed by `qemu-img info` as after the same `qemu-img bitmap` commands;
//! `qemu-img check` is clean after every step; a SIGKILL leaves the bitmap in use; every
//! crash state of a session (with guest flushes and the close) has the bitmap either in use
//! or consistent with the guest data it holds; `convert --bitmaps` copies them as qemu-img.

mod common;
mod crash_harness;

use common::bitmap_ops::*;
use common::*;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions};
use std::path::Path;

/// One case: an image with three bitmaps made by qemu-img (enabled at the default
/// granularity, enabled at a second granularity, disabled with content), the same stream
/// through qemu-io and through quring on copies; the stored bitmaps must equal the model
/// and each other, the disabled one must be unchanged, and both images pass check.
fn stream_case(cs: u64, size: u64, g2: u64, queues: usize, seed: u64, n: usize) {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, &Qcow2Opts::cluster(cs as u32), size);
    qemu_bitmap(&["--add", &s(&base), "frozen"]);
    qemu_io_cmds(&base, "qcow2", &[format!("write -P 7 {cs} {}", cs.min(size / 4))]);
    qemu_bitmap(&["--disable", &s(&base), "frozen"]);
    qemu_bitmap(&["--add", &s(&base), "b0"]);
    qemu_bitmap(&["--add", "-g", &g2.to_string(), &s(&base), "b1"]);
    // Something dirty before the stream, then cleared: the stream alone must count.
    qemu_io_cmds(&base, "qcow2", &[format!("write -P 9 0 {}", size / 2)]);
    qemu_bitmap(&["--clear", &s(&base), "b0"]);
    qemu_bitmap(&["--clear", &s(&base), "b1"]);
    let frozen_before = quring_dirty(&base, "frozen");
    assert!(!frozen_before.is_empty());
    let g0 = qemu_bitmaps(&base).iter().find(|b| b.0 == "b0").unwrap().1;

    let ops = stream(seed, n, size, g0.min(g2), cs);
    let qemu = dir.path().join("qemu.qcow2");
    let ours = dir.path().join("quring.qcow2");
    std::fs::copy(&base, &qemu).unwrap();
    std::fs::copy(&base, &ours).unwrap();
    qemu_io_cmds(&qemu, "qcow2", &ops.iter().map(|o| o.qemu_io()).collect::<Vec<_>>());
    run_quring(&ours, &ops, queues);

    let what = format!("cluster {cs}, granularities {g0}/{g2}, {queues} queue(s), seed {seed}");
    check_clean(&ours, &what);
    check_clean(&qemu, &what);
    if queues == 1 {
        // (With several queues overlapping requests may land in another order.)
        let cmp = qemu_img(["compare", &s(&qemu), &s(&ours)]);
        assert_eq!(cmp.code, Some(0), "guest data differs ({what}):\n{}", cmp.describe());
    }
    for (name, g) in [("b0", g0), ("b1", g2)] {
        let want = model(&ops, g, size);
        assert_eq!(quring_dirty(&ours, name), want, "{name} stored by quring vs the model ({what})");
        assert_eq!(quring_dirty(&qemu, name), want, "{name} stored by QEMU vs the model ({what})");
    }
    assert_eq!(quring_dirty(&ours, "frozen"), frozen_before, "disabled bitmap changed ({what})");
    // QEMU lists both images' bitmaps alike: same names, granularities, flags (none in use).
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&qemu), "{what}");
    for (name, _, flags) in qemu_bitmaps(&ours) {
        assert!(!flags.iter().any(|f| f == "in-use"), "{name} left in use ({what})");
    }
}

#[test]
fn stream_512_byte_clusters_one_queue() {
    stream_case(512, 8 << 20, 512, 1, 1, 120);
}

#[test]
fn stream_64k_clusters_four_queues() {
    stream_case(65536, 64 << 20, 4096, 4, 2, 160);
}

#[test]
fn stream_64k_clusters_one_queue() {
    stream_case(65536, 32 << 20, 1 << 20, 1, 3, 120);
}

#[test]
fn stream_2m_clusters_four_queues() {
    stream_case(2 << 20, 64 << 20, 65536, 4, 4, 60);
}

/// QEMU's NBD export of a bitmap quring stored shows the extents quring's `map --bitmap`
/// prints (and the ones `Image::dirty_ranges` returns).
#[test]
fn qemu_nbd_sees_quring_bitmap() {
    let dir = tempdir();
    let img = dir.path().join("n.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(65536), 16 << 20);
    qemu_bitmap(&["--add", &s(&img), "inc"]);
    let ops = stream(11, 60, 16 << 20, 65536, 65536);
    run_quring(&img, &ops, 2);
    let ours = quring_dirty(&img, "inc");
    assert_eq!(ours, model(&ops, 65536, 16 << 20));
    assert_eq!(qemu_nbd_dirty(&img, "inc"), ours);
    let ro = Image::open(&img, &Options { read_only: true, ..Default::default() }).unwrap();
    let api: Vec<(u64, u64)> = ro.dirty_ranges("inc").unwrap().into_iter().map(|(o, l)| (o.get(), l)).collect();
    assert_eq!(api, ours);
    check_clean(&img, "the stream");
}

/// `quring bitmap` and `qemu-img bitmap` (with writes through quring io and qemu-io in
/// between) on copies of one image: qemu-img info lists the same bitmaps after every step,
/// the dirty extents are the same, and check is clean after every step.
#[test]
fn bitmap_commands_match_qemu_img() {
    let dir = tempdir();
    let a = dir.path().join("qemu.qcow2");
    let b = dir.path().join("quring.qcow2");
    let src = dir.path().join("src.qcow2");
    create_qcow2(&a, &Qcow2Opts::cluster(65536), 32 << 20);
    std::fs::copy(&a, &b).unwrap();
    create_qcow2(&src, &Qcow2Opts::cluster(65536), 32 << 20);
    qemu_bitmap(&["--add", "-g", "128k", &s(&src), "other"]);
    qemu_io_cmds(&src, "qcow2", &["write 20M 300k".to_string()]);
    let (sa, sb) = (s(&a), s(&b));
    let steps: &[(&[&str], Option<&str>)] = &[
        (&["--add", "IMG", "b0"], Some("write -P 1 0 64k")),
        (&["--add", "-g", "1M", "--disable", "IMG", "b1"], Some("write -P 2 3M 4k")),
        (&["--enable", "IMG", "b1"], Some("write -P 3 5M 1M")),
        (&["--merge", "b1", "IMG", "b0"], None),
        (&["--disable", "IMG", "b0"], Some("write -z 9M 64k")),
        (&["--merge", "other", "-b", "SRC", "-F", "qcow2", "IMG", "b0"], None),
        (&["--clear", "IMG", "b1"], Some("discard 12M 128k")),
        (&["--add", "IMG", "b2", "--disable", "--enable"], Some("write -P 4 31M 512")),
        (&["--remove", "IMG", "b0"], Some("write -P 5 0 512")),
    ];
    for (i, (args, io)) in steps.iter().enumerate() {
        for (img, qemu) in [(&sa, true), (&sb, false)] {
            let args: Vec<&str> = args
                .iter()
                .map(|x| {
                    if *x == "IMG" {
                        img.as_str()
                    } else if *x == "SRC" {
                        ""
                    } else {
                        x
                    }
                })
                .collect();
            let src_s = s(&src);
            let args: Vec<&str> = args.into_iter().map(|x| if x.is_empty() { src_s.as_str() } else { x }).collect();
            if qemu {
                qemu_bitmap(&args);
            } else {
                quring_bitmap(&args);
            }
            if let Some(c) = io {
                if qemu {
                    qemu_io_cmds(Path::new(img), "qcow2", &[c.to_string()]);
                } else {
                    quring(["io", "-c", c, img]).ok();
                }
            }
        }
        let what = format!("step {i} {args:?}");
        check_clean(&a, &what);
        check_clean(&b, &what);
        let (la, lb) = (qemu_bitmaps(&a), qemu_bitmaps(&b));
        assert_eq!(la, lb, "{what}");
        // quring info lists them as qemu-img info does, text and JSON.
        let qi = quring(["info", "--output=json", &sb]).ok().json();
        assert_eq!(bitmap_list(&qi), lb, "{what}");
        let text = |r: Run| {
            r.stdout
                .lines()
                .skip_while(|l| !l.contains("bitmaps:"))
                .take_while(|l| !l.contains("refcount bits"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(text(quring(["info", &sb]).ok()), text(qemu_img(["info", &sb]).ok()), "{what}");
        for (name, _, _) in &la {
            assert_eq!(quring_dirty(&a, name), quring_dirty(&b, name), "bitmap {name} after {what}");
        }
    }
}

/// qemu-img's refusals and messages, word for word.
#[test]
fn bitmap_errors_match_qemu_img() {
    let dir = tempdir();
    let img = dir.path().join("e.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(65536), 8 << 20);
    qemu_bitmap(&["--add", &s(&img), "x"]);
    let i = s(&img);
    let long = "n".repeat(1024);
    let cases: Vec<Vec<&str>> = vec![
        vec![&i, "x"],
        vec!["--add", &i, "x"],
        vec!["--add", &i],
        vec!["--remove", &i, "nope"],
        vec!["--clear", &i, "nope"],
        vec!["--enable", &i, "nope"],
        vec!["--add", "-g", "100", &i, "y"],
        vec!["--add", "-g", "256", &i, "y"],
        vec!["--add", "-g", "abc", &i, "y"],
        vec!["-g", "4096", "--remove", &i, "x"],
        vec!["--merge", "nope", &i, "x"],
        vec!["-b", &i, "--add", &i, "q"],
        vec!["--add", "-F", "qcow2", &i, "w"],
        vec!["--add", &i, ""],
    ];
    for c in cases {
        let mut a = vec!["bitmap"];
        a.extend(c.iter().copied());
        let q = qemu_img(&a);
        let r = quring(&a);
        assert_eq!(r.code, q.code, "{c:?}\n{}\n{}", r.describe(), q.describe());
        assert_eq!(r.stderr.replace("quring:", "qemu-img:"), q.stderr, "{c:?}");
    }
    // Name too long: QEMU names its node, quring the file; the rest is the same.
    let r = quring(["bitmap", "--add", &i, &long]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("Name length exceeds maximum (1023 characters)"), "{}", r.describe());
    check_clean(&img, "refused commands");
    assert_eq!(qemu_bitmaps(&img), vec![("x".to_string(), 65536, vec!["auto".to_string()])]);
}

/// A quring writer killed with SIGKILL leaves its bitmap in use: qemu-img info says
/// "in-use", the image is otherwise consistent, and quring then refuses to use the bitmap
/// but removes it.
#[test]
fn sigkill_leaves_bitmap_in_use() {
    let dir = tempdir();
    let img = dir.path().join("k.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(65536), 16 << 20);
    qemu_bitmap(&["--add", &s(&img), "b"]);
    qemu_bitmap(&["--add", "--disable", &s(&img), "off"]);
    let mut child = std::process::Command::new(quring_bin())
        .args(["io", "-c", "write -P 1 0 1M", "-c", "flush", "-c", "sleep 60000", &s(&img)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "the writer never marked the bitmap in use");
        let l = qemu_bitmaps(&img);
        if l.iter().any(|b| b.0 == "b" && b.2.contains(&"in-use".to_string()))
            && qemu_io(["-U", "-r", "-c", "read -P 1 0 1M", &s(&img)]).stdout.contains("read 1048576")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
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
    assert!(qemu_img(["info", &s(&img)]).ok().stdout.contains("[0]: in-use"));
    // At worst the killed writer's reserved clusters leak.
    let r = qemu_img(["check", &s(&img)]);
    assert!(matches!(r.code, Some(0) | Some(3)), "{}", r.describe());
    qemu_img(["check", "-q", "-r", "leaks", &s(&img)]).ok();
    check_clean(&img, "SIGKILL and leak repair");
    assert_eq!(qemu_bitmaps(&img), l, "the leak repair kept the bitmaps");
    // An inconsistent bitmap stays as it is through a quring session, cannot be used...
    quring(["io", "-c", "write -P 2 2M 64k", &s(&img)]).ok();
    assert_eq!(qemu_bitmaps(&img), l);
    let r = quring(["bitmap", "--clear", &s(&img), "b"]);
    assert_eq!(r.code, Some(1));
    let q = qemu_img(["bitmap", "--clear", &s(&img), "b"]);
    assert_eq!(r.stderr.replace("quring:", "qemu-img:"), q.stderr);
    // ...and can be removed, as with QEMU.
    quring_bitmap(&["--remove", &s(&img), "b"]);
    assert_eq!(qemu_bitmaps(&img), vec![("off".to_string(), 65536, vec![])]);
    check_clean(&img, "removing the inconsistent bitmap");
}

/// A read-only open (info, map, check, the library) changes no byte; a read-write open
/// keeps autoclear bit 0 and clears the bits quring does not know.
#[test]
fn read_only_untouched_and_autoclear_kept() {
    let dir = tempdir();
    let img = dir.path().join("r.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(65536), 16 << 20);
    qemu_bitmap(&["--add", &s(&img), "b"]);
    qemu_io_cmds(&img, "qcow2", &["write 1M 64k".to_string()]);
    let before = std::fs::read(&img).unwrap();
    quring(["info", &s(&img)]).ok();
    quring(["info", "--output=json", &s(&img)]).ok();
    quring(["map", "--bitmap", "b", "--output=json", &s(&img)]).ok();
    quring(["check", &s(&img)]).ok();
    let ro = Image::open(&img, &Options { read_only: true, ..Default::default() }).unwrap();
    assert_eq!(ro.bitmaps().len(), 1);
    drop(ro);
    assert!(std::fs::read(&img).unwrap() == before, "a read-only use changed the file");
    // An unknown autoclear bit goes, bit 0 stays.
    let autoclear = read_be64(&img, 88);
    assert_eq!(autoclear, 1);
    patch_be64(&img, 88, autoclear | 1 << 40);
    quring(["io", "-c", "write 4M 4k", &s(&img)]).ok();
    assert_eq!(read_be64(&img, 88), 1);
    assert_eq!(quring_dirty(&img, "b"), vec![(1 << 20, 65536), (4 << 20, 65536)]);
    check_clean(&img, "the autoclear test");
}

/// The library API: add, list, track writes of several queues, dirty ranges while open,
/// clear, disable, merge, remove; every step leaves an image qemu-img check accepts.
#[test]
fn library_api() {
    let dir = tempdir();
    let path = dir.path().join("a.qcow2");
    create_qcow2(&path, &Qcow2Opts::cluster(65536), 16 << 20);
    let img = Image::open(&path, &Options::default()).unwrap();
    img.add_bitmap("a", None, false).unwrap();
    img.add_bitmap("b", Some(4096), true).unwrap();
    assert!(img.add_bitmap("a", None, false).is_err());
    let l = img.bitmaps();
    assert_eq!((l[0].name.as_str(), l[0].granularity, l[0].auto, l[0].tracking), ("a", 65536, true, true));
    assert_eq!((l[1].name.as_str(), l[1].granularity, l[1].auto, l[1].tracking), ("b", 4096, false, false));
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    q.write_at(&[1u8; 512], 70_000 / 512 * 512).unwrap();
    q.write_zeroes(1 << 20, 4096, false).unwrap();
    q.flush().unwrap();
    let ranges = |img: &Image, n: &str| -> Vec<(u64, u64)> {
        img.dirty_ranges(n).unwrap().into_iter().map(|(o, l)| (o.get(), l)).collect()
    };
    assert_eq!(ranges(&img, "a"), vec![(65536, 65536), (1 << 20, 65536)]);
    assert!(ranges(&img, "b").is_empty());
    drop(q);
    img.merge_bitmap("b", None, "a").unwrap();
    assert_eq!(ranges(&img, "b"), vec![(65536, 65536), (1 << 20, 65536)]);
    img.clear_bitmap("a").unwrap();
    assert!(ranges(&img, "a").is_empty());
    img.enable_bitmap("b").unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    q.discard(8 << 20, 8192).unwrap();
    drop(q);
    assert_eq!(ranges(&img, "b"), vec![(65536, 65536), (1 << 20, 65536), (8 << 20, 8192)]);
    assert_eq!(ranges(&img, "a"), vec![(8 << 20, 65536)]);
    img.disable_bitmap("a").unwrap();
    img.remove_bitmap("b").unwrap();
    assert!(img.dirty_ranges("b").is_err());
    img.close().unwrap();
    drop(img);
    check_clean(&path, "library operations");
    assert_eq!(qemu_bitmaps(&path), vec![("a".to_string(), 65536, vec![])]);
    assert_eq!(quring_dirty(&path, "a"), vec![(8 << 20, 65536)]);
}

/// Crash states of a session with an enabled bitmap (writes, zero writes and a discard,
/// guest flushes through the asynchronous write-back, then the clean close that stores the
/// bitmap), materialized from the device-write log (everything durable, a random subset of
/// the rest, some writes torn): each passes `qemu-img check` (leaks allowed), and its
/// bitmap is either `in-use` (inconsistent, as QEMU leaves it after a crash), or
/// consistent and then either everything the session did (the close's directory reached
/// the disk only after all guest data and metadata) or nothing, with the guest data as it
/// was (`in_use` was durable before the first guest write).
#[test]
fn crash_states_keep_the_bitmap_in_use_or_complete() {
    use crash_harness::{Log, Recorder, harness_rng, materialize, open_recorded, shm_dir};
    let dir = shm_dir();
    let (cs, size) = (65536u64, 4u64 << 20);
    let start = dir.path().join("start.qcow2");
    create_qcow2(&start, &Qcow2Opts::cluster(cs as u32), size);
    qemu_io_cmds(&start, "qcow2", &["write -P 5 0 1M".to_string()]);
    qemu_bitmap(&["--add", &s(&start), "b"]);
    qemu_bitmap(&["--add", "--disable", &s(&start), "off"]);
    let start_bytes = std::fs::read(&start).unwrap();
    let ops = stream(7, 24, size, 65536, cs);
    let rec = Recorder::new();
    let closing;
    let work = dir.path().join("work.qcow2");
    std::fs::copy(&start, &work).unwrap();
    {
        let img = open_recorded(&work, &rec, quring::image::CacheMode::Writeback);
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                GuestOp::Write(o, l, p) => q.write_at(&vec![p; l as usize], o).unwrap(),
                GuestOp::Zero(o, l, u) => q.write_zeroes(o, l, u).unwrap(),
                GuestOp::Discard(o, l) => q.discard(o, l).unwrap(),
            }
            if i % 5 == 4 {
                q.flush().unwrap();
            }
        }
        drop(q);
        closing = rec.len();
        img.close().unwrap();
    }
    let want = model(&ops, 65536, size);
    assert_eq!(quring_dirty(&work, "b"), want, "after the clean close");
    check_clean(&work, "the recorded session");
    let events = rec.events();
    let log = Log::new(&events);
    let state = dir.path().join("state.qcow2");
    let mut rng = harness_rng(17);
    let n = events.len();
    let (mut in_use, mut complete, mut untouched) = (0, 0, 0);
    // Some points of the session; every point of the close (where the bitmap is stored),
    // five random states each.
    let session = (1..closing).step_by((closing / 25).max(1));
    for c in session.chain((closing..=n).flat_map(|c| [c; 5])) {
        let (bytes, desc) = materialize(&start_bytes, &log, c, &mut rng);
        std::fs::write(&state, &bytes).unwrap();
        let chk = qemu_img(["check", &s(&state)]);
        assert!(matches!(chk.code, Some(0) | Some(3)), "crash point {c}/{n}: {desc}\n{}", chk.describe());
        let l = qemu_bitmaps(&state);
        assert_eq!(l.iter().find(|b| b.0 == "off").map(|b| b.2.clone()), Some(vec![]), "crash point {c}/{n}");
        let b = l.iter().find(|b| b.0 == "b").unwrap_or_else(|| panic!("crash point {c}/{n}: no bitmap b"));
        if b.2.iter().any(|f| f == "in-use") {
            in_use += 1;
            continue;
        }
        let dirty = quring_dirty(&state, "b");
        if dirty == want {
            complete += 1;
            continue;
        }
        assert!(dirty.is_empty(), "crash point {c}/{n}: consistent bitmap with {dirty:?}, neither empty nor {want:?}");
        let cmp = qemu_img(["compare", &s(&start), &s(&state)]);
        assert_eq!(cmp.code, Some(0), "crash point {c}/{n}: clean empty bitmap but the guest data changed: {desc}");
        untouched += 1;
    }
    assert!(in_use > 0 && complete > 0, "states in use {in_use}, complete {complete}, untouched {untouched}");
}

/// Sets `in_use` on bitmap `index` of the directory (as a writer that crashed leaves it).
fn set_in_use(path: &Path, index: usize) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut h = vec![0u8; 4096];
    f.read_exact(&mut h).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let mut p = be32(&h, 100) as usize;
    let dir = loop {
        let (kind, len) = (be32(&h, p), be32(&h, p + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            break be64(&h, p + 24);
        }
        p += 8 + len.div_ceil(8) * 8;
    };
    // Entries: 24 fixed bytes, extra data, name, padded to 8.
    let mut off = dir;
    for _ in 0..index {
        let mut e = [0u8; 24];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut e).unwrap();
        let (name, extra) = (u16::from_be_bytes([e[18], e[19]]) as u64, be32(&e, 20) as u64);
        off += (24 + extra + name).div_ceil(8) * 8;
    }
    let mut flags = [0u8; 4];
    f.seek(SeekFrom::Start(off + 12)).unwrap();
    f.read_exact(&mut flags).unwrap();
    f.seek(SeekFrom::Start(off + 12)).unwrap();
    f.write_all(&(u32::from_be_bytes(flags) | 1).to_be_bytes()).unwrap();
}

/// `quring convert --bitmaps` against `qemu-img convert --bitmaps` from one source: the
/// same bitmaps (names, granularities, flags, order) with the same dirty extents as the
/// source's, the same guest data, check clean; and the refusals word for word (raw
/// source, raw and v2 targets, --skip-broken-bitmaps alone, an inconsistent bitmap, a
/// bitmap that exists on a `-n` target) with the same files left behind.
#[test]
fn convert_bitmaps_matches_qemu_img() {
    let dir = tempdir();
    let p = |n: &str| dir.path().join(n);
    let src = p("src.qcow2");
    create_qcow2(&src, &Qcow2Opts::cluster(65536), 12 << 20);
    qemu_bitmap(&["--add", &s(&src), "off"]);
    qemu_io_cmds(&src, "qcow2", &["write -P 1 1M 100k".into()]);
    qemu_bitmap(&["--disable", &s(&src), "off"]);
    qemu_bitmap(&["--add", &s(&src), "b"]);
    qemu_bitmap(&["--add", "-g", "4096", &s(&src), "fine"]);
    qemu_io_cmds(&src, "qcow2", &["write -P 2 0 5000".into(), "write -z 3M 1M".into(), "discard 6M 64k".into()]);
    qemu_bitmap(&["--add", "-g", "2M", &s(&src), "empty"]);
    qemu_io_cmds(&src, "qcow2", &["write -P 3 12578816 4096".into()]);
    let names = ["off", "b", "fine", "empty"];
    for (tag, extra) in [("default", vec![]), ("4k", vec!["-o", "cluster_size=4096"])] {
        let (ours, theirs) = (p(&format!("ours-{tag}.qcow2")), p(&format!("theirs-{tag}.qcow2")));
        let mut args = vec!["convert", "--bitmaps", "-O", "qcow2"];
        args.extend(&extra);
        quring([&args[..], &[&s(&src), &s(&ours)]].concat()).ok();
        qemu_img([&args[..], &[&s(&src), &s(&theirs)]].concat()).ok();
        assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs), "{tag}");
        assert_eq!(qemu_bitmaps(&ours).len(), 4);
        for n in names {
            let want = quring_dirty(&src, n);
            assert_eq!(quring_dirty(&theirs, n), want, "{tag}: {n} copied by qemu-img");
            assert_eq!(quring_dirty(&ours, n), want, "{tag}: {n} copied by quring");
        }
        assert!(!quring_dirty(&ours, "fine").is_empty() && quring_dirty(&ours, "empty").len() == 1);
        check_clean(&ours, tag);
        let cmp = qemu_img(["compare", &s(&ours), &s(&theirs)]);
        assert_eq!(cmp.code, Some(0), "{}", cmp.describe());
    }

    // Refusals.
    let raw = p("src.raw");
    qemu_img(["create", "-q", "-f", "raw", &s(&raw), "4M"]).ok();
    let broken = p("broken.qcow2");
    std::fs::copy(&src, &broken).unwrap();
    set_in_use(&broken, 1);
    set_in_use(&broken, 2);
    let existing = p("ours-default.qcow2");
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("raw source", vec!["--bitmaps".into(), "-O".into(), "qcow2".into(), s(&raw)]),
        ("raw target", vec!["--bitmaps".into(), "-O".into(), "raw".into(), s(&src)]),
        (
            "v2 target",
            vec!["--bitmaps".into(), "-O".into(), "qcow2".into(), "-o".into(), "compat=0.10".into(), s(&src)],
        ),
        ("skip alone", vec!["--skip-broken-bitmaps".into(), "-O".into(), "qcow2".into(), s(&src)]),
        ("inconsistent", vec!["--bitmaps".into(), "-O".into(), "qcow2".into(), s(&broken)]),
    ];
    for (what, args) in cases {
        let (ours, theirs) = (p(&format!("o-{what}")), p(&format!("t-{what}")));
        let mut a: Vec<String> = vec!["convert".into()];
        a.extend(args);
        let r = quring([&a[..], &[s(&ours)]].concat());
        let q = qemu_img([&a[..], &[s(&theirs)]].concat());
        assert_eq!((r.code, q.code), (Some(1), Some(1)), "{what}:\n{}\n{}", r.describe(), q.describe());
        assert_eq!(r.stderr.replace("quring:", "qemu-img:"), q.stderr, "{what}");
        assert_eq!(ours.exists(), theirs.exists(), "{what}: the target left behind");
    }
    // Skipped with a warning (in qemu-img's order).
    let (ours, theirs) = (p("skip-ours.qcow2"), p("skip-theirs.qcow2"));
    let a = ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2"];
    let r = quring([&a[..], &[&s(&broken), &s(&ours)]].concat()).ok();
    let q = qemu_img([&a[..], &[&s(&broken), &s(&theirs)]].concat()).ok();
    assert_eq!(r.stderr.replace("quring:", "qemu-img:"), q.stderr);
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    assert_eq!(qemu_bitmaps(&ours).len(), 2);
    check_clean(&ours, "skipping broken bitmaps");
    // -n onto a target that has the bitmaps already.
    let theirs_existing = p("theirs-default.qcow2");
    let a = ["convert", "--bitmaps", "-n", "-O", "qcow2"];
    let r = quring([&a[..], &[&s(&src), &s(&existing)]].concat());
    let q = qemu_img([&a[..], &[&s(&src), &s(&theirs_existing)]].concat());
    assert_eq!((r.code, q.code), (Some(1), Some(1)), "{}\n{}", r.describe(), q.describe());
    assert_eq!(r.stderr.replace("quring:", "qemu-img:"), q.stderr);
    assert_eq!(qemu_bitmaps(&existing), qemu_bitmaps(&theirs_existing));
    check_clean(&existing, "-n with existing bitmaps");
}

/// Crash states of a session that grows and shrinks an image with an enabled bitmap and a
/// disabled one with bits near the end (writes before, between and after): every state
/// passes `qemu-img check` (leaks allowed; QEMU loads every bitmap and refuses a table
/// that is not exactly the size the disk needs), QEMU lists both bitmaps, quring opens it,
/// and the disabled bitmap is either in use (the crash fell inside a resize) or holds
/// exactly its bits clipped to the state's disk size.
#[test]
fn crash_states_of_a_resize_keep_the_bitmaps_valid() {
    use crash_harness::{Log, Recorder, harness_rng, materialize, open_recorded, shm_dir};
    let dir = shm_dir();
    // 4 KiB clusters and 512-byte granules: a table entry covers 16 MiB, so the grow to
    // 24 MiB needs a longer table.
    let (cs, size) = (4096u64, 4u64 << 20);
    let start = dir.path().join("start.qcow2");
    create_qcow2(&start, &Qcow2Opts::cluster(cs as u32), size);
    qemu_bitmap(&["--add", "-g", "512", &s(&start), "off"]);
    qemu_io_cmds(&start, "qcow2", &["write -P 1 0 1M".into(), format!("write -P 2 {} 12k", size - 16384)]);
    qemu_bitmap(&["--disable", &s(&start), "off"]);
    qemu_bitmap(&["--add", &s(&start), "b"]);
    let off_bits = quring_dirty(&start, "off");
    assert_eq!(off_bits.len(), 2);
    let start_bytes = std::fs::read(&start).unwrap();
    let rec = Recorder::new();
    let work = dir.path().join("work.qcow2");
    std::fs::copy(&start, &work).unwrap();
    {
        let img = open_recorded(&work, &rec, quring::image::CacheMode::Writeback);
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        q.write_at(&[3u8; 4096], 2 << 20).unwrap();
        q.resize(24 << 20, &quring::queue::ResizeOptions::default()).unwrap();
        q.write_at(&[4u8; 4096], 20 << 20).unwrap();
        q.resize(3 << 20, &quring::queue::ResizeOptions { shrink: true, ..Default::default() }).unwrap();
        q.write_at(&[5u8; 4096], 1 << 20).unwrap();
        drop(q);
        img.close().unwrap();
    }
    check_clean(&work, "the recorded resize session");
    assert_eq!(quring_dirty(&work, "b"), vec![(1 << 20, 4096), (2 << 20, 4096)]);
    assert_eq!(quring_dirty(&work, "off"), vec![(0, 1 << 20)]);
    let events = rec.events();
    let log = Log::new(&events);
    let state = dir.path().join("state.qcow2");
    let mut rng = harness_rng(23);
    let n = events.len();
    let (mut consistent, mut in_use) = (0, 0);
    for c in (1..=n).flat_map(|c| [c; 3]) {
        let (bytes, desc) = materialize(&start_bytes, &log, c, &mut rng);
        std::fs::write(&state, &bytes).unwrap();
        let chk = qemu_img(["check", &s(&state)]);
        assert!(matches!(chk.code, Some(0) | Some(3)), "crash point {c}/{n}: {desc}\n{}", chk.describe());
        let names: Vec<String> = qemu_bitmaps(&state).into_iter().map(|b| b.0).collect();
        assert_eq!(names, vec!["off".to_string(), "b".to_string()], "crash point {c}/{n}: {desc}");
        let ro = Image::open(&state, &Options { read_only: true, ..Default::default() })
            .unwrap_or_else(|e| panic!("crash point {c}/{n}: quring cannot open the state: {e}\n{desc}"));
        let vsize = ro.size();
        let want: Vec<(u64, u64)> =
            off_bits.iter().filter(|(o, _)| *o < vsize).map(|&(o, l)| (o, l.min(vsize - o))).collect();
        match ro.dirty_ranges("off") {
            Ok(got) => {
                let got: Vec<(u64, u64)> = got.into_iter().map(|(o, l)| (o.get(), l)).collect();
                assert_eq!(got, want, "crash point {c}/{n} (size {vsize}): the disabled bitmap; {desc}");
                consistent += 1;
            }
            Err(e) => {
                // In use: inconsistent, as QEMU leaves it after a crash during a resize.
                assert!(e.to_string().contains("inconsistent"), "crash point {c}/{n}: {e}");
                in_use += 1;
            }
        }
    }
    assert!(consistent > 0 && in_use > 0, "states consistent {consistent}, in use {in_use}");
}
