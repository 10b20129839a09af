//! Golden output against qemu-img (issue 16, items 0 and 1): format probing and `-f`,
//! `info` (human and JSON, raw and qcow2, a missing backing file, snapshots) and `map` (raw
//! files, compressed ranges) give qemu-img's text, JSON and exit codes, with `quring:` for
//! `qemu-img:`. Commands run inside the test directory with relative names.

mod common;

use common::*;
use std::path::Path;

use common::same_as_qemu_img as same;

fn dir_with_images() -> tempfile::TempDir {
    let d = tempdir();
    let p = |n: &str| d.path().join(n);
    build_raw(&p("r.raw"), 4 << 20, &["write -P 1 1M 4k".into(), "write -P 2 3M 64k".into()]);
    std::fs::write(p("e.raw"), b"").unwrap();
    std::fs::write(p("odd.raw"), vec![7u8; 1000]).unwrap();
    build_qcow2(&p("a.qcow2"), &Qcow2Opts::default(), 4 << 20, &["write -P 1 0 64k".into()]);
    std::fs::create_dir(p("sub")).unwrap();
    build_qcow2(&p("sub/base.qcow2"), &Qcow2Opts::default(), 4 << 20, &["write -P 5 0 1M".into()]);
    let o = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&p("sub/ov.qcow2"), &o, 4 << 20, &["write -P 3 0 64k".into(), "write -z 1M 64k".into()]);
    qemu_img(["snapshot", "-c", "snap1", &s(&p("sub/ov.qcow2"))]).ok();
    qemu_img(["convert", "-c", "-O", "qcow2", &s(&p("r.raw")), &s(&p("c.qcow2"))]).ok();
    // Allocated zero clusters (with and without their host cluster), and a metadata-
    // preallocated image whose unwritten clusters read as zeros.
    let zero_cmds = ["write -P 1 0 256k".into(), "write -z 64k 64k".into(), "write -z -u 128k 64k".into()];
    build_qcow2(&p("z.qcow2"), &Qcow2Opts::default(), 4 << 20, &zero_cmds);
    let pre = Qcow2Opts { preallocation: Some("metadata"), ..Default::default() };
    build_qcow2(&p("pre.qcow2"), &pre, 4 << 20, &["write -P 1 0 4k".into()]);
    d
}

#[test]
fn info_matches_qemu_img() {
    let d = dir_with_images();
    for img in ["r.raw", "e.raw", "odd.raw", "a.qcow2", "sub/ov.qcow2", "c.qcow2"] {
        for out in ["--output=human", "--output=json"] {
            same(d.path(), &["info", out, img]);
        }
    }
    // A missing backing file: qemu-img still describes the image.
    std::fs::rename(d.path().join("sub/base.qcow2"), d.path().join("sub/moved.qcow2")).unwrap();
    same(d.path(), &["info", "sub/ov.qcow2"]);
    same(d.path(), &["info", "--output=json", "sub/ov.qcow2"]);
}

#[test]
fn formats_probe_and_refuse_like_qemu_img() {
    let d = dir_with_images();
    for args in [
        &["info", "-f", "qcow2", "r.raw"][..],
        &["info", "-f", "qcow2", "e.raw"],
        &["info", "-f", "foo", "r.raw"],
        &["info", "-f", "raw", "r.raw"],
        &["map", "-f", "qcow2", "r.raw"],
        &["check", "r.raw"],
        &["check", "-f", "qcow2", "r.raw"],
        &["info", "missing.qcow2"],
    ] {
        same(d.path(), args);
    }
}

