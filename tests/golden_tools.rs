//! Golden output against qemu-img (issue 16, item 6): `compare` (identical, content and size
//! mismatches, strict mode, formats, quiet, errors), `measure` (--size and input images,
//! raw and qcow2 targets, cluster sizes, extended L2, compat, refcount widths,
//! preallocation, backing files, errors) and `info --backing-chain` (chains through
//! subdirectories, raw backing files, a missing backing file) give qemu-img's text, JSON
//! (key for key, in order) and exit codes, with `quring:` for `qemu-img:`. Commands run
//! inside the test directory with relative names.

mod common;

use common::*;

use common::same_as_qemu_img as same;

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn compare_matches_qemu_img() {
    let d = tempdir();
    let dir = d.path();
    let p = |n: &str| dir.join(n);
    let base = cmds(&["write -P 1 0 64k", "write -z 1M 64k", "write -P 2 2M 4k"]);
    build_qcow2(&p("a.qcow2"), &Qcow2Opts::default(), 4 << 20, &base);
    qemu_img(["convert", "-O", "raw", &s(&p("a.qcow2")), &s(&p("a.raw"))]).ok();
    qemu_img(["convert", "-O", "qcow2", &s(&p("a.qcow2")), &s(&p("ac.qcow2"))]).ok();
    qemu_img(["convert", "-c", "-O", "qcow2", &s(&p("a.qcow2")), &s(&p("acz.qcow2"))]).ok();
    let small = Qcow2Opts { cluster_size: 512, ..Default::default() };
    build_qcow2(&p("a512.qcow2"), &small, 4 << 20, &base);
    let xl2 = Qcow2Opts { extended_l2: true, ..Default::default() };
    build_qcow2(&p("axl2.qcow2"), &xl2, 4 << 20, &base);
    // One byte differs at 3000 (reported as its sector, 2560).
    build_qcow2(
        &p("b.qcow2"),
        &Qcow2Opts::default(),
        4 << 20,
        &cmds(&["write -P 1 0 64k", "write -P 2 2M 4k", "write -P 3 3000 1"]),
    );
    // Larger images: zeros past 4 MiB, or data there.
    build_qcow2(
        &p("big.qcow2"),
        &Qcow2Opts::default(),
        8 << 20,
        &cmds(&["write -P 1 0 64k", "write -P 2 2M 4k", "write -z 5M 64k"]),
    );
    build_qcow2(
        &p("bigd.qcow2"),
        &Qcow2Opts::default(),
        8 << 20,
        &cmds(&["write -P 1 0 64k", "write -P 2 2M 4k", "write -P 9 6M 1k"]),
    );
    // An overlay and its flattened copy.
    let ov = Qcow2Opts { backing: Some(("a.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&p("ov.qcow2"), &ov, 4 << 20, &cmds(&["write -P 1 512k 64k", "write -z 0 4k"]));
    qemu_img(["convert", "-O", "qcow2", &s(&p("ov.qcow2")), &s(&p("ovflat.qcow2"))]).ok();
    qemu_img(["convert", "-O", "raw", &s(&p("ov.qcow2")), &s(&p("ov.raw"))]).ok();

    for args in [
        &["compare", "a.qcow2", "a.qcow2"][..],
        &["compare", "-s", "a.qcow2", "a.qcow2"],
        &["compare", "a.qcow2", "a.raw"],
        &["compare", "-s", "a.qcow2", "a.raw"],
        &["compare", "a.raw", "a.qcow2"],
        &["compare", "a.qcow2", "ac.qcow2"],
        &["compare", "-s", "a.qcow2", "ac.qcow2"],
        &["compare", "a.qcow2", "acz.qcow2"],
        &["compare", "-s", "a.qcow2", "acz.qcow2"],
        &["compare", "a512.qcow2", "axl2.qcow2"],
        &["compare", "a.raw", "axl2.qcow2"],
        &["compare", "a.qcow2", "b.qcow2"],
        &["compare", "-s", "a.qcow2", "b.qcow2"],
        &["compare", "b.qcow2", "a512.qcow2"],
        &["compare", "a.qcow2", "big.qcow2"],
        &["compare", "big.qcow2", "a.qcow2"],
        &["compare", "a.qcow2", "bigd.qcow2"],
        &["compare", "-s", "a.qcow2", "big.qcow2"],
        &["compare", "ov.qcow2", "ovflat.qcow2"],
        &["compare", "-s", "ov.qcow2", "ovflat.qcow2"],
        &["compare", "ov.qcow2", "ov.raw"],
        &["compare", "ov.qcow2", "a.qcow2"],
        &["compare", "-f", "raw", "-F", "raw", "a.qcow2", "a.qcow2"],
        &["compare", "-f", "raw", "a.qcow2", "a.raw"],
        &["compare", "-F", "raw", "a.raw", "a.raw"],
        &["compare", "-f", "qcow2", "a.raw", "a.qcow2"],
        &["compare", "-q", "a.qcow2", "b.qcow2"],
        &["compare", "-q", "a.qcow2", "a.raw"],
        &["compare", "-U", "a.qcow2", "a.raw"],
        &["compare", "missing.qcow2", "a.qcow2"],
        &["compare", "a.qcow2", "missing.qcow2"],
    ] {
        same(dir, args);
    }
    // One image only: a usage error (exit 1) in both.
    let q = run_in(dir, "qemu-img", ["compare", "a.qcow2"]);
    let o = quring_in(dir, ["compare", "a.qcow2"]);
    assert_eq!((q.status(), o.status()), (1, 1));
    assert!(o.stderr.starts_with("quring: Expecting two image file names"), "{}", o.describe());
}

#[test]
fn measure_matches_qemu_img() {
    let d = tempdir();
    let dir = d.path();
    let p = |n: &str| dir.join(n);
    build_qcow2(
        &p("a.qcow2"),
        &Qcow2Opts::default(),
        64 << 20,
        &cmds(&["write -P 1 1000 3000", "write -P 2 10M 300k", "write -z 20M 1M", "write -P 3 63M 4k"]),
    );
    let ov = Qcow2Opts { backing: Some(("a.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&p("ov.qcow2"), &ov, 64 << 20, &cmds(&["write -P 4 30M 100k", "write -z 10M 64k"]));
    qemu_img(["convert", "-O", "raw", &s(&p("ov.qcow2")), &s(&p("ov.raw"))]).ok();
    qemu_img(["convert", "-c", "-O", "qcow2", &s(&p("ov.qcow2")), &s(&p("c.qcow2"))]).ok();
    std::fs::write(p("odd.raw"), vec![7u8; 1000]).unwrap();
    // Persistent bitmaps (default and 512 KiB granularity).
    qemu_img(["create", "-q", "-f", "qcow2", &s(&p("bm.qcow2")), "100M"]).ok();
    qemu_img(["bitmap", "--add", &s(&p("bm.qcow2")), "b0"]).ok();
    qemu_img(["bitmap", "--add", "-g", "512k", &s(&p("bm.qcow2")), "a-longer-bitmap-name"]).ok();

    for args in [
        &["measure", "-O", "qcow2", "bm.qcow2"][..],
        &["measure", "-O", "qcow2", "-o", "cluster_size=512", "--output=json", "bm.qcow2"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=2M", "bm.qcow2"],
        &["measure", "-O", "qcow2", "-o", "compat=0.10", "bm.qcow2"],
        &["measure", "--size", "1G"],
        &["measure", "--size", "1000"],
        &["measure", "-O", "qcow2", "--size", "1G"],
        &["measure", "-O", "qcow2", "--size", "1G", "--output=json"],
        &["measure", "-O", "qcow2", "--size", "0"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "--size", "100G"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "--size", "100M"],
        &["measure", "-O", "qcow2", "-o", "refcount_bits=64", "--size", "3T", "--output=json"],
        &["measure", "-O", "qcow2", "-o", "preallocation=full", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "preallocation=metadata", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
        &["measure", "a.qcow2"],
        &["measure", "--output=json", "a.qcow2"],
        &["measure", "-O", "qcow2", "a.qcow2"],
        &["measure", "-O", "qcow2", "--output=json", "a.qcow2"],
        &["measure", "-O", "qcow2", "-o", "compat=0.10", "a.qcow2"],
        &["measure", "-O", "qcow2", "-o", "compat=0.10", "--output=json", "a.qcow2"],
        &["measure", "-O", "qcow2", "ov.qcow2"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "ov.qcow2"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "ov.qcow2"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=16k,extended_l2=on", "ov.qcow2"],
        &["measure", "-O", "qcow2", "-o", "backing_file=a.qcow2", "ov.qcow2"],
        &["measure", "-O", "qcow2", "c.qcow2"],
        &["measure", "-O", "qcow2", "ov.raw"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=4k", "--output=json", "ov.raw"],
        &["measure", "-O", "qcow2", "-f", "raw", "a.qcow2"],
        &["measure", "-O", "qcow2", "odd.raw"],
        &["measure", "odd.raw"],
        // Errors.
        &["measure"],
        &["measure", "--size", "1G", "a.qcow2"],
        &["measure", "-O", "qcow2", "-f", "qcow2", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "bogus=1", "--size", "1M"],
        &["measure", "-O", "vmdk", "--size", "1M"],
        &["measure", "-O", "qcow2", "--size", "1P"],
        &["measure", "-O", "qcow2", "missing.qcow2"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=3000", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "cluster_size=4M", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=1", "--size", "1M"],
        &["measure", "-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "--size", "1M"],
    ] {
        same(dir, args);
    }
}

#[test]
fn info_backing_chain_matches_qemu_img() {
    let d = tempdir();
    let dir = d.path();
    let p = |n: &str| dir.join(n);
    std::fs::create_dir(p("sub")).unwrap();
    build_qcow2(&p("sub/base.qcow2"), &Qcow2Opts::default(), 32 << 20, &cmds(&["write -P 1 0 1M"]));
    let mid = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&p("sub/mid.qcow2"), &mid, 32 << 20, &cmds(&["write -P 2 1M 64k"]));
    let top = Qcow2Opts { backing: Some(("sub/mid.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&p("top.qcow2"), &top, 32 << 20, &cmds(&["write -P 3 2M 64k"]));
    qemu_img(["snapshot", "-c", "s1", &s(&p("sub/mid.qcow2"))]).ok();
    build_raw(&p("r.raw"), 4 << 20, &cmds(&["write -P 1 1M 4k"]));
    let over_raw = Qcow2Opts { backing: Some(("r.raw".into(), "raw".into())), ..Default::default() };
    build_qcow2(&p("or.qcow2"), &over_raw, 4 << 20, &[]);
    qemu_img(["create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", &s(&p("miss.qcow2")), "1M"]).ok();
    let miss_mid = Qcow2Opts { backing: Some(("miss.qcow2".into(), "qcow2".into())), ..Default::default() };
    qemu_img([
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-o",
        &miss_mid.create_options(),
        "-b",
        "miss.qcow2",
        "-F",
        "qcow2",
        &s(&p("miss2.qcow2")),
        "1M",
    ])
    .ok();

    for img in ["top.qcow2", "sub/mid.qcow2", "sub/base.qcow2", "or.qcow2", "r.raw", "miss.qcow2", "miss2.qcow2"] {
        for out in ["--output=human", "--output=json"] {
            same(dir, &["info", "--backing-chain", out, img]);
        }
    }
    same(dir, &["info", "--backing-chain", "-f", "raw", "top.qcow2"]);
}

/// `info` describes an image whose external data file is missing, as qemu-img 10 does (it
/// opens the image without I/O and leaves the data file out): the same text and JSON, exit
/// 0, with and without `data_file_raw`, alone, under an overlay and with `--backing-chain`;
/// commands that need guest data (`map`, `io`) still fail as qemu-img/qemu-io do.
#[test]
fn info_describes_an_image_whose_data_file_is_missing() {
    let d = tempdir();
    let dir = d.path();
    for (img, o) in [("m.qcow2", "data_file=gone.raw"), ("r.qcow2", "data_file=gone2.raw,data_file_raw=on")] {
        run_in(dir, "qemu-img", ["create", "-q", "-f", "qcow2", "-o", o, img, "16M"]).ok();
        run_in(dir, "qemu-io", ["-c", "write -P 7 0 128k", img]).ok();
    }
    std::fs::remove_file(dir.join("gone.raw")).unwrap();
    std::fs::remove_file(dir.join("gone2.raw")).unwrap();
    run_in(dir, "qemu-img", ["create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "ov.qcow2"]).ok();
    for img in ["m.qcow2", "r.qcow2", "ov.qcow2"] {
        for out in ["--output=human", "--output=json"] {
            same(dir, &["info", out, img]);
            same(dir, &["info", "-U", out, img]);
            same(dir, &["info", "--backing-chain", out, img]);
        }
    }
    let q = run_in(dir, "qemu-img", ["info", "--output=json", "r.qcow2"]);
    assert_eq!(q.code, Some(0), "{}", q.describe());
    assert!(q.stdout.contains("\"data-file\": \"gone2.raw\""), "{}", q.describe());
    for args in [&["map", "m.qcow2"][..], &["io", "-c", "read 0 512", "m.qcow2"]] {
        let ours = quring_in(dir, args);
        assert_ne!(ours.code, Some(0), "{args:?} ran without the data file:\n{}", ours.describe());
        assert!(ours.stderr.contains("gone.raw"), "{args:?}: the message names the data file:\n{}", ours.describe());
    }
}

/// `amend`, `rebase` and `commit`: help, refusals and messages with relative names, and
/// the lines printed on success (each run on its own copy).
#[test]
fn amend_rebase_commit_match_qemu_img() {
    let d = tempdir();
    let dir = d.path();
    let p = |n: &str| dir.join(n);
    build_qcow2(&p("base.qcow2"), &Qcow2Opts::default(), 4 << 20, &cmds(&["write -P 1 0 1M"]));
    let ov = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&p("ov.qcow2"), &ov, 4 << 20, &cmds(&["write -P 2 64k 64k", "write -z 1M 64k"]));
    create_qcow2(&p("lone.qcow2"), &Qcow2Opts::default(), 1 << 20);
    for args in [
        &["amend", "-o", "help", "ov.qcow2"][..],
        &["amend", "ov.qcow2"],
        &["amend", "-o", "cluster_size=4k", "ov.qcow2"],
        &["amend", "-o", "backing_file=lone.qcow2", "ov.qcow2"],
        &["amend", "-o", "compat=0.10,lazy_refcounts=on", "ov.qcow2"],
        &["amend", "-f", "raw", "-o", "compat=1.1", "ov.qcow2"],
        &["rebase", "ov.qcow2"],
        &["rebase", "-u", "-b", "lone.qcow2", "ov.qcow2"],
        &["rebase", "-b", "nonexistent.qcow2", "-F", "qcow2", "ov.qcow2"],
        &["commit", "lone.qcow2"],
        &["commit", "-b", "lone.qcow2", "ov.qcow2"],
        &["commit", "-t", "bogus", "ov.qcow2"],
    ] {
        same(dir, args);
    }
    // Successful runs print the same lines (on copies: they change the images).
    for args in [
        &["amend", "-o", "compat=0.10", "X"][..],
        &["amend", "-q", "-o", "refcount_bits=8", "X"],
        &["rebase", "-b", "lone.qcow2", "-F", "qcow2", "X"],
        &["rebase", "-u", "-b", "", "X"],
        &["commit", "X"],
        &["commit", "-q", "-d", "X"],
    ] {
        let (q, u) = (p("cq.qcow2"), p("cu.qcow2"));
        std::fs::copy(p("ov.qcow2"), &q).unwrap();
        std::fs::copy(p("ov.qcow2"), &u).unwrap();
        let with = |n: &str| -> Vec<String> {
            args.iter().map(|a| if *a == "X" { n.to_string() } else { a.to_string() }).collect()
        };
        let rq = run_in(dir, "qemu-img", with("cq.qcow2"));
        let ru = quring_in(dir, with("cu.qcow2"));
        let cmd = args.join(" ");
        assert_eq!((ru.status(), &ru.stdout, &ru.stderr), (rq.status(), &rq.stdout, &rq.stderr), "{cmd}");
        let c = qemu_img(["compare", &s(&q), &s(&u)]);
        assert_eq!(c.status(), 0, "{cmd}: {}", c.describe());
        // Restore the base a commit changed.
        build_qcow2(&p("base.qcow2"), &Qcow2Opts::default(), 4 << 20, &cmds(&["write -P 1 0 1M"]));
    }
}
