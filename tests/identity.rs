//! quring's identity extension (issue 19, docs/identity.md): GUID checks on every link of a
//! chain, finding moved backing files by GUID, the backing length, resizes that keep it true,
//! and QEMU keeping the extension through its tools.

mod common;

use common::*;
use quring::image::{IdentityPolicy, Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Queue, QueueOptions};
use serde_json::Value;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn fs(p: &Path) -> Value {
    let v = quring(["info", "-U", "--output=json", &s(p)]).ok().json();
    v["format-specific"]["data"].clone()
}

#[track_caller]
fn qcreate(args: &[&str]) {
    let mut v = vec!["create", "-q"];
    v.extend_from_slice(args);
    quring(v).ok();
}

#[track_caller]
fn qio(p: &Path, cmds: &[&str]) -> Run {
    let mut v: Vec<String> = vec!["io".into()];
    for c in cmds {
        v.push("-c".into());
        v.push(c.to_string());
    }
    v.push(s(p));
    quring(v)
}

#[track_caller]
fn reads_ok(r: &Run) {
    assert!(r.status() == 0 && !r.stdout.contains("fail"), "{}", r.describe());
}

#[test]
fn create_and_info_show_the_identity() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let ov = dir.path().join("ov.qcow2");
    qcreate(&[&s(&base), "4M"]);
    qcreate(&["-b", "base.qcow2", "-F", "qcow2", &s(&ov)]);
    let (b, o) = (fs(&base), fs(&ov));
    let bg = b["guid"].as_str().unwrap().to_string();
    assert_eq!(bg.len(), 36);
    assert_ne!(o["guid"], b["guid"]);
    assert_eq!(o["backing-guid"].as_str(), Some(bg.as_str()));
    assert_eq!(o["backing-length"], 4 * MIB);
    assert!(b.get("backing-length").is_none());
    let human = quring(["info", &s(&ov)]).ok().stdout;
    assert!(human.contains(&format!("    backing guid: {bg}\n")), "{human}");
    assert!(human.contains("    backing length: 4194304\n"), "{human}");
    // The library says the same.
    let img = Image::open(&ov, &Options { read_only: true, ..Default::default() }).unwrap();
    let id = img.identity().unwrap();
    assert_eq!(id.backing_guid.to_string(), bg);
    assert_eq!(img.backing_length(), Some(4 * MIB));
    // QEMU opens, reads, writes and checks it.
    drop(img);
    for p in [&base, &ov] {
        let c = qemu_img(["check", &s(p)]);
        assert_eq!(c.status(), 0, "{}", c.describe());
    }
    qemu_io_cmds(&ov, "qcow2", &["write -P 0x5 0 64k".into(), "read -P 0x5 0 64k".into()]);
    assert_eq!(fs(&ov)["guid"], o["guid"]);
    // identity=off: byte for byte what qemu-img create writes.
    let a = dir.path().join("a.qcow2");
    let q = dir.path().join("q.qcow2");
    qcreate(&["-o", "identity=off", &s(&a), "64M"]);
    qemu_img(["create", "-q", "-f", "qcow2", &s(&q), "64M"]).ok();
    assert!(raw_bytes_equal(&a, &q));
    assert!(fs(&a).get("guid").is_none());
}

#[test]
fn a_replaced_backing_file_is_refused() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let ov = dir.path().join("ov.qcow2");
    qcreate(&[&s(&base), "4M"]);
    qio(&base, &["write -P 0x11 0 4M"]).ok();
    qcreate(&["-b", "base.qcow2", "-F", "qcow2", &s(&ov)]);
    let want = fs(&base)["guid"].as_str().unwrap().to_string();
    reads_ok(&qio(&ov, &["read -P 0x11 0 4M"]));
    // Another image at the same path (a re-created template).
    std::fs::remove_file(&base).unwrap();
    qcreate(&[&s(&base), "4M"]);
    let got = fs(&base)["guid"].as_str().unwrap().to_string();
    let r = qio(&ov, &["read 0 64k"]);
    assert_eq!(r.status(), 1, "{}", r.describe());
    for needle in [want.clone(), got.clone(), s(&ov), "base.qcow2".into(), "backing-identity=ignore".into()] {
        assert!(r.stderr.contains(&needle), "{needle}: {}", r.describe());
    }
    // -o backing-identity=ignore and the library option open it.
    let mut v: Vec<String> = ["io", "-o", "backing-identity=ignore", "-c", "read -P 0 0 64k"].map(String::from).into();
    v.push(s(&ov));
    reads_ok(&quring(v));
    match Image::open(&ov, &Options { read_only: true, ..Default::default() }) {
        Err(quring::Error::BackingMismatch(m)) => assert!(m.contains(&want) && m.contains(&got), "{m}"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let o = Options { read_only: true, backing_identity: IdentityPolicy::Ignore, ..Default::default() };
    Image::open(&ov, &o).unwrap();
    // A file without the extension (made by qemu-img) at that path: refused too.
    std::fs::remove_file(&base).unwrap();
    qemu_img(["create", "-q", "-f", "qcow2", &s(&base), "4M"]).ok();
    let r = qio(&ov, &["read 0 64k"]);
    assert_eq!(r.status(), 1, "{}", r.describe());
    assert!(r.stderr.contains("has no GUID") && r.stderr.contains(&want), "{}", r.describe());
    // Images without the extension behave as before.
    let plain = dir.path().join("plain.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", &s(&plain)]).ok();
    reads_ok(&qio(&plain, &["read -P 0 0 64k"]));
}