#[test]
fn map_matches_qemu_img() {
    let d = dir_with_images();
    for img in ["r.raw", "e.raw", "a.qcow2", "sub/ov.qcow2", "z.qcow2", "pre.qcow2"] {
        for out in ["--output=human", "--output=json"] {
            same(d.path(), &["map", out, img]);
        }
    }
    // Compressed ranges: JSON lists them; the human format refuses, as qemu-img does.
    same(d.path(), &["map", "--output=json", "c.qcow2"]);
    let q = run_in(d.path(), "qemu-img", ["map", "c.qcow2"]);
    let ours = quring_in(d.path(), ["map", "c.qcow2"]);
    assert_eq!((ours.status(), ours.stdout.as_str()), (q.status(), q.stdout.as_str()));
    assert!(ours.stderr.contains("File contains external, encrypted or compressed clusters."), "{}", ours.describe());
}

/// qemu-io's command set on copies of one image: the same output (timings cut off), the
/// same exit status; an unknown command is reported and the others still run.
#[test]
fn io_commands_match_qemu_io() {
    let d = dir_with_images();
    let cut = |t: &str| -> String {
        t.lines().map(|l| l.split(" ops; ").next().unwrap_or(l).to_string()).collect::<Vec<_>>().join("\n")
    };
    let cmds: &[&[&str]] = &[
        &["write -q -P 7 0 4k", "foo", "read -q -P 7 0 4k", "bar 1", "read -P 8 0 512"],
        &["length"],
        &["info"],
        &["map"],
        &["alloc 0 64k", "alloc 64k", "alloc 0 128k"],
        &["read -v 0 32"],
        &["write -n 0 4k"],
        &["sleep 10", "truncate 8M", "length"],
        &["aio_write -P 3 0 4k", "aio_flush", "aio_read -P 3 0 4k"],
        &["writev -P 3 0 4k 4k", "readv -P 3 0 4k 4k"],
        &["help read"],
    ];
    for (i, list) in cmds.iter().enumerate() {
        let (a, b) = (d.path().join(format!("q{i}.qcow2")), d.path().join(format!("o{i}.qcow2")));
        std::fs::copy(d.path().join("a.qcow2"), &a).unwrap();
        std::fs::copy(d.path().join("a.qcow2"), &b).unwrap();
        let args = |p: &Path| {
            let mut v: Vec<String> = Vec::new();
            for c in *list {
                v.push("-c".into());
                v.push(c.to_string());
            }
            v.push(s(p));
            v
        };
        let q = qemu_io(args(&a));
        let mut ours_args = vec!["io".to_string()];
        ours_args.extend(args(&b));
        let o = quring(ours_args);
        assert_eq!(o.status(), q.status(), "{list:?}:\n{}\n{}", q.describe(), o.describe());
        if list[0] == "help read" {
            // The usage line (qemu-io's long help text follows it).
            assert_eq!(o.stdout.lines().next(), q.stdout.lines().next());
            continue;
        }
        assert_eq!(cut(&o.stdout), cut(&q.stdout), "{list:?}");
        assert_eq!(o.stderr, q.stderr, "{list:?}");
        // Both images read the same afterwards.
        qemu_img(["compare", &s(&a), &s(&b)]).ok();
    }
}

/// `quring bench`'s option checks give qemu-img bench's messages.
#[test]
fn bench_options_match_qemu_img() {
    let d = dir_with_images();
    for args in
        [&["bench", "-d", "0", "a.qcow2"][..], &["bench", "-c", "0", "a.qcow2"], &["bench", "-s", "0", "a.qcow2"]]
    {
        let q = run_in(d.path(), "qemu-img", args);
        let o = quring_in(d.path(), args);
        assert_eq!(o.stderr.replace("quring:", "qemu-img:").lines().next(), q.stderr.lines().next(), "{args:?}");
    }
    // -S 0 steps by the request size.
    let o = quring_in(d.path(), ["bench", "-c", "4", "-S", "0", "a.qcow2"]).ok();
    let q = run_in(d.path(), "qemu-img", ["bench", "-c", "4", "-S", "0", "a.qcow2"]).ok();
    assert_eq!(o.stdout.lines().next(), q.stdout.lines().next());
}
