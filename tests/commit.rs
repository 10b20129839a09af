//! `quring commit` against `qemu-img commit` (issue 16, item 6): the same chain committed by
//! each tool in its own directory, onto qcow2 bases (512 B, 64 KiB, 2 MiB extended-L2
//! clusters) and a raw base (grown to the overlay's size), with `-d`, `-b` over three
//! layers, `-p`: the bases compare equal, the overlays read the same (emptied: nothing
//! allocated in the top layer), `qemu-img check` clean; qemu-img's messages and exit codes.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

#[track_caller]
fn check_clean(p: &Path) {
    let c = qemu_img(["check", &s(p)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

#[track_caller]
fn same_content(a: &Path, b: &Path, fmt: &str) {
    let c = qemu_img(["compare", "-f", fmt, "-F", fmt, &s(a), &s(b)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

/// Does the top layer of `p` allocate anything?
fn top_allocates(p: &Path) -> bool {
    let m = qemu_img(["map", "--output=json", &s(p)]).ok().json();
    m.as_array().unwrap().iter().any(|e| e["depth"] == 0 && e["present"] == true)
}

/// Builds the chain in `dir`: base (qcow2 with `cs`, or raw of 3 MiB), optionally mid, and
/// top (4 MiB) with data, zero clusters and discards.
fn build(dir: &Path, cs: u32, ext: bool, raw_base: bool, mid: bool) {
    let o = |b: &str, f: &str| Qcow2Opts {
        cluster_size: cs,
        extended_l2: ext,
        backing: Some((b.to_string(), f.to_string())),
        ..Default::default()
    };
    if raw_base {
        build_raw(&dir.join("base.img"), 3 * MIB, &["write -P 0x11 0 3M".into()]);
    } else {
        build_qcow2(
            &dir.join("base.img"),
            &Qcow2Opts { cluster_size: cs, extended_l2: ext, ..Default::default() },
            3 * MIB,
            &["write -P 0x11 0 3M".into(), "write -z 2M 256k".into()],
        );
    }
    let bf = if raw_base { "raw" } else { "qcow2" };
    let below = if mid {
        build_qcow2(
            &dir.join("mid.qcow2"),
            &o("base.img", bf),
            4 * MIB,
            &["write -P 0x22 256k 512k".into(), "write -z 1M 100k".into()],
        );
        ("mid.qcow2", "qcow2")
    } else {
        ("base.img", bf)
    };
    build_qcow2(
        &dir.join("top.qcow2"),
        &o(below.0, below.1),
        4 * MIB,
        &[
            "write -P 0x33 64k 200k".into(),
            "write -z 512k 64k".into(),
            "write -P 0x34 3584k 300k".into(),
            "write -P 0x35 2561k 7k".into(),
        ],
    );
}

/// Two copies of the chain (qemu-img's and quring's): the directories.
fn two_chains(root: &Path, cs: u32, ext: bool, raw_base: bool, mid: bool) -> (PathBuf, PathBuf) {
    let (q, u) = (root.join("q"), root.join("u"));
    for d in [&q, &u] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir(d).unwrap();
    }
    build(&q, cs, ext, raw_base, mid);
    for f in ["base.img", "mid.qcow2", "top.qcow2"] {
        if q.join(f).exists() {
            std::fs::copy(q.join(f), u.join(f)).unwrap();
        }
    }
    (q, u)
}

#[test]
fn commit_matches_qemu_img() {
    let dir = tempdir();
    let root = dir.path();
    // (cluster size, extended L2, raw base, mid layer, extra args)
    let cases: &[(u32, bool, bool, bool, &[&str])] = &[
        (65536, false, false, false, &[]),
        (512, false, false, false, &[]),
        (2 << 20, true, false, false, &[]),
        (65536, false, true, false, &[]),
        (65536, false, false, false, &["-d"]),
        (65536, false, false, true, &["-b", "BASE"]),
        (65536, false, true, true, &["-b", "BASE"]),
        (65536, false, false, true, &[]),
        (65536, false, false, false, &["-p", "-t", "none"]),
    ];
    for &(cs, ext, raw, mid, extra) in cases {
        let ctx = format!("cs={cs} ext={ext} raw={raw} mid={mid} {extra:?}");
        eprintln!("{ctx}");
        let (q, u) = two_chains(root, cs, ext, raw, mid);
        let bf = if raw { "raw" } else { "qcow2" };
        let args = |d: &Path| {
            let mut v = vec!["commit".to_string()];
            v.extend(extra.iter().map(|a| if *a == "BASE" { s(&d.join("base.img")) } else { a.to_string() }));
            v.push(s(&d.join("top.qcow2")));
            v
        };
        let rq = qemu_img(args(&q));
        assert_eq!(rq.status(), 0, "{ctx}: {}", rq.describe());
        let ru = quring(args(&u));
        assert_eq!(ru.status(), 0, "{ctx}: {}", ru.describe());
        if extra.contains(&"-p") {
            assert!(ru.stdout.ends_with("    (100.00/100%)\r\nImage committed.\n"), "{ctx}: {:?}", ru.stdout);
        } else {
            assert_eq!(ru.stdout, rq.stdout, "{ctx}");
        }
        if !raw {
            check_clean(&u.join("base.img"));
        }
        check_clean(&u.join("top.qcow2"));
        same_content(&q.join("base.img"), &u.join("base.img"), bf);
        if raw {
            assert_eq!(file_len(&u.join("base.img")), file_len(&q.join("base.img")), "{ctx}: raw base length");
        }
        if !mid || extra.is_empty() {
            same_content(&q.join("top.qcow2"), &u.join("top.qcow2"), "qcow2");
        }
        let emptied = !extra.contains(&"-d") && !extra.contains(&"-b");
        assert_eq!(top_allocates(&u.join("top.qcow2")), !emptied, "{ctx}");
        assert_eq!(top_allocates(&q.join("top.qcow2")), !emptied, "{ctx}");
    }
}

#[test]
fn refusals_match_qemu_img() {
    let dir = tempdir();
    let root = dir.path();
    let (q, u) = two_chains(root, 65536, false, false, false);
    let lone = root.join("lone.qcow2");
    create_qcow2(&lone, &Qcow2Opts::default(), MIB);
    let cases: Vec<Vec<String>> = vec![
        vec![s(&lone)],
        vec!["-b".into(), s(&root.join("other.qcow2")), "TOP".into()],
        vec!["-t".into(), "bogus".into(), "TOP".into()],
    ];
    for c in cases {
        let fix = |d: &Path| -> Vec<String> {
            let mut v = vec!["commit".to_string()];
            v.extend(c.iter().map(|a| if a == "TOP" { s(&d.join("top.qcow2")) } else { a.clone() }));
            v
        };
        let before = std::fs::read(u.join("top.qcow2")).unwrap();
        let rq = qemu_img(fix(&q));
        let ru = quring(fix(&u));
        assert_eq!(rq.status(), 1, "{c:?}: {}", rq.describe());
        assert_eq!(ru.status(), 1, "{c:?}: {}", ru.describe());
        assert_eq!(ru.stderr, rq.stderr.replace("qemu-img", "quring").replace(&s(&q), &s(&u)), "{c:?}");
        assert_eq!(std::fs::read(u.join("top.qcow2")).unwrap(), before, "{c:?}");
    }
}

/// A quring overlay larger than its base: the committed data past the base's old end must
/// still show through the emptied overlay (the identity's backing length follows the grown
/// base).
#[test]
fn commit_keeps_the_identity_true() {
    let dir = tempdir();
    let d = dir.path();
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    quring(["create", "-q", &s(&base), "2M"]).ok();
    quring(["io", "-c", "write -P 0x11 0 2M", &s(&base)]).ok();
    quring(["create", "-q", "-b", "base.qcow2", "-F", "qcow2", &s(&top), "4M"]).ok();
    quring(["io", "-c", "write -P 0x33 3M 64k", "-c", "write -P 0x34 0 64k", &s(&top)]).ok();
    let want = d.join("want.raw");
    quring(["convert", "-O", "raw", &s(&top), &s(&want)]).ok();
    let r = quring(["commit", &s(&top)]).ok();
    assert_eq!(r.stdout, "Image committed.\n");
    assert!(!top_allocates(&top));
    let c = qemu_img(["compare", "-f", "raw", &s(&want), &s(&top)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
    quring(["io", "-c", "read -P 0x33 3M 64k", "-c", "read -P 0x34 0 64k", "-c", "read -P 0 2M 1M", &s(&top)]).ok();
    check_clean(&base);
    check_clean(&top);
}