#[test]
fn a_moved_chain_opens_with_backing_search() {
    let dir = tempdir();
    let (d1, d2) = (dir.path().join("d1"), dir.path().join("d2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qcreate(&["-o", "cluster_size=4k", &s(&base), "8M"]);
    qio(&base, &["write -P 0x11 0 8M"]).ok();
    qcreate(&["-b", "base.qcow2", "-F", "qcow2", &s(&mid)]);
    qio(&mid, &["write -P 0x22 1M 2M"]).ok();
    qcreate(&["-b", "mid.qcow2", "-F", "qcow2", &s(&top)]);
    qio(&top, &["write -P 0x33 2M 512k"]).ok();
    let before = dir.path().join("before.raw");
    qemu_img(["convert", "-O", "raw", &s(&top), &s(&before)]).ok();
    // Templates moved (and renamed) by a management layer; some junk in the directories.
    std::fs::rename(&mid, d1.join("m-renamed.img")).unwrap();
    std::fs::rename(&base, d2.join("base.qcow2")).unwrap();
    std::fs::write(d1.join("junk"), b"not an image").unwrap();
    std::fs::write(d2.join("short"), b"QFI").unwrap();
    let r = qio(&top, &["read 0 64k"]);
    assert_eq!(r.status(), 1, "{}", r.describe());
    let mut v: Vec<String> =
        ["io", "--backing-search", &s(&d1), "--backing-search", &s(&d2), "-c", "read -P 0x11 0 1M"]
            .map(String::from)
            .into();
    v.push(s(&top));
    reads_ok(&quring(v));
    // Every byte reads as before the move (library option).
    let o = Options { read_only: true, backing_search: vec![d1.clone(), d2.clone()], ..Default::default() };
    let img = Image::open(&top, &o).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut buf = AlignedBuf::new(8 * MIB as usize);
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == std::fs::read(&before).unwrap()[..]);
}

/// The shrink-then-grow scenario of issue 19 on overlays that carry the extension: the grown
/// range reads zeros in quring and QEMU whichever of them resized; a quring shrink lowers
/// the backing length.
#[test]
fn shrink_then_grow_reads_zeros_and_keeps_the_length_true() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    qcreate(&[&s(&base), "5M"]);
    qio(&base, &["write -P 0x11 0 5M"]).ok();
    for (shrink_q, grow_q) in [(true, true), (false, false), (true, false), (false, true)] {
        let ov = dir.path().join(format!("ov-{shrink_q}-{grow_q}.qcow2"));
        qcreate(&["-b", "base.qcow2", "-F", "qcow2", &s(&ov)]);
        let resize = |qemu: bool, args: &[&str]| {
            let mut v: Vec<String> = vec!["resize".into()];
            v.extend(args.iter().map(|a| a.to_string()));
            v.insert(v.len() - 1, s(&ov));
            let r = if qemu { qemu_img(&v) } else { quring(&v) };
            assert_eq!(r.status(), 0, "{}", r.describe());
        };
        resize(shrink_q, &["--shrink", "3M"]);
        if !shrink_q {
            assert_eq!(fs(&ov)["backing-length"], 3 * MIB, "a quring shrink lowers the backing length");
        }
        resize(grow_q, &["10M"]);
        let c = qemu_img(["check", &s(&ov)]);
        assert_eq!(c.status(), 0, "{}", c.describe());
        let cmds = ["read -P 0x11 0 3M", "read -P 0 3M 7M"];
        reads_ok(&qio(&ov, &cmds));
        let mut v: Vec<String> = Vec::new();
        for c in cmds {
            v.extend(["-c".to_string(), c.to_string()]);
        }
        v.push(s(&ov));
        reads_ok(&qemu_io(&v));
    }
}

/// A backing file grown after the overlay was made: quring shows zeros past the recorded
/// backing length, QEMU (which ignores the extension) the backing file's new data.
#[test]
fn a_grown_backing_file_reads_zeros_past_the_recorded_length() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let ov = dir.path().join("ov.qcow2");
    qcreate(&[&s(&base), "4M"]);
    qio(&base, &["write -P 0x11 0 4M"]).ok();
    qcreate(&["-b", "base.qcow2", "-F", "qcow2", &s(&ov), "8M"]);
    assert_eq!(fs(&ov)["backing-length"], 4 * MIB);
    quring(["resize", &s(&base), "8M"]).ok();
    qio(&base, &["write -P 0x44 4M 4M"]).ok();
    reads_ok(&qio(&ov, &["read -P 0x11 0 4M", "read -P 0 4M 4M"]));
    reads_ok(&qemu_io(["-c", "read -P 0x44 4M 4M", &s(&ov)]));
    // Block status agrees: past the length nothing comes from the backing file.
    let m = quring(["map", "--output=json", &s(&ov)]).ok().json();
    let last = m.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["start"], 4 * MIB, "{m}");
    assert_eq!(last["depth"], 0, "{m}");
    assert_eq!(last["data"], false, "{m}");
    // A write that copies on write across the length fills zeros past it.
    qio(&ov, &["write -P 0x55 4M 4k"]).ok();
    reads_ok(&qio(&ov, &["read -P 0x55 4M 4k", "read -P 0 4100k 60k"]));
    let c = qemu_img(["check", &s(&ov)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

/// QEMU keeps the extension through snapshot, amend, resize and rebase; a rebase that
/// changes the backing file leaves the backing fields stale, which quring detects and says.
#[test]
fn qemu_tools_keep_the_extension() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let other = dir.path().join("other.qcow2");
    let ov = dir.path().join("ov.qcow2");
    qcreate(&[&s(&base), "4M"]);
    qcreate(&["-b", "base.qcow2", "-F", "qcow2", &s(&ov)]);
    let id = fs(&ov);
    let steps: &[&[&str]] = &[
        &["snapshot", "-c", "s1"],
        &["amend", "-o", "lazy_refcounts=on"],
        &["amend", "-o", "compat=0.10"],
        &["amend", "-o", "compat=1.1"],
        &["amend", "-o", "refcount_bits=1"],
        &["resize", "IMG", "8M"],
        &["snapshot", "-d", "s1"],
        &["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2"],
    ];
    for st in steps {
        let mut v: Vec<String> = st.iter().map(|a| if *a == "IMG" { s(&ov) } else { a.to_string() }).collect();
        if !st.contains(&"IMG") {
            v.push(s(&ov));
        }
        qemu_img(&v).ok();
        let now = fs(&ov);
        for k in ["guid", "backing-guid", "backing-length"] {
            assert_eq!(now[k], id[k], "{st:?}: {k}");
        }
        assert!(now.get("backing-identity-stale").is_none(), "{st:?}");
        reads_ok(&qio(&ov, &["read 0 64k"]));
    }
    // qemu-img rebase to another file: the fields are stale, not applied, and shown so.
    qemu_img(["create", "-q", "-f", "qcow2", &s(&other), "4M"]).ok();
    qemu_img(["rebase", "-b", "other.qcow2", "-F", "qcow2", &s(&ov)]).ok();
    assert_eq!(fs(&ov)["backing-identity-stale"], true);
    assert!(quring(["info", &s(&ov)]).ok().stdout.contains("backing identity stale: true"));
    reads_ok(&qio(&ov, &["read 0 64k"]));
    let c = qemu_img(["check", &s(&ov)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

#[test]
fn convert_gives_a_new_guid() {
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    let base = dir.path().join("base.qcow2");
    qcreate(&[&s(&src), "4M"]);
    qcreate(&[&s(&base), "4M"]);
    qio(&src, &["write -P 0x7 0 1M"]).ok();
    let dst = dir.path().join("dst.qcow2");
    quring(["convert", "-O", "qcow2", &s(&src), &s(&dst)]).ok();
    let (a, b) = (fs(&src), fs(&dst));
    assert!(b["guid"].is_string());
    assert_ne!(a["guid"], b["guid"]);
    let ovl = dir.path().join("ovl.qcow2");
    quring(["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", &s(&src), &s(&ovl)]).ok();
    let o = fs(&ovl);
    assert_eq!(o["backing-guid"], fs(&base)["guid"]);
    assert_eq!(o["backing-length"], 4 * MIB);
    let c = qemu_img(["compare", &s(&src), &s(&ovl)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

/// The backing length over a raw backing file (a raw template that grew).
#[test]
fn raw_backing_file_grown_reads_zeros_past_the_recorded_length() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    let ov = dir.path().join("ov.qcow2");
    build_raw(&base, 4 * MIB, &["write -P 0x21 0 4M".to_string()]);
    qcreate(&["-b", "base.raw", "-F", "raw", &s(&ov), "8M"]);
    let f = fs(&ov);
    assert_eq!(f["backing-length"], 4 * MIB);
    assert!(f.get("backing-guid").is_none(), "a raw file has no GUID: {f}");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&base).unwrap();
        f.write_all(&vec![0x22u8; 4 * MIB as usize]).unwrap();
    }
    reads_ok(&qio(&ov, &["read -P 0x21 0 4M", "read -P 0 4M 4M"]));
    reads_ok(&qemu_io(["-c", "read -P 0x22 4M 4M", &s(&ov)]));
}
